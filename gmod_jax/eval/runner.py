"""Evaluate a gmod-jax checkpoint on one benchmark: ``python -m gmod_jax.eval``.

    python -m gmod_jax.eval --ckpt DIR --benchmark NAME --questions FILE [--images DIR]
        [--annotations FILE|DIR] --out DIR [--results FILE] [--batch-size B] [--limit N]
        [--max-new-tokens N] [--decoding gamma_mod|llava] [--mode inference|dense]

Greedy batched generation (prompts left-padded to the generator's length buckets; a short
last batch is padded with copies of its last prompt so it reuses the compiled shape), one
answer line per question appended to ``<out>/answers.jsonl`` as it arrives (an interrupted
run continues where it stopped), then scoring with the benchmark's official rules, the
submission / official-evaluator files, ``<out>/metrics.json`` and a row in the results table.

Reported per run (definitions of the paper, reference notes §5):

* accuracy: the benchmark's headline (percent; MME: perception points);
* skip ratio: Σ tokens not kept / Σ tokens entering, over every MoD layer and every sample's
  prefill (decode skips reported separately, as the paper counts prefill only);
* samples/s: samples / summed wall time of the generate calls (preprocessing, vision tower,
  prefill, decode). ``samples_per_s`` counts every call, ``samples_per_s_steady`` only calls
  whose shapes were already compiled. The paper's number is batch 1 (``--batch-size 1``);
* TFLOPs: the paper's analytic prefill formula (:func:`gmod_jax.flops.paper_tflops`, LLM
  decoder only) at the realised skip ratio and the mean prompt length of this benchmark
  (image tokens included), next to the full analytic count of this implementation.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from gmod_jax.eval import benchmarks as B
from gmod_jax.eval.results import AnswersFile, ResultRow, ResultsTable, write_json_atomic

ANSWERS_FILE = "answers.jsonl"  # resumable record of generations (+ per-sample statistics)
RUN_FILE = "run.json"  # settings the answers were generated with, checked on resume
LLAVA_ANSWERS_FILE = "llava_answers.jsonl"  # LLaVA answers-file format for official scripts
METRICS_FILE = "metrics.json"

# Benchmark-specific submission files (beside the LLaVA answers file, which is itself the
# official evaluator's input for SQA, TextVQA and POPE). MME's is a directory.
SUBMISSION_NAMES = {
    "gqa": "testdev_balanced_predictions.json",
    "mme": "mme_results",
    "mmbench": "mmbench_submission.tsv",
    "mmmu": "mmmu_predictions.json",
    "seed": "seed_submission.jsonl",
    "vqav2": "vqav2_submission.json",
    "vizwiz": "vizwiz_submission.json",
}

# How --questions / --images / --annotations map onto each benchmark class's constructor.
# (ScienceQA's --annotations may also be a directory; see _benchmark_kwargs.)
FILE_ARGS = {
    "gqa": {"questions": "question_file", "images": "image_root", "annotations": "annotation_file"},
    "sqa": {"questions": "question_file", "images": "image_root", "annotations": "problems_file"},
    "textvqa": {"questions": "question_file", "images": "image_root",
                "annotations": "annotation_file"},
    "pope": {"questions": "question_file", "images": "image_root", "annotations": "annotation_dir"},
    "mme": {"questions": "question_file", "images": "image_root", "annotations": "gt_dir"},
    "mmbench": {"questions": "tsv_file"},
    "mmmu": {"questions": "data_file", "images": "image_root"},
    "seed": {"questions": "question_file", "images": "image_root",
             "annotations": "annotation_file"},
    "vqav2": {"questions": "question_file", "images": "image_root",
              "annotations": "annotation_file"},
    "vizwiz": {"questions": "question_file", "images": "image_root",
               "annotations": "annotation_file"},
}

USAGE = """\
benchmarks and their files (LLaVA's evaluation layout; answers are scored locally when the
ground truth is given, otherwise only the submission files are written):

  gqa      --questions llava_gqa_testdev_balanced.jsonl --images <gqa>/images
           --annotations testdev_balanced_questions.json
  sqa      --questions llava_test_CQM-A.json --images <scienceqa>/images/test
           --annotations problems.json | <scienceqa dir with problems.json, pid_splits.json>
           (without --questions the split's pids come from pid_splits.json: --pid-splits,
           --split)
  textvqa  --questions llava_textvqa_val_v051_ocr.jsonl --images <textvqa>/train_images
           --annotations TextVQA_0.5.1_val.json
  pope     --questions llava_pope_test.jsonl --images <coco>/val2014
           --annotations <pope>/coco   (directory of coco_pope_{adversarial,popular,random}.json)
  mme      --questions llava_mme.jsonl --images MME_Benchmark_release_version
           --annotations MME_Benchmark_release_version   (or an eval_tool ground-truth dir)
  mmbench  --questions mmbench_dev_20230712.tsv   (images are inside the TSV)
           [--mmbench-rounds auto|all|single] [--lang en|cn]
  mmmu     --questions <MMMU validation exported as .json/.jsonl, or a dir of them>
           --images <dir of image_1 files>
  seed     --questions llava-seed-bench.jsonl --images <SEED-Bench root>
           --annotations SEED-Bench.json
  vqav2    --questions llava_vqav2_mscoco_test-dev2015.jsonl --images <coco>/test2015
           [--test-split llava_vqav2_mscoco_test2015.jsonl] [--annotations <VQA annotations>]
  vizwiz   --questions llava_test.jsonl --images <vizwiz>/test [--annotations <val json>]

Any other constructor option of gmod_jax.eval.benchmarks: --bench-arg KEY=VALUE (VALUE is
parsed as JSON when it parses, e.g. --bench-arg parse_rule='"llava"' for SQA, --bench-arg
parse='"letter"' for SEED, --bench-arg vqa_rule='"vizwiz"' for VizWiz scored with the
VizWiz-VQA API's vqaEval.py instead of GT-Vision-Lab's 2021 one, --bench-arg image_only=false).

outputs in --out: answers.jsonl (resumable; one line per question with routing statistics),
run.json, llava_answers.jsonl, the benchmark's submission file, metrics.json; a row in
--results (default <out>/../results.json, markdown view beside it).
"""


# ----------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m gmod_jax.eval", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Evaluate a gmod-jax checkpoint on a benchmark: accuracy, prefill skip "
                    "ratio, samples/s and analytic TFLOPs.", epilog=USAGE)
    names = sorted(B.BENCHMARKS) + sorted(B.ALIASES)
    p.add_argument("--ckpt", required=True, help="gmod-jax checkpoint directory")
    p.add_argument("--benchmark", required=True, type=str.lower, choices=names, metavar="NAME",
                   help="one of " + ", ".join(sorted(B.BENCHMARKS)))
    p.add_argument("--questions", required=True,
                   help="the benchmark's question file (see below)")
    p.add_argument("--images", default=None, help="image root the question file refers to")
    p.add_argument("--annotations", default=None,
                   help="ground-truth file or directory (see below)")
    p.add_argument("--out", required=True, help="output directory of this run (resumable)")
    p.add_argument("--results", default=None,
                   help="results table JSON to append to (default <out>/../results.json)")
    p.add_argument("--name", default=None,
                   help="checkpoint label in the results table (default: the checkpoint "
                        "directory's name, '[dense]' appended in dense mode)")
    p.add_argument("--batch-size", type=int, default=8,
                   help="prompts per generate call (the paper's samples/s is batch 1)")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N questions only")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="override the benchmark's decoding length (see --decoding)")
    p.add_argument("--decoding", default="gamma_mod", choices=("gamma_mod", "llava"),
                   help="per-benchmark max_new_tokens of γ-MoD's eval code (default) or "
                        "LLaVA-1.5's")
    p.add_argument("--mode", default="inference", choices=("inference", "dense"),
                   help="inference: γ-MoD routing; dense: MoD layers run densely (baseline)")
    p.add_argument("--template", default="vicuna_v1", help="conversation template")
    p.add_argument("--image-aspect", default="pad", choices=("pad", "crop"),
                   help="pad: LLaVA-1.5 expand-to-square; crop: CLIP centre crop")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer file or directory (default: the checkpoint's)")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="cast params and compute to this dtype")
    p.add_argument("--prompt-buckets", default=None,
                   help="comma-separated prompt length buckets (default: the generator's "
                        "power-of-two / 1.5x grid); fewer buckets, fewer compilations")
    p.add_argument("--no-pad-batches", action="store_true",
                   help="run a short last batch at its own size (compiles another shape)")
    p.add_argument("--overwrite", action="store_true",
                   help="discard answers from an earlier run in --out and start again")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("benchmark-specific files and options")
    g.add_argument("--pid-splits", default=None, help="sqa: pid_splits.json")
    g.add_argument("--split", default=None, help="sqa: split of pid_splits.json (default test)")
    g.add_argument("--test-split", default=None,
                   help="vqav2: full test2015 question file the submission must cover")
    g.add_argument("--mmbench-rounds", default="auto", choices=("auto", "all", "single"),
                   help="mmbench: circular rounds (auto: all unless the TSV holds the copies)")
    g.add_argument("--lang", default=None, choices=("en", "cn"), help="mmbench: prompt language")
    g.add_argument("--bench-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="extra benchmark constructor option (repeatable)")
    return p


def _parse_bench_args(items: Sequence[str]) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--bench-arg needs KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value  # a bare string
    return out


def _benchmark_kwargs(name: str, args) -> dict:
    """Constructor keyword arguments of benchmark ``name`` from the parsed command line."""
    spec = FILE_ARGS[name]
    kw: dict[str, Any] = {}
    for opt, param in spec.items():
        value = getattr(args, opt)
        if value is not None:
            kw[param] = str(value)
    for opt in ("images", "annotations"):
        if getattr(args, opt) is not None and opt not in spec:
            print(f"warning: --{opt} is not used by {name}", file=sys.stderr)

    if name == "sqa":
        # LLaVA's eval_science_qa.py takes the ScienceQA data dir (--base-dir) holding
        # problems.json and pid_splits.json; accept that directory as --annotations, and
        # problems.json itself as --questions (the pid split then defines the questions).
        if Path(args.questions).name == "problems.json":
            kw.pop("question_file")
            kw["problems_file"] = str(args.questions)
        ann = Path(args.annotations) if args.annotations else None
        if ann is not None and ann.is_dir():
            kw["problems_file"] = str(ann / "problems.json")
            if (ann / "pid_splits.json").exists():
                kw["pid_splits_file"] = str(ann / "pid_splits.json")
        if "problems_file" not in kw:
            raise ValueError("sqa needs --annotations problems.json (or the ScienceQA data dir)")
        if args.pid_splits is not None:
            kw["pid_splits_file"] = str(args.pid_splits)
        if args.split is not None:
            kw["split"] = args.split
    elif args.pid_splits is not None or args.split is not None:
        raise ValueError("--pid-splits / --split are sqa options")
    if name == "vqav2" and args.test_split is not None:
        kw["test_split_file"] = str(args.test_split)
    elif args.test_split is not None:
        raise ValueError("--test-split is a vqav2 option")
    if name == "mmbench":
        kw["all_rounds"] = {"auto": None, "all": True, "single": False}[args.mmbench_rounds]
        if args.lang is not None:
            kw["lang"] = args.lang
    elif args.lang is not None or args.mmbench_rounds != "auto":
        raise ValueError("--lang / --mmbench-rounds are mmbench options")
    kw.update(_parse_bench_args(args.bench_arg))
    kw.update(limit=args.limit, max_new_tokens=args.max_new_tokens, decoding=args.decoding)
    return kw


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from gmod_jax.data.errors import BadRecord

    try:
        run_eval(args)
    except (BadRecord, FileNotFoundError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


# ----------------------------------------------------------------------------------------
# generation
# ----------------------------------------------------------------------------------------


class RunMismatch(ValueError):
    """The output directory holds answers generated with different settings."""


# Shapes this process has compiled, keyed like the generator's jit caches (config and cache
# spec are static arguments; a batch with no image traces a different prefill). A batch whose
# key is new paid for compilation and is left out of the steady-state samples/s.
_COMPILED: set = set()


def prompt_length(config, tokenizer, prompt: dict, template: str) -> int:
    """Tokens the LLM sees for ``prompt`` (image run expanded), rendered exactly as
    :func:`gmod_jax.inference.generate.generate` renders it."""
    from gmod_jax.data.templates import IMAGE_TAG, render_prompt
    from gmod_jax.inference.generate import expand_prompt

    text, has_image = prompt["text"], prompt.get("image") is not None
    if has_image and IMAGE_TAG not in text:
        text = IMAGE_TAG + "\n" + text
    segments = render_prompt(text, template, has_image=has_image,
                             record_id=str(prompt.get("question_id", "prompt")))
    ids, _ = expand_prompt(config, tokenizer.encode_segments(segments).input_ids)
    return int(ids.size)


class Generator:
    """``generate_fn`` for :func:`benchmarks.run_benchmark`: one batched greedy ``generate``
    call per batch, returning each answer with its per-sample routing statistics and its
    share of the call's wall time (stored in the answers file, so a resumed run still
    aggregates over every sample)."""

    def __init__(self, model, tokenizer, *, batch_size: int, mode: str, template: str,
                 image_aspect: str, prompt_buckets=None, pad_batches: bool = True):
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.mode, self.template = batch_size, mode, template
        self.image_aspect, self.prompt_buckets, self.pad_batches = (image_aspect, prompt_buckets,
                                                                     pad_batches)
        self.calls = 0

    def __call__(self, batch: list[dict]) -> list[dict]:
        n = len(batch)
        rows = list(batch)
        if self.pad_batches and n < self.batch_size:
            # Filler rows are copies of the last prompt: rows never influence each other
            # (left padding, per-row routing and sampling), so answers are unchanged and the
            # compiled full-batch shape is reused; their outputs are dropped.
            rows += [batch[-1]] * (self.batch_size - n)
        max_new = max(p["max_new_tokens"] for p in batch)
        t0 = time.perf_counter()
        out = self.model.generate(
            [{"image": p["image"], "text": p["text"]} for p in rows], tokenizer=self.tokenizer,
            template=self.template, image_aspect=self.image_aspect, max_new_tokens=max_new,
            temperature=0.0, mode=self.mode, prompt_buckets=self.prompt_buckets)
        elapsed = time.perf_counter() - t0
        self.calls += 1
        key = (self.model.config, out.spec, any(p["image"] is not None for p in rows))
        compiled = key not in _COMPILED
        _COMPILED.add(key)

        st = {k: np.asarray(v) for k, v in out.stats.items()}
        n_mod = len(out.mod_layers)
        results = []
        for i, p in enumerate(batch):
            if n_mod:
                prompt_tokens = int(st["prefill_tokens"][0, i])  # every token enters a layer
            else:
                prompt_tokens = prompt_length(self.model.config, self.tokenizer, p, self.template)
            results.append({
                "text": out.texts[i],
                "prompt_tokens": prompt_tokens,
                "image": p["image"] is not None,
                "new_tokens": int(out.lengths[i]),
                "mod_layers": [int(x) for x in out.mod_layers],
                "prefill_kept": [int(x) for x in st["prefill_kept"][:, i]],
                "prefill_tokens": [int(x) for x in st["prefill_tokens"][:, i]],
                "decode_kept": [int(x) for x in st["decode_kept"][:, i]],
                "decode_tokens": int(st["decode_tokens"][i]),
                # the whole call's time is charged to the real rows (filler rows included)
                "time_s": elapsed / n,
                "batch": n,
                "compiled": compiled,
            })
        return results


# ----------------------------------------------------------------------------------------
# aggregation
# ----------------------------------------------------------------------------------------


def aggregate(records: Sequence[dict]) -> dict:
    """Skip ratios, speed and prompt lengths over per-sample answer records."""
    recs = [r for r in records if "prompt_tokens" in r]
    out: dict[str, Any] = {"n_samples": len(recs)}
    if not recs:
        return out
    mod_layers = recs[0].get("mod_layers", [])
    if any(r.get("mod_layers", []) != mod_layers for r in recs):
        raise ValueError("answers were generated with different MoD layers; use --overwrite")
    out["mod_layers"] = mod_layers
    if mod_layers:
        kept = np.asarray([r["prefill_kept"] for r in recs], np.float64)  # [N, n_mod]
        entering = np.asarray([r["prefill_tokens"] for r in recs], np.float64)
        dkept = np.asarray([r["decode_kept"] for r in recs], np.float64)
        dtok = np.asarray([r["decode_tokens"] for r in recs], np.float64)[:, None]
        dtok = np.broadcast_to(dtok, dkept.shape)
        out["prefill_skip_ratio"] = float(1.0 - kept.sum() / max(entering.sum(), 1.0))
        out["prefill_skip_ratio_per_layer"] = [
            float(v) for v in 1.0 - kept.sum(0) / np.maximum(entering.sum(0), 1.0)]
        out["decode_skip_ratio"] = (float(1.0 - dkept.sum() / dtok.sum()) if dtok.sum() else None)
        out["decode_skip_ratio_per_layer"] = [
            float(1.0 - k / t) if t else None for k, t in zip(dkept.sum(0), dtok.sum(0))]
        out["mean_kept_per_layer"] = [float(v) for v in kept.mean(0)]
    else:  # dense model or dense mode: nothing is routed, nothing is skipped
        out["prefill_skip_ratio"] = 0.0
        out["prefill_skip_ratio_per_layer"] = []
        out["decode_skip_ratio"] = 0.0
        out["mean_kept_per_layer"] = None
    out["mean_prompt_tokens"] = float(np.mean([r["prompt_tokens"] for r in recs]))
    out["image_fraction"] = float(np.mean([bool(r["image"]) for r in recs]))
    out["mean_new_tokens"] = float(np.mean([r["new_tokens"] for r in recs]))
    total = sum(r["time_s"] for r in recs)
    steady = [r for r in recs if not r["compiled"]]
    steady_s = sum(r["time_s"] for r in steady)
    out["generate_s"] = total
    out["samples_per_s"] = len(recs) / total if total > 0 else None
    out["n_steady"] = len(steady)
    out["samples_per_s_steady"] = len(steady) / steady_s if steady and steady_s > 0 else None
    out["batch_sizes"] = sorted({int(r["batch"]) for r in recs})
    return out


def flops_summary(config, agg: dict, mode: str) -> dict:
    """Analytic prefill TFLOPs per sample at the realised skip ratio (gmod_jax.flops)."""
    from gmod_jax import flops as F

    if "mean_prompt_tokens" not in agg:
        return {}
    t = config.text
    length = agg["mean_prompt_tokens"]
    n_mod = len(agg["mod_layers"])
    skip = agg["prefill_skip_ratio"]
    kept = agg["mean_kept_per_layer"] if n_mod else None
    full = F.prefill_flops(config, 1, length, kept, images=agg["image_fraction"])
    dense_full = F.prefill_flops(config, 1, length, None, images=agg["image_fraction"])
    return {
        "mean_prompt_tokens": length,
        # the paper's number: LLM decoder only, N_dense·F(L) + N_mod·F(int(L(1-s)))
        "tflops": F.paper_tflops(length, t.hidden_size, t.intermediate_size,
                                 t.num_layers - n_mod, n_mod, skip),
        "tflops_dense": F.paper_tflops(length, t.hidden_size, t.intermediate_size,
                                       t.num_layers, 0, 0.0),
        # this implementation as executed: vision tower, projector, GQA widths, router,
        # lm_head, MoD layers at their mean kept tokens
        "tflops_prefill_full": full.total / 1e12,
        "tflops_prefill_full_dense": dense_full.total / 1e12,
        "formula": "gmod_jax.flops.paper_tflops(L=mean prompt tokens, d, d_ff, "
                   f"n_dense={t.num_layers - n_mod}, n_mod={n_mod}, s=prefill skip)",
    }


# ----------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------


def _run_settings(args, name: str, bench) -> dict:
    """What the answers depend on; a resumed run must match."""
    return {"benchmark": name, "ckpt": str(Path(args.ckpt).resolve()), "mode": args.mode,
            "max_new_tokens": bench.max_new_tokens, "template": args.template,
            "image_aspect": args.image_aspect, "dtype": args.dtype,
            "tokenizer": str(Path(args.tokenizer).resolve()) if args.tokenizer else None,
            "questions": str(Path(args.questions).resolve())}


def _check_resume(out: Path, settings: dict, overwrite: bool) -> None:
    run_file, answers = out / RUN_FILE, out / ANSWERS_FILE
    if overwrite:
        for f in (run_file, answers):
            if f.exists():
                f.unlink()
    if run_file.exists():
        with open(run_file, encoding="utf-8") as f:
            previous = json.load(f).get("settings", {})
        diff = {k: (previous.get(k), v) for k, v in settings.items() if previous.get(k) != v}
        if diff:
            raise RunMismatch(f"{out} holds answers generated with other settings "
                              f"(earlier, now): {diff}; use another --out or --overwrite")
    elif answers.exists() and answers.stat().st_size:
        raise RunMismatch(f"{answers} exists without {RUN_FILE}; use --overwrite")
    write_json_atomic(run_file, {"settings": settings}, indent=1)


def _write_files(bench, answers: dict, out: Path, name: str) -> dict:
    files = {"answers": str(out / ANSWERS_FILE),
             "llava_answers": str(bench.write_answers_jsonl(answers, out / LLAVA_ANSWERS_FILE))}
    if name in SUBMISSION_NAMES:
        try:
            files["submission"] = str(bench.write_submission(answers, out / SUBMISSION_NAMES[name]))
        except KeyError as e:  # VizWiz's converter insists on every answer
            print(f"warning: no submission file: {e}", file=sys.stderr)
    else:
        files["submission"] = files["llava_answers"]
    return files


def run_eval(args) -> dict:
    """Run one evaluation from parsed arguments; returns the metrics dict it writes."""
    name = B.ALIASES.get(args.benchmark, args.benchmark)
    if args.batch_size < 1:
        raise ValueError("--batch-size must be >= 1")
    if not Path(args.ckpt).is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {args.ckpt}")
    kwargs = _benchmark_kwargs(name, args)
    try:
        bench = B.load_benchmark(name, **kwargs)
    except TypeError as e:
        if "unexpected keyword argument" not in str(e):
            raise
        raise ValueError(f"{name}: {e} (a --bench-arg the benchmark does not take)") from None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _check_resume(out, _run_settings(args, name, bench), args.overwrite)

    import jax

    from gmod_jax import api
    from gmod_jax.data.tokenizer import load_tokenizer

    model = api.load(args.ckpt, dtype=args.dtype)
    tokenizer = load_tokenizer(args.tokenizer or args.ckpt)
    buckets = ([int(b) for b in args.prompt_buckets.split(",") if b.strip()]
               if args.prompt_buckets else None)
    gen = Generator(model, tokenizer, batch_size=args.batch_size, mode=args.mode,
                    template=args.template, image_aspect=args.image_aspect,
                    prompt_buckets=buckets, pad_batches=not args.no_pad_batches)

    af = AnswersFile(out / ANSWERS_FILE)
    prompts = bench.prompts()
    answered = af.answered_ids()
    done_before = sum(p["question_id"] in answered for p in prompts)
    bar = None
    if not args.no_progress and done_before < len(prompts):
        from tqdm import tqdm

        bar = tqdm(total=len(prompts), initial=done_before, desc=name, unit="q",
                   dynamic_ncols=True, file=sys.stderr)

    def on_batch(done: int, _todo: int) -> None:
        if bar is not None:
            bar.update(done_before + done - bar.n)

    try:
        run = B.run_benchmark(bench, gen, af, batch_size=args.batch_size, on_batch=on_batch)
    finally:
        if bar is not None:
            bar.close()

    wanted = {p["question_id"] for p in prompts}
    by_id = {}
    for rec in af.records():  # last record per question wins, as in AnswersFile.answers
        if rec["question_id"] in wanted:
            by_id[rec["question_id"]] = rec
    answers = {q: r["text"] for q, r in by_id.items()}
    agg = aggregate(list(by_id.values()))
    flops = flops_summary(model.config, agg, args.mode)

    score = bench.score(answers) if bench.has_ground_truth else None
    files = _write_files(bench, answers, out, name)
    ckpt_label = args.name or (Path(args.ckpt).resolve().name
                               + ("[dense]" if args.mode == "dense" else ""))
    device = jax.devices()[0]
    metrics = {
        "benchmark": name, "ckpt": ckpt_label, "ckpt_path": str(Path(args.ckpt).resolve()),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "mode": args.mode, "decoding": args.decoding, "max_new_tokens": bench.max_new_tokens,
        "batch_size": args.batch_size, "limit": args.limit,
        "n_questions": len(bench), "n_prompts": len(prompts), "n_answered": len(answers),
        "n_generated_this_run": run.n_generated, "generate_calls_this_run": gen.calls,
        "score": score.to_dict() if score is not None else None,
        "skip": {k: agg.get(k) for k in ("mod_layers", "prefill_skip_ratio",
                                         "prefill_skip_ratio_per_layer", "decode_skip_ratio",
                                         "decode_skip_ratio_per_layer")},
        "speed": {k: agg.get(k) for k in ("samples_per_s", "samples_per_s_steady", "n_steady",
                                          "generate_s", "batch_sizes", "mean_new_tokens")},
        "flops": flops,
        "device": f"{device.platform}:{device.device_kind}",
        "files": files,
    }
    write_json_atomic(out / METRICS_FILE, metrics, indent=1)

    results_path = Path(args.results) if args.results else out.resolve().parent / "results.json"
    row = ResultRow(
        benchmark=name, accuracy=score.headline if score is not None else None, ckpt=ckpt_label,
        skip_ratio=agg.get("prefill_skip_ratio"), samples_per_s=agg.get("samples_per_s"),
        tflops=flops.get("tflops"), date=metrics["date"],
        metric=score.headline_name if score is not None else "no ground truth",
        n=len(bench), extra={
            "samples_per_s_steady": agg.get("samples_per_s_steady"),
            "decode_skip_ratio": agg.get("decode_skip_ratio"),
            "tflops_dense": flops.get("tflops_dense"),
            "tflops_prefill_full": flops.get("tflops_prefill_full"),
            "mean_prompt_tokens": flops.get("mean_prompt_tokens"),
            "batch_size": args.batch_size, "mode": args.mode, "device": metrics["device"],
            "out": str(out.resolve())})
    ResultsTable(results_path).append(row)
    metrics["results"] = str(results_path)
    _summary(metrics, sys.stderr)
    return metrics


def _summary(m: dict, stream) -> None:
    s, sp, fl = m["score"], m["speed"], m["flops"]
    acc = f"{s['headline_name']} {s['headline']:.2f}" if s else "no ground truth"
    skip = m["skip"].get("prefill_skip_ratio")
    parts = [f"{m['benchmark']}: {acc}",
             f"skip {100 * skip:.1f}%" if skip is not None else "skip –",
             f"{sp['samples_per_s']:.2f} samples/s" if sp.get("samples_per_s") else "",
             f"{fl['tflops']:.3g} TFLOPs" if fl.get("tflops") is not None else "",
             f"({m['n_answered']}/{m['n_prompts']} answered)"]
    print("  ".join(p for p in parts if p), file=stream)


if __name__ == "__main__":
    sys.exit(main())
