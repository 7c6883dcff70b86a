"""``benchmarks/gpu_check.sh --dry-run``: the prepared GPU check runs end to end on the CPU at tiny sizes (issue 22).

Every step of the GPU script runs (env, ``pytest -m cuda``, the benchmark rows, DDP on two CPU processes, the timed
cifar10_prior run on a CIFAR-10 image-folder tree this test writes, its FID test) and the report has the numbers of
each: the same code paths the GPU machine runs, so that the one GPU run is not its first.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def write_cifar_tree(root: Path, per_class=(12, 6)) -> None:
    """CIFAR-10's image-folder layout (train/<class>/*.jpg, test/<class>/*.jpg), two classes of random 32x32 JPEGs."""
    rng = np.random.default_rng(0)
    for split, n in zip(("train", "test"), per_class):
        for c in ("cat", "dog"):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(d / f"{i}.jpg")


@pytest.mark.slow
def test_gpu_check_dry_run_runs_every_step_and_reports(tmp_path, fid_weights_env):
    write_cifar_tree(tmp_path / "data" / "cifar10")
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "DATA": str(tmp_path / "data"), "PYTHON": sys.executable,
           "OMP_NUM_THREADS": "1"}
    p = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
    logs = {f.name: f.read_text(errors="replace")[-1500:] for f in out.glob("*.log")}
    assert p.returncode == 0, (p.stderr[-3000:], logs)
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == ["env", "pytest", "bench", "ddp", "cifar10_fit", "cifar10_fid"]
    assert all(s["rc"] == 0 and s["seconds"] > 0 for s in steps), steps

    res = json.loads((out / "gpu_check.json").read_text())
    assert res["dry_run"] is True
    assert res["pytest_cuda"]["tests"] > 0 and res["pytest_cuda"]["failures"] == 0  # CUDA cases: skipped here
    assert res["bench"]["device"] == "cpu" and res["bench"]["training_iteration"]["fp32"]["s_per_iter"] > 0
    run = res["cifar10_prior"]["run"]
    assert run["iterations"] >= 1 and run["s_per_iter"] > 0
    assert run["implied_full_schedule_hours"] == pytest.approx(run["s_per_iter"] * 201 * 500 / 3600)
    assert res["cifar10_prior"]["fid"] is not None and res["cifar10_prior"]["fid"] >= 0
    md = (out / "gpu_check.md").read_text()
    assert "dry run on the CPU" in md and "| cifar10_fid | 0 |" in md and "full schedule" in md


def test_gpu_check_refuses_unknown_arguments_and_a_cpu_without_dry_run(tmp_path):
    script = str(ROOT / "benchmarks" / "gpu_check.sh")
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    p = subprocess.run(["bash", script, "--fast"], env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "unknown argument --fast" in p.stderr
    p = subprocess.run(["bash", script], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "no CUDA device" in p.stderr and "--dry-run" in p.stderr
