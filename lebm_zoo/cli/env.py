"""``lebm-zoo env``: what this machine offers the zoo (software, devices, the CPU's vector units and bf16 support, and
the measured fastest precision)."""
from __future__ import annotations

import argparse
import os
import sys

import torch

from lebm_zoo.hardware import cpu_info
from lebm_zoo.precision import probe_precision

__all__ = ["main"]


def main(argv: list[str]) -> int:
    """``lebm-zoo env``: print the software, devices, CPU features and the fastest precision here. Returns 0."""
    parser = argparse.ArgumentParser(prog="lebm-zoo env", description="What this machine offers lebm-zoo: torch, "
                                     "CUDA devices, the CPU's vector units and bf16 support, and a measured "
                                     "fp32 vs bf16-mixed generator step.")
    parser.add_argument("--probe-seconds", type=float, default=10.0,
                        help="time budget of the fp32 vs bf16-mixed probe (default 10; 0 skips it)")
    args = parser.parse_args(argv)
    import pytorch_lightning as pl

    from lebm_zoo._version import __version__

    print(f"lebm-zoo {__version__}, torch {torch.__version__}, pytorch_lightning {pl.__version__}, "
          f"python {sys.version.split()[0]}")
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    print(f"CUDA devices: {n}" + "".join(f"\n  cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(n)))
    info = cpu_info()
    flags = ", ".join(f"{f} {'yes' if v else 'no'}" for f, v in info["flags"].items())
    print(f"CPU: {info['model']}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}")
    print(f"  vector capability (ATen): {info['capability']}; {flags}")
    print(f"  native bf16 (oneDNN): {'yes' if info['native_bf16'] else 'no: bf16 is emulated, slow'}")
    if args.probe_seconds > 0:
        p = probe_precision(args.probe_seconds)
        print(f"probe (SVHN-recipe generator, forward + backward to z at batch 100, median of "
              f"{args.probe_seconds:g} s of alternating runs): fp32 {p['32-true'] * 1e3:.0f} ms, "
              f"bf16-mixed {p['bf16-mixed'] * 1e3:.0f} ms ({p['bf16_speedup']:.2f}x)")
        advice = ("--trainer.precision bf16-mixed (add --model.channels_last true for LatentEBMPrior)"
                  if p["fastest"] == "bf16-mixed" else "--trainer.precision 32-true (the default)")
        print(f"fastest precision on this CPU: {advice}")
    if n:
        print("on the GPU: --trainer.accelerator gpu --trainer.precision bf16-mixed where the GPU supports bf16")
    return 0
