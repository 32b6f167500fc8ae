"""The client side of zchat, shared by cli_client.py and gui_client.py.

A ClientSession owns a DEALER (requests) and a SUB (broadcasts) in one
worker thread; the caller never touches a socket. The caller gives commands
through thread-safe methods (send, who, join, close), which never block, and
reads what happens from ``session.events``, a queue.Queue of the event
objects below and of messages.Message / Join / Leave / Users.

Theory of operation
-------------------
1. Connect: open both sockets, subscribe to the chat stream and to a private
   ready topic; the broker answers the ready topic with a heartbeat, which
   proves the subscription is live (the Clone pattern's slow-joiner fix).
2. Join: send hello; the welcome gives the user list, the last sequence
   number (events up to it are dropped, later ones shown) and a resume token.
3. Joined: events are handed over in sequence order, exactly once. A gap
   (an event ahead of the next expected, or a heartbeat announcing a higher
   seq) is filled by fetching the missing range over the DEALER; what the
   broker no longer holds is reported as Missed. Chat text goes out from an
   outbox with a bounded window and stays there until acknowledged, so it is
   resent after a reconnect and the broker drops the repeats by message id.
4. Liveness (Paranoid Pirate): the session pings when it has been quiet for
   an interval; when the broker has been silent for liveness x interval it
   closes both sockets and starts again with backoff, resuming its name.
"""

from __future__ import annotations

import argparse
import getpass
import itertools
import logging
import math
import os
import queue
import secrets
import socket
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Callable

import zmq

import keys
import messages as m

log = logging.getLogger("zchat.client")

# Before the welcome tells the broker's own values.
DEFAULT_HEARTBEAT_INTERVAL = 1.0
DEFAULT_HEARTBEAT_LIVENESS = 3
# Reconnect backoff doubles from the first delay up to the cap (Paranoid Pirate).
RECONNECT_DELAY_FIRST = 0.25
RECONNECT_DELAY_MAX = 8.0
# Unacknowledged messages on the wire at once: keeps the DEALER far below its
# high-water mark, so a send never blocks, however long the pipe.
SEND_WINDOW = 200
# Out-of-order events held while a gap is fetched; past it they are dropped
# and fetched again, so memory stays bounded for a listener far behind.
MAX_BUFFERED_EVENTS = 20_000
# Most frames read from one socket per loop pass, so commands stay prompt.
RECV_BATCH = 500
# A bye must get out when closing, but a dead broker must not hold us up.
CLOSE_LINGER_MS = 500


@dataclass(frozen=True)
class Encryption:
    """CurveZMQ to a broker with this public key; ``pair`` is ours (None: a
    throwaway pair, enough where the broker admits any key)."""

    server_key: bytes
    pair: keys.KeyPair | None = None

    def apply(self, sock: zmq.Socket) -> None:
        keys.make_client(sock, self.server_key, self.pair)


class State:
    CONNECTING = "connecting"
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"
    CLOSED = "closed"


# --- events handed to the caller ------------------------------------------------


@dataclass(frozen=True)
class StateChanged:
    """Connection state; ``retry_in`` is the delay before the next attempt."""

    state: str
    detail: str = ""
    retry_in: float | None = None


@dataclass(frozen=True)
class Joined:
    """The broker welcomed us (again, if ``resumed``)."""

    name: str
    users: list[str]
    resumed: bool
    broker_restarted: bool


@dataclass(frozen=True)
class JoinRefused:
    """The broker refused the name; call join() with another, or close()."""

    code: str
    reason: str


@dataclass(frozen=True)
class Earlier:
    """Chat messages from before we joined (asked for with ``recent``)."""

    messages: list


@dataclass(frozen=True)
class Acked:
    id: str
    seq: int


@dataclass(frozen=True)
class Refused:
    """The broker refused message ``id`` for good."""

    id: str
    code: str
    reason: str


@dataclass(frozen=True)
class Missed:
    """Events ``first..last`` are gone from the broker's history."""

    first: int
    last: int

    @property
    def count(self) -> int:
        return self.last - self.first + 1


# --- the session -------------------------------------------------------------------


class ClientSession:
    """One user's connection to a broker, run by a worker thread."""

    def __init__(self, host: str, port: int, name: str, pub_port: int | None = None,
                 recent: int = 0, encryption: Encryption | None = None,
                 on_event: Callable[[], None] | None = None):
        """``recent``: how many earlier messages to show on joining (Earlier).

        ``on_event``: called with no arguments by the worker thread after it
        put events on ``events``, at most once per pass of its loop, so a
        caller can wake up instead of polling the queue. It must be quick,
        never block, and (for a window) never touch the GUI toolkit itself.
        """
        self.on_event = on_event
        self.address = f"{host}:{port}"
        self.encryption = encryption
        self.recent = min(recent, m.MAX_FETCH_EVENTS)
        self.request_endpoint = f"tcp://{host}:{port}"
        self.broadcast_endpoint = f"tcp://{host}:{pub_port or port + 1}"
        self.name = name
        self.events: queue.Queue = queue.Queue()
        self._commands: queue.Queue = queue.Queue()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._ids = (f"{secrets.token_hex(6)}-{n}" for n in itertools.count(1))
        self._id_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="zchat-session", daemon=True)

    # --- commands: safe from any thread, never block --------------------------------

    def start(self) -> "ClientSession":
        self._thread.start()
        return self

    def send(self, text: str) -> str:
        """Queue chat text; returns its message id (see Acked / Refused)."""
        with self._id_lock:
            msg_id = next(self._ids)
        self._command("send", msg_id, text)
        return msg_id

    def who(self) -> None:
        """Ask who is online; the answer comes as a messages.Users event."""
        self._command("who")

    def join(self, name: str) -> None:
        """Try another name after JoinRefused."""
        self._command("join", name)

    def close(self, timeout: float = 2.0) -> None:
        """Leave (others see ``quit``) and stop the worker thread."""
        if self._thread.is_alive():
            self._command("close")
            self._thread.join(timeout)

    def _command(self, *cmd) -> None:
        self._commands.put(cmd)
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # already woken, or closed

    # --- worker thread --------------------------------------------------------------

    def _run(self) -> None:
        try:
            _Worker(self).run()
        except Exception:  # a bug of ours: say so rather than die silently
            log.exception("client session failed")
            self.events.put(StateChanged(State.CLOSED, "internal error, see log"))
            if self.on_event is not None:
                self.on_event()
        finally:
            self._wake_r.close()
            self._wake_w.close()


class _Worker:
    """State of the worker thread; every attribute is touched by it alone."""

    def __init__(self, session: ClientSession):
        self.s = session
        self.emitted = False  # events put since on_event was last called
        self.ctx = zmq.Context.instance()
        self.dealer: zmq.Socket | None = None
        self.sub: zmq.Socket | None = None
        self.poller = zmq.Poller()
        self.name = session.name
        self.state = State.CONNECTING
        self.phase = "probe"  # probe -> hello -> joined | refused
        self.closing = False
        self.interval = DEFAULT_HEARTBEAT_INTERVAL
        self.liveness = DEFAULT_HEARTBEAT_LIVENESS
        self.max_text = m.DEFAULT_MAX_TEXT_BYTES
        self.backoff = RECONNECT_DELAY_FIRST
        self.reconnect_at: float | None = None
        self.broker_seen = 0.0
        self.last_request = 0.0
        self.hello_sent = False
        self.nonce = b""
        # stream position
        self.epoch: str | None = None
        self.token: str | None = None
        self.last_seq = 0
        self.announced_seq = 0  # the newest seq a heartbeat told of
        self.buffer: dict[int, object] = {}
        self.fetch_sent_at: float | None = None  # the fetch awaiting its answer
        # seq of the welcome whose earlier messages are awaited, if any
        self.recent_until: int | None = None
        # outbox: id -> text, in order; ids in unsent wait for the window
        self.outbox: OrderedDict[str, str] = OrderedDict()
        self.unsent: deque[str] = deque()
        self.in_flight: dict[str, float] = {}  # id -> when sent, oldest first
        self.paused_until = 0.0

    # --- main loop ----------------------------------------------------------------

    def run(self) -> None:
        self.poller.register(self.s._wake_r, zmq.POLLIN)
        self._open_sockets(time.monotonic())
        while not self.closing:
            now = time.monotonic()
            # Rounded up: pyzmq truncates to whole milliseconds (0 would spin).
            timeout_ms = math.ceil(max(0.0, self._next_deadline(now) - now) * 1000)
            ready = dict(self.poller.poll(timeout_ms))
            now = time.monotonic()
            if self.s._wake_r.fileno() in ready:
                self._drain_wakeups()
            self._run_commands(now)
            if self.closing:
                break
            if self.dealer is not None and self.dealer in ready:
                self._read_replies(now)
            if self.sub is not None and self.sub in ready:
                self._read_broadcasts(now)
            self._on_timers(now)
            self._flush_outbox(now)
            self._tell_events()
        self._shut_down()
        self._tell_events()

    def emit(self, event) -> None:
        self.s.events.put(event)
        self.emitted = True

    def _tell_events(self) -> None:
        """Calls the session's on_event once for all the events of one pass."""
        if self.emitted and self.s.on_event is not None:
            self.emitted = False
            self.s.on_event()

    @property
    def _patience(self) -> float:
        """How long silence from the broker may last before we act."""
        return self.interval * self.liveness

    def _next_deadline(self, now: float) -> float:
        if self.reconnect_at is not None:
            return self.reconnect_at
        deadlines = [self.broker_seen + self.interval * self.liveness]
        if self.phase == "joined":
            deadlines.append(self.last_request + self.interval)
            if self.fetch_sent_at is not None:
                deadlines.append(self.fetch_sent_at + self._patience)
            if self.unsent and self.paused_until > now:
                deadlines.append(self.paused_until)
        if self.phase == "hello" and not self.hello_sent:
            deadlines.append(now + 0.05)  # DEALER not connected yet: retry soon
        if self.unsent and self.phase == "joined" and self.paused_until <= now:
            deadlines.append(now + 0.05)  # window or HWM full: retry soon
        return min(deadlines)

    def _drain_wakeups(self) -> None:
        try:
            while self.s._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass

    # --- sockets ------------------------------------------------------------------

    def _open_sockets(self, now: float) -> None:
        self.dealer = self.ctx.socket(zmq.DEALER)
        self.sub = self.ctx.socket(zmq.SUB)
        if self.s.encryption is not None:
            self.s.encryption.apply(self.dealer)
            self.s.encryption.apply(self.sub)
        self.dealer.setsockopt(zmq.LINGER, 0)
        # Queue nothing for a broker that is not connected: the outbox holds it.
        self.dealer.setsockopt(zmq.IMMEDIATE, 1)
        self.dealer.setsockopt(zmq.RECONNECT_IVL, 100)
        self.dealer.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        self.dealer.connect(self.s.request_endpoint)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.RECONNECT_IVL, 100)
        self.sub.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        self.nonce = secrets.token_hex(8).encode()
        self.sub.setsockopt(zmq.SUBSCRIBE, m.BROADCAST_TOPIC)
        self.sub.setsockopt(zmq.SUBSCRIBE, m.READY_TOPIC_PREFIX + self.nonce)
        self.sub.connect(self.s.broadcast_endpoint)
        self.poller.register(self.dealer, zmq.POLLIN)
        self.poller.register(self.sub, zmq.POLLIN)
        self.phase = "probe"
        self.hello_sent = False
        self.broker_seen = now
        self.reconnect_at = None

    def _close_sockets(self) -> None:
        for sock in (self.dealer, self.sub):
            if sock is not None:
                self.poller.unregister(sock)
                sock.close(linger=0)
        self.dealer = self.sub = None

    def _request(self, msg, now: float) -> bool:
        """Send one request without blocking; False if it could not go now."""
        try:
            self.dealer.send(m.encode(msg), zmq.NOBLOCK)
        except zmq.Again:
            return False
        self.last_request = now
        return True

    def _reconnect(self, now: float, why: str) -> None:
        """Drop both sockets and try again after a backoff (Paranoid Pirate)."""
        self._close_sockets()
        if self.phase == "joined":
            self.phase = "probe"  # joined again after the new welcome
        delay = self.backoff
        self.backoff = min(self.backoff * 2, RECONNECT_DELAY_MAX)
        self.reconnect_at = now + delay
        self.fetch_sent_at = None
        self.recent_until = None
        self._requeue_in_flight()
        self.state = State.RECONNECTING
        self.emit(StateChanged(State.RECONNECTING, why, delay))
        log.info("%s; reconnecting in %.2fs", why, delay)

    # --- commands -------------------------------------------------------------------

    def _run_commands(self, now: float) -> None:
        while True:
            try:
                cmd, *args = self.s._commands.get_nowait()
            except queue.Empty:
                return
            if cmd == "send":
                self._queue_text(*args)
            elif cmd == "who":
                if self.dealer is None or not self._request(m.Who(), now):
                    self.emit(StateChanged(self.state, "not connected: cannot list users"))
            elif cmd == "join":
                self.name = args[0]
                self.token = None
                if self.phase == "refused":
                    self._say_hello()
            elif cmd == "close":
                self.closing = True
                return

    def _queue_text(self, msg_id: str, text: str) -> None:
        problem = m.text_problem(text, self.max_text)
        if problem:
            self.emit(Refused(msg_id, *problem))
            return
        self.outbox[msg_id] = text
        self.unsent.append(msg_id)

    def _flush_outbox(self, now: float) -> None:
        if self.phase != "joined" or self.dealer is None or now < self.paused_until:
            return
        while self.unsent and len(self.in_flight) < SEND_WINDOW:
            msg_id = self.unsent[0]
            if msg_id not in self.outbox:  # acked while waiting for a resend
                self.unsent.popleft()
                continue
            if not self._request(m.Say(msg_id, self.outbox[msg_id], self.token), now):
                return
            self.unsent.popleft()
            self.in_flight[msg_id] = now

    def _say_hello(self) -> None:
        """(Re)join on the open sockets: hello goes out on the next pass, and
        what was in flight goes again after the welcome."""
        self.phase = "hello"
        self.hello_sent = False
        self._requeue_in_flight()

    def _requeue_in_flight(self) -> None:
        """Everything unacknowledged goes out again, in its original order
        (the outbox holds exactly the unacknowledged messages, in order)."""
        if self.in_flight:
            self.unsent = deque(self.outbox)
            self.in_flight.clear()

    # --- replies ----------------------------------------------------------------------

    def _read(self, which: str, decode, handle, now: float) -> None:
        """Read a batch from socket ``which`` ("dealer" or "sub"): anything
        from the broker proves it alive; what does not decode is logged."""
        for _ in range(RECV_BATCH):
            sock = getattr(self, which)  # a handler may have closed it
            if sock is None:
                return
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.broker_seen = now
            try:
                decoded = decode(frames)
            except m.ProtocolError as e:
                log.warning("bad frame from the broker's %s socket: %s", which, e.reason)
                continue
            handle(decoded, frames[0], now)

    def _read_replies(self, now: float) -> None:
        self._read("dealer", m.decode_reply, self._on_reply, now)

    def _on_reply(self, reply, first_frame: bytes, now: float) -> None:
        getattr(self, f"_on_{reply.TYPE}")(reply, now)

    def _on_welcome(self, w: m.Welcome, now: float) -> None:
        first_join = self.epoch is None
        restarted = not first_join and w.epoch != self.epoch
        if first_join or restarted:
            self.last_seq = self.announced_seq = w.seq
            self.buffer = {s: e for s, e in self.buffer.items() if s > w.seq}
        self.epoch, self.token, self.name = w.epoch, w.resume, w.name
        self.interval, self.liveness, self.max_text = (
            w.heartbeat_interval, w.heartbeat_liveness, w.max_text)
        self.phase = "joined"
        self.state = State.CONNECTED
        self.backoff = RECONNECT_DELAY_FIRST
        self._requeue_in_flight()
        self.emit(Joined(w.name, list(w.users), w.resumed, restarted))
        self.emit(StateChanged(State.CONNECTED, f"joined as {w.name}"))
        if first_join and self.s.recent and self._request(m.Recent(self.s.recent, self.token), now):
            self.recent_until = w.seq  # hold live events until the earlier ones are shown
        self._deliver_buffered(now)

    def _on_ack(self, ack: m.Ack, now: float) -> None:
        if self.outbox.pop(ack.id, None) is not None:
            self.in_flight.pop(ack.id, None)
            self.emit(Acked(ack.id, ack.seq))

    def _on_error(self, err: m.Error, now: float) -> None:
        if err.code == m.ErrorCode.NOT_JOINED:
            # The broker lost our session (restart, timeout): join again.
            if self.phase == "joined":
                log.info("broker forgot this session; joining again")
                self._say_hello()
            return
        if err.code == m.ErrorCode.RATE_LIMITED and err.id in self.outbox:
            # Hold everything back, so the order of our messages is kept.
            self.paused_until = now + (err.retry_after or self.interval)
            self._requeue_in_flight()
            return
        if err.id is not None and self.outbox.pop(err.id, None) is not None:
            self.in_flight.pop(err.id, None)
            self.emit(Refused(err.id, err.code, err.reason))
            return
        if self.phase == "hello":
            self.phase = "refused"
            self.emit(JoinRefused(err.code, err.reason))
            return
        log.warning("broker error: %s (%s)", err.reason, err.code)

    def _on_users(self, users: m.Users, now: float) -> None:
        self.emit(users)

    def _on_history(self, h: m.History, now: float) -> None:
        if h.recent:
            self._on_recent(h, now)
            return
        self.fetch_sent_at = None
        if self.phase != "joined":
            return
        if h.first > self.last_seq + 1:
            lost_until = min(h.first - 1, h.until)
            if lost_until > self.last_seq:
                self.emit(Missed(self.last_seq + 1, lost_until))
                self.last_seq = lost_until
        for event in h.events:
            self._on_sequenced(event, now)
        self._deliver_buffered(now)

    def _on_recent(self, h: m.History, now: float) -> None:
        if self.recent_until is None:
            return
        self.emit(Earlier([e for e in h.events if e.seq <= self.recent_until]))
        self.recent_until = None
        self._deliver_buffered(now)

    # --- broadcasts -------------------------------------------------------------------

    def _read_broadcasts(self, now: float) -> None:
        self._read("sub", m.decode_broadcast, self._on_broadcast, now)

    def _on_broadcast(self, events: list, topic: bytes, now: float) -> None:
        for event in events:
            if isinstance(event, m.Heartbeat):
                self._on_heartbeat(event, topic, now)
            elif isinstance(event, m.Shutdown):
                self._reconnect(now, "the broker is shutting down")
                return
            else:
                self._on_sequenced(event, now)

    def _on_heartbeat(self, hb: m.Heartbeat, topic: bytes, now: float) -> None:
        if self.phase == "probe" and topic == m.READY_TOPIC_PREFIX + self.nonce:
            # The subscription is live: from now on nothing is missed.
            self.sub.setsockopt(zmq.UNSUBSCRIBE, topic)
            self._say_hello()
            return
        if self.phase != "joined":
            return
        if hb.epoch != self.epoch:
            # A new broker took over the port without us noticing: join it.
            self._say_hello()
            return
        self.announced_seq = max(self.announced_seq, hb.seq)
        self._catch_up(now)

    def _on_sequenced(self, event, now: float) -> None:
        if event.seq <= self.last_seq:
            return  # already shown (or before our welcome)
        if len(self.buffer) < MAX_BUFFERED_EVENTS:
            self.buffer[event.seq] = event
        if self.phase == "joined":
            self._deliver_buffered(now)

    def _deliver_buffered(self, now: float) -> None:
        if self.recent_until is not None:
            return
        while (event := self.buffer.pop(self.last_seq + 1, None)) is not None:
            self.last_seq = event.seq
            self.emit(event)
        # Stale entries at or below last_seq (from a history reply) go too.
        for seq in [s for s in self.buffer if s <= self.last_seq]:
            del self.buffer[seq]
        self._catch_up(now)

    def _catch_up(self, now: float) -> None:
        """Fetch the next part of a gap, up to the first event held (or, with
        none held, up to the newest seq the broker has announced)."""
        until = min(self.buffer) - 1 if self.buffer else self.announced_seq
        if until > self.last_seq:
            self._fetch(until, now)

    def _fetch(self, until: int, now: float) -> None:
        """Ask for the events after last_seq up to ``until``, once at a time."""
        if self.fetch_sent_at is not None or self.dealer is None:
            return
        if self._request(m.Fetch(self.last_seq, until, self.token), now):
            self.fetch_sent_at = now

    # --- timers ---------------------------------------------------------------------

    def _on_timers(self, now: float) -> None:
        if self.reconnect_at is not None:
            if now >= self.reconnect_at:
                self.state = State.CONNECTING
                self.emit(StateChanged(State.CONNECTING, f"connecting to {self.s.address}"))
                self._open_sockets(now)
            return
        if now - self.broker_seen > self.interval * self.liveness:
            what = "broker not responding" if self.phase == "joined" else "broker unreachable"
            self._reconnect(now, what)
            return
        if self.phase == "hello" and not self.hello_sent:
            self.hello_sent = self._request(m.Hello(self.name, resume=self.token), now)
        elif self.phase == "joined":
            if self.fetch_sent_at is not None and now - self.fetch_sent_at > self._patience:
                self.fetch_sent_at = None  # the answer was lost: ask again
                self._catch_up(now)
            if now - self.last_request >= self.interval:
                self._request(m.Ping(self.token), now)
            if self.in_flight and now - next(iter(self.in_flight.values())) > self._patience:
                # An answer was lost (the broker dropped a reply): send again;
                # the broker acknowledges a repeat without showing it twice.
                self._requeue_in_flight()

    def _shut_down(self) -> None:
        if self.dealer is not None and self.phase == "joined":
            self._request(m.Bye(self.token), time.monotonic())
            self.dealer.setsockopt(zmq.LINGER, CLOSE_LINGER_MS)
        for sock in (self.dealer, self.sub):
            if sock is not None:
                sock.close()
        self.dealer = self.sub = None
        self.state = State.CLOSED
        self.emit(StateChanged(State.CLOSED, "left"))


def list_users(host: str, port: int, timeout: float,
               encryption: Encryption | None = None) -> list[str] | None:
    """Who is online, asked without joining; None if no answer in time."""
    ctx = zmq.Context.instance()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    if encryption is not None:
        encryption.apply(dealer)
    try:
        dealer.connect(f"tcp://{host}:{port}")
        dealer.send(m.encode(m.Who()))
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            if not dealer.poll(remaining * 1000):
                break
            try:
                reply = m.decode_reply(dealer.recv_multipart())
            except m.ProtocolError:
                continue
            if isinstance(reply, m.Users):
                return reply.users
        return None
    finally:
        dealer.close()


# --- command-line options shared by both clients ------------------------------------


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    """--host, --port, --name, --server-key and --key, with their defaults."""
    parser.add_argument("--host", default=os.environ.get("CHAT_HOST", "127.0.0.1"),
                        help="broker address (default 127.0.0.1, env CHAT_HOST)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("CHAT_PORT", 5555)),
                        help="broker request port; broadcasts use the next one "
                             "(default 5555, env CHAT_PORT)")
    parser.add_argument("--name", default=os.environ.get("CHAT_NAME"),
                        help="your username (default env CHAT_NAME, else your login name)")
    parser.add_argument("--server-key", metavar="KEY|FILE",
                        help="encrypt to a broker run with --curve-secret: its public key")
    parser.add_argument("--key", metavar="FILE",
                        help="your own key pair (.key_secret), for a broker run with --allow")


def login_name() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no login name in some containers
        return "user"


def encryption_from_args(args: argparse.Namespace) -> Encryption | None:
    """The Encryption the options ask for; raises keys.KeyFileError."""
    if args.server_key is None:
        if args.key is not None:
            raise keys.KeyFileError("--key needs --server-key")
        return None
    pair = keys.load_key_pair(args.key) if args.key else None
    return Encryption(keys.load_public_key(args.server_key), pair)
