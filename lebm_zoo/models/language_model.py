"""A word-level LSTM language model: the scorer behind forward and reverse perplexity (LEBM text metrics).

Forward perplexity (FPPL) scores a generative model's samples with an LM trained on real text; reverse perplexity
(RPPL) trains an LM of the same size on the samples and scores the real test set (Zhao et al. 2018, "Adversarially
Regularized Autoencoders"; used by Pang et al. 2020 for PTB).
"""
from __future__ import annotations

import math

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.text import Perplexity

from lebm_zoo.checkpoint import check_model_class, write_record
from lebm_zoo.errors import DataShapeError
from lebm_zoo.models.registry import register_family
from lebm_zoo.nets import SequenceDecoder
from lebm_zoo.pretrained import PretrainedMixin
from lebm_zoo.text import VocabularyMixin
from lebm_zoo.utils import check_count, check_tokens

__all__ = ["LSTMLanguageModel"]


@register_family(tiny={
    "LSTMLanguageModel": dict(vocab=["<pad>", "<bos>", "<eos>", "<unk>", "a", "b", "c"], emb_dim=8, hidden=8),
})
class LSTMLanguageModel(VocabularyMixin, PretrainedMixin, pl.LightningModule):
    """LSTM language model p(x) = prod_t p(x_t | x_<t) on token batches (:mod:`lebm_zoo.text`).

    Trained by cross-entropy with Adam; validation and test log the perplexity ``exp(total NLL / total tokens)``
    over every predicted token (``x_1 .. <eos>``, padding ignored; torchmetrics ``Perplexity``) as ``val/ppl`` and
    ``test/ppl``.

    Args:
        vocab, sep: the vocabulary (None: the datamodule's at ``setup``); see :class:`~lebm_zoo.SequenceLatentEBMPrior`.
        emb_dim, hidden, num_layers, dropout: the LSTM (:class:`~lebm_zoo.nets.SequenceDecoder` with ``nz=0``).
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
    """

    #: hyperparameters a resumed run may change (the others come from the checkpoint)
    resume_hparams = ("lr",)

    def __init__(self, vocab: list[str] | None = None, sep: str = " ", emb_dim: int = 256, hidden: int = 256,
                 num_layers: int = 1, dropout: float = 0.3, lr: float = 1e-3, weight_decay: float = 0.0):
        super().__init__()
        self.save_hyperparameters()
        self.decoder: SequenceDecoder | None = None
        self.val_ppl = Perplexity(ignore_index=0)
        self.test_ppl = Perplexity(ignore_index=0)
        self.recipe: str | None = None
        self._init_vocab()

    def build_networks(self, vocab_size: int) -> None:
        hp = self.hparams
        self.decoder = SequenceDecoder(vocab_size, 0, hp.emb_dim, hp.hidden, hp.num_layers, hp.dropout)

    @staticmethod
    def _check(batch) -> dict[str, Tensor]:
        if not (isinstance(batch, dict) and "tokens" in batch and "mask" in batch):
            raise DataShapeError("LSTMLanguageModel trains on token batches {'tokens': (B, T), 'mask': (B, T)} "
                                 f"(datamodules.PTBDataModule); got {type(batch).__name__}")
        return batch

    def forward(self, tokens: Tensor) -> Tensor:
        """Next-token logits ``(B, T, V)`` of input tokens ``(B, T)``."""
        return self.decoder(tokens)[0]

    def log_prob(self, batch) -> Tensor:
        """log p(x) of each sequence, ``(B,)`` nats (``x_1 .. <eos>`` given ``<bos>``); strings are accepted.

        Raises:
            DataShapeError: no vocabulary yet, or a token batch that is not ``{"tokens": (B, T) integers in
                [0, vocabulary size), "mask": (B, T) bool}`` (:func:`~lebm_zoo.utils.check_tokens`; one host sync).
        """
        where = f"{type(self).__name__}.log_prob"
        if self.vocab_obj is None:
            raise DataShapeError(f"{where}: the model has no vocabulary yet: build it with vocab=... or train it first")
        if isinstance(batch, (list, tuple)):
            if not batch:
                raise DataShapeError(f"{where}: got an empty list of strings: give at least one")
            batch = self.encode(list(batch))
        else:
            batch = self._check(batch)
            check_tokens(batch["tokens"], len(self.vocab_obj), batch["mask"], where=where)
        return self.decoder.log_likelihood(batch["tokens"].to(self.device), batch["mask"].to(self.device))

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, max_length: int = 60) -> list[str]:
        """Draw ``n`` texts by ancestral sampling from ``<bos>`` (at most ``max_length`` tokens, ``<eos>`` included;
        ``temperature`` 0 decodes greedily). Returns ``n`` strings, tokens joined with ``sep``.

        Raises:
            ValueError: ``n`` < 1 or not an integer, a negative temperature. DataShapeError: no vocabulary yet.
        """
        n = check_count(n, where=f"{type(self).__name__}.sample")
        if self.vocab_obj is None:
            raise DataShapeError(f"{type(self).__name__}.sample: the model has no vocabulary yet: build it with "
                                 "vocab=... or train it first")
        tokens, _ = self.decoder.generate(None, n, max_length, bos=self.vocab_obj.bos_index,
                                          eos=self.vocab_obj.eos_index, temperature=temperature)
        return self.vocab_obj.decode_batch(tokens)

    def _loss(self, batch) -> Tensor:
        batch = self._check(batch)
        logits = self(batch["tokens"][:, :-1])
        target = batch["tokens"][:, 1:].masked_fill(~batch["mask"][:, 1:], 0)
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=0)

    def training_step(self, batch, batch_idx: int) -> Tensor:
        loss = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["tokens"].shape[0])
        return loss

    def _eval(self, batch, metric: Perplexity, split: str) -> None:
        batch = self._check(batch)
        logits = self(batch["tokens"][:, :-1]).float()
        target = batch["tokens"][:, 1:].masked_fill(~batch["mask"][:, 1:], 0)
        metric.update(logits, target)
        self.log(f"{split}/ppl", metric, prog_bar=split == "val", batch_size=batch["tokens"].shape[0])

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval(batch, self.val_ppl, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval(batch, self.test_ppl, "test")

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """The same lebm-zoo record as the zoo's models (:func:`lebm_zoo.checkpoint.write_record`: class path,
        version, recipe), so ``load_pretrained`` and the CLI accept it."""
        write_record(checkpoint, self)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Refuse a checkpoint of another model class (:func:`lebm_zoo.checkpoint.check_model_class`)."""
        check_model_class(checkpoint, self)

    @torch.no_grad()
    def perplexity(self, batches) -> float:
        """Perplexity ``exp(sum NLL / number of predicted tokens)`` over an iterable of token batches (eval mode)."""
        was_training = self.training
        self.eval()
        nll, count = 0.0, 0
        for batch in batches:
            nll -= float(self.log_prob(batch).sum())
            count += int(batch["mask"][:, 1:].sum())
        self.train(was_training)
        return math.exp(nll / max(count, 1))
