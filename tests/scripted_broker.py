"""A broker whose every reply the test chooses, for a real ClientSession.

The real broker never answers out of turn; a broker restarting at a bad
moment, or a buggy or hostile one, does. ScriptedBroker binds a real ROUTER
and XPUB on free loopback ports, answers the client's ready probe as the
broker does, and otherwise sends exactly what the test tells it to, so a
test can put a real client session through those moments.
"""

from __future__ import annotations

import json
import queue
import time

import zmq

import messages as m
from procs import free_port_pair


class ScriptedBroker:
    def __init__(self, ctx: zmq.Context):
        self.port = free_port_pair()
        self.router = ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.bind(f"tcp://127.0.0.1:{self.port}")
        self.pub = ctx.socket(zmq.XPUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.bind(f"tcp://127.0.0.1:{self.port + 1}")
        # Once set, heartbeats go out while the test waits, as a live
        # broker's do, so the client does not give the broker up.
        self.epoch: str | None = None
        self.seq = 0
        self.next_beat = 0.0

    @property
    def client_args(self) -> list[str]:
        """Where a command-line client finds this broker (procs.Client)."""
        return ["--port", str(self.port)]

    def close(self) -> None:
        self.router.close(linger=0)
        self.pub.close(linger=0)

    def beat(self) -> None:
        """A heartbeat on the main topic, when one is due."""
        if self.epoch is not None and time.monotonic() >= self.next_beat:
            self.publish(m.HEARTBEAT_TOPIC, [m.Heartbeat(self.epoch, time.time())])
            self.next_beat = time.monotonic() + 0.1

    def answer_probe(self, epoch: str, seq: int, timeout: float = 5.0) -> None:
        """Wait for a client's ready subscription and answer it; heartbeat
        from now on."""
        deadline = time.monotonic() + timeout
        while self.pub.poll(max(0, deadline - time.monotonic()) * 1000):
            frame = self.pub.recv()
            if frame[:1] == b"\x01" and frame[1:].startswith(m.READY_TOPIC_PREFIX):
                self.publish(frame[1:], [m.Heartbeat(epoch, time.time())])
                self.epoch, self.seq = epoch, seq
                return
        raise AssertionError("no ready probe from the client")

    def expect(self, kind: str, timeout: float = 5.0) -> tuple[bytes, dict]:
        """The next request of type ``kind`` (others are skipped):
        (routing id, body)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.beat()
            if not self.router.poll(50):
                continue
            peer, frame = self.router.recv_multipart()
            body = json.loads(frame)
            if body["type"] == kind:
                return peer, body
        raise AssertionError(f"no {kind} request from the client")

    def wait_event(self, session, kind: type, timeout: float = 5.0):
        """The session's next event of type ``kind``, heartbeating meanwhile;
        a session that ends fails the test."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.beat()
            try:
                event = session.events.get(timeout=0.05)
            except queue.Empty:
                continue
            if getattr(event, "state", None) == "closed":
                raise AssertionError(f"the session ended: {event.detail}")
            if isinstance(event, kind):
                return event
        raise AssertionError(f"no {kind.__name__} within {timeout}s")

    def reply(self, peer: bytes, message) -> None:
        self.router.send_multipart([peer, m.encode(message)])

    def reply_raw(self, peer: bytes, body: dict) -> None:
        """A reply that messages.py would not build: a JSON object as given."""
        self.router.send_multipart([peer, json.dumps(body).encode()])

    def publish(self, topic: bytes, events: list) -> None:
        self.pub.send_multipart([topic, m.join_events([m.encode(e) for e in events])])


def welcome(name: str, seq: int, epoch: str, token: str, interval: float = 0.2) -> m.Welcome:
    """A welcome into #general, whose last seq is ``seq``."""
    return m.Welcome(name, epoch, 1, token, interval, 3, m.DEFAULT_MAX_TEXT_BYTES,
                     [m.Room(m.GENERAL_ROOM, seq, "", 1)], 0)
