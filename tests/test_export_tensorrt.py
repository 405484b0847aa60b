"""TensorRT layer: the engine cache key and on-disk cache run anywhere (no TensorRT needed); building
and running engines needs `tensorrt` and a GPU and is skipped otherwise."""
import dataclasses
import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from export import tensorrt as trt_export
from export.tensorrt import EngineCache, engine_key, onnx_input_signature

HAS_TRT = trt_export.tensorrt_available()
needs_trt_gpu = pytest.mark.skipif(not (HAS_TRT and torch.cuda.is_available()),
                                   reason="needs the tensorrt package and a CUDA GPU")

MACHINE = {"gpu_name": "NVIDIA H100 80GB HBM3", "compute_capability": (9, 0), "tensorrt_version": "10.7.0",
           "cuda_version": "12.6", "torch_version": "2.6.0"}


def _tiny_onnx(path, weight: float = 0.5, dynamic: bool = False):
    """y = x * w + 1 with an int32 side input: a real graph file with one initializer."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n" if dynamic else 2, 3])
    idx = helper.make_tensor_value_info("slots", TensorProto.INT32, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    w = numpy_helper.from_array(np.full((2, 3), weight, dtype=np.float32), "w")
    one = numpy_helper.from_array(np.ones((2, 3), dtype=np.float32), "one")
    nodes = [helper.make_node("Mul", ["x", "w"], ["xw"]), helper.make_node("Add", ["xw", "one"], ["y"])]
    graph = helper.make_graph(nodes, "tiny", [x, idx], [y], [w, one])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _key(path, **changes):
    return dataclasses.replace(engine_key(path, "fp16", **MACHINE), **changes)


def test_signature_reads_static_shapes_and_dtypes(tmp_path):
    path = _tiny_onnx(tmp_path / "g.onnx")
    assert onnx_input_signature(path) == (("x", (2, 3), "float32"), ("slots", (2,), "int32"))
    with pytest.raises(ValueError, match="dynamic dimension 'n'"):
        onnx_input_signature(_tiny_onnx(tmp_path / "d.onnx", dynamic=True))


def test_key_is_stable_and_covers_every_field(tmp_path):
    path = _tiny_onnx(tmp_path / "g.onnx")
    base = _key(path)
    assert base.digest == _key(path).digest
    changed = {"gpu_name": "NVIDIA H200", "compute_capability": (8, 9), "tensorrt_version": "10.8.0",
               "cuda_version": "12.8", "torch_version": "2.7.0", "precision": "bf16",
               "shapes": (("x", (4, 3), "float32"),), "weights_sha256": "0" * 64}
    digests = {base.digest}
    for field, value in changed.items():
        digests.add(_key(path, **{field: value}).digest)
    assert len(digests) == 1 + len(changed)  # every field changes the key


def test_key_follows_the_weights(tmp_path):
    a = _key(_tiny_onnx(tmp_path / "a.onnx", weight=0.5))
    b = _key(_tiny_onnx(tmp_path / "b.onnx", weight=0.25))  # same graph and shapes, other weights
    assert a.shapes == b.shapes and a.weights_sha256 != b.weights_sha256 and a.digest != b.digest


def test_key_rejects_unknown_precision(tmp_path):
    with pytest.raises(ValueError, match="precision"):
        engine_key(_tiny_onnx(tmp_path / "g.onnx"), "int4", **MACHINE)


def test_cache_round_trip_and_mismatch(tmp_path):
    key = _key(_tiny_onnx(tmp_path / "g.onnx"))
    cache = EngineCache(tmp_path / "cache")
    assert cache.load(key, "vae_decode_step") is None
    path = cache.store(key, "vae_decode_step", b"engine-bytes")
    assert path.name.startswith("vae_decode_step-") and path.suffix == ".engine"
    assert cache.load(key, "vae_decode_step") == b"engine-bytes"
    assert cache.load(dataclasses.replace(key, precision="bf16"), "vae_decode_step") is None
    # a sidecar that does not hold this exact key (hand-copied file, digest collision): not trusted
    sidecar = path.with_suffix(".json")
    stored = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps(dict(stored, torch_version="0.0")))
    assert cache.load(key, "vae_decode_step") is None
    sidecar.write_text("{not json")
    assert cache.load(key, "vae_decode_step") is None
    assert not list((tmp_path / "cache").glob(".*.tmp"))  # atomic writes leave nothing behind


def test_default_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("AVATAR_TRT_CACHE", str(tmp_path))
    assert EngineCache().root == tmp_path


@pytest.mark.skipif(HAS_TRT, reason="tensorrt is installed")
def test_without_tensorrt_errors_are_clear(tmp_path):
    path = _tiny_onnx(tmp_path / "g.onnx")
    with pytest.raises(ImportError, match="TensorRT is not installed"):
        trt_export.build_serialized_engine(path)
    with pytest.raises(ImportError, match="TensorRT is not installed"):
        trt_export.TRTProgram(b"", "g")


# ---- real engines (GPU + tensorrt) -------------------------------------------------------------

@pytest.mark.gpu
@needs_trt_gpu
def test_tiny_graph_engine_runs(tmp_path):
    path = _tiny_onnx(tmp_path / "g.onnx")
    data = trt_export.engine_for_onnx(path, precision="fp32", cache_dir=tmp_path / "cache")
    assert trt_export.engine_for_onnx(path, precision="fp32", cache_dir=tmp_path / "cache") == data  # cached
    program = trt_export.TRTProgram(data, "g", ["x", "slots"], ["y"])
    x = torch.randn(2, 3, device="cuda")
    (y,) = program(x, torch.zeros(2, dtype=torch.int32, device="cuda"))
    torch.testing.assert_close(y, x * 0.5 + 1)


@pytest.mark.gpu
@needs_trt_gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_vae_decode_engines_match_eager(tmp_path, precision):
    from export.cli import export_artifacts
    from export.verify import check_streaming_decode, tolerance
    from runtime import Engine

    result = export_artifacts("tiny", tmp_path / "art", tensorrt=True, precision=precision,
                              trt_cache_dir=tmp_path / "cache")
    assert result.ok, [(c.stage, c.backend, c.output, c.stats) for c in result.checks if not c.ok]
    from export.runner import load_programs
    programs = load_programs(tmp_path / "art", "tensorrt", trt_precision=precision, trt_cache_dir=tmp_path / "cache")
    eager = Engine.from_pretrained("tiny", device="cpu", dtype=torch.float32)
    z = torch.randn(1, 16, 12, *eager.config.latent_hw, generator=torch.Generator().manual_seed(3))
    tol = tolerance({"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision])
    checks = check_streaming_decode(eager.vae, programs["vae_decode_first"], programs["vae_decode_step"], z,
                                    f"tensorrt-{precision}", tol=tol)
    assert all(c.ok for c in checks), [c.stats for c in checks]
