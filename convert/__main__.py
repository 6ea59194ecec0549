"""`python -m convert --src DIR --out DIR [--vision-tower DIR] [--vision-tower-aux FILE|DIR] [--dtype ...]`

Converts an HF LLaVA (layouts A-D), original LLaVA (E, with `--vision-tower` when the tower is
not in the checkpoint), γ-MoD `mod_llava_llama`, LLaVA-HR, γ-MoD-LLaVA-HR, Mini-Gemini (`mgm`) or
γ-MoD-MGM (`mod_mgm`) checkpoint into a gmod-jax Orbax checkpoint (Mini-Gemini's towers, when
the checkpoint lacks them, from `--vision-tower` and `--vision-tower-aux`).
Exit status 0 on success, 2 on a conversion error (message on stderr, no output left behind).
"""

from __future__ import annotations

import argparse
import json
import sys

from convert.errors import ConversionError
from convert.host import run_cli
from convert.keymap import DTYPE_POLICIES
from convert.pipeline import DEFAULT_BATCH_BYTES, convert_checkpoint


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m convert", description=__doc__.split("\n\n")[1])
    p.add_argument("--src", required=True, help="PyTorch checkpoint directory (config.json + weights)")
    p.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    p.add_argument("--vision-tower", default=None,
                   help="CLIP checkpoint directory for original-LLaVA / Mini-Gemini checkpoints without the tower")
    p.add_argument("--vision-tower-aux", default=None,
                   help="open_clip ConvNeXt checkpoint (file or directory; visual.trunk.* keys) for Mini-Gemini "
                        "checkpoints without the aux tower")
    p.add_argument("--dtype", default="keep", choices=DTYPE_POLICIES,
                   help="parameter dtype: keep the source's (default) or cast every tensor")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--batch-mb", type=int, default=DEFAULT_BATCH_BYTES // 2**20,
                   help="output leaves read and saved per batch (bounds peak memory)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    log = None if args.json else (lambda msg: print(msg, file=sys.stderr))
    try:
        summary = convert_checkpoint(args.src, args.out, args.vision_tower, args.dtype, args.overwrite,
                                     args.batch_mb * 2**20, log, args.vision_tower_aux)
    except (ConversionError, FileExistsError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(summary, default=str))
    else:
        print(f"layout      {summary['layout']}: {summary['layout_description']}")
        print(f"container   {summary['container']} ({summary['shards']} shard(s))"
              + (f" + vision tower {summary['vision_tower_source']}" if summary["vision_tower_source"] else "")
              + (f" + aux tower {summary['vision_tower_aux_source']}" if summary["vision_tower_aux_source"] else ""))
        print(f"params      {summary['num_params']:,} ({summary['dtype']})")
        print(f"read        {summary['source_bytes'] / 1e9:.3f} GB in {summary['seconds']:.2f} s "
              f"({summary['gb_per_s']:.2f} GB/s)")
        print(f"wrote       {summary['out']}")
    return 0


if __name__ == "__main__":
    run_cli(main)
