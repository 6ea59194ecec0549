"""Model FLOPs of one training step with any freezing schedule, for MFU.

The per-part forward count is `gmod_jax.flops.forward_flops` (the project's one FLOP model:
MoD layers charged for their static `capacity` slots, full attention squares, logits on every
token). Its own `train_step_flops` assumes LLaVA stage 2 (vision frozen, everything else
trained); here each part's backward is charged by what actually needs gradients: one forward
for activation gradients when anything upstream (or the part itself) trains, one more for weight
gradients when the part trains. Stage 1 (projector only) thus pays 2x for the frozen LLM (its
activation gradients carry the signal back to the projector) and 1x for the vision tower.
Rematerialisation and the `onehot` MoD dispatch einsums are not counted: MFU is about model
FLOPs, the same for every implementation.
"""

from __future__ import annotations

import dataclasses

from gmod_jax import flops as model_flops
from gmod_jax.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Trainable:
    vision: bool = False
    projector: bool = True
    llm: bool = True


def _multiplier(trains: bool, upstream_trains: bool) -> float:
    return 1.0 + float(trains or upstream_trains) + float(trains)


def train_step_flops(cfg: ModelConfig, batch: int, seq_len: int, capacity: int | None,
                     trainable: Trainable = Trainable()) -> float:
    """Model FLOPs of one optimizer step over `batch` rows of `seq_len` tokens."""
    fwd = model_flops.forward_flops(cfg, batch, seq_len, kept=capacity, logits="all")
    return (fwd.vision * _multiplier(trainable.vision, False)
            + fwd.projector * _multiplier(trainable.projector, trainable.vision)
            + (fwd.llm - fwd.dispatch) * _multiplier(trainable.llm, trainable.projector or trainable.vision))


def peak_tflops(device_kind: str) -> float | None:
    """bf16 dense peak TFLOP/s per device (None for CPUs and unknown devices)."""
    peak = model_flops.peak_flops(device_kind)
    return None if peak is None else peak / 1e12
