"""Rotary position embeddings in the HF "rotate_half" layout, with every rope type HF Llama supports.

HF Llama q/k weights are stored for the rotate-half convention, so converted weights need no
permutation. Frequencies follow transformers' `ROPE_INIT_FUNCTIONS` exactly (default, linear,
dynamic, yarn, longrope, llama3).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np


def _base_inv_freq(theta: float, dim: int) -> np.ndarray:
    return 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))


def _yarn(theta, dim, p, max_pos):
    factor = p.get("factor")
    orig = p.get("original_max_position_embeddings", max_pos)
    if factor is None:
        factor = max_pos / orig

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = p.get("attention_factor")
    if attention_factor is None:
        if p.get("mscale") and p.get("mscale_all_dim"):
            attention_factor = float(mscale(factor, p["mscale"]) / mscale(factor, p["mscale_all_dim"]))
        else:
            attention_factor = mscale(factor)
    beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def correction_dim(rotations):
        return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    pos_freqs = theta ** (np.arange(0, dim, 2).astype(np.float32) / dim)
    extrapolation_factor = 1 - ramp
    inv = (1.0 / (factor * pos_freqs)) * (1 - extrapolation_factor) + (1.0 / pos_freqs) * extrapolation_factor
    return inv.astype(np.float32), attention_factor


def _llama3(theta, dim, p):
    inv = _base_inv_freq(theta, dim)
    factor, low_f, high_f = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old = p["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old / low_f, old / high_f
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old / wavelen - low_f) / (high_f - low_f)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def inv_freq_and_scale(positions, *, theta: float, dim: int, scaling: dict | None, max_pos: int):
    """Inverse frequencies [dim/2] (possibly depending on the traced sequence length) and the
    cos/sin attention scaling factor."""
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    p = scaling or {}
    if rope_type == "default":
        return jnp.asarray(_base_inv_freq(theta, dim)), 1.0
    if rope_type == "linear":
        return jnp.asarray(_base_inv_freq(theta, dim) / p["factor"]), 1.0
    if rope_type == "llama3":
        return jnp.asarray(_llama3(theta, dim, p)), 1.0
    if rope_type == "yarn":
        inv, att = _yarn(theta, dim, p, max_pos)
        return jnp.asarray(inv), att
    seq_len = jnp.max(positions) + 1
    if rope_type == "dynamic":
        # HF grows the base once the sequence exceeds max_position_embeddings (computed from the
        # traced length, so the shape stays static).
        factor = p["factor"]
        length = jnp.maximum(seq_len, max_pos).astype(jnp.float32)
        base = theta * ((factor * length / max_pos) - (factor - 1)) ** (dim / (dim - 2))
        exponents = jnp.arange(0, dim, 2, dtype=jnp.float32) / dim
        return 1.0 / (base ** exponents), 1.0
    if rope_type == "longrope":
        orig = p.get("original_max_position_embeddings", max_pos)
        factor = p.get("factor") or max_pos / orig
        att = p.get("attention_factor")
        if att is None:
            att = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
        shape = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim
        short = 1.0 / (np.asarray(p["short_factor"], np.float32) * theta ** shape)
        long = 1.0 / (np.asarray(p["long_factor"], np.float32) * theta ** shape)
        return jnp.where(seq_len > orig, jnp.asarray(long), jnp.asarray(short)), att
    raise ValueError(f"unsupported rope_type {rope_type!r}")


def rope_cos_sin(positions, inv_freq, attention_scale: float = 1.0):
    """cos/sin tables [..., T, dim] for integer positions [..., T], computed in float32."""
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb) * attention_scale, jnp.sin(emb) * attention_scale


def apply_rope(x, cos, sin):
    """x [B, T, H, D]; cos/sin [B, T, D]. The rotation happens in x's dtype like HF (cos/sin cast)."""
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin
