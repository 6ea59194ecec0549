"""Benchmark readers, prompts, scoring and submission files on the synthetic file sets."""

import csv
import json
from pathlib import Path

import pytest

from gmod_jax.eval import benchmarks as B
from gmod_jax.eval.results import AnswersFile
from tests.support.eval_files import write_benchmark_files


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    cache = {}

    def get(name, **options):
        key = (name, tuple(sorted(options.items())))
        if key not in cache:
            tag = name + "".join(f"_{k}{v}" for k, v in sorted(options.items()))
            cache[key] = write_benchmark_files(name, root / tag, n=4, **options)
        return cache[key]

    return get


@pytest.mark.parametrize("name", sorted(B.BENCHMARKS))
def test_every_benchmark_reads_prompts_and_scores(files, name):
    bench = B.load_benchmark(name, **files(name))
    prompts = bench.prompts()
    assert prompts
    ids = [p["question_id"] for p in prompts]
    assert len(set(ids)) == len(ids)
    for p in prompts:
        assert set(p) == {"question_id", "image", "text", "max_new_tokens", "benchmark", "meta"}
        assert p["max_new_tokens"] == B.MAX_NEW_TOKENS[name]["gamma_mod"]
        img = B.load_image(p["image"])
        assert img.mode == "RGB" and img.size[0] > 0
        assert "<image>" not in p["text"]
        assert not {"gold", "answer", "gt"} & set(p["meta"])  # no ground truth leaks
    full = bench.score(bench.oracle_answers())
    expected = 2000.0 if name == "mme" else 100.0
    assert full.headline == pytest.approx(expected)
    assert full.metrics["n_missing"] == 0
    empty = bench.score({})
    assert empty.metrics["n_missing"] == len(prompts)
    if name != "mmmu":  # MMMU answers model-free questions at random even then
        assert empty.headline == 0.0


def test_decoding_table_and_override(files):
    kw = files("gqa")
    assert B.GQA(**kw).max_new_tokens == 6
    assert B.GQA(**kw, decoding="llava").max_new_tokens == 128
    assert B.GQA(**kw, max_new_tokens=3).max_new_tokens == 3
    assert B.ScienceQA(**files("sqa")).max_new_tokens == 1
    assert B.MME(**files("mme")).max_new_tokens == 128


def test_limit_and_answer_record_inputs(files):
    bench = B.GQA(**files("gqa"), limit=2)
    assert len(bench) == 2
    oracle = bench.oracle_answers()
    records = [{"question_id": q, "text": t} for q, t in oracle.items()]
    assert bench.score(records).headline == 100.0
    assert bench.score({q: {"text": t} for q, t in oracle.items()}).headline == 100.0


def test_gqa_scoring_and_submission(files, tmp_path):
    bench = B.GQA(**files("gqa"))
    assert all(p["text"].endswith("\n" + B.SHORT_ANSWER_SUFFIX) for p in bench.prompts())
    oracle = bench.oracle_answers()
    styled = {q: a.capitalize() + "." for q, a in oracle.items()}  # "Red." -> "red"
    assert bench.score(styled).headline == 100.0
    first = next(iter(oracle))
    wrong = dict(oracle, **{first: "purple"})
    s = bench.score(wrong)
    assert s.headline == pytest.approx(75.0)
    assert set(s.metrics["per_structural_type"]) == {"query", "verify"}
    out = json.loads(bench.write_submission(styled, tmp_path / "pred.json").read_text())
    assert out[0].keys() == {"questionId", "prediction"}
    assert all(o["prediction"] == oracle[o["questionId"]] for o in out)


def test_sqa_question_file_and_pid_splits_agree(files):
    kw = files("sqa")
    from_llava = B.ScienceQA(problems_file=kw["problems_file"], question_file=kw["question_file"],
                             image_root=kw["image_root"])
    built = B.ScienceQA(problems_file=kw["problems_file"], pid_splits_file=kw["pid_splits_file"],
                        image_root=kw["image_root"])
    assert [p["text"] for p in from_llava.prompts()] == [p["text"] for p in built.prompts()]
    assert len(from_llava) == 3  # image_only drops the text-only question (γ-MoD)
    assert len(B.ScienceQA(**kw, image_only=False)) == 4
    p = from_llava.prompts()[0]
    assert p["text"].startswith("Context: ") and "\nQuestion: " in p["text"]
    assert p["text"].endswith("\n" + B.LETTER_ANSWER_SUFFIX)
    assert Path(p["image"]).name == "image.png"


def test_sqa_parse_failures_count_wrong(files):
    bench = B.ScienceQA(**files("sqa"), image_only=False)
    oracle = bench.oracle_answers()
    answers = {q: f"The answer is {a}." for q, a in oracle.items()}
    assert bench.score(answers).headline == 100.0
    answers[next(iter(answers))] = "I cannot tell"
    s = bench.score(answers)
    assert s.metrics["n_parse_failed"] == 1
    assert s.metrics["accuracy"] == pytest.approx(75.0)
    assert s.metrics["img_accuracy"] == pytest.approx(200 / 3)
    assert s.headline == s.metrics["img_accuracy"]


def test_textvqa_matching_and_unique_ids(files):
    kw = files("textvqa")
    lines = B.read_jsonl(kw["question_file"])
    assert lines[0]["question_id"] == lines[1]["question_id"]  # LLaVA reuses image ids
    bench = B.TextVQA(**kw)
    ids = [p["question_id"] for p in bench.prompts()]
    assert ids == ["34600", "34601", "34602", "34603"]  # annotation question ids
    assert "Reference OCR token:" in bench.prompts()[0]["text"]
    assert B.textvqa_question(lines[0]["text"]) == "what does the sign say?"
    oracle = bench.oracle_answers()
    shouted = {q: "The " + a.upper() + "." for q, a in oracle.items()}
    assert bench.score(shouted).headline == 100.0


def test_pope_metrics_per_category_and_yes_bias(files):
    bench = B.POPE(**files("pope"))
    assert bench.label_matching == {c: "image+question" for c in B.POPE_CATEGORIES}
    all_yes = {p["question_id"]: "Yes" for p in bench.prompts()}
    s = bench.score(all_yes)
    for cat in B.POPE_CATEGORIES:
        m = s.metrics["per_category"][cat]
        assert (m["recall"], m["precision"], m["yes_ratio"]) == (100.0, 50.0, 100.0)
    assert s.headline == pytest.approx(100 * 2 * 0.5 / 1.5)
    assert s.metrics["mean_accuracy"] == pytest.approx(50.0)


def test_pope_falls_back_to_order_pairing(files, tmp_path):
    kw = files("pope")
    ann = tmp_path / "ann"
    ann.mkdir()
    for f in Path(kw["annotation_dir"]).iterdir():
        recs = B.read_jsonl(f)
        for r in recs:
            r["text"] = r["text"].upper()  # key match impossible
        (ann / f.name).write_text("".join(json.dumps(r) + "\n" for r in recs))
    bench = B.POPE(question_file=kw["question_file"], annotation_dir=ann,
                   image_root=kw["image_root"])
    assert set(bench.label_matching.values()) == {"order"}
    assert bench.score(bench.oracle_answers()).headline == 100.0


def test_mme_ids_ground_truth_and_eval_tool_files(files, tmp_path):
    kw = files("mme")
    bench = B.MME(**kw)
    ids = [p["question_id"] for p in bench.prompts()]
    assert ids[0] == "existence/0000.png" and ids[1] == "existence/0000.png#1"
    oracle = bench.oracle_answers()
    s = bench.score(oracle)
    assert s.metrics["perception"] == 2000.0 and s.metrics["cognition"] == 800.0
    assert s.metrics["missing_subtasks"] == []
    # one wrong answer on one image: acc 50, acc+ 0 for that subtask (1 image)
    wrong = dict(oracle, **{"count/0000.png": "No"})
    assert bench.score(wrong).metrics["subtasks"]["count"]["score"] == pytest.approx(50.0)
    out = bench.write_submission(oracle, tmp_path / "Your_Results")
    lines = (out / "artwork.txt").read_text().splitlines()
    assert lines[0].split("\t")[2:] == ["Yes", "Yes"]
    # the eval_tool layout (<subtask>.txt: image, question, answer[, pred]) is also a GT source
    same = B.MME(question_file=kw["question_file"], gt_dir=out, image_root=kw["image_root"])
    assert same.score(oracle).headline == 2000.0


def test_mme_question_file_without_yes_no_instruction(files, tmp_path):
    kw = files("mme")
    lines = B.read_jsonl(kw["question_file"])
    for ln in lines:
        ln["text"] = ln["text"].replace(" Please answer yes or no.", "")
    qf = tmp_path / "llava_mme.jsonl"
    qf.write_text("".join(json.dumps(ln) + "\n" for ln in lines))
    bench = B.MME(question_file=qf, gt_dir=kw["gt_dir"], image_root=kw["image_root"])
    assert bench.score(bench.oracle_answers()).headline == 2000.0


def test_mmbench_rounds_prompt_and_circular_scoring(files, tmp_path):
    bench = B.MMBench(**files("mmbench"))
    assert bench.all_rounds  # TSV without shifted copies: LLaVA --all-rounds
    rows = B.read_mmbench_tsv(files("mmbench")["tsv_file"])
    n_opts = [sum(bool(r[c]) for c in "ABCD") for r in rows]
    assert len(bench) == sum(n_opts)
    p = {q["question_id"]: q for q in bench.prompts()}["1:0"]
    assert p["text"].startswith("The background is gray.\nWhat color is the")
    assert "\nA. " in p["text"] and p["text"].endswith("\n" + B.LETTER_ANSWER_SUFFIX)
    oracle = bench.oracle_answers()
    # the gold letter moves with the rotation
    q0 = [it for it in bench.items if it["meta"]["source_id"] == 0]
    golds = [it["meta"]["choices"][it["meta"]["gold"]] for it in q0]
    assert len(set(golds)) == 1
    assert len({it["meta"]["gold"] for it in q0}) == len(q0)
    # option text instead of the letter is accepted (can_infer_text)
    texts = {it["question_id"]: "It is " + it["meta"]["choices"][it["meta"]["gold"]]
             for it in bench.items}
    assert bench.score(texts).headline == 100.0
    wrong = dict(oracle, **{"2:1": "Z"})  # one shift of question 2 wrong
    s = bench.score(wrong)
    assert s.headline == pytest.approx(75.0)
    assert s.metrics["vanilla_accuracy"] == pytest.approx(100 * (len(bench) - 1) / len(bench))
    sub = bench.write_submission(oracle, tmp_path / "mmbench.tsv")
    with open(sub, newline="") as f:
        got = list(csv.DictReader(f, delimiter="\t"))
    assert "prediction" in got[0] and "image" not in got[0]
    assert [g["prediction"] for g in got] == [oracle[f"{i}:0"] for i in range(4)]


def test_mmbench_tsv_with_circular_copies(files):
    bench = B.MMBench(**files("mmbench", copies=True))
    assert not bench.all_rounds
    assert len(bench) == 14 and len({it["meta"]["group"] for it in bench.items}) == 4
    oracle = bench.oracle_answers()
    assert bench.score(oracle).headline == 100.0
    copy_id = str(2 + B.MMBENCH_COPY_OFFSET)
    assert bench.score(dict(oracle, **{copy_id: "Z"})).headline == pytest.approx(75.0)


def test_mmmu_prompts_fallbacks_and_open(files, tmp_path):
    bench = B.MMMU(**files("mmmu"))
    prompts = {p["question_id"]: p for p in bench.prompts()}
    assert len(bench) == 5 and len(prompts) == 4  # option-image question not generated
    mc = prompts["validation_Art_1"]
    assert "\n(A) " in mc["text"] and mc["text"].endswith("\n\n" + B.LETTER_ANSWER_SUFFIX)
    op = prompts["validation_Physics_3"]
    assert op["text"].endswith("\n" + B.SHORT_ANSWER_SUFFIX)
    oracle = bench.oracle_answers()
    styled = dict(oracle)
    styled["validation_Art_1"] = f"({oracle['validation_Art_1']})"
    styled["validation_Physics_3"] = f"The answer is {oracle['validation_Physics_3']}.0"
    s1, s2 = bench.score(styled), bench.score(styled)
    assert s1 == s2  # seeded fallbacks: deterministic
    assert s1.metrics["n_no_generation"] == 1
    assert s1.metrics["per_subject"]["Physics"]["acc"] == 100.0
    sub = json.loads(bench.write_submission(styled, tmp_path / "mmmu.json").read_text())
    assert sub["validation_Art_1"] == oracle["validation_Art_1"]
    assert sub["validation_Design_5"] in "ABC"


def test_seed_image_only_and_parse_modes(files):
    kw = files("seed")
    bench = B.SEEDBench(**kw)
    assert len(bench) == 4  # the video question is dropped
    assert len(B.SEEDBench(**kw, image_only=False)) == 5
    oracle = bench.oracle_answers()
    dotted = {q: a + "." for q, a in oracle.items()}
    assert bench.score(dotted).headline == 0.0  # official: exact string match
    assert B.SEEDBench(**kw, parse="letter").score(dotted).headline == 100.0


def test_vqav2_submission_covers_test_split(files, tmp_path):
    kw = files("vqav2")
    bench = B.VQAv2(**kw)
    answers = {p["question_id"]: "Two" for p in bench.prompts()}
    sub = json.loads(bench.write_submission(answers, tmp_path / "up.json").read_text())
    assert len(sub) == 6 and all(isinstance(s["question_id"], int) for s in sub)
    assert [s["answer"] for s in sub] == ["2"] * 4 + ["", ""]
    no_gt = B.VQAv2(question_file=kw["question_file"], image_root=kw["image_root"])
    assert not no_gt.has_ground_truth
    with pytest.raises(B.NoGroundTruthError):
        no_gt.score(answers)
    s = bench.score(bench.oracle_answers())
    assert set(s.metrics["per_answer_type"]) == {"number", "other"}


def test_vizwiz_submission(files, tmp_path):
    bench = B.VizWiz(**files("vizwiz"))
    answers = {p["question_id"]: "Unanswerable." for p in bench.prompts()}
    sub = json.loads(bench.write_submission(answers, tmp_path / "vw.json").read_text())
    assert sub[0] == {"image": "VizWiz_test_00000000.jpg", "answer": "unanswerable"}
    assert bench.score(answers).headline == pytest.approx(25.0)
    with pytest.raises(KeyError):
        bench.write_submission({}, tmp_path / "vw2.json")


def test_llava_answers_jsonl_uses_source_ids(files, tmp_path):
    bench = B.TextVQA(**files("textvqa"))
    path = bench.write_answers_jsonl(bench.oracle_answers(), tmp_path / "a.jsonl", "m")
    recs = B.read_jsonl(path)
    assert recs[0]["question_id"] == B.read_jsonl(files("textvqa")["question_file"])[0][
        "question_id"]
    assert {"prompt", "text", "model_id"} <= recs[0].keys()


def test_run_benchmark_resumes_from_answers_file(files, tmp_path):
    bench = B.POPE(**files("pope"))
    oracle = bench.oracle_answers()
    calls = []

    def flaky(prompts):
        calls.append([p["question_id"] for p in prompts])
        if len(calls) == 2:
            raise RuntimeError("preempted")
        return [oracle[p["question_id"]] for p in prompts]

    af = tmp_path / "answers.jsonl"
    with pytest.raises(RuntimeError):
        B.run_benchmark(bench, flaky, answers_file=af, batch_size=5)
    assert len(AnswersFile(af).answered_ids()) == 5
    calls.clear()

    def good(prompts):
        calls.append([p["question_id"] for p in prompts])
        return [oracle[p["question_id"]] for p in prompts]

    out = B.run_benchmark(bench, good, answers_file=af, batch_size=5)
    assert sum(len(c) for c in calls) == len(bench) - 5
    assert out.n_generated == len(bench) - 5
    assert out.answers == oracle
    assert bench.score(AnswersFile(af).answers()).headline == 100.0
    assert B.run_benchmark(bench, good, answers_file=af).n_generated == 0


def test_run_benchmark_checks_output_count(files):
    bench = B.GQA(**files("gqa"))
    with pytest.raises(ValueError):
        B.run_benchmark(bench, lambda ps: ["x"], batch_size=2)


def test_unknown_benchmark_name():
    with pytest.raises(KeyError):
        B.load_benchmark("nope")
    assert B.load_benchmark.__name__ and B.ALIASES["scienceqa"] == "sqa"
