"""The broker's tables: users, their connections, rooms, and rate limits.

Plain data with the little logic that belongs to each record (a token
bucket's arithmetic, a room's public view). BrokerCore (broker_core.py)
owns every instance and keeps them consistent; nothing here touches a
socket, a clock or another table.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import messages as m
from broker_stream import Stream

# Shortest wait asked of a rate-limited client, so it does not spin.
MIN_RETRY_AFTER = 0.1


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


@dataclass(eq=False, slots=True)
class User:
    """A name in use: its connections, its rate limit, its direct messages."""

    name: str
    name_key: str
    # Proves a further connection is the same person (None: no proof
    # offered, so the name takes one connection only).
    secret: str | None
    # One bucket for all of a user's connections: more connections must
    # not mean a higher rate.
    bucket: TokenBucket
    sessions: list = field(default_factory=list)
    visible: int = 0  # sessions that are not quiet: online while > 0


@dataclass(eq=False, slots=True)
class Session:
    """One connection of a user."""

    user: User
    peer: bytes
    secret: str  # the session token of the welcome; proves a request is the owner's
    last_seen: float  # monotonic
    quiet: bool = False
    rooms: dict = field(default_factory=dict)  # room key -> Room, in joining order
    refusals: int = 0  # rate refusals since the last accepted message
    # The first message refused for rate. Every later message is refused
    # until this one is sent again, so a client's messages keep their order
    # however late it learns of the refusal.
    blocked_on: str | None = None

    @property
    def name(self) -> str:
        return self.user.name


@dataclass(eq=False)
class Room:
    """A room: its stream, topic and who is in it."""

    name: str  # as it was created
    stream: Stream
    topic: str = ""
    # name key -> (name, visible sessions of that user in the room)
    members: dict = field(default_factory=dict)
    sessions: int = 0  # every session in it, quiet ones too
    # With a backplane: everyone in it on any broker (name key -> name), as
    # its shared joins and leaves say; None with one broker (``members``).
    everyone: dict | None = None

    def info(self, seq: int | None = None) -> m.Room:
        """The room as its members see it (at position ``seq``, if given)."""
        return m.Room(self.name, self.stream.seq if seq is None else seq, self.topic,
                      len(self.members if self.everyone is None else self.everyone))

    def member_names(self) -> list[str]:
        """Everyone in it, in order of their name keys."""
        if self.everyone is not None:
            return [name for _, name in sorted(self.everyone.items())]
        return [name for _, (name, _) in sorted(self.members.items())]
