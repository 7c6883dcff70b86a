#!/usr/bin/env python3
"""Plot training curves of lebm-zoo runs from their TensorBoard logs into one PNG.

Usage: python benchmarks/plot_curves.py OUT.png LABEL=RUN_DIR [LABEL=RUN_DIR ...] [--keys train/loss_g ...]
       [--epoch-table train/cd ...]
RUN_DIR is a ``lightning_logs/version_N`` folder (or any folder above one event file). ``--epoch-table KEY ...`` also
prints, for each run and key, the smallest and largest magnitude of the logged values in each epoch (a Markdown
table; the epoch of a step is that of the run's ``epoch`` scalar).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

DEFAULT_KEYS = ["train/loss_g", "train/energy_gap", "train/energy_pos", "train/energy_neg"]


def scalars(run: Path) -> dict[str, tuple[list[int], list[float]]]:
    files = sorted(run.rglob("events.out.tfevents.*"))
    if not files:
        raise SystemExit(f"no TensorBoard event file under {run}")
    out: dict[str, tuple[list[int], list[float]]] = {}
    for f in files:
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            ev = acc.Scalars(tag)
            steps, vals = out.setdefault(tag, ([], []))
            steps += [e.step for e in ev]
            vals += [e.value for e in ev]
    return out


def epoch_table(label: str, s: dict, key: str) -> str:
    """Markdown rows ``| label | key | epoch | min |v| | max |v| |`` of the logged values of ``key``, by epoch."""
    import bisect

    e_steps, e_vals = s["epoch"]
    order = sorted(range(len(e_steps)), key=e_steps.__getitem__)
    e_steps, e_vals = [e_steps[i] for i in order], [e_vals[i] for i in order]
    by_epoch: dict[int, list[float]] = {}
    for step, v in zip(*s[key]):
        i = max(bisect.bisect_right(e_steps, step) - 1, 0)
        by_epoch.setdefault(int(e_vals[i]), []).append(abs(v))
    return "\n".join(f"| {label} | {key} | {e} | {min(v):.4g} | {max(v):.4g} |" for e, v in sorted(by_epoch.items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("runs", nargs="+", help="LABEL=RUN_DIR")
    ap.add_argument("--keys", nargs="+", default=DEFAULT_KEYS)
    ap.add_argument("--epoch-table", nargs="+", default=[], metavar="KEY",
                    help="also print each key's smallest and largest |value| per epoch")
    a = ap.parse_args()
    runs = {r.split("=", 1)[0]: scalars(Path(r.split("=", 1)[1])) for r in a.runs}
    keys = [k for k in a.keys if any(k in s for s in runs.values())]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for label, s in runs.items():
            if key in s:
                ax.plot(*s[key], label=label, lw=1)
        ax.set_title(key)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(a.out, dpi=90)
    print(a.out)
    if a.epoch_table:
        print("\n| run | key | epoch | min abs | max abs |\n|---|---|---|---|---|")
        for label, s in runs.items():
            for key in a.epoch_table:
                if key in s and "epoch" in s:
                    print(epoch_table(label, s, key))


if __name__ == "__main__":
    main()
