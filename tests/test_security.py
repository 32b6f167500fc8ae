"""Encryption, authentication and abuse limits, with real broker processes."""

import stat

import pytest

import keys
import messages as m
from procs import Client, listen, run_cli, wait_until
from raw_peer import join, raw_dealer, receive_reply, send_body
from tcp_proxy import TcpProxy

SECRET_TEXT = "the-launch-code-is-0000"


@pytest.fixture
def key_dir(tmp_path):
    """Keys for the broker and for alice; only alice is on the allow list."""
    keys.generate(tmp_path / "broker", "broker")
    keys.generate(tmp_path / "allowed", "alice")
    keys.generate(tmp_path / "others", "mallory")
    return tmp_path


def test_generated_secret_is_private_and_public_is_shareable(tmp_path):
    public, secret = keys.generate(tmp_path, "someone")
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert stat.S_IMODE(public.stat().st_mode) == 0o644
    pair = keys.load_key_pair(secret)
    assert keys.load_public_key(str(public)) == pair.public
    assert keys.load_public_key(pair.public.decode()) == pair.public
    with pytest.raises(keys.KeyFileError):
        keys.load_key_pair(public)
    with pytest.raises(keys.KeyFileError):
        keys.load_public_key("not-a-key")


def test_old_libzmq_is_refused():
    assert keys.libzmq_problem() is None
    assert "too old" in keys.libzmq_problem((4, 3, 2))


@pytest.mark.parametrize("host,loopback", [("127.0.0.1", True), ("127.1.2.3", True),
                                           ("::1", True), ("localhost", True),
                                           ("0.0.0.0", False), ("*", False), ("10.0.0.1", False)])
def test_loopback_detection_for_the_unencrypted_warning(host, loopback):
    assert keys.is_loopback(host) == loopback


def test_encrypted_chat_works_and_shows_no_plaintext_on_the_wire(make_broker, clients, key_dir):
    broker = make_broker("--curve-secret", str(key_dir / "broker" / "broker.key_secret"))
    wiretap = TcpProxy(broker.port)
    server_key = ["--server-key", str(key_dir / "broker" / "broker.key")]
    try:
        listener = listen(wiretap, "ears", *server_key)
        clients.append(listener)
        assert run_cli(wiretap, "send", SECRET_TEXT, *server_key, name="spy").returncode == 0
        wait_until(lambda: [r["text"] for r in listener.messages()] == [SECRET_TEXT], 10,
                   "the encrypted message")
        assert len(wiretap.captured) > 1000
        assert SECRET_TEXT.encode() not in wiretap.captured
        assert b"spy" not in wiretap.captured
    finally:
        wiretap.close()


def test_the_wiretap_does_see_plaintext_without_encryption(broker, clients):
    wiretap = TcpProxy(broker.port)
    try:
        listener = listen(wiretap, "ears")
        clients.append(listener)
        assert run_cli(wiretap, "send", SECRET_TEXT, name="spy").returncode == 0
        wait_until(lambda: listener.messages(), 10, "the message")
        assert SECRET_TEXT.encode() in wiretap.captured
    finally:
        wiretap.close()


def test_wrong_or_missing_server_key_cannot_join(make_broker, key_dir):
    broker = make_broker("--curve-secret", str(key_dir / "broker" / "broker.key_secret"))
    plain = run_cli(broker, "send", "hi", "--timeout", "1", name="nokey")
    assert plain.returncode == 3
    wrong = run_cli(broker, "send", "hi", "--timeout", "1",
                    "--server-key", str(key_dir / "others" / "mallory.key"), name="wrongkey")
    assert wrong.returncode == 3 and "wrong --server-key" in wrong.stderr
    assert run_cli(broker, "users", "--json", "--timeout", "1").returncode == 3


def test_allow_list_admits_listed_keys_under_their_own_name_only(make_broker, key_dir):
    broker = make_broker("--curve-secret", str(key_dir / "broker" / "broker.key_secret"),
                         "--allow", str(key_dir / "allowed"))
    server_key = ["--server-key", str(key_dir / "broker" / "broker.key")]
    alice = ["--key", str(key_dir / "allowed" / "alice.key_secret")]
    assert run_cli(broker, "send", "hi", *server_key, *alice, name="alice").returncode == 0
    taken = run_cli(broker, "send", "hi", *server_key, *alice, name="bob")
    assert taken.returncode == 4 and "may not use the name" in taken.stderr
    unlisted = run_cli(broker, "send", "hi", "--timeout", "1", *server_key,
                       "--key", str(key_dir / "others" / "mallory.key_secret"), name="mallory")
    assert unlisted.returncode == 3
    throwaway = run_cli(broker, "send", "hi", "--timeout", "1", *server_key, name="anon")
    assert throwaway.returncode == 3


def test_a_flooding_client_is_limited_then_disconnected_and_others_are_undisturbed(
        make_broker, clients):
    broker = make_broker("--rate", "50", "--burst", "20")
    listener = listen(broker, "bystander")
    clients.append(listener)
    codes = []
    with raw_dealer(broker.port) as flooder:
        join(flooder, "flooder")

        def read_replies(timeout: float) -> bool:
            """Record the replies waiting (or one within ``timeout``); True if any came."""
            came = False
            while (reply := receive_reply(flooder, timeout)) is not None:
                codes.append(reply.code if isinstance(reply, m.Error) else reply.TYPE)
                came, timeout = True, 0
            return came

        for i in range(1100):
            send_body(flooder, {"type": "say", "id": str(i), "text": "spam"})
            # Read as we go, with at most 500 unanswered: the broker reads up
            # to 1,000 requests a pass and answers them at once, and past its
            # queue of 1,000 replies for this client it drops the rest (the
            # kick's reason among them).
            read_replies(0)
            while i + 1 - len(codes) > 500:
                assert read_replies(5), f"no answer after {codes[-3:]}"
        while m.ErrorCode.FLOODING not in codes:
            assert read_replies(5), f"no answer after {codes[-3:]}"
    kicked_at = codes.index(m.ErrorCode.FLOODING)
    assert codes.count("ack") == 20 and m.ErrorCode.RATE_LIMITED in codes[:kicked_at]
    assert set(codes[kicked_at + 1:]) <= {m.ErrorCode.NOT_JOINED}  # a stranger from then on
    listener.out.wait_for(lambda l: '"kicked"' in l and "flooder" in l, 5, "the kick")
    assert run_cli(broker, "send", "calm", name="normal").returncode == 0
    wait_until(lambda: listener.messages()[-1]["text"] == "calm", 5, "a normal message")
    broker.wait_log(lambda l: "rate limited flooder" in l, 5, "the log line")


def test_a_fast_pipe_is_paced_by_the_rate_limit_but_loses_nothing(make_broker, clients):
    broker = make_broker("--rate", "500", "--burst", "50")
    listener = listen(broker, "ears")
    clients.append(listener)
    lines = [f"log line {i}" for i in range(1500)]
    result = run_cli(broker, "send", name="logger", input="\n".join(lines), timeout=60)
    assert result.returncode == 0, result.stderr
    wait_until(lambda: len(listener.messages()) >= 1500, 30, "every line")
    assert [r["text"] for r in listener.messages()] == lines
