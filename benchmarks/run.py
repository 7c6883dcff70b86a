#!/usr/bin/env python3
"""Speed benchmarks (`make bench`), each measured back to back in one run on the same machine.

1. One LEBM SVHN-recipe training iteration (batch 100, 32x32x3): the plain-PyTorch reference loop
   (``../shared/bench/reference_lebm_step.py``) against our ``LatentEBMPrior.training_step`` driven by a Lightning
   ``Trainer`` (framework overhead included) in fp32 and in ``bf16-mixed`` precision, with and without channels_last
   memory format, and with the Langevin chains compiled (``LatentEBMPrior(compile_chains=MODE)``). On CUDA the
   reference script (CPU-only) is replaced by :func:`plain_reference`, a plain loop of the same structure. Every
   row runs in a fresh process with the same thread count, with glibc's default allocator or
   with the tuned one that ``lebm-zoo`` sets at start-up (``lebm_zoo.utils.tune_cpu_allocator``); the reference loop
   is timed both ways too. Seconds per iteration, the ratio to the reference and the process's peak memory.
2. The 60-step prior chain (batch 100, nz 100, s = 0.4) on the same energy MLP: our ``LangevinSampler``, torchebm's
   ``LangevinDynamics`` (if installed; ``pip install torchebm``) and a plain loop like the reference's.
3. Sampling throughput (images/s of ``model.sample``: 60-step prior chain + G) and FID-evaluation throughput
   (images/s through the FID Inception network on 32x32 uint8 images, if its weights are built).

Prints one table with the CPU model, thread count and torch version; writes ``benchmarks/results.json``.
Usage: python benchmarks/run.py [--iters 5] [--warmup 1] [--rounds 3] [--threads N] [--device cpu|cuda]
                                [--batch 100] [--compile-mode MODE] [--out results.json]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lebm_zoo import LangevinSampler, LatentEBMPrior
from lebm_zoo.callbacks import SyncEvery
from lebm_zoo.hardware import cpu_name

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT.parent / "shared" / "bench" / "reference_lebm_step.py"


class _Timer(pl.Callback):
    """Seconds per training iteration after ``warmup`` iterations. On a CPU: each batch's own time. On a GPU: the
    span from the first timed batch's start to the last one's end, synchronised only there and divided by the
    iterations (a synchronisation per batch would hide what steps with no synchronisation gain: the host queueing
    the next step while the GPU runs this one); ``times`` then holds that one mean."""

    def __init__(self, warmup: int, iters: int, span: bool):
        self.warmup, self.iters, self.times, self._t, self.span = warmup, iters, [], 0.0, span

    def on_train_batch_start(self, trainer, *args):
        if self.span and trainer.global_step != self.warmup:
            return
        if self.span:
            torch.cuda.synchronize()
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, *args):
        if self.span:
            if trainer.global_step == self.warmup + self.iters:
                torch.cuda.synchronize()
                self.times.append((time.perf_counter() - self._t) / self.iters)
        elif trainer.global_step > self.warmup:
            self.times.append(time.perf_counter() - self._t)


def ours(batch: int, iters: int, warmup: int, precision: str, device: str, channels_last: bool = False,
         compile_chains: str | None = None, sync_every: int = 1) -> float:
    """Seconds per SVHN-recipe iteration of LatentEBMPrior under a Lightning Trainer (optionally with the generator's
    weights in channels_last memory format, and with the Langevin chains compiled in ``compile_chains`` mode, one
    step per compiled region, or ``"MODE:chain"``, one whole chain per region, or ``"capture"``, the step's chains,
    losses and backward as one CUDA graph (``capture_step``; at least 5 warm-up iterations: 3 eager, the capture, one
    replay); the warm-up iterations pay the compilation, at least 3 of them in ``"reduce-overhead"`` mode, whose
    CUDA graphs run a compiled region eagerly at its first call, record it at its second and replay it from its
    third, and a whole-chain region is called once per chain; ``sync_every`` > 1: the divergence guard reads the
    losses every that many batches, ``SyncEvery``)."""
    torch.manual_seed(0)
    capture = compile_chains == "capture"
    if capture:
        compile_chains, warmup = None, max(warmup, 5)
    mode, _, scope = (compile_chains or "").partition(":")
    if mode == "reduce-overhead":
        warmup = max(warmup, 3)
    x = torch.rand(batch * (iters + warmup), 3, 32, 32) * 2 - 1  # one epoch: no epoch's end inside the timed span
    model = LatentEBMPrior(channels_last=channels_last, compile_chains=mode or None, compile_scope=scope or "step",
                           capture_step=capture)
    data = DataLoader(TensorDataset(x, torch.zeros(len(x))), batch_size=batch)
    timer = _Timer(warmup, iters, span=device != "cpu")
    # benchmark: cudnn.benchmark, as the svhn_prior recipe sets it (no effect on a CPU)
    trainer = pl.Trainer(accelerator=device, devices=1, max_steps=iters + warmup, logger=False, precision=precision,
                         benchmark=True, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False,
                         callbacks=[timer] + ([SyncEvery(sync_every)] if sync_every > 1 else []))
    trainer.fit(model, data)
    return sum(timer.times) / len(timer.times)


def _peak_memory_mib(device: str) -> float:
    """Peak memory of this process so far: max RSS on CPU, max allocated on CUDA (MiB)."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


_CHILD = """
import json, sys, torch
from lebm_zoo.utils import tune_cpu_allocator
a = json.loads(sys.argv[1])
torch.set_num_threads(a["threads"])
if a["tuned"]:
    tune_cpu_allocator()
if a["what"] == "plain":
    sys.path.insert(0, a["bench_dir"])
    from run import _peak_memory_mib, plain_reference
    s = plain_reference(a["batch"], a["iters"], a["warmup"], a["device"])
    print(json.dumps({"sec_per_iter": s, "peak_mib": _peak_memory_mib(a["device"])}))
elif a["what"] == "reference":
    import runpy
    sys.argv = [a["script"], "--batch", str(a["batch"]), "--iters", str(a["iters"]), "--warmup", str(a["warmup"]),
                "--threads", str(a["threads"])]
    runpy.run_path(a["script"], run_name="__main__")  # prints its JSON line
    import resource
    print(json.dumps({"peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
else:
    sys.path.insert(0, a["bench_dir"])
    from run import _peak_memory_mib, ours
    s = ours(a["batch"], a["iters"], a["warmup"], a["precision"], a["device"], a["channels_last"], a["compile"],
             a["sync_every"])
    print(json.dumps({"sec_per_iter": s, "peak_mib": _peak_memory_mib(a["device"])}))
"""


def plain_reference(batch: int, iters: int, warmup: int, device: str, around=None) -> float:
    """Seconds per iteration of a plain-PyTorch loop with the reference's per-iteration structure, on any device
    (``around``: a context-manager factory each timed iteration runs in, e.g. an op counter).

    The same structure as ``../shared/bench/reference_lebm_step.py`` (which runs on the CPU only), written from the
    reference's published facts: G ConvT 100 -> 512 (4x4) -> 256 -> 128 -> 3 (32x32, LeakyReLU 0.2, tanh), E MLP
    100 -> 200 -> 200 -> 1 (GELU); posterior Langevin 20 steps (s 0.1, sigma 0.3), prior Langevin 60 steps (s 0.4),
    then Adam updates of G (1e-4) and E (2e-5), betas (0.5, 0.999). Random images: the cost does not depend on them.
    """
    from torch import nn

    torch.manual_seed(0)
    act = nn.LeakyReLU(0.2)
    g = nn.Sequential(nn.ConvTranspose2d(100, 512, 4, 1, 0), act, nn.ConvTranspose2d(512, 256, 4, 2, 1), act,
                      nn.ConvTranspose2d(256, 128, 4, 2, 1), act, nn.ConvTranspose2d(128, 3, 4, 2, 1), nn.Tanh())
    e = nn.Sequential(nn.Linear(100, 200), nn.GELU(), nn.Linear(200, 200), nn.GELU(), nn.Linear(200, 1))
    g_convs, e = g.to(device), e.to(device)

    def g(z):  # the generator takes the latent as a 1x1 image, the energy as a vector
        return g_convs(z[:, :, None, None])

    torch.backends.cudnn.benchmark = True  # the authors' setting (no effect on a CPU)
    opt_g = torch.optim.Adam(g_convs.parameters(), 1e-4, betas=(0.5, 0.999))
    opt_e = torch.optim.Adam(e.parameters(), 2e-5, betas=(0.5, 0.999))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    span = device != "cpu"  # on a GPU, timed as _Timer does: one span, synchronised at its ends
    times = []
    for it in range(iters + warmup):
        x = torch.rand(batch, 3, 32, 32, device=device) * 2 - 1
        if not span or it == warmup:
            sync()
            t = time.perf_counter()
        ctx = around() if around is not None and it >= warmup else contextlib.nullcontext()
        ctx.__enter__()
        z = torch.randn(batch, 100, device=device, requires_grad=True)  # posterior chain
        for _ in range(20):
            nll = ((x - g(z)) ** 2).sum() / (2 * 0.3 ** 2)
            grad = torch.autograd.grad(nll, z)[0] + torch.autograd.grad(e(z).sum(), z)[0]
            z = (z - 0.5 * 0.01 * (grad + z) + 0.1 * torch.randn_like(z)).detach().requires_grad_(True)
        zp = torch.randn(batch, 100, device=device, requires_grad=True)  # prior chain
        for _ in range(60):
            grad = torch.autograd.grad(e(zp).sum(), zp)[0]
            zp = (zp - 0.5 * 0.16 * (grad + zp) + 0.4 * torch.randn_like(zp)).detach().requires_grad_(True)
        z, zp = z.detach(), zp.detach()
        opt_g.zero_grad()
        (((x - g(z)) ** 2).sum() / (2 * 0.3 ** 2) / batch).backward()
        opt_g.step()
        opt_e.zero_grad()
        (e(z).mean() - e(zp).mean()).backward()
        opt_e.step()
        ctx.__exit__(None, None, None)
        if span:
            if it == iters + warmup - 1:
                sync()
                return (time.perf_counter() - t) / iters
        elif it >= warmup:
            times.append(time.perf_counter() - t)
    return sum(times) / len(times)


def training_row(what: str, batch: int, iters: int, warmup: int, threads: int, device: str, tuned: bool,
                 precision: str = "32-true", channels_last: bool = False, compile_chains: str | None = None,
                 sync_every: int = 1) -> dict | None:
    """Seconds per iteration and peak memory (MiB) of ``what`` ("reference": the CPU reference script, "plain": its
    device-aware twin :func:`plain_reference`, or "ours") in a fresh process."""
    if what == "reference" and not REFERENCE.exists():
        print(f"reference loop not found at {REFERENCE} (it ships in ../shared/bench); skipped", file=sys.stderr)
        return None
    args = dict(what=what, batch=batch, iters=iters, warmup=warmup, threads=threads, device=device, tuned=tuned,
                precision=precision, channels_last=channels_last, compile=compile_chains, sync_every=sync_every,
                script=str(REFERENCE),
                bench_dir=str(ROOT / "benchmarks"))
    out = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(args)], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"benchmark row {what} {precision} failed:\n{out.stderr[-3000:]}")
    lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    merged = {k: v for d in lines for k, v in d.items()}
    return {"s_per_iter": merged["sec_per_iter"], "peak_mib": merged["peak_mib"]}


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


def _row_summary(rounds: list) -> dict | None:
    """One training-iteration row over its rounds: the median s/iter, the largest peak memory, each round's s/iter
    (None for a row that did not run, e.g. the reference loop where its script is absent)."""
    if rounds[0] is None:
        return None
    return {"s_per_iter": statistics.median(r["s_per_iter"] for r in rounds),
            "peak_mib": max(r["peak_mib"] for r in rounds), "rounds_s_per_iter": [r["s_per_iter"] for r in rounds]}


def prior_chains(device: str, repeats: int, batch: int = 100) -> dict[str, float | None]:
    """Seconds for the 60-step prior chain, batch ``batch`` (100), nz 100, on the reference energy MLP."""
    torch.manual_seed(0)
    model = LatentEBMPrior().to(device)
    e = model.energy_net.requires_grad_(False)
    z0 = torch.randn(batch, 100, device=device)
    s = 0.4

    def plain():  # the reference's loop
        z = z0.clone().requires_grad_(True)
        for _ in range(60):
            grad = torch.autograd.grad(e(z).sum(), z)[0]
            z.data = z.data - 0.5 * s * s * (grad + z.data) + s * torch.randn_like(z)
        return z.detach()

    sampler = LangevinSampler(60, s)
    # as training runs it: through the model (no input checks at each step) on its prior target
    out = {"ours": _best_time(lambda: model.langevin(model.prior_target(), z0, sampler), repeats),
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


def throughputs(device: str, precision: str, batch: int = 100) -> dict[str, float | None]:
    """Images/s of model.sample (prior chain + G, ``batch`` images) and of FID Inception feature extraction (at most
    50 images a batch)."""
    torch.manual_seed(0)
    model = LatentEBMPrior().to(device).eval()
    ctx = torch.autocast(device, torch.bfloat16) if precision.startswith("bf16") else torch.autocast(device,
                                                                                                      enabled=False)
    with ctx:
        t = _best_time(lambda: model.sample(batch), 2)
    out = {"sample_images_per_s": batch / t, "fid_images_per_s": None}
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance

        from lebm_zoo.callbacks.fid import default_fid_weights

        fid = FrechetInceptionDistance(feature=2048, antialias=False,
                                       feature_extractor_weights_path=str(default_fid_weights())).to(device)
    except FileNotFoundError:
        print("FID weights not built (make fid-weights): FID throughput skipped", file=sys.stderr)
        return out
    n = min(50, batch)
    imgs = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, device=device)
    t = _best_time(lambda: fid.update(imgs, real=False), 1)
    out["fid_images_per_s"] = n / t
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3, help="times each training-iteration row is run (median kept)")
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--compile-mode", default=None,
                    help="torch.compile mode of the compiled-chain rows (default: reduce-overhead on CUDA, which uses "
                         "CUDA graphs; default on CPU)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results.json"))
    ap.add_argument("--rows", default=None,
                    help="comma-separated keys of the training-iteration rows to run, in that order (default: all for "
                         "the device; on a CPU the GPU rows may be named too)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    dev = a.device
    res: dict = {"cpu": cpu_name(), "threads": a.threads, "torch": torch.__version__, "device": dev,
                 "gpu": torch.cuda.get_device_name() if dev == "cuda" else None, "batch": a.batch}
    mode = a.compile_mode or ("reduce-overhead" if dev == "cuda" else "default")
    res["compile_mode"] = mode
    # (key, label, what, tuned allocator, precision, channels_last, compile mode of the chains[, sync_every])
    cpu_rows = [
        ("reference", "reference loop (plain PyTorch, fp32)", "reference", False, "32-true", False, None),
        ("reference_tuned", "  same, tuned allocator", "reference", True, "32-true", False, None),
        ("fp32", "lebm-zoo fp32 (Lightning)", "ours", False, "32-true", False, None),
        ("fp32_tuned", "  fp32, tuned allocator", "ours", True, "32-true", False, None),
        ("fp32_channels_last_tuned", "  fp32 + channels_last, tuned", "ours", True, "32-true", True, None),
        ("bf16_tuned", "  bf16-mixed, tuned", "ours", True, "bf16-mixed", False, None),
        ("bf16_channels_last_tuned", "  bf16-mixed + channels_last, tuned", "ours", True, "bf16-mixed", True, None),
        ("fp32_compiled_tuned", f"  fp32, chains compiled ({mode}), tuned", "ours", True, "32-true", False, mode),
    ]
    # the reference script and the C allocator are CPU matters: on a GPU its device-aware twin stands in
    gpu_rows = [("plain", "reference-structure loop (plain PyTorch, fp32)", "plain", False, "32-true", False, None),
                ("fp32", "lebm-zoo fp32 (Lightning)", "ours", False, "32-true", False, None),
                ("bf16", "lebm-zoo bf16-mixed", "ours", False, "bf16-mixed", False, None),
                ("bf16_channels_last", "lebm-zoo bf16-mixed + channels_last", "ours", False, "bf16-mixed", True, None),
                ("fp32_compiled", f"lebm-zoo fp32, chains compiled ({mode})", "ours", False, "32-true", False, mode),
                ("bf16_compiled", f"lebm-zoo bf16-mixed, chains compiled ({mode})", "ours", False, "bf16-mixed",
                 False, mode),
                ("fp32_chain_compiled", f"lebm-zoo fp32, whole chains compiled ({mode})", "ours", False, "32-true",
                 False, f"{mode}:chain"),
                ("bf16_chain_compiled", f"lebm-zoo bf16-mixed, whole chains compiled ({mode})", "ours", False,
                 "bf16-mixed", False, f"{mode}:chain"),
                ("fp32_sync50", "lebm-zoo fp32, guard read every 50 batches (SyncEvery)", "ours", False, "32-true",
                 False, None, 50),
                ("fp32_chain_compiled_sync50", f"lebm-zoo fp32, whole chains compiled ({mode}), SyncEvery(50)", "ours",
                 False, "32-true", False, f"{mode}:chain", 50),
                ("bf16_chain_compiled_sync50", f"lebm-zoo bf16-mixed, whole chains compiled ({mode}), SyncEvery(50)",
                 "ours", False, "bf16-mixed", False, f"{mode}:chain", 50),
                ("fp32_step_captured", "lebm-zoo fp32, whole step one CUDA graph (capture_step), SyncEvery(50)",
                 "ours", False, "32-true", False, "capture", 50),
                ("bf16_step_captured", "lebm-zoo bf16-mixed, whole step one CUDA graph (capture_step), SyncEvery(50)",
                 "ours", False, "bf16-mixed", False, "capture", 50)]
    # on a CPU --rows may also name the GPU rows (capture_step runs eagerly there): the GPU commands, tried at tiny
    # sizes before a GPU window (benchmarks/device_env_check.sh)
    rows = cpu_rows if dev == "cpu" else gpu_rows  # the default
    choices = {r[0]: r for r in (gpu_rows + cpu_rows if dev == "cpu" else gpu_rows)}  # "fp32" is the same in both
    if a.rows:
        keys = a.rows.split(",")
        unknown = set(keys) - set(choices)
        if unknown:
            ap.error(f"unknown --rows {sorted(unknown)} for device {dev}; choose from {list(choices)}")
        rows = [choices[k] for k in dict.fromkeys(keys)]
    # Rounds: every row once per round, in the same order, so that a slow spell of this shared machine hits all rows
    # alike; each row reports its median over the rounds.
    runs: dict[str, list] = {key: [] for key, *_ in rows}
    res["rounds"] = a.rounds

    def save(done: str) -> None:  # after every row: a run cut short (a GPU command's time limit) keeps what it measured
        res["done"] = done
        res["training_iteration"] = {key: _row_summary(rs) for key, rs in runs.items() if rs}
        Path(a.out).write_text(json.dumps(res, indent=2) + "\n")

    for r in range(a.rounds):
        print(f"round {r + 1}/{a.rounds} of the training-iteration rows", file=sys.stderr, flush=True)
        for key, _, what, tuned, precision, cl, comp, *sync in rows:
            runs[key].append(training_row(what, a.batch, a.iters, a.warmup, a.threads, dev, tuned, precision, cl,
                                          comp, *sync))
            save(f"round {r + 1} of {a.rounds}, row {key}")
    res["prior_chain_s"] = prior_chains(dev, repeats=3, batch=a.batch)
    save("training rows, prior chain")
    res["throughput_fp32"] = throughputs(dev, "32-true", a.batch)
    res["throughput_bf16"] = throughputs(dev, "bf16-mixed", a.batch)
    save("all")

    it = res["training_iteration"]
    ref = (it.get("reference") or it.get("plain") or {}).get("s_per_iter")
    ref_tuned = (it.get("reference_tuned") or {}).get("s_per_iter")
    print(f"lebm-zoo benchmarks on {res['cpu']}" + (f" + {res['gpu']}" if res["gpu"] else "")
          + f", {a.threads} threads, torch {torch.__version__}")
    mem = "max allocated" if dev == "cuda" else "peak RSS"
    print(f"\n1. LEBM SVHN-recipe training iteration, batch {a.batch} (each row a fresh process; median of "
          f"{a.rounds} rounds of {a.iters} iterations)")
    print(f"   {'':<38}{'s/iter':>8}{'x faster than ref':>19}{'than tuned ref':>16}{mem + ' MiB':>16}")
    for key, label, *_ in rows:
        r = it[key]
        if r is None:
            continue
        v = r["s_per_iter"]
        f1 = f"{ref / v:>19.2f}" if ref else f"{'':>19}"
        f2 = f"{ref_tuned / v:>16.2f}" if ref_tuned else f"{'':>16}"
        print(f"   {label:<38}{v:>8.3f}{f1}{f2}{r['peak_mib']:>16.0f}")
    timed = {key: r["s_per_iter"] for key, r in it.items()
             if r is not None and not key.startswith("reference") and key != "plain"}
    if timed:  # (--rows may name only the reference loops)
        fastest = min(timed, key=timed.get)
        per_epoch = -(-73257 // a.batch)  # SVHN's training split in batches
        res["svhn_epoch_min_fastest"] = timed[fastest] * per_epoch / 60
        print(f"   implied SVHN epoch ({per_epoch} iterations) at the fastest row ({fastest}): "
              f"{res['svhn_epoch_min_fastest']:.1f} min")
    pc = res["prior_chain_s"]
    print(f"\n2. 60-step prior chain, batch {a.batch}, nz 100 (best of 3)")
    for name in ("ours", "torchebm", "plain_loop"):
        v = pc[name]
        print(f"   {name:<30}" + (f"{v * 1000:>9.1f} ms{v / pc['ours']:>10.2f} x ours" if v else "   n/a"))
    print("\n3. Throughput (images/s)")
    for p in ("fp32", "bf16"):
        t = res[f"throughput_{p}"]
        fid = f"{t['fid_images_per_s']:.1f}" if t["fid_images_per_s"] else "n/a"
        print(f"   {p}: sampling {t['sample_images_per_s']:.1f}, FID Inception features {fid}")
    save("all")  # with the implied epoch
    print(f"\nwritten {a.out}")


if __name__ == "__main__":
    main()
