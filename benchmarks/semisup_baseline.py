#!/usr/bin/env python3
"""The supervised-only baseline of the MNIST semi-supervised table: a plain CNN trained on the labelled images alone.

The labelled images are exactly those ``mnist_semisup`` uses: ``SemiSupervisedDataModule(MNISTDataModule(...),
labels_per_class=10, seed=0)`` picks them (class-balanced, from the training split only). The classifier is a small
LeNet-style CNN (conv 32 5x5 - max-pool - conv 64 5x5 - max-pool - FC 128 - FC 10, ReLU, dropout 0.5), trained with
Adam (lr 1e-3, weight decay 5e-4) on the 100 images in full batches for ``--epochs`` epochs, no augmentation, no
model selection (the last epoch is tested); test accuracy on the 10,000 test images, one line per seed, then the mean
and standard deviation. Prints a Markdown row and writes JSON.

Usage: python benchmarks/semisup_baseline.py --data-dir DIR/mnist [--seeds 1 2 3] [--epochs 300]
                                             [--out benchmarks/results/semisup_baseline.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from datamodules import MNISTDataModule, SemiSupervisedDataModule


def cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Dropout(0.5), nn.Linear(128, 10))


def stack(ds) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*(ds[i][:2] for i in range(len(ds))))
    return torch.stack(xs), torch.as_tensor(ys)


def run(dm: SemiSupervisedDataModule, seed: int, epochs: int) -> float:
    torch.manual_seed(seed)
    x, y = stack(dm.labelled_set)
    net = cnn()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, weight_decay=5e-4)
    net.train()
    for _ in range(epochs):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    net.eval()
    correct = total = 0
    with torch.no_grad():
        for xb, yb in DataLoader(dm.test_set, batch_size=1000):
            correct += int((net(xb).argmax(1) == yb).sum())
            total += len(yb)
    return correct / total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--epochs", type=int, default=300)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "semisup_baseline.json"))
    a = ap.parse_args()
    dm = SemiSupervisedDataModule(MNISTDataModule(a.data_dir, download=False, val_size=1000), labels_per_class=10,
                                  seed=0)
    dm.setup("fit")
    dm.setup("test")
    assert dm.num_labelled == 100
    accs = []
    for s in a.seeds:
        accs.append(run(dm, s, a.epochs))
        print(f"seed {s}: test accuracy {100 * accs[-1]:.2f}%", flush=True)
    mean = 100 * statistics.mean(accs)
    std = 100 * statistics.stdev(accs) if len(accs) > 1 else 0.0
    print(f"| plain CNN on the 100 labelled images alone ({len(accs)} seeds, {a.epochs} epochs) | "
          f"{mean:.1f} +- {std:.1f} |")
    Path(a.out).write_text(json.dumps({"seeds": a.seeds, "epochs": a.epochs, "test_accuracy": accs,
                                       "mean_percent": mean, "std_percent": std}, indent=2) + "\n")


if __name__ == "__main__":
    main()
