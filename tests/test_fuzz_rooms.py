"""Stateful fuzzing of BrokerCore's rooms, direct messages and connections.

A hypothesis state machine plays a few peers, some under one name with a
shared secret, some quiet, joining and parting rooms, posting to rooms and
to each other, setting topics and going silent. After every step it checks
the promises of PROTOCOL.md that the core's tables must keep: each room's
members are exactly the users with a loud connection in it, who is online is
exactly who has a loud connection, every stream counts up by one, a direct
message never reaches the PUB socket nor anyone but its two parties, and
everything is persisted before anyone hears of it. At times the disk is
full: every write fails, and the core must refuse what it could not store,
tell nobody of it, and keep its rooms, topics and sequence numbers as the
stored events say.
"""

from __future__ import annotations

import json

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

import messages as m
from broker_core import BrokerConfig, BrokerCore, Persist, Publish, Reply

T0 = 1_000.0
WALL = 1_700_000_000.0
CONFIG = BrokerConfig(heartbeat_interval=1.0, heartbeat_liveness=3, max_text=40, history=5,
                      max_users=6, max_rooms=4, rooms_per_session=3, history_bytes=3_000)
PEERS = [b"A", b"B", b"C", b"D", b"E"]
NAMES = ["ann", "ANN", "bob", "cy"]
ROOMS = ["#general", "#lab", "#LAB", "#ci", "#x1", "bad room"]
peers = st.sampled_from(PEERS)
rooms = st.sampled_from(ROOMS)


def frame(**body) -> list[bytes]:
    return [json.dumps(body).encode()]


class RoomsMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.core = BrokerCore(CONFIG)
        self.now = T0
        self.last_seq: dict[str, int] = {}  # stream -> the last seq persisted
        self.disk_full = False
        # (room key, name key) -> in the room, as the stored joins and leaves say
        self.stored_in: dict[tuple[str, str], bool] = {}
        self.stored_topic: dict[str, str] = {}  # room key -> the last stored topic

    # --- driving ------------------------------------------------------------------

    def token(self, peer: bytes) -> dict:
        session = self.core.sessions.get(peer)
        return {"session": session.secret} if session else {}

    def pass_of(self, peer: bytes, frames: list[bytes], now: float, wall: float) -> list:
        """One pass of the shell's loop: the request, then its joins and leaves."""
        return self.core.handle(peer, frames, now, wall) + self.core.flush_presence(wall)

    def send(self, peer: bytes, **body) -> None:
        self.check(self.pass_of(peer, frame(**body, **self.token(peer)), self.now, WALL), peer)

    def check(self, out: list, peer: bytes | None) -> list:
        """Check what the core said, as carried out (after a failed write,
        what it says instead), and return that."""
        if self.disk_full and any(isinstance(item, Persist) for item in out):
            out = self.core.persist_failed(out)
            assert not any(isinstance(item, Persist) for item in out)
        persisted: list = []
        for item in out:
            if isinstance(item, Persist):
                assert item.event.seq == self.last_seq.get(item.stream, 0) + 1, item
                self.last_seq[item.stream] = item.event.seq
                persisted.append(item.event)
                self.store(item)
            elif isinstance(item, Publish):
                event = item.event
                if isinstance(event, m.SEQUENCED_EVENTS):
                    assert event in persisted, "published before it was persisted"
                    assert event.room and item.topic == m.room_topic(m.room_key(event.room))
                    assert not (isinstance(event, m.Message) and event.to), "a DM on PUB"
            elif isinstance(item, Reply) and isinstance(item.message, m.Message):
                dm = item.message
                assert dm.to and dm in persisted
                owner = self.core.sessions.get(item.peer)
                assert owner is not None and not owner.quiet
                assert owner.user.name_key in (m.name_key(dm.sender), m.name_key(dm.to))
            elif isinstance(item, Reply):
                assert peer is None or item.peer == peer or isinstance(item.message, m.Position)
                m.encode(item.message)
        return out

    def store(self, record: Persist) -> None:
        event = record.event
        if isinstance(event, m.Presence):
            for name, reason in event.people():
                self.stored_in[(record.stream, m.name_key(name))] = reason is None
        elif isinstance(event, m.Topic):
            self.stored_topic[record.stream] = event.text

    # --- rules ----------------------------------------------------------------------

    @rule(full=st.booleans())
    def disk(self, full):
        self.disk_full = full

    @rule(peer=peers, name=st.sampled_from(NAMES), secret=st.sampled_from([None, "s1", "s2"]),
          quiet=st.booleans(), joined=st.lists(rooms, max_size=4))
    def hello(self, peer, name, secret, quiet, joined):
        body = {"type": "hello", "v": m.PROTOCOL_VERSION, "name": name, "quiet": quiet,
                "rooms": joined}
        if secret:
            body["secret"] = secret
        out = self.check(self.pass_of(peer, frame(**body), self.now, WALL), peer)
        if any(isinstance(r, Reply) and isinstance(r.message, m.Error)
               and r.message.code == m.ErrorCode.UNAVAILABLE for r in out):
            assert peer not in self.core.sessions  # refused: as if never said

    @rule(peer=peers, room=rooms)
    def join(self, peer, room):
        self.send(peer, type="join", room=room)

    @rule(peer=peers, room=rooms)
    def part(self, peer, room):
        self.send(peer, type="part", room=room)

    @rule(peer=peers, room=rooms, text=st.sampled_from(["hi", "x" * 40, "", "t" * 41]),
          msg_id=st.sampled_from(["1", "2", "3"]))
    def say_in_room(self, peer, room, text, msg_id):
        self.send(peer, type="say", id=msg_id, text=text, room=room)

    @rule(peer=peers, to=st.sampled_from(NAMES + ["nobody"]), msg_id=st.sampled_from(["4", "5"]))
    def say_to(self, peer, to, msg_id):
        self.send(peer, type="say", id=msg_id, text="psst", to=to)

    @rule(peer=peers, room=rooms, text=st.sampled_from(["", "topic", "é" * 160]))
    def topic(self, peer, room, text):
        self.send(peer, type="topic", room=room, text=text)

    @rule(peer=peers, stream=st.sampled_from(ROOMS + ["@ann", "@bob", "@cy"]))
    def fetch(self, peer, stream):
        self.send(peer, type="fetch", after=0, until=10, stream=stream)

    @rule(peer=peers, kind=st.sampled_from(["who", "rooms", "bye", "ping"]))
    def simple(self, peer, kind):
        self.send(peer, type=kind)

    @rule(elapsed=st.sampled_from([0.1, 1.0, 3.5]))
    def tick(self, elapsed):
        self.now += elapsed
        self.check(self.core.tick(self.now, WALL), None)

    @rule(peer=peers)
    def unreachable(self, peer):
        self.check(self.core.peer_unreachable(peer, WALL) + self.core.flush_presence(WALL), None)

    # --- invariants -------------------------------------------------------------------

    @invariant()
    def rooms_hold_exactly_their_sessions_users(self):
        for key, room in self.core.rooms.items():
            inside = [s for s in self.core.sessions.values() if key in s.rooms]
            assert room.sessions == len(inside)
            loud: dict[str, int] = {}
            for s in inside:
                if not s.quiet:
                    loud[s.user.name_key] = loud.get(s.user.name_key, 0) + 1
            assert {k: c for k, (_, c) in room.members.items()} == loud
        assert len(self.core.rooms) <= CONFIG.max_rooms
        assert all(len(s.rooms) <= CONFIG.rooms_per_session for s in self.core.sessions.values())

    @invariant()
    def online_is_whoever_has_a_loud_connection(self):
        loud = {(s.user.name_key, s.user.name) for s in self.core.sessions.values()
                if not s.quiet}
        assert self.core.online == sorted(loud)
        for key, user in self.core.by_name.items():
            assert user.sessions and all(s.user is user for s in user.sessions)
            assert user.visible == sum(not s.quiet for s in user.sessions)

    @invariant()
    def rooms_and_streams_are_as_stored(self):
        for stream_id, stream in self.core.streams.items():
            assert stream.seq == self.last_seq.get(stream_id, 0)
        leaving = {(key, m.name_key(name)) for key, name, _, _ in self.core.unrecorded_leaves}
        for key, room in self.core.rooms.items():
            stored = {name for (k, name), inside in self.stored_in.items() if k == key and inside}
            assert set(room.members) == stored - {name for k, name in leaving if k == key}
            assert room.topic == self.stored_topic.get(key, "")
        assert all(self.stored_in[pair] for pair in leaving)

    @invariant()
    def histories_stay_within_the_budget(self):
        total = sum(s.bytes for s in self.core.streams.values())
        assert self.core.history_bytes == total <= CONFIG.history_bytes


RoomsMachine.TestCase.settings = settings(
    max_examples=300, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
test_rooms_and_connections_keep_their_invariants = RoomsMachine.TestCase
