"""`python -m gmod_jax.eval` end to end on a tiny γ-MoD checkpoint, for every benchmark.

Compilation dominates the run time on CPU, so the runs share shapes: the per-benchmark runs
all use batch 4, one prompt bucket (384 holds every synthetic prompt) and 3 new tokens; the
batch-equivalence and resume tests use the default buckets at batch 1 and 3.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from gmod_jax import api
from gmod_jax.eval import benchmarks as B
from gmod_jax.eval.results import LABELS, ResultsTable
from gmod_jax.eval.runner import ANSWERS_FILE, LLAVA_ANSWERS_FILE, METRICS_FILE, main
from tests.support.eval_files import write_benchmark_files
from tests.test_eval_official import official_headline
from tests.tiny_checkpoint import make_tiny_checkpoint

FAST = ["--batch-size", "4", "--prompt-buckets", "384", "--max-new-tokens", "3", "--no-progress"]

# CLI file options per benchmark, from write_benchmark_files' constructor kwargs
FILE_FLAGS = {
    "question_file": "--questions", "tsv_file": "--questions", "data_file": "--questions",
    "image_root": "--images", "annotation_file": "--annotations", "annotation_dir": "--annotations",
    "gt_dir": "--annotations", "problems_file": "--annotations", "test_split_file": "--test-split",
    "pid_splits_file": "--pid-splits",
}


def _sharp_router(params):
    """A router with keep-probabilities near 0 and 1, so the 0.005 prefill threshold skips
    some tokens (the random init keeps every token)."""
    kernel = params["llm"]["mod_router"]["kernel"]
    rng = np.random.default_rng(0)
    llm = {**params["llm"], "mod_router": {
        "kernel": jnp.asarray(0.5 * rng.standard_normal(kernel.shape), kernel.dtype)}}
    return {**params, "llm": llm}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_ckpt")
    return make_tiny_checkpoint(root, mod_layers=(1, 2), num_samples=1,
                                transform_params=_sharp_router)["ckpt"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_files")
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = write_benchmark_files(name, root / name, n=2 if name == "pope" else 4)
        return cache[name]

    return get


def _cli(ckpt, name, kw, out, *extra) -> list[str]:
    argv = ["--ckpt", str(ckpt), "--benchmark", name, "--out", str(out)]
    for key, value in kw.items():
        argv += [FILE_FLAGS[key], str(value)]
    return argv + list(extra)


def _read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _check_submission(name, path: Path, bench, answers):
    """The benchmark's submission file in the format its official converter writes."""
    n = len(bench.prompts())
    if name == "gqa":
        data = json.loads(path.read_text())
        assert len(data) == n and all(set(d) == {"questionId", "prediction"} for d in data)
    elif name in ("sqa", "textvqa", "pope"):  # LLaVA answers file = evaluator input
        assert path.name == LLAVA_ANSWERS_FILE
    elif name == "mme":
        assert path.is_dir()
        lines = [ln for f in path.glob("*.txt") for ln in f.read_text().splitlines()]
        assert len(lines) == n and all(len(ln.split("\t")) == 4 for ln in lines)
    elif name == "mmbench":
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
        assert "prediction" in rows[0] and "image" not in rows[0]
        assert len(rows) == len(B.read_mmbench_tsv(bench.tsv_file))
    elif name == "mmmu":
        data = json.loads(path.read_text())
        assert set(data) == {it["question_id"] for it in bench.items}  # incl. model-free ones
    elif name == "seed":
        recs = _read_jsonl(path)
        assert len(recs) == n and all(set(r) == {"question_id", "prediction"} for r in recs)
    elif name == "vqav2":
        data = json.loads(path.read_text())
        assert len(data) == n + 2  # the full test split, test-std questions with ""
        assert all(set(d) == {"question_id", "answer"} for d in data)
    elif name == "vizwiz":
        data = json.loads(path.read_text())
        assert len(data) == n and all(set(d) == {"image", "answer"} for d in data)
    else:
        raise AssertionError(name)


@pytest.mark.parametrize("name", sorted(B.BENCHMARKS))
def test_cli_every_benchmark(ckpt, files, tmp_path, name):
    kw = files(name)
    out = tmp_path / "run"
    assert main(_cli(ckpt, name, kw, out, *FAST)) == 0
    bench = B.load_benchmark(name, **kw)
    n = len(bench.prompts())

    answers = _read_jsonl(out / ANSWERS_FILE)
    assert len(answers) == n
    assert {a["question_id"] for a in answers} == {p["question_id"] for p in bench.prompts()}
    for a in answers:  # per-sample statistics kept for resumed aggregation
        assert a["mod_layers"] == [1, 2] and len(a["prefill_kept"]) == 2
        assert all(k <= t == a["prompt_tokens"]
                   for k, t in zip(a["prefill_kept"], a["prefill_tokens"]))
        assert 1 <= a["new_tokens"] <= 3 and a["time_s"] > 0
    llava = _read_jsonl(out / LLAVA_ANSWERS_FILE)
    assert len(llava) == n
    assert all({"question_id", "prompt", "text", "answer_id", "model_id"} <= set(r) for r in llava)

    m = json.loads((out / METRICS_FILE).read_text())
    _check_submission(name, Path(m["files"]["submission"]), bench, answers)
    assert m["benchmark"] == name and m["n_answered"] == n and m["max_new_tokens"] == 3
    assert m["score"]["metrics"]["n_missing"] == 0
    # the headline is the official scorer's number on the files this run wrote
    assert m["score"]["headline"] == pytest.approx(official_headline(name, kw, m["files"]))
    skip = m["skip"]["prefill_skip_ratio"]
    kept = sum(sum(a["prefill_kept"]) for a in answers)
    entering = sum(sum(a["prefill_tokens"]) for a in answers)
    assert skip == pytest.approx(1 - kept / entering) and 0.0 < skip < 1.0
    assert m["speed"]["samples_per_s"] > 0
    fl = m["flops"]
    assert fl["mean_prompt_tokens"] == pytest.approx(np.mean([a["prompt_tokens"] for a in answers]))
    assert 0 < fl["tflops"] < fl["tflops_dense"]  # MoD layers skip tokens
    assert 0 < fl["tflops_prefill_full"] < fl["tflops_prefill_full_dense"]

    rows = ResultsTable(tmp_path / "results.json").rows()
    assert len(rows) == 1
    row = rows[0]
    assert row.benchmark == name and row.ckpt == "ckpt" and row.date
    assert row.accuracy == pytest.approx(m["score"]["headline"])
    assert row.skip_ratio == pytest.approx(skip)
    assert row.samples_per_s == pytest.approx(m["speed"]["samples_per_s"])
    assert row.tflops == pytest.approx(fl["tflops"])
    assert "samples_per_s_steady" in row.extra
    assert LABELS[name] in (tmp_path / "results.md").read_text()


@pytest.mark.parametrize("name", ["gqa", "pope"])
def test_batched_equals_batch1(ckpt, files, tmp_path, name):
    kw = files(name)
    texts = {}
    for bs in (1, 3):
        out = tmp_path / f"bs{bs}"
        # default prompt buckets; batch 3 pads the short last batch with filler rows
        assert main(_cli(ckpt, name, kw, out, "--batch-size", str(bs), "--max-new-tokens", "3",
                         "--no-progress")) == 0
        texts[bs] = {a["question_id"]: a["text"] for a in _read_jsonl(out / ANSWERS_FILE)}
        assert json.loads((out / METRICS_FILE).read_text())["speed"]["batch_sizes"] == \
            sorted({min(bs, len(texts[bs]) - i) for i in range(0, len(texts[bs]), bs)})
    assert len(texts[1]) == len(B.load_benchmark(name, **kw).prompts())
    assert texts[1] == texts[3]


def test_resume_skips_answered_questions(ckpt, files, tmp_path, monkeypatch):
    kw = files("gqa")
    out = tmp_path / "run"
    generated = []
    original = api.Model.generate

    def counting(self, prompts, **kwargs):
        generated.extend(p["text"] for p in prompts)
        return original(self, prompts, **kwargs)

    monkeypatch.setattr(api.Model, "generate", counting)
    common = ["--batch-size", "3", "--max-new-tokens", "3", "--no-progress"]
    assert main(_cli(ckpt, "gqa", kw, out, "--limit", "2", *common)) == 0
    first = (out / ANSWERS_FILE).read_text().splitlines()
    assert len(first) == 2
    m = json.loads((out / METRICS_FILE).read_text())
    assert m["n_questions"] == 2 and m["n_generated_this_run"] == 2

    generated.clear()
    assert main(_cli(ckpt, "gqa", kw, out, *common)) == 0
    lines = (out / ANSWERS_FILE).read_text().splitlines()
    assert lines[:2] == first and len(lines) == 4  # nothing regenerated, nothing repeated
    prompts = B.load_benchmark("gqa", **kw).prompts()
    # one call for the two missing questions, padded to the batch with a filler copy
    assert generated == [prompts[2]["text"], prompts[3]["text"], prompts[3]["text"]]
    m = json.loads((out / METRICS_FILE).read_text())
    assert m["n_generated_this_run"] == 2 and m["n_answered"] == 4
    assert m["skip"]["prefill_skip_ratio"] > 0  # aggregated over both runs' records
    rows = ResultsTable(tmp_path / "results.json").rows()
    assert [r.n for r in rows] == [2, 4]

    # nothing left: no generate call, same answers, metrics rewritten
    generated.clear()
    assert main(_cli(ckpt, "gqa", kw, out, *common)) == 0
    assert generated == [] and (out / ANSWERS_FILE).read_text().splitlines() == lines


def test_resume_refuses_other_settings_and_dense_mode(ckpt, files, tmp_path, capsys):
    kw = files("gqa")
    out = tmp_path / "run"
    base = ["--batch-size", "3", "--max-new-tokens", "3", "--no-progress", "--limit", "2"]
    assert main(_cli(ckpt, "gqa", kw, out, *base)) == 0
    routed = {a["question_id"]: a["prompt_tokens"] for a in _read_jsonl(out / ANSWERS_FILE)}
    assert main(_cli(ckpt, "gqa", kw, out, *base, "--mode", "dense")) == 2
    assert "other settings" in capsys.readouterr().err

    # --overwrite starts again in dense mode: nothing routed, the dense TFLOPs
    assert main(_cli(ckpt, "gqa", kw, out, *base, "--mode", "dense", "--overwrite")) == 0
    m = json.loads((out / METRICS_FILE).read_text())
    assert m["mode"] == "dense" and m["n_generated_this_run"] == 2
    assert m["skip"]["prefill_skip_ratio"] == 0.0 and m["skip"]["mod_layers"] == []
    assert m["flops"]["tflops"] == pytest.approx(m["flops"]["tflops_dense"])
    # without MoD statistics the prompt length comes from re-rendering the prompt; it equals
    # what the MoD layers counted as entering tokens in the routed run
    dense = {a["question_id"]: a["prompt_tokens"] for a in _read_jsonl(out / ANSWERS_FILE)}
    assert dense == routed
    rows = ResultsTable(tmp_path / "results.json").rows()
    assert [r.ckpt for r in rows] == ["ckpt", "ckpt[dense]"]


def test_help_lists_every_benchmark(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for name in B.BENCHMARKS:
        assert f"\n  {name} " in text


def test_bad_options(ckpt, files, tmp_path, capsys):
    kw = files("gqa")
    assert main(_cli(ckpt, "gqa", kw, tmp_path / "a", "--test-split", "x.jsonl")) == 2
    assert main(_cli(ckpt, "gqa", kw, tmp_path / "b", "--bench-arg", "nope=1")) == 2
    err = capsys.readouterr().err
    assert "vqav2 option" in err and "nope" in err


def test_sqa_accepts_the_scienceqa_data_dir(files):
    """LLaVA's layouts: --annotations may be the ScienceQA dir (problems.json and
    pid_splits.json inside), and --questions may be problems.json (questions from the split)."""
    from gmod_jax.eval.runner import _benchmark_kwargs, build_parser

    kw = files("sqa")
    data_dir = Path(kw["problems_file"]).parent
    reference = [p["text"] for p in B.load_benchmark("sqa", **kw).prompts()]
    for questions in (kw["question_file"], kw["problems_file"]):
        args = build_parser().parse_args(
            ["--ckpt", "c", "--benchmark", "scienceqa", "--out", "o", "--questions", str(questions),
             "--images", str(kw["image_root"]), "--annotations", str(data_dir)])
        bench = B.load_benchmark("sqa", **_benchmark_kwargs("sqa", args))
        assert [p["text"] for p in bench.prompts()] == reference
