"""Stateful fuzzing of BrokerCore: any sequence of events, and the books stay right.

A hypothesis state machine plays a few peers against one core: valid and
invalid requests, ticks with a monotonic clock that never goes back and a wall clock that
jumps an hour or a day either way, unreachable
peers and ready probes. After every step it checks that the core never
raised and that its tables and outputs keep the promises of PROTOCOL.md:
one session per name, bounded tables, sequence numbers growing by exactly
one, liveness enforced, and no peer ever speaking under a name it does not own.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, assume, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from unittest.mock import ANY

import messages as m
from broker_core import BrokerConfig, BrokerCore, Persist, Publish, Reply
from raw_peer import FrameFuzzer

T0 = 1_000.0
WALL0 = 1_700_000_000.0
ANY_ID = ANY  # a Persist's sender id, checked elsewhere
# Small tables, so the fuzzer reaches every limit within a few dozen steps.
CONFIG = BrokerConfig(heartbeat_interval=1.0, heartbeat_liveness=3, max_text=40, history=6,
                      max_users=3)
ACCEPTED_IDS_LIMIT = 5
# Routing ids: short test ones and the 5-byte form libzmq generates.
PEERS = [b"A", b"B", b"C", b"\x00k\x8bEg", b"\x00k\x8bEh"]
VALID_NAMES = ["alice", "ALICE", "bob", "carol", "dave", "x" * 32]
NAMES = VALID_NAMES + ["x" * 33, "", "bad name", "\u00e9", "a\u202eb"]
TEXTS = ["hi", "", "   ", "\x1b[2J", "\u202e", "\U0001f389" * 10, "t" * 40, "t" * 41]

peers = st.sampled_from(PEERS)
json_ints = st.integers(-3, 40) | st.sampled_from([2**31, 2**53, 2**62, 2**63, 2**64, 10**30])


def frame(**body) -> list[bytes]:
    if body.get("type") == "hello":
        body.setdefault("v", m.PROTOCOL_VERSION)  # every client sends it
    return [json.dumps(body).encode()]


# Whose session token a request after joining carries; mostly its own, so
# most steps act, while the others probe that a routing id alone gets nothing.
tokens_used = st.sampled_from(["own", "own", "own", "other", "forged", "none"])


class BrokerCoreMachine(RuleBasedStateMachine):
    """Drives one BrokerCore and checks every output against what each peer owns."""

    def __init__(self):
        super().__init__()
        self.core = BrokerCore(CONFIG)
        self.core.main.ids_remembered = ACCEPTED_IDS_LIMIT
        self.now = T0  # monotonic
        self.wall = WALL0  # the wall clock, which may jump
        self.last_seq = 0
        self.tokens: list[str] = []  # resume tokens the broker handed out
        # Who is online by this machine's own reckoning: the names of the
        # joins published, less those of the leaves.
        self.online: set[str] = set()
        self.ticked = False

    # --- driving the core --------------------------------------------------------

    def owners(self) -> dict[bytes, str]:
        return {peer: s.name for peer, s in self.core.sessions.items()}

    def handle(self, peer: bytes, frames: list[bytes]) -> None:
        before = self.owners()
        out = self.core.handle(peer, frames, self.now, self.wall)
        out += self.core.flush_presence(self.wall)  # the end of the shell's pass
        after = self.owners()
        self.check_persisted_first(out)
        for item in out:
            if isinstance(item, Reply):
                assert item.peer == peer, "a reply went to another peer"
                self.check_reply(peer, item.message, after)
            elif isinstance(item, Publish):
                event = self.check_published(item)
                if isinstance(event, m.Message):
                    assert before.get(peer) == event.sender, "a message under a name not owned"
                elif isinstance(event, m.Presence) and event.joined:
                    assert peer not in before and event.joined == [after.get(peer)]
                elif isinstance(event, m.Presence):
                    assert [before.get(peer)] == [n for n, _ in event.left] and peer not in after
        self.ticked = False

    def check_reply(self, peer: bytes, reply, owners: dict[bytes, str]) -> None:
        if isinstance(reply, m.Welcome):
            assert owners.get(peer) == reply.name, "welcomed under a name it does not own"
            self.tokens.append(reply.resume)
        elif isinstance(reply, m.Ack):
            assert peer in owners, "an ack for a peer with no session"
            assert 0 < reply.seq <= self.core.main.seq
        elif isinstance(reply, m.History):
            seqs = [e.seq for e in reply.events]
            assert seqs == sorted(set(seqs)) and len(seqs) <= m.MAX_FETCH_EVENTS
        elif isinstance(reply, m.Users):
            # sorted case-insensitively (PROTOCOL.md), ties in a fixed order
            assert reply.users == sorted(self.online, key=lambda name: (name.casefold(), name))
        m.encode(reply)  # the shell must be able to send whatever the core returns

    @staticmethod
    def check_persisted_first(out: list) -> None:
        """Each sequenced event is persisted before it is published, and
        anything that tells a client of it comes after both."""
        persisted = [o.event for o in out if isinstance(o, Persist)]
        published = [o.event for o in out if isinstance(o, Publish)
                     and isinstance(o.event, m.SEQUENCED_EVENTS)]
        assert persisted == published
        for i, item in enumerate(out):
            if isinstance(item, Publish) and isinstance(item.event, m.SEQUENCED_EVENTS):
                assert Persist(m.GENERAL_ROOM, item.event, ANY_ID) in out[:i]

    def check_published(self, item: Publish):
        event = item.event
        if isinstance(event, m.SEQUENCED_EVENTS):
            assert item.topic == m.BROADCAST_TOPIC
            assert event.seq == self.last_seq + 1, "sequence numbers skip or repeat"
            self.last_seq = event.seq
            if isinstance(event, m.Presence):
                for name in event.joined:
                    assert name not in self.online, "a join for a name already online"
                    self.online.add(name)
                for name, _ in event.left:
                    assert name in self.online, "a leave for a name not online"
                    self.online.remove(name)
        m.encode(event)
        return event

    # --- rules ---------------------------------------------------------------------

    @rule(peer=peers, name=st.sampled_from(NAMES), resume=st.booleans(),
          random_token=st.sampled_from([None, "0" * 32, "", "x" * 64, "\u00e9t\u00e9"]))
    def hello(self, peer, name, resume, random_token):
        token = self.tokens[-1] if resume and self.tokens else random_token
        body = {"type": "hello", "name": name}
        if token is not None:
            body["resume"] = token
        self.handle(peer, frame(**body))

    def session_field(self, peer: bytes, whose: str) -> dict:
        """The session token a request carries: its own, another's, or none."""
        sessions = list(self.core.sessions.values())
        own = self.core.sessions.get(peer)
        token = {"own": own.secret if own else None,
                 "other": sessions[0].secret if sessions else None,
                 "forged": "0" * 32, "none": None}[whose]
        return {} if token is None else {"session": token}

    @rule(peer=peers, msg_id=st.sampled_from(["1", "2", "3", "4", "5", "6", "7", "8"]),
          text=st.sampled_from(TEXTS), spoof=st.sampled_from([{}, {"from": "alice"},
                                                             {"name": "bob", "sender": "carol"}]),
          whose=tokens_used)
    def say(self, peer, msg_id, text, spoof, whose):
        self.handle(peer, frame(type="say", id=msg_id, text=text, **spoof,
                                **self.session_field(peer, whose)))

    @rule(peer=peers, name=st.sampled_from(VALID_NAMES))
    def join(self, peer, name):
        """A plain hello with a valid name: most steps then run with sessions."""
        self.handle(peer, frame(type="hello", name=name))

    @rule(peer=peers, after=json_ints, span=st.integers(-2, 10) | json_ints, whose=tokens_used)
    def fetch(self, peer, after, span, whose):
        self.handle(peer, frame(type="fetch", after=after, until=after + span,
                                **self.session_field(peer, whose)))

    @rule(peer=peers, count=json_ints, whose=tokens_used)
    def recent(self, peer, count, whose):
        self.handle(peer, frame(type="recent", count=count, **self.session_field(peer, whose)))

    @rule(peer=peers, kind=st.sampled_from(["who", "ping", "bye"]), whose=tokens_used)
    def no_field_request(self, peer, kind, whose):
        self.handle(peer, frame(type=kind, **self.session_field(peer, whose)))

    @rule(peer=peers, seed=st.integers(0, 2**32))
    def fuzz_frames(self, peer, seed):
        self.handle(peer, FrameFuzzer(seed, max_text=CONFIG.max_text).frames())

    @rule(peer=peers, frames=st.lists(st.binary(max_size=30), max_size=3))
    def random_bytes(self, peer, frames):
        self.handle(peer, frames)

    @rule(elapsed=st.sampled_from([0.0, 0.1, 0.5, 0.99, 1.0, 2.5, 2.999, 3.0, 3.001, 10.0]))
    def tick(self, elapsed):
        self.now += elapsed
        before = self.owners()
        out = self.core.tick(self.now, self.wall)
        self.check_persisted_first(out)
        for item in out:
            if isinstance(item, Persist):
                continue
            event = self.check_published(item)
            if isinstance(event, m.Presence):
                assert not event.joined and event.left
                for name, reason in event.left:
                    assert reason == m.LeaveReason.TIMEOUT
                    assert name in before.values(), "a leave for a name nobody held"
            elif isinstance(event, m.Heartbeat):
                assert item.topic == m.HEARTBEAT_TOPIC and event.epoch == self.core.epoch
            elif isinstance(event, m.Position):
                # "the last seq so far" at its place in the output order
                assert (event.stream, event.seq) == (m.GENERAL_ROOM, self.last_seq)
            else:
                raise AssertionError(f"tick published {event}")
        self.ticked = True

    @rule(jump=st.sampled_from([-3600.0, 3600.0, -86400.0, 0.5]))
    def wall_clock_jumps(self, jump):
        """The wall clock is set (NTP, an operator): no timer may notice."""
        self.wall += jump

    @rule(peer=peers)
    def peer_unreachable(self, peer):
        before = self.owners()
        out = self.core.peer_unreachable(peer, self.wall) + self.core.flush_presence(self.wall)
        self.check_persisted_first(out)
        events = [self.check_published(item) for item in out if isinstance(item, Publish)]
        assert [(n, r) for e in events for n, r in e.left] == (
            [(before[peer], m.LeaveReason.DISCONNECTED)] if peer in before else [])
        assert peer not in self.core.sessions
        self.ticked = False

    @rule(topic=st.sampled_from([b"ready:", b"ready:abc", b"ready:" + b"n" * 64,
                                 b"ready:" + b"n" * 65, b"all", b"", b"\xff"]) | st.binary(max_size=80))
    def ready_probe(self, topic):
        out = self.core.ready_probe(topic, self.wall)
        for item in out:
            assert item.topic == topic and topic.startswith(m.READY_TOPIC_PREFIX)
            assert isinstance(item.event, m.Heartbeat)

    # --- invariants ------------------------------------------------------------------

    @invariant()
    def sessions_and_names_agree(self):
        core = self.core
        in_users = [s for user in core.by_name.values() for s in user.sessions]
        assert {id(s) for s in core.sessions.values()} == {id(s) for s in in_users}
        assert len(in_users) == len(core.sessions)
        for key, user in core.by_name.items():
            assert key == m.name_key(user.name) and user.sessions
            assert m.name_problem(user.name) is None
            assert all(s.user is user for s in user.sessions)
        for peer, session in core.sessions.items():
            assert session.peer == peer

    @invariant()
    def sessions_are_who_the_events_say_is_online(self):
        assert {s.name for s in self.core.sessions.values()} == self.online

    @invariant()
    def tables_stay_bounded(self):
        core = self.core
        assert len(core.main.history) <= CONFIG.history
        assert len(core.sessions) <= CONFIG.max_users
        assert len(core.main.accepted_ids) <= ACCEPTED_IDS_LIMIT

    @invariant()
    def history_is_the_tail_of_the_sequence(self):
        seqs = [e.seq for e in self.core.main.history]
        assert seqs == list(range(self.last_seq - len(seqs) + 1, self.last_seq + 1))
        assert self.core.main.seq == self.last_seq

    @invariant()
    def ordered_by_activity(self):
        seen = [s.last_seen for s in self.core.sessions.values()]
        assert seen == sorted(seen)

    @precondition(lambda self: self.ticked)
    @invariant()
    def no_session_outlives_the_liveness_bound(self):
        # silent sessions go at the first sweep past their expiry, and the
        # broker sweeps every sweep_period
        bound = CONFIG.expiry + CONFIG.sweep_period
        for session in self.core.sessions.values():
            assert session.last_seen > self.now - bound


BrokerCoreMachine.TestCase.settings = settings(
    max_examples=120, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
test_broker_core_keeps_its_invariants = BrokerCoreMachine.TestCase


# --- crashes the fuzzer once found, kept as regression tests ----------------------


@pytest.fixture
def core_with_alice():
    core = BrokerCore(CONFIG)
    (welcome,) = core.handle(b"A", frame(type="hello", name="alice"), T0, WALL0)
    assert isinstance(welcome.message, m.Welcome)
    return core


@pytest.mark.parametrize("after", [2**63, 2**64, 10**30])
def test_fetch_far_past_the_end_is_refused_not_raised(core_with_alice, after):
    token = core_with_alice.sessions[b"A"].secret
    (reply,) = core_with_alice.handle(
        b"A", frame(type="fetch", after=after, until=after, session=token), T0, WALL0)
    assert isinstance(reply.message, m.Error) and reply.message.code == m.ErrorCode.MALFORMED


@pytest.mark.parametrize("token", ["\u00e9", "\U0001f389" * 16])
def test_hello_with_a_non_ascii_resume_token_is_refused_not_raised(core_with_alice, token):
    (reply,) = core_with_alice.handle(b"B", frame(type="hello", name="alice", resume=token), T0, WALL0)
    assert reply.message.code == m.ErrorCode.MALFORMED
    assert list(core_with_alice.sessions) == [b"A"]


def test_fetch_at_the_largest_safe_number_is_answered_empty(core_with_alice):
    token = core_with_alice.sessions[b"A"].secret
    top = m.MAX_SAFE_INT
    (reply,) = core_with_alice.handle(
        b"A", frame(type="fetch", after=top, until=top, session=token), T0, WALL0)
    assert isinstance(reply.message, m.History) and reply.message.events == []
