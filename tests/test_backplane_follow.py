"""Each broker follows only the streams its clients follow (``--backplane``).

Real redis-server and broker processes, real clients and raw sockets. What a
broker receives from Redis is observed in Redis itself: who subscribes to a
stream's channel (``PUBSUB NUMSUB``), and what the channel every broker
subscribes to carries (the test subscribes to it too). Every wait is on a
condition with a deadline.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import threading

import pytest
import redis

import messages as m
from procs import Client, listen, run_cli, wait_until
from raw_peer import join, raw_dealer, raw_sub, request

pytestmark = pytest.mark.slow

SHARED_CHANNEL = "zchat:events"  # what every broker subscribes to


def channel(stream: str) -> str:
    """The channel of one stream's events (backplane_keys.stream_channel)."""
    return f"zchat:{{{stream}}}:events"


def subscribers(client: redis.Redis, stream: str) -> int:
    return dict(client.pubsub_numsub(channel(stream)))[channel(stream).encode()]


@pytest.fixture
def shared(make_broker, redis_server):
    def start(*extra: str):
        return make_broker("--backplane", redis_server.url, "--heartbeat-interval", "0.2",
                           *extra)
    return start


@pytest.fixture
def rdb(redis_server):
    client = redis.Redis(port=redis_server.port)
    yield client
    client.close()


class Tap:
    """The test's own subscription to the channel every broker receives."""

    def __init__(self, client: redis.Redis):
        self.pubsub = client.pubsub(ignore_subscribe_messages=True)
        self.pubsub.subscribe(SHARED_CHANNEL)
        self.seen: list[bytes] = []

    def read(self) -> bytes:
        while (message := self.pubsub.get_message(timeout=0.01)) is not None:
            self.seen.append(message["data"])
        return b"\n".join(self.seen)

    def close(self) -> None:
        self.pubsub.close()


class Feeder:
    """A `send` client fed line after line by a thread until stopped: a
    continuous stream of messages into one room."""

    def __init__(self, broker, room: str, name: str):
        self.client = Client(broker, "send", "--room", room, "--timeout", "20", name=name,
                             stdin=subprocess.PIPE)
        self.lines: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._feed, daemon=True)
        self.thread.start()

    def _feed(self) -> None:
        n = 0
        while not self.stop.wait(0.004):  # about 250 a second: pacing, not a wait on anything
            line = f"line {n}"
            self.client.proc.stdin.write(line + "\n")
            self.client.proc.stdin.flush()
            self.lines.append(line)
            n += 1

    def finish(self) -> int:
        self.stop.set()
        self.thread.join(5)
        self.client.proc.stdin.close()
        return self.client.wait(60)


def stored(client: redis.Redis, room: str) -> list[tuple[int, dict]]:
    """Every event of a room as Redis holds it: (seq, event body)."""
    return [(int(entry_id.split(b"-")[0]), json.loads(fields[b"e"]))
            for entry_id, fields in client.xrange(f"zchat:{{{room}}}:x")]


def test_a_broker_with_no_client_in_a_room_receives_none_of_its_messages(shared, rdb, clients):
    """B has nobody in #x: the room's messages reach A's listener, B is not
    subscribed to #x's channel, and what every broker receives carries none
    of them; B still lists #x with its members and topic."""
    a, b = shared(), shared()
    tap = Tap(rdb)
    try:
        listener = listen(a, "ann", "--room", "#x")
        clients.append(listener)
        lines = [f"secret {i}" for i in range(20)]
        assert run_cli(a, "send", "--room", "#x", name="al",
                       input="\n".join(lines) + "\n").returncode == 0
        assert run_cli(a, "topic", "#x", "the topic", name="al").returncode == 0
        wait_until(lambda: len(listener.messages()) >= 20, 10, "the lines at A's listener")
        clients.append(listen(b, "late"))  # online: told on the shared channel after the lines
        wait_until(lambda: b'"late"' in tap.read(), 10, "late's arrival on the shared channel")
        assert b"secret" not in tap.read(), "a room's message went to every broker"
        assert subscribers(rdb, "#x") == 1  # A's alone
        rooms = json.loads(run_cli(b, "rooms", "--json").stdout)
        assert {"room": "#x", "members": 1, "topic": "the topic"} in rooms
        assert run_cli(b, "users", "--room", "#x").stdout.split() == ["ann"]
    finally:
        tap.close()


def test_a_room_followed_mid_stream_has_its_history_and_every_event_once_in_order(
        shared, rdb, clients):
    """While messages pour into #x on A, a subscriber on B's PUB, a client
    listening on C and a raw connection entering #x on D start following
    it: B publishes every event from its first on, once each, in order,
    as Redis numbered them; C's listener shows its history, then every
    message, each once (what the client shows, as the broker told it); D's welcome has the room's position as Redis had
    it, and its fetch and recent answer from the stream."""
    a, b, c, d = shared(), shared(), shared(), shared()
    feeder = Feeder(a, "#x", "feeder")
    clients.append(feeder.client)
    try:
        wait_until(lambda: int(rdb.get("zchat:{#x}:n") or 0) > 50, 20, "50 lines stored")
        assert subscribers(rdb, "#x") == 1  # A's alone: nobody is in #x on B, C or D
        with raw_sub(b.pub_port, m.room_topic("#x")) as sub:
            assert subscribers(rdb, "#x") == 2  # B followed #x before it answered the probe
            listener = listen(c, "cy", "--room", "#x", "--history", "5")
            clients.append(listener)
            with raw_dealer(d.port) as dealer:
                before = int(rdb.get("zchat:{#x}:n"))
                welcome = join(dealer, "dee", rooms=["#x"], quiet=True)
                after = int(rdb.get("zchat:{#x}:n"))
                position = welcome.rooms[0].seq
                assert before <= position <= after
                fetched = request(dealer, {"type": "fetch", "stream": "#x",
                                           "after": position - 5, "until": position})
                truth = dict(stored(rdb, "#x"))
                assert [(e.seq, getattr(e, "text", None)) for e in fetched.events] == [
                    (s, truth[s].get("text")) for s in range(position - 4, position + 1)]
                recent = request(dealer, {"type": "recent", "stream": "#x", "count": 3})
                truth = dict(stored(rdb, "#x"))
                assert [e.text for e in recent.events] == [
                    truth[s]["text"] for s in sorted(truth) if s <= recent.until
                    and truth[s]["type"] == "message"][-3:]
            wait_until(lambda: len(listener.messages()) > 60, 20, "60 lines on C")
            assert feeder.finish() == 0, feeder.client.err.lines[-5:]
            last = int(rdb.get("zchat:{#x}:n"))
            published: list = []
            def everything_published() -> bool:
                while sub.poll(0):
                    published.extend(m.decode_broadcast(sub.recv_multipart()))
                return any(isinstance(e, m.Message) and e.seq == last for e in published)
            wait_until(everything_published, 20, "B to publish the last event")
        events = [e for e in published if isinstance(e, (m.Message, m.Presence, m.Topic))]
        seqs = [e.seq for e in events]
        assert seqs == list(range(seqs[0], last + 1)), "a hole or a repeat on B's PUB"
        truth = dict(stored(rdb, "#x"))
        assert [getattr(e, "text", None) for e in events] == [truth[s].get("text") for s in seqs]
        wait_until(lambda: listener.messages()[-1]["text"] == feeder.lines[-1], 20,
                   "the last line on C")
        shown = [(r["seq"], r["text"]) for r in listener.messages()]
        # Its history (messages up to its welcome's position, among the last
        # 5 when the broker answered: none, if 5 came meanwhile) goes first.
        marks = [r.get("history", False) for r in listener.messages()]
        assert marks == sorted(marks, reverse=True)
        assert len(set(shown)) == len(shown), "a message shown twice on C"
        expected = [(s, truth[s]["text"]) for s in sorted(truth)
                    if truth[s]["type"] == "message" and s >= shown[0][0]]
        assert shown == expected, "a message missing on C"
    finally:
        feeder.stop.set()


def test_a_broker_stops_following_a_room_its_last_client_left(shared, rdb, clients):
    a, b = shared(), shared()
    stay = listen(a, "ann", "--room", "#x")
    passing = listen(b, "ben", "--room", "#x")
    clients += [stay, passing]
    assert subscribers(rdb, "#x") == 2
    passing.proc.terminate()
    passing.wait(10)
    wait_until(lambda: subscribers(rdb, "#x") == 1, 10, "B to unsubscribe from #x")
    assert run_cli(a, "send", "--room", "#x", "after", name="al").returncode == 0
    wait_until(lambda: ("al", "after") in [(r["from"], r["text"]) for r in stay.messages()],
               10, "the message at A")
    again = listen(b, "ben", "--room", "#x", "--history", "1")
    clients.append(again)
    assert [(r["text"], r.get("history")) for r in again.messages()] == [("after", True)]


def test_a_direct_message_reaches_only_the_addressees_broker_through_redis(
        shared, rdb, clients):
    a, b, c = shared(), shared(), shared()
    tap = Tap(rdb)
    try:
        bob = listen(c, "bob")
        alice = listen(a, "alice")
        clients += [bob, alice, listen(b, "other")]
        assert subscribers(rdb, "@bob") == 1 and subscribers(rdb, "@alice") == 1
        wait_until(lambda: "bob" in run_cli(a, "users").stdout.split(), 10, "bob listed on A")
        env = {"ZCHAT_SECRET_FILE": secret_file(alice)}
        assert run_cli(a, "send", "--to", "bob", "psst", name="alice", env=env).returncode == 0
        wait_until(lambda: ("alice", "psst") in [(r["from"], r["text"]) for r in bob.messages()],
                   10, "the DM at bob")
        clients.append(listen(b, "late"))  # online: told on the shared channel after the DM
        wait_until(lambda: b'"late"' in tap.read(), 10, "late's arrival on the shared channel")
        assert b"psst" not in tap.read(), "a direct message went to every broker"
        assert subscribers(rdb, "@bob") == 1  # C's alone: A and B never receive it
    finally:
        tap.close()


def secret_file(client) -> str:
    with open(f"/proc/{client.proc.pid}/environ", "rb") as f:
        env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
    return env[b"ZCHAT_SECRET_FILE"].decode()


def test_hellos_sent_at_once_are_all_welcomed_each_before_what_its_connection_sent_next(
        shared, rdb):
    """Hellos that need streams followed wait for them together (one round
    trip to Redis for the batch); what a connection sends right after its
    hello is answered after its welcome."""
    from raw_peer import frame_of, receive_reply
    a = shared()
    with contextlib.ExitStack() as stack:
        dealers = [stack.enter_context(raw_dealer(a.port)) for _ in range(20)]
        for n, dealer in enumerate(dealers):
            dealer.send(frame_of({"type": "hello", "name": f"p{n}", "v": m.PROTOCOL_VERSION,
                                  "rooms": [f"#r{n}"]}))
            dealer.send(frame_of({"type": "rooms"}))
        for n, dealer in enumerate(dealers):
            welcome, listed = receive_reply(dealer, 10), receive_reply(dealer, 10)
            assert isinstance(welcome, m.Welcome) and welcome.rooms[0].room == f"#r{n}"
            assert isinstance(listed, m.RoomList)
            assert f"#r{n}" in [r.room for r in listed.rooms]
        assert subscribers(rdb, "#r7") == 1 and subscribers(rdb, "@p7") == 1


def test_a_users_direct_messages_are_loaded_where_the_user_connects_next(shared, rdb):
    """bob's direct messages were all on A; his next connection, on B, is
    welcomed at their position as Redis has it and fetches them there."""
    a, b = shared(), shared()
    secret = "s" * 20
    with raw_dealer(a.port) as bob_on_a, raw_dealer(a.port) as alice:
        join(bob_on_a, "bob", secret=secret)
        join(alice, "alice", quiet=True)
        for n in range(3):
            ack = request(alice, {"type": "say", "id": f"d{n}", "to": "bob", "text": f"dm {n}"})
            assert type(ack).__name__ == "Ack", ack
        assert subscribers(rdb, "@bob") == 1  # A's alone
        with raw_dealer(b.port) as bob_on_b:
            welcome = join(bob_on_b, "bob", secret=secret)
            assert welcome.dm_seq == int(rdb.get("zchat:{@bob}:n")) == 3
            history = request(bob_on_b, {"type": "fetch", "stream": "@bob", "after": 0,
                                         "until": 3})
            assert [e.text for e in history.events] == ["dm 0", "dm 1", "dm 2"]
            assert subscribers(rdb, "@bob") == 2
