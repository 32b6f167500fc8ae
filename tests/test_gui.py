"""The chat window in this process: a real Tk on Xvfb against a real broker.

Each test has its own Tk root. Tk is driven from the test's (main) thread by
pumping its loop with ``pump_until`` until what the test waits for is shown.
"""

import gc
import re
import signal
import threading
import time
import tkinter as tk
from tkinter import font as tkfont

import pytest

import gui_client
import gui_input
import messages as m
from client_session import login_name
from gui_client import COLORS, App, ChatWindow
from hostile_text import HOSTILE_TEXTS, assert_neutralised
from procs import listen, run_cli, wait_until
from xvfb import x_display  # noqa: F401  (the fixture)

pytestmark = pytest.mark.gui


def pump_until(root: tk.Tk, condition, timeout: float = 10, what: str = "condition"):
    """Run Tk's loop until ``condition()`` is true; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        root.update()
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)  # let the session thread and the broker work


def destroyed(root: tk.Tk) -> bool:
    try:
        return not root.winfo_exists()
    except tk.TclError:  # the whole application is gone
        return True


def type_into(entry, text: str) -> None:
    entry.delete(0, "end")
    entry.insert(0, text)


def session_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "zchat-session"]


@pytest.fixture
def root(x_display):  # noqa: F811
    root = tk.Tk()
    yield root
    if not destroyed(root):
        root.destroy()
    wait_until(lambda: not session_threads(), 5, "the session threads to end")
    # Free this root's reference cycles here: Tcl aborts the process when
    # an interpreter is deleted by another thread's garbage collection.
    gc.collect()


def open_chat(root: tk.Tk, broker, name: str) -> ChatWindow:
    app = App(root, "127.0.0.1", broker.port, name)
    return pump_until(root, lambda: app.chat, 10, f"{name} to join")


def chat_text(window: ChatWindow) -> str:
    return window.chat.get("1.0", "end-1c")


def shown_line(window: ChatWindow, needle: str) -> str | None:
    return next((line for line in chat_text(window).splitlines() if needle in line), None)


def press_enter(widget) -> None:
    widget.focus_force()
    widget.event_generate("<Return>")


def click_text(text: tk.Text, index: str) -> None:
    """A click on the character at ``index``, as the mouse makes it."""
    text.see(index)
    text.update_idletasks()
    x, y, width, height = text.bbox(index)
    at = {"x": x + width // 2, "y": y + height // 2}
    text.event_generate("<Motion>", **at)  # Tk finds the tags under the pointer
    text.event_generate("<Button-1>", **at)
    text.event_generate("<ButtonRelease-1>", **at)


def line_height(window: ChatWindow, needle: str) -> int:
    """How tall on screen, in pixels, the chat's line holding ``needle`` is.

    Not ``count -displaylines``: Tk counts a line's lines on screen by
    laying it out again from its start for each one, and a 4 KB word at the
    narrowest width, one character a line, took a minute to count."""
    line = int(window.chat.search(needle, "1.0").split(".")[0])
    chat = window.chat
    return int(chat.tk.call(chat._w, "count", "-update", "-ypixels", f"{line}.0", f"{line + 1}.0"))


def text_width(window: ChatWindow, text: str) -> int:
    """How wide ``text`` is in the chat's font, in pixels."""
    return int(window.chat.tk.call("font", "measure", window.chat.cget("font"), text))


def fill_the_view(root: tk.Tk, window: ChatWindow, broker, count: int = 60) -> None:
    lines = "".join(f"line {i}\n" for i in range(count))
    assert run_cli(broker, "send", name="bob", input=lines).returncode == 0
    pump_until(root, lambda: shown_line(window, f"line {count - 1}"), what=f"{count} lines")
    assert window.is_at_bottom() and window.chat.yview()[0] > 0  # it scrolled, and followed


def test_enter_sends_the_field_clears_it_and_marks_the_message_delivered(broker, clients, root):
    ears = listen(broker, "ears")
    clients.append(ears)
    window = open_chat(root, broker, "alice")
    window.entry.insert(0, "   ")
    press_enter(window.entry)  # whitespace only: not sent
    window.entry.delete(0, "end")
    window.entry.insert(0, "hello from the window")
    press_enter(window.entry)
    assert window.entry.get() == ""
    pump_until(root, lambda: "✓" in (shown_line(window, "hello from the window") or ""),
               what="the message marked delivered")
    window.entry.insert(0, "and from the button")
    window.send_button.invoke()
    wait_until(lambda: len(ears.messages()) >= 2, 10, "2 messages at the listener")
    assert [(r["from"], r["text"]) for r in ears.messages()] == [
        ("alice", "hello from the window"), ("alice", "and from the button")]
    line = shown_line(window, "hello from the window")
    assert re.fullmatch(r"\d\d:\d\d:\d\d  alice  hello from the window  ✓", line)
    assert chat_text(window).count("hello from the window") == 1  # not again when broadcast


def test_messages_from_others_show_time_sender_and_neutralised_text(broker, root):
    window = open_chat(root, broker, "alice")
    text = "héllo 世界 🎉 \x1b[31mred\x1b[0m \u202eevil\u202c end"
    assert run_cli(broker, "send", text, name="bob").returncode == 0
    line = pump_until(root, lambda: shown_line(window, "bob  "), what="bob's message")
    party = re.escape(window.fonts.drawable("🎉"))  # as is where a font has it
    assert re.fullmatch(r"\d\d:\d\d:\d\d  bob  héllo 世界 " + party +
                        r" \\x1b\[31mred\\x1b\[0m \\u202eevil\\u202c end", line)
    assert not {"\x1b", "\u202e", "\u202c"} & set(chat_text(window))
    bob_at = window.chat.search("bob  ", "1.0")
    alice_joined_at = window.chat.search("alice joined", "1.0")
    assert re.fullmatch(r"sender\d", _style_tag(window, bob_at))
    assert _style_tag(window, alice_joined_at) == "presence"


def test_hostile_control_sequences_are_neutralised(broker, root):
    window = open_chat(root, broker, "alice")
    for name, text in HOSTILE_TEXTS.items():
        assert run_cli(broker, "send", text, name="evil").returncode == 0, name
    pump_until(root, lambda: chat_text(window).count("evil  ") == len(HOSTILE_TEXTS),
               what="every hostile message")
    shown = chat_text(window)
    for text in HOSTILE_TEXTS.values():
        assert_neutralised(shown, text)


def test_joining_shows_the_last_50_earlier_messages_marked(broker, root):
    lines = [f"before {i}" for i in range(60)]
    assert run_cli(broker, "send", name="bob", input="\n".join(lines)).returncode == 0
    window = open_chat(root, broker, "alice")
    pump_until(root, lambda: shown_line(window, "before 59"), what="the earlier messages")
    shown = chat_text(window)
    assert "50 earlier message(s)" in shown
    assert "before 9\n" not in shown + "\n" and shown.count("before ") == 50
    at = window.chat.search("before 10", "1.0")
    assert "earlier" in window.chat.tag_names(at)


def _style_tag(window: ChatWindow, index: str) -> str:
    return next(t for t in window.chat.tag_names(index) if t != "line")


def test_long_lines_wrap_and_own_lines_look_different(broker, root):
    window = open_chat(root, broker, "alice")
    long_text = " ".join(["wrapping"] * 120)
    window.entry.insert(0, long_text)
    press_enter(window.entry)
    pump_until(root, lambda: "✓" in chat_text(window), what="the long message delivered")
    start = window.chat.search(long_text[:40], "1.0")
    line_number = start.split(".")[0]
    display_lines = window.chat.count(f"{line_number}.0", f"{line_number}.end", "displaylines")
    assert display_lines and display_lines[0] >= 3
    assert _style_tag(window, window.chat.search("alice  ", "1.0")) == "own"


def test_user_list_follows_join_and_leave(broker, clients, root):
    window = open_chat(root, broker, "alice")
    assert window.users_label.cget("text") == "ONLINE · 1"  # the welcome's count, at once
    pump_until(root, lambda: window.user_list.get(0, "end") == ("alice (you)",),
               what="the list loaded")
    carol = listen(broker, "carol")
    clients.append(carol)
    pump_until(root, lambda: window.user_list.get(0, "end") == ("alice (you)", "carol"),
               what="carol in the list")
    assert "ONLINE · 2" == window.users_label.cget("text")
    carol.proc.send_signal(signal.SIGINT)  # leaves properly: others see quit
    pump_until(root, lambda: window.user_list.get(0, "end") == ("alice (you)",),
               what="carol gone from the list")
    assert "carol left (quit)" in chat_text(window)


def test_refused_names_show_the_brokers_reason_and_ask_again(broker, clients, root):
    clients.append(listen(broker, "dave"))
    app = App(root, "127.0.0.1", broker.port, None)
    dialog = app.dialog
    pump_until(root, lambda: dialog.top.winfo_ismapped(), what="the dialog")
    assert dialog.host_entry.get() == "127.0.0.1"
    assert dialog.port_entry.get() == str(broker.port)
    type_into(dialog.name_entry, "no spaces")
    dialog.join_button.invoke()
    pump_until(root, lambda: m.name_problem("no spaces") in dialog.message.cget("text"),
               what="the broker's reason for an invalid name")
    type_into(dialog.name_entry, "DAVE")
    press_enter(dialog.name_entry)
    pump_until(root, lambda: "taken" in dialog.message.cget("text"), what="name taken")
    assert app.chat is None and root.state() == "withdrawn"
    type_into(dialog.name_entry, "dave2")
    press_enter(dialog.name_entry)
    window = pump_until(root, lambda: app.chat, what="the chat to open")
    assert window.name == "dave2" and root.title() == "dave2 - zchat"
    assert not dialog.top.winfo_exists()
    assert root.focus_get() is window.entry


def test_cancel_in_the_dialog_quits_without_joining(broker, clients, root):
    ears = listen(broker, "ears")
    clients.append(ears)
    app = App(root, "127.0.0.1", broker.port, "ears")  # taken: the dialog shows
    pump_until(root, lambda: "taken" in app.dialog.message.cget("text"), what="name taken")
    app.dialog.top.event_generate("<Escape>")
    assert destroyed(root)
    wait_until(lambda: not session_threads(), 5, "the session thread to end")


def test_title_counts_unread_messages_while_the_window_is_not_focused(broker, root):
    window = open_chat(root, broker, "alice")
    other = tk.Toplevel(root)
    other.focus_force()
    pump_until(root, lambda: not window.focused, what="the window to lose focus")
    assert run_cli(broker, "send", name="bob", input="one\ntwo\n").returncode == 0
    pump_until(root, lambda: root.title() == "(2) alice - zchat", what="2 unread in the title")
    window.entry.focus_force()
    pump_until(root, lambda: root.title() == "alice - zchat", what="the count cleared")


def test_view_stays_put_when_scrolled_up_and_a_marker_shows_new_messages(broker, root):
    window = open_chat(root, broker, "alice")
    fill_the_view(root, window, broker, 80)
    window.chat.yview_moveto(0)
    assert run_cli(broker, "send", "newer", name="bob").returncode == 0
    pump_until(root, lambda: shown_line(window, "newer"), what="the newer message")
    root.update()
    assert window.chat.yview()[0] == 0.0
    assert window.new_marker.winfo_ismapped()
    window.new_marker.invoke()
    pump_until(root, lambda: window.is_at_bottom() and not window.new_marker.winfo_ismapped(),
               what="back at the newest, marker gone")


def test_status_line_and_queued_message_through_a_broker_restart(make_broker, clients, root):
    broker = make_broker("--heartbeat-interval", "0.2")
    window = open_chat(root, broker, "alice")
    address = f"127.0.0.1:{broker.port}"
    assert window.status.cget("text") == f"Connected to {address} as alice"
    broker.kill()
    pump_until(root, lambda: "next attempt in" in window.status.cget("text"),
               what="reconnecting")
    assert window.status.cget("text").startswith(f"Reconnecting to {address}")
    assert window.entry.instate(["!disabled"])
    for text in ("typed while away", "and a second"):
        window.entry.insert(0, text)
        press_enter(window.entry)
        assert "waiting for the connection" in shown_line(window, text)
    again = make_broker("--heartbeat-interval", "0.2", port=broker.port)
    ears = listen(again, "ears", "--history", "10")
    clients.append(ears)
    pump_until(root, lambda: window.status.cget("text") == f"Connected to {address} as alice",
               15, "connected again")
    pump_until(root, lambda: shown_line(window, "and a second").endswith("✓"),
               what="the queued messages delivered")
    shown = chat_text(window)
    assert "Reconnected (the broker restarted)." in shown
    # Shown where they were sent: after the reconnection, not where typed.
    assert shown.index("Reconnected") < shown.index("typed while away") < shown.index("and a")
    assert shown_line(window, "typed while away").endswith("✓")
    ears.out.wait_for(lambda line: '"text": "and a second"' in line, 10, "the messages")


def next_attempt_in(window: ChatWindow) -> float:
    found = re.search(r"next attempt in ([\d.]+) s", window.status.cget("text"))
    return float(found.group(1)) if found else 0.0


def test_a_message_typed_offline_shows_after_what_others_said_before_it(make_broker, clients,
                                                                         root, tmp_path):
    db = str(tmp_path / "chat.db")  # the history survives the restart: alice catches up
    broker = make_broker("--heartbeat-interval", "0.2", "--db", db)
    window = open_chat(root, broker, "alice")
    broker.kill()
    # Her next attempt a while off, so bob speaks before she is back.
    pump_until(root, lambda: next_attempt_in(window) >= 1.5, what="a longer backoff")
    window.entry.insert(0, "typed while away")
    press_enter(window.entry)
    again = make_broker("--heartbeat-interval", "0.2", "--db", db, port=broker.port)
    assert run_cli(again, "send", "said meanwhile", name="bob").returncode == 0
    pump_until(root, lambda: (shown_line(window, "typed while away") or "").endswith("✓")
               and shown_line(window, "said meanwhile"), 15, "both messages")
    ears = listen(again, "ears", "--history", "10")
    clients.append(ears)
    wait_until(lambda: len(ears.messages()) == 2, 10, "both messages at a listener")
    assert [said["text"] for said in ears.messages()] == ["said meanwhile", "typed while away"]
    shown = chat_text(window)
    assert (shown.index("Reconnected") < shown.index("said meanwhile")
            < shown.index("typed while away")), shown
    assert shown.count("typed while away") == 1


def test_closing_the_window_leaves_at_once_with_quit(broker, clients, root):
    ears = listen(broker, "ears")
    clients.append(ears)
    open_chat(root, broker, "alice")
    ears.out.wait_for(lambda line: '"name": "alice"' in line, 10, "alice to join")
    root.tk.call(root.protocol("WM_DELETE_WINDOW"))  # what the close button does
    assert destroyed(root)
    wait_until(lambda: not session_threads(), 5, "the session thread to end")
    leave = ears.out.wait_for(lambda line: '"type": "leave"' in line, 5, "alice to leave")
    assert '"reason": "quit"' in leave


# The window sends no text over the limit the broker's welcome gave (see
# test_a_paste_over_the_limit_is_not_sent_and_stays_in_the_field). The
# broker can still refuse one: typed while the connection was down, it goes
# to a broker that came back with a smaller limit.
SMALLER_LIMIT = 2048


def test_a_refused_message_goes_back_into_the_field_or_is_offered_to_edit(make_broker, root):
    broker = make_broker("--heartbeat-interval", "0.2")
    window = open_chat(root, broker, "alice")
    broker.kill()
    pump_until(root, lambda: "next attempt in" in window.status.cget("text"),
               what="reconnecting")
    first, second = "x" * (SMALLER_LIMIT + 4), "y" * (SMALLER_LIMIT + 4)
    for text in (first, second):  # within the limit the window knows
        type_into(window.entry, text)
        press_enter(window.entry)
        assert window.entry.get() == ""
    make_broker("--heartbeat-interval", "0.2", "--max-text", str(SMALLER_LIMIT),
                port=broker.port)
    pump_until(root, lambda: chat_text(window).count("✗ not sent") == 2, 15, "both refusals")
    assert shown_line(window, "alice  x").endswith(
        f"✗ not sent: message is {SMALLER_LIMIT + 4} bytes; the limit is {SMALLER_LIMIT} · edit")
    # The first refusal found the field empty: its text is back. The second
    # found the first's text there, left alone: its own is offered to edit.
    assert window.entry.get() == first
    window.entry.delete(0, "end")
    click_text(window.chat, window.chat.tag_prevrange("link", "end")[0])
    assert window.entry.get() == second
    # The new welcome's limit holds from now on: over it, nothing goes.
    press_enter(window.entry)
    assert shown_line(window, f"too long: {SMALLER_LIMIT + 4} bytes, the limit is {SMALLER_LIMIT}")
    assert window.entry.get() == second


# A paste of this on one line: a log or an article, not even hostile. Tk
# counts a line's lines on screen by laying it out again from its start for
# each one, so the field's growing with it once froze the window for half a
# minute at the narrowest width (about 2,000 lines on screen).
LONG_PASTE = "pasted " * 4700  # 32 KB
# A paste, and then a key typed after it, each shown within this (it takes
# milliseconds; generous for a loaded machine).
RESPONSIVE_SECONDS = 2.0


def test_a_long_paste_into_the_field_leaves_the_window_responsive(broker, root):
    window = open_chat(root, broker, "alice")
    root.geometry("480x320")  # the narrowest window: the most lines on screen
    pump_until(root, lambda: root.winfo_width() == 480, what="the narrow window")
    entry = window.entry
    entry.focus_force()
    root.clipboard_clear()
    root.clipboard_append(LONG_PASTE)
    for what, act in [("the paste", lambda: entry.event_generate("<<Paste>>")),
                      ("a key typed after it", lambda: entry.insert("end", "!"))]:
        started = time.monotonic()
        act()
        root.update()  # the field fits itself to its text
        took = time.monotonic() - started
        assert took < RESPONSIVE_SECONDS, f"{what} took {took:.1f}s"
    assert entry.get() == LONG_PASTE + "!"
    assert int(entry.cget("height")) == gui_input.MAX_INPUT_LINES  # it grew, and no more


# A paste far over the broker's limit (max_text): an article, a log.
HUGE_PASTE = "pasted " * 15_000  # 105 KB


def test_a_paste_over_the_limit_is_not_sent_and_stays_in_the_field(broker, root):
    window = open_chat(root, broker, "alice")
    root.geometry("480x320")  # the narrowest window: the most lines on screen
    pump_until(root, lambda: root.winfo_width() == 480, what="the narrow window")
    fill_the_view(root, window, broker)
    entry = window.entry
    entry.focus_force()
    root.clipboard_clear()
    root.clipboard_append(HUGE_PASTE)
    size = len(HUGE_PASTE.encode())
    for what, act in [("the paste", lambda: entry.event_generate("<<Paste>>")),
                      ("Enter", lambda: press_enter(entry)),
                      ("a scroll of the chat", lambda: window.chat.yview_scroll(-1, "pages")),
                      ("a scroll back", lambda: window.chat.yview_scroll(1, "pages"))]:
        started = time.monotonic()
        act()
        root.update()
        took = time.monotonic() - started
        assert took < RESPONSIVE_SECONDS, f"{what} took {took:.1f}s"
    # Told at once, and nothing lost: the text waits in the field, to shorten.
    limit = m.DEFAULT_MAX_TEXT_BYTES
    assert shown_line(window, f"too long: {size} bytes, the limit is {limit}")
    assert entry.get() == HUGE_PASTE
    assert shown_line(window, "pasted") is None  # not in the chat, not sent
    assert window.pending == {}
    # Cut to the limit, it goes.
    type_into(entry, HUGE_PASTE[:limit])
    press_enter(entry)
    pump_until(root, lambda: (shown_line(window, "alice  pasted") or "").endswith("✓"),
               what="the shortened text delivered")
    assert entry.get() == ""


def test_a_window_made_smaller_at_the_newest_line_still_shows_it(broker, root):
    window = open_chat(root, broker, "alice")
    root.geometry("480x600")
    pump_until(root, lambda: root.winfo_height() == 600, what="the tall window")
    fill_the_view(root, window, broker)
    chat_height = window.chat.winfo_height()
    root.geometry("480x320")  # the chat loses lines at its bottom edge
    pump_until(root, lambda: window.chat.winfo_height() < chat_height, what="the chat to shrink")
    root.update()
    assert window.is_at_bottom(), window.chat.yview()  # the newest line still in view


def test_a_narrow_window_gives_the_chat_the_room_the_people_list_had(broker, root):
    """At the narrowest size the people list steps aside (``/users`` still
    lists them) so a line of chat is not a word or a letter wide; it comes
    back when the window is wide again."""
    window = open_chat(root, broker, "alice")
    assert window.user_list.winfo_ismapped()
    root.geometry("480x320")
    pump_until(root, lambda: root.winfo_width() == 480, what="the narrow window")
    root.update()
    assert not window.user_list.winfo_ismapped()
    assert window.chat.winfo_width() >= root.winfo_width() // 2, window.chat.winfo_width()
    sentence = "the quick brown fox jumps over the lazy dog"
    assert run_cli(broker, "send", sentence, name="bob").returncode == 0
    pump_until(root, lambda: shown_line(window, sentence), what="bob's sentence")
    one_line = line_height(window, "alice")  # alice's own join notice: one line
    assert line_height(window, sentence) <= 2 * one_line  # not a word a line
    root.geometry("960x580")
    pump_until(root, lambda: window.user_list.winfo_ismapped(), what="the people list back")


BOB = "bob_who_writes_under_a_long_name"  # 32 characters: the longest name


def test_the_view_keeps_following_when_a_refusal_makes_the_last_line_taller(broker, root):
    window = open_chat(root, broker, "alice")
    # Narrow, and a long name: the refusal's mark ("not sent: NAME is not
    # online") is longer than a line on screen, so the refused line is
    # taller (more lines on screen) than it was while pending.
    root.geometry("480x320")
    pump_until(root, lambda: root.winfo_width() == 480, what="the narrow window")
    assert window.chat.winfo_width() < text_width(window, f"  ✗ not sent: {BOB} is not online")
    # bob writes to alice, and is gone: the broker refuses her answer.
    lines = "".join(f"line {i}\n" for i in range(60))
    assert run_cli(broker, "send", "--to", "alice", name=BOB, input=lines).returncode == 0
    pump_until(root, lambda: "@" + BOB.lower() in window.conversations, what="bob's messages")
    window.show(window.conversations["@" + BOB.lower()])
    pump_until(root, lambda: shown_line(window, "line 59"), what="60 lines")
    root.update()
    assert window.is_at_bottom() and window.chat.yview()[0] > 0  # it scrolled, and followed
    type_into(window.entry, "x" * 4000)
    press_enter(window.entry)
    while_pending = line_height(window, "alice  x")
    pump_until(root, lambda: f"not sent: {BOB} is not online" in chat_text(window),
               what="the refusal")
    assert line_height(window, "alice  x") > while_pending  # what this test is about
    assert run_cli(broker, "send", "--to", "alice", "after the refusal",
                   name=BOB).returncode == 0
    pump_until(root, lambda: shown_line(window, "after the refusal"), what="the next message")
    root.update()
    assert window.is_at_bottom(), window.chat.yview()  # still following
    assert not window.new_marker.winfo_ismapped()


def test_the_user_list_turns_grey_while_the_connection_is_down(make_broker, clients, root):
    broker = make_broker("--heartbeat-interval", "0.2")
    window = open_chat(root, broker, "alice")
    clients.append(listen(broker, "bob"))
    pump_until(root, lambda: window.user_list.get(0, "end") == ("alice (you)", "bob"),
               what="bob in the list")

    def colors():
        return [window.user_list.itemcget(i, "foreground") for i in range(window.user_list.size())]

    assert colors() == [COLORS["own"], COLORS["text"]]
    assert window.users_label.cget("text") == "ONLINE · 2"
    broker.kill()
    pump_until(root, lambda: window.status.cget("text").startswith("Reconnecting"),
               what="reconnecting")
    assert colors() == [COLORS["muted"]] * 2
    assert window.users_label.cget("text") == "WHO WAS ONLINE · 2"
    make_broker("--heartbeat-interval", "0.2", port=broker.port)
    pump_until(root, lambda: window.status.cget("text").startswith("Connected"), 15,
               "connected again")
    assert window.user_list.get(0) == "alice (you)" and colors()[0] == COLORS["own"]
    assert set(colors()[1:]) <= {COLORS["text"]}  # bob, if he is back already
    assert window.users_label.cget("text").startswith("ONLINE · ")


def test_the_dialog_suggests_the_login_name(broker, root):
    app = App(root, "127.0.0.1", broker.port, None)
    dialog = app.dialog
    pump_until(root, lambda: dialog.top.winfo_ismapped(), what="the dialog")
    assert dialog.name_entry.get() == login_name()
    press_enter(dialog.name_entry)
    window = pump_until(root, lambda: app.chat, what="the chat to open")
    assert window.name == login_name()


def test_an_idle_window_sleeps_until_the_session_has_events(broker, root, monkeypatch):
    # Only a wakeup from the session's thread can bring a message in now.
    monkeypatch.setattr(gui_client, "SAFETY_POLL_MS", 60_000)
    window = open_chat(root, broker, "alice")
    pump_until(root, lambda: window.session.events.empty() and "alice joined" in chat_text(window),
               what="a quiet window")
    cpu_before, wall_before = time.thread_time(), time.monotonic()
    root.after(2000, root.quit)
    root.mainloop()
    cpu, wall = time.thread_time() - cpu_before, time.monotonic() - wall_before
    assert cpu < 0.01 * wall, f"Tk's thread took {1000 * cpu:.1f} ms in {wall:.1f} s idle"
    assert run_cli(broker, "send", "wake up", name="bob").returncode == 0
    pump_until(root, lambda: shown_line(window, "wake up"), 5, "the message")


def test_emoji_no_installed_font_has_show_as_a_readable_placeholder(broker, root):
    window = open_chat(root, broker, "alice")
    assert run_cli(broker, "send", "party 🎉 private \U0010fffd", name="bob").returncode == 0
    line = pump_until(root, lambda: shown_line(window, "bob  "), what="bob's message")
    # No font has a private-use character: readable, not an empty box.
    assert line.endswith(" private [U+10FFFD]")
    party = "🎉" if window.fonts.has("🎉") else "[U+1F389]"
    assert line.endswith(f"bob  party {party} private [U+10FFFD]")
    assert window.fonts.has("A")
    if "Symbola" in tkfont.families(root):  # Debian's fonts-symbola: drawn, not a box
        assert party == "🎉"
