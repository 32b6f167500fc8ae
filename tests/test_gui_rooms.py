"""The window's conversations: rooms and direct messages in a sidebar, each
with its own messages, scroll position and unread counts; the /commands;
mentions and their notification; multi-line messages and links.

Real Tk on Xvfb against a real broker, as in test_gui.py (whose helpers these use).
"""

import json
import time

import pytest

import gui_client
import gui_conversation
from procs import listen, run_cli, wait_until
from test_gui import (chat_text, click_text, fill_the_view, open_chat, press_enter, pump_until,
                      root, shown_line, type_into)  # noqa: F401  (root: the fixture)
from xvfb import x_display  # noqa: F401  (the fixture)

pytestmark = pytest.mark.gui


def command(window, text: str) -> None:
    """Types ``text`` into the field and presses Enter."""
    type_into(window.entry, text)
    press_enter(window.entry)


def join_room(root, window, room: str) -> None:
    command(window, f"/join {room}")
    pump_until(root, lambda: window.current.room == room, what=f"{room} on screen")


def click_sidebar(root, window, key: str) -> None:
    window.sidebar_items[key].event_generate("<Button-1>")
    root.update()


def lose_focus(root, window) -> None:
    other = gui_client.tk.Toplevel(root)
    other.focus_force()
    pump_until(root, lambda: not window.focused, what="the window to lose focus")


def test_switching_rooms_keeps_each_rooms_messages_and_scroll(broker, root):
    window = open_chat(root, broker, "alice")
    fill_the_view(root, window, broker, 80)
    window.chat.yview_moveto(0)  # reading back in #general
    root.update()
    general = window.chat
    join_room(root, window, "#lab")
    assert [window.sidebar_text(k) for k in ("#general", "#lab")] == ["#general", "#lab"]
    assert run_cli(broker, "send", "--room", "#lab", "in the lab", name="bob").returncode == 0
    pump_until(root, lambda: shown_line(window, "in the lab"), what="bob's message in #lab")
    assert run_cli(broker, "send", "back in general", name="bob").returncode == 0
    pump_until(root, lambda: window.sidebar_text("#general") == "#general 1",
               what="one unread in #general")
    assert root.title() == "(1) alice - zchat"
    assert "back in general" not in chat_text(window)
    assert window.chat is not general
    click_sidebar(root, window, "#general")
    assert window.chat is general and window.current.room == "#general"
    assert window.chat.yview()[0] == 0.0, "the scroll position is the room's own"
    assert window.new_marker.winfo_ismapped()
    assert shown_line(window, "back in general") and "in the lab" not in chat_text(window)
    assert window.sidebar_text("#general") == "#general" and root.title() == "alice - zchat"
    command(window, "/switch #lab")
    assert window.current.room == "#lab" and shown_line(window, "in the lab")
    assert window.is_at_bottom()


def test_switching_is_instant_with_thousands_of_messages(broker, root):
    window = open_chat(root, broker, "alice")
    join_room(root, window, "#lab")
    lines = "".join(f"lab line {i}\n" for i in range(3000))
    assert run_cli(broker, "send", "--room", "#lab", name="bob", input=lines).returncode == 0
    pump_until(root, lambda: shown_line(window, "lab line 2999"), 60, "3000 lines in #lab")
    slowest = 0.0
    for key in ["#general", "#lab"] * 5:
        started = time.perf_counter()
        click_sidebar(root, window, key)
        slowest = max(slowest, time.perf_counter() - started)
    assert slowest < 0.1, f"a switch took {1000 * slowest:.0f} ms"


def test_the_people_list_shows_who_is_in_the_room_on_screen(broker, clients, root):
    window = open_chat(root, broker, "alice")
    clients.append(listen(broker, "bob"))
    pump_until(root, lambda: window.user_list.get(0, "end") == ("alice (you)", "bob"),
               what="bob in #general")
    join_room(root, window, "#lab")
    pump_until(root, lambda: window.user_list.get(0, "end") == ("alice (you)",),
               what="alice alone in #lab")
    clients.append(listen(broker, "carol", "--room", "#lab"))
    pump_until(root, lambda: window.user_list.get(0, "end") == ("alice (you)", "carol"),
               what="carol in #lab")
    click_sidebar(root, window, "#general")
    pump_until(root, lambda: window.user_list.get(0, "end") == ("alice (you)", "bob"),
               what="#general's people again")


def test_a_direct_message_from_the_command_line_gets_its_own_conversation(broker, clients,
                                                                          root):
    window = open_chat(root, broker, "alice")
    said = run_cli(broker, "send", "--to", "alice", "psst, are you there", name="bob")
    assert said.returncode == 0
    pump_until(root, lambda: "@bob" in window.sidebar_items, what="a conversation with bob")
    assert window.sidebar_text("@bob") == "bob 1"
    assert window.current.room == "#general" and "psst" not in chat_text(window)
    assert root.title() == "(1) alice - zchat"
    click_sidebar(root, window, "@bob")
    assert shown_line(window, "bob  psst, are you there")
    assert window.sidebar_text("@bob") == "bob" and root.title() == "alice - zchat"
    assert window.user_list.get(0, "end") == ("bob",)
    bob = listen(broker, "bob")  # direct messages are printed with rooms
    clients.append(bob)
    command(window, "a reply for bob alone")
    pump_until(root, lambda: (shown_line(window, "a reply for bob") or "").endswith("✓"),
               what="the reply delivered")
    record = json.loads(bob.out.wait_for(lambda line: "a reply" in line, 10, "the reply"))
    assert (record["from"], record["to"]) == ("alice", "bob")


def test_commands_typed_into_the_field(broker, clients, root):
    ears = listen(broker, "ears", "--room", "#general", "--room", "#lab")
    clients.append(ears)
    window = open_chat(root, broker, "alice")
    command(window, "/nonsense here")
    assert "unknown command /nonsense" in chat_text(window)
    assert window.entry.get() == "/nonsense here"  # kept, to correct
    command(window, "/help")
    assert "/join ROOM" in chat_text(window) and "/me ACTION" in chat_text(window)
    join_room(root, window, "#lab")
    command(window, "/topic robots   and more")
    pump_until(root, lambda: window.header_topic.cget("text") == "robots   and more",
               what="the topic in the header")
    command(window, "/me waves")
    pump_until(root, lambda: (shown_line(window, "* alice waves") or "").endswith("✓"),
               what="the action shown")
    command(window, "/rooms")
    pump_until(root, lambda: "#lab (2): robots   and more" in chat_text(window),
               what="the room list")
    command(window, "/msg ears hello ears")
    pump_until(root, lambda: window.current.peer == "ears" and
               (shown_line(window, "hello ears") or "").endswith("✓"), what="the direct message")
    click_sidebar(root, window, "#lab")
    command(window, "/part")
    pump_until(root, lambda: "#lab" not in window.sidebar_items, what="#lab gone")
    assert window.current.room == "#general"
    records = [json.loads(line) for line in ears.out.lines]
    said = [(r.get("room"), r.get("to"), r["text"]) for r in records if r["type"] == "message"]
    assert said == [("#lab", None, "/me waves"), (None, "ears", "hello ears")]
    assert not any("nonsense" in line for line in ears.out.lines)


def test_mentions_are_highlighted_counted_apart_and_notify_once_per_burst(broker, root,
                                                                          monkeypatch):
    notified = []
    monkeypatch.setattr(gui_client, "notify_desktop", lambda *what: notified.append(what))
    window = open_chat(root, broker, "alice")
    join_room(root, window, "#lab")
    lose_focus(root, window)
    said = ["plain talk", "ALICE, look", "and @room too", "malice is no mention",
            "alice.", "alice_2 is someone else"]
    assert run_cli(broker, "send", name="bob", input="\n".join(said)).returncode == 0
    pump_until(root, lambda: window.sidebar_text("#general") == "#general 6 · @3",
               what="6 unread, 3 mentions")
    assert root.title() == "(6 · @3) alice - zchat"
    assert len(notified) == 1 and notified[0][0] == "bob (#general)"
    assert notified[0][1] == "ALICE, look"
    click_sidebar(root, window, "#general")
    highlighted = {window.chat.get(*window.chat.tag_prevrange("mention", f"{at}+1c")).strip()
                   for at in map(lambda t: window.chat.search(t, "1.0"), said)
                   if "mention" in window.chat.tag_names(f"{at}+1c")}
    assert highlighted == {"ALICE, look", "and @room too", "alice."}
    # Still away, and still in the same burst: no second notification.
    assert run_cli(broker, "send", "--to", "alice", "alice?", name="bob").returncode == 0
    pump_until(root, lambda: "@bob" in window.sidebar_items, what="bob's direct message")
    assert len(notified) == 1


def test_a_direct_message_while_away_notifies_and_without_notify_send_nothing_fails(
        broker, root, monkeypatch):
    window = open_chat(root, broker, "alice")
    lose_focus(root, window)
    monkeypatch.setenv("PATH", "")  # no notify-send: the real hook does nothing, quietly
    rung = []
    monkeypatch.setattr(root, "bell", lambda *a: rung.append(a))
    assert run_cli(broker, "send", "--to", "alice", "psst", name="bob").returncode == 0
    pump_until(root, lambda: "@bob" in window.sidebar_items, what="bob's direct message")
    assert window.sidebar_text("@bob") == "bob 1" and len(rung) == 1


def test_shift_enter_and_a_paste_send_one_message_with_its_line_breaks(broker, clients, root):
    ears = listen(broker, "ears")
    clients.append(ears)
    window = open_chat(root, broker, "alice")
    entry = window.entry
    entry.focus_force()
    entry.insert("insert", "first line")
    entry.event_generate("<Shift-Return>")
    entry.insert("insert", "second line")
    root.update()
    assert int(entry.cget("height")) == 2  # the field grew
    press_enter(entry)
    root.clipboard_clear()
    root.clipboard_append("Traceback:\n    File x, line 1\nValueError: no")
    entry.event_generate("<<Paste>>")
    press_enter(entry)
    wait_until(lambda: len(ears.messages()) == 2, 10, "two messages at the listener")
    assert [r["text"] for r in ears.messages()] == [
        "first line\nsecond line", "Traceback:\n    File x, line 1\nValueError: no"]
    pump_until(root, lambda: chat_text(window).count("✓") == 2, what="both delivered")
    assert int(entry.cget("height")) == 1
    code_at = window.chat.search("    File x, line 1", "1.0")
    assert "code" in window.chat.tag_names(code_at)
    assert "code" not in window.chat.tag_names(window.chat.search("ValueError", "1.0"))
    assert shown_line(window, "first line") == "first line"  # lines of their own
    assert shown_line(window, "second line") == "second line  ✓"


def test_fenced_code_is_monospace_and_a_long_message_is_folded(broker, root):
    window = open_chat(root, broker, "alice")
    fenced = "look:\n```\nx = 1\n```\nafter"
    long = "\n".join(f"row {i}" for i in range(40))
    for text in (fenced, long):
        command(window, "//" + text if text.startswith("/") else text)
    pump_until(root, lambda: chat_text(window).count("✓") == 2, what="both delivered")
    tags = window.chat.tag_names
    assert "code" in tags(window.chat.search("x = 1", "1.0"))
    assert "code" not in tags(window.chat.search("after", "1.0"))
    assert "row 19" in chat_text(window) and "row 20" not in chat_text(window)
    more = window.chat.search("show more (20 more lines)", "1.0")
    click_text(window.chat, f"{more}+2c")
    root.update()
    assert "row 39" in chat_text(window) and "show more" not in chat_text(window)


def test_a_click_on_a_link_opens_it_in_the_browser(broker, root, monkeypatch):
    opened = []
    monkeypatch.setattr(gui_conversation, "open_link", opened.append)
    window = open_chat(root, broker, "alice")
    text = "see https://example.org/a?b=1, or http://x.test."
    assert run_cli(broker, "send", text, name="bob").returncode == 0
    pump_until(root, lambda: shown_line(window, "bob  see"), what="the link")
    assert opened == []  # never opened by itself
    click_text(window.chat, window.chat.search("example.org", "1.0"))
    click_text(window.chat, window.chat.search("x.test", "1.0"))
    assert opened == ["https://example.org/a?b=1", "http://x.test"]
    assert window.chat.tag_cget("url", "underline") in ("1", 1, True)


def joined_sessions(broker, names: list[str]) -> list:
    """Real client sessions (in this process: lighter than a process each), joined."""
    from client_session import ClientSession, Joined
    sessions = [ClientSession("127.0.0.1", broker.port, name).start() for name in names]
    for session in sessions:
        wait_until(lambda: any(isinstance(e, Joined) for e in drain(session)), 10,
                   f"{session.name} to join")
    return sessions


def drain(session) -> list:
    events = []
    while not session.events.empty():
        events.append(session.events.get_nowait())
    return events


def test_the_people_list_shows_the_count_at_once_and_loads_the_names_when_shown(make_broker,
                                                                                  root):
    broker = make_broker("--heartbeat-interval", "0.2", "--presence-threshold", "3")
    others = joined_sessions(broker, ["p1", "p2", "p3"])
    try:
        window = open_chat(root, broker, "alice")
        assert window.users_label.cget("text") == "ONLINE · 4"  # the welcome's count
        pump_until(root, lambda: window.user_list.get(0, "end") == (
            "alice (you)", "p1", "p2", "p3"), what="the names, asked when shown")
        # above the threshold nobody is announced: the count comes, not the names
        others[0].close()
        pump_until(root, lambda: window.users_label.cget("text") == "ONLINE · 3",
                   what="the published count")
        assert "p1" in window.user_list.get(0, "end") and "p1 left" not in chat_text(window)
        join_room(root, window, "#lab")
        click_sidebar(root, window, "#general")  # shown again: loaded again
        pump_until(root, lambda: window.user_list.get(0, "end") == ("alice (you)", "p2", "p3"),
                   what="the names as they are now")
    finally:
        for session in others:
            session.close()
