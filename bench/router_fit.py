"""Fit the γ-MoD router before timing, so the official threshold rule has something to skip.

With random weights every keep-probability sits near 0.5, far above the official prefill
threshold (keep iff r > 0.005): the official rule would keep every token and its rows would time
the dense model. A trained γ-MoD router is confident instead. `fit_router` reproduces that state
cheaply: optax Adam steps on a routing loss alone, on the benchmark prompts, with only the router
kernel trained. The targets are the training rule's (the capacity rule's top-k at the configured
ratio, recomputed every step from the current router); the loss is logistic with its boundary at
the official threshold (`threshold_routing_loss`), so the tokens the capacity rule skips end up
below 0.005 and the others above it. The fit's targets come from the training walk's hidden
states, while the official rule sees those of its own walk, so the fitted router alone may skip
more or less than the target (0.75 of the routable tokens for a 0.50 target was measured on the
CPU benchmark). `calibrate_router_scale` then scales the router kernel (one scalar, found by
bisection on the official rule's realised skip): a token passes iff its logit gap exceeds
log(0.005/0.995), so a larger scale pushes more of the negative gaps under it. `official_skip_fn`
measures what the official rule finally realises (the benchmark reports it next to the capacity
rule's share).
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


def official_skip_fn(config: ModelConfig):
    """`fn(params, inputs) -> {"routable_skip", "skip"}`: the skip ratios the official threshold
    rule realises on `inputs` (one prefill with the model's layer stack), over the routable tokens
    (what the router is fitted for) and over all tokens entering the MoD layers. Compiled once
    per input shape, so the calibration's bisection reuses one program."""
    module = LlavaModel(official_rule_config(config))

    @jax.jit
    def counts(params, ids, px, mask, types):
        out = module.apply({"params": params}, ids, px, mask, types, RoutingPlan(mode="inference"))
        return {k: jnp.sum(out[k]) for k in ("mod_kept_by_type", "mod_tokens_by_type", "mod_kept", "mod_tokens")}

    def fn(params, inputs):
        c = jax.device_get(counts(params, inputs["ids"], inputs["px"], inputs["mask"], inputs["types"]))
        return {"routable_skip": float(1.0 - c["mod_kept_by_type"] / max(c["mod_tokens_by_type"], 1)),
                "skip": float(1.0 - c["mod_kept"] / max(c["mod_tokens"], 1))}

    return fn


def _with_router(params: dict, router: dict) -> dict:
    return {**params, "llm": {**params["llm"], "mod_router": router}}


def calibrate_router_scale(skip_of, params: dict, target: float, tolerance: float = 0.02,
                           max_scale: float = 16.0, iterations: int = 10) -> tuple[float, dict, list]:
    """(scale, realised skips, [(scale, routable skip), ...]): the router-kernel scale, searched
    by bisection in log space over [1/max_scale, max_scale], whose official-rule routable skip
    (`skip_of(params) -> official_skip_fn's dict`) is closest to `target`; stops early within
    `tolerance`. The skip grows with the scale (more negative logit gaps fall under the
    threshold), up to the feedback of the changed kept sets on later layers' inputs, which is
    why every probe runs the real official walk."""
    router = params["llm"]["mod_router"]

    def probe(scale):
        skips = skip_of(_with_router(params, jax.tree.map(lambda w: w * scale, router)))
        return scale, skips

    lo, hi = -np.log(max_scale), np.log(max_scale)
    best = probe(1.0)
    history = [(1.0, best[1]["routable_skip"])]
    for _ in range(iterations):
        if abs(best[1]["routable_skip"] - target) <= tolerance:
            break
        if history[-1][1] > target:
            hi = np.log(history[-1][0])
        else:
            lo = np.log(history[-1][0])
        scale, skips = probe(float(np.exp((lo + hi) / 2)))
        history.append((scale, skips["routable_skip"]))
        if abs(skips["routable_skip"] - target) < abs(best[1]["routable_skip"] - target):
            best = (scale, skips)
    return best[0], best[1], history


def target_routable_skip(config: ModelConfig, types: np.ndarray) -> float:
    """The capacity rule's skip over routable tokens: floor(ratio · routable) per row."""
    routable = np.sum(np.asarray(routing.routable_mask(types, config.mod.routable_types)), axis=-1)
    skipped = np.floor(config.mod.routing_ratio * routable)
    return float(skipped.sum() / max(routable.sum(), 1))


def fit_router(model: Model, inputs: dict, steps: int, learning_rate: float, calibrate: bool = True
               ) -> tuple[Model, dict]:
    """(model with the fitted router, report). `inputs` holds the prompts (`ids`, `px`, `mask`,
    `types`, as `bench.runner.make_inputs` builds them). Only `llm/mod_router` changes:
    `steps` Adam steps, then (`calibrate`) the scale that brings the official rule's routable skip
    to the capacity rule's share."""
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
    skip_of = official_skip_fn(config)
    before = skip_of(params, inputs)
    losses = []
    for _ in range(steps):
        router, opt_state, loss = step(router, opt_state, *args)
        losses.append(float(loss))
    target = target_routable_skip(config, inputs["types"])
    fitted = _with_router(params, router)
    if calibrate:  # its first probe (scale 1) is the fitted router's walk, its result the final one's
        scale, after, history = calibrate_router_scale(lambda p: skip_of(p, inputs), fitted, target)
        fitted = _with_router(fitted, jax.tree.map(lambda w: w * scale, router))
        uncalibrated = history[0][1]
    else:
        scale, history = 1.0, []
        after = skip_of(fitted, inputs)
        uncalibrated = after["routable_skip"]
    report = {"steps": steps, "learning_rate": learning_rate, "rows": int(embeds.shape[0]),
              "router_loss_first": losses[0] if losses else None, "router_loss_last": losses[-1] if losses else None,
              "target_routable_skip": target,
              "official_routable_skip_before": before["routable_skip"],
              "official_routable_skip_fitted": uncalibrated,
              "router_scale": scale, "calibration": [list(h) for h in history],
              "official_routable_skip": after["routable_skip"], "official_skip": after["skip"],
              "fit_s": time.perf_counter() - t0}
    return Model(config=config, params=fitted), report
