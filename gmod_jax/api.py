"""The Python entry point: `gmod_jax.load(path)` returns a `Model` handle.

Tools, tests and benchmarks all go through this handle so there is one way to run a checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gmod_jax import token_types as tt
from gmod_jax.config import ModelConfig
from gmod_jax.models.llama import RoutingPlan, routing_capacity, unstack_layers
from gmod_jax.models.llava import LlavaModel


@functools.lru_cache(maxsize=None)
def _jitted_apply(config: ModelConfig, plan: RoutingPlan, with_pixels: bool):
    module = LlavaModel(config)

    def fn(params, input_ids, pixel_values, attention_mask, token_types):
        return module.apply({"params": params}, input_ids, pixel_values if with_pixels else None,
                            attention_mask, token_types, plan)

    return jax.jit(fn)


INFERENCE_LAYERS = ("auto", "stacked", "unstacked")


def _free_memory_bytes(device) -> int | None:
    """Free memory where `device` keeps arrays: the accelerator's allocator limit minus its use,
    the host's available memory for CPU devices; None when neither is known."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # noqa: BLE001 - unknown platform: no estimate
        return None


@dataclasses.dataclass
class Model:
    """A loaded checkpoint: `.config`, `.params` and jitted forward functions."""

    config: ModelConfig
    params: Any
    path: str | None = None

    def _inputs(self, input_ids, pixel_values, attention_mask, token_types):
        ids = np.asarray(input_ids, dtype=np.int32)
        if ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {ids.shape}")
        mask = np.ones(ids.shape, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {ids.shape}")
        if token_types is None:
            token_types = tt.infer_token_types(ids, self.config.image_token_index, mask)
        types = np.asarray(token_types, dtype=np.int32)
        if pixel_values is not None:
            pixel_values = np.asarray(pixel_values, dtype=np.float32)
            expected = self.config.pixel_shape
            if pixel_values.ndim != 4 or pixel_values.shape[1:] != expected:
                raise ValueError(f"pixel_values must be [N, {expected[0]}, {expected[1]}, {expected[2]}] "
                                 f"(channels last), got {pixel_values.shape}")
        return ids, pixel_values, mask, types

    def forward(self, input_ids, pixel_values=None, attention_mask=None, token_types=None,
                mode: str = "inference", capacity: int | None = None, inference_layers: str = "auto") -> dict:
        """Full forward. mode: "train" (top-k + masked routing, router loss), "inference"
        (official threshold rule or capacity, per config), "dense" (MoD layers run dense).
        inference_layers: the weights' form outside "train" (`inference_params`).
        Returns numpy arrays: logits float32 [B,T,V], router_loss, and for γ-MoD
        `skip_ratio_per_layer` [n_mod] and `skip_ratio` (over MoD layers)."""
        ids, px, mask, types = self._inputs(input_ids, pixel_values, attention_mask, token_types)
        if capacity is None:
            capacity = routing_capacity(self.config, types, mode)
        plan = RoutingPlan(mode=mode, capacity=capacity)
        fn = _jitted_apply(self.config, plan, px is not None)
        params = self.params if mode == "train" else self.inference_params(inference_layers)
        out = jax.device_get(fn(params, ids, px, mask, types))
        if "mod_kept" in out:
            kept, tokens = out["mod_kept"].astype(np.float64), np.maximum(out["mod_tokens"], 1)
            out["skip_ratio_per_layer"] = 1.0 - kept / tokens
            out["skip_ratio"] = float(1.0 - kept.sum() / tokens.sum())
        return out

    def inference_params(self, layers: str = "auto"):
        """The params inference runs on: `self.params`, or a copy with the decoder layers split
        into per-layer buffers (`unstack_layers`), which the layer walk and the decode loop unroll.
        XLA CPU copies each layer's weights out of the stack before its matmuls (and the decode
        loop's stacked caches around every step): decode moved 3-4× the bytes it needs, prefill
        paid ~4% (docs/benchmarks.md). Training keeps the stack (one compiled layer per group).

        layers: "stacked", "unstacked" or "auto": unstacked when one more copy of the decoder
        weights fits in half the free memory of the device holding them. The copy is built once
        and kept while `self.params` is the same object."""
        if layers not in INFERENCE_LAYERS:
            raise ValueError(f"inference layers must be one of {INFERENCE_LAYERS}, got {layers!r}")
        stack = self.params["llm"]["layers"]
        if layers == "stacked" or isinstance(stack, tuple):
            return self.params
        if layers == "auto":
            leaves = jax.tree.leaves(stack)
            free = _free_memory_bytes(next(iter(leaves[0].devices())))
            if free is None or 2 * sum(a.nbytes for a in leaves) > free:
                return self.params
        cached = self.__dict__.get("_unstacked")
        if cached is None or cached[0] is not self.params:
            params = {**self.params, "llm": {**self.params["llm"], "layers": unstack_layers(stack)}}
            cached = self.__dict__["_unstacked"] = (self.params, params)
        return cached[1]

    def logits(self, input_ids, pixel_values=None, attention_mask=None, token_types=None) -> np.ndarray:
        """float32 logits [B, T, V] in inference mode (dense models: the plain forward)."""
        return self.forward(input_ids, pixel_values, attention_mask, token_types, mode="inference")["logits"]

    def generate(self, prompts, **kwargs):
        """Batched generation from [{"image": path|bytes|PIL|None, "text": str}, ...] with the
        KV-cache decoder; see `gmod_jax.inference.generate.generate` for the options."""
        from gmod_jax.inference.generate import generate

        return generate(self, prompts, **kwargs)

    def generate_ids(self, input_ids_list, pixel_values=None, **kwargs):
        """Generation from token ids; see `gmod_jax.inference.generate.generate_ids`."""
        from gmod_jax.inference.generate import generate_ids

        return generate_ids(self, input_ids_list, pixel_values, **kwargs)

    @property
    def num_params(self) -> int:
        return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(self.params))


def load(path: str, dtype: str | None = None) -> Model:
    """Load a gmod-jax checkpoint directory (written by `python -m convert`, `convert.to_mod` or
    training's `export`). `dtype` optionally casts params ("float32", "bfloat16", "float16")."""
    from gmod_jax.checkpoint import load_checkpoint

    config, params = load_checkpoint(path)
    if dtype is not None:
        target = jnp.dtype(dtype)
        params = jax.tree.map(lambda a: jnp.asarray(a, target), params)
        config = config.replace(dtype=dtype, param_dtype=dtype)
    else:
        params = jax.tree.map(jnp.asarray, params)
    return Model(config=config, params=params, path=str(path))


def init_random(config: ModelConfig, seed: int = 0) -> Model:
    """A randomly initialised model (tests, benchmarks, the demo's first stage).

    Uses the "rbg" PRNG: threefry's unrolled hashing made compiling the init of every stacked
    param take several times longer on CPU; rbg is deterministic for a given backend."""
    init = jax.jit(lambda key: LlavaModel(config).init(key, method=LlavaModel.declare_params)["params"])
    return Model(config=config, params=init(jax.random.key(seed, impl="rbg")))
