"""Dense -> γ-MoD adaptation CLI (`python -m convert.to_mod`)."""

import json
import math

import jax
import numpy as np
import pytest

import gmod_jax
from convert import to_mod
from gmod_jax.checkpoint import save_checkpoint
from gmod_jax import config as C


@pytest.fixture(scope="module")
def dense_ckpt(tmp_path_factory):
    model = gmod_jax.init_random(C.tiny(), seed=0)
    path = tmp_path_factory.mktemp("ckpt") / "dense"
    save_checkpoint(path, model.params, model.config)
    return path, model


def test_layers_option_adds_only_a_router(dense_ckpt, tmp_path):
    src, dense = dense_ckpt
    out = tmp_path / "mod"
    assert to_mod.main(["--src", str(src), "--out", str(out), "--layers", "1-2", "--routing-ratio", "0.34"]) == 0
    mod = gmod_jax.load(out)
    assert mod.config.mod.enabled and mod.config.mod.layers == (1, 2)
    assert mod.config.mod.routing_ratio == 0.34
    router = np.asarray(mod.params["llm"]["mod_router"]["kernel"])
    assert router.shape == (64, 2)
    assert np.abs(router).max() <= 1 / math.sqrt(64)  # PyTorch nn.Linear default init bound
    without = {**mod.params, "llm": {k: v for k, v in mod.params["llm"].items() if k != "mod_router"}}
    for a, b in zip(jax.tree.leaves(without), jax.tree.leaves(dense.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_arank_json_and_placements(dense_ckpt, tmp_path):
    src, _ = dense_ckpt
    report = tmp_path / "arank.json"
    report.write_text(json.dumps({"mod_layers": [0, 3]}))
    assert to_mod.main(["--src", str(src), "--out", str(tmp_path / "a"), "--arank", str(report)]) == 0
    assert gmod_jax.load(tmp_path / "a").config.mod.layers == (0, 3)
    assert to_mod.main(["--src", str(src), "--out", str(tmp_path / "b"), "--placement", "every_2nd",
                        "--per-layer-router"]) == 0
    b = gmod_jax.load(tmp_path / "b")
    assert b.config.mod.layers == (0, 2) and b.params["llm"]["mod_router"]["kernel"].shape == (2, 64, 2)


def test_bad_inputs_leave_no_output(dense_ckpt, tmp_path, capsys):
    src, _ = dense_ckpt
    out = tmp_path / "x"
    assert to_mod.main(["--src", str(src), "--out", str(out), "--layers", "1,9"]) == 2
    assert "outside" in capsys.readouterr().err and not out.exists()
    assert to_mod.main(["--src", str(src), "--out", str(out), "--layers", "1"]) == 0
    assert to_mod.main(["--src", str(out), "--out", str(tmp_path / "y"), "--layers", "1"]) == 2
    assert "already a γ-MoD" in capsys.readouterr().err and not (tmp_path / "y").exists()


def test_router_init_follows_the_base_model(tmp_path):
    """A Mini-Gemini checkpoint gets MGM's xavier-uniform router (its code's init), a LLaVA one
    PyTorch's default, unless --router-init says otherwise."""
    mgm = gmod_jax.init_random(C.tiny_mgm(), seed=0)
    save_checkpoint(tmp_path / "mgm", mgm.params, mgm.config)
    assert to_mod.main(["--src", str(tmp_path / "mgm"), "--out", str(tmp_path / "a"), "--layers", "1-2"]) == 0
    a = gmod_jax.load(tmp_path / "a")
    assert a.config.mod.router_init == "xavier_uniform"
    router = np.abs(np.asarray(a.params["llm"]["mod_router"]["kernel"]))
    assert 1 / math.sqrt(64) < router.max() <= math.sqrt(6 / (64 + 2))  # beyond PyTorch's default bound
    assert to_mod.main(["--src", str(tmp_path / "mgm"), "--out", str(tmp_path / "b"), "--layers", "1-2",
                        "--router-init", "kaiming_uniform"]) == 0
    assert gmod_jax.load(tmp_path / "b").config.mod.router_init == "kaiming_uniform"
