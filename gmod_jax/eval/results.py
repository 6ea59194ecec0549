"""Results table, resumable answers files and atomic file writers for evaluation runs.

* :class:`ResultsTable` keeps one JSON file of run rows (benchmark, headline accuracy, skip
  ratio, samples/s, analytic TFLOPs, checkpoint, date) and regenerates a markdown file laid
  out like the paper's tables ("acc / skip" per benchmark, Avg over GQA/SQA/MMMU/TextVQA,
  TFLOPs, Skip, speed).
* :class:`AnswersFile` appends one JSON line per answered question and, on restart, knows
  which question ids are done; a torn last line from a crash is dropped.
* ``write_*_atomic`` write final files through a temporary file + ``os.replace``.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

# ----------------------------------------------------------------------------------------
# atomic writers
# ----------------------------------------------------------------------------------------


def write_text_atomic(path, text: str) -> Path:
    """Write ``text`` to ``path`` so that readers see the old or the new file, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def write_json_atomic(path, obj, indent: int | None = None) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def write_jsonl_atomic(path, records: Iterable[Mapping]) -> Path:
    return write_text_atomic(
        path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


@contextlib.contextmanager
def _locked(path: Path):
    """Exclusive advisory lock on ``<path>.lock`` (several workers appending results)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(str(path) + ".lock", "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


# ----------------------------------------------------------------------------------------
# resumable answers file
# ----------------------------------------------------------------------------------------


class AnswersFile:
    """Append-only JSONL of answers ({"question_id", "text", ...extra} per line).

    ``answers()`` / ``answered_ids()`` read what is there (last record per id wins); opening
    for append first cuts off a torn final line (a crash mid-write), so resumed runs never
    glue two records together. Each append is flushed (and fsynced with ``fsync=True``).
    """

    def __init__(self, path, fsync: bool = False):
        self.path = Path(path)
        self.fsync = fsync
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._repaired = False

    def _repair(self) -> None:
        if self._repaired or not self.path.exists():
            self._repaired = True
            return
        with open(self.path, "rb+") as f:
            data = f.read()
            if data and not data.endswith(b"\n"):
                f.truncate(data.rfind(b"\n") + 1)
        self._repaired = True

    def records(self) -> list[dict]:
        if not self.path.exists():
            return []
        out = []
        with open(self.path, "rb") as f:
            for raw in f:
                if not raw.endswith(b"\n"):
                    break  # torn tail: ignored, removed before the next append
                line = raw.strip()
                if line:
                    out.append(json.loads(line))
        return out

    def answers(self) -> dict[str, str]:
        return {str(r["question_id"]): r["text"] for r in self.records()}

    def answered_ids(self) -> set[str]:
        return set(self.answers())

    def append(self, question_id, text: str, **extra) -> None:
        self.append_many([{"question_id": str(question_id), "text": text, **extra}])

    def append_many(self, records: Iterable[Mapping]) -> None:
        self._repair()
        lines = "".join(json.dumps({**r, "question_id": str(r["question_id"])},
                                   ensure_ascii=False) + "\n" for r in records)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(lines)
            f.flush()
            if self.fsync:
                os.fsync(f.fileno())

    def __len__(self) -> int:
        return len(self.answers())


# ----------------------------------------------------------------------------------------
# results table
# ----------------------------------------------------------------------------------------

# Paper column labels; the first four are the ones the paper averages ("Avg", speed, skip).
PAPER_AVG_BENCHMARKS = ("gqa", "sqa", "mmmu", "textvqa")
COLUMN_ORDER = ("gqa", "sqa", "mmmu", "textvqa", "vqav2", "vizwiz", "pope", "mme", "mmbench",
                "seed")
LABELS = {"gqa": "GQA", "sqa": "SQA", "mmmu": "MMMU", "textvqa": "TextVQA", "vqav2": "VQAv2",
          "vizwiz": "VizWiz", "pope": "POPE", "mme": "MME", "mmbench": "MMB", "seed": "SEED"}


@dataclass
class ResultRow:
    """One evaluation run. ``accuracy`` is the benchmark headline (percent; MME: points),
    ``skip_ratio`` a fraction in [0, 1] of MoD-layer tokens skipped, ``tflops`` the analytic
    prefill TFLOPs (reference §5)."""

    benchmark: str
    accuracy: float
    ckpt: str
    skip_ratio: float | None = None
    samples_per_s: float | None = None
    tflops: float | None = None
    date: str = ""
    metric: str = ""
    n: int | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if not self.date:
            self.date = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")

    @classmethod
    def from_dict(cls, d: Mapping) -> "ResultRow":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)


def _fmt(x, digits=1) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _cell(row: ResultRow | None) -> str:
    if row is None:
        return "–"
    acc = _fmt(row.accuracy)
    return acc if row.skip_ratio is None else f"{acc} / {100 * row.skip_ratio:.1f}%"


def _mean(vals):
    vals = [v for v in vals if v is not None]
    return sum(vals) / len(vals) if vals else None


class ResultsTable:
    """A JSON list of :class:`ResultRow` plus its regenerated markdown view."""

    def __init__(self, json_path, markdown_path=None, title: str = "Evaluation results"):
        self.json_path = Path(json_path)
        self.markdown_path = (Path(markdown_path) if markdown_path is not None
                              else self.json_path.with_suffix(".md"))
        self.title = title

    def rows(self) -> list[ResultRow]:
        if not self.json_path.exists():
            return []
        with open(self.json_path, encoding="utf-8") as f:
            return [ResultRow.from_dict(d) for d in json.load(f)]

    def append(self, row: ResultRow | None = None, **kwargs) -> ResultRow:
        """Add a run (a ResultRow or its fields) and rewrite both files atomically."""
        row = row if row is not None else ResultRow(**kwargs)
        with _locked(self.json_path):
            rows = self.rows() + [row]
            write_json_atomic(self.json_path, [asdict(r) for r in rows], indent=1)
            write_text_atomic(self.markdown_path, self.to_markdown(rows))
        return row

    @staticmethod
    def latest(rows: Iterable[ResultRow]) -> dict[str, dict[str, ResultRow]]:
        """{ckpt: {benchmark: last row}} in order of first appearance."""
        out: dict[str, dict[str, ResultRow]] = {}
        for r in rows:
            out.setdefault(r.ckpt, {})[r.benchmark] = r
        return out

    def to_markdown(self, rows: list[ResultRow] | None = None) -> str:
        rows = self.rows() if rows is None else rows
        latest = self.latest(rows)
        present = {b for per in latest.values() for b in per}
        cols = [b for b in COLUMN_ORDER if b in present]
        cols += sorted(present - set(COLUMN_ORDER))
        core = [b for b in cols if b in PAPER_AVG_BENCHMARKS]
        extra = [b for b in cols if b not in PAPER_AVG_BENCHMARKS]
        lines = [f"# {self.title}", "",
                 f"Generated from `{self.json_path.name}` by gmod_jax.eval.results; do not edit.",
                 "", "## Summary (accuracy / skip ratio, latest run per checkpoint)", ""]
        head = (["ckpt"] + [LABELS.get(b, b) for b in core]
                + ["Avg", "TFLOPs", "Skip", "samples/s"] + [LABELS.get(b, b) for b in extra])
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        partial = False
        for ckpt, per in latest.items():
            core_rows = [per[b] for b in PAPER_AVG_BENCHMARKS if b in per]
            mark = ""
            if core_rows and len(core_rows) < len(PAPER_AVG_BENCHMARKS):
                mark, partial = "*", True
            avg = _mean([r.accuracy for r in core_rows])
            skip = _mean([r.skip_ratio for r in core_rows])
            cells = ([ckpt] + [_cell(per.get(b)) for b in core]
                     + [_fmt(avg) + (mark if avg is not None else ""),
                        _fmt(_mean([r.tflops for r in core_rows])),
                        "–" if skip is None else f"{100 * skip:.1f}%",
                        _fmt(_mean([r.samples_per_s for r in core_rows]))]
                     + [_cell(per.get(b)) for b in extra])
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        lines.append("Avg, TFLOPs, Skip and samples/s are means over GQA, SQA, MMMU and "
                     "TextVQA, as in the paper." + (" `*`: not all four evaluated, mean "
                                                   "over those present." if partial else ""))
        lines += ["", "## All runs", "",
                  "| date | ckpt | benchmark | metric | value | skip | samples/s | TFLOPs | n |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append("| " + " | ".join([
                r.date, r.ckpt, LABELS.get(r.benchmark, r.benchmark), r.metric or "",
                _fmt(r.accuracy, 2),
                "–" if r.skip_ratio is None else f"{100 * r.skip_ratio:.1f}%",
                _fmt(r.samples_per_s, 2), _fmt(r.tflops, 2),
                "–" if r.n is None else str(r.n)]) + " |")
        return "\n".join(lines) + "\n"

    def write_markdown(self) -> Path:
        return write_text_atomic(self.markdown_path, self.to_markdown())


def row_from_score(score, ckpt: str, skip_ratio=None, samples_per_s=None, tflops=None,
                   **extra) -> ResultRow:
    """A :class:`ResultRow` from a :class:`benchmarks.Score`."""
    return ResultRow(benchmark=score.benchmark, accuracy=score.headline, ckpt=ckpt,
                     skip_ratio=skip_ratio, samples_per_s=samples_per_s, tflops=tflops,
                     metric=score.headline_name, n=score.metrics.get("n"), extra=extra)
