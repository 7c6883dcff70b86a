"""Shared pieces of the reference-equivalence tests (tests/test_reference_*.py)."""
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset


class Recorder:
    """Wraps torch.randn / torch.randn_like: records every draw our step makes, in order."""

    def __init__(self, monkeypatch):
        self.draws = []
        randn, randn_like = torch.randn, torch.randn_like

        def rec_randn(*a, **k):
            t = randn(*a, **k)
            self.draws.append(t.detach().clone())
            return t

        def rec_like(x, *a, **k):
            t = randn_like(x, *a, **k)
            self.draws.append(t.detach().clone())
            return t

        monkeypatch.setattr(torch, "randn", rec_randn)
        monkeypatch.setattr(torch, "randn_like", rec_like)


class KeepMetrics(pl.Callback):
    """The logged metrics right after the training batch, as floats."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}


def fit_one_float64_step(model, x, tmp_path, monkeypatch):
    """One training iteration of ``model`` on the batch ``x`` through Lightning at float64, recording the random
    draws. Returns (draws, logged metrics). ``x`` must be exactly representable in float32 (the loader may cast); a
    tuple ``x`` is one whole batch, handed to the model as it is."""
    rec = Recorder(monkeypatch)
    keep = KeepMetrics()
    t = pl.Trainer(accelerator="cpu", precision="64-true", max_steps=1, logger=False, enable_progress_bar=False,
                   enable_model_summary=False, enable_checkpointing=False, callbacks=[keep],
                   default_root_dir=tmp_path)
    loader = (DataLoader([x], batch_size=None) if isinstance(x, tuple)
              else DataLoader(TensorDataset(x.float()), batch_size=x.shape[0]))
    t.fit(model, loader)
    monkeypatch.undo()
    return rec.draws, keep.metrics
