"""The Hopper forward (LONGATTN_CUDA_BACKEND=sm90, docs/cuda.md) against the float64 reference on
the suite's mask and score options, where a compute capability 9.0 GPU and a build with the sm90
kernels are present (skipped otherwise): the options it covers must match, the others (softcap,
ALiBi, varlen, other head dims, fp32) must raise an error naming the reason. The backward of a
forced sm90 call runs as under auto. Tolerances: docs/numerics.md."""

import pytest
import torch

import longattn
from helpers import check_backward, check_forward, cu_seqlens, has_cuda_build, randn
from test_attention import COMBOS, materialize


def _sm90_ready():
    if not has_cuda_build() or not longattn.build_info().get("cuda_sm90"):
        return False
    return torch.cuda.get_device_capability(0) == (9, 0)


pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not _sm90_ready(),
                                 reason="needs a compute capability 9.0 GPU and a build with the sm90 kernels")]

ERRS = (ValueError, RuntimeError)
DTYPES = [torch.bfloat16, torch.float16]
DTYPE_IDS = ["bf16", "fp16"]
HEAD_DIMS = [64, 128]  # cuda/attention/sm90/support.h kSm90HeadDims
UNCOVERED = ("softcap", "alibi")  # options sm90_unsupported turns away


@pytest.fixture(autouse=True)
def sm90(monkeypatch):
    monkeypatch.setenv("LONGATTN_CUDA_BACKEND", "sm90")


def qkv(B, Lq, Lk, Hq, Hkv, D, dtype, layout="bshd"):
    return (randn(B, Lq, Hq, D, dtype=dtype, device="cuda", layout=layout),
            randn(B, Lk, Hkv, D, dtype=dtype, device="cuda", layout=layout),
            randn(B, Lk, Hkv, D, dtype=dtype, device="cuda", layout=layout))


@pytest.mark.parametrize("D", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("combo", list(COMBOS))
def test_sm90_forward(combo, dtype, D):
    q, k, v = qkv(2, 150, 150, 4, 2, D, dtype)  # 150: partial query and key tiles
    kw = materialize(COMBOS[combo], 4, "cuda")
    if any(COMBOS[combo].get(opt) for opt in UNCOVERED):
        with pytest.raises(ERRS, match="LONGATTN_CUDA_BACKEND=sm90.*softcap or ALiBi"):
            longattn.attention(q, k, v, **kw)
        return
    check_forward(q, k, v, **kw)


@pytest.mark.parametrize("D", HEAD_DIMS)
@pytest.mark.parametrize("Lq,Lk", [(1, 300), (77, 300), (300, 77), (129, 129), (1000, 1000)], ids=str)
@pytest.mark.parametrize("combo", ["none", "causal", "win_both", "lambda", "sinks_noncausal", "positions"])
def test_sm90_cross_lengths(combo, Lq, Lk, D):
    q, k, v = qkv(1, Lq, Lk, 8, 1, D, torch.bfloat16)
    check_forward(q, k, v, **materialize(COMBOS[combo], 8, "cuda"))


def test_sm90_fully_masked_rows():
    # Causal with keys starting at position 10: query rows 0..9 see no key, so out 0, lse -inf.
    q, k, v = qkv(1, 64, 64, 2, 2, 128, torch.bfloat16)
    kw = dict(causal=True, q_start=0, k_start=10)
    out, lse = longattn.attention(q, k, v, return_lse=True, **kw)
    assert torch.equal(out[:, :10], torch.zeros_like(out[:, :10]))
    assert torch.isneginf(lse[:, :, :10]).all()
    check_forward(q, k, v, **kw)


def test_sm90_head_major_layout_and_backward():
    q, k, v = qkv(2, 200, 260, 8, 2, 128, torch.float16, layout="bhsd")
    check_forward(q, k, v, causal=True, window=(64, 0), sinks=3)
    check_backward(q, k, v, causal=True, window=(64, 0), sinks=3)


@pytest.mark.parametrize("case", ["fp32", "hd96", "varlen"])
def test_sm90_uncovered_calls_raise(case):
    if case == "fp32":
        q, k, v = qkv(1, 64, 64, 2, 2, 64, torch.float32)
        kw, match = {}, "float16/bfloat16"
    elif case == "hd96":
        q, k, v = qkv(1, 64, 64, 2, 2, 96, torch.bfloat16)
        kw, match = {}, "head_dim"
    else:
        lens = [5, 70]
        q = randn(sum(lens), 4, 64, dtype=torch.bfloat16, device="cuda")
        k = randn(sum(lens), 1, 64, dtype=torch.bfloat16, device="cuda")
        v = randn(sum(lens), 1, 64, dtype=torch.bfloat16, device="cuda")
        kw = dict(cu_seqlens_q=cu_seqlens(lens, "cuda"), cu_seqlens_k=cu_seqlens(lens, "cuda"))
        match = "variable-length"
    with pytest.raises(ERRS, match="LONGATTN_CUDA_BACKEND=sm90.*" + match):
        longattn.attention(q, k, v, **kw)
