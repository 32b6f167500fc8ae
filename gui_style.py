"""How the window looks: its colours and ttk theme, and which characters the
installed fonts can draw (an emoji no font has shows as ``[U+1F389]``, not as
an empty box)."""

from __future__ import annotations

import ctypes
import ctypes.util
import re
import tkinter as tk
from tkinter import font as tkfont
from tkinter import ttk


TITLE = "zchat"
COLORS = {
    "ok": "#1e8e3e", "warn": "#b06000", "bad": "#c5221f", "muted": "#80868b",
    "own": "#1a73e8", "chat_bg": "#ffffff", "side_bg": "#f1f3f4", "text": "#202124",
    "code_bg": "#f1f3f4", "mention_bg": "#fef7e0",
    # the sidebar of conversations: dark, as chat programs have it
    "nav_bg": "#2b2d31", "nav_text": "#e8eaed", "nav_muted": "#9aa0a6",
    "nav_selected": "#404249", "nav_mention": "#fdd663",
}
# Other people's names, each always in the same colour.
SENDER_COLORS = ["#8430ce", "#00796b", "#c2185b", "#5d4037", "#0b8043", "#3949ab", "#e8710a",
                 "#00838f"]



def apply_style(root: tk.Misc) -> None:
    """A flat theme and slightly larger type than Tk's defaults."""
    style = ttk.Style(root)
    if "clam" in style.theme_names():
        style.theme_use("clam")
    for name in ("TkDefaultFont", "TkTextFont"):
        tkfont.nametofont(name, root=root).configure(size=10)
    style.configure("Status.TLabel", foreground=COLORS["muted"])
    style.configure("Side.TFrame", background=COLORS["side_bg"])
    style.configure("Side.TLabel", background=COLORS["side_bg"], foreground=COLORS["muted"])
    style.configure("Problem.TLabel", foreground=COLORS["bad"])
    style.configure("Busy.TLabel", foreground=COLORS["muted"])
    style.configure("Marker.TButton", foreground="#ffffff", background=COLORS["own"])


# --- characters no font can draw ----------------------------------------------------------

# Beyond Unicode's first plane: most emoji, where an empty box is likeliest.
ASTRAL_CHARACTER = re.compile("[\U00010000-\U0010FFFF]")


class FontCoverage:
    """Which characters some installed font can draw, asked of fontconfig:
    for a character its font lacks, Tk's text (through Xft) takes the first
    font fontconfig offers that has it, and draws an empty box when none
    does. Monochrome fonts such as Debian's fonts-symbola cover most emoji."""

    def __init__(self):
        self._known: dict[str, bool] = {}
        self._fc = self._load_fontconfig()

    @staticmethod
    def _load_fontconfig():
        try:
            fc = ctypes.CDLL(ctypes.util.find_library("fontconfig") or "libfontconfig.so.1")
        except OSError:
            return None  # not an X11 Tk: its text finds fonts otherwise
        pointer = ctypes.c_void_p
        for function, result, arguments in [
                ("FcCharSetCreate", pointer, []),
                ("FcCharSetAddChar", ctypes.c_int, [pointer, ctypes.c_uint32]),
                ("FcCharSetDestroy", None, [pointer]),
                ("FcPatternCreate", pointer, []),
                ("FcPatternAddCharSet", ctypes.c_int, [pointer, ctypes.c_char_p, pointer]),
                ("FcPatternDestroy", None, [pointer]),
                ("FcObjectSetCreate", pointer, []),
                ("FcObjectSetDestroy", None, [pointer]),
                ("FcFontList", pointer, [pointer, pointer, pointer]),
                ("FcFontSetDestroy", None, [pointer])]:
            getattr(fc, function).restype = result
            getattr(fc, function).argtypes = arguments
        return fc

    def has(self, char: str) -> bool:
        """True when an installed font has ``char`` (or when we cannot tell)."""
        if char not in self._known:
            self._known[char] = self._fc is None or self._fonts_with(ord(char)) > 0
        return self._known[char]

    def _fonts_with(self, code: int) -> int:
        fc = self._fc
        charset, pattern, fields = fc.FcCharSetCreate(), fc.FcPatternCreate(), fc.FcObjectSetCreate()
        try:
            fc.FcCharSetAddChar(charset, code)
            fc.FcPatternAddCharSet(pattern, b"charset", charset)
            fonts = fc.FcFontList(None, pattern, fields)
            if not fonts:
                return 0
            count = ctypes.cast(fonts, ctypes.POINTER(ctypes.c_int))[0]  # FcFontSet.nfont
            fc.FcFontSetDestroy(fonts)
            return count
        finally:
            fc.FcObjectSetDestroy(fields)
            fc.FcPatternDestroy(pattern)
            fc.FcCharSetDestroy(charset)

    def drawable(self, text: str) -> str:
        """``text`` with each emoji (or other character beyond the first
        plane) that no installed font has written as ``[U+1F389]``."""
        if text.isascii():
            return text
        return ASTRAL_CHARACTER.sub(self._placeholder, text)

    def _placeholder(self, match: re.Match) -> str:
        char = match.group()
        return char if self.has(char) else f"[U+{ord(char):04X}]"

