"""LB-EBM's ETH-UCY table: train the ``<scene>_lbebm`` recipes for several seeds on the CPU, test each run at its last
epoch, and write the table (mean +- std over seeds) beside the paper's rows.

    python benchmarks/lbebm_table.py run --out ~/lbebm-runs --data ../shared/data/eth_ucy --workers 2 \\
        --scenes hotel univ eth zara1 zara2 --seeds 1 2 3 --epochs eth=25 zara1=25 zara2=25
    python benchmarks/lbebm_table.py report ~/lbebm-runs --data ../shared/data/eth_ucy   # Markdown table on stdout
    python benchmarks/lbebm_table.py steps --data ../shared/data/eth_ucy --runs ~/lbebm-runs   # speeds, train vs test
    python benchmarks/lbebm_table.py timebase --data ../shared/data/eth_ucy --runs ~/lbebm-runs  # eth's time step

``run`` starts one ``lebm-zoo fit`` then ``lebm-zoo test --ckpt_path last`` per (scene, seed), ``--workers`` at a
time, each single-threaded (``OMP_NUM_THREADS=1``), in ``<out>/<scene>-s<seed>/``; a run whose ``record.json`` exists
is skipped (rerun the same command to continue). ``--epochs SCENE=N`` shortens a recipe's schedule (the recipes keep
the reference's: 100 epochs, hotel 5); the report names the epochs each row was trained for, the CPU and the time.
Nothing is selected on the test split: the test error is the last epoch's. Runs whose recipe keeps the checkpoint of
the lowest validation ADE are also tested there (``--ckpt_path best``): a second, labelled row of the report.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from lebm_zoo.errors import UsageError, exit_on_usage_error
from lebm_zoo.hardware import cpu_name

SCENES = ("eth", "hotel", "univ", "zara1", "zara2")
#: ADE / FDE in metres, best of 20 (Pang et al. 2021, table 1)
PAPER = {"LB-EBM (paper)": {"eth": (0.30, 0.52), "hotel": (0.13, 0.20), "univ": (0.27, 0.52), "zara1": (0.20, 0.37),
                            "zara2": (0.15, 0.29), "avg": (0.21, 0.38)},
         "PECNet (paper's table)": {"eth": (0.54, 0.87), "hotel": (0.18, 0.24), "univ": (0.35, 0.60),
                                    "zara1": (0.22, 0.39), "zara2": (0.17, 0.30), "avg": (0.29, 0.48)}}


def add_grid_arguments(parser: argparse.ArgumentParser) -> None:
    """``--scenes``, ``--seeds``, ``--epochs SCENE=N ...`` and ``--workers``: which runs, and how many at a time."""
    parser.add_argument("--scenes", nargs="+", default=list(SCENES), choices=SCENES)
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--epochs", nargs="*", default=[], help="SCENE=N: train that scene for N epochs")
    parser.add_argument("--workers", type=int, default=1)


def run_grid(ap: argparse.ArgumentParser, a: argparse.Namespace, run) -> int:
    """Call ``run(scene, seed, epochs or None)`` for every (scene, seed) of ``a`` (:func:`add_grid_arguments`),
    ``a.workers`` at a time; a run's ``RuntimeError`` is printed and counted. Returns the number that failed."""
    epochs = {}
    for item in a.epochs:
        scene, _, n = item.partition("=")
        if scene not in SCENES or not n.isdigit():
            ap.error(f"--epochs takes SCENE=N with SCENE one of {SCENES}, got {item!r}")
        epochs[scene] = int(n)
    failed = 0
    with ThreadPoolExecutor(a.workers) as pool:
        futures = [pool.submit(run, s, seed, epochs.get(s)) for s in a.scenes for seed in a.seeds]
        for f in futures:
            try:
                f.result()
            except RuntimeError as e:
                print(e, file=sys.stderr)
                failed += 1
    return failed


#: the data options a run may turn on (``--data.<name> true``), off by default as in the reference's scripts
DATA_OPTIONS = ("rotate", "eth_at_annotation_rate")


def finished_record(done: Path, options: dict[str, bool]) -> dict | None:
    """The record of a finished run (``done``, its ``record.json``), None when there is none; a RuntimeError when it
    was trained with other data ``options`` (:data:`DATA_OPTIONS`; the folder holds another experiment: use another
    ``--out``)."""
    if not done.exists():
        return None
    record = json.loads(done.read_text())
    for name in DATA_OPTIONS:
        if record.get(name, False) != options.get(name, False):
            raise RuntimeError(f"{done} was trained with {name}={record.get(name, False)}, this run asks for "
                               f"{name}={options.get(name, False)}: use another --out")
    return record


def trained(run: Path) -> dict:
    """``{"epochs": completed epochs, "steps": training steps}`` of the run's newest ``last.ckpt`` (empty without
    one)."""
    from lebm_zoo.checkpoint import read_checkpoint

    ckpts = sorted(run.rglob("last.ckpt"), key=lambda p: p.stat().st_mtime)
    if not ckpts:
        return {}
    ckpt = read_checkpoint(ckpts[-1])
    return {"epochs": int(ckpt["epoch"]) + 1, "steps": int(ckpt["global_step"])}


def run_one(out: Path, data: str, scene: str, seed: int, epochs: int | None, rotate: bool = False,
            eth_at_annotation_rate: bool = False) -> dict:
    """fit then test one (scene, seed); returns its record (also written to ``<run>/record.json``). ``rotate``:
    train on the rotation-augmented windows (``--data.rotate true``); ``eth_at_annotation_rate``: the ETH files on
    their own 0.4 s grid, for training and test (``--data.eth_at_annotation_rate true``)."""
    run = out / f"{scene}-s{seed}"
    done = run / "record.json"
    options = {"rotate": rotate, "eth_at_annotation_rate": eth_at_annotation_rate}
    if (record := finished_record(done, options)) is not None:
        return record
    run.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    common = ["--recipe", f"{scene}_lbebm", "--data.data_dir", data, "--trainer.default_root_dir", str(run),
              "--trainer.enable_progress_bar", "false"]
    if eth_at_annotation_rate:
        common += ["--data.eth_at_annotation_rate", "true"]
    fit = [sys.executable, "-m", "lebm_zoo.cli", "fit", *common, "--seed_everything", str(seed)]
    if epochs is not None:
        fit += ["--trainer.max_epochs", str(epochs)]
    if rotate:
        fit += ["--data.rotate", "true"]
    t0 = time.time()
    with open(run / "fit.log", "w") as log:
        rc = subprocess.run(fit, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    fit_s = time.time() - t0
    if rc != 0:
        raise RuntimeError(f"{scene} seed {seed}: fit exited {rc}; see {run / 'fit.log'}")
    test = [sys.executable, "-m", "lebm_zoo.cli", "test", *common, "--ckpt_path", "last"]
    t0 = time.time()
    with open(run / "test.log", "w") as log:
        rc = subprocess.run(test, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise RuntimeError(f"{scene} seed {seed}: test exited {rc}; see {run / 'test.log'}")
    results = sorted(run.rglob("trajectories/test.json"), key=lambda p: p.stat().st_mtime)
    if not results:
        raise RuntimeError(f"{scene} seed {seed}: the test wrote no trajectories/test.json; see {run / 'test.log'}")
    result = results[-1]
    test_rec = json.loads(result.read_text())
    vals = [json.loads(p.read_text()) for p in sorted(run.rglob("trajectories/val-epoch=*.json"))]
    record = {"scene": scene, "seed": seed, **trained(run), "ade": test_rec["ade"], "fde": test_rec["fde"],
              "windows": test_rec["windows"], "k": test_rec["k"], "fit_seconds": round(fit_s, 1),
              "val": [{"epoch": v["epoch"], "ade": v["ade"], "fde": v["fde"]} for v in vals], "cpu": cpu_name(),
              "threads": 1, **options}
    done.write_text(json.dumps(record, indent=1) + "\n")  # the fit's result is kept, whatever follows
    try:
        chosen = selected_on_validation(run, common, env)
    except RuntimeError as e:
        print(e, file=sys.stderr, flush=True)
        chosen = {"error": str(e)}
    if chosen is not None:
        record["val_selected"] = chosen
        done.write_text(json.dumps(record, indent=1) + "\n")
    print(f"{scene} seed {seed}: ADE {record['ade']:.3f} FDE {record['fde']:.3f} ({fit_s / 60:.1f} min)", flush=True)
    return record


def selected_on_validation(run: Path, common: list[str], env: dict) -> dict | None:
    """Test the checkpoint the run's recipe kept for its lowest validation ADE (``lebm-zoo test --ckpt_path best``).

    Returns:
        ``{"epoch", "val_ade", "ade", "fde"}``: the epoch chosen (0-based), its validation ADE, and its test ADE and
        FDE (metres); None when the run kept no such checkpoint (runs of recipes older than it).

    Raises:
        RuntimeError: the test failed or wrote no result.
    """
    from lebm_zoo.checkpoint import CheckpointError, find_best_checkpoint, find_last_checkpoint, read_checkpoint

    last = find_last_checkpoint(run)
    try:
        found = find_best_checkpoint(last, required=False) if last is not None else None
    except CheckpointError as e:
        raise RuntimeError(f"{run.name}: {e}") from None
    if found is None:
        return None
    best, _, score = found
    start = time.time()
    with open(run / "test-best.log", "w") as log:
        rc = subprocess.run([sys.executable, "-m", "lebm_zoo.cli", "test", *common, "--ckpt_path", "best"], env=env,
                            stdout=log, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise RuntimeError(f"{run.name}: test --ckpt_path best exited {rc}; see {run / 'test-best.log'}")
    results = [p for p in run.rglob("trajectories/test.json") if p.stat().st_mtime >= start - 1]
    if not results:
        raise RuntimeError(f"{run.name}: test --ckpt_path best wrote no trajectories/test.json; see "
                           f"{run / 'test-best.log'}")
    result = json.loads(max(results, key=lambda p: p.stat().st_mtime).read_text())
    return {"epoch": int(read_checkpoint(best)["epoch"]), "val_ade": score, "ade": result["ade"], "fde": result["fde"]}


def constant_velocity(data: str, scene: str, dm=None) -> tuple[float, float]:
    """ADE and FDE (metres) of the constant-velocity prediction on a scene's test windows (or ``dm``'s, a
    datamodule): each future point continues the last observed step (one prediction, no training; a floor any
    learned model should beat)."""
    import torch

    from datamodules.trajectories import TrajectoryDataModule

    w = (dm if dm is not None else TrajectoryDataModule(data, scene)).windows("test").double()  # (W, 20, 2) metres
    last, step = w[:, 7], w[:, 7] - w[:, 6]
    future = last[:, None] + step[:, None] * torch.arange(1, 13, dtype=w.dtype)[None, :, None]
    err = (future - w[:, 8:]).norm(dim=-1)  # (W, 12)
    return err.mean().item(), err[:, -1].mean().item()


def step_lengths(data: str, scene: str, run: Path | None = None, k: int = 20, seed: int = 0) -> dict:
    """How fast people move in a scene's training and test windows, as each window's mean step (metres per time
    step, over its 19 steps): the training windows' median and 90th percentile, the test windows' median and the share
    of test windows faster than that percentile (a held-out scene whose people move faster than those the model
    trained on asks it to extrapolate). With ``run`` (a trained run's folder: its newest ``last.ckpt``), also the
    best-of-``k`` test ADE (metres) of those fast windows and of the others."""
    import torch

    from datamodules.trajectories import TrajectoryDataModule

    dm = TrajectoryDataModule(data, scene)
    train, test = ((w[:, 1:] - w[:, :-1]).double().norm(dim=-1).mean(1) for w in map(dm.windows, ("train", "test")))
    p90 = torch.quantile(train, 0.9).item()
    fast = test > p90
    out = {"train_median": train.median().item(), "train_p90": p90, "test_median": test.median().item(),
           "test_windows": len(test), "test_fast": fast.double().mean().item()}
    if run is not None:
        from lebm_zoo import load_pretrained

        model = load_pretrained(run).eval()
        torch.manual_seed(seed)
        with torch.no_grad():
            ade = torch.cat([model.best_of_k_errors(w, k)[0] for w in dm.windows("test").split(2000)]).double()
        nan = float("nan")  # a share with no window
        out.update(ade=ade.mean().item(), ade_fast=ade[fast].mean().item() if fast.any() else nan,
                   ade_rest=ade[~fast].mean().item() if not fast.all() else nan)
    return out


def evaluate_on(run: Path, dm, k: int = 20, seed: int = 0) -> dict:
    """The best-of-``k`` test ADE and FDE (metres) of a trained run (its newest ``last.ckpt``) on a datamodule's
    test windows, and their median step (metres per time step, each window's mean over its steps)."""
    import torch

    from lebm_zoo import load_pretrained

    model = load_pretrained(run).eval()
    w = dm.windows("test")
    torch.manual_seed(seed)
    with torch.no_grad():
        ade, fde = (torch.cat(e).double() for e in zip(*(model.best_of_k_errors(b, k) for b in w.split(2000))))
    step = (w[:, 1:] - w[:, :-1]).double().norm(dim=-1).mean(1).median().item()
    return {"windows": len(w), "ade": ade.mean().item(), "fde": fde.mean().item(), "step": step}


#: the test files of :func:`timebase`: (scene, label, how its test file is read)
TIMEBASE_FILES = (("eth", "as it is", None), ("eth", "every 6 frames: its annotation rate (0.4 s)", 6),
                  ("eth", "every 10 frames, half a step later (0.67 s, interpolated)", "shift"),
                  ("zara1", "as it is", None), ("zara1", "every 50/3 frames (0.67 s, as eth's rows)", 50 / 3))


def timebase(data: str, runs: Path, seeds=(1, 2, 3)) -> list[tuple[str, str, dict]]:
    """What the time between two rows does to the test error. Each eth run (``<runs>/eth-s<seed>``) is tested on
    eth's file as it is, at the ETH sequence's annotation rate (``eth_at_annotation_rate``) and, to tell the time step
    from the interpolation, interpolated on its own 10-frame spacing half a step later; each zara1 run on zara1's
    test file as it is and re-sampled every 50/3 frames, so that its rows are as far apart in time as eth's (about
    0.67 s). Returns ``(run, test file, result)`` rows (:data:`TIMEBASE_FILES`, :func:`evaluate_on`)."""
    from datamodules.trajectories import ETH_ANNOTATION_STEP, TrajectoryDataModule, resample_tracks

    class Resampled(TrajectoryDataModule):
        """The test files re-sampled every ``step`` frames (``"shift"``: every 10 frames from frame 5)."""

        def __init__(self, *args, step, **kw):
            super().__init__(*args, **kw)
            self.step = step

        def read(self, path):
            rows = super().read(path)
            if path.parent.name != "test":
                return rows
            return resample_tracks(rows, 10, origin=5) if self.step == "shift" else resample_tracks(rows, self.step)

    out = []
    for scene, label, step in TIMEBASE_FILES:
        for seed in seeds:
            run = runs / f"{scene}-s{seed}"
            if (run / "record.json").is_file():
                record = json.loads((run / "record.json").read_text())
                if options_of(record) != "none":
                    raise UsageError(f"{run} was trained with {options_of(record)}: timebase tests runs trained "
                                     "on the files as they are")
                dm = (TrajectoryDataModule(data, scene) if step is None
                      else TrajectoryDataModule(data, scene, eth_at_annotation_rate=True) if step == ETH_ANNOTATION_STEP
                      else Resampled(data, scene, step=step))
                result = evaluate_on(run, dm)
                result["cv_ade"], result["cv_fde"] = constant_velocity(data, scene, dm)
                out.append((f"{scene} seed {seed}", label, result))
    if not out:
        raise UsageError(f"no eth-s<seed> or zara1-s<seed> run with a record.json under {runs}")
    return out


def spread(run: Path, data: str, scene: str, max_windows: int = 2000, k: int = 20, seed: int = 0) -> dict:
    """How the trained model's K plans (the newest ``last.ckpt`` under ``run``) spread on the scene's test windows
    (the first ``max_windows``), in metres: ``final_std`` the standard deviation of the K plans' final points around
    their mean (x and y pooled), ``fde_1`` the FDE of one plan (the first), ``fde_k`` the distance of the nearest of
    the K final points (an oracle: the protocol picks by the whole plan), ``final_offset`` the distance of the K
    plans' mean final point from the true one. A collapsed prior gives ``final_std`` near 0 and ``fde_k`` near
    ``fde_1``."""
    import torch

    from datamodules.trajectories import TrajectoryDataModule
    from lebm_zoo import load_pretrained

    model = load_pretrained(run).eval()
    hp = model.hparams
    w = TrajectoryDataModule(data, scene).windows("test")[:max_windows]
    torch.manual_seed(seed)
    plans = model.sample_plans(w[:, :hp.past_length], k) / hp.data_scale  # (k, B, G, 2) metres
    truth = (w[:, -1] - w[:, hp.past_length - 1]).to(plans)  # (B, 2): final point relative to the last observed
    final = plans[:, :, -1]  # (k, B, 2)
    err = (final - truth).norm(dim=-1)  # (k, B)
    return {"windows": int(w.shape[0]), "final_std": float((final - final.mean(0)).pow(2).mean().sqrt()),
            "fde_1": float(err[0].mean()), "fde_k": float(err.min(0).values.mean()),
            "final_offset": float((final.mean(0) - truth).norm(dim=-1).mean())}


def mean_std(values: list[float]) -> str:
    """``"mean ± std"`` (sample std) to 3 decimals; one value alone."""
    if len(values) > 1:
        return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"
    return f"{values[0]:.3f}"


def options_of(record: dict) -> str:
    """The data options a run was trained and tested with (:data:`DATA_OPTIONS`), ``"none"`` when all are off."""
    return ", ".join(name for name in DATA_OPTIONS if record.get(name, False)) or "none"


def report(out: Path, data: str | None = None, scene_runs: dict[str, Path] | None = None) -> str:
    """The Markdown table of the records under ``out`` (with ``data``, the ETH-UCY folder, also the
    constant-velocity row). ``scene_runs``: scenes whose records come from another folder (``{"eth":
    Path("runs/lbebm-ethrate")}``); the detail table then names each scene's folder and options."""
    scene_runs = scene_runs or {}
    folder = {sc: scene_runs.get(sc, out) for sc in SCENES}
    recs = [json.loads(p.read_text()) | trained(p.parent) for p in sorted(out.glob("*/record.json"))]
    recs = [r for r in recs if r["scene"] not in scene_runs]
    for sc, where in scene_runs.items():
        found = [json.loads(p.read_text()) | trained(p.parent) for p in sorted(where.glob(f"{sc}-s*/record.json"))]
        if not found:
            raise UsageError(f"no {sc}-s*/record.json under {where}: run `lbebm_table.py run --scenes {sc}` there")
        recs += found
    if not recs:
        raise UsageError(f"no record.json under {out}: run `lbebm_table.py run` first")
    by = {s: [r for r in recs if r["scene"] == s] for s in SCENES}
    for sc, rs in by.items():
        if len({options_of(r) for r in rs}) > 1:
            raise UsageError(f"{sc}'s runs under {folder[sc]} were trained with different data options "
                             f"({', '.join(sorted({options_of(r) for r in rs}))}): keep one experiment per folder")
    mixed = bool(scene_runs) or any(options_of(r) != "none" for r in recs)
    other_windows = any(r.get("eth_at_annotation_rate") for r in by["eth"])

    def cell(rs, key):
        return mean_std([r[key] for r in rs])

    head = "| | " + " | ".join(s.upper() for s in SCENES) + " | AVG |\n|---|" + "---|" * (len(SCENES) + 1) + "\n"
    rows = []
    for name, vals in PAPER.items():
        rows.append(f"| {name} | " + " | ".join(f"{vals[s][0]:.2f} / {vals[s][1]:.2f}" for s in (*SCENES, "avg"))
                    + " |")
    ours, means = [], []
    for s in SCENES:
        if by[s]:
            ours.append(f"{cell(by[s], 'ade')} / {cell(by[s], 'fde')}")
            means.append((statistics.mean(r["ade"] for r in by[s]), statistics.mean(r["fde"] for r in by[s])))
        else:
            ours.append("not run")
    avg = (f"{statistics.mean(m[0] for m in means):.3f} / {statistics.mean(m[1] for m in means):.3f}"
           if len(means) == len(SCENES) else "incomplete")
    label = ("ours with the runs and options of the table below, last epoch, mean ± std over seeds" if mixed
             else "**ours**, last epoch, mean ± std over seeds")
    rows.append(f"| {label} | " + " | ".join(ours) + f" | {avg} |")
    if any("val_selected" in r for r in recs):  # the runs' own choice on validation, where the recipe kept one
        chosen, chosen_means = [], []
        for s in SCENES:
            picked = [r["val_selected"] for r in by[s] if "ade" in r.get("val_selected", {})]
            if picked and len(picked) == len(by[s]):
                chosen.append(f"{cell(picked, 'ade')} / {cell(picked, 'fde')} (epochs "
                              f"{', '.join(str(c['epoch'] + 1) for c in picked)})")
                chosen_means.append((statistics.mean(c["ade"] for c in picked),
                                     statistics.mean(c["fde"] for c in picked)))
            else:
                chosen.append("not kept" if by[s] else "not run")
        avg_chosen = (f"{statistics.mean(m[0] for m in chosen_means):.3f} / "
                      f"{statistics.mean(m[1] for m in chosen_means):.3f}" if len(chosen_means) == len(SCENES)
                      else "incomplete")
        rows.append("| ours, the epoch of lowest validation ADE (selected on the val split, not on test) | "
                    + " | ".join(chosen) + f" | {avg_chosen} |")
    if len(means) == len(SCENES):  # how far from the paper's row: ours / paper, ADE and FDE
        paper = PAPER["LB-EBM (paper)"]
        mean_avg = (statistics.mean(m[0] for m in means), statistics.mean(m[1] for m in means))
        ratios = [f"{m[0] / paper[sc][0]:.2f} / {m[1] / paper[sc][1]:.2f}" for sc, m in zip(SCENES, means)]
        what = ("ours ÷ paper (eth on other test windows than the paper's: not the standard protocol)" if other_windows
                else "ours ÷ paper (1.00 = the paper's error; the target: AVG at most 1.10)")
        rows.append(f"| {what} | " + " | ".join(ratios)
                    + f" | {mean_avg[0] / paper['avg'][0]:.2f} / {mean_avg[1] / paper['avg'][1]:.2f} |")
    if data is not None:
        from datamodules.trajectories import TrajectoryDataModule

        # on the windows the runs were tested on: eth's at its annotation rate when its runs were
        cv = [constant_velocity(data, sc, TrajectoryDataModule(data, sc, eth_at_annotation_rate=True)
                                if any(r.get("eth_at_annotation_rate") for r in by[sc]) else None) for sc in SCENES]
        rows.append("| constant velocity (one prediction, no training; measured here) | "
                    + " | ".join(f"{a:.3f} / {f:.3f}" for a, f in cv)
                    + f" | {statistics.mean(c[0] for c in cv):.3f} / {statistics.mean(c[1] for c in cv):.3f} |")
    extra = " runs | options |" if mixed else ""
    detail = ["", "| scene | seeds | epochs | steps | test windows | minutes per run (fit) |" + extra,
              "|---|---|---|---|---|---|" + "---|---|" * mixed]
    for s in SCENES:
        if by[s]:
            rs = by[s]
            line = (f"| {s} | {', '.join(str(r['seed']) for r in rs)} | {rs[0]['epochs']} | {rs[0]['steps']} | "
                    f"{rs[0]['windows']} | {statistics.mean(r['fit_seconds'] for r in rs) / 60:.1f} |")
            if mixed:
                line += f" {folder[s]} | {'; '.join(sorted({options_of(r) for r in rs}))} |"
            detail.append(line)
    cpu = sorted({r["cpu"] for r in recs})
    return head + "\n".join(rows) + "\n" + "\n".join(detail) + f"\n\nCPU: {', '.join(cpu)}, one thread per run.\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="train and test the runs")
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--data", required=True, help="the folder of the five ETH-UCY scenes")
    add_grid_arguments(r)
    r.add_argument("--rotate", action="store_true", help="train on the rotation-augmented windows (--data.rotate)")
    r.add_argument("--eth-at-annotation-rate", action="store_true",
                   help="the ETH files on their own 0.4 s grid, for training and test (--data.eth_at_annotation_rate)")
    p = sub.add_parser("report", help="print the Markdown table")
    p.add_argument("out", type=Path)
    p.add_argument("--data", help="the ETH-UCY folder: adds the constant-velocity row")
    p.add_argument("--from", dest="scene_runs", nargs="+", action="extend", default=[], metavar="SCENE=FOLDER",
                   help="take that scene's runs from another folder (e.g. eth=runs/lbebm-ethrate)")
    d = sub.add_parser("spread", help="how the K plans of each seed-1 run spread on its test windows (metres)")
    d.add_argument("out", type=Path)
    d.add_argument("--data", required=True, help="the ETH-UCY folder")
    d.add_argument("--max-windows", type=int, default=2000)
    v = sub.add_parser("steps", help="how fast people move in each scene's training and test windows (and, with "
                                     "--runs, the test ADE of the fast windows and of the others)")
    v.add_argument("--data", required=True, help="the ETH-UCY folder")
    v.add_argument("--runs", type=Path, help="the runs' folder (of `run`): each scene's seed-1 run is tested")
    t = sub.add_parser("timebase", help="the eth and zara1 runs tested with eth's rows 0.4 s apart and zara1's 0.67 s")
    t.add_argument("--data", required=True, help="the ETH-UCY folder")
    t.add_argument("--runs", type=Path, required=True, help="the runs' folder (of `run`)")
    a = ap.parse_args(argv)
    if a.cmd == "timebase":
        rows = timebase(a.data, a.runs)
        print("| run | test file | windows | median step (m) | ADE | FDE |\n|---|---|---|---|---|---|")
        for run, label, r in rows:
            print(f"| {run} | {label} | {r['windows']} | {r['step']:.3f} | {r['ade']:.3f} | {r['fde']:.3f} |")
        print("\n| scene | test file | seeds | ADE | FDE | constant velocity: ADE / FDE |\n|---|---|---|---|---|---|")
        for scene, label, _ in TIMEBASE_FILES:
            rs = [r for run, lab, r in rows if lab == label and run.startswith(scene + " ")]
            if rs:
                ade, fde = (mean_std([r[k] for r in rs]) for k in ("ade", "fde"))
                cv = f"{rs[0]['cv_ade']:.3f} / {rs[0]['cv_fde']:.3f}"
                print(f"| {scene} | {label} | {len(rs)} | {ade} | {fde} | {cv} |")
        return 0
    if a.cmd == "steps":
        print("| held-out scene | training windows: median step (m) | their 90th percentile | test windows: median "
              "step | test windows faster than that percentile | seed 1's test ADE: those / the others / all |\n"
              "|---|---|---|---|---|---|")
        for scene in SCENES:
            run = a.runs / f"{scene}-s1" if a.runs else None
            s = step_lengths(a.data, scene, run if run and (run / "record.json").is_file() else None)
            ades = f"{s['ade_fast']:.3f} / {s['ade_rest']:.3f} / {s['ade']:.3f}" if "ade" in s else "not run"
            print(f"| {scene} | {s['train_median']:.3f} | {s['train_p90']:.3f} | {s['test_median']:.3f} | "
                  f"{100 * s['test_fast']:.0f}% of {s['test_windows']} | {ades} |", flush=True)
        return 0
    if a.cmd == "report":
        scene_runs = {}
        for item in a.scene_runs:
            scene, _, folder = item.partition("=")
            if scene not in SCENES or not folder:
                ap.error(f"--from takes SCENE=FOLDER with SCENE one of {SCENES}, got {item!r}")
            scene_runs[scene] = Path(folder)
        print(report(a.out, a.data, scene_runs))
        return 0
    if a.cmd == "spread":
        print("| scene (seed 1) | test windows | std of the 20 final points | FDE, one plan | FDE, nearest of 20 "
              "final points | mean final point's offset |\n|---|---|---|---|---|---|")
        for scene in SCENES:
            run = a.out / f"{scene}-s1"
            if (run / "record.json").is_file():
                s = spread(run, a.data, scene, a.max_windows)
                print(f"| {scene} | {s['windows']} | {s['final_std']:.3f} | {s['fde_1']:.3f} | {s['fde_k']:.3f} | "
                      f"{s['final_offset']:.3f} |", flush=True)
        return 0
    failed = run_grid(ap, a, lambda scene, seed, epochs: run_one(a.out, a.data, scene, seed, epochs, a.rotate,
                                                                           a.eth_at_annotation_rate))
    print(report(a.out, a.data))
    return 1 if failed else 0


if __name__ == "__main__":
    exit_on_usage_error(main, "lbebm_table.py")
