"""Small helpers shared by models, callbacks and datamodules."""
from __future__ import annotations

import torch

from lebm_zoo.errors import DataShapeError


def images_from_batch(batch) -> torch.Tensor:
    """Return the image tensor of a batch.

    Args:
        batch: either a tensor ``(B, C, H, W)`` or a ``(x, y, ...)`` tuple/list as torchvision datasets yield.

    Returns:
        the images, ``(B, C, H, W)``.

    Raises:
        TypeError: if the batch holds no tensor in first position.
    """
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    if isinstance(batch, dict) and isinstance(batch.get("x"), torch.Tensor):
        return batch["x"]
    raise TypeError(f"expected a batch of images (a tensor or an (x, y) pair), got {type(batch).__name__}")


def full_precision(x: torch.Tensor) -> torch.Tensor:
    """``x`` in at least float32: bf16/fp16 (autocast outputs) become float32; float32 and float64 stay as they are.

    Losses, energies and chain log-densities go through it, so that they are fp32 under bf16-mixed and keep float64
    in float64 runs (the reference-equivalence tests).
    """
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Map images in [-1, 1] (any float dtype) to uint8 in [0, 255], rounding to nearest."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def get_rng_state() -> dict:
    """The RNG states training draws from (torch CPU and CUDA, NumPy, Python), as plain tensors and lists that a
    weights-only checkpoint can hold."""
    import random

    import numpy as np

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos),
                                                        int(has_gauss), float(cached)],
             "python": list(random.getstate()[1]) + [random.getstate()[0]]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
        state["cuda_device"] = torch.cuda.current_device()  # the generator this process draws from
    return state


def set_rng_state(state: dict) -> None:
    """Restore the states saved by :func:`get_rng_state` (missing entries are left as they are).

    CUDA: the saved devices' states go to the devices of the same index that this process sees (a checkpoint saved
    where more GPUs were visible restores what fits), then the state of the device the saving process drew from goes
    to this process's current device, so a run resumed on another machine, or on another GPU index, continues that
    generator.
    """
    import random

    import numpy as np

    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu())
    if "numpy" in state:
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "python" in state:
        *internal, version = state["python"]
        random.setstate((version, tuple(internal), None))
    if "cuda" in state and torch.cuda.is_available():
        saved = state["cuda"]
        for index, device_state in enumerate(saved[:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(device_state, index)
        used = state.get("cuda_device")
        if used is not None and 0 <= used < len(saved) and torch.cuda.is_initialized():  # (a CPU run: CUDA unused)
            torch.cuda.set_rng_state(saved[used], torch.cuda.current_device())


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def tune_cpu_allocator(threshold_bytes: int = 1 << 30) -> bool:
    """Keep freed CPU memory in the process's heap instead of handing it back to the OS (glibc only).

    A Langevin chain allocates and frees the same multi-megabyte activation buffers at every step. By default glibc
    serves such buffers with ``mmap`` and returns them (and the top of the heap) to the OS on ``free``, so every step
    page-faults and zero-fills hundreds of megabytes again. This raises glibc's ``M_MMAP_THRESHOLD`` and
    ``M_TRIM_THRESHOLD`` so that those buffers are reused (the speed-up is measured in docs/speed.md). The math is
    untouched. The cost: the resident memory stays at its high-water mark instead of shrinking between steps (the
    peak is unchanged). It is the same fix as PyTorch's CPU tuning guide's advice to preload jemalloc or tcmalloc,
    without the extra library.
    ``lebm-zoo`` calls it at start-up (set ``LEBM_ZOO_CPU_ALLOCATOR=default`` to opt out); Python users call it once,
    before training.

    Args:
        threshold_bytes: allocations below this size come from the heap, and up to this much free memory is kept at
            its top. If glibc refuses so large a value, its largest accepted one (32 MiB on 64-bit Linux) is used.

    Returns:
        True if the allocator was tuned; False where there is no glibc (macOS, Windows, musl): nothing is changed.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    value = min(int(threshold_bytes), 2**31 - 1)
    if not mallopt(_M_MMAP_THRESHOLD, value):
        value = 32 << 20
        if not mallopt(_M_MMAP_THRESHOLD, value):
            return False
    return bool(mallopt(_M_TRIM_THRESHOLD, value))


# ------------------------------------------------------------------------------------------- input validation
# The public methods of every family check what users give them with these: wrong shapes, dtypes, scales
# and non-finite values raise :class:`lebm_zoo.models.base.DataShapeError` (a ValueError) naming the method, what was
# expected and how to fix it, instead of broadcasting into wrong results. A check costs at most one host-device
# synchronisation: one fused ``torch.aminmax`` reduction, whose min and max are NaN if any value is NaN and +-inf if
# any is infinite, so it also tells whether every value is finite. Shapes and counts cost none.

#: values this far outside [-1, 1] are still accepted (float rounding of scaled pixels)
RANGE_TOLERANCE = 1e-3


def _at(where: str) -> str:
    return f"{where}: " if where else ""


def in_training_loop(module) -> bool:
    """True while ``module``'s trainer runs the training loop (``fit``'s training stage; not its validation loop or
    sanity check, and not after ``fit``).

    The public methods that training steps call with data (``infer_latent`` of the latent-prior families, CoopNets'
    ``revise``) skip their data checks then: the batches were checked by ``data_from_batch`` / ``check_data_shape``
    (or made by the model), and the steps stay free of the checks' host synchronisations. Counts are always checked
    (they cost no synchronisation), and so is data in the validation, test and predict loops (metric callbacks).
    """
    trainer = getattr(module, "_trainer", None)
    return trainer is not None and bool(getattr(trainer, "training", False))


def check_count(n, name: str = "n", *, where: str = "", minimum: int = 1) -> int:
    """``n`` as an int, if it is an integer >= ``minimum`` (Python or NumPy ints, 0-dim integer tensors).

    Raises:
        ValueError: naming ``name`` and the value, for a non-integer (a float, a bool, None...) or one below
            ``minimum``.
    """
    import operator

    try:
        value = None if isinstance(n, bool) else operator.index(n)
    except TypeError:
        value = None
    if value is None:
        raise ValueError(f"{_at(where)}{name} must be an integer >= {minimum}, got {name}={n!r} ({type(n).__name__})")
    if value < minimum:
        raise ValueError(f"{_at(where)}{name} must be >= {minimum}, got {name}={value}")
    return value


def _value_range(tensors: list[torch.Tensor]) -> tuple[float, float]:
    """(min, max) over all ``tensors`` with one host synchronisation; NaN if any value is NaN, +-inf if infinite."""
    import functools

    dtype = functools.reduce(torch.promote_types, [t.dtype for t in tensors])
    stats = torch.stack([torch.stack(torch.aminmax(t.detach().reshape(-1))).to(dtype) for t in tensors])
    lo, hi = stats.cpu().unbind(1)  # the one synchronisation
    if lo.isnan().any() or hi.isnan().any():
        return float("nan"), float("nan")
    return float(lo.min()), float(hi.max())


def _check_finite_values(tensors: list[torch.Tensor], name: str, where: str) -> tuple[float, float]:
    import math

    lo, hi = _value_range(tensors)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        nan = sum(int(t.isnan().sum()) for t in tensors)
        inf = sum(int(t.isinf().sum()) for t in tensors)
        total = sum(t.numel() for t in tensors)
        raise DataShapeError(f"{_at(where)}{name} has non-finite values: {nan} NaN and {inf} inf of {total} "
                                "values. Remove or replace them (e.g. torch.nan_to_num) first.")
    return lo, hi


def _float_dtype(x: torch.Tensor, name: str, where: str, what: str, hint: str) -> None:
    if not x.is_floating_point():
        raise DataShapeError(f"{_at(where)}{name} has dtype {x.dtype}, but {what} must be floating-point. {hint}")


def check_images(x, channels: int, img_size: int, *, name: str = "x", where: str = "", batch: int | None = None,
                 value_range: tuple[float, float] | None = (-1.0, 1.0), tol: float = RANGE_TOLERANCE) -> torch.Tensor:
    """Check images given to a public method: shape ``(B, channels, img_size, img_size)``, B >= 1 (or ``batch``), a
    floating-point dtype, finite values within ``value_range`` (with tolerance ``tol``; None: any finite value, for
    chain states).

    One host synchronisation. Returns ``x`` unchanged.

    Raises:
        DataShapeError: naming ``where`` and ``name``, the expected and the given shape / dtype / values, and the fix
            (``x.unsqueeze(1)``, ``x.permute(0, 3, 1, 2)``, ``x.float() / 127.5 - 1``...).
    """
    expected = (channels, img_size, img_size)
    layout = f"(B, C, H, W) = (B, {channels}, {img_size}, {img_size})"
    if not isinstance(x, torch.Tensor):
        raise DataShapeError(f"{_at(where)}{name} must be a torch.Tensor of images {layout}, got "
                                f"{type(x).__name__}")
    shape = tuple(x.shape)
    if x.ndim != 4 or shape[1:] != expected:
        hint = ""
        if x.ndim == 3 and shape[1:] == (img_size, img_size) and channels == 1:
            hint = " Add the channel dimension: x.unsqueeze(1)."
        elif x.ndim == 3 and shape == expected:
            hint = " A single image: add the batch dimension, x.unsqueeze(0)."
        elif x.ndim == 4 and shape[1:] == (img_size, img_size, channels):
            hint = " The images look channels-last: x.permute(0, 3, 1, 2)."
        elif x.ndim == 4 and shape[2:] == (img_size, img_size):
            hint = (f" The model has channels={channels} but the images have {shape[1]}: convert them, or use a model "
                    f"built with channels={shape[1]}.")
        elif x.ndim == 4 and shape[1] == channels:
            hint = (f" The model has img_size={img_size} but the images are {shape[2]}x{shape[3]}: resize them, or "
                    "use a model built for that size.")
        raise DataShapeError(f"{_at(where)}{name} must be images of shape {layout}, got shape {shape}.{hint}")
    if batch is not None and shape[0] != batch:
        raise DataShapeError(f"{_at(where)}{name} must hold {batch} images, {layout} with B = {batch}, got shape "
                                f"{shape}")
    if shape[0] == 0:
        raise DataShapeError(f"{_at(where)}{name} is an empty batch, shape {shape}: give at least one image")
    _float_dtype(x, name, where, "images", "Convert 0..255 pixels to floats in [-1, 1] with x.float() / 127.5 - 1.")
    lo, hi = _check_finite_values([x], name, where)
    if value_range is not None:
        a, b = value_range
        if lo < a - tol or hi > b + tol:
            if hi > 1.5 and lo >= -tol:
                hint = "This looks like 0..255 pixels: scale to [-1, 1] with x / 127.5 - 1."
            else:
                hint = "Scale the images to [-1, 1] (x / 127.5 - 1 for 0..255 pixels, 2 * x - 1 for 0..1 pixels)."
            raise DataShapeError(f"{_at(where)}{name} has values in [{lo:.4g}, {hi:.4g}], but images must be in "
                                    f"[{a:g}, {b:g}]. {hint}")
    return x


def check_latents(z, nz, *, name: str = "z", where: str = "", batch: int | None = None):
    """Check latents given to a public method: ``(B, nz)`` floating-point with finite values, B >= 1 (or ``batch``).

    ``nz`` a sequence of layer sizes (hierarchical models): ``z`` is a list of ``(B, nz_l)`` tensors, one per layer,
    bottom first, or all of them packed in one ``(B, sum nz)`` tensor. One host synchronisation. Returns ``z``.

    Raises:
        DataShapeError: naming ``where`` and ``name``, the expected and the given shapes, dtype or values.
    """
    sizes = [int(nz)] if isinstance(nz, int) else [int(n) for n in nz]
    layers = len(sizes) > 1 or not isinstance(nz, int)
    if isinstance(z, torch.Tensor) or not layers:
        parts, wanted = [z], [sum(sizes)]
        layout = f"(B, nz) = (B, {sum(sizes)})" if not layers else (
            f"(B, sum nz) = (B, {sum(sizes)}) (packed layers of sizes {sizes}), or a list of (B, nz_l) tensors")
    else:
        parts, wanted = list(z), sizes
        layout = f"a list of {len(sizes)} tensors (B, nz_l) with nz = {sizes}, or one packed (B, {sum(sizes)})"
        if len(parts) != len(sizes):
            raise DataShapeError(f"{_at(where)}{name} must be {layout}, got a list of {len(parts)}")
    for part, size in zip(parts, wanted):
        if not isinstance(part, torch.Tensor):
            raise DataShapeError(f"{_at(where)}{name} must be latents {layout}, got {type(part).__name__}")
        if part.ndim != 2 or part.shape[1] != size:
            got = [tuple(p.shape) for p in parts] if len(parts) > 1 else tuple(part.shape)
            raise DataShapeError(f"{_at(where)}{name} must be latents {layout}, got shape {got}")
    rows = {p.shape[0] for p in parts}
    if len(rows) > 1:
        raise DataShapeError(f"{_at(where)}{name}: every layer needs the same batch size B, got shapes "
                                f"{[tuple(p.shape) for p in parts]}")
    (b,) = rows
    if batch is not None and b != batch:
        raise DataShapeError(f"{_at(where)}{name} must have B = {batch} rows (one per chain or item), got "
                                f"{[tuple(p.shape) for p in parts] if len(parts) > 1 else tuple(parts[0].shape)}")
    if b == 0:
        raise DataShapeError(f"{_at(where)}{name} is an empty batch (B = 0): give at least one latent")
    for part in parts:
        _float_dtype(part, name, where, "latents", "Convert them with z.float().")
    _check_finite_values(parts, name, where)
    return z


def check_tokens(tokens, vocab_size: int, mask=None, *, name: str = "tokens", where: str = "") -> torch.Tensor:
    """Check a token batch given to a public method: ``tokens`` ``(B, T)`` integer indices in ``[0, vocab_size)``,
    B, T >= 1, and ``mask`` (if given) a bool tensor of the same shape.

    One host synchronisation. Returns ``tokens``.

    Raises:
        DataShapeError: naming ``where`` and ``name``, the expected and the given shape, dtype or values.
    """
    layout = "{'tokens': (B, T) int64, 'mask': (B, T) bool}"
    if not isinstance(tokens, torch.Tensor):
        raise DataShapeError(f"{_at(where)}{name} must be a (B, T) tensor of token indices (a batch {layout}, "
                                f"or a list of strings), got {type(tokens).__name__}")
    if tokens.ndim != 2 or 0 in tokens.shape:
        raise DataShapeError(f"{_at(where)}{name} must be token indices of shape (B, T) with B, T >= 1 (a batch "
                                f"{layout}), got shape {tuple(tokens.shape)}")
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise DataShapeError(f"{_at(where)}{name} has dtype {tokens.dtype}, but token indices must be integers "
                                "(torch.long): encode strings with model.encode(texts), or convert with tokens.long().")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(tokens.shape):
            got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise DataShapeError(f"{_at(where)}the mask must have the tokens' shape {tuple(tokens.shape)}, got "
                                    f"{got}")
        if mask.dtype != torch.bool:
            raise DataShapeError(f"{_at(where)}the mask has dtype {mask.dtype}, but must be torch.bool (True on "
                                    "real tokens): convert it with mask.bool()")
    lo, hi = (int(v) for v in torch.stack(torch.aminmax(tokens.detach().reshape(-1))).cpu())
    if lo < 0 or hi >= vocab_size:
        raise DataShapeError(f"{_at(where)}{name} must be indices in [0, {vocab_size}) of the model's "
                                f"{vocab_size}-token vocabulary, got values in [{lo}, {hi}]: were they encoded with "
                                "another vocabulary? Encode strings with model.encode(texts).")
    return tokens
