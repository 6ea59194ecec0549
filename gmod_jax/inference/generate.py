"""Jitted prefill + decode loop with MoD-aware KV caches, and the batched generation APIs.

Decode semantics (the official γ-MoD eval model, generalised to batches; see
the test suite's cache-free reference, `tests/support/reference.py`, for the same rule):

* Prefill runs the whole (left-padded) prompt once. Dense layers cache every token. Each MoD layer
  selects tokens with the config's inference rule (official: keep iff keep-prob > 0.005, realised
  with a static capacity `ceil(threshold_max_capacity · T)` and a validity mask; or the training
  capacity rule), runs attention + MLP on them with compacted RoPE positions, and caches only them.
* Each decode token enters every layer. A dense layer attends to all cached tokens at the
  token's absolute position. A MoD layer first computes the token's keep-prob r; if r < 0.5
  (`decode_threshold`) the token skips the layer (hidden state unchanged, nothing cached);
  otherwise it attends to that layer's cached tokens at position = the layer's kept count
  (compacted numbering continues), its MLP output is scaled by r, and its K/V are appended.
  Rows decide independently (masked writes); with batch 1 `lax.cond` skips the compute.

Compilation: prefill is compiled once per (batch, prompt bucket, new-token bucket, MoD capacity,
image or not); the decode loop is one `lax.while_loop` compiled once per the same static shapes,
with the token budget, EOS ids, temperature, top-p and PRNG key all traced.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gmod_jax import routing
from gmod_jax import token_types as tt
from gmod_jax.config import ModelConfig
from gmod_jax.inference.kv_cache import KVCache, decode_layer, pad_slots, split_layers, stack_layers
from gmod_jax.layers.dtypes import DTYPES
from gmod_jax.models.llama import (Collect, RoutingPlan, decoder_walk, group_layer_params, group_routers, layer_group,
                                   layer_groups, rope_builder, router_logits, routing_capacity, scan_group)
from gmod_jax.models.llava import LlavaModel

MODES = ("inference", "dense")
MAX_EOS_IDS = 8  # EOS ids are a padded traced array, so changing them never recompiles
IMAGE_PLACEHOLDER = -200  # LLaVA's one-token image stand-in (`gmod_jax.data.tokenizer`)


# ----------------------------------------------------------------------------------------------
# Buckets and static shapes


def bucket_length(n: int, buckets: Sequence[int] | None = None, minimum: int = 16) -> int:
    """Smallest bucket >= n. Default grid: powers of two and 1.5x powers of two (<= 33% padding,
    about two compilations per octave of prompt length)."""
    if n < 1:
        raise ValueError(f"length must be positive, got {n}")
    if buckets:
        fits = [b for b in sorted(buckets) if b >= n]
        if not fits:
            raise ValueError(f"length {n} exceeds the largest bucket {max(buckets)}")
        return int(fits[0])
    size = minimum
    while size < n:
        if size * 3 // 2 >= n and size >= 2 * minimum:
            return size * 3 // 2
        size *= 2
    return size


@dataclasses.dataclass(frozen=True)
class CacheSpec:
    """Static shapes of one compiled prefill/decode pair."""

    batch: int
    prompt_len: int  # T: left-padded prompt bucket
    new_slots: int  # N: decode budget bucket (cache room for generated tokens)
    mod_capacity: int  # K: prefill slots per MoD layer (0 without active MoD layers)
    mode: str = "inference"  # "inference" (MoD routing) or "dense" (MoD layers run dense)

    @property
    def dense_slots(self) -> int:
        return self.prompt_len + self.new_slots

    @property
    def mod_slots(self) -> int:
        return self.mod_capacity + self.new_slots


def active_mod_layers(config: ModelConfig, mode: str) -> tuple[int, ...]:
    if mode not in MODES:
        raise ValueError(f"generation mode must be one of {MODES}, got {mode!r}")
    return config.mod_layers if mode == "inference" else ()


def mod_prefill_capacity(config: ModelConfig, token_types: np.ndarray, mode: str) -> int:
    """Static kept slots per MoD layer for a padded batch (host side; 0 without MoD layers)."""
    if not active_mod_layers(config, mode):
        return 0
    need = routing_capacity(config, token_types, mode)
    if config.mod.inference_routing == "threshold":
        return need
    # Rounded up to 1/16 of the bucket so a bucket compiles at most 16 capacities; extra slots
    # only become invalid slots, the selection itself does not change.
    t = token_types.shape[-1]
    step = max(1, t // 16)
    return min(t, -(-need // step) * step)


# ----------------------------------------------------------------------------------------------
# Model pieces over the params pytree (the same tree `LlavaModel` uses; nothing is converted)


def _embed_prompt(config, params, ids, pixel_values):
    return LlavaModel(config).apply({"params": params}, ids, pixel_values, method=LlavaModel.embed)


def _embed_tokens(config, params, ids):
    # Generated ids go straight through the embedding table, like HF generate's decode steps: a
    # generated id equal to the image placeholder is a word, not an image slot.
    return LlavaModel(config).apply({"params": params}, ids, method=lambda m, i: m.llm.embed_tokens(i))


def _final_logits(config, params, hidden):
    return LlavaModel(config).apply({"params": params}, hidden, method=lambda m, h: m.llm.logits(h))


def _kv_shape(config: ModelConfig, batch: int, slots: int):
    return (batch, config.text.num_kv_heads, slots, config.text.head_dim)


def _heads_major(kv):
    """Walk outputs [L, B, T, KV, hd] -> the cache layout [L, B, KV, T, hd] (see `KVCache`)."""
    return jnp.swapaxes(kv, 2, 3)


# ----------------------------------------------------------------------------------------------
# Prefill


def _prefill(params, input_ids, pixel_values, attention_mask, token_types, *, config: ModelConfig, spec: CacheSpec):
    """Returns (last-position logits [B,V], KVCache, prefill stats)."""
    llm = params["llm"]
    router = llm["mod_router"]["kernel"] if config.mod.enabled else None
    dtype = DTYPES[config.dtype]
    b, t = input_ids.shape
    mask = attention_mask.astype(bool)
    plan = RoutingPlan(mode="inference" if spec.mode == "inference" else "dense", capacity=spec.mod_capacity or None)

    x = _embed_prompt(config, params, input_ids, pixel_values)
    x, trace = decoder_walk(config, llm["layers"], router, x, mask, token_types, plan, Collect(kv=True),
                            by_index=True)
    logits = _final_logits(config, params, x[:, -1:])[:, 0]

    kv_dense = _kv_shape(config, b, t)
    dense_k = _heads_major(trace.dense["k"]) if trace.dense else jnp.zeros((0, *kv_dense), dtype)
    dense_v = _heads_major(trace.dense["v"]) if trace.dense else jnp.zeros((0, *kv_dense), dtype)
    if trace.mod:
        m = {**trace.mod, "k": _heads_major(trace.mod["k"]), "v": _heads_major(trace.mod["v"])}
    else:
        kv_mod = _kv_shape(config, b, 0)
        m = dict(k=jnp.zeros((0, *kv_mod), dtype), v=jnp.zeros((0, *kv_mod), dtype),
                 valid=jnp.zeros((0, b, 0), bool), length=jnp.zeros((0, b), jnp.int32),
                 next_pos=jnp.zeros((0, b), jnp.int32), kept_per_row=jnp.zeros((0, b), jnp.int32),
                 tokens_per_row=jnp.zeros((0, b), jnp.int32))
    cache = KVCache(
        dense_k=pad_slots(dense_k, 3, spec.dense_slots), dense_v=pad_slots(dense_v, 3, spec.dense_slots),
        dense_valid=pad_slots(mask, 1, spec.dense_slots, False),
        mod_k=pad_slots(m["k"].astype(dtype), 3, spec.mod_slots),
        mod_v=pad_slots(m["v"].astype(dtype), 3, spec.mod_slots),
        mod_valid=pad_slots(m["valid"], 2, spec.mod_slots, False),
        mod_length=m["length"], mod_next_pos=m["next_pos"])
    return logits, cache, {"prefill_kept": m["kept_per_row"], "prefill_tokens": m["tokens_per_row"]}


# ----------------------------------------------------------------------------------------------
# Decode


def _decode_step(config: ModelConfig, spec: CacheSpec, params, cache: KVCache, token, dense_pos, slot):
    """Run one token per row through every layer. Returns (hidden [B,1,D], cache, ran [L_mod,B])."""
    llm = params["llm"]
    layers = llm["layers"]
    router = llm["mod_router"]["kernel"] if config.mod.enabled else None
    b = token.shape[0]
    pos = dense_pos[:, None]
    rope = rope_builder(config, pos)
    cos, sin = rope(pos)
    mods = active_mod_layers(config, spec.mode)
    threshold = config.mod.decode_threshold

    x = _embed_tokens(config, params, token[:, None])
    dk, dv = cache.dense_k, cache.dense_v
    mk, mv, mvalid, mlen, mpos = cache.mod_k, cache.mod_v, cache.mod_valid, cache.mod_length, cache.mod_next_pos
    # The layer scans only READ the caches (closed over, never carried) and return the new
    # token's keys/values; all of them are written after the last group, one update per cache.
    # Updating a carried cache inside a scan made XLA copy the whole stacked cache for every
    # layer and step; writing after each group interleaved writes with later groups' reads of
    # the same array. No layer reads this token's entry (its own key/value enter the attention
    # directly), so deferring the writes is exact.
    rows = jnp.arange(b)
    dense_kv, mod_out = [], []
    dense_i = mod_i = 0
    unstacked = isinstance(layers, tuple)  # `unstack_layers`: unrolled, each layer its own buffers
    for start, stop, is_mod in layer_groups(config.text.num_layers, mods):
        n = stop - start
        first = mod_i if is_mod else dense_i  # this group's first layer in the dense / MoD caches
        routers = group_routers(config, router, start, stop) if is_mod else None
        if unstacked:
            fetch = lambda p: p  # noqa: E731
            xs = [(p, first + j, r) for j, (p, r) in enumerate(group_layer_params(layers, start, stop, routers))]
        else:
            group, fetch = layer_group(layers, start, stop, by_index=True)
            xs = (group, jnp.arange(first, first + n), routers)
        if not is_mod:
            def dense_step(h, xs, fetch=fetch):
                i, l, _ = xs
                h, kv = decode_layer(config, fetch(i), h, cos, sin, dk[l], dv[l], cache.dense_valid)
                return h, kv

            x, kv = scan_group(dense_step, x, xs)
            dense_kv.append(kv)
            dense_i += n
            continue

        def mod_step(h, xs, fetch=fetch):
            i, l, r = xs
            p = fetch(i)
            kernel = router if r is None else r
            prob = routing.router_probs(router_logits(config, p, kernel, h))  # [B, 1]
            keep = prob[:, 0] >= threshold  # official: skip iff r < decode_threshold
            layer_pos = mpos[l][:, None] if config.mod.compact_positions else pos
            c, s = rope(layer_pos)

            def run(h):
                # The layer's weights are sliced from the stack here, inside the branch: sliced
                # outside, the slices were operands of the conditional, so XLA materialised a
                # copy of the whole layer's weights every step, also when the layer was skipped
                # (outside, only the router's input norm is read).
                y, (k, v) = decode_layer(config, fetch(i), h, c, s, mk[l], mv[l], mvalid[l], mlp_scale=prob)
                return jnp.where(keep[:, None, None], y, h), (k, v)

            def skip(h):
                zeros = jnp.zeros((b, 1, config.text.num_kv_heads, config.text.head_dim), mk[l].dtype)
                return h, (zeros, zeros)

            # A layer every row skips is skipped (at batch 1: the row's own decision); otherwise
            # rows that skip keep their input (masked). The caches and the weight stack enter
            # the conditional whole (read-only operands, not copied); only the hidden state and
            # the new key/value come out.
            h, (k, v) = jax.lax.cond(jnp.any(keep), run, skip, h)
            return h, (k[:, 0], v[:, 0], keep)

        x, out = scan_group(mod_step, x, xs)
        mod_out.append(out)
        mod_i += n

    dense_valid = cache.dense_valid.at[:, slot].set(True)
    if dense_kv:
        ks, vs = (jnp.concatenate(a) for a in zip(*dense_kv))  # [L_dense, B, 1, KV, hd]
        # Every row writes the same absolute slot T + step.
        ks, vs = _heads_major(ks), _heads_major(vs)  # [L_dense, B, KV, 1, hd]
        if isinstance(dk, tuple):  # per-layer buffers (`split_layers`)
            dk = tuple(jax.lax.dynamic_update_slice(c, ks[l].astype(c.dtype), (0, 0, slot, 0)) for l, c in enumerate(dk))
            dv = tuple(jax.lax.dynamic_update_slice(c, vs[l].astype(c.dtype), (0, 0, slot, 0)) for l, c in enumerate(dv))
        else:
            dk = jax.lax.dynamic_update_slice(dk, ks.astype(dk.dtype), (0, 0, 0, slot, 0))
            dv = jax.lax.dynamic_update_slice(dv, vs.astype(dv.dtype), (0, 0, 0, slot, 0))
    if mod_out:
        ks, vs, ran = (jnp.concatenate(a) for a in zip(*mod_out))  # [L_mod, B, KV, hd], ran [L_mod, B]
        # Each row appends at its own next slot of each layer. Writing there when the row skipped
        # is harmless: the slot stays invalid and the next token that runs the layer overwrites it.
        # (The advanced indices around the heads slice put their broadcast [L_mod, B] first.)
        layer_idx, slots = jnp.arange(ran.shape[0])[:, None], mlen
        if isinstance(mk, tuple):  # per-layer buffers (`split_layers`)
            mk = tuple(c.at[rows, :, slots[l]].set(ks[l].astype(c.dtype), unique_indices=True) for l, c in enumerate(mk))
            mv = tuple(c.at[rows, :, slots[l]].set(vs[l].astype(c.dtype), unique_indices=True) for l, c in enumerate(mv))
        else:
            mk = mk.at[layer_idx, rows[None], :, slots].set(ks.astype(mk.dtype), unique_indices=True)
            mv = mv.at[layer_idx, rows[None], :, slots].set(vs.astype(mv.dtype), unique_indices=True)
        mvalid = mvalid.at[layer_idx, rows[None], slots].set(ran, unique_indices=True)
        mlen, mpos = mlen + ran.astype(jnp.int32), mpos + ran.astype(jnp.int32)
    else:
        ran = jnp.zeros((0, b), bool)
    cache = KVCache(dense_k=dk, dense_v=dv, dense_valid=dense_valid,
                    mod_k=mk, mod_v=mv, mod_valid=mvalid, mod_length=mlen, mod_next_pos=mpos)
    return x, cache, ran


def sample_tokens(logits, key, step, temperature, top_p, row_ids):
    """Next token per row: greedy when temperature <= 0, else temperature + nucleus (top-p).

    Each row draws from its own key `fold_in(fold_in(key, step), row_id)`, so a row's samples do
    not depend on what else is in the batch (and the per-row reference can reproduce them).
    """
    logits = logits.astype(jnp.float32)

    def greedy(_):
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def sample(_):
        scaled = logits / jnp.maximum(temperature, 1e-6)
        ordered = -jnp.sort(-scaled, axis=-1)
        probs = jax.nn.softmax(ordered, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each token
        n_keep = jnp.sum(before < top_p, axis=-1)
        n_keep = jnp.where(top_p >= 1.0, ordered.shape[-1], jnp.maximum(n_keep, 1))
        cutoff = jnp.take_along_axis(ordered, (n_keep - 1)[:, None], axis=-1)
        filtered = jnp.where(scaled >= cutoff, scaled, -jnp.inf)
        step_key = jax.random.fold_in(key, step)
        keys = jax.vmap(lambda r: jax.random.fold_in(step_key, r))(row_ids)
        return jax.vmap(jax.random.categorical)(keys, filtered).astype(jnp.int32)

    return jax.lax.cond(temperature > 0, sample, greedy, None)


def _decode(params, cache: KVCache, first_logits, prompt_lengths, max_new_tokens, eos_ids, pad_id, key,
            temperature, top_p, row_ids, *, config: ModelConfig, spec: CacheSpec):
    """Sample the first token from the prefill logits, then decode in one while_loop.

    Returns (tokens [B,N] (pad after each row's end), lengths [B] (EOS included), decode stats,
    final cache). Returning the cache lets the donated prefill cache be updated in place.
    Stops when every row hit EOS or `max_new_tokens` tokens exist; finished rows keep running
    (masked) until then but write pads and are not counted in the statistics.
    """
    b, n = spec.batch, spec.new_slots

    def is_eos(tok):
        return jnp.any(tok[:, None] == eos_ids[None, :], axis=-1)

    stacked_cache = cache
    if isinstance(params["llm"]["layers"], tuple):  # unrolled layers: each reads its own cache buffer
        cache = split_layers(cache)
    first = sample_tokens(first_logits, key, 0, temperature, top_p, row_ids)
    tokens = jnp.full((b, n), pad_id, jnp.int32).at[:, 0].set(first)
    n_mod = cache.mod_length.shape[0]
    state = dict(i=jnp.int32(1), last=first, tokens=tokens, done=is_eos(first), lengths=jnp.ones((b,), jnp.int32),
                 cache=cache, decode_kept=jnp.zeros((n_mod, b), jnp.int32),
                 decode_tokens=jnp.zeros((b,), jnp.int32), decode_layer_runs=jnp.zeros((n_mod,), jnp.int32))

    def cond(s):
        return (s["i"] < max_new_tokens) & ~jnp.all(s["done"])

    def body(s):
        i = s["i"]
        # The token fed now is generated token i-1: absolute position len_b + i - 1, slot T + i - 1.
        hidden, cache, ran = _decode_step(config, spec, params, s["cache"], s["last"],
                                          prompt_lengths + i - 1, spec.prompt_len + i - 1)
        logits = _final_logits(config, params, hidden)[:, 0]
        active = ~s["done"]
        nxt = jnp.where(active, sample_tokens(logits, key, i, temperature, top_p, row_ids), pad_id)
        return dict(i=i + 1, last=nxt, tokens=jax.lax.dynamic_update_slice(s["tokens"], nxt[:, None], (0, i)),
                    done=s["done"] | is_eos(nxt), lengths=s["lengths"] + active.astype(jnp.int32), cache=cache,
                    decode_kept=s["decode_kept"] + (ran & active[None]).astype(jnp.int32),
                    decode_tokens=s["decode_tokens"] + active.astype(jnp.int32),
                    decode_layer_runs=s["decode_layer_runs"] + jnp.any(ran, axis=1).astype(jnp.int32))

    s = jax.lax.while_loop(cond, body, state)
    # decode_layer_runs: decode steps in which each MoD layer was computed (some row kept it).
    stats = {"decode_kept": s["decode_kept"], "decode_tokens": s["decode_tokens"],
             "decode_layer_runs": s["decode_layer_runs"]}
    return s["tokens"], s["lengths"], stats, stack_layers(s["cache"], stacked_cache)


prefill_jit = jax.jit(_prefill, static_argnames=("config", "spec"))
decode_jit = jax.jit(_decode, static_argnames=("config", "spec"), donate_argnames=("cache",))


# ----------------------------------------------------------------------------------------------
# Host API


@dataclasses.dataclass
class GenerationOutput:
    """Generated ids and MoD routing statistics of one `generate_ids` call.

    `sequences` [B, max_new_tokens] holds each row's tokens (EOS included) followed by padding;
    `lengths` [B] counts them. Statistics are per active MoD layer (`mod_layers`) and per row:
    `prefill_kept` / `prefill_tokens` (kept vs entering non-pad prompt tokens), `decode_kept`
    (decode tokens that ran the layer) and `decode_tokens` [B] (tokens fed to the decoder after
    prefill: lengths - 1, the last generated token is never fed). `timings` are wall-clock
    seconds and include compilation on the first call of a shape bucket.
    """

    sequences: np.ndarray
    lengths: np.ndarray
    stats: dict[str, np.ndarray]
    mod_layers: tuple[int, ...]
    spec: CacheSpec
    timings: dict[str, float]
    texts: list[str] | None = None

    @property
    def tokens(self) -> list[np.ndarray]:
        return [row[:n] for row, n in zip(self.sequences, self.lengths)]

    def _ratio(self, kept, entering):
        kept, entering = np.asarray(kept, np.float64), np.asarray(entering, np.float64)
        per_layer = 1.0 - kept.sum(-1) / np.maximum(entering.sum(-1), 1.0)
        total = 1.0 - kept.sum() / max(entering.sum(), 1.0) if kept.size else 0.0
        return per_layer, float(total)

    @property
    def prefill_skip_ratio_per_layer(self) -> np.ndarray:
        return self._ratio(self.stats["prefill_kept"], self.stats["prefill_tokens"])[0]

    @property
    def prefill_skip_ratio(self) -> float:
        return self._ratio(self.stats["prefill_kept"], self.stats["prefill_tokens"])[1]

    @property
    def decode_skip_ratio_per_layer(self) -> np.ndarray:
        entering = np.broadcast_to(self.stats["decode_tokens"], self.stats["decode_kept"].shape)
        return self._ratio(self.stats["decode_kept"], entering)[0]

    @property
    def decode_skip_ratio(self) -> float:
        entering = np.broadcast_to(self.stats["decode_tokens"], self.stats["decode_kept"].shape)
        return self._ratio(self.stats["decode_kept"], entering)[1]

    def summary(self) -> dict[str, Any]:
        return {
            "mod_layers": list(self.mod_layers),
            "prefill_skip_ratio": self.prefill_skip_ratio,
            "decode_skip_ratio": self.decode_skip_ratio,
            "prefill_skip_ratio_per_layer": [float(v) for v in self.prefill_skip_ratio_per_layer],
            "decode_skip_ratio_per_layer": [float(v) for v in self.decode_skip_ratio_per_layer],
            "generated_tokens": [int(n) for n in self.lengths],
            **{k: float(v) for k, v in self.timings.items()},
        }


def expand_prompt(config: ModelConfig, ids, types=None):
    """1-D prompt ids with LLaVA's -200 placeholder expanded to the model's image token run."""
    ids = np.asarray(ids, np.int64).reshape(-1)
    types = None if types is None else np.asarray(types, np.int32).reshape(-1)
    if types is not None and types.shape != ids.shape:
        raise ValueError(f"token types shape {types.shape} != prompt shape {ids.shape}")
    is_placeholder = ids == IMAGE_PLACEHOLDER
    if is_placeholder.any():
        repeats = np.where(is_placeholder, config.image_seq_length, 1)
        ids = np.repeat(np.where(is_placeholder, config.image_token_index, ids), repeats)
        types = None if types is None else np.repeat(types, repeats)
    keep = config.truncate_spliced(ids.size)  # Mini-Gemini's post-splice cut (tokenizer_model_max_length)
    if keep < ids.size:
        if np.any(ids[keep:] == config.image_token_index):
            raise ValueError(f"prompt of {ids.size} tokens: the cut to tokenizer_model_max_length={keep} "
                             f"would split its image block")
        ids, types = ids[:keep], None if types is None else types[:keep]
    return ids.astype(np.int32), types


def prepare_images(config: ModelConfig, pixel_values, prompts: list[np.ndarray]):
    """[B,H,W,C] float32 with a blank image for rows that have none, or None for text-only batches."""
    shape = config.pixel_shape
    has_image = [bool(np.any(p == config.image_token_index)) for p in prompts]
    for row, (p, h) in enumerate(zip(prompts, has_image)):
        n = int(np.sum(p == config.image_token_index))
        if h and n != config.image_seq_length:
            raise ValueError(f"prompt {row} has {n} image tokens; one image is {config.image_seq_length} tokens")
    if pixel_values is None:
        if any(has_image):
            raise ValueError("prompts contain image tokens but no pixel_values were given")
        return None
    if isinstance(pixel_values, (list, tuple)):
        if len(pixel_values) != len(prompts):
            raise ValueError(f"{len(pixel_values)} images for {len(prompts)} prompts")
        rows = [np.zeros(shape, np.float32) if px is None else np.asarray(px, np.float32) for px in pixel_values]
        for row, (px, h) in enumerate(zip(pixel_values, has_image)):
            if h and px is None:
                raise ValueError(f"prompt {row} has image tokens but its image is None")
        pixel_values = np.stack(rows)
    pixel_values = np.asarray(pixel_values, np.float32)
    if pixel_values.shape != (len(prompts), *shape):
        raise ValueError(f"pixel_values must be [{len(prompts)}, {shape[0]}, {shape[1]}, {shape[2]}] "
                         f"(one channels-last image per prompt), got {pixel_values.shape}")
    return pixel_values if any(has_image) else None


def eos_id_array(eos_token_id) -> np.ndarray:
    if eos_token_id is None:
        ids = []
    elif isinstance(eos_token_id, (int, np.integer)):
        ids = [int(eos_token_id)]
    else:
        ids = [int(i) for i in eos_token_id]
    if len(ids) > MAX_EOS_IDS:
        raise ValueError(f"at most {MAX_EOS_IDS} EOS ids, got {len(ids)}")
    return np.asarray(ids + [-1] * (MAX_EOS_IDS - len(ids)), np.int32)


def generate_ids(model, input_ids_list, pixel_values=None, *, max_new_tokens: int = 32, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0, eos_token_id=None, pad_token_id: int | None = None,
                 token_types_list=None, mode: str = "inference", prompt_buckets: Sequence[int] | None = None,
                 new_token_buckets: Sequence[int] | None = None, inference_layers: str = "auto") -> GenerationOutput:
    """Generate from token ids with the KV-cache decoder.

    input_ids_list: one 1-D id array per prompt, image as `image_seq_length` copies of
    `config.image_token_index` or as one LLaVA placeholder (-200). pixel_values: None, an array
    [B,H,W,C] (channels last, preprocessed) or a list with None for text-only rows.
    token_types_list: per-prompt token types (only the capacity routing rule reads them;
    inferred from the ids when absent). mode: "inference" (γ-MoD routing) or "dense" (every layer
    dense, the baseline the benchmarks compare against). Prompts are left-padded to a bucket.
    inference_layers: the layer weights' form for prefill and decode (`Model.inference_params`);
    results are the same either way (float rounding).
    """
    config: ModelConfig = model.config
    if not input_ids_list:
        raise ValueError("no prompts")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if token_types_list is not None and len(token_types_list) != len(input_ids_list):
        raise ValueError("token_types_list must have one entry per prompt")
    rows = [expand_prompt(config, ids, None if token_types_list is None else token_types_list[i])
            for i, ids in enumerate(input_ids_list)]
    prompts = [ids for ids, _ in rows]
    if any(p.size == 0 for p in prompts):
        raise ValueError("empty prompt")
    if any(np.any((p < 0) | ((p >= config.text.vocab_size) & (p != config.image_token_index))) for p in prompts):
        raise ValueError(f"prompt ids must lie in 0..{config.text.vocab_size - 1} (or be image tokens)")
    images = prepare_images(config, pixel_values, prompts)
    pad_id = pad_token_id if pad_token_id is not None else (config.pad_token_id or 0)

    b = len(prompts)
    lengths = np.asarray([p.size for p in prompts], np.int32)
    t = bucket_length(int(lengths.max()), prompt_buckets)
    n_new = bucket_length(max_new_tokens, new_token_buckets)
    ids = np.full((b, t), pad_id, np.int32)
    mask = np.zeros((b, t), bool)
    for row, p in enumerate(prompts):
        ids[row, t - p.size:] = p  # left padding: every row's last prompt token is at T-1
        mask[row, t - p.size:] = True
    inferred = tt.infer_token_types(ids, config.image_token_index, mask)
    types = inferred
    if token_types_list is not None:
        types = np.full((b, t), tt.PAD, np.int32)
        for row, (p, ty) in enumerate(rows):
            types[row, t - p.size:] = inferred[row, t - p.size:] if ty is None else ty
    spec = CacheSpec(batch=b, prompt_len=t, new_slots=n_new,
                     mod_capacity=mod_prefill_capacity(config, types, mode), mode=mode)

    params = model.inference_params(inference_layers)
    t0 = time.perf_counter()
    logits, cache, prefill_stats = prefill_jit(params, ids, images, mask, types, config=config, spec=spec)
    logits = jax.block_until_ready(logits)
    t1 = time.perf_counter()
    tokens, out_lengths, decode_stats, _ = decode_jit(
        params, cache, logits, lengths, np.int32(max_new_tokens), eos_id_array(eos_token_id), np.int32(pad_id),
        jax.random.PRNGKey(seed), np.float32(temperature), np.float32(top_p), np.arange(b, dtype=np.int32),
        config=config, spec=spec)
    tokens, out_lengths, stats = jax.device_get((tokens, out_lengths, {**prefill_stats, **decode_stats}))
    t2 = time.perf_counter()
    return GenerationOutput(sequences=np.asarray(tokens)[:, :max_new_tokens], lengths=np.asarray(out_lengths),
                            stats={k: np.asarray(v) for k, v in stats.items()},
                            mod_layers=active_mod_layers(config, mode), spec=spec,
                            timings={"prefill_s": t1 - t0, "decode_s": t2 - t1})


# ----------------------------------------------------------------------------------------------
# Prompt-level API: conversation template, tokenizer, image preprocessing


def generate(model, prompts: Sequence[dict], *, tokenizer=None, template: str = "vicuna_v1",
             image_aspect: str = "pad", max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0,
             seed: int = 0, eos_token_id=None, mode: str = "inference", **kw) -> GenerationOutput:
    """Generate answers for `prompts`, each `{"image": path | bytes | PIL image | None, "text": str}`.

    The text is one user turn (or a LLaVA conversation list ending with a user turn), rendered
    with the conversation template (vicuna_v1: "<system> USER: <image>\\n<text> ASSISTANT:").
    An image without an `<image>` tag in the text goes first, as LLaVA does. `tokenizer` is a
    `gmod_jax.data.tokenizer.Tokenizer` or a path; by default the checkpoint directory's.
    Returns `generate_ids`' output with `.texts` filled in.
    """
    from gmod_jax.data.images import image_config_for, preprocess_image
    from gmod_jax.data.templates import IMAGE_TAG, render_prompt
    from gmod_jax.data.tokenizer import Tokenizer, load_tokenizer

    config: ModelConfig = model.config
    if tokenizer is None:
        if not getattr(model, "path", None):
            raise ValueError("the model has no checkpoint path; pass tokenizer=")
        tokenizer = load_tokenizer(model.path)
    elif not isinstance(tokenizer, Tokenizer):
        tokenizer = load_tokenizer(tokenizer)
    image_config = image_config_for(config, aspect=image_aspect)

    ids_list, types_list, images = [], [], []
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, dict) or "text" not in prompt:
            raise ValueError(f"prompt {i} must be a dict with 'text' (and optionally 'image')")
        image = prompt.get("image")
        text = prompt["text"]
        if image is not None and isinstance(text, str) and IMAGE_TAG not in text:
            text = IMAGE_TAG + "\n" + text
        segments = render_prompt(text, template, has_image=image is not None, record_id=f"prompt {i}")
        encoded = tokenizer.encode_segments(segments)
        ids_list.append(encoded.input_ids)
        types_list.append(encoded.token_types)
        images.append(None if image is None else preprocess_image(image, image_config, name=f"prompt {i} image"))

    out = generate_ids(model, ids_list, images if any(im is not None for im in images) else None,
                       max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                       eos_token_id=tokenizer.eos_id if eos_token_id is None else eos_token_id,
                       pad_token_id=tokenizer.pad_id,
                       token_types_list=types_list, mode=mode, **kw)
    out.texts = [tokenizer.decode(row).strip() for row in out.tokens]
    return out
