"""``benchmarks/gpu_check.sh --dry-run``: the prepared GPU check runs end to end on the CPU at tiny sizes (issue 29).

Every step of the GPU script runs (env, ``pytest -m cuda``, GPU-scale recipes on random data, cifar10_prior on real
images from a folder holding a CIFAR-10 zip, as ``../shared/data/cifar10`` and a user's download lie) and the report
has the numbers of each: the same code paths the GPU machine runs, so that the one GPU run is not its first.
"""
import json
import math
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def write_cifar_zip(folder: Path, per_class=(12, 6)) -> Path:
    """A folder holding one zip of CIFAR-10's image-folder layout (cifar10/train/<class>/*.jpg, .../test/...): two
    classes of random 32x32 JPEGs."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    path = folder / "cifar10-jpeg.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for split, n in zip(("train", "test"), per_class):
            for c in ("cat", "dog"):
                for i in range(n):
                    tmp = folder / "tmp.jpg"
                    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp)
                    zf.write(tmp, f"cifar10/{split}/{c}/{i}.jpg")
                    tmp.unlink()
    return path


@pytest.mark.slow
def test_gpu_check_dry_run_runs_every_step_and_reports(tmp_path, monkeypatch):
    write_cifar_zip(tmp_path / "data" / "cifar10")
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "DATA": str(tmp_path / "data"), "PYTHON": sys.executable,
           "OMP_NUM_THREADS": "1", "LEBM_ZOO_CACHE": str(tmp_path / "cache")}
    p = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
    assert sorted(f.name for f in out.iterdir()) == ["gpu_check.json", "gpu_check.md", "gpu_check_logs.tar.gz"]
    with tarfile.open(out / "gpu_check_logs.tar.gz") as tar:
        names = tar.getnames()
        logs = {n: tar.extractfile(n).read().decode(errors="replace")[-1500:] for n in names if n.endswith(".log")}
    assert p.returncode == 0, (p.stderr[-3000:], logs)
    assert {"env.log", "pytest.log", "pytest.xml", "pytest_compile.xml", "recipes.jsonl", "captured.jsonl",
            "cifar10.jsonl", "steps.jsonl"} <= set(names)
    res = json.loads((out / "gpu_check.json").read_text())
    steps = res["steps"]
    assert [s["step"] for s in steps] == ["env", "pytest", "compile", "recipes", "captured", "cifar10"]
    assert all(s["rc"] == 0 and s["seconds"] > 0 for s in steps), steps
    # a step's limit is its own (x4 on a CPU) plus what the steps before it left unused
    assert steps[0]["limit"] == 4 * 20 and steps[1]["limit"] == 4 * 135 + 4 * 20 - math.ceil(steps[0]["seconds"])

    assert res["dry_run"] is True
    assert res["pytest_cuda"]["tests"] > 0 and res["pytest_cuda"]["failures"] == 0  # CUDA cases: skipped here
    rows = res["recipes"]
    assert {r["recipe"] for r in rows} == {"svhn_prior", "cifar10_coopnets", "cifar10_semisup", "celeba64_prior"}
    assert all(r["rc"] == 0 and r["s_per_iter"] > 0 and r["device"] == "cpu" for r in rows), rows
    # the schedule's length from the recipe: 201 epochs of SVHN's 73,257 training images in batches of 100
    svhn = next(r for r in rows if r["recipe"] == "svhn_prior")
    assert svhn["schedule_iterations"] == 201 * 733 and svhn["implied_schedule_hours"] is None  # batch overridden
    # the captured-step variant (on a CPU: the eager step, with capture_step's warning): each recipe takes the option
    captured = res["captured"]
    assert [r["recipe"] for r in captured] == ["svhn_prior", "cifar10_prior", "cifar10_hierarchical",
                                               "cifar10_shortrun"], captured
    assert all(r["rc"] == 0 and r["variant"] == "capture_step=true, SyncEvery(50)" and r["iterations"] == 1
               and r["s_per_iter"] > 0 and r["timing"] == "span" for r in captured), captured
    assert res["compile_modes"] == dict.fromkeys(["default", "reduce-overhead", "max-autotune-no-cudagraphs",
                                                  "max-autotune", "whole chain"], "SKIPPED")  # CUDA only
    assert all(r["variant"] == "eager" for r in rows)
    assert all(r["chain_steps"] == 2 for r in rows + captured)  # the dry run's short chains
    (real,) = res["cifar10_real"]
    assert real["rc"] == 0 and real["loader"]["images"] == 24 and real["s_per_iter"] > 0
    md = (out / "gpu_check.md").read_text()
    assert "dry run on the CPU" in md and "| cifar10 | 0 |" in md
    assert "`compile_chains` modes (the compile step's log): default SKIPPED, reduce-overhead SKIPPED" in md
    assert "| celeba64_prior | LatentEBMPrior | eager |" in md
    assert "| svhn_prior | LatentEBMPrior | capture_step=true, SyncEvery(50) | 32-true | 2 |" in md


def test_gpu_check_refuses_unknown_arguments_and_a_cpu_without_dry_run(tmp_path):
    script = str(ROOT / "benchmarks" / "gpu_check.sh")
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    p = subprocess.run(["bash", script, "--fast"], env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "unknown argument --fast" in p.stderr
    p = subprocess.run(["bash", script], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "no CUDA device" in p.stderr and "--dry-run" in p.stderr


def test_gpu_check_step_limits_fit_six_minutes_on_the_gpu_and_scale_on_a_cpu():
    """The GPU run's step limits add up to at most 6 minutes (the issue's bound; what a GPU window holds with a rerun);
    the dry run multiplies them (a busy CPU is slower than the GPU they are sized for)."""
    import re

    text = (ROOT / "benchmarks" / "gpu_check.sh").read_text()
    limits = {name: int(n) for name, n in re.findall(r"^step (\w+) (\d+) ", text, re.M)}
    assert set(limits) == {"env", "pytest", "compile", "recipes", "captured"}, limits
    gpu_real = re.search(r"REAL_LIMIT=(\d+); SCALE=1$", text, re.M)
    assert gpu_real and 'step cifar10 "$REAL_LIMIT"' in text
    total = sum(limits.values()) + int(gpu_real.group(1))
    assert total <= 360 and f"limits add up to {total} s" in text
    assert re.search(r"^  SCALE=4$", text, re.M) and "limit=$(( $2 * SCALE + SLACK ))" in text


def test_recipe_speed_caps_each_chain_of_the_model_for_smoke_runs():
    """``recipe_speed.py --chain-steps N``: each chain-length hyperparameter longer than N becomes N (the dry run's
    2-step chains); shorter ones and the other hyperparameters stay as the recipe has them."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import recipe_speed

    model, _, _ = recipe_speed.build("cifar10_coopnets")
    caps = recipe_speed.chain_caps(model, 2)
    assert caps and set(caps) <= set(recipe_speed.CHAIN_LENGTHS) and set(caps.values()) == {"2"}
    assert all(model.hparams[k] > 2 for k in caps)
    short, _, _ = recipe_speed.build("cifar10_coopnets", caps)
    assert recipe_speed.chain_caps(short, 2) == {} and all(short.hparams[k] == 2 for k in caps)
    assert {k: v for k, v in short.hparams.items() if k not in caps} == {
        k: v for k, v in model.hparams.items() if k not in caps}
    assert recipe_speed.chain_caps(model, 10 ** 6) == {}


def test_the_report_reads_each_compile_mode_from_a_log_cut_short():
    """The compile step runs ``pytest -v``: the modes that finished before its limit stopped pytest (no XML then)
    are read from the log."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_check_report

    case = "tests/test_compiled_chain.py::test_every_compile_mode_trains_and_samples_on_cuda"
    log = (f"{case}[default] PASSED [ 25%]\n{case}[reduce-overhead] FAILED [ 50%]\n"
           f"{case}[max-autotune-no-cudagraphs] ")  # stopped while it ran
    assert gpu_check_report.compile_modes(log) == {"default": "PASSED", "reduce-overhead": "FAILED"}
    assert gpu_check_report.compile_modes("") == {}
    # the whole-chain CUDA graph's comparison runs in the same step (its cold compile kept out of the other cases')
    whole = "tests/test_compiled_chain.py::test_whole_chain_cuda_graph_matches_eager PASSED [ 20%]\n"
    assert gpu_check_report.compile_modes(whole + log) == {"default": "PASSED", "reduce-overhead": "FAILED",
                                                           "whole chain": "PASSED"}


def test_recipe_speed_times_one_span_after_the_warm_up_or_each_iteration(monkeypatch):
    """``IterationTimer``: per batch, each iteration's own time; as one span (the rows with ``--sync-every``), the
    mean over batches W..N-1 from one start to one end, with nothing timed during the warm-up."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import recipe_speed

    clock = iter([0.0, 1.0, 10.0, 12.0, 20.0, 23.0])  # each batch's start and end, three batches
    monkeypatch.setattr(recipe_speed.time, "perf_counter", lambda: next(clock))
    module = torch.nn.Linear(1, 1)
    module.device = torch.device("cpu")

    def run(timer, batches=3):
        for i in range(batches):
            timer.on_train_batch_start(None, module, None, i)
            timer.on_train_batch_end(None, module, None, None, i)
        return timer

    each = run(recipe_speed.IterationTimer())
    assert each.seconds == [1.0, 2.0, 3.0] and each.span is None and each.batches == 3
    clock = iter([10.0, 23.0])  # read only at batch 1's start and batch 2's end
    span = run(recipe_speed.IterationTimer(span_from=1, last=3))
    assert span.span == pytest.approx(6.5) and span.seconds == [] and span.batches == 3
    with pytest.raises(ValueError, match="last"):
        recipe_speed.IterationTimer(span_from=2, last=2)


def test_bench_run_writes_each_row_as_it_is_measured(tmp_path, monkeypatch):
    """``benchmarks/run.py`` (issue 33's GPU commands) rewrites its JSON after every training row: a command stopped
    by its time limit keeps the rows it measured."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import run

    calls = []

    def training_row(*args):
        calls.append(args)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the time limit, in the second row
        return {"s_per_iter": 0.5, "peak_mib": 100.0}

    monkeypatch.setattr(run, "training_row", training_row)
    out = tmp_path / "speed.json"
    monkeypatch.setattr(sys, "argv", ["run.py", "--device", "cpu", "--rows", "fp32,bf16_tuned", "--rounds", "1",
                                      "--out", str(out)])
    with pytest.raises(KeyboardInterrupt):
        run.main()
    res = json.loads(out.read_text())
    assert res["done"] == "round 1 of 1, row fp32" and res["device"] == "cpu"
    assert res["training_iteration"] == {"fp32": {"s_per_iter": 0.5, "peak_mib": 100.0, "rounds_s_per_iter": [0.5]}}


def test_bench_run_takes_the_gpu_rows_on_a_cpu(tmp_path, monkeypatch):
    """On a CPU ``benchmarks/run.py --rows`` may also name the rows of issue 33's GPU commands (``plain``, the captured
    and SyncEvery rows), so those commands can be tried at tiny sizes before a GPU window; a row that exists on
    neither device is a usage error."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import run

    calls = []
    monkeypatch.setattr(run, "training_row", lambda *args: calls.append(args) or {"s_per_iter": 0.5, "peak_mib": 1.0})
    monkeypatch.setattr(run, "prior_chains", lambda *a, **k: {"ours": 0.1, "plain_loop": 0.1, "torchebm": None})
    monkeypatch.setattr(run, "throughputs", lambda *a, **k: {"sample_images_per_s": 1.0, "fid_images_per_s": None})
    out = tmp_path / "speed.json"
    argv = ["run.py", "--device", "cpu", "--rounds", "1", "--batch", "4", "--out", str(out), "--rows"]
    monkeypatch.setattr(sys, "argv", argv + ["plain,fp32,bf16_step_captured,fp32_sync50,reference"])
    run.main()
    # (what, batch, iters, warmup, threads, device, tuned, precision, channels_last, compile[, sync_every])
    got = {(c[0], c[7], c[9], *c[10:]) for c in calls}
    assert got == {("plain", "32-true", None), ("ours", "32-true", None), ("ours", "bf16-mixed", "capture", 50),
                   ("ours", "32-true", None, 50), ("reference", "32-true", None)}
    assert all(c[5] == "cpu" for c in calls)
    res = json.loads(out.read_text())
    assert set(res["training_iteration"]) == {"plain", "fp32", "bf16_step_captured", "fp32_sync50", "reference"}
    assert res["done"] == "all" and res["svhn_epoch_min_fastest"] == pytest.approx(0.5 * 18315 / 60)
    monkeypatch.setattr(sys, "argv", argv + ["plain"])  # only a reference loop: no implied epoch, no error
    run.main()
    assert "svhn_epoch_min_fastest" not in json.loads(out.read_text())
    monkeypatch.setattr(sys, "argv", argv + ["plain,warp_drive"])
    with pytest.raises(SystemExit) as e:
        run.main()
    assert e.value.code == 2


DEVICE_KIT = ROOT.parent / "shared" / "device"


@pytest.mark.parametrize("name", ["gpu_check.sh", "device_env_check.sh"])
def test_help_is_the_whole_header(name):
    """``--help`` prints the script's header comment, all of it and nothing else (its line range is written by hand)."""
    script = ROOT / "benchmarks" / name
    p = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True, timeout=60)
    header = []
    for line in script.read_text().splitlines()[1:]:
        if not line.startswith("#"):
            break
        header.append(line)
    assert p.returncode == 0 and p.stdout.splitlines() == header


def test_device_env_check_refuses_bad_arguments_and_a_missing_kit(tmp_path):
    """``benchmarks/device_env_check.sh`` (the GPU machine's software rebuilt on a CPU): a bad argument or a missing
    kit is a one-line error with exit code 2, before any environment is built."""
    script = str(ROOT / "benchmarks" / "device_env_check.sh")
    env = {**os.environ, "VENV": str(tmp_path / "venv"), "OUT": str(tmp_path / "out")}
    p = subprocess.run(["bash", script, "--fast"], env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "unknown argument --fast" in p.stderr
    p = subprocess.run(["bash", script], env={**env, "KIT": str(tmp_path / "no-kit")}, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 2 and "no GPU machine kit at" in p.stderr
    assert not (tmp_path / "venv").exists()
    # what it writes must lie outside the checkout it copies (given relative to where it is called from)
    p = subprocess.run(["bash", script], env={**env, "OUT": "benchmarks/check-out"}, cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 2 and "is inside the checkout" in p.stderr
    assert not (ROOT / "benchmarks" / "check-out").exists() and not (tmp_path / "venv").exists()


@pytest.mark.skipif(not (DEVICE_KIT / "README.md").is_file(), reason=f"the GPU machine kit is not at {DEVICE_KIT}")
def test_device_env_check_pins_the_torch_of_the_gpu_machine():
    """The torch version the check rebuilds is the one the kit's README gives for the GPU machine (so the check goes
    on matching the machine when the kit changes)."""
    import re

    readme = (DEVICE_KIT / "README.md").read_text()
    machine = re.search(r"torch (\d+\.\d+)", readme).group(1)
    pinned = re.search(r"TORCH=\$\{TORCH:-(\d+\.\d+)\.\d+\}", (ROOT / "benchmarks" / "device_env_check.sh").read_text())
    assert pinned and pinned.group(1) == machine


def test_device_env_check_never_replaces_an_environment_it_did_not_build(tmp_path):
    """A ``VENV`` that exists without the script's marker (the project's own ``.venv``, say) is refused with exit
    code 2 and left as it was."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "keep.txt").write_text("mine")
    env = {**os.environ, "VENV": str(venv), "OUT": str(tmp_path / "out")}
    p = subprocess.run(["bash", str(ROOT / "benchmarks" / "device_env_check.sh")], env=env, capture_output=True,
                       text=True, timeout=60)
    if "no GPU machine kit" in p.stderr:
        pytest.skip(f"the GPU machine kit is not at {DEVICE_KIT}")
    assert p.returncode == 2 and "was not built by this script" in p.stderr
    assert (venv / "keep.txt").read_text() == "mine"


def test_the_gpu_scale_recipes_are_measured_in_order_of_need():
    """A time-limited run keeps what it measured first: the recipes issue 33 gives eager GPU speeds for come first,
    diffusion recovery likelihood's (the slowest) last; every GPU-scale recipe once."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import recipe_speed

    from lebm_zoo.cli import list_recipes

    order = list(recipe_speed.GPU_RECIPES)
    assert order[:5] == list(recipe_speed.FIRST) and order[-2:] == ["cifar10_drl", "celeba64_drl"]
    assert sorted(order) == sorted(r for r in list_recipes() if r == "svhn_prior" or r.startswith(("cifar10_",
                                                                                                     "celeba64_")))


def test_the_report_of_a_gpu_run_with_a_failure_and_a_step_cut_short(tmp_path):
    """The report on files shaped as a GPU run writes them (nvidia-smi's line, CUDA rows with peak memory and implied
    hours, a failed CUDA case, a recipe that failed, the compile step stopped before its XML): the machine, the
    counts, each failure and each measured row are in the table; nothing here is marked a dry run."""
    out = tmp_path
    (out / "env.log").write_text("lebm-zoo 0.1.0, torch 2.11.0+cu130, pytorch_lightning 2.6.6, python 3.12.3\n"
                                 "CUDA devices: 1\n  cuda:0 NVIDIA H100 80GB HBM3\n"
                                 "name, memory.total [MiB], driver_version\n"
                                 "NVIDIA H100 80GB HBM3, 81559 MiB, 580.159.04\n")
    steps = [("env", 0, 6.1, 20), ("pytest", 1, 88.0, 149), ("compile", 124, 101.0, 101), ("recipes", 0, 79.5, 80),
             ("captured", 0, 30.2, 45), ("cifar10", 0, 20.0, 55)]
    (out / "steps.jsonl").write_text("".join(json.dumps(dict(step=n, rc=rc, seconds=s, limit=lim)) + "\n"
                                             for n, rc, s, lim in steps))
    (out / "pytest.xml").write_text(
        '<?xml version="1.0"?><testsuites><testsuite name="pytest" tests="3" failures="1" errors="0" skipped="1">'
        '<testcase classname="tests.test_devices" name="test_a[cuda]"/>'
        '<testcase classname="tests.test_devices" name="test_b[cuda]"><failure message="boom"/></testcase>'
        '<testcase classname="tests.test_devices" name="test_c[cuda]"><skipped/></testcase>'
        "</testsuite></testsuites>")
    case = "tests/test_compiled_chain.py::test_every_compile_mode_trains_and_samples_on_cuda"
    (out / "compile.log").write_text("tests/test_compiled_chain.py::test_whole_chain_cuda_graph_matches_eager PASSED\n"
                                     f"{case}[default] PASSED\n{case}[reduce-overhead] ")
    row = dict(recipe="svhn_prior", precision="32-true", batch_size=100, model="LatentEBMPrior", variant="eager",
               s_per_iter=0.0812, peak_memory_gib=1.23, schedule_iterations=147333, implied_schedule_hours=3.32, rc=0)
    bad = dict(recipe="celeba64_drl", precision="32-true", variant="eager", rc=1, error="OutOfMemoryError: CUDA")
    (out / "recipes.jsonl").write_text(json.dumps(row) + "\n" + json.dumps(bad) + "\n")
    captured = {**row, "variant": "capture_step=true, SyncEvery(50)", "s_per_iter": 0.0161, "timing": "span"}
    (out / "captured.jsonl").write_text(json.dumps(captured) + "\n")
    real = dict(recipe="cifar10_prior", precision="bf16-mixed", batch_size=100, s_per_iter=0.1, peak_memory_gib=2.0,
                loader={"images": 10000, "workers": 8, "images_per_s": 5123.4}, rc=0)
    (out / "cifar10.jsonl").write_text(json.dumps(real) + "\n")
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check_report.py"), "--out", str(out),
                        "--dry-run", "0"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    md = (out / "gpu_check.md").read_text()
    res = json.loads((out / "gpu_check.json").read_text())
    assert "dry run" not in md and res["dry_run"] is False
    assert "Machine: NVIDIA H100 80GB HBM3, 81559 MiB, 580.159.04" in md
    assert "`pytest -m cuda`: 1 passed, 1 failed, 1 skipped" in md
    assert "- failed: `tests.test_devices::test_b[cuda]`" in md
    assert "whole chain PASSED" in md and "default PASSED" in md and "reduce-overhead" not in res["compile_modes"]
    assert "| svhn_prior | LatentEBMPrior | eager | 32-true | 100 | 0.0812 | 1.23 | 147,333 | 3.3 |" in md
    assert "| svhn_prior | LatentEBMPrior | capture_step=true, SyncEvery(50) | 32-true | 100 | 0.0161 |" in md
    assert "| celeba64_drl | | eager | 32-true | | failed: OutOfMemoryError: CUDA" in md
    assert "read 10000 images at 5,123 images/s with 8 workers" in md
    assert f"| total | | {sum(s for _, _, s, _ in steps):.1f} | |" in md
