"""Failover time: from SIGKILL of a broker to the last of its clients joined on another.

    python bench/backplane_failover.py [--clients 200] [--interval 1.0] [--liveness 3]

Three brokers on one fresh redis-server (append-only, free loopback ports);
CLIENTS real ClientSessions (client_session.py, the clients' own engine, a
worker thread each, in this process) connected to the first broker, each
given the other two to fail over to. The first broker is SIGKILLed; the
figure is the time until every session has its welcome from another broker
(Joined), with the median. Then it checks that none of them was announced
gone (they came back within the grace) by asking a survivor who is online.

The time is bounded below by the clients' patience (liveness x interval of
silence before they count the broker as gone) plus their first reconnect
delay (0.25 s).
"""

from __future__ import annotations

import argparse
import signal
import queue
import statistics
import subprocess
import sys
import time
from contextlib import ExitStack

import zmq

import common  # puts the product's modules (and tests/) on sys.path
from common import PYTHON, ROOT, free_port_pair

sys.path.insert(0, str(ROOT / "tests"))
from procs import LineReader  # noqa: E402
from redis_proc import RedisServer  # noqa: E402

from client_session import BrokerAddress, ClientSession, Joined, list_users  # noqa: E402

STARTUP_TIMEOUT = 30.0
# Longest wait for everyone to come back: far past the clients' patience.
FAILOVER_TIMEOUT = 120.0


def start_broker(stack: ExitStack, redis_url: str, opts) -> tuple[subprocess.Popen, int]:
    port = free_port_pair()
    proc = subprocess.Popen([PYTHON, "broker.py", "--port", str(port), "--log-level", "WARNING",
                             "--backplane", redis_url, "--max-per-address", "1000000",
                             "--heartbeat-interval", str(opts.interval),
                             "--heartbeat-liveness", str(opts.liveness)],
                            cwd=ROOT, stderr=subprocess.PIPE, text=True, start_new_session=True)
    stack.callback(lambda: proc.poll() is None and (proc.kill(), proc.wait()))
    LineReader(proc.stderr).wait_for(lambda l: "listening" in l, STARTUP_TIMEOUT,
                                     "the broker to listen")
    return proc, port


def wait_joined(sessions: list[ClientSession], since: float, timeout: float) -> list[float]:
    """Seconds from ``since`` until each session's next Joined."""
    times: dict[int, float] = {}
    deadline = time.monotonic() + timeout
    while len(times) < len(sessions) and time.monotonic() < deadline:
        for i, session in enumerate(sessions):
            if i in times:
                continue
            try:
                while True:
                    if isinstance(session.events.get_nowait(), Joined):
                        times[i] = time.monotonic() - since
                        break
            except queue.Empty:
                pass
        time.sleep(0.01)
    if len(times) < len(sessions):
        raise SystemExit(f"only {len(times)} of {len(sessions)} clients joined again")
    return sorted(times.values())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=100,
                   help="sessions, a thread each in this process (default 100)")
    p.add_argument("--interval", type=float, default=1.0, help="heartbeat interval (s)")
    p.add_argument("--liveness", type=int, default=3, help="heartbeat liveness")
    opts = p.parse_args(argv)
    common.raise_open_file_limit()
    # SIGTERM (timeout, kill) stops the run like Ctrl-C: the brokers and
    # Redis it started are stopped on the way out, never left behind.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    # The sessions share the process's context: two sockets each (libzmq's
    # default is 1023 sockets per context).
    zmq.Context.instance().set(zmq.MAX_SOCKETS, 2 * opts.clients + 64)
    with ExitStack() as stack:
        redis = RedisServer().start()
        stack.callback(redis.remove)
        brokers = [start_broker(stack, redis.url, opts) for _ in range(3)]
        (victim, first), others = brokers[0], [port for _, port in brokers[1:]]
        alternates = tuple(BrokerAddress("127.0.0.1", port) for port in others)
        sessions = [ClientSession("127.0.0.1", first, f"client{i}", alternates=alternates,
                                  secret=f"bench-secret-{i}").start()
                    for i in range(opts.clients)]
        stack.callback(lambda: [s.close(0.5) for s in sessions])
        started = time.monotonic()
        wait_joined(sessions, started, FAILOVER_TIMEOUT)
        print(f"{opts.clients} clients joined on the first broker in "
              f"{time.monotonic() - started:.1f} s", flush=True)
        victim.kill()
        killed = time.monotonic()
        times = wait_joined(sessions, killed, FAILOVER_TIMEOUT)
        online = list_users("127.0.0.1", others[0], 10) or []
        missing = opts.clients - sum(1 for name in online if name.startswith("client"))
        print(f"SIGKILL to the last of {opts.clients} clients joined on another broker: "
              f"{times[-1]:.2f} s (median {statistics.median(times):.2f} s; patience "
              f"{opts.interval * opts.liveness:g} s); listed online afterwards: "
              f"{opts.clients - missing} of {opts.clients}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
