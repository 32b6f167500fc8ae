"""One stream on the client's side: in-order, exactly-once delivery.

A StreamReader takes a stream's events as they come (live broadcasts,
history replies, in any order, with repeats and gaps) and hands them on in
sequence order, each once. It is the client half of the Clone pattern: the
welcome (or the position a stream is joined at) says where to start; an
event ahead of the next expected one, or a heartbeat announcing a higher
seq, means a gap, filled by a ``fetch``; what the broker no longer holds is
reported as Missed. While the earlier messages asked for on joining
(``recent``) are awaited, live events are held back, so that the earlier
ones are shown first.

Plain logic: no clock (times are given), no socket. Methods return outputs:
events for the caller, and m.Fetch / m.Recent requests (without the session
token, which the client core adds).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import messages as m

# Out-of-order events held while a gap is fetched; past it they are dropped
# and fetched again, so memory stays bounded for a listener far behind.
MAX_BUFFERED_EVENTS = 20_000


@dataclass(frozen=True)
class Earlier:
    """Chat messages from before we joined (asked for with ``recent``)."""

    messages: list
    stream: str = m.GENERAL_ROOM


@dataclass(frozen=True)
class Missed:
    """Events ``first..last`` are gone from the broker's history."""

    first: int
    last: int
    stream: str = m.GENERAL_ROOM

    @property
    def count(self) -> int:
        return self.last - self.first + 1


class StreamReader:
    """Delivery state of one stream: position, held events, pending requests."""

    def __init__(self, stream_id: str):
        self.id = stream_id
        self.topic = m.stream_topic(stream_id)  # None: direct messages, not on PUB
        self.last_seq = 0  # the newest seq handed on
        self.announced_seq = 0  # the newest seq a position told of
        self.buffer: dict[int, Any] = {}  # seq -> event not yet handed on
        self.live = False  # positioned by a welcome, and events may flow
        self.fetch_sent_at: float | None = None  # the fetch awaiting its answer
        # While earlier messages are awaited: the seq they end at, and when asked.
        self.recent_until: int | None = None
        self.recent_sent_at = 0.0

    # --- position --------------------------------------------------------------

    def start_at(self, seq: int) -> None:
        """Events up to ``seq`` are not ours to show (a first welcome, or one
        from a new broker run): start after it."""
        self.last_seq = self.announced_seq = seq
        self.buffer = {s: e for s, e in self.buffer.items() if s > seq}
        self.fetch_sent_at = None

    def pause(self) -> None:
        """The session is being re-established: hold events, and forget the
        requests in flight, whose answers may never come."""
        self.live = False
        self.fetch_sent_at = None
        self.recent_until = None

    def resume(self, now: float) -> list:
        """Joined again: hand on what can be, and repair what is missing."""
        self.live = True
        return self._deliver(now)

    def hold_for_recent(self, count: int, now: float) -> m.Recent:
        """Ask for the last ``count`` earlier messages, holding live events
        back until they are answered (or the request is given up)."""
        self.recent_until = self.last_seq
        self.recent_sent_at = now
        return m.Recent(count, stream=self.id)

    # --- inputs ------------------------------------------------------------------

    def on_event(self, event: Any, now: float) -> list:
        """A sequenced event of this stream, live or from a history."""
        if event.seq <= self.last_seq:
            return []  # already handed on (or before our welcome)
        if len(self.buffer) < MAX_BUFFERED_EVENTS:
            self.buffer[event.seq] = event
        return self._deliver(now) if self.live else []

    def on_announce(self, seq: int, now: float) -> list:
        """The broker says the stream has reached ``seq`` (a position, or a
        welcome on resuming)."""
        self.announced_seq = max(self.announced_seq, seq)
        return self._catch_up(now) if self.live else []

    def on_history(self, history: m.History, now: float) -> list:
        """The answer to our fetch."""
        self.fetch_sent_at = None
        if not self.live:
            return []
        out: list = []
        if history.first > self.last_seq + 1:
            lost_until = min(history.first - 1, history.until)
            if lost_until > self.last_seq:
                out.append(Missed(self.last_seq + 1, lost_until, self.id))
                self.last_seq = lost_until
        for event in history.events:
            if event.seq > self.last_seq and len(self.buffer) < MAX_BUFFERED_EVENTS:
                self.buffer[event.seq] = event
        return out + self._deliver(now)

    def on_recent(self, history: m.History, now: float) -> list:
        """The earlier messages asked for on joining."""
        if self.recent_until is None:
            return []  # not asked for (any more)
        earlier = Earlier([e for e in history.events if e.seq <= self.recent_until], self.id)
        self.recent_until = None
        return [earlier, *self._deliver(now)] if self.live else [earlier]

    def tick(self, now: float, patience: float) -> list:
        """Give up on answers that did not come: ask again, or stop waiting."""
        if not self.live:
            return []
        out: list = []
        if self.recent_until is not None and now - self.recent_sent_at > patience:
            # The earlier messages are nice to have; live chat is not to be
            # held back for them any longer.
            self.recent_until = None
            out += self._deliver(now)
        if self.fetch_sent_at is not None and now - self.fetch_sent_at > patience:
            self.fetch_sent_at = None  # the answer was lost: ask again
            out += self._catch_up(now)
        return out

    def next_deadline(self, patience: float) -> float | None:
        """When tick() next has something to give up on, if ever."""
        times = []
        if self.live and self.recent_until is not None:
            times.append(self.recent_sent_at + patience)
        if self.live and self.fetch_sent_at is not None:
            times.append(self.fetch_sent_at + patience)
        return min(times, default=None)

    def fetch_not_sent(self) -> None:
        """Our fetch could not go out: it may be asked again at once."""
        self.fetch_sent_at = None

    def recent_not_sent(self) -> None:
        """Our recent request could not go out: do not hold live events for it."""
        self.recent_until = None

    # --- delivery ------------------------------------------------------------------

    def _deliver(self, now: float) -> list:
        if self.recent_until is not None:
            return []
        out: list = []
        while (event := self.buffer.pop(self.last_seq + 1, None)) is not None:
            self.last_seq = event.seq
            out.append(event)
        # Stale entries at or below last_seq (from a history reply) go too.
        for seq in [s for s in self.buffer if s <= self.last_seq]:
            del self.buffer[seq]
        return out + self._catch_up(now)

    def _catch_up(self, now: float) -> list:
        """Fetch the next part of a gap, up to the first event held (or, with
        none held, up to the newest seq announced); one fetch at a time."""
        until = min(self.buffer) - 1 if self.buffer else self.announced_seq
        if until <= self.last_seq or self.fetch_sent_at is not None:
            return []
        self.fetch_sent_at = now
        return [m.Fetch(self.last_seq, until, stream=self.id)]
