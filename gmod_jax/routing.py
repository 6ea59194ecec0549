"""Static-shape token routing for γ-MoD layers (pure JAX, no Flax).

A MoD layer processes only a subset of tokens. Under `jit` every shape must be static, so a
selection is a fixed number K of *slots* per row (a Python int, the "capacity") plus a validity
mask: slot j of row b holds token `indices[b, j]` and takes part in the layer iff `valid[b, j]`.

Slot layout (every `select_*` function guarantees it):

* the valid slots of a row come first, in ascending token order, so slot order equals original
  order among kept tokens (causal attention over slots is causal attention over kept tokens) and
  the compacted RoPE position of a kept token is simply its slot number;
* the invalid slots follow; they hold distinct, unselected token indices (never duplicates of a
  valid slot), so a scatter with `unique_indices=True` is legal and invalid slots can write a
  token's own value back without clobbering anything.

Two gather/scatter implementations share that interface: "gather" (`take_along_axis` and a
unique-index scatter, cheapest on GPU) and "onehot" (dispatch/combine einsums, matmul-only, which
TPU/GSPMD prefers). Both are exact in float32, so they can be swapped without changing results.
"""

from __future__ import annotations

from fractions import Fraction
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gmod_jax import token_types as tt

IMPLEMENTATIONS = ("gather", "onehot")

# Token types that make up the image prefix (the official code's routable span). A row with no
# non-pad token outside the prefix (truncated inside it) or without an image at all (text-only)
# skips nothing: the official code skips nothing when T <= prefix length.
_PREFIX_TYPES = (tt.SYSTEM, tt.IMAGE)
_RATIO_MAX_DENOMINATOR = 4096


class Selection(NamedTuple):
    """Which tokens a MoD layer processes, in static-shape slot form (see module docstring)."""

    indices: jax.Array  # int32 [B, K] token index held by each slot
    valid: jax.Array  # bool [B, K] slot takes part in the layer (a prefix of each row)
    selected: jax.Array  # bool [B, T] token membership (forced tokens included)

    @property
    def capacity(self) -> int:
        return self.indices.shape[-1]

    @property
    def num_kept(self) -> jax.Array:
        return jnp.sum(self.valid, axis=-1, dtype=jnp.int32)


# ----------------------------------------------------------------------------------------------
# Router and routable sets


def router_probs(router_logits: jax.Array) -> jax.Array:
    """Keep-probability r = softmax(z)[..., 1] of 2-class router logits (float32)."""
    return jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)[..., 1]


def _xp(*arrays):
    return np if all(isinstance(a, (np.ndarray, np.generic, int, float, list, tuple)) for a in arrays) else jnp


def routable_mask(token_types, routable_types) -> jax.Array | np.ndarray:
    """bool [B, T]: tokens the router may skip (every other token, PAD included, is forced in).

    `routable_types` is a tuple of token types or a `token_types.RoutableTypes`; with a
    `first_n` bound only a row's first n non-pad tokens can be routable (left padding does not
    move the bound).
    """
    xp = _xp(token_types)
    token_types = xp.asarray(token_types)
    mask = xp.isin(token_types, xp.asarray(tuple(routable_types), dtype=token_types.dtype))
    first_n = getattr(routable_types, "first_n", None)
    if first_n is not None:
        position = xp.cumsum(token_types != tt.PAD, axis=-1) - 1
        mask = mask & (position < first_n)
    return mask


def _ratio_fraction(routing_ratio: float) -> tuple[int, int]:
    # floor(ratio * count) is done in exact integer arithmetic so that the host (numpy) and device
    # (jnp, float32 only without x64) versions agree bit for bit; 0.17 means 17/100, not the float
    # nearest to it.
    if not 0.0 <= routing_ratio < 1.0:
        raise ValueError(f"routing_ratio must be in [0, 1), got {routing_ratio}")
    frac = Fraction(routing_ratio).limit_denominator(_RATIO_MAX_DENOMINATOR)
    return frac.numerator, frac.denominator


def skip_counts(token_types, routable_types, routing_ratio: float):
    """int32 [B]: routable tokens each row skips, n_skip_b = floor(ratio * routable_count_b).

    Rows that have nothing after the image prefix skip nothing: text-only rows (no IMAGE token)
    and rows truncated inside the prefix (only SYSTEM/IMAGE/PAD), as the official code does for
    T <= prefix length. Works on numpy (host) and jax arrays with identical integers.
    """
    xp = _xp(token_types)
    token_types = xp.asarray(token_types)
    num, den = _ratio_fraction(routing_ratio)
    if token_types.shape[-1] * den >= 2**31:
        raise ValueError(f"sequence length {token_types.shape[-1]} too long for int32 skip counts")
    routable = xp.sum(routable_mask(token_types, routable_types), axis=-1).astype(xp.int32)
    non_pad = token_types != tt.PAD
    has_image = xp.any(token_types == tt.IMAGE, axis=-1)
    past_prefix = xp.any(non_pad & ~xp.isin(token_types, xp.asarray(_PREFIX_TYPES, dtype=token_types.dtype)), axis=-1)
    n_skip = (routable * num) // den
    return xp.where(has_image & past_prefix, n_skip, 0).astype(xp.int32)


def static_keep_capacity(token_types_np, routable_types, routing_ratio: float) -> int:
    """Host-side static slot count K = T - min_b n_skip_b for a concrete batch of token types.

    Rows that skip more than the minimum simply get extra invalid slots.
    """
    token_types_np = np.asarray(token_types_np)
    n_skip = skip_counts(token_types_np, routable_types, routing_ratio)
    return int(token_types_np.shape[-1] - (int(n_skip.min()) if n_skip.size else 0))


# ----------------------------------------------------------------------------------------------
# Selection


def _slots_from_topk(top_idx: jax.Array, top_valid: jax.Array, seq_len: int) -> Selection:
    """Reorder top-k slots so valid ones come first in ascending token order."""
    # Key < seq_len for valid slots and >= seq_len for invalid ones: one sort gives the layout.
    key = jnp.where(top_valid, top_idx, top_idx + seq_len)
    order = jnp.argsort(key, axis=-1)
    indices = jnp.take_along_axis(top_idx, order, axis=-1).astype(jnp.int32)
    valid = jnp.take_along_axis(top_valid, order, axis=-1)
    batch = jnp.arange(indices.shape[0])[:, None]
    selected = jnp.zeros((indices.shape[0], seq_len), bool).at[batch, indices].set(valid, unique_indices=True)
    return Selection(indices=indices, valid=valid, selected=selected)


def select_topk(probs, token_types, routable_types, routing_ratio: float, capacity: int) -> Selection:
    """Training rule (masked routing learning): per row keep T - n_skip_b tokens by top-k.

    Every non-routable token (PAD included: official right padding sits after the prefix and is
    always kept) is forced in; routable tokens compete on their keep-probability. `capacity` must
    be >= max_b (T - n_skip_b), e.g. `static_keep_capacity(...)`; rows that keep fewer tokens get
    invalid trailing slots.
    """
    probs = jax.lax.stop_gradient(jnp.asarray(probs, jnp.float32))
    token_types = jnp.asarray(token_types)
    batch, seq_len = probs.shape
    if not 0 < capacity <= seq_len:
        raise ValueError(f"capacity {capacity} must be in 1..{seq_len}")
    forced = ~routable_mask(token_types, routable_types)
    # +2 rather than the official +1 so a forced token with r rounding to 0 can never tie with a
    # routable token whose r rounds to 1.0; the selection is otherwise identical.
    priority = jnp.where(forced, probs + 2.0, probs)
    _, top_idx = jax.lax.top_k(priority, capacity)
    n_keep = seq_len - skip_counts(token_types, routable_types, routing_ratio)
    top_valid = jnp.arange(capacity)[None, :] < n_keep[:, None]
    return _slots_from_topk(top_idx, top_valid, seq_len)


def select_threshold(probs, attention_mask, threshold: float, capacity: int) -> Selection:
    """Inference rule (γ-MoD prefill): keep iff r > threshold (strict), never padding.

    At most `capacity` tokens per row are kept; when more pass, the largest keep-probabilities
    win. `capacity = T` reproduces the unbounded official rule exactly.
    """
    probs = jax.lax.stop_gradient(jnp.asarray(probs, jnp.float32))
    batch, seq_len = probs.shape
    if not 0 < capacity <= seq_len:
        raise ValueError(f"capacity {capacity} must be in 1..{seq_len}")
    non_pad = jnp.ones(probs.shape, bool) if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
    passes = (probs > threshold) & non_pad
    # Failing tokens get a priority below every passing one (r >= 0 > -1); top-k then fills the
    # trailing slots with distinct failing tokens, which stay invalid.
    priority = jnp.where(passes, probs, -1.0)
    _, top_idx = jax.lax.top_k(priority, capacity)
    top_valid = jnp.take_along_axis(passes, top_idx, axis=-1)
    return _slots_from_topk(top_idx, top_valid, seq_len)


# ----------------------------------------------------------------------------------------------
# Positions and masks


def compact_positions(selection: Selection, attention_mask=None) -> jax.Array:
    """int32 [B, K]: RoPE positions 0..k_b-1 over kept tokens (official MoD-layer positions).

    With `attention_mask` ([B, T], 1 = real token) only non-pad kept tokens are counted, so left
    padding does not shift positions; invalid slots get a harmless clipped value.
    """
    counted = selection.valid
    if attention_mask is not None:
        counted = counted & jnp.take_along_axis(jnp.asarray(attention_mask).astype(bool), selection.indices, axis=-1)
    return jnp.maximum(jnp.cumsum(counted, axis=-1, dtype=jnp.int32) - 1, 0)


def gathered_positions(positions, selection: Selection) -> jax.Array:
    """int32 [B, K]: the kept tokens' original positions (the non-compacted option)."""
    positions = jnp.broadcast_to(jnp.asarray(positions), selection.selected.shape)
    return jnp.take_along_axis(positions, selection.indices, axis=-1).astype(jnp.int32)


def gather_mask(mask, selection: Selection) -> jax.Array:
    """A per-token [B, T] array (e.g. the key padding mask) moved to slots, [B, K]."""
    return jnp.take_along_axis(jnp.asarray(mask), selection.indices, axis=-1)


def kept_attention_mask(selection: Selection, key_padding_mask_gathered=None) -> jax.Array:
    """bool [B, 1, K, K] attention mask among slots.

    A query slot sees key slot j iff j is causal (slot order == original order among valid
    slots), valid, and not padding. The diagonal is always on so no row is fully masked: rows of
    invalid slots (and of padding queries) are garbage but finite, and are never scattered back
    for invalid slots, so they cannot leak NaNs into the forward or backward pass.
    """
    k = selection.capacity
    keys = selection.valid
    if key_padding_mask_gathered is not None:
        keys = keys & jnp.asarray(key_padding_mask_gathered).astype(bool)
    causal = jnp.tril(jnp.ones((k, k), bool))
    mask = (causal[None] & keys[:, None, :]) | jnp.eye(k, dtype=bool)[None]
    return mask[:, None]


# ----------------------------------------------------------------------------------------------
# Gather / scatter


def _check_impl(impl: str):
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"routing impl must be one of {IMPLEMENTATIONS}, got {impl!r}")


def _onehot(selection: Selection, dtype) -> jax.Array:
    return jax.nn.one_hot(selection.indices, selection.selected.shape[-1], dtype=dtype)


def gather_tokens(x: jax.Array, selection: Selection, impl: str = "gather") -> jax.Array:
    """[B, T, D] -> [B, K, D]: the tokens held by each slot (invalid slots included)."""
    _check_impl(impl)
    if impl == "gather":
        return jnp.take_along_axis(x, selection.indices[..., None], axis=1)
    # Not masked by validity, so both implementations give identical slots (also invalid ones).
    return jnp.einsum("bkt,btd->bkd", _onehot(selection, x.dtype), x, precision=jax.lax.Precision.HIGHEST)


def scatter_tokens(x: jax.Array, y_kept: jax.Array, selection: Selection, impl: str = "gather") -> jax.Array:
    """Write valid slots of y_kept [B, K, D] back into x [B, T, D]; every other token keeps x."""
    _check_impl(impl)
    y_kept = y_kept.astype(x.dtype)
    if impl == "gather":
        # Invalid slots write the token's own value back (their indices are distinct from every
        # valid slot), which keeps the scatter unique-indexed and gradient-correct.
        y_eff = jnp.where(selection.valid[..., None], y_kept, gather_tokens(x, selection, "gather"))
        batch = jnp.arange(x.shape[0])[:, None]
        return x.at[batch, selection.indices].set(y_eff, unique_indices=True)
    # where(kept, combine(y), x) rather than x + combine(y - x_kept): the latter rounds
    # (x + (y - x) != y in float), this form is exact and matches "gather" bit for bit.
    dispatch = _onehot(selection, x.dtype) * selection.valid[..., None].astype(x.dtype)
    combined = jnp.einsum("bkt,bkd->btd", dispatch, y_kept, precision=jax.lax.Precision.HIGHEST)
    return jnp.where(selection.selected[..., None], combined, x)


# ----------------------------------------------------------------------------------------------
# Loss and statistics


def router_loss(router_logits, selected, attention_mask=None, token_reduction: str = "all") -> jax.Array:
    """Scalar f32 2-class cross-entropy of router logits vs top-k membership (1 = kept).

    "all" averages over all B*T positions, padding included (official); "non_pad" over real
    tokens only. Summing over MoD layers and the coefficient belong to the model.
    """
    logits = jnp.asarray(router_logits, jnp.float32)
    log_p = jax.nn.log_softmax(logits, axis=-1)
    target = jnp.asarray(selected).astype(jnp.int32)
    nll = -jnp.take_along_axis(log_p, target[..., None], axis=-1)[..., 0]
    if token_reduction == "all":
        return jnp.mean(nll)
    if token_reduction == "non_pad":
        if attention_mask is None:
            return jnp.mean(nll)
        weight = jnp.asarray(attention_mask).astype(jnp.float32)
        return jnp.sum(nll * weight) / jnp.maximum(jnp.sum(weight), 1.0)
    raise ValueError(f"token_reduction must be 'all' or 'non_pad', got {token_reduction!r}")


def skip_ratio(selection: Selection, attention_mask=None) -> jax.Array:
    """Scalar f32: non-pad tokens not kept / non-pad tokens entering (MGM skip counter)."""
    non_pad = (jnp.ones(selection.selected.shape, bool) if attention_mask is None
               else jnp.asarray(attention_mask).astype(bool))
    entering = jnp.sum(non_pad, dtype=jnp.float32)
    skipped = jnp.sum(non_pad & ~selection.selected, dtype=jnp.float32)
    return skipped / jnp.maximum(entering, 1.0)
