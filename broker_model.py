"""The broker's tables: users, their connections, rooms, and rate limits.

Plain data with the little logic that belongs to each record (a token
bucket's arithmetic, a room's public view). BrokerCore (broker_core.py,
with broker_presence.py and broker_backplane.py) owns every instance and
keeps them consistent; nothing here touches a socket, a clock or another
table.
"""

from __future__ import annotations

import bisect
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
    # With a backplane: the welcome that took this session over from
    # another broker (a new connection here, though ``resumed``), so that
    # it is undone like a new one if the pass cannot be stored.
    adopted: object = None

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
    # (name key, name) of each member, sorted: ``who`` pages through it
    listed: list = field(default_factory=list)
    sessions: int = 0  # every session in it, quiet ones too
    # With a backplane: everyone in it on any broker (name key -> name), as
    # its shared presence says, and the same as sorted (name key, name)
    # pairs for ``who``; None with one broker (``members`` and ``listed``).
    everyone: dict | None = None
    everyone_listed: list | None = None
    # Changes not announced yet (one presence event per pass): name key ->
    # (name, whether the user was in the room before them, leave reason or
    # None if the latest change was a join).
    pending: dict = field(default_factory=dict)
    counting: bool = False  # too big: its count is published, not each change
    count_published: int = -1  # the count last published (counting rooms)
    count_published_at: float = float("-inf")  # and when (monotonic)

    def add_member(self, name_key: str, name: str) -> bool:
        """One more visible session of a user; True if the user was not in."""
        shown, count = self.members.get(name_key, (name, 0))
        self.members[name_key] = (shown, count + 1)
        if count == 0:
            bisect.insort(self.listed, (name_key, shown))
            self._note(name_key, shown, None)
        return count == 0

    def remove_member(self, name_key: str, reason: str | None) -> bool:
        """One visible session of a user fewer; True if the user is out now.
        ``reason`` None: the change is not to be announced (an undone entry)."""
        name, count = self.members[name_key]
        if count > 1:
            self.members[name_key] = (name, count - 1)
            return False
        del self.members[name_key]
        del self.listed[bisect.bisect_left(self.listed, (name_key, name))]
        if reason is not None:
            self._note(name_key, name, reason)
        else:
            self.pending.pop(name_key, None)
        return True

    def _note(self, name_key: str, name: str, reason: str | None) -> None:
        before = self.pending.get(name_key)
        was_in = reason is not None if before is None else before[1]
        self.pending[name_key] = (name, was_in, reason)

    def take_changes(self) -> tuple[list[str], list[list[str]]]:
        """The net changes since the last call: who joined, who left (with why)."""
        pending, self.pending = self.pending, {}
        joined: list[str] = []
        left: list[list[str]] = []
        for name_key, (name, was_in, reason) in pending.items():
            is_in = name_key in self.members
            if is_in and not was_in:
                joined.append(name)
            elif was_in and not is_in:
                left.append([name, reason])
        return joined, left

    def info(self, seq: int | None = None) -> m.Room:
        """The room as its members see it (at position ``seq``, if given)."""
        return m.Room(self.name, self.stream.seq if seq is None else seq, self.topic,
                      self.count())

    def count(self) -> int:
        """People in it: on every broker with a backplane, else here."""
        return len(self.members if self.everyone is None else self.everyone)

    def who_listed(self) -> list:
        """(name key, name) of everyone in it, sorted: what ``who`` pages."""
        return self.listed if self.everyone_listed is None else self.everyone_listed

    def share(self, everyone: dict[str, str]) -> None:
        """With a backplane: everyone in it on any broker, as Redis says."""
        self.everyone = dict(everyone)
        self.everyone_listed = sorted(self.everyone.items())

    def shared_in(self, name_key: str, name: str) -> None:
        """With a backplane: ``name`` is in it on some broker now."""
        if name_key not in self.everyone:
            self.everyone[name_key] = name
            bisect.insort(self.everyone_listed, (name_key, name))

    def shared_out(self, name_key: str) -> None:
        """With a backplane: ``name_key`` is in it on no broker now."""
        name = self.everyone.pop(name_key, None)
        if name is not None:
            del self.everyone_listed[bisect.bisect_left(self.everyone_listed, (name_key, name))]
