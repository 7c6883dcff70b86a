#!/usr/bin/env python3
"""Speed benchmarks (`make bench`), each measured back to back in one run on the same machine.

1. One LEBM SVHN-recipe training iteration (batch 100, 32x32x3): the plain-PyTorch reference loop
   (``../shared/bench/reference_lebm_step.py``, run as a subprocess with the same thread count) against our
   ``LatentEBMPrior.training_step`` driven by a Lightning ``Trainer`` (framework overhead included) in fp32 and in
   ``bf16-mixed`` precision, each also with channels_last memory format. Seconds per iteration and the ratio to the
   reference.
2. The 60-step prior chain (batch 100, nz 100, s = 0.4) on the same energy MLP: our ``LangevinSampler``, torchebm's
   ``LangevinDynamics`` (if installed; ``pip install torchebm``) and a plain loop like the reference's.
3. Sampling throughput (images/s of ``model.sample``: 60-step prior chain + G) and FID-evaluation throughput
   (images/s through the FID Inception network on 32x32 uint8 images, if its weights are built).
4. Peak resident memory of a process running training iterations (fp32 and bf16-mixed), each in a fresh subprocess.

Prints one table with the CPU model, thread count and torch version; writes ``benchmarks/results.json``.
Usage: python benchmarks/run.py [--iters 3] [--warmup 1] [--threads N] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lebm_zoo import LangevinSampler, LatentEBMPrior

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT.parent / "shared" / "bench" / "reference_lebm_step.py"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class _Timer(pl.Callback):
    def __init__(self, warmup: int):
        self.warmup, self.times, self._t = warmup, [], 0.0

    def on_train_batch_start(self, *args):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, *args):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if trainer.global_step > self.warmup:
            self.times.append(time.perf_counter() - self._t)


def ours(batch: int, iters: int, warmup: int, precision: str, device: str, channels_last: bool = False) -> float:
    """Seconds per SVHN-recipe iteration of LatentEBMPrior under a Lightning Trainer (optionally with the generator's
    weights in channels_last memory format)."""
    torch.manual_seed(0)
    x = torch.rand(batch * (iters + warmup), 3, 32, 32) * 2 - 1
    model = LatentEBMPrior(channels_last=channels_last)
    data = DataLoader(TensorDataset(x, torch.zeros(len(x))), batch_size=batch)
    timer = _Timer(warmup)
    trainer = pl.Trainer(accelerator=device, devices=1, max_steps=iters + warmup, logger=False, precision=precision,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[timer])
    trainer.fit(model, data)
    return sum(timer.times) / len(timer.times)


def reference(batch: int, iters: int, warmup: int, threads: int) -> float | None:
    if not REFERENCE.exists():
        print(f"reference loop not found at {REFERENCE} (it ships in ../shared/bench); skipped", file=sys.stderr)
        return None
    out = subprocess.run([sys.executable, str(REFERENCE), "--batch", str(batch), "--iters", str(iters),
                          "--warmup", str(warmup), "--threads", str(threads)], capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["sec_per_iter"]


def _best_time(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def prior_chains(device: str, repeats: int) -> dict[str, float | None]:
    """Seconds for the 60-step prior chain, batch 100, nz 100, on the reference energy MLP."""
    torch.manual_seed(0)
    model = LatentEBMPrior().to(device)
    e = model.energy_net.requires_grad_(False)
    z0 = torch.randn(100, 100, device=device)
    s = 0.4

    def plain():  # the reference's loop
        z = z0.clone().requires_grad_(True)
        for _ in range(60):
            grad = torch.autograd.grad(e(z).sum(), z)[0]
            z.data = z.data - 0.5 * s * s * (grad + z.data) + s * torch.randn_like(z)
        return z.detach()

    sampler = LangevinSampler(60, s)
    out = {"ours": _best_time(lambda: sampler(model.prior_log_prob, z0), repeats),
           "plain_loop": _best_time(plain, repeats), "torchebm": None}
    try:
        from torchebm.core import BaseModel
        from torchebm.samplers import LangevinDynamics
    except ImportError:
        print("torchebm not installed (pip install torchebm): its column is empty", file=sys.stderr)
        return out

    class Prior(BaseModel):  # U(z) = E(z) + |z|^2 / 2: the same target
        def __init__(self):
            super().__init__()
            self.e = e

        def forward(self, z):
            return self.e(z) + 0.5 * (z * z).sum(-1)

    # torchebm: x <- x - eta grad U + sqrt(2 eta) * noise_scale * eps; eta = s^2 / 2 gives our update exactly
    tebm = LangevinDynamics(Prior(), step_size=0.5 * s * s, noise_scale=1.0, device=device)
    out["torchebm"] = _best_time(lambda: tebm.sample(x=z0.clone(), n_steps=60), repeats)
    return out


def throughputs(device: str, precision: str) -> dict[str, float | None]:
    """Images/s of model.sample (prior chain + G) and of FID Inception feature extraction."""
    torch.manual_seed(0)
    model = LatentEBMPrior().to(device).eval()
    ctx = torch.autocast(device, torch.bfloat16) if precision.startswith("bf16") else torch.autocast(device,
                                                                                                      enabled=False)
    with ctx:
        t = _best_time(lambda: model.sample(100), 2)
    out = {"sample_images_per_s": 100 / t, "fid_images_per_s": None}
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance

        from lebm_zoo.callbacks.fid import default_fid_weights

        fid = FrechetInceptionDistance(feature=2048, antialias=False,
                                       feature_extractor_weights_path=str(default_fid_weights())).to(device)
    except FileNotFoundError:
        print("FID weights not built (make fid-weights): FID throughput skipped", file=sys.stderr)
        return out
    imgs = torch.randint(0, 256, (50, 3, 32, 32), dtype=torch.uint8, device=device)
    t = _best_time(lambda: fid.update(imgs, real=False), 1)
    out["fid_images_per_s"] = 50 / t
    return out


def peak_memory_mb(precision: str, device: str, batch: int) -> float:
    """Peak memory of 2 training iterations in a fresh process: max RSS on CPU, max allocated on CUDA (MiB)."""
    code = (
        "import sys, resource, torch; sys.path.insert(0, %r); from run import ours; "
        "ours(%d, 1, 1, %r, %r); "
        "print(torch.cuda.max_memory_allocated() / 2**20 if %r == 'cuda' else "
        "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
    ) % (str(ROOT / "benchmarks"), batch, precision, device, device)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return float(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results.json"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    dev = a.device
    res: dict = {"cpu": cpu_model(), "threads": a.threads, "torch": torch.__version__, "device": dev,
                 "gpu": torch.cuda.get_device_name() if dev == "cuda" else None, "batch": a.batch}
    res["reference_s_per_iter"] = reference(a.batch, a.iters, a.warmup, a.threads) if dev == "cpu" else None
    res["fp32_s_per_iter"] = ours(a.batch, a.iters, a.warmup, "32-true", dev)
    res["bf16_s_per_iter"] = ours(a.batch, a.iters, a.warmup, "bf16-mixed", dev)
    res["fp32_channels_last_s_per_iter"] = ours(a.batch, a.iters, a.warmup, "32-true", dev, channels_last=True)
    res["bf16_channels_last_s_per_iter"] = ours(a.batch, a.iters, a.warmup, "bf16-mixed", dev, channels_last=True)
    res["prior_chain_s"] = prior_chains(dev, repeats=3)
    res["throughput_fp32"] = throughputs(dev, "32-true")
    res["throughput_bf16"] = throughputs(dev, "bf16-mixed")
    res["peak_memory_mib"] = {p: peak_memory_mb(p, dev, a.batch) for p in ("32-true", "bf16-mixed")}

    ref = res["reference_s_per_iter"]
    print(f"lebm-zoo benchmarks on {res['cpu']}" + (f" + {res['gpu']}" if res["gpu"] else "")
          + f", {a.threads} threads, torch {torch.__version__}")
    print(f"\n1. LEBM SVHN-recipe training iteration, batch {a.batch}")
    print(f"   {'':<30}{'s/iter':>9}{'x reference':>13}")
    rows = [("reference loop (plain PyTorch)", ref), ("lebm-zoo fp32 (Lightning)", res["fp32_s_per_iter"]),
            ("lebm-zoo bf16-mixed (Lightning)", res["bf16_s_per_iter"]),
            ("  fp32 + channels_last", res["fp32_channels_last_s_per_iter"]),
            ("  bf16-mixed + channels_last", res["bf16_channels_last_s_per_iter"])]
    for name, v in rows:
        if v is not None:
            ratio = f"{v / ref:>13.2f}" if ref else f"{'':>13}"
            print(f"   {name:<30}{v:>9.3f}{ratio}")
    pc = res["prior_chain_s"]
    print("\n2. 60-step prior chain, batch 100, nz 100 (best of 3)")
    for name in ("ours", "torchebm", "plain_loop"):
        v = pc[name]
        print(f"   {name:<30}" + (f"{v * 1000:>9.1f} ms{v / pc['ours']:>10.2f} x ours" if v else "   n/a"))
    print("\n3. Throughput (images/s)")
    for p in ("fp32", "bf16"):
        t = res[f"throughput_{p}"]
        fid = f"{t['fid_images_per_s']:.1f}" if t["fid_images_per_s"] else "n/a"
        print(f"   {p}: sampling {t['sample_images_per_s']:.1f}, FID Inception features {fid}")
    print("\n4. Peak memory of training iterations (MiB, " + ("max allocated" if dev == "cuda" else "max RSS") + ")")
    for p, v in res["peak_memory_mib"].items():
        print(f"   {p:<12}{v:>9.0f}")
    Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    print(f"\nwritten {a.out}")


if __name__ == "__main__":
    main()
