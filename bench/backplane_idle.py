"""Many users across several brokers on one Redis: joining, then idle CPU and memory per user.

    python bench/backplane_idle.py [--users 15000] [--brokers 3] [--per-process 1000]
                                   [--idle-seconds 20] [--join-timeout 300]

One fresh redis-server (append-only, free loopback port, its own directory)
and BROKERS brokers on it (--backplane, --max-users lifted to their share).
The users are the load generator's scale clients (loadgen.py ``clients``: a
DEALER and a SUB each, the client's own join sequence, a ping per heartbeat
period), at most PER_PROCESS in one generator process so that no process
comes near the 20,000-file limit (two connections per user); each
generator process joins its users to one broker, the processes dealt
round robin over the brokers. All connect at once; once every user is
welcomed and the joins have drained, the CPU of every broker, of Redis and
of the generators is measured over an idle window, and the resident memory
of brokers and Redis against what they held before the users came.

Every process it starts (brokers, Redis, generators) is stopped by its pid
on the way out, also on a timeout, an error, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import math
import signal
import sys
import time
from contextlib import ExitStack

import common  # puts the product's modules (and tests/) on sys.path
from common import ROOT, CpuMeter, Worker, memory_bytes, open_files
from backplane_scaling import STARTUP_TIMEOUT, split, start_broker, update_results

import messages as m

sys.path.insert(0, str(ROOT / "tests"))
from redis_proc import RedisServer  # noqa: E402

# Time for the join broadcasts and Redis's presence work to drain after the
# last welcome, before the idle window starts.
SETTLE_SECONDS = 5.0
STATUS_EVERY = 2.0
# Room above each broker's share of users: --max-users counts connections.
MAX_USERS_MARGIN = 1000


def start_generators(stack: ExitStack, brokers: list[dict], opts) -> list[Worker]:
    """The generator processes, dealt round robin over the brokers."""
    counts = split(opts.users, math.ceil(opts.users / opts.per_process))
    workers = []
    for i, count in enumerate(counts):
        broker = brokers[i % len(brokers)]
        worker = Worker(f"clients {i}", "clients", "--port", str(broker["port"]),
                        "--pub-port", str(broker["port"] + 1), "--count", str(count),
                        "--prefix", f"u{i}",
                        # each pings as often as PROTOCOL.md asks (default values)
                        "--interval", str(m.ping_period(1.0, 3)))
        stack.callback(worker.stop)
        workers.append(worker)
    for worker in workers:
        worker.reply(STARTUP_TIMEOUT)
    return workers


def wait_all_joined(workers: list[Worker], users: int, timeout: float) -> dict:
    """Send ``go`` to every generator, then wait until every user is welcomed."""
    started = time.monotonic()
    for worker in workers:
        worker.command("go")
    deadline = started + timeout
    while True:
        statuses = [w.ask(STARTUP_TIMEOUT, "status") for w in workers]
        joined = sum(s["joined"] for s in statuses)
        if joined >= users or time.monotonic() > deadline:
            break
        print(f"  {joined} of {users} joined after {time.monotonic() - started:.0f} s",
              flush=True)
        time.sleep(STATUS_EVERY)
    refusals: dict[str, int] = {}
    for s in statuses:
        for code, n in s["refusals"].items():
            refusals[code] = refusals.get(code, 0) + n
    last = max((s["last_welcome_ns"] or 0) for s in statuses)
    go = min(s["go_ns"] for s in statuses)
    return {"joined": joined, "join_s": (last - go) / 1e9 if last else None,
            "rejoins": sum(s["rejoins"] for s in statuses), "refusals": refusals}


def measure(opts) -> dict:
    with ExitStack() as stack:
        redis = RedisServer().start()
        stack.callback(redis.remove)
        share = math.ceil(opts.users / opts.brokers)
        brokers = [start_broker(stack, redis.url, "--max-users", str(share + MAX_USERS_MARGIN))
                   for _ in range(opts.brokers)]
        pids = {f"broker{i}": b["proc"].pid for i, b in enumerate(brokers)}
        pids["redis"] = redis.proc.pid
        time.sleep(1.0)  # the brokers' start-up work is done
        before = {name: memory_bytes(pid)["rss"] for name, pid in pids.items()}
        workers = start_generators(stack, brokers, opts)
        join = wait_all_joined(workers, opts.users, opts.join_timeout)
        if join["joined"] < opts.users:
            raise SystemExit(f"only {join['joined']} of {opts.users} users joined within "
                             f"{opts.join_timeout:g} s: {join}")
        time.sleep(SETTLE_SECONDS)
        meter = CpuMeter({**pids, **{f"generator{i}": w.pid for i, w in enumerate(workers)}})
        meter.start(time.monotonic())
        time.sleep(opts.idle_seconds)
        cpu = meter.stop(time.monotonic())
        after = {name: memory_bytes(pid)["rss"] for name, pid in pids.items()}
        fds = {name: open_files(pid) for name, pid in pids.items() if name != "redis"}
        statuses = [w.ask(STARTUP_TIMEOUT, "status") for w in workers]
    users_of = {f"broker{i}": sum(n for j, n in enumerate(
        split(opts.users, len(workers))) if j % opts.brokers == i) for i in range(opts.brokers)}
    broker_names = [f"broker{i}" for i in range(opts.brokers)]
    return {
        "users": opts.users, "brokers": opts.brokers, "generator_processes": len(workers),
        "users_per_broker": users_of, **join,
        "rejoins_after_idle": sum(s["rejoins"] for s in statuses),
        "idle_seconds": opts.idle_seconds,
        "idle_cores": {k: round(v["cores"], 4) for k, v in cpu.items()
                       if not k.startswith("generator")},
        "idle_generator_cores": round(sum(v["cores"] for k, v in cpu.items()
                                          if k.startswith("generator")), 3),
        "idle_cores_per_1000_users": {
            **{b: round(1000 * cpu[b]["cores"] / users_of[b], 4) for b in broker_names},
            "redis": round(1000 * cpu["redis"]["cores"] / opts.users, 4)},
        "rss_mb": {k: round(v / 2**20, 1) for k, v in after.items()},
        "rss_per_user_kb": {
            **{b: round((after[b] - before[b]) / users_of[b] / 1024, 1) for b in broker_names},
            "redis": round((after["redis"] - before["redis"]) / opts.users / 1024, 2)},
        "broker_open_files": fds,
    }


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--users", type=int, default=15000)
    p.add_argument("--brokers", type=int, default=3)
    p.add_argument("--per-process", type=int, default=1000,
                   help="most users in one generator process (two connections each)")
    p.add_argument("--idle-seconds", type=float, default=20.0)
    p.add_argument("--join-timeout", type=float, default=300.0,
                   help="longest wait for every user to be welcomed (s)")
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
    print(f"{result['joined']} users on {opts.brokers} brokers, joined in "
          f"{result['join_s']:.1f} s; idle cores {result['idle_cores']} "
          f"(per 1,000 users {result['idle_cores_per_1000_users']}); RSS per user (KB) "
          f"{result['rss_per_user_kb']}; RSS (MB) {result['rss_mb']}; generators "
          f"{result['idle_generator_cores']} cores", flush=True)
    if not opts.no_save:
        update_results("idle", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
