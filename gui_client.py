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

Its parts: gui_login.py (the dialog), gui_conversation.py (one conversation's
widget and lines), gui_input.py (the field), gui_pump.py (how the session's
events reach Tk), gui_style.py (colours, theme, font coverage); this module
is the window that holds them (ChatWindow), and the program (App, main).

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
import html
import itertools
import shutil
import subprocess
import sys
import time
import tkinter as tk
import zlib
from collections import OrderedDict
from typing import Callable
from tkinter import font as tkfont
from tkinter import ttk
from tkinter.scrolledtext import ScrolledText

import chat_commands
import messages as m
import keys
from client_core import BrokerRefused, RoomJoined, RoomParted
from client_session import (Acked, ClientSession, Earlier, Encryption, Joined, JoinRefused,
                            Missed, Refused, State, StateChanged, add_connection_arguments,
                            choose_brokers, encryption_from_args)
from display import clock, presence_text, visible
from gui_conversation import Conversation, OwnLine
from gui_input import InputField
from gui_login import LoginDialog, warn
from gui_pump import EVENTS_PER_TICK, SAFETY_POLL_MS, EventPump, Wakeup, take_events
from gui_style import COLORS, SENDER_COLORS, TITLE, FontCoverage, apply_style

# While reconnecting, the status line counts down.
COUNTDOWN_REFRESH_MS = 200

# Narrower than this, the window has no room for the people list beside a
# readable chat (sidebar 180 px + list ~170 px left the chat 90 px at the
# 480 px minimum): the list steps aside and ``/users`` still names them.
PEOPLE_LIST_MIN_WINDOW_PX = 720


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="zchat desktop window. Without --name (or CHAT_NAME) a dialog asks, "
                    "your login name filled in.")
    add_connection_arguments(p)
    args = p.parse_args(argv)
    choose_brokers(args)
    return args


# --- the chat window --------------------------------------------------------------------

NOTIFICATION_TEXT_CHARS = 200


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

