"""ARank and `convert.to_mod` on a LLaVA-HR stage-1 checkpoint, as the paper does (ARank on the
stage-1 model, then MoD layers for SFT): a tiny LLaVA-HR at its stage-1 geometry (S = 32 is the
384 branch: slow grid upsampled to the fast grid; no MR-adapters), with a real SentencePiece
tokenizer, through `python -m gmod_jax.arank` and `python -m convert.to_mod --arank`, then the
γ-MoD result loaded and run."""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest

import gmod_jax
from convert import to_mod
from gmod_jax import config as C
from gmod_jax import sharding as shd
from gmod_jax import token_types as tt
from gmod_jax.arank import cli as arank_cli
from gmod_jax.data.images import image_config_for
from gmod_jax.data.llava_json import encode_prompt
from gmod_jax.data.tokenizer import load_tokenizer
from gmod_jax.models.llava import LlavaModel
from tests.test_arank_cli import _self_attending
from tests.tiny_checkpoint import make_tiny_checkpoint

STAGE1_SIZE = 32  # tiny_hr's stage-1 geometry (LLaVA-HR's S = 384)


@pytest.fixture(scope="module")
def hr_stage1(tmp_path_factory):
    root = tmp_path_factory.mktemp("hr_stage1")
    vision = dataclasses.replace(C.tiny_hr(STAGE1_SIZE).vision, latent_adapters=False)
    return make_tiny_checkpoint(root, num_samples=4, transform_params=_self_attending, vision=vision)


def _prompt(model, paths):
    record = json.loads(paths["data"].eval_json.read_text())[0]
    question = next(t["value"] for t in record["conversations"] if t["from"] == "human")
    return encode_prompt(question.replace("<image>", "").strip(), load_tokenizer(model.path),
                         image=paths["data"].image_root / record["image"], image_cfg=image_config_for(model.config),
                         image_token_index=model.config.image_token_index,
                         image_seq_length=model.config.image_seq_length)


@pytest.mark.slow
def test_arank_then_to_mod_on_llava_hr_stage1(hr_stage1, tmp_path):
    paths = hr_stage1
    stage1 = gmod_jax.load(paths["ckpt"])
    assert stage1.config.vision.tower == "multipath" and "adapters" not in stage1.params["vision"]
    # Preprocessing follows the checkpoint: S x S pixels, not the CLIP's native size.
    assert image_config_for(stage1.config).image_size == STAGE1_SIZE != stage1.config.vision.image_size

    out = tmp_path / "arank"
    assert arank_cli.main(["--ckpt", str(paths["ckpt"]), "--data", str(paths["data"].eval_json), "--images",
                           str(paths["data"].image_root), "--num-samples", "3", "--num-dense", "2",
                           "--out", str(out)]) == 0
    report = json.loads((out / "arank.json").read_text())
    assert report["num_layers"] == 4 and report["num_samples"] == 3
    # The self-attending layers 2 and 3 have the lowest ARank: they become the MoD layers.
    assert report["mod_layers"] == [2, 3] and max(report["per_layer_mean"][2:]) < min(report["per_layer_mean"][:2])

    mod_dir = tmp_path / "mod"
    assert to_mod.main(["--src", str(paths["ckpt"]), "--out", str(mod_dir), "--arank", str(out / "arank.json")]) == 0
    mod = gmod_jax.load(mod_dir)
    assert mod.config.mod.layers == (2, 3) and mod.config.vision == stage1.config.vision
    flat_mod = dict(jax.tree_util.tree_flatten_with_path(mod.params)[0])
    flat_dense = dict(jax.tree_util.tree_flatten_with_path(stage1.params)[0])
    assert set(flat_mod) - set(flat_dense) == {next(k for k in flat_mod if "mod_router" in str(k))}
    for key, value in flat_dense.items():
        np.testing.assert_array_equal(np.asarray(flat_mod[key]), np.asarray(value))

    x = _prompt(mod, paths)
    ids, types, px = x["input_ids"][None], x["token_types"][None], x["pixel_values"][None]
    assert px.shape[1:] == mod.config.pixel_shape
    # Run dense, the γ-MoD model is the stage-1 model: the router only acts in routed layers.
    np.testing.assert_array_equal(mod.forward(ids, px, token_types=types, mode="dense")["logits"],
                                  stage1.logits(ids, px, token_types=types))
    # Trained routing skips floor(ratio x (system + image)) tokens in every MoD layer.
    out_train = mod.forward(ids, px, token_types=types, mode="train")
    routable = int(np.isin(types, (tt.SYSTEM, tt.IMAGE)).sum())
    skipped = out_train["mod_tokens"] - out_train["mod_kept"]
    assert routable == x["token_types"].tolist().index(tt.IMAGE) + mod.config.image_seq_length
    np.testing.assert_array_equal(skipped, [routable // 2] * 2)
    assert np.isfinite(out_train["logits"]).all() and np.isfinite(out_train["router_loss"])

    # SFT (configs/gamma_mod_llava_hr_7b.py with init_from = this checkpoint) runs at the full
    # size with the MR-adapters: every leaf of the checkpoint fits the SFT model as it is (the
    # position table keeps its native rows whatever S), and only the adapters start fresh.
    sft = mod.config.replace(vision=dataclasses.replace(C.tiny_hr().vision, latent_adapters=True))
    sft_shapes = jax.eval_shape(lambda k: LlavaModel(sft).init(k, method=LlavaModel.declare_params)["params"],
                                jax.random.key(0))
    flat_sft = {shd.path_str(k): v.shape for k, v in jax.tree_util.tree_flatten_with_path(sft_shapes)[0]}
    flat_ckpt = {shd.path_str(k): v.shape for k, v in flat_mod.items()}
    assert all(flat_sft[k] == shape for k, shape in flat_ckpt.items())
    assert set(flat_sft) - set(flat_ckpt) and all(k.startswith("vision/adapters/") for k in set(flat_sft) - set(flat_ckpt))
