"""The broker core's side of the backplane (several brokers, one chat).

With ``--backplane`` every stream is numbered in Redis (backplane.py, the
I/O; backplane_core.py, the order in which events come back). What
BrokerCore does for it lives here: ``handed_over`` takes back a pass's
events that the backplane numbered instead, ``receive`` takes a shared
event in the shared order, ``counted`` the people in a room above the
presence threshold, and ``presence_log`` / ``elsewhere`` tell the
backplane whose standing changed here and who is online on the others.
``session_log`` tells it whose session record to write or delete, and
``session_found`` takes over a session of another broker whose record the
backplane read (a client that failed over, resuming with its token).

Each broker follows only the streams its clients need (``following``): a
room while a connection here is in it or a subscriber here subscribes to
its topic, a user's direct messages while that user has a connection
here. A hello or a join that needs a stream not followed yet gets one
``Follow`` back, with nothing changed: the shell follows it (subscribes,
then loads it from Redis) and hands the request in again, so welcomes,
room answers, ``fetch`` and ``recent`` are answered from a loaded stream.
Streams nobody here needs any more are noted in ``unwanted`` for the
shell to drop (after a linger), which frees their history. Every room's
name, topic and members stay known whether followed or not
(``room_known``, ``room_changed``, ``topic_changed``): ``rooms`` and
``who`` answer for every room. A session taken over from another broker
needs the rooms of its record: ``session_found`` gives one ``Follow`` of
those not followed here (and of the user's direct messages), and the
shell gives it the same record again once they are followed, so the
welcome (``resumed``) is built from loaded streams.

BackplaneSeam is a part of BrokerCore (broker_core.py), which inherits it:
its methods use the core's tables and its rewinding after a write that
did not happen (``_rewind``, ``_undo_hello``, ``_as_stored``, in
broker_rewind.py). No I/O.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from typing import Any

import messages as m
from broker_outputs import (REFUSED, FindSession, Follow, Persist, Publish, Reply, unavailable,
                            with_message)


@dataclass(frozen=True, slots=True)
class SessionRecord:
    """A session as the backplane keeps it in Redis, for whichever broker
    the client moves to: who it is (name key and the digest of its
    user's secret, as ``secret_digest``), whether it is quiet, its rooms
    (as created, in order entered), and the broker that holds it."""

    name_key: str
    digest: str
    quiet: bool
    rooms: tuple[str, ...]
    broker: str


def secret_digest(names_by_key: bool, secret: str | None) -> str:
    """What proves a user on other brokers (in the name's claim and the
    session records): a digest of the secret (the secret itself stays with
    the broker), or "" when there is none (the name takes one connection
    at a time). With ``--allow`` (``names_by_key``), the client's key
    proved the name on every broker: "key"."""
    if names_by_key:
        return "key"
    return hashlib.sha256(secret.encode()).hexdigest() if secret else ""


def token_digest(token: str) -> str:
    """The key of a session's record: a digest of its token, so that
    Redis's data never holds the token that takes the session over."""
    return hashlib.sha256(token.encode()).hexdigest()


class BackplaneSeam:
    """What BrokerCore does for the backplane: hand-over, shared events,
    counts, and which streams to follow."""

    # --- which streams this broker follows -------------------------------------------

    def _to_follow(self, streams: list[str]) -> list:
        """[Follow] of those of ``streams`` not followed here, or [] if all are
        (or there is no backplane: every stream is here)."""
        if self.following is None:
            return []
        missing = tuple(s for s in dict.fromkeys(streams) if s not in self.following)
        return [Follow(missing)] if missing else []

    def wants(self, stream_id: str) -> bool:
        """Whether a client here needs ``stream_id``: a connection of the user
        (direct messages), or in the room or subscribed to its topic."""
        if stream_id.startswith(m.DM_STREAM_PREFIX):
            return stream_id[len(m.DM_STREAM_PREFIX):] in self.by_name
        room = self.rooms.get(stream_id)
        return stream_id in self.subscribed_rooms or (room is not None and room.sessions > 0)

    def _note_unwanted(self, stream_id: str) -> None:
        """A client here stopped needing ``stream_id``: the shell checks it."""
        if self.following is not None:
            self.unwanted.add(stream_id)

    def subscribed(self, topic: bytes, on: bool) -> str | None:
        """A subscriber here subscribed to ``topic`` (``on``; the XPUB tells
        the first subscription to a topic and the last one's end), or ended
        it. A room's exact topic makes the broker follow the room: the room
        key to follow now, if it is not followed yet; None otherwise."""
        if self.following is None or not topic.startswith(m.ROOM_TOPIC_PREFIX) \
                or topic[-1:] != b"\0":
            return None
        key = topic[len(m.ROOM_TOPIC_PREFIX):-1].decode("utf-8", "replace")
        if m.room_problem(key) or key != m.room_key(key):
            return None
        if not on:
            self.subscribed_rooms.discard(key)
            self._note_unwanted(key)
            return None
        if len(self.subscribed_rooms) >= self.config.max_rooms:
            return None  # as many as rooms may be: a subscriber's whim follows no more
        self.subscribed_rooms.add(key)
        return None if key in self.following else key

    def followed(self, stream_id: str, events: list, accepted_ids, seq: int,
                 members: dict[str, str] | None) -> None:
        """This broker follows ``stream_id`` from now on: its last events,
        their accepted ids and its seq, as Redis has them (and a room's
        members, read with them)."""
        self.following.add(stream_id)
        if stream_id not in self.streams and not events and not seq:
            return  # a new stream: made by whoever names it first, as without a backplane
        stream = self.open_stream(stream_id)
        pending = bool(stream.history)  # this pass's, not stored yet: a message to the user
        self._forget_history(stream)
        stream.seq = 0
        self.restore(stream_id, events, accepted_ids)
        stream.seq = max(stream.seq, seq)
        if pending:  # its rewind, once Redis numbered them, goes back to what was loaded
            self.loaded_in_pass[stream_id] = stream.seq
        room = self.rooms.get(stream_id)
        if room is not None and members is not None:
            room.share(members)

    def unfollowed(self, stream_id: str) -> None:
        """This broker no longer follows ``stream_id``: its history and
        accepted ids go (a direct messages stream goes altogether); a room
        stays listed, with its seq as last followed."""
        self.following.discard(stream_id)
        self.to_announce.pop(stream_id, None)
        stream = self.streams.get(stream_id)
        if stream is None:
            return
        self._forget_history(stream)
        if stream_id.startswith(m.DM_STREAM_PREFIX):
            del self.streams[stream_id]
        elif (room := self.rooms.get(stream_id)) is not None:
            self._forget_if_unused(room)

    def _forget_history(self, stream) -> None:
        while stream.history:
            self.history_bytes -= stream.drop_oldest()
        stream.accepted_ids.clear()

    def _drop_unfollowed(self, stream_id: str) -> None:
        """A direct messages stream numbered here for a pass (a message to
        someone on another broker) but not followed: it goes."""
        if self.following is not None and stream_id not in self.following \
                and stream_id.startswith(m.DM_STREAM_PREFIX):
            self.streams.pop(stream_id, None)
            self.to_announce.pop(stream_id, None)

    # --- every room, followed or not ---------------------------------------------------

    def room_known(self, stream_id: str, name: str | None, topic: str,
                   members: dict[str, str], seq: int) -> None:
        """A room as Redis has it (at start, after a lost subscription): its
        name as created, topic, members on every broker and last seq."""
        room = self._open_room(name or stream_id)
        if name:
            room.name = name
        room.share(members)
        if stream_id not in self.following:
            room.topic = topic
            room.stream.seq = max(room.stream.seq, seq)

    def room_changed(self, stream_id: str, name: str, joined: list[tuple[str, str]],
                     left: list[str], seq: int) -> None:
        """People entered and left a room on some broker (a stored presence
        event, ``seq``): a room followed here learns it from the event itself."""
        if stream_id in self.following or stream_id.startswith(m.DM_STREAM_PREFIX):
            return
        room = self._open_room(name)  # made as it was created, if new here
        for name_key, shown in joined:
            room.shared_in(name_key, shown)
        for name_key in left:
            room.shared_out(name_key)
        room.stream.seq = max(room.stream.seq, seq)

    def topic_changed(self, stream_id: str, name: str, topic: str, seq: int) -> None:
        """A room's topic changed (event ``seq``): a room followed here
        learns it from the event itself."""
        if stream_id in self.following or stream_id.startswith(m.DM_STREAM_PREFIX):
            return
        room = self._open_room(name)
        room.topic = topic
        room.stream.seq = max(room.stream.seq, seq)

    def online_listed(self) -> list[tuple[str, str]]:
        """(name key, name) of everyone online, sorted: here, or with a
        backplane on every broker (built again only after a change)."""
        if self.elsewhere is None:
            return self.online
        if self.everyone_online is None:
            everyone = {**self.elsewhere, **dict(self.online)}
            self.everyone_online = sorted(everyone.items())
        return self.everyone_online

    def _online_changed(self, name_key: str) -> None:
        """With a backplane: the user's standing here changed (online,
        offline, the name given up), for the backplane to tell the others."""
        if self.presence_log is not None:
            self.presence_log.append(name_key)
            self.everyone_online = None

    def _session_changed(self, session: Any) -> None:
        """With a backplane: the session's record (its rooms, or whether it
        exists) is to be written again."""
        if self.session_log is not None:
            self.session_log[session.secret] = session

    def session_found(self, find: FindSession, record: SessionRecord | None) -> list:
        """The hello of ``find`` again, with the record of its resume token
        as the backplane found it (None: none, a new session then); or one
        Follow of the streams that session needs, with nothing changed, for
        the shell to follow before it calls again with the same record."""
        return self._on_hello(find.peer, self.sessions.get(find.peer), find.hello, self.last_now,
                              self.last_wall, find.client_key, looked_up=True, record=record)

    def session_lookup_failed(self, find: FindSession) -> list:
        """The backplane could not look the token of ``find`` up (Redis is
        down): the hello is refused ``unavailable``, to be said again."""
        return [Reply(find.peer, unavailable(None, self.config.heartbeat_interval,
                                             "look your session up"))]

    def _record_matches(self, record: SessionRecord, hello: m.Hello, name_key: str) -> bool:
        """Whether a record found for ``hello``'s token is its user's: the
        same name, and the same secret (or, with --allow, the key checked)."""
        return record.name_key == name_key and record.digest == secret_digest(
            bool(self.config.names_by_key), hello.secret)

    def handed_over(self, outputs: list, seqs: dict[int, int],
                    names_taken: frozenset[str] = frozenset()) -> list:
        """The Persist outputs among ``outputs`` were numbered by the shared
        backplane instead of here. ``seqs`` maps each one's event (by ``id``)
        to the seq it got there: positive, a new event; negative, a resend of
        a message accepted earlier as that seq (nothing new); 0, part of such
        a resend (a direct message's copy for the addressee).

        The events come back through ``receive`` in the shared order, so
        here each stream goes back to before them, their publishes and
        deliveries are dropped, and each acknowledgement gets its shared
        seq. Every position and history told in the pass (welcomes, room
        answers, positions, fetch and recent answers) is cut back to the
        shared seq before the new events: a local number is provisional,
        and at it another broker's event may be the shared one. A topic
        set in the pass is the old one again until its event comes back.

        ``names_taken``: name keys that another broker holds for someone
        else (with another secret): the pass's new connections under them
        are forgotten and refused ``name_taken`` (the backplane numbered
        none of their joins).
        """
        records = [o for o in outputs if isinstance(o, Persist)]
        if not records and not names_taken:
            return outputs
        shared_until = self._rewind(records)
        acks = {(r.sender_id, r.event.seq): abs(seqs[id(r.event)])
                for r in records if r.sender_id}
        undone = {id(r.event) for r in records}
        out: list = []
        for item in outputs:
            if isinstance(item, Persist):
                continue
            message = item.message if isinstance(item, Reply) else item.event
            if id(message) in undone:
                continue
            if (isinstance(message, m.Welcome) and m.name_key(message.name) in names_taken
                    and self._undo_hello(item.peer, message)):
                self.warnings.warn(REFUSED, item.peer.hex(), "name taken on another broker",
                                   self.last_now)
                item = replace(item, message=m.Error(m.ErrorCode.NAME_TAKEN,
                                                     f"the name {message.name} is taken"))
            elif isinstance(message, m.Ack) and (session := self.sessions.get(item.peer)):
                shared = acks.get(((session.user.name_key, message.id), message.seq))
                if shared is not None:
                    item = replace(item, message=replace(message, seq=shared))
            else:
                item = with_message(item, self._as_stored(message, shared_until))
            out.append(item)
        return out

    def receive(self, stream_id: str, event: Any, sender_id: tuple[str, str] | None) -> list:
        """A sequenced event of a shared stream, numbered by the backplane,
        next in that stream's order (backplane_core.Follower sees to it):
        kept in the history, then published on the room's topic, or, of a
        user's direct messages, given to that user's sessions here."""
        created = stream_id not in self.streams
        stream = self.open_stream(stream_id)
        if event.seq != stream.seq + 1:  # the events between are gone from the backplane
            while stream.history:
                self.history_bytes -= stream.drop_oldest()
            stream.seq = event.seq - 1
        self._number(stream, lambda seq: event, sender_id)
        room = self.rooms.get(stream_id)
        if room is None:
            user = self.by_name.get(stream_id[len(m.DM_STREAM_PREFIX):])
            return [] if user is None else [Reply(s.peer, event) for s in user.sessions
                                            if not s.quiet]
        if created and event.room:
            room.name = event.room  # as it was created
        out: list = []
        if isinstance(event, m.Topic):
            room.topic = event.text
        elif isinstance(event, m.Presence):
            # A room whose count was being published announces people again:
            # its count goes first (at once), as the presence counts on it.
            out += self._publish_count_now(room)
            for name in event.joined:
                room.shared_in(m.name_key(name), name)
            for name, _ in event.left:
                room.shared_out(m.name_key(name))
        return [*out, Publish(event, stream.topic)]

    def counted(self, stream_id: str, room_name: str, joined: list[tuple[str, str]],
                left: list[str]) -> None:
        """With a backplane: people entered (name key, name) and left (name
        keys) a room above the threshold on some broker, where the backplane
        stored no presence event: its count is published (``Members``, at
        most once per heartbeat interval, as of a room here)."""
        if stream_id.startswith(m.DM_STREAM_PREFIX):
            return
        created = stream_id not in self.rooms
        room = self._open_room(room_name)
        if created:
            room.name = room_name  # as it was created
        for name_key, name in joined:
            room.shared_in(name_key, name)
        for name_key in left:
            room.shared_out(name_key)
        room.counting = True
        self.counts_due[stream_id] = room
