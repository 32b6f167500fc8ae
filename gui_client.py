"""zchat in a desktop window (Tkinter), on the shared client session.

    python gui_client.py [--host H] [--port P] [--name NAME] [--server-key KEY] [--key FILE]

Without a name (``--name`` or ``$CHAT_NAME``) a small dialog asks for one
(the login name filled in), and for the broker's address, before the chat
opens; the broker's reason for refusing a name is shown there and the user
asked again. Closing the window (or Ctrl+Q) leaves the chat at once.

The chat: a sidebar of conversations (rooms, then direct messages, with
unread and mention counts), the conversation on screen (each has a Text
widget of its own: switching only shows another widget), the people in it,
and a field where Enter sends, Shift+Enter starts a new line, and the
terminal chat's /commands work (chat_commands.py). Mentions are highlighted;
while the window is not focused a mention or a direct message rings the
bell and calls ``notify_desktop`` once per burst. Links open through
``open_link`` on a click. (The tests patch those two hooks.)

Threads: Tk is touched by the main thread alone. The session's worker thread
owns the sockets (client_session.py); when it has queued events it writes a
byte into a pipe Tk watches (Wakeup), and the window then reads
``session.events`` from Tk's loop in bounded batches, so a flood of messages
never freezes it and an idle window costs next to nothing. It gives commands
through the session's non-blocking methods.
"""

from __future__ import annotations

import argparse
import bisect
import ctypes
import ctypes.util
import html
import itertools
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
import tkinter as tk
import webbrowser
import zlib
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable
from tkinter import font as tkfont
from tkinter import ttk
from tkinter.scrolledtext import ScrolledText

import chat_commands
import identity
import messages as m
import keys
from client_core import BrokerRefused, RoomJoined, RoomParted
from client_session import (Acked, ClientSession, Earlier, Encryption, Joined, JoinRefused,
                            Missed, Refused, State, StateChanged, add_connection_arguments,
                            choose_brokers, encryption_from_args, login_name)
from display import clock, presence_text, visible

# The worker's wakeups drive the reading of events, a few ms after the first
# one so that a stream of arrivals makes batches rather than one redraw per
# message; the slow poll is only a safety net. Under a backlog the window
# comes back as soon as Tk has redrawn and handled input. While
# reconnecting, the status line counts down.
WAKE_DELAY_MS = 10
SAFETY_POLL_MS = 1000
COUNTDOWN_REFRESH_MS = 200
# Bounds on one tick, so input and redraws are never held up for long.
EVENTS_PER_TICK = 300
TICK_BUDGET_S = 0.02
# Earlier messages shown on joining, so a newcomer sees the conversation.
RECENT_ON_JOIN = 50
# Scrollback kept; the oldest lines go in chunks, not one per message.
MAX_CHAT_LINES = 20_000
TRIM_CHUNK_LINES = 1_000

TITLE = "zchat"
# Narrower than this, the window has no room for the people list beside a
# readable chat (sidebar 180 px + list ~170 px left the chat 90 px at the
# 480 px minimum): the list steps aside and ``/users`` still names them.
PEOPLE_LIST_MIN_WINDOW_PX = 720
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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="zchat desktop window. Without --name (or CHAT_NAME) a dialog asks, "
                    "your login name filled in.")
    add_connection_arguments(p)
    args = p.parse_args(argv)
    choose_brokers(args)
    return args


def take_events(events: queue.Queue, limit: int, budget_s: float = TICK_BUDGET_S):
    """Events already queued, at most ``limit`` of them and for ``budget_s``."""
    deadline = time.monotonic() + budget_s
    for _ in range(limit):
        try:
            yield events.get_nowait()
        except queue.Empty:
            return
        if time.monotonic() > deadline:
            return


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


# --- waking Tk's loop from the session's thread -----------------------------------------


class Wakeup:
    """Wakes Tk's loop when a session's worker thread has queued events.

    The worker thread calls ``notify`` (the session's ``on_event``), which
    only writes a byte into a pipe; Tk watches the other end
    (``createfilehandler``) and calls ``handler`` from its own loop, in the
    main thread. Not ``event_generate`` from the worker: tkinter hands such a
    call over to the main thread and blocks the worker until Tk's
    ``mainloop`` runs it, and fails after a second when nobody is in
    ``mainloop``.
    """

    def __init__(self, root: tk.Misc):
        self._tk = root.tk
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._read_fd, False)
        os.set_blocking(self._write_fd, False)
        # notify never writes to a closed descriptor, whose number the
        # process may already have given to another file.
        self._lock = threading.Lock()
        self._open = True
        self.handler: Callable[[], None] | None = None
        self._tk.createfilehandler(self._read_fd, tk.READABLE, self._on_readable)

    def notify(self) -> None:
        """Safe from any thread; returns at once."""
        with self._lock:
            if self._open:
                try:
                    os.write(self._write_fd, b"\0")
                except BlockingIOError:
                    pass  # the pipe is full: Tk has a wakeup coming anyway

    def _on_readable(self, fd, mask) -> None:
        try:
            while os.read(self._read_fd, 4096):
                pass
        except BlockingIOError:
            pass
        if self.handler is not None:
            self.handler()

    def close(self) -> None:
        with self._lock:
            if self._open:
                self._open = False
                self._tk.deletefilehandler(self._read_fd)
                os.close(self._read_fd)
                os.close(self._write_fd)
        # The session's thread may outlive the window and hold the last
        # reference to us: Tcl aborts if that thread frees the interpreter.
        self._tk = self.handler = None


class EventPump:
    """Calls ``read_batch`` from Tk's loop: soon after a wakeup, again at once
    (after a redraw) while ``events`` still holds a backlog, and at the
    latest every ``idle_ms()`` ms."""

    def __init__(self, root: tk.Misc, wakeup: Wakeup, events: queue.Queue,
                 read_batch: Callable[[], None], idle_ms: Callable[[], int] = lambda: SAFETY_POLL_MS):
        self.root, self.wakeup, self.events = root, wakeup, events
        self.read_batch, self.idle_ms = read_batch, idle_ms
        self._job = None
        self._due = False  # a batch is already on its way
        self.stopped = False
        wakeup.handler = self._on_wakeup
        self._on_wakeup()  # events may already be waiting

    def _on_wakeup(self) -> None:
        if not self._due and not self.stopped:
            self._cancel()
            self._due = True
            # A timer, not an idle handler: the redraw of the last batch (an
            # idle handler) and other timers get their turn between batches.
            self._job = self.root.after(WAKE_DELAY_MS, self._run)

    def _run(self) -> None:
        self._job, self._due = None, False
        try:
            self.read_batch()
        finally:  # a failing handler must not stop the reading
            if self.stopped:
                pass
            elif self.events.empty():
                self._job = self.root.after(self.idle_ms(), self._run)
            else:
                # A backlog: let Tk redraw and take input first (idle handlers
                # queued by the inserts run before this one), then come back.
                self._due = True
                self._job = self.root.after_idle(self._run_after_input)

    def _run_after_input(self) -> None:
        self._job = self.root.after(1, self._run)

    def _cancel(self) -> None:
        if self._job is not None:
            self.root.after_cancel(self._job)
            self._job = None

    def stop(self) -> None:
        self.stopped = True
        self._cancel()
        if self.wakeup.handler == self._on_wakeup:
            self.wakeup.handler = None


# --- the join dialog -------------------------------------------------------------------


class LoginDialog:
    """Asks for a name and the broker's address, then joins.

    Calls ``on_joined(session, joined)`` once the broker welcomed us, or
    ``on_cancel()``. Given a name, it joins at once and only shows itself
    when the name is refused or the broker cannot be reached; without one it
    suggests the login name, as the command line's default.
    """

    def __init__(self, root: tk.Tk, host: str, port: int, name: str | None,
                 on_joined, on_cancel, wakeup: Wakeup, encryption: Encryption | None = None,
                 pub_port: int | None = None, alternates: tuple = ()):
        self.on_joined, self.on_cancel = on_joined, on_cancel
        # --pub-port belongs to the broker given on the command line only
        self.pub_port_of = {(host, port): pub_port} if pub_port else {}
        # and so do the other brokers of its chat, to fail over to
        self.alternates_of = {(host, port): alternates}
        self.wakeup = wakeup
        self.encryption = encryption
        self.session: ClientSession | None = None
        self.pump: EventPump | None = None
        self.refused = False
        self.top = tk.Toplevel(root)
        self.top.title(f"Join {TITLE}")
        self.top.resizable(False, False)
        self.top.protocol("WM_DELETE_WINDOW", self.cancel)
        self.top.bind("<Destroy>", self._on_destroy)
        # No tk.StringVar here or below: its __del__ calls Tcl from whichever
        # thread the garbage collector happens to run in.
        self._build(name or login_name(), host, str(port))
        if name:
            self.top.withdraw()
            self.submit()
        else:
            self.name_entry.select_range(0, "end")  # typing replaces the suggestion
            self.name_entry.focus_force()

    def _build(self, name: str, host: str, port: str) -> None:
        frame = ttk.Frame(self.top, padding=16)
        frame.grid(sticky="nsew")
        self.fields = []
        for row, (label, value, width) in enumerate(
                [("Name", name, 24), ("Host", host, 24), ("Port", port, 8)]):
            ttk.Label(frame, text=label).grid(row=row, column=0, sticky="w", pady=3)
            entry = ttk.Entry(frame, width=width)
            entry.insert(0, value)
            entry.grid(row=row, column=1, sticky="w", padx=(8, 0), pady=3)
            self.fields.append(entry)
        self.name_entry, self.host_entry, self.port_entry = self.fields
        self.message = ttk.Label(frame, text="Choose a name to chat with.", wraplength=300,
                                 style="Busy.TLabel")
        self.message.grid(row=3, column=0, columnspan=2, sticky="w", pady=(8, 8))
        buttons = ttk.Frame(frame)
        buttons.grid(row=4, column=0, columnspan=2, sticky="e")
        self.join_button = ttk.Button(buttons, text="Join", command=self.submit, default="active")
        self.join_button.pack(side="right")
        ttk.Button(buttons, text="Cancel", command=self.cancel).pack(side="right", padx=(0, 6))
        self.top.bind("<Return>", self.submit)
        self.top.bind("<Escape>", lambda event: self.cancel())

    def submit(self, event=None) -> str:
        name, host = self.name_entry.get().strip(), self.host_entry.get().strip()
        port = self._port()
        if not name:
            self._show_problem("Please enter a name.")
        elif port is None:
            self._show_problem("The port must be a number from 1 to 65535.")
        else:
            self._join(host, port, name)
        return "break"

    def _port(self) -> int | None:
        text = self.port_entry.get().strip()
        return int(text) if text.isdigit() and 1 <= int(text) <= 65535 else None

    def _join(self, host: str, port: int, name: str) -> None:
        if self.session and self.refused and self.session.address == f"{host}:{port}":
            self.session.join(name)  # same broker: only the name changes
        else:
            self._close_session()
            self.session = ClientSession(host, port, name, recent=RECENT_ON_JOIN,
                                         pub_port=self.pub_port_of.get((host, port)),
                                         alternates=self.alternates_of.get((host, port), ()),
                                         encryption=self.encryption,
                                         on_event=self.wakeup.notify,
                                         secret=identity.load_secret_or_none(warn)).start()
            self.pump = EventPump(self.top, self.wakeup, self.session.events, self._read_events)
        self.refused = False
        self._set_busy(True, f"Joining {host}:{port} as {name}…")

    def _read_events(self) -> None:
        for event in take_events(self.session.events, EVENTS_PER_TICK):
            if isinstance(event, Joined):
                self._finish(event)
                return
            if isinstance(event, JoinRefused):
                self._on_refused(event)
            elif isinstance(event, StateChanged) and event.state == State.RECONNECTING:
                self._on_unreachable(event)

    def _on_refused(self, event: JoinRefused) -> None:
        self.refused = True
        self._set_busy(False)
        self._show_problem(f"{event.reason}. Please choose another name.")
        self.name_entry.select_range(0, "end")

    def _on_unreachable(self, event: StateChanged) -> None:
        # Still trying; meanwhile the user may correct the address.
        self._set_busy(False)
        self._show_problem(f"Cannot reach the broker at {self.session.address} ({event.detail}); "
                           f"trying again in {event.retry_in:.1f} s.")

    def _finish(self, joined: Joined) -> None:
        self._stop_pump()  # the chat window reads the session's events from now on
        session, self.session = self.session, None  # handed over: not closed with us
        self.top.destroy()
        self.on_joined(session, joined)

    def cancel(self) -> None:
        self.top.destroy()
        self.on_cancel()

    def _set_busy(self, busy: bool, text: str | None = None) -> None:
        for widget in (*self.fields, self.join_button):
            widget.state(["disabled"] if busy else ["!disabled"])
        if text is not None:
            self.message.configure(style="Busy.TLabel", text=text)

    def _show_problem(self, text: str) -> None:
        self.message.configure(style="Problem.TLabel", text=text)
        self.top.deiconify()
        self.name_entry.focus_force()

    def _stop_pump(self) -> None:
        if self.pump is not None:
            self.pump.stop()
            self.pump = None

    def _close_session(self) -> None:
        self._stop_pump()
        if self.session is not None:
            self.session.close()
            self.session = None

    def _on_destroy(self, event) -> None:
        if event.widget is self.top:
            self._close_session()


# --- the chat window --------------------------------------------------------------------

# The Text mark where new lines go: the end, or above the own messages held
# at the bottom until they are sent (see Conversation.held).
FLOW_END = "flow_end"
# The field to write in grows with what is typed, up to this many lines.
MAX_INPUT_LINES = 6
# A message longer than this many lines is folded: only the first
# FOLD_SHOWN_LINES show, with "show more", so one paste does not fill the screen.
FOLD_OVER_LINES = 30
FOLD_SHOWN_LINES = 20
NOTIFICATION_TEXT_CHARS = 200
URL = re.compile(r"https?://[^\s<>\"'`]+[^\s<>\"'`.,;:!?)\]}]")
CODE_FENCE = "```"
CODE_INDENT = ("    ", "\t")


def open_link(url: str) -> None:
    """Opens a link the user clicked in the browser (the tests patch this)."""
    webbrowser.open(url)


def notify_desktop(title: str, body: str) -> None:
    """A desktop notification where the platform has one (on Linux
    ``notify-send``, from libnotify-bin); nothing, and no error, without it.
    The tests patch this."""
    program = shutil.which("notify-send")
    if program is None:
        return
    try:
        subprocess.Popen([program, "--app-name", TITLE, title, body], stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    except OSError:
        pass  # a notification is a courtesy: the chat goes on without it


def count_label(title: str, unread: int, mentioned: int) -> str:
    """``#general 3 · @1``: a conversation with its unread and mention counts."""
    counts = f" {unread}" if unread else ""
    return f"{title}{counts} · @{mentioned}" if mentioned else f"{title}{counts}"


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


class ChatWindow:
    """The chat on ``root``: a sidebar of conversations, the one on screen,
    who is in it, a field to write in, the status."""

    def __init__(self, root: tk.Tk, session: ClientSession, joined: Joined, wakeup: Wakeup):
        self.root, self.session = root, session
        self.name = joined.name
        self.max_text = joined.max_text  # the broker's limit on a text, from each welcome
        self.fonts = FontCoverage()
        self.users_stale = False  # the lists as they were when the connection went down
        # Own messages shown at once and not yet acknowledged (the session
        # keeps them while reconnecting): message id -> its line.
        self.pending: OrderedDict[str, OwnLine] = OrderedDict()
        self.line_keys = itertools.count(1)
        # Conversations by key (a room key, or "@" + a person's name key), rooms first.
        self.conversations: dict[str, Conversation] = {}
        self.touched: set[Conversation] = set()  # given lines in this batch of events
        self.batching = False  # in a batch: each conversation written is opened once
        self.opened: set[Conversation] = set()
        self._joining: set[str] = set()  # rooms the user asked to join: shown when in
        self._users_asked: set[str] = set()  # rooms whose /users answer is printed
        # room key -> the names of the pages of a ``who`` read so far: a
        # room's list is loaded when it is shown, a page at a time.
        self._pages: dict[str, list[str]] = {}
        self.focused = True
        self.alerts = chat_commands.Alerts()
        self.connection = State.CONNECTED
        self.connection_detail = ""
        self.retry_at: float | None = None
        self._focus_job = None
        self.current: Conversation | None = None  # the one on screen
        self._handlers = {
            m.Message: self._on_message, m.Presence: self._on_presence,
            m.Members: self._on_members,
            m.Topic: self._on_topic, m.Users: self._on_users, m.RoomList: self._on_room_list,
            Earlier: self._on_earlier, Acked: self._on_acked, Refused: self._on_refused,
            StateChanged: self._on_state, Joined: self._on_joined,
            JoinRefused: self._on_join_refused, Missed: self._on_missed,
            RoomJoined: self._on_room_joined, RoomParted: self._on_room_parted,
            BrokerRefused: self._on_broker_refused}
        self._build()
        self.current = self._room(m.GENERAL_ROOM)
        self._take_counts(joined)
        self.current.show()
        self._load_people(self.current)
        self._set_connection(State.CONNECTED)
        self._show_conversation_details()
        root.protocol("WM_DELETE_WINDOW", self.close)
        root.bind("<Control-q>", lambda event: self.close())
        root.bind("<Destroy>", self._on_destroy, add="+")
        root.bind("<FocusIn>", self._on_focus_event, add="+")
        root.bind("<FocusOut>", self._on_focus_event, add="+")
        root.deiconify()
        self.entry.focus_force()
        self.pump = EventPump(root, wakeup, session.events, self._show_events, self._idle_poll_ms)

    # --- what the tests and the benchmark look at: the conversation on screen -------

    @property
    def chat(self) -> ScrolledText:
        return self.current.chat

    @property
    def new_marker(self) -> ttk.Button:
        return self.current.new_marker

    @property
    def users(self) -> list[str]:
        return self.current.members if self.current.room else [self.current.peer]

    @property
    def lines_added(self) -> int:
        return sum(c.lines_added for c in self.conversations.values())

    def is_at_bottom(self) -> bool:
        return self.current.is_at_bottom()

    def scroll_to_newest(self) -> None:
        self.current.scroll_to_newest()

    def sidebar_text(self, key: str) -> str:
        """What the sidebar shows for conversation ``key`` (a room, or @name)."""
        return self.sidebar_items[self._key(key)].cget("text")

    # --- layout -----------------------------------------------------------------

    def _build(self) -> None:
        self.root.title(TITLE)
        self.root.geometry("960x580")
        self.root.minsize(480, 320)
        self.root.columnconfigure(1, weight=1)
        self.root.rowconfigure(0, weight=1)
        # Font descriptions, not tkfont.Font objects: a Font's __del__ calls
        # Tcl from whichever thread the garbage collector runs in.
        self.font_family = tkfont.nametofont("TkTextFont", root=self.root).actual("family")
        self.chat_font = (self.font_family, 11)
        code_family = tkfont.nametofont("TkFixedFont", root=self.root).actual("family")
        self.code_font = (code_family, 10)
        self._build_sidebar()
        self._build_chat_area()
        self._build_user_list()
        self._build_input()
        self._build_status_line()

    def _build_sidebar(self) -> None:
        self.sidebar = tk.Frame(self.root, background=COLORS["nav_bg"], padx=0, pady=8, width=180)
        self.sidebar.grid(row=0, column=0, rowspan=2, sticky="nsw")
        self.sidebar.grid_propagate(False)
        self.sidebar.columnconfigure(0, weight=1)
        self.sidebar_items: dict[str, tk.Label] = {}

    def _sidebar_label(self, text: str, row: int, command=None, style: str = "item") -> tk.Label:
        colors = {"heading": (COLORS["nav_muted"], (self.font_family, 9, "bold")),
                  "item": (COLORS["nav_text"], self.chat_font),
                  "action": (COLORS["nav_muted"], self.chat_font)}[style]
        label = tk.Label(self.sidebar, text=text, anchor="w", background=COLORS["nav_bg"],
                         foreground=colors[0], font=colors[1], padx=14, pady=3 if command else 6)
        label.grid(row=row, column=0, sticky="ew")
        if command is not None:
            label.configure(cursor="hand2")
            label.bind("<Button-1>", lambda event: command())
        return label

    def _layout_sidebar(self) -> None:
        """Rooms, then direct messages, then the two ways to start one."""
        for child in self.sidebar.winfo_children():
            child.destroy()
        self.sidebar_items = {}
        row = itertools.count()
        rooms = [c for c in self.conversations.values() if c.room]
        people = [c for c in self.conversations.values() if c.peer]
        for heading, group in (("ROOMS", rooms), ("DIRECT MESSAGES", people)):
            if group:
                self._sidebar_label(heading, next(row), style="heading")
            for conversation in group:
                self.sidebar_items[conversation.key] = self._sidebar_label(
                    "", next(row), lambda c=conversation: self.show(c))
        self._sidebar_label("+ Join a room", next(row),
                            lambda: self._start_typing("/join #"), style="action")
        self._sidebar_label("+ Message someone", next(row),
                            lambda: self._start_typing("/msg "), style="action")
        self._refresh_sidebar()

    def _refresh_sidebar(self) -> None:
        for key, label in self.sidebar_items.items():
            conversation = self.conversations[key]
            unread = conversation.unread > 0
            text = count_label(conversation.title, conversation.unread, conversation.mentions)
            on_screen = conversation is self.current
            options = {
                "text": text,
                "font": (*self.chat_font, "bold") if unread or on_screen else self.chat_font,
                "background": COLORS["nav_selected"] if on_screen else COLORS["nav_bg"],
                "foreground": COLORS["nav_muted"] if conversation.parted
                else COLORS["nav_mention"] if conversation.mentions else COLORS["nav_text"]}
            if any(str(label.cget(option)) != str(value) for option, value in options.items()):
                label.configure(**options)

    def _start_typing(self, text: str) -> None:
        """Puts the start of a command in the field, for the user to finish."""
        self.entry.delete(0, "end")
        self.entry.insert(0, text)
        self.entry.focus_set()

    def _build_chat_area(self) -> None:
        self.chat_area = ttk.Frame(self.root)
        self.chat_area.grid(row=0, column=1, sticky="nsew")
        self.chat_area.columnconfigure(0, weight=1)
        self.chat_area.rowconfigure(1, weight=1)
        header = tk.Frame(self.chat_area, background=COLORS["chat_bg"], padx=12, pady=6)
        header.grid(row=0, column=0, sticky="ew")
        self.header_title = tk.Label(header, background=COLORS["chat_bg"],
                                     foreground=COLORS["text"],
                                     font=(self.font_family, 12, "bold"))
        self.header_title.pack(side="left")
        self.header_topic = tk.Label(header, background=COLORS["chat_bg"], anchor="w",
                                     foreground=COLORS["muted"], font=self.chat_font)
        self.header_topic.pack(side="left", padx=(10, 0), fill="x", expand=True)
        ttk.Separator(self.chat_area).grid(row=0, column=0, sticky="sew")

    def _build_user_list(self) -> None:
        side = self.people_panel = ttk.Frame(self.root, style="Side.TFrame", padding=(10, 8))
        side.grid(row=0, column=2, sticky="ns")
        self.root.bind("<Configure>", self._fit_to_width, add="+")
        side.rowconfigure(1, weight=1)
        self.users_label = ttk.Label(side, style="Side.TLabel")
        self.users_label.grid(row=0, column=0, sticky="w", pady=(0, 6))
        self.user_list = tk.Listbox(side, width=18, activestyle="none", relief="flat",
                                    borderwidth=0, highlightthickness=0, font=self.chat_font,
                                    background=COLORS["side_bg"], selectbackground="#dadce0",
                                    selectforeground=COLORS["text"])
        self.user_list.grid(row=1, column=0, sticky="ns")
        self.user_list.bind("<Double-Button-1>", self._on_person_chosen)

    def _fit_to_width(self, event: tk.Event) -> None:
        """The people list is shown only where the chat keeps room to read."""
        if event.widget is not self.root:
            return  # a child's <Configure>, which the root's bindtag sees too
        wide = event.width >= PEOPLE_LIST_MIN_WINDOW_PX
        if wide != bool(self.people_panel.winfo_manager()):
            if wide:
                self.people_panel.grid()
            else:
                self.people_panel.grid_remove()

    def _build_input(self) -> None:
        bar = ttk.Frame(self.root, padding=(10, 8))
        bar.grid(row=1, column=1, columnspan=2, sticky="ew")
        bar.columnconfigure(0, weight=1)
        self.entry = InputField(bar, self._keeping_the_view, font=self.chat_font,
                                relief="solid", borderwidth=1,
                                highlightthickness=0, padx=6, pady=4)
        self.entry.grid(row=0, column=0, sticky="ew")
        self.entry.bind("<Return>", self.send_from_field)
        self.entry.bind("<KP_Enter>", self.send_from_field)
        self.entry.bind("<Shift-Return>", self._new_line)
        self.send_button = ttk.Button(bar, text="Send", command=self.send_from_field)
        self.send_button.grid(row=0, column=1, padx=(8, 0), sticky="s")

    def _keeping_the_view(self, change: Callable[[], None]) -> None:
        """``change`` (the field growing), the chat still following if it was."""
        following = self.current.is_at_bottom()
        change()
        if following:
            self.root.update_idletasks()
            self.current.scroll_to_newest()

    def _build_status_line(self) -> None:
        line = ttk.Frame(self.root, padding=(10, 0, 10, 6))
        line.grid(row=2, column=0, columnspan=3, sticky="ew")
        self.status_dot = ttk.Label(line, text="●")
        self.status_dot.pack(side="left")
        self.status = ttk.Label(line, style="Status.TLabel")
        self.status.pack(side="left", padx=(4, 0))

    # --- conversations ----------------------------------------------------------

    @staticmethod
    def _key(name: str) -> str:
        """A conversation's key: a room's key, or @ and a person's name key."""
        if name.startswith(m.DM_STREAM_PREFIX):
            return m.DM_STREAM_PREFIX + m.name_key(name[1:])
        return m.room_key(name)

    def _room(self, room: str) -> Conversation:
        """The conversation of ``room``, made if new."""
        key = m.room_key(room)
        conversation = self.conversations.get(key)
        if conversation is None:
            conversation = Conversation(self, key, room=room)
            # rooms before direct messages, in the order entered
            people = {k: c for k, c in self.conversations.items() if c.peer}
            for k in people:
                del self.conversations[k]
            self.conversations[key] = conversation
            self.conversations.update(people)
            self._layout_sidebar()
        return conversation

    def _direct(self, peer: str) -> Conversation:
        """The conversation with ``peer``, made if new."""
        key = m.DM_STREAM_PREFIX + m.name_key(peer)
        conversation = self.conversations.get(key)
        if conversation is None:
            conversation = self.conversations[key] = Conversation(self, key, peer=peer)
            self._layout_sidebar()
        return conversation

    def _conversation_of(self, message: m.Message) -> Conversation | None:
        """A direct message's conversation (opened if new), or the room's (None:
        a room we are no longer in)."""
        if message.to is not None:
            own = m.name_key(message.sender) == m.name_key(self.name)
            return self._direct(message.to if own else message.sender)
        return self._room_of(message)

    def _room_of(self, event) -> Conversation | None:
        return self.conversations.get(m.room_key(event.room or m.GENERAL_ROOM))

    def show(self, conversation: Conversation) -> None:
        """Puts ``conversation`` on screen (its own widget: instant)."""
        if conversation is not self.current:
            self.current.hide()
            self.current = conversation
            conversation.show()
        if self.focused:
            conversation.unread = conversation.mentions = 0
        self._load_people(conversation)
        self._show_conversation_details()

    def _show_conversation_details(self) -> None:
        conversation = self.current
        self.header_title.configure(text=conversation.title)
        topic = "direct messages" if conversation.peer else conversation.topic
        self.header_topic.configure(text=self.fonts.drawable(visible(topic)))
        self._show_people()
        self._refresh_sidebar()
        self._update_title()

    def _forget(self, conversation: Conversation) -> None:
        """Takes ``conversation`` off the sidebar, showing another."""
        if len(self.conversations) == 1:  # the last: kept on screen, greyed
            conversation.parted = True
            self._refresh_sidebar()
            return
        del self.conversations[conversation.key]
        self._layout_sidebar()
        if conversation is self.current:
            self.show(next(iter(self.conversations.values())))
        conversation.destroy()

    # --- sending and commands ---------------------------------------------------

    def _new_line(self, event=None) -> str:
        self.entry.insert("insert", "\n")
        self.entry.see("insert")
        return "break"

    def send_from_field(self, event=None) -> str:
        if self.connection == State.CLOSED:
            return "break"
        try:
            what = chat_commands.parse(self.entry.get().rstrip("\n"))
        except chat_commands.CommandError as problem:
            self.current.show_notice(str(problem), "error")  # the text stays, to correct
            self.current.scroll_to_newest()
            return "break"
        if self._over_the_limit(chat_commands.text_sent(what)):
            return "break"
        if what is not None:
            self.entry.delete(0, "end")
            if isinstance(what, chat_commands.Command):
                self._run_command(what)
            else:
                self.send_text(what)
        return "break"

    def _over_the_limit(self, text: str | None) -> bool:
        """True, telling the user, when ``text`` is longer than the broker
        takes: it is not sent, and stays in the field to be shortened. (Shown
        as sent first, a huge paste would freeze the window laying it out,
        only for the broker to refuse it.)"""
        problem = text is not None and chat_commands.too_long(text, self.max_text)
        if problem:
            self.current.show_notice(problem, "error")
            self.current.scroll_to_newest()
        return bool(problem)

    def send_text(self, text: str, conversation: Conversation | None = None) -> None:
        conversation = conversation or self.current
        if conversation.parted:
            conversation.show_notice(f"you are not in {conversation.title}: /join a room",
                                     "error")
            return
        own = OwnLine(f"own{next(self.line_keys)}", text, time.time(), conversation)
        if self.connection == State.CONNECTED and not conversation.held:
            conversation.append(self.own_pending_parts(own))
        else:  # goes out after the reconnection: shown below it
            conversation.append_held(self.own_pending_parts(own), own)
        msg_id = self.session.send(text, room=conversation.room, to=conversation.peer)
        self.pending[msg_id] = own
        conversation.scroll_to_newest()

    def _run_command(self, command: chat_commands.Command) -> None:
        """A /command typed into the field, as the terminal chat has them."""
        here = self.current
        lines_before = here.lines_added
        first = command.word(0)
        if command.name == "/help":
            here.show_notice("commands:\n" + chat_commands.HELP, "presence")
        elif command.name == "/users":
            room = first or here.room
            if room is None:
                here.show_notice("usage here: /users ROOM", "error")
            else:
                self._users_asked.add(m.room_key(room))
                self._ask_people(room)
        elif command.name == "/rooms":
            self.session.list_rooms()
        elif command.name in ("/join", "/switch"):
            known = self.conversations.get(self._key(first))
            if known is not None and not known.parted:
                self.show(known)
            elif command.name == "/join":
                self._joining.add(m.room_key(first))
                self.session.join_room(first)
            else:
                here.show_notice(f"you are not in {first} (/join it, or /msg someone)", "error")
        elif command.name == "/part":
            self._part(here, first)
        elif command.name == "/msg":
            conversation = self._direct(first)
            self.show(conversation)
            if command.word(1):
                self.send_text(command.word(1), conversation)
        elif command.name == "/topic":
            if here.room is None:
                here.show_notice("a direct conversation has no topic", "error")
            else:
                self.session.set_topic(here.room, command.rest)
        elif command.name == "/me":
            self.send_text(chat_commands.text_sent(command))
        elif command.name == "/quit":
            self.close()
            return
        if here.lines_added != lines_before:  # a local answer: shown
            here.scroll_to_newest()

    def _part(self, here: Conversation, room: str | None) -> None:
        if room is None and here.peer:  # closes a direct conversation (it comes back
            self._forget(here)          # with the next message)
            return
        conversation = self.conversations.get(self._key(room or here.room))
        if conversation is None or conversation.room is None or conversation.parted:
            here.show_notice(f"you are not in {room or here.title}", "error")
        else:
            self.session.part_room(conversation.room)

    def _on_person_chosen(self, event) -> None:
        """A double click on someone in the people list opens your conversation."""
        chosen = self.user_list.curselection()
        if chosen and (name := self.users[chosen[0]]) != self.name:
            self.show(self._direct(name))

    def own_pending_parts(self, own: OwnLine, when: float | None = None) -> list:
        """Our text, marked as not yet delivered."""
        mark, style = self._pending_mark()
        parts = own.conversation.message_parts(when or own.typed_at, self.name, own.text)
        return [*parts, mark, ("status", f"status-{own.key}", style)]

    def _pending_mark(self) -> tuple[str, str]:
        if self.connection == State.CONNECTED:
            return "  · sending…", "pending"
        return "  · waiting for the connection, sent when it is back", "queued"

    def _mark_all_pending(self) -> None:
        mark, style = self._pending_mark()
        for own in self.pending.values():
            own.conversation.set_mark(own.key, mark, style, final=False)

    def _refuse_all_pending(self) -> None:
        for conversation in self.conversations.values():
            conversation.stop_holding()  # nothing more will be sent: they stay where they are
        for own in self.pending.values():
            own.conversation.set_mark(own.key, "  ✗ not sent: disconnected", "refused",
                                      final=True)
        self.pending.clear()

    def _on_acked(self, event: Acked) -> None:
        if (own := self.pending.pop(event.id, None)) is not None:
            conversation = own.conversation
            conversation.set_mark(own.key, "  ✓", "delivered", final=True)
            conversation.acked_seqs.add(event.seq)
            if own.key in conversation.held:  # moves down when its broadcast comes
                conversation.held_acked[event.seq] = own.key

    def _on_refused(self, event: Refused) -> None:
        if (own := self.pending.pop(event.id, None)) is None:
            return
        own.conversation.release_held(own.key, time.time())
        if not self.entry.get():  # nothing typed since: the text goes back in the field
            self.entry.insert(0, own.text)
        own.conversation.set_mark(own.key, f"  ✗ not sent: {event.reason} · ", "refused",
                                  final=True, link=("edit", lambda: self.edit_again(own.text)))

    def edit_again(self, text: str) -> None:
        """Puts a refused text into the field, at the cursor (nothing typed is lost)."""
        if self.connection != State.CLOSED:
            self.entry.insert("insert", text)
            self.entry.focus_set()

    def _take_own_broadcast(self, message: m.Message, conversation: Conversation) -> bool:
        """True when ``message`` is one of ours already shown (delivered now)."""
        if message.seq in conversation.acked_seqs:
            conversation.acked_seqs.discard(message.seq)
            if (line := conversation.held_acked.pop(message.seq, None)) is not None:
                conversation.deliver(conversation.held[line], message.time)
            return True
        # Broadcast before its ack: ours go out in order, so it is the
        # oldest pending one with the same text.
        for msg_id, own in self.pending.items():
            if own.conversation is conversation and own.text == message.text:
                del self.pending[msg_id]
                conversation.deliver(own, message.time)
                return True
        return False

    # --- showing what arrives ---------------------------------------------------------

    def shown(self, text: str, keep: str = "") -> str:
        """Someone's text as the window shows it: safe, and nothing drawn as an empty box."""
        return self.fonts.drawable(visible(text, keep))

    def sender_tag(self, sender: str) -> str:
        if sender == self.name:
            return "own"
        return f"sender{zlib.crc32(sender.encode()) % len(SENDER_COLORS)}"

    def _on_message(self, message: m.Message, earlier: bool = False) -> None:
        conversation = self._conversation_of(message)
        if conversation is None:
            return
        own = message.sender == self.name
        if own and not earlier and self._take_own_broadcast(message, conversation):
            return
        mentioned = not own and chat_commands.mentions(self.name, message.text)
        style = ("earlier",) if earlier else ("mention",) if mentioned else ()
        conversation.append(conversation.message_parts(message.time, message.sender,
                                                       message.text, style))
        if own or earlier:
            return
        if conversation is not self.current or not self.focused:
            conversation.unread += 1
            conversation.mentions += mentioned
        if (mentioned or conversation.peer) and not self.focused:
            self._alert(conversation, message)

    def _alert(self, conversation: Conversation, message: m.Message) -> None:
        """The bell and a desktop notification, once for a burst."""
        if self.alerts.due():
            self.root.bell()
            where = "a direct message" if conversation.peer else conversation.title
            # escaped: notification servers may take the body as markup
            text = visible(message.text, keep="\n")[:NOTIFICATION_TEXT_CHARS]
            notify_desktop(f"{message.sender} ({where})", html.escape(text))

    def _on_earlier(self, event: Earlier) -> None:
        room = self.conversations.get(event.stream)  # None: the direct messages
        if event.messages and room is not None:
            room.show_notice(f"{len(event.messages)} earlier message(s)", "presence")
        for message in event.messages:
            self._on_message(message, earlier=True)

    def _presence_line(self, conversation: Conversation, event) -> None:
        conversation.append([f"{clock(event.time)}  ", ("line", "time"),
                             self.fonts.drawable(presence_text(event)), ("line", "presence")])

    def _on_presence(self, event: m.Presence) -> None:
        conversation = self._room_of(event)
        if conversation is None:
            return
        gone = {m.name_key(name) for name, _ in event.left} | {
            m.name_key(name) for name in event.joined}
        members = [n for n in conversation.members if m.name_key(n) not in gone]
        for name in event.joined:
            bisect.insort(members, name, key=m.name_key)
        conversation.members = members
        conversation.member_count = max(0, conversation.member_count + len(event.joined)
                                        - len(event.left))
        self._presence_line(conversation, event)
        if conversation is self.current:
            self._show_people()

    def _on_members(self, event: m.Members) -> None:
        """A big room's count: its list is loaded again when it is shown."""
        conversation = self._room_of(event)
        if conversation is None:
            return
        conversation.member_count = event.count
        if conversation is self.current:
            self._show_people()

    def _load_people(self, conversation: Conversation) -> None:
        """Ask who is in a room shown."""
        if conversation.room and not conversation.parted:
            self._ask_people(conversation.room)

    def _ask_people(self, room: str) -> None:
        """Ask the first page of a room's people (the others follow), unless
        they are being read already."""
        if m.room_key(room) not in self._pages:
            self._pages[m.room_key(room)] = []
            self.session.who(room)

    def _take_counts(self, joined: Joined) -> None:
        """The member counts a welcome brings, for the rooms we have."""
        for info in joined.rooms:
            if (conversation := self.conversations.get(m.room_key(info.room))) is not None:
                conversation.member_count = info.members

    def _on_topic(self, event: m.Topic) -> None:
        conversation = self._room_of(event)
        if conversation is None:
            return
        conversation.topic = event.text
        self._presence_line(conversation, event)
        if conversation is self.current:
            self._show_conversation_details()

    def _on_users(self, event: m.Users) -> None:
        """A page of a room's people: the next is asked until the last came."""
        room = event.room or m.GENERAL_ROOM
        key = m.room_key(room)
        pages = self._pages.get(key)
        if pages is None:
            return  # an answer nobody waits for any more
        pages += event.users
        if event.next is not None:
            self.session.who(room, after=event.next)
            return
        names = self._pages.pop(key)
        conversation = self.conversations.get(key)
        if conversation is not None:
            conversation.members = names
            conversation.member_count = len(names)
            if conversation is self.current:
                self._show_people()
        if key in self._users_asked:
            self._users_asked.discard(key)
            self.current.show_notice(
                f"in {room} ({len(names)}): " + ", ".join(self.shown(u) for u in names),
                "presence")

    def _on_room_list(self, event: m.RoomList) -> None:
        lines = [f"  {r.room} ({r.members})" + (f": {self.shown(r.topic)}" if r.topic else "")
                 for r in event.rooms]
        self.current.show_notice("\n".join(["rooms (people in each):", *lines]), "presence")

    def _on_room_joined(self, event: RoomJoined) -> None:
        conversation = self._room(event.room.room)
        conversation.topic = event.room.topic
        conversation.member_count = event.room.members
        if conversation.parted:
            conversation.parted = False
        if m.room_key(event.room.room) in self._joining:  # asked for: shown
            self._joining.discard(m.room_key(event.room.room))
            self.show(conversation)
        elif conversation is self.current:
            self._show_conversation_details()

    def _on_room_parted(self, event: RoomParted) -> None:
        conversation = self.conversations.get(m.room_key(event.room))
        if conversation is not None:
            conversation.show_notice(f"you left {event.room}", "presence")
            self._forget(conversation)

    def _on_broker_refused(self, event: BrokerRefused) -> None:
        self._joining.clear()
        self.current.show_notice(f"refused: {event.reason}", "error")

    def _on_missed(self, event: Missed) -> None:
        conversation = self.conversations.get(event.stream, self.current)
        # Held lines whose broadcast was lost: they went out before what follows.
        for seq, line in sorted(conversation.held_acked.items()):
            if seq <= event.last:
                del conversation.held_acked[seq]
                conversation.acked_seqs.discard(seq)
                conversation.deliver(conversation.held[line], time.time())
        conversation.show_notice(f"{event.count} message(s) were lost: no longer in the "
                                 "broker's history", "error")

    # --- who is in the conversation on screen ------------------------------------------

    def _show_people(self) -> None:
        conversation = self.current
        names = self.users
        self.user_list.delete(0, "end")
        for name in names:
            shown = self.fonts.drawable(name)
            self.user_list.insert("end", f"{shown} (you)" if name == self.name else shown)
            color = "muted" if self.users_stale else "own" if name == self.name else "text"
            self.user_list.itemconfigure("end", foreground=COLORS[color])
        if conversation.peer:
            label = "TALKING WITH"
        else:
            label = (f"{'WHO WAS ONLINE' if self.users_stale else 'ONLINE'} · "
                     f"{conversation.member_count}")
        self.users_label.configure(text=label)

    def _mark_users_stale(self) -> None:
        """While the connection is down nobody tells us who comes and goes:
        the list turns grey until the next welcome brings it up to date."""
        if not self.users_stale:
            self.users_stale = True
            self._show_people()

    # --- connection -------------------------------------------------------------------

    def _notice_everywhere(self, text: str, style: str = "notice") -> None:
        for conversation in self.conversations.values():
            if conversation.room:
                conversation.show_notice(text, style)

    def _on_state(self, event: StateChanged) -> None:
        if event.state == State.RECONNECTING and self.connection == State.CONNECTED:
            self._notice_everywhere(f"Connection lost ({event.detail}); reconnecting…")
        retry_at = time.monotonic() + event.retry_in if event.retry_in is not None else None
        self._set_connection(event.state, event.detail, retry_at)

    def _on_joined(self, event: Joined) -> None:
        self.name = event.name
        self.max_text = event.max_text
        self.users_stale = False
        self._take_counts(event)
        self._pages.clear()  # answers to the connection before may never come
        self._load_people(self.current)
        self._show_people()
        restarted = " (the broker restarted)" if event.broker_restarted else ""
        self._notice_everywhere(f"Reconnected{restarted}.")

    def _on_join_refused(self, event: JoinRefused) -> None:
        self._notice_everywhere(f"Cannot rejoin as {self.name}: {event.reason}", "error")
        self._set_connection(State.CLOSED, event.reason)

    def _set_connection(self, state: str, detail: str = "", retry_at: float | None = None) -> None:
        self.connection, self.connection_detail, self.retry_at = state, detail, retry_at
        usable = state != State.CLOSED
        for widget in (self.entry, self.send_button):
            widget.state(["!disabled"] if usable else ["disabled"])
        if usable:
            self._mark_all_pending()
        else:
            self._refuse_all_pending()
        if state != State.CONNECTED:
            self._mark_users_stale()
        self._show_status()

    def _show_status(self) -> None:
        address = self.session.address
        if self.connection == State.CONNECTED:
            text, color = f"Connected to {address} as {self.name}", COLORS["ok"]
        elif self.connection == State.CLOSED:
            text, color = f"Disconnected from {address}: {self.connection_detail}", COLORS["bad"]
        else:
            text, color = f"Reconnecting to {address} — {self._next_attempt()}; " \
                          "messages you send wait and go out when it is back", COLORS["warn"]
        if self.status.cget("text") != text:
            self.status.configure(text=text)
            self.status_dot.configure(foreground=color)

    def _next_attempt(self) -> str:
        if self.connection == State.CONNECTING or self.retry_at is None:
            return "trying now"
        return f"next attempt in {max(0.0, self.retry_at - time.monotonic()):.1f} s"

    # --- focus and title ----------------------------------------------------------------

    def _on_focus_event(self, event) -> None:
        # Focus moves in steps (out of one widget, into another): look once settled.
        if self._focus_job is None:
            self._focus_job = self.root.after_idle(self._check_focus)

    def _check_focus(self) -> None:
        self._focus_job = None
        path = str(self.root.tk.call("focus"))
        self.focused = bool(path) and str(self.root.tk.call("winfo", "toplevel", path)) == "."
        if self.focused:
            self.current.unread = self.current.mentions = 0
            self.alerts.reset()  # the next burst while away rings again
            self._refresh_sidebar()
        self._update_title()

    def _update_title(self) -> None:
        """``(5 · @1) alice - zchat``: unread messages in every conversation, and mentions."""
        unread = sum(c.unread for c in self.conversations.values())
        mentioned = sum(c.mentions for c in self.conversations.values())
        counts = f"({count_label('', unread, mentioned).strip()}) " if unread else ""
        title = f"{counts}{self.name} - {TITLE}"
        if self.root.title() != title:
            self.root.title(title)

    # --- the event loop ----------------------------------------------------------------

    def _idle_poll_ms(self) -> int:
        connected = self.connection in (State.CONNECTED, State.CLOSED)
        return SAFETY_POLL_MS if connected else COUNTDOWN_REFRESH_MS

    def _show_events(self) -> None:
        """One bounded batch of the session's events."""
        current = self.current
        at_bottom = current.is_at_bottom()
        self.touched = set()
        count = 0
        # Each conversation's widget is opened for writing once for the batch.
        self.batching = True
        try:
            for count, event in enumerate(take_events(self.session.events, EVENTS_PER_TICK), 1):
                handler = self._handlers.get(type(event))
                if handler:
                    handler(event)
            for conversation in self.touched:
                conversation.trim_scrollback()
        finally:
            self.batching = False
            for conversation in self.opened:
                if conversation.key in self.conversations:  # not forgotten meanwhile
                    conversation.close_for_writing()
            self.opened = set()
        # Follow the newest even when no line was added: a line that grew (a
        # longer mark that wraps) pushes the end out of view just the same,
        # and the view would then no longer count as following.
        if self.current is current and count and at_bottom:
            current.scroll_to_newest()
        for conversation in self.touched:
            if conversation is self.current and at_bottom:
                continue
            if conversation is self.current or not conversation.following:
                conversation.show_new_marker()
        self._refresh_sidebar()
        self._show_status()
        self._update_title()

    # --- closing ---------------------------------------------------------------------

    def close(self) -> None:
        """Leave now (others see ``quit``) and close the window."""
        self.root.destroy()

    def _on_destroy(self, event) -> None:
        # However the window goes (close button, destroyed from outside),
        # the session says bye and its thread ends.
        if event.widget is self.root:
            self.pump.stop()
            if self._focus_job is not None:
                self.root.after_cancel(self._focus_job)
                self._focus_job = None
            self.session.close()


class App:
    """The program on one Tk root: the join dialog, then the chat window."""

    def __init__(self, root: tk.Tk, host: str, port: int, name: str | None,
                 encryption: Encryption | None = None, pub_port: int | None = None,
                 alternates: tuple = ()):
        self.root = root
        self.chat: ChatWindow | None = None
        self.wakeup = Wakeup(root)
        root.bind("<Destroy>", self._on_destroy, add="+")
        apply_style(root)
        root.withdraw()
        self.dialog = LoginDialog(root, host, port, name, on_joined=self._open_chat,
                                  on_cancel=root.destroy, wakeup=self.wakeup,
                                  encryption=encryption, pub_port=pub_port,
                                  alternates=alternates)

    def _open_chat(self, session: ClientSession, joined: Joined) -> None:
        self.dialog = None
        self.chat = ChatWindow(self.root, session, joined, self.wakeup)

    def _on_destroy(self, event) -> None:
        if event.widget is self.root:
            self.wakeup.close()


def warn(why: str) -> None:
    print(f"gui_client.py: {why}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        encryption = encryption_from_args(args)
    except keys.KeyFileError as e:
        warn(str(e))
        return 2
    try:
        root = tk.Tk(className=TITLE)
    except tk.TclError as e:
        print(f"cannot open a window: {e}", file=sys.stderr)
        return 1
    App(root, args.host, args.port, args.name, encryption, args.pub_port, args.alternates)
    try:
        root.mainloop()
    except KeyboardInterrupt:
        root.destroy()  # the session says bye on the way out
    return 0


if __name__ == "__main__":
    sys.exit(main())
