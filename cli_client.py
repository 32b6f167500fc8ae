"""zchat from the command line: send, listen, list users, or chat in a terminal.

    python cli_client.py send [TEXT ...]       (no TEXT: one message per stdin line)
    python cli_client.py listen [--json] [--count N]
    python cli_client.py users [--json]
    python cli_client.py                       (a terminal on stdin: interactive chat)

Data goes to stdout, one flushed line per record; diagnostics go to stderr.
The connection logic lives in client_session.py, shared with the window.
"""

from __future__ import annotations

import argparse
import json
import queue
import signal
import sys
import threading
import time

import keys
import messages as m
from client_session import (Acked, ClientSession, Earlier, Joined, JoinRefused, Missed, Refused,
                            State, StateChanged, add_connection_arguments, encryption_from_args,
                            list_users, login_name)
from display import event_json, event_line, visible


class Exit:
    """Exit statuses, one per cause (also in --help and README.md)."""

    OK = 0
    FAILED = 1  # unexpected failure
    USAGE = 2
    UNREACHABLE = 3  # broker unreachable, or messages not accepted within --timeout
    NAME_REFUSED = 4  # name taken, invalid, or broker full
    MESSAGE_REFUSED = 5  # the broker refused at least one message
    INTERRUPTED = 130  # Ctrl-C


EXIT_HELP = """exit status:
  0    success (send: the broker accepted every message)
  2    bad usage
  3    broker unreachable, or messages not accepted within --timeout
  4    name taken or invalid, or the broker is full
  5    the broker refused a message (the line and reason are on stderr)
  130  interrupted (Ctrl-C); the broker is told you left
environment: CHAT_HOST, CHAT_PORT, CHAT_NAME give the defaults of --host, --port, --name."""


class CliError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    common = argparse.ArgumentParser(add_help=False)
    add_connection_arguments(common)
    common.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS",
                        help="seconds to reach the broker and have messages accepted (default 5)")
    p = argparse.ArgumentParser(
        description="zchat command-line client.", parents=[common], epilog=EXIT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command")
    send = sub.add_parser("send", parents=[common], help="send TEXT, or each line of stdin",
                          epilog=EXIT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    send.add_argument("text", nargs="*", help="words sent as one message")
    listen = sub.add_parser("listen", parents=[common], help="print messages as they arrive",
                            epilog=EXIT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    listen.add_argument("--json", action="store_true", help="one JSON object per line")
    listen.add_argument("--count", type=int, metavar="N", help="exit after N chat messages")
    listen.add_argument("--history", type=int, default=0, metavar="N",
                        help=f"first print the last N earlier messages (at most {m.MAX_FETCH_EVENTS};"
                             ' --json marks them "history": true)')
    users = sub.add_parser("users", parents=[common], help="print who is online",
                           epilog=EXIT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    users.add_argument("--json", action="store_true", help="a JSON array of names")
    args = p.parse_args(argv)
    if args.name is None:
        args.name = login_name()
    if args.command is None and not sys.stdin.isatty():
        p.error("no command given (use send, listen or users; chat needs a terminal)")
    if args.timeout <= 0:
        p.error("--timeout must be positive")
    if getattr(args, "count", None) is not None and args.count < 1:
        p.error("--count must be at least 1")
    if not 0 <= getattr(args, "history", 0) <= m.MAX_FETCH_EVENTS:
        p.error(f"--history must be 0 to {m.MAX_FETCH_EVENTS}")
    return args


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
            raise CliError(Exit.NAME_REFUSED, f"cannot join as {session.name}: {event.reason}")
    hint = " or wrong --server-key" if session.encryption else ""
    raise CliError(Exit.UNREACHABLE, f"broker at {session.address} unreachable{hint} "
                                     f"(no answer within {timeout:g}s)")


# --- send -------------------------------------------------------------------------


def stdin_lines():
    """Lines of stdin as they come, without their newline; a last line
    without newline counts too."""
    for line in sys.stdin:
        yield line.rstrip("\r\n")


def run_send(session: ClientSession, args: argparse.Namespace) -> int:
    join(session, args.timeout)
    lines = [" ".join(args.text)] if args.text else stdin_lines()
    line_of: dict[str, int] = {}
    refused = 0
    for number, text in enumerate(lines, 1):
        if not text.strip():
            continue
        line_of[session.send(text)] = number
    # Wait until every message is acknowledged or refused; the deadline
    # moves with each answer, so a long pipe is not cut off while it flows.
    deadline = time.monotonic() + args.timeout
    while line_of:
        event = next_event(session, max(0.0, deadline - time.monotonic()))
        if event is None:
            raise CliError(Exit.UNREACHABLE, f"{len(line_of)} message(s) not accepted within "
                                             f"{args.timeout:g}s (broker at {session.address})")
        if isinstance(event, Acked) and event.id in line_of:
            del line_of[event.id]
            deadline = time.monotonic() + args.timeout
        elif isinstance(event, Refused) and event.id in line_of:
            number = line_of.pop(event.id)
            where = "message" if args.text else f"line {number}"
            err(f"{where} refused: {event.reason} ({event.code})")
            refused += 1
            deadline = time.monotonic() + args.timeout
    return Exit.MESSAGE_REFUSED if refused else Exit.OK


# --- listen -------------------------------------------------------------------------


def print_event(event, as_json: bool, earlier: bool = False) -> None:
    if as_json:
        record = event_json(event)
        if earlier:
            record["history"] = True
        out(json.dumps(record))
    else:
        out(event_line(event))


def report_status(event, as_json: bool) -> None:
    """Connection news and losses go to stderr (a gap also to --json stdout)."""
    if isinstance(event, StateChanged) and event.state == State.RECONNECTING:
        err(f"connection lost ({event.detail}); retrying in {event.retry_in:.1f}s")
    elif isinstance(event, Joined):  # the first welcome was taken by join()
        err("reconnected" + (" (the broker restarted)" if event.broker_restarted else ""))
    elif isinstance(event, Missed):
        if as_json:
            out(json.dumps({"type": "gap", "first": event.first, "last": event.last}))
        err(f"{event.count} message(s) were lost: no longer in the broker's history")


def run_listen(session: ClientSession, args: argparse.Namespace) -> int:
    join(session, args.timeout)
    seen = 0
    while args.count is None or seen < args.count:
        event = next_event(session, None)
        if isinstance(event, (m.Message, m.Join, m.Leave)):
            print_event(event, args.json)
            seen += isinstance(event, m.Message)
        elif isinstance(event, Earlier):
            for message in event.messages:
                print_event(message, args.json, earlier=True)
        elif isinstance(event, JoinRefused):
            # Our name was taken while we were away: nothing sensible to do.
            raise CliError(Exit.NAME_REFUSED, f"cannot rejoin as {session.name}: {event.reason}")
        else:
            report_status(event, args.json)
    return Exit.OK


# --- users ---------------------------------------------------------------------------


def run_users(args: argparse.Namespace) -> int:
    users = list_users(args.host, args.port, args.timeout, args.encryption)
    if users is None:
        raise CliError(Exit.UNREACHABLE, f"broker at {args.host}:{args.port} unreachable "
                                         f"(no answer within {args.timeout:g}s)")
    if args.json:
        out(json.dumps(users))
    else:
        for name in users:
            out(name)
    return Exit.OK


# --- interactive ----------------------------------------------------------------------


def run_chat(session: ClientSession, args: argparse.Namespace) -> int:
    joined = join(session, args.timeout)
    err(f"joined as {joined.name}; online: {', '.join(joined.users)}. "
        "Type a message and Enter; /users lists who is online; /quit or Ctrl-D leaves.")
    printer = threading.Thread(target=print_chat_events, args=(session,), daemon=True)
    printer.start()
    for line in stdin_lines():
        if line.strip() == "/quit":
            break
        if line.strip() == "/users":
            session.who()
        elif line.strip():
            session.send(line)
    return Exit.OK


def print_chat_events(session: ClientSession) -> None:
    while True:
        event = session.events.get()
        if isinstance(event, (m.Message, m.Join, m.Leave)):
            out(event_line(event))
        elif isinstance(event, m.Users):
            out("online: " + ", ".join(visible(u) for u in event.users))
        elif isinstance(event, Refused):
            err(f"not sent: {event.reason}")
        elif isinstance(event, JoinRefused):
            err(f"cannot rejoin: {event.reason}")
        else:
            report_status(event, False)


# --- main ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "users":
        runner = None
    else:
        runner = {"send": run_send, "listen": run_listen, None: run_chat}[args.command]
        problem = m.name_problem(args.name)
        if problem:
            err(f"invalid name {args.name!r}: {problem}")
            return Exit.NAME_REFUSED
    try:
        args.encryption = encryption_from_args(args)
    except keys.KeyFileError as e:
        err(str(e))
        return Exit.USAGE
    # A closed pipe on stdout (listen | head) must not print a traceback.
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    session = None
    try:
        if runner is None:
            return run_users(args)
        session = ClientSession(args.host, args.port, args.name, encryption=args.encryption,
                                recent=getattr(args, "history", 0)).start()
        return runner(session, args)
    except CliError as e:
        err(str(e))
        return e.status
    except KeyboardInterrupt:
        return Exit.INTERRUPTED
    finally:
        if session is not None:
            session.close()


if __name__ == "__main__":
    sys.exit(main())
