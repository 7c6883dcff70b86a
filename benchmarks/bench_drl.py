#!/usr/bin/env python3
"""Sampling speed of the diffusion recovery likelihood EBM (``DiffusionRecoveryEBM``) at the mnist_drl recipe's size.

Images per second of ``model.sample(n)`` (all T levels from N(0, I), K Langevin steps each: T * K gradient evaluations
of the energy net per image batch) on the CPU, in fp32 and in bf16-mixed (``torch.autocast("cpu", torch.bfloat16)``:
the network in bf16, chain states and energies in fp32), for a model built from ``recipes/mnist_drl.yaml``'s
``model.init_args`` (untrained weights: the speed does not depend on them). Each row is the best of ``--repeats``
timed calls after one untimed warm-up call. Prints a Markdown table with the CPU model, the thread count, whether the
CPU has native bf16 and the torch version.

With ``--cifar10-iteration B``: seconds per training iteration of the cifar10_drl recipe's model (ch 128, the paper's
net) on this CPU, measured at batch B with K = 1 and K = 3 Langevin steps under a Lightning Trainer (the first
iteration dropped), split into the per-step cost c = (t3 - t1) / 2 and the rest a = t1 - c, then scaled linearly to
the recipe's batch 256 and K = 30: (256 / B) * (a + 30 c), and to its 1,000,000 iterations.

Usage: python benchmarks/bench_drl.py [--n 16] [--repeats 2] [--threads N] [--mcmc-steps K] [--json PATH]
                                      [--cifar10-iteration B [--precision 32-true|bf16-mixed]]
The default run (16 images, T=6, K=30) takes about a minute on one core with native bf16, longer where bf16 is
emulated; ``--mcmc-steps`` shortens it (throughput scales as 1 / K).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import yaml

from lebm_zoo import DiffusionRecoveryEBM
from lebm_zoo.hardware import cpu_name, native_bf16

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "mnist_drl.yaml"


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


def cifar10_iteration(batch: int, precision: str, iters: int = 2) -> dict:
    """Seconds per cifar10_drl training iteration at ``batch`` for K = 1 and 3, and the scaled recipe iteration."""
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader, TensorDataset

    class Timer(pl.Callback):
        def __init__(self):
            self.times, self._t = [], 0.0

        def on_train_batch_start(self, *args):
            self._t = time.perf_counter()

        def on_train_batch_end(self, *args):
            self.times.append(time.perf_counter() - self._t)

    recipe = yaml.safe_load((ROOT / "recipes" / "cifar10_drl.yaml").read_text())["model"]["init_args"]
    t = {}
    for k in (1, 3):
        torch.manual_seed(0)
        args = {key: tuple(v) if isinstance(v, list) else v for key, v in recipe.items()}
        model = DiffusionRecoveryEBM(**{**args, "mcmc_steps": k})
        x = torch.rand(batch * (iters + 1), 3, 32, 32) * 2 - 1
        timer = Timer()
        pl.Trainer(accelerator="cpu", devices=1, max_steps=iters + 1, logger=False, precision=precision,
                   enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                   callbacks=[timer]).fit(model, DataLoader(TensorDataset(x, torch.zeros(len(x))), batch_size=batch))
        t[k] = sum(timer.times[1:]) / len(timer.times[1:])
    c = (t[3] - t[1]) / 2
    a_rest = t[1] - c
    full = 256 / batch * (a_rest + 30 * c)
    return {"batch": batch, "precision": precision, "s_per_iter_k1": t[1], "s_per_iter_k3": t[3],
            "s_per_chain_step": c, "s_rest": a_rest, "scaled_s_per_iter_b256_k30": full,
            "scaled_days_1e6_iters": full * 1e6 / 86400}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=16, help="images per sample() call (default 16)")
    p.add_argument("--repeats", type=int, default=2, help="timed calls per row; the best is kept (default 2)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--mcmc-steps", type=int, default=None, help="K per level (default: the recipe's, 30)")
    p.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    p.add_argument("--cifar10-iteration", type=int, default=None, metavar="B",
                   help="instead: time cifar10_drl training iterations at batch B and scale them (see above)")
    p.add_argument("--precision", default="32-true", help="of --cifar10-iteration (default 32-true)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.cifar10_iteration:
        r = cifar10_iteration(a.cifar10_iteration, a.precision)
        r.update(cpu=cpu_name(), threads=torch.get_num_threads(), torch=torch.__version__)
        print(f"cifar10_drl training iteration on {r['cpu']}, {r['threads']} threads, {a.precision}, batch "
              f"{r['batch']}: {r['s_per_iter_k1']:.2f} s at K=1, {r['s_per_iter_k3']:.2f} s at K=3 -> "
              f"{r['s_per_chain_step']:.2f} s per chain step, {r['s_rest']:.2f} s the rest; scaled to batch 256 "
              f"and K=30: {r['scaled_s_per_iter_b256_k30']:.0f} s per iteration, "
              f"{r['scaled_days_1e6_iters']:.0f} days for the recipe's 1,000,000 iterations")
        if a.json:
            a.json.write_text(json.dumps(r, indent=2) + "\n")
        return
    torch.manual_seed(0)
    model = build_model(a.mcmc_steps)
    hp = model.hparams
    rows = {"fp32": images_per_second(model, a.n, a.repeats, bf16=False),
            "bf16-mixed": images_per_second(model, a.n, a.repeats, bf16=True)}
    res = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "native_bf16": native_bf16(),
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
