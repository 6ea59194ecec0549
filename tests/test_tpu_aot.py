"""`python -m train.aot`: TPU topologies by name, the loop-aware HLO cost walker, and a tiny γ-MoD
train step / prefill / decode compiled for a real TPU topology (v5e 2x2) through the CLI.

The TPU compile needs the `libtpu` package (requirements-dev.txt), not a TPU; it runs in a
subprocess so libtpu's process-wide state stays out of the test process.
"""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from tests.test_sharding import ROOT, subprocess_env
from train import aot_tables, hlo_cost
from train.tpu_topology import CHIPS, libtpu_available, parse_topology


@pytest.mark.parametrize("name, family, shape, chips", [
    ("v5p-64", "v5p", (2, 4, 4), 32), ("v4-32", "v4", (2, 2, 4), 16), ("v5e-256", "v5e", (16, 16), 256),
    ("v6e-16", "v6e", (4, 4), 16), ("v5litepod-16", "v5e", (4, 4), 16), ("v5e:2x2", "v5e", (2, 2), 4),
    ("v5p:4x4x8", "v5p", (4, 4, 8), 128),
])
def test_topology_names(name, family, shape, chips):
    t = parse_topology(name)
    assert (t.family, t.shape, t.chips) == (family, shape, chips)
    assert parse_topology(name, num_slices=2).chips == 2 * chips
    assert t.chip is CHIPS[family]


@pytest.mark.parametrize("name, match", [("v5p-63", "no standard"), ("v9-8", "unknown TPU generation"),
                                         ("tpu", "expected e.g."), ("v5e:2x2x2", "2-D")])
def test_topology_bad_names(name, match):
    with pytest.raises(ValueError, match=match):
        parse_topology(name)


def _compiled(f, *shapes):
    return jax.jit(f).lower(*[jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]).compile()


def test_hlo_cost_counts_loop_trips():
    """A 7-step scan of matmuls: XLA's cost analysis counts the body once, the walker 7 times; on
    straight-line code both agree on the matmul FLOPs (2·M·K·N each)."""
    def scanned(ws, x):
        return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, ws)[0]

    def straight(ws, x):
        for i in range(7):
            x = jnp.tanh(x @ ws[i])
        return x

    matmul = 2.0 * 64 * 128 * 128
    loop = hlo_cost.analyze(_compiled(scanned, (7, 128, 128), (64, 128)).as_text())
    flat_compiled = _compiled(straight, (7, 128, 128), (64, 128))
    flat = hlo_cost.analyze(flat_compiled.as_text())
    assert loop.flops == flat.flops == 7 * matmul
    assert loop.unknown_trip_loops == 0
    xla = hlo_cost.xla_cost_analysis(flat_compiled)["flops"]
    assert 7 * matmul <= xla < 7 * matmul * 1.05  # XLA adds the tanh element-wise work

    def dynamic(ws, x, n):
        return jax.lax.fori_loop(0, n, lambda i, h: jnp.tanh(h @ ws[0]), x)

    lowered = jax.jit(dynamic).lower(jax.ShapeDtypeStruct((7, 128, 128), jnp.float32),
                                     jax.ShapeDtypeStruct((64, 128), jnp.float32),
                                     jax.ShapeDtypeStruct((), jnp.int32))
    dyn = hlo_cost.analyze(lowered.compile().as_text())
    assert dyn.unknown_trip_loops == 1 and dyn.flops == matmul  # counted once, and said so


@pytest.mark.parametrize("window, strides, padding, lhs_dilation", [
    ((3, 3), (1, 1), "SAME", None), ((4, 1), (2, 1), ((3, 3), (0, 0)), None), ((3, 3), (1, 1), ((1, 2), (0, 1)), (2, 2)),
])
def test_hlo_cost_convolution_counts_only_real_window_positions(window, strides, padding, lhs_dilation):
    """Padded, strided and input-dilated convolutions: the walker's count equals XLA's (a
    convolution has no element-wise work around it here), so padding is not multiplied."""
    def conv(x, k):
        return jax.lax.conv_general_dilated(x, k, strides, padding, lhs_dilation=lhs_dilation,
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    compiled = _compiled(conv, (2, 9, 7, 5), (*window, 5, 6))
    walked = hlo_cost.analyze(compiled.as_text()).flops
    assert walked == pytest.approx(hlo_cost.xla_cost_analysis(compiled)["flops"], rel=1e-6)
    assert walked > 0


def test_hlo_shape_bytes():
    assert hlo_cost.shape_bytes("bf16[4,8]{1,0:T(8,128)(2,1)}") == 64
    assert hlo_cost.shape_bytes("(s32[], f32[2,3]{1,0}, pred[5])") == 4 + 24 + 5


def _run_aot(args, out):
    env = subprocess_env()
    env["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"
    proc = subprocess.run([sys.executable, "-m", "train.aot", *args, "--json", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


TINY = ["--topology", "v5e:2x2", "--set", "data.max_length=64", "--system-tokens", "4",
        "--prompt-text-tokens", "8", "--new-tokens", "16"]
FIELDS = {"name", "topology", "chips", "per_chip_bytes", "hbm_bytes", "fits", "flops", "bytes_accessed",
          "collectives", "estimated_step_s", "estimated_mfu"}


@pytest.mark.slow
@pytest.mark.skipif(not libtpu_available(), reason="libtpu is not installed (requirements-dev.txt)")
def test_tiny_gamma_mod_compiles_for_tpu(tmp_path):
    mod = _run_aot(["--config", "configs/tiny_gamma_mod.py", *TINY], tmp_path / "mod.json")
    dense = _run_aot(["--config", "configs/tiny_dense.py", *TINY, "--programs", "train_step"],
                     tmp_path / "dense.json")
    programs = {p["name"]: p for p in mod["programs"]}
    assert set(programs) == {"train_step", "prefill", "decode_step"}
    v5e = CHIPS["v5e"]
    for p in programs.values():
        assert FIELDS <= set(p), p.keys()
        assert p["topology"] == "v5e:2x2" and p["chips"] == 4 and p["hbm_bytes"] == v5e.hbm_bytes
        b = p["per_chip_bytes"]
        assert b["total"] >= b["arguments"] + b["temporaries"] > 0
        assert p["fits"] and p["flops"] > 0 and p["bytes_accessed"] > 0
        # FSDP over 4 chips: the params are all-gathered before use.
        kinds = {c["kind"] for c in p["collectives"]}
        assert "all-gather" in kinds, p["collectives"]
        assert all(c["count"] > 0 and c["bytes"] > 0 for c in p["collectives"])
        roofline = max(p["flops"] / v5e.peak_bf16_flops, p["bytes_accessed"] / v5e.hbm_bytes_per_s)
        assert p["estimated_step_s"] == pytest.approx(roofline)
        assert 0 < p["estimated_mfu"] < 1
    train = programs["train_step"]
    assert train["shapes"]["mod_capacity"] == 64 - (4 + 16) // 2  # half the system+image prefix skips
    # Gradients of the train step are reduced over the 4 FSDP shards.
    assert {"all-reduce", "reduce-scatter"} & {c["kind"] for c in train["collectives"]}
    assert programs["decode_step"]["unknown_trip_loops"] == 1  # the token loop: one iteration counted
    # Same shapes, fewer FLOPs: the MoD layers run on `mod_capacity` of the 64 tokens.
    (dense_train,) = dense["programs"]
    assert dense_train["shapes"]["seq_len"] == train["shapes"]["seq_len"] and dense_train["shapes"]["mod_capacity"] is None
    assert train["flops"] < dense_train["flops"] and train["model_flops"] < dense_train["model_flops"]
    # Prefill with the official threshold rule keeps a static capacity of every prompt token
    # (the skip is decided per token at run time), so its compiled FLOPs are the dense ones.
    assert programs["prefill"]["shapes"]["mod_capacity"] == programs["prefill"]["shapes"]["prompt_len"]
    assert mod["model"]["mod_layers"] == 2

    # docs/tpu_aot.md's tables are rendered from these reports by `python -m train.aot_tables`.
    page = tmp_path / "page.md"
    page.write_text("# TPU\n\nhand-written text stays\n")
    assert aot_tables.main([str(tmp_path), "--markdown", str(page)]) == 0
    text = page.read_text()
    assert text.startswith("# TPU\n\nhand-written text stays\n") and "<!-- bench:tpu-aot:start -->" in text
    rows = [line for line in text.splitlines() if line.startswith("| γ-MoD") or line.startswith("| tiny")]
    assert len(rows) == 4  # γ-MoD train_step, prefill, decode_step; dense train_step
    train_row = next(r for r in rows if "| train_step |" in r and "dispatch" in r)
    assert f"| {train['estimated_step_s']:.3g} | {train['estimated_mfu']:.1%} |" in train_row
    assert f"| {train['per_chip_bytes']['total'] / 1e9:.1f} | yes |" in train_row


HIGH_RES_RECIPE = """
from pathlib import Path
from gmod_jax import config as C
from train.config import load_recipe


def get_config():
    base = load_recipe(Path({root!r}) / "configs" / "tiny_gamma_mod.py")
    return base.replace(model=C.gamma_mod(C.{preset}(), "arank_mod", 0.5))
"""


@pytest.mark.slow
@pytest.mark.skipif(not libtpu_available(), reason="libtpu is not installed (requirements-dev.txt)")
def test_generation_compiles_with_the_models_own_image_shape(tmp_path):
    """MGM-HD (like LLaVA-HR) takes images of its own size (`pixel_shape`: the aux image), not
    CLIP's: the prefill compiled for TPU gets that (a 7B MGM-HD run failed on CLIP's 336 px)."""
    recipe = tmp_path / "recipe.py"
    recipe.write_text(HIGH_RES_RECIPE.format(root=str(ROOT), preset="tiny_mgm"))
    report = _run_aot(["--config", str(recipe), *TINY, "--programs", "prefill"], tmp_path / "out.json")
    (prefill,) = report["programs"]
    assert prefill["name"] == "prefill" and prefill["fits"] and prefill["flops"] > 0


@pytest.mark.parametrize("per_row, curve", [(3.0, 0.0), (3.0, 0.02), (0.7, 0.0), (50.0, 0.0)])
def test_find_batch_search_confirms_both_sides(monkeypatch, per_row, curve):
    """The batch search over a fake memory model (affine, or convex so predictions overshoot):
    the answer is the true largest fitting batch, with a compile just above it that does not fit."""
    from train import aot
    from train.config import load_recipe

    topology = parse_topology("v5e:2x2")
    budget = 0.95 * topology.chip.hbm_bytes
    fixed = 2e9

    def memory(b):
        return fixed + 1e8 * (per_row * b + curve * per_row * b * b)

    def fake_report(target, layout, hbm_fraction):
        b = target  # make_target is faked to return the per-shard batch
        total = memory(b)
        return aot.ProgramReport("train_step", "v5e:2x2", 4, "v5e", {"total": total}, topology.chip.hbm_bytes,
                                 hbm_fraction, total <= budget, 1.0, 1.0, [], 1.0, 0.5, 1.0, None, {}, 0,
                                 {}, 0.0), None

    monkeypatch.setattr(aot, "make_target", lambda cfg, topo, devices: cfg.global_batch)
    monkeypatch.setattr(aot, "train_step_report", fake_report)
    cfg = load_recipe(ROOT / "configs" / "tiny_gamma_mod.py")
    best, tried = aot.find_batch(cfg, topology, jax.devices()[:1], aot.Layout(), 0.95)
    truth = max(b for b in range(1, 5000) if memory(b) <= budget)
    assert best == truth
    assert tried[best].fits and not tried[best + 1].fits
    assert len(tried) <= 8, sorted(tried)

    # --find-batch-from: an exact earlier answer costs 2 compiles; a wrong one still finds the truth.
    for start, most in ((truth, 2), (truth + 1, 4), (truth + 7, 6), (max(2, truth - 3), 6), (2, 8)):
        best, tried = aot.find_batch(cfg, topology, jax.devices()[:1], aot.Layout(), 0.95, start=start)
        assert best == truth and tried[best].fits and not tried[best + 1].fits, (start, sorted(tried))
        assert start in tried and len(tried) <= most, (start, sorted(tried))


@pytest.mark.skipif(not libtpu_available(), reason="libtpu is not installed (requirements-dev.txt)")
def test_multislice_mesh_puts_only_data_across_slices():
    from gmod_jax.sharding import MeshConfig, make_mesh
    from train.tpu_topology import compile_devices

    devices = compile_devices(parse_topology("v5e:2x2", num_slices=2))
    assert len(devices) == 8 and {d.slice_index for d in devices} == {0, 1}
    mesh = make_mesh(MeshConfig(data=2, fsdp=-1, tensor=1), devices)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    for row, grid in enumerate(mesh.devices):
        assert {d.slice_index for d in grid.flat} == {row}  # each data replica is one slice
    with pytest.raises(ValueError, match="multiple of the slice count"):
        make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1), devices)


def _report(config: str, mod_layers: int, find_batch=None) -> dict:
    program = {"name": "train_step", "chips": 32, "per_chip_bytes": {"total": 40e9}, "fits": True, "flops": 4e14,
               "bytes_accessed": 5e12, "collectives": [{"kind": "all-gather", "count": 3, "bytes": 2e9}],
               "estimated_step_s": 2.0, "estimated_mfu": 0.5,
               "shapes": {"global_batch": 128, "grad_accum_steps": 2, "micro_batch": 64, "seq_len": 2048,
                          "mesh": {"data": 1, "fsdp": 32, "tensor": 1}}}
    report = {"config": config, "topology": "v5p-64 (v5p:2x4x4, 32 chips)", "programs": [program],
              "model": {"mod_layers": mod_layers, "mod_implementation": "gather", "attention_implementation": "auto"}}
    if find_batch:
        report["find_batch"] = find_batch
    return report


def test_aot_tables_render_programs_and_batch_searches(tmp_path):
    search = {"per_shard_batch": 41, "tried": {"1": {"fits": True, "total_bytes": 6.3e9},
                                               "42": {"fits": False, "total_bytes": 99.1e9},
                                               "2": {"fits": True, "total_bytes": 8.5e9}}}
    (tmp_path / "a.json").write_text(json.dumps(_report("configs/gamma_mod_llava_v15_7b.py", 28, search)))
    flags = "--xla_tpu_enable_windowed_einsum_for_all_gather=false"
    (tmp_path / "b.json").write_text(json.dumps({**_report("configs/llava_v15_7b_stage2.py", 0),
                                                 "libtpu_init_args": flags}))
    (tmp_path / "notes.json").write_text("{}")  # not a report: skipped
    text = aot_tables.render(aot_tables.load_reports(tmp_path))
    # 128 rows x 2048 tokens / 32 chips / 2.0 s = 4096 tokens/s/chip; 64 rows / 32 shards = 2 per chip.
    assert ("| γ-MoD-LLaVA-1.5-7B (auto attention, gather dispatch) | train_step | 2 x 2 of 2048 | 40.0 | yes | "
            "400.0 | 5000 | all-gather 3x 2.0 GB | 2 | 50.0% | 4,096 |") in text
    assert f"| LLaVA-1.5-7B stage 2 (auto attention, `LIBTPU_INIT_ARGS={flags}`) | train_step |" in text
    # The search lists its sizes in numeric order, failing ones marked.
    assert "| 41 | 1: 6.3, 2: 8.5, 42: 99.1 x |" in text
    assert aot_tables.main([str(tmp_path / "empty")]) == 2
