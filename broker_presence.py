"""Presence in the broker's core: who is in each room, told at a cost that
does not grow with the number online.

The joins and leaves of one pass of the shell's loop are gathered per room
(Room.pending) and announced in one Presence event per room when the pass
ends (``flush_presence``, called by ``tick``), or before anything else is
numbered in that room. A room above ``presence_threshold`` names nobody and
publishes its count (Members) at most once per heartbeat interval. ``who``
lists people a page at a time (WHO_PAGE_BYTES).

RoomPresence is a part of BrokerCore (broker_core.py), which inherits it:
its methods use the core's tables (rooms, presence_due, counts_due,
pass_log) and its numbering (``_append``). No I/O.
"""

from __future__ import annotations

import bisect
import logging

import messages as m
from broker_model import Room, Session
from broker_outputs import Publish, Reply

log = logging.getLogger("zchat.broker")

# Names one log line of joins or leaves shows before it counts the rest.
LOG_NAMES = 10


class RoomPresence:
    """BrokerCore's presence: batching per pass, counts of big rooms, ``who``."""

    def _on_who(self, peer: bytes, session: Session | None, who: m.Who, now: float,
                wall: float) -> list:
        if who.room is None:
            return [Reply(peer, _users_page(self.online_listed(), who.after, None))]
        room = self.rooms.get(m.room_key(who.room))
        listed = [] if room is None else room.who_listed()
        return [Reply(peer, _users_page(listed, who.after, room.name if room else who.room))]

    def flush_presence(self, wall: float) -> list:
        """Announce the joins and leaves of this pass: one presence event per
        room (the shell's tick calls it at the end of every pass)."""
        out: list = []
        while self.presence_due:
            key = next(iter(self.presence_due))
            out += self._announce_presence(self.presence_due.pop(key), wall)
        self._log_pass()
        return out

    def _log_pass(self) -> None:
        """``join ann, bob and 998 more``: one line per kind per pass."""
        for verb, names in self.pass_log.items():
            if names:
                more = len(names) - LOG_NAMES
                log.info("%s %s%s", verb, ", ".join(names[:LOG_NAMES]),
                         f" and {more} more" if more > 0 else "")
                names.clear()

    def _presence_changed(self, room: Room) -> None:
        self.presence_due[m.room_key(room.name)] = room

    def _announce_presence(self, room: Room, wall: float) -> list:
        """One room's joins and leaves of this pass: a presence event, or,
        for a room above the threshold, its count at the next heartbeat.
        With a backplane always the event: Redis, which knows the members on
        every broker, stores it or has the count published (``counted``)."""
        key = m.room_key(room.name)
        if self.rooms.get(key) is not room:
            return []  # entered and left in this pass, and forgotten
        joined, left = room.take_changes()
        if self.elsewhere is None and (room.counting
                                       or len(room.members) > self.config.presence_threshold):
            # Too big: its count is published instead (_publish_counts), and
            # when it comes back to the threshold, that count first.
            room.counting = True
            self.counts_due[key] = room
            return []
        if not joined and not left:
            return []
        return self._append(room.stream, lambda seq: m.Presence(seq, wall, joined, left, room.name))

    def _publish_counts(self, now: float) -> list:
        """The count of each counting room that changed, on its topic, at
        most once per heartbeat interval (at once after a quiet interval, so
        that those timed out together are counted gone without delay). A
        room back at the threshold announces each change again after it."""
        out = []
        for key, room in list(self.counts_due.items()):
            if now < room.count_published_at + self.config.heartbeat_interval:
                continue
            del self.counts_due[key]
            count = room.count()
            if self.rooms.get(key) is not room or count == room.count_published:
                continue
            room.count_published, room.count_published_at = count, now
            room.counting = count > self.config.presence_threshold
            out.append(Publish(m.Members(room.name, count), room.stream.topic))
        return out

    def _publish_count_now(self, room: Room) -> list:
        """A counting room's count, unless its subscribers have it already."""
        key = m.room_key(room.name)
        if not room.counting and key not in self.counts_due:
            return []
        self.counts_due.pop(key, None)
        room.counting = False
        if room.count() == room.count_published:
            return []
        room.count_published, room.count_published_at = room.count(), self.last_now
        return [Publish(m.Members(room.name, room.count()), room.stream.topic)]


def _users_page(listed: list[tuple[str, str]], after: str | None, room: str | None) -> m.Users:
    """The names of ``listed`` (sorted (name key, name) pairs) after the
    name key ``after``, as many as fit in WHO_PAGE_BYTES."""
    start = 0 if after is None else bisect.bisect_right(listed, after, key=lambda e: e[0])
    end, size = start, 0
    while end < len(listed):
        size += len(listed[end][1]) + 3  # names are ASCII: quotes and a comma
        if end > start and size > m.WHO_PAGE_BYTES:
            break
        end += 1
    cursor = listed[end - 1][0] if end < len(listed) else None
    return m.Users([name for _, name in listed[start:end]], room, len(listed), cursor)
