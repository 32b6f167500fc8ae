"""outbound.py's readings of the kernel, checked against real sockets.

The books count replies in wire bytes and compare them with TCP_INFO's
tcpi_bytes_acked: if the framing were counted wrong, or the offset in
struct tcp_info were wrong, every connection would drift over (or under)
its limit. Here a ROUTER sends replies of every framing size to a DEALER
that reads them all, plain and with CurveZMQ, and the kernel's count must
match ours to the byte.
"""

from __future__ import annotations

import socket
import time

import pytest
import zmq

import outbound
from procs import wait_until

SIZES = [0, 1, 221, 222, 253, 254, 255, 256, 300, 65_536, 400_000]


def pair(ctx: zmq.Context, curve: bool):
    router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    for sock in (router, dealer):
        sock.setsockopt(zmq.LINGER, 0)
    if curve:
        server_public, server_secret = zmq.curve_keypair()
        client_public, client_secret = zmq.curve_keypair()
        router.curve_server = True
        router.curve_secretkey = server_secret
        dealer.curve_serverkey = server_public
        dealer.curve_publickey = client_public
        dealer.curve_secretkey = client_secret
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer.connect(f"tcp://127.0.0.1:{port}")
    return router, dealer


@pytest.mark.parametrize("curve", [False, True], ids=["null", "curve"])
def test_wire_bytes_match_the_bytes_the_kernel_counts_as_acknowledged(curve):
    ctx = zmq.Context()
    try:
        router, dealer = pair(ctx, curve)
        dealer.send(b"hello")
        routing_id = router.recv()
        first = router.recv(copy=False)
        fd = first.get(zmq.SRCFD)
        books = outbound.Outbound(1 << 30, 0, curve)
        books.first_seen(routing_id, fd)
        for size in SIZES:
            router.send_multipart([routing_id, b"r" * size])
            books.sent(routing_id, size)
        for size in SIZES:
            assert len(dealer.recv()) == size
        mine = books.replies[routing_id]
        assert mine.sent == sum(outbound.wire_bytes(size, curve) for size in SIZES)
        wait_until(lambda: outbound._acked(fd) - mine.acked_base == mine.sent, 5,
                   "the kernel's count to match the books")
    finally:
        ctx.destroy(linger=0)


def test_disconnect_ends_the_connection_only_if_the_descriptor_is_still_its_own():
    ctx = zmq.Context()
    try:
        router, dealer = pair(ctx, False)
        dealer.setsockopt(zmq.RECONNECT_IVL, 10_000)  # stay away once cut
        dealer.send(b"hello")
        routing_id = router.recv()
        fd = router.recv(copy=False).get(zmq.SRCFD)
        ino, _, _ = outbound._reading(fd)
        assert not outbound.disconnect(fd, ino + 1)  # as if the descriptor were another's now
        router.send_multipart([routing_id, b"still here"])
        assert dealer.poll(5000) and dealer.recv() == b"still here"
        assert outbound.disconnect(fd, ino)
        # libzmq notices, closes the descriptor and forgets the peer.
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)

        def forgotten() -> bool:
            try:
                router.send_multipart([routing_id, b"gone?"], zmq.NOBLOCK)
            except zmq.ZMQError as e:
                return e.errno == zmq.EHOSTUNREACH
            time.sleep(0.02)
            return False

        wait_until(forgotten, 5, "the ROUTER to forget the peer")
    finally:
        ctx.destroy(linger=0)


@pytest.mark.parametrize("text,size", [("512M", 512 << 20), ("1G", 1 << 30), ("64KiB", 65536),
                                       ("1000", 1000), ("1.5m", 3 << 19), ("256mb", 256 << 20)])
def test_sizes_are_read_in_powers_of_1024(text, size):
    assert outbound.parse_size(text) == size


@pytest.mark.parametrize("text", ["", "M", "0", "-1G", "ten", "5X"])
def test_a_size_that_is_not_one_is_refused(text):
    with pytest.raises(ValueError):
        outbound.parse_size(text)


def test_reading_a_descriptor_that_is_no_tcp_connection_gives_nothing():
    a, b = socket.socketpair()
    with a, b:
        assert outbound._reading(a.fileno()) is None
        assert outbound._acked_if_idle(a.fileno()) is None
        assert outbound.peer_address(a.fileno()) is None


def tcp_pair():
    listener = socket.create_server(("127.0.0.1", 0))
    with listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    return server, client


def test_one_tcp_info_tells_an_empty_send_queue_from_a_full_one():
    """The sweep's one-call reading of a subscriber must agree with the full
    one (TIOCOUTQ): acknowledged bytes while nothing is queued, None while
    something is."""
    server, client = tcp_pair()
    with server, client:
        fd = server.fileno()
        server.sendall(b"x" * 1000)
        wait_until(lambda: outbound._reading(fd)[2] == 0, 5, "the bytes acknowledged")
        assert outbound._acked_if_idle(fd) == outbound._reading(fd)[1] == 1000
        server.setblocking(False)
        with pytest.raises(BlockingIOError):
            while True:  # the client reads nothing: fill its window and our queue
                server.send(b"y" * 65536)
        assert outbound._reading(fd)[2] > 0
        assert outbound._acked_if_idle(fd) is None


def test_the_peer_address_is_what_getpeername_says():
    server, client = tcp_pair()
    with server, client:
        assert outbound.peer_address(server.fileno()) == server.getpeername()


def test_a_connection_whose_session_just_ended_still_gets_the_replies_of_that_pass():
    """A client kicked for flooding gets its last replies and the reason, built
    in the same pass while it was joined: the books must not judge those by
    the small limit of a connection that never joined (it has had no chance
    to read them yet)."""
    ctx = zmq.Context()
    try:
        router, dealer = pair(ctx, curve=False)
        dealer.send(b"hello")
        routing_id = router.recv()
        fd = router.recv(copy=False).get(zmq.SRCFD)
        books = outbound.Outbound(1 << 30, 0, False)
        books.first_seen(routing_id, fd)
        now = 100.0
        # One pass: many replies, counted as handed to libzmq, none sent yet.
        while books.replies[routing_id].outstanding < 2 * outbound.NOT_JOINED_BYTES:
            assert books.may_reply(routing_id, True, now)
            books.sent(routing_id, 100)
        assert books.may_reply(routing_id, False, now)  # kicked in this pass: the reason goes
        # A connection that stays without a session is held to the small limit.
        assert not books.may_reply(routing_id, False, now + outbound.SLOW_S + 1)
    finally:
        ctx.destroy(linger=0)
