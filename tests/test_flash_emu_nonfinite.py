"""Non-finite inputs through the CUDA flash kernels, run on the host emulator (tools/flash_emu,
see test_flash_emu.py): a NaN or an infinity planted in q, k, v or a sink logit must make
exactly the rows, lse entries and gradients non-finite that the dense float64 reference over
each row's visible keys makes non-finite (docs/semantics.md, "Non-finite inputs"); the finite
ones are compared by value with the suite's tolerance rule (factor 2 forward, 3 backward).

Plants sit inside and outside the visible band of causal, windowed and lambda masks, in sink
keys, in partial (diagonal, band-edge) tiles next to rows that must stay exact, and in one
sequence of a varlen batch; one row sees only -inf logits (NaN, unlike a row that sees no key).
The default run is a handful of cases; LONGATTN_FLASH_EMU=full runs each in every head dim and
both dtypes, and the backward in both dQ modes.
"""

from __future__ import annotations

import ctypes
import math

import pytest
import torch

from helpers import compare_nonfinite
from test_flash_emu import _FULL, _make_inputs, _problem_args, _ptr, emu_fwd_lib, emu_lib  # noqa: F401

pytestmark = pytest.mark.slow

NAN, INF = float("nan"), float("inf")


def _make_k_positive(q, k, v, z):
    k[..., 0] = k[..., 0].abs() + 0.1


def _make_q_positive(q, k, v, z):
    q[..., 5] = q[..., 5].abs() + 0.1


# Each case: the problem (as test_flash_emu's cases) and `plants`: (tensor, index, value), the
# index (batch, token, head, dim) dense or (token, head, dim) varlen; a callable plant edits the
# inputs first. Tiles (forward q x k / backward q x k): hd64 128 x 128 / 64 x 128; hd96 and
# hd128 128 x 64 / 64 x 128; hd256 64 x 64 / 64 x 64.
CASES = {
    # kv head 0: v at key 150 (rows 128-149 share its partial tile without seeing it); kv head 1:
    # k at key 60 (rows 0-59); q row 20 of q head 0 (its dK reaches keys it does not see).
    "causal": dict(causal=True, Lq=200, Lk=200, Hq=4, Hkv=2,
                   plants=[("v", (0, 150, 0, 5), INF), ("k", (0, 60, 1, 3), NAN), ("q", (0, 20, 0, 7), -INF)]),
    # A sink key with -inf (logits +inf or -inf by the sign of q), v inside the band of some rows
    # of a partial tile, q at a row of the last tile.
    "lambda": dict(causal=True, window=(40, 0), sinks=3, Lq=300, Lk=300, Hq=2, Hkv=2,
                   plants=[("k", (0, 1, 0, 2), -INF), ("v", (0, 200, 1, 0), NAN), ("q", (0, 280, 1, 4), INF)]),
    # Band edges on both sides, keys past the queries, a key no row sees (k 255).
    "window_two_sided": dict(window=(30, 20), Lq=200, Lk=260, Hq=2, Hkv=1,
                             plants=[("v", (0, 100, 0, 9), -INF), ("k", (0, 64, 0, 1), INF),
                                     ("k", (0, 255, 0, 2), NAN), ("q", (0, 130, 1, 0), NAN)]),
    # Every visible logit of a row is -inf (q = -inf against keys positive in that dim): NaN,
    # unlike the rows of the first 10 that see no key.
    "all_minus_inf_row": dict(causal=True, window=(None, -10), Lq=150, Lk=150, Hq=2, Hkv=1,
                              plant=_make_k_positive,
                              plants=[("q", (0, 70, 0, 0), -INF), ("q", (0, 10, 1, 0), -INF)]),
    # NaN and +inf sink logits (heads 1, 2), rows with only the sink (the first 150), a v row.
    "sink_logits": dict(window=(None, -150), sink_logits=True, Lq=200, Lk=300, Hq=3, Hkv=1,
                        plants=[("z", (1,), NAN), ("z", (2,), INF), ("v", (0, 20, 0, 3), INF)]),
    # k = -inf against q > 0 in that dim: every row that sees key 70 has logit -inf there (P = 0,
    # lse finite); only its dQ is NaN (0 * inf), dK and dV stay exact. Several masked query
    # tiles see the key block, so the dK/dV kernel's dQ must not leave K zeroed between them.
    "k_minus_inf": dict(causal=True, window=(100, 0), Lq=240, Lk=240, Hq=2, Hkv=1, plant=_make_q_positive,
                        plants=[("k", (0, 70, 0, 5), -INF), ("v", (0, 200, 0, 1), NAN)]),
    # The middle sequence of three holds a non-finite k and v; the others stay exact.
    "varlen": dict(cu_q=[0, 100, 220, 300], cu_k=[0, 100, 220, 300], causal=True, window=(30, 0), Hq=2, Hkv=1,
                   plants=[("k", (130, 0, 1), NAN), ("v", (170, 0, 5), INF)]),
}

# (case, head dim, dtype) of the default run.
_FWD_DEFAULT = [("causal", 64, torch.float16), ("lambda", 64, torch.bfloat16), ("window_two_sided", 128, torch.bfloat16),
                ("all_minus_inf_row", 64, torch.float16), ("sink_logits", 256, torch.bfloat16),
                ("varlen", 96, torch.float16)]
_BWD_DEFAULT = [("causal", 64, torch.float16, False), ("lambda", 128, torch.bfloat16, True),
                ("window_two_sided", 64, torch.bfloat16, False), ("all_minus_inf_row", 256, torch.float16, True),
                ("k_minus_inf", 64, torch.bfloat16, False), ("varlen", 64, torch.float16, False)]


def _problem(name, D, dtype, seed):
    c = dict(CASES[name])
    plants, plant = c.pop("plants"), c.pop("plant", None)
    shape = dict(B=1, Lq=None, Lk=None, Hq=c.pop("Hq"), Hkv=c.pop("Hkv"))
    shape["Lq"], shape["Lk"] = c.pop("Lq", None), c.pop("Lk", None)
    cu_q, cu_k = c.pop("cu_q", None), c.pop("cu_k", None)
    sink_logits = c.pop("sink_logits", False)
    opts = dict(causal=False, window=None, sinks=0, softcap=0.0, logn_base=None, q_start=None, k_start=0, scale=None)
    opts.update(c)
    g = torch.Generator().manual_seed(3000 + seed)
    q, k, v, slopes, zsink, kw = _make_inputs(g, dtype, D, shape["B"], shape["Lq"], shape["Lk"], shape["Hq"],
                                              shape["Hkv"], "bshd", cu_q, cu_k, False, sink_logits, **opts)
    if plant is not None:
        plant(q, k, v, zsink)
    for t, idx, value in plants:
        {"q": q, "k": k, "v": v, "z": zsink}[t][idx] = value
    return q, k, v, zsink, kw, shape


class Sentinel:
    """An output inside a buffer filled with a finite sentinel, guard bands on both sides: the
    kernel must write every element and nothing outside (NaN outputs are legitimate here)."""

    PAD, FILL = 4096, 4096.0  # exact in fp16, bf16 and fp32; far from any result of these inputs

    def __init__(self, shape, dtype):
        n = math.prod(shape)
        self.buf = torch.full((n + 2 * self.PAD,), self.FILL, dtype=dtype)
        self.t = self.buf[self.PAD: self.PAD + n].view(shape)

    def check(self, name):
        for g in (self.buf[: self.PAD], self.buf[-self.PAD:]):
            assert (g == self.FILL).all(), f"{name}: written out of bounds"
        assert not (self.t == self.FILL).any(), f"{name}: elements left unwritten"


def _check_masked_rows(out, lse, ref_lse, bad_out):
    """Rows the reference gives lse -inf (no visible key), unless non-finite through their out:
    exactly out 0, lse -inf."""
    rows_first = out.transpose(0, 1) if out.dim() == 3 else out.transpose(-2, -3)  # (..., H, L, D)
    masked = torch.isneginf(ref_lse) & ~bad_out
    if masked.any():
        assert torch.isneginf(lse[masked]).all(), "lse: a row with no visible key is not -inf"
        assert (rows_first[masked] == 0).all(), "out: a row with no visible key is not 0"


def _nonfinite_out_rows(out):
    """Per (head, row) in lse's layout: whether the row of out holds a non-finite value."""
    bad = ~torch.isfinite(out).all(-1)  # (B, L, H) dense, (T, H) varlen
    return bad.transpose(-1, -2)


def run_nonfinite_fwd(lib, name, D, dtype, policy=5, seed=0):
    from longattn.reference import attention_ref

    q, k, v, zsink, kw, shape = _problem(name, D, dtype, seed)
    out64, lse64 = attention_ref(q, k, v, sink_logits=zsink, upcast=True, **kw)
    outl, lsel = attention_ref(q, k, v, sink_logits=zsink, upcast=False, **kw)
    out, lse = Sentinel(out64.shape, dtype), Sentinel(lse64.shape, torch.float32)
    a = _problem_args(dtype=dtype, D=D, policy=policy, seed=seed, q=q, k=k, v=v, zsink=zsink, inputs=[], **shape, **kw)
    a.out, a.lse = _ptr(out.t), _ptr(lse.t)
    err = ctypes.create_string_buffer(512)
    assert lib.emu_flash_fwd(ctypes.byref(a), err, 512) == 0, err.value.decode()
    out.check("out")
    lse.check("lse")
    bad = compare_nonfinite("out", out.t, out64, outl, factor=2.0)
    compare_nonfinite("lse", lse.t, lse64, lsel, rows=False, factor=2.0)
    bad_rows = _nonfinite_out_rows(out64)
    _check_masked_rows(out.t, lse.t, lse64, bad_rows)
    # A NaN row whose lse is not finite has lse NaN, not +-inf: the backward reads only lse, and
    # -inf would pass for a row that sees no key.
    assert torch.isnan(lse.t[bad_rows & ~torch.isfinite(lse64)]).all(), "lse: a NaN row has an infinite lse"
    return bad


def run_nonfinite_bwd(lib, name, D, dtype, deterministic, narrow=False, policy=5, seed=0):
    from longattn.reference import attention_ref

    q, k, v, zsink, kw, shape = _problem(name, D, dtype, seed)
    g = torch.Generator().manual_seed(4000 + seed)

    def grads(upcast):
        cast = (lambda x: x.double()) if upcast else (lambda x: x)
        leaves = [cast(x).detach().requires_grad_() for x in (q, k, v)]
        zl = cast(zsink).detach().requires_grad_() if zsink is not None else None
        o, l_ = attention_ref(*leaves, sink_logits=zl, upcast=upcast, **kw)
        return (o, l_), leaves + ([zl] if zl is not None else [])

    (out64, lse64), leaves64 = grads(True)
    dout = torch.randn(out64.shape, generator=g).to(dtype)
    dlse = torch.randn(lse64.shape, generator=g).float()
    ref = torch.autograd.grad((out64, lse64), leaves64, (dout.double(), dlse.double()))
    (outl, lsel), leavesl = grads(False)
    lo = torch.autograd.grad((outl, lsel), leavesl, (dout, dlse.to(lsel.dtype)))

    # The forward's lse (common/softmax_row.h): NaN for every row the dense formula makes NaN,
    # where the reference's logsumexp may say +inf (an infinite logit) or -inf (all visible
    # logits -inf); the backward reads only lse, so that NaN is what sends NaN to the row's
    # gradients. -inf stays for rows that see no key (their out is 0).
    bad_out = _nonfinite_out_rows(out64.detach())
    keep = torch.isfinite(lse64) | (torch.isneginf(lse64) & ~bad_out)
    lse = torch.where(keep, lse64.detach(), torch.full_like(lse64, NAN)).float().contiguous()
    out = out64.detach().to(dtype).contiguous()
    outs = [Sentinel(q.shape, dtype), Sentinel(k.shape, dtype), Sentinel(v.shape, dtype)]
    if zsink is not None:
        outs.append(Sentinel(zsink.shape, torch.float32))
    a = _problem_args(dtype=dtype, D=D, policy=policy, seed=seed, q=q, k=k, v=v, zsink=zsink,
                      inputs=[out, lse, dout, dlse], **shape, **kw)
    a.deterministic, a.narrow = int(deterministic), int(narrow)
    a.out, a.lse, a.dout, a.dlse = _ptr(out), _ptr(lse), _ptr(dout), _ptr(dlse)
    a.dq, a.dk, a.dv = (_ptr(o.t) for o in outs[:3])
    a.dsink = _ptr(outs[3].t) if zsink is not None else None
    ws = torch.zeros(lib.emu_flash_bwd_workspace(ctypes.byref(a)) // 4 + 1, dtype=torch.float32)
    a.workspace, a.workspace_bytes = ws.data_ptr(), ws.numel() * 4
    err = ctypes.create_string_buffer(512)
    assert lib.emu_flash_bwd(ctypes.byref(a), err, 512) == 0, err.value.decode()

    bad = {}
    for n, o, r, l_ in zip(["dq", "dk", "dv", "dsink"], outs, ref, lo):
        o.check(n)
        bad[n] = compare_nonfinite(n, o.t, r, l_, rows=n != "dsink", factor=3.0)
    return bad


def _fwd_params():
    if not _FULL:
        return [pytest.param(n, D, dt, 5, id=f"{n}-hd{D}-{str(dt)[6:]}") for n, D, dt in _FWD_DEFAULT]
    dims = [(D, dt) for D in (64, 96, 128, 256) for dt in (torch.float16, torch.bfloat16)]
    return [pytest.param(n, D, dt, (5, 1, 6)[(i + j) % 3], id=f"{n}-hd{D}-{str(dt)[6:]}")
            for i, n in enumerate(CASES) for j, (D, dt) in enumerate(dims)]


def _bwd_params():
    if not _FULL:
        return [pytest.param(n, D, dt, det, False, id=f"{n}-hd{D}-{str(dt)[6:]}-{'det' if det else 'atomic'}")
                for n, D, dt, det in _BWD_DEFAULT]
    out = []
    for i, n in enumerate(CASES):
        for j, (D, narrow) in enumerate([(64, False), (96, False), (128, False), (128, True), (256, False)]):
            dt = (torch.float16, torch.bfloat16)[(i + j) % 2]
            for det in (False, True):
                tag = f"{n}-hd{D}{'n' if narrow else ''}-{str(dt)[6:]}-{'det' if det else 'atomic'}"
                out.append(pytest.param(n, D, dt, det, narrow, id=tag))
    return out


@pytest.mark.parametrize("name,D,dtype,policy", _fwd_params())
def test_flash_fwd_nonfinite(emu_fwd_lib, name, D, dtype, policy):
    bad = run_nonfinite_fwd(emu_fwd_lib, name, D, dtype, policy=policy)
    assert bad.any(), "the plants reach no row: the case tests nothing"


@pytest.mark.parametrize("name,D,dtype,deterministic,narrow", _bwd_params())
def test_flash_bwd_nonfinite(emu_lib, name, D, dtype, deterministic, narrow):
    bad = run_nonfinite_bwd(emu_lib, name, D, dtype, deterministic, narrow=narrow)
    assert bad["dq"].any() and not bad["dq"].all(), "the plants reach no gradient row, or all of them"
