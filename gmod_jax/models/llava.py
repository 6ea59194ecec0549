"""LLaVA: CLIP tower + projector + LLaMA decoder (dense or γ-MoD), static-shape image merge."""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax.numpy as jnp

from gmod_jax import token_types as tt
from gmod_jax.config import ModelConfig
from gmod_jax.models.clip_vit import ClipVisionTower
from gmod_jax.models.llama import LlamaDecoder, RoutingPlan
from gmod_jax.models.mgm import MGMVisionTower
from gmod_jax.models.multipath import MultiPathVisionTower
from gmod_jax.models.projector import Projector

# The one place a tower family (`VisionConfig.tower`) is mapped to the module `LlavaModel` builds
# as `vision`. Each maps pixel_values [N, *ModelConfig.pixel_shape] to features
# [N, ModelConfig.image_seq_length, vision.feature_dim], so nothing downstream branches on it.
VISION_TOWERS = {"clip": ClipVisionTower, "multipath": MultiPathVisionTower, "mgm": MGMVisionTower}


def merge_image_features(text_embeds, input_ids, image_features, image_token_index: int):
    """Put projected image features at the image placeholder positions (HF convention: each image
    is expanded to `image_seq_length` placeholder tokens).

    With one image per row (`image_features.shape[0] == batch`), row b's k-th placeholder takes
    token k of image b, so text-only rows in a mixed batch consume nothing. Otherwise features are
    consumed in order over the flattened batch, like HF's `masked_scatter`.
    Static shapes: a cumsum gives each placeholder its feature index; no boolean indexing.
    """
    b, t, d = text_embeds.shape
    n_img, n_tok, _ = image_features.shape
    is_image = input_ids == image_token_index
    if n_img == b:
        rank = jnp.cumsum(is_image, axis=-1) - 1
        index = jnp.arange(b)[:, None] * n_tok + jnp.clip(rank, 0, n_tok - 1)
    else:
        index = (jnp.cumsum(is_image.reshape(-1)) - 1).reshape(b, t)
    flat = image_features.reshape(n_img * n_tok, d).astype(text_embeds.dtype)
    gathered = jnp.take(flat, jnp.clip(index, 0, n_img * n_tok - 1), axis=0)
    return jnp.where(is_image[..., None], gathered, text_embeds)


class LlavaModel(nn.Module):
    """`apply({'params': p}, input_ids, pixel_values, attention_mask, token_types, plan)`.

    Returns a dict: `logits` float32 [B,T,V], `router_loss`, and for γ-MoD `mod_kept` /
    `mod_tokens` per MoD layer and `mod_kept_by_type` / `mod_tokens_by_type` per MoD layer and
    routable token type (see `LlamaDecoder.__call__`).
    """

    config: ModelConfig

    def setup(self):
        self.vision = VISION_TOWERS[self.config.vision.tower](self.config)
        self.projector = Projector(self.config)
        self.llm = LlamaDecoder(self.config)

    def declare_params(self):
        """Touch every submodule so `init(rng, method=LlavaModel.declare_params)` creates the
        params without tracing a forward pass (much faster to compile than a full init)."""
        self.vision.patch_embed, self.projector.fcs, self.llm.layers
        return None

    def embed_image(self, pixel_values):
        return self.projector(self.vision(pixel_values))

    def embed(self, input_ids, pixel_values=None):
        ids = jnp.asarray(input_ids)
        is_image = ids == self.config.image_token_index
        # The placeholder id may lie outside the vocabulary (original LLaVA uses -200).
        embeds = self.llm.embed_tokens(jnp.where(is_image, 0, ids))
        if pixel_values is None:
            return embeds
        return merge_image_features(embeds, ids, self.embed_image(pixel_values), self.config.image_token_index)

    def __call__(self, input_ids, pixel_values=None, attention_mask=None, token_types=None,
                 plan: RoutingPlan = RoutingPlan(), attn_probs_fn: Callable | None = None,
                 return_hidden: bool = False):
        ids = jnp.asarray(input_ids)
        mask = jnp.ones(ids.shape, bool) if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
        if token_types is None:
            token_types = default_token_types(ids, self.config.image_token_index, mask)
        embeds = self.embed(ids, pixel_values)
        hidden, aux = self.llm(embeds, mask, jnp.asarray(token_types), plan, attn_probs_fn)
        out = dict(aux)
        out["logits"] = self.llm.logits(hidden)
        if return_hidden:
            out["hidden"] = hidden
        return out


def default_token_types(ids, image_token_index: int, mask):
    """Jittable twin of `token_types.infer_token_types` for inputs without data-pipeline types."""
    t = ids.shape[-1]
    pos = jnp.arange(t)
    is_image = ids == image_token_index
    last = jnp.max(jnp.where(is_image, pos, -1), axis=-1, keepdims=True)
    types = jnp.where(pos <= last, tt.SYSTEM, tt.QUESTION)
    types = jnp.where(is_image, tt.IMAGE, types)
    types = jnp.where(jnp.any(is_image, axis=-1, keepdims=True), types, tt.TEXT)
    return jnp.where(mask, types, tt.PAD).astype(jnp.int32)
