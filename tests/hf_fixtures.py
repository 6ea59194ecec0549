"""Tiny random PyTorch LLaVA checkpoints in every on-disk layout and container, built locally.

Key renames here are written out independently of `convert.keymap` (from the 5.24 in-memory
state dict, layout C) so the converter is checked against a second spelling of the layouts, and
against transformers' own `save_pretrained` output for layout D. Nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from transformers import (CLIPConfig, CLIPModel, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                          LlavaForConditionalGeneration)


@dataclasses.dataclass(frozen=True)
class Spec:
    """One tiny LLaVA. Defaults: GQA (4 heads, 2 kv), feature layer -2, default strategy."""

    name: str = "base"
    vocab: int = 96
    hidden: int = 64
    inter: int = 96
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    rope_theta: float = 10000.0
    rope_scaling: tuple | None = None  # tuple of (key, value) pairs, HF rope_scaling dict
    max_pos: int = 256
    rms_eps: float = 1e-5
    feature_layer: int | tuple = -2
    strategy: str = "default"
    projector_bias: bool = True
    tie: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    v_hidden: int = 32
    v_inter: int = 64
    v_layers: int = 3
    v_heads: int = 4
    image: int = 28
    patch: int = 14
    image_token: int = 95

    @property
    def image_seq_length(self) -> int:
        return (self.image // self.patch) ** 2 + (1 if self.strategy == "full" else 0)


SPECS = {
    "base": Spec(),
    "linear_list": Spec(name="linear_list", rope_scaling=(("rope_type", "linear"), ("factor", 2.0)),
                        feature_layer=(-3, -1), kv_heads=4),
    "dynamic_full_nobias": Spec(name="dynamic_full_nobias", rope_scaling=(("rope_type", "dynamic"), ("factor", 2.0)),
                                strategy="full", projector_bias=False, max_pos=8),
    "llama3_tied": Spec(name="llama3_tied", rope_theta=50000.0, tie=True, kv_heads=1,
                        rope_scaling=(("rope_type", "llama3"), ("factor", 4.0), ("low_freq_factor", 1.0),
                                      ("high_freq_factor", 4.0), ("original_max_position_embeddings", 64))),
    "yarn_biases": Spec(name="yarn_biases", rope_theta=20000.0, attention_bias=True, mlp_bias=True,
                        rope_scaling=(("rope_type", "yarn"), ("factor", 2.0),
                                      ("original_max_position_embeddings", 128)),
                        rms_eps=1e-6, max_pos=2048),
}


def hf_config(spec: Spec) -> LlavaConfig:
    text = LlamaConfig(
        vocab_size=spec.vocab, hidden_size=spec.hidden, intermediate_size=spec.inter,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
        max_position_embeddings=spec.max_pos, rms_norm_eps=spec.rms_eps, rope_theta=spec.rope_theta,
        rope_scaling=dict(spec.rope_scaling) if spec.rope_scaling else None, tie_word_embeddings=spec.tie,
        attention_bias=spec.attention_bias, mlp_bias=spec.mlp_bias, pad_token_id=0)
    vision = CLIPVisionConfig(hidden_size=spec.v_hidden, intermediate_size=spec.v_inter,
                              num_hidden_layers=spec.v_layers, num_attention_heads=spec.v_heads,
                              image_size=spec.image, patch_size=spec.patch, hidden_act="quick_gelu")
    layer = list(spec.feature_layer) if isinstance(spec.feature_layer, tuple) else spec.feature_layer
    return LlavaConfig(text_config=text, vision_config=vision, image_token_index=spec.image_token,
                       image_seq_length=spec.image_seq_length, vision_feature_layer=layer,
                       vision_feature_select_strategy=spec.strategy,
                       multimodal_projector_bias=spec.projector_bias, tie_word_embeddings=spec.tie)


def build_model(spec: Spec, seed: int = 0) -> LlavaForConditionalGeneration:
    """Random weights with norms near 1 and small matrices, so logits stay O(1) and every
    parameter (norm scales and biases included) influences them."""
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(hf_config(spec)).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            is_norm = any(s in name for s in ("norm", "layrnorm", "layer_norm")) and name.endswith("weight")
            p.copy_(1.0 + 0.1 * noise if is_norm else 0.08 * noise)
    return model


def state_dict_c(model) -> dict[str, torch.Tensor]:
    """Layout C (transformers 5.24 in memory), each tensor its own contiguous copy."""
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def rename(sd: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """Layout C state dict -> layout A, B, C, D or E (E drops the vision tower)."""
    out = {}
    for k, v in sd.items():
        if layout == "C":
            nk = k
        elif layout == "B":
            nk = k.replace("model.vision_tower.", "model.vision_tower.vision_model.", 1)
        elif layout in ("A", "D"):
            if k.startswith("model.language_model."):
                nk = "language_model.model." + k[len("model.language_model."):]
            elif k == "lm_head.weight":
                nk = "language_model.lm_head.weight"
            else:
                nk = k[len("model."):]
            if layout == "A" and nk.startswith("vision_tower."):
                nk = "vision_tower.vision_model." + nk[len("vision_tower."):]
        elif layout == "E":
            if k.startswith("model.vision_tower."):
                continue
            if k.startswith("model.language_model."):
                nk = "model." + k[len("model.language_model."):]
            elif k.startswith("model.multi_modal_projector.linear_"):
                idx, param = k[len("model.multi_modal_projector.linear_"):].split(".")
                nk = f"model.mm_projector.{2 * (int(idx) - 1)}.{param}"
            else:
                nk = k
        else:
            raise ValueError(layout)
        out[nk] = v
    return out


def tower_state(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The vision tower of a layout-C state dict under CLIPModel names (`vision_model.*`)."""
    p = "model.vision_tower."
    return {"vision_model." + k[len(p):]: v for k, v in sd.items() if k.startswith(p)}


def with_legacy_buffers(sd: dict[str, torch.Tensor], spec: Spec, layout: str) -> dict[str, torch.Tensor]:
    """Add the non-persistent buffers old transformers versions saved (the converter drops them)."""
    sd = dict(sd)
    n_pos = (spec.image // spec.patch) ** 2 + 1
    head_dim = spec.hidden // spec.heads
    if layout == "A":
        sd["vision_tower.vision_model.embeddings.position_ids"] = torch.arange(n_pos)[None]
        sd["language_model.model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(head_dim // 2)
    elif layout == "E":
        sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(head_dim // 2)
    return sd


# ----------------------------------------------------------------------------------------------
# containers

def _chunks(sd: dict[str, torch.Tensor], n: int) -> list[dict[str, torch.Tensor]]:
    keys = list(sd)
    per = math.ceil(len(keys) / n)
    return [{k: sd[k] for k in keys[i:i + per]} for i in range(0, len(keys), per)]


def write_weights(sd: dict[str, torch.Tensor], out: Path, container: str = "safetensors", shards: int = 1):
    """Write a state dict as (sharded) safetensors or (sharded) torch .bin with an index."""
    out.mkdir(parents=True, exist_ok=True)
    parts = _chunks(sd, shards) if shards > 1 else [sd]
    n = len(parts)
    if container == "safetensors":
        names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        index = "model.safetensors.index.json"
    else:
        names = ["pytorch_model.bin"] if n == 1 else [f"pytorch_model-{i + 1:05d}-of-{n:05d}.bin" for i in range(n)]
        index = "pytorch_model.bin.index.json"
    for name, part in zip(names, parts):
        if container == "safetensors":
            save_file(part, str(out / name), metadata={"format": "pt"})
        else:
            torch.save(part, out / name)
    if n > 1:
        weight_map = {k: name for name, part in zip(names, parts) for k in part}
        total = sum(v.numel() * v.element_size() for v in sd.values())
        (out / index).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))


def write_json(path: Path, obj: dict):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2))


def _diff(full: dict, defaults: dict) -> dict:
    return {k: v for k, v in full.items() if k not in defaults or defaults[k] != v}


def config_v5(spec: Spec) -> dict:
    return hf_config(spec).to_dict()


def config_v4_diff(spec: Spec, dtype: str = "float32") -> dict:
    """A transformers 4.3x-style LlavaConfig file: sub-configs list only non-default fields and the
    text config spells rope as `rope_theta` + `rope_scaling` (4.x keys)."""
    llama_defaults = LlamaConfig().to_dict()
    vision_defaults = CLIPVisionConfig().to_dict()
    text = {"vocab_size": spec.vocab, "hidden_size": spec.hidden, "intermediate_size": spec.inter,
            "num_hidden_layers": spec.layers, "num_attention_heads": spec.heads, "num_key_value_heads": spec.kv_heads,
            "max_position_embeddings": spec.max_pos, "rms_norm_eps": spec.rms_eps, "tie_word_embeddings": spec.tie,
            "attention_bias": spec.attention_bias, "mlp_bias": spec.mlp_bias, "model_type": "llama",
            "torch_dtype": dtype}
    text = _diff(text, llama_defaults)
    text["model_type"] = "llama"
    if spec.rope_theta != 10000.0:
        text["rope_theta"] = spec.rope_theta
    if spec.rope_scaling:
        scaling = dict(spec.rope_scaling)
        scaling["type"] = scaling.pop("rope_type")  # oldest spelling
        text["rope_scaling"] = scaling
    vision = _diff({"hidden_size": spec.v_hidden, "intermediate_size": spec.v_inter,
                    "num_hidden_layers": spec.v_layers, "num_attention_heads": spec.v_heads,
                    "image_size": spec.image, "patch_size": spec.patch, "hidden_act": "quick_gelu"}, vision_defaults)
    vision["model_type"] = "clip_vision_model"
    layer = list(spec.feature_layer) if isinstance(spec.feature_layer, tuple) else spec.feature_layer
    cfg = {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava", "ignore_index": -100,
           "image_token_index": spec.image_token, "projector_hidden_act": "gelu", "vision_feature_layer": layer,
           "vision_feature_select_strategy": spec.strategy, "text_config": text, "vision_config": vision,
           "tie_word_embeddings": spec.tie, "pad_token_id": 0, "torch_dtype": dtype,
           "transformers_version": "4.40.0"}
    if not spec.projector_bias:
        cfg["multimodal_projector_bias"] = False
    return cfg


def config_original(spec: Spec, mod: dict | None = None, dtype: str = "float16") -> dict:
    """liuhaotian LLaVA (or γ-MoD mod_llava_llama) flat config, diff-serialised like 4.31."""
    assert spec.strategy in ("default", "full") and not isinstance(spec.feature_layer, tuple)
    llama = _diff({"vocab_size": spec.vocab, "hidden_size": spec.hidden, "intermediate_size": spec.inter,
                   "num_hidden_layers": spec.layers, "num_attention_heads": spec.heads,
                   "num_key_value_heads": spec.kv_heads, "max_position_embeddings": spec.max_pos,
                   "rms_norm_eps": spec.rms_eps, "tie_word_embeddings": spec.tie}, LlamaConfig().to_dict())
    cfg = {"architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava", **llama,
           "rope_scaling": dict(spec.rope_scaling) if spec.rope_scaling else None,
           "torch_dtype": dtype, "transformers_version": "4.31.0", "pad_token_id": 0,
           "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_hidden_size": spec.v_hidden,
           "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": spec.feature_layer,
           "mm_vision_select_feature": "patch" if spec.strategy == "default" else "cls_patch",
           "image_aspect_ratio": "pad", "mm_use_im_start_end": False, "mm_use_im_patch_token": False,
           "tune_mm_mlp_adapter": False, "use_mm_proj": True}
    if spec.rope_theta != 10000.0:
        cfg["rope_theta"] = spec.rope_theta
    if mod is not None:
        cfg.update(model_type="mod_llava_llama", architectures=["MoDLLaVALlamaForCausalLM"], mod=mod)
    return cfg


def write_clip_dir(sd_c: dict[str, torch.Tensor], spec: Spec, out: Path, container: str = "safetensors"):
    """A full `CLIPModel` checkpoint (text tower, projections, logit_scale included) whose vision
    tower holds the LLaVA model's tower weights, like openai/clip-vit-large-patch14-336."""
    vision = dict(hidden_size=spec.v_hidden, intermediate_size=spec.v_inter, num_hidden_layers=spec.v_layers,
                  num_attention_heads=spec.v_heads, image_size=spec.image, patch_size=spec.patch)
    text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=50,
                max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    clip = CLIPModel(CLIPConfig(vision_config=vision, text_config=text, projection_dim=8))
    sd = {k: v.detach().clone().contiguous() for k, v in clip.state_dict().items()}
    tower = tower_state(sd_c)
    assert set(tower) <= set(sd), sorted(set(tower) - set(sd))
    sd.update(tower)
    sd["vision_model.embeddings.position_ids"] = torch.arange((spec.image // spec.patch) ** 2 + 1)[None]
    write_json(out / "config.json", clip.config.to_dict())
    write_weights(sd, out, container)


def write_gamma_mod(sd_c: dict[str, torch.Tensor], spec: Spec, out: Path, mod_layers: list[int],
                    container: str = "safetensors", shards: int = 1, seed: int = 0,
                    router_layers: list[int] | None = None, perturb_copy: bool = False) -> torch.Tensor:
    """A γ-MoD mod_llava_llama checkpoint (checkpoint-formats.md §5.3): original-LLaVA keys, the
    tower inside as model.vision_tower.vision_tower.vision_model.*, and one shared router.

    `.bin` (transformers 4.31) stores the router under every MoD layer's name, all aliasing one
    storage; safetensors (4.36) keeps only the first name. Returns the router weight [2, D]."""
    gen = torch.Generator().manual_seed(seed + 7)
    router = 0.01 * torch.randn(2, spec.hidden, generator=gen)
    sd = rename(sd_c, "E")
    sd.update({"model.vision_tower.vision_tower." + k: v for k, v in tower_state(sd_c).items()})
    names = router_layers if router_layers is not None else (mod_layers if container == "bin" else mod_layers[:1])
    for i, layer in enumerate(names):
        sd[f"model.layers.{layer}.router.weight"] = router + 1.0 if perturb_copy and i == 1 else router
    mod = {"mod_enable": True, "mod_mode": "custom", "mod_layers_idx": list(mod_layers), "capacity_factor": 0.5,
           "router_aux_loss_coef": 0.01}
    cfg = config_original(spec, mod=mod, dtype="float32")
    # The tiny tower is not CLIP-L/336, so its shape travels in the config (the field
    # convert.to_hf --format gamma_mod writes for the same reason).
    cfg["mm_vision_config"] = _diff(hf_config(spec).vision_config.to_dict(), {})
    write_json(out / "config.json", cfg)
    write_weights(sd, out, container, shards)
    return router


def write_tokenizer_files(out: Path):
    (out / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 256}))
    (out / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<s>"}))
    (out / "chat_template.jinja").write_text("{{ messages }}")


def to_dtype(sd: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}


def patch_gamma_mod(layers, router: torch.Tensor, mod_layers) -> dict:
    """γ-MoD inference on transformers' Llama for the all-tokens-kept case: p = softmax(router(
    input_layernorm(h)))[..., 1] per MoD layer of the decoder `layers`, and that layer's MLP output
    multiplied by p. Returns {layer: p of the last forward}."""
    state = {}
    for i in mod_layers:
        layer = layers[i]

        def pre_hook(module, args, kwargs, i=i):
            h = args[0] if args else kwargs["hidden_states"]
            logits = module.input_layernorm(h) @ router.T
            state[i] = torch.softmax(logits.float(), dim=-1)[..., 1]

        def mlp_hook(module, args, output, i=i):
            return output * state[i][..., None].to(output.dtype)

        layer.register_forward_pre_hook(pre_hook, with_kwargs=True)
        layer.mlp.register_forward_hook(mlp_hook)
    return state


# ----------------------------------------------------------------------------------------------
# inputs

def parity_inputs(spec: Spec, seed: int = 0):
    """Two rows, each with one image (exactly image_seq_length placeholders); row 1 right-padded."""
    rng = np.random.default_rng(seed)
    n = spec.image_seq_length
    t = n + 9
    ids = rng.integers(3, spec.image_token, size=(2, t))
    ids[:, 0] = 1
    ids[0, 2:2 + n] = spec.image_token
    ids[1, 4:4 + n] = spec.image_token
    mask = np.ones((2, t), np.int64)
    mask[1, -3:] = 0
    ids[1, -3:] = 0
    pixels = rng.standard_normal((2, 3, spec.image, spec.image)).astype(np.float32)
    return ids, mask, pixels
