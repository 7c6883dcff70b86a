#!/usr/bin/env python3
"""Sampling speed of the diffusion recovery likelihood EBM (``DiffusionRecoveryEBM``) at the mnist_drl recipe's size.

Images per second of ``model.sample(n)`` (all T levels from N(0, I), K Langevin steps each: T * K gradient evaluations
of the energy net per image batch) on the CPU, in fp32 and in bf16-mixed (``torch.autocast("cpu", torch.bfloat16)``:
the network in bf16, chain states and energies in fp32), for a model built from ``recipes/mnist_drl.yaml``'s
``model.init_args`` (untrained weights: the speed does not depend on them). Each row is the best of ``--repeats``
timed calls after one untimed warm-up call. Prints a Markdown table with the CPU model, the thread count, whether the
CPU has native bf16 and the torch version.

Usage: python benchmarks/bench_drl.py [--n 16] [--repeats 2] [--threads N] [--mcmc-steps K] [--json PATH]
The default run (16 images, T=6, K=30) takes about a minute on one core with native bf16, longer where bf16 is
emulated; ``--mcmc-steps`` shortens it (throughput scales as 1 / K).
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import yaml

from lebm_zoo import DiffusionRecoveryEBM
from lebm_zoo.env import cpu_info, native_bf16

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "mnist_drl.yaml"


def cpu_model() -> str:
    return cpu_info()["model"] or platform.processor() or platform.machine()


def build_model(mcmc_steps: int | None) -> DiffusionRecoveryEBM:
    """The mnist_drl recipe's model (its init_args), optionally with another chain length."""
    args = dict(yaml.safe_load(RECIPE.read_text())["model"]["init_args"])
    if mcmc_steps is not None:
        args["mcmc_steps"] = mcmc_steps
    for key in ("ch_mult", "betas"):
        if isinstance(args.get(key), list):
            args[key] = tuple(args[key])
    return DiffusionRecoveryEBM(**args).eval()


def images_per_second(model: DiffusionRecoveryEBM, n: int, repeats: int, bf16: bool) -> float:
    """Best of ``repeats`` timed ``model.sample(n)`` calls (after one warm-up), in images per second."""
    best = float("inf")
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        model.sample(min(n, 2), mcmc_steps=1)  # warm-up: oneDNN primitives, allocator
        for _ in range(repeats):
            t0 = time.perf_counter()
            x = model.sample(n)
            best = min(best, time.perf_counter() - t0)
    assert x.dtype == torch.float32 and torch.isfinite(x).all()
    return n / best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=16, help="images per sample() call (default 16)")
    p.add_argument("--repeats", type=int, default=2, help="timed calls per row; the best is kept (default 2)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--mcmc-steps", type=int, default=None, help="K per level (default: the recipe's, 30)")
    p.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = build_model(a.mcmc_steps)
    hp = model.hparams
    rows = {"fp32": images_per_second(model, a.n, a.repeats, bf16=False),
            "bf16-mixed": images_per_second(model, a.n, a.repeats, bf16=True)}
    res = {"cpu": cpu_model(), "threads": torch.get_num_threads(), "native_bf16": native_bf16(),
           "torch": torch.__version__, "n": a.n, "num_timesteps": hp.num_timesteps, "mcmc_steps": hp.mcmc_steps,
           "ch": hp.ch, "images_per_s": rows}
    print(f"DiffusionRecoveryEBM.sample at mnist_drl size (ch {hp.ch}, T={hp.num_timesteps}, K={hp.mcmc_steps}, "
          f"{a.n} images per call)")
    print(f"CPU: {res['cpu']}; {res['threads']} threads; native bf16: {'yes' if res['native_bf16'] else 'no'}; "
          f"torch {torch.__version__}\n")
    print("| precision | images/s | vs fp32 |")
    print("|---|---:|---:|")
    for name, v in rows.items():
        print(f"| {name} | {v:.2f} | {v / rows['fp32']:.2f}x |")
    if a.json:
        a.json.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
