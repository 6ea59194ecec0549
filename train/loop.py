"""The training loop: init or resume, step, log, evaluate, checkpoint, stop cleanly.

Exactness of resume: the state (params, Adam moments, step) and each process's data iterator
position are saved together; a resumed run replays exactly the computation an uninterrupted run
would have done (same compiled step, same batches), so its params are bitwise equal.

Stopping: SIGTERM sets a flag; the current step finishes, a checkpoint is written and the loop
returns "preempted" (the CLI then exits 0). A non-finite loss raises `NonFiniteLoss` before
anything is saved from the bad state; earlier checkpoints stay as they are.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from gmod_jax import sharding as shd
from gmod_jax.models.llama import routing_capacity
from gmod_jax.config import ModelConfig
from train import data as data_lib
from train import flops as flops_lib
from train import optimizer as opt
from train import step as step_lib
from train.checkpoint import Checkpointer
from train.config import TrainConfig
from train.metrics import MetricsWriter

log = logging.getLogger("train")


class NonFiniteLoss(RuntimeError):
    """Training produced a NaN / Inf loss; nothing from that step was saved."""


@dataclasses.dataclass
class RunResult:
    status: str  # "completed" | "preempted"
    step: int
    total_steps: int
    state: Any
    model: ModelConfig
    last_metrics: dict
    last_checkpoint: int | None


class _Preemption:
    """SIGTERM -> finish the current step, save, stop. Every process must stop at the same step,
    so in multi-process runs the flag is OR-reduced across processes after each step."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def agreed(self) -> bool:
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils

        return bool(np.any(multihost_utils.process_allgather(np.array(self.requested))))


def _allgather_max(value: int) -> int:
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return int(np.max(multihost_utils.process_allgather(np.array(value, np.int64))))


def resolve_model(cfg: TrainConfig) -> ModelConfig:
    if cfg.model is not None:
        model = cfg.model
    else:
        from gmod_jax.checkpoint import load_config

        model = load_config(cfg.init_from)
    return cfg.resolve_model(model)


def load_init_params(cfg: TrainConfig, spec: step_lib.StateSpec, random_params) -> dict:
    """Random params of the run's model with every leaf `init_from` has (and `init_skip` does not
    exclude) replaced by the checkpoint's, cast to the param dtype and placed in its sharding."""
    import re

    from gmod_jax.checkpoint import load_checkpoint

    _, loaded = load_checkpoint(cfg.init_from)
    flat_loaded = {shd.path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(loaded)[0]}
    used, fresh = set(), []

    def pick(path, current, sharding):
        name = shd.path_str(path)
        if name in flat_loaded and not any(re.search(r, name) for r in cfg.init_skip):
            value = flat_loaded[name]
            if tuple(value.shape) != tuple(current.shape):
                raise ValueError(f"init_from {cfg.init_from}: {name} has shape {value.shape}, "
                                 f"the model needs {current.shape}")
            used.add(name)
            return jax.device_put(np.asarray(value).astype(current.dtype), sharding)
        fresh.append(name)
        return current

    params = jax.tree_util.tree_map_with_path(pick, random_params, spec.shardings["params"])
    unused = sorted(set(flat_loaded) - used)
    log.info("init_from %s: %d params loaded, %d freshly initialised %s", cfg.init_from, len(used), len(fresh),
             fresh[:8])
    if unused:
        log.warning("init_from %s: %d checkpoint params not used by the model: %s", cfg.init_from, len(unused),
                    unused[:8])
    return params


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def run(cfg: TrainConfig, workdir: str | os.PathLike,
        source_factory: Callable[[ModelConfig, data_lib.Shard, bool], Any] | None = None,
        devices=None) -> RunResult:
    """Train per `cfg` in `workdir` (resuming from its latest checkpoint if there is one).

    `source_factory(model, shard, eval_split)` overrides the data source built from `cfg.data`
    (tests inject their own); `devices` restricts the mesh to a subset of devices.
    """
    workdir = Path(workdir)
    primary = jax.process_index() == 0
    if primary:
        workdir.mkdir(parents=True, exist_ok=True)
    model = resolve_model(cfg)
    mesh = shd.make_mesh(cfg.mesh, devices)
    accum, micro = cfg.optim.grad_accum_steps, cfg.micro_batch
    n_shards = shd.batch_shard_count(mesh)
    if micro % n_shards:
        raise ValueError(f"micro-batch {micro} (global_batch {cfg.global_batch} / grad_accum_steps {accum}) "
                         f"is not divisible by the {n_shards} batch shards of mesh {dict(mesh.shape)}")
    lo, hi = shd.process_batch_rows(mesh, micro)
    shard = data_lib.Shard(lo, hi, micro, accum)
    if source_factory is None:
        def source_factory(m, s, eval_split):
            return data_lib.make_source(cfg.data, m, s, cfg.seed, eval_split)
    source = source_factory(model, shard, False)
    pad_id = getattr(source, "pad_id", None)
    pad_id = pad_id if pad_id is not None else (model.pad_token_id or 0)
    total_steps = cfg.total_steps(getattr(source, "num_examples", None))

    spec = step_lib.make_run_spec(model, cfg.optim, total_steps, mesh)
    trainable = flops_lib.Trainable(**{part: any(p.startswith(part + "/") for p in spec.trainable)
                                       for part in ("vision", "projector", "llm")})
    ckpt = Checkpointer(workdir / "checkpoints", cfg.keep_checkpoints, cfg.async_checkpointing)
    writer = MetricsWriter(workdir, enabled=primary)
    peak = cfg.peak_tflops_per_device or flops_lib.peak_tflops(jax.devices()[0].device_kind)

    log.info("model: %s params (%s trainable); mesh %s; %d steps of %d sequences (%d x %d micro)",
             f"{opt.count_params(spec.abstract['params']):,}",
             f"{opt.count_params(opt.select(spec.abstract['params'], spec.trainable)):,}",
             dict(mesh.shape), total_steps, cfg.global_batch, accum, micro)
    show_bar = cfg.progress_bar and primary

    with jax.set_mesh(mesh):
        latest = ckpt.latest_step()
        if latest is not None:
            state, data_state, _ = ckpt.restore(latest, spec.abstract)
            source.set_state(data_state)
            log.info("resumed from %s at step %d", ckpt.directory / str(latest), latest)
        else:
            params = step_lib.make_init_params(spec)(jax.random.PRNGKey(cfg.seed))
            if cfg.init_from is not None:
                params = load_init_params(cfg, spec, params)
            state = step_lib.make_opt_init(spec)(params)
        start = int(jax.device_get(state["step"]))
        if primary:
            _write_json(workdir / "train_config.json", cfg.to_dict())
            (workdir / "model_config.json").write_text(model.to_json() + "\n")

        train_steps: dict[int | None, Callable] = {}
        batch_sharding = shd.batch_sharding(mesh, 1)

        def prepare(local):
            b = data_lib.to_model_batch(local, pad_id)
            b = data_lib.pad_length(b, _allgather_max(b["input_ids"].shape[1]), pad_id)
            cap = routing_capacity(model, b["token_types"], "train")
            if cap is not None:
                cap = _allgather_max(cap)
            arrays = data_lib.global_arrays(data_lib.split_micro(b, accum), batch_sharding, micro, row_axis=1)
            return arrays, cap, b["input_ids"].shape[1]

        def meta(step):
            return {"step": step, "total_steps": total_steps, "model_config": model.to_dict(),
                    "process_count": jax.process_count(), "global_batch": cfg.global_batch}

        last_saved = latest
        last_metrics: dict = {}
        status = "completed"
        step = start
        next_item = (next(source), source.get_state()) if start < total_steps else None
        try:
            with _Preemption() as preemption, writer.progress(total_steps, start, show_bar) as bar:
                t_start = time.perf_counter()
                while step < total_steps:
                    # The data state saved with step N's checkpoint is the one right after
                    # fetching step N's batch: a resume starts with the next batch.
                    local, data_state = next_item
                    batch, cap, seq_len = prepare(local)
                    compiled = cap not in train_steps
                    if compiled:
                        log.info("compiling train step for capacity %s (sequence length %d)", cap, seq_len)
                        train_steps[cap] = step_lib.make_train_step(spec, accum, cap)
                    state, metrics = train_steps[cap](state, batch)
                    # Overlap: read the next batch on the host while the device runs this step.
                    next_item = (next(source), source.get_state()) if step + 1 < total_steps else None
                    m = jax.device_get(metrics)
                    step += 1
                    step_time = time.perf_counter() - t_start
                    loss, grad_norm = float(m["loss"]), float(m["grad_norm"])
                    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                        ckpt.wait()
                        good = ckpt.latest_step()
                        raise NonFiniteLoss(
                            f"non-finite loss {loss} (lm_loss {float(m['lm_loss'])}, router_loss "
                            f"{float(m['router_loss'])}, grad_norm {grad_norm}) at step {step}; stopped without "
                            f"saving this state. Last good checkpoint: "
                            f"{ckpt.directory / str(good) if good is not None else 'none'}")
                    flops = flops_lib.train_step_flops(model, cfg.global_batch, seq_len, cap, trainable)
                    m.update(step_time=step_time, tokens_per_s=float(m["tokens"]) / step_time,
                             tflops_per_device=flops / step_time / jax.device_count() / 1e12,
                             capacity=cap or seq_len, seq_len=seq_len, includes_compile=int(compiled))
                    if peak:
                        m["mfu"] = m["tflops_per_device"] / peak
                    last_metrics = m
                    bar.update(step, m)
                    if cfg.log_every and (step % cfg.log_every == 0 or step == total_steps):
                        writer.write(step, m, model.mod_layers)
                        if not show_bar and primary:
                            log.info("step %d/%d: loss %.4f (lm %.4f, router %.4f), grad norm %.3f, lr %.3g, "
                                     "%.0f tokens/s%s", step, total_steps, loss, float(m["lm_loss"]),
                                     float(m["router_loss"]), grad_norm, float(m["lr"]), m["tokens_per_s"],
                                     f", skip {float(m['skip_ratio']):.3f}" if "skip_ratio" in m else "")
                    if cfg.eval_every and step % cfg.eval_every == 0:
                        writer.write(step, evaluate(cfg, spec, state["params"], source_factory, model, mesh,
                                                    micro, pad_id), ())
                    stop = preemption.agreed()
                    due = stop or step == total_steps or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0)
                    if due and cfg.save_checkpoints:
                        ckpt.save(step, state, data_state, meta(step))
                        last_saved = step
                    if stop:
                        status = "preempted"
                        log.warning("SIGTERM: saved checkpoint at step %d, stopping", step)
                        break
                    t_start = time.perf_counter()  # step times exclude eval, logging and checkpoint saves
            if cfg.save_checkpoints and last_saved != step and step > start:
                ckpt.save(step, state, data_state, meta(step))
                last_saved = step
            ckpt.wait()
        finally:
            writer.close()
            ckpt.close()
        if status == "completed" and cfg.export_dir:
            from train.export import export_params

            export_params(cfg.export_dir, state["params"], model)
    return RunResult(status, step, total_steps, state, model, last_metrics, last_saved)


def evaluate(cfg: TrainConfig, spec, params, source_factory, model, mesh, micro: int, pad_id: int) -> dict:
    """Mean eval LM loss (and router loss) over up to `eval_steps` batches of `micro` rows."""
    lo, hi = shd.process_batch_rows(mesh, micro)
    source = source_factory(model, data_lib.Shard(lo, hi, micro, 1), True)
    sharding = shd.batch_sharding(mesh, 0)
    lm_sum, n, router, batches = 0.0, 0, 0.0, 0
    fns: dict = {}
    for _ in range(cfg.eval_steps):
        try:
            local = next(source)
        except StopIteration:
            break
        b = data_lib.to_model_batch(local, pad_id)
        b = data_lib.pad_length(b, _allgather_max(b["input_ids"].shape[1]), pad_id)
        cap = routing_capacity(model, b["token_types"], "train")
        cap = _allgather_max(cap) if cap is not None else None
        arrays = data_lib.global_arrays(b, sharding, micro, row_axis=0)
        if cap not in fns:
            fns[cap] = step_lib.make_eval_step(spec, cap)
        out = jax.device_get(fns[cap](params, arrays))
        lm_sum += float(out["lm_sum"])
        n += int(out["label_tokens"])
        router += float(out["router_loss"])
        batches += 1
    if not batches:
        return {}
    return {"eval/lm_loss": lm_sum / max(n, 1), "eval/router_loss": router / batches,
            "eval/loss": lm_sum / max(n, 1) + router / batches, "eval/batches": batches}
