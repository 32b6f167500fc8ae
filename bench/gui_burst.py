"""What the chat window costs idle, and how it copes with a burst of messages.

    python bench/gui_burst.py [--messages 10000] [--idle-seconds 10]
                              [--json bench/results/gui_burst.json]

Starts a broker on free loopback ports, an Xvfb screen when DISPLAY is unset
(needs Debian's xvfb), and the real chat window (gui_client.ChatWindow) in
this process, joined as "reader". A command-line client then sends the
burst (the broker's per-user rate limit lifted, so it comes at once), and
Tk's own main loop runs while a 10 ms probe timer records how late each of
its ticks comes: the longest gap is the longest time the window could not
redraw or take a key press.

Three scenarios:
  idle    nothing happens for --idle-seconds (the broker's heartbeats
          aside) while Tk's main loop runs: the CPU the whole process
          takes (every thread: Tk's, the session's, libzmq's), as a share
          of one core, and the Tk thread's own part.
  live    the sender pipes the lines; the window shows them as they arrive.
  queued  the window's loop is held until every message waits in the
          session's queue, then released: the worst case of a burst.

Figures: idle CPU; time to show the burst, and the longest main-loop stall.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import tkinter as tk
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from common import UNLIMITED_RATE_ARGS  # noqa: E402  (bench/, this script's folder)
from gui_client import App  # noqa: E402
from procs import Broker, Client, wait_until  # noqa: E402
from xvfb import Xvfb  # noqa: E402

PROBE_MS = 10


def open_window(root: tk.Tk, broker: Broker):
    app = App(root, "127.0.0.1", broker.port, "reader")
    deadline = time.monotonic() + 15
    while app.chat is None:
        if time.monotonic() > deadline:
            raise RuntimeError("the window did not join")
        root.update()
        time.sleep(0.01)
    return app.chat


def start_burst(broker: Broker, count: int, sender: str) -> Client:
    # --announce: the sender joins and leaves visibly, which the scenarios
    # below wait for (a plain send is quiet)
    client = Client(broker, "send", "--announce", "--timeout", "120", name=sender,
                    stdin=subprocess.PIPE)
    client.proc.stdin.write("".join(f"{sender} line {i} of a burst\n" for i in range(count)))
    client.proc.stdin.close()
    return client


def run_loop_until_shown(root: tk.Tk, window, target_lines: int) -> dict:
    """Tk's main loop until ``target_lines`` lines were shown; the probe's figures."""
    started = last = time.perf_counter()
    gaps: list[float] = []

    def probe() -> None:
        nonlocal last
        now = time.perf_counter()
        gaps.append(now - last)
        last = now
        if window.lines_added >= target_lines:
            root.quit()
        else:
            root.after(PROBE_MS, probe)

    root.after(PROBE_MS, probe)
    root.mainloop()
    gaps.sort()
    return {"seconds_to_show": round(last - started, 3),
            "longest_stall_ms": round(1000 * gaps[-1], 1),
            "p99_tick_gap_ms": round(1000 * gaps[int(0.99 * (len(gaps) - 1))], 1),
            "probe_period_ms": PROBE_MS}


def idle_scenario(root: tk.Tk, window, seconds: float) -> dict:
    """Tk's main loop for ``seconds`` with nothing to show; the CPU it took."""
    # Let the join's own events (earlier messages, the user list) settle first.
    wait_until(lambda: root.update() or window.session.events.empty(), 10, "a quiet window")
    process_before, tk_before = time.process_time(), time.thread_time()
    wall_before = time.perf_counter()
    root.after(round(1000 * seconds), root.quit)
    root.mainloop()
    wall = time.perf_counter() - wall_before
    process_cpu = time.process_time() - process_before
    tk_cpu = time.thread_time() - tk_before
    return {"seconds": round(wall, 2),
            "cpu_ms": round(1000 * process_cpu, 1),
            "percent_of_a_core": round(100 * process_cpu / wall, 2),
            "tk_thread_cpu_ms": round(1000 * tk_cpu, 1)}


def live_scenario(root: tk.Tk, window, broker: Broker, count: int) -> dict:
    target = window.lines_added + count + 1  # + the sender's join line
    sender = start_burst(broker, count, "live")
    figures = run_loop_until_shown(root, window, target)
    sender.wait(120)
    # Its leave too, so the next scenario starts from a quiet window.
    wait_until(lambda: root.update() or "live" not in window.users, 30, "the sender to leave")
    return figures


def queued_scenario(root: tk.Tk, window, broker: Broker, count: int) -> dict:
    target = window.lines_added + count + 1
    sender = start_burst(broker, count, "queued")
    # Tk's loop does not run here: the session thread fills the queue alone.
    wait_until(lambda: window.session.events.qsize() >= count + 1, 120, "the burst to queue",
               interval=0.1)
    sender.wait(120)
    return run_loop_until_shown(root, window, target)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--messages", type=int, default=10_000)
    p.add_argument("--idle-seconds", type=float, default=10.0)
    p.add_argument("--json", type=Path, help="also write the figures to this file")
    args = p.parse_args()
    with ExitStack() as cleanup:
        if not os.environ.get("DISPLAY"):
            xvfb = Xvfb(shutil.which("Xvfb") or sys.exit("Xvfb is needed (apt-get install xvfb)"))
            cleanup.callback(xvfb.stop)
            os.environ["DISPLAY"] = xvfb.display
        # The per-user rate limit (200 msg/s by default) would pace the burst
        # into a trickle: lifted, as in the rest of bench/.
        broker = Broker("--history", str(2 * args.messages), *UNLIMITED_RATE_ARGS).start()
        cleanup.callback(broker.kill)
        root = tk.Tk()
        cleanup.callback(root.destroy)
        window = open_window(root, broker)
        figures = {"messages": args.messages,
                   "idle": idle_scenario(root, window, args.idle_seconds),
                   "live": live_scenario(root, window, broker, args.messages),
                   "queued": queued_scenario(root, window, broker, args.messages)}
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
