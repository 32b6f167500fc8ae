"""zchat from the command line: send, listen, list users, or chat in a terminal.

    python cli_client.py [OPTIONS] send [TEXT ...]   (no TEXT: one message per stdin line)
    python cli_client.py [OPTIONS] listen [--json] [--count N] [--history N]
    python cli_client.py [OPTIONS] users [--json]
    python cli_client.py [OPTIONS]                   (a terminal on stdin: interactive chat)

Options mean the same before or after the command. Data goes to stdout, one
flushed line per record; diagnostics go to stderr. SIGINT and SIGTERM are a
goodbye: the broker is told at once (others see ``left (quit)``). The
connection logic lives in client_session.py, shared with the window.
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
    INTERRUPTED = 130  # SIGINT (Ctrl-C): 128 + 2, as shells report it
    TERMINATED = 143  # SIGTERM (kill, timeout, systemd): 128 + 15, as shells report it


EXIT_HELP = """exit status:
  0    success (send: the broker accepted every message)
  2    bad usage (also a port outside 1..65535 or a host that does not resolve)
  3    broker unreachable, or messages not accepted within --timeout
  4    name taken or invalid, or the broker is full
  5    the broker refused a message (the line and reason are on stderr)
  130  interrupted (Ctrl-C, SIGINT); the broker is told you left
  143  terminated (SIGTERM); the broker is told you left
send, interrupted or timed out while reading stdin, says on stderr how many lines
were accepted and the first line that was not, so a script can resume there.
environment: CHAT_HOST, CHAT_PORT, CHAT_PUB_PORT, CHAT_NAME give the defaults of
--host, --port, --pub-port, --name."""

USAGE = """%(prog)s [OPTIONS]                  chat interactively (needs a terminal on stdin)
       %(prog)s [OPTIONS] send [TEXT ...]  send TEXT, or each line of stdin
       %(prog)s [OPTIONS] listen [--json] [--count N] [--history N]
       %(prog)s [OPTIONS] users [--json]
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

    send = command("send", "send TEXT, or each line of stdin")
    send.add_argument("text", nargs="*", help="words sent as one message")
    listen = command("listen", "print messages as they arrive")
    listen.add_argument("--json", action="store_true", help="one JSON object per line")
    listen.add_argument("--count", type=int, metavar="N", help="exit after N chat messages")
    listen.add_argument("--history", type=int, default=0, metavar="N",
                        help=f"first print the last N earlier messages (at most {m.MAX_FETCH_EVENTS};"
                             ' --json marks them "history": true)')
    users = command("users", "print who is online")
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
    try:  # a typo in the host is bad usage, not an unreachable broker
        socket.getaddrinfo(args.host, args.port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        p.error(f"--host {args.host!r} does not resolve: {getattr(e, 'strerror', e)}")
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
                 show_progress: bool):
        self.session = session
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
                self.pending[self.session.send(text)] = number
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
                      show_progress=from_stdin and sys.stderr.isatty())
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

CHAT_COMMANDS = {
    "/help": "list these commands",
    "/users": "list who is online",
    "/quit": "leave the chat (Ctrl-D on an empty line too)",
}
CHAT_HELP = "\n".join([*(f"  {command:<7} {what}" for command, what in CHAT_COMMANDS.items()),
                       "  //text  sends /text (a message that starts with /)",
                       "  Ctrl-C leaves too; up/down recall earlier lines."])


def run_chat(session: ClientSession, args: argparse.Namespace) -> int:
    """The terminal chat, on prompt_toolkit: the line being typed stays at
    the bottom, intact, while what arrives is printed above it."""
    joined = join(session, args.timeout)
    err(f"joined as {joined.name}; online: {', '.join(joined.users)}. "
        "Type a message and Enter; /help lists the commands.")
    return asyncio.run(chat_loop(session, joined.name))


async def chat_loop(session: ClientSession, name: str) -> int:
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
    prompt = PromptSession(f"{name}> ", erase_when_done=True)  # the broker's echo shows it
    sent: dict[str, str] = {}  # message id -> text, until acknowledged
    try:
        with patch_stdout():
            printer = threading.Thread(target=print_chat_events, args=(session, sent),
                                       daemon=True)
            printer.start()
            while True:
                try:
                    line = await prompt.prompt_async()
                except EOFError:  # Ctrl-D on an empty line
                    return Exit.OK
                except KeyboardInterrupt:  # Ctrl-C: the terminal sends it as a key
                    return Exit.INTERRUPTED
                if chat_line(session, line, sent) == "/quit":
                    return Exit.OK
    except asyncio.CancelledError:
        if not stopped_by:
            raise
        return stopped_by[0]
    finally:
        for signum in STOP_STATUS:
            loop.remove_signal_handler(signum)
        install_stop_handlers()


def chat_line(session: ClientSession, line: str, sent: dict[str, str]) -> str | None:
    """Act on one typed line; returns the command it was, if any. A line
    whose first non-blank character is / is a command, never sent."""
    stripped = line.strip()
    if not stripped:
        return None
    if stripped.startswith("//"):
        line = stripped[1:]
    elif stripped.startswith("/"):
        command = stripped.split()[0]
        if command == "/help":
            out("commands:\n" + CHAT_HELP)
        elif command == "/users":
            session.who()
        elif command != "/quit":
            err(f"unknown command {visible(command)} (not sent; /help lists the commands, "
                "//text sends /text)")
        return command
    sent[session.send(line)] = line
    return None


def print_chat_events(session: ClientSession, sent: dict[str, str]) -> None:
    while True:
        event = session.events.get()
        if isinstance(event, (m.Message, m.Join, m.Leave)):
            out(event_line(event))
        elif isinstance(event, m.Users):
            out("online: " + ", ".join(visible(u) for u in event.users))
        elif isinstance(event, Acked):
            sent.pop(event.id, None)
        elif isinstance(event, Refused):
            err(f"not sent ({event.reason}): {visible(sent.pop(event.id, ''))}")
        elif isinstance(event, JoinRefused):
            err(f"cannot rejoin: {event.reason}")
        else:
            report_status(event, False)


# --- main ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    install_stop_handlers()
    try:
        return run(parse_args(argv))
    except Stop as stop:
        return stop.status


def run(args: argparse.Namespace) -> int:
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
        session = ClientSession(args.host, args.port, args.name, pub_port=args.pub_port,
                                encryption=args.encryption,
                                recent=getattr(args, "history", 0)).start()
        return runner(session, args)
    except CliError as e:
        if str(e):  # empty when the cause is already said
            err(str(e))
        return e.status
    finally:
        if session is not None:  # leaving says bye: the others see "quit" at once
            session.close()


if __name__ == "__main__":
    sys.exit(main())
