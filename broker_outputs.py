"""What BrokerCore gives back: the outputs the shell carries out, in order,
and the causes of the warnings it logs.

Every method of the broker's core (broker_core.py and the parts it is made
of, broker_presence.py and broker_backplane.py) returns a list of Persist,
Publish and Reply (with a backplane, sometimes one Follow instead, or a
FindSession); the shell (broker.py, backplane.py) writes, publishes and
sends them, follows the streams and looks the sessions up. Nothing here does I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import messages as m
from log_limit import Cause

# Longest string from a peer quoted in a log line.
LOG_QUOTE_CHARS = 80
# Warnings a peer can repeat at will: each is logged once per peer and
# interval, then summed up (log_limit.py), so that no flood floods the log.
REFUSED = Cause("refused from {peer}: {detail}",
                "refused {count} more requests from {peer} in the last {seconds} s")
NO_TOKEN = Cause("request for {detail} without its session token from {peer}",
                 "{count} more requests without their session token from {peer} "
                 "in the last {seconds} s")
RATE_LIMITED = Cause("rate limited {peer} for {detail}",
                     "rate limited {peer} {count} more times in the last {seconds} s")
KICKED = Cause("disconnecting {peer}: {detail}",
               "disconnected {peer} {count} more times for flooding in the last {seconds} s")
NOT_STORED = Cause("could not store {detail}: messages, joins and topics refused",
                   "could not store the events of {count} more passes in the last {seconds} s")

# The outputs below are built for every message: plain slotted dataclasses,
# which cost a third of frozen ones to build (a frozen one sets each field
# through object.__setattr__). Nothing changes an output once returned.


@dataclass(slots=True)
class Reply:
    """Send ``message`` to the one peer with routing id ``peer``."""

    peer: bytes
    message: Any


@dataclass(slots=True)
class Publish:
    """Broadcast ``event`` on the PUB socket under ``topic``."""

    event: Any
    topic: bytes


@dataclass(slots=True)
class Persist:
    """Write a new sequenced event of stream ``stream`` to durable storage.

    Comes before the Publish, the Ack and the direct deliveries of the same
    event: the shell writes everything to persist before it sends anything,
    so no client hears of an event that a crash could still lose.
    ``sender_id`` is the sender's (name key, message id) of a chat message,
    so a restarted broker still recognises a resend; ``previous_topic``, of
    a Topic event, is the topic it replaced, restored if the write fails.
    """

    stream: str
    event: Any
    sender_id: tuple[str, str] | None = None
    previous_topic: str | None = None


@dataclass(frozen=True, slots=True)
class Follow:
    """With a backplane: the request needs these streams here (a room it
    enters, the user's direct messages), which this broker does not follow
    yet. Returned alone, with nothing changed: the shell starts following
    them (subscribe, then load from Redis) and hands the request in again."""

    streams: tuple[str, ...]


@dataclass(slots=True)
class FindSession:
    """With a backplane: ``peer``'s hello carries a resume token this broker
    does not know, perhaps of a session on another broker (one that died):
    the shell reads that session's record from Redis and gives it to the
    core's ``session_found``, whose outputs take this one's place (or, if
    they are one Follow, which the shell follows before it gives the same
    record to ``session_found`` again)."""

    peer: bytes
    hello: Any
    client_key: str | None = None


def unavailable(id: str | None, retry_after: float, what: str = "store this") -> m.Error:
    """The refusal of what the broker cannot store (or look up) now."""
    return m.Error(m.ErrorCode.UNAVAILABLE, f"the broker cannot {what} now; try again later",
                   id, retry_after)


def with_message(item: Reply | Publish, message: Any) -> Reply | Publish:
    """``item`` carrying ``message`` instead (a reply's message, a publish's event)."""
    if isinstance(item, Reply):
        return replace(item, message=message)
    return replace(item, event=message)
