"""(g) Recipes, `--set` overrides, the LR schedule, freezing masks and the batch adapter (no compiles)."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from gmod_jax import token_types as tt
from tests.test_sharding import ROOT
from train import data as data_lib
from train import optimizer as opt
from gmod_jax.config_files import OverrideError, apply_overrides
from train.config import OptimConfig, TrainConfig, load_mesh_preset, load_recipe

CONFIGS = ROOT / "configs"


def test_overrides_nested_and_typed():
    cfg = load_recipe(CONFIGS / "tiny_gamma_mod.py")
    new = apply_overrides(cfg, ["optim.lr=1e-4", "model.mod.routing_ratio=0.34", "optim.grad_clip=none",
                                "optim.trainable=^projector/,^llm/layers/", "model.mod.layers=1,3",
                                "async_checkpointing=false", "mesh.fsdp=4", "num_steps=7", "model.dtype=bfloat16",
                                "data.path=/tmp/x y.json"])
    assert new.optim.lr == 1e-4 and isinstance(new.optim.lr, float)
    assert new.model.mod.routing_ratio == 0.34
    assert new.optim.grad_clip is None
    assert new.optim.trainable == ("^projector/", "^llm/layers/")
    assert new.model.mod.layers == (1, 3)
    assert new.async_checkpointing is False
    assert new.mesh.fsdp == 4 and isinstance(new.mesh.fsdp, int)
    assert new.num_steps == 7 and new.model.dtype == "bfloat16"
    assert new.data.path == "/tmp/x y.json"
    # The original is untouched (frozen dataclasses, replaced along the path).
    assert cfg.optim.lr == 1e-3 and cfg.model.mod.routing_ratio == 0.5
    # JSON list syntax for tuples
    assert apply_overrides(cfg, ["model.mod.layers=[2]"]).model.mod.layers == (2,)


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1", "unknown config key 'optim.lrr'.*did you mean lr"),
    ("nonsense=1", "unknown config key 'nonsense'"),
    ("model.mod.routing_ratio=half", "not a number"),
    ("num_steps=1.5", "not an integer"),
    ("async_checkpointing=maybe", "not a boolean"),
    ("model.mod.routing_ratio=1.5", r"rejected: mod.routing_ratio must be in \[0, 1\)"),
    ("model.mod.layers=9", r"rejected: mod.layers \[9\] outside 0..3"),
    ("optim.lr", "not of the form key=value"),
    ("optim.lr.x=1", "optim.lr is float, not a config"),
    ("init_from.x=1", "init_from is None"),
])
def test_bad_overrides_give_clear_errors(override, message):
    cfg = load_recipe(CONFIGS / "tiny_gamma_mod.py")
    with pytest.raises(OverrideError, match=message):
        apply_overrides(cfg, [override])


def test_cli_reports_bad_key_and_prints_config(capsys):
    import train.__main__ as cli

    assert cli.main(["--config", str(CONFIGS / "tiny_dense.py"), "--workdir", "/tmp/unused",
                     "--set", "optim.learning_rate=1"]) == 2
    assert "unknown config key 'optim.learning_rate'" in capsys.readouterr().err
    assert cli.main(["--config", str(CONFIGS / "tiny_dense.py"), "--workdir", "/tmp/unused", "--mesh",
                     str(CONFIGS / "mesh_gpu_8.py"), "--set", "optim.lr=3e-4", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert '"lr": 0.0003' in out and '"fsdp": 8' in out


def test_official_recipes_carry_paper_hyperparameters():
    s1 = load_recipe(CONFIGS / "llava_v15_7b_stage1.py")
    assert (s1.optim.lr, s1.global_batch, s1.data.template, s1.optim.trainable) == (1e-3, 256, "plain", (r"^projector/",))
    assert (s1.optim.schedule, s1.optim.warmup_ratio, s1.optim.weight_decay, s1.num_epochs) == ("cosine", 0.03, 0.0, 1.0)
    assert not s1.model.mod.enabled and s1.data.max_length == 2048

    s2 = load_recipe(CONFIGS / "llava_v15_7b_stage2.py")
    assert (s2.optim.lr, s2.optim.schedule, s2.optim.warmup_ratio, s2.global_batch, s2.num_epochs) == \
        (2e-5, "cosine", 0.03, 128, 1.0)
    assert (s2.optim.weight_decay, s2.data.max_length, s2.data.template) == (0.0, 2048, "vicuna_v1")
    assert s2.optim.trainable == (r"^projector/", r"^llm/")  # vision frozen

    g = load_recipe(CONFIGS / "gamma_mod_llava_v15_7b.py")
    mod = g.model.mod
    assert mod.enabled and mod.layers == tuple(range(3, 31))  # arank_mod: all but 0, 1, 2, 31
    assert (mod.routing_ratio, mod.router_aux_loss_coef, mod.shared_router, mod.masking) == (0.5, 0.01, True, "official")
    assert (g.optim.lr, g.optim.schedule, g.optim.warmup_ratio, g.optim.weight_decay) == (2e-5, "cosine", 0.03, 0.0)
    assert (g.global_batch, g.optim.grad_accum_steps, g.num_epochs, g.data.max_length) == (128, 2, 1.0, 2496)
    assert apply_overrides(g, ["model.mod.routing_ratio=0.34"]).model.mod.routing_ratio == 0.34
    for cfg in (s1, s2, g):
        assert cfg.compute_dtype == "bfloat16" and cfg.param_dtype == "float32"

    assert load_mesh_preset(CONFIGS / "mesh_gpu_8.py").resolve(8) == (1, 8, 1)
    assert load_mesh_preset(CONFIGS / "mesh_tpu_v5p_64.py").resolve(32) == (1, 32, 1)
    assert load_mesh_preset(CONFIGS / "mesh_tpu_v5e_256_tp.py").resolve(256) == (8, 8, 4)


def test_config_validation():
    with pytest.raises(ValueError, match="needs `model`, `init_from`"):
        TrainConfig()
    cfg = load_recipe(CONFIGS / "tiny_dense.py")
    with pytest.raises(ValueError, match="not divisible by optim.grad_accum_steps"):
        dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, grad_accum_steps=3))
    assert cfg.total_steps(320) == 40 and cfg.replace(num_steps=5).total_steps(320) == 5


def test_schedule_warmup_cosine_matches_hf():
    """Linear warmup over ceil(0.03 * total) steps, then cosine to 0 (HF get_cosine_schedule_with_warmup)."""
    cfg = OptimConfig(lr=2e-5, warmup_ratio=0.03)
    total = 5198  # 665,298 samples / 128
    sched = opt.make_schedule(cfg, total)
    warm = opt.warmup_steps(cfg, total)
    assert warm == 156
    assert float(sched(0)) == 0.0
    np.testing.assert_allclose(float(sched(78)), 1e-5, rtol=1e-6)
    np.testing.assert_allclose(float(sched(warm)), 2e-5, rtol=1e-6)
    mid = warm + (total - warm) // 2
    np.testing.assert_allclose(float(sched(mid)), 1e-5, rtol=1e-3)
    assert abs(float(sched(total))) < 1e-12


def test_freezing_and_decay_masks():
    params = {"vision": {"layers": {"ln1": {"scale": np.ones(2)}, "fc1": {"kernel": np.ones((2, 2))}}},
              "projector": {"fc1": {"kernel": np.ones((2, 2)), "bias": np.ones(2)}},
              "llm": {"embed": np.ones((4, 2)), "layers": {"attn_norm": {"scale": np.ones((1, 2))}},
                      "mod_router": {"kernel": np.ones((2, 2))}}}
    paths = opt.trainable_paths(OptimConfig(trainable=(r"^projector/", r"^llm/")), params)
    assert paths == {"projector/fc1/kernel", "projector/fc1/bias", "llm/embed", "llm/layers/attn_norm/scale",
                     "llm/mod_router/kernel"}
    sub = opt.select(params, paths)
    assert "vision" not in sub and set(sub["llm"]) == {"embed", "layers", "mod_router"}
    merged = opt.merge(params, jax.tree.map(lambda x: x * 0, sub))
    assert merged["vision"]["layers"]["fc1"]["kernel"] is params["vision"]["layers"]["fc1"]["kernel"]
    assert float(merged["projector"]["fc1"]["kernel"].sum()) == 0
    decay = opt.decay_mask(OptimConfig(), params)
    assert decay["projector"]["fc1"] == {"kernel": True, "bias": False}
    assert decay["vision"]["layers"]["ln1"]["scale"] is False
    assert decay["llm"]["layers"]["attn_norm"]["scale"] is False and decay["llm"]["embed"] is True


def test_batch_adapter_accepts_pipeline_batches():
    """`loss_mask`-only batches get labels; padding gets -100; lengths pad to a common bucket."""
    ids = np.array([[1, 5, 6, 7, 0, 0]], np.int32)
    types = np.array([[tt.SYSTEM, tt.IMAGE, tt.QUESTION, tt.ANSWER, tt.PAD, tt.PAD]], np.int32)
    batch = {"input_ids": ids, "loss_mask": types == tt.ANSWER, "token_types": types,
             "attention_mask": types != tt.PAD, "pixel_values": np.zeros((1, 4, 4, 3), np.float32),
             "has_image": np.array([True]), "valid": np.array([True])}
    b = data_lib.to_model_batch(batch, pad_id=0)
    assert set(b) == set(data_lib.MODEL_KEYS)
    assert b["labels"].tolist() == [[-100, -100, -100, 7, -100, -100]]
    padded = data_lib.pad_length(b, 8, pad_id=0)
    assert padded["input_ids"].shape == (1, 8) and padded["token_types"][0, -1] == tt.PAD
    assert not padded["attention_mask"][0, -2:].any() and (padded["labels"][0, -2:] == -100).all()
    micro = data_lib.split_micro({"x": np.arange(12).reshape(6, 2)}, 3)
    assert micro["x"].shape == (3, 2, 2)


def test_synthetic_rows_do_not_depend_on_process_layout():
    model = load_recipe(CONFIGS / "tiny_gamma_mod.py").model
    whole = data_lib.SyntheticBatches(model, 48, data_lib.Shard(0, 4, 4, 2), seed=3)
    halves = [data_lib.SyntheticBatches(model, 48, data_lib.Shard(lo, lo + 2, 4, 2), seed=3) for lo in (0, 2)]
    full = next(whole)
    parts = [next(h) for h in halves]
    # micro-batch major: rows [m*4 + lo, m*4 + hi) for m in 0..1
    for key in full:
        got = np.concatenate([parts[0][key][:2], parts[1][key][:2], parts[0][key][2:], parts[1][key][2:]])
        np.testing.assert_array_equal(got, full[key], err_msg=key)
    assert whole.get_state() == {"step": 1}
    whole.set_state({"step": 0})
    np.testing.assert_array_equal(next(whole)["input_ids"], full["input_ids"])
    assert (full["token_types"][:, 4:4 + model.image_seq_length] == tt.IMAGE).all()


def test_train_flops_follow_freezing():
    """Stage 2 (vision frozen) equals gmod_jax.flops' count; stage 1 charges the frozen LLM 2x
    (activation gradients only) and the frozen tower 1x."""
    from gmod_jax import flops as model_flops
    from train import flops as train_flops

    model = load_recipe(CONFIGS / "gamma_mod_llava_v15_7b.py").model
    stage2 = train_flops.train_step_flops(model, 128, 2496, 2191, train_flops.Trainable(False, True, True))
    np.testing.assert_allclose(stage2, model_flops.train_step_flops(model, 128, 2496, 2191).total, rtol=1e-12)
    fwd = model_flops.forward_flops(model, 128, 2496, kept=2191, logits="all")
    stage1 = train_flops.train_step_flops(model, 128, 2496, 2191, train_flops.Trainable(False, True, False))
    np.testing.assert_allclose(stage1, fwd.vision + 3 * fwd.projector + 2 * fwd.llm, rtol=1e-12)
    assert train_flops.peak_tflops("TPU v5p") == 459.0 and train_flops.peak_tflops("cpu") is None


def test_mfu_numerator_does_not_count_the_onehot_dispatch():
    """The one-hot MoD dispatch costs real FLOPs (the executed count and the FLOP bound include
    them) but is not model work: the MFU numerator is the same for `gather` and `onehot`, so the
    two implementations' MFU compares their speed, not their FLOP counts."""
    from gmod_jax import flops as model_flops
    from train import flops as train_flops

    gather = load_recipe(CONFIGS / "gamma_mod_llava_v15_7b.py").model
    onehot = dataclasses.replace(gather, mod=dataclasses.replace(gather.mod, implementation="onehot"))
    executed = {m: model_flops.forward_flops(m, 8, 2496, kept=2191, logits="all") for m in (gather, onehot)}
    assert executed[gather].dispatch == 0 < executed[onehot].dispatch
    assert executed[onehot].total == pytest.approx(executed[gather].total + executed[onehot].dispatch)
    assert executed[onehot].useful == pytest.approx(executed[gather].useful)
    parts = train_flops.Trainable(False, True, True)
    assert train_flops.train_step_flops(onehot, 8, 2496, 2191, parts) == pytest.approx(
        train_flops.train_step_flops(gather, 8, 2496, 2191, parts), rel=1e-12)
    prefill = {m: model_flops.prefill_flops(m, 1, 768, 500) for m in (gather, onehot)}
    assert prefill[onehot].total > prefill[gather].total and prefill[onehot].useful == pytest.approx(prefill[gather].useful)
