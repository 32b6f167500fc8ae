"""display.py: what text from other people looks like once it is shown.

``visible`` must turn every character that could rewrite a terminal, hide
text or reorder it into a printable escape, leave every ordinary character
of every script alone, and never let a shown escape be forged. The classes
below are written out here from the module's own account of them, so that
a character dropped from (or added to) its table shows up as a failure.
"""

from __future__ import annotations

import json
import re
import string
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

import messages as m
from display import event_json, event_line, event_records, iso_utc, visible
from hostile_text import HOSTILE_TEXTS, assert_neutralised

# --- what is escaped ----------------------------------------------------------------

SHORT_ESCAPES = {"\n": r"\n", "\r": r"\r", "\t": r"\t"}
# C0 controls other than the three above, DEL, and the C1 controls (which
# include CSI 0x9b and OSC 0x9d, single-byte forms of ESC [ and ESC ]).
C0 = [chr(c) for c in range(0x00, 0x20) if chr(c) not in SHORT_ESCAPES]
DEL = ["\x7f"]
C1 = [chr(c) for c in range(0x80, 0xA0)]
# CVE-2021-42574's bidi controls, and invisible marks that hide or move text.
BIDI_AND_INVISIBLE = {
    "\u061c": "ARABIC LETTER MARK",
    "\u200b": "ZERO WIDTH SPACE",
    "\u200e": "LEFT-TO-RIGHT MARK",
    "\u200f": "RIGHT-TO-LEFT MARK",
    "\u2028": "LINE SEPARATOR",
    "\u2029": "PARAGRAPH SEPARATOR",
    "\u202a": "LEFT-TO-RIGHT EMBEDDING",
    "\u202b": "RIGHT-TO-LEFT EMBEDDING",
    "\u202c": "POP DIRECTIONAL FORMATTING",
    "\u202d": "LEFT-TO-RIGHT OVERRIDE",
    "\u202e": "RIGHT-TO-LEFT OVERRIDE",
    "\u2066": "LEFT-TO-RIGHT ISOLATE",
    "\u2067": "RIGHT-TO-LEFT ISOLATE",
    "\u2068": "FIRST STRONG ISOLATE",
    "\u2069": "POP DIRECTIONAL ISOLATE",
    "\ufeff": "ZERO WIDTH NO-BREAK SPACE (BOM)",
}
# Default-ignorable code points: they draw nothing, so a text holding them
# looks like another (a name, a link) or carries words nobody sees.
DEFAULT_IGNORABLE = {
    "\u00ad": "SOFT HYPHEN",
    "\u034f": "COMBINING GRAPHEME JOINER",
    "\u115f": "HANGUL CHOSEONG FILLER",
    "\u1160": "HANGUL JUNGSEONG FILLER",
    "\u17b4": "KHMER VOWEL INHERENT AQ",
    "\u17b5": "KHMER VOWEL INHERENT AA",
    "\u180e": "MONGOLIAN VOWEL SEPARATOR",
    "\u2060": "WORD JOINER",
    "\u2061": "FUNCTION APPLICATION",
    "\u2062": "INVISIBLE TIMES",
    "\u2063": "INVISIBLE SEPARATOR",
    "\u2064": "INVISIBLE PLUS",
    "\u206a": "INHIBIT SYMMETRIC SWAPPING",
    "\u3164": "HANGUL FILLER",
    "\ufe00": "VARIATION SELECTOR-1",
    "\ufe0d": "VARIATION SELECTOR-14",
    "\uffa0": "HALFWIDTH HANGUL FILLER",
    "\U0001bca0": "SHORTHAND FORMAT LETTER OVERLAP",
    "\U0001d173": "MUSICAL SYMBOL BEGIN BEAM",
    "\U000e0000": "TAG BLOCK START (unassigned)",
    "\U000e0001": "LANGUAGE TAG",
    "\U000e0fff": "TAG BLOCK END (unassigned)",
}
ESCAPED = [*SHORT_ESCAPES, *C0, *DEL, *C1, *BIDI_AND_INVISIBLE, *DEFAULT_IGNORABLE]
# Invisible, yet part of writing in the right place (joined emoji, Persian,
# Devanagari, emoji presentation, subdivision flags): escaped everywhere else.
IN_CONTEXT_ONLY = {
    "\u200c": "ZERO WIDTH NON-JOINER",
    "\u200d": "ZERO WIDTH JOINER",
    "\ufe0e": "VARIATION SELECTOR-15 (text)",
    "\ufe0f": "VARIATION SELECTOR-16 (emoji)",
    "\U000e0041": "TAG LATIN CAPITAL LETTER A",
    "\U000e0067": "TAG LATIN SMALL LETTER G",
    "\U000e007f": "CANCEL TAG",
    "\U000e0100": "VARIATION SELECTOR-17",
}
NAMES = {**BIDI_AND_INVISIBLE, **DEFAULT_IGNORABLE, **IN_CONTEXT_ONLY}


def char_id(char: str) -> str:
    return NAMES.get(char, f"U+{ord(char):04X}")


# An escape as shown, read back: the inverse a reader of the output applies.
ESCAPE = re.compile(r"\\(x[0-9a-f]{2}|u[0-9a-f]{4}|U[0-9a-f]{8}|[nrt\\])")


def unescape(shown: str) -> str:
    def one(match: re.Match) -> str:
        code = match.group(1)
        if code[0] in "xuU":
            return chr(int(code[1:], 16))
        return {"n": "\n", "r": "\r", "t": "\t", "\\": "\\"}[code]
    return ESCAPE.sub(one, shown)


@pytest.mark.parametrize("char,shown", [
    ("\x1b", r"\x1b"), ("\x00", r"\x00"), ("\x07", r"\x07"), ("\x08", r"\x08"),
    ("\x7f", r"\x7f"), ("\x85", r"\x85"), ("\x9b", r"\x9b"), ("\x9d", r"\x9d"),
    ("\n", r"\n"), ("\r", r"\r"), ("\t", r"\t"), ("\u202e", r"\u202e"),
    ("\u2066", r"\u2066"), ("\ufeff", r"\ufeff"), ("\\", "\\\\"),
])
def test_an_unsafe_character_is_shown_as_its_escape(char, shown):
    assert visible(f"a{char}b") == f"a{shown}b"


@pytest.mark.parametrize("char", [*ESCAPED, *IN_CONTEXT_ONLY], ids=char_id)
def test_every_character_of_every_unsafe_class_is_escaped(char):
    shown = visible(char)
    assert shown.startswith("\\") and len(shown) > 1
    assert set(shown) <= set(string.ascii_letters + string.digits + "\\"), repr(shown)
    assert unescape(shown) == char


@pytest.mark.parametrize("name,text", HOSTILE_TEXTS.items())
def test_terminal_attacks_are_neutralised(name, text):
    assert_neutralised(visible(text), text)


def test_a_shown_escape_cannot_be_forged_by_typing_it():
    assert visible(r"\x1b[2J") == r"\\x1b[2J"
    assert visible(r"\x1b[2J") != visible("\x1b[2J")


@given(st.text())
def test_what_is_shown_reads_back_as_exactly_what_was_sent(text):
    shown = visible(text)
    assert not set(shown) & set(ESCAPED)
    assert unescape(shown) == text


# Text of emoji, joiners, selectors and tags, mixed with letters, so that
# the contextual rules meet every neighbour.
NEAR_EMOJI = st.text(st.sampled_from([*IN_CONTEXT_ONLY, "\U0001f3f4", "\U0001f468", "\u2764",
                                      "\u0915", "\u094d", "\u8fbb", "1", "a", "\\"]))


SELECTORS = "\ufe0e\ufe0f\U000e0100"


@given(NEAR_EMOJI)
def test_invisible_characters_are_kept_only_beside_what_they_join(text):
    shown = visible(text)
    assert unescape(shown) == text
    for i, char in enumerate(shown):
        if char not in IN_CONTEXT_ONLY:
            continue
        # Never first, never after ASCII (an escape, a letter, a digit with
        # no keycap), never one selector after another (a hidden message).
        before = shown[i - 1] if i else ""
        assert before and not before.isascii(), (text, shown, i)
        assert not (char in SELECTORS and before in SELECTORS), (text, shown, i)
        if char in "\u200c\u200d":  # a joiner joins two things that show
            after = shown[i + 1:i + 2]
            assert after and not after.isascii() and after not in IN_CONTEXT_ONLY, \
                (text, shown, i)


# --- what is left alone -------------------------------------------------------------

LEFT_ALONE = {
    "printable ASCII": "".join(c for c in string.printable if c not in string.whitespace + "\\")
                       + " ",
    "accents, precomposed": "\u00e9t\u00e9 \u00d1and\u00fa stra\u00dfe \u0153uvre \u0107\u0161\u017e",
    "accents, combining": "e\u0301te\u0301 n\u0303",
    "Greek and Cyrillic": "\u03b1\u03b2\u03b3 \u0436\u0443\u043a",
    "CJK and kana": "\u6f22\u5b57 \u304b\u306a \u30ab\u30ca \ud55c\uad6d\uc5b4",
    "Arabic and Hebrew letters": "\u0645\u0631\u062d\u0628\u0627 \u05e9\u05dc\u05d5\u05dd",
    "Persian with a zero width non-joiner": "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645",
    "Devanagari with a virama": "\u0915\u094d\u0937",
    "emoji": "\U0001f389\U0001f600\u2764\ufe0f",
    "emoji ZWJ sequence": "\U0001f468\u200d\U0001f469\u200d\U0001f467\u200d\U0001f466",
    "emoji skin tone": "\U0001f44d\U0001f3fd",
    "flag and keycap": "\U0001f1eb\U0001f1f7 1\ufe0f\u20e3",
    "subdivision flag (tag characters)":
        "\U0001f3f4\U000e0067\U000e0062\U000e0073\U000e0063\U000e0074\U000e007f",
    "subdivision flag in a ZWJ sequence": "\U0001f3f4\U000e0067\U000e0062\U000e0077"
        "\U000e006c\U000e0073\U000e007f\u200d\U0001f525",
    "rainbow flag (VS16 inside a ZWJ sequence)": "\U0001f3f3\ufe0f\u200d\U0001f308",
    "person with skin tone in a ZWJ sequence": "\U0001f9d1\U0001f3fd\u200d\U0001f4bb",
    "text presentation": "\u2764\ufe0e \u263a\ufe0e",
    "Devanagari half form with a zero width joiner": "\u0915\u094d\u200d\u0937",
    "CJK ideographic variation sequence": "\u8fbb\U000e0100",
    "typographic punctuation": "\u201cquoted\u201d \u2018it\u2019s\u2019 \u2014 \u2013 \u2026 \u00ab\u00bb",
    "symbols": "\u20ac \u00a3 \u00a9 \u00b0 \u00b1 \u00d7 \u2192 \u2713",
    # the neighbours of the escaped ranges
    "no-break space (after C1)": "\u00a0",
    "narrow no-break space (after the overrides)": "\u202f",
    "Hangul syllables (beside the fillers)": "\ud55c\uae00 \u1100\u1161",
}


@pytest.mark.parametrize("text", LEFT_ALONE.values(), ids=LEFT_ALONE.keys())
def test_ordinary_text_of_every_script_is_left_alone(text):
    assert visible(text) == text


# --- invisible characters that are kept only where they are part of writing -------

OUT_OF_PLACE = {  # text: how it is shown (the emoji stay as they are)
    "a joiner between Latin letters": ("pay\u200dpal", "pay\\u200dpal"),
    "a non-joiner between Latin letters": ("pay\u200cpal", "pay\\u200cpal"),
    "a joiner at the end": ("\U0001f468\u200d", "\U0001f468\\u200d"),
    "a joiner after an emoji, before a letter": ("\U0001f468\u200dx", "\U0001f468\\u200dx"),
    "a joiner between two joiners": ("\U0001f468\u200d\u200d\U0001f469",
                                      "\U0001f468\\u200d\\u200d\U0001f469"),
    "a non-joiner between emoji": ("\U0001f468\u200c\U0001f469",
                                   "\U0001f468\\u200c\U0001f469"),
    "an emoji selector after a letter": ("x\ufe0f", "x\\ufe0f"),
    "a run of selectors after an emoji (a hidden message)":
        ("\U0001f600\ufe0f\ufe0e\U000e0100", "\U0001f600\ufe0f\\ufe0e\\U000e0100"),
    "an ideographic selector after a letter": ("a\U000e0100", "a\\U000e0100"),
    "tags smuggling ASCII after a letter": ("hi\U000e0068\U000e0069",
                                            "hi\\U000e0068\\U000e0069"),
    "capital tags after the black flag": ("\U0001f3f4\U000e0041\U000e0042\U000e007f",
                                          "\U0001f3f4\\U000e0041\\U000e0042\\U000e007f"),
    "a tag sequence without its cancel tag": ("\U0001f3f4\U000e0067\U000e0062",
                                              "\U0001f3f4\\U000e0067\\U000e0062"),
    "a tag sequence too long for a flag": (
        "\U0001f3f4" + "".join(chr(0xE0061 + i) for i in range(8)) + "\U000e007f",
        "\U0001f3f4" + "".join(f"\\U{0xE0061 + i:08x}" for i in range(8)) + "\\U000e007f"),
    "a lone cancel tag": ("\U000e007f", "\\U000e007f"),
}


@pytest.mark.parametrize("text,shown", OUT_OF_PLACE.values(), ids=OUT_OF_PLACE.keys())
def test_invisible_characters_out_of_place_are_escaped(text, shown):
    assert visible(text) == shown
    assert visible(text, keep="\n") == shown.replace("\\\\", "\\")


# --- keep: a window's layout characters ----------------------------------------------


def test_kept_newlines_and_backslashes_stay_as_they_are():
    assert visible("line one\nC:\\path", keep="\n") == "line one\nC:\\path"


@pytest.mark.parametrize("char", [c for c in ESCAPED if c != "\n"], ids=char_id)
def test_keeping_newlines_still_escapes_everything_else(char):
    assert visible(f"a\n{char}", keep="\n") == f"a\n{visible(char)}"


# --- event lines and JSON records ----------------------------------------------------


@pytest.fixture
def india_time(monkeypatch):
    """Local time five and a half hours ahead of UTC, whatever the machine's."""
    monkeypatch.setenv("TZ", "IST-5:30")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


# 2024-03-01T12:34:56.789 UTC
WHEN = 1709296496.789


@pytest.mark.parametrize("event,line", [
    (m.Message(7, WHEN, "alice", "hi there"), "18:04:56 alice: hi there"),
    (m.Message(8, WHEN, "mallory", "a\x1b[2J\rb\u202ec"), r"18:04:56 mallory: a\x1b[2J\rb\u202ec"),
    (m.Message(9, WHEN, "bob", "\u00e9t\u00e9 \U0001f389"), "18:04:56 bob: \u00e9t\u00e9 \U0001f389"),
    (m.Presence(10, WHEN, ["carol"], []), "18:04:56 * carol joined"),
    (m.Presence(11, WHEN, [], [["carol", m.LeaveReason.TIMEOUT]]),
     "18:04:56 * carol left (timeout)"),
    (m.Presence(12, WHEN, [], [["dave", m.LeaveReason.KICKED]]), "18:04:56 * dave left (kicked)"),
    (m.Presence(13, WHEN, ["ann", "bob"], [["carol", "quit"], ["dave", "timeout"],
                                           ["eve", "quit"]]),
     "18:04:56 * ann and bob joined; carol and eve left (quit); dave left (timeout)"),
    (m.Presence(14, WHEN, [f"u{i}" for i in range(40)], []),
     "18:04:56 * u0, u1, u2, u3 and 36 others joined"),
], ids=["message", "hostile message", "accents and emoji", "join", "leave", "kick",
        "several in one pass", "many"])
def test_event_line_shows_local_time_sender_and_safe_text(india_time, event, line):
    assert event_line(event) == line


@pytest.mark.parametrize("event,record", [
    (m.Message(7, WHEN, "alice", "a\x1b[2Jb"),
     {"type": "message", "seq": 7, "time": "2024-03-01T12:34:56.789Z", "from": "alice",
      "text": "a\x1b[2Jb"}),
], ids=["message"])
def test_event_json_is_the_whole_event_with_utc_time(india_time, event, record):
    assert event_json(event) == record
    assert event_records(event) == [record]


def test_a_presence_event_is_one_record_per_person_with_its_seq_and_time(india_time):
    event = m.Presence(8, WHEN, ["bob", "carol"], [["dave", m.LeaveReason.QUIT]], "#ci")
    head = {"seq": 8, "time": "2024-03-01T12:34:56.789Z"}
    assert event_records(event) == [
        {"type": "join", **head, "name": "bob", "room": "#ci"},
        {"type": "join", **head, "name": "carol", "room": "#ci"},
        {"type": "leave", **head, "name": "dave", "reason": "quit", "room": "#ci"}]


@pytest.mark.parametrize("event,unmarked,line", [
    (m.Message(1, WHEN, "alice", "hi", "#general"), m.GENERAL_ROOM, "18:04:56 alice: hi"),
    (m.Message(2, WHEN, "alice", "hi", "#ci"), m.GENERAL_ROOM, "18:04:56 [#ci] alice: hi"),
    (m.Message(3, WHEN, "alice", "hi", "#CI"), "#ci", "18:04:56 alice: hi"),
    (m.Message(4, WHEN, "alice", "hi", "#general"), None, "18:04:56 [#general] alice: hi"),
    (m.Presence(5, WHEN, ["bob"], [], "#ci"), None, "18:04:56 [#ci] * bob joined"),
    (m.Presence(6, WHEN, [], [["bob", m.LeaveReason.PART]], "#ci"), "#ci",
     "18:04:56 * bob left (part)"),
    (m.Topic(7, WHEN, "bob", "green \x1b[2J\u202e", "#ci"), None,
     r"18:04:56 [#ci] * bob set the topic: green \x1b[2J\u202e"),
    (m.Message(8, WHEN, "alice", "psst\x07", to="bob"), None, r"18:04:56 alice → bob: psst\x07"),
    (m.Message(9, WHEN, "alice", "note", to="alice"), "#ci", "18:04:56 alice → alice: note"),
], ids=["the unmarked room", "another room", "rooms compare ignoring case",
        "several rooms: each named", "join", "part", "hostile topic", "direct message",
        "a note to oneself"])
def test_event_line_names_the_room_unless_it_is_the_only_one_and_marks_direct_messages(
        india_time, event, unmarked, line):
    assert event_line(event, unmarked) == line


@pytest.mark.parametrize("event,extra", [
    (m.Message(1, WHEN, "alice", "hi", "#ci"), {"from": "alice", "text": "hi", "room": "#ci"}),
    (m.Message(2, WHEN, "alice", "hi", to="bob"), {"from": "alice", "text": "hi", "to": "bob"}),
    (m.Topic(5, WHEN, "bob", "a\x1bb", "#ci"), {"name": "bob", "text": "a\x1bb", "room": "#ci"}),
], ids=["room message", "direct message", "topic"])
def test_event_json_names_the_room_or_the_addressee(india_time, event, extra):
    assert event_json(event) == {"type": event.TYPE, "seq": event.seq,
                                 "time": "2024-03-01T12:34:56.789Z", **extra}


def test_event_json_text_is_raw_and_left_to_json_to_escape():
    encoded = json.dumps(event_json(m.Message(1, WHEN, "eve", "a\x1b]0;x\x07\u202eb")))
    assert "\x1b" not in encoded and "\x07" not in encoded
    assert json.loads(encoded)["text"] == "a\x1b]0;x\x07\u202eb"


@pytest.mark.parametrize("timestamp,iso", [
    (0.0, "1970-01-01T00:00:00.000Z"),
    (WHEN, "2024-03-01T12:34:56.789Z"),
    (1.9996, "1970-01-01T00:00:01.999Z"),  # cut to the millisecond, never rounded up
])
def test_iso_utc(india_time, timestamp, iso):
    assert iso_utc(timestamp) == iso
