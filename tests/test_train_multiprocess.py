"""(b) Two local JAX processes (2 fake CPU devices each, gloo collectives) train through the CLI
with `jax.distributed.initialize`, each feeding its own rows of the batch, writing one shared
Orbax checkpoint directory; the result matches a single-process, single-device run.

The single-process reference also accumulates gradients over 2 micro-batches of 4 rows (the
γ-MoD recipe's setting) where the 2-process run takes one batch of 8: the same comparison then
checks that gradient accumulation does not change the result either.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

from tests.test_sharding import ROOT, subprocess_env

RECIPE = ROOT / "configs" / "tiny_gamma_mod.py"
STEPS = 4
COMMON = [f"num_steps={STEPS}", "log_every=1", "eval_every=0", "checkpoint_every=2", "progress_bar=false",
          "optim.warmup_steps=1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _losses(workdir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}{k}/") if isinstance(v, dict) else {f"{prefix}{k}": np.asarray(v)})
    return out


def test_two_processes_match_single_process(tmp_path):
    port = _free_port()
    multi, single = tmp_path / "multi", tmp_path / "single"
    cli = [sys.executable, "-m", "train", "--config", str(RECIPE)]
    procs = [subprocess.Popen(cli + ["--workdir", str(multi), "--coordinator", f"localhost:{port}",
                                     "--num-processes", "2", "--process-id", str(i),
                                     "--set", *COMMON, "mesh.data=2", "mesh.fsdp=2"],
                              cwd=ROOT, env=subprocess_env(2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for i in range(2)]
    ref = subprocess.Popen(cli + ["--workdir", str(single), "--set", *COMMON, "mesh.fsdp=1",
                                  "optim.grad_accum_steps=2"], cwd=ROOT,
                           env=subprocess_env(1), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    outputs = [p.communicate(timeout=600)[0] for p in procs + [ref]]
    for p, out in zip(procs + [ref], outputs):
        assert p.returncode == 0, out[-4000:]
    assert "process 1 of 2, 2 local / 4 global devices" in outputs[1]

    # One checkpoint directory, written collectively; each process stored its own data position.
    for step in (2, 4):
        data_dir = multi / "checkpoints" / str(step) / "data"
        states = [json.loads((data_dir / f"process_{i}-of-2.json").read_text()) for i in range(2)]
        assert states == [{"step": step}, {"step": step}]
    assert not (multi / "checkpoints" / "4" / "data" / "process_0-of-1.json").exists()

    np.testing.assert_allclose(_losses(multi), _losses(single), rtol=1e-5, atol=0)
    assert len(_losses(multi)) == STEPS

    from train.checkpoint import Checkpointer

    got = _flat(Checkpointer(multi / "checkpoints", keep=0).restore_params(STEPS)[0])
    want = _flat(Checkpointer(single / "checkpoints", keep=0).restore_params(STEPS)[0])
    assert got.keys() == want.keys()
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-4, atol=2e-6, err_msg=key)
