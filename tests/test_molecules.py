"""Molecules: SMILES tokenization, the datamodule's three sources, the RDKit metrics and the recipe via the CLI."""
import gzip
import hashlib
import json
import logging
import os
import warnings
from pathlib import Path

import pytest
import rdkit
from _data import DATA_ROOT, FIXTURES

import lebm_zoo
from datamodules import DatasetNotFoundError, ZINCDataModule
from datamodules.molecules import canonical_smiles, tokenize_smiles
from lebm_zoo.callbacks.molecules import molecule_metrics
from lebm_zoo.cli import main

ZINC = DATA_ROOT / "zinc"
MOSES_400 = (FIXTURES / "zinc" / "moses_train_400.txt").read_text().splitlines()  # real MOSES training SMILES
ZINC250K_200 = (FIXTURES / "zinc" / "zinc250k_valid_200.txt").read_text().splitlines()  # real ZINC250k SMILES
FAST = ["--trainer.enable_progress_bar", "false"]

HARD = {  # SMILES -> expected tokens
    "C[C@@H](N)C(=O)O": ["C", "[C@@H]", "(", "N", ")", "C", "(", "=", "O", ")", "O"],  # stereo bracket atom
    "[NH4+].[O-]C(=O)c1ccccc1": ["[NH4+]", ".", "[O-]", "C", "(", "=", "O", ")", "c", "1", "c", "c", "c", "c", "c",
                                 "1"],  # charges, two fragments
    "F/C=C\\Cl": ["F", "/", "C", "=", "C", "\\", "Cl"],  # double-bond stereo, two-letter atom
    "C%10CCCCC%10Br": ["C", "%10", "C", "C", "C", "C", "C", "%10", "Br"],  # two-digit ring closure
    "c1cc[nH]c1[2H]": ["c", "1", "c", "c", "[nH]", "c", "1", "[2H]"],  # aromatic NH, isotope
}


def assert_tokens_spell(smiles):
    assert any("@" in s for s in smiles) and any("+" in s for s in smiles)  # stereo and charges among them
    for s in smiles:
        assert "".join(tokenize_smiles(s)) == s


def test_tokenizer_on_hard_cases_and_real_smiles():
    for smiles, tokens in HARD.items():
        assert tokenize_smiles(smiles) == tokens
        assert canonical_smiles(smiles) is not None  # all real molecules
    assert_tokens_spell(MOSES_400 + ZINC250K_200)
    with pytest.raises(ValueError, match="cannot tokenize"):
        tokenize_smiles("CC{O}")


@pytest.mark.realdata("zinc/moses/train.csv.gz", "zinc/zinc250k_jtvae/valid.txt")
def test_tokenizer_on_4000_real_smiles():
    real = gzip.open(ZINC / "moses" / "train.csv.gz", "rt").read().splitlines()[1:2001]
    real += (ZINC / "zinc250k_jtvae" / "valid.txt").read_text().splitlines()[:2000]
    assert_tokens_spell(real)


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
    real = MOSES_400[:n_train + n_test]
    assert len(real) == n_train + n_test, "the MOSES fixture holds 400 molecules"
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
    real = ZINC250K_200[:120]
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


# ------------------------------------------------------------------ the prepared-splits cache
DRUGS = [  # real molecules, most written non-canonically (RDKit rewrites them)
    "CC(=O)Oc1ccccc1C(=O)O",  # aspirin
    "CN1C=NC2=C1C(=O)N(C(=O)N2C)C",  # caffeine
    "CC(C)Cc1ccc(cc1)C(C)C(=O)O",  # ibuprofen
    "CC(=O)Nc1ccc(O)cc1",  # paracetamol
    "COc1ccc2cc(ccc2c1)C(C)C(=O)O",  # naproxen
    "CN(C)C(=N)NC(=N)N",  # metformin
    "OC(=O)Cc1ccccc1Nc1c(Cl)cccc1Cl",  # diclofenac
    "CNCCC(Oc1ccc(cc1)C(F)(F)F)c1ccccc1",  # fluoxetine
    "CN1CCC[C@H]1c1cccnc1",  # nicotine
    "C[C@]12CC[C@H]3[C@@H](CCC4=CC(=O)CC[C@]34C)[C@@H]1CC[C@@H]2O",  # testosterone
    "CC1(C)S[C@@H]2[C@H](NC(=O)Cc3ccccc3)C(=O)N2[C@H]1C(=O)O",  # penicillin G
    "CC(C)NCC(O)COc1cccc2ccccc12",  # propranolol
    "CN1C(=O)CN=C(c2ccccc2)c2cc(Cl)ccc12",  # diazepam
    "Clc1ccc(cc1)C(c1ccccc1)N1CCN(CC1)CCOCC(=O)O",  # cetirizine
    "CCOC(=O)C1=C(COCCN)NC(C)=C(C1c1ccccc1Cl)C(=O)OC",  # amlodipine
    "COc1ccc2[nH]c(nc2c1)S(=O)Cc1ncc(C)c(OC)c1C",  # omeprazole
    "CN(C)CCCN1c2ccccc2CCc2ccccc12",  # imipramine
    "NC(=O)N1c2ccccc2C=Cc2ccccc12",  # carbamazepine
    "O=C(O)c1ccccc1O",  # salicylic acid
    "CCN(CC)CC(=O)Nc1c(C)cccc1C",  # lidocaine
    "CC(C)(C)NCC(O)c1ccc(O)c(CO)c1",  # salbutamol
    "NCCc1ccc(O)c(O)c1",  # dopamine
    "CNC[C@H](O)c1ccc(O)c(O)c1",  # adrenaline
    "NCCc1c[nH]c2ccc(O)cc12",  # serotonin
    "CN1CCC23C4Oc5c3c(CC1C2C=CC4O)ccc5O",  # morphine
    "COc1ccc2c(c1)c(CC(=O)O)c(C)n2C(=O)c1ccc(Cl)cc1",  # indomethacin
    "CC1=C(C(=O)Nc2ccccn2)N(C)S(=O)(=O)c2ccccc12",  # piroxicam
    "Cc1ccc(cc1)-c1cc(nn1-c1ccc(cc1)S(N)(=O)=O)C(F)(F)F",  # celecoxib
    "CC(C)c1c(C(=O)Nc2ccccc2)c(-c2ccccc2)c(-c2ccc(F)cc2)n1CC[C@@H](O)C[C@@H](O)CC(=O)O",  # atorvastatin
    "CCCCc1nc(Cl)c(CO)n1Cc1ccc(cc1)-c1ccccc1-c1nn[nH]n1",  # losartan
    "CN1CCN(CC1)c1nc2ccccc2Nc2sc(C)cc12",  # olanzapine-like
    "OCC1OC(O)C(O)C(O)C1O",  # glucose
    "C1=CC=C(C=C1)C=O",  # benzaldehyde
    "OC(=O)CCC(=O)O",  # succinic acid
    "NC(Cc1ccccc1)C(=O)O",  # phenylalanine
    "N[C@@H](CS)C(=O)O",  # cysteine
    "CC(C)C[C@H](N)C(=O)O",  # leucine
    "O=C1NC(=O)C(N1)(c1ccccc1)c1ccccc1",  # phenytoin
    "CCC1(CC)C(=O)NC(=O)NC1=O",  # barbital
    "Nc1ccc(cc1)S(=O)(=O)Nc1ccnc(C)n1",  # sulfa drug
    "CC1=CN([C@H]2C[C@H](N=[N+]=[N-])[C@@H](CO)O2)C(=O)NC1=O",  # zidovudine
    "O=C(O)[C@@H]1CSCN1",  # thioproline
    "Cn1cnc2c1c(=O)[nH]c(=O)n2C",  # theophylline isomer
    "CC(=O)OCC[N+](C)(C)C",  # acetylcholine
    "C[N+](C)(C)CC(=O)[O-]",  # betaine
    "Oc1ccc(cc1)C=Cc1cc(O)cc(O)c1",  # resveratrol
    "COc1cc(C=O)ccc1O",  # vanillin
    "CC(C)=CCC/C(C)=C/CO",  # geraniol
    "FC(F)(F)c1ccc(Oc2ccc(cc2)[N+](=O)[O-])cc1",  # nitro diaryl ether
    "Brc1ccc(cc1)C(=O)c1ccccc1",  # 4-bromobenzophenone
    "CCOC(=O)c1ccc(N)cc1",  # benzocaine
    "CS(=O)C",  # DMSO
]
NOT_SMILES = ("C1CC", "not-a-smiles")  # an unclosed ring, not SMILES at all
SMALL = {"val_size": 5, "test_size": 8}  # 42 train strings (2 invalid) -> 5 valid + 37 train; 12 test -> 8


@pytest.fixture(autouse=True)
def _cache_in_tmp_path(tmp_path, monkeypatch):
    """Every test of this file caches prepared splits under its tmp_path, never in ~/.cache."""
    monkeypatch.setenv("LEBM_ZOO_CACHE", str(tmp_path / "cache"))


def write_drugs(folder: Path, train=(*DRUGS[:40], *NOT_SMILES), test=DRUGS[40:]) -> Path:
    """MOSES-format train.csv.gz / test.csv.gz from hard-coded molecules (same bytes for the same lists)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, smiles, split in (("train.csv.gz", train, "train"), ("test.csv.gz", test, "test")):
        text = "SMILES,SPLIT\n" + "".join(f"{s},{split}\n" for s in smiles)
        (folder / name).write_bytes(gzip.compress(text.encode(), mtime=0))
    return folder


def setup_quietly(data_dir: Path, **kwargs) -> ZINCDataModule:
    dm = ZINCDataModule(str(data_dir), **{**SMALL, **kwargs})
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*could not be parsed by RDKit")
        dm.setup()
    return dm


def test_second_setup_loads_the_prepared_splits_from_the_cache(tmp_path, monkeypatch, caplog):
    from datamodules import molecules

    d = write_drugs(tmp_path / "moses")
    chunks = []
    real_chunk = molecules._canonical_chunk
    monkeypatch.setattr(molecules, "_canonical_chunk", lambda chunk: chunks.append(len(chunk)) or real_chunk(chunk))
    first = ZINCDataModule(str(d), **SMALL)
    with pytest.warns(UserWarning, match="could not be parsed by RDKit"):
        first.setup()
    assert sum(chunks) == 42 + 8 and not first.splits_from_cache
    assert sum(first.num_invalid.values()) == 2
    path = first.cache_file
    assert path.is_file() and path.parent == tmp_path / "cache" / "molecules" and path.name.startswith("moses-")
    assert not list(path.parent.glob("*.tmp"))
    doc = json.loads(gzip.decompress(path.read_bytes()))  # gzip'd JSON, with the fields of the key
    key = doc["key_fields"]
    assert key["files"]["train"]["sha256"] == hashlib.sha256((d / "train.csv.gz").read_bytes()).hexdigest()
    assert key["rdkit"] == rdkit.__version__ and key["cache_version"] == molecules.CACHE_VERSION
    assert (key["seed"], key["val_size"], key["test_size"], key["train_size"]) == (1, 5, 8, None)

    chunks.clear()
    monkeypatch.setattr(logging.getLogger("pytorch_lightning"), "propagate", True)  # Lightning's logger: to caplog
    caplog.set_level(logging.INFO, logger="pytorch_lightning")
    os.utime(d / "train.csv.gz", (1, 1))  # a new modification time, the same bytes: still the same key
    second = ZINCDataModule(str(d), **SMALL)
    with pytest.warns(UserWarning, match="could not be parsed by RDKit"):  # the invalid counts are still reported
        second.setup()
    assert chunks == [] and second.splits_from_cache and second.cache_file == path
    assert f"loaded prepared splits from {path}" in caplog.text
    assert second._splits == first._splits and second.train_smiles == first.train_smiles
    assert second.vocab == first.vocab and second.num_invalid == first.num_invalid
    assert second.train_set.rows == first.train_set.rows and second.test_smiles == first.test_smiles
    # max_length is applied after the cache: not part of its key
    short = setup_quietly(d, max_length=20)
    assert chunks == [] and short.splits_from_cache and short.num_dropped["train"] > 0
    # an explicit cache_dir
    mine = setup_quietly(d, cache_dir=str(tmp_path / "mine"))
    assert mine.cache_file.parent == tmp_path / "mine" and mine.cache_file.is_file() and not mine.splits_from_cache


def test_changed_file_bytes_or_options_miss_the_cache(tmp_path):
    d = write_drugs(tmp_path / "moses")
    base = setup_quietly(d)
    assert not base.splits_from_cache and setup_quietly(d).splits_from_cache
    for kwargs in ({"seed": 2}, {"train_size": 10}, {"val_size": 3}, {"test_size": 4}):
        dm = setup_quietly(d, **kwargs)
        assert not dm.splits_from_cache and dm.cache_file != base.cache_file, kwargs
        assert setup_quietly(d, **kwargs).splits_from_cache, kwargs
    assert setup_quietly(d, seed=2)._splits["train"] != base._splits["train"]
    assert len(setup_quietly(d, train_size=10).train_set) == 10
    write_drugs(d, train=(*DRUGS[:39], *NOT_SMILES))  # one molecule fewer in the training file
    changed = setup_quietly(d)
    assert not changed.splits_from_cache and changed.cache_file != base.cache_file
    assert len(changed.train_set) + len(changed.val_set) == 39
    assert len(list((tmp_path / "cache" / "molecules").glob("*.json.gz"))) == 6


def test_parallel_canonicalization_gives_the_serial_result_in_order(tmp_path, monkeypatch):
    from concurrent.futures import ProcessPoolExecutor

    from datamodules import molecules

    pools = []

    class SpyPool(ProcessPoolExecutor):
        def __init__(self, *args, **kwargs):
            pools.append(args)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(molecules, "ProcessPoolExecutor", SpyPool)
    monkeypatch.setattr(ZINCDataModule, "canonical_chunksize", 4)  # 37 training strings: 10 chunks on 2 processes
    d = write_drugs(tmp_path / "moses")
    serial = setup_quietly(d, cache=False, num_workers=0)
    assert pools == []
    parallel = setup_quietly(d, cache=False, num_workers=2)
    assert pools == [(2,)]
    assert parallel._splits == serial._splits and parallel.num_invalid == serial.num_invalid
    assert parallel.vocab == serial.vocab and parallel.train_set.rows == serial.train_set.rows
    # directly, on a longer list in a scrambled order: the order of the input, invalid strings dropped
    strings = [s for i in range(5) for s in (*DRUGS[i::5], *NOT_SMILES)]
    with ProcessPoolExecutor(2) as pool:
        out = serial._canonical(strings, "train", pool)
    assert out == [c for c in map(canonical_smiles, strings) if c is not None] and len(out) == len(DRUGS)


def test_a_corrupt_or_foreign_cache_file_is_rebuilt_with_a_warning(tmp_path):
    d = write_drugs(tmp_path / "moses")
    good = setup_quietly(d)
    path = good.cache_file
    valid = path.read_bytes()
    doc = json.loads(gzip.decompress(valid))
    foreign = gzip.compress(json.dumps({**doc, "key": "0" * 64}).encode())
    tampered = gzip.compress(json.dumps({**doc, "num_invalid": {"train": 7, "valid": 0, "test": 0}}).encode())
    for bad in (b"", b"not gzip at all", valid[: len(valid) // 2], gzip.compress(b'{"splits": [1, 2'),
                gzip.compress(b"[1, 2, 3]"), foreign, tampered):
        path.write_bytes(bad)
        dm = ZINCDataModule(str(d), **SMALL)
        with pytest.warns(UserWarning, match="ignoring the prepared-splits cache .*preparing the splits again"):
            warnings.filterwarnings("ignore", message=".*could not be parsed by RDKit")
            dm.setup()
        assert not dm.splits_from_cache and dm._splits == good._splits and dm.num_invalid == good.num_invalid
        assert setup_quietly(d).splits_from_cache  # rebuilt: the next setup reads it
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary file left


def test_a_cache_that_cannot_be_written_only_warns_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    from datamodules import molecules

    def refuse(src, dst):
        raise PermissionError(13, "Permission denied", str(dst))

    d = write_drugs(tmp_path / "moses")
    monkeypatch.setattr(molecules.os, "replace", refuse)
    dm = ZINCDataModule(str(d), **SMALL)
    with pytest.warns(UserWarning, match="could not write the prepared-splits cache"):
        warnings.filterwarnings("ignore", message=".*could not be parsed by RDKit")
        dm.setup()
    assert len(dm.train_set) + len(dm.val_set) == 40
    assert list((tmp_path / "cache" / "molecules").iterdir()) == []


def test_cache_false_reads_and_writes_nothing(tmp_path):
    d = write_drugs(tmp_path / "moses")
    setup_quietly(d)  # a cache file for these options exists ...
    files = sorted((tmp_path / "cache").rglob("*"))
    first = setup_quietly(d, cache=False, cache_dir=str(tmp_path / "off"))
    second = setup_quietly(d, cache=False)  # ... and is not read
    assert first.cache_file is None and not first.splits_from_cache and not second.splits_from_cache
    assert first._splits == second._splits and not (tmp_path / "off").exists()
    assert sorted((tmp_path / "cache").rglob("*")) == files
