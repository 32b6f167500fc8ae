"""Failover clients: COUNT real ClientSessions in one process, for bench/backplane_failover.py.

    python bench/failover_clients.py --port P --alternates P2,P3 --count N --prefix NAME

Each session is the clients' own engine (client_session.py: a worker thread,
a DEALER and a SUB, ClientCore's failover to the alternates in order). The
process answers one-line commands on stdin with one JSON line on stdout
(common.Worker) and exits when its stdin closes:

go
    start every session, on the first broker.
status
    ``{"joined": sessions welcomed at least once, "failed": sessions whose
    worker thread ended}``.
since T
    ``{"seconds": [...]}``: for each session, the seconds from the monotonic
    time T (nanoseconds, CLOCK_MONOTONIC: one clock for the whole machine on
    Linux) to its first welcome after T, or null if it has none yet.

The time of each welcome is taken in the session's worker thread as the
event is emitted; no other event is kept (a thousand users joining would
queue a million presence events nobody reads).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import zmq

import common  # noqa: F401  (puts the product's modules on sys.path)
from client_session import BrokerAddress, ClientSession, Joined

# Sockets of one session: its DEALER and SUB (the context's own are extra).
SOCKETS_PER_SESSION = 2
CONTEXT_SPARE_SOCKETS = 64


class TimedSession(ClientSession):
    """A ClientSession that records when each welcome came (and whether it
    resumed the session) and drops every event."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.joined_ns: list[int] = []
        self.resumed: list[bool] = []

    def _emit(self, events: list) -> None:
        for event in events:
            if isinstance(event, Joined):
                self.joined_ns.append(time.monotonic_ns())
                self.resumed.append(event.resumed)


def first_after(session: TimedSession, since_ns: int) -> tuple[float, bool] | None:
    """Seconds from ``since_ns`` to the first welcome after it, and whether
    it resumed the session."""
    for t, resumed in zip(session.joined_ns, session.resumed):
        if t >= since_ns:
            return (t - since_ns) / 1e9, resumed
    return None


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True, help="the first broker")
    p.add_argument("--alternates", required=True, help="the other brokers' ports, in order")
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--prefix", required=True)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    # The sessions share the process's context; libzmq's default is 1023
    # sockets per context. The caller also keeps COUNT small enough.
    zmq.Context.instance().set(zmq.MAX_SOCKETS,
                               SOCKETS_PER_SESSION * opts.count + CONTEXT_SPARE_SOCKETS)
    alternates = tuple(BrokerAddress("127.0.0.1", int(port))
                       for port in opts.alternates.split(","))
    sessions = [TimedSession("127.0.0.1", opts.port, f"{opts.prefix}-{i}", alternates=alternates,
                             secret=f"bench-secret-{opts.prefix}-{i}")
                for i in range(opts.count)]
    print(json.dumps({"started": True}), flush=True)
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        if words[0] == "go":
            for session in sessions:
                session.start()
            answer = {"started": len(sessions)}
        elif words[0] == "status":
            answer = {"joined": sum(1 for s in sessions if s.joined_ns),
                      "failed": sum(1 for s in sessions if not s._thread.is_alive())}
        elif words[0] == "since":
            welcomes = [first_after(s, int(words[1])) for s in sessions]
            answer = {"seconds": [w[0] if w else None for w in welcomes],
                      "resumed": sum(1 for w in welcomes if w and w[1])}
        else:
            answer = {"error": f"unknown command {words[0]!r}"}
        print(json.dumps(answer), flush=True)
    # stdin closed: the run is over. Leave at once; the brokers are stopped
    # by the caller, so a goodbye per session would only cost time.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
