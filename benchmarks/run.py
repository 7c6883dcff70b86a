#!/usr/bin/env python3
"""Speed benchmark (`make bench`): one LEBM SVHN-recipe training iteration, ours vs the plain-PyTorch reference.

Both run back to back in this process on the same random batch size and thread count: the reference loop of
``../shared/bench/reference_lebm_step.py`` (imported, not copied) and ``LatentEBMPrior.training_step`` driven by a
Lightning ``Trainer`` (so framework overhead is included). Prints a table and writes ``benchmarks/results.json``.

Usage: python benchmarks/run.py [--iters 3] [--warmup 1] [--batch 100] [--threads N]
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lebm_zoo import LatentEBMPrior

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT.parent / "shared" / "bench" / "reference_lebm_step.py"


class _Timer(pl.Callback):
    def __init__(self, warmup: int):
        self.warmup, self.times, self._t = warmup, [], 0.0

    def on_train_batch_start(self, *args):
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step > self.warmup:
            self.times.append(time.perf_counter() - self._t)


def ours(batch: int, iters: int, warmup: int) -> float:
    torch.manual_seed(0)
    x = torch.rand(batch * (iters + warmup), 3, 32, 32) * 2 - 1
    data = DataLoader(TensorDataset(x, torch.zeros(len(x))), batch_size=batch)
    timer = _Timer(warmup)
    trainer = pl.Trainer(accelerator="cpu", max_steps=iters + warmup, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[timer])
    trainer.fit(LatentEBMPrior(), data)
    return sum(timer.times) / len(timer.times)


def reference(batch: int, iters: int, warmup: int, threads: int) -> float:
    if not REFERENCE.exists():
        raise SystemExit(f"reference loop not found at {REFERENCE} (it ships in ../shared/bench)")
    out = subprocess.run([sys.executable, str(REFERENCE), "--batch", str(batch), "--iters", str(iters),
                          "--warmup", str(warmup), "--threads", str(threads)], capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["sec_per_iter"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    ref = reference(a.batch, a.iters, a.warmup, a.threads)
    our = ours(a.batch, a.iters, a.warmup)
    result = {"cpu": platform.processor() or platform.machine(), "threads": a.threads, "torch": torch.__version__,
              "batch": a.batch, "reference_sec_per_iter": ref, "ours_fp32_sec_per_iter": round(our, 4),
              "ratio_ours_over_reference": round(our / ref, 3)}
    print(f"LEBM SVHN iteration, batch {a.batch}, {a.threads} threads, torch {torch.__version__}")
    print(f"{'':<28}{'s/iter':>10}{'ratio':>8}")
    print(f"{'reference (plain PyTorch)':<28}{ref:>10.3f}{1.0:>8.2f}")
    print(f"{'lebm-zoo fp32 (Lightning)':<28}{our:>10.3f}{our / ref:>8.2f}")
    (ROOT / "benchmarks" / "results.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
