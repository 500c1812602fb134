"""Non-finite inputs (docs/semantics.md): a NaN or infinity in q, k, v, sink_logits or
alibi_slopes makes exactly the rows, lse entries and gradients non-finite that the dense
formula over each row's visible keys makes non-finite; everything else stays exact, and fully
masked rows keep out = 0, lse = -inf, zero gradients.

Each case plants one non-finite value and compares, row by row, which results are finite with
longattn.reference (the dense per-row formula), then the finite ones by value. Sizes put the
value inside and outside the visible band, in sink keys, at tile edges (CPU tiles are 128 x 256;
L = 300 crosses both), and in one sequence of a varlen batch.
"""
from __future__ import annotations

import pytest
import torch

import longattn
from helpers import compare_nonfinite as _compare
from helpers import cu_seqlens
from helpers import nonfinite_rows as _nonfinite_rows
from longattn.reference import alibi_slopes, attention_ref

B, L, HQ, HKV, D = 2, 300, 4, 2, 16
MASKS = {
    "causal": dict(causal=True),
    "lambda": dict(causal=True, window=(40, 0), sinks=3),
    "band": dict(window=(25, 10)),
    "full": dict(),
    "far_only": dict(causal=True, window=(None, -50)),  # rows < 50 see nothing
}
VALUES = {"nan": float("nan"), "inf": float("inf"), "ninf": float("-inf")}
# (tensor, token): a sink key, a middle token (seen by the band around it), the last token, and
# tokens at the CPU tile edges.
SPOTS = [("q", 150), ("q", 0), ("q", 299), ("q", 127), ("k", 150), ("k", 1), ("k", 255),
         ("k", 299), ("v", 150), ("v", 2), ("v", 256), ("v", 40)]


def _inputs(dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, L, h, D, generator=g, dtype=torch.float64).to(device, dtype)
            for h in (HQ, HKV, HKV)]


def _grads(fn, leaves, outs_w):
    leaves = [x.detach().requires_grad_() if x is not None else None for x in leaves]
    outs = fn(*leaves)
    wrt = [x for x in leaves if x is not None]
    return outs, torch.autograd.grad(outs, wrt, outs_w, allow_unused=True)


def _run_case(kw, plant, dtype, device, seed=0, varlen=False):
    """Forward and backward of longattn and of the reference on the same planted inputs;
    returns the reference's non-finite row masks (out, dq) for the caller's checks."""
    q, k, v = _inputs(dtype, device, seed)
    kw = dict(kw)
    if kw.pop("sink_logits", False):
        kw["sink_logits"] = torch.randn(HQ, dtype=torch.float64 if dtype == torch.float64
                                        else torch.float32).to(device)
    if kw.pop("alibi", False):
        kw["alibi_slopes"] = alibi_slopes(HQ).to(device)
    plant(q, k, v, kw)
    if varlen:
        lens = [100, 120, 80]  # one (B * L)-token batch, cut into three sequences
        cu = cu_seqlens(lens, device)
        q, k, v = (t.reshape(B * L, t.shape[2], D)[:sum(lens)].contiguous() for t in (q, k, v))
        kw.update(cu_seqlens_q=cu, cu_seqlens_k=cu)
    z = kw.pop("sink_logits", None)

    def ours(q_, k_, v_, z_):
        return longattn.attention(q_, k_, v_, sink_logits=z_, return_lse=True, **kw)

    def ref(q_, k_, v_, z_, upcast=True):
        return attention_ref(q_, k_, v_, sink_logits=z_, upcast=upcast, **kw)

    g = torch.Generator().manual_seed(seed + 1)
    w_out = torch.randn(q.shape, generator=g, dtype=torch.float64).to(device, dtype)
    lse_shape = (HQ, q.shape[0]) if varlen else (B, HQ, L)
    w_lse = torch.randn(lse_shape, generator=g, dtype=torch.float64).to(
        device, torch.float64 if dtype == torch.float64 else torch.float32)
    (o, l), go = _grads(ours, [q, k, v, z], (w_out, w_lse))
    (o_r, l_r), gr = _grads(ref, [q.cpu(), k.cpu(), v.cpu(), None if z is None else z.cpu()],
                            (w_out.cpu(), w_lse.cpu()))
    lo = None
    if dtype != torch.float64:
        (o_lo, l_lo), g_lo = _grads(lambda *a: ref(*a, upcast=False),
                                    [q.cpu(), k.cpu(), v.cpu(), None if z is None else z.cpu()],
                                    (w_out.cpu(), w_lse.cpu()))
        lo = (o_lo, l_lo) + tuple(g_lo)
    names = ["out", "lse", "dq", "dk", "dv", "dsink"]
    bad = {}
    for i, (name, a, b) in enumerate(zip(names, (o, l) + tuple(go), (o_r, l_r) + tuple(gr))):
        bad[name] = _compare(name, a.cpu(), b, None if lo is None else lo[i],
                             rows=name not in ("lse", "dsink"))
    # Fully masked rows: zeros and -inf exactly, never NaN.
    masked = torch.isneginf(l_r) & ~bad["out"].transpose(-1, -2)
    if masked.any():
        assert torch.isneginf(l.cpu()[masked]).all()
        out_rows = o.cpu().transpose(-2, -3) if not varlen else o.cpu().transpose(0, 1)
        assert (out_rows[masked] == 0).all()
    return bad


def _at(name, token, value):
    def plant(q, k, v, kw):
        t = {"q": q, "k": k, "v": v}[name]
        t[1, token, 1 if name == "q" else 0, 3] = value  # batch 1 only: batch 0 stays exact
    return plant


@pytest.mark.parametrize("value", list(VALUES), ids=list(VALUES))
@pytest.mark.parametrize("spot", SPOTS, ids=[f"{t}{i}" for t, i in SPOTS])
@pytest.mark.parametrize("mask", list(MASKS))
def test_planted_value_fp64(mask, spot, value, device):
    bad = _run_case(MASKS[mask], _at(*spot, VALUES[value]), torch.float64, device)
    # The planted value reached something unless the mask hides it from every row (and from
    # batch 0 it never reaches anything).
    assert not bad["out"][0].any() and not bad["dq"][0].any()


@pytest.mark.parametrize("spot", [("q", 150), ("k", 150), ("v", 150), ("v", 2)],
                         ids=["q150", "k150", "v150", "v2"])
@pytest.mark.parametrize("mask", ["causal", "lambda"])
def test_planted_nan_fp32(mask, spot, device):
    bad = _run_case(MASKS[mask], _at(*spot, float("nan")), torch.float32, device)
    assert bad["out"][1].any()


@pytest.mark.parametrize("softcap", [0.0, 4.0], ids=["plain", "softcap"])
@pytest.mark.parametrize("value", ["inf", "ninf", "nan"])
def test_planted_key_fp32_vector_rows(value, softcap, device):
    """fp32 rows of 16 keys or more take the vector exp: a +inf logit against the row's +inf max
    (exp(inf - inf)) and a NaN logit must make the row NaN there as in the scalar path, softcap
    must keep a NaN logit NaN, and softcap(+-inf) = +-softcap stays finite."""
    bad = _run_case(dict(causal=True, softcap=softcap), _at("k", 150, VALUES[value]),
                    torch.float32, device)
    assert bad["out"][1].any() == (softcap == 0.0 or value == "nan")


def test_planted_in_one_varlen_sequence(device):
    def plant(q, k, v, kw):  # token 130 of the flattened batch: sequence 1 (tokens 100-219)
        k[0, 130, 1, 0] = float("nan")
        v[0, 170, 0, 5] = float("inf")

    bad = _run_case(dict(causal=True, window=(30, 0)), plant, torch.float64, device, varlen=True)
    seq_of = torch.repeat_interleave(torch.arange(3), torch.tensor([100, 120, 80]))
    rows_bad = bad["out"].any(-1)  # per token
    assert rows_bad.any() and (seq_of[rows_bad] == 1).all()


@pytest.mark.parametrize("what", ["sink_logit_nan", "sink_logit_inf", "alibi_nan"])
def test_per_head_parameters(what, device):
    def plant(q, k, v, kw):
        if what.startswith("sink_logit"):
            kw["sink_logits"][2] = float("nan") if what.endswith("nan") else float("inf")
        else:
            kw["alibi_slopes"][2] = float("nan")

    kw = dict(causal=True, window=(40, 0), sink_logits=True) if what.startswith("sink") else \
        dict(causal=True, alibi=True)
    bad = _run_case(kw, plant, torch.float64, device)
    assert bad["out"][:, :, 2].all() and not bad["out"][:, :, [0, 1, 3]].any()


def test_nan_query_row_is_not_reported_masked(device):
    q, k, v = (torch.randn(1, 64, 4, 64, device=device) for _ in range(3))
    q[0, 5, 1, 3] = float("nan")
    out, lse = longattn.attention(q, k, v, causal=True, return_lse=True)
    assert torch.isnan(out[0, 5, 1]).all() and torch.isnan(lse[0, 1, 5])
    ok = torch.ones(64, 4, dtype=torch.bool)
    ok[5, 1] = False
    assert torch.isfinite(out[0][ok]).all()


def test_all_visible_logits_minus_inf(device):
    # Row 0 (causal) sees key 0 only; q = -inf against a positive key gives logit -inf: the
    # dense softmax over that one key is NaN, not an empty row.
    q, k, v = (torch.randn(1, 8, 1, 4, dtype=torch.float64, device=device) for _ in range(3))
    k[0, 0, 0] = 1.0
    q[0, 0, 0, 0] = float("-inf")
    out, lse = longattn.attention(q, k, v, causal=True, return_lse=True)
    assert torch.isnan(out[0, 0]).all() and not torch.isfinite(lse[0, 0, 0])
    assert torch.isfinite(out[0, 1:]).all()


# ---- the other places a row's softmax is finished or merged ------------------------------


@pytest.mark.parametrize("plant", ["k_seen", "k_unseen", "v_seen", "q_row", "all_minus_inf"])
def test_split_keys(plant, device):
    """Few rows against many keys: the CPU splits each row's keys into chunks merged after."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, n, 1, 16, generator=g, dtype=torch.float64).to(device)
               for n in (4, 5000, 5000))
    kw = dict(causal=True, window=(3000, 0))  # rows at 4996-4999 see keys 1996..
    if plant == "k_seen":
        k[0, 4000, 0, 1] = float("nan")
    elif plant == "k_unseen":
        k[0, 100, 0, 1] = float("nan")
    elif plant == "v_seen":
        v[0, 2500, 0, 1] = float("inf")
    elif plant == "q_row":
        q[0, 2, 0, 0] = float("nan")
    else:  # every visible logit of row 1 is -inf, across all the chunks
        k[..., 0] = k[..., 0].abs() + 0.1
        q[0, 1, 0, 0] = float("-inf")
    out, lse = longattn.attention(q, k, v, return_lse=True, **kw)
    ref_o, ref_l = attention_ref(q.cpu(), k.cpu(), v.cpu(), **kw)
    _compare("out", out.cpu(), ref_o)
    _compare("lse", lse.cpu(), ref_l, rows=False)
    assert _nonfinite_rows(ref_o).any() == (plant != "k_unseen")


def test_merge_attention(device):
    g = torch.Generator().manual_seed(4)
    outs = [torch.randn(2, 6, 3, 8, generator=g, dtype=torch.float64).to(device) for _ in range(3)]
    lses = [torch.randn(2, 3, 6, generator=g, dtype=torch.float64).to(device) for _ in range(3)]
    lses[0][0, 1, 2] = float("nan")     # a NaN partial: that row is NaN
    outs[1][1, 4, 0, 3] = float("inf")  # a non-finite partial output with a finite lse: NaN row
    lses[2][1, 2, 5] = float("-inf")    # a partial that saw nothing adds nothing...
    outs[2][1, 5, 2, :] = float("nan")  # ...whatever its out holds
    out, lse = longattn.merge_attention(outs, lses)
    from longattn.reference import merge_attention_ref
    ref_o, ref_l = merge_attention_ref([o.cpu() for o in outs], [l.cpu() for l in lses])
    bad = _compare("out", out.cpu(), ref_o)
    _compare("lse", lse.cpu(), ref_l, rows=False)
    assert bad[0, 2, 1] and bad[1, 4, 0] and not bad[1, 5, 2] and bad.sum() == 2


def test_running_merge_inplace(device):
    g = torch.Generator().manual_seed(5)
    run_o = torch.zeros(1, 8, 2, 4, dtype=torch.float64, device=device)
    run_l = torch.full((1, 2, 8), float("-inf"), dtype=torch.float64, device=device)
    parts = [(torch.randn(1, 8, 2, 4, generator=g, dtype=torch.float64).to(device),
              torch.randn(1, 2, 8, generator=g, dtype=torch.float64).to(device)) for _ in range(2)]
    parts[1][1][0, 1, 3] = float("nan")
    for po, pl in parts:
        torch.ops.longattn.merge_attention_(run_o, run_l, po, pl, 0)
    assert torch.isnan(run_o[0, 3, 1]).all() and torch.isnan(run_l[0, 1, 3])
    ok = torch.ones(8, 2, dtype=torch.bool)
    ok[3, 1] = False
    assert torch.isfinite(run_o[0][ok]).all()


# fp64 D 16: the CUDA generic chunk kernel; bf16 D 64 and fp32 D 128: the tile kernel (16-byte
# rows, cp.async tiles, a reduce-scatter of the logits across a key's lanes).
@pytest.mark.parametrize("dtype,D", [(torch.float64, 16), (torch.bfloat16, 64), (torch.float32, 128)])
@pytest.mark.parametrize("plant", ["k_seen", "k_masked", "v_seen", "v_masked", "q_row",
                                   "v_underflow_seen"])
def test_decode_attention(plant, dtype, D, device):
    from longattn import kvcache as kvc
    from longattn.reference import decode_attention_ref
    g = torch.Generator().manual_seed(6)
    B, Hq, Hkv, n, C = 2, 4, 2, 2, 700  # 700 keys: three of the decode's 256-key chunks
    q = torch.randn(B, Hq, n, D, generator=g, dtype=torch.float64)
    kc, vc = (torch.randn(B, Hkv, C, D, generator=g, dtype=torch.float64) for _ in "kv")
    lengths = torch.full((B, Hkv), C, dtype=torch.int32, device=device)
    qpos = torch.tensor([[C - 2, C - 1]] * B, device=device)
    kw = dict(q_positions=qpos, window=300, sinks=4)
    t, slot, val = {"k_seen": (kc, 600, float("nan")), "k_masked": (kc, 200, float("nan")),
                    "v_seen": (vc, 2, float("inf")), "v_masked": (vc, 100, float("-inf")),
                    "v_underflow_seen": (vc, 650, float("inf")), "q_row": (q, 1, float("nan"))}[plant]
    t[1, 0, slot, 3] = val
    if plant == "v_underflow_seen":  # key 650 visible with probability 0 exactly: 0 * inf
        kc[1, 0, 650] = -1e4 * q[1, 0, 0].sign()
    q, kc, vc = (x.to(dtype) for x in (q, kc, vc))  # the reference sees the same rounded inputs
    out, lse = kvc.decode_attention(q.to(device), kc.to(device), vc.to(device), lengths, **kw)
    ref_kw = dict(q_positions=qpos.cpu(), window=300, sinks=4)
    ref_o, ref_l, _ = decode_attention_ref(q, kc, vc, lengths.cpu(), **ref_kw)
    if dtype == torch.float64:
        bad = _compare("out", out.cpu(), ref_o)
        _compare("lse", lse.cpu(), ref_l, rows=False)
    else:  # the tolerance rule against the same formula evaluated in the input precision
        hi_o, hi_l, _ = decode_attention_ref(q.double(), kc.double(), vc.double(), lengths.cpu(),
                                             **ref_kw)
        lo_o, lo_l, _ = decode_attention_ref(q, kc, vc, lengths.cpu(), upcast=False, **ref_kw)
        bad = _compare("out", out.cpu(), hi_o, lo_o)
        _compare("lse", lse.cpu(), hi_l.float(), lo_l.float(), rows=False)
    assert bad[0].sum() == 0 and (bad[1].any() == plant.endswith("seen") or plant == "q_row")
