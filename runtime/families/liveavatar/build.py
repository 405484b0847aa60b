"""Building family 2's parts: random weights of a preset, or the release files.

The release (docs/liveavatar.md): `Wan2.2-S2V-14B/` (4 safetensors shards + index json + config.json),
`liveavatar.safetensors` (the LoRA, merged once), `Wan2.2-S2V-14B/Wan2.1_VAE.pth` (read with
weights_only=True) and `wav2vec2-large-xlsr-53-english/` (a Hugging Face directory).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import Wav2Vec2Config, Wav2Vec2Model

from runtime.audio.encoder import _read_do_normalize
from runtime.checkpoint import load_into, read_state_dict
from runtime.engine import _FP8_MODES, _default_device_dtype, check_quantize
from runtime.models.fp8 import check_fp8_device
from runtime.models.vae import WanVAE

from .audio_front import FrontEndSettings, Wav2VecFrontEnd
from .config import LiveAvatarConfig
from .fp8 import quantize_liveavatar_fp8
from .loading import W2V_DIR, find_release, load_liveavatar
from .model import LiveAvatarDiT, build_liveavatar
from .presets import EnginePreset, engine_preset, random_wav2vec2
from .random_weights import materialize_random, randomize_weights


@dataclass
class FamilyParts:
    """What a Live Avatar family is built from: the trunk, the VAE, the audio front end, the video size."""

    model: LiveAvatarDiT
    vae: WanVAE
    front: Wav2VecFrontEnd
    height: int
    width: int
    quantization: object = None  # a QuantizeReport when built with quantize=


def random_parts(preset: str, device, dtype, seed: int, quantize: str | None, device_init: bool = False) -> FamilyParts:
    """Random weights of a preset's shapes (seeded). `device_init`: draw the trunk's weights on the device
    (random_weights.materialize_random), not on the host: the 14B trunk in seconds on one GPU."""
    p = engine_preset(preset)
    check_quantize(quantize)
    device, dtype = _default_device_dtype(device, dtype)
    if device_init:  # built on meta, each parameter drawn where it lives (no host copy of 32.6 GB)
        model = materialize_random(build_liveavatar(p.dit, device="meta"), device, dtype, seed)
    else:
        model = randomize_weights(build_liveavatar(p.dit, device=device, dtype=dtype), seed)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)  # the VAE's own init, seeded without touching the caller's RNG
        with torch.device(device):
            vae = WanVAE(p.vae)
    return _assemble(p, model, vae, random_wav2vec2(p, seed), True, device, dtype, quantize)


def release_candidates(root: Path) -> tuple[Path, ...]:
    """Where the release's parts may be: the trunk dir, three LoRA places, two wav2vec2 places."""
    root = Path(root)
    trunk = root / "Wan2.2-S2V-14B"
    return (trunk, root / "liveavatar.safetensors", root / "Live-Avatar" / "liveavatar.safetensors",
            root / "LiveAvatar" / "liveavatar.safetensors", root / W2V_DIR, trunk / W2V_DIR)


def pretrained_parts(root: Path, device, dtype, quantize: str | None, preset: str) -> FamilyParts:
    """The release files under `root` (loading.find_release), of `preset`'s shapes."""
    files = find_release(root)
    return pretrained_from_paths((files.trunk, files.lora, files.vae, files.wav2vec), device, dtype, quantize, preset)


def pretrained_from_paths(paths, device, dtype, quantize: str | None, preset: str) -> FamilyParts:
    p = engine_preset(preset)
    check_quantize(quantize)
    trunk, lora, vae_path, w2v_dir = (Path(x) for x in paths)
    _require_files(trunk, lora, vae_path, w2v_dir)
    device, dtype = _default_device_dtype(device, dtype)
    model = load_liveavatar(trunk, lora, config=p.dit, device=device, dtype=dtype)
    with torch.device("meta"):  # the latent mean/std buffers are rebuilt by WanVAE's load hook
        vae = WanVAE(p.vae)
    vae = load_into(vae, read_state_dict(vae_path), what="Wan2.1 VAE", dtype=dtype, device=device)
    w2v = load_wav2vec2(w2v_dir, p.dit)
    return _assemble(p, model, vae, w2v, _read_do_normalize(w2v_dir), device, dtype, quantize)


def _require_files(trunk: Path, lora: Path, vae: Path, w2v: Path) -> None:
    """Every missing input named at once, before anything is read."""
    missing = [] if trunk.exists() else [f"trunk directory or file {trunk}"]
    missing += [f"{what} {p}" for what, p in (("LoRA file", lora), ("VAE file", vae)) if not p.is_file()]
    if not (w2v / "config.json").is_file():
        missing.append(f"wav2vec2 Hugging Face directory {w2v} (no config.json)")
    if missing:
        raise FileNotFoundError("Live Avatar files not found: " + "; ".join(missing))


def load_wav2vec2(directory: Path, cfg: LiveAvatarConfig) -> Wav2Vec2Model:
    """wav2vec2-large-xlsr-53-english from a local directory, checked against the trunk's audio input."""
    hf = Wav2Vec2Config.from_pretrained(directory, local_files_only=True)
    if hf.hidden_size != cfg.audio_dim or hf.num_hidden_layers + 1 != cfg.audio_layers:
        raise ValueError(f"{directory}: wav2vec2 gives {hf.num_hidden_layers + 1} hidden states of {hf.hidden_size}; "
                         f"the trunk takes {cfg.audio_layers} of {cfg.audio_dim}")
    model, info = Wav2Vec2Model.from_pretrained(directory, local_files_only=True, output_loading_info=True)
    # masked_spec_embed is SpecAugment (training only); anything else missing would stay random
    missing = [k for k in info["missing_keys"] if not k.endswith("masked_spec_embed")]
    if missing:
        raise ValueError(f"{directory}: wav2vec2 weights missing: {', '.join(sorted(missing))}")
    return model.eval().requires_grad_(False)


def _assemble(p: EnginePreset, model, vae, w2v, normalize: bool, device, dtype, quantize) -> FamilyParts:
    report = _quantize(model, quantize, device, dtype)
    vae = vae.to(device=device, dtype=dtype).eval().requires_grad_(False)
    front = Wav2VecFrontEnd(w2v.to(device=device, dtype=dtype), dataclasses.replace(FrontEndSettings(),
                                                                                    normalize=normalize))
    return FamilyParts(model, vae, front, p.height, p.width, report)


def _quantize(model, mode: str | None, device: torch.device, dtype: torch.dtype):
    """Upstream's FP8 selection (fp8.py), with family 1's capability checks; before any stream exists."""
    if mode is None:
        return None
    granularity = _FP8_MODES[mode]
    check_fp8_device(device, granularity)
    if device.type == "cuda" and granularity == "row" and dtype != torch.bfloat16:
        raise ValueError(f"fp8-row on CUDA gives bf16 out (rowwise kernels): build in bfloat16, not {dtype}")
    return quantize_liveavatar_fp8(model, granularity)
