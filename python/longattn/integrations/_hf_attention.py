"""The "longattn" attention and mask functions for transformers (see transformers.py).

transformers hands an attention function q ``(B, Hq, Lq, D)`` and k, v ``(B, Hkv, Lk, D)``; the
kernels take ``(B, L, H, D)`` with any strides, so ``.transpose(1, 2)`` views go in unchanged and
GQA needs no ``repeat_kv``. Padding never becomes a dense mask: as with FlashAttention, the mask
function hands over the 2-D padding mask and the attention function packs the real tokens into
a varlen batch.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..attention import attention

NAME = "longattn"


def window_of(sliding_window: Optional[int], causal: bool):
    """transformers' ``sliding_window=W`` (masking_utils.sliding_window_overlay: key ``s``
    visible from ``p`` iff ``s > p - W``, so W keys with the current one) as longattn's window.
    Non-causal windows follow FlashAttention's ``(W - 1, W - 1)``, which Gemma 3's
    bidirectional overlay (``|p - s| < W``) shares."""
    if sliding_window is None:
        return None
    w = int(sliding_window)
    if w < 1:
        raise ValueError(f"sliding_window must be >= 1, got {w}")
    return (w - 1, 0) if causal else (w - 1, w - 1)


def longattn_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0,
                  kv_offset: int = 0, mask_function=None,
                  attention_mask: Optional[torch.Tensor] = None, **kwargs):
    """The mask transformers builds for "longattn": nothing without padding, else the 2-D
    padding mask of the ``kv_length`` keys (flash_attention_mask's contract). The kernels know
    causal masks and windows themselves; any other pattern cannot be expressed here."""
    if kwargs.get("use_vmap"):
        # transformers asks for vmap exactly when a model adds or_mask_function /
        # and_mask_function (bidirectional image tokens, ...): a pattern no kernel argument has.
        raise NotImplementedError(
            "attn_implementation='longattn' cannot apply a model's extra mask function "
            "(or_mask_function / and_mask_function); use 'eager' or 'sdpa' for this input")
    if attention_mask is None:
        return None
    attention_mask = attention_mask[:, -kv_length:]
    if attention_mask.shape[1] == kv_length and bool(attention_mask.all()):
        return None
    return attention_mask


def unpad(x: torch.Tensor, rows: Tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The tokens ``(b, t)`` of ``x`` ``(B, L, H, D)`` (any strides) as ``(T, H, D)``: one
    gather, no copy of the padded tensor first."""
    return x[rows[0], rows[1]]


def pad(x: torch.Tensor, rows: Tuple[torch.Tensor, torch.Tensor], batch: int,
        length: int) -> torch.Tensor:
    """Inverse of :func:`unpad`; padding rows are zeros, as FlashAttention's pad_input."""
    out = x.new_zeros((batch, length) + tuple(x.shape[1:]))
    out[rows[0], rows[1]] = x
    return out


def _varlen_meta(mask: torch.Tensor):
    """Rows ``(b, t)`` of the true entries of ``mask`` (B, L), int32 cu_seqlens and the longest
    sequence (host int: the kernels take it as a bound)."""
    lens = mask.sum(dim=1, dtype=torch.int32)
    cu = torch.nn.functional.pad(lens.cumsum(0, dtype=torch.int32), (1, 0))
    return mask.nonzero(as_tuple=True), cu, int(lens.max()) if lens.numel() else 0


def _packed_cu_seqlens(position_ids: Optional[torch.Tensor], length: int):
    """cu_seqlens of sequences packed in one row (positions restart), or None. Sequences start
    where the position does not grow by one: what transformers' eager and SDPA masks use
    (masking_utils.find_packed_sequence_indices)."""
    if position_ids is None or position_ids.dim() != 2 or position_ids.shape[0] != 1 \
            or position_ids.shape[1] != length or length < 2 or torch.compiler.is_compiling():
        return None
    p = position_ids[0]
    starts = torch.nonzero(p[1:] - p[:-1] != 1).flatten() + 1
    if starts.numel() == 0:
        return None
    bounds = [0] + starts.tolist() + [length]
    cu = torch.tensor(bounds, dtype=torch.int32, device=p.device)
    return cu, int((cu[1:] - cu[:-1]).max())


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
           **kw) -> torch.Tensor:
    """``longattn.attention`` on ``(B, L, H, D)`` views, bottom-right aligned. ``mask`` (B, Lk)
    bool marks the real keys; the queries are the last Lq columns. Returns ``(B, Lq, H, D)``."""
    if mask is None:
        return attention(q, k, v, **kw)
    B, Lq, Lk = q.shape[0], q.shape[1], k.shape[1]
    if mask.shape[1] > Lk:
        raise ValueError(f"padding mask of {mask.shape[1]} keys for {Lk} keys")
    if mask.shape[1] < Lk:
        # A static cache's keys run past the tokens written so far (as FlashAttention slices).
        k, v = k[:, : mask.shape[1]], v[:, : mask.shape[1]]
        Lk = k.shape[1]
    rows_k, cu_k, max_k = _varlen_meta(mask)
    if Lq == Lk:
        rows_q, cu_q, max_q = rows_k, cu_k, max_k
    else:
        rows_q, cu_q, max_q = _varlen_meta(mask[:, -Lq:])
    out = attention(unpad(q, rows_q), unpad(k, rows_k), unpad(v, rows_k), cu_seqlens_q=cu_q,
                    cu_seqlens_k=cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k, **kw)
    return pad(out, rows_q, B, Lq)


def longattn_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                               value: torch.Tensor, attention_mask: Optional[torch.Tensor],
                               dropout: float = 0.0, scaling: Optional[float] = None,
                               sliding_window: Optional[int] = None,
                               softcap: Optional[float] = None, is_causal: Optional[bool] = None,
                               s_aux: Optional[torch.Tensor] = None, longattn_layer=None,
                               position_ids: Optional[torch.Tensor] = None,
                               cu_seq_lens_q: Optional[torch.Tensor] = None,
                               cu_seq_lens_k: Optional[torch.Tensor] = None,
                               max_length_q: Optional[int] = None,
                               max_length_k: Optional[int] = None, **kwargs):
    """transformers' attention-function contract (integrations/flash_attention.py): query
    ``(B, Hq, Lq, D)``, key/value ``(B, Hkv, Lk, D)``; returns ``((B, Lq, Hq, D), None)``.

    ``sliding_window`` -> ``window``, ``s_aux`` -> ``sink_logits``, ``softcap``, ``scaling``,
    ``is_causal`` (default: the module's). With a :class:`LongattnCache` the layer it handed
    over in ``longattn_layer`` owns the keys (decode_attention over the cache)."""
    if dropout:
        raise ValueError(f"attention dropout {dropout}: longattn has none (evaluate the model, or "
                         "set attention_dropout=0 in the config)")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(f"attn_implementation='longattn' takes a 2-D padding mask, got a "
                         f"{attention_mask.dim()}-D one (a mask built for another backend)")
    causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    sink_logits = None
    if s_aux is not None:
        sink_logits = s_aux.to(torch.float64 if query.dtype == torch.float64 else torch.float32)
    kw = dict(causal=causal, window=window_of(sliding_window, causal), scale=scaling,
              softcap=float(softcap or 0.0), sink_logits=sink_logits)
    if longattn_layer is not None:
        return longattn_layer.attend(query, key, value, attention_mask, position_ids, **kw), None
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    if cu_seq_lens_q is not None and cu_seq_lens_k is not None:
        # Padding-free batches (FlashAttention's kwargs): tokens flattened into one row.
        B, Lq = q.shape[:2]
        out = attention(q.reshape(-1, *q.shape[2:]), k.reshape(-1, *k.shape[2:]),
                        v.reshape(-1, *v.shape[2:]), cu_seqlens_q=cu_seq_lens_q.int(),
                        cu_seqlens_k=cu_seq_lens_k.int(), max_seqlen_q=_host_int(max_length_q),
                        max_seqlen_k=_host_int(max_length_k), **kw)
        return out.view(B, Lq, *out.shape[1:]), None
    if attention_mask is None and q.shape[1] == k.shape[1]:
        packed = _packed_cu_seqlens(position_ids, q.shape[1])
        if packed is not None:
            cu, longest = packed
            out = attention(q[0], k[0], v[0], cu_seqlens_q=cu, cu_seqlens_k=cu,
                            max_seqlen_q=longest, max_seqlen_k=longest, **kw)
            return out[None], None
    mask = None if attention_mask is None else attention_mask.bool()
    return attend(q, k, v, mask, **kw), None


def _host_int(x):
    return None if x is None else int(x)


def register() -> str:
    """Make ``attn_implementation="longattn"`` available to every transformers model (the
    attention function and its mask function). Idempotent; returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, longattn_attention_forward)
    AttentionMaskInterface.register(NAME, longattn_mask)
    return NAME
