"""Train state, the jitted train / eval steps, and their shardings.

State = {"params": full param tree, "opt_state": optax state of the trainable sub-tree,
"step": int32}. The train step takes a batch of [accum, micro, ...] arrays, scans over the
micro-batches accumulating float32 gradients, and applies one AdamW update. The MoD capacity is
a Python int baked into each compiled step (one compile per distinct capacity).

Loss = LM cross-entropy over answer tokens (labels shifted by one, summed over the whole
optimizer batch and divided by its number of labelled tokens, so the result does not depend on
how the batch is split over devices or micro-batches) + the router loss (coefficient already
applied by the model; averaged over micro-batches).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding

from gmod_jax import sharding as shd
from gmod_jax import token_types as tt
from gmod_jax.config import ModelConfig
from gmod_jax.models.llama import RoutingPlan
from gmod_jax.models.llava import LlavaModel
from train import flops as flops_lib
from train import optimizer as opt
from train.data import IGNORE_INDEX, MODEL_KEYS


def init_params(model: ModelConfig, rng) -> dict:
    """Random params (jittable; under jit with out_shardings each device builds only its shard)."""
    ids = jnp.zeros((1, model.image_seq_length + 2), jnp.int32).at[0, 1:-1].set(model.image_token_index)
    px = jnp.zeros((1, *model.pixel_shape), jnp.float32)
    return LlavaModel(model).init(rng, ids, px)["params"]


@dataclasses.dataclass
class StateSpec:
    """Everything static about a run's train state: optimizer, trainable paths, shardings."""

    model: ModelConfig
    tx: optax.GradientTransformation
    schedule: Callable
    trainable: frozenset[str]
    mesh: Any
    abstract: Any  # ShapeDtypeStruct tree of the state, with shardings
    shardings: Any  # NamedSharding tree of the state


def opt_state_shardings(abstract_opt_state, param_sharding_by_path: dict[str, NamedSharding], mesh):
    """Optimizer-state leaves that mirror a param (Adam moments) take that param's sharding:
    the trailing run of dict keys in a leaf's path is the param path. Scalars (counts) and
    anything else are replicated."""

    def leaf_sharding(path, _):
        keys = []
        for k in reversed(path):
            if not isinstance(k, jax.tree_util.DictKey):
                break
            keys.append(str(k.key))
        name = "/".join(reversed(keys))
        return param_sharding_by_path.get(name, shd.replicated(mesh))

    return jax.tree_util.tree_map_with_path(leaf_sharding, abstract_opt_state)


def make_state_spec(model: ModelConfig, tx, schedule, optim_cfg, mesh) -> StateSpec:
    abstract_params = jax.eval_shape(functools.partial(init_params, model), jax.random.PRNGKey(0))
    trainable = frozenset(opt.trainable_paths(optim_cfg, abstract_params))
    if not trainable:
        raise ValueError(f"optim.trainable {optim_cfg.trainable} matches no param")
    param_sh = shd.param_shardings(abstract_params, mesh)
    by_path = {shd.path_str(p): s for p, s in jax.tree_util.tree_flatten_with_path(param_sh)[0]}
    abstract_opt = jax.eval_shape(tx.init, opt.select(abstract_params, trainable))
    shardings = {"params": param_sh, "opt_state": opt_state_shardings(abstract_opt, by_path, mesh),
                 "step": shd.replicated(mesh)}
    abstract = {"params": abstract_params, "opt_state": abstract_opt,
                "step": jax.ShapeDtypeStruct((), jnp.int32)}
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    return StateSpec(model, tx, schedule, trainable, mesh, abstract, shardings)


def make_run_spec(model: ModelConfig, optim_cfg, total_steps: int, mesh) -> StateSpec:
    """The state spec of a run of `total_steps` optimizer steps: AdamW (+ global-norm clip) on the
    schedule and the trainable paths of `optim_cfg` (a `train.config.OptimConfig`). `python -m
    train` and the benchmark's train-step rows both build their step from this."""
    schedule = opt.make_schedule(optim_cfg, total_steps)
    tx = opt.make_optimizer(optim_cfg, total_steps)
    return make_state_spec(model, tx, schedule, optim_cfg, mesh)


@dataclasses.dataclass(frozen=True)
class TrainProgram:
    """What `python -m train` compiles for a recipe on a mesh, built once by `build_train_program`
    and shared by the training loop and the ahead-of-time compiler (`python -m train.aot`)."""

    spec: StateSpec
    accum: int  # micro-batches per optimizer step
    micro: int  # rows per micro-batch (global batch / accum)
    trainable_parts: flops_lib.Trainable  # which parts get gradients (for model FLOPs)

    def step(self, capacity: int | None):
        """The jitted train step for one static MoD capacity."""
        return make_train_step(self.spec, self.accum, capacity)

    def model_flops(self, seq_len: int, capacity: int | None) -> float:
        """Model FLOPs of one optimizer step (all devices), the MFU numerator."""
        return flops_lib.train_step_flops(self.spec.model, self.accum * self.micro, seq_len, capacity,
                                          self.trainable_parts)


def check_micro_batch(mesh, global_batch: int, accum: int) -> int:
    """The micro-batch (global batch / accumulation steps); raises unless it splits evenly over
    the mesh's batch shards."""
    micro = global_batch // accum
    n_shards = shd.batch_shard_count(mesh)
    if micro % n_shards:
        raise ValueError(f"micro-batch {micro} (global_batch {global_batch} / grad_accum_steps {accum}) "
                         f"is not divisible by the {n_shards} batch shards of mesh {dict(mesh.shape)}")
    return micro


def build_train_program(model: ModelConfig, optim_cfg, global_batch: int, mesh, total_steps: int) -> TrainProgram:
    """State spec (params, optimizer, shardings), accumulation and micro-batch of a run.

    Raises when the micro-batch does not split over the mesh's batch shards."""
    accum = optim_cfg.grad_accum_steps
    micro = check_micro_batch(mesh, global_batch, accum)
    spec = make_run_spec(model, optim_cfg, total_steps, mesh)
    parts = flops_lib.Trainable(**{part: any(p.startswith(part + "/") for p in spec.trainable)
                                   for part in ("vision", "projector", "llm")})
    return TrainProgram(spec, accum, micro, parts)


def make_init_params(spec: StateSpec):
    """Jitted fn(rng) -> params, created directly in their shardings. Kept apart from the
    optimizer init so that its (threefry-heavy, slow to compile) program is the same for every
    freezing schedule and is reused from the compilation cache."""
    return jax.jit(functools.partial(init_params, spec.model), out_shardings=spec.shardings["params"])


def make_opt_init(spec: StateSpec):
    """Jitted fn(params) -> state at step 0. Params are donated: the state holds them."""
    def init(params):
        return {"params": params, "opt_state": spec.tx.init(opt.select(params, spec.trainable)),
                "step": jnp.zeros((), jnp.int32)}

    return jax.jit(init, in_shardings=(spec.shardings["params"],), out_shardings=spec.shardings,
                   donate_argnums=(0,))


# ----------------------------------------------------------------------------------------------
# Loss


def lm_loss_sum(logits, labels):
    """Sum of next-token cross-entropies over labelled positions, and their count."""
    logits, targets = logits[:, :-1], labels[:, 1:]
    valid = targets != IGNORE_INDEX
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), jnp.where(valid, targets, 0))
    return jnp.sum(jnp.where(valid, ce, 0.0)), jnp.sum(valid.astype(jnp.int32))


def _forward(model: ModelConfig, params, batch, plan: RoutingPlan):
    return LlavaModel(model).apply({"params": params}, batch["input_ids"], batch["pixel_values"],
                                   batch["attention_mask"], batch["token_types"], plan)


def batch_shardings(mesh, accum_axis: bool) -> dict[str, NamedSharding]:
    s = shd.batch_sharding(mesh, 1 if accum_axis else 0)
    return {k: s for k in MODEL_KEYS}


def make_train_step(spec: StateSpec, accum: int, capacity: int | None):
    """Jitted fn(state, batch) -> (state, metrics); the state argument is donated."""
    model, tx, trainable = spec.model, spec.tx, spec.trainable
    plan = RoutingPlan(mode="train", capacity=capacity)
    n_mod = len(model.mod_layers)
    routable = model.mod.routable_types if n_mod else ()
    # The forward's kept / entering token counts per MoD layer (and per routable type); zeros
    # without MoD layers, and the start of their sum over micro-batches. NumPy constants: building
    # a step places nothing on a device (AOT compiles for devices this host does not have).
    zero_counts = {"mod_kept": np.zeros((n_mod,), np.int32), "mod_tokens": np.zeros((n_mod,), np.int32),
                   "mod_kept_by_type": np.zeros((n_mod, len(routable)), np.int32),
                   "mod_tokens_by_type": np.zeros((n_mod, len(routable)), np.int32)}

    def micro_objective(train_params, params, mb, n_labels):
        out = _forward(model, opt.merge(params, train_params), mb, plan)
        lm_sum, _ = lm_loss_sum(out["logits"], mb["labels"])
        router = out["router_loss"].astype(jnp.float32)
        objective = lm_sum / n_labels + router / accum
        counts = {k: out.get(k, zero) for k, zero in zero_counts.items()}
        return objective, (lm_sum, router, counts)

    grad_fn = jax.value_and_grad(micro_objective, has_aux=True)

    def step(state, batch):
        params = state["params"]
        train_params = opt.select(params, trainable)
        n_labels = jnp.maximum(jnp.sum((batch["labels"][:, :, 1:] != IGNORE_INDEX).astype(jnp.int32)), 1)
        n_labels_f = n_labels.astype(jnp.float32)
        if accum == 1:
            mb = jax.tree.map(lambda x: x[0], batch)
            (_, aux), grads = grad_fn(train_params, params, mb, n_labels_f)
            lm_sum, router, counts = aux
        else:
            def body(carry, mb):
                g_acc, lm_acc, r_acc, c_acc = carry
                (_, (lm, r, c)), g = grad_fn(train_params, params, mb, n_labels_f)
                g_acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_acc, g)
                return (g_acc, lm_acc + lm, r_acc + r, jax.tree.map(jnp.add, c_acc, c)), None

            zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), train_params)
            init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zero_counts)
            (grads, lm_sum, router_sum, counts), _ = jax.lax.scan(body, init, batch)
            grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, train_params)
            router = router_sum / accum
        grad_norm = optax.global_norm(grads)
        updates, opt_state = tx.update(grads, state["opt_state"], train_params)
        new_train = optax.apply_updates(train_params, updates)
        new_state = {"params": opt.merge(params, new_train), "opt_state": opt_state, "step": state["step"] + 1}
        lm_loss = lm_sum / n_labels_f
        metrics = {
            "loss": lm_loss + router, "lm_loss": lm_loss, "router_loss": router, "grad_norm": grad_norm,
            "lr": jnp.asarray(spec.schedule(state["step"]), jnp.float32),
            "tokens": jnp.sum(batch["attention_mask"].astype(jnp.int32)), "label_tokens": n_labels,
        }
        if n_mod:
            kept, entering = counts["mod_kept"], counts["mod_tokens"]
            metrics["skip_ratio_per_layer"] = 1.0 - kept.astype(jnp.float32) / jnp.maximum(entering, 1)
            metrics["skip_ratio"] = 1.0 - jnp.sum(kept) / jnp.maximum(jnp.sum(entering), 1)
            # Which kind of token the router drops (over all MoD layers): whether it settles on
            # image or on system-prompt tokens shows in the first steps.
            kept_t, entering_t = (jnp.sum(counts[k], axis=0) for k in ("mod_kept_by_type", "mod_tokens_by_type"))
            for i, t in enumerate(routable):
                metrics[f"skip_ratio/{tt.NAMES[t]}"] = 1.0 - kept_t[i] / jnp.maximum(entering_t[i], 1)
        return new_state, metrics

    repl = shd.replicated(spec.mesh)
    return jax.jit(step, in_shardings=(spec.shardings, batch_shardings(spec.mesh, True)),
                   out_shardings=(spec.shardings, repl), donate_argnums=(0,))


def make_eval_step(spec: StateSpec, capacity: int | None):
    """Jitted fn(params, batch [B, ...]) -> sums for the eval loss (training routing rule)."""
    model = spec.model
    plan = RoutingPlan(mode="train", capacity=capacity)

    def step(params, batch):
        out = _forward(model, params, batch, plan)
        lm_sum, n = lm_loss_sum(out["logits"], batch["labels"])
        return {"lm_sum": lm_sum, "label_tokens": n, "router_loss": out["router_loss"].astype(jnp.float32)}

    return jax.jit(step, in_shardings=(spec.shardings["params"], batch_shardings(spec.mesh, False)),
                   out_shardings=shd.replicated(spec.mesh))


def abstract_batch(spec: StateSpec, accum: int, micro: int, seq_len: int) -> dict[str, jax.ShapeDtypeStruct]:
    """ShapeDtypeStructs of a train batch (for ahead-of-time lowering without data)."""
    s = shd.batch_sharding(spec.mesh, 1)
    shapes = {"input_ids": ((accum, micro, seq_len), jnp.int32), "labels": ((accum, micro, seq_len), jnp.int32),
              "attention_mask": ((accum, micro, seq_len), jnp.bool_),
              "token_types": ((accum, micro, seq_len), jnp.int32),
              "pixel_values": ((accum, micro, *spec.model.pixel_shape), jnp.float32)}
    return {k: jax.ShapeDtypeStruct(shape, dt, sharding=s) for k, (shape, dt) in shapes.items()}


def host_array(x) -> np.ndarray:
    """A (possibly multi-process) replicated or sharded array as numpy on this host."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
