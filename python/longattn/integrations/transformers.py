"""longattn for transformers (>= 5) models: ``attn_implementation="longattn"`` and a ``Cache``
backed by :mod:`longattn.kvcache`.

    from longattn.integrations.transformers import register, LongattnCache, SnapKVPress
    register()
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="longattn")
    out = model.generate(**inputs, past_key_values=LongattnCache(model.config,
                         press=SnapKVPress(0.5, window_size=32)), max_new_tokens=64)

* :func:`register` adds the attention function and its mask function to transformers'
  AttentionInterface and AttentionMaskInterface. Models then pass their own
  ``sliding_window`` (-> ``window=(W - 1, 0)``), ``softcap``, ``scaling`` and ``s_aux``
  (-> ``sink_logits``); padding becomes a varlen batch, never a dense mask.
* :class:`LongattnCache` holds one :class:`longattn.kvcache.KVCache` per layer: padding is not
  stored, decode steps run ``decode_attention`` over per-(batch, kv head) lengths, and presses
  (``compression_ratio``, once after prefill) or ``longattn.kvcache`` policies (absolute
  budgets) evict between steps.
"""
from __future__ import annotations

from ._hf_attention import NAME, longattn_attention_forward, longattn_mask, register, window_of
from ._hf_cache import LongattnCache, LongattnLayer
from ._hf_presses import H2OPress, Press, SnapKVPress, StreamingLLMPress

__all__ = ["NAME", "register", "longattn_attention_forward", "longattn_mask", "window_of",
           "LongattnCache", "LongattnLayer", "Press", "StreamingLLMPress", "SnapKVPress",
           "H2OPress"]
