#!/usr/bin/env python3
"""FID of the shipped ``drl-mnist`` weights sampled with the raw network instead of the EMA one.

The mnist_drl protocol (1,000 samples vs 1,000 MNIST test images, TF-Inception pool3 features; ``FIDCallback`` at
test, seed 1), with ``sample(..., use_ema=False)``. After a short run the EMA (decay 0.999) still weighs the initial
network heavily, so the two differ (README, "MNIST: five families side by side").

Usage: python benchmarks/drl_fid_raw_net.py --data-dir DIR/mnist [--name drl-mnist]
"""
import argparse
import functools

import pytorch_lightning as pl

import lebm_zoo
from datamodules import MNISTDataModule
from lebm_zoo.callbacks import FIDCallback


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--name", default="drl-mnist")
    a = ap.parse_args()
    model = lebm_zoo.load_pretrained(a.name)
    model.sample = functools.partial(model.sample, use_ema=False)
    fid = FIDCallback(num_samples=1000, num_real=1000, real_split="test", on_test=True)
    pl.seed_everything(1)
    pl.Trainer(accelerator="cpu", logger=False, callbacks=[fid], limit_test_batches=1).test(
        model, datamodule=MNISTDataModule(a.data_dir, num_workers=0, batch_size=64))
    print(f"FID of {a.name} sampled with the raw network: {fid.last_value:.1f}")


if __name__ == "__main__":
    main()
