"""Run a session from exported programs.

An artifacts directory (written by `export.cli.export_artifacts`) holds one program per stage
(`<stage>.pt2`, optionally `<stage>.onnx`), the per-timestep modulation table
(`time_mods.safetensors`) and `manifest.json` (config, shapes, names, hashes). From it:

- `ExportedDiT` has the parts of `CausalAudioDiT` the engine calls: `time_mod` (table lookup: the
  sampler's timesteps are fixed, so the modulation is a constant per step), `text_kv`, `audio_cond`,
  and `forward_block(x, mod, audio, text_kv, ring_k, ring_v, plan, ops)` with the eager semantics:
  it returns the velocity and writes the block's K/V into the caller's ring in place (by scattering
  the rows the step program returns). `ops` is accepted and ignored: the graph has its ops baked in.
- `ExportedVAE` has `encode_image` and `decode_step(z, cache, first)` (one program call per latent
  frame, the cache carried as tensors), so `runtime.models.vae.StreamingVAEDecoder` runs on it
  unchanged: `exported_streaming_decoder` builds one.
- `build_exported_engine` puts both into a stock `runtime.Engine`; no engine change is needed.

What stays eager: the wav2vec2 audio encoder (not an exported stage; built from the manifest's
source, or passed in) and the host-side ring planning.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from runtime.config import AudioConfig, CacheConfig, DiTConfig, EngineConfig, SamplerConfig, VAEConfig
from runtime.models.dit import BlockPlan, TimeMod

from .stages import scatter_ring_rows

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
TIME_MODS = "time_mods.safetensors"
FORMAT_VERSION = 1
DIT_STAGES = ("denoise_step", "audio_cond", "text_kv")
VAE_STAGES = ("vae_encode_image", "vae_decode_first", "vae_decode_step")
Backend = Literal["torch", "onnx", "tensorrt", "auto"]
Program = Callable[..., tuple[torch.Tensor, ...]]


# ---- manifest ---------------------------------------------------------------------------------

_SECTIONS = {"dit": DiTConfig, "vae": VAEConfig, "audio": AudioConfig, "cache": CacheConfig,
             "sampler": SamplerConfig}


def config_to_dict(cfg: EngineConfig) -> dict:
    return dataclasses.asdict(cfg)


def config_from_dict(data: dict) -> EngineConfig:
    """Inverse of `config_to_dict` (JSON turns tuples into lists; every list field is a tuple)."""
    def section(cls, values):
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
    top = {k: v for k, v in data.items() if k not in _SECTIONS}
    return EngineConfig(**top, **{k: section(cls, data[k]) for k, cls in _SECTIONS.items()})


def state_sha256(*modules: torch.nn.Module) -> str:
    """Hash of the weights (names, dtypes, shapes, values) of the given modules, in order."""
    h = hashlib.sha256()
    for m in modules:
        for name, t in sorted(m.state_dict().items()):
            t = t.detach().cpu().contiguous()
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@dataclass
class StageEntry:
    inputs: list[str]
    outputs: list[str]
    pt2: str
    onnx: str | None = None


@dataclass
class Manifest:
    source: str                 # preset name or checkpoint directory the weights came from
    seed: int                   # weight seed for presets (random weights)
    config: dict
    batch: int
    dtype: str                  # "float32", "bfloat16", ...
    device: str                 # the device the programs were traced on
    ring_io: str
    weights_sha256: str
    stages: dict[str, StageEntry] = field(default_factory=dict)
    time_mods: str = TIME_MODS
    format: int = FORMAT_VERSION

    @property
    def engine_config(self) -> EngineConfig:
        return config_from_dict(self.config)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / MANIFEST
        path.write_text(json.dumps(dataclasses.asdict(self), indent=2))
        return path

    @classmethod
    def load(cls, directory: str | Path) -> Manifest:
        path = Path(directory) / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"{directory}: no {MANIFEST}; not an export artifacts directory "
                                    "(create one with `avatar export`)")
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT_VERSION:
            raise ValueError(f"{path}: artifacts format {data.get('format')}, this runtime reads {FORMAT_VERSION}; "
                             "re-export")
        data["stages"] = {k: StageEntry(**v) for k, v in data["stages"].items()}
        return cls(**data)


def save_time_mods(path: str | Path, timesteps: list[float], mods: list[TimeMod]) -> None:
    from safetensors.torch import save_file

    tensors = {"timesteps": torch.tensor(timesteps, dtype=torch.float64)}
    for i, m in enumerate(mods):
        tensors[f"blocks.{i}"] = m.blocks.detach().cpu().contiguous()
        tensors[f"head.{i}"] = m.head.detach().cpu().contiguous()
    save_file(tensors, str(path))


def load_time_mods(path: str | Path, device) -> dict[float, TimeMod]:
    from safetensors.torch import load_file

    t = load_file(str(path), device=str(device))
    return {float(ts): TimeMod(blocks=t[f"blocks.{i}"], head=t[f"head.{i}"])
            for i, ts in enumerate(t["timesteps"].tolist())}


# ---- loading programs -------------------------------------------------------------------------

def _tensorrt_usable() -> bool:
    from . import tensorrt as trt_export

    return trt_export.tensorrt_available() and torch.cuda.is_available()


def load_programs(directory: str | Path, backend: Backend = "torch", device=None,
                  manifest: Manifest | None = None, trt_precision: str = "fp16",
                  trt_cache_dir: str | Path | None = None) -> dict[str, Program]:
    """One callable per stage. `auto`: TensorRT for the VAE stages when `tensorrt` imports and a GPU
    is present (engines built or taken from the cache), torch.export programs for the rest."""
    directory = Path(directory)
    manifest = manifest or Manifest.load(directory)
    if backend == "auto":
        backend = "tensorrt" if _tensorrt_usable() else "torch"
        log.info("export runner: %s", "TensorRT engines for the VAE stages" if backend == "tensorrt" else
                 "tensorrt unavailable (not installed or no GPU): torch.export programs for every stage")
    if backend not in ("torch", "onnx", "tensorrt"):
        raise ValueError(f"unknown backend {backend!r}; expected torch, onnx, tensorrt or auto")
    programs = {}
    for name, entry in manifest.stages.items():
        programs[name] = _load_one(directory, name, entry, backend, device, trt_precision, trt_cache_dir)
    return programs


def _load_one(directory: Path, name: str, entry: StageEntry, backend: str, device, precision, cache_dir):
    from .torch_export import TorchProgram

    if backend == "onnx" or (backend == "tensorrt" and name in VAE_STAGES):
        if entry.onnx is None:
            raise FileNotFoundError(f"{directory}: stage {name!r} was exported without ONNX (use --onnx)")
        if backend == "onnx":
            from .onnx_export import OrtProgram
            return OrtProgram(directory / entry.onnx, name)
        from .tensorrt import TRTProgram, engine_for_onnx
        engine = engine_for_onnx(directory / entry.onnx, precision=precision, cache_dir=cache_dir)
        return TRTProgram(engine, name, entry.inputs, entry.outputs)
    return TorchProgram.load(directory / entry.pt2, name, entry.inputs, entry.outputs, device=device)


# ---- the DiT and VAE faces the engine uses ------------------------------------------------------

class _TextKV(list):
    """Per-layer (k, v) pairs as the engine passes them around, plus the stacked tensors the step
    program takes (so they are not re-stacked on every step)."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        super().__init__(zip(k.unbind(0), v.unbind(0)))
        self.stacked = (k, v)


class ExportedDiT:
    def __init__(self, programs: dict[str, Program], config: EngineConfig, time_mods: dict[float, TimeMod],
                 ring_io: str):
        missing = [s for s in DIT_STAGES if s not in programs]
        if missing:
            raise ValueError(f"missing DiT stage programs: {', '.join(missing)}")
        self.cfg = config.dit
        self.tokens_per_frame = config.tokens_per_frame
        self.step, self.audio_program, self.text_program = (programs[s] for s in DIT_STAGES)
        self.time_mods, self.ring_io = time_mods, ring_io

    def time_mod(self, t: torch.Tensor) -> TimeMod:
        """The exported table's modulation for timestep t ([1, F], one value: the engine's use)."""
        value = float(t.flatten()[0])
        if not bool((t == value).all()):
            raise ValueError("exported time modulation: every frame must share one timestep")
        if value not in self.time_mods:
            raise KeyError(f"timestep {value} is not in the exported table {sorted(self.time_mods)}; "
                           "re-export with this sampler config")
        mod = self.time_mods[value]
        if mod.blocks.shape[:2] != t.shape:
            raise ValueError(f"exported time modulation is for {tuple(mod.blocks.shape[:2])} frames, "
                             f"asked for {tuple(t.shape)}")
        return mod

    def text_kv(self, prompt_embeds: torch.Tensor) -> _TextKV:
        B, L, C = prompt_embeds.shape
        if C != self.cfg.text_dim or not 1 <= L <= self.cfg.text_len:
            raise ValueError(f"prompt_embeds must be [B, L<={self.cfg.text_len}, {self.cfg.text_dim}], "
                             f"got {tuple(prompt_embeds.shape)}")
        pad = prompt_embeds.new_zeros(B, self.cfg.text_len - L, C)  # as CausalAudioDiT.text_kv
        k, v = self.text_program(torch.cat([prompt_embeds, pad], dim=1))
        return _TextKV(k, v)

    def audio_cond(self, feats: torch.Tensor) -> torch.Tensor:
        return self.audio_program(feats)[0]

    def forward_block(self, x: torch.Tensor, mod: TimeMod, audio: torch.Tensor, text_kv,
                      ring_k: torch.Tensor, ring_v: torch.Tensor, plan: BlockPlan, ops=None) -> torch.Tensor:
        tk, tv = text_kv.stacked if isinstance(text_kv, _TextKV) else map(torch.stack, zip(*text_kv))
        velocity, k_out, v_out = self.step(x, mod.blocks, mod.head, audio, tk, tv, ring_k, ring_v,
                                           plan.write_slots, plan.slot_pos, plan.q_pos)
        if self.ring_io == "full":
            ring_k.copy_(k_out)
            ring_v.copy_(v_out)
        else:
            scatter_ring_rows(ring_k, k_out, plan.write_slots, self.tokens_per_frame)
            scatter_ring_rows(ring_v, v_out, plan.write_slots, self.tokens_per_frame)
        return velocity


class ExportedVAE:
    """`encode_image` and a functional `decode_step` over the exported programs (WanVAE semantics)."""

    def __init__(self, programs: dict[str, Program], config: EngineConfig, device, dtype: torch.dtype):
        missing = [s for s in VAE_STAGES if s not in programs]
        if missing:
            raise ValueError(f"missing VAE stage programs: {', '.join(missing)}")
        self.config = config.vae
        self.spatial_factor = config.vae.spatial_factor
        self.latent_hw = config.latent_hw
        self.encode_program, self.first_program, self.step_program = (programs[s] for s in VAE_STAGES)
        self.device, self.dtype = torch.device(device), dtype  # as WanVAE.device / .dtype

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        if image.dim() != 4:
            raise ValueError(f"encode_image: expected [B, 3, H, W], got {tuple(image.shape)}")
        return self.encode_program(image)[0]

    def init_decode_cache(self, batch: int, h: int, w: int, device=None, dtype=None) -> list[torch.Tensor]:
        """Zero decode cache in the exported programs' layout: WanVAE's, a function of the config alone
        (read off a weightless model on the meta device)."""
        from runtime.models.vae import WanVAE

        with torch.device("meta"):
            layout = WanVAE(self.config).decode_cache_layout(h, w)
        device = self.device if device is None else device
        dtype = self.dtype if dtype is None else dtype
        return [torch.zeros((batch, *shape), device=device, dtype=dtype) for shape in layout]

    def decode_step(self, z: torch.Tensor, cache: list[torch.Tensor] | None, first: bool):
        """As `WanVAE.decode_step`: first=True takes 1 latent frame (-> 1 video frame, cache ignored),
        first=False takes n >= 1 frames (-> temporal_factor * n frames), one program call each."""
        if z.dim() != 5 or z.shape[1] != self.config.z_dim or tuple(z.shape[3:]) != self.latent_hw:
            raise ValueError(f"decode_step: expected [B, {self.config.z_dim}, n, {self.latent_hw[0]}, "
                             f"{self.latent_hw[1]}] (the exported shape), got {tuple(z.shape)}")
        if first:
            if z.shape[2] != 1:
                raise ValueError(f"decode_step: the first step takes exactly 1 latent frame, got {z.shape[2]}")
            frames, *new_cache = self.first_program(z)
            return frames, list(new_cache)
        if cache is None:
            raise ValueError("decode_step: first=False needs the cache returned by the previous step")
        parts = []
        for i in range(z.shape[2]):
            frames, *cache = self.step_program(z[:, :, i:i + 1], *cache)
            parts.append(frames)
        return torch.cat(parts, dim=2), list(cache)


# ---- putting it together ----------------------------------------------------------------------

@dataclass
class ExportedArtifacts:
    manifest: Manifest
    config: EngineConfig
    dit: ExportedDiT
    vae: ExportedVAE
    backend: str
    device: torch.device

    @classmethod
    def load(cls, directory: str | Path, backend: Backend = "torch", device=None,
             programs: dict[str, Program] | None = None, **trt_options) -> ExportedArtifacts:
        """Load `directory`'s programs for `backend` (or use already loaded `programs`)."""
        manifest = Manifest.load(directory)
        config = manifest.engine_config
        device = torch.device(device or manifest.device)
        if programs is None:
            programs = load_programs(directory, backend, device, manifest, **trt_options)
        time_mods = load_time_mods(Path(directory) / manifest.time_mods, device)
        dit = ExportedDiT(programs, config, time_mods, manifest.ring_io)
        vae = ExportedVAE(programs, config, device, manifest.torch_dtype)
        return cls(manifest, config, dit, vae, backend, device)

    def streaming_decoder(self, batch: int = 1):
        return exported_streaming_decoder(self.vae, batch)

    def engine(self, audio_encoder=None):
        """A `runtime.Engine` on these programs. The audio encoder stays eager: pass one, or it is
        rebuilt from the manifest's source (the preset's seeded random weights, or the checkpoint
        directory's wav2vec2)."""
        from runtime.engine import Engine
        from runtime.families.livetalk import LiveTalk

        if self.manifest.batch != 1:
            raise ValueError(f"the engine runs batch 1; these artifacts were exported for batch {self.manifest.batch}")
        dtype = self.manifest.torch_dtype
        if audio_encoder is None:
            audio_encoder = _audio_encoder_for(self.manifest, self.config).to(device=self.device, dtype=dtype)
        log.info("engine from exported programs (backend %s)", self.backend)
        return Engine(LiveTalk(self.config, self.dit, self.vae, audio_encoder, device=self.device, dtype=dtype))


def exported_streaming_decoder(vae: ExportedVAE, batch: int = 1):
    """A `StreamingVAEDecoder` whose every decode runs the exported first/step programs."""
    from runtime.models.vae import StreamingVAEDecoder

    return StreamingVAEDecoder(vae, batch=batch)


def _audio_encoder_for(manifest: Manifest, config: EngineConfig):
    from runtime.audio import AudioEncoder
    from runtime.config import PRESETS

    if manifest.source in PRESETS and not Path(manifest.source).exists():
        return AudioEncoder.from_config(config.audio, seed=manifest.seed)
    hits = sorted(Path(manifest.source).rglob("wav2vec2-base-960h"))
    if not hits:
        raise FileNotFoundError(f"{manifest.source}: no wav2vec2-base-960h directory for the audio encoder; "
                                "pass audio_encoder=")
    return AudioEncoder.from_pretrained(hits[0], config.audio)


def build_exported_engine(directory: str | Path, backend: Backend = "torch", device=None,
                          audio_encoder=None, **trt_options):
    """A `runtime.Engine` whose DiT and VAE stages run from the exported programs in `directory`."""
    return ExportedArtifacts.load(directory, backend, device, **trt_options).engine(audio_encoder)
