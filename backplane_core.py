"""The backplane's ordering, with no I/O: shared events back in seq order.

With ``--backplane`` several brokers share every stream through Redis
(backplane.py): Redis numbers each new event and notifies the brokers that
follow the stream, and each hands the notified events to its BrokerCore, which publishes or
delivers them. Notifications come in the order Redis ran its scripts, but a
lost subscription (a reconnect) or a late start leaves holes. ``Follower``
puts a stream's events back in order: it passes each on exactly once, in
seq order, holds those that arrive ahead of a hole, and says which holes
to repair from the Redis Stream (``Repair``), once each until filled.

A shared event here is ``Shared(stream, event, sender_id)``: the sequenced
event with its seq, and the (name key, message id) of a chat message, so
that every broker remembers the message ids accepted in the stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import messages as m

# Events held ahead of a hole, per stream, before the follower stops
# holding more and relies on the repair alone: a hole is filled within a
# round trip to Redis, so a few thousand is far more than a burst.
MAX_HELD_PER_STREAM = 10_000


@dataclass(frozen=True, slots=True)
class Shared:
    """One event of a shared stream, numbered by Redis."""

    stream: str
    event: Any
    sender_id: tuple[str, str] | None = None


@dataclass(frozen=True, slots=True)
class Repair:
    """Read the events ``after < seq <= until`` of ``stream`` from Redis."""

    stream: str
    after: int
    until: int


class Follower:
    """Every shared stream's position on this broker, and what waits for a hole."""

    def __init__(self) -> None:
        self.last: dict[str, int] = {}  # stream -> last seq passed on
        self.held: dict[str, dict[int, Shared]] = {}  # stream -> seq -> held event
        self.asked: dict[str, int] = {}  # stream -> highest seq a Repair asked for

    def start_at(self, stream: str, seq: int) -> None:
        """``stream`` is known up to ``seq`` (loaded from Redis)."""
        self.last[stream] = max(self.last.get(stream, 0), seq)

    def restart(self, stream: str, seq: int) -> None:
        """``stream`` is followed again from ``seq`` (loaded from Redis now)."""
        self.forget(stream)
        self.last[stream] = seq

    def forget(self, stream: str) -> None:
        """``stream`` is no longer followed here."""
        self.last.pop(stream, None)
        self.held.pop(stream, None)
        self.asked.pop(stream, None)

    def jump_to(self, stream: str, seq: int) -> None:
        """The events of ``stream`` before ``seq`` are gone from Redis (its
        history was trimmed past them): the next one to pass on is ``seq``."""
        self.last[stream] = max(self.last.get(stream, 0), seq - 1)

    def position(self, stream: str) -> int:
        return self.last.get(stream, 0)

    def receive(self, shared: Shared) -> tuple[list[Shared], list[Repair]]:
        """What to pass on now, in order, and the holes to repair."""
        stream, seq = shared.stream, shared.event.seq
        last = self.last.get(stream, 0)
        if seq <= last:
            return [], []  # had it already (a repair and a notification crossed)
        if seq > last + 1:
            held = self.held.setdefault(stream, {})
            if len(held) < MAX_HELD_PER_STREAM:
                held[seq] = shared
            return [], self._repair(stream, last, min(held, default=seq) - 1)
        ready = [shared]
        self.last[stream] = seq
        held = self.held.get(stream)
        while held and (following := held.pop(self.last[stream] + 1, None)) is not None:
            ready.append(following)
            self.last[stream] += 1
        if held is not None:
            for stale in [s for s in held if s <= self.last[stream]]:
                del held[stale]
            if not held:
                del self.held[stream]
        if held:  # a hole further on, behind what was held
            return ready, self._repair(stream, self.last[stream], min(held) - 1)
        return ready, []

    def behind(self, stream: str, seq: int) -> list[Repair]:
        """Redis says ``stream`` reached ``seq``: repair what is missing."""
        last = self.last.get(stream, 0)
        return self._repair(stream, last, seq) if seq > last else []

    def repaired(self, stream: str) -> None:
        """A repair of ``stream`` was read (whatever it brought): a hole still
        open may be asked for again."""
        self.asked.pop(stream, None)

    def _repair(self, stream: str, after: int, until: int) -> list[Repair]:
        if self.asked.get(stream, 0) >= until:
            return []
        self.asked[stream] = until
        return [Repair(stream, after, until)]


def stream_is_room(stream: str) -> bool:
    return not stream.startswith(m.DM_STREAM_PREFIX)
