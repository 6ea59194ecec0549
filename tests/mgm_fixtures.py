"""Official Mini-Gemini / γ-MoD-MGM checkpoints built from the PyTorch reference of
tests/mgm_reference.py, written under the official names (llava-hr-and-mgm.md §4.4,
checkpoint-formats.md §4) independently of `convert.keymap`:

- the checkpoint: CLIP main tower under model.vision_tower.vision_tower.vision_model.* (with
  its legacy `position_ids` buffer), the open_clip ConvNeXt trunk under
  model.vision_tower_aux.{vision_stem,vision_stages}.* (layer scale `gamma`), the mining
  projectors model.vlm_uni_{query,aux,val}_projector.{0,1}.*, `model.mm_projector.{0,2}`, Vicuna
  keys; γ-MoD's router under every MoD layer (4.31-style `.bin`) or once (4.36 safetensors);
- the towers as released separately: an HF CLIP directory and an open_clip checkpoint
  (`visual.trunk.*`, with the trunk's classifier head of an odd shape, the CLIP projection head,
  text-tower keys and `logit_scale`, none of which MGM uses);
- config.json with the official MGM fields.
"""

from __future__ import annotations

from pathlib import Path

import torch

from gmod_jax.config import ModelConfig
from tests import hf_fixtures as fx

CLIP = "model.vision_tower.vision_tower.vision_model."
AUX = "model.vision_tower_aux."
AUX_NAME = "openclip-convnext-large-d-320-laion2B-s29B-b131K-ft-soup"
MAX_LENGTH = 256  # tokenizer_model_max_length written to the config (read into ModelConfig)
HEAD_CLASSES = 5  # the open_clip trunk head: any shape, never read


def _reference_items(ref):
    """(module-relative key, tensor) of the reference's persistent parameters."""
    for k, v in ref.state_dict().items():
        if k.endswith(("position_ids", "inv_freq")):
            continue
        yield k, v


def official_state_dict(ref, towers: bool = True) -> dict[str, torch.Tensor]:
    """The reference under the official keys; `towers=False` leaves both towers out (as the
    released MGM checkpoints may)."""
    sd = {}
    for k, v in _reference_items(ref):
        if k.startswith("vision_tower."):
            rest = k[len("vision_tower."):]
            rest = rest[len("vision_model."):] if rest.startswith("vision_model.") else rest
            if towers:
                sd[CLIP + rest] = v
        elif k.startswith("vision_tower_aux."):
            if towers:
                sd["model." + k] = v
        elif k.startswith(("vlm_uni_", "mm_projector.")):
            sd["model." + k] = v
        elif k.startswith("llm.model."):
            sd["model." + k[len("llm.model."):]] = v
        elif k == "llm.lm_head.weight":
            sd["lm_head.weight"] = v
        else:
            raise AssertionError(f"unmapped reference key {k}")
    if towers:
        n_pos = ref.vision_tower.config.image_size // ref.vision_tower.config.patch_size
        sd[CLIP + "embeddings.position_ids"] = torch.arange(n_pos ** 2 + 1)[None]
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}


def official_config(cfg: ModelConfig, mod_layers: list[int] | None = None, aux_name: str = AUX_NAME) -> dict:
    """config.json of Mini-Gemini (`mgm`) or, with `mod_layers`, γ-MoD-MGM (`mod_mgm`). The tiny
    CLIP's head count is the one thing neither the weights nor the OpenAI CLIP name tell, so it
    travels in `mm_vision_config` (the field the project's exporter writes)."""
    t, v = cfg.text, cfg.vision
    out = {"architectures": ["MGMLlamaForCausalLM"], "model_type": "mgm", "vocab_size": t.vocab_size,
           "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_layers,
           "num_attention_heads": t.num_heads, "num_key_value_heads": t.num_kv_heads, "rms_norm_eps": t.rms_norm_eps,
           "rope_theta": t.rope_theta, "max_position_embeddings": t.max_position_embeddings, "hidden_act": "silu",
           "torch_dtype": "float32", "pad_token_id": 0, "transformers_version": "4.36.2",
           "mm_vision_tower": "openai/clip-vit-large-patch14-336",
           "mm_vision_config": {"num_attention_heads": v.num_heads},
           "mm_vision_tower_aux": aux_name, "mm_hidden_size": v.hidden_size,
           "mm_hidden_size_aux": sum(v.aux.dims), "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2,
           "mm_vision_select_feature": "patch", "image_grid": v.image_grid, "image_global": v.image_global,
           "image_size_aux": v.image_size_aux, "image_aspect_ratio": "pad", "image_grid_pinpoints": None,
           "tokenizer_padding_side": "right", "tokenizer_model_max_length": MAX_LENGTH,
           "optimize_vision_tower": False, "optimize_vision_tower_aux": False, "mm_projector_lr": None,
           "mm_use_im_start_end": False, "mm_use_im_patch_token": False, "tune_mm_mlp_adapter": False,
           "freeze_mm_mlp_adapter": False, "use_mm_proj": True}
    if mod_layers is not None:
        out.update(architectures=["MoDMGMLlamaForCausalLM"], model_type="mod_mgm",
                   mod={"mod_enable": True, "mod_mode": "arank_mod", "mod_layers_idx": list(mod_layers),
                        "capacity_factor": 0.5, "router_aux_loss_coef": 0.01})
    return out


def write_checkpoint(ref, out: Path, container: str, config: dict, router: torch.Tensor | None = None,
                     mod_layers: list[int] | None = None, towers: bool = True, sd: dict | None = None,
                     shards: int = 2) -> Path:
    """An official (γ-MoD-)MGM checkpoint directory (router as γ-MoD saves it, see
    hr_fixtures.with_router)."""
    sd = official_state_dict(ref, towers) if sd is None else sd
    if router is not None:
        names = mod_layers if container == "bin" else mod_layers[:1]
        sd = {**sd, **{f"model.layers.{i}.router.weight": router for i in names}}
    fx.write_weights(sd, out, container, shards=shards)
    fx.write_json(out / "config.json", config)
    return out


def write_clip_dir(ref, out: Path) -> Path:
    """The CLIP main tower as an HF CLIPVisionModel directory (config.json + `vision_model.*`)."""
    sd = {}
    for k, v in _reference_items(ref):
        if k.startswith("vision_tower."):
            rest = k[len("vision_tower."):]
            rest = rest if rest.startswith("vision_model.") else "vision_model." + rest
            sd[rest] = v.detach().clone().contiguous()
    config = ref.vision_tower.config.to_dict()
    config["model_type"] = "clip_vision_model"
    fx.write_json(out / "config.json", config)
    fx.write_weights(sd, out, "safetensors")
    return out


def open_clip_state_dict(ref, head_classes: int = HEAD_CLASSES) -> dict[str, torch.Tensor]:
    """The aux trunk as open_clip stores it: `visual.trunk.{stem,stages}.*`, plus what Mini-Gemini
    drops: the trunk's classifier head (an odd class count), norm-free CLIP projection head
    (`visual.head.mlp.*`), a text tower stub and `logit_scale`."""
    sd = {}
    for k, v in _reference_items(ref):
        if k.startswith("vision_tower_aux.vision_stem."):
            sd["visual.trunk.stem." + k[len("vision_tower_aux.vision_stem."):]] = v
        elif k.startswith("vision_tower_aux.vision_stages."):
            sd["visual.trunk.stages." + k[len("vision_tower_aux.vision_stages."):]] = v
    width = ref.config.vision.aux.dims[-1]
    g = torch.Generator().manual_seed(11)
    for name, shape in (("visual.trunk.head.norm.weight", (width,)), ("visual.trunk.head.fc.weight", (head_classes, width)),
                        ("visual.trunk.head.fc.bias", (head_classes,)), ("visual.head.mlp.fc1.weight", (7, width)),
                        ("visual.head.mlp.fc2.weight", (3, 7)), ("token_embedding.weight", (11, 3)),
                        ("transformer.resblocks.0.ln_1.weight", (3,)), ("ln_final.weight", (3,)),
                        ("text_projection", (3, 3)), ("logit_scale", ())):
        sd[name] = torch.randn(shape, generator=g)
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}


def write_open_clip(ref, path: Path, container: str = "safetensors", wrapped: bool = False,
                    sd: dict | None = None) -> Path:
    """An open_clip checkpoint file: safetensors (`open_clip_model.safetensors`) or a `.bin`;
    `wrapped`: a training checkpoint ({"epoch", "state_dict"} with DDP's `module.` prefix)."""
    sd = open_clip_state_dict(ref) if sd is None else sd
    path.parent.mkdir(parents=True, exist_ok=True)
    if container == "safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(path))
    else:
        obj = {"epoch": 3, "name": "soup", "state_dict": {"module." + k: v for k, v in sd.items()}} if wrapped else sd
        torch.save(obj, path)
    return path
