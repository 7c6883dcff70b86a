"""Molecules as SMILES token sequences: MOSES, ZINC250k or any SMILES file, canonicalized with RDKit.

Batches are those of :mod:`datamodules.text` (``{"tokens": (B, T), "mask": (B, T)}``); tokens are atom-level SMILES
tokens and join back into a SMILES string with ``""``. The SMILES tokenizer is the models' (:mod:`lebm_zoo.text`);
``SMILES_REGEX`` and ``tokenize_smiles`` are re-exported here.
"""
from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import multiprocessing
import os
import tempfile
import warnings
import zlib
from collections.abc import Iterator
from concurrent.futures import Executor, ProcessPoolExecutor
from pathlib import Path

import torch
from pytorch_lightning.utilities import rank_zero_info
from tqdm.auto import tqdm

from datamodules.base import DATA_DIR_FIX, summary
from datamodules.text import SequenceDataModule
from lebm_zoo.text import SMILES_REGEX, Vocabulary, tokenize_smiles

__all__ = ["SMILES_REGEX", "ZINCDataModule", "canonical_smiles", "default_molecules_cache_dir", "tokenize_smiles"]

#: Version of the prepared-splits cache (part of its key): bump it when reading, splitting or canonicalizing changes.
CACHE_VERSION = 1
_CACHE_FORMAT = "lebm_zoo.molecules.prepared_splits"
_SPLITS = ("train", "valid", "test")
_LABELS = {"moses": "MOSES", "zinc250k": "ZINC250k", "smiles_file": "SMILES file"}


def canonical_smiles(smiles: str) -> str | None:
    """RDKit's canonical SMILES (isomeric), or None if RDKit cannot parse it (no error, no log line)."""
    from rdkit import Chem, RDLogger

    RDLogger.DisableLog("rdApp.*")
    mol = Chem.MolFromSmiles(smiles) if smiles else None
    return None if mol is None else Chem.MolToSmiles(mol)


def _canonical_chunk(chunk: list[str]) -> list[str | None]:
    """:func:`canonical_smiles` of each string of ``chunk`` (RDKit's log disabled once per chunk); runs in the
    canonicalization worker processes too."""
    from rdkit import Chem, RDLogger

    RDLogger.DisableLog("rdApp.*")
    out: list[str | None] = []
    for s in chunk:
        mol = Chem.MolFromSmiles(s) if s else None
        out.append(None if mol is None else Chem.MolToSmiles(mol))
    return out


def _disable_rdkit_log() -> None:  # initializer of the worker processes
    from rdkit import RDLogger

    RDLogger.DisableLog("rdApp.*")


def default_molecules_cache_dir() -> Path:
    """Folder of the prepared-splits cache: ``$LEBM_ZOO_CACHE/molecules`` if ``LEBM_ZOO_CACHE`` is set, else
    ``~/.cache/lebm_zoo/molecules`` (the root rule of the FID statistics cache, ``lebm_zoo.callbacks.fid``)."""
    root = os.environ.get("LEBM_ZOO_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "lebm_zoo") / "molecules"


def _sha256(path: Path, block: int = 1 << 20) -> str:
    """sha256 of the file's bytes, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


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
    measured against it). (The subsets are drawn from the raw strings; only the chosen molecules are canonicalized.)

    **Cache of the prepared splits.** Canonicalizing takes minutes on MOSES (1.6 million molecules), so the result
    (the canonical SMILES of train / valid / test after the subset selection, and the invalid counts) is stored on
    disk and the next ``setup`` with the same files and options reads it in seconds (logging ``loaded prepared splits
    from <path>``). While it is built, a progress bar shows each split's canonicalization, which runs in
    ``num_workers`` processes (the order and the result do not depend on their number).

    * Where: ``cache_dir``, by default ``$LEBM_ZOO_CACHE/molecules`` if ``LEBM_ZOO_CACHE`` is set, else
      ``~/.cache/lebm_zoo/molecules`` (:func:`default_molecules_cache_dir`; the same root as the FID statistics
      cache); one gzip'd JSON file ``<source>-<key>.json.gz`` per key. Deleting the folder clears the cache.
    * Key: the sha256 of the source files' bytes (and their names), ``source``, ``val_size``, ``train_size``,
      ``test_size``, ``seed``, :data:`CACHE_VERSION`, and the RDKit version (canonical SMILES can change between
      RDKit releases) and torch version (torch draws the subsets). Changing any of them misses the cache and builds
      a new file. ``max_length`` is not part of it: the length filter runs on every ``setup``, after the cache.
    * Files are written atomically (a temporary file in the same folder, then renamed into place), so a crash or a
      concurrent run never leaves a half-written cache; a cache file that cannot be read or belongs to other data
      is ignored with a warning and rebuilt; a cache that cannot be written is a warning, never an error.
    * ``cache=False`` (command line ``--data.cache false``) neither reads nor writes it.

    Args:
        source: ``"moses"``, ``"zinc250k"`` or ``"smiles_file"``.
        data_dir: the folder (or, for ``smiles_file``, the file); ``~`` is expanded.
        batch_size, max_length, seed, pad_to: see :class:`~datamodules.text.SequenceDataModule` (``max_length``
            default 100 tokens).
        num_workers: DataLoader worker processes, and the processes that canonicalize the SMILES when the cache
            misses (0 or 1: in this process).
        train_size: keep this many training molecules (None: all).
        val_size: validation molecules taken from the training file.
        test_size: test molecules: a random split of the file for ``zinc250k``/``smiles_file``; for MOSES a random
            subset of its test file.
        cache: read and write the prepared-splits cache (False: neither; every ``setup`` canonicalizes again).
        cache_dir: folder of the prepared-splits cache (None: :func:`default_molecules_cache_dir`); ``~`` is expanded.

    Attributes:
        num_invalid: molecules RDKit could not read, per split, after ``setup``.
        train_smiles: the training split's canonical SMILES (a set), after ``setup``.
        cache_file: the cache file of these files and options after ``setup`` (None when ``cache`` is false).
        splits_from_cache: True when ``setup`` read the splits from :attr:`cache_file`.

    Raises:
        ValueError: bad arguments; a split empty after filtering.
        DatasetNotFoundError: a missing or unreadable file, with the expected layout.
    """

    sep = ""
    dataset_name = "molecules"
    FILES = {"moses": ("train.csv.gz", "test.csv.gz"), "zinc250k": ("250k_rndm_zinc_drugs_clean_3.csv",),
             "smiles_file": ("smiles.txt",)}
    #: SMILES per canonicalization task (one progress-bar step); a split of at most this many stays in-process.
    canonical_chunksize = 4096

    def __init__(self, data_dir: str, source: str = "moses", batch_size: int = 128, num_workers: int = 0,
                 max_length: int | None = 100, seed: int = 1, train_size: int | None = None, val_size: int = 1000,
                 test_size: int = 5000, cache: bool = True, cache_dir: str | None = None, pad_to: int | None = None):
        if source not in self.FILES:
            raise ValueError(f"source must be one of {sorted(self.FILES)}, got {source!r}")
        if (train_size is not None and train_size < 1) or val_size < 0 or test_size < 1:
            raise ValueError(f"train_size must be >= 1 or None, val_size >= 0 and test_size >= 1; got {train_size}, "
                             f"{val_size}, {test_size}")
        super().__init__(data_dir, batch_size, num_workers, max_length, seed, pad_to)
        self.source, self.train_size, self.val_size, self.test_size = source, train_size, val_size, test_size
        self.cache = cache
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else None  # None: the default, resolved in setup
        self.expected = {
            "moses": "MOSES train.csv.gz and test.csv.gz (a SMILES column) in data_dir",
            "zinc250k": "250k_rndm_zinc_drugs_clean_3.csv (a smiles column) in data_dir",
            "smiles_file": "a file with one SMILES per line (data_dir itself, or data_dir/smiles.txt)",
        }[source]
        self.num_invalid: dict[str, int] = {}
        self.train_smiles: set[str] = set()
        self.cache_file: Path | None = None
        self.splits_from_cache = False
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

    def _source_files(self) -> dict[str, Path]:
        """The files the splits are read from, by role (MOSES: ``train``, ``test``; else ``all``)."""
        if self.source == "moses":
            return {"train": self._file("train.csv.gz"), "test": self._file("test.csv.gz")}
        return {"all": self._file(self.FILES[self.source][0])}

    def _read_column(self, path: Path, header_names: tuple[str, ...]) -> list[str]:
        if not path.is_file():
            raise self._not_found(path, "does not exist")
        try:
            raw = gzip.open(path, "rb").read() if path.suffix == ".gz" else path.read_bytes()
            text = raw.decode("utf-8")
        except (OSError, EOFError, UnicodeDecodeError) as e:
            raise self._not_found(path, f"is not readable ({summary(e)})") from None
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

    @property
    def _label(self) -> str:
        return _LABELS[self.source]

    def _show_bar(self) -> bool:
        trainer = getattr(self, "trainer", None)
        return trainer is None or (trainer.is_global_zero and trainer.progress_bar_callback is not None)

    def _canonical(self, smiles: list[str], split: str, executor: Executor | None = None) -> list[str]:
        """The canonical SMILES of ``smiles`` that RDKit reads, in order; chunks go to ``executor`` if given."""
        n = max(int(self.canonical_chunksize), 1)
        chunks = [smiles[i:i + n] for i in range(0, len(smiles), n)]
        parallel = executor is not None and len(chunks) > 1
        results: Iterator[list[str | None]] = (executor.map(_canonical_chunk, chunks) if parallel
                                               else map(_canonical_chunk, chunks))
        out: list[str] = []
        with tqdm(total=len(smiles), desc=f"{self._label} {split}: canonicalizing SMILES", unit="mol",
                  leave=False, disable=not self._show_bar()) as bar:
            for chunk, canon in zip(chunks, results):
                out.extend(c for c in canon if c is not None)
                bar.update(len(chunk))
        return out

    def _warn_invalid(self, split: str, num_read: int) -> None:
        if self.num_invalid[split]:
            warnings.warn(f"{self.dataset_name}: {self.num_invalid[split]} of {num_read} {split} SMILES could not "
                          "be parsed by RDKit and were skipped", stacklevel=3)

    def _subset(self, items: list[str], n: int | None, offset: int) -> tuple[list[str], list[str]]:
        """(a random n of items, the rest), seeded."""
        if n is None or n >= len(items):
            return items, []
        perm = torch.randperm(len(items), generator=torch.Generator().manual_seed(self.seed + offset)).tolist()
        return [items[i] for i in perm[:n]], [items[i] for i in perm[n:]]

    def _prepare(self, files: dict[str, Path]) -> tuple[dict[str, list[str]], dict[str, int]]:
        """Read, choose the subsets, canonicalize: (canonical SMILES per split, raw strings read per split)."""
        if self.source == "moses":
            train = self._read_column(files["train"], ("SMILES", "smiles"))
            test = self._read_column(files["test"], ("SMILES", "smiles"))
            test, _ = self._subset(test, self.test_size, 2)
        else:
            every = self._read_column(files["all"], ("SMILES", "smiles"))
            test, train = self._subset(every, self.test_size, 2)
            if not train:
                raise ValueError(f"test_size={self.test_size} leaves no training molecule of {len(every)}")
        val, train = self._subset(train, self.val_size, 0) if self.val_size else ([], train)
        train, _ = self._subset(train, self.train_size, 1)
        raw = {"train": train, "valid": val, "test": test}
        total = sum(map(len, raw.values()))
        workers = self.num_workers if self.num_workers > 1 and total > self.canonical_chunksize else 0
        rank_zero_info(f"{self._label}: preparing the splits: canonicalizing {total:,} SMILES with RDKit "
                       f"({workers or 1} process{'es' if workers > 1 else ''})")
        executor = None
        if workers:
            executor = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(),
                                           initializer=_disable_rdkit_log)
        try:
            splits = {name: self._canonical(smiles, name, executor) for name, smiles in raw.items()}
        finally:
            if executor is not None:
                executor.shutdown(wait=True, cancel_futures=True)
        return splits, {name: len(smiles) for name, smiles in raw.items()}

    # ------------------------------------------------------------------ the prepared-splits cache
    def _cache_key(self, files: dict[str, Path]) -> tuple[str, dict]:
        """(hex key, the fields it hashes): the files' sha256 and every option that changes the prepared splits."""
        import rdkit

        digests = {}
        for role, path in files.items():
            try:
                digests[role] = {"name": path.name, "sha256": _sha256(path)}
            except OSError as e:
                raise self._not_found(path, f"is not readable ({summary(e)})") from None
        fields = {"cache_version": CACHE_VERSION, "source": self.source, "files": digests, "seed": self.seed,
                  "val_size": self.val_size, "train_size": self.train_size, "test_size": self.test_size,
                  "rdkit": rdkit.__version__, "torch": torch.__version__.split("+")[0]}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest(), fields

    @staticmethod
    def _cache_problem(doc, key: str) -> str | None:
        """Why ``doc`` (a decoded cache file) cannot be used for ``key``; None if it can."""
        if not isinstance(doc, dict) or doc.get("format") != _CACHE_FORMAT:
            return "not a prepared-splits cache file"
        if doc.get("key") != key:
            return "written for other files or options"
        splits, num_read, num_invalid = doc.get("splits"), doc.get("num_read"), doc.get("num_invalid")
        if not all(isinstance(d, dict) and sorted(d) == sorted(_SPLITS) for d in (splits, num_read, num_invalid)):
            return "incomplete"
        for s in _SPLITS:
            if not (isinstance(splits[s], list) and all(isinstance(x, str) for x in splits[s])
                    and isinstance(num_read[s], int) and isinstance(num_invalid[s], int)
                    and num_read[s] - len(splits[s]) == num_invalid[s] >= 0):
                return f"inconsistent {s} split"
        return None

    def _load_cache(self, path: Path, key: str) -> tuple[dict[str, list[str]], dict[str, int]] | None:
        """The cached (splits, num_read), or None (absent; unreadable or foreign: with a warning)."""
        if not path.is_file():
            return None
        try:
            with gzip.open(path, "rb") as f:
                doc = json.loads(f.read())
            problem = self._cache_problem(doc, key)
        except (OSError, EOFError, zlib.error, ValueError, RecursionError) as e:
            problem = f"unreadable: {summary(e)}"
        if problem:
            warnings.warn(f"{self.dataset_name}: ignoring the prepared-splits cache {path} ({problem}); preparing "
                          "the splits again", stacklevel=3)
            return None
        return doc["splits"], doc["num_read"]

    def _save_cache(self, path: Path, key: str, fields: dict, splits: dict[str, list[str]],
                    num_read: dict[str, int]) -> None:
        """Write the cache file atomically (temporary file in the same folder + rename); failures only warn."""
        doc = {"format": _CACHE_FORMAT, "key": key, "key_fields": fields, "num_read": num_read,
               "num_invalid": {s: num_read[s] - len(splits[s]) for s in _SPLITS}, "splits": splits}
        tmp = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            os.fchmod(fd, 0o644)  # mkstemp's 0600 would keep others of a shared cache folder from reading it
            with os.fdopen(fd, "wb") as raw:
                with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6, mtime=0) as gz:
                    gz.write(json.dumps(doc, separators=(",", ":")).encode("utf-8"))
                raw.flush()
                os.fsync(raw.fileno())
            os.replace(tmp, path)
            tmp = None
            rank_zero_info(f"{self._label}: wrote prepared splits to {path}")
        except OSError as e:
            warnings.warn(f"{self.dataset_name}: could not write the prepared-splits cache {path} ({summary(e)}); "
                          "the next run prepares the splits again", stacklevel=3)
        finally:
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass

    def _read_all(self) -> dict[str, list[str]]:
        if self._splits is not None:
            return self._splits
        files = self._source_files()
        for path in files.values():
            if not path.is_file():
                raise self._not_found(path, "does not exist")
        loaded = key = fields = None
        self.cache_file, self.splits_from_cache = None, False
        if self.cache:
            key, fields = self._cache_key(files)  # hashed once per setup: _splits memoizes the rest
            self.cache_file = (self.cache_dir or default_molecules_cache_dir()) / f"{self.source}-{key[:24]}.json.gz"
            loaded = self._load_cache(self.cache_file, key)
        if loaded is not None:
            self.splits_from_cache = True
            rank_zero_info(f"{self._label}: loaded prepared splits from {self.cache_file}")
            splits, num_read = loaded
        else:
            splits, num_read = self._prepare(files)
            if self.cache:
                self._save_cache(self.cache_file, key, fields, splits, num_read)
        self.num_invalid = {s: num_read[s] - len(splits[s]) for s in _SPLITS}
        for s in _SPLITS:
            self._warn_invalid(s, num_read[s])
        self._splits = splits
        self.train_smiles = set(splits["train"])
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

    def empty_train_reason(self) -> str:
        files = self._source_files()
        source = files.get("train", files.get("all"))
        raw_train = self.num_invalid.get("train", 0)  # none of them parsed
        raw_valid = self.num_invalid.get("valid", 0) + len(self._splits["valid"])
        if raw_train + raw_valid == 0:
            return f"{source} holds no SMILES under its header"
        if raw_train == 0:
            return (f"{source} holds {raw_valid} molecules and val_size={self.val_size} takes them all for "
                    "validation; lower --data.val_size below the number of molecules")
        return f"none of the {raw_train} training SMILES in {source} could be parsed by RDKit"

    @property
    def test_smiles(self) -> list[str]:
        """Canonical SMILES of the test split (the reference of the property distances)."""
        return list(self._read_all()["test"])
