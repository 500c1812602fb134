"""Ring attention on CPU with gloo against one process doing the same global attention.

    python bench/bench_ring.py                       # 2 ranks, L=4096, about 1 minute
    python bench/bench_ring.py --seq 8192 --reps 5
    python bench/bench_ring.py --plan-only           # just the schedule table (no timing)

Each rank gets cores / world torch threads; the single-process baseline runs on rank 0 with all
the cores while the other ranks wait. Ring and baseline repetitions alternate round-robin
(bench/timing.py, after a warm-up call of each), so load drift on a shared machine hits both
alike; the median is reported. A ring time is the slowest rank's.
ratio = ring / single: 1.0 means the ring costs what one process with the same cores costs;
above 1 is communication, merging, per-hop overhead and load imbalance not hidden by the
overlap. "blocked in waits" is the time the slowest rank spent waiting for
messages (communication the overlap did not hide, plus waiting for a slower peer); "compute
only" runs each rank's kernel calls and merges with all blocks already local.

The second table needs no processes: it is the mask-aware schedule (longattn.ring.plan) at
larger world sizes, i.e. how many (rank, block) hops and K/V transfers a window skips.
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import longattn
from longattn import ring
from longattn.ring.comm import Comm
from longattn.ring.compute import Accumulator, Kernel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import timing  # noqa: E402

CASES = [
    # name, layout, mode, options
    ("causal", "zigzag", "ring", dict(causal=True)),
    ("causal", "contiguous", "ring", dict(causal=True)),
    ("causal", "stripe", "ring", dict(causal=True)),
    ("causal", "zigzag", "allgather", dict(causal=True)),
    ("full", "zigzag", "ring", dict(causal=False)),
    ("window L/8", "contiguous", "ring", "win8"),
    ("window L/8", "zigzag", "ring", "win8"),
    ("lambda L/8 + 4 sinks", "contiguous", "ring", "lambda8"),
]


def _options(spec, L):
    if spec == "win8":
        return dict(causal=True, window=(L // 8 - 1, 0))
    if spec == "lambda8":
        return dict(causal=True, window=(L // 8 - 1, 0), sinks=4)
    return spec


def _median_ms(xs):
    return 1e3 * statistics.median(xs)


def _count_waits():
    """Time spent blocked in the ring's waits: what the overlap failed to hide."""
    waited = [0.0]
    inner = Comm.wait

    def wait(self, works, what, **kw):
        t0 = time.perf_counter()
        inner(self, works, what, **kw)
        waited[0] += time.perf_counter() - t0

    Comm.wait = wait
    return waited


def _worker(rank, world, store, args):
    waited = _count_waits()
    cores = os.cpu_count() or 1
    torch.set_num_threads(max(1, cores // world))
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=600))
    g = torch.Generator().manual_seed(0)
    B, L, H, Hk, D = 1, args.seq, args.heads, args.kv_heads, args.dim
    dtype = getattr(torch, args.dtype)
    q, k, v, do = (torch.randn(B, L, h, D, generator=g, dtype=dtype) for h in (H, Hk, Hk, H))
    rows = []
    for name, layout, mode, spec in CASES:
        opts = _options(spec, L)
        local = [ring.shard(t, layout=layout) for t in (q, k, v, do)]
        ql, kl, vl = (t.requires_grad_() for t in local[:3])
        qf, kf, vf = (t.clone().requires_grad_() for t in (q, k, v))

        def ring_fwd():
            with torch.no_grad():
                longattn.ring_attention(ql, kl, vl, layout=layout, mode=mode, **opts)

        def ring_fwd_bwd():
            out = longattn.ring_attention(ql, kl, vl, layout=layout, mode=mode, **opts)
            out.backward(local[3])

        p = ring.plan(L, world, layout, causal=opts.get("causal", True),
                      window=opts.get("window"), sinks=opts.get("sinks", 0))
        blocks = [(ring.shard(k, layout=layout, rank=o, world_size=world),
                   ring.shard(v, layout=layout, rank=o, world_size=world)) for o in range(world)]
        kern = Kernel(opts.get("causal", True), D ** -0.5, 0.0, 0.0, None)

        def compute_only():
            # This rank's kernel calls and merges with every block already local: the ring's
            # forward minus communication (and minus the op's bookkeeping).
            with torch.no_grad():
                acc = Accumulator(ql)
                for o, (kb, vb) in enumerate(blocks):
                    for c in p.calls[rank][o]:
                        out, lse = kern.fwd(ql[:, c.q0:c.q1], kb[:, c.k0:c.k1],
                                            vb[:, c.k0:c.k1], c)
                        acc.add(c.q0, c.q1, out, lse)

        def single_fwd():
            with torch.no_grad():
                longattn.attention(qf, kf, vf, **opts)

        def single_fwd_bwd():
            longattn.attention(qf, kf, vf, **opts).backward(do)

        def timed_ring(fn):
            # the slowest rank's time and its time blocked in waits
            dist.barrier()
            waited[0] = 0.0
            both = torch.tensor([timing.wall(fn), waited[0]], dtype=torch.float64)
            dist.all_reduce(both, op=dist.ReduceOp.MAX)
            ring_waits.append(both[1].item())
            return both[0].item()

        def timed_single(fn):
            dist.barrier()
            dt = 0.0
            if rank == 0:
                torch.set_num_threads(cores)
                dt = timing.wall(fn)
                torch.set_num_threads(max(1, cores // world))
            dist.barrier()
            return dt

        ring_waits, rf_waits = [], []

        def rf():
            dt = timed_ring(ring_fwd)
            rf_waits.append(ring_waits[-1])
            return dt

        fns = dict(rf=rf, sf=lambda: timed_single(single_fwd), cf=lambda: timed_ring(compute_only),
                   rb=lambda: timed_ring(ring_fwd_bwd), sb=lambda: timed_single(single_fwd_bwd))
        # self-timed (barriers, the slowest rank's time); a fixed count, so that every rank
        # makes the same calls in the same order
        measured = [timing.Measurement(fn, name=key, max_reps=args.reps, self_timed=True)
                    for key, fn in fns.items()]
        timing.measure_all(measured)
        times = {m.name: m.times for m in measured}
        times["wf"] = rf_waits[1:]  # the first was the warm-up's
        ms = {key: _median_ms(x) for key, x in times.items()}
        rows.append((name, layout, mode, ms, p))
    if rank == 0:
        _print_timing(rows, args, world, cores)
    dist.destroy_process_group()


def _print_timing(rows, args, world, cores):
    print(f"\nring attention vs one process, CPU gloo, {world} ranks x "
          f"{max(1, cores // world)} threads vs 1 process x {cores} threads; "
          f"B=1 L={args.seq} H={args.heads} Hkv={args.kv_heads} D={args.dim} {args.dtype}, "
          f"median of {args.reps}\n")
    print("| mask | layout | mode | single fwd ms | ring fwd ms | fwd ratio | ring fwd blocked "
          "in waits ms | ring fwd compute only ms | single fwd+bwd ms | ring fwd+bwd ms "
          "| fwd+bwd ratio | hops computed | transfers | K/V traffic |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, layout, mode, ms, p in rows:
        transfers = (f"{p.transfers}/{world * (world - 1)}" if mode == "ring"
                     else "all-gather")
        traffic = f"{100 * p.traffic_fraction:.0f}%" if mode == "ring" else "100%"
        print(f"| {name} | {layout} | {mode} | {ms['sf']:.1f} | {ms['rf']:.1f} | "
              f"{ms['rf'] / ms['sf']:.2f} | {ms['wf']:.1f} | {ms['cf']:.1f} | {ms['sb']:.1f} | "
              f"{ms['rb']:.1f} | {ms['rb'] / ms['sb']:.2f} | {p.computed_hops}/{p.hops} | "
              f"{transfers} | {traffic} |")


def print_plan_table(seq=131072):
    print(f"\nmask-aware schedule (longattn.ring.plan), L={seq}, causal: hops = (rank, block) "
          "pairs incl. the own block; transfers = K/V block sends in the forward; traffic = K/V "
          "rows sent / a full ring's (W - 1) * L\n")
    print("| window | layout | W | hops skipped | transfers skipped | K/V traffic "
          "| max blocks per rank |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for window in (None, 8192, 1024):
        for layout in ("contiguous", "zigzag"):
            for W in (2, 4, 8, 16, 64):
                p = ring.plan(seq, W, layout, causal=True,
                              window=None if window is None else (window - 1, 0))
                per_rank = max(sum(1 for c in row if c) for row in p.calls)
                print(f"| {'none' if window is None else window} | {layout} | {W} | "
                      f"{100 * p.skipped_hop_fraction:.0f}% | "
                      f"{100 * p.skipped_transfer_fraction:.0f}% | "
                      f"{100 * p.traffic_fraction:.1f}% | {per_rank}/{W} |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float64"))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--plan-only", action="store_true")
    args = ap.parse_args(argv)
    if not args.plan_only:
        with tempfile.TemporaryDirectory() as d:
            mp.spawn(_worker, args=(args.world, os.path.join(d, "store"), args),
                     nprocs=args.world)
    print_plan_table()


if __name__ == "__main__":
    sys.exit(main())
