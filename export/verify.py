"""Verification of exported programs against the eager model, on fresh random inputs.

Error measures, per output tensor:
- `max_abs`: max |out - ref|,
- `rel`: max_abs / max |ref| (relative to the output's scale; element-wise relative error is
  meaningless where the reference crosses zero).
A check passes when `rel <= tolerance(dtype)`: 1e-4 for fp32 (exports reorder fp32 math, e.g.
fused LayerNorm or Einsum contraction order, so bit equality is not expected), 1e-2 for fp16 and
4e-2 for bf16 (one to a few ulps of the output scale after a deep network).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .stages import Stage

Program = Callable[..., tuple[torch.Tensor, ...]]

TOLERANCES = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2}


def tolerance(dtype: torch.dtype) -> float:
    try:
        return TOLERANCES[dtype]
    except KeyError:
        raise ValueError(f"no verification tolerance for dtype {dtype}") from None


@dataclass(frozen=True)
class ErrorStats:
    max_abs: float
    rel: float

    @classmethod
    def of(cls, ref: torch.Tensor, out: torch.Tensor) -> ErrorStats:
        if ref.shape != out.shape:
            raise ValueError(f"shape mismatch: reference {tuple(ref.shape)}, export {tuple(out.shape)}")
        if ref.numel() == 0:
            return cls(0.0, 0.0)
        if not torch.isfinite(out).all():
            return cls(float("inf"), float("inf"))
        ref64, out64 = ref.detach().double().cpu(), out.detach().double().cpu()
        max_abs = (out64 - ref64).abs().max().item()
        scale = ref64.abs().max().item()
        return cls(max_abs, max_abs / scale if scale > 0 else max_abs)


@dataclass(frozen=True)
class Check:
    stage: str
    backend: str
    output: str
    stats: ErrorStats
    tol: float

    @property
    def ok(self) -> bool:
        return self.stats.rel <= self.tol


def compare_outputs(stage: str, backend: str, names: Sequence[str], ref: Sequence[torch.Tensor],
                    out: Sequence[torch.Tensor], tol: float) -> list[Check]:
    if len(ref) != len(out):
        raise ValueError(f"{stage} ({backend}): {len(out)} outputs, the reference has {len(ref)}")
    checks = []
    for name, r, o in zip(names, ref, out):
        try:
            stats = ErrorStats.of(r, o)
        except ValueError as e:
            raise ValueError(f"{stage} ({backend}) output {name!r}: {e}") from None
        checks.append(Check(stage, backend, name, stats, tol))
    return checks


def check_program(stage: Stage, program: Program, backend: str, seed: int = 1,
                  tol: float | None = None) -> list[Check]:
    """Run `program` and the eager reference on the same fresh random inputs (`seed`), per output."""
    inputs = stage.example_inputs(seed)
    with torch.no_grad():
        ref = stage.reference(*inputs)
        out = program(*inputs)
    tol = tolerance(inputs[0].dtype) if tol is None else tol
    return compare_outputs(stage.name, backend, stage.output_names, ref, out, tol)


def check_streaming_decode(reference_vae, decode_first: Program, decode_step: Program, latents: torch.Tensor,
                           backend: str, block_frames: int = 3, tol: float | None = None) -> list[Check]:
    """Decode `latents` [B, z, N, h, w] block by block, carrying the cache through the exported
    programs only, and compare every block's frames with the eager streaming decode.

    Errors compound through the carried cache here, which single-step checks cannot show."""
    from runtime.models.vae import StreamingVAEDecoder

    tol = tolerance(latents.dtype) if tol is None else tol
    eager = StreamingVAEDecoder(reference_vae, batch=latents.shape[0])
    checks = []
    cache = None
    with torch.no_grad():
        for b, start in enumerate(range(0, latents.shape[2], block_frames)):
            block = latents[:, :, start:start + block_frames]
            ref = eager.decode(block)
            parts = []
            for i in range(block.shape[2]):
                step_out = (decode_first(block[:, :, i:i + 1]) if cache is None
                            else decode_step(block[:, :, i:i + 1], *cache))
                parts.append(step_out[0])
                cache = step_out[1:]
            checks += compare_outputs("vae_stream", backend, [f"block {b} frames"], [ref],
                                      [torch.cat(parts, dim=2)], tol)
    return checks


def worst_per_stage(checks: Sequence[Check]) -> list[Check]:
    """One check per (stage, backend): the output with the largest relative error (first-seen order)."""
    worst: dict[tuple[str, str], Check] = {}
    for c in checks:
        key = (c.stage, c.backend)
        if key not in worst or c.stats.rel > worst[key].stats.rel:
            worst[key] = c
    return list(worst.values())


def format_table(checks: Sequence[Check], summarize: bool = True) -> str:
    """A plain-text table: stage, backend, output, max abs error, relative error, tolerance, verdict.

    `summarize` keeps the worst output of each (stage, backend) pair (the VAE steps have dozens of
    cache outputs); the row then names that output and how many were checked."""
    counts: dict[tuple[str, str], int] = {}
    for c in checks:
        counts[(c.stage, c.backend)] = counts.get((c.stage, c.backend), 0) + 1
    shown = worst_per_stage(checks) if summarize else list(checks)
    header = ("stage", "backend", "worst output" if summarize else "output", "max_abs", "rel", "tol", "ok")

    def label(c: Check) -> str:
        n = counts[(c.stage, c.backend)]
        return f"{c.output} (of {n})" if summarize and n > 1 else c.output

    rows = [(c.stage, c.backend, label(c), f"{c.stats.max_abs:.3e}", f"{c.stats.rel:.3e}", f"{c.tol:.0e}",
             "yes" if c.ok else "NO") for c in shown]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(v).ljust(w) for v, w in zip(r, widths))
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])
