"""Numeric helpers shared by the tests.

Tolerance rule (docs/numerics.md, FlashAttention's rule)
----------------------------------------------------------------
A kernel result ``out`` is compared with two references computed from the same inputs:

* ``ref``    - the float64 reference (``upcast=True``), taken as the truth;
* ``ref_lo`` - the same computation in plain PyTorch in the kernel's own dtype (``upcast=False``).

The kernel passes when ``max|out - ref| <= factor * max|ref_lo - ref| + atol`` with factor 2 for
outputs and lse, 3 for gradients.  ``atol`` is a small floor, needed because ``ref_lo`` can be
(nearly) exact by accident, e.g. a single visible key (softmax = 1 exactly) or float64 inputs
(then ``ref_lo`` *is* ``ref`` and the bound would be 0):

* float64 results: ``1e-12 * max(1, max|ref|)`` - a few thousand ulps, room for a different
  summation order over up to ~1e3 terms, but 1e9 times tighter than any real bug;
* float32 results: ``1e-5 * max(1, max|ref|)`` - about 100 fp32 ulps at the tensors' scale
  (the inputs are O(1), so outputs/lse/grads are O(0.1..10)); blocked online softmax and
  different reduction orders stay well inside it, wrong masks or scales do not;
* bf16/fp16 results: twice the rounding of the float64 reference to that dtype
  (``2 * max|ref.to(dtype) - ref|``, FA3's rounding floor): a kernel must round its output once,
  so it can never beat that.

Non-finite values: ``out`` must never contain NaN, and the positions where ``ref`` is infinite
(``lse = -inf`` of fully masked rows) must be infinite with the same sign in ``out``.
"""

from __future__ import annotations

import importlib
import math
import os

import pytest
import torch

_FLOORS = {torch.float64: 1e-12, torch.float32: 1e-5}


def tol_floor(ref: torch.Tensor, dtype: torch.dtype) -> float:
    """Absolute floor of the tolerance rule for a result of ``dtype`` (see module docstring)."""
    ref = ref.detach().to(torch.float64)
    finite = ref[torch.isfinite(ref)]
    mag = max(1.0, finite.abs().max().item()) if finite.numel() else 1.0
    if dtype in _FLOORS:
        return _FLOORS[dtype] * mag
    rounding = (finite.to(dtype).to(torch.float64) - finite).abs().max().item() if finite.numel() else 0.0
    return 2.0 * rounding + 1e-5 * mag


def assert_close_rule(out, ref_hi, ref_lo, factor=2.0, atol_floor=None, name="out"):
    """``max|out - ref_hi| <= factor * max|ref_lo - ref_hi| + atol`` (docs/numerics.md)."""
    assert out.shape == ref_hi.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref_hi.shape)}"
    o = out.detach().to("cpu", torch.float64)
    r = ref_hi.detach().to("cpu", torch.float64)
    lo = ref_lo.detach().to("cpu", torch.float64)
    assert not torch.isnan(o).any(), f"{name}: NaN in result ({int(torch.isnan(o).sum())} elements)"
    assert not torch.isnan(r).any(), f"{name}: NaN in the reference (test bug)"
    inf_r = torch.isinf(r)
    if inf_r.any() or torch.isinf(o).any():
        bad = (torch.isinf(o) != inf_r) | (inf_r & (o != r))
        if bad.any():
            idx = tuple(torch.nonzero(bad)[0].tolist())
            raise AssertionError(
                f"{name}: infinities differ at {int(bad.sum())} positions, first {idx}: "
                f"got {o[idx].item()}, expected {r[idx].item()}"
            )
    fin = ~inf_r
    if not fin.any():
        return
    err = (o - r).abs().where(fin, torch.zeros((), dtype=torch.float64))
    lo_err = torch.nan_to_num((lo - r).abs(), nan=0.0, posinf=0.0).where(fin, torch.zeros((), dtype=torch.float64))
    atol = tol_floor(r, out.dtype) if atol_floor is None else atol_floor
    bound = factor * lo_err.max().item() + atol
    e = err.max().item()
    if not e <= bound:
        idx = tuple(torch.nonzero(err == err.max())[0].tolist())
        raise AssertionError(
            f"{name}: max|out - ref| = {e:.3e} > {factor} * {lo_err.max().item():.3e} (lowp baseline) "
            f"+ {atol:.1e} = {bound:.3e}; worst at {idx}: got {o[idx].item():.6g}, "
            f"expected {r[idx].item():.6g}; max|ref| = {r[fin].abs().max().item():.3g}"
        )


def nonfinite_rows(t):
    """Per row (all dims but the last): whether the row holds a NaN or an infinity."""
    return ~torch.isfinite(t).all(-1)


def compare_nonfinite(name, ours, ref, ref_lo=None, rows=True, factor=3.0):
    """Results with non-finite inputs (docs/semantics.md): the rows (``rows``; else the
    elements) that are non-finite must be exactly those of ``ref``; the finite ones are compared
    by value, with the tolerance rule when ``ref_lo`` is given, else to 1e-9. Returns the
    reference's non-finite mask."""
    bad_o = nonfinite_rows(ours) if rows else ~torch.isfinite(ours)
    bad_r = nonfinite_rows(ref) if rows else ~torch.isfinite(ref)
    assert torch.equal(bad_o, bad_r), (
        f"{name}: non-finite in ours only at {(bad_o & ~bad_r).nonzero().tolist()[:6]}, "
        f"in the reference only at {(bad_r & ~bad_o).nonzero().tolist()[:6]}")
    ok = ~bad_o
    if ref_lo is None:
        torch.testing.assert_close(ours[ok].double(), ref[ok].double(), rtol=0, atol=1e-9,
                                   msg=lambda m: f"{name}: {m}")
    else:
        assert_close_rule(ours[ok], ref[ok], ref_lo[ok], factor=factor, name=name)
    return bad_r


# --------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------


def randn(*shape, dtype=torch.float32, device="cpu", layout="bshd", requires_grad=False):
    """Random ``(B, L, H, D)`` tensor; ``layout="bhsd"`` makes it a transposed view of a
    contiguous ``(B, H, L, D)`` tensor (strided on B/L/H, head dim contiguous)."""
    if layout == "bhsd":
        B, L, H, D = shape
        t = torch.randn(B, H, L, D, dtype=torch.float32).to(device=device, dtype=dtype).transpose(1, 2)
    else:
        t = torch.randn(*shape, dtype=torch.float32).to(device=device, dtype=dtype)
    if requires_grad:
        t.requires_grad_(True)
    return t


def leaf(t, requires_grad=True):
    """A fresh leaf with the same values and strides as ``t``."""
    if t is None:
        return None
    out = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
    with torch.no_grad():
        out.copy_(t)
    return out.requires_grad_(requires_grad)


def lse_dtype(q):
    """lse is float32, float64 for float64 inputs (longattn.attention's docstring; the
    float32-only wording of docs/semantics.md predates it)."""
    return torch.float64 if q.dtype == torch.float64 else torch.float32


_REF_DROP = ("max_seqlen_q", "max_seqlen_k", "return_lse")


def ref_kwargs(kw):
    return {k: v for k, v in kw.items() if k not in _REF_DROP}


def call_attention(q, k, v, **kw):
    import longattn

    kw = dict(kw)
    kw["return_lse"] = True
    return longattn.attention(q, k, v, **kw)


def check_forward(q, k, v, *, check_lse=True, **kw):
    """Run longattn.attention and compare out and lse with the references (factor 2)."""
    from longattn.reference import attention_ref

    out, lse = call_attention(q, k, v, **kw)
    rk = ref_kwargs(kw)
    ref_out, ref_lse = attention_ref(q, k, v, upcast=True, **rk)
    lo_out, lo_lse = attention_ref(q, k, v, upcast=False, **rk)
    assert out.dtype == q.dtype, f"out dtype {out.dtype} != q dtype {q.dtype}"
    assert out.shape == q.shape
    assert out.device == q.device
    assert lse.dtype == lse_dtype(q), f"lse dtype {lse.dtype}, expected {lse_dtype(q)}"
    assert_close_rule(out, ref_out, lo_out, 2.0, name="out")
    if check_lse:
        assert_close_rule(lse, ref_lse, lo_lse, 2.0, name="lse")
    return out, lse


def _grads(fn, inputs, grad_outputs):
    outs = fn(*inputs)
    pairs = [(o, g) for o, g in zip(outs, grad_outputs) if g is not None]
    diff = [x for x in inputs if x is not None and x.requires_grad]
    gs = torch.autograd.grad([o for o, _ in pairs], diff, [g for _, g in pairs], allow_unused=True)
    it = iter(gs)
    res = []
    for x in inputs:
        if x is not None and x.requires_grad:
            g = next(it)
            res.append(torch.zeros_like(x) if g is None else g)
        else:
            res.append(None)
    return outs, res


def check_backward(q, k, v, *, sink_logits=None, lse_grad=True, **kw):
    """Compare dq, dk, dv (and d sink_logits) with float64 reference autograd (factor 3).

    The incoming gradient of lse is random where the reference lse is finite and 0 elsewhere
    (a -inf lse has no meaningful incoming gradient; that case is tested on its own)."""
    from longattn.reference import attention_ref

    rk = ref_kwargs(kw)
    with torch.no_grad():
        ref_out, ref_lse = attention_ref(q, k, v, sink_logits=sink_logits, **rk)
    dout = torch.randn(ref_out.shape, dtype=torch.float32).to(q.device, q.dtype)
    dlse = None
    if lse_grad:
        dlse = torch.randn(ref_lse.shape, dtype=torch.float32).to(q.device, ref_lse.dtype)
        dlse = torch.where(torch.isfinite(ref_lse), dlse, torch.zeros_like(dlse))

    def kern(q_, k_, v_, z_):
        return call_attention(q_, k_, v_, sink_logits=z_, **kw)

    def ref(upcast):
        return lambda q_, k_, v_, z_: attention_ref(q_, k_, v_, sink_logits=z_, upcast=upcast, **rk)

    def inputs():
        return [leaf(q), leaf(k), leaf(v), leaf(sink_logits) if sink_logits is not None else None]

    (out, lse), g = _grads(kern, inputs(), [dout, dlse])
    _, g_hi = _grads(ref(True), inputs(), [dout, dlse])
    _, g_lo = _grads(ref(False), inputs(), [dout, dlse])
    for name, a, b, c in zip(("dq", "dk", "dv", "dsink_logits"), g, g_hi, g_lo):
        if a is None:
            continue
        assert a.dtype == b.dtype, f"{name}: dtype {a.dtype} != {b.dtype}"
        assert_close_rule(a, b, c, 3.0, name=name)
    return out, lse, g


def has_cuda_build():
    """A GPU is visible and longattn was built with its CUDA kernels."""
    if not torch.cuda.is_available():
        return False
    try:
        import longattn

        return bool(longattn.build_info().get("cuda"))
    except Exception:  # noqa: BLE001 - a broken build shows up in the tests themselves
        return False


def to_device(kw, device):
    """kw with every tensor value moved to device (option dicts built for another device)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}


def assert_matches_cpu(fn, inputs, name="fn"):
    """fn on the inputs' device against fn on CPU copies: every output and every input gradient
    (random cotangents) equal to 1e-10 (float64) / 1e-5 (float32) of max(1, max|cpu|).

    How a GPU kernel's float64 gradients are checked: torch.autograd.gradcheck verifies the CPU
    kernel (hundreds of tiny launches on a GPU, and its reentrancy test wants bit-identical
    backward passes, which only the deterministic mode promises). fn must put any tensor it
    closes over on its inputs' device (to_device)."""
    dev = [leaf(x, x.requires_grad) for x in inputs]
    cpu = [leaf(x.detach().cpu(), x.requires_grad) for x in inputs]
    outs_d, outs_c = fn(*dev), fn(*cpu)
    outs_d = outs_d if isinstance(outs_d, (tuple, list)) else (outs_d,)
    outs_c = outs_c if isinstance(outs_c, (tuple, list)) else (outs_c,)
    cot = [torch.where(torch.isfinite(o), torch.randn(o.shape, dtype=torch.float64).to(o.dtype), 0)
           for o in outs_c]
    diff_d = [x for x in dev if x.requires_grad]
    diff_c = [x for x in cpu if x.requires_grad]
    g_d = torch.autograd.grad(outs_d, diff_d, [c.to(o.device) for c, o in zip(cot, outs_d)], allow_unused=True)
    g_c = torch.autograd.grad(outs_c, diff_c, cot, allow_unused=True)
    pairs = [(f"{name} output {i}", a, b) for i, (a, b) in enumerate(zip(outs_d, outs_c))]
    zero = lambda g, x: torch.zeros_like(x) if g is None else g  # noqa: E731 - unused input
    pairs += [(f"{name} grad {i}", zero(a, x), zero(b, y))
              for i, (a, b, x, y) in enumerate(zip(g_d, g_c, diff_d, diff_c))]
    for what, a, b in pairs:
        a = a.detach().cpu()
        b = b.detach()
        assert a.dtype == b.dtype and a.shape == b.shape, \
            f"{what}: {a.dtype} {tuple(a.shape)} vs CPU {b.dtype} {tuple(b.shape)}"
        fin = torch.isfinite(b)
        assert torch.equal(fin, torch.isfinite(a)), f"{what}: non-finite values at other positions than on CPU"
        assert torch.equal(a[~fin], b[~fin]), f"{what}: infinities differ from CPU"
        if fin.any():
            a64, b64 = a[fin].double(), b[fin].double()
            tol = (1e-10 if a.dtype == torch.float64 else 1e-5) * max(1.0, b64.abs().max().item())
            err = (a64 - b64).abs().max().item()
            assert err <= tol, f"{what}: max|device - cpu| = {err:.3e} > {tol:.1e}"


def lowp_dtypes_for(device):
    return [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def cu_seqlens(lengths, device="cpu"):
    c = [0]
    for n in lengths:
        c.append(c[-1] + n)
    return torch.tensor(c, dtype=torch.int32, device=device)


def nan_free(*ts):
    for t in ts:
        if t is not None:
            assert not torch.isnan(t).any(), "NaN found"


__all__ = [
    "assert_close_rule",
    "tol_floor",
    "randn",
    "leaf",
    "check_forward",
    "check_backward",
    "call_attention",
    "cu_seqlens",
    "has_cuda_build",
    "to_device",
    "assert_matches_cpu",
    "math",
]


#: optional_import's arguments for transformers (the tests comparing with its formulas).
TRANSFORMERS = ("LONGATTN_REQUIRE_TRANSFORMERS", "it is in requirements/main.txt (make venv)")


def optional_import(name: str, require_env: str, hint: str):
    """Import an optional dependency of some tests, or skip them with the reason.

    Any failure to import counts, not only a missing package: a package that is installed but
    breaks at import (a dependency at a version it does not support) skips too. Where
    ``require_env`` is set to 1 (CI) the failure is raised instead, so a broken environment
    cannot pass as a skip."""
    try:
        return importlib.import_module(name)
    except Exception as e:  # noqa: BLE001 - see above
        if os.environ.get(require_env) == "1":
            raise
        pytest.skip(f"{name} unavailable ({type(e).__name__}: {e}); {hint}", allow_module_level=True)
