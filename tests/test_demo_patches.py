"""Issue 26's measurement: scenes' per-patch object maps and the background/object skip shares."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gmod_jax.data.synthetic import SyntheticConfig, make_sample, patch_object_map, render_scene
from demo import pipeline as demo
from demo.patches import patch_skip_shares

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo_default.py"


def test_patch_map_of_a_hand_placed_square():
    # 32 px, 4x4 patches of 8 px; a square of half-side 0.85 * 6.47 = 5.5 around (12, 20): pixels
    # 6.5..17.5 across (patch columns 0-2) and 14.5..25.5 down (patch rows 1-3), clear of any edge.
    scene = {"image_size": 32, "grid": 2, "background": [240, 240, 240],
             "objects": [{"shape": "square", "color": "red", "size": "large", "row": 0, "col": 0,
                          "cx": 12.0, "cy": 20.0, "r": 6.47}]}
    expected = np.zeros((4, 4), bool)
    expected[1:4, 0:3] = True
    np.testing.assert_array_equal(patch_object_map(scene, 4), expected)


def test_recorded_patch_maps_match_the_drawn_pixels():
    cfg = SyntheticConfig(image_size=112, grid=4, patch_grid=8, max_objects=4, text_only_fraction=0.0)
    background = []
    for i in range(30):
        scene = make_sample(0, "eval", i, cfg)["scene"]
        pixels = np.asarray(render_scene(scene)).astype(int)
        recorded = np.asarray(scene["patch_objects"])
        assert recorded.shape == (8, 8)
        for r in range(8):  # oracle: a patch is an object patch iff one of its pixels is not background
            for c in range(8):
                patch = pixels[14 * r:14 * r + 14, 14 * c:14 * c + 14]
                assert recorded[r, c] == bool((patch != scene["background"]).any()), (i, r, c)
        for o in scene["objects"]:  # each shape lies under (part of) its cell's 2x2 block of patches
            block = recorded[2 * o["row"]:2 * o["row"] + 2, 2 * o["col"]:2 * o["col"] + 2]
            assert block.sum() >= 2
        assert recorded.sum() <= 4 * len(scene["objects"])
        background.append(1.0 - recorded.mean())
    assert 0.75 < np.mean(background) < 0.95  # mostly uniform background, as issue 26 asks


def test_scenes_without_patch_grid_carry_no_map_and_draw_the_same():
    plain = make_sample(0, "train", 3, SyntheticConfig(image_size=112, grid=4, text_only_fraction=0.0))
    mapped = make_sample(0, "train", 3, SyntheticConfig(image_size=112, grid=4, patch_grid=8, text_only_fraction=0.0))
    assert "patch_objects" not in plain["scene"]
    assert {k: v for k, v in mapped["scene"].items() if k != "patch_objects"} == plain["scene"]
    assert mapped["conversations"] == plain["conversations"]
    with pytest.raises(ValueError, match="patch_grid"):
        SyntheticConfig(image_size=56, patch_grid=5)


def _oracle(kept, objects):
    """Loop-by-loop counts of the same quantities, per layer."""
    out = []
    for layer in kept:
        s_bg = s_obj = n_bg = n_obj = 0
        for img, obj in zip(layer, objects):
            for k, o in zip(img.ravel(), obj.ravel()):
                n_obj += o
                n_bg += not o
                s_obj += (not k) and o
                s_bg += (not k) and not o
        out.append((s_bg / n_bg, s_obj / n_obj, (s_bg + s_obj) / (n_bg + n_obj), s_bg / (s_bg + s_obj)))
    return out


def test_skip_shares_against_a_hand_made_mask():
    objects = np.array([[[True, False], [False, False]],  # image 0: one object patch of four
                        [[True, True], [False, False]]])  # image 1: two
    kept = np.array([
        # layer A: skips all 5 background patches and 1 of the 3 object patches
        [[[True, False], [False, False]], [[False, True], [False, False]]],
        # layer B: skips 2 background patches only
        [[[True, True], [False, True]], [[True, True], [False, True]]],
    ])
    got = patch_skip_shares(kept, objects)
    a, b = got["per_layer"]
    assert (a["skipped_background"], a["skipped_objects"]) == (5, 1)
    assert a["background_skipped"] == 1.0 and a["object_skipped"] == pytest.approx(1 / 3)
    assert a["image_skipped"] == 0.75 and a["background_share"] == pytest.approx(5 / 6)
    assert (b["skipped_background"], b["skipped_objects"]) == (2, 0) and b["background_share"] == 1.0
    o = got["overall"]
    assert (o["background"], o["objects"], o["skipped_background"], o["skipped_objects"]) == (10, 6, 7, 1)
    assert o["image_skipped"] == 0.5 and o["background_share"] == 7 / 8
    for e, (bg, obj, img, share) in zip(got["per_layer"], _oracle(kept, objects)):
        assert (e["background_skipped"], e["object_skipped"], e["image_skipped"]) == pytest.approx((bg, obj, img))
        assert e["background_share"] == pytest.approx(share)


def test_skip_shares_match_the_oracle_on_random_masks():
    rng = np.random.default_rng(0)
    objects = rng.random((5, 8, 8)) < 0.2
    kept = rng.random((3, 5, 8, 8)) < 0.6
    got = patch_skip_shares(kept, objects)
    for e, want in zip(got["per_layer"], _oracle(kept, objects)):
        assert (e["background_skipped"], e["object_skipped"], e["image_skipped"], e["background_share"]) \
            == pytest.approx(want)
    # nothing skipped: no background share to speak of; a shape mismatch is refused
    assert patch_skip_shares(np.ones((1, 5, 8, 8), bool), objects)["overall"]["background_share"] is None
    with pytest.raises(ValueError, match="disagree"):
        patch_skip_shares(kept, objects[:, :4])


def test_patch_criterion_needs_both_the_skip_and_the_background_share():
    cfg = demo.load_config(DEFAULT_CONFIG)

    def verdict(image_skipped, share):
        return demo.patch_criteria(cfg, {"overall": {"image_skipped": image_skipped, "background_share": share,
                                                     "background_skipped": 0.5, "object_skipped": 0.1}})[0]["ok"]

    assert verdict(0.5, 0.95) and not verdict(0.3, 0.95) and not verdict(0.5, 0.8) and not verdict(0.0, None)
    assert demo.patch_criteria(cfg, None) == []


def test_default_config_sees_each_scene_patch_as_one_image_token():
    cfg = demo.load_config(DEFAULT_CONFIG)
    v = cfg.model.vision
    assert v.image_size // v.patch_size == cfg.synthetic.patch_grid == 8
    assert cfg.synthetic.image_size == v.image_size and cfg.synthetic.grid == 4  # 2x2 patches per cell
    assert cfg.dense_train.data.max_length >= 33 + 64 and cfg.finetune.data.max_length == cfg.dense_train.data.max_length


def test_default_config_bucket_holds_every_conversation_whole(tmp_path):
    """The question stage pads to one bucket; a conversation longer than it would lose its last
    answers to truncation, so the bucket must hold the longest one the default draws (five turns:
    201 tokens measured on the 10,000 training conversations of seeds 0-2)."""
    from gmod_jax.data.llava_json import tokenize_record
    from gmod_jax.data.synthetic import synthetic_texts
    from gmod_jax.data.tokenizer import expand_image_placeholder, train_sentencepiece

    cfg = demo.load_config(DEFAULT_CONFIG)
    tok = train_sentencepiece(synthetic_texts(cfg.tokenizer_texts, 0, cfg.synthetic), tmp_path / "tok",
                              vocab_size=cfg.vocab_size)
    lengths, turns = [], []
    for i in range(1500):
        sample = make_sample(0, "train", i, cfg.synthetic)
        record = {"image": sample.get("image"), "conversations": sample["conversations"]}
        encoded = tokenize_record(record, tok, demo.TEMPLATE)
        lengths.append(len(expand_image_placeholder(encoded, tok.image_token_id, cfg.model.image_seq_length).input_ids))
        turns.append(len(sample["conversations"]) // 2)
    assert max(lengths) <= cfg.dense_train.data.max_length == cfg.finetune.data.max_length
    assert max(lengths) > cfg.dense_train.data.max_length - 16  # nor a 16-token step of padding past it
    assert max(turns) == cfg.synthetic.max_turns


def test_redundancy_start_ranks_the_odd_tokens_above_the_many_alike():
    from demo.router_probes import (object_over_background, redundancy_direction,
                                             router_kernel_from_direction)

    rng = np.random.default_rng(1)
    d = 16
    common, odd = rng.normal(size=d), rng.normal(size=(4, d))
    # 12 near-copies of one vector (background) and 4 distinct ones (objects) per image
    inputs = np.concatenate([common + 0.05 * rng.normal(size=(12, d)), odd])[None]
    objects = np.array([[False] * 12 + [True] * 4])
    direction = redundancy_direction(inputs, np.ones((1, 16), bool))
    assert np.linalg.norm(direction) == pytest.approx(1.0)
    kernel = router_kernel_from_direction(direction, np.zeros((d, 2), np.float32))
    margin = inputs[0] @ (kernel[:, 1] - kernel[:, 0]).astype(np.float64)
    assert object_over_background(margin[None], objects) == 1.0  # every object above all background
    assert object_over_background(-margin[None], objects) == 0.0
    assert object_over_background(margin[None], np.zeros((1, 16), bool)) is None  # no object: no pairs
    with pytest.raises(ValueError, match="router kernel"):
        router_kernel_from_direction(direction, np.zeros((3, d, 2), np.float32))

    # Fitted on the image tokens alone: a system prompt in front of them (any vectors) does not
    # move the direction, and its tokens' place among the image tokens' scores is left open.
    system = rng.normal(size=(1, 5, d)) * 3
    with_system = np.concatenate([system, inputs], axis=1)
    image = np.array([[False] * 5 + [True] * 16])
    np.testing.assert_allclose(redundancy_direction(with_system, image), direction, rtol=1e-12)
    assert not np.allclose(redundancy_direction(with_system, np.ones((1, 21), bool)), direction)
    with pytest.raises(ValueError, match="no image tokens"):
        redundancy_direction(with_system, np.zeros((1, 21), bool))
