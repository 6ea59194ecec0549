"""Where a γ-MoD checkpoint skips tokens: `python -m gmod_jax.visualize` (the paper's Fig. 4).

    python -m gmod_jax.visualize --ckpt DIR --image PATH --prompt TEXT --out DIR
        [--answer TEXT | --max-new-tokens N] [--routing checkpoint|threshold|capacity] [--mode inference|train]

Runs one image + question (and an answer: given with --answer, else generated greedily) through
the checkpoint, records which tokens every MoD layer processed, and writes:
  skipped_patches_by_layer.png   one panel per MoD layer, the image patches that layer skipped
                                 greyed out (Fig. 4b)
  skip_rate_by_token_type.png    skip rate by token type (system / image / question / answer),
                                 over all MoD layers and per layer (Fig. 4a)
  routing_summary.json           the numbers behind both, plus per text token how many MoD
                                 layers skipped it

The answer is routed as part of one forward over prompt + answer (teacher forcing), with the
prefill rule, as the paper's figure shows question and answer words skipped alike; generation
itself routes decode tokens with the decode threshold instead.

`routing_masks(model, ...)` is the Python API: the model's own decoder walk, collecting each MoD
layer's kept mask.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
from pathlib import Path

import jax
import numpy as np

from gmod_jax import token_types as tt
from gmod_jax.api import Model
from gmod_jax.config import ModelConfig
from gmod_jax.models.llama import Collect, RoutingPlan, decoder_walk, routing_capacity
from gmod_jax.models.llava import LlavaModel

PLOT_TYPES = (tt.SYSTEM, tt.IMAGE, tt.QUESTION, tt.ANSWER)
PATCHES_PNG = "skipped_patches_by_layer.png"
TYPES_PNG = "skip_rate_by_token_type.png"
SUMMARY_JSON = "routing_summary.json"


# ----------------------------------------------------------------------------------------------
# Routing masks


@functools.lru_cache(maxsize=None)
def _trace_fn(config: ModelConfig, plan: RoutingPlan):
    """Jitted model walk returning (kept [n_mod,B,T], keep-prob [n_mod,B,T]): the decoder walk
    of the model forward (`models.llama.decoder_walk`), collecting each MoD layer's selection."""
    module = LlavaModel(config)

    def trace(params, input_ids, pixel_values, attention_mask, token_types):
        x = module.apply({"params": params}, input_ids, pixel_values, method=LlavaModel.embed)
        llm = params["llm"]
        _, walk = decoder_walk(config, llm["layers"], llm["mod_router"]["kernel"], x, attention_mask, token_types,
                               plan, Collect(routing=True), by_index=True)
        return walk.mod["selected"], walk.mod["keep_prob"]

    return jax.jit(trace)


def routing_trace(model: Model, input_ids, pixel_values=None, attention_mask=None, token_types=None,
                  mode: str = "inference") -> tuple[np.ndarray, np.ndarray]:
    """(kept bool [n_mod, B, T], keep-prob float32 [n_mod, B, T]) for MoD layers in model order.

    mode: "inference" (the checkpoint's inference rule) or "train" (top-k with masked routing).
    Padding is never counted as kept.
    """
    config = model.config
    if not config.mod.enabled or not config.mod.layers:
        raise ValueError("not a γ-MoD model: it has no MoD layers to visualise")
    if mode not in ("inference", "train"):
        raise ValueError(f"mode must be 'inference' or 'train', got {mode!r}")
    ids, px, mask, types = model._inputs(input_ids, pixel_values, attention_mask, token_types)
    plan = RoutingPlan(mode=mode, capacity=routing_capacity(config, types, mode))
    kept, probs = jax.device_get(_trace_fn(config, plan)(model.params, ids, px, mask, types))
    return np.asarray(kept, bool), np.asarray(probs, np.float32)


def routing_masks(model: Model, input_ids, pixel_values=None, attention_mask=None, token_types=None,
                  mode: str = "inference") -> np.ndarray:
    """bool [n_mod, B, T]: True where MoD layer i processed the token (False = skipped or pad)."""
    return routing_trace(model, input_ids, pixel_values, attention_mask, token_types, mode)[0]


# ----------------------------------------------------------------------------------------------
# Statistics


def skip_rates_by_type(kept: np.ndarray, token_types: np.ndarray, types=PLOT_TYPES) -> dict:
    """{type name: {"overall": rate, "per_layer": [...], "tokens": n}} over rows, for types present."""
    types_b = np.broadcast_to(np.asarray(token_types)[None], kept.shape)
    out = {}
    for ty in types:
        sel = types_b == ty
        n_per_layer = sel.sum(axis=(1, 2))
        if not n_per_layer.any():
            continue
        kept_per_layer = (kept & sel).sum(axis=(1, 2))
        out[tt.NAMES[ty]] = {
            "tokens": int(n_per_layer[0]),
            "overall": float(1.0 - kept_per_layer.sum() / n_per_layer.sum()),
            "per_layer": [float(1.0 - k / n) for k, n in zip(kept_per_layer, n_per_layer)],
        }
    return out


def image_patch_grid(config: ModelConfig, kept_row: np.ndarray, types_row: np.ndarray) -> np.ndarray:
    """bool [n_mod, g, g]: per MoD layer, whether each image patch (raster order) was kept."""
    v = config.vision
    g = v.token_grid
    image_pos = np.flatnonzero(types_row == tt.IMAGE)
    if image_pos.size != config.image_seq_length:
        raise ValueError(f"expected {config.image_seq_length} image tokens, found {image_pos.size}")
    if v.feature_strategy == "full":
        image_pos = image_pos[1:]  # the first image token is CLS, not a patch
    return kept_row[:, image_pos].reshape(kept_row.shape[0], g, g)


# ----------------------------------------------------------------------------------------------
# Figures


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_patches(path, image: np.ndarray, grids: np.ndarray, mod_layers, title: str = "",
                 outline: np.ndarray | None = None):
    """Grid of panels: the input image, then one per MoD layer with skipped patches greyed.
    `outline` (bool [g, g], optional): patches drawn with a red frame in every panel, e.g. the
    patches that show an object, so what a layer skipped can be told from what it should keep."""
    plt = _pyplot()
    n = len(mod_layers) + 1
    cols = min(n, 8)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.9 * cols, 2.1 * rows + 0.4), squeeze=False)
    h, w = image.shape[:2]
    for ax in axes.flat:
        ax.axis("off")
    axes.flat[0].imshow(image)
    axes.flat[0].set_title("input", fontsize=8)
    for i, layer in enumerate(mod_layers):
        ax = axes.flat[i + 1]
        ax.imshow(image)
        skipped = ~grids[i]
        overlay = np.zeros(skipped.shape + (4,), np.float32)
        overlay[skipped] = (0.55, 0.55, 0.55, 0.85)  # grey, mostly opaque: "this layer never saw it"
        ax.imshow(overlay, extent=(0, w, h, 0), interpolation="nearest")
        ax.set_title(f"layer {layer}: skip {skipped.mean():.0%}", fontsize=8)
    if outline is not None:
        _outline_patches(axes.flat[:n], np.asarray(outline, bool), h, w)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _outline_patches(axes, outline: np.ndarray, h: int, w: int) -> None:
    """A thin red frame around every True patch of `outline` [g, g] in each of `axes`."""
    from matplotlib.patches import Rectangle

    g_rows, g_cols = outline.shape
    ph, pw = h / g_rows, w / g_cols
    for ax in axes:
        for r, c in zip(*np.nonzero(outline)):
            ax.add_patch(Rectangle((c * pw - 0.5, r * ph - 0.5), pw, ph, fill=False, edgecolor="red",
                                   linewidth=0.8))


def plot_token_types(path, rates: dict, mod_layers, title: str = ""):
    """Bars: skip rate per token type over all MoD layers; lines: the same per layer."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, (bars, lines) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [1, 2]})
    names = list(rates)
    colors = {"system": "tab:gray", "image": "tab:orange", "question": "tab:blue", "answer": "tab:green"}
    values = [rates[n]["overall"] for n in names]
    bars.bar(names, values, color=[colors.get(n, "tab:purple") for n in names])
    for x, (name, value) in enumerate(zip(names, values)):
        bars.text(x, value + 0.01, f"{value:.0%}\n(n={rates[name]['tokens']})", ha="center", va="bottom", fontsize=8)
    bars.set_ylim(0, 1.15)
    bars.set_ylabel("skip rate over MoD layers")
    for name in names:
        lines.plot(list(mod_layers), rates[name]["per_layer"], marker="o", ms=3, label=name,
                   color=colors.get(name, "tab:purple"))
    lines.set_ylim(-0.05, 1.05)
    lines.xaxis.set_major_locator(MaxNLocator(integer=True))
    lines.set_xlabel("MoD layer")
    lines.set_ylabel("skip rate")
    lines.legend(fontsize=8)
    lines.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# CLI


def _with_routing(model: Model, rule: str) -> Model:
    if rule == "checkpoint":
        return model
    mod = dataclasses.replace(model.config.mod, inference_routing=rule)
    return Model(config=model.config.replace(mod=mod), params=model.params, path=model.path)


def _generate_answer(model, tokenizer, image_path, prompt, template, aspect, max_new_tokens):
    """Greedy answer ids from the KV-cache generator, or (None, reason) when it cannot run."""
    try:
        from gmod_jax.inference.generate import generate
        out = generate(model, [{"image": str(image_path), "text": prompt}], tokenizer=tokenizer, template=template,
                       image_aspect=aspect, max_new_tokens=max_new_tokens)
        return np.asarray(out.tokens[0], np.int32), None
    except Exception as e:  # noqa: BLE001 - the figure is still useful without an answer
        return None, f"{type(e).__name__}: {e}"


def encode_example(model: Model, tokenizer, image_path, prompt: str, *, answer: str | None = None,
                   max_new_tokens: int = 0, template: str = "vicuna_v1", aspect: str = "pad"):
    """(ids [T], token types [T], pixel values [H,W,C], note) for one image + prompt (+ answer)."""
    from gmod_jax.data.images import image_config_for, preprocess_image
    from gmod_jax.data.templates import IMAGE_TAG, render_conversation, render_prompt
    from gmod_jax.data.tokenizer import EncodedText, expand_image_placeholder

    config = model.config
    pixels = preprocess_image(image_path, image_config_for(config, aspect))
    text = prompt if IMAGE_TAG in prompt else IMAGE_TAG + "\n" + prompt
    note = None
    if answer is not None:
        conv = [{"from": "human", "value": text}, {"from": "gpt", "value": answer}]
        encoded = tokenizer.encode_segments(render_conversation(conv, template, has_image=True))
    else:
        encoded = tokenizer.encode_segments(render_prompt(text, template, has_image=True))
        if max_new_tokens > 0:
            generated, note = _generate_answer(model, tokenizer, image_path, text, template, aspect, max_new_tokens)
            if generated is not None:
                n = generated.size
                encoded = EncodedText(np.concatenate([encoded.input_ids, generated]),
                                      np.concatenate([encoded.token_types, np.full(n, tt.ANSWER, np.int8)]),
                                      np.concatenate([encoded.loss_mask, np.ones(n, bool)]))
                note = None
            else:
                note = f"no answer tokens: generation failed ({note})"
    encoded = expand_image_placeholder(encoded, config.image_token_index, config.image_seq_length)
    return encoded.input_ids.astype(np.int32), encoded.token_types.astype(np.int32), pixels, note


def _token_text(tokenizer, token_id: int) -> str:
    try:
        return tokenizer.decode([int(token_id)], skip_special_tokens=False)
    except Exception:  # noqa: BLE001 - a label only
        return f"<{int(token_id)}>"


def visualize(model: Model, tokenizer, image_path, prompt: str, out_dir, *, answer: str | None = None,
              max_new_tokens: int = 16, template: str = "vicuna_v1", aspect: str = "pad",
              mode: str = "inference") -> dict:
    """Write both figures and the summary for one example; returns the summary."""
    from gmod_jax.data.images import CLIP_MEAN, CLIP_STD

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = model.config
    ids, types, pixels, note = encode_example(model, tokenizer, image_path, prompt, answer=answer,
                                              max_new_tokens=max_new_tokens, template=template, aspect=aspect)
    kept, probs = routing_trace(model, ids[None], pixels[None], None, types[None], mode=mode)
    kept_row, types_row = kept[:, 0], types
    layers = list(config.mod.layers)
    rates = skip_rates_by_type(kept[:, 0:1], types_row[None])
    total_skip = float(1.0 - kept_row.sum() / kept_row.size)
    rule = config.mod.inference_routing if mode == "inference" else "train top-k"
    title = f"{Path(image_path).name}: skip {total_skip:.0%} over {len(layers)} MoD layers ({rule} routing)"

    image = np.clip(pixels * np.asarray(CLIP_STD, np.float32) + np.asarray(CLIP_MEAN, np.float32), 0.0, 1.0)
    grids = image_patch_grid(config, kept_row, types_row)
    plot_patches(out_dir / PATCHES_PNG, image, grids, layers, title)
    plot_token_types(out_dir / TYPES_PNG, rates, layers, title)

    text_tokens = [{"position": int(i), "type": tt.NAMES[int(types_row[i])], "text": _token_text(tokenizer, ids[i]),
                    "skipped_in_layers": [layers[l] for l in np.flatnonzero(~kept_row[:, i])],
                    "keep_prob_mean": float(probs[:, 0, i].mean())}
                   for i in range(ids.size) if types_row[i] != tt.IMAGE]
    summary = {
        "image": str(image_path), "prompt": prompt, "mode": mode, "routing_rule": rule,
        "mod_layers": layers, "seq_len": int(ids.size), "skip_ratio": total_skip,
        "skip_ratio_per_layer": [float(v) for v in 1.0 - kept_row.mean(axis=1)],
        "by_type": rates,
        "image_patch_skip_per_layer": [float(v) for v in 1.0 - grids.reshape(len(layers), -1).mean(axis=1)],
        "text_tokens": text_tokens,
        "files": [PATCHES_PNG, TYPES_PNG],
    }
    if note:
        summary["note"] = note
    (out_dir / SUMMARY_JSON).write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gmod_jax.visualize", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="γ-MoD gmod-jax checkpoint directory")
    ap.add_argument("--image", required=True, help="image file")
    ap.add_argument("--prompt", required=True, help="question (an <image> tag is added in front if absent)")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--answer", help="answer text to route (teacher forcing); default: generate one")
    ap.add_argument("--max-new-tokens", type=int, default=16,
                    help="answer tokens to generate when --answer is absent (0: prompt only)")
    ap.add_argument("--tokenizer", help="tokenizer directory or file (default: the checkpoint's)")
    ap.add_argument("--template", default="vicuna_v1", help="conversation template")
    ap.add_argument("--image-aspect", default="pad", choices=("pad", "crop"))
    ap.add_argument("--routing", default="checkpoint", choices=("checkpoint", "threshold", "capacity"),
                    help="inference routing rule: the checkpoint's, or override it")
    ap.add_argument("--mode", default="inference", choices=("inference", "train"),
                    help="route with the inference rule or the training top-k rule")
    args = ap.parse_args(argv)

    from gmod_jax.checkpoint import load_config
    from gmod_jax.api import load
    from gmod_jax.data.tokenizer import load_tokenizer

    try:
        # config.json first: a dense checkpoint is refused before any weights are read
        if not load_config(args.ckpt).mod.enabled:
            raise ValueError(f"{args.ckpt} is a dense checkpoint; convert it with `python -m convert.to_mod` first")
        model = _with_routing(load(args.ckpt), args.routing)
        tokenizer = load_tokenizer(args.tokenizer or args.ckpt)
        summary = visualize(model, tokenizer, args.image, args.prompt, args.out, answer=args.answer,
                            max_new_tokens=args.max_new_tokens, template=args.template, aspect=args.image_aspect,
                            mode=args.mode)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    print(f"skip ratio {summary['skip_ratio']:.3f} over MoD layers {summary['mod_layers']}; by type: "
          + ", ".join(f"{k} {v['overall']:.3f}" for k, v in summary["by_type"].items()))
    if "note" in summary:
        print(f"note: {summary['note']}", file=sys.stderr)
    print(f"wrote {out / PATCHES_PNG}, {out / TYPES_PNG}, {out / SUMMARY_JSON}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
