"""Dense LLaVA checkpoint -> γ-MoD checkpoint (dense-to-MoD adaptation before stage-2 SFT).

    python -m convert.to_mod --src DENSE_CKPT --out DIR --arank arank.json --routing-ratio 0.5
    python -m convert.to_mod --src DENSE_CKPT --out DIR --layers 3-30 --routing-ratio 0.34
    python -m convert.to_mod --src DENSE_CKPT --out DIR --placement every_2nd

The layer params are untouched (the param tree does not depend on MoD placement); the only new
param is the router, initialised as the official code does: PyTorch `nn.Linear` default
(kaiming-uniform) for LLaVA / LLaVA-HR, xavier-uniform for a Mini-Gemini checkpoint (vision tower
"mgm"), unless `--router-init` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import numpy as np

from convert.errors import ConversionError
from convert.host import run_cli
from gmod_jax.checkpoint import load_checkpoint, save_checkpoint
from gmod_jax.config import MOD_PLACEMENTS, MoDConfig, ModelConfig, mod_layer_indices
from gmod_jax.models.llama import _router_init


def parse_layers(text: str) -> tuple[int, ...]:
    """'3-30' or '3,4,5' or '3-10,20' -> indices."""
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            lo, hi = part.split("-", 1)
            out.extend(range(int(lo), int(hi) + 1))
        else:
            out.append(int(part))
    return tuple(out)


def layers_from_arank(path: str) -> tuple[int, ...]:
    with open(path) as f:
        report = json.load(f)
    if "mod_layers" not in report:
        raise ConversionError(f"{path}: no 'mod_layers' entry (write it with `python -m gmod_jax.arank`)")
    return tuple(int(i) for i in report["mod_layers"])


def adapt(config: ModelConfig, params: dict, mod_layers: tuple[int, ...], seed: int = 0, **mod_kw):
    """Return (γ-MoD config, params with a freshly initialised router)."""
    if config.mod.enabled:
        raise ConversionError("source checkpoint is already a γ-MoD checkpoint (mod.enabled); adapt a dense one")
    if not mod_layers:
        raise ConversionError("no MoD layers selected")
    idx = mod_layer_indices("explicit", config.text.num_layers, mod_layers)
    mod = MoDConfig(enabled=True, layers=idx, **mod_kw)
    new_config = config.replace(mod=mod)
    param_dtype = jax.tree.leaves(params["llm"]["layers"])[0].dtype
    router = np.asarray(_router_init(jax.random.PRNGKey(seed), new_config, param_dtype))
    new_params = {**params, "llm": {**params["llm"], "mod_router": {"kernel": router}}}
    return new_config, new_params


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m convert.to_mod", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", required=True, help="dense gmod-jax checkpoint directory")
    ap.add_argument("--out", required=True, help="output γ-MoD checkpoint directory (must not exist)")
    which = ap.add_mutually_exclusive_group(required=True)
    which.add_argument("--arank", help="arank.json written by `python -m gmod_jax.arank` (uses its mod_layers)")
    which.add_argument("--layers", help="explicit MoD layer indices, e.g. '3-30' or '2,4,6'")
    which.add_argument("--placement", choices=[p for p in MOD_PLACEMENTS if p != "explicit"],
                       help="a paper baseline placement (arank_mod = official hard-coded ARank result)")
    ap.add_argument("--routing-ratio", type=float, default=0.5)
    ap.add_argument("--masking", default="official", help="official | none | question | question_answer")
    ap.add_argument("--per-layer-router", action="store_true", help="the 'not shared' ablation")
    ap.add_argument("--router-init", default=None, choices=["kaiming_uniform", "xavier_uniform"],
                    help="default: xavier_uniform for a Mini-Gemini checkpoint (as its code), else kaiming_uniform")
    ap.add_argument("--router-aux-loss-coef", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        config, params = load_checkpoint(args.src)
        if args.arank:
            layers = layers_from_arank(args.arank)
        elif args.layers:
            layers = parse_layers(args.layers)
        else:
            layers = mod_layer_indices(args.placement, config.text.num_layers)
        router_init = args.router_init or ("xavier_uniform" if config.vision.tower == "mgm" else "kaiming_uniform")
        new_config, new_params = adapt(
            config, params, layers, seed=args.seed, routing_ratio=args.routing_ratio, masking=args.masking,
            shared_router=not args.per_layer_router, router_init=router_init,
            router_aux_loss_coef=args.router_aux_loss_coef)
        save_checkpoint(args.out, new_params, new_config, tokenizer_src_dir=args.src)
    except (ConversionError, ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote γ-MoD checkpoint {args.out}: {len(new_config.mod.layers)} MoD layers "
          f"{list(new_config.mod.layers)}, routing ratio {new_config.mod.routing_ratio}")
    return 0


if __name__ == "__main__":
    run_cli(main)
