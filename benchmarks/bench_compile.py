#!/usr/bin/env python3
"""Speed of the compiled Langevin chain: seconds per 60-step prior chain, eager against ``torch.compile``.

The chain is the LEBM SVHN recipe's prior chain, on its energy MLP (``LatentEBMPrior()`` with its defaults: nz 100,
E 100-200-200-1 GELU, K0 = 60 steps of s0 = 0.4) from N(0, I) noise, batch 100 (``--batch``): ``model.langevin`` on
``model.prior_log_prob`` with a ``LangevinSampler`` of the same configuration and ``compile=MODE``, parameters frozen
as in training. Rows: eager; ``compile="default"``; on CUDA also ``"reduce-overhead"`` (CUDA graphs). Each compiled
row is first called once, untimed: that call's time less the row's steady time per chain is reported as its compile
time (inductor keeps compiled kernels in an on-disk cache, so a re-run on the same machine compiles faster; set
``TORCHINDUCTOR_FORCE_DISABLE_CACHES=1`` to measure a cold compile). Then ``--rounds`` rounds each time every row once,
back to back in this process (rows alternate, so a change in the machine's load reaches every row alike); the median
per row is kept. Prints a Markdown table with the CPU model (``/proc/cpuinfo``), the thread count and the torch
version; writes JSON to ``benchmarks/results/compile.json`` (``--json``).

Usage: python benchmarks/bench_compile.py [--device cpu|cuda] [--rounds 5] [--threads N] [--batch 100]
                                          [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from lebm_zoo import LangevinSampler, LatentEBMPrior
from lebm_zoo.hardware import cpu_name

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "compile.json"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def chain_seconds(model: LatentEBMPrior, sampler: LangevinSampler, batch: int, device: torch.device) -> float:
    """Wall-clock seconds of one prior chain from fresh N(0, I) noise (the states are checked finite)."""
    z0 = torch.randn(batch, model.hparams.nz, device=device)
    sync(device)
    t0 = time.perf_counter()
    z = model.langevin(model.prior_log_prob, z0, sampler)
    sync(device)
    dt = time.perf_counter() - t0
    if not bool(torch.isfinite(z).all()):
        raise RuntimeError(f"{sampler!r} gave non-finite states")
    return dt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--rounds", type=int, default=5, help="timed chains per row; the median is kept (default 5)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--batch", type=int, default=100, help="chains (default 100, the recipe's batch)")
    p.add_argument("--json", type=Path, default=OUT, help=f"where to write the results (default {OUT})")
    a = p.parse_args()
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    torch.manual_seed(0)
    model = LatentEBMPrior().to(device)  # the SVHN recipe; only its energy MLP runs here
    hp = model.hparams
    modes = [None, "default"] + (["reduce-overhead"] if device.type == "cuda" else [])
    samplers = {m: LangevinSampler(hp.prior_steps, hp.prior_step_size, compile=m) for m in modes}

    compile_s, first_s = {}, {}
    for m, s in samplers.items():  # warm-up: kernels, allocator; for compiled rows the compilation
        first_s[m] = chain_seconds(model, s, a.batch, device)
        chain_seconds(model, s, a.batch, device)
    times = {m: [] for m in modes}
    for _ in range(a.rounds):
        for m, s in samplers.items():
            times[m].append(chain_seconds(model, s, a.batch, device))
    median = {m: statistics.median(v) for m, v in times.items()}
    for m in modes:
        if m is not None:
            compile_s[m] = first_s[m] - median[m]

    name = {None: "eager"}
    res = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
           "device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
           "batch": a.batch, "nz": hp.nz, "n_steps": hp.prior_steps, "step_size": hp.prior_step_size,
           "rounds": a.rounds,
           "rows": {name.get(m, m): {"s_per_chain": median[m], "rounds_s": times[m],
                                     "speedup_vs_eager": median[None] / median[m],
                                     "compile_s": compile_s.get(m)} for m in modes}}
    gpu = f"; GPU: {res['gpu']}" if res["gpu"] else ""
    print(f"{hp.prior_steps}-step prior chain of the LEBM SVHN recipe (batch {a.batch}, nz {hp.nz}, step "
          f"{hp.prior_step_size}), median of {a.rounds} after warm-up")
    print(f"CPU: {res['cpu']}; {res['threads']} threads; torch {torch.__version__}; device {device}{gpu}\n")
    print("| chain | s / chain | vs eager | compile time (s) |")
    print("|---|---:|---:|---:|")
    for m in modes:
        row = res["rows"][name.get(m, m)]
        c = "-" if row["compile_s"] is None else f"{row['compile_s']:.1f}"
        label = "eager" if m is None else f"compiled ({m})"
        print(f"| {label} | {row['s_per_chain']:.4f} | {row['speedup_vs_eager']:.2f}x | {c} |")
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
