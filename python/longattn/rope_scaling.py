"""RoPE frequencies from a context-extension scaling config (docs/rope_scaling.md).

``frequencies`` accepts the dicts HF transformers models carry in ``config.rope_scaling`` /
``config.rope_parameters`` and returns the same ``inv_freq`` (fp32) and ``attention_scaling``
as transformers' ``modeling_rope_utils``. The fp32 operations below follow the same order as
those formulas on purpose: models were trained (or converted) with exactly these rounded
frequencies, so the tensors must agree bit for bit, not just to float64 accuracy.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Tuple

import torch

__all__ = ["frequencies", "frequencies_from_config", "ROPE_TYPES"]


def _exponents(dim: int, step_end: Optional[int] = None, denom: Optional[int] = None) -> torch.Tensor:
    """``[0, 2, 4, ...] / denom`` in fp32 (the shape of every inverse-frequency formula)."""
    end = dim if step_end is None else step_end
    return torch.arange(0, end, 2, dtype=torch.int64).to(torch.float32) / (dim if denom is None else denom)


def _default_inv_freq(dim: int, base: float) -> torch.Tensor:
    return 1.0 / (base ** _exponents(dim))


def _require(params: Mapping[str, Any], key: str, rope_type: str, fallback=None, fallback_name=None):
    value = params.get(key)
    if value is not None:
        return value
    if fallback is not None:
        return fallback
    hint = f" (or pass {fallback_name}=...)" if fallback_name else ""
    raise KeyError(f"rope scaling type {rope_type!r} needs the key {key!r}{hint}; got keys "
                   f"{sorted(params)}")


def _number(value, name: str, rope_type: str, minimum: Optional[float] = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"rope scaling {rope_type!r}: {name} must be a number, got {value!r}")
    if minimum is not None and not value >= minimum:
        raise ValueError(f"rope scaling {rope_type!r}: {name} must be >= {minimum}, got {value!r}")
    return float(value)


def _original_max(params, rope_type, max_position_embeddings) -> int:
    # HF fills original_max_position_embeddings from max_position_embeddings when absent.
    return int(_require(params, "original_max_position_embeddings", rope_type,
                        max_position_embeddings, "max_position_embeddings"))


def _factor_or_ratio(params, rope_type, max_position_embeddings, original) -> float:
    # DeepSeek-V3 / Phi-3 style configs leave factor out and imply max / original.
    factor = params.get("factor")
    if factor is None:
        if max_position_embeddings is None:
            raise KeyError(f"rope scaling type {rope_type!r} needs 'factor' (or "
                           "max_position_embeddings=... to use max / original)")
        return max_position_embeddings / original
    return _number(factor, "factor", rope_type)


def _linear(dim, base, p, rope_type, max_pos, seq_len):
    factor = _number(_require(p, "factor", rope_type), "factor", rope_type)
    return _default_inv_freq(dim, base) / factor, 1.0


def _dynamic(dim, base, p, rope_type, max_pos, seq_len):
    factor = _number(_require(p, "factor", rope_type), "factor", rope_type)
    if max_pos is None:
        raise KeyError("rope scaling type 'dynamic' needs max_position_embeddings=...")
    s = max_pos if seq_len is None else max(int(seq_len), max_pos)
    base = base * ((factor * s / max_pos) - (factor - 1)) ** (dim / (dim - 2))
    return _default_inv_freq(dim, base), 1.0


def _ntk(dim, base, p, rope_type, max_pos, seq_len):
    alpha = _number(_require(p, "alpha", rope_type), "alpha", rope_type, minimum=0.0)
    return _default_inv_freq(dim, base * alpha ** (dim / (dim - 2))), 1.0


def _mscale(scale: float, m: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0


def _yarn(dim, base, p, rope_type, max_pos, seq_len):
    original = _original_max(p, rope_type, max_pos)
    factor = _factor_or_ratio(p, rope_type, max_pos, original)
    attention = p.get("attention_factor")
    mscale, mscale_all_dim = p.get("mscale"), p.get("mscale_all_dim")
    if attention is None:
        if mscale and mscale_all_dim:
            attention = _mscale(factor, mscale) / _mscale(factor, mscale_all_dim)
        else:
            attention = _mscale(factor)
    beta_fast = p.get("beta_fast") or 32
    beta_slow = p.get("beta_slow") or 1
    truncate = p.get("truncate", True)

    def correction_dim(rotations):  # the dim whose wavelength fits `rotations` times in L0
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # a zero-width ramp would divide by zero
    pos_freqs = base ** _exponents(dim)
    extrapolated = 1.0 / pos_freqs
    interpolated = 1.0 / (factor * pos_freqs)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # weight of the unscaled (extrapolated) frequency
    return interpolated * (1 - keep) + extrapolated * keep, float(attention)


def _longrope(dim, base, p, rope_type, max_pos, seq_len):
    long_factor = _require(p, "long_factor", rope_type)
    short_factor = _require(p, "short_factor", rope_type)
    for name, f in (("long_factor", long_factor), ("short_factor", short_factor)):
        if len(f) != dim // 2:
            raise ValueError(f"rope scaling 'longrope': {name} must have rotary_dim // 2 = "
                             f"{dim // 2} values, got {len(f)}")
    original = _original_max(p, rope_type, max_pos)
    factor = _factor_or_ratio(p, rope_type, max_pos, original)
    attention = p.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    ext = long_factor if seq_len and seq_len > original else short_factor
    ext = torch.tensor(ext, dtype=torch.float32)
    return 1.0 / (ext * base ** _exponents(dim)), float(attention)


def _llama3(dim, base, p, rope_type, max_pos, seq_len):
    factor = _number(_require(p, "factor", rope_type), "factor", rope_type)
    low = _number(_require(p, "low_freq_factor", rope_type), "low_freq_factor", rope_type)
    high = _number(_require(p, "high_freq_factor", rope_type), "high_freq_factor", rope_type)
    if not high > low:
        raise ValueError(f"rope scaling 'llama3': high_freq_factor ({high}) must be greater "
                         f"than low_freq_factor ({low})")
    original = _original_max(p, rope_type, max_pos)
    inv = _default_inv_freq(dim, base)
    wavelen = 2 * math.pi / inv
    long_wavelen, short_wavelen = original / low, original / high
    # Long wavelengths are interpolated by factor, short ones kept, the band between blended.
    scaled = torch.where(wavelen > long_wavelen, inv / factor, inv)
    smooth = (original / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < short_wavelen) * ~(wavelen > long_wavelen)
    return torch.where(medium, blended, scaled), 1.0


def _proportional(dim, base, p, rope_type, max_pos, seq_len):
    # Gemma-style: rotary_dim is the whole head; the first `partial_rotary_factor` of the angle
    # slots get frequencies with exponents over head_dim, the rest frequency 0 (no rotation).
    fraction = p.get("partial_rotary_factor", 1.0)
    factor = p.get("factor", 1.0)
    angles = int(fraction * dim // 2)
    inv = 1.0 / (base ** _exponents(dim, step_end=2 * angles))
    if dim // 2 > angles:
        inv = torch.cat((inv, torch.zeros(dim // 2 - angles, dtype=torch.float32)))
    return inv / factor, 1.0


def _default(dim, base, p, rope_type, max_pos, seq_len):
    return _default_inv_freq(dim, base), 1.0


_BUILDERS = {
    "default": _default,
    "abf": _default,  # adjusted base frequency: the default formula with a larger rope_theta
    "linear": _linear,
    "dynamic": _dynamic,
    "ntk": _ntk,
    "yarn": _yarn,
    "longrope": _longrope,
    "llama3": _llama3,
    "proportional": _proportional,
}

#: The scaling types ``frequencies`` understands.
ROPE_TYPES = tuple(_BUILDERS)


def frequencies(rotary_dim: int, base: Optional[float] = None,
                scaling: Optional[Mapping[str, Any]] = None, *,
                max_position_embeddings: Optional[int] = None, seq_len: Optional[int] = None,
                device=None) -> Tuple[torch.Tensor, float]:
    """Inverse frequencies and attention scaling of RoPE with a context-extension scaling.

    Args:
        rotary_dim: number of rotated features per head (even); ``inv_freq`` has
            ``rotary_dim // 2`` entries. For HF configs: ``int(head_dim * partial_rotary_factor)``.
        base: ``rope_theta``. May be omitted when ``scaling`` carries ``rope_theta``.
        scaling: ``None`` (plain RoPE) or a dict with ``rope_type`` (or ``type``):
            ``default``; ``abf`` (plain RoPE with a larger ``rope_theta``); ``linear``
            (``factor``); ``dynamic`` (``factor``, NTK by sequence length); ``ntk`` (``alpha``,
            fixed NTK-aware base ``base * alpha ** (d / (d - 2))``); ``yarn`` (``factor``,
            ``original_max_position_embeddings``, optional ``beta_fast``, ``beta_slow``,
            ``mscale``, ``mscale_all_dim``, ``attention_factor``, ``truncate``); ``longrope``
            (``short_factor``, ``long_factor``, ``original_max_position_embeddings``, optional
            ``factor``, ``attention_factor``); ``llama3`` (``factor``, ``low_freq_factor``,
            ``high_freq_factor``, ``original_max_position_embeddings``); ``proportional``.
            Other keys (e.g. ``partial_rotary_factor``, ``mrope_section``) are ignored.
        max_position_embeddings: the model's ``config.max_position_embeddings``: needed by
            ``dynamic``, and by yarn/longrope/llama3 when the dict lacks
            ``original_max_position_embeddings`` (or ``factor``).
        seq_len: the current sequence length (``dynamic`` grows the base past
            ``max_position_embeddings``; ``longrope`` switches to ``long_factor`` past the
            original length).
        device: where to put ``inv_freq`` (computed on the CPU, so it is the same everywhere).

    Returns:
        ``(inv_freq, attention_scaling)``: fp32 ``(rotary_dim // 2,)`` and a float that multiplies
        cos and sin (so logits scale by its square), as transformers returns them.
    """
    if isinstance(rotary_dim, bool) or not isinstance(rotary_dim, int) or rotary_dim < 2 or rotary_dim % 2:
        raise ValueError(f"rotary_dim must be an even int >= 2, got {rotary_dim!r}")
    params: Mapping[str, Any] = {} if scaling is None else scaling
    if not isinstance(params, Mapping):
        raise ValueError(f"scaling must be None or a dict (HF rope_scaling / rope_parameters), "
                         f"got {type(scaling).__name__}")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in _BUILDERS:
        raise ValueError(f"unknown rope scaling type {rope_type!r}; known types: "
                         f"{', '.join(ROPE_TYPES)}")
    theta = params.get("rope_theta")
    if base is None and theta is None:
        raise KeyError("the RoPE base is missing: pass base=... or a scaling dict with 'rope_theta'")
    if base is not None and theta is not None and float(base) != float(theta):
        raise ValueError(f"base={base} disagrees with scaling['rope_theta']={theta}")
    base = float(base if base is not None else theta)
    if not base > 1.0 or not math.isfinite(base):
        raise ValueError(f"base (rope_theta) must be a finite number > 1, got {base}")
    if max_position_embeddings is not None and max_position_embeddings < 1:
        raise ValueError(f"max_position_embeddings must be >= 1, got {max_position_embeddings}")
    if rope_type == "dynamic" and rotary_dim == 2:
        raise ValueError("rope scaling 'dynamic' needs rotary_dim > 2 (its exponent is d / (d - 2))")
    inv_freq, attention = _BUILDERS[rope_type](rotary_dim, base, params, rope_type,
                                               max_position_embeddings, seq_len)
    inv_freq = inv_freq.to(torch.float32)
    if device is not None:
        inv_freq = inv_freq.to(device)
    return inv_freq, float(attention)


def frequencies_from_config(config, *, seq_len: Optional[int] = None, device=None):
    """``frequencies`` for an HF ``PretrainedConfig``-like object: reads ``head_dim`` (or
    ``hidden_size // num_attention_heads``), ``partial_rotary_factor``, ``rope_theta``,
    ``rope_parameters`` / ``rope_scaling`` and ``max_position_embeddings``.

    Returns ``(inv_freq, attention_scaling, rotary_dim)``.
    """
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    fraction = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None)) or 1.0
    rope_type = params.get("rope_type", params.get("type", "default"))
    rotary_dim = head_dim if rope_type == "proportional" else int(head_dim * fraction)
    if rope_type == "proportional":
        params["partial_rotary_factor"] = fraction
    base = params.get("rope_theta", getattr(config, "rope_theta", None))
    params.pop("rope_theta", None)
    max_pos = getattr(config, "max_position_embeddings", None)
    original = getattr(config, "original_max_position_embeddings", None)
    if original is not None and rope_type in ("yarn", "longrope", "llama3"):
        params["original_max_position_embeddings"] = original  # HF prefers the top-level value
    inv_freq, attention = frequencies(rotary_dim, base, params, max_position_embeddings=max_pos,
                                      seq_len=seq_len, device=device)
    return inv_freq, attention, rotary_dim
