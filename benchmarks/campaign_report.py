#!/usr/bin/env python3
"""On a CPU, from what a GPU campaign brought back (``benchmarks/gpu_campaign.py``): FID on the project's protocol, the
tables beside the papers' rows and today's registry, and (``--publish``) the registry entries.

    python benchmarks/campaign_report.py FILES_AT --work runs/campaign --mnist $DATA/mnist [--publish] [--no-fid]

``FILES_AT`` is the folder holding the ``campaign-part*.zip`` files. They are unpacked into ``--work``; each run with
samples gets its FID (1,000 samples vs 1,000 MNIST test images, TF-Inception pool3: ``FIDCallback``'s protocol, the
registry's); the report (Markdown) is printed and written to ``<work>/report.md``: the anomaly table (AUPRC mean +-
std over seeds per held-out digit beside the papers' rows, AUROC, the issue's targets checked), the zoo table (each
run's iterations, wall time and FID beside the shipped entry's). ``--publish`` writes every finished run that names a
registry entry (seed 1 of a grid) into ``lebm_zoo/weights/`` with its metrics and training record, within the
registry's 60 MB budget, then rebuilds the index and fingerprints as ``publish_pretrained.py`` does.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from lebm_zoo.errors import UsageError, exit_on_usage_error  # noqa: E402

FID_PROTOCOL = ("FID of 1,000 samples vs 1,000 MNIST test images (TF-Inception pool3, 2048 features; "
                "benchmarks/campaign_report.py on the campaign's samples)")
ANOMALY_DIGITS = (1, 4, 5, 7, 9)


def unpack(files_at: Path, work: Path) -> dict:
    """Extract every ``campaign-part*.zip`` into ``work``; returns ``summary.json``.

    Raises:
        UsageError: no parts, an unsafe member path, or no summary among them.
    """
    parts = sorted(Path(files_at).glob("campaign-part*.zip"))
    if not parts:
        raise UsageError(f"no campaign-part*.zip under {files_at}")
    work.mkdir(parents=True, exist_ok=True)
    for part in parts:
        with zipfile.ZipFile(part) as z:
            for name in z.namelist():  # only the layout gpu_campaign.py writes: no absolute or parent paths
                if name.startswith("/") or ".." in Path(name).parts:
                    raise UsageError(f"{part}: refusing member {name!r}")
            z.extractall(work)
    if not (work / "summary.json").is_file():
        raise UsageError(f"no summary.json in {[p.name for p in parts]}")
    return json.loads((work / "summary.json").read_text())


class _Replay(torch.nn.Module):
    """Hands out stored uint8 samples as a model's ``sample(n)`` would, in [-1, 1], in order."""

    def __init__(self, images):
        super().__init__()
        self.images = torch.as_tensor(images).float() / 127.5 - 1
        self.at = 0

    def sample(self, n: int) -> torch.Tensor:
        x = self.images[self.at:self.at + n]
        self.at += n
        if len(x) < n:
            raise ValueError(f"only {len(self.images)} samples stored")
        return x


def fid_of_samples(samples: Path, mnist_dir: str, feature=None, num: int = 1000) -> float:
    """FID of the stored samples (``samples.npz``, uint8 ``(N, 1, 28, 28)``) against ``num`` MNIST test images, with
    :class:`~lebm_zoo.callbacks.FIDCallback` (``feature``: a custom extractor instead of Inception, for tests)."""
    import numpy as np
    import pytorch_lightning as pl

    from datamodules import MNISTDataModule
    from lebm_zoo.callbacks import FIDCallback

    images = np.load(samples)["images"]

    class Replayed(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.replay = _Replay(images)

        def sample(self, n):
            return self.replay.sample(n)

        def test_step(self, batch, batch_idx):
            return None

    n = min(num, len(images))
    cb = FIDCallback(num_samples=n, num_real=n, feature=feature)
    dm = MNISTDataModule(data_dir=mnist_dir, num_workers=0, batch_size=500)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[cb], limit_test_batches=1)
    trainer.test(Replayed(), datamodule=dm, verbose=False)
    return float(cb.last_value)


def anomaly_table(records: list[dict]) -> str:
    from anomaly_table import PAPER

    rows = ["| | " + " | ".join(f"digit {d}" for d in ANOMALY_DIGITS) + " |",
            "|---|" + "---|" * len(ANOMALY_DIGITS)]
    for label, vals in PAPER.items():
        rows.append(f"| paper, {label} | " + " | ".join(f"{vals[d][0]:.3f} +- {vals[d][1]:.3f}"
                                                       for d in ANOMALY_DIGITS) + " |")
    lebm_paper = next(v for k, v in PAPER.items() if k.startswith("LEBM"))
    checks = []
    for model, label in (("prior", "ours, LEBM"), ("hierarchical", "ours, hierarchical L^{>0}")):
        cells, means = [], {}
        for d in ANOMALY_DIGITS:
            rs = [r for r in records if r.get("model") == model and int(r.get("digit", -1)) == d
                  and "test/auprc" in r.get("metrics", {})]
            if not rs:
                cells.append("-")
                continue
            v = [r["metrics"]["test/auprc"] for r in rs]
            means[d] = statistics.mean(v)
            sd = statistics.stdev(v) if len(v) > 1 else 0.0
            auroc = statistics.mean(r["metrics"].get("test/auroc", float("nan")) for r in rs)
            cells.append(f"{means[d]:.3f} +- {sd:.3f} (AUROC {auroc:.3f}, {len(v)} seeds)")
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
        if len(means) == len(ANOMALY_DIGITS):
            above = sum(means[d] >= lebm_paper[d][0] for d in ANOMALY_DIGITS)
            need = 4 if model == "prior" else 5
            checks.append(f"- {label}: at or above the LEBM paper on {above} of 5 digits (target {need}): "
                          f"{'reached' if above >= need else 'not reached'}")
    aurocs = [r["metrics"]["test/auroc"] for r in records if "test/auroc" in r.get("metrics", {})]
    if aurocs:
        checks.append(f"- AUROC above 0.5 in {sum(a > 0.5 for a in aurocs)} of {len(aurocs)} runs (target: all)")
    return "\n".join(rows) + "\n\n" + "\n".join(checks) + "\n"


def zoo_table(records: list[dict]) -> str:
    from lebm_zoo.pretrained import list_pretrained

    shipped = {e.name: e for e in list_pretrained()}
    rows = ["| run | recipe | iterations | fit (s) | device | FID (campaign) | FID (shipped) | other metrics |",
            "|---|---|---|---|---|---|---|---|"]
    for r in records:
        if r.get("campaign") == "anomaly":
            continue
        old = shipped.get(r.get("publish", ""))
        old_fid = old.metrics.get("fid", {}).get("value") if old else None
        fid = r.get("fid")
        other = ", ".join(f"{k.split('/', 1)[1]} {v:.4g}" for k, v in r.get("metrics", {}).items())
        rows.append(f"| `{r['name']}` | `{r['recipe']}` | {r.get('iterations', '-')} | {r.get('fit_seconds', '-')} | "
                    f"{r.get('device', '-')} | {'-' if fid is None else f'{fid:.1f}'} | "
                    f"{'-' if old_fid is None else f'{old_fid:.1f}'} | {other or r.get('error', '')} |")
    return "\n".join(rows) + "\n"


def publish(records: list[dict], work: Path) -> list[str]:
    """Write the finished runs that name a registry entry (seed 1) into the registry; returns the names written.

    Every model is loaded and the registry's budget checked for all of them together before anything is written; each
    entry is written into a new folder that then replaces the old one, and the index is rebuilt even if a write fails.
    Runs whose weights did not come back (left out of the packed files) are skipped.

    Raises:
        UsageError: the new entries would take the registry over its budget (nothing is written).
    """
    import publish_pretrained as pp

    from lebm_zoo import pretrained as P
    from lebm_zoo.hardware import cpu_name

    chosen = {}
    for r in records:
        name = r.get("publish")
        folder = work / "runs" / r["name"] / "weights"
        if name and "error" not in r and int(r.get("seed", 1)) == 1 and (folder / P.CONFIG_NAME).is_file():
            chosen[name] = (r, folder, P.load_pretrained(folder))
    if chosen:
        first, *rest = chosen
        pp.check_budget(first, chosen[first][2], {n: chosen[n][2] for n in rest})
    done = []
    try:
        for name, (r, folder, model) in chosen.items():
            _publish_one(P, name, r, folder, model, cpu_name())
            done.append(name)
    finally:
        if done:
            pp.rebuild_index(done)
    return done


def _publish_one(P, name: str, r: dict, folder: Path, model, cpu: str) -> None:
    """Write one entry into a fresh folder beside the registry's, then swap it in for the old one."""
    import shutil
    import tempfile

    cfg = json.loads((folder / P.CONFIG_NAME).read_text())
    metrics = dict(cfg.get("metrics") or {})
    if r.get("fid") is not None:
        metrics["fid"] = {"value": round(r["fid"], 6), "protocol": FID_PROTOCOL}
    training = dict(cfg.get("training") or {}) | {"report": "benchmarks/campaign_report.py", "cpu": cpu}
    target = P.WEIGHTS_DIR / name
    fresh = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=P.WEIGHTS_DIR))
    try:
        P.save_pretrained(model, fresh, recipe=r["recipe"], data=cfg.get("data") or r.get("data", "MNIST"),
                          training_steps=r.get("iterations"), metrics=metrics, training=training)
        if target.exists():
            shutil.rmtree(target)
        fresh.rename(target)
    finally:
        shutil.rmtree(fresh, ignore_errors=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files_at", type=Path, help="the folder of campaign-part*.zip")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "campaign")
    ap.add_argument("--mnist", default=str(ROOT.parent / "shared" / "data" / "mnist"),
                    help="MNIST folder for FID's real images")
    ap.add_argument("--no-fid", action="store_true", help="skip FID (no Inception weights here)")
    ap.add_argument("--publish", action="store_true", help="write the runs into the registry")
    a = ap.parse_args(argv)
    summary = unpack(a.files_at, a.work)
    records = summary["runs"]
    for r in records:
        samples = a.work / "runs" / r["name"] / "samples.npz"
        if samples.is_file() and not a.no_fid:
            r["fid"] = fid_of_samples(samples, a.mnist)
    report = ["# GPU campaign", ""]
    if any(r.get("campaign") == "anomaly" for r in records):
        report += ["## MNIST anomaly detection (test AUPRC, mean +- std over seeds)", "",
                   anomaly_table(records)]
    if any(r.get("campaign") != "anomaly" for r in records):
        report += ["## MNIST zoo", "", zoo_table(records)]
    failed = [f"{r['name']}: {r['error']}" for r in records if "error" in r]
    if failed or summary.get("left_out"):
        report += ["## Not done", ""] + [f"- {f}" for f in failed] + [
            f"- left out of the packed files: {x}" for x in summary.get("left_out", [])]
    text = "\n".join(report) + "\n"
    (a.work / "report.md").write_text(text)
    (a.work / "records.json").write_text(json.dumps(records, indent=1) + "\n")
    print(text)
    if a.publish:
        print("published:", ", ".join(publish(records, a.work)) or "nothing")
    return 0


if __name__ == "__main__":
    exit_on_usage_error(main, "campaign_report.py")
