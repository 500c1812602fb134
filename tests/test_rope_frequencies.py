"""longattn.rope.frequencies: the formulas of every scaling type (docs/rope_scaling.md),
bit-for-bit agreement with transformers' ROPE_INIT_FUNCTIONS when it is installed, the
factor-1 equivalences, and clear errors for unknown types and missing keys."""
from __future__ import annotations

import math

import pytest
import torch

import rope_helpers  # noqa: F401  (puts python/ on the path when needed)
from helpers import TRANSFORMERS, optional_import

from longattn.rope import ROPE_TYPES, frequencies, frequencies_from_config

D, BASE = 128, 500000.0
DEFAULT = frequencies(D, BASE)[0]

LONGROPE = {"rope_type": "longrope", "original_max_position_embeddings": 4096,
            "short_factor": [1.0 + 0.01 * i for i in range(D // 2)],
            "long_factor": [1.0 + 0.3 * i for i in range(D // 2)]}

# (name, scaling dict, kwargs): what the tests run for every type.
CASES = [
    ("default", {"rope_type": "default"}, {}),
    ("linear", {"type": "linear", "factor": 4.0}, {}),  # the older "type" key
    ("dynamic", {"rope_type": "dynamic", "factor": 2.0}, dict(max_position_embeddings=4096, seq_len=10000)),
    ("yarn", {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 4096}, {}),
    ("yarn_mscale", {"rope_type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                     "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.707}, {}),
    ("yarn_notrunc", {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 2048,
                      "truncate": False, "attention_factor": 1.25, "beta_fast": 16}, {}),
    ("longrope_short", LONGROPE, dict(max_position_embeddings=131072, seq_len=2000)),
    ("longrope_long", LONGROPE, dict(max_position_embeddings=131072, seq_len=50000)),
    ("llama3", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}, {}),
    ("proportional", {"rope_type": "proportional", "partial_rotary_factor": 0.25, "factor": 2.0}, {}),
]


def test_types_listed():
    assert set(ROPE_TYPES) >= {"default", "linear", "dynamic", "yarn", "longrope", "llama3", "ntk", "abf"}


def test_default_formula():
    exact = torch.tensor([BASE ** (-2 * i / D) for i in range(D // 2)], dtype=torch.float64)
    inv, a = frequencies(D, BASE)
    assert inv.dtype == torch.float32 and inv.shape == (D // 2,) and a == 1.0
    assert (inv.double() - exact).abs().div(exact).max() < 1e-6


@pytest.mark.parametrize("name,scaling,kw", CASES, ids=[c[0] for c in CASES])
def test_formulas(name, scaling, kw):
    """Each type against its formula written out in float64 (docs/rope_scaling.md)."""
    inv, a = frequencies(D, BASE, scaling, **kw)
    d, b = D, BASE
    i = torch.arange(D // 2, dtype=torch.float64)
    base_inv = b ** (-2 * i / d)
    if name == "default":
        want, want_a = base_inv, 1.0
    elif name == "linear":
        want, want_a = base_inv / 4.0, 1.0
    elif name == "dynamic":
        b2 = b * (2.0 * 10000 / 4096 - 1.0) ** (d / (d - 2))
        want, want_a = b2 ** (-2 * i / d), 1.0
    elif name.startswith("yarn"):
        L0, f = scaling["original_max_position_embeddings"], float(scaling["factor"])
        bf, bs = scaling.get("beta_fast", 32), scaling.get("beta_slow", 1)

        def corr(r):
            return d * math.log(L0 / (2 * math.pi * r)) / (2 * math.log(b))

        low, high = corr(bf), corr(bs)
        if scaling.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, d - 1)
        ramp = ((i - low) / (high - low)).clamp(0, 1)
        want = base_inv / f * ramp + base_inv * (1 - ramp)
        if "attention_factor" in scaling:
            want_a = scaling["attention_factor"]
        elif "mscale" in scaling:
            want_a = (0.1 * 1.0 * math.log(f) + 1) / (0.1 * 0.707 * math.log(f) + 1)
        else:
            want_a = 0.1 * math.log(f) + 1
    elif name.startswith("longrope"):
        ext = torch.tensor(LONGROPE["long_factor" if kw["seq_len"] > 4096 else "short_factor"],
                           dtype=torch.float64)
        want = 1.0 / (ext * b ** (2 * i / d))
        want_a = math.sqrt(1 + math.log(131072 / 4096) / math.log(4096))
    elif name == "llama3":
        f, lo, hi, L0 = 8.0, 1.0, 4.0, 8192
        lam = 2 * math.pi / base_inv
        s = (L0 / lam - lo) / (hi - lo)
        want = torch.where(lam < L0 / hi, base_inv,
                           torch.where(lam > L0 / lo, base_inv / f, (1 - s) * base_inv / f + s * base_inv))
        want_a = 1.0
    elif name == "proportional":
        n = int(0.25 * D // 2)
        want = torch.cat((b ** (-2 * i[:n] / d), torch.zeros(D // 2 - n, dtype=torch.float64))) / 2.0
        want_a = 1.0
    assert abs(a - want_a) < 1e-12, (a, want_a)
    assert (inv.double() - want).abs().max() <= 2e-6 * want.abs().max()


def test_ntk_alpha_and_abf():
    inv, _ = frequencies(D, 10000.0, {"rope_type": "ntk", "alpha": 8.0})
    torch.testing.assert_close(inv, frequencies(D, 10000.0 * 8.0 ** (D / (D - 2)))[0], rtol=0, atol=0)
    inv, _ = frequencies(D, None, {"rope_type": "abf", "rope_theta": 5e5})
    torch.testing.assert_close(inv, frequencies(D, 5e5)[0], rtol=0, atol=0)


@pytest.mark.parametrize("scaling,kw", [
    ({"rope_type": "linear", "factor": 1.0}, {}),
    # dynamic: any factor is the default up to max_position_embeddings (past it, even factor 1
    # grows the base: factor * s / L - (factor - 1) = s / L).
    ({"rope_type": "dynamic", "factor": 1.0}, dict(max_position_embeddings=4096, seq_len=1000)),
    ({"rope_type": "dynamic", "factor": 3.0}, dict(max_position_embeddings=4096, seq_len=4096)),
    ({"rope_type": "ntk", "alpha": 1.0}, {}),
    ({"rope_type": "yarn", "factor": 1.0, "original_max_position_embeddings": 4096}, {}),
    ({"rope_type": "llama3", "factor": 1.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 8192}, {}),
    ({"rope_type": "longrope", "factor": 1.0, "original_max_position_embeddings": 4096,
      "short_factor": [1.0] * (D // 2), "long_factor": [1.0] * (D // 2)}, dict(seq_len=9000)),
    ({"rope_type": "proportional", "factor": 1.0}, {}),
    ({"rope_type": "abf", "rope_theta": BASE}, {}),
])
def test_factor_one_equals_default(scaling, kw):
    inv, a = frequencies(D, None if "rope_theta" in scaling else BASE, scaling, **kw)
    assert a == 1.0
    torch.testing.assert_close(inv, DEFAULT, rtol=2e-7, atol=0)


# --------------------------------------------------------------------------------------
# transformers, when installed
# --------------------------------------------------------------------------------------


def _hf_config(transformers, scaling, kw):
    params = dict(scaling)
    params["rope_theta"] = BASE
    return transformers.LlamaConfig(hidden_size=D * 4, num_attention_heads=4, head_dim=D,
                                    max_position_embeddings=kw.get("max_position_embeddings", 32768),
                                    rope_parameters=params)


@pytest.mark.parametrize("name,scaling,kw", CASES, ids=[c[0] for c in CASES])
def test_same_numbers_as_transformers(name, scaling, kw):
    transformers = optional_import("transformers", *TRANSFORMERS)
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = _hf_config(transformers, scaling, kw)
    rope_type = cfg.rope_parameters["rope_type"]
    if rope_type == "default":
        hf_inv, hf_a = LlamaRotaryEmbedding.compute_default_rope_parameters(cfg)
    else:
        hf_inv, hf_a = ROPE_INIT_FUNCTIONS[rope_type](cfg, "cpu", seq_len=kw.get("seq_len"))
    inv, a = frequencies(D, BASE, scaling, **kw)
    assert torch.equal(inv, hf_inv.float()), (inv - hf_inv).abs().max()
    assert a == pytest.approx(float(hf_a), rel=1e-15)
    # The config reader gives the same.
    inv2, a2, rd = frequencies_from_config(cfg, seq_len=kw.get("seq_len"))
    assert rd == D and torch.equal(inv2, inv) and a2 == a


def test_every_transformers_type_is_covered():
    optional_import("transformers", *TRANSFORMERS)
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    covered = {c[1].get("rope_type", c[1].get("type")) for c in CASES}
    missing = set(ROPE_INIT_FUNCTIONS) - covered
    assert not missing, f"transformers has rope types without a comparison case: {missing}"


# --------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("args,kw,exc,match", [
    ((7, BASE), {}, ValueError, "rotary_dim must be an even int"),
    ((D, BASE, {"rope_type": "su"}), {}, ValueError, "unknown rope scaling type 'su'"),
    ((D, BASE, {"rope_type": "linear"}), {}, KeyError, "needs the key 'factor'"),
    ((D, BASE, {"rope_type": "dynamic", "factor": 2.0}), {}, KeyError, "max_position_embeddings"),
    ((D, BASE, {"rope_type": "yarn", "factor": 2.0}), {}, KeyError, "original_max_position_embeddings"),
    ((D, BASE, {"rope_type": "longrope", "original_max_position_embeddings": 8, "short_factor": [1.0] * 64}),
     {}, KeyError, "long_factor"),
    ((D, BASE, {"rope_type": "longrope", "original_max_position_embeddings": 8, "factor": 2.0,
                "short_factor": [1.0] * 3, "long_factor": [1.0] * 64}), {}, ValueError, "must have rotary_dim // 2"),
    ((D, BASE, {"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}), {}, KeyError, "low_freq_factor"),
    ((D, BASE, {"rope_type": "ntk"}), {}, KeyError, "alpha"),
    ((D, BASE, {"rope_type": "linear", "factor": "4"}), {}, ValueError, "factor must be a number"),
    ((D, None, {"rope_type": "linear", "factor": 2.0}), {}, KeyError, "base is missing"),
    ((D, 10000.0, {"rope_type": "default", "rope_theta": 5e5}), {}, ValueError, "disagrees"),
    ((D, BASE, "yarn"), {}, ValueError, "scaling must be None or a dict"),
    ((D, 0.5), {}, ValueError, "base"),
])
def test_errors(args, kw, exc, match):
    with pytest.raises(exc, match=match):
        frequencies(*args, **kw)
