"""What the broker queues for clients: counted in wire bytes, bounded per connection and in total.

A client that asks and never reads makes the broker hold every reply it is
sent: libzmq queues it (up to the ROUTER's high-water mark, 1000 replies of
up to a few hundred KiB each), then the kernel's send buffer. A subscriber
that never reads holds its XPUB queue (64 frames of up to 64 KiB). Nothing
in libzmq bounds these in bytes, and libzmq has no call to drop one peer.

This module keeps the books, in the broker's thread:

* **Replies.** For each routing id, the descriptor its connection arrived on
  (ZMQ_SRCFD of its first frame, taken once, when the id is new) and the
  bytes handed to libzmq for it, as they go on the wire (payload plus ZMTP
  framing, plus the CurveZMQ box when encrypted). The kernel counts what the
  client's TCP has acknowledged (``tcpi_bytes_acked`` of TCP_INFO); what is
  sent and not yet acknowledged is still held, by libzmq or by the kernel.
  Past ``PEER_BYTES`` (``NOT_JOINED_BYTES`` for a connection without a
  session) that peer's replies are not built; still over after ``SLOW_S``,
  it is disconnected.
* **Broadcasts.** The XPUB filters by topic inside libzmq, so the bytes each
  subscriber is sent are not known here; what it can hold is: its queue
  (``subscriber_bytes``, the XPUB's high-water mark times the largest
  frame) and its kernel send queue. A subscriber whose kernel queue is
  backed up (``BACKED_UP_BYTES``), or not empty while its acknowledged
  bytes have not moved since the previous sweep (*stalled*), is counted at
  that bound; one that keeps up, at nothing. Stalled for ``STALL_S``, it is
  disconnected, like NATS's slow consumer (its client reconnects and
  repairs from history).
* **In total.** When the sum passes ``HIGH_WATER`` of the budget, the
  largest holders are disconnected first until it is under ``LOW_WATER``.
* **Joining.** A request connection that has no session ``join_deadline``
  seconds after it was accepted (or after its session ended: up to a
  ``JOIN_CHECKS``-th of that later) is disconnected.

Disconnecting is ``shutdown(SHUT_RDWR)`` on libzmq's own descriptor, as
admission.py does: libzmq reads end-of-file, closes the descriptor and
frees the peer's queue. Descriptors are reused by the kernel, so before
acting on one its socket's inode is compared with the one it had when first
seen. The sweep runs at most once per heartbeat interval; per reply
the cost is a dictionary lookup and an addition, and a TCP_INFO reading only
for a peer that looks over its limit.

The sweep does not visit every connection (with 5,000 idle clients,
visiting each once a second took more of the broker's loop than their
pings did). admission.py tells the books of each connection accepted and
closed (``accepted``, ``closed``). A request connection is read only when
it was sent something since its last reading, was over its limit or cut,
or closed: one that had everything acknowledged and was sent nothing since
cannot have changed. Subscribers are read when new or closed, when behind or
stalled at their last reading, and all of them once ``QUIET_BYTES`` were
published since they were last all read (a subscriber that kept up then
holds at most that much now); one is read with one TCP_INFO call, which
says whether its send queue is empty, and only one whose queue is not empty
is read in full (identity, TCP_INFO, TIOCOUTQ). The join deadline is a heap
of checks: a connection is looked at when its deadline falls due, and a
joined one again ``JOIN_CHECKS`` times per deadline. Admission's record can
lag behind a descriptor's reuse by a moment: such a reading is at worst a
sweep late, and nothing is cut on it (a cut checks the identity first).
"""

from __future__ import annotations

import ctypes
import fcntl
import heapq
import os
import socket
import struct
import sys
import termios
from dataclasses import dataclass

# Bytes sent to one joined connection and not yet acknowledged, past which
# its replies are not built. Ample for a client that reads (a history page
# is at most a few hundred KiB); Redis cuts a pub/sub client at 32 MB hard
# or 8 MB for 60 s, NATS a slow consumer at 64 MiB pending: 4 MiB lets a
# 512 MiB budget hold 128 such connections before the largest are cut.
PEER_BYTES = 4 * 1024 * 1024
# The same for a connection that has not joined: room for one reply of any
# size (a `who` of thousands of names) and a burst of small refusals, not
# for a pile of them (SECURITY.md: it holds next to nothing).
NOT_JOINED_BYTES = 32 * 1024
# Seconds a connection may stay over its limit (not reading) before it is
# disconnected: a client that is merely slow catches up well within this.
SLOW_S = 3.0
# Seconds a subscriber may make no progress with data waiting for it before
# it is disconnected (NATS's default write deadline is 10 s; a stalled
# subscriber already has its broadcasts dropped by the XPUB).
STALL_S = 5.0
# The total is brought back under LOW_WATER of the budget once it passes
# HIGH_WATER: a margin for what arrives before the next sweep.
HIGH_WATER = 0.9
LOW_WATER = 0.7
# A subscriber whose kernel send queue holds this much is behind: its XPUB
# queue may be full too, so it counts at its bound in the total.
BACKED_UP_BYTES = 256 * 1024
# A connection that has not joined this many seconds after it was accepted
# (or after its session ended) is disconnected.
JOIN_DEADLINE_S = 30.0
# Bytes published (all topics together) since every subscriber was last read,
# below which a sweep reads only the subscribers that were behind or stalled:
# one that kept up then holds at most this now. At idle (a heartbeat a
# second) that is one full reading every few minutes instead of every sweep.
QUIET_BYTES = 64 * 1024
# How often per join deadline a joined request connection is looked at again:
# one whose session ended is cut at most 1/JOIN_CHECKS of the deadline late.
JOIN_CHECKS = 4
# Bytes freed by disconnections after which the allocator is asked to give
# memory back to the system (glibc keeps freed memory otherwise).
TRIM_BYTES = 8 * 1024 * 1024

# struct tcp_info (linux/tcp.h): tcpi_bytes_acked is the u64 at offset 120
# (Linux 4.1 and later); 232 bytes covers it on every kernel since.
TCP_INFO_LEN = 232
BYTES_ACKED_OFFSET = 120
# tcpi_unacked (segments sent and not acknowledged) is the u32 at offset 24,
# tcpi_notsent_bytes (written and not sent yet) the u32 at offset 144 (Linux
# 4.6 and later): both 0 exactly when the send queue is empty, which one
# getsockopt tells without the TIOCOUTQ ioctl and the identity check.
UNACKED_OFFSET = 24
NOTSENT_OFFSET = 144
_BYTES_ACKED = struct.Struct("Q")
# tcpi_unacked, tcpi_bytes_acked and tcpi_notsent_bytes in one unpack, from UNACKED_OFFSET
_QUEUE_AND_ACKED = struct.Struct(f"=I{BYTES_ACKED_OFFSET - UNACKED_OFFSET - 4}x"
                                 f"Q{NOTSENT_OFFSET - BYTES_ACKED_OFFSET - 8}xI")
_QUEUE_EMPTY_LEN = NOTSENT_OFFSET + 4
# A ZMTP 3 frame header: flags and a 1-byte size up to 255, else an 8-byte size.
SHORT_FRAME_MAX = 255
# A CurveZMQ MESSAGE command around a frame: name length and "MESSAGE" (8),
# nonce (8), MAC (16), flags (1) (RFC 26).
CURVE_OVERHEAD = 33


def wire_bytes(payload: int, curve: bool) -> int:
    """Bytes a one-frame reply of ``payload`` bytes takes on the wire."""
    body = payload + CURVE_OVERHEAD if curve else payload
    return body + (2 if body <= SHORT_FRAME_MAX else 9)


def parse_size(text: str) -> int:
    """``512M``, ``1G``, ``65536``, ``64KiB``: a size in bytes (powers of 1024)."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    number, unit = (t[:-1], t[-1]) if t and t[-1] in units else (t, "")
    value = float(number) * units[unit]
    if value < 1:
        raise ValueError(f"not a size: {text!r}")
    return int(value)


# libc's getsockopt and shutdown, called on libzmq's descriptors directly:
# a Python socket object on them costs ~20 us to make and would close the
# descriptor if it were ever collected undetached.
_libc = ctypes.CDLL(None, use_errno=True)
_getsockopt = _libc.getsockopt
_getsockopt.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                        ctypes.POINTER(ctypes.c_uint32)]
_shutdown = _libc.shutdown
_shutdown.argtypes = [ctypes.c_int, ctypes.c_int]
_getpeername = _libc.getpeername
_getpeername.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32)]
_info = ctypes.create_string_buffer(TCP_INFO_LEN)  # one thread (the broker's) uses these
_info_len = ctypes.c_uint32()


def identity(fd: int) -> int | None:
    """What tells this connection from a later one on the same descriptor
    number: its socket's device and inode (the kernel numbers sockets
    afresh)."""
    try:
        status = os.fstat(fd)
    except OSError:
        return None
    return hash((status.st_dev, status.st_ino))  # a file elsewhere may share the number


_info_len_ref = ctypes.byref(_info_len)


# struct sockaddr_storage: 128 bytes; the family is its first u16 (host order).
SOCKADDR_BYTES = 128


def peer_address(fd: int, _addr=ctypes.create_string_buffer(SOCKADDR_BYTES),
                 _len=ctypes.c_uint32()) -> tuple | None:
    """The peer of TCP descriptor ``fd`` as socket.getpeername() gives it
    ((host, port), or (host, port, flowinfo, scope_id) for IPv6), or None
    when it is closed or no connected socket. (The admission thread's
    buffer: it is the only caller.)"""
    _len.value = SOCKADDR_BYTES
    if _getpeername(fd, _addr, ctypes.byref(_len)):
        return None
    raw = _addr.raw
    family = int.from_bytes(raw[:2], sys.byteorder)
    port = int.from_bytes(raw[2:4], "big")
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, raw[4:8]), port
    if family == socket.AF_INET6:
        return (socket.inet_ntop(socket.AF_INET6, raw[8:24]), port,
                int.from_bytes(raw[4:8], "big"), int.from_bytes(raw[24:28], sys.byteorder))
    return None


def refuse(fd: int) -> bool:
    """End the TCP connection on libzmq's descriptor ``fd`` (no identity
    check: the caller has just read the peer from it)."""
    return _shutdown(fd, socket.SHUT_RDWR) == 0


def _acked(fd: int) -> int | None:
    """tcpi_bytes_acked of descriptor ``fd``, or None when it is no TCP socket."""
    _info_len.value = TCP_INFO_LEN
    if _getsockopt(fd, socket.IPPROTO_TCP, socket.TCP_INFO, _info, _info_len_ref):
        return None
    if _info_len.value < BYTES_ACKED_OFFSET + 8:
        return None  # a kernel older than 4.1
    return _BYTES_ACKED.unpack_from(_info, BYTES_ACKED_OFFSET)[0]


def _acked_if_idle(fd: int) -> int | None:
    """tcpi_bytes_acked of descriptor ``fd`` when its send queue is empty
    (everything written is acknowledged), in one system call; None when it
    is not empty, or the kernel does not say, or ``fd`` is no TCP socket."""
    _info_len.value = TCP_INFO_LEN
    if _getsockopt(fd, socket.IPPROTO_TCP, socket.TCP_INFO, _info, _info_len_ref):
        return None
    if _info_len.value < _QUEUE_EMPTY_LEN:
        return None  # a kernel older than 4.6
    unacked, acked, notsent = _QUEUE_AND_ACKED.unpack_from(_info, UNACKED_OFFSET)
    return acked if unacked == 0 and notsent == 0 else None


def _reading(fd: int) -> tuple[int, int, int] | None:
    """(identity, bytes acknowledged, bytes in the send queue) of descriptor
    ``fd``, or None when it is no TCP connection any more."""
    ino = identity(fd)
    acked = None if ino is None else _acked(fd)
    if acked is None:
        return None
    try:
        queued = struct.unpack("i", fcntl.ioctl(fd, termios.TIOCOUTQ, b"\0\0\0\0"))[0]
    except OSError:
        return None
    return ino, acked, queued


def _acked_of(fd: int, ino: int, connections: dict) -> int | None:
    """tcpi_bytes_acked of the connection with identity ``ino`` on ``fd``,
    or None when it is gone. Admission's record of ``fd`` (in
    ``connections``) stands for its identity when it names ``ino``: one
    system call, not two (it lags a descriptor's reuse by a moment at most:
    a reading a sweep late, and a cut checks the identity first)."""
    record = connections.get(fd)
    if record is None or record[3] != ino:
        if identity(fd) != ino:
            return None
    return _acked(fd)


def disconnect(fd: int, ino: int) -> bool:
    """End the TCP connection on libzmq's descriptor ``fd`` if it is still
    the one with identity ``ino``; libzmq then closes it and frees its queue."""
    if identity(fd) != ino:
        return False  # closed, or the descriptor was reused by another connection
    return _shutdown(fd, socket.SHUT_RDWR) == 0


def give_memory_back() -> None:
    """Ask glibc to return freed memory to the system (malloc_trim(0)):
    otherwise the memory of a pile of replies stays the process's after
    they are freed."""
    trim = getattr(_libc, "malloc_trim", None)  # glibc only
    if trim is not None:
        trim(0)


@dataclass(slots=True)
class ReplyBooks:
    """One request connection, as first seen."""

    fd: int
    ino: int  # its identity then, to recognise a reused descriptor
    acked_base: int  # tcpi_bytes_acked then (the handshake)
    sent: int = 0  # wire bytes handed to libzmq since
    acked: int = 0  # of those, acknowledged at the last reading
    sent_read: int = 0  # ``sent`` at the last reading of the kernel's count
    # When it last had a session (monotonic): replies built then keep the
    # joined limit for SLOW_S more, so a client kicked in the middle of a
    # pass still gets that pass's replies and the reason it was kicked.
    joined_at: float = float("-inf")
    over_since: float | None = None
    # Disconnected: no more replies; forgotten once libzmq has closed it.
    cut: bool = False

    @property
    def outstanding(self) -> int:
        return self.sent - self.acked

    def limit(self, now: float) -> int:
        return PEER_BYTES if now - self.joined_at < SLOW_S else NOT_JOINED_BYTES

    @property
    def settled(self) -> bool:
        """Everything sent was acknowledged at the last reading and nothing
        was sent since: the kernel has nothing new to tell about it."""
        return self.sent == self.sent_read and self.sent <= self.acked


@dataclass(slots=True)
class SubscriberBooks:
    ino: int
    acked: int
    stalled_since: float | None = None
    held: int = 0  # counted in the total at the last sweep


@dataclass(frozen=True, slots=True)
class Cut:
    """A connection to disconnect: ``routing_id`` is None for a subscriber."""

    fd: int
    ino: int  # the connection's identity (see identity())
    peer: tuple | None  # its address, for the log
    routing_id: bytes | None
    held: int  # bytes counted against it
    reason: str


class Outbound:
    """The books of everything queued for clients, and who to cut."""

    def __init__(self, budget: int, subscriber_bytes: int, curve: bool = False,
                 join_deadline: float = JOIN_DEADLINE_S):
        self.budget = budget
        self.subscriber_bytes = subscriber_bytes
        self.curve = curve
        self.join_deadline = join_deadline
        self.replies: dict[bytes, ReplyBooks] = {}
        # Routing ids over their limit: their requests are not handled at
        # all (building a history page costs even when it is not sent),
        # until a sweep finds them under it again, or they are cut.
        self.over: set[bytes] = set()
        # Routing ids whose books the next sweep reads: sent something since
        # their last reading, cut, or their connection closed. The books of
        # every other routing id are settled (ReplyBooks.settled).
        self.unsettled: set[bytes] = set()
        self.by_fd: dict[int, bytes] = {}  # request descriptor -> routing id of its books
        # request descriptor -> identity, as admission read it when accepted
        self.request_ino: dict[int, int] = {}
        self.subscribers: dict[int, SubscriberBooks] = {}
        # Subscriber descriptors the next sweep reads even when it is quiet:
        # new, closed, or behind or stalled at their last reading.
        self.subscribers_due: set[int] = set()
        # Bytes handed to the XPUB since the start, and that count when a
        # sweep last read every subscriber.
        self.published = 0
        self.published_read = 0
        # A heap of (when, request descriptor, its identity, joined then):
        # when to look whether that connection has a session (JoinCheck).
        self.join_checks: list[tuple[float, int, int, bool]] = []
        # The total: counted at each sweep, and between sweeps kept up to
        # date with what is sent (and acknowledged, where read). Past the
        # budget, a peer holding more than NOT_JOINED_BYTES gets no reply.
        self.held = 0
        self.freed = 0  # bytes cut since the allocator last gave memory back

    # --- connections, as admission.py sees them ---------------------------------

    def accepted(self, fd: int, label: str, accepted_at: float, ino: int) -> None:
        """A new connection on descriptor ``fd``: a subscriber is read at the
        next sweep; a request connection must join by the deadline."""
        if label == "broadcast":
            self.subscribers_due.add(fd)
        else:
            self.request_ino[fd] = ino
            heapq.heappush(self.join_checks, (accepted_at + self.join_deadline, fd, ino, False))

    def closed(self, fd: int, label: str) -> None:
        """libzmq closed the connection on ``fd``: its books are read (and
        found gone) at the next sweep."""
        if label == "broadcast":
            if fd in self.subscribers:
                self.subscribers_due.add(fd)
        else:
            self.request_ino.pop(fd, None)
            if (routing_id := self.by_fd.get(fd)) is not None:
                self.unsettled.add(routing_id)

    # --- per message -------------------------------------------------------

    def first_seen(self, routing_id: bytes, fd: int | None) -> None:
        """A routing id not in ``replies`` sent its first request on ``fd``
        (None: unknown; then it is looked at again on its next request)."""
        if fd is None or fd < 0:
            return
        # identity and acknowledged bytes only: its send queue does not matter
        # yet. The identity admission read stands for fstat's (see _acked_of:
        # a stale one makes the next sweep drop these books, to start again).
        ino = self.request_ino.get(fd)
        if ino is None:
            ino = identity(fd)
        acked = None if ino is None else _acked(fd)
        if acked is not None:
            self.replies[routing_id] = ReplyBooks(fd, ino, acked)
            self.by_fd[fd] = routing_id

    def may_reply(self, routing_id: bytes, joined: bool, now: float) -> bool:
        """Whether a reply to ``routing_id`` may be built now: False while
        it holds more than its limit (it is not reading)."""
        books = self.replies.get(routing_id)
        if books is None:
            return True
        if books.cut:
            return False  # replies built before it was cut, in the same pass
        if joined:
            books.joined_at = now
        limit = books.limit(now)
        if self.held >= self.budget:
            limit = min(limit, NOT_JOINED_BYTES)
        if books.outstanding < limit:
            return True
        acked = _acked(books.fd)
        if acked is not None:
            self._acked(books, acked)
        if books.outstanding < limit:
            books.over_since = None
            return True
        if books.over_since is None:
            books.over_since = now
        self.over.add(routing_id)
        return False

    def sent(self, routing_id: bytes, payload: int) -> None:
        books = self.replies.get(routing_id)
        if books is not None:
            size = wire_bytes(payload, self.curve)
            books.sent += size
            self.held += size
            self.unsettled.add(routing_id)

    def _acked(self, books: ReplyBooks, acked: int) -> None:
        """The kernel says ``acked`` bytes of ``books`` are acknowledged."""
        before = books.outstanding
        books.acked = acked - books.acked_base
        books.sent_read = books.sent
        self.held -= before - books.outstanding

    def forget(self, routing_id: bytes) -> None:
        """The ROUTER no longer knows ``routing_id``."""
        books = self.replies.pop(routing_id, None)
        self.over.discard(routing_id)
        self.unsettled.discard(routing_id)
        if books is not None:
            self._unmap(books.fd, routing_id)
            if not books.cut:
                self.held -= max(0, books.outstanding)

    def _unmap(self, fd: int, routing_id: bytes) -> None:
        if self.by_fd.get(fd) == routing_id:
            del self.by_fd[fd]

    # --- once per interval ------------------------------------------------------

    def sweep(self, now: float, sessions, connections: dict) -> list[Cut]:
        """Read the kernel's counts and decide whom to cut. ``sessions``:
        the routing ids with a session; ``connections``: admission's
        descriptor -> (port label, peer address, accepted at, identity) of
        every live connection."""
        cuts: dict[int, Cut] = {}
        held = self._sweep_replies(now, sessions, connections, cuts)
        held += self._sweep_subscribers(now, connections, cuts)
        self._sweep_unjoined(now, sessions, connections, cuts)
        if held > self.budget * HIGH_WATER:
            self._cut_largest(held, connections, cuts)
        for cut in cuts.values():
            if cut.routing_id is not None:
                self.replies[cut.routing_id].cut = True
                self.over.add(cut.routing_id)  # what it still sent is not heard
                self.unsettled.add(cut.routing_id)  # read until libzmq has closed it
        cut_bytes = sum(cut.held for cut in cuts.values())
        self.held = held - cut_bytes
        self.freed += cut_bytes
        return list(cuts.values())

    def trim_due(self) -> bool:
        """Whether enough was freed that the allocator should give it back."""
        if self.freed < TRIM_BYTES:
            return False
        self.freed = 0
        return True

    def _sweep_replies(self, now: float, sessions, connections: dict,
                       cuts: dict[int, Cut]) -> int:
        """Read the books that may have changed (``unsettled``, ``over``):
        a settled connection holds nothing and cannot be over its limit."""
        held = 0
        due, self.unsettled = self.unsettled | self.over, set()
        for routing_id in due:
            books = self.replies.get(routing_id)
            if books is None:
                continue
            reading = _acked_of(books.fd, books.ino, connections)
            if reading is None:
                del self.replies[routing_id]
                self.over.discard(routing_id)  # gone; its descriptor may be another's now
                self._unmap(books.fd, routing_id)
                if not books.cut:
                    self.freed += max(0, books.outstanding)
                continue
            if books.cut:
                self.unsettled.add(routing_id)  # libzmq has not closed it yet; not counted
                continue
            self._acked(books, reading)
            if routing_id in sessions:
                books.joined_at = now
            if books.outstanding < books.limit(now):
                books.over_since = None
                self.over.discard(routing_id)
            elif books.over_since is None:
                books.over_since = now
            elif now - books.over_since >= SLOW_S:
                cuts[books.fd] = Cut(books.fd, books.ino, _address(connections, books.fd),
                                     routing_id, books.outstanding,
                                     f"has not read {books.outstanding:,} bytes of replies "
                                     f"for {now - books.over_since:.0f} s")
            if not books.settled:
                self.unsettled.add(routing_id)
            held += max(0, books.outstanding)
        return held

    def _sweep_subscribers(self, now: float, connections: dict, cuts: dict[int, Cut]) -> int:
        """Read the subscribers that may hold something: every one when
        QUIET_BYTES or more were published since they were all read, else
        only those in ``subscribers_due`` (one that kept up then can hold no
        more than what was published since)."""
        if self.published - self.published_read < QUIET_BYTES:
            due = self.subscribers_due
        else:
            due = {fd for fd, record in connections.items() if record[0] == "broadcast"}
            due.update(self.subscribers)
            self.published_read = self.published
        self.subscribers_due = set()
        held = 0
        for fd in due:
            books = self._read_subscriber(fd, connections.get(fd), now, cuts)
            if books is not None and (books.held or books.stalled_since is not None):
                self.subscribers_due.add(fd)
                held += books.held
        return held

    def _read_subscriber(self, fd: int, record: tuple | None, now: float,
                         cuts: dict[int, Cut]) -> SubscriberBooks | None:
        """Read subscriber ``fd`` (admission's ``record`` of it): its books,
        or None when it is gone (its books dropped)."""
        books = self.subscribers.get(fd)
        if record is None or record[0] != "broadcast":
            if books is not None:
                self.freed += self.subscribers.pop(fd).held
            return None
        _, peer, _, ino = record
        if books is not None and books.ino == ino:
            # The common case, in one system call: a subscriber that keeps
            # up has an empty send queue, so it is neither behind nor
            # stalled and holds nothing.
            acked = _acked_if_idle(fd)
            if acked is not None:
                books.acked, books.held, books.stalled_since = acked, 0, None
                return books
        if books is None or books.ino != ino:  # new: where it starts from
            # admission's record stands for its identity (see _acked_of)
            acked = _acked(fd)
            if books is not None:
                self.freed += self.subscribers.pop(fd).held
            if acked is None:
                return None
            books = self.subscribers[fd] = SubscriberBooks(ino, acked)
            return books
        reading = _reading(fd)
        if reading is None or reading[0] != ino:
            self.freed += self.subscribers.pop(fd).held
            return None
        queued = reading[2]
        stalled = queued > 0 and reading[1] == books.acked
        books.acked = reading[1]
        # Behind (its kernel queue backed up) or stalled, its XPUB queue
        # may be full: counted at its bound. One that keeps up holds little.
        books.held = (self.subscriber_bytes + queued
                      if stalled or queued >= BACKED_UP_BYTES else 0)
        if not stalled:
            books.stalled_since = None
            return books
        if books.stalled_since is None:
            books.stalled_since = now
        if now - books.stalled_since >= STALL_S:
            cuts[fd] = Cut(fd, ino, peer, None, books.held,
                           f"subscriber has read nothing for {now - books.stalled_since:.0f} s")
        return books

    def _sweep_unjoined(self, now: float, sessions, connections: dict,
                        cuts: dict[int, Cut]) -> None:
        """Cut the request connections due in ``join_checks`` that have had
        no session for ``join_deadline``: a joined one is looked at again
        JOIN_CHECKS times per deadline, and once found without its session,
        given the whole deadline from then."""
        checks = self.join_checks
        while checks and checks[0][0] <= now:
            _, fd, ino, was_joined = heapq.heappop(checks)
            record = connections.get(fd)
            if record is None or record[3] != ino or fd in cuts:
                continue  # closed: a later connection on ``fd`` has checks of its own
            routing_id = self.by_fd.get(fd)
            books = self.replies.get(routing_id) if routing_id is not None else None
            if books is not None and books.ino == ino and routing_id in sessions:
                heapq.heappush(checks, (now + self.join_deadline / JOIN_CHECKS, fd, ino, True))
            elif was_joined:
                heapq.heappush(checks, (now + self.join_deadline, fd, ino, False))
            else:
                cuts[fd] = Cut(fd, ino, record[1], None, 0,
                               f"has not joined within {self.join_deadline:g} s")

    def _cut_largest(self, held: int, connections: dict, cuts: dict[int, Cut]) -> None:
        """Cut the largest holders until the total is under LOW_WATER."""
        held -= sum(cut.held for cut in cuts.values())
        # (bytes, stalled, ...): of equal holders, the stalled go first
        holders = [(books.outstanding, True, books.fd, books.ino, rid)
                   for rid, books in self.replies.items()]
        holders += [(books.held, books.stalled_since is not None, fd, books.ino, None)
                    for fd, books in self.subscribers.items() if books.held]
        holders.sort(key=lambda h: h[:2], reverse=True)
        for size, _, fd, ino, rid in holders:
            if rid is not None and self.replies[rid].cut:
                continue
            if held <= self.budget * LOW_WATER or size <= 0:
                break
            if fd in cuts:
                continue
            cuts[fd] = Cut(fd, ino, _address(connections, fd), rid, size,
                           f"holds {size:,} bytes, the most while all hold {held:,} "
                           f"(--max-memory {self.budget:,})")
            held -= size


def _address(connections: dict, fd: int) -> tuple | None:
    record = connections.get(fd)
    return record[1] if record else None
