"""AdamW, learning-rate schedules and regex-based freezing.

Freezing works by splitting the param tree: the optimizer, its state and the gradient only ever
see the trainable sub-tree (`select_trainable`); frozen params are passed into the loss as
constants. A frozen vision tower therefore costs no backward pass, no Adam moments, and stays
bitwise unchanged (LLaVA stage 1: projector only; stage 2: LLM + projector + router).
"""

from __future__ import annotations

import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import optax

from gmod_jax.sharding import path_str
from train.config import OptimConfig


def warmup_steps(cfg: OptimConfig, total_steps: int) -> int:
    if cfg.warmup_steps is not None:
        return cfg.warmup_steps
    return math.ceil(cfg.warmup_ratio * total_steps)  # HF TrainingArguments.get_warmup_steps


def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0, then cosine / linear decay to 0 at `total_steps` (HF
    get_cosine_schedule_with_warmup / get_linear_schedule_with_warmup), or constant."""
    warm = warmup_steps(cfg, total_steps)
    decay = max(1, total_steps - warm)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        ramp = step / max(1, warm)
        progress = jnp.clip((step - warm) / decay, 0.0, 1.0)
        if cfg.schedule == "cosine":
            after = 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        elif cfg.schedule == "linear":
            after = 1.0 - progress
        else:
            after = jnp.ones_like(progress)
        return cfg.lr * jnp.where(step < warm, ramp, after)

    return schedule


def _matches(patterns, path: str) -> bool:
    return any(re.search(p, path) for p in patterns)


def decay_mask(cfg: OptimConfig, params) -> Any:
    return jax.tree_util.tree_map_with_path(lambda p, _: not _matches(cfg.no_decay, path_str(p)), params)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    schedule = make_schedule(cfg, total_steps)
    parts = []
    if cfg.grad_clip is not None:
        parts.append(optax.clip_by_global_norm(cfg.grad_clip))
    parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                             mask=lambda p: decay_mask(cfg, p)))
    return optax.chain(*parts)


# ----------------------------------------------------------------------------------------------
# Trainable / frozen split of a nested-dict param tree


def trainable_paths(cfg: OptimConfig, params) -> set[str]:
    paths = {path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
    return {p for p in paths if _matches(cfg.trainable, p)}


def select(params: dict, paths: set[str], prefix: str = "") -> dict:
    """The sub-tree of nested dict `params` with only the leaves in `paths` (empty dicts pruned)."""
    out = {}
    for key, value in params.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            sub = select(value, paths, path + "/")
            if sub:
                out[key] = sub
        elif path in paths:
            out[key] = value
    return out


def merge(params: dict, update: dict) -> dict:
    """`params` with the leaves of the sub-tree `update` replacing its own."""
    out = dict(params)
    for key, value in update.items():
        out[key] = merge(params[key], value) if isinstance(value, dict) else value
    return out


def count_params(tree) -> int:
    return sum(int(math.prod(x.shape)) for x in jax.tree.leaves(tree))
