"""Multi-head / grouped-query attention over explicit params, softmax in float32 (HF eager)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def project(x, p, eqn: str, dtype):
    """Einsum projection with an optional bias (`p` holds `kernel` and maybe `bias`)."""
    y = jnp.einsum(eqn, x.astype(dtype), p["kernel"].astype(dtype))
    if "bias" in p:
        y = y + p["bias"].astype(dtype)
    return y


def dot_product_attention(q, k, v, mask, *, scale: float, return_probs: bool = False):
    """q [B,Tq,H,D], k/v [B,Tk,KV,D], mask bool broadcastable to [B,H,Tq,Tk] (True = attend).

    Grouped-query attention folds the H/KV query heads of a group onto their shared KV head
    instead of repeating K and V. Fully masked rows (e.g. invalid MoD slots) get a uniform
    distribution; their outputs are never used.
    """
    b, tq, h, d = q.shape
    kv = k.shape[2]
    group = h // kv
    qg = q.reshape(b, tq, kv, group, d)
    logits = jnp.einsum("bqkgd,bskd->bkgqs", qg, k).astype(jnp.float32) * scale
    mask = jnp.broadcast_to(mask, (b, h, tq, k.shape[1])).reshape(b, kv, group, tq, k.shape[1])
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bkgqs,bskd->bqkgd", probs.astype(v.dtype), v).reshape(b, tq, h, d)
    if return_probs:
        return out, probs.reshape(b, h, tq, k.shape[1])
    return out, None


def causal_mask(key_valid, q_len: int | None = None):
    """[B,1,T,T] causal mask that also hides padded keys (key_valid [B,T] bool)."""
    t = key_valid.shape[-1]
    causal = jnp.tril(jnp.ones((t, t), dtype=bool))
    if q_len is not None and q_len != t:
        causal = causal[-q_len:]
    return causal[None, None] & key_valid[:, None, None, :]
