"""BENCHMARKS.md is written only by benchmark commands, each owning one marked section.

The section between `<!-- bench:<section>:start -->` and `<!-- bench:<section>:end -->` is
replaced atomically; every other byte of the file is left as it was. Shared by the model
benchmark (`python -m bench`) and the converter's (`python -m convert.bench_memory`).
"""

from __future__ import annotations

import os
from pathlib import Path

from gmod_jax.eval.results import write_text_atomic


def markers(section: str) -> tuple[str, str]:
    return f"<!-- bench:{section}:start -->", f"<!-- bench:{section}:end -->"


MARKDOWN_HEADER = ("# Benchmarks\n\nEvery section below is written by a benchmark command (named in the section) "
                   "between its `<!-- bench:... -->` markers; do not edit by hand.\n")


def replace_section(text: str | None, section: str, body: str) -> str:
    """`text` with the section's marked block replaced (or appended); everything else unchanged."""
    start, end = markers(section)
    block = f"{start}\n{body.rstrip()}\n{end}"
    if not text:
        return f"{MARKDOWN_HEADER}\n{block}\n"
    i = text.find(start)
    if i < 0:
        return text.rstrip("\n") + "\n\n" + block + "\n"
    j = text.find(end, i)
    if j < 0:
        raise ValueError(f"BENCHMARKS.md has {start} without {end}; fix the file by hand first")
    return text[:i] + block + text[j + len(end):]


def update_markdown(path: str | os.PathLike, section: str, body: str):
    path = Path(path)
    old = path.read_text() if path.exists() else None
    write_text_atomic(path, replace_section(old, section, body))
