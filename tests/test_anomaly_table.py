"""benchmarks/anomaly_table.py: runs' test AUPRC collected per model and digit, the split's baselines, the chart."""
import importlib.util
from pathlib import Path

import pytest
from torch.utils.tensorboard import SummaryWriter

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("anomaly_table", ROOT / "benchmarks" / "anomaly_table.py")
anomaly_table = importlib.util.module_from_spec(spec)
spec.loader.exec_module(anomaly_table)


def write_run(root: Path, name: str, auprc: float) -> None:
    with SummaryWriter(str(root / name / "lightning_logs" / "version_0")) as w:
        w.add_scalar("test/auprc", auprc, 0)
        w.add_scalar("test/auroc", 0.5, 0)


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
