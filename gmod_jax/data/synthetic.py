"""Procedurally generated image-question-answer data in LLaVA's JSON format.

Scenes of coloured shapes on a grid, drawn with Pillow; questions about colour, count,
presence and position with answers that follow from the scene (one word, or the subject then
the word: `answer_style`), captions for the stage-1 `plain` template, and a few text-only
samples (as LLaVA-665K mixes in ShareGPT). Every sample is a pure function of (seed, split,
index), so datasets are reproducible and the held-out split never overlaps the training stream.
The files are ordinary LLaVA data: the same loaders, tokenizer, TFDS builder and pipeline run on
them as on LLaVA-665K.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from gmod_jax.data.templates import VICUNA_V1

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 210, 20),
    "purple": (140, 50, 180),
    "orange": (250, 130, 20),
}
SHAPES = ("circle", "square", "triangle", "star")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SPLIT_CODES = {"train": 0, "eval": 1}
CAPTION_PROMPT = "Describe the image briefly."
_SIZE_RADIUS = {"small": 0.28, "large": 0.42}  # shape radius as a share of the grid cell
SIZES = tuple(_SIZE_RADIUS)


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    image_size: int = 56
    grid: int = 3  # scenes place at most one shape per cell of a grid x grid layout
    min_objects: int = 1
    max_objects: int = 4
    shapes: tuple[str, ...] = SHAPES
    colors: tuple[str, ...] = tuple(COLORS)
    max_turns: int = 3  # question-answer turns per image
    # At least this many turns drawn (a turn whose kind has no question left is dropped): batches
    # pad to a fixed length, so a conversation of fewer turns leaves its padding unused.
    min_turns: int = 1
    text_only_fraction: float = 0.05
    question_suffix: str = ""  # e.g. "\nAnswer the question using a single word or phrase."
    # Caption group order: "reading" (by each group's first shape, rows then columns), "colour"
    # (by colour, then shape, in the order of `colors` / `shapes`) or "shape" (by shape, then
    # colour). Writing a caption in colour (shape) order means finding the image tokens of one
    # colour (shape) at a time: the look-up the caption stage practises.
    caption_order: str = "reading"
    # "word": single-word answers ("yes"). "key": the answer first names what the question is
    # about ("red circle: yes", "circles: two", "top: square"), so the answer word is predicted
    # right after the words it depends on.
    answer_style: str = "word"
    # Captions also say where each group of equal shapes lies when its members agree ("a red circle
    # at the top left", "two blue squares on the right"): stage 1 then teaches reading positions.
    caption_positions: bool = False
    # "which": "Which shape is at the top?" (the top-most shape, when one is). "where": "Is the red
    # circle at the top or the bottom?" for each unique (colour, shape), as the left/right question.
    vertical_question: str = "which"
    # Captions start with the count of each shape present ("Two circles and one square. A red
    # ..."): counting a shape across colours is practised in every caption, not only in its share
    # of the questions.
    caption_shape_counts: bool = False
    # Captions start with a tally of every shape in `shapes`, zeros included, worded as the shape
    # count questions' "key" answers ("Circles: two, squares: zero, triangles: one. A red ..."):
    # each count is predicted right after its shape word, so every caption practises the look-up
    # by shape that counting a shape across colours needs. `caption_shape_counts` names the count
    # before the shape, and the count of whichever shape comes first is a harder prediction.
    caption_shape_tally: bool = False
    # The tally's order: "shapes" (the order of `shapes`) or "random" (drawn per scene, apart
    # from the scene's own draws, so scenes and questions stay those of "shapes"). In a fixed
    # order the shape that follows "circles: two," is known without the question, and a model
    # can answer a shape count naming the tally's next shape instead of the asked one.
    caption_tally_order: str = "shapes"
    # > 0: each image scene also records `patch_objects`, a patch_grid x patch_grid boolean map
    # (reading order rows) of which square patches of the drawn image hold any object pixel (True)
    # and which are pure background (False). Set it to the vision tower's patches per side, so
    # routing can be scored per image token (background skipped vs objects kept). 0: not recorded.
    patch_grid: int = 0

    def __post_init__(self):
        if not 1 <= self.min_objects <= self.max_objects <= self.grid * self.grid:
            raise ValueError("need 1 <= min_objects <= max_objects <= grid*grid")
        if not 1 <= self.min_turns <= self.max_turns:
            raise ValueError(f"need 1 <= min_turns <= max_turns, got {self.min_turns}, {self.max_turns}")
        if self.max_objects > len(NUMBER_WORDS) - 1:
            raise ValueError("max_objects too large for number words")
        unknown = [c for c in self.colors if c not in COLORS] + [s for s in self.shapes if s not in SHAPES]
        if unknown:
            raise ValueError(f"unknown colours/shapes {unknown}")
        if self.image_size < 8 * self.grid:
            raise ValueError("image_size too small for the grid")
        if self.caption_order not in ("reading", "colour", "shape"):
            raise ValueError(f"caption_order must be 'reading', 'colour' or 'shape', got {self.caption_order!r}")
        if self.caption_tally_order not in ("shapes", "random"):
            raise ValueError(f"caption_tally_order must be 'shapes' or 'random', got {self.caption_tally_order!r}")
        if self.answer_style not in ("word", "key"):
            raise ValueError(f"answer_style must be 'word' or 'key', got {self.answer_style!r}")
        if self.vertical_question not in ("which", "where"):
            raise ValueError(f"vertical_question must be 'which' or 'where', got {self.vertical_question!r}")
        if self.patch_grid < 0 or (self.patch_grid and self.image_size % self.patch_grid):
            raise ValueError(f"patch_grid must be 0 or divide image_size {self.image_size}, got {self.patch_grid}")


def _rng(seed: int, split: str, index: int, *stream: int) -> np.random.Generator:
    """The sample's generator; a `stream` number gives an independent one for the same sample."""
    return np.random.default_rng([seed, SPLIT_CODES[split], index, *stream])


def make_scene(rng: np.random.Generator, config: SyntheticConfig) -> dict[str, Any]:
    """Objects with shape, colour, size, grid cell and pixel centre/radius."""
    cell = config.image_size / config.grid
    n = int(rng.integers(config.min_objects, config.max_objects + 1))
    cells = rng.choice(config.grid * config.grid, size=n, replace=False)
    objects = []
    for c in sorted(int(c) for c in cells):
        row, col = divmod(c, config.grid)
        size = str(rng.choice(list(_SIZE_RADIUS)))
        radius = _SIZE_RADIUS[size] * cell
        slack = max(0.0, cell / 2 - radius - 1)
        cx = (col + 0.5) * cell + rng.uniform(-slack, slack)
        cy = (row + 0.5) * cell + rng.uniform(-slack, slack)
        objects.append({
            "shape": str(rng.choice(config.shapes)),
            "color": str(rng.choice(config.colors)),
            "size": size,
            "row": row, "col": col,
            "cx": round(float(cx), 2), "cy": round(float(cy), 2), "r": round(float(radius), 2),
        })
    background = tuple(int(v) for v in rng.integers(225, 256, size=3))
    return {"image_size": config.image_size, "grid": config.grid, "background": list(background), "objects": objects}


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "triangle":  # centroid at (cx, cy)
        angles = [-90, 30, 150]
        return [(cx + r * math.cos(math.radians(a)), cy + r * math.sin(math.radians(a))) for a in angles]
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else 0.45 * r
            a = math.radians(-90 + 36 * k)
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        return pts
    raise ValueError(shape)


def render_scene(scene: dict[str, Any]) -> Image.Image:
    size = scene["image_size"]
    img = Image.new("RGB", (size, size), tuple(scene["background"]))
    draw = ImageDraw.Draw(img)
    for obj in scene["objects"]:
        cx, cy, r = obj["cx"], obj["cy"], obj["r"]
        fill = COLORS[obj["color"]]
        if obj["shape"] == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif obj["shape"] == "square":
            s = r * 0.85
            draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
        else:
            draw.polygon(_polygon(obj["shape"], cx, cy, r), fill=fill)
    return img


def patch_object_map(scene: dict[str, Any], patch_grid: int, image: Image.Image | None = None) -> np.ndarray:
    """bool [patch_grid, patch_grid]: True where the patch holds at least one pixel drawn in an
    object's colour, False where every pixel is the scene's background. Read from the drawn image
    (`render_scene`, no anti-aliasing), so it is what the vision tower sees, shape by shape."""
    pixels = np.asarray(image if image is not None else render_scene(scene))
    side = scene["image_size"] // patch_grid
    drawn = np.any(pixels != np.asarray(scene["background"], pixels.dtype), axis=-1)  # [H, W]
    return drawn.reshape(patch_grid, side, patch_grid, side).any(axis=(1, 3))


def _plural(shape: str) -> str:
    return shape + "s"


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _side(index: int, grid: int, low: str, high: str) -> str | None:
    """`low` for the first half of the rows (columns), `high` for the second, None for the middle
    one of an odd grid."""
    mid = (grid - 1) / 2
    return None if index == mid else (low if index < mid else high)


def _where(objs: list[dict[str, Any]], grid: int) -> str:
    """" at the top left" / " at the top" / " on the left" where all `objs` agree, else ""."""
    vertical = {_side(o["row"], grid, "top", "bottom") for o in objs}
    horizontal = {_side(o["col"], grid, "left", "right") for o in objs}
    v = vertical.pop() if len(vertical) == 1 else None
    h = horizontal.pop() if len(horizontal) == 1 else None
    if v and h:
        return f" at the {v} {h}"
    return f" at the {v}" if v else (f" on the {h}" if h else "")


def _questions(scene: dict[str, Any], rng: np.random.Generator, config: SyntheticConfig) -> list[tuple[str, str]]:
    """Candidate (question, answer) pairs grouped by kind; one kind is drawn per turn."""
    objs = scene["objects"]
    shape_counts = {s: sum(o["shape"] == s for o in objs) for s in config.shapes}
    color_counts = {c: sum(o["color"] == c for o in objs) for c in config.colors}
    pairs = {(o["color"], o["shape"]) for o in objs}
    kinds: dict[str, list[tuple[str, str]]] = {}

    def answer(subject: str, word: str) -> str:
        return f"{subject}: {word}" if config.answer_style == "key" else word

    kinds["color"] = [(f"What color is the {s}?", answer(s, next(o["color"] for o in objs if o["shape"] == s)))
                      for s, n in shape_counts.items() if n == 1]
    kinds["count_shape"] = [(f"How many {_plural(s)} are there?", answer(_plural(s), NUMBER_WORDS[n]))
                            for s, n in shape_counts.items()]
    kinds["count_color"] = [(f"How many {c} shapes are there?", answer(f"{c} shapes", NUMBER_WORDS[n]))
                            for c, n in color_counts.items()]
    present = [(f"Is there {_a(c)} {s}?", answer(f"{c} {s}", "yes")) for c, s in sorted(pairs)]
    absent = [(f"Is there {_a(c)} {s}?", answer(f"{c} {s}", "no"))
              for c in config.colors for s in config.shapes if (c, s) not in pairs]
    kinds["presence_yes"], kinds["presence_no"] = present, absent

    unique = [o for o in objs if sum((p["color"], p["shape"]) == (o["color"], o["shape"]) for p in objs) == 1]
    side, vertical = [], []
    for o in unique:  # the middle column (row) of an odd grid is neither left nor right (top nor bottom)
        subject = f"{o['color']} {o['shape']}"
        if word := _side(o["col"], config.grid, "left", "right"):
            side.append((f"Is the {subject} on the left or the right?", answer(subject, word)))
        if config.vertical_question == "where" and (word := _side(o["row"], config.grid, "top", "bottom")):
            vertical.append((f"Is the {subject} at the top or the bottom?", answer(subject, word)))
    kinds["left_right"] = side
    if config.vertical_question == "which" and len(objs) >= 2:
        rows = sorted(o["row"] for o in objs)
        for word, row in (("top", rows[0]), ("bottom", rows[-1])):
            at = [o for o in objs if o["row"] == row]
            if len(at) == 1 and rows[0] != rows[-1]:
                vertical.append((f"Which shape is at the {word}?", answer(word, at[0]["shape"])))
    kinds["top_bottom"] = vertical

    available = [k for k in sorted(kinds) if kinds[k]]
    chosen: list[tuple[str, str]] = []
    turns = int(rng.integers(config.min_turns, config.max_turns + 1))
    for _ in range(turns):
        kind = available[int(rng.integers(len(available)))]
        options = [qa for qa in kinds[kind] if qa not in chosen]
        if options:
            chosen.append(options[int(rng.integers(len(options)))])
    return chosen


def caption(scene: dict[str, Any], config: SyntheticConfig = SyntheticConfig()) -> str:
    """"A red circle and two blue squares.": groups of equal colour and shape, in reading order of
    their first member, by colour then shape or by shape then colour (`config.caption_order`); with
    `config.caption_positions` each group also says where it lies when its members agree."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for o in sorted(scene["objects"], key=lambda o: (o["row"], o["col"])):
        groups.setdefault((o["color"], o["shape"]), []).append(o)
    if config.caption_order != "reading":
        def rank(group: tuple[str, str]) -> tuple[int, int]:
            colour, shape = config.colors.index(group[0]), config.shapes.index(group[1])
            return (colour, shape) if config.caption_order == "colour" else (shape, colour)

        groups = dict(sorted(groups.items(), key=lambda g: rank(g[0])))
    parts = [(f"{_a(c)} {s}" if len(m) == 1 else f"{NUMBER_WORDS[len(m)]} {c} {_plural(s)}")
             + (_where(m, scene["grid"]) if config.caption_positions else "") for (c, s), m in groups.items()]
    sentences = [_listing(parts)]
    counts = collections.Counter(o["shape"] for o in scene["objects"])
    if config.caption_shape_counts:  # first, so the counts come from the image, not from the caption
        sentences.insert(0, _listing([f"{NUMBER_WORDS[counts[s]]} {s if counts[s] == 1 else _plural(s)}"
                                      for s in config.shapes if counts[s]]))
    if config.caption_shape_tally:
        order = scene.get("tally_order", config.shapes)
        sentences.insert(0, ", ".join(f"{_plural(s)}: {NUMBER_WORDS[counts[s]]}" for s in order))
    return " ".join(t[0].upper() + t[1:] + "." for t in sentences)


def _listing(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _text_only(rng: np.random.Generator) -> list[tuple[str, str]]:
    kind = int(rng.integers(3))
    if kind == 0:
        shape = str(rng.choice(["triangle", "square"]))
        return [(f"How many sides does a {shape} have?", "three" if shape == "triangle" else "four")]
    a, b = (int(x) for x in rng.integers(0, 5, size=2))
    if kind == 1:
        return [(f"What is {NUMBER_WORDS[a]} plus {NUMBER_WORDS[b]}?", NUMBER_WORDS[a + b])]
    if a == b:
        b = (a + 1) % 5
    return [(f"Which number is larger, {NUMBER_WORDS[a]} or {NUMBER_WORDS[b]}?", NUMBER_WORDS[max(a, b)])]


def _conversation(qas: list[tuple[str, str]], image: bool, suffix: str) -> list[dict[str, str]]:
    conv = []
    for i, (q, a) in enumerate(qas):
        value = q + suffix
        if image and i == 0:
            value = "<image>\n" + value
        conv.append({"from": "human", "value": value})
        conv.append({"from": "gpt", "value": a})
    return conv


def make_sample(seed: int, split: str, index: int, config: SyntheticConfig = SyntheticConfig()) -> dict[str, Any]:
    """One sample as a LLaVA record plus its "scene" (and "caption"); text-only ones lack "image"."""
    rng = _rng(seed, split, index)
    sample_id = f"{split}-{index:06d}"
    if rng.random() < config.text_only_fraction:
        return {"id": sample_id, "conversations": _conversation(_text_only(rng), False, config.question_suffix)}
    scene = make_scene(rng, config)
    if config.patch_grid:
        scene["patch_objects"] = patch_object_map(scene, config.patch_grid).tolist()
    if config.caption_shape_tally and config.caption_tally_order == "random":
        tally_rng = _rng(seed, split, index, 1)  # leaves `rng`'s draws alone
        scene["tally_order"] = [str(s) for s in tally_rng.permutation(list(config.shapes))]
    return {
        "id": sample_id,
        "image": f"images/{split}/{index:06d}.png",
        "conversations": _conversation(_questions(scene, rng, config), True, config.question_suffix),
        "scene": scene,
        "caption": caption(scene, config),
    }


def caption_record(sample: dict[str, Any]) -> dict[str, Any]:
    """Stage-1 (plain template) record for an image sample, LLaVA-558K style."""
    return {
        "id": f"cap-{sample['id']}",
        "image": sample["image"],
        "conversations": [{"from": "human", "value": "<image>\n" + CAPTION_PROMPT},
                          {"from": "gpt", "value": sample["caption"]}],
    }


@dataclasses.dataclass(frozen=True)
class SyntheticDataset:
    root: Path
    image_root: Path  # image paths in the JSON files are relative to this folder
    train_json: Path
    eval_json: Path
    train_captions_json: Path
    eval_captions_json: Path


def write_synthetic_dataset(out_dir: str | os.PathLike, num_train: int = 2000, num_eval: int = 200, seed: int = 0,
                            config: SyntheticConfig = SyntheticConfig(), overwrite: bool = False) -> SyntheticDataset:
    """Write PNGs and LLaVA JSON files (train/eval QA, train/eval captions) under `out_dir`.

    Reuses an existing complete dataset written with the same arguments unless `overwrite`.
    """
    root = Path(out_dir)
    paths = SyntheticDataset(root=root, image_root=root, train_json=root / "train.json", eval_json=root / "eval.json",
                             train_captions_json=root / "captions_train.json",
                             eval_captions_json=root / "captions_eval.json")
    manifest = {"seed": seed, "num_train": num_train, "num_eval": num_eval, "config": dataclasses.asdict(config)}
    manifest_path = root / "manifest.json"
    if not overwrite and manifest_path.is_file() and json.loads(manifest_path.read_text()) == json.loads(
            json.dumps(manifest)):
        return paths
    manifest_path.unlink(missing_ok=True)  # written last: marks a complete dataset
    for split, n, qa_path, cap_path in (("train", num_train, paths.train_json, paths.train_captions_json),
                                        ("eval", num_eval, paths.eval_json, paths.eval_captions_json)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        samples = [make_sample(seed, split, i, config) for i in range(n)]
        for s in samples:
            if "image" in s:
                render_scene(s["scene"]).save(root / s["image"], format="PNG")
        qa = [{k: v for k, v in s.items() if k != "caption"} for s in samples]
        caps = [caption_record(s) for s in samples if "image" in s]
        qa_path.write_text(json.dumps(qa, indent=1) + "\n")
        cap_path.write_text(json.dumps(caps, indent=1) + "\n")
    manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")
    return paths


def synthetic_texts(num_samples: int = 2000, seed: int = 0, config: SyntheticConfig = SyntheticConfig()) -> list[str]:
    """Texts for training the synthetic SentencePiece model: everything the templates will emit.

    Covers the vicuna_v1 system prompt and role tags, every question form, all answers and
    captions of `num_samples` training scenes, and the full colour/shape/number vocabulary.
    """
    # The fixed prompt parts occur in every sample: weight them like it, so that they get
    # whole-word pieces and the tiny model's sequences stay short.
    fixed = [VICUNA_V1.system, f"{VICUNA_V1.roles[0]}: ", f" {VICUNA_V1.roles[1]}:", CAPTION_PROMPT,
             config.question_suffix.strip()]
    texts = fixed * max(1, num_samples // 4)
    texts += list(config.colors) + [s for s in config.shapes] + [_plural(s) for s in config.shapes]
    texts += list(NUMBER_WORDS) + ["yes", "no", "left", "right", "top", "bottom"]
    for i in range(num_samples):
        sample = make_sample(seed, "train", i, config)
        texts += [t["value"].replace("<image>\n", "") for t in sample["conversations"]]
        if "caption" in sample:
            texts.append(sample["caption"])
    return [t for t in texts if t]
