"""A converted tiny HF LLaVA generates the same greedy tokens as transformers' `generate`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from convert import pipeline  # noqa: E402
from gmod_jax.api import Model  # noqa: E402
from gmod_jax.inference.generate import generate_ids  # noqa: E402
from tests import hf_fixtures as fx  # noqa: E402

pytestmark = pytest.mark.torch
MAX_NEW = 10
EOS, PAD = 2, 0


def test_greedy_tokens_match_transformers_generate(tmp_path):
    spec = fx.SPECS["base"]  # GQA (4 heads, 2 KV heads), 2 layers, feature layer -2
    hf = fx.build_model(spec, seed=5)
    hf.save_pretrained(tmp_path / "hf")
    config, params, _ = pipeline.load_params(tmp_path / "hf")
    model = Model(config=config, params=jax.tree.map(jnp.asarray, params))

    rng = np.random.default_rng(0)
    n = spec.image_seq_length
    prompts = [np.concatenate([[1], rng.integers(3, spec.image_token, 2), [spec.image_token] * n,
                               rng.integers(3, spec.image_token, k)]).astype(np.int64) for k in (6, 2)]
    pixels = rng.standard_normal((2, 3, spec.image, spec.image)).astype(np.float32)

    # transformers, left-padded batch (its positions come from the attention mask too).
    width = max(p.size for p in prompts)
    ids = np.full((2, width), PAD, np.int64)
    mask = np.zeros((2, width), np.int64)
    for row, p in enumerate(prompts):
        ids[row, width - p.size:] = p
        mask[row, width - p.size:] = 1
    with torch.no_grad():
        out = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                          pixel_values=torch.tensor(pixels), max_new_tokens=MAX_NEW, do_sample=False,
                          eos_token_id=EOS, pad_token_id=PAD)
    expected = []
    for row in out[:, width:].numpy():
        row = row.tolist()
        expected.append(row[:row.index(EOS) + 1] if EOS in row else row)

    ours = generate_ids(model, prompts, np.moveaxis(pixels, 1, -1), max_new_tokens=MAX_NEW,
                        eos_token_id=EOS, pad_token_id=PAD)
    assert [t.tolist() for t in ours.tokens] == expected
    assert max(len(e) for e in expected) > 1
    single = generate_ids(model, prompts[1:], np.moveaxis(pixels[1:], 1, -1), max_new_tokens=MAX_NEW,
                          eos_token_id=EOS)
    assert single.tokens[0].tolist() == expected[1]
