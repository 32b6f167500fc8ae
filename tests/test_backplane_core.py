"""The backplane's ordering without I/O: backplane_core.Follower, and the
core's side of the seam (BrokerCore.handed_over and receive)."""

import pytest

import messages as m
from backplane_core import Follower, Repair, Shared
from broker_core import BrokerCore, Persist, Publish, Reply
from broker_outputs import Follow


def shared(seq: int, stream: str = "#general") -> Shared:
    return Shared(stream, m.Message(seq, 0.0, "al", f"t{seq}", stream))


def seqs(items) -> list[int]:
    return [s.event.seq for s in items]


def test_events_in_order_pass_at_once():
    f = Follower()
    assert [seqs(f.receive(shared(n))[0]) for n in (1, 2, 3)] == [[1], [2], [3]]


def test_an_event_ahead_of_a_hole_is_held_and_the_hole_asked_for_once():
    f = Follower()
    assert f.receive(shared(1))[0]
    ready, repairs = f.receive(shared(4))
    assert ready == [] and repairs == [Repair("#general", 1, 3)]
    assert f.receive(shared(5)) == ([], [])  # the same hole: not asked again
    ready, _ = f.receive(shared(2))
    assert seqs(ready) == [2]
    ready, _ = f.receive(shared(3))
    assert seqs(ready) == [3, 4, 5]


def test_a_repeat_passes_nothing():
    f = Follower()
    f.receive(shared(1))
    assert f.receive(shared(1)) == ([], [])


def test_a_hole_still_open_after_a_repair_is_asked_for_again():
    f = Follower()
    f.receive(shared(3))
    f.repaired("#general")
    assert f.behind("#general", 3) == [Repair("#general", 0, 3)]


def test_a_stream_loaded_at_start_continues_there():
    f = Follower()
    f.start_at("#a", 10)
    assert f.receive(shared(10, "#a")) == ([], [])
    assert seqs(f.receive(shared(11, "#a"))[0]) == [11]
    assert f.behind("#a", 11) == [] and f.behind("#a", 13) == [Repair("#a", 11, 13)]


def test_events_trimmed_from_redis_are_jumped_over():
    f = Follower()
    f.jump_to("#a", 40)
    assert seqs(f.receive(shared(40, "#a"))[0]) == [40]


def test_streams_are_independent():
    f = Follower()
    f.receive(shared(2, "#a"))
    assert seqs(f.receive(shared(1, "#b"))[0]) == [1]


def hello(core, peer, name, now=0.0):
    return core.handle(peer, [m.encode(m.Hello(name, m.PROTOCOL_VERSION))], now, 100.0)


def test_handed_over_drops_the_local_numbering_and_acks_with_the_shared_seq():
    core = BrokerCore()
    welcome = next(o.message for o in hello(core, b"p", "al") if isinstance(o, Reply))
    joined = hello(core, b"q", "bo")
    out = core.handle(b"p", [m.encode(m.Say("x", "hi", session=welcome.resume))], 0.0, 100.0)
    records = [o for o in joined + out if isinstance(o, Persist)]
    out = core.handed_over([*records, *[o for o in out if not isinstance(o, Persist)]],
                           {id(r.event): 40 + n for n, r in enumerate(records)})
    assert not any(isinstance(o, (Persist, Publish)) for o in out)
    assert [o.message for o in out if isinstance(o.message, m.Ack)] == [m.Ack("x", 41)]
    # the pass's presence (al and bo) and the message: both come back through receive
    assert [r.event.seq for r in records] == [1, 2] and core.main.seq == 0


def test_a_received_event_is_published_in_its_room_and_remembered():
    core = BrokerCore()
    event = m.Message(1, 0.0, "al", "hi", "#Lab")
    out = core.receive("#lab", event, ("al", "x"))
    assert out == [Publish(event, m.room_topic("#lab"))]
    assert core.rooms["#lab"].name == "#Lab" and core.streams["#lab"].accepted_seq(("al", "x")) == 1


def test_a_received_direct_message_goes_to_the_users_sessions_here_only():
    core = BrokerCore()
    hello(core, b"p", "bo")
    event = m.Message(1, 0.0, "al", "psst", to="bo")
    assert core.receive("@bo", event, None) == [Reply(b"p", event)]
    assert core.receive("@cy", m.Message(1, 0.0, "al", "psst", to="cy"), None) == []


def test_a_name_taken_on_another_broker_undoes_the_hello_and_refuses_it():
    core = BrokerCore()
    out = hello(core, b"p", "Al")
    records = [o for o in out if isinstance(o, Persist)]
    out = core.handed_over(out, {id(r.event): 0 for r in records}, frozenset({"al"}))
    assert [o.message.code for o in out if isinstance(o, Reply)] == [m.ErrorCode.NAME_TAKEN]
    assert "al" not in core.by_name and b"p" not in core.sessions
    assert core.general.members == {}


def test_a_direct_message_to_someone_online_elsewhere_is_numbered_in_both_streams():
    core = BrokerCore(elsewhere={"bo": "Bo"})
    welcome = next(o.message for o in hello(core, b"p", "al") if isinstance(o, Reply))
    out = core.handle(b"p", [m.encode(m.Say("x", "psst", to="bo", session=welcome.resume))],
                      0.0, 100.0)
    assert [(o.stream, o.event.to) for o in out if isinstance(o, Persist)] == [
        ("@al", "Bo"), ("@bo", "Bo")]
    assert core.user_names() == ["al", "Bo"]


def test_a_received_presence_names_who_is_in_the_room_on_any_broker():
    core = BrokerCore(elsewhere={})
    core.general.share({})
    core.receive("#general", m.Presence(1, 0.0, ["Al", "bo"], [], "#general"), None)
    core.receive("#general", m.Presence(2, 0.0, ["cy"], [["bo", "quit"]], "#general"), None)
    assert core.general.info().members == 2
    page = core.handle(b"x", [m.encode(m.Who("#general"))], 0.0, 100.0)[0].message
    assert page.users == ["Al", "cy"] and page.count == 2


def test_a_big_rooms_count_change_publishes_its_count_once_per_interval():
    core = BrokerCore(elsewhere={})
    core.general.share({})
    core.counted("#general", "#general", [("al", "Al"), ("bo", "Bo")], [])
    out = core.tick(5.0, 100.0)
    assert [o.event for o in out if isinstance(o.event, m.Members)] == [m.Members("#general", 2)]
    core.counted("#general", "#general", [], ["al"])
    assert not [o for o in core.tick(5.1, 100.0) if isinstance(o.event, m.Members)]
    # back at the threshold: a stored presence event follows, the count goes first
    out = core.receive("#general", m.Presence(1, 0.0, [], [["Bo", "quit"]], "#general"), None)
    assert [o.event for o in out] == [m.Members("#general", 1), out[-1].event]
    assert core.general.count() == 0


def test_who_pages_through_everyone_online_on_every_broker():
    elsewhere = {f"user{i:05d}-elsewhere": f"User{i:05d}-elsewhere" for i in range(2000)}
    core = BrokerCore(elsewhere=dict(elsewhere), presence_log=[])
    hello(core, b"p", "al")
    hello(core, b"q", "user01000-elsewhere")  # on both brokers: listed once
    pages, after = [], None
    while True:
        page = core.handle(b"x", [m.encode(m.Who(after=after))], 0.0, 100.0)[0].message
        pages.append(page)
        if page.next is None:
            break
        after = page.next
    names = [n for page in pages for n in page.users]
    assert len(pages) > 1 and all(page.count == 2001 for page in pages)
    assert names == sorted(names, key=m.name_key) and len(set(names)) == 2001
    welcome = next(o.message for o in hello(core, b"r", "cy") if isinstance(o, Reply))
    assert welcome.online == 2002


def test_answers_in_the_pass_of_a_new_event_never_show_its_local_number():
    """A fetch or a position in the pass that numbered a message here tells
    only of the shared stream: the local number is provisional (Redis gives
    another, and another broker's event may be the shared one at it), so a
    reader given it would see a different event at that seq than the others."""
    core = BrokerCore(elsewhere={})
    al = next(o.message for o in hello(core, b"p", "al") if isinstance(o, Reply))
    bo = next(o.message for o in hello(core, b"q", "bo") if isinstance(o, Reply))
    records = [o for o in core.tick(1.0, 100.0) if isinstance(o, Persist)]
    core.handed_over(records, {id(r.event): 1 for r in records})
    core.receive("#general", m.Presence(1, 0.0, ["al", "bo"], [], "#general"), None)
    out = core.handle(b"p", [m.encode(m.Say("x", "mine", session=al.resume))], 2.0, 100.0)
    out += core.handle(b"q", [m.encode(m.Fetch(1, 5, session=bo.resume))], 2.0, 100.0)
    out += core.tick(60.0, 100.0)  # a heartbeat: positions announced
    seqs = {id(o.event): 3 for o in out if isinstance(o, Persist)}  # another's message is 2
    assert seqs
    out = core.handed_over(out, seqs)
    history = next(o.message for o in out if isinstance(o, Reply)
                   and isinstance(o.message, m.History))
    assert history.events == [] and history.until == 1
    positions = [o.event for o in out if isinstance(o, Publish)
                 and isinstance(o.event, m.Position)]
    assert positions and all(p.seq <= 1 for p in positions)


# --- following only what the clients here need ------------------------------------------


def following_core() -> BrokerCore:
    """A core as the backplane starts it: nothing followed yet."""
    core = BrokerCore(elsewhere={}, presence_log=[], following=set())
    core.general.share({})
    return core


def test_a_hello_that_needs_streams_not_followed_asks_for_them_and_changes_nothing():
    core = following_core()
    assert hello(core, b"p", "Al") == [Follow(("#general", "@al"))]
    assert not core.sessions and not core.by_name and not core.general.members
    core.followed("#general", [m.Message(n, 0.0, "x", f"t{n}", "#general") for n in (7, 8)],
                  [(("x", "8"), 8)], 8, {"bo": "Bo"})
    core.followed("@al", [], [], 0, None)
    welcome = next(o.message for o in hello(core, b"p", "Al") if isinstance(o, Reply))
    assert welcome.rooms[0].seq == 8 and welcome.rooms[0].members == 1  # bo, before al's join
    assert core.general.stream.accepted_seq(("x", "8")) == 8
    join = core.handle(b"p", [m.encode(m.JoinRoom("#lab", welcome.resume))], 0.0, 100.0)
    assert join == [Follow(("#lab",))]


def test_streams_nobody_here_needs_are_noted_and_unfollowing_frees_their_history():
    core = following_core()
    core.followed("#general", [m.Message(1, 0.0, "x", "t", "#general")], [], 1, {})
    core.followed("@al", [m.Message(1, 0.0, "al", "t", to="bo")], [], 1, None)
    welcome = next(o.message for o in hello(core, b"p", "al") if isinstance(o, Reply))
    assert core.wants("#general") and core.wants("@al") and core.history_bytes > 0
    core.handle(b"p", [m.encode(m.Bye(welcome.resume))], 0.0, 100.0)
    assert {"#general", "@al"} <= core.unwanted
    assert not core.wants("#general") and not core.wants("@al")
    core.unfollowed("#general")
    core.unfollowed("@al")
    assert core.history_bytes == 0 and "@al" not in core.streams
    assert core.general.stream.seq == 1 and not core.following


def test_a_subscription_to_a_rooms_exact_topic_follows_the_room():
    core = following_core()
    assert core.subscribed(m.room_topic("#lab"), True) == "#lab"
    assert core.wants("#lab")
    assert core.subscribed(b"r:", True) is None  # a prefix of every room: follows none
    assert core.subscribed(b"r:#Lab\0", True) is None  # not a room key
    assert core.subscribed(m.HEARTBEAT_TOPIC, True) is None
    core.subscribed(m.room_topic("#lab"), False)
    assert not core.wants("#lab") and "#lab" in core.unwanted


def test_a_room_not_followed_is_listed_with_its_members_and_topic_from_the_shared_channel():
    core = following_core()
    core.room_changed("#lab", "#Lab", [("ann", "Ann"), ("bo", "Bo")], [], 5)
    core.room_changed("#lab", "#Lab", [], ["bo"], 6)
    core.topic_changed("#lab", "#Lab", "hi", 7)
    listed = core.handle(b"z", [m.encode(m.ListRooms())], 0.0, 100.0)[0].message.rooms
    assert m.Room("#Lab", 7, "hi", 1) in listed
    core.followed("#lab", [], [], 7, {"ann": "Ann"})
    core.topic_changed("#lab", "#Lab", "ignored: the room's events say it", 8)
    assert core.rooms["#lab"].topic == "hi"


def al_writes_to_bo_elsewhere() -> tuple[BrokerCore, list]:
    """A following core where al (here) says "psst" to bo (on another
    broker): the core and the outputs of that pass."""
    core = following_core()
    core.elsewhere["bo"] = "Bo"
    core.followed("#general", [], [], 0, {})
    core.followed("@al", [], [], 0, None)
    welcome = next(o.message for o in hello(core, b"p", "al") if isinstance(o, Reply))
    out = core.handle(b"p", [m.encode(m.Say("x", "psst", to="bo", session=welcome.resume))],
                      0.0, 100.0)
    return core, out


def test_a_direct_message_to_someone_elsewhere_leaves_no_stream_behind():
    core, out = al_writes_to_bo_elsewhere()
    records = [o for o in out if isinstance(o, Persist)]
    core.handed_over(out, {id(r.event): 3 for r in records})
    assert "@bo" not in core.streams and "@al" in core.streams


def test_a_stream_followed_in_the_pass_of_a_direct_message_to_it_keeps_what_it_loaded():
    """A message to bo (elsewhere) is numbered here for the pass, then bo's
    hello (or resume) in the same pass makes this broker follow @bo: the
    rewind after Redis numbered the message goes back to what was loaded,
    not to before the pass's own message."""
    core, out = al_writes_to_bo_elsewhere()
    core.followed("@bo", [m.Message(n, 0.0, "zed", f"t{n}", to="bo") for n in range(1, 6)],
                  [], 5, None)
    records = [o for o in out if isinstance(o, Persist)]
    core.handed_over(out, {id(r.event): 6 for r in records})
    bo = core.streams["@bo"]
    assert bo.seq == 5 and [e.seq for e in bo.history] == [1, 2, 3, 4, 5]
    core.receive("@bo", m.Message(6, 0.0, "al", "psst", to="bo"), ("al", "x"))
    assert bo.seq == 6 and [e.seq for e in bo.history] == [1, 2, 3, 4, 5, 6]


# --- sessions kept in Redis: a session of another broker taken over ------------------------

from broker_backplane import SessionRecord, secret_digest  # noqa: E402
from broker_core import FindSession  # noqa: E402

TOKEN = "5f0c1e9a7b3d2c4e8a6f0b1d3e5c7a9b"
SECRET = "s" * 20


def shared_core() -> BrokerCore:
    """A core as the backplane sets it up."""
    core = BrokerCore(elsewhere={}, presence_log=[], session_log={})
    core.general.share({})
    return core


def resuming_hello(core, peer=b"p", name="al", secret=SECRET, token=TOKEN, rooms=None):
    hello = m.Hello(name, m.PROTOCOL_VERSION, resume=token, secret=secret, rooms=rooms)
    return core.handle(peer, [m.encode(hello)], 0.0, 100.0)


def record(name_key="al", secret=SECRET, rooms=("#general", "#Lab"), quiet=False):
    return SessionRecord(name_key, secret_digest(False, secret), quiet, rooms, "deadbeef")


def welcome_of(out) -> m.Welcome:
    return next(o.message for o in out if isinstance(o, Reply))


def test_an_unknown_token_is_looked_up_with_a_backplane_and_ignored_without():
    core = shared_core()
    out = resuming_hello(core)
    assert [type(o) for o in out] == [FindSession] and out[0].hello.resume == TOKEN
    assert b"p" not in core.sessions  # nothing happens before the record is read
    alone = BrokerCore()
    assert welcome_of(resuming_hello(alone)).resumed is False


def test_a_found_session_is_taken_over_with_its_token_rooms_and_quiet_flag():
    core = shared_core()
    find = resuming_hello(core, rooms=["#general"])[0]
    out = core.session_found(find, record(rooms=("#general", "#Lab", "bad room")))
    welcome = welcome_of(out)
    assert welcome.resumed and welcome.resume == TOKEN
    assert [r.room for r in welcome.rooms] == ["#general", "#Lab"]  # the record's, valid ones
    session = core.sessions[b"p"]
    assert session.adopted is welcome and core.session_log == {TOKEN: session}
    # its entries go to the backplane like any, which announces none (the
    # user is still in those rooms through the dead broker)
    presence = [o.event for o in core.flush_presence(100.0) if isinstance(o, Persist)]
    assert sorted(p.room for p in presence) == ["#Lab", "#general"]
    # the token is the session's from now on
    ping = core.handle(b"p", [m.encode(m.Ping(session=TOKEN))], 1.0, 100.0)
    assert ping == [] and core.sessions[b"p"].last_seen == 1.0
    quiet = shared_core()
    session_found_quiet = quiet.session_found(resuming_hello(quiet)[0], record(quiet=True))
    assert welcome_of(session_found_quiet).resumed and quiet.sessions[b"p"].quiet
    assert quiet.online_listed() == []


@pytest.mark.parametrize("found", [None, record(name_key="bo"), record(secret="x" * 20)])
def test_no_record_or_anothers_gives_a_new_session_in_the_hellos_rooms(found):
    core = shared_core()
    out = core.session_found(resuming_hello(core, rooms=["#a"])[0], found)
    welcome = welcome_of(out)
    assert not welcome.resumed and welcome.resume != TOKEN
    assert [r.room for r in welcome.rooms] == ["#a"]
    assert core.sessions[b"p"].adopted is None


def test_a_secretless_session_is_taken_over_by_its_token():
    core = shared_core()
    out = core.session_found(resuming_hello(core, secret=None)[0], record(secret=None))
    assert welcome_of(out).resumed


def test_a_lookup_that_fails_refuses_the_hello_unavailable():
    core = shared_core()
    out = core.session_lookup_failed(resuming_hello(core)[0])
    assert welcome_of(out).code == m.ErrorCode.UNAVAILABLE and b"p" not in core.sessions


def test_a_taken_over_session_whose_pass_is_not_stored_is_undone():
    core = shared_core()
    out = core.session_found(resuming_hello(core)[0], record())
    out += core.flush_presence(100.0)
    out = core.persist_failed(out)
    assert [welcome_of(out).code] == [m.ErrorCode.UNAVAILABLE]
    assert b"p" not in core.sessions and "al" not in core.by_name
    # but a session resumed here is not undone by a failing pass
    core.session_found(resuming_hello(core)[0], record())
    core.handed_over(core.flush_presence(100.0), {})
    out = resuming_hello(core, peer=b"q")  # the same token from a new connection: here
    assert welcome_of(out).resumed
    out = core.persist_failed(out + core.handle(b"q", [m.encode(m.Say(
        "x", "hi", session=TOKEN))], 0.0, 100.0))
    assert b"q" in core.sessions


def test_the_session_log_names_each_session_whose_record_changed():
    core = shared_core()
    welcome = welcome_of(hello(core, b"p", "al"))
    session = core.sessions[b"p"]
    assert core.session_log == {welcome.resume: session}
    core.session_log.clear()
    core.handle(b"p", [m.encode(m.JoinRoom("#lab", session=welcome.resume))], 0.0, 100.0)
    assert core.session_log == {welcome.resume: session}
    core.session_log.clear()
    core.handle(b"p", [m.encode(m.Bye(session=welcome.resume))], 0.0, 100.0)
    assert core.session_log == {welcome.resume: session} and b"p" not in core.sessions
    assert BrokerCore().session_log is None  # without a backplane: nothing kept


# --- both: a session of another broker taken over into streams not followed here --------


def test_a_found_session_asks_to_follow_its_records_rooms_then_is_taken_over():
    core = BrokerCore(elsewhere={}, presence_log=[], session_log={}, following=set())
    core.general.share({})
    find = resuming_hello(core, rooms=["#general"])[0]
    assert type(find) is FindSession  # the lookup comes before any following
    found = record(rooms=("#general", "#Lab"))
    assert core.session_found(find, found) == [Follow(("#general", "#lab", "@al"))]
    assert b"p" not in core.sessions and not core.session_log  # nothing changed
    core.followed("#general", [], [], 4, {})
    core.followed("#lab", [m.Message(n, 0.0, "x", f"t{n}", "#Lab") for n in (8, 9)],
                  [], 9, {"al": "al"})  # al is in it through the dead broker
    core.followed("@al", [], [], 0, None)
    welcome = welcome_of(core.session_found(find, found))  # the same record again
    assert welcome.resumed and welcome.resume == TOKEN
    assert [(r.room, r.seq) for r in welcome.rooms] == [("#general", 4), ("#Lab", 9)]
    assert core.sessions[b"p"].adopted is welcome and TOKEN in core.session_log
    assert core.wants("#lab") and core.wants("@al")
