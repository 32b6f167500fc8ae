"""The interactive chat of ``cli_client.py`` (no command, a terminal on stdin),
on prompt_toolkit: the line being typed stays at the bottom, intact, while
what arrives is printed above it by a thread of its own; /commands as in the
window (chat_commands.py), Alt+1..9 to switch conversations."""


from __future__ import annotations

import argparse
import asyncio
import sys
import threading

import chat_commands
import messages as m
from cli_common import (SHOWN_EVENTS, STOP_STATUS, Exit, err, install_stop_handlers, join, out,
                        report_status)
from client_session import (Acked, ClientSession, Joined, JoinRefused, Refused, RoomJoined,
                            RoomParted)
from display import event_line, visible


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
