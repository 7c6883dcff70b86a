"""benchmarks/anomaly_ink.py: the ink baseline of the MNIST anomaly split and the models' rank correlation with it."""
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _data import TINY_MODELS, fit_steps, uniform_images, write_mnist
from sklearn.metrics import auc, precision_recall_curve, roc_auc_score

from datamodules import MNISTAnomalyDataModule

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("anomaly_ink", ROOT / "benchmarks" / "anomaly_ink.py")
anomaly_ink = importlib.util.module_from_spec(spec)
spec.loader.exec_module(anomaly_ink)


def test_metrics_match_scikit_learn():
    g = torch.Generator().manual_seed(0)
    y = (torch.rand(200, generator=g) < 0.3).long()
    s = torch.randn(200, generator=g) + y  # anomalies score higher on average
    auroc, auprc = anomaly_ink.auroc_auprc(s, y)
    precision, recall, _ = precision_recall_curve(y.numpy(), s.numpy())
    assert auroc == pytest.approx(roc_auc_score(y.numpy(), s.numpy())) and auroc > 0.6
    assert auprc == pytest.approx(auc(recall, precision))
    a = torch.randn(50, generator=g)
    assert anomaly_ink.spearman(a, a.exp()) == pytest.approx(1.0)  # a monotone map keeps the ranks
    assert anomaly_ink.spearman(a, -a) == pytest.approx(-1.0)
    rho = anomaly_ink.spearman(a, torch.randn(50, generator=g))
    assert -0.5 < rho < 0.5


def test_stratified_subsample_keeps_the_class_shares():
    labels = torch.cat([torch.zeros(700), torch.ones(300)]).long()
    idx = anomaly_ink.stratified(labels, 100, seed=3)
    assert len(idx) == 100 and len(set(idx.tolist())) == 100
    assert int(labels[idx].sum()) == 30
    assert torch.equal(idx, anomaly_ink.stratified(labels, 100, seed=3))  # seeded


@pytest.fixture
def mnist_80(tmp_path):
    write_mnist(tmp_path, labels=(np.arange(60) % 10, np.arange(20) % 10))
    return tmp_path


def test_test_split_is_the_datamodules(mnist_80):
    x, y = anomaly_ink.test_split(str(mnist_80), 1)
    dm = MNISTAnomalyDataModule(str(mnist_80), heldout_digit=1)
    dm.setup("test")
    xs, ys = zip(*(dm.test_set[i] for i in range(len(dm.test_set))))
    assert torch.equal(x, torch.stack(xs)) and torch.equal(y, torch.stack(ys))
    assert int(y.sum()) == 8  # every image of digit 1 is a test anomaly


def test_main_scores_the_runs_of_the_digit(mnist_80, tmp_path, monkeypatch, capsys):
    model = TINY_MODELS["LatentEBMPrior"]()
    trainer = fit_steps(model, uniform_images(8), 1, tmp_path / "fit")
    ckpt = tmp_path / "runs" / "prior_d1_s1" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    trainer.save_checkpoint(ckpt)
    out = tmp_path / "ink.json"
    monkeypatch.setattr(sys, "argv", ["anomaly_ink.py", "--data-dir", str(mnist_80), "--runs", str(tmp_path / "runs"),
                                      "--digits", "1", "4", "--n", "20", "--fp32", "--json", str(out)])
    assert anomaly_ink.main() == 0
    res = json.loads(out.read_text())
    d1, d4 = res["digits"]
    assert d1["digit"] == 1 and d4["digit"] == 4 and d4["models"] == []  # the run holds digit 1 out, not 4
    (run,) = d1["models"]
    assert run["run"] == "prior_d1_s1" and run["images"] == 20 and -1 <= run["spearman_with_ink"] <= 1
    x, y = anomaly_ink.test_split(str(mnist_80), 1)
    assert d1["ink_auroc"] == pytest.approx(roc_auc_score(y.numpy(), x.add(1).div(2).flatten(1).mean(1).numpy()))
    assert "| 1 |" in capsys.readouterr().out
    monkeypatch.setattr(sys, "argv", ["anomaly_ink.py", "--data-dir", str(mnist_80), "--runs", str(tmp_path / "no")])
    with pytest.raises(SystemExit, match="no such folder"):
        anomaly_ink.main()
