"""Admission of TCP connections: a limit per address, and headroom below the file limit.

A connection that never joins still holds a file descriptor in the broker.
Without a bound, a few thousand of them from one machine use up the
process's file limit (``ulimit -n``); libzmq's accept() then fails with
EMFILE, its I/O thread spins on the listening socket, and every newcomer is
refused while nothing is logged.

The Admission thread watches the ROUTER's and the XPUB's connections through
libzmq socket monitors. EVENT_ACCEPTED carries the new connection's file
descriptor: the thread reads the peer's address from it (getpeername) and
counts live connections per address and port; EVENT_DISCONNECTED carries the
descriptor again when libzmq closes it. A connection is refused
at once when

- its address already holds ``max_per_address`` connections on that port, or
- its descriptor number lies within ``headroom`` of the soft RLIMIT_NOFILE.
  Linux hands out the lowest free descriptor, so descriptor N means N files
  are open below it: the process is near its limit.

libzmq has no call to close one peer of a ROUTER or an XPUB, and ZAP only
asks about a connection after its handshake, which an idle peer need never
finish. Refusing uses the socket layer instead: ``shutdown(SHUT_RDWR)`` on
the descriptor ends the TCP connection itself, and libzmq reads end-of-file,
closes its descriptor and forgets the peer: the file is really freed, before
any handshake. The thread borrows libzmq's descriptor for these two calls
and never closes it (a duplicate would need a free file, which is what runs
out).

The event is read a moment after libzmq sent it: the connection that holds
the descriptor by then is the one judged, by its own address; a descriptor
already closed is not counted. Refusals are logged
at most a few lines per interval (log_limit.LogLimiter).

A connection that opens TCP and never completes the ZeroMQ handshake is
closed by libzmq after ``HANDSHAKE_S`` (ZMQ_HANDSHAKE_IVL, set by the broker).
"""

from __future__ import annotations

import logging
import resource
import struct
import threading
import time

import zmq

from log_limit import Cause, LogLimiter
from outbound import identity, peer_address, refuse

log = logging.getLogger("zchat.broker")

# Live connections from one address, on each of the broker's two ports: a
# client holds one on each, so this many clients may share an address (a
# NAT, a shared host). ngIRCd's default is 5; an office behind one address
# needs more.
MAX_PER_ADDRESS = 64
# Files kept free below the soft file limit: for the store, for libzmq's own
# descriptors, and so that accept() never fails with EMFILE (which makes
# libzmq spin).
FILE_HEADROOM = 64
# A connection must complete the ZeroMQ handshake within this many seconds.
HANDSHAKE_S = 10
# A monitor event's first frame: the event (u16) and its value (u32, here the
# descriptor), in the machine's byte order, unpadded (zmq_socket_monitor(3)).
MONITOR_HEAD = struct.Struct("=Hi")
# How often the thread wakes to see whether it should stop and to flush the log.
POLL_MS = 200

TOO_MANY_FROM_ADDRESS = Cause(
    "connection from {peer} refused: {detail}",
    "refused {count} more connections from {peer} in the last {seconds} s")
NEAR_FILE_LIMIT = Cause(
    "connection from {peer} refused: {detail}",
    "refused {count} more connections near the file limit from {peer} in the last {seconds} s")


class Admission(threading.Thread):
    """Counts and refuses connections on ``sockets`` (port label -> socket).

    Construct it in the thread that owns the sockets, before they bind;
    ``start()`` it, and ``stop()`` it before closing them.
    """

    def __init__(self, sockets: dict[str, zmq.Socket], max_per_address: int = MAX_PER_ADDRESS,
                 headroom: int = FILE_HEADROOM):
        super().__init__(name="zchat-admission", daemon=True)
        self.max_per_address = max_per_address
        self.headroom = headroom
        self.watched = list(sockets.values())
        # The monitor sockets are made here and used only by the thread from
        # start() on (a socket may move between threads before use).
        self.monitors = {
            label: sock.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
            for label, sock in sockets.items()}
        # descriptor -> (port label, peer address as (host, port), monotonic
        # time accepted, its socket's inode to tell it from a later connection
        # on the same descriptor); the broker's thread reads copies of it
        # (outbound.py)
        self.connections: dict[int, tuple[str, tuple, float, int]] = {}
        # (port label, host) -> live connections
        self.per_address: dict[tuple[str, str], int] = {}
        self.refused = 0
        self.limiter = LogLimiter(log)
        self.stopping = threading.Event()

    def run(self) -> None:
        poller = zmq.Poller()
        labels = {}
        for label, monitor in self.monitors.items():
            poller.register(monitor, zmq.POLLIN)
            labels[monitor] = label
        try:
            while not self.stopping.is_set():
                for monitor, _ in poller.poll(POLL_MS):
                    self._drain(labels[monitor], monitor)
                self.limiter.flush(time.monotonic())
        finally:
            for monitor in self.monitors.values():
                monitor.close(linger=0)

    def stop(self) -> None:
        """Detach the monitors, then stop the thread; the sockets stay open.

        In this order: libzmq sends each monitor event from its I/O thread
        with a blocking send, holding the socket's monitor lock. With the
        thread gone, an event (a peer leaving as the broker stops) would
        wait for a reader forever, and disable_monitor() for that lock,
        holding the GIL: the broker could not exit.
        """
        for sock in self.watched:
            sock.disable_monitor()
        self.stopping.set()
        self.join()

    def live(self) -> dict[int, tuple[str, tuple, float, int]]:
        """A copy of ``connections``, safe to read from another thread
        (copying a dict is one step under the GIL)."""
        return self.connections.copy()

    def _drain(self, label: str, monitor: zmq.Socket) -> None:
        while True:
            try:
                frames = monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            # The event's first frame, read here: pyzmq's parse_monitor_message
            # makes a zmq.Event flag of the descriptor number, which costs more
            # (~12 us) than all the rest of an accept's handling together.
            if len(frames) != 2 or len(frames[0]) != MONITOR_HEAD.size:
                continue  # not an event of libzmq 4.x: nothing to count
            event, value = MONITOR_HEAD.unpack(frames[0])
            if event == zmq.EVENT_ACCEPTED:
                self._accepted(label, value)
            elif event == zmq.EVENT_DISCONNECTED:
                self._forget(value)

    def _accepted(self, label: str, fd: int) -> None:
        self._forget(fd)  # a record left by a connection whose close we missed
        # libzmq's own descriptor, read with libc's calls: a Python socket
        # object on it costs ~20 us to make and detach, and a duplicate would
        # need a free file, which is what runs out.
        peer = peer_address(fd)
        if peer is None:
            return  # closed already (or not a TCP socket any more): nothing to count
        ino = identity(fd)
        if ino is None:
            return  # closed already
        refusal = self._refusal(label, peer[0], fd)
        if refusal is not None:
            refuse(fd)
            self.refused += 1
            self.limiter.warn(refusal[0], peer[0], refusal[1], time.monotonic())
            return
        self.connections[fd] = (label, peer, time.monotonic(), ino)
        key = (label, peer[0])
        self.per_address[key] = self.per_address.get(key, 0) + 1

    def _refusal(self, label: str, host: str, fd: int) -> tuple[Cause, str] | None:
        live = self.per_address.get((label, host), 0)
        if live >= self.max_per_address:
            return TOO_MANY_FROM_ADDRESS, (f"{live} connections from this address on the "
                                           f"{label} port already (--max-per-address)")
        soft_limit, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft_limit != resource.RLIM_INFINITY and fd >= soft_limit - self.headroom:
            return NEAR_FILE_LIMIT, (f"{fd + 1} files open, within {self.headroom} of the "
                                     f"file limit {soft_limit}")
        return None

    def _forget(self, fd: int) -> None:
        record = self.connections.pop(fd, None)
        if record is None:
            return
        label, peer = record[:2]
        key = (label, peer[0])
        self.per_address[key] -= 1
        if not self.per_address[key]:
            del self.per_address[key]

