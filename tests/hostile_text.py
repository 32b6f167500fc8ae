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
}
RAW_CONTROLS = set("\x1b\x07\r\u202e\x9b")


def assert_neutralised(shown: str, sent: str) -> None:
    """``shown`` has no raw control of ``sent``, and each is visible instead."""
    assert not RAW_CONTROLS & set(shown), repr(shown)
    for char in RAW_CONTROLS & set(sent):
        visible = {"\r": "\\r"}.get(char, f"\\x{ord(char):02x}" if ord(char) < 0x100
                                    else f"\\u{ord(char):04x}")
        assert visible in shown, (visible, shown)
