#!/usr/bin/env python3
"""Train a campaign of runs on the visible GPU within one wall budget, and pack what comes back.

    python benchmarks/gpu_campaign.py benchmarks/campaigns/anomaly.yaml benchmarks/campaigns/mnist_zoo.yaml \\
        --data /tmp/data --out "$OUT" --budget 480
    python benchmarks/gpu_campaign.py CAMPAIGN.yaml ... --dry-run --data DIR --out DIR  # CPU, tiny sizes

A campaign file lists runs (recipe, overrides, seed; an entry with list values is a grid, expanded over their product
and substituted into its strings as ``{digit}``), each with the registry name it may be published as
(``publish``), the number of samples to keep for FID (``fid_samples``) and what a dry run adds (``dry_overrides``,
e.g. a smaller validation hold-out); ``{data}`` in an override is ``--data``. Every run is ``lebm-zoo fit`` with
the recipe minus the callbacks that cannot run there (FID: its Inception weights do not travel; sample grids) and
with validation off, capped by ``--trainer.max_time``; then ``lebm-zoo test --ckpt_path last`` for the metrics that
can be computed there (AUPRC/AUROC, reconstruction MSE, accuracy), the weights (safetensors, fp32, with the training
record: iterations, wall time, seed, device, command) and uint8 samples (``.npz``) for FID on a CPU later
(``benchmarks/campaign_report.py``).

Scheduling: the runs are ordered by campaign priority (the files' ``priority``, lower first; the anomaly campaign
first), then as listed, and run ``--parallel`` at a time as separate processes (default: one per CPU core this process
may use, less two, at most the number of runs). One latent-EBM iteration on MNIST is bound by kernel launches and
Python, not by the GPU (docs/speed.md), so several processes keep one GPU busy where one cannot; processes rather than
CUDA streams or batched ensembles because they need no change to the families and isolate a failing run. The budget is
split into waves: each run trains for ``(budget - start-up - waves * evaluation margin) / waves``. A worker still going
at its time limit or at the deadline gets SIGTERM, and :data:`GRACE` seconds later SIGKILL: stopped in training, it
writes its ``last.ckpt`` (``lebm-zoo fit`` exits 143) and ships those weights, its record saying so.

``--capture-step``: the runs whose model has the ``capture_step`` option train with it (each step's chains, losses
and backward one CUDA graph) and with ``SyncEvery(50)``; each record says whether it did (``capture_step``).

Output under ``--out``: at most 8 zip files (``campaign-partN.zip``) of at most 16 MB each, holding
``summary.json`` (every run's record), ``runs/<name>/record.json``, ``runs/<name>/weights/`` (``config.json`` +
``model.safetensors``) and ``runs/<name>/samples.npz``.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from lebm_zoo.errors import UsageError, exit_on_usage_error  # noqa: E402

#: callbacks a campaign run drops from its recipe (FID needs Inception weights that do not travel; pictures cost time)
DROPPED_CALLBACKS = ("lebm_zoo.callbacks.FIDCallback", "lebm_zoo.callbacks.SampleGrid",
                     "lebm_zoo.callbacks.DensityPlot2D")
#: callbacks whose test metrics a campaign run computes
METRIC_CALLBACKS = ("lebm_zoo.callbacks.AnomalyDetectionCallback", "lebm_zoo.callbacks.ReconstructionMSE",
                    "lebm_zoo.callbacks.ClassificationAccuracy", "lebm_zoo.callbacks.TrajectoryMetrics")
PART_BYTES = 16_000_000
MAX_PARTS = 8
#: what a dry run adds to every run: two training steps, one test batch, small batches
DRY_OVERRIDES = ["--trainer.max_steps", "2", "--trainer.limit_test_batches", "2", "--trainer.accelerator", "cpu",
                 "--trainer.precision", "32-true"]  # (an integer limit > 1: "1" would parse as 1.0, i.e. every batch)


def expand(entry: dict) -> list[dict]:
    """The runs of one campaign entry: a plain run, or a ``grid`` whose list values are expanded (their product) and
    substituted into its strings (``{digit}``, ``{seed}``)."""
    lists = {k: v for k, v in entry.items() if isinstance(v, list) and k not in ("overrides", "dry_overrides")}
    if not lists:
        return [dict(entry)]
    def fill(v, sub: dict):
        if isinstance(v, str):
            for key, value in sub.items():
                v = v.replace("{" + key + "}", str(value))
            return v
        if isinstance(v, list):
            return [fill(x, sub) for x in v]
        return v

    runs = []
    for values in itertools.product(*lists.values()):
        sub = dict(zip(lists, values))
        run = {k: v for k, v in entry.items() if k not in lists} | sub
        runs.append({k: fill(v, sub) for k, v in run.items()})
    return runs


def load_campaigns(paths: list[Path]) -> list[dict]:
    """Every run of the campaign files, in priority order (file ``priority``, then as listed).

    Raises:
        UsageError: a file without runs, a run without ``name``/``recipe``/``seed``, or a name used twice.
    """
    runs = []
    for order, path in enumerate(paths):
        spec = yaml.safe_load(Path(path).read_text())
        if not isinstance(spec, dict) or not spec.get("runs"):
            raise UsageError(f"{path}: a campaign file needs a non-empty 'runs' list")
        for entry in spec["runs"]:
            for i, run in enumerate(expand(entry)):
                run["_first"] = i == 0
                missing = {"name", "recipe", "seed"} - set(run)
                if missing:
                    raise UsageError(f"{path}: run {run} lacks {sorted(missing)}")
                run.setdefault("overrides", [])
                run.setdefault("fid_samples", 0)
                run["campaign"] = spec.get("name", Path(path).stem)
                run["_priority"] = (spec.get("priority", 100), order)
                runs.append(run)
    runs.sort(key=lambda r: r["_priority"])
    names = [r["name"] for r in runs]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise UsageError(f"run names used twice: {sorted(dup)}")
    return runs


def campaign_config(recipe: str, folder: Path) -> tuple[Path, bool]:
    """The recipe as a campaign runs it (``folder/config.yaml``): without :data:`DROPPED_CALLBACKS`, no validation.
    Returns the file and whether a metric callback is left for the test."""
    from lebm_zoo.cli import recipe_path

    cfg = yaml.safe_load(recipe_path(recipe).read_text())
    trainer = cfg.setdefault("trainer", {})
    callbacks = [c for c in trainer.get("callbacks") or [] if c.get("class_path") not in DROPPED_CALLBACKS]
    trainer["callbacks"] = callbacks
    trainer["limit_val_batches"] = 0
    trainer.pop("check_val_every_n_epoch", None)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path, any(c.get("class_path") in METRIC_CALLBACKS for c in callbacks)


def _scalars(folder: Path) -> dict[str, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = {}
    for ev in sorted(folder.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(ev), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            out[tag] = acc.Scalars(tag)[-1].value
    return out


def takes_capture_step(config: Path) -> bool:
    """Whether the model of a run's ``config.yaml`` has the ``capture_step`` option."""
    import importlib
    import inspect

    path = yaml.safe_load(config.read_text())["model"]["class_path"]
    module, _, name = path.rpartition(".")
    return "capture_step" in inspect.signature(getattr(importlib.import_module(module), name)).parameters


#: what ``--capture-step`` adds to the runs whose model has the option: the step as one CUDA graph, and the
#: divergence guard read every 50 batches instead of at every step (a token-sequence run also needs ``--data.pad_to``
#: in its campaign overrides, else only the batches as long as its first replay the graph)
CAPTURE_OVERRIDES = ["--model.capture_step", "true", "--trainer.callbacks+=lebm_zoo.callbacks.SyncEvery",
                     "--trainer.callbacks.steps", "50"]


#: seconds a worker has, after SIGTERM, to write its last checkpoint and weights before it is killed
GRACE = 10.0


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity: a container's share, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def stop_workers(procs: list, grace: float = GRACE) -> None:
    """SIGTERM to each process still running, then SIGKILL to those still running ``grace`` seconds later (one
    grace period for all of them); returns when all have exited."""
    running = [p for p in procs if p.poll() is None]
    for p in running:
        p.terminate()
    end = time.time() + grace
    for p in running:
        try:
            p.wait(timeout=max(0.0, end - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def stub_record(run: dict, error: str) -> dict:
    """The record of a run that wrote none (never started, or its worker died first): the run as listed (its campaign,
    model and digit place it in the report's tables) and why."""
    return {**{k: v for k, v in run.items() if not k.startswith("_")}, "error": error}


def run_one(run: dict, work: Path, data: str, train_seconds: float, dry: bool, capture: bool = False) -> dict:
    """Train, test, save and sample one run in ``work/runs/<name>/``; returns its record (also ``record.json``).
    ``capture``: with :data:`CAPTURE_OVERRIDES` where the model takes them (``record["capture_step"]`` says)."""
    import numpy as np
    import torch

    from lebm_zoo.cli import main as cli
    from lebm_zoo.pretrained import load_pretrained, save_pretrained

    folder = work / "runs" / run["name"]
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    cfg, has_metrics = campaign_config(run["recipe"], folder)
    overrides = [str(v).replace("{data}", data) for v in run["overrides"]]
    captured = capture and takes_capture_step(cfg)
    common = ["--config", str(cfg), *overrides, *(CAPTURE_OVERRIDES if captured else []),
              "--trainer.enable_progress_bar", "false"]
    if dry:
        common += DRY_OVERRIDES + [str(v) for v in run.get("dry_overrides", [])]
    budget = time.strftime("00:%H:%M:%S", time.gmtime(max(train_seconds, 1)))
    fit = ["fit", *common, "--seed_everything", str(run["seed"]), "--trainer.default_root_dir", str(folder / "fit")]
    if not dry:
        fit += ["--trainer.max_time", budget]
    record = {k: v for k, v in run.items() if not k.startswith("_")}
    record["capture_step"] = captured
    t0 = time.time()
    code = cli(fit)
    record["fit_seconds"] = round(time.time() - t0, 1)
    record["fit_exit_code"] = code
    ckpts = sorted((folder / "fit").rglob("last.ckpt"))
    stopped = code == 143 and bool(ckpts)  # SIGTERM at the time limit: last.ckpt written where it stopped
    if (code != 0 and not stopped) or not ckpts:
        record["error"] = f"fit exited {code}" + ("" if ckpts else " without a last.ckpt")
        (folder / "record.json").write_text(json.dumps(record, indent=1) + "\n")
        return record
    last = ckpts[-1]
    record["iterations"] = int(torch.load(last, map_location="cpu", weights_only=True)["global_step"])
    record["metrics"] = {}
    model = load_pretrained(last, map_location="cuda" if torch.cuda.is_available() and not dry else "cpu")
    device = str(model.device) + (f" ({torch.cuda.get_device_name()})" if model.device.type == "cuda" else "")
    record["device"] = device

    def save(stage: str | None) -> None:
        """The weights (with the metrics so far) and the record, after each phase: a worker stopped at the
        deadline keeps what it finished (``error`` says where it stopped; the last save has none)."""
        save_pretrained(model.cpu(), folder / "weights", recipe=run["recipe"], data=run.get("data", "MNIST"),
                        training_steps=record["iterations"],
                        metrics={k.split("/", 1)[1]: {"value": v, "protocol": f"lebm-zoo test --recipe {run['recipe']}"}
                                 for k, v in record["metrics"].items()},
                        training={"command": " ".join(["lebm-zoo", *fit]), "seed": run["seed"],
                                  "wall_seconds": record["fit_seconds"], "iterations": record["iterations"],
                                  "device": device, "campaign": run["campaign"]})
        if stage is None:
            record.pop("error", None)
        else:
            record["error"] = f"stopped after {stage}"
        (folder / "record.json").write_text(json.dumps(record, indent=1) + "\n")

    if stopped:  # its time is up: the weights so far, not tested, no samples
        save("training, by SIGTERM at its time limit or the deadline (not tested, no samples)")
        return record
    save("training (not tested, no samples)")
    if has_metrics:
        t0 = time.time()
        code = cli(["test", *common, "--ckpt_path", str(last), "--trainer.default_root_dir", str(folder / "test")])
        record["test_seconds"] = round(time.time() - t0, 1)
        if code == 0:
            record["metrics"] = {k: float(v) for k, v in _scalars(folder / "test").items() if k.startswith("test/")}
            save("the test (no samples)")
        else:
            record["error"] = f"test exited {code}"
    n = int(run["fid_samples"]) if not dry else min(int(run["fid_samples"]), 16)
    if n > 0:
        model = model.to("cuda" if torch.cuda.is_available() and not dry else "cpu")
        torch.manual_seed(run["seed"])
        parts = []
        with torch.no_grad():
            for i in range(0, n, 200):
                x = model.sample(min(200, n - i)).detach().float().clamp(-1, 1)
                parts.append(((x + 1) * 127.5).round().to(torch.uint8).cpu().numpy())
        np.savez_compressed(folder / "samples.npz", images=np.concatenate(parts))
        record["samples"] = n
    if "error" in record and record["error"].startswith("test exited"):
        (folder / "record.json").write_text(json.dumps(record, indent=1) + "\n")  # the test's failure stays
    else:
        save(None)
    return record


def pack(work: Path, out: Path, records: list[dict]) -> list[Path]:
    """Zip ``summary.json`` and every run's record, weights and samples into at most :data:`MAX_PARTS` files of at
    most :data:`PART_BYTES` each under ``out`` (stored runs whole, greedily; what does not fit is listed in
    ``summary.json``'s ``left_out``)."""
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for rec in records:
        folder = work / "runs" / rec["name"]
        for rel in ("record.json", "weights/config.json", "weights/model.safetensors", "samples.npz"):
            if (folder / rel).is_file():
                files.append((folder / rel, f"runs/{rec['name']}/{rel}"))
    parts, sizes, left_out = [[]], [0], []
    for path, arc in files:
        size = path.stat().st_size + 200
        if size > PART_BYTES - 100_000:
            left_out.append(arc)
            continue
        if sizes[-1] + size > PART_BYTES - 100_000:
            if len(parts) == MAX_PARTS:
                left_out.append(arc)
                continue
            parts.append([])
            sizes.append(0)
        parts[-1].append((path, arc))
        sizes[-1] += size
    summary = {"runs": records, "left_out": left_out}
    written = []
    for i, members in enumerate(parts, 1):
        path = out / f"campaign-part{i}.zip"
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
            if i == 1:
                z.writestr("summary.json", json.dumps(summary, indent=1) + "\n")
            for p, arc in members:
                z.write(p, arc)
        written.append(path)
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("campaigns", nargs="*", type=Path, help="campaign files (one or more)")
    ap.add_argument("--data", default="/tmp/data", help="the data folder ({data} in the overrides)")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "campaign-out")))
    ap.add_argument("--budget", type=float, default=480, help="wall seconds for everything (default 480)")
    ap.add_argument("--startup", type=float, default=30, help="seconds kept for start-up and packing")
    ap.add_argument("--eval-margin", type=float, default=60,
                    help="seconds per wave kept for a run's start, test, saving and sampling (default 60)")
    ap.add_argument("--parallel", type=int, default=None, help="runs at once (default: CPU cores - 2)")
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU, in this process, two steps a run, each campaign entry once (a grid at its first "
                         "values), with each run's dry_overrides: a check of the whole pipeline")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--capture-step", action="store_true",
                    help="train each run whose model has the option with --model.capture_step true (the step as one "
                         "CUDA graph) and SyncEvery(50)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:  # one run, in its own process
        job = json.loads(a.worker)
        rec = run_one(job["run"], Path(job["work"]), job["data"], job["seconds"], False, job.get("capture", False))
        return 0 if "error" not in rec else 1
    if not a.campaigns:
        raise UsageError("give one or more campaign files (benchmarks/campaigns/*.yaml)")
    t_start = time.time()
    runs = load_campaigns(a.campaigns)
    if a.dry_run:  # every entry once (grids at their first values): each recipe and override set is exercised
        print(f"dry run: {sum(r['_first'] for r in runs)} of the {len(runs)} runs (grids at their first values)")
        runs = [r for r in runs if r["_first"]]
    parallel = 1 if a.dry_run else max(1, min(len(runs), a.parallel or available_cores() - 2))
    waves = math.ceil(len(runs) / parallel)
    seconds = (a.budget - a.startup - waves * a.eval_margin) / waves
    if seconds < 10 and not a.dry_run:
        raise UsageError(f"{len(runs)} runs in {waves} waves of {parallel} leave {seconds:.0f} s of training each "
                         f"in a {a.budget:.0f} s budget: raise --budget or --parallel, or give fewer runs")
    work = a.work or Path(tempfile.mkdtemp(prefix="campaign-"))
    print(f"campaign: {len(runs)} runs, {parallel} at a time, {waves} wave(s), "
          f"{'2 steps each (dry run)' if a.dry_run else f'{seconds:.0f} s of training each'}; work in {work}",
          flush=True)
    records = []
    if a.dry_run:
        for run in runs:
            records.append(run_one(run, work, a.data, seconds, True, a.capture_step))
            print(f"  {run['name']}: {records[-1].get('error', 'ok')} {records[-1].get('metrics', {})}", flush=True)
    else:
        pending, active = list(runs), []
        logs = work / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        # whatever else happens, the packing starts by then: a run still going is stopped (SIGTERM, then SIGKILL
        # after GRACE seconds), none starts after it
        deadline = t_start + a.budget - a.startup / 2 - GRACE
        while pending or active:
            # a run started later than one evaluation margin before the deadline could not train: its worker would
            # be stopped while still starting (where Lightning's own SIGTERM handler, not lebm-zoo's, is in place)
            if time.time() > deadline - a.eval_margin:
                for run in pending:
                    records.append(stub_record(run, "not started: the wall budget was spent"))
                pending = []
            while pending and len(active) < parallel:
                run = pending.pop(0)
                job = json.dumps({"run": {k: v for k, v in run.items() if not k.startswith("_")}, "work": str(work),
                                  "data": a.data, "seconds": seconds, "capture": a.capture_step})
                log = open(logs / f"{run['name']}.log", "w")
                proc = subprocess.Popen([sys.executable, __file__, "--worker", job], stdout=log,
                                        stderr=subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS="1"))
                active.append((run, proc, log, time.time()))
            time.sleep(1)
            late = {id(item): time.time() - item[3] > seconds + 3 * a.eval_margin or time.time() > deadline
                    for item in active}
            ending = [item for item in active if item[1].poll() is not None or late[id(item)]]
            stop_workers([item[1] for item in ending])
            for item in ending:
                run, proc, log, started = item
                over = " (stopped: over time)" if late[id(item)] and proc.returncode != 0 else ""
                log.close()
                active.remove(item)
                rec_path = work / "runs" / run["name"] / "record.json"
                rec = json.loads(rec_path.read_text()) if rec_path.is_file() else stub_record(
                    run, f"worker exited {proc.returncode}{over}")
                if proc.returncode != 0 and str(rec.get("error", "")).startswith("stopped after"):
                    rec["error"] += f"; worker exited {proc.returncode}{over}"
                records.append(rec)
                print(f"  {run['name']}: {rec.get('error', 'ok')} {rec.get('iterations', 0)} iterations "
                      f"{rec.get('metrics', {})}", flush=True)
    order = {r["name"]: i for i, r in enumerate(runs)}
    records.sort(key=lambda r: order[r["name"]])
    parts = pack(work, a.out, records)
    failed = [r["name"] for r in records if "error" in r]
    print(f"campaign: {len(records) - len(failed)} of {len(records)} runs done in {time.time() - t_start:.0f} s; "
          f"{len(parts)} file(s) under {a.out}" + (f"; failed: {failed}" if failed else ""), flush=True)
    if a.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    exit_on_usage_error(main, "gpu_campaign.py")
