"""Hand-checked cases of each benchmark's official scoring rules (gmod_jax.eval.metrics)."""

import pytest

from gmod_jax.eval import metrics as M

# ------------------------------------------------------------------ VQA normalisation


@pytest.mark.parametrize("raw, expected", [
    ("Two", "2"),                      # number words -> digits
    ("ten", "10"),
    ("none", "0"),
    ("the dog", "dog"),                # articles dropped
    ("A Red Car", "red car"),
    ("yes.", "yes"),                   # trailing period stripped
    ("Yes!", "yes"),                   # "!" glued to a word -> space, then split away
    ("dont", "don't"),                 # contractions restored
    ("isnt", "isn't"),
    ("black/white", "black white"),    # punctuation not touching a space -> space
    ("hello, world", "hello world"),
    ("2.5", "2.5"),                    # period before a digit survives
    ("1,000", "1000"),                 # digit comma digit
    ("a cat's toy", "cat 's toy"),     # "'s" split off by word_tokenize
    ("what?", "what"),
    ("  new\nyork \t", "new york"),
])
def test_normalize_answer(raw, expected):
    assert M.normalize_answer(raw) == expected


def test_process_punctuation_rules():
    # a mark touching a space is deleted; otherwise replaced by a space
    assert M.process_punctuation("up - down") == "up  down"
    assert M.process_punctuation("up-down") == "up down"
    # any digit,digit comma makes every mark be deleted
    assert M.process_punctuation("1,000-2") == "10002"
    assert M.process_digit_article("The Two Dogs") == "2 dogs"


def _gts(match, n_match, other="cat"):
    return [match] * n_match + [other] * (10 - n_match)


@pytest.mark.parametrize("n_match, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9),
                                               (4, 1.0), (10, 1.0)])
def test_vqa_leave_one_out_rule(n_match, expected):
    # 2 humans: 8 subsets see 2 matches (2/3), 2 subsets see 1 (1/3): (16/3 + 2/3)/10 = 0.6
    gts = _gts("dog", n_match)
    assert M.vqa_score_textvqa("dog", gts) == pytest.approx(expected)
    assert M.vqa_score_official("dog", gts) == pytest.approx(expected)


def test_vqa_normalisation_applies_before_matching():
    assert M.vqa_score_textvqa("Two.", _gts("2", 3)) == pytest.approx(0.9)
    assert M.vqa_score_textvqa("The Dog", _gts("dog", 10)) == 1.0
    # vqaEval 2021: the prediction is normalised only when the humans disagree
    assert M.vqa_score_official("Two", ["2"] * 9 + ["3"]) == 1.0
    assert M.vqa_score_official("Two", ["2"] * 10) == 0.0


def test_vqa_official_gt_processing_quirk():
    # vqaEval.py punctuation-processes human answers only when they disagree
    assert M.vqa_score_official("yes", ["yes."] * 3 + ["no"] * 7) == pytest.approx(0.9)
    assert M.vqa_score_official("yes", ["yes."] * 10) == 0.0
    # the TextVQA (m4c) evaluator normalises every human answer
    assert M.vqa_score_textvqa("yes", ["yes."] * 10) == 1.0


def test_vqa_accuracy_mean():
    gts = [_gts("dog", 2), _gts("dog", 4, other="bird")]
    assert M.vqa_accuracy(["dog", "cat"], gts, rule="textvqa") == pytest.approx((0.6 + 0.0) / 2)
    assert M.vqa_accuracy(["dog", "bird"], gts, rule="vqa") == pytest.approx((0.6 + 1.0) / 2)


# ------------------------------------------------------------------ GQA


def test_gqa_normalisation():
    assert M.gqa_normalize("Yes.") == "yes"
    assert M.gqa_correct("Left.", "left")
    assert M.gqa_correct("YES", "yes")
    assert not M.gqa_correct("the left", "left")  # no article removal in GQA


# ------------------------------------------------------------------ ScienceQA


@pytest.mark.parametrize("text, rule, letter", [
    ("A", "llava", "A"),
    ("B. because it is red", "llava", "B"),
    ("The answer is C.", "llava", "C"),
    ("Reasoning... The answer is D.", "llava", "D"),
    ("The answer is C", "llava", "FAILED"),        # regex needs a character after the letter
    ("A.", "llava", "FAILED"),                     # too short for the "X. " rule
    ("A.", "llava_hr", "FAILED"),
    ("The answer is A. The answer is B.", "llava", "FAILED"),  # two matches
    ("Apple", "llava", "FAILED"),
    ("Apple", "llava_hr", "A"),                    # LLaVA-HR: first char of a >=3 char reply
    ("B) red", "llava_hr", "B"),
    ("E", "llava", "E"),
    ("", "llava", "FAILED"),
])
def test_sqa_parse(text, rule, letter):
    assert M.sqa_parse_letter(text, rule) == letter


def test_sqa_pred_index_failed_is_wrong_not_random():
    assert M.sqa_pred_index("C", 3) == 2
    assert M.sqa_pred_index("D", 3) == -1        # beyond this question's choices
    assert M.sqa_pred_index("garbage", 4) == -1  # FAILED -> -1 every time
    assert {M.sqa_pred_index("xx", 2) for _ in range(20)} == {-1}


# ------------------------------------------------------------------ POPE


@pytest.mark.parametrize("text, parsed", [
    ("Yes", "yes"),
    ("Yes, there is a dog.", "yes"),
    ("No", "no"),
    ("No.", "no"),
    ("There is no dog in the image.", "no"),
    ("I do not see one", "no"),
    ("Yes. No.", "yes"),          # only the first sentence counts
    ("NO", "yes"),                # case-sensitive word match, as officially
    ("Nope", "yes"),
    ("", "yes"),
])
def test_pope_parse(text, parsed):
    assert M.pope_parse(text) == parsed


def test_binary_metrics_known_confusion_matrix():
    labels = ["yes", "yes", "yes", "yes", "no", "no", "no", "no"]
    preds = ["yes", "yes", "yes", "no", "yes", "yes", "no", "no"]  # TP3 FN1 FP2 TN2
    m = M.binary_metrics(preds, labels)
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (3, 1, 2, 2)
    assert m["accuracy"] == pytest.approx(5 / 8)
    assert m["precision"] == pytest.approx(3 / 5)
    assert m["recall"] == pytest.approx(3 / 4)
    assert m["f1"] == pytest.approx(2 * 0.6 * 0.75 / (0.6 + 0.75))
    assert m["yes_ratio"] == pytest.approx(5 / 8)


def test_binary_metrics_no_positive_predictions():
    m = M.binary_metrics(["no", "no"], ["yes", "no"])
    assert m["precision"] == 0.0 and m["f1"] == 0.0 and m["accuracy"] == 0.5


# ------------------------------------------------------------------ MME


@pytest.mark.parametrize("text, parsed", [
    ("Yes", "yes"), ("no", "no"), ("No, it is not.", "no"), ("yes, it is", "yes"),
    ("The answer is yes", "other"), ("Not sure", "no"), ("yesterday", "yes"),
    ("unknown", "other"), (" Yes \n", "yes"),
])
def test_mme_parse(text, parsed):
    assert M.mme_parse(text) == parsed


def test_mme_acc_plus_example():
    recs = [
        {"subtask": "existence", "image": "1.jpg", "gt": "Yes", "pred": "Yes"},
        {"subtask": "existence", "image": "1.jpg", "gt": "No", "pred": "No"},
        {"subtask": "existence", "image": "2.jpg", "gt": "Yes", "pred": "Yes"},
        {"subtask": "existence", "image": "2.jpg", "gt": "No", "pred": "Yes"},
        {"subtask": "code_reasoning", "image": "3.png", "gt": "Yes", "pred": "maybe"},
        {"subtask": "code_reasoning", "image": "3.png", "gt": "No", "pred": "No"},
    ]
    s = M.mme_scores(recs)
    ex = s["subtasks"]["existence"]
    assert ex["acc"] == pytest.approx(75.0)        # 3 of 4 questions
    assert ex["acc_plus"] == pytest.approx(50.0)   # 1 of 2 images fully right
    assert ex["score"] == pytest.approx(125.0)
    code = s["subtasks"]["code_reasoning"]
    assert (code["acc"], code["acc_plus"], code["other_num"]) == (50.0, 0.0, 1)
    assert s["perception"] == pytest.approx(125.0)
    assert s["cognition"] == pytest.approx(50.0)
    assert "count" in s["missing_subtasks"]


def test_mme_rejects_non_yes_no_ground_truth():
    with pytest.raises(ValueError):
        M.mme_scores([{"subtask": "OCR", "image": "a", "gt": "maybe", "pred": "yes"}])


# ------------------------------------------------------------------ MMBench

CHOICES = {"A": "red", "B": "green", "C": "blue", "D": "yellow"}


@pytest.mark.parametrize("text, letter", [
    ("B", "B"),
    ("The answer is (C).", "C"),
    ("C. blue", "C"),
    ("A and B", None),                         # two letters: ambiguous
    ("I think it is green", "B"),              # falls back to option text
    ("green or blue", None),                   # two texts: ambiguous
    ("Z", "Z"),
    ("Cannot determine the answer", "Z"),
    ("", None),
])
def test_mmbench_parse(text, letter):
    assert M.mmbench_parse(text, CHOICES) == letter


def test_mmbench_a_quantifier_guard():
    assert M.mmbench_parse("It is A here", CHOICES) == "A"
    assert M.mmbench_parse("It is A here", CHOICES, a_quantifier_guard=True) is None
    # the letter must be among the last four words (VLMEvalKit c3371551 onwards)
    assert M.mmbench_parse("A car is shown here", CHOICES) is None


def test_mmbench_circular_one_wrong_shift_fails_question():
    recs = [{"group": 1, "correct": True, "category": "x"} for _ in range(4)]
    recs += [{"group": 2, "correct": c, "category": "y"} for c in (True, True, False, True)]
    res = M.mmbench_circular(recs)
    assert res["circular_accuracy"] == 0.5
    assert res["vanilla_accuracy"] == pytest.approx(7 / 8)
    assert res["per_category"] == {"x": 1.0, "y": 0.0}
    assert res["n_questions"] == 2 and res["n_variants"] == 8


# ------------------------------------------------------------------ MMMU

IDX2ANS = {"A": "red", "B": "green", "C": "blue", "D": "yellow"}
LETTERS = ["A", "B", "C", "D"]


@pytest.mark.parametrize("text, letter", [
    ("(B)", "B"),
    ("B", "B"),
    ("B.", "B"),
    ("The answer is B", "B"),
    ("Answer: C", "C"),
    ("(A) is wrong, so the answer is (D)", "D"),   # several: last occurrence wins
    ("I am quite sure that it is the green one", "B"),  # >5 words: option content
    ("it is green", None),                         # <=5 words, no letter: random
])
def test_mmmu_parse_multi_choice(text, letter):
    got = M.mmmu_parse_multi_choice(text, LETTERS, IDX2ANS, M.mmmu_rng(42))
    if letter is None:
        assert got in LETTERS
    else:
        assert got == letter


def test_mmmu_random_fallback_draws_from_one_seeded_stream():
    rng = M.mmmu_rng()
    picks = [M.mmmu_parse_multi_choice("???", LETTERS, IDX2ANS, rng) for _ in range(8)]
    ref = M.mmmu_rng(42)
    assert picks == [ref.choice(LETTERS) for _ in range(8)]
    assert len(set(picks)) > 1  # successive unparsable replies get successive draws


def test_mmmu_parse_open_numbers_and_strings():
    assert M.mmmu_parse_open("The answer is 3.5") == [3.5]
    assert M.mmmu_eval_open("3.50", M.mmmu_parse_open("The answer is 3.5"))
    assert M.mmmu_eval_open("1000", M.mmmu_parse_open("1,000"))
    assert M.mmmu_eval_open("42", M.mmmu_parse_open("x = 40 + 2 = 42"))
    assert not M.mmmu_eval_open("41", M.mmmu_parse_open("42"))
    assert M.mmmu_eval_open("Paris", M.mmmu_parse_open("Paris"))
    assert M.mmmu_eval_open(["paris", "Lyon"], M.mmmu_parse_open("Lyon"))
    # single characters are padded to avoid trivial substring matches
    assert M.mmmu_normalize_str("a") == [" a", "a "]
    assert M.mmmu_eval_open("a", M.mmmu_parse_open("a"))
    assert not M.mmmu_eval_open("a", M.mmmu_parse_open("banana"))


def test_mmmu_extract_numbers():
    # the official three regexes overlap; their pieces are kept (harmless for eval_open)
    assert M.mmmu_extract_numbers("cost 1,234 and 2.5e3 or -7") == [
        "1,234", "2.5e3", "234", "2", "3", "-7"]
    assert M.mmmu_extract_numbers("x is 12.75") == ["12.75"]


def test_mmmu_eval_multi_choice_and_summary():
    assert M.mmmu_eval_multi_choice("B", "B")
    assert M.mmmu_eval_multi_choice(["A", "B"], "B")
    assert not M.mmmu_eval_multi_choice("A", "B")
    s = M.mmmu_summary([{"subject": "Art", "correct": True},
                        {"subject": "Art", "correct": False},
                        {"subject": "Math", "correct": True}])
    assert s["overall"] == pytest.approx(2 / 3)
    assert s["per_subject"]["Art"] == {"acc": 0.5, "num_example": 2}
    assert s["per_domain"]["Art and Design"]["acc"] == 0.5
    assert s["per_domain"]["Science"]["acc"] == 1.0


# ------------------------------------------------------------------ SEED


def test_seed_letter():
    assert M.seed_letter("A") == "A"
    assert M.seed_letter("B.") == "B"
    assert M.seed_letter("(C) blue") == "C"
    assert M.seed_letter("Dog") is None
