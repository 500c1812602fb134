"""Our StreamingLLM and SnapKV policies against NVIDIA kvpress's presses on a tiny random Llama.

Skipped unless kvpress (``pip install --no-deps kvpress``) and transformers are importable;
``make verify STEPS=kvpress`` runs this file twice: with kvpress beside the development venv's
transformers (kvpress's ``compress`` called from tests/kvpress_harness.py's hook), and in
kvpress's own pinned venv with the transformers it supports (kvpress's own hooks). Per layer, the harness records
the cached keys/values and rotated queries the press saw, the scores it computed and the
indices it kept; our policies then run on a longattn KVCache holding the same keys.

The configuration under which the two agree (kvpress 0.5.5):

* StreamingLLMPress(compression_ratio=r, n_sink=s) keeps ``n = max(1, int(L * (1 - r)))`` keys:
  the first s and the last n - s, the same for every head = ``StreamingLLM(s, n - s)``.
  KeyRerotationPress around it re-rotates kept key j to position j = ``shift_positions=True``.
* SnapKVPress(compression_ratio=r, window_size=W, kernel_size=k) keeps n keys per KV head:
  all W window keys plus the top n - W prefix keys by a vote = ``SnapKV(budget=n, window=W,
  kernel_size=k, pooling="avg", n_sink=0)``. kvpress's vote of prefix key j for KV head h:
  for every q head of h's group, the softmax probability of j (causal softmax over all L keys)
  averaged over the W window queries, average-pooled over the prefix (stride 1, zero padding
  k // 2 at both ends, counted in the mean), then averaged over the group. Ours sums over the
  group's q heads and the window queries, then pools: the same vote times W * G, since
  average pooling is linear.

Where they differ (not exercised here): our SnapKV defaults are window=32, kernel_size=7,
pooling="max" (kvpress: 64, 5, average); with max pooling, pooling the group's sum is not
the mean of per-head pools. kvpress turns the scores into bf16/fp16 with the model's dtype
before averaging (ours accumulate in fp32), so in low precision near-tied keys can rank
differently. When n < W (SnapKV) or n < n_sink (StreamingLLM) kvpress keeps an arbitrary
subset of tied keys; ours refuses the budget. kvpress's top-k breaks exact ties in no
documented order; ours keeps the lower slot.
"""
import os

import pytest
import torch

from helpers import assert_close_rule
from kvpress_harness import load_presses, run_press, tiny_llama

try:
    presses, _why = load_presses(), "kvpress or transformers is not installed"
except Exception as e:  # noqa: BLE001 - installed, but kvpress or transformers breaks at import
    presses, _why = None, f"kvpress's presses do not import: {type(e).__name__}: {e}"
if presses is None:
    if os.environ.get("LONGATTN_REQUIRE_KVPRESS") == "1":  # set by make verify STEPS=kvpress
        raise ImportError(_why)
    pytest.skip(f"{_why} (make verify STEPS=kvpress installs them)", allow_module_level=True)

from longattn import kvcache as kvc  # noqa: E402

L, B = 101, 2


def _rerotated64(keys, kept, inv_freq):
    """keys[..., kept, :] (rotated at their index, half-split pairs) rotated on to position j
    for kept slot j, in float64."""
    k = keys.double().gather(2, kept[..., None].expand(-1, -1, -1, keys.shape[-1]))
    delta = torch.arange(kept.shape[-1]) - kept  # new - old position
    ang = delta[..., None].double() * inv_freq.double()
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    k1, k2 = k.chunk(2, -1)
    return k * cos + torch.cat([-k2, k1], -1) * sin


def _cache_of(run):
    B_, H, L_, D = run.keys.shape
    cache = kvc.KVCache(B_, H, D, L_)
    cache.append(run.keys, run.values)
    return cache


def _kept(cache, n):
    assert cache.lengths.tolist() == [[n] * cache.kv_heads] * cache.batch
    return cache.positions[:, :, :n]


def _mask(idx, L_):
    return torch.zeros(idx.shape[:-1] + (L_,), dtype=torch.bool).scatter_(-1, idx, True)


def assert_same_kept(ours, theirs, scores, tol):
    """Equal kept sets per (batch, head), except for keys whose score (kvpress's) lies within
    ``tol`` of the cut (the lowest kept score): those two implementations may order either way."""
    mine, other = _mask(ours, scores.shape[-1]), _mask(theirs, scores.shape[-1])
    diff = mine ^ other
    if not bool(diff.any()):
        return
    cut = scores.masked_fill(~other, float("inf")).amin(-1, keepdim=True)
    far = diff & ((scores - cut).abs() > tol)
    assert not bool(far.any()), (
        f"kept sets differ beyond ties at (batch, head, key) {far.nonzero().tolist()[:8]}; "
        f"ours {ours[far.any(-1)].tolist()[:1]}, kvpress {theirs[far.any(-1)].tolist()[:1]}")


@pytest.fixture(params=["eager", "sdpa"])
def attn(request):
    """eager: kvpress's SnapKV reads the attention weights the layer returned; sdpa: it
    recomputes the window's attention from the layer's input."""
    return request.param


@pytest.fixture(params=[(4, 2), (4, 4)], ids=["gqa2", "mha"])
def model(request, attn):
    heads, kv_heads = request.param
    return tiny_llama(heads=heads, kv_heads=kv_heads, attn_implementation=attn)


def _prompt(model):
    """Distinct tokens per row: the harness finds kept entries by their (unique) value rows, and
    layer 0's values depend on the token alone."""
    return torch.stack([torch.randperm(model.config.vocab_size)[:L] for _ in range(B)])


@pytest.mark.parametrize("n_sink,ratio", [(4, 0.6), (1, 0.3), (0, 0.9)])
def test_streaming_llm_press(model, n_sink, ratio):
    runs = run_press(model, _prompt(model), presses.StreamingLLMPress(compression_ratio=ratio,
                                                                      n_sink=n_sink))
    n = max(1, int(L * (1 - ratio)))
    for run in runs:
        cache = _cache_of(run)
        kvc.StreamingLLM(n_sink, n - n_sink).compress(cache)
        assert torch.equal(_kept(cache, n), run.kept)


def test_key_rerotation_streaming_llm_press(model):
    """KeyRerotationPress(StreamingLLMPress): the kept keys re-rotated to their cache index."""
    n_sink, ratio = 4, 0.5
    press = presses.KeyRerotationPress(presses.StreamingLLMPress(compression_ratio=ratio,
                                                                 n_sink=n_sink))
    runs = run_press(model, _prompt(model), press)
    n = max(1, int(L * (1 - ratio)))
    inv_freq = model.model.rotary_emb.inv_freq
    for run in runs:
        cache = _cache_of(run)
        kvc.StreamingLLM(n_sink, n - n_sink, shift_positions=True, inv_freq=inv_freq).compress(cache)
        assert torch.equal(cache.positions[:, :, :n], torch.arange(n).expand_as(run.kept))
        assert run.kept.tolist() == [[list(range(n_sink)) + list(range(L - n + n_sink, L))]
                                     * cache.kv_heads] * B
        # Both against the kept keys re-rotated in float64 (the project's tolerance rule, with
        # kvpress's fp32 rotation as the low-precision baseline).
        assert_close_rule(cache.k[:, :, :n], _rerotated64(run.keys, run.kept, inv_freq),
                          run.kept_keys, name="re-rotated keys")


@pytest.mark.parametrize("window,kernel,ratio", [(8, 5, 0.5), (16, 7, 0.7), (5, 3, 0.25),
                                                 (8, 1, 0.5)])
def test_snapkv_press(model, window, kernel, ratio):
    press = presses.SnapKVPress(compression_ratio=ratio, window_size=window, kernel_size=kernel)
    runs = run_press(model, _prompt(model), press)
    n = max(1, int(L * (1 - ratio)))
    G = model.config.num_attention_heads // model.config.num_key_value_heads
    for run in runs:
        cache = _cache_of(run)
        policy = kvc.SnapKV(budget=n, window=window, kernel_size=kernel, pooling="avg")
        q_window = run.queries[:, :, -window:]
        # The votes: ours are kvpress's times W * G on the prefix.
        ours = policy.votes(cache, q_window)[..., : L - window] / (window * G)
        theirs = run.scores[..., : L - window]
        torch.testing.assert_close(ours, theirs, atol=1e-7, rtol=1e-5)
        # The kept sets: equal up to keys whose votes the two computations order differently.
        tol = 2 * float((ours - theirs).abs().max()) + 1e-12
        policy.compress(cache, q_window)
        kept = _kept(cache, n)
        assert bool((kept[..., -window:] == torch.arange(L - window, L)).all())
        assert_same_kept(kept, run.kept, run.scores, tol)
