"""The command line: resuming with overrides, foreign checkpoints, user errors as one line with exit code 2, no empty
run folders, and checkpoint writes that leave no temporary files."""
import os
import subprocess
import sys
import tempfile

import pytest
import torch

from lebm_zoo.checkpoint import AtomicCheckpointIO
from lebm_zoo.cli import main

FAST = ["--trainer.enable_progress_bar", "false", "--trainer.limit_val_batches", "0"]


def quick(root, *extra, steps=2):
    return ["fit", "--recipe", "quickstart", "--trainer.default_root_dir", str(root), "--trainer.max_steps", str(steps),
            "--model.prior_steps", "2", "--model.posterior_steps", "2", *FAST, *extra]


def newest_last(root):
    return max(root.rglob("last.ckpt"), key=lambda p: p.stat().st_mtime)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    assert main(quick(root)) == 0
    return root


def test_resume_applies_chain_step_size_and_lr_overrides(trained, capsys, tmp_path):
    root = tmp_path / "r"
    root.mkdir()
    src = newest_last(trained)
    code = main(quick(root, "--ckpt_path", str(src), "--model.prior_steps", "7", "--model.posterior_step_size", "0.05",
                      "--model.lr_g", "0.001", steps=3))
    err = capsys.readouterr().err
    assert code == 0, err
    assert "resuming with --model.prior_steps 7" in err and "--model.lr_g 0.001" in err
    ckpt = torch.load(newest_last(root), weights_only=True)
    hp = ckpt["hyper_parameters"]
    assert (hp["prior_steps"], hp["posterior_step_size"], hp["lr_g"]) == (7, 0.05, 0.001)
    assert hp["posterior_steps"] == 2 and ckpt["global_step"] == 3  # the rest from the checkpoint; one more step
    group = ckpt["optimizer_states"][0]["param_groups"][0]
    assert group["lr"] == pytest.approx(1e-3) and group["initial_lr"] == pytest.approx(1e-3)
    assert ckpt["lr_schedulers"][0]["base_lrs"] == [pytest.approx(1e-3)]


def test_resume_refuses_an_architecture_override_naming_the_checkpoint_keys(trained, capsys, tmp_path):
    code = main(quick(tmp_path, "--ckpt_path", str(newest_last(trained)), "--model.nz", "8", "--model.ngf", "4"))
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "come from the checkpoint" in err and "nz (checkpoint: 32, command line: 8)" in err and "ngf" in err


def test_a_checkpoint_of_another_family_is_refused_naming_both(trained, capsys, tmp_path):
    code = main(["fit", "--recipe", "toy2d_fce", "--trainer.default_root_dir", str(tmp_path), *FAST,
                 "--ckpt_path", str(newest_last(trained))])
    err = capsys.readouterr().err
    assert code == 2
    assert "holds a LatentEBMPrior checkpoint" in err and "FlowContrastiveEBM" in err and "toy2d_fce" in err
    code = main(["test", "--recipe", "toy2d_fce", "--trainer.default_root_dir", str(tmp_path), *FAST,
                 "--ckpt_path", str(newest_last(trained))])
    assert code == 2 and "holds a LatentEBMPrior checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--model.llhd_sigma", "-1"], "LatentEBMPrior: llhd_sigma must be > 0, got -1.0"),
    (["--data.batch_size", "0"], "QuickstartMNISTDataModule: batch_size must be >= 1, got 0"),
    (["--model.nz", "0"], "nz must be >= 1"),
    (["--model.ngf", "0"], "ngf must be >= 1"),
])
def test_bad_values_are_one_line_errors_with_exit_code_2_and_leave_no_run_folder(tmp_path, capsys, extra, message):
    code = main(quick(tmp_path, *extra))
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.startswith("lebm-zoo: error:")]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in err
    assert not list((tmp_path / "lightning_logs").glob("version_*"))


def test_bad_run_folders_and_recipe_files_are_one_line_errors(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for root, message in ((afile, "a file, not a folder"), (afile / "sub", "cannot create it")):
        assert main(quick(root)) == 2
        assert message in capsys.readouterr().err
    assert main(["fit", "--recipe", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err
    assert "no such file" in err and "unknown recipe" not in err


def test_checkpoint_writes_leave_no_temporary_files(tmp_path, monkeypatch):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    assert main(quick(tmp_path / "run")) == 0
    (ckpt_dir,) = {p.parent for p in (tmp_path / "run").rglob("last.ckpt")}
    assert not [p for p in ckpt_dir.iterdir() if ".tmp-" in p.name]
    assert not list(tmp.iterdir())  # nothing written through the system's temp folder (Lightning's default would)
    # what a run killed while writing leaves: a temporary of a process that no longer exists; the next save removes it
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = ckpt_dir / f".last.ckpt.tmp-{int(dead.stdout)}"
    stale.write_bytes(b"half a checkpoint")
    mine = ckpt_dir / f".last.ckpt.tmp-{os.getppid()}"  # a live process's write in progress is left alone
    mine.write_bytes(b"in progress")
    AtomicCheckpointIO().save_checkpoint({"w": torch.ones(1)}, ckpt_dir / "other.ckpt")
    assert not stale.exists() and mine.exists()


def test_atomic_checkpoint_io_replaces_the_file_in_place(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "a" / "x.ckpt"
    io.save_checkpoint({"w": torch.ones(2)}, path)
    io.save_checkpoint({"w": torch.zeros(2)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.zeros(2))
    assert os.listdir(path.parent) == ["x.ckpt"]


def test_public_errors_are_exported_and_raised(tmp_path):
    import lebm_zoo

    assert {"DataShapeError", "TrainingDivergedError", "CheckpointError"} <= set(lebm_zoo.__all__)
    m = lebm_zoo.LatentEBMPrior(img_size=28, channels=1, nz=4, ngf=2, ndf=8)
    m.raise_if_diverged()  # healthy: nothing
    m.stop_training("diverged at step 3")
    with pytest.raises(lebm_zoo.TrainingDivergedError, match="diverged at step 3"):
        m.raise_if_diverged()


@pytest.mark.parametrize("signum, code", [(15, 143), (2, 130)])
def test_a_signal_stops_the_cli_with_its_exit_code_after_writing_last_ckpt(tmp_path, capsys, signum, code):
    # issue 30 finding 4: SIGTERM ended `lebm-zoo fit` with exit code 0 (a preempted job reported success) and SIGINT
    # with 1, both losing the steps since the last periodic checkpoint
    args = quick(tmp_path, "--trainer.callbacks+=test_resume.SendSignal", "--trainer.callbacks.signum", str(signum),
                 "--trainer.callbacks.at", "1", steps=6)
    assert main(args) == code
    err = capsys.readouterr().err
    assert f"stopped by {'SIGTERM' if signum == 15 else 'SIGINT'} after step 2; last.ckpt written" in err
    assert "Traceback" not in err
    assert torch.load(newest_last(tmp_path), weights_only=True)["global_step"] == 2
    assert main(quick(tmp_path, "--ckpt_path", "last", steps=4)) == 0
    assert torch.load(newest_last(tmp_path), weights_only=True)["global_step"] == 4


def _moses(folder, train):
    import gzip

    from _data import FIXTURES

    good = [s.strip() for s in (FIXTURES / "zinc" / "moses_train_400.txt").read_text().splitlines() if s.strip()]
    folder.mkdir()
    for name, rows in (("train.csv.gz", train(good)), ("test.csv.gz", good[:20])):
        with gzip.open(folder / name, "wt") as f:
            f.write("SMILES\n" + "".join(r + "\n" for r in rows))
    return folder


def _empty_ptb(folder):
    import shutil

    from _data import FIXTURES

    shutil.copytree(FIXTURES / "ptb", folder)
    (folder / "ptb.train.txt").write_text("")
    return folder


USER_ERRORS = {  # issue 30 finding 6: each ended in exit code 1 and a traceback
    "empty ptb.train.txt": (lambda d: ["fit", "--recipe", "ptb_prior", "--data.data_dir", str(_empty_ptb(d / "ptb"))],
                            "the training split is empty: no sentence in its training file"),
    "MOSES header only": (lambda d: ["fit", "--recipe", "moses_prior", "--data.data_dir",
                                     str(_moses(d / "m", lambda good: []))], "holds no SMILES under its header"),
    "MOSES unparsable": (lambda d: ["fit", "--recipe", "moses_prior", "--data.val_size", "1", "--data.data_dir",
                                    str(_moses(d / "m", lambda good: ["XXXX", "((((", "C1CC"]))],
                         "none of the 2 training SMILES"),
    "MOSES smaller than val_size": (lambda d: ["fit", "--recipe", "moses_prior", "--data.data_dir",
                                               str(_moses(d / "m", lambda good: good[:5]))],
                                    "holds 5 molecules and val_size=1000 takes them all"),
    "negative learning rate": (lambda d: ["fit", "--recipe", "quickstart", "--model.lr_e", "-1"],
                               "lr_e must be a learning rate > 0, got -1.0 (--model.lr_e)"),
    "test best without a best": (lambda d: ["test", "--recipe", "quickstart", "--ckpt_path", "best"],
                                 "--ckpt_path best: no last.ckpt of recipe quickstart under"),
}


@pytest.mark.parametrize("case", sorted(USER_ERRORS))
def test_user_errors_are_one_line_with_exit_code_2_and_leave_no_run_folder(case, tmp_path, capsys, monkeypatch):
    if case.startswith("MOSES"):  # the molecule datamodule parses with RDKit (not on the GPU machine)
        pytest.importorskip("rdkit", reason="RDKit is not installed")
    monkeypatch.setenv("LEBM_ZOO_CACHE", str(tmp_path / "cache"))
    make, message = USER_ERRORS[case]
    root = tmp_path / "runs"
    args = make(tmp_path) + ["--trainer.default_root_dir", str(root), "--data.num_workers", "0", *FAST]
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, err[-3000:]
    assert "Traceback" not in err and message in err, err[-3000:]
    assert len([ln for ln in err.splitlines() if ln.startswith("lebm-zoo: error:")]) == 1
    assert not list((root / "lightning_logs").glob("version_*")), "a failed start left a run folder"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a CUDA device")
def test_sample_on_cuda_without_a_gpu_is_a_one_line_error(tmp_path, capsys):
    code = main(["sample", "lebm-mnist", "--device", "cuda", "-n", "2", "-o", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "no CUDA device is available here" in err
    assert not (tmp_path / "x.png").exists()


def test_ckpt_path_last_names_each_unreadable_newer_checkpoint_it_skips(trained, tmp_path, capsys):
    # issue 30 finding 7: a corrupt newest last.ckpt was passed over in silence and an older run resumed
    import shutil

    root = tmp_path / "runs"
    old = root / "lightning_logs" / "version_0" / "checkpoints"
    new = root / "lightning_logs" / "version_1" / "checkpoints"
    old.mkdir(parents=True)
    new.mkdir(parents=True)
    shutil.copy(newest_last(trained), old / "last.ckpt")
    data = bytearray(newest_last(trained).read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in a weight
    (new / "last.ckpt").write_bytes(bytes(data))
    assert main(quick(root, "--ckpt_path", "last", steps=3)) == 0
    err = capsys.readouterr().err
    assert f"--ckpt_path last: skipping {new / 'last.ckpt'}" in err and "CRC-32" in err
    assert f"--ckpt_path last: using {old / 'last.ckpt'}" in err


def test_test_without_a_checkpoint_warns_and_dead_temporaries_are_removed(trained, tmp_path, capsys):
    # issue 30 (minor): `test` without --ckpt_path reported an untrained model's metrics in silence; the temporary
    # files of runs killed while writing a checkpoint stayed in older run folders
    import shutil

    root = tmp_path / "runs"
    shutil.copytree(trained, root)
    folder = newest_last(root).parent
    dead = folder / ".last.ckpt.tmp-999999999"  # no such process
    dead.write_bytes(b"half a checkpoint")
    code = main(["test", "--recipe", "quickstart", "--trainer.default_root_dir", str(root),
                 "--trainer.limit_test_batches", "1", *FAST])
    err = capsys.readouterr().err
    assert code == 0 and "no --ckpt_path: testing the recipe's untrained model" in err
    assert not dead.exists()


@pytest.mark.parametrize("extra, message", [
    (["--model.nonexistent", "3"], "Option 'nonexistent' is not accepted"),
    (["--trainer.max_stepz", "3"], "unrecognized arguments: --trainer.max_stepz 3"),
    ("bad.yaml", "Problems parsing config: while parsing a flow sequence"),
])
def test_flag_and_yaml_errors_are_one_line_without_the_usage(tmp_path, capsys, extra, message):
    # issue 30 (minor): these printed 50-60 lines of usage before the message
    if extra == "bad.yaml":
        (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
        extra = ["--config", str(tmp_path / "bad.yaml")]
    code = main(quick(tmp_path, *extra))
    err = capsys.readouterr().err
    assert code == 2 and message in err and "usage:" not in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


def test_a_read_only_run_folder_is_a_one_line_error(tmp_path, capsys):
    # issue 30 finding 6: a read-only lightning_logs/ ended in exit code 1 and a traceback
    logs = tmp_path / "lightning_logs"
    logs.mkdir()
    if os.geteuid() != 0:
        logs.chmod(0o555)
    elif subprocess.run(["mount", "-t", "tmpfs", "-o", "ro", "tmpfs", str(logs)], capture_output=True).returncode:
        pytest.skip("running as root without a read-only mount: a folder cannot be made read-only here")
    try:
        code = main(quick(tmp_path))
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(logs)], capture_output=True)
        logs.chmod(0o755)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert "Read-only file system" in err or "Permission denied" in err, err
    assert len([ln for ln in err.splitlines() if ln.startswith("lebm-zoo: error:")]) == 1
