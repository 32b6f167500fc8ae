"""The benchmark's scenarios, each returning plain JSON-ready figures.

A *rig* is one target with one sender process (M DEALERs) and a few listener
processes (N SUBs in all); a *trial* offers it a fixed rate for a fixed time
and checks that every message was accepted, acknowledged (where the target
acknowledges) and delivered to every listener, with p99 latency under the
limit. Scenarios are built from trials:

* throughput: doubling rates until a trial fails, then bisecting;
* fixed_rates: latency and CPU cost at given rates (the latency and cpu
  scenarios of run.py), also for zchat's variants (``--coalesce-ms 0``,
  ``--db``);
* scale: thousands of joined zchat clients (join storm, idle cost, leaves),
  with a py-spy profile of the idle broker at the largest size on request;
* profile: py-spy (or cProfile) on the broker during a fixed-rate trial;
* gui_burst: bench/gui_burst.py, when it exists, as a subprocess.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections import Counter
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import zmq

from common import (BENCH, PYTHON, ROOT, CpuMeter, Target, Worker, cpu_seconds, memory_bytes,
                    open_file_limit, open_files)
import messages as m

P99_LIMIT_MS = 50.0
# A trial counts as run at its rate when the sender kept this close to it.
RATE_TOLERANCE = 0.95
# After the sender is done: how long acks may take (then counted missing) ...
ACK_DRAIN_SECONDS = 3.0
# ... and how long listeners may take to receive the rest.
DELIVERY_GRACE_SECONDS = 5.0
# A process this busy (cores, over the sending time) is the bottleneck.
SATURATED_CORES = 0.9
STARTUP_TIMEOUT = 30.0


def latency_summary(samples_ns: np.ndarray) -> dict:
    if samples_ns.size == 0:
        return {"p50_ms": None, "p99_ms": None, "max_ms": None}
    p50, p99 = np.percentile(samples_ns, [50, 99]) / 1e6
    return {"p50_ms": float(p50), "p99_ms": float(p99), "max_ms": float(samples_ns.max() / 1e6)}


def split(total: int, parts: int) -> list[int]:
    """``total`` as ``parts`` near-equal positive counts."""
    parts = max(1, min(parts, total))
    return [total // parts + (i < total % parts) for i in range(parts)]


class Rig:
    """A target, a sender process and listener processes, warmed up for trials."""

    def __init__(self, kind: str, senders: int, listeners: int, listener_procs: int,
                 work_dir: Path, wrapper: list[str] | None = None, nap_ms: float = 0.0):
        self.target = Target(kind, wrapper, work_dir)
        self.nap_ms = nap_ms
        self.senders = senders
        self.listeners = listeners
        self.listener_procs = listener_procs
        self.work_dir = work_dir
        self.sender: Worker | None = None
        self.listener_workers: list[Worker] = []
        self._phases = itertools.count(1)  # phase 0 is the warm-up trickle
        self._stack = ExitStack()

    def __enter__(self) -> "Rig":
        try:
            self._start()
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def _start(self) -> None:
        self._stack.callback(self.target.stop)
        self.target.start()
        for i, sockets in enumerate(split(self.listeners, self.listener_procs)):
            worker = Worker(f"listener {i}", "listener", "--pub-port", str(self.target.pub_port),
                            "--sockets", str(sockets), "--out-dir", str(self.work_dir),
                            "--index", str(i), "--nap-ms", str(self.nap_ms))
            self._stack.callback(worker.stop)
            self.listener_workers.append(worker)
        sender_args = ["sender", "--port", str(self.target.port), "--sockets", str(self.senders)]
        if self.target.joins:
            sender_args.append("--join")
        self.sender = Worker("sender", *sender_args)
        self._stack.callback(self.sender.stop)
        self.sender.reply(STARTUP_TIMEOUT)  # started (and joined)
        # Trickle messages until every SUB has received one: from then on no
        # subscription is still on its way (the slow-joiner problem).
        self.sender.command("warm")
        for worker in self.listener_workers:
            worker.reply(STARTUP_TIMEOUT)
        self.sender.command("idle")

    def pids(self) -> dict[str, int]:
        pids = {"target": self.target.pid, "sender": self.sender.pid}
        pids.update({f"listener{i}": w.pid for i, w in enumerate(self.listener_workers)})
        return pids

    def settle(self, timeout: float = 10.0) -> None:
        """Wait until the target is idle again (a failed trial leaves a backlog)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            before = cpu_seconds(self.target.pid)
            time.sleep(0.3)
            if cpu_seconds(self.target.pid) - before < 0.03:
                return

    def trial(self, rate: float, seconds: float) -> dict:
        phase = next(self._phases)
        meter = CpuMeter(self.pids())
        meter.start(time.monotonic())
        drain = ACK_DRAIN_SECONDS if self.target.acknowledges else 0
        sent = self.sender.ask(3 * seconds + drain + STARTUP_TIMEOUT, "run", phase, rate, seconds,
                               drain)
        expected = sent["sent"] * self.listeners
        deadline = time.monotonic() + DELIVERY_GRACE_SECONDS
        while True:
            delivered = sum(w.ask(STARTUP_TIMEOUT, "count", phase)["deliveries"]
                            for w in self.listener_workers)
            if delivered >= expected or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        cpu = meter.stop(time.monotonic())
        reports = [w.ask(STARTUP_TIMEOUT, "report", phase) for w in self.listener_workers]
        samples = np.concatenate([np.fromfile(r["latency_file"], dtype=np.int64) for r in reports])
        for r in reports:
            os.unlink(r["latency_file"])
        return self._judge(rate, seconds, sent, reports, samples, cpu)

    def _judge(self, rate, seconds, sent, reports, samples, cpu) -> dict:
        deliveries = sum(r["deliveries"] for r in reports)
        frames = sum(r["frames"] for r in reports)
        send_seconds = max(sent["send_seconds"], 1e-9)
        target_cpu = cpu["target"]["cpu_s"]
        latency = latency_summary(samples)
        busy = {name: used["cpu_s"] / send_seconds for name, used in cpu.items()}
        failures = []
        if sent["blocked"]:
            failures.append(f"{sent['blocked']} sends refused by a full queue (backpressure)")
        if sent["achieved_rate"] < RATE_TOLERANCE * rate:
            failures.append(f"sender reached only {sent['achieved_rate']:.0f} msg/s")
        if sent["not_joined"]:
            failures.append(f"{sent['not_joined']} requests answered not_joined (session dropped)")
        if self.target.acknowledges and sent["acked"] < sent["sent"]:
            failures.append(f"{sent['sent'] - sent['acked']} messages not acknowledged")
        if deliveries < sent["sent"] * self.listeners or min(
                r["min_per_socket"] for r in reports) < sent["sent"]:
            failures.append(f"{sent['sent'] * self.listeners - deliveries} deliveries missing")
        if latency["p99_ms"] is None or latency["p99_ms"] >= P99_LIMIT_MS:
            failures.append(f"p99 {latency['p99_ms']} ms >= {P99_LIMIT_MS} ms")
        generator = {name: cores for name, cores in busy.items() if name != "target"}
        return {
            "target": self.target.kind, "offered_rate": rate, "seconds": seconds,
            "senders": self.senders, "listeners": self.listeners,
            "sent": sent["sent"], "acked": sent["acked"] if self.target.acknowledges else None,
            "not_joined": sent["not_joined"],
            "achieved_rate": sent["achieved_rate"],
            "deliveries": deliveries, "deliveries_per_s": deliveries / send_seconds,
            "messages_per_frame": deliveries / frames if frames else None,
            "latency": latency,
            "target_cpu_s": target_cpu, "target_cores": busy["target"],
            "target_us_per_msg": 1e6 * target_cpu / max(sent["sent"], 1),
            "target_us_per_delivery": 1e6 * target_cpu / max(deliveries, 1),
            "target_memory": memory_bytes(self.target.pid),
            "generator_cores": generator,
            "generator_saturated": max(generator.values()) >= SATURATED_CORES,
            "passed": not failures, "failures": failures,
        }


def _rig(kind: str, opts, listeners: int, work_dir: Path, wrapper=None, nap_ms=0.0) -> Rig:
    return Rig(kind, opts.senders, listeners, opts.listener_procs, work_dir, wrapper, nap_ms)


def _log(opts, text: str) -> None:
    if not opts.silent:
        print(text, flush=True, file=opts.progress)


def _trial_line(t: dict) -> str:
    verdict = "ok" if t["passed"] else "FAIL: " + "; ".join(t["failures"])
    return (f"  {t['target']:<12} {t['offered_rate']:>8.0f} msg/s x {t['listeners']:>3}: "
            f"p99 {t['latency']['p99_ms'] or float('nan'):7.2f} ms, target "
            f"{t['target_cores']:.2f} cores, {t['target_us_per_delivery']:.1f} us/delivery  "
            f"{verdict}")


# --- throughput -----------------------------------------------------------------


def throughput(kind: str, opts, work_dir: Path) -> dict:
    """Highest rate passing a trial: double until a failure, then bisect."""
    trials: list[dict] = []
    best = failed = None
    with _rig(kind, opts, opts.listeners, work_dir, nap_ms=opts.listener_nap_ms) as rig:
        def attempt(rate: float) -> dict:
            # On a shared machine one stall fails a trial: a rate fails only
            # when it fails twice running.
            for _ in range(2):
                rig.settle()
                t = rig.trial(rate, opts.trial_seconds)
                trials.append(t)
                _log(opts, _trial_line(t))
                if t["passed"]:
                    break
            return t

        rate = opts.start_rate
        while rate <= opts.max_rate:
            t = attempt(rate)
            if not t["passed"]:
                failed = t
                break
            best = t
            rate *= 2
        while best is None and rate >= 100:  # even the first rate failed
            rate /= 2
            t = attempt(rate)
            best = t if t["passed"] else None
        for _ in range(opts.refine_steps):
            if best is None or failed is None:
                break
            t = attempt(round((best["offered_rate"] + failed["offered_rate"]) / 2, -1))
            if t["passed"]:
                best = t
            else:
                failed = t
    return {"target": kind, "best": best, "first_failure": failed, "trials": trials,
            "reached_max_rate": failed is None}


# --- latency and CPU at fixed rates ---------------------------------------------


def fixed_rates(kind: str, opts, rates: list[float], work_dir: Path) -> list[dict]:
    out = []
    with _rig(kind, opts, opts.latency_listeners, work_dir) as rig:
        for rate in rates:
            rig.settle()
            t = rig.trial(rate, opts.fixed_seconds)
            _log(opts, _trial_line(t))
            out.append(t)
    return out


# --- profile --------------------------------------------------------------------


def profile(opts, work_dir: Path) -> dict:
    """Where the broker's CPU goes at the fixed load: py-spy, else cProfile."""
    py_spy = shutil.which("py-spy")
    if py_spy:
        return _profile_py_spy(py_spy, opts, work_dir)
    return _profile_cprofile(opts, work_dir)


PY_SPY_HZ = 250


class PySpy:
    """py-spy sampling one process for a while, in the background.

    ``--nonblocking`` samples without pausing the process, so it runs at
    speed; idle samples (waiting in zmq_poll) are left out, so the shares
    are of the time the process was busy.
    """

    def __init__(self, py_spy: str, pid: int, seconds: float, raw: Path):
        self.raw = raw
        self.seconds = math.ceil(seconds)
        self.proc = subprocess.Popen(
            [py_spy, "record", "--pid", str(pid), "--rate", str(PY_SPY_HZ), "--format", "raw",
             "--nonblocking", "--output", str(raw), "--duration", str(self.seconds)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def result(self, load: str) -> dict:
        """Wait for py-spy to finish; the top functions it saw."""
        try:
            self.proc.wait(self.seconds + 30)
        finally:
            self.stop()
        stacks = Counter()
        if self.raw.exists():
            for line in self.raw.read_text().splitlines():
                stack, _, count = line.rpartition(" ")
                if stack and count.isdigit():
                    stacks[stack] += int(count)
        top = _top_functions(stacks)
        # samples over all ticks: roughly the share of time the broker was busy
        busy = top["samples"] / (self.seconds * PY_SPY_HZ)
        return {"tool": "py-spy", "load": load, "busy_share": round(busy, 3), **top}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _profile_py_spy(py_spy: str, opts, work_dir: Path) -> dict:
    with _rig("zchat", opts, opts.latency_listeners, work_dir) as rig:
        spy = PySpy(py_spy, rig.target.pid, opts.fixed_seconds + 2, work_dir / "profile-load.txt")
        try:
            time.sleep(1.0)  # py-spy attaches
            t = rig.trial(opts.cpu_rate, opts.fixed_seconds)
            return spy.result(_load_label(t))
        finally:
            spy.stop()


def _frame_name(frame: str) -> str:
    """``func (file.py:12)`` -> ``func (file.py)``: one entry per function."""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rsplit(':', 1)[0].rsplit('/', 1)[-1]})" if where else name


def _top_functions(stacks: Counter, top: int = 15) -> dict:
    """Self and inclusive shares of the samples, per function."""
    total = sum(stacks.values())
    own, inclusive = Counter(), Counter()
    for stack, count in stacks.items():
        frames = [_frame_name(f) for f in stack.split(";")]
        own[frames[-1]] += count
        for name in set(frames):
            inclusive[name] += count
    share = lambda c: [(name, round(100 * n / max(total, 1), 1))
                       for name, n in c.most_common(top)]
    return {"samples": total, "self_pct": share(own), "inclusive_pct": share(inclusive)}


def _profile_cprofile(opts, work_dir: Path) -> dict:
    import pstats

    out = work_dir / "broker.prof"
    with _rig("zchat", opts, opts.latency_listeners, work_dir,
              wrapper=["-m", "cProfile", "-o", str(out)]) as rig:
        t = rig.trial(opts.cpu_rate, opts.fixed_seconds)
    stats = pstats.Stats(str(out)).stats  # written when the broker stopped
    total = sum(v[2] for v in stats.values()) or 1
    own = Counter({f"{f[2]} ({Path(f[0]).name})": v[2] for f, v in stats.items()})
    cumulative = Counter({f"{f[2]} ({Path(f[0]).name})": v[3] for f, v in stats.items()})
    share = lambda c: [(n, round(100 * s / total, 1)) for n, s in c.most_common(15)]
    return {"tool": "cProfile (slows the broker several times)", "load": _load_label(t),
            "self_pct": share(own), "inclusive_pct": share(cumulative)}


def _load_label(t: dict) -> str:
    return f"{t['offered_rate']:.0f} msg/s x {t['listeners']} listeners, {t['seconds']:.0f} s"


# --- scale ----------------------------------------------------------------------


def scale(opts, work_dir: Path) -> list[dict]:
    results = []
    for clients in opts.scale_sizes:
        profiled = opts.profile_idle and clients == max(opts.scale_sizes)
        result = _scale_one(clients, opts, work_dir if profiled else None)
        _log(opts, f"  {clients} clients: " + json.dumps(
            {k: result[k] for k in ("join_storm_s", "idle_broker_cores", "rss_per_client_kb",
                                    "leave_max_s")}))
        results.append(result)
    return results


def _scale_one(clients: int, opts, profile_dir: Path | None = None) -> dict:
    """One size; with ``profile_dir``, py-spy also samples the idle broker
    (after the idle window is measured, so its cost is not in the figures)."""
    victims = max(1, round(clients * opts.kill_fraction))
    groups = split(clients - victims, math.ceil((clients - victims) / opts.clients_per_proc))
    groups.append(victims)  # the last process is the one killed
    # every client is a connection: above the default --max-users (5,000) the
    # broker is told to take them all
    target = Target("zchat", extra=["--max-users", str(max(clients, 5000))])
    workers: list[Worker] = []
    try:
        target.start()
        time.sleep(0.5)
        base_memory, base_fds = memory_bytes(target.pid), open_files(target.pid)
        for i, count in enumerate(groups):
            workers.append(Worker(f"clients {i}", "clients", "--port", str(target.port),
                                  "--pub-port", str(target.pub_port), "--count", str(count),
                                  "--prefix", f"c{i}",
                                  # each pings as often as PROTOCOL.md asks (default values)
                                  "--interval", str(m.ping_period(1.0, 3))))
        for w in workers:
            w.reply(STARTUP_TIMEOUT)
        storm = _join_storm(workers, target, clients, opts.storm_timeout)
        time.sleep(opts.settle_seconds)  # let the join broadcasts drain
        meter = CpuMeter({"broker": target.pid, **{f"clients{i}": w.pid
                                                   for i, w in enumerate(workers)}})
        meter.start(time.monotonic())
        time.sleep(opts.idle_seconds)
        idle = meter.stop(time.monotonic())
        memory, fds = memory_bytes(target.pid), open_files(target.pid)
        profile = _profile_idle(target.pid, clients, opts.idle_seconds, profile_dir)
        rejoins = _rejoins(workers)
        leaves = _leave_after_kill(target, workers[-1], f"c{len(groups) - 1}", victims,
                                   storm["joined"])
        joined = storm["joined"]
        fds_per_client = (fds - base_fds) / max(joined, 1)
        limit = open_file_limit(target.pid)
        return {
            "clients": clients, "joined": joined, "processes": len(groups), **storm,
            "idle_broker_cores": idle["broker"]["cores"],
            "idle_generator_cores": sum(v["cores"] for k, v in idle.items() if k != "broker"),
            "broker_rss_mb": memory["rss"] / 2**20, "broker_peak_rss_mb": memory["peak_rss"] / 2**20,
            "rss_per_client_kb": (memory["rss"] - base_memory["rss"]) / max(joined, 1) / 1024,
            "broker_open_files": fds, "open_file_limit": limit,
            "fds_per_client": fds_per_client,
            "max_clients_by_open_files": int((limit - base_fds) / fds_per_client)
            if fds_per_client else None,
            "rejoins": rejoins, "killed": victims, **leaves,
            **({"idle_profile": profile} if profile else {}),
        }
    finally:
        for w in workers:
            w.stop()
        target.stop()


def _profile_idle(pid: int, clients: int, seconds: float, work_dir: Path | None) -> dict | None:
    py_spy = shutil.which("py-spy")
    if work_dir is None or py_spy is None:
        return None
    spy = PySpy(py_spy, pid, seconds, work_dir / f"profile-idle-{clients}.txt")
    return spy.result(f"{clients} idle clients pinging every {m.ping_period(1.0, 3):g} s, "
                      f"{spy.seconds} s")


def _join_storm(workers: list[Worker], target: Target, clients: int, timeout: float) -> dict:
    meter = CpuMeter({"broker": target.pid, **{f"clients{i}": w.pid
                                               for i, w in enumerate(workers)}})
    meter.start(time.monotonic())
    for w in workers:
        w.command("go")
    deadline = time.monotonic() + timeout
    while True:
        statuses = [w.ask(STARTUP_TIMEOUT, "status") for w in workers]
        joined = sum(s["joined"] for s in statuses)
        if joined >= clients or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    cpu = meter.stop(time.monotonic())
    go = min(s["go_ns"] for s in statuses)
    last = max((s["last_welcome_ns"] or 0) for s in statuses)
    refusals = Counter()
    for s in statuses:
        refusals.update(s["refusals"])
    return {"joined": joined, "join_storm_s": (last - go) / 1e9 if joined else None,
            "join_storm_broker_cpu_s": cpu["broker"]["cpu_s"],
            "join_storm_generator_cores": sum(v["cores"] for k, v in cpu.items() if k != "broker"),
            "refusals": dict(refusals)}


def _rejoins(workers: list[Worker]) -> int:
    """Clients that joined again after not_joined (the broker dropped them)."""
    return sum(w.ask(STARTUP_TIMEOUT, "status")["rejoins"] for w in workers)


def _leave_after_kill(target: Target, victim: Worker, prefix: str, count: int,
                      joined: int) -> dict:
    """Kill a client process; time until the broker announces each leave: by
    name in a presence event, or, in a room too big to announce them, as the
    member count it publishes drops below the ``joined`` before."""
    ctx = zmq.Context.instance()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    ready_topic = m.READY_TOPIC_PREFIX + secrets.token_hex(8).encode()
    sub.setsockopt(zmq.SUBSCRIBE, m.BROADCAST_TOPIC)
    sub.setsockopt(zmq.SUBSCRIBE, ready_topic)
    sub.connect(f"tcp://127.0.0.1:{target.pub_port}")
    expiry = 3.0  # the broker's default heartbeat interval x liveness
    try:
        while sub.poll(STARTUP_TIMEOUT * 1000):  # the probe proves the subscription live
            if sub.recv_multipart()[0] == ready_topic:
                break
        names = {f"{prefix}-{i}" for i in range(count)}
        killed = time.monotonic()
        victim.kill()
        after: list[float] = []
        reasons = Counter()
        deadline = killed + expiry + 5.0
        while names and (left := deadline - time.monotonic()) > 0:
            if not sub.poll(left * 1000):
                break
            now = time.monotonic()
            for event in m.decode_broadcast(sub.recv_multipart()):
                if isinstance(event, m.Presence):
                    for name, reason in event.left:
                        if name in names:
                            names.discard(name)
                            after.append(now - killed)
                            reasons[reason] += 1
                elif isinstance(event, m.Members):
                    for _ in range(min(len(names), joined - event.count - len(after))):
                        names.pop()
                        after.append(now - killed)
                        reasons["counted"] += 1
    finally:
        sub.close()
    return {"leaves_seen": len(after), "leaves_missing": len(names),
            "leave_first_s": min(after, default=None),
            "leave_p50_s": float(np.median(after)) if after else None,
            "leave_max_s": max(after, default=None), "leave_bound_s": expiry,
            "leaves_after_bound": sum(a > expiry for a in after),
            "leave_reasons": dict(reasons)}


# --- the window (someone else's script) -----------------------------------------


def gui_burst(timeout: float) -> dict:
    """Run bench/gui_burst.py if it exists; it prints one JSON object last
    (on one line, or indented: then its stdout is that object alone)."""
    script = BENCH / "gui_burst.py"
    if not script.exists():
        return {"skipped": "bench/gui_burst.py does not exist yet"}
    proc = subprocess.Popen([PYTHON, str(script)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # it may have started a broker of its own
        proc.communicate()
        return {"skipped": f"bench/gui_burst.py did not finish within {timeout:.0f}s"}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    for text in (stdout, *reversed(stdout.strip().splitlines())):
        try:
            return {"returncode": proc.returncode, **json.loads(text)}
        except (json.JSONDecodeError, TypeError):
            continue
    return {"skipped": f"bench/gui_burst.py printed no JSON (exit {proc.returncode})",
            "stderr_tail": stderr[-500:]}


def new_work_dir() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="zchat-bench-")
