#!/usr/bin/env python3
"""The README's MNIST anomaly-detection table: our test AUPRC per held-out digit (mean +- std over seeds) beside the
papers' rows, the AUPRC of a random score and of the worst possible score on the split, and a bar chart.

Runs are found by name under ``--runs``: ``<model>_d<digit>_s<seed>_test/`` folders holding the TensorBoard events of
``lebm-zoo test`` (``test/auprc``; ``<model>`` is ``prior`` or ``hierarchical``), as the commands in the README's
anomaly section write them.

``--length runs/anomaly_long`` adds the training-length comparison: every run there beside the run of the same model,
digit and seed under ``--runs``, with each fit's budget (``--trainer.max_time``) and iterations (``global_step`` of
its ``last.ckpt``).

Usage::

    python benchmarks/anomaly_table.py --runs runs/anomaly [--chart benchmarks/results/mnist_anomaly_auprc.png]
        [--length runs/anomaly_long]
"""
from __future__ import annotations

import argparse
import re
import statistics
from pathlib import Path

DIGITS = (1, 4, 5, 7, 9)
#: the papers' AUPRC (mean +- std over their runs)
PAPER = {
    "LEBM (Pang et al. 2020)": {1: (0.336, 0.008), 4: (0.630, 0.017), 5: (0.619, 0.013), 7: (0.463, 0.009),
                                9: (0.413, 0.010)},
    "hierarchical joint EBM prior, L^{>0} (Cui et al. 2023)": {1: (0.470, 0.009), 4: (0.941, 0.001),
                                                               5: (0.964, 0.003), 7: (0.815, 0.004),
                                                               9: (0.796, 0.004)},
}
MODELS = {"prior": "ours, LEBM (`mnist_anomaly_prior`)",
          "hierarchical": "ours, hierarchical, L^{>0} (`mnist_anomaly_hierarchical`)"}
RUN = re.compile(r"^(?P<model>[a-z]+)_d(?P<digit>\d)_s(?P<seed>\d+)_test$")


def split_counts(digit: int, train_fraction: float = 0.8) -> tuple[int, int]:
    """(normal, anomalous) images in the test split of MNISTAnomalyDataModule for ``digit``."""
    from datamodules.anomaly import MNIST_DIGIT_COUNTS, training_pool_sizes

    anomalies = MNIST_DIGIT_COUNTS[digit]
    normals = 70_000 - anomalies
    return normals - training_pool_sizes(normals, train_fraction)[0], anomalies


def baseline_auprc(digit: int) -> tuple[float, float]:
    """(random, worst) AUPRC of the split, the protocol's (:func:`lebm_zoo.callbacks.anomaly.anomaly_auprc`): of
    uniform random scores (the mean of 5 seeds; about the anomaly share) and of a score ranking every anomaly below
    every normal. (A constant score is no baseline for this metric: its curve is one step and the trapezoid gives
    (1 + share) / 2.)"""
    import torch

    from lebm_zoo.callbacks.anomaly import anomaly_auprc

    n, a = split_counts(digit)
    y = torch.cat([torch.zeros(n), torch.ones(a)])
    random = statistics.mean(anomaly_auprc(torch.rand(n + a, generator=torch.Generator().manual_seed(s)), y)
                             for s in range(5))
    worst = anomaly_auprc(torch.cat([torch.ones(n), torch.zeros(a)]), y)
    return float(random), float(worst)


def collect(runs: Path, key: str = "test/auprc") -> dict[str, dict[int, list[float]]]:
    """``{model: {digit: [value per seed]}}`` from the test runs' TensorBoard events."""
    out: dict[str, dict[int, list[float]]] = {}
    for folder in sorted(p for p in runs.iterdir() if p.is_dir()):
        m = RUN.match(folder.name)
        if m is None:
            continue
        value = collect_one(folder, key)
        if value is not None:
            out.setdefault(m["model"], {}).setdefault(int(m["digit"]), []).append(value)
    return out


def collect_one(folder: Path, key: str) -> float | None:
    """The last ``key`` logged in the TensorBoard events below ``folder`` (the newest file last), or None."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = []
    for ev in sorted(folder.rglob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime):
        acc = EventAccumulator(str(ev), size_guidance={"scalars": 0})
        acc.Reload()
        if key in acc.Tags()["scalars"]:
            values.append(acc.Scalars(key)[-1].value)
    return float(values[-1]) if values else None


def _cell(values: list[float]) -> str:
    if not values:
        return ""
    if len(values) == 1:
        return f"{values[0]:.3f} (1 run)"
    return f"{statistics.mean(values):.3f} +- {statistics.stdev(values):.3f} ({len(values)} runs)"


def table(results: dict[str, dict[int, list[float]]], auroc: dict[str, dict[int, list[float]]] | None = None) -> str:
    """The Markdown table: ours (with the seeds' mean AUROC below each model's row when ``auroc`` is given), the
    papers', random and worst-possible AUPRC per digit."""
    head = "| AUPRC | " + " | ".join(str(d) for d in DIGITS) + " |"
    rows = [head, "|---" * (len(DIGITS) + 1) + "|"]
    for model, label in MODELS.items():
        if model in results:
            rows.append(f"| **{label}** | " + " | ".join(_cell(results[model].get(d, [])) for d in DIGITS) + " |")
            if auroc and model in auroc:
                cells = [f"{statistics.mean(v):.3f}" if (v := auroc[model].get(d)) else "" for d in DIGITS]
                rows.append(f"| ours, {label.split(' (')[0].removeprefix('ours, ')}: AUROC (mean of the seeds) | "
                            + " | ".join(cells) + " |")
    for label, vals in PAPER.items():
        rows.append(f"| paper, {label} | " + " | ".join(f"{vals[d][0]:.3f} +- {vals[d][1]:.3f}" for d in DIGITS) + " |")
    base = {d: baseline_auprc(d) for d in DIGITS}
    rows.append("| random score (about the anomaly share) | " + " | ".join(f"{base[d][0]:.3f}" for d in DIGITS) + " |")
    rows.append("| worst possible score | " + " | ".join(f"{base[d][1]:.3f}" for d in DIGITS) + " |")
    return "\n".join(rows)


def fit_info(fit: Path) -> tuple[str, int]:
    """(``--trainer.max_time`` of the fit, its training iterations: ``global_step`` of ``last.ckpt``)."""
    import torch
    import yaml

    version = fit / "lightning_logs" / "version_0"
    budget = str(yaml.safe_load((version / "config.yaml").read_text())["trainer"].get("max_time"))
    ckpt = torch.load(version / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    return budget, int(ckpt["global_step"])


def length_table(runs: Path, long_runs: Path) -> str:
    """Markdown: each test run under ``long_runs`` beside the run of the same model, digit and seed under ``runs``
    (budget, iterations, AUPRC, AUROC): the same protocol at two training lengths."""
    rows = ["| model | digit | seed | budget | iterations | AUPRC | AUROC |", "|---|---|---|---|---|---|---|"]
    found = False
    for folder in sorted(p for p in long_runs.iterdir() if p.is_dir()):
        m = RUN.match(folder.name)
        if m is None:
            continue
        for root in (runs, long_runs):
            test = root / folder.name
            fit = root / folder.name.removesuffix("_test")
            if not test.is_dir() or not fit.is_dir():
                continue
            auprc = collect_one(test, "test/auprc")
            if auprc is None:
                continue
            found = True
            budget, steps = fit_info(fit)
            auroc = collect_one(test, "test/auroc")
            rows.append(f"| {MODELS[m['model']].split(' (')[0].removeprefix('ours, ')} | {m['digit']} | {m['seed']} "
                        f"| {budget} | {steps} | {auprc:.3f} | " + ("" if auroc is None else f"{auroc:.3f}") + " |")
    if not found:
        raise SystemExit(f"no <model>_d<digit>_s<seed>_test runs with test/auprc under {long_runs}")
    return "\n".join(rows)


def chart(results: dict[str, dict[int, list[float]]], out: Path) -> None:
    """Bars per digit: ours (mean, std error bars) beside the papers' rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    series = [(MODELS[m].split(" (")[0], [results[m].get(d, []) for d in DIGITS]) for m in MODELS if m in results]
    series += [(f"paper, {k.split(' (')[0]}", [[v[d][0]] for d in DIGITS]) for k, v in PAPER.items()]
    x = np.arange(len(DIGITS))
    w = 0.8 / max(1, len(series))
    fig, ax = plt.subplots(figsize=(8, 4.2))
    for i, (label, vals) in enumerate(series):
        means = [statistics.mean(v) if v else 0.0 for v in vals]
        errs = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in vals]
        ax.bar(x + (i - (len(series) - 1) / 2) * w, means, w, yerr=errs, label=label, capsize=2)
    base = [baseline_auprc(d) for d in DIGITS]
    ax.plot(x, [b[0] for b in base], "_", color="0.4", markersize=30, label="random score")
    ax.plot(x, [b[1] for b in base], "k_", markersize=30, label="worst possible")
    ax.set_xticks(x, [f"digit {d}" for d in DIGITS])
    ax.set_ylabel("AUPRC (test)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.1))
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, required=True)
    parser.add_argument("--chart", type=Path, default=None, help="write the bar chart here (PNG)")
    parser.add_argument("--length", type=Path, default=None,
                        help="runs of other training lengths to compare with --runs (same model, digit and seed)")
    args = parser.parse_args()
    if not args.runs.is_dir():
        raise SystemExit(f"--runs {args.runs}: no such folder")
    results = collect(args.runs)
    if not results:
        raise SystemExit(f"no <model>_d<digit>_s<seed>_test runs with test/auprc under {args.runs}")
    print(table(results, collect(args.runs, "test/auroc")))
    if args.chart:
        chart(results, args.chart)
        print(args.chart)
    if args.length:
        if not args.length.is_dir():
            raise SystemExit(f"--length {args.length}: no such folder")
        print()
        print(length_table(args.runs, args.length))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
