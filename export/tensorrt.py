"""TensorRT engines built from the exported ONNX graphs, cached on disk, run with torch tensors.

`tensorrt` is an optional extra (`pip install .[tensorrt]`): it is imported lazily, only by the
functions that build or run an engine, so this module imports anywhere; `tensorrt_available()`
says whether it can be used.

Cache: an engine is only valid for the GPU architecture, TensorRT version and build settings it
was built with, so it is stored under a key of
    GPU name + compute capability, TensorRT / CUDA / torch versions, precision,
    the graph's input shapes and dtypes, and the SHA-256 of the ONNX graph and its weights,
as `<cache_dir>/<stem>-<digest>.engine` next to a `.json` sidecar holding the full key (checked on
load, so a digest collision or a hand-copied file is rebuilt rather than trusted). The cache directory
is `$AVATAR_TRT_CACHE`, else `~/.cache/avatar-runtime/tensorrt`.

Precision: "fp16" / "bf16" set the builder flag on the fp32 ONNX graph, letting TensorRT run layers
in that type where it chooses (I/O stays fp32); "fp32" builds a full-precision engine (TF32 off).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "bf16")
DEFAULT_WORKSPACE_BYTES = 4 << 30


def tensorrt_available() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


def _import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as e:
        raise ImportError("TensorRT is not installed: `pip install .[tensorrt]` (TensorRT >= 10) to build or "
                          "run engines; without it the runtime uses the torch.export programs") from e
    if int(trt.__version__.split(".")[0]) < 10:
        raise ImportError(f"TensorRT {trt.__version__} found; the name-based I/O API used here needs >= 10")
    return trt


def default_cache_dir() -> Path:
    env = os.environ.get("AVATAR_TRT_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "avatar-runtime" / "tensorrt"


# ---- cache key --------------------------------------------------------------------------------

@dataclass(frozen=True)
class EngineKey:
    gpu_name: str
    compute_capability: tuple[int, int]
    tensorrt_version: str
    cuda_version: str
    torch_version: str
    precision: str
    shapes: tuple[tuple[str, tuple[int, ...], str], ...]  # (input name, shape, dtype), graph order
    weights_sha256: str                                   # of the ONNX graph + weights

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")

    def as_json(self) -> dict:
        return json.loads(json.dumps(asdict(self)))  # tuples -> lists, as stored in the sidecar

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.as_json(), sort_keys=True).encode()).hexdigest()

    def filename(self, stem: str) -> str:
        return f"{stem}-{self.digest[:20]}.engine"


def onnx_input_signature(path: str | Path) -> tuple[tuple[str, tuple[int, ...], str], ...]:
    """(name, static shape, numpy dtype name) of each graph input; symbolic dims are rejected."""
    import onnx
    from onnx.helper import tensor_dtype_to_np_dtype

    model = onnx.load(str(path), load_external_data=False)
    sig = []
    for inp in model.graph.input:
        tt = inp.type.tensor_type
        dims = []
        for d in tt.shape.dim:
            if not d.HasField("dim_value"):
                raise ValueError(f"{path}: input {inp.name!r} has a dynamic dimension {d.dim_param!r}; "
                                 "engines are built for the fixed stage shapes")
            dims.append(d.dim_value)
        sig.append((inp.name, tuple(dims), tensor_dtype_to_np_dtype(tt.elem_type).name))
    return tuple(sig)


def cuda_device_info(index: int | None = None) -> tuple[str, tuple[int, int]]:
    """(name, compute capability) of CUDA device `index` (default: the current one)."""
    if not torch.cuda.is_available():
        raise RuntimeError("TensorRT engines need a CUDA GPU; none is available")
    index = torch.cuda.current_device() if index is None else index
    return torch.cuda.get_device_name(index), tuple(torch.cuda.get_device_capability(index))


def engine_key(onnx_path: str | Path, precision: str, *, gpu_name: str | None = None,
               compute_capability: tuple[int, int] | None = None, tensorrt_version: str | None = None,
               cuda_version: str | None = None, torch_version: str | None = None) -> EngineKey:
    """The cache key of an engine for `onnx_path`; unspecified fields are read from this machine."""
    from .onnx_export import onnx_sha256

    if gpu_name is None or compute_capability is None:
        name, cc = cuda_device_info()
        gpu_name = gpu_name or name
        compute_capability = compute_capability or cc
    if tensorrt_version is None:
        tensorrt_version = _import_tensorrt().__version__
    return EngineKey(gpu_name=gpu_name, compute_capability=tuple(compute_capability),
                     tensorrt_version=tensorrt_version,
                     cuda_version=cuda_version or (torch.version.cuda or "none"),
                     torch_version=torch_version or torch.__version__, precision=precision,
                     shapes=onnx_input_signature(onnx_path), weights_sha256=onnx_sha256(onnx_path))


class EngineCache:
    """Serialized engines on disk, each with a JSON sidecar holding its full key."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else default_cache_dir()

    def path_for(self, key: EngineKey, stem: str) -> Path:
        return self.root / key.filename(stem)

    def load(self, key: EngineKey, stem: str) -> bytes | None:
        path = self.path_for(key, stem)
        sidecar = path.with_suffix(".json")
        if not path.is_file() or not sidecar.is_file():
            return None
        try:
            stored = json.loads(sidecar.read_text())
        except json.JSONDecodeError:
            log.warning("TensorRT cache: unreadable sidecar %s, rebuilding", sidecar)
            return None
        if stored != key.as_json():
            log.warning("TensorRT cache: %s was built for a different key, rebuilding", path.name)
            return None
        return path.read_bytes()

    def store(self, key: EngineKey, stem: str, data: bytes) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.path_for(key, stem)
        # Write-then-rename, engine before sidecar: a reader never sees a half-written engine
        # under a valid sidecar (concurrent builders just write the same bytes twice).
        for target, payload in ((path, data), (path.with_suffix(".json"),
                                               json.dumps(key.as_json(), indent=2).encode())):
            tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            tmp.write_bytes(payload)
            os.replace(tmp, target)
        return path


# ---- build ------------------------------------------------------------------------------------

def _logger(trt):
    return trt.Logger(trt.Logger.WARNING)


def build_serialized_engine(onnx_path: str | Path, precision: str = "fp16",
                            workspace_bytes: int = DEFAULT_WORKSPACE_BYTES) -> bytes:
    """Parse `onnx_path` (external weights next to it are found by path) and build an engine."""
    trt = _import_tensorrt()
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    logger = _logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "\n".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}:\n{errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)
    else:
        config.clear_flag(trt.BuilderFlag.TF32)  # fp32 means fp32: comparable with the eager reference
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine for {onnx_path} ({precision}); see its log above")
    return bytes(serialized)


def engine_for_onnx(onnx_path: str | Path, precision: str = "fp16", cache_dir: str | Path | None = None,
                    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES) -> bytes:
    """The serialized engine for `onnx_path` on this GPU: from the cache, or built and cached."""
    onnx_path = Path(onnx_path)
    key = engine_key(onnx_path, precision)
    cache = EngineCache(cache_dir)
    data = cache.load(key, onnx_path.stem)
    if data is not None:
        log.info("TensorRT: cached engine %s for %s", cache.path_for(key, onnx_path.stem).name, onnx_path.name)
        return data
    log.info("TensorRT %s: building a %s engine for %s on %s (sm %d.%d)", key.tensorrt_version, precision,
             onnx_path.name, key.gpu_name, *key.compute_capability)
    data = build_serialized_engine(onnx_path, precision, workspace_bytes)
    cache.store(key, onnx_path.stem, data)
    return data


# ---- run --------------------------------------------------------------------------------------

def _torch_dtype(trt, dt) -> torch.dtype:
    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16,
             trt.DataType.BF16: torch.bfloat16, trt.DataType.INT32: torch.int32,
             trt.DataType.INT64: torch.int64, trt.DataType.BOOL: torch.bool,
             trt.DataType.INT8: torch.int8, trt.DataType.UINT8: torch.uint8}
    if dt not in table:
        raise TypeError(f"TensorRT tensor type {dt} has no torch equivalent here")
    return table[dt]


class TRTProgram:
    """A TensorRT engine called like the stage: torch CUDA tensors in (positional, in `input_names`
    order), a tuple of fresh torch tensors out, enqueued on the current torch stream."""

    backend = "tensorrt"

    def __init__(self, engine: bytes | str | Path, name: str, input_names=None, output_names=None):
        trt = _import_tensorrt()
        data = Path(engine).read_bytes() if isinstance(engine, (str, Path)) else engine
        self.name = name
        self._runtime = trt.Runtime(_logger(trt))
        self.engine = self._runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            raise RuntimeError(f"stage {name!r}: the TensorRT engine could not be deserialized "
                               "(built by another TensorRT version or for another GPU?)")
        self.context = self.engine.create_execution_context()
        io = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in io}
        self.input_names = tuple(input_names or [n for n in io if is_input[n]])
        self.output_names = tuple(output_names or [n for n in io if not is_input[n]])
        if sorted(self.input_names) != sorted(n for n in io if is_input[n]):
            raise ValueError(f"stage {name!r}: engine inputs {[n for n in io if is_input[n]]} do not match "
                             f"{list(self.input_names)}")
        self.spec = {n: (tuple(self.engine.get_tensor_shape(n)), _torch_dtype(trt, self.engine.get_tensor_dtype(n)))
                     for n in io}

    def __call__(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if len(args) != len(self.input_names):
            raise ValueError(f"stage {self.name!r} takes {len(self.input_names)} inputs, got {len(args)}")
        device = torch.device("cuda", torch.cuda.current_device())
        keep = []  # converted inputs must outlive the enqueue
        for name, a in zip(self.input_names, args):
            shape, dtype = self.spec[name]
            if tuple(a.shape) != shape:
                raise ValueError(f"stage {self.name!r} input {name!r}: shape {tuple(a.shape)}, engine expects {shape}")
            a = a.to(device=device, dtype=dtype).contiguous()
            keep.append(a)
            self.context.set_tensor_address(name, a.data_ptr())
        outs = []
        for name in self.output_names:
            shape, dtype = self.spec[name]
            out = torch.empty(shape, dtype=dtype, device=device)
            outs.append(out)
            self.context.set_tensor_address(name, out.data_ptr())
        if not self.context.execute_async_v3(torch.cuda.current_stream(device).cuda_stream):
            raise RuntimeError(f"stage {self.name!r}: TensorRT execution failed")
        return tuple(outs)
