"""CUDA-graph capture of the engine's block stages over static buffers, with an eager fallback.

A graph replays the same kernels on the same addresses, so every stage reads and writes buffers that
live as long as the engine (`StaticBuffers`): per-block inputs are copied in before the stage, the
decoded frames are copied out after it (callers never see graph-owned memory).

Stages and variants (block 0 differs: the reference latent is pinned into latent frame 0, the mask
of its conditioning differs, and its first latent frame decodes to one video frame on its own):

    step{i}/first, step{i}/later   denoising step i          x <- denoise_step(x)  (step 0 reads noise[0])
    refresh/first, refresh/later   t = 0 forward             writes the clean K/V into the ring
    decode_first                   first latent frame        out <- 1 video frame (fresh decoder cache)
    decode/first, decode/later     the block's latent frames out <- 8 / 12 video frames, cache updated

Each stage has an eager body (a function of no arguments over the static buffers); capture records
that body, and when capture fails, or there is no GPU, the body itself runs, so graph and eager
stages can be mixed freely (they share every buffer). The noise is drawn outside any graph, by
`Engine.begin_block`, and copied in: a raw graph launch would not advance the RNG offset.

Not captured (per block, tiny): the copy-in of the plan, noise and audio condition (`load_block`),
the hand-off of x0 to the decode lane (`handoff`), the copy-out of the frames (`decode`).
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .sampler import BlockInputs, denoise_step, refresh_kv

log = logging.getLogger(__name__)

__all__ = ["StageGraphs", "StaticBuffers", "variant"]


def variant(block_index: int) -> str:
    """Which captured variant a block uses: block 0 pins the reference latent, later blocks do not."""
    return "first" if block_index == 0 else "later"


@dataclass
class StaticBuffers:
    """Engine-lifetime buffers the stage graphs read and write (addresses never change)."""

    noise: torch.Tensor            # [steps, B, C, F, h, w] fp32, copied in per block
    audio: torch.Tensor            # [B, F, A, dim] model dtype, copied in per block
    x: torch.Tensor                # [B, C, F, h, w] fp32: x_t between steps, then x0
    ref_latent: torch.Tensor       # [B, C, 1, h, w] fp32, per session
    cond_first: torch.Tensor       # [B, C + 1, F, h, w] model dtype, per session
    cond_rest: torch.Tensor
    text_kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer [B, text_len, H, D], per session
    handoff: tuple[torch.Tensor, torch.Tensor]        # x0 of even / odd blocks, for the decode lane
    z: torch.Tensor                # [B, C, F, h, w] fp32: the latent block being decoded
    cache: list[torch.Tensor]      # streaming VAE decoder cache (layout of WanVAE.init_decode_cache)

    @classmethod
    def like_session(cls, engine, s) -> StaticBuffers:
        cfg = engine.config
        B, C, _, h, w = s.ref_latent.shape
        F = cfg.cache.block_frames
        dev = engine.device

        def latent() -> torch.Tensor:
            return torch.zeros(B, C, F, h, w, device=dev)

        audio_shape = (B, F, len(cfg.dit.audio_layers), cfg.dit.dim)
        return cls(
            noise=torch.zeros(cfg.sampler.num_steps, B, C, F, h, w, device=dev),
            audio=torch.zeros(audio_shape, device=dev, dtype=engine.dtype),
            x=latent(), ref_latent=torch.zeros_like(s.ref_latent),
            cond_first=torch.zeros_like(s.cond_first), cond_rest=torch.zeros_like(s.cond_rest),
            text_kv=[(torch.zeros_like(k), torch.zeros_like(v)) for k, v in s.text_kv],
            handoff=(latent(), latent()), z=latent(),
            cache=engine.decoder_model.init_decode_cache(B, h, w, device=dev, dtype=engine.dtype),
        )


class StageGraphs:
    """The block stages of one engine as CUDA graphs (or eager bodies) over `StaticBuffers`.

    Built once per engine at its first session (the KV ring and the device plan it captures are
    reused by every later session); `load_session` copies a new session's constants in.
    capture: None = capture when the engine is on a CUDA device; False = never (eager bodies).
    """

    def __init__(self, engine, session, *, capture: bool | None = None, warmup: int = 2):
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1 (capture needs a warmed-up allocator), got {warmup}")
        self.engine, self.warmup = engine, warmup
        self.ring, self.plan = session.ring, session.plan
        self.buffers = StaticBuffers.like_session(engine, session)
        self.eager_out: dict[str, torch.Tensor] = {}  # frames of a decode body's latest eager run
        self.graph_out: dict[str, torch.Tensor] = {}  # frames a captured decode graph writes (graph-owned)
        self.graphs: dict[str, torch.cuda.CUDAGraph] = {}
        self.fallbacks: dict[str, str] = {}  # stage -> why it runs eagerly
        self.bodies = self._bodies()
        self.load_session(session)
        want = engine.device.type == "cuda" if capture is None else capture
        if want and engine.device.type != "cuda":
            raise ValueError(f"capture=True needs a CUDA engine, this one is on {engine.device}")
        if want:
            self._capture_all(session)
        else:
            why = "no CUDA device" if engine.device.type != "cuda" else "capture disabled"
            self.fallbacks = dict.fromkeys(self.bodies, why)
            log.info("graphs: %s; stages %s run eagerly over the static buffers", why, ", ".join(self.bodies))

    # ---- bodies ----------------------------------------------------------------------------------
    def _inputs(self, first: bool) -> BlockInputs:
        S = self.buffers
        return BlockInputs(noise=S.noise, cond=S.cond_first if first else S.cond_rest, audio=S.audio,
                           ref_latent=S.ref_latent if first else None)

    def _bodies(self) -> dict[str, Callable[[], None]]:
        bodies: dict[str, Callable[[], None]] = {}
        for v in ("first", "later"):
            for i in range(self.engine.config.sampler.num_steps):
                bodies[f"step{i}/{v}"] = self._step_body(i, v == "first")
            bodies[f"refresh/{v}"] = self._refresh_body(v == "first")
        bodies["decode_first"] = self._decode_body("decode_first", lambda S: S.ref_latent, first=True)
        if self.engine.config.cache.block_frames > 1:  # else block 0 is its first latent frame alone
            bodies["decode/first"] = self._decode_body("decode/first", lambda S: S.z[:, :, 1:], first=False)
        bodies["decode/later"] = self._decode_body("decode/later", lambda S: S.z, first=False)
        return bodies

    def _step_body(self, step: int, first: bool) -> Callable[[], None]:
        e, S, inputs = self.engine, self.buffers, self._inputs(first)

        @torch.no_grad()
        def body() -> None:
            x = S.noise[0] if step == 0 else S.x  # as Engine.stage_denoise: step 0 starts from noise[0]
            x = denoise_step(e.dit, e.ops, inputs, x, step, e.mods_for(1)[step], e.config.sampler.sigmas,
                             S.text_kv, self.ring.k, self.ring.v, self.plan.plan)
            S.x.copy_(x)
        return body

    def _refresh_body(self, first: bool) -> Callable[[], None]:
        e, S, inputs = self.engine, self.buffers, self._inputs(first)

        @torch.no_grad()
        def body() -> None:
            refresh_kv(e.dit, e.ops, inputs, S.x, e.mods_for(1)[-1], S.text_kv, self.ring.k, self.ring.v,
                       self.plan.plan)
        return body

    def _decode_body(self, name: str, latent: Callable[[StaticBuffers], torch.Tensor],
                     first: bool) -> Callable[[], None]:
        e, S = self.engine, self.buffers

        @torch.no_grad()
        def body() -> None:
            # As StreamingVAEDecoder.decode: the first latent frame of a stream alone (fresh cache),
            # later frames with the cache of the previous step; the new cache is copied back in place.
            frames, cache = e.decoder_model.decode_step(latent(S).to(e.dtype), None if first else S.cache, first=first)
            for old, new in zip(S.cache, cache):
                old.copy_(new)
            self.eager_out[name] = frames  # during capture: the tensor every replay rewrites
        return body

    # ---- capture ---------------------------------------------------------------------------------
    def _capture_all(self, session) -> None:
        main = torch.cuda.current_stream()
        side = torch.cuda.Stream()
        side.wait_stream(main)
        pools = {"dit": torch.cuda.graph_pool_handle(), "vae": torch.cuda.graph_pool_handle()}
        with torch.cuda.stream(side):
            for name, body in self.bodies.items():
                graph = self._capture(name, body, pools["vae" if name.startswith("decode") else "dit"], side)
                if graph is not None:
                    self.graphs[name] = graph
        main.wait_stream(side)
        # Warm-up ran every body for real: start the session from a clean ring and decoder cache.
        session.ring.clear()
        for c in self.buffers.cache:
            c.zero_()
        log.info("graphs: captured %d of %d stages (%s)", len(self.graphs), len(self.bodies),
                 ", ".join(self.graphs) or "none")

    def _capture(self, name: str, body: Callable[[], None], pool, stream: torch.cuda.Stream):
        # Warm-up is eager work that must succeed (lazy init, autotuning, allocator growth): an error
        # here is a bug in the stage, not a capture problem, so it propagates.
        for _ in range(self.warmup):
            body()
        stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                body()
        except Exception as err:  # noqa: BLE001 - any capture failure means: run this stage eagerly
            self._after_failed_capture(stream)
            reason = f"capture failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            self.fallbacks[name] = reason
            log.warning("graphs: stage %s falls back to eager (%s)", name, reason)
            return None
        if name in self.eager_out:
            self.graph_out[name] = self.eager_out.pop(name)
        return graph

    @staticmethod
    def _after_failed_capture(stream: torch.cuda.Stream) -> None:
        """`torch.cuda.graph` has ended the capture on exit; drain the stream so that an error left
        pending by the invalidated capture does not surface in an unrelated later call."""
        try:
            stream.synchronize()
        except Exception as err:  # noqa: BLE001 - best effort: a real fault shows again at the next sync
            log.debug("graphs: error drained after a failed capture: %s", err)

    # ---- per session / per block -----------------------------------------------------------------
    def load_session(self, s) -> None:
        """Copy a new session's constants in (on the current stream, before any block)."""
        S = self.buffers
        if s.ring is not self.ring or s.plan is not self.plan:
            raise RuntimeError("the session's KV ring / device plan are not the ones the graphs captured")
        S.ref_latent.copy_(s.ref_latent)
        S.cond_first.copy_(s.cond_first)
        S.cond_rest.copy_(s.cond_rest)
        for (k, v), (k_new, v_new) in zip(S.text_kv, s.text_kv):
            k.copy_(k_new)
            v.copy_(v_new)

    def load_block(self, s, w) -> None:
        """Per-block inputs in: the ring plan (after the previous refresh), the noise, the audio condition."""
        w.plan = s.plan.update(w.host_plan)
        cfg = self.engine.config
        s.ring.follow(w.plan, cfg.tokens_per_frame, cfg.dit.rope_theta, w.index)   # fully roped rings only
        self.buffers.noise.copy_(w.noise)
        self.buffers.audio.copy_(w.inputs.audio)

    def run(self, name: str) -> None:
        """Replay the stage's graph on the current stream, or run its body eagerly (fallback)."""
        graph = self.graphs.get(name)
        if graph is not None:
            graph.replay()
        else:
            self.bodies[name]()

    def handoff(self, block_index: int) -> None:
        """x0 to the decode lane's buffer of this block's parity (the dit lane reuses x at once)."""
        self.buffers.handoff[block_index % 2].copy_(self.buffers.x)

    def output(self, name: str) -> torch.Tensor:
        """The frames of a decode stage's latest run (graph-owned for a captured stage: copy them)."""
        return self.graph_out[name] if name in self.graphs else self.eager_out[name]

    def decode(self, block_index: int) -> torch.Tensor:
        """Decode a handed-off block; returns a copy of its frames (without the first frame in block 0)."""
        self.buffers.z.copy_(self.buffers.handoff[block_index % 2])
        name = f"decode/{variant(block_index)}"
        self.run(name)
        return self.output(name).clone()

    def decode_first(self) -> torch.Tensor:
        """The stream's first video frame, from the reference latent: a copy."""
        self.run("decode_first")
        return self.output("decode_first").clone()

    @property
    def captured(self) -> tuple[str, ...]:
        return tuple(self.graphs)
