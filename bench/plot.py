"""Draw bench/results.json as one PNG: the figures of README's table at a glance.

    pip install -r bench/requirements.txt
    python bench/plot.py [--json bench/results.json] [--out bench/results.png]

For run.py's results, four panels, each present when its scenario ran: the
throughput search (p99 latency against offered rate, per target), latency
percentiles at the fixed rates, broker CPU per delivery at the fixed rates,
and the scale test. For rawbench.py's (``--json bench/rawbench.json --out
bench/rawbench.png``), the same for zchat, Redis and the C forwarder under the
independent generator: CPU per delivery and latency at the fixed rates, the
saturation steps, and the joins.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402

BENCH = Path(__file__).resolve().parent
COLOURS = {"zchat": "tab:blue", "zchat-no-coalesce": "tab:cyan", "zchat-db": "tab:purple",
           "c-forwarder": "tab:green", "python-loop": "tab:orange", "redis": "tab:red"}


def plot_throughput(ax, results: dict) -> None:
    for kind, r in results["throughput"].items():
        trials = sorted(r["trials"], key=lambda t: t["offered_rate"])
        ax.plot([t["offered_rate"] for t in trials], [t["latency"]["p99_ms"] for t in trials],
                "o-", color=COLOURS.get(kind), label=kind)
        best = r["best"]
        if best:
            ax.plot(best["offered_rate"], best["latency"]["p99_ms"], "*", markersize=14,
                    color=COLOURS.get(kind))
    ax.axhline(50, color="red", linestyle="--", linewidth=1, label="p99 limit 50 ms")
    ax.set(xscale="log", yscale="log", xlabel="offered msg/s", ylabel="p99 latency, ms",
           title="Throughput search (star: highest passing rate)")
    ax.legend(fontsize=8)


def grouped_bars(ax, trials_by_kind: dict, draw) -> None:
    """One group of bars per fixed rate, one bar per target: ``draw(xs, kind,
    values_of, width)`` draws a target's bars, ``values_of(key)`` giving its
    figures per rate."""
    kinds = list(trials_by_kind)
    rates = sorted({t["offered_rate"] for trials in trials_by_kind.values() for t in trials})
    width = 0.8 / max(len(kinds), 1)
    for i, kind in enumerate(kinds):
        by_rate = {t["offered_rate"]: t for t in trials_by_kind[kind]}

        def values_of(key, by_rate=by_rate):
            return [key(by_rate[r]) if r in by_rate else 0 for r in rates]

        draw([j + i * width for j in range(len(rates))], kind, values_of, width)
    ax.set_xticks([j + width * (len(kinds) - 1) / 2 for j in range(len(rates))],
                  [f"{r:.0f} msg/s" for r in rates])
    ax.legend(fontsize=8)


def plot_latency(ax, results: dict) -> None:
    def draw(xs, kind, values_of, width):
        ax.bar(xs, values_of(lambda t: t["latency"]["p99_ms"]), width,
               color=COLOURS.get(kind), alpha=0.35)
        ax.bar(xs, values_of(lambda t: t["latency"]["p50_ms"]), width,
               color=COLOURS.get(kind), label=kind)

    grouped_bars(ax, results["fixed_rates"], draw)
    listeners = next(iter(results["fixed_rates"].values()))[0]["listeners"]
    ax.set(ylabel="ms", title=f"Latency p50 (solid) and p99 (light), {listeners} listeners")


def plot_cpu(ax, results: dict) -> None:
    def draw(xs, kind, values_of, width):
        ax.bar(xs, values_of(lambda t: t["target_us_per_delivery"]), width,
               color=COLOURS.get(kind), label=kind)

    grouped_bars(ax, results["fixed_rates"], draw)
    ax.set(ylabel="CPU µs per delivery", title="Server CPU per delivery (user+sys)")


def plot_scale(ax, results: dict) -> None:
    rows = results["scale"]
    clients = [s["clients"] for s in rows]
    ax.plot(clients, [100 * s["idle_broker_cores"] for s in rows], "o-", label="idle broker, % of a core")
    ax.plot(clients, [s["join_storm_s"] or 0 for s in rows], "s-", label="join storm, s")
    ax.plot(clients, [s["leave_max_s"] or 0 for s in rows], "^-", label="last leave after kill, s")
    ax.axhline(20, color="red", linestyle="--", linewidth=1, label="20% target")
    ax.set(xlabel="clients joined at once", title="Scale (zchat broker)")
    ax.legend(fontsize=8)


def plot_raw_cpu(ax, results: dict) -> None:
    def draw(xs, kind, values_of, width):
        ax.bar(xs, values_of(lambda t: t["server_us_per_delivery"]), width,
               color=COLOURS.get(kind), alpha=0.45)
        ax.bar(xs, values_of(lambda t: t["server_user_us_per_delivery"]), width,
               color=COLOURS.get(kind), label=kind)

    grouped_bars(ax, results["raw_fixed"], draw)
    listeners = next(iter(results["raw_fixed"].values()))[0]["listeners"]
    ax.set(ylabel="CPU µs per delivery", title=f"Server CPU per delivery, {listeners} listeners "
           "(solid: user, light: user+sys)")


def plot_raw_latency(ax, results: dict) -> None:
    def draw(xs, kind, values_of, width):
        ax.bar(xs, values_of(lambda t: t["latency"]["p99_ms"] or 0), width,
               color=COLOURS.get(kind), alpha=0.35)
        ax.bar(xs, values_of(lambda t: t["latency"]["p50_ms"] or 0), width,
               color=COLOURS.get(kind), label=kind)

    grouped_bars(ax, results["raw_fixed"], draw)
    ax.set(ylabel="ms", yscale="log", title="Latency p50 (solid) and p99 (light)")


def plot_raw_saturation(ax, results: dict) -> None:
    for kind, r in results["raw_saturation"].items():
        trials = sorted(r["trials"], key=lambda t: t["offered_rate"])
        ax.plot([t["offered_rate"] for t in trials], [t["latency"]["p99_ms"] for t in trials],
                "o", color=COLOURS.get(kind), label=kind)
        if r["best"]:
            ax.plot(r["best"]["offered_rate"], r["best"]["latency"]["p99_ms"], "*",
                    markersize=14, color=COLOURS.get(kind))
    listeners = next(iter(results["raw_saturation"].values()))["listeners"]
    ax.axhline(50, color="red", linestyle="--", linewidth=1, label="p99 limit 50 ms")
    ax.set(xscale="log", yscale="log", xlabel="offered msg/s", ylabel="p99 latency, ms",
           title=f"Rate steps x {listeners} listeners (star: highest passing)")
    ax.legend(fontsize=8)


def plot_raw_joins(ax, results: dict) -> None:
    def rate(s):  # joins per second: a step cut at the timeout still shows its pace
        return s["joined"] / s["wall_s"] if s["wall_s"] else 0

    for kind, steps in results["raw_joins"].items():
        for mode, style in (("storm", "o-"), ("seq", "s--")):
            rows = [s for s in steps if s["mode"] == mode]
            ax.plot([s["clients"] for s in rows], [rate(s) for s in rows], style,
                    color=COLOURS.get(kind), label=f"{kind} {mode}")
            cut = [s for s in rows if not s["complete"]]
            ax.plot([s["clients"] for s in cut], [rate(s) for s in cut], "x",
                    color="black", markersize=10)
    ax.set(yscale="log", xlabel="clients joining one room", ylabel="joins per second",
           title="Joins: at once (solid), one after another (dashed); x: cut at the timeout")
    ax.legend(fontsize=7)


PANELS = [("throughput", plot_throughput), ("fixed_rates", plot_latency),
          ("fixed_rates", plot_cpu), ("scale", plot_scale),
          ("raw_fixed", plot_raw_cpu), ("raw_fixed", plot_raw_latency),
          ("raw_saturation", plot_raw_saturation), ("raw_joins", plot_raw_joins)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path, default=BENCH / "results.json")
    p.add_argument("--out", type=Path, default=BENCH / "results.png")
    args = p.parse_args(argv)
    results = json.loads(args.json.read_text())
    panels = [draw for key, draw in PANELS if results.get(key)]
    if not panels:
        raise SystemExit(f"{args.json}: no scenario figures to plot")
    cols = min(2, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 4.8 * rows), squeeze=False)
    for ax, draw in zip(axes.flat, panels):
        draw(ax, results)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    m = results["machine"]
    fig.suptitle(f"zchat benchmark{' (independent generator)' if 'generator' in results else ''}, "
                 f"{results['started']}: {m['cpu']}, {m['cores']} cores, "
                 f"Python {m['python']}, libzmq {m['libzmq']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
