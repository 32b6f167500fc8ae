"""The client core with no sockets: phases, transitions, delivery, outbox, liveness.

ClientCore is driven here exactly as client_session's worker drives it:
frames in, the monotonic time, actions and events out. ``Loopback`` joins it
to a real BrokerCore in memory, as the sockets would, so that what the two
cores say to each other is the real protocol.
"""

from __future__ import annotations

import pytest

import messages as m
from broker_core import BrokerConfig, BrokerCore, Publish, Reply
from client_core import (GHOST_PATIENCES, RECONNECT_DELAY_FIRST, RECONNECT_DELAY_MAX,
                         SEND_RETRY_S, SEND_WINDOW, RoomJoined,
                         TRANSITIONS, READY, SEQUENCED, Acked, Action, ClientCore, Connect,
                         Disconnect, Joined, JoinRefused, Phase, Refused, Request, State,
                         StateChanged, Subscribe, Unsubscribe)
from client_stream import Earlier, Missed

T0 = 500.0
WALL = 1_700_000_000.0
EPOCH = "e1"
G = m.GENERAL_ROOM


def requests(out) -> list:
    return [o.message for o in out if isinstance(o, Request)]


def events(out) -> list:
    return [o for o in out if not isinstance(o, Action)]


def reply(msg) -> list[bytes]:
    return [m.encode(msg)]


def broadcast(events_, topic: bytes = m.BROADCAST_TOPIC) -> list[bytes]:
    return [topic, m.join_events([m.encode(e) for e in events_])]


def welcome(seq: int = 0, epoch: str = EPOCH, token: str = "tok", resumed: bool = False,
            name: str = "ann", dm_seq: int = 0) -> m.Welcome:
    return m.Welcome(name, epoch, 1, token, 1.0, 3, 100, [m.Room(G, seq, "", 1)], dm_seq,
                     resumed)


def msg(seq: int, text: str = "hi", sender: str = "bob") -> m.Message:
    return m.Message(seq, WALL, sender, text, G)


def hello(name: str = "ann", resume: str | None = None) -> m.Hello:
    return m.Hello(name, resume=resume, rooms=[G])


def ready_topic(out) -> bytes:
    (connect,) = [o for o in out if isinstance(o, Connect)]
    (topic,) = [t for t in connect.topics if t.startswith(m.READY_TOPIC_PREFIX)]
    return topic


def joined(recent: int = 0, seq: int = 0, now: float = T0) -> ClientCore:
    """A core that has connected, proved its subscription and been welcomed."""
    core = ClientCore("ann", recent)
    topic = ready_topic(core.start(now))
    out = core.receive_broadcast(broadcast([m.Heartbeat(EPOCH, WALL)], topic), now)
    assert requests(out) == [hello()]
    core.receive_reply(reply(welcome(seq)), now)
    assert core.phase is Phase.JOINED
    return core


# --- phases and transitions -----------------------------------------------------


def test_start_opens_sockets_subscribed_to_the_stream_and_a_private_ready_topic():
    core = ClientCore("ann")
    out = core.start(T0)
    (connect,) = out
    assert m.BROADCAST_TOPIC in connect.topics and ready_topic(out)
    assert core.phase is Phase.PROBING


def test_the_ready_heartbeat_leads_to_hello_and_the_welcome_to_joined():
    core = ClientCore("ann")
    topic = ready_topic(core.start(T0))
    # a heartbeat on the stream's topic proves nothing about our subscription
    assert core.receive_broadcast(broadcast([m.Heartbeat(EPOCH, WALL)]), T0) == []
    out = core.receive_broadcast(broadcast([m.Heartbeat(EPOCH, WALL)], topic), T0)
    assert Unsubscribe(topic) in out and requests(out) == [hello()]
    assert core.phase is Phase.HELLO
    out = core.receive_reply(reply(welcome(seq=4)), T0)
    # the broker's limit on a text goes to the caller too, to check what is typed
    assert events(out) == [Joined("ann", 1, False, False, (m.Room(G, 4, "", 1),), max_text=100),
                           StateChanged(State.CONNECTED, "joined as ann")]
    assert core.phase is Phase.JOINED and core.streams[G].last_seq == 4


def test_a_refused_name_waits_for_another_and_tries_it():
    core = ClientCore("ann")
    topic = ready_topic(core.start(T0))
    core.receive_broadcast(broadcast([m.Heartbeat(EPOCH, WALL)], topic), T0)
    out = core.receive_reply(reply(m.Error(m.ErrorCode.NAME_TAKEN, "taken")), T0)
    assert events(out) == [JoinRefused(m.ErrorCode.NAME_TAKEN, "taken")]
    assert core.phase is Phase.REFUSED
    assert requests(core.join("ann2", T0 + 1)) == [hello("ann2")]
    assert core.phase is Phase.HELLO


# One example of every kind of input, to try in every phase.
INPUTS = {
    READY: lambda core: ("sub", [core.ready_topic or b"ready:x",
                                 m.join_events([m.encode(m.Heartbeat(EPOCH, WALL))])]),
    SEQUENCED: lambda core: ("sub", broadcast([msg(1)])),
    m.Heartbeat: lambda core: ("sub", broadcast([m.Heartbeat(EPOCH, WALL)])),
    m.Shutdown: lambda core: ("sub", broadcast([m.Shutdown(WALL)])),
    m.Welcome: lambda core: ("dealer", reply(welcome())),
    m.Error: lambda core: ("dealer", reply(m.Error(m.ErrorCode.NAME_TAKEN, "taken"))),
    m.Ack: lambda core: ("dealer", reply(m.Ack("x", 1))),
    m.Users: lambda core: ("dealer", reply(m.Users(["ann"]))),
    m.History: lambda core: ("dealer", reply(m.History([], 1, 0, stream=G))),
}


def core_in(phase: Phase) -> ClientCore:
    if phase is Phase.JOINED:
        return joined()
    core = ClientCore("ann")
    if phase is Phase.WAITING:
        return core
    topic = ready_topic(core.start(T0))
    if phase is Phase.CLOSED:
        core.close(T0)
    elif phase is not Phase.PROBING:
        core.receive_broadcast(broadcast([m.Heartbeat(EPOCH, WALL)], topic), T0)
        if phase is Phase.REFUSED:
            core.receive_reply(reply(m.Error(m.ErrorCode.NAME_TAKEN, "taken")), T0)
    assert core.phase is phase
    return core


@pytest.mark.parametrize("phase, kind", [
    pytest.param(phase, kind, id=f"{phase.value}-{getattr(kind, 'TYPE', kind)}")
    for phase in Phase for kind in INPUTS if kind not in TRANSITIONS[phase]])
def test_an_input_a_phase_does_not_act_on_changes_nothing(phase, kind):
    core = core_in(phase)
    socket, frames = INPUTS[kind](core)
    receive = core.receive_broadcast if socket == "sub" else core.receive_reply
    assert receive(frames, T0 + 0.1) == []
    assert core.phase is phase


def test_every_handler_in_the_table_exists_and_every_phase_has_a_row():
    assert set(TRANSITIONS) == set(Phase)
    for row in TRANSITIONS.values():
        for handler in row.values():
            assert callable(getattr(ClientCore, handler))


# --- delivery in order, exactly once -----------------------------------------------


def test_events_are_handed_on_in_order_once_and_a_gap_is_fetched():
    core = joined()
    assert events(core.receive_broadcast(broadcast([msg(1, "a")]), T0)) == [msg(1, "a")]
    out = core.receive_broadcast(broadcast([msg(3, "c")]), T0)
    assert events(out) == [] and requests(out) == [m.Fetch(1, 2, "tok", G)]
    # a second gap while the fetch is out asks nothing more
    assert requests(core.receive_broadcast(broadcast([msg(5, "e")]), T0)) == []
    out = core.receive_reply(reply(m.History([msg(2, "b")], 1, 2, stream=G)), T0)
    assert events(out) == [msg(2, "b"), msg(3, "c")]
    assert requests(out) == [m.Fetch(3, 4, "tok", G)]
    out = core.receive_reply(reply(m.History([msg(4, "d")], 1, 4, stream=G)), T0)
    assert events(out) == [msg(4, "d"), msg(5, "e")]
    # repeats, live or from a history, are dropped
    assert events(core.receive_broadcast(broadcast([msg(2, "b"), msg(5, "e")]), T0)) == []


def test_a_position_announcing_a_later_seq_fetches_the_tail():
    core = joined(seq=3)
    out = core.receive_broadcast(broadcast([m.Position(G, 6)]), T0)
    assert requests(out) == [m.Fetch(3, 6, "tok", G)]


def test_what_the_broker_no_longer_holds_is_reported_missed():
    core = joined()
    core.receive_broadcast(broadcast([msg(9)]), T0)
    out = core.receive_reply(reply(m.History([msg(6), msg(7), msg(8)], 6, 8, stream=G)), T0)
    assert events(out) == [Missed(1, 5), msg(6), msg(7), msg(8), msg(9)]


def test_a_lost_fetch_answer_is_asked_again_after_patience():
    core = joined()
    core.receive_broadcast(broadcast([msg(3)]), T0)
    core.receive_broadcast(broadcast([m.Heartbeat(EPOCH, WALL)]), T0 + 2)  # alive
    assert requests(core.tick(T0 + 2.9)) == [m.Ping("tok")]
    assert m.Fetch(0, 2, "tok", G) in requests(core.tick(T0 + 3.1))


def test_earlier_messages_come_first_and_live_ones_wait_for_them():
    core = joined(recent=50, seq=2)
    out = core.receive_broadcast(broadcast([msg(3, "live")]), T0)
    assert events(out) == []
    out = core.receive_reply(reply(m.History([msg(1, "old")], 1, 2, recent=True, stream=G)), T0)
    assert events(out) == [Earlier([msg(1, "old")]), msg(3, "live")]


def test_a_rejoin_while_earlier_messages_are_awaited_does_not_hold_the_chat_forever():
    core = ClientCore("ann", recent=50)
    topic = ready_topic(core.start(T0))
    core.receive_broadcast(broadcast([m.Heartbeat(EPOCH, WALL)], topic), T0)
    out = core.receive_reply(reply(welcome(seq=2)), T0)
    assert requests(out) == [m.Recent(50, "tok", G)]
    # the broker forgot us before it answered; we join again
    assert requests(core.receive_reply(reply(m.Error(m.ErrorCode.NOT_JOINED, "join")), T0)) \
        == [hello(resume="tok")]
    out = core.receive_reply(reply(welcome(seq=2, token="tok2")), T0 + 0.1)
    assert requests(out) == [m.Recent(50, "tok2", G)]  # asked again, not forgotten
    core.receive_broadcast(broadcast([msg(3, "live")]), T0 + 0.2)
    # no answer ever comes: after patience the live chat flows anyway
    out = core.tick(T0 + 0.1 + 3.01)
    assert msg(3, "live") in events(out)


def test_a_history_with_an_unsequenced_event_is_refused_without_harm():
    core = joined()
    core.receive_broadcast(broadcast([msg(2)]), T0)
    bad = b'{"type":"history","first":1,"until":1,"events":[{"type":"shutdown","time":1}]}'
    assert core.receive_reply([bad], T0) == []
    assert core.phase is Phase.JOINED
    assert events(core.receive_reply(reply(m.History([msg(1)], 1, 1, stream=G)), T0)) == [msg(1), msg(2)]


# --- the outbox -------------------------------------------------------------------------


def test_text_goes_out_in_order_within_the_window_and_is_acknowledged():
    core = joined()
    out = []
    for i in range(SEND_WINDOW + 5):
        out += core.send(f"id{i}", f"t{i}", T0)
    says = requests(out)
    assert [s.id for s in says] == [f"id{i}" for i in range(SEND_WINDOW)]
    assert all(s.session == "tok" for s in says)
    out = core.receive_reply(reply(m.Ack("id0", 1)), T0)
    assert events(out) == [Acked("id0", 1)] and [s.id for s in requests(out)] == [f"id{SEND_WINDOW}"]


def test_text_too_long_is_refused_at_once_without_sending():
    core = joined()
    out = core.send("x", "a" * 101, T0)
    assert requests(out) == [] and isinstance(events(out)[0], Refused)


def test_a_rate_limit_pauses_and_resends_from_the_refused_message_in_order():
    core = joined()
    for i in range(3):
        core.send(f"id{i}", f"t{i}", T0)
    core.receive_reply(reply(m.Ack("id0", 1)), T0)
    err = m.Error(m.ErrorCode.RATE_LIMITED, "too fast", "id1", 0.5)
    assert core.receive_reply(reply(err), T0) == []
    assert requests(core.tick(T0 + 0.4)) == []
    assert [s.id for s in requests(core.tick(T0 + 0.5)) if isinstance(s, m.Say)] == ["id1", "id2"]


def test_a_message_the_broker_cannot_store_now_goes_again_later_in_order():
    core = joined()
    core.send("a", "one", T0)
    core.send("b", "two", T0)
    out = core.receive_reply(reply(m.Error(m.ErrorCode.UNAVAILABLE, "disk full", "a", 1.0)), T0)
    assert [type(e) for e in events(out)] == [StateChanged]  # said once, not Refused
    assert not [r for r in requests(core.tick(T0 + 0.9)) if isinstance(r, m.Say)]
    assert [r.id for r in requests(core.tick(T0 + 1.0)) if isinstance(r, m.Say)] == ["a", "b"]


def test_a_join_the_broker_cannot_store_now_is_tried_again_later():
    core = ClientCore("ann")
    topic = ready_topic(core.start(T0))
    core.receive_broadcast(broadcast([m.Heartbeat(EPOCH, WALL)], topic), T0)
    out = core.receive_reply(reply(m.Error(m.ErrorCode.UNAVAILABLE, "disk full", None, 0.5)), T0)
    assert not [e for e in events(out) if isinstance(e, JoinRefused)]
    assert core.tick(T0 + 0.4) == [] and requests(core.tick(T0 + 0.5)) == [hello()]


def test_a_refused_message_is_reported_and_forgotten():
    core = joined()
    core.send("id0", "hi", T0)
    out = core.receive_reply(reply(m.Error(m.ErrorCode.TEXT_TOO_LONG, "long", "id0")), T0)
    assert events(out) == [Refused("id0", m.ErrorCode.TEXT_TOO_LONG, "long")]
    assert not core.outbox.pending


def test_requests_the_shell_could_not_send_are_tried_again_in_order():
    core = joined()
    out = core.send("a", "1", T0) + core.send("b", "2", T0)
    assert core.not_sent([o for o in out if isinstance(o, Request)], T0) == []
    assert requests(core.tick(T0 + SEND_RETRY_S / 2)) == []
    assert [s.id for s in requests(core.tick(T0 + SEND_RETRY_S))] == ["a", "b"]


def test_text_queued_before_joining_goes_after_the_welcome():
    core = ClientCore("ann")
    topic = ready_topic(core.start(T0))
    assert requests(core.send("a", "early", T0)) == []
    core.receive_broadcast(broadcast([m.Heartbeat(EPOCH, WALL)], topic), T0)
    out = core.receive_reply(reply(welcome()), T0)
    assert [r.id for r in requests(out) if isinstance(r, m.Say)] == ["a"]


# --- liveness, reconnecting, resuming ----------------------------------------------------


def test_silence_reconnects_with_a_doubling_capped_backoff_and_resumes_the_name():
    core = joined()
    core.send("a", "in flight", T0)
    now, delays = T0, []
    for _ in range(8):
        now = core.broker_seen + 3.01
        out = core.tick(now)
        assert Disconnect() in out
        (changed,) = [e for e in events(out) if isinstance(e, StateChanged)]
        delays.append(changed.retry_in)
        assert core.tick(core.reconnect_at - 0.01) == []
        out = core.tick(core.reconnect_at)
        assert isinstance(out[0], Connect)
    assert delays[:3] == [RECONNECT_DELAY_FIRST, 2 * RECONNECT_DELAY_FIRST,
                          4 * RECONNECT_DELAY_FIRST]
    assert max(delays) == RECONNECT_DELAY_MAX
    now = core.reconnect_at
    out = core.receive_broadcast(broadcast([m.Heartbeat(EPOCH, WALL)], ready_topic(out)), now)
    assert requests(out) == [hello(resume="tok")]
    out = core.receive_reply(reply(welcome(resumed=True)), now)
    assert [r.id for r in requests(out) if isinstance(r, m.Say)] == ["a"]  # sent again
    assert core.backoff == RECONNECT_DELAY_FIRST


def test_any_frame_counts_as_the_broker_alive_and_a_quiet_client_pings():
    core = joined()
    core.receive_reply(reply(m.Users([])), T0 + 2.5)
    assert requests(core.tick(T0 + 2.6)) == [m.Ping("tok")]
    assert Disconnect() not in core.tick(T0 + 5.4)
    assert Disconnect() in core.tick(T0 + 5.6)


def test_a_heartbeat_of_a_new_epoch_rejoins_and_the_new_run_starts_afresh():
    core = joined(seq=40)
    out = core.receive_broadcast(broadcast([m.Heartbeat("e2", WALL)]), T0)
    assert requests(out) == [hello(resume="tok")]
    out = core.receive_reply(reply(welcome(seq=2, epoch="e2", token="t2")), T0)
    assert events(out)[0] == Joined("ann", 1, False, True, (m.Room(G, 2, "", 1),), 100)
    assert events(core.receive_broadcast(broadcast([msg(3)]), T0)) == [msg(3)]


def test_a_hello_never_answered_is_said_again_on_new_sockets_though_a_new_run_heartbeats():
    """The broker read our hello and died; a new one took the port, and its
    heartbeats reach our SUB: they are not our broker's, and prove nothing."""
    core = ClientCore("ann")
    topic = ready_topic(core.start(T0))
    core.receive_broadcast(broadcast([m.Heartbeat(EPOCH, WALL)], topic), T0)
    assert core.phase is Phase.HELLO
    now, out = T0, []
    while Disconnect() not in out:
        now += 0.1
        assert now < T0 + 3.2, "the unanswered hello was never given up"
        core.receive_broadcast(broadcast([m.Heartbeat("e2", WALL)]), now)
        out = core.tick(now)
    assert now > T0 + 3.0  # after the patience, not before
    out = core.tick(core.reconnect_at)
    out = core.receive_broadcast(broadcast([m.Heartbeat("e2", WALL)], ready_topic(out)),
                                 core.reconnect_at)
    assert requests(out) == [hello()]
    out = core.receive_reply(reply(welcome(epoch="e2")), core.reconnect_at)
    assert Joined("ann", 1, False, False, (m.Room(G, 0, "", 1),), 100) in events(out)


def test_a_heartbeat_of_a_run_that_did_not_welcome_us_is_no_sign_of_life():
    core = joined()
    core.receive_broadcast(broadcast([m.Heartbeat(EPOCH, WALL)]), T0 + 2.0)
    assert Disconnect() not in core.tick(T0 + 4.9)  # ours: alive until T0 + 5
    core = joined()
    core.receive_broadcast(broadcast([m.Heartbeat("e2", WALL)]), T0 + 2.0)  # hello to e2
    assert Disconnect() in core.tick(T0 + 3.1)


def test_a_lost_welcome_waits_for_its_own_session_to_time_out_then_joins():
    """The broker joined us, but its welcome was lost: that session holds the
    name until it times out, so name_taken is not final meanwhile."""
    broker = BrokerCore(BrokerConfig())
    net = Loopback(broker)
    net.lose = [m.Welcome]
    client = net.add(b"A", ClientCore("ann"))
    assert client.phase is Phase.HELLO and "ann" in broker.user_names()
    now = T0
    while client.phase is not Phase.JOINED:
        now += 0.05
        assert now < T0 + 10, f"not joined; phase {client.phase}"
        net.tick(now)
    assert not [e for e in net.delivered[b"A"] if isinstance(e, JoinRefused)]
    assert net.connections == 2
    # the lost session joined, timed out, and ours joined afresh
    assert [e.people() for e in broker.main.history] == [
        [("ann", None)], [("ann", "timeout")], [("ann", None)]]
    assert now < T0 + 3.0 + 0.25 + 1.0 + 0.5  # patience, backoff, one retry, a sweep


def test_name_taken_after_a_lost_hello_is_final_once_its_session_would_have_timed_out():
    core = ClientCore("ann")
    topic = ready_topic(core.start(T0))
    core.receive_broadcast(broadcast([m.Heartbeat(EPOCH, WALL)], topic), T0)
    core.tick(T0 + 3.01)  # no welcome: new sockets
    now = core.reconnect_at
    out = core.tick(now)
    core.receive_broadcast(broadcast([m.Heartbeat(EPOCH, WALL)], ready_topic(out)), now)
    taken = reply(m.Error(m.ErrorCode.NAME_TAKEN, "the name ann is taken"))
    assert core.receive_reply(taken, now) == []
    ghost_gone = T0 + GHOST_PATIENCES * 3.0
    while now < ghost_gone:
        now = core.next_deadline()
        assert requests(core.tick(now)) == [hello()]
        out = core.receive_reply(taken, now)
    assert events(out) == [JoinRefused(m.ErrorCode.NAME_TAKEN, "the name ann is taken")]


def test_shutdown_reconnects_and_close_says_bye_with_a_linger():
    core = joined()
    out = core.receive_broadcast(broadcast([m.Shutdown(WALL)]), T0)
    assert Disconnect() in out and core.phase is Phase.WAITING
    core = joined()
    out = core.close(T0)
    assert requests(out) == [m.Bye("tok")] and Disconnect(linger=True) in out
    assert core.phase is Phase.CLOSED and core.tick(T0 + 100) == []


# --- rooms and direct messages through one broker core and two client cores ---------------


class Loopback:
    """A BrokerCore and ClientCores joined in memory as the sockets join them:
    replies go to their peer, broadcasts to the clients subscribed to them.

    A client is known by a label; each of its Connects is a new connection,
    with a routing id of its own. A reply of a type listed in ``lose`` is
    lost on the way, once per listing. ``now`` is both cores' clock.
    """

    def __init__(self, broker: BrokerCore):
        self.broker = broker
        self.now = T0
        self.clients: dict[bytes, ClientCore] = {}
        self.peers: dict[bytes, bytes] = {}  # label -> routing id of its connection
        self.topics: dict[bytes, set[bytes]] = {}
        self.delivered: dict[bytes, list] = {}
        self.lose: list[type] = []
        self.connections = 0

    def add(self, label: bytes, client: ClientCore) -> ClientCore:
        self.clients[label], self.topics[label], self.delivered[label] = client, set(), []
        self.run(label, client.start(self.now))
        return client

    def tick(self, now: float) -> None:
        """Time passes for the broker and every client."""
        self.now = now
        pending = self._from_broker(self.broker.tick(now, WALL), only=None)
        for label, client in self.clients.items():
            pending += [(label, o) for o in client.tick(now)]
        self._carry_out(pending)

    def run(self, label: bytes, outputs: list) -> None:
        """Carry out a client's outputs, and all that follows, until quiet."""
        self._carry_out([(label, o) for o in outputs])

    def _carry_out(self, pending: list) -> None:
        while pending:
            label, out = pending.pop(0)
            if isinstance(out, Connect):
                self.connections += 1
                self.peers[label] = label + b"%d" % self.connections
                self.topics[label] = set(out.topics)
                broker_out = [o for t in out.topics for o in self.broker.ready_probe(t, WALL)]
            elif isinstance(out, Subscribe):
                self.topics[label].add(out.topic)
                broker_out = self.broker.ready_probe(out.topic, WALL)
            elif isinstance(out, Unsubscribe):
                self.topics[label].discard(out.topic)
                continue
            elif isinstance(out, Request):
                broker_out = self.broker.handle(self.peers[label], [m.encode(out.message)],
                                                self.now, WALL)
                broker_out += self.broker.flush_presence(WALL)  # the end of the pass
            else:
                if not isinstance(out, Action):
                    self.delivered[label].append(out)
                continue
            pending += self._from_broker(broker_out, only=label if not isinstance(
                out, Request) else None)

    def _from_broker(self, outputs: list, only: bytes | None) -> list:
        labels = {peer: label for label, peer in self.peers.items()}
        back: list = []
        for o in outputs:
            if isinstance(o, Reply) and type(o.message) in self.lose:
                self.lose.remove(type(o.message))
            elif isinstance(o, Reply) and o.peer in labels:
                label = labels[o.peer]
                back += [(label, x) for x in self.clients[label].receive_reply(
                    [m.encode(o.message)], self.now)]
            elif isinstance(o, Publish):
                for label, client in self.clients.items():
                    if (only in (None, label)) and any(o.topic.startswith(t)
                                                        for t in self.topics[label]):
                        frames = [o.topic, m.join_events([m.encode(o.event)])]
                        back += [(label, x) for x in client.receive_broadcast(frames, self.now)]
        return back

    def texts(self, peer: bytes) -> list:
        return [(e.room or f"dm:{e.sender}->{e.to}", e.text) for e in self.delivered[peer]
                if isinstance(e, m.Message)]


def test_rooms_and_direct_messages_are_separate_streams_end_to_end_in_memory():
    broker = BrokerCore(BrokerConfig(history=10))
    net = Loopback(broker)
    ann = net.add(b"A", ClientCore("ann", rooms=(G, "#Lab")))
    bob = net.add(b"B", ClientCore("bob"))
    assert ann.phase is Phase.JOINED and bob.phase is Phase.JOINED
    net.run(b"A", ann.send("m1", "to all", T0))
    net.run(b"A", ann.send("m2", "to the lab", T0, room="#lab"))
    net.run(b"B", bob.send("m3", "psst", T0, to="ANN"))
    assert broker.rooms["#lab"].stream.seq == 2  # ann's join, her message
    assert net.texts(b"A") == [(G, "to all"), ("#Lab", "to the lab"), ("dm:bob->ann", "psst")]
    # bob is not in #lab: he hears nothing of it; he sees his own direct message
    assert net.texts(b"B") == [(G, "to all"), ("dm:bob->ann", "psst")]
    # bob joins #lab later: the probe, the join, and from then on its events
    net.run(b"B", bob.join_room("#LAB", T0))
    assert any(isinstance(e, RoomJoined) and e.room.room == "#Lab" for e in net.delivered[b"B"])
    net.run(b"A", ann.send("m4", "welcome bob", T0, room="#lab"))
    assert net.texts(b"B")[-1] == ("#Lab", "welcome bob")
    # a gap in one stream is repaired from that stream alone
    lab = broker.rooms["#lab"].stream
    lost = lab.append(lambda seq: m.Message(seq, WALL, "carol", "lost on the way", "#Lab"))
    after = lab.append(lambda seq: m.Message(seq, WALL, "carol", "after it", "#Lab"))
    net.run(b"B", bob.receive_broadcast([lab.topic, m.join_events([m.encode(after)])], T0))
    assert net.texts(b"B")[-2:] == [("#Lab", lost.text), ("#Lab", "after it")]
    # parting stops the room's events
    net.run(b"B", bob.part_room("#lab", T0))
    net.run(b"A", ann.send("m5", "bye bob", T0, room="#lab"))
    assert net.texts(b"B")[-1] == ("#Lab", "after it")
    assert bob.streams.keys() == {G, "@bob"}


def test_a_room_parted_while_away_is_parted_at_the_broker_on_resuming():
    core = ClientCore("ann", rooms=(G, "#lab"))
    topic = ready_topic(core.start(T0))
    core.receive_broadcast(broadcast([m.Heartbeat(EPOCH, WALL)], topic), T0)
    both = [m.Room(G, 0, "", 1), m.Room("#lab", 0, "", 1)]
    core.receive_reply(reply(m.Welcome("ann", EPOCH, 1, "tok", 1.0, 3, 100, both, 0)), T0)
    now = core.broker_seen + 3.01
    core.tick(now)  # the broker fell silent: we wait to reconnect
    assert core.phase is Phase.WAITING
    core.part_room("#lab", now)  # parted while away: only we know of it
    out = core.tick(core.reconnect_at)
    assert m.room_topic("#lab") not in out[0].topics
    core.receive_broadcast(broadcast([m.Heartbeat(EPOCH, WALL)], ready_topic(out)), now + 1)
    resumed = m.Welcome("ann", EPOCH, 1, "tok", 1.0, 3, 100, both, 0, resumed=True)
    out = core.receive_reply(reply(resumed), now + 1)
    assert m.PartRoom("#lab", "tok") in requests(out)
    assert "#lab" not in core.streams


def test_a_quiet_client_pings_after_half_the_brokers_patience_and_any_request_counts():
    core = joined()  # the welcome: interval 1 s, liveness 3; the hello went at T0
    core.receive_broadcast(broadcast([m.Heartbeat(EPOCH, WALL)]), T0 + 1.4)
    assert requests(core.tick(T0 + 1.4)) == []
    assert core.next_deadline() == pytest.approx(T0 + 1.5)
    assert requests(core.tick(T0 + 1.5)) == [m.Ping("tok")]
    core.receive_broadcast(broadcast([m.Heartbeat(EPOCH, WALL)]), T0 + 2.0)
    assert requests(core.send("m1", "hi", T0 + 2.0)) == [m.Say("m1", "hi", "tok")]
    assert requests(core.tick(T0 + 3.4)) == []  # the say was a heartbeat too
    assert requests(core.tick(T0 + 3.5)) == [m.Ping("tok")]


def test_a_big_rooms_count_reaches_the_caller_only_for_a_room_we_are_in():
    core = joined()
    counted = m.Members(G, 612)
    assert events(core.receive_broadcast(broadcast([counted]), T0)) == [counted]
    other = m.Members("#elsewhere", 9)
    assert events(core.receive_broadcast(broadcast([other], m.room_topic("#elsewhere")),
                                         T0)) == []


def test_who_asks_one_page_and_the_next_with_its_cursor():
    core = joined()
    assert requests(core.who(T0, G)) == [m.Who(G)]
    assert requests(core.who(T0, G, after="bob")) == [m.Who(G, "bob")]
    page = m.Users(["carol"], G, 3, None)
    assert events(core.receive_reply(reply(page), T0)) == [page]


def test_the_joins_and_leaves_of_a_pass_arrive_in_order_as_one_event():
    core = joined(seq=4)
    event = m.Presence(5, WALL, ["bob", "carol"], [["dave", "timeout"]], G)
    assert events(core.receive_broadcast(broadcast([event]), T0)) == [event]
