"""ONNX export of the stages (`torch.onnx.export(..., dynamo=True)`) and an onnxruntime runner.

Every op of the stages has an ONNX form; nothing needs a custom domain:
- the KV write is one batched index_put (ScatterND with a [B, F, 2] index; see `ExportOps`),
- window attention is the reference formulation (RoPE as Sin/Cos/Mul, Einsum, masked Softmax),
- the VAE's 2x upsampling is one Resize (the stages swap the VAE's nearest-exact module for the
  identical-at-scale-2 "nearest" one, see `stages.NearestUp2x`; nearest-exact would export as a
  GatherND over a constant index), RMS_norm is ReduceL2/Div, the causal convs are 3-D Conv.
The Triton kernels of `avatar_kernels/` are not embedded: an exported graph carries their reference math,
and a graph compiler (TensorRT) does its own fusion. That is the documented fallback for them.

Weights above `EXTERNAL_DATA_BYTES` are written next to the graph (`<name>.onnx.data`), because a
single protobuf cannot exceed 2 GB (the 1.3B DiT step does).
"""
from __future__ import annotations

import hashlib
import logging
import warnings
from pathlib import Path

import torch

from .stages import Stage

log = logging.getLogger(__name__)

EXTERNAL_DATA_BYTES = 1 << 30


def export_onnx(stage: Stage, path: str | Path, program: torch.export.ExportedProgram | None = None,
                seed: int = 0, opset: int | None = None) -> Path:
    """Write `stage` as ONNX to `path`. Pass the stage's ExportedProgram to skip a second trace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    args = stage.example_inputs(seed)
    model = program if program is not None else stage.module.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation chatter, not about our graph
        onnx_program = torch.onnx.export(model, args, dynamo=True, input_names=list(stage.input_names),
                                         output_names=list(stage.output_names), opset_version=opset)
    weight_bytes = sum(p.numel() * p.element_size() for p in stage.module.state_dict().values())
    onnx_program.save(str(path), external_data=weight_bytes > EXTERNAL_DATA_BYTES)
    return path


def onnx_files(path: str | Path) -> list[Path]:
    """The graph file and every external-data file it references."""
    import onnx

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    extra = set()
    for init in model.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                extra.add(path.parent / entry.value)
    return [path, *sorted(extra)]


def onnx_sha256(path: str | Path) -> str:
    """Hash of the graph and its weights (external data included): changes if either changes."""
    h = hashlib.sha256()
    for f in onnx_files(path):
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                h.update(chunk)
    return h.hexdigest()


class OrtProgram:
    """An ONNX graph run by onnxruntime, called like the stage (torch tensors in and out).

    Tensors cross the host as numpy arrays: this runner is for verification and CPU use, not the
    GPU hot path (TensorRT is). bfloat16 has no numpy type, so bf16 graphs are not runnable here."""

    backend = "onnxruntime"

    def __init__(self, path: str | Path, name: str | None = None, providers: list[str] | None = None):
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no ONNX graph")
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only
        self.session = ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])
        self.name = name or path.stem
        self.input_names = tuple(i.name for i in self.session.get_inputs())
        self.output_names = tuple(o.name for o in self.session.get_outputs())

    def __call__(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if len(args) != len(self.input_names):
            raise ValueError(f"stage {self.name!r} takes {len(self.input_names)} inputs "
                             f"({', '.join(self.input_names)}), got {len(args)}")
        if any(a.dtype == torch.bfloat16 for a in args):
            raise TypeError(f"stage {self.name!r}: onnxruntime via numpy cannot take bfloat16 inputs")
        feeds = {n: a.detach().cpu().contiguous().numpy() for n, a in zip(self.input_names, args)}
        outs = self.session.run(None, feeds)
        device = args[0].device
        return tuple(torch.from_numpy(o).to(device) for o in outs)
