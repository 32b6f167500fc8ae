"""The broker's logic with no I/O: sessions, names, heartbeats, rate limits.

BrokerCore is a plain object in the sans-IO style: every method takes what
happened (the frames a peer sent, the current time) and returns what to do,
in the order it must happen, as a list of Persist, Publish and Reply
outputs. It never reads the clock, never touches a socket or a file, and
never raises on a peer's input, so the ZeroMQ loop in broker.py stays a thin
shell and the tests can drive the logic directly.

Two clocks: ``now`` is monotonic and drives every timer (heartbeats,
liveness, rate limits); ``wall`` is the wall clock and is only stamped on
events for people to read. A wall clock that jumps moves no timer.

Theory of operation
-------------------
* A session is born from a valid ``hello`` and bound to the routing id that
  sent it; nothing is stored for a peer before that, so connections that
  never join hold no memory and need no clean-up.
* Every chat message, join and leave is appended to a stream
  (broker_stream.Stream), which numbers it and keeps a bounded history from
  which clients repair gaps (``fetch``). The chat is the main stream; more
  streams are more Stream objects in ``streams``.
* ``sessions`` is kept in order of last activity (any request counts as a
  heartbeat and moves the session to the end), so the liveness sweep only
  looks at the front of the table, never at every session.
* A resume token from the welcome lets a client that lost its connection
  take its name back from a new routing id before it times out, without a
  leave/join pair.
"""

from __future__ import annotations

import bisect
import logging
import secrets
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import messages as m
from broker_stream import Stream

log = logging.getLogger("zchat.broker")

# Longest string from a peer quoted in a log line.
LOG_QUOTE_CHARS = 80
# Shortest wait asked of a rate-limited client, so it does not spin.
MIN_RETRY_AFTER = 0.1
# Refusals in a row (no message accepted in between) that mark a flood. A
# client that honours retry_after has at most its send window (200) refused
# at once, so a polite client never comes near it.
FLOOD_REFUSALS = 1000


@dataclass(frozen=True)
class BrokerConfig:
    heartbeat_interval: float = 1.0
    # Missed intervals before a peer counts as gone; 3..5 is reasonable (zguide).
    heartbeat_liveness: int = 3
    max_text: int = m.DEFAULT_MAX_TEXT_BYTES
    # Messages kept for late joiners and gap repair.
    history: int = 1000
    # Each user holds two connections; 5,000 users stay well inside a
    # 20,000 open-file limit.
    max_users: int = 5000
    # Token bucket per user: a sustained rate and a burst. Far above any
    # person's typing; a script may pipe a 1,000-line log at once.
    rate: float = 200.0
    burst: int = 1000
    # client public key (Z85) -> the only name it may join under
    names_by_key: dict[str, str] = field(default_factory=dict)

    @property
    def expiry(self) -> float:
        return self.heartbeat_interval * self.heartbeat_liveness

    @property
    def sweep_period(self) -> float:
        """Silent sessions are swept at most this often, so that clients
        lost together (a crashed machine, a cut network) leave in a few
        broadcasts rather than one each: with thousands online, every
        broadcast costs a write per subscriber."""
        return self.heartbeat_interval / 4


@dataclass(frozen=True, slots=True)
class Reply:
    """Send ``message`` to the one peer with routing id ``peer``."""

    peer: bytes
    message: Any


@dataclass(frozen=True, slots=True)
class Publish:
    """Broadcast ``event`` on the PUB socket under ``topic``."""

    event: Any
    topic: bytes = m.BROADCAST_TOPIC


@dataclass(frozen=True, slots=True)
class Persist:
    """Write a new sequenced event of stream ``stream`` to durable storage.

    Comes before the Publish and the Ack of the same event: the shell writes
    everything to persist before it sends anything, so no client hears of an
    event that a crash could still lose. ``sender_id`` is the sender's
    (name key, message id) of a chat message, so a restarted broker still
    recognises a resend.
    """

    stream: str
    event: Any
    sender_id: tuple[str, str] | None = None


@dataclass(slots=True)
class TokenBucket:
    """A rate limit: ``allowance`` messages may go now, refilled at a rate.
    Times are monotonic."""

    allowance: float
    refilled_at: float
    limited_until: float = 0.0

    def take(self, now: float, rate: float, burst: int) -> float:
        """0 if a message may go now, else how long to wait."""
        if now < self.limited_until:
            return self.limited_until - now
        # max(): never refill for time that ran backwards
        self.allowance = min(burst, self.allowance + max(0.0, now - self.refilled_at) * rate)
        self.refilled_at = now
        if self.allowance >= 1:
            self.allowance -= 1
            return 0.0
        wait = max(MIN_RETRY_AFTER, (1 - self.allowance) / rate)
        self.limited_until = now + wait
        return wait


@dataclass(slots=True)
class Session:
    name: str
    peer: bytes
    secret: str  # the session token of the welcome; proves a request is the owner's
    last_seen: float  # monotonic
    bucket: TokenBucket
    refusals: int = 0  # rate refusals since the last accepted message
    # The first message refused for rate. Every later message is refused
    # until this one is sent again, so a client's messages keep their order
    # however late it learns of the refusal.
    blocked_on: str | None = None
    # the name as names are compared; kept, not recomputed for every message
    name_key: str = ""

    def __post_init__(self) -> None:
        self.name_key = m.name_key(self.name)


@dataclass
class BrokerCore:
    config: BrokerConfig = field(default_factory=BrokerConfig)
    epoch: str = field(default_factory=lambda: secrets.token_hex(8))
    # routing id -> session, oldest activity first
    sessions: OrderedDict[bytes, Session] = field(default_factory=OrderedDict)
    by_name: dict[str, Session] = field(default_factory=dict)
    # stream id -> stream; the main stream (the chat) always exists
    streams: dict[str, Stream] = field(default_factory=dict)
    next_heartbeat: float = 0.0
    next_sweep: float = 0.0
    # (name key, name) of everyone online, kept sorted: a join storm must not
    # sort the whole list again for every welcome
    online: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.main = self.open_stream(m.MAIN_STREAM)
        self._handlers = {
            m.Say: self._on_say,
            m.Who: self._on_who,
            m.Ping: self._on_ping,
            m.Fetch: self._on_fetch,
            m.Recent: self._on_recent,
            m.Bye: self._on_bye,
        }

    def open_stream(self, stream_id: str) -> Stream:
        """The stream ``stream_id``, created empty if it does not exist yet."""
        stream = self.streams.get(stream_id)
        if stream is None:
            stream = self.streams[stream_id] = Stream(stream_id, self.config.history)
        return stream

    # --- events from the shell -------------------------------------------------

    def handle(self, peer: bytes, frames: list[bytes], now: float, wall: float,
               client_key: str | None = None) -> list:
        """A request from ``peer`` (the frames after its routing id) at
        monotonic time ``now`` and wall time ``wall``; ``client_key`` is the
        client's public key when the broker checks keys."""
        session = self.sessions.get(peer)
        try:
            request = m.decode_request(frames)
        except m.ProtocolError as e:
            who = session.name if session else peer.hex()
            log.warning("refused from %s: %s (%s)", who, e.reason, e.code)
            return [Reply(peer, m.Error(e.code, e.reason))]
        if isinstance(request, m.Hello):
            return self._on_hello(peer, session, request, now, wall, client_key)
        if session is not None and not isinstance(request, m.Who):
            # A routing id alone proves nothing: a peer may choose its own,
            # such as that of a connection which dropped. The session token
            # (from the welcome) proves the request comes from its owner.
            if not _tokens_match(request.session, session.secret):
                log.warning("request for %s without its session token from %s",
                            session.name, peer.hex())
                session = None
            else:  # any request from the owner counts as a heartbeat
                self._touch(session, now)
        return self._handlers[type(request)](peer, session, request, now, wall)

    def tick(self, now: float, wall: float, backlog: bool = False) -> list:
        """Time passed: heartbeat when due, and drop sessions gone silent.

        With ``backlog`` (requests still waiting to be read) nobody is timed
        out: their pings may be in that backlog, and an overloaded broker
        must not announce live users as gone.
        """
        out: list = []
        if now >= self.next_heartbeat:
            out.append(Publish(self._heartbeat(wall)))
            self.next_heartbeat = now + self.config.heartbeat_interval
        if backlog or now < self.next_sweep:
            return out
        self.next_sweep = now + self.config.sweep_period
        deadline = now - self.config.expiry
        while self.sessions:
            oldest = next(iter(self.sessions.values()))
            if oldest.last_seen > deadline:
                break
            out += self._end_session(oldest, m.LeaveReason.TIMEOUT, wall)
        return out

    def next_deadline(self) -> float:
        """When tick() next has work to do (monotonic)."""
        deadline = self.next_heartbeat
        if self.sessions:
            oldest = next(iter(self.sessions.values()))
            sweep = max(oldest.last_seen + self.config.expiry, self.next_sweep)
            deadline = min(deadline, sweep)
        return deadline

    def peer_unreachable(self, peer: bytes, wall: float) -> list:
        """The shell could not deliver to ``peer``: it is gone."""
        session = self.sessions.get(peer)
        if session is None:
            return []
        return self._end_session(session, m.LeaveReason.DISCONNECTED, wall)

    def ready_probe(self, topic: bytes, wall: float) -> list:
        """A SUB subscribed to a ready topic: prove its subscription is live."""
        nonce = topic[len(m.READY_TOPIC_PREFIX):]
        if not topic.startswith(m.READY_TOPIC_PREFIX) or not 0 < len(nonce) <= m.MAX_TOKEN_CHARS:
            return []
        return [Publish(self._heartbeat(wall), topic=topic)]

    def shutdown(self, wall: float) -> list:
        """The broker is going away: tell everyone."""
        return [Publish(m.Shutdown(wall))]

    # --- request handlers -----------------------------------------------------

    def _on_hello(self, peer: bytes, session: Session | None, hello: m.Hello, now: float,
                  wall: float, client_key: str | None) -> list:
        if hello.v != m.PROTOCOL_VERSION:
            return self._refuse(peer, m.ErrorCode.BAD_VERSION,
                                f"this broker speaks protocol {m.PROTOCOL_VERSION}, not {hello.v}")
        problem = m.name_problem(hello.name)
        if problem:
            return self._refuse(peer, m.ErrorCode.NAME_INVALID, problem)
        name_key = m.name_key(hello.name)
        if session is not None:  # this routing id already speaks for a user
            if session.name_key == name_key and _tokens_match(hello.resume, session.secret):
                self._touch(session, now)
                return [Reply(peer, self._welcome(session, resumed=True))]
            return self._refuse(peer, m.ErrorCode.ALREADY_JOINED,
                                f"this connection is already joined as {session.name}")
        if self.config.names_by_key:
            allowed = self.config.names_by_key.get(client_key or "")
            if allowed is None or m.name_key(allowed) != name_key:
                return self._refuse(peer, m.ErrorCode.NAME_NOT_ALLOWED,
                                    f"your key may not use the name {hello.name}")
        owner = self.by_name.get(name_key)
        if owner is not None:
            if _tokens_match(hello.resume, owner.secret):
                return self._resume(owner, peer, now)
            return self._refuse(peer, m.ErrorCode.NAME_TAKEN, f"the name {owner.name} is taken")
        if len(self.sessions) >= self.config.max_users:
            return self._refuse(peer, m.ErrorCode.SERVER_FULL,
                                f"the broker is full ({self.config.max_users} users)")
        session = Session(hello.name, peer, secrets.token_hex(16), now,
                          TokenBucket(self.config.burst, now))
        self.sessions[peer] = session
        self.by_name[name_key] = session
        bisect.insort(self.online, (name_key, session.name))
        # The welcome's seq precedes the join, so the client sees its own join.
        welcome = self._welcome(session, resumed=False)
        log.info("join %s", session.name)
        return [Reply(peer, welcome),
                *self._append(self.main, lambda seq: m.Join(seq, wall, session.name))]

    def _resume(self, session: Session, peer: bytes, now: float) -> list:
        del self.sessions[session.peer]
        session.peer = peer
        session.last_seen = now
        self.sessions[peer] = session
        log.info("resume %s", session.name)
        return [Reply(peer, self._welcome(session, resumed=True))]

    def _on_say(self, peer: bytes, session: Session | None, say: m.Say, now: float,
                wall: float) -> list:
        if session is None:
            return self._not_joined(peer, say.id)
        stream = self._stream_named(say.stream)
        if stream is None:
            return self._refuse(peer, m.ErrorCode.MALFORMED, f"no stream {say.stream!r}",
                                id=say.id, who=session.name)
        sender_id = (session.name_key, say.id)
        seq = stream.accepted_seq(sender_id)
        if seq is not None:  # a resend of an accepted message: ack it again
            return [Reply(peer, m.Ack(say.id, seq))]
        problem = m.text_problem(say.text, self.config.max_text)
        if problem:
            return self._refuse(peer, *problem, id=say.id, who=session.name)
        if session.blocked_on not in (None, say.id):
            return self._rate_limited(session, say, max(
                MIN_RETRY_AFTER, session.bucket.limited_until - now), wall)
        wait = session.bucket.take(now, self.config.rate, self.config.burst)
        if wait:
            session.blocked_on = say.id
            return self._rate_limited(session, say, wait, wall)
        session.refusals = 0
        session.blocked_on = None
        out = self._append(stream, lambda seq: m.Message(seq, wall, session.name, say.text),
                           sender_id)
        return [*out, Reply(peer, m.Ack(say.id, stream.seq))]

    def _rate_limited(self, session: Session, say: m.Say, wait: float, wall: float) -> list:
        session.refusals += 1
        if session.refusals == 1:
            log.warning("rate limited %s for %.2fs", session.name, wait)
        if session.refusals < FLOOD_REFUSALS:
            return [Reply(session.peer, m.Error(m.ErrorCode.RATE_LIMITED,
                                                f"too fast: wait {wait:.2f}s", say.id, wait))]
        log.warning("disconnecting %s: kept flooding", session.name)
        kick = Reply(session.peer, m.Error(m.ErrorCode.FLOODING,
                                           "disconnected for sending too fast", say.id))
        return [kick, *self._end_session(session, m.LeaveReason.KICKED, wall)]

    def _on_who(self, peer: bytes, session: Session | None, who: m.Who, now: float,
                wall: float) -> list:
        return [Reply(peer, m.Users(self.user_names()))]

    def _on_ping(self, peer: bytes, session: Session | None, ping: m.Ping, now: float,
                 wall: float) -> list:
        # A ping from an unknown peer means the broker lost its session
        # (restart, timeout): say so, so the client joins again.
        return [] if session else self._not_joined(peer)

    def _on_fetch(self, peer: bytes, session: Session | None, fetch: m.Fetch, now: float,
                  wall: float) -> list:
        if session is None:
            return self._not_joined(peer)
        stream = self._stream_named(fetch.stream)
        if stream is None:
            return self._refuse(peer, m.ErrorCode.MALFORMED, f"no stream {fetch.stream!r}")
        history = stream.fetch(fetch.after, fetch.until)
        log.debug("fetch by %s: %d events after %d", session.name, len(history.events),
                  fetch.after)
        return [Reply(peer, history)]

    def _on_recent(self, peer: bytes, session: Session | None, recent: m.Recent,
                   now: float, wall: float) -> list:
        if session is None:
            return self._not_joined(peer)
        stream = self._stream_named(recent.stream)
        if stream is None:
            return self._refuse(peer, m.ErrorCode.MALFORMED, f"no stream {recent.stream!r}")
        return [Reply(peer, stream.recent(recent.count))]

    def _on_bye(self, peer: bytes, session: Session | None, bye: m.Bye, now: float,
                wall: float) -> list:
        if session is None:
            return []
        return self._end_session(session, m.LeaveReason.QUIT, wall)

    # --- helpers ------------------------------------------------------------------

    def user_names(self) -> list[str]:
        return [name for _, name in self.online]

    def _stream_named(self, stream_id: str | None) -> Stream | None:
        return self.streams.get(m.MAIN_STREAM if stream_id is None else stream_id)

    def _touch(self, session: Session, now: float) -> None:
        """Heard from its owner: the session moves to the end of the sweep order."""
        session.last_seen = now
        self.sessions.move_to_end(session.peer)

    def _heartbeat(self, wall: float) -> m.Heartbeat:
        return m.Heartbeat(self.main.seq, self.epoch, wall)

    def _welcome(self, session: Session, resumed: bool) -> m.Welcome:
        c = self.config
        return m.Welcome(session.name, self.main.seq, self.epoch, self.user_names(),
                         session.secret, c.heartbeat_interval, c.heartbeat_liveness, c.max_text,
                         resumed)

    def _end_session(self, session: Session, reason: str, wall: float) -> list:
        del self.sessions[session.peer]
        del self.by_name[session.name_key]
        del self.online[bisect.bisect_left(self.online, (session.name_key, session.name))]
        log.info("leave %s (%s)", session.name, reason)
        return self._append(self.main, lambda seq: m.Leave(seq, wall, session.name, reason))

    @staticmethod
    def _append(stream: Stream, make_event, sender_id: tuple[str, str] | None = None) -> list:
        """Number a new event in ``stream``: persist it, then publish it."""
        event = stream.append(make_event, sender_id)
        return [Persist(stream.id, event, sender_id), Publish(event, stream.topic)]

    def _not_joined(self, peer: bytes, id: str | None = None) -> list:
        return [Reply(peer, m.Error(m.ErrorCode.NOT_JOINED, "join first (send hello)", id))]

    def _refuse(self, peer: bytes, code: str, reason: str, id: str | None = None,
                who: str | None = None) -> list:
        log.warning("refused from %s: %s (%s)", who or peer.hex(), reason[:LOG_QUOTE_CHARS], code)
        return [Reply(peer, m.Error(code, reason, id))]


def _tokens_match(given: str | None, token: str) -> bool:
    """Constant-time comparison (decoding made ``given`` ASCII)."""
    return given is not None and secrets.compare_digest(given.encode(), token.encode())
