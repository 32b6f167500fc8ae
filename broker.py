"""The zchat broker: a thin ZeroMQ shell around BrokerCore.

    python broker.py [--host 127.0.0.1] [--port 5555] [--pub-port PORT+1]

ROUTER (``--port``) takes every request from clients; XPUB (``--pub-port``)
broadcasts the chat stream. XPUB is a PUB that also shows the broker each
new subscription, which lets it answer a client's join probe at once (see
messages.py). All decisions are made by broker_core.BrokerCore; this file
only moves frames between the sockets and the core, and handles signals.
"""

from __future__ import annotations

import argparse
import ctypes
import faulthandler
import logging
import math
import os
import secrets
import signal
import socket
import sys
import time
from functools import partial

import zmq
from zmq.auth.thread import ThreadAuthenticator

import admission
import keys
import messages as m
import outbound
from broker_core import BrokerConfig, BrokerCore, Persist, Publish, Reply
from broker_stream import ACCEPTED_IDS_REMEMBERED
from log_limit import Cause, LogLimiter, Outage
from store import EventStore, StoreError

log = logging.getLogger("zchat.broker")

# Most requests read in one pass before replies and broadcasts go out: large
# enough that a backlog leaves as few big PUB frames, small enough that the
# loop still heartbeats on time under a flood.
RECV_BATCH = 1000
# A PUB frame gathers events up to this size (a larger event goes alone):
# big enough to spend few system calls per delivery under a backlog, small
# enough that a subscriber's queue has a known bound (see SUB_QUEUE_FRAMES).
FRAME_BYTES = 64 * 1024
# Frames queued for one subscriber before the XPUB drops its broadcasts
# (libzmq's default is 1000). The subscriber repairs the loss from history;
# this bounds the broker's memory per slow subscriber near 64 x 64 KiB.
SUB_QUEUE_FRAMES = 64
# Replies queued for one client that does not read them (libzmq's default):
# far above a client's send window of 200, so acknowledgements are not
# dropped under a burst; past it replies to that client are dropped and
# logged, and the client resends what stays unacknowledged.
REPLY_QUEUE = 1000
# How long outputs may wait to share a PUB frame with others under a
# backlog, counted from the last frame. A pass that finds the loop idle
# publishes at once (no added latency at chat rates); a backlog waits at
# most this long, and pays a system call per subscriber less often.
COALESCE_S = 0.002
# Requests read in one pass that mark a backlog: at chat rates a pass finds
# one, or two when arrivals jitter; a stream the loop cannot take one by one
# finds many. 0 makes every pass wait when a frame went out just before
# (fewer frames and less CPU at chat rates, ~1 ms more latency).
BACKLOG_REQUESTS = 4
# The scheduling policy of libzmq's I/O thread. Every send wakes it; under
# the default policy the woken thread preempts the loop's thread when both
# share a core, in the middle of a PUB fan-out (~7 switches per chat message
# at 100 msg/s x 50 subscribers, each leaving the loop's caches cold).
# SCHED_BATCH forgoes only that wake-up preemption: the I/O thread still
# runs at once on an idle core, or as soon as the loop's thread waits.
IO_THREAD_POLICY = getattr(os, "SCHED_BATCH", None)  # Linux only
# Connections waiting for accept() on each port. libzmq's default of 100
# overflows when thousands connect at once (a school logging in at 8:59):
# the kernel drops their SYNs and each client retries after 1, 3, 7, 15 s,
# which stretched a storm of 5,000 joins to half a minute. The kernel caps it
# at net.core.somaxconn (4096 on current Linux).
LISTEN_BACKLOG = 4096
# Largest message accepted on the XPUB: subscriptions are ~30 bytes, but the
# CurveZMQ handshake's commands count too (INITIATE is several hundred).
SUBSCRIPTION_BYTES = 4096
# A client that never reads would get a log line for every reply dropped.
REPLY_DROPPED = Cause("reply to {peer} dropped: {detail}",
                      "dropped {count} more replies to {peer} in the last {seconds} s")
# Requests of a connection over its limit of unread replies (outbound.py).
NOT_HEARD = Cause("requests from {peer} ignored: {detail}",
                  "ignored {count} more requests from {peer} in the last {seconds} s")
# A connection cut for what it holds, or for not joining: one line per peer
# and interval, whatever the number of connections cut.
DISCONNECTED = Cause("disconnected {peer}: {detail}",
                     "disconnected {count} more connections of {peer} in the last {seconds} s")
# Everything queued for clients together, by default: a small machine's share.
MAX_MEMORY = 512 * 1024 * 1024


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Run the zchat broker.")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=5555, help="ROUTER port for requests (default 5555)")
    p.add_argument("--pub-port", type=int, help="PUB port for broadcasts (default port+1)")
    p.add_argument("--heartbeat-interval", type=float, default=1.0, metavar="SECONDS",
                   help="seconds between heartbeats (default 1.0)")
    p.add_argument("--heartbeat-liveness", type=int, default=3, metavar="N",
                   help="missed heartbeats before a client counts as gone (default 3)")
    p.add_argument("--max-text", type=int, default=m.DEFAULT_MAX_TEXT_BYTES, metavar="BYTES",
                   help=f"largest message text in UTF-8 bytes (default {m.DEFAULT_MAX_TEXT_BYTES})")
    p.add_argument("--history", type=int, default=1000, metavar="N",
                   help="events kept for gap repair and late joiners (default 1000)")
    p.add_argument("--db", metavar="PATH",
                   help="keep every message in this SQLite file, across restarts")
    p.add_argument("--max-users", type=int, default=5000, metavar="N",
                   help="most connections at once (default 5000)")
    p.add_argument("--max-rooms", type=int, default=1000, metavar="N",
                   help="most rooms at once (default 1000)")
    p.add_argument("--history-bytes", type=int, default=64 * 1024 * 1024, metavar="BYTES",
                   help="all histories together at most (default 64 MiB)")
    p.add_argument("--rate", type=float, default=200.0, metavar="PER_SECOND",
                   help="messages a user may send per second, sustained (default 200)")
    p.add_argument("--burst", type=int, default=1000, metavar="N",
                   help="messages a user may send at once before --rate applies (default 1000)")
    p.add_argument("--curve-secret", metavar="FILE",
                   help="encrypt both sockets with this CurveZMQ key pair (keys.py generate)")
    p.add_argument("--allow", metavar="DIR",
                   help="with --curve-secret: admit only the public keys in DIR; "
                        "the key in NAME.key may join only as NAME")
    p.add_argument("--presence-threshold", type=int, default=500, metavar="N",
                   help="a room with more members announces no joins and leaves, only its "
                        "count once per heartbeat (default 500)")
    p.add_argument("--coalesce-ms", type=float, default=COALESCE_S * 1000, metavar="MS",
                   help="longest wait to share a broadcast frame under a backlog "
                        f"(default {COALESCE_S * 1000:g}; 0 sends every pass at once)")
    p.add_argument("--backlog-requests", type=int, default=BACKLOG_REQUESTS, metavar="N",
                   help="requests one pass must find before its outputs wait to share a frame "
                        f"(default {BACKLOG_REQUESTS}; 0: every pass waits when a frame went out "
                        "less than --coalesce-ms before)")
    p.add_argument("--max-per-address", type=int, default=admission.MAX_PER_ADDRESS, metavar="N",
                   help="live connections from one address on each port; more are closed "
                        f"at once (default {admission.MAX_PER_ADDRESS})")
    p.add_argument("--max-memory", type=outbound.parse_size, default=MAX_MEMORY, metavar="SIZE",
                   help="everything queued for clients together, as sent on the wire "
                        "(e.g. 256M, 1G; default 512M); the largest holders are "
                        "disconnected first")
    p.add_argument("--join-deadline", type=float, default=outbound.JOIN_DEADLINE_S,
                   metavar="SECONDS", help="a request connection without a session this "
                   f"long is disconnected (default {outbound.JOIN_DEADLINE_S:g})")
    p.add_argument("--backplane", metavar="URL",
                   help="share the chat with the other brokers on this Redis "
                        "(redis://[:PASSWORD@]HOST:PORT/DB or rediss://...); see README")
    p.add_argument("--log-level", default="INFO",
                   choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="default INFO")
    args = p.parse_args(argv)
    if args.pub_port is None:
        args.pub_port = args.port + 1
    if args.heartbeat_interval <= 0 or args.heartbeat_liveness < 1:
        p.error("--heartbeat-interval must be > 0 and --heartbeat-liveness >= 1")
    if min(args.max_text, args.history, args.max_users, args.burst, args.max_rooms,
           args.history_bytes, args.max_per_address) < 1:
        p.error("--max-text, --history, --max-users, --burst, --max-rooms, --history-bytes "
                "and --max-per-address must be at least 1")
    if args.presence_threshold < 0:
        p.error("--presence-threshold must not be negative")
    if (args.rate <= 0 or args.coalesce_ms < 0 or args.join_deadline <= 0
            or args.backlog_requests < 0):
        p.error("--rate and --join-deadline must be positive, --coalesce-ms and "
                "--backlog-requests not negative")
    if args.allow and not args.curve_secret:
        p.error("--allow needs --curve-secret")
    if args.backplane and args.db:
        p.error("--backplane keeps the history in Redis: it takes no --db")
    if args.backplane and not args.backplane.startswith(("redis://", "rediss://", "unix://")):
        p.error("--backplane takes a URL: redis://HOST:PORT/DB or rediss://...")
    return args


def seed_routing_ids() -> None:
    """Make the ROUTER's routing ids unpredictable.

    libzmq numbers connections from libc's rand(), which nothing seeds, so
    every broker would hand out the same ids; a peer that claims the next
    id for itself makes libzmq abort when that connection arrives.
    """
    try:
        ctypes.CDLL(None).srand(secrets.randbits(32))
    except (OSError, AttributeError):
        log.warning("could not seed libc's rand(): routing ids are predictable")


class BrokerShell:
    """Owns the sockets and feeds BrokerCore; one thread, one poll loop."""

    def __init__(self, core: BrokerCore, host: str, port: int, pub_port: int,
                 store: EventStore | None = None, curve: keys.KeyPair | None = None,
                 allow_dir: str | None = None, coalesce: float = COALESCE_S,
                 max_per_address: int = admission.MAX_PER_ADDRESS,
                 max_memory: int = MAX_MEMORY, join_deadline: float = outbound.JOIN_DEADLINE_S,
                 backlog_requests: int = BACKLOG_REQUESTS, backplane=None):
        self.core = core
        self.store = store
        self.backplane = backplane  # backplane.Backplane: the streams are shared in Redis
        self.store_outage = Outage(log, "cannot store events, refusing messages, joins and "
                                   "topics until it can (retried with every message and "
                                   "heartbeat): %s", "storing events again")
        # outputs held to share PUB frames, and when they must go
        self.coalesce = coalesce
        self.backlog_requests = backlog_requests
        self.held: list = []
        self.release_at: float | None = None  # monotonic, like every timer here
        self.last_publish = float("-inf")
        seed_routing_ids()
        self.ctx = zmq.Context()
        if IO_THREAD_POLICY is not None:  # before the first socket starts the I/O thread
            self.ctx.set(zmq.THREAD_SCHED_POLICY, IO_THREAD_POLICY)
        self.auth = None
        if allow_dir:
            # ZAP: libzmq asks this thread about each client key at handshake.
            self.auth = ThreadAuthenticator(self.ctx)
            self.auth.start()
            self.auth.configure_curve(domain="*", location=allow_dir)
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.router.setsockopt(zmq.MAXMSGSIZE, m.max_frame_bytes(core.config.max_text))
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.setsockopt(zmq.SNDHWM, REPLY_QUEUE)
        self.pub = self.ctx.socket(zmq.XPUB)
        self.pub.setsockopt(zmq.SNDHWM, SUB_QUEUE_FRAMES)
        # Subscribers only send subscriptions: a few hundred bytes at most.
        self.pub.setsockopt(zmq.MAXMSGSIZE, SUBSCRIPTION_BYTES)
        self.pub.setsockopt(zmq.LINGER, 500)  # let the shutdown notice leave
        if curve is not None:
            keys.make_server(self.router, curve)
            keys.make_server(self.pub, curve)
        for sock in (self.router, self.pub):
            sock.setsockopt(zmq.HANDSHAKE_IVL, admission.HANDSHAKE_S * 1000)
            sock.setsockopt(zmq.BACKLOG, LISTEN_BACKLOG)
        # The books of what is queued for each client (outbound.py), swept
        # once per heartbeat interval.
        self.outbound = outbound.Outbound(max_memory, SUB_QUEUE_FRAMES * FRAME_BYTES,
                                          curve is not None, join_deadline)
        # Counts connections per address and refuses the excess (admission.py),
        # and tells the books of each; it watches from before the first
        # connection can arrive.
        self.admission = admission.Admission({"request": self.router, "broadcast": self.pub},
                                             max_per_address, listener=self.outbound)
        self.next_books = 0.0
        self.cut_log = LogLimiter(log)
        # Only a broker that binds names to keys needs each frame's key.
        self.keys_checked = bool(core.config.names_by_key)
        self.router.bind(f"tcp://{host}:{port}")
        self.pub.bind(f"tcp://{host}:{pub_port}")
        # Signals only set a flag; the wakeup fd makes the poll return at once.
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.stopping = False
        # What each pass waits on, as zmq_poll takes it: zmq.Poller.poll
        # is a layer of Python over the same call, paid on every wake-up.
        self.poll_items = [(self.router, _POLLIN), (self.pub, _POLLIN), (self._wake_r, _POLLIN)]
        self.router_only, self.pub_only = self.poll_items[:1], self.poll_items[1:2]
        # admission's monitors: new and closed connections, read in this loop
        self.poll_items += [(monitor, _POLLIN) for monitor in self.admission.sockets()]
        self.notifications = None
        if backplane is not None:
            self.notifications = backplane.start(self.ctx, core)
            self.poll_items.append((self.notifications, _POLLIN))
        # The sends of libzmq's binding itself: pyzmq's Socket.send adds a
        # Python call per frame for DRAFT options this broker does not use.
        self._pub_send = super(zmq.Socket, self.pub).send
        self._router_send = super(zmq.Socket, self.router).send

    def install_signal_handlers(self) -> None:
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)
        # Where is a broker that does not stop? SIGUSR1 prints every thread's
        # stack on stderr, even while one is stuck in C holding the GIL.
        faulthandler.register(signal.SIGUSR1, all_threads=True)

    def _on_signal(self, signum, frame) -> None:
        self.stopping = True

    def run(self) -> None:
        while not (self.stopping or self.backplane is not None and self.backplane.lost):
            deadline = min(self.core.next_deadline(), self.next_books)
            if self.release_at is not None:
                deadline = min(deadline, self.release_at)
            # Rounded up: pyzmq truncates to whole milliseconds, and a wait of
            # 0 ms would spin until the deadline.
            wait_ms = math.ceil(max(0.0, (deadline - time.monotonic()) * 1000))
            if self.backplane is not None and self.backplane.waiting:
                wait_ms = 0  # notifications set aside while following a stream
            ready = dict(zmq.zmq_poll(self.poll_items, wait_ms))
            # Two clocks: monotonic for every timer, the wall clock only for
            # the times stamped on events for people to read.
            now, wall = time.monotonic(), time.time()
            out: list = []
            read, more = 0, False
            # New connections counted (or refused) before anything they sent.
            self.admission.read(ready)
            if self.notifications in ready or self.backplane is not None \
                    and self.backplane.waiting:
                # Before the requests: the shared events take their places
                # in the streams before this pass numbers anything new.
                out += self.backplane.read(self.core)
            if self.router in ready:
                read, more = self._read_requests(out, now, wall)
            if self.pub in ready:
                out += self._read_subscriptions(wall)
            if self.backplane is not None:  # the streams that hellos, joins and SUBs need
                out += self.backplane.handle_deferred(self.core)
            out += self.core.tick(now, wall, more)
            if now >= self.next_books:
                out += self._keep_books(now, wall)
            if self.backplane is not None:
                self.backplane.tick(self.core, now, wall)
                # Numbered in Redis now, before the next pass's notifications.
                out = self._persist(out)
            self._send_or_hold(out, now, self._backlog(read, more))
        self._release(time.monotonic())
        self._deliver(self.core.shutdown(time.time()), time.monotonic())

    def _backlog(self, read: int, more: bool) -> bool:
        """Whether a pass that read ``read`` requests, and left ``more``
        waiting, found a backlog (its outputs may wait to share a frame)."""
        return more or read >= self.backlog_requests

    def _send_or_hold(self, outputs: list, now: float, backlog: bool = False) -> None:
        """Deliver at once when the loop is idle (a pass that found few
        requests: what is held leaves too) or the last publish is a while
        ago; under a ``backlog``, gather up to a few milliseconds into
        fewer PUB frames (each frame costs a system call per subscriber)."""
        if outputs:
            self.held += outputs
        if not self.held:
            return
        if backlog:
            if self.release_at is None:
                self.release_at = self.last_publish + self.coalesce
            if now < self.release_at:
                return
        self._release(now)

    def _release(self, now: float) -> None:
        held, self.held, self.release_at = self.held, [], None
        self._deliver(held, now)

    def close(self) -> None:
        self.admission.close()
        self.router.close(linger=0)
        self.pub.close()
        if self.auth is not None:
            self.auth.stop()
        if self.backplane is not None:
            self.backplane.close()
        self.ctx.term()
        self._wake_r.close()
        self._wake_w.close()
        if self.store is not None:
            self.store.close()

    def _read_requests(self, out: list, now: float, wall: float) -> tuple[int, bool]:
        """Handle a batch of requests, their outputs added to ``out``; how
        many were read, and whether more are waiting."""
        # Each frame received with copy=False, its own "more" flag read:
        # recv_multipart costs twice as much per request (a getsockopt per
        # frame). The routing id's frame carries the connection's metadata.
        recv, handle, keys_checked = self.router.recv, self.core.handle, self.keys_checked
        if self.backplane is not None:  # a request may need a stream followed first
            handle = partial(self.backplane.handle, self.core)
        known, over = self.outbound.replies, self.outbound.over
        for read in range(RECV_BATCH):
            # At chat rates a pass finds one request: polling for another
            # costs half the zmq.Again a further recv would raise (and
            # getsockopt(EVENTS) builds an enum on every call).
            if read == 1 and not zmq.zmq_poll(self.router_only, 0):
                return 1, False
            try:
                id_frame = recv(_NOBLOCK, copy=False)
            except zmq.Again:
                return read, False
            parts, part = [], id_frame
            while part.more:  # a message's frames arrive together; a request has one
                part = recv(_NOBLOCK, copy=False)
                parts.append(part)
            peer = id_frame.bytes
            if peer not in known:  # new: the descriptor it came on, once (outbound.py)
                self.outbound.first_seen(peer, source_fd(parts[0]) if parts else None)
            if peer in over:  # not reading: not listened to either
                self.core.warnings.warn(NOT_HEARD, peer.hex(), "it has not read its replies", now)
                continue
            key = id_frame.get("User-Id") if keys_checked else None
            frames = [parts[0].bytes] if len(parts) == 1 else [p.bytes for p in parts]
            out += handle(peer, frames, now, wall, key)
        return RECV_BATCH, True

    def _read_subscriptions(self, wall: float) -> list:
        """Answer the ready probes among the (un)subscriptions waiting on the
        XPUB (found readable). One after another, each join's probe is a
        pass that finds one: after the first, the socket is asked whether
        more are waiting (a zmq_poll of it alone) rather than paying the
        zmq.Again of one receive too many (as admission.py reads its monitors)."""
        out: list = []
        recv, pub_only = self.pub.recv, self.pub_only
        try:
            for read in range(RECV_BATCH):
                if read == 1 and not zmq.zmq_poll(pub_only, 0):
                    break
                frame = recv(_NOBLOCK)
                if self.backplane is not None:  # a room's topic: followed before the probe
                    self.backplane.subscription(self.core, frame)
                if frame[:1] == b"\x01":  # a subscription (b"\x00" unsubscribes)
                    out += self.core.ready_probe(frame[1:], wall)
        except zmq.Again:  # all read
            pass
        return out

    def _deliver(self, outputs: list, now: float) -> None:
        """Carry out the core's outputs in the order that keeps its promises:
        persist new events (one transaction), then publish (each stream's
        events batched into few frames), then reply: whatever a client is
        told of is stored, and whatever is acknowledged is published. When
        the write fails, the core undoes those events and says what to
        carry out instead (refusals, and nothing of the undone events)."""
        while outputs:
            outputs = self._persist(outputs)
            by_topic: dict[bytes, list[bytes]] = {}
            replies: list[Reply] = []
            for item in outputs:
                kind = type(item)
                if kind is Publish:
                    by_topic.setdefault(item.topic, []).append(m.encode(item.event))
                elif kind is Reply:
                    replies.append(item)
            for topic, encoded in by_topic.items():
                # what subscribers may be sent (outbound.QUIET_BYTES), less the brackets and commas
                self.outbound.published += sum(map(len, encoded))
                for frame in frames_of(encoded):
                    self._pub_send(topic, _SNDMORE)
                    self._pub_send(frame)
                self.last_publish = now
            # A peer found unreachable while replying becomes a leave, which
            # is delivered on the next turn of this loop.
            outputs = self._send_replies(replies, now)

    def _persist(self, outputs: list) -> list:
        """Store the new events among ``outputs`` (or have the backplane
        number them); what to carry out then."""
        if self.backplane is not None:
            return self.backplane.hand_over(self.core, outputs)
        if self.store is None:
            return outputs
        to_persist = [item for item in outputs if isinstance(item, Persist)]
        if not to_persist or self._stored(to_persist):
            return outputs
        return self.core.persist_failed(outputs)

    def _stored(self, records: list[Persist]) -> bool:
        """Write the records in one transaction; False if the store failed
        (said once when it starts failing, and once when it works again)."""
        if self.store is None:
            return True
        try:
            self.store.append(records)
        except StoreError as e:
            self.store_outage.failed(e)
            return False
        self.store_outage.worked()
        return True

    def _send_replies(self, replies: list[Reply], now: float) -> list:
        """Send each reply to its peer (a message sent to several in a row,
        such as a direct message to each connection of its addressee, is
        encoded once); the outputs of peers found gone. Only the last body
        is kept: a pass of large histories never holds them all at once."""
        out: list = []
        last, body = None, b""
        send, sessions = self._router_send, self.core.sessions
        for reply in replies:
            peer, message = reply.peer, reply.message
            if not self.outbound.may_reply(peer, peer in sessions, now):
                self.core.warnings.warn(REPLY_DROPPED, peer.hex(),
                                        "it has not read its earlier replies", now)
                continue
            if message is not last:
                last, body = message, m.encode(message)
            try:
                # Two sends, not send_multipart: a third of its cost. A full
                # queue or a gone peer refuses the first frame (ROUTER_MANDATORY).
                send(peer, _NOBLOCK_MORE)
                send(body, _NOBLOCK)
            except zmq.Again:
                self.core.warnings.warn(REPLY_DROPPED, peer.hex(), "its queue is full", now)
                continue
            except zmq.ZMQError as e:
                if e.errno != zmq.EHOSTUNREACH:
                    raise
                self.outbound.forget(peer)
                out += self.core.peer_unreachable(peer, time.time())
                continue
            self.outbound.sent(peer, len(body))
        return out

    def _keep_books(self, now: float, wall: float) -> list:
        """Once per heartbeat interval: disconnect the connections that hold
        too much, have stopped reading or never joined (outbound.py), end
        their sessions, and give freed memory back to the system."""
        self.next_books = now + self.core.config.heartbeat_interval
        if self.outbound.trim_due():  # what was cut or left by the last sweep is freed by now
            outbound.give_memory_back()
        out: list = []
        for cut in self.outbound.sweep(now, self.core.sessions, self.admission.live()):
            if not outbound.disconnect(cut.fd, cut.ino):
                continue
            self.cut_log.warn(DISCONNECTED, cut.peer[0] if cut.peer else f"descriptor {cut.fd}",
                              cut.reason, now)
            if cut.routing_id is not None:
                out += self.core.peer_unreachable(cut.routing_id, wall)
        self.cut_log.flush(now)
        log.debug("outbound: %d connections hold %d bytes; %d subscribers",
                  len(self.outbound.replies), self.outbound.held, len(self.outbound.subscribers))
        return out


# zmq's flags as plain ints: an enum's "|" costs microseconds per reply.
_NOBLOCK = int(zmq.NOBLOCK)
_NOBLOCK_MORE = int(zmq.NOBLOCK | zmq.SNDMORE)
_SNDMORE = int(zmq.SNDMORE)
_POLLIN = int(zmq.POLLIN)


def source_fd(frame: zmq.Frame) -> int | None:
    """The descriptor a received frame came in on (ZMQ_SRCFD: deprecated in
    libzmq 4.3 but present), or None when libzmq does not say."""
    try:
        return frame.get(zmq.SRCFD)
    except zmq.ZMQError:
        return None


def frames_of(encoded_events: list[bytes]):
    """PUB bodies of at most FRAME_BYTES each (a larger event goes alone),
    events kept in order."""
    start, size = 0, 1  # a body's size so far: its "[" and each event with its "," or "]"
    for i, event in enumerate(encoded_events):
        if i > start and size + len(event) + 1 > FRAME_BYTES:
            yield m.join_events(encoded_events[start:i])
            start, size = i, 1
        size += len(event) + 1
    if start < len(encoded_events):
        yield m.join_events(encoded_events[start:])


def make_core(args: argparse.Namespace, store: EventStore | None,
              epoch: str | None = None) -> BrokerCore:
    config = BrokerConfig(
        heartbeat_interval=args.heartbeat_interval,
        heartbeat_liveness=args.heartbeat_liveness,
        max_text=args.max_text,
        history=args.history,
        max_users=args.max_users,
        max_rooms=args.max_rooms,
        history_bytes=args.history_bytes,
        rate=args.rate,
        burst=args.burst,
        presence_threshold=args.presence_threshold,
        names_by_key=keys.names_by_key(args.allow) if args.allow else {},
    )
    if store is None:
        return BrokerCore(config) if epoch is None else BrokerCore(config, epoch=epoch)
    core = BrokerCore(config, epoch=store.epoch())
    for stream_id in store.streams():
        core.restore(stream_id, store.recent_events(stream_id, config.history),
                     store.recent_ids(stream_id, ACCEPTED_IDS_REMEMBERED))
        stream = core.streams[stream_id]
        log.info("history of %s from %s: %d events, continuing after seq %d",
                 stream_id, args.db, len(stream.history), stream.seq)
    return core


def open_backplane(args: argparse.Namespace):
    """The Redis backplane; redis-py is imported only when it is used. Its
    errors at start are StoreErrors: the shared history cannot be used."""
    try:
        import backplane
    except ImportError as e:
        raise StoreError(f"--backplane needs redis-py (pip install 'redis[hiredis]'): {e}")
    return backplane.Backplane(args.backplane, args.history)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s")
    problem = keys.libzmq_problem()
    if problem:
        print(f"broker: {problem}", file=sys.stderr)
        return 1
    if not keys.is_loopback(args.host) and not args.curve_secret:
        log.warning("listening on %s without encryption: anyone on the network can read "
                    "the chat and join; use --curve-secret (see SECURITY.md)", args.host)
    try:
        curve = keys.load_key_pair(args.curve_secret) if args.curve_secret else None
        store = EventStore(args.db) if args.db else None
        backplane = open_backplane(args) if args.backplane else None
        core = make_core(args, store, backplane.epoch() if backplane else None)
        shell = BrokerShell(core, args.host, args.port, args.pub_port, store, curve, args.allow,
                            args.coalesce_ms / 1000, args.max_per_address, args.max_memory,
                            args.join_deadline, args.backlog_requests, backplane)
    except keys.KeyFileError as e:
        print(f"broker: {e}", file=sys.stderr)
        return 1
    except StoreError as e:
        print(f"broker: {e}", file=sys.stderr)
        return 1
    except zmq.ZMQError as e:
        print(f"broker: cannot bind {args.host}:{args.port}/{args.pub_port}: {e}", file=sys.stderr)
        return 1
    shell.install_signal_handlers()
    print(f"zchat broker listening on tcp://{args.host}:{args.port} (requests) "
          f"and tcp://{args.host}:{args.pub_port} (broadcasts)"
          + (", encrypted" if curve else ""), file=sys.stderr, flush=True)
    try:
        shell.run()
    finally:
        shell.close()
    log.info("broker stopped")
    return 1 if backplane is not None and backplane.lost else 0


if __name__ == "__main__":
    sys.exit(main())
