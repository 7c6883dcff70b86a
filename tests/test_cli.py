"""The `lebm-zoo` command: recipes, training a few steps on real-format data, resume, test, clear errors."""
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch

import lebm_zoo
from lebm_zoo.cli import list_recipes, main

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {"quickstart", "svhn_prior", "cifar10_prior", "celeba64_prior", "mnist_prior"}
FAST = ["--trainer.enable_progress_bar", "false"]


def run(args, capsys):
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_recipes_are_listed_with_descriptions(capsys):
    assert RECIPES <= set(list_recipes())
    code, out, _ = run(["recipes"], capsys)
    assert code == 0
    for name in RECIPES:
        line = next(ln for ln in out.splitlines() if ln.strip().startswith(name + " "))
        assert len(line.split(None, 1)[1]) > 20  # a real description


def test_unknown_recipe_lists_the_valid_ones(capsys):
    code, _, err = run(["fit", "--recipe", "svhn_prio"], capsys)
    assert code == 2
    assert "unknown recipe 'svhn_prio'" in err and all(name in err for name in RECIPES)


def quickstart(tmp_path, *extra):
    return ["--recipe", "quickstart", "--trainer.default_root_dir", str(tmp_path), "--trainer.max_steps", "2",
            "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1", *FAST, *extra]


def test_quickstart_fit_resume_test_and_load(tmp_path, capsys):
    code, _, err = run(["fit", *quickstart(tmp_path)], capsys)
    assert code == 0, err
    lasts = list(tmp_path.rglob("last.ckpt"))
    assert len(lasts) == 1
    assert list(tmp_path.rglob("samples/*.png")), "SampleGrid wrote no PNG"
    ckpt = torch.load(lasts[0], weights_only=True)
    assert ckpt["global_step"] == 2 and ckpt["lebm_zoo"]["recipe"] == "quickstart"

    # resume: --ckpt_path last finds the run above and continues to step 4
    code, _, err = run(["fit", *quickstart(tmp_path, "--trainer.max_steps", "4", "--ckpt_path", "last")], capsys)
    assert code == 0, err
    assert "using" in err and str(lasts[0]) in err
    newest = max(tmp_path.rglob("last.ckpt"), key=lambda p: p.stat().st_mtime)
    assert torch.load(newest, weights_only=True)["global_step"] == 4

    # test: the recipe's metric callbacks report on the test split
    code, out, err = run(["test", "--recipe", "quickstart", "--trainer.default_root_dir", str(tmp_path),
                          "--trainer.limit_test_batches", "1", *FAST, "--ckpt_path", "last"], capsys)
    assert code == 0, err
    assert "test/recon_mse" in out

    model = lebm_zoo.load_pretrained(newest)
    assert isinstance(model, lebm_zoo.LatentEBMPrior) and not model.training
    assert model.sample(4).shape == (4, 1, 28, 28)


def test_divergence_is_a_clean_stop_with_a_message(tmp_path, capsys):
    code, _, err = run(["fit", *quickstart(tmp_path, "--trainer.max_steps", "5", "--model.llhd_sigma", "1e-30")],
                       capsys)
    assert code == 1
    assert "diverged" in err and "Traceback" not in err and "no checkpoint was written at the stop" in err
    assert not list(tmp_path.rglob("*.ckpt")), "weights of a diverged step were saved"


def test_missing_data_and_bad_checkpoint_are_clear_errors(tmp_path, capsys):
    empty = tmp_path / "nothing"
    empty.mkdir()
    code, _, err = run(["fit", "--recipe", "mnist_prior", "--data.data_dir", str(empty), "--data.download", "false",
                        "--trainer.default_root_dir", str(tmp_path), *FAST], capsys)
    assert code == 2
    assert str(empty.resolve()) in err and "--data.download" in err and "Traceback" not in err

    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    code, _, err = run(["test", *quickstart(tmp_path), "--ckpt_path", str(bad)], capsys)
    assert code == 2 and "corrupt or truncated" in err

    code, _, err = run(["test", *quickstart(tmp_path / "fresh"), "--ckpt_path", "last"], capsys)
    assert code == 2 and "no last.ckpt of recipe quickstart" in err
    # fit with --ckpt_path last and nothing to resume starts from scratch (set-and-forget resuming)
    code, _, err = run(["fit", *quickstart(tmp_path / "fresh", "--trainer.max_steps", "1"), "--ckpt_path", "last"],
                       capsys)
    assert code == 0 and "starting from scratch" in err


def write_svhn(root: Path, n: int, seed: int) -> None:
    """SVHN's on-disk format: X uint8 (32, 32, 3, N), y (N, 1) with labels 1..10 (10 is the digit 0)."""
    rng = np.random.default_rng(seed)
    for split in ("train", "test"):
        x = rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)
        y = rng.integers(1, 11, size=(n, 1)).astype(np.uint8)
        scipy.io.savemat(root / f"{split}_32x32.mat", {"X": x, "y": y})


def test_svhn_prior_recipe_trains_on_svhn_format_files(tmp_path, capsys, fid_weights_env):
    data = tmp_path / "svhn"
    data.mkdir()
    write_svhn(data, n=16, seed=0)
    code, _, err = run(["fit", "--recipe", "svhn_prior", "--data.data_dir", str(data), "--data.download", "false",
                        "--data.batch_size", "8", "--data.num_workers", "0", "--trainer.max_steps", "2",
                        "--trainer.limit_val_batches", "1", "--trainer.default_root_dir", str(tmp_path), *FAST],
                       capsys)
    assert code == 0, err
    model = lebm_zoo.load_pretrained(tmp_path)  # a run folder: its newest last.ckpt
    assert model.hparams.prior_steps == 60 and model.hparams.nz == 100
    assert model.sample(2).shape == (2, 3, 32, 32)


def test_wheel_ships_recipes_datamodules_and_embedded_digits(tmp_path):
    """A non-editable install must still resolve --recipe and the quickstart data."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("lebm_zoo-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"lebm_zoo/recipes/{r}.yaml" for r in RECIPES} <= names
    assert "datamodules/__init__.py" in names and "lebm_zoo/cli/__init__.py" in names and "lebm_zoo/cli/fit.py" in names
    assert "lebm_zoo/assets/mnist-t10k-images-idx3-ubyte.gz" in names
    assert any(n.endswith("entry_points.txt") for n in names)


_FAULTS = """
import resource, sys, torch
from lebm_zoo import LatentEBMPrior
from lebm_zoo.utils import tune_cpu_allocator
tuned = tune_cpu_allocator() if sys.argv[1] == "tuned" else None
torch.manual_seed(0)
m = LatentEBMPrior()
x = torch.rand(100, 3, 32, 32) * 2 - 1
m.infer_latent(x, n_steps=2)
counts = []
for _ in range(3):  # the fewest of three: a thread's first stack pages can land in any one call
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    m.infer_latent(x, n_steps=3)
    counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
print(tuned, min(counts))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator (Linux) only")
def test_tuned_allocator_reuses_chain_buffers_instead_of_page_faulting_them_back():
    # The SVHN-recipe posterior chain frees and re-allocates megabyte activations every step; with glibc's defaults
    # they go back to the OS and are page-faulted in again (about 19,000 faults per fp32 step measured); tuned, they
    # are reused.
    def faults(mode):
        out = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, check=True)
        tuned, n = out.stdout.split()
        return tuned, int(n)

    tuned, n_tuned = faults("tuned")
    _, n_default = faults("default")
    assert tuned == "True"
    assert n_default > 3000 and n_tuned < n_default / 10, (n_default, n_tuned)


def test_a_divergence_keeps_the_earlier_last_ckpt(tmp_path, capsys):
    # issue 30: last.ckpt held the weights after the update that made the losses non-finite, so a resume with a
    # smaller learning rate diverged again at once. 2 good steps, then a learning rate that wrecks the weights.
    code, _, _ = run(["fit", *quickstart(tmp_path, "--trainer.max_steps", "2")], capsys)
    assert code == 0
    (last,) = tmp_path.rglob("last.ckpt")
    code, _, err = run(["fit", *quickstart(tmp_path, "--trainer.max_steps", "8", "--model.lr_g", "1e30",
                                           "--model.lr_e", "1e30"), "--ckpt_path", str(last)], capsys)
    assert code == 1 and "diverged" in err
    assert list(tmp_path.rglob("last.ckpt")) == [last]  # --ckpt_path last finds the step-2 weights again
