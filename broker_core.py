"""The broker's logic with no I/O: users, connections, rooms, direct messages.

BrokerCore is a plain object in the sans-IO style: every method takes what
happened (the frames a peer sent, the current time) and returns what to do,
in the order it must happen, as a list of Persist, Publish and Reply
outputs. It never reads the clock, never touches a socket or a file, and
never raises on a peer's input, so the ZeroMQ loop in broker.py stays a thin
shell and the tests can drive the logic directly.

BrokerCore is the one object the shell talks to. Three of its jobs live in
modules of their own, which it inherits: presence (broker_presence.py), its
side of the Redis backplane (broker_backplane.py) and going back to what is
stored when a pass's events could not be (broker_rewind.py); its outputs and
the causes of its warnings are in broker_outputs.py (imported from here too).

Two clocks: ``now`` is monotonic and drives every timer (heartbeats,
liveness, rate limits); ``wall`` is the wall clock and is only stamped on
events for people to read. A wall clock that jumps moves no timer.

Theory of operation
-------------------
* A user is a name; a session is one connection of it (a window, a
  ``listen``, a script's ``send``). A session is born from a valid ``hello``
  and bound to the routing id that sent it; nothing is stored for a peer
  before that, so connections that never join hold no memory. A second
  connection may use a name in use only with the same secret as the first
  (or, with ``--allow``, the key that owns the name).
* A quiet session (a script's ``send``) is never announced or listed. A
  user is online while any session that is not quiet is; in a room, while
  any such session of the user is in it.
* Every room, and every user's direct messages, is a stream
  (broker_stream.Stream) that numbers its events and keeps a bounded
  history from which clients repair gaps (``fetch``). Room events go out on
  the room's PUB topic; direct messages only to the two parties' sessions,
  through the ROUTER. All histories together stay within a byte budget.
* ``sessions`` is kept in order of last activity (any request counts as a
  heartbeat and moves the session to the end), so the liveness sweep only
  looks at the front of the table, never at every session. A ping in the
  form the reference client writes is recognised without decoding JSON.
* Presence costs the same however many are online: the welcome counts
  people (``who`` lists them, a page at a time); the joins and leaves of one
  pass of the shell's loop are gathered per room (Room.pending) and
  announced in one Presence event per room when the pass ends
  (``flush_presence``, called by ``tick``), or before anything else is
  numbered in that room. A room above ``presence_threshold`` names nobody
  and publishes its count (Members) at most once per heartbeat interval
  (broker_presence.py).
* A resume token from the welcome lets a client that lost its connection
  take its session back from a new routing id before it times out, without
  a leave/join pair; with a backplane, on another broker too, whose
  session record the backplane reads (``FindSession``, ``session_found``).
* When the shell cannot write a pass's events (``--db`` on a full disk),
  ``persist_failed`` puts the core back to what is stored: every stream
  touched is rewound, messages (to rooms and people) are refused
  ``unavailable`` and delivered to nobody, the pass's hellos, room joins and
  topics are refused and undone, and leaves (the person is gone either way)
  wait in ``unrecorded_leaves`` until the room's next event or the next
  heartbeat records them.
"""

from __future__ import annotations

import bisect
import logging
import secrets
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import messages as m
from broker_backplane import BackplaneSeam, SessionRecord
from broker_model import MIN_RETRY_AFTER, Room, Session, TokenBucket, User
from broker_outputs import (KICKED, LOG_QUOTE_CHARS, NO_TOKEN, RATE_LIMITED, REFUSED,
                            FindSession, Persist, Publish, Reply)
from broker_presence import RoomPresence
from broker_rewind import StoreRewind
from broker_stream import Stream
from log_limit import LogLimiter

log = logging.getLogger("zchat.broker")

# Refusals in a row (no message accepted in between) that mark a flood. A
# client that honours retry_after has at most its send window (200) refused
# at once, so a polite client never comes near it.
FLOOD_REFUSALS = 1000
# Heartbeats after a stream changed that announce its position: a reader
# whose copy of the change (or of the first announcement) was dropped still
# learns of it.
POSITION_REPEATS = 2
# Every this many heartbeats every room in use announces its position, changed
# or not: a subscriber's queue may drop any number of frames in a row, and
# then learns of a lost tail within this many intervals. Announcing each room
# at every heartbeat cost a frame per member per second: with 5,000 idle
# clients, two thirds of the broker's I/O thread.
ROOM_POSITION_REFRESH = 10


@dataclass(frozen=True)
class BrokerConfig:
    heartbeat_interval: float = 1.0
    # Missed intervals before a peer counts as gone; 3..5 is reasonable (zguide).
    heartbeat_liveness: int = 3
    max_text: int = m.DEFAULT_MAX_TEXT_BYTES
    # Messages kept for late joiners and gap repair.
    history: int = 1000
    # Connections (sessions) at once. Each holds two sockets; 5,000 stay well
    # inside a 20,000 open-file limit.
    max_users: int = 5000
    # Token bucket per user: a sustained rate and a burst. Far above any
    # person's typing; a script may pipe a 1,000-line log at once.
    rate: float = 200.0
    burst: int = 1000
    # client public key (Z85) -> the only name it may join under
    names_by_key: dict[str, str] = field(default_factory=dict)
    # Rooms in all, and per connection (IRC servers allow 10-120 per user).
    max_rooms: int = 1000
    rooms_per_session: int = 50
    # All histories together, in UTF-8 bytes of text plus a fixed cost per
    # event: rooms x history x max_text could otherwise reach gigabytes.
    history_bytes: int = 64 * 1024 * 1024
    # Members above which a room stops announcing each join and leave and
    # publishes its count once per heartbeat instead: every presence event
    # costs a write per subscriber, and a list of thousands helps nobody
    # (Twitch's chat does this above 1,000 viewers).
    presence_threshold: int = 500

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


@dataclass
class BrokerCore(RoomPresence, BackplaneSeam, StoreRewind):
    config: BrokerConfig = field(default_factory=BrokerConfig)
    epoch: str = field(default_factory=lambda: secrets.token_hex(8))
    # routing id -> session, oldest activity first
    sessions: OrderedDict[bytes, Session] = field(default_factory=OrderedDict)
    by_name: dict[str, User] = field(default_factory=dict)
    rooms: dict[str, Room] = field(default_factory=dict)  # room key -> room
    # stream id -> stream: every room's, and the direct messages of users
    streams: dict[str, Stream] = field(default_factory=dict)
    history_bytes: int = 0  # what all histories hold together
    # stream id -> heartbeats that are still to announce its position
    to_announce: dict[str, int] = field(default_factory=dict)
    next_heartbeat: float = 0.0
    heartbeats: int = 0  # since the start: every ROOM_POSITION_REFRESH-th refreshes all rooms
    next_sweep: float = 0.0
    # (name key, name) of everyone online, kept sorted: a join storm must not
    # sort the whole list again for every welcome
    online: list[tuple[str, str]] = field(default_factory=list)
    # (room key, name, reason, wall time) of leaves whose write failed, oldest first
    unrecorded_leaves: list[tuple[str, str, str, float]] = field(default_factory=list)
    warnings: LogLimiter = field(default_factory=lambda: LogLimiter(log))
    # the monotonic time of the latest input, for the warnings' intervals
    last_now: float = 0.0
    # the wall time of the latest input, stamped on presence events
    last_wall: float = 0.0
    # room key -> room with joins or leaves not announced yet (this pass)
    presence_due: dict[str, Room] = field(default_factory=dict)
    # room key -> counting room whose count changed since the last heartbeat
    counts_due: dict[str, Room] = field(default_factory=dict)
    # who joined, resumed and left in this pass: one log line each per pass,
    # since a line per person costs more than the join itself in a storm
    pass_log: dict[str, list[str]] = field(
        default_factory=lambda: {"join": [], "resume": [], "leave": []})
    # With a backplane: the name keys whose standing here changed (online,
    # offline, the name given up), which the backplane drains to tell the
    # other brokers; and the users online on other brokers (name key ->
    # name), which it keeps up to date.
    presence_log: list[str] | None = None
    elsewhere: dict[str, str] | None = None
    # With a backplane: (name key, name) of everyone online on any broker,
    # sorted, built when asked after a change (None: to build again)
    everyone_online: list | None = None
    # With a backplane: the streams this broker follows (None without one:
    # every stream is here), the room keys a subscriber here subscribed to,
    # and the streams a client here stopped needing, for the shell to check
    # (broker_backplane.py)
    following: set[str] | None = None
    subscribed_rooms: set[str] = field(default_factory=set)
    unwanted: set[str] = field(default_factory=set)
    # With a backplane: streams followed in this pass that held events of
    # the pass not stored yet -> the seq loaded, below which no rewind goes
    loaded_in_pass: dict[str, int] = field(default_factory=dict)
    # With a backplane: the sessions whose record (rooms, existence) changed
    # (token -> session), which the backplane drains to write or delete
    # their records in Redis, for another broker to take them over.
    session_log: dict[str, Session] | None = None

    def __post_init__(self) -> None:
        self.general = self._open_room(m.GENERAL_ROOM)
        self._handlers = {
            m.Say: self._on_say,
            m.Who: self._on_who,
            m.Ping: self._on_ping,
            m.Fetch: self._on_fetch,
            m.Recent: self._on_recent,
            m.Bye: self._on_bye,
            m.JoinRoom: self._on_join_room,
            m.PartRoom: self._on_part_room,
            m.SetTopic: self._on_set_topic,
            m.ListRooms: self._on_list_rooms,
        }

    @property
    def main(self) -> Stream:
        """The stream of #general."""
        return self.general.stream

    def open_stream(self, stream_id: str) -> Stream:
        """The stream ``stream_id`` (a room key or a user's "@" stream),
        created empty if it does not exist yet."""
        if stream_id.startswith(m.DM_STREAM_PREFIX):
            return self._dm_stream(stream_id)
        return self._open_room(stream_id).stream

    def restore(self, stream_id: str, events: list, accepted_ids) -> None:
        """Continue a stored stream: its last events and accepted message ids."""
        stream = self.open_stream(stream_id)
        before = stream.bytes
        stream.restore(events, accepted_ids)
        self.history_bytes += stream.bytes - before
        room = self.rooms.get(stream_id)
        if room is not None and events:
            room.name = events[-1].room or room.name  # as it was created
            topics = [e for e in stream.history if isinstance(e, m.Topic)]
            room.topic = topics[-1].text if topics else room.topic

    # --- events from the shell -------------------------------------------------

    def handle(self, peer: bytes, frames: list[bytes], now: float, wall: float,
               client_key: str | None = None) -> list:
        """A request from ``peer`` (the frames after its routing id) at
        monotonic time ``now`` and wall time ``wall``; ``client_key`` is the
        client's public key when the broker checks keys."""
        self.last_now, self.last_wall = now, wall
        session = self.sessions.get(peer)
        if session is not None and (token := m.ping_token(frames)) is not None \
                and _tokens_match(token, session.secret):
            self._touch(session, now)  # a ping of its owner: a heartbeat, and nothing else
            return []
        try:
            request = m.decode_request(frames)
        except m.ProtocolError as e:
            return self._refuse(peer, e.code, e.reason, who=session.name if session else None)
        if isinstance(request, m.Hello):
            return self._on_hello(peer, session, request, now, wall, client_key)
        if session is not None and not isinstance(request, (m.Who, m.ListRooms)):
            # A routing id alone proves nothing: a peer may choose its own,
            # such as that of a connection which dropped. The session token
            # (from the welcome) proves the request comes from its owner.
            if not _tokens_match(request.session, session.secret):
                self.warnings.warn(NO_TOKEN, peer.hex(), session.name, now)
                session = None
            else:  # any request from the owner counts as a heartbeat
                self._touch(session, now)
        return self._handlers[type(request)](peer, session, request, now, wall)

    def tick(self, now: float, wall: float, backlog: bool = False) -> list:
        """Time passed: heartbeat (and announce changed streams) when due,
        and drop sessions gone silent.

        With ``backlog`` (requests still waiting to be read) nobody is timed
        out: their pings may be in that backlog, and an overloaded broker
        must not announce live users as gone.
        """
        self.last_now, self.last_wall = now, wall
        self.warnings.flush(now)
        out: list = []
        if now >= self.next_heartbeat:
            out += self._record_leaves()  # a write that failed is tried again
            out.append(Publish(self._heartbeat(wall), m.HEARTBEAT_TOPIC))
            out += self._announce_positions()
            self.next_heartbeat = now + self.config.heartbeat_interval
        if not backlog and now >= self.next_sweep:
            self.next_sweep = now + self.config.sweep_period
            out += self._sweep(now, wall)
        # Most passes have nothing for either: skipped, they cost nothing.
        if self.presence_due or any(self.pass_log.values()):
            out += self.flush_presence(wall)
        if self.counts_due:
            out += self._publish_counts(now)
        return out

    def _sweep(self, now: float, wall: float) -> list:
        """End the sessions silent for too long: the oldest activity is first
        in ``sessions``, so only those due are visited."""
        out: list = []
        deadline = now - self.config.expiry
        while self.sessions:
            oldest = next(iter(self.sessions.values()))
            if oldest.last_seen > deadline:
                break
            out += self._end_session(oldest, m.LeaveReason.TIMEOUT, wall)
        return out

    def next_deadline(self) -> float:
        """When tick() next has work to do (monotonic)."""
        if self.presence_due:  # joins or leaves to announce (a peer found gone)
            return self.last_now
        deadline = self.next_heartbeat
        if self.counts_due:
            deadline = min(deadline, min(r.count_published_at for r in self.counts_due.values())
                           + self.config.heartbeat_interval)
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
        """A SUB subscribed to a ready topic: prove its subscriptions are live."""
        nonce = topic[len(m.READY_TOPIC_PREFIX):]
        if not topic.startswith(m.READY_TOPIC_PREFIX) or not 0 < len(nonce) <= m.MAX_TOKEN_CHARS:
            return []
        return [Publish(self._heartbeat(wall), topic)]

    def shutdown(self, wall: float) -> list:
        """The broker is going away: tell everyone."""
        return [Publish(m.Shutdown(wall), m.HEARTBEAT_TOPIC)]

    # --- joining ----------------------------------------------------------------

    def _on_hello(self, peer: bytes, session: Session | None, hello: m.Hello, now: float,
                  wall: float, client_key: str | None, looked_up: bool = False,
                  record: SessionRecord | None = None) -> list:
        """``looked_up``: with a backplane, the hello's resume token was
        looked up in Redis, and ``record`` is what was found (or None)."""
        if hello.v != m.PROTOCOL_VERSION:
            return self._refuse(peer, m.ErrorCode.BAD_VERSION,
                                f"this broker speaks protocol {m.PROTOCOL_VERSION}, not {hello.v}")
        problem = m.name_problem(hello.name)
        if problem:
            return self._refuse(peer, m.ErrorCode.NAME_INVALID, problem)
        rooms = [m.GENERAL_ROOM] if hello.rooms is None else hello.rooms
        for room in rooms:
            if (problem := m.room_problem(room)):
                return self._refuse(peer, m.ErrorCode.ROOM_INVALID, problem)
        rooms = _distinct(rooms)
        name_key = m.name_key(hello.name)
        if session is not None:  # this routing id already speaks for a user
            if session.user.name_key == name_key and _tokens_match(hello.resume, session.secret):
                self._touch(session, now)
                return [Reply(peer, self._welcome(session, resumed=True))]
            return self._refuse(peer, m.ErrorCode.ALREADY_JOINED,
                                f"this connection is already joined as {session.name}")
        if self.config.names_by_key:
            allowed = self.config.names_by_key.get(client_key or "")
            if allowed is None or m.name_key(allowed) != name_key:
                return self._refuse(peer, m.ErrorCode.NAME_NOT_ALLOWED,
                                    f"your key may not use the name {hello.name}")
        user = self.by_name.get(name_key)
        if user is not None:
            resumed = next((s for s in user.sessions if _tokens_match(hello.resume, s.secret)),
                           None)
            if resumed is not None:
                return self._resume(resumed, peer, now)
        if hello.resume and self.session_log is not None and not looked_up:
            # Perhaps a session of another broker of the chat (which died):
            # the backplane reads its record and hands it to session_found.
            return [FindSession(peer, hello, client_key)]
        if record is not None and not self._record_matches(record, hello, name_key):
            record = None  # someone else's token: a new session, if the name is free
        # With --allow the key already proved who this is.
        if user is not None and not (self.config.names_by_key
                                     or _tokens_match(hello.secret, user.secret)):
            return self._refuse(peer, m.ErrorCode.NAME_TAKEN, f"the name {user.name} is taken")
        if record is not None:  # as the session was on its broker
            rooms = _distinct([room for room in record.rooms if not m.room_problem(room)])
        if len(self.sessions) >= self.config.max_users:
            return self._refuse(peer, m.ErrorCode.SERVER_FULL,
                                f"the broker is full ({self.config.max_users} connections)")
        if (problem := self._rooms_problem(rooms)):
            return self._refuse(peer, m.ErrorCode.TOO_MANY_ROOMS, problem)
        # after the lookup: a session taken over needs its record's rooms
        if (follow := self._to_follow([*map(m.room_key, rooms), m.dm_stream(hello.name)])):
            return follow
        return self._start_session(peer, user, hello, rooms, now, wall, record)

    def _start_session(self, peer: bytes, user: User | None, hello: m.Hello, rooms: list[str],
                       now: float, wall: float, record: SessionRecord | None) -> list:
        """A new connection of ``hello``'s user (``user`` if it has others
        here) in ``rooms``: a new session, or, with ``record``, the session
        of another broker taken over with its token, quiet flag and rooms
        (welcomed ``resumed``; its joins are no news to the backplane, where
        its user is still in those rooms through the other broker)."""
        name_key = m.name_key(hello.name)
        if user is None:
            user = self.by_name[name_key] = User(
                hello.name, name_key, hello.secret, TokenBucket(self.config.burst, now))
        token = hello.resume if record is not None else secrets.token_hex(16)
        quiet = record.quiet if record is not None else hello.quiet
        session = Session(user, peer, token, now, quiet=quiet)
        self.sessions[peer] = session
        user.sessions.append(session)
        if not session.quiet:
            user.visible += 1
            if user.visible == 1:
                bisect.insort(self.online, (name_key, user.name))
                self._online_changed(name_key)
        entered = [self._open_room(room) for room in rooms]
        # The welcome's positions precede the joins, so the client sees its own.
        positions = {m.room_key(room.name): room.stream.seq for room in entered}
        joins: list = []
        for room in entered:
            session.rooms[m.room_key(room.name)] = room
            joins += self._enter(session, room, wall)
        self._session_changed(session)
        welcome = self._welcome(session, resumed=record is not None, positions=positions)
        if record is not None:
            session.adopted = welcome
            self.pass_log["resume"].append(user.name + " (from another broker)")
        else:
            self.pass_log["join"].append(user.name + (" (quiet)" if session.quiet else ""))
        return [Reply(peer, welcome), *joins]

    def _rooms_problem(self, rooms: list[str]) -> str | None:
        """Why a connection may not be in all these rooms, if it may not."""
        if len(rooms) > self.config.rooms_per_session:
            return f"at most {self.config.rooms_per_session} rooms per connection"
        new = {m.room_key(r) for r in rooms} - self.rooms.keys()
        if len(self.rooms) + len(new) > self.config.max_rooms:
            return f"the broker has its most rooms ({self.config.max_rooms})"
        return None

    def _resume(self, session: Session, peer: bytes, now: float) -> list:
        del self.sessions[session.peer]
        session.peer = peer
        session.last_seen = now
        self.sessions[peer] = session
        self.pass_log["resume"].append(session.name)
        self._session_changed(session)  # its record is this broker's again
        return [Reply(peer, self._welcome(session, resumed=True))]

    def _welcome(self, session: Session, resumed: bool,
                 positions: dict[str, int] | None = None) -> m.Welcome:
        """``positions``: each room's seq before this session's own join."""
        c = self.config
        dm = self.streams.get(m.dm_stream(session.name))
        rooms = [room.info(positions.get(key) if positions else None)
                 for key, room in session.rooms.items()]
        return m.Welcome(session.name, self.epoch, len(self.online_listed()), session.secret,
                         c.heartbeat_interval, c.heartbeat_liveness, c.max_text, rooms,
                         dm.seq if dm else 0, resumed)

    # --- rooms --------------------------------------------------------------------

    def _on_join_room(self, peer: bytes, session: Session | None, join: m.JoinRoom,
                      now: float, wall: float) -> list:
        if session is None:
            return self._not_joined(peer)
        if (problem := m.room_problem(join.room)):
            return self._refuse(peer, m.ErrorCode.ROOM_INVALID, problem, who=session.name)
        key = m.room_key(join.room)
        if key in session.rooms:  # already in it: the answer is the same
            return [Reply(peer, session.rooms[key].info())]
        if (problem := self._rooms_problem([*session.rooms, key])):
            return self._refuse(peer, m.ErrorCode.TOO_MANY_ROOMS, problem, who=session.name)
        # A join to be refused for rate (the bucket is spent) costs no load
        # from the backplane; one that may go is handed in again, and spends then.
        if now >= session.user.bucket.limited_until and (follow := self._to_follow([key])):
            return follow
        if (refusal := self._spend(session, now)):
            return refusal
        room = self._open_room(join.room)
        session.rooms[key] = room
        before = room.stream.seq  # the answer precedes the own join
        joined = self._enter(session, room, wall)
        return [Reply(peer, room.info(before)), *joined]

    def _on_part_room(self, peer: bytes, session: Session | None, part: m.PartRoom,
                      now: float, wall: float) -> list:
        if session is None:
            return self._not_joined(peer)
        if m.room_key(part.room) not in session.rooms:
            return self._refuse(peer, m.ErrorCode.NOT_IN_ROOM, f"you are not in {part.room}",
                                who=session.name)
        if (refusal := self._spend(session, now)):
            return refusal
        room = session.rooms.pop(m.room_key(part.room))
        return [Reply(peer, m.Parted(room.name)), *self._exit(session, room, m.LeaveReason.PART,
                                                             wall)]

    def _on_set_topic(self, peer: bytes, session: Session | None, topic: m.SetTopic,
                      now: float, wall: float) -> list:
        room = self._room_of(session, topic.room)
        if room is None:
            return self._not_in(peer, session, topic.room)
        if (refusal := self._spend(session, now)):
            return refusal
        previous, room.topic = room.topic, topic.text
        out = self._append(room.stream, lambda seq: m.Topic(seq, wall, session.name, topic.text,
                                                            room.name), previous_topic=previous)
        return [*out, Reply(peer, room.info())]

    def _on_list_rooms(self, peer: bytes, session: Session | None, rooms: m.ListRooms,
                       now: float, wall: float) -> list:
        listed = sorted(self.rooms.values(), key=lambda r: m.room_key(r.name))
        return [Reply(peer, m.RoomList([room.info() for room in listed]))]

    def _open_room(self, name: str) -> Room:
        key = m.room_key(name)
        room = self.rooms.get(key)
        if room is None:
            stream = self.streams[key] = Stream(key, self.config.history)
            room = self.rooms[key] = Room(name, stream)
            if self.elsewhere is not None:  # with a backplane: filled by receive
                room.share({})
        return room

    def _enter(self, session: Session, room: Room, wall: float) -> list:
        """``session`` is now in ``room``: a join when its user was not."""
        room.sessions += 1
        self._session_changed(session)
        if not session.quiet and room.add_member(session.user.name_key, session.user.name):
            self._presence_changed(room)
        return []

    def _exit(self, session: Session, room: Room, reason: str, wall: float) -> list:
        """``session`` left ``room``: a leave (announced at the end of the
        pass) when its user is no longer in it."""
        self._leave_room(session, room, reason)
        return []

    def _leave_room(self, session: Session, room: Room, reason: str | None = None) -> bool:
        """Take ``session`` out of ``room``; True if its user is no longer in
        it. A leave is announced with ``reason``; with None, none is (an
        entry undone because it could not be stored). An empty room in which
        nothing happened goes."""
        room.sessions -= 1
        if not room.sessions:
            self._note_unwanted(room.stream.id)
        self._session_changed(session)
        gone = not session.quiet and room.remove_member(session.user.name_key, reason)
        if gone and reason is not None:
            self._presence_changed(room)
        self._forget_if_unused(room)
        return gone

    def _forget_if_unused(self, room: Room) -> None:
        """A room nobody is in and nothing was said in goes (with a
        backplane, once nobody is in it on any broker either)."""
        key = m.room_key(room.name)
        if room.sessions == 0 and room.stream.seq == 0 and key != m.GENERAL_ROOM \
                and not room.everyone:
            del self.rooms[key], self.streams[key]

    # --- messages -----------------------------------------------------------------

    def _on_say(self, peer: bytes, session: Session | None, say: m.Say, now: float,
                wall: float) -> list:
        if session is None:
            return self._not_joined(peer, say.id)
        if say.to is not None and say.room is not None:
            return self._refuse(peer, m.ErrorCode.MALFORMED, "say: a room or a person, not both",
                                id=say.id, who=session.name)
        if say.to is not None:
            return self._direct(session, say, now, wall)
        sender_id = (session.user.name_key, say.id)
        key = m.room_key(say.room or m.GENERAL_ROOM)
        named = self.rooms.get(key)
        if named is not None and (ack := self._ack_again(session, say, named.stream)):
            return ack  # even after a part
        room = session.rooms.get(key)
        if room is None:
            return self._not_in(peer, session, say.room or m.GENERAL_ROOM, say.id)
        refusal = self._admit(session, say, now, wall)
        if refusal is not None:
            return refusal
        out = self._append(room.stream,
                           lambda seq: m.Message(seq, wall, session.name, say.text, room.name),
                           sender_id)
        return [*out, Reply(peer, m.Ack(say.id, room.stream.seq))]

    def _direct(self, session: Session, say: m.Say, now: float, wall: float) -> list:
        """A direct message: numbered in the addressee's stream and in the
        sender's, and delivered to both users' sessions alone."""
        peer = session.peer
        sender = session.user
        own = self._dm_stream(m.dm_stream(sender.name))
        if ack := self._ack_again(session, say, own):
            return ack  # even if its addressee left since
        key = m.name_key(say.to)
        addressee = self.by_name.get(key)
        if addressee is not None and addressee.visible:
            to, sessions = addressee.name, addressee.sessions
        elif self.elsewhere and key in self.elsewhere:  # online on another broker
            to, sessions = self.elsewhere[key], []
        else:
            return self._refuse(peer, m.ErrorCode.USER_OFFLINE, f"{say.to} is not online",
                                id=say.id, who=session.name)
        refusal = self._admit(session, say, now, wall)
        if refusal is not None:
            return refusal
        sender_id = (sender.name_key, say.id)
        parties = [(sender.sessions, own, sender_id)]
        if key != sender.name_key:  # a note to oneself is numbered once
            parties.append((sessions, self._dm_stream(m.dm_stream(to)), None))
        out: list = []
        for sessions, stream, remembered in parties:
            event = self._number(stream, lambda seq: m.Message(seq, wall, sender.name, say.text,
                                                               to=to), remembered)
            out.append(Persist(stream.id, event, remembered))
            out += [Reply(s.peer, event) for s in sessions if not s.quiet]
        return [*out, Reply(peer, m.Ack(say.id, own.seq))]

    def _ack_again(self, session: Session, say: m.Say, stream: Stream) -> list | None:
        """For a resend of a message ``stream`` accepted already, its ack
        again (nothing is numbered twice); else None."""
        seq = stream.accepted_seq((session.user.name_key, say.id))
        return None if seq is None else [Reply(session.peer, m.Ack(say.id, seq))]

    def _admit(self, session: Session, say: m.Say, now: float, wall: float) -> list | None:
        """None if ``say``, not a resend (see _ack_again), may be numbered;
        else the replies that refuse it."""
        problem = m.text_problem(say.text, self.config.max_text)
        if problem:
            return self._refuse(session.peer, *problem, id=say.id, who=session.name)
        bucket = session.user.bucket
        if session.blocked_on not in (None, say.id):
            return self._rate_limited(session, say, max(MIN_RETRY_AFTER,
                                                        bucket.limited_until - now), wall)
        wait = bucket.take(now, self.config.rate, self.config.burst)
        if wait:
            session.blocked_on = say.id
            return self._rate_limited(session, say, wait, wall)
        session.refusals = 0
        session.blocked_on = None
        return None

    def _spend(self, session: Session, now: float) -> list | None:
        """A join, part or topic costs what a message costs: each is an event
        numbered, broadcast and stored. None if it may go, else the refusal."""
        wait = session.user.bucket.take(now, self.config.rate, self.config.burst)
        if not wait:
            return None
        return [Reply(session.peer, m.Error(m.ErrorCode.RATE_LIMITED,
                                            f"too fast: wait {wait:.2f}s", retry_after=wait))]

    def _rate_limited(self, session: Session, say: m.Say, wait: float, wall: float) -> list:
        session.refusals += 1
        if session.refusals == 1:
            self.warnings.warn(RATE_LIMITED, session.name, f"{wait:.2f}s", self.last_now)
        if session.refusals < FLOOD_REFUSALS:
            return [Reply(session.peer, m.Error(m.ErrorCode.RATE_LIMITED,
                                                f"too fast: wait {wait:.2f}s", say.id, wait))]
        self.warnings.warn(KICKED, session.name, "kept flooding", self.last_now)
        kick = Reply(session.peer, m.Error(m.ErrorCode.FLOODING,
                                           "disconnected for sending too fast", say.id))
        return [kick, *self._end_session(session, m.LeaveReason.KICKED, wall)]

    # --- queries ------------------------------------------------------------------

    def _on_ping(self, peer: bytes, session: Session | None, ping: m.Ping, now: float,
                 wall: float) -> list:
        # A ping from an unknown peer means the broker lost its session
        # (restart, timeout): say so, so the client joins again.
        return [] if session else self._not_joined(peer)

    def _on_fetch(self, peer: bytes, session: Session | None, fetch: m.Fetch, now: float,
                  wall: float) -> list:
        stream = self._readable(session, fetch.stream)
        if stream is None:
            return self._not_in(peer, session, fetch.stream or m.GENERAL_ROOM)
        history = stream.fetch(fetch.after, fetch.until)
        log.debug("fetch by %s: %d events of %s after %d", session.name, len(history.events),
                  stream.id, fetch.after)
        return [Reply(peer, history)]

    def _on_recent(self, peer: bytes, session: Session | None, recent: m.Recent,
                   now: float, wall: float) -> list:
        stream = self._readable(session, recent.stream)
        if stream is None:
            return self._not_in(peer, session, recent.stream or m.GENERAL_ROOM)
        return [Reply(peer, stream.recent(recent.count))]

    def _on_bye(self, peer: bytes, session: Session | None, bye: m.Bye, now: float,
                wall: float) -> list:
        if session is None:
            return []
        return self._end_session(session, m.LeaveReason.QUIT, wall)

    # --- helpers ------------------------------------------------------------------

    def user_names(self) -> list[str]:
        """Everyone online (on every broker, with a backplane), sorted by name key."""
        return [name for _, name in self.online_listed()]

    def _room_of(self, session: Session | None, room: str) -> Room | None:
        return None if session is None else session.rooms.get(m.room_key(room))

    def _readable(self, session: Session | None, stream_id: str | None) -> Stream | None:
        """The stream a session may read: a room it is in, or its own
        direct messages."""
        if session is None:
            return None
        if stream_id is not None and stream_id.startswith(m.DM_STREAM_PREFIX):
            if m.name_key(stream_id[1:]) != session.user.name_key:
                return None
            return self._dm_stream(m.dm_stream(session.name))
        room = self._room_of(session, stream_id or m.GENERAL_ROOM)
        return room.stream if room else None

    def _dm_stream(self, stream_id: str) -> Stream:
        stream = self.streams.get(stream_id)
        if stream is None:
            stream = self.streams[stream_id] = Stream(stream_id, self.config.history)
        return stream

    def _touch(self, session: Session, now: float) -> None:
        """Heard from its owner: the session moves to the end of the sweep order."""
        session.last_seen = now
        self.sessions.move_to_end(session.peer)

    def _heartbeat(self, wall: float) -> m.Heartbeat:
        return m.Heartbeat(self.epoch, wall)

    def _announce_positions(self) -> list:
        """Streams tell their positions, so a reader notices a lost tail: a
        room someone is in on its topic, and a user's direct messages to that
        user's sessions, when they changed lately; every room in use at every
        ROOM_POSITION_REFRESH-th heartbeat."""
        self.heartbeats += 1
        refresh = self.heartbeats % ROOM_POSITION_REFRESH == 0
        out = [Publish(m.Position(key, room.stream.seq), room.stream.topic)
               for key, room in self.rooms.items()
               if room.sessions and room.stream.seq and (refresh or key in self.to_announce)]
        for stream_id, left in list(self.to_announce.items()):
            user = self.by_name.get(stream_id[1:]) if stream_id[:1] == m.DM_STREAM_PREFIX else None
            if user is not None:
                position = m.Position(stream_id, self.streams[stream_id].seq)
                out += [Reply(s.peer, position) for s in user.sessions if not s.quiet]
            if left > 1:
                self.to_announce[stream_id] = left - 1
            else:
                del self.to_announce[stream_id]
        return out

    def _end_session(self, session: Session, reason: str, wall: float) -> list:
        out: list = []
        for room in list(session.rooms.values()):
            out += self._exit(session, room, reason, wall)
        session.rooms.clear()
        self._detach(session)
        self.pass_log["leave"].append(f"{session.name} ({reason})")
        return out

    def _detach(self, session: Session) -> None:
        """Forget a connection that is in no room any more."""
        user = session.user
        del self.sessions[session.peer]
        self._session_changed(session)
        user.sessions.remove(session)
        if not session.quiet:
            user.visible -= 1
            if user.visible == 0:
                del self.online[bisect.bisect_left(self.online, (user.name_key, user.name))]
        if not user.sessions:
            del self.by_name[user.name_key]  # the name is free again
            self._note_unwanted(m.dm_stream(user.name))
        self._online_changed(user.name_key)

    def _append(self, stream: Stream, make_event, sender_id: tuple[str, str] | None = None,
                previous_topic: str | None = None) -> list:
        """Number a new event in a room's stream: persist it, then publish it.
        The room's leaves whose write failed come first, so that the order
        stays true (a name that left is not seen to join before it left)."""
        out = self._record_leaves(stream.id) if self.unrecorded_leaves else []
        if (room := self.presence_due.pop(stream.id, None)) is not None:
            # this pass's joins go before what the people who joined say
            out += self._announce_presence(room, self.last_wall)
        event = self._number(stream, make_event, sender_id)
        return [*out, Persist(stream.id, event, sender_id, previous_topic),
                Publish(event, stream.topic)]

    def _record_leaves(self, room_key: str | None = None) -> list:
        """Append the leaves whose write failed (of one room, or of all), to
        be written again."""
        if not self.unrecorded_leaves:
            return []
        due = [leave for leave in self.unrecorded_leaves if room_key in (None, leave[0])]
        self.unrecorded_leaves = [leave for leave in self.unrecorded_leaves if leave not in due]
        by_room: dict[str, list] = {}
        for key, name, reason, wall in due:
            by_room.setdefault(key, []).append((name, reason, wall))
        out: list = []
        for key, leaves in by_room.items():
            room = self.rooms[key]  # kept: a room with a stored join has events
            left, wall = [[name, reason] for name, reason, _ in leaves], leaves[-1][2]
            event = self._number(room.stream, lambda seq: m.Presence(seq, wall, [], left,
                                                                     room.name), None)
            out += [Persist(key, event), Publish(event, room.stream.topic)]
        return out

    def _number(self, stream: Stream, make_event, sender_id: tuple[str, str] | None) -> Any:
        """Append a new event to ``stream``, within the history budget."""
        before = stream.bytes
        event = stream.append(make_event, sender_id)
        self.history_bytes += stream.bytes - before
        if self.history_bytes > self.config.history_bytes:
            self._keep_within_history_budget()
        self.to_announce[stream.id] = POSITION_REPEATS
        return event

    def _keep_within_history_budget(self) -> None:
        """Over the budget, the largest histories give up their oldest events."""
        while self.history_bytes > self.config.history_bytes:
            largest = max(self.streams.values(), key=lambda s: s.bytes)
            if not largest.history:
                return
            self.history_bytes -= largest.drop_oldest()

    def _not_joined(self, peer: bytes, id: str | None = None) -> list:
        return [Reply(peer, m.Error(m.ErrorCode.NOT_JOINED, "join first (send hello)", id))]

    def _not_in(self, peer: bytes, session: Session | None, room: str,
                id: str | None = None) -> list:
        if session is None:
            return self._not_joined(peer, id)
        return self._refuse(peer, m.ErrorCode.NOT_IN_ROOM, f"you are not in {room}"[:120], id=id,
                            who=session.name)

    def _refuse(self, peer: bytes, code: str, reason: str, id: str | None = None,
                who: str | None = None) -> list:
        self.warnings.warn(REFUSED, who or peer.hex(), f"{reason[:LOG_QUOTE_CHARS]} ({code})",
                           self.last_now)
        return [Reply(peer, m.Error(code, reason, id))]


def _distinct(rooms: list[str]) -> list[str]:
    """One room named twice (in any case) is entered once."""
    first_named: dict[str, str] = {}
    for room in rooms:
        first_named.setdefault(m.room_key(room), room)
    return list(first_named.values())


def _tokens_match(given: str | None, token: str | None) -> bool:
    """Constant-time comparison (decoding made ``given`` ASCII)."""
    return bool(given) and bool(token) and secrets.compare_digest(given.encode(), token.encode())
