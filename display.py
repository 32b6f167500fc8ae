"""How chat events are shown, shared by both clients: safe text, times, lines.

Text from other people is never shown raw: a control character, escape
sequence (CSI, OSC, C1) or bidi override could rewrite a terminal, hide
text or reorder it (CWE-150, CVE-2021-42574), and an invisible character
could make two texts look alike or smuggle words past the reader (Unicode's
default-ignorable code points: soft hyphen, zero-width spaces, Hangul
fillers, tag characters, variation selectors). ``visible`` turns each such
character into a printable escape such as ``\\x1b``, ``\\u202e`` or
``\\U000e0041``.

A few invisible characters are part of ordinary writing, and are left alone
only where they do that work (everywhere else they are escaped):

* U+200D ZERO WIDTH JOINER between two emoji (👨‍👩‍👧), and U+200C/U+200D
  between two letters or marks of the scripts that shape with them
  (Persian, Devanagari: U+0590 to U+1CFF);
* U+FE0E/U+FE0F (text or emoji presentation) right after an emoji or a
  keycap base (❤️, 1️⃣), and an ideographic variation selector (U+E0100 to
  U+E01EF) right after a CJK ideograph: one selector, never a run, so no
  message can be hidden in a string of them;
* tag characters only as an emoji tag sequence: 🏴, 2 to 7 tag letters or
  digits, and the cancel tag (the flags of England, Scotland and Wales).

"Emoji" here is Unicode's pictographic blocks (below), not the full
Extended_Pictographic property: a rare symbol outside them followed by
U+FE0F shows the selector as an escape, which is safe.
"""

from __future__ import annotations

import re
import time
from datetime import datetime, timezone
from functools import cache

import messages as m

# Bidi controls and other invisible marks that reorder or hide text.
_BIDI_AND_INVISIBLE = [0x061C, 0x200B, 0x200E, 0x200F, 0x2028, 0x2029, 0xFEFF,
                       *range(0x202A, 0x202F), *range(0x2066, 0x206A)]
# Default-ignorable and blank-looking code points that draw nothing: soft
# hyphen, combining grapheme joiner, Hangul fillers, Khmer inherent vowels,
# Mongolian vowel separator, word joiner and invisible operators, deprecated
# format characters, shorthand and musical format controls, tags and the
# plane-14 variation selectors.
_DEFAULT_IGNORABLE = [0x00AD, 0x034F, 0x115F, 0x1160, 0x17B4, 0x17B5, 0x180E, 0x3164, 0xFFA0,
                      *range(0x2060, 0x2066), *range(0x206A, 0x2070), *range(0xFE00, 0xFE10),
                      *range(0x1BCA0, 0x1BCA4), *range(0x1D173, 0x1D17B),
                      *range(0xE0000, 0xE1000)]
# Escaped unless their context makes them part of writing (see above).
_JOINERS = [0x200C, 0x200D]
_SHORT_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(code: int) -> str:
    char = chr(code)
    if char in _SHORT_ESCAPES:
        return _SHORT_ESCAPES[char]
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


_UNSAFE = [*range(0x00, 0x20), 0x7F, *range(0x80, 0xA0), *_BIDI_AND_INVISIBLE,
           *_DEFAULT_IGNORABLE, *_JOINERS]
_TABLE = {code: _escape(code) for code in _UNSAFE}
_TABLE[ord("\\")] = "\\\\"  # so an escape shown can never be forged by text


def _char_class(*ranges: tuple[int, int]) -> str:
    """A regex class of the code points in ``ranges`` (inclusive) that are
    not themselves escaped."""
    unsafe = sorted(c for c in set(_UNSAFE) if any(a <= c <= b for a, b in ranges))
    runs = []
    for first, last in ranges:
        for cut in (c for c in unsafe if first <= c <= last):
            if cut > first:
                runs.append((first, cut - 1))
            first = cut + 1
        if first <= last:
            runs.append((first, last))
    return "[" + "".join(f"{re.escape(chr(a))}-{re.escape(chr(b))}" for a, b in runs) + "]"


# Pictographic blocks: Misc Technical, Misc Symbols, Dingbats, arrows and
# geometric shapes used as emoji, and the emoji planes' blocks (skin tone
# modifiers included).
_EMOJI = _char_class((0x00A9, 0x00A9), (0x00AE, 0x00AE), (0x203C, 0x203C), (0x2049, 0x2049),
                     (0x2122, 0x2122), (0x2139, 0x2139), (0x2194, 0x21AA), (0x2300, 0x23FF),
                     (0x24C2, 0x24C2), (0x25AA, 0x27BF), (0x2934, 0x2935), (0x2B05, 0x2B55),
                     (0x3030, 0x3030), (0x303D, 0x303D), (0x3297, 0x3299),
                     (0x1F000, 0x1FAFF))
_KEYCAP_BASE = "[0-9#*]"
# Letters and marks of the scripts that join or break with U+200C/U+200D.
_SHAPING_SCRIPT = _char_class((0x0590, 0x1CFF))
_CJK_IDEOGRAPH = _char_class((0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF),
                             (0x20000, 0x3FFFF))
_TAG_SPEC = "[\U000E0030-\U000E0039\U000E0061-\U000E007A]"
# The invisible characters kept, each only where it does its work.
_KEPT_IN_CONTEXT = re.compile("|".join([
    f"(?<=\U0001F3F4){_TAG_SPEC}{{2,7}}\U000E007F(?:\u200d(?={_EMOJI}))?",
    f"(?<={_EMOJI})\u200d(?={_EMOJI})",
    f"(?<={_EMOJI}[\ufe0f\u20e3])\u200d(?={_EMOJI})",
    f"(?<={_SHAPING_SCRIPT})[\u200c\u200d](?={_SHAPING_SCRIPT})",
    f"(?<={_EMOJI})[\ufe0e\ufe0f]",
    f"(?<={_KEYCAP_BASE})\ufe0f(?=\u20e3)",
    f"(?<={_CJK_IDEOGRAPH})[\U000E0100-\U000E01EF]",
]))
_CONTEXTUAL = re.compile("[\u200c\u200d\ufe0e\ufe0f\U000E0020-\U000E007F\U000E0100-\U000E01EF]")


def visible(text: str, keep: str = "") -> str:
    """``text`` with every unsafe character shown as an escape.

    ``keep`` names harmless layout characters a window may leave as they
    are (a newline in a Text widget); backslashes are then left alone too,
    since a window does not need escapes to be unambiguous.
    """
    table = _table_keeping(keep) if keep else _TABLE
    if not _CONTEXTUAL.search(text):  # nearly every text: one pass in C
        return text.translate(table)
    shown: list[str] = []
    start = 0
    for kept in _KEPT_IN_CONTEXT.finditer(text):
        shown += [text[start:kept.start()].translate(table), kept.group()]
        start = kept.end()
    shown.append(text[start:].translate(table))
    return "".join(shown)


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


# Names a presence line shows before it counts the rest ("and 12 others").
PRESENCE_NAMES_SHOWN = 5


def _names(names: list[str]) -> str:
    """``ann, bob and carol``, or ``ann, bob, ... and 12 others`` for many."""
    if len(names) > PRESENCE_NAMES_SHOWN:
        others = len(names) - PRESENCE_NAMES_SHOWN + 1
        return f"{', '.join(names[:PRESENCE_NAMES_SHOWN - 1])} and {others} others"
    return " and ".join(filter(None, [", ".join(names[:-1]), names[-1]]))


def presence_text(event: m.Presence | m.Topic) -> str:
    """``* ann and bob joined; carol left (quit)`` / ``* name set the topic: text``."""
    if isinstance(event, m.Topic):
        return f"* {event.name} set the topic: {visible(event.text)}"
    parts = [f"{_names(event.joined)} joined"] if event.joined else []
    reasons: dict[str, list[str]] = {}
    for name, reason in event.left:
        reasons.setdefault(reason, []).append(name)
    parts += [f"{_names(names)} left ({visible(reason)})" for reason, names in reasons.items()]
    return "* " + "; ".join(parts)


# How a direct message is marked: sender, arrow, addressee.
DIRECT_ARROW = "→"


def event_line(event: m.Message | m.Presence | m.Topic,
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


def event_records(event: m.Message | m.Presence | m.Topic) -> list[dict]:
    """The JSON Lines records of an event: a presence event gives one record
    per person (``join``, or ``leave`` with its ``reason``), each with the
    event's ``seq`` and ``time``, so that a script reads one name a line."""
    if not isinstance(event, m.Presence):
        return [event_json(event)]
    where = {} if event.room is None else {"room": event.room}
    head = {"seq": event.seq, "time": iso_utc(event.time)}
    return ([{"type": "join", **head, "name": name, **where} for name in event.joined]
            + [{"type": "leave", **head, "name": name, "reason": reason, **where}
               for name, reason in event.left])


def event_json(event: m.Message | m.Topic) -> dict:
    """The JSON Lines record of an event (text left as it is: JSON escapes it).
    A room's event names its ``room``, a direct message its addressee ``to``."""
    record = {"type": event.TYPE, "seq": event.seq, "time": iso_utc(event.time)}
    if isinstance(event, m.Message):
        record.update({"from": event.sender, "text": event.text})
        if event.to is not None:
            record["to"] = event.to
    else:
        record.update({"name": event.name, "text": event.text})
    if event.room is not None:
        record["room"] = event.room
    return record
