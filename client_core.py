"""The client's logic with no I/O: joining, liveness, the outbox, the streams.

ClientCore is the client-side twin of broker_core.BrokerCore, in the sans-IO
style: it is driven by what happened (frames from the broker's two sockets,
a command from the caller) and the monotonic time, and returns what to do:
actions for the socket shell (Connect, Disconnect, Subscribe, Unsubscribe,
Request) and events for the caller (StateChanged, Joined, messages.Message,
...). It never reads a clock, never touches a socket or a thread, so
client_session.py stays a thin shell and the tests drive it directly.

Theory of operation
-------------------
The phases and which input each acts on are one table, TRANSITIONS:

    WAITING --timer--> PROBING --ready heartbeat--> HELLO --welcome--> JOINED
                                                      |--refusal--> REFUSED --join(name)--> HELLO
    any phase with sockets --silence, shutdown--> WAITING (backoff)
    JOINED --not_joined, heartbeat of a new epoch--> HELLO (same sockets)
    HELLO --no welcome within patience--> WAITING (new sockets, hello again)

1. Connect: open both sockets, subscribe to the streams and to a private
   ready topic; the broker answers the ready topic with a heartbeat, which
   proves the subscription is live (the Clone pattern's slow-joiner fix).
2. Hello: the welcome gives how many are online, each room's position and
   member count, and a resume token that takes the name back after a
   reconnect. Who they are is asked with ``who``, a page at a time.
3. Joined: each stream's StreamReader (client_stream.py) hands events on in
   order, exactly once, and repairs gaps. Chat text goes out from the Outbox
   with a bounded window and stays there until acknowledged, so it is sent
   again after a reconnect and the broker drops the repeats by message id.
4. Liveness (Paranoid Pirate): ping when quiet for half the broker's
   patience (messages.ping_period: any request counts); when the
   broker has been silent for liveness x interval, drop both sockets and
   start again with a doubling backoff, resuming the name. Only the broker
   run that welcomed us proves itself alive: a heartbeat of another epoch
   (a new broker on the port) is a reason to join it, not a sign of life.
5. A hello with no welcome within that patience (the broker died after
   reading it, or its welcome was lost) is given up like silence: new
   sockets, and hello again. Should the broker have joined us before the
   welcome was lost, that session now holds our name until it times out,
   so for a while ``name_taken`` may be our own ghost: the hello is tried
   again until GHOST_PATIENCES patiences after the lost one, and only then
   is the name refused. (Answering a second token-less hello from the same
   routing id with the welcome again would avoid the wait, but would hand
   the session token to whoever takes over a dropped connection's routing
   id; new sockets never meet the ghost's routing id.)

The shell sends each Request without blocking; what cannot go now (the
DEALER is not connected yet, or its queue is full) it hands back through
``not_sent``, in order, and the core tries again later.
"""

from __future__ import annotations

import enum
import logging
import secrets
from collections import OrderedDict, deque
from dataclasses import dataclass, replace
from typing import Any

import messages as m
from client_stream import Earlier, StreamReader

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
# A request that could not go out (DEALER not connected yet, queue full) is
# tried again after this long.
SEND_RETRY_S = 0.05
# A session that our unanswered hello may have created holds the name until
# the broker times it out: liveness x interval (our patience, as far as we
# know the broker's values) plus its sweep. Twice that is a safe wait.
GHOST_PATIENCES = 2.0


class Phase(enum.Enum):
    WAITING = "waiting"  # no sockets: waiting to (re)connect
    PROBING = "probing"  # sockets open: waiting for proof the subscription is live
    HELLO = "hello"  # saying hello: waiting for the welcome
    JOINED = "joined"
    REFUSED = "refused"  # the broker refused the name: waiting for join(name)
    CLOSED = "closed"


class State:
    """The connection state the caller sees (StateChanged.state)."""

    CONNECTING = "connecting"
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"
    CLOSED = "closed"


# --- actions for the shell -------------------------------------------------------


class Action:
    """Something for the socket shell to do; every other output is an event
    for the caller."""


@dataclass(frozen=True)
class Connect(Action):
    """Open the DEALER and the SUB, subscribing the SUB to ``topics``."""

    topics: tuple[bytes, ...]


@dataclass(frozen=True)
class Disconnect(Action):
    """Close both sockets; ``linger``: let a last request (bye) get out."""

    linger: bool = False


@dataclass(frozen=True)
class Subscribe(Action):
    topic: bytes


@dataclass(frozen=True)
class Unsubscribe(Action):
    topic: bytes


@dataclass(frozen=True)
class Request(Action):
    """Send ``message`` on the DEALER without blocking."""

    message: Any


# --- events for the caller ------------------------------------------------------


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
    online: int  # people online broker-wide
    resumed: bool
    broker_restarted: bool
    rooms: tuple = ()  # a messages.Room for each room we are in
    # The largest text the broker takes, in UTF-8 bytes: a client checks
    # what is typed against it before showing it as sent.
    max_text: int = m.DEFAULT_MAX_TEXT_BYTES


@dataclass(frozen=True)
class JoinRefused:
    """The broker refused the name; call join() with another, or close()."""

    code: str
    reason: str


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
class RoomJoined:
    """We are in ``room`` now (or its topic was set: the same answer)."""

    room: m.Room


@dataclass(frozen=True)
class RoomParted:
    room: str


@dataclass(frozen=True)
class BrokerRefused:
    """The broker refused a request that is not a message (join, part, topic...)."""

    code: str
    reason: str


# --- the outbox -------------------------------------------------------------------


class Outbox:
    """Chat text until the broker acknowledges it, sent in order.

    ``pending`` holds exactly the unacknowledged messages, oldest first;
    ``unsent`` the ids waiting for the window; ``in_flight`` those on the
    wire, with when they were sent.
    """

    def __init__(self) -> None:
        self.pending: OrderedDict[str, tuple[str, str | None, str | None]] = OrderedDict()
        self.unsent: deque[str] = deque()
        self.in_flight: dict[str, float] = {}
        self.paused_until = 0.0  # rate limited: nothing goes before this
        self.retry_at = 0.0  # a send failed: try again from this time

    def add(self, msg_id: str, text: str, room: str | None, to: str | None) -> None:
        self.pending[msg_id] = (text, room, to)
        self.unsent.append(msg_id)

    def settle(self, msg_id: str) -> bool:
        """Acknowledged or refused for good: forget it. False if unknown."""
        if self.pending.pop(msg_id, None) is None:
            return False
        self.in_flight.pop(msg_id, None)
        return True

    def take(self, now: float, token: str | None) -> list:
        """The Say requests that may go now, within the window."""
        if now < self.paused_until or now < self.retry_at:
            return []
        out = []
        while self.unsent and len(self.in_flight) < SEND_WINDOW:
            msg_id = self.unsent.popleft()
            if msg_id not in self.pending:  # acked while waiting for a resend
                continue
            text, room, to = self.pending[msg_id]
            self.in_flight[msg_id] = now
            out.append(Request(m.Say(msg_id, text, token, room, to)))
        return out

    def not_sent(self, msg_ids: list[str], now: float) -> None:
        """These could not go out: back to the front of the queue, in order."""
        for msg_id in reversed(msg_ids):
            self.in_flight.pop(msg_id, None)
            self.unsent.appendleft(msg_id)
        self.retry_at = now + SEND_RETRY_S

    def send_again(self) -> None:
        """Everything unacknowledged goes out again, in its original order."""
        if self.in_flight:
            self.unsent = deque(self.pending)
            self.in_flight.clear()

    def pause(self, until: float) -> None:
        """Rate limited: hold everything back, so the order is kept."""
        self.paused_until = until
        self.send_again()

    def oldest_in_flight(self) -> float | None:
        return next(iter(self.in_flight.values()), None)

    def next_deadline(self) -> float | None:
        if not self.unsent:
            return None
        return max(self.paused_until, self.retry_at)


# --- the core ------------------------------------------------------------------------

# Input kinds that are not message classes.
READY = "ready heartbeat"  # a heartbeat on our own ready topic
SEQUENCED = "sequenced event"  # a Message, Join, Leave or Topic of a stream

# Which input each phase acts on, and how. An input missing from its phase's
# row is ignored: a late answer to an earlier connection, a heartbeat before
# we are joined, a reply to a request that no longer matters.
_WHILE_CONNECTED = {m.Shutdown: "_on_shutdown", m.Users: "_on_users", m.RoomList: "_on_users",
                    SEQUENCED: "_on_sequenced"}
TRANSITIONS: dict[Phase, dict[Any, str]] = {
    Phase.WAITING: {},
    Phase.PROBING: {**_WHILE_CONNECTED, READY: "_on_ready"},
    Phase.HELLO: {**_WHILE_CONNECTED, m.Welcome: "_on_welcome", m.Error: "_on_join_error"},
    Phase.JOINED: {**_WHILE_CONNECTED, m.Welcome: "_on_welcome", m.Error: "_on_error",
                   m.Ack: "_on_ack", m.History: "_on_history", m.Heartbeat: "_on_heartbeat",
                   m.Position: "_on_position", READY: "_on_room_ready", m.Room: "_on_room",
                   m.Parted: "_on_parted", m.Members: "_on_members"},
    Phase.REFUSED: {m.Shutdown: "_on_shutdown", m.Users: "_on_users",
                    m.RoomList: "_on_users"},
    Phase.CLOSED: {},
}


class ClientCore:
    """One user's session with a broker, as a state machine."""

    # A message refused with these goes again after retry_after: too fast,
    # or the broker cannot store it now (its disk is full).
    TEMPORARY_REFUSALS = (m.ErrorCode.RATE_LIMITED, m.ErrorCode.UNAVAILABLE)

    def __init__(self, name: str, recent: int = 0, address: str = "the broker",
                 rooms: tuple[str, ...] = (m.GENERAL_ROOM,), quiet: bool = False,
                 secret: str | None = None):
        """``recent``: how many earlier messages of each room to ask for on
        joining; ``address``: the broker's, as people should read it;
        ``rooms``: the rooms to be in; ``quiet``: not announced or listed
        (a script's send); ``secret``: proves this is the same person as the
        name's other connections."""
        self.name = name
        self.recent = min(recent, m.MAX_FETCH_EVENTS)
        self.address = address
        self.quiet = quiet
        self.secret = secret
        self.phase = Phase.WAITING
        self.state = State.CONNECTING
        self.interval = DEFAULT_HEARTBEAT_INTERVAL
        self.liveness = DEFAULT_HEARTBEAT_LIVENESS
        self.max_text = m.DEFAULT_MAX_TEXT_BYTES
        self.backoff = RECONNECT_DELAY_FIRST
        self.reconnect_at = 0.0  # in WAITING: when to connect
        self.broker_seen = 0.0  # the last frame from the broker, on either socket
        self.last_request = 0.0
        self.hello_sent_at: float | None = None  # in HELLO: None until it went out
        self.hello_retry_at = 0.0  # in HELLO: when to try a hello that did not go out
        # Until then, name_taken may answer a session our unanswered hello made.
        self.ghost_until = float("-inf")
        self.ready_topic = b""
        self.epoch: str | None = None
        self.token: str | None = None
        self.outbox = Outbox()
        self.streams: dict[str, StreamReader] = {}  # stream id -> its reader
        self.by_topic: dict[bytes, StreamReader] = {}
        self.rooms: dict[str, str] = {}  # room key -> the name we were told or asked for
        self.entering: dict[bytes, str] = {}  # ready topic -> room being joined
        self.dm: StreamReader | None = None  # our direct messages, from the welcome on
        for room in rooms:
            self._add_room(room)
        self._table = {phase: {kind: getattr(self, handler) for kind, handler in row.items()}
                       for phase, row in TRANSITIONS.items()}

    @property
    def ping_period(self) -> float:
        """How long we may send nothing before we ping (messages.ping_period)."""
        return m.ping_period(self.interval, self.liveness)

    @property
    def patience(self) -> float:
        """How long silence from the broker (or a missing answer) may last."""
        return self.interval * self.liveness

    # --- streams ------------------------------------------------------------------

    def _add_room(self, room: str) -> StreamReader:
        key = m.room_key(room)
        self.rooms[key] = room
        return self._reader(key)

    def _reader(self, stream_id: str) -> StreamReader:
        reader = self.streams.get(stream_id)
        if reader is None:
            reader = self.streams[stream_id] = StreamReader(stream_id)
            if reader.topic is not None:
                self.by_topic[reader.topic] = reader
        return reader

    def _drop_room(self, key: str) -> list:
        self.rooms.pop(key, None)
        reader = self.streams.pop(key, None)
        if reader is None:
            return []
        self.by_topic.pop(reader.topic, None)
        return [Unsubscribe(reader.topic)] if self.phase is not Phase.WAITING else []

    # --- commands from the caller ----------------------------------------------------

    def start(self, now: float) -> list:
        return self._connect(now)

    def send(self, msg_id: str, text: str, now: float, room: str | None = None,
             to: str | None = None) -> list:
        """Queue chat text for a room (None: #general) or a person; it goes
        out when it may."""
        problem = m.text_problem(text, self.max_text)
        if problem:
            return [Refused(msg_id, *problem)]
        self.outbox.add(msg_id, text, room, to)
        return self._flush(now)

    def who(self, now: float, room: str | None = None, after: str | None = None) -> list:
        """Ask a page of who is online (in ``room``); ``after``: the previous
        page's ``next``. The answer is a messages.Users event."""
        return self._ask(m.Who(room, after), now, "cannot list users")

    def list_rooms(self, now: float) -> list:
        return self._ask(m.ListRooms(), now, "cannot list rooms")

    def join_room(self, room: str, now: float) -> list:
        """Enter ``room``: subscribe to it, prove the subscription, then ask."""
        key = m.room_key(room)
        if key in self.rooms:
            return []
        self._add_room(room)
        if self.phase is not Phase.JOINED:
            return []  # the next hello names it
        return self._probe_room(key)

    def part_room(self, room: str, now: float) -> list:
        key = m.room_key(room)
        if key not in self.rooms:
            return []
        if self.phase is not Phase.JOINED:
            return self._drop_room(key)
        return [self._request(m.PartRoom(room, self.token), now)]

    def set_topic(self, room: str, text: str, now: float) -> list:
        return self._ask(m.SetTopic(room, text, self.token), now, "cannot set the topic")

    def _ask(self, request: Any, now: float, what: str) -> list:
        if self.phase in (Phase.WAITING, Phase.CLOSED):
            return [StateChanged(self.state, f"not connected: {what}")]
        return [self._request(request, now)]

    def join(self, name: str, now: float) -> list:
        """Try another name (after JoinRefused)."""
        self.name = name
        self.token = None
        return self._say_hello(now) if self.phase is Phase.REFUSED else []

    def close(self, now: float) -> list:
        """Leave: others see ``quit`` when we were joined."""
        out: list = []
        if self.phase is Phase.JOINED:
            out.append(self._request(m.Bye(self.token), now))
        if self.phase is not Phase.WAITING:
            out.append(Disconnect(linger=self.phase is Phase.JOINED))
        self.phase, self.state = Phase.CLOSED, State.CLOSED
        return [*out, StateChanged(State.CLOSED, "left")]

    # --- inputs from the sockets --------------------------------------------------------

    def receive_reply(self, frames: list[bytes], now: float) -> list:
        """Frames from the DEALER: any reply proves the broker alive."""
        self.broker_seen = now
        reply = self._decoded(m.decode_reply, frames)
        if reply is None:
            return []
        if isinstance(reply, m.Message):  # a direct message, ours alone
            return [] if self.dm is None else self._dispatch(SEQUENCED, (self.dm, reply), now)
        return self._dispatch(type(reply), reply, now)

    def receive_broadcast(self, frames: list[bytes], now: float) -> list:
        """Frames from the SUB: ``[topic, events]``."""
        events = self._decoded(m.decode_broadcast, frames)
        topic = frames[0] if frames else b""
        # Our broker is alive; a heartbeat of a run that has not welcomed us
        # is not it (the ready topic's answer is the probe's own proof).
        if topic == self.ready_topic or not any(
                isinstance(e, m.Heartbeat) and e.epoch != self.epoch for e in events or ()):
            self.broker_seen = now
        if events is None:
            return []
        out: list = []
        for event in events:
            if isinstance(event, m.SEQUENCED_EVENTS):
                reader = self.by_topic.get(topic)
                if reader is not None:
                    out += self._dispatch(SEQUENCED, (reader, event), now)
            elif isinstance(event, m.Heartbeat) and topic.startswith(m.READY_TOPIC_PREFIX):
                out += self._dispatch(READY, topic, now)
            else:
                out += self._dispatch(type(event), event, now)
        return out

    def not_sent(self, requests: list, now: float) -> list:
        """Requests the shell could not send now, in the order given."""
        out: list = []
        unsent_says = []
        for request in requests:
            msg = request.message
            if isinstance(msg, m.Say):
                unsent_says.append(msg.id)
            elif isinstance(msg, m.Hello):
                self.hello_sent_at = None  # tick() tries again
                self.hello_retry_at = now + SEND_RETRY_S
            elif isinstance(msg, m.Fetch):
                self._reader_named(msg.stream).fetch_not_sent()
            elif isinstance(msg, (m.Who, m.ListRooms, m.SetTopic, m.PartRoom, m.JoinRoom)):
                out.append(StateChanged(self.state, f"not connected: cannot {msg.TYPE}"))
            elif isinstance(msg, m.Recent):
                self._reader_named(msg.stream).recent_not_sent()
        if unsent_says:
            self.outbox.not_sent(unsent_says, now)
        return out

    @staticmethod
    def _decoded(decode, frames: list[bytes]):
        """What the frames say, or None (logged) if they do not decode."""
        try:
            return decode(frames)
        except m.ProtocolError as e:
            log.warning("bad frames from the broker: %s", e.reason)
            return None

    # --- time -----------------------------------------------------------------------------

    def tick(self, now: float) -> list:
        """Time passed: connect, ping, give up on silence, retry what is due."""
        if self.phase is Phase.CLOSED:
            return []
        if self.phase is Phase.WAITING:
            return self._connect(now) if now >= self.reconnect_at else []
        if now - self.broker_seen > self.patience:
            why = ("broker not responding" if self.phase is Phase.JOINED
                   else "broker unreachable")
            return self._reconnect(now, why)
        if self.phase is Phase.HELLO and self.hello_sent_at is None:
            if now < self.hello_retry_at:
                return []
            self.hello_sent_at = now
            return [self._hello(now)]
        if self.phase is Phase.HELLO and now - self.hello_sent_at > self.patience:
            return self._reconnect(now, "no welcome from the broker")
        if self.phase is not Phase.JOINED:
            return []
        out: list = []
        for reader in self.streams.values():
            out += self._requests(reader.tick(now, self.patience), now)
        oldest = self.outbox.oldest_in_flight()
        if oldest is not None and now - oldest > self.patience:
            # An answer was lost (the broker dropped a reply): send again;
            # the broker acknowledges a repeat without showing it twice.
            self.outbox.send_again()
        out += self._flush(now)
        if now - self.last_request >= self.ping_period:
            out.append(self._request(m.Ping(self.token), now))
        return out

    def next_deadline(self) -> float:
        """When tick() next has work to do (monotonic)."""
        if self.phase is Phase.CLOSED:
            return float("inf")
        if self.phase is Phase.WAITING:
            return self.reconnect_at
        deadlines = [self.broker_seen + self.patience]
        if self.phase is Phase.HELLO:
            deadlines.append(self.hello_retry_at if self.hello_sent_at is None
                             else self.hello_sent_at + self.patience)
        if self.phase is Phase.JOINED:
            deadlines.append(self.last_request + self.ping_period)
            deadlines += [t for r in self.streams.values()
                          if (t := r.next_deadline(self.patience)) is not None]
            if (oldest := self.outbox.oldest_in_flight()) is not None:
                deadlines.append(oldest + self.patience)
            if (t := self.outbox.next_deadline()) is not None:
                deadlines.append(t)
        return min(deadlines)

    # --- dispatch ----------------------------------------------------------------------------

    def _dispatch(self, kind: Any, value: Any, now: float) -> list:
        handler = self._table[self.phase].get(kind)
        if handler is None:
            log.debug("ignored %s in phase %s", kind, self.phase.value)
            return []
        return handler(value, now)

    def _on_ready(self, topic: bytes, now: float) -> list:
        if topic != self.ready_topic:
            return []
        # The subscriptions are live: from now on nothing is missed.
        return [Unsubscribe(self.ready_topic), *self._say_hello(now)]

    def _on_room_ready(self, topic: bytes, now: float) -> list:
        """A room's subscription is live: ask to enter it."""
        room = self.entering.pop(topic, None)
        if room is None or room not in self.rooms:
            return []
        return [Unsubscribe(topic), self._request(m.JoinRoom(self.rooms[room], self.token), now)]

    def _probe_room(self, key: str) -> list:
        ready = m.READY_TOPIC_PREFIX + secrets.token_hex(8).encode()
        self.entering[ready] = key
        return [Subscribe(self.streams[key].topic), Subscribe(ready)]

    def _on_room(self, info: m.Room, now: float) -> list:
        key = m.room_key(info.room)
        reader = self.streams.get(key)
        if reader is None or key not in self.rooms:
            return []  # parted meanwhile
        self.rooms[key] = info.room
        if reader.live:
            return [RoomJoined(info), *self._requests(reader.on_announce(info.seq, now), now)]
        reader.start_at(info.seq)
        out: list = [RoomJoined(info)]
        if self.recent:
            out += self._requests([reader.hold_for_recent(self.recent, now)], now)
        return out + self._requests(reader.resume(now), now)

    def _on_parted(self, parted: m.Parted, now: float) -> list:
        return [*self._drop_room(m.room_key(parted.room)), RoomParted(parted.room)]

    def _on_position(self, position: m.Position, now: float) -> list:
        reader = self.streams.get(position.stream)
        return [] if reader is None else self._requests(reader.on_announce(position.seq, now), now)

    def _on_welcome(self, w: m.Welcome, now: float) -> list:
        first_join = self.epoch is None
        restarted = not first_join and w.epoch != self.epoch
        fresh = [] if first_join or restarted else [r for r in self.streams.values()
                                                     if not r.live and r.last_seq == 0]
        if self.dm is None or self.dm.id != m.dm_stream(w.name):
            self.dm = self._reader(m.dm_stream(w.name))
            fresh.append(self.dm)
        # A room parted while we were away is still ours at the broker: part it
        # there too, and follow it no more.
        parted_meanwhile = [r.room for r in w.rooms if m.room_key(r.room) not in self.rooms]
        positions = [(self._reader(m.room_key(r.room)), r.seq) for r in w.rooms
                     if m.room_key(r.room) in self.rooms]
        positions.append((self.dm, w.dm_seq))
        out: list = []
        for reader, seq in positions:
            if first_join or restarted or reader in fresh:
                reader.start_at(seq)  # counting starts here
            else:  # the same run: a position, and what is after ours is a gap
                reader.announced_seq = max(reader.announced_seq, seq)
        self.epoch, self.token, self.name = w.epoch, w.resume, w.name
        self.interval, self.liveness, self.max_text = (
            w.heartbeat_interval, w.heartbeat_liveness, w.max_text)
        self.phase, self.state = Phase.JOINED, State.CONNECTED
        self.hello_sent_at = None
        self.backoff = RECONNECT_DELAY_FIRST
        self.outbox.send_again()
        out += [Joined(w.name, w.online, w.resumed, restarted, tuple(w.rooms), w.max_text),
                StateChanged(State.CONNECTED, f"joined as {w.name}")]
        if self.recent:  # not asked yet, or not answered before we rejoined
            for reader, _ in positions[:-1]:
                out += self._requests([reader.hold_for_recent(self.recent, now)], now)
        for reader in self.streams.values():
            out += self._requests(reader.resume(now), now)
        # rooms asked for while the hello was on its way are entered now
        for key in self.rooms.keys() - {m.room_key(r.room) for r in w.rooms}:
            out += self._probe_room(key)
        out += [self._request(m.PartRoom(room, self.token), now) for room in parted_meanwhile]
        return out + self._flush(now)

    def _on_join_error(self, err: m.Error, now: float) -> list:
        """An error while saying hello: the name is refused (or the broker
        lost a session we were resuming)."""
        if err.code == m.ErrorCode.NOT_JOINED or err.id is not None:
            return []  # an answer to a request of our previous session
        if err.code == m.ErrorCode.NAME_TAKEN and now < self.ghost_until:
            # Perhaps by the session of our own hello whose welcome was lost.
            log.info("%s; perhaps by our own unanswered hello: trying again", err.reason)
            return self._hello_later(min(now + self.interval, self.ghost_until))
        if err.code == m.ErrorCode.UNAVAILABLE:  # the broker cannot store our join yet
            return [StateChanged(self.state, err.reason),
                    *self._hello_later(now + (err.retry_after or self.interval))]
        self.phase = Phase.REFUSED
        return [JoinRefused(err.code, err.reason)]

    def _on_error(self, err: m.Error, now: float) -> list:
        if err.code == m.ErrorCode.NOT_JOINED:
            # The broker lost our session (restart, timeout): join again.
            log.info("broker forgot this session; joining again")
            return self._say_hello(now)
        if err.code in self.TEMPORARY_REFUSALS and err.id in self.outbox.pending:
            # Not final: hold everything back, then send again from this one.
            paused = now < self.outbox.paused_until
            self.outbox.pause(now + (err.retry_after or self.interval))
            if err.code == m.ErrorCode.UNAVAILABLE and not paused:
                return [StateChanged(self.state, err.reason)]
            return []
        if err.id is not None and self.outbox.settle(err.id):
            return [Refused(err.id, err.code, err.reason)]
        return [BrokerRefused(err.code, err.reason)]

    def _hello_later(self, when: float) -> list:
        """Say hello again at ``when`` (tick sends it)."""
        self.hello_sent_at = None
        self.hello_retry_at = when
        return []

    def _on_ack(self, ack: m.Ack, now: float) -> list:
        if not self.outbox.settle(ack.id):
            return []
        return [Acked(ack.id, ack.seq), *self._flush(now)]

    def _on_users(self, users: m.Users, now: float) -> list:
        return [users]

    def _on_members(self, members: m.Members, now: float) -> list:
        """A big room's count: for the caller, if we are in that room."""
        return [members] if m.room_key(members.room) in self.rooms else []

    def _on_history(self, h: m.History, now: float) -> list:
        reader = self._reader_named(h.stream)
        if reader is None:
            return []
        if not h.recent:
            return self._requests(reader.on_history(h, now), now)
        out = reader.on_recent(h, now)
        if any(isinstance(o, Earlier) for o in out) and not any(
                r.recent_until is not None for r in self.streams.values()):
            self.recent = 0  # shown: not asked again on a later welcome
        return self._requests(out, now)

    def _on_heartbeat(self, hb: m.Heartbeat, now: float) -> list:
        if hb.epoch != self.epoch:
            # A new broker took over the port without us noticing: join it.
            return self._say_hello(now)
        return []

    def _on_sequenced(self, reader_and_event: tuple, now: float) -> list:
        reader, event = reader_and_event
        return self._requests(reader.on_event(event, now), now)

    def _on_shutdown(self, shutdown: m.Shutdown, now: float) -> list:
        return self._reconnect(now, "the broker is shutting down")

    # --- transitions -------------------------------------------------------------------------

    def _connect(self, now: float) -> list:
        self.ready_topic = m.READY_TOPIC_PREFIX + secrets.token_hex(8).encode()
        self.phase = Phase.PROBING
        self.broker_seen = now  # patience runs from here
        self.entering.clear()
        topics = (m.HEARTBEAT_TOPIC, *self.by_topic, self.ready_topic)
        out: list = [Connect(topics)]
        if self.state != State.CONNECTING:
            self.state = State.CONNECTING
            out.append(StateChanged(State.CONNECTING, f"connecting to {self.address}"))
        return out

    def _reconnect(self, now: float, why: str) -> list:
        """Drop both sockets and try again after a backoff (Paranoid Pirate)."""
        delay = self.backoff
        self.backoff = min(self.backoff * 2, RECONNECT_DELAY_MAX)
        self.reconnect_at = now + delay
        if self.phase is Phase.HELLO and self.hello_sent_at is not None:
            self.ghost_until = self.hello_sent_at + GHOST_PATIENCES * self.patience
        self.phase, self.state = Phase.WAITING, State.RECONNECTING
        self.hello_sent_at = None
        for reader in self.streams.values():
            reader.pause()
        self.outbox.send_again()
        log.info("%s; reconnecting in %.2fs", why, delay)
        return [Disconnect(), StateChanged(State.RECONNECTING, why, delay)]

    def _say_hello(self, now: float) -> list:
        """(Re)join on the open sockets: what was in flight goes again after
        the welcome, and requests of the old session are forgotten."""
        self.phase = Phase.HELLO
        self.hello_sent_at = now
        for reader in self.streams.values():
            reader.pause()
        self.outbox.send_again()
        return [self._hello(now)]

    # --- helpers -------------------------------------------------------------------------------

    def _hello(self, now: float) -> Request:
        return self._request(m.Hello(self.name, resume=self.token, secret=self.secret,
                                     quiet=self.quiet, rooms=list(self.rooms.values())), now)

    def _request(self, msg: Any, now: float) -> Request:
        self.last_request = now
        return Request(msg)

    def _requests(self, outputs: list, now: float) -> list:
        """A reader's outputs, its requests signed with our session token."""
        return [self._request(replace(o, session=self.token), now)
                if isinstance(o, (m.Fetch, m.Recent)) else o for o in outputs]

    def _flush(self, now: float) -> list:
        if self.phase is not Phase.JOINED:
            return []
        says = self.outbox.take(now, self.token)
        if says:
            self.last_request = now
        return says

    def _reader_named(self, stream_id: str | None) -> StreamReader | None:
        return self.streams.get(m.GENERAL_ROOM if stream_id is None else stream_id)
