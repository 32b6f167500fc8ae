"""Warnings that cannot flood the log: one summary per cause and peer per interval.

A peer that sends garbage, never reads its replies or keeps sending too fast
would otherwise write a log line per frame: thousands a second, which fill
the disk and bury everything else. A LogLimiter logs the first occurrence of
each cause for each peer at once, counts the repeats, and at the end of the
interval writes one summary for each peer that repeated:

    dropped 1,582 more replies to peer 00a1b2c3 in the last 10 s

Only the first few peers of a cause get lines of their own in an interval;
the rest are counted together ("... to 57 other peers"), so that an attack
from thousands of connections costs a few lines too. At most, per cause and
interval: PEERS_NAMED first lines, PEERS_NAMED summaries and one summary of
the others.

Sans-IO like the broker's core: the caller passes the monotonic time, and
calls ``flush(now)`` regularly (the broker does so on every loop pass) so
that a summary is not held back until the next repeat.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

# Length of one counting interval, in seconds.
INTERVAL_S = 10.0
# Peers of one cause named in an interval; the others are counted together.
PEERS_NAMED = 3


@dataclass(frozen=True)
class Cause:
    """A kind of repeated warning: ``first`` is logged with ``{peer}`` and
    ``{detail}``; ``summary`` with ``{count}``, ``{peer}`` and ``{seconds}``."""

    first: str
    summary: str


class LogLimiter:
    """Logs through ``logger`` at ``level``, at most a few lines per cause
    and interval whatever the number of repeats or of peers."""

    def __init__(self, logger: logging.Logger, interval: float = INTERVAL_S,
                 level: int = logging.WARNING):
        self.logger = logger
        self.interval = interval
        self.level = level
        self.interval_ends: float | None = None
        # cause -> peer named -> repeats not logged yet
        self.repeats: dict[Cause, dict[str, int]] = {}
        # cause -> (occurrences from peers not named, those peers)
        self.others: dict[Cause, tuple[int, set[str]]] = {}

    def warn(self, cause: Cause, peer: str, detail: str, now: float) -> None:
        """One occurrence of ``cause`` for ``peer`` at monotonic ``now``."""
        self.flush(now)
        if self.interval_ends is None:
            self.interval_ends = now + self.interval
        named = self.repeats.setdefault(cause, {})
        if peer in named:
            named[peer] += 1
        elif len(named) < PEERS_NAMED:
            named[peer] = 0
            self.logger.log(self.level, cause.first.format(peer=peer, detail=detail))
        else:
            count, peers = self.others.get(cause, (0, set()))
            if len(peers) < 100_000:  # bounded, whatever the number of peers
                peers.add(peer)
            self.others[cause] = (count + 1, peers)

    def flush(self, now: float) -> None:
        """At the end of an interval: one summary per peer that repeated."""
        if self.interval_ends is None or now < self.interval_ends:
            return
        seconds = f"{self.interval:g}"
        for cause, named in self.repeats.items():
            for peer, count in named.items():
                if count:
                    self.logger.log(self.level, cause.summary.format(
                        count=f"{count:,}", peer=peer, seconds=seconds))
        for cause, (count, peers) in self.others.items():
            self.logger.log(self.level, cause.summary.format(
                count=f"{count:,}", peer=f"{len(peers):,} other peers", seconds=seconds))
        self.repeats.clear()
        self.others.clear()
        self.interval_ends = None


class Outage:
    """A resource the broker depends on (the disk, Redis) that may fail on
    every use for a while: logged once when it starts failing and once when
    it works again, however many uses fail in between."""

    def __init__(self, log: logging.Logger, failing: str, recovered: str):
        self.log, self.failing_text, self.recovered_text = log, failing, recovered
        self.failing = False  # the last use failed

    def failed(self, error: Exception) -> None:
        if not self.failing:
            self.log.error(self.failing_text, error)
        self.failing = True

    def worked(self) -> None:
        if self.failing:
            self.log.warning(self.recovered_text)
        self.failing = False
