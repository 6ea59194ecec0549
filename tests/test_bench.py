"""`python -m bench` end to end on a tiny config: JSON schema, BENCHMARKS.md section
rewrite that leaves everything else alone, platform gating, config overrides. No timing
assertions: speed is what the benchmark measures, not what tests check."""

from __future__ import annotations

import json
import textwrap

import pytest

from gmod_jax import benchmarks_md
from bench import runner
from bench.config import BenchConfig, load_config
from gmod_jax.config_files import apply_overrides

TINY_CONFIG = textwrap.dedent('''
    import dataclasses
    from gmod_jax import config as C
    from bench import BenchConfig, Case

    def get_config():
        model = C.tiny(
            vision=C.VisionConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                                  image_size=56, patch_size=14),
            text=dataclasses.replace(C.tiny().text, num_layers=3, num_kv_heads=2),
            image_token_index=127, pad_token_id=0)
        return BenchConfig(section="tiny", title="tiny test bench", model=model, placement="explicit",
                           mod_layers=(1,), system_tokens=3, question_tokens=9, answer_tokens=4,
                           cases=(Case("prefill", 1), Case("decode", 2, new_tokens=3), Case("train_step", 1)),
                           warmup=0, repeats=1, xla_flops=False, torch_baseline=True, official_rule_rows=True,
                           router_fit_steps=40, require_platform={platform!r})
''')

CASE_KEYS = {"name", "kind", "batch", "seq_len", "dense_ms", "mod_ms", "speedup", "flop_bound_speedup",
             "speedup_over_bound", "skip_ratio", "dense_flops_analytic", "mod_flops_analytic", "dense_flops_xla",
             "mod_flops_xla", "compile_s_dense", "compile_s_mod"}


def _write_config(tmp_path, platform=None):
    path = tmp_path / "bench_tiny.py"
    path.write_text(TINY_CONFIG.format(platform=platform))
    return path


def test_replace_section_touches_nothing_else():
    other = "<!-- bench:gpu:start -->\nGPU table\n<!-- bench:gpu:end -->"
    doc = f"# Benchmarks\n\nintro text\n\n<!-- bench:cpu:start -->\nold\n<!-- bench:cpu:end -->\n\n{other}\ntrailer\n"
    new = benchmarks_md.replace_section(doc, "cpu", "new table\n")
    assert new == doc.replace("\nold\n", "\nnew table\n")
    appended = benchmarks_md.replace_section(new, "tpu", "tpu table")
    assert appended.startswith(new.rstrip("\n")) and appended.endswith(
        "<!-- bench:tpu:start -->\ntpu table\n<!-- bench:tpu:end -->\n")
    fresh = benchmarks_md.replace_section(None, "cpu", "t")
    assert fresh.startswith("# Benchmarks") and "<!-- bench:cpu:start -->\nt\n<!-- bench:cpu:end -->" in fresh
    with pytest.raises(ValueError, match="without"):
        benchmarks_md.replace_section("<!-- bench:cpu:start -->\nno end\n", "cpu", "x")


def test_override_and_config_validation(tmp_path):
    config = load_config(_write_config(tmp_path))
    changed = apply_overrides(config, ["model.text.num_layers=4", "torch_baseline=False", "torch_attention=eager"])
    assert changed.model.text.num_layers == 4 and changed.torch_baseline is False
    assert changed.torch_attention == "eager" and config.model.text.num_layers == 3
    with pytest.raises(ValueError, match="unknown config key"):
        apply_overrides(config, ["model.text.nope=1"])
    with pytest.raises(ValueError, match="dense base model"):
        BenchConfig(section="x", title="x", model=config.mod_model_config(), cases=())


def test_platform_gate_exits_cleanly(tmp_path, capsys):
    out = tmp_path / "out.json"
    assert runner.main(["--config", str(_write_config(tmp_path, "tpu")), "--json", str(out)]) == 0
    assert "needs a 'tpu' JAX backend" in capsys.readouterr().out
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.torch
def test_bench_end_to_end(tmp_path):
    md = tmp_path / "BENCHMARKS.md"
    keep_before = "# Benchmarks\n\nhand-written intro (must survive)\n\n"
    keep_after = "\n<!-- bench:gpu:start -->\nGPU numbers\n<!-- bench:gpu:end -->\n"
    md.write_text(keep_before + "<!-- bench:tiny:start -->\nstale\n<!-- bench:tiny:end -->\n" + keep_after)
    out = tmp_path / "bench.json"
    assert runner.main(["--config", str(_write_config(tmp_path)), "--json", str(out), "--markdown", str(md)]) == 0

    result = json.loads(out.read_text())
    assert {"machine", "date", "config", "cases"} <= set(result)
    assert {"cpu", "cores", "jax", "torch", "platform"} <= set(result["machine"])
    assert result["config"]["mod_layers_resolved"] == [1]
    assert "capacity" in result["config"]["routing_rule"]
    cases = {c["name"]: c for c in result["cases"]}
    assert set(cases) == {"prefill_b1", "prefill_official_b1", "decode_b2_n3", "train_step_b1"}
    assert [c["name"] for c in result["cases"]][:2] == ["prefill_b1", "prefill_official_b1"]
    t = 3 + 16 + 9
    routable = 3 + 16  # official masking: system + image
    for name in ("prefill_b1", "train_step_b1"):
        case = cases[name]
        assert CASE_KEYS <= set(case), CASE_KEYS - set(case)
        assert case["seq_len"] == t and case["dense_ms"] > 0 and case["mod_ms"] > 0
        # the capacity rule skips exactly floor(0.5 · routable) tokens per row and MoD layer
        assert case["skip_ratio"] == pytest.approx((routable // 2) / t)
        assert case["mod_capacity"] == t - routable // 2
        assert case["flop_bound_speedup"] == pytest.approx(case["dense_flops_analytic"] / case["mod_flops_analytic"])
        assert case["flop_bound_speedup"] > 1.0
        assert case["speedup"] == pytest.approx(case["dense_ms"] / case["mod_ms"])
        assert case["dense_flops_xla"] is None  # xla_flops=False in this config
    assert cases["train_step_b1"]["dense_flops_analytic"] > cases["prefill_b1"]["dense_flops_analytic"]

    # The fitted router makes the official threshold rule skip about the capacity rule's share of
    # the routable tokens (before the fit it skips nothing: random keep-probs sit near 0.5).
    fit = result["router_fit"]
    assert fit["steps"] == 40 and fit["rows"] == 1
    assert fit["target_routable_skip"] == pytest.approx((routable // 2) / routable)
    assert fit["official_routable_skip_before"] < 0.1
    assert abs(fit["official_routable_skip"] - fit["target_routable_skip"]) <= 0.1
    official = cases["prefill_official_b1"]
    assert CASE_KEYS <= set(official) and official["routing_rule"] == "threshold" and official["official_rule"]
    assert official["routable_skip_ratio"] == pytest.approx(fit["official_routable_skip"])
    assert official["capacity_buckets"] == sorted(set(official["capacity_buckets"])) and official["capacity_buckets"][-1] == t
    assert official["flop_bound_speedup"] == pytest.approx(
        official["dense_flops_analytic"] / official["mod_flops_analytic"])
    assert official["flop_bound_speedup"] > 1.0 and "torch_dense_ms" not in official
    assert result["config"]["routing_rule"].startswith("capacity")

    prefill = cases["prefill_b1"]
    assert prefill["torch_dense_ms"] > 0
    assert prefill["torch_max_abs_logit_diff"] < 1e-3  # the baseline runs the very same model

    decode = cases["decode_b2_n3"]
    if "skipped" not in decode:  # the KV-cache generator is optional at this layer
        assert CASE_KEYS <= set(decode)
        assert decode["tokens_per_s_dense"] > 0 and decode["tokens_per_s_mod"] > 0
        assert decode["decode_steps"] == 2 and 0.0 <= decode["skip_ratio"] <= 1.0
        assert decode["prefill_skip_ratio"] == pytest.approx((routable // 2) / t)
        # the PyTorch decode baseline: greedy `generate` on the same weights emits the same tokens
        assert decode["tokens_per_s_torch"] is None or decode["tokens_per_s_torch"] > 0
        assert decode["torch_generate_ms"] > 0 and decode["torch_tokens_equal_jax_dense"] is True

    text = md.read_text()
    assert text.startswith(keep_before) and text.endswith(keep_after)
    assert "stale" not in text and "tiny test bench" in text and text.count("<!-- bench:tiny:start -->") == 1
    assert "| prefill_b1 | 1 | 28 |" in text and "| prefill_official_b1 | 1 | 28 |" in text
    assert "**Official rule rows**" in text

    # re-rendering the section from the JSON (e.g. results fetched from a GPU machine) is exact
    other = tmp_path / "OTHER.md"
    other.write_text(keep_before)
    assert runner.main(["--from-json", str(out), "--markdown", str(other)]) == 0
    section = text[text.index("<!-- bench:tiny:start -->"):text.index("<!-- bench:tiny:end -->")]
    assert other.read_text().startswith(keep_before) and section in other.read_text()


def test_bench_train_step_is_the_trainers_step(tmp_path):
    """The train-step rows time `python -m train`'s program: the HLO the benchmark compiles is the
    one `train.step` builds for the same model, optimizer and batch (accumulation over 2
    micro-batches included), and one step of it leaves the frozen tower bitwise unchanged."""
    import dataclasses

    import jax
    import jax.numpy as jnp
    import numpy as np

    from gmod_jax import sharding as shd
    from bench.config import Case
    from gmod_jax.models.llama import routing_capacity
    from train import data as data_lib
    from train import step as step_lib
    from train.config import TrainConfig

    config = load_config(_write_config(tmp_path))
    config = dataclasses.replace(config, cases=(Case("train_step", 2),),
                                 optim=dataclasses.replace(config.optim, grad_accum_steps=2))
    _, mod = runner.build_models(config)
    x = runner.make_inputs(config, 2)
    batch_np = runner.trainer_batch(config, x)
    assert batch_np["input_ids"].shape == (2, 1, config.seq_len)
    labelled = batch_np["labels"] != data_lib.IGNORE_INDEX
    assert labelled.sum() == 2 * config.answer_tokens and np.all(batch_np["labels"][labelled] == batch_np["input_ids"][labelled])

    mesh = shd.make_mesh()
    with jax.set_mesh(mesh):
        batch = data_lib.global_arrays(batch_np, shd.batch_sharding(mesh, 1), 1, row_axis=1)
        spec, bench_step, cap = runner.train_step_program(config, mod.config, x["types"], mesh)
        # what `train.loop.run` builds for a run with this model, optimizer and global batch
        run = TrainConfig(model=mod.config, optim=config.optim, global_batch=2, num_steps=runner.TRAIN_TOTAL_STEPS)
        train_spec = step_lib.make_run_spec(run.model, run.optim, run.total_steps(None), mesh)
        train_step = step_lib.make_train_step(train_spec, run.optim.grad_accum_steps,
                                              routing_capacity(run.model, x["types"], "train"))
        state = runner.fresh_train_state(spec, mod.params)
        assert bench_step.lower(state, batch).as_text() == train_step.lower(state, batch).as_text()
        assert "vision" not in state["opt_state"][1][0].mu  # the tower has no Adam moments: frozen
        vision_before = jax.device_get(state["params"]["vision"])
        new_state, metrics = bench_step(state, batch)
    assert cap is not None and np.isfinite(float(metrics["loss"])) and int(new_state["step"]) == 1
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(new_state["params"]["vision"]), vision_before)
    # the router loss reaches the router (step 0 of the warmup has lr 0, so look at Adam's moment)
    assert np.any(np.asarray(new_state["opt_state"][1][0].mu["llm"]["mod_router"]["kernel"]) != 0)


def test_threshold_routing_loss_is_logistic_at_the_official_threshold():
    """The router fit's loss: softplus of the signed log-odds margin to the threshold, averaged
    over real tokens (a NumPy formula)."""
    import jax.numpy as jnp
    import numpy as np

    from bench.router_fit import threshold_routing_loss

    r = np.array([[0.9, 0.004, 0.006, 0.3]], np.float32)
    selected = np.array([[True, False, True, False]])
    mask = np.array([[True, True, True, False]])
    margin = np.log(r / (1 - r)) - np.log(0.005 / 0.995)
    per_token = np.log1p(np.exp(-np.where(selected, 1.0, -1.0) * margin))
    want = per_token[mask].mean()
    got = float(threshold_routing_loss(jnp.asarray(r), jnp.asarray(selected), jnp.asarray(mask), 0.005))
    assert got == pytest.approx(want, rel=1e-5)
    # the boundary is the official threshold, not r = 0.5: r = 0.006 is on the kept side
    assert per_token[0, 1] < np.log(2) and per_token[0, 2] < np.log(2)


def test_calibrate_router_scale_finds_the_target_skip():
    """The calibration's bisection on a monotone stand-in for the official walk (skip = a ramp in
    the router-kernel scale): it lands within the tolerance of the target, probes scales on the
    correct side after each overshoot, and scales every router tensor, nothing else."""
    import numpy as np

    from bench.router_fit import calibrate_router_scale

    params = {"llm": {"mod_router": {"kernel": np.full((4, 1), 0.5)}, "other": np.ones(3)}}
    seen = []

    def skip_of(p):
        assert np.array_equal(p["llm"]["other"], np.ones(3))
        scale = float(p["llm"]["mod_router"]["kernel"][0, 0]) / 0.5
        seen.append(scale)
        return {"routable_skip": float(np.clip(0.15 * scale, 0.0, 1.0)), "skip": 0.0}

    scale, skips, history = calibrate_router_scale(skip_of, params, target=0.6, tolerance=0.01)
    assert abs(skips["routable_skip"] - 0.6) <= 0.01 and scale == pytest.approx(4.0, rel=0.07)
    assert [h[0] for h in history] == pytest.approx(seen)
    for (s0, k0), (s1, _) in zip(history, history[1:]):
        assert (s1 < s0) if k0 > 0.6 else (s1 > s0)
    # already on target: one probe, scale 1
    scale, _, history = calibrate_router_scale(lambda p: {"routable_skip": 0.5, "skip": 0.0}, params, 0.5)
    assert scale == 1.0 and len(history) == 1
