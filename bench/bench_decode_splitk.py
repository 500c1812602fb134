"""Decode / short-query forward against a long context on CPU: split-K on (the automatic rule,
csrc/cpu/key_split.h) against off (split-K 0 through longattn._C._set_cpu_tuning, the unsplit
per-item path).

    PYTHONPATH=python python bench/bench_decode_splitk.py --threads 2 --lk 32768

Prints a markdown table of milliseconds per call, median and min, of --rounds x --reps calls per
setting. The two settings alternate call by call (bench/timing.py), so a load change on a shared
machine hits both alike; the speedup (median) is the median of the per-round ratios. On a loaded
machine the split's parallel region can wait a scheduler tick for a busy core (the median shows
it, the min mostly not), while the unsplit single-item call runs on the calling thread alone.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

import longattn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import core  # noqa: E402
import timing  # noqa: E402


def split_setting(setting):
    """Sets the CPU split-K override (csrc/cpu/tuning.h; "auto": none, the automatic rule),
    untimed before each call."""
    def reset():
        longattn._C._set_cpu_tuning(0, 0, -1 if setting == "auto" else int(setting))
    return reset


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lk", type=int, default=32768)
    ap.add_argument("--lq", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--heads", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--rounds", type=int, default=5, help="with --reps: timed calls per setting")
    ap.add_argument("--reps", type=int, default=5, help="with --rounds: timed calls per setting")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"threads={args.threads} Lk={args.lk} fp32, causal; ms per call, median (min)")
    print("| Lq | H | D | split off | split on | speedup (median) | speedup (min) |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for D in args.dims:
        for H in args.heads:
            k = torch.randn(1, args.lk, H, D)
            v = torch.randn(1, args.lk, H, D)
            for Lq in args.lq:
                q = torch.randn(1, Lq, H, D)
                call = lambda: longattn.attention(q, k, v, causal=True)  # noqa: E731
                m = {s: timing.Measurement(call, name=s, max_reps=args.rounds * args.reps, reset=split_setting(s))
                     for s in ("0", "auto")}
                timing.measure_all(list(m.values()))
                longattn._C._set_cpu_tuning(0, 0, -1)
                off, on = (m[s].median * 1e3 for s in ("0", "auto"))
                off_min, on_min = (min(m[s].times) * 1e3 for s in ("0", "auto"))
                print(f"| {Lq} | {H} | {D} | {off:.2f} ({off_min:.2f}) | {on:.2f} ({on_min:.2f}) "
                      f"| {core.ratio(m['0'], m['auto']):.2f}x | {off_min / on_min:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
