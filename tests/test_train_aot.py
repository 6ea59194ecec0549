"""(f) The full-size LLaVA-1.5-7B recipes (stage 1, stage 2, γ-MoD) lower ahead of time on a
pod-like mesh of 8 fake CPU devices, and the γ-MoD step, the one with the most moving parts
(routing, accumulation, every parameter trained), compiles: abstract state from `jax.eval_shape`
with its shardings, abstract batch of the recipe's global batch and max length, no execution and
no parameter memory. Full depth and width (32 decoder + 24 vision layers): the layer stacks are
scanned, so compile time does not depend on depth. The other programs compile for TPU in
`python -m train.aot` (docs/tpu_aot.md); here a compile each would cost a minute of the suite.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

from tests.test_sharding import ROOT, subprocess_env

# recipe -> mesh overrides (pod-like: pure FSDP, and data x FSDP)
CASES = {
    "llava_v15_7b_stage1": ["mesh.data=1", "mesh.fsdp=8"],
    "llava_v15_7b_stage2": ["mesh.data=2", "mesh.fsdp=4"],
    "gamma_mod_llava_v15_7b": ["mesh.data=1", "mesh.fsdp=8"],
}
COMPILED = {"gamma_mod_llava_v15_7b"}
SYSTEM_TOKENS = 35  # vicuna_v1 system prompt + "USER: " before the image (LLaVA-1.5, image first)


def _worker(out_path: str) -> None:
    import jax
    import numpy as np

    from gmod_jax import sharding as shd
    from gmod_jax import token_types as tt
    from gmod_jax.models.llama import routing_capacity
    from train import optimizer as opt
    from train import step as step_lib
    from gmod_jax.config_files import apply_overrides
    from train.config import load_recipe

    assert jax.device_count() == 8
    results = {}
    for name, overrides in CASES.items():
        cfg = apply_overrides(load_recipe(ROOT / "configs" / f"{name}.py"), overrides)
        model = cfg.resolve_model(cfg.model)
        mesh = shd.make_mesh(cfg.mesh)
        total = 5198  # 1 epoch of llava_v1_5_mix665k at batch 128
        program = step_lib.build_train_program(model, cfg.optim, cfg.global_batch, mesh, total)
        spec, accum, micro, seq = program.spec, program.accum, program.micro, cfg.data.max_length
        types = np.full((micro, seq), tt.ANSWER, np.int32)
        types[:, :SYSTEM_TOKENS] = tt.SYSTEM
        types[:, SYSTEM_TOKENS:SYSTEM_TOKENS + model.image_seq_length] = tt.IMAGE
        capacity = routing_capacity(model, types, "train")
        t0 = time.perf_counter()
        with jax.set_mesh(mesh):
            lowered = program.step(capacity).lower(
                spec.abstract, step_lib.abstract_batch(spec, accum, micro, seq))
            t1 = time.perf_counter()
            compiled = lowered.compile() if name in COMPILED else None
        t2 = time.perf_counter()
        mem = compiled.memory_analysis() if compiled is not None else None
        n_params = opt.count_params(spec.abstract["params"])
        n_trainable = opt.count_params(opt.select(spec.abstract["params"], spec.trainable))
        q = spec.shardings["params"]["llm"]["layers"]["attn"]["q"]["kernel"].spec
        results[name] = {
            "lower_s": t1 - t0, "compile_s": t2 - t1, "capacity": capacity, "seq_len": seq, "accum": accum,
            "micro": micro, "params": n_params, "trainable": n_trainable,
            "state_bytes_per_device": sum(math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize
                                          for a in jax.tree.leaves(spec.abstract)),
            "argument_bytes_per_device": getattr(mem, "argument_size_in_bytes", None),
            "temp_bytes_per_device": getattr(mem, "temp_size_in_bytes", None),
            "q_spec": str(q), "mod_layers": len(model.mod_layers),
        }
    Path(out_path).write_text(json.dumps(results, indent=1))


def test_7b_recipes_lower_and_gamma_mod_compiles_ahead_of_time(tmp_path):
    out = tmp_path / "aot.json"
    proc = subprocess.run([sys.executable, __file__, str(out)], cwd=ROOT, env=subprocess_env(8),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(out.read_text())
    print(json.dumps(r, indent=1))
    for name, res in r.items():
        assert 7.0e9 < res["params"] < 7.1e9, (name, res["params"])  # LLaVA-1.5-7B: 7.06B
        # FSDP really shards the state: each device's arguments hold 1/fsdp of the f32 params and
        # Adam moments (trainable params only), plus its slice of the batch.
        fsdp = 8 if "mesh.fsdp=8" in CASES[name] else 4
        state_bytes = 4 * (res["params"] + 2 * res["trainable"]) / fsdp
        assert state_bytes <= res["state_bytes_per_device"] < state_bytes + 0.05e9, (name, res)
        if res["argument_bytes_per_device"] is not None:
            assert state_bytes <= res["argument_bytes_per_device"] < state_bytes + 0.5e9, (name, res)
    assert r["gamma_mod_llava_v15_7b"]["compile_s"] > 0 and r["gamma_mod_llava_v15_7b"]["temp_bytes_per_device"] > 0
    assert r["llava_v15_7b_stage1"]["trainable"] < 25e6  # projector only (21M)
    assert r["llava_v15_7b_stage1"]["capacity"] is None
    assert 6.7e9 < r["llava_v15_7b_stage2"]["trainable"] < 6.8e9  # LLM + projector, vision frozen
    g = r["gamma_mod_llava_v15_7b"]
    assert g["mod_layers"] == 28 and g["accum"] == 2 and g["micro"] == 64
    # Official masking: only the 35 + 576 prefix tokens are routable; half of them skip.
    assert g["capacity"] == 2496 - (SYSTEM_TOKENS + 576) // 2
    assert r["llava_v15_7b_stage2"]["q_spec"] == "P(None, 'fsdp', None, None)"


if __name__ == "__main__":
    _worker(sys.argv[1])
