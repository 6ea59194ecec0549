"""Cache-free generation reference: recompute the whole sequence for every new token.

This is the rule the KV-cache decoder (`gmod_jax.inference.generate`) must reproduce, written as
a masked-dense forward with none of the cache machinery (no gather/scatter, no slots), one prompt
at a time (batch 1, like the official eval code):

* dense layers: causal attention over every token, positions 0..n-1;
* MoD layer ℓ, with r_t its keep-probability for token t (own RMSNorm, shared router):
  - prompt token t is kept iff the config's prefill rule keeps it, evaluated over the prompt
    alone (official: r_t > prefill_threshold; or the capacity rule / a capacity cap);
  - generated token t is kept iff r_t >= decode_threshold (the official decode skip is r < 0.5);
  - kept tokens attend causally to kept tokens only, at compacted positions (their rank among
    kept tokens) unless `compact_positions` is off; the MLP output is scaled by r_t; skipped
    tokens pass through unchanged.

Because every rule looks only at a token and its causal prefix, recomputing from scratch gives
each token exactly the routing it got when it was decoded, so greedy tokens (and, with the same
PRNG schedule, sampled tokens) must match the cached decoder.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from gmod_jax import routing
from gmod_jax import token_types as tt
from gmod_jax.config import ModelConfig
from gmod_jax.inference.generate import (MODES, eos_id_array, prepare_images, active_mod_layers, expand_prompt,
                                         sample_tokens)
from gmod_jax.layers.attention import causal_mask
from gmod_jax.models.llama import decoder_layer, rope_builder, router_logits
from gmod_jax.models.llava import LlavaModel


# Jitted once per shape; called eagerly, `sample_tokens`' lax.cond would retrace every step.
_sample = jax.jit(sample_tokens)


@dataclasses.dataclass
class ReferenceOutput:
    tokens: list[np.ndarray]  # per prompt, EOS included
    prefill_kept: np.ndarray  # int [n_mod, B] prompt tokens kept per active MoD layer
    decode_kept: np.ndarray  # int [n_mod, B] fed generated tokens that ran the layer


def _prompt_keep(config: ModelConfig, probs, in_prompt, types, capacity):
    """bool [1, N]: prompt tokens the prefill rule keeps (it sees the prompt only)."""
    mod = config.mod
    n = probs.shape[-1]
    if mod.inference_routing == "threshold":
        if capacity is None:
            return (probs > mod.prefill_threshold) & in_prompt
        return routing.select_threshold(probs, in_prompt, mod.prefill_threshold, min(capacity, n)).selected
    # Positions past the prompt are PAD, which the capacity rule forces in without touching how
    # many routable prompt tokens it skips; they are masked out afterwards.
    sel = routing.select_topk(probs, jnp.where(in_prompt, types, tt.PAD), mod.routable_types, mod.routing_ratio, n)
    return sel.selected & in_prompt


@functools.partial(jax.jit, static_argnames=("config", "mode", "capacity"))
def _forward(params, ids, pixel_values, types, prompt_len, length, *, config: ModelConfig, mode: str, capacity):
    """Logits of token `length-1` [V] and keep masks [n_mod, N] of a [1, N] buffer whose first
    `length` tokens are real (the first `prompt_len` of them the prompt)."""
    t = config.text
    module = LlavaModel(config)
    n = ids.shape[-1]
    pos = jnp.arange(n)[None]
    valid = pos < length
    in_prompt = pos < prompt_len
    # The prompt goes through LLaVA's embedding (image features merged), generated ids through
    # the plain table: a generated id equal to the image token is a word.
    prompt_embeds = module.apply({"params": params}, jnp.where(in_prompt, ids, 0), pixel_values, method=LlavaModel.embed)
    token_embeds = module.apply({"params": params}, jnp.where(in_prompt, 0, ids),
                                method=lambda m, i: m.llm.embed_tokens(i))
    x = jnp.where(in_prompt[..., None], prompt_embeds, token_embeds)

    positions = jnp.where(valid, pos, 0)
    rope = rope_builder(config, jnp.where(valid, pos, -1))
    cos, sin = rope(positions)
    dense_mask = causal_mask(valid)
    llm = params["llm"]
    mods = active_mod_layers(config, mode)
    keeps = []
    for layer in range(t.num_layers):
        p = jax.tree.map(lambda a: a[layer], llm["layers"])
        if layer not in mods:
            x, _ = decoder_layer(config, p, x, cos, sin, dense_mask)
            continue
        router = llm["mod_router"]["kernel"]
        if not config.mod.shared_router:
            router = router[config.mod.layers.index(layer)]
        probs = routing.router_probs(router_logits(config, p, router, x))
        generated_keep = (probs >= config.mod.decode_threshold) & valid & ~in_prompt
        keep = _prompt_keep(config, probs, in_prompt, types, capacity) | generated_keep
        if config.mod.compact_positions:
            layer_pos = jnp.maximum(jnp.cumsum(keep, axis=-1) - 1, 0)
        else:
            layer_pos = positions
        c, s = rope(layer_pos)
        mask = jnp.tril(jnp.ones((n, n), bool))[None] & keep[:, None, :] & keep[:, :, None]
        mask = mask | jnp.eye(n, dtype=bool)[None]  # skipped queries: finite garbage, discarded
        y, _ = decoder_layer(config, p, x, c, s, mask[:, None], mlp_scale=probs)
        x = jnp.where(keep[..., None], y, x)
        keeps.append(keep[0])
    logits = module.apply({"params": params}, x, method=lambda m, h: m.llm.logits(h))
    last = jnp.take(logits[0], length - 1, axis=0)
    return last, (jnp.stack(keeps) if keeps else jnp.zeros((0, n), bool))


def reference_generate(model, input_ids_list, pixel_values=None, *, max_new_tokens: int, temperature: float = 0.0,
                       top_p: float = 1.0, seed: int = 0, eos_token_id=None, token_types_list=None,
                       mode: str = "inference", prefill_capacity: int | None = None) -> ReferenceOutput:
    """Generate each prompt on its own by full recomputation (see the module docstring).

    Arguments mirror `generate_ids`. `prefill_capacity` caps the threshold rule's kept prompt
    tokens like the cached prefill's static capacity does (`GenerationOutput.spec.mod_capacity`
    when `threshold_max_capacity < 1`); None means unbounded (the official rule).
    """
    config: ModelConfig = model.config
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}")
    rows = [expand_prompt(config, ids, None if token_types_list is None else token_types_list[i])
            for i, ids in enumerate(input_ids_list)]
    images = prepare_images(config, pixel_values, [ids for ids, _ in rows])
    eos = set(int(i) for i in eos_id_array(eos_token_id) if i >= 0)
    key = jax.random.PRNGKey(seed)
    capacity = prefill_capacity if config.mod.inference_routing == "threshold" else None
    all_tokens, prefill_kept, decode_kept = [], [], []
    for row, (prompt, types) in enumerate(rows):
        p = prompt.size
        n = -(-(p + max_new_tokens) // 16) * 16  # a few buffer sizes, so a few compilations
        ids = np.zeros((1, n), np.int32)
        ids[0, :p] = prompt
        inferred = tt.infer_token_types(prompt[None], config.image_token_index)[0]
        buf_types = np.full((1, n), tt.PAD, np.int32)
        buf_types[0, :p] = inferred if types is None else types
        px = None if images is None else images[row:row + 1]
        out = []
        keeps = None
        for step in range(max_new_tokens):
            logits, keeps = _forward(model.params, ids, px, buf_types, np.int32(p), np.int32(p + step),
                                     config=config, mode=mode, capacity=capacity)
            tok = int(_sample(logits[None], key, step, np.float32(temperature), np.float32(top_p),
                                    jnp.asarray([row], jnp.int32))[0])
            out.append(tok)
            if tok in eos:
                break
            ids[0, p + step] = tok
        # The last call saw every token the cached decoder feeds (all but the last generated one).
        keeps = np.asarray(keeps)
        fed = p + len(out) - 1
        prefill_kept.append(keeps[:, :p].sum(-1))
        decode_kept.append(keeps[:, p:fed].sum(-1))
        all_tokens.append(np.asarray(out, np.int32))
    return ReferenceOutput(tokens=all_tokens, prefill_kept=np.stack(prefill_kept, -1).astype(np.int64),
                           decode_kept=np.stack(decode_kept, -1).astype(np.int64))
