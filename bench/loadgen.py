"""The load generator: few processes, many sockets each, raw pyzmq, zchat protocol.

    python bench/loadgen.py sender   --port P --sockets M [--join]
    python bench/loadgen.py listener --pub-port Q --sockets N --out-dir DIR --index I
    python bench/loadgen.py clients  --port P --pub-port Q --count C --prefix NAME

run.py starts these and drives them with one-line commands on stdin; each
command is answered with one JSON line on stdout. A worker exits when its
stdin closes, so it never outlives run.py.

sender
    M DEALER sockets, one process. ``run PHASE RATE SECONDS DRAIN`` sends
    RATE say requests a second in all, round robin, paced on the clock (open
    loop: a slow broker does not slow the offered load), then waits up to
    DRAIN seconds for the acks. ``warm`` sends a trickle until the next
    command, so listeners can prove their subscriptions are live. With
    ``--join`` each socket says hello first, carries the welcome's session
    token on every later request and pings while idle, as a zchat client
    must; an error ``not_joined`` (the broker dropped the session) makes
    that socket say hello again, and is counted.
listener
    N SUB sockets polled by one zmq.Poller. Every chat text carries its
    phase and its send time, ``bench:PHASE:MONOTONIC_NS:...``; a listener
    counts deliveries per socket and phase, the frames they came in, and
    records each latency.
    CLOCK_MONOTONIC is one clock for the whole machine on Linux, so the
    difference between two processes' readings is meaningful.
clients
    C full zchat clients (a DEALER and a SUB each) for the scale test. On
    ``go`` they all connect at once and join with the client's own sequence
    (subscribe, wait for the ready-topic heartbeat, hello), then ping every
    heartbeat interval with their session token and drain their SUBs without
    parsing; like the sender they join again after ``not_joined``.

Texts, acks, tokens and error codes are matched with byte searches rather
than full decoding, so the generator's cost per delivery stays a few
microseconds (a welcome lists every user online: thousands of names).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import secrets
import sys
import time
from array import array
from collections import defaultdict, deque
from pathlib import Path

import zmq

import common  # noqa: F401  (puts the product's modules on sys.path)
import messages as m

TEXT_MARK = re.compile(rb"bench:(\d+):(\d+):")
ACK_ID = re.compile(rb'"id":"(\d+)-')
ERROR_PREFIX = b'{"type":"error"'
# The baselines' broadcast topic (bench/baselines.py): the C forwarder's
# topic is the sender's routing id, which starts with it.
BASELINE_TOPIC = b"all"
WELCOME_PREFIX = b'{"type":"welcome"'
# Chat texts are padded to a typical chat line's length.
TEXT_BYTES = 64
# Most messages sent in one go when the sender is behind its schedule.
MAX_BURST = 200
# Frames read from one socket before the others get their turn.
RECV_BATCH = 200
WARM_INTERVAL = 0.05
# A joined sender pings when idle this long (well inside the broker's expiry).
IDLE_PING_INTERVAL = 0.5
# Scale clients send the pings that fell due together, at most this often:
# one zmq_poll over a thousand clients' sockets costs milliseconds, so
# waking once per client per second would make the generator, not the
# broker, the load on the machine. A ping is at most this late (the broker
# allows three intervals of 1 s).
PING_BATCH_S = 0.2
JOIN_TIMEOUT = 15.0


def emit(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class CommandReader:
    """Whole lines from stdin, read without blocking when the poller says so."""

    def __init__(self):
        self.fd = sys.stdin.fileno()
        self._buffer = b""
        self.closed = False

    def lines(self) -> list[list[str]]:
        data = os.read(self.fd, 65536)
        if not data:
            self.closed = True
            return []
        self._buffer += data
        *complete, self._buffer = self._buffer.split(b"\n")
        return [line.decode().split() for line in complete if line.strip()]


# libzmq caps a context at 1023 sockets (and ZMQ_MAX_SOCKETS did not lift
# it here), so a process holding more opens one context per this many.
SOCKETS_PER_CONTEXT = 1000


def make_context(sockets: int) -> zmq.Context:
    if sockets > SOCKETS_PER_CONTEXT:
        raise ValueError(f"{sockets} sockets: more than one context holds")
    return zmq.Context()


def session_token(welcome: bytes) -> str:
    """The token a welcome hands out, to carry on every later request.
    (Welcomes and errors are rare: decoded in full, unlike the acks.)"""
    return m.decode_reply([welcome]).resume


def error_code(frame: bytes) -> str:
    try:
        return m.decode_reply([frame]).code
    except m.ProtocolError:
        return "?"


def chat_text(phase: int, n: int) -> str:
    head = f"bench:{phase}:{time.monotonic_ns()}:{n}:"
    return head + "x" * max(0, TEXT_BYTES - len(head))


# --- sender ---------------------------------------------------------------------


class Sender:
    def __init__(self, endpoint: str, sockets: int, join: bool, rooms: list[str] | None = None):
        self.ctx = make_context(sockets)
        self.join = join
        self.rooms = rooms  # None: #general; else each message to the next of them in turn
        self.socks = []
        self.slot_of: dict[zmq.Socket, int] = {}
        self.poller = zmq.Poller()
        for i in range(sockets):
            sock = self.ctx.socket(zmq.DEALER)
            # "all:" makes the C forwarder's topic (the routing id) match the
            # listeners' subscription; zchat and the Python loop ignore it.
            sock.setsockopt(zmq.ROUTING_ID, BASELINE_TOPIC + b":sender-%d" % i)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(endpoint)
            self.slot_of[sock] = i
            self.socks.append(sock)
            self.poller.register(sock, zmq.POLLIN)
        self.commands = CommandReader()
        self.poller.register(self.commands.fd, zmq.POLLIN)
        self.acked: defaultdict[int, int] = defaultdict(int)
        self.refused: defaultdict[int, int] = defaultdict(int)
        # Per socket: the session token of its last welcome (None before it)
        # and its ping, which carries the token.
        self.tokens: list[str | None] = [None] * sockets
        self.pings: list[bytes] = [b""] * sockets
        self.rejoining: set[int] = set()
        self.not_joined = 0  # not_joined errors: sessions the broker dropped
        self.last_ping = 0.0

    def say_hello(self) -> None:
        for slot in range(len(self.socks)):
            self._hello(slot)
        deadline = time.monotonic() + JOIN_TIMEOUT
        while self.rejoining:
            if time.monotonic() > deadline:
                raise SystemExit(f"sender: {len(self.rejoining)} of {len(self.socks)} sockets "
                                 "not welcomed")
            self._read_replies(100)
        self.last_ping = time.monotonic()

    def _hello(self, slot: int) -> None:
        """Join (again): with the last token the broker still holding the
        session resumes it; one that dropped it makes a new one."""
        self.rejoining.add(slot)
        self.socks[slot].send(m.encode(m.Hello(f"bench-sender-{slot}", resume=self.tokens[slot],
                                               rooms=self.rooms)), zmq.NOBLOCK)

    def serve(self) -> None:
        warming = False
        n = 0
        while not self.commands.closed:
            ready = dict(self.poller.poll(WARM_INTERVAL * 1000 if warming else 100))
            if self.commands.fd in ready:
                for words in self.commands.lines():
                    warming = words[0] == "warm"
                    if words[0] == "run":
                        phase, rate, seconds, drain = words[1:]
                        emit(self.run(int(phase), float(rate), float(seconds), float(drain)))
            self._read_replies(0)
            if warming:
                self._send(0, n)
                n += 1
            self._ping_if_idle()

    def run(self, phase: int, rate: float, seconds: float, drain: float) -> dict:
        total = max(1, round(rate * seconds))
        cpu0 = own_cpu_seconds()
        not_joined0 = self.not_joined
        start = time.monotonic()
        sent = blocked = 0
        while sent < total:
            due = min(total, int((time.monotonic() - start) * rate) + 1, sent + MAX_BURST)
            while sent < due:
                blocked += not self._send(phase, sent)
                sent += 1
            # Round up: zmq_poll takes whole milliseconds, and 0 would spin.
            wait_ms = math.ceil(max(0.0, start + sent / rate - time.monotonic()) * 1000)
            self._read_replies(wait_ms)
        send_seconds = time.monotonic() - start
        accepted = sent - blocked
        # A target that does not acknowledge is run with drain 0.
        deadline = time.monotonic() + drain
        while self.acked[phase] + self.refused[phase] < accepted and time.monotonic() < deadline:
            self._read_replies(50)
        self.last_ping = time.monotonic()
        return {"phase": phase, "sent": accepted, "blocked": blocked,
                "send_seconds": send_seconds, "offered_rate": rate,
                "achieved_rate": accepted / send_seconds if send_seconds else 0.0,
                "acked": self.acked.pop(phase, 0), "refused": self.refused.pop(phase, 0),
                "not_joined": self.not_joined - not_joined0, "cpu_s": own_cpu_seconds() - cpu0}

    def _send(self, phase: int, n: int) -> bool:
        slot = n % len(self.socks)
        room = self.rooms[n % len(self.rooms)] if self.rooms else None
        say = m.Say(f"{phase}-{n}", chat_text(phase, n), self.tokens[slot], room)
        try:
            self.socks[slot].send(m.encode(say), zmq.NOBLOCK)
        except zmq.Again:  # the broker is not reading: its queue is full
            return False
        return True

    def _read_replies(self, timeout_ms: float) -> None:
        for sock, _ in self.poller.poll(timeout_ms):
            if not isinstance(sock, zmq.Socket):
                continue  # a command: served by the idle loop
            for _ in range(RECV_BATCH):
                try:
                    frame = sock.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self._on_reply(self.slot_of[sock], frame)

    def _on_reply(self, slot: int, frame: bytes) -> None:
        if frame.startswith(WELCOME_PREFIX):
            self.tokens[slot] = session_token(frame)
            self.pings[slot] = m.encode(m.Ping(self.tokens[slot]))
            self.rejoining.discard(slot)
            return
        is_error = frame.startswith(ERROR_PREFIX)
        if is_error and error_code(frame) == m.ErrorCode.NOT_JOINED:
            self.not_joined += 1
            if slot not in self.rejoining:
                print(f"sender: socket {slot} not joined: joining again", file=sys.stderr)
                self._hello(slot)
        match = ACK_ID.search(frame)
        if match is None:
            if is_error:
                print(f"sender: broker error {frame[:200]!r}", file=sys.stderr)
            return
        phase = int(match[1])
        if is_error:
            self.refused[phase] += 1
        else:
            self.acked[phase] += 1

    def _ping_if_idle(self) -> None:
        now = time.monotonic()
        if self.join and now - self.last_ping >= IDLE_PING_INTERVAL:
            for sock, ping in zip(self.socks, self.pings):
                if ping:
                    sock.send(ping, zmq.NOBLOCK)
            self.last_ping = now


# --- listener -------------------------------------------------------------------


class Listener:
    def __init__(self, endpoint: str, sockets: int, out_dir: Path, index: int, nap: float,
                 room: str = m.GENERAL_ROOM):
        self.ctx = make_context(sockets)
        self.nap = nap
        self.out_dir = out_dir
        self.index = index
        self.poller = zmq.Poller()
        self.socks = []
        for _ in range(sockets):
            sock = self.ctx.socket(zmq.SUB)
            sock.setsockopt(zmq.LINGER, 0)
            # The generator must not drop what the broker delivered.
            sock.setsockopt(zmq.RCVHWM, 0)
            sock.setsockopt(zmq.SUBSCRIBE, m.room_topic(room))  # zchat's (#general by default)
            sock.setsockopt(zmq.SUBSCRIBE, BASELINE_TOPIC)
            sock.connect(endpoint)
            self.socks.append(sock)
            self.poller.register(sock, zmq.POLLIN)
        self.commands = CommandReader()
        self.poller.register(self.commands.fd, zmq.POLLIN)
        self.heard: set[int] = set()
        self.counts: defaultdict[int, list[int]] = defaultdict(lambda: [0] * sockets)
        # PUB frames that carried a phase's texts (by the frame's first text)
        self.frames: defaultdict[int, int] = defaultdict(int)
        self.latencies: defaultdict[int, array] = defaultdict(lambda: array("q"))
        self.ready_sent = False

    def serve(self) -> None:
        while not self.commands.closed:
            events = self.poller.poll(200)
            if any(not isinstance(sock, zmq.Socket) for sock, _ in events):
                for words in self.commands.lines():
                    emit(self._answer(words))
            elif events and self.nap:
                # Let frames gather: libzmq then wakes us and moves data in
                # batches, and the generator keeps up with unbatched targets
                # (adds at most the nap to each latency, for every target).
                time.sleep(self.nap)
            # A broadcast reaches every SUB at about the same time: sweeping
            # them all until none has more costs one zmq_poll per burst
            # rather than one per delivery.
            while self._sweep():
                pass
            if not self.ready_sent and len(self.heard) == len(self.socks):
                self.ready_sent = True
                emit({"ready": True})

    def _sweep(self) -> int:
        """Read what is waiting on every socket; returns the frames read."""
        frames = 0
        for slot, sock in enumerate(self.socks):
            for _ in range(RECV_BATCH):
                if not sock.get(zmq.EVENTS) & zmq.POLLIN:
                    break
                body = sock.recv_multipart()[-1]
                frames += 1
                self.heard.add(slot)
                now = time.monotonic_ns()
                phase = None
                for match in TEXT_MARK.finditer(body):
                    phase = int(match[1])
                    self.counts[phase][slot] += 1
                    self.latencies[phase].append(now - int(match[2]))
                if phase is not None:
                    self.frames[phase] += 1
        return frames

    def _answer(self, words: list[str]) -> dict:
        """``count PHASE``: deliveries so far; ``report PHASE``: and latencies."""
        phase = int(words[1])
        counts = self.counts[phase]
        answer = {"phase": phase, "deliveries": sum(counts), "min_per_socket": min(counts),
                  "frames": self.frames[phase]}
        if words[0] == "report":
            path = self.out_dir / f"latency-{phase}-{self.index}.bin"
            with open(path, "wb") as f:
                self.latencies.pop(phase, array("q")).tofile(f)
            del self.counts[phase]
            del self.frames[phase]
            answer["latency_file"] = str(path)
        return answer


# --- scale clients --------------------------------------------------------------


class ScaleClients:
    """Many joined zchat clients in one process, as light as a client can be."""

    def __init__(self, port: int, pub_port: int, count: int, prefix: str, interval: float):
        self.contexts: list[zmq.Context] = []
        self.request_endpoint = f"tcp://127.0.0.1:{port}"
        self.broadcast_endpoint = f"tcp://127.0.0.1:{pub_port}"
        self.count = count
        self.prefix = prefix
        self.interval = interval
        self.poller = zmq.Poller()
        self.commands = CommandReader()
        self.poller.register(self.commands.fd, zmq.POLLIN)
        self.dealers: list[zmq.Socket] = []
        self.subs: list[zmq.Socket] = []
        self.ready_topics: list[bytes] = []
        self.owner: dict[zmq.Socket, int] = {}
        self.welcomed_at: dict[int, int] = {}
        # per client: its ping, carrying its session token (set on welcome)
        self.ping_frames: dict[int, bytes] = {}
        self.tokens: dict[int, str] = {}
        self.rejoins = 0
        self.probed = 0
        self.refusals: defaultdict[str, int] = defaultdict(int)
        self.pings: deque = deque()  # (due, client), in due order
        self.frames_drained = 0

    def serve(self) -> None:
        emit({"started": True})
        go_ns = None
        while not self.commands.closed:
            now = time.monotonic()
            timeout = min(0.2, max(PING_BATCH_S, self.pings[0][0] - now)) if self.pings else 0.2
            for sock, _ in self.poller.poll(timeout * 1000):
                if isinstance(sock, zmq.Socket):
                    self._drain(sock)
                    continue
                for words in self.commands.lines():
                    if words[0] == "go":
                        go_ns = time.monotonic_ns()
                        self._connect_all()
                    elif words[0] == "status":
                        emit(self._status(go_ns))
            self._ping_due(time.monotonic())

    def _connect_all(self) -> None:
        for i in range(self.count):
            if i % (SOCKETS_PER_CONTEXT // 2) == 0:
                self.contexts.append(zmq.Context())
            dealer = self.contexts[-1].socket(zmq.DEALER)
            sub = self.contexts[-1].socket(zmq.SUB)
            topic = m.READY_TOPIC_PREFIX + secrets.token_hex(8).encode()
            for sock in (dealer, sub):
                sock.setsockopt(zmq.LINGER, 0)
                self.owner[sock] = i
                self.poller.register(sock, zmq.POLLIN)
            sub.setsockopt(zmq.SUBSCRIBE, m.BROADCAST_TOPIC)
            sub.setsockopt(zmq.SUBSCRIBE, topic)
            dealer.connect(self.request_endpoint)
            sub.connect(self.broadcast_endpoint)
            self.dealers.append(dealer)
            self.subs.append(sub)
            self.ready_topics.append(topic)

    def _drain(self, sock: zmq.Socket) -> None:
        client = self.owner[sock]
        for _ in range(RECV_BATCH):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.frames_drained += 1
            if sock.type == zmq.SUB:
                if frames[0] == self.ready_topics[client]:
                    self._probe_answered(client)
            else:
                self._on_reply(client, frames[0])

    def _probe_answered(self, client: int) -> None:
        """The subscription is live: now join (the client's own order)."""
        self.subs[client].setsockopt(zmq.UNSUBSCRIBE, self.ready_topics[client])
        self.probed += 1
        self._hello(client)

    def _hello(self, client: int) -> None:
        hello = m.Hello(f"{self.prefix}-{client}", resume=self.tokens.get(client))
        try:
            self.dealers[client].send(m.encode(hello), zmq.NOBLOCK)
        except zmq.Again:  # the broker is not reading: counted as never joined
            self.refusals["hello_not_sent"] += 1

    def _on_reply(self, client: int, frame: bytes) -> None:
        if frame.startswith(WELCOME_PREFIX):
            self.tokens[client] = session_token(frame)
            self.ping_frames[client] = m.encode(m.Ping(self.tokens[client]))
            if client not in self.welcomed_at:
                self.welcomed_at[client] = time.monotonic_ns()
                self.pings.append((time.monotonic() + self.interval, client))
        elif frame.startswith(ERROR_PREFIX):
            code = error_code(frame)
            self.refusals[code] += 1
            if code == m.ErrorCode.NOT_JOINED:  # the broker dropped us: join again
                self.rejoins += 1
                self._hello(client)

    def _ping_due(self, now: float) -> None:
        while self.pings and self.pings[0][0] <= now:
            due, client = self.pings.popleft()
            try:
                self.dealers[client].send(self.ping_frames[client], zmq.NOBLOCK)
            except zmq.Again:
                pass  # the broker is not reading; it will time us out
            self.pings.append((max(due + self.interval, now), client))

    def _status(self, go_ns: int | None) -> dict:
        welcomes = self.welcomed_at.values()
        return {"clients": self.count, "probed": self.probed, "joined": len(self.welcomed_at),
                "go_ns": go_ns, "first_welcome_ns": min(welcomes, default=None),
                "last_welcome_ns": max(welcomes, default=None),
                "refusals": dict(self.refusals), "rejoins": self.rejoins,
                "frames_drained": self.frames_drained}


# --- entry point ----------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="zchat benchmark load generator (see bench/README.md)")
    roles = p.add_subparsers(dest="role", required=True)
    sender = roles.add_parser("sender")
    sender.add_argument("--port", type=int, required=True)
    sender.add_argument("--sockets", type=int, default=4)
    sender.add_argument("--join", action="store_true", help="say hello first (zchat)")
    sender.add_argument("--rooms", help="comma-separated rooms to join and send to in turn "
                        "(zchat; default #general)")
    listener = roles.add_parser("listener")
    listener.add_argument("--pub-port", type=int, required=True)
    listener.add_argument("--sockets", type=int, default=20)
    listener.add_argument("--out-dir", type=Path, required=True)
    listener.add_argument("--index", type=int, default=0)
    listener.add_argument("--nap-ms", type=float, default=0.0,
                          help="pause after a wake-up before reading (batches reads)")
    listener.add_argument("--room", default=m.GENERAL_ROOM, help="the room to subscribe to (zchat)")
    clients = roles.add_parser("clients")
    clients.add_argument("--port", type=int, required=True)
    clients.add_argument("--pub-port", type=int, required=True)
    clients.add_argument("--count", type=int, required=True)
    clients.add_argument("--prefix", required=True)
    clients.add_argument("--interval", type=float, default=1.0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.role == "sender":
        sender = Sender(f"tcp://127.0.0.1:{args.port}", args.sockets, args.join,
                        args.rooms.split(",") if args.rooms else None)
        if args.join:
            sender.say_hello()
        emit({"started": True})
        sender.serve()
    elif args.role == "listener":
        Listener(f"tcp://127.0.0.1:{args.pub_port}", args.sockets, args.out_dir,
                 args.index, args.nap_ms / 1000, args.room).serve()
    else:
        ScaleClients(args.port, args.pub_port, args.count, args.prefix, args.interval).serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
