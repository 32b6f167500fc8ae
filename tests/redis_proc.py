"""A real redis-server for the backplane's tests, on a free loopback port.

Each server has its own temporary directory (its AOF files live there) and
is stopped by its pid. Starting waits until it says it accepts connections,
never on a fixed sleep.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile

from procs import LineReader, free_port

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


class RedisServer:
    """A redis-server process with append-only persistence (``appendfsync
    everysec``, as PROTOCOL.md assumes); restartable on the same port and
    directory, so what it had written survives a stop."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix="zchat-redis-")
        self.proc: subprocess.Popen | None = None
        self.log: LineReader | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10) -> "RedisServer":
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1",
             "--dir", self.dir, "--save", "", "--appendonly", "yes",
             "--appendfsync", "everysec", "--daemonize", "no", "--loglevel", "notice"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            encoding="utf-8", errors="replace")
        self.log = LineReader(self.proc.stdout)
        self.log.wait_for(lambda l: "Ready to accept connections" in l
                          or "Could not create server" in l, timeout, "redis-server to start")
        if self.proc.poll() is not None or not any("Ready to accept" in l for l in self.log.lines):
            self.kill()
            raise AssertionError(f"redis-server did not start: {self.log.lines[-5:]}")
        return self

    def stop(self, timeout: float = 10) -> None:
        """SIGTERM: redis-server flushes its AOF and exits."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def remove(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)
