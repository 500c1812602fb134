"""Randomized sweep over the whole option space against the float64 reference.

Each case draws shapes, mask parameters (including negative q_start, k_start offsets, windows
with negative or unbounded sides, sinks), score options and dtype, and checks out, lse and all
gradients. Seeds are fixed so a failure is reproducible from its id; inputs are drawn on the CPU
so a case is the same on every device.
"""
import random

import pytest
import torch

import longattn
from longattn import reference as R
from helpers import to_device


def draw_score_options(rnd, h, seed, softcap, logn_base=None):
    """Each score option with probability 0.2: softcap, ALiBi, learned sink logits, log-n."""
    kw = {}
    if rnd.random() < 0.2:
        kw["softcap"] = softcap
    if rnd.random() < 0.2:
        kw["alibi_slopes"] = R.alibi_slopes(h)
    if rnd.random() < 0.2:
        kw["sink_logits"] = torch.randn(h, generator=torch.Generator().manual_seed(seed))
    if logn_base is not None and rnd.random() < 0.2:
        kw["logn_base"] = logn_base
    return kw


def draw_case(seed):
    rnd = random.Random(seed)
    hk = rnd.choice([1, 2])
    h = hk * rnd.choice([1, 3])
    kw = dict(causal=rnd.random() < 0.6, sinks=rnd.choice([0, 0, 1, 4, 33]),
              q_start=rnd.choice([None, None, 0, 7, 200, -5]), k_start=rnd.choice([0, 0, 3, 100]))
    window = rnd.choice([None, (rnd.randint(0, 50), rnd.choice([0, 3, None, -1])),
                         (None, rnd.randint(0, 9)), (rnd.randint(0, 300), None)])
    if window and None not in window and window[0] + window[1] < 0:
        window = None
    kw["window"] = window
    kw.update(draw_score_options(rnd, h, seed, softcap=4.0, logn_base=8.0))
    shape = dict(B=rnd.randint(1, 2), H=h, Hk=hk, Lq=rnd.choice([1, 2, 5, 17, 64, 130, 300]),
                 Lk=rnd.choice([1, 3, 17, 64, 129, 300, 600]), D=rnd.choice([8, 16, 24, 40]))
    dtype = rnd.choice([torch.float32, torch.float64])
    return shape, kw, dtype


def draw_long_case(seed):
    """The real head dims and lengths that span several CPU tiles (128 x 256) and split-K chunks,
    with windows and sinks wide enough to cut tiles anywhere; fp32 or fp64."""
    rnd = random.Random(seed)
    hk = rnd.choice([1, 2])
    h = hk * rnd.choice([1, 2, 3])
    kw = dict(causal=rnd.random() < 0.6, sinks=rnd.choice([0, 1, 33, 130]),
              q_start=rnd.choice([None, 0, 300, -5]), k_start=rnd.choice([0, 3, 257]))
    window = rnd.choice([None, (rnd.randint(0, 700), rnd.choice([0, 3, None, 200])),
                         (rnd.randint(0, 1300), None), (rnd.randint(0, 64), 0)])
    kw["window"] = window
    kw.update(draw_score_options(rnd, h, seed, softcap=30.0))
    Lq = rnd.choice([127, 129, 257, 700])
    Lk = Lq if rnd.random() < 0.4 else rnd.choice([255, 257, 700, 1300])
    shape = dict(B=1, H=h, Hk=hk, Lq=Lq, Lk=Lk, D=(64, 96, 128, 256)[seed % 4])  # each dim in turn
    return shape, kw, rnd.choice([torch.float32, torch.float64])


def check_case(seed, shape, kw, dtype, device, tol, scaled=False):
    """out, lse and the three gradients against the float64 reference. scaled: tolerances
    relative to the largest reference magnitude (long rows accumulate larger gradients)."""
    kw = to_device(kw, device)
    g = torch.Generator().manual_seed(seed)
    B, H, Hk, Lq, Lk, D = (shape[x] for x in ("B", "H", "Hk", "Lq", "Lk", "D"))
    q, k, v = (torch.randn(B, L, h, D, dtype=dtype, generator=g).to(device).requires_grad_()
               for L, h in ((Lq, H), (Lk, Hk), (Lk, Hk)))
    out, lse = longattn.attention(q, k, v, return_lse=True, **kw)
    ref_out, ref_lse = R.attention_ref(q, k, v, **kw)

    def close(a, b, atol, what):
        scale = max(1.0, b.abs().max().item()) if scaled and b.numel() else 1.0
        torch.testing.assert_close(a.double(), b.double(), atol=atol * scale, rtol=0,
                                   msg=lambda detail: f"{what}: {detail}")

    finite = torch.isfinite(ref_lse)
    assert torch.equal(finite, torch.isfinite(lse)), "fully-masked rows differ"
    assert not torch.isnan(out).any()
    close(out, ref_out, tol, "out")
    close(lse[finite], ref_lse[finite], tol * (10 if scaled else 1), "lse")
    go, gl = torch.randn_like(out), torch.randn_like(lse)
    grads = torch.autograd.grad((out * go).sum() + (torch.where(finite, lse, 0) * gl).sum(), (q, k, v))
    ref = torch.autograd.grad((ref_out * go.to(ref_out.dtype)).sum()
                              + (torch.where(finite, ref_lse, 0) * gl.to(ref_lse.dtype)).sum(), (q, k, v))
    for name, a, b in zip("qkv", grads, ref):
        assert not torch.isnan(a).any(), f"NaN in d{name}"
        close(a, b, 20 * tol, f"d{name}")


@pytest.mark.parametrize("seed", range(60))
def test_random_case_matches_reference(seed, device):
    shape, kw, dtype = draw_case(seed)
    check_case(seed, shape, kw, dtype, device, 2e-5 if dtype == torch.float32 else 1e-10)


@pytest.mark.parametrize("seed", range(1000, 1016))
def test_random_long_case_matches_reference(seed, device):
    shape, kw, dtype = draw_long_case(seed)
    check_case(seed, shape, kw, dtype, device, 3e-5 if dtype == torch.float32 else 1e-10, scaled=True)
