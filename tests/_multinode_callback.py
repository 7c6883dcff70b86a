"""A callback for ``tests/test_multinode.py``: each rank of a multi-process run records what it saw and its weights.

The test starts ``lebm-zoo fit`` as separate processes with ``tests/`` on ``PYTHONPATH`` and adds this callback with
``--trainer.callbacks+=_multinode_callback.RecordRank --trainer.callbacks.dirpath=DIR``. Each rank writes
``DIR/rank{global_rank}.pt``: its ranks and world size, a fingerprint of every training batch it drew, and the model's
``state_dict`` at the start and at the end of training, and a draw of torch's global generator at the first batch (from
a forked state: training's stream is untouched), which is where the model's Langevin chains draw their noise.
"""
from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch


def _weights(pl_module: pl.LightningModule) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


class RecordRank(pl.Callback):
    """Write ``dirpath/rank{trainer.global_rank}.pt`` on every rank at the end of training (see the module doc)."""

    def __init__(self, dirpath: str):
        self.dirpath = Path(dirpath)
        self.initial: dict[str, torch.Tensor] = {}
        self.batches: list[float] = []
        self.noise: torch.Tensor | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.initial = _weights(pl_module)  # after the strategy set up (DDP broadcast rank 0's weights)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        self.batches.append(float(x.double().sum()))
        if self.noise is None:
            with torch.random.fork_rng(devices=[]):
                self.noise = torch.randn(8)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.dirpath.mkdir(parents=True, exist_ok=True)
        record = {"global_rank": trainer.global_rank, "world_size": trainer.world_size,
                  "node_rank": trainer.node_rank, "local_rank": trainer.local_rank, "global_step": trainer.global_step,
                  "strategy": type(trainer.strategy).__name__,
                  "environment": type(trainer.strategy.cluster_environment).__name__,
                  "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
                  "batches": self.batches, "noise": self.noise, "initial": self.initial, "final": _weights(pl_module)}
        torch.save(record, self.dirpath / f"rank{trainer.global_rank}.pt")
