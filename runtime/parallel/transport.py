"""Non-blocking point-to-point transfers between pipeline ranks (torch.distributed), both families."""
from __future__ import annotations

import contextlib
from collections import deque

import torch
import torch.distributed as dist


class Incoming:
    """A posted receive; `wait()` returns the filled buffer (on GPU: orders the current stream after it)."""

    def __init__(self, work, buf: torch.Tensor):
        self.work, self.buf = work, buf

    def wait(self) -> torch.Tensor:
        self.work.wait()
        return self.buf


class Transport:
    """Non-blocking point-to-point sends and receives; sent tensors are kept alive until delivered."""

    def __init__(self, device: torch.device, meta_group):
        self.device, self.meta = device, meta_group
        # On GPU the data transfers are issued from their own stream, never from the compute stream.
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._sends: deque = deque()

    def _comm_stream(self):
        if self.stream is None:
            return contextlib.nullcontext()
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # the tensor must exist first
        return torch.cuda.stream(self.stream)

    def send(self, tensor: torch.Tensor, dst: int, tag: int, meta: bool = False) -> None:
        t = tensor.detach().contiguous()
        if meta:
            work = dist.isend(t, dst, group=self.meta, tag=tag)
        else:
            with self._comm_stream():
                work = dist.isend(t, dst, tag=tag)
        self._sends.append((work, t))
        while self._sends and self._sends[0][0].is_completed():
            self._sends.popleft()

    def recv(self, shape, dtype: torch.dtype, src: int, tag: int, meta: bool = False) -> Incoming:
        if meta:
            buf = torch.empty(shape, dtype=dtype)
            return Incoming(dist.irecv(buf, src, group=self.meta, tag=tag), buf)
        buf = torch.empty(shape, dtype=dtype, device=self.device)
        with self._comm_stream():
            return Incoming(dist.irecv(buf, src, tag=tag), buf)

    def drain(self) -> None:
        while self._sends:
            self._sends.popleft()[0].wait()


