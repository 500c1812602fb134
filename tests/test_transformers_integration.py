"""attn_implementation="longattn" in transformers models (longattn.integrations.transformers)
against their own eager attention, on tiny random models (tests/hf_models.py).

Logits and gradients follow the tolerance rule of docs/numerics.md at the model's output:
longattn in fp32 against eager in fp64 (the truth), with eager in fp32 as the plain-PyTorch
baseline. Greedy generation must give eager's tokens exactly. The cache's own tests are in
test_transformers_cache.py.
"""
import pytest
import torch

from helpers import TRANSFORMERS, assert_close_rule, optional_import

optional_import("transformers", *TRANSFORMERS)

from hf_models import MODELS, WINDOW, cache_kw, fp64_copy, left_padded, tiny_model  # noqa: E402
from longattn.integrations import transformers as lt  # noqa: E402
from longattn.reference import visible_mask  # noqa: E402

lt.register()


def _logits(model, attn, ids, **kw):
    model.set_attn_implementation(attn)
    with torch.no_grad():
        return model(ids, **kw).logits


@pytest.mark.parametrize("W", [1, 2, WINDOW])
@pytest.mark.parametrize("Lq,Lk", [(9, 9), (1, 9), (3, 9)])
def test_sliding_window_convention(W, Lq, Lk):
    """sliding_window=W is window=(W - 1, 0): the mask transformers builds for eager/SDPA
    (masking_utils) is longattn's visible set, queries bottom-right aligned."""
    from transformers.masking_utils import sdpa_mask, sliding_window_causal_mask_function

    theirs = sdpa_mask(batch_size=1, q_length=Lq, kv_length=Lk, q_offset=Lk - Lq,
                       mask_function=sliding_window_causal_mask_function(W),
                       allow_is_causal_skip=False)[0, 0]
    ours = visible_mask(Lq, Lk, causal=True, window=lt.window_of(W, True))
    assert torch.equal(theirs, ours)


def _rows_unpadded(model, attn, ids, mask):
    """Logits of the real tokens, each sequence run alone without padding: the truth for a
    padded batch (eager in fp64 cannot run one: its additive mask, finfo.min, overflows to -inf
    next to a negative logit, and the NaN of the fully masked padding rows reaches every row at
    the next layer)."""
    return torch.cat([_logits(model, attn, ids[b:b + 1, mask[b].bool()])[0]
                      for b in range(ids.shape[0])])


@pytest.mark.parametrize("pads", [[0, 0], [0, 5]], ids=["dense", "left_padded"])
@pytest.mark.parametrize("name", MODELS)
def test_logits_match_eager(name, pads):
    model = tiny_model(name)
    ids, mask = left_padded(2, 16, pads)
    kw = dict(attention_mask=mask) if any(pads) else {}
    real = mask.bool()  # eager's rows for padding queries are arbitrary
    ref = _rows_unpadded(fp64_copy(model), "eager", ids, mask)
    lo = _logits(model, "eager", ids, **kw)[real]
    out = _logits(model, "longattn", ids, **kw)[real]
    assert_close_rule(out, ref, lo, name=f"{name} logits")


@pytest.mark.parametrize("name", MODELS)
def test_generate_matches_eager(name):
    """Greedy decoding of a left-padded batch past the sliding window: eager with
    DynamicCache, longattn with DynamicCache and longattn with LongattnCache agree."""
    model = tiny_model(name)
    ids, mask = left_padded(2, 12, [0, 3])
    kw = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        model.set_attn_implementation("eager")
        expect = model.generate(ids, **kw)
        model.set_attn_implementation("longattn")
        dynamic = model.generate(ids, **kw)
        ours = model.generate(ids, **kw, **{cache_kw(model): lt.LongattnCache(model.config)})
    assert expect.shape[1] == 22
    assert torch.equal(dynamic, expect)
    assert torch.equal(ours, expect)


@pytest.mark.parametrize("name", MODELS)
def test_compile_fullgraph(name):
    """torch.compile(fullgraph=True) with no padding: the mask function returns None and the
    op's fake kernel traces; the compiled model gives the same logits."""
    model = tiny_model(name, "longattn")
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        expect = model(ids).logits
        torch._dynamo.reset()
        got = torch.compile(model, backend="aot_eager", fullgraph=True)(ids).logits
    torch.testing.assert_close(got, expect, atol=1e-6, rtol=0)


def test_compile_with_padding():
    """With padding the mask function reads the mask (is there any?) and the unpad gathers
    data-dependent token counts, as FlashAttention's path does: graph breaks, same logits."""
    model = tiny_model("llama", "longattn")
    ids, mask = left_padded(2, 16, [0, 5])
    with torch.no_grad():
        expect = model(ids, attention_mask=mask).logits
        torch._dynamo.reset()
        got = torch.compile(model, backend="aot_eager")(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], expect[real], atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["llama", "gemma2", "gpt_oss"])
def test_backward_matches_eager(name):
    """Training through longattn: every parameter's gradient (gpt-oss's sinks included, which
    reach the kernel as sink_logits) against eager, factor 3 of the rule."""
    model = tiny_model(name)
    ids, mask = left_padded(2, 16, [0, 5])

    def loss(m, ids, mask):
        logits = m(ids, attention_mask=mask).logits[:, :-1]
        both = (mask[:, :-1] * mask[:, 1:]).bool()  # a real token predicting a real one
        return torch.nn.functional.cross_entropy(logits[both], ids[:, 1:][both], reduction="sum")

    def grads(m, attn, padded=True):
        m.set_attn_implementation(attn)
        m.zero_grad()
        if padded:
            total = loss(m, ids, mask)
        else:  # each sequence alone (see _rows_unpadded)
            total = sum(loss(m, ids[b:b + 1, mask[b].bool()], mask[b:b + 1, mask[b].bool()])
                        for b in range(2))
        total.backward()
        return {n: p.grad for n, p in m.named_parameters() if p.grad is not None}

    ref = grads(fp64_copy(model), "eager", padded=False)
    lo = grads(model, "eager")
    out = grads(model, "longattn")
    assert out.keys() == ref.keys()
    if name == "gpt_oss":
        assert any(n.endswith("self_attn.sinks") for n in out)
    for n in ref:
        assert_close_rule(out[n], ref[n], lo[n], factor=3.0, name=n)


def test_packed_sequences():
    """Sequences packed in one row (positions restarting, no mask) stay apart, as in
    transformers' eager mask (find_packed_sequence_indices)."""
    model = tiny_model("llama")
    ids = torch.randint(0, 128, (1, 15))
    pos = torch.cat([torch.arange(6), torch.arange(9)])[None]
    kw = dict(position_ids=pos, use_cache=False)  # eager detects packing only without a cache
    ref = _logits(fp64_copy(model), "eager", ids, **kw)
    lo = _logits(model, "eager", ids, **kw)
    out = _logits(model, "longattn", ids, **kw)
    assert_close_rule(out, ref, lo, name="packed logits")
    whole = _logits(model, "longattn", ids, position_ids=torch.arange(15)[None], use_cache=False)
    assert (whole[0, 6:] - out[0, 6:]).abs().max() > 1e-3  # the packing mattered


def test_rejects_what_it_cannot_express():
    model = tiny_model("llama")
    attn = model.model.layers[0].self_attn
    q = torch.randn(1, 4, 5, 16)
    k = torch.randn(1, 2, 5, 16)
    with pytest.raises(ValueError, match="dropout"):
        lt.longattn_attention_forward(attn, q, k, k, None, dropout=0.1)
    with pytest.raises(ValueError, match="2-D padding mask"):
        lt.longattn_attention_forward(attn, q, k, k, torch.ones(1, 1, 5, 5, dtype=torch.bool))
    with pytest.raises(NotImplementedError, match="mask function"):
        lt.longattn_mask(1, 5, 5, use_vmap=True)
    assert lt.longattn_mask(1, 5, 5, attention_mask=torch.ones(1, 5, dtype=torch.bool)) is None
