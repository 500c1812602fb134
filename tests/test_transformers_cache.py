"""LongattnCache (longattn.integrations.transformers) in transformers' generation: cached
decoding against eager, and eviction against a plain-PyTorch replay of each paper's rule.

The replay (:class:`Replay`) is fed exactly what the attention function received (rotated
queries and keys, padding mask, positions: hf_models.recording), keeps per (layer, sequence,
kv head) its own lists of positions, keys and scores, computes the attention probabilities in
float64 and evicts by the rule; the cache must hold the same positions.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from helpers import TRANSFORMERS, assert_close_rule, optional_import

optional_import("transformers", *TRANSFORMERS)

import longattn  # noqa: E402
from hf_models import (MODELS, WINDOW, cache_kw, fp64_copy, left_padded,  # noqa: E402
                       positions_of, recording, tiny_model)
from longattn import kvcache as kvc  # noqa: E402
from longattn.integrations import transformers as lt  # noqa: E402
from longattn.reference import select_keep_ref  # noqa: E402

lt.register()


def _forward(model, ids, mask, cache):
    """One forward of ``ids`` (the newest columns of ``mask``) through the cache."""
    n = ids.shape[1]
    with torch.no_grad():
        return model(ids, attention_mask=mask, position_ids=positions_of(mask)[:, -n:],
                     use_cache=True, **{cache_kw(model): cache}).logits


def _held(cache, layer):
    kv = cache.layers[layer].kv
    return [[kv.live(b, h)[2].tolist() for h in range(kv.kv_heads)] for b in range(kv.batch)]


# ---------------------------------------------------------------------------------------------
# Without eviction
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", MODELS)
def test_cached_decoding_matches_eager(name):
    """Prefill then single-token steps past the sliding window, teacher-forced, left padding:
    every step's logits against eager over the whole sequence (tolerance rule; the truth runs
    each sequence alone in fp64, see test_transformers_integration._rows_unpadded)."""
    model = tiny_model(name, "longattn")
    P, T = 10, 7
    ids, mask = left_padded(2, P + T, [0, 3])
    cache = lt.LongattnCache(model.config)
    out = [_forward(model, ids[:, :P], mask[:, :P], cache)]
    for t in range(P, P + T):
        out.append(_forward(model, ids[:, t:t + 1], mask[:, :t + 1], cache))
    real = mask.bool()
    out = torch.cat(out, 1)[real]
    ref64 = fp64_copy(model)
    ref64.set_attn_implementation("eager")
    model.set_attn_implementation("eager")
    with torch.no_grad():
        ref = torch.cat([ref64(ids[b:b + 1, real[b]]).logits[0] for b in range(2)])
        lo = model(ids, attention_mask=mask).logits[real]
    assert_close_rule(out, ref, lo, name=f"{name} cached logits")
    assert cache.get_seq_length() == P + T
    for i, layer in enumerate(cache.layers):  # padding is not stored
        if not layer.is_sliding:
            assert [sum(map(len, row)) for row in _held(cache, i)] == [2 * (P + T), 2 * (P + T - 3)]


def test_beam_search_matches_dynamic_cache():
    model = tiny_model("llama", "longattn")
    ids, mask = left_padded(2, 10, [0, 2])
    kw = dict(attention_mask=mask, max_new_tokens=6, num_beams=3, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expect = model.generate(ids, **kw)
        got = model.generate(ids, **kw, **{cache_kw(model): lt.LongattnCache(model.config)})
    assert torch.equal(got, expect)


def test_crop_then_refeed_and_reset():
    model = tiny_model("llama", "longattn")
    ids, mask = left_padded(2, 12, [0, 2])
    cache = lt.LongattnCache(model.config)
    expect = _forward(model, ids, mask, cache)
    cache.crop(-4)
    assert cache.get_seq_length() == 8
    got = _forward(model, ids[:, 8:], mask, cache)
    torch.testing.assert_close(got, expect[:, 8:], atol=1e-5, rtol=0)
    cache.reset()
    assert cache.get_seq_length() == 0
    torch.testing.assert_close(_forward(model, ids, mask, cache), expect, atol=1e-5, rtol=0)


def test_sliding_layers_hold_their_window():
    """Gemma 3's sliding layer 0 keeps what its window can still see (less than 2 * W keys
    between trims) and its buffers never grow; the global layer 1 keeps everything."""
    model = tiny_model("gemma3", "longattn")
    ids, mask = left_padded(1, 90, [0])
    cache = lt.LongattnCache(model.config)
    _forward(model, ids[:, :8], mask[:, :8], cache)
    start = cache.layers[0].nbytes()
    for t in range(8, 90):
        _forward(model, ids[:, t:t + 1], mask[:, :t + 1], cache)
        kept = _held(cache, 0)[0][0]
        assert len(kept) < 2 * WINDOW and kept == list(range(t - len(kept) + 1, t + 1))
    assert _held(cache, 1)[0][0] == list(range(90))
    assert cache.layers[0].nbytes() == start < cache.layers[1].nbytes() / 2


# ---------------------------------------------------------------------------------------------
# Eviction: the replay
# ---------------------------------------------------------------------------------------------

def _ratio_budget(n, ratio, floor):
    return max(math.floor(n * (1 - ratio)), floor, 1)


class Replay:
    """What each rule keeps, from the attention function's inputs alone."""

    def __init__(self, rule, budget=None, ratio=None, n_sink=0, n_recent=0, window=0, kernel=1,
                 pooling="max"):
        self.rule, self.budget, self.ratio = rule, budget, ratio
        self.n_sink, self.n_recent, self.window, self.kernel = n_sink, n_recent, window, kernel
        self.pooling = pooling
        self.state = {}

    def feed(self, call):
        q, k = call.query.double(), call.key.double()
        B, Hq, n, D = q.shape
        G = Hq // k.shape[1]
        valid = (torch.ones(B, n, dtype=torch.bool) if call.mask is None
                 else call.mask[:, -n:].bool())
        pos = call.position_ids.expand(B, n)
        scale = call.scaling or 1.0 / math.sqrt(D)
        for b in range(B):
            rows = valid[b].nonzero().flatten()
            for h in range(k.shape[1]):
                st = self.state.setdefault((call.layer, b, h), dict(k=[], p=[], s=[]))
                prefill = not st["p"]
                st["k"] += list(k[b, h, rows])
                st["p"] += pos[b, rows].tolist()
                st["s"] += [0.0] * len(rows)
                K, P = torch.stack(st["k"]), torch.tensor(st["p"])
                Q = q[b, h * G:(h + 1) * G][:, rows]  # (G, m, D)
                logits = (Q @ K.T) * scale
                vis = P[None, None, :] <= pos[b, rows][None, :, None]
                probs = torch.softmax(logits.masked_fill(~vis, -math.inf), -1)  # (G, m, N)
                keep = self.keep(probs, st, prefill)
                if keep is not None:
                    for key in ("k", "p", "s"):
                        st[key] = [st[key][j] for j in keep]

    def keep(self, probs, st, prefill):
        N = len(st["p"])
        if self.rule == "h2o":  # heavy hitters: attention summed over every query so far
            st["s"] = [a + float(b) for a, b in zip(st["s"], probs.sum((0, 1)))]
        budget = self.budget
        if self.ratio is not None:  # a press: once, on the prompt
            if not prefill:
                return None
            floor = self.window if self.rule == "snapkv" else self.n_sink + self.n_recent
            budget = _ratio_budget(N, self.ratio, floor)
        elif self.rule == "snapkv" and not prefill:
            return None
        if N <= budget:
            return None
        if self.rule == "streaming":
            return list(range(self.n_sink)) + list(range(N - (budget - self.n_sink), N))
        if self.rule == "h2o":
            scores, n_recent = torch.tensor(st["s"]), self.n_recent
        elif self.rule == "tova":  # the last query's attention, mean over the group
            scores, n_recent = probs[:, -1].mean(0), 0
        elif self.rule == "snapkv":
            scores, n_recent = self.snapkv_votes(probs, N), self.window
        return select_keep_ref(scores[None, None], torch.tensor([[N]]), self.n_sink, n_recent,
                               budget)[0][0]

    def snapkv_votes(self, probs, N):
        """The window's votes for the prefix keys. kvpress (the presses, average pooling): per
        q head the window's mean, pooled, then the group's mean. longattn.kvcache.SnapKV (the
        paper's vote, a GQA group voting together): summed over the group and the window,
        then pooled."""
        W, k = self.window, self.kernel
        if self.pooling == "avg":
            v = probs[:, -W:, : N - W].mean(1)[:, None]  # (G, 1, N - W)
            v = F.avg_pool1d(v, k, 1, k // 2, count_include_pad=True)[:, 0].mean(0)
        else:
            v = F.max_pool1d(probs[:, -W:, : N - W].sum((0, 1))[None], k, 1, k // 2)[0]
        return torch.cat([v, torch.zeros(W, dtype=v.dtype)])

    def held(self, layer, B, H):
        return [[self.state[(layer, b, h)]["p"] for h in range(H)] for b in range(B)]


def _generate_recorded(model, cache, ids, mask, steps):
    """Greedy steps through the cache, recording the attention calls."""
    with recording() as calls:
        logits = _forward(model, ids, mask, cache)
        for _ in range(steps):
            nxt = logits[:, -1:].argmax(-1)
            ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
            logits = _forward(model, nxt, mask, cache)
    return calls


CASES = {
    "StreamingLLMPress": (lambda: dict(press=lt.StreamingLLMPress(0.5, n_sink=2)),
                          Replay("streaming", ratio=0.5, n_sink=2)),
    "SnapKVPress": (lambda: dict(press=lt.SnapKVPress(0.6, window_size=4, kernel_size=3)),
                    Replay("snapkv", ratio=0.6, window=4, kernel=3, pooling="avg")),
    "H2OPress": (lambda: dict(press=lt.H2OPress(0.5, n_recent=2, n_sink=1)),
                 Replay("h2o", ratio=0.5, n_sink=1, n_recent=2)),
    "StreamingLLM": (lambda: dict(policy=kvc.StreamingLLM(2, 6)),
                     Replay("streaming", budget=8, n_sink=2)),
    "H2O": (lambda: dict(policy=kvc.H2O(8, n_recent=2, n_sink=1)),
            Replay("h2o", budget=8, n_sink=1, n_recent=2)),
    "TOVA": (lambda: dict(policy=kvc.TOVA(8)), Replay("tova", budget=8)),
    "SnapKV": (lambda: dict(policy=kvc.SnapKV(9, window=4, kernel_size=3)),
               Replay("snapkv", budget=9, window=4, kernel=3)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_eviction_keeps_what_the_rule_keeps(case):
    """Llama, two left-padded prompts of different lengths (so per-sequence budgets), then
    greedy steps: every layer holds the replay's positions, and H2O's scores."""
    make, replay = CASES[case]
    model = tiny_model("llama", "longattn")
    ids, mask = left_padded(2, 20, [0, 5])
    cache = lt.LongattnCache(model.config, **make())
    calls = _generate_recorded(model, cache, ids, mask, steps=6)
    for call in calls:
        replay.feed(call)
    for layer in range(2):
        assert _held(cache, layer) == replay.held(layer, 2, 2), f"layer {layer}"
        if replay.rule == "h2o" and replay.ratio is None:
            kv = cache.layers[layer].kv
            for b in range(2):
                for h in range(2):
                    s = replay.state[(layer, b, h)]["s"]
                    torch.testing.assert_close(kv.scores[b, h, :len(s)].double(),
                                               torch.tensor(s, dtype=torch.float64),
                                               atol=1e-5, rtol=1e-5)
    assert cache.layers[0].evicted


def test_streaming_llm_shift_puts_new_tokens_inside_the_cache():
    """StreamingLLM with shifted positions (the paper): the cache renumbers its keys 0..n-1
    and every new token, rotated by the model at its true position, attends as if rotated at
    position n. Against a float64 replay that rotates raw keys and queries at cache slots."""
    B, Hq, Hkv, D, T, n_sink, n_recent = 2, 4, 2, 16, 24, 2, 6
    inv_freq, _ = longattn.rope.frequencies(D, 10000.0)
    layer = lt.LongattnLayer(policy=kvc.StreamingLLM(n_sink, n_recent, shift_positions=True,
                                                     inv_freq=inv_freq))
    raw_q, raw_k, v = (torch.randn(T, B, 1, h, D) for h in (Hq, Hkv, Hkv))

    def rot(x, p):  # (B, 1, H, D) rotated at position p, in the model's (B, H, 1, D) layout
        return longattn.apply_rope(x, None, torch.full((B, 1), p), inv_freq).transpose(1, 2)

    kept = []
    for t in range(T):
        q, k = rot(raw_q[t], t), rot(raw_k[t], t)
        kw = {}
        layer.update(k, v[t].transpose(1, 2), kwargs=kw)
        assert kw["longattn_layer"] is layer
        out = layer.attend(q, k, v[t].transpose(1, 2), None, torch.full((1, 1), t), causal=True,
                           window=None, scale=None, softcap=0.0, sink_logits=None)
        kept.append(t)
        n = len(kept)
        K = torch.cat([rot(raw_k[j].double(), i) for i, j in enumerate(kept)], 2)
        V = torch.cat([v[j].double().transpose(1, 2) for j in kept], 2)
        Q = rot(raw_q[t].double(), n - 1)
        K, V = K.repeat_interleave(Hq // Hkv, 1), V.repeat_interleave(Hq // Hkv, 1)
        ref = torch.softmax(Q @ K.transpose(-1, -2) / math.sqrt(D), -1) @ V
        torch.testing.assert_close(out.double(), ref.transpose(1, 2), atol=2e-6, rtol=1e-5)
        if n > n_sink + n_recent:
            kept = kept[:n_sink] + kept[-n_recent:]
        assert layer.kv.positions[:, :, :len(kept)].tolist() == [[list(range(len(kept)))] * Hkv] * B


@pytest.mark.parametrize("make", [lambda: kvc.StreamingLLM(2, 10), lambda: kvc.H2O(12, 4, 2)],
                         ids=["StreamingLLM", "H2O"])
def test_memory_held_is_bounded(make):
    """A 160-token prompt and 60 steps under a 12-key budget: after the prefill's eviction the
    buffers shrink and never grow again."""
    model = tiny_model("llama", "longattn")
    ids, mask = left_padded(2, 160, [0, 9])
    cache = lt.LongattnCache(model.config, policy=make())
    dynamic = lt.LongattnCache(model.config)
    logits = _forward(model, ids, mask, cache)
    _forward(model, ids, mask, dynamic)
    held = []
    for _ in range(60):
        nxt = logits[:, -1:].argmax(-1)
        mask = torch.cat([mask, torch.ones_like(nxt)], 1)
        logits = _forward(model, nxt, mask, cache)
        _forward(model, nxt, mask, dynamic)
        held.append(cache.nbytes())
        assert max(max(map(len, row)) for row in _held(cache, 1)) <= 12
    assert len(set(held)) == 1
    assert held[0] < dynamic.nbytes() / 4


# ---------------------------------------------------------------------------------------------
# What it refuses
# ---------------------------------------------------------------------------------------------

def test_needs_the_longattn_attention():
    model = tiny_model("llama", "eager")
    ids, mask = left_padded(1, 6, [0])
    cache = lt.LongattnCache(model.config)
    _forward(model, ids, mask, cache)
    with pytest.raises(RuntimeError, match="attn_implementation='longattn'"):
        _forward(model, ids[:, :1], torch.ones(1, 7, dtype=torch.long), cache)


def test_refusals():
    gemma2 = tiny_model("gemma2", "longattn")
    ids, mask = left_padded(1, 8, [0])
    with pytest.raises(NotImplementedError, match="softcap"):
        _forward(gemma2, ids, mask, lt.LongattnCache(gemma2.config, policy=kvc.H2O(4, 1)))
    llama = tiny_model("llama", "longattn")
    cache = lt.LongattnCache(llama.config, policy=kvc.StreamingLLM(1, 3))
    _forward(llama, ids, mask, cache)
    assert not cache.is_croppable
    with pytest.raises(NotImplementedError, match="rolled back"):
        cache.crop(-1)
    with pytest.raises(ValueError, match="policies for"):
        lt.LongattnCache(llama.config, policy=[None])
    with pytest.raises(TypeError, match="policy"):
        lt.LongattnCache(llama.config, policy=kvc.AdaKV(8))
    with pytest.raises(ValueError, match="compression_ratio"):
        lt.SnapKVPress(1.0)
