"""Molecule generation metrics with RDKit: validity, uniqueness, novelty, internal diversity, property distances."""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from scipy.stats import wasserstein_distance
from tqdm.auto import tqdm

from lebm_zoo.callbacks._common import _log_image, _run_dir

__all__ = ["MoleculeMetricsCallback", "molecule_metrics", "molecular_properties"]

PROPERTIES = ("qed", "logp", "mw")


def _mol(smiles: str):
    from rdkit import Chem, RDLogger

    RDLogger.DisableLog("rdApp.*")
    return Chem.MolFromSmiles(smiles) if smiles else None


def molecular_properties(mols: Iterable) -> dict[str, np.ndarray]:
    """QED (RDKit ``QED.qed``, in [0, 1]), logP (Crippen ``MolLogP``) and molecular weight (``Descriptors.MolWt``,
    g/mol) of RDKit molecules, as arrays."""
    from rdkit.Chem import QED, Crippen, Descriptors

    mols = list(mols)
    return {"qed": np.array([QED.qed(m) for m in mols]), "logp": np.array([Crippen.MolLogP(m) for m in mols]),
            "mw": np.array([Descriptors.MolWt(m) for m in mols])}


def internal_diversity(mols: Sequence, max_mols: int = 1000, seed: int = 0) -> float:
    """IntDiv_1 (Benhenda 2017; MOSES): 1 - mean pairwise Tanimoto similarity of Morgan fingerprints (radius 2, 1024
    bits) over distinct pairs, on at most ``max_mols`` molecules (a seeded random subset). In [0, 1]; NaN below 2."""
    from rdkit import DataStructs
    from rdkit.Chem import rdFingerprintGenerator

    if len(mols) < 2:
        return float("nan")
    if len(mols) > max_mols:
        idx = np.random.default_rng(seed).choice(len(mols), max_mols, replace=False)
        mols = [mols[i] for i in idx]
    gen = rdFingerprintGenerator.GetMorganGenerator(radius=2, fpSize=1024)
    fps = [gen.GetFingerprint(m) for m in mols]
    total, pairs = 0.0, 0
    for i in range(1, len(fps)):
        sims = DataStructs.BulkTanimotoSimilarity(fps[i], fps[:i])
        total += sum(sims)
        pairs += len(sims)
    return 1.0 - total / pairs


def molecule_metrics(samples: Sequence[str], train_smiles: set[str] | None = None,
                     reference_smiles: Sequence[str] | None = None) -> dict[str, float]:
    """The paper's metrics of generated SMILES (no correction of invalid strings).

    * ``validity``: fraction of ``samples`` that RDKit parses (the empty string is invalid);
    * ``uniqueness``: distinct canonical SMILES among the valid ones / valid ones;
    * ``novelty``: distinct valid canonical SMILES not in ``train_smiles`` / distinct valid ones (MOSES definition);
    * ``int_div``: :func:`internal_diversity` of the distinct valid molecules;
    * ``w_qed``, ``w_logp``, ``w_mw``: 1-D Wasserstein distances between the property distributions of the valid
      samples and of ``reference_smiles`` (when given).

    Returns:
        dict of floats; ratios are NaN when undefined (no valid sample).
    """
    return _evaluate(samples, train_smiles, reference_smiles)[0]


def _evaluate(samples, train_smiles, reference_smiles):
    """:func:`molecule_metrics`, plus the valid sample molecules and the property arrays of samples and reference
    (None without a reference or without a valid sample), so that plots do not parse and featurise again."""
    from rdkit import Chem

    n = len(samples)
    mols = [(s, _mol(s)) for s in samples]
    valid = [(Chem.MolToSmiles(m), m) for s, m in mols if m is not None and m.GetNumAtoms() > 0]
    unique = dict(valid)  # canonical SMILES -> mol
    out = {"validity": len(valid) / n if n else float("nan"),
           "uniqueness": len(unique) / len(valid) if valid else float("nan"),
           "novelty": (sum(s not in train_smiles for s in unique) / len(unique)
                       if unique and train_smiles is not None else float("nan")),
           "int_div": internal_diversity(list(unique.values()))}
    ps = pr = None
    if reference_smiles is not None:
        pr = molecular_properties(m for m in (_mol(s) for s in reference_smiles) if m is not None)
        if valid:
            ps = molecular_properties(m for _, m in valid)
            for k in PROPERTIES:
                out[f"w_{k}"] = float(wasserstein_distance(ps[k], pr[k]))
    return out, [m for _, m in valid], ps, pr


class MoleculeMetricsCallback(pl.Callback):
    """Validity, uniqueness, novelty, internal diversity and property distances of sampled molecules (at test).

    Samples ``num_samples`` SMILES with ``pl_module.sample(n)`` (a :class:`~lebm_zoo.SequenceLatentEBMPrior` on SMILES
    tokens: prior Langevin, then decoding; no validity check or correction) and computes :func:`molecule_metrics`
    against the datamodule's training set (``train_smiles``, for novelty) and test split (``test_smiles``, the
    property reference), as ``test/validity``, ``test/uniqueness``, ``test/novelty``, ``test/int_div``,
    ``test/w_qed``, ``test/w_logp``, ``test/w_mw``. Also writes to ``<run folder>/molecules/`` (the run folder as for
    :class:`~lebm_zoo.callbacks.SampleGrid`): ``samples.smi`` (every sample), ``properties.png`` (QED, logP and weight
    histograms of samples vs data, as in the paper's figure) and ``grid.png`` (the first ``grid_size`` valid samples
    drawn by RDKit), the grid also sent to the loggers that take images (TensorBoard, W&B as uint8 pixels).
    Seeded with ``seed``. Meant for a single device.

    Args:
        num_samples: molecules to sample (10,000 in the MOSES/ZINC protocol).
        batch_size: molecules per sampling batch.
        grid_size: molecules in the grid image.
        every_n_epochs: also evaluate at the end of every n-th training epoch (0: only at test).
        seed: sampling seed.

    Raises:
        TypeError: at setup, for a model without ``sample(n)`` returning strings.
    """

    def __init__(self, num_samples: int = 10_000, batch_size: int = 500, grid_size: int = 24, every_n_epochs: int = 0,
                 seed: int = 0):
        if num_samples < 1 or batch_size < 1 or grid_size < 0 or every_n_epochs < 0:
            raise ValueError("num_samples and batch_size must be >= 1; grid_size, every_n_epochs >= 0")
        self.num_samples, self.batch_size, self.grid_size = num_samples, batch_size, grid_size
        self.every_n_epochs, self.seed = every_n_epochs, seed
        self.results: dict[str, float] = {}

    def setup(self, trainer, pl_module, stage: str) -> None:
        if not callable(getattr(pl_module, "sample", None)) or not callable(getattr(pl_module, "sample_tokens", None)):
            raise TypeError(f"MoleculeMetricsCallback needs a sequence model whose sample(n) returns SMILES strings "
                            f"(SequenceLatentEBMPrior); {type(pl_module).__name__} is not one")

    @torch.no_grad()
    def sample(self, pl_module) -> list[str]:
        out: list[str] = []
        devices = [pl_module.device] if pl_module.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed)
            for i in tqdm(range(0, self.num_samples, self.batch_size), desc="sampling molecules", leave=False):
                out.extend(pl_module.sample(min(self.batch_size, self.num_samples - i)))
        return out

    def evaluate(self, trainer, pl_module, split: str) -> dict[str, float]:
        dm = trainer.datamodule
        samples = self.sample(pl_module)
        train = getattr(dm, "train_smiles", None)
        ref = getattr(dm, "test_smiles", None)
        self.results, valid, ps, pr = _evaluate(samples, set(train) if train else None, ref)
        folder = _run_dir(trainer) / "molecules"
        folder.mkdir(parents=True, exist_ok=True)
        stem = "test" if split == "test" else f"epoch={trainer.current_epoch:04d}"
        (folder / f"{stem}_samples.smi").write_text("\n".join(samples) + "\n")
        self._plots(trainer, valid, ps, pr, folder, stem)
        for k, v in self.results.items():
            if not np.isnan(v):
                pl_module.log(f"{split}/{k}", float(v))
        return self.results

    def _plots(self, trainer, valid: list, ps, pr, folder: Path, stem: str) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from rdkit.Chem import Draw

        if pr is not None:
            fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
            for ax, k, label in zip(axes, PROPERTIES, ("QED", "logP", "molecular weight (g/mol)")):
                bins = np.histogram_bin_edges(np.concatenate([pr[k], ps[k] if valid else []]), bins=40)
                ax.hist(pr[k], bins=bins, density=True, alpha=0.5, label="data (test)")
                if valid:
                    ax.hist(ps[k], bins=bins, density=True, alpha=0.5, label=f"samples ({len(valid)} valid)")
                ax.set_xlabel(label)
            axes[0].legend()
            if not valid:
                fig.suptitle("no valid sample")
            fig.tight_layout()
            fig.savefig(folder / f"{stem}_properties.png", dpi=110)
            plt.close(fig)
        if self.grid_size and valid:
            img = Draw.MolsToGridImage(valid[: self.grid_size], molsPerRow=6, subImgSize=(200, 200))
            img.save(folder / f"{stem}_grid.png")
            arr = torch.from_numpy(np.asarray(img.convert("RGB")).copy()).permute(2, 0, 1)  # (3, H, W) uint8
            _log_image(trainer, "molecules/grid", arr)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self.evaluate(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self.evaluate(trainer, pl_module, "test")
