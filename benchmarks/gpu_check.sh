#!/bin/bash
# The prepared GPU check (issue 29): one command, at most 6 minutes on one H200 (its steps' limits add up to 360 s),
# built around the GPU machine kit
# (../shared/device: no network, no FID weights, no RDKit, 64 MiB carried). It writes $OUT/gpu_check.json,
# $OUT/gpu_check.md (default OUT: benchmarks/results/gpu_check) and $OUT/gpu_check_logs.tar.gz (each step's log, the
# JUnit XML, the rows as JSON lines: three files, as the GPU machine sends back at most 8). The steps:
#
#   1. env      the machine: `lebm-zoo env`, nvidia-smi, torch and CUDA versions
#   2. pytest   `pytest -m cuda tests` (every CUDA case, no -x): every family trains, samples, round-trips a
#               checkpoint, resumes and runs its recipe's test metrics in fp32 and bf16-mixed; samplers; FID
#               placement; then (step "compile") every compile_chains mode
#   3. recipes  every GPU-scale recipe (svhn_prior, cifar10_*, celeba64_*) for WARMUP + ITERS iterations on random
#               data of its shape, fp32 and bf16-mixed: s/iter, peak memory, the full schedule's implied time
#               (benchmarks/recipe_speed.py)
#   4. captured the same for svhn_prior, cifar10_prior, cifar10_hierarchical and cifar10_shortrun with each training
#               step's chains, losses and backward as one CUDA graph (--model.capture_step true, 5 warm-up
#               iterations) and SyncEvery(50)
#   5. cifar10  cifar10_prior on real CIFAR-10 images (the kit's 10,000-image subset): loader images/s with 8
#               workers, then training s/iter on them
#
# On the GPU machine, from the project's root (the kit copied to .device/, see ../shared/device/README.md):
#   source .device/setup.sh && DATA=/tmp/data OUT=$OUT bash benchmarks/gpu_check.sh
# On a CPU, the same steps at tiny sizes (a minute or two; part of the test suite):
#   DATA=../shared/data bash benchmarks/gpu_check.sh --dry-run
#
# DATA: a folder holding cifar10/ (a CIFAR-10 tree, a .zip, or a folder holding one .zip), else itself holding the
# CIFAR-10 .zip (the kit's /tmp/data). Environment: OUT, DATA, PYTHON (default python3), ITERS, WARMUP. A failing
# step is recorded (its rc and log) and the check goes on; the exit status is 1 if any step failed.
set -uo pipefail
DRY=0
for arg in "$@"; do
  case $arg in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n 2,28p "$0"; exit 0 ;;
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
rm -f "$OUT/recipes.jsonl" "$OUT/captured.jsonl" "$OUT/cifar10.jsonl"
export PYTHONUNBUFFERED=1
CIFAR=$DATA/cifar10
[ -e "$CIFAR" ] || CIFAR=$DATA

if [ $DRY = 1 ]; then
  DEV=cpu; ITERS=${ITERS:-1}; WARMUP=${WARMUP:-0}
  # a few recipes of different kinds (the semi-supervised wrapper, 64 px) at batch 2, fp32, 2-step chains: the code
  # paths, not speed
  RECIPES=(--recipes svhn_prior cifar10_coopnets cifar10_semisup celeba64_prior --precisions 32-true --batch 2
           --chain-steps 2)
  CAPTURED=(--precisions 32-true --batch 2 --warmup 0 --chain-steps 2)  # the option is accepted by each recipe's model
  REAL=(--precisions 32-true --batch 2 --workers 0 --max-images 64 --chain-steps 2)
  REAL_LIMIT=90  # x4: a first run extracts the zip
  # the limits below are for the GPU; on a CPU (a busy one, a slow one) the same steps take longer: x4
  SCALE=4
else
  if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check.sh: no CUDA device visible to torch (use --dry-run on a CPU)" >&2; exit 2
  fi
  DEV=cuda; ITERS=${ITERS:-6}; WARMUP=${WARMUP:-2}
  RECIPES=(); CAPTURED=(--warmup 5); REAL=(--precisions bf16-mixed --workers 8); REAL_LIMIT=40; SCALE=1
fi
FAILED=0

# the seconds a step leaves of its limit go to the next step's limit: the limits still add up to the same total, and a
# slow step (a cold compile) can use what a fast one (the CUDA tests) left
SLACK=0
step() {  # step NAME TIMEOUT_S CMD...: runs CMD with a time limit, logs to $OUT/NAME.log, records rc and seconds
  local name=$1 limit=$(( $2 * SCALE + SLACK )); shift 2
  local t0 rc; t0=$(date +%s%N)
  echo "== $name ($(date +%T)): $*" >&2
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1; rc=$?
  local ms=$(( ($(date +%s%N) - t0) / 1000000 ))
  SLACK=$(( limit - (ms + 999) / 1000 )); [ $SLACK -gt 0 ] || SLACK=0
  echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $ms.0e-3, \"limit\": $limit}" >> "$OUT/steps.jsonl"
  [ $rc = 0 ] || { FAILED=1; echo "   $name failed (rc $rc); the end of $OUT/$name.log:" >&2; tail -n 5 "$OUT/$name.log" >&2; }
  return 0
}

step env 20 bash -c "'$PY' -m lebm_zoo.cli env --probe-seconds 0; \
  command -v nvidia-smi > /dev/null \
  && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true"

# every CUDA case, in two steps so that compiling (slow, and slowest in max-autotune) cannot crowd out the rest;
# a test that hangs fails after 60 s instead of taking the step's whole limit
step pytest 135 "$PY" -m pytest -q -p no:cacheprovider -m cuda tests \
  -k "not every_compile_mode and not whole_chain_cuda_graph" --timeout 60 \
  --junitxml "$OUT/pytest.xml"
# -v: each mode's result is in the log as it finishes, even if the step's limit stops pytest before its XML is written
step compile 40 "$PY" -m pytest -v -p no:cacheprovider -m cuda tests/test_compiled_chain.py \
  -k "every_compile_mode or whole_chain_cuda_graph" \
  --timeout 60 --junitxml "$OUT/pytest_compile.xml"

step recipes 80 "$PY" benchmarks/recipe_speed.py --device "$DEV" --iters "$ITERS" --warmup "$WARMUP" \
  --out "$OUT/recipes.jsonl" "${RECIPES[@]}"

# on the GPU the warm-up covers CapturedStep's 3 eager steps and the capture
step captured 45 "$PY" benchmarks/recipe_speed.py --device "$DEV" --iters "$ITERS" \
  --recipes svhn_prior cifar10_prior cifar10_hierarchical cifar10_shortrun --set capture_step=true --sync-every 50 \
  --out "$OUT/captured.jsonl" "${CAPTURED[@]}"

step cifar10 "$REAL_LIMIT" "$PY" benchmarks/recipe_speed.py --device "$DEV" --iters "$ITERS" --warmup "$WARMUP" \
  --real-data "$CIFAR" --out "$OUT/cifar10.jsonl" "${REAL[@]}"

"$PY" benchmarks/gpu_check_report.py --out "$OUT" --dry-run "$DRY" || FAILED=1
# the GPU machine sends back at most 8 files: the step logs, JUnit XML and JSON lines go in one archive
(cd "$OUT" && tar -czf gpu_check_logs.tar.gz --remove-files $(ls -- *.log *.jsonl *.xml 2>/dev/null))
echo "written $OUT/gpu_check.json, $OUT/gpu_check.md and the steps' logs in $OUT/gpu_check_logs.tar.gz" >&2
exit $FAILED
