"""``lebm-zoo pretrained`` and ``lebm-zoo sample`` (lebm_zoo/cli/pretrained.py)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import lebm_zoo.cli.pretrained as pretrained_cli
from lebm_zoo import SequenceLatentEBMPrior
from lebm_zoo.cli import main
from lebm_zoo.text import Vocabulary

NAME = "lebm-mnist-quickstart"


def test_pretrained_table(capsys):
    assert main(["pretrained"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith(NAME))
    assert "LatentEBMPrior" in row and "quickstart" in row and "recon_mse=0.026" in row and "0.88" in row


def test_pretrained_json(capsys):
    assert main(["pretrained", "--json"]) == 0
    entries = json.loads(capsys.readouterr().out)
    entry = next(e for e in entries if e["name"] == NAME)
    assert entry["family"] == "LatentEBMPrior" and entry["metrics"]["recon_mse"]["value"] == pytest.approx(0.026, 1e-2)
    assert entry["size"] > 0


def _pixels(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_sample_image_grid(tmp_path, capsys):
    a, b, c = tmp_path / "new" / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    for path, seed in ((a, "1"), (b, "1"), (c, "2")):
        assert main(["sample", NAME, "-n", "4", "-o", str(path), "--seed", seed]) == 0
        assert capsys.readouterr().out.strip() == str(path)
    pa, pb, pc = _pixels(a), _pixels(b), _pixels(c)
    assert pa.shape == (2 * (28 + 2) + 2, 2 * (28 + 2) + 2, 3)  # a 2x2 grid, torchvision's padding of 2
    assert a.read_bytes() == b.read_bytes() and np.array_equal(pa, pb)
    assert not np.array_equal(pa, pc)


def test_sample_default_output(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["sample", NAME, "-n", "3"]) == 0
    assert capsys.readouterr().out.strip() == f"{NAME}_samples.png"
    assert _pixels(tmp_path / f"{NAME}_samples.png").shape == (62, 62, 3)  # nrow = ceil(sqrt(3)) = 2


def test_sample_errors(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["sample", "no-such-model", "-n", "4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lebm-zoo: error: ") and NAME in err and len(err.strip().splitlines()) == 1
    assert main(["sample", NAME, "-n", "0"]) == 2
    assert "-n" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def _sequence_folder(tmp_path, smiles: bool):
    tokens, sep = (["C", "c", "1", "O", "N", "(", ")", "="], "") if smiles else (["a", "b", "c", "d"], " ")
    model = SequenceLatentEBMPrior(vocab=Vocabulary(tokens, sep).to_list(), sep=sep, nz=2, ndf=8, emb_dim=8,
                                   hidden=8, prior_steps=3, posterior_steps=3, max_decode_length=8)
    return model.save_pretrained(tmp_path / ("smiles" if smiles else "words"))


def test_sample_sentences(tmp_path, capsys):
    folder = _sequence_folder(tmp_path, smiles=False)
    assert main(["sample", str(folder), "-n", "5", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert len(out.split("\n")) == 5 + 1  # one line a sentence, then the final newline
    assert main(["sample", str(folder), "-n", "5", "--seed", "3"]) == 0
    assert capsys.readouterr().out == out


def test_sample_smiles_marked_and_chunked(tmp_path, monkeypatch, capsys):
    pytest.importorskip("rdkit", reason="RDKit is not installed")  # it marks the samples (not on the GPU machine)
    from rdkit import Chem, RDLogger

    RDLogger.DisableLog("rdApp.*")
    folder = _sequence_folder(tmp_path, smiles=True)
    monkeypatch.setattr(pretrained_cli, "CHUNK", 2)  # 5 samples in chunks of 2, with a progress bar
    out_file = tmp_path / "txt" / "smiles.txt"
    assert main(["sample", str(folder), "-n", "5", "-o", str(out_file)]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(out_file) and "sampling" in captured.err
    lines = out_file.read_text().splitlines()
    assert len(lines) == 5
    for line in lines:
        mark, _, smiles = line.partition("  ")
        assert mark.strip() in ("valid", "invalid")
        valid = bool(smiles.strip()) and Chem.MolFromSmiles(smiles.strip()) is not None
        assert (mark.strip() == "valid") == valid
    assert main(["sample", str(folder), "-n", "5"]) == 0  # printed instead: the same lines (seed 0, chunked too)
    assert capsys.readouterr().out.splitlines() == lines
    assert main(["sample", str(folder), "-n", "2", "-o", str(tmp_path / "s.png")]) == 2
    assert ".txt" in capsys.readouterr().err


# ------------------------------------------------------------- `lebm-zoo test --recipe R --ckpt_path NAME`
def _entries():
    from lebm_zoo.pretrained import list_pretrained

    return list_pretrained()


@pytest.mark.parametrize("entry", _entries(), ids=lambda e: e.name)
def test_every_published_name_becomes_a_checked_checkpoint_of_its_recipe(entry):
    """For each registry entry, ``--ckpt_path NAME`` with its own recipe gives a Lightning checkpoint that the checked
    reader accepts and that rebuilds the same model (weights and hyperparameters) as ``load_pretrained(NAME)``."""
    import lebm_zoo
    from lebm_zoo.checkpoint import read_checkpoint
    from lebm_zoo.cli.fit import _published_checkpoint, recipe_path

    assert entry.recipe and recipe_path(entry.recipe).is_file()
    path = _published_checkpoint(entry.name, ["test"], entry.recipe)
    ckpt = read_checkpoint(path)
    assert ckpt["lebm_zoo"]["recipe"] == entry.recipe and ckpt["hyper_parameters"]["_class_path"].endswith(
        entry.family)
    a, b = lebm_zoo.load_pretrained(path), lebm_zoo.load_pretrained(entry.name)
    assert type(a) is type(b) and a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_cli_test_evaluates_a_published_name(tmp_path, capsys):
    args = ["test", "--recipe", "quickstart", "--ckpt_path", NAME, "--data.num_workers", "0",
            "--trainer.limit_test_batches", "1", "--trainer.enable_progress_bar", "false",
            "--trainer.default_root_dir", str(tmp_path)]
    assert main(args) == 0, capsys.readouterr().err
    assert f"--ckpt_path {NAME}: the published weights" in capsys.readouterr().err
    assert main(["fit", *args[1:]]) == 2
    assert "is a published model" in capsys.readouterr().err
    args[2] = "mnist_prior"
    assert main(args) == 2
    assert f"{NAME} was trained by recipe quickstart, not mnist_prior" in capsys.readouterr().err
