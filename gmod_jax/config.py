"""Frozen configuration dataclasses for the LLaVA model and its γ-MoD adaptation.

Configs are hashable (they are static arguments of jitted functions) and serialise to plain
JSON (`to_dict` / `from_dict`), which is what checkpoints store next to their params. Reading
HF / original-LLaVA / γ-MoD `config.json` files lives in `convert/hf_config.py`.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from gmod_jax import token_types


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
        object.__setattr__(self, "depths", tuple(int(d) for d in self.depths))
        object.__setattr__(self, "dims", tuple(int(d) for d in self.dims))
        if not self.depths or len(self.depths) != len(self.dims):
            raise ValueError(f"convnext depths {self.depths} and dims {self.dims} must be non-empty and "
                             f"of equal length")
        if self.kernel_size % 2 == 0:
            raise ValueError(f"convnext kernel_size must be odd (same padding), got {self.kernel_size}")

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
# path + MR-adapters, see models/multipath.py).
VISION_TOWERS = ("clip", "multipath")


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

    def __post_init__(self):
        object.__setattr__(self, "feature_layer", _tuple(self.feature_layer))
        if isinstance(self.slow, dict):
            object.__setattr__(self, "slow", _sub_config(ConvNeXtConfig, "vision.slow", self.slow))
        if self.tower not in VISION_TOWERS:
            raise ValueError(f"vision tower must be one of {VISION_TOWERS}, got {self.tower!r}")
        if self.feature_strategy not in ("default", "full"):
            raise ValueError(f"vision feature_strategy must be 'default' or 'full', got {self.feature_strategy!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"vision hidden_size {self.hidden_size} not divisible by num_heads {self.num_heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} not divisible by patch_size {self.patch_size}")
        if self.tower == "multipath":
            self._check_multipath()
        elif self.input_image_size not in (None, self.image_size):
            raise ValueError(f"vision.input_image_size {self.input_image_size} differs from image_size "
                             f"{self.image_size}: only the 'multipath' tower resizes its input")

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
    def input_size(self) -> int:
        """Side of the square pixel input the model takes (what preprocessing produces)."""
        return self.input_image_size if self.tower == "multipath" else self.image_size

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
    def num_image_tokens(self) -> int:
        if self.tower == "multipath":
            return self.token_grid ** 2
        return self.num_patches + (1 if self.feature_strategy == "full" else 0)


@dataclasses.dataclass(frozen=True)
class ProjectorConfig:
    """Multimodal projector: `mlp{N}x_gelu` (Linear, (GELU, Linear) x N-1) or `linear`."""

    type: str = "mlp2x_gelu"
    bias: bool = True
    hidden_act: str = "gelu"  # exact erf GELU, as `ACT2FN["gelu"]`

    @property
    def depth(self) -> int:
        if self.type == "linear":
            return 1
        if self.type.startswith("mlp") and self.type.endswith("x_gelu"):
            return int(self.type[3:-6])
        raise ValueError(f"unknown projector type {self.type!r} (expected 'linear' or 'mlpNx_gelu')")


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
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(f"hidden_size {self.hidden_size} not divisible by num_heads {self.num_heads}")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} not divisible by num_kv_heads {self.num_kv_heads}")
        if not self.initializer_range > 0:
            raise ValueError(f"initializer_range must be > 0, got {self.initializer_range}")

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        return None if self.rope_scaling is None else dict(self.rope_scaling)


MOD_PLACEMENTS = ("explicit", "arank_mod", "all", "every_2nd", "two_of_three")


@dataclasses.dataclass(frozen=True)
class MoDConfig:
    """γ-MoD adaptation. Defaults reproduce the official code (see README "Faithful defaults")."""

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
    router_init: str = "kaiming_uniform"  # PyTorch nn.Linear default (LLaVA-HR code); or "xavier_uniform"

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))
        if self.masking not in token_types.MASKING_PRESETS:
            raise ValueError(f"mod.masking {self.masking!r} not in {sorted(token_types.MASKING_PRESETS)}")
        if self.implementation not in ("gather", "onehot"):
            raise ValueError(f"mod.implementation must be 'gather' or 'onehot', got {self.implementation!r}")
        if self.inference_routing not in ("threshold", "capacity"):
            raise ValueError(f"mod.inference_routing must be 'threshold' or 'capacity', got {self.inference_routing!r}")
        if not 0.0 <= self.routing_ratio < 1.0:
            raise ValueError(f"mod.routing_ratio must be in [0, 1), got {self.routing_ratio}")
        if self.loss_layer_reduction not in ("sum", "mean") or self.loss_token_reduction not in ("all", "non_pad"):
            raise ValueError("mod loss reductions: layer in {sum, mean}, token in {all, non_pad}")
        if not 0.0 < self.threshold_max_capacity <= 1.0:
            raise ValueError("mod.threshold_max_capacity must be in (0, 1]")

    @property
    def routable_types(self) -> tuple[int, ...]:
        return token_types.MASKING_PRESETS[self.masking]


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

    def __post_init__(self):
        if self.mod.enabled:
            bad = [i for i in self.mod.layers if not 0 <= i < self.text.num_layers]
            if bad:
                raise ValueError(f"mod.layers {bad} outside 0..{self.text.num_layers - 1}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in ("float32", "bfloat16", "float16"):
                raise ValueError(f"{name} must be float32, bfloat16 or float16, got {getattr(self, name)!r}")
        if self.remat not in ("none", "full", "dots"):
            raise ValueError(f"remat must be none, full or dots, got {self.remat!r}")

    @property
    def image_seq_length(self) -> int:
        """Image tokens one image contributes to the LLM sequence."""
        return self.vision.num_image_tokens

    @property
    def input_image_size(self) -> int:
        """Side of the square `pixel_values` the model takes ([N, side, side, C], channels last)."""
        return self.vision.input_size

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
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {sorted(unknown)}")
        sub = {"vision": VisionConfig, "projector": ProjectorConfig, "text": LlamaConfig, "mod": MoDConfig}
        for key, klass in sub.items():
            if key in d and isinstance(d[key], dict):
                d[key] = _sub_config(klass, key, d[key])
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        return cls.from_dict(json.loads(text))


# Nested config fields inside sub-configs (e.g. VisionConfig's ConvNeXt trunks), by field name.
_NESTED = {"slow": ConvNeXtConfig}


def _sub_config(klass, name: str, values: dict):
    """Build a sub-config from its `to_dict` form, naming unknown fields by their dotted path."""
    fields = {f.name for f in dataclasses.fields(klass)}
    bad = set(values) - fields
    if bad:
        raise ValueError(f"unknown {name} config fields: {sorted(bad)}")
    out = {}
    for k, v in values.items():
        if k in _NESTED and isinstance(v, dict):
            out[k] = _sub_config(_NESTED[k], f"{name}.{k}", v)
        else:
            out[k] = _rope(v) if k == "rope_scaling" else _tuple(v)
    return klass(**out)


def _rope(value):
    if value is None:
        return None
    if isinstance(value, dict):
        return value
    return tuple((k, _tuple(v)) for k, v in value)


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
