"""The chat end to end: a real broker process and real command-line clients."""

import json
import os
import pty
import signal
import subprocess
import time

import pytest

import messages as m
from hostile_text import HOSTILE_TEXTS, assert_neutralised
from procs import PYTHON, ROOT, Client, listen, run_cli, wait_until
from raw_peer import join, raw_dealer, request


def test_three_listeners_each_get_500_piped_lines_in_order_exactly_once(broker, clients):
    listeners = [listen(broker, f"l{i}") for i in range(3)]
    clients += listeners
    lines = [f"line {i}" for i in range(500)]
    result = run_cli(broker, "send", name="piper", input="\n".join(lines) + "\n")
    assert result.returncode == 0, result.stderr
    for listener in listeners:
        wait_until(lambda: len(listener.messages()) >= 500, 30, "500 messages")
        got = listener.messages()
        assert [r["text"] for r in got] == lines
        assert {r["from"] for r in got} == {"piper"}
        seqs = [r["seq"] for r in got]
        assert seqs == sorted(set(seqs))


def test_five_concurrent_senders_reach_three_listeners_in_one_order(broker, clients):
    listeners = [listen(broker, f"l{i}") for i in range(3)]
    clients += listeners
    senders = [Client(broker, "send", name=f"s{n}", stdin=subprocess.PIPE) for n in range(5)]
    clients += senders
    for n, sender in enumerate(senders):
        sender.proc.stdin.write("".join(f"{n}:{i}\n" for i in range(100)))
        sender.proc.stdin.close()
    assert [s.wait(60) for s in senders] == [0] * 5
    for listener in listeners:
        wait_until(lambda: len(listener.messages()) >= 500, 30, "500 messages")
    orders = [[(r["from"], r["text"]) for r in lst.messages()] for lst in listeners]
    assert orders[0] == orders[1] == orders[2]
    assert len(set(orders[0])) == 500
    for n in range(5):  # each sender's lines keep their own order
        assert [t for f, t in orders[0] if f == f"s{n}"] == [f"{n}:{i}" for i in range(100)]


def test_text_arguments_go_as_one_message_with_a_last_line_without_newline(broker, clients):
    listener = listen(broker, "ears")
    clients.append(listener)
    assert run_cli(broker, "send", "hello", "there", name="a").returncode == 0
    assert run_cli(broker, "send", name="b", input="one\n\n   \ntwo").returncode == 0
    wait_until(lambda: len(listener.messages()) >= 3, 10, "3 messages")
    assert [(r["from"], r["text"]) for r in listener.messages()] == [
        ("a", "hello there"), ("b", "one"), ("b", "two")]


def test_empty_stdin_sends_nothing_and_succeeds(broker):
    result = run_cli(broker, "send", name="quiet", input="")
    assert result.returncode == 0, result.stderr


def test_name_collision_is_refused(broker, clients):
    clients.append(listen(broker, "alice"))
    result = run_cli(broker, "send", "hi", name="ALICE")
    assert result.returncode == 4
    assert "taken" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_invalid_name_is_refused(broker):
    result = run_cli(broker, "send", "hi", name="no spaces")
    assert result.returncode == 4 and "invalid name" in result.stderr


def test_unreachable_broker_exits_3_within_timeout(broker):
    port = broker.port
    broker.kill()
    started = time.monotonic()
    result = run_cli(broker, "send", "hi", "--timeout", "1", name="lonely")
    assert result.returncode == 3, result.stderr
    # it gave up on the broker it was pointed at, not on some other address
    assert f"127.0.0.1:{port} unreachable" in result.stderr, result.stderr
    assert time.monotonic() - started < 10


def test_bad_usage_exits_2(broker):
    assert run_cli(broker, "listen", "--count", "0", name="x").returncode == 2
    assert run_cli(broker, "frobnicate").returncode == 2


def test_users_lists_who_is_online(broker, clients):
    clients += [listen(broker, "zed"), listen(broker, "amy")]
    result = run_cli(broker, "users", "--json")
    assert json.loads(result.stdout) == ["amy", "zed"]
    assert run_cli(broker, "users").stdout.split() == ["amy", "zed"]


def test_listen_text_format_and_count(broker, clients):
    listener = Client(broker, "listen", "--count", "2", name="reader")
    clients.append(listener)
    listener.out.wait_for(lambda l: l.endswith("* reader joined"), 10, "own join")
    sent = run_cli(broker, "send", name="w", input="first\nsecond\nthird\n")
    assert sent.returncode == 0, sent.stderr
    assert listener.wait(10) == 0
    lines = listener.out.lines
    assert len(lines) == 3 and lines[0].endswith("* reader joined")  # send is quiet
    assert lines[1].endswith(" w: first") and lines[2].endswith(" w: second")
    time.strptime(lines[-1][:8], "%H:%M:%S")


def test_listen_shows_control_characters_visibly(broker, clients):
    listener = Client(broker, "listen", "--count", str(len(HOSTILE_TEXTS)), name="reader")
    clients.append(listener)
    listener.out.wait_for(lambda l: "reader joined" in l, 10, "own join")
    texts = list(HOSTILE_TEXTS.values())
    for text in texts:  # as arguments: stdin would split at the \r
        assert run_cli(broker, "send", text, name="evil").returncode == 0
    assert listener.wait(10) == 0
    shown = [l for l in listener.out.lines if " evil: " in l]
    assert shown[0].endswith("evil: a\\x1b]0;pwned\\x07b")
    assert len(shown) == len(texts)
    for line, text in zip(shown, texts):
        assert_neutralised(line, text)


def test_sigkilled_client_is_announced_as_timeout_within_the_bound(make_broker, clients):
    broker = make_broker()  # default heartbeat: 1 s x 3
    watcher = listen(broker, "watcher")
    victim = listen(broker, "victim")
    clients += [watcher, victim]
    victim.proc.kill()
    killed_at = time.monotonic()
    line = watcher.out.wait_for(lambda l: json.loads(l).get("type") == "leave", 10, "a leave")
    assert time.monotonic() - killed_at <= 3 * 1.0 + 1
    leave = json.loads(line)
    assert (leave["name"], leave["reason"]) == ("victim", "timeout")


@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_and_sigterm_are_a_quit(broker, clients, sig, status):
    watcher = listen(broker, "watcher")
    quitter = listen(broker, "quitter")
    clients += [watcher, quitter]
    quitter.proc.send_signal(sig)
    assert quitter.wait(5) == status
    line = watcher.out.wait_for(lambda l: json.loads(l).get("type") == "leave", 5, "a leave")
    assert json.loads(line)["reason"] == "quit"  # not "timeout": the broker was told
    quitter.err.join(5)
    assert not any("Traceback" in l for l in quitter.err.lines), quitter.err.lines


def test_listener_survives_a_broker_restart_and_rejoins(broker, make_broker, clients):
    listener = listen(broker, "stayer")
    clients.append(listener)
    assert broker.stop() == 0
    listener.err.wait_for(lambda l: "connection lost" in l, 5, "the listener to notice")
    make_broker("--heartbeat-interval", "0.2", port=broker.port, pub_port=broker.pub_port)
    listener.err.wait_for(lambda l: "reconnected" in l, 15, "the listener to rejoin")
    assert run_cli(broker, "send", "after restart", name="late").returncode == 0
    wait_until(lambda: any(r["text"] == "after restart" for r in listener.messages()), 10,
               "the message after the restart")


def test_broker_exits_0_promptly_on_sigterm_and_sigint(make_broker):
    for sig in (signal.SIGTERM, signal.SIGINT):
        broker = make_broker()
        started = time.monotonic()
        broker.signal(sig)
        assert broker.proc.wait(5) == 0
        assert time.monotonic() - started < 2


def test_oversized_message_is_refused_clearly_and_the_broker_keeps_serving(broker, clients):
    listener = listen(broker, "ears")
    clients.append(listener)
    big = "x" * 5000
    result = run_cli(broker, "send", name="big", input=f"ok before\n{big}\nok after\n")
    assert result.returncode == 5
    assert "line 2 refused" in result.stderr and "limit is 4096" in result.stderr
    as_argument = run_cli(broker, "send", big, name="big2")
    assert as_argument.returncode == 5 and "message refused" in as_argument.stderr
    # the broker itself refuses it too, and drops a frame past its size limit
    with raw_dealer(broker.port) as raw:
        join(raw, "rawbig")
        error = request(raw, {"type": "say", "id": "1", "text": big})
        assert (error.code, error.id) == (m.ErrorCode.TEXT_TOO_LONG, "1")
        raw.send(b"x" * (m.max_frame_bytes(4096) + 1))
    broker.wait_log(lambda l: "text_too_long" in l, 5, "the refusal in the log")
    assert run_cli(broker, "send", "still here", name="after").returncode == 0
    wait_until(lambda: [r["text"] for r in listener.messages()] ==
               ["ok before", "ok after", "still here"], 10, "every accepted message")


def test_interactive_chat_on_a_terminal(broker, clients):
    listener = listen(broker, "ears")
    clients.append(listener)
    master, slave = pty.openpty()
    chat = subprocess.Popen([PYTHON, "cli_client.py", "--name", "typist", *broker.client_args],
                            cwd=ROOT, stdin=slave, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    os.close(slave)
    try:
        listener.out.wait_for(lambda l: '"typist"' in l and "join" in l, 10, "typist joins")
        os.write(master, "hello from a terminal\n".encode())
        wait_until(lambda: [r["text"] for r in listener.messages()] == ["hello from a terminal"],
                   10, "the typed line")
        os.write(master, b"/quit\n")
        assert chat.wait(10) == 0
        line = listener.out.wait_for(lambda l: '"leave"' in l, 5, "typist leaves")
        assert json.loads(line)["reason"] == "quit"
    finally:
        os.close(master)
        if chat.poll() is None:
            chat.kill()
        chat.communicate()


def test_a_broker_that_always_coalesces_still_delivers_in_order(make_broker, clients):
    """--backlog-requests 0: every pass waits up to --coalesce-ms after a frame."""
    broker = make_broker("--backlog-requests", "0", "--coalesce-ms", "20")
    listener = listen(broker, "ears")
    clients.append(listener)
    result = run_cli(broker, "send", name="mouth", input="one\ntwo\nthree\n")
    assert result.returncode == 0, result.stderr
    wait_until(lambda: [r["text"] for r in listener.messages()] == ["one", "two", "three"], 10,
               "every message, in order")
