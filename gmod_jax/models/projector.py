"""LLaVA multimodal projector: `linear` or `mlpNx_gelu` (Linear, (GELU, Linear) x N-1)."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from gmod_jax.config import ModelConfig
from gmod_jax.layers.dtypes import DTYPES
from gmod_jax.layers.attention import project
from gmod_jax.layers.mlp import activation



class Projector(nn.Module):
    config: ModelConfig

    def setup(self):
        c = self.config
        pdt = DTYPES[c.param_dtype]
        d_in = c.vision.feature_dim
        d = c.text.hidden_size

        def init(fan_in):
            def fn(rng):
                p = {"kernel": nn.initializers.lecun_normal()(rng, (fan_in, d), pdt)}
                if c.projector.bias:
                    p["bias"] = jnp.zeros((d,), pdt)
                return p
            return fn

        self.fcs = [self.param(f"fc{i + 1}", init(d_in if i == 0 else d)) for i in range(c.projector.depth)]

    def __call__(self, features):
        return project_features(self.config, {f"fc{i + 1}": p for i, p in enumerate(self.fcs)}, features)


def project_features(config: ModelConfig, params, features):
    dtype = DTYPES[config.dtype]
    act = activation(config.projector.hidden_act)
    x = features
    for i in range(config.projector.depth):
        if i:
            x = act(x)
        x = project(x, params[f"fc{i + 1}"], "bnd,de->bne", dtype)
    return x
