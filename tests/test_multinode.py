"""Two Lightning "nodes" on this machine: ``lebm-zoo fit --recipe mnist_prior --trainer.num_nodes 2`` started by hand.

Each node is one process with one CPU device, started as a cluster's launcher would start it, in two ways:

* ``manual``: ``MASTER_ADDR``, ``MASTER_PORT``, ``NODE_RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` set, as for a cluster
  without a scheduler. Lightning's ``LightningEnvironment`` reads them (``LOCAL_RANK`` present: the processes were
  created outside, so Lightning starts none itself; global rank = ``NODE_RANK`` x devices + ``LOCAL_RANK``, world
  size = num_nodes x devices; ``WORLD_SIZE`` itself is not read).
* ``srun``: the variables ``srun`` sets for each task (``SLURM_NTASKS``, ``SLURM_PROCID``, ``SLURM_NODEID``,
  ``SLURM_NODELIST``, ...): Lightning detects ``SLURMEnvironment`` and takes the ranks and the main address from them.

The two processes meet over gloo on 127.0.0.1. ``docs/clusters.md`` describes both set-ups.

Checked: both processes exit 0 in time; they were global ranks 0 and 1 of a world of 2 in the expected cluster
environment; they trained on different batches (the DistributedSampler split the data across the nodes) and still
end with equal weights, which differ from the initial ones (the gradients were all-reduced across the nodes); rank 0
alone wrote the run's checkpoint.
"""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

TESTS = Path(__file__).resolve().parent
TIMEOUT = 240  # seconds for both processes; a run took about 20 s on 2 busy cores

# tiny model and data: 20 training images (24 minus 4 for validation), 10 per rank, batches of 4; no validation
SMALL = ["--model.nz", "8", "--model.ngf", "4", "--model.ndf", "16", "--model.prior_steps", "2",
         "--model.posterior_steps", "2", "--data.batch_size", "4", "--data.val_size", "4", "--data.num_workers", "0",
         "--data.download", "false", "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0",
         "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_env(node_rank: int, port: int, launcher: str) -> dict[str, str]:
    """The environment of one node's process: the variables ``launcher`` (``manual`` or ``srun``) sets, and nothing
    inherited that would make Lightning pick another cluster environment (SLURM, torchelastic, ...) or seed the ranks
    differently (a ``PL_GLOBAL_SEED`` left by in-process tests)."""
    drop = ("PL_GLOBAL_SEED", "PL_SEED_WORKERS", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE",
            "RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE",
            "LSB_JOBID")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("SLURM_")}
    env.update(MASTER_PORT=str(port), OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH", "")) if p))
    if launcher == "manual":
        env.update(MASTER_ADDR="127.0.0.1", NODE_RANK=str(node_rank), WORLD_SIZE="2", LOCAL_RANK="0")
    else:  # one task per node, as `srun` starts them for --nodes=2 --ntasks-per-node=1; the main address comes from
        # the node list, the port from MASTER_PORT (else Lightning derives it from the job id)
        env.update(SLURM_JOB_ID="4242", SLURM_JOB_NAME="lebm-zoo-test", SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="1",
                   SLURM_NNODES="2", SLURM_NODELIST="127.0.0.1", SLURM_PROCID=str(node_rank),
                   SLURM_NODEID=str(node_rank), SLURM_LOCALID="0")
    if sys.platform.startswith("linux"):
        env["GLOO_SOCKET_IFNAME"] = "lo"  # gloo on the loopback interface only
    return env


def start_nodes(cmd: list[str], cwd: Path, launcher: str) -> list[tuple[subprocess.Popen, Path]]:
    port = free_port()
    procs = []
    for node in (0, 1):
        log = cwd / f"node{node}.log"
        with open(log, "w") as f:  # a file, not a pipe: neither process can block on a full pipe
            proc = subprocess.Popen(cmd, cwd=cwd, env=node_env(node, port, launcher), stdout=f,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        procs.append((proc, log))
    return procs


def wait_all(procs, timeout: float) -> tuple[list[int | None], str]:
    """Wait for every process until ``timeout``; then kill each one's process group. Exit codes (None: killed) and
    the tail of each process's output."""
    deadline = time.monotonic() + timeout
    codes: list[int | None] = []
    for proc, _ in procs:
        try:
            codes.append(proc.wait(timeout=max(deadline - time.monotonic(), 0.1)))
        except subprocess.TimeoutExpired:
            codes.append(None)
    for proc, _ in procs:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # a stuck rank, or stray children
        except ProcessLookupError:
            pass
        proc.wait()
    logs = "\n".join(f"--- node {i} (exit {c}) ---\n{log.read_text()[-3000:]}"
                     for i, (c, (_, log)) in enumerate(zip(codes, procs)))
    return codes, logs


@pytest.mark.parametrize("launcher, environment", [("manual", "LightningEnvironment"), ("srun", "SLURMEnvironment")])
def test_mnist_prior_trains_as_two_nodes_with_equal_weights(tmp_path, fake_mnist_dir, launcher, environment):
    out = tmp_path / "ranks"
    cmd = [sys.executable, "-m", "lebm_zoo.cli", "fit", "--recipe", "mnist_prior",
           "--data.data_dir", str(fake_mnist_dir), *SMALL,
           "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.num_nodes", "2",
           "--trainer.strategy", "ddp", "--trainer.default_root_dir", str(tmp_path / "run"),
           # the recipe's callbacks replaced: the FID callback would load the Inception weights; the sample and
           # reconstruction callbacks run after validation, which is off; the checkpoint stays
           "--trainer.callbacks=pytorch_lightning.callbacks.ModelCheckpoint", "--trainer.callbacks.save_last=true",
           "--trainer.callbacks+=_multinode_callback.RecordRank", f"--trainer.callbacks.dirpath={out}"]
    procs = start_nodes(cmd, tmp_path, launcher)
    codes, logs = wait_all(procs, TIMEOUT)
    assert codes == [0, 0], f"two-node run failed or hung ({TIMEOUT}s limit)\n{logs}"

    files = sorted(p.name for p in out.glob("rank*.pt"))
    assert files == ["rank0.pt", "rank1.pt"], (files, logs)
    r0, r1 = (torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for rank, rec in enumerate((r0, r1)):
        assert rec["global_rank"] == rank and rec["node_rank"] == rank, rec
        assert rec["world_size"] == 2 and rec["local_rank"] == 0 and rec["global_step"] == 2, rec
        assert (rec["strategy"], rec["environment"], rec["backend"]) == ("DDPStrategy", environment, "gloo"), rec
    # the nodes drew different batches: the DistributedSampler split the data over the world of 2
    assert len(r0["batches"]) == len(r1["batches"]) == 2
    assert all(a != b for a, b in zip(r0["batches"], r1["batches"])), (r0["batches"], r1["batches"])
    # the ranks' chains draw different noise (seed_everything seeds both alike; EBMModule decorrelates them)
    assert not torch.equal(r0["noise"], r1["noise"]), "both ranks drew the same Langevin noise"

    # ... and still end with the same weights: the gradients were all-reduced across the nodes
    assert r0["final"].keys() == r1["final"].keys() == r0["initial"].keys()
    for k, v in r0["final"].items():
        assert torch.equal(v, r1["final"][k]), f"{k} differs between the ranks"
        assert torch.equal(r0["initial"][k], r1["initial"][k]), f"{k} started differently on the ranks"
        assert torch.isfinite(v).all(), k
    changed = {k for k, v in r0["final"].items() if not torch.equal(v, r0["initial"][k])}
    assert {"generator.net.0.weight", "energy_net.net.0.weight"} <= changed, sorted(changed)

    # rank 0 alone wrote the run's checkpoint, at step 2
    (last,) = (tmp_path / "run").rglob("last.ckpt")
    assert torch.load(last, weights_only=True)["global_step"] == 2
