"""Checkpoint -> static graphs: fixed-shape stage wrappers, torch.export / ONNX export, TensorRT
engines (optional), verification against eager, and a runner that plays a session from them.

    from export import export_artifacts, build_exported_engine
    export_artifacts("tiny", "artifacts/tiny")              # every stage, verified
    engine = build_exported_engine("artifacts/tiny")        # a runtime.Engine on the exported programs

Submodules import torch-heavy code lazily; `export.tensorrt` never needs TensorRT to import.
"""

__all__ = ["ExportedArtifacts", "Manifest", "build_exported_engine", "build_stages", "export_artifacts"]


def __getattr__(name):
    if name == "build_stages":
        from .stages import build_stages
        return build_stages
    if name == "export_artifacts":
        from .cli import export_artifacts
        return export_artifacts
    if name in ("build_exported_engine", "ExportedArtifacts", "Manifest"):
        from . import runner
        return getattr(runner, name)
    raise AttributeError(name)
