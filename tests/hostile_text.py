"""Chat text that attacks terminals and windows, for both clients' tests."""

# Each would rewrite or confuse a terminal if shown raw (CWE-150).
HOSTILE_TEXTS = {
    "osc0-title": "a\x1b]0;pwned\x07b",
    "osc50-font-query": "a\x1b]50;?\x07b",  # CVE-2022-45063
    "osc52-clipboard": "a\x1b]52;c;cm0gLXJmIH4=\x07b",
    "csi-clear-screen": "a\x1b[2Jb",
    "carriage-return-overwrite": "innocent\rEVIL",
    "bidi-override": "a\u202eevil",  # CVE-2021-42574
    "c1-csi": "a\x9b31mb",
    # Invisible: the text looks like another, or carries words nobody sees
    # (tag characters spelling "hi").
    "invisible": "a\u00adb\u200cc\u200dd\u2060e\u2062f\u3164g\U000e0068\U000e0069h",
}
RAW_CONTROLS = set("\x1b\x07\r\u202e\x9b\u00ad\u200c\u200d\u2060\u2062\u3164"
                   "\U000e0068\U000e0069")


def _escaped(char: str) -> str:
    code = ord(char)
    if char == "\r":
        return "\\r"
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def assert_neutralised(shown: str, sent: str) -> None:
    """``shown`` has no raw control of ``sent``, and each is visible instead."""
    assert not RAW_CONTROLS & set(shown), repr(shown)
    for char in RAW_CONTROLS & set(sent):
        assert _escaped(char) in shown, (_escaped(char), shown)
