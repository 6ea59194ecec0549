"""Results table, resumable answers file and atomic writers (gmod_jax.eval.results)."""

import json
import os

import pytest

from gmod_jax.eval import results as R
from gmod_jax.eval.benchmarks import Score


def test_answers_file_append_resume_and_torn_tail(tmp_path):
    path = tmp_path / "sub" / "answers.jsonl"
    af = R.AnswersFile(path)
    assert af.answers() == {} and len(af) == 0
    af.append(1, "yes", benchmark="pope")
    af.append_many([{"question_id": "2", "text": "no"}, {"question_id": "3", "text": "A"}])
    # a crash in the middle of a write leaves a partial line
    with open(path, "a") as f:
        f.write('{"question_id": "4", "te')
    resumed = R.AnswersFile(path)
    assert resumed.answers() == {"1": "yes", "2": "no", "3": "A"}
    assert resumed.records()[0]["benchmark"] == "pope"
    resumed.append("4", "B")
    assert resumed.answers() == {"1": "yes", "2": "no", "3": "A", "4": "B"}
    assert path.read_text().count("\n") == 4
    resumed.append("1", "no")  # a re-answer: last record wins
    assert R.AnswersFile(path).answers()["1"] == "no"


def test_atomic_writers(tmp_path):
    p = R.write_json_atomic(tmp_path / "a" / "x.json", [{"question_id": 1, "answer": "2"}])
    assert json.loads(p.read_text()) == [{"question_id": 1, "answer": "2"}]
    q = R.write_jsonl_atomic(tmp_path / "x.jsonl", [{"a": 1}, {"a": 2}])
    assert q.read_text() == '{"a": 1}\n{"a": 2}\n'
    assert sorted(os.listdir(tmp_path)) == ["a", "x.jsonl"]  # no temp files left


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    p = R.write_text_atomic(tmp_path / "f.txt", "old")

    def boom(*a, **k):
        raise OSError("disk gone")

    monkeypatch.setattr(R.os, "replace", boom)
    with pytest.raises(OSError):
        R.write_text_atomic(p, "new")
    assert p.read_text() == "old"
    assert os.listdir(tmp_path) == ["f.txt"]


def test_results_table_paper_layout(tmp_path):
    table = R.ResultsTable(tmp_path / "results.json")
    paper = {"gqa": (63.7, 0.407), "sqa": (68.5, 0.359), "mmmu": (35.6, 0.368),
             "textvqa": (65.3, 0.382)}
    for b, (acc, skip) in paper.items():
        table.append(benchmark=b, accuracy=acc, skip_ratio=skip, samples_per_s=6.0,
                     tflops=12.6, ckpt="gmod-0.3", metric="accuracy")
    table.append(R.ResultRow(benchmark="gqa", accuracy=64.2, ckpt="dense", skip_ratio=0.0,
                             tflops=19.2, date="2025-01-01T00:00:00+00:00"))
    table.append(benchmark="mme", accuracy=1516.0, ckpt="gmod-0.3", skip_ratio=0.57)
    rows = table.rows()
    assert len(rows) == 6 and rows[4].date.startswith("2025")
    md = (tmp_path / "results.md").read_text()
    assert md == table.to_markdown()
    lines = md.splitlines()
    header = next(l for l in lines if l.startswith("| ckpt"))
    assert header.split(" | ")[1:5] == ["GQA", "SQA", "MMMU", "TextVQA"]
    assert header.rstrip(" |").endswith("MME")
    gm = next(l for l in lines if l.startswith("| gmod-0.3"))
    cells = [c.strip() for c in gm.strip("|").split("|")]
    assert cells[1:5] == ["63.7 / 40.7%", "68.5 / 35.9%", "35.6 / 36.8%", "65.3 / 38.2%"]
    assert cells[5] == "58.3"          # Avg of the four, as the paper's 58.3
    assert cells[6] == "12.6"          # TFLOPs
    assert cells[7] == "37.9%"         # mean skip, the paper's 37.9%
    assert cells[-1] == "1516.0 / 57.0%"
    dense = next(l for l in lines if l.startswith("| dense"))
    assert "64.2*" in dense and "not all four" in md
    # the latest run of a (ckpt, benchmark) wins in the summary; all runs are listed below
    table.append(benchmark="gqa", accuracy=64.0, ckpt="dense", skip_ratio=0.0)
    md2 = table.to_markdown()
    assert "| dense | 64.0 / 0.0%" in md2 and md2.count("| dense |") == 3


def test_row_from_score():
    s = Score("pope", 86.0, "mean_f1", {"n": 10})
    row = R.row_from_score(s, "ck", skip_ratio=0.3, samples_per_s=7.2, tflops=9.3)
    assert (row.benchmark, row.accuracy, row.metric, row.n) == ("pope", 86.0, "mean_f1", 10)
    assert R.ResultRow.from_dict({**row.__dict__, "unknown": 1}) == row
