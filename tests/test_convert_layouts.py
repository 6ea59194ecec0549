"""Every LLaVA key layout and container converts to the same Flax params; HF -> Flax -> HF is exact."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch

from convert import hf_config, keymap, pipeline
from convert.__main__ import main as convert_main
from gmod_jax.checkpoint import flatten, load_checkpoint
from convert.readers import CheckpointReader
from convert.to_hf import main as to_hf_main
from tests import hf_fixtures as fx

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The base tiny model, its layout-C state dict, and a directory factory for layouts."""
    spec = fx.SPECS["base"]
    model = fx.build_model(spec)
    sd = fx.state_dict_c(model)
    root = tmp_path_factory.mktemp("layouts")
    made = {}

    def make(layout: str, container: str = "safetensors", shards: int = 1, config: str = "v5",
             legacy_buffers: bool = False) -> Path:
        key = (layout, container, shards, config, legacy_buffers)
        if key in made:
            return made[key]
        out = root / "-".join(map(str, key))
        weights = fx.rename(sd, layout)
        if legacy_buffers:
            weights = fx.with_legacy_buffers(weights, spec, layout)
        fx.write_weights(weights, out, container, shards)
        if layout == "E":
            fx.write_json(out / "config.json", fx.config_original(spec, dtype="float32"))
        else:
            fx.write_json(out / "config.json", fx.config_v5(spec) if config == "v5" else fx.config_v4_diff(spec))
        fx.write_tokenizer_files(out)
        made[key] = out
        return out

    clip = root / "clip"
    fx.write_clip_dir(sd, spec, clip)
    saved = root / "saved"  # transformers' own save_pretrained output (layout D, sharded)
    model.save_pretrained(saved, max_shard_size="20KB")
    return {"spec": spec, "model": model, "sd": sd, "make": make, "clip": clip, "saved": saved, "root": root}


@pytest.fixture(scope="module")
def reference(base):
    config, params, info = pipeline.load_params(base["saved"])
    assert info["layout"] == "D" and info["shards"] > 10
    return config, flatten(params)


def _assert_same_tree(flat_a: dict, flat_b: dict):
    assert set(flat_a) == set(flat_b)
    for path in flat_a:
        a, b = np.asarray(flat_a[path]), np.asarray(flat_b[path])
        assert a.dtype == b.dtype and a.shape == b.shape, path
        assert np.array_equal(a.view(np.uint8), b.view(np.uint8)), path


@pytest.mark.parametrize("layout,container,shards,config,legacy", [
    ("A", "safetensors", 1, "v4", True),
    ("A", "bin", 3, "v4", True),
    ("B", "safetensors", 4, "v5", False),
    ("B", "bin", 1, "v4", False),
    ("C", "safetensors", 1, "v5", False),
    ("C", "bin", 2, "v5", False),
    ("D", "safetensors", 1, "v4", False),
    ("D", "bin", 5, "v5", False),
])
def test_hf_layouts_convert_identically(base, reference, layout, container, shards, config, legacy):
    src = base["make"](layout, container, shards, config, legacy)
    cfg, params, info = pipeline.load_params(src)
    assert info["layout"] == layout and info["container"] == ("torch" if container == "bin" else "safetensors")
    assert cfg == reference[0]
    _assert_same_tree(flatten(params), reference[1])


@pytest.mark.parametrize("container", ["safetensors", "bin"])
def test_original_layout_with_separate_clip(base, reference, container):
    src = base["make"]("E", container, 2, legacy_buffers=True)
    cfg, params, info = pipeline.load_params(src, vision_tower=base["clip"])
    assert info["layout"] == "E"
    ref_cfg = reference[0]
    # Same weights; only the image placeholder differs (original LLaVA splices at id -200).
    assert cfg.image_token_index == hf_config.ORIGINAL_IMAGE_TOKEN_INDEX
    assert cfg.replace(image_token_index=ref_cfg.image_token_index, pad_token_id=ref_cfg.pad_token_id) == ref_cfg
    _assert_same_tree(flatten(params), reference[1])


def test_original_layout_with_embedded_tower(base, reference, tmp_path):
    spec, sd = base["spec"], base["sd"]
    weights = fx.rename(sd, "E")
    weights.update({"model.vision_tower.vision_tower." + k: v for k, v in fx.tower_state(sd).items()})
    fx.write_weights(weights, tmp_path)
    cfg = fx.config_original(spec)
    cfg["mm_vision_tower"] = "some/tiny-clip"
    fx.write_json(tmp_path / "config.json", cfg)
    with pytest.raises(hf_config.ConversionError, match="--vision-tower"):
        pipeline.load_params(tmp_path)  # a non-CLIP-L/336 tower needs its config
    cfg["mm_vision_tower"] = "openai/clip-vit-large-patch14-336"
    fx.write_json(tmp_path / "config.json", cfg)
    with pytest.raises(hf_config.ConversionError, match="mm_hidden_size 32 contradicts"):
        pipeline.load_params(tmp_path)  # CLIP-L/336 defaults contradict the tiny tower
    # --vision-tower then supplies only the config; the embedded (maybe fine-tuned) weights win.
    _, params, info = pipeline.load_params(tmp_path, vision_tower=base["clip"])
    assert info["vision_tower_source"] is None and "only the config" in info["notes"][0]
    _assert_same_tree(flatten(params), reference[1])
    cfg["mm_vision_config"] = fx.CLIPVisionConfig(hidden_size=spec.v_hidden, intermediate_size=spec.v_inter,
                                                  num_hidden_layers=spec.v_layers, num_attention_heads=spec.v_heads,
                                                  image_size=spec.image, patch_size=spec.patch).to_dict()
    fx.write_json(tmp_path / "config.json", cfg)
    _, params, info = pipeline.load_params(tmp_path)
    assert info["layout"] == "E"
    _assert_same_tree(flatten(params), reference[1])


def test_v4_diff_config_fills_transformers_defaults(base, reference):
    # The yarn spec uses LlamaConfig's defaults (rms_norm_eps 1e-6, max_position_embeddings 2048),
    # so its diff-serialised text_config omits both; the reader must supply them.
    spec = fx.SPECS["yarn_biases"]
    raw = fx.config_v4_diff(spec)
    assert "rms_norm_eps" not in raw["text_config"] and "max_position_embeddings" not in raw["text_config"]
    assert "rope_scaling" in raw["text_config"] and "rope_parameters" not in raw["text_config"]
    v4 = hf_config.hf_llava_config(raw).model
    v5 = hf_config.hf_llava_config(fx.config_v5(spec)).model
    assert v4 == v5
    assert v4.text.rms_norm_eps == 1e-6 and v4.text.max_position_embeddings == 2048
    assert v4.text.rope_scaling_dict["rope_type"] == "yarn" and v4.text.rope_theta == 20000.0
    assert v4.text.attention_bias and v4.text.mlp_bias
    # A config without vision_config gets LlavaConfig's CLIP-L/336 tower, not CLIPVisionConfig's ViT-B/32.
    bare = hf_config.hf_llava_config({"model_type": "llava", "text_config": {"model_type": "llama"}}).model
    assert (bare.vision.hidden_size, bare.vision.num_layers, bare.vision.image_size) == (1024, 24, 336)
    assert bare.text.rms_norm_eps == 1e-6 and bare.image_token_index == 32000
    assert bare.text.initializer_range == 0.02  # LlamaConfig's default init std
    assert hf_config.hf_llava_config({"model_type": "llava", "image_token_id": 7}).model.image_token_index == 7


def test_streaming_orbax_matches_in_memory(base, reference, tmp_path):
    src = base["make"]("A", "bin", 3, "v4", True)
    out = tmp_path / "ckpt"
    summary = pipeline.convert_checkpoint(src, out, batch_bytes=4096)  # forces many partial saves
    assert summary["batches"] > 5
    config, params = load_checkpoint(out)
    assert config == reference[0]
    _assert_same_tree(flatten(params), reference[1])
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["params", "config.json", "conversion.json", "tokenizer_config.json", "special_tokens_map.json",
         "chat_template.jinja"])
    assert not list(tmp_path.glob("ckpt.tmp-*"))


def _hf_logits(model, spec):
    ids, mask, pixels = fx.parity_inputs(spec)
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                     pixel_values=torch.tensor(pixels)).logits.numpy()


@pytest.mark.parametrize("spec_name,dtype", [("base", "float32"), ("llama3_tied", "bfloat16"),
                                             ("dynamic_full_nobias", "float16")])
def test_round_trip_hf_flax_hf_is_exact(tmp_path, spec_name, dtype):
    from transformers import LlavaForConditionalGeneration

    spec = fx.SPECS[spec_name]
    model = fx.build_model(spec, seed=3)
    sd = fx.to_dtype(fx.state_dict_c(model), getattr(torch, dtype))
    src = tmp_path / "src"
    fx.write_weights(fx.rename(sd, "D"), src, "safetensors", shards=3)
    config = fx.config_v5(spec)
    config["text_config"]["initializer_range"] = 0.031  # not the default: the value must travel both ways
    fx.write_json(src / "config.json", config)
    fx.write_tokenizer_files(src)
    assert convert_main(["--src", str(src), "--out", str(tmp_path / "flax"), "--json"]) == 0
    assert to_hf_main(["--src", str(tmp_path / "flax"), "--out", str(tmp_path / "hf"),
                       "--max-shard-size", "30KB"]) == 0
    exported = CheckpointReader(tmp_path / "hf")
    original = CheckpointReader(src)
    assert len(exported.files) > 1 and (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    # A tied lm_head is the embedding itself: the state dict lists it, 5.24's save omits it, and
    # so does the export (the converter checked it equals the embedding).
    tied = {"language_model.lm_head.weight"} if spec.tie else set()
    assert set(exported.entries) == set(original.entries) - tied
    for key, value in original.iter_tensors(sorted(set(original.entries) - tied)):
        other = exported.read(key)
        assert other.dtype == value.dtype and other.shape == value.shape, key
        assert np.array_equal(other.view(np.uint8), value.view(np.uint8)), key
    assert (tmp_path / "hf" / "chat_template.jinja").is_file()
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["text_config"]["initializer_range"] == 0.031

    loaded, info = LlavaForConditionalGeneration.from_pretrained(
        tmp_path / "hf", output_loading_info=True, attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert loaded.dtype == getattr(torch, dtype)
    if dtype == "float32":
        source_model = LlavaForConditionalGeneration.from_pretrained(src, attn_implementation="eager")
        np.testing.assert_array_equal(_hf_logits(loaded.eval(), spec), _hf_logits(source_model.eval(), spec))


def test_bf16_keep_and_cast_policies(base, tmp_path):
    spec, sd = base["spec"], base["sd"]
    src = tmp_path / "bf16"
    fx.write_weights(fx.to_dtype(fx.rename(sd, "D"), torch.bfloat16), src, "bin", shards=2)
    fx.write_json(src / "config.json", fx.config_v5(spec))
    cfg, params, _ = pipeline.load_params(src)
    flat = flatten(params)
    assert cfg.param_dtype == "bfloat16" and all(v.dtype == ml_dtypes.bfloat16 for v in flat.values())
    expected = sd["model.language_model.layers.1.mlp.down_proj.weight"].to(torch.bfloat16).float().numpy().T
    np.testing.assert_array_equal(flat[("llm", "layers", "mlp", "down", "kernel")][1].astype(np.float32), expected)
    cfg32, params32, _ = pipeline.load_params(src, dtype="float32")
    assert cfg32.param_dtype == "float32"
    for path, value in flatten(params32).items():
        assert value.dtype == np.float32
        np.testing.assert_array_equal(value, flat[path].astype(np.float32))


def test_gamma_mod_bin_and_safetensors(tmp_path):
    spec3 = fx.Spec(name="mod", layers=4)
    sd3 = fx.state_dict_c(fx.build_model(spec3, seed=5))
    mod_layers = [1, 2, 3]
    trees = []
    for container, shards in (("bin", 2), ("safetensors", 1)):
        out = tmp_path / container
        router = fx.write_gamma_mod(sd3, spec3, out, mod_layers, container, shards)
        cfg, params, info = pipeline.load_params(out)
        assert info["layout"] == "gamma_mod" and info["extras"]["capacity_factor"] == 0.5
        assert cfg.mod.enabled and cfg.mod.layers == (1, 2, 3) and cfg.mod.shared_router
        assert cfg.image_token_index == -200
        flat = flatten(params)
        np.testing.assert_array_equal(flat[("llm", "mod_router", "kernel")], router.numpy().T)
        trees.append(flat)
    _assert_same_tree(*trees)
    # The .bin stored all three router names aliasing one storage.
    reader = CheckpointReader(tmp_path / "bin")
    routers = [k for k in reader.entries if k.endswith("router.weight")]
    assert len(routers) == 3
    same_shard = [k for k in routers if reader.entries[k].file == reader.entries[routers[0]].file]
    assert len({reader.entries[k].locator[0] for k in same_shard}) == 1

    # Flax -> γ-MoD export -> Flax again.
    assert convert_main(["--src", str(tmp_path / "safetensors"), "--out", str(tmp_path / "flax")]) == 0
    assert to_hf_main(["--src", str(tmp_path / "flax"), "--out", str(tmp_path / "gm"), "--format", "gamma_mod"]) == 0
    raw = json.loads((tmp_path / "gm" / "config.json").read_text())
    assert raw["model_type"] == "mod_llava_llama" and raw["mod"]["mod_layers_idx"] == [1, 2, 3]
    assert raw["mod"]["capacity_factor"] == 0.5
    exported = CheckpointReader(tmp_path / "gm")
    source = CheckpointReader(tmp_path / "safetensors")
    assert set(exported.entries) == set(source.entries)
    for key, value in source.iter_tensors():
        assert np.array_equal(exported.read(key), value), key
    _, again, _ = pipeline.load_params(tmp_path / "gm")
    _assert_same_tree(flatten(again), trees[0])
    # A γ-MoD checkpoint cannot become an HF LLaVA (no router there).
    assert to_hf_main(["--src", str(tmp_path / "flax"), "--out", str(tmp_path / "nohf")]) == 2
    assert not (tmp_path / "nohf").exists()


def test_cli_subprocess_summary(base, tmp_path):
    src = base["make"]("C", "safetensors", 1)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "convert", "--src", str(src), "--out", str(out), "--dtype", "bfloat16"]
    proc = subprocess.run(cmd,
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for word in ("layout      C", "params", "bfloat16", "GB/s"):
        assert word in proc.stdout
    config, params = load_checkpoint(out)
    assert config.param_dtype == "bfloat16"
    assert {v.dtype for v in flatten(params).values()} == {np.dtype(ml_dtypes.bfloat16)}


def test_leaf_shapes_cover_every_param(reference):
    config, flat = reference
    assert {p: v.shape for p, v in flat.items()} == keymap.leaf_shapes(config)
