#!/bin/bash
# The GPU machine's software, on a CPU: before a GPU window is spent, check that the code runs with what that machine
# has (../shared/device/README.md: torch 2.11, no network, no RDKit), not only with the newest torch
# that `make install` gives. The GPU runs go through the same steps (issues 29, 33, 35), so an API newer than the GPU
# machine's torch, or an import of a package it lacks, shows up here first.
#
# It builds a virtual environment once (default ../venv-device, about 1 minute and 5 GB with PyPI reachable): the
# packages the code uses at the versions a pip list on the GPU machine read (the device tool's KINDS.md, 2026-11: torch,
# torchvision, pytorch-lightning, torchmetrics, numpy, safetensors, huggingface_hub) and the others it holds that the
# project uses, scikit-learn among them (not the kit's wheels: the kit's set-up puts them in /tmp/site). Then it copies
# the checkout as a device call sends it (tracked and untracked-not-ignored files, lebm_zoo/weights moved aside, the kit
# as .device/) to $OUT/checkout and, there, with that environment's python3 first on PATH, runs the kit's own `source
# .device/setup.sh` (which, as on the GPU machine, installs the kit's wheels and the project into /tmp/site and unpacks
# the kit's data under /tmp/data). From there on, as on that machine, nothing can be downloaded (a dead proxy) and there
# are no FID weights (an empty HOME). Then, in that copy (removed at the end if every step passed):
#   0. size       the copy with the kit fits in the 64 MiB a device call may carry
#   1. setup      the project installed: `lebm-zoo` runs from /tmp/site/bin (the kit's set-up hides a failed install
#                 in its output; the GPU commands themselves run from the checkout with `python3 -m`)
#   2. collect    `pytest -m cuda tests --collect-only`: the CUDA cases the GPU check runs are collected, with the
#                 test files that need RDKit left out as on the GPU machine
#   3. twins      the test files that hold those CUDA cases, and the GPU campaign's, run whole on the CPU (about a
#                 minute): their CPU cases catch what would fail there for another reason than CUDA
#   4. gpu_check  `benchmarks/gpu_check.sh --dry-run` (issue 29's check, tiny sizes) on the kit's data
#   5. campaign   `benchmarks/gpu_campaign.py --dry-run` on both campaigns (issue 35) on the kit's data, with and
#                 without --capture-step
#   6. speed      issue 33's commands (benchmarks/run.py's GPU rows, the DRL recipe captured) at tiny sizes on the CPU
#   7. suite      with --full only: the whole test suite, in the checkout itself (it tests the registry's weights),
#                 still offline and without FID weights (about 7 minutes on 2 cores)
#
#   bash benchmarks/device_env_check.sh [--full]
# Environment: VENV (where the environment lives), KIT (default ../shared/device), DATA (default /tmp/data, where the
# kit's set-up unpacks its data), TORCH and TORCHVISION (the versions to pin: the GPU machine's), BASE_PYTHON (default
# python3.12 as there, else python3). Exit status: 0 when every step passed, 1 when one failed (each step's log is
# under $OUT, default a new temporary folder, outside the checkout), 2 for a bad argument or a missing kit.
set -uo pipefail
FULL=0
for arg in "$@"; do
  case $arg in
    --full) FULL=1 ;;
    -h|--help) sed -n 2,34p "$0"; exit 0 ;;
    *) echo "device_env_check.sh: unknown argument $arg (see --help)" >&2; exit 2 ;;
  esac
done
unset CDPATH
ROOT=$(cd "$(dirname "$0")/.." && pwd -P)
# the paths as given, from where the script was called (it works in a copy of the checkout)
KIT=$(realpath -m -- "${KIT:-$ROOT/../shared/device}")
DATA=$(realpath -m -- "${DATA:-/tmp/data}")
VENV=$(realpath -m -- "${VENV:-$ROOT/../venv-device}")
OUT=$(realpath -m -- "${OUT:-$(mktemp -d)}")
TORCH=${TORCH:-2.11.0}
TORCHVISION=${TORCHVISION:-0.26.0}
case "$OUT/" in "$ROOT"/*)  # the checkout is copied from: what the check writes must lie outside it
  echo "device_env_check.sh: OUT=$OUT is inside the checkout; choose a folder outside $ROOT" >&2; exit 2 ;;
esac
cd "$ROOT" || exit 2
[ -d "$KIT/wheels" ] || { echo "device_env_check.sh: no GPU machine kit at $KIT (set KIT)" >&2; exit 2; }
mkdir -p "$OUT" || exit 2
# the GPU machine's Python is 3.12: that one where it is installed, else python3 (the check says which it used)
BASE=${BASE_PYTHON:-python3}
[ -n "${BASE_PYTHON:-}" ] || ! python3.12 -c pass 2>/dev/null || BASE=python3.12
"$BASE" -c pass || { echo "device_env_check.sh: no Python at BASE_PYTHON=$BASE" >&2; exit 2; }
PY=$VENV/bin/python
MARK=$VENV/.lebm-zoo-device-env  # only an environment this script built is ever replaced
LAYOUT=3  # what the environment holds; 2: not the kit's wheels (the GPU machine has them only in /tmp/site);
# 3: the versions the GPU machine's pip list gave, and scikit-learn, which it has
WANT="$("$BASE" -c 'import sys; print(*sys.version_info[:2])') $TORCH $LAYOUT"
HAVE="$("$PY" -c 'import sys, torch; print(*sys.version_info[:2], torch.__version__.split("+")[0])' 2>/dev/null) \
$(cat "$MARK" 2>/dev/null)"
if [ ! -f "$MARK" ] || [ "$HAVE" != "$WANT" ]; then
  if [ -e "$VENV" ] && [ ! -f "$MARK" ]; then
    echo "device_env_check.sh: $VENV exists and was not built by this script; set VENV to a new folder" >&2; exit 2
  fi
  echo "building $VENV ($("$BASE" --version), torch $TORCH, torchvision $TORCHVISION)"
  rm -rf "$VENV"
  "$BASE" -m venv "$VENV" || exit 2
  # what the GPU machine holds besides the kit (its README; the versions from a pip list there, KINDS.md 2026-11;
  # unpinned where that list gave none)
  "$VENV/bin/pip" install -q -U "torch==$TORCH" "torchvision==$TORCHVISION" "pytorch-lightning==2.6.6" \
    "torchmetrics==1.9.0" "numpy==2.5.2" "safetensors==0.8.0" "huggingface_hub==1.33.0" scikit-learn \
    scipy matplotlib tensorboard lightning pytest pytest-timeout pytest-xdist pytest-cov pytest-benchmark \
    pytest-mock hypothesis || exit 2  # (its pytest plugins load in every pytest run there)
  echo "$LAYOUT" > "$MARK"
fi
# the kit's set-up builds the project with the environment's own setuptools (--no-build-isolation; pyproject.toml's
# build-system asks for 77 or newer; the GPU machine's version is not documented: this assumes it has such a one, and
# the GPU commands do not need the install, they run from the copy); the project is installed by that set-up only
{ "$VENV/bin/pip" install -q "setuptools>=77" wheel && \
  { ! "$VENV/bin/pip" show -q lebm-zoo 2>/dev/null || "$VENV/bin/pip" uninstall -q -y lebm-zoo; }; } \
  > "$OUT/install.log" 2>&1 || { echo "device_env_check.sh: preparing $VENV failed (see $OUT/install.log)" >&2; exit 1; }

# the checkout as the device call copies it, with the weights moved aside and the kit beside it
COPY=$OUT/checkout
rm -rf "$COPY" && mkdir -p "$COPY" || exit 2
{ git -C "$ROOT" ls-files -z --cached --others --exclude-standard | grep -zv '^lebm_zoo/weights/' \
    | tar -C "$ROOT" --null --ignore-failed-read -T - -cf - | tar -C "$COPY" -xf - \
  && cp -r "$KIT" "$COPY/.device" && chmod -R u+w "$COPY/.device"; } 2> "$OUT/copy.log" \
  || { echo "device_env_check.sh: copying the checkout to $COPY failed (see $OUT/copy.log)" >&2; exit 1; }
COPY_BYTES=$(du -sb "$COPY" | cut -f1)  # before the set-up builds in it
cd "$COPY" || exit 2
export PATH=$VENV/bin:$PATH
# as on the GPU machine: no network (a proxy nobody answers), no FID Inception weights (an empty home folder, no
# cache folders set), nothing on PYTHONPATH but what the kit's set-up puts there
export HOME=$OUT/home http_proxy=http://127.0.0.1:9 https_proxy=http://127.0.0.1:9 HTTP_PROXY=http://127.0.0.1:9 \
  HTTPS_PROXY=http://127.0.0.1:9 no_proxy= NO_PROXY= LEBM_ZOO_FID_WEIGHTS=
unset PYTHONPATH XDG_CACHE_HOME TORCH_HOME HF_HOME
mkdir -p "$HOME"
# an install left in /tmp/site by an earlier run must not stand in for this one
rm -rf /tmp/site/lebm_zoo /tmp/site/datamodules /tmp/site/lebm_zoo-*.dist-info /tmp/site/bin/lebm-zoo || exit 2
# shellcheck disable=SC1091
source .device/setup.sh > "$OUT/kit_setup.log" 2>&1
echo "environment: $("$PY" -c 'import sys, torch, pytorch_lightning as pl
print("python", sys.version.split()[0], "| torch", torch.__version__, "| pl", pl.__version__)')"
for pkg in rdkit; do
  "$PY" -c "import $pkg" 2>/dev/null && echo "note: $pkg is installed here; the GPU machine has none"
done

FAILED=0
step() {  # step NAME COMMAND...: run it, log it, report its rc and time
  local name=$1 t0=$SECONDS rc
  shift
  "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  printf '%-9s rc %d  %3d s  %s\n' "$name" "$rc" $((SECONDS - t0)) "$(tail -n 1 "$OUT/$name.log")"
  [ $rc = 0 ] || FAILED=1
}
installed() {  # the kit's set-up installed the project: its lebm-zoo command runs, from /tmp/site/bin
  cat "$OUT/kit_setup.log"
  [ "$(command -v lebm-zoo)" = /tmp/site/bin/lebm-zoo ] && lebm-zoo --help > /dev/null \
    && echo "the project installed by the kit's set-up: /tmp/site/bin/lebm-zoo"
}
size() {  # what a device call copies, the kit included, fits in the 64 MiB it may carry
  echo "the checkout as sent, with the kit: $((COPY_BYTES / 1048576)) MiB of 64"
  [ "$COPY_BYTES" -le $((64 * 1048576)) ]
}
step size size
step setup installed
step collect "$PY" -m pytest -q -p no:cacheprovider -m cuda tests --collect-only
# the test files that hold CUDA cases, whole, on the CPU: their CPU cases do on the CPU what the CUDA cases do there,
# so what would fail on the GPU machine for another reason than CUDA (a file the copy lacks, a download) fails here
mapfile -t CUDA_FILES < <(grep -oE '^tests/[A-Za-z0-9_]+\.py' "$OUT/collect.log" | sort -u)
if [ ${#CUDA_FILES[@]} -gt 0 ]; then  # (no file: pytest would run the whole suite)
  # and the GPU campaign's tests: they run its real schedule, worker processes included, at tiny sizes
  step twins "$PY" -m pytest -q -p no:cacheprovider "${CUDA_FILES[@]}" tests/test_gpu_campaign.py
else
  echo "twins     no test file with CUDA cases was collected"; FAILED=1
fi
step gpu_check env PYTHON="$PY" DATA="$DATA" OUT="$OUT/gpu_check" bash benchmarks/gpu_check.sh --dry-run
campaign() {  # as issue 35's command, with and without --capture-step
  "$PY" benchmarks/gpu_campaign.py benchmarks/campaigns/anomaly.yaml benchmarks/campaigns/mnist_zoo.yaml \
    --dry-run --data "$DATA" --out "$OUT/campaign" \
  && "$PY" benchmarks/gpu_campaign.py benchmarks/campaigns/anomaly.yaml benchmarks/campaigns/mnist_zoo.yaml \
    --dry-run --capture-step --data "$DATA" --out "$OUT/campaign_captured"
}
step campaign campaign
speed() {  # issue 33's commands at tiny sizes; its second command's compiled rows are left out (minutes of compiling
  # on a CPU; the compiled chains' CPU cases ran in "twins")
  "$PY" benchmarks/run.py --device cpu --rounds 1 --iters 1 --warmup 0 --batch 4 --out "$OUT/speed_cuda_a.json" \
    --rows plain,fp32,bf16,fp32_step_captured,bf16_step_captured,fp32_sync50,bf16_channels_last \
  && "$PY" benchmarks/recipe_speed.py --device cpu --recipes cifar10_drl --precisions bf16-mixed --warmup 0 --iters 1 \
    --batch 2 --chain-steps 2 --set capture_step=true --sync-every 50 --out "$OUT/drl.jsonl"
}
step speed speed
[ $FULL = 1 ] && { cd "$ROOT" && step suite "$PY" -m pytest -q -p no:cacheprovider tests; }
[ $FAILED = 1 ] || rm -rf "$COPY"  # (30 MB; kept where a step failed, to look into)
echo "logs: $OUT"
exit $FAILED
