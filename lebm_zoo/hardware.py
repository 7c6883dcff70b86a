"""What the CPU computes natively, read without touching the zoo's models: :func:`native_bf16` and :func:`cpu_info`.

Below :mod:`lebm_zoo.nets` (which picks kernels by it) and :mod:`lebm_zoo.precision` (the probe of ``lebm-zoo env``,
which times a generator step), so that neither imports the other's layer.
"""
from __future__ import annotations

import functools
import platform

import torch

__all__ = ["cpu_info", "cpu_name", "native_bf16"]

_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")


def _cpuinfo() -> tuple[str, set[str]]:
    """(model name, flags) from ``/proc/cpuinfo`` (Linux); ('', empty) elsewhere."""
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return platform.processor(), set()
    model, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and not model:
            model = value.strip()
        elif key.strip() in ("flags", "Features") and not flags:
            flags = set(value.split())
    return model, flags


@functools.lru_cache(maxsize=1)
def native_bf16() -> bool:
    """Whether this CPU computes bf16 natively as PyTorch's oneDNN sees it (AVX512-BF16 or AMX; ARM BF16).

    False means bf16 on the CPU is emulated (converted to fp32 and back around every operation): correct, but slow.
    """
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN: ATen's own kernels, emulated
        return False


def cpu_info() -> dict:
    """The CPU as the zoo sees it.

    Returns:
        ``{"model": str, "capability": str, "flags": {flag: bool}, "native_bf16": bool}``: the model name, ATen's
        vector capability (``torch.backends.cpu.get_cpu_capability()``: ``"AVX2"``, ``"AVX512"``, ...), the
        relevant ``/proc/cpuinfo`` flags (avx2, avx512f, avx512_bf16, amx_tile, amx_bf16), and :func:`native_bf16`.
    """
    model, flags = _cpuinfo()
    return {"model": model or platform.machine(), "capability": torch.backends.cpu.get_cpu_capability(),
            "flags": {f: f in flags for f in _FLAGS}, "native_bf16": native_bf16()}


def cpu_name() -> str:
    """The CPU's model name, as speed figures name it (``/proc/cpuinfo``, else what ``platform`` knows)."""
    return cpu_info()["model"] or platform.processor() or platform.machine()
