"""A real ClientSession against a broker that answers out of turn.

These put the whole client (worker thread, sockets, core) through moments a
broker restart or a faulty broker can cause, which the real broker will not
produce on demand: a rejoin while the earlier messages are still awaited,
and a history reply holding an event that belongs in no history.
"""

from __future__ import annotations

import time

import pytest
import zmq

import messages as m
from client_session import ClientSession, Joined
from scripted_broker import ScriptedBroker, welcome


@pytest.fixture
def scripted():
    ctx = zmq.Context()
    broker = ScriptedBroker(ctx)
    yield broker
    broker.close()
    ctx.term()


def join(scripted: ScriptedBroker, session: ClientSession, seq: int, token: str) -> None:
    scripted.answer_probe("e1", seq)
    peer, _ = scripted.expect("hello")
    scripted.reply(peer, welcome("ann", seq, "e1", token))
    scripted.wait_event(session, Joined)


def test_a_rejoin_while_earlier_messages_are_awaited_does_not_freeze_the_chat(scripted):
    session = ClientSession("127.0.0.1", scripted.port, "ann", recent=50).start()
    try:
        join(scripted, session, 5, "t1")
        # The broker restarts before it answers: it has forgotten the session.
        peer, _ = scripted.expect("recent")
        scripted.reply(peer, m.Error(m.ErrorCode.NOT_JOINED, "join first (send hello)"))
        peer, _ = scripted.expect("hello")
        scripted.reply(peer, welcome("ann", 5, "e1", "t2"))
        scripted.wait_event(session, Joined)
        scripted.seq = 6
        scripted.publish(m.BROADCAST_TOPIC, [m.Message(6, time.time(), "bob", "still there?", m.GENERAL_ROOM)])
        # The live chat goes on, whether or not the earlier messages come.
        assert scripted.wait_event(session, m.Message).text == "still there?"
    finally:
        session.close()


@pytest.mark.parametrize("odd", [{"type": "shutdown"}, {"type": "heartbeat", "epoch": "e1"}])
def test_a_history_holding_an_unsequenced_event_is_refused_and_the_session_goes_on(
        scripted, odd):
    session = ClientSession("127.0.0.1", scripted.port, "ann").start()
    try:
        join(scripted, session, 0, "t1")
        now = time.time()
        # Event 2 arrives first: the client fetches event 1 ...
        scripted.seq = 2
        scripted.publish(m.BROADCAST_TOPIC, [m.Message(2, now, "bob", "second", m.GENERAL_ROOM)])
        peer, fetch = scripted.expect("fetch")
        assert (fetch["after"], fetch["until"]) == (0, 1)
        # ... and the answer holds an event that no history may hold.
        bad = {"type": "history", "first": 1, "until": 1, "stream": m.GENERAL_ROOM,
               "events": [{**odd, "time": now}]}
        scripted.reply_raw(peer, bad)
        # The client asks again (its fetch got no valid answer) and is answered.
        peer, fetch = scripted.expect("fetch")
        scripted.reply(peer, m.History([m.Message(1, now, "bob", "first", m.GENERAL_ROOM)], 1, 1, stream=m.GENERAL_ROOM))
        assert scripted.wait_event(session, m.Message).text == "first"
        assert scripted.wait_event(session, m.Message).text == "second"
    finally:
        session.close()


def test_a_session_given_several_brokers_fails_over_to_the_next_and_says_which(broker):
    """The first broker answers nothing (a closed port): after its patience
    the session connects to the next one it was given, and its address
    (what the window's status line shows) names that broker."""
    from client_session import BrokerAddress, StateChanged
    from procs import free_port_pair, wait_until
    dead = free_port_pair()
    session = ClientSession("127.0.0.1", dead, "ann",
                            alternates=(BrokerAddress("127.0.0.1", broker.port),)).start()
    try:
        assert session.address == f"127.0.0.1:{dead}"
        seen = []
        wait_until(lambda: (seen.extend(drain(session)) or any(isinstance(e, Joined)
                                                               for e in seen)), 20, "joined")
        assert session.address == f"127.0.0.1:{broker.port}"
        assert any(isinstance(e, StateChanged) and f"127.0.0.1:{broker.port}" in e.detail
                   for e in seen)
    finally:
        session.close()


def drain(session: ClientSession) -> list:
    import queue
    out = []
    while True:
        try:
            out.append(session.events.get_nowait())
        except queue.Empty:
            return out
