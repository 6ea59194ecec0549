"""LLaVA multimodal projector: `linear` or `mlpNx_gelu` (Linear, (GELU, Linear) x N-1)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from gmod_jax.config import ModelConfig
from gmod_jax.layers.dtypes import DTYPES
from gmod_jax.layers.attention import project
from gmod_jax.layers.mlp import activation



class Projector(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, features):
        c = self.config
        pdt = DTYPES[c.param_dtype]
        d_in = c.vision.hidden_size * len(c.vision.feature_layers)
        d = c.text.hidden_size
        params = {}
        for i in range(c.projector.depth):
            fan_in = d_in if i == 0 else d

            def init(rng, fan_in=fan_in):
                p = {"kernel": nn.initializers.lecun_normal()(rng, (fan_in, d), pdt)}
                if c.projector.bias:
                    p["bias"] = jnp.zeros((d,), pdt)
                return p

            params[f"fc{i + 1}"] = self.param(f"fc{i + 1}", init)
        return project_features(c, params, features)


def project_features(config: ModelConfig, params, features):
    dtype = DTYPES[config.dtype]
    act = activation(config.projector.hidden_act)
    x = features
    for i in range(config.projector.depth):
        if i:
            x = act(x)
        x = project(x, params[f"fc{i + 1}"], "bnd,de->bne", dtype)
    return x
