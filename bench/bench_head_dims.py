"""Dense causal attention across head dims: longattn against F.scaled_dot_product_attention.

    python bench/bench_head_dims.py                      # cpu, fp32, B=1 H=8 L=4096, D = 64 96 128 256
    python bench/bench_head_dims.py --device cuda --dtype bfloat16 --L 16384

The tile GEMMs and the flash tiles depend on the head dim (the CPU GEMM's column blocking, the
CUDA kernels' per-head-dim instantiations), so a head dim can be slow while the others are fine;
this prints one row per head dim. Forward under no_grad and forward + backward, timed by
bench/timing.py: on the CPU the calls of longattn and SDPA alternate (round-robin) so that load
drift hits both alike, the median is reported, and `x sdpa` is the median of the per-round
ratios (> 1: longattn faster); on CUDA each is timed with do_bench and `x sdpa` is the ratio of
the medians. SDPA gets (B, H, L, D) views of the same (B, L, H, D) storage.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "python"))
sys.path.insert(0, HERE)
import longattn  # noqa: E402
import core  # noqa: E402
import timing  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--dims", type=int, nargs="+", default=[64, 96, 128, 256])
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--H", type=int, default=8)
    ap.add_argument("--L", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    print(f"device {args.device}, {args.dtype}, B={args.B} H={args.H} L={args.L}, causal, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| D | mode | longattn ms | sdpa ms | x sdpa |")
    print("|---:|---|---:|---:|---:|")
    for D in args.dims:
        q, k, v = (torch.randn(args.B, args.L, args.H, D, device=args.device, dtype=dtype) for _ in range(3))
        dout = torch.randn_like(q)
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]

        def ours_fwd():
            with torch.no_grad():
                longattn.attention(q, k, v, causal=True)

        def sdpa_fwd():
            with torch.no_grad():
                F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)), is_causal=True)

        def ours_fb():
            longattn.attention(*leaves, causal=True).backward(dout)

        def sdpa_fb():
            out = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in leaves), is_causal=True)
            out.transpose(1, 2).backward(dout)

        for mode, a, b in (("fwd", ours_fwd, sdpa_fwd), ("fwd+bwd", ours_fb, sdpa_fb)):
            m = timing.compare({"longattn": a, "sdpa": b}, args.reps, args.device)
            ours, sdpa = m["longattn"], m["sdpa"]
            print(f"| {D} | {mode} | {ours.median * 1e3:.1f} | {sdpa.median * 1e3:.1f} | "
                  f"{core.ratio(sdpa, ours):.2f}x |", flush=True)


if __name__ == "__main__":
    main()
