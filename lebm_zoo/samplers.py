"""MCMC samplers shared by every family: Langevin dynamics and Hamiltonian Monte Carlo.

The contract (``docs/architecture.md``, Samplers):

* A *target* is a callable ``log_prob(x) -> Tensor[B]``: the unnormalized log-density of each chain. Energy nets are
  wrapped by their family, e.g. a short-run EBM's ``lambda x: -E(x) / T``. An energy tilting a Gaussian, such as the
  latent EBM prior ``-E(z) - ||z||^2 / 2``, is a :class:`GaussianTiltedTarget`: still a callable log-density, whose
  Gaussian gradient the eager Langevin step takes in closed form.
* ``sampler(log_prob, x0, return_trace=False)`` returns ``x`` (detached, same shape, dtype and device as ``x0``) or
  ``(x, trace)`` where ``trace["log_prob"]`` holds the mean log-prob of the chains at the start of each step, shape
  ``(n_steps,)`` (HMC adds ``trace["acceptance_rate"]``, shape ``(n_steps,)``).
* Per-chain gradients come from ``log_prob(x).sum()`` (from ``energy(x).sum()`` plus ``x / sigma^2`` for a
  :class:`GaussianTiltedTarget` in the eager Langevin step); no graph survives a step; parameters' ``.grad`` are never
  touched (gradients are taken with respect to the chain state only); the chain runs with grad enabled even under a
  caller's ``torch.no_grad()``.
* The step has no Python data-dependent control flow and no host-device synchronisation, so it can be compiled or
  captured in a CUDA graph.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from typing import Callable, Iterator

import torch
from torch import Tensor

from lebm_zoo.utils import full_precision

LogProb = Callable[[Tensor], Tensor]

__all__ = ["GaussianTiltedTarget", "LangevinSampler", "HMCSampler", "SamplerMixin", "LogProb", "as_normal_tensor",
           "grad_enabled"]


def _log_prob_and_grad(log_prob: LogProb, x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-chain log-prob ``(B,)`` and its gradient w.r.t. ``x`` (same shape as ``x``), both detached."""
    x = x.detach().requires_grad_(True)
    lp = log_prob(x)
    if lp.dim() != 1 or lp.shape[0] != x.shape[0]:
        raise ValueError(f"log_prob must return one value per chain, shape ({x.shape[0]},); got {tuple(lp.shape)}")
    (grad,) = torch.autograd.grad(full_precision(lp).sum(), x)
    return full_precision(lp.detach()), grad


class GaussianTiltedTarget:
    """The target ``log p(x) = -energy(x) - ||x||^2 / (2 sigma^2)``: an energy tilting a Gaussian reference, the form
    of the latent EBM prior (Pang et al. 2020, eq. 2) and of its posterior (energy ``||y - G(z)||^2 / (2 llhd_sigma^2)
    + E(z)``, eq. 8).

    Calling it gives ``log p(x)`` ``(B,)``, so it is a target like any other. The eager Langevin step takes its
    gradient as the reference does, ``-(grad energy(x) + x / sigma^2)``: autograd through ``energy`` only, the
    Gaussian part in closed form, which dispatches fewer operations per step (on a GPU, fewer kernel launches) and
    equals the gradient of the whole log-density up to float rounding.

    Args:
        energy: ``(B, ...) -> (B,)``, the energy in nats (lower = more likely).
        sigma: the Gaussian reference's standard deviation (> 0), in the units of x.

    Raises:
        ValueError: a ``sigma`` that is not > 0; from a chain, an ``energy`` that does not return ``(B,)``.
    """

    __slots__ = ("energy", "sigma")

    def __init__(self, energy: Callable[[Tensor], Tensor], sigma: float):
        if not sigma > 0:
            raise ValueError(f"sigma must be > 0, got {sigma}")
        self.energy, self.sigma = energy, float(sigma)

    def __call__(self, x: Tensor) -> Tensor:
        """``log p(x)``, ``(B, ...) -> (B,)`` in nats, up to the normaliser."""
        return -self.energy(x) - _per_chain(x.pow(2)) / (2 * self.sigma ** 2)


def _tilted_energy_grad(target: GaussianTiltedTarget, x: Tensor, need_log_prob: bool
                        ) -> tuple[Tensor | None, Tensor]:
    """``(log p(x) (B,) or None, grad energy(x) + x / sigma^2)``, detached: minus the gradient of ``log p``."""
    x_grad = x.detach().requires_grad_(True)
    e = target.energy(x_grad)
    if e.dim() != 1 or e.shape[0] != x.shape[0]:
        raise ValueError(f"energy must return one value per chain, shape ({x.shape[0]},); got {tuple(e.shape)}")
    e = full_precision(e)
    if e.requires_grad:
        (grad,) = torch.autograd.grad(e.sum(), x_grad, allow_unused=True, materialize_grads=True)
    else:  # an energy that does not depend on x
        grad = torch.zeros_like(x_grad)
    with torch.no_grad():
        grad = torch.add(grad, x, alpha=1.0 / target.sigma ** 2)  # out of place: autograd's result may be a view
        if not need_log_prob:
            return None, grad
        return -(e + _per_chain(x.pow(2)) / (2 * target.sigma ** 2)), grad


def _clip_per_chain(grad: Tensor, max_norm: float) -> Tensor:
    """Rescale each chain's gradient ``(B, ...)`` to L2 norm at most ``max_norm``."""
    norm = grad.flatten(1).norm(dim=1).clamp_min(1e-12)  # (B,)
    scale = (max_norm / norm).clamp(max=1.0)
    return grad * scale.view(-1, *([1] * (grad.dim() - 1)))


def _langevin_move(x: Tensor, grad: Tensor, noise: Tensor | None, drift: float, noise_coef: float,
                   grad_clip: float | None, clamp: tuple[float, float] | None, out: Tensor | None = None) -> Tensor:
    """The Langevin update, the one place it is written: ``clamp(x + drift * clip(grad) + noise_coef * noise)``.

    ``grad`` is ``grad log_prob(x)`` (same shape as ``x``; or an energy's gradient with a negative ``drift``), ``clip``
    rescales each chain's gradient to L2 norm at most ``grad_clip`` (None: no clipping), ``noise`` a standard-normal
    draw of ``x``'s shape (None: no noise) and ``clamp`` an optional ``(low, high)`` box. ``out=x`` updates ``x`` in
    place (:meth:`LangevinSampler.step`: no new state tensor per step); without ``out`` it is out of place and
    differentiable (:meth:`LangevinSampler.unroll` keeps the graph; :func:`_langevin_update` runs it inside
    ``torch.compile``).
    """
    if grad_clip is not None:
        grad = _clip_per_chain(grad, grad_clip)
    x = torch.add(x, grad.to(x.dtype), alpha=drift, out=out)
    if noise is not None:
        x = torch.add(x, noise, alpha=noise_coef, out=out)
    if clamp is not None:
        x = torch.clamp(x, *clamp, out=out)
    return x


def _langevin_update(log_prob: LogProb, x: Tensor, noise: Tensor | None, drift: float, noise_coef: float,
                     grad_clip: float | None, clamp: tuple[float, float] | None) -> tuple[Tensor, Tensor]:
    """One whole Langevin step as one pure function, for ``torch.compile``: ``(x', log_prob(x))``, both detached.

    The gradient comes from ``torch.func.grad_and_value``, which dynamo traces into a single graph with the forward
    and the backward of ``log_prob`` (``torch.autograd.grad`` would break the graph); being a function transform it
    also works under the caller's ``torch.no_grad()``, which keeps any parameter graph out. The move is
    :func:`_langevin_move`. ``noise`` is drawn by the caller, from the global generator (inductor's RNG is another
    stream).
    """
    def total(z: Tensor) -> tuple[Tensor, Tensor]:
        lp = log_prob(z)
        if lp.dim() != 1 or lp.shape[0] != z.shape[0]:
            raise ValueError(f"log_prob must return one value per chain, shape ({z.shape[0]},); got {tuple(lp.shape)}")
        lp = full_precision(lp)
        return lp.sum(), lp

    grad, (_, lp) = torch.func.grad_and_value(total, has_aux=True)(x)
    x = _langevin_move(x, grad, noise, drift, noise_coef, grad_clip, clamp)
    return x.detach(), lp.detach()


def _langevin_chain(log_prob: LogProb, x: Tensor, noise: Tensor | None, n_steps: int, drift: float,
                    noise_coef: float, grad_clip: float | None,
                    clamp: tuple[float, float] | None) -> tuple[Tensor, Tensor]:
    """A whole chain of ``n_steps`` Langevin steps as one pure function, for ``torch.compile(fullgraph=True)``.

    Returns ``(x_K, lps)``, ``lps`` of shape ``(n_steps, B)``: the per-chain log-prob at the start of each step. Each
    step is :func:`_langevin_update`; ``noise`` is ``(n_steps, *x.shape)``, drawn by the caller (None: no noise). The
    loop over a constant ``n_steps`` unrolls into one graph: on a GPU, with a CUDA-graph mode, one graph replay per
    chain instead of one per step.
    """
    lps = []
    for i in range(n_steps):
        x, lp = _langevin_update(log_prob, x, None if noise is None else noise[i], drift, noise_coef, grad_clip,
                                 clamp)
        lps.append(lp)
    return x, torch.stack(lps)


def _compile_modes() -> tuple[str, ...]:
    """The ``mode`` strings this torch's ``torch.compile`` accepts."""
    try:
        from torch._inductor import list_mode_options
        return tuple(dict.fromkeys(["default", *list_mode_options()]))
    except ImportError:  # pragma: no cover - a torch without inductor
        return ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _is_recompile_limit(e: Exception) -> bool:
    """Whether ``e`` is what a ``fullgraph=True`` region raises past dynamo's recompile limit (no public name)."""
    import torch._dynamo.exc as dynamo_exc

    return isinstance(e, getattr(dynamo_exc, "FailOnRecompileLimitHit", ()))


#: torch.compile modes that capture CUDA graphs (outputs are overwritten by the next replay: clone what must live)
_CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")


@contextlib.contextmanager
def grad_enabled() -> Iterator[None]:
    """Autograd on, even inside a caller's ``torch.no_grad()`` or ``torch.inference_mode()`` (Lightning runs
    validation and test under inference mode; chains need input gradients there too)."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def as_normal_tensor(t: Tensor) -> Tensor:
    """``t`` itself, or a clone when it is an inference-mode tensor (those cannot take part in autograd)."""
    if t.is_inference():
        with torch.inference_mode(False):
            return t.clone()
    return t


def _per_chain(t: Tensor) -> Tensor:
    """Sum over every dimension but the first: ``(B, ...) -> (B,)``."""
    return t.flatten(1).sum(1)


class LangevinSampler:
    """Unadjusted Langevin dynamics (no Metropolis correction), the short-run sampler of the LEBM papers.

    Update, for ``n_steps`` steps with step size ``s``::

        x <- x + (s^2 / 2) * grad log p(x) + s * noise_scale * eps,   eps ~ N(0, I)

    which is Pang et al. (2020), eq. 7 (prior: ``log p = -E(z) - ||z||^2/2``) and eq. 8 (posterior). The short-run
    data-space form of Nijkamp et al. (2019), ``x <- x + grad f(x) + sigma * eps``, is the same update on a tempered
    target; build it with :meth:`tempered`.

    Args:
        n_steps: number of steps K (>= 0; 0 returns ``x0``).
        step_size: step size s (> 0), in the units of x.
        noise_scale: multiplies the injected noise; 1.0 is the textbook sampler, 0 gives noise-free gradient ascent.
        grad_clip: if set, each chain's gradient is rescaled to L2 norm at most ``grad_clip`` before the step.
        clamp: if set, ``(low, high)``: states are clipped to this box after every step (e.g. the data range of
            images; off in the textbook sampler).
        compile: run each step through ``torch.compile`` (off by default: None or False is the eager step). True:
            the default mode; a string: that ``torch.compile`` mode, e.g. ``"default"``, ``"reduce-overhead"`` (CUDA
            graphs on a GPU), ``"max-autotune-no-cudagraphs"``, ``"max-autotune"``. See *Compiled chains* below.
        compile_scope: what one compiled region holds when ``compile`` is on: ``"step"`` (default), one Langevin
            step; ``"chain"``, a whole chain of ``n_steps`` steps, compiled with ``fullgraph=True`` (a graph break
            is an error, not a silent split), so that a CUDA-graph mode replays one graph per chain.

    Compiled chains: the compiled region is the whole update of one step, the target's forward and backward
    (``torch.func.grad_and_value`` of ``log_prob(x).sum()``: one graph, no break), grad clipping, the drift, adding
    the noise and the clamp; the loop over steps stays in Python. The noise is drawn before the compiled call by
    ``torch.randn_like`` from the global generator, one draw per step in the eager order, so with the same seed a
    compiled chain gives the eager chain's states up to float rounding (if ``log_prob`` itself draws random numbers,
    the order relative to its draws differs). The compiled function is made once per sampler, lazily, and not
    pickled; dynamo keys its graphs on ``log_prob``'s code and on what its closure holds (modules, tensors' shapes and
    dtypes), so a fresh ``lambda z: ...`` of the same code per call, as the models pass, reuses the graph: a new
    graph comes only with a new target function, a new shape (the batch size, a second distinct one turns on dynamic
    shapes), dtype, device, autocast state, or a new ``step_size`` / ``noise_scale`` / ``grad_clip`` / ``clamp``.
    Beyond ``torch._dynamo.config.recompile_limit`` graphs of the step (those of all compiled samplers count
    together: they share one function), dynamo runs new variants eagerly (with a warning; same results); a whole-chain
    region past that limit is run eagerly by the sampler, with a ``RuntimeWarning`` (``fullgraph=True`` would make
    dynamo raise), from the same pre-drawn noise.
    The first call with each new graph pays the compile time: seconds to a minute (on a CPU inductor builds C++ with
    the system compiler and keeps it in an on-disk cache). Whether that pays depends on the net, the batch and the
    machine, so it may not on a CPU: ``benchmarks/bench_compile.py`` measures it. On one core of an Intel Xeon the
    SVHN recipe's 60-step prior chain (batch 100) took 0.084 s compiled against 0.158 s eager, after 7 s of compiling
    with a warm cache (48 s cold): worth it for training, not for one ``sample()`` call. On a GPU
    ``"reduce-overhead"`` also removes the per-kernel launch cost that dominates short chains of small nets; in the
    CUDA-graph modes a new generation is marked before each step and each step's outputs are cloned before they are
    used again, as the next step's input too (a replay overwrites its outputs).

    Whole-chain regions (``compile_scope="chain"``): the K steps run as one compiled function (the loop unrolled);
    the K noise draws are made before it, one ``torch.randn_like`` per step in the eager order (so the same states
    up to float rounding, as above), and held as one ``(K, *x0.shape)`` tensor. The graph is specialised on K
    (``n_steps`` given to a call is a new graph) and its compile time grows with K. In the CUDA-graph modes the
    chain's outputs are cloned once per chain, not per step. Why ``torch.compile`` rather than a hand-made
    ``torch.cuda.CUDAGraph``: the same region runs and is tested on a CPU (``fullgraph=True`` proves it has no
    graph break, the states prove it equals eager), and static buffers, memory pools and warm-up come from torch.

    Raises:
        ValueError: for a negative ``n_steps``, non-positive ``step_size``, negative ``noise_scale`` or ``grad_clip``,
            a ``compile`` that is not None, a bool or one of ``torch.compile``'s mode strings, or a
            ``compile_scope`` other than ``"step"`` and ``"chain"``.
    """

    def __init__(self, n_steps: int, step_size: float, noise_scale: float = 1.0, grad_clip: float | None = None,
                 clamp: tuple[float, float] | None = None, compile: bool | str | None = None,
                 compile_scope: str = "step"):
        if n_steps < 0:
            raise ValueError(f"n_steps must be >= 0, got {n_steps}")
        if step_size <= 0:
            raise ValueError(f"step_size must be > 0, got {step_size}")
        if noise_scale < 0:
            raise ValueError(f"noise_scale must be >= 0, got {noise_scale}")
        if grad_clip is not None and grad_clip <= 0:
            raise ValueError(f"grad_clip must be > 0 or None, got {grad_clip}")
        self.n_steps = int(n_steps)
        self.step_size = float(step_size)
        self.noise_scale = float(noise_scale)
        self.grad_clip = grad_clip
        if clamp is not None and not clamp[0] < clamp[1]:
            raise ValueError(f"clamp must be (low, high) with low < high, got {clamp}")
        self.clamp = None if clamp is None else (float(clamp[0]), float(clamp[1]))
        if compile is not None and not isinstance(compile, (bool, str)):
            raise ValueError(f"compile must be None, a bool or a torch.compile mode string, got {compile!r}")
        if isinstance(compile, str) and compile not in _compile_modes():
            raise ValueError(f"compile must be one of torch.compile's modes {_compile_modes()}, got {compile!r}")
        if compile_scope not in ("step", "chain"):
            raise ValueError(f"compile_scope must be 'step' or 'chain', got {compile_scope!r}")
        self.compile = compile
        self.compile_scope = compile_scope
        self._compiled = None  # the compiled step, made on first use
        self._compiled_chain = None  # the compiled whole chain (compile_scope="chain"), made on first use

    @property
    def compile_mode(self) -> str | None:
        """The ``torch.compile`` mode of the step, ``"default"`` for ``compile=True``; None when the step is eager."""
        if self.compile is None or self.compile is False:
            return None
        return "default" if self.compile is True else self.compile

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_compiled"] = state["_compiled_chain"] = None  # compiled functions do not pickle; rebuilt on use
        return state

    @classmethod
    def tempered(cls, n_steps: int, noise_std: float, grad_coef: float = 1.0,
                 clamp: tuple[float, float] | None = None, **kwargs) -> "LangevinSampler":
        """The short-run data-space update ``x <- x + grad_coef * grad f(x) + noise_std * eps`` (Nijkamp et al. 2019).

        It is the Langevin update with ``s^2/2 = grad_coef`` and ``noise_scale = noise_std / s``; ``kwargs`` go to
        the constructor (``grad_clip``, ``compile``, ``compile_scope``).
        """
        s = math.sqrt(2.0 * grad_coef)
        return cls(n_steps, s, noise_scale=noise_std / s, clamp=clamp, **kwargs)

    def __repr__(self) -> str:
        return (f"LangevinSampler(n_steps={self.n_steps}, step_size={self.step_size}, "
                f"noise_scale={self.noise_scale}, grad_clip={self.grad_clip}, clamp={self.clamp}, "
                f"compile={self.compile!r}, compile_scope={self.compile_scope!r})")

    def step(self, log_prob: LogProb, x: Tensor) -> tuple[Tensor, Tensor]:
        """One Langevin step. Returns the new state (detached) and the per-chain log-prob at the old state ``(B,)``."""
        if self.compile_mode is not None:
            with grad_enabled():
                return self._compiled_step(log_prob, x)
        return self._eager_step(log_prob, x, need_log_prob=True)

    def _eager_step(self, log_prob: LogProb, x: Tensor, need_log_prob: bool) -> tuple[Tensor, Tensor | None]:
        """:meth:`step`, eager; the log-prob of a :class:`GaussianTiltedTarget` is computed only if needed."""
        drift = 0.5 * self.step_size ** 2
        if isinstance(log_prob, GaussianTiltedTarget):  # the energy's gradient: the drift goes down it
            lp, grad = _tilted_energy_grad(log_prob, x, need_log_prob)
            drift = -drift
        else:
            lp, grad = _log_prob_and_grad(log_prob, x)
        x = x.detach()
        noise = torch.randn_like(x) if self.noise_scale > 0 else None
        with torch.no_grad():  # in place on a fresh alias: the step's graph is already freed
            x = _langevin_move(x, grad, noise, drift, self.step_size * self.noise_scale, self.grad_clip, self.clamp,
                               out=x)
        return x, lp

    def _compiled_step(self, log_prob: LogProb, x: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`step` through the compiled :func:`_langevin_update`.

        In the CUDA-graph modes the outputs live in the graph's memory pool, which the next replay overwrites: they
        are cloned before they are used again, also as the next step's input (a replay's output fed back to the
        graph is the "overwritten by a subsequent run" error). One copy of the state per step.
        """
        mode = self.compile_mode
        if self._compiled is None:
            self._compiled = torch.compile(_langevin_update, mode=mode)
        s = self.step_size
        x = x.detach()
        noise = torch.randn_like(x) if self.noise_scale > 0 else None  # the eager chain's draw, same stream
        cudagraphs = mode in _CUDAGRAPH_MODES and x.is_cuda
        if cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        with torch.no_grad():  # grad_and_value is a function transform: it differentiates inside no_grad
            x, lp = self._compiled(log_prob, x, noise, 0.5 * s * s, s * self.noise_scale, self.grad_clip,
                                   self.clamp)
        if cudagraphs:
            x, lp = x.clone(), lp.clone()
        return x, lp

    def _compiled_whole_chain(self, log_prob: LogProb, x: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """``k >= 1`` steps through the compiled :func:`_langevin_chain`: ``(x_K, lps (k, B))``, both detached."""
        mode = self.compile_mode
        if self._compiled_chain is None:
            self._compiled_chain = torch.compile(_langevin_chain, mode=mode, fullgraph=True)
        s = self.step_size
        x = x.detach()
        # the eager chain's k draws, same stream and order (each step draws once, after its gradient)
        noise = torch.stack([torch.randn_like(x) for _ in range(k)]) if self.noise_scale > 0 else None
        cudagraphs = mode in _CUDAGRAPH_MODES and x.is_cuda
        if cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        args = (log_prob, x, noise, k, 0.5 * s * s, s * self.noise_scale, self.grad_clip, self.clamp)
        with torch.no_grad():
            try:
                x, lps = self._compiled_chain(*args)
            except Exception as e:  # fullgraph turns dynamo's eager fallback into an error: do it here
                if not _is_recompile_limit(e):
                    raise
                warnings.warn(f"LangevinSampler: {type(e).__name__}: too many compiled chain graphs in this process "
                              "(torch._dynamo.config.recompile_limit); this chain runs eagerly (same states)",
                              RuntimeWarning, stacklevel=3)
                x, lps = _langevin_chain(*args)
                cudagraphs = False
        if cudagraphs:
            x, lps = x.clone(), lps.clone()
        return x, lps

    def __call__(self, log_prob: LogProb, x0: Tensor, *, return_trace: bool = False, n_steps: int | None = None):
        """Run the chains from ``x0``.

        Args:
            log_prob: target, ``(B, ...) -> (B,)``.
            x0: initial states ``(B, ...)``; not modified.
            return_trace: also return ``{"log_prob": (n_steps,)}``, the mean log-prob at the start of each step.
            n_steps: override the configured number of steps for this call.

        Returns:
            ``x`` of the shape of ``x0`` (detached), or ``(x, trace)``.
        """
        k = self.n_steps if n_steps is None else int(n_steps)
        compiled = self.compile_mode is not None
        lps = []
        with grad_enabled():
            x = x0.detach().clone()
            if compiled and self.compile_scope == "chain" and k > 0:
                x, chain_lps = self._compiled_whole_chain(log_prob, x, k)
                lps = list(chain_lps.mean(dim=1).unbind()) if return_trace else []
            else:
                for _ in range(k):
                    x, lp = (self._compiled_step(log_prob, x) if compiled
                             else self._eager_step(log_prob, x, need_log_prob=return_trace))
                    if return_trace:
                        lps.append(lp.mean())
        if not return_trace:
            return x
        trace = {"log_prob": torch.stack(lps) if lps else x.new_zeros(0)}
        return x, trace

    def unroll(self, log_prob: LogProb, x0: Tensor, noise: Tensor | None = None) -> Tensor:
        """Run the chain keeping the graph: ``x_K`` is differentiable w.r.t. ``x0`` (and any parameters in use).

        The same update as :meth:`step` (grad clipping included) with ``create_graph=True``; used to optimise a chain's
        initial state, e.g. short-run EBM reconstruction (Nijkamp et al. 2019, sec. 4). Memory grows with
        ``n_steps``. Unlike ``__call__``, the caller manages ``requires_grad`` of parameters and grad mode.

        Args:
            log_prob: target, ``(B, ...) -> (B,)``.
            x0: initial states ``(B, ...)`` (usually a leaf with ``requires_grad=True``).
            noise: ``(n_steps, B, ...)`` fixed standard-normal draws, one per step (default: fresh draws); fixing it
                makes the chain a deterministic map of ``x0``.

        Returns:
            ``x_K`` of the shape of ``x0``, attached to the graph.

        Raises:
            ValueError: if ``noise`` does not have shape ``(n_steps, *x0.shape)``.
        """
        k, s = self.n_steps, self.step_size
        if noise is not None and tuple(noise.shape) != (k, *x0.shape):
            raise ValueError(f"noise must have shape {(k, *x0.shape)}, got {tuple(noise.shape)}")
        x = x0
        with torch.enable_grad():
            for i in range(k):
                if not x.requires_grad:
                    x = x.requires_grad_(True)
                grad = torch.autograd.grad(log_prob(x).sum(), x, create_graph=True)[0]
                eps = torch.randn_like(x) if noise is None else noise[i]
                x = _langevin_move(x, grad, eps, 0.5 * s * s, s * self.noise_scale, self.grad_clip, self.clamp)
        return x


class HMCSampler:
    """Hamiltonian Monte Carlo with a leapfrog integrator and a per-chain Metropolis accept (Neal, 2011).

    Each of ``n_steps`` iterations draws momentum p ~ N(0, I), runs ``n_leapfrog`` leapfrog steps of size
    ``step_size`` on H(x, p) = -log p(x) + ||p||^2 / 2 and accepts each chain independently with probability
    ``min(1, exp(H_old - H_new))``. Acceptance is done with ``torch.where``: no data-dependent Python branches.

    Args:
        n_steps: number of HMC iterations (>= 0).
        n_leapfrog: leapfrog steps per iteration (>= 1).
        step_size: leapfrog step size (> 0), in the units of x.

    Raises:
        ValueError: for out-of-range arguments.
    """

    def __init__(self, n_steps: int, n_leapfrog: int, step_size: float):
        if n_steps < 0 or n_leapfrog < 1 or step_size <= 0:
            raise ValueError(f"need n_steps >= 0, n_leapfrog >= 1, step_size > 0; got {n_steps}, {n_leapfrog}, "
                             f"{step_size}")
        self.n_steps = int(n_steps)
        self.n_leapfrog = int(n_leapfrog)
        self.step_size = float(step_size)

    def __repr__(self) -> str:
        return f"HMCSampler(n_steps={self.n_steps}, n_leapfrog={self.n_leapfrog}, step_size={self.step_size})"

    def step(self, log_prob: LogProb, x: Tensor, lp: Tensor, grad: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """One HMC iteration from state ``x`` with cached log-prob ``lp (B,)`` and gradient ``grad``.

        Returns the new ``(x, lp, grad, accepted)``, ``accepted`` a float ``(B,)`` of 0/1.
        """
        eps = self.step_size
        p0 = torch.randn_like(x)
        xn, gn = x, grad
        p = p0 + 0.5 * eps * gn
        for i in range(self.n_leapfrog):
            xn = xn + eps * p
            lpn, gn = _log_prob_and_grad(log_prob, xn)
            if i < self.n_leapfrog - 1:
                p = p + eps * gn
        p = p + 0.5 * eps * gn
        h_old = -lp + 0.5 * _per_chain(p0 * p0)
        h_new = -lpn + 0.5 * _per_chain(p * p)
        log_u = torch.log(torch.rand_like(h_old))
        # a NaN h_new compares False: that chain stays where it was
        accept = log_u < (h_old - h_new)
        shape = (-1,) + (1,) * (x.dim() - 1)
        x = torch.where(accept.view(shape), xn.detach(), x)
        grad = torch.where(accept.view(shape), gn, grad)
        lp = torch.where(accept, lpn, lp)
        return x, lp, grad, accept.float()

    def __call__(self, log_prob: LogProb, x0: Tensor, *, return_trace: bool = False, n_steps: int | None = None):
        """Run the chains from ``x0``.

        Args:
            log_prob: target, ``(B, ...) -> (B,)``.
            x0: initial states ``(B, ...)``; not modified.
            return_trace: also return ``{"log_prob": (n_steps,), "acceptance_rate": (n_steps,)}``: the mean
                log-prob after each iteration and the share of chains accepted in it (in [0, 1]).
            n_steps: override the configured number of iterations for this call.

        Returns:
            ``x`` of the shape of ``x0`` (detached), or ``(x, trace)``.
        """
        k = self.n_steps if n_steps is None else int(n_steps)
        lps, accs = [], []
        with grad_enabled():
            x = x0.detach().clone()
            lp, grad = _log_prob_and_grad(log_prob, x)
            for _ in range(k):
                x, lp, grad, acc = self.step(log_prob, x, lp, grad)
                lps.append(lp.mean())
                accs.append(acc.mean())
        if not return_trace:
            return x
        empty = x.new_zeros(0)
        trace = {"log_prob": torch.stack(lps) if lps else empty,
                 "acceptance_rate": torch.stack(accs) if accs else empty}
        return x, trace


class SamplerMixin:
    """Gives a ``LightningModule`` ``self.langevin(...)`` and ``self.hmc(...)`` bound to its configured samplers.

    A model registers its samplers in ``self.samplers`` (a plain dict name -> sampler, e.g. ``{"prior": ...,
    "posterior": ...}``). While a chain runs, every parameter of the module has ``requires_grad`` switched off (so
    no parameter-gradient graph is built and ``.grad`` is never touched) and, if ``sampler_eval_mode`` is True, the
    module is in eval mode; both are restored afterwards, also on error.
    """

    samplers: dict
    sampler_eval_mode: bool = True
    #: True while one of the module's chains runs (its targets then skip the input checks of its public methods)
    in_chain: bool = False

    @contextlib.contextmanager
    def frozen_for_sampling(self) -> Iterator[None]:
        """Context: parameters frozen (requires_grad False) and, optionally, eval mode; restored on exit."""
        params = [p for p in self.parameters() if p.requires_grad]
        was_training, was_in_chain = self.training, self.in_chain
        for p in params:
            p.requires_grad_(False)
        if self.sampler_eval_mode:
            self.train(False)
        self.in_chain = True
        try:
            yield
        finally:
            self.in_chain = was_in_chain
            for p in params:
                p.requires_grad_(True)
            if self.sampler_eval_mode:
                self.train(was_training)

    def _run(self, kind: type, log_prob: LogProb, x0: Tensor, sampler, **kwargs):
        s = self.samplers[sampler] if isinstance(sampler, str) else sampler
        if not isinstance(s, kind):
            raise TypeError(f"sampler {sampler!r} is a {type(s).__name__}, expected a {kind.__name__}")
        with self.frozen_for_sampling():
            return s(log_prob, x0, **kwargs)

    def langevin(self, log_prob: LogProb, x0: Tensor, sampler: str | LangevinSampler = "langevin", **kwargs):
        """Run the Langevin sampler named ``sampler`` in ``self.samplers`` (or the one given) on ``log_prob``."""
        return self._run(LangevinSampler, log_prob, x0, sampler, **kwargs)

    def hmc(self, log_prob: LogProb, x0: Tensor, sampler: str | HMCSampler = "hmc", **kwargs):
        """Run the HMC sampler named ``sampler`` in ``self.samplers`` (or the one given) on ``log_prob``."""
        return self._run(HMCSampler, log_prob, x0, sampler, **kwargs)
