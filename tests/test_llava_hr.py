"""LLaVA-HR (multi-path vision tower) against a PyTorch reference built here, presets, and γ-MoD.

The reference (tests/hr_fixtures.py) is transformers' `CLIPVisionModel`, a hand-written timm
ConvNeXt and the official fusion modules restated with their attribute names, composed as the
official `MultiPathCLIPVisionTower.forward`; the LLM side is transformers' `LlamaForCausalLM`
fed the reference image features. Every weight is random (adapter projections non-zero). The
tower is checked at LLaVA-HR's real geometry (S = 768 and 1024) with tiny widths, the whole
model on `tiny_hr` (S = 96: a 4 -> 6 position resample, 36 image tokens).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import gmod_jax
from gmod_jax import config as C
from gmod_jax import token_types as tt
from gmod_jax.models import multipath as mp
from gmod_jax.models.llava import LlavaModel
from tests import hr_fixtures as hr

# Features: max |diff| <= 1e-5 x max(1, max |reference|): the random towers' outputs reach ~100,
# where one float32 ulp is ~8e-6. Logits (O(1) here): absolute.
FEATURE_TOL = 1e-5
LOGIT_TOL = 1e-4


def _pixels(cfg, batch=2, seed=0):
    s = cfg.vision.input_image_size
    return np.random.default_rng(seed).standard_normal((batch, 3, s, s)).astype(np.float32)


def _max_rel(ours, theirs):
    return float(np.max(np.abs(np.asarray(ours, np.float64) - theirs))) / max(1.0, float(np.max(np.abs(theirs))))


def _real_geometry(size, adapters=True):
    """Tiny widths on LLaVA-HR's real geometry: CLIP patch 14 at native 336, ConvNeXt stride 32."""
    return C.tiny_hr().replace(vision=C.VisionConfig(
        hidden_size=16, intermediate_size=32, num_layers=4, num_heads=2, tower="multipath", input_image_size=size,
        slow=C.ConvNeXtConfig(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32)), latent_adapters=adapters))


@pytest.mark.parametrize("size,fast,resampled,adapters", [(768, 336, False, False), (1024, 448, True, True)])
def test_vision_features_match_torch_at_real_sizes(size, fast, resampled, adapters):
    """S = 768 (native 577-row position table, 24x24 grids; here without the latent adapters,
    as LLaVA-HR's stage 1 builds it) and S = 1024 (F = 448 through the float32-coordinate
    bilinear, table resampled 24 -> 32, 1024 tokens), tiny widths."""
    cfg = _real_geometry(size, adapters)
    v = cfg.vision
    assert v.fast_image_size == fast and (v.token_grid != 24) == resampled and v.slow_grid == v.token_grid
    tower = hr.reference_tower(cfg, adapters=adapters)
    x = _pixels(cfg, batch=1)
    with torch.no_grad():
        theirs = tower(torch.tensor(x)).numpy()
    params = hr.multipath_params(tower, cfg)
    ours = jax.jit(lambda p, px: mp.multipath_features(cfg, p, px))(params, jnp.asarray(x.transpose(0, 2, 3, 1)))
    assert ours.shape == theirs.shape == (1, cfg.image_seq_length, v.hidden_size)
    assert _max_rel(ours, theirs) <= FEATURE_TOL


def test_fusion_modules_match_torch_in_every_alignment_branch():
    """Adapter and final fusion alone, slow grid equal to, smaller than (LLaVA-HR's stage-1
    upsample) and larger than the fast grid (average pool), random non-zero projections; a
    freshly initialised adapter is the identity."""
    d, c, grid = 16, 24, 4
    cfg = C.tiny_hr(64)  # token grid 4
    cfg = cfg.replace(vision=dataclasses.replace(cfg.vision, hidden_size=d, num_heads=2))
    rng = np.random.default_rng(1)
    adapter = hr.randomize_(hr.S2FStitchAlignModuleV2(d, c), 5, scale=0.3).eval()
    fusion = hr.randomize_(hr.MultiPathAlignModule(d, c), 6, scale=0.3).eval()
    holder = torch.nn.Module()  # the official names: align_stages_latent.0.*, align_stages.0.*
    holder.align_stages_latent = torch.nn.ModuleList([adapter])
    holder.align_stages = torch.nn.ModuleList([fusion])
    sd = {k: v.detach().numpy() for k, v in holder.state_dict().items()}
    p = {}
    for path, key, kind in mp.MULTIPATH_LEAVES:
        hr._set(p, path, hr.to_flax(kind, sd[key.format(a=0)]))
    init = jax.jit(lambda rng: jax.tree.map(lambda a: a[1], mp.init_adapters(rng, d, c)))
    fresh = init(jax.random.key(0, impl="rbg"))
    assert float(jnp.abs(fresh["slow_conv"]["kernel"]).max()) > 0
    assert float(jnp.abs(fresh["gate"]["fc2"]["kernel"]).max()) > 0
    y = rng.standard_normal((2, grid * grid, d)).astype(np.float32)
    slows = [rng.standard_normal((2, c, side, side)).astype(np.float32) for side in (4, 2, 8)]

    @jax.jit
    def ours(p, fresh, y, slows):
        return [(mp.mr_adapter(cfg, p["adapters"], y, s), mp.final_fusion(cfg, p["fusion"], y, s),
                 mp.mr_adapter(cfg, fresh, y, s)) for s in slows]

    got = ours(p, fresh, jnp.asarray(y), [jnp.asarray(s.transpose(0, 2, 3, 1)) for s in slows])
    for slow, (got_a, got_f, got_fresh) in zip(slows, got):
        with torch.no_grad():
            want_a = adapter(torch.tensor(y), torch.tensor(slow)).numpy()
            want_f = fusion(torch.tensor(y), torch.tensor(slow)).numpy()
        assert _max_rel(got_a, want_a) <= FEATURE_TOL, slow.shape
        assert _max_rel(got_f, want_f) <= FEATURE_TOL, slow.shape
        np.testing.assert_array_equal(np.asarray(got_fresh), y)


def test_align_corners_resize_uses_torch_float32_coordinates():
    """1024 -> 448 as the fast-path input resize: float64 coordinates would miss by ~3e-4."""
    x = np.random.default_rng(2).standard_normal((1, 2, 1024, 1024)).astype(np.float32)
    want = F.interpolate(torch.tensor(x), size=(448, 448), mode="bilinear", align_corners=True).numpy()
    got = np.asarray(mp.resize_align_corners(jnp.asarray(x.transpose(0, 2, 3, 1)), 448)).transpose(0, 3, 1, 2)
    assert float(np.max(np.abs(got - want))) <= 2e-6


def test_position_table_resample_is_antialiased_bicubic():
    """LLaVA-HR's resample (bicubic, antialias) at the real 24 -> 32 size, not HF's interpolate."""
    cfg = C.llava_hr_7b()
    table = np.random.default_rng(3).standard_normal((577, 8)).astype(np.float32)
    want = hr.resample_pos_embed(torch.tensor(table)[None], 1025)[0, 1:].numpy()
    got = np.asarray(mp.position_table(dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, hidden_size=8,
                                                                                             num_heads=1)),
                                       jnp.asarray(table)))
    assert got.shape == (1024, 8) and float(np.max(np.abs(got - want))) <= 2e-6


def test_full_model_logits_match_torch():
    """S = 96, LLaVA-HR's 1024: position table resampled 4 -> 6, 36 image tokens. The tower's
    features (<= 1e-5) and the logits (<= 1e-4) both match."""
    cfg = C.tiny_hr()
    assert cfg.vision.token_grid != cfg.vision.image_size // cfg.vision.patch_size
    tower = hr.reference_tower(cfg, seed=4)
    llama = hr.tiny_llama(cfg, seed=5)
    d, h = cfg.vision.hidden_size, cfg.text.hidden_size
    projector = hr.randomize_(torch.nn.Sequential(torch.nn.Linear(d, h), torch.nn.GELU(), torch.nn.Linear(h, h)), 6,
                              scale=0.1)
    rng = np.random.default_rng(7)
    n = cfg.image_seq_length
    ids = np.concatenate([[[1]] * 2, rng.integers(3, 100, (2, 4)), np.full((2, n), cfg.image_token_index),
                          rng.integers(3, 100, (2, 5))], axis=1).astype(np.int64)
    x = _pixels(cfg, seed=8)
    tower_feats, theirs = hr.reference_logits(cfg, tower, projector, llama, ids, x)

    llm_sd = {k.replace("model.", "language_model.", 1): v for k, v in llama.state_dict().items()}
    proj_sd = {f"multi_modal_projector.linear_{i}.{w}": projector.state_dict()[f"{j}.{w}"]
               for i, j in ((1, 0), (2, 2)) for w in ("weight", "bias")}
    params = {"vision": hr.multipath_params(tower, cfg), "projector": hr.canonical_params(cfg, proj_sd, "projector"),
              "llm": hr.canonical_params(cfg, llm_sd, "llm")}
    init = jax.eval_shape(lambda: LlavaModel(cfg).init(jax.random.PRNGKey(0), method=LlavaModel.declare_params))
    shape = lambda t: {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_flatten_with_path(t)[0]}
    assert shape(params) == shape(init["params"])  # the leaf tables cover the whole tree

    @jax.jit
    def ours(p, ids, px):  # one compile for both outputs
        return LlavaModel(cfg).apply({"params": p}, ids, px,
                                     method=lambda m, i, x: (m.vision(x), m(i, x)["logits"]))

    got_feats, logits = ours(params, jnp.asarray(ids, jnp.int32), jnp.asarray(x.transpose(0, 2, 3, 1)))
    assert _max_rel(got_feats, tower_feats) <= FEATURE_TOL
    diff = float(np.max(np.abs(np.asarray(logits) - theirs)))
    assert diff <= LOGIT_TOL, f"max |logit diff| {diff:.2e}"


# ----------------------------------------------------------------------------------------------
# presets and config


def _counts(cfg):
    shapes = jax.eval_shape(lambda: LlavaModel(cfg).init(jax.random.PRNGKey(0), method=LlavaModel.declare_params))
    v = shapes["params"]["vision"]
    n = lambda t: sum(int(np.prod(a.shape)) for a in jax.tree.leaves(t))  # noqa: E731
    clip = {k: x for k, x in v.items() if k not in ("slow", "adapters", "fusion")}
    return {"clip": n(clip), "slow": n(v["slow"]), "adapters": n(v["adapters"]), "fusion": n(v["fusion"]),
            "projector": n(shapes["params"]["projector"]), "llm": n(shapes["params"]["llm"])}


def test_preset_parameter_counts_match_the_note():
    """llava-hr-and-mgm.md §2.1: CLIP-L 303.5M, ConvNeXt-L trunk 196.2M, adapters 18.26M,
    fusion 2.62M, projector 21.0M, Vicuna-7B 6.74B."""
    got = _counts(C.llava_hr_7b())
    assert round(got["clip"] / 1e6, 1) == 303.5
    assert round(got["slow"] / 1e6, 1) == 196.2
    assert round(got["adapters"] / 1e6, 2) == 18.26
    assert round(got["fusion"] / 1e6, 2) == 2.62
    assert round(got["projector"] / 1e6, 1) == 21.0
    assert round(got["llm"] / 1e9, 2) == 6.74
    assert round(_counts(C.llava_hr_13b())["llm"] / 1e9, 2) == 13.02


def test_preset_geometry_and_mod_layers():
    for size, fast, tokens in ((384, 336, 576), (768, 336, 576), (1024, 448, 1024), (1536, 672, 2304)):
        cfg = C.llava_hr_7b(size)
        assert (cfg.vision.input_image_size, cfg.vision.fast_image_size, cfg.image_seq_length) == (size, fast, tokens)
    assert C.gamma_mod(C.llava_hr_7b()).mod.layers == tuple(range(3, 31))
    assert C.gamma_mod(C.llava_hr_13b()).mod.layers == tuple(range(3, 39))
    cfg = C.gamma_mod(C.llava_hr_13b())
    assert C.ModelConfig.from_json(cfg.to_json()) == cfg


@pytest.mark.parametrize("change,match", [
    (dict(num_layers=6), "multiple of 4"),
    (dict(input_image_size=100), "multiple of the ConvNeXt stride 16"),
    (dict(slow=None), "needs vision.slow"),
    (dict(input_image_size=48), "do not divide"),
])
def test_bad_multipath_config_is_named(change, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(C.tiny_hr().vision, **change)
    with pytest.raises(ValueError, match="only the 'multipath' tower"):
        dataclasses.replace(C.tiny_hr().vision, tower="clip")


# ----------------------------------------------------------------------------------------------
# γ-MoD on LLaVA-HR


@pytest.fixture(scope="module")
def mod_hr():
    """Random weights on the model's own tree (numpy values on `eval_shape` shapes: no init to
    compile), adapter projections included, and a router sharp enough that both inference
    thresholds route."""
    cfg = C.gamma_mod(C.tiny_hr(), "explicit", 0.5, layers=(1, 2))
    shapes = jax.eval_shape(lambda: LlavaModel(cfg).init(jax.random.PRNGKey(0), method=LlavaModel.declare_params))
    rng = np.random.default_rng(0)

    def leaf(path, s):
        name = jax.tree_util.keystr(path)
        if name.endswith("['scale']"):
            return jnp.ones(s.shape, s.dtype)
        return jnp.asarray((2.0 if "mod_router" in name else 0.05) * rng.standard_normal(s.shape), s.dtype)

    return gmod_jax.Model(cfg, jax.tree_util.tree_map_with_path(leaf, shapes["params"]))


def _hr_batch(cfg, system=3, question=6, seed=0):
    rng = np.random.default_rng(seed)
    n = cfg.image_seq_length
    ids = np.concatenate([[[1]] * 2, rng.integers(3, 100, (2, system - 1)), np.full((2, n), cfg.image_token_index),
                          rng.integers(3, 100, (2, question))], axis=1).astype(np.int32)
    types = np.full(ids.shape, tt.QUESTION, np.int32)
    types[:, :system] = tt.SYSTEM
    types[:, system:system + n] = tt.IMAGE
    types[:, -2:] = tt.ANSWER
    return ids, types, _pixels(cfg, seed=seed).transpose(0, 2, 3, 1)


def test_mod_training_skips_ratio_of_system_and_image(mod_hr):
    cfg = mod_hr.config
    ids, types, px = _hr_batch(cfg)
    out = mod_hr.forward(ids, px, np.ones(ids.shape, bool), types, mode="train")
    skipped = np.asarray(out["mod_tokens"]) - np.asarray(out["mod_kept"])
    per_row = int(np.floor(cfg.mod.routing_ratio * (3 + cfg.image_seq_length)))
    np.testing.assert_array_equal(skipped, [2 * per_row] * len(cfg.mod.layers))


@pytest.mark.slow
def test_mod_generation_with_caches_equals_reference(mod_hr):
    from gmod_jax.inference.generate import generate_ids
    from tests.support.reference import reference_generate

    ids, _, px = _hr_batch(mod_hr.config, question=2, seed=3)
    prompts = [ids[0], ids[1, :-1]]
    out = generate_ids(mod_hr, prompts, px, max_new_tokens=5)
    ref = reference_generate(mod_hr, prompts, px, max_new_tokens=5)
    assert [t.tolist() for t in out.tokens] == [t.tolist() for t in ref.tokens]
    np.testing.assert_array_equal(out.stats["prefill_kept"], ref.prefill_kept)
    np.testing.assert_array_equal(out.stats["decode_kept"], ref.decode_kept)
    kept, entering = out.stats["prefill_kept"], out.stats["prefill_tokens"]
    assert 0 < kept.sum() < entering.sum()  # the threshold really routed


# ----------------------------------------------------------------------------------------------
# preprocessing


def test_preprocessing_pads_and_resizes_to_the_input_size():
    """A non-square image: pad to square on (122, 116, 104), PIL bicubic to S, /255, CLIP
    normalisation, channels last; the data pipeline takes the same settings from the config."""
    from PIL import Image

    from gmod_jax.data.images import image_config_for, preprocess_image
    from gmod_jax.data.pipeline import PipelineConfig

    cfg = C.tiny_hr()
    pixels = np.random.default_rng(4).integers(0, 256, (30, 50, 3), dtype=np.uint8)  # H 30, W 50
    canvas = Image.new("RGB", (50, 50), (122, 116, 104))
    canvas.paste(Image.fromarray(pixels), (0, 10))
    ref = np.asarray(canvas.resize((96, 96), Image.Resampling.BICUBIC), np.float64) / 255
    ref = ((ref.astype(np.float32) - np.float32([0.48145466, 0.4578275, 0.40821073]))
           / np.float32([0.26862954, 0.26130258, 0.27577711]))
    got = preprocess_image(Image.fromarray(pixels), image_config_for(cfg))
    assert got.shape == (96, 96, 3)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)
    assert image_config_for(C.llava_hr_7b()).image_size == 1024 and image_config_for(C.tiny()).image_size == 28
    pipe = PipelineConfig.for_model(cfg, batch_size=1, max_length=64)
    assert (pipe.image.image_size, pipe.image_seq_length) == (96, 36)
