"""Mini-Gemini(-HD) vision stack: parity with a hand-written PyTorch reference (views, ConvNeXt
aux map, patch info mining, token order, projector, Llama logits), the resize / average-pool
equivalences of the reference note, the token order, presets and config plumbing."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from jax.sharding import PartitionSpec as P

from gmod_jax import config as C
from gmod_jax import sharding as shd
from gmod_jax.models import mgm
from gmod_jax.models.llava import LlavaModel
from tests import mgm_reference as ref_lib

TOKENS_TOL = 1e-5
LOGITS_TOL = 1e-4


def _inputs(cfg, batch=2, seed=0):
    rng = np.random.default_rng(seed)
    n = cfg.image_seq_length
    ids = rng.integers(3, cfg.text.vocab_size - 1, (batch, 3 + n + 4)).astype(np.int32)
    ids[:, 3:3 + n] = cfg.image_token_index
    aux = rng.standard_normal((batch, 3, *cfg.pixel_shape[:2])).astype(np.float32)
    return ids, aux


@pytest.mark.parametrize("grid,with_global", [(2, True), (1, False)])
def test_vision_tokens_and_logits_match_torch(grid, with_global):
    cfg = C.tiny_mgm(grid, with_global)
    assert cfg.image_seq_length == (grid ** 2 + with_global) * 4
    ref = ref_lib.build(cfg, seed=grid)
    ids, aux = _inputs(cfg, seed=grid)
    with torch.no_grad():
        views = torch.stack([ref.views(torch.tensor(a)) for a in aux])
        theirs_tokens = ref.encode_images(views, torch.tensor(aux)).numpy()
        theirs_logits = ref.logits(ids, torch.tensor(theirs_tokens)).numpy()
    params = ref_lib.flax_params(ref)
    shapes = jax.eval_shape(lambda: LlavaModel(cfg).init(jax.random.PRNGKey(0), method=LlavaModel.declare_params))
    assert jax.tree.map(lambda a: a.shape, shapes["params"]) == jax.tree.map(np.shape, params)

    module = LlavaModel(cfg)

    @jax.jit
    def run(p, i, px):
        tokens = module.apply({"params": p}, px, method=lambda m, x: m.vision(x))
        return tokens, module.apply({"params": p}, i, px)["logits"]

    tokens, logits = run(params, ids, jnp.asarray(aux.transpose(0, 2, 3, 1)))
    assert tokens.shape == theirs_tokens.shape == (2, cfg.image_seq_length, cfg.vision.hidden_size)
    tok_diff = float(np.max(np.abs(np.asarray(tokens) - theirs_tokens)))
    assert tok_diff <= TOKENS_TOL, f"vision tokens max |diff| {tok_diff:.2e}"
    logit_diff = float(np.max(np.abs(np.asarray(logits) - theirs_logits)))
    assert logit_diff <= LOGITS_TOL, f"logits max |diff| {logit_diff:.2e}"
    # Token order: with the value projector zeroed nothing is mined, so each block of n tokens is
    # the raw CLIP features of one view: [global, tile00, tile01, tile10, tile11] (views are
    # stacked [tiles..., global]). The mined part matters: raw features are far from the tokens.
    with torch.no_grad():
        raw = ref.clip_features(views.flatten(0, 1)).numpy().reshape(2, cfg.vision.num_views, -1, cfg.vision.hidden_size)
    order = [grid ** 2] + list(range(grid ** 2)) if with_global else list(range(grid ** 2))
    expected = raw[:, order].reshape(theirs_tokens.shape)
    assert np.max(np.abs(expected - theirs_tokens)) > 100 * TOKENS_TOL
    params["vision"]["uni_val"]["fc"] = jax.tree.map(np.zeros_like, params["vision"]["uni_val"]["fc"])
    unmined, _ = run(params, ids, jnp.asarray(aux.transpose(0, 2, 3, 1)))
    np.testing.assert_allclose(np.asarray(unmined), expected, atol=TOKENS_TOL, rtol=0)


def test_views_match_torch_and_average_pool_equivalences():
    """CLIP views: bilinear (no antialias) resize to 2·s, row-major tiles, global view; the global
    view and the aux map's 1/grid resize both equal a 2x2 mean pool at grid 2."""
    cfg = C.tiny_mgm(2, True)
    s = cfg.vision.image_size
    rng = np.random.default_rng(1)
    aux = rng.standard_normal((2, *cfg.pixel_shape)).astype(np.float32)
    ours = np.asarray(mgm.clip_views(cfg, jnp.asarray(aux)))
    ref = ref_lib.MGMReference.__new__(ref_lib.MGMReference)
    ref.config = cfg
    theirs = np.stack([ref.views(torch.tensor(a.transpose(2, 0, 1))).numpy().transpose(0, 2, 3, 1) for a in aux])
    assert ours.shape == (2, 5, s, s, 3)
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)
    big = np.asarray(mgm.bilinear_resize(jnp.asarray(aux), 2 * s))
    pooled = big.reshape(2, s, 2, s, 2, 3).mean(axis=(2, 4))
    np.testing.assert_allclose(ours[:, 4], pooled, atol=1e-6, rtol=0)
    np.testing.assert_array_equal(ours[:, 1], big[:, :s, s:])  # tile 1 = row 0, column 1
    np.testing.assert_array_equal(ours[:, 2], big[:, s:, :s])
    # The aux map's scale-1/2 bilinear resize (torch scale_factor) is a 2x2 mean pool too.
    amap = rng.standard_normal((1, 8, 16, 16)).astype(np.float32)
    halved = F.interpolate(torch.tensor(amap), scale_factor=0.5, mode="bilinear", align_corners=False).numpy()
    np.testing.assert_allclose(halved, amap.reshape(1, 8, 8, 2, 8, 2).mean(axis=(3, 5)), atol=1e-6, rtol=0)
    ours_global = np.asarray(mgm.aux_views(cfg, jnp.asarray(amap.transpose(0, 2, 3, 1))))[:, 4]
    np.testing.assert_allclose(ours_global, halved.transpose(0, 2, 3, 1), atol=1e-6, rtol=0)


def test_mgm_hd_7b_preset_shapes_and_param_count():
    cfg = C.mgm_hd_7b()
    assert cfg.image_seq_length == 2880 and cfg.pixel_shape == (1536, 1536, 3)
    assert cfg.vision.mm_hidden_size_aux == 2880 and cfg.vision.num_views == 5
    assert cfg.tokenizer_model_max_length == 4096
    shapes = jax.eval_shape(lambda: LlavaModel(cfg).init(jax.random.PRNGKey(0), method=LlavaModel.declare_params))
    vision = shapes["params"]["vision"]
    count = lambda tree: sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))  # noqa: E731
    assert count(vision["aux"]) == 196_227_264  # open_clip convnext_large_d_320 trunk (stem + stages)
    mining = sum(count(vision[k]) for k in ("uni_query", "uni_aux", "uni_val"))
    assert mining == (2 * 1024 + 1024 * 1024 + 1024) + 2 * (2 * 2880 + 2880 * 1024 + 1024)
    assert vision["uni_aux"]["fc"]["kernel"].shape == (2880, 1024)
    assert count(shapes["params"]) == 7_266_093_504
    # Every new leaf is declared in gmod_jax.param_layout (param_specs raises for one that is not).
    specs = shd.param_specs(shapes["params"], {"data": 1, "fsdp": 16, "tensor": 4})
    flat = {shd.path_str(p): s for p, s in jax.tree_util.tree_flatten_with_path(
        specs, is_leaf=lambda x: isinstance(x, P))[0]}
    assert flat["vision/uni_aux/fc/kernel"] == P("fsdp", "tensor")
    assert flat["vision/aux/stages_2/blocks/mlp/fc1/kernel"] == P(None, "fsdp", "tensor")
    mod = C.gamma_mod_mgm_hd_7b()
    assert mod.mod.router_init == "xavier_uniform" and mod.mod.layers == tuple(range(3, 31))
    assert mod.mod.routable_types.first_n is None
    official = C.gamma_mod_mgm_hd_7b(routable_span="first_n")
    assert official.mod.routable_span == "first_n" and official.mod.routable_types.first_n == 2880


def test_host_preprocessing_follows_the_config():
    """The aux image is LLaVA's pad-to-square + PIL bicubic + CLIP normalisation at image_size_aux;
    the CLIP views are not a host product (the model derives them)."""
    from PIL import Image

    from gmod_jax.data.images import ImageConfig, image_config_for, preprocess_image

    assert image_config_for(C.mgm_hd_7b()) == ImageConfig(image_size=1536)
    assert image_config_for(C.llava_v15_7b(), aspect="crop") == ImageConfig(image_size=336, aspect="crop")
    cfg = C.tiny_mgm()
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 70, 3), dtype=np.uint8))
    pixels = preprocess_image(img, image_config_for(cfg))
    assert pixels.shape == cfg.pixel_shape
    np.testing.assert_array_equal(pixels, preprocess_image(img, ImageConfig(image_size=64)))


def test_config_round_trip_and_validation():
    for cfg in (C.tiny_mgm(), C.gamma_mod_mgm(C.tiny_mgm(1, False), "explicit", layers=(1,), routable_span="first_n")):
        again = C.ModelConfig.from_json(cfg.to_json())
        assert again == cfg and again.vision.aux == cfg.vision.aux and hash(again) == hash(cfg)
    v = C.tiny_mgm().vision
    with pytest.raises(ValueError, match="needs vision.aux"):
        dataclasses.replace(v, aux=None)
    with pytest.raises(ValueError, match="image_global needs image_grid"):
        dataclasses.replace(v, image_grid=1)
    with pytest.raises(ValueError, match="image_size_aux 48"):
        dataclasses.replace(v, image_size_aux=48)
    with pytest.raises(ValueError, match="routable_first_n"):
        C.MoDConfig(routable_span="first_n")
