"""The on-disk checkpoint of this project: Orbax params + `config.json` + tokenizer files.

Layout of a checkpoint directory `<out>`:
  params/             Orbax pytree checkpoint of the Flax params (numpy leaves, exact dtypes)
  config.json         `ModelConfig.to_json()`
  conversion.json     provenance written by the converter (optional)
  tokenizer files     tokenizer.model / tokenizer.json / ... copied from the source

Writes are atomic: everything goes to `<out>.tmp-XXXX` next to `<out>` and is renamed into place
only after the last byte is written; on any exception the temp dir is removed and `<out>` is
never created. Params may be written in several batches (Orbax partial saves) so a converter can
stream a model larger than RAM: each batch is freed once saved.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from gmod_jax.config import ConfigError, ModelConfig

PARAMS_DIR = "params"
CONFIG_FILE = "config.json"
# special_tokens.json: the special ids and whitespace mode `train_sentencepiece` writes beside the model
TOKENIZER_FILES = ("tokenizer.model", "special_tokens.json", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "preprocessor_config.json", "processor_config.json")
TOKENIZER_GLOBS = ("chat_template*",)


def _ocp_v1():
    # Orbax logs every partial save at INFO through absl; a conversion would print pages of it.
    logging.getLogger("absl").setLevel(logging.WARNING)
    from orbax.checkpoint import v1 as ocp_v1

    return ocp_v1


def _save_context(ocp):
    """Orbax options that keep a save's extra memory near zero.

    By default Orbax deep-copies host arrays before its (here synchronous) write and zstd-
    compresses chunks: that doubles a batch in RAM and leaves compression buffers resident while
    saving little disk on weights (measured in docs/benchmarks.md). Both are off.
    """
    ctx = ocp.Context()
    ctx.array.saving.use_compression = False
    ctx.memory.deepcopy_host_arrays = False
    return ctx


def copy_tokenizer_files(src_dir: str | os.PathLike, dst_dir: str | os.PathLike) -> list[str]:
    src, dst = Path(src_dir), Path(dst_dir)
    names = [n for n in TOKENIZER_FILES if (src / n).is_file()]
    for pattern in TOKENIZER_GLOBS:
        names += sorted(p.name for p in src.glob(pattern) if p.is_file())
    for name in names:
        shutil.copy2(src / name, dst / name)
    return names


def nest(flat: dict[tuple[str, ...], np.ndarray]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return tree


def flatten(tree: dict, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], object]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, prefix + (key,)))
        else:
            out[prefix + (key,)] = value
    return out


class CheckpointWriter:
    """Context manager that builds `<out>` in a temp dir and renames it into place on success."""

    def __init__(self, out_dir: str | os.PathLike, overwrite: bool = False):
        self.out = Path(out_dir).absolute()
        self.overwrite = overwrite
        self.tmp: Path | None = None
        self._params_batches = 0
        self._in_flight = None  # (Orbax async response, the params it writes)

    def __enter__(self) -> "CheckpointWriter":
        if self.out.exists() and not self.overwrite:
            raise FileExistsError(f"{self.out} already exists (pass overwrite / --overwrite to replace it)")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=self.out.name + ".tmp-", dir=self.out.parent))
        return self

    def save_params(self, params: dict, background: bool = False):
        """Add a (partial) params tree; leaves must not repeat across calls.

        `background`: return once the write has started; it runs while the caller prepares the
        next batch (at most one write is in flight: the next save, and closing the writer, wait
        for it). The arrays are not copied (`_save_context`), so the caller must not modify
        them, only drop its references; the writer holds them until they are on disk."""
        self.wait()
        if not params:
            return
        ocp = _ocp_v1()
        with _save_context(ocp):
            response = ocp.partial.save_async(self.tmp / PARAMS_DIR, params)
        self._in_flight = (response, params)
        self._params_batches += 1
        if not background:
            self.wait()

    def wait(self):
        """Block until the background write (if any) is on disk, and release its arrays."""
        if self._in_flight is not None:
            response, _ = self._in_flight
            self._in_flight = None
            response.result()

    def write_config(self, config: ModelConfig):
        (self.tmp / CONFIG_FILE).write_text(config.to_json() + "\n")

    def write_json(self, name: str, obj):
        (self.tmp / name).write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")

    def copy_tokenizer(self, src_dir) -> list[str]:
        return copy_tokenizer_files(src_dir, self.tmp)

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            try:
                self.wait()  # let a background write end before its directory goes
            except Exception:  # noqa: BLE001 - the original exception is the one to report
                pass
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        try:
            self.wait()
            if not self._params_batches:
                raise ValueError("no params were saved")
            if not (self.tmp / CONFIG_FILE).is_file():
                raise ValueError("no config.json was written")
            _ocp_v1().partial.finalize(self.tmp / PARAMS_DIR)
            if self.out.exists():  # overwrite: swap, then delete the old one
                trash = Path(tempfile.mkdtemp(prefix=self.out.name + ".old-", dir=self.out.parent))
                os.rename(self.out, trash / "old")
                os.rename(self.tmp, self.out)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.rename(self.tmp, self.out)
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        return False


def save_checkpoint(out_dir: str | os.PathLike, params: dict, config: ModelConfig,
                    tokenizer_src_dir: str | os.PathLike | None = None, overwrite: bool = False) -> Path:
    """Save a params tree (numpy or jax arrays) with its config, atomically."""
    params = _to_numpy(params)
    with CheckpointWriter(out_dir, overwrite) as writer:
        writer.save_params(params)
        writer.write_config(config)
        if tokenizer_src_dir is not None:
            writer.copy_tokenizer(tokenizer_src_dir)
    return writer.out


def _to_numpy(tree):
    if isinstance(tree, dict):
        return {k: _to_numpy(v) for k, v in tree.items()}
    return np.asarray(tree)


def load_config(path: str | os.PathLike) -> ModelConfig:
    """The checkpoint's ModelConfig; a bad value is a ConfigError naming the file and every field."""
    file = Path(path) / CONFIG_FILE
    try:
        return ModelConfig.from_json(file.read_text())
    except ConfigError as e:
        raise ConfigError([f"{file}: {problem}" for problem in e.problems]) from None


def load_checkpoint(path: str | os.PathLike) -> tuple[ModelConfig, dict]:
    """(config, params) with numpy leaves in the dtypes they were saved in."""
    path = Path(path).absolute()  # Orbax refuses relative paths
    if not (path / PARAMS_DIR).is_dir():
        raise FileNotFoundError(f"{path} is not a gmod-jax checkpoint (no {PARAMS_DIR}/ directory)")
    config = load_config(path)
    params = _ocp_v1().load(path / PARAMS_DIR)
    return config, _to_numpy(params)
