"""γ-MoD end to end on the embedded synthetic task: `python -m demo --workdir runs/demo`.

    python -m demo --workdir runs/demo [--config configs/demo_default.py] [--set key=value ...]
        [--rerun STAGE ...]

No downloads, CPU only. The stages are the ones a researcher runs on a real LLaVA checkpoint,
through the same library code (only the data and the model are small):

  dataset     procedurally generated image-question-answer data (PNGs + LLaVA JSON), and the
              held-out split written as a GQA-format question/annotation file pair
  tokenizer   a LLaMA-style SentencePiece model trained on the training text
  tfds        the training data pre-tokenised into a TFDS ArrayRecord dataset (what training reads)
  vision      the vision tower trained on its own to label the scene under each patch, standing
              in for CLIP's pretraining (there is no CLIP to download; `demo.vision`)
  pretrain    a tiny LLaVA (that tower, a random LLM) trained on the captions with the `plain`
              template, as LLaVA's stage 1 (with the LLM trained too: it starts from scratch);
              `train.loop.run`, exported as a gmod-jax checkpoint
  dense       instruction tuning of that model on the questions (vicuna_v1), the vision tower
              frozen as in LLaVA's stage 2: the dense model γ-MoD starts from
  arank       ARank per decoder layer on held-out samples (`gmod_jax.arank.cli`)
  adapt       dense -> γ-MoD with the ARank layer list (`convert.to_mod.adapt`)
  mod_ft      stage 2 with masked routing learning and the routing loss
  dense_ft    the dense baseline fine-tuned with the same budget
  eval_*      held-out accuracy with batched greedy generation (`python -m gmod_jax.eval`'s
              runner, GQA scoring), prefill skip ratios, analytic FLOPs
  routing     skip rate by token type and routing overlays (`gmod_jax.visualize`)
  speed       prefill ms/sample of the γ-MoD checkpoint, MoD routing vs the same weights dense
  report      `<workdir>/report.md` with the plots

Every stage records a stamp `<workdir>/stages/<stage>.json` holding a fingerprint of its inputs
(its config and the fingerprints of the stages it reads) after its outputs are complete; a rerun
skips a stage whose stamp matches and whose outputs exist, so a second run only rewrites the
report. Changing a config value reruns the stages that depend on it. Training stages resume from
their last checkpoint when interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from gmod_jax.config import ModelConfig
from gmod_jax.data.synthetic import SyntheticConfig
from demo.report import read_metrics
from demo.vision import VisionPretrainConfig
from train.config import TrainConfig

log = logging.getLogger("demo")

# The recipes live in the repository's configs/, not in the installed package.
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo_default.py"
TFDS_QA = "synthetic_qa_vicuna_v1"  # TFDS config names of the two pre-tokenised datasets
TFDS_CAPTIONS = "synthetic_captions_plain"
TEMPLATE = "vicuna_v1"  # instruction data and evaluation
PRETRAIN_TEMPLATE = "plain"  # LLaVA stage-1 captioning

# Question kind -> the four question families the report groups accuracy by.
QUESTION_FAMILIES = {"color": "colour", "count_shape": "count", "count_color": "count", "presence": "presence",
                     "left_right": "position", "top_bottom": "position"}


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """Everything the demo does. `pretrain`, `dense_train` and `finetune` are ordinary training
    configs; the demo fills in what only exists at run time: data paths, the tokenizer's
    vocabulary size and special ids (into `model`), and `init_from` for the runs that continue
    from a checkpoint (they take their model from it, so their own `model` field is not used)."""

    model: ModelConfig
    dense_train: TrainConfig  # instruction tuning (vicuna_v1 QA), from `pretrain`'s output or scratch
    finetune: TrainConfig  # stage 2: the γ-MoD fine-tune and the dense baseline, same budget
    # LLaVA stage-1 style captioning (plain template) before `dense_train`; None = no such phase
    pretrain: TrainConfig | None = None
    # The vision tower's own pretraining before everything else, standing in for CLIP's
    # (`demo.vision`); None = the LLaVA stages start from a random tower
    vision_pretrain: VisionPretrainConfig | None = None
    synthetic: SyntheticConfig = SyntheticConfig()
    num_train: int = 8000  # training images (each with 1..max_turns questions)
    num_eval: int = 400  # held-out images; every question of each is one eval item
    seed: int = 0
    vocab_size: int = 512  # requested; byte fallback needs >= ~300, the result can be smaller
    tokenizer_texts: int = 2000  # training-stream samples (the first N) whose text trains the tokenizer
    # ARank (on held-out images) and the adaptation
    arank_samples: int = 50  # the paper: ~50 samples suffice
    num_dense: int = 2  # top-ARank layers kept dense (the paper keeps 4 of 32)
    routing_ratio: float = 0.5
    masking: str = "official"
    # Other MoDConfig fields for the adapted model, as (name, value) pairs, e.g.
    # (("inference_routing", "capacity"),).
    mod_options: tuple[tuple[str, Any], ...] = ()
    # Where the shared router starts (`demo.router_probes`): "random" (official: the
    # adapter's random init) or "redundancy" (a probe for issue 26, not the paper's method: the
    # direction away from the mean routable token of `router_start_samples` training prompts).
    router_start: str = "random"
    router_start_samples: int = 64
    # > 0 (a probe for issue 26, not the paper's method): the γ-MoD fine-tune's first N steps run
    # with every token kept (routing ratio 0, no routing loss), so the LM loss reaches the
    # keep-probability of every token through its scaled MLP output, before routing starts from
    # what the router learnt; the remaining finetune.num_steps - N steps are the official ones.
    router_warmup_steps: int = 0
    # evaluation
    eval_batch: int = 64
    eval_limit: int | None = None  # first N held-out questions only (None: all)
    eval_max_new_tokens: int | None = None  # None: the GQA default of γ-MoD's eval code (6)
    speed_batch: int = 16  # prompts per timed prefill call
    speed_repeats: int = 5  # timed calls per mode after one warm-up call (median reported)
    routing_samples: int = 64  # held-out prompts behind the skip-rate-by-type chart
    num_overlays: int = 3  # held-out images drawn with their skipped patches greyed out
    # Persistent XLA compilation cache under <workdir>/xla_cache (what `python -m train` does with
    # `compilation_cache_dir`): identical programs of different stages (the random init of the
    # same architecture, the train step of the two dense runs) compile once, reruns not at all.
    compilation_cache: bool = True
    # acceptance targets the report checks
    target_dense_accuracy: float = 90.0
    target_max_accuracy_drop: float = 2.0
    target_routable_skip: float = 0.30
    target_minutes: float = 15.0
    # With a patch map (`synthetic.patch_grid`): the share of image tokens the MoD layers skip,
    # and the share of those that are background patches (issue 26, the paper's Fig. 4 claim).
    target_image_skip: float = 0.40
    target_background_share: float = 0.90

    def __post_init__(self):
        if self.num_dense < 1 or self.num_dense >= self.model.text.num_layers:
            raise ValueError(f"num_dense must be in 1..{self.model.text.num_layers - 1}")
        if self.model.mod.enabled:
            raise ValueError("DemoConfig.model is the dense architecture; the demo adapts it to γ-MoD itself")
        from demo.router_probes import ROUTER_STARTS

        if self.router_start not in ROUTER_STARTS:
            raise ValueError(f"router_start must be one of {ROUTER_STARTS}, got {self.router_start!r}")
        if not 0 <= self.router_warmup_steps < self.finetune.num_steps:
            raise ValueError(f"router_warmup_steps must be in 0..{self.finetune.num_steps - 1}")

    @property
    def mod_kwargs(self) -> dict[str, Any]:
        return {"routing_ratio": self.routing_ratio, "masking": self.masking, **dict(self.mod_options)}

    @property
    def router_start_kwargs(self) -> dict[str, Any]:
        """`adapt_stage`'s router-start arguments, empty for the official random start: stage
        fingerprints that include them stay unchanged for runs finished before the option existed."""
        if self.router_start == "random":
            return {}
        return {"router_start": self.router_start, "router_start_samples": self.router_start_samples}


def load_config(path: str | os.PathLike | None = None) -> DemoConfig:
    """Import a demo config file (configs/demo*.py) and call its `get_config()`."""
    from gmod_jax.config_files import load_config_file

    if path is None and not DEFAULT_CONFIG.is_file():
        raise FileNotFoundError(f"no default demo config at {DEFAULT_CONFIG} (an installed package has no "
                                "configs/): pass --config with the repository's configs/demo_default.py")
    return load_config_file(path if path is not None else DEFAULT_CONFIG, DemoConfig)


# ----------------------------------------------------------------------------------------------
# Stage bookkeeping


def _jsonable(obj):
    if dataclasses.is_dataclass(obj):
        return _jsonable(dataclasses.asdict(obj))
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def fingerprint(*parts) -> str:
    text = json.dumps(_jsonable(parts), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def write_json(path: Path, obj) -> None:
    """Write JSON atomically (temp file, then rename): a crash never leaves a half stamp."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_jsonable(obj), indent=1, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


@dataclasses.dataclass
class StageResult:
    name: str
    key: str
    seconds: float  # wall time of the run that produced the outputs
    cached: bool  # True: this invocation reused them
    result: dict


class Stages:
    """Runs stages at most once per input fingerprint; remembers what each one cost."""

    def __init__(self, workdir: Path, rerun: tuple[str, ...] = (), echo: Callable[[str], None] = print):
        self.workdir = workdir
        self.dir = workdir / "stages"
        self.rerun = set(rerun)
        self.echo = echo
        self.done: dict[str, StageResult] = {}

    def stamp_path(self, name: str) -> Path:
        return self.dir / f"{name}.json"

    def key(self, name: str, inputs, deps: tuple[str, ...] = ()) -> str:
        """A stage's fingerprint: its own inputs and the keys of the finished stages it reads."""
        return fingerprint(name, inputs, [self.done[d].key for d in deps])

    def run(self, name: str, inputs, outputs: list[Path], fn: Callable[[], dict], deps: tuple[str, ...] = ()) \
            -> StageResult:
        key = self.key(name, inputs, deps)
        stamp = self.stamp_path(name)
        if name not in self.rerun and stamp.is_file() and all(p.exists() for p in outputs):
            saved = json.loads(stamp.read_text())
            if saved.get("key") == key:
                res = StageResult(name, key, float(saved["seconds"]), True, saved["result"])
                self.done[name] = res
                self.echo(f"[{name}] cached ({res.seconds:.1f} s when it ran)")
                return res
        stamp.unlink(missing_ok=True)
        self.echo(f"[{name}] running")
        t0 = time.perf_counter()
        result = fn() or {}
        seconds = time.perf_counter() - t0
        write_json(stamp, {"key": key, "seconds": seconds, "result": result,
                           "finished": time.strftime("%Y-%m-%d %H:%M:%S")})
        res = StageResult(name, key, seconds, False, json.loads(json.dumps(_jsonable(result))))
        self.done[name] = res
        self.echo(f"[{name}] done in {seconds:.1f} s")
        return res


# ----------------------------------------------------------------------------------------------
# Held-out questions in GQA's evaluation format


def question_kind(question: str) -> str:
    """The generator's question kind, read back from the question text (gmod_jax.data.synthetic)."""
    q = question.replace("<image>", "").strip()
    if q.startswith("What color is the"):
        return "color"
    if q.startswith("How many"):
        return "count_color" if q.endswith(" shapes are there?") else "count_shape"
    if q.startswith("Is there"):
        return "presence"
    if q.endswith("on the left or the right?"):
        return "left_right"
    if q.startswith("Which shape is at the") or q.endswith("at the top or the bottom?"):
        return "top_bottom"
    return "other"


def write_heldout_questions(eval_json: Path, out_dir: Path) -> dict:
    """Every question of every held-out image as one GQA-style item: `questions.jsonl`
    ({question_id, image, text}) and `annotations.json` ({qid: {answer, types}}), so the held-out
    split is scored by `python -m gmod_jax.eval --benchmark gqa` (exact match after LLaVA's
    normalisation), with accuracy per question family (semantic type) and kind (structural)."""
    from gmod_jax.data.llava_json import read_records

    questions, annotations = [], {}
    for rec in read_records(eval_json):
        if not rec.get("image"):
            continue
        conv = rec["conversations"]
        for turn in range(0, len(conv) - 1, 2):
            text = conv[turn]["value"].replace("<image>", "").strip()
            qid = f"{rec['id']}-q{turn // 2}"
            kind = question_kind(text)
            questions.append({"question_id": qid, "image": rec["image"], "text": text})
            annotations[qid] = {"answer": conv[turn + 1]["value"].strip(),
                                "types": {"semantic": QUESTION_FAMILIES.get(kind, "other"), "structural": kind}}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    write_json(out_dir / "annotations.json", annotations)
    return {"questions": len(questions), "images": len({q["image"] for q in questions}),
            "kinds": {k: sum(a["types"]["structural"] == k for a in annotations.values())
                      for k in sorted({a["types"]["structural"] for a in annotations.values()})}}


# ----------------------------------------------------------------------------------------------
# The pipeline


@dataclasses.dataclass(frozen=True)
class Paths:
    root: Path

    @property
    def data(self) -> Path:
        return self.root / "data" / "synthetic"

    @property
    def heldout(self) -> Path:
        return self.root / "data" / "heldout_gqa"

    @property
    def tokenizer(self) -> Path:
        return self.root / "data" / "tokenizer"

    @property
    def tfds(self) -> Path:
        return self.root / "data" / "tfds"

    def train(self, name: str) -> Path:
        return self.root / "train" / name

    def ckpt(self, name: str) -> Path:
        return self.root / "ckpt" / name

    def eval(self, name: str) -> Path:
        return self.root / "eval" / name

    @property
    def arank(self) -> Path:
        return self.root / "arank"

    @property
    def routing(self) -> Path:
        return self.root / "routing"


def model_for_tokenizer(model: ModelConfig, tok) -> ModelConfig:
    """The architecture with the tokenizer's vocabulary size and special ids."""
    text = dataclasses.replace(model.text, vocab_size=tok.vocab_size)
    return model.replace(text=text, image_token_index=tok.image_token_id, pad_token_id=tok.pad_id)


def prompt_bucket(max_len: int, step: int = 16) -> int:
    """One prompt-length bucket holding every held-out prompt: one compiled prefill per model."""
    return -(-max_len // step) * step


def train_stage(train_cfg: TrainConfig, workdir: Path, export_dir: Path, tokenizer_dir: Path, key: str) -> dict:
    """`train.loop.run` in `workdir`, then export the final params (with the tokenizer) to
    `export_dir`. `key` is the stage's fingerprint (its config and every stage upstream, so a
    changed init checkpoint counts too): a workdir left under another key is cleared first; one
    left by an interrupted run under this key is resumed from its last checkpoint."""
    from train.export import export_params
    from train.loop import run

    marker = workdir / "demo_key.txt"
    if workdir.exists() and (not marker.is_file() or marker.read_text().strip() != key):
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    marker.write_text(key + "\n")
    t0 = time.perf_counter()
    result = run(train_cfg, workdir)
    if result.status != "completed":
        raise RuntimeError(f"training in {workdir} stopped early ({result.status}) at step {result.step}")
    export_params(export_dir, result.state["params"], result.model, tokenizer_src_dir=tokenizer_dir)
    records = read_metrics(workdir / "metrics.jsonl")
    last = records[-1] if records else {}
    return {"steps": result.step, "seconds": time.perf_counter() - t0, "final_loss": last.get("loss"),
            "final_lm_loss": last.get("lm_loss"), "final_router_loss": last.get("router_loss"),
            "final_train_skip_ratio": last.get("skip_ratio"), "mod_layers": list(result.model.mod_layers),
            "final_train_skip_by_type": {k.split("/", 1)[1]: v for k, v in last.items() if k.startswith("skip_ratio/")}}


def training_stage(stages: Stages, name: str, train_cfg: TrainConfig, workdir: Path, export_dir: Path,
                   tokenizer_dir: Path, deps: tuple[str, ...]) -> StageResult:
    """`train_stage` as the stage `name`, its workdir marked with that stage's key."""
    return stages.run(name, train_cfg, [export_dir / "config.json"],
                      lambda: train_stage(train_cfg, workdir, export_dir, tokenizer_dir,
                                          stages.key(name, train_cfg, deps)), deps=deps)


def eval_stage(ckpt: Path, paths: Paths, out: Path, cfg: DemoConfig, bucket: int, mode: str = "inference",
               name: str | None = None) -> dict:
    """Held-out accuracy etc. through the evaluation CLI's runner (GQA format and scoring)."""
    from gmod_jax.eval.runner import main as eval_main

    args = ["--ckpt", str(ckpt), "--benchmark", "gqa", "--questions", str(paths.heldout / "questions.jsonl"),
            "--annotations", str(paths.heldout / "annotations.json"), "--images", str(paths.data),
            "--out", str(out), "--batch-size", str(cfg.eval_batch), "--mode", mode,
            "--prompt-buckets", str(bucket), "--overwrite", "--no-progress", "--name", name or out.name]
    if cfg.eval_limit is not None:
        args += ["--limit", str(cfg.eval_limit)]
    if cfg.eval_max_new_tokens is not None:
        args += ["--max-new-tokens", str(cfg.eval_max_new_tokens)]
    rc = eval_main(args)
    if rc != 0:
        raise RuntimeError(f"evaluation of {ckpt} failed (exit status {rc}); see the messages above")
    m = json.loads((out / "metrics.json").read_text())
    score = m["score"]["metrics"]
    return {"accuracy": m["score"]["headline"], "per_family": score.get("per_semantic_type", {}),
            "per_kind": score.get("per_structural_type", {}), "n": m["n_answered"],
            "prefill_skip_ratio": m["skip"]["prefill_skip_ratio"],
            "prefill_skip_ratio_per_layer": m["skip"]["prefill_skip_ratio_per_layer"],
            "decode_skip_ratio": m["skip"]["decode_skip_ratio"], "mod_layers": m["skip"]["mod_layers"],
            "samples_per_s": m["speed"]["samples_per_s"], "samples_per_s_steady": m["speed"]["samples_per_s_steady"],
            "flops": m["flops"], "metrics_file": str(out / "metrics.json")}


def heldout_prompts(paths: Paths, n: int) -> list[dict]:
    """The first `n` held-out questions (first question of each image first, so the prompts
    cover as many images as possible) with their gold answers."""
    qs = [json.loads(l) for l in (paths.heldout / "questions.jsonl").read_text().splitlines() if l.strip()]
    ann = json.loads((paths.heldout / "annotations.json").read_text())
    qs.sort(key=lambda q: (int(q["question_id"].rsplit("-q", 1)[1]), q["question_id"]))
    return [{**q, "image_path": str(paths.data / q["image"]), "answer": ann[q["question_id"]]["answer"]}
            for q in qs[:n]]


def heldout_patch_maps(paths: Paths, images: list[str]) -> np.ndarray | None:
    """bool [len(images), g, g]: each held-out image's `patch_objects` map (True = object
    pixels in the patch), from the scenes of the held-out split; None if its scenes carry none."""
    scenes = {r["image"]: r["scene"] for r in json.loads((paths.data / "eval.json").read_text()) if r.get("image")}
    maps = [scenes[image].get("patch_objects") for image in images]
    if any(m is None for m in maps):
        return None
    return np.asarray(maps, bool)


def routing_stage(ckpt: Path, paths: Paths, out: Path, cfg: DemoConfig, answers: dict[str, str]) -> dict:
    """Which tokens the γ-MoD model skips at inference, with the prefill rule, over held-out
    prompts followed by the model's own answers (teacher forced, as the paper's Fig. 4):
    skip rate by token type over `routing_samples` prompts, and per-layer patch overlays for
    the first `num_overlays` images. One batched trace (`gmod_jax.visualize.routing_trace`)."""
    import gmod_jax
    from gmod_jax import token_types as tt
    from gmod_jax import visualize as V
    from gmod_jax.data.images import CLIP_MEAN, CLIP_STD
    from gmod_jax.data.tokenizer import load_tokenizer

    model = gmod_jax.load(str(ckpt))
    tokenizer = load_tokenizer(ckpt)
    prompts = heldout_prompts(paths, cfg.routing_samples)
    encoded = [V.encode_example(model, tokenizer, p["image_path"], p["text"],
                                answer=answers.get(p["question_id"], p["answer"]) or p["answer"], template=TEMPLATE)
               for p in prompts]
    length = prompt_bucket(max(len(e[0]) for e in encoded))
    b = len(encoded)
    ids = np.full((b, length), tokenizer.pad_id, np.int32)
    types = np.full((b, length), tt.PAD, np.int32)
    mask = np.zeros((b, length), bool)
    for i, (row_ids, row_types, _, _) in enumerate(encoded):
        ids[i, :len(row_ids)], types[i, :len(row_ids)], mask[i, :len(row_ids)] = row_ids, row_types, True
    pixels = np.stack([e[2] for e in encoded])
    kept, probs = V.routing_trace(model, ids, pixels, mask, types, mode="inference")
    layers = list(model.config.mod.layers)
    # Per image, which patches hold objects (scenes written with `synthetic.patch_grid`), and the
    # per-layer patch grids of what each MoD layer kept: background vs object patches skipped.
    object_maps = heldout_patch_maps(paths, [p["image"] for p in prompts])
    grids_all = np.stack([V.image_patch_grid(model.config, kept[:, i], types[i]) for i in range(b)], axis=1)
    patch_stats = None
    if object_maps is not None:
        if object_maps.shape[1:] != grids_all.shape[2:]:
            raise ValueError(f"scenes record {object_maps.shape[1:]} patches, the model sees {grids_all.shape[2:]}: "
                             "set synthetic.patch_grid to the vision tower's patches per side")
        from demo.patches import patch_skip_shares

        patch_stats = patch_skip_shares(grids_all, object_maps)
    rates = V.skip_rates_by_type(kept, types)
    routable = np.isin(types, model.config.mod.routable_types) & mask
    prompt_tokens = mask & (types != tt.ANSWER)
    rule = model.config.mod.inference_routing
    out.mkdir(parents=True, exist_ok=True)
    V.plot_token_types(out / "skip_rate_by_token_type.png", rates, layers,
                       f"γ-MoD skip rate by token type, {b} held-out prompts + answers ({rule} routing)")
    overlays = []
    for i in range(min(cfg.num_overlays, b)):
        image = np.clip(pixels[i] * np.asarray(CLIP_STD, np.float32) + np.asarray(CLIP_MEAN, np.float32), 0, 1)
        grids = grids_all[:, i]
        p = prompts[i]
        name = f"overlay_{i}.png"
        V.plot_patches(out / name, image, grids, layers,
                       f"Q: {p['text']}  A: {answers.get(p['question_id'], '?')} (gold: {p['answer']})",
                       outline=None if object_maps is None else object_maps[i])
        overlays.append({"file": name, "question": p["text"], "answer": answers.get(p["question_id"]),
                         "gold": p["answer"], "image": p["image"],
                         "patch_skip_per_layer": [float(v) for v in 1.0 - grids.reshape(len(layers), -1).mean(1)]})
    kept_routable = (kept & routable[None]).sum()
    kept_prompt = (kept & prompt_tokens[None]).sum()
    summary = {
        "rule": rule, "samples": b, "mod_layers": layers, "by_type": rates,
        "routable_types": [tt.NAMES[t] for t in model.config.mod.routable_types],
        "routable_skip": float(1.0 - kept_routable / max(routable.sum() * len(layers), 1)),
        "prompt_skip": float(1.0 - kept_prompt / max(prompt_tokens.sum() * len(layers), 1)),
        "keep_prob_mean_by_type": {tt.NAMES[t]: float(probs[:, (types == t) & mask].mean())
                                   for t in (tt.SYSTEM, tt.IMAGE, tt.QUESTION, tt.ANSWER) if ((types == t) & mask).any()},
        "overlays": overlays, "chart": "skip_rate_by_token_type.png",
        # None when the scenes carry no patch map (`synthetic.patch_grid` = 0)
        "patches": patch_stats,
    }
    write_json(out / "routing_summary.json", summary)
    return summary


def speed_stage(ckpt: Path, paths: Paths, cfg: DemoConfig, bucket: int) -> dict:
    """Prefill wall time per sample of the γ-MoD checkpoint with MoD routing vs the same weights
    with every layer dense (`mode="dense"`), in this process, on the same held-out prompts:
    one warm-up (compiling) call per mode, then `speed_repeats` alternating timed calls of
    `speed_batch` prompts with one new token each (prefill-dominated, as the paper's setting)."""
    import gmod_jax
    from gmod_jax import flops as F
    from gmod_jax.data.tokenizer import load_tokenizer

    model = gmod_jax.load(str(ckpt))
    tokenizer = load_tokenizer(ckpt)
    prompts = [{"image": p["image_path"], "text": p["text"]} for p in heldout_prompts(paths, cfg.speed_batch)]
    times: dict[str, list[float]] = {"dense": [], "inference": []}
    outs = {}
    for mode in times:  # warm-up: compile
        outs[mode] = model.generate(prompts, tokenizer=tokenizer, max_new_tokens=1, mode=mode, prompt_buckets=[bucket])
    for _ in range(cfg.speed_repeats):
        for mode in times:
            out = model.generate(prompts, tokenizer=tokenizer, max_new_tokens=1, mode=mode, prompt_buckets=[bucket])
            times[mode].append(out.timings["prefill_s"])
    n = len(prompts)
    ms = {mode: 1000.0 * float(np.median(t)) / n for mode, t in times.items()}
    mod_out = outs["inference"]
    kept = mod_out.stats["prefill_kept"].astype(np.float64).mean(axis=1)  # per MoD layer, mean over rows
    seq = bucket
    dense_flops = F.prefill_flops(model.config, 1, seq, None).total
    mod_flops = F.prefill_flops(model.config, 1, seq, list(kept)).total
    return {"batch": n, "repeats": cfg.speed_repeats, "prompt_bucket": bucket,
            "ms_per_sample_dense": ms["dense"], "ms_per_sample_mod": ms["inference"],
            "speedup": ms["dense"] / ms["inference"], "all_times_s": times,
            "mod_capacity": mod_out.spec.mod_capacity, "prefill_skip_ratio": mod_out.prefill_skip_ratio,
            "flops_dense": dense_flops, "flops_mod": mod_flops, "flop_bound_speedup": F.bound_speedup(dense_flops, mod_flops),
            "rule": model.config.mod.inference_routing}


@dataclasses.dataclass
class Prepared:
    """What the stages up to ARank produced: everything the γ-MoD experiments start from."""

    paths: Paths
    stages: Stages
    tokenizer: Any
    model: ModelConfig  # dense architecture with the tokenizer's vocabulary
    tfds_dir: str  # instruction data (vicuna_v1), what the dense stage and the fine-tunes read
    bucket: int  # prompt-length bucket holding every held-out prompt

    def train_config(self, template: TrainConfig, **kw) -> TrainConfig:
        """A training config template pointed at the demo's instruction data."""
        data = dataclasses.replace(template.data, source="tfds", path=self.tfds_dir,
                                   tokenizer=str(self.paths.tokenizer), template=TEMPLATE)
        return template.replace(data=data, **kw)


def prepare(cfg: DemoConfig, root: Path, stages: Stages) -> Prepared:
    """Stages dataset -> tokenizer -> tfds -> [pretrain] -> dense -> arank (each cached)."""
    paths = Paths(root)

    def make_dataset():
        from gmod_jax.data.synthetic import write_synthetic_dataset

        ds = write_synthetic_dataset(paths.data, cfg.num_train, cfg.num_eval, cfg.seed, cfg.synthetic)
        return {"train_json": str(ds.train_json), "eval_json": str(ds.eval_json),
                "train_captions_json": str(ds.train_captions_json), "eval_captions_json": str(ds.eval_captions_json),
                **write_heldout_questions(ds.eval_json, paths.heldout)}

    data = stages.run("dataset", (cfg.synthetic, cfg.num_train, cfg.num_eval, cfg.seed),
                      [paths.data / "manifest.json", paths.heldout / "annotations.json"], make_dataset)

    def make_tokenizer():
        from gmod_jax.data.synthetic import synthetic_texts
        from gmod_jax.data.tokenizer import train_sentencepiece

        texts = synthetic_texts(cfg.tokenizer_texts, cfg.seed, cfg.synthetic)
        tok = train_sentencepiece(texts, paths.tokenizer, vocab_size=cfg.vocab_size)
        return {"vocab_size": tok.vocab_size, "image_token_id": tok.image_token_id, "pad_id": tok.pad_id,
                "fingerprint": tok.fingerprint}

    stages.run("tokenizer", (cfg.vocab_size, cfg.tokenizer_texts), [paths.tokenizer / "tokenizer.model"],
               make_tokenizer, deps=("dataset",))
    from gmod_jax.data.tokenizer import load_tokenizer

    tok = load_tokenizer(paths.tokenizer)
    model_cfg = model_for_tokenizer(cfg.model, tok)

    def make_tfds():
        from gmod_jax.data.tfds_builder import build_tfds

        if paths.tfds.exists():  # a build for another tokenizer: TFDS would take it as complete
            shutil.rmtree(paths.tfds)
        d = data.result
        qa = build_tfds(paths.tfds, TFDS_QA, {"train": (d["train_json"], str(paths.data)),
                                             "eval": (d["eval_json"], str(paths.data))}, tok, template=TEMPLATE)
        out = {"qa": str(qa)}
        if cfg.pretrain is not None:
            out["captions"] = str(build_tfds(paths.tfds, TFDS_CAPTIONS,
                                             {"train": (d["train_captions_json"], str(paths.data)),
                                              "eval": (d["eval_captions_json"], str(paths.data))}, tok,
                                             template=PRETRAIN_TEMPLATE))
        return out

    tfds = stages.run("tfds", (TFDS_QA, TEMPLATE, cfg.pretrain is not None), [paths.tfds], make_tfds,
                      deps=("dataset", "tokenizer"))
    prep = Prepared(paths, stages, tok, model_cfg, tfds.result["qa"], 0)

    # Dense model: [vision tower pretraining (CLIP's stand-in) ->] [caption pretraining, plain
    # template ->] instruction tuning; each starts from the previous stage's checkpoint.
    init_deps: tuple[str, ...] = ("tfds",)
    init = None
    if cfg.vision_pretrain is not None:
        def make_vision():
            from demo.vision import vision_stage

            d = data.result
            return vision_stage(model_cfg, cfg.vision_pretrain, cfg.synthetic, Path(d["train_json"]),
                                Path(d["eval_json"]), paths.data, paths.ckpt("vision"), paths.tokenizer, cfg.seed,
                                echo=stages.echo)

        stages.run("vision", (cfg.vision_pretrain, model_cfg, cfg.synthetic),
                   [paths.ckpt("vision") / "config.json"], make_vision, deps=("dataset", "tokenizer"))
        init_deps, init = ("tfds", "vision"), str(paths.ckpt("vision"))
    if cfg.pretrain is not None:
        pre_data = dataclasses.replace(cfg.pretrain.data, source="tfds", path=tfds.result["captions"],
                                       tokenizer=str(paths.tokenizer), template=PRETRAIN_TEMPLATE)
        pre_cfg = cfg.pretrain.replace(model=model_cfg, init_from=init, export_dir=None, data=pre_data)
        training_stage(stages, "pretrain", pre_cfg, paths.train("pretrain"), paths.ckpt("pretrain"), paths.tokenizer,
                       init_deps)
        init_deps, init = ("tfds", "pretrain"), str(paths.ckpt("pretrain"))
    dense_deps, dense_init = init_deps, init
    dense_cfg = prep.train_config(cfg.dense_train, model=None if dense_init else model_cfg, init_from=dense_init,
                                  export_dir=None)
    training_stage(stages, "dense", dense_cfg, paths.train("dense"), paths.ckpt("dense"), paths.tokenizer, dense_deps)

    def make_arank():
        import gmod_jax
        from gmod_jax.arank import cli as arank_cli
        from gmod_jax.data.llava_json import read_records

        model = gmod_jax.load(str(paths.ckpt("dense")))
        prompts = arank_cli.calibration_prompts(read_records(data.result["eval_json"]), cfg.arank_samples)
        per_sample = arank_cli.analyse(model, prompts, str(paths.data), batch_size=len(prompts), progress=False)
        report = arank_cli.write_report(paths.arank, per_sample, cfg.num_dense, None,
                                        {"checkpoint": str(paths.ckpt("dense")), "data": data.result["eval_json"],
                                         "sample_ids": [p["id"] for p in prompts]})
        out = {k: report[k] for k in ("per_layer_mean", "per_layer_std", "mod_layers", "dense_layers", "threshold",
                                      "rule", "num_samples")}
        out["arank_mod_layers"] = report["mod_layers"]
        out["mod_layers"], out["tie_break"] = layers_with_tie_break(report["per_layer_mean"], cfg.num_dense)
        out["dense_layers"] = [i for i in range(len(report["per_layer_mean"])) if i not in out["mod_layers"]]
        return out

    stages.run("arank", (cfg.arank_samples, cfg.num_dense), [paths.arank / "arank.json"], make_arank,
               deps=("dense", "dataset"))

    from gmod_jax.eval.runner import prompt_length

    longest = max(prompt_length(model_cfg, tok, {"text": p["text"], "image": p["image"]}, TEMPLATE)
                  for p in heldout_prompts(paths, 10 ** 9))
    prep.bucket = prompt_bucket(longest)
    return prep


def layers_with_tie_break(arank_mean, num_dense: int) -> tuple[list[int], bool]:
    """MoD layers: all but the `num_dense` highest-ARank layers. ARank's own rule keeps every
    layer tied with the num_dense-th value dense (`gmod_jax.arank.select_mod_layers`); a small
    model can tie many layers (a causal attention map is full rank unless rows nearly repeat), so
    ties are broken towards keeping the earlier layers dense, as the paper's ARank result for
    Vicuna does (layers 0, 1, 2 and L-1 dense). Returns (layers, whether a tie was broken)."""
    from gmod_jax.arank import select_mod_layers

    by_arank = select_mod_layers(arank_mean, num_dense=num_dense)
    order = sorted(range(len(arank_mean)), key=lambda i: (-arank_mean[i], i))
    layers = sorted(order[num_dense:])
    return layers, list(by_arank) != layers


def adapt_stage(prep: Prepared, out: Path, layers, seed: int, router_start: str = "random",
                router_start_samples: int = 64, **mod_kw) -> dict:
    """`convert.to_mod.adapt` of the dense checkpoint, saved with its tokenizer; with
    `router_start="redundancy"` the router starts from `demo.router_probes`' direction."""
    from gmod_jax.checkpoint import load_checkpoint, save_checkpoint
    from convert.to_mod import adapt

    config, params = load_checkpoint(prep.paths.ckpt("dense"))
    new_config, new_params = adapt(config, params, tuple(layers), seed=seed, **mod_kw)
    info = {}
    if router_start == "redundancy":
        import gmod_jax
        from demo.router_probes import redundancy_router

        kernel, info = redundancy_router(config, new_params, new_config.mod.layers, prep.tokenizer,
                                         gmod_jax.load(str(prep.paths.ckpt("dense"))), prep.paths.data / "train.json",
                                         prep.paths.data, router_start_samples, TEMPLATE)
        new_params["llm"]["mod_router"]["kernel"] = kernel
    save_checkpoint(out, new_params, new_config, tokenizer_src_dir=prep.paths.ckpt("dense"), overwrite=True)
    return {"mod_layers": list(new_config.mod.layers), "mod": dataclasses.asdict(new_config.mod),
            "router_start": router_start, **({"router_start_fit": info} if info else {})}


def reroute_stage(src: Path, out: Path, mod_kw: dict) -> dict:
    """A γ-MoD checkpoint (the all-kept warm-up's) with its routing set to `mod_kw`'s routing
    ratio and routing-loss weight, its weights unchanged: where the official fine-tune starts."""
    from gmod_jax.checkpoint import load_checkpoint, save_checkpoint

    config, params = load_checkpoint(src)
    mod = dataclasses.replace(config.mod, **{k: v for k, v in mod_kw.items()
                                             if k in ("routing_ratio", "router_aux_loss_coef")})
    new_config = config.replace(mod=mod)
    save_checkpoint(out, params, new_config, tokenizer_src_dir=src, overwrite=True)
    return {"mod_layers": list(mod.layers), "mod": dataclasses.asdict(mod), "router_warmup_from": str(src)}


def finetune_stage(stages: Stages, prep: Prepared, template: TrainConfig, name: str, init: Path, workdir: Path,
                   export: Path, deps: tuple, num_steps: int | None = None) -> StageResult:
    """Fine-tune `init` on the instruction data (the model comes from the checkpoint)."""
    ft_cfg = prep.train_config(template, model=None, init_from=str(init), export_dir=None)
    if num_steps is not None:
        ft_cfg = ft_cfg.replace(num_steps=num_steps)
    return training_stage(stages, name, ft_cfg, workdir, export, prep.paths.tokenizer, deps)


def enable_compilation_cache(directory: Path) -> None:
    import jax

    directory.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(directory))


def run_demo(cfg: DemoConfig, workdir: str | os.PathLike, rerun: tuple[str, ...] = (),
             echo: Callable[[str], None] = print) -> dict:
    """Run (or reuse) every stage; write the report; return a summary of the run."""
    t_start = time.perf_counter()
    load_start = os.getloadavg()
    root = Path(workdir).resolve()  # Orbax refuses relative checkpoint paths
    root.mkdir(parents=True, exist_ok=True)
    stages = Stages(root, rerun, echo)
    if cfg.compilation_cache:
        enable_compilation_cache(root / "xla_cache")
    prep = prepare(cfg, root, stages)
    paths, bucket = prep.paths, prep.bucket

    # adapt with the ARank layer list, then the two fine-tunes with the same budget
    # The official random start keeps the stage's earlier fingerprint (finished runs stay cached).
    adapt_inputs = {**cfg.mod_kwargs, **cfg.router_start_kwargs}
    layers = stages.done["arank"].result["mod_layers"]
    warmup = cfg.router_warmup_steps
    if not warmup:
        adapted = stages.run(
            "adapt", adapt_inputs, [paths.ckpt("mod_init") / "config.json"],
            lambda: adapt_stage(prep, paths.ckpt("mod_init"), layers, cfg.seed, cfg.router_start,
                                cfg.router_start_samples, **cfg.mod_kwargs), deps=("arank",))
    else:  # probe: the first steps keep every token, then the official routing (router_warmup_steps)
        warm_kw = {**cfg.mod_kwargs, "routing_ratio": 0.0, "router_aux_loss_coef": 0.0}
        stages.run("adapt_warmup", {**adapt_inputs, **warm_kw}, [paths.ckpt("mod_warm_init") / "config.json"],
                   lambda: adapt_stage(prep, paths.ckpt("mod_warm_init"), layers, cfg.seed, cfg.router_start,
                                       cfg.router_start_samples, **warm_kw), deps=("arank",))
        finetune_stage(stages, prep, cfg.finetune, "mod_warmup", paths.ckpt("mod_warm_init"), paths.train("mod_warmup"),
                       paths.ckpt("mod_warmup"), ("adapt_warmup", "tfds"), num_steps=warmup)
        adapted = stages.run("adapt", {**adapt_inputs, "router_warmup_steps": warmup},
                             [paths.ckpt("mod_init") / "config.json"],
                             lambda: reroute_stage(paths.ckpt("mod_warmup"), paths.ckpt("mod_init"), cfg.mod_kwargs),
                             deps=("mod_warmup",))
    ft = {"mod_ft": finetune_stage(stages, prep, cfg.finetune, "mod_ft", paths.ckpt("mod_init"), paths.train("mod_ft"),
                                   paths.ckpt("mod_ft"), ("adapt", "tfds"),
                                   num_steps=cfg.finetune.num_steps - warmup if warmup else None),
          "dense_ft": finetune_stage(stages, prep, cfg.finetune, "dense_ft", paths.ckpt("dense"), paths.train("dense_ft"),
                                     paths.ckpt("dense_ft"), ("dense", "tfds"))}

    # held-out evaluation
    ev = {}
    eval_inputs = (cfg.eval_batch, cfg.eval_limit, cfg.eval_max_new_tokens, bucket)
    for name in ("dense", "dense_ft", "mod_ft"):
        out = paths.eval(name)
        ev[name] = stages.run(f"eval_{name}", eval_inputs, [out / "metrics.json"],
                              lambda name=name, out=out: eval_stage(paths.ckpt(name), paths, out, cfg, bucket),
                              deps=(name, "dataset"))

    def make_routing():
        from gmod_jax.eval.results import AnswersFile

        answers = AnswersFile(paths.eval("mod_ft") / "answers.jsonl").answers()
        return routing_stage(paths.ckpt("mod_ft"), paths, paths.routing, cfg, answers)

    routing = stages.run("routing", (cfg.routing_samples, cfg.num_overlays),
                         [paths.routing / "routing_summary.json"], make_routing, deps=("eval_mod_ft",))
    speed = stages.run("speed", (cfg.speed_batch, cfg.speed_repeats, bucket), [],
                       lambda: speed_stage(paths.ckpt("mod_ft"), paths, cfg, bucket), deps=("mod_ft",))

    # report
    from demo.report import write_report

    total = time.perf_counter() - t_start
    summary = {
        "workdir": str(root), "total_seconds_this_run": total,
        "stage_seconds": {n: s.seconds for n, s in stages.done.items()},
        "cached": [n for n, s in stages.done.items() if s.cached],
        "ran": [n for n, s in stages.done.items() if not s.cached],
        "load_average_start": load_start, "load_average_end": os.getloadavg(), "cpu_count": os.cpu_count(),
        "model": dataclasses.asdict(prep.model), "mod_layers": adapted.result["mod_layers"],
        "arank": stages.done["arank"].result, "dense_train": stages.done["dense"].result,
        "vision": stages.done["vision"].result if "vision" in stages.done else None,
        "pretrain": stages.done["pretrain"].result if "pretrain" in stages.done else None,
        "finetune": {k: v.result for k, v in ft.items()}, "eval": {k: v.result for k, v in ev.items()},
        "routing": routing.result, "speed": speed.result, "dataset": stages.done["dataset"].result,
        "tokenizer": stages.done["tokenizer"].result, "prompt_bucket": bucket,
    }
    summary["criteria"] = check_criteria(cfg, summary)
    write_json(root / "summary.json", summary)
    write_report(root, cfg, summary)
    echo(f"report: {root / 'report.md'}")
    for c in summary["criteria"]:
        echo(f"  [{'ok' if c['ok'] else 'MISSED'}] {c['what']}: {c['value']}")
    return summary


def check_criteria(cfg: DemoConfig, s: dict) -> list[dict]:
    """The demo's acceptance targets, evaluated on this run's numbers."""
    ev = s["eval"]
    dense_acc, ft_acc, mod_acc = ev["dense"]["accuracy"], ev["dense_ft"]["accuracy"], ev["mod_ft"]["accuracy"]
    first_run = sum(s["stage_seconds"].values())
    return [
        {"what": f"dense (stage 1) held-out accuracy >= {cfg.target_dense_accuracy:g}%",
         "value": f"{dense_acc:.2f}%", "ok": dense_acc >= cfg.target_dense_accuracy},
        {"what": f"γ-MoD within {cfg.target_max_accuracy_drop:g} points of the dense fine-tune",
         "value": f"{mod_acc:.2f}% vs {ft_acc:.2f}% ({mod_acc - ft_acc:+.2f})",
         "ok": mod_acc >= ft_acc - cfg.target_max_accuracy_drop},
        {"what": f"γ-MoD skips >= {cfg.target_routable_skip:.0%} of routable tokens in its MoD layers (prefill)",
         "value": f"{s['routing']['routable_skip']:.1%}", "ok": s["routing"]["routable_skip"] >= cfg.target_routable_skip},
        {"what": f"all stages together within {cfg.target_minutes:g} minutes",
         "value": f"{first_run / 60:.1f} min (sum of stage times when they ran)",
         "ok": first_run <= 60 * cfg.target_minutes},
    ] + patch_criteria(cfg, s["routing"].get("patches"))


def patch_criteria(cfg: DemoConfig, patches: dict | None) -> list[dict]:
    """Issue 26's routing target, when the scenes carry patch maps: the MoD layers skip at least
    `target_image_skip` of the image tokens, and at least `target_background_share` of the
    skipped image tokens are background patches (held-out routing trace, all MoD layers)."""
    if not patches:
        return []
    o = patches["overall"]
    share = o["background_share"]
    return [{"what": f"γ-MoD skips >= {cfg.target_image_skip:.0%} of the image tokens in its MoD layers, "
                     f">= {cfg.target_background_share:.0%} of them background patches",
             "value": f"{_share(o['image_skipped'])} skipped, {_share(share)} of them background "
                      f"(background {_share(o['background_skipped'])} skipped, objects {_share(o['object_skipped'])})",
             "ok": (o["image_skipped"] or 0.0) >= cfg.target_image_skip
                   and share is not None and share >= cfg.target_background_share}]


def _share(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


# ----------------------------------------------------------------------------------------------
# Command line


def main(argv=None, config: DemoConfig | None = None, echo: Callable[[str], None] = print) -> dict:
    """CLI entry; `config` (tests) replaces the config file. Returns the run summary."""
    from gmod_jax.config_files import OverrideError, apply_overrides

    ap = argparse.ArgumentParser(prog="python -m demo", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--workdir", required=True, help="output directory (reused on reruns)")
    ap.add_argument("--config", default=None, help=f"demo config file (default {DEFAULT_CONFIG.name})")
    ap.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                    help="override DemoConfig fields, nested with dots (e.g. dense_train.num_steps=100)")
    ap.add_argument("--rerun", nargs="+", default=[], metavar="STAGE", help="run these stages even if cached")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every save at INFO
    try:
        cfg = config if config is not None else load_config(args.config)
        cfg = apply_overrides(cfg, args.overrides)
    except (OverrideError, ValueError, TypeError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}")
    return run_demo(cfg, args.workdir, tuple(args.rerun), echo)
