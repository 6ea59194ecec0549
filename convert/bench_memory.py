"""Peak-memory benchmark of the converter on a 1B-class LLaVA checkpoint.

`python -m convert.bench_memory [--workdir DIR] [--keep]` writes a random bf16 LLaVA (Llama
hidden 2048, 16 layers, vocab 32000, plus a small CLIP) as several layout-D safetensors shards,
converts it with `python -m convert` in a subprocess while sampling that process's RSS, and prints
JSON {peak_rss_gb, largest_shard_gb, total_gb, seconds, gb_per_s, ...}. `ok` is the streaming
claim: peak RSS <= largest shard + 1.5 GB (the whole model never sits in memory).
Not part of the test suite: it writes ~4 GB to disk.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

from convert import hf_config, keymap
from convert.readers import write_sharded_safetensors
from gmod_jax.config import LlamaConfig, ModelConfig, ProjectorConfig, VisionConfig

HEADROOM_GB = 1.5


def bench_config() -> ModelConfig:
    """TinyLlama-1.1B-shaped decoder (GQA 32/4) with a CLIP-B/16-sized 224-px tower."""
    return ModelConfig(
        vision=VisionConfig(hidden_size=768, intermediate_size=3072, num_layers=12, num_heads=12, image_size=224,
                            patch_size=16),
        projector=ProjectorConfig(),
        text=LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=16, num_heads=32,
                         num_kv_heads=4, max_position_embeddings=2048),
        image_token_index=31999, param_dtype="bfloat16", dtype="bfloat16")


def _random_bf16(shape, rng) -> np.ndarray:
    import ml_dtypes

    # Random bit patterns with exponent bit 14 cleared: finite values, no float RNG cost.
    bits = rng.integers(0, 2**16, size=shape, dtype=np.uint16) & np.uint16(0xBFFF)
    return bits.view(ml_dtypes.bfloat16)


def write_checkpoint(out: Path, config: ModelConfig, shard_size: str, seed: int = 0) -> list[Path]:
    """Layout-D sharded safetensors, generated one tensor at a time (one shard in memory)."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    tensors = ((keymap.to_layout_key(c, "D"), _random_bf16(t.torch_shape, rng))
               for c, t in keymap.expected_keys(config).items())
    files = write_sharded_safetensors(out, tensors, shard_size, metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config.to_hf_llava_config(config), indent=2))
    return files


def run_sampled(cmd: list[str], interval: float = 0.01) -> tuple[int, float, float, str]:
    """(exit code, peak RSS bytes of the process tree, seconds, stdout)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    ps = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            rss = ps.memory_info().rss + sum(c.memory_info().rss for c in ps.children(recursive=True))
            peak = max(peak, rss)
        except psutil.Error:
            pass
        time.sleep(interval)
    stdout, stderr = proc.communicate()
    if proc.returncode:
        sys.stderr.write(stderr)
    return proc.returncode, peak, time.perf_counter() - start, stdout


def durable_copy_seconds(files: list[Path], dst: Path) -> float:
    """Seconds to copy `files` into `dst` and fsync each, the least any converter writing the
    same bytes durably to the same disk must spend (the sources sit in the page cache)."""
    dst.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for f in files:
        with open(f, "rb") as src, open(dst / f.name, "wb") as out:
            shutil.copyfileobj(src, out, 64 << 20)
            out.flush()
            os.fsync(out.fileno())
    seconds = time.perf_counter() - start
    shutil.rmtree(dst, ignore_errors=True)
    return seconds


def markdown_section(r: dict) -> str:
    import datetime
    import platform

    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        "## Converter memory: PyTorch safetensors -> Orbax, streamed shard by shard\n\n"
        f"Written by `python -m convert.bench_memory --markdown BENCHMARKS.md` on "
        f"{datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')} "
        f"({platform.processor() or platform.machine()}, {r['cpu_count']} cores, load average {load}).\n\n"
        f"A random bf16 LLaVA of {r['num_params'] / 1e9:.2f}B params (Llama hidden 2048, 16 layers, GQA 32/4, "
        f"vocab 32000, CLIP-B/16-sized tower) in {r['shards']} safetensors shards, converted by "
        "`python -m convert` in a subprocess whose process-tree RSS is sampled every 10 ms.\n\n"
        f"Each of {len(r['seconds_runs'])} runs starts after `sync` (the generator's writes are on disk) "
        "and includes the process start-up; the table gives the median run and the peak RSS over all runs. "
        "*Durable copy* is, in the same runs, a plain copy of the shards with an fsync per file into the "
        "same directory: the disk-bound floor for writing these bytes durably, which the converter's "
        "Orbax writes (TensorStore fsyncs every file) also pay.\n\n"
        "| peak RSS GB | largest shard GB | total GB | import-only RSS GB | seconds (runs) | GB/s | "
        "durable copy GB/s | peak ≤ largest shard + 1.5 GB |\n"
        "|---:|---:|---:|---:|---:|---:|---:|:---:|\n"
        f"| {r['peak_rss_gb']:.2f} | {r['largest_shard_gb']:.2f} | {r['total_gb']:.2f} | "
        f"{r['import_baseline_rss_gb']:.2f} | {r['seconds']:.1f} ({', '.join(f'{x:.1f}' for x in r['seconds_runs'])}) "
        f"| {r['gb_per_s']:.3f} | {r['durable_copy_gb_per_s']:.3f} | {'yes' if r['ok'] else 'NO'} |\n\n"
        "Peak memory is bounded by one shard plus one Orbax write batch (`--batch-mb`), not by the "
        "model size, which is what lets a 13B checkpoint (~26 GB bf16) convert on a 24 GiB machine.\n")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default=None, help="where to write the checkpoints (default: a temp dir)")
    p.add_argument("--shard-size", default="600MB")
    p.add_argument("--batch-mb", type=int, default=512)
    p.add_argument("--keep", action="store_true", help="keep the generated files")
    p.add_argument("--repeats", type=int, default=3, help="conversions to run (the median is reported)")
    p.add_argument("--markdown", default=None, help="rewrite the `convert-memory` section of this BENCHMARKS.md")
    args = p.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="gmod-bench-mem-"))
    src, out = work / "hf", work / "flax"
    try:
        config = bench_config()
        t0 = time.perf_counter()
        files = write_checkpoint(src, config, args.shard_size)
        gen_s = time.perf_counter() - t0
        imports = "import convert.pipeline; from orbax.checkpoint import v1"
        code, baseline, _, _ = run_sampled([sys.executable, "-c", imports])
        cmd = [sys.executable, "-m", "convert", "--src", str(src), "--out", str(out), "--json",
               "--batch-mb", str(args.batch_mb)]
        runs, copies, peak = [], [], 0
        for _ in range(max(1, args.repeats)):
            # Neither the generator's nor the previous run's dirty pages may be flushed on this
            # run's time.
            shutil.rmtree(out, ignore_errors=True)
            os.sync()
            copies.append(durable_copy_seconds(files, work / "durable-copy"))
            os.sync()
            code, run_peak, seconds, stdout = run_sampled(cmd)
            if code:
                raise SystemExit(f"conversion failed with exit code {code}")
            runs.append(seconds)
            peak = max(peak, run_peak)
        summary = json.loads(stdout)
        seconds, copy_s = float(np.median(runs)), float(np.median(copies))
        sizes = [f.stat().st_size for f in files]
        result = {
            "peak_rss_gb": round(peak / 1e9, 3),
            "import_baseline_rss_gb": round(baseline / 1e9, 3),
            "largest_shard_gb": round(max(sizes) / 1e9, 3),
            "total_gb": round(sum(sizes) / 1e9, 3),
            "shards": len(files),
            "num_params": summary["num_params"],
            "seconds": round(seconds, 2),
            "seconds_runs": [round(x, 2) for x in runs],
            "convert_seconds": summary["seconds"],
            "gb_per_s": round(sum(sizes) / 1e9 / seconds, 3),
            "durable_copy_seconds_runs": [round(x, 2) for x in copies],
            "durable_copy_gb_per_s": round(sum(sizes) / 1e9 / copy_s, 3),
            "batch_mb": args.batch_mb,
            "generate_seconds": round(gen_s, 1),
            "cpu_count": os.cpu_count(),
        }
        result["ok"] = result["peak_rss_gb"] <= result["largest_shard_gb"] + HEADROOM_GB
        print(json.dumps(result, indent=2))
        if args.markdown:
            from gmod_jax.benchmarks_md import update_markdown

            update_markdown(args.markdown, "convert-memory", markdown_section(result))
        return result
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
