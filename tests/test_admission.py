"""Admission never blocks libzmq's I/O thread, and closes without deadlocking libzmq.

libzmq sends a socket's monitor events from its I/O thread with a blocking
send, holding the socket's monitor lock. The broker's loop reads the
monitors between its other work (admission.py); were their queues bounded,
a burst of connections while the loop is busy would fill them, the I/O
thread would stop (no more accepts, reads or writes for anyone) until the
loop read them, and a close() at that moment (disable_monitor() waits for
the lock, holding the GIL) would never return. Nothing in a process so
stuck runs again, a timeout of pytest's included, so the scenario runs in a
child process that the test can time out and kill.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import zmq

TESTS = Path(__file__).resolve().parent
# How long the scenario may take: it needs a few seconds.
SCENARIO_S = 30
# Connections opened and closed while nobody reads the monitor: each is two
# events, well past the 2,000 that libzmq's default queues would hold.
CONNECTIONS = 1500
# How long libzmq may take to close one connection whose peer left.
CLOSE_S = 5


def closed_by_other_side(conn: socket.socket, timeout: float) -> bool:
    """Read ``conn`` until the other side closes it; False after ``timeout``."""
    deadline = time.monotonic() + timeout
    while (remaining := deadline - time.monotonic()) > 0:
        conn.settimeout(remaining)
        try:
            if not conn.recv(4096):
                return True
        except socket.timeout:
            break
        except ConnectionResetError:
            return True
    return False


def events_unread_then_close() -> None:
    """The scenario, run in the child: exits 0 if libzmq went on closing
    connections while nobody read the monitor, and close() returned."""
    from admission import Admission

    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    admission = Admission({"request": router})
    port = router.bind_to_random_port("tcp://127.0.0.1")
    for i in range(CONNECTIONS):
        peer = socket.create_connection(("127.0.0.1", port), timeout=CLOSE_S)
        # The peer leaves; libzmq closes its end once it has handled that
        # (and reported it to the monitor).
        peer.shutdown(socket.SHUT_WR)
        closed = closed_by_other_side(peer, CLOSE_S)
        peer.close()
        assert closed, f"connection {i} not closed by libzmq: its I/O thread is blocked"
    admission.close()
    router.close()
    ctx.term()


def test_unread_events_neither_stop_libzmq_nor_hang_the_close():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS)])}
    child = subprocess.Popen([sys.executable, __file__], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = child.communicate(timeout=SCENARIO_S)
    except subprocess.TimeoutExpired:
        child.kill()
        child.communicate()
        raise AssertionError(f"the scenario hung (no exit within {SCENARIO_S} s)") from None
    assert child.returncode == 0, output


def test_the_loop_counts_and_forgets_connections():
    """What read() takes from the monitors: a connection counted by address
    while open, forgotten once closed."""
    from admission import Admission
    from procs import wait_until

    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    admission = Admission({"request": router})
    try:
        port = router.bind_to_random_port("tcp://127.0.0.1")
        poller = zmq.Poller()
        for monitor in admission.sockets():
            poller.register(monitor, zmq.POLLIN)
        step = lambda: admission.read(dict(poller.poll(50)))
        peer = socket.create_connection(("127.0.0.1", port), timeout=5)
        wait_until(lambda: step() or admission.per_address == {("request", "127.0.0.1"): 1},
                   5, "the connection to be counted")
        assert [record[0] for record in admission.live().values()] == ["request"]
        peer.close()
        wait_until(lambda: step() or not admission.per_address and not admission.live(),
                   5, "the connection to be forgotten")
    finally:
        admission.close()
        router.close()
        ctx.term()


def test_a_disconnection_on_one_port_leaves_the_other_ports_connection_counted():
    """The ports' monitors are read one after the other: a subscriber's
    descriptor, closed and at once reused by a request connection, may be
    read accepted on the request port before it is read disconnected on the
    broadcast port. That disconnection is not the request connection's."""
    from admission import Admission

    ctx = zmq.Context()
    router, pub = ctx.socket(zmq.ROUTER), ctx.socket(zmq.XPUB)
    admission = Admission({"request": router, "broadcast": pub})
    try:
        with socket.create_server(("127.0.0.1", 0)) as server, \
                socket.create_connection(server.getsockname(), timeout=5):
            conn, _ = server.accept()
            with conn:
                admission._accepted("request", conn.fileno())
                admission._forget(conn.fileno(), "broadcast")  # the earlier subscriber's
                assert admission.per_address == {("request", "127.0.0.1"): 1}
                assert conn.fileno() in admission.live()
                admission._forget(conn.fileno(), "request")
                assert not admission.per_address and not admission.live()
    finally:
        admission.close()
        router.close()
        pub.close()
        ctx.term()


if __name__ == "__main__":
    events_unread_then_close()
