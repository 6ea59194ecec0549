"""ARank: numerical rank of attention maps, used to choose which layers become MoD layers.

Faithful to the official `compute_attention_rank`: each head's post-softmax causal map is made
strictly lower-triangular (the diagonal is zeroed; a causal softmax map always has a positive
diagonal and would be full rank) and its float32 numerical rank is taken with
`torch.linalg.matrix_rank`'s default tolerance sigma_max * T * eps_f32. ARank of a layer is the
mean over heads, then over samples. The official code only looks at batch element 0 of the
whole (unpadded) sequence; here every sample of a padded batch is ranked on its own valid span.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_EPS_F32 = float(np.finfo(np.float32).eps)


def _strictly_causal(probs: jax.Array) -> jax.Array:
    t = probs.shape[-1]
    return jnp.where(jnp.tri(t, k=-1, dtype=bool), probs.astype(jnp.float32), 0.0)


def attention_rank(probs, rtol=None) -> jax.Array:
    """int32 [...]: numerical rank of each strictly-lower-triangular part of probs [..., T, T].

    A singular value counts iff it is > rtol * sigma_max (strict, as torch). `rtol` defaults to
    T * eps_f32 and may be an array broadcastable to the leading dims (per-sample tolerances).
    """
    probs = jnp.asarray(probs)
    if probs.ndim < 2 or probs.shape[-1] != probs.shape[-2]:
        raise ValueError(f"attention maps must be [..., T, T], got {probs.shape}")
    t = probs.shape[-1]
    sv = jnp.linalg.svd(_strictly_causal(probs), compute_uv=False)
    rtol = jnp.asarray(t * _EPS_F32 if rtol is None else rtol, jnp.float32)
    tol = rtol * jnp.max(sv, axis=-1)
    return jnp.sum(sv > tol[..., None], axis=-1, dtype=jnp.int32)


def layer_arank(attn_probs, valid_len=None) -> tuple[jax.Array, jax.Array]:
    """Per-head ranks [B, H] and their head mean [B] for one layer's maps [B, H, T, T].

    `valid_len` [B] ranks each sample on its first valid_len tokens: rows/cols beyond it are
    zeroed (zero rows add only zero singular values) and the tolerance uses valid_len instead
    of T, which is exactly the rank of the unpadded map.
    """
    attn_probs = jnp.asarray(attn_probs)
    if attn_probs.ndim != 4:
        raise ValueError(f"attention maps must be [B, H, T, T], got {attn_probs.shape}")
    rtol = None
    if valid_len is not None:
        valid_len = jnp.asarray(valid_len, jnp.int32)
        pos = jnp.arange(attn_probs.shape[-1])
        inside = pos[None, :] < valid_len[:, None]  # [B, T]
        square = inside[:, None, :, None] & inside[:, None, None, :]
        attn_probs = jnp.where(square, attn_probs, 0)
        rtol = (valid_len.astype(jnp.float32) * _EPS_F32)[:, None]
    ranks = attention_rank(attn_probs, rtol)
    return ranks, jnp.mean(ranks.astype(jnp.float32), axis=-1)


def select_mod_layers(arank_per_layer, num_dense: int | None = 4, threshold: float | None = None) -> tuple[int, ...]:
    """MoD layer indices from per-layer ARank [L].

    Default: the `num_dense` highest-ARank layers stay dense; the threshold is the num_dense-th
    largest value and every layer reaching it stays dense (ties keep more layers dense, paper
    issue #5). With an explicit `threshold`, layers with ARank < threshold become MoD.
    """
    values = np.asarray(arank_per_layer, dtype=np.float64).reshape(-1)
    if threshold is None:
        if num_dense is None or not 0 <= num_dense <= values.size:
            raise ValueError(f"num_dense must be in 0..{values.size}, got {num_dense}")
        if num_dense == 0:
            return tuple(range(values.size))
        threshold = np.sort(values)[::-1][num_dense - 1]
    return tuple(int(i) for i in np.flatnonzero(values < threshold))


def aggregate(per_sample) -> tuple[np.ndarray, np.ndarray]:
    """Per-layer mean and (population) std over samples of [N, L] or [N, L, H] ranks.

    With heads, the head mean is taken first, as the official per-sample "Heads Avg Rank".
    """
    values = np.asarray(per_sample, dtype=np.float64)
    if values.ndim == 3:
        values = values.mean(axis=-1)
    if values.ndim != 2:
        raise ValueError(f"expected [N, L] or [N, L, H], got shape {values.shape}")
    return values.mean(axis=0), values.std(axis=0)

