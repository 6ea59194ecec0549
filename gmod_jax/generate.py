"""Generate an answer for one image + question from a gmod-jax checkpoint.

    python -m gmod_jax.generate --ckpt DIR --image PATH --prompt TEXT \\
        [--max-new-tokens N --temperature T --top-p P --seed S] [--mode dense] [--stats]

The prompt goes through the conversation template (vicuna_v1 by default), the image through
LLaVA's preprocessing, and generation through the jitted prefill + KV-cache decode loop
(`gmod_jax.inference.generate`). The answer is printed on stdout; `--stats` adds a JSON line with
the MoD skip ratios (prefill and decode) and timings on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m gmod_jax.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="gmod-jax checkpoint directory")
    p.add_argument("--image", default=None, help="image file (omit for a text-only prompt)")
    p.add_argument("--prompt", required=True, help="the user's question")
    p.add_argument("--tokenizer", default=None, help="tokenizer.model / tokenizer.json or its directory "
                                                     "(default: the checkpoint directory)")
    p.add_argument("--template", default="vicuna_v1", help="conversation template (vicuna_v1, plain)")
    p.add_argument("--image-aspect", default="pad", choices=("pad", "crop"),
                   help="pad: LLaVA-1.5 expand-to-square; crop: plain CLIP centre crop")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mode", default="inference", choices=("inference", "dense"),
                   help="inference: γ-MoD routing (config's rule); dense: run MoD layers densely")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="cast params and compute to this dtype")
    p.add_argument("--stats", action="store_true", help="print skip ratios and timings as JSON on stderr")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    # Imported here so `--help` does not pay for JAX start-up.
    from gmod_jax import api
    from gmod_jax.data.errors import BadRecord
    from gmod_jax.inference.generate import generate

    try:
        model = api.load(args.ckpt, dtype=args.dtype)
        out = generate(model, [{"image": args.image, "text": args.prompt}],
                       tokenizer=args.tokenizer or args.ckpt, template=args.template,
                       image_aspect=args.image_aspect, max_new_tokens=args.max_new_tokens,
                       temperature=args.temperature, top_p=args.top_p, seed=args.seed, mode=args.mode)
    except (BadRecord, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out.texts[0])
    if args.stats:
        print(json.dumps(out.summary()), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
