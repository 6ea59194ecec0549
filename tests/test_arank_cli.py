"""`python -m gmod_jax.arank` on a tiny checkpoint: deterministic report, plot written."""

import json
import subprocess
import sys

import numpy as np

from gmod_jax.arank import cli as arank_cli
from tests.tiny_checkpoint import make_tiny_checkpoint


def _self_attending(params, layers=(2, 3), sharpness=8.0):
    """Make the given layers attend (almost) only to the token itself: k = sharpness·q. Their
    maps become nearly diagonal, so with the diagonal zeroed they have low ARank."""
    k = np.array(params["llm"]["layers"]["attn"]["k"]["kernel"])
    q = np.asarray(params["llm"]["layers"]["attn"]["q"]["kernel"])
    for i in layers:
        k[i] = sharpness * q[i]
    params["llm"]["layers"]["attn"]["k"]["kernel"] = k
    return params


def test_arank_cli_is_deterministic_and_plots(tmp_path):
    paths = make_tiny_checkpoint(tmp_path, transform_params=_self_attending)
    args = ["--ckpt", str(paths["ckpt"]), "--data", str(paths["data"].eval_json), "--images",
            str(paths["data"].image_root), "--num-samples", "3", "--num-dense", "2"]
    assert arank_cli.main(args + ["--out", str(tmp_path / "a")]) == 0
    assert arank_cli.main(args + ["--out", str(tmp_path / "b"), "--batch-size", "2"]) == 0
    a = json.loads((tmp_path / "a" / "arank.json").read_text())
    b = json.loads((tmp_path / "b" / "arank.json").read_text())
    assert a["per_layer_mean"] == b["per_layer_mean"]  # batching (padding) does not change ranks
    assert a["num_samples"] == 3 and a["num_layers"] == 4 and a["num_heads"] == 4
    assert a["mod_layers"] == [2, 3] and a["dense_layers"] == [0, 1]
    assert max(a["per_layer_mean"][2:]) < min(a["per_layer_mean"][:2])
    assert (tmp_path / "a" / "arank.png").stat().st_size > 1000
    assert (tmp_path / "a" / "mod_layers.txt").read_text().strip() == ",".join(map(str, a["mod_layers"]))


def test_module_entry_point_reports_bad_data(tmp_path):
    paths = make_tiny_checkpoint(tmp_path)
    empty = tmp_path / "text_only.json"
    empty.write_text(json.dumps([{"id": "t", "conversations": [{"from": "human", "value": "hi"},
                                                              {"from": "gpt", "value": "yo"}]}]))
    proc = subprocess.run([sys.executable, "-m", "gmod_jax.arank", "--ckpt", str(paths["ckpt"]), "--data",
                           str(empty), "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert proc.returncode == 2 and "no records with an image" in proc.stderr
    assert not (tmp_path / "o").exists()
