"""Instructions the broker's thread spends per chat message, counted by callgrind.

    python bench/instructions.py                                  # this tree
    python bench/instructions.py --tree before=OTHER_CHECKOUT --tree after=. --repeat 2

On a shared machine CPU time per message moves by 2x between runs (other
processes evict the broker's caches while it sleeps between messages), so a
change of 10% to the per-message path cannot be seen in it. An instruction
count does not depend on the machine's load: this runs the real
``BrokerShell.run()`` of each tree under ``valgrind --tool=callgrind`` (one
thread at a time, each counted apart) with a client thread of its own, 50
SUBs and 4 DEALERs that joined, which sends one ``say`` every ``--gap``
seconds (each wakes the loop alone, as at chat rates) and reads every
delivery and ack. It runs twice, with ``--messages`` N1 and N2 says, and
reports ``(count(N2) - count(N1)) / (N2 - N1)`` for the broker's thread:
start-up and joins cancel out; what stays is the loop's wake-up, the
request, the core, the XPUB fan-out in libzmq (in the sending thread) and
the ack, plus the heartbeats of the extra seconds. libzmq's I/O thread is
not counted (its cost is system calls: see rawbench.py's CPU figures).

Needs Debian's ``valgrind``. About a minute per tree and repeat.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
SUBSCRIBERS = 50
SENDERS = 4
# Each child run is bounded: valgrind slows Python some 50x.
CHILD_TIMEOUT_S = 600


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tree", action="append", default=[], metavar="NAME=DIR",
                   help="a zchat source tree (repeatable; default this tree)")
    p.add_argument("--messages", default="50,250", metavar="N1,N2",
                   help="says of the two runs (default 50,250)")
    p.add_argument("--gap", type=float, default=0.02,
                   help="seconds between says (default 0.02: one per wake-up under valgrind)")
    p.add_argument("--repeat", type=int, default=1, help="rounds over the trees (default 1)")
    p.add_argument("--child", nargs=2, metavar=("TREE", "N"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    trees = dict(t.split("=", 1) for t in args.tree) or {"zchat": str(BENCH.parent)}
    args.trees = {name: Path(d).resolve() for name, d in trees.items()}
    args.counts = [int(n) for n in args.messages.split(",")]
    if len(args.counts) != 2 or not 0 <= args.counts[0] < args.counts[1]:
        p.error("--messages takes N1,N2 with N1 < N2")
    return args


# --- the child: a broker and its clients in one process -------------------------------


def child(tree: Path, count: int, gap: float) -> None:
    sys.path.insert(0, str(tree))  # that tree's broker and modules
    import zmq

    import broker
    import messages as m
    from broker_core import BrokerConfig, BrokerCore
    from common import free_port_pair

    port = free_port_pair()
    core = BrokerCore(BrokerConfig(rate=1e9, burst=10**9))
    shell = broker.BrokerShell(core, "127.0.0.1", port, port + 1, max_per_address=10**6)
    failure: list[BaseException] = []

    def clients() -> None:
        try:
            drive(zmq, m, port, count, gap)
        except BaseException as e:  # said by the main thread, after the loop stops
            failure.append(e)
        finally:
            shell.stopping = True
            shell._wake_w.send(b"x")  # the loop's poll returns

    thread = threading.Thread(target=clients)
    thread.start()
    shell.run()
    thread.join()
    shell.pub.setsockopt(zmq.LINGER, 0)
    shell.close()
    if failure:
        raise failure[0]


def drive(zmq, m, port: int, count: int, gap: float) -> None:
    """Join, make sure every SUB hears the broker, then the says one by one."""
    ctx = zmq.Context()
    subs, dealers, tokens = [], [], []
    try:
        for _ in range(SUBSCRIBERS):
            s = ctx.socket(zmq.SUB)
            s.connect(f"tcp://127.0.0.1:{port + 1}")
            s.setsockopt(zmq.SUBSCRIBE, m.BROADCAST_TOPIC)
            subs.append(s)
        for i in range(SENDERS):
            d = ctx.socket(zmq.DEALER)
            d.connect(f"tcp://127.0.0.1:{port}")
            d.send(m.encode(m.Hello(f"sender{i}")))
            if not d.poll(60_000):
                raise TimeoutError("no welcome")
            tokens.append(m.decode_reply([d.recv()]).resume)
            dealers.append(d)
        heard = [False] * SUBSCRIBERS
        deadline = time.monotonic() + 120
        n = 0
        while not all(heard):  # a subscription may still be on its way
            if time.monotonic() > deadline:
                raise TimeoutError("not every SUB heard the broker")
            dealers[0].send(m.encode(m.Say(f"warm-{n}", "warm", tokens[0])))
            n += 1
            time.sleep(0.05)
            for i, s in enumerate(subs):
                while s.poll(0):
                    s.recv()
                    heard[i] = True
        drain(subs + dealers, 200)
        for n in range(count):
            d = n % SENDERS
            dealers[d].send(m.encode(m.Say(f"m-{n}", f"bench:{n}:" + "x" * 50, tokens[d])))
            time.sleep(gap)
            drain(subs + dealers, 0)
    finally:
        for s in subs + dealers:
            s.close(0)
        ctx.term()


def drain(socks, wait_ms: int) -> None:
    for s in socks:
        while s.poll(wait_ms):
            s.recv()


# --- the parent: callgrind runs and their difference ----------------------------------


def main_thread_instructions(tree: Path, count: int, gap: float, work: Path) -> int:
    out = work / f"callgrind.{count}"
    cmd = ["valgrind", "--tool=callgrind", "--separate-threads=yes",
           f"--callgrind-out-file={out}", sys.executable, str(Path(__file__).resolve()),
           "--gap", str(gap), "--child", str(tree), str(count)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    if run.returncode != 0:
        raise RuntimeError(f"{tree}: {run.stderr[-2000:]}")
    for line in (work / f"callgrind.{count}-01").read_text(errors="replace").splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise RuntimeError(f"{tree}: no totals in callgrind's output")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        child(Path(args.child[0]), int(args.child[1]), args.gap)
        return 0
    if shutil.which("valgrind") is None:
        print("instructions.py needs valgrind (apt-get install valgrind)", file=sys.stderr)
        return 1
    n1, n2 = args.counts
    per_message: dict[str, list[float]] = {name: [] for name in args.trees}
    with tempfile.TemporaryDirectory(prefix="zchat-instructions-") as tmp:
        for _ in range(args.repeat):  # rounds: the trees take turns
            for name, tree in args.trees.items():
                a, b = (main_thread_instructions(tree, n, args.gap, Path(tmp)) for n in (n1, n2))
                per_message[name].append((b - a) / (n2 - n1))
                print(f"{name}: {per_message[name][-1]:,.0f} instructions per message",
                      file=sys.stderr, flush=True)
    print(f"| tree | broker thread, instructions per message (median) | each repeat |")
    print("|---|---|---|")
    for name, values in per_message.items():
        print(f"| {name} | {statistics.median(values):,.0f} | "
              + ", ".join(f"{v:,.0f}" for v in values) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
