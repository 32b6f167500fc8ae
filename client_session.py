"""The client's socket shell, shared by cli_client.py and gui_client.py.

A ClientSession owns a DEALER (requests) and a SUB (broadcasts) in one
worker thread; the caller never touches a socket. The caller gives commands
through thread-safe methods (send, who, join, close), which never block, and
reads what happens from ``session.events``, a queue.Queue of the events of
client_core (StateChanged, Joined, JoinRefused, Acked, Refused), of
client_stream (Earlier, Missed) and of messages.Message / Presence / Members / Users.

Every decision is made by client_core.ClientCore, which is free of sockets,
threads and clocks; the worker thread only polls, feeds it frames, commands
and the monotonic time, and carries out the actions it returns.
"""

from __future__ import annotations

import argparse
import getpass
import itertools
import logging
import math
import os
import queue
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from typing import Callable

import zmq

import keys
import messages as m
from client_core import (Acked, Action, BrokerRefused, ClientCore, Connect, Disconnect, Joined,
                         JoinRefused, Phase, Refused, Request, RoomJoined, RoomParted, State,
                         StateChanged, Subscribe, Unsubscribe)
from client_stream import Earlier, Missed

__all__ = ["Acked", "BrokerRefused", "ClientSession", "Earlier", "Encryption", "Joined",
           "JoinRefused", "Missed", "Refused", "RoomJoined", "RoomParted", "State",
           "StateChanged", "add_connection_arguments", "encryption_from_args", "ask_broker", "list_users",
           "login_name"]

log = logging.getLogger("zchat.client")

# Most frames read from one socket per loop pass, so commands stay prompt.
RECV_BATCH = 500
# A bye must get out when closing, but a dead broker must not hold us up.
CLOSE_LINGER_MS = 500


@dataclass(frozen=True)
class Encryption:
    """CurveZMQ to a broker with this public key; ``pair`` is ours (None: a
    throwaway pair, enough where the broker admits any key)."""

    server_key: bytes
    pair: keys.KeyPair | None = None

    def apply(self, sock: zmq.Socket) -> None:
        keys.make_client(sock, self.server_key, self.pair)


class ClientSession:
    """One user's connection to a broker, run by a worker thread."""

    def __init__(self, host: str, port: int, name: str, pub_port: int | None = None,
                 recent: int = 0, encryption: Encryption | None = None,
                 on_event: Callable[[], None] | None = None,
                 rooms: tuple[str, ...] = (m.GENERAL_ROOM,), quiet: bool = False,
                 secret: str | None = None):
        """``recent``: how many earlier messages of each room to show on
        joining (Earlier). ``on_event``: called from the worker thread, at
        most once per loop pass, after it put events on ``events`` (to wake a
        GUI loop). ``rooms``, ``quiet``, ``secret``: see ClientCore."""
        self.address = f"{host}:{port}"
        self.encryption = encryption
        self.request_endpoint = f"tcp://{host}:{port}"
        self.broadcast_endpoint = f"tcp://{host}:{pub_port or port + 1}"
        self.name = name
        self.events: queue.Queue = queue.Queue()
        self.on_event = on_event
        self._core = ClientCore(name, recent, self.address, rooms, quiet, secret)
        self._commands: queue.Queue = queue.Queue()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._ids = (f"{secrets.token_hex(6)}-{n}" for n in itertools.count(1))
        self._id_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="zchat-session", daemon=True)

    # --- commands: safe from any thread, never block --------------------------------

    def start(self) -> "ClientSession":
        self._thread.start()
        return self

    def send(self, text: str, room: str | None = None, to: str | None = None) -> str:
        """Queue chat text for a room (None: #general) or a person (``to``);
        returns its message id (see Acked / Refused)."""
        with self._id_lock:
            msg_id = next(self._ids)
        self._command(ClientCore.send, msg_id, text, room=room, to=to)
        return msg_id

    def who(self, room: str | None = None, after: str | None = None) -> None:
        """Ask a page of who is online (in a room); the answer is a
        messages.Users event, whose ``next`` asks the following page."""
        self._command(ClientCore.who, room=room, after=after)

    def list_rooms(self) -> None:
        """Ask which rooms exist; the answer is a messages.RoomList event."""
        self._command(ClientCore.list_rooms)

    def join_room(self, room: str) -> None:
        """Enter a room (RoomJoined, or BrokerRefused)."""
        self._command(ClientCore.join_room, room)

    def part_room(self, room: str) -> None:
        self._command(ClientCore.part_room, room)

    def set_topic(self, room: str, text: str) -> None:
        self._command(ClientCore.set_topic, room, text)

    def join(self, name: str) -> None:
        """Try another name after JoinRefused."""
        self._command(ClientCore.join, name)

    def close(self, timeout: float = 2.0) -> None:
        """Leave (others see ``quit``) and stop the worker thread."""
        if self._thread.is_alive():
            self._command(ClientCore.close)
            self._thread.join(timeout)

    def _command(self, method, *args, **kwargs) -> None:
        """Hand ``core.method(*args, now, **kwargs)`` to the worker thread."""
        self._commands.put((method, args, kwargs))
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # already woken, or closed

    # --- worker thread --------------------------------------------------------------

    def _run(self) -> None:
        try:
            _Worker(self).run()
        except Exception:  # a bug of ours: say so rather than die silently
            log.exception("client session failed")
            self._emit([StateChanged(State.CLOSED, "internal error, see log")])
        finally:
            self._wake_r.close()
            self._wake_w.close()

    def _emit(self, events: list) -> None:
        for event in events:
            self.events.put(event)
        if events and self.on_event is not None:
            self.on_event()


class _Worker:
    """The worker thread's shell around ClientCore; it alone touches the
    sockets (created, used and closed in this thread)."""

    def __init__(self, session: ClientSession):
        self.s = session
        self.core = session._core
        self.ctx = zmq.Context.instance()
        self.dealer: zmq.Socket | None = None
        self.sub: zmq.Socket | None = None
        self.poller = zmq.Poller()
        self.poller.register(session._wake_r, zmq.POLLIN)
        self.pending_events: list = []
        self._do = {Connect: self._open_sockets, Disconnect: self._close_sockets,
                    Subscribe: self._subscribe, Unsubscribe: self._unsubscribe}

    def run(self) -> None:
        self._carry_out(self.core.start(time.monotonic()))
        while self.core.phase is not Phase.CLOSED:
            now = time.monotonic()
            # Rounded up: pyzmq truncates to whole milliseconds (0 would spin).
            timeout_ms = math.ceil(max(0.0, self.core.next_deadline() - now) * 1000)
            ready = dict(self.poller.poll(timeout_ms))
            now = time.monotonic()
            if self.s._wake_r.fileno() in ready:
                self._drain_wakeups()
            self._run_commands(now)
            for sock, receive in ((self.dealer, self.core.receive_reply),
                                  (self.sub, self.core.receive_broadcast)):
                if sock is not None and sock in ready:
                    self._read(sock, receive, now)
            self._carry_out(self.core.tick(now))
            self.s._emit(self.pending_events)
            self.pending_events = []
        self.s._emit(self.pending_events)

    def _drain_wakeups(self) -> None:
        try:
            while self.s._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def _run_commands(self, now: float) -> None:
        while True:
            try:
                method, args, kwargs = self.s._commands.get_nowait()
            except queue.Empty:
                return
            self._carry_out(method(self.core, *args, now, **kwargs))

    def _read(self, sock: zmq.Socket, receive, now: float) -> None:
        """Feed the core a batch of frames from one socket."""
        for _ in range(RECV_BATCH):
            if sock.closed:  # an action of the core closed it
                return
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._carry_out(receive(frames, now))

    # --- actions ----------------------------------------------------------------------

    def _carry_out(self, outputs: list) -> None:
        """Do the core's actions in order; events go to the caller. Requests
        that cannot be sent now go back to the core, in order."""
        while outputs:
            unsent: list[Request] = []
            for out in outputs:
                if isinstance(out, Request):
                    if unsent or not self._send(out.message):
                        unsent.append(out)  # keep order: nothing overtakes
                elif isinstance(out, Action):
                    self._do[type(out)](out)
                else:
                    self.pending_events.append(out)
            outputs = self.core.not_sent(unsent, time.monotonic()) if unsent else []

    def _send(self, message) -> bool:
        if self.dealer is None:
            return False
        try:
            self.dealer.send(m.encode(message), zmq.NOBLOCK)
        except zmq.Again:
            return False
        return True

    def _open_sockets(self, action: Connect) -> None:
        self.dealer = self.ctx.socket(zmq.DEALER)
        self.sub = self.ctx.socket(zmq.SUB)
        if self.s.encryption is not None:
            self.s.encryption.apply(self.dealer)
            self.s.encryption.apply(self.sub)
        self.dealer.setsockopt(zmq.LINGER, 0)
        # Queue nothing for a broker that is not connected: the outbox holds it.
        self.dealer.setsockopt(zmq.IMMEDIATE, 1)
        self.dealer.setsockopt(zmq.RECONNECT_IVL, 100)
        self.dealer.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        self.dealer.connect(self.s.request_endpoint)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.RECONNECT_IVL, 100)
        self.sub.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        for topic in action.topics:
            self.sub.setsockopt(zmq.SUBSCRIBE, topic)
        self.sub.connect(self.s.broadcast_endpoint)
        self.poller.register(self.dealer, zmq.POLLIN)
        self.poller.register(self.sub, zmq.POLLIN)

    def _close_sockets(self, action: Disconnect) -> None:
        if self.dealer is not None and action.linger:
            self.dealer.setsockopt(zmq.LINGER, CLOSE_LINGER_MS)
        for sock in (self.dealer, self.sub):
            if sock is not None:
                self.poller.unregister(sock)
                sock.close()
        self.dealer = self.sub = None

    def _subscribe(self, action: Subscribe) -> None:
        if self.sub is not None:
            self.sub.setsockopt(zmq.SUBSCRIBE, action.topic)

    def _unsubscribe(self, action: Unsubscribe) -> None:
        if self.sub is not None:
            self.sub.setsockopt(zmq.UNSUBSCRIBE, action.topic)


def ask_broker(host: str, port: int, request, answer_type: type, timeout: float,
               encryption: Encryption | None = None):
    """Ask something that needs no join (``who``, ``rooms``): the answer of
    type ``answer_type``, or None if none came in time."""
    ctx = zmq.Context.instance()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    if encryption is not None:
        encryption.apply(dealer)
    try:
        dealer.connect(f"tcp://{host}:{port}")
        dealer.send(m.encode(request))
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            if not dealer.poll(remaining * 1000):
                break
            try:
                reply = m.decode_reply(dealer.recv_multipart())
            except m.ProtocolError:
                continue
            if isinstance(reply, answer_type):
                return reply
        return None
    finally:
        dealer.close()


def list_users(host: str, port: int, timeout: float, encryption: Encryption | None = None,
               room: str | None = None) -> list[str] | None:
    """Who is online (in ``room``), asked without joining, page after page;
    None if a page did not come in time."""
    names: list[str] = []
    after = None
    while True:
        reply = ask_broker(host, port, m.Who(room, after), m.Users, timeout, encryption)
        if reply is None:
            return None
        names += reply.users
        if reply.next is None:
            return names
        after = reply.next


# --- command-line options shared by both clients ------------------------------------


def port_number(text: str) -> int:
    """An argparse type: a TCP port, 1 to 65535 (anything else is bad usage)."""
    try:
        port = int(text)
    except ValueError:
        port = 0
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (1 to 65535)")
    return port


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    """--host, --port, --pub-port, --name, --server-key and --key, with their defaults.

    Defaults from the environment are strings, so argparse checks them with
    the option's type just as it checks what is typed.
    """
    parser.add_argument("--host", default=os.environ.get("CHAT_HOST", "127.0.0.1"),
                        help="broker address (default 127.0.0.1, env CHAT_HOST)")
    parser.add_argument("--port", type=port_number, default=os.environ.get("CHAT_PORT", "5555"),
                        help="broker request port (default 5555, env CHAT_PORT)")
    parser.add_argument("--pub-port", type=port_number, default=os.environ.get("CHAT_PUB_PORT"),
                        help="broker broadcast port, for a broker run with its own --pub-port "
                             "(default: --port + 1, env CHAT_PUB_PORT)")
    parser.add_argument("--name", default=os.environ.get("CHAT_NAME"),
                        help="your username (default env CHAT_NAME, else your login name)")
    parser.add_argument("--server-key", metavar="KEY|FILE",
                        help="encrypt to a broker run with --curve-secret: its public key")
    parser.add_argument("--key", metavar="FILE",
                        help="your own key pair (.key_secret), for a broker run with --allow")


def login_name() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no login name in some containers
        return "user"


def encryption_from_args(args: argparse.Namespace) -> Encryption | None:
    """The Encryption the options ask for; raises keys.KeyFileError."""
    if args.server_key is None:
        if args.key is not None:
            raise keys.KeyFileError("--key needs --server-key")
        return None
    pair = keys.load_key_pair(args.key) if args.key else None
    return Encryption(keys.load_public_key(args.server_key), pair)
