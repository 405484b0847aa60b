"""Host -> device copies that never block the host.

A `non_blocking` copy from pageable host memory is staged synchronously by the driver, which makes
the host wait for the stream: a hidden sync inside a block. Staging through pinned memory makes the
copy truly asynchronous (torch's pinned allocator keeps the staging buffer alive until the copy ran).
"""
from __future__ import annotations

import torch


def pinned(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` staged in pinned memory when it is bound for a CUDA device, else `t` itself."""
    if device.type == "cuda" and t.device.type == "cpu" and not t.is_pinned():
        return t.pin_memory()
    return t


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    device = torch.device(device)
    return pinned(t, device).to(device, non_blocking=True)


def copy_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    dst.copy_(pinned(src, dst.device), non_blocking=True)
