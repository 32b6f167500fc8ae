"""One conversation on screen (a room, or the messages with one person): its
own Text widget with its lines, the marks of the user's own messages,
folded long pastes, links, code, mentions, and the "new messages" marker."""

from __future__ import annotations

import re
import time
import webbrowser
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable
from tkinter import ttk
from tkinter.scrolledtext import ScrolledText

import chat_commands
from display import clock
from gui_style import COLORS, SENDER_COLORS

if TYPE_CHECKING:
    from gui_client import ChatWindow

# Scrollback kept; the oldest lines go in chunks, not one per message.
MAX_CHAT_LINES = 20_000
TRIM_CHUNK_LINES = 1_000
# The Text mark where new lines go: the end, or above the own messages held
# at the bottom until they are sent (see Conversation.held).
FLOW_END = "flow_end"
# A message longer than this many lines is folded: only the first
# FOLD_SHOWN_LINES show, with "show more", so one paste does not fill the screen.
FOLD_OVER_LINES = 30
FOLD_SHOWN_LINES = 20
URL = re.compile(r"https?://[^\s<>\"'`]+[^\s<>\"'`.,;:!?)\]}]")
CODE_FENCE = "```"
CODE_INDENT = ("    ", "\t")



def open_link(url: str) -> None:
    """Opens a link the user clicked in the browser (the tests patch this)."""
    webbrowser.open(url)



@dataclass(frozen=True)
class OwnLine:
    """One of our messages shown before the broker has it."""

    key: str  # names its Text tags
    text: str
    typed_at: float
    conversation: "Conversation"


class Conversation:
    """One conversation: a room, or the direct messages with one person.

    Each has its own Text widget, so that switching is only showing another
    widget (re-rendering thousands of lines would not be instant), and keeps
    its own scroll position, "new messages" marker, unread counts and the
    marks of our own lines in it.
    """

    def __init__(self, window: "ChatWindow", key: str, room: str | None = None,
                 peer: str | None = None):
        self.window = window
        self.key, self.room, self.peer = key, room, peer
        self.unread = 0
        self.mentions = 0
        self.members: list[str] = []  # a room's, in the order shown
        self.member_count = 0  # a room's, as the broker last said (a list may be older)
        self.topic = ""
        self.parted = False  # the last room, left: kept on screen, greyed
        self.following = True  # showing the newest: new lines scroll it
        self.lines_added = 0
        # Own messages typed while the connection was down (and any typed
        # after them until they went out) stay below everything else until
        # their broadcast shows where they were sent: line key -> line.
        self.held: OrderedDict[str, OwnLine] = OrderedDict()
        self.held_acked: dict[int, str] = {}  # seq -> key of a held line acknowledged
        # Seqs of own messages acknowledged before their broadcast came.
        self.acked_seqs: set[int] = set()
        self.folds: dict[str, list] = {}  # fold tag -> the parts "show more" adds
        self._write_depth = 0
        self._build(window.chat_area)

    @property
    def title(self) -> str:
        return self.room or self.peer

    def _build(self, parent) -> None:
        window = self.window
        self.chat = ScrolledText(parent, wrap="word", state="disabled", font=window.chat_font,
                                 relief="flat", borderwidth=0, padx=12, pady=8,
                                 background=COLORS["chat_bg"], foreground=COLORS["text"],
                                 highlightthickness=0, spacing1=2, spacing3=2, cursor="arrow")
        self.chat.configure(yscrollcommand=self._on_chat_scrolled)
        # Whether the newest line was in view when the view last changed: a
        # resize must keep it there, as chat windows do (Tk keeps the top line).
        self.newest_in_view = True
        self.chat.bind("<Configure>", self._on_chat_resized, add="+")
        self.chat.vbar.configure(width=10, relief="flat", borderwidth=0, elementborderwidth=0,
                                 troughcolor=COLORS["chat_bg"], background="#dadce0",
                                 activebackground="#bdc1c6", highlightthickness=0)
        self.chat.mark_set(FLOW_END, "end")  # right gravity: stays after what goes in at it
        self._configure_tags()
        self.new_marker = ttk.Button(self.chat, text="↓ New messages", style="Marker.TButton",
                                     command=self.scroll_to_newest, cursor="hand2")

    def _configure_tags(self) -> None:
        window = self.window
        bold, italic = (*window.chat_font, "bold"), (*window.chat_font, "italic")
        small = (window.font_family, 9)
        tag = self.chat.tag_configure
        tag("line", lmargin2=64)  # wrapped lines indent past the time
        tag("cont", lmargin1=64, lmargin2=64)  # a message's further lines too
        tag("time", foreground=COLORS["muted"], font=small)
        tag("own", foreground=COLORS["own"], font=bold)
        for number, color in enumerate(SENDER_COLORS):
            tag(f"sender{number}", foreground=color, font=bold)
        tag("presence", foreground=COLORS["muted"], font=italic)
        tag("action", font=italic)
        tag("notice", foreground=COLORS["warn"], font=italic)
        tag("error", foreground=COLORS["bad"])
        tag("earlier", foreground=COLORS["muted"])
        tag("code", font=window.code_font, background=COLORS["code_bg"])
        tag("mention", background=COLORS["mention_bg"])
        tag("pending", foreground=COLORS["muted"], font=small)
        tag("queued", foreground=COLORS["warn"], font=small)
        tag("delivered", foreground=COLORS["ok"], font=small)
        tag("refused", foreground=COLORS["bad"], font=small)
        tag("link", foreground=COLORS["own"], font=small, underline=True)
        tag("url", foreground=COLORS["own"], underline=True)
        tag("more", foreground=COLORS["own"], font=small, underline=True)
        for clickable in ("link", "url", "more"):
            self.chat.tag_bind(clickable, "<Enter>",
                               lambda event: self.chat.configure(cursor="hand2"))
            self.chat.tag_bind(clickable, "<Leave>",
                               lambda event: self.chat.configure(cursor="arrow"))
        self.chat.tag_bind("url", "<Button-1>", self._on_url_clicked)
        self.chat.tag_bind("more", "<Button-1>", self._on_more_clicked)

    # --- showing and hiding ---------------------------------------------------------

    def show(self) -> None:
        self.chat.frame.grid(row=1, column=0, sticky="nsew")
        if self.following:
            self.chat.update_idletasks()
            self.scroll_to_newest()

    def hide(self) -> None:
        self.following = self.is_at_bottom()
        self.chat.frame.grid_remove()

    def destroy(self) -> None:
        self.chat.frame.destroy()

    # --- lines --------------------------------------------------------------------

    @contextmanager
    def writable(self):
        """The chat area is read-only for the user; open it for our own
        writes (once for a whole batch of events: see ChatWindow._show_events)."""
        if self.window.batching:
            if self not in self.window.opened:  # closed by the window after the batch
                self.window.opened.add(self)
                self._open()
            yield
            return
        self._open()
        try:
            yield
        finally:
            self.close_for_writing()

    def _open(self) -> None:
        self._write_depth += 1
        if self._write_depth == 1:
            self.chat.configure(state="normal")

    def close_for_writing(self) -> None:
        self._write_depth -= 1
        if self._write_depth == 0:
            self.chat.configure(state="disabled")

    def append(self, parts: list) -> None:
        """One line of (text, tags) pairs at the end of the chat (above held lines)."""
        with self.writable():
            self.chat.insert(FLOW_END, *parts, "\n", ("line",))
        self.lines_added += 1
        self.window.touched.add(self)

    def show_notice(self, text: str, style: str = "notice") -> None:
        self.append([f"{clock(time.time())}  ", ("line", "time"), text, ("line", style)])

    def trim_scrollback(self) -> None:
        lines = int(self.chat.index("end-1c").split(".")[0])
        if lines > MAX_CHAT_LINES + TRIM_CHUNK_LINES:
            with self.writable():
                self.chat.delete("1.0", f"{lines - MAX_CHAT_LINES}.0")

    def message_parts(self, when: float, sender: str, text: str,
                      style: tuple[str, ...] = ()) -> list:
        """A message as (text, tags) pairs: time, sender, then its text, line
        by line; ``style``: tags over the whole text (earlier, mention)."""
        window = self.window
        sender_tag = window.sender_tag(sender)
        parts = [f"{clock(when)}  ", ("line", "time")]
        action = chat_commands.as_action(text)
        if action is not None:  # /me: "* alice waves"
            parts += ["* ", ("line", "action", *style), window.shown(sender), ("line", sender_tag),
                      " " + window.shown(action), ("line", "action", *style)]
            return parts
        parts += [window.shown(sender), ("line", sender_tag)]
        lines = self._text_lines(text, style)
        if len(lines) == 1:
            return parts + ["  ", ("line", *style), *lines[0]]
        parts += ["\n", ("line",)]  # a message of several lines starts below its sender
        folded = lines[FOLD_SHOWN_LINES:] if len(lines) > FOLD_OVER_LINES else []
        parts += self._joined(lines[:len(lines) - len(folded)])
        if folded:
            fold = f"fold-{next(window.line_keys)}"
            self.folds[fold] = ["\n", ("line",), *self._joined(folded)]
            parts += ["\n", ("line",), f"show more ({len(folded)} more lines)",
                      ("line", "cont", "more", fold)]
        return parts

    @staticmethod
    def _joined(lines: list[list]) -> list:
        parts = []
        for number, line in enumerate(lines):
            if number:
                # a code line's line break in the code style too: its
                # background then reaches the right edge, a block
                parts += ["\n", ("line", "code") if "code" in parts[-1] else ("line",)]
            parts += line
        return parts

    def _text_lines(self, text: str, style: tuple[str, ...]) -> list[list]:
        """Each line of ``text`` as parts: code (indented by four spaces, or
        between ``` fences) in monospace, links clickable."""
        several = "\n" in text
        base = ("line", "cont", *style) if several else ("line", *style)
        lines, in_fence = [], False
        for line in text.split("\n"):
            fence = line.lstrip().startswith(CODE_FENCE)
            shown = self.window.shown(line, keep="\t")
            if in_fence or fence or (several and line.startswith(CODE_INDENT)):
                lines.append([shown or " ", (*base, "code")])
            else:
                lines.append(self._with_links(shown, base))
            if fence and line.strip().count(CODE_FENCE) % 2:
                in_fence = not in_fence
        return lines

    @staticmethod
    def _with_links(text: str, tags: tuple[str, ...]) -> list:
        parts, at = [], 0
        for found in URL.finditer(text):
            if found.start() > at:
                parts += [text[at:found.start()], tags]
            parts += [found.group(), (*tags, "url")]
            at = found.end()
        if at < len(text) or not parts:
            parts += [text[at:], tags]
        return parts

    def _on_url_clicked(self, event) -> str:
        at = self.chat.index(f"@{event.x},{event.y}")
        found = self.chat.tag_prevrange("url", f"{at}+1c")
        if found:
            open_link(self.chat.get(*found))
        return "break"

    def _on_more_clicked(self, event) -> str:
        at = self.chat.index(f"@{event.x},{event.y}")
        fold = next((t for t in self.chat.tag_names(at) if t.startswith("fold-")), None)
        if fold is not None and fold in self.folds:
            start, end = self.chat.tag_ranges(fold)[:2]
            with self.writable():
                self.chat.delete(f"{start}-1c", end)  # the line break before it too
                self.chat.insert(f"{start}-1c", *self.folds.pop(fold))
            self.chat.tag_delete(fold)
        return "break"

    # --- own lines held at the bottom while they wait for the connection ------------

    def append_held(self, parts: list, own: OwnLine) -> None:
        """Our line below everything, where it stays until it is sent: what
        arrives meanwhile (the reconnection, what others said) goes above it."""
        start = self.chat.index("end-1c")
        tag = f"held-{own.key}"
        parts = [part if isinstance(part, str) else (*part, tag) for part in parts]
        with self.writable():
            self.chat.insert("end", *parts, "\n", ("line", tag))
        if not self.held:
            self.chat.mark_set(FLOW_END, start)
        self.held[own.key] = own
        self.lines_added += 1

    def release_held(self, line: str, when: float) -> None:
        """Moves held line ``line`` up to where the chat has got to, as pending."""
        own = self.held.pop(line, None)
        if own is None:
            return
        tag = f"held-{line}"
        ranges = self.chat.tag_ranges(tag)
        with self.writable():
            if ranges:
                self.chat.delete(ranges[0], ranges[-1])
            self.chat.tag_delete(tag, f"status-{line}")
            self.append(self.window.own_pending_parts(own, when))

    def stop_holding(self) -> None:
        for line in self.held:
            self.chat.tag_delete(f"held-{line}")
        self.held.clear()
        self.held_acked.clear()
        self.chat.mark_set(FLOW_END, "end")

    def set_mark(self, line: str, text: str, style: str, final: bool,
                 link: tuple[str, Callable[[], None]] | None = None) -> None:
        """The delivery mark after our line ``line``; ``link``: a clickable
        (text, action) after it."""
        tag = f"status-{line}"
        ranges = self.chat.tag_ranges(tag)
        held = (f"held-{line}",) if line in self.held else ()
        if ranges:
            with self.writable():
                self.chat.delete(*ranges)
                parts = [text, ("line", "status", style, *held) if final
                         else ("line", "status", tag, style, *held)]
                if link is not None:
                    link_tag = f"link-{line}"
                    self.chat.tag_bind(link_tag, "<Button-1>", lambda event: link[1]())
                    parts += [link[0], ("line", "status", "link", link_tag, *held)]
                self.chat.insert(ranges[0], *parts)
        if final:
            self.chat.tag_delete(tag)  # many live tags would slow the Text widget

    def deliver(self, own: OwnLine, when: float) -> None:
        """Our line ``own`` is in the conversation: where it was sent, marked ✓."""
        self.release_held(own.key, when)
        self.set_mark(own.key, "  ✓", "delivered", final=True)

    # --- scrolling ------------------------------------------------------------------

    def is_at_bottom(self) -> bool:
        return self.chat.yview()[1] >= 1.0

    def scroll_to_newest(self) -> None:
        self.chat.see("end")
        self.new_marker.place_forget()

    def _on_chat_scrolled(self, first: str, last: str) -> None:
        self.chat.vbar.set(first, last)
        self.newest_in_view = float(last) >= 1.0
        if self.newest_in_view:
            self.new_marker.place_forget()

    def _on_chat_resized(self, event) -> None:
        # Runs before Tk redraws at the new size, so newest_in_view still
        # tells where the view was.
        if self.newest_in_view:
            self.chat.see("end")

    def show_new_marker(self) -> None:
        self.new_marker.place(relx=1.0, rely=1.0, x=-16, y=-10, anchor="se")

