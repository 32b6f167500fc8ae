"""Nothing lost: faults with real processes, each bounded in time.

Every test checks the same promise from PROTOCOL.md: each listener shows every
accepted message once, in one order, whatever happened on the way.
"""

import json
import signal
import subprocess
import time

import pytest
import zmq

from procs import Client, listen, run_cli, wait_until
from scripted_broker import ScriptedBroker
from tcp_proxy import TcpProxy

pytestmark = pytest.mark.slow


def start_sender(broker, clients, name: str, *args: str) -> Client:
    sender = Client(broker, "send", "--timeout", "30", *args, name=name, stdin=subprocess.PIPE)
    clients.append(sender)
    return sender


def feed(sender: Client, lines: list[str], close: bool = False) -> None:
    sender.proc.stdin.write("".join(line + "\n" for line in lines))
    sender.proc.stdin.flush()
    if close:
        sender.proc.stdin.close()


def chat(listener: Client) -> list[tuple[int, str, str]]:
    return [(r["seq"], r["from"], r["text"]) for r in listener.messages()]


def assert_one_order_exactly_once(listeners, expected: set[tuple[str, str]]) -> None:
    orders = [chat(lst) for lst in listeners]
    assert all(order == orders[0] for order in orders)
    seqs = [seq for seq, _, _ in orders[0]]
    assert seqs == sorted(set(seqs)), "sequence numbers repeat or go back"
    assert len(orders[0]) == len(expected)
    assert {(f, t) for _, f, t in orders[0]} == expected


def test_ten_senders_by_a_thousand_reach_five_listeners_identically(make_broker, clients):
    broker = make_broker("--history", "20000", "--burst", "100000")
    listeners = [listen(broker, f"l{i}") for i in range(5)]
    clients += listeners
    senders = [start_sender(broker, clients, f"s{n}") for n in range(10)]
    expected = set()
    for n, sender in enumerate(senders):
        lines = [f"{n}/{i}" for i in range(1000)]
        expected |= {(f"s{n}", line) for line in lines}
        feed(sender, lines, close=True)
    assert [s.wait(120) for s in senders] == [0] * 10
    for listener in listeners:
        wait_until(lambda: len(listener.messages()) >= 10_000, 60, "10,000 messages")
    assert_one_order_exactly_once(listeners, expected)


def test_listener_past_its_high_water_mark_recovers_every_message(make_broker, clients):
    # A long liveness keeps the frozen listener joined; the history is deep
    # enough to hold the whole burst it misses.
    broker = make_broker("--heartbeat-liveness", "20", "--history", "20000",
                         "--rate", "100000", "--burst", "100000", "--log-level", "DEBUG")
    steady = listen(broker, "steady")
    slow = listen(broker, "slow")
    clients += [steady, slow]
    slow.proc.send_signal(signal.SIGSTOP)  # its SUB stops reading: queues overflow
    try:
        filler = "x" * 3000
        lines = [f"{i} {filler}" for i in range(10_000)]
        assert run_cli(broker, "send", "--timeout", "60", name="burst",
                       input="\n".join(lines), timeout=120).returncode == 0
        wait_until(lambda: len(steady.messages()) >= 10_000, 60, "the steady listener")
    finally:
        slow.proc.send_signal(signal.SIGCONT)
    wait_until(lambda: len(slow.messages()) >= 10_000, 60, "the slow listener to catch up")
    assert_one_order_exactly_once([steady, slow], {("burst", line) for line in lines})
    # the loss really happened and was repaired from the broker's history
    broker.wait_log(lambda l: "fetch by slow" in l, 5, "the slow listener's fetch")
    assert not any(json.loads(l)["type"] == "gap" for l in slow.out.lines)


def test_broker_killed_mid_stream_and_restarted_on_its_db_loses_and_doubles_nothing(
        make_broker, clients, tmp_path):
    db = str(tmp_path / "chat.db")
    # history deeper than the whole test, so a listener that reconnects late
    # still finds what it missed in the broker's memory
    broker = make_broker("--db", db, "--history", "5000")
    listeners = [listen(broker, f"l{i}") for i in range(2)]
    clients += listeners
    senders = [start_sender(broker, clients, f"s{n}") for n in range(3)]
    lines = {n: [f"{n}/{i}" for i in range(400)] for n in range(3)}
    for n, sender in enumerate(senders):
        feed(sender, lines[n][:200])
    wait_until(lambda: len(listeners[0].messages()) >= 100, 20, "the stream to flow")
    broker.kill()
    for n, sender in enumerate(senders):
        feed(sender, lines[n][200:], close=True)
    seq_before = max(seq for seq, _, _ in chat(listeners[0]))
    make_broker("--db", db, "--history", "5000", port=broker.port)
    assert [s.wait(60) for s in senders] == [0] * 3
    expected = {(f"s{n}", line) for n in range(3) for line in lines[n]}
    for listener in listeners:
        wait_until(lambda: len(listener.messages()) >= 1200, 30, "every message")
    assert_one_order_exactly_once(listeners, expected)
    assert max(seq for seq, _, _ in chat(listeners[0])) > seq_before


def test_frozen_client_is_announced_gone_then_rejoins_and_catches_up(broker, clients):
    watcher = listen(broker, "watcher")
    frozen = listen(broker, "frozen")
    clients += [watcher, frozen]
    frozen.proc.send_signal(signal.SIGSTOP)
    try:
        line = watcher.out.wait_for(lambda l: json.loads(l)["type"] == "leave", 10, "a leave")
        assert json.loads(line)["reason"] == "timeout"
        assert run_cli(broker, "send", name="talker", input="while\nyou\nslept\n").returncode == 0
    finally:
        frozen.proc.send_signal(signal.SIGCONT)
    frozen.err.wait_for(lambda l: "reconnected" in l or "connection lost" in l, 15, "reconnect")
    wait_until(lambda: [t for _, _, t in chat(frozen)] == ["while", "you", "slept"], 15,
               "the frozen client to catch up")
    wait_until(lambda: [r["name"] for r in watcher.json_records()
                        if r["type"] == "join"].count("frozen") == 2, 10, "frozen to rejoin")


def test_reconnect_within_the_window_keeps_the_name_without_leave_or_join(make_broker, clients):
    broker = make_broker("--heartbeat-interval", "0.5")
    proxy = TcpProxy(broker.port)
    try:
        watcher = listen(broker, "watcher")
        blip = listen(proxy, "blip")
        clients += [watcher, blip]
        proxy.cut()
        # blip notices, reconnects through the proxy and resumes its session
        broker.wait_log(lambda l: "resume blip" in l, 10, "blip to resume")
        assert run_cli(broker, "send", "still there?", name="asker").returncode == 0
        wait_until(lambda: [t for _, _, t in chat(blip)] == ["still there?"], 10,
                   "blip to receive after the blip")
        # after the resume: anything the blip caused is ordered before it
        watcher.out.wait_for(lambda l: "still there?" in l, 10, "asker's message")
        presence = [(r["type"], r["name"]) for r in watcher.json_records() if r["type"] != "message"]
        assert [p for p in presence if p[1] == "blip"] == [("join", "blip")]
        assert run_cli(broker, "send", "hi", name="blip").returncode == 4  # still taken
    finally:
        proxy.close()


def test_listen_history_prints_earlier_messages_first_marked(broker, clients):
    assert run_cli(broker, "send", name="old", input="one\ntwo\nthree\n").returncode == 0
    late = listen(broker, "late", "--history", "2")
    clients.append(late)
    assert run_cli(broker, "send", "four", name="new").returncode == 0
    wait_until(lambda: len(late.messages()) >= 3, 10, "history and the live message")
    records = late.messages()
    assert [(r["text"], r.get("history", False)) for r in records] == [
        ("two", True), ("three", True), ("four", False)]


def test_a_broker_that_dies_after_reading_hello_is_replaced_and_send_still_succeeds(
        make_broker, clients):
    """The hello is read and never answered; a new broker takes the ports
    0.5 s later, and its heartbeats reach the client's reconnected SUB. The
    client must give the hello up and say it again, not wait forever."""
    ctx = zmq.Context()
    doomed = ScriptedBroker(ctx)
    port = doomed.port
    sender = Client(doomed, "send", "--timeout", "20", "made it", name="ann")
    clients.append(sender)
    try:
        doomed.answer_probe("e-dead", 0, timeout=10)
        doomed.expect("hello", timeout=10)
    finally:
        doomed.close()
        ctx.term()
    time.sleep(0.5)  # the scenario's gap before the new broker is up
    broker = make_broker(port=port, pub_port=port + 1)
    assert sender.wait(25) == 0, sender.err.lines
    broker.wait_log(lambda line: "join ann" in line, 5, "ann to join the new broker")
