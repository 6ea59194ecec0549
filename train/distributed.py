"""Multi-process start-up: `jax.distributed.initialize` before anything touches the backend.

Explicit settings come from flags or the environment variables JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES and JAX_PROCESS_ID (flags win). `--distributed auto` calls
`jax.distributed.initialize()` without arguments, letting JAX detect the cluster (Cloud TPU
pods, SLURM, Open MPI, ...).
"""

from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger("train")


def maybe_initialize(mode: str = "env", coordinator: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None) -> bool:
    """Initialise JAX's distributed runtime if asked to; returns whether it did.

    mode: "off" never; "auto" always, with JAX's cluster auto-detection for missing values;
    "env" (default) only when a coordinator address is given by flag or environment.
    """
    if mode == "off":
        return False
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and os.environ.get("JAX_NUM_PROCESSES"):
        num_processes = int(os.environ["JAX_NUM_PROCESSES"])
    if process_id is None and os.environ.get("JAX_PROCESS_ID"):
        process_id = int(os.environ["JAX_PROCESS_ID"])
    if mode == "env" and coordinator is None:
        return False
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
    log.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
    return True
