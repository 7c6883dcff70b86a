"""Image datamodules: real on-disk formats, the real MNIST/CIFAR/CelebA copies, splits, value ranges, clear errors."""
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from _data import DATA_ROOT
from PIL import Image
from torch.utils.data import RandomSampler, SequentialSampler
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import RandomSampler as StatefulRandomSampler

from datamodules import (
    CelebA64DataModule,
    CIFAR10DataModule,
    DatasetNotFoundError,
    ImageFolderDataModule,
    MNISTDataModule,
    QuickstartMNISTDataModule,
    SVHNDataModule,
)

MNIST_DIR = DATA_ROOT / "mnist"
CIFAR_ZIP = DATA_ROOT / "cifar10" / "cifar10-jpeg.zip"
CELEBA_ZIP = DATA_ROOT / "celeba" / "celeba-first10k-89x109-jpeg.zip"


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """Zips are extracted under a per-test cache, never into ~/.cache."""
    monkeypatch.setenv("LEBM_ZOO_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def fit_setup(dm):
    dm.prepare_data()
    dm.setup("fit")
    return dm


def sizes(dm):
    return len(dm.train_set), len(dm.val_set), len(dm.test_set)


# ------------------------------------------------------------------------------------------------------------ SVHN
def write_svhn(root: Path, n_train=30, n_test=10):
    """SVHN's format: X uint8 (32, 32, 3, N) = (row, col, channel, item), y (N, 1) labels 1..10 (10 = digit 0)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(1, 255, size=(32, 32, 3, n), dtype=np.uint8)
        x[0, 0, 0, 0], x[0, 1, 0, 0], x[5, 7, 2, 0] = 255, 0, 51  # item 0: row 0 col 0 red 255, col 1 red 0
        y = (np.arange(n) % 10 + 1).astype(np.uint8).reshape(n, 1)  # 1, 2, ..., 10, 1, ...
        scipy.io.savemat(root / f"{split}_32x32.mat", {"X": x, "y": y})


def test_svhn_mat_format_labels_pixels_and_splits(tmp_path):
    write_svhn(tmp_path)
    dm = fit_setup(SVHNDataModule(str(tmp_path), batch_size=10, num_workers=0, val_size=5))
    assert sizes(dm) == (25, 5, 10)
    assert (dm.img_size, dm.channels) == (32, 3) and dm.hparams.val_size == 5
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (10, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x[0, 0, 0, 0] == 1.0 and x[0, 0, 0, 1] == -1.0  # 255 -> 1, 0 -> -1, X indexed (row, col, channel, item)
    assert x[0, 2, 5, 7] == pytest.approx(51 / 255 * 2 - 1)
    assert x.min() >= -1 and x.max() <= 1 and (x > -1).float().mean() > 0.99
    assert y.tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 0]  # label 10 is the digit 0
    # fraction val_size, val_size=0 (validation = test split), idempotent setup
    frac = fit_setup(SVHNDataModule(str(tmp_path), num_workers=0, val_size=0.2))
    assert sizes(frac) == (24, 6, 10)
    none = fit_setup(SVHNDataModule(str(tmp_path), num_workers=0, val_size=0))
    assert none.val_set is none.test_set and len(none.train_set) == 30
    train = dm.train_set
    dm.setup("test")
    assert dm.train_set is train
    # the hold-out is seeded
    again = fit_setup(SVHNDataModule(str(tmp_path), num_workers=0, val_size=5))
    assert again.val_set.indices == dm.val_set.indices
    assert fit_setup(SVHNDataModule(str(tmp_path), num_workers=0, val_size=5, seed=2)).val_set.indices != \
        dm.val_set.indices


def test_svhn_checksum_flag(tmp_path):
    write_svhn(tmp_path)
    with pytest.raises(DatasetNotFoundError, match="missing: train_32x32.mat .or its md5 mismatches., test_32x32.mat"):
        SVHNDataModule(str(tmp_path), checksum=True).prepare_data()


def test_loaders_shuffle_train_only_and_workers_persist(tmp_path):
    write_svhn(tmp_path)
    dm = fit_setup(SVHNDataModule(str(tmp_path), batch_size=7, num_workers=1, val_size=5))
    train, val, test = dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()
    # resumable loaders (torchdata's StatefulDataLoader and its stateful RandomSampler)
    assert isinstance(train, StatefulDataLoader) and isinstance(train.sampler, (RandomSampler, StatefulRandomSampler))
    assert not train.drop_last and len(train) == 4  # 25 = 3 * 7 + 4
    assert isinstance(val.sampler, SequentialSampler) and isinstance(test.sampler, SequentialSampler)
    assert train.persistent_workers and train.pin_memory == torch.cuda.is_available()


# -------------------------------------------------------------------------------------------------- missing data
EXPECTED = {
    SVHNDataModule: ["train_32x32.mat", "test_32x32.mat"],
    MNISTDataModule: ["train-images-idx3-ubyte", "t10k-labels-idx1-ubyte"],
    CIFAR10DataModule: ["cifar-10-batches-py", "train/<class>/*.jpg", ".zip"],
    CelebA64DataModule: ["img_align_celeba", "list_eval_partition.txt", ".zip"],
    ImageFolderDataModule: ["*.jpg", ".zip"],
}


@pytest.mark.parametrize("cls", list(EXPECTED), ids=lambda c: c.__name__)
@pytest.mark.parametrize("hook", ["prepare_data", "setup"])
def test_missing_data_names_files_folder_and_fix(cls, hook, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    dm = cls(str(empty))
    with pytest.raises(DatasetNotFoundError) as e:
        getattr(dm, hook)()
    msg = str(e.value)
    assert str(empty.resolve()) in msg and "--data.data_dir" in msg
    assert all(name in msg for name in EXPECTED[cls]), msg
    assert ("--data.download true" in msg) == (cls is not ImageFolderDataModule)
    assert isinstance(e.value, FileNotFoundError)
    with pytest.raises(DatasetNotFoundError, match="no such file or folder"):
        cls(str(tmp_path / "nowhere")).setup("fit")


@pytest.mark.parametrize("cls", [SVHNDataModule, MNISTDataModule, CIFAR10DataModule], ids=lambda c: c.__name__)
def test_failed_download_is_one_clear_error_without_urllib_traceback(cls, tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    dm = cls(str(tmp_path / "fresh"), download=True)
    with pytest.raises(DatasetNotFoundError) as e:
        dm.prepare_data()
    msg = str(e.value)
    assert "download failed" in msg and "Temporary failure in name resolution" in msg
    assert str((tmp_path / "fresh").resolve()) in msg and "--data.data_dir" in msg
    assert e.value.__cause__ is None and e.value.__suppress_context__  # raised `from None`


def test_corrupt_svhn_files_are_clear_errors_naming_the_file(tmp_path):
    (tmp_path / "train_32x32.mat").write_bytes(b"garbage, not a MATLAB file")
    (tmp_path / "test_32x32.mat").write_bytes(b"garbage")
    with pytest.raises(DatasetNotFoundError, match="corrupt") as e:
        SVHNDataModule(str(tmp_path)).setup("fit")
    assert str((tmp_path / "train_32x32.mat").resolve()) in str(e.value)
    write_svhn(tmp_path)
    data = (tmp_path / "train_32x32.mat").read_bytes()
    (tmp_path / "train_32x32.mat").write_bytes(data[: len(data) // 2])  # truncated download
    with pytest.raises(DatasetNotFoundError, match="train_32x32.mat is not readable"):
        SVHNDataModule(str(tmp_path)).setup("fit")
    scipy.io.savemat(tmp_path / "train_32x32.mat", {"images": np.zeros((2, 2))})  # a .mat without X / y
    with pytest.raises(DatasetNotFoundError, match="KeyError"):
        SVHNDataModule(str(tmp_path)).setup("fit")


# ----------------------------------------------------------------------------------------------------------- MNIST
@pytest.mark.realdata("mnist/MNIST/raw")
def test_real_mnist_splits_shapes_and_padding():
    dm = fit_setup(MNISTDataModule(str(MNIST_DIR), batch_size=64, num_workers=0, val_size=1000))
    assert sizes(dm) == (59000, 1000, 10000) and (dm.img_size, dm.channels) == (28, 1)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (64, 1, 28, 28) and x.min() == -1 and x.max() == 1 and y.max() <= 9
    dm32 = MNISTDataModule(str(MNIST_DIR / "MNIST"), num_workers=0, img_size=32)  # .../MNIST accepted too
    dm32.setup("fit")
    x32, _ = dm32.test_set[0]
    x28, _ = dm.test_set[0]
    assert dm32.img_size == 32 and x32.shape == (1, 32, 32)
    assert torch.all(x32[:, :2] == -1) and torch.all(x32[:, :, -2:] == -1)  # 2 px of background padding
    assert torch.equal(x32[:, 2:30, 2:30], x28)
    with pytest.raises(ValueError, match="img_size"):
        MNISTDataModule(str(MNIST_DIR), img_size=64)


def test_corrupt_mnist_file_is_a_clear_error(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for f in MNISTDataModule.FILES:
        (raw / f).write_bytes(b"\x00\x00\x08")
    with pytest.raises(DatasetNotFoundError, match="train-\\*-ubyte is not readable"):
        MNISTDataModule(str(tmp_path)).setup("fit")


# -------------------------------------------------------------------------------------------------------- CIFAR-10
def write_tree(root: Path, splits=(("train", 4), ("test", 2)), classes=("cat", "dog"), size=(32, 32), ext="png"):
    rng = np.random.default_rng(0)
    for split, n in splits:
        for c in classes:
            d = root / split / c if split else root / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(arr).save(d / f"{i:04d}.{ext}")


def zip_tree(tree: Path, zpath: Path, prefix: str = "") -> Path:
    with zipfile.ZipFile(zpath, "w") as zf:
        for f in sorted(tree.rglob("*")):
            zf.write(f, prefix + str(f.relative_to(tree)))
    return zpath


def test_cifar10_image_folder_tree_and_zip(tmp_path, cache):
    tree = tmp_path / "cifar"
    write_tree(tree / "nested", classes=("cat", "dog", "frog"))  # train/ and test/ one level down
    dm = fit_setup(CIFAR10DataModule(str(tree), batch_size=4, num_workers=0, val_size=2))
    assert sizes(dm) == (10, 2, 6) and (dm.img_size, dm.channels) == (32, 3)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and x.min() >= -1 and x.max() <= 1 and set(y.tolist()) <= {0, 1, 2}
    assert dm.test_set.classes == ["cat", "dog", "frog"]

    zpath = zip_tree(tree, tmp_path / "cifar-mini.zip")
    dz = fit_setup(CIFAR10DataModule(str(zpath), batch_size=4, num_workers=0, val_size=0))
    assert len(dz.train_set) == 12 and dz.val_set is dz.test_set and len(dz.test_set) == 6
    assert (cache / "data" / "cifar-mini" / "nested" / "train" / "cat" / "0000.png").is_file()
    assert torch.equal(dz.test_set[0][0], dm.test_set[0][0])  # same pixels from the folder and the zip
    marker = cache / "data" / "cifar-mini" / ".lebm_zoo_extracted"
    stamp = marker.read_text()
    fit_setup(CIFAR10DataModule(str(zpath), num_workers=0, val_size=0))  # second use: no re-extraction
    assert marker.read_text() == stamp

    (tmp_path / "bad.zip").write_bytes(b"not a zip")
    with pytest.raises(DatasetNotFoundError, match="bad.zip is not a readable zip"):
        CIFAR10DataModule(str(tmp_path / "bad.zip")).prepare_data()
    flat = zip_tree(tree / "nested" / "train", tmp_path / "no-splits.zip")  # a zip without train/ and test/
    with pytest.raises(DatasetNotFoundError, match="no-splits.zip"):
        CIFAR10DataModule(str(flat)).prepare_data()


def test_a_folder_holding_one_zip_is_read_as_that_zip(tmp_path, cache):
    # what a user downloads: data/cifar10/cifar10-jpeg.zip, data/celeba/faces.zip (the layout of ../shared/data)
    write_tree(tmp_path / "tree", classes=("cat", "dog"))
    (tmp_path / "cifar10").mkdir()
    zip_tree(tmp_path / "tree", tmp_path / "cifar10" / "cifar10-jpeg.zip", prefix="cifar10/")
    dm = fit_setup(CIFAR10DataModule(str(tmp_path / "cifar10"), num_workers=0, val_size=0))
    assert len(dm.train_set) == 8 and len(dm.test_set) == 4
    (tmp_path / "faces").mkdir()
    zip_tree(tmp_path / "tree" / "train", tmp_path / "faces" / "faces.zip")
    dc = fit_setup(CelebA64DataModule(str(tmp_path / "faces"), num_workers=0, val_size=0, test_size=2))
    assert len(dc.train_set) == 6 and len(dc.test_set) == 2
    # two zips: which one is meant is not guessed; the error names what was looked for
    zip_tree(tmp_path / "tree", tmp_path / "cifar10" / "other.zip")
    with pytest.raises(DatasetNotFoundError, match="folder holding one such .zip"):
        CIFAR10DataModule(str(tmp_path / "cifar10")).prepare_data()


def test_corrupt_image_is_a_clear_error_naming_the_file(tmp_path):
    write_tree(tmp_path)
    bad = tmp_path / "test" / "cat" / "0000.png"
    bad.write_bytes(bad.read_bytes()[:60])  # truncated
    dm = fit_setup(CIFAR10DataModule(str(tmp_path), num_workers=0, val_size=0))
    with pytest.raises(DatasetNotFoundError, match="0000.png is not a readable image"):
        next(iter(dm.test_dataloader()))


@pytest.mark.realdata("cifar10/cifar10-jpeg.zip")
def test_members_of_the_real_cifar10_zip_load(tmp_path):
    """A few members of the real zip (its exact layout and JPEG encoding) re-zipped: extracting all 60k is too slow."""
    mini = tmp_path / "cifar10-mini.zip"
    picked = {}
    with zipfile.ZipFile(CIFAR_ZIP) as src, zipfile.ZipFile(mini, "w") as dst:
        for info in src.infolist():
            parts = info.filename.split("/")
            if len(parts) == 3 and parts[2] and picked.setdefault((parts[0], parts[1]), 0) < 2:
                picked[(parts[0], parts[1])] += 1
                dst.writestr(info, src.read(info))
    assert {s for s, _ in picked} == {"train", "test"} and len({c for _, c in picked}) == 10
    dm = fit_setup(CIFAR10DataModule(str(mini), batch_size=20, num_workers=0, val_size=0))
    assert sizes(dm) == (20, 20, 20)
    assert dm.test_set.classes[:3] == ["airplane", "automobile", "bird"]  # sorted names = CIFAR-10's label order
    x, _ = next(iter(dm.test_dataloader()))
    assert x.shape == (20, 3, 32, 32) and -1 <= x.min() < -0.5 and 0.5 < x.max() <= 1


# --------------------------------------------------------------------------------------------------------- CelebA
def write_faces(d: Path, n=20, size=(89, 109)):
    rng = np.random.default_rng(0)
    d.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)).save(d / f"{i + 1:06d}.jpg")


def test_celeba64_flat_folder_crop_resize_and_seeded_split(tmp_path):
    write_faces(tmp_path / "celebA")
    a = fit_setup(CelebA64DataModule(str(tmp_path), num_workers=0, val_size=4, test_size=0.25, batch_size=5))
    assert sizes(a) == (11, 4, 5) and (a.img_size, a.channels) == (64, 3)
    x, y = next(iter(a.train_dataloader()))
    assert x.shape == (5, 3, 64, 64) and x.min() >= -1 and x.max() <= 1 and y.tolist() == [0] * 5
    b = fit_setup(CelebA64DataModule(str(tmp_path / "celebA"), num_workers=0, val_size=4, test_size=5))
    assert a.test_set.indices == b.test_set.indices and a.val_set.indices == b.val_set.indices
    c = fit_setup(CelebA64DataModule(str(tmp_path), num_workers=0, val_size=4, test_size=5, seed=3))
    assert a.test_set.indices != c.test_set.indices
    # the crop: a 70x70 centre square of an 89x109 image (round(89 * 140 / 178) = 70), resized to 64
    img = Image.open(tmp_path / "celebA" / "000001.jpg").convert("RGB")
    crop = img.crop((10, 20, 80, 90)).resize((64, 64), Image.BILINEAR)
    want = torch.from_numpy(np.array(crop)).permute(2, 0, 1).float() / 127.5 - 1
    got = a.train_set.dataset.dataset[0][0]
    assert (got - want).abs().mean() < 0.02


def test_celeba64_torchvision_layout_uses_official_splits(tmp_path):
    base = tmp_path / "celeba"
    write_faces(base / "img_align_celeba", n=6, size=(178, 218))
    (base / "list_eval_partition.txt").write_text("".join(f"{i + 1:06d}.jpg {[0, 0, 0, 1, 2, 2][i]}\n"
                                                          for i in range(6)))
    dm = fit_setup(CelebA64DataModule(str(tmp_path), num_workers=0, val_size=0, batch_size=3))
    assert sizes(dm) == (3, 2, 2)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (3, 3, 64, 64) and y.tolist() == [0, 0, 0]


@pytest.mark.realdata("celeba/celeba-first10k-89x109-jpeg.zip")
def test_members_of_the_real_celeba_zip_load(tmp_path):
    mini = tmp_path / "celeba-mini.zip"
    with zipfile.ZipFile(CELEBA_ZIP) as src, zipfile.ZipFile(mini, "w") as dst:
        for info in [i for i in src.infolist() if i.filename.endswith(".jpg")][:12]:
            dst.writestr(info, src.read(info))
    dm = fit_setup(CelebA64DataModule(str(mini), num_workers=0, val_size=2, test_size=2, batch_size=8))
    assert sizes(dm) == (8, 2, 2)
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 3, 64, 64) and x.min() >= -1 and x.max() <= 1


# --------------------------------------------------------------------------------------------------- image folder
def test_image_folder_nested_zip_grayscale_and_resize(tmp_path):
    write_tree(tmp_path / "imgs", splits=(("a", 5), ("b/deeper", 3)), classes=("x",), size=(40, 24), ext="jpg")
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    (tmp_path / "imgs" / "._0000.jpg").write_bytes(b"AppleDouble junk")
    dm = fit_setup(ImageFolderDataModule(str(tmp_path / "imgs"), img_size=16, channels=1, num_workers=0, val_size=2,
                                         test_size=2, batch_size=8))
    assert sizes(dm) == (4, 2, 2) and (dm.img_size, dm.channels) == (16, 1)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 1, 16, 16) and y.tolist() == [0] * 4
    zpath = zip_tree(tmp_path / "imgs", tmp_path / "imgs.zip", prefix="top/")
    dz = fit_setup(ImageFolderDataModule(str(zpath), img_size=24, num_workers=0, val_size=0.25, test_size=0.25))
    assert sizes(dz) == (4, 2, 2)
    assert dz.test_set[0][0].shape == (3, 24, 24)
    with pytest.raises(ValueError, match="channels"):
        ImageFolderDataModule(str(tmp_path), channels=2)


# ----------------------------------------------------------------------------------------------------- quickstart
def test_quickstart_digits_are_embedded_and_split_deterministically():
    dm = QuickstartMNISTDataModule(val_size=1000)
    dm.prepare_data()
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set)) == (9000, 1000) and dm.test_set is dm.val_set
    assert (dm.img_size, dm.channels) == (28, 1)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (100, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.min() == -1 and x.max() == 1 and 0 <= int(y.min()) and int(y.max()) <= 9
    other = QuickstartMNISTDataModule(val_size=1000)
    other.setup("fit")
    assert dm.val_set.indices == other.val_set.indices
    padded = QuickstartMNISTDataModule(img_size=32)
    padded.setup("fit")
    assert padded.img_size == 32 and padded.train_set[0][0].shape == (1, 32, 32)
    with pytest.raises(ValueError, match="val_size"):
        QuickstartMNISTDataModule(val_size=0)


@pytest.mark.realdata("mnist/MNIST/raw")
def test_embedded_digits_are_the_real_mnist_test_set():
    # scaled like ToTensor + Normalize, in the same order
    dm = QuickstartMNISTDataModule()
    dm.setup("fit")
    real = MNISTDataModule(str(MNIST_DIR), num_workers=0, val_size=0)
    real.setup("test")
    assert torch.equal(dm.train_set.dataset.tensors[0][:5], torch.stack([real.test_set[i][0] for i in range(5)]))
