#!/bin/bash
# The MNIST anomaly-detection runs behind the README table (benchmarks/anomaly_table.py reads their test results):
# both models x five held-out digits x SEEDS, each trained for BUDGET of wall-clock on one thread, two at a time,
# then tested on its last checkpoint in the same precision (no model selection looks at the test split).
#
#   DATA=../shared/data BUDGET=00:00:20:00 SEEDS="1 2 3" bash benchmarks/anomaly_runs.sh runs/anomaly
#   (the README's table: BUDGET=00:00:04:00 PRECISION=bf16-mixed MODELS=prior)
#   python benchmarks/anomaly_table.py --runs runs/anomaly --chart benchmarks/results/mnist_anomaly_auprc.png
#
# PRECISION=bf16-mixed is faster on CPUs with bf16 units (lebm-zoo env says which); MODELS="prior" runs one model,
# DIGITS="4" one held-out digit.
set -euo pipefail
OUT=${1:?usage: anomaly_runs.sh OUT_DIR}
DATA=${DATA:?set DATA to the folder holding mnist/}
BUDGET=${BUDGET:-00:00:20:00}
SEEDS=${SEEDS:-1 2 3}
MODELS=${MODELS:-prior hierarchical}
DIGITS=${DIGITS:-1 4 5 7 9}
PRECISION=${PRECISION:-32-true}
LEBM=${LEBM:-.venv/bin/lebm-zoo}
mkdir -p "$OUT"
one() {  # model digit seed
  local m=$1 d=$2 s=$3 name="$1_d$2_s$3"
  [ -e "$OUT/${name}_test" ] && return 0  # done before: rerunning the script resumes the table
  local args=(--recipe "mnist_anomaly_$m" --data.data_dir "$DATA/mnist" --data.num_workers 0 --data.heldout_digit "$d")
  OMP_NUM_THREADS=1 "$LEBM" fit "${args[@]}" --seed_everything "$s" --trainer.precision "$PRECISION" \
    --trainer.max_time "$BUDGET" --trainer.max_epochs 1000 --trainer.default_root_dir "$OUT/$name" > "$OUT/$name.log" 2>&1
  OMP_NUM_THREADS=1 "$LEBM" test "${args[@]}" --trainer.precision "$PRECISION" --trainer.default_root_dir "$OUT/${name}_test" \
    --ckpt_path "$OUT/$name/lightning_logs/version_0/checkpoints/last.ckpt" > "$OUT/${name}_test.log" 2>&1
}
export -f one
export OUT DATA BUDGET PRECISION LEBM
for s in $SEEDS; do for d in $DIGITS; do for m in $MODELS; do echo "$m $d $s"; done; done; done |
  xargs -P 2 -L 1 bash -c 'one $0 $1 $2'
