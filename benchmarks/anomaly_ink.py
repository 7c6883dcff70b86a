#!/usr/bin/env python3
"""How much of an MNIST anomaly score is ink: the AUROC and AUPRC of the amount of ink alone as the anomaly score,
and the rank correlation of trained models' scores with it.

For each held-out digit, on the test split of ``MNISTAnomalyDataModule`` (the reference split):

- ``ink``: the mean pixel value of an image in [0, 1] (the stroke area), used as the anomaly score (more ink = more
  anomalous), scored on the whole test split: AUROC and AUPRC (the protocol's ``auc(recall, precision)``);
- for every run found under ``--runs`` (``<model>_d<digit>_s<seed>/``, its ``last.ckpt``): the model's
  ``anomaly_score`` on a class-stratified random subsample of ``--n`` test images (``--seed``), its AUROC there, and
  Spearman's rank correlation of the score with ink on the same images.

A likelihood score -log p(x, z) = ||x - G(z)||^2 / (2 llhd_sigma^2) - log p(z) grows with what the generator fails
to draw, and that grows with the stroke area early in training: where a model's AUROC is close to ink's and its
score correlates with ink, the model ranks images by their amount of ink, not by their digit.

Usage (from the repository root)::

    python benchmarks/anomaly_ink.py --data-dir $DATA/mnist --runs runs/anomaly --seeds 1 [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

DIGITS = (1, 4, 5, 7, 9)
FIT = re.compile(r"^(?P<model>[a-z]+)_d(?P<digit>\d)_s(?P<seed>\d+)$")


def auroc_auprc(scores: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(AUROC, the protocol's trapezoidal AUPRC) of ``scores`` (higher = more anomalous), ``labels`` 1 = anomaly:
    the package's metrics, as ``lebm-zoo test`` logs them."""
    from lebm_zoo.callbacks.anomaly import anomaly_auprc, anomaly_auroc

    return anomaly_auroc(scores, labels), anomaly_auprc(scores, labels)


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation of two 1-D tensors (ties broken by position)."""
    ra, rb = (t.double().argsort().argsort().double() for t in (a, b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def test_split(data_dir: str, digit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference split's test images ``(N, 1, 28, 28)`` in [-1, 1] and labels ``(N,)`` (1 = the held-out digit)."""
    from datamodules import MNISTAnomalyDataModule

    dm = MNISTAnomalyDataModule(data_dir=data_dir, heldout_digit=digit, split="reference")
    dm.setup("test")
    ds = dm.test_set
    x = ds.images[ds.index].unsqueeze(1).float().div(255).sub(0.5).div(0.5)
    return x, ds.labels.clone()


def stratified(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Indices of a random subsample of ``n`` items with the classes in their split's proportions."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for c in (0, 1):
        idx = torch.nonzero(labels == c).squeeze(1)
        k = round(n * len(idx) / len(labels))
        out.append(idx[torch.randperm(len(idx), generator=g)[:k]])
    return torch.cat(out)


def model_scores(ckpt: Path, x: torch.Tensor, batch: int, bf16: bool) -> torch.Tensor:
    import lebm_zoo

    model = lebm_zoo.load_pretrained(ckpt).eval()
    torch.manual_seed(0)
    out = []
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for i in range(0, len(x), batch):
            out.append(model.anomaly_score(x[i:i + batch]).float().cpu())
    return torch.cat(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True, help="the folder holding MNIST (as --data.data_dir)")
    parser.add_argument("--runs", type=Path, default=None, help="anomaly runs (benchmarks/anomaly_runs.sh's folder)")
    parser.add_argument("--digits", type=int, nargs="+", default=list(DIGITS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[1], help="the runs' seeds to score")
    parser.add_argument("--n", type=int, default=2000, help="test images per model (class-stratified subsample)")
    parser.add_argument("--seed", type=int, default=0, help="the subsample's seed")
    parser.add_argument("--fp32", action="store_true", help="score in fp32 (default: bf16 autocast, as the runs)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.runs is not None and not args.runs.is_dir():
        raise SystemExit(f"--runs {args.runs}: no such folder")
    torch.set_num_threads(1)
    rows, out = [], []
    for digit in args.digits:
        x, y = test_split(args.data_dir, digit)
        ink = x.add(1).div(2).flatten(1).mean(1)
        ink_auroc, ink_auprc = auroc_auprc(ink, y)
        rec = {"digit": digit, "test_images": len(y), "ink_auroc": ink_auroc, "ink_auprc": ink_auprc, "models": []}
        sub = stratified(y, args.n, args.seed)
        fits = sorted(p for p in args.runs.iterdir() if p.is_dir()) if args.runs else []
        for fit in fits:
            m = FIT.match(fit.name)
            ckpt = fit / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
            if m is None or int(m["digit"]) != digit or int(m["seed"]) not in args.seeds or not ckpt.is_file():
                continue
            s = model_scores(ckpt, x[sub], 100, bf16=not args.fp32)
            auroc, auprc = auroc_auprc(s, y[sub])
            rho = spearman(s, ink[sub])
            rec["models"].append({"run": fit.name, "images": len(sub), "auroc": auroc, "auprc": auprc,
                                  "spearman_with_ink": rho})
            rows.append(f"| {digit} | {ink_auroc:.3f} | {ink_auprc:.3f} | {fit.name} | {auroc:.3f} | {rho:+.2f} |")
        if not rec["models"]:
            rows.append(f"| {digit} | {ink_auroc:.3f} | {ink_auprc:.3f} | | | |")
        out.append(rec)
        print(rows[-1], flush=True)
    print("\n| digit | ink: AUROC | ink: AUPRC | run | run: AUROC (subsample) | run: Spearman with ink |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"n": args.n, "seed": args.seed, "fp32": args.fp32, "digits": out}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
