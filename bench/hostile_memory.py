"""The broker's memory under clients that never read (issue 14): RSS over time.

    python bench/hostile_memory.py [--seconds 60] [--hogs 50] [--subscribers 50]
                                   [--max-memory 256M] [--json FILE]

One broker with ``--max-memory``, a history of 1,000 texts of 4 KB, and:

* ``--hogs`` reply hogs: joined DEALERs that loop ``recent``/``fetch`` and
  never read (receive queue of 1, kernel buffer of 4 KB); one that is cut
  joins again from a new connection, as a determined attacker would;
* ``--subscribers`` SUBs on every topic that never read (libzmq reconnects
  them when they are cut, and they stall again);
* a broadcaster saying 4 KB lines at 100 per second, so that there is
  something for the subscribers not to read;
* a normal client: says a line every 50 ms and times the acknowledgement,
  and a SUB that reads everything and checks that each of its lines arrives.

The attack runs from 5 s to 45 s of a 60 s run (scaled with ``--seconds``).
The broker's RSS is sampled every 0.5 s. Everything is on 127.0.0.1 and
every process and socket is closed at the end. Figures go to stdout as JSON
(and to ``--json FILE``); progress to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import zmq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import messages as m  # noqa: E402
from common import stop_process  # noqa: E402
from tests.procs import free_port_pair  # noqa: E402
from tests.raw_peer import rss_mib, unread_socket  # noqa: E402

HISTORY = 1000
TEXT = "x" * 4096
SAMPLE_S = 0.5
NORMAL_EVERY_S = 0.05
BROADCASTS_PER_S = 100
HOG_REQUESTS_PER_ROUND = 20




class Broker:
    def __init__(self, max_memory: str):
        self.port = free_port_pair()
        self.proc = subprocess.Popen(
            [sys.executable, "broker.py", "--port", str(self.port), "--max-memory", max_memory,
             "--max-per-address", "1000", "--heartbeat-liveness", "1000"],
            cwd=ROOT, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self.ready.wait(10):
            raise SystemExit(f"the broker did not start: {self.lines}")

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            if "listening" in line:
                self.ready.set()

    def stop(self) -> None:
        stop_process(self.proc)


class Peer:
    """A joined DEALER with its session token."""

    def __init__(self, ctx: zmq.Context, port: int, name: str, reads: bool = True):
        if reads:
            self.sock = ctx.socket(zmq.DEALER)
            self.sock.setsockopt(zmq.LINGER, 0)
            self.sock.connect(f"tcp://127.0.0.1:{port}")
        else:
            self.sock = unread_socket(ctx, zmq.DEALER, port)
        self.sock.send(m.encode(m.Hello(name, secret="b" * 32)))
        if not self.sock.poll(10_000):
            raise SystemExit(f"{name} was not welcomed")
        welcome = m.decode_reply(self.sock.recv_multipart())
        assert isinstance(welcome, m.Welcome), welcome
        self.token = welcome.resume

    def send(self, message, flags: int = 0) -> bool:
        try:
            self.sock.send(m.encode(message), flags)
            return True
        except zmq.Again:
            return False

    def close(self) -> None:
        self.sock.close(linger=0)


def fill_history(ctx: zmq.Context, port: int) -> None:
    writer = Peer(ctx, port, "history-writer")
    acked = 0
    for i in range(HISTORY):
        writer.send(m.Say(f"h{i}", TEXT, writer.token))
        if i % 100 == 99:
            while acked <= i:
                assert writer.sock.poll(10_000), "history not acknowledged"
                acked += isinstance(m.decode_reply(writer.sock.recv_multipart()), m.Ack)
    writer.close()


class Attack:
    """The hogs, the subscribers and the broadcaster, in one thread."""

    def __init__(self, ctx: zmq.Context, port: int, hogs: int, subscribers: int):
        self.ctx, self.port, self.count = ctx, port, hogs
        self.hogs: list[tuple[Peer, float]] = []
        self.joined = 0
        self.subs = []
        for _ in range(subscribers):
            self.subs.append(unread_socket(ctx, zmq.SUB, port + 1))
        self.broadcaster = Peer(ctx, port, "broadcaster")
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _new_hog(self) -> tuple[Peer, float]:
        self.joined += 1
        return Peer(self.ctx, self.port, f"hog{self.joined}", reads=False), time.monotonic()

    def _run(self) -> None:
        self.hogs = [self._new_hog() for _ in range(self.count)]
        said = 0
        started = time.monotonic()
        while not self.stopping.is_set():
            for i, (hog, born) in enumerate(self.hogs):
                # A hog cut by the broker joins again on a new connection:
                # after 6 s any hog is replaced (cut after 3 s over its limit).
                if time.monotonic() - born > 6:
                    hog.close()
                    hog, born = self.hogs[i] = self._new_hog()
                request = (m.Recent(m.MAX_FETCH_EVENTS, hog.token) if i % 2
                           else m.Fetch(0, 2 * HISTORY, hog.token))
                for _ in range(HOG_REQUESTS_PER_ROUND):
                    if not hog.send(request, zmq.NOBLOCK):
                        break
            due = int((time.monotonic() - started) * BROADCASTS_PER_S)
            while said < due:
                self.broadcaster.send(m.Say(f"b{said}", TEXT, self.broadcaster.token), zmq.NOBLOCK)
                said += 1
            try:  # its acks are read, so that only the attackers do not read
                while self.broadcaster.sock.recv(zmq.NOBLOCK):
                    pass
            except zmq.Again:
                pass
            time.sleep(0.005)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(10)
        for hog, _ in self.hogs:
            hog.close()
        for sub in self.subs:
            sub.close(linger=0)
        self.broadcaster.close()


class NormalClient:
    """Says a line every NORMAL_EVERY_S and times each ack; its SUB checks
    that every line arrives."""

    def __init__(self, ctx: zmq.Context, port: int):
        self.sub = ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.SUBSCRIBE, m.BROADCAST_TOPIC)
        self.sub.connect(f"tcp://127.0.0.1:{port + 1}")
        self.peer = Peer(ctx, port, "normal")
        time.sleep(0.5)  # the SUB's subscription reaches the broker
        self.latencies: list[tuple[float, float]] = []  # (time, seconds)
        self.sent: set[str] = set()
        self.seen: set[str] = set()
        self.unanswered = 0
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        i = 0
        while not self.stopping.is_set():
            text = f"normal line {i}"
            started = time.monotonic()
            self.peer.send(m.Say(f"n{i}", text, self.peer.token))
            self.sent.add(text)
            while True:
                if not self.peer.sock.poll(10_000):
                    self.unanswered += 1
                    break
                reply = m.decode_reply(self.peer.sock.recv_multipart())
                if isinstance(reply, m.Ack) and reply.id == f"n{i}":
                    self.latencies.append((started, time.monotonic() - started))
                    break
            self._read_sub()
            i += 1
            time.sleep(max(0.0, started + NORMAL_EVERY_S - time.monotonic()))

    def _read_sub(self) -> None:
        try:
            while True:
                for event in m.decode_broadcast(self.sub.recv_multipart(zmq.NOBLOCK)):
                    if isinstance(event, m.Message) and event.sender == "normal":
                        self.seen.add(event.text)
        except zmq.Again:
            pass

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(15)
        deadline = time.monotonic() + 5
        while self.sent - self.seen and time.monotonic() < deadline:
            self.sub.poll(100)
            self._read_sub()
        self.peer.close()
        self.sub.close(linger=0)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--hogs", type=int, default=50)
    p.add_argument("--subscribers", type=int, default=50)
    p.add_argument("--max-memory", default="256M")
    p.add_argument("--json", metavar="FILE", help="also write the figures here")
    args = p.parse_args()
    attack_from, attack_to = args.seconds * 5 / 60, args.seconds * 45 / 60

    broker = Broker(args.max_memory)
    ctx = zmq.Context()
    samples: list[tuple[float, float]] = []
    try:
        fill_history(ctx, broker.port)
        normal = NormalClient(ctx, broker.port)
        pid = broker.proc.pid
        started = time.monotonic()
        normal.start()
        attack = Attack(ctx, broker.port, args.hogs, args.subscribers)
        attacking = False
        while (t := time.monotonic() - started) < args.seconds:
            if not attacking and attack_from <= t < attack_to:
                print(f"{t:5.1f} s: attack starts", file=sys.stderr)
                attack.start()
                attacking = True
            if attacking and t >= attack_to:
                attack.stop()
                attacking = False
                print(f"{t:5.1f} s: attack stops", file=sys.stderr)
            samples.append((round(t, 2), round(rss_mib(pid), 1)))
            time.sleep(SAMPLE_S)
        if attacking:
            attack.stop()
        normal.stop()
        cpu_idle_after = _cpu_over(pid, 1.0)
    finally:
        broker.stop()
        ctx.destroy(linger=0)

    def during(start: float, end: float) -> list[float]:
        return [rss for t, rss in samples if start <= t < end]

    under_attack = [s for t, s in normal.latencies if attack_from <= t - started < attack_to]
    before = during(0, attack_from)
    figures = {
        "max_memory": args.max_memory,
        "hogs": args.hogs,
        "subscribers": args.subscribers,
        "hog_connections": attack.joined,
        "seconds": args.seconds,
        "attack": [attack_from, attack_to],
        "rss_mib": samples,
        "rss_before_mib": max(before) if before else None,
        "rss_peak_during_mib": max(during(attack_from, attack_to)),
        "rss_end_mib": samples[-1][1],
        "broker_cpu_after_s_per_s": round(cpu_idle_after, 3),
        "normal_requests": len(normal.latencies),
        "normal_unanswered": normal.unanswered,
        "normal_lines_lost": len(normal.sent - normal.seen),
        "normal_latency_ms_under_attack": {
            "p50": round(1000 * statistics.median(under_attack), 1) if under_attack else None,
            "p99": round(1000 * percentile(under_attack, 0.99), 1),
            "max": round(1000 * max(under_attack), 1) if under_attack else None,
        },
        "broker_log_lines": len(broker.lines),
        "broker_warnings": sum(" WARNING " in line for line in broker.lines),
        "disconnections_logged": [line.split(" WARNING ", 1)[1] for line in broker.lines
                                  if " disconnected " in line][:8],
    }
    text = json.dumps(figures, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


def _cpu_over(pid: int, seconds: float) -> float:
    """The broker's CPU seconds per second over the next ``seconds``."""
    def cpu() -> float:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    before = cpu()
    time.sleep(seconds)
    return (cpu() - before) / seconds


if __name__ == "__main__":
    sys.exit(main())
