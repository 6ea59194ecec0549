"""Converted tiny random LLaVA models reproduce transformers' logits (fp32, eager, ≤ 1e-4).

The config matrix covers GQA, rope types (default, linear, dynamic beyond its trained length,
llama3, yarn), vision feature layer int and list, default/full strategy, projector bias off,
tied embeddings, attention/MLP biases, and every key layout. γ-MoD is checked against
transformers' Llama with γ-MoD's inference rule patched in (router on the layer's input norm,
MLP output scaled by the keep probability; the tiny router keeps every token, so no token is
dropped and the reference needs no gather).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from convert import pipeline
from gmod_jax.checkpoint import flatten, load_checkpoint
from gmod_jax.models.llama import RoutingPlan
from gmod_jax.models.llava import LlavaModel
from tests import hf_fixtures as fx

TOL = 1e-4


def _hf_logits(model, spec, extra=None):
    ids, mask, pixels = fx.parity_inputs(spec)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                       pixel_values=torch.tensor(pixels)).logits.numpy()
    return logits, ids, mask, pixels


def _flax_logits(config, params, ids, mask, pixels, plan=RoutingPlan()):
    model = LlavaModel(config)
    apply = jax.jit(lambda p, i, px, m: model.apply({"params": p}, i, px, attention_mask=m, plan=plan))
    out = apply(params, jnp.asarray(ids), jnp.asarray(pixels.transpose(0, 2, 3, 1)), jnp.asarray(mask))
    return out


def _assert_tree_matches_init(config, params, ids, pixels):
    """The converted tree is exactly what LlavaModel.init creates (paths, shapes, dtypes)."""
    init = jax.eval_shape(lambda: LlavaModel(config).init(
        jax.random.PRNGKey(0), jnp.asarray(ids), jnp.asarray(pixels.transpose(0, 2, 3, 1)))["params"])
    expected = {tuple(k.key for k in path): (leaf.shape, leaf.dtype)
                for path, leaf in jax.tree_util.tree_flatten_with_path(init)[0]}
    got = {path: (v.shape, v.dtype) for path, v in flatten(params).items()}
    assert got == expected


def _max_diff(ours, theirs, mask):
    valid = mask.astype(bool)
    return float(np.max(np.abs(np.asarray(ours, np.float32)[valid] - theirs[valid])))


@pytest.mark.parametrize("spec_name,layout,container,config_kind", [
    ("base", "A", "bin", "v4"),
    ("linear_list", "B", "safetensors", "v5"),
    ("dynamic_full_nobias", "C", "bin", "v5"),
    ("llama3_tied", "D", "safetensors", "v4"),
    ("yarn_biases", "D", "safetensors", "v4"),
])
def test_logits_match_transformers(tmp_path, spec_name, layout, container, config_kind):
    spec = fx.SPECS[spec_name]
    model = fx.build_model(spec, seed=11)
    model.set_attn_implementation("eager")
    theirs, ids, mask, pixels = _hf_logits(model, spec)
    src = tmp_path / "src"
    fx.write_weights(fx.rename(fx.state_dict_c(model), layout), src, container, shards=2)
    fx.write_json(src / "config.json", fx.config_v5(spec) if config_kind == "v5" else fx.config_v4_diff(spec))
    config, params, info = pipeline.load_params(src)
    assert info["layout"] == layout
    _assert_tree_matches_init(config, params, ids, pixels)
    diff = _max_diff(_flax_logits(config, params, ids, mask, pixels)["logits"], theirs, mask)
    assert diff <= TOL, f"{spec_name}: max |logit diff| {diff:.2e}"


def test_original_layout_logits_via_orbax(tmp_path):
    """Layout E + separate CLIP dir -> Orbax -> load_checkpoint: same logits as the HF model.
    Original LLaVA splices image features at id -200, so the ids are remapped for our side."""
    spec = fx.SPECS["base"]
    model = fx.build_model(spec, seed=12)
    model.set_attn_implementation("eager")
    theirs, ids, mask, pixels = _hf_logits(model, spec)
    sd = fx.state_dict_c(model)
    src, clip = tmp_path / "src", tmp_path / "clip"
    fx.write_weights(fx.rename(sd, "E"), src, "bin", shards=3)
    fx.write_json(src / "config.json", fx.config_original(spec, dtype="float32"))
    fx.write_clip_dir(sd, spec, clip)
    pipeline.convert_checkpoint(src, tmp_path / "ckpt", vision_tower=clip, batch_bytes=64 * 1024)
    config, params = load_checkpoint(tmp_path / "ckpt")
    ours_ids = np.where(ids == spec.image_token, config.image_token_index, ids)
    diff = _max_diff(_flax_logits(config, params, ours_ids, mask, pixels)["logits"], theirs, mask)
    assert diff <= TOL, f"max |logit diff| {diff:.2e}"


@pytest.mark.parametrize("container", ["bin", "safetensors"])
def test_gamma_mod_logits_match_reference(tmp_path, container):
    spec = fx.Spec(name="mod", layers=4)
    mod_layers = [1, 3]  # non-adjacent: dense and MoD groups alternate
    model = fx.build_model(spec, seed=13)
    model.set_attn_implementation("eager")
    src = tmp_path / "src"
    router = fx.write_gamma_mod(fx.state_dict_c(model), spec, src, mod_layers, container, shards=2)
    probs = fx.patch_gamma_mod(model.model.language_model.layers, router, mod_layers)
    theirs, ids, mask, pixels = _hf_logits(model, spec)
    for i in mod_layers:  # the reference below is exact only if the threshold rule keeps all tokens
        assert float(probs[i][mask.astype(bool)].min()) > 0.005

    config, params, info = pipeline.load_params(src)
    assert config.mod.layers == (1, 3) and info["layout"] == "gamma_mod"
    _assert_tree_matches_init(config, params, ids, pixels)
    ours_ids = np.where(ids == spec.image_token, config.image_token_index, ids)
    out = _flax_logits(config, params, ours_ids, mask, pixels, plan=RoutingPlan(mode="inference"))
    np.testing.assert_array_equal(np.asarray(out["mod_kept"]), np.asarray(out["mod_tokens"]))
    diff = _max_diff(out["logits"], theirs, mask)
    assert diff <= TOL, f"γ-MoD max |logit diff| {diff:.2e}"
    # Without the MLP scaling the outputs really differ: the comparison above is not vacuous.
    dense = _flax_logits(config, params, ours_ids, mask, pixels, plan=RoutingPlan(mode="dense"))
    assert _max_diff(dense["logits"], theirs, mask) > 100 * TOL
