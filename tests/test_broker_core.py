"""The broker core with no sockets: sessions, names, liveness, sequence, history."""

import json

import pytest

import messages as m
from broker_core import ROOM_POSITION_REFRESH, BrokerConfig, BrokerCore, Persist, Publish, Reply

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


def handle(core, peer, frames, now, wall, **extra):
    """One pass of the shell's loop with one request: its outputs, then the
    pass's joins and leaves."""
    return core.handle(peer, frames, now, wall, **extra) + core.flush_presence(wall)


def is_leave(event) -> bool:
    return isinstance(event, m.Presence) and bool(event.left)


def join(core, peer, name, now=T0, **extra):
    out = handle(core, peer, frame(type="hello", name=name, **extra), *at(now))
    return out


@pytest.fixture
def core():
    return BrokerCore(BrokerConfig(heartbeat_interval=1.0, heartbeat_liveness=3, max_text=100,
                                   history=10, max_users=3))


def test_hello_welcomes_and_announces_join(core):
    out = join(core, b"A", "alice")
    (welcome,) = replies(out, b"A")
    assert isinstance(welcome, m.Welcome)
    assert welcome.online == 1 and welcome.resume
    assert welcome.rooms == [m.Room(G, 0, "", 1)] and welcome.dm_seq == 0
    assert published(out) == [m.Presence(1, wall(T0), ["alice"], [], G)]


def test_welcome_counts_everyone_online(core):
    join(core, b"A", "alice")
    (welcome,) = replies(join(core, b"B", "Bob"))
    assert welcome.online == 2 and welcome.rooms[0].seq == 1 and welcome.rooms[0].members == 2


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


def test_a_protocol_2_hello_is_told_clearly_which_protocol_this_is(core):
    hello_v2 = b'{"type":"hello","name":"alice","v":2,"quiet":false,"rooms":["#general"]}'
    out = core.handle(b"A", [hello_v2], *at(T0))
    assert replies(out) == [m.Error(m.ErrorCode.BAD_VERSION,
                                    "this broker speaks protocol 3, not 2")]
    assert not core.sessions and not published(out)


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
    assert replies(core.handle(b"X", signed(core, b"X", type="who"), *at(T0))) == [m.Users(["alice", "bob"], count=2)]


def test_bye_announces_quit_and_frees_the_name(core):
    join(core, b"A", "alice")
    out = handle(core, b"A", signed(core, b"A", type="bye"), *at(T0 + 1))
    assert published(out) == [m.Presence(2, wall(T0 + 1), [], [["alice", m.LeaveReason.QUIT]], G)]
    assert isinstance(replies(join(core, b"B", "alice"))[0], m.Welcome)


def test_silent_session_times_out_after_liveness_intervals(core):
    core.tick(*at(T0))
    join(core, b"A", "alice", now=T0)
    join(core, b"B", "bob", now=T0)
    core.handle(b"B", signed(core, b"B", type="ping"), *at(T0 + 2.5))
    assert not [e for e in published(core.tick(*at(T0 + 2.9))) if is_leave(e)]
    # swept at most every interval / 4: alice goes at the next sweep
    assert core.next_deadline() == T0 + 2.9 + 0.25
    assert not [e for e in published(core.tick(*at(T0 + 3.0))) if is_leave(e)]
    leaves = [e for e in published(core.tick(*at(T0 + 3.15))) if is_leave(e)]
    assert leaves == [m.Presence(3, wall(T0 + 3.15), [], [["alice", m.LeaveReason.TIMEOUT]], G)]
    assert list(core.sessions) == [b"B"]


def test_any_request_of_the_owner_counts_as_a_heartbeat_but_garbage_does_not(core):
    join(core, b"A", "alice", now=T0)
    join(core, b"B", "bob", now=T0)
    core.handle(b"A", signed(core, b"A", type="fetch", after=0, until=1), *at(T0 + 2.9))
    core.handle(b"B", [b"garbage"], *at(T0 + 2.9))
    leaves = [e for e in published(core.tick(*at(T0 + 4))) if is_leave(e)]
    assert [e.left for e in leaves] == [[["bob", m.LeaveReason.TIMEOUT]]]


def test_ping_from_unknown_peer_says_not_joined(core):
    (error,) = replies(core.handle(b"A", signed(core, b"A", type="ping"), *at(T0)))
    assert error.code == m.ErrorCode.NOT_JOINED


def test_heartbeat_each_interval_and_the_position_of_each_room_that_changed(core):
    out = core.tick(*at(T0))
    assert [(o.event, o.topic) for o in out] == [(m.Heartbeat(core.epoch, wall(T0)),
                                                  m.HEARTBEAT_TOPIC)]
    assert published(core.tick(*at(T0 + 0.5))) == []
    join(core, b"A", "alice", now=T0 + 0.6)
    position = (m.Position(G, 1), m.room_topic(G))
    out = core.tick(*at(T0 + 1.0))
    assert [(o.event, o.topic) for o in out] == [
        (m.Heartbeat(core.epoch, wall(T0 + 1.0)), m.HEARTBEAT_TOPIC), position]
    # at the next heartbeat too (the first announcement may be dropped), then
    # only at every ROOM_POSITION_REFRESH-th heartbeat while anyone is in it
    beats = {}
    for beat in range(2, 2 + ROOM_POSITION_REFRESH):
        now = T0 + beat
        core.handle(b"A", signed(core, b"A", type="ping"), *at(now - 0.5))
        published_now = [(o.event, o.topic) for o in core.tick(*at(now))]
        beats[core.heartbeats] = position in published_now
    assert [n for n, announced in beats.items() if announced] == [3, ROOM_POSITION_REFRESH]
    core.handle(b"A", signed(core, b"A", type="bye"), *at(T0 + 12.5))
    for beat in range(13, 13 + ROOM_POSITION_REFRESH):  # nobody in it: never
        assert not [o for o in core.tick(*at(T0 + beat)) if isinstance(o.event, m.Position)]


def test_next_deadline_is_the_earliest_heartbeat_or_expiry(core):
    core.tick(*at(T0))
    assert core.next_deadline() == T0 + 1
    join(core, b"A", "alice", now=T0 - 2.5)
    assert core.next_deadline() == T0 + 0.5


def test_unreachable_peer_is_announced_as_gone(core):
    join(core, b"A", "alice")
    core.tick(*at(T0))  # the first heartbeat
    assert core.next_deadline() > T0
    out = core.peer_unreachable(b"A", wall(T0))
    assert core.next_deadline() <= T0  # the leave is announced at the next pass
    out += core.tick(*at(T0))
    assert published(out)[:1] == [m.Presence(2, wall(T0), [], [["alice", m.LeaveReason.DISCONNECTED]], G)]
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
    out = say_many(core, b"A", 1001, T0) + core.flush_presence(wall(T0))
    assert replies(out)[-1].code == m.ErrorCode.FLOODING
    (leave,) = [e for e in published(out) if is_leave(e)]
    assert leave.left == [["alice", m.LeaveReason.KICKED]]
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
    assert not [e for e in published(out) if is_leave(e)]
    assert [e.left[0][0] for e in published(core.tick(*at(T0 + 10))) if is_leave(e)] == ["alice"]


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
    assert not [e for e in published(out) if is_leave(e)]
    # one message per 0.2 s is within 10/s: never refused, whatever the wall says
    for i in range(10):
        t = now + 0.2 * (i + 1)
        out = core.handle(b"A", signed(core, b"A", type="say", id=f"j{i}", text="x"), t,
                          jumped - 0.2 * i)  # a wall clock running backwards
        assert isinstance(replies(out)[0], m.Ack)
    (message,) = [e for e in published(out) if isinstance(e, m.Message)]
    assert message.time == jumped - 0.2 * 9  # people see the wall clock


# --- rooms ---------------------------------------------------------------------------------


def topics(outputs) -> list:
    return [(o.topic, o.event) for o in outputs if isinstance(o, Publish)]


def test_joining_a_room_creates_it_and_announces_the_join_there_alone(core):
    join(core, b"A", "alice")
    out = handle(core, b"A", signed(core, b"A", type="join", room="#Lab-3"), *at(T0))
    (info,) = replies(out)
    assert info == m.Room("#Lab-3", 0, "", 1)  # the position before the own join
    assert topics(out) == [(m.room_topic("#lab-3"), m.Presence(1, wall(T0), ["alice"], [], "#Lab-3"))]
    # the same room under another case is the same room, and joining again is harmless
    out = handle(core, b"A", signed(core, b"A", type="join", room="#LAB-3"), *at(T0))
    assert replies(out) == [m.Room("#Lab-3", 1, "", 1)] and not topics(out)


@pytest.mark.parametrize("room", ["lab", "#", "#" + "x" * 33, "#a b", "#ü", "#a\u202e"])
def test_a_bad_room_name_is_refused(core, room):
    join(core, b"A", "alice")
    (error,) = replies(core.handle(b"A", signed(core, b"A", type="join", room=room), *at(T0)))
    assert error.code == m.ErrorCode.ROOM_INVALID


def test_rooms_per_connection_and_in_all_are_bounded():
    core = BrokerCore(BrokerConfig(max_rooms=3, rooms_per_session=2))
    join(core, b"A", "alice")  # #general is one room already
    assert replies(core.handle(b"A", signed(core, b"A", type="join", room="#a"), *at(T0)))[0] \
        == m.Room("#a", 0, "", 1)
    (error,) = replies(core.handle(b"A", signed(core, b"A", type="join", room="#b"), *at(T0)))
    assert error.code == m.ErrorCode.TOO_MANY_ROOMS and "per connection" in error.reason
    join(core, b"B", "bob", rooms=["#b"])
    (error,) = replies(join(core, b"C", "carol", rooms=["#c"]))
    assert error.code == m.ErrorCode.TOO_MANY_ROOMS and "most rooms" in error.reason


def test_part_announces_a_leave_in_that_room_and_an_unused_room_is_forgotten(core):
    join(core, b"A", "alice", rooms=["#general", "#lab"])
    out = handle(core, b"A", signed(core, b"A", type="part", room="#lab"), *at(T0 + 1))
    assert replies(out) == [m.Parted("#lab")]
    assert topics(out) == [(m.room_topic("#lab"),
                            m.Presence(2, wall(T0 + 1), [], [["alice", m.LeaveReason.PART]], "#lab"))]
    # a room nobody is in and nothing was said in is forgotten
    join(core, b"Q", "quiet-bot", quiet=True, rooms=["#empty"])
    handle(core, b"Q", signed(core, b"Q", type="bye"), *at(T0))
    assert "#empty" not in core.rooms and "#lab" in core.rooms
    (error,) = replies(handle(core, b"A", signed(core, b"A", type="part", room="#lab"), *at(T0)))
    assert error.code == m.ErrorCode.NOT_IN_ROOM


def test_say_goes_to_the_room_it_names_and_only_to_a_member(core):
    join(core, b"A", "alice", rooms=["#general", "#ci"])
    join(core, b"B", "bob")
    out = core.handle(b"A", signed(core, b"A", type="say", id="1", text="green", room="#CI"),
                      *at(T0))
    assert topics(out) == [(m.room_topic("#ci"), m.Message(2, wall(T0), "alice", "green", "#ci"))]
    assert replies(out) == [m.Ack("1", 2)]
    (error,) = replies(core.handle(b"B", signed(core, b"B", type="say", id="2", text="x",
                                                room="#ci"), *at(T0)))
    assert error.code == m.ErrorCode.NOT_IN_ROOM and error.id == "2"
    (error,) = replies(core.handle(b"B", signed(core, b"B", type="fetch", after=0, until=2,
                                                stream="#ci"), *at(T0)))
    assert error.code == m.ErrorCode.NOT_IN_ROOM


def test_who_rooms_and_topics(core):
    join(core, b"A", "alice", rooms=["#general", "#ci"])
    join(core, b"B", "Bob", rooms=["#ci"])
    assert replies(core.handle(b"X", frame(type="who", room="#ci"), *at(T0))) == [
        m.Users(["alice", "Bob"], "#ci", 2)]
    out = core.handle(b"B", signed(core, b"B", type="topic", room="#ci", text="builds"), *at(T0))
    assert topics(out) == [(m.room_topic("#ci"), m.Topic(3, wall(T0), "Bob", "builds", "#ci"))]
    assert replies(out) == [m.Room("#ci", 3, "builds", 2)]
    (listing,) = replies(core.handle(b"X", frame(type="rooms"), *at(T0)))
    assert listing == m.RoomList([m.Room("#ci", 3, "builds", 2), m.Room(G, 1, "", 1)])


# --- direct messages ---------------------------------------------------------------------


def test_a_direct_message_reaches_both_parties_sessions_and_never_the_pub_socket(core):
    join(core, b"A", "alice", secret="s-alice")
    join(core, b"A2", "alice", secret="s-alice")  # alice's second device
    join(core, b"B", "bob")
    out = core.handle(b"A", signed(core, b"A", type="say", id="d1", text="psst", to="BOB"),
                      *at(T0))
    assert topics(out) == []  # nothing on the PUB socket
    sent = m.Message(1, wall(T0), "alice", "psst", to="bob")
    assert sorted(repr((o.peer, o.message)) for o in out if isinstance(o, Reply)) == sorted(
        repr(r) for r in [(b"A", sent), (b"A2", sent), (b"B", sent), (b"A", m.Ack("d1", 1))])
    assert [o.stream for o in out if isinstance(o, Persist)] == ["@alice", "@bob"]
    # each party's stream numbers its own direct messages
    core.handle(b"B", signed(core, b"B", type="say", id="d2", text="hi", to="carol-x"), *at(T0))
    out = core.handle(b"B", signed(core, b"B", type="say", id="d3", text="yes?", to="alice"),
                      *at(T0))
    assert m.Ack("d3", 2) in replies(out, b"B")
    assert m.Message(2, wall(T0), "bob", "yes?", to="alice") in replies(out, b"A")
    # nobody reads another's direct messages
    (error,) = replies(core.handle(b"B", signed(core, b"B", type="fetch", after=0, until=9,
                                                stream="@alice"), *at(T0)))
    assert error.code == m.ErrorCode.NOT_IN_ROOM


def test_a_direct_message_to_someone_not_online_is_refused(core):
    join(core, b"A", "alice")
    join(core, b"Q", "qbot", quiet=True)  # quiet: not online for people
    for to in ["nobody", "qbot"]:
        (error,) = replies(core.handle(b"A", signed(core, b"A", type="say", id=to, text="x",
                                                    to=to), *at(T0)))
        assert error.code == m.ErrorCode.USER_OFFLINE and error.id == to


# --- several connections, quiet ones ----------------------------------------------------------


def test_a_second_connection_needs_the_first_ones_secret(core):
    join(core, b"A", "alice", secret="s1")
    for secret in [None, "other"]:
        extra = {"secret": secret} if secret else {}
        (error,) = replies(join(core, b"X", "Alice", **extra))
        assert error.code == m.ErrorCode.NAME_TAKEN
    (welcome,) = replies(join(core, b"A2", "ALICE", secret="s1"))
    assert welcome.name == "alice"
    # no secret at first: the name takes one connection only
    join(core, b"B", "bob")
    assert replies(join(core, b"B2", "bob", secret=""))[0].code == m.ErrorCode.NAME_TAKEN


def test_a_user_is_online_and_in_a_room_while_any_loud_connection_is(core):
    out = join(core, b"A", "alice", secret="s")
    out += join(core, b"A2", "alice", secret="s")
    out += join(core, b"A3", "alice", secret="s", quiet=True)
    assert [e for _, e in topics(out)] == [m.Presence(1, wall(T0), ["alice"], [], G)]  # once
    assert core.user_names() == ["alice"]
    out = handle(core, b"A", signed(core, b"A", type="bye"), *at(T0))
    assert topics(out) == [] and core.user_names() == ["alice"]
    out = handle(core, b"A2", signed(core, b"A2", type="bye"), *at(T0 + 1))
    assert [e for _, e in topics(out)] == [m.Presence(2, wall(T0 + 1), [], [["alice", "quit"]], G)]
    assert core.user_names() == [] and "alice" in core.by_name  # the quiet one still holds it


def test_a_quiet_connection_is_never_announced_or_listed_but_may_post(core):
    out = join(core, b"Q", "ci", quiet=True, rooms=["#ci"])
    assert topics(out) == [] and core.user_names() == []
    out = core.handle(b"Q", signed(core, b"Q", type="say", id="1", text="build 142 passed",
                                   room="#ci"), *at(T0))
    assert [e for _, e in topics(out)] == [m.Message(1, wall(T0), "ci", "build 142 passed",
                                                     "#ci")]
    assert topics(core.handle(b"Q", signed(core, b"Q", type="bye"), *at(T0))) == []


def test_all_connections_of_a_user_share_one_rate_limit():
    core = BrokerCore(BrokerConfig(rate=1, burst=2))
    join(core, b"A", "alice", secret="s")
    join(core, b"A2", "alice", secret="s")
    assert isinstance(replies(core.handle(b"A", signed(core, b"A", type="say", id="1", text="x"),
                                          *at(T0)))[0], m.Ack)
    assert isinstance(replies(core.handle(b"A2", signed(core, b"A2", type="say", id="2",
                                                        text="x"), *at(T0)))[0], m.Ack)
    (error,) = replies(core.handle(b"A2", signed(core, b"A2", type="say", id="3", text="x"),
                                   *at(T0)))
    assert error.code == m.ErrorCode.RATE_LIMITED


def test_all_histories_together_stay_within_the_byte_budget():
    budget = 200_000
    core = BrokerCore(BrokerConfig(history=1000, history_bytes=budget, rate=1e9, burst=10**9))
    join(core, b"A", "alice", rooms=["#general", "#a", "#b"])
    for i in range(300):
        for room in ["#general", "#a", "#b"]:
            core.handle(b"A", signed(core, b"A", type="say", id=f"{room}{i}", text="x" * 1000,
                                     room=room), *at(T0 + i))
    assert core.history_bytes <= budget
    assert core.history_bytes == sum(s.bytes for s in core.streams.values())
    # the largest histories gave up their oldest events: each keeps its newest
    for room in ["#general", "#a", "#b"]:
        stream = core.rooms[room].stream
        assert stream.history[-1].seq == stream.seq and len(stream.history) > 30


def test_a_room_named_twice_in_a_hello_is_entered_once(core):
    (welcome, *rest) = join(core, b"A", "alice", rooms=["#lab", "#general", "#LAB"])
    assert [r.room for r in welcome.message.rooms] == ["#lab", "#general"]
    assert core.rooms["#lab"].sessions == 1


def test_a_resend_is_acknowledged_again_even_after_a_part_or_the_addressee_left(core):
    join(core, b"A", "alice", rooms=["#general", "#ci"])
    join(core, b"B", "bob")
    say_ci = dict(type="say", id="r1", text="x", room="#ci")
    (ack,) = replies(core.handle(b"A", signed(core, b"A", **say_ci), *at(T0)))
    core.handle(b"A", signed(core, b"A", type="part", room="#ci"), *at(T0))
    assert replies(core.handle(b"A", signed(core, b"A", **say_ci), *at(T0))) == [ack]
    say_dm = dict(type="say", id="d1", text="x", to="bob")
    dm_ack = [r for r in replies(core.handle(b"A", signed(core, b"A", **say_dm), *at(T0), ),
                                 b"A") if isinstance(r, m.Ack)]
    core.handle(b"B", signed(core, b"B", type="bye"), *at(T0))
    assert replies(core.handle(b"A", signed(core, b"A", **say_dm), *at(T0))) == dm_ack


def test_a_message_to_a_room_and_a_person_at_once_is_malformed(core):
    join(core, b"A", "alice")
    (error,) = replies(core.handle(b"A", signed(core, b"A", type="say", id="1", text="x",
                                                room="#general", to="alice"), *at(T0)))
    assert error.code == m.ErrorCode.MALFORMED and error.id == "1"


def test_joins_parts_and_topics_cost_like_messages():
    core = BrokerCore(BrokerConfig(rate=1, burst=3))
    join(core, b"A", "alice")
    for i, body in enumerate([dict(type="join", room="#a"), dict(type="topic", room="#a",
                              text="t"), dict(type="part", room="#a")]):
        assert not isinstance(replies(core.handle(b"A", signed(core, b"A", **body),
                                                  *at(T0)))[0], m.Error)
    (error,) = replies(core.handle(b"A", signed(core, b"A", type="join", room="#b"), *at(T0)))
    assert error.code == m.ErrorCode.RATE_LIMITED and error.retry_after > 0
    assert "#b" not in core.rooms


def test_an_empty_secret_proves_nothing(core):
    join(core, b"A", "alice", secret="")
    assert replies(join(core, b"B", "alice", secret=""))[0].code == m.ErrorCode.NAME_TAKEN


def test_heartbeats_carry_seq_0_so_a_protocol_1_client_reaches_its_hello():
    assert json.loads(m.encode(m.Heartbeat("e", 1.0)))["seq"] == 0


# --- a write that fails (--db on a full disk) ------------------------------------


def consistent(core) -> None:
    """Every history's bytes are counted, and each room's members are its
    loud connections' users."""
    assert core.history_bytes == sum(s.bytes for s in core.streams.values())
    for key, room in core.rooms.items():
        inside = [s for s in core.sessions.values() if key in s.rooms]
        assert room.sessions == len(inside)
        assert set(room.members) == {s.user.name_key for s in inside if not s.quiet}


def test_a_failed_write_refuses_the_messages_and_rewinds_the_stream(core):
    join(core, b"A", "alice")  # seq 1, written
    say = lambda msg_id, now: core.handle(  # noqa: E731
        b"A", signed(core, b"A", type="say", id=msg_id, text=msg_id), *at(now))
    failed = say("m1", T0 + 1) + say("m2", T0 + 1)
    failed += core.handle(b"A", signed(core, b"A", type="fetch", after=0, until=3), *at(T0 + 1))
    failed += core.tick(*at(T0 + 1))  # a heartbeat, and #general's position: seq 3
    instead = core.persist_failed(failed)
    assert [type(e) for e in published(instead)] == [m.Heartbeat, m.Position]
    assert published(instead)[1] == m.Position(G, 1)
    refusals, history = replies(instead, b"A")[:2], replies(instead, b"A")[2]
    assert [(r.code, r.id) for r in refusals] == [(m.ErrorCode.UNAVAILABLE, "m1"),
                                                   (m.ErrorCode.UNAVAILABLE, "m2")]
    assert refusals[0].retry_after == 1.0
    assert [e.seq for e in history.events] == [1] and history.until == 1
    assert core.main.seq == 1 and [e.seq for e in core.main.history] == [1]
    consistent(core)
    # a later message waits for the refused one, so the order is kept
    assert replies(say("m2", T0 + 2))[0].code == m.ErrorCode.RATE_LIMITED
    out = say("m1", T0 + 2)
    assert replies(out) == [m.Ack("m1", 2)]
    assert published(out) == [m.Message(2, wall(T0 + 2), "alice", "m1", G)]


def test_a_direct_message_that_could_not_be_written_reaches_nobody(core):
    join(core, b"A", "alice")
    join(core, b"B", "bob")
    failed = core.handle(b"A", signed(core, b"A", type="say", id="d1", text="psst", to="bob"),
                         *at(T0))
    instead = core.persist_failed(failed)
    assert [(o.peer, o.message.code, o.message.id) for o in instead] == [
        (b"A", m.ErrorCode.UNAVAILABLE, "d1")]  # no delivery to bob, nor to alice's own
    assert core.streams["@alice"].seq == core.streams["@bob"].seq == 0
    consistent(core)
    core.handle(b"A", signed(core, b"A", type="ping"), *at(T0 + 2))  # later: written
    out = core.handle(b"A", signed(core, b"A", type="say", id="d1", text="psst", to="bob"),
                      *at(T0 + 2))
    assert m.Message(1, wall(T0 + 2), "alice", "psst", to="bob") in replies(out, b"B")


def test_a_failed_write_undoes_a_hello_and_keeps_a_leave_for_the_next_event(core):
    join(core, b"A", "alice", rooms=[G, "#lab"])
    failed = join(core, b"B", "bob", now=T0 + 1, rooms=[G, "#new"])
    failed += handle(core, b"A", signed(core, b"A", type="bye"), *at(T0 + 1))
    instead = core.persist_failed(failed)
    assert replies(instead, b"B")[0].code == m.ErrorCode.UNAVAILABLE
    assert not published(instead) and core.user_names() == [] and not core.sessions
    assert core.main.seq == 1 and "#new" not in core.rooms and not core.by_name
    consistent(core)
    # the leave is recorded before the room's next event (here, bob's join)
    out = join(core, b"B", "bob", now=T0 + 2)
    assert published(out) == [m.Presence(2, wall(T0 + 1), [], [["alice", m.LeaveReason.QUIT]], G),
                              m.Presence(3, wall(T0 + 2), ["bob"], [], G)]
    assert replies(out, b"B")[0].rooms == [m.Room(G, 1, "", 1)]  # alice's leave is his to see
    # and #lab's with the heartbeat
    assert published(core.tick(*at(T0 + 2)))[:1] == [
        m.Presence(2, wall(T0 + 1), [], [["alice", m.LeaveReason.QUIT]], "#lab")]


def test_a_second_connection_whose_hello_fails_leaves_the_first_as_it_was(core):
    join(core, b"A", "alice", secret="s")
    instead = core.persist_failed(join(core, b"A2", "alice", secret="s", rooms=[G, "#lab"]))
    assert [r.code for r in replies(instead)] == [m.ErrorCode.UNAVAILABLE]
    assert list(core.sessions) == [b"A"] and core.user_names() == ["alice"]
    assert "#lab" not in core.rooms and core.rooms[G].members == {"alice": ("alice", 1)}
    consistent(core)


def test_a_room_join_and_a_topic_that_could_not_be_written_are_refused_and_undone(core):
    join(core, b"A", "alice", rooms=[G, "#ci"])
    core.handle(b"A", signed(core, b"A", type="topic", room="#ci", text="old"), *at(T0))
    join(core, b"B", "bob", secret="s")
    join(core, b"B2", "bob", secret="s")
    failed = core.handle(b"B", signed(core, b"B", type="join", room="#ci"), *at(T0 + 1))
    failed += core.handle(b"B2", signed(core, b"B2", type="join", room="#ci"), *at(T0 + 1))
    failed += core.handle(b"A", signed(core, b"A", type="topic", room="#ci", text="new"),
                          *at(T0 + 1))
    failed += core.handle(b"X", frame(type="rooms"), *at(T0 + 1))
    instead = core.persist_failed(failed)
    for peer in (b"B", b"B2", b"A"):  # both of bob's connections entered with the one join
        assert [r.code for r in replies(instead, peer)] == [m.ErrorCode.UNAVAILABLE]
    (listing,) = replies(instead, b"X")
    assert m.Room("#ci", 2, "old", 1) in listing.rooms  # what is stored, not what was undone
    assert core.rooms["#ci"].topic == "old" and set(core.rooms["#ci"].members) == {"alice"}
    assert not any("#ci" in s.rooms for s in core.by_name["bob"].sessions)
    consistent(core)


def test_a_part_whose_leave_could_not_be_written_stays_parted(core):
    join(core, b"A", "alice", rooms=[G, "#ci"])
    out = core.persist_failed(handle(core, b"A", signed(core, b"A", type="part", room="#ci"),
                                          *at(T0 + 1)))
    assert replies(out) == [m.Parted("#ci")] and not published(out)
    assert "#ci" not in core.sessions[b"A"].rooms and not core.rooms["#ci"].members
    out = handle(core, b"A", signed(core, b"A", type="join", room="#ci"), *at(T0 + 2))
    assert published(out) == [m.Presence(2, wall(T0 + 1), [], [["alice", m.LeaveReason.PART]], "#ci"),
                              m.Presence(3, wall(T0 + 2), ["alice"], [], "#ci")]


def test_a_join_and_leave_both_unwritten_leave_nothing_to_record(core):
    join(core, b"A", "alice")
    failed = core.handle(b"A", signed(core, b"A", type="join", room="#x"), *at(T0))
    failed += core.handle(b"A", signed(core, b"A", type="part", room="#x"), *at(T0))
    core.persist_failed(failed)
    assert not core.unrecorded_leaves and "#x" not in core.rooms
    consistent(core)


def test_a_leave_that_could_not_be_written_is_tried_again_with_the_heartbeat(core):
    join(core, b"A", "alice")
    core.tick(*at(T0))
    core.persist_failed(handle(core, b"A", signed(core, b"A", type="bye"), *at(T0 + 0.5)))
    assert not published(core.tick(*at(T0 + 0.9)))
    assert published(core.tick(*at(T0 + 1.0)))[:1] == [
        m.Presence(2, wall(T0 + 0.5), [], [["alice", m.LeaveReason.QUIT]], G)]


# --- presence that scales ----------------------------------------------------------


def hello_pass(core, names, now=T0, rooms=None):
    """Hellos of ``names`` (peer = the name's bytes) in one pass, without its end."""
    out = []
    for name in names:
        extra = {} if rooms is None else {"rooms": rooms}
        out += core.handle(name.encode(), frame(type="hello", name=name, **extra), *at(now))
    return out


def presence(outputs) -> list:
    return [e for e in published(outputs) if isinstance(e, (m.Presence, m.Members))]


def test_the_joins_and_leaves_of_one_pass_are_one_presence_event_per_room():
    core = BrokerCore(BrokerConfig(max_users=20))
    out = hello_pass(core, ["ann", "Bob", "cy"], rooms=[G, "#lab"])
    assert not presence(out)  # announced when the pass ends
    assert [w.rooms for w in replies(out)] == [[m.Room(G, 0, "", n), m.Room("#lab", 0, "", n)]
                                               for n in (1, 2, 3)]
    out = core.flush_presence(wall(T0))
    assert presence(out) == [m.Presence(1, wall(T0), ["ann", "Bob", "cy"], [], G),
                             m.Presence(1, wall(T0), ["ann", "Bob", "cy"], [], "#lab")]
    assert [type(o) for o in out] == [Persist, Publish, Persist, Publish]
    # one pass: one leaves, one joins, one comes and goes, one parts a room
    out = core.handle(b"ann", signed(core, b"ann", type="bye"), *at(T0 + 1))
    out += hello_pass(core, ["dan", "eve"], T0 + 1)
    out += core.handle(b"eve", signed(core, b"eve", type="bye"), *at(T0 + 1))
    out += core.handle(b"cy", signed(core, b"cy", type="part", room="#lab"), *at(T0 + 1))
    out += core.flush_presence(wall(T0 + 1))
    assert presence(out) == [m.Presence(2, wall(T0 + 1), ["dan"], [["ann", "quit"]], G),
                             m.Presence(2, wall(T0 + 1), [], [["ann", "quit"], ["cy", "part"]],
                                        "#lab")]
    assert core.flush_presence(wall(T0 + 1)) == []


def test_joins_of_a_pass_are_announced_before_what_the_joined_say():
    core = BrokerCore(BrokerConfig(max_users=20))
    out = hello_pass(core, ["ann"])
    out += core.handle(b"ann", signed(core, b"ann", type="say", id="1", text="hi"), *at(T0))
    assert [e.seq for e in published(out)] == [1, 2]
    assert isinstance(published(out)[0], m.Presence) and replies(out)[-1] == m.Ack("1", 2)
    assert core.flush_presence(wall(T0)) == []


def test_a_room_above_the_threshold_publishes_its_count_at_most_once_per_interval():
    core = BrokerCore(BrokerConfig(max_users=20, presence_threshold=3, heartbeat_liveness=100))
    core.tick(*at(T0))
    out = hello_pass(core, ["a1", "a2", "a3"]) + core.tick(*at(T0))
    assert presence(out) == [m.Presence(1, wall(T0), ["a1", "a2", "a3"], [], G)]
    # a fourth: above the threshold, nobody is named; the count goes at once
    out = hello_pass(core, ["a4"], T0 + 0.2) + core.tick(*at(T0 + 0.2))
    assert presence(out) == [m.Members(G, 4)]
    assert Publish(m.Members(G, 4), m.room_topic(G)) in out
    assert replies(out)[0].rooms == [m.Room(G, 1, "", 4)]  # the welcome counts, as ever
    # then at most once per interval, and only when it changed
    out = hello_pass(core, ["a5"], T0 + 0.5) + core.tick(*at(T0 + 0.5))
    out += hello_pass(core, ["a6"], T0 + 0.7) + core.tick(*at(T0 + 0.7))
    assert presence(out) == [] and core.next_deadline() <= T0 + 1.2
    out = core.tick(*at(T0 + 1.2))
    assert presence(out) == [m.Members(G, 6)]
    core.handle(b"a6", signed(core, b"a6", type="bye"), *at(T0 + 1.3))
    hello_pass(core, ["a7"], T0 + 1.4)
    assert presence(core.tick(*at(T0 + 1.4)) + core.tick(*at(T0 + 2.5))) == []  # still 6
    assert core.main.seq == 1
    # back at the threshold: the count (what was not announced), then each change again
    for name in ("a7", "a5", "a4"):
        core.handle(name.encode(), signed(core, name.encode(), type="bye"), *at(T0 + 2.6))
    assert presence(core.tick(*at(T0 + 2.6))) == [m.Members(G, 3)]
    out = core.handle(b"a3", signed(core, b"a3", type="bye"), *at(T0 + 2.7))
    out += core.tick(*at(T0 + 2.7)) + core.tick(*at(T0 + 4.0))
    assert presence(out) == [m.Presence(2, wall(T0 + 2.7), [], [["a3", "quit"]], G)]


def test_who_pages_through_everyone_in_pages_bounded_in_bytes():
    core = BrokerCore(BrokerConfig(max_users=2000, presence_threshold=5))
    names = [f"u{i:04d}-" + "x" * 26 for i in range(1200)]
    hello_pass(core, names, rooms=["#big"])
    core.flush_presence(wall(T0))
    for room in ("#big", None):
        pages, after = [], None
        while True:
            (page,) = replies(core.handle(b"Q", frame(type="who", room=room, after=after),
                                          *at(T0)))
            assert page.count == 1200 and page.room == room and page.users
            assert len(m.encode(page)) <= m.WHO_PAGE_BYTES + 100
            pages.append(page.users)
            if page.next is None:
                break
            after = page.next
        assert len(pages) > 1 and sum(pages, []) == names
    # a cursor past the end lists nobody; an unknown room nobody
    (page,) = replies(core.handle(b"Q", frame(type="who", room="#big", after="zzz"), *at(T0)))
    assert (page.users, page.count, page.next) == ([], 1200, None)
    (page,) = replies(core.handle(b"Q", frame(type="who", room="#none"), *at(T0)))
    assert (page.users, page.count, page.room) == ([], 0, "#none")


def test_the_welcome_costs_the_same_however_many_are_online():
    core = BrokerCore(BrokerConfig(max_users=600))
    hello_pass(core, [f"u{i}" for i in range(500)])
    (welcome,) = replies(hello_pass(core, ["late"]))
    assert welcome.online == 501 and len(m.encode(welcome)) < 400


def test_a_ping_in_its_own_form_is_a_heartbeat_without_decoding_and_others_still_count(core):
    (welcome,) = replies(join(core, b"A", "alice"))
    join(core, b"B", "bob", now=T0 + 1)
    assert list(core.sessions) == [b"A", b"B"]
    assert core.handle(b"A", [m.encode(m.Ping(welcome.resume))], *at(T0 + 2)) == []
    assert list(core.sessions) == [b"B", b"A"] and core.sessions[b"A"].last_seen == T0 + 2
    spaced = json.dumps({"type": "ping", "session": welcome.resume}).encode()  # another form
    assert core.handle(b"A", [spaced], *at(T0 + 3)) == [] and core.sessions[b"A"].last_seen == T0 + 3
    # a ping with another token is no heartbeat: not_joined, as before
    out = core.handle(b"A", [m.encode(m.Ping("f" * 32))], *at(T0 + 4))
    assert replies(out)[0].code == m.ErrorCode.NOT_JOINED and core.sessions[b"A"].last_seen == T0 + 3
