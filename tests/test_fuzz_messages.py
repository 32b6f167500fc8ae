"""Property tests of the wire protocol: whatever arrives, decoding is total.

messages.py promises that decode_request / decode_reply / decode_broadcast
return a valid typed message or raise ProtocolError, and nothing else. These
tests feed them arbitrary frames (random bytes, arbitrary JSON, valid shapes
with mutated fields, lone surrogates, deep nesting, huge numbers, NaN and
Infinity, duplicated keys) and check that promise, then that what decodes
encodes again to the same message.
"""

from __future__ import annotations

import json
import math
from dataclasses import fields
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, find, assume, given, settings
from hypothesis import strategies as st

import messages as m

# The machine is shared: many examples, but no per-example deadline.
FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

DECODERS = {"request": m.decode_request, "reply": m.decode_reply, "broadcast": m.decode_broadcast}
ALL_TYPES = {**m.REQUEST_TYPES, **m.REPLY_TYPES, **m.EVENT_TYPES}
# Some wire types name a request and an event ("join", "topic"): every class.
ALL_CLASSES = {*m.REQUEST_TYPES.values(), *m.REPLY_TYPES.values(), *m.EVENT_TYPES.values()}

# --- strategies -------------------------------------------------------------------

json_scalars = (st.none() | st.booleans() | st.integers() | st.integers(-(2**70), 2**70)
                | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=40))
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20)

# Raw JSON text the standard encoder never writes but a peer may.
odd_literals = st.sampled_from([
    "NaN", "Infinity", "-Infinity", "1e999", "-1e999", "-0", "1" + "0" * 5000, "1" + "0" * 4299,
    '"\\ud800"', '"\\udc00x"', '"a\\ud83d"', '"\\ud83d\\ude00"', '"\\u0000"', '"\\u202e"',
    "[" * 5000 + "]" * 5000, '{"a":' * 3000 + "0" + "}" * 3000, "[" * 500 + "]" * 500,
    "true", "null", '""', "[]", "{}",
])


# Numbers every JSON reader holds exactly: what the decoder accepts.
safe_ints = st.integers(-m.MAX_SAFE_INT, m.MAX_SAFE_INT)


def annotation_strategy(annotation: str) -> st.SearchStrategy:
    """Values of the right type for a message field (the encoder's own types)."""
    base = annotation.removesuffix(" | None")
    strategy = {
        "str": st.text(max_size=80),
        "int": safe_ints,
        "float": st.floats(-m.MAX_SAFE_INT, m.MAX_SAFE_INT) | safe_ints,
        "bool": st.booleans(),
        "list[str]": st.lists(st.text(max_size=20), max_size=5),
        "list[list[str]]": st.lists(st.lists(st.text(max_size=20), min_size=2, max_size=2),
                                    max_size=5),
        # the events of a history: sequenced ones only
        "list[Any]": st.lists(st.deferred(lambda: sequenced_event), max_size=4),
        "list[Room]": st.lists(st.deferred(lambda: message_of(m.Room)), max_size=3),
    }[base]
    return st.none() | strategy if annotation.endswith("| None") else strategy


def message_of(cls: type) -> st.SearchStrategy:
    """Any message of type ``cls``, with every field of the right type."""
    return st.builds(cls, **{f.name: annotation_strategy(f.type) for f in fields(cls)})


any_event = st.one_of([message_of(cls) for cls in m.EVENT_TYPES.values()])
sequenced_event = st.one_of([message_of(cls) for cls in m.SEQUENCED_EVENTS])
any_reply = st.one_of([message_of(cls) for cls in m.REPLY_TYPES.values()])

names = st.text(max_size=m.MAX_NAME_CHARS * 4)
ids = st.text(min_size=1, max_size=m.MAX_MESSAGE_ID_CHARS)
tokens = st.none() | st.text(st.characters(max_codepoint=127), max_size=m.MAX_TOKEN_CHARS)
half_safe = st.integers(0, m.MAX_SAFE_INT // 2)
# Requests within the limits every broker applies, so each one must decode.
rooms = st.none() | st.text(max_size=40)
valid_request = st.one_of(
    st.builds(m.Hello, name=names, v=safe_ints, resume=tokens, secret=tokens,
              quiet=st.booleans(), rooms=st.none() | st.lists(st.text(max_size=40), max_size=5)),
    st.builds(m.Say, id=ids, text=st.text(), session=tokens, room=rooms, to=st.none() | names),
    st.builds(m.Who, room=rooms), st.builds(m.Ping, session=tokens),
    st.builds(m.Bye, session=tokens), st.just(m.ListRooms()),
    st.builds(m.JoinRoom, room=st.text(max_size=40), session=tokens),
    st.builds(m.PartRoom, room=st.text(max_size=40), session=tokens),
    st.builds(m.SetTopic, room=st.text(max_size=40), text=st.text(max_size=70), session=tokens),
    st.builds(lambda after, extra, token: m.Fetch(after, after + extra, token),
              half_safe, half_safe, tokens),
    st.builds(m.Recent, count=st.integers(0, m.MAX_FETCH_EVENTS), session=tokens),
)
any_message = valid_request | any_reply | any_event


@st.composite
def mutated_body(draw) -> dict:
    """A valid message's wire form with fields dropped, retyped or added."""
    body = m.to_wire(draw(any_message))
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from([*body, "type", "from", "sender", "extra", "v", "events"]))
        action = draw(st.sampled_from(["drop", "retype", "retag"]))
        if action == "drop":
            body.pop(key, None)
        elif action == "retype":
            body[key] = draw(json_values)
        else:
            body[key] = draw(st.sampled_from(sorted(ALL_TYPES)) | st.text(max_size=10))
    return body


@st.composite
def odd_json_frame(draw) -> bytes:
    """A valid message's JSON with one field's value replaced by a raw odd literal,
    or with a key repeated (the decoder keeps the last)."""
    body = m.to_wire(draw(any_message))
    key = draw(st.sampled_from(sorted(body)))
    raw = json.dumps({k: v for k, v in body.items() if k != key})[:-1]
    literal = draw(odd_literals | st.builds(json.dumps, json_values))
    separator = ", " if raw != "{" else ""
    if draw(st.booleans()):  # a duplicate first, the odd value last
        raw += separator + json.dumps(key) + ": " + json.dumps(body[key])
        separator = ", "
    return (raw + separator + json.dumps(key) + ": " + literal + "}").encode(
        "utf-8", "surrogatepass")


def encoded(value: Any, ensure_ascii: bool) -> bytes:
    return json.dumps(value, ensure_ascii=ensure_ascii).encode("utf-8", "surrogatepass")


one_frame = st.one_of(
    st.binary(max_size=200),
    st.builds(encoded, json_values, st.booleans()),
    st.builds(encoded, mutated_body(), st.booleans()),
    odd_json_frame(),
    odd_literals.map(str.encode),
    st.builds(lambda msg: m.encode(msg), any_message),
)
frame_lists = st.lists(one_frame, max_size=3)
# Broadcast bodies are arrays of events: wrap frames so the array path is reached.
broadcast_frames = st.one_of(
    frame_lists,
    st.tuples(st.binary(max_size=10),
              st.lists(mutated_body() | json_values, min_size=0, max_size=4)
              .map(lambda events: json.dumps(events).encode())).map(list),
)

# --- checks -----------------------------------------------------------------------


def assert_well_typed(msg: Any, types: dict[str, type]) -> None:
    """``msg`` is one of ``types`` and every field has its declared type,
    with text that the broker could encode again."""
    assert type(msg) in types.values(), type(msg)
    for f in fields(msg):
        value = getattr(msg, f.name)
        base = f.type.removesuffix(" | None")
        if value is None:
            assert f.type.endswith("| None"), (f.name, msg)
        elif base == "str":
            assert isinstance(value, str)
            value.encode("utf-8")  # no lone surrogate got through
        elif base == "int":
            assert isinstance(value, int) and not isinstance(value, bool), (f.name, msg)
        elif base == "float":
            assert isinstance(value, (int, float)) and not isinstance(value, bool), (f.name, msg)
        elif base == "bool":
            assert isinstance(value, bool)
        elif base == "list[str]":
            for item in value:
                assert isinstance(item, str)
                item.encode("utf-8")
        elif base == "list[list[str]]":  # [name, reason] pairs
            for pair in value:
                assert isinstance(pair, list) and len(pair) == 2
                for item in pair:
                    assert isinstance(item, str)
                    item.encode("utf-8")
        elif base == "list[Room]":
            for room in value:
                assert_well_typed(room, {m.Room.TYPE: m.Room})
        else:
            for event in value:
                assert_well_typed(event, m.SEQUENCED_TYPES)


def decode_or_refuse(decoder, frames: list[bytes]):
    """The decoded message, or None when the decoder refused with ProtocolError.
    Any other exception propagates and fails the test."""
    try:
        return decoder(frames)
    except m.ProtocolError as refused:
        assert isinstance(refused.reason, str) and refused.reason
        assert refused.code in vars(m.ErrorCode).values()
        return None


def same_on_the_wire(a: Any, b: Any) -> bool:
    """Equal messages, where NaN (which never equals itself) counts as equal."""
    return m.encode(a) == m.encode(b)


# --- properties -------------------------------------------------------------------


@pytest.mark.parametrize("decoder,types", [(m.decode_request, m.REQUEST_TYPES),
                                            (m.decode_reply, m.REPLY_TYPES)],
                         ids=["request", "reply"])
@FUZZ
@given(frames=frame_lists)
def test_decoding_one_frame_is_total_and_what_it_accepts_round_trips(decoder, types, frames):
    message = decode_or_refuse(decoder, frames)
    if message is not None:
        assert_well_typed(message, types)
        assert same_on_the_wire(decoder([m.encode(message)]), message)


@FUZZ
@given(frames=broadcast_frames)
def test_decode_broadcast_is_total_and_what_it_accepts_round_trips(frames):
    events = decode_or_refuse(m.decode_broadcast, frames)
    if events is not None:
        assert isinstance(events, list) and events
        for event in events:
            assert_well_typed(event, m.EVENT_TYPES)
        body = m.join_events([m.encode(e) for e in events])
        again = m.decode_broadcast([m.BROADCAST_TOPIC, body])
        assert [m.encode(e) for e in again] == [m.encode(e) for e in events]


@FUZZ
@given(body=mutated_body(), kind=st.sampled_from(sorted(DECODERS)))
def test_mutated_valid_shapes_decode_or_are_refused(body, kind):
    frame = encoded(body, ensure_ascii=True)
    frames = [m.BROADCAST_TOPIC, b"[" + frame + b"]"] if kind == "broadcast" else [frame]
    decoded = decode_or_refuse(DECODERS[kind], frames)
    if decoded is not None and kind == "request":
        assert_well_typed(decoded, m.REQUEST_TYPES)


@FUZZ
@given(frame=odd_json_frame(), kind=st.sampled_from(sorted(DECODERS)))
def test_odd_literals_inside_valid_shapes_decode_or_are_refused(frame, kind):
    frames = [m.BROADCAST_TOPIC, b"[" + frame + b"]"] if kind == "broadcast" else [frame]
    decoded = decode_or_refuse(DECODERS[kind], frames)
    if decoded is not None:
        for msg in decoded if kind == "broadcast" else [decoded]:
            m.encode(msg)  # the broker can always send on what it accepted


@FUZZ
@given(request=valid_request)
def test_every_valid_request_round_trips(request):
    assert m.decode_request([m.encode(request)]) == request


@FUZZ
@given(reply=any_reply)
def test_every_reply_type_round_trips(reply):
    assert m.decode_reply([m.encode(reply)]) == reply


@FUZZ
@given(events=st.lists(any_event, min_size=1, max_size=5))
def test_every_event_type_round_trips_in_one_broadcast(events):
    body = m.join_events([m.encode(e) for e in events])
    assert m.decode_broadcast([m.BROADCAST_TOPIC, body]) == events


@FUZZ
@given(msg=any_reply | any_event, bad=st.sampled_from([math.nan, math.inf, -math.inf]))
def test_non_finite_floats_are_refused_not_let_into_timers(msg, bad):
    float_fields = [f.name for f in fields(msg) if f.type == "float"]
    assume(float_fields)
    odd = type(msg)(**{f.name: getattr(msg, f.name) for f in fields(msg)} | {float_fields[0]: bad})
    if type(odd) in m.REPLY_TYPES.values() and type(odd) not in m.EVENT_TYPES.values():
        args, decoder = [m.encode(odd)], m.decode_reply
    else:
        args = [m.BROADCAST_TOPIC, m.join_events([m.encode(odd)])]
        decoder = m.decode_broadcast
    assert decode_or_refuse(decoder, args) is None


def test_every_message_type_is_covered_by_the_strategies():
    """The round-trip strategies draw every type the protocol defines, so a new
    type cannot slip past them unnoticed."""
    for cls in ALL_CLASSES:
        # find() searches until it draws one (or fails the test): a random
        # sample of fixed size may miss a type by chance.
        found = find(any_message, lambda msg, cls=cls: isinstance(msg, cls),
                     settings=settings(max_examples=5000, database=None,
                                       phases=[Phase.generate]))
        assert isinstance(found, cls)


def test_lone_surrogates_deep_nesting_and_huge_numbers_are_refused_cleanly():
    """The edge cases named in the issue, each once, with every decoder."""
    frames = [b'{"type":"say","id":"1","text":"\\ud800"}', b'{"type":"hello","v":1,"name":"\\udfff"}',
              b"[" * 100_000, b'{"type":"fetch","after":1' + b"0" * 5000 + b',"until":1}',
              b'{"type":"fetch","after":NaN,"until":Infinity}', b'{"type":"ping"',
              b'{"type":"say","id":"1","text":"a","text":5}']
    for frame in frames:
        for kind, decoder in DECODERS.items():
            args = [m.BROADCAST_TOPIC, frame] if kind == "broadcast" else [frame]
            assert decode_or_refuse(decoder, args) is None, (kind, frame[:60])


# Any text that is UTF-8 (no lone surrogates: decoding refuses those).
utf8_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=200)


@FUZZ
@given(text=utf8_text, sender=utf8_text, room=st.none() | utf8_text, to=st.none() | utf8_text,
       seq=safe_ints, time=st.floats(-m.MAX_SAFE_INT, m.MAX_SAFE_INT) | safe_ints)
def test_templates_write_what_the_generic_encoder_writes(text, sender, room, to, seq, time):
    """messages.py writes a chat message and its ack from templates: for any
    values the bytes are the generic encoder's, and decode to the same."""
    generic = lambda msg: json.dumps(m.to_wire(msg), separators=(",", ":"),
                                     ensure_ascii=False).encode()
    message = m.Message(seq, time, sender, text, room, to)
    assert m.encode(message) == generic(message)
    assert m.decode_reply([m.encode(message)]) == message
    ack = m.Ack(text, seq)
    assert m.encode(ack) == generic(ack)
