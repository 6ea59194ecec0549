"""Benchmark readers, prompt builders and scorers for the evaluation files LLaVA uses.

A benchmark object reads the official files, yields prompt dicts for a model and scores raw
generated strings with the benchmark's official rules (:mod:`gmod_jax.eval.metrics`). It
never touches a model: the model side supplies ``generate_fn(prompts) -> list[str]``.

Prompt dict (what ``generate_fn`` receives)::

    {"question_id": str,          # unique within the benchmark; key of the answers map
     "image": str | bytes | None, # image file path, encoded image bytes (MMBench) or None
     "text": str,                 # user-turn text incl. the official answer-format suffix,
                                  # without "<image>" and without the chat template: the
                                  # model side prepends "<image>\\n" (as LLaVA does) when
                                  # image is not None, then applies its conversation template
     "max_new_tokens": int,
     "benchmark": str,
     "meta": dict}                # benchmark-specific extras (source id, category, round)

Decoding lengths: ``MAX_NEW_TOKENS[name]`` records γ-MoD's evaluation code and LLaVA-1.5's;
benchmarks default to γ-MoD's (``decoding="gamma_mod"``).

Scoring follows each benchmark's official scorer at the revision
:data:`metrics.OFFICIAL_SCORERS` names; the headline equals that script's number on the
files written here (tests/test_eval_official.py). Unanswered questions are scored as wrong
everywhere (a partial run cannot inflate a score); to score a subset, build the benchmark
with ``limit=``. Every score reports ``n_missing``. The official scripts instead refuse
such a file, skip the question or pair labels by position (identical once every question
is answered); this and the other deliberate deviations are listed in
:data:`metrics.DELIBERATE_DEVIATIONS`.
"""

from __future__ import annotations

import ast
import base64
import csv
import io
import json
import math
import os
import re
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping, Sequence

from gmod_jax.eval import metrics as M

SHORT_ANSWER_SUFFIX = "Answer the question using a single word or phrase."
LETTER_ANSWER_SUFFIX = "Answer with the option's letter from the given choices directly."
LETTER_ANSWER_SUFFIX_CN = "请直接回答选项字母。"

# max_new_tokens per benchmark. "gamma_mod": γ-MoD's eval code (Yaxin9Luo/Gamma-MOD,
# gamma_mod/eval/* and llava_hr/eval/*): model_vqa_loader.py hard-codes 6 (GQA, TextVQA and,
# inferred, every benchmark LLaVA runs through that loader: VQAv2, VizWiz, POPE, SEED),
# model_vqa_science.py 1, model_vqa_loader_mme.py 128, model_vqa_mmbench.py 1024 and
# model_mmmu.py 10 in the stored code (the reference notes say 1; see README of eval).
# "llava": haotian-liu/LLaVA v1.5 (model_vqa_loader --max_new_tokens default 128,
# model_vqa_science / model_vqa_mmbench 1024); MMMU is not in LLaVA, MMMU's own LLaVA
# engine uses 128.
MAX_NEW_TOKENS: dict[str, dict[str, int]] = {
    "gqa": {"gamma_mod": 6, "llava": 128},
    "textvqa": {"gamma_mod": 6, "llava": 128},
    "vqav2": {"gamma_mod": 6, "llava": 128},
    "vizwiz": {"gamma_mod": 6, "llava": 128},
    "pope": {"gamma_mod": 6, "llava": 128},
    "seed": {"gamma_mod": 6, "llava": 128},
    "sqa": {"gamma_mod": 1, "llava": 1024},
    "mmmu": {"gamma_mod": 10, "llava": 128},
    "mme": {"gamma_mod": 128, "llava": 128},
    "mmbench": {"gamma_mod": 1024, "llava": 1024},
}

_csv_limit = sys.maxsize
while True:  # base64 images in MMBench TSVs exceed csv's default 128 KiB field limit
    try:
        csv.field_size_limit(_csv_limit)
        break
    except OverflowError:
        _csv_limit //= 10


class NoGroundTruthError(ValueError):
    """Raised by ``score`` when the benchmark was loaded without answers (test splits)."""


@dataclass(frozen=True)
class Score:
    """A benchmark score: ``headline`` is the paper's number (percent; MME: points)."""

    benchmark: str
    headline: float
    headline_name: str
    metrics: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"benchmark": self.benchmark, "headline": self.headline,
                "headline_name": self.headline_name, "metrics": self.metrics}


# ----------------------------------------------------------------------------------------
# file helpers
# ----------------------------------------------------------------------------------------

def read_jsonl(path) -> list[dict]:
    """One JSON object per non-empty line."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def load_image(image):
    """Open a prompt's ``image`` (path, bytes or PIL image) as an RGB PIL image."""
    from PIL import Image

    if image is None:
        return None
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, (bytes, bytearray)):
        return Image.open(io.BytesIO(image)).convert("RGB")
    return Image.open(image).convert("RGB")


def _is_none(value) -> bool:
    # LLaVA model_vqa_mmbench.is_none (pandas NaN arrives here as an empty TSV field)
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    if isinstance(value, str) and value.strip().lower() in ("", "nan", "none"):
        return True
    return False


def _unique_keys(raw_ids: Sequence) -> list[str]:
    """String keys for possibly repeated source ids (LLaVA's MME and TextVQA question files
    reuse an id for every question of an image): later repeats get "#1", "#2", ..."""
    seen: dict[str, int] = {}
    out = []
    for rid in raw_ids:
        key = str(rid)
        k = seen.get(key, 0)
        seen[key] = k + 1
        out.append(key if k == 0 else f"{key}#{k}")
    return out


def _answer_map(answers) -> dict[str, str]:
    """Accept {qid: text}, {qid: {"text": ...}} or a list of {"question_id", "text"} dicts."""
    if isinstance(answers, Mapping):
        items = answers.items()
    else:
        items = ((a["question_id"], a) for a in answers)
    out = {}
    for k, v in items:
        if isinstance(v, Mapping):
            v = v.get("text", v.get("answer", ""))
        out[str(k)] = "" if v is None else str(v)
    return out


def _resolve(root, rel: str | None) -> str | None:
    if rel is None:
        return None
    return str(Path(root) / rel) if root is not None else str(rel)


# ----------------------------------------------------------------------------------------
# base class
# ----------------------------------------------------------------------------------------

class Benchmark:
    """Common machinery; subclasses fill ``self.items`` (list of dicts with at least
    ``question_id``, ``image``, ``text``) and implement ``_score``."""

    name: ClassVar[str] = ""
    headline_name: ClassVar[str] = "accuracy"
    # ground truth kept in item meta for scoring, never handed to generate_fn
    _PRIVATE_META: ClassVar[frozenset] = frozenset({"gold", "answer", "gt"})

    def __init__(self, *, limit: int | None = None, max_new_tokens: int | None = None,
                 decoding: str = "gamma_mod"):
        self.limit = limit
        self.max_new_tokens = (max_new_tokens if max_new_tokens is not None
                               else MAX_NEW_TOKENS[self.name][decoding])
        self.items: list[dict] = []

    # -- prompts ------------------------------------------------------------------------
    def _finish(self, items: list[dict]) -> None:
        if self.limit is not None:
            items = items[: self.limit]
        keys = [it["question_id"] for it in items]
        if len(set(keys)) != len(keys):
            raise ValueError(f"{self.name}: question ids are not unique")
        self.items = items
        self._by_id = {it["question_id"]: it for it in items}

    def prompts(self) -> list[dict]:
        """Prompt dicts for the questions that need the model (see module docstring)."""
        out = []
        for it in self.items:
            if it.get("no_generation"):
                continue
            out.append({"question_id": it["question_id"], "image": it["image"],
                        "text": it["text"], "max_new_tokens": self.max_new_tokens,
                        "benchmark": self.name,
                        "meta": {k: v for k, v in it.get("meta", {}).items()
                                 if k not in self._PRIVATE_META}})
        return out

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        return iter(self.prompts())

    @property
    def has_ground_truth(self) -> bool:
        return True

    # -- scoring ------------------------------------------------------------------------
    def score(self, answers) -> Score:
        """Score raw generated texts. ``answers``: {question_id: text} (or answer records)."""
        if not self.has_ground_truth:
            raise NoGroundTruthError(f"{self.name}: loaded without ground-truth answers; "
                                     "use write_submission() and the official server")
        amap = _answer_map(answers)
        need = [it["question_id"] for it in self.items if not it.get("no_generation")]
        headline, metrics = self._score(amap)
        metrics = {"n": len(self.items), "n_missing": sum(q not in amap for q in need),
                   **metrics}
        return Score(self.name, headline, self.headline_name, metrics)

    def _score(self, answers: dict[str, str]) -> tuple[float, dict]:
        raise NotImplementedError

    def oracle_answers(self) -> dict[str, str]:
        """Answers that score 100% (tests and pipeline checks)."""
        raise NotImplementedError

    # -- files --------------------------------------------------------------------------
    def write_answers_jsonl(self, answers, path, model_id: str = "") -> Path:
        """LLaVA's answers-file format ({question_id, prompt, text, answer_id, model_id,
        metadata} per line, original question ids), for the official scripts."""
        from gmod_jax.eval.results import write_jsonl_atomic

        amap = _answer_map(answers)
        recs = []
        for it in self.items:
            if it["question_id"] not in amap:
                continue
            rec = {"question_id": it.get("meta", {}).get("source_id", it["question_id"]),
                   "prompt": it.get("llava_prompt", it["text"]),
                   "text": amap[it["question_id"]], "answer_id": it["question_id"],
                   "model_id": model_id, "metadata": {}}
            rec.update(it.get("answer_record_extra", {}))
            recs.append(rec)
        return write_jsonl_atomic(path, recs)

    def write_submission(self, answers, path) -> Path:
        """The benchmark's submission / official-evaluator input file (default: LLaVA
        answers JSONL)."""
        return self.write_answers_jsonl(answers, path)


def _pct(x: float) -> float:
    return 100.0 * x


# ----------------------------------------------------------------------------------------
# GQA
# ----------------------------------------------------------------------------------------

class GQA(Benchmark):
    """GQA testdev-balanced. Files: ``llava_gqa_testdev_balanced.jsonl`` ({question_id, image,
    text, ...}; text already ends with the short-answer suffix), optional
    ``testdev_balanced_questions.json`` ({qid: {answer, types, semantic, ...}}), image dir."""

    name = "gqa"

    def __init__(self, question_file, annotation_file=None, image_root=None, **kw):
        super().__init__(**kw)
        root = image_root if image_root is not None else Path(question_file).parent
        self.annotations = read_json(annotation_file) if annotation_file else None
        items = []
        for line in read_jsonl(question_file):
            qid = str(line["question_id"])
            if self.annotations is not None and qid not in self.annotations:
                raise KeyError(f"GQA: question {qid} not in {annotation_file}")
            items.append({"question_id": qid, "image": _resolve(root, line["image"]),
                          "text": line["text"], "meta": {"source_id": line["question_id"]}})
        self._finish(items)

    @property
    def has_ground_truth(self) -> bool:
        return self.annotations is not None

    def _score(self, answers):
        right = []
        per_struct: dict[str, list[bool]] = defaultdict(list)
        per_sem: dict[str, list[bool]] = defaultdict(list)
        for it in self.items:
            q = self.annotations[it["question_id"]]
            if not q.get("isBalanced", True):
                continue  # GQA's eval.py scores the balanced questions only
            pred = answers.get(it["question_id"])
            ok = pred is not None and M.gqa_correct(pred, q["answer"])
            right.append(ok)
            types = q.get("types") or {}
            if types.get("structural"):
                per_struct[types["structural"]].append(ok)
            if types.get("semantic"):
                per_sem[types["semantic"]].append(ok)
        acc = sum(right) / len(right) if right else 0.0
        mean = lambda v: _pct(sum(v) / len(v))  # noqa: E731
        return _pct(acc), {
            "accuracy": _pct(acc),
            "per_structural_type": {k: mean(v) for k, v in sorted(per_struct.items())},
            "per_semantic_type": {k: mean(v) for k, v in sorted(per_sem.items())}}

    def oracle_answers(self):
        return {it["question_id"]: self.annotations[it["question_id"]]["answer"]
                for it in self.items}

    def write_submission(self, answers, path):
        """``testdev_balanced_predictions.json`` for GQA's eval.py ([{questionId,
        prediction}], prediction = text.rstrip('.').lower() as LLaVA's converter)."""
        from gmod_jax.eval.results import write_json_atomic

        amap = _answer_map(answers)
        return write_json_atomic(path, [
            {"questionId": it["meta"]["source_id"],
             "prediction": M.gqa_normalize(amap[it["question_id"]])}
            for it in self.items if it["question_id"] in amap])


# ----------------------------------------------------------------------------------------
# ScienceQA
# ----------------------------------------------------------------------------------------

def sqa_cqm_prompt(problem: Mapping) -> str:
    """LLaVA's "CQM-A" human turn (scripts/convert_sqa_to_llava*.py), without "<image>"."""
    context = " ".join([problem.get("hint") or "", ""]).strip() or "N/A"
    choices = " ".join(f"({M.SQA_OPTIONS[i]}) {c}" for i, c in enumerate(problem["choices"]))
    text = f"Context: {context}\nQuestion: {problem['question']}\nOptions: {choices}\n"
    return text.replace("  ", " ").strip()


class ScienceQA(Benchmark):
    """ScienceQA-IMG. Files: ``problems.json`` (answers, choices) and either LLaVA's
    ``llava_test_CQM-A.json`` (question_file) or ``pid_splits.json`` (prompts are then built
    with LLaVA's CQM-A rule); images at ``<image_root>/<pid>/image.png``.

    ``image_only=True`` (γ-MoD's model_vqa_science.py skips text-only questions) — the
    headline is the IMG accuracy either way. ``parse_rule``: ``"llava_hr"`` (default, the
    code base γ-MoD forked) or ``"llava"``; see :func:`metrics.sqa_parse_letter`.
    """

    name = "sqa"
    headline_name = "img_accuracy"

    def __init__(self, problems_file, question_file=None, pid_splits_file=None,
                 split="test", image_root=None, image_only=True, parse_rule="llava_hr", **kw):
        super().__init__(**kw)
        self.problems = read_json(problems_file)
        self.parse_rule = parse_rule
        base = Path(question_file if question_file else problems_file).parent
        root = image_root if image_root is not None else base
        items = []
        if question_file is not None:
            for line in read_json(question_file):
                pid = str(line["id"])
                text = line["conversations"][0]["value"].replace("<image>", "").strip()
                img = line.get("image")
                items.append(self._item(pid, text, _resolve(root, img) if img else None))
        else:
            if pid_splits_file is None:
                raise ValueError("ScienceQA needs question_file or pid_splits_file")
            for pid in read_json(pid_splits_file)[split]:
                prob = self.problems[pid]
                img = os.path.join(pid, prob["image"]) if prob.get("image") else None
                items.append(self._item(str(pid), sqa_cqm_prompt(prob),
                                        _resolve(root, img) if img else None))
        if image_only:
            items = [it for it in items if it["image"] is not None]
        self._finish(items)

    @staticmethod
    def _item(pid, text, image):
        text = text + "\n" + LETTER_ANSWER_SUFFIX
        prompt = ("<image>\n" + text) if image is not None else text
        return {"question_id": pid, "image": image, "text": text, "llava_prompt": prompt,
                "meta": {"source_id": pid}}

    def _score(self, answers):
        # Deliberate deviation: an unanswered image question stays in the IMG denominator.
        # eval_science_qa.py gives it the prompt "Unknown", which has no "<image>", so it
        # drops out of the IMG count there (metrics.DELIBERATE_DEVIATIONS).
        right, img_right, failed = [], [], 0
        for it in self.items:
            prob = self.problems[it["question_id"]]
            text = answers.get(it["question_id"], "FAILED")
            idx = M.sqa_pred_index(text, len(prob["choices"]), self.parse_rule)
            failed += idx == -1
            ok = idx == prob["answer"]
            right.append(ok)
            if it["image"] is not None:
                img_right.append(ok)
        acc = _pct(sum(right) / len(right)) if right else 0.0
        img = _pct(sum(img_right) / len(img_right)) if img_right else 0.0
        return img, {"accuracy": acc, "img_accuracy": img, "n_img": len(img_right),
                     "n_parse_failed": failed, "parse_rule": self.parse_rule}

    def oracle_answers(self):
        return {it["question_id"]: M.SQA_OPTIONS[self.problems[it["question_id"]]["answer"]]
                for it in self.items}


# ----------------------------------------------------------------------------------------
# TextVQA
# ----------------------------------------------------------------------------------------

def textvqa_question(prompt: str) -> str:
    """LLaVA eval_textvqa ``prompt_processor``: the question line of a prompt, lowercased."""
    if prompt.startswith("OCR tokens: "):
        m = re.search(r"Question: (.*?) Short answer:", prompt, re.DOTALL)
        if m:
            return m.group(1).lower()
    lines = prompt.split("\n")
    if "Reference OCR token: " in prompt and len(lines) == 3:
        return (lines[1] if prompt.startswith("Reference OCR token:") else lines[0]).lower()
    return lines[0].lower()


class TextVQA(Benchmark):
    """TextVQA val. Files: ``llava_textvqa_val_v051_ocr.jsonl`` ({question_id, image, text}
    with "Reference OCR token: ..." and the short-answer suffix in text) and
    ``TextVQA_0.5.1_val.json`` ({"data": [{question_id, image_id, question, answers[10]}]}).

    Questions are matched to annotations as eval_textvqa.py does, by (question-file
    question_id == annotation image_id, lowercased question), falling back to equal
    question ids; matched items are keyed by the annotation's unique question_id.
    Scoring: m4c TextVQAAccuracyEvaluator (EvalAI normalisation, leave-one-out 3-of-10)."""

    name = "textvqa"

    def __init__(self, question_file, annotation_file=None, image_root=None, **kw):
        super().__init__(**kw)
        root = image_root if image_root is not None else Path(question_file).parent
        lines = read_jsonl(question_file)
        self.gt: dict[str, list[str]] = {}
        by_img_q, by_qid = {}, {}
        if annotation_file is not None:
            for a in read_json(annotation_file)["data"]:
                by_img_q[(str(a["image_id"]), a["question"].lower())] = a
                by_qid[str(a["question_id"])] = a
        keys = _unique_keys([ln["question_id"] for ln in lines])
        items = []
        for key, ln in zip(keys, lines):
            ann = by_img_q.get((str(ln["question_id"]), textvqa_question(ln["text"])))
            if ann is None:
                ann = by_qid.get(str(ln["question_id"]))
            if ann is not None:
                key = str(ann["question_id"])
                self.gt[key] = list(ann["answers"])
            elif annotation_file is not None:
                raise KeyError(f"TextVQA: no annotation for question {ln['question_id']!r}")
            items.append({"question_id": key, "image": _resolve(root, ln["image"]),
                          "text": ln["text"], "meta": {"source_id": ln["question_id"]}})
        self._finish(items)

    @property
    def has_ground_truth(self) -> bool:
        return bool(self.gt)

    def _score(self, answers):
        scores = [M.vqa_score_textvqa(answers[it["question_id"]], self.gt[it["question_id"]])
                  if it["question_id"] in answers else 0.0 for it in self.items]
        acc = _pct(sum(scores) / len(scores)) if scores else 0.0
        return acc, {"accuracy": acc}

    def oracle_answers(self):
        out = {}
        for it in self.items:
            gts = self.gt[it["question_id"]]
            out[it["question_id"]] = max(gts, key=lambda a: M.vqa_score_textvqa(a, gts))
        return out


# ----------------------------------------------------------------------------------------
# VQAv2 / VizWiz (submission benchmarks)
# ----------------------------------------------------------------------------------------

class _VQAScored(Benchmark):
    """Local VQA-accuracy scoring shared by VQAv2 and VizWiz: the reply goes through the EvalAI
    processor first (what LLaVA's submission converters upload), then the benchmark's
    official server rule (``vqa_rule``, a key of :data:`metrics.VQA_RULES`) compares it with
    the ten human answers; per answer type as well."""

    gt: dict
    vqa_rule: str = "vqa"

    @property
    def has_ground_truth(self) -> bool:
        return bool(self.gt)

    def _gt_record(self, it) -> dict:
        raise NotImplementedError

    def _gt_answers(self, it) -> list:
        return list(self._gt_record(it)["answers"])

    def _question_score(self, text: str, it) -> float:
        return M.VQA_RULES[self.vqa_rule](M.normalize_answer(text), self._gt_answers(it))

    def _score(self, answers):
        per_type: dict[str, list[float]] = defaultdict(list)
        scores = []
        for it in self.items:
            qid = it["question_id"]
            s = self._question_score(answers[qid], it) if qid in answers else 0.0
            scores.append(s)
            per_type[self._gt_record(it).get("answer_type", "all")].append(s)
        acc = _pct(sum(scores) / len(scores)) if scores else 0.0
        return acc, {"accuracy": acc, "vqa_rule": self.vqa_rule, "per_answer_type": {
            k: _pct(sum(v) / len(v)) for k, v in sorted(per_type.items())}}

    def oracle_answers(self):
        out = {}
        for it in self.items:
            texts = [str(a["answer"]) for a in self._gt_record(it)["answers"]]
            out[it["question_id"]] = max(texts, key=lambda a: self._question_score(a, it))
        return out


class VQAv2(_VQAScored):
    """VQAv2. Files: ``llava_vqav2_mscoco_test-dev2015.jsonl`` (questions), optional
    ``llava_vqav2_mscoco_test2015.jsonl`` (the full test split the submission must cover;
    unanswered ids get ""), optional VQA-format annotations (``{"annotations": [{question_id,
    answers: [{answer}], answer_type, question_type}]}``) for local scoring.

    Submission: [{question_id, answer}] with the EvalAI processor applied (LLaVA
    convert_vqav2_for_submission.py). Local score: the VQAv2 server's vqaEval.py
    (GT-Vision-Lab/VQA a013f00, 2021; :func:`metrics.vqa_score_official`) on the processed
    answer, the human answers compared as whole records as officially."""

    name = "vqav2"

    def __init__(self, question_file, image_root=None, test_split_file=None,
                 annotation_file=None, **kw):
        super().__init__(**kw)
        root = image_root if image_root is not None else Path(question_file).parent
        self.test_split_file = test_split_file
        self.gt = {}
        if annotation_file is not None:
            for a in read_json(annotation_file)["annotations"]:
                self.gt[str(a["question_id"])] = a
        items = []
        for ln in read_jsonl(question_file):
            items.append({"question_id": str(ln["question_id"]),
                          "image": _resolve(root, ln["image"]), "text": ln["text"],
                          "meta": {"source_id": ln["question_id"]}})
        self._finish(items)

    def _gt_record(self, it) -> dict:
        return self.gt[it["question_id"]]

    def write_submission(self, answers, path):
        from gmod_jax.eval.results import write_json_atomic

        amap = _answer_map(answers)
        by_src = {str(it["meta"]["source_id"]): it["question_id"] for it in self.items}
        split = (read_jsonl(self.test_split_file) if self.test_split_file
                 else [{"question_id": it["meta"]["source_id"]} for it in self.items])
        out = []
        for ln in split:
            key = by_src.get(str(ln["question_id"]))
            text = amap.get(key) if key is not None else None
            out.append({"question_id": ln["question_id"],
                        "answer": M.normalize_answer(text) if text is not None else ""})
        return write_json_atomic(path, out)


class VizWiz(_VQAScored):
    """VizWiz-VQA. Files: LLaVA ``llava_test.jsonl`` ({question_id, image, text}, text ends
    with the "Unanswerable" instruction and the short-answer suffix), optional VizWiz
    annotation JSON (list of {image, question, answers: [{answer, answer_confidence}],
    answer_type}) for local scoring.

    Submission: [{image, answer}] with the EvalAI processor (convert_vizwiz_for_submission.py).
    Local score, matched by image file name: ``vqa_rule="vqa"`` (default) the current official
    VQA evaluation, GT-Vision-Lab's 2021 vqaEval.py rule (human answers normalised too when
    the annotators disagree), each human answer a voter of its own (VizWiz records carry no
    answer_id); ``"vizwiz"`` the VizWiz-VQA API's vqaEval.py (:func:`metrics.vqa_score_vizwiz`:
    human answers used as stored, unversioned copies)."""

    name = "vizwiz"

    def __init__(self, question_file, image_root=None, annotation_file=None,
                 vqa_rule: str = "vqa", **kw):
        super().__init__(**kw)
        if vqa_rule not in ("vizwiz", "vqa"):
            raise ValueError(f"VizWiz: vqa_rule must be 'vizwiz' or 'vqa', got {vqa_rule!r}")
        self.vqa_rule = vqa_rule
        root = image_root if image_root is not None else Path(question_file).parent
        self.gt = {}
        if annotation_file is not None:
            for a in read_json(annotation_file):
                self.gt[a["image"]] = a
        items = []
        for ln in read_jsonl(question_file):
            items.append({"question_id": str(ln["question_id"]),
                          "image": _resolve(root, ln["image"]), "text": ln["text"],
                          "meta": {"source_id": ln["question_id"], "image_name": ln["image"]}})
        self._finish(items)

    def _gt_record(self, it) -> dict:
        return self.gt[it["meta"]["image_name"]]

    def _gt_answers(self, it) -> list:
        return [str(a["answer"]) for a in self._gt_record(it)["answers"]]

    def write_submission(self, answers, path):
        from gmod_jax.eval.results import write_json_atomic

        amap = _answer_map(answers)
        missing = [it["question_id"] for it in self.items if it["question_id"] not in amap]
        if missing:  # the official converter asserts every question is answered
            raise KeyError(f"VizWiz submission needs every answer; missing {missing[:5]}")
        return write_json_atomic(path, [
            {"image": it["meta"]["image_name"],
             "answer": M.normalize_answer(amap[it["question_id"]])} for it in self.items])


# ----------------------------------------------------------------------------------------
# POPE
# ----------------------------------------------------------------------------------------

POPE_CATEGORIES = ("adversarial", "popular", "random")


class POPE(Benchmark):
    """POPE (COCO). Files: ``llava_pope_test.jsonl`` ({question_id, image, text, category})
    and ``coco_pope_{adversarial,popular,random}.json`` (JSON lines with ``label`` yes/no) in
    ``annotation_dir``. Labels are matched by (image, question); if that fails for a category
    the official order-based pairing is used. Headline: mean F1 over categories (LLaVA's POPE
    number; unverified which of acc/F1 γ-MoD reports — both are in the metrics)."""

    name = "pope"
    headline_name = "mean_f1"

    def __init__(self, question_file, annotation_dir=None, image_root=None, **kw):
        super().__init__(**kw)
        root = image_root if image_root is not None else Path(question_file).parent
        lines = read_jsonl(question_file)
        keys = _unique_keys([ln["question_id"] for ln in lines])
        items = [{"question_id": k, "image": _resolve(root, ln["image"]), "text": ln["text"],
                  "meta": {"source_id": ln["question_id"], "category": ln.get("category"),
                           "image_name": ln["image"]}}
                 for k, ln in zip(keys, lines)]
        self._finish(items)
        self.labels: dict[str, str] = {}
        self.label_matching: dict[str, str] = {}
        if annotation_dir is not None:
            for fname in sorted(os.listdir(annotation_dir)):
                if not (fname.startswith("coco_pope_") and fname.endswith(".json")):
                    continue
                self._attach_labels(fname[len("coco_pope_"):-len(".json")],
                                    read_jsonl(Path(annotation_dir) / fname))

    def _attach_labels(self, cat, ann):
        mine = [it for it in self.items if it["meta"]["category"] == cat]
        by_key = {(a["image"], a["text"].strip()): a["label"] for a in ann}
        keyed = [by_key.get((it["meta"]["image_name"], it["text"].split("\n")[0].strip()))
                 for it in mine]
        if all(k is not None for k in keyed):
            self.label_matching[cat] = "image+question"
        else:
            keyed = [a["label"] for a in ann][: len(mine)]
            self.label_matching[cat] = "order"
            mine = mine[: len(keyed)]
        for it, lab in zip(mine, keyed):
            self.labels[it["question_id"]] = lab

    @property
    def has_ground_truth(self) -> bool:
        return bool(self.labels)

    def _score(self, answers):
        per_cat = {}
        cats = sorted({it["meta"]["category"] for it in self.items
                       if it["question_id"] in self.labels})
        for cat in cats:
            preds, labels = [], []
            for it in self.items:
                qid = it["question_id"]
                if it["meta"]["category"] != cat or qid not in self.labels:
                    continue
                lab = self.labels[qid]
                # unanswered: scored as the wrong class
                preds.append(M.pope_parse(answers[qid]) if qid in answers
                             else ("yes" if lab == "no" else "no"))
                labels.append(lab)
            m = M.binary_metrics(preds, labels)
            per_cat[cat] = {k: (_pct(v) if isinstance(v, float) else v) for k, v in m.items()}
        mean = lambda k: (sum(c[k] for c in per_cat.values()) / len(per_cat)  # noqa: E731
                          if per_cat else 0.0)
        return mean("f1"), {"mean_f1": mean("f1"), "mean_accuracy": mean("accuracy"),
                            "per_category": per_cat, "label_matching": dict(self.label_matching)}

    def oracle_answers(self):
        return {q: ("Yes" if lab == "yes" else "No") for q, lab in self.labels.items()}


# ----------------------------------------------------------------------------------------
# MME
# ----------------------------------------------------------------------------------------

def _mme_norm(question: str) -> str:
    # LLaVA's convert_answer_to_mme.py re-adds " Please answer yes or no." (one or two
    # spaces) when the question file lacks it; comparing the bare questions covers all cases.
    q = question.replace(SHORT_ANSWER_SUFFIX, "").replace("Please answer yes or no.", "")
    return " ".join(q.split())


def load_mme_ground_truth(gt_dir) -> dict[tuple[str, str, str], str]:
    """{(subtask, image stem, normalised question): "Yes"/"No"} from either the
    ``MME_Benchmark_release_version`` tree (``<subtask>/<stem>.txt`` or
    ``<subtask>/questions_answers_YN/<stem>.txt`` with "question\\tanswer" lines) or an
    eval_tool-style directory of ``<subtask>.txt`` files ("image\\tquestion\\tanswer")."""
    gt = {}
    gt_dir = Path(gt_dir)
    for entry in sorted(gt_dir.iterdir()):
        if entry.is_file() and entry.suffix == ".txt":
            task = entry.stem
            for line in entry.read_text(encoding="utf-8").splitlines():
                if not line.strip():
                    continue
                parts = line.split("\t")
                img, question, answer = parts[0], parts[1], parts[2]
                gt[(task, Path(img).stem, _mme_norm(question))] = answer.strip()
        elif entry.is_dir():
            qa_dir = entry / "questions_answers_YN"
            qa_dir = qa_dir if qa_dir.is_dir() else entry
            for f in sorted(qa_dir.glob("*.txt")):
                for line in f.read_text(encoding="utf-8").splitlines():
                    if not line.strip():
                        continue
                    question, answer = line.strip().split("\t")
                    gt[(entry.name, f.stem, _mme_norm(question))] = answer.strip()
    return gt


class MME(Benchmark):
    """MME. Files: ``llava_mme.jsonl`` ({question_id: "<subtask>/<image>", image, text}; two
    questions per image share the id) and the ground truth (:func:`load_mme_ground_truth`).
    Headline: perception score (sum of acc + acc+ over the 10 perception subtasks, max 2000);
    cognition in the metrics. Yes/no parsing as MME's calculation.py."""

    name = "mme"
    headline_name = "perception"

    def __init__(self, question_file, gt_dir=None, image_root=None, **kw):
        super().__init__(**kw)
        root = image_root if image_root is not None else Path(question_file).parent
        self.gt_table = load_mme_ground_truth(gt_dir) if gt_dir is not None else {}
        lines = read_jsonl(question_file)
        keys = _unique_keys([ln["question_id"] for ln in lines])
        items = []
        for key, ln in zip(keys, lines):
            src = str(ln["question_id"])
            task = src.split("/")[0]
            stem = src.split("/")[-1].split(".")[0]
            gt = self.gt_table.get((task, stem, _mme_norm(ln["text"])))
            if gt_dir is not None and gt is None:
                raise KeyError(f"MME: no ground truth for {src!r}: {ln['text']!r}")
            items.append({"question_id": key, "image": _resolve(root, ln["image"]),
                          "text": ln["text"],
                          "meta": {"source_id": ln["question_id"], "subtask": task,
                                   "image_name": src.split("/")[-1], "gt": gt}})
        self._finish(items)

    @property
    def has_ground_truth(self) -> bool:
        return bool(self.gt_table)

    def _records(self, answers):
        for it in self.items:
            yield {"subtask": it["meta"]["subtask"], "image": it["meta"]["image_name"],
                   "gt": it["meta"]["gt"], "pred": answers.get(it["question_id"], "")}

    def _score(self, answers):
        s = M.mme_scores(self._records(answers))
        return s["perception"], {**s, "total": s["perception"] + s["cognition"]}

    def oracle_answers(self):
        return {it["question_id"]: it["meta"]["gt"] for it in self.items}

    def write_submission(self, answers, path) -> Path:
        """eval_tool ``Your_Results``-style directory: ``<subtask>.txt`` lines
        "image\\tquestion\\tgt\\tprediction" (newlines in predictions become spaces)."""
        from gmod_jax.eval.results import write_text_atomic

        amap = _answer_map(answers)
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        per_task: dict[str, list[str]] = defaultdict(list)
        for it in self.items:
            if it["question_id"] not in amap:
                continue
            q = it["text"].replace(SHORT_ANSWER_SUFFIX, "").strip()
            pred = " ".join(amap[it["question_id"]].split())
            per_task[it["meta"]["subtask"]].append(
                "\t".join([it["meta"]["image_name"], q, it["meta"]["gt"] or "", pred]))
        for task, lines in per_task.items():
            write_text_atomic(out / f"{task}.txt", "\n".join(lines) + "\n")
        return out


# ----------------------------------------------------------------------------------------
# MMBench
# ----------------------------------------------------------------------------------------

MMBENCH_OPTIONS = ("A", "B", "C", "D")
MMBENCH_COPY_OFFSET = 1_000_000


def read_mmbench_tsv(path) -> list[dict]:
    """Rows of an MMBench TSV (pandas-style quoting) as dicts of strings."""
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


class MMBench(Benchmark):
    """MMBench (``mmbench_dev_20230712.tsv``: index, question, hint, A-D, answer, category,
    l2-category, base64 image, ...). Prompt as LLaVA model_vqa_mmbench.py with
    --single-pred-prompt: [hint "\\n"] question, "\\nA. opt" per option, letter suffix.

    Circular evaluation: rows are grouped by ``index % 1_000_000``; a group is right only if
    all its variants are. ``all_rounds=None`` (auto) generates LLaVA's --all-rounds circular
    shifts unless the TSV already holds shifted copies (indices >= 1e6). Answers are parsed
    with VLMEvalKit's rule-based ``can_infer`` (no GPT judge; unparseable = wrong)."""

    name = "mmbench"
    headline_name = "circular_accuracy"

    def __init__(self, tsv_file, all_rounds: bool | None = None, lang: str = "en",
                 a_quantifier_guard: bool = False, **kw):
        super().__init__(**kw)
        self.tsv_file = tsv_file
        self.a_quantifier_guard = a_quantifier_guard
        rows = read_mmbench_tsv(tsv_file)
        has_copies = any(int(r["index"]) >= MMBENCH_COPY_OFFSET for r in rows)
        self.all_rounds = (not has_copies) if all_rounds is None else all_rounds
        self._has_answers = bool(rows) and all(not _is_none(r.get("answer")) for r in rows)
        suffix = LETTER_ANSWER_SUFFIX_CN if lang == "cn" else LETTER_ANSWER_SUFFIX
        items = []
        for row in rows:
            index = int(row["index"])
            options = []
            for letter in MMBENCH_OPTIONS:
                if _is_none(row.get(letter)):
                    break
                options.append(row[letter])
            image = base64.b64decode(row["image"])
            n_rounds = len(options) if self.all_rounds else 1
            answer_pos = (MMBENCH_OPTIONS.index(row["answer"].strip())
                          if self._has_answers else None)
            for r in range(n_rounds):
                shown = options[r:] + options[:r]
                question = row["question"]
                if not _is_none(row.get("hint")):
                    question = row["hint"] + "\n" + question
                for letter, opt in zip(MMBENCH_OPTIONS, shown):
                    question = question + "\n" + letter + ". " + opt
                gold = (MMBENCH_OPTIONS[(answer_pos - r) % len(options)]
                        if answer_pos is not None else None)
                items.append({
                    "question_id": f"{index}:{r}" if self.all_rounds else str(index),
                    "image": image,
                    "text": question + "\n" + suffix,
                    "llava_prompt": question,
                    "answer_record_extra": {"round_id": r, "options": shown,
                                            "option_char": list(MMBENCH_OPTIONS[:len(shown)])},
                    "meta": {"source_id": index, "round_id": r,
                             "group": index % MMBENCH_COPY_OFFSET,
                             "choices": dict(zip(MMBENCH_OPTIONS, shown)), "gold": gold,
                             "category": row.get("category"),
                             "l2_category": row.get("l2-category", row.get("l2_category"))},
                })
        self._finish(items)

    @property
    def has_ground_truth(self) -> bool:
        return self._has_answers

    def parse(self, text: str, choices: Mapping[str, str]) -> str | None:
        return M.mmbench_parse(text, choices, self.a_quantifier_guard)

    def _score(self, answers):
        recs, unparsed = [], 0
        for it in self.items:
            m = it["meta"]
            text = answers.get(it["question_id"])
            pred = self.parse(text, m["choices"]) if text is not None else None
            unparsed += text is not None and pred is None
            recs.append({"group": m["group"], "correct": pred == m["gold"],
                         "category": m["category"], "l2_category": m["l2_category"]})
        res = M.mmbench_circular(recs)
        res = {**res, "circular_accuracy": _pct(res["circular_accuracy"]),
               "vanilla_accuracy": _pct(res["vanilla_accuracy"]),
               "per_category": {k: _pct(v) for k, v in res["per_category"].items()},
               "per_l2_category": {k: _pct(v) for k, v in res["per_l2_category"].items()},
               "n_unparsed": unparsed}
        return res["circular_accuracy"], res

    def oracle_answers(self):
        return {it["question_id"]: it["meta"]["gold"] for it in self.items}

    def write_submission(self, answers, path) -> Path:
        """TSV in the layout of LLaVA's convert_mmbench_for_submission.py (original columns
        without hint/category/source/image/comment/l2-category, plus ``prediction``; the
        round-0 answer per index). Written as TSV: .xlsx would need openpyxl."""
        from gmod_jax.eval.results import write_text_atomic

        if str(path).endswith(".xlsx"):
            raise ValueError("xlsx output needs openpyxl; write a .tsv and convert")
        amap = _answer_map(answers)
        rows = read_mmbench_tsv(self.tsv_file)
        drop = {"hint", "category", "source", "image", "comment", "l2-category"}
        cols = [c for c in (rows[0].keys() if rows else []) if c not in drop]
        cols = cols[:6] + ["prediction"] + cols[6:]
        pred_by_index = {}
        for it in self.items:
            if it["meta"]["round_id"] == 0 and it["question_id"] in amap:
                pred_by_index[str(it["meta"]["source_id"])] = amap[it["question_id"]]
        buf = io.StringIO()
        w = csv.writer(buf, delimiter="\t", lineterminator="\n")
        w.writerow(cols)
        for row in rows:
            w.writerow([pred_by_index.get(row["index"], "") if c == "prediction"
                        else row.get(c, "") for c in cols])
        return write_text_atomic(path, buf.getvalue())


# ----------------------------------------------------------------------------------------
# MMMU
# ----------------------------------------------------------------------------------------

_MMMU_ID = re.compile(r"^(?:validation|dev|test)_(.+)_\d+$")
_MMMU_OPTION_IMG = re.compile(r"<img='(.*?)'>")
MMMU_INVALID_OPEN = "INVALID GENERATION FOR MULTIPLE IMAGE INPUTS"


def mmmu_subject(record: Mapping) -> str:
    if record.get("subject"):
        return record["subject"]
    m = _MMMU_ID.match(str(record["id"]))
    return m.group(1) if m else "unknown"


def mmmu_prompt(question: str, options: Sequence[str], question_type: str) -> str:
    """MMMU ``construct_prompt`` with LLaVA's config (empty task instructions)."""
    if question_type == "multiple-choice":
        example = "".join(f"({chr(ord('A') + i)}) {opt}\n" for i, opt in enumerate(options))
        return f"{question}\n{example}\n{LETTER_ANSWER_SUFFIX}"
    return f"{question}\n{SHORT_ANSWER_SUFFIX}"


def mmmu_official_order(items: Sequence[dict]) -> list[dict]:
    """``items`` in the order MMMU's runners meet them: subjects as
    :data:`metrics.MMMU_SUBJECT_ORDER`, questions by the number ending their id
    ("validation_Art_12" -> 12, the HF dataset order); subjects MMMU does not list come
    last, in file order."""
    rank = {s: i for i, s in enumerate(M.MMMU_SUBJECT_ORDER)}

    def key(pos_item):
        pos, it = pos_item
        subject_rank = rank.get(it["meta"]["subject"], len(rank))
        m = re.search(r"_(\d+)$", str(it["meta"]["source_id"]))
        number = int(m.group(1)) if m and subject_rank < len(rank) else pos
        return (subject_rank, number, pos)

    return [it for _, it in sorted(enumerate(items), key=key)]


def _read_records(path) -> list[dict]:
    path = Path(path)
    if path.is_dir():
        out = []
        for f in sorted(path.iterdir()):
            if f.suffix in (".json", ".jsonl"):
                out.extend(_read_records(f))
        return out
    if path.suffix == ".jsonl":
        return read_jsonl(path)
    data = read_json(path)
    return data if isinstance(data, list) else [data]


class MMMU(Benchmark):
    """MMMU validation. Files: one JSON list / JSONL file or a directory of them, one record
    per question: {id ("validation_<Subject>_<n>"), question, options (list or its str repr),
    answer, question_type ("multiple-choice"/"open"), image_1 (path relative to image_root),
    subfield, optional subject}. The HF parquet must be exported to this layout first.

    As γ-MoD's model_mmmu.py: only image_1 is given to the model; questions without image_1
    or with several ``<img='...'>`` option images are not generated but answered with a
    random choice (multiple-choice) or the invalid marker (open). Parsing / scoring per
    MMMU eval_utils.

    Random picks are drawn as MMMU's scorer draws them: one stream, Python's ``random``
    seeded with ``seed`` (42, as eval_utils.py at import), consumed in MMMU's evaluation
    order (:func:`mmmu_official_order`) by exactly two events: a model-free
    multiple-choice question (one ``choice`` over its letters) and a multiple-choice reply
    with no parsable option (one ``choice`` in ``parse_multi_choice_response``). Open
    questions and unanswered questions draw nothing. So a question's pick depends on the
    draws before it, as officially; ``limit`` or a partial answer set shifts later picks.
    """

    name = "mmmu"
    headline_name = "overall_accuracy"

    def __init__(self, data_file, image_root=None, seed: int = M.MMMU_SEED, **kw):
        super().__init__(**kw)
        self.seed = seed
        base = Path(data_file) if Path(data_file).is_dir() else Path(data_file).parent
        root = image_root if image_root is not None else base
        items = []
        for rec in _read_records(data_file):
            options = rec.get("options") or []
            if isinstance(options, str):
                options = ast.literal_eval(options)
            qtype = rec["question_type"]
            option_imgs = [p for o in options for p in _MMMU_OPTION_IMG.findall(str(o))]
            image = rec.get("image_1")
            no_gen = len(option_imgs) > 1 or not image
            answer = rec["answer"]
            if isinstance(answer, str) and answer.strip().startswith("["):
                try:
                    answer = ast.literal_eval(answer)
                except (ValueError, SyntaxError):
                    pass
            letters = [chr(ord("A") + i) for i in range(len(options))]
            items.append({
                "question_id": str(rec["id"]),
                "image": None if no_gen else _resolve(root, image),
                "text": mmmu_prompt(rec["question"], options, qtype),
                "no_generation": no_gen,
                "meta": {"source_id": rec["id"], "subject": mmmu_subject(rec),
                         "question_type": qtype, "all_choices": letters,
                         "index2ans": dict(zip(letters, options)), "answer": answer},
            })
        self._finish(items)

    def parsed_predictions(self, answers: Mapping[str, str]) -> dict:
        """{question_id: what MMMU's evaluator compares with the gold answer} (letter, or
        the list of normalised strings / numbers for open questions) for every question
        that is answered or model-free, drawing the random picks in MMMU's order."""
        rng = M.mmmu_rng(self.seed)
        out = {}
        for it in mmmu_official_order(self.items):
            m = it["meta"]
            mc = m["question_type"] == "multiple-choice"
            if it.get("no_generation"):
                text = rng.choice(m["all_choices"]) if mc else MMMU_INVALID_OPEN
            elif it["question_id"] in answers:
                text = answers[it["question_id"]]
            else:
                continue
            out[it["question_id"]] = (
                M.mmmu_parse_multi_choice(text, m["all_choices"], m["index2ans"], rng) if mc
                else M.mmmu_parse_open(text))
        return out

    def _score(self, answers):
        preds = self.parsed_predictions(answers)
        recs = []
        for it in self.items:
            m = it["meta"]
            pred = preds.get(it["question_id"])
            if pred is None:
                ok = False
            elif m["question_type"] == "multiple-choice":
                ok = M.mmmu_eval_multi_choice(m["answer"], pred)
            else:
                ok = M.mmmu_eval_open(m["answer"], pred)
            recs.append({"subject": m["subject"], "correct": ok})
        s = M.mmmu_summary(recs)
        pct = lambda d: {k: {**v, "acc": _pct(v["acc"])} for k, v in d.items()}  # noqa: E731
        overall = _pct(s["overall"])
        return overall, {"overall_accuracy": overall, "per_subject": pct(s["per_subject"]),
                         "per_domain": pct(s["per_domain"]),
                         "n_no_generation": sum(bool(it.get("no_generation"))
                                                for it in self.items)}

    def oracle_answers(self):
        out = {}
        for it in self.items:
            if it.get("no_generation"):
                continue
            ans = it["meta"]["answer"]
            out[it["question_id"]] = ans[0] if isinstance(ans, list) else str(ans)
        return out

    def write_submission(self, answers, path):
        """MMMU output JSON {id: prediction}: parsed letter for multiple-choice, raw reply
        for open questions (as model_mmmu.py saves it)."""
        from gmod_jax.eval.results import write_json_atomic

        amap = _answer_map(answers)
        parsed = self.parsed_predictions(amap)
        out = {}
        for it in self.items:
            qid = it["question_id"]
            if qid not in parsed:
                continue
            if it["meta"]["question_type"] == "multiple-choice":
                out[qid] = parsed[qid]
            else:
                out[qid] = MMMU_INVALID_OPEN if it.get("no_generation") else amap[qid]
        return write_json_atomic(path, out)


# ----------------------------------------------------------------------------------------
# SEED-Bench
# ----------------------------------------------------------------------------------------

class SEEDBench(Benchmark):
    """SEED-Bench (image part). Files: ``llava-seed-bench.jsonl`` ({question_id, image, text
    with the A-D options and the letter suffix}) and ``SEED-Bench.json`` ({"question_type":
    {name: id}, "questions": [{question_id, answer, data_type, question_type_id, ...}]}).

    ``parse="exact"`` (official LLaVA converter: reply == answer letter, as stored) or
    ``"letter"`` (lenient, :func:`metrics.seed_letter`). ``image_only`` keeps data_type
    "image" questions."""

    name = "seed"
    headline_name = "image_accuracy"

    def __init__(self, question_file, annotation_file=None, image_root=None,
                 parse: str = "exact", image_only: bool = True, **kw):
        super().__init__(**kw)
        if parse not in ("exact", "letter"):
            raise ValueError(parse)
        self.parse = parse
        root = image_root if image_root is not None else Path(question_file).parent
        self.ann: dict[str, dict] = {}
        self.type_names: dict[int, str] = {}
        if annotation_file is not None:
            data = read_json(annotation_file)
            self.type_names = {v: k for k, v in data.get("question_type", {}).items()}
            self.ann = {str(q["question_id"]): q for q in data["questions"]}
        items = []
        for ln in read_jsonl(question_file):
            qid = str(ln["question_id"])
            q = self.ann.get(qid)
            if self.ann and q is None:
                raise KeyError(f"SEED: no annotation for question {qid}")
            if image_only and q is not None and q.get("data_type", "image") != "image":
                continue
            items.append({"question_id": qid, "image": _resolve(root, ln["image"]),
                          "text": ln["text"],
                          "meta": {"source_id": ln["question_id"],
                                   "category": ln.get("category")}})
        self._finish(items)

    @property
    def has_ground_truth(self) -> bool:
        return bool(self.ann)

    def _correct(self, text: str | None, gold: str) -> bool:
        if text is None:
            return False
        if self.parse == "exact":  # the converter compares row['text'] as stored
            return text == gold
        return M.seed_letter(text) == gold

    def _score(self, answers):
        per_type: dict[str, list[bool]] = defaultdict(list)
        right = []
        for it in self.items:
            q = self.ann[it["question_id"]]
            ok = self._correct(answers.get(it["question_id"]), q["answer"])
            right.append(ok)
            tid = q.get("question_type_id")
            per_type[self.type_names.get(tid, str(tid))].append(ok)
        acc = _pct(sum(right) / len(right)) if right else 0.0
        return acc, {"image_accuracy": acc, "per_question_type": {
            k: _pct(sum(v) / len(v)) for k, v in sorted(per_type.items())}}

    def oracle_answers(self):
        return {it["question_id"]: self.ann[it["question_id"]]["answer"] for it in self.items}

    def write_submission(self, answers, path):
        """SEED upload JSONL ({question_id, prediction}) as convert_seed_for_submission.py."""
        from gmod_jax.eval.results import write_jsonl_atomic

        amap = _answer_map(answers)
        return write_jsonl_atomic(path, [
            {"question_id": it["meta"]["source_id"], "prediction": amap[it["question_id"]]}
            for it in self.items if it["question_id"] in amap])


# ----------------------------------------------------------------------------------------
# registry and runner
# ----------------------------------------------------------------------------------------

BENCHMARKS: dict[str, type[Benchmark]] = {
    "gqa": GQA, "sqa": ScienceQA, "textvqa": TextVQA, "vqav2": VQAv2, "vizwiz": VizWiz,
    "pope": POPE, "mme": MME, "mmbench": MMBench, "mmmu": MMMU, "seed": SEEDBench,
}
ALIASES = {"scienceqa": "sqa", "sqa-img": "sqa", "seed-bench": "seed", "seedbench": "seed",
           "mmb": "mmbench", "text-vqa": "textvqa", "vqa-v2": "vqav2"}


def load_benchmark(name: str, **kwargs) -> Benchmark:
    """Build a benchmark by name from its file paths (the keys returned by
    the test suite's `write_benchmark_files` fit directly)."""
    key = ALIASES.get(name.lower(), name.lower())
    if key not in BENCHMARKS:
        raise KeyError(f"unknown benchmark {name!r}; known: {sorted(BENCHMARKS)}")
    return BENCHMARKS[key](**kwargs)


@dataclass
class RunOutput:
    answers: dict[str, str]
    n_generated: int
    generate_seconds: float

    @property
    def samples_per_s(self) -> float | None:
        return self.n_generated / self.generate_seconds if self.generate_seconds > 0 else None


def run_benchmark(bench: Benchmark, generate_fn: Callable[[list[dict]], list[str]],
                  answers_file=None, batch_size: int = 8,
                  on_batch: Callable[[int, int], Any] | None = None) -> RunOutput:
    """Answer every prompt of ``bench`` with ``generate_fn`` in batches.

    ``generate_fn`` returns one output per prompt: the answer text, or a dict with the text
    under ``"text"`` and extra JSON-serialisable fields (per-sample statistics) that are
    stored with the answer. With ``answers_file`` (path or :class:`results.AnswersFile`)
    each answer is appended as it arrives and questions already in the file are skipped, so
    an interrupted run resumes.
    ``generate_seconds`` is wall time inside ``generate_fn`` for this call's new answers
    (samples/s as γ-MoD measures it: generation time only, batch size is the caller's).
    """
    from gmod_jax.eval.results import AnswersFile

    af = None
    if answers_file is not None:
        af = answers_file if isinstance(answers_file, AnswersFile) else AnswersFile(answers_file)
    answers = af.answers() if af is not None else {}
    todo = [p for p in bench.prompts() if p["question_id"] not in answers]
    elapsed = 0.0
    done = 0
    for start in range(0, len(todo), batch_size):
        batch = todo[start:start + batch_size]
        t0 = time.perf_counter()
        outs = list(generate_fn(batch))
        elapsed += time.perf_counter() - t0
        if len(outs) != len(batch):
            raise ValueError(f"generate_fn returned {len(outs)} outputs for {len(batch)} prompts")
        for p, out in zip(batch, outs):
            extra = {}
            if isinstance(out, Mapping):
                extra = {k: v for k, v in out.items() if k not in ("text", "question_id")}
                out = out["text"]
            answers[p["question_id"]] = out
            if af is not None:
                af.append(p["question_id"], out, benchmark=bench.name, **extra)
        done += len(batch)
        if on_batch is not None:
            on_batch(done, len(todo))
    return RunOutput(answers=answers, n_generated=done, generate_seconds=elapsed)
