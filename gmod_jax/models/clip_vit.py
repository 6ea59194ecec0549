"""CLIP ViT vision tower (HF `CLIPVisionModel` semantics) over a stacked param tree."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from gmod_jax.config import ModelConfig
from gmod_jax.layers.dtypes import DTYPES
from gmod_jax.layers.attention import dot_product_attention, project
from gmod_jax.layers.mlp import activation
from gmod_jax.layers.norms import layer_norm
from gmod_jax.sharding import constrain_batch



class ClipVisionTower(nn.Module):
    config: ModelConfig

    def setup(self):
        v, pdt = self.config.vision, DTYPES[self.config.param_dtype]
        L, D, F, H, hd, P = v.num_layers, v.hidden_size, v.intermediate_size, v.num_heads, v.head_dim, v.patch_size
        normal = nn.initializers.normal(0.02)

        def ln(shape):
            return {"scale": jnp.ones(shape, pdt), "bias": jnp.zeros(shape, pdt)}

        def layers_init(rng):
            r = jax.random.split(rng, 6)
            return {
                "ln1": ln((L, D)),
                "attn": {
                    "q": {"kernel": normal(r[0], (L, D, H, hd), pdt), "bias": jnp.zeros((L, H, hd), pdt)},
                    "k": {"kernel": normal(r[1], (L, D, H, hd), pdt), "bias": jnp.zeros((L, H, hd), pdt)},
                    "v": {"kernel": normal(r[2], (L, D, H, hd), pdt), "bias": jnp.zeros((L, H, hd), pdt)},
                    "o": {"kernel": normal(r[3], (L, H, hd, D), pdt), "bias": jnp.zeros((L, D), pdt)},
                },
                "ln2": ln((L, D)),
                "fc1": {"kernel": normal(r[4], (L, D, F), pdt), "bias": jnp.zeros((L, F), pdt)},
                "fc2": {"kernel": normal(r[5], (L, F, D), pdt), "bias": jnp.zeros((L, D), pdt)},
            }

        self.patch_embed = self.param("patch_embed", lambda rng: {"kernel": normal(rng, (P, P, v.num_channels, D), pdt)})
        self.cls = self.param("cls", normal, (D,), pdt)
        self.pos_embed = self.param("pos_embed", normal, (v.num_patches + 1, D), pdt)
        self.pre_ln = self.param("pre_ln", lambda rng: ln((D,)))
        self.layers = self.param("layers", layers_init)
        self.post_ln = self.param("post_ln", lambda rng: ln((D,)))

    def __call__(self, pixel_values):
        """pixel_values [N, H, W, C] (normalised, channels last) -> features [N, n_tokens, D·n_layers]."""
        return vision_features(self.config, {
            "patch_embed": self.patch_embed, "cls": self.cls, "pos_embed": self.pos_embed,
            "pre_ln": self.pre_ln, "layers": self.layers}, pixel_values)


def encoder_layer(config: ModelConfig, p, x):
    v, dtype = config.vision, DTYPES[config.dtype]
    x = constrain_batch(x)  # under a mesh: batch-sharded activations (see sharding.constrain_batch)
    h = layer_norm(x, p["ln1"]["scale"], p["ln1"]["bias"], v.layer_norm_eps)
    q = project(h, p["attn"]["q"], "btd,dhk->bthk", dtype)
    k = project(h, p["attn"]["k"], "btd,dhk->bthk", dtype)
    val = project(h, p["attn"]["v"], "btd,dhk->bthk", dtype)
    out, _ = dot_product_attention(q, k, val, jnp.ones((1, 1, 1, 1), bool), scale=v.head_dim ** -0.5,
                                   impl=config.attention_impl)
    x = x + project(out, p["attn"]["o"], "bthk,hkd->btd", dtype)
    h = layer_norm(x, p["ln2"]["scale"], p["ln2"]["bias"], v.layer_norm_eps)
    h = activation(v.hidden_act)(project(h, p["fc1"], "btd,df->btf", dtype))
    return x + project(h, p["fc2"], "btf,fd->btd", dtype)


def vision_features(config: ModelConfig, p, pixel_values):
    """LLaVA image features: hidden states of `feature_layer` (HF indexing: 0 = pre-LN output),
    CLS dropped for the `default` strategy, several layers concatenated on channels."""
    v, dtype = config.vision, DTYPES[config.dtype]
    patches = jax.lax.conv_general_dilated(
        pixel_values.astype(dtype), p["patch_embed"]["kernel"].astype(dtype),
        window_strides=(v.patch_size, v.patch_size), padding="VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    n = patches.shape[0]
    x = patches.reshape(n, -1, v.hidden_size)
    cls = jnp.broadcast_to(p["cls"].astype(dtype), (n, 1, v.hidden_size))
    x = jnp.concatenate([cls, x], axis=1) + p["pos_embed"].astype(dtype)[None]
    x = layer_norm(x, p["pre_ln"]["scale"], p["pre_ln"]["bias"], v.layer_norm_eps)

    wanted = v.feature_layers
    depth = max(wanted)
    stack = jax.tree.map(lambda a: a[:depth], p["layers"])
    collect = len(wanted) > 1 or 0 in wanted

    def step(h, layer_params):
        h = encoder_layer(config, layer_params, h)
        return h, (h if collect else None)

    last, outs = jax.lax.scan(step, x, stack)
    if collect:
        hidden = jnp.concatenate([x[None], outs])  # index i = hidden_states[i]
        feats = jnp.concatenate([hidden[i] for i in wanted], axis=-1)
    else:
        feats = last
    if v.feature_strategy == "default":
        feats = feats[:, 1:]
    return feats
