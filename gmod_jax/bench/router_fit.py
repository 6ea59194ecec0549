"""Fit the γ-MoD router before timing, so the official threshold rule has something to skip.

With random weights every keep-probability sits near 0.5, far above the official prefill
threshold (keep iff r > 0.005): the official rule would keep every token and its rows would time
the dense model. A trained γ-MoD router is confident instead. `fit_router` reproduces that state
cheaply: optax Adam steps on a routing loss alone, on the benchmark prompts, with only the router
kernel trained. The targets are the training rule's (the capacity rule's top-k at the configured
ratio, recomputed every step from the current router); the loss is logistic with its boundary at
the official threshold (`threshold_routing_loss`), so the tokens the capacity rule skips end up
below 0.005 and the others above it. `official_skip` measures what the official rule then
realises (the benchmark reports it next to the capacity rule's share).
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gmod_jax import routing
from gmod_jax.api import Model
from gmod_jax.config import ModelConfig
from gmod_jax.models.llama import Collect, RoutingPlan, decoder_walk, routing_capacity
from gmod_jax.models.llava import LlavaModel


def official_rule_config(config: ModelConfig) -> ModelConfig:
    """The same γ-MoD model served with the official threshold rule (capacity buckets)."""
    return config.replace(mod=dataclasses.replace(config.mod, inference_routing="threshold"))


def threshold_routing_loss(keep_prob, selected, attention_mask, threshold: float):
    """Mean logistic loss of the capacity rule's top-k decision (`selected`, 1 = kept) with the
    decision boundary at the official threshold: keep-prob r > threshold for kept tokens, below
    it for skipped ones. The model's own router loss puts the boundary at r = 0.5, where a
    token at r = 0.1 already counts as skipped but the official rule keeps it; its gradient
    also vanishes long before skipped tokens reach r < 0.005."""
    r = jnp.clip(keep_prob.astype(jnp.float32), 1e-30, 1.0 - 1e-7)
    margin = (jnp.log(r) - jnp.log1p(-r)) - float(np.log(threshold / (1.0 - threshold)))
    sign = jnp.where(selected, 1.0, -1.0)
    weight = attention_mask.astype(jnp.float32)
    return jnp.sum(jax.nn.softplus(-sign * margin) * weight) / jnp.maximum(jnp.sum(weight), 1.0)


def _fit_step(config: ModelConfig, capacity: int, tx):
    """Jitted Adam step on the router alone: a training-rule walk (top-k targets at the
    configured ratio) over prompt embeddings computed once (the tower does not depend on the
    router), every MoD layer's threshold routing loss summed."""
    plan = RoutingPlan(mode="train", capacity=capacity)

    def loss_fn(router, layers, embeds, mask, types):
        _, walk = decoder_walk(config, layers, router["kernel"], embeds, mask, types, plan, Collect(routing=True),
                               by_index=False)
        losses = jax.vmap(threshold_routing_loss, in_axes=(0, 0, None, None))(
            walk.mod["keep_prob"], walk.mod["selected"], mask, config.mod.prefill_threshold)
        return jnp.sum(losses)

    def step(router, opt_state, layers, embeds, mask, types):
        loss, grads = jax.value_and_grad(loss_fn)(router, layers, embeds, mask, types)
        updates, opt_state = tx.update(grads, opt_state, router)
        return optax.apply_updates(router, updates), opt_state, loss

    return jax.jit(step)


def official_skip(config: ModelConfig, params: dict, inputs: dict) -> dict:
    """Skip ratios the official threshold rule realises on `inputs` (one prefill with the
    model's layer stack): over the routable tokens (what the router is fitted for) and over all
    tokens entering the MoD layers."""
    cfg = official_rule_config(config)
    module = LlavaModel(cfg)

    def run(params, ids, px, mask, types):
        return module.apply({"params": params}, ids, px, mask, types, RoutingPlan(mode="inference"))

    out = jax.device_get(jax.jit(run)(params, inputs["ids"], inputs["px"], inputs["mask"], inputs["types"]))
    kept_t, tokens_t = np.sum(out["mod_kept_by_type"]), np.sum(out["mod_tokens_by_type"])
    kept, tokens = np.sum(out["mod_kept"]), np.sum(out["mod_tokens"])
    return {"routable_skip": float(1.0 - kept_t / max(tokens_t, 1)), "skip": float(1.0 - kept / max(tokens, 1))}


def target_routable_skip(config: ModelConfig, types: np.ndarray) -> float:
    """The capacity rule's skip over routable tokens: floor(ratio · routable) per row."""
    routable = np.sum(np.asarray(routing.routable_mask(types, config.mod.routable_types)), axis=-1)
    skipped = np.floor(config.mod.routing_ratio * routable)
    return float(skipped.sum() / max(routable.sum(), 1))


def fit_router(model: Model, inputs: dict, steps: int, learning_rate: float) -> tuple[Model, dict]:
    """(model with the fitted router, report). `inputs` holds the prompts (`ids`, `px`, `mask`,
    `types`, as `gmod_jax.bench.runner.make_inputs` builds them). Only `llm/mod_router` changes."""
    config = model.config
    if not config.mod.enabled:
        raise ValueError("fit_router needs a γ-MoD model")
    t0 = time.perf_counter()
    tx = optax.adam(learning_rate)
    capacity = routing_capacity(config, inputs["types"], "train")
    step = _fit_step(config, capacity, tx)
    params = model.params
    router = jax.tree.map(jnp.copy, params["llm"]["mod_router"])
    opt_state = tx.init(router)
    embeds = jax.jit(lambda p, ids, px: LlavaModel(config).apply({"params": p}, ids, px, method=LlavaModel.embed))(
        params, inputs["ids"], inputs["px"])
    args = (params["llm"]["layers"], embeds, jnp.asarray(inputs["mask"], bool), jnp.asarray(inputs["types"]))
    before = official_skip(config, params, inputs)
    losses = []
    for _ in range(steps):
        router, opt_state, loss = step(router, opt_state, *args)
        losses.append(float(loss))
    fitted = Model(config=config, params={**params, "llm": {**params["llm"], "mod_router": router}})
    after = official_skip(config, fitted.params, inputs)
    report = {"steps": steps, "learning_rate": learning_rate, "rows": int(embeds.shape[0]),
              "router_loss_first": losses[0] if losses else None, "router_loss_last": losses[-1] if losses else None,
              "target_routable_skip": target_routable_skip(config, inputs["types"]),
              "official_routable_skip_before": before["routable_skip"],
              "official_routable_skip": after["routable_skip"], "official_skip": after["skip"],
              "fit_s": time.perf_counter() - t0}
    return fitted, report
