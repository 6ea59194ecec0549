"""Bad inputs fail with a message naming the key or file, a non-zero exit, and no output left."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from convert import pipeline
from convert.__main__ import main as convert_main
from convert.errors import ConversionError
from tests import hf_fixtures as fx


@pytest.fixture(scope="module")
def tiny():
    spec = fx.SPECS["base"]
    return spec, fx.state_dict_c(fx.build_model(spec))


def _write(tmp: Path, spec, sd, config: dict | None = None, layout="D", container="safetensors", shards=1) -> Path:
    src = tmp / "src"
    fx.write_weights(fx.rename(sd, layout) if layout else sd, src, container, shards)
    fx.write_json(src / "config.json", config or fx.config_v5(spec))
    return src


def _cli_fails(tmp: Path, src: Path, *patterns: str, extra=(), capsys=None):
    out = tmp / "out"
    assert convert_main(["--src", str(src), "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err
    for p in patterns:
        assert p in err, err
    assert not out.exists()
    assert not list(tmp.glob("out.tmp-*")), "temporary output left behind"
    return err


def test_unknown_layout(tmp_path, tiny, capsys):
    spec, sd = tiny
    weird = {"encoder.block." + k: v for k, v in fx.rename(sd, "D").items()}
    src = _write(tmp_path, spec, weird, layout=None)
    _cli_fails(tmp_path, src, "unknown checkpoint layout", "encoder.block.", capsys=capsys)
    fx.write_json(src / "config.json", {"model_type": "t5", "d_model": 8})
    _cli_fails(tmp_path, src, "unknown config.json (model_type='t5')", capsys=capsys)


def test_mixed_layouts_are_rejected(tmp_path, tiny, capsys):
    spec, sd = tiny
    d = fx.rename(sd, "D")
    d["model.language_model.layers.0.mlp.up_proj.weight"] = d.pop("language_model.model.layers.0.mlp.up_proj.weight")
    src = _write(tmp_path, spec, d, layout=None)
    _cli_fails(tmp_path, src, "mixes HF 4.x/5.x saved and HF in-memory", capsys=capsys)


def test_missing_and_unexpected_keys(tmp_path, tiny, capsys):
    spec, sd = tiny
    d = fx.rename(sd, "D")
    del d["language_model.model.layers.1.mlp.up_proj.weight"]
    d["language_model.model.layers.0.self_attn.extra_proj.weight"] = torch.zeros(2)
    src = _write(tmp_path, spec, d, layout=None, container="bin", shards=2)
    _cli_fails(tmp_path, src, "missing keys (1): language_model.model.layers.1.mlp.up_proj.weight",
               "unexpected keys (1): language_model.model.layers.0.self_attn.extra_proj.weight", capsys=capsys)


def test_missing_key_is_named_in_the_files_layout(tmp_path, tiny):
    spec, sd = tiny
    a = fx.rename(sd, "A")
    del a["vision_tower.vision_model.encoder.layers.2.mlp.fc1.bias"]
    src = _write(tmp_path, spec, a, layout=None)
    with pytest.raises(ConversionError, match=r"missing keys \(1\): vision_tower\.vision_model\.encoder\.layers\.2"):
        pipeline.load_params(src)


def test_shape_mismatch_from_config(tmp_path, tiny, capsys):
    spec, sd = tiny
    cfg = fx.config_v5(spec)
    cfg["text_config"]["vocab_size"] = 100
    src = _write(tmp_path, spec, sd, cfg)
    _cli_fails(tmp_path, src, "shape mismatches (2)",
               "language_model.model.embed_tokens.weight: file [96, 64], config expects [100, 64]",
               "language_model.lm_head.weight: file [96, 64], config expects [100, 64]", capsys=capsys)


@pytest.mark.parametrize("layers,words", [
    (3, ["missing keys", "language_model.model.layers.2.",
         "text num_hidden_layers=3 but the checkpoint has layers 0..1"]),
    (1, ["unexpected keys", "language_model.model.layers.1.",
         "text num_hidden_layers=1 but the checkpoint has layers 0..1"]),
])
def test_config_contradicting_layer_count(tmp_path, tiny, capsys, layers, words):
    spec, sd = tiny
    cfg = fx.config_v5(spec)
    cfg["text_config"]["num_hidden_layers"] = layers
    src = _write(tmp_path, spec, sd, cfg)
    _cli_fails(tmp_path, src, *words, capsys=capsys)


def test_truncated_shard(tmp_path, tiny, capsys):
    spec, sd = tiny
    src = _write(tmp_path, spec, sd, shards=3)
    shard = src / "model-00002-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:-64])
    _cli_fails(tmp_path, src, "model-00002-of-00003.safetensors: truncated file", capsys=capsys)
    bsrc = _write(tmp_path / "b", spec, sd, container="bin", shards=2)
    shard = bsrc / "pytorch_model-00001-of-00002.bin"
    shard.write_bytes(shard.read_bytes()[:-300])
    _cli_fails(tmp_path / "b", bsrc, "pytorch_model-00001-of-00002.bin: not a valid torch zip", capsys=capsys)


def test_dtype_policy_errors(tmp_path, tiny, capsys):
    spec, sd = tiny
    d = fx.rename(sd, "D")
    d["language_model.model.norm.weight"] = d["language_model.model.norm.weight"].half()
    src = _write(tmp_path, spec, d, layout=None)
    _cli_fails(tmp_path, src, "--dtype keep needs one dtype", "mostly float32 with float16: "
               "language_model.model.norm.weight", capsys=capsys)
    # An explicit dtype resolves it ...
    assert convert_main(["--src", str(src), "--out", str(tmp_path / "ok"), "--dtype", "float32"]) == 0
    # ... unless a value cannot be represented.
    d["language_model.model.norm.weight"] = d["language_model.model.norm.weight"].float()
    d["language_model.model.layers.0.mlp.up_proj.weight"][0, 0] = 1e6
    src = _write(tmp_path / "big", spec, d, layout=None)
    _cli_fails(tmp_path / "big", src, "language_model.model.layers.0.mlp.up_proj.weight: values overflow float16",
               extra=("--dtype", "float16"), capsys=capsys)
    d["language_model.model.layers.0.mlp.up_proj.weight"] = d["language_model.model.layers.0.mlp.up_proj.weight"].long()
    src = _write(tmp_path / "int", spec, d, layout=None)
    _cli_fails(tmp_path / "int", src, "non-floating tensors", "int64: language_model.model.layers.0.mlp.up_proj",
               capsys=capsys)


def test_tied_lm_head_must_equal_embedding(tmp_path, capsys):
    spec = fx.SPECS["llama3_tied"]
    sd = fx.state_dict_c(fx.build_model(spec))
    assert "lm_head.weight" in sd  # the 5.24 state dict lists the tied head
    src = _write(tmp_path, spec, sd)
    assert convert_main(["--src", str(src), "--out", str(tmp_path / "ok")]) == 0  # equal copy: accepted
    sd["lm_head.weight"] = sd["lm_head.weight"] + 1
    src = _write(tmp_path / "bad", spec, sd)
    _cli_fails(tmp_path / "bad", src, "language_model.lm_head.weight differs from "
               "language_model.model.embed_tokens.weight", capsys=capsys)


def test_gamma_mod_router_errors(tmp_path, capsys):
    spec = fx.Spec(name="mod", layers=4)
    sd = fx.state_dict_c(fx.build_model(spec))
    src = tmp_path / "a" / "src"
    fx.write_gamma_mod(sd, spec, src, [1, 2, 3], "bin", perturb_copy=True)
    _cli_fails(tmp_path / "a", src, "model.layers.2.router.weight differs from model.layers.1.router.weight",
               capsys=capsys)
    src = tmp_path / "b" / "src"
    fx.write_gamma_mod(sd, spec, src, [2, 3], "bin", router_layers=[0, 2])
    _cli_fails(tmp_path / "b", src, "router model.layers.0.router.weight sits on layer 0, which is not in "
               "mod.mod_layers_idx [2, 3]", capsys=capsys)
    src = tmp_path / "c" / "src"
    fx.write_gamma_mod(sd, spec, src, [2, 3], "safetensors", router_layers=[])
    _cli_fails(tmp_path / "c", src, "missing keys: the γ-MoD router (model.layers.2.router.weight)", capsys=capsys)
    cfg = json.loads((src / "config.json").read_text())
    cfg["mod"]["mod_layers_idx"] = [2, 9]
    fx.write_json(src / "config.json", cfg)
    _cli_fails(tmp_path / "c", src, "mod.mod_layers_idx [9] outside 0..3", capsys=capsys)


def test_original_layout_without_tower(tmp_path, tiny, capsys):
    spec, sd = tiny
    cfg = fx.config_original(spec)
    del cfg["mm_hidden_size"]  # else the CLIP-L/336 default tower contradicts it first
    src = _write(tmp_path, spec, sd, cfg, layout="E")
    _cli_fails(tmp_path, src, "has no vision tower", "pass --vision-tower DIR", capsys=capsys)


@pytest.mark.parametrize("patch,what", [
    ({"mm_patch_merge_type": "spatial_unpad"}, "LLaVA-1.6"),
])
def test_unsupported_families_are_named(tmp_path, tiny, capsys, patch, what):
    spec, sd = tiny
    cfg = {**fx.config_original(spec), **patch}
    src = _write(tmp_path, spec, sd, cfg, layout="E")
    err = _cli_fails(tmp_path, src, what, "not supported yet", capsys=capsys)
    assert "missing" in err or "lack" in err
    with pytest.raises(NotImplementedError):
        pipeline.load_params(src)


def test_llava_hr_config_or_keys_without_the_rest_of_the_tower(tmp_path, tiny, capsys):
    """LLaVA-HR is recognised by its config flag or by its tower's keys (the config may lack the
    flag); a checkpoint that has only one of the two names what is missing."""
    spec, sd = tiny
    hr_config = {**fx.config_original(spec), "is_multipath_encoder": True, "input_image_size": 1024}
    _cli_fails(tmp_path, _write(tmp_path, spec, sd, hr_config, layout="E"),
               "missing key model.vision_tower.fast_vision_tower.vision_tower.vision_model.embeddings.patch_embedding"
               ".weight (the tower's geometry is read from it)", capsys=capsys)
    e = fx.rename(sd, "E")
    e["model.vision_tower.slow_vision_tower.vision_tower.stem.0.weight"] = torch.zeros(4, 3, 4, 4)
    src = _write(tmp_path, spec, e, fx.config_original(spec), layout=None)
    with pytest.raises(ConversionError, match="input_image_size is missing"):
        pipeline.load_params(src)


# ----------------------------------------------------------------------------------------------
# Mini-Gemini (tests/mgm_fixtures.py: the official layout of a tiny reference model)

@pytest.fixture(scope="module")
def mgm():
    from gmod_jax import config as C
    from tests import mgm_reference as ref_lib

    cfg = C.tiny_mgm(2, True)
    return cfg, ref_lib.build(cfg, seed=5)


def test_mgm_missing_towers_name_their_flags(tmp_path, mgm, capsys):
    """A Mini-Gemini checkpoint without its towers (as released) names --vision-tower and
    --vision-tower-aux; with only the CLIP given, only the aux flag is asked for."""
    from tests import mgm_fixtures as mf

    cfg, ref = mgm
    src = mf.write_checkpoint(ref, tmp_path / "src", "safetensors", mf.official_config(cfg), towers=False)
    _cli_fails(tmp_path, src, "no vision tower", "--vision-tower DIR", "no Mini-Gemini aux tower",
               "--vision-tower-aux FILE|DIR", capsys=capsys)
    clip = mf.write_clip_dir(ref, tmp_path / "clip")
    err = _cli_fails(tmp_path, src, "--vision-tower-aux FILE|DIR", extra=("--vision-tower", str(clip)), capsys=capsys)
    assert "--vision-tower DIR" not in err
    # An aux checkpoint without the trunk (e.g. a CLIP directory by mistake) is the same error.
    _cli_fails(tmp_path, src, "--vision-tower-aux FILE|DIR", extra=("--vision-tower", str(clip), "--vision-tower-aux",
                                                                    str(clip)), capsys=capsys)


def test_mgm_wrong_aux_shapes_are_named(tmp_path, mgm, capsys):
    """A tensor of the open_clip trunk whose shape does not fit is named by its open_clip key; a
    trunk whose widths contradict mm_hidden_size_aux names that field."""
    from tests import mgm_fixtures as mf

    cfg, ref = mgm
    src = mf.write_checkpoint(ref, tmp_path / "src", "safetensors", mf.official_config(cfg), towers=False)
    clip = mf.write_clip_dir(ref, tmp_path / "clip")
    sd = mf.open_clip_state_dict(ref)
    key = "visual.trunk.stages.2.blocks.1.mlp.fc1.weight"
    sd[key] = torch.zeros(sd[key].shape[0] + 1, sd[key].shape[1])
    aux = mf.write_open_clip(ref, tmp_path / "bad" / "open_clip_pytorch_model.bin", "bin", sd=sd)
    _cli_fails(tmp_path, src, "shape mismatches (1)", key, extra=("--vision-tower", str(clip), "--vision-tower-aux",
                                                                  str(aux.parent)), capsys=capsys)
    config = {**mf.official_config(cfg), "mm_hidden_size_aux": 2880}
    full = mf.write_checkpoint(ref, tmp_path / "full", "safetensors", config)
    _cli_fails(tmp_path, full, "mm_hidden_size_aux 2880 contradicts the aux tower's stage widths [8, 16, 24, 32]",
               capsys=capsys)


@pytest.mark.parametrize("name", ["laion/CLIP-convnext_xxlarge-laion2B-s34B-b82K-augreg-soup", "eva02-clip-vit-g"])
def test_mgm_unsupported_aux_tower_is_named(tmp_path, mgm, capsys, name):
    from convert.errors import UnsupportedFormatError
    from tests import mgm_fixtures as mf

    cfg, ref = mgm
    src = mf.write_checkpoint(ref, tmp_path / "src", "safetensors", mf.official_config(cfg, aux_name=name))
    _cli_fails(tmp_path, src, f"mm_vision_tower_aux {name!r}", "is not supported", "ConvNeXt-L", capsys=capsys)
    with pytest.raises(UnsupportedFormatError):
        pipeline.load_params(src)


def test_vision_tower_aux_is_only_for_mgm(tmp_path, tiny, capsys):
    spec, sd = tiny
    src = _write(tmp_path, spec, sd)
    _cli_fails(tmp_path, src, "--vision-tower-aux is only for Mini-Gemini", extra=("--vision-tower-aux", str(src)),
               capsys=capsys)


def test_existing_output_is_left_alone(tmp_path, tiny, capsys):
    spec, sd = tiny
    src = _write(tmp_path, spec, sd)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert convert_main(["--src", str(src), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert convert_main(["--src", str(src), "--out", str(out), "--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and (out / "params").is_dir()


def test_failure_mid_write_leaves_nothing(tmp_path, tiny, monkeypatch):
    spec, sd = tiny
    src = _write(tmp_path, spec, sd)
    real = pipeline.materialize
    calls = []

    def flaky(leaves):
        calls.append(1)
        if len(calls) == 3:
            raise ConversionError("simulated read failure")
        return real(leaves)

    monkeypatch.setattr(pipeline, "materialize", flaky)
    with pytest.raises(ConversionError, match="simulated"):
        pipeline.convert_checkpoint(src, tmp_path / "out", batch_bytes=8192)
    assert len(calls) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
