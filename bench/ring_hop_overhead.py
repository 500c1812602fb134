"""Per-hop cost of the ring machinery on one device, without communication.

    python bench/ring_hop_overhead.py                       # CPU, L=2048, about a minute
    python bench/ring_hop_overhead.py --device cuda --single-gpu   # one GPU, L=16384 bf16 d128

The ring's own forward and backward (longattn.ring.ring_mode) run for every rank of a simulated
world of W ranks, one rank after the other, in one process: the exchange hands each rank the
K/V rows (and dK/dV shares) its messages would carry, made before the clock starts, so what is
timed is the kernel calls of the schedule, the fp32 merges, the dK/dV accumulation, the send
copies and the Python of the hop loop, i.e. a real ring minus the transfers (which a real ring
overlaps with compute). Summed over the W ranks this is the same global attention as one call
over the whole sequence:

    single        one attention call (forward, or backward) over the whole sequence
    calls only    the schedule's kernel calls of every rank, no merge nor bookkeeping
    ring          the ring's pass of every rank (ring_forward / ring_backward)
    per hop       (ring - single) / computed hops: what one hop costs beyond its share of the
                  single call; "merge" = (ring - calls only) / hops, the machinery without
                  the kernel splitting
    max err       forward: max |ring out - single out| (a check that the simulation computes
                  the same attention; the backward's dK/dV shares are stand-ins, not checked)

Times are medians over --reps reps, timed by bench/timing.py: on the CPU single, calls only and
ring alternate round-robin; on CUDA each is timed with do_bench.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

import longattn
from longattn import ring
from longattn.attention import window_bounds
from longattn.ring.comm import Comm
from longattn.ring.compute import Kernel
from longattn.ring.ring_mode import ring_backward, ring_forward
from longattn.ring.schedule import Call

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import timing  # noqa: E402

CASES = [
    # name, layout, options (window as a fraction of L)
    ("causal", "zigzag", dict(causal=True)),
    ("causal", "contiguous", dict(causal=True)),
    ("full", "zigzag", dict(causal=False)),
    ("window L/8", "contiguous", dict(causal=True, window_frac=8)),
]


class LocalComm(Comm):
    """A rank of the simulated world: receives come ready-made, sends are only built."""

    def __init__(self, rank, world, inbox):
        super().__init__(None, rank, world, None)
        self.inbox = inbox            # msg -> the buffer its receive would fill

    def exchange(self, msgs, payload, alloc):
        for m in msgs:
            if m.src == self.rank:
                payload(m)            # the copy a real send makes
        return [(m, self.inbox[m]) for m in msgs if m.dst == self.rank]   # nothing to complete


def _inbox(plan, msgs, k_shards, v_shards, acc_dtype):
    """Every rank's received buffers, by message (dK/dV shares: zeros of the right shape)."""
    boxes = [dict() for _ in range(plan.world_size)]
    for m in msgs:
        k_o, v_o = k_shards[m.block], v_shards[m.block]
        if m.kind == 0:
            buf = torch.stack([k_o[:, m.lo:m.hi], v_o[:, m.lo:m.hi]])
        else:
            buf = torch.zeros((2,) + tuple(k_o[:, m.lo:m.hi].shape), dtype=acc_dtype,
                              device=k_o.device)
        boxes[m.dst][m] = buf
    return boxes


def run_case(name, layout, opts, W, q, k, v, dout, reps):
    device, L = q.device, q.shape[1]
    causal = opts["causal"]
    window = (L // opts["window_frac"] - 1, 0) if "window_frac" in opts else None
    left, right = window_bounds(window)
    kern = Kernel(causal, q.shape[-1] ** -0.5, 0.0, 0.0, None)
    whole = Call(0, L, 0, L, 0, 0, left, right, 0)
    plan = ring.plan(L, W, layout, causal=causal, window=window)

    def cut(x, r, dim=1):
        return ring.shard(x, layout=layout, seq_dim=dim, rank=r, world_size=W).contiguous()

    with torch.no_grad():
        out, lse = kern.fwd(q, k, v, whole)
        qs, ks, vs, douts = ([cut(x, r) for r in range(W)] for x in (q, k, v, dout))
        outs = [cut(out, r) for r in range(W)]
        lses = [cut(lse, r, 2) for r in range(W)]
        acc = lse.dtype
        fwd_box = _inbox(plan, plan.fwd_msgs, ks, vs, acc)
        bwd_box = _inbox(plan, plan.bwd_msgs, ks, vs, acc)

        def single_fwd():
            kern.fwd(q, k, v, whole)

        def single_bwd():
            kern.bwd(dout, None, q, k, v, out, lse, whole)

        def calls_fwd():
            for r in range(W):
                for o in range(W):
                    for c in plan.calls[r][o]:
                        kern.fwd(qs[r][:, c.q0:c.q1], ks[o][:, c.k0:c.k1], vs[o][:, c.k0:c.k1], c)

        def calls_bwd():
            for r in range(W):
                for o in range(W):
                    for c in plan.calls[r][o]:
                        kern.bwd(douts[r][:, c.q0:c.q1], None, qs[r][:, c.q0:c.q1],
                                 ks[o][:, c.k0:c.k1], vs[o][:, c.k0:c.k1],
                                 outs[r][:, c.q0:c.q1], lses[r][:, :, c.q0:c.q1], c)

        def ring_fwd():
            return [ring_forward(LocalComm(r, W, fwd_box[r]), plan, kern, qs[r], ks[r], vs[r])
                    for r in range(W)]

        def ring_bwd():
            for r in range(W):
                ring_backward(LocalComm(r, W, bwd_box[r]), plan, kern, douts[r], None, qs[r],
                              ks[r], vs[r], outs[r], lses[r])

        got = ring_fwd()
        err = max((got[r][0].to(torch.float64) - outs[r].to(torch.float64)).abs().max().item()
                  for r in range(W) if outs[r].numel())
        fns = dict(sf=single_fwd, cf=calls_fwd, rf=ring_fwd, sb=single_bwd, cb=calls_bwd,
                   rb=ring_bwd)
        measured = timing.compare(fns, reps, device.type)
    ms = {key: 1e3 * m.median for key, m in measured.items()}
    n_calls = sum(len(c) for row in plan.calls for c in row)
    return dict(name=name, layout=layout, W=W, hops=plan.computed_hops, all_hops=plan.hops,
                calls=n_calls, ms=ms, err=err)


def print_table(rows, args, device):
    print(f"\nring machinery per hop without communication, {device} "
          f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"B={args.batch} L={args.seq} H={args.heads} Hkv={args.kv_heads} D={args.dim} "
          f"{args.dtype}, simulated W ranks in one process, median of {args.reps}"
          + (f", {torch.get_num_threads()} CPU threads" if device.type == "cpu" else "") + "\n")
    print("| mask | layout | W | hops computed | kernel calls | pass | single ms | calls only ms "
          "| ring ms | ring / single | per hop us | merge per hop us | fwd max err |")
    print("|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        ms, hops = row["ms"], row["hops"]
        for pas, s, c, r in (("fwd", "sf", "cf", "rf"), ("bwd", "sb", "cb", "rb")):
            err = f"{row['err']:.1e}" if pas == "fwd" else ""
            print(f"| {row['name']} | {row['layout']} | {row['W']} | {hops}/{row['all_hops']} | "
                  f"{row['calls']} | {pas} | {ms[s]:.2f} | {ms[c]:.2f} | {ms[r]:.2f} | "
                  f"{ms[r] / ms[s]:.2f} | {1e3 * (ms[r] - ms[s]) / hops:.0f} | "
                  f"{1e3 * (ms[r] - ms[c]) / hops:.0f} | {err} |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--single-gpu", action="store_true",
                    help="one device, simulated ranks: what this script always does (accepted "
                         "so that the GPU check can name the mode)")
    ap.add_argument("--seq", type=int, help="sequence length (default 2048 CPU, 16384 CUDA)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, help="q heads (default 4 CPU, 16 CUDA)")
    ap.add_argument("--kv-heads", type=int, help="k/v heads (default: --heads)")
    ap.add_argument("--dim", type=int, help="head dim (default 64 CPU, 128 CUDA)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16", "float64"),
                    help="default float32 CPU, bfloat16 CUDA")
    ap.add_argument("--worlds", default="2,4,8", help="simulated world sizes, comma-separated")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int,
                    help="CPU threads (1 steadies timings on a loaded machine)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    gpu = args.device == "cuda"
    if gpu and not (torch.cuda.is_available() and longattn.build_info().get("cuda")):
        sys.exit("--device cuda needs a GPU and a CUDA build of longattn")
    args.seq = args.seq or (16384 if gpu else 2048)
    args.heads = args.heads or (16 if gpu else 4)
    args.kv_heads = args.kv_heads or args.heads
    args.dim = args.dim or (128 if gpu else 64)
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    device = torch.device("cuda", torch.cuda.current_device()) if gpu else torch.device("cpu")
    g = torch.Generator(device=device).manual_seed(0)
    dtype = getattr(torch, args.dtype)
    B, L = args.batch, args.seq
    q, k, v, dout = (torch.randn(B, L, h, args.dim, generator=g, device=device, dtype=dtype)
                     for h in (args.heads, args.kv_heads, args.kv_heads, args.heads))
    rows = []
    for W in (int(w) for w in args.worlds.split(",")):
        for name, layout, opts in CASES:
            rows.append(run_case(name, layout, opts, W, q, k, v, dout, args.reps))
    print_table(rows, args, device)


if __name__ == "__main__":
    sys.exit(main())
