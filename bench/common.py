"""What the benchmark's parts share: paths, /proc figures, worker and target processes.

Every process the benchmark starts is one of two kinds:

* a *target*: the server under test, which prints "listening" on stderr when
  it is ready (the zchat broker, or one of the baselines in baselines.py);
* a *worker*: a load generator process from loadgen.py, driven by one-line
  commands on its stdin and answering with one JSON line on its stdout. A
  worker exits by itself when its stdin closes, so none outlives the run.

CPU and memory figures come from /proc, so they cover every thread of a
process (libzmq's I/O thread included) and cost the measured process nothing.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import queue
import resource
import signal
import subprocess
import sys
import threading
from pathlib import Path

import zmq

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PYTHON = sys.executable
# The product's modules (messages) and the tests' process helpers.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.procs import LineReader, free_port_pair  # noqa: E402

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


def raise_open_file_limit() -> int:
    """Lift this process's soft open-file limit to its hard limit; returns it.

    Children inherit the limit, so calling it once in run.py covers the
    broker and every worker too.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


# --- /proc figures ----------------------------------------------------------------


def cpu_times(pid: int) -> tuple[float, float]:
    """User and system CPU time of a whole process so far (all its threads), in s."""
    with open(f"/proc/{pid}/stat") as f:
        # The command name may hold spaces: the fields after it start past ')'.
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLOCK_TICKS, int(fields[12]) / CLOCK_TICKS


def cpu_seconds(pid: int) -> float:
    """user + system CPU time of a whole process so far (all its threads)."""
    return sum(cpu_times(pid))


def memory_bytes(pid: int) -> dict:
    """Current and peak resident memory of a process."""
    figures = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                figures[key] = int(value.split()[0]) * 1024
    return {"rss": figures.get("VmRSS", 0), "peak_rss": figures.get("VmHWM", 0)}


def open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def open_file_limit(pid: int) -> int:
    """The soft open-file limit in force for a process."""
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                return int(line.split()[3])
    return 0


class CpuMeter:
    """CPU used by a set of processes between start() and stop()."""

    def __init__(self, pids: dict[str, int]):
        self.pids = pids
        self._start: dict[str, float] = {}
        self._t0 = 0.0

    def start(self, now: float) -> None:
        self._t0 = now
        self._start = {name: cpu_seconds(pid) for name, pid in self.pids.items()}

    def stop(self, now: float) -> dict:
        """Per process: CPU seconds used and the share of one core it means."""
        wall = max(now - self._t0, 1e-9)
        used = {}
        for name, pid in self.pids.items():
            try:
                seconds = cpu_seconds(pid) - self._start[name]
            except FileNotFoundError:  # it died: report what is known
                seconds = float("nan")
            used[name] = {"cpu_s": seconds, "cores": seconds / wall}
        return used


# --- processes ------------------------------------------------------------------


def _spawn(args: list[str], **kw) -> subprocess.Popen:
    # Own process group: a Ctrl-C in the terminal reaches run.py alone, which
    # then stops every child in order (workers need their stdin closed).
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
    return subprocess.Popen([PYTHON, *args], cwd=ROOT, env=env, text=True,
                            start_new_session=True, **kw)


def stop_process(proc: subprocess.Popen, grace: float = 10) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Worker:
    """A generator process (loadgen.py, or ``script``): commands in on stdin, JSON
    lines out on stdout."""

    def __init__(self, name: str, *args: str, script: str = "loadgen.py"):
        self.name = name
        self.proc = _spawn([str(BENCH / script), *args], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE)
        self._lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def command(self, *words) -> None:
        self.proc.stdin.write(" ".join(str(w) for w in words) + "\n")
        self.proc.stdin.flush()

    def reply(self, timeout: float) -> dict:
        """The next JSON line the worker prints."""
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"{self.name}: no answer within {timeout:.0f}s") from None
        if line is None:
            self._lines.put(None)  # stay at end of stream for later calls
            raise RuntimeError(f"{self.name} exited with code {self.proc.wait()}")
        return json.loads(line)

    def ask(self, timeout: float, *words) -> dict:
        self.command(*words)
        return self.reply(timeout)

    def kill(self) -> None:
        """Now, without a goodbye: what a crash or a pulled cable looks like."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        """Close its stdin (it exits by itself), then make sure it is gone."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        stop_process(self.proc, grace=3)


# The broker, then zchat run with other options (what each costs or buys),
# then the baselines. ``zchat-db`` writes its history to a SQLite file in
# the run's work folder.
ZCHAT_OPTIONS = {
    "zchat": (),
    "zchat-no-coalesce": ("--coalesce-ms", "0"),
    "zchat-db": ("--db",),  # + the file's path
}
BASELINE_KINDS = ("c-forwarder", "python-loop")
TARGET_KINDS = (*ZCHAT_OPTIONS, *BASELINE_KINDS)
# The broker's per-user rate limit (default 200 msg/s) would cap M senders at
# M x 200 msg/s: the benchmark measures the broker, not that policy, so it
# lifts the limit whenever the broker has one.
UNLIMITED_RATE_ARGS = ["--rate", "1000000000", "--burst", "1000000000"]


# Every load client connects from 127.0.0.1: the limit per address is lifted too.
UNLIMITED_ADDRESS_ARGS = ["--max-per-address", "1000000"]


@functools.cache
def zchat_broker_args() -> tuple[str, ...]:
    """Options for broker.py: the rate limit and the limit of connections
    per address lifted, if this version has them."""
    help_text = subprocess.run([PYTHON, "broker.py", "--help"], cwd=ROOT, capture_output=True,
                               text=True, timeout=30).stdout
    return ((tuple(UNLIMITED_RATE_ARGS) if "--burst" in help_text else ())
            + (tuple(UNLIMITED_ADDRESS_ARGS) if "--max-per-address" in help_text else ()))


class Target:
    """The server under test on free loopback ports.

    ``zchat`` and its variants are the real broker.py (see ZCHAT_OPTIONS;
    ``work_dir`` holds zchat-db's SQLite file); the other kinds are the
    baselines of baselines.py, which speak just enough of the protocol for
    the same load generator: the C forwarder neither acknowledges nor knows
    sessions.
    """

    def __init__(self, kind: str, wrapper: list[str] | None = None,
                 work_dir: Path | None = None, extra_args: tuple[str, ...] = ()):
        if kind not in TARGET_KINDS:
            raise ValueError(f"unknown target {kind!r}")
        if kind == "zchat-db" and work_dir is None:
            raise ValueError("zchat-db needs a work_dir for its database")
        self.kind = kind
        self.work_dir = work_dir
        self.port = free_port_pair()
        self.pub_port = self.port + 1
        # e.g. ["-m", "cProfile", "-o", FILE]: run the target under a profiler
        self.wrapper = wrapper or []
        self.extra_args = list(extra_args)  # more broker.py options (zchat kinds only)
        self.proc: subprocess.Popen | None = None
        self.log: LineReader | None = None

    @property
    def joins(self) -> bool:
        """Whether clients must say hello (and keep heartbeating) first."""
        return self.is_zchat

    @property
    def is_zchat(self) -> bool:
        return self.kind in ZCHAT_OPTIONS

    @property
    def acknowledges(self) -> bool:
        return self.kind != "c-forwarder"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def start(self, timeout: float = 15) -> "Target":
        ports = ["--port", str(self.port), "--pub-port", str(self.pub_port)]
        if self.is_zchat:
            options = list(ZCHAT_OPTIONS[self.kind])
            if self.kind == "zchat-db":
                options.append(str(self.work_dir / f"history-{self.port}.db"))
            program = ["broker.py", *ports, *zchat_broker_args(), *options, *self.extra_args]
        else:
            program = [str(BENCH / "baselines.py"), self.kind, *ports]
        self.proc = _spawn([*self.wrapper, *program], stderr=subprocess.PIPE)
        self.log = LineReader(self.proc.stderr)
        self.log.wait_for(lambda line: "listening" in line, timeout, f"{self.kind} to listen")
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, grace=10)  # a profiled broker needs time to write


def unwind_on_signals(*signals: int) -> None:
    """SIGTERM (and any of ``signals``) raises KeyboardInterrupt in the main
    thread, which unwinds through every ``finally`` and ExitStack: every child
    process a bench started is stopped by its pid, even when the bench is
    killed by a timeout."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt
    for sig in {signal.SIGTERM, *signals}:
        signal.signal(sig, interrupt)


# --- reporting -----------------------------------------------------------------


def machine() -> dict:
    with open("/proc/cpuinfo") as f:
        models = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    with open("/proc/meminfo") as f:
        mem_kb = int(f.readline().split()[1])
    return {"cpu": models[0] if models else platform.processor(), "cores": os.cpu_count(),
            "memory_gib": round(mem_kb / 2**20, 1), "kernel": platform.release(),
            "python": platform.python_version(), "pyzmq": zmq.__version__,
            "libzmq": zmq.zmq_version(), "load_average_at_start": os.getloadavg()}


def fmt(value, spec: str = ".1f", none: str = "-") -> str:
    return none if value is None else format(value, spec)


def table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
