"""Text metrics of a latent sequence model (Pang et al. 2020, PTB): forward and reverse perplexity, and NLL."""
from __future__ import annotations

import math
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info
from torch import Tensor
from tqdm.auto import tqdm

from lebm_zoo.checkpoint import CheckpointError, find_last_checkpoint
from lebm_zoo.models.language_model import LSTMLanguageModel
from lebm_zoo.pretrained import load_pretrained
from lebm_zoo.text import pad_batch

__all__ = ["PerplexityCallback", "train_language_model"]


def _batches(tokens: Tensor, mask: Tensor, batch_size: int, shuffle: bool = False, generator=None):
    order = torch.randperm(len(tokens), generator=generator) if shuffle else torch.arange(len(tokens))
    for i in range(0, len(tokens), batch_size):
        idx = order[i:i + batch_size]
        t = int(mask[idx].sum(1).max())
        yield {"tokens": tokens[idx, :t], "mask": mask[idx, :t]}


def train_language_model(lm, tokens: Tensor, mask: Tensor, epochs: int, batch_size: int = 32, seed: int = 0,
                         grad_clip: float = 5.0, progress: bool = True):
    """Train an :class:`~lebm_zoo.LSTMLanguageModel` in place on token rows (Adam at its ``lr``, clipping), no Trainer.

    Args:
        lm: the language model (its networks built, i.e. with a vocabulary).
        tokens, mask: ``(N, T)`` rows in the :mod:`lebm_zoo.text` layout.
        epochs: passes over the rows (shuffled with ``seed``).

    Returns:
        the model, in eval mode.
    """
    opt = lm.configure_optimizers()
    g = torch.Generator().manual_seed(seed)
    lm.train()
    n_batches = math.ceil(len(tokens) / batch_size)
    with torch.enable_grad(), torch.inference_mode(False):
        for epoch in range(epochs):
            bar = tqdm(_batches(tokens, mask, batch_size, True, g), total=n_batches, disable=not progress,
                       desc=f"RPPL language model, epoch {epoch + 1}/{epochs}", leave=False)
            for batch in bar:
                loss = lm._loss({k: v.to(lm.device).clone() for k, v in batch.items()})  # normal tensors
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(lm.parameters(), grad_clip)
                opt.step()
    return lm.eval()


class PerplexityCallback(pl.Callback):
    """FPPL, RPPL and NLL of a :class:`~lebm_zoo.SequenceLatentEBMPrior` at test (the LEBM paper's PTB metrics).

    On the test split of a token datamodule (e.g. :class:`~datamodules.PTBDataModule`):

    * **NLL** (``test/nll``, nats per sentence, lower is better): ``-log p(x)`` averaged over the first
      ``nll_sentences`` test sentences, each estimated with :meth:`SequenceLatentEBMPrior.log_marginal` (defensive
      importance sampling, ``nll_samples`` proposals, log Z(a) from ``log_z_samples`` reference draws). Also
      ``test/nll_ppl`` = exp(total NLL / total predicted tokens).
    * **FPPL** (``test/fppl``, forward perplexity): ``num_samples`` sentences are sampled from the model (prior
      Langevin, decoding at the model's ``temperature``) and scored by the real-data language model loaded from
      ``lm_path`` (an :class:`~lebm_zoo.LSTMLanguageModel` checkpoint, e.g. of the ``ptb_lm`` recipe): exp(total NLL /
      total tokens). Measures fluency; greedy, repetitive samples score well on it.
    * **RPPL** (``test/rppl``, reverse perplexity): a fresh language model with the hyperparameters of the ``lm_path``
      model is trained on the samples for ``rppl_epochs`` and scores the real test split. Measures coverage.

    The samples are written to ``<log_dir>/samples.txt`` (one sentence per line), and the energy along one prior
    Langevin chain batch to ``<log_dir>/prior_chain_energy.png`` (the mean of ``E(z) + ||z||^2/2`` per step).
    Random: seeded with ``seed``. Meant for a single device (under DDP every rank would compute the metrics on its own
    share of the test split).

    Args:
        lm_path: the real-data language model: a checkpoint file, a run folder, a name from
            :func:`lebm_zoo.list_pretrained` (``"ptb-lm"``, shipped), or a recipe name (default ``"ptb_lm"``: the
            newest ``last.ckpt`` of that recipe under the run folder or the current folder, else the shipped model of
            the same name with a hyphen, ``ptb-lm``). None skips FPPL and RPPL, with a message.
        num_samples: sentences sampled for FPPL and RPPL.
        rppl_epochs: training epochs of the reverse language model (0: RPPL skipped).
        nll_sentences: test sentences used for NLL (None: all; 0: NLL skipped).
        nll_samples: importance samples per sentence.
        log_z_samples: reference samples for log Z(a).
        batch_size: sentences per batch when sampling and training the reverse LM.
        seed: seed of sampling and of the reverse LM's training.

    Raises:
        TypeError: at setup, for a model without ``sample_tokens`` / ``log_marginal``.
        lebm_zoo.CheckpointError: ``lm_path`` is missing or not a language model checkpoint.
        ValueError: the language model's vocabulary differs from the model's.
    """

    def __init__(self, lm_path: str | None = "ptb_lm", num_samples: int = 10_000, rppl_epochs: int = 5,
                 nll_sentences: int | None = None, nll_samples: int = 100, log_z_samples: int = 100_000,
                 batch_size: int = 100, seed: int = 0):
        if num_samples < 1 or rppl_epochs < 0 or nll_samples < 1 or log_z_samples < 1 or batch_size < 1:
            raise ValueError("num_samples, nll_samples, log_z_samples and batch_size must be >= 1, rppl_epochs >= 0")
        self.lm_path = lm_path
        self.num_samples, self.rppl_epochs = num_samples, rppl_epochs
        self.nll_sentences, self.nll_samples, self.log_z_samples = nll_sentences, nll_samples, log_z_samples
        self.batch_size, self.seed = batch_size, seed
        self.results: dict[str, float] = {}
        self._real: list[dict[str, Tensor]] = []
        self._nll_sum, self._nll_tokens, self._nll_count = 0.0, 0, 0
        self._log_z: Tensor | None = None
        self._lm_file: Path | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for name in ("sample_tokens", "log_marginal"):
            if not callable(getattr(pl_module, name, None)):
                raise TypeError(f"PerplexityCallback needs a sequence model with {name}() "
                                f"(e.g. SequenceLatentEBMPrior); {type(pl_module).__name__} has none")
        self._lm_file = None
        if stage == "test" and self.lm_path is not None:
            self._lm_file = self.resolve_lm_path(trainer)  # fail before the long test pass, not after it

    def resolve_lm_path(self, trainer: pl.Trainer) -> Path | str:
        """``lm_path`` as something :func:`~lebm_zoo.load_pretrained` reads: the file if it exists, a shipped model's
        name, else the newest ``last.ckpt`` written by the recipe of that name under ``trainer.default_root_dir`` or
        the current folder, else the shipped model named like the recipe (``ptb_lm`` -> ``ptb-lm``).

        Raises:
            lebm_zoo.CheckpointError: nothing found.
        """
        from lebm_zoo.pretrained import list_pretrained

        path = Path(self.lm_path).expanduser()
        if path.exists():
            return path
        shipped = {e.name for e in list_pretrained()}
        if self.lm_path in shipped:
            return self.lm_path
        for root in dict.fromkeys([Path(trainer.default_root_dir).resolve(), Path.cwd()]):
            found = find_last_checkpoint(root, self.lm_path)
            if found is not None:
                return found
        if self.lm_path.replace("_", "-") in shipped:
            name = self.lm_path.replace("_", "-")
            rank_zero_info(f"PerplexityCallback: no run of the {self.lm_path} recipe here; using the shipped {name}")
            return name
        raise CheckpointError(f"PerplexityCallback: lm_path {self.lm_path!r} is neither a file nor the name of a "
                              f"recipe with a last.ckpt under {Path.cwd()}: train `lebm-zoo fit --recipe ptb_lm` "
                              "first, or pass --trainer.callbacks.init_args.lm_path PATH")

    def _load_lm(self, trainer, pl_module):
        path = self._lm_file or self.resolve_lm_path(trainer)
        rank_zero_info(f"PerplexityCallback: real-data language model {path}")
        lm = load_pretrained(str(path), map_location=pl_module.device, expected_class=LSTMLanguageModel)
        if lm.vocab_obj != pl_module.vocab_obj:
            raise ValueError(f"the language model {self.lm_path} has another vocabulary ({len(lm.vocab_obj)} tokens) "
                             f"than the model ({len(pl_module.vocab_obj)}): train it on the same data")
        return lm

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self.results = {}
        self._real = []
        self._nll_sum, self._nll_tokens, self._nll_count = 0.0, 0, 0
        self._log_z = None
        if self.nll_sentences != 0:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                self._log_z = pl_module.log_normalizer(self.log_z_samples)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        batch = {k: batch[k].detach().cpu() for k in ("tokens", "mask")}
        self._real.append(batch)
        room = math.inf if self.nll_sentences is None else self.nll_sentences - self._nll_count
        if room <= 0:
            return
        part = {k: v[: int(min(room, len(v)))] for k, v in batch.items()}
        log_px = pl_module.log_marginal(part, n_samples=self.nll_samples, log_z=self._log_z)
        self._nll_sum -= float(log_px.sum())
        self._nll_tokens += int(part["mask"][:, 1:].sum())
        self._nll_count += len(log_px)

    @torch.no_grad()
    def _sample(self, pl_module) -> tuple[Tensor, Tensor]:
        rows = []
        with torch.random.fork_rng(devices=[pl_module.device] if pl_module.device.type == "cuda" else []):
            torch.manual_seed(self.seed)
            for i in tqdm(range(0, self.num_samples, self.batch_size), desc="sampling sentences", leave=False):
                out = pl_module.sample_tokens(min(self.batch_size, self.num_samples - i))
                rows.extend(r[m].tolist() for r, m in zip(out["tokens"].cpu(), out["mask"].cpu()))
        batch = pad_batch(rows)
        return batch["tokens"], batch["mask"]

    def _plot_chain(self, pl_module, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            _, trace = pl_module.sample_latent(self.batch_size, return_trace=True)
        energy = (-trace["log_prob"]).cpu().numpy()
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.plot(range(len(energy)), energy)
        ax.set_xlabel("prior Langevin step")
        ax.set_ylabel(r"mean $E(z) + \|z\|^2/2$")
        ax.set_title(f"prior chain from N(0, I), {self.batch_size} chains")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        out_dir = Path(trainer.log_dir or ".")
        out_dir.mkdir(parents=True, exist_ok=True)
        if self._nll_count:
            self.results["nll"] = self._nll_sum / self._nll_count
            self.results["nll_ppl"] = math.exp(self._nll_sum / max(self._nll_tokens, 1))
        if pl_module.is_ebm:
            self._plot_chain(pl_module, out_dir / "prior_chain_energy.png")
        if self.lm_path is None:
            rank_zero_info("PerplexityCallback: no lm_path (a checkpoint of the ptb_lm recipe), so FPPL and RPPL are "
                           "skipped")
        else:
            lm = self._load_lm(trainer, pl_module)
            tokens, mask = self._sample(pl_module)
            (out_dir / "samples.txt").write_text("\n".join(pl_module.decode(tokens)) + "\n")
            self.results["fppl"] = lm.perplexity(
                {k: v.to(lm.device) for k, v in b.items()} for b in _batches(tokens, mask, self.batch_size))
            if self.rppl_epochs:
                with torch.random.fork_rng(devices=[]), torch.inference_mode(False):  # test runs in inference mode
                    torch.manual_seed(self.seed)
                    hp = {k: v for k, v in lm.hparams.items() if k != "vocab"}
                    reverse = LSTMLanguageModel(vocab=lm.hparams.vocab, **hp).to(lm.device)
                    train_language_model(reverse, tokens, mask, self.rppl_epochs, seed=self.seed)
                self.results["rppl"] = reverse.perplexity(
                    {k: v.to(lm.device) for k, v in b.items()} for b in self._real)
        for k, v in self.results.items():
            pl_module.log(f"test/{k}", float(v))
