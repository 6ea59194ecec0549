"""`python -m gmod_jax.generate` and the prompt-level API on a tiny γ-MoD checkpoint on disk."""

from __future__ import annotations

import dataclasses
import json

import numpy as np

import gmod_jax
from gmod_jax.checkpoint import save_checkpoint
from gmod_jax import config as C
from gmod_jax.data.images import ImageConfig, preprocess_image
from gmod_jax.data.synthetic import SyntheticConfig, synthetic_texts, write_synthetic_dataset
from gmod_jax.data.templates import VICUNA_V1
from gmod_jax.data.tokenizer import train_sentencepiece
from gmod_jax.generate import main
from gmod_jax.inference.generate import generate, generate_ids
from tests.test_generate import random_params

MAX_NEW = 5


def _checkpoint(root):
    syn = SyntheticConfig(image_size=56)
    data = write_synthetic_dataset(root / "data", num_train=1, num_eval=1, config=syn)
    tok = train_sentencepiece(synthetic_texts(200, 0, syn), root / "tokenizer", vocab_size=320)
    cfg = C.gamma_mod(C.tiny(text=dataclasses.replace(C.tiny().text, vocab_size=tok.vocab_size),
                             image_token_index=tok.image_token_id, pad_token_id=tok.pad_id),
                      "explicit", 0.5, layers=(1, 2))
    save_checkpoint(root / "ckpt", random_params(cfg), cfg, tokenizer_src_dir=root / "tokenizer")
    return root / "ckpt", data, tok


def test_cli_and_prompt_api(tmp_path, capsys):
    ckpt, data, tok = _checkpoint(tmp_path)
    record = json.loads(data.eval_json.read_text())[0]
    image = data.image_root / record["image"]
    question = record["conversations"][0]["value"].replace("<image>", "").strip()

    rc = main(["--ckpt", str(ckpt), "--image", str(image), "--prompt", question,
               "--max-new-tokens", str(MAX_NEW), "--stats"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    answer = captured.out.rstrip("\n")
    stats = json.loads(captured.err.strip().splitlines()[-1])
    assert stats["mod_layers"] == [1, 2] and 0.0 < stats["prefill_skip_ratio"] < 1.0

    # The API behind the CLI: LLaVA's vicuna_v1 prompt string through `tokenizer_image_token`,
    # LLaVA-1.5 image preprocessing, then the id-level generator.
    model = gmod_jax.load(str(ckpt))
    cfg = model.config
    prompt = f"{VICUNA_V1.system} USER: <image>\n{question} ASSISTANT:"
    ids = tok.tokenizer_image_token(prompt, cfg.image_token_index, cfg.image_seq_length)
    pixels = preprocess_image(image, ImageConfig(image_size=cfg.vision.image_size))
    by_ids = generate_ids(model, [ids], pixels[None], max_new_tokens=MAX_NEW, eos_token_id=tok.eos_id,
                          pad_token_id=tok.pad_id)
    assert tok.decode(by_ids.tokens[0]).strip() == answer

    # Batched prompts: the image prompt next to a text-only one comes out as it did alone.
    out = generate(model, [{"image": image, "text": question}, {"image": None, "text": "What is red?"}],
                   max_new_tokens=MAX_NEW)
    assert out.texts[0] == answer and isinstance(out.texts[1], str)
    np.testing.assert_array_equal(out.tokens[0], by_ids.tokens[0])

    assert main(["--ckpt", str(ckpt), "--image", str(tmp_path / "missing.png"), "--prompt", "hi"]) == 2
    assert "missing.png" in capsys.readouterr().err
