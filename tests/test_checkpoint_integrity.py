"""A checkpoint with a flipped bit in a weight (zip structure intact, CRC-32 wrong) is refused, naming the member."""
import shutil
import struct
import zipfile

import pytest
import torch
from _data import fit_steps

import lebm_zoo
from lebm_zoo.checkpoint import find_best_checkpoint
from lebm_zoo.cli import main
from lebm_zoo.pretrained import CheckpointError, read_checkpoint


@pytest.fixture(scope="module")
def intact(tmp_path_factory):
    """A one-step LatentEBMPrior checkpoint written by a Trainer."""
    root = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    model = lebm_zoo.LatentEBMPrior(img_size=28, channels=1, nz=8, ngf=4, ndf=16, prior_steps=2, posterior_steps=2)
    trainer = fit_steps(model, torch.rand(4, 1, 28, 28) * 2 - 1, 1, root, batch_size=4, shuffle=False)
    path = root / "model.ckpt"
    trainer.save_checkpoint(path)
    return path


def flip_a_weight_byte(src, dst) -> str:
    """Copy ``src`` to ``dst`` with one byte flipped inside the stored data of its largest tensor member
    (``<archive>/data/N``); the zip directory and headers are untouched. Returns the member's name."""
    shutil.copyfile(src, dst)
    with zipfile.ZipFile(dst) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename and i.filename.split("/")[-1].isdigit()),
                   key=lambda i: i.file_size)
    assert info.compress_type == zipfile.ZIP_STORED  # torch stores tensors uncompressed
    raw = bytearray(dst.read_bytes())
    h = info.header_offset
    assert raw[h:h + 4] == b"PK\x03\x04"
    name_len, extra_len = struct.unpack("<HH", raw[h + 26:h + 30])
    raw[h + 30 + name_len + extra_len + info.compress_size // 2] ^= 0x10
    dst.write_bytes(bytes(raw))
    with zipfile.ZipFile(dst) as z:  # still a well-formed archive: only the member's CRC fails
        assert z.testzip() == info.filename
    return info.filename


def test_damaged_weight_is_refused_naming_the_member(intact, tmp_path):
    bad = tmp_path / "bad.ckpt"
    member = flip_a_weight_byte(intact, bad)
    for load in (read_checkpoint, lebm_zoo.load_pretrained):
        with pytest.raises(CheckpointError) as e:
            load(bad)
        assert member in str(e.value) and "CRC" in str(e.value) and str(bad) in str(e.value)


def test_cli_preflight_refuses_the_damaged_checkpoint(intact, tmp_path, capsys):
    bad = tmp_path / "bad.ckpt"
    member = flip_a_weight_byte(intact, bad)
    code = main(["fit", "--recipe", "quickstart", "--trainer.default_root_dir", str(tmp_path), "--trainer.max_steps",
                 "1", "--trainer.enable_progress_bar", "false", "--ckpt_path", str(bad)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert member in err and "CRC" in err and "Traceback" not in err
    assert not list(tmp_path.rglob("last.ckpt")), "training ran from the damaged checkpoint"


def test_intact_checkpoint_still_loads(intact):
    ckpt = read_checkpoint(intact)
    model = lebm_zoo.load_pretrained(intact)
    assert isinstance(model, lebm_zoo.LatentEBMPrior)
    for k, v in model.state_dict().items():
        assert torch.equal(v, ckpt["state_dict"][k]), k


def _last_with(path, callbacks: dict) -> None:
    torch.save({"state_dict": {}, "epoch": 3, "global_step": 12, "callbacks": callbacks}, path)


def test_best_checkpoint_is_the_monitored_callbacks_choice_found_where_the_run_now_lies(tmp_path):
    run, was = tmp_path / "copy", tmp_path / "was_here"
    run.mkdir()
    was.mkdir()
    (was / "best-epoch=001.ckpt").write_bytes(b"original")
    state = {"monitor": "val/ade", "best_model_path": str(was / "best-epoch=001.ckpt"),
             "best_model_score": torch.tensor(0.25, dtype=torch.float64)}
    _last_with(run / "last.ckpt", {"ModelCheckpoint{'monitor': None}": {"monitor": None, "best_model_path": ""},
                                   "BestCheckpoint{'monitor': 'val/ade'}": state})
    # a resumed run: its best lies where it was written, in an earlier folder
    assert find_best_checkpoint(run / "last.ckpt") == (was / "best-epoch=001.ckpt", "val/ade", 0.25)
    (run / "best-epoch=001.ckpt").write_bytes(b"copy")  # a copied run: its own file first
    assert find_best_checkpoint(run / "last.ckpt")[0] == run / "best-epoch=001.ckpt"
    for p in (run / "best-epoch=001.ckpt", was / "best-epoch=001.ckpt"):  # in neither place
        p.unlink()
    with pytest.raises(CheckpointError, match="best checkpoint .*best-epoch=001.ckpt is missing"):
        find_best_checkpoint(run / "last.ckpt")
    with pytest.raises(CheckpointError, match="is missing"):  # a missing file is an error even when not required
        find_best_checkpoint(run / "last.ckpt", required=False)


@pytest.mark.parametrize("callbacks, match", [
    ({}, "no checkpoint callback with a monitor"),
    ({"ModelCheckpoint{'monitor': None}": {"monitor": None, "best_model_path": "/x/last.ckpt"}},
     "no checkpoint callback with a monitor"),
    ({"ModelCheckpoint{'monitor': 'val/ade'}": {"monitor": "val/ade", "best_model_path": ""}},
     "has kept no best checkpoint yet"),
])
def test_no_best_checkpoint_is_a_clear_error(tmp_path, callbacks, match):
    _last_with(tmp_path / "last.ckpt", callbacks)
    with pytest.raises(CheckpointError, match=match):
        find_best_checkpoint(tmp_path / "last.ckpt")
    assert find_best_checkpoint(tmp_path / "last.ckpt", required=False) is None


@pytest.mark.parametrize("sub, match", [("test", "records no checkpoint callback with a monitor"),
                                        ("fit", "--ckpt_path best is for test, validate and predict")])
def test_cli_ckpt_path_best_where_there_is_none_exits_2(tmp_path, capsys, sub, match):
    run = tmp_path / "lightning_logs" / "version_0" / "checkpoints"
    run.mkdir(parents=True)
    torch.save({"state_dict": {}, "lebm_zoo": {"recipe": "quickstart"}, "callbacks": {}}, run / "last.ckpt")
    code = main([sub, "--recipe", "quickstart", "--trainer.default_root_dir", str(tmp_path), "--ckpt_path=best"])
    err = capsys.readouterr().err
    assert code == 2 and match in err
    assert sub == "fit" or str(run / "last.ckpt") in err
