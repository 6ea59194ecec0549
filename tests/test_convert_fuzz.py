"""Hostile and malformed checkpoints: every one gets exit 2, one line per problem naming a file or
key, no traceback, nothing left behind, bounded memory and time.

Each case starts from a valid tiny checkpoint (tests/hf_fixtures.py) and damages its safetensors
headers, shard index, torch pickles or config.json: types swapped, numbers out of range or huge,
truncations, duplicate and missing entries. A fixed list covers each check once (including the
five cases of issue 25); a seeded random sample adds combinations nobody listed.

The cases run through the CLI's `main` in ONE child process (`drive` below), under RLIMIT_AS of
2 GiB and a per-case alarm: a `python -m convert` per case would cost a JAX import each. The child
reports its own peak RSS. The five issue-25 cases also run as real `python -m convert` processes.
"""

from __future__ import annotations

import contextlib
import io
import json
import random
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Callable

import pytest

MEMORY_LIMIT = 2 * 2**30
CASE_SECONDS = 60
ROOT = Path(__file__).resolve().parents[1]
# A problem line names a file (config.json, a shard, an index) or a tensor key.
NAMES_CULPRIT = re.compile(r"\.json\b|\.safetensors\b|\.bin\b|\b(language_model|vision_tower|model|lm_head|"
                           r"multi_modal_projector)\.\w")


# ----------------------------------------------------------------------------------------------
# the child process

def _limit_memory():
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def _alarm(signum, frame):
    raise TimeoutError(f"case took more than {CASE_SECONDS} s")


def drive(cases_path: str, results_path: str):
    """Run `convert.__main__.main(argv)` for every case; record rc, stderr (a leaked exception
    becomes its traceback text, as Python would print it) and what was left next to --out."""
    from convert.__main__ import main

    signal.signal(signal.SIGALRM, _alarm)
    results = []
    for case in json.loads(Path(cases_path).read_text()):
        err = io.StringIO()
        signal.alarm(CASE_SECONDS)
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                rc = main(case["argv"])
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 1
        except MemoryError:  # formatting the traceback could exhaust the limit again
            rc = 1
            err.write("Traceback: MemoryError (hit the address-space limit)\n")
        except BaseException:  # noqa: BLE001 - the point is to see anything that escapes
            rc = 1
            err.write(traceback.format_exc())
        finally:
            signal.alarm(0)
        out = Path(case["out"])
        left = [p.name for p in out.parent.glob(out.name + "*")]
        results.append({"name": case["name"], "rc": rc, "stderr": err.getvalue(), "left": left})
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    Path(results_path).write_text(json.dumps({"results": results, "peak_rss": peak}))


def _run_driver(tmp: Path, cases: list[dict], limit_memory: bool = True) -> dict:
    cases_path, results_path = tmp / "cases.json", tmp / "results.json"
    cases_path.write_text(json.dumps(cases))
    code = "import sys; from tests.test_convert_fuzz import drive; drive(sys.argv[1], sys.argv[2])"
    proc = subprocess.run([sys.executable, "-c", code, str(cases_path), str(results_path)], cwd=ROOT,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"},
                          preexec_fn=_limit_memory if limit_memory else None, capture_output=True, text=True,
                          timeout=CASE_SECONDS * 4 + 2 * len(cases))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(results_path.read_text())


def _check_rejected(result: dict):
    name, err = result["name"], result["stderr"]
    assert result["rc"] == 2, f"{name}: exit {result['rc']}\n{err[-3000:]}"
    assert "Traceback" not in err, f"{name}:\n{err[-3000:]}"
    assert err.startswith("error: "), f"{name}: {err[:500]}"
    lines = err.rstrip("\n").split("\n")
    problems = [l[4:] for l in lines if l.startswith("  - ")] if len(lines) > 1 else [lines[0]]
    assert problems and all(l.startswith(("  - ", "  (+")) for l in lines[1:]), f"{name}:\n{err}"
    for problem in problems:
        assert NAMES_CULPRIT.search(problem), f"{name}: names no file or key: {problem}"
        assert len(problem) < 2000, f"{name}: unbounded message ({len(problem)} chars)"
    assert not result["left"], f"{name}: left {result['left']}"


# ----------------------------------------------------------------------------------------------
# valid bases

SHARD = "model-00001-of-00002.safetensors"
INDEX = "model.safetensors.index.json"
BIN_SHARD = "pytorch_model-00001-of-00002.bin"
BIN_INDEX = "pytorch_model.bin.index.json"


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    """hf: layout D in 2 safetensors shards; bin: layout D in 2 .bin shards; mod: γ-MoD (original
    keys + shared router), one safetensors file; orig: original LLaVA without its tower, which
    comes from the CLIP checkpoint in orig/clip (--vision-tower)."""
    from tests import hf_fixtures as fx  # torch + transformers: imported here, never in the child

    root = tmp_path_factory.mktemp("bases")
    spec = fx.SPECS["base"]
    sd = fx.state_dict_c(fx.build_model(spec))
    for name, container in (("hf", "safetensors"), ("bin", "bin")):
        fx.write_weights(fx.rename(sd, "D"), root / name, container, shards=2)
        fx.write_json(root / name / "config.json", fx.config_v5(spec))
    mod_spec = fx.Spec(name="mod", layers=4)
    fx.write_gamma_mod(fx.state_dict_c(fx.build_model(mod_spec)), mod_spec, root / "mod", [1, 2, 3])
    fx.write_weights(fx.rename(sd, "E"), root / "orig")
    fx.write_json(root / "orig" / "config.json", fx.config_original(spec, dtype="float32"))
    fx.write_clip_dir(sd, spec, root / "orig" / "clip")
    return {"hf": root / "hf", "bin": root / "bin", "mod": root / "mod", "orig": root / "orig"}


# ----------------------------------------------------------------------------------------------
# mutation helpers

def _read_header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _write_header(path: Path, header: dict | list | str | bytes, data: bytes):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def header(file: str, edit: Callable[[dict], object]):
    """Mutation of a safetensors header; `edit` changes the dict in place or returns a new header."""
    def apply(src: Path):
        h, data = _read_header(src / file)
        new = edit(h)
        _write_header(src / file, h if new is None else new, data)
    return apply


def entry(file: str, index: int, field: str, value):
    """Set field `field` of the `index`-th tensor entry of a header (_DELETE deletes it)."""
    def edit(h):
        key = _tensor_names(h)[index]
        if value is _DELETE:
            del h[key][field]
        else:
            h[key][field] = value
    return header(file, edit)


def config(edit: Callable[[dict], object], file: str = "config.json"):
    def apply(src: Path):
        d = json.loads((src / file).read_text())
        new = edit(d)
        (src / file).write_text(json.dumps(d if new is None else new, indent=2))
    return apply


def setting(path: str, value, file: str = "config.json"):
    """config["a"]["b"] = value for path "a.b" (the index's weight_map too: file=INDEX)."""
    *parents, last = path.split(".")

    def edit(d):
        for p in parents:
            d = d[p]
        if value is _DELETE:
            del d[last]
        else:
            d[last] = value
    return config(edit, file)


def weight_map_value(index: int, value, file: str = INDEX):
    def edit(d):
        d["weight_map"][list(d["weight_map"])[index]] = value
    return config(edit, file)


def raw_text(file: str, transform: Callable[[str], str]):
    def apply(src: Path):
        (src / file).write_text(transform((src / file).read_text()))
    return apply


def truncate(file: str, keep: float | int):
    def apply(src: Path):
        raw = (src / file).read_bytes()
        n = keep if isinstance(keep, int) else int(len(raw) * keep)
        (src / file).write_bytes(raw[:n])
    return apply


def _duplicate_first_key(text: str) -> str:
    """Repeat the first `"key": value` pair of a JSON object (json.dumps keeps it textual)."""
    first = re.search(r'"[^"]+":\s*("[^"]*"|-?[0-9.e+]+|true|false|null|\{[^{}]*\})', text)
    assert first, text[:200]
    return text[:first.end()] + ", " + first.group(0) + text[first.end():]


def _tensor_names(h: dict) -> list[str]:
    return [k for k in h if k != "__metadata__"]


def _duplicate_tensor(src: Path):
    """The first tensor's entry written twice, the second time pointing at another tensor's bytes."""
    h, data = _read_header(src / SHARD)
    first, second = _tensor_names(h)[:2]
    text = json.dumps(h)
    twin = json.dumps({first: {**h[first], "data_offsets": h[second]["data_offsets"]}})[1:-1]
    _write_header(src / SHARD, (text[:-1] + ", " + twin + "}").encode(), data)


def _overlap(h):
    keys = _tensor_names(h)
    sizes = {}
    for k in keys:
        span = h[k]["data_offsets"][1] - h[k]["data_offsets"][0]
        if span in sizes:
            h[k]["data_offsets"] = list(h[sizes[span]]["data_offsets"])
            return
        sizes[span] = k
    raise AssertionError("no two tensors of one size")


def _transpose_first_matrix(h):
    """Same bytes, shape [a, b] -> [b, a]: a valid header that contradicts the config."""
    info = next(v for k, v in h.items() if k != "__metadata__" and len(v["shape"]) == 2 and v["shape"][0] != v["shape"][1])
    info["shape"] = info["shape"][::-1]


def _rename_first(h, new_name):
    key = _tensor_names(h)[0]
    h[new_name] = h.pop(key)


def _stray_last_layer(src: Path):
    """Config: 1e9 layers; weights: a (renamed) tensor of layer 999999999, consistently indexed."""
    stray = "language_model.model.layers.999999999.mlp.up_proj.weight"
    setting("text_config.num_hidden_layers", 10**9)(src)
    first = _tensor_names(_read_header(src / SHARD)[0])[0]
    header(SHARD, lambda h: _rename_first(h, stray))(src)
    config(lambda d: d["weight_map"].update({stray: d["weight_map"].pop(first)}), INDEX)(src)


def _evil_pickle(src: Path):
    import os

    import torch

    torch.save({"w": torch.zeros(2), "hook": os.system}, src / BIN_SHARD)


def _deep(n: int) -> str:
    return "[" * n + "]" * n


_DELETE = object()
HUGE = 10**30

# (name, base, mutation). The first five groups are issue 25's cases.
CASES: list[tuple[str, str, Callable[[Path], None]]] = [
    # issue 25: __metadata__ not an object
    ("metadata list", "hf", header(SHARD, lambda h: h.update(__metadata__=[1, 2]))),
    ("metadata string", "hf", header(SHARD, lambda h: h.update(__metadata__="pt"))),
    ("metadata non-string value", "hf", header(SHARD, lambda h: h.update(__metadata__={"format": 5}))),
    # issue 25: weight_map value not a file name
    ("weight_map value int", "hf", weight_map_value(0, 5)),
    ("weight_map value list", "hf", weight_map_value(0, [SHARD])),
    ("weight_map traversal", "hf", weight_map_value(0, "../" + SHARD)),
    ("weight_map absolute", "hf", weight_map_value(0, "/etc/passwd")),
    ("weight_map subdir", "hf", weight_map_value(0, "sub/" + SHARD)),
    ("weight_map missing file", "hf", weight_map_value(0, "model-00009-of-00009.safetensors")),
    ("weight_map wrong container", "hf", weight_map_value(0, "pytorch_model.bin")),
    ("weight_map wrong shard", "hf", weight_map_value(0, "model-00002-of-00002.safetensors")),
    ("weight_map control char", "hf", weight_map_value(0, "model\n.safetensors")),
    ("bin weight_map traversal", "bin", weight_map_value(0, "../" + BIN_SHARD, BIN_INDEX)),
    # issue 25: nested config section not an object
    ("text_config string", "hf", setting("text_config", "llama")),
    ("vision_config list", "hf", setting("vision_config", [1])),
    ("rope_parameters int", "hf", setting("text_config.rope_parameters", 7)),
    ("mod string", "mod", setting("mod", "on")),
    ("mm_vision_config string", "mod", setting("mm_vision_config", "clip")),
    # issue 25: feature layer outside the tower (3 layers: -4..3)
    ("feature layer -10", "hf", setting("vision_feature_layer", -10)),
    ("feature layer 4", "hf", setting("vision_feature_layer", 4)),
    ("feature layers list", "hf", setting("vision_feature_layer", [-1, 7])),
    ("feature layers empty", "hf", setting("vision_feature_layer", [])),
    ("feature layer string", "hf", setting("vision_feature_layer", "last")),
    ("feature layer float", "hf", setting("vision_feature_layer", -2.0)),
    ("mm select layer", "mod", setting("mm_vision_select_layer", 99)),
    # issue 25: configs claiming far more layers than the weights hold
    ("text layers 1e9 int", "hf", setting("text_config.num_hidden_layers", 10**9)),
    ("text layers 1e9 float", "hf", setting("text_config.num_hidden_layers", 1e9)),
    ("vision layers 1e9", "hf", setting("vision_config.num_hidden_layers", 10**9)),
    ("text layers 2e9 (int32)", "hf", setting("text_config.num_hidden_layers", 2**31 - 1)),
    ("text layers huge", "hf", setting("text_config.num_hidden_layers", HUGE)),
    ("mod flat layers 1e9", "mod", setting("num_hidden_layers", 10**9)),
    ("bin layers 1e9", "bin", setting("text_config.num_hidden_layers", 10**9)),
    ("weights and config claim 1e9 layers", "hf", _stray_last_layer),
    # safetensors headers
    ("entry not object", "hf", header(SHARD, lambda h: h.update({_tensor_names(h)[0]: 5}))),
    ("dtype unknown", "hf", entry(SHARD, 0, "dtype", "F99")),
    ("dtype int", "hf", entry(SHARD, 0, "dtype", 3)),
    ("dtype missing", "hf", entry(SHARD, 1, "dtype", _DELETE)),
    ("shape string", "hf", entry(SHARD, 0, "shape", "12")),
    ("shape huge", "hf", entry(SHARD, 0, "shape", [2**40, 2**40, 2**40])),
    ("shape negative", "hf", entry(SHARD, 0, "shape", [-1, 64])),
    ("shape bools", "hf", entry(SHARD, 0, "shape", [True, True])),
    ("shape floats", "hf", entry(SHARD, 0, "shape", [1.5, 64])),
    ("shape rank 40", "hf", entry(SHARD, 0, "shape", [1] * 40)),
    ("offsets short", "hf", entry(SHARD, 0, "data_offsets", [0])),
    ("offsets reversed", "hf", entry(SHARD, 0, "data_offsets", [128, 0])),
    ("offsets strings", "hf", entry(SHARD, 0, "data_offsets", ["0", "128"])),
    ("offsets huge", "hf", entry(SHARD, 0, "data_offsets", [0, 2**70])),
    ("offsets overlap", "hf", header(SHARD, _overlap)),
    ("shape contradicts config", "hf", header(SHARD, _transpose_first_matrix)),
    ("tensor name control char", "hf", header(SHARD, lambda h: _rename_first(h, "vision_tower.x\n.weight"))),
    ("tensor removed", "hf", header(SHARD, lambda h: h.pop(_tensor_names(h)[0]) and None)),
    ("header duplicate tensor", "hf", _duplicate_tensor),
    ("header is a list", "hf", header(SHARD, lambda h: [h])),
    ("header garbage", "hf", lambda src: _write_header(src / SHARD, b"\xff\xfe{{not json", b"")),
    ("header deep nesting", "hf", lambda src: _write_header(src / SHARD, _deep(100_000).encode(), b"")),
    ("header length huge", "hf", lambda src: (src / SHARD).write_bytes(
        struct.pack("<Q", 2**63) + (src / SHARD).read_bytes()[8:])),
    ("shard truncated", "hf", truncate(SHARD, 0.6)),
    ("shard 5 bytes", "hf", truncate(SHARD, 5)),
    # shard index
    ("weight_map is a list", "hf", setting("weight_map", [], INDEX)),
    ("weight_map empty", "hf", setting("weight_map", {}, INDEX)),
    ("weight_map absent", "hf", setting("weight_map", _DELETE, INDEX)),
    ("index lists unknown tensor", "hf", config(lambda d: d["weight_map"].update({"language_model.extra": SHARD}),
                                                INDEX)),
    ("index misses a tensor", "hf", config(lambda d: d["weight_map"].pop(next(iter(d["weight_map"]))) and None,
                                           INDEX)),
    ("index truncated", "hf", truncate(INDEX, 0.5)),
    ("index duplicate key", "hf", raw_text(INDEX, lambda t: t.replace('"weight_map": {', '"weight_map": {' +
                                                                   _first_pair(t) + ", ", 1))),
    ("index is a string", "hf", config(lambda d: "weights", INDEX)),
    # config.json
    ("config is a list", "hf", config(lambda d: [d])),
    ("config truncated", "hf", truncate("config.json", 0.5)),
    ("config duplicate key", "hf", raw_text("config.json", _duplicate_first_key)),
    ("config deep nesting", "hf", raw_text("config.json", lambda t: t[:-1] + ', "x": ' + _deep(100_000) + "}")),
    ("config NaN eps", "hf", raw_text("config.json", lambda t: t.replace('"rms_norm_eps": 1e-05', '"rms_norm_eps": NaN'))),
    ("heads do not divide width", "hf", setting("text_config.num_attention_heads", 5)),
    ("heads zero", "hf", setting("text_config.num_attention_heads", 0)),
    ("kv heads do not divide heads", "hf", setting("text_config.num_key_value_heads", 3)),
    ("vision heads do not divide width", "hf", setting("vision_config.num_attention_heads", 5)),
    ("hidden size odd", "hf", setting("text_config.hidden_size", 63)),
    ("hidden size string", "hf", setting("text_config.hidden_size", "64")),
    ("hidden size contradicts weights", "hf", setting("text_config.hidden_size", 128)),
    ("vocab bool", "hf", setting("text_config.vocab_size", True)),
    ("vocab negative", "hf", setting("text_config.vocab_size", -5)),
    ("vocab huge", "hf", setting("text_config.vocab_size", HUGE)),
    ("vocab contradicts weights", "hf", setting("text_config.vocab_size", 10**9)),
    ("head_dim odd", "hf", setting("text_config.head_dim", 7)),
    ("max positions negative", "hf", setting("text_config.max_position_embeddings", -1)),
    ("rms eps string", "hf", setting("text_config.rms_norm_eps", "small")),
    ("rope type unknown", "hf", setting("text_config.rope_parameters.rope_type", "warp")),
    ("rope theta zero", "hf", setting("text_config.rope_parameters.rope_theta", 0)),
    ("attention_bias string", "hf", setting("text_config.attention_bias", "false")),
    ("tie int", "hf", setting("text_config.tie_word_embeddings", 1)),
    ("pad outside vocab", "hf", setting("text_config.pad_token_id", 10**6)),
    ("image token string", "hf", setting("image_token_index", "x")),
    ("strategy int", "hf", setting("vision_feature_select_strategy", 3)),
    ("projector bias string", "hf", setting("multimodal_projector_bias", "yes")),
    ("patch size zero", "hf", setting("vision_config.patch_size", 0)),
    ("image size not a multiple", "hf", setting("vision_config.image_size", 30)),
    ("image size huge", "hf", setting("vision_config.image_size", 14 * 10**6)),
    ("channels huge", "hf", setting("vision_config.num_channels", HUGE)),
    ("layer norm eps negative", "hf", setting("vision_config.layer_norm_eps", -1.0)),
    # γ-MoD config
    ("mod layers string", "mod", setting("mod.mod_layers_idx", "1,2,3")),
    ("mod layers outside", "mod", setting("mod.mod_layers_idx", [1, 99])),
    ("mod layers empty", "mod", setting("mod.mod_layers_idx", [])),
    ("mod layers floats", "mod", setting("mod.mod_layers_idx", [1.5])),
    ("mod aux coef negative", "mod", setting("mod.router_aux_loss_coef", -1)),
    ("mod enable string", "mod", setting("mod.mod_enable", "yes")),
    ("mm projector type int", "mod", setting("mm_projector_type", 5)),
    ("mm hidden size string", "mod", setting("mm_hidden_size", "32")),
    ("mm tower name list", "mod", setting("mm_vision_tower", ["clip"])),
    ("mod router shape", "mod", header("model.safetensors", lambda h: h[
        next(k for k in h if k.endswith("router.weight"))].update(shape=[1, 128]))),
    # torch .bin
    ("bin shard truncated", "bin", truncate(BIN_SHARD, 0.7)),
    ("bin foreign global", "bin", _evil_pickle),
    ("bin index not json", "bin", truncate(BIN_INDEX, 0.3)),
    # the --vision-tower directory
    ("tower vision_config string", "orig", setting("vision_config", "clip", "clip/config.json")),
    ("tower layers 1e9", "orig", setting("vision_config.num_hidden_layers", 10**9, "clip/config.json")),
    ("tower heads string", "orig", setting("vision_config.num_attention_heads", "4", "clip/config.json")),
    ("tower select layer outside", "orig", setting("mm_vision_select_layer", -5)),
    ("tower header dtype", "orig", entry("clip/model.safetensors", 0, "dtype", None)),
    ("tower config truncated", "orig", truncate("clip/config.json", 0.5)),
    # metadata larger than the readers accept
    ("header over the size limit", "hf", lambda src: _write_header(
        src / SHARD, json.dumps(_read_header(src / SHARD)[0]).encode() + b" " * (33 * 2**20),
        _read_header(src / SHARD)[1])),
]


def _first_pair(index_text: str) -> str:
    d = json.loads(index_text)
    key, value = next(iter(d["weight_map"].items()))
    return f"{json.dumps(key)}: {json.dumps(value)}"


# ----------------------------------------------------------------------------------------------
# seeded random sample

INT_FIELDS = [f"text_config.{f}" for f in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                           "num_attention_heads", "num_key_value_heads", "max_position_embeddings")]
INT_FIELDS += [f"vision_config.{f}" for f in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                              "num_attention_heads", "image_size", "patch_size", "num_channels")]
# None of these is valid for any of INT_FIELDS or any header / index field.
BAD_VALUES = [-1, 0, 10**12, HUGE, 2.5, 1e9, "7", "", [], [1], {}, {"a": 1}, True, False]


def random_cases(seed: int, n: int) -> list[tuple[str, str, Callable[[Path], None]]]:
    rng = random.Random(seed)
    cases = []
    for i in range(n):
        kind = rng.choice(["config", "header", "index", "truncate"])
        value = rng.choice(BAD_VALUES)
        if kind == "config":
            field = rng.choice(INT_FIELDS)
            cases.append((f"random {i}: {field}={value!r}", "hf", setting(field, value)))
        elif kind == "header":
            index, field = rng.randrange(20), rng.choice(["dtype", "shape", "data_offsets"])
            cases.append((f"random {i}: header entry {index} {field}={value!r}", "hf", entry(SHARD, index, field, value)))
        elif kind == "index":
            index = rng.randrange(40)
            cases.append((f"random {i}: weight_map[{index}]={value!r}", "hf", weight_map_value(index, value)))
        else:
            file = rng.choice([SHARD, INDEX, "config.json"])
            keep = rng.uniform(0.0, 0.98)
            cases.append((f"random {i}: {file} cut at {keep:.2f}", "hf", truncate(file, keep)))
    return cases


# What the issue-25 cases (and a few others) must say, beyond naming a file or key.
EXPECTED_WORDS = {
    "metadata list": ["model-00001-of-00002.safetensors", "__metadata__ must be an object"],
    "weight_map traversal": [INDEX, "'../model-00001-of-00002.safetensors' is not a plain file name"],
    "weight_map value int": [INDEX, "shard file must be a file name, got 5"],
    "text_config string": ["config.json: text_config must be an object, got 'llama'"],
    "feature layer -10": ["config.json: vision_feature_layer -10", "outside the vision tower's hidden states -4..3"],
    "feature layers list": ["vision_feature_layer [-1, 7]: 7 outside"],
    "text layers 1e9 int": ["config.json says text num_hidden_layers=1000000000 but the checkpoint has layers 0..1",
                            "the config contradicts the weights"],
    "vision layers 1e9": ["vision num_hidden_layers=1000000000 but the checkpoint has layers 0..2"],
    "text layers 1e9 float": ["text_config.num_hidden_layers must be an integer", "got 1000000000.0"],
    "bin foreign global": ["refusing to unpickle global posix.system"],
    "heads do not divide width": ["text_config.num_attention_heads 5 not divisible by "
                                  "text_config.num_key_value_heads 2"],
    "shape contradicts config": ["shape mismatches (1)", "config expects"],
    "weights and config claim 1e9 layers": ["num_hidden_layers=1000000000 but the checkpoint holds only"],
    "header over the size limit": ["exceeds the 33554432 this reader accepts"],
    "tower vision_config string": ["clip/config.json: vision_config must be an object"],
}
ISSUE_CASES = ["metadata list", "weight_map traversal", "text_config string", "feature layer -10",
               "text layers 1e9 int"]


# ----------------------------------------------------------------------------------------------
# tests

def _prepare(tmp: Path, bases: dict[str, Path], cases) -> tuple[list[dict], dict[str, Path]]:
    prepared, sources = [], {}
    for i, (name, base, mutate) in enumerate(cases):
        src = tmp / f"case{i:03d}" / "src"
        shutil.copytree(bases[base], src)
        mutate(src)
        sources[name] = src
        tower = ["--vision-tower", str(src / "clip")] if base == "orig" else []
        prepared.append({"name": name, "argv": ["--src", str(src), "--out", str(src.parent / "out"), *tower],
                         "out": str(src.parent / "out")})
    return prepared, sources


def test_fuzzed_checkpoints_are_rejected_cleanly(tmp_path, bases):
    cases = CASES + random_cases(seed=25, n=30)
    assert len({name for name, _, _ in cases}) == len(cases)
    prepared, sources = _prepare(tmp_path, bases, cases)
    report = _run_driver(tmp_path, prepared)
    assert [r["name"] for r in report["results"]] == [c["name"] for c in prepared]
    for result in report["results"]:
        _check_rejected(result)
        for w in EXPECTED_WORDS.get(result["name"], []):
            assert w in result["stderr"], f"{result['name']}: {result['stderr']}"
    assert report["peak_rss"] < MEMORY_LIMIT


@pytest.mark.parametrize("name", ISSUE_CASES)
def test_issue_cases_through_python_m_convert(tmp_path, bases, name):
    """The issue's cases end to end: a real `python -m convert` process, memory-limited."""
    (case,) = [c for c in CASES if c[0] == name]
    prepared, sources = _prepare(tmp_path, bases, [case])
    out = Path(prepared[0]["out"])
    proc = subprocess.run([sys.executable, "-m", "convert", *prepared[0]["argv"]], cwd=ROOT,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"},
                          preexec_fn=_limit_memory, capture_output=True, text=True, timeout=120)
    result = {"name": name, "rc": proc.returncode, "stderr": proc.stderr,
              "left": [p.name for p in out.parent.glob(out.name + "*")]}
    _check_rejected(result)
    for w in EXPECTED_WORDS[name]:
        assert w in proc.stderr, proc.stderr


def test_unmutated_bases_convert(tmp_path, bases):
    """The control: every base is valid, so each rejection above is the mutation's doing. Run
    without the address-space limit (Orbax's writer threads reserve more than 2 GiB of virtual
    memory) but with the peak RSS measured."""
    cases = [{"name": name, "argv": ["--src", str(src), "--out", str(tmp_path / name)]
              + (["--vision-tower", str(src / "clip")] if name == "orig" else []), "out": str(tmp_path / name)}
             for name, src in bases.items()]
    report = _run_driver(tmp_path, cases, limit_memory=False)
    for result in report["results"]:
        assert result["rc"] == 0, result["stderr"][-3000:]
        assert (tmp_path / result["name"] / "params").is_dir()
    assert report["peak_rss"] < MEMORY_LIMIT
    # gmod_jax.load reads the converted config.json through ModelConfig's validation.
    import gmod_jax

    config_path = tmp_path / "hf" / "config.json"
    saved = json.loads(config_path.read_text())
    for field, value, words in (("feature_layer", -10, "vision.feature_layer -10: -10 outside the vision tower's "
                                                       "hidden states -4..3"),
                                ("feature_layer", [-1, 4], "4 outside"),
                                ("num_heads", "4", "vision.num_heads must be an integer")):
        config_path.write_text(json.dumps({**saved, "vision": {**saved["vision"], field: value}}))
        with pytest.raises(ValueError, match=re.escape(words)):
            gmod_jax.load(str(tmp_path / "hf"))
    config_path.write_text(json.dumps({**saved, "text": "llama"}))
    with pytest.raises(ValueError, match="text must be an object") as info:
        gmod_jax.load(str(tmp_path / "hf"))
    assert str(config_path) in str(info.value)  # the message names the file too


@pytest.mark.parametrize("layer", [-4, 3, (-1, 3), (), "-1", 1.0, True])
def test_python_configs_reject_feature_layers_outside_the_tower(layer):
    """A 2-layer tower has hidden states -3..2 (HF indexing); anything else is an error, never a clamp."""
    from gmod_jax.config import ConfigError, VisionConfig

    with pytest.raises(ConfigError, match="vision.feature_layer"):
        VisionConfig(num_layers=2, feature_layer=layer)


@pytest.mark.parametrize("layer,expected", [(-3, (0,)), (2, (2,)), (-1, (2,)), ((0, -2), (0, 1))])
def test_python_configs_accept_every_hidden_state(layer, expected):
    from gmod_jax.config import VisionConfig

    assert VisionConfig(num_layers=2, feature_layer=layer).feature_layers == expected


def test_model_config_from_dict_reports_every_problem():
    from gmod_jax import config as C

    d = C.tiny().to_dict()
    d["text"].update(num_layers=1e9, num_heads=0, rms_norm_eps="small")
    d["vision"] = [1]
    d["mod"]["layers"] = [-1]
    with pytest.raises(C.ConfigError) as info:
        C.ModelConfig.from_dict(d)
    assert info.value.problems == [
        "vision must be an object, got [1]",
        "text.num_layers must be an integer in [1, 2147483647], got 1000000000.0",
        "text.num_heads must be an integer in [1, 2147483647], got 0",
        "text.rms_norm_eps must be a finite number > 0, got 'small'",
        "mod.layers must be a list of layer indices >= 0, got (-1,)",
    ]
