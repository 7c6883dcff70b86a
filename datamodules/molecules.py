"""Molecules as SMILES token sequences: MOSES, ZINC250k or any SMILES file, canonicalized with RDKit.

Batches are those of :mod:`datamodules.text` (``{"tokens": (B, T), "mask": (B, T)}``); tokens are atom-level SMILES
tokens and join back into a SMILES string with ``""``.
"""
from __future__ import annotations

import csv
import gzip
import io
import re
import warnings
from pathlib import Path

import torch

from datamodules.images import DATA_DIR_FIX, _summary
from datamodules.text import SequenceDataModule, Vocabulary

__all__ = ["SMILES_REGEX", "ZINCDataModule", "canonical_smiles", "tokenize_smiles"]

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


def canonical_smiles(smiles: str) -> str | None:
    """RDKit's canonical SMILES (isomeric), or None if RDKit cannot parse it (no error, no log line)."""
    from rdkit import Chem, RDLogger

    RDLogger.DisableLog("rdApp.*")
    mol = Chem.MolFromSmiles(smiles) if smiles else None
    return None if mol is None else Chem.MolToSmiles(mol)


class ZINCDataModule(SequenceDataModule):
    """SMILES molecules for the latent EBM prior molecule model (Pang, Han, Wu 2020), from one of three sources.

    * ``source="moses"``: the MOSES benchmark CSVs in ``data_dir`` (``train.csv.gz``, ``test.csv.gz``; a ``SMILES``
      column, optionally a ``SPLIT`` column; plain ``.csv`` also read). Train: ``train.csv``; test: ``test.csv``.
    * ``source="zinc250k"``: ``250k_rndm_zinc_drugs_clean_3.csv`` in ``data_dir`` (column ``smiles``; the file users
      download for the paper's data), split at random (``seed``) into train and ``test_size`` test molecules.
    * ``source="smiles_file"``: ``data_dir`` is a file (or ``data_dir/smiles.txt``) with one SMILES per line (an
      optional header line ``SMILES``/``smiles`` is skipped), split at random as for ``zinc250k``.

    Every molecule is canonicalized with RDKit (:func:`canonical_smiles`); molecules RDKit cannot read are counted
    (:attr:`num_invalid`) and skipped with one warning, never fatal. Then: ``val_size`` training molecules (random,
    ``seed``) become the validation split; ``train_size`` (if set) keeps that many of the rest (random, ``seed``);
    the length filter ``max_length`` (in tokens) applies to every split; the vocabulary is built from the training
    tokens (:func:`tokenize_smiles`). :attr:`train_smiles` holds the training set's canonical SMILES (novelty is
    measured against it).

    Args:
        source: ``"moses"``, ``"zinc250k"`` or ``"smiles_file"``.
        data_dir: the folder (or, for ``smiles_file``, the file); ``~`` is expanded.
        batch_size, num_workers, max_length, seed: see :class:`~datamodules.text.SequenceDataModule`
            (``max_length`` default 100 tokens).
        train_size: keep this many training molecules (None: all).
        val_size: validation molecules taken from the training file.
        test_size: test molecules: a random split of the file for ``zinc250k``/``smiles_file``; for MOSES a random
            subset of its test file.

    Raises:
        ValueError: bad arguments; a split empty after filtering.
        DatasetNotFoundError: a missing or unreadable file, with the expected layout.
    """

    sep = ""
    dataset_name = "molecules"
    FILES = {"moses": ("train.csv.gz", "test.csv.gz"), "zinc250k": ("250k_rndm_zinc_drugs_clean_3.csv",),
             "smiles_file": ("smiles.txt",)}

    def __init__(self, data_dir: str, source: str = "moses", batch_size: int = 128, num_workers: int = 0,
                 max_length: int | None = 100, seed: int = 1, train_size: int | None = None, val_size: int = 1000,
                 test_size: int = 5000):
        if source not in self.FILES:
            raise ValueError(f"source must be one of {sorted(self.FILES)}, got {source!r}")
        if (train_size is not None and train_size < 1) or val_size < 0 or test_size < 1:
            raise ValueError(f"train_size must be >= 1 or None, val_size >= 0 and test_size >= 1; got {train_size}, "
                             f"{val_size}, {test_size}")
        super().__init__(data_dir, batch_size, num_workers, max_length, seed)
        self.source, self.train_size, self.val_size, self.test_size = source, train_size, val_size, test_size
        self.expected = {
            "moses": "MOSES train.csv.gz and test.csv.gz (a SMILES column) in data_dir",
            "zinc250k": "250k_rndm_zinc_drugs_clean_3.csv (a smiles column) in data_dir",
            "smiles_file": "a file with one SMILES per line (data_dir itself, or data_dir/smiles.txt)",
        }[source]
        self.num_invalid: dict[str, int] = {}
        self.train_smiles: set[str] = set()
        self._splits: dict[str, list[str]] | None = None
        self.save_hyperparameters()

    # ------------------------------------------------------------------ reading
    def _file(self, name: str) -> Path:
        if self.source == "smiles_file" and self.data_dir.is_file():
            return self.data_dir
        path = self.data_dir / name
        if not path.is_file() and name.endswith(".gz") and (self.data_dir / name[:-3]).is_file():
            return self.data_dir / name[:-3]
        return path

    def _read_column(self, path: Path, header_names: tuple[str, ...]) -> list[str]:
        if not path.is_file():
            raise self._not_found(path, "does not exist")
        try:
            raw = gzip.open(path, "rb").read() if path.suffix == ".gz" else path.read_bytes()
            text = raw.decode("utf-8")
        except (OSError, EOFError, UnicodeDecodeError) as e:
            raise self._not_found(path, f"is not readable ({_summary(e)})") from None
        if self.source == "smiles_file":
            lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
            return lines[1:] if lines and lines[0] in header_names else lines
        rows = csv.reader(io.StringIO(text))
        header = next(rows, [])
        col = next((i for i, h in enumerate(header) if h.strip() in header_names), None)
        if col is None:
            raise self._not_found(path, f"has no {' or '.join(header_names)} column (header: {header[:5]})",
                                  DATA_DIR_FIX)
        return [r[col].strip() for r in rows if len(r) > col and r[col].strip()]

    def _canonical(self, smiles: list[str], split: str) -> list[str]:
        out = []
        for s in smiles:
            c = canonical_smiles(s)
            if c is not None:
                out.append(c)
        self.num_invalid[split] = len(smiles) - len(out)
        if self.num_invalid[split]:
            warnings.warn(f"{self.dataset_name}: {self.num_invalid[split]} of {len(smiles)} {split} SMILES could not "
                          "be parsed by RDKit and were skipped", stacklevel=2)
        return out

    def _subset(self, items: list[str], n: int | None, offset: int) -> tuple[list[str], list[str]]:
        """(a random n of items, the rest), seeded."""
        if n is None or n >= len(items):
            return items, []
        perm = torch.randperm(len(items), generator=torch.Generator().manual_seed(self.seed + offset)).tolist()
        return [items[i] for i in perm[:n]], [items[i] for i in perm[n:]]

    def _read_all(self) -> dict[str, list[str]]:
        if self._splits is not None:
            return self._splits
        if self.source == "moses":
            train = self._read_column(self._file("train.csv.gz"), ("SMILES", "smiles"))
            test = self._read_column(self._file("test.csv.gz"), ("SMILES", "smiles"))
            test, _ = self._subset(test, self.test_size, 2)
        else:
            name = self.FILES[self.source][0]
            every = self._read_column(self._file(name), ("SMILES", "smiles"))
            test, train = self._subset(every, self.test_size, 2)
            if not train:
                raise ValueError(f"test_size={self.test_size} leaves no training molecule of {len(every)}")
        val, train = self._subset(train, self.val_size, 0) if self.val_size else ([], train)
        train, _ = self._subset(train, self.train_size, 1)
        self._splits = {"train": self._canonical(train, "train"), "valid": self._canonical(val, "valid"),
                        "test": self._canonical(test, "test")}
        self.train_smiles = set(self._splits["train"])
        return self._splits

    def prepare_data(self) -> None:
        """Check that the files are there (no download: MOSES and ZINC250k are fetched by the user).

        Raises:
            DatasetNotFoundError: a file is missing.
        """
        for name in self.FILES[self.source]:
            if not self._file(name).is_file():
                raise self._not_found(self._file(name), "does not exist")

    def read_split(self, split: str) -> list[list[str]]:
        return [tokenize_smiles(s) for s in self._read_all()[split]]

    def build_vocab(self, train: list[list[str]]) -> Vocabulary:
        return Vocabulary.build(train, sep="")

    @property
    def test_smiles(self) -> list[str]:
        """Canonical SMILES of the test split (the reference of the property distances)."""
        return list(self._read_all()["test"])
