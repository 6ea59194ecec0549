"""The LLaVA-HR and Mini-Gemini-HD 7B recipes (configs/llava_hr_7b_stage1.py,
gamma_mod_llava_hr_7b.py, gamma_mod_mgm_hd_7b.py) build their real train step and lower it ahead
of time on a pod-like mesh of 8 fake CPU devices (pure FSDP), as tests/test_train_aot.py does for
LLaVA-1.5: abstract state and batch, no execution, no parameter memory. Full width and depth:
every layer stack (decoder, CLIP groups, ConvNeXt stages, adapters) is traced and sharded.

Lowered, not compiled: the compile of these programs is what `python -m train.aot` does for TPU
(`scripts/tpu_aot_tables.sh`, docs/tpu_aot.md; `tests/test_tpu_aot.py` compiles the same code path
at tiny size), and three 7B CPU compiles cost more than two minutes of the suite. The per-device
state bytes are read from the state's shardings instead of the executable's memory analysis.

The global batch is the recipe's divided by 4, so each fake device carries the rows one chip of
the recipes' documented mesh (`mesh_tpu_v5p_64`: 32 chips, pure FSDP) carries.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_sharding import ROOT, subprocess_env

SYSTEM_TOKENS = 35  # vicuna_v1 system prompt + "USER: " before the image
POD_CHIPS, FAKE_DEVICES = 32, 8  # mesh_tpu_v5p_64, and this test's mesh
MESH = ["mesh.data=1", f"mesh.fsdp={FAKE_DEVICES}"]
# recipe -> (recipe global batch, sequence length compiled, system tokens before the image)
CASES = {
    # `plain` template: the image comes first; no MoD, so the layout only sets the length.
    "llava_hr_7b_stage1": (256, 2048, 0),
    "gamma_mod_llava_hr_7b": (128, 2496, SYSTEM_TOKENS),
    # The 3072 bucket: 35 system + 2880 image + question, the typical HD image sample.
    "gamma_mod_mgm_hd_7b": (128, 3072, SYSTEM_TOKENS),
}


def _worker(out_path: str) -> None:
    import jax
    import numpy as np

    from gmod_jax import sharding as shd
    from gmod_jax import token_types as tt
    from gmod_jax.config_files import apply_overrides
    from gmod_jax.models.llama import routing_capacity
    from train import optimizer as opt
    from train import step as step_lib
    from train.config import load_recipe

    assert jax.device_count() == 8
    results = {}
    for name, (global_batch, seq, system) in CASES.items():
        cfg = load_recipe(ROOT / "configs" / f"{name}.py")
        assert cfg.global_batch == global_batch, (name, cfg.global_batch)
        pod_share = f"global_batch={global_batch * FAKE_DEVICES // POD_CHIPS}"
        cfg = apply_overrides(cfg, [*MESH, pod_share])
        model = cfg.resolve_model(cfg.model)
        mesh = shd.make_mesh(cfg.mesh)
        total = 5198  # 1 epoch of llava_v1_5_mix665k at batch 128 (only shapes the schedule)
        spec = step_lib.make_state_spec(model, opt.make_optimizer(cfg.optim, total),
                                        opt.make_schedule(cfg.optim, total), cfg.optim, mesh)
        accum, micro = cfg.optim.grad_accum_steps, cfg.micro_batch
        types = np.full((micro, seq), tt.ANSWER, np.int32)
        types[:, :system] = tt.SYSTEM
        types[:, system:system + model.image_seq_length] = tt.IMAGE
        capacity = routing_capacity(model, types, "train")
        with jax.set_mesh(mesh):
            step_lib.make_train_step(spec, accum, capacity).lower(
                spec.abstract, step_lib.abstract_batch(spec, accum, micro, seq))
        params = spec.abstract["params"]
        state_bytes = sum(math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize
                          for a in jax.tree.leaves(spec.abstract))
        results[name] = {
            "capacity": capacity, "seq_len": seq, "accum": accum, "micro": micro,
            "rows_per_device": micro // FAKE_DEVICES,
            "image_tokens": model.image_seq_length, "pixel_shape": list(model.pixel_shape),
            "params": opt.count_params(params), "trainable": opt.count_params(opt.select(params, spec.trainable)),
            "state_bytes_per_device": state_bytes,
            "mod_layers": len(model.mod_layers), "router_init": model.mod.router_init,
            "has_adapters": "adapters" in params["vision"],
        }
    Path(out_path).write_text(json.dumps(results, indent=1))


@pytest.mark.slow
def test_hr_and_mgm_7b_recipes_lower_ahead_of_time(tmp_path):
    out = tmp_path / "aot.json"
    proc = subprocess.run([sys.executable, __file__, str(out)], cwd=ROOT, env=subprocess_env(8),
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(out.read_text())
    for name, res in r.items():
        print(f"{name}: per-device state {res['state_bytes_per_device'] / 2**30:.2f} GiB; {res}")
        # FSDP really shards the state: each device holds 1/8 of the f32 params and Adam moments
        # (trainable params only), plus the step counter and the few arrays too small to shard.
        state_bytes = 4 * (res["params"] + 2 * res["trainable"]) / FAKE_DEVICES
        assert state_bytes <= res["state_bytes_per_device"] < state_bytes + 0.05e9, (name, res)

    s1 = r["llava_hr_7b_stage1"]
    # S = 384: the CLIP sees its native 336 px, 576 tokens; no MR-adapters in stage 1.
    assert s1["image_tokens"] == 576 and s1["pixel_shape"] == [384, 384, 3] and not s1["has_adapters"]
    assert s1["capacity"] is None and s1["mod_layers"] == 0 and s1["rows_per_device"] == 8  # 256 / 32
    # Projector (21.0M) + final fusion (2.62M) train; the towers and the LLM stay frozen.
    assert 23.5e6 < s1["trainable"] < 23.8e6, s1
    assert 7.25e9 < s1["params"] < 7.27e9, s1  # LLaVA-HR-7B less its 18.26M of adapters

    hr = r["gamma_mod_llava_hr_7b"]
    assert hr["image_tokens"] == 1024 and hr["pixel_shape"] == [1024, 1024, 3] and hr["has_adapters"]
    assert hr["mod_layers"] == 28 and hr["accum"] == 2 and hr["rows_per_device"] == 2  # 128 / 2 / 32
    assert hr["trainable"] == hr["params"] and 7.27e9 < hr["params"] < 7.29e9  # everything trains
    # Routable: the 35 system + 1024 image tokens from the token types; half of them skip.
    assert hr["capacity"] == 2496 - (SYSTEM_TOKENS + 1024) // 2
    assert hr["router_init"] == "kaiming_uniform"

    mgm = r["gamma_mod_mgm_hd_7b"]
    assert mgm["image_tokens"] == 2880 and mgm["pixel_shape"] == [1536, 1536, 3]
    assert mgm["mod_layers"] == 28 and mgm["accum"] == 2 and mgm["rows_per_device"] == 2  # 128 / 2 / 32
    assert mgm["capacity"] == 3072 - (SYSTEM_TOKENS + 2880) // 2  # 1457 skipped per MoD layer
    assert mgm["router_init"] == "xavier_uniform"
    # LLM + router + projector + mining projectors (6.766B) train; CLIP and ConvNeXt (499.7M) do not.
    assert 7.26e9 < mgm["params"] < 7.28e9 and 6.76e9 < mgm["trainable"] < 6.775e9, mgm


def test_recipes_read_their_presets():
    """Cheap checks of what each recipe takes from its preset (no compile)."""
    from train.config import load_recipe

    s1 = load_recipe(ROOT / "configs/llava_hr_7b_stage1.py")
    assert s1.model.vision.input_image_size == 384 and s1.data.template == "plain" and s1.optim.lr == 1e-3
    assert s1.optim.trainable == (r"^projector/", r"^vision/fusion/") and not s1.model.mod.enabled
    hr = load_recipe(ROOT / "configs/gamma_mod_llava_hr_7b.py")
    assert hr.model.vision.input_image_size == 1024 and hr.model.vision.latent_adapters
    assert (hr.data.max_length, hr.global_batch, hr.optim.lr, hr.remat, hr.compute_dtype) == (
        2496, 128, 2e-5, "full", "bfloat16")
    assert hr.model.mod.routable_span == "token_types" and hr.model.mod.routing_ratio == 0.5
    mgm = load_recipe(ROOT / "configs/gamma_mod_mgm_hd_7b.py")
    assert mgm.data.max_length == mgm.model.tokenizer_model_max_length == 4096
    assert 3072 in mgm.data.buckets and mgm.data.buckets[-1] == 4096
    assert mgm.model.mod.router_init == "xavier_uniform" and mgm.model.image_seq_length == 2880


if __name__ == "__main__":
    _worker(sys.argv[1])
