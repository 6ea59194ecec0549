"""Command line: `python -m train --config configs/<recipe>.py --workdir DIR [--set key=value ...]`.

Exit status: 0 when training finished or stopped on SIGTERM after saving a checkpoint; 1 on a
non-finite loss (the last good checkpoint is kept); 2 on a bad command line or config.
"""

from __future__ import annotations

import argparse
import logging
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train", description="Train LLaVA / γ-MoD models with JAX.")
    p.add_argument("--config", required=True, help="recipe file defining get_config() -> TrainConfig")
    p.add_argument("--workdir", required=True, help="run directory: checkpoints/, tb/, metrics.jsonl")
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="override config fields, nested with dots (e.g. optim.lr=1e-4 model.mod.routing_ratio=0.34)")
    p.add_argument("--mesh", default=None, help="mesh preset file defining get_mesh() (e.g. configs/mesh_gpu_8.py)")
    p.add_argument("--distributed", choices=("env", "auto", "off"), default="env",
                   help="multi-process init: env (if JAX_COORDINATOR_ADDRESS/--coordinator is set), auto, off")
    p.add_argument("--coordinator", default=None, help="host:port of process 0 (JAX_COORDINATOR_ADDRESS)")
    p.add_argument("--num-processes", type=int, default=None, help="JAX_NUM_PROCESSES")
    p.add_argument("--process-id", type=int, default=None, help="JAX_PROCESS_ID")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every save step at INFO

    # Parse the config before touching JAX so mistakes fail fast, then bring up multi-process
    # JAX before anything initialises the backend.
    from gmod_jax.config_files import OverrideError, apply_overrides
    from train.config import load_mesh_preset, load_recipe

    try:
        cfg = load_recipe(args.config)
        if args.mesh:
            cfg = cfg.replace(mesh=load_mesh_preset(args.mesh))
        cfg = apply_overrides(cfg, args.overrides)
    except (OverrideError, ValueError, TypeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        import json

        print(json.dumps(cfg.to_dict(), indent=2, default=str))
        return 0

    import jax

    if cfg.compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", cfg.compilation_cache_dir)

    from train.distributed import maybe_initialize

    maybe_initialize(args.distributed, args.coordinator, args.num_processes, args.process_id)

    from train.loop import NonFiniteLoss, run

    try:
        result = run(cfg, args.workdir)
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    logging.getLogger("train").info("%s at step %d/%d (last checkpoint: %s)", result.status, result.step,
                                    result.total_steps, result.last_checkpoint)
    return 0


if __name__ == "__main__":
    sys.exit(main())
