"""`python -m train.aot_tables DIR [--markdown FILE]`: the TPU compile tables of docs/tpu_aot.md,
rendered from the `--json` reports of `python -m train.aot` in DIR (scripts/tpu_aot_tables.sh
writes them), so the page's numbers are the command's output, not transcriptions.

One table per topology (every compiled program of every report), and the `--find-batch` search
of each report that ran it: the sizes it compiled, their per-chip memory, the answer.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SECTION = "tpu-aot"
RECIPES = {
    "llava_v15_7b_stage2": "LLaVA-1.5-7B stage 2",
    "gamma_mod_llava_v15_7b": "γ-MoD-LLaVA-1.5-7B",
    "gamma_mod_llava_hr_7b": "γ-MoD-LLaVA-HR-7B",
    "gamma_mod_mgm_hd_7b": "γ-MoD-MGM-HD-7B",
}


def load_reports(directory: str | Path) -> list[dict]:
    reports = []
    for path in sorted(Path(directory).glob("*.json")):
        report = json.loads(path.read_text())
        if "programs" not in report:  # not a train.aot report
            continue
        report["_file"] = path.name
        reports.append(report)
    if not reports:
        raise FileNotFoundError(f"no `python -m train.aot --json` reports in {directory}")
    return reports


def recipe_label(report: dict) -> str:
    model = report["model"]
    name = RECIPES.get(Path(report["config"]).stem, Path(report["config"]).stem)
    choices = [f"{model['attention_implementation']} attention"]  # what changes the compiled program
    if model["mod_layers"]:
        choices.append(f"{model['mod_implementation']} dispatch")
    if report.get("libtpu_init_args"):
        choices.append(f"`LIBTPU_INIT_ARGS={report['libtpu_init_args']}`")
    return f"{name} ({', '.join(choices)})"


def _collectives(program: dict) -> str:
    return ", ".join(f"{c['kind']} {c['count']}x {c['bytes'] / 1e9:.1f} GB" for c in program["collectives"]) or "-"


def _tokens_per_s_per_chip(program: dict) -> str:
    """Train: tokens of the whole step (all micro-batches) per second per chip at the roofline time."""
    shapes, seconds = program["shapes"], program["estimated_step_s"]
    if program["name"] != "train_step" or not seconds:
        return "-"
    tokens = shapes["global_batch"] * shapes["seq_len"]
    return f"{tokens / program['chips'] / seconds:,.0f}"


def _rows(program: dict) -> str:
    """Rows per batch shard (per chip when tensor = 1), x accumulation steps for training, of how
    many tokens: the train sequence, the prompt (prefill) or prompt + new-token slots (decode)."""
    s = program["shapes"]
    shards = s["mesh"].get("data", 1) * s["mesh"].get("fsdp", 1)
    if program["name"] == "train_step":
        return f"{s['micro_batch'] // shards} x {s['grad_accum_steps']} of {s['seq_len']}"
    tokens = s["prompt_len"] if program["name"] == "prefill" else f"{s['prompt_len']} + {s['new_slots']}"
    return f"{s['batch'] // shards} of {tokens}"


def program_table(reports: list[dict]) -> str:
    lines = ["| recipe | program | rows/chip x accum of tokens | GB/chip | fits | TFLOPs/chip | HBM GB/chip | "
             "collectives per chip | est. s | est. MFU | train tokens/s/chip |",
             "|---|---|---|---:|:---:|---:|---:|---|---:|---:|---:|"]
    for report in reports:
        for p in report["programs"]:
            mem = p["per_chip_bytes"]
            mfu = "-" if p["estimated_mfu"] is None else f"{p['estimated_mfu']:.1%}"
            lines.append(
                f"| {recipe_label(report)} | {p['name']} | {_rows(p)} | "
                f"{'OOM' if not mem else format(mem['total'] / 1e9, '.1f')} | {'yes' if p['fits'] else 'no'} | "
                f"{p['flops'] / 1e12:.1f} | {p['bytes_accessed'] / 1e9:.0f} | {_collectives(p)} | "
                f"{p['estimated_step_s']:.3g} | {mfu} | {_tokens_per_s_per_chip(p)} |")
    return "\n".join(lines)


def find_batch_table(reports: list[dict]) -> str:
    lines = ["| recipe | topology | largest rows/chip | compiled sizes: per-chip GB (x: does not fit) |",
             "|---|---|---:|---|"]
    for report in reports:
        search = report.get("find_batch")
        if not search:
            continue
        tried = ", ".join(
            f"{b}: {'-' if t['total_bytes'] is None else format(t['total_bytes'] / 1e9, '.1f')}"
            f"{'' if t['fits'] else ' x'}" for b, t in sorted(search["tried"].items(), key=lambda kv: int(kv[0])))
        lines.append(f"| {recipe_label(report)} | {report['topology']} | {search['per_shard_batch']} | {tried} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def render(reports: list[dict]) -> str:
    out = ["Written by `python -m train.aot_tables` from the `python -m train.aot --json` reports that "
           "`scripts/tpu_aot_tables.sh` produces (files: " + ", ".join(r["_file"] for r in reports) + ").\n"]
    by_topology: dict[str, list[dict]] = {}
    for report in reports:
        by_topology.setdefault(report["topology"], []).append(report)
    for topology, group in by_topology.items():
        out += [f"**{topology}**\n", program_table(group) + "\n"]
    search = find_batch_table(reports)
    if search:
        out += ["**Largest per-chip train batch (`--find-batch`, ≤ 95% of HBM)**\n", search + "\n"]
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.aot_tables", description=__doc__.split("\n\n")[0])
    p.add_argument("directory", help="folder of `python -m train.aot --json` reports")
    p.add_argument("--markdown", default=None, help=f"rewrite the `{SECTION}` section of this file")
    args = p.parse_args(argv)
    try:
        text = render(load_reports(args.directory))
    except (FileNotFoundError, json.JSONDecodeError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.markdown:
        from gmod_jax.benchmarks_md import update_markdown

        update_markdown(args.markdown, SECTION, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
