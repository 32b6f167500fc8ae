"""The cores and the protocol stay free of I/O: no sockets, threads, clocks or Tk.

A module qualifies by what it imports itself and what the project's own
modules it imports do, followed to the end; standard-library modules that
use threads inside (logging) do not count against it.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = {"socket", "threading", "time", "tkinter", "zmq", "select", "selectors", "asyncio",
             "subprocess", "queue", "sqlite3", "redis"}
PROJECT = {p.stem for p in ROOT.glob("*.py")}


def imports_of(module: str) -> set[str]:
    """Top-level names of every module that ``module`` imports."""
    tree = ast.parse((ROOT / f"{module}.py").read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def reachable(module: str) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        for imported in imports_of(name):
            if imported not in seen:
                seen.add(imported)
                if imported in PROJECT:
                    todo.append(imported)
    return seen


@pytest.mark.parametrize("module", ["broker_core", "broker_presence", "broker_backplane",
                                    "broker_rewind", "broker_outputs", "broker_model",
                                    "broker_stream",
                                    "client_core", "client_stream", "messages",
                                    "backplane_core"])
def test_a_core_module_imports_no_io(module):
    assert reachable(module) & FORBIDDEN == set()


def test_the_check_sees_an_io_import():
    assert "zmq" in reachable("client_session") and "time" in reachable("broker")
    assert "redis" in reachable("backplane")


def test_the_broker_imports_redis_only_for_the_backplane():
    """redis-py is imported inside the function that opens the backplane,
    never at the top of broker.py: without --backplane it is not needed."""
    tree = ast.parse((ROOT / "broker.py").read_text())
    top_level = {alias.name for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))
                 for alias in node.names} | {node.module for node in tree.body
                                             if isinstance(node, ast.ImportFrom)}
    assert not top_level & {"redis", "backplane"}
