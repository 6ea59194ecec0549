#!/usr/bin/env bash
# Compile every shipped 7B recipe for its TPU mesh presets with `python -m train.aot` (no TPU
# needed; libtpu from requirements-dev.txt) and keep the JSON reports in docs/tpu_aot_reports/
# (committed: they are the measurements the tables are rendered from, a few KB each; the compiler
# logs go to runs/aot-logs/), then rewrite docs/tpu_aot.md's tables from them
# (`python -m train.aot_tables`). On this 2-core host
# one 7B train-step compile takes 1-4 minutes; `--find-batch` needs 5-8 of them per recipe.
# Runs go one at a time: a 7B LLaVA-HR step at 22-23 rows/chip peaks at ~17 GB of host RSS.
# Usage: scripts/tpu_aot_tables.sh [NAME ...]   (default: every run below; existing JSONs are kept)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${AOT_OUT:-docs/tpu_aot_reports}
LOGS=${AOT_LOGS:-runs/aot-logs}
mkdir -p "$OUT" "$LOGS"
V5P="--topology v5p-64 --mesh configs/mesh_tpu_v5p_64.py"
V5E="--topology v5e-256 --mesh configs/mesh_tpu_v5e_256_tp.py"
ALL="train_step,prefill,decode_step"
declare -A RUNS=(
  [dense_v5p64]="--config configs/llava_v15_7b_stage2.py $V5P --programs $ALL --find-batch"
  # --find-batch-from: the earlier searches' answers (HR: 19 rows fit at 79.5 GB/chip, 23 did not
  # at 99.0), compiled first with their neighbour; the answer is still confirmed on both sides.
  [gmod_v5p64]="--config configs/gamma_mod_llava_v15_7b.py $V5P --programs $ALL --find-batch --find-batch-from 36"
  [gmod_hr_v5p64]="--config configs/gamma_mod_llava_hr_7b.py $V5P --programs $ALL --find-batch --find-batch-from 22"
  [gmod_mgm_v5p64]="--config configs/gamma_mod_mgm_hd_7b.py $V5P --programs $ALL --find-batch --find-batch-from 9"
  [dense_v5e256]="--config configs/llava_v15_7b_stage2.py $V5E --programs $ALL"
  [gmod_v5e256]="--config configs/gamma_mod_llava_v15_7b.py $V5E --programs $ALL"
  [gmod_v5p64_onehot]="--config configs/gamma_mod_llava_v15_7b.py $V5P --programs train_step,prefill --set model.mod.implementation=onehot"
  [gmod_v5p64_recipe]="--config configs/gamma_mod_llava_v15_7b.py $V5P --programs train_step,prefill"
  [gmod_v5p64_xla]="--config configs/gamma_mod_llava_v15_7b.py $V5P --programs train_step --set model.attention_impl=xla"
  [dense_v5p64_recipe]="--config configs/llava_v15_7b_stage2.py $V5P --programs train_step"
  [dense_v5p64_xla]="--config configs/llava_v15_7b_stage2.py $V5P --programs train_step --set model.attention_impl=xla"
  # libtpu without windowed einsums (collective matmuls) for FSDP all-gathers / reduce-scatters.
  [dense_v5p64_nowe]="--config configs/llava_v15_7b_stage2.py $V5P --programs train_step"
  [gmod_v5p64_nowe]="--config configs/gamma_mod_llava_v15_7b.py $V5P --programs train_step"
  # At the batches the HR / MGM-HD searches reached on 2026-12-07 (docs/tpu_aot.md).
  [gmod_hr_v5p64_b19]="--config configs/gamma_mod_llava_hr_7b.py $V5P --programs $ALL --set global_batch=1216"
  [gmod_mgm_v5p64_b9]="--config configs/gamma_mod_mgm_hd_7b.py $V5P --programs $ALL --set global_batch=576"
  [dense_v5e256_fb]="--config configs/llava_v15_7b_stage2.py $V5E --programs train_step --find-batch"
  [gmod_v5e256_fb]="--config configs/gamma_mod_llava_v15_7b.py $V5E --programs train_step --find-batch"
)
declare -A LIBTPU=(
  [dense_v5p64_nowe]="--xla_tpu_enable_windowed_einsum_for_all_gather=false --xla_tpu_enable_windowed_einsum_for_reduce_scatter=false"
  [gmod_v5p64_nowe]="--xla_tpu_enable_windowed_einsum_for_all_gather=false --xla_tpu_enable_windowed_einsum_for_reduce_scatter=false"
)
ORDER=(dense_v5p64 gmod_v5p64 gmod_hr_v5p64 gmod_mgm_v5p64 dense_v5e256 gmod_v5e256 gmod_v5p64_recipe
       gmod_v5p64_onehot gmod_v5p64_xla dense_v5p64_recipe dense_v5p64_xla dense_v5p64_nowe gmod_v5p64_nowe
       gmod_hr_v5p64_b19 gmod_mgm_v5p64_b9 dense_v5e256_fb gmod_v5e256_fb)
names=("$@")
[ ${#names[@]} -eq 0 ] && names=("${ORDER[@]}")
for name in "${names[@]}"; do
  [ -n "${RUNS[$name]:-}" ] || { echo "unknown run $name (one of: ${ORDER[*]})" >&2; exit 2; }
  if [ -s "$OUT/$name.json" ]; then echo "== $name: kept $OUT/$name.json"; continue; fi
  echo "== $name: ${LIBTPU[$name]:+LIBTPU_INIT_ARGS=\"${LIBTPU[$name]}\" }python -m train.aot ${RUNS[$name]}"
  # shellcheck disable=SC2086
  LIBTPU_INIT_ARGS="${LIBTPU[$name]:-${LIBTPU_INIT_ARGS:-}}" \
    "$PY" -m train.aot ${RUNS[$name]} --json "$OUT/$name.json.part" > "$LOGS/$name.log" 2>&1
  mv "$OUT/$name.json.part" "$OUT/$name.json"
done
"$PY" -m train.aot_tables "$OUT" --markdown docs/tpu_aot.md
