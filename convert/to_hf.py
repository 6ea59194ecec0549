"""`python -m convert.to_hf --src CKPT --out DIR [--format hf|gamma_mod|llava_hr|gamma_mod_hr|mgm|gamma_mod_mgm] [--max-shard-size 5GB]`

Flax -> PyTorch export of a gmod-jax checkpoint:
  hf         transformers 5.x `LlavaForConditionalGeneration` directory (config.json with full
             sub-configs, layout-D safetensors), loadable with `from_pretrained`.
  gamma_mod  γ-MoD `mod_llava_llama` directory: original-LLaVA keys, the tower under
             model.vision_tower.vision_tower.vision_model.*, and the shared router stored once as
             model.layers.<first MoD layer>.router.weight (what a safetensors save of the
             official code keeps).
  llava_hr   LLaVA-HR (`llava`, is_multipath_encoder) directory: original-LLaVA keys, the CLIP
             fast path under model.vision_tower.fast_vision_tower.vision_tower.vision_model.*, the
             ConvNeXt slow trunk under model.vision_tower.slow_vision_tower.vision_tower.* (without
             the unused classifier head, which the importer drops), the MR-adapters and fusion
             under model.vision_tower.align_stages{_latent}.*.
  gamma_mod_hr  γ-MoD-LLaVA-HR (`mod_llava_llama` + multi-path tower): llava_hr's keys and the
             shared router stored once, as gamma_mod.
  mgm        Mini-Gemini (`mgm`) directory: original-LLaVA keys, the CLIP main tower under
             model.vision_tower.vision_tower.vision_model.*, the open_clip ConvNeXt aux trunk under
             model.vision_tower_aux.{vision_stem,vision_stages}.* (layer scale `gamma`), the
             patch-info-mining projectors model.vlm_uni_{query,aux,val}_projector.{0,1}.*.
  gamma_mod_mgm  γ-MoD-MGM (`mod_mgm`): mgm's keys and the shared router stored once, as gamma_mod.
Tensors keep their dtype and values bit for bit; the key map is the same table the importer uses.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np

from convert import hf_config, keymap
from convert.errors import ConversionError
from convert.host import run_cli
from gmod_jax.checkpoint import copy_tokenizer_files, flatten, load_checkpoint
from convert.readers import write_sharded_safetensors
from gmod_jax.config import ModelConfig

FORMATS = ("hf", "gamma_mod", "llava_hr", "gamma_mod_hr", "mgm", "gamma_mod_mgm")


def torch_tensors(config: ModelConfig, params: dict, layout: str) -> Iterator[tuple[str, np.ndarray]]:
    """(on-disk key, PyTorch-layout array) for every tensor of `params`, in HF module order."""
    if config.mod.enabled and not config.mod.shared_router:
        raise ConversionError("per-layer γ-MoD routers (mod.shared_router false) have no PyTorch layout: the "
                              "official code stores one router shared by every MoD layer")
    flat = flatten(params)
    expected = keymap.expected_keys(config)
    wanted = {t.path for t in expected.values()}
    if config.mod.enabled:
        wanted.add(keymap.router_target(config).path)
    problems = []
    extra = sorted("/".join(p) for p in set(flat) - wanted)
    missing = sorted("/".join(p) for p in wanted - set(flat))
    if extra or missing:
        raise ConversionError(f"params do not match config.json: missing {missing or 'none'}, unexpected "
                              f"{extra or 'none'}")
    shapes = keymap.leaf_shapes(config)
    for path, shape in shapes.items():
        if tuple(np.shape(flat[path])) != shape:
            problems.append(f"{'/'.join(path)}: {list(np.shape(flat[path]))} vs config {list(shape)}")
    if problems:
        raise ConversionError("params do not match config.json: " + "; ".join(problems))
    for canonical, target in expected.items():
        leaf = np.asarray(flat[target.path])
        value = leaf if target.layer is None else leaf[target.layer]
        yield keymap.export_key(config, canonical, layout), target.to_torch(value)
    if config.mod.enabled:
        rt = keymap.router_target(config)
        first = config.mod.layers[0]
        yield f"model.layers.{first}.router.weight", rt.to_torch(np.asarray(flat[rt.path]))


def export(src: str | os.PathLike, out: str | os.PathLike, fmt: str = "hf", max_shard_size: str | int = "5GB",
           overwrite: bool = False) -> dict:
    """Write `out` atomically (temp dir + rename); returns a summary."""
    if fmt not in FORMATS:
        raise ConversionError(f"--format must be one of {FORMATS}, got {fmt!r}")
    src, out = Path(src), Path(out).absolute()
    config, params = load_checkpoint(src)
    provenance = _provenance(src)
    extras = provenance.get("extras", {})
    if fmt == "hf":
        config_json = hf_config.to_hf_llava_config(config, extras)
        layout = "D"
        if not 0 <= config.image_token_index < config.text.vocab_size:
            print(f"warning: image_token_index {config.image_token_index} is outside the vocabulary; HF LLaVA needs "
                  "an in-vocab <image> token to run multimodal inputs", file=sys.stderr)
    elif fmt == "gamma_mod":
        config_json = hf_config.to_gamma_mod_config(config, extras)
        layout = "gamma_mod"
    elif fmt in ("mgm", "gamma_mod_mgm"):
        config_json = hf_config.to_mgm_config(config, extras, gamma_mod=fmt == "gamma_mod_mgm")
        layout = {"mgm": "E_mgm", "gamma_mod_mgm": "gamma_mod_mgm"}[fmt]
    else:
        config_json = hf_config.to_llava_hr_config(config, extras, gamma_mod=fmt == "gamma_mod_hr")
        layout = {"llava_hr": "E_hr", "gamma_mod_hr": "gamma_mod_hr"}[fmt]
    # The official code's pinned transformers: 4.31 (LLaVA, LLaVA-HR, γ-MoD), 4.36 (Mini-Gemini).
    config_json["transformers_version"] = {"hf": "5.24.0", "mgm": "4.36.2", "gamma_mod_mgm": "4.36.2"}.get(fmt,
                                                                                                        "4.31.0")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists (pass --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    try:
        files = write_sharded_safetensors(tmp, torch_tensors(config, params, layout), max_shard_size,
                                          metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")
        tokenizer = copy_tokenizer_files(src, tmp)
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"out": str(out), "format": fmt, "layout": layout, "files": [f.name for f in files],
            "tokenizer_files": tokenizer}


def _provenance(src: Path) -> dict:
    path = src / "conversion.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m convert.to_hf", description=__doc__.split("\n\n")[1])
    p.add_argument("--src", required=True, help="gmod-jax checkpoint directory")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--format", default="hf", choices=FORMATS)
    p.add_argument("--max-shard-size", default="5GB", help='shard size limit, e.g. "5GB", "500MB", "20KB"')
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    try:
        summary = export(args.src, args.out, args.format, args.max_shard_size, args.overwrite)
    except (ConversionError, FileExistsError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {summary['out']} ({summary['format']}, layout {summary['layout']}, {len(summary['files'])} "
          f"file(s))")
    return 0


if __name__ == "__main__":
    run_cli(main)
