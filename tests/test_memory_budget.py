"""A broker under clients that ask and never read (issue 14, items 1-3).

Issue 14's first four attacks, scaled to a few seconds each, against a real
broker with ``--max-memory 64M``: joined peers that loop ``recent``/``fetch``
over a history of large texts (plain, and control characters that JSON
writes as six bytes each), one name's connections in turn that ask and keep
their sockets open, and connections that never join and loop ``who``. Before
outbound.py each of them grew the broker by tens of MiB per attacker; now
what is queued for them stays under the budget, a normal client beside them
loses nothing and is answered in time, the memory goes back and the CPU
comes back to idle once they leave, and the log stays a few lines.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time

import pytest
import zmq

import messages as m
import outbound
from procs import listen, run_cli, wait_until
from raw_peer import (SESSION_TOKENS, frame_of, join, raw_dealer, receive_reply, request,
                      rss_mib, send_body, unread_socket)
from test_idle_connections import GREETING, READY

pytestmark = pytest.mark.slow

BUDGET_MIB = 64
HISTORY = 1000
ATTACK_S = 4.0
HOGS = 16
NORMAL_LINES = 40
# A normal request's round trip while the attack runs. The broker answers in
# a few milliseconds when idle; under the attack a pass of the loop may hold
# a thousand requests and the replies allowed to them (measured: 0.1-0.9 s
# at most on two cores shared with other test runs).
NORMAL_LATENCY_S = 2.0
# Warnings during an attack: first lines and summaries only.
LOG_LINES = 20
# Back within 20% of the level before the attack (issue 14, item 2).
RSS_RETURN = 1.2
# CPU seconds per second that count as idle.
IDLE_CPU = 0.2


def hog_socket(ctx: zmq.Context, port: int) -> zmq.Socket:
    """A DEALER that takes next to nothing off the wire: its replies pile up
    in the broker."""
    return unread_socket(ctx, zmq.DEALER, port)


def fill_history(port: int, text: str) -> None:
    """HISTORY messages of ``text`` in #general, acknowledged."""
    with raw_dealer(port) as writer:
        join(writer, "history-writer")
        acks = 0
        for i in range(HISTORY):
            send_body(writer, {"type": "say", "id": f"h{i}", "text": text})
            if i % 100 == 99:  # a window well below the broker's reply queue
                while acks <= i:
                    reply = receive_reply(writer, 10)
                    assert reply is not None, f"only {acks} acks"
                    acks += isinstance(reply, m.Ack)
        send_body(writer, {"type": "bye"})


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def idle_for_a_second(pid: int) -> bool:
    before = cpu_seconds(pid)
    time.sleep(1.0)  # a measuring window, not a synchronisation
    return cpu_seconds(pid) - before < IDLE_CPU


class NormalClient:
    """A joined raw client that says a line now and then and times each
    acknowledgement; a listener checks that every line arrived."""

    def __init__(self, broker, clients):
        self.listener = listen(broker, "normal-ears")
        clients.append(self.listener)
        self._stack = contextlib.ExitStack()
        self.sock = self._stack.enter_context(raw_dealer(broker.port))
        join(self.sock, "normal-talker")
        self.latencies: list[float] = []

    def say(self) -> None:
        i = len(self.latencies)
        started = time.monotonic()
        reply = request(self.sock, {"type": "say", "id": f"n{i}", "text": f"normal line {i}"},
                        timeout=10)
        assert reply == m.Ack(f"n{i}", reply.seq), reply
        self.latencies.append(time.monotonic() - started)

    def check(self) -> None:
        expected = [f"normal line {i}" for i in range(len(self.latencies))]
        wait_until(lambda: len(self.texts()) >= len(expected), 10, "every normal line")
        assert self.texts() == expected
        assert max(self.latencies) < NORMAL_LATENCY_S, sorted(self.latencies)[-5:]

    def texts(self) -> list[str]:
        return [r["text"] for r in self.listener.messages() if r["from"] == "normal-talker"]

    def close(self) -> None:
        self._stack.close()


def attack(broker, normal: NormalClient, step, seconds: float = ATTACK_S) -> float:
    """Run ``step()`` (one round of the attack) for ``seconds``, with the
    normal client's lines in between; the broker's peak RSS in MiB."""
    peak = rss_mib(broker.proc.pid)
    end = time.monotonic() + seconds
    next_line = time.monotonic()
    while time.monotonic() < end:
        step()
        if time.monotonic() >= next_line and len(normal.latencies) < NORMAL_LINES:
            normal.say()
            next_line = time.monotonic() + seconds / NORMAL_LINES
        peak = max(peak, rss_mib(broker.proc.pid))
        assert broker.proc.poll() is None, broker.log.lines[-10:]
    return peak


def send_while_possible(sock: zmq.Socket, body: dict, most: int = 50) -> None:
    """Up to ``most`` requests, as many as the socket takes without waiting."""
    token = SESSION_TOKENS.get(sock)
    if token and body.get("type") not in ("hello", "who"):
        body = {**body, "session": token}
    frame = frame_of(body)
    for _ in range(most):
        try:
            sock.send(frame, zmq.NOBLOCK)
        except zmq.Again:
            return


def after_the_attack(broker, baseline: float) -> None:
    """Memory back near the baseline and the CPU idle, soon."""
    pid = broker.proc.pid
    wait_until(lambda: rss_mib(pid) <= baseline * RSS_RETURN, 15,
               f"RSS back within 20% of {baseline:.0f} MiB",
               interval=0.2)
    wait_until(lambda: idle_for_a_second(pid), 5, "the broker's CPU to be idle", interval=0)


def assert_quiet_log(lines: list[str]) -> None:
    """Warnings only: joins and leaves are one line per person, not per request."""
    warnings = [line for line in lines if " INFO " not in line]
    assert len(warnings) <= LOG_LINES, "\n".join(warnings)


def budget_broker(make_broker, *extra: str):
    return make_broker("--max-memory", f"{BUDGET_MIB}M", "--heartbeat-liveness", "1000",
                       "--max-per-address", "500", "--burst", "5000", *extra)


@pytest.mark.parametrize("text", ["x" * 4096, "\u0001" * 4096], ids=["large", "control"])
def test_joined_peers_that_never_read_their_history_stay_within_the_budget(
        make_broker, clients, text):
    broker = budget_broker(make_broker)
    fill_history(broker.port, text)
    normal = NormalClient(broker, clients)
    ctx = zmq.Context()
    try:
        hogs = [hog_socket(ctx, broker.port) for _ in range(HOGS)]
        for i, hog in enumerate(hogs):
            join(hog, f"hog{i}")
        baseline = rss_mib(broker.proc.pid)
        log_start = len(broker.log.lines)
        requests = [{"type": "recent", "count": m.MAX_FETCH_EVENTS},
                    {"type": "fetch", "after": 0, "until": HISTORY * 2}]

        def step():
            for i, hog in enumerate(hogs):
                send_while_possible(hog, requests[i % 2])

        peak = attack(broker, normal, step)
        log = broker.log.lines[log_start:]
    finally:
        ctx.destroy(linger=0)
    print(f"{HOGS} history hogs: RSS {baseline:.0f} -> peak {peak:.0f} MiB; normal "
          f"latency max {max(normal.latencies) * 1000:.0f} ms; {len(log)} log lines")
    assert peak - baseline <= BUDGET_MIB, (baseline, peak)
    normal.check()
    normal.close()
    after_the_attack(broker, baseline)
    assert_quiet_log(log)


def test_one_name_on_many_connections_in_turn_stays_within_the_budget(make_broker, clients):
    broker = budget_broker(make_broker)
    fill_history(broker.port, "y" * 4096)
    normal = NormalClient(broker, clients)
    ctx = zmq.Context()
    secret = "s" * 32
    turns = []
    try:
        baseline = rss_mib(broker.proc.pid)
        log_start = len(broker.log.lines)

        def step():
            # One connection per step: join, ask 1,100 times, say bye, keep
            # the socket open and never read.
            if len(turns) >= HOGS:
                return
            hog = hog_socket(ctx, broker.port)
            turns.append(hog)
            join(hog, "onename", secret=secret)
            hog.setsockopt(zmq.SNDTIMEO, 5000)  # the broker reads on: a short wait at most
            for _ in range(1100):
                send_body(hog, {"type": "recent", "count": m.MAX_FETCH_EVENTS})
            send_body(hog, {"type": "bye"})

        peak = attack(broker, normal, step)
        log = broker.log.lines[log_start:]
    finally:
        ctx.destroy(linger=0)
    print(f"{len(turns)} turns of one name: RSS {baseline:.0f} -> peak {peak:.0f} MiB")
    assert peak - baseline <= BUDGET_MIB, (baseline, peak)
    assert len(turns) == HOGS
    normal.check()
    normal.close()
    after_the_attack(broker, baseline)
    assert_quiet_log(log)


WHO_USERS = 200


def test_connections_that_never_join_hold_at_most_one_reply(make_broker, clients):
    broker = budget_broker(make_broker)
    normal = NormalClient(broker, clients)
    ctx = zmq.Context()
    try:
        users = []
        for i in range(WHO_USERS):  # a `who` of about 7 KB
            users.append(hog_socket(ctx, broker.port))
            join(users[-1], f"user{i:03d}".ljust(32, "u"))
        baseline = rss_mib(broker.proc.pid)
        log_start = len(broker.log.lines)
        hogs = [hog_socket(ctx, broker.port) for _ in range(HOGS)]

        def step():
            for hog in hogs:
                send_while_possible(hog, {"type": "who"})

        peak = attack(broker, normal, step)
        log = broker.log.lines[log_start:]
        # A newcomer that has not joined still gets its answer.
        listed = run_cli(broker, "users")
        assert listed.returncode == 0 and "normal-talker" in listed.stdout, listed
    finally:
        ctx.destroy(linger=0)
    print(f"{HOGS} who hogs: RSS {baseline:.0f} -> peak {peak:.0f} MiB")
    # Each may hold 32 KiB and one reply; before, a thousand replies each.
    assert peak - baseline <= 8, (baseline, peak)
    normal.check()
    normal.close()
    assert_quiet_log(log)


def test_a_connection_that_does_not_join_within_the_deadline_is_closed(make_broker):
    broker = make_broker("--join-deadline", "1", "--heartbeat-interval", "0.2",
                         "--heartbeat-liveness", "1000")
    with raw_dealer(broker.port) as member, socket.create_connection(
            ("127.0.0.1", broker.port), timeout=5) as idle:
        join(member, "member")
        idle.sendall(GREETING + READY)
        idle.setblocking(False)
        started = time.monotonic()

        def closed() -> bool:
            try:
                return idle.recv(4096) == b""  # the broker's greeting first, then the end
            except BlockingIOError:
                return False
            except OSError:
                return True

        wait_until(closed, 5, "the idle connection to be closed")
        waited = time.monotonic() - started
        # The member who joined is still served, on the same connection.
        assert isinstance(request(member, {"type": "say", "id": "1", "text": "still here"}),
                          m.Ack)
    assert 0.9 <= waited, waited
    broker.wait_log(lambda line: "has not joined within 1 s" in line, 5, "the reason logged")


def test_a_joined_connection_is_closed_only_the_deadline_after_its_session_ended(make_broker):
    """The deadline counts from the end of the session, not from the
    connection: joined longer than the deadline, a connection stays; once it
    says bye, it has the whole deadline again (noticed up to a
    ``JOIN_CHECKS``-th of it late, plus a sweep)."""
    broker = make_broker("--join-deadline", "1", "--heartbeat-interval", "0.2",
                         "--heartbeat-liveness", "1000")
    with raw_dealer(broker.port) as member:
        events = member.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        try:
            join(member, "member")
            # Twice the deadline joined, the connection stays (and is served).
            assert not events.poll(2000), "a joined connection was closed"
            assert isinstance(request(member, {"type": "say", "id": "1", "text": "still"}), m.Ack)
            send_body(member, {"type": "bye"})
            left = time.monotonic()
            assert events.poll(5000), "the connection was not closed after its session ended"
            waited = time.monotonic() - left
        finally:
            member.disable_monitor()
            events.close(linger=0)
    assert 0.9 <= waited <= 1 + 1 / outbound.JOIN_CHECKS + 1, waited
    broker.wait_log(lambda line: "has not joined within 1 s" in line, 5, "the reason logged")


def test_a_subscriber_that_never_reads_is_disconnected(make_broker, clients):
    broker = budget_broker(make_broker)
    normal = NormalClient(broker, clients)
    ctx = zmq.Context()
    try:
        stalled = unread_socket(ctx, zmq.SUB, broker.pub_port)
        talker = ctx.socket(zmq.DEALER)
        talker.setsockopt(zmq.LINGER, 0)
        talker.connect(f"tcp://127.0.0.1:{broker.port}")
        join(talker, "broadcaster")
        sent = 0

        def step():
            nonlocal sent
            for _ in range(20):  # 80 KB of broadcasts per step
                send_while_possible(talker, {"type": "say", "id": f"b{sent}", "text": "z" * 4000},
                                    most=1)
                sent += 1
            # The acks are read: a talker that let them pile up would be cut
            # too (its unread replies count once the stalled subscriber puts
            # the total over the budget), and its cut, logged first in the
            # same sweep, would leave the subscriber's in a summary line.
            while talker.poll(0):
                talker.recv()
            time.sleep(0.01)  # a steady stream, not a flood the rate limit refuses

        cut = lambda line: "subscriber has read nothing" in line  # noqa: E731
        deadline = time.monotonic() + outbound.STALL_S + 5
        while not any(cut(line) for line in broker.log.lines):
            assert time.monotonic() < deadline, "the stalled subscriber was never cut"
            attack(broker, normal, step, seconds=0.5)
    finally:
        ctx.destroy(linger=0)
    normal.check()
    normal.close()
