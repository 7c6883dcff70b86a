"""Token sequences as the zoo's sequence models store and read them: the vocabulary, padded batches, tokenizers.

A sequence model (:class:`~lebm_zoo.SequenceLatentEBMPrior`, :class:`~lebm_zoo.LSTMLanguageModel`) keeps its
vocabulary in its checkpoint (hyperparameters ``vocab``: the token list, ``sep``: how tokens join into text), so a
checkpoint encodes and decodes strings by itself, without the data. This module is that format's one owner; the
token-sequence datamodules (``datamodules.text``, ``datamodules.molecules``) build their vocabularies and batches
with it, not the other way round.

Batches are dicts ``{"tokens": (B, T) int64, "mask": (B, T) bool}``: each row is ``<bos> w_1 ... w_n <eos>`` followed
by ``<pad>``; ``mask`` is True on ``<bos>`` .. ``<eos>``. ``T`` is the longest row of the batch. Words
(``sep=" "``) are split on whitespace; SMILES strings (``sep=""``) into atom-level tokens (:func:`tokenize_smiles`).

>>> vocab = Vocabulary.build([["a", "cat"], ["a", "dog"]])
>>> vocab.decode(vocab.encode(tokenize("a cat", vocab.sep)))
'a cat'
"""
from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from lebm_zoo.errors import DataShapeError

__all__ = ["BOS", "EOS", "PAD", "SMILES_REGEX", "SPECIALS", "UNK", "Vocabulary", "VocabularyMixin", "pad_batch",
           "tokenize", "tokenize_smiles"]

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)

#: Atom-level SMILES tokens (Schwaller et al. 2019, "Molecular Transformer"): bracket atoms as one token, two-letter
#: organic-subset atoms (Br, Cl), bonds, branches, ring closures including two-digit ``%nn``.
SMILES_REGEX = re.compile(
    r"(\[[^\]]+]|Br?|Cl?|N|O|S|P|F|I|b|c|n|o|s|p|\(|\)|\.|=|#|-|\+|\\|/|:|~|@|\?|>|\*|\$|%[0-9]{2}|[0-9])")


def tokenize_smiles(smiles: str) -> list[str]:
    """Split a SMILES string into atom-level tokens.

    Raises:
        ValueError: if the tokens do not spell the whole string (a character no SMILES token covers).
    """
    tokens = SMILES_REGEX.findall(smiles)
    if "".join(tokens) != smiles:
        raise ValueError(f"cannot tokenize SMILES {smiles!r}: characters outside the SMILES alphabet")
    return tokens


def tokenize(text: str, sep: str = " ") -> list[str]:
    """The tokens of one string for a vocabulary joined with ``sep``: ``" "`` splits words on whitespace, any other
    ``sep`` (``""``, molecules) splits SMILES with :func:`tokenize_smiles`. :meth:`Vocabulary.decode` is the inverse.

    Raises:
        ValueError: a string that is no SMILES (``sep != " "``).
    """
    return text.split() if sep == " " else tokenize_smiles(text)


class Vocabulary:
    """Token <-> index map with the special tokens ``<pad>`` = 0, ``<bos>`` = 1, ``<eos>`` = 2, ``<unk>`` = 3.

    Args:
        tokens: the ordinary tokens, in index order (they get indices 4, 5, ...); duplicates and specials are dropped.
        sep: the string that joins tokens back into text (``" "`` for words, ``""`` for SMILES).

    A vocabulary is stored in model checkpoints as the plain list :meth:`to_list` plus ``sep``; ``Vocabulary(list[4:],
    sep)`` or :meth:`from_list` rebuilds it.
    """

    def __init__(self, tokens: Iterable[str], sep: str = " "):
        self.itos: list[str] = list(SPECIALS)
        seen = set(SPECIALS)
        for t in tokens:
            if t not in seen:
                seen.add(t)
                self.itos.append(t)
        self.stoi = {t: i for i, t in enumerate(self.itos)}
        self.sep = sep

    pad_index, bos_index, eos_index, unk_index = 0, 1, 2, 3

    @classmethod
    def build(cls, sequences: Iterable[Sequence[str]], sep: str = " ", min_count: int = 1) -> Vocabulary:
        """The vocabulary of ``sequences``: tokens seen at least ``min_count`` times, most frequent first (ties in
        order of first appearance)."""
        counts = Counter(t for s in sequences for t in s)
        return cls([t for t, c in counts.most_common() if c >= min_count], sep)

    @classmethod
    def from_list(cls, itos: Sequence[str], sep: str = " ") -> Vocabulary:
        """Rebuild from :meth:`to_list` (which starts with the four specials).

        Raises:
            ValueError: if ``itos`` does not start with ``<pad> <bos> <eos> <unk>``.
        """
        if tuple(itos[:4]) != SPECIALS:
            raise ValueError(f"a stored vocabulary starts with {SPECIALS}, got {tuple(itos[:4])}")
        return cls(itos[4:], sep)

    def to_list(self) -> list[str]:
        return list(self.itos)

    def __len__(self) -> int:
        return len(self.itos)

    def __eq__(self, other) -> bool:
        return isinstance(other, Vocabulary) and self.itos == other.itos and self.sep == other.sep

    def encode(self, tokens: Sequence[str]) -> list[int]:
        """``<bos>`` + token indices (unknown tokens -> ``<unk>``) + ``<eos>``."""
        return [self.bos_index, *(self.stoi.get(t, self.unk_index) for t in tokens), self.eos_index]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of one row of indices: skips ``<bos>``/``<pad>``, stops at the first ``<eos>``, joins with ``sep``."""
        out = []
        for i in ids:
            i = int(i)
            if i == self.eos_index:
                break
            if i in (self.pad_index, self.bos_index):
                continue
            out.append(self.itos[i] if 0 <= i < len(self.itos) else UNK)
        return self.sep.join(out)

    def decode_batch(self, tokens: Tensor) -> list[str]:
        """:meth:`decode` of every row of a ``(B, T)`` index tensor."""
        return [self.decode(row) for row in tokens.tolist()]


def pad_batch(rows: Sequence[Sequence[int]], pad_index: int = 0, length: int | None = None) -> dict[str, Tensor]:
    """Pad index rows to the longest, or to ``length``: ``{"tokens": (B, T) int64, "mask": (B, T) bool}`` (True on
    real tokens).

    Raises:
        ValueError: a row longer than ``length``.
    """
    t = max(len(r) for r in rows)
    if length is not None:
        if t > length:
            raise ValueError(f"a row of {t} tokens does not fit the padded length {length}")
        t = length
    tokens = torch.full((len(rows), t), pad_index, dtype=torch.long)
    mask = torch.zeros(len(rows), t, dtype=torch.bool)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
        mask[i, : len(r)] = True
    return {"tokens": tokens, "mask": mask}


class VocabularyMixin:
    """The vocabulary of a sequence model, kept in its hyperparameters (``vocab``: list of tokens, ``sep``) so that a
    checkpoint decodes text by itself.

    When the model is built without one (``vocab=None``, as by a recipe), :meth:`setup` takes the datamodule's
    (``datamodule.vocab``, a :class:`Vocabulary`) and builds the networks then. A model with a vocabulary refuses a
    datamodule with another one.
    """

    vocab_obj = None

    def _init_vocab(self) -> None:
        if self.hparams.vocab is not None:
            self.vocab_obj = Vocabulary.from_list(self.hparams.vocab, self.hparams.sep)
            self.build_networks(len(self.vocab_obj))

    def build_networks(self, vocab_size: int) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def setup(self, stage: str) -> None:
        """Take the datamodule's vocabulary (and build the networks) or check that it equals the model's.

        Raises:
            DataShapeError: the datamodule's vocabulary differs from the model's, or neither has one.
        """
        super().setup(stage)
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        dm_vocab = getattr(dm, "vocab", None)  # Lightning has run the datamodule's setup before this one
        if self.vocab_obj is None:
            if dm_vocab is None:
                raise DataShapeError(f"{type(self).__name__} has no vocabulary: give it one (vocab=...) or train "
                                        "it with a token-sequence datamodule (datamodules.PTBDataModule, "
                                        "ZINCDataModule)")
            self.hparams.vocab, self.hparams.sep = dm_vocab.to_list(), dm_vocab.sep
            self.vocab_obj = dm_vocab
            self.build_networks(len(dm_vocab))
        elif dm_vocab is not None and dm_vocab != self.vocab_obj:
            raise DataShapeError(f"the datamodule's vocabulary ({len(dm_vocab)} tokens) differs from the model's "
                                    f"({len(self.vocab_obj)} tokens): token indices would mean other tokens. Use the "
                                    "data the model was trained on, or a new model.")

    @property
    def vocabulary(self):
        """The :class:`Vocabulary` (None before one is known)."""
        return self.vocab_obj

    def encode(self, texts: list[str]) -> dict[str, Tensor]:
        """Tokenize strings into a batch ``{"tokens": (B, T), "mask": (B, T)}`` on the model's device.

        With ``sep=" "`` (text) words are split on whitespace; with ``sep=""`` (molecules) strings are SMILES, split by
        :func:`tokenize_smiles` (see :func:`tokenize`). Unknown tokens become ``<unk>``.

        Raises:
            DataShapeError: the model has no vocabulary yet. ValueError: a string that is no SMILES (``sep=""``).
        """
        if self.vocab_obj is None:
            raise DataShapeError(f"{type(self).__name__} has no vocabulary yet")
        batch = pad_batch([self.vocab_obj.encode(tokenize(t, self.vocab_obj.sep)) for t in texts])
        return {k: v.to(self.device) for k, v in batch.items()}
