"""Operations dispatched per SVHN-recipe training iteration: the plain loop with the reference's structure against
``LatentEBMPrior`` under a Lightning Trainer (fp32, eager).

On a GPU the eager iteration is bound by kernel launches and Python, not by arithmetic (docs/speed.md), so the number of
ATen operations an iteration dispatches (forward, backward and optimiser, counted with a ``TorchDispatchMode``) is
what its eager speed follows there; it does not depend on the device or the batch, so a CPU counts it. Prints both
totals and the operations whose counts differ most.

    python benchmarks/op_count.py [--batch 2] [--iters 2] [--out benchmarks/results/op_count.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import plain_reference  # noqa: E402

from lebm_zoo import LatentEBMPrior  # noqa: E402
from lebm_zoo.callbacks import SyncEvery  # noqa: E402

#: operations that only make a new view or alias of a tensor: no kernel launch on a GPU
VIEW_OPS = frozenset({"alias", "as_strided", "detach", "expand", "permute", "reshape", "select", "slice", "squeeze",
                      "t", "transpose", "unsqueeze", "view", "_unsafe_view", "_reshape_alias", "unbind", "split"})


def kernels(per_op: dict[str, float]) -> float:
    """The operations of ``per_op`` that compute (launch kernels on a GPU): all but :data:`VIEW_OPS`."""
    return sum(n for op, n in per_op.items() if op not in VIEW_OPS)


class OpCounter(TorchDispatchMode):
    """Counts the ATen operations dispatched while it is active (by overload packet name)."""

    def __init__(self, counts: Counter):
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


class _CountSteps(pl.Callback):
    def __init__(self, warmup: int, counts: Counter):
        self.warmup, self.counts, self.mode = warmup, counts, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx >= self.warmup:
            self.mode = OpCounter(self.counts)
            self.mode.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.mode is not None:
            self.mode.__exit__(None, None, None)
            self.mode = None


def count_ours(batch: int, iters: int, warmup: int = 1, sync_every: int = 1) -> Counter:
    """ATen operations of ``iters`` LatentEBMPrior iterations (SVHN recipe's networks) under a Trainer."""
    torch.manual_seed(0)
    x = torch.rand(batch * (iters + warmup), 3, 32, 32) * 2 - 1
    counts: Counter = Counter()
    callbacks = [_CountSteps(warmup, counts)] + ([SyncEvery(sync_every)] if sync_every > 1 else [])
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=iters + warmup, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=callbacks)
    trainer.fit(LatentEBMPrior(), DataLoader(TensorDataset(x, torch.zeros(len(x))), batch_size=batch))
    return counts


def count_plain(batch: int, iters: int, warmup: int = 1) -> Counter:
    counts: Counter = Counter()
    plain_reference(batch, iters, warmup, "cpu", around=lambda: OpCounter(counts))
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="write the counts as JSON here")
    a = ap.parse_args()
    torch.set_num_threads(1)
    plain, ours = count_plain(a.batch, a.iters), count_ours(a.batch, a.iters)
    per = {k: {op: n / a.iters for op, n in c.items()} for k, c in (("plain", plain), ("ours", ours))}
    total = {k: sum(v.values()) for k, v in per.items()}
    computing = {k: kernels(v) for k, v in per.items()}
    print(f"ATen operations per iteration: plain loop {total['plain']:.0f}, lebm-zoo {total['ours']:.0f} "
          f"({total['ours'] / total['plain']:.2f}x); computing ones (not views): {computing['plain']:.0f} and "
          f"{computing['ours']:.0f} ({computing['ours'] / computing['plain']:.2f}x)")
    diff = sorted(set(per["plain"]) | set(per["ours"]),
                  key=lambda op: -abs(per["ours"].get(op, 0) - per["plain"].get(op, 0)))
    print(f"{'operation':<34}{'plain':>8}{'ours':>8}")
    for op in diff[:25]:
        print(f"{op:<34}{per['plain'].get(op, 0):>8.0f}{per['ours'].get(op, 0):>8.0f}")
    if a.out:
        a.out.write_text(json.dumps({"per_iteration": per, "total": total, "computing": computing,
                                     "torch": torch.__version__}, indent=1))


if __name__ == "__main__":
    main()
