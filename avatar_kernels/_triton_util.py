"""Shared plumbing of the Triton launchers: optional import, compilation at first launch, input checks.

Triton is optional (the eager references never need it). Kernels are written as plain module-level
functions and wrapped with `triton.jit` at their first launch, not at import: Triton decides between
compiling and interpreting (TRITON_INTERPRET=1) when `triton.jit` runs, so deciding late means the
mode is whatever the environment says when a kernel first runs, however early `avatar_kernels.*` was
imported (a test module that sets TRITON_INTERPRET works even if the model imported us first).
"""
from __future__ import annotations

import os
import types
from collections.abc import Callable

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only on installs without triton
    triton = None
    tl = None

_TRUE = ("1", "true", "on", "yes", "y")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Multiply-add contraction on, said explicitly: Triton 3.9 warns that its default flips in 3.10. The
# kernels want it (rotations and the softmax exponent are single FMAs, no accuracy is lost).
FP_FUSION = True


def triton_available() -> bool:
    return triton is not None


def interpreting() -> bool:
    """Whether Triton kernels launched now run in the interpreter (TRITON_INTERPRET set)."""
    if triton is None:
        return False
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUE


_compiled: dict[tuple[Callable, bool], object] = {}


def uses(*helpers: Callable):
    """Declare the plain functions a kernel calls: they are jitted together with it (`bind_helpers`),
    since Triton only calls jitted functions from a kernel."""
    def mark(kernel: Callable) -> Callable:
        kernel.triton_helpers = helpers
        return kernel
    return mark


def bind_helpers(fn: Callable, jit: Callable) -> Callable:
    """`fn` with the helpers it `uses` replaced by `jit(helper)` in a copy of its globals (the module
    keeps the plain functions, so the choice of jit - compile or interpret - stays late)."""
    helpers = getattr(fn, "triton_helpers", ())
    if not helpers:
        return fn
    scope = dict(fn.__globals__)
    for helper in helpers:
        scope[helper.__name__] = jit(bind_helpers(helper, jit))
    bound = types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__, fn.__closure__)
    bound.__qualname__, bound.__module__, bound.__doc__ = fn.__qualname__, fn.__module__, fn.__doc__
    return bound


def compiled(fn: Callable):
    """`triton.jit(fn)` (and of the helpers it `uses`) for the current mode, built once per
    (function, mode)."""
    if triton is None:
        raise RuntimeError("the Triton kernels need the `triton` package (pip install triton)")
    key = (fn, interpreting())
    if key not in _compiled:
        _compiled[key] = triton.jit(bind_helpers(fn, triton.jit))
    return _compiled[key]


def check_launchable(op: str, device: torch.device) -> None:
    """Raise a clear error when a Triton kernel cannot run on `device`."""
    if triton is None:
        raise RuntimeError(f"{op}: the Triton kernels need the `triton` package (pip install triton)")
    if device.type == "cpu":
        if not interpreting():
            raise ValueError(f"{op}: tensors are on the CPU; Triton runs there only in its interpreter "
                             "(set TRITON_INTERPRET=1 before the first kernel launch)")
    elif device.type != "cuda":
        raise ValueError(f"{op}: Triton kernels run on CUDA devices (or the CPU interpreter), got {device}")


def check_same_device(op: str, **tensors: torch.Tensor) -> torch.device:
    devices = {name: t.device for name, t in tensors.items()}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        raise ValueError(f"{op}: all tensors must be on one device, got {devices}")
    return first


def check_dtype(op: str, name: str, t: torch.Tensor, allowed: tuple[torch.dtype, ...]) -> None:
    if t.dtype not in allowed:
        raise TypeError(f"{op}: {name} must have dtype in {[str(d) for d in allowed]}, got {t.dtype}")


def check_shape(op: str, name: str, t: torch.Tensor, expected: tuple[int, ...]) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{op}: {name} must have shape {tuple(expected)}, got {tuple(t.shape)}")


def check_last_dim_contiguous(op: str, name: str, t: torch.Tensor) -> None:
    """Kernels vectorise along the last dim and take every other stride as an argument."""
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{op}: {name} needs a contiguous last dimension (stride 1), got strides "
                         f"{tuple(t.stride())}; pass a .contiguous() tensor")


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def row_warps(block: int) -> int:
    """Warps for a one-row program: about 16 elements a thread (two 16-byte loads of bf16)."""
    return max(1, min(16, block // 512))


def cdiv(a: int, b: int) -> int:
    return -(-a // b)
