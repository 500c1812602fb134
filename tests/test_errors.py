"""Bad inputs raise a clear ValueError/RuntimeError (TypeError for wrong Python types) whose
message names the offending argument."""

import pytest
import torch

import longattn
from helpers import cu_seqlens, randn

ERRS = (ValueError, RuntimeError, TypeError)


def _qkv(device="cpu", B=2, L=16, Hq=4, Hkv=2, D=32, dtype=torch.float32):
    return (randn(B, L, Hq, D, dtype=dtype, device=device),
            randn(B, L, Hkv, D, dtype=dtype, device=device),
            randn(B, L, Hkv, D, dtype=dtype, device=device))


def _varlen(device="cpu", lens=(3, 5), Hq=4, Hkv=2, D=16):
    T = sum(lens)
    return (randn(T, Hq, D, device=device), randn(T, Hkv, D, device=device), randn(T, Hkv, D, device=device),
            cu_seqlens(lens, device))


def _other_device(device):
    if device == "cuda":
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "meta"


def test_int_dtype(device):
    q, k, v = _qkv(device)
    with pytest.raises(ERRS, match=r"\bq\b"):
        longattn.attention(q.to(torch.int32), k.to(torch.int32), v.to(torch.int32))
    with pytest.raises(ERRS, match=r"\bk\b"):
        longattn.attention(q, k.to(torch.int64), v)


def test_mixed_dtypes(device):
    q, k, v = _qkv(device)
    with pytest.raises(ERRS, match=r"\bk\b"):
        longattn.attention(q, k.to(torch.bfloat16), v)
    with pytest.raises(ERRS, match=r"\bv\b"):
        longattn.attention(q, k, v.double())


@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_wrong_rank(which, device):
    t = dict(zip("qkv", _qkv(device)))
    t[which] = t[which][0]  # rank 3 while the others are rank 4
    with pytest.raises(ERRS, match=rf"\b{which}\b"):
        longattn.attention(t["q"], t["k"], t["v"])
    t = dict(zip("qkv", _qkv(device)))
    t[which] = t[which][..., None]  # rank 5
    with pytest.raises(ERRS, match=rf"\b{which}\b"):
        longattn.attention(t["q"], t["k"], t["v"])


def test_mismatched_devices(device):
    q, k, v = _qkv(device)
    other = _other_device(device)
    with pytest.raises(ERRS, match=r"\bk\b"):
        longattn.attention(q, k.to(other), v)
    with pytest.raises(ERRS, match=r"\bv\b"):
        longattn.attention(q, k, v.to(other))
    with pytest.raises(ERRS, match=r"sink_logits"):
        longattn.attention(q, k, v, sink_logits=torch.zeros(4, device=other))
    with pytest.raises(ERRS, match=r"alibi_slopes"):
        longattn.attention(q, k, v, alibi_slopes=torch.zeros(4, device=other))


def test_non_contiguous_head_dim(device):
    q, k, v = _qkv(device, D=32)
    q_bad = randn(2, 16, 4, 64, device=device)[..., ::2]
    assert q_bad.stride(-1) != 1
    with pytest.raises(ERRS, match=r"(?i)\bq\b.*(contiguous|stride)|(contiguous|stride).*\bq\b"):
        longattn.attention(q_bad, k, v)
    v_bad = randn(2, 16, 2, 64, device=device)[..., 1::2]
    with pytest.raises(ERRS, match=r"(?i)\bv\b.*(contiguous|stride)|(contiguous|stride).*\bv\b"):
        longattn.attention(q, k, v_bad)


def test_heads_not_multiple(device):
    q, _, _ = _qkv(device, Hq=4)
    _, k, v = _qkv(device, Hkv=3)
    with pytest.raises(ERRS, match=r"(?i)head"):
        longattn.attention(q, k, v)


@pytest.mark.parametrize("D", [0, 257, 512])
def test_unsupported_head_dim(D, device):
    q, k, v = _qkv(device, D=D)
    with pytest.raises(ERRS, match=r"(?i)head.?dim|\bD\b"):
        longattn.attention(q, k, v)


def test_head_dim_mismatch(device):
    q, _, _ = _qkv(device, D=32)
    _, k, v = _qkv(device, D=16)
    with pytest.raises(ERRS, match=r"(?i)head.?dim|\bk\b|shape"):
        longattn.attention(q, k, v)


# (-1, None) is valid (s >= p + 1, unbounded right): left + right >= 0 only binds when both are given.
@pytest.mark.parametrize("window", [(3, -4), (-2, 1), (1.5, 0), ("a", 0), (1, 2, 3), 5, (0, 2.0)])
def test_bad_window(window, device):
    q, k, v = _qkv(device)
    with pytest.raises(ERRS, match=r"window"):
        longattn.attention(q, k, v, window=window)


@pytest.mark.parametrize("sinks", [-1, -100])
def test_negative_sinks(sinks, device):
    q, k, v = _qkv(device)
    with pytest.raises(ERRS, match=r"sinks"):
        longattn.attention(q, k, v, sinks=sinks)


def test_cu_seqlens_not_int32(device):
    q, k, v, cu = _varlen(device)
    with pytest.raises(ERRS, match=r"cu_seqlens_q"):
        longattn.attention(q, k, v, cu_seqlens_q=cu.long(), cu_seqlens_k=cu)
    with pytest.raises(ERRS, match=r"cu_seqlens_k"):
        longattn.attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu.float())


def test_cu_seqlens_not_monotone(device):
    q, k, v, cu = _varlen(device, lens=(3, 5))
    bad = torch.tensor([0, 6, 3, 8], dtype=torch.int32, device=device)
    good = cu_seqlens([3, 3, 2], device)
    with pytest.raises(ERRS, match=r"cu_seqlens_q"):
        longattn.attention(q, k, v, cu_seqlens_q=bad, cu_seqlens_k=good)
    with pytest.raises(ERRS, match=r"cu_seqlens_k"):
        longattn.attention(q, k, v, cu_seqlens_q=good, cu_seqlens_k=bad)


def test_cu_seqlens_wrong_ends(device):
    q, k, v, cu = _varlen(device, lens=(3, 5))
    last_wrong = torch.tensor([0, 3, 7], dtype=torch.int32, device=device)
    first_wrong = torch.tensor([1, 3, 8], dtype=torch.int32, device=device)
    for bad in (last_wrong, first_wrong):
        with pytest.raises(ERRS, match=r"cu_seqlens_q"):
            longattn.attention(q, k, v, cu_seqlens_q=bad, cu_seqlens_k=cu)
        with pytest.raises(ERRS, match=r"cu_seqlens_k"):
            longattn.attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=bad)


def test_cu_seqlens_length_mismatch(device):
    q, k, v, cu = _varlen(device, lens=(3, 5))
    cu3 = cu_seqlens([3, 5, 0], device)
    with pytest.raises(ERRS, match=r"cu_seqlens"):
        longattn.attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu3)


def test_cu_seqlens_only_one_given(device):
    q, k, v, cu = _varlen(device)
    with pytest.raises(ERRS, match=r"cu_seqlens"):
        longattn.attention(q, k, v, cu_seqlens_q=cu)


def test_cu_seqlens_wrong_device(device):
    q, k, v, cu = _varlen(device)
    other = _other_device(device)
    with pytest.raises(ERRS, match=r"cu_seqlens_q"):
        longattn.attention(q, k, v, cu_seqlens_q=cu.to(other), cu_seqlens_k=cu)


def test_cu_seqlens_wrong_rank(device):
    q, k, v, cu = _varlen(device)
    with pytest.raises(ERRS, match=r"cu_seqlens_q"):
        longattn.attention(q, k, v, cu_seqlens_q=cu[None], cu_seqlens_k=cu)


def test_varlen_with_dense_tensors(device):
    q, k, v = _qkv(device)
    cu = cu_seqlens([8, 8], device)
    with pytest.raises(ERRS, match=r"\bq\b|cu_seqlens"):
        longattn.attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu)


@pytest.mark.parametrize("bad", ["shape", "dtype", "rank"])
def test_alibi_slopes_bad(bad, device):
    q, k, v = _qkv(device)
    s = {"shape": torch.ones(3, device=device), "dtype": torch.ones(4, dtype=torch.float64, device=device),
         "rank": torch.ones(1, 4, device=device)}[bad]
    with pytest.raises(ERRS, match=r"alibi_slopes"):
        longattn.attention(q, k, v, alibi_slopes=s)


@pytest.mark.parametrize("bad", ["shape", "dtype", "rank"])
def test_sink_logits_bad(bad, device):
    q, k, v = _qkv(device)
    s = {"shape": torch.ones(2, device=device), "dtype": torch.ones(4, dtype=torch.bfloat16, device=device),
         "rank": torch.ones(4, 1, device=device)}[bad]
    with pytest.raises(ERRS, match=r"sink_logits"):
        longattn.attention(q, k, v, sink_logits=s)


def test_kv_shape_mismatch(device):
    q, k, v = _qkv(device)
    with pytest.raises(ERRS, match=r"\bv\b|\bk\b"):
        longattn.attention(q, k, v[:, :8])
    with pytest.raises(ERRS, match=r"\bv\b|\bk\b"):
        longattn.attention(q, k, torch.cat([v, v], dim=2))


def test_batch_mismatch(device):
    q, k, v = _qkv(device, B=2)
    with pytest.raises(ERRS, match=r"(?i)batch"):
        longattn.attention(q[:1], k, v)


def test_max_seqlen_too_small(device):
    q, k, v, cu = _varlen(device, lens=(3, 5))
    with pytest.raises(ERRS, match=r"max_seqlen_q"):
        longattn.attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=4, max_seqlen_k=5)
    with pytest.raises(ERRS, match=r"max_seqlen_k"):
        longattn.attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=5, max_seqlen_k=2)


def test_bad_softcap_and_scale_and_logn(device):
    q, k, v = _qkv(device)
    with pytest.raises(ERRS, match=r"softcap"):
        longattn.attention(q, k, v, softcap=-1.0)
    with pytest.raises(ERRS, match=r"logn_base"):
        longattn.attention(q, k, v, logn_base=1.0)  # ln(1) = 0 divides
    with pytest.raises(ERRS, match=r"logn_base"):
        longattn.attention(q, k, v, logn_base=-3.0)


def test_merge_errors(device):
    o = torch.randn(1, 5, 2, 8, device=device)
    l = torch.randn(1, 2, 5, device=device)
    with pytest.raises(ERRS, match=r"outs|lses"):
        longattn.merge_attention([], [])
    with pytest.raises(ERRS, match=r"outs|lses"):
        longattn.merge_attention([o, o], [l])
    with pytest.raises(ERRS, match=r"lses"):
        longattn.merge_attention([o, o], [l, l.double()[:, :, :4]])
    with pytest.raises(ERRS, match=r"lses"):
        longattn.merge_attention([o], [l.transpose(1, 2).contiguous()])
    with pytest.raises(ERRS, match=r"outs"):
        longattn.merge_attention([o, o[:, :4]], [l, l])
    with pytest.raises(ERRS, match=r"outs"):
        longattn.merge_attention([o, o.double()], [l, l])


def test_merge_inplace_errors(device):
    acc_out = torch.zeros(1, 8, 2, 4, device=device)
    acc_lse = torch.full((1, 2, 8), float("-inf"), device=device)
    o = torch.randn(1, 3, 2, 4, device=device)
    l = torch.randn(1, 2, 3, device=device)
    op = torch.ops.longattn.merge_attention_
    with pytest.raises(ValueError, match=r"rows \[6, 6 \+ 3\) of part_out do not fit"):
        op(acc_out, acc_lse, o, l, 6)
    with pytest.raises(ValueError, match=r"do not fit"):
        op(acc_out, acc_lse, o, l, -1)
    with pytest.raises(ValueError, match=r"out and lse must be Float"):
        op(acc_out.half(), acc_lse, o, l, 0)
    with pytest.raises(ValueError, match=r"out and lse must be contiguous"):
        op(acc_out.transpose(1, 2).contiguous().transpose(1, 2), acc_lse, o, l, 0)
    with pytest.raises(ValueError, match=r"part_lse must have shape"):
        op(acc_out, acc_lse, o, l[:, :, :2], 0)
    with pytest.raises(ValueError, match=r": lse must have shape"):
        op(acc_out, acc_lse[:, :1], o, l, 0)
    with pytest.raises(ValueError, match=r"out must have shape"):
        op(acc_out[..., :2], acc_lse, o, l, 0)
    with pytest.raises(ValueError, match=r"part_lse must be float32"):
        op(acc_out, acc_lse, o, l.half(), 0)
    with pytest.raises(ValueError, match=r"part_out must be floating point"):
        op(acc_out, acc_lse, o.int(), l, 0)


def test_dilated_errors(device):
    q, k, v = _qkv(device, Hq=2, Hkv=2)
    with pytest.raises(ERRS, match=r"segment"):
        longattn.dilated_attention(q, k, v, segments=[])
    with pytest.raises(ERRS, match=r"segment"):
        longattn.dilated_attention(q, k, v, segments=[(0, 1)])
    with pytest.raises(ERRS, match=r"segment"):
        longattn.dilated_attention(q, k, v, segments=[(8, 0)])
    with pytest.raises(ERRS, match=r"(?i)\bk\b|seqlen|length"):
        longattn.dilated_attention(q, k[:, :8], v[:, :8], segments=[(8, 1)])


def test_dilation_errors(device):
    q, k, v = _qkv(device)
    with pytest.raises(ERRS, match=r"dilation"):
        longattn.attention(q, k, v, dilation=0)
    with pytest.raises(ERRS, match=r"dilation"):
        longattn.attention(q, k, v, dilation=1.5)


def test_cuda_tensor_without_cuda_build(monkeypatch):
    """A CPU-only build names the fix instead of the dispatcher's missing-kernel error."""
    from longattn import _device

    class CudaLike:  # stands in for a CUDA tensor where no GPU is present
        is_cuda = True
        device = "cuda:0"

    monkeypatch.setattr(_device, "CUDA_BUILT", False)
    with pytest.raises(RuntimeError, match=r"\bq\b.*LONGATTN_CUDA=1"):
        _device.check_device_built(CudaLike(), "q")
    monkeypatch.setattr(_device, "CUDA_BUILT", True)
    _device.check_device_built(CudaLike(), "q")
