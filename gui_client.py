"""zchat in a desktop window (Tkinter), on the shared client session.

    python gui_client.py [--host H] [--port P] [--name NAME] [--server-key KEY] [--key FILE]

Without a name (``--name`` or ``$CHAT_NAME``) a small dialog asks for one
(the login name filled in), and for the broker's address, before the chat
opens; the broker's reason for refusing a name is shown there and the user
asked again. Enter sends; closing the window (or Ctrl+Q) leaves the chat at
once.

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
import itertools
import os
import queue
import re
import sys
import threading
import time
import tkinter as tk
import zlib
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable
from tkinter import font as tkfont
from tkinter import ttk
from tkinter.scrolledtext import ScrolledText

import identity
import messages as m
import keys
from client_session import (Acked, ClientSession, Earlier, Encryption, Joined, JoinRefused,
                            Missed, Refused, State, StateChanged, add_connection_arguments,
                            encryption_from_args, login_name)
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
COLORS = {
    "ok": "#1e8e3e", "warn": "#b06000", "bad": "#c5221f", "muted": "#80868b",
    "own": "#1a73e8", "chat_bg": "#ffffff", "side_bg": "#f1f3f4", "text": "#202124",
}
# Other people's names, each always in the same colour.
SENDER_COLORS = ["#8430ce", "#00796b", "#c2185b", "#5d4037", "#0b8043", "#3949ab", "#e8710a",
                 "#00838f"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="zchat desktop window. Without --name (or CHAT_NAME) a dialog asks, "
                    "your login name filled in.")
    add_connection_arguments(p)
    return p.parse_args(argv)


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
                 pub_port: int | None = None):
        self.on_joined, self.on_cancel = on_joined, on_cancel
        # --pub-port belongs to the broker given on the command line only
        self.pub_port_of = {(host, port): pub_port} if pub_port else {}
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
# at the bottom until they are sent (see ChatWindow.held).
FLOW_END = "flow_end"


@dataclass(frozen=True)
class OwnLine:
    """One of our messages shown before the broker has it."""

    key: str  # names its Text tags
    text: str
    typed_at: float


class ChatWindow:
    """The chat on ``root``: messages, who is online, a field to write in, the status."""

    def __init__(self, root: tk.Tk, session: ClientSession, joined: Joined, wakeup: Wakeup):
        self.root, self.session = root, session
        self.name = joined.name
        self.fonts = FontCoverage()
        self.users: list[str] = []  # in the order shown
        self.users_stale = False  # the list as it was when the connection went down
        # Own messages shown at once and not yet acknowledged (the session
        # keeps them while reconnecting): message id -> its line.
        self.pending: OrderedDict[str, OwnLine] = OrderedDict()
        # Own messages typed while the connection was down (and any typed
        # after them until they went out) stay below everything else until
        # their broadcast shows where they were sent: line key -> line.
        self.held: OrderedDict[str, OwnLine] = OrderedDict()
        self.held_acked: dict[int, str] = {}  # seq -> key of a held line acknowledged
        self._line_keys = itertools.count(1)
        # Seqs of own messages acknowledged before their broadcast came.
        self.acked_seqs: set[int] = set()
        self.unread = 0
        self.focused = True
        self.connection = State.CONNECTED
        self.connection_detail = ""
        self.retry_at: float | None = None
        self.lines_added = 0
        self._write_depth = 0
        self._focus_job = None
        self._handlers = {
            m.Message: self._on_message, m.Join: self._on_presence, m.Leave: self._on_presence,
            m.Users: lambda event: self._set_users(event.users), Earlier: self._on_earlier,
            Acked: self._on_acked, Refused: self._on_refused, StateChanged: self._on_state,
            Joined: self._on_joined, JoinRefused: self._on_join_refused, Missed: self._on_missed}
        self._build()
        self._set_users(joined.users)
        self._set_connection(State.CONNECTED)
        self._update_title()
        root.protocol("WM_DELETE_WINDOW", self.close)
        root.bind("<Control-q>", lambda event: self.close())
        root.bind("<Destroy>", self._on_destroy, add="+")
        root.bind("<FocusIn>", self._on_focus_event, add="+")
        root.bind("<FocusOut>", self._on_focus_event, add="+")
        root.deiconify()
        self.entry.focus_force()
        self.pump = EventPump(root, wakeup, session.events, self._show_events, self._idle_poll_ms)

    # --- layout -----------------------------------------------------------------

    def _build(self) -> None:
        self.root.title(TITLE)
        self.root.geometry("860x540")
        self.root.minsize(480, 320)
        self.root.columnconfigure(0, weight=1)
        self.root.rowconfigure(0, weight=1)
        self._build_chat_area()
        self._build_user_list()
        self._build_input()
        self._build_status_line()

    def _build_chat_area(self) -> None:
        # Font descriptions, not tkfont.Font objects: a Font's __del__ calls
        # Tcl from whichever thread the garbage collector runs in.
        self.font_family = tkfont.nametofont("TkTextFont", root=self.root).actual("family")
        self.chat_font = (self.font_family, 11)
        self.chat = ScrolledText(self.root, wrap="word", state="disabled", font=self.chat_font,
                                 relief="flat", borderwidth=0, padx=12, pady=8,
                                 background=COLORS["chat_bg"], foreground=COLORS["text"],
                                 highlightthickness=0, spacing1=2, spacing3=2, cursor="arrow")
        self.chat.frame.grid(row=0, column=0, sticky="nsew")
        self.chat.configure(yscrollcommand=self._on_chat_scrolled)
        self.chat.vbar.configure(width=10, relief="flat", borderwidth=0, elementborderwidth=0,
                                 troughcolor=COLORS["chat_bg"], background="#dadce0",
                                 activebackground="#bdc1c6", highlightthickness=0)
        self.chat.mark_set(FLOW_END, "end")  # right gravity: stays after what goes in at it
        self._configure_tags()
        self.new_marker = ttk.Button(self.chat, text="↓ New messages", style="Marker.TButton",
                                     command=self.scroll_to_newest, cursor="hand2")

    def _configure_tags(self) -> None:
        bold, italic = (*self.chat_font, "bold"), (*self.chat_font, "italic")
        small = (self.font_family, 9)
        tag = self.chat.tag_configure
        tag("line", lmargin2=64)  # wrapped lines indent past the time
        tag("time", foreground=COLORS["muted"], font=small)
        tag("own", foreground=COLORS["own"], font=bold)
        for number, color in enumerate(SENDER_COLORS):
            tag(f"sender{number}", foreground=color, font=bold)
        tag("presence", foreground=COLORS["muted"], font=italic)
        tag("notice", foreground=COLORS["warn"], font=italic)
        tag("error", foreground=COLORS["bad"])
        tag("earlier", foreground=COLORS["muted"])
        tag("pending", foreground=COLORS["muted"], font=small)
        tag("queued", foreground=COLORS["warn"], font=small)
        tag("delivered", foreground=COLORS["ok"], font=small)
        tag("refused", foreground=COLORS["bad"], font=small)
        tag("link", foreground=COLORS["own"], font=small, underline=True)
        self.chat.tag_bind("link", "<Enter>", lambda event: self.chat.configure(cursor="hand2"))
        self.chat.tag_bind("link", "<Leave>", lambda event: self.chat.configure(cursor="arrow"))

    def _build_user_list(self) -> None:
        side = ttk.Frame(self.root, style="Side.TFrame", padding=(10, 8))
        side.grid(row=0, column=1, sticky="ns")
        side.rowconfigure(1, weight=1)
        self.users_label = ttk.Label(side, style="Side.TLabel")
        self.users_label.grid(row=0, column=0, sticky="w", pady=(0, 6))
        self.user_list = tk.Listbox(side, width=20, activestyle="none", relief="flat",
                                    borderwidth=0, highlightthickness=0, font=self.chat_font,
                                    background=COLORS["side_bg"], selectbackground="#dadce0",
                                    selectforeground=COLORS["text"])
        self.user_list.grid(row=1, column=0, sticky="ns")

    def _build_input(self) -> None:
        bar = ttk.Frame(self.root, padding=(10, 8))
        bar.grid(row=1, column=0, columnspan=2, sticky="ew")
        bar.columnconfigure(0, weight=1)
        self.entry = ttk.Entry(bar, font=self.chat_font)
        self.entry.grid(row=0, column=0, sticky="ew", ipady=4)
        self.entry.bind("<Return>", self.send_from_field)
        self.entry.bind("<KP_Enter>", self.send_from_field)
        self.send_button = ttk.Button(bar, text="Send", command=self.send_from_field)
        self.send_button.grid(row=0, column=1, padx=(8, 0))

    def _build_status_line(self) -> None:
        line = ttk.Frame(self.root, padding=(10, 0, 10, 6))
        line.grid(row=2, column=0, columnspan=2, sticky="ew")
        self.status_dot = ttk.Label(line, text="●")
        self.status_dot.pack(side="left")
        self.status = ttk.Label(line, style="Status.TLabel")
        self.status.pack(side="left", padx=(4, 0))

    # --- sending ------------------------------------------------------------------

    def send_from_field(self, event=None) -> str:
        text = self.entry.get()
        if text.strip() and self.connection != State.CLOSED:
            self.entry.delete(0, "end")
            own = OwnLine(f"own{next(self._line_keys)}", text, time.time())
            if self.connection == State.CONNECTED and not self.held:
                self._append(self._own_pending_parts(own))
            else:  # goes out after the reconnection: shown below it
                self._append_held(own)
            self.pending[self.session.send(text)] = own
            self.scroll_to_newest()
        return "break"

    def _own_pending_parts(self, own: OwnLine, when: float | None = None) -> list:
        """Our text, marked as not yet delivered."""
        mark, style = self._pending_mark()
        return [*self._message_parts(when or own.typed_at, self.name, own.text, "own"),
                mark, ("status", f"status-{own.key}", style)]

    def _pending_mark(self) -> tuple[str, str]:
        if self.connection == State.CONNECTED:
            return "  · sending…", "pending"
        return "  · waiting for the connection, sent when it is back", "queued"

    def _set_mark(self, line: str, text: str, style: str, final: bool,
                  link: tuple[str, Callable[[], None]] | None = None) -> None:
        """The delivery mark after our line ``line``; ``link``: a clickable
        (text, action) after it."""
        tag = f"status-{line}"
        ranges = self.chat.tag_ranges(tag)
        held = (f"held-{line}",) if line in self.held else ()
        if ranges:
            with self._writable():
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

    def _undelivered_lines(self) -> list[str]:
        return [own.key for own in self.pending.values()]

    def _mark_all_pending(self) -> None:
        mark, style = self._pending_mark()
        for line in self._undelivered_lines():
            self._set_mark(line, mark, style, final=False)

    def _refuse_all_pending(self) -> None:
        self._stop_holding()  # nothing more will be sent: they stay where they are
        for line in self._undelivered_lines():
            self._set_mark(line, "  ✗ not sent: disconnected", "refused", final=True)
        self.pending.clear()

    def _on_acked(self, event: Acked) -> None:
        if (own := self.pending.pop(event.id, None)) is not None:
            self._set_mark(own.key, "  ✓", "delivered", final=True)
            self.acked_seqs.add(event.seq)
            if own.key in self.held:  # moves down when its broadcast comes
                self.held_acked[event.seq] = own.key

    def _on_refused(self, event: Refused) -> None:
        if (own := self.pending.pop(event.id, None)) is None:
            return
        self._release_held(own.key, time.time())
        if not self.entry.get():  # nothing typed since: the text goes back in the field
            self.entry.insert(0, own.text)
        self._set_mark(own.key, f"  ✗ not sent: {event.reason} · ", "refused", final=True,
                       link=("edit", lambda: self.edit_again(own.text)))

    def edit_again(self, text: str) -> None:
        """Puts a refused text into the field, at the cursor (nothing typed is lost)."""
        if self.connection != State.CLOSED:
            self.entry.insert("insert", text)
            self.entry.focus_set()

    def _take_own_broadcast(self, message: m.Message) -> bool:
        """True when ``message`` is one of ours already shown (delivered now)."""
        if message.seq in self.acked_seqs:
            self.acked_seqs.discard(message.seq)
            if (line := self.held_acked.pop(message.seq, None)) is not None:
                self._release_held(line, message.time)
                self._set_mark(line, "  ✓", "delivered", final=True)
            return True
        # Broadcast before its ack: ours go out in order, so it is the
        # oldest pending one with the same text.
        for msg_id, own in self.pending.items():
            if own.text == message.text:
                del self.pending[msg_id]
                self._release_held(own.key, message.time)
                self._set_mark(own.key, "  ✓", "delivered", final=True)
                return True
        return False

    # --- own lines held at the bottom while they wait for the connection ------------

    def _append_held(self, own: OwnLine) -> None:
        """Our line below everything, where it stays until it is sent: what
        arrives meanwhile (the reconnection, what others said) goes above it."""
        start = self.chat.index("end-1c")
        tag = f"held-{own.key}"
        parts = [part if isinstance(part, str) else (*part, tag)
                 for part in self._own_pending_parts(own)]
        with self._writable():
            self.chat.insert("end", *parts, "\n", ("line", tag))
        if not self.held:
            self.chat.mark_set(FLOW_END, start)
        self.held[own.key] = own
        self.lines_added += 1

    def _release_held(self, line: str, when: float) -> None:
        """Moves held line ``line`` up to where the chat has got to, as pending."""
        own = self.held.pop(line, None)
        if own is None:
            return
        tag = f"held-{line}"
        ranges = self.chat.tag_ranges(tag)
        with self._writable():
            if ranges:
                self.chat.delete(ranges[0], ranges[-1])
            self.chat.tag_delete(tag, f"status-{line}")
            self._append(self._own_pending_parts(own, when))

    def _stop_holding(self) -> None:
        for line in self.held:
            self.chat.tag_delete(f"held-{line}")
        self.held.clear()
        self.held_acked.clear()
        self.chat.mark_set(FLOW_END, "end")

    # --- showing lines -------------------------------------------------------------

    def _shown(self, text: str, keep: str = "") -> str:
        """Someone's text as the window shows it: safe, and nothing drawn as an empty box."""
        return self.fonts.drawable(visible(text, keep))

    def _message_parts(self, when: float, sender: str, text: str, sender_tag: str) -> list:
        return [f"{clock(when)}  ", ("line", "time"), self._shown(sender), ("line", sender_tag),
                "  " + self._shown(text, keep="\n"), ("line",)]

    def _sender_tag(self, sender: str) -> str:
        if sender == self.name:
            return "own"
        return f"sender{zlib.crc32(sender.encode()) % len(SENDER_COLORS)}"

    def _append(self, parts: list) -> None:
        """One line of (text, tags) pairs at the end of the chat (above held lines)."""
        with self._writable():
            self.chat.insert(FLOW_END, *parts, "\n", ("line",))
        self.lines_added += 1

    def _show_notice(self, text: str, style: str = "notice") -> None:
        self._append([f"{clock(time.time())}  ", ("line", "time"), text, ("line", style)])

    def _on_message(self, message: m.Message, earlier: bool = False) -> None:
        own = message.sender == self.name
        if own and not earlier and message.to is None and self._take_own_broadcast(message):
            return
        # A direct message (sent from the command line: the window has no
        # conversations of its own yet) is shown in the chat, marked private.
        text = message.text if message.to is None else f"(private, to {message.to}) {message.text}"
        parts = self._message_parts(message.time, message.sender, text,
                                    self._sender_tag(message.sender))
        if earlier:
            parts[-1] = ("line", "earlier")
        self._append(parts)
        if not own and not earlier and not self.focused:
            self.unread += 1

    def _on_earlier(self, event: Earlier) -> None:
        if event.messages:
            self._show_notice(f"{len(event.messages)} earlier message(s)", "presence")
        for message in event.messages:
            self._on_message(message, earlier=True)

    def _on_presence(self, event: m.Join | m.Leave) -> None:
        if isinstance(event, m.Join):
            self._add_user(event.name)
        else:
            self._remove_user(event.name)
        self._append([f"{clock(event.time)}  ", ("line", "time"),
                      self.fonts.drawable(presence_text(event)), ("line", "presence")])

    def _on_missed(self, event: Missed) -> None:
        # Held lines whose broadcast was lost: they went out before what follows.
        for seq, line in sorted(self.held_acked.items()):
            if seq <= event.last:
                del self.held_acked[seq]
                self.acked_seqs.discard(seq)
                self._release_held(line, time.time())
                self._set_mark(line, "  ✓", "delivered", final=True)
        self._show_notice(f"{event.count} message(s) were lost: no longer in the broker's "
                          "history", "error")

    @contextmanager
    def _writable(self):
        """The chat area is read-only for the user; open it for our own writes."""
        self._write_depth += 1
        if self._write_depth == 1:
            self.chat.configure(state="normal")
        try:
            yield
        finally:
            self._write_depth -= 1
            if self._write_depth == 0:
                self.chat.configure(state="disabled")

    def _trim_scrollback(self) -> None:
        lines = int(self.chat.index("end-1c").split(".")[0])
        if lines > MAX_CHAT_LINES + TRIM_CHUNK_LINES:
            with self._writable():
                self.chat.delete("1.0", f"{lines - MAX_CHAT_LINES}.0")

    # --- scrolling ------------------------------------------------------------------

    def is_at_bottom(self) -> bool:
        return self.chat.yview()[1] >= 1.0

    def scroll_to_newest(self) -> None:
        self.chat.see("end")
        self.new_marker.place_forget()

    def _on_chat_scrolled(self, first: str, last: str) -> None:
        self.chat.vbar.set(first, last)
        if float(last) >= 1.0:
            self.new_marker.place_forget()

    def _show_new_marker(self) -> None:
        self.new_marker.place(relx=1.0, rely=1.0, x=-16, y=-10, anchor="se")

    # --- who is online ----------------------------------------------------------------

    def _set_users(self, names) -> None:
        self.users = []
        self.users_stale = False
        self.user_list.delete(0, "end")
        for name in names:
            self._add_user(name)
        self._count_users()

    def _add_user(self, name: str) -> None:
        if name in self.users:
            return
        index = bisect.bisect(self.users, m.name_key(name), key=m.name_key)
        self.users.insert(index, name)
        shown = self.fonts.drawable(name)
        self.user_list.insert(index, f"{shown} (you)" if name == self.name else shown)
        self._color_user(index)
        self._count_users()

    def _color_user(self, index: int) -> None:
        color = "muted" if self.users_stale else "own" if self.users[index] == self.name else "text"
        self.user_list.itemconfigure(index, foreground=COLORS[color])

    def _mark_users_stale(self) -> None:
        """While the connection is down nobody tells us who comes and goes:
        the list turns grey until the next welcome brings it up to date."""
        if not self.users_stale:
            self.users_stale = True
            for index in range(len(self.users)):
                self._color_user(index)
            self._count_users()

    def _remove_user(self, name: str) -> None:
        if name in self.users:
            index = self.users.index(name)
            del self.users[index]
            self.user_list.delete(index)
            self._count_users()

    def _count_users(self) -> None:
        label = "WHO WAS ONLINE" if self.users_stale else "ONLINE"
        self.users_label.configure(text=f"{label} · {len(self.users)}")

    # --- connection -------------------------------------------------------------------

    def _on_state(self, event: StateChanged) -> None:
        if event.state == State.RECONNECTING and self.connection == State.CONNECTED:
            self._show_notice(f"Connection lost ({event.detail}); reconnecting…")
        retry_at = time.monotonic() + event.retry_in if event.retry_in is not None else None
        self._set_connection(event.state, event.detail, retry_at)

    def _on_joined(self, event: Joined) -> None:
        self.name = event.name
        self._set_users(event.users)
        restarted = " (the broker restarted)" if event.broker_restarted else ""
        self._show_notice(f"Reconnected{restarted}.")

    def _on_join_refused(self, event: JoinRefused) -> None:
        self._show_notice(f"Cannot rejoin as {self.name}: {event.reason}", "error")
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
            self.unread = 0
        self._update_title()

    def _update_title(self) -> None:
        unread = f"({self.unread}) " if self.unread and not self.focused else ""
        title = f"{unread}{self.name} - {TITLE}"
        if self.root.title() != title:
            self.root.title(title)

    # --- the event loop ----------------------------------------------------------------

    def _idle_poll_ms(self) -> int:
        connected = self.connection in (State.CONNECTED, State.CLOSED)
        return SAFETY_POLL_MS if connected else COUNTDOWN_REFRESH_MS

    def _show_events(self) -> None:
        """One bounded batch of the session's events."""
        at_bottom, lines_before = self.is_at_bottom(), self.lines_added
        count = 0
        with self._writable():
            for count, event in enumerate(take_events(self.session.events, EVENTS_PER_TICK), 1):
                handler = self._handlers.get(type(event))
                if handler:
                    handler(event)
            self._trim_scrollback()
        # Follow the newest even when no line was added: a line that grew (a
        # longer mark that wraps) pushes the end out of view just the same,
        # and the view would then no longer count as following.
        if count and at_bottom:
            self.scroll_to_newest()
        elif self.lines_added != lines_before:
            self._show_new_marker()
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
                 encryption: Encryption | None = None, pub_port: int | None = None):
        self.root = root
        self.chat: ChatWindow | None = None
        self.wakeup = Wakeup(root)
        root.bind("<Destroy>", self._on_destroy, add="+")
        apply_style(root)
        root.withdraw()
        self.dialog = LoginDialog(root, host, port, name, on_joined=self._open_chat,
                                  on_cancel=root.destroy, wakeup=self.wakeup,
                                  encryption=encryption, pub_port=pub_port)

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
    App(root, args.host, args.port, args.name, encryption, args.pub_port)
    try:
        root.mainloop()
    except KeyboardInterrupt:
        root.destroy()  # the session says bye on the way out
    return 0


if __name__ == "__main__":
    sys.exit(main())
