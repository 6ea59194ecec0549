"""Official LLaVA-HR / γ-MoD-LLaVA-HR checkpoints: convert, load, logits, export, errors.

A tiny γ-MoD-LLaVA-HR is built from the PyTorch reference of tests/hr_fixtures.py (transformers
CLIP, hand-written ConvNeXt and fusion modules, transformers Llama with γ-MoD's inference rule
hooked in) and written under the official key names (llava-hr-and-mgm.md §2.3): as a 4.31-style
`.bin` (router under every MoD layer, one storage; the ConvNeXt classifier head with a 1000-class
`head.fc`; CLIP's `position_ids`) and as a 4.36-style safetensors (router once). Both go through
`python -m convert` and `gmod_jax.load`; the logits match the reference and the export writes
every tensor back bit for bit.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

import gmod_jax
from convert import pipeline
from convert.__main__ import main as convert_main
from convert.errors import UnsupportedFormatError
from convert.readers import CheckpointReader
from convert.to_hf import main as to_hf_main
from gmod_jax import config as C
from gmod_jax.checkpoint import flatten
from tests import hf_fixtures as fx
from tests import hr_fixtures as hr

TOL = 1e-4
MOD_LAYERS = [1, 3]  # of 4: dense and MoD groups alternate


@pytest.fixture(scope="module")
def reference():
    """The reference modules, the source state dict (official keys, no router) and reference
    logits of a batch with 36 image tokens per row."""
    cfg = C.gamma_mod(C.tiny_hr(), "explicit", 0.5, layers=tuple(MOD_LAYERS))
    tower = hr.reference_tower(cfg, seed=4)
    llama = hr.tiny_llama(cfg, seed=5)
    d, h = cfg.vision.hidden_size, cfg.text.hidden_size
    projector = hr.randomize_(torch.nn.Sequential(torch.nn.Linear(d, h), torch.nn.GELU(), torch.nn.Linear(h, h)), 6,
                              scale=0.1)
    router = 0.05 * torch.randn(2, h, generator=torch.Generator().manual_seed(7))
    rng = np.random.default_rng(8)
    n = cfg.image_seq_length
    ids = np.concatenate([[[1]] * 2, rng.integers(3, 100, (2, 4)), np.full((2, n), cfg.image_token_index),
                          rng.integers(3, 100, (2, 5))], axis=1).astype(np.int64)
    pixels = np.random.default_rng(9).standard_normal((2, 3, 96, 96)).astype(np.float32)
    _, dense = hr.reference_logits(cfg, tower, projector, llama, ids, pixels)
    probs = fx.patch_gamma_mod(llama.model.layers, router, MOD_LAYERS)
    _, logits = hr.reference_logits(cfg, tower, projector, llama, ids, pixels)
    for i in MOD_LAYERS:  # the hooked reference is exact only while the 0.005 threshold keeps every token
        assert float(probs[i].min()) > 0.005
    # The router's MLP scaling moves the logits far beyond the tolerance, so matching them below
    # proves the converted router is applied.
    assert float(np.max(np.abs(logits - dense))) > 100 * TOL
    sd = hr.official_state_dict(tower, projector, llama)
    return {"cfg": cfg, "sd": sd, "router": router, "ids": ids, "pixels": pixels, "logits": logits}


def _write(tmp_path, reference, container, name="src", config=None, sd=None):
    src = tmp_path / name
    sd = hr.with_router(reference["sd"] if sd is None else sd, reference["router"], MOD_LAYERS, container)
    fx.write_weights(sd, src, container, shards=2)
    fx.write_json(src / "config.json", config or hr.official_config(reference["cfg"], MOD_LAYERS))
    return src


def _cli_fails(tmp_path, src, *words, capsys):
    out = tmp_path / "never"
    assert convert_main(["--src", str(src), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    for w in words:
        assert w in err, err
    assert not out.exists() and not list(tmp_path.glob("never*"))  # nothing left behind
    return err


@pytest.mark.slow  # ~25 s on 2 cores: one JAX compile of the model, conversion, export
@pytest.mark.parametrize("container", ["bin", "safetensors"])
def test_official_gamma_mod_hr_converts_loads_matches_and_exports_exactly(tmp_path, reference, container):
    cfg = reference["cfg"]
    src = _write(tmp_path, reference, container)
    ckpt, exported = tmp_path / "ckpt", tmp_path / "exported"
    assert convert_main(["--src", str(src), "--out", str(ckpt), "--json"]) == 0
    info = json.loads((ckpt / "conversion.json").read_text())
    assert info["layout"] == "gamma_mod_hr" and info["kind"] == "gamma_mod_hr"

    model = gmod_jax.load(str(ckpt))
    # Every tower size was read off the weights (the config names only the CLIP's head count).
    assert model.config.vision == cfg.vision
    assert model.config.mod.layers == tuple(MOD_LAYERS) and model.config.image_token_index == -200
    ids = np.where(reference["ids"] == cfg.image_token_index, model.config.image_token_index, reference["ids"])
    pixels = reference["pixels"].transpose(0, 2, 3, 1)
    out = model.forward(ids, pixels, mode="inference")
    assert out["skip_ratio"] == 0.0  # every token kept, as the hooked reference assumes
    diff = float(np.max(np.abs(out["logits"] - reference["logits"])))
    assert diff <= TOL, f"max |logit diff| {diff:.2e}"

    assert to_hf_main(["--src", str(ckpt), "--out", str(exported), "--format", "gamma_mod_hr"]) == 0
    source, written = CheckpointReader(src), CheckpointReader(exported)
    dropped = {k for k in source.entries if k.startswith(hr.SLOW + "head.") or k.endswith("position_ids")}
    assert len(dropped) == 7
    routers = [f"model.layers.{i}.router.weight" for i in MOD_LAYERS]
    copies = set(routers[1:]) if container == "bin" else set()  # the export stores the router once
    assert set(written.entries) == set(source.entries) - dropped - copies
    for key, value in written.iter_tensors():
        theirs = source.read(key)
        assert value.dtype == theirs.dtype and np.array_equal(value, theirs), key
    for key in copies:
        assert np.array_equal(source.read(key), written.read(routers[0]))
    raw = json.loads((exported / "config.json").read_text())
    assert raw["model_type"] == "mod_llava_llama" and raw["is_multipath_encoder"] and not raw["freeze_vision"]
    again, params, _ = pipeline.load_params(exported)  # the exported config reads back to the same model
    assert again == model.config
    for path, value in flatten(params).items():
        assert np.array_equal(value, flatten(model.params)[path]), path


def test_stage1_llava_hr_without_adapters_round_trips(tmp_path, reference):
    """Dense LLaVA-HR (`llava`, freeze_vision true: no MR-adapters, as stage 1 saves it)."""
    cfg = C.tiny_hr()
    sd = {k: v for k, v in reference["sd"].items() if "align_stages_latent" not in k}
    src = tmp_path / "src"
    fx.write_weights(sd, src, "safetensors")
    fx.write_json(src / "config.json", hr.official_config(cfg, adapters=False))
    config, params, info = pipeline.load_params(src)
    assert info["layout"] == "E_hr" and not config.vision.latent_adapters and not config.mod.enabled
    assert "adapters" not in params["vision"]
    assert convert_main(["--src", str(src), "--out", str(tmp_path / "ckpt")]) == 0
    assert to_hf_main(["--src", str(tmp_path / "ckpt"), "--out", str(tmp_path / "gm"), "--format", "gamma_mod_hr"]) == 2
    assert to_hf_main(["--src", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")]) == 2  # HF LLaVA has no slow tower
    assert to_hf_main(["--src", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out"), "--format", "llava_hr"]) == 0
    source, written = CheckpointReader(src), CheckpointReader(tmp_path / "out")
    dropped = {k for k in source.entries if k.startswith(hr.SLOW + "head.") or k.endswith("position_ids")}
    assert set(written.entries) == set(source.entries) - dropped
    for key, value in written.iter_tensors():
        assert np.array_equal(value, source.read(key)), key
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "llava"


def _xxl_depths(sd: dict) -> dict:
    """The slow trunk's blocks repeated to ConvNeXt-XXL's stage depths (3, 4, 30, 3), tiny widths."""
    out = {k: v for k, v in sd.items() if not k.startswith(hr.SLOW + "stages.") or ".blocks." not in k}
    for stage, depth in enumerate((3, 4, 30, 3)):
        first = f"{hr.SLOW}stages.{stage}.blocks.0."
        for k, v in sd.items():
            if k.startswith(first):
                for b in range(depth):
                    out[k.replace(".blocks.0.", f".blocks.{b}.")] = v.clone()
    return out


def test_convnext_xxl_is_named_not_loaded(tmp_path, reference, capsys):
    cfg = reference["cfg"]
    by_name = hr.official_config(cfg, MOD_LAYERS, slow_name="convnext_xxlarge.clip_laion2b_soup")
    _cli_fails(tmp_path, _write(tmp_path, reference, "safetensors", "name", by_name), "convnext_xxlarge",
               "not supported", capsys=capsys)
    by_shape = _write(tmp_path, reference, "safetensors", "shape", sd=_xxl_depths(reference["sd"]))
    _cli_fails(tmp_path, by_shape, "ConvNeXt-XXL", "depths [3, 4, 30, 3]", capsys=capsys)


def test_missing_adapter_key_is_named(tmp_path, reference, capsys):
    key = "model.vision_tower.align_stages_latent.1.gate.0.weight"
    sd = {k: v for k, v in reference["sd"].items() if k != key}
    _cli_fails(tmp_path, _write(tmp_path, reference, "bin", sd=sd), "missing keys (1)", key, capsys=capsys)


def test_config_problems_are_named(tmp_path, reference, capsys):
    """A config without S, and one whose CLIP head count cannot be told: one line each."""
    cfg = hr.official_config(reference["cfg"], MOD_LAYERS)
    del cfg["input_image_size"]
    del cfg["mm_vision_config"]
    _cli_fails(tmp_path, _write(tmp_path, reference, "safetensors", config=cfg), "input_image_size is missing",
               "mm_vision_config.num_attention_heads is needed", capsys=capsys)


def test_stray_block_index_stops_before_allocation(tmp_path, reference, capsys):
    """Depths are read from key names, so one stray index must not grow the expected-key table."""
    key = hr.SLOW + "stages.1.blocks.999999999.norm.weight"
    sd = {**reference["sd"], key: torch.zeros(16)}
    _cli_fails(tmp_path, _write(tmp_path, reference, "safetensors", sd=sd), "exceed the", key, capsys=capsys)


def test_router_copies_must_agree(tmp_path, reference, capsys):
    src = _write(tmp_path, reference, "bin")
    sd = torch.load(src / "pytorch_model-00002-of-00002.bin")
    sd["model.layers.3.router.weight"] = sd["model.layers.3.router.weight"] + 1.0
    torch.save(sd, src / "pytorch_model-00002-of-00002.bin")
    _cli_fails(tmp_path, src, "model.layers.3.router.weight differs from model.layers.1.router.weight",
               capsys=capsys)


def _header_shapes(cfg, layout: str = "gamma_mod_hr") -> dict:
    """On-disk key -> shape of a full-size checkpoint of `cfg`, from the declared layout alone
    (what the converter sees in shard headers before reading any tensor)."""
    from convert import keymap

    shapes = {keymap.export_key(cfg, c, layout): t.torch_shape for c, t in keymap.expected_keys(cfg).items()}
    shapes[hr.SLOW + "head.fc.weight"] = (1000, cfg.vision.slow.width)
    for i in cfg.mod_layers:
        shapes[f"model.layers.{i}.router.weight"] = (2, cfg.text.hidden_size)
    return shapes


def test_real_7b_and_13b_geometry_is_read_from_headers():
    """γ-MoD-LLaVA-HR-7B/13B as released (no mm_vision_config: CLIP-L/336 heads from the OpenAI
    head width) read back to the presets; ConvNeXt-XXL's real shapes are named."""
    from convert import hf_config

    for preset in (C.llava_hr_7b, C.llava_hr_13b):
        cfg = C.gamma_mod(preset())
        raw = hr.official_config(cfg, list(cfg.mod.layers))
        del raw["mm_vision_config"]
        source = hf_config.llava_hr_config(raw, _header_shapes(cfg))
        assert source.kind == "gamma_mod_hr"
        assert source.model.vision == cfg.vision and source.model.text == cfg.text
        assert source.model.mod.layers == cfg.mod.layers and source.model.image_token_index == -200
    xxl = C.llava_hr_7b()
    xxl = xxl.replace(vision=dataclasses.replace(xxl.vision, slow=C.ConvNeXtConfig(
        depths=(3, 4, 30, 3), dims=(384, 768, 1536, 3072), norm_eps=1e-5)))
    raw = hr.official_config(xxl)
    del raw["mm_vision_config"]
    with pytest.raises(UnsupportedFormatError, match=r"ConvNeXt-XXL \(convnext_xxlarge"):
        hf_config.llava_hr_config(raw, _header_shapes(xxl, "E_hr"))
