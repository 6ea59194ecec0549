"""Generation with MoD-aware KV caches: jitted bucketed prefill and while_loop decode.

The prompt-level API is `gmod_jax.inference.generate.generate`; it is not re-exported here so
that `gmod_jax.inference.generate` stays the module, not a function of the same name.
"""

from gmod_jax.inference.generate import GenerationOutput, generate_ids
from gmod_jax.inference.kv_cache import KVCache

__all__ = ["GenerationOutput", "KVCache", "generate_ids"]
