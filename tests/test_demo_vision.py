"""The demo's vision-tower pretraining (demo.vision): labels, learning, the checkpoint."""

from __future__ import annotations

import numpy as np
import pytest

import gmod_jax
from gmod_jax import config as C
from gmod_jax.api import init_random
from gmod_jax.data.synthetic import SyntheticConfig, write_synthetic_dataset
from demo.vision import (VisionPretrainConfig, attribute_labels, cell_labels, content_accuracy, load_split,
                         num_cell_classes, pretrain_vision, token_cells, vision_stage)

SYN = SyntheticConfig(image_size=28, grid=2, min_objects=1, max_objects=3, shapes=("circle", "square"),
                      colors=("red", "blue", "green"), max_turns=1, text_only_fraction=0.0)
MODEL = C.ModelConfig(
    vision=C.VisionConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, image_size=28,
                          patch_size=7, feature_layer=-1),
    text=C.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                       num_kv_heads=2, max_position_embeddings=64))


def test_cell_labels_encode_every_combination_distinctly_and_empty_as_zero():
    seen = set()
    for shape in SYN.shapes:
        for color in SYN.colors:
            for size in ("small", "large"):
                scene = {"objects": [{"shape": shape, "color": color, "size": size, "row": 1, "col": 0}]}
                labels = cell_labels(scene, SYN)
                assert labels[[0, 1, 3]].tolist() == [0, 0, 0]
                seen.add(int(labels[2]))
    assert seen == set(range(1, num_cell_classes(SYN)))


def test_attribute_labels_name_the_shape_colour_and_size_of_each_class():
    for shape in SYN.shapes:
        for color in SYN.colors:
            for size in ("small", "large"):
                scene = {"objects": [{"shape": shape, "color": color, "size": size, "row": 0, "col": 1}]}
                labels = np.concatenate([cell_labels(scene, SYN), [-1]])  # -1: a CLS token, no label
                parts = attribute_labels(labels, SYN)
                assert parts["shape"].tolist() == [0, 1 + SYN.shapes.index(shape), 0, 0, -1]
                assert parts["colour"].tolist() == [0, 1 + SYN.colors.index(color), 0, 0, -1]
                assert parts["size"].tolist() == [0, 1 + ("small", "large").index(size), 0, 0, -1]


def test_content_accuracy_reports_object_tokens_apart_from_the_empty_ones():
    labels = np.array([[0, 0, 0, 5, -1],   # image 0: three empty tokens, one shape, a CLS token
                       [2, 0, 7, 0, -1]])  # image 1: two shapes
    right = np.array([[True, True, True, False, False],
                      [True, True, False, True, False]])
    acc = content_accuracy(right, labels)
    assert acc["heldout_token_accuracy"] == pytest.approx(6 / 8)  # the CLS tokens carry no label
    assert acc["heldout_object_token_accuracy"] == pytest.approx(1 / 3)
    assert acc["heldout_image_accuracy"] == 0.0
    assert content_accuracy(right, np.where(labels > 0, 0, labels))["heldout_object_token_accuracy"] is None


def test_each_patch_token_is_labelled_with_the_cell_under_its_centre():
    # 28 px, patch 7: a 4x4 token grid over a 2x2 cell grid, two token rows/columns per cell.
    assert token_cells(MODEL, SYN).reshape(4, 4).tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]
    # 56 px, patch 8, grid 2: token centres 4, 12, 20 fall in cell 0; 28 is the border; 36.. in cell 1.
    v = MODEL.vision.__class__(hidden_size=8, intermediate_size=8, num_layers=1, num_heads=1, image_size=56,
                               patch_size=8, feature_strategy="full")
    syn = SyntheticConfig(image_size=56, grid=2)
    cells = token_cells(MODEL.replace(vision=v), syn)
    assert cells[0] == -1 and cells[1:8].tolist() == [0, 0, 0, 1, 1, 1, 1] and cells[-1] == 3


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("vision_data")
    return write_synthetic_dataset(root, 160, 40, 0, SYN), root


def test_pretraining_learns_the_cells_and_only_touches_the_tower(dataset, tmp_path):
    import json

    ds, root = dataset
    train = load_split(json.loads(ds.train_json.read_text()), root, MODEL, SYN)
    heldout = load_split(json.loads(ds.eval_json.read_text()), root, MODEL, SYN)
    assert train[0].shape == (160, 28, 28, 3) and train[1].shape == (160, 16)
    model = init_random(MODEL, seed=3)
    cfg = VisionPretrainConfig(steps=60, batch=32, lr=3e-3, warmup_steps=5)
    vision, stats = pretrain_vision(MODEL, model.params["vision"], train, heldout, cfg, SYN, echo=lambda s: None)
    assert stats["loss"][-1][1] < 0.5 * stats["loss"][0][1]
    assert stats["heldout_token_accuracy"] > _majority_accuracy(train, heldout) + 0.05
    assert stats["heldout_object_token_accuracy"] is not None

    out = vision_stage(MODEL, cfg, SYN, ds.train_json, ds.eval_json, root, tmp_path / "ckpt", None, seed=3,
                       echo=lambda s: None)
    assert out["heldout_token_accuracy"] == pytest.approx(stats["heldout_token_accuracy"])
    saved = gmod_jax.load(str(tmp_path / "ckpt"))
    for a, b in zip(*(jax_leaves(t) for t in (saved.params["vision"], vision))):
        np.testing.assert_array_equal(a, b)
    for part in ("llm", "projector"):  # the rest is the plain random init of that seed
        for a, b in zip(*(jax_leaves(t) for t in (saved.params[part], model.params[part]))):
            np.testing.assert_array_equal(a, b)


def _majority_accuracy(train, heldout) -> float:
    """Held-out accuracy of always answering the most common training label of each token position."""
    return float(np.mean([np.mean(heldout[1][:, t] == np.bincount(train[1][:, t]).argmax())
                          for t in range(train[1].shape[1])]))


def _pretrain_tiny(dataset, **labels):
    """60 steps on the tiny dataset with the given label options; (stats, train, heldout)."""
    import json

    ds, root = dataset
    train = load_split(json.loads(ds.train_json.read_text()), root, MODEL, SYN)
    heldout = load_split(json.loads(ds.eval_json.read_text()), root, MODEL, SYN)
    cfg = VisionPretrainConfig(steps=60, batch=32, lr=3e-3, warmup_steps=5, **labels)
    _, stats = pretrain_vision(MODEL, init_random(MODEL, seed=3).params["vision"], train, heldout, cfg, SYN,
                               echo=lambda s: None)
    return stats, train, heldout


def test_position_labels_make_every_token_name_its_row_and_column(dataset):
    """With `position_labels` the features also carry where a patch lies (what LLaVA's CLIP
    features keep and a content-only read-out lets the tower drop)."""
    stats, _, _ = _pretrain_tiny(dataset, position_labels=True)
    assert stats["heldout_position_accuracy"] > 0.9  # 4 places: chance is 25%


def test_attribute_labels_are_learnt_beside_the_content(dataset):
    stats, train, heldout = _pretrain_tiny(dataset, attribute_labels=True)
    # Shape, colour and size all right, more often than the majority baseline gets the content right.
    assert stats["heldout_attribute_accuracy"] > _majority_accuracy(train, heldout) + 0.05, stats


def jax_leaves(tree):
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="steps"):
        VisionPretrainConfig(steps=0)
