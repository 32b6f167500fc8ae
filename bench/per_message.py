"""The broker's per-message cost and latency, side by side with other brokers, in one run.

    python bench/per_message.py                            # this tree and the C forwarder
    python bench/per_message.py --tree before=OTHER_CHECKOUT --repeat 3
    python bench/per_message.py --throughput --profile

For the work on what a message costs the broker (CPU per delivery, p50
latency, highest rate): the fixed-rate trials of run.py (4 senders, 50
listeners, 100 and 1,000 msg/s) and optionally its throughput search (20
listeners), for one or more source trees of zchat (``--tree NAME=DIR``: a
checkout of another commit, to compare before and after on a shared
machine) and the baselines, taking turns, each trial repeated. With
``--profile`` py-spy samples each zchat broker during its 1,000 msg/s
trials and the top functions are printed.

Prints a table on stdout (medians of the repeats, and each repeat) and
writes every figure to ``--json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import common
import scenarios
from common import ROOT, LineReader, Target, _spawn, free_port_pair, zchat_broker_args

# Starts tried on fresh ports: on a shared machine another process may take
# a free port between the check and the bind.
START_ATTEMPTS = 3


class RetryingTarget(Target):
    """A target that starts again on other ports when its ports were taken."""

    def start(self, timeout: float = 15) -> "RetryingTarget":
        for attempt in range(START_ATTEMPTS):
            try:
                return self.start_once(timeout)
            except AssertionError:  # it never said it listens
                self.stop()
                if attempt == START_ATTEMPTS - 1:
                    raise
                self.port = free_port_pair()
                self.pub_port = self.port + 1
        return self

    def start_once(self, timeout: float) -> "RetryingTarget":
        return super().start(timeout)


class TreeTarget(RetryingTarget):
    """The zchat broker of another source tree (its own broker.py and modules)."""

    def __init__(self, tree: Path, options: list[str], wrapper: list[str] | None = None,
                 work_dir: Path | None = None):
        super().__init__("zchat", wrapper, work_dir)
        self.tree = tree
        self.options = options

    def start_once(self, timeout: float) -> "TreeTarget":
        ports = ["--port", str(self.port), "--pub-port", str(self.pub_port)]
        # The script's own folder comes first on sys.path: the tree's modules.
        program = [str(self.tree / "broker.py"), *ports, *zchat_broker_args(), *self.options]
        self.proc = _spawn([*self.wrapper, *program], stderr=subprocess.PIPE)
        self.log = LineReader(self.proc.stderr)
        self.log.wait_for(lambda line: "listening" in line, timeout, "zchat to listen")
        return self


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tree", action="append", default=[], metavar="NAME=DIR",
                   help="a zchat source tree to measure (repeatable; default zchat=this tree)")
    p.add_argument("--options", action="append", default=[], metavar="NAME=OPTIONS",
                   help="broker options for the tree NAME, e.g. 'fast=--backlog-requests 0'")
    p.add_argument("--baselines", default="c-forwarder",
                   help="comma-separated baselines of bench/baselines.py (default c-forwarder)")
    p.add_argument("--rates", default="100,1000", help="msg/s of the fixed-rate trials")
    p.add_argument("--seconds", type=float, default=10, help="each fixed-rate trial (default 10)")
    p.add_argument("--repeat", type=int, default=2, help="rounds of every trial (default 2)")
    p.add_argument("--throughput", action="store_true", help="also the throughput search")
    p.add_argument("--profile", action="store_true", help="py-spy on zchat at the highest rate")
    p.add_argument("--senders", type=int, default=4)
    p.add_argument("--listeners", type=int, default=20, help="for throughput (default 20)")
    p.add_argument("--latency-listeners", type=int, default=50)
    p.add_argument("--json", type=Path, default=common.BENCH / "per_message.json")
    args = p.parse_args(argv)
    trees = dict(t.split("=", 1) for t in args.tree) or {"zchat": str(ROOT)}
    args.trees = {name: Path(d).resolve() for name, d in trees.items()}
    args.options = {name: opts.split() for name, opts in (o.split("=", 1) for o in args.options)}
    args.kinds = [*args.trees, *(b for b in args.baselines.split(",") if b)]
    args.rates = [float(r) for r in args.rates.split(",")]
    # What scenarios.py reads from run.py's options.
    args.listener_procs, args.listener_nap_ms = 2, 1.0
    args.fixed_seconds, args.trial_seconds, args.refine_steps = args.seconds, 3, 2
    args.start_rate, args.max_rate = 1000.0, 256_000.0
    args.silent, args.progress = False, sys.stderr
    return args


def make_target(trees: dict[str, Path], options: dict[str, list[str]]):
    """scenarios.Target's stand-in: a tree's broker for a tree's name."""
    def target(kind: str, wrapper=None, work_dir=None) -> Target:
        if kind in trees:
            return TreeTarget(trees[kind], options.get(kind, []), wrapper, work_dir)
        return RetryingTarget(kind, wrapper, work_dir)
    return target


def fixed_round(kind: str, args, work: Path) -> list[dict]:
    spy = None
    if args.profile and kind in args.trees:  # on PATH, or beside this Python
        spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    out = []
    with scenarios._rig(kind, args, args.latency_listeners, work) as rig:
        for rate in args.rates:
            rig.settle()
            profiler = None
            if spy and rate == max(args.rates):
                profiler = scenarios.PySpy(spy, rig.target.pid, args.seconds + 2,
                                           work / f"profile-{kind}-{time.monotonic_ns()}.txt")
                time.sleep(1.0)  # py-spy attaches
            t = rig.trial(rate, args.seconds)
            t["target"] = kind
            if profiler is not None:
                t["profile"] = profiler.result(scenarios._load_label(t))
            print(scenarios._trial_line(t), file=sys.stderr, flush=True)
            out.append(t)
    return out


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def report(results: dict, args) -> str:
    lines = ["| target | msg/s | p50 ms | p99 ms | CPU us/msg | CPU us/delivery | msgs/frame "
             "| each repeat: us/delivery, p50 |", "|---|---|---|---|---|---|---|---|"]
    for kind in args.kinds:
        for rate in args.rates:
            ts = [t for t in results["fixed"] if t["target"] == kind and t["offered_rate"] == rate]
            lines.append("| " + " | ".join([
                kind, f"{rate:.0f}",
                f"{median(t['latency']['p50_ms'] for t in ts):.2f}",
                f"{median(t['latency']['p99_ms'] for t in ts):.2f}",
                f"{median(t['target_us_per_msg'] for t in ts):.0f}",
                f"{median(t['target_us_per_delivery'] for t in ts):.2f}",
                f"{median(t['messages_per_frame'] for t in ts) or 0:.2f}",
                "; ".join(f"{t['target_us_per_delivery']:.2f}, {t['latency']['p50_ms']:.2f}"
                          + ("" if t["passed"] else " FAIL") for t in ts)]) + " |")
    for kind, runs in results.get("throughput", {}).items():
        best = [r["best"]["achieved_rate"] if r["best"] else None for r in runs]
        lines.append(f"\nthroughput x {args.listeners} listeners, {kind}: "
                     + ", ".join("-" if b is None else f"{b:.0f}" for b in best) + " msg/s")
    for t in results["fixed"]:
        if "profile" in t:
            top = ", ".join(f"{name} {pct}%" for name, pct in t["profile"]["self_pct"][:12])
            lines.append(f"\nprofile {t['target']} ({t['profile']['load']}, busy "
                         f"{100 * t['profile']['busy_share']:.0f}%): {top}")
    return "\n".join(lines)



def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    common.unwind_on_signals()
    common.raise_open_file_limit()
    scenarios.Target = make_target(args.trees, args.options)
    results: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "fixed": [],
                     "trees": {k: str(v) for k, v in args.trees.items()}}
    with scenarios.new_work_dir() as tmp:
        work = Path(tmp)
        for _ in range(args.repeat):  # rounds: every target in turn, so drift hits all
            for kind in args.kinds:
                results["fixed"] += fixed_round(kind, args, work)
            if args.throughput:
                for kind in args.kinds:
                    r = scenarios.throughput(kind, args, work)
                    results.setdefault("throughput", {}).setdefault(kind, []).append(r)
    results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    args.json.write_text(json.dumps(results, indent=1, default=str))
    print(report(results, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
