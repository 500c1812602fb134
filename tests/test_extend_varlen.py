"""longattn.extend in the varlen form (tokens, heads, dim) + cu_seqlens: a packed batch equals
each sequence run alone through the dense form and the dense per-pair reference of each method,
values and gradients (q, k, v and inv_freq), with per-sequence bottom-right positions, equal or
differing query offsets, and a given q_start."""
from __future__ import annotations

import pytest
import torch

from rope_helpers import ATTENTION_DEVICES as DEVICES, assert_close_rule

from longattn import extend
from longattn.rope import frequencies
from longattn.rope_reference import (lm_infinite_delta, relative_rope_attention_ref, rerope_delta,
                                     self_extend_delta)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(2024)


# name -> (call(q, k, v, inv, **kw), delta(Lq, Lk, q_start) -> (delta, visible))
METHODS = {
    "self_extend": (lambda *a, **kw: extend.self_extend_attention(*a, group_size=3, window=5, **kw),
                    lambda Lq, Lk, q0: self_extend_delta(Lq, Lk, 3, 5, q_start=q0)),
    "rerope": (lambda *a, **kw: extend.rerope_attention(*a, window=6, **kw),
               lambda Lq, Lk, q0: rerope_delta(Lq, Lk, 6, q_start=q0)),
    "leaky_rerope": (lambda *a, **kw: extend.rerope_attention(*a, window=6, leak=2.5, **kw),
                     lambda Lq, Lk, q0: rerope_delta(Lq, Lk, 6, 2.5, q_start=q0)),
    "lm_infinite": (lambda *a, **kw: extend.lm_infinite_attention(*a, local_window=5, global_tokens=3,
                                                                   max_distance=7, **kw),
                    lambda Lq, Lk, q0: lm_infinite_delta(Lq, Lk, 5, 3, 7, q_start=q0)),
}

# name -> (query lengths, key lengths, q_start). "prefill": cu_q == cu_k (one query offset,
# 0); "chunked": offsets differ per sequence (LM-Infinite runs one call per offset), one
# sequence shorter than the global tokens and one without queries; "q_start": given positions.
BATCHES = {
    "prefill": ([13, 1, 21, 8], [13, 1, 21, 8], None),
    "chunked": ([3, 1, 7, 0, 2], [20, 9, 7, 4, 2], None),
    "q_start": ([4, 6, 5], [12, 9, 15], 9),
}


def _packed(device, dtype, lens_q, lens_k, Hq=4, Hk=2, D=24):
    q = torch.randn(sum(lens_q), Hq, D, device=device).to(dtype)
    k = torch.randn(sum(lens_k), Hk, D, device=device).to(dtype)
    v = torch.randn(sum(lens_k), Hk, D, device=device).to(dtype)
    cu = lambda lens: torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(),  # noqa: E731
                                   dtype=torch.int32, device=device)
    return q, k, v, cu(lens_q), cu(lens_k)


def _split(x, lens):
    return list(torch.split(x, lens, dim=0))


def _freqs(device):
    return frequencies(16, 10000.0, {"rope_type": "yarn", "factor": 2.0,
                                     "original_max_position_embeddings": 8}, device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("batch", list(BATCHES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_varlen_equals_each_sequence_alone(device, method, batch, dtype):
    lens_q, lens_k, q0 = BATCHES[batch]
    q, k, v, cu_q, cu_k = _packed(device, dtype, lens_q, lens_k)
    inv, A = _freqs(device)
    call, delta_fn = METHODS[method]
    kw = dict(attention_scaling=A, rotary_dim=16, interleaved=(method == "rerope"))
    out, lse = call(q, k, v, inv, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, q_start=q0,
                    return_lse=True, **kw)
    assert out.shape == q.shape and lse.shape == (q.shape[1], q.shape[0])
    parts = zip(_split(q, lens_q), _split(k, lens_k), _split(v, lens_k),
                _split(out, lens_q), _split(lse.transpose(0, 1), lens_q))
    for n, (qn, kn, vn, on, ln) in enumerate(parts):
        Lq, Lk = qn.shape[0], kn.shape[0]
        if Lq == 0:
            continue
        # The dense form, one sequence of batch 1.
        od, ld = call(qn[None], kn[None], vn[None], inv, q_start=q0, return_lse=True, **kw)
        tol = dict(rtol=0, atol=1e-5) if dtype == torch.float32 else dict(rtol=0, atol=2e-2)
        torch.testing.assert_close(on, od[0], **tol)
        torch.testing.assert_close(ln.transpose(0, 1), ld[0], rtol=0, atol=1e-5)
        # The dense per-pair reference.
        delta, vis = delta_fn(Lq, Lk, q0)
        ref, ref_lse = relative_rope_attention_ref(qn[None], kn[None], vn[None], inv,
                                                   delta.to(device), vis.to(device), **kw)
        lo, lo_lse = relative_rope_attention_ref(qn[None], kn[None], vn[None], inv,
                                                 delta.to(device), vis.to(device), upcast=False, **kw)
        assert_close_rule(on[None], ref, lo, 2.0, name=f"out of sequence {n}")
        assert_close_rule(ln.transpose(0, 1)[None], ref_lse, lo_lse, 2.0, name=f"lse of sequence {n}")


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("batch", ["prefill", "chunked"])
def test_varlen_gradients(method, batch):
    """float64: gradients of q, k, v and inv_freq of the packed batch equal those of the
    sequences run alone (inv_freq's summed over them)."""
    lens_q, lens_k, q0 = BATCHES[batch]
    q, k, v, cu_q, cu_k = _packed("cpu", torch.float64, lens_q, lens_k, Hq=2, Hk=1, D=8)
    inv = frequencies(8, 100.0)[0].double()
    call, _ = METHODS[method]
    dout = torch.randn_like(q)
    ins = [t.clone().requires_grad_() for t in (q, k, v, inv)]
    out = call(*ins, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, q_start=q0)
    grads = torch.autograd.grad(out, ins, dout)
    ins_d = [t.clone().requires_grad_() for t in (q, k, v, inv)]
    loss = 0.0
    for qn, kn, vn, dn in zip(_split(ins_d[0], lens_q), _split(ins_d[1], lens_k),
                              _split(ins_d[2], lens_k), _split(dout, lens_q)):
        if qn.shape[0]:
            loss = loss + (call(qn[None], kn[None], vn[None], ins_d[3], q_start=q0)[0] * dn).sum()
    grads_d = torch.autograd.grad(loss, ins_d, allow_unused=True)
    for name, a, b in zip("q k v inv_freq".split(), grads, grads_d):
        b = torch.zeros_like(a) if b is None else b
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=lambda m: f"d{name}: {m}")


# Where the two paths word an error differently: the fused op's C++ checks (attention's) and
# the unfused composition's Python layout checks, each naming the argument.
BAD_CU_MESSAGES = {
    True: dict(end=r"cu_seqlens_k\[-1\] = 6 must equal the number of tokens 7",
               dtype="cu_seqlens_q must be int32", length=r"cu_seqlens_k must be 1-D of length batch \+ 1 = 3"),
    False: dict(end="must start at 0, be non-decreasing and end at 7", dtype="1-D int32",
                length="the same length"),
}


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "two_pass"])
def test_bad_input(fused):
    q, k, v, cu_q, cu_k = _packed("cpu", torch.float32, [3, 4], [3, 4])
    inv = frequencies(24, 10000.0)[0]
    msg = BAD_CU_MESSAGES[fused]

    def f(*args, **kw):
        return extend.rerope_attention(*args, fused=fused, **kw)

    with pytest.raises(ValueError, match="must be given together"):
        f(q, k, v, inv, window=2, cu_seqlens_q=cu_q)
    with pytest.raises(ValueError, match=r"\(tokens, heads, head_dim\)"):
        f(q[None], k[None], v[None], inv, window=2, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    with pytest.raises(ValueError, match=msg["end"]):
        f(q, k, v, inv, window=2, cu_seqlens_q=cu_q, cu_seqlens_k=torch.tensor([0, 5, 6], dtype=torch.int32))
    with pytest.raises(ValueError, match=msg["dtype"]):
        f(q, k, v, inv, window=2, cu_seqlens_q=cu_q.long(), cu_seqlens_k=cu_k)
    with pytest.raises(ValueError, match=msg["length"]):
        f(q, k, v, inv, window=2, cu_seqlens_q=cu_q, cu_seqlens_k=torch.tensor([0, 7], dtype=torch.int32))
    with pytest.raises(ValueError, match="q_start must be an int or None"):
        f(q, k, v, inv, window=2, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, q_start=1.5)
