"""Rooms, direct messages, quiet senders and one person on several
connections, from the command line: a real broker process, real clients,
and raw sockets that count what goes over the wire."""

import json
import threading
import uuid

import pytest
import zmq

import messages as m
from client_session import list_users
from procs import Client, listen, new_secret_file, run_cli, run_cli_exactly, wait_until
from raw_peer import raw_sub


def as_person(secret_file: str) -> dict[str, str]:
    """The environment of a client that is the person owning ``secret_file``."""
    return {"ZCHAT_SECRET_FILE": secret_file}


def online(broker, room: str | None = None) -> list[str]:
    users = list_users("127.0.0.1", broker.port, 5, room=room)
    assert users is not None, "the broker did not answer who"
    return users


def frames_until(sock: zmq.Socket, texts: list[str], timeout: float = 10.0) -> list:
    """Broadcast frames of a raw SUB, (topic, events), read until the
    messages with ``texts`` are among them."""
    frames: list = []
    missing = set(texts)
    while missing:
        assert sock.poll(int(timeout * 1000)), f"still missing {sorted(missing)[:3]}"
        topic, body = sock.recv_multipart()
        frames.append((topic, json.loads(body)))
        missing -= {e.get("text") for e in frames[-1][1] if e["type"] == "message"}
    return frames


def test_a_hundred_quiet_sends_show_no_presence_and_are_never_listed(broker, clients):
    ears = listen(broker, "ears")
    clients.append(ears)
    ci_bot = as_person(new_secret_file())  # one bot, several runs at once
    samples: list[list[str]] = []
    sent = threading.Event()

    def sample_users() -> None:
        while not sent.wait(0.02):  # a sampling period, leaving the CPU to the sends
            samples.append(online(broker))

    def send_runs(first: int) -> list[int]:
        return [run_cli(broker, "send", f"build {n}", name="ci", env=ci_bot,
                        timeout=20).returncode for n in range(first, first + 25)]

    sampler = threading.Thread(target=sample_users, daemon=True)
    sampler.start()
    statuses: list[int] = []
    runners = [threading.Thread(target=lambda f=f: statuses.extend(send_runs(f)))
               for f in (1, 26, 51, 76)]
    for runner in runners:
        runner.start()
    for runner in runners:
        runner.join(120)
    sent.set()
    sampler.join(10)
    assert statuses == [0] * 100
    wait_until(lambda: len(ears.messages()) >= 100, 20, "100 messages")
    # A join after every send has ended comes after anything they caused.
    clients.append(listen(broker, "late"))
    ears.out.wait_for(lambda l: json.loads(l).get("name") == "late", 10, "late's join")
    kinds = [(r["type"], r.get("name") or r.get("from")) for r in ears.json_records()]
    assert kinds == [("join", "ears"), *[("message", "ci")] * 100, ("join", "late")]
    assert sorted(r["text"] for r in ears.messages()) == sorted(f"build {n}"
                                                               for n in range(1, 101))
    assert len(samples) >= 10 and all(sample == ["ears"] for sample in samples)


def test_a_listener_of_one_room_receives_no_frame_of_another(broker, clients):
    ci_ears = listen(broker, "ci-ears", "--room", "#ci")
    clients.append(ci_ears)
    # Subscribed exactly as the listener is: its room's topic and heartbeats.
    with raw_sub(broker.pub_port, m.room_topic("#ci"), m.HEARTBEAT_TOPIC) as ci_sub, \
            raw_sub(broker.pub_port, m.room_topic("#general")) as general_sub:
        general = [f"general {n}" for n in range(50)]
        ci = [f"ci {n}" for n in range(5)]
        assert run_cli(broker, "send", name="w", input="\n".join(general)).returncode == 0
        assert run_cli(broker, "send", "--room", "#ci", name="w",
                       input="\n".join(ci)).returncode == 0
        wait_until(lambda: len(ci_ears.messages()) >= 5, 10, "the #ci messages")
        # The PUB socket keeps its order: #general's 50 went out before #ci's 5.
        ci_frames = frames_until(ci_sub, ci)
        frames_until(general_sub, general)  # the control: they were published
    assert {topic for topic, _ in ci_frames} <= {m.room_topic("#ci"), m.HEARTBEAT_TOPIC}
    assert "general" not in json.dumps([events for _, events in ci_frames])  # 0 frames of it
    assert [(r["room"], r["text"]) for r in ci_ears.messages()] == [("#ci", t) for t in ci]
    assert [r for r in ci_ears.json_records() if r.get("room") != "#ci"] == []


def test_a_direct_message_never_goes_on_pub_and_reaches_both_sides(broker, clients):
    alice = as_person(new_secret_file())
    alice_ears = listen(broker, "alice", env=alice)
    bob_ears = Client(broker, "listen", "--dm", "--json", name="bob")
    clients += [alice_ears, bob_ears]
    wait_until(lambda: "bob" in online(broker), 10, "bob online")
    secret_text = f"psst {uuid.uuid4().hex}"
    with raw_sub(broker.pub_port, b"") as spy:  # every topic there is
        sent = run_cli(broker, "send", "--to", "bob", secret_text, name="alice", env=alice)
        assert sent.returncode == 0, sent.stderr
        dm = {"from": "alice", "to": "bob", "text": secret_text}
        for ears in (bob_ears, alice_ears):  # both sides, as on every device
            wait_until(lambda: ears.messages(), 10, "the direct message")
            assert {k: ears.messages()[0][k] for k in dm} == dm and "room" not in ears.messages()[0]
        # A room message after it: the spy has had everything published before.
        assert run_cli(broker, "send", "marker", name="w").returncode == 0
        seen = b""
        while b"marker" not in seen:
            assert spy.poll(5000), "the marker never reached the spy"
            seen += b"".join(spy.recv_multipart())
    assert secret_text.encode() not in seen and b"psst" not in seen
    wait_until(lambda: len(alice_ears.messages()) == 2, 10, "the marker in #general")
    assert [r["text"] for r in bob_ears.messages()] == [secret_text]  # --dm: no room


def test_one_person_listens_and_sends_at_once_and_a_stranger_is_refused(broker, clients):
    alice = as_person(new_secret_file())
    alice_ears = listen(broker, "alice", env=alice)
    clients.append(alice_ears)
    sent = run_cli(broker, "send", "from my other terminal", name="alice", env=alice)
    assert sent.returncode == 0, sent.stderr
    wait_until(lambda: alice_ears.messages(), 10, "her own message")
    assert [(r["from"], r["text"]) for r in alice_ears.messages()] == [
        ("alice", "from my other terminal")]
    for command in (["send", "hi"], ["listen"]):  # someone else's secret: another person
        stranger = run_cli(broker, *command, name="Alice", timeout=20)
        assert stranger.returncode == 4, stranger.stderr
        assert "the name alice is taken" in stranger.stderr
    assert online(broker) == ["alice"] and alice_ears.proc.poll() is None


def test_rooms_lists_member_counts_and_topics_and_listen_shows_the_topic(broker, clients):
    ears = listen(broker, "ears", "--room", "#ci", "--room", "#general")
    bob = Client(broker, "listen", "--room", "#CI", name="bob")  # text lines
    clients += [ears, bob]
    bob.out.wait_for(lambda l: l.endswith(" * bob joined"), 10, "bob in #ci")
    result = run_cli(broker, "topic", "#ci", "build", "green", name="carol")
    assert result.returncode == 0, result.stderr
    topic = json.loads(ears.out.wait_for(lambda l: '"topic"' in l, 10, "the topic event"))
    assert (topic["room"], topic["name"], topic["text"]) == ("#ci", "carol", "build green")
    # bob follows one room: its lines need not name it
    bob.out.wait_for(lambda l: l.endswith(" * carol set the topic: build green"), 10,
                     "the topic in bob's text lines")
    rooms = run_cli(broker, "rooms", "--json")
    assert rooms.returncode == 0, rooms.stderr
    assert json.loads(rooms.stdout) == [
        {"room": "#ci", "members": 2, "topic": "build green"},
        {"room": "#general", "members": 1, "topic": ""}]
    assert run_cli(broker, "rooms").stdout.splitlines() == ["#ci\t2\tbuild green",
                                                            "#general\t1\t"]
    assert run_cli(broker, "users", "--room", "#ci").stdout.split() == ["bob", "ears"]
    assert json.loads(run_cli(broker, "users", "--room", "#general", "--json").stdout) == ["ears"]
    assert not [r for r in ears.json_records() if r.get("name") == "carol" and
                r["type"] in ("join", "leave")]  # topic is quiet, like send


def test_a_quiet_listener_is_not_seen_but_gets_its_rooms(broker, clients):
    ci_ears = listen(broker, "ci-ears", "--room", "#ci")
    quiet = Client(broker, "listen", "--quiet", "--room", "#ci", "--json", name="watcher")
    clients += [ci_ears, quiet]
    broker.wait_log(lambda l: l.endswith(" join watcher (quiet)"), 10, "the quiet listener")
    assert online(broker) == online(broker, "#ci") == ["ci-ears"]
    assert run_cli(broker, "send", "--room", "#ci", "for the room", name="w").returncode == 0
    wait_until(lambda: quiet.messages(), 10, "the message")
    assert [(r["room"], r["text"]) for r in quiet.messages()] == [("#ci", "for the room")]
    # watcher entered #ci before the message: no join of theirs came before it
    assert [(r["type"], r.get("name") or r.get("from")) for r in ci_ears.json_records()] == [
        ("join", "ci-ears"), ("message", "w")]


def test_refusals_by_the_broker_exit_5(broker):
    result = run_cli(broker, "send", "--to", "nobody", "hello?", name="alice")
    assert result.returncode == 5, result.stderr
    assert "nobody is not online (user_offline)" in result.stderr


@pytest.mark.parametrize("argv", [
    ["listen", "--room", "bad name"],
    ["listen", "--room", "#ci", "--room", "ci"],
    ["listen", "--dm", "--quiet"],
    ["send", "--room", "#", "x"],
    ["send", "--to", "no body", "x"],
    ["send", "--room", "#ci", "--to", "bob", "x"],
    ["users", "--room", "#" + "x" * 33],
    ["topic", "general", "x"],
])
def test_a_bad_room_or_name_is_bad_usage_before_connecting(argv):
    # A long --timeout and no broker: were it connecting, this would not end in time.
    result = run_cli_exactly(*argv, "--timeout", "60", "--port", "9", timeout=15)
    assert result.returncode == 2, result.stderr
    assert any(why in result.stderr for why in ("is not a room name", "is not a user name",
                                                "not allowed with", "receives no direct"))


def test_send_announce_shows_the_sender_as_any_member(broker, clients):
    ears = listen(broker, "ears")
    clients.append(ears)
    assert run_cli(broker, "send", "--announce", "here I am", name="w").returncode == 0
    ears.out.wait_for(lambda l: '"leave"' in l, 10, "w to leave")
    assert [(r["type"], r.get("name") or r.get("from")) for r in ears.json_records()] == [
        ("join", "ears"), ("join", "w"), ("message", "w"), ("leave", "w")]


def test_every_room_and_direct_messages_survive_a_broker_restart_on_its_db(make_broker, clients,
                                                                           tmp_path):
    db = str(tmp_path / "chat.db")
    broker = make_broker("--db", db)
    ears = listen(broker, "ears", "--room", "#Lab", "--room", "#general")
    clients.append(ears)
    assert run_cli(broker, "topic", "#lab", "soldering", name="amy").returncode == 0
    for text in ["lab one", "lab two"]:
        assert run_cli(broker, "send", "--room", "#lab", text, name="amy").returncode == 0
    assert run_cli(broker, "send", "--to", "ears", "a secret", name="amy").returncode == 0
    wait_until(lambda: len(ears.messages()) == 3, 10, "three messages")
    broker.kill()  # SIGKILL: nothing gets to be tidied
    make_broker("--db", db, port=broker.port)
    assert run_cli(broker, "send", "--room", "#lab", "lab three", name="amy").returncode == 0
    wait_until(lambda: "ears" in online(broker), 20, "the listener to be back")
    assert run_cli(broker, "send", "--to", "ears", "another", name="amy").returncode == 0
    wait_until(lambda: len(ears.messages()) == 5, 20, "the messages after the restart")
    lab = [(r["seq"], r["text"]) for r in ears.messages() if r.get("room") == "#Lab"]
    dms = [(r["seq"], r["text"]) for r in ears.messages() if r.get("to") == "ears"]
    assert [t for _, t in lab] == ["lab one", "lab two", "lab three"]
    assert [s for s, _ in lab] == sorted(set(s for s, _ in lab))  # numbers go on, once each
    assert [t for _, t in dms] == ["a secret", "another"] and dms[1][0] == dms[0][0] + 1
    rooms = json.loads(run_cli(broker, "rooms", "--json").stdout)
    assert {"room": "#Lab", "members": 1, "topic": "soldering"} in rooms
