"""LiveTalk (1.3B, and the tiny/micro test presets): the family's models, loading and sessions.

Construction (`LiveTalk.build`): a preset gives random weights of its shapes (seeded), a directory
the release files, loaded strictly. The block stages, batched over sessions, are in stages.py.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from avatar_kernels.select import AttentionShape

from ...audio import AudioEncoder, AudioStream
from ...checkpoint import load_into, read_state_dict
from ...config import PRESETS, EngineConfig
from ...models.dit import CausalAudioDiT, build_dit
from ...models.fp8 import QuantizeReport, check_fp8_device, quantize_dit_fp8
from ...models.ops import Ops, ops_for
from ...models.taehv import StreamingTAEHVDecoder, TAEHVDecoder
from ...models.vae import StreamingVAEDecoder, WanVAE
from ...session import StaticPlan
from ...text import PromptEncoder, TextEncoderConfig
from ...text.encoder import TEXT_FILES_HINT, find_text_files, missing_text_files
from .. import register
from ..base import Timeline
from .graphs import RoundStages
from .stages import LiveTalkStages, SharedRows, TalkState

log = logging.getLogger(__name__)


def timeline_of(config: EngineConfig) -> Timeline:
    """The block layout of a LiveTalk config: block 0 is 1 + tf*(B-1) frames, later ones tf*B."""
    return Timeline(sample_rate=config.audio.sample_rate, fps=config.fps, height=config.height, width=config.width,
                    first_block_frames=config.video_frames_in_block(0), block_frames=config.video_frames_in_block(1),
                    lookahead_frames=config.audio.window_frames(config.fps)[1])


def attention_shape(config: EngineConfig, dtype: torch.dtype) -> AttentionShape:
    """One session's self-attention of one layer: what `auto` times on CUDA to pick a backend."""
    d = config.dit
    return AttentionShape(batch=1, frames=config.cache.block_frames, slots=config.cache.window_frames,
                          grid_h=config.token_grid[0], grid_w=config.token_grid[1], heads=d.num_heads,
                          head_dim=d.head_dim, dtype=str(dtype).removeprefix("torch."))


@register
class LiveTalk(LiveTalkStages):
    """The LiveTalk family: a causal audio DiT over a KV ring (one clean ring, refreshed at t=0),
    wav2vec2 audio features, the Wan VAE (or TAEHV) streaming decoder, a reference-image condition."""

    name = "livetalk"
    presets = tuple(PRESETS)
    config_class = EngineConfig

    def __init__(self, config: EngineConfig, dit: CausalAudioDiT, vae: WanVAE, audio_encoder: AudioEncoder,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 backend: str = "auto", *, taehv: TAEHVDecoder | None = None,
                 text_encoder: PromptEncoder | None = None, max_sessions: int = 4):
        """`taehv`: decode with the tiny TAEHV decoder (~25x fewer FLOPs) instead of the Wan VAE decoder;
        the Wan VAE still encodes the reference image. `text_encoder`: turns prompt text into
        embeddings (see `attach_text_encoder`). `max_sessions`: rows of the shared KV ring."""
        self.config = config
        self.device = torch.device(device)
        self.dtype = dtype
        self.dit, self.vae, self.audio_encoder, self.taehv = dit, vae, audio_encoder, taehv
        self.ops: type[Ops] = ops_for(backend, self.device, attention_shape(config, dtype))
        self.timeline = timeline_of(config)
        self.batch = 1  # rows of the single-session stages (stage_denoise, ...); rounds batch `rows`
        self.max_sessions = max_sessions
        self.rows = SharedRows.allocate(config, self.padded(max_sessions), self.device, dtype,
                                        roped=self.ops.roped_ring)
        self._mods = self.time_mods(self.rows.batch)
        self.opened = False                                # a session has run on these weights
        self._round_stages: RoundStages | None = None      # built (and captured) at the first session
        self.quantization: QuantizeReport | None = None   # set by quantize()
        self.text_encoder: PromptEncoder | None = None
        self.text_encoder_missing = "this engine was built without one"  # why there is none, for errors
        if text_encoder is not None:
            self.attach_text_encoder(text_encoder)

    # ---- construction ---------------------------------------------------------------------------
    @classmethod
    def recognises(cls, root: Path) -> bool:
        """The LiveTalk DiT's release folder, or its weights at the top (the loader names what else is missing)."""
        return (root / "LiveTalk-1.3B-V0.1").is_dir() or any(root.glob("model*.safetensors*"))

    @classmethod
    def build(cls, path_or_preset: str, *, device=None, dtype=None, seed: int = 0, max_sessions: int = 4,
              backend: str = "auto", config: EngineConfig | str | None = None, decoder: str = "wan",
              text_encoder: bool | None = None, text_config: TextEncoderConfig | str = "umt5-xxl",
              text_device=None, text_dtype: torch.dtype = torch.bfloat16,
              quantize: str | None = None) -> LiveTalk:
        """A preset name gives random weights (seeded); a directory gives the LiveTalk release files.

        `config` (an EngineConfig or preset name) states the shapes of the files in the directory:
        `livetalk-1.3b` by default. Loading is strict, so files of other shapes fail with every
        mismatched key named rather than loading into a wrong model. `decoder="taehv"` decodes with
        TAEHV (`taew2_1.pth` in the directory; random weights for a preset).

        Prompt text encoder (umT5-XXL, 11.4 GB in bf16): loaded when the directory holds
        `models_t5_umt5-xxl-enc-bf16.pth` (or `.safetensors`) and a `google/umt5-xxl/` tokenizer;
        `text_encoder=True` requires it, False skips it (run with precomputed `prompt_embeds`).
        `text_device` (default: the engine's device; "cpu" keeps the GPU memory free, encoding is once
        per prompt) and `text_dtype` (Wan's bf16 by default) place it; `text_config` states its shapes.
        `quantize`: "fp8" or "fp8-row" (see `quantize`), None keeps the DiT in `dtype`.
        """
        _check_decoder(decoder)
        check_quantize(quantize)
        if path_or_preset in PRESETS and not Path(path_or_preset).exists():
            if text_encoder:
                raise ValueError(f"preset {path_or_preset!r} has random weights and no text encoder; attach one "
                                 "with attach_text_encoder() or pass a release directory")
            return cls.random(EngineConfig.from_preset(path_or_preset), device, dtype, backend, seed, decoder,
                              quantize=quantize, max_sessions=max_sessions)
        device, dtype = _default_device_dtype(device, dtype)
        if not isinstance(config, EngineConfig):
            config = EngineConfig.from_preset(config or "livetalk-1.3b")
        root = Path(path_or_preset)
        dit, vae, audio = _load_release(root, config, device, dtype)
        taehv = None
        if decoder == "taehv":
            taehv = TAEHVDecoder.from_state_dict(read_state_dict(_find(root, "taew2_1.*")), dtype=dtype, device=device)
        family = cls._assemble(config, dit, vae, audio, device, dtype, backend, taehv, max_sessions)
        if quantize:
            family.quantize(quantize)
        if text_encoder is False:
            family.text_encoder_missing = "it was skipped (text_encoder=False)"
        else:
            family._load_text_encoder(root, required=bool(text_encoder), config=text_config,
                                      device=text_device or device, dtype=text_dtype)
        return family

    def _load_text_encoder(self, root: Path, required: bool, **options) -> None:
        checkpoint, tokenizer_dir = find_text_files(root)
        missing = " and no ".join(missing_text_files(checkpoint, tokenizer_dir))
        if missing and required:
            raise FileNotFoundError(f"{root}: found no {missing}")
        if missing:
            self.text_encoder_missing = f"none was found under {root} (no {missing})"
            log.info("no prompt text encoder: %s", self.text_encoder_missing)
            return
        self.attach_text_encoder(PromptEncoder.from_files(checkpoint, tokenizer_dir, **options))

    def attach_text_encoder(self, encoder: PromptEncoder) -> None:
        """Use `encoder` for `reset(..., prompt="text")`; its width and length must fit the DiT."""
        d, t = self.config.dit, encoder.config
        if t.dim != d.text_dim or t.seq_len > d.text_len:
            raise ValueError(f"text encoder {t.name!r} gives [<= {t.seq_len}, {t.dim}] embeddings; the DiT takes "
                             f"[<= {d.text_len}, {d.text_dim}]")
        self.text_encoder = encoder

    def encode_prompt(self, prompt: str) -> torch.Tensor:
        """[L, text_dim] embedding of `prompt` on the text encoder's device (cached per string)."""
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
        if self.text_encoder is None:
            raise RuntimeError(f"a text prompt needs the umT5 text encoder ({TEXT_FILES_HINT}), but "
                               f"{self.text_encoder_missing}; pass prompt_embeds (e.g. from "
                               "`avatar encode-prompt`) instead")
        return self.text_encoder(prompt)

    @classmethod
    def random(cls, config: EngineConfig, device=None, dtype=None, backend: str = "auto",
               seed: int = 0, decoder: str = "wan", *, quantize: str | None = None,
               max_sessions: int = 4) -> LiveTalk:
        """Random weights of the configured shapes: tests, demos and speed measurements."""
        _check_decoder(decoder)
        check_quantize(quantize)
        device, dtype = _default_device_dtype(device, dtype)
        # Seeded without disturbing the caller's global RNG state.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            dit = build_dit(config, device=device, dtype=dtype)
            with torch.device(device):
                vae = WanVAE(config.vae)
                taehv = TAEHVDecoder(config.vae.z_dim) if decoder == "taehv" else None
        audio = AudioEncoder.from_config(config.audio, seed=seed)
        family = cls._assemble(config, dit, vae, audio, device, dtype, backend, taehv, max_sessions)
        if quantize:
            family.quantize(quantize)
        return family

    def quantize(self, mode: str = "fp8") -> QuantizeReport:
        """FP8 (E4M3) weights and activations for the DiT's per-token linears (runtime/models/fp8.py):
        "fp8" scales per tensor (Live Avatar's recipe, compute capability >= 8.9), "fp8-row" per token
        and output channel (more accurate, >= 9.0). In place, once, before the first session (captured
        graphs would keep the old weights)."""
        check_quantize(mode)
        if self.quantization is not None:
            raise RuntimeError(f"the DiT is already quantized ({self.quantization.granularity} scaling)")
        if self.opened:
            raise RuntimeError("quantize before the first reset() or open(): a session has already run on these "
                               "weights")
        granularity = _FP8_MODES[mode]
        check_fp8_device(self.device, granularity)
        if self.device.type == "cuda" and granularity == "row" and self.dtype != torch.bfloat16:
            raise ValueError(f"fp8-row on CUDA gives bf16 out (rowwise kernels): build the engine in bfloat16, "
                             f"not {self.dtype}")
        self.quantization = quantize_dit_fp8(self.dit, granularity)
        return self.quantization

    def share_weights(self, max_sessions: int = 1) -> LiveTalk:
        """The same models (quantized ones included) and attention backend, new rows (see Family)."""
        twin = type(self)(self.config, self.dit, self.vae, self.audio_encoder, device=self.device, dtype=self.dtype,
                          backend=self.ops.name, taehv=self.taehv, max_sessions=max_sessions)
        twin.quantization, twin.text_encoder = self.quantization, self.text_encoder
        return twin

    @classmethod
    def _assemble(cls, config, dit, vae, audio, device, dtype, backend, taehv=None, max_sessions=4) -> LiveTalk:
        vae, audio = (m.to(device=device, dtype=dtype).eval().requires_grad_(False) for m in (vae, audio))
        if taehv is not None:
            taehv = taehv.to(device=device, dtype=dtype).eval().requires_grad_(False)
        return cls(config, dit, vae, audio, device=device, dtype=dtype, backend=backend, taehv=taehv,
                   max_sessions=max_sessions)

    @property
    def decoder_model(self) -> WanVAE | TAEHVDecoder:
        """The model whose functional `decode_step` / `init_decode_cache` turn latents into frames."""
        return self.taehv if self.taehv is not None else self.vae

    @property
    def decoder_name(self) -> str:
        return "taehv" if self.taehv is not None else "wan"

    def new_decoder(self) -> StreamingVAEDecoder | StreamingTAEHVDecoder:
        """A fresh streaming decoder (its own causal cache) for one stream."""
        if self.taehv is not None:
            return StreamingTAEHVDecoder(self.taehv, batch=1)
        return StreamingVAEDecoder(self.vae, batch=1)

    @property
    def round_stages(self) -> RoundStages:
        """The rounds' stages over static buffers (graphs.py); on CUDA captured as graphs unless the
        engine runs mode="eager" (`capture_graphs`). Built once, at the first session: the capture's
        warm-up runs write the ring, and the weights are final by then (quantize comes first)."""
        if self._round_stages is None:
            stages = RoundStages(self)
            if self.device.type == "cuda" and self.capture_graphs:
                stages.capture()
            elif self.device.type == "cuda":
                log.info("graphs: not captured (mode='eager'): every stage runs its eager body")
            self._round_stages = stages
        return self._round_stages

    # ---- sessions -------------------------------------------------------------------------------
    def open_state(self, slot: int, reference_image, prompt: str | None = None, prompt_embeds=None,
                   seed: int = 0) -> TalkState:
        """Session state in `slot`: its KV ring and text K/V are row `slot` of the shared rows.

        Input is validated before anything is touched, so a bad image or prompt changes nothing.
        """
        from ...media import load_image, resize_cover_center_crop

        cfg = self.config
        image = resize_cover_center_crop(load_image(reference_image), cfg.height, cfg.width)
        embeds = self._prompt_tensor(prompt_embeds, prompt)
        # Everything above validates input; nothing below can fail on user data.
        self.opened = True
        self.round_stages  # noqa: B018 - built (on CUDA: captured) before the first session's state
        ref_latent = self._encode_reference(image)
        state = TalkState(
            audio=AudioStream(cfg.audio, cfg.fps, self.audio_encoder, self.device, self.dtype,
                              max_span_frames=max(cfg.video_frames_in_block(0), cfg.video_frames_in_block(1))),
            slot=slot,
            ring=self.rows.ring_row(slot),
            plan=StaticPlan.allocate(cfg.cache, 1, self.device),
            text_kv=self.rows.set_text_kv(slot, self.dit.text_kv(embeds)),
            ref_latent=ref_latent,
            cond_first=self._cond(ref_latent, first=True),
            cond_rest=self._cond(ref_latent, first=False),
            generator=torch.Generator(self.device).manual_seed(seed),
        )
        state.ring.clear()
        return state

    def _prompt_tensor(self, prompt_embeds, prompt: str | None = None) -> torch.Tensor:
        d = self.config.dit
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("pass the prompt as text (prompt=) or as embeddings (prompt_embeds=), not both")
        if isinstance(prompt_embeds, str):
            raise TypeError("prompt_embeds got a str: pass text as prompt=\"...\"")
        if prompt is not None:
            prompt_embeds = self.encode_prompt(prompt)
        if prompt_embeds is None:
            # No prompt: an all-zero embedding (padded like any prompt), as before there was a text encoder.
            prompt_embeds = torch.zeros(1, d.text_dim)
        p = torch.as_tensor(prompt_embeds)
        if p.ndim == 2:
            p = p[None]
        if p.ndim != 3 or p.shape[0] != 1 or p.shape[-1] != d.text_dim or not 1 <= p.shape[1] <= d.text_len:
            raise ValueError(f"prompt_embeds must be [L, {d.text_dim}] with 1 <= L <= {d.text_len}, "
                             f"got shape {tuple(p.shape)}")
        if not p.is_floating_point() or not torch.isfinite(p).all():
            raise ValueError("prompt_embeds must be finite floating-point values")
        return p.to(self.device, self.dtype)

    @torch.no_grad()
    def _encode_reference(self, image: np.ndarray) -> torch.Tensor:
        img = torch.tensor(image).to(self.device).permute(2, 0, 1)[None].to(self.dtype) / 127.5 - 1
        return self.vae.encode_image(img).float()

    def _cond(self, ref_latent: torch.Tensor, first: bool) -> torch.Tensor:
        B, _, _, h, w = ref_latent.shape
        F = self.config.cache.block_frames
        mask = torch.ones(B, 1, F, h, w, device=self.device)
        if first:
            mask[:, :, 0] = 0  # global latent frame 0 is the reference frame
        return torch.cat([ref_latent.expand(-1, -1, F, -1, -1), mask], dim=1).to(self.dtype)



_FP8_MODES = {"fp8": "tensor", "fp8-row": "row"}


def check_quantize(mode: str | None) -> None:
    if mode is not None and mode not in _FP8_MODES:
        raise ValueError(f"quantize must be None or one of {sorted(_FP8_MODES)}, got {mode!r}")


def _check_decoder(decoder: str) -> None:
    if decoder not in ("wan", "taehv"):
        raise ValueError(f"unknown decoder {decoder!r}; choose 'wan' or 'taehv'")


def _default_device_dtype(device, dtype):
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return device, dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)


def _find(root: Path, name: str) -> Path:
    hits = sorted(root.rglob(name))
    if not hits:
        raise FileNotFoundError(f"{root}: no {name} found (expected the LiveTalk release layout)")
    return hits[0]


def _load_release(root: Path, config: EngineConfig, device, dtype):
    """LiveTalk files under `root`, in the release layout (any nesting):
    `model.safetensors` (or a shard set with its index) of the DiT, in `LiveTalk-1.3B-V0.1/` or `root`;
    `Wan2.1_VAE.pth` (weights_only) or `Wan2.1_VAE.safetensors`; a `wav2vec2-base-960h/` directory.
    """
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a preset name ({', '.join(PRESETS)}) nor a checkpoint directory")
    dit_dir = root / "LiveTalk-1.3B-V0.1" if (root / "LiveTalk-1.3B-V0.1").is_dir() else root
    dit_file = dit_dir / "model.safetensors"
    dit = load_into(build_dit(config, device="meta"), read_state_dict(dit_file if dit_file.exists() else dit_dir),
                    what="LiveTalk DiT", dtype=dtype, device=device)
    with torch.device("meta"):  # the latent mean/std buffers are rebuilt by WanVAE's load hook
        vae = WanVAE(config.vae)
    vae = load_into(vae, read_state_dict(_find(root, "Wan2.1_VAE.*")), what="Wan2.1 VAE", dtype=dtype,
                    device=device)
    audio = AudioEncoder.from_pretrained(_find(root, "wav2vec2-base-960h"), config.audio)
    log.info("loaded LiveTalk release files from %s", root)
    return dit, vae, audio
