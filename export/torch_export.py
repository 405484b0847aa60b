"""torch.export of the stage wrappers to `.pt2` files, and those files back as callables.

A program is traced once at the stage's fixed shapes with `strict=False` (the model code is plain
PyTorch; non-strict tracing runs it as Python, so no dynamo-unsupported construct matters). Integer
plan tensors are real inputs, never baked in: one program serves every block of a stream.

`.pt2` files are loaded with `torch.export.load`; load only artifacts you produced or trust.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.export.passes

from .stages import Stage

log = logging.getLogger(__name__)


def export_program(stage: Stage, seed: int = 0) -> torch.export.ExportedProgram:
    """Trace `stage` at its fixed shapes (example inputs from `seed`)."""
    args = stage.example_inputs(seed)
    with torch.no_grad():
        return torch.export.export(stage.module.eval(), args, strict=False)


def save_program(program: torch.export.ExportedProgram, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, str(path))
    return path


def _as_tuple(out) -> tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


class TorchProgram:
    """An exported program called like the stage: positional tensors in, a tuple of tensors out."""

    backend = "torch.export"

    def __init__(self, program: torch.export.ExportedProgram, name: str,
                 input_names: tuple[str, ...], output_names: tuple[str, ...]):
        self.program = program
        self.module = program.module()
        self.name, self.input_names, self.output_names = name, tuple(input_names), tuple(output_names)

    @classmethod
    def load(cls, path: str | Path, name: str, input_names, output_names,
             device: torch.device | str | None = None) -> TorchProgram:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no exported program for stage {name!r}")
        program = torch.export.load(str(path))
        if device is not None:
            # Weights and device constants of the graph move together (plain .to() would miss the latter).
            program = torch.export.passes.move_to_device_pass(program, torch.device(device))
        return cls(program, name, input_names, output_names)

    def __call__(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if len(args) != len(self.input_names):
            raise ValueError(f"stage {self.name!r} takes {len(self.input_names)} inputs "
                             f"({', '.join(self.input_names)}), got {len(args)}")
        with torch.no_grad():
            return _as_tuple(self.module(*args))
