"""bench/rawgen.py, the independent load generator: its parsing and its scan, and a
live trial against each server, so that a protocol change that breaks it shows here
rather than in a benchmark run."""

import shutil
import sys
import types
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import rawbench  # noqa: E402
import rawgen  # noqa: E402
import rawwire  # noqa: E402


def chunks(data: bytes, size: int):
    return [data[i:i + size] for i in range(0, len(data), size)]


def test_scan_counts_each_marker_once_however_the_reads_split_the_stream():
    assert len(rawgen.marker(7, 0)) == rawgen.MARK_LEN
    marker = "~07{:09d}{:019d}~" + rawgen.TEXT_PAD
    other_trial = "~08{:09d}{:019d}~" + rawgen.TEXT_PAD
    stream = b"".join(
        b'[{"type":"message","seq":%d,"text":"%s"}]' % (n, marker.format(n, 1).encode())
        + other_trial.format(n, 1).encode() for n in range(5))
    for size in range(1, len(stream) + 1):
        rawgen.Scan.start_trial(7)
        scan = rawgen.Scan()
        for piece in chunks(stream, size):
            scan.feed(piece)
        assert scan.count == 5, f"reads of {size} bytes"
        assert len(rawgen.Scan.latencies) == 5
    rawgen.Scan.stop_trial()


def test_scan_sees_a_probe_topic_split_over_two_reads():
    topic = rawwire.ZchatWire.ready_topic("0123456789abcdef")
    frame = rawwire.zmtp_message(topic, b'[{"type":"heartbeat"}]')
    for cut in range(1, len(frame)):
        scan = rawgen.Scan()
        seen = [scan.feed(frame[:cut], topic), scan.feed(frame[cut:], topic)]
        assert any(seen), f"cut at {cut}"


def test_zmtp_reader_parses_greeting_ready_and_long_multipart_messages_byte_by_byte():
    body = b"x" * 300  # past 255 bytes: the LONG form
    stream = (rawwire.zmtp_handshake(b"PUB") + rawwire.zmtp_message(b"r:#a\0", body)
              + rawwire.zmtp_message(b"one"))
    reader = rawwire.ZmtpReader()
    messages = []
    for piece in chunks(stream, 1):
        messages += reader.feed(piece)
    assert reader.ready and reader.peer_type == b"PUB"
    assert messages == [[b"r:#a\0", body], [b"one"]]


def test_zmtp_reader_refuses_another_mechanism():
    greeting = bytearray(rawwire.zmtp_greeting())
    greeting[12:32] = b"CURVE".ljust(20, b"\0")
    with pytest.raises(rawwire.ZmtpError):
        rawwire.ZmtpReader().feed(bytes(greeting))


SERVERS = ["zchat", "c-forwarder"] + (["redis"] if shutil.which("redis-server") else [])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", SERVERS)
def test_a_trial_reaches_every_listener_and_is_acknowledged(kind):
    opts = types.SimpleNamespace(senders=2, listener_procs=1)
    with rawbench.Rig(kind, 3, opts) as rig:  # joins, then a warm-up trial
        result = rig.trial(500, 100)
    assert result["sent"] == 100
    assert result["min_count"] == 100 and result["deliveries"] == 300
    assert result["errors"] == 0
    if kind != "c-forwarder":  # the forwarder acknowledges nothing
        assert result["acks"] == 100
    assert result["latency"]["p50_ms"] is not None


@pytest.mark.timeout(120)
def test_zchat_clients_join_one_after_another_and_all_at_once():
    opts = types.SimpleNamespace(join_timeout=30, idle_settle=0.1, idle_seconds=0.5)
    for mode in ("seq", "storm"):
        step = rawbench.join_step("zchat", 20, mode, opts)
        assert step["joined"] == 20 and step["complete"], step
        assert not step["errors"], step


@pytest.mark.timeout(60)
def test_a_zchat_listener_whose_session_timed_out_says_hello_again():
    """Silent past the broker's liveness (the generator stopped), a listener's next
    ping is answered not_joined; it joins again at once, as PROTOCOL.md says."""
    import json
    import os
    import signal
    import time

    from common import Target

    with rawbench.ExitStack() as stack:
        server = Target("zchat", extra_args=("--heartbeat-interval", "0.2")).start()
        stack.callback(server.stop)
        gen = rawbench.Gen(stack, server, "listen", 2, 1, "t")
        now = time.monotonic_ns()
        [joined] = gen.all(20, cmd="join", mode="storm", start_ns=now,
                           deadline_ns=now + 10 * 10**9)
        assert joined["joined"] == 2
        worker = gen.workers[0]
        os.kill(worker.pid, signal.SIGSTOP)
        try:
            time.sleep(3 * 0.2 + 0.6)  # silent past liveness x interval, plus sweeps
        finally:
            os.kill(worker.pid, signal.SIGCONT)
        deadline = time.monotonic() + 10
        while True:
            worker.command(json.dumps({"cmd": "stats"}))
            stats = worker.reply(10)
            if stats["errors"].get("rejoins", 0) >= 2 and stats["in_session"] == 2:
                break
            assert time.monotonic() < deadline, stats
            time.sleep(0.1)
        assert stats["errors"]["not_joined"] >= 2
