"""`gmod_jax.checkpoint`: the project's checkpoint directory (Orbax params + config.json + tokenizer)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from gmod_jax.checkpoint import CheckpointWriter, flatten, load_checkpoint, save_checkpoint
from gmod_jax import config as C
from gmod_jax.models.llava import LlavaModel


def test_save_load_model_init_params(tmp_path):
    cfg = C.gamma_mod(C.tiny(), layers=(1, 2), placement="explicit")
    cfg = cfg.replace(text=cfg.text.__class__(**{**cfg.text.__dict__, "rope_scaling": {
        "rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 128}}))
    # The model's own tree (eval_shape: an eager init of the MoD model takes tens of seconds),
    # filled with random bf16 jax arrays.
    shapes = jax.eval_shape(lambda: LlavaModel(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32),
                                                         jnp.zeros((1, 28, 28, 3)))["params"])
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape), jnp.bfloat16), shapes)
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    (tok / "unrelated.txt").write_text("x")
    out = save_checkpoint(tmp_path / "ckpt", params, cfg, tokenizer_src_dir=tok)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "params", "tokenizer.json"]
    loaded_cfg, loaded = load_checkpoint(out)
    assert loaded_cfg == cfg
    flat = flatten(loaded)
    assert set(flat) == set(flatten(jax.tree.map(np.asarray, params)))
    for path, value in flatten(params).items():
        assert flat[path].dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(flat[path], np.asarray(value))
    with pytest.raises(FileExistsError):
        save_checkpoint(out, params, cfg)


def test_failed_save_leaves_no_directory(tmp_path, monkeypatch):
    def fail(self, config):
        raise OSError("disk full")

    # Params are already written (Orbax partial save) when the failure hits.
    monkeypatch.setattr(CheckpointWriter, "write_config", fail)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path / "ckpt", {"llm": {"embed": np.zeros((4, 2), np.float32)}}, C.tiny())
    assert list(tmp_path.iterdir()) == []


def test_load_checkpoint_from_relative_path(tmp_path, monkeypatch):
    """`--init-from runs/x/ckpt` as typed on the command line: Orbax itself wants absolute paths."""
    cfg = C.tiny()
    params = {"projector": {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}}
    save_checkpoint(tmp_path / "ckpt", params, cfg)
    monkeypatch.chdir(tmp_path)
    loaded_cfg, loaded = load_checkpoint("ckpt")
    assert loaded_cfg == cfg
    np.testing.assert_array_equal(loaded["projector"]["w"], params["projector"]["w"])
