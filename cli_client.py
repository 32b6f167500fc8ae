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
The connection logic lives in client_session.py, shared with the window.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import queue
import signal
import socket
import sys
import threading
import time

import chat_commands
import identity
import keys
import messages as m
from client_session import (Acked, BrokerRefused, ClientSession, Earlier, Joined, JoinRefused,
                            Missed, Refused, RoomJoined, RoomParted, State, StateChanged,
                            add_connection_arguments, ask_broker, choose_brokers,
                            encryption_from_args, list_users, login_name)
from display import event_line, event_records, visible


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


# --- listen -------------------------------------------------------------------------


# What listen and the chat print as it happens.
SHOWN_EVENTS = (m.Message, m.Presence, m.Topic)


def print_event(event, as_json: bool, earlier: bool = False,
                unmarked_room: str | None = None) -> None:
    if as_json:
        for record in event_records(event):
            if earlier:
                record["history"] = True
            out(json.dumps(record))
    else:
        out(event_line(event, unmarked_room))


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


# --- interactive ----------------------------------------------------------------------

CHAT_HELP = "\n".join([chat_commands.HELP,
                       "  Alt+1..9 switches to the conversation with that number (/rooms "
                       "lists the rooms);",
                       "  Ctrl-C and Ctrl-D on an empty line leave too; up/down recall "
                       "earlier lines."])
# A mention on a terminal: bold yellow (never in a pipe, where escapes are noise).
MENTION_STYLE, PLAIN_STYLE = "\x1b[1;33m", "\x1b[0m"
BELL = "\a"


class ChatRooms:
    """The conversations of the terminal chat: the rooms it is in and the
    people it talks to (``@name``), in the order opened, and the current one,
    where typed lines go, and the broker's limit on a text (each welcome's
    max_text). Changed by the printer thread, read by the prompt."""

    def __init__(self, rooms: tuple[str, ...], max_text: int = m.DEFAULT_MAX_TEXT_BYTES):
        self.max_text = max_text  # an int: read and set whole, no lock needed
        self._lock = threading.Lock()
        self._open = list(rooms)
        self._current = self._open[-1] if self._open else None

    @property
    def current(self) -> str | None:
        with self._lock:
            return self._current

    def find(self, conversation: str) -> str | None:
        """The conversation as opened, or None."""
        with self._lock:
            return next((c for c in self._open if m.room_key(c) == m.room_key(conversation)),
                        None)

    def nth(self, number: int) -> str | None:
        """The conversation numbered ``number`` (from 1), or None."""
        with self._lock:
            return self._open[number - 1] if 0 < number <= len(self._open) else None

    def entered(self, conversation: str) -> None:
        """In ``conversation`` now (again): it becomes the current one."""
        known = self.find(conversation)
        with self._lock:
            if known is None:
                self._open.append(conversation)
            self._current = known or conversation

    def left(self, conversation: str) -> None:
        with self._lock:
            self._open = [c for c in self._open if m.room_key(c) != m.room_key(conversation)]
            if self._current is not None and m.room_key(self._current) == m.room_key(conversation):
                self._current = self._open[-1] if self._open else None


def is_direct(conversation: str | None) -> bool:
    return conversation is not None and conversation.startswith(m.DM_STREAM_PREFIX)


def run_chat(session: ClientSession, args: argparse.Namespace) -> int:
    """The terminal chat, on prompt_toolkit: the line being typed stays at
    the bottom, intact, while what arrives is printed above it."""
    joined = join(session, args.timeout)
    err(f"joined as {joined.name}; {joined.online} online (/users lists them). "
        "Type a message and Enter; /help lists the commands.")
    rooms = ChatRooms((m.GENERAL_ROOM,), joined.max_text)
    return asyncio.run(chat_loop(session, joined.name, rooms))


def prompt_text(rooms: ChatRooms) -> str:
    """``#general> ``: the conversation typed lines go to."""
    return f"{rooms.current or '(no room)'}> "


def switch_keys(rooms: ChatRooms):
    """Alt+1..9: the conversation with that number becomes the current one."""
    from prompt_toolkit.key_binding import KeyBindings

    bindings = KeyBindings()
    for number in range(1, 10):
        @bindings.add("escape", str(number))
        def _switch(event, number=number) -> None:
            if (conversation := rooms.nth(number)) is not None:
                rooms.entered(conversation)
                event.app.invalidate()  # the prompt names it
    return bindings


async def chat_loop(session: ClientSession, name: str, rooms: ChatRooms) -> int:
    # Imported here: only the interactive chat needs it, scripts start faster.
    from prompt_toolkit import PromptSession
    from prompt_toolkit.patch_stdout import patch_stdout

    # A signal ends the prompt by cancelling this task, so prompt_toolkit
    # restores the terminal before we leave.
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    stopped_by: list[int] = []

    def stop(status: int) -> None:
        stopped_by.append(status)
        task.cancel()

    for signum, status in STOP_STATUS.items():
        loop.add_signal_handler(signum, stop, status)
    # erase_when_done: the broker's echo shows the line
    prompt = PromptSession(lambda: prompt_text(rooms), erase_when_done=True,
                           key_bindings=switch_keys(rooms))
    sent: dict[str, str] = {}  # message id -> text, until acknowledged
    # raw: our highlighting reaches the terminal (others' text is made
    # safe by visible() before it is printed)
    styled = sys.stdout.isatty()
    try:
        with patch_stdout(raw=styled):
            printer = threading.Thread(target=print_chat_events,
                                       args=(session, sent, rooms, name, styled), daemon=True)
            printer.start()
            draft = ""  # a line not sent, offered again to edit
            while True:
                try:
                    line = await prompt.prompt_async(default=draft)
                except EOFError:  # Ctrl-D on an empty line
                    return Exit.OK
                except KeyboardInterrupt:  # Ctrl-C: the terminal sends it as a key
                    return Exit.INTERRUPTED
                done = chat_line(session, line, sent, rooms)
                if done == "/quit":
                    return Exit.OK
                draft = line if done == KEEP_THE_LINE else ""
    except asyncio.CancelledError:
        if not stopped_by:
            raise
        return stopped_by[0]
    finally:
        for signum in STOP_STATUS:
            loop.remove_signal_handler(signum)
        install_stop_handlers()


# chat_line's answer for a line not sent, to be edited: it goes back on the input line.
KEEP_THE_LINE = "keep the line"


def chat_line(session: ClientSession, line: str, sent: dict[str, str],
              rooms: ChatRooms) -> str | None:
    """Act on one typed line; returns the command it was, if any, or
    KEEP_THE_LINE. A line whose first non-blank character is / is a
    command, never sent."""
    try:
        what = chat_commands.parse(line)
    except chat_commands.CommandError as problem:
        err(str(problem))
        return None
    text = chat_commands.text_sent(what)
    if text is not None and (problem := chat_commands.too_long(text, rooms.max_text)):
        # Not sent to be refused and printed back whole: said now, kept.
        err(problem)
        return KEEP_THE_LINE
    if isinstance(what, chat_commands.Command):
        chat_command(session, what, sent, rooms)
        return what.name
    if what is not None:
        send_to(session, what, rooms.current, sent)
    return None


def send_to(session: ClientSession, text: str, conversation: str | None,
            sent: dict[str, str]) -> None:
    """``text`` to a room, or to a person (``@name``)."""
    if conversation is None:
        err("you are in no room: /join ROOM, or /msg NAME TEXT (not sent)")
    elif is_direct(conversation):
        sent[session.send(text, to=conversation[1:])] = text
    else:
        sent[session.send(text, room=conversation)] = text


def chat_command(session: ClientSession, command: chat_commands.Command, sent: dict[str, str],
                 rooms: ChatRooms) -> None:
    """One /command, its words checked by chat_commands.parse."""
    name, first, current = command.name, command.word(0), rooms.current
    if name == "/help":
        out("commands:\n" + CHAT_HELP)
    elif name == "/users":
        session.who(first)
    elif name == "/rooms":
        session.list_rooms()
    elif name in ("/join", "/switch"):
        if rooms.find(first):  # already in it: typing goes there now
            rooms.entered(rooms.find(first))
            out(f"* typing to {rooms.current}")
        elif name == "/join" and not is_direct(first):
            session.join_room(first)
        else:
            err(f"you are not in {visible(first)} (/join it, or /msg someone)")
    elif name == "/part":
        conversation = rooms.find(first or current or "")
        if conversation is None:
            err(f"you are not in {visible(first or 'any room')}")
        elif is_direct(conversation):  # a conversation with someone: closed here
            rooms.left(conversation)
            out(f"* typing to {rooms.current or 'no room'}")
        else:
            session.part_room(conversation)
    elif name == "/msg":
        if command.word(1):
            sent[session.send(command.word(1), to=first)] = command.word(1)
        else:  # a conversation with the person: what is typed goes to them
            rooms.entered(m.DM_STREAM_PREFIX + first)
            out(f"* typing to {first} alone")
    elif name == "/topic":
        if current is None or is_direct(current):
            err("not in a room: a topic is a room's")
        else:
            session.set_topic(current, command.rest)
    elif name == "/me":
        send_to(session, chat_commands.text_sent(command), current, sent)


def chat_event_line(event, name: str, current: str | None, styled: bool,
                    alerts: chat_commands.Alerts) -> str:
    """An event as the terminal chat prints it: a room other than the
    current one named; a mention highlighted, and a mention or a direct
    message to us ringing the bell once per burst, on a terminal only."""
    line = event_line(event, None if is_direct(current) else current)
    if not styled or not isinstance(event, m.Message) or event.sender == name:
        return line
    mentioned = chat_commands.mentions(name, event.text)
    if mentioned:
        line = MENTION_STYLE + line + PLAIN_STYLE
    if (mentioned or event.to is not None) and alerts.due():
        line = BELL + line
    return line


def print_chat_events(session: ClientSession, sent: dict[str, str], rooms: ChatRooms,
                      name: str, styled: bool) -> None:
    alerts = chat_commands.Alerts()
    while True:
        event = session.events.get()
        if isinstance(event, SHOWN_EVENTS):
            out(chat_event_line(event, name, rooms.current, styled, alerts))
        elif isinstance(event, m.Users):
            where = f"in {event.room}" if event.room else "online"
            out(f"{where} ({event.count}): " + ", ".join(visible(u) for u in event.users))
            if event.next is not None:  # one page of many: the next one follows
                session.who(event.room, after=event.next)
        elif isinstance(event, m.RoomList):
            out("\n".join(["rooms (people in each):", *(
                f"  {r.room} ({r.members})" + (f": {visible(r.topic)}" if r.topic else "")
                for r in event.rooms)]))
        elif isinstance(event, RoomJoined):
            rooms.entered(event.room.room)
            topic = f"; topic: {visible(event.room.topic)}" if event.room.topic else ""
            out(f"* typing to {event.room.room}{topic}")
        elif isinstance(event, RoomParted):
            rooms.left(event.room)
            out(f"* you left {event.room}; typing to {rooms.current or 'no room'}")
        elif isinstance(event, Acked):
            sent.pop(event.id, None)
        elif isinstance(event, Refused):
            err(f"not sent ({event.reason}): {visible(sent.pop(event.id, ''))}")
        elif isinstance(event, JoinRefused):
            err(f"cannot rejoin: {event.reason}")
        else:
            if isinstance(event, Joined):  # perhaps another broker, with another limit
                rooms.max_text = event.max_text
            report_status(event, False)


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
