"""benchmarks/anomaly_table.py: runs' test AUPRC collected per model and digit, the split's baselines, the chart."""
import importlib.util
from pathlib import Path

import pytest
import torch
from torch.utils.tensorboard import SummaryWriter

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("anomaly_table", ROOT / "benchmarks" / "anomaly_table.py")
anomaly_table = importlib.util.module_from_spec(spec)
spec.loader.exec_module(anomaly_table)


def write_run(root: Path, name: str, auprc: float, auroc: float = 0.5) -> None:
    with SummaryWriter(str(root / name / "lightning_logs" / "version_0")) as w:
        w.add_scalar("test/auprc", auprc, 0)
        w.add_scalar("test/auroc", auroc, 0)


def write_fit(root: Path, name: str, budget: str, steps: int) -> None:
    version = root / name / "lightning_logs" / "version_0"
    (version / "checkpoints").mkdir(parents=True)
    (version / "config.yaml").write_text(f"trainer:\n  max_time: {budget}\n")
    torch.save({"global_step": steps, "state_dict": {}}, version / "checkpoints" / "last.ckpt")


def test_collect_table_and_chart(tmp_path):
    runs = tmp_path / "runs"
    for seed, v in zip((1, 2, 3), (0.30, 0.32, 0.34)):
        write_run(runs, f"prior_d1_s{seed}_test", v)
    write_run(runs, "hierarchical_d4_s1_test", 0.9)
    write_run(runs, "prior_d1_s1", 0.99)  # a training run, not a test run: ignored
    results = anomaly_table.collect(runs)
    assert results == {"prior": {1: pytest.approx([0.30, 0.32, 0.34])}, "hierarchical": {4: pytest.approx([0.9])}}
    text = anomaly_table.table(results)
    assert "| **ours, LEBM (`mnist_anomaly_prior`)** | 0.320 +- 0.020 (3 runs) |" in text
    assert "0.900 (1 run)" in text and "0.336 +- 0.008" in text and "0.470 +- 0.009" in text
    auroc = anomaly_table.collect(runs, "test/auroc")
    assert "| ours, LEBM: AUROC (mean of the seeds) | 0.500 |  |" in anomaly_table.table(results, auroc)
    out = tmp_path / "chart.png"
    anomaly_table.chart(results, out)
    assert out.stat().st_size > 5000


def test_split_baselines_are_the_protocols():
    # digit 1: 62,123 normals -> 12,425 test normals with all 7,877 ones
    assert anomaly_table.split_counts(1) == (12_425, 7_877)
    random, worst = anomaly_table.baseline_auprc(1)
    assert random == pytest.approx(7_877 / 20_302, abs=5e-3)  # random scores: precision about the anomaly share
    # every anomaly last: the curve runs from (recall 0, precision 0) to (1, share); the trapezoid is share / 2
    assert worst == pytest.approx(7_877 / 20_302 / 2, abs=1e-3) and worst < random


def test_length_table_pairs_runs_of_the_same_model_digit_and_seed(tmp_path):
    short, long = tmp_path / "short", tmp_path / "long"
    write_fit(short, "prior_d4_s1", "00:00:04:00", 110)
    write_run(short, "prior_d4_s1_test", 0.35, 0.52)
    write_run(short, "prior_d4_s2_test", 0.30)  # no long run of seed 2: not in the table
    write_fit(long, "prior_d4_s1", "00:00:20:00", 560)
    write_run(long, "prior_d4_s1_test", 0.55, 0.71)
    text = anomaly_table.length_table(short, long).splitlines()
    assert text[2:] == ["| LEBM | 4 | 1 | 00:00:04:00 | 110 | 0.350 | 0.520 |",
                        "| LEBM | 4 | 1 | 00:00:20:00 | 560 | 0.550 | 0.710 |"]
    with pytest.raises(SystemExit, match="no <model>_d<digit>_s<seed>_test runs"):
        anomaly_table.length_table(short, tmp_path / "short" / "prior_d4_s1")
