"""How chat events are shown, shared by both clients: safe text, times, lines.

Text from other people is never shown raw: a control character, escape
sequence (CSI, OSC, C1) or bidi override could rewrite a terminal, hide
text or reorder it (CWE-150, CVE-2021-42574). ``visible`` turns each such
character into a printable escape such as ``\\x1b`` or ``\\u202e``.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from functools import cache

import messages as m

# Bidi controls and other invisible marks that reorder or hide text.
_BIDI_AND_INVISIBLE = [0x061C, 0x200B, 0x200E, 0x200F, 0x2028, 0x2029, 0xFEFF,
                       *range(0x202A, 0x202F), *range(0x2066, 0x206A)]
_SHORT_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(code: int) -> str:
    char = chr(code)
    if char in _SHORT_ESCAPES:
        return _SHORT_ESCAPES[char]
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


_UNSAFE = [*range(0x00, 0x20), 0x7F, *range(0x80, 0xA0), *_BIDI_AND_INVISIBLE]
_TABLE = {code: _escape(code) for code in _UNSAFE}
_TABLE[ord("\\")] = "\\\\"  # so an escape shown can never be forged by text


def visible(text: str, keep: str = "") -> str:
    """``text`` with every unsafe character shown as an escape.

    ``keep`` names harmless layout characters a window may leave as they
    are (a newline in a Text widget); backslashes are then left alone too,
    since a window does not need escapes to be unambiguous.
    """
    return text.translate(_table_keeping(keep) if keep else _TABLE)


@cache
def _table_keeping(keep: str) -> dict[int, str]:
    """_TABLE less ``keep`` and the backslash, built once per ``keep``."""
    return {c: e for c, e in _TABLE.items() if chr(c) not in keep and c != ord("\\")}


def clock(timestamp: float) -> str:
    """HH:MM:SS in local time."""
    return time.strftime("%H:%M:%S", time.localtime(timestamp))


def iso_utc(timestamp: float) -> str:
    """ISO 8601 in UTC, to the millisecond."""
    moment = datetime.fromtimestamp(timestamp, timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def presence_text(event: m.Join | m.Leave | m.Topic) -> str:
    """``* name joined`` / ``* name left (reason)`` / ``* name set the topic: text``."""
    if isinstance(event, m.Join):
        return f"* {event.name} joined"
    if isinstance(event, m.Topic):
        return f"* {event.name} set the topic: {visible(event.text)}"
    return f"* {event.name} left ({event.reason})"


# How a direct message is marked: sender, arrow, addressee.
DIRECT_ARROW = "→"


def event_line(event: m.Message | m.Join | m.Leave | m.Topic,
               unmarked_room: str | None = m.GENERAL_ROOM) -> str:
    """One line of the text output: ``HH:MM:SS name: text`` or a notice.

    An event of a room other than ``unmarked_room`` (the only room a reader
    follows, or None when it follows several) names its room, as in
    ``HH:MM:SS [#ci] name: text``; a direct message shows both parties, as
    in ``HH:MM:SS alice → bob: text``. Names of people and rooms are of a
    safe character set; text is shown through ``visible``.
    """
    stamp = clock(event.time)
    if isinstance(event, m.Message) and event.to is not None:
        return f"{stamp} {event.sender} {DIRECT_ARROW} {event.to}: {visible(event.text)}"
    room = getattr(event, "room", None)
    if room is not None and (unmarked_room is None
                             or m.room_key(room) != m.room_key(unmarked_room)):
        stamp += f" [{room}]"
    if isinstance(event, m.Message):
        return f"{stamp} {event.sender}: {visible(event.text)}"
    return f"{stamp} {presence_text(event)}"


def event_json(event: m.Message | m.Join | m.Leave | m.Topic) -> dict:
    """The JSON Lines record of an event (text left as it is: JSON escapes it).
    A room's event names its ``room``, a direct message its addressee ``to``."""
    record = {"type": event.TYPE, "seq": event.seq, "time": iso_utc(event.time)}
    if isinstance(event, m.Message):
        record.update({"from": event.sender, "text": event.text})
        if event.to is not None:
            record["to"] = event.to
    else:
        record["name"] = event.name
        if isinstance(event, m.Leave):
            record["reason"] = event.reason
        elif isinstance(event, m.Topic):
            record["text"] = event.text
    if event.room is not None:
        record["room"] = event.room
    return record
