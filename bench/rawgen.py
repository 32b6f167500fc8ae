"""An independent load generator: plain TCP sockets, each server's own protocol.

    python bench/rawgen.py --kind zchat|redis|forwarder --role listen|send \\
        --port P [--pub-port Q] --clients N --tag NAME

It shares nothing with loadgen.py or the project's clients: it speaks ZMTP
3.0, RESP and zchat's JSON as rawwire.py writes them from the specs (RFC 23,
the Redis protocol, PROTOCOL.md), the way a simple client does: every request
goes out as soon as it is due, one frame per TCP write (TCP_NODELAY, as
libzmq and redis-py set it), on one single-threaded epoll loop per process.

Roles, each holding ``--clients`` connections to one server:

* ``listen``: clients that join one room and count what reaches them:
  zchat: DEALER + SUB, the join probe, ``hello``, then a ``ping`` every
  heartbeat interval; Redis: ``SUBSCRIBE bench``; forwarder: a SUB on ``all``.
* ``send``: publishers: zchat: a quiet DEALER (``hello`` then ``say``, each
  ack read); Redis: ``PUBLISH bench``; forwarder: a DEALER named ``all:...``.

Driven by one JSON object a line on stdin, answered by one JSON line on
stdout (bench/rawbench.py is the driver); it exits when stdin closes.

Deliveries are counted by scanning each listener's byte stream for the
message marker ``~TTNNNNNNNNNSSSSSSSSSSSSSSSSSSS~`` (trial, message number,
CLOCK_MONOTONIC at the write, in ns), which every protocol carries verbatim
in the message text (JSON escapes none of its characters): one marker, one
delivery, whatever the framing, at C speed (a regex over each read) rather
than a Python parse per frame, so that the generator outruns the servers.
The handshakes, replies and acknowledgements are parsed in full.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import os
import re
import secrets
import selectors
import socket
import sys
import time
from collections import Counter, deque

from rawwire import (RespLineCounter, ZchatWire, ZmtpError, ZmtpReader, resp_command,
                     resp_subscribed, zmtp_frame, zmtp_handshake, zmtp_subscribe,
                     zmtp_unsubscribe)

HOST = "127.0.0.1"
ROOM = "#bench"  # zchat: the one room everybody joins
CHANNEL = b"bench"  # Redis: the one channel
FORWARDER_TOPIC = b"all"  # c-forwarder: the PUB topic is the sender's routing id, all:...
READ_BYTES = 256 * 1024
MARK_LEN = 1 + 2 + 9 + 19 + 1  # ~, trial, number, ns, ~ (see marker())
# Listener scan tail: what a read leaves for the next one, so that a marker or a
# probe topic split over two reads is found. One byte short of a marker, so that
# no marker already counted fits in it whole (and a counted marker's closing "~"
# is followed by TEXT_PAD's space, so no new match can start there): nothing is
# counted twice.
TAIL_BYTES = MARK_LEN - 1
LATENCY_SAMPLES = 60_000  # per process and trial: enough for a p99 over processes
RECONNECT_DELAY_NS = 250_000_000  # after a refused or reset connection during a join
PING_CHECK_NS = 100_000_000  # how often a listener process looks for pings due
TEXT_PAD = " raw bench line"  # the rest of each message, after the marker


def now_ns() -> int:
    return time.monotonic_ns()


def marker(trial: int, number: int) -> str:
    return f"~{trial % 100:02d}{number:09d}{now_ns():019d}~"


class Loop:
    """One epoll loop: sockets, stdin and timers."""

    def __init__(self):
        self.sel = selectors.DefaultSelector()
        self.timers: list = []
        self._seq = itertools.count()

    def at(self, when_ns: int, fn) -> None:
        heapq.heappush(self.timers, (when_ns, next(self._seq), fn))

    def run_once(self) -> None:
        timeout = None
        if self.timers:
            timeout = max(0.0, (self.timers[0][0] - now_ns()) / 1e9)
        for key, mask in self.sel.select(timeout):
            key.data(mask)
        t = now_ns()
        while self.timers and self.timers[0][0] <= t:
            _, _, fn = heapq.heappop(self.timers)
            fn()


class Conn:
    """A non-blocking TCP connection: one send() a frame, reads passed on as they come."""

    def __init__(self, loop: Loop, port: int, on_connect, on_data, on_fail):
        self.loop = loop
        self.on_connect, self.on_data, self.on_fail = on_connect, on_data, on_fail
        self.pending = bytearray()
        self.connected = False
        self.closed = False
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setblocking(False)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.connect_ex((HOST, port))
        loop.sel.register(self.sock, selectors.EVENT_WRITE, self._event)

    def _event(self, mask: int) -> None:
        if not self.connected:
            err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                return self.fail(os.strerror(err))
            self.connected = True
            self._watch()
            self.on_connect()
            return
        if mask & selectors.EVENT_READ:
            try:
                data = self.sock.recv(READ_BYTES)
            except (BlockingIOError, InterruptedError):
                data = None
            except OSError as e:
                return self.fail(str(e))
            if data == b"":
                return self.fail("closed by the server")
            if data:
                self.on_data(data)
        if mask & selectors.EVENT_WRITE and not self.closed:
            self._flush()

    def send(self, data: bytes) -> None:
        if self.closed:
            return
        if self.pending or not self.connected:
            self.pending += data
            return
        try:
            n = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError as e:
            return self.fail(str(e))
        if n < len(data):
            self.pending += data[n:]
            self._watch()

    def _flush(self) -> None:
        try:
            n = self.sock.send(self.pending)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            return self.fail(str(e))
        del self.pending[:n]
        if not self.pending:
            self._watch()

    def _watch(self) -> None:
        mask = selectors.EVENT_READ | (selectors.EVENT_WRITE if self.pending else 0)
        self.loop.sel.modify(self.sock, mask, self._event)

    def fail(self, why: str) -> None:
        if not self.closed:
            self.close()
            self.on_fail(why)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.loop.sel.unregister(self.sock)
            self.sock.close()


class Scan:
    """Counts the markers of the current trial in one listener's stream."""

    pattern: re.Pattern | None = None  # set per trial, shared by the process
    latencies: list = []

    def __init__(self):
        self.tail = b""
        self.count = 0

    def feed(self, data: bytes, watch: bytes | None = None) -> bool:
        """Scan ``data``; returns whether ``watch`` (a probe topic) was seen in it."""
        buf = self.tail + data
        self.tail = buf[-TAIL_BYTES:]
        if Scan.pattern is not None:
            found = Scan.pattern.findall(buf)
            if found:
                t = now_ns()
                self.count += len(found)
                Scan.latencies.extend([t - int(x) for x in found])
        return watch is not None and watch in buf

    @classmethod
    def start_trial(cls, trial: int) -> None:
        cls.pattern = re.compile(rb"~%02d\d{9}(\d{19})~" % (trial % 100))
        cls.latencies = []

    @classmethod
    def stop_trial(cls) -> None:
        cls.pattern = None


class Client:
    """One simulated user or publisher; the subclasses speak one server each."""

    def __init__(self, proc: "Proc", index: int):
        self.proc = proc
        self.loop = proc.loop
        self.index = index
        self.joined_ns = 0
        self.started_ns = 0
        self.conns: list[Conn] = []
        self.scan = Scan()
        self.abandoned = False

    def start(self) -> None:
        self.started_ns = self.started_ns or now_ns()
        self.connect()

    def connect(self) -> None:
        raise NotImplementedError

    def joined(self) -> None:
        if not self.joined_ns:
            self.joined_ns = now_ns()
            self.proc.on_joined(self)

    def conn(self, port: int, on_connect, on_data) -> Conn:
        c = Conn(self.loop, port, on_connect, on_data, self.failed)
        self.conns.append(c)
        return c

    def failed(self, why: str) -> None:
        """A connection dropped: before the join, start over; after it, count it."""
        for c in self.conns:
            c.close()
        self.conns = []
        self.proc.failures[why] += 1
        if not self.joined_ns and not self.abandoned:
            self.loop.at(now_ns() + RECONNECT_DELAY_NS, self._retry)

    def _retry(self) -> None:
        if not self.abandoned:
            self.connect()

    def give_up(self) -> None:
        """Past the join deadline: close this client's connections, so that the
        idle figures that follow count only the clients that joined."""
        self.abandoned = True
        for c in self.conns:
            c.close()
        self.conns = []

    def scan_data(self, data: bytes, watch: bytes | None = None) -> bool:
        return self.scan.feed(data, watch)


class ZmtpPeer:
    """A ZMTP connection of a client: handshake, then messages or a raw scan."""

    def __init__(self, client: Client, port: int, socket_type: bytes, on_ready, on_messages,
                 identity: bytes | None = None, raw=None):
        self.reader = ZmtpReader()
        self.on_ready, self.on_messages, self.raw = on_ready, on_messages, raw
        hs = zmtp_handshake(socket_type, identity)
        self.conn = client.conn(port, lambda: self.conn.send(hs), self._data)

    def _data(self, data: bytes) -> None:
        if self.raw is not None and self.reader.ready:
            return self.raw(data)
        was_ready = self.reader.ready
        try:
            messages = self.reader.feed(data)
        except ZmtpError as e:
            return self.conn.fail(str(e))
        if self.reader.ready and not was_ready:
            self.on_ready()
            if self.raw is not None:
                rest = self.reader.take_raw()
                return self.raw(rest) if rest else None
        if messages:
            self.on_messages(messages)


# --- zchat ----------------------------------------------------------------------


class ZchatListener(Client):
    """A full zchat client (PROTOCOL.md, "Joining without the slow-joiner race")."""

    session = None

    def connect(self) -> None:
        self.nonce = secrets.token_hex(8)
        self.secret = secrets.token_hex(16)
        self.session = None
        self.probed = False
        self.dealer_ready = False
        self.dealer = ZmtpPeer(self, self.proc.port, b"DEALER", self._dealer_ready, self._replies)
        self.sub = ZmtpPeer(self, self.proc.pub_port, b"SUB", self._sub_ready, None,
                            raw=self._sub_data)

    def _sub_ready(self) -> None:
        # hb, the room, and last the probe: its answer proves the others live.
        for topic in (ZchatWire.HEARTBEAT_TOPIC, ZchatWire.room_topic(ROOM),
                      ZchatWire.ready_topic(self.nonce)):
            self.sub.conn.send(zmtp_subscribe(topic))

    def _sub_data(self, data: bytes) -> None:
        watch = None if self.probed else ZchatWire.ready_topic(self.nonce)
        if self.scan_data(data, watch):
            self.probed = True
            self.sub.conn.send(zmtp_unsubscribe(watch))
            self._hello()

    def _dealer_ready(self) -> None:
        self.dealer_ready = True
        self._hello()

    def _hello(self) -> None:
        if self.probed and self.dealer_ready and self.session is None:
            self.dealer.conn.send(ZchatWire.hello(self.name, [ROOM], False, self.secret))
            self.session = ""

    @property
    def name(self) -> str:
        return f"{self.proc.tag}-{self.index}"

    def _replies(self, messages: list[list[bytes]]) -> None:
        for parts in messages:
            reply = ZchatWire.reply(parts[-1])
            if reply["type"] == "welcome":
                self.session = reply["resume"]
                self.proc.heartbeat_ns = ZchatWire.ping_period_ns(reply)
                if not self.joined_ns:
                    self.proc.schedule_ping(self)
                self.joined()
            elif reply["type"] == "error":
                self.proc.errors[reply["code"]] += 1
                if reply["code"] == "not_joined" and self.session:
                    self._rejoin()

    def _rejoin(self) -> None:
        """PROTOCOL.md, "Joining again": on sockets that stay open, say hello again at
        once, with the old token and the same secret; no probe is needed."""
        self.proc.errors["rejoins"] += 1
        self.dealer.conn.send(ZchatWire.hello(self.name, [ROOM], False, self.secret,
                                              resume=self.session))
        self.session = ""  # no pings until the new welcome

    def ping(self) -> None:
        if self.session:
            self.dealer.conn.send(ZchatWire.ping(self.session))


class ZchatSender(Client):
    """A quiet zchat connection that says messages into the room (PROTOCOL.md: `say`)."""

    session = None
    last_send_ns = 0

    def connect(self) -> None:
        self.session = None
        self.last_send_ns = 0
        self.dealer = ZmtpPeer(self, self.proc.port, b"DEALER", self._ready, self._replies)

    def _ready(self) -> None:
        # A sender reads nothing from the room, so it needs no SUB and no probe.
        self.dealer.conn.send(ZchatWire.hello(f"{self.proc.tag}-{self.index}", [ROOM], True,
                                              secrets.token_hex(16)))

    def _replies(self, messages: list[list[bytes]]) -> None:
        for parts in messages:
            reply = ZchatWire.reply(parts[-1])
            kind = reply["type"]
            if kind == "ack":
                self.proc.acks += 1
            elif kind == "welcome":
                self.session = reply["resume"]
                self.proc.heartbeat_ns = ZchatWire.ping_period_ns(reply)
                self.joined()
            elif kind == "error":
                self.proc.errors[reply["code"]] += 1

    def publish(self, trial: int, number: int) -> None:
        text = marker(trial, number) + TEXT_PAD
        self.dealer.conn.send(ZchatWire.say(f"{trial}.{number}", text, self.session, ROOM))
        self.last_send_ns = now_ns()

    def keep_alive(self, t: int) -> None:
        if self.session and t - self.last_send_ns >= self.proc.heartbeat_ns:
            self.dealer.conn.send(ZchatWire.ping(self.session))
            self.last_send_ns = t


# --- Redis ----------------------------------------------------------------------


class RedisListener(Client):
    def connect(self) -> None:
        self.confirmed = False
        self.buf = b""
        self.c = self.conn(self.proc.port,
                           lambda: self.c.send(resp_command(b"SUBSCRIBE", CHANNEL)), self._data)

    def _data(self, data: bytes) -> None:
        if self.confirmed:
            self.scan_data(data)
            return
        self.buf += data
        ok = resp_subscribed(CHANNEL)
        i = self.buf.find(ok)
        if i >= 0:
            self.confirmed = True
            self.joined()
            rest, self.buf = self.buf[i + len(ok):], b""
            if rest:
                self.scan_data(rest)


class RedisSender(Client):
    def connect(self) -> None:
        self.c = self.conn(self.proc.port, self.joined, self.proc.replies.feed)

    def publish(self, trial: int, number: int) -> None:
        text = (marker(trial, number) + TEXT_PAD).encode()
        self.c.send(resp_command(b"PUBLISH", CHANNEL, text))


# --- libzmq's C forwarder (bench/baselines.py c-forwarder) ------------------------


class ForwarderListener(Client):
    def connect(self) -> None:
        self.sub = ZmtpPeer(self, self.proc.pub_port, b"SUB", self._ready, None,
                            raw=self.scan_data)

    def _ready(self) -> None:
        # No reply to a subscription exists: joined once it is written.
        self.sub.conn.send(zmtp_subscribe(FORWARDER_TOPIC))
        self.joined()


class ForwarderSender(Client):
    def connect(self) -> None:
        identity = FORWARDER_TOPIC + b":" + f"{self.proc.tag}-{self.index}".encode()
        self.dealer = ZmtpPeer(self, self.proc.port, b"DEALER", self.joined, lambda m: None,
                               identity=identity)

    def publish(self, trial: int, number: int) -> None:
        self.dealer.conn.send(zmtp_frame((marker(trial, number) + TEXT_PAD).encode()))


CLIENTS = {("zchat", "listen"): ZchatListener, ("zchat", "send"): ZchatSender,
           ("redis", "listen"): RedisListener, ("redis", "send"): RedisSender,
           ("forwarder", "listen"): ForwarderListener, ("forwarder", "send"): ForwarderSender}


# --- the process: commands, joins, trials ------------------------------------------


class Proc:
    def __init__(self, args):
        self.loop = Loop()
        self.kind, self.role = args.kind, args.role
        self.port, self.pub_port, self.tag = args.port, args.pub_port, args.tag
        cls = CLIENTS[(args.kind, args.role)]
        self.clients = [cls(self, i) for i in range(args.clients)]
        self.heartbeat_ns = 1_000_000_000
        self.failures: Counter = Counter()
        self.errors: Counter = Counter()
        self.acks = 0
        self.replies = RespLineCounter()
        self.pings: deque = deque()
        # the latest a ping went out after it fell due (ns): a starved
        # generator, not the server, is then why a client timed out
        self.ping_late_ns = 0
        self.task = None  # what answers the current command, when it is done
        self.stdin_buf = b""
        self.running = True
        self.loop.sel.register(sys.stdin.fileno(), selectors.EVENT_READ, self._stdin)
        if self.kind == "zchat":
            self.loop.at(now_ns() + PING_CHECK_NS, self._ping_tick)

    def run(self) -> None:
        while self.running:
            self.loop.run_once()
            if self.task is not None:
                self.task()

    def answer(self, obj: dict) -> None:
        self.task = None
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    def _stdin(self, mask: int) -> None:
        data = os.read(sys.stdin.fileno(), 65536)
        if not data:
            self.running = False
            return
        self.stdin_buf += data
        while b"\n" in self.stdin_buf:
            line, self.stdin_buf = self.stdin_buf.split(b"\n", 1)
            cmd = json.loads(line)
            getattr(self, "cmd_" + cmd.pop("cmd"))(**cmd)

    # -- liveness: zchat clients ping every heartbeat interval ------------------

    def schedule_ping(self, client: Client) -> None:
        self.pings.append((now_ns() + self.heartbeat_ns, client))

    def _ping_tick(self) -> None:
        t = now_ns()
        while self.pings and self.pings[0][0] <= t:
            due, client = self.pings.popleft()
            self.ping_late_ns = max(self.ping_late_ns, t - due)
            client.ping()
            self.pings.append((t + self.heartbeat_ns, client))
        for c in self.clients:
            if isinstance(c, ZchatSender):
                c.keep_alive(t)
        self.loop.at(t + PING_CHECK_NS, self._ping_tick)

    # -- join ------------------------------------------------------------------

    def on_joined(self, client: Client) -> None:
        self.joined_count += 1
        if self.join_mode == "seq" and self.join_next < len(self.clients) and \
                now_ns() < self.join_deadline:
            self.clients[self.join_next].start()
            self.join_next += 1

    def cmd_join(self, mode: str, start_ns: int, deadline_ns: int) -> None:
        """Join every client at once ("storm") or each after the previous one's
        confirmation ("seq"); answer when all are in or at the deadline."""
        self.join_mode, self.joined_count = mode, 0
        self.join_start, self.join_deadline = start_ns, deadline_ns

        def begin():
            self.join_start = now_ns()
            if mode == "storm":
                for c in self.clients:
                    c.start()
                self.join_next = len(self.clients)
            else:
                self.join_next = 1
                self.clients[0].start()

        self.loop.at(start_ns, begin)
        self.loop.at(deadline_ns, lambda: None)  # wake up then, even with no traffic
        self.task = self._join_done

    def _join_done(self) -> None:
        if self.joined_count < len(self.clients) and now_ns() < self.join_deadline:
            return
        done = sorted((c.joined_ns - self.join_start) / 1e9 for c in self.clients if c.joined_ns)
        self.join_mode = None  # "seq" starts no further client
        for c in self.clients:
            if not c.joined_ns:
                c.give_up()
        self.answer({"clients": len(self.clients), "joined": len(done), "done_s": done,
                     "start_ns": self.join_start, "failures": dict(self.failures),
                     "errors": dict(self.errors)})

    def cmd_stats(self) -> None:
        """What the clients saw so far, and how many hold a session now."""
        self.answer({"errors": dict(self.errors), "failures": dict(self.failures),
                     "in_session": sum(1 for c in self.clients
                                       if getattr(c, "session", None)),
                     "ping_late_max_s": self.ping_late_ns / 1e9})

    # -- listening ---------------------------------------------------------------

    def cmd_listen(self, trial: int, expect: int, deadline_ns: int) -> None:
        """Count trial ``trial``'s markers until each client has ``expect`` or the deadline."""
        for c in self.clients:
            c.scan.count = 0
            c.scan.tail = b""
        Scan.start_trial(trial)
        self.listen_expect, self.listen_deadline = expect, deadline_ns
        self.loop.at(deadline_ns, lambda: None)  # wake up then, even with no traffic
        self.task = self._listen_done

    def _listen_done(self) -> None:
        if (now_ns() < self.listen_deadline
                and min(c.scan.count for c in self.clients) < self.listen_expect):
            return
        lats = Scan.latencies
        Scan.stop_trial()
        step = max(1, len(lats) // LATENCY_SAMPLES)
        self.answer({"counts": [c.scan.count for c in self.clients],
                     "latency_ns": lats[::step], "latency_max_ns": max(lats, default=None),
                     "failures": dict(self.failures), "errors": dict(self.errors)})

    # -- sending -----------------------------------------------------------------

    def cmd_send(self, trial: int, rate: float, count: int, start_ns: int, drain_s: float) -> None:
        """Send ``count`` messages at ``rate``, each when due, round-robin over the
        clients; answer once all are acknowledged or ``drain_s`` after the last."""
        self.send_trial, self.send_count, self.send_next = trial, count, 0
        self.send_start, self.send_gap = start_ns, 1e9 / rate
        self.send_lags: list[int] = []
        self.acks_before = self.acks + self.replies.ok
        self.errors_before = sum(self.errors.values()) + self.replies.errors
        self.send_drain_ns = int(drain_s * 1e9)
        self.first_write = self.last_write = 0
        self.drain_timer = False
        self.loop.at(start_ns, self._send_due)
        self.task = self._send_done

    def _send_due(self) -> None:
        t = now_ns()
        clients = self.clients
        while self.send_next < self.send_count:
            due = self.send_start + int(self.send_next * self.send_gap)
            if due > t:
                self.loop.at(due, self._send_due)
                return
            clients[self.send_next % len(clients)].publish(self.send_trial, self.send_next)
            t = now_ns()
            self.send_lags.append(t - due)
            self.first_write = self.first_write or t
            self.last_write = t
            self.send_next += 1

    def _send_done(self) -> None:
        if self.send_next < self.send_count:
            return
        acks = self.acks + self.replies.ok - self.acks_before
        if self.kind != "forwarder" and acks < self.send_count:
            drained = self.last_write + self.send_drain_ns
            if now_ns() < drained:
                if not self.drain_timer:  # wake up then, even if no ack comes
                    self.drain_timer = True
                    self.loop.at(drained, lambda: None)
                return
        lags = sorted(self.send_lags)
        self.answer({"sent": self.send_next, "acks": acks if self.kind != "forwarder" else None,
                     "errors": sum(self.errors.values()) + self.replies.errors - self.errors_before,
                     "error_codes": dict(self.errors),
                     "first_redis_error": self.replies.first_error,
                     "send_seconds": (self.last_write - self.first_write) / 1e9,
                     "first_write_ns": self.first_write,
                     "lag_p99_ms": lags[int(0.99 * (len(lags) - 1))] / 1e6 if lags else None,
                     "lag_max_ms": lags[-1] / 1e6 if lags else None,
                     "failures": dict(self.failures)})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kind", choices=("zchat", "redis", "forwarder"), required=True)
    p.add_argument("--role", choices=("listen", "send"), required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--pub-port", type=int, default=0)
    p.add_argument("--clients", type=int, required=True)
    p.add_argument("--tag", required=True, help="name prefix, unique per process")
    proc = Proc(p.parse_args(argv))
    print(json.dumps({"ready": True}), flush=True)
    proc.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
