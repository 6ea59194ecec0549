"""Batches for the trainer: sources with resumable state, and host -> global device arrays.

A source is an iterator of per-process batches (dicts of numpy arrays with a leading row axis)
with `get_state()` / `set_state()` returning / taking a JSON-able dict, so a checkpoint stores
the exact data position. Each process yields only its rows of the global batch: for an
optimizer step of `accum` micro-batches of `micro` rows, a process whose devices hold rows
[lo, hi) of each micro-batch yields `accum * (hi - lo)` rows, micro-batch major.

Two sources:
- `SyntheticBatches`: random LLaVA-shaped batches where row r of step s depends only on
  (seed, s, r), so any process layout sees the same global batch (tests, smoke runs, AOT shapes).
- `PipelineBatches`: the Grain pipeline of `gmod_jax.data.pipeline` over LLaVA JSON or a TFDS
  ArrayRecord build, sharded by process.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import jax
import numpy as np

from gmod_jax import token_types as tt
from gmod_jax.config import ModelConfig
from train.config import DataConfig

IGNORE_INDEX = -100
MODEL_KEYS = ("input_ids", "labels", "attention_mask", "token_types", "pixel_values")


@dataclasses.dataclass(frozen=True)
class Shard:
    """This process's share of each micro-batch: rows [lo, hi) of `micro` rows."""

    lo: int
    hi: int
    micro: int
    accum: int

    @property
    def rows(self) -> int:
        return self.hi - self.lo

    @property
    def index(self) -> int:
        return self.lo // self.rows

    @property
    def count(self) -> int:
        return self.micro // self.rows


def to_model_batch(batch: dict[str, Any], pad_id: int = 0) -> dict[str, np.ndarray]:
    """The five arrays the train step uses, in its dtypes, from a data-pipeline batch.

    Accepts `labels` (-100 = no loss, HF unshifted convention) or, failing that, `loss_mask`
    (labels are then the input ids where the mask is set). Pipeline extras (`has_image`,
    `lengths`, `valid`, ...) are dropped: padding rows are already fully masked.
    """
    ids = np.asarray(batch["input_ids"], np.int32)
    if "attention_mask" in batch:
        mask = np.asarray(batch["attention_mask"]).astype(bool)
    else:
        mask = np.asarray(batch["token_types"]) != tt.PAD
    if "labels" in batch:
        labels = np.asarray(batch["labels"], np.int32)
    elif "loss_mask" in batch:
        labels = np.where(np.asarray(batch["loss_mask"]).astype(bool), ids, IGNORE_INDEX).astype(np.int32)
    else:
        raise KeyError("a batch needs `labels` or `loss_mask`")
    labels = np.where(mask, labels, IGNORE_INDEX)
    out = {"input_ids": np.where(mask, ids, pad_id).astype(np.int32), "labels": labels.astype(np.int32),
           "attention_mask": mask, "token_types": np.asarray(batch["token_types"], np.int32),
           "pixel_values": np.asarray(batch["pixel_values"], np.float32)}
    if out["pixel_values"].ndim != 4:
        raise ValueError(f"pixel_values must be [B, H, W, C], got shape {out['pixel_values'].shape}")
    return out


def pad_length(batch: dict[str, np.ndarray], length: int, pad_id: int = 0) -> dict[str, np.ndarray]:
    """Right-pad the sequence axis to `length` (processes must agree on one bucket length)."""
    t = batch["input_ids"].shape[1]
    if t == length:
        return batch
    if t > length:
        raise ValueError(f"cannot pad length {t} down to {length}")
    extra = length - t
    fill = {"input_ids": pad_id, "labels": IGNORE_INDEX, "attention_mask": False, "token_types": tt.PAD}
    out = dict(batch)
    for key, value in fill.items():
        out[key] = np.pad(batch[key], ((0, 0), (0, extra)), constant_values=value)
    return out


def split_micro(batch: dict[str, np.ndarray], accum: int) -> dict[str, np.ndarray]:
    """[accum * rows, ...] (micro-batch major) -> [accum, rows, ...]."""
    return {k: v.reshape(accum, v.shape[0] // accum, *v.shape[1:]) for k, v in batch.items()}


def global_arrays(local: dict[str, np.ndarray], sharding, rows: int, row_axis: int) -> dict[str, jax.Array]:
    """Assemble per-process arrays holding this process's rows into global arrays of `rows` rows
    on `row_axis` (1 for [accum, micro, ...] train batches, 0 for [micro, ...] eval batches)."""
    out = {}
    for k, v in local.items():
        shape = list(v.shape)
        shape[row_axis] = rows
        out[k] = jax.make_array_from_process_local_data(sharding, v, tuple(shape))
    return out


# ----------------------------------------------------------------------------------------------
# Synthetic source


class SyntheticBatches:
    """Deterministic random batches with the data pipeline's keys and LLaVA's token layout:
    [BOS+system (SYSTEM)] [image placeholders (IMAGE)] [question (QUESTION)] [answer (ANSWER)] [PAD].

    The answer is a fixed function of the question tokens, so a model can learn it and the
    loss falls. The routable prefix has a fixed length, so γ-MoD capacities (and compiles) do
    not change from step to step.
    """

    def __init__(self, model: ModelConfig, seq_len: int, shard: Shard, seed: int = 0, num_examples: int | None = None,
                 split: int = 0):
        self.model, self.seq_len, self.shard, self.seed, self.split = model, seq_len, shard, seed, split
        self.num_examples = num_examples
        self.step = 0
        self.system_len = 4
        self.image_len = model.image_seq_length
        if self.system_len + self.image_len + 4 > seq_len:
            raise ValueError(f"synthetic seq_len {seq_len} too short for {self.image_len} image tokens")
        self.pad_id = model.pad_token_id if model.pad_token_id is not None else 0
        excluded = (model.image_token_index, self.pad_id)
        self.vocab = np.asarray([v for v in range(1, min(model.text.vocab_size, 1 << 15)) if v not in excluded],
                                np.int32)

    def _row(self, step: int, row: int):
        rng = np.random.default_rng([self.seed, self.split, step, row])
        m, T, vocab = self.model, self.seq_len, self.vocab
        rest = T - self.system_len - self.image_len
        q_len = int(rng.integers(1, max(2, rest // 2)))
        a_len = int(rng.integers(1, max(2, rest - q_len)))
        ids = np.full(T, self.pad_id, np.int32)
        types = np.full(T, tt.PAD, np.int32)
        ids[: self.system_len] = vocab[rng.integers(0, min(8, len(vocab)), self.system_len)]
        types[: self.system_len] = tt.SYSTEM
        start = self.system_len
        ids[start:start + self.image_len] = m.image_token_index
        types[start:start + self.image_len] = tt.IMAGE
        start += self.image_len
        question = vocab[rng.integers(0, len(vocab), q_len)]
        ids[start:start + q_len] = question
        types[start:start + q_len] = tt.QUESTION
        start += q_len
        # answer token i = a fixed permutation of question token i (cyclically): learnable.
        answer = vocab[(np.searchsorted(vocab, question[np.arange(a_len) % q_len]) * 7 + 3) % len(vocab)]
        ids[start:start + a_len] = answer
        types[start:start + a_len] = tt.ANSWER
        labels = np.where(types == tt.ANSWER, ids, IGNORE_INDEX).astype(np.int32)
        v = m.vision
        pixels = rng.standard_normal((m.input_image_size, m.input_image_size, v.num_channels), dtype=np.float32)
        return ids, labels, types, pixels

    def batch_at(self, step: int) -> dict[str, np.ndarray]:
        s = self.shard
        rows = [m * s.micro + r for m in range(s.accum) for r in range(s.lo, s.hi)]
        parts = [self._row(step, r) for r in rows]
        ids, labels, types, pixels = (np.stack(p) for p in zip(*parts))
        return {"input_ids": ids, "labels": labels, "loss_mask": labels != IGNORE_INDEX, "token_types": types,
                "attention_mask": types != tt.PAD, "pixel_values": pixels}

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = self.batch_at(self.step)
        self.step += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"step": self.step}

    def set_state(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])


# ----------------------------------------------------------------------------------------------
# Grain pipeline source


class PipelineBatches:
    """The Grain pipeline (gmod_jax.data.pipeline) as a trainer source: LLaVA JSON or TFDS."""

    def __init__(self, cfg: DataConfig, model: ModelConfig, shard: Shard, seed: int, eval_split: bool = False):
        from gmod_jax.data import pipeline
        from gmod_jax.data.llava_json import LlavaJsonSource
        from gmod_jax.data.tfds_builder import open_tfds_source
        from gmod_jax.data.tokenizer import load_tokenizer

        path = cfg.path if not eval_split else (cfg.eval_path or (cfg.path if cfg.source == "tfds" else None))
        if path is None:
            raise ValueError(f"data.{'eval_path' if eval_split else 'path'} is not set for source {cfg.source!r}")
        tokenizer = load_tokenizer(cfg.tokenizer) if cfg.tokenizer else None
        if cfg.source == "llava_json":
            if tokenizer is None:
                raise ValueError("data.tokenizer is required for LLaVA JSON data")
            source = LlavaJsonSource(path, cfg.image_folder or ".", template=cfg.template)
        elif cfg.source == "tfds":
            source = open_tfds_source(path, split=cfg.eval_split if eval_split else cfg.split)
        else:
            raise ValueError(f"unknown data.source {cfg.source!r}")
        self.num_examples = len(source)
        pcfg = pipeline.PipelineConfig.for_model(
            model, batch_size=shard.accum * shard.rows, max_length=cfg.max_length, template=cfg.template,
            seed=seed, shuffle=cfg.shuffle and not eval_split, shard_index=shard.index, shard_count=shard.count,
            worker_count=cfg.num_workers, num_epochs=1 if eval_split else None, buckets=cfg.buckets,
            drop_remainder=not eval_split, pad_final_batch=eval_split,
            group_by_modality=cfg.group_by_modality and not eval_split)
        self.pad_id = tokenizer.pad_id if tokenizer is not None else (model.pad_token_id or 0)
        self._iter = iter(pipeline.make_dataset(source, pcfg, tokenizer))

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._iter)

    def get_state(self) -> dict[str, Any]:
        return self._iter.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._iter.set_state(state)


def make_source(cfg: DataConfig, model: ModelConfig, shard: Shard, seed: int, eval_split: bool = False):
    if cfg.source == "synthetic":
        return SyntheticBatches(model, cfg.seq_len, shard, seed=seed, num_examples=cfg.num_examples,
                                split=1 if eval_split else 0)
    return PipelineBatches(cfg, model, shard, seed, eval_split)

