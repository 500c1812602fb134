"""longattn inside other libraries. Each integration is its own module and imports its library
only when imported itself, so ``import longattn`` never needs them:

* ``longattn.integrations.transformers``: the "longattn" attention implementation for
  transformers (>= 5) models and a ``Cache`` backed by :class:`longattn.kvcache.KVCache` with
  eviction presses and policies.
"""
