"""The broker core's rewinding: what it does when a pass's events could not be stored.

With ``--db`` on a full disk (or a read-only file, an I/O error) the shell
calls ``persist_failed``, and with ``--backplane`` a pass that Redis
numbered differently goes through ``handed_over`` (broker_backplane.py),
which uses the same steps: each stream back to its last stored event
(``_rewind``), a hello that was not stored undone (``_undo_hello``), room
memberships as the stored events say (``_memberships_as_stored``), and
every position told in the pass cut back (``_as_stored``).

StoreRewind is a part of BrokerCore (broker_core.py), which inherits it:
its methods use the core's tables. No I/O.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import messages as m
from broker_outputs import NOT_STORED, Persist, Reply, unavailable, with_message


class StoreRewind:
    """What BrokerCore does when the events of a pass were not stored."""

    def persist_failed(self, outputs: list) -> list:
        """The shell could not write the Persist outputs among ``outputs``
        (a full disk, a read-only file, an I/O error), so none of their
        events may be told of, and the core goes back to what is stored.
        Returns what to carry out instead of ``outputs``:

        * every stream touched goes back to before its first unwritten event;
        * a message (to a room or a person) is refused ``unavailable``
          instead of acknowledged, and delivered to nobody;
        * the pass's hellos are refused and their connections forgotten;
        * a user who entered a room in the pass (its join unwritten) is
          taken out of it again, and those connections' answers become the
          refusal; a topic set in the pass is refused and the old one back;
        * a leave waits in ``unrecorded_leaves`` (the person is gone);
        * positions in welcomes, room answers, histories and announcements
          are cut back to what is stored.
        """
        unwritten = [o for o in outputs if isinstance(o, Persist)]
        if not unwritten:
            return outputs
        stored = self._rewind(unwritten)
        refused = {id(item.message) for item in outputs if isinstance(item, Reply)
                   and self._undo_hello(item.peer, item.message)}
        refused_rooms = self._memberships_as_stored(unwritten)
        refused_acks = {(r.sender_id[1], r.event.seq) for r in unwritten if r.sender_id}
        undone = {id(r.event) for r in unwritten}
        self.warnings.warn(NOT_STORED, "the store", f"{len(unwritten)} event(s)", self.last_now)
        retry = self.config.heartbeat_interval
        blocked: set[bytes] = set()
        out: list = []
        for item in outputs:
            if isinstance(item, Persist):
                continue
            message = item.message if isinstance(item, Reply) else item.event
            if id(message) in undone:  # published, or a direct message's delivery
                continue
            if isinstance(message, m.Ack) and (message.id, message.seq) in refused_acks:
                message = unavailable(message.id, retry)
                session = self.sessions.get(item.peer)
                if session is not None and item.peer not in blocked:
                    # the order is kept, as after a rate refusal: its first
                    # refused message goes before any later one
                    session.blocked_on = message.id
                    blocked.add(item.peer)
            elif id(message) in refused or (isinstance(message, m.Room) and (
                    item.peer, m.room_key(message.room)) in refused_rooms):
                message = unavailable(None, retry)
            else:
                message = self._as_stored(message, stored)
            out.append(with_message(item, message))
        return out

    def _rewind(self, unwritten: list[Persist]) -> dict[str, int]:
        """Each stream back to before its first unwritten event, and each
        room's topic back to before its first unwritten change; the last
        stored seq of each stream rewound."""
        stored: dict[str, int] = {}
        for record in unwritten:
            stored.setdefault(record.stream, record.event.seq - 1)
        for stream_id, seq in self.loaded_in_pass.items():  # what was loaded stays
            if stream_id in stored:
                stored[stream_id] = max(stored[stream_id], seq)
        self.loaded_in_pass.clear()
        for stream_id, seq in stored.items():
            forgotten = [r.sender_id for r in unwritten if r.stream == stream_id and r.sender_id]
            self.history_bytes -= self.streams[stream_id].truncate(seq, forgotten)
            self._drop_unfollowed(stream_id)
        for record in reversed(unwritten):  # the first change's previous topic wins
            if isinstance(record.event, m.Topic):
                self.rooms[record.stream].topic = record.previous_topic or ""
        for stream_id in stored:
            if (room := self.rooms.get(stream_id)) is not None:
                self._forget_if_unused(room)  # entered and left in the pass
        return stored

    def _undo_hello(self, peer: bytes, message: Any) -> bool:
        """If ``message`` welcomes a new connection, forget that connection,
        as if it had never said hello (nothing of it is stored)."""
        if not isinstance(message, m.Welcome):
            return False
        session = self.sessions.get(peer)
        if session is None or session.secret != message.resume:
            return False
        if message.resumed and session.adopted is not message:
            return False  # resumed here: the session was stored before
        for room in session.rooms.values():
            self._leave_room(session, room)
        session.rooms.clear()
        self._detach(session)
        return True

    def _memberships_as_stored(self, unwritten: list[Persist]) -> set[tuple[bytes, str]]:
        """Who is in each room as the stored events say. A user whose leave
        was not written left all the same: the leave is kept to be written.
        A user whose join was not written is taken out again. Returns the
        (peer, room key) of the connections whose entering is refused, and
        of those whose topic is."""
        was_in: dict[tuple[str, str], bool] = {}  # (room key, name key): as stored
        last_leave: dict[tuple[str, str], tuple[str, str, float]] = {}  # name, reason, time
        refused: set[tuple[bytes, str]] = set()
        for record in unwritten:
            event = record.event
            if isinstance(event, m.Presence):
                for name, reason in event.people():
                    pair = (record.stream, m.name_key(name))
                    was_in.setdefault(pair, reason is not None)
                    if reason is not None:
                        last_leave[pair] = (name, reason, event.time)
            elif isinstance(event, m.Topic) and (user := self.by_name.get(
                    m.name_key(event.name))) is not None:
                refused.update((s.peer, record.stream) for s in user.sessions)
        for (key, name_key), stored_in in was_in.items():
            room = self.rooms.get(key)
            inside = room is not None and name_key in room.members
            if stored_in and not inside:
                self.unrecorded_leaves.append((key, *last_leave[(key, name_key)]))
            elif inside and not stored_in:
                for session in self.by_name[name_key].sessions:
                    if not session.quiet and key in session.rooms:
                        self._leave_room(session, session.rooms.pop(key))
                        refused.add((session.peer, key))
        return refused

    def _as_stored(self, message: Any, stored: dict[str, int]) -> Any:
        """``message`` with every position in it cut back to the last stored
        event of its stream (``stored``: the streams rewound)."""
        if isinstance(message, m.Room):
            key = m.room_key(message.room)
            if key not in stored:
                return message
            room = self.rooms.get(key)
            if room is None:  # gone: nothing of it was stored
                return replace(message, seq=0, topic="", members=0)
            return replace(message, seq=min(message.seq, stored[key]), topic=room.topic,
                           members=room.count())
        if isinstance(message, m.Position) and message.stream in stored:
            return replace(message, seq=min(message.seq, stored[message.stream]))
        if isinstance(message, m.RoomList):
            return replace(message, rooms=[self._as_stored(r, stored) for r in message.rooms])
        if isinstance(message, m.Welcome):
            dm_seq = stored.get(m.dm_stream(message.name), message.dm_seq)
            return replace(message, rooms=[self._as_stored(r, stored) for r in message.rooms],
                           dm_seq=min(message.dm_seq, dm_seq))
        if isinstance(message, m.History) and message.stream in stored:
            until = min(message.until, stored[message.stream])
            return replace(message, events=[e for e in message.events if e.seq <= until],
                           first=min(message.first, until + 1), until=until)
        return message
