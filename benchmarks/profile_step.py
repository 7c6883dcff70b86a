#!/usr/bin/env python3
"""Where an SVHN-recipe iteration spends its time (docs/speed.md): ``python benchmarks/profile_step.py``.

1. One posterior Langevin step (batch 100, nz 100) of ``LatentEBMPrior``: wall time, median of 5 rounds of 5 steps.
2. The torch profiler over a whole posterior chain (20 steps): the share of its CPU time spent in convolutions
   (``aten::_convolution`` and ``aten::convolution_backward``).
3. Each transposed convolution of the generator alone: the forward and the input gradient (a convolution), in
   GFLOP/s, fp32 and bf16, NCHW and channels_last (the raw speed of oneDNN's kernels on this CPU).
4. With ``--compile``: the posterior step with ``torch.compile`` (inductor) of the log-joint against eager.

Runs under bf16 autocast with the tuned allocator, as ``lebm-zoo fit --trainer.precision bf16-mixed`` does.
"""
from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from lebm_zoo import LatentEBMPrior
from lebm_zoo.samplers import LangevinSampler
from lebm_zoo.utils import tune_cpu_allocator

B = 100


def _median_ms(fn, rounds: int = 5, n: int = 5) -> float:
    fn()
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        times.append((time.perf_counter() - t) / n * 1e3)
    return statistics.median(times)


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--compile", action="store_true", help="also time a torch.compile'd posterior step")
    args = ap.parse_args()
    tune_cpu_allocator()
    torch.manual_seed(0)
    model = LatentEBMPrior()
    x = torch.rand(B, 3, 32, 32) * 2 - 1
    z0 = torch.randn(B, 100)
    step = LangevinSampler(1, 0.1)
    with torch.autocast("cpu", torch.bfloat16), model.frozen_for_sampling():
        ms = _median_ms(lambda: step(lambda z: model.log_joint(x, z), z0))
        print(f"1. one posterior Langevin step, bf16: {ms:.1f} ms (x 20 steps = {ms * 20 / 1e3:.2f} s)")
        model.infer_latent(x)
        with torch.profiler.profile() as prof:
            model.infer_latent(x)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    conv = sum(e.self_cpu_time_total for e in events if e.key in ("aten::_convolution", "aten::convolution_backward"))
    print(f"2. posterior chain, bf16: convolutions are {100 * conv / total:.0f}% of its CPU time")

    print("3. the generator's transposed convolutions alone, GFLOP/s (forward / input gradient)")
    h = 4
    for c in [m for m in model.generator.net if isinstance(m, torch.nn.ConvTranspose2d)][1:]:
        row = []
        for dtype, dname in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
            for fmt, fname in ((torch.contiguous_format, "NCHW"), (torch.channels_last, "CL")):
                fwd, bwd = _layer_gflops(c, h, dtype, fmt)
                row.append(f"{dname} {fname} {fwd:5.0f} / {bwd:5.0f}")
        print(f"   {c.in_channels:>3} -> {c.out_channels:>3}, {h:>2} px: " + " | ".join(row))
        h = (h - 1) * c.stride[0] - 2 * c.padding[0] + c.kernel_size[0]

    if args.compile:
        target = torch.compile(lambda z: model.log_joint(x, z), dynamic=False)
        with torch.autocast("cpu", torch.bfloat16), model.frozen_for_sampling():
            t = time.perf_counter()
            step(target, z0)
            print(f"4. torch.compile of the log-joint: {time.perf_counter() - t:.0f} s to compile; posterior step "
                  f"{_median_ms(lambda: step(target, z0)):.1f} ms compiled, "
                  f"{_median_ms(lambda: step(lambda z: model.log_joint(x, z), z0)):.1f} ms eager (bf16)")


def _layer_gflops(c: torch.nn.ConvTranspose2d, h: int, dtype: torch.dtype, fmt) -> tuple[float, float]:
    """GFLOP/s of a transposed convolution's forward and of its input gradient, batch B, ``h x h`` input."""
    flops = 2 * c.in_channels * c.out_channels * c.kernel_size[0] * c.kernel_size[1] * h * h * B
    w = c.weight.detach().to(dtype).contiguous(memory_format=fmt)
    inp = torch.randn(B, c.in_channels, h, h, dtype=dtype).contiguous(memory_format=fmt)
    grad = torch.randn_like(F.conv_transpose2d(inp, w, stride=c.stride, padding=c.padding))
    fwd = _median_ms(lambda: F.conv_transpose2d(inp, w, stride=c.stride, padding=c.padding), 3, 5)
    bwd = _median_ms(lambda: F.conv2d(grad, w, stride=c.stride, padding=c.padding), 3, 5)
    return flops / fwd / 1e6, flops / bwd / 1e6


if __name__ == "__main__":
    main()
