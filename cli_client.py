"""zchat from the command line: send, listen, list users and rooms, or chat in a terminal.

    python cli_client.py [OPTIONS] send [--room ROOM | --to NAME] [--announce] [TEXT ...]
    python cli_client.py [OPTIONS] listen [--room ROOM ...] [--dm] [--quiet] [--json] ...
    python cli_client.py [OPTIONS] users [--room ROOM] [--json]
    python cli_client.py [OPTIONS] rooms [--json]
    python cli_client.py [OPTIONS] topic ROOM [TEXT ...]
    python cli_client.py [OPTIONS]                   (a terminal on stdin: interactive chat)

Options mean the same before or after the command. Data goes to stdout, one
flushed line per record; diagnostics go to stderr. SIGINT and SIGTERM are a
goodbye: the broker is told at once (others see ``left (quit)``). ``send``
and ``topic`` connect quietly (never announced or listed); ``listen`` and
the chat are members others see. Every connection presents the user's
secret (identity.py), so one person may run several at once under one name.
The connection logic lives in client_session.py, shared with the window;
the terminal chat in terminal_chat.py; what the commands share (exit
statuses, signals, output, waiting for answers) in cli_common.py.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import socket
import sys
import time

import identity
import keys
import messages as m
from cli_common import (SHOWN_EVENTS, CliError, Exit, Stop, await_answer, err,
                        install_stop_handlers, join, join_refused_status, next_event, out,
                        report_status, stop_deferred)
from client_session import (Acked, BrokerRefused, ClientSession, Earlier, JoinRefused, Refused,
                            RoomJoined, add_connection_arguments, ask_broker, choose_brokers,
                            encryption_from_args, list_users, login_name)
from display import event_line, event_records, visible
from terminal_chat import run_chat

EXIT_HELP = """exit status:
  0    success (send: the broker accepted every message)
  2    bad usage (also a port outside 1..65535 or a host that does not resolve)
  3    broker unreachable, or messages not accepted within --timeout
  4    name taken (by someone with another secret) or invalid, or the broker is full
  5    the broker refused a message or request (user not online, a room it will not
       let you in, a topic too long...); the line and reason are on stderr
  130  interrupted (Ctrl-C, SIGINT); the broker is told you left
  143  terminated (SIGTERM); the broker is told you left
send, interrupted or timed out while reading stdin, says on stderr how many lines
were accepted and the first line that was not, so a script can resume there.
A room name that is not valid ('#' and 1 to 32 of letters, digits, _ - .) is bad
usage (2), checked before connecting.
environment: CHAT_HOST, CHAT_PORT, CHAT_PUB_PORT, CHAT_NAME give the defaults of
--host, --port, --pub-port, --name. Your secret, which lets several connections
use your name at once, is kept in $XDG_CONFIG_HOME/zchat/secret (default
~/.config/zchat/secret), or the file ZCHAT_SECRET_FILE names."""

USAGE = """%(prog)s [OPTIONS]                  chat interactively (needs a terminal on stdin)
       %(prog)s [OPTIONS] send [--room ROOM | --to NAME] [--announce] [TEXT ...]
       %(prog)s [OPTIONS] listen [--room ROOM ...] [--dm] [--quiet] [--json] [--count N]
                                 [--history N]
       %(prog)s [OPTIONS] users [--room ROOM] [--json]
       %(prog)s [OPTIONS] rooms [--json]
       %(prog)s [OPTIONS] topic ROOM [TEXT ...]
       (OPTIONS may stand before or after the command)"""

DESCRIPTION = """zchat command-line client. With no command and a terminal on stdin it is
an interactive chat: messages appear above the line you type, which has line
editing and history (up/down); /help lists the chat's commands."""


class _OptionalEverywhere(argparse.ArgumentParser):
    """The common options as a subcommand sees them: with no default at all,
    so one left out after the command does not reset what was given before
    it (argparse copies every subcommand attribute over the top level's)."""

    def add_argument(self, *args, **kwargs):
        kwargs["default"] = argparse.SUPPRESS
        return super().add_argument(*args, **kwargs)


def common_options(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    add_connection_arguments(parser)
    parser.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS",
                        help="seconds to reach the broker and have messages accepted (default 5)")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Options, each meaning the same before or after the command."""
    before = common_options(argparse.ArgumentParser(add_help=False))
    after = common_options(_OptionalEverywhere(add_help=False))
    p = argparse.ArgumentParser(
        usage=USAGE, description=DESCRIPTION, parents=[before], epilog=EXIT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", title="commands", metavar="COMMAND", prog=p.prog)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[after], help=help, epilog=EXIT_HELP,
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    send = command("send", "send TEXT, or each line of stdin (quietly: no join or leave shown)")
    target = send.add_mutually_exclusive_group()
    target.add_argument("--room", type=room_name, default=m.GENERAL_ROOM,
                        help=f"the room to send to (default {m.GENERAL_ROOM})")
    target.add_argument("--to", metavar="NAME", type=user_name,
                        help="send a direct message to NAME, who must be online")
    send.add_argument("--announce", action="store_true",
                      help="show as joining and leaving, and as online meanwhile")
    send.add_argument("text", nargs="*", help="words sent as one message")
    listen = command("listen", "print messages as they arrive")
    listen.add_argument("--room", type=room_name, action="append", dest="rooms",
                        metavar="ROOM", help=f"a room to follow; repeat for several (default "
                                             f"{m.GENERAL_ROOM}, or none with --dm)")
    listen.add_argument("--dm", action="store_true",
                        help="your direct messages only (they are printed with rooms too)")
    listen.add_argument("--quiet", action="store_true",
                        help="do not show as online or joining and leaving (then the broker "
                             "sends you no direct messages)")
    listen.add_argument("--json", action="store_true", help="one JSON object per line")
    listen.add_argument("--count", type=int, metavar="N", help="exit after N chat messages")
    listen.add_argument("--history", type=int, default=0, metavar="N",
                        help=f"first print the last N earlier messages of each room (at most "
                             f'{m.MAX_FETCH_EVENTS}; --json marks them "history": true)')
    users = command("users", "print who is online")
    users.add_argument("--room", type=room_name, help="who is in ROOM")
    users.add_argument("--json", action="store_true", help="a JSON array of names")
    rooms = command("rooms", "print the rooms, with how many are in each and its topic")
    rooms.add_argument("--json", action="store_true", help="a JSON array of rooms")
    topic = command("topic", "set a room's topic (quietly)")
    topic.add_argument("room", type=room_name, help="the room")
    topic.add_argument("text", nargs="*", help="the new topic (none: clear it)")
    args = p.parse_args(argv)
    if args.name is None:
        args.name = login_name()
    if args.command is None and not sys.stdin.isatty():
        p.error("no command given (use send, listen or users; chat needs a terminal)")
    if args.timeout <= 0:
        p.error("--timeout must be positive")
    if getattr(args, "quiet", False) and args.dm:
        # The broker gives direct messages only to connections others can see.
        p.error("--dm and --quiet: a quiet connection receives no direct messages")
    if getattr(args, "count", None) is not None and args.count < 1:
        p.error("--count must be at least 1")
    if not 0 <= getattr(args, "history", 0) <= m.MAX_FETCH_EVENTS:
        p.error(f"--history must be 0 to {m.MAX_FETCH_EVENTS}")
    for broker in choose_brokers(args):
        try:  # a typo in the host is bad usage, not an unreachable broker
            socket.getaddrinfo(broker.host, broker.port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as e:
            p.error(f"--host {broker.host!r} does not resolve: {getattr(e, 'strerror', e)}")
    return args


def room_name(text: str) -> str:
    """An argparse type: a valid room name (checked here, not by the broker)."""
    problem = m.room_problem(text)
    if problem:
        # an unquoted '#' starts a shell comment, so '#ci' often arrives as 'ci'
        hint = f" (did you mean '#{text}'? quote it: a bare # starts a shell comment)" \
            if m.room_problem("#" + text) is None else ""
        raise argparse.ArgumentTypeError(f"{text!r} is not a room name: {problem}{hint}")
    return text


def user_name(text: str) -> str:
    """An argparse type: a valid user name."""
    problem = m.name_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(f"{text!r} is not a user name: {problem}")
    return text


# --- send -------------------------------------------------------------------------

# Lines handed to the session and not yet answered. Bounded, so that after an
# interruption the answers still due are few and quickly in: the report then
# says exactly which lines were accepted. The broker's rate limit, not this
# window, is what paces a long pipe.
SEND_AHEAD = 64
# Progress on a terminal is redrawn at most this often.
PROGRESS_EVERY_S = 0.25


def stdin_lines():
    """Lines of stdin as they come, without their newline; a last line
    without newline counts too."""
    for line in sys.stdin:
        yield line.rstrip("\r\n")


class SendTally:
    """What became of each line sent: the figures for progress and resuming."""

    def __init__(self, session: ClientSession, timeout: float, from_stdin: bool,
                 show_progress: bool, room: str | None = None, to: str | None = None):
        self.session = session
        self.target = {"room": room, "to": to}  # where every line goes
        self.timeout = timeout
        self.from_stdin = from_stdin
        self.show_progress = show_progress
        self.pending: dict[str, int] = {}  # message id -> line number, in the order sent
        self.handed = 0  # every line up to this one is sent, or blank and skipped
        self.accepted = 0
        self.refused = 0
        self.started = time.monotonic()
        self.progress_shown_at = 0.0
        self.progress_on_screen = False

    def send(self, number: int, text: str) -> None:
        """Hand line ``number`` to the session, once there is room for it."""
        self.await_answers(lambda: len(self.pending) < SEND_AHEAD)
        with stop_deferred():  # the session has it if and only if we know so
            if text.strip():
                self.pending[self.session.send(text, **self.target)] = number
            self.handed = number

    def await_answers(self, enough, patient: bool = False) -> None:
        """Take the session's answers until ``enough()``. Silence for
        --timeout is a CliError, or with ``patient`` just the end of waiting."""
        self.take(next_event(self.session, 0))  # keep progress current when not waiting
        deadline = time.monotonic() + self.timeout
        while not enough():
            event = next_event(self.session, max(0.0, deadline - time.monotonic()))
            if event is None:
                if patient:
                    return
                raise CliError(Exit.UNREACHABLE, f"{len(self.pending)} message(s) not accepted "
                                                 f"within {self.timeout:g}s (broker at "
                                                 f"{self.session.address})")
            if self.take(event):  # the deadline moves with each answer
                deadline = time.monotonic() + self.timeout

    def take(self, event) -> bool:
        """Count an answer to one of our lines; True if ``event`` was one."""
        if isinstance(event, Acked) and event.id in self.pending:
            del self.pending[event.id]
            self.accepted += 1
        elif isinstance(event, Refused) and event.id in self.pending:
            number = self.pending.pop(event.id)
            self.say(f"{f'line {number}' if self.from_stdin else 'message'} refused: "
                     f"{event.reason} ({event.code})")
            self.refused += 1
        else:
            return False
        self.progress()
        return True

    def first_not_accepted(self) -> int:
        return next(iter(self.pending.values()), self.handed + 1)

    def progress(self) -> None:
        now = time.monotonic()
        if not self.show_progress or now - self.progress_shown_at < PROGRESS_EVERY_S:
            return
        self.progress_shown_at = now
        rate = self.accepted / max(now - self.started, 1e-3)
        sys.stderr.write(f"\r{self.accepted} accepted of {self.handed} lines read "
                         f"({rate:.0f}/s)\x1b[K")
        sys.stderr.flush()
        self.progress_on_screen = True

    def clear_progress(self) -> None:
        if self.progress_on_screen:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()
            self.progress_on_screen = False

    def say(self, line: str) -> None:
        """A line on stderr, in place of the progress line if one is shown."""
        self.clear_progress()
        err(line)

    def report_unfinished(self, why: str) -> None:
        """How far the send got, so a script can resume at the right line."""
        first = self.first_not_accepted()
        unanswered = (f"; lines {first} to {max(self.pending.values())} were sent but not "
                      "answered: the broker may have accepted some" if self.pending else "")
        self.say(f"{why}: {self.accepted} line(s) accepted; line {first} is the first not "
                 f"accepted (resume with: tail -n +{first}){unanswered}")

    def settle(self) -> None:
        """After an interruption: wait for the answers to the lines already
        sent, so the report is exact. The wait ends after --timeout without
        an answer, or at a second interruption."""
        if not self.pending:
            return
        self.say(f"interrupted: waiting for the broker's answer to the {len(self.pending)} "
                 "line(s) already sent (interrupt again to stop now)")
        with contextlib.suppress(Stop):
            self.await_answers(lambda: not self.pending, patient=True)


def run_send(session: ClientSession, args: argparse.Namespace) -> int:
    join(session, args.timeout)
    from_stdin = not args.text
    if from_stdin and sys.stdin.isatty():
        err("reading messages from the terminal, one per line; end with Ctrl-D")
    tally = SendTally(session, args.timeout, from_stdin,
                      show_progress=from_stdin and sys.stderr.isatty(),
                      room=None if args.to else args.room, to=args.to)
    lines = stdin_lines() if from_stdin else [" ".join(args.text)]
    try:
        for number, text in enumerate(lines, 1):
            tally.send(number, text)
        tally.await_answers(lambda: not tally.pending)
    except Stop:
        tally.settle()
        if from_stdin:
            tally.report_unfinished("interrupted")
        raise
    except CliError as e:
        if from_stdin:  # the cause first, then where to resume
            tally.say(str(e))
            tally.report_unfinished("stopped")
            raise CliError(e.status, "") from None
        raise
    finally:
        tally.clear_progress()
    return Exit.MESSAGE_REFUSED if tally.refused else Exit.OK


def print_event(event, as_json: bool, earlier: bool = False,
                unmarked_room: str | None = None) -> None:
    if as_json:
        for record in event_records(event):
            if earlier:
                record["history"] = True
            out(json.dumps(record))
    else:
        out(event_line(event, unmarked_room))


def listened_rooms(args: argparse.Namespace) -> tuple[str, ...]:
    """The rooms ``listen`` follows: those named, else #general (none with --dm).
    Direct messages come besides, unless --quiet."""
    if args.rooms:
        return tuple(args.rooms)
    return () if args.dm else (m.GENERAL_ROOM,)


def run_listen(session: ClientSession, args: argparse.Namespace) -> int:
    join(session, args.timeout)
    rooms = listened_rooms(args)
    unmarked = rooms[0] if len(rooms) == 1 else None  # one room: no need to name it
    seen = 0
    while args.count is None or seen < args.count:
        event = next_event(session, None)
        if isinstance(event, SHOWN_EVENTS):
            print_event(event, args.json, unmarked_room=unmarked)
            seen += isinstance(event, m.Message)
        elif isinstance(event, Earlier):
            for message in event.messages:
                print_event(message, args.json, earlier=True, unmarked_room=unmarked)
        elif isinstance(event, JoinRefused):
            # Our name was taken while we were away: nothing sensible to do.
            raise CliError(join_refused_status(event), f"cannot rejoin as {session.name}: "
                                                       f"{event.reason}")
        else:
            report_status(event, args.json)
    return Exit.OK


# --- users ---------------------------------------------------------------------------


def unreachable(args: argparse.Namespace) -> CliError:
    return CliError(Exit.UNREACHABLE, f"broker at {args.host}:{args.port} unreachable "
                                      f"(no answer within {args.timeout:g}s)")


def run_users(args: argparse.Namespace) -> int:
    users = list_users(args.host, args.port, args.timeout, args.encryption, room=args.room)
    if users is None:
        raise unreachable(args)
    if args.json:
        out(json.dumps(users))
    else:
        for name in users:
            out(name)
    return Exit.OK


# --- rooms and topics -------------------------------------------------------------------


def room_line(room: m.Room) -> str:
    """A room for people: name, how many are in it, topic; tab-separated."""
    return f"{room.room}\t{room.members}\t{visible(room.topic)}"


def run_rooms(args: argparse.Namespace) -> int:
    reply = ask_broker(args.host, args.port, m.ListRooms(), m.RoomList, args.timeout,
                       args.encryption)
    if reply is None:
        raise unreachable(args)
    if args.json:
        out(json.dumps([{"room": r.room, "members": r.members, "topic": r.topic}
                        for r in reply.rooms]))
    else:
        for room in reply.rooms:
            out(room_line(room))
    return Exit.OK


def run_topic(session: ClientSession, args: argparse.Namespace) -> int:
    join(session, args.timeout)
    session.set_topic(args.room, " ".join(args.text))
    answer = await_answer(session, args.timeout, (RoomJoined, BrokerRefused))
    if isinstance(answer, BrokerRefused):
        raise CliError(Exit.MESSAGE_REFUSED, f"topic not set: {answer.reason} ({answer.code})")
    return Exit.OK


# --- main ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    install_stop_handlers()
    try:
        return run(parse_args(argv))
    except Stop as stop:
        return stop.status


# Commands that need no join, and those that join (quietly or not).
ASKING = {"users": run_users, "rooms": run_rooms}
JOINING = {"send": run_send, "listen": run_listen, "topic": run_topic, None: run_chat}


def session_of(args: argparse.Namespace) -> ClientSession:
    """The connection a joining command needs: its rooms, quiet or not."""
    if args.command == "send":
        rooms, quiet = (() if args.to else (args.room,)), not args.announce
    elif args.command == "topic":
        rooms, quiet = (args.room,), True
    elif args.command == "listen":
        rooms, quiet = listened_rooms(args), args.quiet
    else:
        rooms, quiet = (m.GENERAL_ROOM,), False
    return ClientSession(args.host, args.port, args.name, pub_port=args.pub_port,
                         encryption=args.encryption, recent=getattr(args, "history", 0),
                         rooms=rooms, quiet=quiet, secret=identity.load_secret_or_none(err),
                         alternates=args.alternates)


def run(args: argparse.Namespace) -> int:
    if args.command not in ASKING:
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
        if args.command in ASKING:
            return ASKING[args.command](args)
        session = session_of(args).start()
        return JOINING[args.command](session, args)
    except CliError as e:
        if str(e):  # empty when the cause is already said
            err(str(e))
        return e.status
    finally:
        if session is not None:  # leaving says bye: the others see "quit" at once
            session.close()


if __name__ == "__main__":
    sys.exit(main())
