#!/usr/bin/env python3
"""Collect the outputs of ``benchmarks/gpu_check.sh`` into ``gpu_check.json`` and ``gpu_check.md`` in its OUT folder.

Reads: ``steps.jsonl`` (rc and seconds of each step), ``env.log``, ``pytest.xml`` (JUnit counts of ``pytest -m
cuda``), ``bench.json`` (benchmarks/run.py), the timed cifar10_prior run's ``last.ckpt`` (global step and Lightning's
Timer state: seconds spent in training), and ``cifar10_fid.log`` (the ``test/fid`` that ``lebm-zoo test`` printed).
The implied time of the recipe's full schedule is the measured training seconds per iteration times 201 epochs of
500 iterations (CIFAR-10's 50,000 training images in batches of 100); it counts training only, not the FID
evaluations of the schedule.
Usage: python benchmarks/gpu_check_report.py --out DIR [--ckpt last.ckpt] [--dry-run 0|1] ...
"""
from __future__ import annotations

import argparse
import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

FULL_SCHEDULE_ITERS = 201 * 500  # cifar10_prior: max_epochs 201, 50,000 images / batch 100


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def pytest_counts(xml: Path) -> dict | None:
    if not xml.exists():
        return None
    suites = ET.parse(xml).getroot()
    suite = suites if suites.tag == "testsuite" else suites.find("testsuite")
    n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    n["passed"] = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
    return n


def timed_run(ckpt: str) -> dict | None:
    """Global step and training seconds of a checkpoint (Lightning's Timer callback state, set by max_time)."""
    if not ckpt or not Path(ckpt).exists():
        return None
    import torch

    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    timer = next((v for k, v in state.get("callbacks", {}).items() if k.startswith("Timer")), None)
    train_s = (timer or {}).get("time_elapsed", {}).get("train")
    steps = int(state["global_step"])
    out = {"global_step": steps, "epoch": int(state["epoch"]), "train_seconds": train_s}
    # training iterations (batches) from the fit loop's progress; global_step counts optimiser steps
    iters = state.get("loops", {}).get("fit_loop", {}).get("epoch_loop.batch_progress", {}).get(
        "total", {}).get("completed")
    out["iterations"] = iters
    if train_s and iters:
        out.update(iterations=iters, s_per_iter=train_s / iters,
                   implied_full_schedule_hours=train_s / iters * FULL_SCHEDULE_ITERS / 3600)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--ckpt", default="")
    ap.add_argument("--dry-run", type=int, default=0)
    ap.add_argument("--precision", default="")
    ap.add_argument("--num-samples", type=int, default=0)
    ap.add_argument("--num-real", type=int, default=0)
    ap.add_argument("--train-time", default="")
    a = ap.parse_args()
    out = Path(a.out)
    steps = [json.loads(line) for line in _read(out / "steps.jsonl").splitlines() if line.strip()]
    env = _read(out / "env.log")
    gpu = next((line for line in env.splitlines()[1:] if "," in line and "MiB" in line), None)
    bench = json.loads(_read(out / "bench.json") or "null")
    fid = re.findall(r"test/fid\s+([0-9.]+)", _read(out / "cifar10_fid.log"))
    res = {"dry_run": bool(a.dry_run), "gpu": gpu, "env": env.strip().splitlines(), "steps": steps,
           "pytest_cuda": pytest_counts(out / "pytest.xml"), "bench": bench,
           "cifar10_prior": {"precision": a.precision, "train_time": a.train_time, "run": timed_run(a.ckpt),
                             "fid": float(fid[-1]) if fid else None, "fid_samples": a.num_samples,
                             "fid_real_train_images": a.num_real}}
    (out / "gpu_check.json").write_text(json.dumps(res, indent=2) + "\n")

    dry = " (dry run on the CPU, tiny sizes: no number here is a GPU measurement)" if a.dry_run else ""
    md = [f"# lebm-zoo GPU check{dry}",
          "", f"Machine: {gpu or 'no GPU (nvidia-smi absent)'}; " + "; ".join(env.strip().splitlines()[:2]), "",
          "| step | rc | seconds |", "|---|---|---|"]
    md += [f"| {s['step']} | {s['rc']} | {s['seconds']:.1f} |" for s in steps]
    pc = res["pytest_cuda"]
    if pc:
        md += ["", f"`pytest -m cuda`: {pc['passed']} passed, {pc['failures'] + pc['errors']} failed, "
                   f"{pc['skipped']} skipped"]
    if bench:
        it = bench["training_iteration"]
        base = next((it[k]["s_per_iter"] for k in ("plain", "reference") if it.get(k)), None)
        md += ["", f"SVHN-recipe training iteration, batch {bench['batch']}, device {bench['device']} "
                   f"(median of {bench['rounds']} rounds):", "",
               "| row | s/iter | x the reference-structure loop | peak MiB |", "|---|---|---|---|"]
        for key, r in it.items():
            if r:
                ratio = f"{base / r['s_per_iter']:.2f}" if base else ""
                md.append(f"| {key} | {r['s_per_iter']:.4f} | {ratio} | {r['peak_mib']:.0f} |")
    c = res["cifar10_prior"]
    if c["run"]:
        r = c["run"]
        md += ["", f"cifar10_prior, {c['precision']}, trained for {c['train_time']}: {r.get('iterations')} iterations "
                   f"({r['epoch']} full epochs)" + (f", {r['s_per_iter']:.3f} s/iter; the recipe's full schedule "
                                                     f"({FULL_SCHEDULE_ITERS:,} iterations) would take "
                                                     f"{r['implied_full_schedule_hours']:.1f} h of training"
                                                     if r.get("s_per_iter") else "")]
    md += ["", f"FID ({c['fid_samples']} samples vs {c['fid_real_train_images']} training images): "
               + (f"{c['fid']:.1f}" if c["fid"] is not None else "not computed (see cifar10_fid.log)")]
    (out / "gpu_check.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
