"""Weights and checkpoint files are trusted to hold tensors and nothing else, whichever route loads them (issue 30,
findings 1 and 2): a pickle that would run code is refused with one line and exit code 2, and its code never runs,
even with ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` (which turns off the weights-only default of loads that do not ask
for it explicitly, as torch-fidelity's and Lightning's)."""
import pytest
import torch
from _data import recipe_fit_args

from lebm_zoo.callbacks import FIDCallback, FIDWeightsNotFoundError
from lebm_zoo.cli import main
from lebm_zoo.fid_weights import read_fid_weights


class RunsCode:
    """Unpickling it creates the file ``marker`` (what an attacker's ``__reduce__`` would do, harmlessly)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def evil_file(path, marker, **extra):
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": RunsCode(marker), **extra}, path)
    return path


@pytest.fixture(autouse=True)
def no_weights_only_default(monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")


def one_line_rc2(code, capsys, *words):
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 3, err[-2000:]
    for w in words:
        assert w in err, err
    return err


# ------------------------------------------------------------------------------------------------ FID weights
def test_a_fid_weights_file_that_runs_code_is_refused_unrun(tmp_path):
    marker = tmp_path / "pwned"
    evil = evil_file(tmp_path / "evil.pth", marker)
    with pytest.raises(ValueError, match="evil.pth is not a file of the FID Inception weights"):
        read_fid_weights(evil)
    cb = FIDCallback(num_samples=2, weights_path=str(evil))
    with pytest.raises(FIDWeightsNotFoundError, match="evil.pth is not a file of the FID Inception weights"):
        cb.setup(None, None, "fit")
    torch.save({"conv.weight": torch.zeros(2)}, tmp_path / "other.pth")  # plain tensors, but not Inception's
    with pytest.raises(ValueError, match="other.pth is not a file of the FID Inception weights"):
        read_fid_weights(tmp_path / "other.pth")
    assert not marker.exists()


def test_the_checked_weights_reach_the_metric_in_memory(fid_weights_file):
    buf = read_fid_weights(fid_weights_file)
    sd = torch.load(buf, weights_only=True)
    assert sd.keys() == torch.load(fid_weights_file, weights_only=True).keys()
    cb = FIDCallback(num_samples=2, weights_path=str(fid_weights_file))
    cb.setup(None, None, "fit")
    got = cb.metric.inception.state_dict()
    assert all(torch.equal(got[k], v.to(got[k].dtype)) for k, v in list(sd.items())[:5])


def test_the_cli_refuses_a_fid_weights_file_that_runs_code(tmp_path, fake_mnist_dir, capsys, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("LEBM_ZOO_FID_WEIGHTS", str(evil_file(tmp_path / "evil.pth", marker)))
    code = main(recipe_fit_args("mnist_prior", fake_mnist_dir, tmp_path / "runs", "--trainer.max_steps", "1",
                                "--model.prior_steps", "2", "--model.posterior_steps", "2"))
    one_line_rc2(code, capsys, "evil.pth is not a file of the FID Inception weights")
    assert not marker.exists()


# ----------------------------------------------------------------------------------- checkpoints Lightning finds
QUICK = ["--trainer.max_steps", "1", "--model.prior_steps", "2", "--model.posterior_steps", "2",
         "--trainer.enable_progress_bar", "false", "--trainer.limit_val_batches", "0"]


def quick(root, *extra):
    return ["fit", "--recipe", "quickstart", "--trainer.default_root_dir", str(root), *QUICK, *extra]


def test_a_ckpt_path_in_a_config_file_goes_through_the_checked_reader(tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = evil_file(tmp_path / "evil.ckpt", marker)
    cfg = tmp_path / "resume.yaml"
    cfg.write_text(f"ckpt_path: file://{evil}\n")
    one_line_rc2(main(quick(tmp_path / "runs", "--config", str(cfg))), capsys, "evil.ckpt",
                 "weights-only loader refuses")
    assert not marker.exists()


def test_ckpt_path_hpc_goes_through_the_checked_reader(tmp_path, capsys):
    marker = tmp_path / "pwned"
    root = tmp_path / "runs"
    root.mkdir()
    evil_file(root / "hpc_ckpt_1.ckpt", marker)
    one_line_rc2(main(quick(root, "--ckpt_path", "hpc")), capsys, "hpc_ckpt_1.ckpt", "weights-only loader refuses")
    assert not marker.exists()


@pytest.fixture
def under_slurm(monkeypatch):
    """A batch job as SLURM starts one: Lightning then resumes ``<root>/hpc_ckpt_N.ckpt`` by itself."""
    for k, v in {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "train", "SLURM_NODEID": "0", "SLURM_PROCID": "0",
                 "SLURM_LOCALID": "0", "SLURM_NODELIST": "localhost", "SLURM_JOB_ID": "1"}.items():
        monkeypatch.setenv(k, v)


def test_slurm_auto_resume_goes_through_the_checked_reader(tmp_path, capsys, under_slurm):
    marker = tmp_path / "pwned"
    root = tmp_path / "runs"
    root.mkdir()
    evil_file(root / "hpc_ckpt_1.ckpt", marker)
    one_line_rc2(main(quick(root)), capsys, "hpc_ckpt_1.ckpt", "weights-only loader refuses")
    assert not marker.exists()


def test_slurm_auto_resume_refuses_another_familys_checkpoint(tmp_path, capsys, under_slurm, monkeypatch):
    other = tmp_path / "other"
    monkeypatch.delenv("SLURM_NTASKS")  # train the other family without SLURM
    assert main(["fit", "--recipe", "toy2d_fce", "--trainer.default_root_dir", str(other), "--trainer.max_steps", "1",
                 "--trainer.enable_progress_bar", "false", "--trainer.limit_val_batches", "0"]) == 0
    capsys.readouterr()
    monkeypatch.setenv("SLURM_NTASKS", "1")
    root = tmp_path / "runs"
    root.mkdir()
    (root / "hpc_ckpt_1.ckpt").write_bytes(max(other.rglob("last.ckpt"), key=lambda p: p.stat().st_mtime).read_bytes())
    one_line_rc2(main(quick(root)), capsys, "FlowContrastiveEBM", "LatentEBMPrior")
