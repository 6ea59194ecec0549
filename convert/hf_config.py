"""`config.json` of HF LLaVA, original LLaVA and γ-MoD checkpoints <-> `gmod_jax.config.ModelConfig`.

Read without transformers: 4.x files are diff-serialised (a sub-config lists only values that
differ from its class defaults), so the defaults of transformers' `LlamaConfig` and
`CLIPVisionConfig` are filled in here. Those defaults are *not* Vicuna's (rms_norm_eps 1e-6,
max_position_embeddings 2048) nor CLIP-L/336's (ViT-B/32 numbers), which is exactly why they must
come from the class defaults and not from a preset.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

from convert import keymap, strict_json
from convert.errors import ConversionError, UnsupportedFormatError, raise_if_any
from convert.keymap import HR_ADAPTERS, HR_FAST, HR_SLOW, MGM_AUX, is_mgm_key, is_multipath_key
from gmod_jax.config import (MAX_INT, PROJECTOR_TYPE, ConfigError, ConvNeXtConfig, LlamaConfig, ModelConfig, MoDConfig,
                             ProjectorConfig, VisionConfig, feature_layer_problem, is_int, is_real, short)

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
KIND_LLAVA_HR = "llava_hr"  # LLaVA-HR: original-LLaVA config + multi-path tower
KIND_GAMMA_MOD_HR = "gamma_mod_hr"  # γ-MoD-LLaVA-HR: mod_llava_llama + multi-path tower
KIND_MGM = "mgm"  # Mini-Gemini: CLIP main tower + open_clip ConvNeXt aux tower + patch info mining
KIND_GAMMA_MOD_MGM = "gamma_mod_mgm"  # γ-MoD-MGM: mod_mgm

# LLaVA-HR's slow tower: what its weights cannot tell comes from the timm entry point in
# `vision_tower_slow` (llava-hr-and-mgm.md §1.4). Only ConvNeXt-L is supported; ConvNeXt-XXL
# (LLaVA-HR-X) is named and refused rather than loaded with the wrong LayerNorm eps.
HR_SLOW_EPS = {"convnext_large_mlp": 1e-6}
HR_SLOW_DEFAULT = "convnext_large_mlp.clip_laion2b_ft_320"  # LLaVA-HR train.py's default
CONVNEXT_XXL = {"depths": (3, 4, 30, 3), "dims": (384, 768, 1536, 3072)}
OPENAI_CLIP_HEAD_DIM = 64  # every OpenAI CLIP ViT (B/32 ... L/14-336): heads = width / 64

# Mini-Gemini's aux tower: the official builder accepts only open_clip's ConvNeXt-L
# (`convnext_large_d_320`, a timm convnext_large: LayerNorm eps 1e-6; llava-hr-and-mgm.md §4.1) and
# requires "convnext" and "large" in the path. Its weights tell everything but the eps.
MGM_AUX_DEFAULT = "openclip-convnext-large-d-320-laion2B-s29B-b131K-ft-soup"
MGM_AUX_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class SourceConfig:
    """A parsed source config: what it is, the ModelConfig it implies, and facts kept for export."""

    kind: str
    model: ModelConfig
    raw: dict
    extras: dict  # capacity_factor, mod_mode, vision tower name, token ids, source dtype


def load_json(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.exists():
        raise ConversionError(f"{path}: config.json not found")
    data = strict_json.load(path)
    if not isinstance(data, dict):
        raise ConversionError(f"{path}: expected a JSON object")
    return data


def detect_kind(raw: dict, keys: Iterable[str] = ()) -> str:
    """Classify a config.json (and the weights' key names, which mark LLaVA-HR's multi-path tower
    when the config lacks `is_multipath_encoder`, and Mini-Gemini's aux tower / projectors); raise
    for known-but-unsupported families (LLaVA-1.6)."""
    model_type = raw.get("model_type")
    keys = list(keys)
    gamma_mod = model_type in ("mod_llava_llama", "mod_mgm") or isinstance(raw.get("mod"), dict)
    if model_type in ("mgm", "mod_mgm") or "mm_vision_tower_aux" in raw or any(map(is_mgm_key, keys)):
        return KIND_GAMMA_MOD_MGM if gamma_mod else KIND_MGM
    if "unpad" in str(raw.get("mm_patch_merge_type", "")) or raw.get("image_aspect_ratio") == "anyres":
        raise UnsupportedFormatError(
            "LLaVA-1.6 any-resolution checkpoints (mm_patch_merge_type *unpad / image_aspect_ratio anyres) are not "
            "supported yet: missing image tiling and the image_newline parameter")
    if raw.get("is_multipath_encoder") is True or "vision_tower_slow" in raw or any(map(is_multipath_key, keys)):
        return KIND_GAMMA_MOD_HR if gamma_mod else KIND_LLAVA_HR
    if gamma_mod:
        return KIND_GAMMA_MOD
    if "mm_vision_tower" in raw or "mm_projector_type" in raw or "mm_hidden_size" in raw:
        return KIND_ORIGINAL
    if model_type == "llava" or "text_config" in raw or "vision_config" in raw:
        return KIND_HF
    raise ConversionError(
        f"unknown config.json (model_type={model_type!r}): expected an HF LlavaConfig (text_config / "
        "vision_config), an original LLaVA config (mm_vision_tower, mm_* fields) or a γ-MoD mod_llava_llama config")


# ----------------------------------------------------------------------------------------------
# typed field reads

class _Fields:
    """Typed reads from one JSON object of a config file.

    A bad value becomes one problem naming the file and the dotted field (`text_config.vocab_size`)
    and the read returns None; the caller carries on, so every problem of the file is reported
    together. Absent and null fields take the given default (diff-serialised 4.x files omit
    defaults). Bools never pass as numbers, floats never as integers.
    """

    def __init__(self, data: dict, where: str, prefix: str = "", problems: list[str] | None = None):
        self.data, self.where, self.prefix = data, where, prefix
        self.problems: list[str] = [] if problems is None else problems

    def fail(self, name: str, message: str):
        self.problems.append(f"{self.where}: {self.prefix}{name} {message}")

    def raw(self, name: str, default=None):
        value = self.data.get(name)
        return default if value is None else value

    def section(self, name: str) -> "_Fields | None":
        """A nested object (None when absent or null; a problem when it is not an object)."""
        value = self.data.get(name)
        if value is None:
            return None
        if not isinstance(value, dict):
            self.fail(name, f"must be an object, got {short(value)}")
            return None
        return _Fields(value, self.where, f"{self.prefix}{name}.", self.problems)

    def int(self, name: str, default=None, lo: int = 1, hi: int = MAX_INT):
        value = self.raw(name, default)
        if value is None:
            return None
        if not is_int(value) or not lo <= value <= hi:
            self.fail(name, f"must be an integer in [{lo}, {hi}], got {short(value)}")
            return None
        return int(value)

    def float(self, name: str, default=None, positive: bool = True):
        value = self.raw(name, default)
        if not is_real(value) or not math.isfinite(value) or (value <= 0 if positive else value < 0):
            self.fail(name, f"must be a finite number {'>' if positive else '>='} 0, got {short(value)}")
            return None
        return float(value)

    def bool(self, name: str, default: bool):
        value = self.raw(name, default)
        if not isinstance(value, bool):
            self.fail(name, f"must be true or false, got {short(value)}")
            return None
        return value

    def str(self, name: str, default: str | None = None, choices: tuple[str, ...] | None = None):
        value = self.raw(name, default)
        if not isinstance(value, str) or (choices is not None and value not in choices):
            expected = f"one of {', '.join(choices)}" if choices else "a string"
            self.fail(name, f"must be {expected}, got {short(value)}")
            return None
        return value

    def token_ids(self, name: str, default=None):
        """bos / eos ids: an id, a list of ids (5.x generation configs), or null."""
        value = self.raw(name, default)
        ids = value if isinstance(value, list) else [value]
        if value is not None and not all(is_int(i) and 0 <= i <= MAX_INT for i in ids):
            self.fail(name, f"must be a token id or a list of them, got {short(value)}")
            return None
        return value

    def feature_layer(self, name: str, default, num_layers: int | None):
        value = self.raw(name, default)
        problem = feature_layer_problem(value, num_layers if num_layers is not None else MAX_INT,
                                        f"{self.where}: {self.prefix}{name}")
        if problem:
            self.problems.append(problem)
            return None
        return tuple(value) if isinstance(value, list) else value

    def build(self, klass, names: dict[str, str] | None = None, **kwargs):
        """klass(**kwargs) with its validation problems (gmod_jax.config.ConfigError) collected,
        the project's field names (`text.num_heads`) spelled as this file's (`names`); None if a
        field read already failed (that problem is reported instead)."""
        if any(v is None for k, v in kwargs.items() if k not in _OPTIONAL_FIELDS):
            return None
        try:
            return klass(**kwargs)
        except ConfigError as e:
            names = names or {}
            self.problems.extend(f"{self.where}: " + _PROJECT_FIELD.sub(lambda m: names.get(m.group(0), m.group(0)), p)
                                 for p in e.problems)
            return None

    def names(self, section: str, klass, renames: dict[str, str]) -> dict[str, str]:
        """`section.field` of the project's config -> this file's dotted name of that field."""
        return {f"{section}.{f.name}": self.prefix + renames.get(f.name, f.name) for f in dataclasses.fields(klass)}


_OPTIONAL_FIELDS = ("head_dim", "rope_scaling", "pad_token_id", "tokenizer_model_max_length")
_PROJECT_FIELD = re.compile(r"\b(?:text|vision|mod|projector|config)\.[a-z_]+")
_LAYER_FIELDS = {"num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
                 "num_kv_heads": "num_key_value_heads"}


def _raise_problems(problems: list[str], where: str):
    raise_if_any(problems, title=f"{where}: invalid config" if len(problems) > 1 else "")


# ----------------------------------------------------------------------------------------------
# pieces

def _rope(text: _Fields) -> tuple[float | None, dict | None]:
    """(rope_theta, rope scaling dict incl. rope_type or None) from 4.x or 5.x Llama fields."""
    params = text.section("rope_parameters")
    if params is not None:
        scaling = {k: v for k, v in params.data.items() if k != "rope_theta"}
        theta = params.float("rope_theta", text.raw("rope_theta", LLAMA_DEFAULTS["rope_theta"]))
    else:
        theta = text.float("rope_theta", LLAMA_DEFAULTS["rope_theta"])
        section = text.section("rope_scaling")
        scaling = dict(section.data) if section is not None else {}
    if "type" in scaling:  # 4.x spelling
        scaling.setdefault("rope_type", scaling.pop("type"))
    if not scaling or scaling.get("rope_type", "default") == "default":
        return theta, None
    if "rope_type" not in scaling:
        text.fail("rope_scaling", f"has no rope_type: {short(scaling)}")
    return theta, scaling


def _llama(text: _Fields, nested: bool = True) -> LlamaConfig | None:
    """`nested`: an HF text_config (whose model_type names the LLM); flat original-LLaVA configs
    carry the multimodal model_type instead and are always Llama."""
    model_type = text.raw("model_type", "llama") if nested else "llama"
    if model_type != "llama":
        raise UnsupportedFormatError(f"{text.where}: text model_type {short(model_type)} is not supported (only llama)")
    act = text.str("hidden_act", LLAMA_DEFAULTS["hidden_act"])
    if act is not None and act != "silu":
        raise UnsupportedFormatError(f"{text.where}: hidden_act {short(act)} is not supported (only silu)")
    theta, scaling = _rope(text)
    heads = text.int("num_attention_heads", LLAMA_DEFAULTS["num_attention_heads"])
    rope_field = "rope_parameters" if text.data.get("rope_parameters") is not None else "rope_scaling"
    return text.build(
        LlamaConfig, text.names("text", LlamaConfig, {**_LAYER_FIELDS, "rope_scaling": rope_field}),
        vocab_size=text.int("vocab_size", LLAMA_DEFAULTS["vocab_size"]),
        hidden_size=text.int("hidden_size", LLAMA_DEFAULTS["hidden_size"]),
        intermediate_size=text.int("intermediate_size", LLAMA_DEFAULTS["intermediate_size"]),
        num_layers=text.int("num_hidden_layers", LLAMA_DEFAULTS["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=text.int("num_key_value_heads", heads),
        head_dim=text.int("head_dim"),
        rms_norm_eps=text.float("rms_norm_eps", LLAMA_DEFAULTS["rms_norm_eps"]),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=text.int("max_position_embeddings", LLAMA_DEFAULTS["max_position_embeddings"]),
        attention_bias=text.bool("attention_bias", LLAMA_DEFAULTS["attention_bias"]),
        mlp_bias=text.bool("mlp_bias", LLAMA_DEFAULTS["mlp_bias"]),
        tie_word_embeddings=text.bool("tie_word_embeddings", LLAMA_DEFAULTS["tie_word_embeddings"]),
        hidden_act=act,
        initializer_range=text.float("initializer_range", LLAMA_DEFAULTS["initializer_range"]),
    )


def _vision_tower(v: _Fields | None, defaults: dict, fallback: _Fields, invalid: bool = False):
    """(fields, num_layers) of a CLIP vision config, all defaults when `v` is None; (None, None)
    when `invalid` (the section exists but is not an object, which `section` reported)."""
    if v is None and invalid:
        return None, None
    fields = v if v is not None else _Fields({}, fallback.where, "vision_config.", fallback.problems)
    model_type = fields.raw("model_type", "clip_vision_model")
    if model_type not in ("clip_vision_model", "clip"):
        raise UnsupportedFormatError(f"{fields.where}: vision tower model_type {short(model_type)} is not supported "
                                     "(only CLIP ViT)")
    act = fields.raw("hidden_act", defaults["hidden_act"])  # a non-string is reported by `_vision`
    if isinstance(act, str) and act not in ("quick_gelu", "gelu"):
        raise UnsupportedFormatError(f"{fields.where}: vision hidden_act {short(act)} is not supported")
    return fields, fields.int("num_hidden_layers", defaults["num_hidden_layers"])


def _vision(fields: _Fields | None, defaults: dict, num_layers, feature_layer, strategy) -> VisionConfig | None:
    if fields is None:  # the vision section is not an object (reported)
        return None
    return fields.build(
        VisionConfig, fields.names("vision", VisionConfig, _LAYER_FIELDS),
        hidden_size=fields.int("hidden_size", defaults["hidden_size"]),
        intermediate_size=fields.int("intermediate_size", defaults["intermediate_size"]),
        num_layers=num_layers,
        num_heads=fields.int("num_attention_heads", defaults["num_attention_heads"]),
        image_size=fields.int("image_size", defaults["image_size"]),
        patch_size=fields.int("patch_size", defaults["patch_size"]),
        num_channels=fields.int("num_channels", defaults["num_channels"]),
        layer_norm_eps=fields.float("layer_norm_eps", defaults["layer_norm_eps"]),
        hidden_act=fields.str("hidden_act", defaults["hidden_act"]),
        feature_layer=feature_layer,
        feature_strategy=strategy,
    )


def _pad_token_id(f: _Fields, name: str, default, vocab_size: int | None):
    """null, or an id inside the vocabulary; -1 is the old Llama "no pad token" marker."""
    value = f.raw(name, default)
    if value == -1 and is_int(value):
        return None
    return f.int(name, default, lo=0, hi=(vocab_size or MAX_INT + 1) - 1)


def _source_dtype(*dicts: dict) -> str | None:
    for d in dicts:
        for key in ("dtype", "torch_dtype"):
            if isinstance(d.get(key), str):
                return d[key]
    return None


# ----------------------------------------------------------------------------------------------
# readers per kind

def hf_llava_config(raw: dict, where: str = "config.json") -> SourceConfig:
    root = _Fields(raw, where)
    text = root.section("text_config") or _Fields({}, where, "text_config.", root.problems)
    if "vocab_size" not in text.data and "vocab_size" in raw:  # some 4.x files kept vocab_size at the top
        text = _Fields({**text.data, "vocab_size": raw["vocab_size"]}, where, "text_config.", root.problems)
    llama = _llama(text)
    vision_section = root.section("vision_config")
    defaults = CLIP_VISION_DEFAULTS if raw.get("vision_config") is not None else CLIP_L_336
    v, depth = _vision_tower(vision_section, defaults, root, invalid=raw.get("vision_config") is not None)
    strategy = root.str("vision_feature_select_strategy", "default", ("default", "full"))
    feature_layer = root.feature_layer("vision_feature_layer", -2, depth)
    vision = _vision(v, defaults, depth, feature_layer, strategy)
    act = root.str("projector_hidden_act", "gelu")
    if act is not None and act != "gelu":
        raise UnsupportedFormatError(f"{where}: projector_hidden_act {short(act)} is not supported (only gelu)")
    projector = root.build(ProjectorConfig, type="mlp2x_gelu", bias=root.bool("multimodal_projector_bias", True),
                           hidden_act=act)
    token_field = "image_token_index" if raw.get("image_token_index") is not None else "image_token_id"
    image_token = root.int(token_field, 32000, lo=-MAX_INT)
    vocab = llama.vocab_size if llama else None
    if "pad_token_id" in raw:
        pad = _pad_token_id(root, "pad_token_id", None, vocab)
    else:
        pad = _pad_token_id(text, "pad_token_id", None, vocab)
    extras = {
        "bos_token_id": text.token_ids("bos_token_id", LLAMA_DEFAULTS["bos_token_id"]),
        "eos_token_id": text.token_ids("eos_token_id", LLAMA_DEFAULTS["eos_token_id"]),
        "source_dtype": _source_dtype(raw, text.data),
        "image_seq_length": root.int("image_seq_length"),
    }
    _raise_problems(root.problems, where)
    model = _model_config(root, vision, projector, llama, MoDConfig(), image_token, pad)
    return SourceConfig(KIND_HF, model, raw, extras)


def _flat_llama(root: _Fields) -> tuple[LlamaConfig | None, str | None]:
    """The Llama and the vision tower's name of a flat (original-LLaVA style) config."""
    tower_name = root.raw("mm_vision_tower") or root.raw("vision_tower")
    if tower_name is not None and not isinstance(tower_name, str):
        root.fail("mm_vision_tower", f"must be a string, got {short(tower_name)}")
        tower_name = None
    return _llama(root, nested=False), tower_name


def original_llava_config(raw: dict, vision_tower_dir: str | os.PathLike | None = None,
                          where: str = "config.json") -> SourceConfig:
    """Flat LlamaConfig + `mm_*` fields (liuhaotian LLaVA, and γ-MoD's mod_llava_llama)."""
    kind = detect_kind(raw)
    root = _Fields(raw, where)
    llama, tower_name = _flat_llama(root)
    v, depth, defaults = _clip_fields(root, tower_name, vision_tower_dir)
    strategies = {"patch": "default", "cls_patch": "full"}
    select = root.str("mm_vision_select_feature", "patch", tuple(strategies))
    feature_layer = root.feature_layer("mm_vision_select_layer", -1, depth)
    vision = _vision(v, defaults, depth, feature_layer, strategies.get(select))
    return _original_model(root, kind, llama, vision, {"vision_tower_name": tower_name})


def _clip_fields(root: _Fields, tower_name: str | None, vision_tower_dir) -> tuple[_Fields | None, int | None, dict]:
    """(fields, num_layers, defaults) of the CLIP tower of a flat config whose weights do not hold
    it: the --vision-tower directory's config.json, else `mm_vision_config`, else CLIP-L/336 by
    name."""
    where = root.where
    defaults = CLIP_VISION_DEFAULTS
    if vision_tower_dir is not None:
        tower_path = Path(vision_tower_dir) / "config.json"
        tower_cfg = _Fields(load_json(tower_path), str(tower_path), "", root.problems)
        # A full CLIPModel config nests the tower; a CLIPVisionModel config is the tower itself.
        nested = tower_cfg.raw("model_type") == "clip" or "vision_config" in tower_cfg.data
        section = tower_cfg.section("vision_config") if nested else tower_cfg
        v, depth = _vision_tower(section, defaults, tower_cfg, invalid=tower_cfg.raw("vision_config") is not None)
    elif root.data.get("mm_vision_config") is not None:  # written by convert.to_hf --format gamma_mod
        v, depth = _vision_tower(root.section("mm_vision_config"), defaults, root, invalid=True)
    elif tower_name is None or tower_name.rstrip("/").endswith("clip-vit-large-patch14-336"):
        defaults = CLIP_L_336
        v, depth = _Fields({}, where, "mm_vision_config.", root.problems), CLIP_L_336["num_hidden_layers"]
    else:
        raise ConversionError(
            f"{where}: vision tower {short(tower_name)} is not CLIP-L/336; pass --vision-tower DIR (a CLIP checkpoint "
            "directory with its config.json) so its shape is known")
    return v, depth, defaults


def _original_model(root: _Fields, kind: str, llama, vision, extras: dict, model_kw: dict | None = None,
                    mod_kw: dict | None = None) -> SourceConfig:
    """The fields original LLaVA, γ-MoD and LLaVA-HR configs share: projector, `mod`, token ids;
    every problem of the file is raised together."""
    projector_type = root.str("mm_projector_type", "linear")
    if projector_type not in (None, "linear") and not PROJECTOR_TYPE.match(projector_type):
        raise UnsupportedFormatError(f"{root.where}: unknown projector type {short(projector_type)} (expected "
                                     "'linear' or 'mlpNx_gelu')")
    projector = root.build(ProjectorConfig, {"projector.type": "mm_projector_type"}, type=projector_type, bias=True,
                           hidden_act="gelu")
    mm_hidden = root.int("mm_hidden_size")
    if mm_hidden is not None and vision is not None and mm_hidden != vision.feature_dim:
        root.fail("mm_hidden_size", f"{mm_hidden} contradicts the vision tower's hidden size {vision.hidden_size}")
    mod = MoDConfig()
    extras = {
        **extras,
        "bos_token_id": root.token_ids("bos_token_id", LLAMA_DEFAULTS["bos_token_id"]),
        "eos_token_id": root.token_ids("eos_token_id", LLAMA_DEFAULTS["eos_token_id"]),
        "source_dtype": _source_dtype(root.data),
    }
    mod_section = root.section("mod")
    if kind in (KIND_GAMMA_MOD, KIND_GAMMA_MOD_HR, KIND_GAMMA_MOD_MGM) and llama is not None and (
            mod_section is not None or root.data.get("mod") is None):
        mod, mod_extras = _mod(mod_section or _Fields({}, root.where, "mod.", root.problems), llama.num_layers,
                               **(mod_kw or {}))
        extras.update(mod_extras)
    pad = _pad_token_id(root, "pad_token_id", None, llama.vocab_size if llama else None)
    _raise_problems(root.problems, root.where)
    model = _model_config(root, vision, projector, llama, mod, ORIGINAL_IMAGE_TOKEN_INDEX, pad, **(model_kw or {}))
    return SourceConfig(kind, model, root.data, extras)


def llava_hr_config(raw: dict, shapes: Mapping[str, tuple[int, ...]], where: str = "config.json") -> SourceConfig:
    """LLaVA-HR / γ-MoD-LLaVA-HR: an original-LLaVA config with `is_multipath_encoder`,
    `vision_tower_slow`, `input_image_size` and `freeze_vision`.

    The towers' geometry (widths, depths, layer counts, patch and grid sizes) is read from the
    weights' shapes and key names (`shapes`: on-disk key -> shape, headers only), so a checkpoint
    of any size converts; `mm_vision_config` (this project's addition, written by the exporter)
    overrides the CLIP fields it gives and build_plan then checks them against the shapes. Only
    what shapes cannot tell comes from the towers' names: the CLIP's head count (OpenAI CLIP heads
    are 64 wide), LayerNorm eps and activation, the ConvNeXt's LayerNorm eps."""
    kind = detect_kind(raw, shapes)
    root = _Fields(raw, where)
    llama, tower_name = _flat_llama(root)
    defaults = _hr_fast_geometry(shapes, root)
    section = root.section("mm_vision_config")
    if section is None and tower_name is not None and "clip" not in tower_name.lower():
        raise UnsupportedFormatError(f"{where}: LLaVA-HR fast tower {short(tower_name)} is not an OpenAI CLIP ViT; "
                                     "give its shape in mm_vision_config")
    fields = depth = None
    if defaults is not None:
        fields, depth = _vision_tower(section, defaults, root, invalid=root.data.get("mm_vision_config") is not None)
        if defaults["num_attention_heads"] is None and (fields is None or fields.raw("num_attention_heads") is None):
            root.fail("mm_vision_config.num_attention_heads",
                      f"is needed: a {defaults['hidden_size']}-wide CLIP is not OpenAI's ({OPENAI_CLIP_HEAD_DIM}-wide "
                      "heads), and the weights do not tell the head count")
    slow_name = root.str("vision_tower_slow", HR_SLOW_DEFAULT)
    slow = _hr_slow_trunk(shapes, slow_name, root)
    if root.data.get("freeze_vision") is None:  # stage-1 towers have no adapters
        adapters = any(k.startswith(HR_ADAPTERS) for k in shapes)
    else:
        frozen = root.bool("freeze_vision", True)
        adapters = None if frozen is None else not frozen
    size = root.int("input_image_size")
    if root.data.get("input_image_size") is None:
        root.fail("input_image_size", "is missing (LLaVA-HR's input side S, e.g. 1024)")
    vision = None
    if None not in (fields, slow, adapters, size, depth):
        base = _vision(fields, defaults, depth, -2, "default")
        if base is not None:
            try:
                vision = dataclasses.replace(base, tower="multipath", slow=slow, input_image_size=size,
                                             latent_adapters=adapters)
            except ValueError as e:  # ConfigError included: the multi-path geometry's own checks
                root.problems.append(f"{where}: {str(e).replace('vision.input_image_size', 'input_image_size')}")
    extras = {"vision_tower_name": tower_name, "vision_tower_slow": slow_name}
    return _original_model(root, kind, llama, vision, extras)




def _shape_of(shapes: Mapping[str, tuple[int, ...]], key: str, rank: int, root: _Fields):
    """The shape of `key` (needed to read a tower's geometry), or None with a problem."""
    shape = shapes.get(key)
    if shape is None:
        root.problems.append(f"missing key {key} (the tower's geometry is read from it)")
    elif len(shape) != rank or not all(shape):
        root.problems.append(f"{key}: shape {list(shape)} is not a rank-{rank} tensor of a vision tower")
        shape = None
    return shape


def _hr_fast_geometry(shapes, root: _Fields, prefix: str = HR_FAST) -> dict | None:
    """CLIP fields (CLIPVisionConfig names) read off the weights under `prefix` (LLaVA-HR's fast
    path, Mini-Gemini's main tower)."""
    patch = _shape_of(shapes, prefix + "embeddings.patch_embedding.weight", 4, root)  # [d, c, p, p]
    pos = _shape_of(shapes, prefix + "embeddings.position_embedding.weight", 2, root)  # [grid² + 1, d]
    fc1 = _shape_of(shapes, prefix + "encoder.layers.0.mlp.fc1.weight", 2, root)  # [f, d]
    layer_re = re.compile(re.escape(prefix) + r"encoder\.layers\.(\d+)\.")
    layers = {int(m.group(1)) for m in map(layer_re.match, shapes) if m}
    if patch is None or pos is None or fc1 is None:
        return None
    grid = math.isqrt(pos[0] - 1)
    if grid * grid != pos[0] - 1:
        root.problems.append(f"{prefix}embeddings.position_embedding.weight: {pos[0]} rows is not 1 + a square grid")
        return None
    width = patch[0]
    return {
        "hidden_size": width, "intermediate_size": fc1[0], "num_hidden_layers": max(layers) + 1,
        "num_attention_heads": width // OPENAI_CLIP_HEAD_DIM if width % OPENAI_CLIP_HEAD_DIM == 0 else None,
        "num_channels": patch[1], "image_size": grid * patch[2], "patch_size": patch[2],
        "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
    }


def _trunk_geometry(shapes, stages: str, stem: str, layer_scale: str, root: _Fields, what: str) -> dict | None:
    """A timm ConvNeXt trunk's geometry read off its weights' key names and shapes: `stages` and
    `stem` are the on-disk prefixes of `stages.S.blocks.B.*` and `stem.{0,1}.*`."""
    block_re = re.compile(re.escape(stages) + r"(\d+)\.blocks\.(\d+)\.")
    blocks: dict[int, int] = {}
    for m in map(block_re.match, shapes):
        if m:
            stage, block = int(m.group(1)), int(m.group(2))
            blocks[stage] = max(blocks.get(stage, 0), block + 1)
    if not blocks:
        root.problems.append(f"the weights hold no {what} blocks ({stages}S.blocks.B.*)")
        return None
    if max(blocks) >= len(shapes):  # a stray index: the stage list would grow with it, not the file
        root.problems.append(f"{stages}{max(blocks)}: stage index beyond the {len(shapes)} tensors held")
        return None
    depths = tuple(blocks.get(i, 0) for i in range(max(blocks) + 1))
    stem_w = _shape_of(shapes, stem + "0.weight", 4, root)  # [dims[0], c, p, p]
    norms = [_shape_of(shapes, f"{stages}{i}.blocks.0.norm.weight", 1, root) for i in range(len(depths))]
    dw = _shape_of(shapes, stages + "0.blocks.0.conv_dw.weight", 4, root)  # [C, 1, k, k]
    fc1 = _shape_of(shapes, stages + "0.blocks.0.mlp.fc1.weight", 2, root)  # [ratio·C, C]
    if stem_w is None or dw is None or fc1 is None or None in norms:
        return None
    dims = tuple(n[0] for n in norms)
    if fc1[0] % dims[0]:
        root.problems.append(f"{stages}0.blocks.0.mlp.fc1.weight: {fc1[0]} rows are not a multiple of the "
                             f"stage width {dims[0]}")
        return None
    return {"depths": depths, "dims": dims, "patch_size": stem_w[2], "kernel_size": dw[2],
            "mlp_ratio": fc1[0] // dims[0], "layer_scale": f"{stages}0.blocks.0.{layer_scale}" in shapes}


def _is_xxl(name: str | None, geometry: dict) -> bool:
    return ("xxlarge" in (name or "").lower() or geometry["depths"] == CONVNEXT_XXL["depths"]
            or geometry["dims"] == CONVNEXT_XXL["dims"])


def _convnext(geometry: dict, eps: float, root: _Fields, what: str) -> ConvNeXtConfig | None:
    try:
        return ConvNeXtConfig(**geometry, norm_eps=eps)
    except ConfigError as e:
        root.problems.extend(f"{root.where}: {what} read from the weights: {p}" for p in e.problems)
        return None


def _hr_slow_trunk(shapes, name: str | None, root: _Fields) -> ConvNeXtConfig | None:
    """The ConvNeXt slow trunk read off the weights; its LayerNorm eps from the timm entry point
    named in `vision_tower_slow`."""
    geometry = _trunk_geometry(shapes, HR_SLOW + "stages.", HR_SLOW + "stem.", "weight", root,
                               "ConvNeXt slow tower")
    if geometry is None:
        return None
    family = None if name is None else name.rstrip("/").rsplit("/", 1)[-1].split(".")[0]
    if _is_xxl(family, geometry):
        raise UnsupportedFormatError(
            f"{root.where}: the slow tower is ConvNeXt-XXL (convnext_xxlarge, LLaVA-HR-X: depths (3, 4, 30, 3), dims "
            f"(384, 768, 1536, 3072), LayerNorm eps 1e-5; this checkpoint: vision_tower_slow {short(name)}, depths "
            f"{list(geometry['depths'])}, dims {list(geometry['dims'])}), which is not supported: only LLaVA-HR's "
            "ConvNeXt-L slow tower (convnext_large_mlp, LayerNorm eps 1e-6) is")
    if family not in HR_SLOW_EPS:
        raise UnsupportedFormatError(
            f"{root.where}: vision_tower_slow {short(name)} is not supported (known: {', '.join(HR_SLOW_EPS)}); its "
            "LayerNorm eps cannot be read from the weights")
    return _convnext(geometry, HR_SLOW_EPS[family], root, "ConvNeXt slow tower")


def mgm_aux_supported(name: str) -> bool:
    """Whether `mm_vision_tower_aux` names the open_clip ConvNeXt-L the official builder loads."""
    base = name.rstrip("/").rsplit("/", 1)[-1].lower()
    return "convnext" in base and "large" in base and "xxlarge" not in base


def _mgm_aux_trunk(shapes, name: str, root: _Fields) -> ConvNeXtConfig | None:
    """Mini-Gemini's aux ConvNeXt read off the weights (`shapes` under the checkpoint's names,
    model.vision_tower_aux.*); its LayerNorm eps from `mm_vision_tower_aux`, which must name
    open_clip's ConvNeXt-L (the only aux tower the official code builds)."""
    geometry = _trunk_geometry(shapes, MGM_AUX + "vision_stages.", MGM_AUX + "vision_stem.", "gamma", root,
                               "Mini-Gemini aux ConvNeXt")
    if geometry is not None and _is_xxl(name, geometry) or not mgm_aux_supported(name):
        seen = "" if geometry is None else f", depths {list(geometry['depths'])}, dims {list(geometry['dims'])}"
        raise UnsupportedFormatError(
            f"{root.where}: mm_vision_tower_aux {short(name)}{seen} is not supported: only open_clip's ConvNeXt-L "
            "(convnext_large_d_320, LayerNorm eps 1e-6; the name must contain 'convnext' and 'large') is, as in the "
            "official Mini-Gemini code; ConvNeXt-XXL (depths (3, 4, 30, 3), dims (384, 768, 1536, 3072)) is not")
    if geometry is None:
        return None
    return _convnext(geometry, MGM_AUX_EPS, root, "Mini-Gemini aux ConvNeXt")


def _mod(mod: _Fields, num_layers: int, **mod_kw) -> tuple[MoDConfig, dict]:
    """γ-MoD's `mod` dict. `capacity_factor` is recorded but not applied: the official code ignores
    it (its routing ratio is a hard-coded 0.5, which is MoDConfig's default)."""
    capacity = mod.raw("capacity_factor")
    if capacity is not None:
        capacity = mod.float("capacity_factor")
    extras = {"capacity_factor": capacity, "mod_mode": mod.str("mod_mode") if mod.raw("mod_mode") else None}
    if not mod.bool("mod_enable", True):
        return MoDConfig(), extras
    layers = mod.raw("mod_layers_idx")
    if not isinstance(layers, list) or not layers or not all(is_int(i) for i in layers):
        mod.fail("mod_layers_idx", f"must be the resolved list of MoD layer indices, got {short(layers)}")
        return MoDConfig(), extras
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        mod.fail("mod_layers_idx", f"{short(bad)} outside 0..{num_layers - 1}")
        return MoDConfig(), extras
    coef = mod.float("router_aux_loss_coef", 0.01, positive=False)
    config = mod.build(MoDConfig, {**mod.names("mod", MoDConfig, {}), "mod.layers": "mod.mod_layers_idx"}, enabled=True,
                       layers=tuple(sorted(set(layers))), router_aux_loss_coef=coef, **mod_kw)
    return config or MoDConfig(), extras


def _model_config(root: _Fields, vision, projector, llama, mod, image_token, pad, **model_kw) -> ModelConfig:
    names = {**root.names("config", ModelConfig, {}), "mod.layers": "mod.mod_layers_idx"}
    model = root.build(ModelConfig, names, vision=vision, projector=projector, text=llama, mod=mod,
                       image_token_index=image_token, pad_token_id=pad, **model_kw)
    _raise_problems(root.problems, root.where)
    return model


def read_source_config(src_dir: str | os.PathLike, vision_tower_dir: str | os.PathLike | None = None,
                       shapes: Mapping[str, tuple[int, ...]] | None = None,
                       aux_shapes: Mapping[str, tuple[int, ...]] | None = None,
                       vision_tower_aux: str | os.PathLike | None = None) -> SourceConfig:
    """Parse `<src_dir>/config.json` of any supported kind; `shapes` (on-disk key -> shape of the
    weights) is where LLaVA-HR's and Mini-Gemini's tower geometry is read, `aux_shapes` those of
    a --vision-tower-aux checkpoint under Mini-Gemini's names (`vision_tower_aux` is its path,
    only accepted for Mini-Gemini)."""
    path = Path(src_dir) / "config.json"
    raw = load_json(path)
    shapes = shapes or {}
    kind = detect_kind(raw, shapes)
    if kind in (KIND_HF, KIND_LLAVA_HR, KIND_GAMMA_MOD_HR) and vision_tower_dir is not None:
        raise ConversionError("--vision-tower is only for original-LLaVA / γ-MoD / Mini-Gemini checkpoints without a "
                              "tower; an HF LLaVA or LLaVA-HR checkpoint carries its own vision tower")
    if kind not in (KIND_MGM, KIND_GAMMA_MOD_MGM) and vision_tower_aux is not None:
        raise ConversionError(f"--vision-tower-aux is only for Mini-Gemini (mgm / mod_mgm) checkpoints; {path} is "
                              f"a {kind} config")
    if kind == KIND_HF:
        return hf_llava_config(raw, str(path))
    if kind in (KIND_LLAVA_HR, KIND_GAMMA_MOD_HR):
        return llava_hr_config(raw, shapes, str(path))
    if kind in (KIND_MGM, KIND_GAMMA_MOD_MGM):
        return mgm_config(raw, shapes, str(path), vision_tower_dir, aux_shapes)
    return original_llava_config(raw, vision_tower_dir, str(path))


def mgm_config(raw: dict, shapes: Mapping[str, tuple[int, ...]], where: str = "config.json",
               vision_tower_dir: str | os.PathLike | None = None,
               aux_shapes: Mapping[str, tuple[int, ...]] | None = None) -> SourceConfig:
    """Mini-Gemini (`mgm`) / γ-MoD-MGM (`mod_mgm`): an original-LLaVA config with
    `mm_vision_tower_aux`, `mm_hidden_size_aux`, `image_size_aux`, `image_grid`, `image_global` and
    `tokenizer_model_max_length` (llava-hr-and-mgm.md §4.4).

    The CLIP main tower's geometry is read from the weights when the checkpoint holds it
    (`mm_vision_config`, this project's addition, overrides what it gives, as for LLaVA-HR), else
    from the --vision-tower directory's config.json (without either, the tower is missing: named
    with the flag that supplies it). The aux ConvNeXt's geometry is read from the weights, the checkpoint's
    (model.vision_tower_aux.*) or else --vision-tower-aux's (`aux_shapes`, renamed to the
    checkpoint's keys); only its LayerNorm eps comes from the aux tower's name."""
    kind = detect_kind(raw, shapes)
    root = _Fields(raw, where)
    llama, tower_name = _flat_llama(root)
    clip_prefix = keymap.MGM_CLIP
    clip_in_checkpoint = any(k.startswith(clip_prefix) for k in shapes)
    if vision_tower_dir is None and not clip_in_checkpoint:
        # Its weights must come from --vision-tower anyway, whose config.json then gives its shape.
        root.problems.append(keymap.NO_CLIP_TOWER)
        fields = depth = defaults = None
    elif vision_tower_dir is None:
        defaults = _hr_fast_geometry(shapes, root, clip_prefix)
        fields = depth = None
        if defaults is not None:
            fields, depth = _vision_tower(root.section("mm_vision_config"), defaults, root,
                                          invalid=root.data.get("mm_vision_config") is not None)
            if defaults["num_attention_heads"] is None and (fields is None or
                                                            fields.raw("num_attention_heads") is None):
                root.fail("mm_vision_config.num_attention_heads",
                          f"is needed: a {defaults['hidden_size']}-wide CLIP is not OpenAI's ({OPENAI_CLIP_HEAD_DIM}-"
                          "wide heads), and the weights do not tell the head count")
    else:
        fields, depth, defaults = _clip_fields(root, tower_name, vision_tower_dir)
    feature_layer = root.feature_layer("mm_vision_select_layer", -2, depth)
    select = root.str("mm_vision_select_feature", "patch", ("patch",))  # MGM drops CLS
    aux_name = root.str("mm_vision_tower_aux", MGM_AUX_DEFAULT)
    aux_in_checkpoint = any(k.startswith(MGM_AUX) for k in shapes)
    aux_source = shapes if aux_in_checkpoint else (aux_shapes or {})
    aux = None
    if aux_name is not None:
        if any(k.startswith(MGM_AUX) for k in aux_source):
            aux = _mgm_aux_trunk(aux_source, aux_name, root)
        else:
            if not mgm_aux_supported(aux_name):
                _mgm_aux_trunk({}, aux_name, root)  # raises, naming it
            root.problems.append(keymap.NO_AUX_TOWER)
    grid = root.int("image_grid", 1)
    image_global = root.bool("image_global", False)
    size_aux = root.int("image_size_aux")
    if root.data.get("image_size_aux") is None:
        root.fail("image_size_aux", "is missing (Mini-Gemini's aux image side, e.g. 1536 for HD, 768 otherwise)")
    hidden_aux = root.int("mm_hidden_size_aux")
    if hidden_aux is not None and aux is not None and hidden_aux != sum(aux.dims):
        root.fail("mm_hidden_size_aux", f"{hidden_aux} contradicts the aux tower's stage widths {list(aux.dims)} "
                                        f"(sum {sum(aux.dims)})")
    max_length = root.int("tokenizer_model_max_length") if root.data.get("tokenizer_model_max_length") is not None \
        else None
    vision = None
    if None not in (fields, depth, aux, grid, image_global, size_aux, select):
        base = _vision(fields, defaults, depth, feature_layer, "default")
        if base is not None:
            try:
                vision = dataclasses.replace(base, tower="mgm", aux=aux, image_size_aux=size_aux, image_grid=grid,
                                             image_global=image_global)
            except ValueError as e:  # ConfigError included: Mini-Gemini's geometry checks
                root.problems.append(f"{where}: {str(e).replace('vision.', '')}")
    extras = {"vision_tower_name": tower_name, "vision_tower_aux": aux_name,
              "tokenizer_padding_side": root.raw("tokenizer_padding_side")}
    return _original_model(root, kind, llama, vision, extras, {"tokenizer_model_max_length": max_length},
                           {"router_init": "xavier_uniform"})  # the MGM code's router init (§4.5)


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


def _check_tower(config: ModelConfig):
    """The LLaVA-1.5 formats hold a CLIP tower only."""
    if config.vision.tower == "multipath":
        raise ConversionError("a LLaVA-HR checkpoint (multi-path vision tower) exports with --format "
                              f"{'gamma_mod_hr' if config.mod.enabled else 'llava_hr'}")
    if config.vision.tower == "mgm":
        raise ConversionError("a Mini-Gemini checkpoint (CLIP + ConvNeXt aux tower) exports with --format "
                              f"{'gamma_mod_mgm' if config.mod.enabled else 'mgm'}")
    if config.vision.tower != "clip":
        raise ConversionError(f"vision tower {config.vision.tower!r} has no export format yet")


def to_hf_llava_config(config: ModelConfig, extras: dict | None = None) -> dict:
    """A transformers 5.x `LlavaConfig` dict (full sub-configs, `rope_parameters`)."""
    extras = extras or {}
    _check_tower(config)
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
    _check_tower(config)
    _check_gamma_mod(config, "gamma_mod")
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
        "mod": _mod_dict(config, extras),
    }


def _mod_dict(config: ModelConfig, extras: dict) -> dict:
    return {
        "mod_enable": True,
        "mod_mode": extras.get("mod_mode") or "custom",
        "mod_layers_idx": list(config.mod.layers),
        "capacity_factor": extras.get("capacity_factor", config.mod.routing_ratio),
        "router_aux_loss_coef": config.mod.router_aux_loss_coef,
    }


def _check_gamma_mod(config: ModelConfig, fmt: str):
    if not config.mod.enabled:
        raise ConversionError(f"not a γ-MoD checkpoint (mod disabled); export with --format "
                              f"{'llava_hr' if fmt == 'gamma_mod_hr' else 'hf'}")
    if not config.mod.shared_router:
        raise ConversionError("γ-MoD checkpoints hold one shared router; this checkpoint has per-layer routers")


def to_llava_hr_config(config: ModelConfig, extras: dict | None = None, gamma_mod: bool = False) -> dict:
    """A LLaVA-HR (`llava`) or γ-MoD-LLaVA-HR (`mod_llava_llama`) config: flat 4.31-style Llama
    fields, the official `mm_*` and multi-path fields (`is_multipath_encoder`,
    `vision_tower_slow`, `input_image_size`, `freeze_vision`) and, for γ-MoD, `mod`.
    `mm_vision_config` (this project's addition) gives the CLIP's shape, which the official
    format leaves to the hub name; the reader reads every other geometry off the weights."""
    extras = extras or {}
    v = config.vision
    if v.tower != "multipath":
        formats = {"mgm": ("gamma_mod_mgm", "mgm")}.get(v.tower, ("gamma_mod", "hf"))
        raise ConversionError(f"not a LLaVA-HR checkpoint (vision tower {v.tower!r}); export with --format "
                              f"{formats[0] if config.mod.enabled else formats[1]}")
    if gamma_mod:
        _check_gamma_mod(config, "gamma_mod_hr")
    elif config.mod.enabled:
        raise ConversionError("a γ-MoD checkpoint has a router LLaVA-HR cannot hold; export with --format gamma_mod_hr")
    slow_name = extras.get("vision_tower_slow") or HR_SLOW_DEFAULT
    family = slow_name.rstrip("/").rsplit("/", 1)[-1].split(".")[0]
    if HR_SLOW_EPS.get(family) != v.slow.norm_eps:
        raise ConversionError(f"the slow tower's LayerNorm eps {v.slow.norm_eps} is not that of {slow_name!r}, the only "
                              "place the LLaVA-HR format records it")
    t = config.text
    out = {
        "architectures": ["MoDLLaVALlamaForCausalLM" if gamma_mod else "LlavaLlamaForCausalLM"],
        "model_type": "mod_llava_llama" if gamma_mod else "llava",
        **_llama_dict(t, extras),
        "rope_theta": t.rope_theta,
        "rope_scaling": t.rope_scaling_dict,
        "pad_token_id": config.pad_token_id,
        "torch_dtype": config.param_dtype,
        "mm_vision_tower": extras.get("vision_tower_name") or CLIP_L_336_NAME,
        "mm_vision_config": _vision_dict(v),
        "vision_tower_slow": slow_name,
        "is_multipath_encoder": True,
        "input_image_size": v.input_image_size,
        "freeze_vision": not v.latent_adapters,
        "mm_hidden_size": v.feature_dim,
        "mm_projector_type": config.projector.type,
        "mm_vision_select_layer": -2,  # stored by LLaVA-HR, ignored by its multi-path forward
        "mm_vision_select_feature": "patch",
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "image_aspect_ratio": "pad",
        "tune_mm_mlp_adapter": False,
        "freeze_mm_mlp_adapter": False,
        "use_mm_proj": True,
        "image_grid_pinpoints": None,
        "delay_load": False,
    }
    if gamma_mod:
        out["mod"] = _mod_dict(config, extras)
    return out


def to_mgm_config(config: ModelConfig, extras: dict | None = None, gamma_mod: bool = False) -> dict:
    """A Mini-Gemini (`mgm`) or γ-MoD-MGM (`mod_mgm`) config: flat 4.36-style Llama fields, the
    official `mm_*` and MGM fields (`mm_vision_tower_aux`, `mm_hidden_size_aux`, `image_size_aux`,
    `image_grid`, `image_global`, `tokenizer_model_max_length`, ...) and, for γ-MoD, `mod`.
    `mm_vision_config` (this project's addition) gives the CLIP's shape; the reader reads the aux
    trunk's geometry off the weights."""
    extras = extras or {}
    v = config.vision
    if v.tower != "mgm":
        raise ConversionError(f"not a Mini-Gemini checkpoint (vision tower {v.tower!r}); export with --format "
                              f"{'gamma_mod' if config.mod.enabled else 'hf'}")
    if gamma_mod:
        _check_gamma_mod(config, "gamma_mod_mgm")
    elif config.mod.enabled:
        raise ConversionError("a γ-MoD checkpoint has a router Mini-Gemini cannot hold; export with --format "
                              "gamma_mod_mgm")
    aux_name = extras.get("vision_tower_aux") or MGM_AUX_DEFAULT
    if v.aux.norm_eps != MGM_AUX_EPS or not mgm_aux_supported(aux_name):
        raise ConversionError(f"the aux tower (LayerNorm eps {v.aux.norm_eps}) is not open_clip's ConvNeXt-L "
                              f"({aux_name!r}, eps {MGM_AUX_EPS}), the only aux tower the Mini-Gemini format records")
    t = config.text
    out = {
        "architectures": ["MoDMGMLlamaForCausalLM" if gamma_mod else "MGMLlamaForCausalLM"],
        "model_type": "mod_mgm" if gamma_mod else "mgm",
        **_llama_dict(t, extras),
        "rope_theta": t.rope_theta,
        "rope_scaling": t.rope_scaling_dict,
        "pad_token_id": config.pad_token_id,
        "torch_dtype": config.param_dtype,
        "mm_vision_tower": extras.get("vision_tower_name") or CLIP_L_336_NAME,
        "mm_vision_config": _vision_dict(v),
        "mm_vision_tower_aux": aux_name,
        "mm_hidden_size": v.hidden_size,
        "mm_hidden_size_aux": v.mm_hidden_size_aux,
        "mm_projector_type": config.projector.type,
        "mm_vision_select_layer": _feature_layer(v),
        "mm_vision_select_feature": "patch",
        "image_grid": v.image_grid,
        "image_global": v.image_global,
        "image_size_aux": v.image_size_aux,
        "image_aspect_ratio": "pad",
        "image_grid_pinpoints": None,
        "tokenizer_padding_side": extras.get("tokenizer_padding_side") or "right",
        "optimize_vision_tower": False,
        "optimize_vision_tower_aux": False,
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "tune_mm_mlp_adapter": False,
        "freeze_mm_mlp_adapter": False,
        "use_mm_proj": True,
    }
    if config.tokenizer_model_max_length is not None:
        out["tokenizer_model_max_length"] = config.tokenizer_model_max_length
    if gamma_mod:
        out["mod"] = _mod_dict(config, extras)
    return out
