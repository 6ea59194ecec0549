"""Mesh, rule table and param shardings; training on 8 fake CPU devices == 1 device.

The multi-device test runs this file as a script in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (the flag must be set before JAX starts, and
the rest of the suite runs on one device).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from gmod_jax import config as C
from gmod_jax import sharding as shd

ROOT = Path(__file__).resolve().parents[1]


def _specs(model, **sizes):
    from train.step import init_params

    shapes = jax.eval_shape(lambda r: init_params(model, r), jax.random.PRNGKey(0))
    axis_sizes = {"data": 1, "fsdp": 1, "tensor": 1, **sizes}
    specs = shd.param_specs(shapes, axis_sizes)
    flat = {shd.path_str(p): s for p, s in jax.tree_util.tree_flatten_with_path(
        specs, is_leaf=lambda x: isinstance(x, P))[0]}
    return shapes, flat


def test_mesh_config_resolves_minus_one():
    assert shd.MeshConfig(data=2, fsdp=-1, tensor=2).resolve(8) == (2, 2, 2)
    assert shd.MeshConfig(data=-1, fsdp=1, tensor=1).resolve(8) == (8, 1, 1)
    with pytest.raises(ValueError, match="do not split"):
        shd.MeshConfig(data=3, fsdp=-1).resolve(8)
    with pytest.raises(ValueError, match="needs 4 devices"):
        shd.MeshConfig(data=2, fsdp=2, tensor=1).resolve(8)
    with pytest.raises(ValueError, match="at most one"):
        shd.MeshConfig(data=-1, fsdp=-1).resolve(8)


def test_7b_param_specs_follow_rule_table():
    """Every LLaVA-1.5-7B γ-MoD param gets the spec of its logical axes on a pod-like mesh."""
    model = C.gamma_mod(C.llava_v15_7b(), "arank_mod", 0.5)
    _, flat = _specs(model, fsdp=16, tensor=4)
    assert flat["llm/embed"] == P("tensor", "fsdp")
    assert flat["llm/lm_head/kernel"] == P("fsdp", "tensor")
    assert flat["llm/layers/attn/q/kernel"] == P(None, "fsdp", "tensor", None)
    assert flat["llm/layers/attn/o/kernel"] == P(None, "tensor", None, "fsdp")
    assert flat["llm/layers/mlp/gate/kernel"] == P(None, "fsdp", "tensor")
    assert flat["llm/layers/mlp/down/kernel"] == P(None, "tensor", "fsdp")
    assert flat["llm/layers/attn_norm/scale"] == P(None, None)
    assert flat["llm/mod_router/kernel"] == P(None, None)
    assert flat["vision/layers/fc1/kernel"] == P(None, "fsdp", "tensor")
    assert flat["vision/patch_embed/kernel"] == P(None, None, None, "fsdp")
    assert flat["vision/pos_embed"] == P(None, "fsdp")
    assert flat["projector/fc1/kernel"] == P("fsdp", "tensor")
    assert flat["projector/fc2/kernel"] == P("tensor", "fsdp")


def test_indivisible_dims_fall_back_to_replication():
    """13B has 40 heads: tensor=16 cannot split them, so that dim is replicated, others still shard."""
    model = C.llava_v15_13b()
    shapes, flat = _specs(model, fsdp=2, tensor=16)
    assert flat["llm/layers/attn/q/kernel"] == P(None, "fsdp", None, None)
    assert flat["llm/layers/mlp/up/kernel"] == P(None, "fsdp", "tensor")  # 13824 = 16 * 864
    # A spec never names a mesh axis twice and every sharded dim divides evenly.
    sizes = {"data": 1, "fsdp": 2, "tensor": 16}
    for (path, x), spec in zip(jax.tree_util.tree_flatten_with_path(shapes)[0], flat.values()):
        named = [a for a in spec if a is not None]
        assert len(named) == len(set(named)), path
        for dim, axis in zip(x.shape, spec):
            if axis is not None:
                assert dim % sizes[axis] == 0, (path, x.shape, spec)


def test_logical_to_spec_multi_axis_batch():
    assert shd.logical_to_spec(("batch", "length"), (8, 16), {"data": 2, "fsdp": 4, "tensor": 1}) == \
        P(("data", "fsdp"), None)
    assert shd.logical_to_spec(("batch", "length"), (6, 16), {"data": 2, "fsdp": 4, "tensor": 1}) == P(None, None)
    with pytest.raises(KeyError, match="no rule"):
        shd.logical_to_spec(("nonsense",), (4,), {"data": 1, "fsdp": 1, "tensor": 1})


CONSTRAIN_SCRIPT = """
import jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
from gmod_jax import sharding as shd
x8, x6 = jnp.ones((8, 4, 16)), jnp.ones((6, 4, 16))
assert shd.constrain_batch(x8) is x8  # no mesh set: untouched
mesh = shd.make_mesh(shd.MeshConfig(data=2, fsdp=4, tensor=1), jax.devices())
with jax.set_mesh(mesh):
    for x, spec in ((x8, P(("data", "fsdp"), None, None)), (x6, None)):
        out = jax.jit(lambda a: shd.constrain_batch(a) * 2).lower(x).compile().output_shardings
        if spec is None:  # 6 rows do not split over 8 shards: nothing pinned, GSPMD replicates
            assert out.is_fully_replicated, out
        else:
            assert out.is_equivalent_to(NamedSharding(mesh, spec), x.ndim), out
    tensor_only = shd.make_mesh(shd.MeshConfig(data=1, fsdp=1, tensor=8), jax.devices())
with jax.set_mesh(tensor_only):
    assert shd.constrain_batch(x8) is x8  # no batch axis to pin
print("ok")
"""


def test_constrain_batch_pins_the_batch_axis_under_a_mesh():
    """A replicated input comes out batch-sharded over data x fsdp; indivisible batches, meshes
    without batch axes and code run without a mesh are left to GSPMD."""
    proc = subprocess.run([sys.executable, "-c", CONSTRAIN_SCRIPT], env=subprocess_env(8), capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-4000:]


# ----------------------------------------------------------------------------------------------
# 8 fake devices vs 1 device


MESHES = {"one_device": (1, 1, 1), "data2_fsdp2_tensor2": (2, 2, 2), "data8": (8, 1, 1)}
STEPS = 4


def _worker(out_path: str, workdir: str) -> None:
    """Train the tiny γ-MoD recipe for STEPS steps on each mesh; dump losses and params."""
    import absl.logging

    absl.logging.set_verbosity(absl.logging.WARNING)
    assert jax.device_count() == 8, jax.devices()
    from gmod_jax.config_files import apply_overrides
    from train.config import load_recipe
    from train.loop import run

    base = apply_overrides(load_recipe(ROOT / "configs" / "tiny_gamma_mod.py"),
                           [f"num_steps={STEPS}", "eval_every=0", "checkpoint_every=0", "log_every=1",
                            "progress_bar=false", "save_checkpoints=false", "optim.warmup_steps=1"])
    results = {}
    for name, (data, fsdp, tensor) in MESHES.items():
        cfg = base.replace(mesh=shd.MeshConfig(data=data, fsdp=fsdp, tensor=tensor))
        devices = jax.devices()[: data * fsdp * tensor]
        wd = Path(workdir) / name
        result = run(cfg, wd, devices=devices)
        losses = [json.loads(line)["loss"] for line in (wd / "metrics.jsonl").read_text().splitlines()]
        params = jax.tree.map(np.asarray, jax.device_get(result.state["params"]))
        flat = {shd.path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
        np.savez(Path(workdir) / f"{name}.npz", **flat)
        shardings = {shd.path_str(p): str(x.sharding.spec) for p, x in
                     jax.tree_util.tree_flatten_with_path(result.state["params"])[0]}
        results[name] = {"losses": losses, "skip": float(result.last_metrics.get("skip_ratio", 0.0)),
                         "q_spec": shardings["llm/layers/attn/q/kernel"]}
    Path(out_path).write_text(json.dumps(results))


def subprocess_env(devices: int | None = None) -> dict:
    """Environment for JAX worker subprocesses: fake CPU devices, faster CPU compiles (LLVM -O0
    roughly halves XLA:CPU compile time; numerics are unchanged), and the session's shared
    compilation cache so identical programs compile once across workers."""
    env = dict(os.environ)
    flags = ["--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true"]
    if devices and devices > 1:  # 1 is XLA:CPU's default; leaving it out keeps cache keys shared
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    env["XLA_FLAGS"] = " ".join(flags)
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    cache = os.environ.get("GMOD_TEST_COMPILATION_CACHE") or str(
        Path(tempfile.gettempdir()) / f"gmod_jax_test_xla_cache_{os.getuid()}")
    env["JAX_COMPILATION_CACHE_DIR"] = cache
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
    return env


def test_eight_devices_match_one_device(tmp_path):
    """data=2,fsdp=2,tensor=2 and data=8 give the 1-device loss curve (rel 1e-5) and params."""
    out = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, __file__, "worker", str(out), str(tmp_path)], env=subprocess_env(8),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(out.read_text())
    ref = np.asarray(results["one_device"]["losses"])
    assert len(ref) == STEPS and np.all(np.isfinite(ref))
    assert ref[-1] < ref[0]  # it trains
    ref_params = dict(np.load(tmp_path / "one_device.npz"))
    for name in ("data2_fsdp2_tensor2", "data8"):
        losses = np.asarray(results[name]["losses"])
        np.testing.assert_allclose(losses, ref, rtol=1e-5, atol=0, err_msg=name)
        params = dict(np.load(tmp_path / f"{name}.npz"))
        assert params.keys() == ref_params.keys()
        for key in ref_params:
            np.testing.assert_allclose(params[key], ref_params[key], rtol=1e-4, atol=2e-6, err_msg=f"{name} {key}")
    # The sharded run really was sharded per the rule table.
    assert results["data2_fsdp2_tensor2"]["q_spec"] == str(P(None, "fsdp", "tensor", None))
    assert results["data8"]["q_spec"] == str(P(None, None, None, None))


if __name__ == "__main__":
    if sys.argv[1] == "worker":
        _worker(sys.argv[2], sys.argv[3])
