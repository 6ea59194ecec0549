"""Frozen configuration dataclasses for the LLaVA model and its γ-MoD adaptation.

Configs are hashable (they are static arguments of jitted functions) and serialise to plain
JSON (`to_dict` / `from_dict`), which is what checkpoints store next to their params. Reading
HF / original-LLaVA / γ-MoD `config.json` files lives in `convert/hf_config.py`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import re
from typing import Any

from gmod_jax import token_types

# Upper bound of every size, count and token id: values beyond int32 are never real and would
# overflow the int32 arithmetic of the model code.
MAX_INT = 2**31 - 1
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")
_ROPE_REQUIRED = {"linear": ("factor",), "dynamic": ("factor",),
                  "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
                  "longrope": ("short_factor", "long_factor")}
PROJECTOR_TYPE = re.compile(r"^mlp([1-9][0-9]{0,2})x_gelu$")


class ConfigError(ValueError):
    """Invalid config values; `problems` holds one line per bad field, named as `section.field`."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


class _Fields:
    """Type and range checks of one config section's fields, collecting one problem per field.

    Integral and real values are normalised to `int` / `float` (numpy scalars from user code are
    accepted, bools never count as numbers) so a valid config hashes and serialises as JSON.
    """

    def __init__(self, obj, section: str):
        self.obj, self.section, self.problems = obj, section, []

    def fail(self, name: str, message: str):
        self.problems.append(f"{self.section}.{name} {message}")

    def _value(self, name):
        return getattr(self.obj, name)

    def _set(self, name, value):
        object.__setattr__(self.obj, name, value)

    def int(self, name: str, lo: int = 1, hi: int = MAX_INT, optional: bool = False) -> bool:
        value = self._value(name)
        if optional and value is None:
            return True
        if not is_int(value) or not lo <= value <= hi:
            self.fail(name, f"must be an integer in [{lo}, {hi}], got {short(value)}")
            return False
        self._set(name, int(value))
        return True

    def float(self, name: str, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
              hi_open: bool = False) -> bool:
        value = self._value(name)
        ok = is_real(value) and math.isfinite(value)
        if ok and lo is not None:
            ok = value > lo if lo_open else value >= lo
        if ok and hi is not None:
            ok = value < hi if hi_open else value <= hi
        if not ok:
            if lo is not None and hi is not None:
                expected = f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
            elif lo is not None:
                expected = f"a finite number {'>' if lo_open else '>='} {lo:g}"
            else:
                expected = "a finite number"
            self.fail(name, f"must be {expected}, got {short(value)}")
            return False
        self._set(name, float(value))
        return True

    def bool(self, name: str) -> bool:
        if not isinstance(self._value(name), bool):
            self.fail(name, f"must be true or false, got {short(self._value(name))}")
            return False
        return True

    def choice(self, name: str, choices) -> bool:
        value = self._value(name)
        if not isinstance(value, str) or value not in choices:
            self.fail(name, f"must be one of {', '.join(map(str, choices))}, got {short(value)}")
            return False
        return True

    def string(self, name: str) -> bool:
        value = self._value(name)
        if not isinstance(value, str) or not value:
            self.fail(name, f"must be a non-empty string, got {short(value)}")
            return False
        return True

    def raise_if_any(self):
        if self.problems:
            raise ConfigError(self.problems)


def is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def short(value, limit: int = 60) -> str:
    """repr of a (possibly hostile, huge) value cut to one short line for an error message."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def feature_layer_problem(feature_layer, num_layers: int, field: str = "vision.feature_layer") -> str | None:
    """Why `feature_layer` cannot index the hidden states of a `num_layers`-layer tower, or None.

    HF semantics: hidden_states has num_layers + 1 entries (0 = the pre-encoder embeddings), so
    valid indices are -(num_layers + 1) .. num_layers, as in a Python list. transformers raises an
    IndexError for anything else; clamping would silently pick another layer's features.
    """
    layers = tuple(feature_layer) if isinstance(feature_layer, (list, tuple)) else (feature_layer,)
    if not layers or not all(is_int(l) for l in layers):
        return f"{field} must be an integer or a non-empty list of integers, got {short(feature_layer)}"
    bad = [int(l) for l in layers if not -(num_layers + 1) <= l <= num_layers]
    if bad:
        return (f"{field} {short(feature_layer)}: {', '.join(map(str, bad))} outside the vision tower's hidden "
                f"states -{num_layers + 1}..{num_layers} ({num_layers} layers)")
    return None


def _tuple(value):
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return tuple(_tuple(v) for v in value)
    return value


@dataclasses.dataclass(frozen=True)
class ConvNeXtConfig:
    """ConvNeXt trunk (timm `ConvNeXt` field meanings; stem + stages, no head). Defaults are
    ConvNeXt-L (`convnext_large_mlp`, LLaVA-HR's slow tower; open_clip `convnext_large_d_320`)."""

    depths: tuple[int, ...] = (3, 3, 27, 3)
    dims: tuple[int, ...] = (192, 384, 768, 1536)
    patch_size: int = 4  # stem conv kernel = stride
    kernel_size: int = 7  # depthwise conv of each block
    norm_eps: float = 1e-6
    layer_scale: bool = True
    mlp_ratio: int = 4

    def __post_init__(self):
        f = _Fields(self, "convnext")
        for name in ("depths", "dims"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)) and value and all(is_int(v) and 1 <= v <= MAX_INT for v in value):
                object.__setattr__(self, name, tuple(int(v) for v in value))
            else:
                f.fail(name, f"must be a non-empty list of positive integers, got {short(value)}")
        for name in ("patch_size", "kernel_size", "mlp_ratio"):
            f.int(name)
        f.float("norm_eps", lo=0.0, lo_open=True)
        f.bool("layer_scale")
        f.raise_if_any()
        if len(self.depths) != len(self.dims):
            raise ConfigError([f"convnext depths {self.depths} and dims {self.dims} must be of equal length"])
        if self.kernel_size % 2 == 0:
            raise ConfigError([f"convnext.kernel_size must be odd (same padding), got {self.kernel_size}"])

    @property
    def num_stages(self) -> int:
        return len(self.depths)

    @property
    def stride(self) -> int:
        """Total downsampling of the last stage: the stem patch, then 2x per later stage."""
        return self.patch_size * 2 ** (self.num_stages - 1)

    @property
    def width(self) -> int:
        return self.dims[-1]


# "clip": LLaVA-1.5 (the CLIP ViT alone); "multipath": LLaVA-HR (CLIP fast path + ConvNeXt slow
# path + MR-adapters, see models/multipath.py); "mgm": Mini-Gemini (CLIP on tiles + global view,
# ConvNeXt aux tower, patch info mining, see models/mgm.py).
VISION_TOWERS = ("clip", "multipath", "mgm")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """Vision tower. The CLIP ViT fields have HF `CLIPVisionConfig` meanings (`image_size` is the
    CLIP's native size: its position table has `num_patches + 1` rows).

    `tower="multipath"` is LLaVA-HR: the model takes `input_image_size` (S) pixels; the CLIP runs
    on them resized to `fast_image_size` = max(int(S / slow.stride · patch_size), image_size)
    (LLaVA-HR's max(int(S/32·14), 336)), the ConvNeXt `slow` trunk on S itself. `feature_layer`
    and `feature_strategy` are ignored there (all layers, CLS dropped, as the official code)."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 24
    num_heads: int = 16
    image_size: int = 336
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    # int, or tuple of ints whose features are concatenated on the channel axis (HF semantics:
    # index into hidden_states, where 0 is the pre-layernorm output and i the i-th layer output).
    feature_layer: int | tuple[int, ...] = -2
    feature_strategy: str = "default"  # "default" drops CLS, "full" keeps it
    # Which tower `LlavaModel` builds (VISION_TOWERS).
    tower: str = "clip"
    slow: ConvNeXtConfig | None = None  # ConvNeXt trunk of a multi-path tower (LLaVA-HR)
    input_image_size: int | None = None  # multipath: S, the model's pixel input side
    # multipath: the three MR-adapters after each quarter of the CLIP layers exist (LLaVA-HR's
    # `freeze_vision: false`; its stage 1 trains without them).
    latent_adapters: bool = True
    # Mini-Gemini (tower "mgm"): the CLIP ViT above is the main tower, run on image_grid² tiles
    # of the image resized to image_size·image_grid (plus a global view with image_global); `aux`
    # is the auxiliary ConvNeXt trunk (open_clip convnext_large_d_320) run on the whole image at
    # image_size_aux, the model's pixel input. See gmod_jax/models/mgm.py.
    aux: ConvNeXtConfig | None = None
    image_size_aux: int = 0
    image_grid: int = 1
    image_global: bool = False

    def __post_init__(self):
        object.__setattr__(self, "feature_layer", _tuple(self.feature_layer))
        for name in ("slow", "aux"):  # nested ConvNeXt configs given in their `to_dict` form
            value = getattr(self, name)
            if isinstance(value, dict):
                object.__setattr__(self, name, _sub_config(ConvNeXtConfig, f"vision.{name}", value))
        f = _Fields(self, "vision")
        sizes = all([f.int(name) for name in ("hidden_size", "intermediate_size", "num_heads", "image_size",
                                               "patch_size", "num_channels")])
        depth = f.int("num_layers")
        f.float("layer_norm_eps", lo=0.0, lo_open=True)
        f.string("hidden_act")
        f.choice("feature_strategy", ("default", "full"))
        f.choice("tower", VISION_TOWERS)
        f.int("input_image_size", optional=True)
        f.bool("latent_adapters")
        f.int("image_size_aux", lo=0)
        f.int("image_grid")
        f.bool("image_global")
        for name in ("slow", "aux"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), ConvNeXtConfig):
                f.fail(name, f"must be a ConvNeXt config or null, got {short(getattr(self, name))}")
        if depth:
            problem = feature_layer_problem(self.feature_layer, self.num_layers)
            if problem:
                f.problems.append(problem)
            else:
                layers = self.feature_layer
                object.__setattr__(self, "feature_layer",
                                   tuple(int(l) for l in layers) if isinstance(layers, tuple) else int(layers))
        if sizes and self.hidden_size % self.num_heads:
            f.problems.append(f"vision.hidden_size {self.hidden_size} not divisible by vision.num_heads {self.num_heads}")
        if sizes and self.image_size % self.patch_size:
            f.problems.append(f"vision.image_size {self.image_size} not divisible by vision.patch_size {self.patch_size}")
        f.raise_if_any()
        if self.tower == "multipath":
            self._check_multipath()
        elif self.input_image_size not in (None, self.image_size):
            raise ConfigError([f"vision.input_image_size {self.input_image_size} differs from image_size "
                               f"{self.image_size}: only the 'multipath' tower resizes its input"])
        if self.tower == "mgm":
            self._check_mgm()

    def _check_mgm(self):
        """Mini-Gemini's geometry: every aux cell of a CLIP token is a whole p x p block."""
        if self.aux is None:
            raise ValueError("vision tower 'mgm' needs vision.aux (the auxiliary ConvNeXt config)")
        if self.feature_strategy != "default" or len(self.feature_layers) != 1:
            raise ValueError("vision tower 'mgm' uses one feature layer and drops CLS (feature_strategy 'default')")
        if self.image_grid < 1:
            raise ValueError(f"vision.image_grid must be >= 1, got {self.image_grid}")
        if self.image_global and self.image_grid < 2:
            raise ValueError("vision.image_global needs image_grid >= 2 (Mini-Gemini adds a global view to tiles)")
        if self.image_size_aux <= 0 or self.image_size_aux % self.aux.stride:
            raise ValueError(f"vision.image_size_aux {self.image_size_aux} must be a positive multiple of the "
                             f"aux trunk's stride {self.aux.stride}")
        side = self.image_size // self.patch_size
        view = self.image_size_aux // self.aux.patch_size
        if view % self.image_grid or (view // self.image_grid) % side:
            raise ValueError(f"vision.image_size_aux {self.image_size_aux}: the aux map side {view} must split into "
                             f"image_grid {self.image_grid} views of a multiple of the CLIP grid {side}")

    def _check_multipath(self):
        if self.slow is None or self.input_image_size is None:
            raise ValueError("vision tower 'multipath' needs vision.slow (a ConvNeXt config) and "
                             "vision.input_image_size")
        if self.num_layers % 4:
            raise ValueError(f"vision tower 'multipath' runs the CLIP layers in 4 groups: num_layers "
                             f"{self.num_layers} is not a multiple of 4")
        s, stride = self.input_image_size, self.slow.stride
        if s <= 0 or s % stride:
            raise ValueError(f"vision.input_image_size {s} must be a positive multiple of the ConvNeXt "
                             f"stride {stride}")
        if self.fast_image_size % self.patch_size:
            raise ValueError(f"vision.input_image_size {s} gives a fast-path size {self.fast_image_size} "
                             f"that is not a multiple of patch_size {self.patch_size}")
        fast, slow = self.num_image_tokens, self.slow_grid ** 2
        if fast % slow and slow % fast:
            raise ValueError(f"vision.input_image_size {s}: slow grid {self.slow_grid}² and fast grid "
                             f"{self.token_grid}² token counts do not divide one another")

    @property
    def fast_image_size(self) -> int:
        """Side the CLIP sees: its native `image_size`, or LLaVA-HR's resized fast input."""
        if self.tower != "multipath":
            return self.image_size
        return max(int(self.input_image_size / self.slow.stride * self.patch_size), self.image_size)

    @property
    def token_grid(self) -> int:
        """Side of the (square, row-major) image-token grid: the CLIP patch grid of the input the
        CLIP sees."""
        return self.fast_image_size // self.patch_size

    @property
    def slow_grid(self) -> int:
        return self.input_image_size // self.slow.stride

    @property
    def feature_dim(self) -> int:
        """Width of the tower's output tokens (the projector's input)."""
        if self.tower == "multipath":
            return self.hidden_size
        return self.hidden_size * len(self.feature_layers)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def feature_layers(self) -> tuple[int, ...]:
        layers = self.feature_layer if isinstance(self.feature_layer, tuple) else (self.feature_layer,)
        return tuple(l if l >= 0 else self.num_layers + 1 + l for l in layers)

    @property
    def num_views(self) -> int:
        """CLIP views per image: Mini-Gemini's image_grid² tiles (+ global view), else 1."""
        return self.image_grid ** 2 + int(self.image_global) if self.tower == "mgm" else 1

    @property
    def num_image_tokens(self) -> int:
        if self.tower == "multipath":
            return self.token_grid ** 2
        return self.num_views * self.num_patches + (1 if self.feature_strategy == "full" else 0)

    @property
    def pixel_size(self) -> int:
        """Side of the model's square pixel input (what preprocessing produces): Mini-Gemini's
        image_size_aux, LLaVA-HR's input_image_size, else the CLIP's image_size."""
        if self.tower == "mgm":
            return self.image_size_aux
        return self.input_image_size if self.tower == "multipath" else self.image_size

    @property
    def mm_hidden_size_aux(self) -> int:
        """Channels of Mini-Gemini's aux feature map (the concatenated stages; 2880 for ConvNeXt-L)."""
        return sum(self.aux.dims) if self.aux is not None else 0


@dataclasses.dataclass(frozen=True)
class ProjectorConfig:
    """Multimodal projector: `mlp{N}x_gelu` (Linear, (GELU, Linear) x N-1) or `linear`."""

    type: str = "mlp2x_gelu"
    bias: bool = True
    hidden_act: str = "gelu"  # exact erf GELU, as `ACT2FN["gelu"]`

    def __post_init__(self):
        f = _Fields(self, "projector")
        if not (isinstance(self.type, str) and (self.type == "linear" or PROJECTOR_TYPE.match(self.type))):
            f.fail("type", f"must be 'linear' or 'mlpNx_gelu' (N in 1..999), got {short(self.type)}")
        f.bool("bias")
        f.string("hidden_act")
        f.raise_if_any()

    @property
    def depth(self) -> int:
        if self.type == "linear":
            return 1
        return int(PROJECTOR_TYPE.match(self.type).group(1))


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """LLaMA decoder (HF `LlamaConfig` field meanings)."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # None or a tuple of (key, value) pairs of the HF rope_scaling / rope_parameters dict
    # (rope_type: linear, dynamic, llama3, yarn, longrope).
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    max_position_embeddings: int = 4096
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    initializer_range: float = 0.02  # std of the normal init of every weight matrix (from scratch)

    def __post_init__(self):
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", tuple(sorted((k, _tuple(v)) for k, v in self.rope_scaling.items())))
        f = _Fields(self, "text")
        sizes = all([f.int(name) for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                                               "num_heads", "num_kv_heads", "max_position_embeddings")])
        head_dim = f.int("head_dim", optional=True)
        f.float("rms_norm_eps", lo=0.0, lo_open=True)
        f.float("rope_theta", lo=0.0, lo_open=True)
        f.float("initializer_range", lo=0.0, lo_open=True)
        for name in ("attention_bias", "mlp_bias", "tie_word_embeddings"):
            f.bool(name)
        f.string("hidden_act")
        f.problems += _rope_problems(self.rope_scaling)
        if sizes and head_dim and self.head_dim is None:
            if self.hidden_size % self.num_heads:
                f.problems.append(f"text.hidden_size {self.hidden_size} not divisible by text.num_heads {self.num_heads}")
            else:
                object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if sizes and head_dim and self.head_dim is not None and self.head_dim % 2:
            f.problems.append(f"text.head_dim {self.head_dim} must be even (rotary embeddings rotate pairs)")
        if sizes and self.num_heads % self.num_kv_heads:
            f.problems.append(f"text.num_heads {self.num_heads} not divisible by text.num_kv_heads {self.num_kv_heads}")
        f.raise_if_any()

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        return None if self.rope_scaling is None else dict(self.rope_scaling)


# Attention implementations (`ModelConfig.attention_impl`; gmod_jax/layers/attention.py):
# "auto" picks per backend in `attention.resolve_attention_impl`; "xla" is the reference
# (one einsum + float32 softmax over all keys); "blocked" skips most of the masked upper triangle
# in query blocks; "cpu_blocked" does the same one KV head at a time (the CPU choice); "cudnn" is
# cuDNN flash attention via `jax.nn.dot_product_attention` (GPU, bf16/fp16); "splash" is the
# Pallas TPU splash-attention kernel.
ATTENTION_IMPLS = ("auto", "xla", "blocked", "cpu_blocked", "cudnn", "splash")


def _rope_problems(scaling) -> list[str]:
    """Type and range checks of a rope scaling tuple (the keys `gmod_jax.layers.rope` reads)."""
    if scaling is None:
        return []
    if not isinstance(scaling, tuple) or not all(isinstance(kv, tuple) and len(kv) == 2 and isinstance(kv[0], str)
                                                 for kv in scaling):
        return [f"text.rope_scaling must be a mapping of names to values, got {short(scaling)}"]
    p = dict(scaling)
    rope_type = p.get("rope_type", p.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        return [f"text.rope_scaling.rope_type must be one of {', '.join(ROPE_TYPES)}, got {short(rope_type)}"]
    problems = [f"text.rope_scaling.{k} is required for rope_type {rope_type}"
                for k in _ROPE_REQUIRED.get(rope_type, ()) if p.get(k) is None]
    for key, value in p.items():
        if key in ("rope_type", "type") or value is None:
            continue
        if key in ("short_factor", "long_factor"):
            ok = isinstance(value, tuple) and bool(value) and all(is_real(v) and math.isfinite(v) and v > 0
                                                                  for v in value)
            if not ok:
                problems.append(f"text.rope_scaling.{key} must be a non-empty list of positive numbers, "
                                f"got {short(value)}")
        elif key == "truncate":
            if not isinstance(value, bool):
                problems.append(f"text.rope_scaling.truncate must be true or false, got {short(value)}")
        elif key == "original_max_position_embeddings":
            if not is_int(value) or not 1 <= value <= MAX_INT:
                problems.append(f"text.rope_scaling.{key} must be an integer in [1, {MAX_INT}], got {short(value)}")
        elif key in ("factor", "low_freq_factor", "high_freq_factor", "attention_factor", "beta_fast", "beta_slow",
                     "mscale", "mscale_all_dim"):
            if not (is_real(value) and math.isfinite(value) and value > 0):
                problems.append(f"text.rope_scaling.{key} must be a finite number > 0, got {short(value)}")
        elif not (isinstance(value, (str, bool)) or is_real(value)
                  or (isinstance(value, tuple) and all(is_real(v) for v in value))):
            problems.append(f"text.rope_scaling.{key} must be a string, a number or a list of numbers, "
                            f"got {short(value)}")
    if rope_type == "llama3" and not problems and p["high_freq_factor"] <= p["low_freq_factor"]:
        problems.append("text.rope_scaling.high_freq_factor must exceed low_freq_factor")
    return problems


MOD_PLACEMENTS = ("explicit", "arank_mod", "all", "every_2nd", "two_of_three")
ROUTABLE_SPANS = ("token_types", "first_n")


@dataclasses.dataclass(frozen=True)
class MoDConfig:
    """γ-MoD adaptation. Defaults reproduce the official code (the README's options table lists
    each field's alternatives and the deviations)."""

    enabled: bool = False
    layers: tuple[int, ...] = ()  # MoD layer indices (resolved list; see `mod_layer_indices`)
    routing_ratio: float = 0.5  # share of routable tokens skipped per MoD layer in training
    router_aux_loss_coef: float = 0.01
    loss_layer_reduction: str = "sum"  # over MoD layers: "sum" (official) or "mean"
    loss_token_reduction: str = "all"  # "all" B*T positions incl. padding (official) or "non_pad"
    shared_router: bool = True  # one W_r for all MoD layers (official); False = per-layer routers
    masking: str = "official"  # key of token_types.MASKING_PRESETS
    compact_positions: bool = True  # RoPE positions 0..k-1 inside MoD layers (official)
    implementation: str = "gather"  # "gather" (take_along_axis/scatter) or "onehot" (dispatch einsums)
    inference_routing: str = "threshold"  # "threshold" (official) or "capacity" (training top-k rule)
    prefill_threshold: float = 0.005  # keep a prefill token iff keep-prob > this (official)
    decode_threshold: float = 0.5  # a decode token skips a MoD layer iff keep-prob < this (official)
    # Static upper bound on kept tokens per MoD layer for threshold routing, as a share of the
    # sequence length. 1.0 never drops a token that passed the threshold (exact, no FLOP savings);
    # smaller values bound compute, keeping the highest keep-probs when more pass.
    threshold_max_capacity: float = 1.0
    # Capacity buckets of the threshold rule (equal steps of T): each MoD layer runs the smallest
    # that holds the tokens passing the threshold, so prefill compute follows the realised skip
    # ratio and the kept set is the unbounded rule's. 1 = always the static bound above.
    threshold_buckets: int = 8
    router_init: str = "kaiming_uniform"  # PyTorch nn.Linear default (LLaVA-HR code); or "xavier_uniform"
    # Which tokens training may route (skip), on top of `masking`'s token types:
    # "token_types" (project default): every token of a routable type, i.e. the system prompt and
    #   the whole image for the official masking;
    # "first_n": only the routable-type tokens among a row's first `routable_first_n` non-pad
    #   tokens. Mini-Gemini's γ-MoD code routes the first image_token_number = 2880 positions with
    #   no +35 for the system prompt, so 35 system + the first 2845 image tokens are routable and
    #   the last 35 image tokens are always kept; `gamma_mod_mgm(..., routable_span="first_n")`
    #   sets n = image_seq_length (2880 for HD) for that quirk.
    routable_span: str = "token_types"
    routable_first_n: int = 0  # n of "first_n" (> 0 there; unused otherwise)

    def __post_init__(self):
        f = _Fields(self, "mod")
        layers = tuple(self.layers) if isinstance(self.layers, (list, tuple, range)) else self.layers
        if isinstance(layers, tuple) and all(is_int(i) and 0 <= i <= MAX_INT for i in layers):
            object.__setattr__(self, "layers", tuple(int(i) for i in layers))
        else:
            f.fail("layers", f"must be a list of layer indices >= 0, got {short(self.layers)}")
        f.bool("enabled")
        f.choice("masking", sorted(token_types.MASKING_PRESETS))
        f.choice("implementation", ("gather", "onehot"))
        f.choice("inference_routing", ("threshold", "capacity"))
        f.float("routing_ratio", lo=0.0, hi=1.0, hi_open=True)
        f.float("router_aux_loss_coef", lo=0.0)
        f.choice("loss_layer_reduction", ("sum", "mean"))
        f.choice("loss_token_reduction", ("all", "non_pad"))
        f.bool("shared_router")
        f.bool("compact_positions")
        f.float("prefill_threshold", lo=0.0, hi=1.0)
        f.float("decode_threshold", lo=0.0, hi=1.0)
        f.float("threshold_max_capacity", lo=0.0, hi=1.0, lo_open=True)
        f.int("threshold_buckets")
        f.choice("router_init", ("kaiming_uniform", "xavier_uniform"))
        f.choice("routable_span", ROUTABLE_SPANS)
        if f.int("routable_first_n", lo=0) and self.routable_span == "first_n" and self.routable_first_n < 1:
            f.fail("routable_first_n", f"must be >= 1 for routable_span 'first_n', got {self.routable_first_n}")
        f.raise_if_any()

    @property
    def routable_types(self) -> token_types.RoutableTypes:
        """Routable token types (and the `first_n` bound of the "first_n" span); what every
        routing function takes as `routable_types`."""
        first_n = self.routable_first_n if self.routable_span == "first_n" else None
        return token_types.RoutableTypes(token_types.MASKING_PRESETS[self.masking], first_n)


def mod_layer_indices(placement: str, num_layers: int, layers: tuple[int, ...] = ()) -> tuple[int, ...]:
    """Resolve a MoD placement strategy to layer indices (paper Table 1 baselines)."""
    if placement == "explicit":
        bad = [i for i in layers if not 0 <= i < num_layers]
        if bad:
            raise ValueError(f"MoD layer indices {bad} outside 0..{num_layers - 1}")
        return tuple(sorted(set(layers)))
    if placement == "arank_mod":  # official hard-coded result of ARank on Vicuna: all but {0,1,2,L-1}
        return tuple(i for i in range(num_layers) if i not in (0, 1, 2, num_layers - 1))
    if placement == "all":
        return tuple(range(num_layers))
    if placement == "every_2nd":  # official `sparse` mode: range(L)[::2]
        return tuple(range(0, num_layers, 2))
    if placement == "two_of_three":  # paper's "2 MoDs per 3 layers": layers 0,1 of each triple
        return tuple(i for i in range(num_layers) if i % 3 != 2)
    raise ValueError(f"unknown MoD placement {placement!r}; choose from {MOD_PLACEMENTS}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
    projector: ProjectorConfig = dataclasses.field(default_factory=ProjectorConfig)
    text: LlamaConfig = dataclasses.field(default_factory=LlamaConfig)
    mod: MoDConfig = dataclasses.field(default_factory=MoDConfig)
    image_token_index: int = 32000
    pad_token_id: int | None = None
    dtype: str = "float32"  # compute dtype of matmuls ("float32" | "bfloat16" | "float16")
    param_dtype: str = "float32"
    remat: str = "none"  # "none" | "full" | "dots" (jax.checkpoint_policies.dots_saveable)
    scan_layers: bool = True  # lax.scan per group of identical decoder layers
    attention_impl: str = "auto"  # one of ATTENTION_IMPLS (decoder and vision attention)
    # Mini-Gemini truncates every spliced sequence (image tokens expanded) to this many tokens, in
    # training and inference; None = no such cut. Applied on the host where the spliced ids are
    # formed (`truncate_spliced`): the data pipeline's max_length and generate's prompts.
    tokenizer_model_max_length: int | None = None

    def __post_init__(self):
        sections = {"vision": VisionConfig, "projector": ProjectorConfig, "text": LlamaConfig, "mod": MoDConfig}
        problems = [f"{name} must be a {klass.__name__}, got {short(getattr(self, name))}"
                    for name, klass in sections.items() if not isinstance(getattr(self, name), klass)]
        if problems:
            raise ConfigError(problems)
        f = _Fields(self, "config")
        f.int("image_token_index", lo=-MAX_INT)
        if self.pad_token_id is not None:
            f.int("pad_token_id", lo=0)
        f.choice("dtype", ("float32", "bfloat16", "float16"))
        f.choice("param_dtype", ("float32", "bfloat16", "float16"))
        f.choice("remat", ("none", "full", "dots"))
        f.bool("scan_layers")
        f.choice("attention_impl", ATTENTION_IMPLS)
        f.int("tokenizer_model_max_length", optional=True)
        if self.mod.enabled:
            bad = [i for i in self.mod.layers if not 0 <= i < self.text.num_layers]
            if bad:
                f.problems.append(f"mod.layers {bad} outside 0..{self.text.num_layers - 1}")
        f.raise_if_any()

    @property
    def image_seq_length(self) -> int:
        """Image tokens one image contributes to the LLM sequence."""
        return self.vision.num_image_tokens

    @property
    def pixel_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of one image's `pixel_values` (channels last): what every call site feeds."""
        v = self.vision
        return (v.pixel_size, v.pixel_size, v.num_channels)

    def truncate_spliced(self, length: int) -> int:
        """Length a spliced sequence of `length` tokens keeps (Mini-Gemini's post-splice cut)."""
        cap = self.tokenizer_model_max_length
        return length if cap is None else min(length, cap)

    @property
    def mod_layers(self) -> tuple[int, ...]:
        return self.mod.layers if self.mod.enabled else ()

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """Build from `to_dict` output (a checkpoint's config.json); every problem of every section
        is reported at once in one ConfigError."""
        if not isinstance(d, dict):
            raise ConfigError([f"a model config must be a JSON object, got {short(d)}"])
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError([f"unknown ModelConfig fields: {short(sorted(unknown), 200)}"])
        problems = []
        sub = {"vision": VisionConfig, "projector": ProjectorConfig, "text": LlamaConfig, "mod": MoDConfig}
        for key, klass in sub.items():
            if key not in d or isinstance(d[key], klass):
                continue
            if not isinstance(d[key], dict):
                problems.append(f"{key} must be an object, got {short(d[key])}")
                continue
            fields = {f.name for f in dataclasses.fields(klass)}
            bad = set(d[key]) - fields
            if bad:
                problems.append(f"unknown {key} config fields: {short(sorted(bad), 200)}")
                continue
            try:
                d[key] = klass(**{k: _tuple(v) if k != "rope_scaling" else _rope(v) for k, v in d[key].items()})
            except ConfigError as e:
                problems += e.problems
        if problems:
            raise ConfigError(problems)
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        try:
            data = json.loads(text)
        except RecursionError:
            raise ConfigError(["config JSON nests too deeply"]) from None
        return cls.from_dict(data)


# Nested config fields inside sub-configs (e.g. VisionConfig's ConvNeXt trunks), by field name.
_NESTED = {"slow": ConvNeXtConfig, "aux": ConvNeXtConfig}


def _sub_config(klass, name: str, values: dict):
    """Build a sub-config from its `to_dict` form, naming unknown fields by their dotted path."""
    fields = {f.name for f in dataclasses.fields(klass)}
    bad = set(values) - fields
    if bad:
        raise ConfigError([f"unknown {name} config fields: {short(sorted(bad), 200)}"])
    out = {}
    for k, v in values.items():
        if k in _NESTED and isinstance(v, dict):
            out[k] = _sub_config(_NESTED[k], f"{name}.{k}", v)
        else:
            out[k] = _rope(v) if k == "rope_scaling" else _tuple(v)
    return klass(**out)


def _rope(value):
    if value is None or isinstance(value, dict):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(kv, (list, tuple)) and len(kv) == 2 for kv in value):
        return tuple((k, _tuple(v)) for k, v in value)
    return value  # LlamaConfig reports it


# ----------------------------------------------------------------------------------------------
# Presets. The tiny ones exercise exactly the same code as 7B.

def llava_v15_7b(**mod_kw) -> ModelConfig:
    """liuhaotian/llava-v1.5-7b (Vicuna-7B-v1.5 + CLIP-L/336, mlp2x_gelu), HF vocab 32064."""
    return ModelConfig(
        vision=VisionConfig(),
        projector=ProjectorConfig(),
        text=LlamaConfig(vocab_size=32064, rms_norm_eps=1e-5, max_position_embeddings=4096),
        image_token_index=32000, pad_token_id=32001,
        mod=MoDConfig(**mod_kw) if mod_kw else MoDConfig(),
    )


def llava_v15_13b(**mod_kw) -> ModelConfig:
    base = llava_v15_7b(**mod_kw)
    return base.replace(text=dataclasses.replace(base.text, hidden_size=5120, intermediate_size=13824,
                                                 num_layers=40, num_heads=40, num_kv_heads=40))


def gamma_mod(base: ModelConfig, placement: str = "arank_mod", routing_ratio: float = 0.5,
              layers: tuple[int, ...] = (), **mod_kw) -> ModelConfig:
    """Turn a dense config into its γ-MoD twin (official placement: all but layers 0,1,2,L-1)."""
    idx = mod_layer_indices(placement, base.text.num_layers, layers)
    return base.replace(mod=MoDConfig(enabled=True, layers=idx, routing_ratio=routing_ratio, **mod_kw))


def mgm_hd_7b(**mod_kw) -> ModelConfig:
    """Mini-Gemini-HD-7B as γ-MoD fine-tunes it (MGM's stage_2_full_v7b_672_hr_1536 settings):
    Vicuna-7B-v1.5, CLIP-L/336 main tower on 2x2 tiles of the image resized to 672 px plus a
    global view, ConvNeXt-L auxiliary tower (open_clip convnext_large_d_320 trunk: depths 3/3/27/3,
    dims 192/384/768/1536, LN eps 1e-6) at 1536 px, patch info mining (aux width 2880),
    mlp2x_gelu, 5 x 576 = 2880 image tokens, spliced sequences cut at 4096 tokens (the script's
    model_max_length; read the real value from a checkpoint's config.json). Original-layout ids:
    vocabulary 32000, image placeholder -200."""
    return ModelConfig(
        vision=VisionConfig(tower="mgm", aux=ConvNeXtConfig(), image_size_aux=1536, image_grid=2, image_global=True),
        projector=ProjectorConfig(),
        text=LlamaConfig(vocab_size=32000, rms_norm_eps=1e-5, max_position_embeddings=4096),
        image_token_index=-200, pad_token_id=0, tokenizer_model_max_length=4096,
        mod=MoDConfig(**mod_kw) if mod_kw else MoDConfig(),
    )


def gamma_mod_mgm(base: ModelConfig, placement: str = "arank_mod", routing_ratio: float = 0.5,
                  routable_span: str = "token_types", **mod_kw) -> ModelConfig:
    """γ-MoD twin of a Mini-Gemini config as the MGM code builds it: xavier-uniform router init;
    routable span from token types (project default, system prompt + image), or "first_n" for the
    official quirk, n = the image token count with no allowance for the system prompt (2880 for
    HD: 35 system + the first 2845 image tokens routable, the last 35 image tokens kept)."""
    first_n = base.image_seq_length if routable_span == "first_n" else 0
    mod_kw = {"router_init": "xavier_uniform", **mod_kw}
    return gamma_mod(base, placement, routing_ratio, routable_span=routable_span, routable_first_n=first_n, **mod_kw)


def gamma_mod_mgm_hd_7b(routing_ratio: float = 0.5, routable_span: str = "token_types") -> ModelConfig:
    """γ-MoD-Mini-Gemini-HD-7B (YaxinLuo/Gamma-MoD-Mini-Gemini-HD-7b-0.5 at ratio 0.5)."""
    return gamma_mod_mgm(mgm_hd_7b(), "arank_mod", routing_ratio, routable_span)


def tiny_mgm(image_grid: int = 2, image_global: bool = True, **kw) -> ModelConfig:
    """`tiny()` with a Mini-Gemini vision stack on the same code paths as 7B: CLIP 28 px / patch 14
    (2x2 tokens per view), a 4-stage ConvNeXt (aux width 80), aux image 32 px per grid cell (cells
    of 4 x 4 aux vectors); grid 2 + global view gives 20 image tokens, grid 1 gives 4."""
    base = tiny()
    vision = dataclasses.replace(
        base.vision, tower="mgm", aux=ConvNeXtConfig(depths=(1, 1, 2, 1), dims=(8, 16, 24, 32), patch_size=4),
        image_size_aux=32 * image_grid, image_grid=image_grid, image_global=image_global)
    cfg = base.replace(vision=vision)
    return cfg.replace(**kw) if kw else cfg


def tiny(**kw) -> ModelConfig:
    """A CPU-sized LLaVA with the 7B code paths (GQA off, mlp2x_gelu, feature layer -2)."""
    cfg = ModelConfig(
        vision=VisionConfig(hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4,
                            image_size=28, patch_size=14),
        projector=ProjectorConfig(),
        text=LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=4,
                         num_heads=4, num_kv_heads=4, max_position_embeddings=512),
        image_token_index=127, pad_token_id=0,
    )
    return cfg.replace(**kw) if kw else cfg


# LLaVA-HR keeps original LLaVA's placeholder: id -200 (llava/constants.py IMAGE_TOKEN_INDEX),
# outside the 32000-token Vicuna vocabulary, as converted original-layout checkpoints get it.
LLAVA_HR_IMAGE_TOKEN_INDEX = -200


def llava_hr_7b(input_image_size: int = 1024, **mod_kw) -> ModelConfig:
    """LLaVA-HR-7B (Vicuna-7B-v1.5 + CLIP-L/336 fast path + ConvNeXt-L `convnext_large_mlp` slow
    path with MR-adapters, mlp2x_gelu) at S = `input_image_size` (1024: 1024 image tokens;
    384 is its stage 1, 768 and 1536 the paper's other sizes)."""
    return ModelConfig(
        vision=VisionConfig(tower="multipath", slow=ConvNeXtConfig(), input_image_size=input_image_size),
        projector=ProjectorConfig(),
        text=LlamaConfig(vocab_size=32000, rms_norm_eps=1e-5, max_position_embeddings=4096),
        image_token_index=LLAVA_HR_IMAGE_TOKEN_INDEX, pad_token_id=0,
        mod=MoDConfig(**mod_kw) if mod_kw else MoDConfig(),
    )


def llava_hr_13b(input_image_size: int = 1024, **mod_kw) -> ModelConfig:
    """LLaVA-HR-13B: as `llava_hr_7b` with Vicuna-13B-v1.5."""
    base = llava_hr_7b(input_image_size, **mod_kw)
    return base.replace(text=dataclasses.replace(base.text, hidden_size=5120, intermediate_size=13824,
                                                 num_layers=40, num_heads=40, num_kv_heads=40))


def tiny_hr(input_image_size: int = 96, **kw) -> ModelConfig:
    """A CPU-sized LLaVA-HR with the 7B code paths. The CLIP (4 layers, patch 4, native 16 px: a
    4x4 grid) and the ConvNeXt (4 stages, stride 16) keep LLaVA-HR's geometry ratios: S = 64
    is its 768 (fast grid = native grid = slow grid), the default 96 its 1024 (position table
    resampled 4 -> 6, 36 image tokens), 32 its stage-1 384 (slow grid 2 upsampled to 4)."""
    base = tiny()
    cfg = base.replace(
        vision=VisionConfig(hidden_size=32, intermediate_size=64, num_layers=4, num_heads=4, image_size=16,
                            patch_size=4, tower="multipath", input_image_size=input_image_size,
                            slow=ConvNeXtConfig(depths=(1, 1, 2, 1), dims=(8, 16, 24, 40), patch_size=2)))
    return cfg.replace(**kw) if kw else cfg
