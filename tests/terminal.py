"""A program run on a real pseudo-terminal, for the tests of the terminal chat.

The terminal answers cursor position requests as a real one does, so the
program under test (prompt_toolkit) takes its normal path. Tests wait on
what the program has written, with a deadline, never on a fixed sleep.
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import signal
import struct
import subprocess
import termios
import threading
import time

from procs import PYTHON, ROOT, child_env

CURSOR_POSITION_REQUEST = b"\x1b[6n"
# CSI and OSC sequences, and the short ESC ones: what a screen would not show as text.
_ESCAPES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(\x07|\x1b\\)|\x1b[()][0-9A-Za-z]"
                      r"|\x1b[=>78]")


def printable(raw: str) -> str:
    """What was written, without the terminal's escape sequences."""
    return _ESCAPES.sub("", raw)


class Terminal:
    """``python ARGS`` with stdin, stdout and stderr on one pty of ``rows`` x ``cols``."""

    def __init__(self, *args: str, rows: int = 24, cols: int = 100,
                 env: dict[str, str] | None = None):
        self.rows = rows
        self.master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        self.proc = subprocess.Popen([PYTHON, *args], cwd=ROOT, stdin=slave, stdout=slave,
                                     stderr=slave, env=child_env({"TERM": "xterm", **(env or {})}),
                                     start_new_session=True)
        os.close(slave)
        self._raw = b""
        self._changed = threading.Condition()
        self._closed = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        answered = 0
        while not self._closed:
            ready, _, _ = select.select([self.master], [], [], 0.1)
            if not ready:
                continue
            try:
                chunk = os.read(self.master, 65536)
            except OSError:  # the program has gone and closed its side
                chunk = b""
            with self._changed:
                self._raw += chunk
                self._changed.notify_all()
            if not chunk:
                return
            # Answer each request once, at the bottom row, as after a scroll.
            while self._raw.count(CURSOR_POSITION_REQUEST) > answered:
                answered += 1
                os.write(self.master, f"\x1b[{self.rows};1R".encode())

    @property
    def raw(self) -> str:
        """Everything written so far, escape sequences included."""
        with self._changed:
            return self._raw.decode("utf-8", "replace")

    @property
    def text(self) -> str:
        return printable(self.raw)

    def type(self, keys: str) -> None:
        os.write(self.master, keys.encode())

    def wait_for(self, condition, timeout: float, what: str) -> str:
        """Wait until ``condition(text)`` holds (a str: until the text holds it)."""
        check = (lambda text: condition in text) if isinstance(condition, str) else condition
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                text = printable(self._raw.decode("utf-8", "replace"))
                if check(text):
                    return text
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"timed out after {timeout}s waiting for {what}; "
                                         f"the terminal shows {text[-600:]!r}")
                self._changed.wait(min(remaining, 0.2))

    def local_modes(self) -> int:
        """The terminal's lflag (ECHO, ICANON...): a program must restore them."""
        return termios.tcgetattr(self.master)[3]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self._closed = True
        self._reader.join(2)
        os.close(self.master)
