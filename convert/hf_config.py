"""`config.json` of HF LLaVA, original LLaVA and γ-MoD checkpoints <-> `gmod_jax.config.ModelConfig`.

Read without transformers: 4.x files are diff-serialised (a sub-config lists only values that
differ from its class defaults), so the defaults of transformers' `LlamaConfig` and
`CLIPVisionConfig` are filled in here. Those defaults are *not* Vicuna's (rms_norm_eps 1e-6,
max_position_embeddings 2048) nor CLIP-L/336's (ViT-B/32 numbers), which is exactly why they must
come from the class defaults and not from a preset.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from convert.errors import ConversionError, UnsupportedFormatError
from gmod_jax.config import LlamaConfig, ModelConfig, MoDConfig, ProjectorConfig, VisionConfig

# transformers `LlamaConfig()` defaults (identical in 4.3x and 5.24).
LLAMA_DEFAULTS: dict[str, Any] = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": None,  # None -> num_attention_heads
    "head_dim": None,  # None -> hidden_size // num_attention_heads
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": False,
    "initializer_range": 0.02,
    "pad_token_id": None,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

# transformers `CLIPVisionConfig()` defaults (ViT-B/32): what a diff-serialised vision_config
# falls back to for every field it omits.
CLIP_VISION_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_channels": 3,
    "image_size": 224,
    "patch_size": 32,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}

# `LlavaConfig(vision_config=None)` and `openai/clip-vit-large-patch14-336`.
CLIP_L_336: dict[str, Any] = {**CLIP_VISION_DEFAULTS, "hidden_size": 1024, "intermediate_size": 4096,
                              "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 336,
                              "patch_size": 14}
CLIP_L_336_NAME = "openai/clip-vit-large-patch14-336"

ORIGINAL_IMAGE_TOKEN_INDEX = -200  # llava/constants.py IMAGE_TOKEN_INDEX (also γ-MoD, MGM)

KIND_HF = "hf_llava"
KIND_ORIGINAL = "original_llava"
KIND_GAMMA_MOD = "gamma_mod"


@dataclasses.dataclass(frozen=True)
class SourceConfig:
    """A parsed source config: what it is, the ModelConfig it implies, and facts kept for export."""

    kind: str
    model: ModelConfig
    raw: dict
    extras: dict  # capacity_factor, mod_mode, vision tower name, token ids, source dtype


def load_json(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConversionError(f"{path}: config.json not found") from None
    except (OSError, ValueError) as e:
        raise ConversionError(f"{path}: unreadable JSON: {e}") from e
    if not isinstance(data, dict):
        raise ConversionError(f"{path}: expected a JSON object")
    return data


def detect_kind(raw: dict) -> str:
    """Classify a config.json; raise for known-but-unsupported families (LLaVA-HR, MGM, LLaVA-1.6)."""
    model_type = raw.get("model_type")
    if raw.get("is_multipath_encoder") or "vision_tower_slow" in raw:
        raise UnsupportedFormatError(
            "LLaVA-HR multi-path vision encoder (is_multipath_encoder / vision_tower_slow) is not supported yet: "
            "the converter and model lack the ConvNeXt slow tower, the MR-Adapter fusion (align_stages*) and the "
            "1024-px CLIP position-table resampling")
    if model_type in ("mgm", "mod_mgm") or "mm_vision_tower_aux" in raw:
        raise UnsupportedFormatError(
            "Mini-Gemini (MGM) checkpoints (mm_vision_tower_aux) are not supported yet: the converter and model "
            "lack the open_clip ConvNeXt aux tower and the patch-info-mining resampler (vlm_uni_* projectors)")
    if "unpad" in str(raw.get("mm_patch_merge_type", "")) or raw.get("image_aspect_ratio") == "anyres":
        raise UnsupportedFormatError(
            "LLaVA-1.6 any-resolution checkpoints (mm_patch_merge_type *unpad / image_aspect_ratio anyres) are not "
            "supported yet: missing image tiling and the image_newline parameter")
    if model_type == "mod_llava_llama" or isinstance(raw.get("mod"), dict):
        return KIND_GAMMA_MOD
    if "mm_vision_tower" in raw or "mm_projector_type" in raw or "mm_hidden_size" in raw:
        return KIND_ORIGINAL
    if model_type == "llava" or "text_config" in raw or "vision_config" in raw:
        return KIND_HF
    raise ConversionError(
        f"unknown config.json (model_type={model_type!r}): expected an HF LlavaConfig (text_config / "
        "vision_config), an original LLaVA config (mm_vision_tower, mm_* fields) or a γ-MoD mod_llava_llama config")


# ----------------------------------------------------------------------------------------------
# pieces

def _rope(text: dict) -> tuple[float, dict | None]:
    """(rope_theta, rope scaling dict incl. rope_type or None) from 4.x or 5.x Llama fields."""
    params = text.get("rope_parameters")
    if isinstance(params, dict):
        params = dict(params)
        theta = params.pop("rope_theta", text.get("rope_theta", LLAMA_DEFAULTS["rope_theta"]))
    else:
        theta = text.get("rope_theta", LLAMA_DEFAULTS["rope_theta"])
        params = dict(text.get("rope_scaling") or {})
    if "type" in params:  # 4.x spelling
        params.setdefault("rope_type", params.pop("type"))
    if not params or params.get("rope_type", "default") == "default":
        return float(theta), None
    if "rope_type" not in params:
        raise ConversionError(f"rope scaling without rope_type: {params}")
    return float(theta), params


def llama_config(text: dict, where: str, nested: bool = True) -> LlamaConfig:
    """`nested`: an HF text_config (whose model_type names the LLM); flat original-LLaVA configs
    carry the multimodal model_type instead and are always Llama."""
    t = {**LLAMA_DEFAULTS, **{k: v for k, v in text.items() if v is not None}}
    model_type = text.get("model_type", "llama") if nested else "llama"
    if model_type != "llama":
        raise UnsupportedFormatError(f"{where}: text model_type {model_type!r} is not supported (only llama)")
    if t["hidden_act"] != "silu":
        raise UnsupportedFormatError(f"{where}: hidden_act {t['hidden_act']!r} is not supported (only silu)")
    theta, scaling = _rope(text)
    heads = int(t["num_attention_heads"])
    try:
        return LlamaConfig(
            vocab_size=int(t["vocab_size"]),
            hidden_size=int(t["hidden_size"]),
            intermediate_size=int(t["intermediate_size"]),
            num_layers=int(t["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(t["num_key_value_heads"] if t["num_key_value_heads"] is not None else heads),
            head_dim=None if t["head_dim"] is None else int(t["head_dim"]),
            rms_norm_eps=float(t["rms_norm_eps"]),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=int(t["max_position_embeddings"]),
            attention_bias=bool(t["attention_bias"]),
            mlp_bias=bool(t["mlp_bias"]),
            tie_word_embeddings=bool(t["tie_word_embeddings"]),
            hidden_act=t["hidden_act"],
            initializer_range=float(t["initializer_range"]),
        )
    except (ValueError, TypeError) as e:
        raise ConversionError(f"{where}: invalid text config: {e}") from e


def vision_fields(vision: dict | None, defaults: dict) -> dict:
    v = {**defaults, **{k: val for k, val in (vision or {}).items() if val is not None}}
    model_type = v.get("model_type", "clip_vision_model")
    if model_type not in ("clip_vision_model", "clip"):
        raise UnsupportedFormatError(f"vision tower model_type {model_type!r} is not supported (only CLIP ViT)")
    if v["hidden_act"] not in ("quick_gelu", "gelu"):
        raise UnsupportedFormatError(f"vision hidden_act {v['hidden_act']!r} is not supported")
    return v


def vision_config(v: dict, feature_layer, strategy: str, where: str) -> VisionConfig:
    try:
        return VisionConfig(
            hidden_size=int(v["hidden_size"]),
            intermediate_size=int(v["intermediate_size"]),
            num_layers=int(v["num_hidden_layers"]),
            num_heads=int(v["num_attention_heads"]),
            image_size=int(v["image_size"]),
            patch_size=int(v["patch_size"]),
            num_channels=int(v["num_channels"]),
            layer_norm_eps=float(v["layer_norm_eps"]),
            hidden_act=v["hidden_act"],
            feature_layer=tuple(feature_layer) if isinstance(feature_layer, list) else int(feature_layer),
            feature_strategy=strategy,
        )
    except (ValueError, TypeError) as e:
        raise ConversionError(f"{where}: invalid vision config: {e}") from e


def _source_dtype(*dicts: dict) -> str | None:
    for d in dicts:
        for key in ("dtype", "torch_dtype"):
            if isinstance(d.get(key), str):
                return d[key]
    return None


# ----------------------------------------------------------------------------------------------
# readers per kind

def hf_llava_config(raw: dict, where: str = "config.json") -> SourceConfig:
    text = raw.get("text_config") or {}
    if "vocab_size" not in text and "vocab_size" in raw:  # some 4.x files kept vocab_size at the top
        text = {**text, "vocab_size": raw["vocab_size"]}
    llama = llama_config(text, where)
    vision_raw = raw.get("vision_config")
    v = vision_fields(vision_raw, CLIP_VISION_DEFAULTS if vision_raw is not None else CLIP_L_336)
    strategy = raw.get("vision_feature_select_strategy", "default")
    if strategy not in ("default", "full"):
        raise ConversionError(f"{where}: vision_feature_select_strategy {strategy!r} (expected default or full)")
    vision = vision_config(v, raw.get("vision_feature_layer", -2), strategy, where)
    act = raw.get("projector_hidden_act", "gelu")
    if act != "gelu":
        raise UnsupportedFormatError(f"{where}: projector_hidden_act {act!r} is not supported (only gelu)")
    projector = ProjectorConfig(type="mlp2x_gelu", bias=bool(raw.get("multimodal_projector_bias", True)),
                                hidden_act=act)
    image_token = raw.get("image_token_index", raw.get("image_token_id", 32000))
    pad = raw.get("pad_token_id", text.get("pad_token_id"))
    model = _model_config(vision, projector, llama, MoDConfig(), image_token, pad, where)
    extras = {
        "bos_token_id": text.get("bos_token_id", LLAMA_DEFAULTS["bos_token_id"]),
        "eos_token_id": text.get("eos_token_id", LLAMA_DEFAULTS["eos_token_id"]),
        "source_dtype": _source_dtype(raw, text),
        "image_seq_length": raw.get("image_seq_length"),
    }
    return SourceConfig(KIND_HF, model, raw, extras)


def original_llava_config(raw: dict, vision_tower_dir: str | os.PathLike | None = None,
                          where: str = "config.json") -> SourceConfig:
    """Flat LlamaConfig + `mm_*` fields (liuhaotian LLaVA, and γ-MoD's mod_llava_llama)."""
    kind = detect_kind(raw)
    llama = llama_config(raw, where, nested=False)
    tower_name = raw.get("mm_vision_tower") or raw.get("vision_tower")
    if vision_tower_dir is not None:
        tower_cfg = load_json(Path(vision_tower_dir) / "config.json")
        # A full CLIPModel config nests the tower; a CLIPVisionModel config is the tower itself.
        nested = tower_cfg.get("model_type") == "clip" or "vision_config" in tower_cfg
        v = vision_fields(tower_cfg.get("vision_config") if nested else tower_cfg, CLIP_VISION_DEFAULTS)
    elif isinstance(raw.get("mm_vision_config"), dict):  # written by convert.to_hf --format gamma_mod
        v = vision_fields(raw["mm_vision_config"], CLIP_VISION_DEFAULTS)
    elif tower_name is None or str(tower_name).rstrip("/").endswith("clip-vit-large-patch14-336"):
        v = dict(CLIP_L_336)
    else:
        raise ConversionError(
            f"{where}: vision tower {tower_name!r} is not CLIP-L/336; pass --vision-tower DIR (a CLIP checkpoint "
            "directory with its config.json) so its shape is known")
    select = raw.get("mm_vision_select_feature", "patch")
    strategies = {"patch": "default", "cls_patch": "full"}
    if select not in strategies:
        raise ConversionError(f"{where}: mm_vision_select_feature {select!r} (expected patch or cls_patch)")
    vision = vision_config(v, raw.get("mm_vision_select_layer", -1), strategies[select], where)
    projector = ProjectorConfig(type=raw.get("mm_projector_type", "linear"), bias=True, hidden_act="gelu")
    try:
        projector.depth
    except ValueError as e:
        raise UnsupportedFormatError(f"{where}: {e}") from e
    mm_hidden = raw.get("mm_hidden_size")
    if mm_hidden is not None and int(mm_hidden) != vision.hidden_size * len(vision.feature_layers):
        raise ConversionError(
            f"{where}: mm_hidden_size {mm_hidden} contradicts the vision tower's hidden size {vision.hidden_size}")
    mod = MoDConfig()
    extras: dict[str, Any] = {
        "vision_tower_name": tower_name,
        "bos_token_id": raw.get("bos_token_id", LLAMA_DEFAULTS["bos_token_id"]),
        "eos_token_id": raw.get("eos_token_id", LLAMA_DEFAULTS["eos_token_id"]),
        "source_dtype": _source_dtype(raw),
    }
    if kind == KIND_GAMMA_MOD:
        mod, mod_extras = mod_config(raw.get("mod") or {}, llama.num_layers, where)
        extras.update(mod_extras)
    model = _model_config(vision, projector, llama, mod, ORIGINAL_IMAGE_TOKEN_INDEX, raw.get("pad_token_id"), where)
    return SourceConfig(kind, model, raw, extras)


def mod_config(mod: dict, num_layers: int, where: str) -> tuple[MoDConfig, dict]:
    """γ-MoD's `mod` dict. `capacity_factor` is recorded but not applied: the official code ignores
    it (its routing ratio is a hard-coded 0.5, which is MoDConfig's default)."""
    extras = {"capacity_factor": mod.get("capacity_factor"), "mod_mode": mod.get("mod_mode")}
    if not mod.get("mod_enable", True):
        return MoDConfig(), extras
    layers = mod.get("mod_layers_idx")
    if not isinstance(layers, list) or not all(isinstance(i, int) for i in layers):
        raise ConversionError(f"{where}: mod.mod_layers_idx must be the resolved list of MoD layer indices, "
                              f"got {layers!r}")
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise ConversionError(f"{where}: mod.mod_layers_idx {bad} outside 0..{num_layers - 1}")
    coef = mod.get("router_aux_loss_coef", 0.01)
    return MoDConfig(enabled=True, layers=tuple(sorted(set(layers))), router_aux_loss_coef=float(coef)), extras


def _model_config(vision, projector, llama, mod, image_token, pad, where) -> ModelConfig:
    try:
        return ModelConfig(vision=vision, projector=projector, text=llama, mod=mod,
                           image_token_index=int(image_token), pad_token_id=None if pad is None else int(pad))
    except (ValueError, TypeError) as e:
        raise ConversionError(f"{where}: {e}") from e


def read_source_config(src_dir: str | os.PathLike, vision_tower_dir: str | os.PathLike | None = None) -> SourceConfig:
    """Parse `<src_dir>/config.json` of any supported kind."""
    path = Path(src_dir) / "config.json"
    raw = load_json(path)
    kind = detect_kind(raw)
    if kind == KIND_HF:
        if vision_tower_dir is not None:
            raise ConversionError("--vision-tower is only for original-LLaVA / γ-MoD checkpoints; an HF LLaVA "
                                  "checkpoint carries its own vision tower")
        return hf_llava_config(raw, str(path))
    return original_llava_config(raw, vision_tower_dir, str(path))


def with_param_dtype(model: ModelConfig, dtype: str) -> ModelConfig:
    """Record the converted parameters' dtype (also the compute dtype, as PyTorch runs in it)."""
    return model.replace(param_dtype=dtype, dtype=dtype)


# ----------------------------------------------------------------------------------------------
# writing configs

def _rope_parameters(t: LlamaConfig) -> dict:
    scaling = t.rope_scaling_dict or {"rope_type": "default"}
    return {"rope_theta": t.rope_theta, **{k: list(v) if isinstance(v, tuple) else v for k, v in scaling.items()}}


def _feature_layer(v: VisionConfig):
    return list(v.feature_layer) if isinstance(v.feature_layer, tuple) else v.feature_layer


def _vision_dict(v: VisionConfig) -> dict:
    return {
        "model_type": "clip_vision_model",
        "hidden_size": v.hidden_size,
        "intermediate_size": v.intermediate_size,
        "num_hidden_layers": v.num_layers,
        "num_attention_heads": v.num_heads,
        "num_channels": v.num_channels,
        "image_size": v.image_size,
        "patch_size": v.patch_size,
        "hidden_act": v.hidden_act,
        "layer_norm_eps": v.layer_norm_eps,
    }


def _llama_dict(t: LlamaConfig, extras: dict) -> dict:
    return {
        "vocab_size": t.vocab_size,
        "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size,
        "num_hidden_layers": t.num_layers,
        "num_attention_heads": t.num_heads,
        "num_key_value_heads": t.num_kv_heads,
        "head_dim": t.head_dim,
        "hidden_act": t.hidden_act,
        "max_position_embeddings": t.max_position_embeddings,
        "rms_norm_eps": t.rms_norm_eps,
        "attention_bias": t.attention_bias,
        "mlp_bias": t.mlp_bias,
        "tie_word_embeddings": t.tie_word_embeddings,
        "initializer_range": t.initializer_range,
        "bos_token_id": extras.get("bos_token_id", LLAMA_DEFAULTS["bos_token_id"]),
        "eos_token_id": extras.get("eos_token_id", LLAMA_DEFAULTS["eos_token_id"]),
    }


def to_hf_llava_config(config: ModelConfig, extras: dict | None = None) -> dict:
    """A transformers 5.x `LlavaConfig` dict (full sub-configs, `rope_parameters`)."""
    extras = extras or {}
    if config.mod.enabled:
        raise ConversionError("a γ-MoD checkpoint has a router HF LLaVA cannot hold; export with --format gamma_mod")
    if config.projector.type != "mlp2x_gelu" or config.projector.hidden_act != "gelu":
        raise ConversionError(f"HF LLaVA has a fixed Linear-GELU-Linear projector; this checkpoint's is "
                              f"{config.projector.type!r}")
    text = {"model_type": "llama", **_llama_dict(config.text, extras), "pad_token_id": config.pad_token_id,
            "rope_parameters": _rope_parameters(config.text)}
    return {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "dtype": config.param_dtype,
        "image_token_index": config.image_token_index,
        "image_seq_length": config.image_seq_length,
        "multimodal_projector_bias": config.projector.bias,
        "projector_hidden_act": config.projector.hidden_act,
        "vision_feature_layer": _feature_layer(config.vision),
        "vision_feature_select_strategy": config.vision.feature_strategy,
        "tie_word_embeddings": config.text.tie_word_embeddings,
        "pad_token_id": config.pad_token_id,
        "text_config": text,
        "vision_config": _vision_dict(config.vision),
    }


def to_gamma_mod_config(config: ModelConfig, extras: dict | None = None) -> dict:
    """A γ-MoD `mod_llava_llama` config: flat 4.31-style Llama fields, `mm_*` fields and `mod`.

    `mm_vision_config` is this project's addition: the original format names the tower only by
    hub id, which cannot describe a non-CLIP-L/336 tower (e.g. tiny test models)."""
    extras = extras or {}
    if not config.mod.enabled:
        raise ConversionError("not a γ-MoD checkpoint (mod disabled); export with --format hf")
    if not config.mod.shared_router:
        raise ConversionError("γ-MoD checkpoints hold one shared router; this checkpoint has per-layer routers")
    if len(config.vision.feature_layers) != 1:
        raise ConversionError("the original LLaVA format selects a single vision feature layer")
    t = config.text
    return {
        "architectures": ["MoDLLaVALlamaForCausalLM"],
        "model_type": "mod_llava_llama",
        **_llama_dict(t, extras),
        "rope_theta": t.rope_theta,
        "rope_scaling": t.rope_scaling_dict,
        "pad_token_id": config.pad_token_id,
        "torch_dtype": config.param_dtype,
        "mm_vision_tower": extras.get("vision_tower_name") or CLIP_L_336_NAME,
        "mm_vision_config": _vision_dict(config.vision),
        "mm_hidden_size": config.vision.hidden_size,
        "mm_projector_type": config.projector.type,
        "mm_vision_select_layer": _feature_layer(config.vision),
        "mm_vision_select_feature": "patch" if config.vision.feature_strategy == "default" else "cls_patch",
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "image_aspect_ratio": "pad",
        "use_mm_proj": True,
        "mod": {
            "mod_enable": True,
            "mod_mode": extras.get("mod_mode") or "custom",
            "mod_layers_idx": list(config.mod.layers),
            "capacity_factor": extras.get("capacity_factor", config.mod.routing_ratio),
            "router_aux_loss_coef": config.mod.router_aux_loss_coef,
        },
    }
