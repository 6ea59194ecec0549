"""Write trained params as a gmod-jax checkpoint dir (config.json + Orbax params), the format
`gmod_jax.load`, `python -m convert` and the inference tools read.

    python -m train.export --workdir RUN_DIR --out CKPT_DIR [--step N] [--tokenizer DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax

from gmod_jax.config import ModelConfig


def export_params(out_dir, params, model: ModelConfig, tokenizer_src_dir=None, overwrite: bool = True):
    """Gather (possibly sharded, multi-process) params to host and write them on process 0."""
    from gmod_jax.checkpoint import save_checkpoint
    from train.step import host_array

    host = jax.tree.map(host_array, params)
    if jax.process_index() == 0:
        save_checkpoint(out_dir, host, model, tokenizer_src_dir=tokenizer_src_dir, overwrite=overwrite)
    return Path(out_dir)


def export_from_workdir(workdir, out_dir, step: int | None = None, tokenizer_src_dir=None) -> Path:
    """Export the params of a run's checkpoint (latest unless `step`) without rebuilding the run."""
    from train.checkpoint import Checkpointer

    ckpt = Checkpointer(Path(workdir) / "checkpoints", keep=0, async_save=False)
    try:
        params, meta = ckpt.restore_params(step)
    finally:
        ckpt.close()
    model = ModelConfig.from_dict(meta["model_config"])
    return export_params(out_dir, params, model, tokenizer_src_dir)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="training run directory (with checkpoints/)")
    p.add_argument("--out", required=True, help="gmod-jax checkpoint directory to write")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--tokenizer", default=None, help="directory whose tokenizer files are copied along")
    args = p.parse_args(argv)
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)  # Orbax is chatty about partial reads
    out = export_from_workdir(args.workdir, args.out, args.step, args.tokenizer)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
