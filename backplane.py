"""The Redis backplane (``broker.py --backplane redis://HOST:PORT/DB``): several
brokers, one chat.

Every stream (a room, a user's direct messages) lives in Redis: a counter
that numbers its events, a Redis Stream that keeps its last ``--history``
events, and the message ids it accepted (so a resend to any broker is
acknowledged, not shown twice). One Lua script per loop pass numbers and
stores the pass's new events and publishes one notification for them all,
atomically: the broker acknowledges a message only once the script ran.

Each stream's events are published on a channel of the stream's own, and
each broker subscribes only to the streams its clients follow (a room
someone here is in or subscribes to, the direct messages of a user
connected here): a thread of its own reads them and hands them over
through an inproc PAIR socket (a Redis connection and a ZeroMQ socket each
belong to one thread; the broker's thread asks it to subscribe and
unsubscribe through the same PAIR), and feeds them, in each stream's order
(backplane_core.Follower), to its BrokerCore, which publishes a room's
events on its own PUB socket and gives a user's direct messages to that
user's connections here. Following a stream is the Clone pattern:
subscribe first, then load the stream's last events from Redis, so that
nothing published in between is lost (what came twice is dropped by seq).
A hole (a lost subscription) is repaired from the Redis Stream with XRANGE
before anything after it goes out. Each broker thus holds the last events
of the streams it follows, from which it answers ``fetch`` and ``recent``;
a stream nobody here needs any more is dropped, with its history, after a
linger of one expiry (a client that comes back meanwhile finds it still
followed). What every broker needs (who is online, each room's members
and topic, big rooms' counts) goes on one shared channel.

Each broker also keeps a record of each of its sessions in Redis (written
by the same script, deleted when the session ends, or by the reaper of a
broker that died), so that a client that fails over to another broker
resumes its session there with its token (``hand_over`` looks the token
up, follows the streams the record's session needs that are not followed
here yet, then the core's ``session_found`` takes the session over).

The keys, channels and Lua scripts it uses are in backplane_keys.py.
Redis is imported only here, and this module only when ``--backplane`` is
given. The URL may carry a password; it is passed to redis-py, never logged.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import threading
import time
from collections import deque
from dataclasses import replace
from typing import Any

import redis
import zmq

import messages as m
from backplane_core import Follower, Repair, Shared, stream_is_room
from backplane_keys import (ALIVE_PREFIX, APPEND_SCRIPT, BROKERS_KEY, EPOCH_KEY, EVENTS_CHANNEL,
                            KEY_PREFIX, REAP_PREFIX, REAP_SESSIONS_SCRIPT, SESSION_PREFIX,
                            STREAMS_KEY, channel_stream, stream_channel, stream_key)
from broker_backplane import SessionRecord, secret_digest, token_digest
from broker_core import BrokerCore, FindSession, Persist, Reply
from broker_outputs import Follow, unavailable
from broker_stream import ACCEPTED_IDS_REMEMBERED
from log_limit import Outage
from store import StoreError

log = logging.getLogger("zchat.backplane")

# How long the reaping lock holds: far longer than reaping takes, so that
# no second broker announces the same leaves; past it the lock is gone.
REAP_LOCK_MS = 60_000
# Longest wait for Redis on the broker's loop: every pass that has new
# events waits for its script, so a Redis that hangs must not hold every
# client for long; past it the pass's messages are refused `unavailable`.
SOCKET_TIMEOUT_S = 1.0
CONNECT_TIMEOUT_S = 0.5
# The notification reader's wait for a message, between checks that the
# broker is stopping, and its wait before subscribing again after a loss.
READER_POLL_S = 0.5
RESUBSCRIBE_S = 0.25
HAND_ON_RETRY_S = 0.01  # the reader's wait while the broker's queue is full
# inproc address of the reader's PAIR socket (one per broker process)
READER_ADDRESS = "inproc://zchat-backplane"
# What the reader sends besides notifications.
SUBSCRIBED = b"!"  # (re)subscribed: what was published meanwhile is lost, resync
LOST = b"?"  # the subscription broke
# The broker asks the reader to subscribe to streams' channels ([FOLLOW,
# stream ids...], one message) and the reader says when Redis confirmed
# each (FOLLOW + a stream id, one frame each).
FOLLOW = b"+"
DROP = b"-"  # [DROP, stream ids...]: the broker asks the reader to unsubscribe
# The broker's wait for Redis to confirm a subscription it asked for (a
# hello or join waits for it): as long as it waits for any script.
FOLLOW_TIMEOUT_S = SOCKET_TIMEOUT_S


class BackplaneError(StoreError):
    """Redis cannot be used at start: the message says why, for the operator."""


def _digest(core: BrokerCore, user) -> str:
    """What proves a user's further connections on other brokers."""
    return secret_digest(bool(core.config.names_by_key), user.secret)


def _record(fields: dict) -> SessionRecord | None:
    """A session record as read from Redis (HGETALL); None if there is
    none, or (a log line) if it is not one."""
    if not fields:
        return None
    try:
        rooms = json.loads(fields[b"rooms"])
        return SessionRecord(fields[b"key"].decode(), fields[b"digest"].decode(),
                             fields[b"quiet"] == b"1", tuple(str(r) for r in rooms),
                             fields[b"broker"].decode())
    except (KeyError, ValueError, TypeError):
        log.error("backplane: a session record is not one, ignored")
        return None


def _event_json(event: Any) -> str:
    return m.encode(replace(event, seq=0)).decode()


def _shared(stream: str, seq: int, key: str, mid: str, event_json: str) -> Shared | None:
    """A stored event back from Redis; None (and a log line) if it is not one."""
    try:
        event = replace(m.decode_event_body(json.loads(event_json)), seq=seq)
    except (ValueError, m.ProtocolError, TypeError) as e:
        log.error("backplane: event %d of %s is not readable, skipped: %s", seq, stream, e)
        return None
    return Shared(stream, event, (key, mid) if mid else None)


class Backplane:
    """This broker's side of the shared Redis: numbering, notifications, repair."""

    def __init__(self, url: str, history: int):
        self.redis = redis.Redis.from_url(url, socket_timeout=SOCKET_TIMEOUT_S,
                                          socket_connect_timeout=CONNECT_TIMEOUT_S)
        kwargs = self.redis.connection_pool.connection_kwargs
        self.where = f"{kwargs.get('host', kwargs.get('path', '?'))}:{kwargs.get('port', '')}"
        self.history = history
        self.append_script = self.redis.register_script(APPEND_SCRIPT)
        self.reap_sessions_script = self.redis.register_script(REAP_SESSIONS_SCRIPT)
        self.follower = Follower()
        self.id = secrets.token_hex(8)  # this broker run, among those on the Redis
        self.claims: set[str] = set()  # name keys to hold for this broker's users
        self.changed: set[str] = set()  # name keys whose standing here changed
        # token -> session whose record is to be written (or deleted)
        self.sessions_changed: dict[str, Any] = {}
        # name key -> the broker whose session of it this one took over,
        # until the pass that claims the name is stored
        self.adopting: dict[str, str] = {}
        # who is online on each other broker: broker id -> name key -> name
        self.others: dict[str, dict[str, str]] = {}
        self.online_elsewhere: dict[str, int] = {}  # name key -> other brokers it is on
        where = self.where.replace("%", "%%")  # it goes into a format string
        self.outage = Outage(log, f"backplane: Redis at {where} does not take events, refusing "
                             "messages, joins and topics until it does: %s",
                             "backplane: Redis takes events again")
        # Redis came back without the chat's data: numbers would start again
        # under the same epoch, so the broker stops rather than mislead clients.
        self.lost = False
        self.next_beat = 0.0  # monotonic: when to say this broker is alive again
        self.missing: dict[str, float] = {}  # a broker found dead -> since when (monotonic)
        self.reader: threading.Thread | None = None
        self.pair: zmq.Socket | None = None
        self._stopping = threading.Event()
        # Frames the reader handed over while the broker waited for a
        # subscription, to be read (in their order) before the PAIR's next.
        self.waiting: deque[bytes] = deque()
        self.subscribed = False  # the reader's subscription is live (SUBSCRIBED, no LOST since)
        # stream -> since when (monotonic) no client here needs it: dropped after a linger
        self.unwanted: dict[str, float] = {}
        # Requests of this batch that wait for streams to be followed (handle),
        # with the streams each needs, and their connections.
        self.deferred: list[tuple] = []
        self.deferred_peers: set[bytes] = set()
        # Rooms whose topic a subscriber here subscribed to in this pass, to follow
        self.to_follow: dict[str, None] = {}

    # --- start and stop ------------------------------------------------------------

    def epoch(self) -> str:
        """The chat's epoch, the same for every broker on this Redis."""
        try:
            self.redis.set(EPOCH_KEY, secrets.token_hex(8), nx=True)
            return self.redis.get(EPOCH_KEY).decode()
        except redis.RedisError as e:
            raise BackplaneError(f"cannot reach the backplane at {self.where}: {e}") from None

    def start(self, ctx: zmq.Context, core: BrokerCore) -> zmq.Socket:
        """Subscribe to what every broker needs, then load every room's name,
        topic and members into ``core`` (no stream is followed yet); the
        socket to poll for notifications."""
        self.pair = ctx.socket(zmq.PAIR)
        self.pair.bind(READER_ADDRESS)
        self.reader = threading.Thread(target=self._read_notifications, args=(ctx,),
                                       name="backplane-reader", daemon=True)
        self.reader.start()
        self._await_subscription()
        core.presence_log = []
        core.elsewhere = {}
        core.following = set()
        core.session_log = {}
        for room in core.rooms.values():  # #general: everyone in it, as Redis says
            room.share({})
        try:
            self._load_rooms(core)
            for room in core.rooms.values():
                room.counting = room.count() > core.config.presence_threshold
            self._load_presence(core)
            self.tick(core, time.monotonic(), time.time())  # alive before any claim
        except redis.RedisError as e:
            raise BackplaneError(f"cannot load the streams from {self.where}: {e}") from None
        log.info("backplane: sharing the chat through Redis at %s", self.where)
        return self.pair

    def _await_subscription(self) -> None:
        """Wait (briefly) until the reader subscribed to the shared channel,
        so that what is loaded next misses nothing told after; past the wait
        its SUBSCRIBED, when it comes, resyncs instead."""
        deadline = time.monotonic() + CONNECT_TIMEOUT_S + FOLLOW_TIMEOUT_S
        while (wait_ms := math.ceil((deadline - time.monotonic()) * 1000)) > 0 \
                and self.pair.poll(wait_ms):
            frame = self.pair.recv()
            if frame == SUBSCRIBED:
                self.subscribed = True
                return
            self.waiting.append(frame)

    def close(self) -> None:
        self._stopping.set()
        if self.reader is not None:
            self.reader.join(READER_POLL_S * 4)
        if self.pair is not None:
            self.pair.close(linger=0)
        self.redis.close()

    def _load_rooms(self, core: BrokerCore) -> None:
        """Every room's name as created, topic, members and seq, into the core."""
        streams = sorted(x for x in (s.decode() for s in self.redis.smembers(STREAMS_KEY))
                         if stream_is_room(x))
        pipe = self.redis.pipeline(transaction=False)
        for stream in streams:
            pipe.hgetall(stream_key(stream, "members"))
            pipe.hmget(stream_key(stream, "info"), "name", "topic")
            pipe.get(stream_key(stream, "n"))
        results = pipe.execute()
        for n, stream in enumerate(streams):
            members, (name, topic), counter = results[3 * n:3 * n + 3]
            core.room_known(stream, name.decode() if name else None,
                            topic.decode() if topic else "",
                            {k.decode(): shown.decode() for k, shown in members.items()},
                            int(counter or 0))
        log.info("backplane: %d rooms known", len(streams))

    # --- which streams this broker follows ----------------------------------------------

    def handle(self, core: BrokerCore, peer: bytes, frames: list[bytes], now: float,
               wall: float, client_key: str | None = None) -> list:
        """``core.handle``, unless the request needs streams not followed
        yet (a hello's rooms and direct messages, a joined room): then it
        waits, with whatever its connection sends after it in the batch,
        for ``handle_deferred``, which follows all of the batch's at once
        (a join storm costs a round trip to Redis per batch, not per hello)."""
        if self.deferred and peer in self.deferred_peers:
            self.deferred.append((peer, frames, now, wall, client_key, ()))
            return []
        out = core.handle(peer, frames, now, wall, client_key)
        if out and type(out[0]) is Follow:
            self.deferred.append((peer, frames, now, wall, client_key, out[0].streams))
            self.deferred_peers.add(peer)
            return []
        return out

    def handle_deferred(self, core: BrokerCore) -> list:
        """Follow the streams the pass's deferred requests need, and the
        rooms subscribed to, then hand the requests in again, in their
        order; a request whose streams cannot be followed now is refused
        ``unavailable`` (a room subscribed to is tried again at the next
        heartbeat)."""
        out: list = []
        rooms, self.to_follow = self.to_follow, {}
        if rooms and not self.deferred:
            self.follow(core, list(rooms))
        while self.deferred:
            batch, self.deferred = self.deferred, []
            self.deferred_peers = set()
            streams = {**rooms, **dict.fromkeys(s for *_, needs in batch for s in needs)}
            rooms = {}
            followed = self.follow(core, list(streams))
            for peer, frames, now, wall, client_key, needs in batch:
                if needs and not followed:
                    out.append(Reply(peer, unavailable(None, core.config.heartbeat_interval,
                                                       "reach its backplane")))
                else:  # another stream needed now (a join after a hello): the next round
                    out += self.handle(core, peer, frames, now, wall, client_key)
        return out

    def subscription(self, core: BrokerCore, frame: bytes) -> None:
        """A (un)subscription from the XPUB: a room's topic subscribed to
        here is followed from now on (by ``handle_deferred``, in the same
        pass: before the probes behind it are answered)."""
        key = core.subscribed(frame[1:], frame[:1] == b"\x01")
        if key is not None:
            self.to_follow[key] = None

    def follow(self, core: BrokerCore, streams) -> bool:
        """Follow ``streams`` from now on: subscribe to their channels (the
        reader does, and says when Redis confirmed), then load their last
        events; False if Redis did not allow it now (nothing is followed)."""
        wanted = [s for s in streams if s not in core.following]
        if not wanted:
            return True
        if not self.subscribed:  # the reader has no subscription: nothing to wait for
            return False
        self.pair.send_multipart([FOLLOW, *(s.encode() for s in wanted)])
        try:
            confirmed = self._confirmed(set(wanted)) and self._load_streams(core, wanted)
        except redis.RedisError as e:
            log.warning("backplane: cannot load %d stream(s) now: %s", len(wanted), e)
            confirmed = False
        if not confirmed:
            self.pair.send_multipart([DROP, *(s.encode() for s in wanted)])
            return False
        now = time.monotonic()
        for stream in wanted:
            self.unwanted[stream] = now  # dropped after the linger if nobody needs it
        return True

    def _confirmed(self, pending: set[str]) -> bool:
        """Wait until the reader says each of ``pending`` is subscribed to;
        what else it hands over meanwhile waits in ``waiting``."""
        deadline = time.monotonic() + FOLLOW_TIMEOUT_S
        while pending:
            wait_ms = math.ceil((deadline - time.monotonic()) * 1000)
            if wait_ms <= 0 or not self.pair.poll(wait_ms):
                log.warning("backplane: Redis did not confirm a subscription within %.1f s",
                            FOLLOW_TIMEOUT_S)
                return False
            frame = self.pair.recv()
            if frame[:1] == FOLLOW:
                pending.discard(frame[1:].decode())
                continue
            self.waiting.append(frame)
            if frame == LOST:
                return False
        return True

    def _load_streams(self, core: BrokerCore, streams: list[str]) -> bool:
        """Each stream's seq, last events and (a room's) members, read in one
        transaction after its subscription is live, into the core."""
        pipe = self.redis.pipeline(transaction=True)
        for stream in streams:
            pipe.get(stream_key(stream, "n"))
            pipe.xrevrange(stream_key(stream, "x"), count=self.history)
            if stream_is_room(stream):
                pipe.hgetall(stream_key(stream, "members"))
        results = iter(pipe.execute())
        for stream in streams:
            seq, entries = int(next(results) or 0), next(results)
            members = ({k.decode(): v.decode() for k, v in next(results).items()}
                       if stream_is_room(stream) else None)
            shared = [s for s in (self._from_entry(stream, e) for e in reversed(entries)) if s]
            core.followed(stream, [s.event for s in shared],
                          [(s.sender_id, s.event.seq) for s in shared if s.sender_id], seq,
                          members)
            self.follower.restart(stream, seq)
        log.debug("backplane: following %d more stream(s)", len(streams))
        return True

    def unfollow(self, core: BrokerCore, stream: str) -> None:
        """Stop following ``stream``: unsubscribe, and forget its events."""
        self.pair.send_multipart([DROP, stream.encode()])
        core.unfollowed(stream)
        self.follower.forget(stream)
        log.debug("backplane: no longer following %s", stream)

    def _drop_unwanted(self, core: BrokerCore, now: float) -> None:
        """Unfollow the streams no client here has needed for one expiry (a
        client that lost its connection comes back within it); follow again
        a room subscribed to here whose following failed."""
        for stream in core.unwanted:
            self.unwanted[stream] = now
        core.unwanted.clear()
        for stream, since in list(self.unwanted.items()):
            if stream not in core.following or core.wants(stream):
                del self.unwanted[stream]
            elif now - since >= core.config.expiry:
                del self.unwanted[stream]
                self.unfollow(core, stream)
        missing = [key for key in core.subscribed_rooms if key not in core.following]
        if missing:
            self.follow(core, missing)

    # --- new events -------------------------------------------------------------------

    def hand_over(self, core: BrokerCore, outputs: list) -> list:
        """Have Redis number and store the new events among ``outputs`` (one
        script, with the names this broker now holds and those it gave up,
        and the session records that changed); what to carry out then: the
        core's handed_over, or, when Redis did not take them, its
        persist_failed (messages refused ``unavailable``). A hello that
        resumes a session of another broker is first looked up."""
        records: list[Persist] = []
        finding = False
        for item in outputs:
            kind = type(item)
            if kind is Persist:
                records.append(item)
            elif kind is Reply and type(item.message) is m.Welcome:
                self._claim(core, item)
            elif kind is FindSession:
                finding = True
        if finding:
            return self.hand_over(core, self._find_sessions(core, outputs))
        self.changed.update(core.presence_log)
        core.presence_log.clear()
        self.sessions_changed.update(core.session_log)
        core.session_log.clear()
        if not (records or self.claims or self.changed or self.sessions_changed):
            return outputs
        claims = [(key, _digest(core, core.by_name[key]), self.adopting.get(key, ""))
                  for key in sorted(self.claims) if key in core.by_name]
        releases = sorted(self.changed - core.by_name.keys())
        result = self._run(core, claims, releases, self._presence(core),
                           self._session_records(core), [self._argv(r, self.id) for r in records])
        if result is None:
            return core.persist_failed(outputs)
        self.claims, self.changed, self.sessions_changed, self.adopting = set(), set(), {}, {}
        taken, seqs = result
        return core.handed_over(outputs, {id(r.event): seq for r, seq in zip(records, seqs)},
                                frozenset(key.decode() for key in taken))

    def _claim(self, core: BrokerCore, welcome: Reply) -> None:
        """A welcome of a connection new here (or of a session taken over
        from another broker): its name is to be held for it."""
        session = core.sessions.get(welcome.peer)
        if session is not None and (not welcome.message.resumed
                                    or session.adopted is welcome.message):
            self.claims.add(session.user.name_key)

    def _find_sessions(self, core: BrokerCore, outputs: list) -> list:
        """Each FindSession among ``outputs`` replaced by the core's answer
        once its token's record is read (one round trip for them all): the
        session taken over, a new session, or, with Redis down, a refusal.
        Lookup first, then following: a session's streams (its record's
        rooms, its user's direct messages) not followed here yet are
        followed for them all at once, and the core is given the same
        record again, so the welcome comes from loaded streams."""
        finds = [o for o in outputs if type(o) is FindSession]
        try:
            pipe = self.redis.pipeline(transaction=False)
            for find in finds:
                pipe.hgetall(SESSION_PREFIX + token_digest(find.hello.resume))
            records = list(map(_record, pipe.execute()))
        except redis.RedisError as e:
            self.outage.failed(e)
            answers = {id(find): core.session_lookup_failed(find) for find in finds}
        else:
            answers = self._sessions_found(core, finds, records)
        out: list = []
        for item in outputs:
            out += answers[id(item)] if type(item) is FindSession else [item]
        # the joins of the sessions taken over go to Redis with this pass
        return out + core.flush_presence(core.last_wall)

    def _sessions_found(self, core: BrokerCore, finds: list, records: list) -> dict[int, list]:
        """The core's answer to each of ``finds`` given its record (by the
        find's id), the streams the sessions need followed first."""
        answers: dict[int, list] = {}
        waiting: list[tuple[FindSession, SessionRecord | None]] = []
        streams: dict[str, None] = {}
        for find, record in zip(finds, records):
            answer = core.session_found(find, record)
            if answer and type(answer[0]) is Follow:
                waiting.append((find, record))
                streams.update(dict.fromkeys(answer[0].streams))
            else:
                answers[id(find)] = self._adopted(core, find, record, answer)
        followed = not streams or self.follow(core, list(streams))
        for find, record in waiting:
            answer = core.session_found(find, record) if followed else []
            if not answer or type(answer[0]) is Follow:
                answer = [Reply(find.peer, unavailable(None, core.config.heartbeat_interval,
                                                       "reach its backplane"))]
            answers[id(find)] = self._adopted(core, find, record, answer)
        return answers

    def _adopted(self, core: BrokerCore, find: FindSession, record: SessionRecord | None,
                 answer: list) -> list:
        """``answer``; if it takes over ``record``'s session, its name is
        claimed from the broker that held it (which then does not count)."""
        session = core.sessions.get(find.peer)
        if session is not None and any(type(o) is Reply and o.message is session.adopted
                                       for o in answer):
            self.adopting[session.user.name_key] = record.broker
        return answer

    def _argv(self, record: Persist, actor: str) -> list:
        """The six script arguments of one new event."""
        event, key, mid = record.event, "", ""
        if record.sender_id is not None:
            kind, (key, mid) = "m", record.sender_id
        elif isinstance(event, m.Message) and event.to:
            kind = "f"
        elif isinstance(event, m.Presence):
            kind, mid = "p", event.room or record.stream
            key = json.dumps([[m.name_key(name), name, reason or ""]
                              for name, reason in event.people()])
            event = replace(event, joined=[], left=[])  # Redis names whom it stores
        elif isinstance(event, m.Topic):
            kind, key, mid = "t", event.text, event.room or record.stream
        else:
            kind = ""
        return [record.stream, kind, key, mid, _event_json(event), actor]

    def _session_records(self, core: BrokerCore) -> list[list]:
        """The script's arguments for each session whose record changed:
        its record as it is now, or its deletion once it ended here."""
        out = []
        for token, session in self.sessions_changed.items():
            if core.sessions.get(session.peer) is session:
                rooms = json.dumps([room.name for room in session.rooms.values()])
                out.append([token_digest(token), session.user.name_key,
                            _digest(core, session.user), "1" if session.quiet else "", rooms])
            else:
                out.append([token_digest(token), "", "", "", ""])
        return out

    def _presence(self, core: BrokerCore) -> list[tuple[str, str]]:
        """(name key, name if online here else "") of each user whose
        standing here changed."""
        out = []
        for key in sorted(self.changed):
            user = core.by_name.get(key)
            out.append((key, user.name if user is not None and user.visible else ""))
        return out

    def _run(self, core: BrokerCore, claims: list, releases: list, presence: list,
             sessions: list[list], events: list[list]):
        """One run of the script; None if Redis did not take it (logged when
        it starts and stops failing)."""
        argv: list[Any] = [KEY_PREFIX, self.history, ACCEPTED_IDS_REMEMBERED, self.id,
                           BROKERS_KEY, core.config.presence_threshold, len(claims)]
        for claim in claims:
            argv += claim
        argv += [len(releases), *releases, len(presence)]
        for key, name in presence:
            argv += [key, name]
        argv.append(len(sessions))
        for record in sessions:
            argv += record
        for event in events:
            argv += event
        try:
            result = self.append_script(args=argv)
        except redis.RedisError as e:
            self.outage.failed(e)
            return None
        self.outage.worked()
        return result

    # --- brokers alive and dead --------------------------------------------------------

    def tick(self, core: BrokerCore, now: float, wall: float) -> None:
        """Once per heartbeat interval: say this broker is alive, and have
        the users of a broker that is not leave their rooms (one surviving
        broker does, under a lock).

        A broker's liveness key expires ``expiry`` (liveness x interval)
        after its last refresh; a survivor reaps it once it has found the key
        missing for another ``expiry``, at its next interval: its users are
        announced gone within 2 x expiry + 2 x interval of its death (8 s
        with the defaults), unless they came back on another broker."""
        if now < self.next_beat:
            return
        self.next_beat = now + core.config.heartbeat_interval
        self._drop_unwanted(core, now)
        expiry_ms = max(1, int(core.config.expiry * 1000))
        try:
            pipe = self.redis.pipeline(transaction=False)
            pipe.set(ALIVE_PREFIX + self.id, wall, px=expiry_ms)
            pipe.sadd(BROKERS_KEY, self.id)
            pipe.smembers(BROKERS_KEY)
            brokers = [b.decode() for b in pipe.execute()[-1] if b.decode() != self.id]
            pipe = self.redis.pipeline(transaction=False)
            for broker in brokers:
                pipe.exists(ALIVE_PREFIX + broker)
            dead = {b for b, alive in zip(brokers, pipe.execute()) if not alive}
            for broker in dead:
                # Its clients get the grace of one more expiry to come back
                # on another broker (then nobody sees them leave and join).
                since = self.missing.setdefault(broker, now)
                if now - since >= core.config.expiry:
                    self._reap(core, broker, wall)
            self.missing = {b: t for b, t in self.missing.items() if b in dead}
        except redis.RedisError as e:
            log.debug("backplane: no liveness this interval: %s", e)

    def _reap(self, core: BrokerCore, broker: str, wall: float) -> None:
        """``broker`` stopped saying it is alive: its users leave the rooms
        where no other broker has them (``timeout``), once, by whichever
        surviving broker takes the lock first."""
        if not self.redis.set(REAP_PREFIX + broker, self.id, nx=True, px=REAP_LOCK_MS):
            return
        memberships = self.redis.hgetall(f"{KEY_PREFIX}b:{broker}:in")
        left: dict[str, list[list[str]]] = {}  # stream -> its leaves
        for entry, name in memberships.items():
            stream = entry.decode().split(" ", 1)[0]
            left.setdefault(stream, []).append([name.decode(), m.LeaveReason.TIMEOUT])
        events = []
        for stream, leaves in sorted(left.items()):  # one presence event per room
            room = core.rooms.get(stream)
            presence = m.Presence(0, wall, [], leaves, room.name if room else stream)
            events.append(self._argv(Persist(stream, presence), broker))
        if events and self._run(core, [], [], [], [], events) is None:
            self.redis.delete(REAP_PREFIX + broker)  # another pass tries again
            return
        online = f"{KEY_PREFIX}b:{broker}:online"
        gone = [[broker, key.decode(), ""] for key in self.redis.hkeys(online)]
        self.redis.delete(online)
        if gone:
            self.redis.publish(EVENTS_CHANNEL, json.dumps({"e": [], "p": gone}))
        sessions = self.reap_sessions_script(args=[KEY_PREFIX, broker])
        self.redis.srem(BROKERS_KEY, broker)
        log.info("backplane: broker %s is gone: %d of its users' rooms left, %d of its "
                 "sessions ended", broker, len(memberships), sessions)

    # --- notifications -------------------------------------------------------------------

    def read(self, core: BrokerCore) -> list:
        """The core's outputs for the notifications waiting, in order."""
        out: list = []
        while True:
            if self.waiting:
                frame = self.waiting.popleft()
            else:
                try:
                    frame = self.pair.recv(zmq.NOBLOCK)
                except zmq.Again:
                    return out
            if frame == SUBSCRIBED:
                self.subscribed = True
                out += self._resync(core)
            elif frame == LOST:
                self.subscribed = False
            elif frame[:1] == FOLLOW:  # subscribed again (a reconnect), or given up
                out += self._catch_up(core, frame[1:].decode())
            else:
                out += self._notified(core, frame)

    def _catch_up(self, core: BrokerCore, stream: str) -> list:
        """The subscription to ``stream`` is live again: what was published
        before it is repaired (Redis resubscribes in any order after a
        reconnect, so the shared channel's resync may have come first)."""
        if stream not in core.following:
            return []
        try:
            counter = int(self.redis.get(stream_key(stream, "n")) or 0)
        except redis.RedisError as e:
            log.warning("backplane: cannot catch up %s now: %s", stream, e)
            return []
        out: list = []
        for repair in self.follower.behind(stream, counter):
            out += self._repair(core, repair)
        return out

    def _notified(self, core: BrokerCore, frame: bytes) -> list:
        try:
            note = json.loads(frame)
            # Lua's {} is an empty list
            events, presence = note.get("e") or [], note.get("p") or []
            for broker, key, name in presence:
                self._seen(core, broker, key, name)
            for stream, room, joined, left in note.get("c") or []:
                core.counted(stream, room, [(k, name) for k, name in joined or []], left or [])
            for stream, room, joined, left, seq in note.get("r") or []:
                core.room_changed(stream, room, [(k, name) for k, name in joined or []],
                                  left or [], seq)
            for stream, room, topic, seq in note.get("t") or []:
                core.topic_changed(stream, room, topic, seq)
        except (ValueError, KeyError, TypeError, AttributeError):
            log.error("backplane: a notification is not one, skipped")
            return []
        out: list = []
        for stream, seq, key, mid, event_json in events:
            if stream not in core.following:
                continue  # sent before the unsubscription, or a subscription given up
            shared = _shared(stream, seq, key, mid, event_json)
            if shared is not None:
                out += self._follow(core, shared)
        return out

    def _follow(self, core: BrokerCore, shared: Shared) -> list:
        ready, repairs = self.follower.receive(shared)
        out = [o for s in ready for o in core.receive(s.stream, s.event, s.sender_id)]
        for repair in repairs:
            out += self._repair(core, repair)
        return out

    def _repair(self, core: BrokerCore, repair: Repair) -> list:
        """Fill a hole from the Redis Stream; what is gone from it is skipped."""
        try:
            entries = self.redis.xrange(stream_key(repair.stream, "x"),
                                        min=f"{repair.after + 1}-0", max=str(repair.until))
        except redis.RedisError as e:
            log.warning("backplane: cannot repair %s now: %s", repair.stream, e)
            self.follower.repaired(repair.stream)
            return []
        self.follower.repaired(repair.stream)
        shared = [s for s in (self._from_entry(repair.stream, e) for e in entries) if s]
        if shared and shared[0].event.seq > repair.after + 1:
            log.warning("backplane: events %d to %d of %s are gone from Redis", repair.after + 1,
                        shared[0].event.seq - 1, repair.stream)
            self.follower.jump_to(repair.stream, shared[0].event.seq)
        out: list = []
        for item in shared:
            out += self._follow(core, item)
        return out

    def _resync(self, core: BrokerCore) -> list:
        """After (re)subscribing: repair every stream followed that moved on
        meanwhile, and read again who is online elsewhere and every room."""
        try:
            if self.redis.get(EPOCH_KEY) != core.epoch.encode():
                log.critical("backplane: Redis at %s lost the chat (its epoch is gone): "
                             "stopping; start the brokers again", self.where)
                self.lost = True
                return []
            self._load_presence(core)
            streams = sorted(core.following)
            pipe = self.redis.pipeline(transaction=False)
            for stream in streams:
                pipe.get(stream_key(stream, "n"))
            counters = pipe.execute()
        except redis.RedisError as e:
            log.warning("backplane: cannot resync now: %s", e)
            return []
        out: list = []
        for stream, counter in zip(streams, counters):
            for repair in self.follower.behind(stream, int(counter or 0)):
                out += self._repair(core, repair)
        try:  # a big room's changes told meanwhile (not stored as events) were lost too
            self._load_rooms(core)
        except redis.RedisError as e:
            log.warning("backplane: cannot read the rooms now: %s", e)
        return out

    # --- who is online elsewhere -----------------------------------------------------------

    def _load_presence(self, core: BrokerCore) -> None:
        """Who is online on each other broker, afresh from Redis."""
        brokers = [b.decode() for b in self.redis.smembers(BROKERS_KEY) if b.decode() != self.id]
        pipe = self.redis.pipeline(transaction=False)
        for broker in brokers:
            pipe.hgetall(f"{KEY_PREFIX}b:{broker}:online")
        self.others, self.online_elsewhere = {}, {}
        core.elsewhere.clear()
        core.everyone_online = None
        for broker, names in zip(brokers, pipe.execute()):
            for key, name in names.items():
                self._seen(core, broker, key.decode(), name.decode())

    def _seen(self, core: BrokerCore, broker: str, key: str, name: str) -> None:
        """``name`` (key ``key``) is online on ``broker`` now, or, with an
        empty name, no longer."""
        if broker == self.id:
            return
        core.everyone_online = None  # who is online is listed again when asked
        names = self.others.setdefault(broker, {})
        if name and key not in names:
            names[key] = name
            self.online_elsewhere[key] = self.online_elsewhere.get(key, 0) + 1
            core.elsewhere[key] = name
        elif not name and names.pop(key, None) is not None:
            self.online_elsewhere[key] -= 1
            if not self.online_elsewhere[key]:
                del self.online_elsewhere[key], core.elsewhere[key]

    def _from_entry(self, stream: str, entry) -> Shared | None:
        entry_id, fields = entry
        return _shared(stream, int(entry_id.split(b"-")[0]), fields[b"k"].decode(),
                       fields[b"i"].decode(), fields[b"e"].decode())

    def _hand_on(self, pair: zmq.Socket, frame: bytes) -> None:
        """Give the broker's thread a frame; while its queue is full, wait
        (Redis then holds the notifications, up to its pub/sub output limit,
        past which it drops this subscriber: a resync follows), but never
        past the broker stopping, which must not hang on this thread."""
        while not self._stopping.is_set():
            try:
                pair.send(frame, zmq.NOBLOCK)
                return
            except zmq.Again:
                self._stopping.wait(HAND_ON_RETRY_S)

    def _read_notifications(self, ctx: zmq.Context) -> None:
        """The reader thread: notifications from Redis to the PAIR socket,
        and the broker's (un)subscriptions from the PAIR to Redis. It waits
        on both at once: the PAIR and the pub/sub connection's socket."""
        pair = ctx.socket(zmq.PAIR)
        pair.connect(READER_ADDRESS)
        channels: set[str] = set()  # the streams' channels the broker follows
        pubsub = None
        waiting = _Waiting(pair)
        try:
            while not self._stopping.is_set():
                try:
                    if pubsub is None:
                        pubsub = self.redis.pubsub()
                        # the shared channel last: its confirmation (SUBSCRIBED,
                        # then a resync) comes once every stream's is live
                        pubsub.subscribe(*sorted(channels), EVENTS_CHANNEL)
                    self._pass_on(pubsub, pair)
                    waiting.wait(pubsub)
                    self._take_requests(pubsub, pair, channels)
                except redis.RedisError:
                    if pubsub is not None:
                        pubsub.close()
                        pubsub = None
                        self._hand_on(pair, LOST)
                    self._stopping.wait(RESUBSCRIBE_S)
        finally:
            if pubsub is not None:
                pubsub.close()
            pair.close(linger=0)

    def _pass_on(self, pubsub, pair: zmq.Socket) -> None:
        """Hand over what Redis sent that is already here (read or buffered)."""
        while (message := pubsub.get_message(timeout=0)) is not None:
            if message["type"] == "message":
                self._hand_on(pair, message["data"])
            elif message["type"] == "subscribe":
                stream = channel_stream(message["channel"])
                self._hand_on(pair, SUBSCRIBED if stream is None else FOLLOW + stream.encode())

    def _take_requests(self, pubsub, pair: zmq.Socket, channels: set[str]) -> None:
        """Subscribe and unsubscribe as the broker asks ([+ or -, streams...]):
        one command per request, however many streams it names."""
        while pair.poll(0):
            verb, *streams = pair.recv_multipart()
            named = [stream_channel(s.decode()) for s in streams]
            if verb == FOLLOW:
                channels.update(named)
                pubsub.subscribe(*named)
            else:
                channels.difference_update(named)
                pubsub.unsubscribe(*named)


class _Waiting:
    """The reader's wait until Redis or the broker has something (or the
    broker may be stopping): the PAIR and the pub/sub connection's socket,
    polled at once (registered again when redis-py connected anew)."""

    def __init__(self, pair: zmq.Socket):
        self.pair = pair
        self.poller: zmq.Poller | None = None
        self.fd = -1

    def wait(self, pubsub) -> None:
        sock = getattr(pubsub.connection, "_sock", None)
        if sock is None:
            raise redis.ConnectionError("the subscription's connection is closed")
        if sock.fileno() != self.fd or self.poller is None:
            self.fd = sock.fileno()
            self.poller = zmq.Poller()
            self.poller.register(self.pair, zmq.POLLIN)
            self.poller.register(self.fd, zmq.POLLIN)
        self.poller.poll(READER_POLL_S * 1000)
