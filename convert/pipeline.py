"""PyTorch LLaVA checkpoint -> Flax params: open, validate, then read and transform in batches.

`load_params` returns the whole tree in memory (one batch: every tensor is read once, shard by
shard, into preallocated stacked leaves). `convert_checkpoint` writes an Orbax checkpoint in
batches of at most `batch_bytes` of output leaves; a batch is written in the background while
the next one is read and transformed, and freed once written, so peak memory is about two
batches (or the largest leaf) however large the model is.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np

from convert import hf_config, keymap
from convert.errors import ConversionError
from gmod_jax.checkpoint import CheckpointWriter, nest
from convert.readers import CheckpointReader
from gmod_jax.config import ModelConfig

DEFAULT_BATCH_BYTES = 512 * 2**20


@dataclasses.dataclass
class Source:
    """An opened, validated conversion source: config, readers and the plan."""

    src: Path
    source_config: hf_config.SourceConfig
    main: CheckpointReader
    tower: CheckpointReader | None
    plan: keymap.Plan
    aux: CheckpointReader | None = None

    @property
    def config(self) -> ModelConfig:
        return hf_config.with_param_dtype(self.source_config.model, self.plan.dtype)

    def describe(self) -> dict:
        return {
            "source": str(self.src),
            "kind": self.source_config.kind,
            "layout": self.plan.layout,
            "layout_description": keymap.LAYOUTS[self.plan.layout],
            "container": self.main.container,
            "shards": len(self.main.files),
            "vision_tower_source": str(self.tower.path) if self.plan.uses_tower_dir else None,
            "vision_tower_aux_source": str(self.aux.path) if self.plan.uses_aux_file else None,
            "notes": self.plan.notes,
            "num_params": self.plan.num_params,
            "dtype": self.plan.dtype,
            "source_bytes": self.plan.source_bytes,
            "extras": self.source_config.extras,
        }


def open_source(src: str | os.PathLike, vision_tower: str | os.PathLike | None = None,
                dtype: str = "keep", vision_tower_aux: str | os.PathLike | None = None) -> Source:
    """Parse config.json, open every shard's header and validate the whole key map."""
    src = Path(src)
    if not src.is_dir():
        raise ConversionError(f"{src}: source must be a checkpoint directory (config.json + weights)")
    main = CheckpointReader(src)
    keymap.check_supported(main.entries)  # name an unsupported family before config details
    aux = open_aux_tower(vision_tower_aux) if vision_tower_aux is not None else None
    source_config = hf_config.read_source_config(src, vision_tower, {k: e.shape for k, e in main.entries.items()},
                                                 aux_shapes(aux) if aux is not None else None, vision_tower_aux)
    layout = keymap.detect_layout(main.entries, source_config.kind)
    tower = CheckpointReader(vision_tower) if vision_tower is not None else None
    plan = keymap.build_plan(source_config.model, main, layout, tower, dtype, aux)
    return Source(src, source_config, main, tower, plan, aux)


# What open_clip writes (hub snapshots of open_clip models), tried before the HF names.
OPEN_CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def open_aux_tower(path: str | os.PathLike) -> CheckpointReader:
    """An open_clip ConvNeXt checkpoint for Mini-Gemini's aux tower: a file, or a directory with
    open_clip's file names or any layout CheckpointReader accepts."""
    path = Path(path)
    if path.is_dir():
        for name in OPEN_CLIP_FILES:
            if (path / name).is_file():
                return CheckpointReader(path / name)
    return CheckpointReader(path)


def aux_shapes(aux: CheckpointReader) -> dict[str, tuple[int, ...]]:
    """Shapes of an open_clip checkpoint's trunk under the names Mini-Gemini's checkpoints use
    (model.vision_tower_aux.*), where the config reader looks for the aux tower's geometry."""
    out = {}
    for key, entry in aux.entries.items():
        canonical = keymap.canonical_aux_key(key)
        if canonical is not None and "?" not in canonical:
            out["model." + canonical] = entry.shape
    return out


def _workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return os.cpu_count() or 1


def materialize(leaves: list[keymap.LeafPlan]) -> dict[tuple[str, ...], np.ndarray]:
    """Read and transform the tensors of `leaves` into freshly allocated arrays.

    Tensors arrive in storage order; each is written straight into its slot of the preallocated
    leaf (transpose / cast happen in that one copy), then dropped. The copies (most of them
    transposes, the converter's main CPU cost) run on one thread per core while this thread
    reads the next tensors: numpy releases the GIL for them, and every copy has its own
    destination slot. At most two tensors per worker are pending, which bounds the extra memory.
    """
    out = {leaf.path: np.empty(leaf.shape, leaf.dtype) for leaf in leaves}
    requests: dict[int, tuple[CheckpointReader, dict[str, list]]] = {}
    for leaf in leaves:
        for piece in leaf.pieces:
            reader, wanted = requests.setdefault(id(piece.reader), (piece.reader, {}))
            wanted.setdefault(piece.key, []).append((leaf, piece))

    def place(key, tensor, targets):
        for leaf, piece in targets:
            array = out[leaf.path]
            slot = array if piece.target.layer is None else array[piece.target.layer]
            _assign(slot, piece.target.to_flax(tensor), key)

    workers = _workers()
    pending: collections.deque[concurrent.futures.Future] = collections.deque()
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="convert-copy") as pool:
        try:
            for reader, wanted in requests.values():
                for key, tensor in reader.iter_tensors(list(wanted)):
                    while len(pending) >= 2 * workers:
                        pending.popleft().result()
                    pending.append(pool.submit(place, key, tensor, wanted[key]))
                    del tensor
            while pending:
                pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()
    for leaf in leaves:
        if leaf.same_as_first:
            _check_identical(leaf)
    return out


_RAW = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def _assign(dst: np.ndarray, src: np.ndarray, key: str):
    """dst[...] = src (a transposed/reshaped view), casting first if needed.

    The copy goes through same-size unsigned-int views: numpy has no fast strided copy for
    ml_dtypes' bfloat16, while one of the same-size unsigned ints is fast (docs/benchmarks.md).
    """
    if dst.shape != src.shape:  # build_plan checked shapes; this guards the transforms themselves
        raise ConversionError(f"{key}: transformed shape {src.shape} != destination {dst.shape}")
    if src.dtype != dst.dtype:
        with np.errstate(over="ignore"):  # overflow is detected and reported below
            cast = src.astype(dst.dtype, order="K")  # cast in the source's memory order
        if dst.dtype == np.float16:
            bad = ~np.isfinite(cast)
            if bad.any() and np.isfinite(src[bad]).any():
                raise ConversionError(f"{key}: values overflow float16 (max 65504); convert with --dtype bfloat16 "
                                      "or float32")
        src = cast
    raw = _RAW[dst.dtype.itemsize]
    _tiled_copy(dst.view(raw), src.view(raw))


def _tiled_copy(dst: np.ndarray, src: np.ndarray, tile: int = 256):
    """dst[...] = src for a C-contiguous `dst` and a (usually transposed) view `src`.

    Weight matrices arrive transposed ([out, in] -> [in, out], also behind the head reshapes of
    q/k/v/o). A strided copy of such a view reads the source column-wise; when a source row is a
    multiple of 4 KiB (2048 bf16 values, the common case) every element of a column falls into
    the same cache set, and numpy (like XLA) copied at ~0.6 GB/s. `_matrix_transpose` stages
    each tile through a small buffer with padded rows instead (2-3 GB/s on the same matrices).
    """
    if src.ndim < 2 or src.flags.c_contiguous:
        np.copyto(dst, src)
        return
    matrix = _as_transposed_matrix(src)
    if matrix is not None:
        _matrix_transpose(dst.reshape(matrix.shape[::-1]), matrix, tile)
        return
    a = dst.ndim - 1  # contiguous in dst
    b = int(np.argmin([abs(s) if n > 1 else np.inf for s, n in zip(src.strides, src.shape)]))  # contiguous in src
    if a == b:
        np.copyto(dst, src)
        return
    index = [slice(None)] * dst.ndim
    for i in range(0, dst.shape[a], tile):
        index[a] = slice(i, i + tile)
        for j in range(0, dst.shape[b], tile):
            index[b] = slice(j, j + tile)
            np.copyto(dst[tuple(index)], src[tuple(index)])


def _c_strides(shape: tuple[int, ...], unit: int) -> tuple[int, ...]:
    out, step = [], unit
    for n in reversed(shape):
        out.append(step)
        step *= n
    return tuple(reversed(out))


def _as_transposed_matrix(src: np.ndarray) -> np.ndarray | None:
    """The C-contiguous matrix M [Q, P] with src == M.T reshaped to src.shape, when there is one:
    src's leading axes (collapsing to P) step through M's rows' elements and its trailing axes
    (collapsing to Q) through M's rows. A plain `.T` and the q/k/v/o head layouts are such views;
    a 4-D convolution permutation is not (None)."""
    item = src.itemsize
    shape, strides = src.shape, src.strides
    for k in range(1, src.ndim):
        p, q = int(np.prod(shape[:k])), int(np.prod(shape[k:]))
        if (all(n == 1 or s == c for n, s, c in zip(shape[:k], strides[:k], _c_strides(shape[:k], item)))
                and all(n == 1 or s == c for n, s, c in zip(shape[k:], strides[k:], _c_strides(shape[k:], p * item)))):
            return np.lib.stride_tricks.as_strided(src, shape=(q, p), strides=(p * item, item), writeable=False)
    return None


def _matrix_transpose(dst: np.ndarray, matrix: np.ndarray, tile: int):
    """dst = matrix.T (dst C-contiguous) through a [tile, tile + 16] buffer: each tile is copied
    row by row into the buffer (contiguous reads), then transposed out of it, whose padded rows
    do not share cache sets."""
    rows, cols = matrix.shape
    buffer = np.empty((tile, tile + 16), matrix.dtype)
    for r in range(0, rows, tile):
        rr = min(tile, rows - r)
        for c in range(0, cols, tile):
            cc = min(tile, cols - c)
            staged = buffer[:rr, :cc]
            np.copyto(staged, matrix[r:r + rr, c:c + cc])
            np.copyto(dst[c:c + cc, r:r + rr], staged.T)


def _check_identical(leaf: keymap.LeafPlan):
    """Shared tensors stored under several names must really be one tensor."""
    first = leaf.pieces[0]
    names = [(first.reader, first.key)] + list(leaf.same_as_first)
    values = {}
    for reader in {id(r): r for r, _ in names}.values():
        keys = [k for r, k in names if r is reader]
        values.update({(id(reader), k): v for k, v in reader.iter_tensors(keys)})
    ref = values[(id(first.reader), first.key)]
    for reader, key in leaf.same_as_first:
        other = values[(id(reader), key)]
        if other.shape != ref.shape or other.dtype != ref.dtype or other.tobytes() != ref.tobytes():
            raise ConversionError(
                f"{key} differs from {first.key}; they must hold the same shared tensor (γ-MoD's single router "
                "stored under every MoD layer, or an lm_head tied to the embeddings)")


def batches(leaves: list[keymap.LeafPlan], budget: int) -> list[list[keymap.LeafPlan]]:
    out: list[list[keymap.LeafPlan]] = []
    size = 0
    for leaf in leaves:
        if out and size + leaf.nbytes <= budget:
            out[-1].append(leaf)
            size += leaf.nbytes
        else:
            out.append([leaf])
            size = leaf.nbytes
    return out


def load_params(src: str | os.PathLike, vision_tower: str | os.PathLike | None = None,
                dtype: str = "keep", vision_tower_aux: str | os.PathLike | None = None) -> tuple[ModelConfig, dict, dict]:
    """(config, nested numpy params, description) of a PyTorch checkpoint, all in memory."""
    source = open_source(src, vision_tower, dtype, vision_tower_aux)
    params = nest(materialize(source.plan.leaves))
    return source.config, params, source.describe()


def convert_checkpoint(src: str | os.PathLike, out: str | os.PathLike, vision_tower: str | os.PathLike | None = None,
                       dtype: str = "keep", overwrite: bool = False, batch_bytes: int = DEFAULT_BATCH_BYTES,
                       log: Callable[[str], None] | None = None,
                       vision_tower_aux: str | os.PathLike | None = None) -> dict:
    """Convert `src` into a gmod-jax checkpoint at `out`; returns a summary dict."""
    start = time.perf_counter()
    source = open_source(src, vision_tower, dtype, vision_tower_aux)
    groups = batches(source.plan.leaves, batch_bytes)
    with CheckpointWriter(out, overwrite) as writer:
        for i, group in enumerate(groups):
            if log:
                mb = sum(l.nbytes for l in group) / 2**20
                log(f"batch {i + 1}/{len(groups)}: {len(group)} leaves, {mb:.1f} MiB")
            flat = materialize(group)  # while the previous batch is still being written
            writer.save_params(nest(flat), background=True)
            del flat
        writer.write_config(source.config)
        summary = source.describe()
        summary["tokenizer_files"] = writer.copy_tokenizer(source.src)
        summary["source_config"] = source.source_config.raw
        writer.write_json("conversion.json", summary)
    seconds = time.perf_counter() - start
    summary.pop("source_config")
    summary.update(out=str(Path(out).absolute()), seconds=round(seconds, 3),
                   gb_per_s=round(source.plan.source_bytes / 1e9 / max(seconds, 1e-9), 3), batches=len(groups))
    return summary
