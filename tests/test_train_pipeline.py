"""The trainer on the real Grain pipeline: LLaVA JSON + images + SentencePiece tokenizer
(gmod_jax.data's procedurally generated dataset), through `python -m train`, with periodic
eval, a checkpoint holding the Grain iterator state, and the export to a loadable checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.test_sharding import ROOT, subprocess_env


def test_cli_trains_on_llava_json_pipeline(tmp_path):
    from gmod_jax.data import synthetic_texts, train_sentencepiece, write_synthetic_dataset

    ds = write_synthetic_dataset(tmp_path / "data", num_train=48, num_eval=16, seed=0)
    tok = train_sentencepiece(synthetic_texts(200), tmp_path / "tok", vocab_size=512)
    # Image samples only: a text-only row has nothing routable under the official masking, so
    # its batch would get the full-length capacity (a second compile; see the report).
    for src, dst in ((ds.train_json, "train.json"), (ds.eval_json, "eval.json")):
        records = [r for r in json.loads(src.read_text()) if "image" in r]
        (tmp_path / dst).write_text(json.dumps(records))
    workdir, export = tmp_path / "run", tmp_path / "export"
    cmd = [sys.executable, "-m", "train", "--config", str(ROOT / "configs" / "tiny_gamma_mod.py"),
           "--workdir", str(workdir), "--set",
           f"model.text.vocab_size={tok.vocab_size + 1}", f"model.image_token_index={tok.vocab_size}",
           f"model.pad_token_id={tok.pad_id}", "data.source=llava_json", f"data.path={tmp_path / 'train.json'}",
           f"data.eval_path={tmp_path / 'eval.json'}", f"data.image_folder={ds.image_root}",
           f"data.tokenizer={tmp_path / 'tok'}", "data.max_length=256", "data.buckets=256",
           "num_steps=4", "eval_every=4", "eval_steps=1", "checkpoint_every=2", "log_every=1",
           "progress_bar=false", f"export_dir={export}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]

    lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    train = [l for l in lines if "loss" in l]
    assert [l["step"] for l in train] == [1, 2, 3, 4]
    assert all(l["seq_len"] == 256 and 0.0 < l["skip_ratio"] < 0.5 for l in train)
    assert [l["step"] for l in lines if "eval/lm_loss" in l] == [4]
    # The checkpoint stores the Grain iterator state: 2 steps x 8 rows consumed.
    state = json.loads((workdir / "checkpoints" / "2" / "data" / "process_0-of-1.json").read_text())
    assert state["records"]["seen"] == 16 and state["records"]["bad"] == 0
    assert (workdir / "tb").is_dir() and any((workdir / "tb").iterdir())

    import gmod_jax

    model = gmod_jax.load(export)
    assert model.config.mod.layers == (1, 2) and model.config.text.vocab_size == tok.vocab_size + 1
