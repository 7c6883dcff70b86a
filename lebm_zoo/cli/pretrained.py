"""``lebm-zoo pretrained`` and ``lebm-zoo sample``: the shipped registry on the command line, and samples of any model
:func:`~lebm_zoo.load_pretrained` reads::

    lebm-zoo pretrained [--json]         # the registry: name, family, recipe, data, size (MB), metrics
    lebm-zoo sample NAME_OR_PATH [-n 64] [-o grid.png] [--seed 0] [--device cpu]

``sample`` takes a registry name, a folder written by ``save_pretrained``, a ``.ckpt``, a run folder or an
``hf://owner/repo[@revision]`` id. Image models write a grid PNG (default ``<name>_samples.png`` in the current
folder) and print its path; sequence models print one sentence or SMILES per line (SMILES marked ``valid`` /
``invalid`` by RDKit), or write the lines to ``-o FILE.txt``. The same seed gives the same output.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

import torch

__all__ = ["main_pretrained", "main_sample", "CHUNK"]

#: samples drawn per call when ``-n`` is larger (with a progress bar)
CHUNK = 256


def _error(message: str) -> int:
    print(f"lebm-zoo: error: {message}", file=sys.stderr)
    return 2


def _metric_value(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _metrics(metrics: dict) -> str:
    return " ".join(f"{k}={_metric_value(m.get('value') if isinstance(m, dict) else m)}" for k, m in metrics.items())


def main_pretrained(argv: list[str]) -> int:
    """``lebm-zoo pretrained [--json]``: print the shipped models. Returns 0 (2 for an unreadable registry)."""
    from lebm_zoo.pretrained import CheckpointError, list_pretrained

    parser = argparse.ArgumentParser(prog="lebm-zoo pretrained",
                                     description="The models shipped with lebm-zoo (load them with "
                                                 "lebm_zoo.load_pretrained(NAME) or `lebm-zoo sample NAME`).")
    parser.add_argument("--json", action="store_true", help="print the entries as a JSON list")
    args = parser.parse_args(argv)
    try:
        entries = list_pretrained()
    except CheckpointError as e:
        return _error(str(e))
    if args.json:
        rows = [{**dataclasses.asdict(e), "path": str(e.path)} for e in entries]
        print(json.dumps(rows, indent=2))
        return 0
    if not entries:
        print("no pretrained models are shipped with this version of lebm-zoo")
        return 0
    header = ("name", "family", "recipe", "data", "MB", "metrics")
    rows = [(e.name, e.family, e.recipe or "-", e.data or "-", f"{e.size / 1e6:.2f}", _metrics(e.metrics) or "-")
            for e in entries]
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    for r in (header, *rows):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return 0


def _default_stem(source: str) -> str:
    """A file-name stem for the samples of ``source``: the registry name, the Hub repo, the folder or file name."""
    if source.startswith("hf://"):
        return source[5:].split("@", 1)[0].rstrip("/").rsplit("/", 1)[-1] or "samples"
    p = Path(source)
    if p.name in ("config.json", "model.safetensors"):
        p = p.parent
    name = p.stem if p.suffix == ".ckpt" else p.name
    return name or "samples"


def _draw(model, n: int):
    """``model.sample(n)``, in chunks of :data:`CHUNK` with a progress bar when ``n`` is larger."""
    if n <= CHUNK:
        return model.sample(n)
    from tqdm import tqdm

    parts = []
    with tqdm(total=n, desc="sampling", unit="sample", file=sys.stderr) as bar:
        for start in range(0, n, CHUNK):
            k = min(CHUNK, n - start)
            parts.append(model.sample(k))
            bar.update(k)
    if isinstance(parts[0], torch.Tensor):
        return torch.cat(parts)
    return [s for part in parts for s in part]


def _smiles_lines(samples: list[str]) -> list[str]:
    """Each SMILES prefixed ``valid`` or ``invalid``: RDKit parses it (an empty string is invalid)."""
    from rdkit import Chem, RDLogger

    RDLogger.DisableLog("rdApp.*")  # RDKit's own parse errors, one per invalid string, would flood stderr
    return [f"{'valid  ' if s and Chem.MolFromSmiles(s) is not None else 'invalid'}  {s}" for s in samples]


def _trajectory_picture(model, args, out: Path | None) -> int:
    """``-n`` predicted futures for each of :func:`~lebm_zoo.callbacks.trajectory.demo_pasts`, drawn as a PNG."""
    from lebm_zoo.callbacks.trajectory import demo_pasts, plot_trajectories

    out = out if out is not None else Path(f"{_default_stem(args.model)}_samples.png")
    if out.suffix.lower() != ".png":
        return _error(f"-o {out}: {type(model).__name__} samples are drawn as a picture; give a .png file")
    try:
        path = plot_trajectories(model, demo_pasts(model.hparams.past_length).to(model.device), out,
                                 n_samples=args.n)
    except (ValueError, OSError) as e:
        return _error(f"-o {out}: cannot write the image ({type(e).__name__}: {e})")
    print(path)
    return 0


def main_sample(argv: list[str]) -> int:
    """``lebm-zoo sample NAME_OR_PATH [-n N] [-o OUT] [--seed S] [--device D]``.

    Returns:
        0, or 2 (one line on stderr) for an unknown name, an unreadable checkpoint, ``-n`` < 1 or an output the
        samples cannot be written to.
    """
    from lebm_zoo.checkpoint import CheckpointError
    from lebm_zoo.pretrained import load_pretrained

    parser = argparse.ArgumentParser(
        prog="lebm-zoo sample",
        description="Sample a trained model: a grid PNG for image models, one sentence or SMILES per line for "
                    "sequence models (SMILES marked valid/invalid by RDKit), a PNG of -n predicted futures for each "
                    "of eight made-up observed pasts for trajectory models.")
    parser.add_argument("model", metavar="NAME_OR_PATH",
                        help="a name from `lebm-zoo pretrained`, a save_pretrained folder, a .ckpt, a run folder "
                             "or hf://owner/repo[@revision]")
    parser.add_argument("-n", "--num-samples", type=int, default=64, dest="n", help="samples to draw (default 64)")
    parser.add_argument("-o", "--out", type=Path, default=None,
                        help="image models: the PNG (default <name>_samples.png here); sequence models: a .txt file "
                             "for the lines (default: print them)")
    parser.add_argument("--seed", type=int, default=0, help="torch seed (default 0): the same seed, the same samples")
    parser.add_argument("--device", default="cpu", help="device to sample on (default cpu; e.g. cuda)")
    args = parser.parse_args(argv)
    if args.n < 1:
        return _error(f"-n must be at least 1, got {args.n}")
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        return _error(f"--device {args.device}: {e}")
    if device.type == "cuda" and not torch.cuda.is_available():
        return _error(f"--device {args.device}: no CUDA device is available here (torch {torch.__version__}, "
                      f"CUDA build: {torch.version.cuda or 'no'}); use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        return _error(f"--device {args.device}: there are {torch.cuda.device_count()} CUDA devices here")
    try:
        model = load_pretrained(args.model, map_location=device)
    except CheckpointError as e:
        return _error(str(e))
    out = args.out.expanduser() if args.out is not None else None
    torch.manual_seed(args.seed)
    if callable(getattr(model, "best_of_k_errors", None)):  # a trajectory model: futures over observed pasts
        return _trajectory_picture(model, args, out)
    samples = _draw(model, args.n)  # the chains enable gradients themselves

    if isinstance(samples, torch.Tensor) and samples.ndim == 4:
        from torchvision.utils import make_grid, save_image

        out = out if out is not None else Path(f"{_default_stem(args.model)}_samples.png")
        x = (samples.detach().float().cpu().clamp(-1, 1) + 1) / 2
        grid = make_grid(x, nrow=math.ceil(math.sqrt(args.n)))
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            save_image(grid, out)
        except (ValueError, KeyError, OSError) as e:
            return _error(f"-o {out}: cannot write the image ({type(e).__name__}: {e})")
        print(out)
        return 0

    if isinstance(samples, list) and all(isinstance(s, str) for s in samples):
        smiles = model.hparams.get("sep", " ") != " "
        lines = _smiles_lines(samples) if smiles else list(samples)
    elif isinstance(samples, torch.Tensor) and samples.ndim == 2:  # points (e.g. a 2-D toy model): one row a line
        lines = [" ".join(f"{v:.6g}" for v in row) for row in samples.detach().float().cpu().tolist()]
    else:
        shape = tuple(samples.shape) if isinstance(samples, torch.Tensor) else type(samples).__name__
        return _error(f"{type(model).__name__}.sample returned {shape}: not images (n, C, H, W), texts or points")
    if out is None:
        print("\n".join(lines))
        return 0
    if out.suffix != ".txt":
        return _error(f"-o {out}: {type(model).__name__} samples are text; write them to a .txt file (or omit -o "
                      "to print them)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    except OSError as e:
        return _error(f"-o {out}: cannot write it ({e.strerror or e})")
    print(out)
    return 0
