"""The divergence guard under DDP: NaN on one rank of two CPU processes stops both ranks after the same batch, with
the bad update skipped everywhere, instead of one rank waiting forever in the next all-reduce.

Each run is a subprocess in its own session with a timeout, so a hang fails the test (and its processes are killed)
instead of hanging CI.
"""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

TIMEOUT = 120

# Two ranks, batches of 2, no shuffling: Lightning's DistributedSampler gives rank r the items r, r + 2, r + 4, ...,
# so items 5 and 7 are rank 1's second batch: step 1 is good on both ranks, rank 1 diverges at the second batch.
COMMON = """
import json, os, sys
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lebm_zoo import LatentEBMPrior

OUT = Path(os.environ["LEBM_ZOO_TEST_OUT"])


def images():
    x = torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(1)) * 2 - 1
    x[[5, 7]] = float("nan")
    return x


def small_model():
    torch.manual_seed(0)
    return LatentEBMPrior(img_size=28, channels=1, nz=8, ngf=4, ndf=16, prior_steps=2, posterior_steps=2)


class Record(pl.Callback):
    \"\"\"Each rank writes its weights and global step after every batch, and its state at the end of training.\"\"\"

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        params = {k: v.detach().clone() for k, v in pl_module.named_parameters()}
        torch.save({"global_step": trainer.global_step, "params": params},
                   OUT / f"rank{trainer.global_rank}-batch{batch_idx}.pt")

    def on_train_end(self, trainer, pl_module):
        (OUT / f"rank{trainer.global_rank}.json").write_text(json.dumps(
            {"global_step": trainer.global_step, "divergence": pl_module.divergence,
             "should_stop": bool(trainer.should_stop)}))
"""

TRAINER_SCRIPT = COMMON + """
if __name__ == "__main__":
    model = small_model()
    data = DataLoader(TensorDataset(images(), torch.zeros(16)), batch_size=2)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=4, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=OUT, callbacks=[Record()])
    trainer.fit(model, data)
    torch.save({k: v.detach().clone() for k, v in model.named_parameters()}, OUT / "main-params.pt")
    (OUT / "main.json").write_text(json.dumps({"divergence": model.divergence}))
"""

CLI_DATA = COMMON + """

class NaNOnRank1(pl.LightningDataModule):
    channels, img_size = 1, 28

    def train_dataloader(self):
        return DataLoader(TensorDataset(images(), torch.zeros(16)), batch_size=2)
"""

# `lebm-zoo fit`, recording main()'s exit code per process (under ddp, Lightning runs this script again per rank)
CLI_SCRIPT = """
import os, sys
from pathlib import Path

from lebm_zoo.cli import main

if __name__ == "__main__":
    code = main()
    out = Path(os.environ["LEBM_ZOO_TEST_OUT"])
    (out / f"exit-rank{os.environ.get('LOCAL_RANK', '0')}.txt").write_text(str(code))
    sys.exit(code)
"""


def run_guarded(cmd, tmp_path, **kwargs):
    """Run ``cmd`` in its own session; on timeout kill the whole process group (the stuck rank ignores SIGTERM)."""
    # a fresh process's environment: without the PL_GLOBAL_SEED that earlier in-process CLI tests leave set, which
    # Lightning passes to the ranks (it seeds their samplers, so the NaN items would land on other ranks)
    inherited = {k: v for k, v in os.environ.items() if k not in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS")}
    env = {**inherited, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "LEBM_ZOO_TEST_OUT": str(tmp_path)}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, **kwargs)
    try:
        out, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{' '.join(map(str, cmd))} hung for {TIMEOUT}s (a rank waiting in a collective?). "
                    f"Output:\n{out[-4000:]}")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # stray workers
        except ProcessLookupError:
            pass
    return proc.returncode, out


def check_ranks(out: Path, log: str) -> None:
    """Both ranks stopped after batch 1 at global step 1, with the weights of step 1; both name rank 1."""
    for rank in (0, 1):
        end = json.loads((out / f"rank{rank}.json").read_text())
        assert end["global_step"] == 1 and end["should_stop"], (rank, end, log[-3000:])
        assert "diverged" in end["divergence"] and "rank 1" in end["divergence"], end["divergence"]
        assert "rank 0" not in end["divergence"].split("diverged on")[1].split(":")[0]
        assert not (out / f"rank{rank}-batch2.pt").exists(), f"rank {rank} trained on after the divergence"
        good, bad = (torch.load(out / f"rank{rank}-batch{i}.pt", weights_only=True) for i in (0, 1))
        assert good["global_step"] == 1 and bad["global_step"] == 1
        for k, v in good["params"].items():
            assert torch.equal(v, bad["params"][k]), f"rank {rank}: the bad step changed {k}"
            assert torch.isfinite(v).all(), k
    first = torch.load(out / "rank0-batch0.pt", weights_only=True)["params"]
    other = torch.load(out / "rank1-batch0.pt", weights_only=True)["params"]
    assert all(torch.equal(first[k], other[k]) for k in first), "the ranks' weights differ after the good step"


def test_nan_on_one_rank_stops_both_ranks_after_the_same_batch(tmp_path):
    script = tmp_path / "fit_ddp_spawn.py"
    script.write_text(TRAINER_SCRIPT)
    code, log = run_guarded([sys.executable, str(script)], tmp_path)
    assert code == 0, log[-4000:]
    check_ranks(tmp_path, log)
    # ddp_spawn: the weights and the divergence message come back to the main process
    main = json.loads((tmp_path / "main.json").read_text())
    assert main["divergence"] and "rank 1" in main["divergence"], (main, log[-3000:])
    good = torch.load(tmp_path / "rank0-batch0.pt", weights_only=True)["params"]
    back = torch.load(tmp_path / "main-params.pt", weights_only=True)
    assert all(torch.equal(good[k], back[k]) for k in good)


@pytest.mark.parametrize("strategy", ["ddp", "ddp_spawn"])
def test_cli_fit_exits_1_on_every_rank(tmp_path, strategy):
    (tmp_path / "nan_data.py").write_text(CLI_DATA)
    (tmp_path / "fit_cli.py").write_text(CLI_SCRIPT)
    cmd = [sys.executable, str(tmp_path / "fit_cli.py"), "fit", "--model", "lebm_zoo.LatentEBMPrior",
           "--model.img_size", "28", "--model.channels", "1", "--model.nz", "8", "--model.ngf", "4",
           "--model.ndf", "16", "--model.prior_steps", "2", "--model.posterior_steps", "2",
           "--data", "nan_data.NaNOnRank1", "--trainer.accelerator", "cpu", "--trainer.devices", "2",
           "--trainer.strategy", strategy, "--trainer.max_steps", "4", "--trainer.logger", "false",
           "--trainer.enable_checkpointing", "false", "--trainer.enable_progress_bar", "false",
           "--trainer.enable_model_summary", "false", "--trainer.default_root_dir", str(tmp_path),
           "--trainer.callbacks+=nan_data.Record"]
    code, log = run_guarded(cmd, tmp_path)
    assert code == 1, log[-4000:]
    assert "lebm-zoo: error:" in log and "rank 1" in log and "Traceback" not in log, log[-4000:]
    check_ranks(tmp_path, log)
    # every process that ran main() returned 1: both ranks under ddp, the main process under ddp_spawn
    codes = {p.name: p.read_text() for p in tmp_path.glob("exit-rank*.txt")}
    assert codes == ({"exit-rank0.txt": "1", "exit-rank1.txt": "1"} if strategy == "ddp" else {"exit-rank0.txt": "1"})
