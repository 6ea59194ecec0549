"""Hand-written PyTorch Mini-Gemini(-HD) reference, restated from
/work/shared/reference/llava-hr-and-mgm.md §4.1-4.4 with the official module names
(`vision_tower`, `vision_tower_aux.vision_stem/vision_stages`, `vlm_uni_{query,aux,val}_projector`,
`mm_projector`), so its state dict carries the official key suffixes. The CLIP views are built
on the "host" side in torch as the official eval loader does (from the normalised aux tensor), the
image features as `encode_images` / `unified_resampler` do, and the LLM is transformers'
LlamaForCausalLM fed the spliced embeddings. `flax_params` maps it all onto our tree through
`convert.keymap.expected_keys`, i.e. the rows of `gmod_jax.param_layout`, so the declared keys
and transforms of the aux trunk and the mining projectors are checked too.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig as HFLlamaConfig, LlamaForCausalLM

from gmod_jax.config import ModelConfig
from tests import hr_fixtures as hr


class AuxTower(nn.Module):
    """open_clip ConvNeXt trunk as MGM keeps it: `vision_stem` + `vision_stages`; the four stage
    outputs bilinearly resized (align_corners False) to stage 0's grid and concatenated."""

    def __init__(self, config):
        super().__init__()
        trunk = hr.ConvNeXtTrunk(config)
        self.vision_stem, self.vision_stages = trunk.stem, trunk.stages

    def forward(self, x):
        x = self.vision_stem(x)
        outs = []
        for stage in self.vision_stages:
            x = stage(x)
            outs.append(x)
        size = outs[0].shape[-2:]
        return torch.cat([outs[0]] + [F.interpolate(o, size=size, mode="bilinear", align_corners=False)
                                      for o in outs[1:]], dim=1)


def _ln_linear(d_in, d_out):
    return nn.Sequential(nn.LayerNorm(d_in, eps=1e-5), nn.Linear(d_in, d_out))


class MGMReference(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        v, t = config.vision, config.text
        self.config = config
        self.vision_tower = CLIPVisionModel(CLIPVisionConfig(
            hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_hidden_layers=v.num_layers,
            num_attention_heads=v.num_heads, image_size=v.image_size, patch_size=v.patch_size,
            hidden_act=v.hidden_act, layer_norm_eps=v.layer_norm_eps))
        self.vision_tower_aux = AuxTower(v.aux)
        d, d_aux = v.hidden_size, sum(v.aux.dims)
        self.vlm_uni_query_projector = _ln_linear(d, d)
        self.vlm_uni_aux_projector = _ln_linear(d_aux, d)
        self.vlm_uni_val_projector = _ln_linear(d_aux, d)
        self.mm_projector = nn.Sequential(nn.Linear(d, t.hidden_size), nn.GELU(), nn.Linear(t.hidden_size, t.hidden_size))
        self.llm = LlamaForCausalLM(HFLlamaConfig(
            vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
            num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads,
            max_position_embeddings=t.max_position_embeddings, rms_norm_eps=t.rms_norm_eps,
            rope_theta=t.rope_theta, tie_word_embeddings=False))
        self.llm.set_attn_implementation("eager")

    # host side (eval loader): CLIP views from the normalised aux tensor
    def views(self, aux_image):
        """[3, S_aux, S_aux] -> [V, 3, s, s]: bilinear to s·grid, row-major tiles, then the global
        view (the big image bilinearly resized to s)."""
        v = self.config.vision
        s, g = v.image_size, v.image_grid
        big = F.interpolate(aux_image[None], size=(s * g, s * g), mode="bilinear", align_corners=False)[0]
        if g == 1:
            return big[None]
        tiles = big.reshape(3, g, s, g, s).permute(1, 3, 0, 2, 4).reshape(g * g, 3, s, s)
        if not v.image_global:
            return tiles
        whole = F.interpolate(big[None], size=(s, s), mode="bilinear", align_corners=False)
        return torch.cat([tiles, whole], dim=0)

    def clip_features(self, images):
        return self.vision_tower(images, output_hidden_states=True).hidden_states[-2][:, 1:]

    def unified_resampler(self, feats, aux):
        """feats [M, n², d] raw CLIP tokens, aux [M, C, n·p, n·p] -> mined vectors [M, n², d]."""
        m, tokens, _ = feats.shape
        n = math.isqrt(tokens)
        p = aux.shape[-1] // n
        cells = aux.permute(0, 2, 3, 1).reshape(m, n, p, n, p, -1).permute(0, 1, 3, 2, 4, 5)
        cells = cells.reshape(m, tokens, p * p, -1)
        q = self.vlm_uni_query_projector(feats)[:, :, None]
        k = self.vlm_uni_aux_projector(cells)
        val = self.vlm_uni_val_projector(cells)
        att = (q @ (k.transpose(-1, -2) / k.shape[-1] ** 0.5)).nan_to_num()
        return (att.softmax(-1) @ val).mean(2)

    def encode_images(self, views, aux_images):
        """views [B, V, 3, s, s], aux_images [B, 3, S, S] -> tokens [B, V·n², d] before the projector,
        order [global, tiles]."""
        v = self.config.vision
        g, b = v.image_grid, views.shape[0]
        tiles = views[:, :-1] if v.image_global else views
        tiles = tiles.flatten(0, 1)
        aux = self.vision_tower_aux(aux_images)
        if g > 1:
            c, side = aux.shape[1], aux.shape[-1] // g
            aux_tiles = aux.reshape(b, c, g, side, g, side).permute(0, 2, 4, 1, 3, 5).reshape(b * g * g, c, side, side)
        else:
            aux_tiles = aux
        feats = self.clip_features(tiles)
        out = (feats + self.unified_resampler(feats, aux_tiles)).reshape(b, -1, feats.shape[-1])
        if v.image_global:
            glob = self.clip_features(views[:, -1])
            aux_glob = F.interpolate(aux, scale_factor=1 / g, mode="bilinear", align_corners=False)
            out = torch.cat([glob + self.unified_resampler(glob, aux_glob), out], dim=1)
        return out

    def logits(self, input_ids, image_tokens):
        """The official splice with the image run already expanded: features at the image slots."""
        ids = torch.as_tensor(input_ids)
        is_image = ids == self.config.image_token_index
        embeds = self.llm.model.embed_tokens(torch.where(is_image, 0, ids))
        feats = self.mm_projector(image_tokens).to(embeds.dtype)
        embeds = embeds.clone()
        for row in range(ids.shape[0]):
            embeds[row, is_image[row]] = feats[row]
        return self.llm(inputs_embeds=embeds).logits


def build(config: ModelConfig, seed: int = 0) -> MGMReference:
    """Every parameter random, norms near 1, so no term is silently zero or one."""
    torch.manual_seed(seed)
    model = MGMReference(config).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            norm = p.ndim == 1 and any(s in name for s in ("norm", "layrnorm", "layer_norm", "projector.0",
                                                          "stem.1", "downsample.0"))
            p.copy_(1.0 + 0.1 * noise if norm and name.endswith("weight") else 0.1 * noise)
    return model


# ----------------------------------------------------------------------------------------------
# torch state dict -> our param tree


def _set(tree: dict, path, value):
    *head, last = path
    for k in head:
        tree = tree.setdefault(k, {})
    tree[last] = np.asarray(value)


def flax_params(ref: MGMReference) -> dict:
    from convert import keymap

    cfg = ref.config
    sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    canonical = {}
    for k, a in sd.items():
        if k.startswith("vision_tower."):  # transformers 5.x CLIPVisionModel: no `vision_model.` level
            canonical[k] = a
        elif k.startswith("llm.model."):
            canonical["language_model." + k[len("llm.model."):]] = a
        elif k == "llm.lm_head.weight":
            canonical["lm_head.weight"] = a
        elif k.startswith("mm_projector."):
            idx, param = k[len("mm_projector."):].split(".")
            canonical[f"multi_modal_projector.linear_{int(idx) // 2 + 1}.{param}"] = a
        elif k.startswith(("vision_tower_aux.", "vlm_uni_")):  # the official names without `model.`
            canonical[k] = a
    tree: dict = {}
    stacked: dict = {}
    for key, target in keymap.expected_keys(cfg).items():
        value = target.to_flax(canonical[key])
        if target.layer is None:
            _set(tree, target.path, value)
        else:
            stacked.setdefault(target.path, {})[target.layer] = value
    for path, layers in stacked.items():
        _set(tree, path, np.stack([layers[i] for i in sorted(layers)]))
    return tree
