"""LLaMA decoder with γ-MoD layers.

Params are one stacked tree `layers/...` with a leading layer axis, independent of where the MoD
layers are (see docs/param_layout.md). The forward pass splits the stack into groups of
consecutive identical layers (dense or MoD) and `lax.scan`s each group, so compile time does not
grow with depth and a 7B config runs the same code as the tiny ones.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from gmod_jax import routing
from gmod_jax.config import ModelConfig
from gmod_jax.layers.dtypes import DTYPES
from gmod_jax.layers.attention import causal_attention, causal_mask, contract, project
from gmod_jax.layers.mlp import swiglu
from gmod_jax.layers.norms import rms_norm
from gmod_jax.layers.rope import apply_rope, inv_freq_and_scale, rope_cos_sin



@dataclasses.dataclass(frozen=True)
class RoutingPlan:
    """Static description of how MoD layers route in one forward pass.

    mode: "train" — per-sample top-k with masked routing learning, router loss computed;
          "inference" — the config's inference rule (official threshold, or the training
          capacity rule), no loss;
          "dense" — MoD layers run as dense layers (no router), for dense/MoD comparisons.
    capacity: static number of gathered slots per MoD layer. None means the sequence length
          (always correct, no savings) for top-k, and ceil(threshold_max_capacity · T) for
          threshold routing. Use `routing.static_keep_capacity` on the host to get the exact
          value for a batch.
    """

    mode: str = "train"
    capacity: int | None = None

    def __post_init__(self):
        if self.mode not in ("train", "inference", "dense"):
            raise ValueError(f"RoutingPlan.mode must be train, inference or dense, got {self.mode!r}")


def layer_groups(num_layers: int, mod_layers: tuple[int, ...]) -> list[tuple[int, int, bool]]:
    """Split 0..L-1 into maximal runs of consecutive dense or MoD layers: (start, stop, is_mod)."""
    mod = set(mod_layers)
    groups, start = [], 0
    for i in range(1, num_layers + 1):
        if i == num_layers or (i in mod) != (start in mod):
            groups.append((start, i, start in mod))
            start = i
    return groups


def position_ids(attention_mask):
    """Positions that skip left padding (what HF generate derives from the mask)."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def _remat(fn, policy: str):
    if policy == "none":
        return fn
    if policy == "dots":
        return jax.checkpoint(fn, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
    return jax.checkpoint(fn)


class LlamaDecoder(nn.Module):
    config: ModelConfig

    def setup(self):
        c, t = self.config, self.config.text
        pdt = DTYPES[c.param_dtype]
        L, D, F, H, KV, hd = t.num_layers, t.hidden_size, t.intermediate_size, t.num_heads, t.num_kv_heads, t.head_dim
        normal = nn.initializers.normal(t.initializer_range)
        ones, zeros = nn.initializers.ones, nn.initializers.zeros

        # Declared as one param per subtree so the tree matches docs/param_layout.md exactly.
        self.embed = self.param("embed", normal, (t.vocab_size, D), pdt)
        layers = {
            "attn_norm": {"scale": (ones, (L, D))},
            "attn": {
                "q": {"kernel": (normal, (L, D, H, hd)), **({"bias": (zeros, (L, H, hd))} if t.attention_bias else {})},
                "k": {"kernel": (normal, (L, D, KV, hd)), **({"bias": (zeros, (L, KV, hd))} if t.attention_bias else {})},
                "v": {"kernel": (normal, (L, D, KV, hd)), **({"bias": (zeros, (L, KV, hd))} if t.attention_bias else {})},
                "o": {"kernel": (normal, (L, H, hd, D)), **({"bias": (zeros, (L, D))} if t.attention_bias else {})},
            },
            "mlp_norm": {"scale": (ones, (L, D))},
            "mlp": {
                "gate": {"kernel": (normal, (L, D, F)), **({"bias": (zeros, (L, F))} if t.mlp_bias else {})},
                "up": {"kernel": (normal, (L, D, F)), **({"bias": (zeros, (L, F))} if t.mlp_bias else {})},
                "down": {"kernel": (normal, (L, F, D)), **({"bias": (zeros, (L, D))} if t.mlp_bias else {})},
            },
        }

        self.layers = self.param("layers", _stacked_init(layers, pdt))
        self.final_norm = self.param("final_norm", lambda rng: {"scale": jnp.ones((D,), pdt)})
        if not t.tie_word_embeddings:
            self.lm_head = self.param("lm_head", lambda rng: {"kernel": normal(rng, (D, t.vocab_size), pdt)})
        if c.mod.enabled:
            self.mod_router = self.param("mod_router", lambda rng: {"kernel": _router_init(rng, c, pdt)})

    # ------------------------------------------------------------------------------------------

    def embed_tokens(self, input_ids):
        dtype = DTYPES[self.config.dtype]
        return jnp.take(self.embed, input_ids, axis=0).astype(dtype)

    def logits(self, hidden):
        t = self.config.text
        h = rms_norm(hidden, self.final_norm["scale"], t.rms_norm_eps)
        dtype = DTYPES[self.config.dtype]
        if t.tie_word_embeddings:
            out = contract(h.astype(dtype), self.embed.T.astype(dtype), 1)
        else:
            out = contract(h.astype(dtype), self.lm_head["kernel"].astype(dtype), 1)
        return out.astype(jnp.float32)

    def __call__(self, embeds, attention_mask, token_types, plan: RoutingPlan = RoutingPlan(),
                 attn_probs_fn: Callable | None = None):
        """Run the decoder stack. Returns (hidden [B,T,D], aux dict).

        aux: `router_loss` (scalar, coefficient applied), `mod_kept` / `mod_tokens` [n_mod]
        (kept and entering non-pad tokens per MoD layer), `mod_kept_by_type` /
        `mod_tokens_by_type` [n_mod, R] (the same per routable token type), and `attn_summary`
        [L, ...] when `attn_probs_fn` is given (applied to each layer's post-softmax attention
        [B,H,T,T]).
        """
        return decoder_forward(self.config, self.layers, self.mod_router["kernel"] if self.config.mod.enabled else None,
                               embeds, attention_mask, token_types, plan, attn_probs_fn)


def _stacked_init(spec, pdt):
    def init(rng):
        leaves, treedef = jax.tree.flatten(spec, is_leaf=lambda x: isinstance(x, tuple) and len(x) == 2 and callable(x[0]))
        rngs = jax.random.split(rng, len(leaves))
        return jax.tree.unflatten(treedef, [fn(r, shape, pdt) for (fn, shape), r in zip(leaves, rngs)])
    return init


def _router_init(rng, c: ModelConfig, pdt):
    d = c.text.hidden_size
    shape = (d, 2) if c.mod.shared_router else (len(c.mod.layers), d, 2)
    if c.mod.router_init == "xavier_uniform":
        bound = math.sqrt(6.0 / (d + 2))
    else:  # PyTorch nn.Linear default (kaiming_uniform with a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        bound = 1.0 / math.sqrt(d)
    return jax.random.uniform(rng, shape, pdt, -bound, bound)


# ----------------------------------------------------------------------------------------------
# Pure forward functions (shared by training, inference, ARank and the KV-cache decoder).

def attention_block(config: ModelConfig, p, h, cos, sin, mask, return_probs=False):
    """Self-attention of a decoder layer; `mask` must be causal (see `causal_attention`)."""
    t, dtype = config.text, DTYPES[config.dtype]
    q = apply_rope(project(h, p["q"], "btd,dhk->bthk", dtype), cos, sin)
    k = apply_rope(project(h, p["k"], "btd,dhk->bthk", dtype), cos, sin)
    v = project(h, p["v"], "btd,dhk->bthk", dtype)
    out, probs = causal_attention(q, k, v, mask, scale=t.head_dim ** -0.5, return_probs=return_probs,
                                  impl=config.attention_impl)
    return project(out, p["o"], "bthk,hkd->btd", dtype), probs, (k, v)


def decoder_layer_with_kv(config: ModelConfig, p, x, cos, sin, mask, mlp_scale=None, return_probs=False):
    """One pre-norm LLaMA layer. `mlp_scale` [B,T] multiplies only the MLP output (γ-MoD).
    Returns (new x, attention probs or None, (keys after RoPE, values)) — the KV cache's input."""
    t, dtype = config.text, DTYPES[config.dtype]
    h = rms_norm(x, p["attn_norm"]["scale"], t.rms_norm_eps)
    attn, probs, kv = attention_block(config, p["attn"], h, cos, sin, mask, return_probs)
    x = x + attn
    m = swiglu(p["mlp"], rms_norm(x, p["mlp_norm"]["scale"], t.rms_norm_eps), dtype)
    if mlp_scale is not None:
        m = m * mlp_scale[..., None].astype(m.dtype)
    return x + m, probs, kv


def decoder_layer(config: ModelConfig, p, x, cos, sin, mask, mlp_scale=None, return_probs=False):
    """`decoder_layer_with_kv` without the keys and values: (new x, probs or None)."""
    x, probs, _ = decoder_layer_with_kv(config, p, x, cos, sin, mask, mlp_scale, return_probs)
    return x, probs


def router_logits(config: ModelConfig, p_layer, router_kernel, x):
    """z = N_ℓ(x) @ W_r in float32: the layer's own input RMSNorm, the shared router matrix."""
    h = rms_norm(x, p_layer["attn_norm"]["scale"], config.text.rms_norm_eps)
    return jnp.einsum("btd,dc->btc", h.astype(jnp.float32), router_kernel.astype(jnp.float32))


def select_tokens(config: ModelConfig, probs, attention_mask, token_types, plan: RoutingPlan):
    """Static-shape token selection for one MoD layer according to the plan."""
    mod, t = config.mod, probs.shape[1]
    if plan.mode == "inference" and mod.inference_routing == "threshold":
        capacity = plan.capacity or max(1, math.ceil(mod.threshold_max_capacity * t))
        return routing.select_threshold(probs, attention_mask, mod.prefill_threshold, min(capacity, t))
    capacity = plan.capacity or t
    return routing.select_topk(probs, token_types, mod.routable_types, mod.routing_ratio, min(capacity, t))


def mod_layer(config: ModelConfig, p, router_kernel, x, positions, attention_mask, token_types,
              plan: RoutingPlan, rope, return_probs=False):
    """γ-MoD layer: route, run attention+MLP on kept tokens only, scatter back.

    Returns (new x, router loss of this layer, counts, probs or None); counts: `kept` and
    `tokens` (kept and entering non-pad tokens), `kept_by_type` and `tokens_by_type` (the same
    per routable token type, in `mod.routable_types` order).
    """
    mod = config.mod
    logits = router_logits(config, p, router_kernel, x)
    probs = routing.router_probs(logits)
    sel = select_tokens(config, probs, attention_mask, token_types, plan)
    impl = mod.implementation
    x_kept = routing.gather_tokens(x, sel, impl)
    key_valid = routing.gather_mask(attention_mask, sel)
    if mod.compact_positions:
        pos_kept = routing.compact_positions(sel, attention_mask)
    else:
        pos_kept = routing.gathered_positions(positions, sel)
    cos, sin = rope(pos_kept)
    mask = routing.kept_attention_mask(sel, key_valid)
    r_kept = routing.gather_mask(probs, sel)
    y_kept, attn_probs = decoder_layer(config, p, x_kept, cos, sin, mask, mlp_scale=r_kept, return_probs=return_probs)
    x_new = routing.scatter_tokens(x, y_kept, sel, impl)
    valid = attention_mask.astype(bool)
    of_type = jnp.stack([valid & (token_types == t) for t in mod.routable_types])  # [R, B, T]
    counts = {"kept": jnp.sum(sel.selected & valid, dtype=jnp.int32),
              "tokens": jnp.sum(valid, dtype=jnp.int32),
              "kept_by_type": jnp.sum(of_type & sel.selected, axis=(1, 2), dtype=jnp.int32),
              "tokens_by_type": jnp.sum(of_type, axis=(1, 2), dtype=jnp.int32)}
    if plan.mode == "train":
        loss = routing.router_loss(logits, sel.selected, attention_mask, mod.loss_token_reduction)
    else:
        loss = jnp.zeros((), jnp.float32)
    return x_new, loss, counts, attn_probs


def rope_builder(config: ModelConfig, dense_positions):
    """pos -> (cos, sin). Frequencies come from the dense positions (dynamic / longrope scaling
    depends on the sequence length), also when MoD layers apply them to compacted positions."""
    t = config.text
    inv, scale = inv_freq_and_scale(dense_positions, theta=t.rope_theta, dim=t.head_dim,
                                    scaling=t.rope_scaling_dict, max_pos=t.max_position_embeddings)
    return lambda pos: rope_cos_sin(pos, inv, scale)


def layer_group(layers, start: int, stop: int, by_index: bool):
    """(xs, fetch) to scan layers start..stop-1 of the stacked `layers`: `fetch(x)` turns one
    step's scan input into that layer's params.

    A static slice of the stack is a copy in XLA (no views): slicing every group out of the stack
    copied all weights at every call, e.g. ~600 MB per forward and per decode step of the CPU
    benchmark's γ-MoD model, while the dense model's one full-range group copied nothing. With
    `by_index` the scan runs over layer indices and each step reads its layer from the full
    stack, a per-step slice XLA does not materialise. Differentiated code keeps the slice
    (by_index=False): reading a closed-over stack by index makes the backward pass add a
    full-size, zero-padded gradient of the whole stack at every layer.
    """
    if by_index:
        return jnp.arange(start, stop), lambda i: jax.tree.map(lambda a: a[i], layers)
    return jax.tree.map(lambda a: a[start:stop], layers), lambda p: p


def decoder_forward(config: ModelConfig, layers, router, embeds, attention_mask, token_types,
                    plan: RoutingPlan, attn_probs_fn=None):
    t = config.text
    b, T, _ = embeds.shape
    attention_mask = jnp.ones((b, T), bool) if attention_mask is None else attention_mask.astype(bool)
    positions = position_ids(attention_mask)
    rope = rope_builder(config, positions)
    cos, sin = rope(positions)
    dense_mask = causal_mask(attention_mask)
    want_probs = attn_probs_fn is not None
    mod_layers = config.mod_layers if plan.mode != "dense" else ()
    groups = layer_groups(t.num_layers, mod_layers)
    mod_index = {layer: i for i, layer in enumerate(config.mod.layers)}

    x = embeds
    losses, counts, summaries = [], [], []
    for start, stop, is_mod in groups:
        group_xs, fetch = layer_group(layers, start, stop, by_index=plan.mode != "train")
        if not is_mod:
            def dense_step(h, xs, fetch=fetch):
                h, probs = decoder_layer(config, fetch(xs), h, cos, sin, dense_mask, return_probs=want_probs)
                return h, (attn_probs_fn(probs) if want_probs else None)

            x, ys = _scan(_remat(dense_step, config.remat), x, group_xs, config.scan_layers)
            summaries.append(ys)
            continue
        if config.mod.shared_router:
            routers = None
        else:
            routers = router[mod_index[start]:mod_index[start] + (stop - start)]

        def mod_step(h, xs, fetch=fetch):
            p, r = xs
            kernel = router if r is None else r
            h, loss, c, probs = mod_layer(config, fetch(p), kernel, h, positions, attention_mask, token_types,
                                          plan, rope, return_probs=want_probs)
            return h, (loss, c, attn_probs_fn(probs) if want_probs else None)

        x, (loss, c, ys) = _scan(_remat(mod_step, config.remat), x, (group_xs, routers), config.scan_layers)
        losses.append(loss), counts.append(c), summaries.append(ys)

    aux = {}
    if losses:
        per_layer = jnp.concatenate(losses)
        reduce = jnp.sum if config.mod.loss_layer_reduction == "sum" else jnp.mean
        aux["router_loss"] = config.mod.router_aux_loss_coef * reduce(per_layer)
        per_layer_counts = jax.tree.map(lambda *a: jnp.concatenate(a), *counts)
        aux.update({f"mod_{name}": v for name, v in per_layer_counts.items()})
    else:
        aux["router_loss"] = jnp.zeros((), jnp.float32)
    if want_probs:
        aux["attn_summary"] = jax.tree.map(lambda *a: jnp.concatenate(a), *summaries)
    return x, aux


def _scan(step, carry, xs, use_scan: bool):
    """lax.scan over the leading axis, or an unrolled Python loop (same results) for debugging."""
    if use_scan:
        return jax.lax.scan(step, carry, xs)
    n = jax.tree.leaves(xs)[0].shape[0]
    outs = []
    for i in range(n):
        carry, y = step(carry, jax.tree.map(lambda a: a[i], xs))
        outs.append(y)
    return carry, jax.tree.map(lambda *a: jnp.stack(a), *outs) if outs and outs[0] is not None else None
