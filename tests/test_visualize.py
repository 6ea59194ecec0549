"""`gmod_jax.visualize`: per-layer kept masks agree with the model's own skip counts, and the CLI
writes both figures for a tiny γ-MoD checkpoint."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

import gmod_jax
from gmod_jax import token_types as tt
from gmod_jax import visualize as V
from gmod_jax.api import Model
from tests.tiny_checkpoint import make_tiny_checkpoint

MOD_LAYERS = (1, 2)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    paths = make_tiny_checkpoint(tmp_path_factory.mktemp("vis"), mod_layers=MOD_LAYERS, num_samples=2)
    return paths, gmod_jax.load(str(paths["ckpt"]))


def _batch(model):
    """Two rows, the second right-padded (padding is forced in by the capacity rule but must
    never count as kept), official layout: system, image, question, answer."""
    cfg = model.config
    n = cfg.image_seq_length
    rng = np.random.default_rng(0)
    t = 4 + n + 8
    ids = rng.integers(5, cfg.text.vocab_size, size=(2, t)).astype(np.int32)
    ids[ids == cfg.image_token_index] = 5
    ids[:, 4:4 + n] = cfg.image_token_index
    types = np.full((2, t), tt.QUESTION, np.int32)
    types[:, :4], types[:, 4:4 + n], types[:, -3:] = tt.SYSTEM, tt.IMAGE, tt.ANSWER
    mask = np.ones((2, t), bool)
    mask[1, -2:] = False
    types[1, -2:] = tt.PAD
    ids[1, -2:] = cfg.pad_token_id
    px = rng.standard_normal((2, cfg.vision.image_size, cfg.vision.image_size, 3)).astype(np.float32)
    return ids, px, mask, types


@pytest.mark.parametrize("mode,rule", [("inference", "capacity"), ("inference", "threshold")])
def test_routing_masks_agree_with_forward(tiny, mode, rule):
    _, model = tiny
    model = Model(model.config.replace(mod=dataclasses.replace(model.config.mod, inference_routing=rule)),
                  model.params)
    ids, px, mask, types = _batch(model)
    masks = V.routing_masks(model, ids, px, mask, types, mode=mode)
    out = model.forward(ids, px, mask, types, mode=mode)
    assert masks.shape == (len(MOD_LAYERS), 2, ids.shape[1]) and masks.dtype == bool
    np.testing.assert_array_equal(masks.sum(axis=(1, 2)), out["mod_kept"])
    assert not masks[:, ~mask].any()  # padding is never kept
    if rule == "threshold":  # official rule: keep iff keep-prob > 0.005, any token may go
        return
    forced = ~np.isin(types, model.config.mod.routable_types) & mask
    assert masks[:, forced].all()  # question/answer tokens are masked out of routing
    routable = np.isin(types, model.config.mod.routable_types).sum(axis=1)
    np.testing.assert_array_equal(mask.sum(1) - masks.sum(axis=2), np.broadcast_to(routable // 2, (2, 2)))


def test_cli_writes_both_figures(tiny, capsys):
    paths, _ = tiny
    image = sorted((paths["data"].image_root / "images" / "eval").glob("*.png"))[0]
    out = paths["ckpt"].parent / "vis_out"
    argv = ["--ckpt", str(paths["ckpt"]), "--image", str(image), "--prompt", "How many shapes are there?",
            "--answer", "There are two shapes.", "--routing", "capacity", "--out", str(out)]
    assert V.main(argv) == 0
    for name in (V.PATCHES_PNG, V.TYPES_PNG):
        assert (out / name).stat().st_size > 5000
    summary = json.loads((out / V.SUMMARY_JSON).read_text())
    assert summary["mod_layers"] == list(MOD_LAYERS)
    assert set(summary["by_type"]) == {"system", "image", "question", "answer"}
    assert summary["by_type"]["question"]["overall"] == 0.0 and summary["by_type"]["answer"]["overall"] == 0.0
    # capacity rule: half of system + image tokens skipped in every MoD layer
    routable = summary["by_type"]["system"]["tokens"] + summary["by_type"]["image"]["tokens"]
    assert summary["skip_ratio_per_layer"] == [pytest.approx((routable // 2) / summary["seq_len"])] * 2
    assert len(summary["image_patch_skip_per_layer"]) == 2
    assert "wrote" in capsys.readouterr().out


def test_cli_rejects_dense_checkpoint(tmp_path, capsys):
    dense_cfg = gmod_jax.ModelConfig()  # never initialised: only config.json is read before failing
    ckpt = tmp_path / "dense"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(dense_cfg.to_json())
    assert V.main(["--ckpt", str(ckpt), "--image", "x.png", "--prompt", "q", "--out", str(tmp_path / "o")]) == 2
    assert "error" in capsys.readouterr().err
