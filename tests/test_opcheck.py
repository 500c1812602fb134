"""torch.library.opcheck on every op registered under torch.ops.longattn: schema, fake (meta)
kernels, autograd registration, aot dispatch with dynamic shapes."""

import pytest
import torch

import longattn  # noqa: F401 - registers the ops
from longattn.reference import alibi_slopes
from helpers import cu_seqlens, randn

UNBOUNDED = getattr(longattn, "UNBOUNDED", getattr(longattn, "UNBOUNDED_WINDOW", 2**62))

OPS = ["attention", "attention_backward", "merge_attention", "merge_attention_backward",
       "merge_attention_"]


def registered_ops():
    names = torch._C._dispatch_get_all_op_names()
    return sorted({n.split("::", 1)[1].split(".")[0] for n in names if n.startswith("longattn::")})


def test_ops_registered():
    missing = [op for op in OPS if op not in registered_ops()]
    assert not missing, f"ops not registered under torch.ops.longattn: {missing}"


def test_every_registered_op_has_an_opcheck_case():
    """DESIGN.md: a new op is done when it has (among others) an opcheck test."""
    extra = [op for op in registered_ops() if op not in OPS]
    assert not extra, f"ops without an opcheck case in tests/test_opcheck.py: {extra}"


def _win(w):
    return UNBOUNDED if w is None else int(w)


def attention_args(q, k, v, *, cu_q=None, cu_k=None, alibi=None, sink=None, scale=None, softcap=0.0,
                   logn_base=0.0, causal=False, window=(None, None), sinks=0, q_start=None,
                   k_start=0, max_q="longest", max_k="longest"):
    """The op's arguments; max_q/max_k "longest" gives the longest varlen sequence (None, the
    default of the dense form and a valid choice for varlen, lets the op derive it)."""
    D = q.shape[-1]
    if scale is None:
        scale = D ** -0.5
    if max_q == "longest":
        max_q = None if cu_q is None else int((cu_q[1:] - cu_q[:-1]).max())
    if max_k == "longest":
        max_k = None if cu_k is None else int((cu_k[1:] - cu_k[:-1]).max())
    return (q, k, v, cu_q, cu_k, alibi, sink, float(scale), float(softcap), float(logn_base), bool(causal),
            _win(window[0]), _win(window[1]), int(sinks), q_start, int(k_start), max_q, max_k)


def _dense(B, Lq, Lk, Hq, Hkv, D, dtype, device, rg):
    return (randn(B, Lq, Hq, D, dtype=dtype, device=device, requires_grad=rg),
            randn(B, Lk, Hkv, D, dtype=dtype, device=device, requires_grad=rg),
            randn(B, Lk, Hkv, D, dtype=dtype, device=device, requires_grad=rg))


def attention_cases(device):
    cases = {}
    q, k, v = _dense(2, 17, 17, 4, 4, 16, torch.float32, device, False)
    cases["plain"] = attention_args(q, k, v)
    q, k, v = _dense(2, 17, 17, 4, 4, 16, torch.float32, device, True)
    cases["causal_rg"] = attention_args(q, k, v, causal=True)
    q, k, v = _dense(1, 9, 23, 8, 2, 24, torch.float32, device, True)
    z = torch.randn(8, device=device, requires_grad=True)
    cases["gqa_sink_window"] = attention_args(q, k, v, sink=z, alibi=alibi_slopes(8).to(device), causal=True,
                                              window=(5, 0), sinks=2, softcap=3.0, logn_base=4.0)
    q, k, v = _dense(1, 12, 12, 2, 1, 8, torch.bfloat16, device, True)
    cases["bf16_positions"] = attention_args(q, k, v, causal=True, q_start=30, k_start=25, window=(None, 2))
    q, k, v = _dense(2, 16, 16, 2, 2, 8, torch.float64, device, True)
    cases["fp64_strided"] = attention_args(q.transpose(1, 2).contiguous().transpose(1, 2), k, v, causal=True)
    lq, lk = [3, 0, 7], [5, 2, 7]
    qv = randn(sum(lq), 4, 16, device=device, requires_grad=True)
    kv = randn(sum(lk), 2, 16, device=device, requires_grad=True)
    vv = randn(sum(lk), 2, 16, device=device, requires_grad=True)
    zv = torch.randn(4, device=device, requires_grad=True)
    cases["varlen_gqa_sink"] = attention_args(qv, kv, vv, cu_q=cu_seqlens(lq, device), cu_k=cu_seqlens(lk, device),
                                              sink=zv, causal=True, window=(3, 0))
    cases["varlen_derived_max"] = attention_args(qv, kv, vv, cu_q=cu_seqlens(lq, device),
                                                 cu_k=cu_seqlens(lk, device), causal=True,
                                                 max_q=None, max_k=None)
    q, k, v = _dense(2, 10, 14, 2, 2, 8, torch.float32, device, True)
    cases["dense_max_bound"] = attention_args(q, k, v, causal=True, max_q=12, max_k=14)
    return cases


ATT_IDS = ["plain", "causal_rg", "gqa_sink_window", "bf16_positions", "fp64_strided", "varlen_gqa_sink",
           "varlen_derived_max", "dense_max_bound"]


@pytest.mark.parametrize("case", ATT_IDS)
def test_opcheck_attention(case, device):
    args = attention_cases(device)[case]
    torch.library.opcheck(torch.ops.longattn.attention.default, args)


@pytest.mark.parametrize("with_dlse", [False, True], ids=["no_dlse", "dlse"])
@pytest.mark.parametrize("case", ATT_IDS)
def test_opcheck_attention_backward(case, with_dlse, device):
    args = attention_cases(device)[case]
    with torch.no_grad():
        detached = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        out, lse = torch.ops.longattn.attention(*detached)
    dout = torch.randn_like(out)
    dlse = torch.randn_like(lse) if with_dlse else None
    q, k, v = detached[:3]
    bwd_args = (dout, dlse, q, k, v, out, lse) + detached[3:]
    torch.library.opcheck(torch.ops.longattn.attention_backward.default, bwd_args)
    dq, dk, dv, dsink = torch.ops.longattn.attention_backward(*bwd_args)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    if detached[6] is None:
        assert dsink.numel() == 0
    else:
        assert dsink.shape == detached[6].shape


def merge_cases(device):
    cases = {}
    for name, n, so, sl, dtype, rg in [
        ("dense2", 2, (2, 9, 3, 16), (2, 3, 9), torch.float32, False),
        ("dense3_rg", 3, (1, 7, 2, 8), (1, 2, 7), torch.float32, True),
        ("varlen4_bf16_rg", 4, (11, 2, 8), (2, 11), torch.bfloat16, True),
        ("fp64_rg", 2, (1, 5, 2, 4), (1, 2, 5), torch.float64, True),
    ]:
        outs = [torch.randn(so).to(device, dtype).requires_grad_(rg) for _ in range(n)]
        lses = []
        for i in range(n):
            l = torch.randn(sl)
            if i == 0:
                l[..., 0] = float("-inf")
            lses.append(l.to(device).requires_grad_(rg))
        cases[name] = (outs, lses)
    return cases


MERGE_IDS = ["dense2", "dense3_rg", "varlen4_bf16_rg", "fp64_rg"]


@pytest.mark.parametrize("case", MERGE_IDS)
def test_opcheck_merge(case, device):
    outs, lses = merge_cases(device)[case]
    torch.library.opcheck(torch.ops.longattn.merge_attention.default, (outs, lses))


@pytest.mark.parametrize("with_dlse", [False, True], ids=["no_dlse", "dlse"])
@pytest.mark.parametrize("case", MERGE_IDS)
def test_opcheck_merge_backward(case, with_dlse, device):
    outs, lses = merge_cases(device)[case]
    outs = [o.detach() for o in outs]
    lses = [l.detach() for l in lses]
    out, lse = torch.ops.longattn.merge_attention(outs, lses)
    dout = torch.randn_like(out)
    dlse = torch.randn_like(lse) if with_dlse else None
    args = (dout, dlse, outs, lses, out, lse)
    torch.library.opcheck(torch.ops.longattn.merge_attention_backward.default, args)
    douts, dlses = torch.ops.longattn.merge_attention_backward(*args)
    assert len(douts) == len(outs) and len(dlses) == len(lses)
    for a, b in zip(douts + dlses, outs + lses):
        assert a.shape == b.shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
def test_opcheck_merge_inplace(dtype, device):
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    out = torch.randn(2, 9, 3, 16, dtype=acc, device=device)
    lse = torch.randn(2, 3, 9, dtype=acc, device=device)
    lse[:, :, 0] = float("-inf")
    part_out = torch.randn(2, 4, 3, 16, device=device).to(dtype)
    part_lse = torch.randn(2, 3, 4, device=device).to(acc)
    part_lse[:, 1, 0] = float("-inf")
    # Not differentiable (the ring op has its own backward): no autograd registration check.
    torch.library.opcheck(torch.ops.longattn.merge_attention_.default,
                          (out, lse, part_out, part_lse, 3),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static",
                                      "test_aot_dispatch_dynamic"))


# Ops whose opcheck cases live with their family's tests.
OPS_ELSEWHERE = {"rope": "tests/test_rope.py", "rope_": "tests/test_rope.py",
                 "rope_backward": "tests/test_rope_grad.py",
                 "ring_attention": "below", "ring_attention_backward": "below",
                 "decode_attention": "tests/test_kvcache.py", "compact_": "tests/test_kvcache.py",
                 "compact_rerotate_": "tests/test_kvcache.py",
                 "decode_attention_paged": "tests/test_kvcache_paged.py",
                 "compact_paged_": "tests/test_kvcache_paged.py",
                 "rope_attention": "tests/test_extend_fused.py",
                 "rope_attention_backward": "tests/test_extend_fused.py",
                 "composite": "tests/test_compile_dynamic.py",
                 "composite_backward": "tests/test_compile_dynamic.py"}
OPS.extend(OPS_ELSEWHERE)


@pytest.fixture(scope="module")
def one_rank_group():
    """A single-process gloo group: the ring ops need a group, not peers."""
    import torch.distributed as dist
    created = False
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        created = True
    yield dist.group.WORLD.group_name
    if created:
        dist.destroy_process_group()


@pytest.mark.parametrize("mode", ["ring", "allgather"])
@pytest.mark.parametrize("sink", [False, True])
def test_opcheck_ring_ops(one_rank_group, mode, sink):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 12, 4, 16, generator=g, requires_grad=True)
    k = torch.randn(1, 12, 2, 16, generator=g, requires_grad=True)
    v = torch.randn(1, 12, 2, 16, generator=g, requires_grad=True)
    sink_logits = torch.randn(4, generator=g).requires_grad_() if sink else None
    scalars = (one_rank_group, "zigzag", mode, True, 5, 0, 2, 0.25, 0.0, 0.0, 0.0)
    fwd_args = (q, k, v, None, sink_logits) + scalars + (True, "")
    torch.library.opcheck(torch.ops.longattn.ring_attention, fwd_args)
    out, lse, lengths = torch.ops.longattn.ring_attention(*fwd_args)
    bwd_args = (torch.randn_like(out), torch.randn_like(lse), q.detach(), k.detach(),
                v.detach(), out.detach(), lse.detach(), lengths, None,
                sink_logits.detach() if sink else None) + scalars
    torch.library.opcheck(torch.ops.longattn.ring_attention_backward, bwd_args)
