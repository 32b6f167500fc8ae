#!/usr/bin/env python3
"""Where a join storm's time goes: the broker's CPU split by thread.

    python bench/joinprobe.py --clients 5000 [--repeat 2] [--broker-dir DIR ...]
        [--idle-seconds 4] [--profile storm|idle] [-- BROKER OPTIONS]

One step of rawbench.py's join scenario (the independent generator,
bench/rawgen.py: ``--clients`` full clients joining one room at once), on a
fresh broker, then an idle window with all of them joined. Beside the wall
time and the broker's CPU it reports each thread's share, read from
``/proc/PID/task/*/stat``: the Python thread (the loop), libzmq's I/O
thread(s) (``ZMQbg/IO/N``, accepting, handshaking, reading and writing
sockets), and the other threads (libzmq's reaper; before admission's
monitors were read in the loop, admission's thread). With several ``--broker-dir`` (copies of the broker at different
commits), the steps alternate between them, ``--repeat`` times each, so that
a shared machine's load falls on all of them alike.

``--profile`` runs py-spy (``--native``, if present beside this Python)
over the storm or the idle window and prints the functions with the most
samples. py-spy stops the process for each native sample, which adds to its
CPU: take the figures from a run without ``--profile``.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import common
from common import CLOCK_TICKS, PYTHON, ROOT, Worker
from rawbench import CLIENTS_PER_PROC, READY_TIMEOUT, START_SECONDS, ns, say
from tests.procs import LineReader, free_port_pair

MAX_USERS = 10_000  # above the largest step: the broker's limit is not what is measured
PROFILE_RATE = 200  # py-spy samples per second
WAITING = {"poll", "epoll_wait", "__poll"}  # a thread waiting, not working


def thread_times(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) of each thread of ``pid`` so far, by role:
    ``python`` (the main thread: the broker's loop), ``zmq-io`` (every
    libzmq I/O thread), ``zmq-other`` (libzmq's reaper), ``other`` (the
    other Python threads: admission's monitor reader, in brokers before it
    was read in the loop)."""
    out: dict[str, float] = collections.Counter()
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                stat = f.read()
        except FileNotFoundError:
            continue  # a thread that ended
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat.rsplit(")", 1)[1].split()
        user, system = int(fields[11]) / CLOCK_TICKS, int(fields[12]) / CLOCK_TICKS
        role = ("python" if int(tid) == pid else "zmq-io" if comm.startswith("ZMQbg/IO")
                else "zmq-other" if comm.startswith("ZMQbg") else "other")
        out[role] += user + system
        out[role + " sys"] += system
    return out


ROLES = ("python", "zmq-io", "zmq-other", "other")


def delta(after: dict, before: dict, roles=ROLES) -> dict:
    return {k: round(after.get(k, 0) - before.get(k, 0), 2) for k in roles}


class Broker:
    """broker.py of ``directory`` on free loopback ports."""

    def __init__(self, directory: Path, extra: list[str]):
        self.port = free_port_pair()
        self.pub_port = self.port + 1
        args = [PYTHON, "broker.py", "--port", str(self.port), "--pub-port", str(self.pub_port),
                "--max-users", str(MAX_USERS), *common.UNLIMITED_RATE_ARGS,
                *common.UNLIMITED_ADDRESS_ARGS, "--log-level", "WARNING", *extra]
        self.proc = subprocess.Popen(args, cwd=directory, stderr=subprocess.PIPE, text=True,
                                     start_new_session=True)
        LineReader(self.proc.stderr).wait_for(lambda line: "listening" in line, 15,
                                              "the broker to listen")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def profile(pid: int, seconds: float, top: int = 30) -> dict:
    """py-spy over ``pid`` for ``seconds``: of the samples not waiting in
    poll, the share of each function on top of the stack (self) and anywhere
    in it (total), by function."""
    spy = shutil.which("py-spy", path=str(Path(PYTHON).parent)) or shutil.which("py-spy")
    if spy is None:
        return {"error": "py-spy not found"}
    raw = Path(tempfile.gettempdir()) / f"joinprobe-{pid}.txt"
    subprocess.run([spy, "record", "--pid", str(pid), "--native", "--format", "raw",
                    "--rate", str(PROFILE_RATE), "--duration", str(math.ceil(seconds)),
                    "--output", str(raw)], capture_output=True, timeout=seconds + 30)
    own: collections.Counter = collections.Counter()
    total: collections.Counter = collections.Counter()
    busy = idle = 0
    if raw.exists():
        for line in raw.read_text().splitlines():
            stack, _, n = line.rpartition(" ")
            frames = [f.split(" (")[0] for f in stack.split(";")]
            if frames[-1] in WAITING:
                idle += int(n)
                continue
            busy += int(n)
            own[frames[-1]] += int(n)
            for f in set(frames):
                total[f] += int(n)
        raw.unlink()
    share = lambda c: [(name, round(100 * n / max(busy, 1), 1)) for name, n in c.most_common(top)]
    return {"busy_pct": round(100 * busy / max(busy + idle, 1), 1), "self": share(own),
            "total": share(total)}


def perf(pid: int, seconds: float, top: int = 40) -> list[str]:
    """perf (if installed) over every thread of ``pid`` for ``seconds``: the
    symbols with the most samples, by thread name (comm)."""
    if shutil.which("perf") is None:
        return ["perf not found"]
    data = str(Path(tempfile.gettempdir()) / f"joinprobe-{pid}.perf")
    subprocess.run(["perf", "record", "-F", "999", "-p", str(pid), "-o", data, "--", "sleep",
                    str(seconds)], capture_output=True, timeout=seconds + 30)
    report = subprocess.run(["perf", "report", "-i", data, "--stdio", "--no-children",
                             "--sort", "comm,dso,sym"], capture_output=True, text=True,
                            timeout=120).stdout
    Path(data).unlink(missing_ok=True)
    return [line for line in report.splitlines() if line.strip() and not line.startswith("#")][:top]


def step(directory: Path, clients: int, opts) -> dict:
    with ExitStack() as stack:
        broker = Broker(directory, opts.broker_args)
        stack.callback(broker.stop)
        workers = []
        per = [clients // math.ceil(clients / CLIENTS_PER_PROC)] * math.ceil(
            clients / CLIENTS_PER_PROC)
        per[0] += clients - sum(per)
        for i, n in enumerate(per):
            w = Worker(f"j{i}", "--kind", "zchat", "--role", "listen", "--port",
                       str(broker.port), "--pub-port", str(broker.pub_port), "--clients", str(n),
                       "--tag", f"j{i}", script="rawgen.py")
            stack.callback(w.stop)
            workers.append(w)
        for w in workers:
            w.reply(READY_TIMEOUT)
        start = ns() + int(START_SECONDS * 1e9)
        deadline = start + int(opts.join_timeout * 1e9)
        before, gen_before = thread_times(broker.pid), [common.cpu_seconds(w.pid) for w in workers]
        t0 = time.monotonic()
        for w in workers:
            w.command(json.dumps({"cmd": "join", "mode": "storm", "start_ns": start,
                                  "deadline_ns": deadline}))
        spied = None
        if opts.profile == "storm":
            spied = profile(broker.pid, opts.join_timeout * 0.5)
        elif opts.perf == "storm":
            spied = perf(broker.pid, opts.join_timeout * 0.5)
        replies = [w.reply(opts.join_timeout + READY_TIMEOUT) for w in workers]
        storm_wall = time.monotonic() - t0
        storm_after = thread_times(broker.pid)
        storm = delta(storm_after, before)
        storm_sys = delta(storm_after, before, [r + " sys" for r in ROLES])
        gen = sum(common.cpu_seconds(w.pid) for w in workers) - sum(gen_before)
        joined = sum(r["joined"] for r in replies)
        ends = [r["start_ns"] / 1e9 + r["done_s"][-1] for r in replies if r["done_s"]]
        wall = max(ends) - start / 1e9 if joined == clients else storm_wall
        time.sleep(opts.idle_settle)
        before = thread_times(broker.pid)
        t0 = time.monotonic()
        if opts.profile == "idle":
            spied = profile(broker.pid, opts.idle_seconds)
        elif opts.perf == "idle":
            spied = perf(broker.pid, opts.idle_seconds)
        else:
            time.sleep(opts.idle_seconds)
        idle_wall = time.monotonic() - t0
        idle = delta(thread_times(broker.pid), before)
        stats = []
        for w in workers:
            w.command(json.dumps({"cmd": "stats"}))
            stats.append(w.reply(READY_TIMEOUT))
        errors = collections.Counter()
        for r in [*replies, *stats]:
            errors.update(r["errors"])
            errors.update(r["failures"])
        result = {"broker": str(directory), "clients": clients, "joined": joined,
                  "wall_s": round(wall, 2), "storm_cpu": storm, "storm_sys": storm_sys,
                  "storm_cpu_s": round(sum(storm.values()), 2), "generator_cpu_s": round(gen, 2),
                  "idle_pct": {k: round(100 * v / idle_wall, 1) for k, v in idle.items()},
                  "idle_pct_total": round(100 * sum(idle.values()) / idle_wall, 1),
                  "in_session_after_idle": sum(s["in_session"] for s in stats),
                  "generator_ping_late_max_s": round(max(s.get("ping_late_max_s", 0)
                                                         for s in stats), 2),
                  "errors": dict(errors), "load": os.getloadavg()[0]}
        if spied is not None:
            result["profile"] = spied
        return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", default="5000", help="comma-separated step sizes")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--broker-dir", action="append", type=Path,
                   help="a directory holding broker.py (repeatable; default this checkout)")
    p.add_argument("--join-timeout", type=float, default=40.0)
    p.add_argument("--idle-seconds", type=float, default=4.0)
    p.add_argument("--idle-settle", type=float, default=1.0)
    p.add_argument("--profile", choices=("storm", "idle"), help="py-spy over that phase")
    p.add_argument("--perf", choices=("storm", "idle"), help="perf over that phase")
    p.add_argument("broker_args", nargs="*", help="more broker.py options (after --)")
    opts = p.parse_args(argv)
    common.raise_open_file_limit()
    dirs = opts.broker_dir or [ROOT]
    for _ in range(opts.repeat):
        for clients in [int(n) for n in opts.clients.split(",")]:
            for directory in dirs:
                r = step(directory, clients, opts)
                print(json.dumps(r), flush=True)
                say(f"{directory.name} {clients}: joined {r['joined']} in {r['wall_s']} s, "
                    f"CPU {r['storm_cpu_s']} s {r['storm_cpu']}, idle {r['idle_pct_total']}% "
                    f"{r['idle_pct']}, generator {r['generator_cpu_s']} s, its pings up to "
                    f"{r['generator_ping_late_max_s']} s late, in session after idle "
                    f"{r['in_session_after_idle']}, {r['errors'] or 'no errors'}, "
                    f"load {r['load']:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
