"""Training configuration: frozen dataclasses and recipe files.

A recipe is a Python file defining `get_config() -> TrainConfig` (see configs/). Reading config
files and `--set key=value` overrides is the core library's (`gmod_jax.config_files`).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from gmod_jax.config import ModelConfig
from gmod_jax.config_files import load_config_file
from gmod_jax.data import templates
from gmod_jax.sharding import MeshConfig


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup and cosine (or linear / constant) decay to 0, as HF Trainer."""

    lr: float = 2e-5
    schedule: str = "cosine"  # "cosine" | "linear" | "constant" (all after warmup)
    warmup_ratio: float = 0.03  # of the total number of optimizer steps, rounded up (HF)
    warmup_steps: int | None = None  # overrides warmup_ratio when set
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0  # LLaVA / γ-MoD scripts use 0
    # Params matching any of these get no weight decay (HF Trainer: biases and norm weights).
    no_decay: tuple[str, ...] = (r"/bias$", r"(norm|ln\d*)/scale$")
    grad_clip: float | None = 1.0  # global-norm clip (HF max_grad_norm); None = off
    grad_accum_steps: int = 1  # micro-batches per optimizer step (scanned inside one jit)
    # Regexes over param paths (docs/param_layout.md); a param trains iff one matches, all others
    # are frozen: no gradient computed, no optimizer state, bitwise unchanged.
    trainable: tuple[str, ...] = (r".*",)

    def __post_init__(self):
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"optim.schedule must be cosine, linear or constant, got {self.schedule!r}")
        if self.grad_accum_steps < 1:
            raise ValueError("optim.grad_accum_steps must be >= 1")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError("optim.warmup_ratio must be in [0, 1)")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where batches come from. `synthetic` is a deterministic random LLaVA-shaped source (tests,
    smoke runs); `llava_json` / `tfds` go through the Grain pipeline in gmod_jax.data."""

    source: str = "synthetic"  # "synthetic" | "llava_json" | "tfds"
    path: str | None = None  # LLaVA JSON file, or TFDS data_dir / dataset name
    image_folder: str | None = None
    tokenizer: str | None = None  # tokenizer.model / tokenizer.json / HF dir
    template: str = "vicuna_v1"  # conversation template ("plain" for stage 1 pretraining)
    max_length: int = 2048  # model_max_length: longer samples are truncated
    # Padded sequence lengths (one compile each); None = powers of two from 64, then max_length.
    buckets: tuple[int, ...] | None = None
    split: str = "train"  # TFDS split
    eval_path: str | None = None  # eval JSON / TFDS dir (TFDS default: `path`)
    eval_split: str = "eval"  # TFDS split for periodic eval
    shuffle: bool = True
    num_workers: int = 0  # Grain worker processes (0 = in the main process)
    # Homogeneous image / text-only batches (official `group_by_modality_length True`): a text-only
    # row has nothing routable and the static MoD capacity is the batch minimum.
    group_by_modality: bool = True
    # synthetic source only
    seq_len: int = 64
    num_examples: int = 1024  # dataset size that defines an epoch for the synthetic source

    def __post_init__(self):
        if self.source not in ("synthetic", "llava_json", "tfds"):
            raise ValueError(f"data.source must be synthetic, llava_json or tfds, got {self.source!r}")
        templates.get_template(self.template)  # raises on unknown names, listing the known ones


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run. Either `model` (random init) or `init_from` (a gmod-jax checkpoint dir
    written by `python -m convert` / `train.export`) or both (the checkpoint's leaves overwrite
    the random init of `model`; leaves it lacks, e.g. a fresh γ-MoD router, stay random)."""

    model: ModelConfig | None = None
    init_from: str | None = None
    init_skip: tuple[str, ...] = ()  # param path regexes NOT taken from init_from (re-initialised)
    # Precision / memory overrides applied to the model config (None = keep the model's value).
    compute_dtype: str | None = None  # "bfloat16" for bf16 matmuls with float32 params
    param_dtype: str | None = None
    remat: str | None = None  # "none" | "full" | "dots"

    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)

    global_batch: int = 8  # sequences per optimizer step, over all devices and micro-batches
    num_epochs: float = 1.0
    num_steps: int | None = None  # overrides num_epochs when set

    log_every: int = 10
    eval_every: int = 0  # 0 = never
    eval_steps: int = 10
    checkpoint_every: int = 500  # 0 = only at the end / on SIGTERM
    save_checkpoints: bool = True  # False: never write (benchmarks, equivalence tests); resume still reads
    keep_checkpoints: int = 3
    async_checkpointing: bool = True
    export_dir: str | None = None  # write final params as a gmod-jax checkpoint dir here
    seed: int = 0
    peak_tflops_per_device: float | None = None  # for MFU; None = look up the device kind
    # Persistent XLA compilation cache (CLI): a resumed or repeated run skips recompiling.
    compilation_cache_dir: str | None = None
    progress_bar: bool = True

    def __post_init__(self):
        if self.model is None and self.init_from is None:
            raise ValueError("TrainConfig needs `model`, `init_from`, or both")
        if self.global_batch % self.optim.grad_accum_steps:
            raise ValueError(f"global_batch {self.global_batch} not divisible by "
                             f"optim.grad_accum_steps {self.optim.grad_accum_steps}")
        for name in ("log_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")

    @property
    def micro_batch(self) -> int:
        return self.global_batch // self.optim.grad_accum_steps

    def resolve_model(self, model: ModelConfig) -> ModelConfig:
        """Apply the precision / remat overrides to a model config."""
        kw = {k: v for k, v in (("dtype", self.compute_dtype), ("param_dtype", self.param_dtype),
                                ("remat", self.remat)) if v is not None}
        return model.replace(**kw) if kw else model

    def total_steps(self, num_examples: int | None) -> int:
        if self.num_steps is not None:
            return self.num_steps
        if num_examples is None:
            raise ValueError("the data source has no known size: set num_steps")
        return max(1, math.ceil(num_examples * self.num_epochs / self.global_batch))

    def replace(self, **kw) -> "TrainConfig":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------
# Recipe files


def load_recipe(path: str | Path) -> TrainConfig:
    """A training recipe file (configs/*.py defining `get_config()`)."""
    return load_config_file(path, TrainConfig)


def load_mesh_preset(path: str | Path) -> MeshConfig:
    """A mesh preset file (configs/mesh_*.py defining `get_mesh()`)."""
    return load_config_file(path, MeshConfig, "get_mesh")
