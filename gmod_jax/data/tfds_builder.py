"""LLaVA JSON + images -> a TFDS dataset in ArrayRecord format, built and read without TensorFlow.

On-disk record (one per sample; TFDS features, none needs TF to encode):

  id           Text                       record id from the JSON
  input_ids    int32 [N]  (zlib)          token ids with ONE IMAGE_PLACEHOLDER (-200) per image
  token_types  int8  [N]  (zlib)          gmod_jax.token_types values
  loss_mask    bool  [N]  (zlib)          True on answer tokens (LM loss)
  image        bytes                      the original encoded image file (b"" when none)
  image_path   Text                       path relative to the image folder ("" when none)
  has_image    bool

Tokens are stored before image expansion and truncation, so one build serves any vision tower
(`image_seq_length`) and context length; images are stored encoded (a JPEG is ~30x smaller than
its 336x336 float pixels) and preprocessed when read. The tokenizer, template and bad-record
counts go into the dataset metadata; readers check the tokenizer fingerprint.

Layout: `{data_dir}/llava_conversations/{config_name}/{version}/`. Read back with
`open_tfds_source(...)`, `tfds.data_source("llava_conversations/{config_name}", data_dir=...)`
or `tfds.builder_from_directory(dir).as_data_source(split)`.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from gmod_jax.data import templates
from gmod_jax.data.errors import BadRecord, BadRecordTracker
from gmod_jax.data.images import load_image
from gmod_jax.data.llava_json import read_records, record_id, tokenize_record
from gmod_jax.data.tokenizer import IMAGE_PLACEHOLDER, EncodedText, Tokenizer

log = logging.getLogger(__name__)

DATASET_NAME = "llava_conversations"
FORMAT_VERSION = 1
_WINDOW = 2048  # records handed to the worker pool at a time (bounds memory of pending images)


def _tfds():
    import tensorflow_datasets as tfds

    return tfds


def features():
    tfds = _tfds()
    zlib = tfds.features.Encoding.ZLIB
    return tfds.features.FeaturesDict({
        "id": tfds.features.Text(),
        "input_ids": tfds.features.Tensor(shape=(None,), dtype=np.int32, encoding=zlib),
        "token_types": tfds.features.Tensor(shape=(None,), dtype=np.int8, encoding=zlib),
        "loss_mask": tfds.features.Tensor(shape=(None,), dtype=np.bool_, encoding=zlib),
        "image": tfds.features.Tensor(shape=(), dtype=np.object_),
        "image_path": tfds.features.Text(),
        "has_image": tfds.features.Scalar(dtype=np.bool_),
    })


def encode_for_storage(record: dict, index: int, tokenizer: Tokenizer, template: str, move_image_to_front: bool,
                       image_root: str, verify_images: bool = True) -> dict[str, Any]:
    """One JSON record -> the stored feature dict (raises BadRecord)."""
    rid = record_id(record, index)
    encoded = tokenize_record(record, tokenizer, template, move_image_to_front=move_image_to_front, index=index)
    image_rel = record.get("image")
    image_bytes = b""
    if image_rel is not None:
        path = Path(image_root) / image_rel
        if not path.is_file():
            raise BadRecord(rid, f"image file not found: {path}")
        image_bytes = path.read_bytes()
        if verify_images:
            load_image(image_bytes, name=f"{rid} ({path})")  # corrupt files fail the build, not training
    return {
        "id": rid,
        "input_ids": encoded.input_ids.astype(np.int32),
        "token_types": encoded.token_types.astype(np.int8),
        "loss_mask": encoded.loss_mask.astype(np.bool_),
        "image": image_bytes,
        "image_path": image_rel or "",
        "has_image": image_rel is not None,
    }


# Worker-process state for parallel builds (spawned workers receive the tokenizer once).
_WORKER: dict[str, Any] = {}


def _worker_init(settings: dict) -> None:
    _WORKER.update(settings)


def _worker_encode(item: tuple[int, dict]):
    index, record = item
    try:
        return "ok", index, encode_for_storage(record, index, **_WORKER)
    except BadRecord as e:
        return "bad", e.record_id, e.reason


def _make_builder_class():
    tfds = _tfds()

    class LlavaConversations(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        """LLaVA conversations, pre-tokenised (see module docstring for the record format)."""

        VERSION = tfds.core.Version("1.0.0")
        RELEASE_NOTES = {"1.0.0": "Pre-tokenised LLaVA conversations with token types and raw image bytes."}

        # No download checksums live next to this code. TFDS's default lookup of that file
        # imports the `importlib_resources` backport, which is not a dependency of TFDS 4.9.10
        # and is missing here, so a builder defined inside a package would fail to prepare.
        @tfds.core.utils.classproperty
        @classmethod
        def code_path(cls):
            return None

        def __init__(self, *, splits: Mapping[str, tuple[str, str]] | None = None, tokenizer: Tokenizer | None = None,
                     template: str = "vicuna_v1", move_image_to_front: bool = True, max_bad_fraction: float = 0.01,
                     verify_images: bool = True, num_workers: int = 0, **kwargs):
            self._splits = dict(splits or {})
            self._tokenizer = tokenizer
            self._template = templates.get_template(template).name
            self._move_image_to_front = move_image_to_front
            self._max_bad_fraction = max_bad_fraction
            self._verify_images = verify_images
            self._num_workers = num_workers
            super().__init__(**kwargs)

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                description="LLaVA-format conversations tokenised for gmod_jax (token types, loss mask, image bytes).",
                features=features(),
                metadata=tfds.core.MetadataDict(),
                disable_shuffling=True,  # keep JSON order; the Grain pipeline shuffles
            )

        def _split_generators(self, dl_manager):
            if not self._splits or self._tokenizer is None:
                raise ValueError("building needs `splits` ({split: (json_path, image_root)}) and a tokenizer")
            tok = self._tokenizer
            self.info.metadata.update({
                "format_version": FORMAT_VERSION,
                "tokenizer_fingerprint": tok.fingerprint,
                "tokenizer_kind": tok.kind,
                "vocab_size": tok.vocab_size,
                "bos_id": tok.bos_id, "eos_id": tok.eos_id, "pad_id": tok.pad_id,
                "image_placeholder": IMAGE_PLACEHOLDER,
                "template": self._template,
                "move_image_to_front": self._move_image_to_front,
                "bad_records": {},
            })
            return {name: self._generate_examples(name, str(json_path), str(image_root))
                    for name, (json_path, image_root) in self._splits.items()}

        def _generate_examples(self, split: str, json_path: str, image_root: str):
            records = read_records(json_path)
            tracker = BadRecordTracker(self._max_bad_fraction, total=len(records), what=f"records of split {split!r}")
            has_image = []  # per stored record, in order: lets the pipeline group batches by modality
            settings = dict(tokenizer=self._tokenizer, template=self._template,
                            move_image_to_front=self._move_image_to_front, image_root=image_root,
                            verify_images=self._verify_images)
            for status, key, value in _encode_all(records, settings, self._num_workers):
                if status == "ok":
                    tracker.ok()
                    has_image.append("1" if value["has_image"] else "0")
                    yield key, value
                else:
                    tracker.record_bad(key, value)
            tracker.check(final=True)
            self.info.metadata["bad_records"][split] = {
                "num_records": len(records), "num_bad": tracker.bad, "bad_examples": tracker.bad_examples}
            self.info.metadata.setdefault("has_image", {})[split] = "".join(has_image)

    return LlavaConversations


def _encode_all(records: list, settings: dict, num_workers: int):
    items = list(enumerate(records))
    if num_workers <= 0:
        _WORKER.clear()
        _WORKER.update(settings)
        try:
            yield from map(_worker_encode, items)
        finally:
            _WORKER.clear()
        return
    # spawn: the parent may hold JAX/XLA threads that do not survive fork.
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(num_workers, initializer=_worker_init, initargs=(settings,)) as pool:
        for start in range(0, len(items), _WINDOW):
            yield from pool.map(_worker_encode, items[start:start + _WINDOW], chunksize=32)


_BUILDER_CLASS = None


def builder_class():
    """The TFDS builder class (created lazily: importing TFDS is slow, and most readers never need it)."""
    global _BUILDER_CLASS
    if _BUILDER_CLASS is None:
        _BUILDER_CLASS = _make_builder_class()
    return _BUILDER_CLASS


def build_tfds(data_dir: str | os.PathLike, config_name: str, splits: Mapping[str, tuple[str, str]], tokenizer: Tokenizer,
               *, template: str = "vicuna_v1", move_image_to_front: bool = True, max_bad_fraction: float = 0.01,
               verify_images: bool = True, num_workers: int = 0, show_progress: bool = False) -> Path:
    """Build (or reuse, if already complete) the ArrayRecord dataset; returns its directory.

    `splits` maps split names to (LLaVA JSON path, image folder). Bad records are skipped with a
    warning; more than `max_bad_fraction` of a split raises TooManyBadRecords naming them, and
    nothing is written.
    """
    tfds = _tfds()
    from tensorflow_datasets.core.utils import tqdm_utils

    builder = builder_class()(
        splits=splits, tokenizer=tokenizer, template=template, move_image_to_front=move_image_to_front,
        max_bad_fraction=max_bad_fraction, verify_images=verify_images, num_workers=num_workers,
        data_dir=str(data_dir), config=tfds.core.BuilderConfig(name=config_name,
                                                               description=f"{template}, tokenizer {tokenizer.fingerprint}"))
    previous = getattr(tqdm_utils, "_active", True)
    tfds.display_progress_bar(show_progress)
    try:
        builder.download_and_prepare(file_format="array_record",
                                     download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    finally:
        tfds.display_progress_bar(previous)
    return Path(builder.data_dir)


class TfdsLlavaSource:
    """Random-access source over a built split; records come back as numpy / bytes / str.

    Picklable (Grain workers reopen the ArrayRecord files). `metadata` holds the build settings.
    """

    def __init__(self, dataset_dir: str | os.PathLike, split: str = "train"):
        self.dataset_dir = str(dataset_dir)
        self.split = split
        self._open()

    def _open(self):
        tfds = _tfds()
        builder = tfds.builder_from_directory(self.dataset_dir)
        self.metadata = dict(builder.info.metadata or {})
        if self.metadata.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{self.dataset_dir}: unsupported format_version {self.metadata.get('format_version')}")
        self._source = builder.as_data_source(split=self.split)

    def __getstate__(self):
        return {"dataset_dir": self.dataset_dir, "split": self.split}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._open()

    def __len__(self) -> int:
        return len(self._source)

    def has_image_flags(self) -> list[bool]:
        """Per-record modality, recorded at build time (older builds: read every record)."""
        flags = (self.metadata.get("has_image") or {}).get(self.split)
        if flags is not None and len(flags) == len(self):
            return [c == "1" for c in flags]
        return [bool(self._source[i]["has_image"]) for i in range(len(self))]

    def __getitem__(self, index: int) -> dict[str, Any]:
        rec = self._source[index]
        return {
            "id": _text(rec["id"]),
            "input_ids": np.asarray(rec["input_ids"], np.int32),
            "token_types": np.asarray(rec["token_types"], np.int8),
            "loss_mask": np.asarray(rec["loss_mask"], bool),
            "image": bytes(rec["image"]),
            "image_path": _text(rec["image_path"]),
            "has_image": bool(rec["has_image"]),
        }

    def check_tokenizer(self, tokenizer: Tokenizer) -> None:
        built = self.metadata.get("tokenizer_fingerprint")
        if built != tokenizer.fingerprint:
            raise ValueError(f"{self.dataset_dir} was tokenised with tokenizer {built}, "
                             f"not the given one ({tokenizer.fingerprint}); rebuild it")

    def __repr__(self) -> str:
        return f"TfdsLlavaSource({self.dataset_dir}, split={self.split!r}, n={len(self)})"


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, (bytes, np.bytes_)) else str(value)


def open_tfds_source(data_dir: str | os.PathLike, config_name: str | None = None, split: str = "train",
                     version: str | None = None) -> TfdsLlavaSource:
    """Open a built split: `data_dir` is either the version directory itself or the TFDS data_dir."""
    path = Path(data_dir)
    if not (path / "dataset_info.json").is_file():
        if config_name is None:
            raise ValueError(f"{path} is not a dataset directory; pass config_name")
        base = path / DATASET_NAME / config_name
        versions = sorted((p for p in base.glob("*") if (p / "dataset_info.json").is_file()),
                          key=lambda p: tuple(int(x) for x in p.name.split(".")))
        if version is not None:
            versions = [p for p in versions if p.name == version]
        if not versions:
            raise FileNotFoundError(f"no built dataset under {base}")
        path = versions[-1]
    return TfdsLlavaSource(path, split)


def stored_to_encoded(rec: dict[str, Any]) -> EncodedText:
    return EncodedText(rec["input_ids"], rec["token_types"], rec["loss_mask"])
