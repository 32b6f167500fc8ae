"""Real processes for the tests: a broker and command-line clients on loopback.

Everything waits on a condition with a deadline, never on a fixed sleep.
"""

from __future__ import annotations

import atexit
import itertools
import json
import os
import queue
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable

# Each client process is a person of its own: it gets its own secret file
# (identity.py) unless a test gives ZCHAT_SECRET_FILE, and two processes
# given the same file are one person. None of them touches the real
# ~/.config. The files live in a directory removed when the run ends, made
# only when a first file is needed: the benches import this module in every
# worker process, and a worker stopped by a signal never runs atexit.
_secrets_dir: Path | None = None
_secret_numbers = itertools.count(1)
# How long a broker that does not stop gets to print its stacks before it is killed.
STACK_DUMP_S = 5


def new_secret_file() -> str:
    """The path of a secret file nobody uses yet (made by the first client given it)."""
    global _secrets_dir
    if _secrets_dir is None:
        _secrets_dir = Path(tempfile.mkdtemp(prefix="zchat-secrets-"))
        atexit.register(shutil.rmtree, _secrets_dir, True)
    return str(_secrets_dir / f"secret-{next(_secret_numbers)}")


def _ephemeral_ports() -> range:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = map(int, f.read().split())
    except (OSError, ValueError):
        low, high = 32768, 60999  # Linux's default
    return range(low, high + 1)


# Ports for brokers are taken below the kernel's ephemeral range. A client
# that keeps reconnecting to a stopped broker's port in that range can be
# given that very port as its own source port and connect to itself (TCP
# simultaneous open): the port is then in use, and the broker restarted on
# it fails with "Address already in use".
EPHEMERAL = _ephemeral_ports()
PORT_RANGE = range(10000, min(EPHEMERAL.start, 32768) - 1)


def free_port() -> int:
    """A TCP port on 127.0.0.1, outside the ephemeral range, that nothing
    listens on right now."""
    while True:
        port = random.choice(PORT_RANGE)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


def free_port_pair() -> int:
    """A free port whose next port is free too: a broker's default pair."""
    while True:
        port = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port


def wait_until(condition, timeout: float, what: str = "condition", interval: float = 0.02):
    """Poll ``condition`` until it returns a true value; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class LineReader:
    """Collects a stream's lines from a thread, so tests can wait on them."""

    def __init__(self, stream):
        self.lines: list[str] = []
        self._new = queue.Queue()
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream) -> None:
        for raw in stream:
            line = raw.rstrip("\n")
            self.lines.append(line)
            self._new.put(line)
        self._new.put(None)

    def wait_for(self, predicate, timeout: float, what: str = "a line") -> str:
        """The first line (seen before or arriving) that matches ``predicate``."""
        deadline = time.monotonic() + timeout
        checked = 0
        while True:
            while checked < len(self.lines):
                line = self.lines[checked]
                checked += 1
                if predicate(line):
                    return line
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}; "
                                     f"got {self.lines[-20:]}")
            try:
                self._new.get(timeout=min(remaining, 0.1))
            except queue.Empty:
                pass

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Our environment for a child, less our own CHAT_* settings, with a
    secret file of its own, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHAT_")}
    env.update({"PYTHONUNBUFFERED": "1", "ZCHAT_SECRET_FILE": new_secret_file(), **(extra or {})})
    return env


def _spawn(args: list[str], env: dict[str, str] | None = None, **kw) -> subprocess.Popen:
    """``env``: variables added to the child's environment (see child_env)."""
    return subprocess.Popen([PYTHON, *args], cwd=ROOT, text=True, env=child_env(env),
                            encoding="utf-8", errors="replace", **kw)


class Broker:
    """A real broker process on free loopback ports."""

    def __init__(self, *extra: str, port: int | None = None, pub_port: int | None = None):
        self.chosen_ports = port is not None
        self.port = port or free_port_pair()
        self.pub_port = pub_port or self.port + 1
        self.extra = list(extra)
        self.proc: subprocess.Popen | None = None
        self.log: LineReader | None = None

    def start(self, timeout: float = 10, attempts: int = 3) -> "Broker":
        """Start and wait until it listens; ports we picked ourselves may be
        taken by someone else in between, so then try fresh ones."""
        for _ in range(attempts):
            self.proc = _spawn(["broker.py", "--port", str(self.port), "--pub-port",
                                str(self.pub_port), *self.extra], stderr=subprocess.PIPE)
            self.log = LineReader(self.proc.stderr)
            line = self.log.wait_for(lambda l: "listening" in l or "cannot bind" in l, timeout,
                                     "the broker to listen")
            if "listening" in line:
                return self
            self.proc.wait(timeout)
            if self.chosen_ports:
                break
            self.port = free_port_pair()
            self.pub_port = self.port + 1
        raise AssertionError(f"the broker could not start: {line}")

    @property
    def client_args(self) -> list[str]:
        return ["--port", str(self.port)]

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 5) -> int:
        """SIGTERM, then the exit status; a broker still running after
        ``timeout`` is killed and fails the test, saying where it hung."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the broker did not exit within {timeout} s of SIGTERM; "
                                 f"its stacks then:\n{self._kill_with_stacks()}") from None

    def _kill_with_stacks(self) -> str:
        """Kill the broker after it printed every thread's stack (broker.py
        does on SIGUSR1), and return those lines."""
        first = len(self.log.lines)
        self.proc.send_signal(signal.SIGUSR1)
        try:
            # the main thread comes last, and its outermost frame is the script
            self.log.wait_for(lambda line: "in <module>" in line, STACK_DUMP_S, "the stacks")
        except AssertionError:
            pass  # killed anyway; whatever it printed is returned
        self.proc.kill()
        self.proc.wait()
        self.log.join(STACK_DUMP_S)
        return "\n".join(self.log.lines[first:])

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def wait_log(self, predicate, timeout: float, what: str = "a log line") -> str:
        return self.log.wait_for(predicate, timeout, what)


class Client:
    """A running cli_client.py with its output collected line by line.

    ``broker`` is anything with ``client_args`` (a Broker, or a proxy to one).
    """

    def __init__(self, broker, *args: str, name: str | None = None,
                 stdin=subprocess.DEVNULL, env: dict[str, str] | None = None):
        cmd = ["cli_client.py", *args, *broker.client_args]
        if name:
            cmd += ["--name", name]
        self.proc = _spawn(cmd, env=env, stdin=stdin, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE)
        self.out = LineReader(self.proc.stdout)
        self.err = LineReader(self.proc.stderr)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def json_records(self) -> list[dict]:
        return [json.loads(line) for line in self.out.lines]

    def messages(self) -> list[dict]:
        return [r for r in self.json_records() if r["type"] == "message"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def listen(broker, name: str, *args: str, timeout: float = 10,
           env: dict[str, str] | None = None) -> Client:
    """A `listen --json` client, returned once it has joined (a room)."""
    client = Client(broker, "listen", "--json", *args, name=name, env=env)
    def own_join(line: str) -> bool:
        record = json.loads(line)
        return record["type"] == "join" and record["name"] == name

    try:
        client.out.wait_for(own_join, timeout, f"{name} to join")
    except AssertionError:
        client.stop()
        raise AssertionError(f"{name} did not join: {client.err.lines}") from None
    return client


def run_cli(broker: Broker, *args: str, name: str | None = None, input: str | None = None,
            timeout: float = 30, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess:
    """cli_client.py with ``args``, then the broker's address and ``name``."""
    cmd = [*args, *broker.client_args]
    if name:
        cmd += ["--name", name]
    return run_cli_exactly(*cmd, env=env, input=input, timeout=timeout)


def run_cli_exactly(*args: str, env: dict[str, str] | None = None, input: str | None = None,
                    timeout: float = 30) -> subprocess.CompletedProcess:
    """cli_client.py with exactly ``args`` (and ``env`` added to the environment)."""
    proc = _spawn(["cli_client.py", *args], env=env, stdin=subprocess.PIPE,
                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stdout, stderr = proc.communicate(input or "", timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
