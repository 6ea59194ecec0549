"""The benchmark app: dense vs γ-MoD in one process (`python -m gmod_jax.bench`).

`gmod_jax.bench.runner` measures, `gmod_jax.bench.markdown` writes BENCHMARKS.md sections,
`gmod_jax.bench.config` holds the recipe dataclasses that config files import from here. App
code: nothing in the core library imports it.
"""

from gmod_jax.bench.config import BenchConfig, Case

__all__ = ["BenchConfig", "Case"]
