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
import numpy as np

from gmod_jax import routing
from gmod_jax.config import ModelConfig
from gmod_jax.layers.dtypes import DTYPES
from gmod_jax.layers.attention import causal_attention, causal_mask, contract, project
from gmod_jax.layers.mlp import swiglu
from gmod_jax.layers.norms import rms_norm
from gmod_jax.layers.rope import apply_rope, inv_freq_and_scale, rope_cos_sin
from gmod_jax.sharding import constrain_batch



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

        if self.has_variable("params", "layers") and isinstance(self.get_variable("params", "layers"), tuple):
            # Inference params with the stack split per layer (`unstack_layers`); Flax's shape
            # check only knows the stacked form.
            self.layers = self.get_variable("params", "layers")
        else:
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


def threshold_capacity(config: ModelConfig, seq_len: int) -> int:
    """Static slots of the threshold rule: ceil(threshold_max_capacity · T), at least 1."""
    return min(seq_len, max(1, math.ceil(config.mod.threshold_max_capacity * seq_len)))


def routing_capacity(config: ModelConfig, token_types_np, mode: str) -> int | None:
    """Static kept slots per MoD layer for a concrete batch, computed on the host (None: no
    routing in this mode). The capacity rule keeps exactly what the batch's token types need
    (`routing.static_keep_capacity`); the threshold rule its static bound."""
    if not config.mod.enabled or mode == "dense":
        return None
    seq_len = np.shape(token_types_np)[-1]
    if mode == "inference" and config.mod.inference_routing == "threshold":
        return threshold_capacity(config, seq_len)
    return routing.static_keep_capacity(token_types_np, config.mod.routable_types, config.mod.routing_ratio)


def select_tokens(config: ModelConfig, probs, attention_mask, token_types, plan: RoutingPlan):
    """Static-shape token selection for one MoD layer according to the plan."""
    mod, t = config.mod, probs.shape[1]
    if plan.mode == "inference" and mod.inference_routing == "threshold":
        capacity = plan.capacity or threshold_capacity(config, t)
        return routing.select_threshold(probs, attention_mask, mod.prefill_threshold, min(capacity, t))
    capacity = plan.capacity or t
    return routing.select_topk(probs, token_types, mod.routable_types, mod.routing_ratio, min(capacity, t))


@dataclasses.dataclass(frozen=True)
class Collect:
    """What a decoder walk returns per layer besides the hidden states (static).

    kv: each layer's keys (after RoPE) and values, for the KV caches of generation; MoD layers
        add their slot validity and kept counts per row.
    routing: per MoD layer, which tokens it processed ([B, T], padding never) and their
        keep-probabilities (visualize, skip statistics).
    attn_summary: applied to every layer's post-softmax attention [B, H, T, T] (ARank); the
        maps are only materialised when this is set.
    """

    kv: bool = False
    routing: bool = False
    attn_summary: Callable | None = None


def threshold_buckets(config: ModelConfig, plan: RoutingPlan, seq_len: int) -> tuple[int, ...]:
    """Static capacities a MoD layer may run at under the official threshold rule, or () when
    the plan does not route by threshold.

    The layer counts the tokens that pass (the most over the batch's rows) and runs the smallest
    capacity that holds them, so the kept set is the unbounded rule's and the compute follows
    the realised skip ratio with static shapes: `mod.threshold_buckets` equal steps of T (eighths
    by default), capped by the plan's capacity (`threshold_max_capacity`, which then keeps the
    highest keep-probs when more tokens pass). One bucket is a single static capacity."""
    if plan.mode != "inference" or config.mod.inference_routing != "threshold":
        return ()
    top = min(plan.capacity or threshold_capacity(config, seq_len), seq_len)
    n = config.mod.threshold_buckets
    return tuple(sorted({min(top, max(1, math.ceil(seq_len * j / n))) for j in range(1, n + 1)}))


def _run_kept(config: ModelConfig, p, x, probs, sel, positions, attention_mask, token_types, rope,
              collect: Collect, slots: int):
    """The MoD layer's block on the selected tokens: (new x, outputs that depend on the
    selection). Per-slot outputs are padded to `slots` so every capacity gives the same shapes."""
    mod = config.mod
    impl = mod.implementation
    real = sel.valid & routing.gather_mask(attention_mask, sel)  # kept slots that are not padding
    if mod.compact_positions:
        pos_kept = routing.compact_positions(sel, attention_mask)
    else:
        pos_kept = routing.gathered_positions(positions, sel)
    cos, sin = rope(pos_kept)
    y_kept, attn_probs, (k, v) = decoder_layer_with_kv(
        config, p, routing.gather_tokens(x, sel, impl), cos, sin, routing.kept_attention_mask(sel, real),
        mlp_scale=routing.gather_mask(probs, sel), return_probs=collect.attn_summary is not None)
    x_new = routing.scatter_tokens(x, y_kept, sel, impl)
    valid = attention_mask.astype(bool)
    of_type = jnp.stack([valid & (token_types == t) for t in mod.routable_types])  # [R, B, T]
    out = {"kept": jnp.sum(sel.selected & valid, dtype=jnp.int32),
           "tokens": jnp.sum(valid, dtype=jnp.int32),
           "kept_by_type": jnp.sum(of_type & sel.selected, axis=(1, 2), dtype=jnp.int32),
           "tokens_by_type": jnp.sum(of_type, axis=(1, 2), dtype=jnp.int32)}
    if collect.kv:
        pad = slots - sel.capacity
        kept_per_row = jnp.sum(real, axis=-1, dtype=jnp.int32)
        out.update(k=_pad_axis1(k, pad), v=_pad_axis1(v, pad), valid=_pad_axis1(real, pad), length=sel.num_kept,
                   next_pos=kept_per_row, kept_per_row=kept_per_row,
                   tokens_per_row=jnp.sum(valid, axis=-1, dtype=jnp.int32))
    if collect.routing:
        out["selected"] = sel.selected & valid
    if collect.attn_summary is not None:
        out["attn_summary"] = collect.attn_summary(attn_probs)
    return x_new, out


def _pad_axis1(a, pad: int):
    return a if pad == 0 else jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))


def mod_layer(config: ModelConfig, p, router_kernel, x, positions, attention_mask, token_types,
              plan: RoutingPlan, rope, collect: Collect = Collect()):
    """γ-MoD layer: route, run attention+MLP on kept tokens only, scatter back.

    Returns (new x, outputs): `loss` (this layer's router loss; zero outside training), `kept` and
    `tokens` (kept and entering non-pad tokens), `kept_by_type` / `tokens_by_type` (the same per
    routable token type, in `mod.routable_types` order), plus what `collect` asks for.
    """
    mod = config.mod
    logits = router_logits(config, p, router_kernel, x)
    probs = routing.router_probs(logits)
    attention_mask = attention_mask.astype(bool)
    buckets = threshold_buckets(config, plan, probs.shape[1])
    # Attention maps have the capacity's shape, so an ARank-style summary runs at one capacity.
    if len(buckets) > 1 and collect.attn_summary is None:
        passes = jnp.sum((probs > mod.prefill_threshold) & attention_mask, axis=-1)
        need = jnp.max(passes)
        index = jnp.minimum(jnp.searchsorted(jnp.asarray(buckets), need), len(buckets) - 1)

        def at_capacity(capacity):
            def run(_):
                sel = routing.select_threshold(probs, attention_mask, mod.prefill_threshold, capacity)
                return _run_kept(config, p, x, probs, sel, positions, attention_mask, token_types, rope, collect,
                                 buckets[-1])
            return run

        x_new, out = jax.lax.switch(index, [at_capacity(c) for c in buckets], None)
        sel_selected = None
    else:
        sel = select_tokens(config, probs, attention_mask, token_types, plan)
        x_new, out = _run_kept(config, p, x, probs, sel, positions, attention_mask, token_types, rope, collect,
                               sel.capacity)
        sel_selected = sel.selected
    if plan.mode == "train":
        out["loss"] = routing.router_loss(logits, sel_selected, attention_mask, mod.loss_token_reduction)
    else:
        out["loss"] = jnp.zeros((), jnp.float32)
    if collect.routing:
        out["keep_prob"] = probs
    return x_new, out


def dense_layer(config: ModelConfig, p, x, cos, sin, mask, collect: Collect = Collect()):
    """A dense decoder layer with the outputs `collect` asks for: (new x, outputs)."""
    x, attn_probs, (k, v) = decoder_layer_with_kv(config, p, x, cos, sin, mask,
                                                  return_probs=collect.attn_summary is not None)
    out = {}
    if collect.kv:
        out.update(k=k, v=v)
    if collect.attn_summary is not None:
        out["attn_summary"] = collect.attn_summary(attn_probs)
    return x, out


def rope_builder(config: ModelConfig, dense_positions):
    """pos -> (cos, sin). Frequencies come from the dense positions (dynamic / longrope scaling
    depends on the sequence length), also when MoD layers apply them to compacted positions."""
    t = config.text
    inv, scale = inv_freq_and_scale(dense_positions, theta=t.rope_theta, dim=t.head_dim,
                                    scaling=t.rope_scaling_dict, max_pos=t.max_position_embeddings)
    return lambda pos: rope_cos_sin(pos, inv, scale)


def unstack_layers(layers) -> tuple:
    """The stacked layer tree as a tuple of per-layer trees (separate buffers): the form
    `decoder_walk` and the decode step unroll instead of scanning.

    XLA CPU copies a layer's weights out of the stack before each matmul, whether the scan
    slices the stack or indexes it (dots need their operands as separate buffers). When a token's
    matmuls are small (batch-1 decode: a matrix-vector product per weight) that copy costs more
    than the matmul: 12 stacked SwiGLU MLPs of d=1024 took 63-83 ms per token scanned and 20 ms
    as separate arrays (docs/benchmarks.md). MaxText serves with unscanned layers for the same
    reason. Costs one more copy of the decoder weights while both forms are kept.
    """
    if isinstance(layers, tuple):
        return layers
    n = jax.tree.leaves(layers)[0].shape[0]
    return tuple(jax.tree.map(lambda a: a[i], layers) for i in range(n))


def group_layer_params(layers, start: int, stop: int, routers):
    """Per-step inputs of an unrolled group over unstacked `layers`: [(layer params, router)]."""
    return [(layers[i], None if routers is None else routers[i - start]) for i in range(start, stop)]


def layer_group(layers, start: int, stop: int, by_index: bool):
    """(xs, fetch) to scan layers start..stop-1 of the stacked `layers`: `fetch(x)` turns one
    step's scan input into that layer's params.

    A static slice of the stack is a copy in XLA (no views): slicing every group out of the stack
    copied all weights at every call (for a many-group γ-MoD model, the whole stack per forward
    and per decode step), while the dense model's one full-range group copied nothing. With
    `by_index` the scan runs over layer indices and each step reads its layer from the full
    stack: no group copy, though XLA CPU still copies each step's layer for its dots (what
    `unstack_layers` removes for inference). Differentiated code keeps the slice
    (by_index=False): reading a closed-over stack by index makes the backward pass add a
    full-size, zero-padded gradient of the whole stack at every layer.
    """
    if by_index:
        return jnp.arange(start, stop), lambda i: jax.tree.map(lambda a: a[i], layers)
    return jax.tree.map(lambda a: a[start:stop], layers), lambda p: p


def group_routers(config: ModelConfig, router, start: int, stop: int):
    """Per-layer router kernels [n, D, 2] for the MoD layers start..stop-1, or None when one
    router is shared (the scan then closes over it)."""
    if config.mod.shared_router:
        return None
    first = config.mod.layers.index(start)
    return router[first:first + (stop - start)]


@dataclasses.dataclass
class DecoderTrace:
    """Per-layer outputs of a decoder walk, stacked on a leading layer axis: `dense` over the
    dense layers, `mod` over the MoD layers (model order), `all` over every layer for the
    outputs both kinds produce (`attn_summary`)."""

    dense: dict
    mod: dict
    all: dict


def decoder_walk(config: ModelConfig, layers, router, x, attention_mask, token_types, plan: RoutingPlan,
                 collect: Collect = Collect(), *, by_index: bool, remat: str = "none", scan: bool = True):
    """The one walk over the decoder's layer groups, shared by the model forward (training and
    inference), generation's prefill and the routing traces (visualize, ARank).

    Consecutive identical layers (dense or MoD) form a group that is `lax.scan`ned (`scan=False`
    unrolls it, same results), optionally rematerialised. `plan.mode == "dense"` runs MoD
    layers as dense ones. Returns (hidden [B, T, D], DecoderTrace).
    """
    b, T, _ = x.shape
    attention_mask = attention_mask.astype(bool)
    positions = position_ids(attention_mask)
    rope = rope_builder(config, positions)
    cos, sin = rope(positions)
    dense_mask = causal_mask(attention_mask)
    mod_layers = config.mod_layers if plan.mode != "dense" else ()

    unstacked = isinstance(layers, tuple)  # see `unstack_layers`
    outputs = []  # (is_mod, stacked outputs of the group)
    for start, stop, is_mod in layer_groups(config.text.num_layers, mod_layers):
        routers = group_routers(config, router, start, stop) if is_mod else None
        if unstacked:
            group_xs, fetch = group_layer_params(layers, start, stop, routers), (lambda p: p)
        else:
            group_xs, fetch = layer_group(layers, start, stop, by_index=by_index)
            group_xs = (group_xs, routers)

        def step(h, xs, fetch=fetch, is_mod=is_mod):
            p, r = xs
            h = constrain_batch(h)
            if not is_mod:
                return dense_layer(config, fetch(p), h, cos, sin, dense_mask, collect)
            return mod_layer(config, fetch(p), router if r is None else r, h, positions, attention_mask,
                             token_types, plan, rope, collect)

        x, ys = scan_group(_remat(step, remat), x, group_xs, scan)
        outputs.append((is_mod, ys))

    def stack(parts):
        parts = [p for p in parts if p]
        return jax.tree.map(lambda *a: jnp.concatenate(a), *parts) if parts else {}

    # Only the attention summaries stack over every layer: a MoD layer's per-slot outputs (KV at
    # its capacity) do not share the dense layers' shapes.
    return x, DecoderTrace(dense=stack([ys for is_mod, ys in outputs if not is_mod]),
                           mod=stack([ys for is_mod, ys in outputs if is_mod]),
                           all=stack([{k: v for k, v in ys.items() if k == "attn_summary"} for _, ys in outputs]))


def decoder_forward(config: ModelConfig, layers, router, embeds, attention_mask, token_types,
                    plan: RoutingPlan, attn_probs_fn=None):
    """The model's decoder pass: hidden states and the aux dict of `LlamaDecoder.__call__`."""
    b, T, _ = embeds.shape
    attention_mask = jnp.ones((b, T), bool) if attention_mask is None else attention_mask
    x, trace = decoder_walk(config, layers, router, embeds, attention_mask, token_types, plan,
                            Collect(attn_summary=attn_probs_fn), by_index=plan.mode != "train",
                            remat=config.remat, scan=config.scan_layers)
    aux = {}
    if trace.mod:
        reduce = jnp.sum if config.mod.loss_layer_reduction == "sum" else jnp.mean
        aux["router_loss"] = config.mod.router_aux_loss_coef * reduce(trace.mod["loss"])
        aux.update({f"mod_{name}": trace.mod[name] for name in ("kept", "tokens", "kept_by_type", "tokens_by_type")})
    else:
        aux["router_loss"] = jnp.zeros((), jnp.float32)
    if attn_probs_fn is not None:
        aux["attn_summary"] = trace.all["attn_summary"]
    return x, aux


def scan_group(step, carry, xs, use_scan: bool = True):
    """lax.scan over the leading axis of `xs`, or an unrolled Python loop (same results): always
    for a list of per-step inputs (unstacked layers), else when `use_scan` is off (debugging).
    Step outputs are stacked on a leading axis either way."""
    if isinstance(xs, list):
        steps = xs
    elif use_scan:
        return jax.lax.scan(step, carry, xs)
    else:
        steps = [jax.tree.map(lambda a: a[i], xs) for i in range(jax.tree.leaves(xs)[0].shape[0])]
    outs = []
    for x in steps:
        carry, y = step(carry, x)
        outs.append(y)
    return carry, jax.tree.map(lambda *a: jnp.stack(a), *outs) if outs and outs[0] is not None else None
