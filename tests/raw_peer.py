"""Hostile peers for the security tests: raw sockets, fuzz frames, memory readings.

A real client never sends what these helpers send: they speak to the broker
below cli_client.py, as an attacker would, with a ZeroMQ DEALER of their own
(optionally with a routing id of their choice) or a plain TCP socket.

Every socket made here has LINGER 0 and is closed in a ``finally``, so a
failing test never leaves the context hanging at exit.
"""

from __future__ import annotations

import contextlib
import json
import random
import socket
import struct
import sys
import time
import uuid

import zmq

import messages as m

# Names the fuzzers draw from. They are all valid names of at most 8 lowercase
# letters (or the fixed ones below), so a fuzzer can never take the name of a
# test's legitimate client: those names all contain a '-'.
FUZZ_FIXED_NAMES = ["mallory", "alice", "ALICE", "Alice.", "a" * 33, "", "bad name", "\u00e9ve"]


# The session token each joined raw socket got in its welcome.
SESSION_TOKENS: dict[zmq.Socket, str] = {}


@contextlib.contextmanager
def raw_dealer(port: int, routing_id: bytes | None = None, ctx: zmq.Context | None = None):
    """A DEALER connected to the broker's request port; closed on exit."""
    sock = (ctx or zmq.Context.instance()).socket(zmq.DEALER)
    try:
        sock.setsockopt(zmq.LINGER, 0)
        if routing_id is not None:
            sock.setsockopt(zmq.ROUTING_ID, routing_id)
        sock.connect(f"tcp://127.0.0.1:{port}")
        yield sock
    finally:
        SESSION_TOKENS.pop(sock, None)
        sock.close(linger=0)


@contextlib.contextmanager
def raw_sub(pub_port: int, *topics: bytes, timeout: float = 10.0):
    """A SUB on the broker's broadcasts, subscribed to ``topics`` (b"": all),
    given once the broker proved its subscriptions live: every frame
    published from then on reaches it. Closed on exit."""
    sock = zmq.Context.instance().socket(zmq.SUB)
    try:
        sock.setsockopt(zmq.LINGER, 0)
        for topic in topics:
            sock.setsockopt(zmq.SUBSCRIBE, topic)
        # Subscriptions of one connection are taken in order: an answer on
        # this last one proves the others are in place (the clients' probe).
        ready = m.READY_TOPIC_PREFIX + uuid.uuid4().hex.encode()
        sock.setsockopt(zmq.SUBSCRIBE, ready)
        sock.connect(f"tcp://127.0.0.1:{pub_port}")
        while True:
            assert sock.poll(int(timeout * 1000)), "the broker never answered the ready probe"
            if sock.recv_multipart()[0] == ready:
                break
        sock.setsockopt(zmq.UNSUBSCRIBE, ready)
        yield sock
    finally:
        sock.close(linger=0)


def frame_of(body: dict) -> bytes:
    return json.dumps(body).encode()


def send_body(sock: zmq.Socket, body: dict | bytes | list[bytes]) -> None:
    """Send a JSON body, one raw frame, or a raw multipart message. A JSON
    request from a socket that joined carries its session token, as a real
    client's does, unless the body names one itself."""
    if isinstance(body, dict):
        token = SESSION_TOKENS.get(sock)
        if token and "session" not in body and body.get("type") not in ("hello", "who"):
            body = {**body, "session": token}
        sock.send(frame_of(body))
    elif isinstance(body, bytes):
        sock.send(body)
    else:
        sock.send_multipart(body)


def receive_reply(sock: zmq.Socket, timeout: float):
    """The next reply decoded, or None when none comes within ``timeout`` s."""
    if not sock.poll(int(timeout * 1000)):
        return None
    return m.decode_reply(sock.recv_multipart())


def request(sock: zmq.Socket, body, timeout: float = 5.0):
    """Send ``body`` and return the decoded reply (None if silent). The
    position of the user's direct messages, which the broker sends at a
    heartbeat after they changed, is no reply: it is passed over."""
    send_body(sock, body)
    deadline = time.monotonic() + timeout
    while True:
        reply = receive_reply(sock, max(0.0, deadline - time.monotonic()))
        if not isinstance(reply, m.Position):
            return reply


def join(sock: zmq.Socket, name: str, **extra) -> m.Welcome:
    reply = request(sock, {"type": "hello", "name": name, "v": m.PROTOCOL_VERSION, **extra})
    assert isinstance(reply, m.Welcome), f"{name} was not welcomed: {reply}"
    SESSION_TOKENS[sock] = reply.resume
    return reply


def drain(sock: zmq.Socket) -> int:
    """Read every reply already waiting; how many there were."""
    count = 0
    while True:
        try:
            sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return count
        count += 1


def learn_routing_id(broker, sock: zmq.Socket) -> bytes:
    """The routing id the broker's ROUTER gave ``sock``, read from its log.

    The broker logs the routing id of a peer it refuses, so an unknown type
    with a unique marker makes its own log line. This is more than an
    attacker knows; it gives the takeover tests the strongest attacker.
    """
    marker = "probe" + uuid.uuid4().hex
    reply = request(sock, {"type": marker})
    assert isinstance(reply, m.Error), reply
    line = broker.wait_log(lambda l: marker in l and "refused from " in l, 5, "the probe's log line")
    return bytes.fromhex(line.split("refused from ", 1)[1].split(":", 1)[0])


def send_tcp_garbage(port: int, payload: bytes, timeout: float = 2.0) -> None:
    """Connect a plain TCP socket, write ``payload``, close. The broker may
    cut us off half way, which is a fine answer to garbage."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        # Linger on, 0 s: close() resets at once instead of lingering.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.sendall(payload)
    except OSError:
        pass
    finally:
        sock.close()


def unread_socket(ctx: zmq.Context, kind: int, port: int) -> zmq.Socket:
    """A DEALER or SUB on 127.0.0.1:``port`` that takes next to nothing off the
    wire (a queue of one message, a 4 KiB kernel buffer): what the broker
    sends it piles up in the broker. A SUB subscribes to everything."""
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, 1)
    sock.setsockopt(zmq.RCVBUF, 4096)
    if kind == zmq.SUB:
        sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.connect(f"tcp://127.0.0.1:{port}")
    return sock


def rss_mib(pid: int) -> float:
    """Resident memory of a process (VmRSS), in MiB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


# --- fast fuzz frames for live brokers -----------------------------------------------

# Values that stress a decoder: wrong types, edge numbers, odd strings.
_ODD_VALUES = [None, True, False, 0, -1, 1, 2**31, 2**53 + 1, 2**64, -(2**63), 10**300, 1.5,
               -0.0, 1e308, "", " ", "\x00", "\u202e", "\U0001f389", "x" * 200, [], {}, [1, "a"],
               {"type": "say"}, "NaN"]
_ODD_LITERALS = [b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e999", b"1" + b"0" * 5000,
                 b'"\\ud800"', b'"\\udfff\\ud800"', b'"\\u0000"', b"[" * 2000 + b"]" * 2000,
                 b'{"a":' * 2000 + b"1" + b"}" * 2000]


class FrameFuzzer:
    """Random and mutated requests, quick enough for 100,000 a test.

    Each call returns the frames of one multipart message: mostly a valid
    request shape with a field mutated, dropped, retyped, duplicated or
    resized; otherwise random bytes, odd JSON literals or a wrong frame count.
    """

    def __init__(self, seed: int, max_text: int = m.DEFAULT_MAX_TEXT_BYTES):
        self.rng = random.Random(seed)
        self.max_frame = m.max_frame_bytes(max_text)
        self.max_text = max_text
        self.counter = 0

    def name(self) -> str:
        rng = self.rng
        if rng.random() < 0.3:
            return rng.choice(FUZZ_FIXED_NAMES)
        return "".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(1, 8)))

    def text(self) -> str:
        rng = self.rng
        roll = rng.random()
        if roll < 0.01:
            return "y" * (self.max_text + rng.choice([0, 1, 100]))
        if roll < 0.1:
            return "".join(chr(rng.randint(0, 0x2FFF)) for _ in range(rng.randint(0, 20)))
        return f"fuzz {self.counter}"

    def valid_body(self) -> dict:
        rng = self.rng
        self.counter += 1
        kind = rng.choice(["hello", "say", "say", "say", "who", "ping", "fetch", "recent", "bye"])
        body = {"type": kind}
        if kind == "hello":
            body.update(name=self.name(), v=m.PROTOCOL_VERSION)
            if rng.random() < 0.2:
                body["resume"] = uuid.UUID(int=rng.getrandbits(128)).hex
        elif kind == "say":
            body.update(id=f"f{self.counter}", text=self.text())
        elif kind == "fetch":
            after = rng.randint(0, 3000)
            body.update(after=after, until=after + rng.randint(-5, 2000))
        elif kind == "recent":
            body["count"] = rng.randint(-5, m.MAX_FETCH_EVENTS + 5)
        return body

    def mutate(self, body: dict) -> dict:
        rng = self.rng
        body = dict(body)
        for _ in range(rng.randint(1, 3)):
            key = rng.choice([*body, "type", "from", "name", "seq", "extra"])
            action = rng.random()
            if action < 0.25:
                body.pop(key, None)
            elif action < 0.75:
                body[key] = rng.choice(_ODD_VALUES)
            else:
                body[key] = rng.choice(["hello", "say", "welcome", "message", "teleport", "alice"])
        return body

    def raw_frame(self) -> bytes:
        rng = self.rng
        roll = rng.random()
        if roll < 0.3:
            return rng.randbytes(rng.randint(0, 64))
        if roll < 0.6:
            return rng.choice(_ODD_LITERALS)
        if roll < 0.8:
            # A valid shape around an odd literal: '{"type":"say","id":NaN,...}'.
            key = rng.choice(["id", "text", "after", "count", "name", "v", "resume"])
            return (b'{"type":"' + rng.choice([b"say", b"hello", b"fetch", b"recent"]) + b'","'
                    + key.encode() + b'":' + rng.choice(_ODD_LITERALS) + b"}")
        if roll < 0.95:
            # Duplicated keys: the JSON decoder keeps the last one.
            return b'{"type":"say","type":"hello","name":"mallory","name":"x y","id":"1","text":"t"}'
        return b"z" * (self.max_frame - rng.randint(1, 64))

    def frames(self) -> list[bytes]:
        """One fuzz message."""
        rng = self.rng
        roll = rng.random()
        if roll < 0.35:
            return [frame_of(self.valid_body())]
        if roll < 0.75:
            return [frame_of(self.mutate(self.valid_body()))]
        if roll < 0.95:
            return [self.raw_frame()]
        count = rng.choice([2, 3, 5])
        return [self.raw_frame() if rng.random() < 0.5 else frame_of(self.valid_body())
                for _ in range(count)]
