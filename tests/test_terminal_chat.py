"""The terminal chat (no command, a terminal on stdin) through a real pty.

A real broker, a real `listen --json` client as the other side, and the chat
on a pseudo-terminal that answers as a terminal does.
"""

import contextlib
import json
import signal
import termios

import pytest

from display import visible
from hostile_text import HOSTILE_TEXTS
from procs import listen, run_cli, wait_until
from terminal import Terminal

UP, LEFT = "\x1b[A", "\x1b[D"
ENTER = "\r"  # what the Enter key sends in raw mode


@contextlib.contextmanager
def typist_chat(broker, clients):
    """A listener "ears", then "typist" chatting on a terminal, at its prompt."""
    ears = listen(broker, "ears")
    clients.append(ears)
    term = Terminal("cli_client.py", "--name", "typist", *broker.client_args)
    try:
        ears.out.wait_for(lambda l: '"typist"' in l and '"join"' in l, 15, "typist to join")
        term.wait_for("#general>", 15, "the prompt")
        yield term, ears
    finally:
        term.close()


@pytest.fixture
def chat(broker, clients):
    with typist_chat(broker, clients) as chatting:
        yield chatting


def input_line_holds(typed: str, after: str = "", prompt_text: str = "#general>"):
    """A condition: the newest input line (drawn after ``after``) shows ``typed``.
    (A redraw may move the cursor over the prompt's space rather than print it.)"""
    def holds(text: str) -> bool:
        text = text[text.rfind(after):] if after else text
        prompt = text.rfind(prompt_text)
        return prompt >= 0 and typed in text[prompt:]
    return holds


def sent_by_typist(ears) -> list[str]:
    return [r["text"] for r in ears.messages() if r["from"] == "typist"]


def test_messages_arrive_above_a_half_typed_line_which_is_sent_intact(broker, chat):
    term, ears = chat
    term.type("half typed")
    term.wait_for(input_line_holds("half typed"), 10, "the typed text on the input line")
    incoming = [f"incoming {n}" for n in range(1, 4)]
    assert run_cli(broker, "send", name="other", input="\n".join(incoming)).returncode == 0
    shown = term.wait_for("other: incoming 3", 10, "the incoming messages")
    for text in incoming:  # each on a line of its own
        assert any(line.endswith(f" other: {text}") for line in shown.splitlines()), shown
    # The input line is drawn again below them, with what was typed.
    term.wait_for(input_line_holds("half typed", after="other: incoming 3"), 10,
                  "the input line redrawn below the messages")
    term.type(" rest" + ENTER)
    wait_until(lambda: sent_by_typist(ears), 10, "the typed line")
    assert sent_by_typist(ears) == ["half typed rest"]


def test_commands_stay_local_and_line_editing_and_history_work(chat):
    term, ears = chat
    term.type("/help" + ENTER)
    term.wait_for(lambda t: all(c in t for c in ("/help", "/users", "/quit", "//text")), 10,
                  "the list of commands")
    term.type("/frobnicate now" + ENTER)
    term.wait_for("unknown command /frobnicate (not sent", 10, "the local error")
    term.type("/users" + ENTER)
    term.wait_for("online (2): ears, typist", 10, "who is online")
    term.type("//slash at the start" + ENTER)
    wait_until(lambda: sent_by_typist(ears), 10, "the // line")
    term.type("helo" + LEFT + "l" + ENTER)  # the arrow moves the cursor, it is not text
    wait_until(lambda: len(sent_by_typist(ears)) >= 2, 10, "the edited line")
    term.type(UP + ENTER)  # the last line again, from the history
    wait_until(lambda: len(sent_by_typist(ears)) >= 3, 10, "the recalled line")
    # Only these went out: no command, and the broker orders each after the one before.
    assert sent_by_typist(ears) == ["/slash at the start", "hello", "hello"]
    term.type("/quit" + ENTER)
    assert term.proc.wait(10) == 0
    leave = ears.out.wait_for(lambda l: '"leave"' in l, 5, "typist leaves")
    assert json.loads(leave)["reason"] == "quit"


def test_hostile_text_is_shown_neutralised(broker, chat):
    term, _ = chat
    texts = list(HOSTILE_TEXTS.values())
    for text in texts:  # as arguments: stdin would split at the \r
        assert run_cli(broker, "send", text, name="evil").returncode == 0
    term.wait_for(lambda t: all(f"evil: {visible(text)}" in t for text in texts), 15,
                  "every hostile text, shown with visible escapes")
    for text in texts:
        assert text not in term.raw


def test_sigterm_leaves_at_once_and_restores_the_terminal(chat):
    term, ears = chat
    term.type("half typed")
    term.wait_for(input_line_holds("half typed"), 10, "the typed text on the input line")
    assert not term.local_modes() & termios.ECHO  # the prompt has the terminal in raw mode
    term.proc.send_signal(signal.SIGTERM)
    assert term.proc.wait(10) == 143
    leave = ears.out.wait_for(lambda l: '"leave"' in l, 5, "typist leaves")
    assert json.loads(leave)["reason"] == "quit"
    assert term.local_modes() & termios.ECHO and term.local_modes() & termios.ICANON
    assert sent_by_typist(ears) == []


def enter_room(broker, term, clients, room: str):
    """A listener in ``room``, then the chat joins it; returns the listener."""
    ears = listen(broker, f"{room[1:]}-ears", "--room", room)
    clients.append(ears)
    term.type(f"/join {room}" + ENTER)
    term.wait_for(f"* typing to {room}", 10, "the room entered")
    term.wait_for(f"{room}>", 10, "the prompt naming the room")
    return ears


def test_rooms_and_direct_messages_in_the_chat(broker, chat, clients):
    term, ears = chat
    ci_ears = enter_room(broker, term, clients, "#ci")
    term.type("to the room" + ENTER)
    line = ci_ears.out.wait_for(lambda l: '"message"' in l, 10, "the line in #ci")
    assert (json.loads(line)["room"], json.loads(line)["text"]) == ("#ci", "to the room")
    term.type("/msg ears just for you" + ENTER)
    line = ears.out.wait_for(lambda l: '"to"' in l, 10, "the direct message")
    assert (json.loads(line)["from"], json.loads(line)["text"]) == ("typist", "just for you")
    term.wait_for("typist → ears: just for you", 10, "the direct message, on the sender's side")
    term.type("/rooms" + ENTER)
    term.wait_for("rooms (people in each):\r\n  #ci (2)\r\n  #general (2)", 10, "the rooms")
    term.type("/part" + ENTER)
    term.wait_for("* you left #ci; typing to #general", 10, "the room left")
    left = ci_ears.out.wait_for(lambda l: '"leave"' in l, 10, "typist leaves #ci")
    assert (json.loads(left)["name"], json.loads(left)["reason"]) == ("typist", "part")
    term.type("back home" + ENTER)
    wait_until(lambda: sent_by_typist(ears) == ["just for you", "back home"], 10,
               "the line in #general")
    assert [r.get("room") for r in ears.messages()] == [None, "#general"]
    assert [r["text"] for r in ci_ears.messages()] == ["to the room"]


def test_switching_rooms_and_a_mention_while_a_line_is_half_typed(broker, chat, clients):
    term, ears = chat
    lab_ears = enter_room(broker, term, clients, "#lab")
    term.type("/switch #general" + ENTER)
    term.wait_for(input_line_holds("", after="* typing to #general"), 10, "back in #general")
    term.type("half typed")
    term.wait_for(input_line_holds("half typed"), 10, "the typed text on the input line")
    assert run_cli(broker, "send", "--room", "#lab", "hey TYPIST, look", name="bob"
                   ).returncode == 0
    assert run_cli(broker, "send", "--to", "typist", "psst", name="bob").returncode == 0
    assert run_cli(broker, "send", "a typist's word", name="bob").returncode == 0
    term.wait_for("bob: a typist's word", 10, "the messages")
    # The other room is named; the mention is highlighted; one bell for the burst.
    assert "\x1b[1;33m" in term.raw.split("[#lab] bob: hey TYPIST, look")[0][-30:]
    assert "bob → typist: psst" in term.text
    assert term.raw.count("\a") == 1
    term.wait_for(input_line_holds("half typed", after="a typist's word"), 10,
                  "the input line redrawn below them")
    term.type(" rest" + ENTER)
    wait_until(lambda: sent_by_typist(ears), 10, "the typed line")
    assert sent_by_typist(ears) == ["half typed rest"]
    term.type("\x1b2")  # Alt+2: the second conversation, #lab
    term.wait_for(lambda t: t.rstrip().endswith("#lab>"), 10, "the prompt naming #lab")
    term.type("in the lab" + ENTER)
    lab_ears.out.wait_for(lambda l: '"in the lab"' in l, 10, "the line in #lab")


BACKSPACE = "\x7f"


def test_a_line_over_the_brokers_limit_stays_on_the_input_line_to_shorten(make_broker,
                                                                          clients):
    # A small limit, so the line fits on the screen; a paste of 100 KB takes the same path.
    broker = make_broker("--heartbeat-interval", "0.2", "--max-text", "20")
    with typist_chat(broker, clients) as (term, ears):
        term.type("a line over the limit" + ENTER)  # 21 bytes
        shown = term.wait_for("too long: 21 bytes, the limit is 20", 10, "the local refusal")
        assert "not sent (" not in shown  # not sent to be refused and printed back
        # Nothing lost: the line is on the input line again, to shorten.
        term.wait_for(input_line_holds("a line over the limit", after="the limit is 20"), 10,
                      "the line offered again")
        term.type(BACKSPACE * 6 + ENTER)
        wait_until(lambda: sent_by_typist(ears), 10, "the shortened line")
        assert sent_by_typist(ears) == ["a line over the"]
