"""A tiny LLaVA checkpoint with a real SentencePiece tokenizer and a synthetic image-QA dataset.

Shared by the tests of the tools that read checkpoints from disk (ARank, generation, eval):
they exercise the same code as a converted 7B checkpoint, only smaller.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import gmod_jax
from gmod_jax.checkpoint import save_checkpoint
from gmod_jax import config as C
from gmod_jax.data.synthetic import SyntheticConfig, synthetic_texts, write_synthetic_dataset
from gmod_jax.data.tokenizer import train_sentencepiece


def make_tiny_checkpoint(root: Path, mod_layers: tuple[int, ...] = (), num_samples: int = 12, seed: int = 0,
                         transform_params=None, vision: C.VisionConfig | None = None):
    """Write `root/data` (synthetic LLaVA JSON + PNGs), `root/tokenizer`, `root/ckpt`; return paths.

    `transform_params(params) -> params` edits the random weights before saving; `vision`
    replaces the tiny CLIP tower (e.g. `C.tiny_hr().vision` for a LLaVA-HR checkpoint)."""
    root = Path(root)
    syn_cfg = SyntheticConfig(image_size=56)
    data = write_synthetic_dataset(root / "data", num_train=num_samples, num_eval=num_samples, seed=seed,
                                   config=syn_cfg)
    tok = train_sentencepiece(synthetic_texts(200, seed, syn_cfg), root / "tokenizer", vocab_size=320)
    cfg = C.tiny(
        vision=vision or C.VisionConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                                        image_size=28, patch_size=14),
        text=dataclasses.replace(C.tiny().text, vocab_size=tok.vocab_size),
        image_token_index=tok.image_token_id, pad_token_id=tok.pad_id)
    if mod_layers:
        cfg = C.gamma_mod(cfg, "explicit", 0.5, layers=mod_layers)
    model = gmod_jax.init_random(cfg, seed=seed)
    params = transform_params(model.params) if transform_params else model.params
    save_checkpoint(root / "ckpt", params, cfg, tokenizer_src_dir=root / "tokenizer")
    return {"ckpt": root / "ckpt", "data": data, "tokenizer": tok}
