"""Eviction policies on longattn.kvcache.KVCache against straightforward PyTorch versions of
each rule (on each device of the build: the policies run the cache's ops there)."""
import math

import pytest
import torch
import torch.nn.functional as F

import longattn
from longattn import kvcache as kvc


def _filled(B, Hkv, D, L, capacity=None, track=False, dtype=torch.float32, device="cpu"):
    cache = kvc.KVCache(B, Hkv, D, capacity or L, dtype=dtype, track_scores=track, device=device)
    k, v = (torch.randn(B, Hkv, L, D, dtype=dtype).to(device) for _ in range(2))
    cache.append(k, v)
    return cache, k, v


def _kept_positions(cache):
    return [[cache.live(b, h)[2].tolist() for h in range(cache.kv_heads)] for b in range(cache.batch)]


def _eager_probs(q, k, lengths, q_pos=None, k_pos=None):
    """Softmax probabilities (B, Hq, n, C) of q over k (B, Hkv, C, D), masked per length
    (and causally on positions when given)."""
    B, Hq, n, D = q.shape
    Hkv, C = k.shape[1], k.shape[2]
    G = Hq // Hkv
    s = q.double() @ k.double().repeat_interleave(G, 1).transpose(-1, -2) / math.sqrt(D)
    slot = torch.arange(C, device=q.device)
    vis = (slot < lengths.long().repeat_interleave(G, 1)[..., None, None]).expand(B, Hq, n, C)
    if q_pos is not None:
        vis = vis & (k_pos.repeat_interleave(G, 1)[:, :, None, :] <= q_pos[:, None, :, None])
    return torch.softmax(s.masked_fill(~vis, -math.inf), -1).nan_to_num(0.0)


def test_streaming_llm_keeps_sinks_and_recent(device):
    cache, _, _ = _filled(2, 2, 8, 50, capacity=64, device=device)
    kvc.StreamingLLM(4, 10).compress(cache)
    for row in _kept_positions(cache):
        for pos in row:
            assert pos == [0, 1, 2, 3] + list(range(40, 50))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streaming_llm_shift_equals_rotation_at_cache_positions(dtype, device):
    B, H, D, L, n_sink, n_recent = 2, 3, 64, 300, 4, 60
    inv_freq, _ = longattn.rope.frequencies(D, 10000.0)
    raw = torch.randn(B, H, L, D)
    pos = torch.arange(L)
    rot = longattn.apply_rope(raw.transpose(1, 2).contiguous(), None, pos[None].expand(B, L),
                              inv_freq).transpose(1, 2)
    cache = kvc.KVCache(B, H, D, L, dtype=dtype, device=device)
    cache.append(rot.to(dtype).to(device), torch.randn(B, H, L, D).to(dtype).to(device))
    policy = kvc.StreamingLLM(n_sink, n_recent, shift_positions=True, inv_freq=inv_freq.to(device))
    policy.compress(cache)
    kept = torch.tensor(list(range(n_sink)) + list(range(L - n_recent, L)))
    n = len(kept)
    expect = longattn.apply_rope(raw[:, :, kept].transpose(1, 2).contiguous(), None,
                                 torch.arange(n)[None].expand(B, n), inv_freq).transpose(1, 2)
    tol = dict(atol=2e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=2e-2)
    torch.testing.assert_close(cache.k[:, :, :n].float().cpu(), expect, **tol)
    assert cache.positions[:, :, :n].tolist() == [[list(range(n))] * H] * B
    assert cache.next_position.tolist() == [n] * B
    # The next token gets position n; shifting again by a whole eviction keeps exactness.
    zeros = torch.zeros(B, H, 1, D, dtype=dtype, device=device)
    cache.append(zeros, zeros)
    assert cache.positions[0, 0, n].item() == n


def test_h2o_matches_eager_simulation(device):
    """Decode T steps with accumulated scores and H2O eviction; the reference keeps its own
    lists of positions and eager-attention scores and evicts by the paper's rule."""
    B, Hq, Hkv, D, T = 1, 4, 2, 16, 60
    budget, n_recent, n_sink = 16, 4, 2
    cache = kvc.KVCache(B, Hkv, D, budget + 1, track_scores=True, device=device)
    policy = kvc.H2O(budget, n_recent, n_sink)
    ref = [dict(k=[], s=[], p=[]) for _ in range(Hkv)]
    for t in range(T):
        k, v, q = torch.randn(B, Hkv, 1, D), torch.randn(B, Hkv, 1, D), torch.randn(B, Hq, 1, D)
        cache.append(k.to(device), v.to(device))
        cache.attend(q.to(device), accumulate_scores=True)
        policy.compress(cache)
        for h in range(Hkv):
            r = ref[h]
            r["k"].append(k[0, h, 0]); r["s"].append(0.0); r["p"].append(t)
            kk = torch.stack(r["k"]).double()
            pr = torch.softmax(q[0, 2 * h: 2 * h + 2, 0].double() @ kk.T / math.sqrt(D), -1).sum(0)
            r["s"] = [a + float(b) for a, b in zip(r["s"], pr)]
            L = len(r["k"])
            if L > budget:
                fixed = set(range(n_sink)) | set(range(L - n_recent, L))
                mid = sorted((j for j in range(L) if j not in fixed), key=lambda j: -r["s"][j])
                keepj = sorted(fixed | set(mid[: budget - len(fixed)]))
                for key in ("k", "s", "p"):
                    r[key] = [r[key][j] for j in keepj]
        for h in range(Hkv):
            assert cache.live(0, h)[2].tolist() == ref[h]["p"], f"step {t} head {h}"
            n = len(ref[h]["s"])
            torch.testing.assert_close(cache.scores[0, h, :n].double().cpu(),
                                       torch.tensor(ref[h]["s"], dtype=torch.float64),
                                       atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("per_head", [True, False])
def test_tova_matches_last_query_rule(per_head, device):
    B, Hq, Hkv, D, L, budget = 2, 4, 2, 16, 80, 24
    cache, k, _ = _filled(B, Hkv, D, L, device=device)
    q = torch.randn(B, Hq, 1, D).to(device)
    p = _eager_probs(q, cache.k, cache.lengths)[:, :, 0]  # (B, Hq, C)
    s = p.view(B, Hkv, Hq // Hkv, -1).mean(2)
    if not per_head:
        s = s.mean(1, keepdim=True).expand_as(s)
    expect = s.topk(budget, -1).indices.sort(-1).values
    kvc.TOVA(budget, per_head=per_head).compress(cache, q)
    assert torch.equal(cache.positions[:, :, :budget], expect)
    assert (cache.lengths == budget).all()


@pytest.mark.parametrize("pooling", ["max", "avg"])
def test_snapkv_matches_rule(pooling, device):
    B, Hq, Hkv, D, L, W, budget, ks = 2, 4, 2, 16, 120, 8, 40, 5
    cache, _, _ = _filled(B, Hkv, D, L, device=device)
    # Different per-head lengths: drop some tokens of one head first (still ending at L - 1).
    keep = torch.arange(L).expand(B, Hkv, L).clone()
    counts = torch.full((B, Hkv), L)
    keep[0, 1, : L - 20] = torch.arange(20, L)
    keep[0, 1, L - 20:] = -1
    counts[0, 1] = L - 20
    cache.compact_(keep.to(device), counts.to(device))
    qw = torch.randn(B, Hq, W, D).to(device)
    qpos = torch.arange(L - W, L, device=device).expand(B, W)
    policy = kvc.SnapKV(budget, window=W, kernel_size=ks, pooling=pooling)
    expect = []
    for b in range(B):
        row = []
        for h in range(Hkv):
            kk, _, pp = cache.live(b, h)
            n = kk.shape[0]
            s = (qw[b, 2 * h: 2 * h + 2].double() @ kk.double().T) / math.sqrt(D)
            s = s.masked_fill(pp[None, None, :] > qpos[b][None, :, None], -math.inf)
            votes = torch.softmax(s, -1).sum((0, 1))[: n - W].float()[None, None]
            pool = F.max_pool1d if pooling == "max" else F.avg_pool1d
            votes = pool(votes, ks, 1, ks // 2)[0, 0]
            top = torch.argsort(votes, descending=True, stable=True)[: budget - W]  # ties: lower slot
            row.append(sorted(pp[top].tolist() + pp[n - W:].tolist()))
        expect.append(row)
    policy.compress(cache, qw, qpos)
    assert _kept_positions(cache) == expect


def test_adakv_budgets_match_rule_and_respect_floor():
    B, H, C, budget, floor = 2, 4, 64, 16, 4
    lengths = torch.tensor([[64, 64, 10, 3], [64, 40, 64, 64]])
    scores = torch.rand(B, H, C) ** torch.tensor([1.0, 4.0, 1.0, 0.5]).view(1, H, 1)
    got = kvc.adaptive_budgets(scores, lengths, budget, floor)
    for b in range(B):
        base = [min(int(lengths[b, h]), floor) for h in range(H)]
        rest = []
        for h in range(H):
            L = int(lengths[b, h])
            order = sorted(range(L), key=lambda j: -float(scores[b, h, j]))
            rest += [(float(scores[b, h, j]), h) for j in order[base[h]:]]
        rest.sort(key=lambda x: -x[0])
        extra = budget * H - sum(base)
        cnt = [0] * H
        for _, h in rest[:extra]:
            cnt[h] += 1
        assert got[b].tolist() == [base[h] + cnt[h] for h in range(H)]
        assert int(got[b].sum()) == min(budget * H, int(lengths[b].sum()))


def test_adakv_compress_keeps_sinks_and_recent(device):
    B, H, D, L = 1, 4, 8, 100
    cache, _, _ = _filled(B, H, D, L, track=True, device=device)
    cache.scores[:, :, :L] = (torch.rand(B, H, L) ** torch.tensor([1.0, 8.0, 1.0, 0.3]).view(1, H, 1)).to(device)
    pol = kvc.AdaKV(budget=20, floor_frac=0.5, n_sink=2, n_recent=3)
    b = pol.budgets(cache, cache.scores)
    pol.compress(cache, cache.scores)
    assert cache.lengths.sum().item() == 20 * H
    assert torch.equal(cache.lengths.long(), b)
    for h in range(H):
        pos = cache.live(0, h)[2].tolist()
        assert pos[:2] == [0, 1] and pos[-3:] == [97, 98, 99] and len(pos) >= 10


def test_generation_demo():
    """examples/kvcache_generation.py: full-size caches reproduce the full causal forward;
    a StreamingLLM stream keeps the cache's memory flat."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "examples", "kvcache_generation.py")
    spec = importlib.util.spec_from_file_location("kvcache_generation", path)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    model = demo.TinyLlama().eval()
    assert demo.check_full_cache(model, prompt_len=24, new=8) < 1e-4
    sizes = demo.stream(model, 120, n_sink=4, n_recent=20)
    assert len({s[1] for s in sizes}) == 1 and all(s[2] <= 25 and s[3] for s in sizes)
