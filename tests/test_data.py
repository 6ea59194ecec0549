"""Data layer units: templates, tokenizers, token-type layout, image preprocessing, bad records, padding."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
from PIL import Image

from gmod_jax import token_types as tt
from gmod_jax.data import (IGNORE_INDEX, IMAGE_PLACEHOLDER, BadRecord, ImageConfig, LlavaJsonSource,
                           SentencePieceTokenizer, TooManyBadRecords, encode_example, encode_prompt, load_tokenizer,
                           pad_to_bucket, preprocess_image, render_conversation, render_prompt, segments_text,
                           synthetic_texts, to_nchw, train_sentencepiece)
from gmod_jax.data.templates import VICUNA_V1

SYSTEM = VICUNA_V1.system
IMG_TOKENS = 8


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("sp")
    train_sentencepiece(synthetic_texts(300), d, vocab_size=512)
    return d


@pytest.fixture(scope="module")
def tok(sp_dir):
    return load_tokenizer(sp_dir)


@pytest.fixture(scope="module")
def legacy_tok(sp_dir):
    # Same vocabulary, HF legacy behaviour ("</s>USER" -> "▁USER"), under which LLaVA's own
    # round-length target masking is exact and can serve as the oracle.
    return SentencePieceTokenizer((sp_dir / "tokenizer.model").read_bytes(), pad_id=3, legacy=True)


def test_checkpoint_copy_keeps_the_tokenizer_as_trained(sp_dir, tok, tmp_path):
    """A checkpoint's tokenizer (what eval and generation load) must tokenise as training did:
    the special ids and the non-legacy whitespace live in special_tokens.json beside the model."""
    from gmod_jax.checkpoint import copy_tokenizer_files

    copy_tokenizer_files(sp_dir, tmp_path)
    copied = load_tokenizer(tmp_path)
    text = f"USER: {IMAGE_PLACEHOLDER}\nIs there a red circle? ASSISTANT: yes</s>USER: How many?"
    assert copied.fingerprint == tok.fingerprint and copied.pad_id == tok.pad_id
    assert list(copied.encode(text)) == list(tok.encode(text))


def _conv(*turns):
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(turns)]


# ---------------------------------------------------------------------------------------------
# Templates

def test_vicuna_v1_render_matches_llava_prompt():
    conv = _conv("What color is the circle?\n<image>", "red", "How many squares are there?", "two")
    segs = render_conversation(conv, "vicuna_v1", has_image=True)
    expected = (SYSTEM + " USER: <image>\nWhat color is the circle? ASSISTANT: red</s>"
                "USER: How many squares are there? ASSISTANT: two</s>")
    assert segments_text(segs) == expected
    assert [(s.text, s.token_type, s.has_loss) for s in segs] == [
        (SYSTEM + " USER: ", tt.SYSTEM, False),
        ("<image>", tt.IMAGE, False),
        ("\nWhat color is the circle? ASSISTANT:", tt.QUESTION, False),
        (" red</s>", tt.ANSWER, True),
        ("USER: How many squares are there? ASSISTANT:", tt.QUESTION, False),
        (" two</s>", tt.ANSWER, True),
    ]


def test_vicuna_v1_image_left_in_place():
    conv = _conv("What color is the circle?\n<image>", "red")
    segs = render_conversation(conv, "vicuna_v1", has_image=True, move_image_to_front=False)
    assert segments_text(segs) == SYSTEM + " USER: What color is the circle?\n<image> ASSISTANT: red</s>"
    # Everything before the first image is the routable system prefix, as infer_token_types assumes.
    assert [s.token_type for s in segs] == [tt.SYSTEM, tt.IMAGE, tt.QUESTION, tt.ANSWER]


def test_plain_template_and_text_only():
    segs = render_conversation(_conv("<image>\nDescribe the image briefly.", "A red circle."), "plain")
    assert segments_text(segs) == "<image>A red circle.\n"
    assert [(s.token_type, s.has_loss) for s in segs] == [(tt.IMAGE, False), (tt.ANSWER, True)]

    segs = render_conversation(_conv("What is two plus two?", "four"), "vicuna_v1")
    assert segments_text(segs) == SYSTEM + " USER: What is two plus two? ASSISTANT: four</s>"
    assert [s.token_type for s in segs] == [tt.TEXT, tt.ANSWER]


def test_prompt_rendering():
    segs = render_prompt("<image>\nIs there a red star?", "vicuna_v1")
    assert segments_text(segs) == SYSTEM + " USER: <image>\nIs there a red star? ASSISTANT:"
    assert segs[-1].token_type == tt.QUESTION and not any(s.has_loss for s in segs)
    multi = render_prompt(_conv("<image>\nA?", "yes", "B?"), "vicuna_v1")
    assert segments_text(multi).endswith("ASSISTANT: yes</s>USER: B? ASSISTANT:")
    assert segments_text(render_prompt("<image>\nDescribe.", "plain")) == "<image>"


@pytest.mark.parametrize("conv, reason", [
    ([], "non-empty"),
    (_conv("<image>\nQ?", "A", "Q2?")[:1], "no answered"),
    ([{"from": "human", "value": "<image>\nQ"}, {"from": "human", "value": "Q"}], "alternate"),
    ([{"from": "robot", "value": "<image>"}, {"from": "gpt", "value": "A"}], "unknown role"),
    (_conv("<image>\n<image>\nQ?", "A"), "2 <image> tags"),
    (_conv("Q?", "A"), "0 <image> tags"),
    ([{"from": "human"}], "not a"),
])
def test_malformed_conversations_raise_bad_record(conv, reason):
    with pytest.raises(BadRecord, match=reason) as info:
        render_conversation(conv, "vicuna_v1", has_image=True, record_id="rec-7")
    assert info.value.record_id == "rec-7"


# ---------------------------------------------------------------------------------------------
# Tokenizers and token types

def _llava_v1_targets(conversation: str, tok, ids: np.ndarray) -> np.ndarray:
    """LLaVA's `preprocess_v1` round-length target masking (the oracle)."""
    def n_tokens(text):
        return len(tok.tokenizer_image_token(text))

    target = ids.copy()
    target[:1] = IGNORE_INDEX
    cur = 1
    sep = " ASSISTANT: "
    for rou in conversation.split("</s>"):
        if not rou:
            break
        before, _ = rou.split(sep)
        round_len = n_tokens(rou)
        instruction_len = n_tokens(before + sep) - 2
        target[cur:cur + instruction_len] = IGNORE_INDEX
        cur += round_len
    target[cur:] = IGNORE_INDEX
    return target


def test_token_layout_and_llava_parity(tmp_path, legacy_tok):
    tok = legacy_tok
    Image.new("RGB", (20, 12), (200, 10, 10)).save(tmp_path / "a.png")
    record = {"id": "s1", "image": "a.png",
              "conversations": _conv("What color is the circle?\n<image>", "red", "How many stars are there?", "two")}
    ex = encode_example(record, tok, "vicuna_v1", tmp_path, ImageConfig(image_size=14), max_length=512,
                        image_token_index=4, image_seq_length=IMG_TOKENS)
    ids, types, labels = ex["input_ids"], ex["token_types"], ex["labels"]

    # Ids are LLaVA's tokenizer_image_token over the whole conversation string.
    text = segments_text(render_conversation(record["conversations"], "vicuna_v1", has_image=True))
    llava_ids = tok.tokenizer_image_token(text, image_token_index=IMAGE_PLACEHOLDER)
    repeats = np.where(llava_ids == IMAGE_PLACEHOLDER, IMG_TOKENS, 1)
    expected_ids = np.repeat(llava_ids, repeats)
    expected_ids[expected_ids == IMAGE_PLACEHOLDER] = 4
    np.testing.assert_array_equal(ids, expected_ids)
    # Loss targets are exactly LLaVA's (masked with its round-length arithmetic).
    expected_labels = np.repeat(_llava_v1_targets(text, tok, llava_ids), repeats)
    expected_labels[expected_labels == IMAGE_PLACEHOLDER] = IGNORE_INDEX
    np.testing.assert_array_equal(labels, expected_labels)

    # Layout: SYSTEM prefix (BOS, system prompt, "USER: "), one IMAGE block, then QUESTION/ANSWER.
    prefix = tok.encode(SYSTEM + " USER: ", add_bos=True)
    np.testing.assert_array_equal(ids[:len(prefix)], prefix)
    assert (types[:len(prefix)] == tt.SYSTEM).all()
    block = slice(len(prefix), len(prefix) + IMG_TOKENS)
    assert (types[block] == tt.IMAGE).all() and (ids[block] == 4).all()
    rest = types[block.stop:]
    assert set(rest.tolist()) == {tt.QUESTION, tt.ANSWER} and rest[0] == tt.QUESTION
    np.testing.assert_array_equal(ex["loss_mask"], types == tt.ANSWER)
    assert tok.decode(ids[ex["loss_mask"]]) == "red two"
    assert (ids[ex["loss_mask"]] == tok.eos_id).sum() == 2  # each answer closes with </s>
    assert ex["pixel_values"].shape == (14, 14, 3) and ex["has_image"] and not ex["truncated"]


def test_non_legacy_special_token_handling(tok):
    assert not tok.legacy
    ids = tok.encode("yes</s>USER: no")
    assert tok.eos_id in ids
    after = ids[ids.index(tok.eos_id) + 1]
    assert not tok.id_to_piece(after).startswith("▁")  # no dummy-prefix space after a special token
    assert tok.decode(ids) == "yesUSER: no"


def test_text_only_example_types(tmp_path, tok):
    record = {"id": "t", "conversations": _conv("What is two plus one?", "three")}
    ex = encode_example(record, tok, "vicuna_v1", tmp_path, ImageConfig(image_size=14), 256, 4, IMG_TOKENS)
    assert set(ex["token_types"][ex["loss_mask"]].tolist()) == {tt.ANSWER}
    assert set(ex["token_types"][~ex["loss_mask"]].tolist()) == {tt.TEXT}
    assert not ex["has_image"] and not ex["pixel_values"].any()


def test_prompt_types_agree_with_inference_rule(tok):
    img = Image.new("RGB", (10, 10), (0, 0, 255))
    p = encode_prompt("Is there a blue square?", tok, "vicuna_v1", image=img, image_cfg=ImageConfig(image_size=14),
                      image_token_index=4, image_seq_length=IMG_TOKENS)
    np.testing.assert_array_equal(p["token_types"], tt.infer_token_types(p["input_ids"][None], 4)[0])
    assert tok.decode(p["input_ids"]).endswith("ASSISTANT:")
    np.testing.assert_array_equal(
        p["input_ids"], tok.tokenizer_image_token(SYSTEM + " USER: <image>\nIs there a blue square? ASSISTANT:",
                                                  image_token_index=4, image_seq_length=IMG_TOKENS))


def test_sentencepiece_files_and_pickle(sp_dir, tok):
    special = json.loads((sp_dir / "special_tokens.json").read_text())
    assert special == {"bos_id": 1, "eos_id": 2, "unk_id": 0, "pad_id": 3, "image_token_id": 4,
                       "vocab_size": tok.vocab_size, "legacy": False}
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.fingerprint == tok.fingerprint
    assert clone.encode("How many circles are there?") == tok.encode("How many circles are there?")
    assert tok.decode(tok.encode("Is there an orange star?", add_bos=True, add_eos=True)) == "Is there an orange star?"
    byte_fallback = tok.encode("ünïcode ✓")
    assert tok.decode(byte_fallback) == "ünïcode ✓"


@pytest.mark.parametrize("legacy", [True, False])
def test_sentencepiece_matches_transformers_llama_tokenizer(sp_dir, legacy):
    """Same ids as the HF LlamaTokenizer LLaVA trains with, incl. "</s>" written as text."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlamaTokenizer.from_pretrained(str(sp_dir), legacy=legacy, add_bos_token=True)
    ours = SentencePieceTokenizer((sp_dir / "tokenizer.model").read_bytes(), pad_id=3, legacy=legacy)
    conv = _conv("<image>\nWhat color is the circle?", "red", "How many stars are there? ünï ✓ 12", "two")
    text = segments_text(render_conversation(conv, "vicuna_v1", has_image=True))
    # (Not compared: text that starts with a space, where transformers 5's Metaspace conversion
    # drops the dummy-prefix space that the sentencepiece-based tokenizer of LLaVA's era kept.)
    for chunk in [text, "yes</s>USER: no", "a  b\n y", ""]:
        assert ours.encode(chunk, add_bos=True) == hf(chunk).input_ids, chunk

    def llava_tokenizer_image_token(prompt):  # LLaVA's function, over the HF tokenizer
        chunks = [hf(c).input_ids for c in prompt.split("<image>")]
        ids = [chunks[0][0]]
        for i, c in enumerate(chunks):
            ids += ([IMAGE_PLACEHOLDER] if i else []) + c[1:]
        return ids

    assert ours.encode_segments(render_conversation(conv, "vicuna_v1")).input_ids.tolist() == \
        llava_tokenizer_image_token(text)


def _train_hf_tokenizer(directory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=False))
    hf.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    hf.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False,
                                  initial_alphabet=list("\n?:'.,"))
    hf.train_from_iterator(synthetic_texts(200), trainer=trainer)
    hf.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": {"content": "</s>"}, "pad_token": "<pad>", "unk_token": "<unk>"}))


def test_hf_tokenizer_json(tmp_path, sp_dir):
    _train_hf_tokenizer(tmp_path)
    tok = load_tokenizer(tmp_path)
    assert tok.kind == "hf" and (tok.bos_id, tok.eos_id, tok.pad_id, tok.image_token_id) == (1, 2, 3, 4)
    ids = tok.encode("What color is the circle?", add_bos=True)
    assert ids[0] == 1 and tok.decode(ids) == "What color is the circle?"
    assert tok.encode("red</s>")[-1] == tok.eos_id  # special token written as text

    record = {"id": "h", "image": "x.png", "conversations": _conv("<image>\nWhat color is the star?", "green")}
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    ex = encode_example(record, tok, "vicuna_v1", tmp_path, ImageConfig(image_size=14), 256, 4, IMG_TOKENS)
    types = ex["token_types"]
    first_image = int(np.argmax(types == tt.IMAGE))
    assert (types[:first_image] == tt.SYSTEM).all() and (types[first_image:first_image + IMG_TOKENS] == tt.IMAGE).all()
    assert tok.decode(ex["input_ids"][ex["loss_mask"]]).strip() == "green"
    text = segments_text(render_conversation(record["conversations"], "vicuna_v1", has_image=True))
    np.testing.assert_array_equal(ex["input_ids"], tok.tokenizer_image_token(text, 4, IMG_TOKENS))
    assert pickle.loads(pickle.dumps(tok)).encode("yes no") == tok.encode("yes no")

    # With both files present, the SentencePiece model wins by default (LLaVA's slow tokenizer).
    (tmp_path / "tokenizer.model").write_bytes((sp_dir / "tokenizer.model").read_bytes())
    assert load_tokenizer(tmp_path).kind == "sentencepiece"
    assert load_tokenizer(tmp_path, prefer="hf").kind == "hf"


# ---------------------------------------------------------------------------------------------
# Images

def _reference_pixels(img: np.ndarray, size: int) -> np.ndarray:
    """expand2square + CLIP processing written out directly in numpy/PIL."""
    h, w, _ = img.shape
    side = max(h, w)
    canvas = np.empty((side, side, 3), np.uint8)
    canvas[:] = (122, 116, 104)
    top, left = (side - h) // 2, (side - w) // 2
    canvas[top:top + h, left:left + w] = img
    resized = np.asarray(Image.fromarray(canvas).resize((size, size), Image.BICUBIC), np.float64) / 255
    mean = np.array([0.48145466, 0.4578275, 0.40821073])
    std = np.array([0.26862954, 0.26130258, 0.27577711])
    return (resized - mean) / std


def test_image_preprocessing_matches_reference(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(24, 40, 3), dtype=np.uint8)  # wide: padded top and bottom
    Image.fromarray(img).save(tmp_path / "wide.png")
    out = preprocess_image(tmp_path / "wide.png", ImageConfig(image_size=40))
    assert out.shape == (40, 40, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out, _reference_pixels(img, 40), atol=1e-5)
    # No resize at 40 px: the padding rows are exactly the normalised CLIP mean colour (122, 116, 104).
    np.testing.assert_allclose(out[0, 0], (np.array([122, 116, 104]) / 255 - ImageConfig().mean) / ImageConfig().std,
                               atol=1e-6)
    small = preprocess_image(Image.fromarray(img[:, :20]), ImageConfig(image_size=16))  # tall, resized
    np.testing.assert_allclose(small, _reference_pixels(img[:, :20], 16), atol=1e-5)
    assert to_nchw(small[None]).shape == (1, 3, 16, 16)

    # "crop": shortest edge to 16 (40x24 -> 26x16), then the centre 16x16.
    crop = preprocess_image(Image.fromarray(img), ImageConfig(image_size=16, aspect="crop"))
    resized = np.asarray(Image.fromarray(img).resize((26, 16), Image.BICUBIC), np.float64) / 255
    expected = (resized[:, 5:21] - ImageConfig().mean) / ImageConfig().std
    np.testing.assert_allclose(crop, expected, atol=1e-5)


def test_bad_images_name_the_file(tmp_path, tok):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    cfg = ImageConfig(image_size=14)
    for name, match in (("missing.png", "not found"), ("broken.png", "corrupt")):
        record = {"id": f"id-{name}", "image": name, "conversations": _conv("<image>\nQ?", "yes")}
        with pytest.raises(BadRecord, match=match) as info:
            encode_example(record, tok, "vicuna_v1", tmp_path, cfg, 256, 4, IMG_TOKENS)
        assert name in str(info.value) and f"id-{name}" in str(info.value)


def test_truncation_and_image_block_rule(tmp_path, tok):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    record = {"id": "long", "image": "a.png",
              "conversations": _conv("<image>\nQ?", " ".join(["yes"] * 40))}
    cfg = ImageConfig(image_size=14)
    full = encode_example(record, tok, "vicuna_v1", tmp_path, cfg, 1024, 4, IMG_TOKENS)
    n = len(full["input_ids"])
    cut = encode_example(record, tok, "vicuna_v1", tmp_path, cfg, n - 10, 4, IMG_TOKENS)
    assert cut["truncated"] and len(cut["input_ids"]) == n - 10
    np.testing.assert_array_equal(cut["input_ids"], full["input_ids"][:n - 10])
    first_image = int(np.argmax(full["token_types"] == tt.IMAGE))
    with pytest.raises(BadRecord, match="image block does not fit"):
        encode_example(record, tok, "vicuna_v1", tmp_path, cfg, first_image + IMG_TOKENS - 1, 4, IMG_TOKENS)
    first_answer = int(np.argmax(full["loss_mask"]))
    with pytest.raises(BadRecord, match="no answer token"):
        encode_example(record, tok, "vicuna_v1", tmp_path, cfg, first_answer, 4, IMG_TOKENS)


def test_json_source_counts_and_raises(tmp_path):
    good = [{"id": f"g{i}", "conversations": _conv("Q?", "A")} for i in range(99)]
    bad = {"id": "b0", "conversations": [{"from": "gpt", "value": "A"}]}
    source = LlavaJsonSource(good + [bad], tmp_path, max_bad_fraction=0.01)
    assert len(source) == 99 and source.num_bad == 1 and "b0" in source.bad_examples[0]
    with pytest.raises(TooManyBadRecords, match="b1"):
        LlavaJsonSource(good + [bad, dict(bad, id="b1")], tmp_path, max_bad_fraction=0.01)
    path = tmp_path / "recs.json"
    path.write_text(json.dumps(good[:3] + [{"id": "img", "image": "nope.png", "conversations": _conv("<image>", "A")}]))
    with pytest.raises(TooManyBadRecords, match="nope.png"):
        LlavaJsonSource(path, tmp_path, check_images=True)


# ---------------------------------------------------------------------------------------------
# Padding

def _example(n, loss_from, has_image=True):
    ids = np.arange(10, 10 + n, dtype=np.int32)
    loss = np.arange(n) >= loss_from
    return {"input_ids": ids, "labels": np.where(loss, ids, IGNORE_INDEX), "loss_mask": loss,
            "token_types": np.where(loss, tt.ANSWER, tt.QUESTION).astype(np.int32),
            "pixel_values": np.ones((4, 4, 3), np.float32), "has_image": np.bool_(has_image),
            "truncated": np.bool_(False)}


def test_pad_to_bucket():
    batch = pad_to_bucket([_example(5, 3), _example(9, 7, has_image=False)], buckets=(8, 16, 32), pad_id=0,
                          batch_size=3)
    assert batch["input_ids"].shape == (3, 16) and batch["pixel_values"].shape == (3, 4, 4, 3)
    np.testing.assert_array_equal(batch["lengths"], [5, 9, 0])
    np.testing.assert_array_equal(batch["valid"], [True, True, False])
    np.testing.assert_array_equal(batch["attention_mask"].sum(1), [5, 9, 0])
    assert (batch["token_types"][0, 5:] == tt.PAD).all() and (batch["labels"][0, 5:] == IGNORE_INDEX).all()
    assert (batch["input_ids"][0, 5:] == 0).all() and not batch["loss_mask"][:, 9:].any()
    np.testing.assert_array_equal(batch["has_image"], [True, False, False])
    assert not batch["pixel_values"][2].any()
    assert pad_to_bucket([_example(8, 3)], (8, 16), 0)["input_ids"].shape == (1, 8)
    with pytest.raises(ValueError, match="largest bucket"):
        pad_to_bucket([_example(40, 3)], (8, 16, 32), 0)
