"""Orbax checkpoints of a training run: train state + per-process data iterator state + metadata.

Layout of `<workdir>/checkpoints/<step>/`:
  state/   params, optimizer state and step (Orbax StandardSave: OCDBT, written collectively by
           all processes, each writing its own shards)
  data/    `process_<i>-of-<n>.json`: every process's data iterator state (the file naming of
           Grain's own Orbax handler, so the data position is exact per process)
  meta/    JSON: model config, step, a few run facts (written by the primary process)

Saves are asynchronous (device -> host copies happen inside `save()`, so the state's buffers
may be donated to the next step right after); `LatestN` keeps the newest `keep` checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath


class DataStateHandler(ocp.CheckpointHandler):
    """Writes / reads one JSON file per process with that process's data iterator state."""

    def save(self, directory: epath.Path, args: "DataStateSave"):
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        (directory / name).write_text(json.dumps(args.state, indent=1, sort_keys=True))

    def restore(self, directory: epath.Path, args: "DataStateRestore | None" = None) -> dict[str, Any]:
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        path = directory / name
        if not path.exists():
            found = sorted(p.name for p in directory.iterdir()) if directory.exists() else []
            raise FileNotFoundError(f"no data iterator state {path} (checkpoint has {found}); resuming needs the "
                                    f"same number of processes that wrote it")
        return json.loads(path.read_text())

    def metadata(self, directory: epath.Path):
        return None

    def finalize(self, directory: epath.Path):
        pass

    def close(self):
        pass


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
    state: dict


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
    pass


class Checkpointer:
    def __init__(self, directory, keep: int, async_save: bool = True):
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.LatestN(keep) if keep > 0 else None,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.directory = epath.Path(directory)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state, data_state: dict, meta: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=DataStateSave(data_state), meta=ocp.args.JsonSave(meta)),
            force=True)

    def restore(self, step: int, abstract_state) -> tuple[Any, dict, dict]:
        """(state in the shardings of `abstract_state`, this process's data state, meta)."""
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=DataStateRestore(), meta=ocp.args.JsonRestore()))
        return out["state"], out["data"], out["meta"]

    def restore_params(self, step: int | None = None) -> tuple[dict, dict]:
        """(params as numpy arrays, meta) of a checkpoint, read on this host alone: the optimizer
        state is not read, and no mesh or optimizer is needed (export, tests, analysis)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        path = self.directory / str(step) / "state"
        checkpointer = ocp.PyTreeCheckpointer()
        tree = checkpointer.metadata(path).item_metadata.tree["params"]
        item = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), tree)
        restore_args = jax.tree.map(lambda m: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        params = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
            item={"params": item}, restore_args={"params": restore_args}, partial_restore=True))["params"]
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        return params, meta

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
