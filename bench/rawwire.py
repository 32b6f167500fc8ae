"""The wire formats of the independent load generator, written from the specs alone.

* **ZMTP 3.0** (RFC 23, rfc.zeromq.org/spec/23): the 64-byte greeting with
  the NULL mechanism, the READY command with its properties, and frames with
  the MORE, LONG and COMMAND flags. A SUB subscribes with a message whose
  first byte is 1 (0 to unsubscribe): the ZMTP 3.0 form, which libzmq's
  XPUB and PUB accept from a peer that greets as 3.0.
* **RESP** (the Redis protocol): commands as arrays of bulk strings.
* **zchat's JSON requests**, from PROTOCOL.md only (not from the project's
  clients): ``ZchatWire`` is the one place that knows them, so a protocol
  change is followed here.

No ZeroMQ library is used: everything here is bytes for a plain TCP socket.
"""

from __future__ import annotations

import json

# --- ZMTP 3.0 -------------------------------------------------------------------

GREETING_BYTES = 64
FLAG_MORE = 0x01
FLAG_LONG = 0x02
FLAG_COMMAND = 0x04
SHORT_FRAME_MAX = 255  # a body longer than this needs the 8-byte size (LONG)
# Refuse a peer's frame above this: the largest zchat reply (a welcome listing
# 9,000 names) is ~0.3 MB; PROTOCOL.md asks clients to accept about 1 MB.
MAX_FRAME_BYTES = 16 * 2**20


class ZmtpError(Exception):
    pass


def zmtp_greeting() -> bytes:
    """signature (0xFF, 8 padding bytes, 0x7F), version 3.0, mechanism NULL,
    as-server 0, filler to 64 bytes."""
    g = b"\xff" + b"\x00" * 8 + b"\x7f" + bytes([3, 0]) + b"NULL".ljust(20, b"\x00") + b"\x00"
    return g.ljust(GREETING_BYTES, b"\x00")


def zmtp_frame(body: bytes, more: bool = False, command: bool = False) -> bytes:
    flags = (FLAG_MORE if more else 0) | (FLAG_COMMAND if command else 0)
    if len(body) > SHORT_FRAME_MAX:
        return bytes([flags | FLAG_LONG]) + len(body).to_bytes(8, "big") + body
    return bytes([flags, len(body)]) + body


def zmtp_ready(socket_type: bytes, identity: bytes | None = None) -> bytes:
    """The READY command: name, then properties (name-size, name, 4-byte value-size, value)."""
    props = [(b"Socket-Type", socket_type)]
    if identity is not None:
        props.append((b"Identity", identity))
    body = bytes([5]) + b"READY" + b"".join(
        bytes([len(k)]) + k + len(v).to_bytes(4, "big") + v for k, v in props)
    return zmtp_frame(body, command=True)


def zmtp_handshake(socket_type: bytes, identity: bytes | None = None) -> bytes:
    """What a NULL-mechanism peer sends first: its greeting, then READY."""
    return zmtp_greeting() + zmtp_ready(socket_type, identity)


def zmtp_subscribe(topic: bytes) -> bytes:
    return zmtp_frame(b"\x01" + topic)


def zmtp_unsubscribe(topic: bytes) -> bytes:
    return zmtp_frame(b"\x00" + topic)


def zmtp_message(*parts: bytes) -> bytes:
    """A multi-frame message: MORE on every frame but the last."""
    return b"".join(zmtp_frame(p, more=i < len(parts) - 1) for i, p in enumerate(parts))


class ZmtpReader:
    """Parses a peer's byte stream: greeting, READY, then messages.

    ``feed`` returns the complete messages (lists of frame bodies) received;
    commands after READY (none are expected with NULL) are skipped. Once
    ``ready`` is true, ``take_raw`` hands the unparsed rest to a caller that
    wants to scan the stream instead of parsing it (see Scanner).
    """

    def __init__(self):
        self.buf = bytearray()
        self.greeted = False
        self.ready = False
        self.peer_type = b""
        self._parts: list[bytes] = []

    def feed(self, data: bytes) -> list[list[bytes]]:
        self.buf += data
        messages = []
        if not self.greeted:
            if len(self.buf) < GREETING_BYTES:
                return messages
            g = bytes(self.buf[:GREETING_BYTES])
            if g[0] != 0xFF or g[9] != 0x7F or g[10] < 3:
                raise ZmtpError(f"not a ZMTP 3 greeting: {g[:12]!r}")
            if g[12:32].rstrip(b"\x00") != b"NULL":
                raise ZmtpError(f"mechanism {g[12:32]!r}, not NULL")
            del self.buf[:GREETING_BYTES]
            self.greeted = True
        while True:
            frame = self._next_frame()
            if frame is None:
                return messages
            flags, body = frame
            if flags & FLAG_COMMAND:
                self._on_command(body)
                continue
            self._parts.append(body)
            if not flags & FLAG_MORE:
                messages.append(self._parts)
                self._parts = []

    def take_raw(self) -> bytes:
        raw = bytes(self.buf)
        self.buf.clear()
        return raw

    def _next_frame(self) -> tuple[int, bytes] | None:
        buf = self.buf
        if len(buf) < 2:
            return None
        flags = buf[0]
        if flags & FLAG_LONG:
            if len(buf) < 9:
                return None
            size, head = int.from_bytes(buf[1:9], "big"), 9
        else:
            size, head = buf[1], 2
        if size > MAX_FRAME_BYTES:
            raise ZmtpError(f"frame of {size} bytes")
        if len(buf) < head + size:
            return None
        body = bytes(buf[head:head + size])
        del buf[:head + size]
        return flags, body

    def _on_command(self, body: bytes) -> None:
        name_len = body[0]
        name = body[1:1 + name_len]
        if name == b"ERROR":
            raise ZmtpError(f"peer sent ERROR: {body[1 + name_len + 1:]!r}")
        if name != b"READY":
            return
        props, i = {}, 1 + name_len
        while i < len(body):
            k_len = body[i]
            key = body[i + 1:i + 1 + k_len]
            i += 1 + k_len
            v_len = int.from_bytes(body[i:i + 4], "big")
            props[key.lower()] = body[i + 4:i + 4 + v_len]
            i += 4 + v_len
        self.peer_type = props.get(b"socket-type", b"")
        self.ready = True


# --- RESP (Redis) ---------------------------------------------------------------


def resp_command(*args: bytes) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


def resp_subscribed(channel: bytes) -> bytes:
    """Redis's confirmation of ``SUBSCRIBE channel`` on a connection with no other
    subscription: the array [subscribe, channel, 1]."""
    return b"*3\r\n$9\r\nsubscribe\r\n$%d\r\n%s\r\n:1\r\n" % (len(channel), channel)


class RespLineCounter:
    """Counts the replies to PUBLISH: each is one line, ``:N`` (receivers) or ``-ERR ...``."""

    def __init__(self):
        self.tail = b""
        self.ok = 0
        self.errors = 0
        self.first_error = ""

    def feed(self, data: bytes) -> None:
        lines = (self.tail + data).split(b"\r\n")
        self.tail = lines.pop()
        for line in lines:
            if line[:1] == b":":
                self.ok += 1
            else:
                self.errors += 1
                self.first_error = self.first_error or line.decode("utf-8", "replace")


# --- zchat's JSON (from PROTOCOL.md) --------------------------------------------


class ZchatWire:
    """zchat protocol 3 as PROTOCOL.md documents it: topics, requests, replies.

    A request is one ZMTP frame on the DEALER holding a JSON object; a
    broadcast is two frames on the SUB, [topic, JSON array of events].
    """

    VERSION = 3
    HEARTBEAT_TOPIC = b"hb"

    @staticmethod
    def room_topic(room: str) -> bytes:
        # "r:" + the room key (the name in lower case) + one NUL byte
        return b"r:" + room.lower().encode() + b"\x00"

    @staticmethod
    def ready_topic(nonce: str) -> bytes:
        return b"ready:" + nonce.encode()

    @staticmethod
    def _request(obj: dict) -> bytes:
        return zmtp_frame(json.dumps(obj, separators=(",", ":")).encode())

    @classmethod
    def hello(cls, name: str, rooms: list[str], quiet: bool, secret: str,
              resume: str | None = None) -> bytes:
        request = {"type": "hello", "name": name, "v": cls.VERSION, "secret": secret,
                   "quiet": quiet, "rooms": rooms}
        if resume:
            request["resume"] = resume
        return cls._request(request)

    @classmethod
    def say(cls, msg_id: str, text: str, session: str, room: str) -> bytes:
        return cls._request({"type": "say", "id": msg_id, "text": text, "session": session,
                             "room": room})

    @classmethod
    def ping(cls, session: str) -> bytes:
        return cls._request({"type": "ping", "session": session})

    @classmethod
    def bye(cls, session: str) -> bytes:
        return cls._request({"type": "bye", "session": session})

    @staticmethod
    def ping_period_ns(welcome: dict) -> int:
        """PROTOCOL.md: a client pings when it has sent nothing for
        heartbeat_liveness x heartbeat_interval / 2."""
        return int(welcome["heartbeat_liveness"] * welcome["heartbeat_interval"] / 2 * 1e9)

    @staticmethod
    def reply(frame: bytes) -> dict:
        obj = json.loads(frame)
        if not isinstance(obj, dict) or "type" not in obj:
            raise ValueError(f"reply is not a typed JSON object: {frame[:80]!r}")
        return obj
