"""`ModelConfig.attention_impl`: every implementation against the reference ("xla") on CPU where
it runs there (splash through the Pallas interpreter, cuDNN's call wiring through JAX's XLA
attention), on the masks the model builds: causal + left padding, MoD slots with invalid and
forced-padding slots, GQA; float32 and bfloat16. What `auto` picks per platform, and a compile of
the splash kernel for a TPU topology when libtpu is installed."""

from __future__ import annotations

import dataclasses
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gmod_jax
from gmod_jax import config as C
from gmod_jax import routing
from gmod_jax.layers import attention as A

SCALE = 0.3


def _qkv(t, batch=2, heads=4, kv=2, d=16, seed=0, dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(seed), 3)
    shapes = ((batch, t, heads, d), (batch, t, kv, d), (batch, t, kv, d))
    return tuple(jax.random.normal(key, s).astype(dtype) for key, s in zip(ks, shapes))


def _left_padded(t, pads=(0, 37)):
    """Decoder mask with left padding (generation's layout), and the rows whose outputs count."""
    valid = jnp.arange(t)[None] >= jnp.array(pads)[:, None]
    return A.causal_mask(valid), np.asarray(valid)


def _mod_slots(t=260, cap=180, pads=(0, 21), rule="topk"):
    """A MoD layer's slot mask over left-padded rows and the slots whose outputs are scattered
    back for real tokens (valid, non-pad). The capacity rule forces the padding in (kept padding
    slots lead the row); the threshold rule never keeps padding but leaves invalid slots."""
    probs = jax.random.uniform(jax.random.key(2), (len(pads), t))
    non_pad = jnp.arange(t)[None] >= jnp.array(pads)[:, None]
    if rule == "topk":
        types = jnp.where(non_pad, 2, 0).at[:, -30:].set(3)  # PAD, image tokens, then a question
        sel = routing.select_topk(probs, types, (2,), 0.5, cap)
    else:
        sel = routing.select_threshold(probs, non_pad, 0.4, cap)
    real = routing.gather_mask(non_pad, sel)
    mask = routing.kept_attention_mask(sel, real)
    return mask, np.asarray(sel.valid & real)


def _cudnn_wiring(q, k, v, mask, *, scale):
    """The cuDNN path's call of `jax.nn.dot_product_attention`, run by its XLA implementation."""
    return A._cudnn_attention(q, k, v, mask, scale, causal=True, implementation="xla"), None


def _impl(name):
    if name == "cudnn_wiring":
        return _cudnn_wiring
    return lambda q, k, v, mask, scale: A.causal_attention(q, k, v, mask, scale=scale, impl=name)


IMPLS = ["xla", "blocked", "cpu_blocked", "splash", "cudnn_wiring"]
MASKS = {"left_padded": lambda: _left_padded(200), "mod_capacity": lambda: _mod_slots(rule="topk"),
         "mod_threshold": lambda: _mod_slots(rule="threshold")}


@pytest.mark.parametrize("mask_kind", sorted(MASKS))
@pytest.mark.parametrize("impl", IMPLS)
def test_float32_equals_reference(impl, mask_kind):
    mask, rows = MASKS[mask_kind]()
    q, k, v = _qkv(mask.shape[-1])
    want, _ = A.dot_product_attention(q, k, v, mask, scale=SCALE, impl="xla")
    got, _ = _impl(impl)(q, k, v, mask, scale=SCALE)
    # Summation order differs (blocks, tiles, online softmax); 16 values per dot, O(1) outputs.
    np.testing.assert_allclose(np.asarray(got)[rows], np.asarray(want)[rows], atol=2e-6, rtol=0)


@pytest.mark.parametrize("impl", ["splash", "cudnn_wiring", "cpu_blocked"])
def test_bfloat16_error_within_the_references_own(impl):
    """bf16 rounding dominates, so each implementation is held to the reference's own bf16
    error against float32 math on the same bf16 inputs (at most twice it), rather than to a
    fixed tolerance. The fused kernels keep logits in float32, which the reference's bf16 einsum
    does not, so they typically land below it."""
    mask, rows = _mod_slots(rule="topk")
    q, k, v = _qkv(mask.shape[-1], dtype=jnp.bfloat16)
    exact, _ = A.dot_product_attention(*(a.astype(jnp.float32) for a in (q, k, v)), mask, scale=SCALE, impl="xla")
    ref, _ = A.dot_product_attention(q, k, v, mask, scale=SCALE, impl="xla")
    got, _ = _impl(impl)(q, k, v, mask, scale=SCALE)
    assert got.dtype == jnp.bfloat16
    err = lambda out: float(np.max(np.abs(np.asarray(out, np.float32)[rows] - np.asarray(exact)[rows])))
    assert 0 < err(ref) < 0.05
    assert err(got) <= 2 * err(ref), (err(got), err(ref))


def test_splash_rows_that_see_a_key_are_the_references():
    """Right padding (training's layout): padding queries still see the real keys before them,
    and the splash kernel's segment ids give them exactly those; only rows that see no valid
    key at all (left padding) differ."""
    t = 200
    valid = jnp.arange(t)[None] < jnp.array([[t], [150]])
    mask = A.causal_mask(valid)
    q, k, v = _qkv(t)
    want, _ = A.dot_product_attention(q, k, v, mask, scale=SCALE, impl="xla")
    got, _ = A.causal_attention(q, k, v, mask, scale=SCALE, impl="splash")
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6, rtol=0)


@pytest.mark.parametrize("impl", ["splash", "cudnn_wiring"])
def test_kernel_gradients_equal_the_references(impl):
    mask, rows = _left_padded(200, pads=(0, 50))
    q, k, v = _qkv(200)
    keep = jnp.asarray(rows)[..., None, None]

    def loss(fn, q, k, v):
        out, _ = fn(q, k, v, mask, scale=SCALE)
        return jnp.sum(jnp.where(keep, out, 0.0) * jnp.sin(out))

    ref = lambda q, k, v, mask, scale: A.dot_product_attention(q, k, v, mask, scale=scale, impl="xla")
    want = jax.grad(lambda *a: loss(ref, *a), argnums=(0, 1, 2))(q, k, v)
    got = jax.grad(lambda *a: loss(_impl(impl), *a), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=2e-5, rtol=0)


def test_non_causal_kernels_equal_the_reference():
    """The vision tower's unmasked attention (odd length: padded to tiles / to even)."""
    q, k, v = _qkv(17, heads=4, kv=4)
    ones = jnp.ones((1, 1, 1, 1), bool)
    want, _ = A.dot_product_attention(q, k, v, ones, scale=SCALE, impl="xla")
    splash, _ = A.dot_product_attention(q, k, v, ones, scale=SCALE, impl="splash")
    cudnn = A._cudnn_attention(q, k, v, ones, SCALE, causal=False, implementation="xla")
    for got in (splash, cudnn):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6, rtol=0)


# ----------------------------------------------------------------------------------------------
# Choosing


def test_auto_picks_per_platform():
    q32, k32, _ = _qkv(8)
    q16, k16, _ = _qkv(8, dtype=jnp.bfloat16)
    mask = A.causal_mask(jnp.ones((2, 8), bool))
    pick = lambda q, k, platform, **kw: A.resolve_attention_impl("auto", q, k, mask, causal=True,
                                                                 platform=platform, **kw)
    assert A.target_platform() == "cpu" and pick(q32, k32, None) == "cpu_blocked"
    assert pick(q16, k16, "cpu") == "cpu_blocked"  # never cuDNN or splash on CPU
    assert pick(q16, k16, "gpu") == "cudnn"
    assert pick(q32, k32, "gpu") == "blocked"  # cuDNN flash needs bf16/fp16
    assert pick(q32, k32, "tpu") == "splash"
    assert pick(q16, k16, "tpu", return_probs=True) == "xla"  # post-softmax maps: the reference
    wide = jnp.zeros((2, 8, 4, 160), jnp.bfloat16)
    assert pick(wide, wide, "gpu") == "blocked"
    per_head = jnp.ones((2, 4, 8, 8), bool)  # a mask per head: not a key mask splash can take
    assert A.resolve_attention_impl("auto", q32, k32, per_head, causal=True, platform="tpu") == "blocked"


@pytest.mark.parametrize("impl, platform, match", [
    ("cudnn", "cpu", "needs a CUDA GPU"),
    ("cudnn", "gpu", "bfloat16 or float16"),
    ("splash", "gpu", "needs a TPU"),
    ("flash", "cpu", "must be one of"),
])
def test_explicit_kernels_that_cannot_run_are_clear_errors(impl, platform, match):
    q, k, _ = _qkv(8)
    mask = A.causal_mask(jnp.ones((2, 8), bool))
    with pytest.raises(ValueError, match=match):
        A.resolve_attention_impl(impl, q, k, mask, causal=True, platform=platform)


def test_cudnn_on_this_cpu_fails_at_trace_time_naming_the_option():
    q, k, v = _qkv(8)
    mask = A.causal_mask(jnp.ones((2, 8), bool))
    with pytest.raises(ValueError, match="attention_impl='cudnn' cannot run here"):
        A.causal_attention(q, k, v, mask, scale=SCALE, impl="cudnn")


def test_config_validates_and_round_trips_attention_impl():
    with pytest.raises(ValueError, match="attention_impl"):
        C.tiny(attention_impl="flash")
    cfg = C.tiny(attention_impl="splash")
    assert C.ModelConfig.from_json(cfg.to_json()) == cfg
    assert C.ModelConfig.from_dict({k: v for k, v in C.tiny().to_dict().items() if k != "attention_impl"}
                                   ).attention_impl == "auto"  # configs saved before the option


# ----------------------------------------------------------------------------------------------
# Through the model


def test_model_with_splash_equals_reference_model():
    """A γ-MoD model (vision tower, dense and MoD layers) with splash everywhere: the logits of
    real tokens equal the reference implementation's, left-padded rows included."""
    base = C.tiny(vision=C.VisionConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4,
                                        image_size=28, patch_size=14))
    model = gmod_jax.init_random(C.gamma_mod(base, "explicit", 0.5, layers=(1, 2)), seed=1)
    rng = np.random.RandomState(0)
    n, t = model.config.image_seq_length, 16
    ids = rng.randint(1, 100, size=(2, t)).astype(np.int32)
    ids[:, 3:3 + n] = model.config.image_token_index
    mask = np.ones((2, t), bool)
    mask[1, :3] = False  # left padding, then the image
    ids[1, :3] = 0
    types = np.full((2, t), 3, np.int32)
    types[:, 3:3 + n] = 2
    types[~mask] = 0
    px = rng.randn(2, 28, 28, 3).astype(np.float32)
    outs = {impl: gmod_jax.Model(model.config.replace(attention_impl=impl), model.params)
            .forward(ids, px, mask, types, mode="train")["logits"] for impl in ("xla", "splash")}
    np.testing.assert_allclose(outs["splash"][mask], outs["xla"][mask], atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------
# TPU: compile for a topology on this CPU machine


@pytest.fixture(scope="module")
def tpu_mesh():
    if importlib.util.find_spec("libtpu") is None:
        pytest.skip("libtpu is not installed: no TPU compiler on this machine")
    # Several test processes may load libtpu at once; it only compiles here, no chip is claimed.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    devices = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2").devices
    return jax.make_mesh((2, 1, 2), ("data", "fsdp", "tensor"), devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)


def test_auto_compiles_splash_into_a_tpu_model_gradient(tpu_mesh):
    """`auto` under a TPU mesh (on this CPU host) resolves to splash, and a tiny γ-MoD decoder's
    gradient (dense and MoD layer scans, batch and heads split by `shard_map`) compiles for TPU
    v5e with the Mosaic kernels in it: forward, and dq and dkv for each layer group."""
    from gmod_jax.models import llama

    base = C.tiny(dtype="bfloat16")
    cfg = C.gamma_mod(base.replace(text=dataclasses.replace(base.text, num_kv_heads=2)), "explicit", 0.5, layers=(1, 2))
    params = gmod_jax.init_random(cfg, seed=0).params["llm"]
    shard = lambda *spec: jax.NamedSharding(tpu_mesh, jax.P(*spec))
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=shard()), params)
    b, t, d = 4, 200, cfg.text.hidden_size
    rows = shard(("data", "fsdp"))

    def loss(p, embeds, mask, types):
        assert A.target_platform() == "tpu"
        h, aux = llama.decoder_forward(cfg, p["layers"], p["mod_router"]["kernel"], embeds, mask, types,
                                       llama.RoutingPlan("train", capacity=150))
        return jnp.sum(h.astype(jnp.float32) ** 2) + aux["router_loss"]

    with jax.set_mesh(tpu_mesh):
        compiled = jax.jit(jax.grad(loss)).lower(
            abstract, jax.ShapeDtypeStruct((b, t, d), jnp.bfloat16, sharding=rows),
            jax.ShapeDtypeStruct((b, t), jnp.bool_, sharding=rows),
            jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=rows)).compile()
    assert compiled.as_text().count("tpu_custom_call") >= 6  # not an XLA fallback
