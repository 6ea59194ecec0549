"""`python -m demo` and `python -m demo.ablation` end to end at a drastically reduced
size (configs/demo_smoke.py): every stage runs through the real train / ARank / convert / eval /
visualize code, all artefacts and report sections exist, the ablation reuses the demo's stages,
and a second demo run reuses every stage."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

import gmod_jax

from demo import ablation
from demo import pipeline as demo

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "configs" / "demo_smoke.py"

STAGES = ("dataset", "tokenizer", "tfds", "vision", "pretrain", "dense", "arank", "adapt", "mod_ft", "dense_ft", "eval_dense",
          "eval_dense_ft", "eval_mod_ft", "routing", "speed")
ARTEFACTS = (
    "data/synthetic/manifest.json", "data/synthetic/train.json", "data/heldout_gqa/questions.jsonl",
    "data/tokenizer/tokenizer.model",
    "data/tfds/llava_conversations/synthetic_qa_vicuna_v1/1.0.0/dataset_info.json",
    "data/tfds/llava_conversations/synthetic_captions_plain/1.0.0/dataset_info.json",
    "train/pretrain/metrics.jsonl", "train/dense/metrics.jsonl", "train/mod_ft/metrics.jsonl",
    "train/dense_ft/metrics.jsonl",
    "ckpt/vision/config.json", "ckpt/pretrain/config.json", "ckpt/dense/config.json", "ckpt/dense/tokenizer.model", "ckpt/mod_init/config.json",
    "ckpt/mod_ft/config.json", "ckpt/dense_ft/config.json",
    "arank/arank.json", "arank/arank.png", "eval/dense/metrics.json", "eval/dense_ft/metrics.json",
    "eval/mod_ft/metrics.json", "eval/mod_ft/answers.jsonl", "routing/routing_summary.json",
    "routing/skip_rate_by_token_type.png", "routing/overlay_0.png", "loss_curves.png", "summary.json", "report.md",
)
SECTIONS = ("## Acceptance targets", "## Results on the held-out split", "## Prefill speed", "## ARank",
            "## Training", "## Where γ-MoD skips", "## Set-up", "## Stage times")


def test_demo_smoke_end_to_end_and_cache(tmp_path):
    cfg = demo.load_config(SMOKE)
    lines: list[str] = []
    first = demo.main(["--workdir", str(tmp_path)], config=cfg, echo=lines.append)
    assert set(first["ran"]) == set(STAGES) and not first["cached"]
    for rel in ARTEFACTS:
        assert (tmp_path / rel).is_file(), rel
    report = (tmp_path / "report.md").read_text()
    for section in SECTIONS:
        assert section in report, section
    for image in ("arank/arank.png", "loss_curves.png", "routing/skip_rate_by_token_type.png",
                  "routing/overlay_0.png"):
        assert f"]({image})" in report, image

    summary = json.loads((tmp_path / "summary.json").read_text())
    mod_layers = summary["mod_layers"]
    assert len(mod_layers) == cfg.model.text.num_layers - cfg.num_dense
    assert json.loads((tmp_path / "ckpt/mod_ft/config.json").read_text())["mod"]["layers"] == mod_layers
    ev = summary["eval"]
    assert ev["dense"]["prefill_skip_ratio"] == 0.0 and ev["mod_ft"]["mod_layers"] == mod_layers
    assert ev["dense"]["n"] == ev["mod_ft"]["n"] == summary["dataset"]["questions"]
    assert 0.0 <= summary["routing"]["routable_skip"] <= 1.0
    # The γ-MoD fine-tune logs which routable token types it skipped; the report's training table shows it.
    by_type = summary["finetune"]["mod_ft"]["final_train_skip_by_type"]
    assert set(by_type) == {"system", "image"} and all(0.0 <= v <= 1.0 for v in by_type.values())
    assert f"(image {100 * by_type['image']:.1f}%, system {100 * by_type['system']:.1f}%)" in report
    assert summary["speed"]["ms_per_sample_dense"] > 0 and summary["speed"]["ms_per_sample_mod"] > 0
    assert {c["what"].split()[0] for c in summary["criteria"]} >= {"dense", "γ-MoD", "all"}
    # The scenes carry patch maps (patch_grid): background vs object patches skipped, per MoD layer,
    # in the summary, the report's table and the targets.
    patches = summary["routing"]["patches"]
    assert len(patches["per_layer"]) == len(mod_layers)
    o = patches["overall"]
    assert o["background"] + o["objects"] == len(mod_layers) * cfg.routing_samples * 4  # 2x2 patches per image
    assert "| MoD layer | background patches skipped |" in report and "| **all MoD layers** |" in report
    assert any("background patches" in c["what"] for c in summary["criteria"])

    # The ablation command on the same demo workdir: it reuses the demo's upstream stages (data,
    # tower, pre-training, dense model, ARank) and runs only its rows.
    # Its rows start the router as the demo config says: here the redundancy start, which per-layer
    # routers ("not_shared") take too, every layer from the same direction.
    out = ablation.main(["--workdir", str(tmp_path / "ablation"), "--demo-workdir", str(tmp_path),
                         "--steps", "1", "--only", "dense_ft", "all_layers", "not_shared",
                         "--set", "router_start=redundancy"], config=cfg, echo=lambda s: None)
    rows = {r["name"]: r for r in out["rows"]}
    assert set(rows) == {"dense_ft", "all_layers", "not_shared"}
    per_layer = np.asarray(gmod_jax.load(str(tmp_path / "ablation/ckpt/not_shared_init")).params["llm"]["mod_router"]
                           ["kernel"])
    assert per_layer.ndim == 3 and len(per_layer) > 1  # (a random init differs per layer)
    for layer in per_layer[1:]:
        np.testing.assert_array_equal(layer, per_layer[0])
    assert rows["all_layers"]["mod_layers"] == list(range(cfg.model.text.num_layers))
    assert rows["dense_ft"]["prefill_skip_ratio"] == 0.0
    assert rows["all_layers"]["paper_gflops"] <= rows["dense_ft"]["paper_gflops"]
    table = (tmp_path / "ablation" / "ablation.md").read_text()
    assert "| MoD layer | All layers |" in table and "| Dense |" in table
    assert json.loads((tmp_path / "ablation" / "ablation.json").read_text())["steps"] == 1

    # Second run: every stage comes from its stamp; only the report is rewritten.
    lines.clear()
    second = demo.main(["--workdir", str(tmp_path)], config=cfg, echo=lines.append)
    assert not second["ran"] and set(second["cached"]) == set(STAGES)
    assert second["eval"] == first["eval"]
    assert second["total_seconds_this_run"] < 15

    # A changed setting reruns its stage (and what depends on it) only.
    third = demo.main(["--workdir", str(tmp_path), "--set", f"routing_samples={cfg.routing_samples - 1}"],
                      config=cfg, echo=lines.append)
    assert third["ran"] == ["routing"]

    # A changed upstream checkpoint retrains the fine-tune from it: the routing ratio lives in the
    # adapted checkpoint, not in the fine-tune's own config, and a finished fine-tune workdir with
    # the same config must not be taken for a resumable run of the new one.
    # The same run also takes issue 26's two router probes: the redundancy start (fitted on the
    # training prompts) and a one-step all-kept warm-up before the official routing.
    before = json.loads((tmp_path / "stages/mod_ft.json").read_text())["result"]
    fourth = demo.main(["--workdir", str(tmp_path), "--set", f"routing_ratio={cfg.routing_ratio / 2}",
                        "router_start=redundancy", "router_warmup_steps=1"], config=cfg, echo=lines.append)
    assert {"adapt_warmup", "mod_warmup", "adapt", "mod_ft", "eval_mod_ft"} <= set(fourth["ran"])
    assert "dense_ft" not in fourth["ran"]
    after = json.loads((tmp_path / "stages/mod_ft.json").read_text())["result"]
    assert after["final_train_skip_ratio"] < before["final_train_skip_ratio"]
    assert after["steps"] == cfg.finetune.num_steps - 1
    warm = json.loads((tmp_path / "stages/adapt_warmup.json").read_text())["result"]
    assert warm["router_start"] == "redundancy" and warm["mod"]["routing_ratio"] == 0.0
    assert 0.0 <= warm["router_start_fit"]["object_over_background"] <= 1.0
    assert len(warm["router_start_fit"]["object_over_background_random_starts"]) == 10
    rerouted = json.loads((tmp_path / "ckpt/mod_init/config.json").read_text())["mod"]
    assert rerouted["routing_ratio"] == cfg.routing_ratio / 2


def test_stages_rerun_what_changed_and_what_depends_on_it(tmp_path):
    calls = []

    def pipeline(a_input, b_input, rerun=()):
        stages = demo.Stages(tmp_path, rerun, echo=lambda s: None)
        out = tmp_path / "a.txt"

        def stage_a():
            calls.append("a")
            out.write_text(str(a_input))
            return {"value": a_input}

        stages.run("a", a_input, [out], stage_a)
        stages.run("b", b_input, [], lambda: calls.append("b") or {"value": b_input}, deps=("a",))
        return stages

    pipeline(1, 1)
    assert calls == ["a", "b"]
    stages = pipeline(1, 1)
    assert calls == ["a", "b"] and stages.done["a"].cached and stages.done["a"].result == {"value": 1}
    pipeline(1, 2)  # b's input changed: only b
    assert calls == ["a", "b", "b"]
    pipeline(2, 2)  # a's input changed: a, and b through its dependency
    assert calls == ["a", "b", "b", "a", "b"]
    (tmp_path / "a.txt").unlink()  # a lost output: a reruns; same inputs, so b stays valid
    pipeline(2, 2)
    assert calls[5:] == ["a"]
    pipeline(2, 2, rerun=("b",))
    assert calls[6:] == ["b"]


def test_question_kinds_cover_every_generated_question():
    from gmod_jax.data.synthetic import SyntheticConfig, make_sample

    cfg = SyntheticConfig(max_turns=3, text_only_fraction=0.0)
    kinds = set()
    for i in range(300):
        for turn in make_sample(0, "train", i, cfg)["conversations"][::2]:
            kind = demo.question_kind(turn["value"])
            assert kind in demo.QUESTION_FAMILIES, turn["value"]
            kinds.add(kind)
    assert kinds == set(demo.QUESTION_FAMILIES)


def test_ablation_rows_that_coincide_share_a_run():
    cfg = demo.load_config(SMOKE)
    from gmod_jax import token_types as tt

    present = frozenset({tt.SYSTEM, tt.IMAGE, tt.QUESTION, tt.ANSWER})

    class _Prep:  # only the model is read by `resolve`
        model = cfg.model

    keys = {r.name: ablation.run_key(ablation.resolve(r, cfg, _Prep, (1, 2)), present) for r in ablation.ROWS}
    assert keys["arank"] == keys["shared"] == keys["ratio_50"] == keys["mask_qa"]  # official == Q+A on image data
    assert len({keys[n] for n in ("mask_none", "mask_q", "not_shared", "all_layers", "every_2nd", "ratio_17")}) == 6
    # The demo's router start goes into every row's adaptation (and its run key); the official
    # random start adds nothing, so runs finished before the option existed stay cached.
    assert all("start" not in ablation.resolve(r, cfg, _Prep, (1, 2)) for r in ablation.ROWS)
    redundancy = dataclasses.replace(cfg, router_start="redundancy")
    start = ablation.resolve(ablation.ROWS[0], redundancy, _Prep, (1, 2))["start"]
    assert start == {"router_start": "redundancy", "router_start_samples": cfg.router_start_samples}
    assert ablation.run_key(ablation.resolve(ablation.ROWS[0], redundancy, _Prep, (1, 2)), present) \
        != keys[ablation.ROWS[0].name]


@pytest.mark.parametrize("text,kind", [("What color is the star?", "color"),
                                       ("How many red shapes are there?", "count_color"),
                                       ("How many circles are there?", "count_shape"),
                                       ("Is there a blue square?", "presence"),
                                       ("Is the red circle on the left or the right?", "left_right"),
                                       ("Which shape is at the top?", "top_bottom"),
                                       ("Is the red circle at the top or the bottom?", "top_bottom")])
def test_question_kind(text, kind):
    assert demo.question_kind("<image>\n" + text) == kind
