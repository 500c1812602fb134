"""KV-cache benchmarks: compaction throughput, compaction with key re-rotation (StreamingLLM's
position shift) fused or as compact_ + rerotate_keys, decode attention with score
accumulation, decode and compaction of a paged cache against the contiguous one, memory of true
per-head lengths.

    python bench/bench_kvcache.py [--quick] [--device cpu|cuda]

Timed by bench/timing.py: on the CPU the calls of the compared implementations are interleaved
round-robin (the machine is shared, only ratios within one run mean anything), the median of the
reps is reported and a speedup is the median of the per-round ratios. On CUDA each is timed on
its own with CUDA events and a flushed L2 (the destructive compactions get fresh copies before
each call, untimed).
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch
import torch.nn.functional as F

import longattn
from longattn import kvcache as kvc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import core  # noqa: E402
import timing  # noqa: E402

DEVICE = "cpu"


def ms(m) -> float:
    return m.median * 1e3


def bench_compaction(B, H, C, D, keep_frac, dtype, reps):
    dev = DEVICE
    k = torch.randn(B, H, C, D, dtype=dtype, device=dev)
    v = torch.randn_like(k)
    pos = torch.arange(C, device=dev).expand(B, H, C).contiguous()
    scores = torch.rand(B, H, C, device=dev)
    lens = torch.full((B, H), C, dtype=torch.int32, device=dev)
    n = int(C * keep_frac)
    keep, counts = kvc.select_keep(scores, lens, 4, 64, n)
    state = {}

    def reset():  # fresh copies each rep (compact_ is destructive); not timed
        state.update(k=k.clone(), v=v.clone(), p=pos.clone(), s=scores.clone(), l=lens.clone())

    def ours():
        kvc.compact_(state["k"], state["v"], state["l"], keep, counts, positions=state["p"],
                     scores=state["s"])

    def gather():
        idx = keep[..., None]
        k2 = k.gather(2, idx.expand(-1, -1, -1, D)).contiguous()
        v2 = v.gather(2, idx.expand(-1, -1, -1, D)).contiguous()
        p2 = pos.gather(2, keep).contiguous()
        s2 = scores.gather(2, keep).contiguous()
        return k2, v2, p2, s2

    res = timing.compare({"compact_": ours, "gather": gather}, reps, DEVICE, reset=reset)
    moved = 2 * 2 * B * H * n * D * k.element_size()  # read + write of the kept K and V rows
    print(f"compaction B={B} H={H} C={C} D={D} keep={n} {str(dtype)[6:]}: "
          + "  ".join(f"{name} {ms(m):.2f} ms ({moved / m.median / 1e9:.1f} GB/s)" for name, m in res.items())
          + f"  speedup {core.ratio(res['gather'], res['compact_']):.2f}x")


def bench_shift(B, H, C, D, n_sink, n_recent, dtype, reps):
    """StreamingLLM eviction with position shift on a full cache of rotated keys: keep the
    sinks and the recent window, renumber them to their slots. Unfused: compact_ then
    rerotate_keys over the live prefix (the policy's former path); fused: compact_rerotate_."""
    dev = DEVICE
    inv_freq = longattn.rope.frequencies(D, 10000.0)[0].to(dev)
    k = torch.randn(B, H, C, D, dtype=dtype, device=dev)
    v = torch.randn_like(k)
    pos = torch.arange(C, device=dev).expand(B, H, C).contiguous()
    lens = torch.full((B, H), C, dtype=torch.int32, device=dev)
    zeros = torch.zeros(B, H, C, device=dev)
    keep, counts = kvc.select_keep(zeros, lens, n_sink, n_recent, n_sink + n_recent)
    n = keep.shape[-1]
    new = torch.arange(n, device=dev).expand(B, H, n)
    state = {}

    def reset():
        state.update(k=k.clone(), v=v.clone(), p=pos.clone(), l=lens.clone())

    def unfused():
        kvc.compact_(state["k"], state["v"], state["l"], keep, counts, positions=state["p"])
        kk = state["k"].view(B * H, C, 1, D)[:, :n]
        longattn.rope.rerotate_keys(kk, state["p"][:, :, :n].reshape(B * H, n),
                                    new.reshape(B * H, n), inv_freq, inplace=True)
        state["p"][:, :, :n] = new

    def fused():
        kvc.compact_rerotate_(state["k"], state["v"], state["l"], keep, counts, state["p"],
                              inv_freq)

    res = timing.compare({"compact_rerotate_": fused, "compact_+rerotate_keys": unfused}, reps, DEVICE,
                        reset=reset)
    print(f"shift B={B} H={H} C={C} D={D} keep {n_sink}+{n_recent} {str(dtype)[6:]}: "
          + "  ".join(f"{name} {ms(m):.2f} ms" for name, m in res.items())
          + f"  speedup {core.ratio(res['compact_+rerotate_keys'], res['compact_rerotate_']):.2f}x")


def bench_decode(B, Hq, Hkv, C, D, dtype, reps):
    G = Hq // Hkv
    dev = DEVICE
    k = torch.randn(B, Hkv, C, D, dtype=dtype, device=dev)
    v = torch.randn_like(k)
    q = torch.randn(B, Hq, 1, D, dtype=dtype, device=dev)
    lens = torch.full((B, Hkv), C, dtype=torch.int32, device=dev)
    s = torch.zeros(B, Hkv, C, device=dev)

    def ours():
        kvc.decode_attention(q, k, v, lens, scores=s)

    def ours_plain():
        kvc.decode_attention(q, k, v, lens)

    def sdpa_eager_scores():
        o = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        kk = k.repeat_interleave(G, 1)
        p = torch.softmax((q @ kk.transpose(-1, -2)).float() / math.sqrt(D), -1)
        s.add_(p.view(B, Hkv, G, C).sum(2))
        return o

    def sdpa():
        F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    res = timing.compare(dict(ours_scores=ours, sdpa_eager_scores=sdpa_eager_scores,
                              ours=ours_plain, sdpa=sdpa), reps, DEVICE)
    gb = 2 * k.numel() * k.element_size() / 1e9
    print(f"decode B={B} Hq={Hq} Hkv={Hkv} C={C} D={D} {str(dtype)[6:]}: "
          + "  ".join(f"{n} {ms(m):.2f} ms" for n, m in res.items())
          + f"  | with scores {core.ratio(res['sdpa_eager_scores'], res['ours_scores']):.2f}x, "
          f"plain {core.ratio(res['sdpa'], res['ours']):.2f}x; ours {gb / res['ours'].median:.1f} GB/s of K+V")


def _paged_copy(t, bs, perm):
    """(B, H, C, ...) as a pool (B*H*C/bs, bs, 1, ...) whose block perm[b, h, i] holds slots
    [i*bs, (i+1)*bs) of (b, h): every head's blocks scattered over the pool."""
    B, H, C = t.shape[:3]
    pool = torch.empty((B * H * (C // bs), bs) + t.shape[3:], dtype=t.dtype, device=t.device)
    pool[perm.flatten().long()] = t.reshape((-1, bs) + t.shape[3:])
    return pool.unsqueeze(2)


def bench_paged_decode(B, Hq, Hkv, C, D, dtype, reps, bs=16):
    """decode_attention_paged over blocks of bs keys in a shuffled pool order vs
    decode_attention over the same contiguous cache (with the fused scores, and without)."""
    dev = DEVICE
    k = torch.randn(B, Hkv, C, D, dtype=dtype, device=dev)
    v = torch.randn_like(k)
    q = torch.randn(B, Hq, 1, D, dtype=dtype, device=dev)
    lens = torch.full((B, Hkv), C, dtype=torch.int32, device=dev)
    perm = torch.randperm(B * Hkv * (C // bs), device=dev).view(B, Hkv, C // bs).int()
    kp, vp = _paged_copy(k, bs, perm), _paged_copy(v, bs, perm)
    s = torch.zeros(B, Hkv, C, device=dev)
    sp = torch.zeros(kp.shape[:3], device=dev)

    res = timing.compare(dict(
        contiguous=lambda: kvc.decode_attention(q, k, v, lens),
        paged=lambda: kvc.decode_attention_paged(q, kp, vp, perm, lens),
        contiguous_scores=lambda: kvc.decode_attention(q, k, v, lens, scores=s),
        paged_scores=lambda: kvc.decode_attention_paged(q, kp, vp, perm, lens, scores=sp)),
        reps, DEVICE)
    gb = 2 * k.numel() * k.element_size() / 1e9
    print(f"paged decode B={B} Hq={Hq} Hkv={Hkv} C={C} D={D} block {bs} {str(dtype)[6:]}: "
          + "  ".join(f"{n} {ms(m):.3f} ms" for n, m in res.items())
          + f"  | paged/contiguous speed {core.ratio(res['contiguous'], res['paged']):.2f}x, "
          f"with scores {core.ratio(res['contiguous_scores'], res['paged_scores']):.2f}x; "
          f"paged {gb / res['paged'].median:.1f} GB/s of K+V")


def bench_paged_compaction(B, H, C, D, keep_frac, dtype, reps, bs=16):
    """compact_paged_ (remapping whole kept blocks, moving the rest in place) vs compact_ on the
    same cache, H2O-like (sinks, recent window, scattered middle) and block-aligned evictions."""
    dev = DEVICE
    k = torch.randn(B, H, C, D, dtype=dtype, device=dev)
    v = torch.randn_like(k)
    pos = torch.arange(C, device=dev).expand(B, H, C).contiguous()
    lens = torch.full((B, H), C, dtype=torch.int32, device=dev)
    perm = torch.randperm(B * H * (C // bs), device=dev).view(B, H, C // bs).int()
    kp, vp, pp = _paged_copy(k, bs, perm), _paged_copy(v, bs, perm), _paged_copy(pos, bs, perm)
    n = int(C * keep_frac)
    for kind in ("scattered", "whole blocks"):
        if kind == "scattered":
            keep, counts = kvc.select_keep(torch.rand(B, H, C, device=dev), lens, 4, 64, n)
        else:  # every other run of 4 blocks: nothing to move, only the table
            slot = torch.arange(C, device=dev)
            kept = slot[(slot // (4 * bs)) % 2 == 0][:n]
            keep = kept.expand(B, H, kept.numel()).contiguous()
            counts = torch.full((B, H), kept.numel(), dtype=torch.int64, device=dev)
        state = {}

        def reset():
            state.update(k=k.clone(), v=v.clone(), p=pos.clone(), l=lens.clone(), kp=kp.clone(),
                         vp=vp.clone(), pp=pp.clone(), t=perm.clone(), lp=lens.clone())

        res = timing.compare(dict(
            compact_=lambda: kvc.compact_(state["k"], state["v"], state["l"], keep, counts,
                                          positions=state["p"]),
            compact_paged_=lambda: kvc.compact_paged_(state["kp"], state["vp"], state["t"],
                                                      state["lp"], keep, counts,
                                                      positions=state["pp"])),
            reps, DEVICE, reset=reset)
        print(f"paged compaction B={B} H={H} C={C} D={D} keep={int(counts.max())} {kind} "
              f"{str(dtype)[6:]}: "
              + "  ".join(f"{name} {ms(m):.2f} ms" for name, m in res.items())
              + f"  speedup {core.ratio(res['compact_'], res['compact_paged_']):.2f}x")


def memory_per_head(B, H, D, C, budgets):
    """Bytes of K+V: padded to the longest head (masking) vs packed per-head lengths (what a
    paged / per-head allocator could hold; our dense buffer holds capacity)."""
    lens = torch.tensor(budgets)
    masked = 2 * B * H * int(lens.max()) * D * 2
    packed = 2 * B * int(lens.sum()) * D * 2
    print(f"memory (bf16 K+V) B={B} H={H} D={D}, per-head lengths {budgets}: masking to the max "
          f"{masked/2**20:.1f} MiB vs per-head {packed/2**20:.1f} MiB ({masked/packed:.2f}x)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--only", default="",
                    help="comma list of compaction,shift,decode,paged,memory")
    a = ap.parse_args()
    global DEVICE
    DEVICE = a.device
    only = set(a.only.split(",")) if a.only else {"compaction", "shift", "decode", "paged",
                                                    "memory"}
    reps = 3 if a.quick else 9
    C = 4096 if a.quick else 16384
    where = (torch.cuda.get_device_name() if DEVICE == "cuda"
             else f"threads {torch.get_num_threads()}")
    print(f"torch {torch.__version__}, {DEVICE}: {where}")
    if "compaction" in only:
        for dtype in (torch.float32, torch.bfloat16):
            bench_compaction(1, 8, C, 128, 0.5, dtype, reps)
    if "shift" in only:
        for dtype in (torch.float32, torch.bfloat16):
            bench_shift(1, 8, C, 128, 4, C // 2, dtype, reps)
    if "decode" in only:
        for dtype in (torch.float32, torch.bfloat16):
            bench_decode(1, 32, 8, C, 128, dtype, reps)
    if "paged" in only:
        for dtype in (torch.float32, torch.bfloat16):
            bench_paged_decode(1, 32, 8, C, 128, dtype, reps)
        bench_paged_compaction(1, 8, C, 128, 0.5, torch.bfloat16, reps)
    if "memory" in only:
        memory_per_head(1, 8, 128, C, [C // 8, C // 4, C // 2, C, C // 8, C // 16, C // 4, C // 2])


if __name__ == "__main__":
    main()
