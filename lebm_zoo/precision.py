"""Which precision is fast on this CPU: the measured fp32 vs bf16-mixed probe of ``lebm-zoo env`` and the bf16-on-CPU
warning of ``lebm-zoo fit``.

On a CPU, ``--trainer.precision bf16-mixed`` is fast only where the CPU computes in bf16 natively (AVX512-BF16 or
AMX, which oneDNN uses). Elsewhere (an AVX2-only CPU, for instance) every bf16 operation is emulated and a training
step can be tens of times slower than fp32. :func:`probe_precision` measures it on this machine; ``lebm-zoo env``
prints it with the rest, and ``lebm-zoo fit`` warns once when bf16 is asked for on a CPU without native support.
"""
from __future__ import annotations

import statistics
import time
import warnings

import torch

from lebm_zoo.hardware import cpu_info, native_bf16

__all__ = ["probe_precision", "warn_if_emulated_bf16"]

def probe_precision(seconds: float = 10.0, batch: int = 100) -> dict:
    """Time one generator step in fp32 and in bf16-mixed: the SVHN recipe's ConvGenerator, forward and backward to
    z, as in each step of the posterior Langevin chain (the bulk of a latent-prior training iteration).

    One warm-up step of each (allocations, kernel selection), then the two precisions alternate until ``seconds``
    have passed (at least three steps of each); the medians are kept.

    Args:
        seconds: the time budget of the probe (wall clock, seconds), > 0.
        batch: latent vectors per step.

    Returns:
        ``{"32-true": s, "bf16-mixed": s, "bf16_speedup": fp32 time / bf16 time, "fastest": precision}``: seconds
        per step and the factor (> 1: bf16 is faster here).

    Raises:
        ValueError: for a non-positive budget or batch.
    """
    from lebm_zoo.nets import ConvGenerator

    if seconds <= 0 or batch < 1:
        raise ValueError(f"seconds must be > 0 and batch >= 1, got {seconds} and {batch}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        g = ConvGenerator(nz=100, ngf=64, img_size=32, channels=3)
        z = torch.randn(batch, 100, requires_grad=True)

    def step(precision: str) -> float:
        t0 = time.perf_counter()
        with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16-mixed"):
            out = g(z)
        torch.autograd.grad(out.float().square().sum(), z)
        return time.perf_counter() - t0

    runs: dict[str, list[float]] = {"32-true": [], "bf16-mixed": []}
    for precision in runs:
        step(precision)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds or min(len(v) for v in runs.values()) < 3:
        for precision, times in runs.items():
            times.append(step(precision))
    med = {p: statistics.median(v) for p, v in runs.items()}
    speedup = med["32-true"] / med["bf16-mixed"]
    return {**med, "bf16_speedup": speedup, "fastest": "bf16-mixed" if speedup > 1 else "32-true"}


_warned = False


def warn_if_emulated_bf16(precision: str, accelerator: str, probe_seconds: float = 3.0,
                          emit: bool = True) -> str | None:
    """Warn once per process when bf16 is asked for on a CPU that has no bf16 units.

    Args:
        precision: the trainer's precision (``"bf16-mixed"``, ``"bf16-true"``, ``"32-true"``...).
        accelerator: ``"cpu"`` or another device type; only the CPU is checked.
        probe_seconds: budget of the :func:`probe_precision` run that measures the slowdown (0: do not measure).
        emit: issue the text as a ``UserWarning`` (False: only return it, for callers that print it themselves).

    Returns:
        the warning's text when one was issued, else None.
    """
    global _warned
    if _warned or accelerator != "cpu" or "bf16" not in str(precision) or native_bf16():
        return None
    _warned = True
    info = cpu_info()
    where = f"{info['model']} ({info['capability']}, no AVX512-BF16/AMX)"
    factor = ""
    if probe_seconds > 0:
        p = probe_precision(probe_seconds, batch=32)
        factor = f": a generator step measured {1 / p['bf16_speedup']:.1f}x slower than in fp32 here"
    msg = (f"--trainer.precision {precision} on a CPU without bf16 units, {where}. Every bf16 operation is "
           f"emulated{factor}. Use --trainer.precision 32-true on this machine (`lebm-zoo env` measures both).")
    if emit:
        warnings.warn(msg, stacklevel=2)
    return msg
