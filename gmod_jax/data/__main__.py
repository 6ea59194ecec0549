"""Dataset preparation commands.

  python -m gmod_jax.data synthetic --out data/synthetic --num-train 4000 --num-eval 400 \\
      --tokenizer-out data/synthetic/tokenizer --vocab-size 512
  python -m gmod_jax.data build-tfds --data-dir data/tfds --name llava665k_vicuna_v1 \\
      --tokenizer ckpt/llava-v1.5-7b --split train=llava_v1_5_mix665k.json:data/ --num-workers 8
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from gmod_jax.data.synthetic import SyntheticConfig, synthetic_texts, write_synthetic_dataset
from gmod_jax.data.tfds_builder import build_tfds
from gmod_jax.data.tokenizer import load_tokenizer, train_sentencepiece


def _synthetic(args) -> dict:
    config = SyntheticConfig(image_size=args.image_size, grid=args.grid, max_objects=args.max_objects,
                             max_turns=args.max_turns, text_only_fraction=args.text_only_fraction)
    paths = write_synthetic_dataset(args.out, num_train=args.num_train, num_eval=args.num_eval, seed=args.seed,
                                    config=config, overwrite=args.overwrite)
    result = {k: str(v) for k, v in vars(paths).items()}
    if args.tokenizer_out:
        tok = train_sentencepiece(synthetic_texts(args.num_train, args.seed, config), args.tokenizer_out,
                                  vocab_size=args.vocab_size)
        result.update(tokenizer=args.tokenizer_out, vocab_size=tok.vocab_size, image_token_id=tok.image_token_id,
                      pad_id=tok.pad_id)
    return result


def _build_tfds(args) -> dict:
    splits = {}
    for spec in args.split:
        name, _, rest = spec.partition("=")
        json_path, _, image_root = rest.partition(":")
        if not name or not json_path:
            raise SystemExit(f"--split expects NAME=JSON[:IMAGE_ROOT], got {spec!r}")
        splits[name] = (json_path, image_root or ".")
    out = build_tfds(args.data_dir, args.name, splits, load_tokenizer(args.tokenizer), template=args.template,
                     move_image_to_front=not args.keep_image_position, max_bad_fraction=args.max_bad_fraction,
                     verify_images=not args.skip_image_check, num_workers=args.num_workers, show_progress=True)
    return {"dataset_dir": str(out)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m gmod_jax.data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("synthetic", help="write the procedural shapes dataset (and train its tokenizer)")
    s.add_argument("--out", required=True)
    s.add_argument("--num-train", type=int, default=2000)
    s.add_argument("--num-eval", type=int, default=200)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--image-size", type=int, default=SyntheticConfig.image_size)
    s.add_argument("--grid", type=int, default=SyntheticConfig.grid)
    s.add_argument("--max-objects", type=int, default=SyntheticConfig.max_objects)
    s.add_argument("--max-turns", type=int, default=SyntheticConfig.max_turns)
    s.add_argument("--text-only-fraction", type=float, default=SyntheticConfig.text_only_fraction)
    s.add_argument("--overwrite", action="store_true")
    s.add_argument("--tokenizer-out", help="also train a SentencePiece model on the dataset's texts here")
    s.add_argument("--vocab-size", type=int, default=512)
    s.set_defaults(run=_synthetic)

    b = sub.add_parser("build-tfds", help="LLaVA JSON + images -> TFDS ArrayRecord dataset")
    b.add_argument("--data-dir", required=True)
    b.add_argument("--name", required=True, help="TFDS config name, e.g. llava665k_vicuna_v1")
    b.add_argument("--tokenizer", required=True, help="checkpoint/tokenizer directory or model file")
    b.add_argument("--split", action="append", required=True, metavar="NAME=JSON[:IMAGE_ROOT]")
    b.add_argument("--template", default="vicuna_v1")
    b.add_argument("--keep-image-position", action="store_true", help="do not move <image> to the front")
    b.add_argument("--max-bad-fraction", type=float, default=0.01)
    b.add_argument("--skip-image-check", action="store_true", help="do not decode images while building")
    b.add_argument("--num-workers", type=int, default=0)
    b.set_defaults(run=_build_tfds)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    result = args.run(args)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
