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

The broker's loop reads the monitors with its other sockets (``sockets``,
``read``), at the start of each pass: no thread of its own, whose passes
would take the GIL from the loop at every hand-over (a storm of joins once
spent a tenth of the loop's time waiting for it). libzmq sends each event
from its I/O thread with a blocking send, holding the socket's monitor
lock; the monitors' queues are unbounded so that this send never waits for
a busy loop (and ``close`` never waits for the lock). The event is read a
moment after libzmq sent it: the connection that holds the descriptor by
then is the one judged, by its own address; a descriptor already closed is
not counted. Refusals are logged at most a few lines per interval
(log_limit.LogLimiter).

A connection that opens TCP and never completes the ZeroMQ handshake is
closed by libzmq after ``HANDSHAKE_S`` (ZMQ_HANDSHAKE_IVL, set by the broker).
"""

from __future__ import annotations

import logging
import resource
import struct
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
# A monitor's queue: unbounded (0), so that libzmq's I/O thread never blocks
# sending an event while the loop is busy (and holds the monitor's lock meanwhile).
# An event is two small frames; the file limit bounds the connections they tell of.
MONITOR_QUEUE = 0
# Events read from one monitor in one pass, so that a storm of connections
# cannot hold up the requests: the rest wait for the next pass.
READ_BATCH = 1000

TOO_MANY_FROM_ADDRESS = Cause(
    "connection from {peer} refused: {detail}",
    "refused {count} more connections from {peer} in the last {seconds} s")
NEAR_FILE_LIMIT = Cause(
    "connection from {peer} refused: {detail}",
    "refused {count} more connections near the file limit from {peer} in the last {seconds} s")


class Admission:
    """Counts and refuses connections on ``sockets`` (port label -> socket).

    Construct it in the thread that owns the sockets, before they bind; poll
    ``sockets()`` with the others, ``read`` those found ready, and ``close``
    it before closing the sockets.
    """

    def __init__(self, sockets: dict[str, zmq.Socket], max_per_address: int = MAX_PER_ADDRESS,
                 headroom: int = FILE_HEADROOM, listener=None):
        self.max_per_address = max_per_address
        # Told of each connection counted and forgotten (outbound.Outbound):
        # listener.accepted(fd, label, accepted at, identity), listener.closed(fd, label)
        self.listener = listener
        self.headroom = headroom
        self.watched = list(sockets.values())
        self.monitors = {label: _monitor(sock) for label, sock in sockets.items()}
        self.labels = {monitor: label for label, monitor in self.monitors.items()}
        # descriptor -> (port label, peer address as (host, port), monotonic
        # time accepted, its socket's inode to tell it from a later connection
        # on the same descriptor); outbound.py reads it
        self.connections: dict[int, tuple[str, tuple, float, int]] = {}
        # (port label, host) -> live connections
        self.per_address: dict[tuple[str, str], int] = {}
        self.refused = 0
        self.limiter = LogLimiter(log)
        self.file_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]  # soft

    def sockets(self) -> list[zmq.Socket]:
        """The monitors, to poll for POLLIN."""
        return list(self.monitors.values())

    def read(self, ready) -> None:
        """Take the events of the monitors among ``ready`` (sockets found
        readable), and log what is due."""
        for monitor, label in self.labels.items():
            if monitor in ready:
                self._drain(label, monitor)
        self.limiter.flush(time.monotonic())

    def close(self) -> None:
        """Detach the monitors and close them; the sockets stay open."""
        for sock in self.watched:
            sock.disable_monitor()
        for monitor in self.monitors.values():
            monitor.close(linger=0)
        self.limiter.flush(time.monotonic())

    def live(self) -> dict[int, tuple[str, tuple, float, int]]:
        """The live connections (``connections``; not to be changed)."""
        return self.connections

    def _drain(self, label: str, monitor: zmq.Socket) -> None:
        """Handle the events waiting on ``monitor`` (found readable). Each
        frame is received with copy=False and its own "more" flag read
        (recv_multipart costs a getsockopt per frame). One after another,
        each join is a pass of its own that finds one event: after the
        first, the socket is asked whether more are waiting, rather than
        paying the zmq.Again of one receive too many (pyzmq builds an
        exception and an errno enum); in a storm, where a pass finds many,
        that exception ends the read once instead of a question per event."""
        recv, more_waiting = monitor.recv, monitor.get
        # once per batch, not per connection: it may have been lowered since
        # the last (by prlimit), and a connection let in then is never judged again
        self.file_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        try:
            for read in range(READ_BATCH):
                if read == 1 and not more_waiting(_EVENTS) & _POLLIN:
                    return
                frames = [recv(_NOBLOCK, copy=False)]
                while frames[-1].more:  # an event's frames arrive together
                    frames.append(recv(_NOBLOCK, copy=False))
                self._event(label, frames)
        except zmq.Again:  # all read
            return

    def _event(self, label: str, frames: list) -> None:
        # The event's first frame, read here: pyzmq's parse_monitor_message
        # makes a zmq.Event flag of the descriptor number, which costs more
        # (~12 us) than all the rest of an accept's handling together.
        if len(frames) != 2 or len(frames[0]) != MONITOR_HEAD.size:
            return  # not an event of libzmq 4.x: nothing to count
        event, value = MONITOR_HEAD.unpack(frames[0].buffer)
        if event == _ACCEPTED:
            self._accepted(label, value)
        elif event == _DISCONNECTED:
            self._forget(value, label)

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
        accepted_at = time.monotonic()
        self.connections[fd] = (label, peer, accepted_at, ino)
        key = (label, peer[0])
        self.per_address[key] = self.per_address.get(key, 0) + 1
        if self.listener is not None:
            self.listener.accepted(fd, label, accepted_at, ino)

    def _refusal(self, label: str, host: str, fd: int) -> tuple[Cause, str] | None:
        live = self.per_address.get((label, host), 0)
        if live >= self.max_per_address:
            return TOO_MANY_FROM_ADDRESS, (f"{live} connections from this address on the "
                                           f"{label} port already (--max-per-address)")
        soft_limit = self.file_limit
        if soft_limit != resource.RLIM_INFINITY and fd >= soft_limit - self.headroom:
            return NEAR_FILE_LIMIT, (f"{fd + 1} files open, within {self.headroom} of the "
                                     f"file limit {soft_limit}")
        return None

    def _forget(self, fd: int, label: str | None = None) -> None:
        """Forget the connection on ``fd``; with ``label``, only one on that
        port: each port's events come in order, but not the two ports'
        together, so a closed subscriber's descriptor may already be a new
        request connection's when its disconnection is read."""
        record = self.connections.get(fd)
        if record is None or label is not None and record[0] != label:
            return
        del self.connections[fd]
        label, peer = record[:2]
        key = (label, peer[0])
        self.per_address[key] -= 1
        if not self.per_address[key]:
            del self.per_address[key]
        if self.listener is not None:
            self.listener.closed(fd, label)


# zmq's constants as plain ints: an enum's comparison costs a microsecond per event.
_NOBLOCK = int(zmq.NOBLOCK)
_ACCEPTED = int(zmq.EVENT_ACCEPTED)
_DISCONNECTED = int(zmq.EVENT_DISCONNECTED)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)


def _monitor(sock: zmq.Socket) -> zmq.Socket:
    """A PAIR socket receiving ``sock``'s accepts and disconnections, with an
    unbounded queue (MONITOR_QUEUE: libzmq sums both ends' limits of an
    inproc pipe, or leaves it unbounded when either is 0)."""
    address = f"inproc://admission-{id(sock):x}"
    sock.monitor(address, zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
    monitor = sock.context.socket(zmq.PAIR)
    monitor.setsockopt(zmq.RCVHWM, MONITOR_QUEUE)
    monitor.connect(address)
    return monitor
