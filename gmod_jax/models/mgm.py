"""Mini-Gemini(-HD) vision stack: CLIP main tower + ConvNeXt auxiliary tower + patch info mining.

Input: one normalised auxiliary image per sample, `pixel_values` [N, S_aux, S_aux, C]
(`ModelConfig.pixel_shape`; the data side is the LLaVA "pad" preprocessing at S_aux). Everything
else Mini-Gemini computes from that tensor is derived here, on the device, with the official
resizes (all bilinear, align_corners=False, no antialias):

1. CLIP views: the aux image resized to `image_size`·grid, cut into grid x grid row-major tiles,
   plus (`image_global`) the global view, that image resized to `image_size` (a 2x2 mean pool
   for grid 2). Official code builds them on the host from the same normalised float32 tensor.
2. CLIP-L on every view (LLaVA-1.5 features: layer -2, patch tokens), n² raw tokens per view.
3. Aux feature map: the four ConvNeXt stage outputs resized to stage 0's grid and concatenated
   (2880 channels for ConvNeXt-L), side A = S_aux / stem patch. Tiles see its row-major
   (A/grid)² blocks, the global view the whole map resized by 1/grid (a 2x2 mean pool for grid 2).
4. Patch info mining per view: each CLIP token t attends over the p x p aux vectors of its cell
   (p = (A/grid) / n): q = Linear(LN(x_t)), k / v = Linear(LN(a)), softmax(q·k / sqrt(D)) after
   nan_to_num, and token = x_t + Σ w·v (the RAW CLIP feature, not q).
5. Token order [global, tile 0, ..., tile grid²-1]: (grid² + global) · n² tokens, 2880 for HD.

The projector (mlp2x_gelu) is the shared `Projector`, its input width the CLIP width.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from gmod_jax.config import ModelConfig
from gmod_jax.layers.attention import project
from gmod_jax.layers.dtypes import DTYPES
from gmod_jax.layers.norms import layer_norm
from gmod_jax.models.clip_vit import ClipVisionTower, vision_features
from gmod_jax.models.convnext import convnext_stages, init_convnext

# The patch-info-mining projectors (`uni_query`, `uni_aux`, `uni_val`) are official nn.Sequential
# (LayerNorm, Linear) modules; their leaves and PyTorch names are declared in gmod_jax.param_layout.
MINING_LN_EPS = 1e-5


class MGMVisionTower(ClipVisionTower):
    """The CLIP tower's params (same paths as LLaVA-1.5) plus `aux` (ConvNeXt trunk) and the
    three mining projectors `uni_query`, `uni_aux`, `uni_val`, all under `vision/`."""

    def setup(self):
        super().setup()
        v, pdt = self.config.vision, DTYPES[self.config.param_dtype]
        d, d_aux = v.hidden_size, v.mm_hidden_size_aux
        self.aux = self.param("aux", lambda rng: init_convnext(v.aux, rng, v.num_channels, pdt))
        self.uni_query = self.param("uni_query", _mining_projector_init(d, d, pdt))
        self.uni_aux = self.param("uni_aux", _mining_projector_init(d_aux, d, pdt))
        self.uni_val = self.param("uni_val", _mining_projector_init(d_aux, d, pdt))

    def __call__(self, pixel_values):
        """pixel_values [N, S_aux, S_aux, C] -> image features [N, image_seq_length, D]."""
        return mgm_features(self.config, {
            "patch_embed": self.patch_embed, "cls": self.cls, "pos_embed": self.pos_embed,
            "pre_ln": self.pre_ln, "layers": self.layers, "aux": self.aux, "uni_query": self.uni_query,
            "uni_aux": self.uni_aux, "uni_val": self.uni_val}, pixel_values)


def _mining_projector_init(d_in: int, d_out: int, pdt):
    """PyTorch defaults (what the official code starts from): LayerNorm ones / zeros, Linear
    weight and bias U(-1/sqrt(d_in), 1/sqrt(d_in))."""
    def init(rng):
        k1, k2 = jax.random.split(rng)
        bound = 1.0 / math.sqrt(d_in)
        return {"ln": {"scale": jnp.ones((d_in,), pdt), "bias": jnp.zeros((d_in,), pdt)},
                "fc": {"kernel": jax.random.uniform(k1, (d_in, d_out), pdt, -bound, bound),
                       "bias": jax.random.uniform(k2, (d_out,), pdt, -bound, bound)}}
    return init


# ----------------------------------------------------------------------------------------------
# Pure functions (float32 resizes; towers and projections in the compute dtype)


def bilinear_resize(x, size: int):
    """[N, H, W, C] -> [N, size, size, C]: torch `F.interpolate(mode="bilinear",
    align_corners=False)` without antialias, computed in float32 and cast back."""
    n, _, _, c = x.shape
    out = jax.image.resize(x.astype(jnp.float32), (n, size, size, c), "linear", antialias=False)
    return out.astype(x.dtype)


def grid_tiles(x, grid: int):
    """[N, H, W, C] -> [N, grid², H/grid, W/grid, C], tile index = row·grid + col."""
    n, h, w, c = x.shape
    x = x.reshape(n, grid, h // grid, grid, w // grid, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(n, grid * grid, h // grid, w // grid, c)


def clip_views(config: ModelConfig, aux_pixels):
    """[N, S_aux, S_aux, C] normalised aux images -> CLIP views [N, V, S, S, C] (float32) in the
    official stacking order [tiles (row-major)..., global]; V = `vision.num_views`."""
    v = config.vision
    big = bilinear_resize(aux_pixels.astype(jnp.float32), v.image_size * v.image_grid)
    views = grid_tiles(big, v.image_grid)
    if v.image_global:
        views = jnp.concatenate([views, bilinear_resize(big, v.image_size)[:, None]], axis=1)
    return views


def aux_feature_map(config: ModelConfig, params, aux_pixels):
    """The ConvNeXt stage outputs resized to stage 0's grid and concatenated on channels:
    [N, S_aux/patch, S_aux/patch, mm_hidden_size_aux]."""
    stages = convnext_stages(config.vision.aux, params, aux_pixels, DTYPES[config.dtype])
    side = stages[0].shape[1]
    return jnp.concatenate([stages[0]] + [bilinear_resize(s, side) for s in stages[1:]], axis=-1)


def aux_views(config: ModelConfig, aux_map):
    """[N, A, A, C_aux] -> per-view aux maps [N, V, A/grid, A/grid, C_aux], in `clip_views`' order:
    the row-major tiles, then the whole map resized by 1/grid for the global view."""
    v = config.vision
    views = grid_tiles(aux_map, v.image_grid)
    if v.image_global:
        views = jnp.concatenate([views, bilinear_resize(aux_map, aux_map.shape[1] // v.image_grid)[:, None]], axis=1)
    return views


def _ln_linear(config: ModelConfig, p, x, eqn: str):
    h = layer_norm(x, p["ln"]["scale"], p["ln"]["bias"], MINING_LN_EPS)
    return project(h, p["fc"], eqn, DTYPES[config.dtype])


def mine_patches(config: ModelConfig, params, features, aux):
    """Patch info mining. features [M, n², D] raw CLIP tokens of M views, aux [M, n·p, n·p, C_aux]
    their aux maps -> [M, n², D]: each token plus the attention-weighted values of its p x p cell."""
    m, tokens, d = features.shape
    n = math.isqrt(tokens)
    side, c_aux = aux.shape[1], aux.shape[-1]
    p = side // n
    cells = aux.reshape(m, n, p, n, p, c_aux).transpose(0, 1, 3, 2, 4, 5).reshape(m, tokens, p * p, c_aux)
    q = _ln_linear(config, params["uni_query"], features, "mtd,de->mte")
    k = _ln_linear(config, params["uni_aux"], cells, "mtjc,ce->mtje")
    val = _ln_linear(config, params["uni_val"], cells, "mtjc,ce->mtje")
    logits = jnp.einsum("mtd,mtjd->mtj", q, k, preferred_element_type=jnp.float32) / math.sqrt(k.shape[-1])
    weights = jax.nn.softmax(jnp.nan_to_num(logits), axis=-1)
    mined = jnp.einsum("mtj,mtjd->mtd", weights.astype(val.dtype), val, preferred_element_type=jnp.float32)
    return features + mined.astype(features.dtype)


def mgm_features(config: ModelConfig, params, aux_pixels):
    """The whole MGM vision stack before the projector: [N, S_aux, S_aux, C] -> [N, V·n², D] in
    token order [global, tiles...]."""
    v = config.vision
    n_img, n_views = aux_pixels.shape[0], v.num_views
    views = clip_views(config, aux_pixels)
    feats = vision_features(config, params, views.reshape(n_img * n_views, *views.shape[2:]))
    aux = aux_views(config, aux_feature_map(config, params["aux"], aux_pixels))
    mined = mine_patches(config, params, feats, aux.reshape(n_img * n_views, *aux.shape[2:]))
    mined = mined.reshape(n_img, n_views, *mined.shape[1:])
    if v.image_global:  # stacked [tiles..., global] -> tokens [global, tiles...]
        mined = jnp.concatenate([mined[:, -1:], mined[:, :-1]], axis=1)
    return mined.reshape(n_img, n_views * mined.shape[2], mined.shape[3])
