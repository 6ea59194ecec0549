"""Grain input pipeline over a LLaVA JSON source or a TFDS ArrayRecord source.

  MapDataset.source -> shuffle(seed) -> repeat(num_epochs) -> shard [index::count]
    -> map(encode) -> to_iter_dataset -> [mp_prefetch(workers)] -> bad-record filter -> batch(pad_to_bucket)

Sharding after shuffle/repeat splits one global, seeded stream among processes, so the data a
run sees does not depend on the number of hosts, and every host gets the same number of
batches. Bad records are turned into markers inside the (possibly multi-process) map and
counted in the main process, after the workers' outputs are merged back into stream order:
counts, warnings and the `max_bad_fraction` decision are global and part of the iterator
state, and the batches do not depend on the worker count.

The iterator is a `grain.DatasetIterator`: `get_state()` / `set_state()` (a JSON-able dict) or
Orbax `grain.checkpoint.CheckpointSave/Restore` resume it exactly.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import grain
import numpy as np

from gmod_jax.data import templates
from gmod_jax.data.batching import default_buckets, pad_to_bucket
from gmod_jax.data.errors import BadRecord, BadRecordTracker
from gmod_jax.data.images import ImageConfig, image_config_for
from gmod_jax.data.llava_json import LlavaJsonSource, finalize_example, record_id, tokenize_record
from gmod_jax.data.tfds_builder import TfdsLlavaSource, stored_to_encoded
from gmod_jax.data.tokenizer import Tokenizer

_BAD = "__bad_record__"


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    batch_size: int  # per process
    max_length: int
    image_token_index: int
    image_seq_length: int
    image: ImageConfig = ImageConfig()
    template: str = "vicuna_v1"  # JSON sources only (TFDS sources were tokenised at build time)
    move_image_to_front: bool = True
    buckets: tuple[int, ...] | None = None  # None: default_buckets(max_length)
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None  # None: repeat forever
    shard_index: int | None = None  # None: jax.process_index()
    shard_count: int | None = None  # None: jax.process_count()
    drop_remainder: bool = True
    pad_final_batch: bool = False  # with drop_remainder=False: fill the last batch with invalid rows
    worker_count: int = 0  # grain mp_prefetch processes; 0 = in-process
    worker_buffer_size: int = 2
    read_threads: int = 2  # threads of the in-process map (image decoding releases the GIL)
    read_buffer_size: int = 16
    max_bad_fraction: float = 0.01
    # Batches of image samples only or text-only samples only (LLaVA's group_by_modality_length).
    # γ-MoD's static capacity is the minimum over a batch's rows, and a text-only row has nothing
    # routable, so one text-only sample in a batch would switch MoD skipping off for all of it.
    group_by_modality: bool = False

    def __post_init__(self):
        if self.batch_size <= 0 or self.max_length <= 0:
            raise ValueError("batch_size and max_length must be positive")
        if self.buckets is not None:
            object.__setattr__(self, "buckets", tuple(sorted(int(b) for b in self.buckets)))
            if self.buckets[-1] < self.max_length:
                raise ValueError(f"largest bucket {self.buckets[-1]} < max_length {self.max_length}")
        if (self.shard_index is None) != (self.shard_count is None):
            raise ValueError("give both shard_index and shard_count, or neither")
        if self.shard_count is not None and not 0 <= self.shard_index < self.shard_count:
            raise ValueError(f"shard_index {self.shard_index} outside 0..{self.shard_count - 1}")
        templates.get_template(self.template)

    @property
    def resolved_buckets(self) -> tuple[int, ...]:
        return self.buckets if self.buckets is not None else default_buckets(self.max_length)

    @classmethod
    def for_model(cls, model_config, batch_size: int, max_length: int, **kw) -> "PipelineConfig":
        """Take image size, image token id and image_seq_length from a `gmod_jax.config.ModelConfig`."""
        image = kw.pop("image", None) or image_config_for(model_config)
        if image.image_size != model_config.input_image_size:
            raise ValueError(f"image size {image.image_size} != the model's input size {model_config.input_image_size}")
        return cls(batch_size=batch_size, max_length=max_length, image_token_index=model_config.image_token_index,
                   image_seq_length=model_config.image_seq_length, image=image, **kw)


class _Encode:
    """Record -> example dict, or a bad-record marker (picklable for Grain workers)."""

    def __init__(self, config: PipelineConfig, tokenizer: Tokenizer | None, image_root: str | None):
        self.config = config
        self.tokenizer = tokenizer
        self.image_root = image_root

    def __call__(self, record: dict) -> dict[str, Any]:
        cfg = self.config
        rid = record_id(record)
        try:
            if self.image_root is None:  # TFDS record: already tokenised
                encoded = stored_to_encoded(record)
                image = record["image"] if record["has_image"] else None
                name = f"{rid} ({record['image_path']})"
            else:
                encoded = tokenize_record(record, self.tokenizer, cfg.template,
                                          move_image_to_front=cfg.move_image_to_front)
                image = None if record.get("image") is None else f"{self.image_root}/{record['image']}"
                name = f"{rid} ({image})"
            return finalize_example(encoded, image, image_cfg=cfg.image, max_length=cfg.max_length,
                                    image_token_index=cfg.image_token_index, image_seq_length=cfg.image_seq_length,
                                    record_id=rid, image_name=name)
        except BadRecord as e:
            return {_BAD: True, "id": e.record_id, "reason": e.reason}


class _BadRecordFilterIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, max_bad_fraction: float):
        super().__init__(parent)
        self.tracker = BadRecordTracker(max_bad_fraction)

    def __next__(self):
        while True:
            element = next(self._parent)
            if _BAD in element:
                self.tracker.record_bad(element["id"], element["reason"])
                continue
            self.tracker.ok(truncated=bool(element["truncated"]))
            return element

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._parent.get_state(), "records": self.tracker.get_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self.tracker.set_state(state["records"])


class BadRecordFilterIterDataset(grain.IterDataset):
    """Drops bad-record markers, counting them (and truncations) in the iterator state."""

    def __init__(self, parent: grain.IterDataset, max_bad_fraction: float):
        super().__init__(parent)
        self.max_bad_fraction = max_bad_fraction

    def __iter__(self) -> _BadRecordFilterIterator:
        return _BadRecordFilterIterator(self._parent.__iter__(), self.max_bad_fraction)

    def __str__(self) -> str:
        return f"BadRecordFilterIterDataset(max_bad_fraction={self.max_bad_fraction})"


class _PadBatch:
    def __init__(self, buckets: Sequence[int], pad_id: int, batch_size: int | None):
        self.buckets = tuple(buckets)
        self.pad_id = pad_id
        self.batch_size = batch_size

    def __call__(self, examples):
        return pad_to_bucket(examples, self.buckets, self.pad_id, batch_size=self.batch_size)


class ModalityGroupedOrder:
    """Per-epoch record order in which every run of `group` consecutive records (one global batch:
    per-process batch × processes, so strided sharding keeps each process's batch homogeneous)
    has a single modality. Each modality is shuffled on its own, cut into groups, and the groups
    are shuffled; the leftovers of both modalities form one mixed group at the end of the epoch.
    Deterministic in (seed, epoch), so the iterator state stays a plain position.
    """

    def __init__(self, has_image: Sequence[bool], group: int, seed: int, shuffle: bool = True):
        self.has_image = np.asarray(has_image, bool)
        self.group, self.seed, self.shuffle = group, seed, shuffle
        self._cache: tuple[int, np.ndarray] | None = None

    def epoch_order(self, epoch: int) -> np.ndarray:
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        rng = np.random.default_rng([self.seed, epoch])
        chunks, leftovers = [], []
        for flag in (True, False):
            idx = np.flatnonzero(self.has_image == flag)
            if self.shuffle:
                idx = rng.permutation(idx)
            full = len(idx) // self.group * self.group
            chunks += list(idx[:full].reshape(-1, self.group))
            leftovers.append(idx[full:])
        if self.shuffle:
            chunks = [chunks[i] for i in rng.permutation(len(chunks))]
        order = np.concatenate(chunks + leftovers).astype(np.int64)
        self._cache = (epoch, order)
        return order

    def __call__(self, index: int) -> int:
        n = len(self.has_image)
        return int(self.epoch_order(index // n)[index % n])


class _Lookup:
    """map_with_index function: global position -> the record at that place of its epoch's order."""

    def __init__(self, source, order: ModalityGroupedOrder):
        self.source, self.order = source, order

    def __call__(self, index: int, _):
        return self.source[self.order(index)]


def _shard(config: PipelineConfig) -> tuple[int, int]:
    if config.shard_count is not None:
        return config.shard_index, config.shard_count
    import jax

    return jax.process_index(), jax.process_count()


def _ensure_absl_flags_parsed() -> None:
    """Grain's multiprocess prefetch reads absl flags, which only `absl.app.run` parses; outside an
    absl program (pytest, notebooks, our own CLIs) it would fail with UnparsedFlagAccessError."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def make_dataset(source: LlavaJsonSource | TfdsLlavaSource, config: PipelineConfig,
                 tokenizer: Tokenizer | None = None) -> grain.IterDataset:
    """Batched, padded Grain dataset of dicts of numpy arrays (see `batching.pad_to_bucket`).

    JSON sources need the tokenizer; TFDS sources take token ids from the build and check the
    tokenizer (when given) against the one recorded in the dataset metadata.
    """
    if isinstance(source, LlavaJsonSource):
        if tokenizer is None:
            raise ValueError("a LLaVA JSON source needs a tokenizer")
        image_root, pad_id = source.image_root, tokenizer.pad_id
        built = (source.template, source.move_image_to_front)
    elif isinstance(source, TfdsLlavaSource):
        if tokenizer is not None:
            source.check_tokenizer(tokenizer)
        image_root, pad_id = None, int(source.metadata["pad_id"])
        built = (source.metadata["template"], source.metadata["move_image_to_front"])
    else:
        raise TypeError(f"unsupported source {type(source).__name__}; use LlavaJsonSource or TfdsLlavaSource")
    wanted = (templates.get_template(config.template).name, config.move_image_to_front)
    if built != wanted:
        raise ValueError(f"{source!r} was prepared with (template, move_image_to_front)={built}, "
                         f"but the pipeline config asks for {wanted}")
    if len(source) == 0:
        raise ValueError(f"{source!r} is empty")

    shard_index, shard_count = _shard(config)
    if config.group_by_modality:
        order = ModalityGroupedOrder(source.has_image_flags(), config.batch_size * shard_count, config.seed,
                                     config.shuffle)
        ds = grain.MapDataset.range(len(source)).repeat(config.num_epochs).map_with_index(
            _Lookup(source, order))
    else:
        ds = grain.MapDataset.source(source)
        if config.shuffle:
            ds = ds.shuffle(seed=config.seed)
        ds = ds.repeat(config.num_epochs)
    if shard_count > 1:
        if config.num_epochs is not None:  # equal shard lengths: hosts must run the same number of steps
            ds = ds[: len(ds) // shard_count * shard_count]
        ds = ds[shard_index::shard_count]
    ds = ds.map(_Encode(config, tokenizer, image_root))
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=config.read_threads,
                                              prefetch_buffer_size=config.read_buffer_size))
    if config.worker_count > 0:
        _ensure_absl_flags_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.worker_count,
                                                         per_worker_buffer_size=config.worker_buffer_size))
    it = BadRecordFilterIterDataset(it, config.max_bad_fraction)
    pad_rows = config.batch_size if config.pad_final_batch else None
    return it.batch(config.batch_size, drop_remainder=config.drop_remainder,
                    batch_fn=_PadBatch(config.resolved_buckets, pad_id, pad_rows))


def bad_record_stats(iterator: grain.DatasetIterator) -> dict[str, Any] | None:
    """Seen / bad / truncated counts of a pipeline iterator (None if it has no filter stage)."""
    state = iterator.get_state()
    while isinstance(state, dict):
        if "records" in state and "parent" in state:
            return state["records"]
        state = state.get("parent")
    return None
