"""The benchmark app: dense vs γ-MoD in one process (`python -m bench`).

`bench.runner` measures, `bench.markdown` writes BENCHMARKS.md sections,
`bench.config` holds the recipe dataclasses that config files import from here. App
code: nothing in the core library imports it.
"""

from bench.config import BenchConfig, Case

__all__ = ["BenchConfig", "Case"]
