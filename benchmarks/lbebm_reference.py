"""Run the authors' LB-EBM scripts (bpucla/lbebm, ``lbebm_<scene>.py``) on the CPU, on the same ETH-UCY files as
``lbebm_table.py``, and tabulate their test error at the last epoch: what the reference itself reaches on these data.

    git clone https://github.com/bpucla/lbebm ~/lbebm        # the authors' code; pandas and scipy must be installed
    python benchmarks/lbebm_reference.py run --reference ~/lbebm --data ../shared/data/eth_ucy --out runs/lbebm-ref \\
        --scenes eth hotel --seeds 1 2 3 --epochs eth=10 --workers 2
    python benchmarks/lbebm_reference.py report runs/lbebm-ref --ours runs/lbebm   # Markdown table on stdout

The scripts run unchanged: this runner only makes their ``.cuda()`` calls no-ops (``torch.Tensor.cuda``,
``torch.nn.Module.cuda`` and ``torch.cuda.set_device``), passes ``--seed``, ``--num_epochs`` and ``--model_path ''``
(train, do not load their weights), and runs each in its own folder holding a copy of the scene's split (the
reference caches ``saved_data.pickle`` beside the ``.txt`` files, so it never writes into ``--data``). With
``--rotate`` their loader (``utils.create_dataset``) is called with its own ``rotate`` option for the training files,
which the scripts as published do not pass. One thread per run (``OMP_NUM_THREADS=1``). The reference evaluates
the validation and test files after every epoch and logs them; the table reports the **last** epoch's test error,
and its best-over-epochs test error (model selection on the test split, which is what the reference's "Test Best"
line reports) only in its own, labelled row.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import runpy
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lbebm_table import PAPER, SCENES, add_grid_arguments, finished_record, run_grid  # noqa: E402

from lebm_zoo.errors import UsageError, exit_on_usage_error  # noqa: E402
from lebm_zoo.hardware import cpu_name  # noqa: E402

_LINE = re.compile(r": (Val|Test) (ADE|FDE) ([-+0-9.eE]+)\s*$")


def parse_log(text: str) -> list[dict]:
    """The per-epoch errors in a reference log: ``[{"val_ade", "val_fde", "test_ade", "test_fde"}, ...]``, one dict
    per epoch, in order (an epoch counts once its ``Test FDE`` line is there)."""
    epochs, cur = [], {}
    for line in text.splitlines():
        m = _LINE.search(line)
        if m:
            cur[f"{m[1].lower()}_{m[2].lower()}"] = float(m[3])
            if m[1] == "Test" and m[2] == "FDE":
                epochs.append(cur)
                cur = {}
    return epochs


def run_reference(script: Path, argv: list[str], workdir: Path, rotate: bool = False) -> None:
    """Run one authors' script in this process on the CPU (its ``.cuda()`` calls made no-ops), in ``workdir``.
    ``rotate``: its loader's ``create_dataset`` is called with its own ``rotate`` option for the training files."""
    import torch

    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.nn.Module.cuda = lambda self, *a, **k: self
    torch.cuda.set_device = lambda *a, **k: None
    os.chdir(workdir)
    sys.path.insert(0, str(script.parent))
    if rotate:
        import utils  # the reference's loader module, which the script imports by this name

        create = utils.create_dataset

        def create_rotated(*args, **kwargs):
            if kwargs.get("train", True):
                kwargs["rotate"] = "1"  # any non-empty string: the loader joins it into its cache file's name
            return create(*args, **kwargs)

        utils.create_dataset = create_rotated
    sys.argv = [str(script), *argv]
    runpy.run_path(str(script), run_name="__main__")


def run_one(reference: Path, data: Path, out: Path, scene: str, seed: int, epochs: int | None,
            rotate: bool = False) -> dict:
    """Train and evaluate one (scene, seed) with the authors' script; returns its record (also ``record.json``).
    ``rotate``: with its loader's rotation augmentation of the training windows."""
    run = out / f"{scene}-s{seed}"
    done = run / "record.json"
    if (record := finished_record(done, {"rotate": rotate})) is not None:
        return record
    work = run / "work"
    if work.exists():
        shutil.rmtree(work)
    shutil.copytree(data / scene, work / "dataset" / scene,
                    ignore=shutil.ignore_patterns("*.pickle"))  # no stale cache: the .txt files only
    argv = ["--seed", str(seed), "--model_path", ""]
    if epochs is not None:
        argv += ["--num_epochs", str(epochs)]
    cmd = [sys.executable, str(Path(__file__).resolve()), "_one", str(reference / f"lbebm_{scene}.py"),
           str(work), "rotate" if rotate else "plain", "--", *argv]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    t0 = time.time()
    with open(run / "reference.log", "w") as log:
        rc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    seconds = time.time() - t0
    if rc != 0:
        last = (run / "reference.log").read_text().strip().splitlines()[-1:] or [""]
        raise RuntimeError(f"{scene} seed {seed}: the reference exited {rc} ({last[0]}); see {run / 'reference.log'}")
    per_epoch = parse_log((run / "reference.log").read_text())
    if not per_epoch:
        raise RuntimeError(f"{scene} seed {seed}: no 'Test ADE/FDE' lines in {run / 'reference.log'}")
    best = min(per_epoch, key=lambda e: e["test_ade"])
    commit = None  # a copy inside another repository would give that repository's HEAD: only a checkout's own
    if (reference / ".git").exists():
        git = subprocess.run(["git", "-C", str(reference), "rev-parse", "HEAD"], capture_output=True, text=True)
        commit = git.stdout.strip() if git.returncode == 0 else None
    record = {"scene": scene, "seed": seed, "epochs": len(per_epoch), "ade": per_epoch[-1]["test_ade"],
              "fde": per_epoch[-1]["test_fde"], "best_test_ade": best["test_ade"], "best_test_fde": best["test_fde"],
              "per_epoch": per_epoch, "seconds": round(seconds, 1), "cpu": cpu_name(), "threads": 1,
              "reference_commit": commit, "rotate": rotate}
    done.write_text(json.dumps(record, indent=1) + "\n")
    shutil.rmtree(work)
    print(f"reference {scene} seed {seed}: last epoch ADE {record['ade']:.3f} FDE {record['fde']:.3f} "
          f"({seconds / 60:.1f} min)", flush=True)
    return record


def _records(folder: Path) -> dict[str, list[dict]]:
    recs = [json.loads(p.read_text()) for p in sorted(folder.glob("*/record.json"))]
    return {s: [r for r in recs if r["scene"] == s] for s in SCENES}


def _cell(rs: list[dict], ade: str, fde: str) -> str:
    def one(key):
        v = [r[key] for r in rs]
        return f"{statistics.mean(v):.3f} ± {statistics.stdev(v):.3f}" if len(v) > 1 else f"{v[0]:.3f}"
    return f"{one(ade)} / {one(fde)}" if rs else "not run"


def report(out: Path, ours: Path | None = None) -> str:
    """Markdown: the paper's row, the reference's last-epoch and best-test-epoch rows for the scenes run under
    ``out``, and (with ``ours``, an ``lbebm_table.py run`` folder) ours beside them."""
    ref = _records(out)
    scenes = [s for s in SCENES if ref[s]]
    if not scenes:
        raise UsageError(f"no record.json under {out}: run `lbebm_reference.py run` first")
    head = ("| | " + " | ".join(s.upper() for s in scenes) + " |\n|---|" + "---|" * len(scenes) + "\n")
    paper = PAPER["LB-EBM (paper)"]
    rows = ["| LB-EBM (paper) | " + " | ".join(f"{paper[s][0]:.2f} / {paper[s][1]:.2f}" for s in scenes) + " |",
            "| the authors' script on these files, last epoch, mean ± std over seeds | "
            + " | ".join(_cell(ref[s], "ade", "fde") for s in scenes) + " |"]
    if ours is not None:
        mine = _records(ours)
        rows.append("| ours (`lbebm_table.py`), last epoch, mean ± std over seeds | "
                    + " | ".join(_cell(mine[s], "ade", "fde") for s in scenes) + " |")
    rows.append("| the authors' script, best test epoch (selected on the test split; for comparability only) | "
                + " | ".join(_cell(ref[s], "best_test_ade", "best_test_fde") for s in scenes) + " |")
    detail = ["", "| scene | seeds | epochs | minutes per run (training and per-epoch evaluation) |",
              "|---|---|---|---|"]
    for s in scenes:
        rs = ref[s]
        detail.append(f"| {s} | {', '.join(str(r['seed']) for r in rs)} | {rs[0]['epochs']} | "
                      f"{statistics.mean(r['seconds'] for r in rs) / 60:.1f} |")
    recs = [r for s in scenes for r in ref[s]]
    cpu = ", ".join(sorted({r["cpu"] for r in recs}))
    commits = ", ".join(sorted({str(r["reference_commit"]) for r in recs}))
    return (head + "\n".join(rows) + "\n" + "\n".join(detail)
            + f"\n\nCPU: {cpu}, one thread per run. Reference commit: {commits}.\n")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_one"]:  # internal: one reference run in this process
        script, work, mode, _, *rest = argv[1:]
        try:
            run_reference(Path(script), rest, Path(work), rotate=mode == "rotate")
        except ModuleNotFoundError as e:  # the reference reads its data with pandas and scipy
            print(f"the authors' script needs {e.name}: pip install {e.name}", file=sys.stderr)
            return 1
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="train and evaluate with the authors' scripts")
    r.add_argument("--reference", type=Path, required=True, help="a checkout of bpucla/lbebm")
    r.add_argument("--data", type=Path, required=True, help="the folder of the five ETH-UCY scenes")
    r.add_argument("--out", type=Path, required=True)
    add_grid_arguments(r)
    r.add_argument("--rotate", action="store_true",
                   help="train on the loader's rotation-augmented windows (its create_dataset's rotate option)")
    p = sub.add_parser("report", help="print the Markdown table")
    p.add_argument("out", type=Path)
    p.add_argument("--ours", type=Path, help="an `lbebm_table.py run` folder: adds our row")
    a = ap.parse_args(argv)
    if a.cmd == "report":
        print(report(a.out, a.ours))
        return 0
    missing = [s for s in a.scenes if not (a.reference / f"lbebm_{s}.py").is_file()]
    if missing:
        raise UsageError(f"{a.reference} lacks lbebm_{missing[0]}.py: --reference takes a checkout of bpucla/lbebm")
    missing = [s for s in a.scenes if not (a.data / s / "test").is_dir()]
    if missing:
        raise UsageError(f"{a.data / missing[0] / 'test'} not found: --data takes the ETH-UCY folder "
                         "(<scene>/{train,val,test}/*.txt)")
    a.out.mkdir(parents=True, exist_ok=True)
    ref, data, out = a.reference.resolve(), a.data.resolve(), a.out.resolve()
    failed = run_grid(ap, a, lambda scene, seed, epochs: run_one(ref, data, out, scene, seed, epochs, a.rotate))
    print(report(a.out))
    return 1 if failed else 0


if __name__ == "__main__":
    exit_on_usage_error(main, "lbebm_reference.py")
