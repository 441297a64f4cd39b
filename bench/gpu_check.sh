#!/usr/bin/env bash
# One prepared check of wa_tf on a GPU machine, in under 8 minutes.
#
# Prints nvidia-smi, then runs: the tests that exercise the GPU kernels
# (layers, Winograd pipeline, quantization), the layer benchmark (32x32x32 and
# 16x16x64, with and without XLA), the quick training benchmark (with and
# without XLA), the exported-model latency benchmark and a MirroredStrategy
# training run of bin/train.py on the bundled digits data (no network needed).
# Each step has its own time limit and all of them share a global budget;
# every step's output goes to $OUT (or ./gpu_check_out), with summary.txt
# listing each step's exit status and the benchmark tables.
#
# Usage (from anywhere; the packages must already be installed, e.g. with
# `pip install -e .[test]` from a local wheel cache):
#   bench/gpu_check.sh            # on a GPU machine
#   bench/gpu_check.sh --cpu      # dry run without a GPU: every step, tiny
#   GPU_CHECK_ALLOW_CPU=1 bench/gpu_check.sh   # the same
# Environment: PYTHON (default python), OUT, GPU_CHECK_BUDGET_S (default 465; the
# export benchmark comes last and is the first to be cut short).
set -u

cd "$(dirname "$0")/.." || exit 1
PY="${PYTHON:-python}"
OUT_DIR="${OUT:-./gpu_check_out}"
CPU_MODE="${GPU_CHECK_ALLOW_CPU:-0}"
if [[ "${1:-}" == "--cpu" ]]; then CPU_MODE=1; fi
# A CPU (dry run) takes longer per step, however tiny: three times the limits.
LIMIT_SCALE=1
if [[ "$CPU_MODE" == "1" ]]; then LIMIT_SCALE=3; fi
BUDGET_S="${GPU_CHECK_BUDGET_S:-$(( 465 * LIMIT_SCALE ))}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
SUMMARY="$OUT_DIR/summary.txt"
: > "$SUMMARY"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-1}"
START=$(date +%s)

note() { echo "$*" | tee -a "$SUMMARY"; }

# run_step NAME LIMIT_S CMD...: runs CMD with its output in NAME.log, bounded by
# LIMIT_S and by what is left of the global budget.
run_step() {
  local name=$1 limit=$2; shift 2
  local left=$(( BUDGET_S - ($(date +%s) - START) ))
  if (( left < 10 )); then note "$name: SKIPPED (global budget of ${BUDGET_S}s spent)"; return; fi
  limit=$(( limit * LIMIT_SCALE ))
  (( limit > left )) && limit=$left
  echo "== $name (limit ${limit}s): $*"
  local t0=$(date +%s)
  timeout "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
  local rc=$?
  local status=ok
  (( rc == 124 )) && status="TIMED OUT"
  (( rc != 0 && rc != 124 )) && status="FAILED"
  note "$name: $status (rc=$rc, $(( $(date +%s) - t0 ))s, log: $name.log)"
  tail -n 25 "$OUT_DIR/$name.log"
}

note "wa_tf gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'), cpu mode: $CPU_MODE"

if ! "$PY" -c "import tensorflow" > "$OUT_DIR/import.log" 2>&1; then
  note "ERROR: '$PY -c \"import tensorflow\"' failed (see import.log): install the packages"
  note "first, e.g. 'pip install --no-index --find-links <wheel cache> -e .[test]'."
  tail -n 5 "$OUT_DIR/import.log"
  exit 2
fi

if command -v nvidia-smi > /dev/null; then
  nvidia-smi 2>&1 | tee "$OUT_DIR/nvidia-smi.txt"
else
  note "nvidia-smi: not found"
fi
GPUS=$("$PY" -c "import tensorflow as tf; print(len(tf.config.list_physical_devices('GPU')))" \
  2> "$OUT_DIR/gpus.log" | tail -n 1)
note "GPUs visible to TensorFlow: ${GPUS:-?}"
if [[ "${GPUS:-0}" == "0" && "$CPU_MODE" != "1" ]]; then
  note "ERROR: TensorFlow sees no GPU (see gpus.log); use --cpu for a dry run on the CPU."
  exit 3
fi

if [[ "$CPU_MODE" == "1" ]]; then
  # Every step, tiny: checks the commands, not the machine.
  TESTS=(-k "frozen_winograd_weights")
  LAYER=(--shapes=4x4x8 --tiles=4 --batch_size=2 --repeats=1)
  TRAIN=(--batch_size=2 --mult=0.125 --steps=1 --warmup=1 --configs=normal-FP32)
  TRAIN_XLA=(--batch_size=2 --mult=0.125 --steps=1 --warmup=1 --configs=flex-F4-INT8-XLA)
  EXPORT=(--mult=0.125 --reps=1 --warmup=1 --batch_sizes=1,2)
  MIRRORED=(--mult=0.125 --batch_size=16 --steps_per_epoch=2)
else
  TESTS=()
  LAYER=(--shapes=32x32x32,16x16x64 --repeats=20)
  TRAIN=(--steps=5 --warmup=2)
  TRAIN_XLA=(--steps=5 --warmup=2 --configs=normal-FP32-XLA,normal-INT8-XLA,flex-F4-FP32-XLA,flex-F4-INT8-XLA)
  EXPORT=(--reps=15)
  MIRRORED=(--mult=0.5 --batch_size=128 --steps_per_epoch=20)
fi

run_step tests 130 "$PY" -m pytest -x -q -p no:cacheprovider tests/test_layers.py \
  tests/test_winograd_conv.py tests/test_quantization.py "${TESTS[@]}"
# --jit_compile adds the XLA rows to the plain ones: with and without XLA in one table.
run_step layer_bench 70 "$PY" bench/layer_bench.py --jit_compile "${LAYER[@]}"
# Without and with XLA in two runs, so that a slow compilation cannot cost both tables.
run_step train_bench 100 "$PY" bench/train_bench.py --quick "${TRAIN[@]}"
run_step train_bench_xla 90 "$PY" bench/train_bench.py --quick --jit_compile "${TRAIN_XLA[@]}"
run_step strategy 20 "$PY" -c "
from wa_tf.training import distribute
s = distribute.get_distribution_strategy('mirrored')
print(type(s).__name__, 'replicas:', s.num_replicas_in_sync, 'devices:', s.extended.worker_devices)"
run_step mirrored 60 "$PY" bin/train.py --dataset=digits --flex --F=4 --Q --epochs=1 \
  --distribution_strategy=mirrored --noresume --outDir="$OUT_DIR/mirrored_run" "${MIRRORED[@]}"
run_step export_bench 60 "$PY" bench/export_bench.py "${EXPORT[@]}"

{
  echo
  echo "== tables"
  for name in layer_bench train_bench train_bench_xla export_bench; do
    [[ -f "$OUT_DIR/$name.log" ]] || continue
    echo "-- $name"
    # The benchmark's own lines, without TensorFlow's and absl's log lines.
    grep -vE '^([IWEF][0-9]{4} |WARNING|E0000|I0000|W0000|measuring |exporting|timing)' \
      "$OUT_DIR/$name.log" | tail -n 40
  done
  echo "-- mirrored"
  grep -h 'replicas:' "$OUT_DIR/strategy.log" 2>/dev/null
  grep -iE 'epoch|accuracy|loss' "$OUT_DIR/mirrored.log" 2>/dev/null | tail -n 5
} >> "$SUMMARY"
note "total $(( $(date +%s) - START ))s; outputs in $OUT_DIR"
grep -qE ': (FAILED|TIMED OUT|SKIPPED)' "$SUMMARY" && exit 1
exit 0
