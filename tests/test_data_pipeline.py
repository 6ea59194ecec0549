"""Data layer end to end: synthetic dataset, TFDS ArrayRecord build/read, Grain pipeline and resume."""

from __future__ import annotations

import dataclasses
import json
import re
import sys

import numpy as np
import pytest
from PIL import Image

from gmod_jax import token_types as tt
from gmod_jax.data import (ImageConfig, LlavaJsonSource, PipelineConfig, TooManyBadRecords, bad_record_stats, build_tfds, load_tokenizer, make_dataset,
                           open_tfds_source, read_records, synthetic_texts, tokenize_record, train_sentencepiece,
                           write_synthetic_dataset)
from gmod_jax.data import synthetic

IMG_TOKENS = 4
NUM_TRAIN, NUM_EVAL = 48, 12


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("syn"), num_train=NUM_TRAIN, num_eval=NUM_EVAL, seed=3)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    train_sentencepiece(synthetic_texts(300), d, vocab_size=512)
    return load_tokenizer(d)


def _config(tok, **kw):
    base = dict(batch_size=4, max_length=128, image_token_index=tok.image_token_id, image_seq_length=IMG_TOKENS,
                image=ImageConfig(image_size=28), shard_index=0, shard_count=1, seed=7)
    base.update(kw)
    return PipelineConfig(**base)


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# ---------------------------------------------------------------------------------------------
# Synthetic data

def test_synthetic_is_deterministic(tmp_path, syn):
    again = write_synthetic_dataset(tmp_path / "again", num_train=NUM_TRAIN, num_eval=NUM_EVAL, seed=3)
    for name in ("train_json", "eval_json", "train_captions_json", "eval_captions_json"):
        assert getattr(syn, name).read_bytes() == getattr(again, name).read_bytes()
    for rec in read_records(syn.train_json)[:10]:
        if "image" in rec:
            assert (syn.image_root / rec["image"]).read_bytes() == (again.image_root / rec["image"]).read_bytes()
    assert synthetic.make_sample(4, "train", 5) != synthetic.make_sample(3, "train", 5)
    train_scenes = [r.get("scene") for r in read_records(syn.train_json)]
    assert not any(r.get("scene") in train_scenes for r in read_records(syn.eval_json) if "scene" in r)


def _answer(question: str, scene: dict) -> str:
    """Recompute an answer from the scene description, independently of the generator."""
    objs = scene["objects"]
    words = synthetic.NUMBER_WORDS
    if m := re.fullmatch(r"What color is the (\w+)\?", question):
        (obj,) = [o for o in objs if o["shape"] == m[1]]
        return obj["color"]
    if m := re.fullmatch(r"How many (\w+)s are there\?", question):
        return words[sum(o["shape"] == m[1] for o in objs)]
    if m := re.fullmatch(r"How many (\w+) shapes are there\?", question):
        return words[sum(o["color"] == m[1] for o in objs)]
    if m := re.fullmatch(r"Is there an? (\w+) (\w+)\?", question):
        return "yes" if any((o["color"], o["shape"]) == (m[1], m[2]) for o in objs) else "no"
    if m := re.fullmatch(r"Is the (\w+) (\w+) on the left or the right\?", question):
        (obj,) = [o for o in objs if (o["color"], o["shape"]) == (m[1], m[2])]
        return "left" if obj["cx"] < scene["image_size"] / 2 else "right"
    if m := re.fullmatch(r"Is the (\w+) (\w+) at the top or the bottom\?", question):
        (obj,) = [o for o in objs if (o["color"], o["shape"]) == (m[1], m[2])]
        return "top" if obj["cy"] < scene["image_size"] / 2 else "bottom"
    if m := re.fullmatch(r"Which shape is at the (top|bottom)\?", question):
        key = (lambda o: o["cy"]) if m[1] == "top" else (lambda o: -o["cy"])
        return min(objs, key=key)["shape"]
    raise AssertionError(f"unexpected question {question!r}")


def test_synthetic_answers_follow_from_the_image(syn):
    records = read_records(syn.train_json)
    kinds = set()
    for rec in records:
        turns = rec["conversations"]
        if "image" not in rec:
            assert all("<image>" not in t["value"] for t in turns)
            continue
        scene = rec["scene"]
        pixels = np.asarray(Image.open(syn.image_root / rec["image"]).convert("RGB"))
        assert pixels.shape == (56, 56, 3)
        for obj in scene["objects"]:  # the scene description matches the drawn image
            assert tuple(pixels[int(obj["cy"]), int(obj["cx"])]) == synthetic.COLORS[obj["color"]]
        assert turns[0]["value"].startswith("<image>\n")
        for q, a in zip(turns[::2], turns[1::2]):
            question = q["value"].removeprefix("<image>\n")
            kinds.add(question.split()[0] + question.split()[1])
            assert a["value"] == _answer(question, scene), (rec["id"], question)
            assert len(a["value"].split()) == 1
    assert len(kinds) >= 5  # colour, counts, presence and position questions all occur
    caps = read_records(syn.train_captions_json)
    assert caps and all(c["conversations"][1]["value"].endswith(".") for c in caps)
    scene = {"objects": [{"shape": "circle", "color": "red", "row": 0, "col": 0},
                         {"shape": "square", "color": "blue", "row": 1, "col": 0},
                         {"shape": "square", "color": "blue", "row": 2, "col": 2}]}
    assert synthetic.caption(scene) == "A red circle and two blue squares."
    by_colour = synthetic.SyntheticConfig(colors=("blue", "red"), shapes=("square", "circle"), caption_order="colour")
    assert synthetic.caption(scene, by_colour) == "Two blue squares and a red circle."
    scene["objects"].append({"shape": "circle", "color": "blue", "row": 3, "col": 3})
    assert synthetic.caption(scene, by_colour) == "Two blue squares, a blue circle and a red circle."
    by_shape = dataclasses.replace(by_colour, caption_order="shape", shapes=("circle", "square"))
    assert synthetic.caption(scene, by_shape) == "A blue circle, a red circle and two blue squares."
    with pytest.raises(ValueError, match="caption_order"):
        synthetic.SyntheticConfig(caption_order="size")


def test_where_questions_follow_from_the_image_and_captions_say_where_groups_lie():
    where = synthetic.SyntheticConfig(grid=4, image_size=56, vertical_question="where", caption_positions=True)
    asked = 0
    for index in range(80):
        sample = synthetic.make_sample(5, "train", index, where)
        plain = synthetic.make_sample(5, "train", index, synthetic.SyntheticConfig(grid=4, image_size=56))
        assert sample.get("scene") == plain.get("scene")  # same scenes; only the wording differs
        for q, a in zip(sample["conversations"][::2], sample["conversations"][1::2]):
            question = q["value"].removeprefix("<image>\n")
            assert not question.startswith("Which shape")
            if "scene" in sample:
                assert a["value"] == _answer(question, sample["scene"]), (index, question)
                asked += question.endswith("at the top or the bottom?")
    assert asked >= 5

    def obj(shape, color, row, col):
        return {"shape": shape, "color": color, "row": row, "col": col}

    scene = {"grid": 4, "objects": [obj("circle", "red", 0, 0), obj("square", "blue", 1, 0), obj("square", "blue", 2, 2),
                                    obj("star", "green", 3, 1), obj("star", "green", 2, 0)]}
    assert synthetic.caption(scene, where) == ("A red circle at the top left, two blue squares and "
                                               "two green stars at the bottom left.")
    scene = {"grid": 3, "objects": [obj("circle", "red", 1, 0), obj("square", "blue", 0, 1), obj("star", "red", 1, 1),
                                    obj("square", "green", 0, 2)]}  # the middle row / column is neither side
    assert synthetic.caption(scene, where) == ("A blue square at the top, a green square at the top right, "
                                               "a red circle on the left and a red star.")
    with pytest.raises(ValueError, match="vertical_question"):
        synthetic.SyntheticConfig(vertical_question="middle")


def test_caption_shape_tally_starts_each_caption_with_every_shape_named_then_counted():
    tallied = synthetic.SyntheticConfig(grid=4, image_size=56, caption_shape_tally=True, answer_style="key")
    words = {w: n for n, w in enumerate(synthetic.NUMBER_WORDS)}
    seen_zero = seen_many = False
    for index in range(60):
        sample = synthetic.make_sample(3, "train", index, tallied)
        if "scene" not in sample:
            continue
        plain = synthetic.caption(sample["scene"], synthetic.SyntheticConfig(grid=4, image_size=56))
        tally, rest = sample["caption"].split(". ", 1)
        assert rest == plain  # the caption itself is unchanged; the tally precedes it
        said = dict(re.findall(r"(\w+): (\w+)", tally.lower()))
        present = {s: sum(o["shape"] == s for o in sample["scene"]["objects"]) for s in tallied.shapes}
        # every shape, in the order of `shapes`, zeros included, worded as the count question's answer
        assert list(said) == [synthetic._plural(s) for s in tallied.shapes], sample["caption"]
        assert {s: words[said[synthetic._plural(s)]] for s in tallied.shapes} == present, sample["caption"]
        for question, answer in zip(sample["conversations"][::2], sample["conversations"][1::2]):
            if question["value"].replace("<image>", "").strip().startswith("How many") and "shapes" not in question["value"]:
                assert answer["value"] in tally.lower()  # "circles: two" is said in the caption too
        seen_zero |= 0 in present.values()
        seen_many |= max(present.values()) > 1
    assert seen_zero and seen_many


def test_caption_tally_in_random_order_changes_only_the_order():
    fixed = synthetic.SyntheticConfig(grid=4, image_size=56, caption_shape_tally=True)
    shuffled = dataclasses.replace(fixed, caption_tally_order="random")
    orders = set()
    for index in range(40):
        a, b = synthetic.make_sample(5, "train", index, fixed), synthetic.make_sample(5, "train", index, shuffled)
        if "scene" not in a:
            continue
        assert a["conversations"] == b["conversations"] and a["scene"]["objects"] == b["scene"]["objects"]
        tally_a, rest_a = a["caption"].split(". ", 1)
        tally_b, rest_b = b["caption"].split(". ", 1)
        assert rest_a == rest_b
        assert sorted(tally_a.lower().split(", ")) == sorted(tally_b.lower().split(", "))  # the same counts
        orders.add(tuple(re.findall(r"(\w+):", tally_b.lower())))
    assert len(orders) > 3  # the order varies from scene to scene
    with pytest.raises(ValueError, match="caption_tally_order"):
        synthetic.SyntheticConfig(caption_tally_order="alphabetical")


def test_caption_shape_counts_start_each_caption_with_the_count_of_every_shape_present():
    counted = synthetic.SyntheticConfig(grid=4, image_size=56, caption_shape_counts=True)
    words = {w: n for n, w in enumerate(synthetic.NUMBER_WORDS)}
    for index in range(60):
        sample = synthetic.make_sample(2, "train", index, counted)
        if "scene" not in sample:
            continue
        plain = synthetic.caption(sample["scene"], synthetic.SyntheticConfig(grid=4, image_size=56))
        counts, rest = sample["caption"].split(". ")
        assert rest == plain  # the caption itself is unchanged; the counts precede it
        said = {}  # "Two circles, one square and one star" -> {circle: 2, square: 1, star: 1}
        for number, shape in re.findall(r"(\w+) (\w+?)s?(?=,| and|$)", counts):
            said[shape] = words[number.lower()]
        present = {s: sum(o["shape"] == s for o in sample["scene"]["objects"]) for s in counted.shapes}
        assert said == {s: n for s, n in present.items() if n}, sample["caption"]
        assert list(said) == [s for s in counted.shapes if s in said]  # in the order of `shapes`

    def obj(shape, color, row, col):
        return {"shape": shape, "color": color, "row": row, "col": col}

    scene = {"grid": 4, "objects": [obj("square", "blue", 0, 0), obj("circle", "red", 3, 3), obj("square", "green", 1, 2)]}
    assert synthetic.caption(scene, counted) == "One circle and two squares. A blue square, a green square and a red circle."


def test_key_answers_name_the_subject_of_the_same_questions():
    """answer_style="key" asks the same questions of the same scenes; each answer is the question's
    subject, a colon, then the single-word answer."""
    subjects = (r"What color is the (\w+)\?", r"How many (\w+|\w+ shapes) are there\?", r"Is there an? (\w+ \w+)\?",
                r"Is the (\w+ \w+) on the left or the right\?", r"Which shape is at the (top|bottom)\?")
    word, key = synthetic.SyntheticConfig(), synthetic.SyntheticConfig(answer_style="key")
    seen = 0
    for index in range(60):
        a, b = (synthetic.make_sample(3, "train", index, c) for c in (word, key))
        if "image" not in a:  # text-only samples keep their answers
            assert a == b
            continue
        assert a["scene"] == b["scene"] and a["conversations"][::2] == b["conversations"][::2]
        for q, w, k in zip(a["conversations"][::2], a["conversations"][1::2], b["conversations"][1::2]):
            question = q["value"].removeprefix("<image>\n")
            subject = next(m[1] for m in (re.fullmatch(p, question) for p in subjects) if m)
            assert k["value"] == f"{subject}: {w['value']}", question
            seen += 1
    assert seen > 60
    with pytest.raises(ValueError, match="answer_style"):
        synthetic.SyntheticConfig(answer_style="sentence")


def test_min_turns_sets_the_fewest_question_turns_per_image():
    """min_turns=max_turns gives (nearly) every image that many turns; the default min_turns=1
    still draws 1 to max_turns."""
    full = synthetic.SyntheticConfig(grid=4, min_turns=3, max_turns=3, text_only_fraction=0.0)
    turns = [len(synthetic.make_sample(2, "train", i, full)["conversations"]) // 2 for i in range(60)]
    assert turns.count(3) >= 48 and min(turns) >= 2  # a turn is lost when its kind has no question left
    default = synthetic.SyntheticConfig(grid=4, text_only_fraction=0.0)
    assert {len(synthetic.make_sample(2, "train", i, default)["conversations"]) // 2 for i in range(60)} == {1, 2, 3}
    for bad in (0, 4):
        with pytest.raises(ValueError, match="min_turns"):
            synthetic.SyntheticConfig(min_turns=bad, max_turns=3)


# ---------------------------------------------------------------------------------------------
# Grain pipeline

def test_resume_is_exact(syn, tok):
    source = LlavaJsonSource(syn.train_json, syn.image_root)
    cfg = _config(tok)
    it = iter(make_dataset(source, cfg, tok))
    first = [next(it) for _ in range(5)]
    state = json.loads(json.dumps(it.get_state()))  # checkpoints store it as JSON
    after = [next(it) for _ in range(3)]
    resumed = iter(make_dataset(source, cfg, tok))
    resumed.set_state(state)
    _assert_batches_equal(after, [next(resumed) for _ in range(3)])
    assert bad_record_stats(resumed)["seen"] == 32

    b = first[0]
    assert b["input_ids"].shape == (4, 128) and b["pixel_values"].shape == (4, 28, 28, 3)
    assert b["valid"].all() and (b["lengths"] == b["attention_mask"].sum(1)).all()
    img_rows = b["has_image"]
    assert ((b["token_types"] == tt.IMAGE).sum(1)[img_rows] == IMG_TOKENS).all()
    assert (b["input_ids"][b["token_types"] == tt.IMAGE] == tok.image_token_id).all()
    np.testing.assert_array_equal(b["loss_mask"], b["token_types"] == tt.ANSWER)
    # Infinite repetition with reshuffling: every record once per epoch, epochs in new orders.
    cfg1 = _config(tok, batch_size=1)
    seq = [next(it1)["input_ids"] for it1 in [iter(make_dataset(source, cfg1, tok))] for _ in range(2 * NUM_TRAIN)]
    epochs = [[tuple(s[0]) for s in seq[i * NUM_TRAIN:(i + 1) * NUM_TRAIN]] for i in range(2)]
    assert sorted(epochs[0]) == sorted(epochs[1]) and epochs[0] != epochs[1]


def test_sharding_splits_the_stream(syn, tok):
    source = LlavaJsonSource(syn.eval_json, syn.image_root)
    n = len(source)

    def rows(**kw):
        cfg = _config(tok, batch_size=1, num_epochs=1, shuffle=False, drop_remainder=False, **kw)
        return [tuple(b["input_ids"][0]) for b in make_dataset(source, cfg, tok)]

    everything = rows()
    assert len(everything) == n
    shards = [rows(shard_index=i, shard_count=3) for i in range(3)]
    assert [len(s) for s in shards] == [n // 3] * 3
    assert sorted(sum(shards, [])) == sorted(everything[: n // 3 * 3])
    assert shards[1] == everything[1::3][: n // 3]


def test_final_partial_batch_is_padded(syn, tok):
    source = LlavaJsonSource(syn.eval_json, syn.image_root)
    cfg = _config(tok, batch_size=5, num_epochs=1, drop_remainder=False, pad_final_batch=True)
    batches = list(make_dataset(source, cfg, tok))
    assert [b["valid"].sum() for b in batches] == [5, 5, len(source) - 10]
    assert all(b["input_ids"].shape[0] == 5 for b in batches)


def test_bad_records_skipped_then_fatal(tmp_path, syn, tok):
    records = read_records(syn.eval_json)
    image_records = [r for r in records if "image" in r]
    (tmp_path / "corrupt.png").write_bytes(b"garbage")
    records.append(dict(image_records[0], id="corrupt-1", image="corrupt.png"))
    (tmp_path / "data.json").write_text(json.dumps(records))
    for r in image_records:
        (tmp_path / r["image"]).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / r["image"]).write_bytes((syn.image_root / r["image"]).read_bytes())
    source = LlavaJsonSource(tmp_path / "data.json", tmp_path)

    cfg = _config(tok, batch_size=1, num_epochs=1, max_bad_fraction=0.1)
    it = iter(make_dataset(source, cfg, tok))
    ids = [b for b in it]
    assert len(ids) == len(records) - 1
    stats = bad_record_stats(it)
    assert stats["bad"] == 1 and "corrupt-1" in stats["bad_examples"][0] and "corrupt.png" in stats["bad_examples"][0]

    with pytest.raises(TooManyBadRecords, match="corrupt-1"):
        list(make_dataset(source, _config(tok, batch_size=1, num_epochs=1, max_bad_fraction=0.0), tok))


def test_plain_captions_through_pipeline(syn, tok):
    source = LlavaJsonSource(syn.train_captions_json, syn.image_root, template="plain")
    b = next(iter(make_dataset(source, _config(tok, template="plain", batch_size=2), tok)))
    types = b["token_types"][0]
    n = b["lengths"][0]
    assert types[0] == tt.SYSTEM and b["input_ids"][0, 0] == tok.bos_id
    assert (types[1:1 + IMG_TOKENS] == tt.IMAGE).all() and (types[1 + IMG_TOKENS:n] == tt.ANSWER).all()
    caption = tok.decode(b["input_ids"][0, 1 + IMG_TOKENS:n])
    assert re.fullmatch(r"[A-Z][a-z ,]+\.\n", caption), caption


# ---------------------------------------------------------------------------------------------
# TFDS ArrayRecord

def test_tfds_build_read_back_and_pipeline_equality(tmp_path, syn, tok):
    records = read_records(syn.train_json)
    records.insert(3, {"id": "missing-img", "image": "images/none.png", "conversations": records[0]["conversations"]})
    (tmp_path / "train.json").write_text(json.dumps(records))
    out = build_tfds(tmp_path / "tfds", "synthetic_v1", {"train": (tmp_path / "train.json", syn.image_root),
                                                         "eval": (syn.eval_json, syn.image_root)},
                     tok, max_bad_fraction=0.05)
    assert "tensorflow" not in sys.modules
    assert sorted(p.name for p in out.glob("*.array_record*"))

    source = open_tfds_source(tmp_path / "tfds", "synthetic_v1", split="train")
    meta = source.metadata
    assert meta["bad_records"]["train"]["num_bad"] == 1 and "missing-img" in meta["bad_records"]["train"]["bad_examples"][0]
    assert meta["tokenizer_fingerprint"] == tok.fingerprint and meta["pad_id"] == tok.pad_id
    good = [r for r in records if r["id"] != "missing-img"]
    assert len(source) == len(good)
    for i, rec in enumerate(good):  # stored in JSON order, equal to tokenising the JSON directly
        stored = source[i]
        expected = tokenize_record(rec, tok, "vicuna_v1")
        assert stored["id"] == rec["id"] and stored["has_image"] == ("image" in rec)
        np.testing.assert_array_equal(stored["input_ids"], expected.input_ids)
        np.testing.assert_array_equal(stored["token_types"], expected.token_types)
        np.testing.assert_array_equal(stored["loss_mask"], expected.loss_mask)
        if "image" in rec:
            assert stored["image"] == (syn.image_root / rec["image"]).read_bytes()

    import tensorflow_datasets as tfds

    by_name = tfds.data_source("llava_conversations/synthetic_v1", data_dir=str(tmp_path / "tfds"), split="eval")
    assert len(by_name) == NUM_EVAL

    # The same records through either source give identical batches.
    json_source = LlavaJsonSource(good, syn.image_root)
    cfg = _config(tok)
    from_json = make_dataset(json_source, cfg, tok)
    from_tfds = make_dataset(source, cfg, tok)
    _assert_batches_equal([b for b, _ in zip(from_json, range(4))], [b for b, _ in zip(from_tfds, range(4))])

    # A rebuild with the same name is reused, not regenerated; a different tokenizer is refused.
    assert build_tfds(tmp_path / "tfds", "synthetic_v1", {}, tok) == out
    other = train_sentencepiece(synthetic_texts(50), tmp_path / "other_tok", vocab_size=400)
    with pytest.raises(ValueError, match="rebuild"):
        make_dataset(source, cfg, other)


def test_tfds_build_fails_on_too_many_bad_records(tmp_path, syn, tok):
    records = read_records(syn.eval_json)[:4] + [{"id": f"bad-{i}", "conversations": []} for i in range(2)]
    (tmp_path / "r.json").write_text(json.dumps(records))
    with pytest.raises(TooManyBadRecords, match="bad-0"):
        build_tfds(tmp_path / "tfds", "broken", {"train": (tmp_path / "r.json", syn.image_root)}, tok)
    assert not list((tmp_path / "tfds" / "llava_conversations" / "broken").glob("*/dataset_info.json"))


def test_multiprocess_workers_resume_and_match(syn, tok, tmp_path):
    # One spawned worker (the 2-core CI budget): same batches as in-process, exact resume. The
    # TFDS build also runs its encoding in a worker pool here.
    out = build_tfds(tmp_path / "tfds", "mp", {"train": (syn.eval_json, syn.image_root)}, tok, num_workers=1)
    source = open_tfds_source(out, split="train")
    reference = [b for b, _ in zip(make_dataset(source, _config(tok), tok), range(4))]
    ds = make_dataset(source, _config(tok, worker_count=1), tok)
    it = iter(ds)
    try:
        first = [next(it) for _ in range(2)]
        state = it.get_state()
        rest = [next(it) for _ in range(2)]
        _assert_batches_equal(first + rest, reference)
    finally:
        it.close()
    resumed = iter(ds)
    try:
        resumed.set_state(state)
        _assert_batches_equal([next(resumed) for _ in range(2)], rest)
    finally:
        resumed.close()


def test_config_checks_and_cli(tmp_path, syn, tok):
    from gmod_jax import config as model_config
    from gmod_jax.data.__main__ import main

    cfg = PipelineConfig.for_model(model_config.tiny(), batch_size=2, max_length=64)
    assert (cfg.image.image_size, cfg.image_seq_length, cfg.image_token_index) == (28, 4, 127)
    assert cfg.resolved_buckets == (64,)
    with pytest.raises(ValueError, match="template"):
        make_dataset(LlavaJsonSource(syn.eval_json, syn.image_root), _config(tok, template="plain"), tok)

    out = main(["synthetic", "--out", str(tmp_path / "s"), "--num-train", "6", "--num-eval", "2",
                "--tokenizer-out", str(tmp_path / "t"), "--vocab-size", "400"])
    assert out["image_token_id"] == 4 and len(read_records(out["train_json"])) == 6
    built = main(["build-tfds", "--data-dir", str(tmp_path / "tfds"), "--name", "cli", "--tokenizer", str(tmp_path / "t"),
                  "--split", f"train={out['train_json']}:{out['image_root']}"])
    assert len(open_tfds_source(built["dataset_dir"], split="train")) == 6


def test_group_by_modality_makes_homogeneous_batches(tmp_path, tok):
    """Text-only rows switch MoD skipping off for a whole batch (static capacity is the batch
    minimum), so grouped batches must hold one modality; every record still appears once."""
    data = write_synthetic_dataset(tmp_path / "mixed", num_train=40, num_eval=4, seed=5,
                                   config=synthetic.SyntheticConfig(text_only_fraction=0.3))
    source = LlavaJsonSource(data.train_json, data.image_root)
    flags = source.has_image_flags()
    assert 0 < flags.count(False) < len(flags)
    for shards in (1, 2):
        image_rows = rows = 0
        for index in range(shards):
            cfg = _config(tok, batch_size=2, num_epochs=1, group_by_modality=True, shard_index=index,
                          shard_count=shards, drop_remainder=False)
            batches = list(make_dataset(source, cfg, tok))
            mixed = [b for b in batches if len(set(b["has_image"][b["valid"]].tolist())) > 1]
            assert len(mixed) <= 1  # only the epoch's final leftover group may mix modalities
            rows += sum(int(b["valid"].sum()) for b in batches)
            image_rows += sum(int(b["has_image"][b["valid"]].sum()) for b in batches)
        if shards == 1:  # one epoch: every record exactly once
            assert (rows, image_rows) == (len(flags), flags.count(True))
    cfg = _config(tok, batch_size=2, group_by_modality=True)
    it = iter(make_dataset(source, cfg, tok))
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it)["input_ids"] for _ in range(3)]
    resumed = iter(make_dataset(source, cfg, tok))
    resumed.set_state(state)
    for e in expected:
        np.testing.assert_array_equal(next(resumed)["input_ids"], e)
