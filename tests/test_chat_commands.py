"""chat_commands: what a typed line sends, and the size check made before sending."""

import chat_commands
import messages as m
from chat_commands import parse, text_sent, too_long


def test_the_text_a_typed_line_sends():
    assert text_sent(parse("hello")) == "hello"
    assert text_sent(parse("/me waves")) == chat_commands.action_text("waves")
    assert text_sent(parse("/msg bob hi there")) == "hi there"
    assert text_sent(parse("/msg bob")) is None  # opens the conversation only
    assert text_sent(parse("/join #x")) is None
    assert text_sent(None) is None


def test_too_long_measures_utf8_bytes_as_the_broker_does():
    limit = 20
    assert too_long("x" * limit, limit) is None
    accented = "é" * 11  # 11 characters, 22 bytes
    assert too_long(accented, limit).startswith("too long: 22 bytes, the limit is 20")
    # the same verdict as the broker's
    for text in ("x" * 21, accented, "x" * 20, "é" * 10):
        broker_says = m.text_problem(text, limit)
        assert (too_long(text, limit) is None) == (broker_says is None)
