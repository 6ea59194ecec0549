"""KV caches for γ-MoD generation: absolute slots for dense layers, compacted slots for MoD layers.

Layout (every array has a static shape, so one compiled decode loop serves every prompt in a
length bucket):

* Dense layers share one absolute slot axis of length S = T + N (T the left-padded prompt bucket,
  N the new-token budget). Prompt token j sits in slot j, decode step i writes slot T + i for every
  row. `dense_valid [B, S]` hides left padding and not-yet-written slots. RoPE positions are the
  absolute ones (`position_ids` of the attention mask), so slots and positions differ by the row's
  left padding; attention only looks at validity, never at slot numbers.
* Each MoD layer keeps only the tokens that ran it, compacted: slots 0..K-1 hold the prefill's
  kept tokens in original order (the static-shape selection of `gmod_jax.routing`), a decode token
  that runs the layer is appended at slot `mod_length[l, b]`. Rows differ in how many tokens each
  layer kept, so length, validity and the next compacted RoPE position are per layer and per row.
  `mod_next_pos` differs from `mod_length` only when the selection kept padding (the capacity
  rule forces PAD in), because padding occupies a slot but never counts as a position.

Keys are stored after RoPE, so decode never re-rotates the cache. Caches are heads-major
([..., B, KV, slots, hd]): the decode attention's batch dimensions (row, kv head) lead and the
slots are contiguous per head, so its two contractions read the cache as it is stored. A
slots-major cache ([..., B, slots, KV, hd], the prefill's natural order) made XLA transpose
each layer's whole cache, K and V, at every decode step: a copy proportional to the cache
length that the dense model (S = T + N slots in every layer) paid on far more slots than the
γ-MoD model (K + N slots in its MoD layers).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from gmod_jax.config import ModelConfig
from gmod_jax.layers.attention import project
from gmod_jax.layers.mlp import swiglu
from gmod_jax.layers.norms import rms_norm
from gmod_jax.layers.rope import apply_rope
from gmod_jax.layers.dtypes import DTYPES


class KVCache(NamedTuple):
    dense_k: jax.Array  # [L_dense, B, KV, S, hd] (layers in model order, MoD layers left out)
    dense_v: jax.Array  # [L_dense, B, KV, S, hd]
    dense_valid: jax.Array  # bool [B, S]
    mod_k: jax.Array  # [L_mod, B, KV, C, hd] (MoD layers in model order)
    mod_v: jax.Array  # [L_mod, B, KV, C, hd]
    mod_valid: jax.Array  # bool [L_mod, B, C]
    mod_length: jax.Array  # int32 [L_mod, B] slots in use = next write slot
    mod_next_pos: jax.Array  # int32 [L_mod, B] compacted RoPE position of the next appended token

    @property
    def dense_slots(self) -> int:
        return self.dense_k.shape[3]

    @property
    def mod_slots(self) -> int:
        return self.mod_k.shape[3]


def split_layers(cache: KVCache) -> KVCache:
    """The cache with its K/V stacks as tuples of per-layer arrays (the decode loop's form for
    unstacked layer params): each layer's attention reads and appends to its own buffer. Read
    out of the stack, every layer's cache was copied for its dots and the whole stack was copied
    twice per step around the in-place write (XLA CPU)."""
    def split(a):
        return a if isinstance(a, tuple) else tuple(a[i] for i in range(a.shape[0]))
    return cache._replace(dense_k=split(cache.dense_k), dense_v=split(cache.dense_v),
                          mod_k=split(cache.mod_k), mod_v=split(cache.mod_v))


def stack_layers(cache: KVCache, like: KVCache) -> KVCache:
    """Inverse of `split_layers` (`like`: the stacked cache, for the shapes of empty stacks)."""
    def stack(a, ref):
        return a if not isinstance(a, tuple) else (jnp.stack(a) if a else ref)
    return cache._replace(dense_k=stack(cache.dense_k, like.dense_k), dense_v=stack(cache.dense_v, like.dense_v),
                          mod_k=stack(cache.mod_k, like.mod_k), mod_v=stack(cache.mod_v, like.mod_v))


def pad_slots(x: jax.Array, axis: int, total: int, value=0) -> jax.Array:
    """Extend `axis` of x to `total` entries with `value` (room for decode appends)."""
    extra = total - x.shape[axis]
    if extra < 0:
        raise ValueError(f"cannot fit {x.shape[axis]} slots into {total}")
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def cached_attention(q, k_cache, v_cache, cache_valid, k_new, v_new, scale: float):
    """One query token per row against its cache plus its own key/value.

    q [B,1,H,hd]; k_cache/v_cache [B,KV,C,hd]; cache_valid bool [B,C]; k_new/v_new [B,1,KV,hd].
    The new token's own key is kept out of the cache here so the caller decides whether it is
    written (a MoD layer skipped by the token must not grow). The softmax over cache ∪ self is
    split in two parts instead of concatenating, which would copy the whole cache every step.
    Numerics follow `dot_product_attention`: float32 logits and softmax, probabilities cast to
    the value dtype.
    """
    b, _, h, d = q.shape
    kv = k_cache.shape[1]
    qg = q.reshape(b, kv, h // kv, d)
    # Both products are batched dots. Written as multiply + reduce (so that the read of this
    # layer's cache out of the stacked one fuses into the reduction instead of being copied for
    # the dot), XLA CPU reduced over the minor head axis with scalar loops: 596 ms vs 48 ms for
    # 12 layers of a [4, 16, 672, 64] cache per step, 108 vs 13 ms at batch 1 (the copy the dot
    # needs costs far less than that). Products are exact in float32 for bf16 caches, as before.
    s_cache = jnp.einsum("bkgd,bkcd->bkgc", qg, k_cache, preferred_element_type=jnp.float32) * scale
    s_cache = jnp.where(cache_valid[:, None, None, :], s_cache, jnp.finfo(jnp.float32).min)
    s_self = jnp.einsum("bkgd,bkd->bkg", qg, k_new[:, 0]).astype(jnp.float32) * scale
    top = jnp.maximum(jnp.max(s_cache, axis=-1), s_self)
    e_cache = jnp.exp(s_cache - top[..., None])
    e_self = jnp.exp(s_self - top)
    denom = jnp.sum(e_cache, axis=-1) + e_self
    p_cache = (e_cache / denom[..., None]).astype(v_cache.dtype)
    p_self = (e_self / denom).astype(v_new.dtype)
    out = (jnp.einsum("bkgc,bkcd->bkgd", p_cache, v_cache, preferred_element_type=jnp.float32).astype(v_cache.dtype)
           + p_self[..., None] * v_new[:, 0][:, :, None, :])
    return out.reshape(b, 1, h, d)


def decode_layer(config: ModelConfig, p, x, cos, sin, k_cache, v_cache, cache_valid, mlp_scale=None):
    """One LLaMA layer for a single new token per row, attending to a cache.

    Same math as `models.llama.decoder_layer` (pre-norm attention, SwiGLU MLP, MLP output scaled
    by `mlp_scale` [B,1] for γ-MoD). Returns (new x [B,1,D], (k, v) of the token [B,1,KV,hd]).
    """
    t, dtype = config.text, DTYPES[config.dtype]
    pa = p["attn"]
    h = rms_norm(x, p["attn_norm"]["scale"], t.rms_norm_eps)
    q = apply_rope(project(h, pa["q"], "btd,dhk->bthk", dtype), cos, sin)
    k = apply_rope(project(h, pa["k"], "btd,dhk->bthk", dtype), cos, sin)
    v = project(h, pa["v"], "btd,dhk->bthk", dtype)
    k, v = k.astype(k_cache.dtype), v.astype(v_cache.dtype)
    attn = cached_attention(q, k_cache, v_cache, cache_valid, k, v, scale=t.head_dim ** -0.5)
    x = x + project(attn, pa["o"], "bthk,hkd->btd", dtype)
    m = swiglu(p["mlp"], rms_norm(x, p["mlp_norm"]["scale"], t.rms_norm_eps), dtype)
    if mlp_scale is not None:
        m = m * mlp_scale[..., None].astype(m.dtype)
    return x + m, (k, v)
