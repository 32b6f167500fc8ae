"""One stream on the broker's side: its sequence numbers, history and accepted ids.

A stream is an ordered series of sequenced events (messages, joins, leaves)
that clients read in order, exactly once (the Clone pattern's one object per
stream). Every room is one Stream, and so is every user's direct messages,
each with numbers, history and gap repair of its own.

Stream is plain data and logic: no clock, no socket, no store. It stamps the
next sequence number on an event, keeps the newest ``history`` events for
gap repair (``fetch``) and late joiners (``recent``), and remembers the
client message ids it accepted, so that a resend is acknowledged, not shown
twice.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from itertools import islice
from typing import Any, Callable, Iterable

import messages as m

# Message ids remembered to ignore a resend of an accepted message. A client
# resends only what is unacknowledged, at most its in-flight window, so a
# window far wider than any client's is enough.
ACCEPTED_IDS_REMEMBERED = 50_000
# Events carried by one history reply, in bytes as sent (each event's JSON):
# enough for hundreds of ordinary lines, while a client that asks and never
# reads holds at most broker.REPLY_QUEUE. Counted encoded, since a text of
# control characters is six times longer in JSON than in characters.
REPLY_BYTES = 64 * 1024

# What one held event counts against the broker's history budget beyond its
# text: the object and its other fields, roughly.
EVENT_OVERHEAD_BYTES = 200

# (sender's name key, client message id): unique per sender within a stream
SenderId = tuple[str, str]


def event_bytes(event: Any) -> int:
    """What holding ``event`` in a history costs, in bytes."""
    text = getattr(event, "text", "")
    return EVENT_OVERHEAD_BYTES + (len(text) if text.isascii() else len(text.encode()))


class Stream:
    """Sequence numbers, bounded history and accepted-id memory of one stream."""

    def __init__(self, stream_id: str, history: int,
                 ids_remembered: int = ACCEPTED_IDS_REMEMBERED):
        self.id = stream_id
        self.topic = m.stream_topic(stream_id)
        self.seq = 0
        self.history_limit = history
        self.history: deque = deque()
        self.bytes = 0  # what the history holds, by event_bytes
        self.ids_remembered = ids_remembered
        self.accepted_ids: OrderedDict[SenderId, int] = OrderedDict()
        # seq -> (held event, its JSON's length), worked out when a reply
        # first carries it: a client asking for the same history again and
        # again costs a lookup per event, not an encoding.
        self._encoded_sizes: dict[int, tuple[Any, int]] = {}

    def restore(self, events: list, accepted_ids: Iterable[tuple[SenderId, int]]) -> None:
        """Continue a stored history: its last events and accepted message ids."""
        for event in events[-self.history_limit:]:
            self._hold(event)
        if events:
            self.seq = max(self.seq, events[-1].seq)
        for sender_id, seq in accepted_ids:
            self._remember(sender_id, seq)

    def append(self, make_event: Callable[[int], Any], sender_id: SenderId | None = None) -> Any:
        """Stamp the next sequence number on a new event and keep it."""
        self.seq += 1
        event = make_event(self.seq)
        self._hold(event)
        if sender_id is not None:
            self._remember(sender_id, self.seq)
        return event

    def _hold(self, event: Any) -> None:
        if len(self.history) >= self.history_limit:
            self.drop_oldest()
        self.history.append(event)
        self.bytes += event_bytes(event)

    def drop_oldest(self) -> int:
        """Forget the oldest held event (the history budget is spent); what it freed."""
        event = self.history.popleft()
        self._encoded_sizes.pop(event.seq, None)
        freed = event_bytes(event)
        self.bytes -= freed
        return freed

    def truncate(self, seq: int, sender_ids: Iterable[SenderId]) -> int:
        """Undo every event after ``seq`` (none was told of: their write
        failed), and forget ``sender_ids``, the messages among them; what
        the history freed."""
        freed = 0
        while self.history and self.history[-1].seq > seq:
            event = self.history.pop()
            self._encoded_sizes.pop(event.seq, None)
            freed += event_bytes(event)
        self.bytes -= freed
        self.seq = min(self.seq, seq)
        for sender_id in sender_ids:
            self.accepted_ids.pop(sender_id, None)
        return freed

    def accepted_seq(self, sender_id: SenderId) -> int | None:
        """The seq a message was accepted as, if it was (a resend)."""
        return self.accepted_ids.get(sender_id)

    def first_held(self) -> int:
        """The oldest seq still in the history (the next one, if it is empty)."""
        return self.history[0].seq if self.history else self.seq + 1

    def fetch(self, after: int, until: int) -> m.History:
        """The events with ``after < seq <= until`` that are still held, from
        the oldest held, cut short at MAX_FETCH_EVENTS or the reply size."""
        first = self.first_held()
        start = min(max(after + 1, first), self.seq + 1)
        until = min(until, self.seq, start - 1 + m.MAX_FETCH_EVENTS)
        events = self._within_reply_size(islice(self.history, start - first,
                                           max(start, until + 1) - first))
        if events and len(events) < until - start + 1:
            until = events[-1].seq  # cut short by size: the client asks again
        return m.History(events, first, until, stream=self.id)

    def recent(self, count: int) -> m.History:
        """The last ``count`` chat messages (not joins and leaves), oldest first."""
        newest_first = (e for e in reversed(self.history) if isinstance(e, m.Message))
        found = self._within_reply_size(islice(newest_first, count))
        return m.History(found[::-1], self.first_held(), self.seq, recent=True, stream=self.id)

    def _within_reply_size(self, events) -> list:
        """The leading events that fit in one reply, encoded (at least one)."""
        taken: list = []
        size = 0
        for event in events:
            size += self._encoded_size(event) + 1  # and the comma between
            if taken and size > REPLY_BYTES:
                break
            taken.append(event)
        return taken

    def _encoded_size(self, event: Any) -> int:
        known = self._encoded_sizes.get(event.seq)
        if known is None or known[0] is not event:
            known = self._encoded_sizes[event.seq] = (event, len(m.encode(event)))
        return known[1]

    def _remember(self, sender_id: SenderId, seq: int) -> None:
        self.accepted_ids[sender_id] = seq
        if len(self.accepted_ids) > self.ids_remembered:
            self.accepted_ids.popitem(last=False)
