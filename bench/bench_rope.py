"""RoPE throughput: longattn.apply_rope vs the HF-style eager implementation and torch.compile
of it. RoPE is memory-bound, so the figure of merit is GB/s: bytes of q and k read once and
written once, divided by the time. On a GPU it also reports the fraction of the bandwidth a
plain copy (clone of the same tensors) reaches on the same device.

The ``bwd+freq`` column is the backward when inv_freq requires grad (``rope_backward``: reads
the gradients and the saved q and k, writes the input gradients and reduces the inv_freq
gradient), in GB/s of those three passes.

    python bench/bench_rope.py                 # CPU (or --device cuda)
    python bench/bench_rope.py --quick         # fewer shapes and repeats

The eager baseline is what a transformers model runs per layer: angles from positions in fp32,
cat(freqs, freqs), cos/sin times attention_scaling, cast, ``x * cos + rotate_half(x) * sin``
for q and k.

Timed by bench/timing.py, the median of --quick 5 / 11 reps: on the CPU each rep a batch of calls
lasting ~0.2 s / reps (a decode call takes microseconds); on CUDA do_bench (a flushed L2: no shape
is served from the cache). Each implementation is timed on its own, not interleaved with the
others (see medians()).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "python"))
sys.path.insert(0, HERE)
import longattn  # noqa: E402
import timing  # noqa: E402

MIN_TIME_S = 0.2  # timed calls per implementation and shape, about


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def hf_rope(q, k, positions, inv_freq, scaling: float):
    freqs = positions[..., None].float() * inv_freq.float()
    emb = torch.cat((freqs, freqs), dim=-1)
    cos = (emb.cos() * scaling).to(q.dtype)[:, :, None]
    sin = (emb.sin() * scaling).to(q.dtype)[:, :, None]
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def medians(fns: dict, device, repeats) -> dict:
    """{name: median seconds per call}, one implementation after the other; the first call of
    each is a warm-up (torch.compile). Not round-robin: an out-of-place call's cost is mostly the
    first touch of its fresh output pages, and interleaved with the others it would at times be
    handed the pages they just freed (up to 5x faster here), i.e. measure the allocator's state."""
    return {k: timing.compare({k: f}, repeats, device, extra_warmup=True,
                              min_sample_s=MIN_TIME_S / repeats)[k].median
            for k, f in fns.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = args.device
    repeats = 5 if args.quick else 11
    # (label, batch, seqlen, heads_q, heads_k, head_dim)
    shapes = [("prefill 8B", 1, 4096, 32, 8, 128), ("decode x64", 64, 1, 32, 8, 128),
              ("prefill 1B", 4, 2048, 32, 8, 64)]
    if dev == "cuda":
        shapes = [("prefill 8B", 1, 32768, 32, 8, 128), ("batch prefill", 8, 4096, 32, 8, 128),
                  ("decode x256", 256, 1, 32, 8, 128), ("prefill 1B", 16, 4096, 32, 8, 64)]
    if args.quick:
        shapes = shapes[:2]
    dtypes = [torch.bfloat16, torch.float32]
    inv, scaling = longattn.rope.frequencies(128, 500000.0, {"rope_type": "llama3", "factor": 8.0,
                                                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                            "original_max_position_embeddings": 8192})
    print(f"device: {dev}  torch {torch.__version__}  threads {torch.get_num_threads()}  "
          f"longattn {longattn.build_info().get('cpu_isa')}"
          + (f"  {torch.cuda.get_device_name()}" if dev == "cuda" else ""))
    hdr = (f"{'shape':<15}{'dtype':<10}{'MB':>8}{'longattn':>10}{'inplace':>10}{'eager':>10}"
           f"{'compiled':>10}{'x eager':>9}{'x compiled':>11}{'bwd+freq':>10}")
    if dev == "cuda":
        hdr += f"{'copy':>9}{'% copy':>8}"
    print("GB/s (q and k read + written once each)")
    print(hdr)
    cases = []
    for label, B, L, Hq, Hk, D in shapes:
        for dt in dtypes:
            rinv = (inv if D == 128 else longattn.rope.frequencies(D, 500000.0)[0]).to(dev)
            q = torch.randn(B, L, Hq, D, device=dev, dtype=dt)
            k = torch.randn(B, L, Hk, D, device=dev, dtype=dt)
            pos = (torch.arange(L, device=dev) + 1000)[None].expand(B, L).contiguous()
            cases.append((label, q, k, pos, rinv, {}))
    # Every compiled baseline after every other measurement: on CPU, inductor's kernels bring
    # their own OpenMP thread pool, whose spinning workers slow any later parallel region.
    for label, q, k, pos, rinv, res in cases:
        fns = {"longattn": lambda: longattn.apply_rope(q, k, pos, rinv, attention_scaling=scaling),
               "inplace": lambda: longattn.apply_rope(q, k, pos, rinv, attention_scaling=scaling, inplace=True),
               "eager": lambda: hf_rope(q, k, pos, rinv, scaling),
               "bwd+freq": lambda: torch.ops.longattn.rope_backward(
                   q, k, q, k, pos, rinv, scaling, rinv.numel() * 2, False, False, True)}
        if dev == "cuda":
            fns["copy"] = lambda: (q.clone(), k.clone())
        res.update(medians(fns, dev, repeats))
    if not args.no_compile:
        compiled = torch.compile(hf_rope, dynamic=False)
        for label, q, k, pos, rinv, res in cases:
            res.update(medians({"compiled": lambda: compiled(q, k, pos, rinv, scaling)}, dev, repeats))
    for label, q, k, pos, rinv, res in cases:
        nbytes = 2 * (q.numel() + k.numel()) * q.element_size()
        gbs = {kk: nbytes / t / 1e9 for kk, t in res.items()}
        gbs["bwd+freq"] *= 1.5  # three passes over q and k, not two
        row = (f"{label:<15}{str(q.dtype).replace('torch.', ''):<10}{nbytes / 2**20:>8.0f}"
               f"{gbs['longattn']:>10.1f}{gbs['inplace']:>10.1f}{gbs['eager']:>10.1f}"
               f"{gbs.get('compiled', float('nan')):>10.1f}"
               f"{res['eager'] / res['longattn']:>9.2f}"
               f"{res.get('compiled', float('nan')) / res['longattn']:>11.2f}"
               f"{gbs['bwd+freq']:>10.1f}")
        if dev == "cuda":
            row += f"{gbs['copy']:>9.0f}{100 * gbs['longattn'] / gbs['copy']:>7.0f}%"
        print(row, flush=True)
    print("x eager / x compiled: time of that baseline / time of longattn.apply_rope (out of place)")


if __name__ == "__main__":
    main()
