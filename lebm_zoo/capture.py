"""A training step's computation replayed as one CUDA graph (``capture_step``).

:class:`CapturedStep` wraps a function ``fn(x) -> {name: 0-d tensor}`` that runs a family's chains, computes its
losses and back-propagates them into the parameters' ``.grad`` (everything of a training step but the optimiser
updates, which stay with Lightning). On a CUDA input it runs ``fn`` eagerly for a few warm-up steps, then captures it
once in a ``torch.cuda.CUDAGraph`` (the "whole-network capture" of PyTorch's CUDA semantics notes) and from then on
replays that graph: one launch for the hundreds of kernels of both chains, the losses and the backward. On any other
device it is ``fn`` itself.

Why a hand-made graph here and ``torch.compile`` for the chains (``compile_chains``): a training step
back-propagates into the parameters, which breaks a dynamo graph, so ``torch.compile`` cannot hold a whole step in
one region; ``torch.cuda.graph`` captures the eager code as it runs, autograd included. See ``docs/architecture.md``
(*A whole step as one CUDA graph*).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

__all__ = ["CapturedStep"]


class CapturedStep:
    """Replay ``fn`` as one CUDA graph after ``warmup`` eager calls (CUDA inputs; elsewhere ``fn`` is called as is).

    ``fn(*xs)`` (one or more tensors) must run the same kernels at every call for given shapes: no host reads
    (``.item()``, Python branches on tensor values), no CPU tensors, every random number from torch's CUDA generator
    (a replay draws fresh numbers from it, as the eager call would). It may set parameters' ``.grad`` (by
    ``backward``); after each replay each parameter's ``.grad`` is pointed back at the graph's gradient buffer, so an
    eager call in between (a batch of another shape) cannot leave the optimiser reading stale gradients.

    Warm-up calls are counted per kind of input (shapes, dtypes, device, autocast state): the first kind to have had
    ``warmup`` of them is captured at its next call, and from then on inputs of another kind (the smaller last batch
    of an epoch) run ``fn`` eagerly. So a run resumed at an epoch's last batch still captures the regular batches'
    step. Under autocast the capture runs with the autocast cache off (a cached cast would be captured once and
    replayed stale).

    Args:
        fn: ``(*xs) -> dict`` of 0-d tensors (the step's losses and statistics, by name).
        params: the parameters whose ``.grad`` ``fn`` writes.
        warmup: eager calls before the capture (>= 1), run on a side stream as the CUDA notes ask, so that lazy
            initialisation (cuDNN's algorithm search with ``cudnn.benchmark``, cuBLAS workspaces, the optimiser's
            state, made by the eager updates between calls) happens before it.

    Returns (a call): the dict of ``fn``, its tensors copied out of the graph's memory (a replay overwrites it).

    Raises:
        ValueError: for ``warmup`` < 1; from a warm-up call, an ``fn`` that returns something other than 0-d
            tensors.
    """

    def __init__(self, fn: Callable[..., dict[str, Tensor]], params, warmup: int = 3):
        if int(warmup) < 1:
            raise ValueError(f"warmup must be >= 1, got {warmup}")
        self.fn = fn
        self.params = list(params)
        self.warmup = int(warmup)
        self.reset()

    def reset(self) -> None:
        """Forget the graph (and the warm-up count): the next CUDA calls warm up and capture again."""
        self.graph: torch.cuda.CUDAGraph | None = None
        self.calls = 0  # CUDA calls so far (warm-up included)
        self._warm: dict = {}  # warm-up calls so far, by kind of input
        self.replays = 0
        self._key = None  # the captured kind of input
        self._stream: torch.cuda.Stream | None = None  # the warm-up calls' side stream
        self._xs: list[Tensor] = []
        self._names: list[str] = []
        self._stats: Tensor | None = None
        self._grads: list[Tensor | None] = []

    @property
    def captured(self) -> bool:
        """Whether the graph has been captured."""
        return self.graph is not None

    @staticmethod
    def _key_of(xs: tuple[Tensor, ...]) -> tuple:
        on = torch.is_autocast_enabled("cuda")
        return (tuple((tuple(x.shape), x.dtype, x.device) for x in xs), on,
                torch.get_autocast_dtype("cuda") if on else None)

    def _route(self, key) -> str:
        """What a CUDA call with inputs of kind ``key`` does: ``"warm"`` (a warm-up call, counted), ``"capture"``
        (the first kind to have had ``warmup`` warm-up calls), ``"replay"`` (the captured kind) or ``"eager"``
        (another kind, once a graph is captured)."""
        if self._key is not None:
            return "replay" if key == self._key else "eager"
        done = self._warm.get(key, 0)
        if done < self.warmup:
            self._warm[key] = done + 1
            return "warm"
        self._key = key
        return "capture"

    def __call__(self, *xs: Tensor) -> dict[str, Tensor]:
        if not xs[0].is_cuda:
            return self.fn(*xs)
        self.calls += 1
        route = self._route(self._key_of(xs))
        if route == "eager":
            return self.fn(*xs)  # another shape (an epoch's last batch): the graph is for the others
        if route == "warm":
            return self._side_stream(xs)
        if route == "capture":
            try:
                self._capture(xs)
            except BaseException:
                self._key = None  # no graph: the next call of this kind tries again
                raise
        for static, x in zip(self._xs, xs):
            static.copy_(x)
        self.graph.replay()
        self.replays += 1
        for p, g in zip(self.params, self._grads):
            p.grad = g
        return dict(zip(self._names, self._stats.clone().unbind()))

    def _side_stream(self, xs: tuple[Tensor, ...]) -> dict[str, Tensor]:
        main = torch.cuda.current_stream(xs[0].device)
        if self._stream is None or self._stream.device != xs[0].device:
            self._stream = torch.cuda.Stream(xs[0].device)
        side = self._stream
        side.wait_stream(main)
        with torch.cuda.stream(side):
            out = self.fn(*xs)
        main.wait_stream(side)
        bad = [k for k, v in out.items() if not (isinstance(v, Tensor) and v.dim() == 0)]
        if bad:  # checked here, on an eager call: an error inside the capture would leave it half made
            raise ValueError(f"CapturedStep: fn must return 0-d tensors; not so for {bad}")
        return out

    def _capture(self, xs: tuple[Tensor, ...]) -> None:
        self._xs = [x.detach().clone() for x in xs]
        graph = torch.cuda.CUDAGraph()
        for p in self.params:  # the graph's backward makes the gradients in its own memory
            p.grad = None
        autocast_on = torch.is_autocast_enabled("cuda")
        # thread_local: a data loader's pin-memory thread may allocate while this thread captures
        with torch.cuda.graph(graph, capture_error_mode="thread_local"), \
                torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), enabled=autocast_on,
                               cache_enabled=False):
            out = self.fn(*self._xs)
            self._names = list(out)
            self._stats = torch.stack([v.detach().float() for v in out.values()])
        self._grads = [p.grad for p in self.params]
        self.graph = graph

    def __getstate__(self) -> dict:  # a graph does not pickle: a copy captures its own
        state = self.__dict__.copy()
        state.update(graph=None, calls=0, _warm={}, replays=0, _key=None, _stream=None, _xs=[], _names=[], _stats=None,
                     _grads=[])
        return state
