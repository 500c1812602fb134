"""bench/out/compare.png: GFLOP/s per case and implementation of a compare.py run, one panel per
mode, log scale (the implementations differ by up to two orders of magnitude)."""
from __future__ import annotations

import sys

import cases as C


def plot(result, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not available: no plot", file=sys.stderr)
        return False
    recs = [r for r in result["records"] if r.get("gflops")]
    if not recs:
        return False
    impls = [i for i in C.IMPLS if any(r["impl"] == i for r in recs)]
    colors = {"longattn": "tab:red", "sdpa": "tab:blue", "flex": "tab:green"}
    modes = [m for m in C.MODES if any(r["mode"] == m for r in recs)]
    fig, axes = plt.subplots(len(modes), 1, figsize=(max(8, 1.6 * len(result["cases"]) + 3), 4.2 * len(modes)),
                             squeeze=False)
    for ax, mode in zip(axes[:, 0], modes):
        names = [c["name"] for c in result["cases"] if any(r["case"] == c["name"] and r["mode"] == mode for r in recs)]
        here = [i for i in impls if any(r["impl"] == i and r["mode"] == mode for r in recs)]
        width = 0.8 / len(here)
        for j, impl in enumerate(here):
            xs, ys = [], []
            for i, n in enumerate(names):
                r = next((r for r in recs if r["case"] == n and r["mode"] == mode and r["impl"] == impl), None)
                if r:
                    xs.append(i + (j - (len(here) - 1) / 2) * width)
                    ys.append(r["gflops"])
            bars = ax.bar(xs, ys, width, label=impl, color=colors.get(impl))
            for b, y in zip(bars, ys):
                ax.annotate(f"{y:.0f}" if y >= 10 else f"{y:.1f}", (b.get_x() + b.get_width() / 2, y),
                            ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=15, ha="right", fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("GFLOP/s (visible area)")
        ax.set_title(f"{mode}: higher is better")
        ax.legend(fontsize=8)
        ax.grid(axis="y", which="both", alpha=0.3)
    m = result["meta"]
    fig.suptitle(f"longattn vs SDPA vs FlexAttention - {m['host_cpu']}, {m['torch_threads']} threads, "
                 f"{m['dtype']}, torch {m['torch']}, {m['date'][:10]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
