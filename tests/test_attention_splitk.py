"""Split-K of the CPU forward (csrc/cpu/key_split.h): decode and short-query calls against long
key ranges, whose key tiles are cut into chunks computed apart and merged per row.

The split path is forced through longattn._C._set_cpu_tuning (csrc/cpu/tuning.h): splitk=n
chunks of n key tiles, 0 turns it off; small forced tiles make small shapes take it too. Values go against the
references with the suite's tolerance rule (helpers.py); when the split is on, the bits must not
depend on the thread count.
"""

import pytest
import torch

import longattn
from helpers import check_forward, cu_seqlens, randn
from test_attention import COMBOS, MASKED_CASES, materialize, qkv

# Long enough for several 2048-key chunks, not a multiple of the 256-key tile.
LK = 9000
# The automatic chunk for head dims <= 128: ceil(2048 / 256) key tiles.
AUTO_CHUNK_TILES = 8

DECODE_COMBOS = {
    "none": {},
    "causal_q_start": dict(causal=True, q_start=LK - 700),
    "window": dict(causal=True, window=(5000, 0)),
    "sinks_window": dict(causal=True, window=(3000, 0), sinks=4),
    "sinks_window_noncausal": dict(window=(2500, 2500), sinks=300),
    "softcap": dict(softcap=2.0, scale=0.3),
    "alibi": dict(alibi=True, causal=True),
    "sink_logits": dict(sink_logits=True),
    "sink_logits_window": dict(sink_logits=True, causal=True, window=(4500, 0)),
    "logn": dict(logn_base=64.0, causal=True),
    "all": dict(causal=True, window=(6000, 0), sinks=2, softcap=2.0, alibi=True, sink_logits=True,
                logn_base=32.0, scale=0.2),
}


@pytest.fixture
def tuning():
    """Override the CPU forward's tiles / split-K for the test; the defaults come back after."""
    def set_(tiles=(0, 0), splitk=-1):
        longattn._C._set_cpu_tuning(tiles[0], tiles[1], splitk)
    yield set_
    set_()


@pytest.fixture
def threads():
    """torch.set_num_threads for the test, restored afterwards."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def _run(q, k, v, **kw):
    return longattn.attention(q, k, v, return_lse=True, **kw)


@pytest.mark.parametrize("Lq", [1, 16])
@pytest.mark.parametrize("combo", list(DECODE_COMBOS))
def test_decode_long_keys(combo, Lq, tuning):
    tuning(splitk=AUTO_CHUNK_TILES)
    q, k, v = qkv(1, Lq, LK, 2, 1, 64, torch.float32, "cpu")
    check_forward(q, k, v, **materialize(DECODE_COMBOS[combo], 2, "cpu"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64],
                         ids=["fp32", "bf16", "fp16", "fp64"])
@pytest.mark.parametrize("combo", ["causal_q_start", "sinks_window", "all"])
def test_decode_dtypes(combo, dtype, tuning):
    tuning(splitk=AUTO_CHUNK_TILES)
    q, k, v = qkv(1, 5, LK, 1, 1, 128, dtype, "cpu")
    check_forward(q, k, v, **materialize(DECODE_COMBOS[combo], 1, "cpu"))


@pytest.mark.parametrize("Hq,Hkv", [(4, 1), (8, 2)], ids=lambda x: str(x))
def test_decode_gqa(Hq, Hkv, tuning):
    tuning(splitk=AUTO_CHUNK_TILES)
    q, k, v = qkv(2, 3, LK, Hq, Hkv, 64, torch.float32, "cpu")
    check_forward(q, k, v, **materialize(DECODE_COMBOS["sinks_window"], Hq, "cpu"))


@pytest.mark.parametrize("forced", [False, True], ids=["auto", "forced"])
@pytest.mark.parametrize("combo", ["none", "causal_q_start", "sink_logits_window", "all"])
def test_varlen_mixed_lengths(combo, forced, tuning):
    """One long sequence (split), short ones (whole), an empty one, in one call."""
    if forced:
        tuning(splitk=AUTO_CHUNK_TILES)
    kw = dict(DECODE_COMBOS[combo])
    kw.pop("q_start", None)  # one q_start for sequences of very different lengths
    lq, lk = [1, 16, 2, 3], [LK, 40, 0, 600]
    q = randn(sum(lq), 2, 64)
    k = randn(sum(lk), 1, 64)
    v = randn(sum(lk), 1, 64)
    check_forward(q, k, v, cu_seqlens_q=cu_seqlens(lq), cu_seqlens_k=cu_seqlens(lk),
                  max_seqlen_q=max(lq), max_seqlen_k=max(lk), **materialize(kw, 2, "cpu"))


@pytest.mark.parametrize("sink_logits", [False, True], ids=["plain", "sink_logits"])
@pytest.mark.parametrize("case", list(MASKED_CASES))
def test_fully_masked_rows_split(case, sink_logits, tuning):
    """8-row query tiles over 2-key tiles, one tile per chunk: a query tile mixes rows that see
    nothing in any chunk (out 0, lse -inf, or lse = z with a sink logit) with rows that see
    only some chunks."""
    tuning(tiles=(8, 2), splitk=1)
    Lq, Lk, kw, rows = MASKED_CASES[case]
    q, k, v = qkv(2, Lq, Lk, 2, 1, 32, torch.float32, "cpu")
    z = torch.randn(2) if sink_logits else None
    out, lse = check_forward(q, k, v, sink_logits=z, **kw)
    assert (out[:, rows] == 0).all()
    if z is None:
        assert torch.isneginf(lse[:, :, rows]).all()
    else:
        torch.testing.assert_close(lse[:, :, rows], z[None, :, None].expand(2, 2, len(rows)),
                                   rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("combo", list(COMBOS))
def test_small_tiles_forced_split(combo, tuning):
    """Every mask option through the split path on small shapes: 16-key tiles, chunks of one
    and of three tiles, several query tiles."""
    q, k, v = qkv(2, 40, 97, 4, 2, 32, torch.float32, "cpu")
    kw = materialize(COMBOS[combo], 4, "cpu")
    for chunk in (1, 3):
        tuning(tiles=(8, 16), splitk=chunk)
        check_forward(q, k, v, **kw)


@pytest.mark.parametrize("combo", ["none", "causal_q_start", "sinks_window", "all"])
def test_split_bits_do_not_depend_on_threads(combo, threads, tuning):
    tuning(splitk=AUTO_CHUNK_TILES)
    q, k, v = qkv(1, 16, LK, 2, 1, 64, torch.float32, "cpu")
    kw = materialize(DECODE_COMBOS[combo], 2, "cpu")
    threads(1)
    out1, lse1 = _run(q, k, v, **kw)
    threads(2)
    out2, lse2 = _run(q, k, v, **kw)
    assert torch.equal(out1, out2) and torch.equal(lse1, lse2)


def test_single_item_splits_automatically(threads, tuning):
    """One item (H = 1, Lq <= 128) is below 2 x threads for any thread count, so the rule
    splits it with the automatic chunk: same bits as the forced chunk, on 1 and 2 threads,
    and the unsplit result agrees to rounding."""
    q, k, v = qkv(1, 1, LK, 1, 1, 64, torch.float32, "cpu")
    kw = dict(causal=True, sinks=4, window=(7000, 0))
    tuning()
    threads(1)
    auto1 = _run(q, k, v, **kw)
    threads(2)
    auto2 = _run(q, k, v, **kw)
    tuning(splitk=AUTO_CHUNK_TILES)
    forced = _run(q, k, v, **kw)
    tuning(splitk=0)
    whole = _run(q, k, v, **kw)
    for a, b in zip(auto1, auto2):
        assert torch.equal(a, b)
    for a, b in zip(auto2, forced):
        assert torch.equal(a, b)
    for a, b in zip(auto2, whole):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("combo", ["none", "sinks_window", "all"])
def test_chunk_count_is_capped(combo, tuning):
    """More key tiles than kMaxSplitChunks (64) chunks of one tile: the chunks grow instead
    (key_split.h), so scratch stays bounded; 2-key tiles over 300 keys give 150 tiles."""
    tuning(tiles=(8, 2), splitk=1)
    kw = dict(DECODE_COMBOS[combo])
    kw.pop("q_start", None)
    if "window" in kw:
        kw["window"] = (200, 0)
    q, k, v = qkv(1, 3, 300, 2, 1, 32, torch.float32, "cpu")
    check_forward(q, k, v, **materialize(kw, 2, "cpu"))
