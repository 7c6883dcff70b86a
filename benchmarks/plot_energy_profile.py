#!/usr/bin/env python3
"""Energy along the prior Langevin chain of trained LatentEBMPrior checkpoints (mean over chains), into one PNG.

Usage: python benchmarks/plot_energy_profile.py OUT.png LABEL=CKPT [LABEL=CKPT ...] [--n 500] [--steps 200]
The chain runs past the training length K0 (dashed line) to show whether short-run samples sit where longer chains go.
"""
from __future__ import annotations

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import lebm_zoo  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("ckpts", nargs="+", help="LABEL=CKPT")
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--steps", type=int, default=200)
    a = ap.parse_args()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for item in a.ckpts:
        label, path = item.split("=", 1)
        model = lebm_zoo.load_pretrained(path)
        torch.manual_seed(0)
        z, trace = model.sample_latent(a.n, n_steps=a.steps, return_trace=True)
        # trace holds mean log p(z) = -E(z) - |z|^2/2: report the energy part and the full negative log-density
        ax.plot(-trace["log_prob"].numpy(), label=f"{label}: -log p(z) + const")
        ax.axvline(model.hparams.prior_steps, ls="--", c="gray", lw=0.8)
    ax.set_xlabel("prior Langevin step")
    ax.set_ylabel("mean E(z) + |z|^2/2")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(a.out, dpi=90)
    print(a.out)


if __name__ == "__main__":
    main()
