"""Image datamodules: real-format files, the real MNIST copy, splits, value ranges and clear errors."""
import zipfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from datamodules import (
    CelebA64DataModule,
    CIFAR10DataModule,
    DatasetNotFoundError,
    ImageFolderDataModule,
    MNISTDataModule,
    QuickstartMNISTDataModule,
    SVHNDataModule,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LEBM_ZOO_CACHE", str(tmp_path / "cache"))


def write_svhn(root: Path, n_train=30, n_test=10):
    """SVHN's on-disk format: X uint8 (32, 32, 3, N), y (N, 1) uint8 labels 1..10 where 10 is the digit 0."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)
        x[0, 0, 0, 0], x[0, 1, 0, 0] = 255, 0
        y = (np.arange(n) % 10 + 1).astype(np.uint8).reshape(n, 1)  # 1..10, first item label 1
        scipy.io.savemat(root / f"{split}_32x32.mat", {"X": x, "y": y})
    return x, y


def test_svhn_reads_the_mat_format_maps_label_10_to_0_and_scales_to_unit_range(tmp_path):
    write_svhn(tmp_path)
    dm = SVHNDataModule(str(tmp_path), batch_size=10, num_workers=0, val_size=5)
    dm.prepare_data()
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (25, 5, 10)
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (10, 3, 32, 32) and x.dtype == torch.float32
    assert x[0, 0, 0, 0] == 1.0 and x[0, 0, 0, 1] == -1.0  # pixel 255 -> 1, 0 -> -1 (X is H, W, C, N)
    assert x.min() >= -1 and x.max() <= 1
    assert y.tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 0]  # label 10 means the digit 0
    assert (dm.img_size, dm.channels) == (32, 3)


def test_svhn_missing_and_corrupt_files_are_clear_errors(tmp_path):
    with pytest.raises(DatasetNotFoundError) as e:
        SVHNDataModule(str(tmp_path)).prepare_data()
    msg = str(e.value)
    assert "train_32x32.mat" in msg and str(tmp_path.resolve()) in msg
    assert "--data.download true" in msg and "--data.data_dir" in msg
    (tmp_path / "train_32x32.mat").write_bytes(b"garbage")
    (tmp_path / "test_32x32.mat").write_bytes(b"garbage")
    with pytest.raises(DatasetNotFoundError, match="not a readable SVHN .mat file"):
        SVHNDataModule(str(tmp_path)).setup("fit")


@pytest.mark.parametrize("cls", [MNISTDataModule, CIFAR10DataModule, CelebA64DataModule])
def test_missing_data_names_files_folder_and_fix(cls, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetNotFoundError) as e:
        dm = cls(str(empty))
        dm.prepare_data()
        dm.setup("fit")
    assert str(empty.resolve()) in str(e.value) and "--data.data_dir" in str(e.value)


@pytest.mark.skipif(not (SHARED / "mnist").exists(), reason="real MNIST copy ../shared/data/mnist not present")
def test_real_mnist_splits_and_shapes():
    dm = MNISTDataModule(str(SHARED / "mnist"), batch_size=64, num_workers=0, val_size=1000)
    dm.prepare_data()
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (59000, 1000, 10000)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (64, 1, 28, 28) and x.min() == -1 and x.max() == 1
    dm32 = MNISTDataModule(str(SHARED / "mnist"), num_workers=0, img_size=32)
    dm32.setup("fit")
    x32, _ = dm32.test_set[0]
    assert x32.shape == (1, 32, 32) and torch.all(x32[:, :2] == -1)  # zero padding in [-1, 1] units


def write_tree(root: Path, split_counts=(("train", 4), ("test", 2)), classes=("cat", "dog"), size=(40, 36)):
    rng = np.random.default_rng(0)
    for split, n in split_counts:
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(arr).save(d / f"{i:04d}.png")


def test_cifar10_image_folder_tree_and_zip(tmp_path):
    tree = tmp_path / "cifar"
    write_tree(tree / "cifar10", size=(32, 32))
    dm = CIFAR10DataModule(str(tree), batch_size=4, num_workers=0, val_size=2)
    dm.prepare_data()
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (6, 2, 4)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and set(y.tolist()) <= {0, 1}
    zpath = tmp_path / "cifar.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for f in tree.rglob("*.png"):
            zf.write(f, f.relative_to(tree))
    dz = CIFAR10DataModule(str(zpath), batch_size=4, num_workers=0, val_size=0)
    dz.prepare_data()
    dz.setup("fit")
    assert len(dz.train_set) == 8 and dz.val_set is dz.test_set and len(dz.test_set) == 4
    (tmp_path / "bad.zip").write_bytes(b"not a zip")
    with pytest.raises(DatasetNotFoundError, match="not a readable zip"):
        CIFAR10DataModule(str(tmp_path / "bad.zip")).prepare_data()


def test_celeba64_flat_folder_crop_resize_and_seeded_split(tmp_path):
    rng = np.random.default_rng(0)
    d = tmp_path / "celebA"
    d.mkdir()
    for i in range(20):
        Image.fromarray(rng.integers(0, 256, size=(109, 89, 3), dtype=np.uint8)).save(d / f"{i + 1:06d}.jpg")
    a = CelebA64DataModule(str(tmp_path), num_workers=0, val_size=4, test_size=0.25, batch_size=5)
    a.setup("fit")
    assert (len(a.train_set), len(a.val_set), len(a.test_set)) == (11, 4, 5)
    x, _ = next(iter(a.train_dataloader()))
    assert x.shape == (5, 3, 64, 64)
    b = CelebA64DataModule(str(tmp_path), num_workers=0, val_size=4, test_size=0.25)
    b.setup("fit")
    assert a.test_set.indices == b.test_set.indices  # deterministic with the seed


def test_image_folder_grayscale(tmp_path):
    write_tree(tmp_path / "imgs", split_counts=(("a", 5),), classes=("x",))
    dm = ImageFolderDataModule(str(tmp_path / "imgs"), img_size=16, channels=1, num_workers=0, val_size=2,
                               test_size=2, batch_size=8)
    dm.setup("fit")
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (1, 1, 16, 16)


def test_quickstart_digits_are_embedded_and_split_deterministically():
    dm = QuickstartMNISTDataModule(val_size=1000)
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set)) == (9000, 1000) and dm.test_set is dm.val_set
    x, y = dm.train_set[0]
    assert x.shape == (1, 28, 28) and x.min() == -1 and x.max() == 1 and 0 <= int(y) <= 9
    other = QuickstartMNISTDataModule(val_size=1000)
    other.setup("fit")
    assert dm.val_set.indices == other.val_set.indices
    if (SHARED / "mnist").exists():  # the embedded digits are the real MNIST test set
        from torchvision.datasets import MNIST

        real = MNIST(str(SHARED / "mnist"), train=False)
        assert torch.equal(((dm.train_set.dataset.tensors[0][:5, 0] + 1) * 127.5).round().byte(), real.data[:5])
