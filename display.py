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


def presence_text(event: m.Join | m.Leave) -> str:
    """``* name joined`` / ``* name left (reason)``."""
    if isinstance(event, m.Join):
        return f"* {event.name} joined"
    return f"* {event.name} left ({event.reason})"


def event_line(event: m.Message | m.Join | m.Leave) -> str:
    """One line of the text output: ``HH:MM:SS name: text`` or a notice."""
    if isinstance(event, m.Message):
        return f"{clock(event.time)} {event.sender}: {visible(event.text)}"
    return f"{clock(event.time)} {presence_text(event)}"


def event_json(event: m.Message | m.Join | m.Leave) -> dict:
    """The JSON Lines record of an event (text left as it is: JSON escapes it)."""
    record = {"type": event.TYPE, "seq": event.seq, "time": iso_utc(event.time)}
    if isinstance(event, m.Message):
        record.update({"from": event.sender, "text": event.text})
    else:
        record["name"] = event.name
        if isinstance(event, m.Leave):
            record["reason"] = event.reason
    return record
