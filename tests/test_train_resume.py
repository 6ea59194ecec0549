"""Preemption and resume, NaN handling, and stage freezing, on the tiny γ-MoD recipe.

(c) `python -m train` gets SIGTERM mid-run, saves and exits 0; rerunning the same command resumes
    and ends with params bitwise equal to an uninterrupted run (and the same per-step losses).
(d) a NaN loss stops the run with a clear message, saves nothing from the bad state and keeps
    the last good checkpoint.
(e) frozen params (vision in stage 2; vision + LLM in stage 1) stay bitwise unchanged and get no
    optimizer state, while trainable ones move.

JAX work runs in subprocesses (this file is also the worker script) with the fake-device /
compile-cache environment of tests/test_sharding.py, so the uninterrupted reference, the
resumed run and the NaN run reuse one compiled train step.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from tests.test_sharding import ROOT, subprocess_env

RECIPE = ROOT / "configs" / "tiny_gamma_mod.py"
STEPS = 120
COMMON = [f"num_steps={STEPS}", "log_every=1", "eval_every=0", "checkpoint_every=0", "progress_bar=false"]


def _metrics(workdir: Path) -> list[dict]:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = np.asarray(v)
    return out


# ----------------------------------------------------------------------------------------------
# Worker (runs in a subprocess)


def _worker(tmp: str, resumed_workdir: str, out_path: str) -> None:
    import absl.logging
    import jax

    absl.logging.set_verbosity(absl.logging.WARNING)
    from train import data as data_lib
    from train import optimizer as opt
    from train import step as step_lib
    from train.checkpoint import Checkpointer
    from gmod_jax.config_files import apply_overrides
    from train.config import load_recipe
    from train.loop import NonFiniteLoss, run

    tmp = Path(tmp)
    results: dict = {}
    base = apply_overrides(load_recipe(RECIPE), COMMON)

    # (c) uninterrupted reference; compare with the preempted + resumed CLI run.
    ref = run(base, tmp / "reference")
    ref_params = _flat(jax.device_get(ref.state["params"]))
    resumed, _ = Checkpointer(Path(resumed_workdir) / "checkpoints", keep=0).restore_params(STEPS)
    resumed = _flat(resumed)
    results["resume_keys_equal"] = sorted(resumed) == sorted(ref_params)
    results["resume_bitwise_mismatch"] = [k for k in ref_params if not np.array_equal(ref_params[k], resumed[k])]

    # (e) stage 2 style (the recipe): vision frozen, LLM + projector + router trained.
    spec = step_lib.make_state_spec(ref.model, opt.make_optimizer(base.optim, STEPS),
                                    opt.make_schedule(base.optim, STEPS), base.optim, _mesh())
    with jax.set_mesh(spec.mesh):
        init = _flat(jax.device_get(step_lib.make_init_params(spec)(jax.random.PRNGKey(base.seed))))
    results["stage2_changed"] = sorted({k.split("/")[0] for k in init if not np.array_equal(init[k], ref_params[k])})
    results["stage2_router_changed"] = not np.array_equal(init["llm/mod_router/kernel"], ref_params["llm/mod_router/kernel"])
    results["stage2_vision_unchanged"] = all(np.array_equal(init[k], ref_params[k]) for k in init if k.startswith("vision/"))

    # (e) stage 1: only the projector trains.
    stage1 = apply_overrides(base, ["num_steps=2", "save_checkpoints=false", "optim.trainable=^projector/"])
    r1 = run(stage1, tmp / "stage1")
    p1 = _flat(jax.device_get(r1.state["params"]))
    results["stage1_changed"] = sorted({k for k in init if not np.array_equal(init[k], p1[k])})
    # Adam moments (the non-scalar optimizer-state leaves) exist for projector params only.
    results["stage1_moment_paths"] = [jax.tree_util.keystr(p) for p, x in
                                      jax.tree_util.tree_flatten_with_path(r1.state["opt_state"])[0] if x.ndim]

    # init_from: the reference run's exported params as the start of a new run whose model config
    # comes from the checkpoint; the projector is re-initialised (init_skip), the rest is loaded.
    from train.export import export_params

    export_params(tmp / "exported", ref.state["params"], ref.model)
    fresh = run(base.replace(model=None, init_from=str(tmp / "exported"), init_skip=(r"^projector/",), num_steps=0),
                tmp / "init_from")
    loaded = _flat(jax.device_get(fresh.state["params"]))
    results["init_from_mismatch"] = sorted(
        k for k in loaded if not np.array_equal(loaded[k], init[k] if k.startswith("projector/") else ref_params[k]))
    results["init_from_model_equal"] = fresh.model == ref.model

    # (d) NaN at the 5th batch: pixel values poisoned by a wrapping source.
    def nan_factory(model, shard, eval_split):
        source = data_lib.SyntheticBatches(model, base.data.seq_len, shard, seed=base.seed)

        class Poisoned:
            pad_id = source.pad_id

            def __next__(self):
                index = source.step
                batch = next(source)
                if index == 4:
                    batch["pixel_values"] = np.full_like(batch["pixel_values"], np.nan)
                return batch

            def get_state(self):
                return source.get_state()

            def set_state(self, state):
                source.set_state(state)

        return Poisoned()

    nan_cfg = apply_overrides(base, ["checkpoint_every=2"])
    nan_dir = tmp / "nan"
    try:
        run(nan_cfg, nan_dir, source_factory=nan_factory)
        results["nan_error"] = None
    except NonFiniteLoss as e:
        results["nan_error"] = str(e)
    ckpt = Checkpointer(nan_dir / "checkpoints", keep=0)
    results["nan_checkpoints"] = ckpt.all_steps()
    good, _ = ckpt.restore_params(max(ckpt.all_steps()))
    results["nan_last_good_finite"] = all(np.all(np.isfinite(v)) for v in _flat(good).values())
    results["nan_logged_steps"] = [m["step"] for m in _metrics(nan_dir)]
    Path(out_path).write_text(json.dumps(results))


def _mesh():
    from gmod_jax import sharding as shd

    return shd.make_mesh(shd.MeshConfig())


# ----------------------------------------------------------------------------------------------
# Test


def _cli(workdir: Path, extra=()):
    return [sys.executable, "-m", "train", "--config", str(RECIPE), "--workdir", str(workdir), "--set", *COMMON,
            *extra]


def test_sigterm_resume_nan_and_freezing(tmp_path):
    env = subprocess_env()
    workdir = tmp_path / "preempted"
    proc = subprocess.Popen(_cli(workdir), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if any(m["step"] >= 2 for m in _metrics(workdir)):
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.02)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-4000:]
    stopped = _metrics(workdir)[-1]["step"]
    assert 2 <= stopped < STEPS, f"SIGTERM did not interrupt the run (stopped at {stopped})\n{output[-2000:]}"
    assert "SIGTERM: saved checkpoint" in output
    assert (workdir / "checkpoints" / str(stopped) / "data" / "process_0-of-1.json").is_file()

    resumed = subprocess.run(_cli(workdir), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resumed from" in resumed.stderr
    steps = [m["step"] for m in _metrics(workdir)]
    assert steps == list(range(1, STEPS + 1)), steps

    out = tmp_path / "results.json"
    worker = subprocess.run([sys.executable, __file__, str(tmp_path), str(workdir), str(out)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert worker.returncode == 0, worker.stderr[-4000:]
    r = json.loads(out.read_text())

    # (c) bitwise-equal params and identical per-step losses after the resume point.
    assert r["resume_keys_equal"]
    assert r["resume_bitwise_mismatch"] == []
    reference = {m["step"]: m for m in _metrics(tmp_path / "reference")}
    for m in _metrics(workdir):
        assert m["loss"] == reference[m["step"]]["loss"], m["step"]
        assert m["grad_norm"] == reference[m["step"]]["grad_norm"], m["step"]

    # (e) freezing
    assert r["stage2_vision_unchanged"]
    assert r["stage2_changed"] == ["llm", "projector"]
    assert r["stage2_router_changed"]
    assert r["stage1_changed"] and all(k.startswith("projector/") for k in r["stage1_changed"])
    assert r["stage1_moment_paths"] and all("['projector']" in p for p in r["stage1_moment_paths"])

    # init_from + init_skip
    assert r["init_from_model_equal"]
    assert r["init_from_mismatch"] == []

    # (d) NaN: clear message, nothing saved from step 5 on, the last good checkpoint kept and finite.
    assert r["nan_error"] is not None
    assert "non-finite loss nan" in r["nan_error"] and "at step 5" in r["nan_error"]
    assert str(tmp_path / "nan" / "checkpoints" / "4") in r["nan_error"]
    assert r["nan_checkpoints"] == [2, 4]
    assert r["nan_last_good_finite"]
    assert r["nan_logged_steps"] == [1, 2, 3, 4]


def test_cli_maps_nonfinite_loss_to_exit_1(monkeypatch, capsys):
    """The command line turns NonFiniteLoss into exit status 1 with the message on stderr."""
    import train.__main__ as cli
    import train.loop

    def fail(cfg, workdir):
        raise train.loop.NonFiniteLoss("non-finite loss nan at step 3; Last good checkpoint: /x/2")

    monkeypatch.setattr(train.loop, "run", fail)
    assert cli.main(["--config", str(RECIPE), "--workdir", "/nonexistent", "--distributed", "off"]) == 1
    assert "non-finite loss nan at step 3" in capsys.readouterr().err


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2], sys.argv[3])
