"""A transformers ``Cache`` whose layers hold :class:`longattn.kvcache.KVCache` (see
transformers.py).

The model hands each layer its new keys and values through ``Cache.update``; the layer does not
write them there but passes itself to the attention function (transformers' models call
``cache.update(..., kwargs=kwargs)`` with the very dict they then unpack into the attention
call). The attention function gives the layer the padding mask, the positions and the queries,
which the cache needs together: padding is never stored, positions are per sequence, and decode
steps run ``decode_attention`` over the buffers with per-(batch, kv head) lengths.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ..attention import attention
from ..kvcache import H2O, TOVA, KVCache, SnapKV, StreamingLLM, decode_attention, select_keep
from ..rope import rerotate_keys
from ._hf_attention import attend
from ._hf_presses import StreamingLLMPress

#: Buffers grow by a quarter (at least this much) when full, and keep as much headroom
#: when an eviction shrinks them.
MIN_GROWTH = 16

POLICIES = (StreamingLLM, H2O, TOVA, SnapKV)


def _last_valid(q: torch.Tensor, pos: torch.Tensor, valid: Optional[torch.Tensor], n: int):
    """The last ``n`` real queries of each sequence, ``(B, Hq, n, D)``, and their positions."""
    L = q.shape[2]
    if valid is None:
        return q[:, :, L - n:], pos[:, L - n:]
    ar = torch.arange(L, device=q.device)
    idx = torch.where(valid, ar, -1).topk(n, dim=1).values.flip(1).clamp(min=0)  # (B, n)
    qs = q.gather(2, idx[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[3]))
    return qs, pos.gather(1, idx)


class LongattnLayer(CacheLayerMixin):
    """One attention layer's cache: a :class:`KVCache` with per-(batch, kv head) lengths.

    ``sliding_window`` (set from the config for sliding layers) drops keys no future query can
    see. ``press`` compresses the prompt once after prefill; ``policy`` (StreamingLLM, H2O,
    TOVA: every step; SnapKV: after prefill) keeps an absolute budget.
    """

    is_compileable = False

    def __init__(self, sliding_window: Optional[int] = None, press=None, policy=None,
                 capacity: Optional[int] = None):
        super().__init__()
        if policy is not None and not isinstance(policy, POLICIES):
            raise TypeError(f"policy must be one of {[p.__name__ for p in POLICIES]}, got "
                            f"{type(policy).__name__} (AdaKV takes scores: wrap it in a press)")
        self.sliding_window, self.press, self.policy = sliding_window, press, policy
        self.capacity = capacity
        self.is_sliding = sliding_window is not None
        self.kv: Optional[KVCache] = None
        self.seen = 0          # tokens (columns of the padded batch) handed to the layer so far
        self.shift = None      # (B,) true position - cache position (StreamingLLM's shift)
        self.evicted = False
        self._pending = False  # update() ran, attend() has not yet taken the tokens

    # -- what transformers asks of a layer --
    @property
    def is_croppable(self) -> bool:
        return not self.evicted

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        B, H, n, D = key_states.shape
        track = isinstance(self.policy, H2O) or getattr(self.press, "needs_scores", False)
        self.kv = KVCache(B, H, D, max(n, self.capacity or 0, MIN_GROWTH),
                          dtype=key_states.dtype, device=key_states.device, track_scores=track,
                          v_head_dim=value_states.shape[-1])
        self.shift = torch.zeros(B, dtype=torch.int64, device=key_states.device)
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, kwargs=None, **other):
        if kwargs is None:
            raise NotImplementedError(
                "LongattnCache needs the model to pass its attention kwargs to the cache "
                "(cache.update(..., kwargs=kwargs)), as transformers' decoder models do")
        if self._pending:
            raise RuntimeError(
                "LongattnCache: the previous forward's keys never reached the longattn "
                "attention function; load the model with attn_implementation='longattn' "
                "(longattn.integrations.transformers.register())")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.seen += key_states.shape[-2]
        self._pending = True
        kwargs["longattn_layer"] = self
        return key_states, value_states

    def get_mask_sizes(self, query_length: int):
        # The whole 2-D padding mask: attend() reads the columns of the new tokens from its end.
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        # Tokens seen, not held: generate() numbers the next tokens with it.
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        # Dropped, not zeroed: the next prompt may come with another batch size.
        self.kv, self.shift, self.is_initialized = None, None, False
        self.seen, self.evicted, self._pending = 0, False, False

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes the negative number of tokens to remove")
        if tokens_to_remove == 0 or self.kv is None:
            return
        if self.evicted:
            raise NotImplementedError("an evicting LongattnCache cannot be rolled back (the "
                                      "evicted keys are gone)")
        n = -tokens_to_remove
        self.kv.lengths -= n
        self.kv.next_position -= n
        self.seen -= n

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.kv is not None:
            rows = torch.arange(self.kv.batch, device=self.kv.device)
            self.batch_select_indices(rows.repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        kv = self.kv
        if kv is None:
            return
        idx = indices.to(kv.device)
        for name in ("k", "v", "lengths", "positions", "scores", "next_position"):
            t = getattr(kv, name)
            if t is not None:
                setattr(kv, name, t.index_select(0, idx))
        self.shift = self.shift.index_select(0, idx)

    def offload(self):
        raise NotImplementedError("LongattnCache does not offload")

    prefetch = offload

    # -- the attention call --
    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: Optional[torch.Tensor], position_ids: Optional[torch.Tensor], *,
               causal: bool, window, scale, softcap: float, sink_logits) -> torch.Tensor:
        """The new tokens' attention over the cache; stores them, then evicts. query
        ``(B, Hq, n, D)``, key/value ``(B, Hkv, n, D)`` (the model's layout); returns
        ``(B, n, Hq, D)``."""
        self._pending = False
        if not causal:
            raise NotImplementedError("LongattnCache is for causal decoding")
        if softcap and (isinstance(self.policy, (H2O, TOVA, SnapKV))
                        or not isinstance(self.press, (type(None), StreamingLLMPress))):
            raise NotImplementedError("attention scores with softcap: decode_attention, which "
                                      "computes them, has no softcap (StreamingLLM needs none)")
        kv = self.kv
        B, Hq, n, D = query.shape
        if B != kv.batch:
            raise ValueError(f"batch of {B} for a cache of {kv.batch} sequences")
        valid = None if attention_mask is None else attention_mask[:, -n:].bool()
        if valid is not None and bool(valid.all()):
            valid = None
        true_pos = self._true_positions(position_ids, valid, B, n)
        pos = true_pos - self.shift[:, None]
        if isinstance(self.policy, StreamingLLM) and self.policy.shift and bool(self.shift.any()):
            # StreamingLLM numbers new tokens inside the cache: rotate them on from the
            # positions the model rotated them at (RoPE rotations compose).
            p = self.policy
            rot = dict(rotary_dim=p.rotary_dim, interleaved=p.interleaved)
            inv = p.inv_freq.to(query.device)
            query = rerotate_keys(query.transpose(1, 2), true_pos, pos, inv, **rot).transpose(1, 2)
            key = rerotate_keys(key.transpose(1, 2), true_pos, pos, inv, **rot).transpose(1, 2)
        prefill = self.seen == n
        if prefill and kv.scores is None:
            # Only this forward's tokens exist: plain (varlen) attention, then store them.
            out = attend(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                         valid, causal=True, window=window, scale=scale, softcap=softcap,
                         sink_logits=sink_logits)
            self._append(key, value, valid, pos)
        else:
            self._append(key, value, valid, pos)
            qpos = pos if valid is None else pos.masked_fill(~valid, -1)  # padding sees nothing
            if softcap:
                out = self._attend_slots(query, valid, window, scale, softcap, sink_logits)
            else:
                out = self._decode(query, qpos, window, scale, sink_logits)
        self._evict(query, pos, valid, prefill, scale)
        return out

    def _true_positions(self, position_ids, valid, B: int, n: int) -> torch.Tensor:
        """Positions the model rotated the new tokens at: its position_ids when they are the
        usual (batch, n) ones, else the next positions of each sequence (padding skipped)."""
        if position_ids is not None and position_ids.dim() == 2 and position_ids.shape[-1] == n \
                and position_ids.shape[0] in (1, B):
            return position_ids.to(device=self.kv.device, dtype=torch.int64).expand(B, n)
        ar = torch.arange(n, device=self.kv.device).expand(B, n)
        step = ar if valid is None else valid.long().cumsum(1) - 1
        return self.kv.next_position[:, None] + self.shift[:, None] + step

    def _append(self, k, v, valid, pos) -> None:
        kv = self.kv
        n = k.shape[2]
        need = kv.max_length() + n
        if need > kv.capacity:
            kv.grow(max(need, kv.capacity + max(kv.capacity // 4, MIN_GROWTH)))
        if valid is None:
            kv.append(k, v, pos)
            return
        # Padding is not stored: real tokens go after each head's length, padding after them
        # (beyond the new length: stale slots no op reads).
        cnt = valid.sum(1)
        off = torch.where(valid, valid.long().cumsum(1) - 1,
                          cnt[:, None] + (~valid).long().cumsum(1) - 1)
        idx = kv.lengths.to(torch.int64)[..., None] + off[:, None, :]  # (B, Hkv, n)
        kv.k.scatter_(2, idx[..., None].expand(-1, -1, -1, kv.head_dim), k)
        kv.v.scatter_(2, idx[..., None].expand(-1, -1, -1, kv.v.shape[-1]), v)
        kv.positions.scatter_(2, idx, pos[:, None, :].expand(-1, kv.kv_heads, -1))
        if kv.scores is not None:
            kv.scores.scatter_(2, idx, kv.scores.new_zeros(idx.shape))
        kv.lengths += cnt[:, None].to(kv.lengths.dtype)
        last = torch.where(valid, pos, -1).amax(1) + 1
        kv.next_position = torch.maximum(kv.next_position, last)

    def _decode(self, q, qpos, window, scale, sink_logits) -> torch.Tensor:
        kv = self.kv
        out, lse = decode_attention(q, kv.k, kv.v, kv.lengths, positions=kv.positions,
                                    q_positions=qpos, scale=scale,
                                    window=None if window is None else window[0],
                                    scores=kv.scores)
        if sink_logits is not None:
            # A value-less logit s in the denominator scales the output by
            # sum(e^x) / (sum(e^x) + e^s) = sigmoid(lse - s).
            w = torch.sigmoid(lse - sink_logits[None, :, None])
            out = (out * w[..., None]).to(out.dtype)
        return out.transpose(1, 2)

    def _attend_slots(self, q, valid, window, scale, softcap, sink_logits) -> torch.Tensor:
        """decode_attention has no softcap: longattn.attention on views of each sequence's
        slots, treating the slot as the position. Exact while all heads of a sequence hold the
        same keys and, with a window, their positions are consecutive."""
        kv = self.kv
        lens = kv.lengths
        if not bool((lens == lens[:, :1]).all()):
            raise NotImplementedError("softcap with per-head eviction (H2O, SnapKV, TOVA): "
                                      "decode_attention has no softcap")
        if window is not None:
            L = lens.to(torch.int64)
            first = kv.positions[:, :, 0]
            last = kv.positions.gather(2, (L - 1).clamp(min=0)[..., None])[..., 0]
            if not bool(((last - first + 1 == L) | (L == 0)).all()):
                raise NotImplementedError("softcap with a sliding window over a cache whose kept "
                                          "positions have gaps")
        kw = dict(causal=True, window=window, scale=scale, softcap=softcap, sink_logits=sink_logits)
        B, Hq, n, D = q.shape
        lengths = lens[:, 0].tolist()
        if valid is None and len(set(lengths)) == 1:
            L = lengths[0]
            return attention(q.transpose(1, 2), kv.k[:, :, :L].transpose(1, 2),
                             kv.v[:, :, :L].transpose(1, 2), **kw)
        out = q.new_zeros(B, n, Hq, D)
        for b, L in enumerate(lengths):
            rows = (torch.arange(n, device=q.device) if valid is None
                    else valid[b].nonzero().flatten())
            qb = q[b:b + 1].index_select(2, rows).transpose(1, 2)
            out[b, rows] = attention(qb, kv.k[b:b + 1, :, :L].transpose(1, 2),
                                     kv.v[b:b + 1, :, :L].transpose(1, 2), **kw)[0]
        return out

    # -- eviction --
    def _evict(self, q, pos, valid, prefill: bool, scale) -> None:
        kv = self.kv
        before = kv.next_position.clone()
        lengths_before = kv.lengths.clone()
        if prefill and self.press is not None:  # before the trim: its budget is the prompt's
            self.press.compress(kv, q, pos, valid, scale)
        if self.sliding_window is not None and kv.max_length() >= 2 * self.sliding_window:
            self._trim_to_window()  # before a policy: its budget then goes to visible keys
        p = self.policy
        if isinstance(p, (StreamingLLM, H2O)):
            p.compress(kv)
        elif isinstance(p, TOVA):
            p.compress(kv, _last_valid(q, pos, valid, 1)[0], scale=scale)
        elif isinstance(p, SnapKV) and prefill:
            W = min(p.window, q.shape[2])
            qw, pw = _last_valid(q, pos, valid, W)
            p.compress(kv, qw, pw, scale=scale)
        self.shift += before - kv.next_position
        if not torch.equal(lengths_before, kv.lengths):
            self.evicted = True
            self._shrink()

    def _trim_to_window(self) -> None:
        """Keep the last ``sliding_window - 1`` positions of each head: a query at ``p``
        sees ``p - W + 1 .. p`` and later queries lie further right."""
        kv = self.kv
        last = kv.next_position[:, None, None] - 1
        slot = torch.arange(kv.capacity, device=kv.device)
        live = slot < kv.lengths.to(torch.int64)[..., None]
        inside = live & (kv.positions > last - self.sliding_window + 1)
        keep, counts = select_keep(kv.positions.float(), kv.lengths, 0, 0, inside.sum(-1))
        kv.compact_(keep, counts)

    def _shrink(self) -> None:
        """Give memory back after an eviction, keeping a quarter of headroom."""
        kv = self.kv
        n = kv.max_length()
        cap = n + max(n // 4, MIN_GROWTH)
        if kv.capacity <= cap:  # a fixed budget settles here: no reallocation per step
            return
        kv.k, kv.v, kv.positions = (t[:, :, :cap].clone() for t in (kv.k, kv.v, kv.positions))
        if kv.scores is not None:
            kv.scores = kv.scores[:, :, :cap].clone()

    def nbytes(self) -> int:
        return 0 if self.kv is None else self.kv.nbytes()


PolicyArg = Union[None, object, Sequence[object]]


def _layer_windows(config):
    """Per decoder layer: None (global attention) or its sliding window."""
    text = config.get_text_config(decoder=True)
    try:  # transformers' own reading of the layer types (per-layer configs included)
        from transformers.cache_utils import get_layer_types_and_kwargs
        types, kwargs = get_layer_types_and_kwargs(text)
    except ImportError:  # older 5.x: layer_types, else one sliding_window for every layer
        w = getattr(text, "sliding_window", None)
        types = getattr(text, "layer_types", None) or (
            ["sliding_attention" if w else "full_attention"] * text.num_hidden_layers)
        kwargs = [dict(sliding_window=w) if t == "sliding_attention" else {} for t in types]
    for kind in types:
        if kind not in ("full_attention", "sliding_attention"):
            raise NotImplementedError(f"layer type {kind!r}: LongattnCache holds full and "
                                      "sliding attention layers only")
    return [kw.get("sliding_window") for kw in kwargs]


class LongattnCache(Cache):
    """A transformers ``Cache`` of :class:`LongattnLayer` (one :class:`KVCache` per layer).

    Args:
        config: the model's config: one layer per decoder layer, sliding layers bounded by
            their window. Without it layers are created as the model reaches them.
        press: compresses each layer's prompt once after prefill (``StreamingLLMPress``,
            ``SnapKVPress``, ``H2OPress``: kvpress-style, with a ``compression_ratio``).
        policy: a ``longattn.kvcache`` policy with an absolute budget (StreamingLLM, H2O,
            TOVA after every step; SnapKV after prefill), or one per layer (None: none).
        capacity: keys per head to allocate up front (e.g. prompt + new tokens); by default
            the buffers start at the prompt's length and grow by a quarter when full.

    Needs ``attn_implementation="longattn"``. ``nbytes()`` is the memory the buffers hold.
    """

    def __init__(self, config=None, *, press=None, policy: PolicyArg = None,
                 capacity: Optional[int] = None):
        per_layer = isinstance(policy, (list, tuple))
        if config is None:
            if per_layer:
                raise ValueError("a policy per layer needs the config")
            super().__init__(layer_class_to_replicate=lambda: LongattnLayer(
                press=press, policy=policy, capacity=capacity))
            return
        windows = _layer_windows(config)
        if per_layer and len(policy) != len(windows):
            raise ValueError(f"{len(policy)} policies for {len(windows)} layers")
        layers = [LongattnLayer(w, press, policy[i] if per_layer else policy, capacity)
                  for i, w in enumerate(windows)]
        super().__init__(layers=layers)

    def nbytes(self) -> int:
        """Bytes held by every layer's buffers."""
        return sum(layer.nbytes() for layer in self.layers)
