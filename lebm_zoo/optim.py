"""Optimisers that reproduce reference implementations' update rules exactly.

:class:`AdamTF` is Adam in the form of TensorFlow 1.x ``tf.train.AdamOptimizer`` (``tensorflow/python/training/
adam.py`` and its ``ApplyAdam`` kernel), which the TF reference codes of the zoo's families train with.
"""
from __future__ import annotations

import math

import torch

__all__ = ["AdamTF"]


class AdamTF(torch.optim.Optimizer):
    """Adam as TensorFlow 1.x's ``tf.train.AdamOptimizer`` updates (the "epsilon hat" form).

    For each parameter ``p`` with gradient ``g`` at step ``t = 1, 2, ...`` (moments start at 0)::

        m_t  = beta1 * m_{t-1} + (1 - beta1) * g
        v_t  = beta2 * v_{t-1} + (1 - beta2) * g^2
        lr_t = lr * sqrt(1 - beta2^t) / (1 - beta1^t)
        p   <- p - lr_t * m_t / (sqrt(v_t) + eps)

    ``torch.optim.Adam`` adds ``eps`` to the bias-corrected ``sqrt(v_t / (1 - beta2^t))`` instead::

        p   <- p - lr / (1 - beta1^t) * m_t / (sqrt(v_t) / sqrt(1 - beta2^t) + eps)

    which is this update with ``eps`` replaced by ``eps * sqrt(1 - beta2^t)``: the two agree exactly for ``eps = 0``
    and differ where ``sqrt(v_t)`` is not large against ``eps`` (early steps, tiny gradients). TF's defaults are the
    ones below (``beta1=0.9, beta2=0.999, epsilon=1e-8``).

    The step count ``t`` is kept per parameter (as ``torch.optim.Adam``); TF keeps one pair of ``beta^t`` per
    optimiser. They agree whenever every parameter receives a gradient at every step; a parameter whose ``grad`` is
    None is skipped (its moments and count unchanged).

    Args:
        params: parameters or parameter groups.
        lr: learning rate (> 0).
        betas: ``(beta1, beta2)``, each in [0, 1).
        eps: the epsilon added to ``sqrt(v_t)`` (>= 0).

    Raises:
        ValueError: for out-of-range arguments.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps))

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter that has a gradient; returns ``closure()`` if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdamTF does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                t = state["step"]
                m, v, g = state["exp_avg"], state["exp_avg_sq"], p.grad
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                lr_t = group["lr"] * math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
                p.addcdiv_(m, v.sqrt().add_(group["eps"]), value=-lr_t)
        return loss
