"""zchat against Redis pub/sub and libzmq's C forwarder, under one independent generator.

    python bench/rawbench.py            # everything, ~12 minutes on 2 cores
    python bench/rawbench.py --quick    # smoke run, ~5 minutes
    python bench/rawbench.py --scenario fixed --servers zchat,redis

Every server is driven by bench/rawgen.py, which speaks each one's own
protocol over plain TCP sockets (written from RFC 23 and PROTOCOL.md, not
from the project's clients), the same workload for all, in one run:

* fixed: CPU per delivery and p50/p99 latency at 100 and 1,000 msg/s x 50
  listeners;
* saturation: the highest rate with 20 listeners at which every message is
  delivered (and acknowledged) with p99 < 50 ms, stepping the rate up, and the
  server's user CPU per delivery at the first rate that failed;
* joins: 1,000 / 5,000 / 9,000 clients joining one room all at once and one
  after another, wall time and server CPU, then the idle CPU with all joined.

Servers: ``zchat`` (broker.py, its rate limit and per-address limit lifted),
``redis`` (Debian's redis-server on a free loopback port, no persistence),
``c-forwarder`` (bench/baselines.py: zmq_proxy from a ROUTER to a PUB).
The generator's CPU is measured apart from the server's (from /proc).
Writes every figure to ``--json`` (default bench/rawbench.json; bench/plot.py
draws it) and prints the tables, with zchat's ratios to the two baselines.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import common
from common import (BENCH, Target, Worker, cpu_times, fmt, machine, open_files, stop_process,
                    table)
from tests.procs import free_port_pair

SERVERS = ("zchat", "redis", "c-forwarder")
SCENARIOS = ("fixed", "saturation", "joins")
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
GEN_KIND = {"zchat": "zchat", "redis": "redis", "c-forwarder": "forwarder"}
P99_LIMIT_MS = 50.0
RATE_TOLERANCE = 0.95  # the sender must reach this share of the offered rate
START_SECONDS = 0.3  # between a command and the moment it starts: all processes told
READY_TIMEOUT = 30.0
DELIVERY_GRACE = 5.0  # after the last send, how long deliveries may take
ACK_DRAIN = 3.0
# zchat: two sockets per client; rawgen processes stay far below 20,000 files.
CLIENTS_PER_PROC = 2000
# The broker's --max-users must admit the largest join step and the senders.
ZCHAT_MAX_USERS = 10_000


def ns() -> int:
    return time.monotonic_ns()


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class RedisServer:
    """redis-server on a free loopback port with its own empty dir, nothing saved."""

    kind = "redis"

    def __init__(self):
        self.port = free_port_pair()
        self.pub_port = 0
        self.dir = tempfile.mkdtemp(prefix="rawbench-redis-")
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def start(self) -> "RedisServer":
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.dir, "--maxclients", str(ZCHAT_MAX_USERS + 100),
             "--daemonize", "no", "--loglevel", "warning"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited: {self.proc.stdout.read()!r}")
            try:
                with __import__("socket").create_connection(("127.0.0.1", self.port), 1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.05)
        raise TimeoutError("redis-server did not answer PING")

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)


def new_server(kind: str):
    if kind == "redis":
        return RedisServer()
    extra = ("--max-users", str(ZCHAT_MAX_USERS)) if kind == "zchat" else ()
    return Target(kind, extra_args=extra)


def start_server(stack: ExitStack, kind: str, attempts: int = 3):
    """A started server. A free port may be taken before the server binds it (by
    another process's outgoing connection): then try other ports."""
    for attempt in range(attempts):
        server = new_server(kind)
        try:
            server.start()
        except (AssertionError, RuntimeError, TimeoutError):
            server.stop()
            if attempt == attempts - 1:
                raise
            continue
        stack.callback(server.stop)
        return server


class Cpu:
    """User and system CPU of named processes over a window."""

    def __init__(self, pids: dict[str, int]):
        self.pids = pids
        self.t0 = time.monotonic()
        self.start = {k: cpu_times(p) for k, p in pids.items()}

    def stop(self) -> dict:
        wall = max(time.monotonic() - self.t0, 1e-9)
        out = {"wall_s": wall}
        for k, p in self.pids.items():
            u, s = cpu_times(p)
            u0, s0 = self.start[k]
            out[k] = {"user_s": u - u0, "sys_s": s - s0, "cores": (u - u0 + s - s0) / wall}
        return out


def generator_cores(cpu: dict) -> dict:
    return {k: round(v["cores"], 3) for k, v in cpu.items() if k not in ("server", "wall_s")}


class Gen:
    """rawgen.py processes for one server: a role, a number of clients, over processes."""

    def __init__(self, stack: ExitStack, server, role: str, clients: int, procs: int, tag: str):
        self.workers = []
        for i, n in enumerate(split(clients, procs)):
            w = Worker(f"{tag}{i}", "--kind", GEN_KIND[server.kind], "--role", role,
                       "--port", str(server.port), "--pub-port", str(server.pub_port),
                       "--clients", str(n), "--tag", f"{tag}{i}", script="rawgen.py")
            stack.callback(w.stop)
            self.workers.append(w)
        for w in self.workers:
            w.reply(READY_TIMEOUT)

    def tell(self, worker: Worker, **cmd) -> None:
        worker.command(json.dumps(cmd))

    def all(self, timeout: float, **cmd) -> list[dict]:
        for w in self.workers:
            self.tell(w, **cmd)
        return [w.reply(timeout) for w in self.workers]

    def pids(self) -> dict[str, int]:
        return {w.name: w.pid for w in self.workers}


def split(total: int, parts: int) -> list[int]:
    parts = max(1, min(parts, total))
    return [total // parts + (i < total % parts) for i in range(parts)]


def percentile(sorted_values: list, q: float):
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


# --- message trials ---------------------------------------------------------------


class Rig:
    """A server, one sender process (M publishers), listener processes (N listeners)."""

    def __init__(self, kind: str, listeners: int, opts):
        self.kind, self.listeners, self.opts = kind, listeners, opts
        self.trials = 0

    def __enter__(self) -> "Rig":
        self.stack = ExitStack()
        try:
            self.server = start_server(self.stack, self.kind)
            self.listen = Gen(self.stack, self.server, "listen", self.listeners,
                              self.opts.listener_procs, "l")
            self.send = Gen(self.stack, self.server, "send", self.opts.senders, 1, "s")
            deadline = ns() + int(READY_TIMEOUT * 1e9)
            for gen in (self.listen, self.send):
                replies = gen.all(READY_TIMEOUT + 5, cmd="join", mode="storm",
                                  start_ns=ns() + int(START_SECONDS * 1e9), deadline_ns=deadline)
                if sum(r["joined"] for r in replies) < sum(r["clients"] for r in replies):
                    raise RuntimeError(f"{self.kind}: not every client joined: {replies}")
            # Until every listener has a message, a subscription may still be on its
            # way (the forwarder confirms none): trial 0 is that warm-up.
            warm = self.trial(100, 100, expect_each=1, judge=False)
            if min(warm["min_count"], 1) < 1:
                raise RuntimeError(f"{self.kind}: warm-up did not reach every listener")
        except BaseException:
            self.stack.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stack.close()

    def settle(self, timeout: float = 10.0) -> None:
        """Wait until the server is idle again (a failed trial leaves a backlog)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            before = sum(cpu_times(self.server.pid))
            time.sleep(0.3)
            if sum(cpu_times(self.server.pid)) - before < 0.03:
                return

    def trial(self, rate: float, count: int, expect_each: int | None = None,
              judge: bool = True) -> dict:
        trial = self.trials
        self.trials += 1
        seconds = count / rate
        t0 = ns() + int(START_SECONDS * 1e9)
        deadline = t0 + int((seconds + DELIVERY_GRACE) * 1e9)
        for w in self.listen.workers:
            self.listen.tell(w, cmd="listen", trial=trial, expect=expect_each or count,
                             deadline_ns=deadline)
        self.send.tell(self.send.workers[0], cmd="send", trial=trial, rate=rate, count=count,
                       start_ns=t0, drain_s=ACK_DRAIN)
        time.sleep(max(0.0, (t0 - ns()) / 1e9))
        cpu = Cpu({"server": self.server.pid, **self.send.pids(), **self.listen.pids()})
        budget = 3 * seconds + DELIVERY_GRACE + ACK_DRAIN + READY_TIMEOUT
        sent = self.send.workers[0].reply(budget)
        heard = [w.reply(budget) for w in self.listen.workers]
        used = cpu.stop()
        counts = [c for h in heard for c in h["counts"]]
        lat = sorted(x for h in heard for x in h["latency_ns"])
        result = {"server": self.kind, "offered_rate": rate, "count": count,
                  "listeners": self.listeners, "senders": self.opts.senders,
                  "sent": sent["sent"], "acks": sent["acks"], "errors": sent["errors"],
                  "error_codes": sent["error_codes"], "send_seconds": sent["send_seconds"],
                  "achieved_rate": sent["sent"] / max(sent["send_seconds"], 1e-9)
                  if sent["sent"] > 1 else None,
                  "send_lag_p99_ms": sent["lag_p99_ms"], "deliveries": sum(counts),
                  "min_count": min(counts),
                  "latency": {"p50_ms": _ms(percentile(lat, 0.50)),
                              "p99_ms": _ms(percentile(lat, 0.99)),
                              "max_ms": _ms(max((h["latency_max_ns"] or 0) for h in heard))},
                  "window_s": used["wall_s"]}
        server = used["server"]
        deliveries = max(result["deliveries"], 1)
        result.update({
            "server_user_s": server["user_s"], "server_sys_s": server["sys_s"],
            "server_cores": server["cores"],
            "server_us_per_delivery": 1e6 * (server["user_s"] + server["sys_s"]) / deliveries,
            "server_user_us_per_delivery": 1e6 * server["user_s"] / deliveries,
            "server_us_per_msg": 1e6 * (server["user_s"] + server["sys_s"]) / max(sent["sent"], 1),
            "generator_cores": generator_cores(used),
        })
        result["generator_saturated"] = max(result["generator_cores"].values()) >= 0.9
        if judge:
            result["failures"] = self._failures(result)
            result["passed"] = not result["failures"]
        return result

    def _failures(self, r: dict) -> list[str]:
        out = []
        if r["sent"] < r["count"]:
            out.append(f"sent {r['sent']} of {r['count']}")
        achieved = r["achieved_rate"]
        if achieved is not None and achieved < RATE_TOLERANCE * r["offered_rate"]:
            out.append(f"sender reached {achieved:.0f} msg/s")
        if r["acks"] is not None and r["acks"] < r["sent"]:
            out.append(f"{r['sent'] - r['acks']} not acknowledged")
        if r["errors"]:
            out.append(f"{r['errors']} errors {r['error_codes']}")
        if r["min_count"] < r["sent"]:
            out.append(f"{r['sent'] * self.listeners - r['deliveries']} deliveries missing")
        if r["latency"]["p99_ms"] is None or r["latency"]["p99_ms"] >= P99_LIMIT_MS:
            out.append(f"p99 {fmt(r['latency']['p99_ms'], '.1f')} ms")
        return out


def _ms(value_ns):
    return None if value_ns is None else value_ns / 1e6


def trial_line(t: dict) -> str:
    lat = t["latency"]
    verdict = "ok" if t.get("passed", True) else "FAIL " + "; ".join(t["failures"])
    return (f"  {t['server']:>11} {t['offered_rate']:>7.0f} msg/s x {t['listeners']}: "
            f"p50 {fmt(lat['p50_ms'], '.2f')} p99 {fmt(lat['p99_ms'], '.2f')} ms, "
            f"{t['server_us_per_delivery']:.2f} us/delivery "
            f"(user {t['server_user_us_per_delivery']:.2f}), server {t['server_cores']:.2f} cores, "
            f"generator {t['generator_cores']} {verdict}")


def fixed(kind: str, opts) -> list[dict]:
    out = []
    with Rig(kind, opts.fixed_listeners, opts) as rig:
        for rate in opts.fixed_rates:
            rig.settle()
            t = rig.trial(rate, max(1, round(rate * opts.fixed_seconds)))
            say(trial_line(t))
            out.append(t)
    return out


def saturation(kind: str, opts) -> dict:
    """Step the rate up; a rate fails when it fails twice running (the machine may
    be shared), and the search stops after two failed rates in a row; then bisect
    once between the highest pass and the failure above it."""
    trials, best, failed = [], None, None
    with Rig(kind, opts.saturation_listeners, opts) as rig:
        def attempt(rate: float) -> dict:
            for _ in range(2):
                rig.settle()
                t = rig.trial(rate, max(1, round(rate * opts.step_seconds)))
                say(trial_line(t))
                trials.append(t)
                if t["passed"]:
                    break
            return t

        failed_in_a_row = 0
        for rate in opts.saturation_rates:
            t = attempt(rate)
            if t["passed"]:
                best, failed, failed_in_a_row = t, None, 0
            else:
                failed = failed or t
                failed_in_a_row += 1
                if failed_in_a_row == 2:
                    break
        if best is not None and failed is not None:
            mid = round((best["offered_rate"] + failed["offered_rate"]) / 2, -2)
            if best["offered_rate"] < mid < failed["offered_rate"]:
                t = attempt(mid)
                if t["passed"]:
                    best = t
                else:
                    failed = t
    top = max(trials, key=lambda t: t["offered_rate"])
    return {"server": kind, "listeners": opts.saturation_listeners, "trials": trials,
            "best_rate": best and best["offered_rate"],
            "best": best, "first_failure": failed,
            # At saturation: the highest rate tried (where it failed, unless every
            # rate passed).
            "saturation_rate": top["offered_rate"],
            "saturation_server_cores": top["server_cores"],
            "saturation_user_us_per_delivery": top["server_user_us_per_delivery"],
            "saturation_us_per_delivery": top["server_us_per_delivery"]}


# --- joins ------------------------------------------------------------------------


def join_step(kind: str, clients: int, mode: str, opts) -> dict:
    """``clients`` join one room at once ("storm") or one after another ("seq"), on a
    fresh server; then the server idles with all of them joined."""
    with ExitStack() as stack:
        server = start_server(stack, kind)
        procs = math.ceil(clients / CLIENTS_PER_PROC)
        gen = Gen(stack, server, "listen", clients, procs, "j")
        pids = {"server": server.pid, **gen.pids()}
        start = ns() + int(START_SECONDS * 1e9)
        deadline = start + int(opts.join_timeout * 1e9)
        cpu = Cpu(pids)
        replies = []
        if mode == "storm":
            replies = gen.all(opts.join_timeout + READY_TIMEOUT, cmd="join", mode="storm",
                              start_ns=start, deadline_ns=deadline)
        else:  # each process after the previous one: one client after another overall
            for w in gen.workers:
                gen.tell(w, cmd="join", mode="seq", start_ns=max(ns(), start),
                         deadline_ns=deadline)
                replies.append(w.reply(opts.join_timeout + READY_TIMEOUT))
        used = cpu.stop()
        joined = sum(r["joined"] for r in replies)
        ends = [r["start_ns"] / 1e9 + r["done_s"][-1] for r in replies if r["done_s"]]
        wall = (max(ends) - start / 1e9) if ends else None
        done_all = sorted(r["start_ns"] / 1e9 + d - start / 1e9 for r in replies
                          for d in r["done_s"])
        first_k = min(1000, len(done_all))
        step = {"server": kind, "mode": mode, "clients": clients, "joined": joined,
                "complete": joined == clients, "timeout_s": opts.join_timeout,
                "wall_s": wall if joined == clients else used["wall_s"],
                "joins_per_s": joined / wall if wall else None,
                "first_1000_per_s": first_k / done_all[first_k - 1] if first_k else None,
                "server_cpu_s": used["server"]["user_s"] + used["server"]["sys_s"],
                "server_user_s": used["server"]["user_s"],
                "generator_cores": generator_cores(used),
                "generator_cpu_s": sum(v["user_s"] + v["sys_s"] for k, v in used.items()
                                       if k not in ("server", "wall_s")),
                "failures": _merge(r["failures"] for r in replies),
                "errors": _merge(r["errors"] for r in replies)}
        time.sleep(opts.idle_settle)
        idle = Cpu(pids)
        time.sleep(opts.idle_seconds)
        used = idle.stop()
        step.update({"idle_server_cores": used["server"]["cores"],
                     "idle_generator_cores": generator_cores(used),
                     "server_open_files": open_files(server.pid)})
        say(f"  {kind:>11} {mode:>5} {clients:>5}: joined {joined} in "
            f"{fmt(step['wall_s'], '.2f')} s, server CPU {step['server_cpu_s']:.2f} s, idle "
            f"{100 * step['idle_server_cores']:.1f}% of a core, generator "
            f"{step['generator_cpu_s']:.1f} s CPU {step['failures'] or ''}{step['errors'] or ''}")
        return step


def _merge(dicts) -> dict:
    out: dict = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return out


def joins(kind: str, opts) -> list[dict]:
    return [join_step(kind, n, mode, opts) for n in opts.join_sizes
            for mode in ("storm", "seq")]


# --- ratios, tables -----------------------------------------------------------------


def _ratio(a, b):
    return a / b if a is not None and b else None


def ratios(results: dict) -> dict:
    """zchat's figures over each baseline's, all from this run."""
    out = {}
    fixed_r = results.get("raw_fixed", {})
    sat = results.get("raw_saturation", {})
    jn = results.get("raw_joins", {})
    for base in ("redis", "c-forwarder"):
        r = {}
        for zt in fixed_r.get("zchat", []):
            bt = next((t for t in fixed_r.get(base, []) if t["offered_rate"] == zt["offered_rate"]),
                      None)
            if bt:
                rate = f"{zt['offered_rate']:.0f}"
                r[f"us_per_delivery_at_{rate}"] = _ratio(zt["server_us_per_delivery"],
                                                         bt["server_us_per_delivery"])
                r[f"p50_at_{rate}"] = _ratio(zt["latency"]["p50_ms"], bt["latency"]["p50_ms"])
                r[f"p50_diff_ms_at_{rate}"] = (zt["latency"]["p50_ms"] - bt["latency"]["p50_ms"]
                                               if zt["latency"]["p50_ms"] is not None
                                               and bt["latency"]["p50_ms"] is not None else None)
                r[f"p99_at_{rate}"] = _ratio(zt["latency"]["p99_ms"], bt["latency"]["p99_ms"])
        if "zchat" in sat and base in sat:
            r["best_rate"] = _ratio(sat["zchat"]["best_rate"], sat[base]["best_rate"])
            r["user_us_per_delivery_at_saturation"] = _ratio(
                sat["zchat"]["saturation_user_us_per_delivery"],
                sat[base]["saturation_user_us_per_delivery"])
        for zs in jn.get("zchat", []):
            bs = next((s for s in jn.get(base, []) if s["clients"] == zs["clients"]
                       and s["mode"] == zs["mode"]), None)
            if bs:
                # Per client joined: a step cut at the timeout still compares.
                key = f"{zs['mode']}_{zs['clients']}"
                r[f"join_wall_per_client_{key}"] = _ratio(_per_join(zs, "wall_s"),
                                                          _per_join(bs, "wall_s"))
                r[f"join_cpu_per_client_{key}"] = _ratio(_per_join(zs, "server_cpu_s"),
                                                         _per_join(bs, "server_cpu_s"))
                r[f"idle_cpu_{key}"] = _ratio(zs["idle_server_cores"], bs["idle_server_cores"])
        out[f"zchat/{base}"] = r
    return out


def _per_join(step: dict, key: str):
    return step[key] / step["joined"] if step["joined"] and step[key] is not None else None


def report(results: dict) -> str:
    parts = []
    if results.get("raw_fixed"):
        rows = [[t["server"], f"{t['offered_rate']:.0f}", str(t["listeners"]),
                 fmt(t["server_us_per_delivery"], ".2f"),
                 fmt(t["server_user_us_per_delivery"], ".2f"),
                 fmt(t["latency"]["p50_ms"], ".2f"), fmt(t["latency"]["p99_ms"], ".2f"),
                 fmt(t["server_cores"], ".2f"),
                 ", ".join(f"{v:.2f}" for v in t["generator_cores"].values()),
                 "ok" if t["passed"] else "FAIL: " + "; ".join(t["failures"])]
                for trials in results["raw_fixed"].values() for t in trials]
        parts.append("### Fixed rates (independent generator)\n\n" + table(
            ["server", "msg/s", "listeners", "CPU us/delivery", "user us/delivery", "p50 ms",
             "p99 ms", "server cores", "generator cores", "check"], rows))
    if results.get("raw_saturation"):
        rows = [[s["server"], fmt(s["best_rate"], ".0f"),
                 fmt(s["best"] and s["best"]["latency"]["p99_ms"], ".1f"),
                 fmt(s["saturation_rate"], ".0f"), fmt(s["saturation_server_cores"], ".2f"),
                 fmt(s["saturation_user_us_per_delivery"], ".2f"),
                 fmt(s["saturation_us_per_delivery"], ".2f"),
                 "; ".join(s["first_failure"]["failures"]) if s["first_failure"] else "none",
                 ", ".join(f"{v:.2f}" for v in (s["first_failure"] or s["trials"][-1])
                           ["generator_cores"].values())]
                for s in results["raw_saturation"].values()]
        listeners = next(iter(results["raw_saturation"].values()))["listeners"]
        title = f"Highest rate x {listeners} listeners with p99 < {P99_LIMIT_MS:.0f} ms"
        parts.append(f"### {title}\n\n" + table(
                         ["server", "highest passing msg/s", "p99 ms there",
                          "saturation: msg/s", "server cores", "user us/delivery",
                          "CPU us/delivery",
                          "what failed next", "generator cores then"], rows))
    if results.get("raw_joins"):
        rows = [[s["server"], s["mode"], str(s["clients"]), f"{s['joined']}",
                 fmt(s["wall_s"], ".2f") + ("" if s["complete"] else " (timeout)"),
                 fmt(s["first_1000_per_s"], ".0f"), fmt(s["server_cpu_s"], ".2f"),
                 fmt(s["generator_cpu_s"], ".1f"), fmt(100 * s["idle_server_cores"], ".1f"),
                 ", ".join(f"{v:.2f}" for v in s["idle_generator_cores"].values()),
                 ", ".join(f"{k} {v}" for k, v in {**s["failures"], **s["errors"]}.items())
                 or "none"]
                for steps in results["raw_joins"].values() for s in steps]
        parts.append("### Joining one room (storm: all at once; seq: one after another)\n\n"
                     + table(["server", "mode", "clients", "joined", "wall s",
                              "first 1,000 joins/s", "server CPU s", "generator CPU s",
                              "idle server % core", "idle generator cores",
                              "errors seen by the clients"], rows))
    if results.get("raw_ratios"):
        keys = sorted({k for r in results["raw_ratios"].values() for k in r})
        rows = [[k, *(fmt(r.get(k), ".2f") for r in results["raw_ratios"].values())]
                for k in keys]
        parts.append("### zchat as a ratio to each baseline (same run)\n\n"
                     + table(["figure", *results["raw_ratios"].keys()], rows))
    m = results["machine"]
    parts.append(f"Machine: {m['cpu']}, {m['cores']} cores, load average at start "
                 f"{', '.join(f'{x:.1f}' for x in m['load_average_at_start'])}, at end "
                 f"{', '.join(f'{x:.1f}' for x in m.get('load_average_at_end', []))}; "
                 f"{results['started']} to {results['finished']}.")
    return "\n\n".join(parts)


# --- main ---------------------------------------------------------------------------


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenario", action="append", choices=SCENARIOS,
                   help="run only this scenario (repeatable; default all)")
    p.add_argument("--servers", default=",".join(SERVERS),
                   help=f"comma-separated (default {','.join(SERVERS)})")
    p.add_argument("--quick", action="store_true", help="shorter trials, smaller join steps")
    p.add_argument("--json", type=Path, default=BENCH / "rawbench.json")
    p.add_argument("--senders", type=int, default=4, help="publishing connections (default 4)")
    p.add_argument("--listener-procs", type=int, default=2,
                   help="processes the listeners are spread over (default 2)")
    p.add_argument("--fixed-listeners", type=int, default=50)
    p.add_argument("--fixed-rates", default="100,1000")
    p.add_argument("--fixed-seconds", type=float, help="each fixed-rate trial (default 8)")
    p.add_argument("--saturation-listeners", type=int, default=20)
    p.add_argument("--saturation-rates",
                   default="1000,2000,4000,8000,12000,16000,24000,32000,48000,64000",
                   help="rates tried in order until one fails")
    p.add_argument("--step-seconds", type=float, help="each saturation step (default 3)")
    p.add_argument("--join-sizes", help="clients per join step (default 1000,5000,9000)")
    p.add_argument("--join-timeout", type=float,
                   help="longest a join step may take before it is cut (default 40 s)")
    p.add_argument("--idle-seconds", type=float, help="idle window measured (default 4)")
    p.add_argument("--report", type=Path, metavar="JSON",
                   help="run nothing: print the tables and ratios of an earlier run's JSON")
    args = p.parse_args(argv)
    q = args.quick
    for name, full, quick in (("fixed_seconds", 8, 3), ("step_seconds", 3, 2),
                              ("join_sizes", "1000,5000,9000", "500,2000"),
                              ("join_timeout", 40, 15), ("idle_seconds", 4, 2)):
        if getattr(args, name) is None:
            setattr(args, name, quick if q else full)
    args.idle_settle = 1.0
    args.scenarios = args.scenario or list(SCENARIOS)
    args.servers = [s for s in args.servers.split(",") if s]
    for s in args.servers:
        if s not in SERVERS:
            p.error(f"unknown server {s!r}")
    args.fixed_rates = [float(r) for r in args.fixed_rates.split(",")]
    args.saturation_rates = [float(r) for r in args.saturation_rates.split(",")]
    args.join_sizes = [int(n) for n in str(args.join_sizes).split(",")]
    return args


def run(args) -> dict:
    results = {"machine": machine(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
               "generator": "bench/rawgen.py (independent: ZMTP 3.0, RESP, PROTOCOL.md)",
               "options": {k: v for k, v in vars(args).items() if k not in ("json", "scenario")},
               "open_file_limit": common.raise_open_file_limit(),
               "redis_version": subprocess.run([REDIS_SERVER, "--version"], capture_output=True,
                                               text=True).stdout.strip()}
    if "fixed" in args.scenarios:
        say(f"fixed rates {args.fixed_rates} x {args.fixed_listeners} listeners")
        results["raw_fixed"] = {k: fixed(k, args) for k in args.servers}
    if "saturation" in args.scenarios:
        say(f"saturation: {args.saturation_listeners} listeners, rates {args.saturation_rates}")
        results["raw_saturation"] = {k: saturation(k, args) for k in args.servers}
    if "joins" in args.scenarios:
        say(f"joins: {args.join_sizes} clients, at once and one after another")
        results["raw_joins"] = {k: joins(k, args) for k in args.servers}
    results["machine"]["load_average_at_end"] = os.getloadavg()
    results["raw_ratios"] = ratios(results)
    results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    return results



def main(argv=None) -> int:
    args = parse_args(argv)
    common.unwind_on_signals(signal.SIGINT)  # SIGINT too: ignored when started in the background
    if args.report:
        results = json.loads(args.report.read_text())
        results["raw_ratios"] = ratios(results)
        print(report(results))
        return 0
    started = time.monotonic()
    try:
        results = run(args)
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    results["run_seconds"] = time.monotonic() - started
    args.json.write_text(json.dumps(results, indent=1))
    print(report(results))
    say(f"raw figures: {args.json} ({results['run_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
