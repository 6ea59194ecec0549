"""Tiny benchmark file sets in each benchmark's real on-disk format, with Pillow images.

``write_benchmark_files(name, out_dir, n=4)`` writes the files LLaVA's evaluation reads
(question JSONL / JSON / TSV, annotation files, image folders) for ``n`` questions and
returns the keyword arguments of the matching :mod:`gmod_jax.eval.benchmarks` class, so
``load_benchmark(name, **write_benchmark_files(name, d))`` works. Questions are simple
"what colour / which shape" questions about the drawn image, so a model trained on the
embedded synthetic dataset has a chance, and ground truths are known exactly.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import random
from pathlib import Path

from gmod_jax.eval.benchmarks import (LETTER_ANSWER_SUFFIX, MMBENCH_COPY_OFFSET,
                                      POPE_CATEGORIES, SHORT_ANSWER_SUFFIX)
from gmod_jax.eval.metrics import MME_COGNITION, MME_PERCEPTION

COLORS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (30, 60, 220),
          "yellow": (230, 210, 30), "black": (10, 10, 10), "white": (245, 245, 245)}
SHAPES = ("square", "circle", "triangle")
OBJECTS = ("dog", "car", "chair", "cup", "bird", "clock")


def _image(color: str, shape: str, size: int = 48, text: str | None = None):
    from PIL import Image, ImageDraw

    bg = (128, 128, 128)
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    box = (size // 6, size // 6, size - size // 6, size - size // 6)
    fill = COLORS[color]
    if shape == "square":
        d.rectangle(box, fill=fill)
    elif shape == "circle":
        d.ellipse(box, fill=fill)
    else:
        d.polygon([(size // 2, box[1]), (box[2], box[3]), (box[0], box[3])], fill=fill)
    if text:
        d.text((2, 2), text, fill=(0, 0, 0))
    return img


def _save(img, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def _png_bytes(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _jsonl(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path


def _json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1), encoding="utf-8")
    return path


def _pick(rng: random.Random):
    return rng.choice(list(COLORS)), rng.choice(SHAPES)


def _others(rng, pool, keep, k):
    rest = [x for x in pool if x != keep]
    rng.shuffle(rest)
    return rest[:k]


# ----------------------------------------------------------------------------------------


def _gqa(out: Path, n: int, rng: random.Random) -> dict:
    imgs = out / "images"
    questions, ann = [], {}
    for i in range(n):
        color, shape = _pick(rng)
        image_id = f"n{100000 + i}"
        _save(_image(color, shape), imgs / f"{image_id}.jpg")
        qid = str(20000000 + i)
        if i % 2 == 0:
            q, a = f"What color is the {shape}?", color
            types = {"detailed": "color", "semantic": "attr", "structural": "query"}
        else:
            asked = rng.choice(list(COLORS))
            q, a = f"Is the {shape} {asked}?", "yes" if asked == color else "no"
            types = {"detailed": "verifyAttr", "semantic": "attr", "structural": "verify"}
        questions.append({"question_id": qid, "image": f"{image_id}.jpg",
                          "text": f"{q}\n{SHORT_ANSWER_SUFFIX}", "category": "default"})
        ann[qid] = {"question": q, "imageId": image_id, "answer": a,
                    "fullAnswer": f"The answer is {a}.", "isBalanced": True,
                    "groups": {"global": None, "local": f"{i}-{shape}"}, "types": types,
                    "semantic": [{"operation": "select", "argument": shape, "dependencies": []}],
                    "entailed": [], "equivalent": [qid]}
    return {"question_file": _jsonl(out / "llava_gqa_testdev_balanced.jsonl", questions),
            "annotation_file": _json(out / "testdev_balanced_questions.json", ann),
            "image_root": imgs}


def _sqa(out: Path, n: int, rng: random.Random) -> dict:
    from gmod_jax.eval.benchmarks import sqa_cqm_prompt

    imgs = out / "images" / "test"
    problems, llava = {}, []
    pids = [str(100 + i) for i in range(n)]
    for i, pid in enumerate(pids):
        color, shape = _pick(rng)
        has_image = not (i == n - 1 and n > 1)  # the last one is text-only
        k = 2 + i % 3  # 2..4 choices
        if has_image:
            choices = [color] + _others(rng, list(COLORS), color, k - 1)
            question = f"What color is the {shape}?"
        else:
            choices = ["4", "5", "6", "3"][:k]
            question = "What is two plus two?"
        rng.shuffle(choices)
        answer = choices.index(color if has_image else "4")
        problems[pid] = {"question": question, "choices": choices, "answer": answer,
                         "hint": "" if i % 2 else "Look at the picture.",
                         "image": "image.png" if has_image else None, "task": "closed choice",
                         "grade": "grade1", "subject": "natural science", "topic": "colors",
                         "category": "Colors", "skill": "Identify colors", "lecture": "",
                         "solution": "", "split": "test"}
        if has_image:
            _save(_image(color, shape), imgs / pid / "image.png")
        entry = {"id": pid, "conversations": [
            {"from": "human",
             "value": sqa_cqm_prompt(problems[pid]) + ("\n<image>" if has_image else "")},
            {"from": "gpt", "value": f"The answer is {'ABCDE'[answer]}."}]}
        if has_image:
            entry["image"] = f"{pid}/image.png"
        llava.append(entry)
    return {"problems_file": _json(out / "problems.json", problems),
            "pid_splits_file": _json(out / "pid_splits.json",
                                     {"train": [], "val": [], "test": pids, "minival": []}),
            "question_file": _json(out / "llava_test_CQM-A.json", llava),
            "image_root": imgs}


def _textvqa(out: Path, n: int, rng: random.Random) -> dict:
    imgs = out / "train_images"
    words = ["stop", "open", "exit", "sale", "taxi", "bus"]
    data, questions = [], []
    image_id = None
    for i in range(n):
        if i % 2 == 0:  # two questions per image, as in TextVQA (LLaVA id = image id)
            word = rng.choice(words)
            color, shape = _pick(rng)
            image_id = f"{0xa000 + i:08x}"
            _save(_image(color, shape, size=64, text=word.upper()), imgs / f"{image_id}.jpg")
            q, gts = "what does the sign say?", [word] * 7 + [word + " sign"] * 2 + ["no"]
        else:
            q, gts = "what color is the shape?", [color] * 9 + ["gray"]
        data.append({"question": q, "image_id": image_id, "image_classes": ["sign"],
                     "flickr_original_url": "", "flickr_300k_url": "", "image_width": 64,
                     "image_height": 64, "answers": gts, "question_tokens": q.split(),
                     "question_id": 34600 + i, "set_name": "val"})
        questions.append({"question_id": image_id, "image": f"{image_id}.jpg",
                          "text": f"{q.capitalize()}\nReference OCR token: {word.upper()}\n"
                                  f"{SHORT_ANSWER_SUFFIX}"})
    ann = {"dataset_type": "val", "dataset_name": "textvqa", "dataset_version": "0.5.1",
           "data": data}
    return {"question_file": _jsonl(out / "llava_textvqa_val_v051_ocr.jsonl", questions),
            "annotation_file": _json(out / "TextVQA_0.5.1_val.json", ann),
            "image_root": imgs}


def _pope(out: Path, n: int, rng: random.Random) -> dict:
    imgs = out / "val2014"
    ann_dir = out / "coco"
    questions = []
    gid = 0
    for cat in POPE_CATEGORIES:
        lines = []
        for i in range(n):
            name = f"COCO_val2014_{rng.randrange(10**11):012d}.jpg"
            color, shape = _pick(rng)
            _save(_image(color, shape), imgs / name)
            obj = OBJECTS[(i + len(cat)) % len(OBJECTS)]
            q = f"Is there a {obj} in the image?"
            lines.append({"question_id": i + 1, "image": name, "text": q,
                          "label": "yes" if i % 2 == 0 else "no"})
            gid += 1
            questions.append({"question_id": gid, "image": name,
                              "text": f"{q}\n{SHORT_ANSWER_SUFFIX}", "category": cat})
        _jsonl(ann_dir / f"coco_pope_{cat}.json", lines)
    return {"question_file": _jsonl(out / "llava_pope_test.jsonl", questions),
            "annotation_dir": ann_dir, "image_root": imgs}


MME_NESTED = ("artwork", "celebrity", "landmark", "posters", "scene")


def _mme(out: Path, n: int, rng: random.Random) -> dict:
    root = out / "MME_Benchmark_release_version"
    per_task = max(1, n // 4)
    questions = []
    for task in MME_PERCEPTION + MME_COGNITION:
        for j in range(per_task):
            color, shape = _pick(rng)
            wrong = _others(rng, list(COLORS), color, 1)[0]
            stem = f"{j:04d}"
            q_yes = f"Is there a {color} {shape} in this image? Please answer yes or no."
            q_no = f"Is there a {wrong} {shape} in this image? Please answer yes or no."
            if task in MME_NESTED:
                img_rel = f"{task}/images/{stem}.png"
                qa = root / task / "questions_answers_YN" / f"{stem}.txt"
            else:
                img_rel = f"{task}/{stem}.png"
                qa = root / task / f"{stem}.txt"
            _save(_image(color, shape), root / img_rel)
            qa.parent.mkdir(parents=True, exist_ok=True)
            qa.write_text(f"{q_yes}\tYes\n{q_no}\tNo\n", encoding="utf-8")
            for q in (q_yes, q_no):
                questions.append({"question_id": f"{task}/{stem}.png", "image": img_rel,
                                  "text": f"{q}\n{SHORT_ANSWER_SUFFIX}", "category": task})
    return {"question_file": _jsonl(out / "llava_mme.jsonl", questions), "gt_dir": root,
            "image_root": root}


MMBENCH_COLUMNS = ("index", "question", "hint", "A", "B", "C", "D", "answer", "category",
                   "image", "source", "l2-category", "comment", "split")


def _mmbench(out: Path, n: int, rng: random.Random, copies: bool = False) -> dict:
    rows = []
    for i in range(n):
        color, shape = _pick(rng)
        k = 4 if i % 3 else 3
        options = [color] + _others(rng, list(COLORS), color, k - 1)
        rng.shuffle(options)
        img64 = base64.b64encode(_png_bytes(_image(color, shape))).decode("ascii")
        row = {"index": i, "question": f"What color is the {shape}?",
               "hint": "The background is gray." if i % 2 else "",
               "answer": "ABCD"[options.index(color)],
               "category": "attribute_recognition" if i % 2 else "object_localization",
               "image": img64, "source": "synthetic",
               "l2-category": "Attribute Reasoning" if i % 2 else "Fine-grained Perception",
               "comment": "", "split": "dev"}
        for j, letter in enumerate("ABCD"):
            row[letter] = options[j] if j < k else ""
        rows.append(row)
        if copies:  # MMBench's circular copies: index + c*1e6, options shifted by c
            for c in range(1, k):
                sh = options[c:] + options[:c]
                cp = dict(row, index=i + c * MMBENCH_COPY_OFFSET, answer="ABCD"[sh.index(color)])
                for j, letter in enumerate("ABCD"):
                    cp[letter] = sh[j] if j < k else ""
                rows.append(cp)
    path = out / "mmbench_dev_20230712.tsv"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=MMBENCH_COLUMNS, delimiter="\t", lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    return {"tsv_file": path}


def _mmmu(out: Path, n: int, rng: random.Random) -> dict:
    imgs = out / "images"
    subjects = ("Art", "Math", "Physics", "Biology", "Computer_Science", "History")
    recs = []
    for i in range(n):
        subject = subjects[i % len(subjects)]
        color, shape = _pick(rng)
        name = f"validation_{subject}_{i + 1}_1.png"
        _save(_image(color, shape), imgs / name)
        rec = {"id": f"validation_{subject}_{i + 1}", "subfield": subject,
               "img_type": "['Diagrams']", "topic_difficulty": "Easy",
               "explanation": "", "image_1": name}
        if i % 3 == 2:  # open question with a numeric answer
            sides = {"square": 4, "triangle": 3, "circle": 0}[shape]
            rec.update(question=f"<image 1> How many corners does the {shape} have?",
                       options="[]", answer=str(sides), question_type="open")
        else:
            options = [color] + _others(rng, list(COLORS), color, 3)
            rng.shuffle(options)
            rec.update(question=f"What color is the {shape} in <image 1>?",
                       options=str(options) if i % 2 else options,
                       answer="ABCD"[options.index(color)], question_type="multiple-choice")
        recs.append(rec)
    if n >= 2:  # options are images: γ-MoD answers these at random without the model
        names = [f"opt_{j}.png" for j in range(3)]
        for j, nm in enumerate(names):
            _save(_image(list(COLORS)[j], "square"), imgs / nm)
        recs.append({"id": f"validation_Design_{n + 1}", "subfield": "Design",
                     "question": "Which option shows a red square?",
                     "options": str([f"<img='{nm}'>" for nm in names]),
                     # the first pick of MMMU's seed-42 stream (the oracle answers parse,
                     # so nothing draws before it): oracle answers score 100%
                     "answer": random.Random(42).choice("ABC"),
                     "question_type": "multiple-choice", "image_1": names[0],
                     "img_type": "['Diagrams']", "explanation": ""})
    return {"data_file": _json(out / "mmmu_validation.json", recs), "image_root": imgs}


SEED_TYPES = {"Scene Understanding": 1, "Instance Identity": 2, "Instance Attributes": 3,
              "Instance Location": 4, "Instances Counting": 5, "Spatial Relation": 6,
              "Instance Interaction": 7, "Visual Reasoning": 8, "Text Understanding": 9,
              "Action Recognition": 10, "Action Prediction": 11, "Procedure Understanding": 12}


def _seed(out: Path, n: int, rng: random.Random) -> dict:
    questions, lines = [], []
    for i in range(n + 1):
        is_video = i == n  # one video question, dropped by image-only evaluation
        color, shape = _pick(rng)
        options = [color] + _others(rng, list(COLORS), color, 3)
        rng.shuffle(options)
        data_id = f"{1000 + i}_{rng.randrange(10**9)}"
        rel = (f"SEED-Bench-video-image/{data_id}.png" if is_video
               else f"SEED-Bench-image/{data_id}.jpg")
        _save(_image(color, shape), out / rel)
        qid = str(101669 + i)
        q = f"What color is the {shape}?"
        tid = 10 if is_video else 1 + i % 9
        questions.append({"answer": "ABCD"[options.index(color)], "choice_a": options[0],
                          "choice_b": options[1], "choice_c": options[2],
                          "choice_d": options[3], "data_id": data_id,
                          "data_type": "video" if is_video else "image", "question": q,
                          "question_id": qid, "question_type_id": tid})
        lines.append({"image": rel, "text": f"{q}\nA. {options[0]}\nB. {options[1]}\n"
                                            f"C. {options[2]}\nD. {options[3]}\n"
                                            f"{LETTER_ANSWER_SUFFIX}",
                      "category": [k for k, v in SEED_TYPES.items() if v == tid][0],
                      "question_id": int(qid)})  # LLaVA's file: int, SEED's: str
    return {"question_file": _jsonl(out / "llava-seed-bench.jsonl", lines),
            "annotation_file": _json(out / "SEED-Bench.json",
                                     {"question_type": SEED_TYPES, "questions": questions}),
            "image_root": out}


def _vqav2(out: Path, n: int, rng: random.Random) -> dict:
    imgs = out / "test2015"
    dev, full, anns = [], [], []
    for i in range(n + 2):
        color, shape = _pick(rng)
        image_id = 393225 + i
        name = f"COCO_test2015_{image_id:012d}.jpg"
        qid = image_id * 1000
        q = f"How many {shape}s are there?" if i % 2 else f"What color is the {shape}?"
        a = "1" if i % 2 else color  # VQA annotations store numbers as digits
        line = {"question_id": qid, "image": name, "text": f"{q}\n{SHORT_ANSWER_SUFFIX}",
                "category": "default"}
        full.append(line)
        if i < n:  # the last two are test-std only: in the submission with ""
            _save(_image(color, shape), imgs / name)
            dev.append(line)
            humans = [a] * 8 + ["2" if i % 2 else "gray", "dont know"]
            anns.append({"question_id": qid, "image_id": image_id,
                         "question_type": "how many" if i % 2 else "what color is the",
                         "answer_type": "number" if i % 2 else "other",
                         "multiple_choice_answer": a,
                         "answers": [{"answer": h, "answer_confidence": "yes",
                                      "answer_id": k + 1} for k, h in enumerate(humans)]})
    return {"question_file": _jsonl(out / "llava_vqav2_mscoco_test-dev2015.jsonl", dev),
            "test_split_file": _jsonl(out / "llava_vqav2_mscoco_test2015.jsonl", full),
            "annotation_file": _json(out / "v2_mscoco_synthetic_annotations.json",
                                     {"annotations": anns}),
            "image_root": imgs}


def _vizwiz(out: Path, n: int, rng: random.Random) -> dict:
    imgs = out / "test"
    lines, anns = [], []
    for i in range(n):
        color, shape = _pick(rng)
        name = f"VizWiz_test_{i:08d}.jpg"
        _save(_image(color, shape), imgs / name)
        q = f"What color is this {shape}?"
        lines.append({"question_id": i, "image": name,
                      "text": f"{q}\nWhen the provided information is insufficient, respond "
                              f"with 'Unanswerable'.\n{SHORT_ANSWER_SUFFIX}"})
        gts = ["unanswerable"] * 10 if i % 4 == 3 else [color] * 6 + ["gray"] * 4
        anns.append({"image": name, "question": q, "answerable": int(i % 4 != 3),
                     "answer_type": "unanswerable" if i % 4 == 3 else "other",
                     "answers": [{"answer": g, "answer_confidence": "yes"} for g in gts]})
    return {"question_file": _jsonl(out / "llava_test.jsonl", lines),
            "annotation_file": _json(out / "val_synthetic.json", anns),
            "image_root": imgs}


WRITERS = {"gqa": _gqa, "sqa": _sqa, "textvqa": _textvqa, "pope": _pope, "mme": _mme,
           "mmbench": _mmbench, "mmmu": _mmmu, "seed": _seed, "vqav2": _vqav2,
           "vizwiz": _vizwiz}


def write_benchmark_files(name: str, out_dir, n: int = 4, seed: int = 0, **options) -> dict:
    """Write a small ``name`` benchmark under ``out_dir``; return the benchmark's constructor
    keyword arguments (file paths as :class:`Path`).

    ``n`` is the number of questions (POPE: per category; MME: ``max(1, n // 4)`` images of
    two questions for each of the 14 subtasks). ``options``: ``copies=True`` for MMBench
    writes the circular shifted copies into the TSV (indices + k*1e6)."""
    from gmod_jax.eval.benchmarks import ALIASES

    key = ALIASES.get(name.lower(), name.lower())
    if key not in WRITERS:
        raise KeyError(f"unknown benchmark {name!r}; known: {sorted(WRITERS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return WRITERS[key](out, n, random.Random(f"{key}:{seed}"), **options)
