#!/usr/bin/env bash
# Dense vs γ-MoD on one GPU, LLaVA-1.5-7B shapes with random bf16 weights (configs/bench_gpu.py):
# prefill at batch 1 and 8, decode of 32 tokens at batch 1 and 8, MFU, with the config's
# attention_impl `auto` (cuDNN flash attention for bf16 on a GPU). Then prefill at batch 1 and 8
# once per other attention implementation in $ATTENTION_IMPLS (default "blocked xla": the XLA
# fallbacks), each into its own section `gpu_attention_<impl>`. Then the same dense vs γ-MoD cases
# at the shapes of γ-MoD's other base models, once per config in $MODEL_CONFIGS (default
# "bench_gpu_hr bench_gpu_mgm": LLaVA-HR-7B at 1400 tokens, MGM-HD-7B at 4000 tokens; sections
# `gpu_hr`, `gpu_mgm`; JSONs runs/<config>.json). Writes the JSONs and those sections
# of BENCHMARKS.md. No downloads. Estimated 7-12 minutes on an H200, mostly XLA compiles
# (13 programs, plus 4 per extra attention implementation), then 8 programs per model config
# (their multi-path / MGM towers compile longer); not yet measured on a GPU.
#
#   bash scripts/gpu_bench.sh [extra bench arguments, e.g. --set repeats=3]
#
# Env: PYTHON (interpreter with a CUDA jax; default .venv/bin/python, else python3),
# BENCH_JSON (default runs/bench_gpu.json; rewritten after every case, so a run cut short keeps
# what it finished; the attention runs write runs/bench_gpu_attention_<impl>.json next to it),
# ATTENTION_IMPLS (space-separated `attention_impl` values for the extra prefill sections; empty
# to skip them), MODEL_CONFIGS (space-separated configs/<name>.py for the other base models; empty
# to skip them). When $OUT is set (device-machine runs), the JSONs and BENCHMARKS.md are also
# copied there; locally, `python -m bench --from-json runs/bench_gpu.json --markdown
# BENCHMARKS.md` puts the fetched results into the local file. Without a GPU it prints why and
# exits 0. Split a run with `--only prefill_b1 --only decode_b1_n32` etc.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

if ! backend=$("$PYTHON" -c 'import jax; print(jax.default_backend())' 2>/dev/null); then
  echo "gpu_bench: $PYTHON cannot import jax; nothing was run."
  exit 0
fi
if [ "$backend" != "gpu" ]; then
  echo "gpu_bench: no GPU visible to JAX ($PYTHON reports backend '$backend'); nothing was run."
  exit 0
fi

# A rerun on the same machine (e.g. after hitting a time limit) reuses compiled programs.
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-/tmp/gmod_jax_compile_cache}"
json="${BENCH_JSON:-runs/bench_gpu.json}"
status=0
"$PYTHON" -m bench --config configs/bench_gpu.py --json "$json" --markdown BENCHMARKS.md "$@" || status=$?

# Prefill rows per attention implementation. The analytic FLOP count follows what each one
# computes: "blocked" skips most of the masked upper triangle in query blocks, "xla" scores
# every query/key pair (the cuDNN kernel of the main run skips it tile by tile: "causal").
jsons=("$json")
for impl in ${ATTENTION_IMPLS-blocked xla}; do
  case "$impl" in
    xla) counting=full ;;
    blocked|cpu_blocked) counting=blocked ;;
    *) counting=causal ;;
  esac
  impl_json="$(dirname "$json")/bench_gpu_attention_${impl}.json"
  jsons+=("$impl_json")
  "$PYTHON" -m bench --config configs/bench_gpu.py --json "$impl_json" --markdown BENCHMARKS.md \
    --set "model.attention_impl=$impl" --set "attention_flops=$counting" --set "section=gpu_attention_$impl" \
    --set "title=GPU prefill with attention_impl=$impl, LLaVA-1.5-7B shapes, bf16, 650 tokens (\`configs/bench_gpu.py\`)" \
    --only prefill_b1 --only prefill_b8 "$@" || status=$?
done

# The other base models (LLaVA-HR, MGM-HD): every case of their configs, each into its own section.
for name in ${MODEL_CONFIGS-bench_gpu_hr bench_gpu_mgm}; do
  model_json="$(dirname "$json")/${name}.json"
  jsons+=("$model_json")
  "$PYTHON" -m bench --config "configs/${name}.py" --json "$model_json" --markdown BENCHMARKS.md \
    "$@" || status=$?
done

if [ -n "${OUT:-}" ] && [ -d "$OUT" ]; then
  for f in "${jsons[@]}" BENCHMARKS.md; do
    if [ -f "$f" ]; then cp "$f" "$OUT"/; fi
  done
fi
exit "$status"
