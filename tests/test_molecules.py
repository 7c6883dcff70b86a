"""Molecules: SMILES tokenization, the datamodule's three sources, the RDKit metrics and the recipe via the CLI."""
import gzip
from pathlib import Path

import pytest

import lebm_zoo
from datamodules import DatasetNotFoundError, ZINCDataModule
from datamodules.molecules import canonical_smiles, tokenize_smiles
from lebm_zoo.callbacks.molecules import molecule_metrics
from lebm_zoo.cli import main

ZINC = Path(__file__).resolve().parents[2] / "shared" / "data" / "zinc"
FAST = ["--trainer.enable_progress_bar", "false"]

HARD = {  # SMILES -> expected tokens
    "C[C@@H](N)C(=O)O": ["C", "[C@@H]", "(", "N", ")", "C", "(", "=", "O", ")", "O"],  # stereo bracket atom
    "[NH4+].[O-]C(=O)c1ccccc1": ["[NH4+]", ".", "[O-]", "C", "(", "=", "O", ")", "c", "1", "c", "c", "c", "c", "c",
                                 "1"],  # charges, two fragments
    "F/C=C\\Cl": ["F", "/", "C", "=", "C", "\\", "Cl"],  # double-bond stereo, two-letter atom
    "C%10CCCCC%10Br": ["C", "%10", "C", "C", "C", "C", "C", "%10", "Br"],  # two-digit ring closure
    "c1cc[nH]c1[2H]": ["c", "1", "c", "c", "[nH]", "c", "1", "[2H]"],  # aromatic NH, isotope
}


def test_tokenizer_on_hard_cases_and_real_smiles():
    for smiles, tokens in HARD.items():
        assert tokenize_smiles(smiles) == tokens
        assert canonical_smiles(smiles) is not None  # all real molecules
    real = gzip.open(ZINC / "moses" / "train.csv.gz", "rt").read().splitlines()[1:2001]
    real += (ZINC / "zinc250k_jtvae" / "valid.txt").read_text().splitlines()[:2000]
    assert any("@" in s for s in real) and any("+" in s for s in real)  # stereo and charges among them
    for s in real:
        assert "".join(tokenize_smiles(s)) == s
    with pytest.raises(ValueError, match="cannot tokenize"):
        tokenize_smiles("CC{O}")


def test_metrics_on_a_hand_made_list():
    samples = ["CCO", "OCC", "c1ccccc1", "C1CC", "", "CC(=O)O"]  # OCC = CCO; C1CC has an unclosed ring; "" invalid
    m = molecule_metrics(samples, train_smiles={"CCO"}, reference_smiles=["CCO", "CCO", "c1ccccc1", "CC(=O)O"])
    assert m["validity"] == pytest.approx(4 / 6)
    assert m["uniqueness"] == pytest.approx(3 / 4)
    assert m["novelty"] == pytest.approx(2 / 3)
    assert 0 < m["int_div"] <= 1
    # the valid samples are exactly the reference molecules: every property distance is 0
    assert m["w_qed"] == pytest.approx(0, abs=1e-9) and m["w_mw"] == pytest.approx(0, abs=1e-9)
    far = molecule_metrics(["CCCCCCCCCCCCCCCCCCCC"], reference_smiles=["CCO"])
    assert far["w_mw"] > 200 and far["novelty"] != far["novelty"]  # NaN without a training set


def write_moses(folder: Path, n_train=300, n_test=60, bad=("C1CC", "not-a-smiles")):
    real = gzip.open(ZINC / "moses" / "train.csv.gz", "rt").read().splitlines()[1:n_train + n_test + 1]
    folder.mkdir(parents=True, exist_ok=True)
    with gzip.open(folder / "train.csv.gz", "wt") as f:
        f.write("SMILES,SPLIT\n" + "".join(f"{s},train\n" for s in [*real[:n_train], *bad]))
    with gzip.open(folder / "test.csv.gz", "wt") as f:
        f.write("SMILES,SPLIT\n" + "".join(f"{s},test\n" for s in real[n_train:]))
    return real


def test_moses_source_counts_and_skips_unreadable_molecules(tmp_path):
    real = write_moses(tmp_path / "moses")
    dm = ZINCDataModule(str(tmp_path / "moses"), val_size=20, test_size=1000)
    with pytest.warns(UserWarning, match="2 of .* could not be parsed"):
        dm.setup()
    assert sum(dm.num_invalid.values()) == 2
    assert len(dm.train_set) + len(dm.val_set) == 300 and len(dm.test_set) == 60
    assert dm.vocab.sep == "" and {"c", "C", "(", ")", "1"} <= set(dm.vocab.stoi)
    assert dm.train_smiles <= {canonical_smiles(s) for s in real[:300]}
    row = dm.train_set.rows[0]
    assert canonical_smiles(dm.vocab.decode(row)) in dm.train_smiles  # tokens decode to the molecule


def test_zinc250k_and_smiles_file_sources(tmp_path):
    real = (ZINC / "zinc250k_jtvae" / "valid.txt").read_text().splitlines()[:120]
    d = tmp_path / "zinc"
    d.mkdir()
    # the layout of 250k_rndm_zinc_drugs_clean_3.csv: quoted SMILES ending in a newline, then logP, qed, SAS
    (d / "250k_rndm_zinc_drugs_clean_3.csv").write_text(
        "smiles,logP,qed,SAS\n" + "".join(f'"{s}\n",1.0,0.5,2.0\n' for s in real))
    dm = ZINCDataModule(str(d), source="zinc250k", val_size=10, test_size=20)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (90, 10, 20)
    f = tmp_path / "mols.smi"
    f.write_text("SMILES\n" + "\n".join(real[:50]) + "\n")
    dm = ZINCDataModule(str(f), source="smiles_file", val_size=0, test_size=10, train_size=30)
    dm.setup()
    assert (len(dm.train_set), len(dm.test_set)) == (30, 10)


def test_missing_files_and_bad_arguments_are_clear_errors(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="train.csv.gz does not exist.*MOSES"):
        ZINCDataModule(str(tmp_path)).prepare_data()
    with pytest.raises(ValueError, match="source must be one of"):
        ZINCDataModule(str(tmp_path), source="chembl")
    (tmp_path / "train.csv.gz").write_bytes(b"not gzip")
    (tmp_path / "test.csv.gz").write_bytes(b"not gzip")
    with pytest.raises(DatasetNotFoundError, match="is not readable"):
        ZINCDataModule(str(tmp_path)).setup()


def test_moses_recipe_trains_and_tests_through_the_cli(tmp_path, capsys):
    write_moses(tmp_path / "moses", bad=())
    args = ["--recipe", "moses_prior", "--data.data_dir", str(tmp_path / "moses"), "--data.batch_size", "32",
            "--data.val_size", "0", "--trainer.default_root_dir", str(tmp_path / "run"), "--model.nz", "4",
            "--model.emb_dim", "8", "--model.hidden", "16", "--model.ndf", "16", "--model.prior_steps", "5",
            "--model.posterior_steps", "5", "--model.max_decode_length", "40", *FAST]
    assert main(["fit", *args, "--trainer.max_steps", "3"]) == 0, capsys.readouterr().err
    capsys.readouterr()
    ckpt = next((tmp_path / "run").rglob("last.ckpt"))
    code = main(["test", *args, "--ckpt_path", str(ckpt), "--trainer.callbacks.init_args.num_samples", "50"])
    out = capsys.readouterr()
    assert code == 0, out.err
    line = next(ln for ln in out.out.splitlines() if "test/validity" in ln)
    assert 0 <= float(line.split()[-1]) <= 1  # an untrained decoder: few or no valid molecules yet
    assert len(next((tmp_path / "run").rglob("test_samples.smi")).read_text().splitlines()) == 50
    assert next((tmp_path / "run").rglob("test_properties.png")).stat().st_size > 1000
    model = lebm_zoo.load_pretrained(str(ckpt))
    smiles = model.sample(5)
    assert len(smiles) == 5 and all(isinstance(s, str) for s in smiles)
    assert model.vocabulary.sep == ""
    assert float(model.log_joint(model.encode(["CCO", "c1ccccc1"]), model.sample_latent(2)).max()) < 0
