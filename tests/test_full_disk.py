"""A broker with --db on a real full filesystem: refuses, keeps serving, resumes.

The filesystem is a 2 MiB tmpfs mounted for the test (this needs the right to
mount, as the README's root test run has; elsewhere the test is skipped),
filled to the last byte by a file that the test deletes to make room again.
Nothing acknowledged may be lost, nothing shown twice, and the broker must
neither crash nor, restarted on the full disk, crash at the first join.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess

import pytest

import messages as m
from procs import Client, listen, run_cli, wait_until
from raw_peer import join, raw_dealer, request

pytestmark = pytest.mark.slow


@pytest.fixture
def small_disk(tmp_path):
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=True)


def fill(path) -> None:
    """Write ``path`` until the filesystem has not one byte left."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        for size in (65536, 4096, 1):
            try:
                while True:
                    os.write(fd, bytes(size))
            except OSError:
                pass
    finally:
        os.close(fd)
    assert os.statvfs(os.path.dirname(path)).f_bfree == 0


def assert_refused_unavailable(sock, body: dict, times: int = 3) -> None:
    """Each of ``times`` tries (each a write the broker attempts) is refused
    ``unavailable``, with a time to wait, by a broker that keeps answering."""
    for _ in range(times):
        reply = request(sock, body)
        assert isinstance(reply, m.Error) and reply.code == m.ErrorCode.UNAVAILABLE, reply
        assert reply.retry_after and reply.retry_after > 0


def test_a_full_disk_refuses_messages_keeps_serving_and_resumes_losing_nothing(
        small_disk, make_broker, clients):
    db, filler = str(small_disk / "chat.db"), str(small_disk / "filler")
    broker = make_broker("--db", db, "--heartbeat-interval", "0.5")
    with raw_dealer(broker.port) as probe:  # a client the test drives by hand
        listener = listen(broker, "reader")
        clients.append(listener)
        sender = Client(broker, "send", "--timeout", "60", name="writer", stdin=subprocess.PIPE)
        clients.append(sender)
        lines = [f"line {i} " + "x" * 1000 for i in range(30)]
        sender.proc.stdin.write("".join(line + "\n" for line in lines[:5]))
        sender.proc.stdin.flush()
        wait_until(lambda: len(listener.messages()) == 5, 10, "the first 5 lines, stored")

        join(probe, "prober")  # just now: its session lasts 1.5 s without a request
        fill(filler)
        sender.proc.stdin.write("".join(line + "\n" for line in lines[5:20]))
        sender.proc.stdin.flush()
        broker.wait_log(lambda line: "cannot store events" in line, 10, "the failed write")
        # a room message is the sender's; a direct message reaches nobody,
        # and entering a room is refused: it would be a join to store
        assert_refused_unavailable(probe, {"type": "say", "id": "p1", "text": "psst",
                                           "to": "reader"})
        assert_refused_unavailable(probe, {"type": "join", "room": "#full"})
        users = run_cli(broker, "users")  # the broker still serves what needs no disk
        assert broker.proc.poll() is None and users.returncode == 0, broker.log.lines[-10:]
        assert "reader" in users.stdout.split()
        assert len(listener.messages()) == 5 and sender.proc.poll() is None

    # Restarted on the full disk: it starts, and joins wait instead of crashing it.
    broker.stop()
    broker.start()
    sender.proc.stdin.write("".join(line + "\n" for line in lines[20:]))
    sender.proc.stdin.close()
    broker.wait_log(lambda line: "cannot store events" in line, 10, "a join refused")
    with raw_dealer(broker.port) as probe:
        assert_refused_unavailable(probe, {"type": "hello", "name": "prober2",
                                           "v": m.PROTOCOL_VERSION})
    assert broker.proc.poll() is None and run_cli(broker, "users").returncode == 0

    os.remove(filler)
    assert sender.wait(60) == 0, sender.err.lines[-5:]
    wait_until(lambda: len(listener.messages()) >= len(lines), 20, "every line")
    assert [r["text"] for r in listener.messages()] == lines  # once each, in order
    seqs = [r["seq"] for r in listener.messages()]
    assert seqs == sorted(set(seqs))
    assert not [line for line in broker.log.lines if "Traceback" in line]

    broker.stop()
    with sqlite3.connect(db) as stored:
        texts = [row[0] for row in stored.execute(
            "SELECT text FROM stream_events WHERE type='message' ORDER BY seq")]
    assert texts == lines
