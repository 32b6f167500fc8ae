"""Admission stops without deadlocking libzmq (a broker that never exited on SIGTERM).

libzmq sends a socket's monitor events from its I/O thread with a blocking
send, holding the socket's monitor lock. Once nobody reads the monitor, the
next event (a peer disconnecting as the broker stops) blocks that thread for
good, and disable_monitor() then waits for the lock forever, holding the
GIL. The test has a connection close at the worst moment: just after the
Admission thread has stopped reading its monitors. Nothing in a process so
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
# How long the scenario may take: it needs well under a second.
SCENARIO_S = 10


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
    return False


def stop_as_a_peer_leaves() -> None:
    """The scenario, run in the child: exits 0 if stop() returned and libzmq
    closed the leaving peer's connection."""
    from admission import Admission
    from procs import wait_until

    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    admission = Admission({"request": router})
    admission.start()
    port = router.bind_to_random_port("tcp://127.0.0.1")
    peer = socket.create_connection(("127.0.0.1", port), timeout=5)
    wait_until(lambda: admission.per_address, 5, "the connection to be counted")
    closed = []

    thread_join = admission.join
    def join_then_peer_leaves(timeout=None):
        thread_join(timeout)
        # Nobody reads the monitors now. The peer leaves; libzmq closes its
        # end once it has handled that (and reported it, if still monitored).
        peer.shutdown(socket.SHUT_WR)
        closed.append(closed_by_other_side(peer, 2))
    admission.join = join_then_peer_leaves

    admission.stop()
    assert closed == [True], closed
    peer.close()
    router.close()
    ctx.term()


def test_a_connection_closing_as_admission_stops_does_not_hang_the_stop():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS)])}
    child = subprocess.Popen([sys.executable, __file__], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = child.communicate(timeout=SCENARIO_S)
    except subprocess.TimeoutExpired:
        child.kill()
        child.communicate()
        raise AssertionError(f"Admission.stop() hung (no exit within {SCENARIO_S} s)") from None
    assert child.returncode == 0, output


if __name__ == "__main__":
    stop_as_a_peer_leaves()
