"""benchmarks/plot_curves.py: the curves picture and the per-epoch table of logged magnitudes."""
import subprocess
import sys
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

ROOT = Path(__file__).resolve().parents[1]


def test_epoch_table_gives_each_epochs_smallest_and_largest_magnitude(tmp_path):
    run = tmp_path / "run"
    w = SummaryWriter(str(run))
    for step, (epoch, cd) in enumerate([(0, -1.0), (0, 3.0), (1, -50.0), (1, 20.0), (2, 7.0)]):
        w.add_scalar("epoch", epoch, step)
        w.add_scalar("train/cd", cd, step)
    w.close()
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "plot_curves.py"), str(tmp_path / "c.png"),
                          f"a={run}", "--keys", "train/cd", "--epoch-table", "train/cd"],
                         capture_output=True, text=True, check=True).stdout
    assert (tmp_path / "c.png").stat().st_size > 0
    assert "| a | train/cd | 0 | 1 | 3 |" in out and "| a | train/cd | 1 | 20 | 50 |" in out
    assert "| a | train/cd | 2 | 7 | 7 |" in out
