"""Scaling out: one broker without a backplane, then 1, 2 and 3 brokers on one Redis.

    python bench/backplane_scaling.py [--brokers 1,2,3] [--rate 1000] [--seconds 10]
                                      [--listeners 60] [--senders 4] [--spread]

The same load generator as bench/run.py (loadgen.py), on loopback: one
sender process (M joined DEALERs, open loop at a fixed rate) on the first
broker, and the listeners' SUB sockets spread evenly over the brokers, one
listener process per broker. Each configuration gets a fresh redis-server
(append-only, ``appendfsync everysec``) on a free port and its own
directory. With ``--spread``, N brokers carry N rooms: the sender is in all
of them and sends to each in turn, and the listeners of broker i subscribe
to room i alone (a broker then follows the streams its own clients
follow: its listeners' room, and on the first broker the sender's).
Reported per configuration: messages acknowledged, deliveries,
latency p50/p99, the CPU of every broker and of Redis, and CPU per delivery
(brokers and Redis together), with the ratio to one broker without the
backplane. Figures go to stdout and to bench/backplane_results.json.

On a machine with fewer cores than brokers + Redis + generator, the brokers
share cores and the figures show cost, not speed-up.
"""

from __future__ import annotations

import argparse
import signal
import json
import os
import statistics
import subprocess
import sys
import time
from array import array
from contextlib import ExitStack
from pathlib import Path

import common  # puts the product's modules (and tests/) on sys.path
from common import (BENCH, PYTHON, ROOT, CpuMeter, Worker, free_port_pair,
                    zchat_broker_args)

sys.path.insert(0, str(ROOT / "tests"))
from procs import LineReader  # noqa: E402
from redis_proc import RedisServer  # noqa: E402

STARTUP_TIMEOUT = 30.0
# Ports tried before giving up on starting a broker.
BIND_ATTEMPTS = 5
ACK_DRAIN_SECONDS = 5.0
DELIVERY_GRACE_SECONDS = 10.0
RESULTS = BENCH / "backplane_results.json"


def start_broker(stack: ExitStack, redis_url: str | None, *extra: str) -> dict:
    """A broker on free ports (``extra``: more broker.py options), stopped
    by its pid when ``stack`` closes. A port found free can be taken by
    someone else's connection before the broker binds it (the free ports
    are in the ephemeral range): then it tries other ports, a few times."""
    for attempt in range(BIND_ATTEMPTS):
        port = free_port_pair()
        args = [PYTHON, "broker.py", "--port", str(port), "--pub-port", str(port + 1),
                "--log-level", "WARNING", *zchat_broker_args(), *extra]
        if redis_url:
            args += ["--backplane", redis_url]
        proc = subprocess.Popen(args, cwd=ROOT, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        stack.callback(stop, proc)
        log = LineReader(proc.stderr)
        log.wait_for(lambda l: "listening" in l or "cannot bind" in l, STARTUP_TIMEOUT,
                     "the broker to listen")
        if any("listening" in line for line in log.lines):
            return {"proc": proc, "port": port}
        stop(proc)
    raise RuntimeError(f"no broker could bind in {BIND_ATTEMPTS} attempts: {log.lines[-3:]}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def update_results(key: str, value) -> None:
    """Store one bench's figures under ``key`` in backplane_results.json,
    keeping the other benches' figures there."""
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    data[key] = value
    RESULTS.write_text(json.dumps(data, indent=2) + "\n")


def split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def run_config(brokers: int | None, opts, work_dir: Path) -> dict:
    """``brokers`` None: one broker without a backplane."""
    with ExitStack() as stack:
        redis = None
        if brokers is not None:
            redis = RedisServer().start()
            stack.callback(redis.remove)
        started = [start_broker(stack, redis.url if redis else None)
                   for _ in range(brokers or 1)]
        rooms = [f"#bench{i}" for i in range(len(started))] if opts.spread else ["#general"]
        listeners = []
        sockets_of = split(opts.listeners, len(started))
        for i, (broker, sockets) in enumerate(zip(started, sockets_of)):
            worker = Worker(f"listener {i}", "listener", "--pub-port", str(broker["port"] + 1),
                            "--sockets", str(sockets), "--out-dir", str(work_dir),
                            "--index", str(i), "--room", rooms[i % len(rooms)])
            stack.callback(worker.stop)
            listeners.append(worker)
        sender = Worker("sender", "sender", "--port", str(started[0]["port"]), "--sockets",
                        str(opts.senders), "--join", "--rooms", ",".join(rooms))
        stack.callback(sender.stop)
        sender.reply(STARTUP_TIMEOUT)
        sender.command("warm")
        for worker in listeners:
            worker.reply(STARTUP_TIMEOUT)
        sender.command("idle")
        time.sleep(1.0)  # the warm-up trickle drains
        pids = {f"broker{i}": b["proc"].pid for i, b in enumerate(started)}
        if redis:
            pids["redis"] = redis.proc.pid
        meter = CpuMeter(pids)
        meter.start(time.monotonic())
        sent = sender.ask(3 * opts.seconds + ACK_DRAIN_SECONDS + STARTUP_TIMEOUT, "run", 1,
                          opts.rate, opts.seconds, ACK_DRAIN_SECONDS)
        # message n goes to room n % len(rooms), which listener i's sockets hear
        per_room = split(sent["sent"], len(rooms))
        expected = sum(per_room[i % len(rooms)] * n for i, n in enumerate(sockets_of))
        deadline = time.monotonic() + DELIVERY_GRACE_SECONDS
        while True:
            delivered = sum(w.ask(STARTUP_TIMEOUT, "count", 1)["deliveries"] for w in listeners)
            if delivered >= expected or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        cpu = meter.stop(time.monotonic())
        reports = [w.ask(STARTUP_TIMEOUT, "report", 1) for w in listeners]
    latencies = array("q")
    for report in reports:
        with open(report["latency_file"], "rb") as f:
            latencies.frombytes(f.read())
        os.unlink(report["latency_file"])
    ms = sorted(ns / 1e6 for ns in latencies)
    deliveries = sum(r["deliveries"] for r in reports)
    broker_cpu = sum(v["cpu_s"] for k, v in cpu.items() if k.startswith("broker"))
    redis_cpu = cpu.get("redis", {}).get("cpu_s", 0.0)
    return {
        "config": "one broker, no backplane" if brokers is None else f"{brokers} broker(s) + Redis",
        "brokers": brokers or 1, "backplane": brokers is not None, "rooms": len(rooms),
        "offered_rate": opts.rate, "seconds": opts.seconds, "listeners": opts.listeners,
        "sent": sent["sent"], "acked": sent["acked"], "refused": sent["refused"],
        "deliveries": deliveries, "expected": expected,
        "p50_ms": statistics.median(ms) if ms else None,
        "p99_ms": ms[int(0.99 * (len(ms) - 1))] if ms else None,
        "cpu": {k: round(v["cores"], 3) for k, v in cpu.items()},
        "broker_cpu_s": broker_cpu, "redis_cpu_s": redis_cpu,
        "us_per_delivery": 1e6 * (broker_cpu + redis_cpu) / max(deliveries, 1),
    }


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--brokers", default="1,2,3", help="broker counts to run with Redis")
    p.add_argument("--rate", type=float, default=1000.0, help="messages per second in all")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--listeners", type=int, default=60, help="SUB sockets in all")
    p.add_argument("--senders", type=int, default=4, help="DEALER sockets of the sender")
    p.add_argument("--spread", action="store_true",
                   help="one room per broker, each broker's listeners in its own room")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    common.raise_open_file_limit()
    # SIGTERM (timeout, kill) stops the run like Ctrl-C: the brokers and
    # Redis it started are stopped on the way out, never left behind.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    work_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"zchat-bp-bench-{os.getpid()}"
    work_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for brokers in [None, *(int(n) for n in opts.brokers.split(","))]:
        result = run_config(brokers, opts, work_dir)
        results.append(result)
        print(f"{result['config']:>26}: {result['acked']}/{result['sent']} acked, "
              f"{result['deliveries']}/{result['expected']} delivered, "
              f"p50 {result['p50_ms']:.1f} ms, p99 {result['p99_ms']:.1f} ms, "
              f"{result['us_per_delivery']:.1f} us CPU per delivery "
              f"(x{result['us_per_delivery'] / results[0]['us_per_delivery']:.2f}), "
              f"cores {result['cpu']}", flush=True)
    work_dir.rmdir()
    update_results("spread" if opts.spread else "results", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
