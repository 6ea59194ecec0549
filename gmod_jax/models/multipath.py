"""LLaVA-HR's multi-path vision tower (`MultiPathCLIPVisionTower`), over a plain param tree.

For a CLIP-normalised image x of side S (`vision.input_image_size`):
1. fast path input: x resized to F = `vision.fast_image_size` (bilinear, align_corners=True, in
   float32 with torch's CPU coordinates, then cast back);
2. CLIP patch embedding + the position table (resampled bicubic+antialias to the F/patch grid
   when it differs from the native grid), CLS dropped *before* the pre-LN;
3. slow path: the ConvNeXt trunk on x itself; only its last stage X is used;
4. the CLIP layers in four scanned groups with an MR-adapter (`S2FStitchAlignModuleV2`) after
   each of the first three (when `latent_adapters`), all layers, no post-LN;
5. the final fusion (`MultiPathAlignModule`): fast_proj(y) + slow_proj(tokens(X)).
Slow tokens are aligned to the fast grid (bilinear align_corners=True upsample when smaller,
average pool when larger), in the adapters after their projection, in the fusion before it,
exactly as the official modules do. Every resampling runs in float32 and is cast back.

The CLIP leaves keep `ClipVisionTower`'s paths (the dead `cls` and `post_ln` included, so a
checkpoint round-trips); the new leaves are listed with their PyTorch names in
`MULTIPATH_LEAVES` (under `model.vision_tower.`) and `CONVNEXT_LEAVES` (under
`model.vision_tower.slow_vision_tower.vision_tower.`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from gmod_jax.config import ModelConfig
from gmod_jax.layers.attention import project
from gmod_jax.layers.dtypes import DTYPES
from gmod_jax.layers.norms import layer_norm
from gmod_jax.models.clip_vit import ClipVisionTower, encoder_layer
from gmod_jax.models.convnext import conv2d, convnext_stages, init_convnext
from gmod_jax.models.llama import _remat

N_ADAPTERS = 3  # after the first three quarters of the CLIP layers

# (Flax path under `vision/`, PyTorch key under `model.vision_tower.`, transform) for the fusion
# modules; `{a}` indexes the adapter, stacked on the leading axis of the Flax leaf. Kinds as in
# `convert.keymap.Target`, plus `conv1x1`: [O, I, 1, 1] -> [I, O]. The ConvNeXt trunk is
# `vision/slow/` + CONVNEXT_LEAVES (layer scale named `weight` in LLaVA-HR checkpoints).
MULTIPATH_LEAVES: tuple[tuple[str, str, str], ...] = (
    ("adapters/slow_conv/kernel", "align_stages_latent.{a}.slow_conv.weight", "conv1x1"),
    ("adapters/slow_conv/bias", "align_stages_latent.{a}.slow_conv.bias", "copy"),
    ("adapters/slow_proj/kernel", "align_stages_latent.{a}.slow_proj.weight", "conv1x1"),
    ("adapters/slow_proj/bias", "align_stages_latent.{a}.slow_proj.bias", "copy"),
    ("adapters/fast_conv/kernel", "align_stages_latent.{a}.fast_conv.weight", "conv"),
    ("adapters/fast_conv/bias", "align_stages_latent.{a}.fast_conv.bias", "copy"),
    ("adapters/fast_proj/kernel", "align_stages_latent.{a}.fast_proj.weight", "conv1x1"),
    ("adapters/fast_proj/bias", "align_stages_latent.{a}.fast_proj.bias", "copy"),
    ("adapters/gate/fc1/kernel", "align_stages_latent.{a}.gate.0.weight", "linear"),
    ("adapters/gate/fc1/bias", "align_stages_latent.{a}.gate.0.bias", "copy"),
    ("adapters/gate/fc2/kernel", "align_stages_latent.{a}.gate.2.weight", "linear"),
    ("adapters/gate/fc2/bias", "align_stages_latent.{a}.gate.2.bias", "copy"),
    ("fusion/fast_proj/kernel", "align_stages.0.fast_proj.weight", "linear"),
    ("fusion/fast_proj/bias", "align_stages.0.fast_proj.bias", "copy"),
    ("fusion/slow_proj/kernel", "align_stages.0.slow_proj.weight", "linear"),
    ("fusion/slow_proj/bias", "align_stages.0.slow_proj.bias", "copy"),
)
ADAPTER_KERNEL = 7  # the fast branch's depthwise conv (padding 3)
_HIGHEST = jax.lax.Precision.HIGHEST


def init_adapters(rng, d: int, c: int, dtype=jnp.float32) -> dict:
    """The official init of `S2FStitchAlignModuleV2` (stacked x3): xavier-uniform convs with zero
    biases, zero projections (so a fresh adapter is the identity), PyTorch-default gate Linears."""
    r = jax.random.split(rng, 4)
    xavier = jax.nn.initializers.glorot_uniform
    k = ADAPTER_KERNEL
    n = N_ADAPTERS

    def torch_linear(key, fan_in, fan_out):  # nn.Linear default: U(±1/sqrt(fan_in)) for both
        kk, kb = jax.random.split(key)
        bound = fan_in ** -0.5
        return {"kernel": jax.random.uniform(kk, (n, fan_in, fan_out), dtype, -bound, bound),
                "bias": jax.random.uniform(kb, (n, fan_out), dtype, -bound, bound)}

    zeros = lambda *shape: jnp.zeros((n, *shape), dtype)  # noqa: E731
    dw_bound = (6 / (k * k * (1 + d))) ** 0.5
    return {
        "slow_conv": {"kernel": xavier(in_axis=-2, out_axis=-1, batch_axis=0)(r[0], (n, c, c), dtype),
                      "bias": zeros(c)},
        "slow_proj": {"kernel": zeros(c, d), "bias": zeros(d)},
        # depthwise [k, k, 1, d]: torch's xavier on [d, 1, k, k] has fan_in k·k, fan_out d·k·k
        "fast_conv": {"kernel": jax.random.uniform(r[1], (n, k, k, 1, d), dtype, -1, 1) * dw_bound,
                      "bias": zeros(d)},
        "fast_proj": {"kernel": zeros(d, d), "bias": zeros(d)},
        "gate": {"fc1": torch_linear(r[2], 2 * d, d // 2), "fc2": torch_linear(r[3], d // 2, 1)},
    }


def init_fusion(rng, d: int, c: int, dtype=jnp.float32) -> dict:
    """`MultiPathAlignModule`: two PyTorch-default Linears."""
    out = {}
    for name, fan_in, key in (("fast_proj", d, 0), ("slow_proj", c, 1)):
        kk, kb = jax.random.split(jax.random.fold_in(rng, key))
        bound = fan_in ** -0.5
        out[name] = {"kernel": jax.random.uniform(kk, (fan_in, d), dtype, -bound, bound),
                     "bias": jax.random.uniform(kb, (d,), dtype, -bound, bound)}
    return out


class MultiPathVisionTower(ClipVisionTower):
    """`ClipVisionTower`'s CLIP params plus `slow` (ConvNeXt), `adapters` and `fusion`."""

    def setup(self):
        super().setup()
        v, pdt = self.config.vision, DTYPES[self.config.param_dtype]
        d, c = v.hidden_size, v.slow.width
        self.slow = self.param("slow", lambda rng: init_convnext(v.slow, rng, v.num_channels, pdt))
        if v.latent_adapters:
            self.adapters = self.param("adapters", lambda rng: init_adapters(rng, d, c, pdt))
        self.fusion = self.param("fusion", lambda rng: init_fusion(rng, d, c, pdt))

    def __call__(self, pixel_values):
        """pixel_values [N, S, S, C] -> image tokens [N, (F/patch)², hidden_size]."""
        p = {"patch_embed": self.patch_embed, "pos_embed": self.pos_embed, "pre_ln": self.pre_ln,
             "layers": self.layers, "slow": self.slow, "fusion": self.fusion}
        if self.config.vision.latent_adapters:
            p["adapters"] = self.adapters
        return multipath_features(self.config, p, pixel_values)


# ----------------------------------------------------------------------------------------------
# resampling (float32, torch semantics)


def align_corners_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] linear interpolation weights of torch's bilinear `align_corners=True`,
    with the coordinates computed as its CPU kernel does, in float32 (float64 coordinates
    differ by up to ~4e-4 on a 1024 -> 448 resize)."""
    scale = np.float32(n_in - 1) / np.float32(n_out - 1) if n_out > 1 else np.float32(0)
    src = (scale * np.arange(n_out, dtype=np.float32)).astype(np.float32)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w1 = (src - i0.astype(np.float32)).astype(np.float32)
    m = np.zeros((n_out, n_in), np.float32)
    np.add.at(m, (np.arange(n_out), i0), np.float32(1) - w1)
    np.add.at(m, (np.arange(n_out), i1), w1)
    return m


def resize_align_corners(x, size: int):
    """Bilinear align_corners=True resize of [B, H, W, C] to [B, size, size, C] in float32,
    cast back to x's dtype (LLaVA-HR's `F.interpolate(x.float(), ...).to(x.dtype)`)."""
    mh = jnp.asarray(align_corners_matrix(x.shape[1], size))
    mw = jnp.asarray(align_corners_matrix(x.shape[2], size))
    y = jnp.einsum("oh,bhwc->bowc", mh, x.astype(jnp.float32), precision=_HIGHEST)
    y = jnp.einsum("pw,bowc->bopc", mw, y, precision=_HIGHEST)
    return y.astype(x.dtype)


def align_to_grid(x, grid: int):
    """Slow map [B, h, h, C] -> [B, grid², C]: upsample (bilinear align_corners=True, float32)
    when smaller, average-pool with kernel = stride = h // grid when larger."""
    b, h, w, c = x.shape
    if h < grid:
        x = resize_align_corners(x, grid)
    elif h > grid:
        r = h // grid
        x = x.reshape(b, grid, r, grid, r, c).mean(axis=(2, 4), dtype=jnp.float32).astype(x.dtype)
    return x.reshape(b, grid * grid, c)


def position_table(config: ModelConfig, pos_embed):
    """Patch rows of the position table on the fast grid: the native rows, or (when the grid
    differs) the native rows resampled bicubic with antialias in float32 (torch's
    `F.interpolate(bicubic, antialias=True)`, which `jax.image.resize` 'cubic' reproduces), then
    cast back to the table's dtype. CLS row dropped (the official code drops the CLS token)."""
    v = config.vision
    native, grid = v.image_size // v.patch_size, v.token_grid
    patches = pos_embed[1:]
    if grid == native:
        return patches
    table = patches.reshape(native, native, -1).astype(jnp.float32)
    table = jax.image.resize(table, (grid, grid, table.shape[-1]), method="cubic", antialias=True)
    return table.reshape(grid * grid, -1).astype(pos_embed.dtype)


# ----------------------------------------------------------------------------------------------
# fusion modules


def mr_adapter(config: ModelConfig, p, y, slow):
    """`S2FStitchAlignModuleV2`: y [B, N, d] fast tokens, slow [B, h, h, c] -> [B, N, d]."""
    dtype = DTYPES[config.dtype]
    grid = config.vision.token_grid
    gelu = lambda x: jax.nn.gelu(x, approximate=False)  # noqa: E731
    s = project(gelu(project(slow, p["slow_conv"], "bhwc,ce->bhwe", dtype)), p["slow_proj"], "bhwc,cd->bhwd", dtype)
    s = align_to_grid(s, grid)
    b, n, d = y.shape
    f = y.astype(dtype).reshape(b, grid, grid, d)
    k = ADAPTER_KERNEL // 2
    h = gelu(conv2d(f, p["fast_conv"], 1, [(k, k), (k, k)], dtype, groups=d))
    f = (f + project(h, p["fast_proj"], "bhwc,cd->bhwd", dtype)).reshape(b, n, d)
    pooled = jnp.mean(jnp.concatenate([f, s], axis=-1), axis=1)
    g = project(gelu(project(pooled, p["gate"]["fc1"], "bd,de->be", dtype)), p["gate"]["fc2"], "be,eo->bo", dtype)
    return f + s * jnp.tanh(g)[:, None, :]


def final_fusion(config: ModelConfig, p, y, slow):
    """`MultiPathAlignModule`: fast_proj(y) + slow_proj(slow tokens aligned to the fast grid)."""
    dtype = DTYPES[config.dtype]
    s = align_to_grid(slow, config.vision.token_grid)
    return project(y, p["fast_proj"], "bnd,de->bne", dtype) + project(s, p["slow_proj"], "bnc,cd->bnd", dtype)


def multipath_features(config: ModelConfig, p, pixel_values):
    """LLaVA-HR image tokens [B, token_grid², hidden] from pixels [B, S, S, C] (see module doc)."""
    v, dtype = config.vision, DTYPES[config.dtype]
    if pixel_values.shape[1:3] != (v.pixel_size, v.pixel_size):
        raise ValueError(f"multipath tower takes {v.pixel_size}x{v.pixel_size} pixels, got "
                         f"{pixel_values.shape[1]}x{pixel_values.shape[2]}")
    x = pixel_values.astype(dtype)
    fast = resize_align_corners(x, v.fast_image_size) if v.fast_image_size != v.pixel_size else x
    patches = conv2d(fast, p["patch_embed"], v.patch_size, "VALID", dtype)
    b = patches.shape[0]
    y = patches.reshape(b, -1, v.hidden_size) + position_table(config, p["pos_embed"]).astype(dtype)[None]
    y = layer_norm(y, p["pre_ln"]["scale"], p["pre_ln"]["bias"], v.layer_norm_eps)

    remat = lambda fn: _remat(fn, config.remat)  # noqa: E731
    slow = convnext_stages(v.slow, p["slow"], x, dtype, remat)[-1]

    def step(h, layer_params):
        return encoder_layer(config, layer_params, h), None

    step = remat(step)
    groups = jax.tree.map(lambda a: a.reshape(4, a.shape[0] // 4, *a.shape[1:]), p["layers"])
    for g in range(4):
        y, _ = jax.lax.scan(step, y, jax.tree.map(lambda a: a[g], groups))
        if g < N_ADAPTERS and v.latent_adapters:
            y = mr_adapter(config, jax.tree.map(lambda a: a[g], p["adapters"]), y, slow)
    return final_fusion(config, p["fusion"], y, slow)
