"""The field the user writes in: a Tk Text that grows with what is typed."""

from __future__ import annotations

import tkinter as tk
from typing import Callable


# The field to write in grows with what is typed, up to this many lines.
MAX_INPUT_LINES = 6


class InputField(tk.Text):
    """Where the user writes: a Text that grows with what is typed, up to
    MAX_INPUT_LINES. It also answers the Entry's get/insert/delete (index
    0: the start, "end": the end) and state/instate, so it is driven as one."""

    def __init__(self, master, around_resize: Callable[[Callable[[], None]], None], **options):
        """``around_resize(change)``: calls ``change`` (the field's new
        height, taken from the chat above it) keeping that chat's view."""
        super().__init__(master, height=1, wrap="word", undo=True, **options)
        self.around_resize = around_resize
        self.bind("<<Modified>>", self._on_modified, add="+")

    @staticmethod
    def _position(index):
        return "1.0" if index == 0 else "end-1c" if index == "end" else index

    def get(self, first=None, last=None) -> str:
        if first is None:
            return super().get("1.0", "end-1c")
        return super().get(self._position(first), None if last is None else self._position(last))

    def insert(self, index, chars, *args) -> None:
        super().insert(self._position(index), chars, *args)

    def delete(self, first, last=None) -> None:
        super().delete(self._position(first), None if last is None else self._position(last))

    def state(self, spec: list[str]) -> None:
        self.configure(state="disabled" if "disabled" in spec else "normal")

    def instate(self, spec: list[str]) -> bool:
        disabled = self.cget("state") == "disabled"
        return all(disabled == (flag == "disabled") for flag in spec)

    def _on_modified(self, event) -> None:
        if self.edit_modified():
            self.edit_modified(False)
            self.after_idle(self.fit)

    def fit(self) -> None:
        """As many lines high as the text takes on screen, within bounds."""
        height = self._lines_on_screen_up_to(MAX_INPUT_LINES)
        if int(self.cget("height")) != height:
            self.around_resize(lambda: self.configure(height=height))

    def _lines_on_screen_up_to(self, most: int) -> int:
        """How many lines on screen the text takes, or ``most`` when more.

        Not a plain ``count -displaylines``: Tk counts a line's lines on
        screen by laying it out again from its start for each one, so a
        long line costs their number squared (a 32 KB paste froze the
        window for half a minute). Past ``most`` the number does not
        matter, and finding where the line ``most`` lines down starts lays
        out only those."""
        last_shown = self.index(f"1.0 + {most - 1} display lines")
        if self.compare(f"{last_shown} display lineend", "<", "end-1c"):
            return most  # text goes on below it
        between = self.count("1.0", "end-1c", "displaylines") or (0,)  # at most most - 1
        return 1 + (between[0] if isinstance(between, tuple) else between)


