#!/usr/bin/env python3
"""Publish trained runs into the pretrained registry shipped with the package (``lebm_zoo/weights/``).

For each entry of :data:`ENTRIES` whose run exists under ``--runs``: load the run's ``last.ckpt``, read the test
metrics that ``lebm-zoo test`` logged for it (TensorBoard events of the test run), write the published folder
(``config.json`` + fp32 ``model.safetensors``, no optimiser state) with the training and evaluation commands, rebuild
``lebm_zoo/weights/index.json`` (sha256 and size of every file), store every entry's
:func:`lebm_zoo.fingerprint.fingerprint` in ``tests/fixtures/pretrained_fingerprints.json``
(``tests/test_shipped_weights.py`` recomputes it), and, for image models, write a 64-sample grid to
``benchmarks/results/pretrained/<name>.png``. It prints the table of docs/pretrained.md at the end
(``benchmarks/pretrained_table.py`` writes it there).

Usage (from the repository root, after the runs of docs/pretrained.md finished)::

    python benchmarks/publish_pretrained.py --runs runs/pub [NAME ...]

Entries already in the index and not named (or whose run is absent) are kept as they are.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from lebm_zoo import pretrained as P  # noqa: E402
from lebm_zoo.errors import UsageError, exit_on_usage_error  # noqa: E402
from lebm_zoo.fingerprint import fingerprint  # noqa: E402
from lebm_zoo.hardware import cpu_name  # noqa: E402

FINGERPRINTS = ROOT / "tests" / "fixtures" / "pretrained_fingerprints.json"
GRIDS = ROOT / "benchmarks" / "results" / "pretrained"
FIT = ("OMP_NUM_THREADS=1 lebm-zoo fit --recipe {recipe} {data} --trainer.precision {precision} "
       "--trainer.max_time {budget} --trainer.max_epochs 100{extra} --trainer.default_root_dir runs/pub/{name}")
TEST = ("OMP_NUM_THREADS=1 lebm-zoo test --recipe {recipe} {data}{extra}{test_extra} --trainer.default_root_dir "
        "runs/pub/{name}_test --ckpt_path runs/pub/{name}/lightning_logs/version_0/checkpoints/last.ckpt")
MNIST = "--data.data_dir $DATA/mnist --data.num_workers 0"
FID = ("FID of 1,000 samples vs 1,000 MNIST test images (TF-Inception pool3, 2048 features; lebm-zoo test "
       "--recipe {recipe})")
MSE = ("per-pixel MSE in [0, 1] of G(z) at posterior z (Langevin, the recipe's chain) on 1,000 MNIST test images "
       "(lebm-zoo test --recipe {recipe})")


def _anomaly_metrics(model: str) -> dict:
    score = ("-log p(x, z) at posterior z" if model == "prior" else
             "-L^{{>0}} = -log p(x, z_1, z_2) at the joint posterior z")  # braces: str.format runs on it
    return {"test/auprc": ("auprc", f"AUPRC (auc(recall, precision), the held-out digit positive) of the score "
                                    f"{score} on the split's test set (lebm-zoo test --recipe mnist_anomaly_{model})"),
            "test/auroc": ("auroc", "AUROC of the same scores")}


def _anomaly_entry(digit: int, seed: int = 1, test_precision: str = "bf16-mixed", model: str = "prior") -> dict:
    """The registry entry of the ``model`` ("prior": LEBM, "hierarchical") anomaly run of ``digit``: seed 1's run of
    benchmarks/anomaly_runs.sh (the recipe's first seed; no seed is chosen by its test score), tested in
    ``test_precision``."""
    name = f"{model}_d{digit}_s{seed}"
    run = f"runs/anomaly/{name}"
    flags = (f"--recipe mnist_anomaly_{model} --data.data_dir $DATA/mnist --data.num_workers 0 "
             f"--data.heldout_digit {digit}")
    return dict(recipe=f"mnist_anomaly_{model}", data_flags="", run=f"../anomaly/{name}",
                test_run=f"../anomaly/{name}_test", precision="bf16-mixed", budget="00:00:04:00",
                data=f"MNIST (70,000 pooled) without digit {digit}: 80% of the normals (the cited code's split)",
                fit_override=(f"OMP_NUM_THREADS=1 lebm-zoo fit {flags} --seed_everything {seed} --trainer.precision "
                              f"bf16-mixed --trainer.max_time 00:00:04:00 --trainer.max_epochs 1000 "
                              f"--trainer.default_root_dir {run}"),
                eval_override=(f"OMP_NUM_THREADS=1 lebm-zoo test {flags} --trainer.precision {test_precision} "
                               f"--trainer.default_root_dir {run}_test --ckpt_path {run}/lightning_logs/version_0/"
                               "checkpoints/last.ckpt"),
                metrics=_anomaly_metrics(model))


#: name -> how it was trained and evaluated. ``run``: the fit's root folder under --runs; ``metrics``: logged test
#: key -> (published name, protocol); ``budget``: the fit's --trainer.max_time (wall-clock, one thread).
ENTRIES: dict[str, dict] = {
    "lebm-mnist": dict(recipe="mnist_prior", data_flags=MNIST, data="MNIST train (59,000 images)",
                       precision="bf16-mixed", budget="00:00:15:00",
                       metrics={"test/fid": ("fid", FID), "test/recon_mse": ("recon_mse", MSE)}),
    "lebm-mnist-gaussian": dict(recipe="mnist_prior", data_flags=MNIST, data="MNIST train (59,000 images)",
                                precision="bf16-mixed", budget="00:00:15:00", extra=" --model.prior gaussian",
                                metrics={"test/fid": ("fid", FID), "test/recon_mse": ("recon_mse", MSE)}),
    "shortrun-mnist": dict(recipe="mnist_shortrun", data_flags=MNIST, data="MNIST train (59,000 images)",
                           precision="32-true", budget="00:00:15:00", metrics={"test/fid": ("fid", FID)}),
    "coopnets-mnist": dict(recipe="mnist_coopnets", data_flags=MNIST, data="MNIST train (55,000 images)",
                           precision="32-true", budget="00:00:15:00", extra=" --model.ngf 32 --model.ndf 32",
                           metrics={"test/fid": ("fid", FID + "; descriptor-revised samples")}),
    "triangle-mnist": dict(recipe="mnist_triangle", data_flags=MNIST, data="MNIST train (59,000 images)",
                           precision="32-true", budget="00:00:15:00",
                           extra=" --model.ngf 16 --model.ndf 16 --model.nif 16",
                           metrics={"test/fid": ("fid", FID),
                                    "test/recon_mse": ("recon_mse", MSE.replace("G(z) at posterior z (Langevin, "
                                                       "the recipe's chain)", "G(mu(x)) (the inference net)"))}),
    "fce-mnist": dict(recipe="mnist_fce_glow", data_flags=MNIST, data="MNIST train (59,000 images)",
                      precision="32-true", budget="00:00:40:00", run="../mnist_fce_glow",
                      test_run="../mnist_fce_glow_test",
                      metrics={"test/fid": ("fid", FID + "; flow samples")}),
    "hierarchical-mnist": dict(recipe="mnist_hierarchical", data_flags=MNIST, data="MNIST train (59,000 images)",
                               precision="bf16-mixed", budget="00:00:15:00", metrics={"test/fid": ("fid", FID)}),
    "fce-toy2d": dict(recipe="toy2d_fce", data_flags="", data="2-D eight-Gaussian mixture (500,000 generated points)",
                      precision="32-true", budget=None, fit_override=(
                          "OMP_NUM_THREADS=1 lebm-zoo fit --recipe toy2d_fce --trainer.max_epochs 5 "
                          "--trainer.default_root_dir runs/pub/fce-toy2d"),
                      eval_override=("# evaluated by the fit itself: val/log_p_ebm, val/log_q_flow on the 5,000 "
                                     "held-out points"),
                      metrics={"val/log_p_ebm": ("heldout_logp_ebm", "mean log-density (nats) of the normalised EBM on "
                                                "5,000 held-out points; the true mixture's is about -0.31"),
                               "val/log_q_flow": ("heldout_logq_flow", "mean log-density (nats) of the flow on the "
                                                 "same points")}, test_run=None),
    "ptb-lm": dict(recipe="ptb_lm", data_flags="--data.data_dir $DATA/ptb",
                   data="Penn Treebank train (42,068 sentences)",
                   precision="bf16-mixed", budget="00:00:08:00", extra=" --model.emb_dim 32 --model.hidden 64",
                   fit_extra_drop_epochs=True, test_extra_drop=True,
                   metrics={"test/ppl": ("ppl", "perplexity per token (with <eos>) on the PTB test set "
                                         "(lebm-zoo test --recipe ptb_lm)")}),
    "ptb-prior": dict(recipe="ptb_prior", data_flags="--data.data_dir $DATA/ptb",
                      data="Penn Treebank train (42,068 sentences)", precision="bf16-mixed", budget="00:00:15:00",
                      extra=" --model.emb_dim 32 --model.hidden 64", fit_extra_drop_epochs=True, test_extra_drop=True,
                      test_extra=(" --trainer.callbacks.init_args.lm_path runs/pub/ptb-lm/lightning_logs/version_0/"
                                  "checkpoints/last.ckpt --trainer.callbacks.init_args.num_samples 2000 "
                                  "--trainer.callbacks.init_args.nll_sentences 500"),
                      metrics={"test/fppl": ("fppl", "forward perplexity: 2,000 samples (temperature 1) scored by "
                                             "ptb-lm"),
                               "test/rppl": ("rppl", "reverse perplexity: an LM of ptb-lm's size trained 5 epochs "
                                             "on 2,000 samples, scored on the PTB test set"),
                               "test/nll": ("nll", "importance-sampled -log p(x), nats per sentence, on the first 500 "
                                            "PTB test sentences (100 samples, 4 posterior chains each)")}),
    "moses-prior": dict(recipe="moses_prior", data_flags="--data.data_dir $DATA/zinc/moses --data.train_size 200000",
                        data="MOSES train, a random 200,000 of 1,584,663 molecules (seed 1)", precision="bf16-mixed",
                        budget="00:00:15:00", extra=" --model.hidden 128", fit_extra_drop_epochs=True,
                        test_extra=" --trainer.callbacks.init_args.num_samples 2000",
                        metrics={f"test/{k}": (k, f"{k} of 2,000 prior samples (RDKit; lebm-zoo test --recipe "
                                               "moses_prior; novelty against the 200,000 training molecules)")
                                 for k in ("validity", "uniqueness", "novelty")}),
    "semisup-mnist": dict(recipe="mnist_semisup", data_flags="", run="../semisup/s1", test_run="../semisup/s1_test",
                          data="MNIST train (59,000 images, 100 of them labelled: 10 per class, seed 0)",
                          precision="32-true", budget="00:00:20:00",
                          fit_override=("OMP_NUM_THREADS=1 lebm-zoo fit --recipe mnist_semisup --data.datamodule."
                                        "data_dir $DATA/mnist --data.datamodule.num_workers 0 --trainer.max_time "
                                        "00:00:20:00 --trainer.default_root_dir runs/semisup/s1"),
                          eval_override=("OMP_NUM_THREADS=1 lebm-zoo test --recipe mnist_semisup --data.datamodule."
                                         "data_dir $DATA/mnist --data.datamodule.num_workers 0 --trainer."
                                         "default_root_dir runs/semisup/s1_test --ckpt_path runs/semisup/s1/"
                                         "lightning_logs/version_0/checkpoints/last.ckpt"),
                          metrics={"test/accuracy": ("accuracy", "test accuracy on the 10,000 MNIST test images "
                                                     "(classify: posterior z, then softmax F(z); lebm-zoo test "
                                                     "--recipe mnist_semisup)")}),
    "drl-mnist": dict(recipe="mnist_drl", data_flags=MNIST, run="../drl/mnist", test_run="../drl/mnist_test",
                      data="MNIST train (59,000 images)", precision="bf16-mixed", budget="00:00:40:00",
                      fit_override=("OMP_NUM_THREADS=1 lebm-zoo fit --recipe mnist_drl --data.data_dir $DATA/mnist "
                                    "--data.num_workers 0 --trainer.precision bf16-mixed --trainer.max_time "
                                    "00:00:40:00 --trainer.default_root_dir runs/drl/mnist"),
                      eval_override=("OMP_NUM_THREADS=1 lebm-zoo test --recipe mnist_drl --data.data_dir $DATA/mnist "
                                     "--data.num_workers 0 --trainer.default_root_dir runs/drl/mnist_test "
                                     "--ckpt_path runs/drl/mnist/lightning_logs/version_0/checkpoints/last.ckpt"),
                      metrics={"test/fid": ("fid", FID)}),
}
# the digit-1 test ran in fp32 (it started before the runs' tests were switched to bf16-mixed)
ENTRIES.update({f"lebm-mnist-anomaly-digit{d}": _anomaly_entry(d, test_precision="32-true" if d == 1 else "bf16-mixed")
                for d in (1, 4, 5, 7, 9)})
ENTRIES.update({f"hierarchical-mnist-anomaly-digit{d}": _anomaly_entry(d, model="hierarchical")
                for d in (1, 4, 5, 7, 9)})


def _scalars(run: Path) -> dict[str, float]:
    """The last value of every scalar in the TensorBoard events below ``run``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, float] = {}
    for ev in sorted(run.rglob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime):
        acc = EventAccumulator(str(ev), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out[tag] = float(acc.Scalars(tag)[-1].value)
    return out


def _commands(name: str, spec: dict) -> tuple[str, str]:
    extra = spec.get("extra", "")
    fit = spec.get("fit_override") or FIT.format(recipe=spec["recipe"], data=spec["data_flags"], name=name,
                                                 precision=spec["precision"], budget=spec["budget"], extra=extra)
    if spec.get("fit_extra_drop_epochs"):
        fit = fit.replace(" --trainer.max_epochs 100", "")
    if spec.get("run", "").startswith(".."):  # runs made for the side-by-side table of docs/results.md
        fit = fit.replace(f"runs/pub/{name}", f"runs/{spec['recipe']}")
    test = spec.get("eval_override") or TEST.format(recipe=spec["recipe"], data=spec["data_flags"], name=name,
                                                    extra="" if spec.get("test_extra_drop") else extra,
                                                    test_extra=spec.get("test_extra", ""))
    if spec.get("run", "").startswith(".."):
        test = test.replace(f"runs/pub/{name}_test", f"runs/{spec['recipe']}_test").replace(
            f"runs/pub/{name}/", f"runs/{spec['recipe']}/")
    return fit, test.replace("  ", " ")


#: the most the shipped weights may take in git, all entries together (bytes)
REGISTRY_BUDGET = 60_000_000


def check_budget(name: str, model, also: dict | None = None) -> None:
    """Refuse to publish ``model`` as ``name`` when the registry would then exceed :data:`REGISTRY_BUDGET` (fp32
    weights: 4 bytes a value, the replaced entry's files not counted).

    Args:
        name, model: the entry and its model.
        also: other entries published with it, name -> model (they replace their old files too).

    Raises:
        UsageError: naming the sizes.
    """
    def size(m) -> int:
        return sum(v.numel() * 4 for v in m.state_dict().values() if v.is_floating_point())

    batch = {name: model} | (also or {})
    new = sum(size(m) for m in batch.values())
    others = sum(e.size for e in P.list_pretrained() if e.name not in batch)
    if others + new > REGISTRY_BUDGET:
        raise UsageError(f"{name}: {new / 1e6:.1f} MB of fp32 weights would take the registry to "
                         f"{(others + new) / 1e6:.1f} MB, over its {REGISTRY_BUDGET / 1e6:.0f} MB budget; publish it "
                         "elsewhere (save_pretrained + a Hugging Face repository, hf://) or retire an entry first")


def publish(name: str, spec: dict, runs: Path) -> dict | None:
    run = (runs / spec.get("run", name)).resolve()
    ckpt = run / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    if not ckpt.is_file():
        print(f"{name}: no {ckpt}, skipped")
        return None
    test_run = spec.get("test_run", f"{name}_test")
    scalars = _scalars(run if test_run is None else (runs / test_run).resolve())
    metrics = {}
    for key, (metric, protocol) in spec["metrics"].items():
        if key not in scalars:
            raise UsageError(f"{name}: the run logged no {key} (it has {sorted(scalars)})")
        metrics[metric] = {"value": round(scalars[key], 6), "protocol": protocol.format(recipe=spec["recipe"])}
    model = P.load_pretrained(ckpt)
    check_budget(name, model)
    ck = torch.load(ckpt, map_location="cpu", weights_only=True)
    steps = int(ck.get("global_step", 0))
    fit, test = _commands(name, spec)
    folder = P.WEIGHTS_DIR / name
    for old in folder.glob("*") if folder.is_dir() else []:
        old.unlink()
    P.save_pretrained(model, folder, recipe=spec["recipe"], data=spec["data"], training_steps=steps, metrics=metrics,
                      training={"command": fit, "evaluation": test, "budget": spec["budget"] or "5 epochs",
                                "threads": 1, "cpu": cpu_name()})
    model = P.load_pretrained(folder)
    GRIDS.mkdir(parents=True, exist_ok=True)
    if model.hparams.get("dim"):  # 2-D points: a scatter of 2,000 samples
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        torch.manual_seed(0)
        pts = model.sample(2000).detach().cpu().numpy()
        fig, ax = plt.subplots(figsize=(3.2, 3.2))
        ax.scatter(pts[:, 0], pts[:, 1], s=1, alpha=0.5)
        ax.set_aspect("equal")
        ax.set_title(f"{name}: 2,000 samples", fontsize=8)
        fig.tight_layout()
        fig.savefig(GRIDS / f"{name}.png", dpi=100)
        plt.close(fig)
    elif model.hparams.get("n_classes"):  # symbol-vector coupling: one row of 8 conditional samples per class
        from torchvision.utils import save_image

        torch.manual_seed(0)
        rows = [model.sample(8, y=c) for c in range(model.hparams.n_classes)]
        save_image(torch.cat(rows) * 0.5 + 0.5, GRIDS / f"{name}.png", nrow=8, padding=1)
    elif model.hparams.get("img_size") and not hasattr(model, "vocab_obj"):
        from lebm_zoo.cli import main

        main(["sample", str(folder), "-n", "64", "-o", str(GRIDS / f"{name}.png"), "--seed", "0"])
    print(f"{name}: {steps} iterations, {metrics}")
    return {"steps": steps}


def rebuild_index(published: list[str] | None = None) -> None:
    """Rebuild ``index.json`` from every published folder (the quickstart's included) and the fingerprints file: the
    entries in ``published`` (all when None or empty) get theirs recomputed, the others keep theirs (a recomputation
    differs in the last digits with the thread count, which would only churn the file). Prints the registry's size."""
    old = {e["name"]: e for e in json.loads(P.INDEX_PATH.read_text())} if P.INDEX_PATH.is_file() else {}
    index = []
    for folder in sorted(p for p in P.WEIGHTS_DIR.iterdir() if (p / P.CONFIG_NAME).is_file()):
        data = old.get(folder.name, {}).get("data")
        index.append(P.make_registry_entry(folder, folder.name, data=data))
    P.INDEX_PATH.write_text(json.dumps(index, indent=1) + "\n")
    fps = json.loads(FINGERPRINTS.read_text()) if FINGERPRINTS.is_file() else {}
    fps = {e.name: fps[e.name] if e.name in fps and published and e.name not in published
           else fingerprint(P.load_pretrained(e.name)) for e in P.list_pretrained()}
    FINGERPRINTS.write_text(json.dumps(dict(sorted(fps.items())), indent=1) + "\n")
    total = sum(e.size for e in P.list_pretrained())
    print(f"registry: {len(index)} entries, {total / 1e6:.1f} MB")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "pub")
    parser.add_argument("names", nargs="*", help="entries to (re)publish (default: every entry with a run)")
    args = parser.parse_args()
    unknown = set(args.names) - set(ENTRIES)
    if unknown:
        raise UsageError(f"unknown entries {sorted(unknown)}; known: {sorted(ENTRIES)}")
    for name in args.names or ENTRIES:
        publish(name, ENTRIES[name], args.runs)
    rebuild_index(args.names)
    print(readme_table())
    return 0


def _budget(text: str | None) -> str:
    """``"00:00:15:00"`` (Lightning's days:hours:minutes:seconds) as ``"15 min"``; other text as it is."""
    parts = (text or "").split(":")
    if len(parts) != 4 or not all(p.isdigit() for p in parts):
        return text or "-"
    minutes = int(parts[0]) * 1440 + int(parts[1]) * 60 + int(parts[2])
    return f"{minutes} min" + (f" {int(parts[3])} s" if int(parts[3]) else "")


def _fmt(v: float) -> str:
    return f"{v:.4f}" if abs(v) < 1 else f"{v:.1f}"


def readme_table() -> str:
    """The table of the shipped models (docs/pretrained.md) and the commands behind it, from their config.json files."""
    rows = ["| name | family, recipe | data | iterations (budget, one thread) | MB | metrics |",
            "|---|---|---|---|---|---|"]
    cmds = []
    for e in P.list_pretrained():
        cfg = json.loads((e.path / P.CONFIG_NAME).read_text())
        tr = cfg.get("training") or {}
        budget = _budget(tr.get("budget"))
        metrics = ", ".join(f"{k} {_fmt(m['value'])}" for k, m in e.metrics.items())
        rows.append(f"| `{e.name}` | `{e.family}`, `{e.recipe}` | {e.data} | {cfg.get('training_steps'):,} ({budget}) "
                    f"| {e.size / 1e6:.1f} | {metrics} |")
        if tr.get("command"):
            cmds.append(f"# {e.name}\n{tr['command']}\n{tr['evaluation']}")
    return "\n".join(rows) + "\n\n```bash\n" + "\n".join(cmds) + "\n```\n"


if __name__ == "__main__":
    exit_on_usage_error(main, "publish_pretrained.py")
