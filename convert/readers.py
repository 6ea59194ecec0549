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
import os
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Iterable, Iterator

import ml_dtypes
import numpy as np

from convert.errors import ConversionError


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
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


# ----------------------------------------------------------------------------------------------
# safetensors

def read_safetensors_header(path: Path) -> tuple[dict[str, TensorEntry], dict]:
    """Parse and bounds-check a safetensors header. Returns (entries, __metadata__)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointReadError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > size - 8 or header_len > 100 * 2**20:
                raise CheckpointReadError(
                    f"{path}: corrupt or truncated safetensors file (header says {header_len} header bytes, "
                    f"file has {size})")
            raw = f.read(header_len)
    except OSError as e:
        raise CheckpointReadError(f"{path}: cannot read: {e}") from e
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointReadError(f"{path}: corrupt safetensors header: {e}") from e
    if not isinstance(header, dict):
        raise CheckpointReadError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + header_len
    data_size = size - data_start
    entries = {}
    for key, info in header.items():
        try:
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except KeyError as e:
            raise CheckpointReadError(f"{path}: tensor {key!r}: unsupported or missing header field {e}") from e
        except (TypeError, ValueError) as e:
            raise CheckpointReadError(f"{path}: tensor {key!r}: malformed header entry {info!r}") from e
        expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if end - begin != expected or begin < 0:
            raise CheckpointReadError(
                f"{path}: tensor {key!r}: header offsets [{begin}, {end}) do not match {info['dtype']} {list(shape)}")
        if end > data_size:
            raise CheckpointReadError(
                f"{path}: truncated file: tensor {key!r} ends at byte {data_start + end}, file has {size} bytes")
        entries[key] = TensorEntry(key, path, dtype, shape, (data_start + begin,))
    return entries, metadata


def _read_safetensors_tensor(f, entry: TensorEntry) -> np.ndarray:
    f.seek(entry.locator[0])
    count = int(np.prod(entry.shape, dtype=np.int64))
    out = np.empty(count, entry.dtype)
    # ml_dtypes types (bf16, fp8) are not buffer-protocol formats: read through a byte view.
    got = f.readinto(out.view(np.uint8)) if count else 0
    if got != out.nbytes:
        raise CheckpointReadError(f"{entry.file}: truncated file while reading tensor {entry.key!r}")
    return out.reshape(entry.shape)


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
    return _LazyTensor(storage, int(storage_offset), tuple(int(s) for s in size), tuple(int(s) for s in stride))


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
        return _StorageRef(str(key), storage_type.dtype, int(numel))


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
        byteorder = f"{root}/byteorder"
        if byteorder in names and zf.read(byteorder).strip() != b"little":
            raise CheckpointReadError(f"{path}: big-endian torch checkpoints are not supported")
        try:
            obj = _RestrictedUnpickler(zf.open(pkl[0]), path).load()
        except CheckpointReadError:
            raise
        except Exception as e:  # a truncated pickle surfaces as many different exception types
            raise CheckpointReadError(f"{path}: corrupt data.pkl: {type(e).__name__}: {e}") from e
        records = {n[len(root) + 6:]: zf.getinfo(n) for n in names if n.startswith(f"{root}/data/")}
    if not isinstance(obj, dict):
        raise CheckpointReadError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    entries = {}
    for key, t in obj.items():
        if not isinstance(t, _LazyTensor):
            raise CheckpointReadError(f"{path}: entry {key!r} is a {type(t).__name__}, not a tensor")
        st = t.storage
        info = records.get(st.key)
        if info is None:
            raise CheckpointReadError(f"{path}: tensor {key!r}: storage record data/{st.key} missing")
        if info.file_size != st.numel * st.dtype.itemsize:
            raise CheckpointReadError(
                f"{path}: tensor {key!r}: storage data/{st.key} has {info.file_size} bytes, expected "
                f"{st.numel * st.dtype.itemsize}")
        extent = t.offset + sum((n - 1) * s for n, s in zip(t.shape, t.stride)) + 1 if all(t.shape) else t.offset
        if t.offset < 0 or any(s < 0 for s in t.stride) or extent > st.numel:
            raise CheckpointReadError(f"{path}: tensor {key!r}: view exceeds its storage (corrupt file)")
        entries[str(key)] = TensorEntry(str(key), path, st.dtype, t.shape, (st.key, t.offset, t.stride))
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
        self.files, self.container, self.weight_map = _resolve_files(self.path)
        self.entries: dict[str, TensorEntry] = {}
        self.metadata: dict = {}
        self._records: dict[Path, dict[str, zipfile.ZipInfo]] = {}
        for file in self.files:
            if self.container == "safetensors":
                entries, meta = read_safetensors_header(file)
                self.metadata.update(meta)
            else:
                entries, self._records[file] = read_torch_zip_index(file)
            for key, entry in entries.items():
                if key in self.entries:
                    raise CheckpointReadError(f"key {key!r} appears in both {self.entries[key].file} and {file}")
                self.entries[key] = entry
        if self.weight_map is not None:
            self._check_weight_map()

    def _check_weight_map(self):
        for key, fname in self.weight_map.items():
            entry = self.entries.get(key)
            if entry is None:
                raise CheckpointReadError(f"{self.path}: index lists {key!r} in {fname}, but no shard contains it")
            if entry.file.name != Path(fname).name:
                raise CheckpointReadError(
                    f"{self.path}: index lists {key!r} in {fname}, but it is stored in {entry.file.name}")
        extra = sorted(set(self.entries) - set(self.weight_map))
        if extra:
            raise CheckpointReadError(f"{self.path}: shards contain keys missing from the index: {_names(extra)}")

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
                yield from self._iter_safetensors(file, by_file[file])
            else:
                yield from self._iter_torch_zip(file, by_file[file])

    @staticmethod
    def _iter_safetensors(file: Path, entries: list[TensorEntry]):
        with open(file, "rb") as f:
            for entry in sorted(entries, key=lambda e: e.locator[0]):
                yield entry.key, _read_safetensors_tensor(f, entry)

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


def _resolve_files(path: Path) -> tuple[list[Path], str, dict | None]:
    """(shard files in index order, container kind, weight_map or None)."""
    if not path.exists():
        raise CheckpointReadError(f"{path}: no such file or directory")
    if path.is_file():
        if path.name.endswith(".index.json"):
            return _from_index(path)
        if path.suffix == ".safetensors":
            return [path], "safetensors", None
        if path.suffix in (".bin", ".pt", ".pth"):
            return [path], "torch", None
        raise CheckpointReadError(f"{path}: not a .safetensors, .bin or *.index.json file")
    for name in (SAFETENSORS_INDEX, SAFETENSORS_SINGLE, BIN_INDEX, BIN_SINGLE):
        candidate = path / name
        if candidate.exists():
            return _resolve_files(candidate)
    singles = sorted(path.glob("*.safetensors"))
    if len(singles) == 1:
        return singles, "safetensors", None
    raise CheckpointReadError(
        f"{path}: no checkpoint found (looked for {SAFETENSORS_INDEX}, {SAFETENSORS_SINGLE}, {BIN_INDEX}, "
        f"{BIN_SINGLE}, or a single *.safetensors)")


def _from_index(index: Path) -> tuple[list[Path], str, dict]:
    try:
        data = json.loads(index.read_text())
        weight_map = data["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointReadError(f"{index}: unreadable shard index: {e}") from e
    container = "safetensors" if index.name.startswith("model.safetensors") or ".safetensors" in index.name else "torch"
    files = []
    for fname in dict.fromkeys(weight_map.values()):
        f = index.parent / fname
        if not f.is_file():
            raise CheckpointReadError(f"{index}: shard file {fname} is missing")
        files.append(f)
    return files, container, weight_map


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
