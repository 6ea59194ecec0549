"""Process set-up and exit shared by the converter command lines."""

from __future__ import annotations

import gc
import os
import sys
from typing import Callable


def keep_jax_on_host() -> None:
    """The converters move host (numpy) arrays only, yet Orbax imports JAX and initialises its
    backends. On a TPU VM or a GPU host that would claim the accelerators (a TPU held by a
    training job makes the backend start fail) and pay the plugin start-up and teardown, so a
    command-line run selects the CPU backend. A `JAX_PLATFORMS` the user set wins. Called only
    from the `__main__` blocks: it must run before JAX starts, and must not change the
    environment of a process that imports the converters as a library."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


def run_cli(main: Callable[[], int]) -> None:
    """Run a converter's `main` on the host backend and exit with its status.

    Before exiting, every live object moves to the collector's permanent generation
    (`gc.freeze`): the interpreter's shutdown collections would otherwise walk the hundreds of
    thousands of objects JAX and Orbax create at import, 0.1-0.3 s per run, a tenth of a
    1B-model conversion, and none of them holds anything left to write (the checkpoint is
    complete and renamed before `main` returns). atexit handlers and stream flushes still run.
    """
    keep_jax_on_host()
    code = main()
    gc.freeze()
    sys.exit(code)
