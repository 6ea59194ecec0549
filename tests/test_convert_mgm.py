"""Official Mini-Gemini / γ-MoD-MGM checkpoints: convert, load, match the reference, export.

A tiny γ-MoD-MGM (grid 2 + global view: 20 image tokens) is built from the PyTorch reference of
tests/mgm_reference.py (transformers CLIP, hand-written ConvNeXt trunk and patch info mining,
transformers Llama with γ-MoD's inference rule hooked in) and written under the official key
names by tests/mgm_fixtures.py: as a 4.31-style `.bin` (router under every MoD layer) and as a
4.36-style safetensors (router once), with the towers inside, or without them and the towers
in an HF CLIP directory and an open_clip checkpoint. Every form goes through `python -m convert`;
the logits match the reference and the export writes every tensor back bit for bit.
"""

from __future__ import annotations

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import gmod_jax
from convert import pipeline
from convert.__main__ import main as convert_main
from convert.readers import CheckpointReader
from convert.to_hf import main as to_hf_main
from gmod_jax import config as C
from gmod_jax.api import Model
from gmod_jax.checkpoint import flatten
from gmod_jax.models.llava import LlavaModel
from tests import hf_fixtures as fx
from tests import mgm_fixtures as mf
from tests import mgm_reference as ref_lib

LOGITS_TOL = 1e-4
TOKENS_TOL = 1e-5
MOD_LAYERS = [1, 3]  # of 4


@pytest.fixture(scope="module")
def reference():
    """The reference model, its router and reference vision tokens / logits of two rows with one
    image each (grid 2 + global view)."""
    cfg = C.gamma_mod_mgm(C.tiny_mgm(2, True), "explicit", 0.5, layers=tuple(MOD_LAYERS))
    ref = ref_lib.build(cfg, seed=3)
    router = 0.05 * torch.randn(2, cfg.text.hidden_size, generator=torch.Generator().manual_seed(7))
    rng = np.random.default_rng(8)
    n = cfg.image_seq_length
    ids = np.concatenate([[[1]] * 2, rng.integers(3, 100, (2, 4)), np.full((2, n), cfg.image_token_index),
                          rng.integers(3, 100, (2, 5))], axis=1).astype(np.int64)
    aux = rng.standard_normal((2, 3, *cfg.pixel_shape[:2])).astype(np.float32)
    with torch.no_grad():
        views = torch.stack([ref.views(torch.tensor(a)) for a in aux])
        tokens = ref.encode_images(views, torch.tensor(aux))
        dense = ref.logits(ids, tokens).numpy()
        probs = fx.patch_gamma_mod(ref.llm.model.layers, router, MOD_LAYERS)
        logits = ref.logits(ids, tokens).numpy()
    for i in MOD_LAYERS:  # the hooked reference is exact only while the 0.005 threshold keeps every token
        assert float(probs[i].min()) > 0.005
    # The router's MLP scaling moves the logits far beyond the tolerance, so matching them below
    # proves the converted router is applied.
    assert float(np.max(np.abs(logits - dense))) > 100 * LOGITS_TOL
    return {"cfg": cfg, "ref": ref, "router": router, "ids": ids, "aux": aux, "tokens": tokens.numpy(),
            "logits": logits}


def _write(tmp_path, reference, container, name="src", towers=True, config=None):
    return mf.write_checkpoint(reference["ref"], tmp_path / name, container,
                               config or mf.official_config(reference["cfg"], MOD_LAYERS), reference["router"],
                               MOD_LAYERS, towers)


@functools.lru_cache(maxsize=None)
def _vision_fn(config):
    """The jitted vision tower of `config` (compiled once for every test that uses it)."""
    return jax.jit(lambda p, x: LlavaModel(config).apply({"params": p}, x, method=lambda m, y: m.vision(y)))


def _assert_exported_exactly(source: CheckpointReader, written: CheckpointReader, dropped: set, router_copies: set):
    assert set(written.entries) == set(source.entries) - dropped - router_copies
    for key, value in written.iter_tensors():
        theirs = source.read(key)
        assert value.dtype == theirs.dtype and np.array_equal(value, theirs), key


@pytest.mark.parametrize("container", ["bin", "safetensors"])
def test_official_gamma_mod_mgm_converts_loads_matches_and_exports_exactly(tmp_path, reference, container):
    cfg = reference["cfg"]
    src = _write(tmp_path, reference, container)
    ckpt, exported = tmp_path / "ckpt", tmp_path / "exported"
    assert convert_main(["--src", str(src), "--out", str(ckpt), "--json"]) == 0
    info = json.loads((ckpt / "conversion.json").read_text())
    assert info["layout"] == "gamma_mod_mgm" and info["kind"] == "gamma_mod_mgm"

    model = gmod_jax.load(str(ckpt))
    # Every tower size was read off the weights (the config names only the CLIP's head count).
    assert model.config.vision == cfg.vision
    assert model.config.mod.layers == tuple(MOD_LAYERS) and model.config.mod.router_init == "xavier_uniform"
    assert model.config.image_token_index == -200 and model.config.tokenizer_model_max_length == mf.MAX_LENGTH
    pixels = reference["aux"].transpose(0, 2, 3, 1)
    tokens = _vision_fn(model.config)(model.params, jnp.asarray(pixels))
    diff = float(np.max(np.abs(np.asarray(tokens) - reference["tokens"])))
    assert diff <= TOKENS_TOL, f"vision tokens max |diff| {diff:.2e}"
    ids = np.where(reference["ids"] == cfg.image_token_index, model.config.image_token_index, reference["ids"])
    # One threshold bucket (the static bound: every token passing 0.005) is the same rule and
    # result as the default buckets, for a third of the compile time.
    one_bucket = model.config.replace(mod=dataclasses.replace(model.config.mod, threshold_buckets=1))
    out = Model(one_bucket, model.params).forward(ids, pixels, mode="inference")
    assert out["skip_ratio"] == 0.0  # every token kept, as the hooked reference assumes
    diff = float(np.max(np.abs(out["logits"] - reference["logits"])))
    assert diff <= LOGITS_TOL, f"max |logit diff| {diff:.2e}"

    assert to_hf_main(["--src", str(ckpt), "--out", str(exported), "--format", "gamma_mod_mgm"]) == 0
    source, written = CheckpointReader(src), CheckpointReader(exported)
    routers = [f"model.layers.{i}.router.weight" for i in MOD_LAYERS]
    copies = set(routers[1:]) if container == "bin" else set()  # the export stores the router once
    _assert_exported_exactly(source, written, {mf.CLIP + "embeddings.position_ids"}, copies)
    raw = json.loads((exported / "config.json").read_text())
    assert raw["model_type"] == "mod_mgm" and raw["mm_vision_tower_aux"] == mf.AUX_NAME
    for field in ("image_grid", "image_global", "image_size_aux", "mm_hidden_size_aux", "tokenizer_model_max_length",
                  "mm_hidden_size", "mm_vision_select_layer"):
        assert raw[field] == mf.official_config(cfg, MOD_LAYERS)[field], field
    again, params, _ = pipeline.load_params(exported)  # the exported config reads back to the same model
    assert again == model.config
    for path, value in flatten(params).items():
        assert np.array_equal(value, flatten(model.params)[path]), path


@pytest.mark.parametrize("aux_form", ["bin_wrapped", "safetensors_dir"])
def test_towers_from_separate_files(tmp_path, reference, aux_form):
    """Released MGM checkpoints may omit both frozen towers: they come from an HF CLIP directory
    (--vision-tower) and an open_clip checkpoint (--vision-tower-aux), whose unused heads, text
    tower and logit_scale are dropped; the result equals the conversion with the towers inside."""
    ref = reference["ref"]
    full = _write(tmp_path, reference, "safetensors", "full")
    bare = _write(tmp_path, reference, "safetensors", "bare", towers=False)
    assert not any(k.startswith((mf.CLIP, mf.AUX)) for k in CheckpointReader(bare).entries)
    clip_dir = mf.write_clip_dir(ref, tmp_path / "clip")
    if aux_form == "bin_wrapped":
        aux = mf.write_open_clip(ref, tmp_path / "open_clip" / "epoch_3.pt", "bin", wrapped=True)
    else:
        mf.write_open_clip(ref, tmp_path / "open_clip" / "open_clip_model.safetensors")
        aux = tmp_path / "open_clip"
    ckpt = tmp_path / "ckpt"
    assert convert_main(["--src", str(bare), "--out", str(ckpt), "--vision-tower", str(clip_dir),
                         "--vision-tower-aux", str(aux), "--json"]) == 0
    info = json.loads((ckpt / "conversion.json").read_text())
    assert info["vision_tower_source"] == str(clip_dir) and info["vision_tower_aux_source"]
    config, params = gmod_jax.checkpoint.load_checkpoint(ckpt)
    want_config, want, _ = pipeline.load_params(full)
    assert config == want_config
    assert flatten(params).keys() == flatten(want).keys()
    for path, value in flatten(want).items():
        assert np.array_equal(np.asarray(flatten(params)[path]), value), path


def test_plain_mgm_round_trips_and_matches_the_reference_tree(tmp_path, reference):
    """Dense Mini-Gemini (`mgm`, no router): the converted tree is the reference's (whose parity
    tests/test_mgm.py proves); it exports back exactly; non-HD settings (grid 1, no global view)
    read from the same weights."""
    ref, dense = reference["ref"], C.tiny_mgm(2, True)
    src = mf.write_checkpoint(ref, tmp_path / "src", "safetensors", mf.official_config(dense))
    config, params, info = pipeline.load_params(src)
    assert info["layout"] == "E_mgm" and info["kind"] == "mgm" and not config.mod.enabled
    assert config.vision == dense.vision and config.tokenizer_model_max_length == mf.MAX_LENGTH
    want = flatten(ref_lib.flax_params(ref))
    assert flatten(params).keys() == want.keys()
    for path, value in want.items():
        assert np.array_equal(flatten(params)[path], value), path

    ckpt = tmp_path / "ckpt"
    assert convert_main(["--src", str(src), "--out", str(ckpt)]) == 0
    for fmt in ("gamma_mod_mgm", "hf", "gamma_mod", "llava_hr"):  # no router / no aux tower in those
        assert to_hf_main(["--src", str(ckpt), "--out", str(tmp_path / fmt), "--format", fmt]) == 2
        assert not (tmp_path / fmt).exists()
    assert to_hf_main(["--src", str(ckpt), "--out", str(tmp_path / "out"), "--format", "mgm"]) == 0
    _assert_exported_exactly(CheckpointReader(src), CheckpointReader(tmp_path / "out"),
                             {mf.CLIP + "embeddings.position_ids"}, set())
    raw = json.loads((tmp_path / "out" / "config.json").read_text())
    assert raw["model_type"] == "mgm" and "mod" not in raw

    non_hd = C.tiny_mgm(1, False)
    (src / "config.json").write_text(json.dumps(mf.official_config(non_hd)))
    config, _, _ = pipeline.load_params(src)
    assert config.vision == non_hd.vision and config.image_seq_length == 4


def test_real_mgm_hd_7b_geometry_is_read_from_headers():
    """γ-MoD-MGM-HD-7B as released (no mm_vision_config: CLIP-L/336's heads from the OpenAI head
    width; ConvNeXt-L's depths and widths from the aux keys) reads back to the preset, from the
    checkpoint's own keys or from an open_clip checkpoint's."""
    from convert import hf_config, keymap, pipeline as pl

    cfg = C.gamma_mod_mgm_hd_7b()
    raw = mf.official_config(cfg, list(cfg.mod.layers), aux_name="laion/CLIP-convnext_large_d_320.laion2B-s29B-b131K-ft-soup")
    del raw["mm_vision_config"]
    raw["tokenizer_model_max_length"] = cfg.tokenizer_model_max_length
    shapes = {keymap.export_key(cfg, c, "gamma_mod_mgm"): t.torch_shape for c, t in keymap.expected_keys(cfg).items()}
    shapes[f"model.layers.{cfg.mod.layers[0]}.router.weight"] = (2, cfg.text.hidden_size)
    source = hf_config.mgm_config(raw, shapes)
    assert source.kind == "gamma_mod_mgm" and source.model.vision == cfg.vision and source.model.text == cfg.text
    assert source.model.mod == cfg.mod and source.model.image_seq_length == 2880
    assert source.model.tokenizer_model_max_length == cfg.tokenizer_model_max_length

    class OpenClipHeaders:  # what pipeline.aux_shapes reads: an open_clip checkpoint's header
        entries = {("visual.trunk." + k[len(mf.AUX + "vision_"):]): type("E", (), {"shape": s})()
                   for k, s in shapes.items() if k.startswith(mf.AUX)}

    bare = {k: s for k, s in shapes.items() if not k.startswith(mf.AUX)}
    again = hf_config.mgm_config(raw, bare, aux_shapes=pl.aux_shapes(OpenClipHeaders))
    assert again.model == source.model
