"""Several brokers, one chat, through a real Redis (``--backplane``).

Real redis-server and broker processes on free loopback ports, real
command-line clients; every wait is on a condition with a deadline.
"""

import difflib
import json
import subprocess
import time

import pytest

import messages as m
from procs import Client, listen, run_cli, wait_until
from test_presence_live import RoomWatcher, join_as, sessions  # noqa: F401 (a fixture)

pytestmark = pytest.mark.slow


@pytest.fixture
def shared(make_broker, redis_server):
    """Start a broker on the test's Redis (fast heartbeat, so liveness is quick)."""
    def start(*extra: str):
        return make_broker("--backplane", redis_server.url, "--heartbeat-interval", "0.2",
                           *extra)
    return start


def message_texts(client, room=None):
    return [(r["from"], r["text"]) for r in client.messages()
            if room is None or r.get("room") == room]


def test_a_message_sent_on_one_broker_reaches_a_listener_on_another(shared, clients):
    a, b = shared(), shared()
    listener = listen(b, "bea")
    clients.append(listener)
    lines = [f"line {i}" for i in range(50)]
    result = run_cli(a, "send", name="al", input="\n".join(lines) + "\n")
    assert result.returncode == 0, result.stderr
    wait_until(lambda: len(listener.messages()) >= 50, 20, "50 messages on B")
    got = listener.messages()
    assert [r["text"] for r in got] == lines
    seqs = [r["seq"] for r in got]
    assert seqs == sorted(set(seqs)) and seqs[-1] - seqs[0] == 49


def test_one_room_has_one_order_whichever_broker_the_senders_use(shared, clients):
    a, b = shared(), shared()
    listeners = [listen(a, "la"), listen(b, "lb")]
    clients += listeners
    senders = [Client(broker, "send", name=f"s{n}", stdin=subprocess.PIPE)
               for n, broker in enumerate([a, b, a, b])]
    clients += senders
    for n, sender in enumerate(senders):
        sender.proc.stdin.write("".join(f"{n}:{i}\n" for i in range(100)))
        sender.proc.stdin.close()
    assert [s.wait(60) for s in senders] == [0] * 4
    for listener in listeners:
        wait_until(lambda: len(listener.messages()) >= 400, 30, "400 messages")
    orders = [[(r["seq"], r["from"], r["text"]) for r in lst.messages()] for lst in listeners]
    assert orders[0] == orders[1]
    assert len({(f, t) for _, f, t in orders[0]}) == 400
    for n in range(4):  # each sender's lines keep their own order
        assert [t for _, f, t in orders[0] if f == f"s{n}"] == [f"{n}:{i}" for i in range(100)]


def test_history_comes_from_redis_on_a_broker_started_later(shared, clients):
    a = shared()
    assert run_cli(a, "send", name="al", input="one\ntwo\nthree\n").returncode == 0
    c = shared()  # started after: it has the room's history from Redis
    listener = listen(c, "cy", "--history", "3")
    clients.append(listener)
    earlier = [r for r in listener.json_records() if r.get("history")]
    assert [r["text"] for r in earlier] == ["one", "two", "three"]
    assert run_cli(c, "send", "four", name="al").returncode == 0
    wait_until(lambda: listener.messages()[-1:] and listener.messages()[-1]["text"] == "four",
               10, "the next message")
    assert listener.messages()[-1]["seq"] == earlier[-1]["seq"] + 2  # after cy's own join


def test_a_resend_to_another_broker_is_acknowledged_not_shown_twice(shared, clients, redis_server):
    """The accepted ids are in Redis: the same message id from the same
    person, sent to a broker that never saw the first copy (started after
    it, its history too short to hold it), is acknowledged with the first
    seq and not stored again."""
    import redis

    from raw_peer import join, raw_dealer, request
    a = shared("--history", "5")

    def say_once_more(broker):
        with raw_dealer(broker.port) as dealer:
            join(dealer, "repeater", secret="s" * 20, quiet=True)
            answer = request(dealer, {"type": "say", "id": "id-1", "text": "only once"})
            request(dealer, {"type": "bye"}, timeout=0.1)
        return answer

    first = say_once_more(a)
    assert run_cli(a, "send", name="al", input="".join(f"{i}\n" for i in range(10))
                   ).returncode == 0
    b = shared("--history", "5")
    listener = listen(b, "bea", "--history", "50")
    clients.append(listener)
    again = say_once_more(b)
    assert again.seq == first.seq and type(again).__name__ == "Ack"
    assert run_cli(b, "send", "after", name="al").returncode == 0
    wait_until(lambda: message_texts(listener)[-1:] == [("al", "after")], 10, "the next message")
    assert ("repeater", "only once") not in message_texts(listener)
    client = redis.Redis(port=redis_server.port)
    assert client.hget("zchat:{#general}:ids", "repeater id-1") == str(first.seq).encode()
    assert int(client.get("zchat:{#general}:n")) == first.seq + 10 + 2  # 10, bea's join, after


def test_three_brokers_two_rooms_every_listener_sees_every_message_once_in_one_order(
        shared, clients):
    brokers = [shared(), shared(), shared()]
    rooms = ["#alpha", "#beta"]
    room_args = [arg for room in rooms for arg in ("--room", room)]
    listeners = [listen(broker, f"l{n}{i}", *room_args) for n, broker in enumerate(brokers)
                 for i in range(2)]
    clients += listeners
    senders = []
    for n, broker in enumerate(brokers):
        for room in rooms:
            sender = Client(broker, "send", "--room", room, name=f"s{n}{room[1]}",
                            stdin=subprocess.PIPE)
            sender.proc.stdin.write("".join(f"{room} {n}:{i}\n" for i in range(60)))
            sender.proc.stdin.close()
            senders.append(sender)
    clients += senders
    assert [s.wait(60) for s in senders] == [0] * len(senders)
    for listener in listeners:
        wait_until(lambda: len(listener.messages()) >= 360, 30, "360 messages")
    for room in rooms:
        orders = [[(r["seq"], r["from"], r["text"]) for r in lst.messages()
                   if r["room"] == room] for lst in listeners]
        assert all(order == orders[0] for order in orders), orders_differ(
            room, orders, listeners, brokers)
        assert len(orders[0]) == len({(f, t) for _, f, t in orders[0]}) == 180
        assert all(t.startswith(room) for _, _, t in orders[0])
        seqs = [seq for seq, _, _ in orders[0]]
        assert seqs == sorted(set(seqs))
        for n in range(3):
            assert [t for _, f, t in orders[0] if f == f"s{n}{room[1]}"] == [
                f"{room} {n}:{i}" for i in range(60)]


def orders_differ(room, orders, listeners, brokers) -> str:
    """Why the listeners' orders of ``room`` differ: each differing one's diff
    against the first, and the stderr of its listener and of the brokers."""
    lines = [f"{room}: orders differ"]
    for n, order in enumerate(orders):
        if order != orders[0]:
            diff = difflib.unified_diff([repr(e) for e in orders[0]], [repr(e) for e in order],
                                        "listener 0", f"listener {n}", lineterm="", n=2)
            lines += [*diff, f"listener {n} stderr:", *listeners[n].err.lines[-20:]]
    lines += ["listener 0 stderr:", *listeners[0].err.lines[-20:]]
    for n, broker in enumerate(brokers):
        lines += [f"broker {n} log:", *broker_log(broker)[-20:]]
    return "\n".join(lines)


def broker_log(broker) -> list[str]:
    return list(broker.log.lines) if broker.log is not None else []


def test_a_name_in_use_on_one_broker_cannot_be_taken_on_another(shared, clients):
    a, b = shared(), shared()
    alice = listen(a, "alice")
    clients.append(alice)
    result = run_cli(b, "send", "hi", name="ALICE")
    assert result.returncode == 4 and "taken" in result.stderr
    # the same person (same secret file) may use the name on any broker
    same = {"ZCHAT_SECRET_FILE": alice_secret(alice)}
    assert run_cli(b, "send", "hi", name="alice", env=same).returncode == 0
    alice.stop()  # killed: the name is held until the session times out on A
    wait_until(lambda: run_cli(b, "send", "mine now", name="alice").returncode == 0, 15,
               "the name to be free on B once alice left A")


def alice_secret(client) -> str:
    """The secret file a client process was given (procs.child_env)."""
    with open(f"/proc/{client.proc.pid}/environ", "rb") as f:
        env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
    return env[b"ZCHAT_SECRET_FILE"].decode()


def test_a_person_on_two_brokers_joins_and_leaves_each_room_once(shared, clients):
    a, b, c = shared(), shared(), shared()
    watcher = listen(c, "watcher")
    clients.append(watcher)
    first = listen(a, "pat")
    clients.append(first)
    # pat's second connection: no join of its own to wait for (pat is in already)
    second = Client(b, "listen", "--json", name="pat",
                    env={"ZCHAT_SECRET_FILE": alice_secret(first)})
    clients.append(second)
    wait_until(lambda: run_cli(a, "send", "marker 1", name="al").returncode == 0
               and ("al", "marker 1") in message_texts(second), 15, "marker 1 on B")
    wait_until(lambda: ("al", "marker 1") in message_texts(watcher), 10, "marker 1")
    second.proc.terminate()  # a goodbye: pat is still on A
    second.wait(10)
    assert run_cli(a, "send", "marker 2", name="al").returncode == 0
    wait_until(lambda: ("al", "marker 2") in message_texts(watcher), 10, "marker 2")
    first.proc.terminate()
    first.wait(10)
    wait_until(lambda: any(r["type"] == "leave" and r["name"] == "pat"
                           for r in watcher.json_records()), 10, "pat's leave")
    assert run_cli(a, "send", "marker 3", name="al").returncode == 0
    wait_until(lambda: ("al", "marker 3") in message_texts(watcher), 10, "marker 3")
    pat = [r["type"] for r in watcher.json_records()
           if r["type"] in ("join", "leave") and r["name"] == "pat"]
    assert pat == ["join", "leave"]


def test_a_direct_message_from_a_reaches_the_addressee_on_c_and_no_one_else(shared, clients):
    a, b, c = shared(), shared(), shared()
    bob = listen(c, "bob")
    alice = listen(a, "alice")
    others = [listen(broker, f"other{n}") for n, broker in enumerate((a, b, c))]
    clients += [bob, alice, *others]
    wait_until(lambda: "bob" in run_cli(b, "users").stdout.split(), 10, "bob listed on B")
    same = {"ZCHAT_SECRET_FILE": alice_secret(alice)}
    result = run_cli(a, "send", "--to", "bob", "psst", name="alice", env=same)
    assert result.returncode == 0, result.stderr
    dm = ("alice", "psst")
    wait_until(lambda: dm in message_texts(bob), 10, "the DM at bob")
    wait_until(lambda: dm in message_texts(alice), 10, "the DM in alice's own stream")
    assert [r["to"] for r in bob.messages() if (r["from"], r["text"]) == dm] == ["bob"]
    assert run_cli(c, "send", "marker", name="al").returncode == 0
    for other in others:
        wait_until(lambda: ("al", "marker") in message_texts(other), 10, "the marker")
        assert dm not in message_texts(other)


def test_everyone_online_is_listed_on_every_broker(shared, clients):
    a, b = shared(), shared()
    clients += [listen(a, "ann", "--room", "#lab"), listen(b, "ben", "--room", "#lab")]
    c = shared()  # started after: what it knows comes from Redis
    for broker in (a, b, c):
        wait_until(lambda: {"ann", "ben"} <= set(run_cli(broker, "users").stdout.split()), 10,
                   "both listed")
        wait_until(lambda: run_cli(broker, "users", "--room", "#lab").stdout.split()
                   == ["ann", "ben"], 10, "both in #lab")
        rooms = json.loads(run_cli(broker, "rooms", "--json").stdout)
        assert {"room": "#lab", "members": 2, "topic": ""} in rooms
    result = run_cli(b, "send", "--to", "ann", "hi", name="carl")
    assert result.returncode == 0, result.stderr


def test_a_broker_killed_mid_stream_costs_its_clients_a_failover_not_a_message(
        make_broker, redis_server, clients):
    """SIGKILL the broker a sender and a listener use: both fail over to
    the next broker they were given; every line is acknowledged once and
    shown once, in order; a user who stays on the dead broker is announced
    gone once, within the bound (2 x expiry + 2 x interval), and the users
    who failed over are not announced at all."""
    interval, liveness = 0.5, 3
    def start():
        return make_broker("--backplane", redis_server.url, "--heartbeat-interval",
                           str(interval), "--heartbeat-liveness", str(liveness))
    a, b, c = start(), start(), start()
    failover = ["--broker", f"127.0.0.1:{b.port}"]
    watcher = listen(c, "watcher")
    mover = listen(a, "mover", *failover)
    stayer = listen(a, "stayer")  # knows no other broker
    clients += [watcher, mover, stayer]
    sender = Client(a, "send", "--timeout", "20", *failover, name="feeder",
                    stdin=subprocess.PIPE)
    clients.append(sender)
    lines = [f"line {i}" for i in range(200)]
    sender.proc.stdin.write("".join(f"{line}\n" for line in lines[:100]))
    sender.proc.stdin.flush()
    wait_until(lambda: len(watcher.messages()) >= 30, 20, "30 lines at the watcher")
    a.proc.kill()
    a.proc.wait()
    killed_at = time.monotonic()
    sender.proc.stdin.write("".join(f"{line}\n" for line in lines[100:]))
    sender.proc.stdin.close()
    assert sender.wait(60) == 0, sender.err.lines[-5:]
    for listener in (watcher, mover):
        wait_until(lambda: len(listener.messages()) >= 200, 30, "200 lines")
        assert [r["text"] for r in listener.messages()] == lines
    wait_until(lambda: any(r["type"] == "leave" and r["name"] == "stayer"
                           for r in watcher.json_records()), 15, "stayer's leave")
    took = time.monotonic() - killed_at
    bound = 2 * interval * liveness + 2 * interval
    assert took < bound + 2.0, f"stayer announced gone {took:.1f} s after the kill"
    assert run_cli(c, "send", "marker", name="al").returncode == 0
    wait_until(lambda: ("al", "marker") in message_texts(watcher), 10, "the marker")
    presence = [(r["type"], r["name"]) for r in watcher.json_records()
                if r["type"] in ("join", "leave") and r["name"] in ("stayer", "mover")]
    assert presence.count(("leave", "stayer")) == 1
    assert ("leave", "mover") not in presence
    assert "mover" in run_cli(c, "users").stdout.split()
    # the dead broker's names are free once it is reaped
    wait_until(lambda: run_cli(c, "send", "mine now", name="stayer").returncode == 0, 10,
               "stayer's name free for someone else")


def test_redis_stopped_and_restarted_refuses_messages_meanwhile_then_everything_resumes(
        shared, redis_server, clients):
    a, b = shared(), shared()
    watcher = listen(b, "watcher")
    clients.append(watcher)
    sender = Client(a, "send", "--timeout", "30", name="feeder", stdin=subprocess.PIPE)
    clients.append(sender)
    lines = [f"line {i}" for i in range(150)]
    sender.proc.stdin.write("".join(f"{line}\n" for line in lines[:50]))
    sender.proc.stdin.flush()
    wait_until(lambda: len(watcher.messages()) >= 50, 20, "50 lines at the watcher")
    redis_server.stop()  # SIGTERM: its AOF is written out
    sender.proc.stdin.write("".join(f"{line}\n" for line in lines[50:100]))
    sender.proc.stdin.flush()
    a.wait_log(lambda l: "does not take events" in l, 10, "A refusing events")
    refused = run_cli(b, "send", "--timeout", "2", "while down", name="al")
    assert refused.returncode == 3, refused.stderr  # not accepted within its timeout
    redis_server.start()  # same port, same directory: the AOF is read back
    sender.proc.stdin.write("".join(f"{line}\n" for line in lines[100:]))
    sender.proc.stdin.close()
    assert sender.wait(60) == 0, sender.err.lines[-5:]
    wait_until(lambda: len(watcher.messages()) >= 150, 30, "150 lines")
    assert [r["text"] for r in watcher.messages()] == lines
    seqs = [r["seq"] for r in watcher.messages()]
    assert seqs == sorted(set(seqs))
    assert watcher.proc.poll() is None
    joins = [r for r in watcher.json_records() if r["type"] == "join" and r["name"] == "watcher"]
    assert len(joins) == 1  # its connection stayed; it never joined again


def test_a_broker_without_its_redis_says_so_and_exits_1():
    from procs import PYTHON, ROOT, free_port, free_port_pair
    port = free_port_pair()
    result = subprocess.run([PYTHON, "broker.py", "--port", str(port), "--backplane",
                             f"redis://:hunter2@127.0.0.1:{free_port()}/0"], cwd=ROOT,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert "cannot reach the backplane" in result.stderr
    assert "hunter2" not in result.stderr  # a password in the URL is never shown


def test_a_redis_that_comes_back_without_the_chat_stops_the_brokers(shared, redis_server):
    """Numbers would start again at 1 under the same epoch: the broker says
    so and exits 1 rather than drop or misnumber anything."""
    import shutil
    a = shared()
    assert run_cli(a, "send", "before", name="al").returncode == 0
    redis_server.stop()
    shutil.rmtree(redis_server.dir)  # its AOF is gone
    __import__("os").mkdir(redis_server.dir)
    redis_server.start()
    a.wait_log(lambda l: "lost the chat" in l, 15, "the broker to notice")
    assert a.proc.wait(10) == 1


def presence_seen(watcher) -> list[tuple[int, list, list]]:
    return [(e.seq, e.joined, e.left) for e in watcher.of(m.Presence)]


def test_presence_and_a_big_rooms_count_are_the_same_on_every_broker(shared, sessions):
    """Protocol 3 through Redis: the joins of a pass are one presence event
    numbered by Redis (the same seq on every broker); above the threshold
    (of all brokers' members together) every broker publishes the count
    instead; back at it, the count goes first, then leaves are named again."""
    a, b = shared("--presence-threshold", "3"), shared("--presence-threshold", "3")
    watchers = [RoomWatcher(a), RoomWatcher(b)]
    try:
        names = [f"p{i}" for i in range(1, 7)]
        for n, name in enumerate(names[:3]):
            join_as((a, b)[n % 2], sessions, name)
        for w in watchers:
            wait_until(lambda: [n for _, j, _ in presence_seen(w) for n in j] == names[:3], 10,
                       "each join announced on both brokers")
        assert presence_seen(watchers[0]) == presence_seen(watchers[1])
        for n, name in enumerate(names[3:]):
            join_as((b, a)[n % 2], sessions, name)
        for w in watchers:
            wait_until(lambda: [e.count for e in w.of(m.Members)][-1:] == [6], 10,
                       "the count of six on both brokers")
            assert [n for _, j, _ in presence_seen(w) for n in j] == names[:3]
        for broker in (a, b):
            listed = run_cli(broker, "users", "--json")
            assert listed.returncode == 0 and sorted(json.loads(listed.stdout)) == names
            welcome_rooms = json.loads(run_cli(broker, "rooms", "--json").stdout)
            assert {"room": "#general", "members": 6, "topic": ""} in welcome_rooms
        for session in sessions[3:]:
            session.close()
        for w in watchers:
            wait_until(lambda: [e.count for e in w.of(m.Members)][-1:] == [3], 10,
                       "the count back at the threshold")
        sessions[2].close()
        for w in watchers:
            wait_until(lambda: any(left for _, _, left in presence_seen(w)), 10,
                       "a leave named again")
            assert [left for _, _, left in presence_seen(w) if left] == [[["p3", "quit"]]]
        assert presence_seen(watchers[0]) == presence_seen(watchers[1])
    finally:
        for w in watchers:
            w.close()


# --- sessions in Redis: a client that fails over resumes its session ---------------------


INTERVAL, LIVENESS = 0.5, 3


@pytest.fixture
def failover_brokers(make_broker, redis_server):
    """Three brokers on the test's Redis, with the failover test's timing."""
    def start():
        return make_broker("--backplane", redis_server.url, "--heartbeat-interval",
                           str(INTERVAL), "--heartbeat-liveness", str(LIVENESS))
    return start(), start(), start()


def reaped(broker) -> bool:
    """Whether ``broker`` (a survivor) has reaped a dead broker by now."""
    return any("is gone" in line for line in broker_log(broker))


def kill(broker) -> None:
    broker.proc.kill()
    broker.proc.wait()


class Collected:
    """Everything a ClientSession (the library the window uses) reported."""

    def __init__(self, session):
        self.session, self.events = session, []

    def drain(self) -> list:
        while not self.session.events.empty():
            self.events.append(self.session.events.get_nowait())
        return self.events

    def of(self, kind) -> list:
        return [e for e in self.drain() if isinstance(e, kind)]


def test_a_client_whose_broker_dies_resumes_its_session_on_the_next_one(
        failover_brokers, clients, sessions):
    """The session is in Redis: on B the client's token takes it over
    (``resumed: true``), in its rooms (one entered after its hello too),
    with no leave or join of it anywhere; what it sent meanwhile is
    acknowledged and shown once, and what others said meanwhile reaches it."""
    from client_session import Acked, BrokerAddress, ClientSession, Joined, RoomJoined
    a, b, c = failover_brokers
    watcher = listen(c, "watcher", "--room", "#general", "--room", "#lab")
    clients.append(watcher)
    session = ClientSession("127.0.0.1", a.port, "mover", secret="m0ver-secret-of-20-chars",
                            alternates=(BrokerAddress("127.0.0.1", b.port, b.pub_port),)).start()
    sessions.append(session)
    mover = Collected(session)
    wait_until(lambda: mover.of(Joined), 10, "mover to join on A")
    session.join_room("#lab")
    wait_until(lambda: mover.of(RoomJoined), 10, "mover in #lab")
    sent = [session.send(f"before {i}", room="#lab") for i in range(5)]
    wait_until(lambda: {e.id for e in mover.of(Acked)} >= set(sent), 10, "the first acks")
    kill(a)
    sent += [session.send(f"after {i}", room="#lab") for i in range(5)]
    assert run_cli(c, "send", "--room", "#lab", "while away", name="al").returncode == 0
    wait_until(lambda: len(mover.of(Joined)) >= 2, 15, "mover to join again on B")
    again = mover.of(Joined)[1:]
    assert all(j.resumed for j in again), f"the session was not resumed on B: {again}"
    assert [m.room_key(r.room) for r in again[0].rooms] == ["#general", "#lab"]
    wait_until(lambda: {e.id for e in mover.of(Acked)} >= set(sent), 15, "every ack")
    texts = [f"before {i}" for i in range(5)] + [f"after {i}" for i in range(5)]
    wait_until(lambda: [t for f, t in message_texts(watcher, "#lab") if f == "mover"] == texts,
               15, "the mover's lines, once each, in order, at the watcher")
    wait_until(lambda: any(e.text == "while away" for e in mover.of(m.Message)), 15,
               "what was said while it was away, at the mover")
    wait_until(lambda: reaped(b) or reaped(c), 15, "the dead broker to be reaped")
    assert run_cli(c, "send", "--room", "#lab", "marker", name="al").returncode == 0
    wait_until(lambda: ("al", "marker") in message_texts(watcher, "#lab"), 10, "the marker")
    seen = [(r["type"], r.get("room")) for r in watcher.json_records()
            if r["type"] in ("join", "leave") and r["name"] == "mover"]
    assert seen == [("join", "#general"), ("join", "#lab")]
    own = [(e.room, e.joined, e.left) for e in mover.of(m.Presence)
           if "mover" in e.joined or any(n == "mover" for n, _ in e.left)]
    assert all(not left for _, _, left in own) and len(own) <= 2
    assert run_cli(c, "users", "--room", "#lab").stdout.split() == ["mover", "watcher"]
    wait_until(lambda: any("resume mover (from another broker)" in line
                           for line in broker_log(b)), 5, "B to log the takeover")


def test_a_client_without_a_secret_resumes_its_session_on_the_next_broker(
        failover_brokers, clients):
    """Without a secret a name takes one connection at a time, and the dead
    broker holds it until it is reaped: the token proves the session is
    this client's, so B does not refuse it ``name_taken``."""
    import os
    a, b, c = failover_brokers
    watcher = listen(c, "watcher")
    clients.append(watcher)
    loner = listen(a, "loner", "--broker", f"127.0.0.1:{b.port}",
                   env={"ZCHAT_SECRET_FILE": os.devnull})  # no valid secret: none
    clients.append(loner)
    assert any("without it" in line for line in loner.err.lines)
    kill(a)
    loner.err.wait_for(lambda l: "reconnected" in l or "cannot rejoin" in l
                       or "refused" in l, 15, "the loner to rejoin")
    assert any("reconnected (session resumed)" in line for line in loner.err.lines), \
        loner.err.lines
    assert run_cli(c, "send", "after", name="al").returncode == 0
    wait_until(lambda: ("al", "after") in message_texts(loner), 10, "the next message on B")
    wait_until(lambda: reaped(b) or reaped(c), 15, "the dead broker to be reaped")
    assert run_cli(c, "send", "marker", name="al").returncode == 0
    wait_until(lambda: ("al", "marker") in message_texts(watcher), 10, "the marker")
    assert [r["type"] for r in watcher.json_records()
            if r["type"] in ("join", "leave") and r["name"] == "loner"] == ["join"]
    assert loner.proc.poll() is None
    assert run_cli(c, "send", "hi", name="loner").returncode == 4  # the name is still its own


def test_a_token_whose_broker_was_reaped_gives_a_new_session(failover_brokers, redis_server):
    """Before the dead broker is reaped its sessions can be taken over
    (``resumed: true``, the record now B's); once it is reaped, the records
    it still owned are gone, and their tokens give a new session, not an
    error. A session that ends deletes its record too."""
    import redis

    from raw_peer import join, raw_dealer, request
    a, b, c = failover_brokers
    store = redis.Redis(port=redis_server.port)
    with raw_dealer(a.port) as first, raw_dealer(a.port) as second:
        early = join(first, "early", secret="e" * 20)
        assert isinstance(request(first, {"type": "join", "room": "#lab"}), m.Room)
        late = join(second, "late", secret="l" * 20)
        # written with the joins' passes, before the welcomes went out
        assert len(store.keys("zchat:session:*")) == 2
        kill(a)  # well within the sessions' expiry: A still held them
    with raw_dealer(b.port) as dealer:
        again = join(dealer, "early", secret="e" * 20, resume=early.resume)
        assert again.resumed and again.resume == early.resume
        assert [r.room for r in again.rooms] == ["#general", "#lab"]
        wait_until(lambda: reaped(b) or reaped(c), 15, "the dead broker to be reaped")
        with raw_dealer(c.port) as other:
            fresh = join(other, "late", secret="l" * 20, resume=late.resume)
            assert not fresh.resumed and fresh.resume != late.resume
            assert [r.room for r in fresh.rooms] == ["#general"]  # as its hello says
            request(other, {"type": "bye"}, timeout=0.2)
        request(dealer, {"type": "bye"}, timeout=0.2)
    wait_until(lambda: store.keys("zchat:session:*") == [], 10, "every record deleted")
    assert store.keys("zchat:b:*:sessions") == []


def test_a_session_taken_over_is_followed_on_the_new_broker_before_its_welcome(
        failover_brokers, redis_server):
    """B follows none of the session's streams when the client comes: it
    reads the record, then follows the record's rooms and the user's direct
    messages, then welcomes it, so the welcome, a fetch and a direct message
    sent meanwhile on C come from the streams as Redis has them."""
    import redis

    from raw_peer import join, raw_dealer, receive_reply, request
    a, b, c = failover_brokers
    store = redis.Redis(port=redis_server.port)
    streams = ("#general", "#lab", "@early")

    def subscribers(stream: str) -> int:
        channel = f"zchat:{{{stream}}}:events"
        return dict(store.pubsub_numsub(channel))[channel.encode()]

    with raw_dealer(a.port) as first:
        early = join(first, "early", secret="e" * 20)
        assert isinstance(request(first, {"type": "join", "room": "#lab"}), m.Room)
        for n in range(3):
            assert run_cli(a, "send", "--room", "#lab", f"said {n}", name="al").returncode == 0
        kill(a)
    wait_until(lambda: not any(map(subscribers, streams)), 10,
               "no broker to follow the session's streams (B and C have no clients)")
    with raw_dealer(b.port) as dealer:
        again = join(dealer, "early", secret="e" * 20, resume=early.resume)
        assert again.resumed and [r.room for r in again.rooms] == ["#general", "#lab"]
        assert [subscribers(s) for s in streams] == [1, 1, 1]  # B's, before the welcome
        lab = next(r for r in again.rooms if r.room == "#lab")
        history = request(dealer, {"type": "fetch", "stream": "#lab", "after": 0,
                                   "until": lab.seq})
        assert [e.text for e in history.events if isinstance(e, m.Message)] == [
            f"said {n}" for n in range(3)]
        assert run_cli(c, "send", "--to", "early", "psst", name="al").returncode == 0
        deadline = time.monotonic() + 10
        got = None
        while time.monotonic() < deadline and not (isinstance(got, m.Message)
                                                   and got.text == "psst"):
            got = receive_reply(dealer, deadline - time.monotonic())
        assert isinstance(got, m.Message) and got.text == "psst", got
    store.close()


def test_a_resume_while_redis_is_down_is_refused_unavailable_then_taken_over(
        failover_brokers, redis_server):
    """The record cannot be read while Redis is down: the hello is refused
    ``unavailable`` (the client says it again later), not given a new
    session that would show its user leaving and joining."""
    from raw_peer import join, raw_dealer, request
    a, b, _ = failover_brokers
    with raw_dealer(a.port) as first:
        early = join(first, "early", secret="e" * 20)
        kill(a)
    redis_server.stop()  # SIGTERM: its AOF is written out, the records with it
    with raw_dealer(b.port) as dealer:
        refused = request(dealer, {"type": "hello", "name": "early", "v": m.PROTOCOL_VERSION,
                                   "secret": "e" * 20, "resume": early.resume}, timeout=10)
        assert isinstance(refused, m.Error) and refused.code == m.ErrorCode.UNAVAILABLE
        redis_server.start()
        again = hello_until_answered(dealer, {"type": "hello", "name": "early",
                                              "v": m.PROTOCOL_VERSION, "secret": "e" * 20,
                                              "resume": early.resume})
        assert isinstance(again, m.Welcome), again
        assert again.resumed and again.resume == early.resume


def hello_until_answered(dealer, hello: dict, within: float = 10.0):
    """The answer to ``hello``, said again after each ``unavailable`` as a
    client does (after its retry_after): just after Redis is back, the
    broker may not have subscribed again yet, and cannot follow the
    session's streams for a moment."""
    from raw_peer import request
    deadline = time.monotonic() + within
    while True:
        answer = request(dealer, hello, timeout=5)
        if not (isinstance(answer, m.Error) and answer.code == m.ErrorCode.UNAVAILABLE) \
                or time.monotonic() > deadline:
            return answer
        time.sleep(answer.retry_after or 0.1)  # as the client is told to wait
