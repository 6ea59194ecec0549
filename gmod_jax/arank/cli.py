"""ARank analysis of a checkpoint on calibration samples: `python -m gmod_jax.arank`.

    python -m gmod_jax.arank --ckpt DIR --data questions.json --images IMG_DIR --num-samples 50 --out DIR

Runs the prefill of N image+question prompts (the official analysis decodes one token, i.e.
prefill only), takes every layer's post-softmax attention maps, ranks them (`attention_rank`),
and writes:
  arank.json      per layer: mean/std over samples, per-head means, per-sample values, the
                  threshold and the chosen MoD layers (`convert.to_mod --arank` reads it)
  arank.png       bar chart of ARank per layer, threshold line, MoD layers highlighted
  mod_layers.txt  the MoD layer list, comma separated
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from gmod_jax import arank
from gmod_jax.config import ModelConfig
from gmod_jax.models.llama import RoutingPlan
from gmod_jax.models.llava import LlavaModel


@functools.lru_cache(maxsize=None)
def _ranks_fn(config: ModelConfig):
    module = LlavaModel(config)

    @jax.jit
    def ranks(params, input_ids, pixel_values, attention_mask):
        valid = jnp.sum(attention_mask, axis=-1)
        out = module.apply({"params": params}, input_ids, pixel_values, attention_mask, None,
                           RoutingPlan("dense"), attn_probs_fn=lambda p: arank.layer_arank(p, valid)[0])
        return out["attn_summary"]  # [L, B, H]

    return ranks


def calibration_prompts(records, num_samples: int) -> list[dict]:
    """The first `num_samples` records that have an image (the official analysis skips the rest),
    each reduced to its first human turn, i.e. the prompt the model prefills."""
    chosen = []
    for rec in records:
        if not rec.get("image"):
            continue
        first = next((t for t in rec["conversations"] if t["from"] in ("human", "user")), None)
        if first is None:
            continue
        chosen.append({"id": rec.get("id"), "image": rec["image"], "question": first["value"]})
        if len(chosen) == num_samples:
            break
    return chosen


def analyse(model, prompts, image_root, batch_size: int = 1, progress: bool = True) -> np.ndarray:
    """Per-sample, per-layer, per-head ARank [N, L, H] for the prompts."""
    from gmod_jax.data.images import image_config_for
    from gmod_jax.data.llava_json import encode_prompt
    from gmod_jax.data.tokenizer import load_tokenizer

    if model.path is None:
        raise ValueError("the model handle has no checkpoint path to load the tokenizer from")
    tokenizer = load_tokenizer(model.path)
    cfg = model.config
    image_cfg = image_config_for(cfg)
    fn = _ranks_fn(cfg)
    out = []
    iterator = range(0, len(prompts), batch_size)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, desc="ARank", unit="batch")
    for start in iterator:
        chunk = prompts[start:start + batch_size]
        encoded = [encode_prompt(p["question"].replace("<image>", "").strip(), tokenizer, image=Path(image_root) / p["image"],
                                 image_cfg=image_cfg, image_token_index=cfg.image_token_index,
                                 image_seq_length=cfg.image_seq_length) for p in chunk]
        length = _bucket(max(len(e["input_ids"]) for e in encoded))
        ids = np.full((len(chunk), length), tokenizer.pad_id or 0, np.int32)
        mask = np.zeros((len(chunk), length), bool)
        for i, e in enumerate(encoded):
            ids[i, :len(e["input_ids"])] = e["input_ids"]
            mask[i, :len(e["input_ids"])] = True
        px = np.stack([e["pixel_values"] for e in encoded])
        ranks = np.asarray(fn(model.params, ids, px, mask))  # [L, B, H]
        out.append(ranks.transpose(1, 0, 2))
    return np.concatenate(out).astype(np.float64)


def _bucket(n: int, step: int = 64) -> int:
    """Pad lengths to multiples of `step` so a calibration run compiles a handful of times."""
    return -(-n // step) * step


def write_report(out_dir, per_sample_lhd: np.ndarray, num_dense: int | None, threshold: float | None,
                 meta: dict) -> dict:
    """Write arank.json / arank.png / mod_layers.txt atomically (temp dir, then rename each)."""
    per_sample = per_sample_lhd.mean(-1)  # [N, L]: mean over heads first, as the official code
    mean, std = arank.aggregate(per_sample_lhd)
    mod_layers = arank.select_mod_layers(mean, num_dense=None if threshold is not None else num_dense,
                                         threshold=threshold)
    thr = threshold if threshold is not None else float(np.sort(mean)[::-1][num_dense - 1])
    report = {
        **meta,
        "num_samples": int(per_sample_lhd.shape[0]),
        "num_layers": int(per_sample_lhd.shape[1]),
        "num_heads": int(per_sample_lhd.shape[2]),
        "per_layer_mean": [float(x) for x in mean],
        "per_layer_std": [float(x) for x in std],
        "per_layer_head_mean": per_sample_lhd.mean(0).round(4).tolist(),
        "per_sample": per_sample.round(4).tolist(),
        "rule": ("threshold" if threshold is not None else f"top-{num_dense} ARank layers stay dense"),
        "threshold": thr,
        "mod_layers": list(mod_layers),
        "dense_layers": [i for i in range(per_sample_lhd.shape[1]) if i not in mod_layers],
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        Path(tmp, "arank.json").write_text(json.dumps(report, indent=1) + "\n")
        Path(tmp, "mod_layers.txt").write_text(",".join(map(str, mod_layers)) + "\n")
        plot(mean, std, thr, mod_layers, Path(tmp, "arank.png"), title=meta.get("checkpoint", ""))
        for name in ("arank.json", "mod_layers.txt", "arank.png"):
            os.replace(Path(tmp, name), out / name)
    return report


def plot(mean, std, threshold, mod_layers, path, title=""):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = np.arange(len(mean))
    colors = ["tab:orange" if i in mod_layers else "tab:blue" for i in layers]
    fig, ax = plt.subplots(figsize=(max(6, len(mean) * 0.3), 3.5))
    ax.bar(layers, mean, yerr=std, color=colors, capsize=2)
    ax.axhline(threshold, color="k", linestyle="--", linewidth=1, label=f"threshold {threshold:.1f}")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("ARank (mean over heads, samples)")
    ax.set_title(f"ARank {title}".strip() + "  (orange = MoD, blue = dense)")
    ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gmod_jax.arank", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="gmod-jax checkpoint directory (with tokenizer files)")
    ap.add_argument("--data", required=True, help="LLaVA-format JSON with image questions (e.g. SQA-IMG test)")
    ap.add_argument("--images", default=None, help="image folder (default: the JSON's folder)")
    ap.add_argument("--num-samples", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--num-dense", type=int, default=4, help="keep the top-n ARank layers dense (paper: 4)")
    ap.add_argument("--threshold", type=float, default=None, help="instead: ARank < threshold -> MoD")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    import gmod_jax
    from gmod_jax.data.llava_json import read_records

    model = gmod_jax.load(args.ckpt)
    prompts = calibration_prompts(read_records(args.data), args.num_samples)
    if not prompts:
        print(f"error: {args.data} has no records with an image", file=sys.stderr)
        return 2
    image_root = args.images or str(Path(args.data).parent)
    per_sample = analyse(model, prompts, image_root, args.batch_size)
    report = write_report(args.out, per_sample, args.num_dense, args.threshold,
                          {"checkpoint": str(args.ckpt), "data": str(args.data),
                           "sample_ids": [p["id"] for p in prompts]})
    print(f"ARank per layer: {np.round(report['per_layer_mean'], 1).tolist()}")
    print(f"MoD layers ({len(report['mod_layers'])}): {report['mod_layers']}  -> {args.out}/arank.json")
    return 0
