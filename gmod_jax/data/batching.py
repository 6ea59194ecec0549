"""Right-padding of examples to a small set of bucket lengths.

Jitted train/eval steps compile once per input shape, so sequence lengths are rounded up to a
few buckets instead of the longest example of each batch.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from gmod_jax import token_types as tt
from gmod_jax.data.llava_json import IGNORE_INDEX


def default_buckets(max_length: int, min_bucket: int = 64) -> tuple[int, ...]:
    """Powers of two from `min_bucket` below `max_length`, then `max_length` itself."""
    if max_length <= 0:
        raise ValueError(f"max_length must be positive, got {max_length}")
    buckets = []
    b = min_bucket
    while b < max_length:
        buckets.append(b)
        b *= 2
    buckets.append(max_length)
    return tuple(buckets)


def bucket_length(length: int, buckets: Sequence[int]) -> int:
    for b in sorted(buckets):
        if b >= length:
            return int(b)
    raise ValueError(f"sequence of {length} tokens is longer than the largest bucket {max(buckets)}")


def pad_to_bucket(examples: Sequence[dict[str, Any]], buckets: Sequence[int], pad_id: int,
                  batch_size: int | None = None) -> dict[str, np.ndarray]:
    """Stack examples into a batch right-padded to the smallest bucket >= the longest example.

    Padding positions get `pad_id`, label IGNORE_INDEX, no loss, token type PAD and
    attention_mask False. With `batch_size`, missing rows are added as all-padding rows with
    `valid` False (a last partial eval batch keeps the compiled shape).
    """
    if not examples:
        raise ValueError("pad_to_bucket needs at least one example")
    rows = len(examples) if batch_size is None else batch_size
    if rows < len(examples):
        raise ValueError(f"{len(examples)} examples do not fit in batch_size={batch_size}")
    lengths = np.array([len(ex["input_ids"]) for ex in examples], np.int32)
    length = bucket_length(int(lengths.max()), buckets)
    pixel_shape = np.shape(examples[0]["pixel_values"])

    batch = {
        "input_ids": np.full((rows, length), pad_id, np.int32),
        "labels": np.full((rows, length), IGNORE_INDEX, np.int32),
        "loss_mask": np.zeros((rows, length), bool),
        "token_types": np.full((rows, length), tt.PAD, np.int32),
        "attention_mask": np.zeros((rows, length), bool),
        "pixel_values": np.zeros((rows, *pixel_shape), np.float32),
        "has_image": np.zeros((rows,), bool),
        "truncated": np.zeros((rows,), bool),
        "lengths": np.zeros((rows,), np.int32),
        "valid": np.zeros((rows,), bool),
    }
    for i, ex in enumerate(examples):
        n = lengths[i]
        batch["input_ids"][i, :n] = ex["input_ids"]
        batch["labels"][i, :n] = ex["labels"]
        batch["loss_mask"][i, :n] = ex["loss_mask"]
        batch["token_types"][i, :n] = ex["token_types"]
        batch["attention_mask"][i, :n] = True
        batch["pixel_values"][i] = ex["pixel_values"]
        batch["has_image"][i] = ex["has_image"]
        batch["truncated"][i] = ex.get("truncated", False)
    batch["lengths"][: len(examples)] = lengths
    batch["valid"][: len(examples)] = True
    return batch
