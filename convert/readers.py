"""Streaming readers for PyTorch checkpoints: safetensors and torch `.bin`, single or sharded.

Both containers are read without torch. Opening a checkpoint parses only headers (the
safetensors JSON header, the `.bin` pickle with lazy storages), so every key's dtype and shape
is known before any tensor data is touched; the converter validates the whole key map first and
then reads tensors in storage order, one at a time, so peak memory stays near one tensor (plus
whatever the caller keeps).

`.bin` files are zip archives written by `torch.save`. They are unpickled with a restricted
unpickler that knows only the handful of globals a state dict needs and refuses everything
else, so a hostile checkpoint cannot run code.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import mmap
import os
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Iterable, Iterator

import ml_dtypes
import numpy as np

from convert import strict_json
from convert.errors import ConversionError, raise_if_any
from gmod_jax.config import is_int, short


class CheckpointReadError(ConversionError):
    """A checkpoint file is missing, truncated, corrupt or of an unsupported kind."""


SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
SAFETENSORS_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}

# Legacy typed-storage class names that `torch.save` still pickles (torch 1.6 .. 2.x).
TORCH_STORAGE_DTYPES: dict[str, np.dtype] = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives; `locator` is container-specific."""

    key: str
    file: Path
    dtype: np.dtype
    shape: tuple[int, ...]
    locator: tuple

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


# ----------------------------------------------------------------------------------------------
# safetensors

# Parsed metadata takes ~15x its size in memory (a 100 MB header of empty tensors, the reference
# reader's limit, peaks near 1.7 GB); real headers and pickles are well under 1 MB, so these
# limits keep a hostile file's metadata to a few hundred MB.
MAX_HEADER_BYTES = 32 * 2**20
MAX_PICKLE_BYTES = 32 * 2**20
MAX_RANK = 8
MAX_NAME = 1024  # characters of a tensor or shard file name (real ones are < 100)


def _bad_name(name: str) -> bool:
    """Names end up in one-line error messages: no control characters, bounded length."""
    return not name or len(name) > MAX_NAME or any(ord(c) < 32 or ord(c) == 127 for c in name)


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorEntry], dict]:
    """Parse and bounds-check a safetensors header. Returns (entries, __metadata__).

    Every field is type- and range-checked before use; all problems of the file are reported
    together (one line each)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointReadError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > size - 8:
                raise CheckpointReadError(
                    f"{path}: corrupt or truncated safetensors file (header says {header_len} header bytes, "
                    f"file has {size})")
            if header_len > MAX_HEADER_BYTES:
                raise CheckpointReadError(f"{path}: safetensors header of {header_len} bytes exceeds the "
                                          f"{MAX_HEADER_BYTES} this reader accepts (corrupt or hostile file)")
            raw = f.read(header_len)
    except OSError as e:
        raise CheckpointReadError(f"{path}: cannot read: {e}") from e
    header = strict_json.loads(raw, str(path), CheckpointReadError, "safetensors header")
    if not isinstance(header, dict):
        raise CheckpointReadError(f"{path}: corrupt safetensors header (not a JSON object)")
    problems = []
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    elif not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        problems.append(f"{path}: safetensors __metadata__ must be an object of strings, got {short(metadata)}")
        metadata = {}
    data_start = 8 + header_len
    entries = {}
    past_end = []  # (end byte, key) of tensors beyond a truncated file: one problem for all of them
    for key, info in header.items():
        entry = _safetensors_entry(path, key, info, data_start, problems)
        if entry is None:
            continue
        if entry.locator[0] + entry.nbytes > size:
            past_end.append((data_start + info["data_offsets"][1], key))
            continue
        entries[key] = entry
    if past_end:
        end, key = min(past_end)
        more = f" (+{len(past_end) - 1} more tensors past the end)" if len(past_end) > 1 else ""
        problems.append(f"{path}: truncated file: tensor {key[:200]!r} ends at byte {end}, file has {size} bytes{more}")
    spans = sorted((e.locator[0], e.locator[0] + e.nbytes, k) for k, e in entries.items() if e.nbytes)
    for (_, end, key), (begin, _, other) in zip(spans, spans[1:]):
        if begin < end:
            problems.append(f"{path}: tensors {key!r} and {other!r} overlap in the data section (corrupt header)")
    raise_if_any(problems, error=CheckpointReadError)
    return entries, metadata


def _safetensors_entry(path: Path, key: str, info, data_start: int, problems: list[str]) -> TensorEntry | None:
    """One header entry -> TensorEntry, or None with the reason appended to `problems`."""
    where = f"{path}: tensor {key[:200]!r}"
    if _bad_name(key):
        problems.append(f"{where}: tensor names must be printable and at most {MAX_NAME} characters")
        return None
    if not isinstance(info, dict):
        problems.append(f"{where}: header entry must be an object, got {short(info)}")
        return None
    missing = [f for f in ("dtype", "shape", "data_offsets") if f not in info]
    if missing:
        problems.append(f"{where}: header entry lacks {', '.join(missing)}")
        return None
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    bad = []
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        bad.append(f"unsupported dtype {short(dtype)}")
    if not (isinstance(shape, list) and len(shape) <= MAX_RANK and all(is_int(n) and n >= 0 for n in shape)):
        bad.append(f"shape must be a list of at most {MAX_RANK} integers >= 0, got {short(shape)}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(is_int(o) and o >= 0 for o in offsets)
            and offsets[0] <= offsets[1]):
        bad.append(f"data_offsets must be [begin, end] with 0 <= begin <= end, got {short(offsets)}")
    if bad:
        problems.append(f"{where}: " + "; ".join(bad))
        return None
    np_dtype = SAFETENSORS_DTYPES[dtype]
    begin, end = offsets
    expected = math.prod(shape) * np_dtype.itemsize  # Python ints: a hostile shape cannot overflow
    if end - begin != expected:
        problems.append(f"{where}: header offsets [{begin}, {end}) do not match {dtype} {short(shape)}")
        return None
    return TensorEntry(key, path, np_dtype, tuple(shape), (data_start + begin,))


# Mapped tensors whose pages are dropped from this process's resident set once the reader is
# this many tensors further on (the converter keeps at most 2 per copy thread in flight).
_MAPPED_WINDOW = 16


def _iter_mapped_safetensors(file: Path, entries: list[TensorEntry]):
    """Read-only views of a memory-mapped safetensors file, in file order.

    A view costs no read() copy into a fresh buffer: the converter's transposes read the page
    cache directly (the read + first-touch of the buffers was about a third of a conversion).
    Pages of tensors `_MAPPED_WINDOW` behind are released with MADV_DONTNEED, which for a
    read-only file mapping only unmaps them (a late reader refaults the same bytes from the page
    cache), so resident memory stays near the window, not the shard. The mapping closes when the
    last view is dropped."""
    with open(file, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        for entry in entries:
            end = entry.locator[0] + math.prod(entry.shape) * entry.dtype.itemsize
            if end > size:
                raise CheckpointReadError(f"{entry.file}: truncated file while reading tensor {entry.key!r}")
        if size == 0:
            for entry in entries:
                yield entry.key, np.empty(entry.shape, entry.dtype)
            return
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    behind: collections.deque[tuple[int, int]] = collections.deque()
    can_release = hasattr(mapped, "madvise") and hasattr(mmap, "MADV_DONTNEED")
    for entry in sorted(entries, key=lambda e: e.locator[0]):
        start, count = entry.locator[0], math.prod(entry.shape)
        raw = np.frombuffer(mapped, np.uint8, count * entry.dtype.itemsize, start)
        # ml_dtypes types (bf16, fp8) are not buffer-protocol formats: map bytes, then view.
        yield entry.key, raw.view(entry.dtype).reshape(entry.shape)
        del raw
        behind.append((start, count * entry.dtype.itemsize))
        if can_release and len(behind) > _MAPPED_WINDOW:
            begin, length = behind.popleft()
            page = begin - begin % mmap.PAGESIZE
            if length:
                mapped.madvise(mmap.MADV_DONTNEED, page, begin + length - page)


# ----------------------------------------------------------------------------------------------
# torch .bin (zip + pickle)

@dataclasses.dataclass(frozen=True)
class _StorageRef:
    key: str  # name of the storage record inside the zip (`<root>/data/<key>`)
    dtype: np.dtype
    numel: int


@dataclasses.dataclass(frozen=True)
class _LazyTensor:
    storage: _StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    # Arguments come from an untrusted pickle: check them before anything is derived from them.
    if not isinstance(storage, _StorageRef):
        raise _BadPickle(f"tensor without a storage ({short(storage)})")
    dims = (size, stride)
    if not (is_int(storage_offset) and storage_offset >= 0 and all(isinstance(d, tuple) for d in dims)
            and len(size) == len(stride) <= MAX_RANK and all(is_int(n) and n >= 0 for d in dims for n in d)):
        raise _BadPickle(f"malformed tensor (offset {short(storage_offset)}, size {short(size)}, "
                         f"stride {short(stride)})")
    return _LazyTensor(storage, int(storage_offset), tuple(int(s) for s in size), tuple(int(s) for s in stride))


class _BadPickle(ValueError):
    """A structurally wrong object inside data.pkl (reported as a corrupt file)."""


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    return data


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
    return data


class _StorageType:
    """Stand-in for a `torch.XStorage` class: only carries the numpy dtype."""

    def __init__(self, name: str):
        self.name = name
        self.dtype = TORCH_STORAGE_DTYPES[name]


_SAFE_GLOBALS: dict[tuple[str, str], object] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
    **{("torch", name): _StorageType(name) for name in TORCH_STORAGE_DTYPES},
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, source: Path):
        super().__init__(file)
        self.source = source

    def find_class(self, module, name):
        try:
            return _SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise CheckpointReadError(
                f"{self.source}: refusing to unpickle global {module}.{name} (only plain tensor state dicts are "
                "accepted)") from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise CheckpointReadError(f"{self.source}: unsupported persistent id {pid!r:.120}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(key, str) or not is_int(numel) or numel < 0:
            raise CheckpointReadError(f"{self.source}: malformed storage reference {pid!r:.120}")
        return _StorageRef(key, storage_type.dtype, int(numel))


def read_torch_zip_index(path: Path) -> tuple[dict[str, TensorEntry], dict[str, zipfile.ZipInfo]]:
    """Unpickle the state dict of a `torch.save` zip lazily. Returns (entries, storage records)."""
    path = Path(path)
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        with open(path, "rb") as f:
            magic = f.read(2)
        if magic == b"\x80\x02" or magic[:1] == b"\x80":
            raise CheckpointReadError(
                f"{path}: legacy (pre-1.6, non-zip) torch serialization is not supported; re-save it with a "
                "recent torch") from e
        raise CheckpointReadError(f"{path}: not a valid torch zip checkpoint (truncated or corrupt): {e}") from e
    except OSError as e:
        raise CheckpointReadError(f"{path}: cannot read: {e}") from e
    with zf:
        names = zf.namelist()
        pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pkl) != 1:
            raise CheckpointReadError(f"{path}: torch zip without a single <root>/data.pkl record")
        root = pkl[0].split("/")[0]
        if zf.getinfo(pkl[0]).file_size > MAX_PICKLE_BYTES:
            raise CheckpointReadError(f"{path}: data.pkl of {zf.getinfo(pkl[0]).file_size} bytes exceeds the "
                                      f"{MAX_PICKLE_BYTES} this reader accepts (corrupt or hostile file)")
        byteorder = f"{root}/byteorder"
        if byteorder in names and zf.read(byteorder).strip() != b"little":
            raise CheckpointReadError(f"{path}: big-endian torch checkpoints are not supported")
        try:
            obj = _RestrictedUnpickler(zf.open(pkl[0]), path).load()
        except CheckpointReadError:
            raise
        except Exception as e:  # a truncated pickle surfaces as many different exception types
            raise CheckpointReadError(f"{path}: corrupt data.pkl: {type(e).__name__}: {str(e)[:200]}") from e
        records = {n[len(root) + 6:]: zf.getinfo(n) for n in names if n.startswith(f"{root}/data/")}
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        # A training checkpoint (open_clip's `epoch` / `state_dict` / `optimizer`): its weights.
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointReadError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    entries = {}
    problems = []
    archive_size = path.stat().st_size
    for key, t in obj.items():
        if not isinstance(key, str):
            problems.append(f"{path}: state dict key {short(key)} is not a string")
            continue
        where = f"{path}: tensor {key[:200]!r}"
        if _bad_name(key):
            problems.append(f"{where}: tensor names must be printable and at most {MAX_NAME} characters")
            continue
        if not isinstance(t, _LazyTensor):
            problems.append(f"{where} is a {type(t).__name__}, not a tensor")
            continue
        st = t.storage
        info = records.get(st.key)
        if info is None:
            problems.append(f"{where}: storage record data/{st.key[:80]} missing")
            continue
        if info.compress_type != zipfile.ZIP_STORED or info.header_offset + info.compress_size > archive_size:
            # torch.save stores records uncompressed; a compressed one could inflate far past the file
            problems.append(f"{where}: storage data/{st.key[:80]} is compressed or extends past the end of the file")
            continue
        if info.file_size != st.numel * st.dtype.itemsize:
            problems.append(f"{where}: storage data/{st.key[:80]} has {info.file_size} bytes, expected "
                            f"{st.numel * st.dtype.itemsize}")
            continue
        extent = t.offset + sum((n - 1) * s for n, s in zip(t.shape, t.stride)) + 1 if all(t.shape) else t.offset
        if extent > st.numel:
            problems.append(f"{where}: view exceeds its storage (corrupt file)")
            continue
        entries[key] = TensorEntry(key, path, st.dtype, t.shape, (st.key, t.offset, t.stride))
    raise_if_any(problems, error=CheckpointReadError)
    return entries, records


def _view_storage(buf: np.ndarray, entry: TensorEntry) -> np.ndarray:
    _, offset, stride = entry.locator
    item = buf.dtype.itemsize
    return np.lib.stride_tricks.as_strided(
        buf[offset:], shape=entry.shape, strides=tuple(s * item for s in stride), writeable=False)


# ----------------------------------------------------------------------------------------------
# directory-level reader

class CheckpointReader:
    """All tensors of one checkpoint (a file, or a directory with one or many shards).

    `entries` maps every key to its `TensorEntry` without reading data. `iter_tensors(keys)`
    yields `(key, array)` shard by shard in on-disk order; arrays yielded for `.bin` checkpoints
    may be read-only views (aliased keys share one storage buffer).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.files, self.container, self.weight_map, self.index = _resolve_files(self.path)
        self.entries: dict[str, TensorEntry] = {}
        self.metadata: dict = {}
        self._records: dict[Path, dict[str, zipfile.ZipInfo]] = {}
        problems = []  # of every shard, reported together
        for file in self.files:
            try:
                if self.container == "safetensors":
                    entries, meta = read_safetensors_header(file)
                    self.metadata.update(meta)
                else:
                    entries, self._records[file] = read_torch_zip_index(file)
            except CheckpointReadError as e:
                problems += e.problems
                continue
            for key, entry in entries.items():
                if key in self.entries:
                    problems.append(f"key {key[:200]!r} appears in both {self.entries[key].file} and {file}")
                    continue
                self.entries[key] = entry
        if self.weight_map is not None and not problems:
            problems += self._weight_map_problems()
        raise_if_any(problems, title=f"{self.path}: unreadable checkpoint" if len(problems) > 1 else "",
                     error=CheckpointReadError)

    def _weight_map_problems(self) -> list[str]:
        problems = []
        for key, fname in self.weight_map.items():
            entry = self.entries.get(key)
            if entry is None:
                problems.append(f"{self.index}: weight_map lists {key[:200]!r} in {fname}, but no shard contains it")
            elif entry.file.name != fname:
                problems.append(f"{self.index}: weight_map lists {key[:200]!r} in {fname}, but it is stored in "
                                f"{entry.file.name}")
        extra = sorted(set(self.entries) - set(self.weight_map))
        if extra:
            problems.append(f"{self.index}: shards contain keys missing from weight_map: {_names(extra)}")
        return problems

    @property
    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())

    def file_sizes(self) -> dict[Path, int]:
        return {f: f.stat().st_size for f in self.files}

    def position(self, key: str) -> tuple[int, int]:
        """(shard index, byte offset) of a tensor's data: sorting by it reads files front to back."""
        entry = self.entries[key]
        if self.container == "safetensors":
            offset = entry.locator[0]
        else:
            offset = self._records[entry.file][entry.locator[0]].header_offset
        return self.files.index(entry.file), offset

    def read(self, key: str) -> np.ndarray:
        return next(self.iter_tensors([key]))[1]

    def iter_tensors(self, keys: Iterable[str] | None = None) -> Iterator[tuple[str, np.ndarray]]:
        wanted = list(self.entries) if keys is None else list(dict.fromkeys(keys))
        unknown = [k for k in wanted if k not in self.entries]
        if unknown:
            raise KeyError(f"{self.path}: no tensors named {_names(unknown)}")
        by_file: dict[Path, list[TensorEntry]] = collections.defaultdict(list)
        for k in wanted:
            by_file[self.entries[k].file].append(self.entries[k])
        for file in self.files:
            if file not in by_file:
                continue
            if self.container == "safetensors":
                yield from _iter_mapped_safetensors(file, by_file[file])
            else:
                yield from self._iter_torch_zip(file, by_file[file])

    def _iter_torch_zip(self, file: Path, entries: list[TensorEntry]):
        records = self._records[file]
        by_storage: dict[str, list[TensorEntry]] = collections.defaultdict(list)
        for entry in entries:
            by_storage[entry.locator[0]].append(entry)
        # Storages in archive order; each is read once even when several keys alias it.
        order = sorted(by_storage, key=lambda s: records[s].header_offset)
        try:
            with zipfile.ZipFile(file) as zf:
                for skey in order:
                    info = records[skey]
                    try:
                        with zf.open(info) as member:
                            raw = member.read()
                    except (zipfile.BadZipFile, EOFError, OSError) as e:
                        names = [e2.key for e2 in by_storage[skey]]
                        raise CheckpointReadError(f"{file}: corrupt storage for {_names(names)}: {e}") from e
                    buf = np.frombuffer(raw, dtype=by_storage[skey][0].dtype)
                    for entry in by_storage[skey]:
                        yield entry.key, _view_storage(buf, entry)
                    del raw, buf
        except zipfile.BadZipFile as e:
            raise CheckpointReadError(f"{file}: corrupt zip archive: {e}") from e


def _resolve_files(path: Path) -> tuple[list[Path], str, dict | None, Path | None]:
    """(shard files in index order, container kind, weight_map or None, index file or None)."""
    if not path.exists():
        raise CheckpointReadError(f"{path}: no such file or directory")
    if path.is_file():
        if path.name.endswith(".index.json"):
            return _from_index(path)
        if path.suffix == ".safetensors":
            return [path], "safetensors", None, None
        if path.suffix in (".bin", ".pt", ".pth"):
            return [path], "torch", None, None
        raise CheckpointReadError(f"{path}: not a .safetensors, .bin or *.index.json file")
    for name in (SAFETENSORS_INDEX, SAFETENSORS_SINGLE, BIN_INDEX, BIN_SINGLE):
        candidate = path / name
        if candidate.exists():
            return _resolve_files(candidate)
    singles = sorted(path.glob("*.safetensors"))
    if len(singles) == 1:
        return singles, "safetensors", None, None
    raise CheckpointReadError(
        f"{path}: no checkpoint found (looked for {SAFETENSORS_INDEX}, {SAFETENSORS_SINGLE}, {BIN_INDEX}, "
        f"{BIN_SINGLE}, or a single *.safetensors)")


def _from_index(index: Path) -> tuple[list[Path], str, dict, Path]:
    """Shards named by a `*.index.json`. Each weight_map value must be the bare name of an
    existing shard file next to the index: never a path (`../x`, `/etc/x`, `sub/x`), so a
    downloaded index cannot make the converter read files outside the checkpoint directory."""
    data = strict_json.load(index, CheckpointReadError, "shard index")
    if not isinstance(data, dict) or "weight_map" not in data:
        raise CheckpointReadError(f"{index}: unreadable shard index: expected an object with a weight_map")
    weight_map = data["weight_map"]
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointReadError(f"{index}: weight_map must be a non-empty object of tensor name -> shard file, "
                                  f"got {short(weight_map)}")
    container = "safetensors" if index.name.startswith("model.safetensors") or ".safetensors" in index.name else "torch"
    suffixes = (".safetensors",) if container == "safetensors" else (".bin", ".pt", ".pth")
    bad: dict[str, list[str]] = collections.defaultdict(list)  # reason -> tensor names
    files = []
    for key, fname in weight_map.items():
        reason = _shard_name_problem(index, fname, suffixes)
        if reason:
            bad[reason].append(key)
        elif index.parent / fname not in files:
            files.append(index.parent / fname)
    problems = [f"{index}: weight_map: {reason} (for {_names([k[:120] for k in keys], 3)})"
                for reason, keys in bad.items()]
    raise_if_any(problems, error=CheckpointReadError)
    return files, container, weight_map, index


def _shard_name_problem(index: Path, fname, suffixes: tuple[str, ...]) -> str | None:
    if not isinstance(fname, str):
        return f"shard file must be a file name, got {short(fname)}"
    if (_bad_name(fname) or fname in (".", "..") or "/" in fname or "\\" in fname or Path(fname).is_absolute()
            or Path(fname).name != fname):
        return f"shard file {short(fname)} is not a plain file name in the checkpoint directory"
    if not fname.endswith(suffixes):
        return f"shard file {fname[:200]} is not a {' / '.join(suffixes)} file"
    if not (index.parent / fname).is_file():
        return f"shard file {fname[:200]} is missing"
    return None


def _names(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return f"{shown} (+{len(keys) - limit} more)" if len(keys) > limit else shown


# ----------------------------------------------------------------------------------------------
# writing (used by the Flax -> HF exporter and by tests / benchmarks)

def write_safetensors(path: str | os.PathLike, tensors: dict[str, np.ndarray], metadata: dict | None = None):
    """Write a safetensors file (any numpy dtype in SAFETENSORS_DTYPES, incl. ml_dtypes bf16).

    The header is padded to 8 bytes like the reference implementation so readers that memory-map
    tensors get aligned data.
    """
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    arrays = []
    for key, arr in tensors.items():
        arr = np.asarray(arr)
        try:
            name = SAFETENSORS_NAMES[arr.dtype]
        except KeyError:
            raise ValueError(f"cannot write {key!r}: dtype {arr.dtype} has no safetensors name") from None
        header[key] = {"dtype": name, "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        arrays.append(arr)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for arr in arrays:
            f.write(np.ascontiguousarray(arr).reshape(-1).view(np.uint8))


def parse_size(size: str | int) -> int:
    """`"5GB"`, `"20KB"`, `"512MiB"` or an int -> bytes (HF's decimal units for KB/MB/GB)."""
    if isinstance(size, int):
        return size
    s = size.strip().upper()
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    for unit, mult in units.items():
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)


def write_sharded_safetensors(out_dir: str | os.PathLike, tensors: Iterable[tuple[str, np.ndarray]],
                              max_shard_size: str | int = "5GB", metadata: dict | None = None) -> list[Path]:
    """Stream `(key, array)` pairs into `model.safetensors` or `model-0000k-of-0000n.safetensors`
    shards plus `model.safetensors.index.json`, holding at most one shard in memory."""
    out_dir = Path(out_dir)
    limit = parse_size(max_shard_size)
    current: dict[str, np.ndarray] = {}
    current_bytes = 0
    written: list[Path] = []
    weight_map: dict[str, int] = {}
    total = 0
    total_params = 0

    def flush():
        nonlocal current, current_bytes
        if not current:
            return
        tmp = out_dir / f"shard-{len(written):05d}.tmp.safetensors"
        write_safetensors(tmp, current, metadata)
        for k in current:
            weight_map[k] = len(written)
        written.append(tmp)
        current, current_bytes = {}, 0

    for key, arr in tensors:
        if current and current_bytes + arr.nbytes > limit:
            flush()
        current[key] = arr
        current_bytes += arr.nbytes
        total += arr.nbytes
        total_params += arr.size
    flush()
    n = len(written)
    if n == 1:
        final = [out_dir / SAFETENSORS_SINGLE]
    else:
        final = [out_dir / f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for tmp, dst in zip(written, final):
        os.replace(tmp, dst)
    if n > 1:
        index = {"metadata": {"total_size": total, "total_parameters": total_params},
                 "weight_map": {k: final[i].name for k, i in sorted(weight_map.items())}}
        (out_dir / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return final
