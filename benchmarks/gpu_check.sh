#!/bin/bash
# The prepared GPU check (issue 22): one command, under 8 minutes on one H100/H200-class GPU. It writes
# $OUT/gpu_check.json and $OUT/gpu_check.md (default OUT: benchmarks/results/gpu_check) and the logs of each step:
#
#   1. env      the machine: `lebm-zoo env`, nvidia-smi, torch and CUDA versions
#   2. pytest   `pytest -m cuda`: every family trains, samples and round-trips on the GPU; samplers; FID placement
#   3. bench    benchmarks/run.py --device cuda: the reference-structure loop vs ours in fp32, bf16-mixed,
#               channels_last and with compiled chains (SVHN recipe, batch 100): s/iter and peak memory
#   4. ddp      cifar10_prior for a few steps with DDP on all visible GPUs
#   5. cifar10  cifar10_prior on the real CIFAR-10 for a fixed TRAIN_TIME (3 minutes), then FID of NUM_SAMPLES
#               (5,000) samples against NUM_REAL (50,000) training images, and the implied time of the recipe's
#               full schedule (201 epochs of 500 iterations) at the measured s/iter
#
#   bash benchmarks/gpu_check.sh               # on the GPU machine; DATA=folder holding cifar10/ (../shared/data)
#   bash benchmarks/gpu_check.sh --dry-run     # the same steps on the CPU at tiny sizes, in about a minute
#
# Environment: OUT, DATA, PYTHON (default python3), PRECISION (of step 5; default bf16-mixed on CUDA),
# TRAIN_TIME (DD:HH:MM:SS), NUM_SAMPLES, NUM_REAL, ROUNDS (of step 3). A failing step is recorded (its rc and log)
# and the check goes on; the exit status is 1 if any step failed.
set -uo pipefail
DRY=0
for arg in "$@"; do
  case $arg in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n 2,21p "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $arg (see --help)" >&2; exit 2 ;;
  esac
done
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 2
OUT=${OUT:-$ROOT/benchmarks/results/gpu_check}
DATA=${DATA:-$ROOT/../shared/data}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
: > "$OUT/steps.jsonl"
export PYTHONUNBUFFERED=1

if [ $DRY = 1 ]; then
  DEV=cpu; NGPU=2; PRECISION=${PRECISION:-32-true}; TRAIN_TIME=${TRAIN_TIME:-00:00:00:10}
  NUM_SAMPLES=${NUM_SAMPLES:-16}; NUM_REAL=${NUM_REAL:-16}; ROUNDS=${ROUNDS:-1}
  BENCH=(--iters 2 --warmup 1 --batch 8 --rows fp32)
  # random images: the reference's early stop (generator loss > 300 after epoch 10) would end the 3-batch epochs
  TINY=(--model.nz 8 --model.ngf 8 --model.ndf 16 --model.prior_steps 2 --model.posterior_steps 2
        --model.loss_g_limit null --data.batch_size 8 --trainer.limit_val_batches 1)
  WORKERS=0
  TEST_LIMIT=(--trainer.limit_test_batches 1)
else
  if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check.sh: no CUDA device visible to torch (use --dry-run on a CPU)" >&2; exit 2
  fi
  DEV=cuda; NGPU=$("$PY" -c 'import torch; print(torch.cuda.device_count())')
  PRECISION=${PRECISION:-bf16-mixed}; TRAIN_TIME=${TRAIN_TIME:-00:00:03:00}
  NUM_SAMPLES=${NUM_SAMPLES:-5000}; NUM_REAL=${NUM_REAL:-50000}; ROUNDS=${ROUNDS:-2}
  BENCH=(--iters 5 --warmup 2); TINY=(); TEST_LIMIT=(); WORKERS=4
fi
LEBM=("$PY" -m lebm_zoo.cli)
CKPT_CB='[{"class_path": "pytorch_lightning.callbacks.ModelCheckpoint", "init_args": {"save_last": true}}]'
FAILED=0

step() {  # step NAME TIMEOUT_S CMD...: runs CMD with a time limit, logs to $OUT/NAME.log, records rc and seconds
  local name=$1 limit=$2; shift 2
  local t0 rc; t0=$(date +%s%N)
  echo "== $name ($(date +%T)): $*" >&2
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1; rc=$?
  local ms=$(( ($(date +%s%N) - t0) / 1000000 ))
  echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $ms.0e-3}" >> "$OUT/steps.jsonl"
  [ $rc = 0 ] || { FAILED=1; echo "   $name failed (rc $rc); the end of $OUT/$name.log:" >&2; tail -n 5 "$OUT/$name.log" >&2; }
  return 0
}

step env 120 bash -c "'$PY' -m lebm_zoo.cli env --probe-seconds $([ $DRY = 1 ] && echo 0 || echo 5); \
  command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true"

step pytest 200 "$PY" -m pytest -q -p no:cacheprovider -m cuda tests/test_devices.py --junitxml "$OUT/pytest.xml"

step bench 300 "$PY" benchmarks/run.py --device "$DEV" --rounds "$ROUNDS" "${BENCH[@]}" --out "$OUT/bench.json"

step ddp 150 "${LEBM[@]}" fit --recipe cifar10_prior --data.data_dir "$DATA/cifar10" --data.num_workers "$WORKERS" \
  --trainer.accelerator "$DEV" --trainer.devices "$NGPU" --trainer.strategy ddp --trainer.max_steps 10 \
  --trainer.limit_val_batches 0 --trainer.enable_progress_bar false --trainer.callbacks "$CKPT_CB" \
  --trainer.default_root_dir "$OUT/ddp_run" "${TINY[@]}"

step cifar10_fit 400 "${LEBM[@]}" fit --recipe cifar10_prior --data.data_dir "$DATA/cifar10" --data.num_workers "$WORKERS" \
  --trainer.accelerator "$DEV" --trainer.precision "$PRECISION" --trainer.max_time "$TRAIN_TIME" \
  --trainer.enable_progress_bar false --trainer.callbacks "$CKPT_CB" --trainer.default_root_dir "$OUT/cifar10_run" \
  "${TINY[@]}"
CKPT=$(ls "$OUT"/cifar10_run/lightning_logs/version_*/checkpoints/last.ckpt 2>/dev/null | tail -n 1)

step cifar10_fid 300 "${LEBM[@]}" test --recipe cifar10_prior --data.data_dir "$DATA/cifar10" --data.num_workers "$WORKERS" \
  --trainer.accelerator "$DEV" --trainer.precision "$PRECISION" --trainer.enable_progress_bar false \
  --trainer.callbacks.init_args.num_samples "$NUM_SAMPLES" --trainer.callbacks.init_args.num_real "$NUM_REAL" \
  --trainer.default_root_dir "$OUT/cifar10_test" --ckpt_path "${CKPT:-missing-last.ckpt}" "${TINY[@]}" \
  "${TEST_LIMIT[@]}"

"$PY" benchmarks/gpu_check_report.py --out "$OUT" --dry-run "$DRY" --ckpt "${CKPT:-}" --precision "$PRECISION" \
  --num-samples "$NUM_SAMPLES" --num-real "$NUM_REAL" --train-time "$TRAIN_TIME" || FAILED=1
echo "written $OUT/gpu_check.json and $OUT/gpu_check.md" >&2
exit $FAILED
