"""zchat benchmark: throughput, latency, CPU cost, scale, and the limit to compare with.

    python bench/run.py                          # everything, ~10 minutes
    python bench/run.py --quick                  # smoke run, ~3 minutes
    python bench/run.py --scenario throughput --scenario latency
    python bench/run.py --targets zchat --variants zchat-db --scenario cpu
    python bench/run.py --scenario scale --scale-sizes 1000,5000

Starts real processes on loopback only: the broker under test (or a
baseline from baselines.py) and the load generator of loadgen.py. Prints
progress on stderr, the results table on stdout, and writes every figure as
JSON (``--json``, default bench/results.json) for bench/plot.py.

The scenarios that take targets (throughput, latency, cpu) also run zchat's
variants: the broker with ``--coalesce-ms 0`` (what sharing PUB frames
buys) and with ``--db`` (what the SQLite history costs), at the same load.

On a shared machine absolute figures move from run to run; the ratios of
zchat to the two baselines, measured in the same run under the same load
generator, are the figures to compare.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import common
from common import fmt, machine, table
import scenarios

SCENARIOS = ("throughput", "latency", "cpu", "scale", "profile", "gui")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Benchmark the zchat broker against libzmq's "
                                "forwarder and a bare Python loop (see bench/README.md).")
    p.add_argument("--scenario", action="append", choices=SCENARIOS,
                   help="run only this scenario (repeatable; default all)")
    main_kinds = ("zchat", *common.BASELINE_KINDS)
    variant_kinds = tuple(k for k in common.ZCHAT_OPTIONS if k != "zchat")
    p.add_argument("--targets", default=",".join(main_kinds),
                   help=f"comma-separated targets for throughput/latency/cpu "
                   f"(default {','.join(main_kinds)})")
    p.add_argument("--variants", default=",".join(variant_kinds),
                   help="zchat variants run next to the targets, in every scenario that "
                   f"takes targets (default {','.join(variant_kinds)}; '' for none)")
    p.add_argument("--quick", action="store_true", help="shorter trials and smaller scale steps")
    p.add_argument("--json", type=Path, default=common.BENCH / "results.json",
                   help="where to write the raw figures (default bench/results.json)")
    load = p.add_argument_group("load")
    load.add_argument("--senders", type=int, default=4, help="M sending sockets (default 4)")
    load.add_argument("--listeners", type=int, default=20,
                      help="N listening sockets for throughput (default 20)")
    load.add_argument("--latency-listeners", type=int, default=50,
                      help="listeners for the latency, cpu and profile runs (default 50)")
    load.add_argument("--listener-procs", type=int, default=2,
                      help="processes the listeners are spread over (default 2)")
    load.add_argument("--listener-nap-ms", type=float, default=1.0,
                      help="throughput only: listeners pause this long after a wake-up so "
                      "they read in batches and keep up with unbatched targets (default 1)")
    load.add_argument("--rates", default="100,1000",
                      help="msg/s of the latency scenario (default 100,1000)")
    load.add_argument("--cpu-rate", type=float, default=1000,
                      help="msg/s of the cpu and profile runs (default 1000)")
    load.add_argument("--start-rate", type=float, default=1000,
                      help="first rate of the throughput search (default 1000)")
    load.add_argument("--max-rate", type=float, default=256_000,
                      help="the throughput search stops doubling here")
    load.add_argument("--trial-seconds", type=float, help="each throughput trial (default 3)")
    load.add_argument("--fixed-seconds", type=float, help="each fixed-rate trial (default 10)")
    load.add_argument("--refine-steps", type=int, help="bisections after the first failure "
                      "(default 2)")
    scale = p.add_argument_group("scale")
    scale.add_argument("--scale-sizes", help="clients joined at once (default 1000,2500,5000)")
    scale.add_argument("--clients-per-proc", type=int, default=1000,
                       help="zchat clients per generator process (default 1000)")
    scale.add_argument("--kill-fraction", type=float, default=0.1,
                       help="share of clients killed to time the leaves (default 0.1)")
    scale.add_argument("--idle-seconds", type=float, help="idle window measured (default 10)")
    scale.add_argument("--gui-timeout", type=float, default=180,
                       help="longest bench/gui_burst.py may run (default 180 s)")
    args = p.parse_args(argv)
    quick = args.quick
    defaults = {"trial_seconds": 2 if quick else 3, "fixed_seconds": 3 if quick else 10,
                "refine_steps": 1 if quick else 2, "idle_seconds": 4 if quick else 10,
                "scale_sizes": "200,500" if quick else "1000,2500,5000"}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.scenarios = args.scenario or list(SCENARIOS)
    args.targets = [t for t in args.targets.split(",") if t]
    args.variants = [t for t in args.variants.split(",") if t and t not in args.targets]
    for t in args.targets + args.variants:
        if t not in common.TARGET_KINDS:
            p.error(f"unknown target {t!r}")
    args.rates = [float(r) for r in args.rates.split(",")]
    args.scale_sizes = [int(n) for n in args.scale_sizes.split(",")]
    args.settle_seconds = 1.0 if quick else 2.0
    args.storm_timeout = 120.0
    args.profile_idle = "profile" in args.scenarios
    args.silent = False
    args.progress = sys.stderr
    return args


def run(args) -> dict:
    results: dict = {"machine": machine(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                     "options": {k: v for k, v in vars(args).items()
                                 if k not in ("progress", "json", "scenario")},
                     "open_file_limit": common.raise_open_file_limit()}
    fixed_rates = sorted(set(args.rates if "latency" in args.scenarios else [])
                         | ({args.cpu_rate} if "cpu" in args.scenarios else set()))
    with scenarios.new_work_dir() as tmp:
        work = Path(tmp)
        if "throughput" in args.scenarios:
            say("throughput: M=%d senders -> N=%d listeners" % (args.senders, args.listeners))
            results["throughput"] = {k: scenarios.throughput(k, args, work)
                                     for k in args.targets + args.variants}
        if fixed_rates:
            say(f"fixed rates {fixed_rates} msg/s x {args.latency_listeners} listeners")
            results["fixed_rates"] = {k: scenarios.fixed_rates(k, args, fixed_rates, work)
                                      for k in args.targets + args.variants}
        if "profile" in args.scenarios:
            say(f"profile: broker at {args.cpu_rate:.0f} msg/s x {args.latency_listeners}")
            results["profile"] = scenarios.profile(args, work)
        if "scale" in args.scenarios:
            say(f"scale: {args.scale_sizes} clients")
            results["scale"] = scenarios.scale(args, work)
        if "gui" in args.scenarios:
            say("gui: bench/gui_burst.py")
            results["gui_burst"] = scenarios.gui_burst(args.gui_timeout)
    results["machine"]["load_average_at_end"] = os.getloadavg()
    results["ratios"] = ratios(results, args.cpu_rate)
    results["variants"] = variant_costs(results)
    results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    return results


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# --- ratios and the table ---------------------------------------------------------


def _fixed(results: dict, kind: str, rate: float) -> dict | None:
    for t in results.get("fixed_rates", {}).get(kind, []):
        if t["offered_rate"] == rate:
            return t
    return None


def _best(results: dict, kind: str) -> dict | None:
    return (results.get("throughput", {}).get(kind) or {}).get("best")


def _ratio(a, b):
    return a / b if a is not None and b else None


def ratios(results: dict, cpu_rate: float) -> dict:
    """zchat's figures over each baseline's, from this one run."""
    out = {}
    for base in ("c-forwarder", "python-loop"):
        z, b = _best(results, "zchat"), _best(results, base)
        zf, bf = _fixed(results, "zchat", cpu_rate), _fixed(results, base, cpu_rate)
        out[f"zchat/{base}"] = {
            "throughput": _ratio(z and z["achieved_rate"], b and b["achieved_rate"]),
            f"p99_at_{cpu_rate:.0f}": _ratio(zf and zf["latency"]["p99_ms"],
                                             bf and bf["latency"]["p99_ms"]),
            f"cpu_per_delivery_at_{cpu_rate:.0f}": _ratio(
                zf and zf["target_us_per_delivery"], bf and bf["target_us_per_delivery"]),
            f"cpu_per_msg_at_{cpu_rate:.0f}": _ratio(zf and zf["target_us_per_msg"],
                                                     bf and bf["target_us_per_msg"]),
        }
    return out


def variant_costs(results: dict) -> list[dict]:
    """Each zchat variant next to plain zchat at the same rate, same run."""
    out = []
    for kind, trials in results.get("fixed_rates", {}).items():
        if kind == "zchat" or kind not in common.ZCHAT_OPTIONS:
            continue
        for t in trials:
            z = _fixed(results, "zchat", t["offered_rate"])
            if z is None:
                continue
            out.append({
                "variant": kind, "options": " ".join(common.ZCHAT_OPTIONS[kind]),
                "rate": t["offered_rate"], "listeners": t["listeners"],
                **{f"{name}_{key}": src[key] for name, src in (("zchat", z), ("variant", t))
                   for key in ("target_us_per_msg", "target_us_per_delivery",
                               "messages_per_frame")},
                **{f"{name}_{key}": src["latency"][key] for name, src in (("zchat", z),
                                                                         ("variant", t))
                   for key in ("p50_ms", "p99_ms")},
                "cpu_ratio": _ratio(t["target_us_per_msg"], z["target_us_per_msg"]),
                "p99_ratio": _ratio(t["latency"]["p99_ms"], z["latency"]["p99_ms"]),
            })
    return out


def report(results: dict, args) -> str:
    parts = []
    if "throughput" in results:
        rows = []
        for kind, r in results["throughput"].items():
            best = r["best"]
            limit = "none (max rate reached)" if r["reached_max_rate"] else "; ".join(
                r["first_failure"]["failures"]) if r["first_failure"] else "-"
            if r["first_failure"] and r["first_failure"]["generator_saturated"]:
                limit += " [a generator process was saturated]"
            rows.append([kind, fmt(best and best["achieved_rate"], ".0f"),
                         fmt(best and best["deliveries_per_s"], ".0f"),
                         fmt(best and best["latency"]["p99_ms"], ".1f"),
                         fmt(best and best["target_cores"], ".2f"),
                         fmt(best and best["target_us_per_delivery"], ".1f"), limit])
        parts.append(f"### Throughput: {args.senders} senders -> {args.listeners} listeners, "
                     f"every message acked and delivered, p99 < {scenarios.P99_LIMIT_MS:.0f} ms\n\n"
                     + table(["target", "msg/s", "deliveries/s", "p99 ms", "target cores",
                              "CPU us/delivery", "what stopped the next step"], rows))
    if "fixed_rates" in results:
        rows = []
        for kind, trials in results["fixed_rates"].items():
            for t in trials:
                lat = t["latency"]
                rows.append([kind, f"{t['offered_rate']:.0f}", fmt(lat["p50_ms"], ".2f"),
                             fmt(lat["p99_ms"], ".2f"), fmt(lat["max_ms"], ".1f"),
                             fmt(t["target_us_per_msg"], ".0f"),
                             fmt(t["target_us_per_delivery"], ".1f"),
                             fmt(t["target_cores"], ".2f"),
                             fmt(t.get("messages_per_frame"), ".1f"),
                             fmt(t["target_memory"]["peak_rss"] / 2**20, ".0f"),
                             "ok" if t["passed"] else "FAIL: " + "; ".join(t["failures"])])
        parts.append(f"### Latency and CPU at fixed rates, {args.senders} senders -> "
                     f"{args.latency_listeners} listeners\n\n" + table(
                         ["target", "msg/s", "p50 ms", "p99 ms", "max ms", "CPU us/msg",
                          "CPU us/delivery", "cores", "msgs/PUB frame", "peak RSS MB",
                          "check"], rows))
    if results.get("ratios"):
        rows = [[name, *(fmt(v, ".2f") for v in r.values())]
                for name, r in results["ratios"].items()]
        keys = list(next(iter(results["ratios"].values())).keys())
        parts.append("### zchat as a ratio to each baseline (same run, same generator)\n\n"
                     + table(["ratio", *keys], rows))
    if results.get("variants"):
        rows = [[v["variant"], f"`{v['options']}`", f"{v['rate']:.0f}",
                 f"{fmt(v['zchat_target_us_per_msg'], '.0f')} -> "
                 f"{fmt(v['variant_target_us_per_msg'], '.0f')}",
                 fmt(v["cpu_ratio"], ".2f"),
                 f"{fmt(v['zchat_p99_ms'], '.2f')} -> {fmt(v['variant_p99_ms'], '.2f')}",
                 fmt(v["p99_ratio"], ".2f"),
                 f"{fmt(v['zchat_messages_per_frame'], '.1f')} -> "
                 f"{fmt(v['variant_messages_per_frame'], '.1f')}"]
                for v in results["variants"]]
        parts.append("### zchat variants against plain zchat (same rate, same run)\n\n" + table(
            ["variant", "options", "msg/s", "CPU us/msg zchat -> variant", "CPU ratio",
             "p99 ms zchat -> variant", "p99 ratio", "msgs/PUB frame"], rows))
    profiles = [results["profile"]] if "profile" in results else []
    profiles += [s["idle_profile"] for s in results.get("scale", []) if "idle_profile" in s]
    for prof in profiles:
        busy = f", busy {100 * prof['busy_share']:.0f}% of samples" if "busy_share" in prof else ""
        rows = [[name, f"{pct}"] for name, pct in prof["self_pct"]]
        parts.append(f"### Broker profile ({prof['tool']}, {prof['load']}{busy}): self time, "
                     "% of busy samples\n\n" + table(["function", "%"], rows))
    if "scale" in results:
        rows = [[str(s["clients"]), str(s["joined"]), fmt(s["join_storm_s"], ".1f"),
                 fmt(s["join_storm_broker_cpu_s"], ".1f"),
                 fmt(s["join_storm_generator_cores"], ".2f"),
                 fmt(100 * s["idle_broker_cores"], ".1f"), fmt(s["idle_generator_cores"], ".2f"),
                 fmt(s["rss_per_client_kb"], ".1f"),
                 f"{s['broker_open_files']} / {s['open_file_limit']}",
                 str(s["max_clients_by_open_files"]),
                 str(s["rejoins"]), f"{s['leaves_seen']}/{s['killed']}",
                 fmt(s["leave_p50_s"], ".2f"), fmt(s["leave_max_s"], ".2f"),
                 str(s["leaves_after_bound"])] for s in results["scale"]]
        parts.append("### Scale: clients joined at once, heartbeating every 1 s\n\n" + table(
            ["clients", "joined", "join storm s", "storm broker CPU s", "storm generator cores",
             "idle broker % core", "idle generator cores",
             "RSS KB/client", "broker open files", "max clients by fd limit", "rejoins",
             "leaves seen", "leave p50 s", "leave max s", "leaves after 3 s"], rows))
    if "gui_burst" in results:
        parts.append("### The window (bench/gui_burst.py)\n\n```\n"
                     + json.dumps(results["gui_burst"], indent=1) + "\n```")
    m = results["machine"]
    parts.append(f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, "
                 f"Linux {m['kernel']}, Python {m['python']}, pyzmq {m['pyzmq']}, "
                 f"libzmq {m['libzmq']}; load average (1/5/15 min) at start "
                 f"{', '.join(f'{x:.1f}' for x in m['load_average_at_start'])}, at end "
                 f"{', '.join(f'{x:.1f}' for x in m.get('load_average_at_end', []))}; "
                 f"{results['started']} to {results['finished']}.")
    return "\n\n".join(parts)



def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    common.unwind_on_signals()
    try:
        results = run(args)
    except KeyboardInterrupt:  # every process was stopped on the way out
        say("interrupted")
        return 130
    args.json.write_text(json.dumps(results, indent=1))
    print(report(results, args))
    say(f"raw figures: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
