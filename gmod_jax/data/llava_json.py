"""LLaVA conversation JSON: records, validation, and encoding into model-ready examples.

A record is LLaVA's format: {"id", "image" (optional, relative to an image folder),
"conversations": [{"from": "human"|"gpt", "value": ...}, ...]}. Encoding happens in two steps
so that the TFDS ArrayRecord dataset can store the first one:

1. `tokenize_record`: template + tokenizer -> ids with one IMAGE_PLACEHOLDER per image, token
   types, loss mask (independent of the vision tower and of the context length);
2. `finalize_example`: expand the image block to `image_seq_length` model tokens, truncate to
   `max_length`, load and preprocess the image.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from gmod_jax import token_types as tt
from gmod_jax.data import templates
from gmod_jax.data.errors import BadRecord, BadRecordTracker
from gmod_jax.data.images import ImageConfig, preprocess_image
from gmod_jax.data.tokenizer import IMAGE_PLACEHOLDER, EncodedText, Tokenizer, expand_image_placeholder

IGNORE_INDEX = -100  # label of tokens without LM loss (PyTorch / LLaVA convention)


def record_id(record: Any, index: int | None = None) -> str:
    if isinstance(record, dict) and record.get("id") is not None:
        return str(record["id"])
    return f"#{index}" if index is not None else "?"


def read_records(path: str | os.PathLike) -> list[dict]:
    """Read a LLaVA JSON list (`.json`) or one record per line (`.jsonl`)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        records = json.loads(text)
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    return records


def validate_record(record: Any, template="vicuna_v1", *, move_image_to_front: bool = True, index: int | None = None,
                    image_root: str | os.PathLike | None = None, check_image_exists: bool = False) -> None:
    """Raise BadRecord (naming the id) if the record cannot be rendered with `template`."""
    rid = record_id(record, index)
    if not isinstance(record, dict):
        raise BadRecord(rid, f"record is a {type(record).__name__}, not a dict")
    image = record.get("image")
    if image is not None and (not isinstance(image, str) or not image):
        raise BadRecord(rid, f"'image' must be a non-empty relative path, got {image!r}")
    templates.render_conversation(record.get("conversations"), template, has_image=image is not None,
                                  move_image_to_front=move_image_to_front, record_id=rid)
    if check_image_exists and image is not None:
        path = Path(image_root or ".") / image
        if not path.is_file():
            raise BadRecord(rid, f"image file not found: {path}")


def tokenize_record(record: dict, tokenizer: Tokenizer, template="vicuna_v1", *, move_image_to_front: bool = True,
                    index: int | None = None) -> EncodedText:
    """Render and tokenise one record (ids keep a single IMAGE_PLACEHOLDER per image)."""
    rid = record_id(record, index)
    if not isinstance(record, dict):
        raise BadRecord(rid, f"record is a {type(record).__name__}, not a dict")
    segments = templates.render_conversation(record.get("conversations"), template,
                                             has_image=record.get("image") is not None,
                                             move_image_to_front=move_image_to_front, record_id=rid)
    return tokenizer.encode_segments(segments, add_bos=True)


def finalize_example(encoded: EncodedText, image, *, image_cfg: ImageConfig, max_length: int, image_token_index: int,
                     image_seq_length: int, record_id: str = "?", image_name: str | None = None) -> dict[str, Any]:
    """Expand the image block, truncate to `max_length`, preprocess the image.

    `image` is a path, encoded bytes, a PIL image, or None for text-only samples. The image block
    is never cut: if it does not fit in `max_length`, or no answer token survives truncation, the
    sample is a BadRecord (LLaVA would silently train on a broken or loss-free sample).
    """
    n_images = int(np.sum(encoded.input_ids == IMAGE_PLACEHOLDER))
    if n_images != (image is not None):
        raise BadRecord(record_id, f"{n_images} image placeholders but {'an' if image is not None else 'no'} image")
    full = expand_image_placeholder(encoded, image_token_index, image_seq_length)
    length = len(full.input_ids)
    truncated = length > max_length
    if truncated:
        if np.any(full.token_types[max_length:] == tt.IMAGE):
            raise BadRecord(record_id, f"image block does not fit in max_length={max_length} "
                                       f"(sequence of {length} tokens)")
        full = EncodedText(*(a[:max_length] for a in full))
    if not full.loss_mask.any():
        raise BadRecord(record_id, f"no answer token within max_length={max_length}")
    if image is not None:
        pixels = preprocess_image(image, image_cfg, name=image_name or record_id)
    else:
        pixels = image_cfg.blank()
    ids = full.input_ids.astype(np.int32)
    return {
        "id": record_id,
        "input_ids": ids,
        "labels": np.where(full.loss_mask, ids, IGNORE_INDEX).astype(np.int32),
        "loss_mask": full.loss_mask.astype(bool),
        "token_types": full.token_types.astype(np.int32),
        "pixel_values": pixels,
        "has_image": np.bool_(image is not None),
        "truncated": np.bool_(truncated),
    }


def encode_example(record: dict, tokenizer: Tokenizer, template="vicuna_v1", image_root: str | os.PathLike = ".",
                   image_cfg: ImageConfig = ImageConfig(), max_length: int = 2048, image_token_index: int = 32000,
                   image_seq_length: int = 576, *, move_image_to_front: bool = True,
                   index: int | None = None) -> dict[str, Any]:
    """One LLaVA JSON record -> dict of numpy arrays (see `finalize_example`)."""
    rid = record_id(record, index)
    encoded = tokenize_record(record, tokenizer, template, move_image_to_front=move_image_to_front, index=index)
    image = record.get("image")
    image_path = None if image is None else Path(image_root) / image
    return finalize_example(encoded, image_path, image_cfg=image_cfg, max_length=max_length,
                            image_token_index=image_token_index, image_seq_length=image_seq_length, record_id=rid,
                            image_name=None if image_path is None else f"{rid} ({image_path})")


def encode_prompt(conversation, tokenizer: Tokenizer, template="vicuna_v1", image=None, *,
                  image_cfg: ImageConfig = ImageConfig(), image_token_index: int = 32000, image_seq_length: int = 576,
                  move_image_to_front: bool = True) -> dict[str, Any]:
    """Inference input: a question string (or conversation ending with a human turn) + image.

    With an image and no `<image>` tag in the text, the tag is added in front of the question.
    Returns unpadded `input_ids`, `token_types`, `pixel_values` and `has_image`.
    """
    if isinstance(conversation, str):
        conversation = [{"from": templates.HUMAN, "value": conversation}]
    conversation = [dict(t) for t in conversation]
    has_tag = any(templates.IMAGE_TAG in t["value"] for t in conversation)
    if image is not None and not has_tag:
        first_human = next(t for t in conversation if templates.ROLE_ALIASES.get(t["from"].lower()) == templates.HUMAN)
        first_human["value"] = templates.IMAGE_TAG + "\n" + first_human["value"]
    segments = templates.render_prompt(conversation, template, has_image=image is not None,
                                       move_image_to_front=move_image_to_front)
    encoded = expand_image_placeholder(tokenizer.encode_segments(segments), image_token_index, image_seq_length)
    return {
        "input_ids": encoded.input_ids.astype(np.int32),
        "token_types": encoded.token_types.astype(np.int32),
        "pixel_values": image_cfg.blank() if image is None else preprocess_image(image, image_cfg),
        "has_image": np.bool_(image is not None),
    }


class LlavaJsonSource:
    """Random-access source (Grain protocol: `__len__`, `__getitem__`) over LLaVA JSON records.

    Structurally invalid records (malformed conversation, `<image>` tag mismatch, optionally a
    missing image file) are dropped here, counted against `max_bad_fraction` over the whole
    file; errors found later (corrupt image, sequence too long) are counted by the pipeline.
    Records are kept as compact JSON bytes: the source is pickled into every Grain worker.
    """

    def __init__(self, records: str | os.PathLike | Sequence[dict], image_root: str | os.PathLike = ".", *,
                 template="vicuna_v1", move_image_to_front: bool = True, validate: bool = True,
                 check_images: bool = False, max_bad_fraction: float = 0.01):
        self.path = None if isinstance(records, (list, tuple)) else str(records)
        raw = read_records(records) if self.path is not None else list(records)
        self.image_root = str(image_root)
        self.template = templates.get_template(template).name
        self.move_image_to_front = move_image_to_front
        tracker = BadRecordTracker(max_bad_fraction, total=len(raw), what=f"records in {self.path or 'records'}")
        kept = []
        for i, rec in enumerate(raw):
            if validate:
                try:
                    validate_record(rec, self.template, move_image_to_front=move_image_to_front, index=i,
                                    image_root=self.image_root, check_image_exists=check_images)
                except BadRecord as e:
                    tracker.record_bad(e.record_id, e.reason)
                    continue
            tracker.ok()
            if isinstance(rec, dict) and rec.get("id") is None:
                rec = {**rec, "id": f"#{i}"}
            kept.append(json.dumps(rec, ensure_ascii=False).encode("utf-8"))
        tracker.check(final=True)
        self.num_bad = tracker.bad
        self.bad_examples = list(tracker.bad_examples)
        self._records = kept

    def __len__(self) -> int:
        return len(self._records)

    def has_image_flags(self) -> list[bool]:
        return [bool(json.loads(r).get("image")) for r in self._records]

    def __getitem__(self, index: int) -> dict:
        return json.loads(self._records[index])

    def __repr__(self) -> str:
        return f"LlavaJsonSource({self.path or 'records'}, n={len(self)}, dropped={self.num_bad})"
