"""Anomaly detection (issue 6): the MNIST held-out-digit split, AUPRC/AUROC callback, LatentEBMPrior.anomaly_score."""
import math

import numpy as np
import pytest
import torch
from _data import DATA_ROOT, fixed_batch, tensor_loader, tiny_trainer, write_mnist
from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_auc_score
from torch.utils.data import DataLoader, TensorDataset

from datamodules import DatasetNotFoundError, MNISTAnomalyDataModule
from lebm_zoo import EBMModule, LatentEBMPrior
from lebm_zoo.callbacks import AnomalyDetectionCallback

MNIST_DIR = DATA_ROOT / "mnist"
# fake MNIST: 60 train + 20 test images, every digit 8 times in all
TRAIN_DIGITS, TEST_DIGITS = np.arange(60) % 10, np.arange(20) % 10


# ------------------------------------------------------------------------------------------------------ datamodule
@pytest.fixture
def fake_mnist(tmp_path):
    write_mnist(tmp_path, labels=(TRAIN_DIGITS, TEST_DIGITS))
    return tmp_path


def pooled(root):
    """The fake files read back independently of the datamodule: uint8 images (80, 28, 28) and digits (80,)."""
    raw = root / "MNIST" / "raw"
    imgs = [np.frombuffer((raw / f"{p}-images-idx3-ubyte").read_bytes(), np.uint8, offset=16)
            for p in ("train", "t10k")]
    return np.concatenate(imgs).reshape(-1, 28, 28), np.concatenate([TRAIN_DIGITS, TEST_DIGITS])


def split_arrays(ds):
    """A split as uint8 images (N, 28, 28) and labels (N,), checking the item format on the way."""
    xs, ys = zip(*(ds[i] for i in range(len(ds))))
    x, y = torch.stack(xs), torch.stack(ys)
    assert x.shape[1:] == (1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.min() >= -1 and x.max() <= 1
    return ((x[:, 0] + 1) * 127.5).round().to(torch.uint8).numpy(), y.numpy()


def setup(root, **kw):
    dm = MNISTAnomalyDataModule(str(root), batch_size=8, **kw)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def reference_split(images, digits, label, seed=42):
    """The cited code's split (Zenati et al., data/mnist.py), restated: a generator shared by the get_train and the
    get_test call, each drawing a permutation of the normals and then one of its test set."""
    cut = 60 - 60 // 6  # the pickle's train part of our 60 fake training images; the rest is its validation part
    pool = np.r_[np.arange(cut), 60 + np.arange(20), np.arange(cut, 60)]  # x_train, x_test, x_valid
    rng = np.random.RandomState(seed)

    def get(split):
        normal = pool[digits[pool] != label]
        normal = normal[rng.permutation(len(normal))]
        index = int(len(normal) * 0.8)
        test = np.concatenate([normal[index:], pool[digits[pool] == label]])
        rng.permutation(len(test))  # the test shuffle: order only, but it advances the shared generator
        return normal[:index] if split == "train" else test

    return get("train"), get("test")


def test_reference_split_is_the_cited_codes(fake_mnist):
    images, digits = pooled(fake_mnist)
    dm = setup(fake_mnist, heldout_digit=1)  # split="reference", the default
    train, test = reference_split(images, digits, 1)
    assert (dm.num_train, dm.num_val, dm.num_test, dm.num_test_anomalies) == (57, 0, 23, 8)
    train_x, train_y = split_arrays(dm.train_set)
    test_x, test_y = split_arrays(dm.test_set)
    assert np.array_equal(train_x, images[train]) and not train_y.any()
    # the same images (our test split lists normals then anomalies; the reference shuffles them, order-free metrics)
    assert sorted(map(bytes, test_x)) == sorted(map(bytes, images[test]))
    assert test_y.sum() == 8 and np.array_equal(np.sort(test_x[test_y == 1].reshape(8, -1), 0),
                                                 np.sort(images[digits == 1].reshape(8, -1), 0))
    # most test normals were trained on, as in the reference; the count is exact
    overlap = len(set(test[:15].tolist()) & set(train.tolist()))
    assert dm.num_test_normals_in_train == overlap and 8 <= overlap < 15
    disjoint = setup(fake_mnist, heldout_digit=1, split="disjoint")
    assert disjoint.num_test_normals_in_train == 0
    with pytest.raises(ValueError, match="split must be"):
        MNISTAnomalyDataModule(str(fake_mnist), split="random")


def test_disjoint_split_is_the_exact_protocol(fake_mnist):
    images, digits = pooled(fake_mnist)
    dm = setup(fake_mnist, heldout_digit=1, split="disjoint")
    # 72 normal images: train on floor(0.8 * 72) = 57 (round would give 58), test on the other 15 + all 8 ones
    assert (dm.num_train, dm.num_val, dm.num_test, dm.num_test_anomalies) == (57, 0, 23, 8)
    assert (dm.channels, dm.img_size) == (1, 28)
    normal = np.flatnonzero(digits != 1)
    order = normal[torch.randperm(len(normal), generator=torch.Generator().manual_seed(42)).numpy()]
    train_x, train_y = split_arrays(dm.train_set)
    test_x, test_y = split_arrays(dm.test_set)
    assert np.array_equal(train_x, images[order[:57]]) and not train_y.any()
    expected_test = np.concatenate([order[57:], np.flatnonzero(digits == 1)])
    assert np.array_equal(test_x, images[expected_test])
    assert np.array_equal(test_y, (digits[expected_test] == 1).astype(np.int64))
    assert dm.val_set is None and dm.val_dataloader() == []
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (8, 1, 28, 28) and y.dtype == torch.int64
    # determinism across instances; another digit gives other splits
    again = setup(fake_mnist, heldout_digit=1, split="disjoint")
    assert np.array_equal(split_arrays(again.train_set)[0], train_x)
    assert np.array_equal(split_arrays(again.test_set)[0], test_x)
    four = setup(fake_mnist, heldout_digit=4, split="disjoint")
    four_test_x, four_test_y = split_arrays(four.test_set)
    assert not np.array_equal(split_arrays(four.train_set)[0], train_x)
    assert np.array_equal(four_test_x[four_test_y == 1], images[digits == 4])


def test_validation_split_comes_from_the_training_normals(fake_mnist):
    images, digits = pooled(fake_mnist)
    plain, dm = setup(fake_mnist), setup(fake_mnist, val_fraction=0.25)
    assert (dm.num_train, dm.num_val, dm.num_test) == (43, 14, 23)  # floor(0.25 * 57) = 14
    train_x, _ = split_arrays(dm.train_set)
    val_x, val_y = split_arrays(dm.val_set)
    assert not val_y.any()
    assert np.array_equal(np.concatenate([train_x, val_x]), split_arrays(plain.train_set)[0])
    assert np.array_equal(split_arrays(dm.test_set)[0], split_arrays(plain.test_set)[0])
    assert len(next(iter(dm.val_dataloader()))[0]) == 8


def test_no_validation_split_trains_in_lightning(fake_mnist, tmp_path):
    model = LatentEBMPrior(img_size=28, channels=1, nz=4, ngf=4, ndf=8, prior_steps=1, posterior_steps=1)
    t = tiny_trainer(tmp_path / "run", [], max_steps=1)
    t.fit(model, datamodule=MNISTAnomalyDataModule(str(fake_mnist), batch_size=8))
    assert t.global_step == 1


@pytest.mark.parametrize("kw", [dict(heldout_digit=10), dict(heldout_digit=-1), dict(heldout_digit=1.5),
                                dict(train_fraction=1.0), dict(train_fraction=0), dict(val_fraction=1.0)])
def test_bad_arguments_raise(fake_mnist, kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        MNISTAnomalyDataModule(str(fake_mnist), **kw)


def test_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="MNIST/raw/train-images-idx3-ubyte"):
        MNISTAnomalyDataModule(str(tmp_path)).setup("test")


@pytest.mark.realdata("mnist/MNIST/raw")
def test_real_mnist_split_sizes():
    dm = setup(MNIST_DIR, heldout_digit=1)
    # 70,000 images, 7,877 ones: 62,123 normals -> floor(0.8 * 62,123) = 49,698 train, 12,425 + 7,877 test
    assert (dm.num_train, dm.num_test, dm.num_test_anomalies) == (49_698, 20_302, 7_877)
    # the reference's test normals are a fresh 20% draw: about 80% of its 12,425 were trained on
    assert 0.78 * 12_425 < dm.num_test_normals_in_train < 0.82 * 12_425
    assert setup(MNIST_DIR, heldout_digit=1, split="disjoint").num_test_normals_in_train == 0


# ------------------------------------------------------------------------------------------------------- callback
SCORES = torch.tensor([0.9, 0.8, 0.8, 0.7, 0.6, 0.55, 0.5, 0.5, 0.4, 0.3, 0.3, 0.2, 0.1, 0.05, 0.0, -0.2, 1.2])
LABELS = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0, 0, 1, 0, 0, 0, 1, 0, 0, 1])


class KnownScores(EBMModule):
    """Scores each image with its first pixel, so a loader of (x, y) carries the scores."""

    def anomaly_score(self, x):
        return x[:, 0, 0, 0].float()

    def training_step(self, batch, batch_idx):
        return None

    def configure_optimizers(self):
        return None

    def validation_step(self, batch, batch_idx):
        return None

    def test_step(self, batch, batch_idx):
        return None


def scored_loader(scores=SCORES, labels=LABELS, batch_size=5):
    x = scores.view(-1, 1, 1, 1).expand(-1, 1, 2, 2).contiguous()
    return DataLoader(TensorDataset(x, labels), batch_size=batch_size)


@pytest.mark.parametrize("scale,shift", [(1.0, 0.0), (1000.0, 500.0)], ids=["around-0-1", "nats"])
def test_callback_matches_sklearn(tmp_path, scale, shift):
    # ties, and batches of 5 with and without scores outside [0, 1] (torchmetrics would sigmoid those batches only)
    scores = SCORES * scale + shift
    cb = AnomalyDetectionCallback()
    out = tiny_trainer(tmp_path, [cb]).test(KnownScores(), scored_loader(scores))[0]
    precision, recall, _ = precision_recall_curve(LABELS, scores)
    auprc, ap, auroc = auc(recall, precision), average_precision_score(LABELS, scores), roc_auc_score(LABELS, scores)
    assert abs(auprc - ap) > 1e-3  # the protocol's trapezoid and the step-wise AP differ on this data: both checked
    assert isinstance(cb.last_auprc, float) and isinstance(cb.last_auroc, float)
    assert cb.last_auprc == pytest.approx(auprc, abs=1e-6) and cb.last_auroc == pytest.approx(auroc, abs=1e-6)
    assert cb.last_ap == pytest.approx(ap, abs=1e-6)
    assert out["test/auprc"] == pytest.approx(auprc, abs=1e-6) and out["test/auroc"] == pytest.approx(auroc, abs=1e-6)
    assert out["test/ap"] == pytest.approx(ap, abs=1e-6)


def test_callback_caps_images(tmp_path):
    capped = AnomalyDetectionCallback(max_images=7)
    tiny_trainer(tmp_path, [capped]).test(KnownScores(), scored_loader())
    assert capped.last_ap == pytest.approx(average_precision_score(LABELS[:7], SCORES[:7]), abs=1e-6)
    precision, recall, _ = precision_recall_curve(LABELS[:7], SCORES[:7])
    assert capped.last_auprc == pytest.approx(auc(recall, precision), abs=1e-6)


def test_callback_validation_needs_both_classes(tmp_path):
    train = scored_loader()
    cb = AnomalyDetectionCallback(every_n_epochs=1, on_test=False)
    t = tiny_trainer(tmp_path, [cb], max_epochs=1, limit_train_batches=1)
    t.fit(KnownScores(), train, scored_loader())
    assert t.callback_metrics["val/ap"] == pytest.approx(average_precision_score(LABELS, SCORES), abs=1e-6)
    assert "test/auprc" not in tiny_trainer(tmp_path, [cb]).test(KnownScores(), scored_loader())[0]
    one_class = AnomalyDetectionCallback(every_n_epochs=1)
    t = tiny_trainer(tmp_path, [one_class], max_epochs=1, limit_train_batches=1)
    with pytest.warns(UserWarning, match="need both"):
        t.fit(KnownScores(), train, scored_loader(labels=torch.zeros_like(LABELS)))
    assert "val/auprc" not in t.callback_metrics and math.isnan(one_class.last_auprc)
    t = tiny_trainer(tmp_path, [AnomalyDetectionCallback(every_n_epochs=2)], max_epochs=1, limit_train_batches=1)
    t.fit(KnownScores(), train, scored_loader())
    assert "val/auprc" not in t.callback_metrics  # epoch 1 of every 2: not due


def test_callback_errors(tmp_path):
    class NoScore(KnownScores):
        anomaly_score = None

    with pytest.raises(TypeError, match="anomaly_score"):
        tiny_trainer(tmp_path, [AnomalyDetectionCallback()]).test(NoScore(), scored_loader())
    with pytest.raises(ValueError, match="labels 0 .normal. and 1 .anomaly."):
        tiny_trainer(tmp_path, [AnomalyDetectionCallback()]).test(KnownScores(), scored_loader(labels=LABELS * 3))
    with pytest.raises(ValueError, match="non-finite"):
        tiny_trainer(tmp_path, [AnomalyDetectionCallback()]).test(KnownScores(), scored_loader(SCORES / 0))
    with pytest.raises(ValueError, match="max_images"):
        AnomalyDetectionCallback(max_images=0)


# ------------------------------------------------------------------------------------------------- model's score
def tiny(**kw):
    cfg = dict(img_size=28, channels=1, nz=8, ngf=8, ndf=16, prior_steps=5, posterior_steps=10)
    cfg.update(kw)
    return LatentEBMPrior(**cfg)


def test_anomaly_score_is_the_negative_log_joint():
    m = tiny().eval()
    x = fixed_batch(6)
    torch.manual_seed(0)
    score = m.anomaly_score(x, n_steps=4)
    torch.manual_seed(0)
    z = m.infer_latent(x, n_steps=4)
    with torch.no_grad():
        expected = -m.log_joint(x, z)
    assert score.shape == (6,) and score.dtype == torch.float32 and not score.requires_grad
    assert torch.allclose(score, expected)
    with torch.inference_mode():  # as inside Trainer.test
        assert m.anomaly_score(x).shape == (6,)


def test_trained_model_scores_another_pattern_higher(tmp_path):
    torch.manual_seed(0)
    x = fixed_batch(32, seed=0)  # one digit-like pattern: a vertical bright bar
    m = tiny(lr_g=2e-3, lr_e=1e-3)
    tiny_trainer(tmp_path, max_steps=30).fit(m, tensor_loader(x, 16, shuffle=True,
                                                             labels=torch.zeros(32, dtype=torch.long)))
    normal, odd = fixed_batch(16, seed=1), fixed_batch(16, seed=2).transpose(-1, -2)  # odd: a horizontal bar
    torch.manual_seed(1)
    assert m.anomaly_score(odd).mean() > m.anomaly_score(normal).mean()
    cb = AnomalyDetectionCallback()
    test = DataLoader(TensorDataset(torch.cat([normal, odd]), torch.arange(32) // 16), batch_size=8)
    tiny_trainer(tmp_path, [cb]).test(m, test)
    assert cb.last_auroc > 0.9 and cb.last_auprc > 0.9
