"""SymbolVectorLEBM (Pang & Wu 2021, the latent EBM of symbol-vector coupling), SemiSupervisedDataModule and the
classification callbacks: densities, conditional sampling, the classifier after a short training on the 2-D toy, the
labelled split, errors, the recipe through the command, checkpoints."""
import math

import pytest
import pytorch_lightning as pl
import torch
from _data import tensor_loader, tiny_trainer, uniform_images, write_mnist

import lebm_zoo
from datamodules import EightGaussiansDataModule, MNISTDataModule, SemiSupervisedDataModule
from datamodules.semisup import dataset_labels
from lebm_zoo import DataShapeError, LatentEBMPrior, SymbolVectorLEBM
from lebm_zoo.callbacks import ClassificationAccuracy, ClassRegionPlot2D
from lebm_zoo.fingerprint import fingerprint
from lebm_zoo.models.symbol_vector import mutual_information


def tiny(**kw):
    cfg = dict(img_size=28, channels=1, nz=8, ngf=4, ndf=16, n_classes=5, prior_steps=3, posterior_steps=3)
    cfg.update(kw)
    return SymbolVectorLEBM(**cfg)


TOY = dict(dim=2, nz=2, ngf=64, ndf=64, n_classes=8, prior_steps=30, prior_step_size=0.4, posterior_steps=20,
           posterior_step_size=0.1, llhd_sigma=0.1, lr_g=2e-3, lr_e=2e-3, lr_schedule="exponential", lr_decay=1.0,
           loss_g_limit=None)


def toy_data(batch_size=100, labels_per_class=5, labelled_batch_size=40, seed=0):
    inner = EightGaussiansDataModule(n_train=4000, n_val=400, n_test=1000, batch_size=batch_size, labels=True)
    return SemiSupervisedDataModule(inner, labels_per_class=labels_per_class, labelled_batch_size=labelled_batch_size,
                                    seed=seed)


class BatchRecorder(pl.Callback):
    def __init__(self):
        self.shapes = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.shapes.append(tuple(tuple(t.shape) for t in batch) if isinstance(batch, tuple) else type(batch))


@pytest.fixture(scope="module")
def toy_model():
    """A 2-D model trained for 150 steps on the eight Gaussians with 40 labels (about 10 s on one core)."""
    torch.manual_seed(0)
    m = SymbolVectorLEBM(**TOY)
    dm = toy_data()
    rec = BatchRecorder()
    trainer = tiny_trainer(callbacks=[rec], max_steps=150, limit_val_batches=0)
    trainer.fit(m, dm)
    m.eval()
    return m, dm, trainer, rec


# ------------------------------------------------------------------------------------------------ the model
def test_marginal_energy_is_minus_logsumexp_of_the_logits_and_the_densities_agree():
    torch.manual_seed(0)
    m = tiny(prior_sigma=2.0)
    assert isinstance(m, LatentEBMPrior) and m.is_ebm
    z = torch.randn(6, 8)
    logits = m.logits(z)
    assert logits.shape == (6, 5)
    assert torch.equal(m.energy(z), -torch.logsumexp(logits, dim=1))  # exactly the reference's marginal
    assert torch.equal(m.prior_log_prob(z), -m.energy(z) - z.pow(2).sum(1) / 8.0)
    cond = torch.stack([m.conditional_prior_log_prob(z, c) for c in range(5)], 1)  # (6, 5)
    assert torch.allclose(torch.logsumexp(cond, 1), m.prior_log_prob(z), atol=1e-5)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    assert torch.equal(m.class_energy(z, y), -logits[torch.arange(6), y])
    assert torch.equal(m.conditional_prior_log_prob(z, y), logits[torch.arange(6), y] - z.pow(2).sum(1) / 8.0)


def test_it_reuses_the_lebm_generator_and_public_methods():
    torch.manual_seed(0)
    a = LatentEBMPrior(img_size=28, channels=1, nz=8, ngf=4, ndf=16)
    torch.manual_seed(0)
    b = tiny()
    assert all(torch.equal(p, q) for p, q in zip(a.generator.state_dict().values(), b.generator.state_dict().values()))
    b.eval()
    x = uniform_images(4)
    assert b.sample(3).shape == (3, 1, 28, 28) and b.sample(3, y=2).shape == (3, 1, 28, 28)
    assert b.sample_latent(5, torch.tensor([0, 1, 2, 3, 4])).shape == (5, 8) == b.sample_latent(5, [0] * 5).shape
    assert b.reconstruct(x).shape == x.shape and b.anomaly_score(x).shape == (4,)
    probs = b.classify(x, n_samples=3)
    assert probs.shape == (4, 5) and torch.allclose(probs.sum(1), torch.ones(4)) and (probs >= 0).all()
    out = b.predict_step((x, torch.zeros(4)), 0)
    assert out["probs"].shape == (4, 5) and out["z"].shape == (4, 8)


class LinearLogits(SymbolVectorLEBM):
    """F_y(z) = a <w_y, z> with w_y the four unit directions of the plane: p(z | y) = N(a w_y, I) exactly."""

    scale = 4.0
    directions = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])

    def logits(self, z):
        return self.scale * z @ self.directions.t()


def test_conditional_prior_chains_sample_the_class_tilted_gaussian():
    torch.manual_seed(0)
    m = LinearLogits(dim=2, nz=2, ngf=8, ndf=8, n_classes=4)  # default K0 = 60 steps of 0.4
    for c in range(4):
        z = m.sample_latent(2000, c)
        assert torch.allclose(z.mean(0), 4.0 * m.directions[c], atol=0.15), (c, z.mean(0))
        assert 0.9 < z.std(0).min() and z.std(0).max() < 1.15
        assert (m.logits(z).argmax(1) == c).float().mean() > 0.97
    y = torch.arange(400) % 4
    z = m.sample_latent(400, y)
    assert (m.logits(z).argmax(1) == y).float().mean() > 0.95
    assert m.sample(8, y=1).shape == (8, 2)


def test_mutual_information_term():
    assert mutual_information(torch.zeros(16, 4)).abs() < 1e-6  # uninformative classifier
    confident = 30.0 * torch.eye(4).repeat(4, 1)  # every z sure of its class, the classes used evenly
    assert mutual_information(confident) == pytest.approx(math.log(4), abs=1e-4)
    one_class = 30.0 * torch.eye(4)[[0] * 16]
    assert mutual_information(one_class).abs() < 1e-4


# ------------------------------------------------------------------------------------------------ training
def test_short_toy_training_classifies_and_conditions(toy_model):
    m, dm, trainer, rec = toy_model
    assert trainer.global_step == 150
    assert rec.shapes[0] == ((100, 2), (40, 2), (40,))  # the datamodule's (x_unlabelled, x_labelled, y_labelled)
    metrics = trainer.callback_metrics
    for k in ("loss_g", "loss_e", "loss_cls", "acc_labelled", "energy_gap", "grad_norm_e"):
        assert torch.isfinite(metrics[f"train/{k}"]), k
    assert metrics["train/acc_labelled"] > 0.9
    x, y = dm.test_set.tensors
    torch.manual_seed(1)
    acc = (m.classify(x).argmax(1) == y).float().mean()
    assert acc > 0.8, acc  # chance: 1/8
    torch.manual_seed(2)
    hits = [(m.logits(m.sample_latent(200, c)).argmax(1) == c).float().mean() for c in range(8)]
    assert sum(hits) / 8 > 0.7, hits  # conditional prior samples fall in their class's region


def test_plain_batches_have_no_classification_term_and_mi_is_logged():
    torch.manual_seed(0)
    m = tiny(mi_weight=15.0)
    x = uniform_images(8)
    t = tiny_trainer(max_steps=2)
    t.fit(m, tensor_loader(x, 4, labels=torch.arange(8) % 5))  # (x, y) batches: y ignored
    assert t.global_step == 2 and t.callback_metrics["train/loss_cls"] == 0
    assert "train/acc_labelled" not in t.callback_metrics and torch.isfinite(t.callback_metrics["train/mi"])


def test_lightning_combined_batches_without_the_datamodule():
    torch.manual_seed(0)
    m = SymbolVectorLEBM(**{**TOY, "prior_steps": 2, "posterior_steps": 2})
    dm = toy_data(batch_size=50, labelled_batch_size=16)
    dm.setup("fit")
    t = tiny_trainer(max_steps=2)
    t.fit(m, train_dataloaders=dm.train_dataloader())  # [(x_u, y_u), (x_l, y_l)] batches
    assert torch.isfinite(t.callback_metrics["train/acc_labelled"])


def test_accuracy_callback_and_class_region_plot(toy_model, tmp_path):
    m, dm, _, _ = toy_model
    acc = ClassificationAccuracy(max_images=150, max_test_images=None)
    plot = ClassRegionPlot2D(max_points=300, n=40)
    t = tiny_trainer(tmp_path, [acc, plot], limit_test_batches=2)
    torch.manual_seed(0)
    out = t.test(m, dm, verbose=False)[0]
    assert out["test/accuracy"] == pytest.approx(acc.last_accuracy) and acc.last_accuracy > 0.8
    assert plot.last_path is not None and plot.last_path.name == "test.png" and plot.last_path.stat().st_size > 0
    val = tiny_trainer(tmp_path, [acc]).validate(m, dm, verbose=False)[0]
    assert "val/accuracy" in val and acc._seen == 150  # capped at max_images


# ------------------------------------------------------------------------------------------------ the split
def labelled_mnist(root, per_class=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    train = (torch.arange(10 * per_class) % 10)[torch.randperm(10 * per_class, generator=g)].tolist()
    write_mnist(root, labels=(train, [i % 10 for i in range(20)]))
    return root


def mnist_semisup(root, labels_per_class=3, seed=0, **kw):
    inner = MNISTDataModule(data_dir=str(root), val_size=4, batch_size=8, num_workers=0)
    return SemiSupervisedDataModule(inner, labels_per_class=labels_per_class, seed=seed, **kw)


def test_the_labelled_split_is_exact_class_balanced_training_only_and_seeded(tmp_path):
    root = labelled_mnist(tmp_path / "mnist")
    dm = mnist_semisup(root, labelled_batch_size=6)
    dm.setup("fit")
    train, val = dm.train_set, dm.val_set
    labels = dataset_labels(train)
    assert dm.classes == list(range(10)) and dm.num_labelled == 30
    assert torch.bincount(labels[dm.labelled_indices], minlength=10).tolist() == [3] * 10
    assert dm.labelled_indices.max() < len(train) and len(set(dm.labelled_indices.tolist())) == 30
    raw = {train.indices[i] for i in dm.labelled_indices.tolist()}  # positions in the MNIST training file
    assert not raw & set(val.indices)  # never the validation hold-out (the test split is another file)
    assert (dm.channels, dm.img_size) == (1, 28)

    again = mnist_semisup(root)
    again.setup("fit")
    assert torch.equal(again.labelled_indices, dm.labelled_indices)
    other = mnist_semisup(root, seed=1)
    other.setup("fit")
    assert not torch.equal(other.labelled_indices, dm.labelled_indices)

    unl, lab = dm.train_dataloader()
    x_u, x_l, y_l = dm.on_before_batch_transfer([next(iter(unl)), next(iter(lab))], 0)
    assert x_u.shape == (8, 1, 28, 28) and x_l.shape == (6, 1, 28, 28) and y_l.shape == (6,)
    assert set(y_l.tolist()) <= set(range(10))
    x, y = next(iter(dm.val_dataloader()))  # validation and test: the inner (x, y) batches
    assert x.shape[1:] == (1, 28, 28) and y.dtype == torch.int64


def test_errors_are_named(tmp_path):
    root = labelled_mnist(tmp_path / "mnist")
    with pytest.raises(ValueError, match="labels_per_class must be an integer >= 1"):
        mnist_semisup(root, labels_per_class=0)
    with pytest.raises(ValueError, match="labelled_batch_size"):
        mnist_semisup(root, labelled_batch_size=0)
    with pytest.raises(TypeError, match="LightningDataModule"):
        SemiSupervisedDataModule(object(), labels_per_class=1)
    with pytest.raises(ValueError, match=r"labels_per_class=9 .*fewer images in class"):
        mnist_semisup(root, labels_per_class=9).setup("fit")
    no_labels = SemiSupervisedDataModule(EightGaussiansDataModule(n_train=100, n_val=10, n_test=10), 2)
    with pytest.raises(ValueError, match="has no labels.*labels: true"):
        no_labels.setup("fit")

    for bad, match in ((dict(n_classes=1), "n_classes"), (dict(class_weight=-1.0), "class_weight"),
                       (dict(mi_weight=float("nan")), "mi_weight"), (dict(classify_samples=0), "classify_samples"),
                       (dict(dim=0), "dim")):
        with pytest.raises(ValueError, match=match):
            tiny(**bad)
    m = tiny().eval()
    with pytest.raises(ValueError, match=r"y must be a class label in \[0, 5\).*y=5"):
        m.sample(2, y=5)
    with pytest.raises(ValueError, match=r"y must be class labels in \[0, 5\)"):
        m.sample_latent(2, torch.tensor([0, -1]))
    with pytest.raises(DataShapeError, match=r"y must be an int or a \(3,\) tensor"):
        m.sample(3, y=torch.zeros(2, dtype=torch.long))
    with pytest.raises(DataShapeError, match="z0=..."):
        m.sample_latent(3, torch.zeros(3, 8))  # initial latents passed where y goes
    with pytest.raises(DataShapeError, match="integer class labels"):
        m.class_energy(torch.zeros(3, 8), torch.zeros(3))
    with pytest.raises(DataShapeError, match="images of shape"):
        m.classify(torch.zeros(2, 3, 32, 32))
    with pytest.raises(DataShapeError, match=r"vectors of shape \(B, dim\) = \(B, 2\)"):
        SymbolVectorLEBM(**TOY).classify(torch.zeros(4, 3))
    with pytest.raises(ValueError, match="every_n_epochs"):
        ClassificationAccuracy(every_n_epochs=-1)
    with pytest.raises(TypeError, match="classify"):
        tiny_trainer(callbacks=[ClassificationAccuracy()], max_steps=1).fit(
            LatentEBMPrior(img_size=28, channels=1, nz=8, ngf=4, ndf=16, prior_steps=1, posterior_steps=1),
            tensor_loader(uniform_images(4), 4))
    with pytest.raises(DataShapeError, match="--model.n_classes 8"):
        tiny_trainer(max_steps=1).fit(SymbolVectorLEBM(**{**TOY, "n_classes": 4}), toy_data())


# ------------------------------------------------------------------------------------------------ command, files
@pytest.mark.parametrize("flag", ["--data.data_dir", "--data.datamodule.data_dir"])  # the first, as every recipe
def test_recipe_fits_through_the_command_then_tests(tmp_path, capsys, flag):
    from lebm_zoo.cli import main

    root = labelled_mnist(tmp_path / "mnist")
    data = [flag, str(root), "--data.datamodule.download", "false",
            "--data.datamodule.val_size", "4", "--data.datamodule.batch_size", "8",
            "--data.datamodule.num_workers", "0", "--data.labels_per_class", "2", "--data.labelled_batch_size", "8"]
    common = ["--recipe", "mnist_semisup", *data, "--trainer.enable_progress_bar", "false",
              "--trainer.default_root_dir", str(tmp_path / "runs")]
    code = main(["fit", *common, "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1"])
    assert code == 0, capsys.readouterr().err
    (last,) = (tmp_path / "runs").rglob("last.ckpt")
    assert torch.load(last, weights_only=True)["global_step"] == 2
    code = main(["test", *common, "--trainer.limit_test_batches", "1", "--ckpt_path", "last"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "test/accuracy" in out.out
    model = lebm_zoo.load_pretrained(last)
    assert isinstance(model, SymbolVectorLEBM) and model.hparams.n_classes == 10 and model.hparams.nz == 64
    assert model.classify(uniform_images(2)).shape == (2, 10)


def test_checkpoint_and_published_folder_round_trips(toy_model, tmp_path):
    m, _, trainer, _ = toy_model
    ckpt = tmp_path / "toy.ckpt"
    trainer.save_checkpoint(ckpt)
    loaded = lebm_zoo.load_pretrained(ckpt)
    assert isinstance(loaded, SymbolVectorLEBM) and not loaded.training and loaded.hparams.dim == 2
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), loaded.state_dict().values()))
    x = torch.randn(16, 2)
    torch.manual_seed(5)
    a = m.classify(x)
    torch.manual_seed(5)
    assert torch.equal(a, loaded.classify(x))

    torch.manual_seed(3)
    small = tiny().eval()
    back = lebm_zoo.load_pretrained(small.save_pretrained(tmp_path / "pub", data="tiny"))
    assert type(back) is SymbolVectorLEBM and dict(back.hparams) == dict(small.hparams)
    assert fingerprint(back) == fingerprint(small)
