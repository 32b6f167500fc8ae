"""Presence that scales, against a real broker: a room above --presence-threshold
announces nobody and publishes its count; the users command pages.

Real broker process, real client sessions (in this process: lighter than a
process each), and a bare SUB socket watching the room as any subscriber would.
"""

from __future__ import annotations

import json
import secrets
import time

import pytest
import zmq

import messages as m
from client_session import ClientSession, Joined
from procs import run_cli, wait_until

THRESHOLD = 3


class RoomWatcher:
    """A SUB on one room's topic, subscribed before anyone joins (probed)."""

    def __init__(self, broker, room: str = m.GENERAL_ROOM):
        self.sub = zmq.Context.instance().socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        ready = m.READY_TOPIC_PREFIX + secrets.token_hex(8).encode()
        self.sub.setsockopt(zmq.SUBSCRIBE, m.room_topic(room))
        self.sub.setsockopt(zmq.SUBSCRIBE, ready)
        self.sub.connect(f"tcp://127.0.0.1:{broker.pub_port}")
        self.events: list = []
        wait_until(lambda: self.sub.poll(50) and self.sub.recv_multipart()[0] == ready, 10,
                   "the watcher's subscription to be live")

    def read(self) -> list:
        while self.sub.poll(0):
            self.events += m.decode_broadcast(self.sub.recv_multipart())
        return self.events

    def of(self, kind: type) -> list:
        return [e for e in self.read() if isinstance(e, kind)]

    def close(self) -> None:
        self.sub.close()


@pytest.fixture
def sessions():
    started: list[ClientSession] = []
    yield started
    for session in started:
        session.close()


def join_as(broker, sessions: list, name: str) -> ClientSession:
    session = ClientSession("127.0.0.1", broker.port, name).start()
    sessions.append(session)
    wait_until(lambda: any(isinstance(e, Joined) for e in _drain(session)), 10, f"{name} joined")
    return session


def _drain(session: ClientSession) -> list:
    events = []
    while not session.events.empty():
        events.append(session.events.get_nowait())
    return events


def joined_names(watcher: RoomWatcher) -> list[str]:
    return [name for e in watcher.of(m.Presence) for name in e.joined]


def test_a_big_room_stops_announcing_people_and_publishes_its_count(make_broker, sessions):
    broker = make_broker("--heartbeat-interval", "0.2",
                         "--presence-threshold", str(THRESHOLD))
    watcher = RoomWatcher(broker)
    try:
        names = [f"p{i}" for i in range(1, 7)]
        for name in names[:THRESHOLD]:
            join_as(broker, sessions, name)
        wait_until(lambda: joined_names(watcher) == names[:THRESHOLD], 5, "each join announced")
        for name in names[THRESHOLD:]:
            join_as(broker, sessions, name)
        wait_until(lambda: [e.count for e in watcher.of(m.Members)][-1:] == [6], 5,
                   "the count of six")
        assert joined_names(watcher) == names[:THRESHOLD]  # the others: counted, not named
        counts = watcher.of(m.Members)
        assert [e.count for e in counts] == sorted({e.count for e in counts})  # each once
        # at most one count per heartbeat interval, for a room that keeps changing
        started = time.monotonic()
        seen = len(watcher.of(m.Members))
        for i in range(6):
            join_as(broker, sessions, f"q{i}")
        wait_until(lambda: [e.count for e in watcher.of(m.Members)][-1:] == [12], 5,
                   "the count of twelve")
        published = len(watcher.of(m.Members)) - seen
        assert published <= (time.monotonic() - started) / 0.2 + 1
        # everyone is still listed, page by page
        listed = run_cli(broker, "users", "--json")
        assert listed.returncode == 0 and len(json.loads(listed.stdout)) == 12
        # back at the threshold: the count at once, then each leave named again
        for session in sessions[:9]:
            session.close()
        wait_until(lambda: [e.count for e in watcher.of(m.Members)][-1:] == [THRESHOLD], 10,
                   "the count back at the threshold")
        sessions[9].close()
        wait_until(lambda: any(e.left for e in watcher.of(m.Presence)), 5, "a leave named again")
        (leave,) = [e for e in watcher.of(m.Presence) if e.left]
        assert leave.left == [[sessions[9].name, m.LeaveReason.QUIT]]
    finally:
        watcher.close()
