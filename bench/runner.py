"""`python -m bench --config configs/bench_cpu.py --json OUT.json [--markdown BENCHMARKS.md]`

Dense vs γ-MoD in one process, on the same weights and the same inputs: prefill latency, decode
tokens/s, training-step time, analytic and XLA-reported FLOPs, the realised skip ratio, the
speedup and the speedup as a share of the FLOP bound; optionally HF transformers (PyTorch) on
the same dense weights as a baseline.

Method, and why:
* The MoD model is the dense model plus the shared router (`llm/mod_router`); the dense twin
  reuses the very same arrays, so weights cannot drift between the two.
* With random weights the official threshold rule (keep iff keep-prob > 0.005) keeps almost
  every token, so the configs route with the training capacity rule
  (`mod.inference_routing="capacity"`): exactly `routing_ratio` of the routable tokens are
  skipped in every MoD layer and the skip ratio is the configured one. The rule used is recorded.
  With `official_rule_rows`, each prefill case also gets a row for the official rule (threshold
  with capacity buckets) on a copy of the γ-MoD model whose router was first fitted so that the
  rule skips about that share (`bench.router_fit`); the fit and the realised skip are
  reported.
* Train-step rows run the trainer's own jitted step (`train.step`, as `python -m train` builds
  it: loss, clipping, schedule, frozen tower, accumulation), not a program of the benchmark's.
* Every timed function is compiled ahead of time (`jit(f).lower(...).compile()`): compile time
  is reported on its own and never pollutes a sample. Warm-up runs are discarded; dense and MoD
  samples are interleaved (D, M, D, M, ...) so load from other processes hits both alike;
  min / median / IQR are reported and speedups use medians.
* XLA's cost analysis counts a while-loop body once, and layer stacks are `lax.scan`s, so XLA
  FLOPs come from a separately compiled, fully unrolled twin of each timed program (counted
  only, never timed). The decode loop is a data-dependent `while_loop`: no XLA count there.
* `BENCHMARKS.md` is only ever written here: the section between
  `<!-- bench:<section>:start -->` and `<!-- bench:<section>:end -->` is replaced atomically,
  other sections are left byte for byte.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import importlib
import json
import math
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from gmod_jax import flops as F
from gmod_jax import sharding as shd
from gmod_jax import token_types as tt
from gmod_jax.api import Model, init_random
from bench.config import BenchConfig, Case, load_config
from bench import router_fit
from bench.markdown import fmt, render_markdown
from gmod_jax.benchmarks_md import update_markdown
from gmod_jax.eval.results import write_text_atomic
from gmod_jax.config import ModelConfig
from gmod_jax.models.llama import RoutingPlan, routing_capacity, threshold_buckets
from gmod_jax.models.llava import LlavaModel
from train import data as data_lib
from train import step as step_lib

# ----------------------------------------------------------------------------------------------
# Models and inputs


def build_models(config: BenchConfig) -> tuple[Model, Model]:
    """(dense, MoD) handles over one set of arrays: the dense tree is the MoD tree minus the
    router, built on device by a jitted init (no host copy of the weights)."""
    mod = init_random(config.mod_model_config(), seed=config.seed)
    llm = {k: v for k, v in mod.params["llm"].items() if k != "mod_router"}
    dense = Model(config=config.model, params={**mod.params, "llm": llm})
    return dense, mod


def make_inputs(config: BenchConfig, batch: int) -> dict[str, np.ndarray]:
    """Deterministic random ids (never the image id), one random image per row, token types of
    the LLaVA layout, and `answer` marking the answer span used by the training loss."""
    cfg = config.model
    rng = np.random.default_rng(config.seed * 1000 + batch)
    n_img, t = cfg.image_seq_length, config.seq_len
    vocab = cfg.text.vocab_size
    ids = rng.integers(3, vocab, size=(batch, t), dtype=np.int64)
    ids = np.where(ids == cfg.image_token_index, 3, ids).astype(np.int32)
    start = config.system_tokens
    ids[:, start:start + n_img] = cfg.image_token_index
    types = np.full((batch, t), tt.QUESTION, np.int32)
    types[:, :start] = tt.SYSTEM
    types[:, start:start + n_img] = tt.IMAGE
    answer = np.zeros((batch, t), bool)
    if config.answer_tokens:
        answer[:, t - min(config.answer_tokens, config.question_tokens):] = True
    px = rng.standard_normal((batch, *cfg.pixel_shape)).astype(np.float32)
    return {"ids": ids, "px": px, "mask": np.ones((batch, t), bool), "types": types, "answer": answer}


# ----------------------------------------------------------------------------------------------
# Timing


def summarize(samples_s: list[float]) -> dict[str, Any]:
    ms = sorted(s * 1e3 for s in samples_s)
    q = statistics.quantiles(ms, n=4, method="inclusive") if len(ms) > 1 else [ms[0]] * 3
    return {"min_ms": ms[0], "median_ms": statistics.median(ms), "p25_ms": q[0], "p75_ms": q[2],
            "iqr_ms": q[2] - q[0], "n": len(ms), "samples_ms": [round(m, 4) for m in ms]}


def interleaved(runs: dict[str, Callable[[], float]], warmup: int, repeats: int) -> dict[str, dict]:
    """Warm every callable up, then alternate them `repeats` times. Each callable returns its own
    elapsed seconds, so per-call setup (copying a donated cache) stays outside the sample."""
    for _ in range(warmup):
        for run in runs.values():
            run()
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            samples[name].append(run())
    return {name: summarize(s) for name, s in samples.items()}


def timed_call(fn: Callable, *args) -> Callable[[], float]:
    def run():
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        return time.perf_counter() - t0
    return run


def aot_compile(jitted, *args, **static) -> tuple[Any, float]:
    t0 = time.perf_counter()
    compiled = jitted.lower(*args, **static).compile()
    return compiled, time.perf_counter() - t0


def count_xla(make_jitted: Callable[[], Any], *args, **static) -> float | None:
    """XLA FLOPs of a fully unrolled twin (see module docstring); `make_jitted` must build a new
    function so no trace cached from the scanned version is reused."""
    with F.unrolled_scans():
        compiled = make_jitted().lower(*args, **static).compile()
    return F.xla_flops(compiled)


def _log(msg: str):
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# Programs


def prefill_program(config: ModelConfig, plan: RoutingPlan):
    """Prompt forward with logits for the last position only (what serving needs before the
    first token); returns (logits [B,1,V], aux with `mod_kept` / `mod_tokens` for γ-MoD)."""
    module = LlavaModel(config)

    def run(m, ids, px, mask, types):
        hidden, aux = m.llm(m.embed(ids, px), mask, types, plan)
        return m.llm.logits(hidden[:, -1:]), aux

    def prefill(params, ids, px, mask, types):
        return module.apply({"params": params}, ids, px, mask, types, method=run)

    return jax.jit(prefill)


# The schedule length the train-step programs are built for: it only sets learning-rate values
# (warmup, decay), never the program's cost, and the benchmark runs a handful of steps of it.
TRAIN_TOTAL_STEPS = 1000


def trainer_batch(config: BenchConfig, x: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The benchmark inputs as the trainer's [accum, micro, ...] batch (`train.data`): labels are
    the ids on the answer span, -100 elsewhere."""
    b = data_lib.to_model_batch({"input_ids": x["ids"], "attention_mask": x["mask"], "token_types": x["types"],
                                 "pixel_values": x["px"], "loss_mask": x["answer"]}, config.model.pad_token_id or 0)
    return data_lib.split_micro(b, config.optim.grad_accum_steps)


def train_step_program(config: BenchConfig, model: ModelConfig, types: np.ndarray, mesh,
                       total_steps: int = TRAIN_TOTAL_STEPS):
    """(state spec, jitted step, MoD capacity) built exactly as `python -m train` builds them
    (`train.loop.run`): `make_run_spec` from the config's optimizer, the capacity of the
    training rule for this batch's token types, `make_train_step` (loss, clipping, schedule,
    frozen params, accumulation, state donated). Each call builds a new jitted function."""
    spec = step_lib.make_run_spec(model, config.optim, total_steps, mesh)
    cap = routing_capacity(model, types, "train")
    return spec, step_lib.make_train_step(spec, config.optim.grad_accum_steps, cap), cap


def fresh_train_state(spec, params: dict) -> dict:
    """The trainer's step-0 state (`make_opt_init`) over a private copy of `params`: the step
    donates its state, while the dense and MoD trees share arrays that later cases still need."""
    params = jax.device_put(jax.tree.map(jnp.copy, params), spec.shardings["params"])
    return step_lib.make_opt_init(spec)(params)


# ----------------------------------------------------------------------------------------------
# Cases


@dataclasses.dataclass
class Context:
    config: BenchConfig
    dense: Model
    mod: Model
    inputs: dict[int, dict[str, np.ndarray]] = dataclasses.field(default_factory=dict)
    on_device: dict[int, dict[str, jax.Array]] = dataclasses.field(default_factory=dict)
    peak: float | None = None
    official: Model | None = None  # the γ-MoD model with its router fitted for the official rule
    router_fit: dict | None = None
    dense_last_logits: dict[int, np.ndarray] = dataclasses.field(default_factory=dict)
    dense_decode_tokens: dict[int, Any] = dataclasses.field(default_factory=dict)  # greedy, per batch size

    def batch(self, b: int) -> dict[str, np.ndarray]:
        if b not in self.inputs:
            self.inputs[b] = make_inputs(self.config, b)
        return self.inputs[b]

    def device_batch(self, b: int) -> dict[str, jax.Array]:
        """The same inputs already on the device, so no sample pays a host->device copy."""
        if b not in self.on_device:
            self.on_device[b] = jax.device_put(self.batch(b))
        return self.on_device[b]


def _skip_stats(kept, tokens, batch: int) -> tuple[float, list[float], list[float]]:
    """(overall skip ratio, per-layer skip ratios, per-layer kept tokens per row)."""
    kept, tokens = np.asarray(kept, np.float64), np.maximum(np.asarray(tokens, np.float64), 1)
    return (float(1.0 - kept.sum() / tokens.sum()), [float(v) for v in 1.0 - kept / tokens],
            [float(v) for v in kept / batch])


def _mod_capacity(cfg: ModelConfig, types: np.ndarray, mode: str) -> int:
    """Static slots a MoD layer computes on (what the compiled program executes)."""
    cap = routing_capacity(cfg, types, mode)
    if cap is None:
        cap = max(1, math.ceil(cfg.mod.threshold_max_capacity * types.shape[-1]))
    return int(cap)


def _finish(row: dict, ctx: Context, dense_flops: float, mod_flops: float):
    row["speedup"] = row["dense_ms"] / row["mod_ms"] if row["mod_ms"] else None
    row["flop_bound_speedup"] = F.bound_speedup(dense_flops, mod_flops)
    row["speedup_over_bound"] = (row["speedup"] / row["flop_bound_speedup"]
                                 if row["speedup"] and row["flop_bound_speedup"] else None)
    if ctx.peak:
        row["mfu_dense"] = dense_flops / (row["dense_ms"] * 1e-3) / ctx.peak
        row["mfu_mod"] = mod_flops / (row["mod_ms"] * 1e-3) / ctx.peak
    return row


def run_prefill(ctx: Context, case: Case, official: bool = False) -> dict:
    """Dense vs γ-MoD prefill. `official`: the γ-MoD model with the fitted router
    (`ctx.official`) served with the official threshold rule and its capacity buckets, instead of
    the configured rule; its row is named `prefill_official_b<B>`."""
    cfg, b = ctx.config, case.batch
    types = ctx.batch(b)["types"]
    x = ctx.device_batch(b)
    args = (x["ids"], x["px"], x["mask"], x["types"])
    mod = ctx.official if official else ctx.mod
    dense_cfg, mod_cfg = ctx.dense.config, mod.config
    cap = _mod_capacity(mod_cfg, types, "inference")
    dense_plan = RoutingPlan(mode="inference")
    mod_plan = RoutingPlan(mode="inference", capacity=routing_capacity(mod_cfg, types, "inference"))

    dense_params, mod_params = (m.inference_params(cfg.inference_layers) for m in (ctx.dense, mod))
    dense_fn, c_dense = aot_compile(prefill_program(dense_cfg, dense_plan), dense_params, *args)
    mod_fn, c_mod = aot_compile(prefill_program(mod_cfg, mod_plan), mod_params, *args)
    dense_logits, _ = jax.device_get(dense_fn(dense_params, *args))
    _, aux = jax.device_get(mod_fn(mod_params, *args))
    ctx.dense_last_logits[b] = np.asarray(dense_logits[:, -1], np.float32)
    skip, skip_layers, kept = _skip_stats(aux["mod_kept"], aux["mod_tokens"], b)

    stats = interleaved({"dense": timed_call(dense_fn, dense_params, *args),
                         "mod": timed_call(mod_fn, mod_params, *args)},
                        cfg.warmup, case.repeats or cfg.repeats)
    t = cfg.seq_len
    dense_a = F.prefill_flops(dense_cfg, b, t, attention=cfg.attention_flops)
    mod_a = F.prefill_flops(mod_cfg, b, t, kept, attention=cfg.attention_flops)
    buckets = threshold_buckets(mod_cfg, mod_plan, t)
    if buckets:
        # The bucket each layer ran (judged from its mean row: the rows of one prompt layout pass
        # alike), which is what the program executed.
        executed = [next((c for c in buckets if c >= math.ceil(k - 1e-6)), buckets[-1]) for k in kept]
        cap = max(executed)
    else:
        executed = cap
    mod_exec = F.prefill_flops(mod_cfg, b, t, executed, attention=cfg.attention_flops)
    row = _base_row(case, t, stats, c_dense, c_mod, skip, skip_layers, dense_a, mod_a, mod_exec)
    row["mod_capacity"] = cap
    row["inference_layers"] = {"dense": _layout(dense_params), "mod": _layout(mod_params)}
    row["routing_rule"] = "threshold" if official else mod_cfg.mod.inference_routing
    if official:
        row["name"], row["official_rule"] = f"prefill_official_b{b}", True
        row["capacity_buckets"] = list(buckets)
        row["mod_capacity_per_layer"] = executed
        kept_t, tokens_t = np.sum(aux["mod_kept_by_type"]), np.sum(aux["mod_tokens_by_type"])
        row["routable_skip_ratio"] = float(1.0 - kept_t / max(tokens_t, 1))
    if cfg.xla_flops:
        row["dense_flops_xla"] = count_xla(lambda: prefill_program(dense_cfg, dense_plan), ctx.dense.params, *args)
        # XLA's cost analysis cannot know which branch of the bucket switch runs: no count.
        if not buckets:
            row["mod_flops_xla"] = count_xla(lambda: prefill_program(mod_cfg, mod_plan), mod.params, *args)
    return _finish(row, ctx, dense_a.total, mod_a.total)


def _layout(params) -> str:
    return "unstacked" if isinstance(params["llm"]["layers"], tuple) else "stacked"


def _base_row(case, t, stats, c_dense, c_mod, skip, skip_layers, dense_a, mod_a, mod_exec) -> dict:
    return {
        "name": case.name, "kind": case.kind, "batch": case.batch, "seq_len": t,
        "dense_ms": stats["dense"]["median_ms"], "mod_ms": stats["mod"]["median_ms"],
        "dense_stats": stats["dense"], "mod_stats": stats["mod"],
        "skip_ratio": skip, "skip_ratio_per_layer": skip_layers,
        "dense_flops_analytic": dense_a.total, "mod_flops_analytic": mod_a.total,
        "mod_flops_analytic_executed": mod_exec.total,
        "dense_flops_breakdown": dense_a.to_dict(), "mod_flops_breakdown": mod_a.to_dict(),
        "dense_flops_xla": None, "mod_flops_xla": None,
        "compile_s_dense": c_dense, "compile_s_mod": c_mod,
    }


def run_train_step(ctx: Context, case: Case) -> dict:
    """The trainer's jitted step (see `train_step_program`) for the dense and the γ-MoD model,
    each from its own step-0 state, on the case's batch as the global batch."""
    cfg, b = ctx.config, case.batch
    x = ctx.batch(b)
    mesh = shd.make_mesh()
    t = cfg.seq_len
    with jax.set_mesh(mesh):
        batch = data_lib.global_arrays(trainer_batch(cfg, x), shd.batch_sharding(mesh, 1),
                                       b // cfg.optim.grad_accum_steps, row_axis=1)
        states, fns, compile_s, caps = {}, {}, {}, {}
        for name, model in (("dense", ctx.dense), ("mod", ctx.mod)):
            spec, step, caps[name] = train_step_program(cfg, model.config, x["types"], mesh)
            states[name] = fresh_train_state(spec, model.params)
            fns[name], compile_s[name] = aot_compile(step, states[name], batch)
        last_metrics = {}

        def runner(name):
            def run():
                t0 = time.perf_counter()
                states[name], metrics = fns[name](states[name], batch)
                jax.block_until_ready((states[name], metrics))
                elapsed = time.perf_counter() - t0
                last_metrics[name] = metrics
                return elapsed
            return run

        stats = interleaved({"dense": runner("dense"), "mod": runner("mod")}, max(cfg.warmup, 1),
                            case.repeats or cfg.repeats)
        xla = {}
        if cfg.xla_flops:
            for name, model in (("dense", ctx.dense), ("mod", ctx.mod)):
                xla[name] = count_xla(lambda model=model: train_step_program(cfg, model.config, x["types"], mesh)[1],
                                      states[name], batch)
    m = jax.device_get(last_metrics["mod"])
    # Every token of the benchmark batch is valid, so each MoD layer sees t tokens per row.
    skip_layers = [float(v) for v in m["skip_ratio_per_layer"]]
    kept = [(1.0 - v) * t for v in skip_layers]
    dense_cfg, mod_cfg = ctx.dense.config, ctx.mod.config
    cap = caps["mod"] if caps["mod"] is not None else t
    dense_a = F.train_step_flops(dense_cfg, b, t, attention=cfg.attention_flops)
    mod_a = F.train_step_flops(mod_cfg, b, t, kept, attention=cfg.attention_flops)
    mod_exec = F.train_step_flops(mod_cfg, b, t, cap, attention=cfg.attention_flops)
    row = _base_row(case, t, stats, compile_s["dense"], compile_s["mod"], float(m["skip_ratio"]), skip_layers,
                    dense_a, mod_a, mod_exec)
    row.update({"mod_capacity": cap, "grad_accum_steps": cfg.optim.grad_accum_steps, "train_program": "train.step",
                "lm_loss_mod": float(m["lm_loss"]), "router_loss_mod": float(m["router_loss"])})
    if cfg.xla_flops:
        row["dense_flops_xla"], row["mod_flops_xla"] = xla["dense"], xla["mod"]
    return _finish(row, ctx, dense_a.total, mod_a.total)


def generation_module():
    """(module, None) when `gmod_jax.inference.generate` offers the jitted prefill/decode pair
    this benchmark drives, else (None, reason)."""
    try:
        gen = importlib.import_module("gmod_jax.inference.generate")
    except Exception as e:  # noqa: BLE001 - any import failure means "not available yet"
        return None, f"gmod_jax.inference.generate not importable: {type(e).__name__}: {e}"
    missing = [n for n in ("prefill_jit", "decode_jit", "CacheSpec", "mod_prefill_capacity") if not hasattr(gen, n)]
    if missing:
        return None, f"gmod_jax.inference.generate lacks {missing}"
    return gen, None


def run_decode(ctx: Context, case: Case) -> dict:
    """Decode-loop time only: prefill (with KV-cache writes) runs once per model to produce the
    cache, then each sample decodes `new_tokens` from a fresh copy of it (the loop donates it)."""
    gen, reason = generation_module()
    if gen is None:
        return {"name": case.name, "kind": "decode", "batch": case.batch, "skipped": reason}
    cfg, b, n = ctx.config, case.batch, case.new_tokens
    types = ctx.batch(b)["types"]
    x = ctx.device_batch(b)
    t = cfg.seq_len
    eos = np.full((getattr(gen, "MAX_EOS_IDS", 8),), -1, np.int32)  # no EOS: every row runs n tokens
    runs, compile_s, prefill_compile_s, prefill_stats, specs, decode_stats, layouts = {}, {}, {}, {}, {}, {}, {}
    for name, model in (("dense", ctx.dense), ("mod", ctx.mod)):
        spec = gen.CacheSpec(batch=b, prompt_len=t, new_slots=n,
                             mod_capacity=gen.mod_prefill_capacity(model.config, types, "inference"),
                             mode="inference")
        specs[name] = spec
        static = {"config": model.config, "spec": spec}
        params = model.inference_params(cfg.inference_layers)
        layouts[name] = _layout(params)
        prefill, prefill_compile_s[name] = aot_compile(gen.prefill_jit, params, x["ids"], x["px"], x["mask"],
                                                       x["types"], **static)
        logits, cache, pstats = prefill(params, x["ids"], x["px"], x["mask"], x["types"])
        prefill_stats[name] = jax.device_get(pstats)
        dyn = jax.device_put((logits, np.full((b,), t, np.int32), np.int32(n), eos,
                              np.int32(model.config.pad_token_id or 0), jax.random.PRNGKey(0), np.float32(0.0),
                              np.float32(1.0), np.arange(b, dtype=np.int32)))
        decode, compile_s[name] = aot_compile(gen.decode_jit, params, cache, *dyn, **static)

        def run(decode=decode, cache=cache, params=params, dyn=dyn, name=name):
            fresh = jax.block_until_ready(jax.tree.map(jnp.copy, cache))
            t0 = time.perf_counter()
            out = jax.block_until_ready(decode(params, fresh, *dyn))
            elapsed = time.perf_counter() - t0
            decode_stats[name] = out[2]
            if name == "dense":
                ctx.dense_decode_tokens[b] = out[0]
            return elapsed
        runs[name] = run

    stats = interleaved(runs, cfg.warmup, case.repeats or cfg.repeats)
    steps = n - 1  # the first new token is sampled from the prefill logits
    dstats = jax.device_get(decode_stats["mod"])
    kept, fed = np.asarray(dstats["decode_kept"], np.float64), np.asarray(dstats["decode_tokens"], np.float64)
    run_share = (kept.sum(-1) / max(fed.sum(), 1.0)) if kept.size else np.zeros((0,))
    decode_skip = float(1.0 - run_share.mean()) if run_share.size else 0.0
    p = prefill_stats["mod"]
    prefill_skip, _, _ = _skip_stats(np.asarray(p["prefill_kept"]).sum(-1), np.asarray(p["prefill_tokens"]).sum(-1), b)
    dense_a = F.decode_flops(ctx.dense.config, b, t, n)
    # A MoD layer is computed in a step iff some row keeps it (`decode_layer_runs`); rows that
    # skip a computed layer are masked, so compute follows the layer's share of computed steps.
    layer_runs = np.asarray(dstats["decode_layer_runs"], np.float64) / max(steps, 1)
    mod_a = F.decode_flops(ctx.mod.config, b, t, n, mod_capacity=specs["mod"].mod_capacity,
                           mod_run_fraction=[float(v) for v in layer_runs], skip_compute=True)
    row = _base_row(case, t, stats, compile_s["dense"], compile_s["mod"], decode_skip,
                    [float(v) for v in 1.0 - run_share], dense_a, mod_a, mod_a)
    row.update({
        "new_tokens": n, "decode_steps": steps,
        "tokens_per_s_dense": b * steps / (row["dense_ms"] * 1e-3),
        "tokens_per_s_mod": b * steps / (row["mod_ms"] * 1e-3),
        "ms_per_step_dense": row["dense_ms"] / steps, "ms_per_step_mod": row["mod_ms"] / steps,
        "prefill_skip_ratio": prefill_skip, "mod_capacity": specs["mod"].mod_capacity,
        "compile_s_prefill_dense": prefill_compile_s["dense"], "compile_s_prefill_mod": prefill_compile_s["mod"],
        "mod_layer_run_fraction": [float(v) for v in layer_runs], "inference_layers": layouts,
    })
    return _finish(row, ctx, dense_a.total, mod_a.total)


RUNNERS = {"prefill": run_prefill, "train_step": run_train_step, "decode": run_decode}


# ----------------------------------------------------------------------------------------------
# PyTorch baseline


def _torch_inputs(x: dict[str, np.ndarray]) -> dict:
    import torch

    return {"input_ids": torch.from_numpy(x["ids"].astype(np.int64)),
            "attention_mask": torch.from_numpy(x["mask"].astype(np.int64)),
            "pixel_values": torch.from_numpy(np.ascontiguousarray(np.moveaxis(x["px"], -1, 1)))}


def _torch_samples(run: Callable[[], float], warmup: int, repeats: int) -> dict:
    samples = [run() for _ in range(warmup + repeats)]
    return summarize(samples[warmup:] or samples)


def torch_baseline(ctx: Context, rows: list[dict]) -> dict:
    """HF `LlavaForConditionalGeneration` on the dense weights (exported through the converter's
    key map into a temporary HF directory), float32, same inputs, same thread count,
    `inference_mode`. Prefill rows: a forward with logits for the last position only. Decode
    rows: greedy `generate` with its KV cache and no EOS, timed like the JAX decode loop: the
    time of `max_new_tokens = n` minus that of `max_new_tokens = 1` (prefill and first token),
    over the n - 1 decode steps. Fills the `torch_*` fields of those rows in place."""
    cfg = ctx.config
    prefill_rows = [r for r in rows if r["kind"] == "prefill" and "skipped" not in r and not r.get("official_rule")]
    decode_rows = [r for r in rows if r["kind"] == "decode" and "skipped" not in r]
    if not prefill_rows and not decode_rows:
        return {"skipped": "no prefill or decode cases"}
    try:
        import torch
        import transformers
        from convert import hf_config
        from convert.readers import write_sharded_safetensors
        from convert.to_hf import torch_tensors
    except Exception as e:  # noqa: BLE001
        return {"skipped": f"torch baseline unavailable: {type(e).__name__}: {e}"}
    model_cfg = ctx.dense.config
    if model_cfg.param_dtype != "float32":
        return {"skipped": "torch baseline runs float32 weights only"}
    threads = cfg.threads or _cores()
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gmod-bench-hf-") as tmp:
        params = jax.device_get(ctx.dense.params)
        write_sharded_safetensors(tmp, torch_tensors(model_cfg, params, "D"), "5GB", metadata={"format": "pt"})
        del params
        (Path(tmp) / "config.json").write_text(json.dumps(hf_config.to_hf_llava_config(model_cfg), indent=2))
        model = transformers.LlavaForConditionalGeneration.from_pretrained(
            tmp, dtype=torch.float32, attn_implementation=cfg.torch_attention)
    model.eval()
    build_s = time.perf_counter() - t0
    for row in prefill_rows:
        b = row["batch"]
        inputs = _torch_inputs(ctx.batch(b))

        def run(inputs=inputs):
            with torch.inference_mode():
                t0 = time.perf_counter()
                out = model(**inputs, logits_to_keep=1, use_cache=False)
                return time.perf_counter() - t0, out.logits
        _, logits = run()
        s = _torch_samples(lambda run=run: run()[0], cfg.warmup, row.get("dense_stats", {}).get("n") or cfg.repeats)
        row["torch_dense_ms"] = s["median_ms"]
        row["torch_dense_stats"] = s
        if b in ctx.dense_last_logits:
            diff = np.abs(logits[:, -1].float().numpy() - ctx.dense_last_logits[b])
            row["torch_max_abs_logit_diff"] = float(diff.max())
        row["torch_over_jax_dense"] = s["median_ms"] / row["dense_ms"]
    # Greedy to the last token: no EOS (the JAX rows run without one too), no sampling.
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = model_cfg.pad_token_id or 0
    for row in decode_rows:
        b, n = row["batch"], row["new_tokens"]
        inputs = _torch_inputs(ctx.batch(b))
        t = inputs["input_ids"].shape[1]

        def generate(new, inputs=inputs):
            with torch.inference_mode():
                t0 = time.perf_counter()
                out = model.generate(**inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False, num_beams=1,
                                     use_cache=True)
                return time.perf_counter() - t0, out[:, t:]
        _, tokens = generate(n)
        repeats = row.get("dense_stats", {}).get("n") or cfg.repeats
        full = _torch_samples(lambda: generate(n)[0], cfg.warmup, repeats)
        first = _torch_samples(lambda: generate(1)[0], cfg.warmup, repeats)
        decode_ms = full["median_ms"] - first["median_ms"]
        row["torch_generate_ms"] = full["median_ms"]
        row["torch_generate_first_ms"] = first["median_ms"]
        row["torch_decode_ms"] = decode_ms
        row["tokens_per_s_torch"] = b * (n - 1) / (decode_ms * 1e-3) if decode_ms > 0 else None
        row["torch_generate_stats"] = full
        if b in ctx.dense_decode_tokens:
            jax_tokens = np.asarray(jax.device_get(ctx.dense_decode_tokens[b]))
            row["torch_tokens_equal_jax_dense"] = bool(np.array_equal(tokens.numpy(), jax_tokens))
        if row["tokens_per_s_torch"]:
            row["jax_dense_over_torch_tokens_per_s"] = row["tokens_per_s_dense"] / row["tokens_per_s_torch"]
    info = {"threads": threads, "attention": cfg.torch_attention, "dtype": "float32", "build_s": build_s,
            "torch": torch.__version__, "transformers": transformers.__version__}
    return info


# ----------------------------------------------------------------------------------------------
# Machine, output


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(name: str) -> str | None:
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:  # noqa: BLE001
        return None


def machine_info() -> dict:
    dev = jax.devices()[0]
    info = {
        "platform": jax.default_backend(), "device_kind": dev.device_kind, "device_count": jax.device_count(),
        "cpu": _cpu_model(), "cores": os.cpu_count(), "cores_usable": _cores(),
        "python": platform.python_version(), "os": platform.platform(),
        **{k: _version(k) for k in ("jax", "jaxlib", "flax", "optax", "torch", "transformers")},
    }
    try:
        info["load_avg_start"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        pass
    return info


def _jsonable(obj):
    if dataclasses.is_dataclass(obj):
        return {f.name: _jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)} | (
            {"name": obj.name} if isinstance(obj, Case) else {})
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.generic,)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


# ----------------------------------------------------------------------------------------------
# Main


def run(config: BenchConfig, only: tuple[str, ...] = (), on_case: Callable[[list[dict]], None] | None = None) -> dict:
    """Run the cases; `on_case(rows)` is called after each one (the CLI saves partial results
    there, so a run cut short by a time limit still leaves the cases it finished)."""
    machine = machine_info()
    date = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
    _log(f"building dense + γ-MoD models ({config.model.text.num_layers} layers, d={config.model.text.hidden_size})")
    t0 = time.perf_counter()
    dense, mod = build_models(config)
    jax.block_until_ready(mod.params)
    init_s = time.perf_counter() - t0
    peak = config.peak_tflops * 1e12 if config.peak_tflops else F.peak_flops(machine["device_kind"])
    ctx = Context(config=config, dense=dense, mod=mod, peak=peak)
    prefill_batches = sorted({c.batch for c in config.cases if c.kind == "prefill" and (not only or c.name in only)})
    if config.official_rule_rows and prefill_batches:
        _log(f"fitting the router for the official rule: {config.router_fit_steps} steps on the prefill prompts "
             f"(batches {prefill_batches})")
        prompts = {k: np.concatenate([ctx.batch(b)[k] for b in prefill_batches]) for k in ("ids", "px", "mask", "types")}
        fitted, ctx.router_fit = router_fit.fit_router(mod, prompts, config.router_fit_steps,
                                                       config.router_fit_lr / config.model.text.hidden_size)
        ctx.official = Model(config=router_fit.official_rule_config(mod.config), params=fitted.params)
        fit = ctx.router_fit
        _log(f"  official-rule routable skip {fit['official_routable_skip']:.3f} (capacity rule "
             f"{fit['target_routable_skip']:.3f}; {fit['official_routable_skip_fitted']:.3f} before the router "
             f"scale {fit['router_scale']:.3g}) [{fit['fit_s']:.0f} s]")
    rows = []
    for case in config.cases:
        if only and case.name not in only:
            continue
        _log(f"case {case.name}")
        t_case = time.perf_counter()
        case_rows = [RUNNERS[case.kind](ctx, case)]
        if case.kind == "prefill" and ctx.official is not None:
            _log(f"case {case.name}, official threshold rule")
            case_rows.append(run_prefill(ctx, case, official=True))
        for row in case_rows:
            rows.append(row)
            if on_case is not None:
                on_case(rows)
            if "skipped" in row:
                _log(f"  skipped: {row['skipped']}")
            else:
                _log(f"  dense {row['dense_ms']:.1f} ms, γ-MoD {row['mod_ms']:.1f} ms, speedup "
                     f"{fmt(row['speedup'], '.2f')} (bound {fmt(row['flop_bound_speedup'], '.2f')}), skip "
                     f"{row['skip_ratio']:.3f} [{time.perf_counter() - t_case:.0f} s]")
    torch_info = None
    if config.torch_baseline:
        _log("PyTorch baseline")
        torch_info = torch_baseline(ctx, rows)
    mod_cfg = mod.config
    skips = [r["skip_ratio"] for r in rows if r.get("kind") == "prefill" and "skip_ratio" in r]
    paper = None
    if skips:
        n_mod = len(mod_cfg.mod_layers)
        t = mod_cfg.text
        paper = {"seq_len": config.seq_len, "n_dense": t.num_layers - n_mod, "n_mod": n_mod,
                 "skip_ratio": skips[0],
                 "dense_tflops": F.paper_tflops(config.seq_len, t.hidden_size, t.intermediate_size,
                                                t.num_layers - n_mod, n_mod, 0.0),
                 "mod_tflops": F.paper_tflops(config.seq_len, t.hidden_size, t.intermediate_size,
                                              t.num_layers - n_mod, n_mod, skips[0])}
    try:
        machine["load_avg_end"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        pass
    cfg_json = {**_jsonable(config), "seq_len": config.seq_len, "mod_layers_resolved": list(mod_cfg.mod_layers),
                "routing_rule": _routing_rule(config, mod_cfg),
                "decode_rule": f"a decode token skips a MoD layer iff keep-prob < {mod_cfg.mod.decode_threshold}; "
                               f"layer weights `inference_layers={config.inference_layers}`",
                "num_params_dense": dense.num_params, "num_params_mod": mod.num_params, "init_s": init_s}
    return _jsonable({"machine": machine, "date": date, "config": cfg_json, "image_tokens": config.model.image_seq_length,
                      "peak_tflops": peak / 1e12 if peak else None, "paper_formula": paper, "torch": torch_info,
                      "router_fit": ctx.router_fit,
                      "cases": rows})


def _routing_rule(config: BenchConfig, mod_cfg: ModelConfig) -> str:
    if mod_cfg.mod.inference_routing == "capacity":
        return (f"capacity (the training top-k rule): each row skips floor({config.routing_ratio} × routable) "
                f"tokens per MoD layer, routable = `{config.masking}` masking "
                f"({', '.join(tt.NAMES[i] for i in mod_cfg.mod.routable_types)})")
    return (f"threshold (official inference rule): keep iff keep-prob > {mod_cfg.mod.prefill_threshold}, "
            f"at most {mod_cfg.mod.threshold_max_capacity:.0%} of the tokens")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[1])
    p.add_argument("--config", help="Python file defining get_config() -> BenchConfig")
    p.add_argument("--json", help="where to write the results (JSON)")
    p.add_argument("--markdown", help="BENCHMARKS.md to update (only this config's section is rewritten)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a config field, e.g. --set repeats=3 --set model.text.num_layers=4")
    p.add_argument("--only", action="append", default=[], metavar="CASE", help="run only these cases (by name)")
    p.add_argument("--from-json", metavar="JSON",
                   help="measure nothing: rewrite the --markdown section from an earlier run's JSON (e.g. "
                        "results fetched from a GPU machine)")
    args = p.parse_args(argv)
    if args.from_json:
        if not args.markdown:
            p.error("--from-json needs --markdown")
        result = json.loads(Path(args.from_json).read_text())
        if result.get("partial"):
            p.error(f"{args.from_json} holds a partial run ({len(result['cases'])} case(s)); finish the run first")
        section = result["config"]["section"]
        update_markdown(args.markdown, section, render_markdown(result, result.get("command", "python -m bench")))
        _log(f"updated section '{section}' of {args.markdown} from {args.from_json}")
        return 0
    if not args.config or not args.json:
        p.error("--config and --json are required (unless --from-json)")
    from gmod_jax.config_files import OverrideError, apply_overrides

    try:
        config = apply_overrides(load_config(args.config), args.set)
    except OverrideError as e:
        p.error(str(e))
    if config.require_platform and jax.default_backend() != config.require_platform:
        print(f"{config.title}: needs a '{config.require_platform}' JAX backend, found "
              f"'{jax.default_backend()}' ({jax.devices()[0].device_kind}); nothing was run.")
        return 0
    unknown = set(args.only) - {c.name for c in config.cases}
    if unknown:
        p.error(f"unknown case(s) {sorted(unknown)}; config has {[c.name for c in config.cases]}")
    command = shlex.join(["python", "-m", "bench", *argv])

    def save_partial(rows):
        partial = {"partial": True, "command": command, "config": _jsonable(config), "cases": _jsonable(rows)}
        write_text_atomic(Path(args.json), json.dumps(partial, indent=2) + "\n")

    result = run(config, tuple(args.only), save_partial)
    result["command"] = command
    write_text_atomic(Path(args.json), json.dumps(result, indent=2) + "\n")
    _log(f"wrote {args.json}")
    if args.markdown:
        update_markdown(args.markdown, config.section, render_markdown(result, result["command"]))
        _log(f"updated section '{config.section}' of {args.markdown}")
    return 0
