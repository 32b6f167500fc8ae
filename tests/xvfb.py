"""A virtual X screen for the window tests, and the tools that drive it.

When DISPLAY is unset, the ``x_display`` fixture starts one Xvfb for the
whole test session and sets DISPLAY, so in-process Tk windows and child
processes both find it. Xvfb picks a free display number itself
(``-displayfd``), so test runs side by side never race for one. Without
Xvfb the window tests are skipped, except under CI (CI=true), where they
must run: there a missing or failing Xvfb fails them loudly.
"""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import time

import pytest

SCREEN = "1280x800x24"
START_TIMEOUT = 15.0


def running_under_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def need_tool(tool: str) -> str:
    """The path of ``tool``; skips the test without it, or fails under CI."""
    path = shutil.which(tool)
    if path is None:
        message = f"{tool} is not installed (Debian package: {tool})"
        if running_under_ci():
            pytest.fail(message + "; the window tests must run under CI")
        pytest.skip(message)
    return path


class Xvfb:
    """One Xvfb server on a display number of its own choosing."""

    def __init__(self, executable: str):
        read_end, write_end = os.pipe()
        try:
            self.proc = subprocess.Popen(
                [executable, "-displayfd", str(write_end), "-screen", "0", SCREEN,
                 "-nolisten", "tcp"],
                pass_fds=(write_end,), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        finally:
            os.close(write_end)
        try:
            self.display = f":{self._read_display_number(read_end)}"
        except Exception:
            self.stop()
            raise
        finally:
            os.close(read_end)

    def _read_display_number(self, read_end: int) -> int:
        """Xvfb writes its number once it accepts connections."""
        deadline = time.monotonic() + START_TIMEOUT
        text = b""
        while not text.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([read_end], [], [], remaining)[0]:
                raise RuntimeError(f"Xvfb gave no display number within {START_TIMEOUT}s")
            chunk = os.read(read_end, 64)
            if not chunk:
                error = self.proc.stderr.read().decode(errors="replace")
                raise RuntimeError(f"Xvfb exited: {error}")
            text += chunk
        return int(text)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# Shared by every test module that uses the fixture (each gets its own
# copy of a session fixture), so the session starts one server at most.
_server: Xvfb | None = None


@pytest.fixture(scope="session")
def x_display():
    """The X display the window tests use (started here when DISPLAY is unset)."""
    global _server
    if os.environ.get("DISPLAY"):
        yield os.environ["DISPLAY"]
        return
    if _server is None:
        executable = need_tool("Xvfb")
        try:
            _server = Xvfb(executable)
        except (OSError, RuntimeError) as e:
            if running_under_ci():
                pytest.fail(f"cannot start Xvfb: {e}")
            pytest.skip(f"cannot start Xvfb: {e}")
    os.environ["DISPLAY"] = _server.display
    yield _server.display
    if _server is not None:
        _server.stop()
        _server = None
        os.environ.pop("DISPLAY", None)
