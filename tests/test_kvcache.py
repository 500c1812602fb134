"""KV cache: decode attention, score accumulation, compaction (with key re-rotation),
selection, the cache object. Every op test runs on each device of the build (``device``)."""
import math

import pytest
import torch

import longattn
from longattn import kvcache as kvc
from longattn.reference import (attention_ref, compact_ref, decode_attention_ref,
                                select_keep_ref)

TOL = {torch.float32: dict(atol=2e-5, rtol=1e-4), torch.float64: dict(atol=1e-10, rtol=1e-10),
       torch.bfloat16: dict(atol=2e-2, rtol=2e-2), torch.float16: dict(atol=2e-3, rtol=2e-3)}


def _cache(B, Hkv, C, D, dtype, lengths, *, pos_gaps=False, device="cpu"):
    """Random cache tensors, drawn on the CPU (same values on every device)."""
    k = torch.randn(B, Hkv, C, D).to(dtype)
    v = torch.randn(B, Hkv, C, D).to(dtype)
    lens = torch.tensor(lengths, dtype=torch.int32).view(B, Hkv)
    if pos_gaps:  # increasing positions with gaps (an evicted cache)
        pos = torch.randint(1, 4, (B, Hkv, C)).cumsum(-1)
    else:
        pos = torch.arange(C).expand(B, Hkv, C).contiguous()
    return tuple(t.to(device) for t in (k, v, lens, pos))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("n_new", [1, 3])
@pytest.mark.parametrize("mask", ["none", "causal", "window"])
def test_decode_matches_dense(dtype, n_new, mask, device):
    B, Hq, Hkv, C, D = 2, 8, 2, 600, 64  # 600 > one 256-key chunk; lengths differ per head
    k, v, lens, pos = _cache(B, Hkv, C, D, dtype, [600, 37, 0, 513], pos_gaps=True, device=device)
    q = torch.randn(B, Hq, n_new, D).to(dtype).to(device)
    kw = {}
    if mask != "none":
        top = pos.gather(2, (lens.long() - 1).clamp(min=0)[..., None]).amax(dim=(1, 2))
        kw["q_positions"] = top[:, None] - torch.arange(n_new - 1, -1, -1, device=device) * 3
        kw["positions"] = pos
    if mask == "window":
        kw.update(window=150, sinks=4)
    scores0 = torch.rand(B, Hkv, C).to(device)
    scores = scores0.clone()
    out, lse = kvc.decode_attention(q, k, v, lens, scores=scores, **kw)
    out_ref, lse_ref, p = decode_attention_ref(q, k, v, lens, **kw)
    torch.testing.assert_close(out, out_ref, **TOL[dtype])
    torch.testing.assert_close(lse, lse_ref, **TOL[torch.float32 if dtype != torch.float64 else dtype])
    inc = p.view(B, Hkv, Hq // Hkv, n_new, C).sum((2, 3)).float()
    torch.testing.assert_close(scores, scores0 + inc, atol=1e-5 if dtype.itemsize >= 4 else 1e-4,
                               rtol=1e-4)
    # The empty head: out 0, lse -inf, scores untouched.
    assert (out[1, :4] == 0).all() and torch.isneginf(lse[1, :4]).all()
    assert torch.equal(scores[1, 0], scores0[1, 0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_decode_strided_unaligned(dtype, device):
    """Caches whose slot rows are not whole 16-byte vectors (odd head dims, padded slots, an
    offset start: the CUDA kernel's scalar path), GQA groups of more than 8 rows, int64
    lengths, and positions / q_positions / scores given as strided views."""
    B, Hq, Hkv, C, D, Dv, n = 2, 6, 2, 300, 13, 7, 2
    k = torch.randn(B, Hkv, C, D + 3)[..., 1:D + 1].to(dtype).to(device)
    v = torch.randn(B, Hkv, C, Dv + 1)[..., :Dv].to(dtype).to(device)
    lens = torch.tensor([[300, 1], [257, 0]], device=device)
    pos = torch.randint(1, 3, (B, Hkv, 2 * C)).cumsum(-1)[..., ::2].to(device)
    qpos = torch.tensor([[590, 600, 0, 0], [400, 402, 0, 0]], device=device)[:, :2 * n:2]
    q = torch.randn(B, Hq, n, D).to(dtype).to(device)
    scores = torch.rand(B, Hkv, 2 * C, device=device)[..., ::2]
    scores0 = scores.clone()
    out, lse = kvc.decode_attention(q, k, v, lens, positions=pos, q_positions=qpos, window=200,
                                    sinks=3, scores=scores)
    out_ref, lse_ref, p = decode_attention_ref(q, k, v, lens, positions=pos, q_positions=qpos,
                                               window=200, sinks=3)
    torch.testing.assert_close(out, out_ref, **TOL[dtype])
    torch.testing.assert_close(lse, lse_ref, **TOL[torch.float32 if dtype != torch.float64 else dtype])
    inc = p.view(B, Hkv, Hq // Hkv, n, C).sum((2, 3)).float()
    torch.testing.assert_close(scores, scores0 + inc, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype,D", [(torch.bfloat16, 64), (torch.bfloat16, 128),
                                     (torch.float16, 256), (torch.float32, 32),
                                     (torch.float32, 128)])
@pytest.mark.parametrize("G,n", [(1, 1), (4, 1), (8, 8)])
def test_decode_head_dims_and_groups(dtype, D, G, n, device):
    """Key rows of 4 to 32 16-byte vectors, GQA groups of 1 to 64 rows (8 q heads x 8 new
    tokens), per-head lengths of one key to several tiles per split, a window with sinks: the
    shapes of the CUDA tile kernel (its splits, row blocks and masked tiles), and the scores."""
    B, Hkv, C = 1 if G * n > 8 else 2, 2, 900
    lengths = [900, 1, 513, 0][: B * Hkv]
    k, v, lens, pos = _cache(B, Hkv, C, D, dtype, lengths, pos_gaps=True, device=device)
    q = torch.randn(B, G * Hkv, n, D).to(dtype).to(device)
    top = pos.gather(2, (lens.long() - 1).clamp(min=0)[..., None]).amax(dim=(1, 2))
    kw = dict(positions=pos, q_positions=top[:, None] - torch.arange(n - 1, -1, -1, device=device),
              window=400, sinks=3)
    scores0 = torch.rand(B, Hkv, C, device=device)
    scores = scores0.clone()
    out, lse = kvc.decode_attention(q, k, v, lens, scores=scores, **kw)
    out_ref, lse_ref, p = decode_attention_ref(q, k, v, lens, **kw)
    torch.testing.assert_close(out, out_ref, **TOL[dtype])
    torch.testing.assert_close(lse, lse_ref, **TOL[torch.float32])
    inc = p.view(B, Hkv, G, n, C).sum((2, 3)).float()
    torch.testing.assert_close(scores, scores0 + inc, atol=1e-4, rtol=1e-4)


def test_scores_equal_eager_softmax(device):
    """The accumulated scores are the eager softmax probabilities summed over the q heads of
    each kv head and over several decode steps."""
    B, Hq, Hkv, D, L = 1, 6, 3, 32, 40
    cache = kvc.KVCache(B, Hkv, D, 64, track_scores=True, device=device)
    cache.append(torch.randn(B, Hkv, L, D, device=device), torch.randn(B, Hkv, L, D, device=device))
    expect = torch.zeros(B, Hkv, 64, device=device)
    for _ in range(3):
        q = torch.randn(B, Hq, 1, D, device=device)
        cache.attend(q, accumulate_scores=True)
        kk = cache.k[:, :, :L].repeat_interleave(2, 1)
        probs = torch.softmax(q @ kk.transpose(-1, -2) / math.sqrt(D), dim=-1)  # (B,Hq,1,L)
        expect[:, :, :L] += probs.view(B, Hkv, 2, L).sum(2)
    torch.testing.assert_close(cache.scores, expect, atol=1e-5, rtol=1e-5)


def test_decode_after_compaction_equals_attention_over_kept(device):
    B, Hq, Hkv, C, D = 2, 4, 2, 300, 32
    k, v, lens, pos = _cache(B, Hkv, C, D, torch.float32, [300, 120, 77, 260], device=device)
    k0, v0 = k.clone(), v.clone()
    keep, counts = kvc.select_keep(torch.rand(B, Hkv, C, device=device), lens, 4, 16, 64)
    kvc.compact_(k, v, lens, keep, counts, positions=pos)
    q = torch.randn(B, Hq, 1, D, device=device)
    out, lse = kvc.decode_attention(q, k, v, lens)
    for b in range(B):
        for h in range(Hkv):
            idx = keep[b, h, : counts[b, h]]
            kk, vv = k0[b, h, idx], v0[b, h, idx]  # (n, D)
            for g in range(Hq // Hkv):
                hq = h * (Hq // Hkv) + g
                o_ref, l_ref = attention_ref(q[b:b + 1, hq:hq + 1].transpose(1, 2),
                                             kk[None, :, None], vv[None, :, None])
                torch.testing.assert_close(out[b, hq], o_ref[0, :, 0], atol=2e-5, rtol=1e-4)
                torch.testing.assert_close(lse[b, hq], l_ref[0, 0], atol=2e-5, rtol=1e-4)


def _random_keep(lens, K):
    """Random sorted keep lists (B, H, K) with -1 padding, and their counts."""
    B, H = lens.shape
    keep = torch.full((B, H, K), -1, dtype=torch.int64)
    counts = torch.zeros(B, H, dtype=torch.int64)
    for b in range(B):
        for h in range(H):
            L = int(lens[b, h])
            n = min(L, int(torch.randint(0, K + 1, ())))
            keep[b, h, :n] = torch.randperm(L)[:n].sort().values
            counts[b, h] = n
    return keep.to(lens.device), counts.to(lens.device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("D", [16, 13])  # 13: rows that are no multiple of 16 bytes
def test_compaction_equals_gather(dtype, D, device):
    B, H, C = 2, 3, 200
    k, v, lens, pos = _cache(B, H, C, D, dtype, [200, 150, 0, 10, 199, 64], pos_gaps=True,
                             device=device)
    scores = torch.rand(B, H, C, device=device)
    keep, counts = _random_keep(lens, 80)
    refs = [compact_ref(t, keep, counts) for t in (k, v, pos, scores)]
    kvc.compact_(k, v, lens, keep, counts, positions=pos, scores=scores)
    for got, ref in zip((k, v, pos, scores), refs):
        for b in range(B):
            for h in range(H):
                n = int(counts[b, h])
                assert torch.equal(got[b, h, :n], ref[b, h, :n])
    assert torch.equal(lens, counts.int())


def test_compaction_long_shift(device):
    """Caches longer than a CUDA move chunk: sources far ahead of their destinations (a
    StreamingLLM eviction) and a random half."""
    B, H, C, D = 1, 2, 3000, 64
    k, v, lens, pos = _cache(B, H, C, D, torch.bfloat16, [3000, 2999], device=device)
    keep = torch.full((B, H, 1004), -1, dtype=torch.int64)
    keep[0, 0] = torch.cat([torch.arange(4), torch.arange(2000, 3000)])
    keep[0, 1, :1000] = torch.randperm(2999)[:1000].sort().values
    keep, counts = keep.to(device), torch.tensor([[1004, 1000]], device=device)
    refs = [compact_ref(t, keep, counts) for t in (k, v, pos)]
    kvc.compact_(k, v, lens, keep, counts, positions=pos)
    for got, ref in zip((k, v, pos), refs):
        assert torch.equal(got[0, 0, :1004], ref[0, 0, :1004])
        assert torch.equal(got[0, 1, :1000], ref[0, 1, :1000])


def _waited_chunks(keep, n, L, rows, c):
    """The chunks CUDA's compaction chunk c waits for (csrc/cuda/kvcache/compact_rows_kernel.cu,
    step 3): from lo, the first row with keep >= c * rows, found by the same 32-way search."""
    j0 = c * rows
    lo, hi = max(j0 - (L - n), 0), j0
    while lo < hi:
        step = (hi - lo + 31) // 32
        preds = [q >= hi or keep[q] >= j0 for q in (lo + lane * step for lane in range(32))]
        f = preds.index(True) if True in preds else 32
        if f == 0:
            hi = lo
        else:
            if f < 32 and lo + f * step < hi:
                hi = lo + f * step
            lo += (f - 1) * step + 1
    return {w for w in (lo // rows, (lo + rows - 1) // rows) if w < c}


@pytest.mark.parametrize("kind", ["streaming", "random", "sparse", "dense"])
def test_compaction_chunk_waits_cover_every_reader(kind):
    """The in-place rule of the CUDA compaction: a chunk writes its rows only after every other
    chunk reading one of them has read; the chunks it waits for (the search above) cover all
    of those, for every chunk."""
    g = torch.Generator().manual_seed(len(kind))
    for L, rows in ((3000, 32), (700, 51), (4096, 256), (90, 1)):
        if kind == "streaming":
            keep = list(range(4)) + list(range(L - L // 3, L))
        elif kind == "random":
            keep = torch.randperm(L, generator=g)[: L // 2].sort().values.tolist()
        elif kind == "sparse":
            keep = list(range(0, L, 37))
        else:
            keep = [j for j in range(L) if j % 50 != 7]
        n = len(keep)
        for c in range((n + rows - 1) // rows):
            lo_row, hi_row = c * rows, min((c + 1) * rows, n)
            readers = {j // rows for j in range(n) if lo_row <= keep[j] < hi_row and j // rows != c}
            assert readers <= _waited_chunks(keep, n, L, rows, c), (L, rows, c)


@pytest.mark.parametrize("kind", ["streaming", "random"])
def test_compaction_large_in_place(kind, device):
    """Caches of many chunks per head, sources far from and close to their destinations: on a
    GPU the chunks of a head run concurrently, so a missed wait shows here."""
    B, H, C, D = 2, 4, 6000, 128
    k, v, lens, pos = _cache(B, H, C, D, torch.bfloat16, [C, C - 1, 4999, 17, C, 3000, 1, C],
                             device=device)
    K = C // 2
    keep = torch.full((B, H, K), -1, dtype=torch.int64)
    counts = torch.zeros(B, H, dtype=torch.int64)
    for x in range(B * H):
        L = int(lens.view(-1)[x])
        n = min(L, K)
        if kind == "streaming":
            sel = torch.cat([torch.arange(min(4, n)), torch.arange(L - (n - min(4, n)), L)])
        else:
            sel = torch.randperm(L)[:n].sort().values
        keep.view(-1, K)[x, :n] = sel
        counts.view(-1)[x] = n
    keep, counts = keep.to(device), counts.to(device)
    refs = [compact_ref(t, keep, counts) for t in (k, v, pos)]
    kvc.compact_(k, v, lens, keep, counts, positions=pos)
    for got, ref in zip((k, v, pos), refs):
        for b in range(B):
            for h in range(H):
                n = int(counts[b, h])
                assert torch.equal(got[b, h, :n], ref[b, h, :n])


def _rotated_cache(B, H, C, D, dtype, lengths, device, big, strided=False):
    """A cache of keys rotated at increasing positions with gaps (offset by 2**40 when big:
    the exact-angle path of rope_math.h). strided: k and v are views of padded slot rows that
    start one element in (no row on a 16-byte boundary)."""
    k, v, lens, pos = _cache(B, H, C, D, torch.float32, lengths, pos_gaps=True)
    if big:
        pos = pos + 2 ** 40
    inv_freq, _ = longattn.rope.frequencies(D, 10000.0)
    k, v = k.to(dtype).to(device), v.to(dtype).to(device)
    if strided:
        k = torch.zeros(B, H, C, D + 3, dtype=dtype, device=device)[..., 1:D + 1].copy_(k)
        v = torch.zeros(B, H, C, D + 1, dtype=dtype, device=device)[..., 1:].copy_(v)
    return k, v, lens.to(device), pos.to(device), inv_freq


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("layout", ["neox", "interleaved", "partial", "neox_strided",
                                    "interleaved_strided"])
def test_compact_rerotate_equals_compact_then_rerotate(dtype, layout, device):
    B, H, C, D = 2, 3, 300, 32
    big = dtype in (torch.float32, torch.float64)  # also the exact-angle path for big shifts
    k, v, lens, pos, inv_freq = _rotated_cache(B, H, C, D, dtype, [300, 150, 0, 10, 299, 64],
                                               device, big, strided=layout.endswith("_strided"))
    rd = D // 2 if layout == "partial" else D
    inv_freq = inv_freq[: rd // 2].to(device)
    interleaved = layout.startswith("interleaved")
    scores = torch.rand(B, H, C, device=device)
    keep, counts = _random_keep(lens, 100)
    # New positions: mostly the slot index (StreamingLLM), some heads shifted elsewhere.
    newp = torch.arange(100, device=device).expand(B, H, 100).clone()
    newp[1] += 7 * 2 ** 33 if big else 1000
    a = [t.clone() for t in (k, v, pos, scores, lens)]
    kvc.compact_(a[0], a[1], a[4], keep, counts, positions=a[2], scores=a[3])
    for b in range(B):
        for h in range(H):
            n = int(counts[b, h])
            a[0][b, h, :n] = longattn.rope.rerotate_keys(
                a[0][b, h, :n, None], a[2][b, h, :n], newp[b, h, :n], inv_freq, rotary_dim=rd,
                interleaved=interleaved)[:, 0]
            a[2][b, h, :n] = newp[b, h, :n]
    kvc.compact_rerotate_(k, v, lens, keep, counts, pos, inv_freq, new_positions=newp,
                          rotary_dim=rd, interleaved=interleaved, scores=scores)
    tol = {torch.float32: 2e-6, torch.float64: 1e-12}.get(dtype, 1e-2)  # CPU: bit-identical
    for b in range(B):
        for h in range(H):
            n = int(counts[b, h])
            torch.testing.assert_close(k[b, h, :n], a[0][b, h, :n], atol=tol, rtol=tol)
            for got, ref in zip((v, pos, scores), a[1:4]):
                assert torch.equal(got[b, h, :n], ref[b, h, :n])
    assert torch.equal(lens, a[4])


def test_compact_rerotate_default_positions_are_slots(device):
    """new_positions None: every kept key goes to its slot index; keys already there (delta 0)
    are left bit-identical."""
    B, H, C, D = 1, 2, 64, 16
    k, v, lens, _, inv_freq = _rotated_cache(B, H, C, D, torch.float32, [64, 40], device, False)
    pos = torch.arange(C, device=device).expand(B, H, C).contiguous()
    pos[0, 1, 10:] += 5  # head 1: keys from 10 on sit 5 positions ahead of their slot
    keep = torch.tensor([[[0, 1, 2, 3, 50, 60], [0, 1, 2, 11, 12, -1]]], device=device)
    counts = torch.tensor([[6, 5]], device=device)
    k0 = k.clone()
    kvc.compact_rerotate_(k, v, lens, keep, counts, pos, inv_freq.to(device))
    assert pos[0, 0, :6].tolist() == list(range(6)) and pos[0, 1, :5].tolist() == list(range(5))
    assert torch.equal(k[0, :, :3], k0[0, :, :3])  # sinks: no shift, untouched
    expect = longattn.rope.rerotate_keys(k0[0, 1, [11, 12], None], torch.tensor([16, 17]).to(device),
                                         torch.tensor([3, 4]).to(device), inv_freq.to(device))
    torch.testing.assert_close(k[0, 1, 3:5], expect[:, 0], atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("per_head", [False, True])
def test_select_keep_matches_loop(per_head):
    B, H, C = 2, 4, 100
    lens = torch.tensor([[100, 50, 20, 0], [7, 99, 64, 31]])
    scores = torch.rand(B, H, C)
    budget = torch.randint(8, 40, (B, H)) if per_head else 24
    keep, counts = kvc.select_keep(scores, lens, 4, 4, budget)
    ref = select_keep_ref(scores, lens, 4, 4, budget)
    for b in range(B):
        for h in range(H):
            n = int(counts[b, h])
            assert keep[b, h, :n].tolist() == ref[b][h]
            assert (keep[b, h, n:] == -1).all()
            L = int(lens[b, h])
            assert set(range(min(4, L))) <= set(ref[b][h])  # sinks never evicted
            assert set(range(max(L - 4, 0), L)) <= set(ref[b][h])


def test_sinks_survive_repeated_eviction(device):
    B, H, D = 1, 2, 8
    cache = kvc.KVCache(B, H, D, 48, track_scores=True, device=device)
    for step in range(40):
        cache.append(torch.randn(B, H, 4, D, device=device), torch.randn(B, H, 4, D, device=device))
        cache.attend(torch.randn(B, 4, 1, D, device=device), accumulate_scores=True)
        if cache.max_length() > 32:
            cache.keep_top(cache.scores, 4, 8, 24)
    for h in range(H):
        _, _, pos = cache.live(0, h)
        assert pos[:4].tolist() == [0, 1, 2, 3]
        assert pos[-8:].tolist() == list(range(160 - 8, 160))
        assert (pos[1:] > pos[:-1]).all()


def test_cache_step_equals_full_causal_attention(device):
    """Token-by-token decoding (and a 3-token chunk) through the cache equals causal attention
    over the whole sequence."""
    B, Hq, Hkv, D, L = 2, 4, 2, 16, 20
    q, k, v = (torch.randn(B, L, h, D, device=device) for h in (Hq, Hkv, Hkv))
    ref, _ = attention_ref(q, k, v, causal=True)
    cache = kvc.KVCache(B, Hkv, D, L, device=device)
    outs = []
    t = 0
    for n in [3] + [1] * (L - 3):
        sl = slice(t, t + n)
        o, _ = cache.step(q[:, sl].transpose(1, 2), k[:, sl].transpose(1, 2), v[:, sl].transpose(1, 2))
        outs.append(o.transpose(1, 2))
        t += n
    torch.testing.assert_close(torch.cat(outs, 1), ref, atol=2e-5, rtol=1e-4)


def test_deterministic(device):
    """Bit-identical results across thread counts (CPU) and across runs (CUDA: no atomics)."""
    B, Hq, Hkv, C, D = 1, 8, 2, 2000, 64
    k, v, lens, _ = _cache(B, Hkv, C, D, torch.float32, [2000, 1500], device=device)
    q = torch.randn(B, Hq, 2, D, device=device)
    n0 = torch.get_num_threads()
    res = []
    for nt in (1, 2):
        torch.set_num_threads(nt)
        s = torch.zeros(B, Hkv, C, device=device)
        res.append(kvc.decode_attention(q, k, v, lens, scores=s) + (s,))
    torch.set_num_threads(n0)
    for a, b in zip(*res):
        assert torch.equal(a, b)


def test_opcheck(device):
    B, Hq, Hkv, C, D = 1, 4, 2, 40, 16
    k, v, lens, pos = _cache(B, Hkv, C, D, torch.float32, [40, 25], device=device)
    q = torch.randn(B, Hq, 2, D, device=device)
    qp = torch.tensor([[30, 31]], device=device)
    torch.library.opcheck(torch.ops.longattn.decode_attention,
                          (q, k, v, lens, pos, qp, 0.25, -1, 0,
                           torch.zeros(B, Hkv, C, device=device)))
    torch.library.opcheck(torch.ops.longattn.decode_attention,
                          (q, k, v, lens, None, None, 0.25, 8, 2, None))
    keep = torch.tensor([[[0, 3, 5, 39], [1, 2, 24, -1]]], device=device)
    kl = torch.tensor([[4, 3]], device=device)
    torch.library.opcheck(torch.ops.longattn.compact_,
                          (k, v, pos, torch.rand(B, Hkv, C, device=device), lens.clone(), keep, kl))
    inv_freq, _ = longattn.rope.frequencies(D, 10000.0)
    newp = torch.tensor([[[0, 1, 2, 3], [7, 8, 9, 10]]], device=device)
    torch.library.opcheck(torch.ops.longattn.compact_rerotate_,
                          (k, v, pos, None, lens.clone(), keep, kl, newp, inv_freq.to(device),
                           D, False))


# ------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["compact_", "compact_rerotate_"])
@pytest.mark.parametrize("bad", ["unsorted", "duplicate", "beyond_length", "negative", "count",
                                 "length"])
def test_compact_rejects_bad_keep(bad, op, device):
    B, H, C, D = 1, 2, 20, 4
    k, v, lens, pos = _cache(B, H, C, D, torch.float32, [20, 10])
    keep = torch.tensor([[[0, 1, 2, 3], [2, 4, 6, 9]]])
    kl = torch.tensor([[4, 4]])
    if bad == "unsorted":
        keep[0, 1] = torch.tensor([0, 6, 4, 9])
    elif bad == "duplicate":
        keep[0, 1] = torch.tensor([0, 4, 4, 9])
    elif bad == "beyond_length":
        keep[0, 1, 3] = 10
    elif bad == "negative":
        keep[0, 1, 0] = -1
    elif bad == "count":
        kl[0, 0] = 5
    else:
        lens[0, 1] = 21
    k, v, lens, pos, keep, kl = (t.to(device) for t in (k, v, lens, pos, keep, kl))
    before = [t.clone() for t in (k, v, lens, pos)]
    match = {"count": "keep_lengths", "length": "lengths must lie"}.get(bad, "keep\\[0, 1\\]")
    with pytest.raises(RuntimeError, match=match):
        if op == "compact_":
            kvc.compact_(k, v, lens, keep, kl, positions=pos)
        else:
            kvc.compact_rerotate_(k, v, lens, keep, kl, pos, torch.ones(2, device=device))
    for t, t0 in zip((k, v, lens, pos), before):
        assert torch.equal(t, t0)  # nothing moved


def test_compact_rerotate_bad_rotation_args(device):
    k, v, lens, pos = _cache(1, 2, 20, 8, torch.float32, [20, 10], device=device)
    keep = torch.tensor([[[0, 1], [2, 4]]], device=device)
    kl = torch.tensor([[2, 2]], device=device)
    f = torch.ones(4, device=device)
    with pytest.raises(RuntimeError, match="rotary_dim"):
        kvc.compact_rerotate_(k, v, lens, keep, kl, pos, f, rotary_dim=7)
    with pytest.raises(RuntimeError, match="inv_freq"):
        kvc.compact_rerotate_(k, v, lens, keep, kl, pos, f, rotary_dim=6)
    with pytest.raises(RuntimeError, match="new_positions"):
        kvc.compact_rerotate_(k, v, lens, keep, kl, pos, f, new_positions=keep.int())


def test_select_keep_budget_too_small():
    with pytest.raises(ValueError, match="n_sink \\+ n_recent"):
        kvc.select_keep(torch.rand(1, 1, 10), torch.tensor([[10]]), 4, 4, 7)
    with pytest.raises(ValueError, match="n_sink \\+ n_recent"):
        kvc.select_keep(torch.rand(1, 2, 10), torch.tensor([[10, 10]]), 2, 2, torch.tensor([[8, 3]]))


def test_append_errors():
    cache = kvc.KVCache(1, 2, 4, 8)
    cache.append(torch.randn(1, 2, 6, 4), torch.randn(1, 2, 6, 4))
    with pytest.raises(RuntimeError, match="capacity"):
        cache.append(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4))
    assert cache.max_length() == 6
    with pytest.raises(TypeError, match="dtype"):
        cache.append(torch.randn(1, 2, 1, 4, dtype=torch.float64), torch.randn(1, 2, 1, 4))
    with pytest.raises(ValueError, match="kv_heads"):
        cache.append(torch.randn(1, 3, 1, 4), torch.randn(1, 3, 1, 4))
    with pytest.raises(ValueError, match="device"):
        cache.append(torch.randn(1, 2, 1, 4, device="meta"), torch.randn(1, 2, 1, 4))
    cache.grow(16)
    cache.append(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4))
    assert cache.max_length() == 9 and cache.positions[0, 0, :9].tolist() == list(range(9))


def test_decode_errors(device):
    k, v, lens, _ = _cache(1, 2, 10, 8, torch.float32, [10, 5], device=device)

    def q(h, dtype=torch.float32):
        return torch.randn(1, h, 1, 8, dtype=dtype, device=device)

    with pytest.raises(RuntimeError, match="dtype"):
        kvc.decode_attention(q(4, torch.float64), k, v, lens)
    with pytest.raises(RuntimeError, match="multiple"):
        kvc.decode_attention(q(3), k, v, lens)
    with pytest.raises(RuntimeError, match="scores"):
        kvc.decode_attention(q(4), k, v, lens, scores=torch.zeros(1, 2, 10, dtype=torch.float64,
                                                                  device=device))
    bad = torch.tensor([[11, 5]], device=device)
    if device == "cpu":
        with pytest.raises(RuntimeError, match="lengths"):
            kvc.decode_attention(q(4), k, v, bad)
    else:  # no host sync per decode step: the head with a bad length gets NaN rows
        out, lse = kvc.decode_attention(q(4), k, v, bad)
        assert out[0, :2].isnan().all() and lse[0, :2].isnan().all()
        assert not out[0, 2:].isnan().any()
    cache = kvc.KVCache(1, 2, 8, 10, device=device)
    with pytest.raises(RuntimeError, match="track_scores"):
        cache.attend(q(4), accumulate_scores=True)


def test_torch_compile_fullgraph(device):
    """Fake kernels + mutation annotations: compiled calls equal eager ones, scores and the
    compacted cache included."""
    B, Hq, Hkv, C, D = 1, 4, 2, 64, 16
    k, v, lens, pos = _cache(B, Hkv, C, D, torch.float32, [64, 40], device=device)
    q = torch.randn(B, Hq, 1, D, device=device)

    def f(q, k, v, lens, s):
        o, lse = kvc.decode_attention(q, k, v, lens, scores=s)
        return o * 2, lse

    s1, s2 = torch.zeros(B, Hkv, C, device=device), torch.zeros(B, Hkv, C, device=device)
    ref = f(q, k, v, lens, s1)
    got = torch.compile(f, fullgraph=True)(q, k, v, lens, s2)
    assert torch.equal(ref[0], got[0]) and torch.equal(ref[1], got[1]) and torch.equal(s1, s2)

    inv_freq = longattn.rope.frequencies(D, 10000.0)[0].to(device)

    def g(k, v, lens, keep, kl, keep2, kl2, p, s):
        kvc.compact_(k, v, lens, keep, kl, positions=p, scores=s)
        kvc.compact_rerotate_(k, v, lens, keep2, kl2, p, inv_freq, scores=s)
        return k.amax()  # exact in any reduction order

    keep = torch.tensor([[[0, 5, 9, -1], [1, 2, 3, 39]]], device=device)
    kl = torch.tensor([[3, 4]], device=device)
    keep2 = torch.tensor([[[0, 2], [1, 3]]], device=device)
    kl2 = torch.tensor([[2, 2]], device=device)
    a1 = [k.clone(), v.clone(), lens.clone(), keep, kl, keep2, kl2, pos.clone(),
          torch.rand(B, Hkv, C, device=device)]
    a2 = [t.clone() for t in a1]
    r1, r2 = g(*a1), torch.compile(g, fullgraph=True)(*a2)
    assert torch.equal(r1, r2) and all(torch.equal(x, y) for x, y in zip(a1, a2))


def test_append_with_different_head_lengths(device):
    B, H, D = 2, 3, 4
    cache = kvc.KVCache(B, H, D, 16, track_scores=True, device=device)
    k0, v0 = torch.randn(B, H, 10, D, device=device), torch.randn(B, H, 10, D, device=device)
    cache.append(k0, v0)
    cache.scores.fill_(1.0)
    keep = torch.tensor([[0, 2, 5, 9, -1], [1, 3, -1, -1, -1], [0, 1, 2, 3, 4]],
                        device=device).expand(B, H, 5)
    counts = torch.tensor([[4, 2, 5], [4, 2, 5]], device=device)
    cache.compact_(keep, counts)
    k1, v1 = torch.randn(B, H, 2, D, device=device), torch.randn(B, H, 2, D, device=device)
    cache.append(k1, v1)
    for b in range(B):
        for h in range(H):
            n = int(counts[b, h])
            idx = keep[b, h, :n]
            kk, vv, pp = cache.live(b, h)
            assert torch.equal(kk, torch.cat([k0[b, h, idx], k1[b, h]]))
            assert torch.equal(vv, torch.cat([v0[b, h, idx], v1[b, h]]))
            assert pp.tolist() == idx.tolist() + [10, 11]
            assert cache.scores[b, h, :n + 2].tolist() == [1.0] * n + [0.0, 0.0]
