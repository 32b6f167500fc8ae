"""The broker core with no sockets: sessions, names, liveness, sequence, history."""

import json

import pytest

import messages as m
from broker_core import BrokerConfig, BrokerCore, Publish, Reply

T0 = 1_000.0  # monotonic: the core's timers
WALL_OFFSET = 1_700_000_000.0
G = m.GENERAL_ROOM  # the wall clock, stamped on events, runs elsewhere


def wall(now: float) -> float:
    return now + WALL_OFFSET


def at(now: float) -> tuple[float, float]:
    """(monotonic, wall) at monotonic time ``now``."""
    return now, wall(now)


def frame(**body) -> list[bytes]:
    if body.get("type") == "hello":
        body.setdefault("v", m.PROTOCOL_VERSION)  # every client sends it
    return [json.dumps(body).encode()]


def signed(core, peer, **body) -> list[bytes]:
    """A request carrying the peer's session token, as a joined client sends it."""
    if peer in core.sessions:
        body["session"] = core.sessions[peer].secret
    return frame(**body)


def replies(outputs, peer=None):
    return [o.message for o in outputs if isinstance(o, Reply) and (peer is None or o.peer == peer)]


def published(outputs):
    return [o.event for o in outputs if isinstance(o, Publish)]


def join(core, peer, name, now=T0, **extra):
    out = core.handle(peer, frame(type="hello", name=name, **extra), *at(now))
    return out


@pytest.fixture
def core():
    return BrokerCore(BrokerConfig(heartbeat_interval=1.0, heartbeat_liveness=3, max_text=100,
                                   history=10, max_users=3))


def test_hello_welcomes_and_announces_join(core):
    out = join(core, b"A", "alice")
    (welcome,) = replies(out, b"A")
    assert isinstance(welcome, m.Welcome)
    assert welcome.users == ["alice"] and welcome.resume
    assert welcome.rooms == [m.Room(G, 0, "", 0)] and welcome.dm_seq == 0
    assert published(out) == [m.Join(1, wall(T0), "alice", G)]


def test_welcome_lists_everyone_online(core):
    join(core, b"A", "alice")
    (welcome,) = replies(join(core, b"B", "Bob"))
    assert welcome.users == ["alice", "Bob"] and welcome.rooms[0].seq == 1


@pytest.mark.parametrize("name", ["", "a" * 33, "bad name", "ünï", "a\u202eb", "x\x1b", "a/b"])
def test_invalid_names_are_refused_with_a_reason(core, name):
    out = join(core, b"A", name)
    (error,) = replies(out)
    assert error.code == m.ErrorCode.NAME_INVALID and "characters" in error.reason
    assert not published(out) and not core.sessions


@pytest.mark.parametrize("name", ["a", "A" * 32, "bob_1", "x-y.z", "007"])
def test_valid_names_are_accepted(core, name):
    assert isinstance(replies(join(core, b"A", name))[0], m.Welcome)


def test_taken_name_is_refused_ignoring_case_and_another_may_be_tried(core):
    join(core, b"A", "alice")
    (error,) = replies(join(core, b"B", "ALICE"))
    assert error.code == m.ErrorCode.NAME_TAKEN and "taken" in error.reason
    (welcome,) = replies(join(core, b"B", "alice2"))
    assert welcome.name == "alice2"


def test_second_name_on_one_connection_is_refused(core):
    join(core, b"A", "alice")
    (error,) = replies(join(core, b"A", "other"))
    assert error.code == m.ErrorCode.ALREADY_JOINED


def test_repeated_hello_with_the_token_is_welcomed_again_without_a_second_join(core):
    (welcome,) = replies(join(core, b"A", "alice"))
    out = join(core, b"A", "alice", resume=welcome.resume)
    assert isinstance(replies(out)[0], m.Welcome) and not published(out)
    # without the token, the routing id alone gets nothing
    (error,) = replies(join(core, b"A", "alice"))
    assert error.code == m.ErrorCode.ALREADY_JOINED


def test_requests_without_the_session_token_do_not_speak_for_the_session(core):
    (welcome,) = replies(join(core, b"A", "alice"))
    out = core.handle(b"A", frame(type="say", id="x", text="hi"), *at(T0))
    assert replies(out)[0].code == m.ErrorCode.NOT_JOINED and not published(out)
    out = core.handle(b"A", frame(type="say", id="x", text="hi", session="f" * 32), *at(T0))
    assert replies(out)[0].code == m.ErrorCode.NOT_JOINED and not published(out)
    out = core.handle(b"A", frame(type="say", id="x", text="hi", session=welcome.resume), *at(T0))
    assert replies(out) == [m.Ack("x", 2)]


def test_wrong_protocol_version_is_refused(core):
    (error,) = replies(join(core, b"A", "alice", v=99))
    assert error.code == m.ErrorCode.BAD_VERSION


def test_server_full(core):
    for i in range(3):
        join(core, bytes([i]), f"u{i}")
    (error,) = replies(join(core, b"Z", "late"))
    assert error.code == m.ErrorCode.SERVER_FULL


def test_say_is_stamped_by_the_broker_and_acknowledged(core):
    join(core, b"A", "alice")
    out = core.handle(b"A", signed(core, b"A", type="say", id="m1", text="hi", **{"from": "bob"}), *at(T0 + 1))
    assert published(out) == [m.Message(2, wall(T0 + 1), "alice", "hi", G)]
    assert replies(out) == [m.Ack("m1", 2)]


def test_repeated_message_id_is_acknowledged_again_but_not_broadcast(core):
    join(core, b"A", "alice")
    core.handle(b"A", signed(core, b"A", type="say", id="m1", text="hi"), *at(T0))
    out = core.handle(b"A", signed(core, b"A", type="say", id="m1", text="hi"), *at(T0))
    assert replies(out) == [m.Ack("m1", 2)] and not published(out)


def test_say_before_joining_is_refused(core):
    out = core.handle(b"A", signed(core, b"A", type="say", id="m1", text="hi"), *at(T0))
    assert replies(out) == [m.Error(m.ErrorCode.NOT_JOINED, "join first (send hello)", "m1")]
    assert not published(out)


@pytest.mark.parametrize("text,code", [("x" * 101, m.ErrorCode.TEXT_TOO_LONG),
                                       ("é" * 51, m.ErrorCode.TEXT_TOO_LONG),
                                       ("   ", m.ErrorCode.TEXT_EMPTY)])
def test_bad_text_is_refused_naming_the_message(core, text, code):
    join(core, b"A", "alice")
    out = core.handle(b"A", signed(core, b"A", type="say", id="m1", text=text), *at(T0))
    (error,) = replies(out)
    assert (error.code, error.id) == (code, "m1") and not published(out)


def test_text_at_the_limit_is_accepted(core):
    join(core, b"A", "alice")
    out = core.handle(b"A", signed(core, b"A", type="say", id="m1", text="x" * 100), *at(T0))
    assert replies(out) == [m.Ack("m1", 2)]


@pytest.mark.parametrize("frames", [[], [b"a", b"b"], [b"\xff"], [b"[]"], [b"{}"],
                                    [b'{"type":"nope"}'], [b'{"type":"say","id":"","text":"x"}']])
def test_malformed_requests_get_an_error_and_change_nothing(core, frames):
    join(core, b"A", "alice")
    out = core.handle(b"B", frames, *at(T0))
    (error,) = replies(out, b"B")
    assert error.code in (m.ErrorCode.MALFORMED, m.ErrorCode.UNKNOWN_TYPE)
    assert not published(out) and list(core.sessions) == [b"A"]


def test_who_needs_no_join(core):
    join(core, b"A", "bob")
    join(core, b"B", "alice")
    assert replies(core.handle(b"X", signed(core, b"X", type="who"), *at(T0))) == [m.Users(["alice", "bob"])]


def test_bye_announces_quit_and_frees_the_name(core):
    join(core, b"A", "alice")
    out = core.handle(b"A", signed(core, b"A", type="bye"), *at(T0 + 1))
    assert published(out) == [m.Leave(2, wall(T0 + 1), "alice", m.LeaveReason.QUIT, G)]
    assert isinstance(replies(join(core, b"B", "alice"))[0], m.Welcome)


def test_silent_session_times_out_after_liveness_intervals(core):
    core.tick(*at(T0))
    join(core, b"A", "alice", now=T0)
    join(core, b"B", "bob", now=T0)
    core.handle(b"B", signed(core, b"B", type="ping"), *at(T0 + 2.5))
    assert not [e for e in published(core.tick(*at(T0 + 2.9))) if isinstance(e, m.Leave)]
    # swept at most every interval / 4: alice goes at the next sweep
    assert core.next_deadline() == T0 + 2.9 + 0.25
    assert not [e for e in published(core.tick(*at(T0 + 3.0))) if isinstance(e, m.Leave)]
    leaves = [e for e in published(core.tick(*at(T0 + 3.15))) if isinstance(e, m.Leave)]
    assert leaves == [m.Leave(3, wall(T0 + 3.15), "alice", m.LeaveReason.TIMEOUT, G)]
    assert list(core.sessions) == [b"B"]


def test_any_request_of_the_owner_counts_as_a_heartbeat_but_garbage_does_not(core):
    join(core, b"A", "alice", now=T0)
    join(core, b"B", "bob", now=T0)
    core.handle(b"A", signed(core, b"A", type="fetch", after=0, until=1), *at(T0 + 2.9))
    core.handle(b"B", [b"garbage"], *at(T0 + 2.9))
    leaves = [e for e in published(core.tick(*at(T0 + 4))) if isinstance(e, m.Leave)]
    assert [e.name for e in leaves] == ["bob"]


def test_ping_from_unknown_peer_says_not_joined(core):
    (error,) = replies(core.handle(b"A", signed(core, b"A", type="ping"), *at(T0)))
    assert error.code == m.ErrorCode.NOT_JOINED


def test_heartbeat_each_interval_and_the_position_of_each_room_in_use(core):
    out = core.tick(*at(T0))
    assert [(o.event, o.topic) for o in out] == [(m.Heartbeat(core.epoch, wall(T0)),
                                                  m.HEARTBEAT_TOPIC)]
    assert published(core.tick(*at(T0 + 0.5))) == []
    join(core, b"A", "alice", now=T0 + 0.6)
    position = (m.Position(G, 1), m.room_topic(G))
    out = core.tick(*at(T0 + 1.0))
    assert [(o.event, o.topic) for o in out] == [
        (m.Heartbeat(core.epoch, wall(T0 + 1.0)), m.HEARTBEAT_TOPIC), position]
    # at every heartbeat while anyone is in the room: a subscriber's queue
    # may have dropped any number of announcements in a row
    core.handle(b"A", signed(core, b"A", type="ping"), *at(T0 + 1.5))
    assert position in [(o.event, o.topic) for o in core.tick(*at(T0 + 2.0))]
    core.handle(b"A", signed(core, b"A", type="bye"), *at(T0 + 2.5))
    assert not [o for o in core.tick(*at(T0 + 3.0)) if isinstance(o.event, m.Position)]


def test_next_deadline_is_the_earliest_heartbeat_or_expiry(core):
    core.tick(*at(T0))
    assert core.next_deadline() == T0 + 1
    join(core, b"A", "alice", now=T0 - 2.5)
    assert core.next_deadline() == T0 + 0.5


def test_unreachable_peer_is_announced_as_gone(core):
    join(core, b"A", "alice")
    out = core.peer_unreachable(b"A", wall(T0))
    assert published(out) == [m.Leave(2, wall(T0), "alice", m.LeaveReason.DISCONNECTED, G)]
    assert core.peer_unreachable(b"A", wall(T0)) == []


def test_resume_token_rebinds_the_name_to_a_new_connection_silently(core):
    (welcome,) = replies(join(core, b"A", "alice"))
    out = join(core, b"B", "alice", resume=welcome.resume)
    (again,) = replies(out, b"B")
    assert again.resumed and not published(out)
    assert core.sessions[b"B"].name == "alice" and b"A" not in core.sessions
    # the old connection no longer speaks for alice
    assert replies(core.handle(b"A", signed(core, b"A", type="say", id="x", text="hi"), *at(T0)))[0].code == \
        m.ErrorCode.NOT_JOINED


def test_wrong_resume_token_does_not_take_the_name(core):
    join(core, b"A", "alice")
    (error,) = replies(join(core, b"B", "alice", resume="0" * 32))
    assert error.code == m.ErrorCode.NAME_TAKEN


def test_ready_probe_answers_only_on_the_probe_topic(core):
    (out,) = core.ready_probe(b"ready:abc", wall(T0))
    assert out.topic == b"ready:abc" and isinstance(out.event, m.Heartbeat)
    assert core.ready_probe(b"all", wall(T0)) == []
    assert core.ready_probe(b"ready:", wall(T0)) == []
    assert core.ready_probe(b"ready:" + b"x" * 65, wall(T0)) == []


def test_fetch_returns_the_missing_range_from_history(core):
    join(core, b"A", "alice")
    for i in range(5):
        core.handle(b"A", signed(core, b"A", type="say", id=f"m{i}", text=f"t{i}"), *at(T0))
    (history,) = replies(core.handle(b"A", signed(core, b"A", type="fetch", after=2, until=4), *at(T0)))
    assert [e.seq for e in history.events] == [3, 4] and history.first == 1


def test_fetch_past_the_history_limit_reports_what_is_gone(core):
    join(core, b"A", "alice")
    for i in range(20):
        core.handle(b"A", signed(core, b"A", type="say", id=f"m{i}", text=f"t{i}"), *at(T0))
    (history,) = replies(core.handle(b"A", signed(core, b"A", type="fetch", after=0, until=21), *at(T0)))
    assert history.first == 12 and [e.seq for e in history.events] == list(range(12, 22))
    (history,) = replies(core.handle(b"A", signed(core, b"A", type="fetch", after=0, until=5), *at(T0)))
    assert history.events == [] and history.first == 12 and history.until == 5


def test_shutdown_is_announced(core):
    assert published(core.shutdown(wall(T0))) == [m.Shutdown(wall(T0))]


def say_many(core, peer, count, now, start=0):
    out = []
    for i in range(start, start + count):
        out += core.handle(peer, signed(core, peer, type="say", id=f"m{i}", text="x"), *at(now))
    return out


def test_rate_limit_allows_a_burst_then_refuses_with_retry_after():
    core = BrokerCore(BrokerConfig(rate=10, burst=5))
    join(core, b"A", "alice")
    out = say_many(core, b"A", 7, T0)
    acks = [r for r in replies(out) if isinstance(r, m.Ack)]
    errors = [r for r in replies(out) if isinstance(r, m.Error)]
    assert len(acks) == 5 and [e.code for e in errors] == [m.ErrorCode.RATE_LIMITED] * 2
    assert errors[0].id == "m5" and errors[0].retry_after >= 0.1


def test_rate_limited_client_refused_until_retry_after_then_accepted_again():
    core = BrokerCore(BrokerConfig(rate=10, burst=1))
    join(core, b"A", "alice")
    say_many(core, b"A", 1, T0)
    (error,) = replies(say_many(core, b"A", 1, T0, start=1))
    # refused even after a token would have refilled: the order is kept
    (again,) = replies(say_many(core, b"A", 1, T0 + error.retry_after - 0.01, start=2))
    assert again.code == m.ErrorCode.RATE_LIMITED
    # a later message is refused until the first refused one comes again
    late = T0 + error.retry_after + 1
    (blocked,) = replies(say_many(core, b"A", 1, late, start=2))
    assert (blocked.code, blocked.id) == (m.ErrorCode.RATE_LIMITED, "m2")
    (ack,) = replies(say_many(core, b"A", 1, late, start=1))
    assert ack == m.Ack("m1", 3)
    (ack,) = replies(say_many(core, b"A", 1, late + 1, start=2))
    assert ack == m.Ack("m2", 4)


def test_a_client_that_keeps_flooding_is_disconnected():
    core = BrokerCore(BrokerConfig(rate=1, burst=1))
    join(core, b"A", "alice")
    join(core, b"B", "bob")
    out = say_many(core, b"A", 1001, T0)
    assert replies(out)[-1].code == m.ErrorCode.FLOODING
    (leave,) = [e for e in published(out) if isinstance(e, m.Leave)]
    assert (leave.name, leave.reason) == ("alice", m.LeaveReason.KICKED)
    assert core.user_names() == ["bob"]


def test_a_bound_key_may_join_only_under_its_name():
    core = BrokerCore(BrokerConfig(names_by_key={"KEY-A": "alice"}))
    out = core.handle(b"A", signed(core, b"A", type="hello", name="bob"), *at(T0), client_key="KEY-A")
    assert replies(out)[0].code == m.ErrorCode.NAME_NOT_ALLOWED
    out = core.handle(b"B", signed(core, b"B", type="hello", name="alice"), *at(T0), client_key="KEY-B")
    assert replies(out)[0].code == m.ErrorCode.NAME_NOT_ALLOWED
    out = core.handle(b"A", signed(core, b"A", type="hello", name="Alice"), *at(T0), client_key="KEY-A")
    assert isinstance(replies(out)[0], m.Welcome)


def test_history_replies_are_bounded_in_size_and_still_make_progress():
    core = BrokerCore(BrokerConfig(max_text=100_000, history=100, burst=100))
    join(core, b"A", "alice")
    for i in range(10):
        core.handle(b"A", signed(core, b"A", type="say", id=f"m{i}", text="x" * 30_000), *at(T0))
    (history,) = replies(core.handle(b"A", signed(core, b"A", type="fetch", after=1, until=11), *at(T0)))
    assert [e.seq for e in history.events] == [2, 3] and history.until == 3
    (recent,) = replies(core.handle(b"A", signed(core, b"A", type="recent", count=10), *at(T0)))
    assert [e.seq for e in recent.events] == [10, 11]


def test_nobody_times_out_while_requests_wait_unread(core):
    join(core, b"A", "alice", now=T0)
    out = core.tick(*at(T0 + 10), backlog=True)
    assert not [e for e in published(out) if isinstance(e, m.Leave)]
    assert [e.name for e in published(core.tick(*at(T0 + 10))) if isinstance(e, m.Leave)] == ["alice"]


# --- two clocks ------------------------------------------------------------------------


@pytest.mark.parametrize("jump", [3600.0, -3600.0])
def test_a_wall_clock_jump_times_nobody_out_and_trips_no_rate_limit(jump):
    core = BrokerCore(BrokerConfig(heartbeat_interval=1.0, heartbeat_liveness=3, rate=10,
                                   burst=2))
    join(core, b"A", "alice")
    join(core, b"B", "bob")
    # The wall clock moves an hour; the monotonic clock only a little.
    now, jumped = T0 + 1, wall(T0 + 1) + jump
    core.handle(b"A", signed(core, b"A", type="ping"), now, jumped)
    core.handle(b"B", signed(core, b"B", type="ping"), now, jumped)
    out = core.tick(now + 0.5, jumped + 0.5)
    assert not [e for e in published(out) if isinstance(e, m.Leave)]
    # one message per 0.2 s is within 10/s: never refused, whatever the wall says
    for i in range(10):
        t = now + 0.2 * (i + 1)
        out = core.handle(b"A", signed(core, b"A", type="say", id=f"j{i}", text="x"), t,
                          jumped - 0.2 * i)  # a wall clock running backwards
        assert isinstance(replies(out)[0], m.Ack)
    (message,) = [e for e in published(out) if isinstance(e, m.Message)]
    assert message.time == jumped - 0.2 * 9  # people see the wall clock
