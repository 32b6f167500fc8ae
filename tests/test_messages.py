"""The wire protocol with no sockets: encoding, decoding, validation."""

import dataclasses
import json

import pytest

import messages as m

ROOM = m.Room("#Lab-3", 7, "homework due friday", 2)
ALL_MESSAGES = [
    m.Hello("alice"), m.Hello("bob", resume="tok"),
    m.Hello("bob", secret="s" * 32, quiet=True, rooms=["#ci", "#general"]),
    m.Say("id1", "héllo 世界 🎉"), m.Say("id2", "hi", room="#ci"), m.Say("id3", "psst", to="bob"),
    m.Who(), m.Who("#ci"), m.Ping(), m.Fetch(3, 9), m.Fetch(3, 9, stream="@bob"), m.Bye(),
    m.JoinRoom("#ci"), m.PartRoom("#ci"), m.SetTopic("#ci", "builds"), m.ListRooms(),
    m.Welcome("alice", "ep", 2, "tok", 1.0, 3, 4096, [ROOM], 4, True),
    m.Ack("id1", 5), m.Error("name_taken", "taken"), m.Error("rate_limited", "slow", "x", 0.5),
    m.Users(["a", "b"]), m.Users(["a"], "#ci"), ROOM, m.Parted("#ci"), m.RoomList([ROOM, ROOM]),
    m.History([m.Presence(1, 2.0, ["a"], [], "#ci"), m.Message(2, 3.0, "a", "t", "#ci"),
               m.Topic(3, 4.0, "a", "x", "#ci")], 1, 3, stream="#ci"),
    m.Message(4, 5.0, "alice", "psst", to="bob"), m.Position("@bob", 4),
]
EVENTS = [m.Message(1, 2.5, "alice", "hi", "#general"), m.Presence(2, 3.0, ["bob"], [], "#general"),
          m.Presence(3, 4.0, [], [["bob", "timeout"]], "#general"), m.Topic(4, 4.5, "bob", "t", "#general"),
          m.Heartbeat("ep", 5.0), m.Position("#general", 4), m.Shutdown(6.0)]


@pytest.mark.parametrize("msg", ALL_MESSAGES, ids=lambda x: type(x).__name__)
def test_every_message_round_trips(msg):
    decode = m.decode_request if type(msg) in m.REQUEST_TYPES.values() else m.decode_reply
    assert decode([m.encode(msg)]) == msg


@pytest.mark.parametrize("msg", ALL_MESSAGES + EVENTS, ids=lambda x: type(x).__name__)
def test_a_message_is_built_alike_by_position_and_by_name_and_stays_frozen(msg):
    values = {f.name: getattr(msg, f.name) for f in dataclasses.fields(msg)}
    cls = type(msg)
    assert cls(*values.values()) == cls(**values) == msg
    for name in values:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(msg, name, None)


def test_a_message_keeps_its_defaults_and_refuses_missing_or_unknown_fields():
    assert m.Say("1", "hi") == m.Say(id="1", text="hi", session=None, room=None, to=None)
    assert m.Hello("ann").v == m.PROTOCOL_VERSION
    with pytest.raises(TypeError):
        m.Message(1, 2.0, "ann")  # no text
    with pytest.raises(TypeError):
        m.Say("1", "hi", colour="red")


def test_events_round_trip_as_one_broadcast_frame():
    body = m.join_events([m.encode(e) for e in EVENTS])
    assert m.decode_broadcast([m.BROADCAST_TOPIC, body]) == EVENTS


def test_message_sender_travels_as_from():
    assert json.loads(m.encode(m.Message(1, 2.0, "alice", "x")))["from"] == "alice"


def test_text_is_utf8_not_escaped():
    assert "世界".encode() in m.encode(m.Say("1", "世界"))


@pytest.mark.parametrize("frames,why", [
    ([], "expected 1 frame"),
    ([b"{}", b"{}"], "expected 1 frame"),
    ([b"\xff\xfe"], "UTF-8"),
    ([b"{not json"], "JSON"),
    ([b"[1,2]"], "JSON object"),
    ([b'{"type":"teleport"}'], "unknown message type"),
    ([b'{"type":"say","text":"x"}'], "'id' is missing"),
    ([b'{"type":"say","id":"1","text":5}'], "'text' must be a string of valid UTF-8 text"),
    # A lone surrogate escaped in JSON cannot be UTF-8; raw bad bytes spoil the frame.
    ([b'{"type":"say","id":"1","text":"\\ud800"}'], "'text' must be a string of valid UTF-8 text"),
    ([b'{"type":"say","id":"1","text":"caf\xe9"}'], "frame is not valid UTF-8"),
    ([b'{"type":"hello","name":"alice"}'], "'v' is missing"),
    ([b'{"type":"fetch","after":true,"until":2}'], "'after' must be int"),
    ([b'{"type":"fetch","after":5,"until":2}'], "after <= until"),
    ([b'{"type":"say","id":"' + b"x" * 65 + b'","text":"t"}'], "id must be"),
    ([b"[" * 100000], "JSON"),
])
def test_bad_requests_raise_protocol_error_with_a_reason(frames, why):
    with pytest.raises(m.ProtocolError) as caught:
        m.decode_request(frames)
    assert why in caught.value.reason


def test_unknown_type_has_its_own_code():
    with pytest.raises(m.ProtocolError) as caught:
        m.decode_request([b'{"type":"teleport"}'])
    assert caught.value.code == m.ErrorCode.UNKNOWN_TYPE


def test_broadcast_needs_topic_and_a_non_empty_array():
    for frames in ([b"all"], [b"all", b"[]"], [b"all", b"{}"], [b"all", b'[{"type":"x"}]']):
        with pytest.raises(m.ProtocolError):
            m.decode_broadcast(frames)


@pytest.mark.parametrize("name,ok", [("alice", True), ("a.b-c_9", True), ("x" * 32, True),
                                     ("", False), ("x" * 33, False), ("a b", False),
                                     ("é", False), ("a\u200bb", False), ("\n", False)])
def test_name_rules(name, ok):
    assert (m.name_problem(name) is None) == ok


def test_names_compare_ignoring_case():
    assert m.name_key("Alice") == m.name_key("aLICE")


def test_text_limit_counts_utf8_bytes():
    assert m.text_problem("é" * 2, 4) is None
    code, reason = m.text_problem("é" * 3, 4)
    assert code == m.ErrorCode.TEXT_TOO_LONG and "6 bytes" in reason and "4" in reason
    assert m.text_problem(" \n\t", 4)[0] == m.ErrorCode.TEXT_EMPTY


def test_frame_limit_leaves_room_for_escaped_text():
    worst = m.encode(m.Say("x" * m.MAX_MESSAGE_ID_CHARS, "\x01" * 4096))
    assert len(worst) <= m.max_frame_bytes(4096)


# --- the templates of messages.py: byte for byte what the generic encoder writes ---

TEMPLATE_TEXTS = [
    "plain", "", "quote \" backslash \\ slash /", "\\u0041 not an escape", "\"\\\"",
    "controls \x00\x01\x08\t\n\x0c\r\x1b\x1f\x7f", "c1 \x85\x9b", "separators \u2028\u2029",
    "bidi \u202e\u2066", "emoji 🎉👩‍👩‍👧 \U0001f600", "nbsp\u00a0zero\u200bwidth", "世界",
    "\ufeff bom \ufffd", "\U0010ffff", "x" * 5000,
]


def generic_encoding(msg) -> bytes:
    """What encode() wrote before it had templates: the dict through json.dumps."""
    return json.dumps(m.to_wire(msg), separators=(",", ":"), ensure_ascii=False).encode()


@pytest.mark.parametrize("text", TEMPLATE_TEXTS)
def test_message_template_writes_the_generic_bytes(text):
    for msg in (m.Message(7, 1764470000.123456, "alice", text, "#general"),
                m.Message(2**53 - 1, 0.0, "bob.b-_9", text, to="carol"),
                m.Message(1, 5, "a", text), m.Message(3, -1e-7, text, text, text, text)):
        frame = m.encode(msg)
        assert frame == generic_encoding(msg)
        assert m.decode_reply([frame]) == msg


@pytest.mark.parametrize("text", TEMPLATE_TEXTS)
def test_ack_template_writes_the_generic_bytes(text):
    msg = m.Ack(text, 12345)
    assert m.encode(msg) == generic_encoding(msg)


def test_templates_leave_odd_values_to_the_generic_encoder():
    """A bool, NaN, infinity or str subclass would be written otherwise by
    a template: such a message takes the generic path, same bytes as ever."""
    class Name(str):
        pass
    for msg in (m.Message(True, 1.0, "a", "t"), m.Message(1, float("nan"), "a", "t"),
                m.Message(1, float("inf"), "a", "t"), m.Message(1, 1.0, Name("a"), "t"),
                m.Message(1, 1.0, "a", "t", room=Name("#r")), m.Ack("x", False)):
        assert m.encode(msg) == generic_encoding(msg)


def test_a_lone_surrogate_is_not_encoded_by_a_template_either():
    """Decoding refuses such text; were one to reach the encoder, it fails
    as the generic one does rather than write bytes that are not UTF-8."""
    with pytest.raises(UnicodeEncodeError):
        m.encode(m.Message(1, 1.0, "a", "bad \ud800"))
    with pytest.raises(UnicodeEncodeError):
        generic_encoding(m.Message(1, 1.0, "a", "bad \ud800"))
    with pytest.raises(m.ProtocolError):
        m.decode_request([b'{"type":"say","id":"1","text":"\\ud800"}'])
