"""Failover time: from SIGKILL of a broker to the last of its clients joined on another.

    python bench/backplane_failover.py [--clients 1000] [--per-process 200]
                                       [--interval 1.0] [--liveness 3]

Three brokers on one fresh redis-server (append-only, free loopback port,
its own directory). CLIENTS real ClientSessions (client_session.py, the
clients' own engine, a worker thread each) run in generator processes of at
most PER_PROCESS sessions each (bench/failover_clients.py), so that no
process nears libzmq's 1,023 sockets per context or the 20,000-file limit,
and no one Python process serialises a thousand threads on its lock. Every
session connects to the first broker; half of them are given the second
then the third broker to fail over to, the other half the third then the
second (as operators would list brokers in different orders), so that the
survivors share the returning clients. Once all are joined, the first
broker is SIGKILLed; the figures are the times until each session has its
welcome from another broker (Joined): median, 90th and 99th percentiles and
the last, and how many of those welcomes resumed the session (its record in
Redis taken over). Then it checks that none of them was announced gone
(they came back within the grace) by asking a survivor who is online.

The time is bounded below by the clients' patience (liveness x interval of
silence before they count the broker as gone) plus their first reconnect
delay (0.25 s).

Every process it starts (brokers, Redis, generators) is stopped by its pid
on the way out, also on a timeout, an error, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import math
import signal
import statistics
import sys
import time
from contextlib import ExitStack

import common  # puts the product's modules (and tests/) on sys.path
from common import ROOT, CpuMeter, Worker
from backplane_scaling import STARTUP_TIMEOUT, split, start_broker, update_results

sys.path.insert(0, str(ROOT / "tests"))
from redis_proc import RedisServer  # noqa: E402

from client_session import list_users  # noqa: E402

# Longest wait for everyone to join at first, and to come back after the
# kill: far past the clients' patience.
JOIN_TIMEOUT = 180.0
FAILOVER_TIMEOUT = 120.0
POLL_EVERY = 0.25
SETTLE_SECONDS = 3.0
LIST_TIMEOUT = 10.0


def start_clients(stack: ExitStack, ports: list[int], opts) -> list[Worker]:
    first, second, third = ports
    workers = []
    for i, count in enumerate(split(opts.clients, math.ceil(opts.clients / opts.per_process))):
        order = (second, third) if i % 2 == 0 else (third, second)
        worker = Worker(f"failover clients {i}", "--port", str(first),
                        "--alternates", ",".join(map(str, order)), "--count", str(count),
                        "--prefix", f"client{i}", script="failover_clients.py")
        stack.callback(worker.stop)
        workers.append(worker)
    for worker in workers:
        worker.reply(STARTUP_TIMEOUT)
    return workers


def wait_joined(workers: list[Worker], clients: int, timeout: float) -> float:
    """Start every session and wait until all are welcomed; returns the seconds."""
    started = time.monotonic()
    for worker in workers:
        worker.ask(STARTUP_TIMEOUT, "go")
    while True:
        joined = sum(w.ask(STARTUP_TIMEOUT, "status")["joined"] for w in workers)
        if joined >= clients:
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise SystemExit(f"only {joined} of {clients} clients joined the first broker "
                             f"within {timeout:g} s")
        time.sleep(POLL_EVERY)


def wait_failed_over(workers: list[Worker], since_ns: int, clients: int,
                     timeout: float) -> tuple[list[float], int]:
    """Seconds from ``since_ns`` to each session's welcome from another
    broker, and how many of those welcomes resumed the session."""
    deadline = time.monotonic() + timeout
    while True:
        answers = [w.ask(STARTUP_TIMEOUT, "since", since_ns) for w in workers]
        back = [t for a in answers for t in a["seconds"] if t is not None]
        if len(back) >= clients:
            return sorted(back), sum(a["resumed"] for a in answers)
        if time.monotonic() > deadline:
            raise SystemExit(f"only {len(back)} of {clients} clients joined another broker "
                             f"within {timeout:g} s of the kill")
        time.sleep(POLL_EVERY)


def percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, math.ceil(q * len(sorted_values)) - 1)]


def measure(opts) -> dict:
    with ExitStack() as stack:
        redis = RedisServer().start()
        stack.callback(redis.remove)
        heartbeat = ("--heartbeat-interval", str(opts.interval),
                     "--heartbeat-liveness", str(opts.liveness))
        brokers = [start_broker(stack, redis.url, *heartbeat) for _ in range(3)]
        ports = [b["port"] for b in brokers]
        workers = start_clients(stack, ports, opts)
        join_s = wait_joined(workers, opts.clients, JOIN_TIMEOUT)
        print(f"{opts.clients} clients in {len(workers)} processes joined on the first "
              f"broker in {join_s:.1f} s", flush=True)
        time.sleep(SETTLE_SECONDS)  # the join broadcasts drain
        meter = CpuMeter({"broker1": brokers[1]["proc"].pid, "broker2": brokers[2]["proc"].pid,
                          "redis": redis.proc.pid,
                          **{f"generator{i}": w.pid for i, w in enumerate(workers)}})
        meter.start(time.monotonic())
        killed_ns = time.monotonic_ns()
        brokers[0]["proc"].kill()
        times, resumed = wait_failed_over(workers, killed_ns, opts.clients, FAILOVER_TIMEOUT)
        cpu = meter.stop(time.monotonic())
        online = list_users("127.0.0.1", ports[1], LIST_TIMEOUT) or []
    listed = sum(1 for name in online if name.startswith("client"))
    return {
        "clients": opts.clients, "generator_processes": len(workers),
        "interval_s": opts.interval, "liveness": opts.liveness,
        "patience_s": opts.interval * opts.liveness, "first_join_s": round(join_s, 2),
        "failover_p50_s": round(statistics.median(times), 3),
        "failover_p90_s": round(percentile(times, 0.90), 3),
        "failover_p99_s": round(percentile(times, 0.99), 3),
        "failover_max_s": round(times[-1], 3),
        "failover_min_s": round(times[0], 3),
        "resumed": resumed,  # welcomed back into their session (resumed: true)
        "listed_online_after": listed,
        "cores_during_failover": {k: round(v["cores"], 3) for k, v in cpu.items()
                                  if not k.startswith("generator")},
        "generator_cores_during_failover": round(sum(
            v["cores"] for k, v in cpu.items() if k.startswith("generator")), 3),
    }


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--per-process", type=int, default=200,
                   help="most sessions (threads) in one generator process")
    p.add_argument("--interval", type=float, default=1.0, help="heartbeat interval (s)")
    p.add_argument("--liveness", type=int, default=3, help="heartbeat liveness")
    p.add_argument("--no-save", action="store_true",
                   help="print only; leave bench/backplane_results.json as it is")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    common.raise_open_file_limit()
    # SIGTERM (timeout, kill) stops the run like Ctrl-C: the brokers, Redis
    # and generators it started are stopped on the way out, never left behind.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    result = measure(opts)
    print(f"SIGKILL to the last of {opts.clients} clients joined on another broker: "
          f"{result['failover_max_s']:.2f} s (p50 {result['failover_p50_s']:.2f} s, "
          f"p90 {result['failover_p90_s']:.2f} s, p99 {result['failover_p99_s']:.2f} s; "
          f"patience {result['patience_s']:g} s); sessions resumed: {result['resumed']} of "
          f"{opts.clients}; listed online afterwards: "
          f"{result['listed_online_after']} of {opts.clients}; cores during the failover "
          f"{result['cores_during_failover']}, generators "
          f"{result['generator_cores_during_failover']}", flush=True)
    if not opts.no_save:
        update_results("failover", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
