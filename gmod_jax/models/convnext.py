"""ConvNeXt trunk (timm `ConvNeXt` architecture: stem + stages, no head) over a plain param tree.

Used as LLaVA-HR's slow vision path (timm `convnext_large_mlp`, the last stage output) and by
Mini-Gemini's auxiliary tower (open_clip `convnext_large_d_320`, all four stage outputs), so
`convnext_stages` returns every stage output. Channels last throughout:

- stem: conv k = s = patch (with bias), then LayerNorm over channels (timm `LayerNorm2d`);
- stage i: for i > 0 a downsample (LayerNorm2d, conv 2x2 stride 2 with bias), then `depths[i]`
  blocks, scanned over params stacked on a leading axis;
- block: depthwise conv k x k (padding k // 2, bias), LayerNorm over C, Linear C -> r·C, exact
  erf GELU, Linear r·C -> C, per-channel layer scale, residual.

Param leaves are named after timm's modules (`stem/conv`, `stem/norm`, `stages_{i}/downsample/
{norm,conv}`, `stages_{i}/blocks/{conv_dw,norm,mlp/fc1,mlp/fc2,layer_scale}`); `CONVNEXT_LEAVES`
lists them with their PyTorch key suffixes for converters. Norm statistics run in float32
(`layer_norm`); convolutions and matmuls run in the compute dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gmod_jax.config import ConvNeXtConfig
from gmod_jax.layers.attention import project
from gmod_jax.layers.norms import layer_norm
from gmod_jax.sharding import constrain_batch

# (Flax path under the trunk, PyTorch key suffix under timm's trunk, transform). `{i}` is the
# stage, `{b}` the block (stacked on the leading axis of the Flax leaf). Transforms use
# `convert.keymap.Target` kinds: `conv` = OIHW -> HWIO (depthwise [C, 1, k, k] -> [k, k, 1, C]
# too), `linear` = [O, I] -> [I, O], `copy` = as is. The layer scale is `gamma` in timm/open_clip
# and `weight` in LLaVA-HR's vendored copy (the converter picks the name per layout).
CONVNEXT_LEAVES: tuple[tuple[str, str, str], ...] = (
    ("stem/conv/kernel", "stem.0.weight", "conv"),
    ("stem/conv/bias", "stem.0.bias", "copy"),
    ("stem/norm/scale", "stem.1.weight", "copy"),
    ("stem/norm/bias", "stem.1.bias", "copy"),
    ("stages_{i}/downsample/norm/scale", "stages.{i}.downsample.0.weight", "copy"),
    ("stages_{i}/downsample/norm/bias", "stages.{i}.downsample.0.bias", "copy"),
    ("stages_{i}/downsample/conv/kernel", "stages.{i}.downsample.1.weight", "conv"),
    ("stages_{i}/downsample/conv/bias", "stages.{i}.downsample.1.bias", "copy"),
    ("stages_{i}/blocks/conv_dw/kernel", "stages.{i}.blocks.{b}.conv_dw.weight", "conv"),
    ("stages_{i}/blocks/conv_dw/bias", "stages.{i}.blocks.{b}.conv_dw.bias", "copy"),
    ("stages_{i}/blocks/norm/scale", "stages.{i}.blocks.{b}.norm.weight", "copy"),
    ("stages_{i}/blocks/norm/bias", "stages.{i}.blocks.{b}.norm.bias", "copy"),
    ("stages_{i}/blocks/mlp/fc1/kernel", "stages.{i}.blocks.{b}.mlp.fc1.weight", "linear"),
    ("stages_{i}/blocks/mlp/fc1/bias", "stages.{i}.blocks.{b}.mlp.fc1.bias", "copy"),
    ("stages_{i}/blocks/mlp/fc2/kernel", "stages.{i}.blocks.{b}.mlp.fc2.weight", "linear"),
    ("stages_{i}/blocks/mlp/fc2/bias", "stages.{i}.blocks.{b}.mlp.fc2.bias", "copy"),
    ("stages_{i}/blocks/layer_scale", "stages.{i}.blocks.{b}.gamma", "copy"),
)


def init_convnext(config: ConvNeXtConfig, rng, in_channels: int, dtype=jnp.float32) -> dict:
    """timm's init: trunc-normal(0.02) conv/linear weights, zero biases, unit norms, layer scale
    1e-6 (or no layer-scale leaf when `layer_scale` is off)."""
    c = config
    normal = jax.nn.initializers.truncated_normal(0.02)
    keys = iter(jax.random.split(rng, 2 + 4 * c.num_stages))

    def ln(dim):
        return {"scale": jnp.ones((dim,), dtype), "bias": jnp.zeros((dim,), dtype)}

    stem_shape = (c.patch_size, c.patch_size, in_channels, c.dims[0])
    params = {"stem": {"conv": {"kernel": normal(next(keys), stem_shape, dtype), "bias": jnp.zeros((c.dims[0],), dtype)},
                       "norm": ln(c.dims[0])}}
    for i, (depth, dim) in enumerate(zip(c.depths, c.dims)):
        stage = {}
        if i:
            stage["downsample"] = {"norm": ln(c.dims[i - 1]),
                                   "conv": {"kernel": normal(next(keys), (2, 2, c.dims[i - 1], dim), dtype),
                                            "bias": jnp.zeros((dim,), dtype)}}
        hidden, k = c.mlp_ratio * dim, c.kernel_size
        blocks = {
            "conv_dw": {"kernel": normal(next(keys), (depth, k, k, 1, dim), dtype),
                        "bias": jnp.zeros((depth, dim), dtype)},
            "norm": {"scale": jnp.ones((depth, dim), dtype), "bias": jnp.zeros((depth, dim), dtype)},
            "mlp": {"fc1": {"kernel": normal(next(keys), (depth, dim, hidden), dtype),
                            "bias": jnp.zeros((depth, hidden), dtype)},
                    "fc2": {"kernel": normal(next(keys), (depth, hidden, dim), dtype),
                            "bias": jnp.zeros((depth, dim), dtype)}},
        }
        if c.layer_scale:
            blocks["layer_scale"] = jnp.full((depth, dim), 1e-6, dtype)
        stage["blocks"] = blocks
        params[f"stages_{i}"] = stage
    return params


def conv2d(x, p, stride: int, padding, dtype, groups: int = 1):
    """NHWC conv with an HWIO kernel and optional bias, in the compute dtype."""
    y = jax.lax.conv_general_dilated(
        x.astype(dtype), p["kernel"].astype(dtype), window_strides=(stride, stride), padding=padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups)
    return y + p["bias"].astype(dtype) if "bias" in p else y


def _norm(x, p, eps):
    return layer_norm(x, p["scale"], p["bias"], eps)


def convnext_block(config: ConvNeXtConfig, p, x, dtype):
    k = config.kernel_size
    h = conv2d(x, p["conv_dw"], 1, [(k // 2, k // 2)] * 2, dtype, groups=x.shape[-1])
    h = _norm(h, p["norm"], config.norm_eps)
    h = jax.nn.gelu(project(h, p["mlp"]["fc1"], "bhwc,cf->bhwf", dtype), approximate=False)
    h = project(h, p["mlp"]["fc2"], "bhwf,fc->bhwc", dtype)
    if config.layer_scale:
        h = h * p["layer_scale"].astype(dtype)
    return x + h


def convnext_stages(config: ConvNeXtConfig, params, pixels, dtype=jnp.float32, remat=None) -> list:
    """pixels [B, H, W, C_in] -> the output of every stage, [B, H/(patch·2^i), W/(patch·2^i), dims[i]]
    for i = 0..num_stages-1 (H and W multiples of `config.stride`). `remat` optionally wraps each
    block (e.g. `jax.checkpoint`) to recompute its activations in the backward pass."""
    c = config
    if pixels.shape[1] % c.stride or pixels.shape[2] % c.stride:
        raise ValueError(f"ConvNeXt input {pixels.shape[1]}x{pixels.shape[2]} is not a multiple of its "
                         f"total stride {c.stride}")
    x = conv2d(pixels, params["stem"]["conv"], c.patch_size, "VALID", dtype)
    x = _norm(x, params["stem"]["norm"], c.norm_eps)
    outputs = []
    for i in range(c.num_stages):
        stage = params[f"stages_{i}"]
        if i:
            x = _norm(x, stage["downsample"]["norm"], c.norm_eps)
            x = conv2d(x, stage["downsample"]["conv"], 2, "VALID", dtype)

        def step(h, block_params):
            return convnext_block(c, block_params, constrain_batch(h), dtype), None

        x, _ = jax.lax.scan(remat(step) if remat else step, x, stage["blocks"])
        outputs.append(x)
    return outputs
