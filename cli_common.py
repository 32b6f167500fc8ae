"""What every command of the command-line client shares: exit statuses, stopping
on SIGINT and SIGTERM as a goodbye, output lines (data on stdout, diagnostics
on stderr), waiting for the welcome or an answer, and the connection news
that ``listen`` and the terminal chat report."""


from __future__ import annotations

import contextlib
import json
import queue
import signal
import sys
import time

import messages as m
from client_session import (BrokerRefused, ClientSession, Joined, JoinRefused, Missed, State,
                            StateChanged)


class Exit:
    """Exit statuses, one per cause (also in --help and README.md)."""

    OK = 0
    FAILED = 1  # unexpected failure
    USAGE = 2
    UNREACHABLE = 3  # broker unreachable, or messages not accepted within --timeout
    NAME_REFUSED = 4  # name taken, invalid, or broker full
    MESSAGE_REFUSED = 5  # the broker refused a message or a request (a room, a topic)
    INTERRUPTED = 130  # SIGINT (Ctrl-C): 128 + 2, as shells report it
    TERMINATED = 143  # SIGTERM (kill, timeout, systemd): 128 + 15, as shells report it


class Stop(BaseException):
    """SIGINT or SIGTERM arrived: leave at once, as a goodbye.

    A BaseException, like KeyboardInterrupt, so no ``except Exception``
    swallows it."""

    def __init__(self, status: int):
        super().__init__(status)
        self.status = status


STOP_STATUS = {signal.SIGINT: Exit.INTERRUPTED, signal.SIGTERM: Exit.TERMINATED}


def raise_stop(signum: int, frame) -> None:
    raise Stop(STOP_STATUS[signum])


def install_stop_handlers() -> None:
    for signum in STOP_STATUS:
        signal.signal(signum, raise_stop)


@contextlib.contextmanager
def stop_deferred():
    """Hold back SIGINT and SIGTERM for a few statements that must not be
    cut in half (a message handed to the session and its record kept); a
    signal that arrived meanwhile is raised at the end."""
    arrived: list[int] = []
    for signum in STOP_STATUS:
        signal.signal(signum, lambda signum, frame: arrived.append(signum))
    try:
        yield
    finally:
        install_stop_handlers()
        if arrived:
            raise Stop(STOP_STATUS[arrived[0]])


class CliError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def out(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def err(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def next_event(session: ClientSession, timeout: float | None):
    try:
        return session.events.get(timeout=timeout)
    except queue.Empty:
        return None


def join(session: ClientSession, timeout: float) -> Joined:
    """Wait for the welcome; a refusal or silence becomes a CliError."""
    deadline = time.monotonic() + timeout
    while (remaining := deadline - time.monotonic()) > 0:
        event = next_event(session, remaining)
        if isinstance(event, Joined):
            return event
        if isinstance(event, JoinRefused):
            raise CliError(join_refused_status(event), f"cannot join as {session.name}: "
                                                       f"{event.reason}{refusal_hint(event)}")
    hint = " or wrong --server-key" if session.encryption else ""
    raise CliError(Exit.UNREACHABLE, f"broker at {session.address} unreachable{hint} "
                                     f"(no answer within {timeout:g}s; is broker.py running "
                                     "there, and is that its --port?)")


def refusal_hint(event: JoinRefused) -> str:
    """What to do about a refused name, where there is something to do."""
    if event.code == m.ErrorCode.NAME_TAKEN:
        return (" by someone with another secret (to be the same person on another machine, "
                "copy your ~/.config/zchat/secret there, or set ZCHAT_SECRET_FILE; "
                "otherwise choose another --name)")
    return ""


# Refusals of a hello that are about its rooms, not about the name.
ROOM_REFUSALS = {m.ErrorCode.ROOM_INVALID, m.ErrorCode.TOO_MANY_ROOMS}


def join_refused_status(event: JoinRefused) -> int:
    return Exit.MESSAGE_REFUSED if event.code in ROOM_REFUSALS else Exit.NAME_REFUSED


def await_answer(session: ClientSession, timeout: float, answers: tuple[type, ...]):
    """The first event of one of these types; silence for ``timeout`` is a CliError."""
    deadline = time.monotonic() + timeout
    while (remaining := deadline - time.monotonic()) > 0:
        event = next_event(session, remaining)
        if isinstance(event, answers):
            return event
    raise CliError(Exit.UNREACHABLE, f"no answer from the broker at {session.address} "
                                     f"within {timeout:g}s")


# --- listen -------------------------------------------------------------------------


# What listen and the chat print as it happens.
SHOWN_EVENTS = (m.Message, m.Presence, m.Topic)


def stream_name(stream: str) -> str:
    """A stream as people call it: a room, or their direct messages."""
    return "your direct messages" if stream.startswith(m.DM_STREAM_PREFIX) else stream


def report_status(event, as_json: bool) -> None:
    """Connection news and losses go to stderr (a gap also to --json stdout)."""
    if isinstance(event, StateChanged) and event.state == State.RECONNECTING:
        err(f"connection lost ({event.detail}); retrying in {event.retry_in:.1f}s")
    elif isinstance(event, Joined):  # the first welcome was taken by join()
        if event.broker_restarted:
            err("reconnected (the broker restarted)")
        else:  # resumed: the broker (perhaps another of the chat) held the session
            err("reconnected (" + ("session resumed" if event.resumed else "a new session") + ")")
    elif isinstance(event, Missed):
        if as_json:
            out(json.dumps({"type": "gap", "first": event.first, "last": event.last,
                            "stream": event.stream}))
        err(f"{event.count} message(s) of {stream_name(event.stream)} were lost: no longer in "
            "the broker's history")
    elif isinstance(event, BrokerRefused):
        err(f"refused by the broker: {event.reason} ({event.code})")
