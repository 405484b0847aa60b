"""`Engine`: push audio, get video blocks back as soon as they exist.

    eng = Engine.from_pretrained("tiny")          # or a directory with the LiveTalk files
    eng.reset(reference_image, seed=0)
    for chunk in audio_chunks:
        for block in eng.step(chunk):             # zero or more VideoBlocks per call
            show(block.frames)
    tail = eng.flush()                            # pads with silence, finishes the stream

`step` is plan -> run -> postprocess, per block: plan the ring (host arithmetic), run audio features,
the sampler and the streaming VAE decode, then copy frames out. A bad input raises before any state
changes, so the next valid call behaves as if the bad one never happened.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .audio import AudioEncoder, AudioStream, Resampler, check_chunk
from .checkpoint import load_into, read_state_dict
from .config import PRESETS, EngineConfig
from .core.session import Session
from .errors import AtCapacityError, BlockFailedError
from .models.dit import BlockPlan, CausalAudioDiT, TimeMod, build_dit
from .models.fp8 import QuantizeReport, check_fp8_device, quantize_dit_fp8
from .models.ops import Ops, ops_for
from .models.taehv import StreamingTAEHVDecoder, TAEHVDecoder
from .models.vae import StreamingVAEDecoder, WanVAE
from .sampler import BlockInputs, denoise_step, refresh_kv
from .session import KVRing, StaticPlan, plan_block
from .text import PromptEncoder, TextEncoderConfig
from .text.encoder import TEXT_FILES_HINT, find_text_files, missing_text_files

log = logging.getLogger(__name__)


@dataclass
class VideoBlock:
    index: int                # block index in the stream
    frames: np.ndarray        # uint8 [N, H, W, 3], a copy owned by the caller
    first_frame: int          # stream index of its first video frame
    pts: float                # time of its first frame, seconds
    audio: np.ndarray         # float32 mono samples these frames cover (silence padding included after flush)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])


@dataclass
class BlockWork:
    """One block in flight: what the stages read and write."""

    index: int
    first_frame: int
    num_frames: int
    host_plan: BlockPlan
    noise: torch.Tensor
    inputs: BlockInputs | None = None
    plan: BlockPlan | None = None      # the session's static device plan, once step 0 has filled it
    x: torch.Tensor | None = None      # x_t between steps, then the clean x0
    video: torch.Tensor | None = None  # decoded frames [B, 3, N, H, W] in [-1, 1]
    # The samples the block covers, copied when it is planned: in a pipelined run a later block's
    # audio stage may already have released them from the ring when this block finishes.
    audio: np.ndarray | None = None


@dataclass
class _Session:
    ring: KVRing
    plan: StaticPlan
    text_kv: list
    ref_latent: torch.Tensor          # [B, C, 1, h, w] fp32
    cond_first: torch.Tensor          # [B, C + 1, F, h, w]: block 0 (mask 0 on frame 0)
    cond_rest: torch.Tensor           # later blocks (mask 1 everywhere)
    generator: torch.Generator
    audio: AudioStream
    decoder: StreamingVAEDecoder | StreamingTAEHVDecoder
    block: int = 0
    flushed: bool = False
    resampler: Resampler | None = None  # only when the caller streams another rate with resample=True


class Engine:
    def __init__(self, config: EngineConfig, dit: CausalAudioDiT, vae: WanVAE, audio_encoder: AudioEncoder,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 backend: str = "auto", *, batch: int = 1, taehv: TAEHVDecoder | None = None,
                 text_encoder: PromptEncoder | None = None, max_sessions: int = 4):
        """`batch`: rows of the batched stages (stage_denoise, stage_refresh). Sessions are batch 1;
        runtime/batched.py builds an engine of batch N to run N sessions' rows in one forward.
        `taehv`: decode with the tiny TAEHV decoder (~25x fewer FLOPs) instead of the Wan VAE decoder;
        the Wan VAE still encodes the reference image.
        `text_encoder`: turns `reset(..., prompt="text")` into embeddings (see `attach_text_encoder`).
        `max_sessions`: sessions open at once (`open`); one more raises AtCapacityError."""
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        if not isinstance(max_sessions, int) or isinstance(max_sessions, bool) or max_sessions < 1:
            raise ValueError(f"max_sessions must be an int >= 1, got {max_sessions!r}")
        self.config = config
        self.device = torch.device(device)
        self.dtype = dtype
        self.dit, self.vae, self.audio_encoder, self.taehv = dit, vae, audio_encoder, taehv
        self.ops: type[Ops] = ops_for(backend, self.device)
        self.batch = batch
        steps = list(config.sampler.timesteps) + [config.sampler.refresh_timestep]
        self._mods = [self._time_mod(t) for t in steps]
        self.max_sessions = max_sessions
        self._slots: list[Session | None] = [None] * max_sessions
        self._spare: list[tuple[KVRing, StaticPlan]] = []  # freed sessions' ring and plan, reused
        self._default: Session | None = None                # the one-session shorthand's session
        self._slots_lock = threading.Lock()
        # Model work of different sessions (maybe from different threads) runs one block at a time.
        self._compute_lock = threading.Lock()
        self.quantization: QuantizeReport | None = None   # set by quantize()
        self.text_encoder: PromptEncoder | None = None
        self.text_encoder_missing = "this engine was built without one"  # why there is none, for errors
        if text_encoder is not None:
            self.attach_text_encoder(text_encoder)

    # ---- construction ---------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path_or_preset: str, device=None, dtype=None, backend: str = "auto",
                        seed: int = 0, config: EngineConfig | str | None = None, decoder: str = "wan", *,
                        text_encoder: bool | None = None, text_config: TextEncoderConfig | str = "umt5-xxl",
                        text_device=None, text_dtype: torch.dtype = torch.bfloat16,
                        quantize: str | None = None, max_sessions: int = 4) -> Engine:
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
        engine = cls._assemble(config, dit, vae, audio, device, dtype, backend, taehv, max_sessions)
        if quantize:
            engine.quantize(quantize)
        if text_encoder is False:
            engine.text_encoder_missing = "it was skipped (text_encoder=False)"
        else:
            engine._load_text_encoder(root, required=bool(text_encoder), config=text_config,
                                      device=text_device or device, dtype=text_dtype)
        return engine

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
               max_sessions: int = 4) -> Engine:
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
        engine = cls._assemble(config, dit, vae, audio, device, dtype, backend, taehv, max_sessions)
        if quantize:
            engine.quantize(quantize)
        return engine

    def quantize(self, mode: str = "fp8") -> QuantizeReport:
        """FP8 (E4M3) weights and activations for the DiT's per-token linears (runtime/models/fp8.py):
        "fp8" scales per tensor (Live Avatar's recipe, compute capability >= 8.9), "fp8-row" per token
        and output channel (more accurate, >= 9.0). In place, once, before the first session (captured
        graphs would keep the old weights); engines sharing this DiT (ScheduledEngine.from_engine,
        BatchedEngine) see it too."""
        check_quantize(mode)
        if self.quantization is not None:
            raise RuntimeError(f"the DiT is already quantized ({self.quantization.granularity} scaling)")
        if any(self._slots) or self._spare:
            raise RuntimeError("quantize before the first open()/reset(): a session has already run on these weights")
        granularity = _FP8_MODES[mode]
        check_fp8_device(self.device, granularity)
        if self.device.type == "cuda" and granularity == "row" and self.dtype != torch.bfloat16:
            raise ValueError(f"fp8-row on CUDA gives bf16 out (rowwise kernels): build the engine in bfloat16, "
                             f"not {self.dtype}")
        self.quantization = quantize_dit_fp8(self.dit, granularity)
        return self.quantization

    @classmethod
    def _assemble(cls, config, dit, vae, audio, device, dtype, backend, taehv=None, max_sessions=4) -> Engine:
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

    def _time_mod(self, t: float) -> TimeMod:
        """Modulation of timestep t for every frame of a block, computed once (t is fixed per step)."""
        frames = self.config.cache.block_frames
        mod = self.dit.time_mod(torch.full((1, frames), float(t)))
        return TimeMod(blocks=mod.blocks.expand(self.batch, -1, -1, -1).contiguous(),
                       head=mod.head.expand(self.batch, -1, -1).contiguous())

    # ---- sessions -------------------------------------------------------------------------------
    def open(self, reference_image, prompt: str | None = None, prompt_embeds=None, seed: int = 0) -> Session:
        """A new stream from a reference image (HxWx3 uint8 array or a path), in a free slot.

        The prompt is `prompt` (text, encoded by the text encoder) or `prompt_embeds` ([L, text_dim]),
        not both; neither gives an all-zero embedding. `seed` (an int in [0, 2**63)) seeds the
        session's noise. Raises AtCapacityError when `max_sessions` sessions are open; bad input raises
        before anything changes."""
        check_seed(seed)
        with self._slots_lock:
            slot = self._free_slot()
            ring, plan = self._spare.pop() if self._spare else (None, None)
            try:
                state = self.open_session(reference_image, prompt_embeds, seed, ring=ring, plan=plan, prompt=prompt)
            except BaseException:
                if ring is not None:
                    self._spare.append((ring, plan))
                raise
            session = self._slots[slot] = Session(self, state, slot)
        return session

    def _free_slot(self) -> int:
        for i, held in enumerate(self._slots):
            if held is None:
                return i
        raise AtCapacityError(self.max_sessions)

    def _release(self, session: Session) -> None:
        """Session.close(): the slot is free, its ring and plan wait for the next session."""
        with self._slots_lock:
            if self._slots[session.slot] is session:
                self._slots[session.slot] = None
                self._spare.append((session.state.ring, session.state.plan))
            if self._default is session:
                self._default = None

    @property
    def num_sessions(self) -> int:
        """Sessions open now."""
        return sum(s is not None for s in self._slots)

    @property
    def sessions(self) -> list[Session]:
        """The open sessions, by slot."""
        return [s for s in self._slots if s is not None]

    def reset(self, reference_image, prompt_embeds=None, seed: int = 0, *, prompt: str | None = None) -> None:
        """The one-session shorthand: (re)start the engine's default session (see `open`); `step`,
        `flush`, ... then act on it. The previous default session ends; its slot is reused.

        `prompt` is keyword-only because `prompt_embeds` has long been the second positional argument.
        Bad input raises before anything changes (the previous stream goes on).
        """
        old = self._default
        if old is None:
            self._default = self.open(reference_image, prompt=prompt, prompt_embeds=prompt_embeds, seed=seed)
            return
        check_seed(seed)
        with old._lock:
            # The new state reuses the old one's ring and plan; built first, so bad input changes nothing.
            state = self.open_session(reference_image, prompt_embeds, seed, ring=old.state.ring,
                                      plan=old.state.plan, prompt=prompt)
            with self._slots_lock:
                old.closed = True
                self._default = self._slots[old.slot] = Session(self, state, old.slot)

    @property
    def _session(self) -> _Session | None:
        """The default session's state (runtime/pipeline.py drives its stages directly)."""
        return self._default.state if self._default is not None else None

    @_session.setter
    def _session(self, value: None) -> None:
        if value is not None:
            raise ValueError("only None (end the default session) can be assigned")
        if self._default is not None:
            self._default.close()

    def _default_session(self) -> Session:
        if self._default is None:
            raise RuntimeError("call reset(reference_image) before step()")
        return self._default

    def open_session(self, reference_image, prompt_embeds=None, seed: int = 0, ring: KVRing | None = None,
                     plan: StaticPlan | None = None, *, prompt: str | None = None) -> _Session:
        """A new session's state (batch 1): `ring` and `plan` are reused (the ring cleared) when given.

        Input is validated before anything is touched, so a bad image or prompt changes nothing.
        """
        from .media import load_image, resize_cover_center_crop

        if self.batch != 1:
            raise RuntimeError(f"sessions are batch 1; this engine (batch {self.batch}) only runs batched "
                               "stages: use runtime.batched.BatchedEngine for several sessions")
        cfg = self.config
        image = resize_cover_center_crop(load_image(reference_image), cfg.height, cfg.width)
        embeds = self._prompt_tensor(prompt_embeds, prompt)
        # Everything above validates input; nothing below can fail on user data.
        ref_latent = self._encode_reference(image)
        session = _Session(
            ring=ring if ring is not None else KVRing.allocate(cfg, self.batch, self.device, self.dtype),
            plan=plan if plan is not None else StaticPlan.allocate(cfg.cache, self.batch, self.device),
            text_kv=self.dit.text_kv(embeds),
            ref_latent=ref_latent,
            cond_first=self._cond(ref_latent, first=True),
            cond_rest=self._cond(ref_latent, first=False),
            generator=torch.Generator(self.device).manual_seed(seed),
            audio=AudioStream(cfg.audio, cfg.fps, self.audio_encoder, self.device, self.dtype,
                              max_span_frames=max(cfg.video_frames_in_block(0), cfg.video_frames_in_block(1))),
            decoder=self.new_decoder(),
        )
        session.ring.clear()
        return session

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
        if p.ndim != 3 or p.shape[0] != self.batch or p.shape[-1] != d.text_dim or not 1 <= p.shape[1] <= d.text_len:
            raise ValueError(f"prompt_embeds must be [L, {d.text_dim}] with 1 <= L <= {d.text_len}, "
                             f"got shape {tuple(p.shape)}")
        if not p.is_floating_point() or not torch.isfinite(p).all():
            raise ValueError("prompt_embeds must be finite floating-point values")
        return p.to(self.device, self.dtype)

    @torch.no_grad()
    def _encode_reference(self, image: np.ndarray) -> torch.Tensor:
        img = torch.tensor(image).to(self.device).permute(2, 0, 1)[None].to(self.dtype) / 127.5 - 1
        return self.vae.encode_image(img.expand(self.batch, -1, -1, -1)).float()

    def _cond(self, ref_latent: torch.Tensor, first: bool) -> torch.Tensor:
        B, _, _, h, w = ref_latent.shape
        F = self.config.cache.block_frames
        mask = torch.ones(B, 1, F, h, w, device=self.device)
        if first:
            mask[:, :, 0] = 0  # global latent frame 0 is the reference frame
        return torch.cat([ref_latent.expand(-1, -1, F, -1, -1), mask], dim=1).to(self.dtype)

    def _require_session(self) -> _Session:
        """The default session's state, for code that drives the stages itself (runtime/pipeline.py)."""
        return self._open_state(self._default_session())

    def _open_state(self, session: Session) -> _Session:
        if session.state.flushed:
            raise RuntimeError("this stream was flushed; call reset() (or open()) to start a new one")
        return session.state

    # ---- streaming: the one-session shorthand ----------------------------------------------------
    def step(self, audio_chunk, sample_rate: int = 16000, resample: bool = False) -> list[VideoBlock]:
        """The default session's `Session.step` (see `reset`)."""
        return self._default_session().step(audio_chunk, sample_rate, resample)

    def flush(self) -> list[VideoBlock]:
        return self._default_session().flush()

    def drain(self) -> list[VideoBlock]:
        return self._default_session().drain()

    def end_segment(self) -> list[VideoBlock]:
        return self._default_session().end_segment()

    def idle(self, blocks: int = 1) -> list[VideoBlock]:
        return self._default_session().idle(blocks)

    def interrupt(self) -> int:
        return self._default_session().interrupt()

    @property
    def next_block(self) -> int:
        """Index of the next block the default session will generate."""
        return self._default_session().next_block

    @property
    def pending_samples(self) -> int:
        return self._default_session().pending_samples

    # The stream format, named as family 2's engine names it (integrators and the CLI use either).
    @property
    def sample_rate(self) -> int:
        return self.config.audio.sample_rate

    @property
    def fps(self) -> int:
        return self.config.fps

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the video frames."""
        return self.config.height, self.config.width

    # ---- streaming: what a Session's calls run (the session's lock is held) ----------------------
    def _session_step(self, session: Session, audio_chunk, sample_rate, resample) -> list[VideoBlock]:
        """Audio at another rate is an error unless `resample=True`, which converts it with a streaming
        soxr resampler kept per session (chunking-independent; one input rate per stream)."""
        s = self._open_state(session)
        target = self.config.audio.sample_rate
        check_rate(sample_rate)
        if not isinstance(resample, (bool, np.bool_)):
            raise TypeError(f"resample must be a bool, got {type(resample).__name__}")
        if resample and sample_rate != target:
            check_chunk(audio_chunk, sample_rate, sample_rate)  # before a resampler exists: a refusal changes nothing
            samples = self._resampler(s, sample_rate)(audio_chunk)
        else:
            samples = check_chunk(audio_chunk, sample_rate, target)
        return self._feed(session, samples)

    def _resampler(self, s: _Session, rate: int) -> Resampler:
        if s.resampler is None:
            s.resampler = Resampler(rate, self.config.audio.sample_rate)
        elif s.resampler.from_rate != rate:
            raise ValueError(f"sample rate changed mid-stream ({s.resampler.from_rate} -> {rate} Hz); "
                             "call reset() to start a stream at another rate")
        return s.resampler

    def _session_flush(self, session: Session) -> list[VideoBlock]:
        """Pad with silence so every pushed sample is covered by a block, emit the rest, end the stream."""
        s = self._open_state(session)
        blocks = self._cover_pushed_audio(session)
        s.flushed = True
        return blocks

    def _session_drain(self, session: Session) -> list[VideoBlock]:
        self._open_state(session)
        return []  # blocks run to the end inside the call that made them ready

    def _session_end_segment(self, session: Session) -> list[VideoBlock]:
        """End of an utterance (LiveKit's AudioSegmentEnd): like `flush`, every pushed sample is covered
        by a block now (silence fills the last one), but the stream goes on. The silence queued past
        the last block is dropped, so the next speech starts exactly at the next block boundary."""
        s = self._open_state(session)
        blocks = self._cover_pushed_audio(session)
        s.resampler = None   # flushed: the next segment starts a fresh delay line
        s.audio.truncate(self.config.first_video_frame(s.block) * self.config.samples_per_video_frame)
        return blocks

    def _cover_pushed_audio(self, session: Session) -> list[VideoBlock]:
        s = session.state
        blocks = self._feed(session, s.resampler.flush()) if s.resampler is not None else []
        last = last_block_to_flush(self.config, s.block, s.audio.total_samples)
        if last is not None:
            pad = samples_to_run(self.config, last) - s.audio.total_samples
            blocks += self._feed(session, np.zeros(max(0, pad), np.float32))
        return blocks

    def _session_next_block(self, session: Session) -> int:
        return self._open_state(session).block

    def _session_pending_samples(self, session: Session) -> int:
        s = self._open_state(session)
        covered = self.config.first_video_frame(s.block) * self.config.samples_per_video_frame
        return max(0, s.audio.total_samples - covered)

    def _session_interrupt(self, session: Session) -> int:
        """Barge-in: drop audio pushed but not yet turned into a block; the stream goes on from there.

        The KV cache and the video timeline are kept (the avatar does not jump); the next pushed audio
        drives the next block. Returns the number of samples dropped.
        """
        s = self._open_state(session)
        s.resampler = None  # its buffered input belongs to the dropped audio
        return s.audio.truncate(self.config.first_video_frame(s.block) * self.config.samples_per_video_frame)

    def _session_idle(self, session: Session, blocks: int = 1) -> list[VideoBlock]:
        """Emit `blocks` more blocks driven by silence (listening / idle avatar), after any queued audio."""
        s = self._open_state(session)
        if not isinstance(blocks, (int, np.integer)) or isinstance(blocks, bool) or blocks < 1:
            raise ValueError(f"blocks must be an int >= 1, got {blocks!r}")
        need = samples_to_run(self.config, s.block + blocks - 1)
        return self._feed(session, np.zeros(max(0, need - s.audio.total_samples), np.float32))

    def _feed(self, session: Session, samples: np.ndarray) -> list[VideoBlock]:
        """Push in pieces that fit the bounded audio ring, running blocks as they become ready."""
        s = session.state
        out: list[VideoBlock] = []
        pos = 0
        while pos < len(samples):
            n = min(len(samples) - pos, s.audio.free_samples)
            s.audio.push(samples[pos:pos + n])
            pos += n
            out += self._drain(session)
        return out

    def _drain(self, session: Session) -> list[VideoBlock]:
        cfg = self.config
        s = session.state
        out = []
        while s.audio.ready(cfg.first_video_frame(s.block) + cfg.video_frames_in_block(s.block)):
            with self._compute_lock:
                block = self._run_block(s, session.slot)
            out.append(block)
        return out

    # ---- one block as stages: begin (host) -> audio -> step 0..N-1 -> refresh -> decode -> finish --------
    # The sequential path below runs them in order; runtime/scheduled.py runs the same methods as a DAG
    # (decode of block b overlapping the denoising of block b+1).
    def _run_block(self, s: _Session, slot: int = 0) -> VideoBlock:
        """One block in order; a stage that raises (or a non-finite output) fails the session alone."""
        clock = time.perf_counter
        b, stage = s.block, "begin"
        try:
            work = self.begin_block(s)
            t0 = clock()
            stage = "audio"
            self.stage_audio(s, work)
            t1 = clock()
            for i in range(self.config.sampler.num_steps):
                stage = f"step{i}"
                self.stage_denoise(s, work, i)
            stage = "refresh"
            self.stage_refresh(s, work)
            t2 = clock()
            stage = "decode"
            self.stage_decode(s, work)
            stage = "finish"
            block = self.finish_block(s, work)
        except Exception as err:
            raise BlockFailedError(f"session {slot}: stage '{stage}' of block {b} failed: {type(err).__name__}: "
                                   f"{err}", session=slot, block=b, stage=stage) from err
        t3 = clock()
        block.timings = {"audio": t1 - t0, "denoise": t2 - t1, "decode": t3 - t2, "total": t3 - t0}
        return block

    def begin_block(self, s: _Session) -> BlockWork:
        """Host-side planning of the session's next block; draws its noise (fixed order: determinism)."""
        cfg = self.config
        b = s.block
        s.block += 1
        _, C, _, h, w = s.ref_latent.shape
        shape = (cfg.sampler.num_steps, self.batch, C, cfg.cache.block_frames, h, w)
        noise = torch.randn(shape, generator=s.generator, device=self.device, dtype=torch.float32)
        v0, n, spf = cfg.first_video_frame(b), cfg.video_frames_in_block(b), cfg.samples_per_video_frame
        plan = plan_block(b, cfg.cache, self.batch)
        return BlockWork(index=b, first_frame=v0, num_frames=n, host_plan=plan, noise=noise,
                         audio=s.audio.samples(v0 * spf, (v0 + n) * spf))

    @torch.no_grad()
    def stage_audio(self, s: _Session, w: BlockWork) -> None:
        cfg = self.config
        feats = s.audio.features(w.first_frame, w.first_frame + w.num_frames)
        if w.index == 0:
            # latent frame 0 <-> video frame 0, repeated so every latent frame has `audio_pack` frames
            feats = torch.cat([feats[:, :1].expand(-1, cfg.dit.audio_pack - 1, -1), feats], dim=1)
        audio = self.dit.audio_cond(feats.to(self.dtype).expand(self.batch, -1, -1))
        w.inputs = BlockInputs(noise=w.noise, cond=s.cond_first if w.index == 0 else s.cond_rest, audio=audio,
                               ref_latent=s.ref_latent if w.index == 0 else None)

    @torch.no_grad()
    def stage_denoise(self, s: _Session, w: BlockWork, step: int) -> None:
        if step == 0:
            # The static plan changes only here, after the previous block's refresh has used it.
            w.plan = s.plan.update(w.host_plan)
            w.x = w.inputs.noise[0]
        w.x = denoise_step(self.dit, self.ops, w.inputs, w.x, step, self._mods[step], self.config.sampler.sigmas,
                           s.text_kv, s.ring.k, s.ring.v, w.plan)

    @torch.no_grad()
    def stage_refresh(self, s: _Session, w: BlockWork) -> None:
        refresh_kv(self.dit, self.ops, w.inputs, w.x, self._mods[-1], s.text_kv, s.ring.k, s.ring.v, w.plan)

    @torch.no_grad()
    def stage_decode(self, s: _Session, w: BlockWork) -> None:
        w.video = s.decoder.decode(w.x.to(self.dtype))

    def finish_block(self, s: _Session, w: BlockWork) -> VideoBlock:
        """Frames leave as a uint8 host copy, never a view of an engine-owned buffer."""
        cfg = self.config
        check_finite(w.x, "denoised latent", w.index)
        check_finite(w.video, "decoded frames", w.index)
        frames = frames_uint8(w.video)
        v0 = w.first_frame
        return VideoBlock(index=w.index, frames=frames, first_frame=v0, pts=v0 / cfg.fps, audio=w.audio)


def samples_to_run(cfg: EngineConfig, block: int) -> int:
    """Samples a stream must hold before `block` can run: up to its last frame plus the lookahead."""
    end_frame = cfg.first_video_frame(block) + cfg.video_frames_in_block(block)
    return (end_frame + cfg.audio.window_frames(cfg.fps)[1]) * cfg.samples_per_video_frame


def last_block_to_flush(cfg: EngineConfig, next_block: int, total_samples: int) -> int | None:
    """The last block a flush runs so every pushed sample is covered; None when none is pending."""
    frames_needed = -(-total_samples // cfg.samples_per_video_frame)
    if frames_needed <= cfg.first_video_frame(next_block):
        return None
    last = next_block
    while cfg.first_video_frame(last) + cfg.video_frames_in_block(last) < frames_needed:
        last += 1
    return last


def frames_uint8(video: torch.Tensor) -> np.ndarray:
    """Decoded video [B, 3, N, H, W] in [-1, 1] -> batch row 0 as a uint8 [N, H, W, 3] host copy."""
    frames = ((video[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return frames.permute(1, 2, 3, 0).cpu().numpy()


def check_finite(t: torch.Tensor, what: str, block: int) -> None:
    """A block whose output holds NaN or Inf fails (its session), never reaching the caller as frames."""
    if not bool(torch.isfinite(t).all()):
        raise FloatingPointError(f"block {block}: the {what} are not finite (NaN or Inf)")


def check_seed(seed) -> None:
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, (bool, np.bool_)) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")


def check_rate(sample_rate) -> None:
    if not isinstance(sample_rate, (int, np.integer)) or isinstance(sample_rate, (bool, np.bool_)):
        raise TypeError(f"sample_rate must be an int (samples per second), got {type(sample_rate).__name__} "
                        f"{sample_rate!r}")
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")


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
