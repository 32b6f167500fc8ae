"""Connections that never join cannot lock the broker out (issue 14, item 3).

An attacker opens thousands of TCP connections from one address, completes
the ZeroMQ NULL handshake on each and then says nothing. Each would hold a
file of the broker's; past its file limit libzmq's accept() fails and no
newcomer gets in. The broker keeps at most --max-per-address connections per
address and port and closes the rest at once (admission.py); near its file
limit it refuses every new connection, so accept() never runs dry.

The broker's file limit is lowered with prlimit after it starts, so that
exhaustion is cheap: a few thousand connections instead of 20,000. The
newcomer connects from 127.0.0.2 (all of 127.0.0.0/8 is loopback on Linux),
using libzmq's "tcp://SOURCE:0;DESTINATION:PORT" endpoints, so it is another
address to the broker.
"""

from __future__ import annotations

import contextlib
import os
import queue
import resource
import socket
import struct
import time

import pytest

from client_session import Acked, ClientSession, Joined
from procs import wait_until

# The ZMTP 3.0 greeting of a NULL client and its READY command (RFC 23):
# all a DEALER says before its first message.
GREETING = b"\xff" + b"\x00" * 8 + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\x00") \
    + b"\x00" + b"\x00" * 31
_READY_BODY = b"\x05READY" + b"\x0bSocket-Type" + struct.pack(">I", 6) + b"DEALER"
READY = b"\x04" + bytes([len(_READY_BODY)]) + _READY_BODY
NEWCOMER_HOST = "127.0.0.2:0;127.0.0.1"


def broker_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def lower_file_limit(pid: int, soft: int) -> None:
    _, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))


@contextlib.contextmanager
def idle_connections(port: int, count: int):
    """``count`` TCP connections from 127.0.0.1 that complete the NULL
    handshake and then say nothing; closed on exit."""
    conns: list[socket.socket] = []
    try:
        for _ in range(count):
            conn = socket.socket()
            conns.append(conn)
            conn.settimeout(5)
            conn.connect(("127.0.0.1", port))
            try:
                conn.sendall(GREETING + READY)
            except OSError:
                pass  # already closed by the broker: a fine answer
            conn.setblocking(False)
        yield conns
    finally:
        for conn in conns:
            conn.close()


def still_open(conns: list[socket.socket]) -> int:
    """How many of ``conns`` the broker has not closed (their unread input,
    the broker's greeting, is read and dropped)."""
    count = 0
    for conn in conns:
        try:
            while conn.recv(4096):
                pass
        except BlockingIOError:
            count += 1
        except OSError:
            pass  # reset by the broker
    return count


def next_event(session: ClientSession, kind: type, timeout: float):
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        try:
            event = session.events.get(timeout=left)
        except queue.Empty:
            break
        if isinstance(event, kind):
            return event
    raise AssertionError(f"no {kind.__name__} within {timeout} s")


def newcomer_chats(broker, name: str, timeout: float = 10) -> None:
    """A normal client from 127.0.0.2 joins and has a line acknowledged."""
    session = ClientSession(NEWCOMER_HOST, broker.port, name, pub_port=broker.pub_port)
    session.start()
    try:
        assert next_event(session, Joined, timeout).name == name
        sent = session.send("hello from another address")
        assert next_event(session, Acked, timeout).id == sent
    finally:
        session.close()


def test_idle_connections_from_one_address_are_capped_and_a_newcomer_still_joins(make_broker):
    broker = make_broker("--max-per-address", "40")
    pid = broker.proc.pid
    # 3,000 idle connections would exhaust this limit many times over.
    lower_file_limit(pid, 1000)
    with idle_connections(broker.port, 3000) as conns:
        # The broker closes all but 40 of them, and holds few files.
        wait_until(lambda: still_open(conns) <= 40, 20, "the excess connections to be closed")
        assert broker_files(pid) < 150
        newcomer_chats(broker, "newcomer-one")
        assert broker.proc.poll() is None
    broker.wait_log(lambda line: "connection from 127.0.0.1 refused" in line, 5,
                    "the refusal to be logged")


def test_near_its_file_limit_the_broker_refuses_new_connections_and_logs_it(make_broker):
    broker = make_broker("--max-per-address", "5000")
    pid = broker.proc.pid
    lower_file_limit(pid, 400)
    with idle_connections(broker.port, 1000) as conns:
        # Headroom is left below the limit (64 files): accept() fails only
        # in short bursts, until the refused connections are closed.
        wait_until(lambda: broker_files(pid) <= 400 - 64 + 16, 20,
                   "the excess connections to be closed")
        broker.wait_log(lambda line: "of the file limit 400" in line, 5,
                        "the file limit to be logged")
    # Once they are gone, a newcomer gets in at once.
    wait_until(lambda: broker_files(pid) < 100, 10, "the idle connections to be closed")
    newcomer_chats(broker, "newcomer-two")
    assert broker.proc.poll() is None


@pytest.mark.slow
@pytest.mark.timeout(240)  # about 60 s on two cores: the broker accepts and refuses one by one
def test_15000_idle_connections_from_one_address_leave_a_newcomer_room(make_broker):
    """The issue's figure, at the broker's real file limit: 15,000 idle
    connections from one address hold at most 64 of its files."""
    broker = make_broker()
    with idle_connections(broker.port, 15_000) as conns:
        wait_until(lambda: still_open(conns) <= 64, 30, "the excess connections to be closed")
        assert broker_files(broker.proc.pid) < 150
        newcomer_chats(broker, "newcomer-three")
