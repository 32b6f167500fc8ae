"""The zchat wire protocol: message types, encoding, validation and limits.

This module is the only place the protocol lives. It is pure code: no
sockets, no clock, no threads. PROTOCOL.md describes the same format for
people; keep the two in step.

Frames
------
Client -> broker (DEALER -> ROUTER): exactly one frame, a JSON object in
UTF-8 with a ``type`` field (the ROUTER prepends the routing id, which the
broker strips before decoding).

Broker -> one client (ROUTER -> DEALER): exactly one frame, a JSON object.

Broker -> everyone (PUB -> SUB): two frames, ``[topic, body]``. ``topic`` is
a room's (``room_topic``), ``HEARTBEAT_TOPIC`` for heartbeats, or
``READY_TOPIC_PREFIX + nonce`` for a join probe. ``body`` is a JSON array of
one or more events, so that a backlog can leave the broker as one frame
while a lone event still goes out at once. Direct messages never go on the
PUB socket: the broker sends them to their addressee's connections on the
ROUTER, as replies.

Decoding either returns a valid typed message or raises ProtocolError with a
reason and an error code; it never raises anything else.
"""

from __future__ import annotations

import json
import re
from dataclasses import MISSING, dataclass, field, fields
from functools import cache
from typing import Any, ClassVar

# 2: rooms and direct messages (1 had one chat stream on topic "all").
# 3: presence that scales: the welcome counts people instead of listing them,
# ``who`` pages, joins and leaves of one pass are one ``presence`` event, and
# a big room publishes its member count (``members``) instead.
PROTOCOL_VERSION = 3

# Streams: each is an ordered series of events with its own sequence numbers
# and history (the Clone pattern's one object per stream). Every room is one,
# named by its room key ("#general"); every user's direct messages are one,
# named "@" + the user's name key, and only that user may read it.
GENERAL_ROOM = "#general"  # exists always; a client that names no room is in it
DM_STREAM_PREFIX = "@"
# Topics on the PUB socket. Each room has its own, ending in a NUL byte
# because SUB topics match by prefix ("r:#lab" must not match "r:#lab2").
# Heartbeats have their own topic, which every client subscribes to. A client
# proves its subscriptions are live by subscribing to a private
# "ready:<nonce>" topic, which the broker answers with a heartbeat on that
# topic alone (subscriptions of one connection are taken in order).
ROOM_TOPIC_PREFIX = b"r:"
HEARTBEAT_TOPIC = b"hb"
READY_TOPIC_PREFIX = b"ready:"
MAX_STREAM_ID_CHARS = 64


def room_topic(room_key: str) -> bytes:
    """The PUB topic that carries a room's events."""
    return ROOM_TOPIC_PREFIX + room_key.encode() + b"\0"


# The topic of #general, where everything of protocol 1 now happens.
BROADCAST_TOPIC = room_topic(GENERAL_ROOM)


def dm_stream(name: str) -> str:
    """The stream of a user's direct messages."""
    return DM_STREAM_PREFIX + name_key(name)


def stream_topic(stream_id: str) -> bytes | None:
    """The PUB topic of a stream; None for direct messages (never on PUB)."""
    return None if stream_id.startswith(DM_STREAM_PREFIX) else room_topic(stream_id)

# --- limits -----------------------------------------------------------------

# 32 characters of a safe ASCII set: no spaces, no look-alikes, no control or
# bidi characters, so a name can never pretend to be another (IRC allows 9-30).
NAME_PATTERN = re.compile(r"[A-Za-z0-9_.\-]{1,32}")
MAX_NAME_CHARS = 32
# Room names like IRC channels: '#' and 1-32 of the same safe set, compared
# ignoring case (RFC 2812 allows 50; 32 keeps a sidebar readable).
ROOM_PATTERN = re.compile(r"#[A-Za-z0-9_.\-]{1,32}")
MAX_ROOM_CHARS = 33
# A room topic in UTF-8 bytes: a line, not an essay (IRC servers allow ~300).
MAX_TOPIC_BYTES = 300
# The secret a client keeps to prove that two connections are one person.
MAX_SECRET_CHARS = 64
# Rooms one hello may name at once (each also costs a subscription).
MAX_HELLO_ROOMS = 50
# Default largest chat text in UTF-8 bytes; the broker can change it and
# announces its value in the welcome. 4 KiB is several screens of chat.
DEFAULT_MAX_TEXT_BYTES = 4096
# A client-chosen message id: long enough for a UUID plus a counter.
MAX_MESSAGE_ID_CHARS = 64
# A resume token or join nonce: 32 hex digits with room to spare.
MAX_TOKEN_CHARS = 64
# Most events one history reply carries; a client asks again for more.
MAX_FETCH_EVENTS = 500
# Names in one ``users`` page, counted as their UTF-8 bytes plus 3 each (quotes
# and comma): a few hundred names, so that a ``who`` of a room of thousands
# costs the broker one small reply at a time and the answer stays short.
WHO_PAGE_BYTES = 16 * 1024
# Numbers beyond this are not exact in every JSON reader (2**53 - 1).
MAX_SAFE_INT = 2**53 - 1


def ping_period(heartbeat_interval: float, heartbeat_liveness: int) -> float:
    """How long a client may send nothing before it pings: half of the silence
    the broker allows (liveness x interval), so one late ping is not fatal,
    and a broker with thousands idle reads a third fewer pings than at one
    per interval."""
    return heartbeat_interval * heartbeat_liveness / 2


def max_frame_bytes(max_text_bytes: int) -> int:
    """Largest request frame the broker accepts (ZMQ_MAXMSGSIZE on ROUTER).

    JSON may escape a byte of text as six characters (``\\u0001``), and the
    other fields need a little room; anything larger is never read.
    """
    return 6 * max_text_bytes + 1024


# --- errors -------------------------------------------------------------------


class ErrorCode:
    """The codes carried by an ``error`` reply (see PROTOCOL.md)."""

    MALFORMED = "malformed"  # not one frame of JSON object, or a bad field
    BAD_VERSION = "bad_version"  # hello with another protocol version
    UNKNOWN_TYPE = "unknown_type"
    NAME_INVALID = "name_invalid"
    NAME_TAKEN = "name_taken"
    ALREADY_JOINED = "already_joined"  # hello under a second name
    NOT_JOINED = "not_joined"  # say/ping/fetch before a welcome
    TEXT_EMPTY = "text_empty"
    TEXT_TOO_LONG = "text_too_long"
    RATE_LIMITED = "rate_limited"
    FLOODING = "flooding"  # kept flooding past rate_limited: disconnected
    SERVER_FULL = "server_full"
    NAME_NOT_ALLOWED = "name_not_allowed"  # this client key may not use that name
    ROOM_INVALID = "room_invalid"  # not a room name
    NOT_IN_ROOM = "not_in_room"  # say, topic, fetch or part in a room not joined
    TOO_MANY_ROOMS = "too_many_rooms"  # a limit on rooms per connection or in all
    USER_OFFLINE = "user_offline"  # a direct message to a name not online
    UNAVAILABLE = "unavailable"  # the broker cannot store events now (disk full): try later


class ProtocolError(Exception):
    """A peer sent something that is not valid zchat protocol."""

    def __init__(self, reason: str, code: str = ErrorCode.MALFORMED):
        super().__init__(reason)
        self.reason = reason
        self.code = code


# --- message types ------------------------------------------------------------


def message(cls: type) -> type:
    """A message type: a frozen dataclass with slots, whose ``__init__``
    sets each slot through its own descriptor. The frozen ``__init__`` that
    dataclass writes looks up ``object.__setattr__`` and then the slot by
    name for every field, which made building a message cost 2-3x as much;
    every chat message builds three (its say, its event and its ack).
    Equality, hashing, repr and FrozenInstanceError are dataclass's own."""
    cls = dataclass(frozen=True, slots=True)(cls)
    scope: dict[str, Any] = {}
    params, body = [], ["\n    pass"]
    for f in fields(cls):
        if not f.init or f.default_factory is not MISSING:
            raise TypeError(f"{cls.__name__}.{f.name}: a message field takes a plain default")
        scope[f"_set_{f.name}"] = cls.__dict__[f.name].__set__
        if f.default is MISSING:
            params.append(f.name)
        else:
            scope[f"_default_{f.name}"] = f.default
            params.append(f"{f.name}=_default_{f.name}")
        body.append(f"\n    _set_{f.name}(self, {f.name})")
    exec(f"def __init__(self, {', '.join(params)}):{''.join(body)}", scope)
    init = scope["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    cls.__init__ = init
    return cls


@message
class Hello:
    """Client asks to join under ``name`` (or resume its session)."""

    TYPE: ClassVar[str] = "hello"
    name: str
    # Required on the wire (a hello without it is malformed); the default is
    # for Python callers, which always send it.
    v: int = field(default=PROTOCOL_VERSION, metadata={"required": True})
    resume: str | None = None
    # proves this is the same person as the name's other connections
    secret: str | None = None
    # a quiet connection (a script's send) is not announced or listed
    quiet: bool = False
    # the rooms to be in from the start (absent: #general)
    rooms: list[str] | None = None


@message
class Say:
    """Client sends chat text; ``id`` is chosen by the client, unique per name."""

    TYPE: ClassVar[str] = "say"
    id: str
    text: str
    session: str | None = None
    room: str | None = None  # neither room nor to: #general
    to: str | None = None  # a direct message to this name


@message
class Who:
    """Anyone asks who is online (no join needed)."""

    TYPE: ClassVar[str] = "who"
    room: str | None = None  # None: everyone online
    after: str | None = None  # the cursor of the previous page (its ``next``)


@message
class JoinRoom:
    """Client enters a room, creating it if it does not exist."""

    TYPE: ClassVar[str] = "join"
    room: str
    session: str | None = None


@message
class PartRoom:
    """Client leaves a room."""

    TYPE: ClassVar[str] = "part"
    room: str
    session: str | None = None


@message
class SetTopic:
    """Client sets the topic of a room it is in."""

    TYPE: ClassVar[str] = "topic"
    room: str
    text: str
    session: str | None = None


@message
class ListRooms:
    """Anyone asks which rooms exist (no join needed)."""

    TYPE: ClassVar[str] = "rooms"


@message
class Ping:
    """Client heartbeat; any request counts as one too."""

    TYPE: ClassVar[str] = "ping"
    session: str | None = None


@message
class Fetch:
    """Client asks for the events with ``after < seq <= until`` (gap repair)."""

    TYPE: ClassVar[str] = "fetch"
    after: int
    until: int
    session: str | None = None
    stream: str | None = None


@message
class Recent:
    """Client asks for the last ``count`` chat messages (history on joining)."""

    TYPE: ClassVar[str] = "recent"
    count: int
    session: str | None = None
    stream: str | None = None


@message
class Bye:
    """Client leaves; others see the reason ``quit``."""

    TYPE: ClassVar[str] = "bye"
    session: str | None = None


@message
class Room:
    """A room as its members see it: its position (the last seq so far),
    topic and number of people in it. Answers ``join`` and ``topic``."""

    TYPE: ClassVar[str] = "room"
    room: str
    seq: int
    topic: str
    members: int


@message
class Parted:
    """Broker answers ``part``."""

    TYPE: ClassVar[str] = "parted"
    room: str


@message
class RoomList:
    """Broker answers ``rooms``: every room with its topic and member count."""

    TYPE: ClassVar[str] = "rooms"
    rooms: list[Room]


@message
class Welcome:
    """Broker accepts a hello: the rooms this connection is in, with their
    positions, and the position of the user's direct messages."""

    TYPE: ClassVar[str] = "welcome"
    name: str
    epoch: str
    online: int  # people online broker-wide (``who`` lists them)
    resume: str
    heartbeat_interval: float
    heartbeat_liveness: int
    max_text: int
    rooms: list[Room]
    dm_seq: int
    resumed: bool = False
    v: int = PROTOCOL_VERSION


@message
class Ack:
    """Broker accepted the message ``id`` and broadcast it as ``seq``."""

    TYPE: ClassVar[str] = "ack"
    id: str
    seq: int


@message
class Error:
    """Broker refuses a request; ``id`` names the refused message, if any."""

    TYPE: ClassVar[str] = "error"
    code: str
    reason: str
    id: str | None = None
    retry_after: float | None = None


@message
class Users:
    """Broker answers ``who``: one page of names, sorted by name key.
    ``next``, present when more follow, is the ``after`` of the next page."""

    TYPE: ClassVar[str] = "users"
    users: list[str]
    room: str | None = None
    count: int = 0  # people listed in all pages together
    next: str | None = None


@message
class History:
    """Broker answers ``fetch`` (or ``recent``, then ``recent`` is true).
    ``first`` is the oldest seq it still holds."""

    TYPE: ClassVar[str] = "history"
    events: list[Any]
    first: int
    until: int
    recent: bool = False
    stream: str | None = None


@message
class Message:
    """A chat message, stamped by the broker with sender, time and seq."""

    TYPE: ClassVar[str] = "message"
    seq: int
    time: float
    sender: str = field(metadata={"wire": "from"})
    text: str
    room: str | None = None  # a room's message
    to: str | None = None  # a direct message: its addressee


class LeaveReason:
    QUIT = "quit"  # the client said bye
    TIMEOUT = "timeout"  # no heartbeat for liveness x interval
    DISCONNECTED = "disconnected"  # the broker could no longer reach it
    KICKED = "kicked"  # disconnected by the broker for flooding
    PART = "part"  # left this room, still online


LEAVE_REASONS = frozenset({LeaveReason.QUIT, LeaveReason.TIMEOUT, LeaveReason.DISCONNECTED,
                           LeaveReason.KICKED, LeaveReason.PART})


@message
class Presence:
    """Who entered and who left a room since its last presence event (one
    pass of the broker's loop): ``joined`` names, and ``left`` as
    ``[name, reason]`` pairs. A name is in at most one of the two."""

    TYPE: ClassVar[str] = "presence"
    seq: int
    time: float
    joined: list[str]
    left: list[list[str]]
    room: str | None = None

    def people(self) -> list[tuple[str, str | None]]:
        """(name, None) for each who joined, then (name, reason) for each who left."""
        return [(n, None) for n in self.joined] + [(n, r) for n, r in self.left]


@message
class Topic:
    """Someone set a room's topic."""

    TYPE: ClassVar[str] = "topic"
    seq: int
    time: float
    name: str
    text: str
    room: str | None = None


@message
class Members:
    """How many people are in a room that is too big to announce each join
    and leave (not sequenced; at most once per heartbeat interval)."""

    TYPE: ClassVar[str] = "members"
    room: str
    count: int


@message
class Heartbeat:
    """Broker is alive; ``epoch`` names this run of it."""

    TYPE: ClassVar[str] = "heartbeat"
    epoch: str
    time: float
    # Always 0. Protocol 1 required it; sent, it lets a protocol 1 client get
    # as far as its hello, which is then refused bad_version, a clear error.
    seq: int = 0


@message
class Position:
    """The last seq of a stream, so a reader notices a lost tail: on a
    room's topic after it changed, and to a user alone for direct messages."""

    TYPE: ClassVar[str] = "position"
    stream: str
    seq: int


@message
class Shutdown:
    """Broker is going away (SIGINT/SIGTERM)."""

    TYPE: ClassVar[str] = "shutdown"
    time: float


REQUEST_TYPES = {cls.TYPE: cls for cls in (Hello, Say, Who, Ping, Fetch, Recent, Bye, JoinRoom,
                                            PartRoom, SetTopic, ListRooms)}
# Direct messages (a Message with ``to``) and their Position come as replies.
REPLY_TYPES = {cls.TYPE: cls for cls in (Welcome, Ack, Error, Users, History, Room, Parted,
                                          RoomList, Message, Position)}
EVENT_TYPES = {cls.TYPE: cls for cls in (Message, Presence, Topic, Heartbeat, Position, Members,
                                          Shutdown)}
SEQUENCED_EVENTS = (Message, Presence, Topic)
SEQUENCED_TYPES = {cls.TYPE: cls for cls in SEQUENCED_EVENTS}


# --- encoding -------------------------------------------------------------------

@cache
def _field_specs(cls: type) -> tuple[tuple[str, str, str, Any], ...]:
    """(name, wire name, annotation, default on the wire) of each field of a message type."""
    return tuple(
        (f.name, f.metadata.get("wire", f.name), f.type,
         MISSING if f.metadata.get("required") else f.default) for f in fields(cls)
    )


# One encoder for all frames: json.dumps with options builds one per call.
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
# What _ENCODER writes for a str (quoted, escaped, non-ASCII kept as is).
_json_str = json.encoder.encode_basestring


def to_wire(msg: Any) -> dict:
    """The JSON-ready dict of a message, with ``type`` and wire field names."""
    body = {"type": msg.TYPE}
    for name, wire_name, annotation, _ in _field_specs(type(msg)):
        value = getattr(msg, name)
        if value is None:
            continue
        if annotation in _NESTED:
            value = [to_wire(e) for e in value]
        body[wire_name] = value
    return body


def encode(msg: Any) -> bytes:
    """One message as one UTF-8 JSON frame."""
    fast = _TEMPLATES.get(type(msg))
    if fast is not None and (frame := fast(msg)) is not None:
        return frame
    return _ENCODER.encode(to_wire(msg)).encode()


# --- templates for the messages sent once per chat message --------------------
# Each writes the very bytes the generic path writes (tests/test_messages.py
# compares them on hostile texts), from a pre-built text with the values
# spliced in: no dict, no encoder object. A value of another type than the
# wire's usual one (a bool, a NaN, a str subclass) gives None, and the
# generic path encodes that message.

def _plain_number(value: Any) -> str | None:
    """What the encoder writes for an int or a finite float, else None."""
    kind = type(value)
    if kind is int or (kind is float and value - value == 0.0):  # not inf, not NaN
        return repr(value)
    return None


def _optional_str(key: str, value: Any) -> str | None:
    """``,"key":"value"`` of an optional str field; "" if it is None."""
    if value is None:
        return ""
    return None if type(value) is not str else f',"{key}":{_json_str(value)}'


def _message_template(msg: "Message") -> bytes | None:
    seq, time = _plain_number(msg.seq), _plain_number(msg.time)
    room, to = _optional_str("room", msg.room), _optional_str("to", msg.to)
    if None in (seq, time, room, to) or type(msg.sender) is not str or type(msg.text) is not str:
        return None
    return (f'{{"type":"message","seq":{seq},"time":{time},"from":{_json_str(msg.sender)},'
            f'"text":{_json_str(msg.text)}{room}{to}}}').encode()


def _ack_template(msg: "Ack") -> bytes | None:
    seq = _plain_number(msg.seq)
    if seq is None or type(msg.id) is not str:
        return None
    return f'{{"type":"ack","id":{_json_str(msg.id)},"seq":{seq}}}'.encode()


_TEMPLATES = {Message: _message_template, Ack: _ack_template}


def join_events(encoded: list[bytes]) -> bytes:
    """A PUB body from events already encoded once each."""
    return b"[" + b",".join(encoded) + b"]"


# --- decoding -------------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# NaN and Infinity are not JSON; accepted, they would break timers. One
# decoder for all frames: json.loads with options builds one per call.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)
# Its C scanner alone: JSONDecoder.decode adds two Python calls and two
# regular expressions (for whitespace around the value) to every frame.
_SCAN_ONCE = _DECODER.scan_once


def _parse_json(frame: bytes) -> Any:
    try:
        text = frame.decode("utf-8")
        try:
            value, end = _SCAN_ONCE(text, 0)  # one value filling the frame, as encode() writes it
        except StopIteration:  # nothing that starts a value at 0 (leading whitespace?)
            end = -1
        if end != len(text):  # anything else: the decoder accepts or refuses it as before
            value = _DECODER.decode(text)
        return value
    except UnicodeDecodeError:
        raise ProtocolError("frame is not valid UTF-8") from None
    except (ValueError, RecursionError):
        raise ProtocolError("frame is not valid JSON") from None


def _is_text(value: Any) -> bool:
    """A str that can be encoded again: JSON's \\ud800 escapes can make lone
    surrogates, which would break the broker's own encoding later."""
    if not isinstance(value, str):
        return False
    if value.isascii():
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and -MAX_SAFE_INT <= value <= MAX_SAFE_INT)


# The field types messages use, each with its check.
_TYPE_CHECKS = {
    "str": _is_text,
    "int": lambda v: isinstance(v, int) and _is_number(v),
    "float": _is_number,
    "bool": lambda v: isinstance(v, bool),
    "list[str]": lambda v: isinstance(v, list) and all(_is_text(x) for x in v),
    "list[list[str]]": lambda v: isinstance(v, list) and all(
        isinstance(x, list) and len(x) == 2 and all(_is_text(y) for y in x) for x in v),
    "list[Any]": lambda v: isinstance(v, list),
    "list[Room]": lambda v: isinstance(v, list),
}
# Fields that hold messages, and the types each may hold: a history holds
# sequenced events only (a heartbeat or shutdown in it has no place in a
# stream and would reach a client's reader); a welcome or list holds rooms.
_NESTED = {"list[Any]": SEQUENCED_TYPES, "list[Room]": {Room.TYPE: Room}}
# How a refusal names a type where its annotation alone would not say what is
# wrong (a lone surrogate such as \ud800 is a str, but not UTF-8 text).
_TYPE_NAMES = {"str": "a string of valid UTF-8 text",
               "list[list[str]]": "a list of [name, reason] pairs"}


@cache
def _decode_specs(cls: type) -> tuple:
    """Per field of a message type, what decoding needs, worked out once:
    (name, wire name, value when absent, check, optional, nested types, type name)."""
    specs = []
    for name, wire_name, annotation, default in _field_specs(cls):
        base = annotation.removesuffix(" | None")
        specs.append((name, wire_name, None if default is MISSING else default,
                      _TYPE_CHECKS[base], annotation.endswith("| None"), _NESTED.get(base),
                      _TYPE_NAMES.get(base, base)))
    return tuple(specs)


def _build(types: dict[str, type], body: Any) -> Any:
    if not isinstance(body, dict):
        raise ProtocolError("message must be a JSON object")
    kind = body.get("type")
    cls = types.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ProtocolError(f"unknown message type {kind!r}"[:120], ErrorCode.UNKNOWN_TYPE)
    values = []  # in the order of the fields, which is that of the dataclass's __init__
    # Type-check each field against its annotation (a small, fixed set).
    for name, wire_name, absent, check, optional, nested, type_name in _decode_specs(cls):
        value = body.get(wire_name, absent)
        if value is None:
            if not optional:
                raise ProtocolError(f"{cls.TYPE}: field {name!r} is missing")
        elif not check(value):
            raise ProtocolError(f"{cls.TYPE}: field {name!r} must be {type_name}")
        elif nested is not None:
            value = [_build(nested, item) for item in value]
        values.append(value)
    return cls(*values)  # by position: keywords cost a dict and their matching


def _check_token(msg: Any, token: str | None) -> None:
    if token is not None and not (len(token) <= MAX_TOKEN_CHARS and token.isascii()):
        raise ProtocolError(f"{msg.TYPE}: the session token is not one this broker gave")


def _check_request(msg: Any) -> Any:
    """Limits that hold whatever the broker's settings are."""
    if type(msg) is Say:  # the request of every chat message: its own checks alone
        _check_token(msg, msg.session)
        if not 1 <= len(msg.id) <= MAX_MESSAGE_ID_CHARS:
            raise ProtocolError(f"say: id must be 1 to {MAX_MESSAGE_ID_CHARS} characters")
        return msg
    _check_token(msg, getattr(msg, "resume", None) or getattr(msg, "session", None))
    stream = getattr(msg, "stream", None)
    if stream is not None and not 1 <= len(stream) <= MAX_STREAM_ID_CHARS:
        raise ProtocolError(f"{msg.TYPE}: stream must be 1 to {MAX_STREAM_ID_CHARS} characters")
    if isinstance(msg, Hello):
        if len(msg.name) > 4 * MAX_NAME_CHARS:
            raise ProtocolError("hello: name is far too long", ErrorCode.NAME_INVALID)
        if msg.secret is not None and not (len(msg.secret) <= MAX_SECRET_CHARS
                                           and msg.secret.isascii()):
            raise ProtocolError(f"hello: secret must be at most {MAX_SECRET_CHARS} ASCII characters")
        if msg.rooms is not None and len(msg.rooms) > MAX_HELLO_ROOMS:
            raise ProtocolError(f"hello: at most {MAX_HELLO_ROOMS} rooms",
                                ErrorCode.TOO_MANY_ROOMS)
    elif isinstance(msg, Who):
        if msg.after is not None and len(msg.after) > MAX_TOKEN_CHARS:
            raise ProtocolError(f"who: after must be at most {MAX_TOKEN_CHARS} characters")
    elif isinstance(msg, SetTopic):
        if len(msg.text.encode()) > MAX_TOPIC_BYTES:
            raise ProtocolError(f"topic: at most {MAX_TOPIC_BYTES} bytes", ErrorCode.TEXT_TOO_LONG)
    elif isinstance(msg, Fetch):
        if msg.after < 0 or msg.until < msg.after:
            raise ProtocolError("fetch: need 0 <= after <= until")
    elif isinstance(msg, Recent):
        if not 0 <= msg.count <= MAX_FETCH_EVENTS:
            raise ProtocolError(f"recent: count must be 0 to {MAX_FETCH_EVENTS}")
    return msg


def decode_request(frames: list[bytes]) -> Any:
    """A client request from the frames after the routing id."""
    if len(frames) != 1:
        raise ProtocolError(f"expected 1 frame, got {len(frames)}")
    return _check_request(_build(REQUEST_TYPES, _parse_json(frames[0])))


# A ping exactly as encode() writes it. Pings are most of what an idle broker
# reads (every client, every interval), so it takes the token from this form
# without decoding JSON; any other spelling is decoded as usual.
_PING_HEAD = b'{"type":"ping","session":"'
_PING_TAIL = b'"}'


def ping_token(frames: list[bytes]) -> str | None:
    """The session token of a one-frame ping in encode()'s own form (a token
    of ASCII letters and digits); None for anything else."""
    if len(frames) != 1:
        return None
    frame = frames[0]
    if not (frame.startswith(_PING_HEAD) and frame.endswith(_PING_TAIL)):
        return None
    token = frame[len(_PING_HEAD):-len(_PING_TAIL)]
    if 0 < len(token) <= MAX_TOKEN_CHARS and token.isalnum() and token.isascii():
        return token.decode()
    return None


def decode_reply(frames: list[bytes]) -> Any:
    """A broker reply as a DEALER receives it."""
    if len(frames) != 1:
        raise ProtocolError(f"expected 1 frame, got {len(frames)}")
    return _build(REPLY_TYPES, _parse_json(frames[0]))


def decode_event_body(body: Any) -> Any:
    return _build(EVENT_TYPES, body)


def decode_broadcast(frames: list[bytes]) -> list[Any]:
    """The events of one PUB message ``[topic, body]``."""
    if len(frames) != 2:
        raise ProtocolError(f"expected 2 frames, got {len(frames)}")
    events = _parse_json(frames[1])
    if not isinstance(events, list) or not events:
        raise ProtocolError("broadcast body must be a non-empty JSON array")
    return [decode_event_body(e) for e in events]


# --- validation helpers shared by broker and clients ----------------------------


def name_problem(name: str) -> str | None:
    """Why ``name`` is not a valid username, or None when it is."""
    if NAME_PATTERN.fullmatch(name):
        return None
    return (
        f"names are 1 to {MAX_NAME_CHARS} characters of letters, digits, "
        "'_', '-' and '.'"
    )


def name_key(name: str) -> str:
    """The form under which names are compared: unique ignoring case."""
    return name.casefold()


def room_problem(room: str) -> str | None:
    """Why ``room`` is not a valid room name, or None when it is."""
    if ROOM_PATTERN.fullmatch(room):
        return None
    return (f"room names are '#' and 1 to {MAX_ROOM_CHARS - 1} characters of letters, "
            "digits, '_', '-' and '.'")


def room_key(room: str) -> str:
    """The form under which rooms are compared (and their stream id)."""
    return room.lower()


def text_bytes(text: str) -> int:
    """How long ``text`` is in UTF-8 bytes, the measure of every text limit."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def text_problem(text: str, max_text_bytes: int) -> tuple[str, str] | None:
    """(code, reason) when ``text`` may not be sent, else None."""
    if not text or text.isspace():  # what strip() would leave empty, with no copy
        return ErrorCode.TEXT_EMPTY, "message is empty"
    size = text_bytes(text)
    if size > max_text_bytes:
        return ErrorCode.TEXT_TOO_LONG, (
            f"message is {size} bytes; the limit is {max_text_bytes}"
        )
    return None
