"""The /commands typed into a chat, shared by the terminal chat and the window.

A typed line whose first non-blank character is ``/`` is a command and is
never sent as it is; ``//text`` sends ``/text``. ``parse`` checks a command's
words (how many, valid room and user names) and leaves acting on it to the
client, which knows what "the conversation on screen" is.

``/me ACTION`` is a text convention, not a protocol message: the text
``/me waves`` is sent as it is, and shown by the window as ``* alice waves``
(the terminal and ``listen`` show the text as sent).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from functools import lru_cache

import messages as m
from display import visible

COMMANDS = {
    "/help": "list these commands",
    "/users [ROOM]": "list who is online (who is in ROOM)",
    "/rooms": "list the rooms, how many are in each, and their topics",
    "/join ROOM": "enter ROOM (made if new) and talk there",
    "/switch ROOM": "talk in ROOM, one you are in (or @NAME: your conversation with NAME)",
    "/part [ROOM]": "leave ROOM (default: the room you talk in)",
    "/msg NAME [TEXT]": "talk to NAME alone (and send TEXT)",
    "/topic TEXT": "set the topic of the room you talk in",
    "/me ACTION": "say what you do: shown as * name ACTION",
    "/quit": "leave the chat",
}
HELP = "\n".join([*(f"  {command:<17} {what}" for command, what in COMMANDS.items()),
                  f"  {'//text':<17} sends /text (a message that starts with /)"])
# The text that marks an action (/me): sent as typed.
ACTION_PREFIX = "/me "
ROOM_WORDS = ("/users", "/join", "/part", "/switch")


class CommandError(ValueError):
    """A typed command that cannot be carried out: what to tell the user."""


@dataclass(frozen=True)
class Command:
    """A valid command: its name (``/join``) and words (the last holds the rest)."""

    name: str
    words: tuple[str, ...]

    def word(self, index: int) -> str | None:
        return self.words[index] if index < len(self.words) else None

    @property
    def rest(self) -> str:
        return " ".join(self.words)


def parse(line: str) -> Command | str | None:
    """What a typed line is: a Command, text to send (a str), or None (blank).
    Raises CommandError for an unknown command or one used wrongly."""
    stripped = line.strip()
    if not stripped:
        return None
    if stripped.startswith("//"):
        return line.lstrip()[1:]
    if not stripped.startswith("/"):
        return line
    name, *words = stripped.split(maxsplit=2)
    usage = next((c for c in COMMANDS if c.split()[0] == name), None)
    if usage is None:
        raise CommandError(f"unknown command {visible(name)} (not sent; /help lists the "
                           "commands, //text sends /text)")
    wanted = usage.count(" ") - usage.count("[")  # words it needs
    if len(words) < wanted:
        raise CommandError(f"usage: {usage}")
    if name in ("/topic", "/me"):  # one text, its spacing kept
        words = [stripped.split(maxsplit=1)[1]]
    first = words[0] if words else None
    if name in ROOM_WORDS and first is not None and not first.startswith(m.DM_STREAM_PREFIX) \
            and (problem := m.room_problem(first)):
        raise CommandError(f"{visible(first)} is not a room name: {problem}")
    if name == "/msg" and (problem := m.name_problem(first)):
        raise CommandError(f"{visible(first)} is not a user name: {problem}")
    return Command(name, tuple(words))


def action_text(action: str) -> str:
    """The text sent for ``/me action``."""
    return ACTION_PREFIX + action


def text_sent(what: Command | str | None) -> str | None:
    """The chat text a typed line sends (``parse``'s answer), or None: a
    command that sends none."""
    if isinstance(what, Command):
        if what.name == "/me":
            return action_text(what.rest)
        return what.word(1) if what.name == "/msg" else None
    return what


def too_long(text: str, max_text: int) -> str | None:
    """What to tell the user when ``text`` is over the broker's limit (the
    welcome's max_text, in UTF-8 bytes as the broker measures), else None.
    Said before sending: the broker would refuse it, and showing it as
    sent first would put a huge line in the chat."""
    size = m.text_bytes(text)
    if size <= max_text:
        return None
    return f"too long: {size} bytes, the limit is {max_text} (not sent: shorten it)"


def as_action(text: str) -> str | None:
    """The action of a ``/me`` text, or None for ordinary text."""
    return text[len(ACTION_PREFIX):] if text.startswith(ACTION_PREFIX) else None


# --- mentions and alerts, the same in the terminal and the window -------------------------

ROOM_MENTION = re.compile(r"(?<![\w@])@room(?![\w-])", re.IGNORECASE)
# Mentions and direct messages that come while the user is away ring the
# bell (and notify) once per burst: an alert closer than this to the
# previous one is part of the same burst.
ALERT_QUIET_S = 10.0


@lru_cache(maxsize=8)
def _name_pattern(name: str) -> re.Pattern:
    # A name as a word: not part of a longer name (names hold '.', '-', '_').
    return re.compile(rf"(?<![\w.-]){re.escape(name)}(?![\w-])", re.IGNORECASE)


def mentions(name: str, text: str) -> bool:
    """True when ``text`` names ``name`` as a word (any case), or says @room."""
    return bool(_name_pattern(name).search(text) or ROOM_MENTION.search(text))


class Alerts:
    """When to ring for a mention or a direct message: once per burst."""

    def __init__(self, quiet_s: float = ALERT_QUIET_S):
        self.quiet_s = quiet_s
        self._last = float("-inf")

    def due(self, now: float | None = None) -> bool:
        """Called for each alert-worthy event: True for the first of a burst."""
        now = time.monotonic() if now is None else now
        first, self._last = now - self._last >= self.quiet_s, now
        return first

    def reset(self) -> None:
        """The user is back: the next event starts a burst of its own."""
        self._last = float("-inf")
