"""Evaluation harness: official benchmark metrics, benchmark file readers, results tables.

* :mod:`gmod_jax.eval.metrics` - scoring rules of VQAv2/TextVQA/VizWiz, GQA, ScienceQA, POPE,
  MME, MMBench, MMMU and SEED-Bench, model-independent.
* :mod:`gmod_jax.eval.benchmarks` - readers of the files LLaVA's evaluation uses, prompt
  dicts for ``generate_fn(prompts) -> list[str]``, ``score(answers)``, submission writers,
  :func:`~gmod_jax.eval.benchmarks.run_benchmark` (batched, resumable).
* :mod:`gmod_jax.eval.results` - results JSON + paper-style markdown table, resumable
  answers files, atomic writers.

The tests write tiny file sets in each benchmark's real format (`tests/support/eval_files.py`).
"""
