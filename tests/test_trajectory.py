"""TrajectoryLEBM's data, metrics, replay memory, checkpoints and command line (the one-iteration equivalence with the
reference is tests/test_reference_trajectory.py)."""
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from _data import DATA_ROOT, TINY_MODELS, tensor_loader, tiny_trainer
from pytorch_lightning.callbacks import ModelCheckpoint
from test_devices import walks

import lebm_zoo
from datamodules import DatasetNotFoundError, SDDDataModule, TrajectoryDataModule
from datamodules.trajectories import (
    ETH_ANNOTATION_STEP,
    read_scene_file,
    read_sdd_pickle,
    resample_tracks,
    strided_windows,
)
from lebm_zoo import TrajectoryLEBM
from lebm_zoo.callbacks import TrajectoryMetrics
from lebm_zoo.callbacks.trajectory import demo_pasts
from lebm_zoo.cli import main
from lebm_zoo.errors import DataShapeError, UsageError


def table_command(capsys, *args: str) -> str:
    """``python benchmarks/lbebm_table.py ARGS``'s output, run in this process (no interpreter start); it must exit 0.
    The command line's own exit codes are checked by subprocess where they matter."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import lbebm_table

    capsys.readouterr()
    assert lbebm_table.main(list(args)) == 0
    return capsys.readouterr().out


def tiny(**kw) -> TrajectoryLEBM:
    args = dict(TINY_MODELS["TrajectoryLEBM"]().hparams) | kw
    return TrajectoryLEBM(**args)


def write_track_file(path, peds: dict[int, int], start_frame=0, seed=0):
    """A Social-GAN file: pedestrian p walks for peds[p] frames (10 frames apart), rows interleaved by frame."""
    rng = np.random.default_rng(seed)
    rows = []
    for p, n in peds.items():
        xy = np.cumsum(rng.normal(0.4, 0.1, size=(n, 2)), 0).round(2)
        rows += [(start_frame + 10 * (i + p), p, *xy[i]) for i in range(n)]
    rows.sort(key=lambda r: (-r[0], r[1]))  # out of order on purpose: the reader sorts by frame, then pedestrian
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{f:.1f}\t{p:.1f}\t{x:.2f}\t{y:.2f}\n" for f, p, x, y in rows))
    return rows


def write_scene_tree(root, scene="hotel", sizes=(30, 25, 12)):
    for split, seed in (("train", 0), ("val", 1), ("test", 2)):
        write_track_file(root / scene / split / f"a_{split}.txt", {1: sizes[0], 2: sizes[1], 3: sizes[2]}, seed=seed)
    return root


# ------------------------------------------------------------------------------------------------------- data
def test_windows_follow_the_reference_strided_reading(tmp_path):
    rows = write_track_file(tmp_path / "f.txt", {5: 22, 2: 20, 9: 19})
    w = strided_windows(read_scene_file(tmp_path / "f.txt"), 20)
    # pedestrians in order of first appearance (2 from frame 20, 5 from frame 50): 2 (20 rows: 1 window), then 5
    # (22 rows: 3 windows); 9 (19 rows) none
    assert w.shape == (4, 20, 2) and w.dtype == np.float32
    ped2 = np.array(sorted([r for r in rows if r[1] == 2], key=lambda r: r[0]))[:, 2:]
    assert np.array_equal(w[0], ped2.astype(np.float32))
    ped5 = np.array(sorted([r for r in rows if r[1] == 5], key=lambda r: r[0]))[:, 2:]
    assert np.array_equal(w[1], ped5[:20].astype(np.float32)) and np.array_equal(w[3], ped5[2:22].astype(np.float32))


def test_rotated_windows_follow_the_reference_augmentation(tmp_path):
    """``rotate``: the windows, then their copies turned by 45, 90, -45 and -90 degrees as the reference's
    ``xy @ R(a)`` (row vectors times R = [[cos, -sin], [sin, cos]]), one block per angle; only the training split."""
    write_track_file(tmp_path / "f.txt", {5: 22, 2: 20})
    rows = read_scene_file(tmp_path / "f.txt")
    w, r = strided_windows(rows, 20), strided_windows(rows, 20, rotate=True)
    assert r.shape == (5 * len(w), 20, 2) and r.dtype == np.float32
    blocks = r.reshape(5, len(w), 20, 2)
    assert np.array_equal(blocks[0], w)
    x, y = w[..., 0].astype(np.float64), w[..., 1].astype(np.float64)
    assert np.allclose(blocks[2], np.stack([y, -x], -1), atol=1e-5)  # +90 degrees: (x, y) @ R -> (y, -x)
    assert np.allclose(blocks[4], np.stack([-y, x], -1), atol=1e-5)  # -90 degrees
    c = np.sqrt(0.5)
    assert np.allclose(blocks[1], np.stack([c * (x + y), c * (y - x)], -1), atol=1e-5)  # +45 degrees
    assert np.allclose(blocks[3], np.stack([c * (x - y), c * (x + y)], -1), atol=1e-5)  # -45 degrees
    root = write_scene_tree(tmp_path / "data")
    plain, turned = (TrajectoryDataModule(str(root), "hotel", rotate=rot) for rot in (False, True))
    for dm in (plain, turned):
        dm.setup()
    assert len(turned.train_set) == 5 * len(plain.train_set)
    assert torch.equal(turned.val_set.tensors[0], plain.val_set.tensors[0])
    assert torch.equal(turned.test_set.tensors[0], plain.test_set.tensors[0])


def test_datamodule_splits_and_batches(tmp_path):
    dm = TrajectoryDataModule(str(write_scene_tree(tmp_path)), "hotel", batch_size=4, eval_batch_size=3)
    dm.prepare_data()
    dm.setup()
    assert [len(d) for d in (dm.train_set, dm.val_set, dm.test_set)] == [11 + 6, 11 + 6, 11 + 6]
    batch = next(iter(dm.train_dataloader()))
    assert batch.shape == (4, 20, 2) and batch.dtype == torch.float32
    assert next(iter(dm.test_dataloader())).shape == (3, 20, 2)


def test_training_order_follows_the_run_seed_unless_pinned(tmp_path):
    root = str(write_scene_tree(tmp_path))

    def order(run_seed, data_seed=None):
        pl.seed_everything(run_seed, verbose=False)
        dm = TrajectoryDataModule(root, "hotel", batch_size=17, seed=data_seed)
        dm.setup()
        return torch.cat(list(dm.train_dataloader()))

    assert torch.equal(order(1), order(1))
    assert not torch.equal(order(1), order(2))  # each training seed draws its own data order, as the reference
    assert torch.equal(order(1, data_seed=5), order(2, data_seed=5))


def test_datamodule_errors_name_the_folder_and_the_fix(tmp_path):
    with pytest.raises(ValueError, match="scene must be one of eth, hotel"):
        TrajectoryDataModule(str(tmp_path), "biwi")
    dm = TrajectoryDataModule(str(tmp_path / "nowhere"), "eth")
    with pytest.raises(DatasetNotFoundError, match=r"no \.txt files in .*nowhere/eth/train.*--data\.data_dir"):
        dm.prepare_data()
    root = write_scene_tree(tmp_path / "d", "eth")
    (root / "eth" / "test" / "a_test.txt").write_text("1\t2\tthree\n")
    with pytest.raises(DatasetNotFoundError, match="a_test.txt is not a trajectory file"):
        TrajectoryDataModule(str(root), "eth").setup()
    (root / "eth" / "test" / "a_test.txt").write_text("1\t2\t3.0\n")
    with pytest.raises(DatasetNotFoundError, match="a_test.txt is not a trajectory file"):
        TrajectoryDataModule(str(root), "eth").setup()
    write_track_file(root / "eth" / "test" / "a_test.txt", {1: 5})
    with pytest.raises(DatasetNotFoundError, match="split test: no pedestrian has 20 rows"):
        TrajectoryDataModule(str(root), "eth").setup()


def test_tracks_are_resampled_by_linear_interpolation_inside_their_stretches():
    # walker 1: rows 10 frames apart from frame 780, x = frame / 100; walker 2 leaves after frame 30, is back at 100
    rows = np.array([(780 + 10 * i, 1, (780 + 10 * i) / 100, 2.0) for i in range(10)]
                    + [(f, 2, f / 50, -1.0) for f in (0, 10, 20, 30, 100, 110, 120)])
    r = resample_tracks(rows, 6)
    one, two = r[r[:, 1] == 1], r[r[:, 1] == 2]
    np.testing.assert_allclose(one[:, 0], np.arange(780, 871, 6))  # 780 ... 870, every 6 frames
    np.testing.assert_allclose(one[:, 2], one[:, 0] / 100)  # on the line through the rows
    np.testing.assert_allclose(one[:, 3], 2.0)
    np.testing.assert_allclose(two[:, 0], [0, 6, 12, 18, 24, 30, 102, 108, 114, 120])  # nothing made in the gap
    np.testing.assert_allclose(two[:, 2], two[:, 0] / 50)
    assert (np.diff(r[:, 0]) >= 0).all()  # sorted by frame
    np.testing.assert_allclose(resample_tracks(rows, 10), rows[np.lexsort((rows[:, 1], rows[:, 0]))])  # same grid
    stretched = resample_tracks(rows[:10], 50 / 3)  # rows as far apart as Social-GAN's eth rows: 783.3, 800, ...
    np.testing.assert_allclose(stretched[:, 0], 50 / 3 * np.arange(47, 53))
    lone = np.array([(12, 3, 1.0, 1.0), (13, 4, 2.0, 2.0)])  # one row each: kept when it is on the grid
    np.testing.assert_allclose(resample_tracks(lone, 6), lone[:1])
    # a walker seen twice, 102 frames apart, in a file whose rows are 10 frames apart: nothing made in between
    away = np.concatenate([rows[:10], [(0, 5, 0.0, 0.0), (102, 5, 1.0, 1.0)]])
    assert resample_tracks(away, 6)[:, 1].tolist().count(5) == 2
    assert resample_tracks(away, 6, spacing=102)[:, 1].tolist().count(5) == 18  # unless told the gap is one step
    for bad in (0, -6, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="step must be a finite number of frames > 0"):
            resample_tracks(rows, bad)
    with pytest.raises(ValueError, match="spacing must be"):
        resample_tracks(rows, 6, spacing=0)
    with pytest.raises(ValueError, match="pedestrian 2 has two rows at frame 10"):
        resample_tracks(np.concatenate([rows, [(10, 2, 0.0, 0.0)]]), 6)


def test_eth_at_annotation_rate_resamples_only_the_eth_files(tmp_path):
    root = tmp_path / "data"
    for split in ("train", "val", "test"):
        write_track_file(root / "hotel" / split / "biwi_eth_x.txt", {1: 30}, start_frame=780, seed=1)
        write_track_file(root / "hotel" / split / "crowds_zara01.txt", {1: 30}, seed=2)
    plain = TrajectoryDataModule(str(root), "hotel")
    at_rate = TrajectoryDataModule(str(root), "hotel", eth_at_annotation_rate=True)
    for split in ("train", "val", "test"):
        # 30 rows 10 frames apart: 11 windows; re-sampled every 6 frames over the same 290 frames: 49 rows, 30 windows
        assert len(plain.windows(split)) == 11 + 11 and len(at_rate.windows(split)) == 30 + 11
    zara = at_rate.read(root / "hotel" / "test" / "crowds_zara01.txt")
    np.testing.assert_array_equal(zara, read_scene_file(root / "hotel" / "test" / "crowds_zara01.txt"))
    assert np.diff(np.unique(at_rate.read(root / "hotel" / "test" / "biwi_eth_x.txt")[:, 0])).max() == \
        ETH_ANNOTATION_STEP
    bad = root / "hotel" / "test" / "biwi_eth_x.txt"
    bad.write_text(bad.read_text() + bad.read_text().splitlines(keepends=True)[0])  # a row twice
    with pytest.raises(DatasetNotFoundError, match="biwi_eth_x.txt cannot be re-sampled .pedestrian 1 has two rows"):
        at_rate.read(bad)
    for split in ("train", "val", "test"):
        (root / "hotel" / split / "biwi_eth_x.txt").unlink()
    TrajectoryDataModule(str(root), "hotel").setup()  # off: any files
    with pytest.raises(ValueError, match="no split of .* holds a biwi_eth.*turn it off"):
        TrajectoryDataModule(str(root), "hotel", eth_at_annotation_rate=True).setup()


@pytest.mark.realdata("eth_ucy")
def test_real_eth_rows_are_far_apart_and_the_annotation_rate_brings_them_to_walking_pace():
    """Social-GAN's eth rows are 10 frames apart like the other scenes', but its people would walk at about twice
    the others' pace if those were 0.4 s; on the ETH sequence's own grid (6 frames) they walk as the others do."""
    def median_pace(rows):  # metres per row, over every pair of consecutive rows of one pedestrian
        return float(np.median(np.concatenate([np.linalg.norm(np.diff(rows[rows[:, 1] == p, 2:4], axis=0), axis=1)
                                               for p in np.unique(rows[:, 1])])))

    data = DATA_ROOT / "eth_ucy"
    eth = TrajectoryDataModule(str(data), "eth")
    at_rate = TrajectoryDataModule(str(data), "eth", eth_at_annotation_rate=True)
    rows = read_scene_file(data / "eth" / "test" / "biwi_eth.txt")
    assert np.unique(rows[:, 0])[:3].tolist() == [780, 790, 800]
    paces = {"hotel": median_pace(read_scene_file(data / "hotel" / "test" / "biwi_hotel.txt")),
             "zara1": median_pace(read_scene_file(data / "zara1" / "test" / "crowds_zara01.txt")),
             "eth at rate": median_pace(at_rate.read(data / "eth" / "test" / "biwi_eth.txt")),
             "eth": median_pace(rows)}
    assert all(0.4 < paces[k] < 0.65 for k in ("hotel", "zara1", "eth at rate")), paces  # 1-1.6 m/s, rows 0.4 s apart
    assert paces["eth"] > 1.6 * max(paces["hotel"], paces["zara1"]), paces
    assert len(at_rate.windows("test")) == 2423  # 364 as the files are
    assert len(eth.windows("test")) == 364


@pytest.mark.realdata("eth_ucy")
def test_real_eth_ucy_has_the_standard_test_sizes():
    """The test windows of the five scenes: the counts the trajectory-prediction literature reports for Social-GAN's
    splits (364, 1197, 24334, 2356, 5910), so the windowing reads these files as the reference does."""
    sizes = {}
    for scene in ("eth", "hotel", "univ", "zara1", "zara2"):
        sizes[scene] = len(TrajectoryDataModule(str(DATA_ROOT / "eth_ucy"), scene).windows("test"))
    assert sizes == {"eth": 364, "hotel": 1197, "univ": 24334, "zara1": 2356, "zara2": 5910}


def write_sdd_pickle(path, groups=(3, 4), seed=0):
    rng = np.random.default_rng(seed)
    traj, masks = [], []
    for n in groups:
        t = np.zeros((n, 20, 4))
        t[:, :, 0] = np.arange(20) * 12
        t[:, :, 1] = np.arange(n)[:, None]
        t[:, :, 2:] = np.cumsum(rng.normal(3, 1, size=(n, 20, 2)), 1) + rng.uniform(0, 500, size=(n, 1, 2))
        traj.append(t)
        masks.append(np.ones((n, n)))
    path.write_bytes(pickle.dumps((traj, masks)))
    return traj


class Evil:
    def __reduce__(self):
        return (open, ("/dev/null",))


def test_sdd_pickles_are_read_as_pecnet_writes_them_and_code_is_refused(tmp_path):
    traj = write_sdd_pickle(tmp_path / "train.pickle")
    write_sdd_pickle(tmp_path / "test.pickle", groups=(5,), seed=1)
    dm = SDDDataModule(str(tmp_path / "train.pickle"), str(tmp_path / "test.pickle"))
    dm.setup()
    assert len(dm.train_set) == 4 and len(dm.test_set) == 1  # each training group and its time-reversed copy
    w, m = dm.train_set[1]
    assert torch.equal(w, torch.from_numpy(traj[0][:, ::-1, 2:].copy()).float())  # reversed in time
    assert m.shape == (3, 3)
    windows, mask = next(iter(dm.test_dataloader()))
    assert windows.shape == (5, 20, 2) and mask.shape == (5, 5)

    (tmp_path / "evil.pickle").write_bytes(pickle.dumps(([Evil()], [np.ones((1, 1))])))
    with pytest.raises(DatasetNotFoundError, match="refused global"):
        read_sdd_pickle(tmp_path / "evil.pickle")
    with pytest.raises(DatasetNotFoundError, match="Stanford Drone pickle not found"):
        read_sdd_pickle(tmp_path / "missing.pickle")
    (tmp_path / "bad.pickle").write_bytes(pickle.dumps(([np.zeros((2, 20, 4))], [np.ones((3, 3))])))
    with pytest.raises(DatasetNotFoundError, match="as many"):
        read_sdd_pickle(tmp_path / "bad.pickle")


# ------------------------------------------------------------------------------------------------------ model
def test_replay_memory_fills_then_starts_the_chains(tmp_path):
    """The memory takes every chain's end state; once it holds memory_size latents the chains start from it."""
    torch.manual_seed(0)
    model = tiny(memory_size=16)
    seen = []

    class Spy(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append((pl_module.memory_count, float(trainer.callback_metrics["train/pcd"])))

    tiny_trainer(tmp_path, [Spy()], max_steps=4).fit(model, tensor_loader(walks(16), batch_size=8))
    assert seen == [(8, 0.0), (16, 0.0), (24, 1.0), (32, 1.0)]
    assert torch.isfinite(model.memory).all() and model.memory.abs().sum() > 0
    with pytest.raises(ValueError, match="memory_size 16.*fewer states than the batch \\(20\\)"):
        model.prior_latents(torch.zeros(20, model.hparams.fdim), persistent=True)


def test_cd_limit_stops_a_run_whose_energies_run_away(tmp_path):
    """cd_limit (a named deviation; off by default, as in the reference): the step whose contrastive term |E(z+) -
    E(z-)| exceeds it is skipped and the run stops with a divergence; without it the same run trains on."""
    def run(**kw):
        torch.manual_seed(0)
        model = tiny(**kw)
        t = tiny_trainer(tmp_path, max_steps=3)
        t.fit(model, tensor_loader(walks(16), batch_size=8))
        return model, t

    with pytest.warns(UserWarning, match="diverged"):
        stopped, t = run(cd_limit=1e-9)  # a random net's energies differ by more than this at once
    assert t.global_step == 0 and "|cd| <= 1e-09" in stopped.divergence and "update was skipped" in stopped.divergence
    assert stopped.hparams.cd_limit == 1e-9 and "cd_limit" in TrajectoryLEBM.resume_hparams
    free, t = run()
    assert t.global_step == 3 and free.divergence is None and free.hparams.cd_limit is None
    for bad in (0, -1.0):
        with pytest.raises(ValueError, match="cd_limit must be > 0 or None"):
            tiny(cd_limit=bad)


def test_training_checkpoints_keep_the_memory_and_published_weights_do_not(tmp_path):
    torch.manual_seed(0)
    model = tiny(memory_size=40)
    ckpt_dir = tmp_path / "ckpt"
    t = tiny_trainer(tmp_path, [ModelCheckpoint(dirpath=str(ckpt_dir), save_last=True)], max_steps=3,
                     enable_checkpointing=True)
    t.fit(model, tensor_loader(walks(16), batch_size=8))
    ckpt = torch.load(ckpt_dir / "last.ckpt", weights_only=True)
    assert int(ckpt["lbebm_memory"]["count"]) == 24 and ckpt["lbebm_memory"]["z"].shape == (24, 3)
    resumed = tiny(memory_size=40)
    resumed.on_load_checkpoint(ckpt)
    assert resumed.memory_count == 24 and torch.equal(resumed.memory[:24], model.memory[:24])
    assert "memory" not in model.state_dict()
    folder = model.save_pretrained(tmp_path / "pub")
    assert lebm_zoo.load_pretrained(folder).memory_count == 0


def test_predictions_have_the_data_units_and_frame():
    torch.manual_seed(0)
    model = tiny().eval()
    w = walks(6)
    past = w[:, :8]
    pred = model.predict(past, n_samples=5)
    assert pred.shape == (5, 6, 12, 2)
    # the frame is the data's: shifting the pasts shifts the predictions (the nets see relative coordinates)
    torch.manual_seed(1)
    a = model.predict(past, 2)
    torch.manual_seed(1)
    b = model.predict(past + torch.tensor([100.0, -50.0]), 2)
    assert torch.allclose(b - a, torch.tensor([100.0, -50.0]).expand_as(a), atol=1e-3)
    assert model.sample(7).shape == (7, 12, 2)
    ade, fde = model.best_of_k_errors(w, k=3)
    assert ade.shape == fde.shape == (6,) and (ade >= 0).all() and (fde >= 0).all()


def test_bad_inputs_get_clear_errors():
    model = tiny().eval()
    with pytest.raises(DataShapeError, match=r"past of shape \(B, 8, 2\)"):
        model.predict(torch.zeros(3, 7, 2))
    with pytest.raises(DataShapeError, match="non-finite"):
        model.predict(torch.full((2, 8, 2), float("nan")))
    with pytest.raises(DataShapeError, match="floating point"):
        model.predict(torch.zeros(2, 8, 2, dtype=torch.int64))
    with pytest.raises(DataShapeError, match="one past"):
        model.sample(3, torch.zeros(2, 8, 2))
    with pytest.raises(ValueError, match="sub_goal_indexes must be increasing"):
        TrajectoryLEBM(sub_goal_indexes=[2, 5, 8])
    with pytest.raises(ValueError, match="data_scale must be > 0"):
        TrajectoryLEBM(data_scale=0)


def test_social_pooling_mixes_only_the_masked_neighbours():
    torch.manual_seed(0)
    model = tiny(nonlocal_pools=1).eval()
    c = torch.randn(4, 4)
    alone = model.social_pooling(c, torch.eye(4))
    pair = torch.eye(4)
    pair[0, 1] = pair[1, 0] = 1
    together = model.social_pooling(c, pair)
    g = model.non_local_g(c)
    assert torch.allclose(alone, c + g)  # only itself in view: its own g
    assert torch.allclose(together[2:], alone[2:]) and not torch.allclose(together[:2], alone[:2])
    w = walks(4)
    # with a mask, the plans come from the pooled features and the futures from the unpooled ones (the reference's
    # predict): predict() equals that composition, and its plans differ from those of the unpooled model
    torch.manual_seed(1)
    pred = model.predict(w[:, :8], 2, mask=pair)
    torch.manual_seed(1)
    plans = model.sample_plans(w[:, :8], 2, mask=pair)
    torch.manual_seed(1)
    assert not torch.allclose(plans, model.sample_plans(w[:, :8], 2))
    expected = model.complete(w[:, :8], plans) / model.hparams.data_scale + w[:, 7:8].unsqueeze(0)
    torch.testing.assert_close(pred, expected)
    ade, fde = model.best_of_k_errors(w, 2, mask=pair)
    assert ade.shape == fde.shape == (4,) and torch.isfinite(ade).all() and (fde > 0).all()
    with pytest.raises(DataShapeError, match=r"social mask must be \(B, B\) = \(4, 4\).*got \(3, 3\)"):
        model.predict(w[:, :8], 2, mask=torch.eye(3))


def test_metrics_callback_logs_and_writes_the_numbers_and_picture(tmp_path):
    torch.manual_seed(0)
    model = tiny()
    cb = TrajectoryMetrics(k=2)
    t = tiny_trainer(tmp_path, [cb], logger=pl.loggers.CSVLogger(tmp_path))
    out = t.test(model, tensor_loader(walks(10), batch_size=4), verbose=False)[0]
    rec = json.loads(next(tmp_path.rglob("trajectories/test.json")).read_text())
    assert rec["windows"] == 10 and rec["k"] == 2
    assert abs(out["test/ade"] - rec["ade"]) < 1e-6 and abs(out["test/fde"] - rec["fde"]) < 1e-6
    assert rec["ade"] > 0 and cb.last["test"]["fde"] == rec["fde"]
    assert next(tmp_path.rglob("trajectories/test.png")).stat().st_size > 1000
    with pytest.raises(TypeError, match="best_of_k_errors"):
        tiny_trainer(tmp_path, [TrajectoryMetrics()]).test(TINY_MODELS["ShortRunEBM"](),
                                                          tensor_loader(torch.zeros(4, 1, 28, 28)))


def test_metric_is_the_mean_over_windows_not_over_batches(tmp_path):
    """Sum over windows, divided by their number: batches of unequal size weigh by their windows."""
    torch.manual_seed(0)
    model = tiny().eval()
    w = walks(7)
    calls = []
    orig = model.best_of_k_errors

    def fixed(windows, k=None, mask=None):  # ADE = FDE = the window's first x coordinate: a known answer
        calls.append(len(windows))
        v = windows[:, 0, 0].double()
        return v, v

    model.best_of_k_errors = fixed
    cb = TrajectoryMetrics(plot=False)
    tiny_trainer(tmp_path, [cb]).test(model, tensor_loader(w, batch_size=5), verbose=False)
    model.best_of_k_errors = orig
    assert calls == [5, 2] and cb.last["test"]["ade"] == pytest.approx(float(w[:, 0, 0].double().mean()))


# -------------------------------------------------------------------------------------------- command line
def test_cli_fit_test_and_sample(tmp_path, capsys, monkeypatch):
    root = write_scene_tree(tmp_path / "data")
    size = ["--model.fdim", "4", "--model.zdim", "3", "--model.enc_past_size", "[8]", "--model.enc_dest_size", "[8]",
            "--model.enc_latent_size", "[8]", "--model.dec_size", "[8]", "--model.predictor_size", "[8]",
            "--model.ebm_hidden", "8", "--model.e_l_steps", "2", "--model.memory_size", "64"]
    common = ["--recipe", "hotel_lbebm", "--data.data_dir", str(root), "--data.batch_size", "8",
              "--trainer.default_root_dir", str(tmp_path / "runs"), "--trainer.enable_progress_bar", "false"]
    assert main(["fit", *common, *size, "--trainer.max_epochs", "2", "--trainer.precision", "32-true"]) == 0
    assert main(["test", *common, "--ckpt_path", "last"]) == 0
    capsys.readouterr()
    assert main(["test", *common, "--ckpt_path", "best"]) == 0  # the recipe keeps its lowest val/ade's checkpoint
    vals = {}
    for p in (tmp_path / "runs").rglob("trajectories/val-epoch=*.json"):
        record = json.loads(p.read_text())
        vals[record["epoch"]] = record["ade"]
    assert sorted(vals) == [0, 1]
    best = min(vals, key=vals.get)
    said = re.search(r"--ckpt_path best: using (\S+) \(its val/ade was (\S+)\)", capsys.readouterr().err)
    assert Path(said[1]).name == f"best-epoch={best:03d}.ckpt" and float(said[2]) == pytest.approx(vals[best], rel=1e-5)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import lbebm_table  # the table script's look at the trained model's plans

    ran = []

    def in_process(cmd, **kw):  # `python -m lebm_zoo.cli ARGS` as main(ARGS): the same command, no interpreter start
        ran.append(cmd[3:])
        return subprocess.CompletedProcess(cmd, main(cmd[3:]))

    monkeypatch.setattr(lbebm_table.subprocess, "run", in_process)
    chosen = lbebm_table.selected_on_validation(tmp_path / "runs", common, dict(os.environ))  # the same, as `run` does
    assert ran == [["test", *common, "--ckpt_path", "best"]]
    assert chosen["epoch"] == best and chosen["val_ade"] == pytest.approx(vals[best]) and chosen["ade"] > 0

    s = lbebm_table.spread(tmp_path / "runs", str(root), "hotel", k=4)
    assert s["windows"] == 17 and s["final_std"] > 0 and 0 < s["fde_k"] <= s["fde_1"]
    assert lbebm_table.trained(tmp_path / "runs") == {"epochs": 2, "steps": 6}  # 17 windows, batches of 8: 3 an epoch
    (run,) = {p.parent.parent.parent.parent for p in (tmp_path / "runs").rglob("last.ckpt")}
    v = lbebm_table.step_lengths(str(root), "hotel", run, k=4)  # the test ADE split by the windows' speed
    assert v["test_windows"] == 17 and 0 <= v["test_fast"] <= 1 and v["ade"] > 0
    fast = round(v["test_fast"] * 17)
    parts = [(fast, v["ade_fast"])] * (fast > 0) + [(17 - fast, v["ade_rest"])] * (fast < 17)
    assert sum(n * a for n, a in parts) / 17 == pytest.approx(v["ade"], rel=1e-9)
    # timebase: the same trained run as an eth and a zara1 run, on one walker at 0.5 m every 10 frames
    tb, tb_runs = tmp_path / "tb", tmp_path / "tb_runs"
    for scene, name, n in (("eth", "biwi_eth.txt", 21), ("zara1", "crowds_zara01.txt", 40)):
        (tb / scene / "test").mkdir(parents=True)
        (tb / scene / "test" / name).write_text("".join(f"{10 * i}\t1\t{0.5 * i}\t0\n" for i in range(n)))
        shutil.copytree(run, tb_runs / f"{scene}-s1")
        (tb_runs / f"{scene}-s1" / "record.json").write_text("{}")
    rows = lbebm_table.timebase(str(tb), tb_runs)
    assert [(run, label) for run, label, _ in rows] == [(f"{scene} seed 1", label)
                                                        for scene, label, _ in lbebm_table.TIMEBASE_FILES]
    (eth, eth_rate, eth_shift, zara, zara_stretched) = (r for _, _, r in rows)
    # eth: 21 rows, 2 windows; every 6 frames over frames 0-200: 34 rows, 15 windows of 0.3 m steps; every 10 frames
    # from frame 5: 20 rows, 1 window of 0.5 m steps
    assert (eth["windows"], eth_rate["windows"], eth_shift["windows"]) == (2, 15, 1)
    assert (eth["step"], eth_rate["step"], eth_shift["step"]) == (pytest.approx(0.5), pytest.approx(0.3),
                                                                  pytest.approx(0.5))
    # zara1: 40 rows, 21 windows; every 50/3 frames over frames 0-390: 24 rows, 5 windows of 5/6 m steps
    assert (zara["windows"], zara_stretched["windows"]) == (21, 5)
    assert zara_stretched["step"] == pytest.approx(0.5 * 5 / 3)
    # the walker keeps its pace: constant velocity is exact on every file
    assert all(r["cv_ade"] == pytest.approx(0, abs=1e-5) for r in (eth, eth_rate, eth_shift, zara, zara_stretched))
    assert all(np.isfinite([r["ade"], r["fde"]]).all() and r["ade"] > 0 for r in (eth, eth_rate, zara))
    assert eth["ade"] != eth_rate["ade"] and zara["ade"] != zara_stretched["ade"]  # other windows, other errors
    record = tb_runs / "zara1-s1" / "record.json"
    record.write_text(json.dumps({"rotate": True}))
    with pytest.raises(UsageError, match="trained with rotate: timebase tests runs trained on the"):
        lbebm_table.timebase(str(tb), tb_runs)
    with pytest.raises(UsageError, match="no eth-s<seed> or zara1-s<seed> run"):
        lbebm_table.timebase(str(tb), tmp_path / "nothing")
    recs = sorted((tmp_path / "runs").rglob("trajectories/*.json"))
    names = {p.name for p in recs}
    assert {"val-epoch=0000.json", "val-epoch=0001.json", "test.json"} <= names, names  # hotel: val every epoch
    test = json.loads(next(p for p in recs if p.name == "test.json").read_text())
    assert test["windows"] == 17 and test["k"] == 20
    (ckpt,) = (tmp_path / "runs").rglob("last.ckpt")
    out = tmp_path / "pic.png"
    assert main(["sample", str(ckpt), "-n", "5", "-o", str(out)]) == 0
    assert out.stat().st_size > 1000
    assert main(["sample", str(ckpt), "-o", str(tmp_path / "x.txt")]) == 2


@pytest.mark.parametrize("scene", ["eth", "hotel", "univ", "zara1", "zara2", "sdd"])
def test_recipes_carry_the_reference_scene_settings(scene):
    import yaml

    from lebm_zoo.cli.fit import recipe_path
    from lebm_zoo.models.trajectory import SCENE_SETTINGS

    cfg = yaml.safe_load(recipe_path(f"{scene}_lbebm").read_text())
    want, args = SCENE_SETTINGS[scene], cfg["model"]["init_args"]
    assert cfg["seed_everything"] == want["seed"] and cfg["trainer"]["max_epochs"] == want["max_epochs"]
    assert cfg["trainer"]["precision"] == "64-true" and args["data_scale"] == want["data_scale"]
    assert args["kld_coeff"] == want["kld_coeff"] and args["lr"] == want.get("lr", 1e-4)
    if "lr_milestones" in want:
        assert args["lr_milestones"] == want["lr_milestones"]
    else:
        assert args["lr_decay_step_size"] == want["lr_decay_step_size"]
        assert cfg["data"]["init_args"]["scene"] == scene
        every = cfg["trainer"]["check_val_every_n_epoch"]
        assert f"every {'epoch' if every == 1 else f'{every} epochs'}" in recipe_path(f"{scene}_lbebm").read_text()


def test_demo_pasts_end_at_the_origin():
    p = demo_pasts()
    assert p.shape == (8, 8, 2) and torch.allclose(p[:, -1], torch.zeros(8, 2))
    speeds = (p[:, 1:] - p[:, :-1]).norm(dim=-1).mean(1) / 0.4
    assert torch.allclose(speeds[:4], torch.full((4,), 1.3), atol=1e-5) and speeds[-1] == 0


def test_table_report(tmp_path, capsys):
    for scene, seed, ade in (("hotel", 1, 0.2), ("hotel", 2, 0.4), ("eth", 1, 0.5)):
        d = tmp_path / f"{scene}-s{seed}"
        d.mkdir()
        (d / "record.json").write_text(json.dumps({"scene": scene, "seed": seed, "epochs": 5, "steps": 10, "ade": ade,
                                                   "fde": 2 * ade, "windows": 9, "k": 20, "fit_seconds": 60,
                                                   "cpu": "Test CPU", "val": []}))
    out = table_command(capsys, "report", str(tmp_path))
    ours = next(line for line in out.splitlines() if line.startswith("| **ours**"))
    assert "0.300 ± 0.141 / 0.600 ± 0.283" in ours and "not run" in ours and ours.endswith("incomplete |")
    assert "| LB-EBM (paper) | 0.30 / 0.52 | 0.13 / 0.20" in out and "Test CPU" in out
    assert "ours ÷ paper" not in out  # only for a complete row


def test_table_report_takes_a_scene_from_another_folder_and_names_its_options(tmp_path, capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import lbebm_table

    def record(folder, scene, seed, ade, **options):
        d = tmp_path / folder / f"{scene}-s{seed}"
        d.mkdir(parents=True)
        (d / "record.json").write_text(json.dumps({"scene": scene, "seed": seed, "epochs": 5, "steps": 10, "ade": ade,
                                                   "fde": 2 * ade, "windows": 9, "k": 20, "fit_seconds": 60,
                                                   "cpu": "Test CPU", "val": [], **options}))

    def report(*args):  # in-process: the command line's exit codes are checked once below
        assert lbebm_table.main(["report", str(tmp_path / "main"), *args]) == 0
        return capsys.readouterr().out

    record("main", "hotel", 1, 0.3)
    record("main", "eth", 1, 0.6)
    record("rot", "hotel", 1, 0.15, rotate=True)
    record("rot", "hotel", 2, 0.17, rotate=True)
    record("rot", "eth", 1, 0.9, rotate=True)  # not asked for: eth stays main's
    out = report("--from", f"hotel={tmp_path / 'rot'}")
    ours = next(line for line in out.splitlines() if line.startswith("| ours with the runs and options"))
    assert ours.split(" | ")[1:3] == ["0.600 / 1.200", "0.160 ± 0.014 / 0.320 ± 0.028"], ours
    detail = {line.split(" | ")[0][2:]: line for line in out.splitlines() if line.startswith(("| eth |", "| hotel |"))}
    assert detail["hotel"].startswith("| hotel | 1, 2 |")
    assert detail["hotel"].endswith(f"| {tmp_path / 'rot'} | rotate |")
    assert detail["eth"].endswith(f"| {tmp_path / 'main'} | none |")
    record("rate", "eth", 1, 0.25, eth_at_annotation_rate=True)
    both = report("--from", f"hotel={tmp_path / 'rot'}", "--from", f"eth={tmp_path / 'rate'}")
    ours = next(line for line in both.splitlines() if line.startswith("| ours with the runs and options"))
    assert ours.split(" | ")[1:3] == ["0.250 / 0.500", "0.160 ± 0.014 / 0.320 ± 0.028"], ours
    assert "lowest validation ADE" not in both  # no run kept a checkpoint chosen on validation
    for seed, ade in ((1, 0.14), (2, 0.18)):  # hotel's runs were also tested at their lowest validation ADE
        path = tmp_path / "rot" / f"hotel-s{seed}" / "record.json"
        path.write_text(json.dumps(json.loads(path.read_text()) | {"val_selected": {"epoch": seed, "val_ade": 0.2,
                                                                                    "ade": ade, "fde": 2 * ade}}))
    chosen = report("--from", f"hotel={tmp_path / 'rot'}")
    row = next(line for line in chosen.splitlines() if line.startswith("| ours, the epoch of lowest validation ADE"))
    assert row.split(" | ")[1:3] == ["not kept", "0.160 ± 0.028 / 0.320 ± 0.057 (epochs 2, 3)"], row
    assert row.endswith("| incomplete |")
    record("rot", "eth", 2, 0.5)  # rot's eth runs: one with rotate, one without
    with pytest.raises(UsageError, match="eth's runs under .* different data options .none, rotate."):
        report("--from", f"eth={tmp_path / 'rot'}")
    with pytest.raises(SystemExit):
        report("--from", "mars=x")
    assert "--from takes SCENE=FOLDER" in capsys.readouterr().err
    bad = subprocess.run([sys.executable, "benchmarks/lbebm_table.py", "report", str(tmp_path / "main"), "--from",
                          f"univ={tmp_path / 'rot'}"], capture_output=True, text=True)
    assert bad.returncode == 2 and "no univ-s*/record.json under" in bad.stderr


def test_table_steps_compare_the_test_windows_speed_with_the_training_ones(tmp_path, capsys):
    """``lbebm_table.py steps``: each window's mean step in metres; test windows twice as fast as every training one
    are all "faster than the training 90th percentile"."""
    data = tmp_path / "eth_ucy"
    for scene in ("eth", "hotel", "univ", "zara1", "zara2"):
        for split, speed in (("train", 0.3), ("val", 0.3), ("test", 0.6 if scene == "eth" else 0.25)):
            rows = [(10 * i, p, speed * i * (0.6 + 0.1 * p), speed * i * (0.8 - 0.1 * p)) for p in (1, 2)
                    for i in range(21)]  # walker p steps speed * |(0.6 + 0.1 p, 0.8 - 0.1 p)| m per frame
            f = data / scene / split / "t.txt"
            f.parent.mkdir(parents=True)
            f.write_text("".join(f"{fr}\t{p}\t{x}\t{y}\n" for fr, p, x, y in sorted(rows)))
    out = table_command(capsys, "steps", "--data", str(data))
    lines = {line.split(" | ")[0][2:]: line for line in out.splitlines()[2:]}
    assert set(lines) == {"eth", "hotel", "univ", "zara1", "zara2"}
    # walker 1 steps 0.3 * |(0.7, 0.7)| = 0.297, walker 2 0.3 * |(0.8, 0.6)| = 0.3, two windows each (the median is
    # the lower middle one); eth's test walkers step twice as far, the others' 5/6 as far
    assert lines["eth"].startswith("| eth | 0.297 | 0.300 | 0.594 | 100% of 4 | not run |"), lines["eth"]
    assert lines["hotel"].startswith("| hotel | 0.297 | 0.300 | 0.247 | 0% of 4 |"), lines["hotel"]


def test_table_report_ratios_and_constant_velocity(tmp_path, capsys):
    runs, data = tmp_path / "runs", tmp_path / "eth_ucy"
    for scene in ("eth", "hotel", "univ", "zara1", "zara2"):
        d = runs / f"{scene}-s1"
        d.mkdir(parents=True)
        (d / "record.json").write_text(json.dumps({"scene": scene, "seed": 1, "epochs": 5, "steps": 10, "ade": 0.42,
                                                   "fde": 0.76, "windows": 9, "k": 20, "fit_seconds": 60,
                                                   "cpu": "Test CPU", "val": []}))
        # one walker at constant velocity (CV is exact) and one that stops after its 8th point (CV overshoots)
        rows = [(10 * i, 1, 0.4 * i, 0.3 * i) for i in range(20)]
        rows += [(10 * i, 2, 0.5 * min(i, 7), 0.0) for i in range(20)]
        f = data / scene / "test" / "t.txt"
        f.parent.mkdir(parents=True)
        f.write_text("".join(f"{fr}\t{p}\t{x}\t{y}\n" for fr, p, x, y in sorted(rows)))
    out = table_command(capsys, "report", str(runs), "--data", str(data))
    ratio = next(line for line in out.splitlines() if line.startswith("| ours ÷ paper"))
    assert "| 1.40 / 1.46 | 3.23 / 3.80 |" in ratio and ratio.endswith("| 2.00 / 2.00 |")  # 0.42/0.21, 0.76/0.38
    cv = next(line for line in out.splitlines() if line.startswith("| constant velocity"))
    # walker 2 stays at its 8th point: CV's error at future step t is 0.5 t, so ADE = mean(0.5 * 6.5) / 2 walkers
    assert cv.count("| 1.625 / 3.000 ") == 6  # five scenes and the average
    # eth's runs tested at ETH's annotation rate: the constant-velocity cell is measured on those windows
    (data / "eth" / "test" / "t.txt").rename(data / "eth" / "test" / "biwi_eth.txt")
    rate = tmp_path / "rate" / "eth-s1"
    rate.mkdir(parents=True)
    (rate / "record.json").write_text(json.dumps({"scene": "eth", "seed": 1, "epochs": 5, "steps": 10, "ade": 0.21,
                                                  "fde": 0.38, "windows": 9, "k": 20, "fit_seconds": 60,
                                                  "cpu": "Test CPU", "val": [], "eth_at_annotation_rate": True}))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from lbebm_table import constant_velocity, report

    out = report(runs, str(data), {"eth": rate.parent})  # the function itself: the command is run above
    cv = next(line for line in out.splitlines() if line.startswith("| constant velocity")).split(" | ")

    ade, fde = constant_velocity(str(data), "eth", TrajectoryDataModule(str(data), "eth", eth_at_annotation_rate=True))
    assert cv[1] == f"{ade:.3f} / {fde:.3f}" != "1.625 / 3.000" and cv[2] == "1.625 / 3.000", cv
    assert any(line.startswith("| ours ÷ paper (eth on other test windows") for line in out.splitlines())


def test_sdd_scene_groups_train_with_social_pooling_and_evaluate(tmp_path):
    write_sdd_pickle(tmp_path / "train.pickle")
    write_sdd_pickle(tmp_path / "test.pickle", groups=(5,), seed=1)
    dm = SDDDataModule(str(tmp_path / "train.pickle"), str(tmp_path / "test.pickle"))
    torch.manual_seed(0)
    model = tiny(data_scale=1.86, nonlocal_pools=3)
    pooled = []
    orig = model.social_pooling

    def spy(feat, mask):
        pooled.append(mask.shape)
        return orig(feat, mask)

    model.social_pooling = spy
    cb = TrajectoryMetrics(k=2, plot=False)
    t = tiny_trainer(tmp_path, [cb], max_steps=2, limit_val_batches=0)
    t.fit(model, datamodule=dm)
    assert t.global_step == 2 and len(pooled) == 6 and pooled[0][0] == pooled[0][1]  # 3 rounds a step
    t.test(model, datamodule=dm, verbose=False)
    assert cb.last["test"]["ade"] > 0 and cb.last["test"]["fde"] > 0  # pixels


FAKE_REFERENCE = '''
import argparse, os, sys, torch
import utils  # the reference imports its utils.py from its own folder
ap = argparse.ArgumentParser()
ap.add_argument("--seed", type=int, default=7)
ap.add_argument("--num_epochs", type=int, default=4)
ap.add_argument("--model_path", default="saved_models/lbebm_hotel.pt")
a = ap.parse_args()
assert a.model_path == "", "the runner trains: --model_path ''"
torch.cuda.set_device("cuda:1")
x = torch.zeros(2).double().cuda()
net = torch.nn.Linear(2, 1).double().cuda()
assert os.path.isdir("dataset/hotel/test") and not os.path.exists("dataset/hotel/test/saved_data.pickle")
train_rotate = utils.create_dataset("dataset", "hotel", 0, 8, 12, delim="\\t", train=True, verbose=True)
test_rotate = utils.create_dataset("dataset", "hotel", 0, 8, 12, delim="\\t", train=False, eval=True)
print(f"rotate: train={train_rotate!r} test={test_rotate!r}")
for e in range(a.num_epochs):
    ade = utils.ADE[e] + a.seed / 100
    print(f"2026-01-01 00:00:00,000 : Val ADE {ade + 0.1}\\n2026-01-01 00:00:00,000 : Val FDE {2 * ade + 0.1}")
    print(f"2026-01-01 00:00:00,000 : Test ADE {ade}\\n2026-01-01 00:00:00,000 : Test FDE {2 * ade}")
    print(f"2026-01-01 00:00:00,000 : Test Best ADE 0.0")
'''


def test_reference_runner_runs_the_authors_script_on_cpu_and_reports_the_last_epoch(tmp_path, capsys):
    """``lbebm_reference.py`` runs a script with the authors' interface (``.cuda()`` calls, ``--seed``,
    ``--num_epochs``, ``--model_path``, ``dataset/<scene>`` in its working folder), takes the last epoch's test
    error, and keeps the best-over-epochs one apart. (The runner's ``main`` in this process; each reference run is its
    own process, as from the command line; the command line's exit code 2 at the end.)"""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import lbebm_reference

    ref, data = tmp_path / "lbebm", write_scene_tree(tmp_path / "data")
    ref.mkdir()
    (ref / "lbebm_hotel.py").write_text(FAKE_REFERENCE)
    (ref / "utils.py").write_text("ADE = [0.5, 0.2, 0.3, 0.1]  # the 4th epoch is not run\n\n\n"
                                  "def create_dataset(folder, name, val_size, obs, preds, delim, train=True, "
                                  "eval=False, rotate=False, verbose=False):\n    return rotate\n")
    (data / "hotel" / "test" / "saved_data.pickle").write_bytes(b"stale")  # a cache the runner must not copy
    capsys.readouterr()
    assert lbebm_reference.main(["run", "--reference", str(ref), "--data", str(data), "--out", str(tmp_path / "o"),
                                 "--scenes", "hotel", "--seeds", "1", "2", "--epochs", "hotel=3"]) == 0
    out = capsys.readouterr()
    rec = json.loads((tmp_path / "o" / "hotel-s2" / "record.json").read_text())
    assert rec["epochs"] == 3 and rec["ade"] == pytest.approx(0.32) and rec["fde"] == pytest.approx(0.64)
    assert rec["best_test_ade"] == pytest.approx(0.22) and rec["per_epoch"][0]["val_ade"] == pytest.approx(0.62)
    assert not (tmp_path / "o" / "hotel-s2" / "work").exists()  # the copied data are removed
    assert (data / "hotel" / "test" / "saved_data.pickle").read_bytes() == b"stale"  # --data untouched
    assert "rotate: train=False test=False" in (tmp_path / "o" / "hotel-s2" / "reference.log").read_text()
    assert rec["rotate"] is False
    rows = {line.split(" | ")[0]: line for line in out.out.splitlines()}
    assert "| 0.315 ± 0.007 / 0.630 ± 0.014 |" in rows["| the authors' script on these files, last epoch, mean ± std "
                                                          "over seeds"]
    assert "| 0.215 ± 0.007 / 0.430 ± 0.014 |" in rows["| the authors' script, best test epoch (selected on the test "
                                                          "split; for comparability only)"]
    assert lbebm_reference.main(["run", "--reference", str(ref), "--data", str(data), "--out", str(tmp_path / "r"),
                                 "--scenes", "hotel", "--seeds", "1", "--epochs", "hotel=1", "--rotate"]) == 0
    # the loader's own rotate option, for the training files only
    assert "rotate: train='1' test=False" in (tmp_path / "r" / "hotel-s1" / "reference.log").read_text()
    assert json.loads((tmp_path / "r" / "hotel-s1" / "record.json").read_text())["rotate"] is True
    capsys.readouterr()
    assert lbebm_reference.main(["run", "--reference", str(ref), "--data", str(data), "--out", str(tmp_path / "r"),
                                 "--scenes", "hotel", "--seeds", "1"]) == 1
    assert "trained with rotate=True" in capsys.readouterr().err  # not reused as an unrotated run
    bad = subprocess.run([sys.executable, "benchmarks/lbebm_reference.py", "run", "--reference", str(tmp_path),
                          "--data", str(data), "--out", str(tmp_path / "q"), "--scenes", "hotel"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "lacks lbebm_hotel.py" in bad.stderr and len(bad.stderr.splitlines()) == 1


def test_table_runs_refuse_a_folder_trained_with_other_data_options(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from lbebm_table import finished_record

    done = tmp_path / "record.json"
    assert finished_record(done, {}) is None
    done.write_text(json.dumps({"ade": 0.3, "rotate": False, "eth_at_annotation_rate": True}))
    assert finished_record(done, {"eth_at_annotation_rate": True})["ade"] == 0.3
    with pytest.raises(RuntimeError, match="eth_at_annotation_rate=True, this run asks for eth_at_annotation_rate="):
        finished_record(done, {"rotate": False})
    done.write_text(json.dumps({"ade": 0.3}))  # a record from before the options: both off
    assert finished_record(done, {"rotate": False, "eth_at_annotation_rate": False})["ade"] == 0.3
    with pytest.raises(RuntimeError, match="rotate=False, this run asks for rotate=True"):
        finished_record(done, {"rotate": True})


def test_table_selected_on_validation_skips_runs_without_a_best_checkpoint_and_refuses_a_lost_one(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import lbebm_table

    folder = tmp_path / "lightning_logs" / "version_0" / "checkpoints"
    folder.mkdir(parents=True)
    torch.save({"state_dict": {}, "callbacks": {}}, folder / "last.ckpt")  # an older recipe's run: nothing to test
    assert lbebm_table.selected_on_validation(tmp_path, [], {}) is None
    state = {"monitor": "val/ade", "best_model_path": str(tmp_path / "gone" / "best-epoch=009.ckpt"),
             "best_model_score": torch.tensor(0.2)}
    torch.save({"state_dict": {}, "callbacks": {"BestCheckpoint{}": state}}, folder / "last.ckpt")
    with pytest.raises(RuntimeError, match="best checkpoint .*best-epoch=009.ckpt is missing"):
        lbebm_table.selected_on_validation(tmp_path, [], {})
