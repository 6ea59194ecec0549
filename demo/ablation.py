"""The paper's Table 1 ablations on the synthetic task: `python -m demo.ablation`.

    python -m demo.ablation --workdir runs/ablation [--demo-workdir runs/demo] [--steps N]
        [--only NAME ...] [--eval-limit N] [--config configs/demo_default.py] [--set key=value ...]

Starts from the demo's dense checkpoint (`<demo-workdir>/ckpt/dense`, trained with the demo's
stages if it is missing, reused if it is there) and its ARank report, and for each row adapts the
dense model with one γ-MoD setting changed, fine-tunes it with the demo's fine-tune recipe for
`--steps` optimizer steps, and evaluates it on the held-out split:

  MoD layer      all layers / 1 MoD per 2 layers / ARank-based (the demo's layer list)
  masked token   none / question (Q) / question + answer (Q+A)
  shared router  not shared / shared
  routing ratio  0.17 / 0.34 / 0.5 / 0.68

Settings not varied in a row are the demo's (ARank layers, its masking, one shared router, its
routing ratio); rows whose settings coincide (e.g. "ARank-based" and "shared") are one run,
reported in each row. A dense fine-tune with the same steps is the reference row. Written to
`<workdir>/ablation.md` and `ablation.json`: accuracy, prefill skip ratio over the MoD layers,
and analytic prefill FLOPs per sample (`gmod_jax.flops`: the paper's LLM-only formula at the
realised skip ratio and this implementation's full count) for every row.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

from gmod_jax import token_types as tt
from demo.pipeline import (DemoConfig, Paths, Prepared, Stages, adapt_stage, enable_compilation_cache, eval_stage,
                           finetune_stage, load_config, prepare, write_json)


@dataclasses.dataclass(frozen=True)
class Row:
    group: str
    label: str
    name: str  # short id, used for --only and directory names
    placement: str | None = None  # None: the ARank layers; else a `gmod_jax.config.MOD_PLACEMENTS` name
    masking: str | None = None  # None: the demo's
    shared_router: bool = True
    routing_ratio: float | None = None  # None: the demo's


ROWS = (
    Row("MoD layer", "All layers", "all_layers", placement="all"),
    Row("MoD layer", "1 MoD per 2 layers", "every_2nd", placement="every_2nd"),
    Row("MoD layer", "ARank-based", "arank"),
    Row("Masked token", "None", "mask_none", masking="none"),
    Row("Masked token", "Q", "mask_q", masking="question"),
    Row("Masked token", "Q+A", "mask_qa", masking="question_answer"),
    Row("Shared router", "Not share", "not_shared", shared_router=False),
    Row("Shared router", "Share", "shared"),
    Row("Routing ratio", "17%", "ratio_17", routing_ratio=0.17),
    Row("Routing ratio", "34%", "ratio_34", routing_ratio=0.34),
    Row("Routing ratio", "50%", "ratio_50", routing_ratio=0.5),
    Row("Routing ratio", "68%", "ratio_68", routing_ratio=0.68),
)
DENSE_ROW = "dense_ft"


def resolve(row: Row, cfg: DemoConfig, prep: Prepared, arank_layers: tuple[int, ...]) -> dict[str, Any]:
    """The adaptation settings of a row: layers and MoDConfig keyword arguments."""
    from gmod_jax.config import mod_layer_indices

    layers = arank_layers if row.placement is None else mod_layer_indices(row.placement, prep.model.text.num_layers)
    kw = dict(cfg.mod_kwargs)
    if row.masking is not None:
        kw["masking"] = row.masking
    if row.routing_ratio is not None:
        kw["routing_ratio"] = row.routing_ratio
    kw["shared_router"] = row.shared_router
    settings = {"layers": tuple(layers), "mod": kw}
    if cfg.router_start_kwargs:  # every row starts its router as the demo does
        settings["start"] = cfg.router_start_kwargs
    return settings


def run_key(settings: dict, present_types: frozenset[int]) -> str:
    """Rows with the same effective settings share one run. Masking presets count as equal when
    they make the same token types routable among those the data has (e.g. `official` and
    `question_answer` on image-only data)."""
    mod = dict(settings["mod"])
    routable = frozenset(tt.MASKING_PRESETS[mod.pop("masking")]) & present_types
    return json.dumps({"layers": list(settings["layers"]), "routable": sorted(routable), **mod,
                       **settings.get("start", {})}, sort_keys=True, default=str)


def run_ablation(cfg: DemoConfig, workdir: str | os.PathLike, demo_workdir: str | os.PathLike, steps: int | None,
                 only: tuple[str, ...] = (), echo: Callable[[str], None] = print) -> dict:
    t0 = time.perf_counter()
    root = Path(workdir).resolve()  # Orbax refuses relative checkpoint paths
    demo_workdir = Path(demo_workdir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    if cfg.compilation_cache:
        enable_compilation_cache(demo_workdir / "xla_cache")
    prep = prepare(cfg, demo_workdir, Stages(demo_workdir, echo=echo))
    demo_stages = prep.stages
    stages = Stages(root, echo=echo)
    stages.done.update({k: v for k, v in demo_stages.done.items()})  # upstream fingerprints
    paths = Paths(root)
    arank_layers = tuple(demo_stages.done["arank"].result["mod_layers"])
    steps = steps if steps is not None else cfg.finetune.num_steps
    present = {tt.SYSTEM, tt.IMAGE, tt.QUESTION, tt.ANSWER}
    if cfg.synthetic.text_only_fraction > 0:
        present.add(tt.TEXT)
    present_types = frozenset(present)

    wanted = [r for r in ROWS if not only or r.name in only]
    unknown = set(only) - {r.name for r in ROWS} - {DENSE_ROW}
    if unknown:
        raise ValueError(f"unknown ablation rows {sorted(unknown)}; choose from {[r.name for r in ROWS] + [DENSE_ROW]}")
    results: list[dict] = []

    def evaluate(name: str, ckpt: Path, dep: str) -> dict:
        return stages.run(f"eval_{name}", (cfg.eval_batch, cfg.eval_limit, cfg.eval_max_new_tokens, prep.bucket),
                          [paths.eval(name) / "metrics.json"],
                          lambda: eval_stage(ckpt, prep.paths, paths.eval(name), cfg, prep.bucket),
                          deps=(dep,)).result

    if not only or DENSE_ROW in only:
        finetune_stage(stages, prep, cfg.finetune, DENSE_ROW, prep.paths.ckpt("dense"), paths.train(DENSE_ROW),
                       paths.ckpt(DENSE_ROW), ("dense", "tfds"), num_steps=steps)
        ev = evaluate(DENSE_ROW, paths.ckpt(DENSE_ROW), DENSE_ROW)
        results.append(_row_result("Dense", "dense fine-tune (no MoD)", DENSE_ROW, DENSE_ROW, [], {}, ev))

    runs: dict[str, str] = {}  # run key -> run name
    for row in wanted:
        settings = resolve(row, cfg, prep, arank_layers)
        key = run_key(settings, present_types)
        run = runs.setdefault(key, row.name)
        if run == row.name:
            stages.run(f"adapt_{run}", settings, [paths.ckpt(f"{run}_init") / "config.json"],
                       lambda s=settings, run=run: adapt_stage(prep, paths.ckpt(f"{run}_init"), s["layers"], cfg.seed,
                                                               **s.get("start", {}), **s["mod"]), deps=("dense",))
            finetune_stage(stages, prep, cfg.finetune, f"ft_{run}", paths.ckpt(f"{run}_init"), paths.train(run),
                           paths.ckpt(run), (f"adapt_{run}", "tfds"), num_steps=steps)
        ev = evaluate(run, paths.ckpt(run), f"ft_{run}")
        results.append(_row_result(row.group, row.label, row.name, run, list(settings["layers"]), settings["mod"], ev))

    summary = {"steps": steps, "rows": results, "demo_workdir": str(demo_workdir), "seconds": time.perf_counter() - t0,
               "num_layers": prep.model.text.num_layers, "arank_layers": list(arank_layers),
               "eval_questions": results[0]["n"] if results else 0}
    write_json(root / "ablation.json", summary)
    (root / "ablation.md").write_text(markdown(summary))
    echo(f"wrote {root / 'ablation.md'}")
    return summary


def _row_result(group, label, name, run, layers, mod, ev) -> dict:
    fl = ev["flops"]
    return {"group": group, "label": label, "name": name, "run": run, "mod_layers": layers,
            "routing_ratio": mod.get("routing_ratio"), "masking": mod.get("masking"),
            "shared_router": mod.get("shared_router"), "accuracy": ev["accuracy"], "per_family": ev["per_family"],
            "n": ev["n"], "prefill_skip_ratio": ev["prefill_skip_ratio"],
            "paper_gflops": fl.get("tflops", 0.0) * 1e3, "paper_gflops_dense": fl.get("tflops_dense", 0.0) * 1e3,
            "full_gflops": fl.get("tflops_prefill_full", 0.0) * 1e3, "mean_prompt_tokens": fl.get("mean_prompt_tokens")}


def markdown(s: dict) -> str:
    lines = ["# γ-MoD ablations on the synthetic task (Table 1 layout)\n",
             f"Each row: the demo's dense checkpoint adapted with one setting changed, fine-tuned {s['steps']} steps "
             f"with the demo's fine-tune recipe, evaluated on {s['eval_questions']} held-out questions (exact match). "
             f"Skip = prefill tokens skipped over the MoD layers (paper §5 definition). GFLOPs per sample: the paper's "
             f"LLM-prefill formula at the mean prompt length and realised skip (`gmod_jax.flops.paper_tflops`), and "
             f"this implementation's full analytic prefill count (vision tower, router and head included). "
             f"{s['num_layers']} decoder layers; ARank MoD layers {s['arank_layers']}.\n",
             "| group | setting | MoD layers | masking | router | ratio | accuracy | skip | paper GFLOPs | full GFLOPs | run |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in s["rows"]:
        router = "–" if r["shared_router"] is None else ("shared" if r["shared_router"] else "per layer")
        ratio = "–" if r["routing_ratio"] is None else f"{r['routing_ratio']:g}"
        lines.append(f"| {r['group']} | {r['label']} | {r['mod_layers'] or '–'} | {r['masking'] or '–'} | {router} "
                     f"| {ratio} | {r['accuracy']:.2f}% | {100 * r['prefill_skip_ratio']:.1f}% "
                     f"| {r['paper_gflops']:.4f} | {r['full_gflops']:.4f} | {r['run']} |")
    lines.append(f"\nTotal time {s['seconds'] / 60:.1f} min.\n")
    return "\n".join(lines)


def main(argv=None, config: DemoConfig | None = None, echo: Callable[[str], None] = print) -> dict:
    from gmod_jax.config_files import OverrideError, apply_overrides

    ap = argparse.ArgumentParser(prog="python -m demo.ablation", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--workdir", required=True, help="output directory (reused on reruns)")
    ap.add_argument("--demo-workdir", default="runs/demo", help="the demo's workdir (dense checkpoint, ARank)")
    ap.add_argument("--steps", type=int, default=None, help="fine-tune steps per row (default: the demo's)")
    ap.add_argument("--only", nargs="+", default=[], metavar="NAME",
                    help=f"rows to run: {', '.join([DENSE_ROW] + [r.name for r in ROWS])}")
    ap.add_argument("--eval-limit", type=int, default=None, help="evaluate the first N held-out questions only")
    ap.add_argument("--config", default=None, help="demo config file (default configs/demo_default.py)")
    ap.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                    help="override DemoConfig fields (as for python -m demo)")
    args = ap.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)
    try:
        cfg = config if config is not None else load_config(args.config)
        cfg = apply_overrides(cfg, args.overrides)
        if args.eval_limit is not None:
            cfg = dataclasses.replace(cfg, eval_limit=args.eval_limit)
    except (OverrideError, ValueError, TypeError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}")
    return run_ablation(cfg, args.workdir, args.demo_workdir, args.steps, tuple(args.only), echo)


if __name__ == "__main__":
    main()
    sys.exit(0)
