"""Normalisation layers as pure functions over explicit params."""

import jax.numpy as jnp


def rms_norm(x, scale, eps: float):
    """LLaMA RMSNorm: normalise in float32, cast back to the input dtype, then scale (HF order)."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jnp.reciprocal(jnp.sqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps))
    return scale.astype(x.dtype) * normed.astype(x.dtype)


def layer_norm(x, scale, bias, eps: float):
    """CLIP LayerNorm, statistics in float32 for bf16 stability."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jnp.reciprocal(jnp.sqrt(var + eps))
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)
