"""`python -m gmod_jax.bench` end to end on a tiny config: JSON schema, BENCHMARKS.md section
rewrite that leaves everything else alone, platform gating, config overrides. No timing
assertions: speed is what the benchmark measures, not what tests check."""

from __future__ import annotations

import json
import textwrap

import pytest

from gmod_jax import benchmarks_md
from gmod_jax.bench import runner
from gmod_jax.bench.config import BenchConfig, load_config
from gmod_jax.config_files import apply_overrides

TINY_CONFIG = textwrap.dedent('''
    import dataclasses
    from gmod_jax import config as C
    from gmod_jax.bench import BenchConfig, Case

    def get_config():
        model = C.tiny(
            vision=C.VisionConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                                  image_size=56, patch_size=14),
            text=dataclasses.replace(C.tiny().text, num_layers=3, num_kv_heads=2),
            image_token_index=127, pad_token_id=0)
        return BenchConfig(section="tiny", title="tiny test bench", model=model, placement="explicit",
                           mod_layers=(1,), system_tokens=3, question_tokens=9, answer_tokens=4,
                           cases=(Case("prefill", 1), Case("decode", 2, new_tokens=3), Case("train_step", 1)),
                           warmup=0, repeats=1, xla_flops=False, torch_baseline=True, require_platform={platform!r})
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
    assert set(cases) == {"prefill_b1", "decode_b2_n3", "train_step_b1"}
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

    prefill = cases["prefill_b1"]
    assert prefill["torch_dense_ms"] > 0
    assert prefill["torch_max_abs_logit_diff"] < 1e-3  # the baseline runs the very same model

    decode = cases["decode_b2_n3"]
    if "skipped" not in decode:  # the KV-cache generator is optional at this layer
        assert CASE_KEYS <= set(decode)
        assert decode["tokens_per_s_dense"] > 0 and decode["tokens_per_s_mod"] > 0
        assert decode["decode_steps"] == 2 and 0.0 <= decode["skip_ratio"] <= 1.0
        assert decode["prefill_skip_ratio"] == pytest.approx((routable // 2) / t)

    text = md.read_text()
    assert text.startswith(keep_before) and text.endswith(keep_after)
    assert "stale" not in text and "tiny test bench" in text and text.count("<!-- bench:tiny:start -->") == 1
    assert "| prefill_b1 | 1 | 28 |" in text

    # re-rendering the section from the JSON (e.g. results fetched from a GPU machine) is exact
    other = tmp_path / "OTHER.md"
    other.write_text(keep_before)
    assert runner.main(["--from-json", str(out), "--markdown", str(other)]) == 0
    section = text[text.index("<!-- bench:tiny:start -->"):text.index("<!-- bench:tiny:end -->")]
    assert other.read_text().startswith(keep_before) and section in other.read_text()
