"""Key canonicalisation, export names, transforms and config round trips."""

from __future__ import annotations

import numpy as np
import pytest

from convert import hf_config, keymap, pipeline
from gmod_jax.checkpoint import flatten
from tests import hf_fixtures as fx


@pytest.mark.parametrize("key,layout,canonical", [
    ("language_model.model.layers.3.mlp.up_proj.weight", "A", "language_model.layers.3.mlp.up_proj.weight"),
    ("language_model.lm_head.weight", "A", "lm_head.weight"),
    ("vision_tower.vision_model.encoder.layers.0.mlp.fc1.bias", "A", "vision_tower.encoder.layers.0.mlp.fc1.bias"),
    ("model.language_model.norm.weight", "B", "language_model.norm.weight"),
    ("model.vision_tower.vision_model.pre_layrnorm.weight", "B", "vision_tower.pre_layrnorm.weight"),
    ("model.multi_modal_projector.linear_2.bias", "C", "multi_modal_projector.linear_2.bias"),
    ("lm_head.weight", "C", "lm_head.weight"),
    ("vision_tower.embeddings.class_embedding", "D", "vision_tower.embeddings.class_embedding"),
    ("model.embed_tokens.weight", "E", "language_model.embed_tokens.weight"),
    ("model.mm_projector.2.weight", "E", "multi_modal_projector.linear_2.weight"),
    ("model.mm_projector.4.bias", "E", "multi_modal_projector.linear_3.bias"),
    ("model.mm_projector.weight", "E", "multi_modal_projector.linear_1.weight"),
    ("model.vision_tower.vision_tower.vision_model.post_layernorm.bias", "E", "vision_tower.post_layernorm.bias"),
    ("model.layers.5.router.weight", "gamma_mod", "language_model.layers.5.router.weight"),
])
def test_canonical_keys(key, layout, canonical):
    assert keymap.canonical_key(key, layout) == canonical
    if layout in ("D", "E", "gamma_mod") and key != "model.mm_projector.weight":
        assert keymap.to_layout_key(canonical, layout) == key


def test_clip_keys_and_dropped_buffers():
    assert keymap.canonical_clip_key("vision_model.encoder.layers.1.layer_norm1.weight") == \
        "vision_tower.encoder.layers.1.layer_norm1.weight"
    assert keymap.canonical_clip_key("encoder.layers.1.layer_norm1.weight") == \
        "vision_tower.encoder.layers.1.layer_norm1.weight"  # 5.24 standalone CLIPVisionModel
    for skipped in ("text_model.embeddings.token_embedding.weight", "logit_scale", "visual_projection.weight"):
        assert keymap.canonical_clip_key(skipped) is None
    assert keymap.is_dropped("vision_model.embeddings.position_ids")
    assert keymap.is_dropped("model.layers.0.self_attn.rotary_emb.inv_freq")
    assert not keymap.is_dropped("model.layers.0.self_attn.q_proj.weight")


@pytest.mark.parametrize("kind,shape,heads,head_dim", [
    ("linear", (6, 4), 0, 0), ("heads_in", (12, 5), 3, 4), ("heads_out", (5, 12), 3, 4),
    ("head_bias", (12,), 3, 4), ("conv", (8, 3, 2, 2), 0, 0), ("copy", (7,), 0, 0),
])
def test_transforms_invert(kind, shape, heads, head_dim):
    target = keymap.Target(("x",), None, kind, shape, heads, head_dim)
    a = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    flax = target.to_flax(a)
    assert flax.shape == target.flax_shape
    back = target.to_torch(flax)
    assert back.flags.c_contiguous
    np.testing.assert_array_equal(back, a)


def test_heads_in_matches_reference_math():
    # q = x @ W.T split into heads must equal einsum with the Flax kernel [E, H, hd].
    rng = np.random.default_rng(0)
    w = rng.standard_normal((12, 5))  # [H*hd, E]
    x = rng.standard_normal((2, 5))
    target = keymap.Target(("q",), None, "heads_in", w.shape, 3, 4)
    np.testing.assert_allclose(np.einsum("be,ehd->bhd", x, target.to_flax(w)), (x @ w.T).reshape(2, 3, 4))


@pytest.mark.parametrize("name", list(fx.SPECS))
def test_hf_config_round_trip(name):
    model = hf_config.hf_llava_config(fx.config_v5(fx.SPECS[name])).model
    again = hf_config.hf_llava_config(hf_config.to_hf_llava_config(model)).model
    assert again == model


def test_gamma_mod_config_round_trip():
    spec = fx.Spec(name="mod", layers=6)
    raw = fx.config_original(spec, mod={"mod_enable": True, "mod_mode": "arank_mod", "mod_layers_idx": [3, 4],
                                        "capacity_factor": 0.34, "router_aux_loss_coef": 0.02})
    raw["mm_vision_config"] = fx.hf_config(spec).vision_config.to_dict()
    source = hf_config.original_llava_config(raw)
    assert source.kind == "gamma_mod" and source.model.mod.layers == (3, 4)
    assert source.model.mod.router_aux_loss_coef == 0.02 and source.model.mod.routing_ratio == 0.5
    assert source.extras["capacity_factor"] == 0.34 and source.extras["mod_mode"] == "arank_mod"
    written = hf_config.to_gamma_mod_config(source.model, source.extras)
    assert written["mod"] == {"mod_enable": True, "mod_mode": "arank_mod", "mod_layers_idx": [3, 4],
                              "capacity_factor": 0.34, "router_aux_loss_coef": 0.02}
    assert hf_config.original_llava_config(written).model == source.model


def test_linear_projector_original_layout(tmp_path):
    spec = fx.SPECS["base"]
    sd = fx.state_dict_c(fx.build_model(spec))
    weights = fx.rename(sd, "E")
    for param in ("weight", "bias"):
        weights[f"model.mm_projector.{param}"] = weights.pop(f"model.mm_projector.0.{param}")
        del weights[f"model.mm_projector.2.{param}"]
    weights.update({"model.vision_tower.vision_tower." + k: v for k, v in fx.tower_state(sd).items()})
    fx.write_weights(weights, tmp_path)
    raw = fx.config_original(spec)
    raw["mm_projector_type"] = "linear"
    raw["mm_vision_config"] = fx.hf_config(spec).vision_config.to_dict()
    fx.write_json(tmp_path / "config.json", raw)
    config, params, _ = pipeline.load_params(tmp_path)
    assert config.projector.depth == 1
    flat = flatten(params)
    assert ("projector", "fc2", "kernel") not in flat
    np.testing.assert_array_equal(flat[("projector", "fc1", "kernel")],
                                  sd["model.multi_modal_projector.linear_1.weight"].numpy().T)
