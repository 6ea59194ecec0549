"""Multi-head / grouped-query attention over explicit params, softmax in float32 (HF eager)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def project(x, p, eqn: str, dtype):
    """Projection `eqn` (e.g. "btd,dhk->bthk") with an optional bias (`p` holds `kernel` and
    maybe `bias`). `eqn` must contract the trailing dims of x with the leading dims of the kernel
    and keep the rest in order; every projection of the models does."""
    xs, rest = eqn.split(",")
    ks, out = rest.split("->")
    n = len(set(xs) & set(ks))
    if not (n and xs[-n:] == ks[:n] and out == xs[:-n] + ks[n:] and len(xs) == x.ndim):
        raise ValueError(f"project needs trailing-into-leading contraction, got {eqn!r} for x {x.shape}")
    y = contract(x.astype(dtype), p["kernel"].astype(dtype), n)
    if "bias" in p:
        y = y + p["bias"].astype(dtype)
    return y


def contract(x, kernel, n: int):
    """x [..., *K] with kernel [*K, *F] -> [..., *F], summing the n trailing dims of x against
    the n leading dims of the kernel, as one 2-D matmul. Same sums as the einsum, but XLA's CPU
    backend differentiates a 3-D einsum such as "btd,df->btf" into a weight gradient that
    contracts two dims (b, t) and transposes the activations for it; flattened, the training
    step of `configs/bench_cpu.py` (batch 2 x 640 tokens) takes 10.6 s instead of 12.9 s."""
    lead, k_shape, f_shape = x.shape[:x.ndim - n], kernel.shape[:n], kernel.shape[n:]
    y = x.reshape(-1, math.prod(k_shape)) @ kernel.reshape(math.prod(k_shape), -1)
    return y.reshape(*lead, *f_shape)


def dot_product_attention(q, k, v, mask, *, scale: float, return_probs: bool = False):
    """q [B,Tq,H,D], k/v [B,Tk,KV,D], mask bool broadcastable to [B,H,Tq,Tk] (True = attend).

    Grouped-query attention folds the H/KV query heads of a group onto their shared KV head
    instead of repeating K and V. Fully masked rows (e.g. invalid MoD slots) get a uniform
    distribution; their outputs are never used.
    """
    if return_probs or not _one_head_at_a_time(k):
        return _attention(q, k, v, mask, scale, return_probs)
    return _per_kv_head(_attention, q, k, v, mask, scale), None


def _one_head_at_a_time(k) -> bool:
    """On CPU the KV heads go one at a time (`lax.map`): each head's score matrix then stays in
    cache through the mask, softmax and value passes, where all heads at once stream it through
    memory several times (T=640, 16 heads, 2 cores: 21 ms instead of 41 ms per layer).
    Accelerators get all heads in one batched op."""
    return k.shape[2] > 1 and jax.default_backend() == "cpu"


def _per_kv_head(fn, q, k, v, mask, scale: float):
    """fn(q, k, v, mask, scale, False) -> (out, _) applied to one KV head (and its query group)
    at a time; same result as fn over all heads."""
    b, tq, h, d = q.shape
    kv = k.shape[2]
    qh = jnp.moveaxis(q.reshape(b, tq, kv, h // kv, d), 2, 0)  # [KV, B, Tq, G, D]
    kh, vh = (jnp.moveaxis(a, 2, 0)[:, :, :, None] for a in (k, v))  # [KV, B, Tk, 1, D]
    mask = jnp.asarray(mask)
    if mask.ndim == 4 and mask.shape[1] > 1:  # a mask per query head: split it by KV head too
        mask = jnp.broadcast_to(mask, (mask.shape[0], h, *mask.shape[2:]))
        masks = jnp.moveaxis(mask.reshape(mask.shape[0], kv, h // kv, *mask.shape[2:]), 1, 0)
        out = jax.lax.map(lambda x: fn(x[0], x[1], x[2], x[3], scale, False)[0], (qh, kh, vh, masks))
    else:
        out = jax.lax.map(lambda x: fn(x[0], x[1], x[2], mask, scale, False)[0], (qh, kh, vh))
    return jnp.moveaxis(out, 0, 2).reshape(b, tq, h, d)  # [KV, B, Tq, G, D] -> [B, Tq, H, D]


def _attention(q, k, v, mask, scale: float, return_probs: bool):
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


CAUSAL_BLOCK_ROWS = 128  # query rows per block of `causal_attention`
MAX_CAUSAL_BLOCKS = 8  # blocks are unrolled in the program: bounds compile time at long T


def causal_attention(q, k, v, mask, *, scale: float, return_probs: bool = False):
    """`dot_product_attention` for a causal `mask` (query i never attends to key j > i; every
    decoder mask here is one, the γ-MoD slot masks included). Query rows go in blocks that only
    see the keys up to their own last row, so most of the masked upper triangle is never
    computed. At T=640, 16 heads on 2 CPU cores (5 blocks, heads one at a time) attention takes
    15 ms per layer instead of 41 ms for all heads and keys at once.

    The result equals `dot_product_attention` up to float summation order: the keys a block
    leaves out are masked for all its rows, so they carry exactly zero probability. Rows whose
    keys are all masked (padding queries) are uniform over their block's keys instead of all
    keys; as there, their outputs are never used. Attention probabilities (`return_probs`) and
    short or non-square inputs take the unblocked path.
    """
    t = q.shape[1]
    if return_probs or k.shape[1] != t or t <= CAUSAL_BLOCK_ROWS:
        return dot_product_attention(q, k, v, mask, scale=scale, return_probs=return_probs)
    if _one_head_at_a_time(k):  # heads outside, blocks inside: measured 15 ms vs 25 ms the other way
        return _per_kv_head(_causal_blocks, q, k, v, mask, scale), None
    return _causal_blocks(q, k, v, mask, scale, False)


def causal_block_bounds(t: int) -> list[int]:
    """Row boundaries of `causal_attention`'s query blocks for T=t ([0, t] when unblocked)."""
    blocks = min(MAX_CAUSAL_BLOCKS, -(-t // CAUSAL_BLOCK_ROWS))
    return [int(b) for b in np.linspace(0, t, max(blocks, 1) + 1).round()]


def _causal_blocks(q, k, v, mask, scale: float, return_probs: bool):
    bounds = causal_block_bounds(q.shape[1])
    outs = []
    for start, stop in zip(bounds[:-1], bounds[1:]):
        rows = slice(start, stop) if mask.shape[-2] > 1 else slice(None)
        keys = slice(0, stop) if mask.shape[-1] > 1 else slice(None)
        out, _ = _attention(q[:, start:stop], k[:, :stop], v[:, :stop], mask[..., rows, keys], scale, False)
        outs.append(out)
    return jnp.concatenate(outs, axis=1), None


def causal_mask(key_valid, q_len: int | None = None):
    """[B,1,T,T] causal mask that also hides padded keys (key_valid [B,T] bool)."""
    t = key_valid.shape[-1]
    causal = jnp.tril(jnp.ones((t, t), dtype=bool))
    if q_len is not None and q_len != t:
        causal = causal[-q_len:]
    return causal[None, None] & key_valid[:, None, None, :]
