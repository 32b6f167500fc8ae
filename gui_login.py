"""The join dialog: asks for a name and the broker's address, joins, and
shows the broker's reason when it refuses a name, asking again."""

from __future__ import annotations

import sys
import tkinter as tk
from tkinter import ttk

import identity
from client_session import (ClientSession, Encryption, Joined, JoinRefused,
                            State, StateChanged, login_name)
from gui_pump import EVENTS_PER_TICK, EventPump, Wakeup, take_events
from gui_style import TITLE

# Earlier messages shown on joining, so a newcomer sees the conversation.
RECENT_ON_JOIN = 50


def warn(why: str) -> None:
    """A problem for whoever started the window, on its standard error."""
    print(f"gui_client.py: {why}", file=sys.stderr)


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

