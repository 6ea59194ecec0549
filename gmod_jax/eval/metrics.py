"""Official scoring rules of the benchmarks γ-MoD / LLaVA report, re-implemented from their
published evaluators (no model code, no third-party dependencies).

:data:`OFFICIAL_SCORERS` names, per benchmark, the official code followed: repository,
revision read and files. Behaviour is reproduced, code written anew. Where the project
deliberately differs, the function's docstring says so and :data:`DELIBERATE_DEVIATIONS`
lists it (docs/evaluation.md carries the same table for readers).

All accuracies here are fractions in [0, 1]; benchmark objects convert headlines to percent.
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from typing import Iterable, Mapping, Sequence

LLAVA = ("haotian-liu/LLaVA", "c121f0432da27facab705978f83c4ada465e46fd")
GAMMA_MOD = ("Yaxin9Luo/Gamma-MOD", "5de27f2e1f62fefe73f77703abc48e44f39c137a")

# benchmark -> (repository, revision, files). The headline of each benchmark equals what
# these scripts print on the files the harness writes (tests/test_eval_official.py).
OFFICIAL_SCORERS: dict[str, tuple[str, str, str]] = {
    "vqav2": ("GT-Vision-Lab/VQA", "a013f0043c1e2cdc995922dfe257f7149aa9af06",
              "PythonEvaluationTools/vqaEvaluation/vqaEval.py (2021 'Fixed processing answers "
              "bug'); submission: LLaVA scripts/convert_vqav2_for_submission.py @ " + LLAVA[1]),
    "vizwiz": ("GT-Vision-Lab/VQA", "a013f0043c1e2cdc995922dfe257f7149aa9af06",
               "PythonEvaluationTools/vqaEvaluation/vqaEval.py (2021), each human answer its own "
               "voter; vqa_rule 'vizwiz': the VizWiz-VQA API's vqaEval.py (vizwiz.org, unversioned); "
               "submission: LLaVA scripts/convert_vizwiz_for_submission.py @ " + LLAVA[1]),
    "textvqa": (LLAVA[0], LLAVA[1], "llava/eval/eval_textvqa.py, llava/eval/m4c_evaluator.py "
                "(identical in Gamma-MOD @ " + GAMMA_MOD[1] + ")"),
    "gqa": (LLAVA[0], LLAVA[1], "scripts/convert_gqa_for_eval.py + GQA's eval.py "
            "(exact match of the converted prediction)"),
    "sqa": (GAMMA_MOD[0], GAMMA_MOD[1], "gamma_mod/eval/eval_science_qa.py (parse_rule "
            "'llava_hr'); LLaVA llava/eval/eval_science_qa.py @ " + LLAVA[1]
            + " for parse_rule 'llava'"),
    "pope": (LLAVA[0], LLAVA[1], "llava/eval/eval_pope.py (identical in Gamma-MOD)"),
    "mme": ("BradyFU/Awesome-Multimodal-Large-Language-Models (Evaluation branch)",
            "copy read: zjunlp/Deco a3ccc150b715373f3019fc07cb1836c1961d7e15",
            "eval_tool/calculation.py"),
    "mmbench": ("open-compass/VLMEvalKit", "e8e78f05f3080fe28154f2130321f17951c3be94",
                "vlmeval/utils/matching_util.py (can_infer, last changed a67ace50), "
                "vlmeval/dataset/utils/multiple_choice.py (mcq_circular_eval, exact_matching)"),
    "mmmu": ("MMMU-Benchmark/MMMU", "bb0b95a945998d91dfef37e969e07d49d1139438",
             "mmmu/utils/eval_utils.py, mmmu/main_eval_only.py; model-free fallbacks as "
             "Gamma-MOD gamma_mod/eval/model_mmmu.py @ " + GAMMA_MOD[1]),
    "seed": (LLAVA[0], LLAVA[1], "scripts/convert_seed_for_submission.py"),
}

# Where the harness knowingly differs from the scripts above (all other inputs score alike).
DELIBERATE_DEVIATIONS: tuple[str, ...] = (
    "all: a question without an answer scores wrong and stays in every denominator "
    "(n_missing reports it); the official scripts either refuse the file (VQAv2 loadRes, "
    "GQA eval.py, VizWiz converter, MME), score only the answered questions (TextVQA, MMMU, "
    "ScienceQA's IMG count: an unanswered image question has no '<image>' prompt) or pair "
    "labels by position (POPE). Identical whenever every question is answered.",
    "all: a division by zero (POPE precision with no 'yes', an empty set) gives 0.0 where "
    "the official script raises.",
    "vizwiz: the contraction table is the ASCII one of vqaEval.py; the VizWiz API copies "
    "spell most of its apostrophes as U+2019 or a backtick (affects only replies such as "
    "'dont').",
    "mmbench: no GPT judge (VLMEvalKit's exact_matching policy); LLaVA's --all-rounds "
    "rotations are generated when the TSV has no circular copies.",
    "mmmu: the draw stream follows MMMU's subject order and each subject's question order "
    "(MMMU_SUBJECT_ORDER), whatever the order of the input file; Gamma-MOD's copy of the "
    "scorer has the seed line commented out (its picks are not reproducible), MMMU's own "
    "eval_utils.py seeds 42, which is followed.",
    "mme: subtasks absent from the answers contribute 0 (the official script stops); acc+ "
    "groups questions by image rather than by consecutive line pairs (the same for MME's "
    "files, two consecutive questions per image).",
)


# ----------------------------------------------------------------------------------------
# VQA answer normalisation
# ----------------------------------------------------------------------------------------

CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    # "somebodyd" (sic) is what the official table maps to; kept for fidelity.
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've",
    "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've",
    "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've",
    "wouldnt": "wouldn't", "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've",
    "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}

# ``manualMap`` of vqaEval.py / ``NUMBER_MAP`` of the EvalAI processor.
NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES = ("a", "an", "the")
PUNCTUATIONS = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">",
                "<", "@", "`", ",", "?", "!")
# Both regexes are copied verbatim in meaning, including the official "(?!<=\d)" typo (a
# negative lookahead for the literal text "<=" followed by a digit, not a lookbehind): a
# period is removed unless a digit follows it, so "2.5" survives and "yes." loses its dot.
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def process_punctuation(text: str) -> str:
    """vqaEval ``processPunctuation``.

    A punctuation mark touching a space (or any text with a digit,digit comma) is deleted,
    otherwise it is replaced by a space ("black/white" -> "black white"). Periods not followed
    by a digit are deleted. The official code passes ``re.UNICODE`` (= 32) as the ``count``
    argument of ``sub``, so at most 32 periods are removed; reproduced.
    """
    out = text
    for p in PUNCTUATIONS:
        if (p + " " in text or " " + p in text) or COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return PERIOD_STRIP.sub("", out, count=int(re.UNICODE))


def process_digit_article(text: str) -> str:
    """vqaEval ``processDigitArticle``: lowercase, number words -> digits, drop articles,
    restore contractions ("dont" -> "don't")."""
    words = []
    for word in text.lower().split():
        word = NUMBER_WORDS.get(word, word)
        if word not in ARTICLES:
            words.append(word)
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(text: str) -> str:
    """EvalAI answer processor (m4c ``EvalAIAnswerProcessor.__call__``).

    Used for TextVQA scoring (prediction and all ten human answers) and by LLaVA's VQAv2 /
    VizWiz submission converters. Steps: lowercase, drop "," and "?", split "'s" off,
    whitespace clean-up, :func:`process_punctuation`, :func:`process_digit_article`.
    """
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    text = process_punctuation(text)
    return process_digit_article(text)


def _clean_whitespace(text: str) -> str:
    # the first step of every official VQA scorer: newlines / tabs -> spaces, strip
    return text.replace("\n", " ").replace("\t", " ").strip()


def _leave_one_out(pred: str, gts: Sequence[str]) -> float:
    # For each human answer, the other (n-1) answers vote: min(#matches / 3, 1), averaged
    # over the n subsets (index-based: two equal answers are still two voters).
    accs = []
    for i in range(len(gts)):
        matches = sum(1 for j, g in enumerate(gts) if j != i and g == pred)
        accs.append(min(1.0, matches / 3.0))
    return sum(accs) / len(accs) if accs else 0.0


def vqa_score_official(pred: str, gt_answers: Sequence) -> float:
    """One question's accuracy under GT-Vision-Lab/VQA ``vqaEval.py`` at its current revision
    (a013f00, 2021 "Fixed processing answers bug"), the VQAv2 server's rule.

    Prediction and human answers are whitespace-cleaned. Only if the human answers then
    disagree (more than one distinct string) are all of them AND the prediction run through
    :func:`process_punctuation` followed by :func:`process_digit_article`; if all humans agree
    the prediction is compared as it is ("Two" never matches ten "2"s: the VQAv2 submission
    converter has already normalised it). Leave-one-out removes every record *equal* to the
    held-out one: ``gt_answers`` may be strings (each its own voter, as VQAv2's records with
    distinct ``answer_id``) or answer dicts, compared whole as officially (dicts without an
    id that are equal leave together).
    """
    records = [dict(a) if isinstance(a, Mapping) else {"answer": a, "_voter": i}
               for i, a in enumerate(gt_answers)]
    for r in records:
        r["answer"] = _clean_whitespace(str(r["answer"]))
    pred = _clean_whitespace(pred)
    if len({r["answer"] for r in records}) > 1:
        for r in records:
            r["answer"] = process_digit_article(process_punctuation(r["answer"]))
        pred = process_digit_article(process_punctuation(pred))
    accs = []
    for held in records:
        matches = sum(1 for r in records if r != held and r["answer"] == pred)
        accs.append(min(1.0, matches / 3.0))
    return sum(accs) / len(accs) if accs else 0.0


def vqa_score_vizwiz(pred: str, gt_answers: Sequence) -> float:
    """One question's accuracy under the VizWiz-VQA API's ``vqaEval.py`` (Qing Li; the
    evaluation code vizwiz.org distributes for its EvalAI challenge; no public git revision).

    The prediction is whitespace-cleaned, then always run through :func:`process_punctuation`
    and :func:`process_digit_article`; the human answers are used exactly as stored (not even
    stripped); leave-one-out is by position. Deliberate deviation: the circulating copies of
    that file spell the apostrophes of most contraction targets as U+2019 or a backtick
    ("dont" -> "don’t"); the ASCII table of :data:`CONTRACTIONS` is used instead, which only
    matters for a reply that is an apostrophe-less contraction ("dont", "isnt").
    """
    pred = process_digit_article(process_punctuation(_clean_whitespace(pred)))
    gts = [str(a["answer"]) if isinstance(a, Mapping) else str(a) for a in gt_answers]
    return _leave_one_out(pred, gts)


def vqa_score_textvqa(pred: str, gt_answers: Sequence[str]) -> float:
    """One question's accuracy under m4c's ``TextVQAAccuracyEvaluator``: the EvalAI processor
    is applied to the prediction and to every human answer, then leave-one-out averaging."""
    return _leave_one_out(normalize_answer(pred), [normalize_answer(g) for g in gt_answers])


VQA_RULES = {"textvqa": vqa_score_textvqa, "vqa": vqa_score_official,
             "vizwiz": vqa_score_vizwiz}


def vqa_accuracy(preds: Sequence[str], gt_answers: Sequence[Sequence],
                 rule: str = "textvqa") -> float:
    """Mean VQA accuracy; ``rule`` is ``"textvqa"`` (m4c), ``"vqa"`` (vqaEval.py, 2021) or
    ``"vizwiz"`` (VizWiz-VQA API)."""
    fn = VQA_RULES[rule]
    if not preds:
        return 0.0
    return sum(fn(p, g) for p, g in zip(preds, gt_answers, strict=True)) / len(preds)


# ----------------------------------------------------------------------------------------
# GQA
# ----------------------------------------------------------------------------------------

def gqa_normalize(text: str) -> str:
    """LLaVA ``convert_gqa_for_eval.py``: ``text.rstrip('.').lower()``."""
    return text.rstrip(".").lower()


def gqa_correct(pred: str, gold: str) -> bool:
    """GQA ``eval.py`` accuracy: exact string match after LLaVA's normalisation."""
    return gqa_normalize(pred) == gold


# ----------------------------------------------------------------------------------------
# ScienceQA
# ----------------------------------------------------------------------------------------

SQA_OPTIONS = ("A", "B", "C", "D", "E")
_SQA_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


def sqa_parse_letter(text: str, rule: str = "llava_hr") -> str:
    """The answer letter an ``eval_science_qa.py`` extracts, or ``"FAILED"``.

    ``rule="llava"`` (haotian-liu/LLaVA): the whole text is one of A-E; or it has length >= 3
    and starts with "<letter>. "; or the regex ``The answer is ([A-Z]).`` (the ``.`` is any
    character) matches exactly once.
    ``rule="llava_hr"`` (LLaVA-HR, the code base γ-MoD forked; default): as above but the
    second rule only needs length >= 3 and a first character in A-E (so "A) x" and even
    "Apple" parse as "A").
    Note that under both rules a bare "A." (two characters) is FAILED, as officially.
    """
    if text in SQA_OPTIONS:
        return text
    if rule == "llava":
        if len(text) >= 3 and text[0] in SQA_OPTIONS and text[1:3] == ". ":
            return text[0]
    elif rule == "llava_hr":
        if len(text) >= 3 and text[0] in SQA_OPTIONS:
            return text[0]
    else:
        raise ValueError(f"unknown SQA parsing rule {rule!r}")
    found = _SQA_ANSWER_IS.findall(text)
    return found[0] if len(found) == 1 else "FAILED"


def sqa_pred_index(text: str, n_choices: int, rule: str = "llava_hr") -> int:
    """Predicted choice index, or -1. Official ``get_pred_idx`` returns -1 for a letter that is
    FAILED or beyond the question's choices (its ``random.choice`` line is dead code), so an
    unparseable answer is scored wrong, never guessed."""
    letter = sqa_parse_letter(text, rule)
    if letter in SQA_OPTIONS[:n_choices]:
        return SQA_OPTIONS.index(letter)
    return -1


# ----------------------------------------------------------------------------------------
# POPE
# ----------------------------------------------------------------------------------------

def pope_parse(text: str) -> str:
    """LLaVA ``eval_pope.py``: keep the text before the first ".", drop ",", split on single
    spaces; "no" if any word is exactly "No", "not" or "no", otherwise "yes"."""
    if text.find(".") != -1:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def binary_metrics(preds: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """Accuracy / precision / recall / F1 / yes-ratio with "yes" as the positive class.

    ``preds`` are already parsed "yes"/"no"; any label other than "no" counts as "yes", as in
    eval_pope.py. Where the official script would divide by zero, 0.0 is returned.
    """
    tp = fp = tn = fn = 0
    for p, l in zip(preds, labels, strict=True):
        p1, l1 = p != "no", l != "no"
        if p1 and l1:
            tp += 1
        elif p1 and not l1:
            fp += 1
        elif not p1 and not l1:
            tn += 1
        else:
            fn += 1
    n = tp + fp + tn + fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": (tp + tn) / n if n else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": (tp + fp) / n if n else 0.0,
        "tp": tp, "fp": fp, "tn": tn, "fn": fn, "n": n,
    }


# ----------------------------------------------------------------------------------------
# MME
# ----------------------------------------------------------------------------------------

MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene",
                  "landmark", "artwork", "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation",
                 "code_reasoning")


def mme_parse(text: str) -> str:
    """MME ``calculation.py`` ``parse_pred_ans`` on the lowercased answer: exactly "yes"/"no";
    else "yes" if "yes" occurs in the first 4 characters, else "no" if "no" does, else
    "other". The official script reads the answer from a "image\\tquestion\\tgt\\tanswer"
    line, where :meth:`benchmarks.MME.write_submission` writes it with its whitespace runs
    collapsed to single spaces (a tab or newline would break the line); the same collapse
    happens here, so this parse is the official one on that file."""
    t = " ".join(text.split()).lower()
    if t in ("yes", "no"):
        return t
    prefix = t[:4]
    if "yes" in prefix:
        return "yes"
    if "no" in prefix:
        return "no"
    return "other"


def mme_scores(records: Iterable[Mapping]) -> dict:
    """MME per-subtask acc / acc+ and the perception / cognition totals.

    ``records``: dicts with ``subtask``, ``image``, ``gt`` ("yes"/"no") and ``pred`` (raw
    text). acc = share of questions right ("other" counts wrong); acc+ = share of images
    whose questions (two per image in MME) are all right. A subtask scores
    100*acc + 100*acc+ (max 200); perception sums the 10 perception subtasks (max 2000),
    cognition the 4 cognition subtasks (max 800). Subtasks absent from ``records`` are
    listed under ``missing_subtasks`` and contribute nothing.
    """
    by_task: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    other: dict[str, int] = defaultdict(int)
    for r in records:
        gt = str(r["gt"]).strip().lower()
        if gt not in ("yes", "no"):
            raise ValueError(f"MME ground truth must be yes/no, got {r['gt']!r}")
        pred = mme_parse(str(r["pred"]))
        other[r["subtask"]] += pred == "other"
        by_task[r["subtask"]][str(r["image"])].append(pred == gt)
    subtasks = {}
    for task, images in by_task.items():
        flat = [c for qs in images.values() for c in qs]
        acc = sum(flat) / len(flat)
        acc_plus = sum(all(qs) for qs in images.values()) / len(images)
        subtasks[task] = {
            "acc": 100 * acc, "acc_plus": 100 * acc_plus, "score": 100 * (acc + acc_plus),
            "n_questions": len(flat), "n_images": len(images), "other_num": other[task],
        }
    perception = sum(subtasks[t]["score"] for t in MME_PERCEPTION if t in subtasks)
    cognition = sum(subtasks[t]["score"] for t in MME_COGNITION if t in subtasks)
    unknown = sorted(set(subtasks) - set(MME_PERCEPTION) - set(MME_COGNITION))
    return {
        "perception": perception,
        "cognition": cognition,
        "subtasks": subtasks,
        "missing_subtasks": [t for t in MME_PERCEPTION + MME_COGNITION if t not in subtasks],
        "unknown_subtasks": unknown,
    }


# ----------------------------------------------------------------------------------------
# MMBench
# ----------------------------------------------------------------------------------------

MMBENCH_REJECTIONS = (
    "Sorry, I can't help with images of people yet.",
    "I can't process this file.",
    "I'm sorry, but without the image provided",
    "Cannot determine the answer",
)


# "answer is B" / "correct answer is **B**" anywhere in the reply, case-insensitive
# (VLMEvalKit a67ace50, "Match verbose Chain-of-Thought in eval").
_MMBENCH_VERBOSE = re.compile(r"(?i)(?:correct\s+)?answer\s+is\s+\**([ABCD])\**")


def mmbench_infer_option(answer: str, choices: Mapping[str, str],
                         a_quantifier_guard: bool = False) -> str | None:
    """VLMEvalKit ``can_infer_option`` (vlmeval/utils/matching_util.py at e8e78f05).

    A refusal phrase gives "Z". Otherwise ``.()[],:;!*#{}`` become spaces and the reply is
    split into words: if exactly one choice letter is a word and its first occurrence is
    among the last four words, it is the answer; if no choice letter is a word but "Z" is,
    "Z". Failing both, "answer is X" (:data:`_MMBENCH_VERBOSE`, X in A-D and a choice) is
    the answer. ``a_quantifier_guard`` is VLMEvalKit's ``VERBOSE``-only rule that rejects a
    single letter when "A" is a word of a reply longer than three words ("A dog is ...")."""
    if "Failed to obtain answer via API" in answer:
        return None
    for phrase in MMBENCH_REJECTIONS:
        if phrase in answer:
            return "Z"
    mod = answer
    for c in ".()[],:;!*#{}":
        mod = mod.replace(c, " ")
    words = [w.strip() for w in mod.split()]
    hits = [c for c in choices if c in words]
    if len(hits) == 1:
        if a_quantifier_guard and "A" in words and len(words) > 3:
            return None
        if words.index(hits[0]) > len(words) - 5:
            return hits[0]
    elif not hits and "Z" in words:
        return "Z"
    m = _MMBENCH_VERBOSE.search(answer)
    if m and m.group(1).upper() in choices:
        return m.group(1).upper()
    return None


def mmbench_infer_text(answer: str, choices: Mapping[str, str]) -> str | None:
    """VLMEvalKit ``can_infer_text`` (e8e78f05): the unique choice whose lowercased text occurs
    in the lowercased reply; a reply longer than twice the options' total length infers
    nothing."""
    low = answer.lower()
    if len(low) > 2 * sum(len(str(v)) for v in choices.values()):
        return None
    hits = [k for k, v in choices.items() if str(v).lower() in low]
    return hits[0] if len(hits) == 1 else None


def mmbench_parse(answer: str, choices: Mapping[str, str], a_quantifier_guard: bool = False
                  ) -> str | None:
    """VLMEvalKit ``can_infer``: option letter, else option text; None if neither is unique.
    Scored as VLMEvalKit's ``exact_matching`` policy (no GPT judge): an unparsed reply is
    wrong, like a parsed wrong one."""
    answer = str(answer)
    return (mmbench_infer_option(answer, choices, a_quantifier_guard)
            or mmbench_infer_text(answer, choices))


def mmbench_circular(records: Iterable[Mapping]) -> dict:
    """Circular evaluation: a question counts only if every circular variant is right.

    ``records``: dicts with ``group`` (the original question: ``index % 1_000_000`` for TSVs
    that contain the shifted copies, the question index for LLaVA ``--all-rounds``),
    ``correct`` (bool) and optionally ``category`` / ``l2_category``. Returns overall
    circular accuracy, vanilla (per-variant) accuracy and per-(l2-)category circular accuracy.
    """
    groups: dict = {}
    cats: dict = {}
    l2: dict = {}
    n_rows = n_rows_right = 0
    for r in records:
        g = r["group"]
        groups[g] = groups.get(g, True) and bool(r["correct"])
        n_rows += 1
        n_rows_right += bool(r["correct"])
        if r.get("category") is not None:
            cats[g] = r["category"]
        if r.get("l2_category") is not None:
            l2[g] = r["l2_category"]

    def by(mapping):
        acc: dict[str, list[bool]] = defaultdict(list)
        for g, c in mapping.items():
            acc[c].append(groups[g])
        return {c: sum(v) / len(v) for c, v in sorted(acc.items())}

    return {
        "circular_accuracy": sum(groups.values()) / len(groups) if groups else 0.0,
        "vanilla_accuracy": n_rows_right / n_rows if n_rows else 0.0,
        "n_questions": len(groups),
        "n_variants": n_rows,
        "per_category": by(cats),
        "per_l2_category": by(l2),
    }


# ----------------------------------------------------------------------------------------
# MMMU
# ----------------------------------------------------------------------------------------

MMMU_DOMAINS: dict[str, tuple[str, ...]] = {
    "Art and Design": ("Art", "Art_Theory", "Design", "Music"),
    "Business": ("Accounting", "Economics", "Finance", "Manage", "Marketing"),
    "Science": ("Biology", "Chemistry", "Geography", "Math", "Physics"),
    "Health and Medicine": ("Basic_Medical_Science", "Clinical_Medicine",
                            "Diagnostics_and_Laboratory_Medicine", "Pharmacy",
                            "Public_Health"),
    "Humanities and Social Science": ("History", "Literature", "Sociology", "Psychology"),
    "Tech and Engineering": ("Agriculture", "Architecture_and_Engineering",
                             "Computer_Science", "Electronics", "Energy_and_Power",
                             "Materials", "Mechanical_Engineering"),
}
MMMU_SUBJECT_TO_DOMAIN = {s: d for d, subs in MMMU_DOMAINS.items() for s in subs}


# MMMU's evaluation order: its runners concatenate the subjects in the order of
# ``CAT_SHORT2LONG`` (mmmu/utils/data_utils.py, sorted by short name, hence "Art" after
# "Architecture_and_Engineering") and keep each subject's questions in dataset order.
MMMU_SUBJECT_ORDER: tuple[str, ...] = (
    "Accounting", "Agriculture", "Architecture_and_Engineering", "Art", "Art_Theory",
    "Basic_Medical_Science", "Biology", "Chemistry", "Clinical_Medicine", "Computer_Science",
    "Design", "Diagnostics_and_Laboratory_Medicine", "Economics", "Electronics",
    "Energy_and_Power", "Finance", "Geography", "History", "Literature", "Manage", "Marketing",
    "Materials", "Math", "Mechanical_Engineering", "Music", "Pharmacy", "Physics",
    "Psychology", "Public_Health", "Sociology")
# MMMU eval_utils.py runs ``random.seed(42)`` at import; its runners draw from that global
# stream (run_llava.py seeds it with --seed 42 again before any draw).
MMMU_SEED = 42


def mmmu_rng(seed: int = MMMU_SEED) -> random.Random:
    """A fresh draw stream in the state of MMMU's global ``random`` after ``seed(seed)``.

    One stream serves a whole evaluation, consumed in :data:`MMMU_SUBJECT_ORDER` order:
    ``random.Random(42).choice`` makes exactly the picks ``random.seed(42); random.choice``
    makes (same Mersenne Twister, same ``choice``)."""
    return random.Random(seed)


def mmmu_parse_multi_choice(response: str, all_choices: Sequence[str],
                            index2ans: Mapping[str, str], rng: random.Random) -> str:
    """MMMU ``parse_multi_choice_response``.

    Strip ``,.!?;:'`` from both ends, pad with spaces; candidates are choices written "(X)";
    else " X "; else, for replies longer than 5 words, choices whose text occurs in the reply.
    Several candidates: the one occurring last wins. None: ``rng.choice(all_choices)``, the
    only draw this function makes (``rng``: the evaluation's stream, :func:`mmmu_rng`)."""
    for ch in (",", ".", "!", "?", ";", ":", "'"):
        response = response.strip(ch)
    response = " " + response + " "
    index_ans = True
    with_brackets = False
    candidates = []
    for choice in all_choices:
        if f"({choice})" in response:
            candidates.append(choice)
            with_brackets = True
    if not candidates:
        for choice in all_choices:
            if f" {choice} " in response:
                candidates.append(choice)
    if not candidates and len(response.split()) > 5:
        for index, ans in index2ans.items():
            if ans.lower() in response.lower():
                candidates.append(index)
                index_ans = False
    if not candidates:
        return rng.choice(list(all_choices))
    if len(candidates) == 1:
        return candidates[0]
    if index_ans:
        pattern = "({})" if with_brackets else " {} "
        starts = [response.rfind(pattern.format(c)) for c in candidates]
    else:
        starts = [response.lower().rfind(index2ans[c].lower()) for c in candidates]
    # np.argmax semantics: first maximum wins on ties.
    return candidates[max(range(len(starts)), key=lambda i: (starts[i], -i))]


def _check_is_number(s: str) -> bool:
    try:
        float(s.replace(",", ""))
        return True
    except ValueError:
        return False


def mmmu_normalize_str(s: str) -> list:
    """MMMU ``normalize_str``: numbers -> [round(float, 2)]; strings -> [lowercased], with
    single characters padded ([" x", "x "]) to avoid trivial substring matches."""
    s = s.strip()
    if _check_is_number(s):
        return [round(float(s.replace(",", "")), 2)]
    s = s.lower()
    if len(s) == 1:
        return [" " + s, s + " "]
    return [s]


def mmmu_extract_numbers(s: str) -> list[str]:
    """MMMU ``extract_numbers``: numbers with thousands commas, scientific notation, plain."""
    with_commas = re.findall(r"-?\b\d{1,3}(?:,\d{3})+\b", s)
    scientific = re.findall(r"-?\d+(?:\.\d+)?[eE][+-]?\d+", s)
    simple = re.findall(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])", s)
    return with_commas + scientific + simple


def mmmu_parse_open(response: str) -> list:
    """MMMU ``parse_open_response``: key sub-responses (text after "could be", "so", "is",
    "thus", "therefore", "final", "answer", "result", or "=" in the last sentence), plus every
    number found in them, each normalised by :func:`mmmu_normalize_str`, de-duplicated."""
    def key_subresponses(resp: str) -> list[str]:
        resp = resp.strip().strip(".").lower()
        subs = re.split(r"\.\s(?=[A-Z])|\n", resp)
        indicators = ["could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ",
                      "result "]
        keys = []
        for i, sub in enumerate(subs):
            if i == len(subs) - 1:
                indicators.extend(["="])
            shortest = None
            for ind in indicators:
                if ind in sub:
                    tail = sub.split(ind)[-1].strip()
                    if not shortest or len(tail) < len(shortest):
                        shortest = tail
            if shortest and shortest.strip() not in (":", ",", ".", "!", "?", ";", ":", "'"):
                keys.append(shortest)
        return keys or [resp]

    keys = key_subresponses(response)
    preds: list = list(keys)
    for k in keys:
        preds.extend(mmmu_extract_numbers(k))
    normed: list = []
    for p in preds:
        normed.extend(mmmu_normalize_str(p))
    out: list = []
    for p in normed:  # official de-duplicates with set(); order-preserving here
        if p not in out:
            out.append(p)
    return out


def mmmu_eval_multi_choice(gold, pred: str) -> bool:
    """MMMU ``eval_multi_choice``: exact equality (any of a list of golds)."""
    if isinstance(gold, list):
        return any(g == pred for g in gold)
    return gold == pred


def mmmu_eval_open(gold, preds: Sequence) -> bool:
    """MMMU ``eval_open``: a string prediction is right if a normalised gold string is a
    substring of it; a numeric prediction if it equals a normalised gold number."""
    golds: list = []
    for g in (gold if isinstance(gold, list) else [gold]):
        golds.extend(mmmu_normalize_str(str(g)))
    for p in preds:
        if isinstance(p, str):
            if any(isinstance(g, str) and g in p for g in golds):
                return True
        elif p in golds:
            return True
    return False


def mmmu_summary(records: Iterable[Mapping]) -> dict:
    """Per-subject, per-domain and overall (instance-level) MMMU accuracy.

    ``records``: dicts with ``subject`` and ``correct``."""
    subj: dict[str, list[bool]] = defaultdict(list)
    for r in records:
        subj[r["subject"]].append(bool(r["correct"]))
    per_subject = {s: {"acc": sum(v) / len(v), "num_example": len(v)}
                   for s, v in sorted(subj.items())}
    per_domain = {}
    for dom, subs in MMMU_DOMAINS.items():
        vals = [c for s in subs for c in subj.get(s, [])]
        if vals:
            per_domain[dom] = {"acc": sum(vals) / len(vals), "num_example": len(vals)}
    allv = [c for v in subj.values() for c in v]
    return {"overall": sum(allv) / len(allv) if allv else 0.0, "num_example": len(allv),
            "per_subject": per_subject, "per_domain": per_domain}


# ----------------------------------------------------------------------------------------
# SEED-Bench
# ----------------------------------------------------------------------------------------

_LETTER_RE = re.compile(r"^\(?([A-D])(?:[).:,\s]|$)")


def seed_letter(text: str) -> str | None:
    """Lenient letter reading for SEED ("A", "A.", "(A) text"); used only when the benchmark
    is built with ``parse="letter"``. The official LLaVA converter compares the raw stripped
    output with the answer letter exactly (``parse="exact"``)."""
    m = _LETTER_RE.match(text.strip())
    return m.group(1) if m else None
