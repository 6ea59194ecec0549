"""Process set-up shared by the converter command lines."""

from __future__ import annotations

import os


def keep_jax_on_host() -> None:
    """The converters move host (numpy) arrays only, yet Orbax imports JAX and initialises its
    backends. On a TPU VM or a GPU host that would claim the accelerators (a TPU held by a
    training job makes the backend start fail) and pay the plugin start-up and teardown, so a
    command-line run selects the CPU backend. A `JAX_PLATFORMS` the user set wins. Called only
    from the `__main__` blocks: it must run before JAX starts, and must not change the
    environment of a process that imports the converters as a library."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
