"""LiveTalk's round stages over static buffers, captured as CUDA graphs per stage and batch size.

A graph replays fixed kernels on fixed addresses, so every stage of a round reads and writes buffers
that live as long as the family. Already static: the shared KV ring, text K/V and device plan
(stages.SharedRows) and the time modulation. Here, per batch size b of the family's `batch_sizes`
(up to the shared rows): the round's inputs (noise, condition, audio, reference latent and the rows
it pins, the padding mask) and x; per slot: the streaming decoder's two inputs, its causal cache and
its output frames.

    stage (batch b)     reads -> writes
    save                ring span of block 0's write slots -> scratch (launched when a round pads)
    step{i}             x (noise[0] at step 0), inputs, ring -> x; the block's K/V into the ring
    refresh             x0 at t = 0 -> the block's clean K/V into the ring
    restore             scratch -> the padded rows' span (masked): a waiting session's ring unchanged
    stage (slot j)
    decode/first        block 0 from input 0: its first latent frame alone (fresh cache), then the rest
    decode/later{p}     a later block from input p = block % 2, with the cache of the previous block

Not captured, one Python call each (host work the issue of the C++ scheduler leaves to Python):
`load` (the round's inputs into batch b's buffers, the ring plan; compute lane), `handoff` (x's rows
into the slots' decode inputs; compute lane) and `collect` (a session's frames copied out; decode
lane). Two decode inputs per slot suffice: the engine keeps at most two rounds in flight, so when
block k is handed off, block k - 2's decode (same input) has finished.

Every stage has an eager body over the static buffers. On CUDA, unless the engine runs
mode="eager", the bodies are captured at the family's first session (`RoundStages.capture`): the
round's tasks then carry the graphs, which the C++ cuda backend launches as raw graph execs (no
Python call), the torch backend replays, and the host backend and the inline runner run as bodies.
A stage whose capture fails runs its body (one warning naming it and why).
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ...core.engine import MAX_ROUNDS_IN_FLIGHT
from ...sampler import BlockInputs, denoise_step, refresh_kv
from ...scheduler import Task

log = logging.getLogger(__name__)

DECODE_INPUTS = 2  # per slot: blocks k and k + 1 may be in flight, block k + 2 reuses k's input
assert MAX_ROUNDS_IN_FLIGHT <= DECODE_INPUTS, "a slot's decode input could be rewritten while it is read"

WARMUP_RUNS = 2    # eager runs before a capture: lazy init, Triton compiles, allocator growth


@dataclass
class Stage:
    """One stage: its eager body over static buffers and, once captured, its CUDA graph."""

    name: str
    body: Callable[[], None]
    graph: torch.cuda.CUDAGraph | None = None
    fallback: str | None = None      # why it runs its body on a device that captures

    def task(self, lane: str, **kw) -> Task:
        """The stage in a round: the graph (with replay as the body a Python lane runs) or the body."""
        fn = self.graph.replay if self.graph is not None else self.body
        return Task(self.name, lane, fn, graph=self.graph, **kw)


@dataclass
class BatchStages:
    """The batched stages of one batch size and the buffers they read and write."""

    batch: int
    inputs: BlockInputs                # noise, cond, audio, ref_latent and pin: all [batch, ...]
    x: torch.Tensor                    # [batch, C, F, h, w] fp32: x_t between steps, then x0
    pad: torch.Tensor | None           # [1, batch, 1, 1, 1] bool: rows not in the round (batch > 1)
    stages: dict[str, Stage] = field(default_factory=dict)


@dataclass
class SlotDecoder:
    """One slot's streaming decode over static buffers (a session's decoder while it holds the slot)."""

    slot: int
    z: torch.Tensor                    # [DECODE_INPUTS, 1, C, F, h, w] fp32: the handed-off x0
    cache: list[torch.Tensor]          # the decoder's causal cache (layout of init_decode_cache)
    out_first: torch.Tensor            # [1, 3, 1 + tf * (F - 1), H, W]: block 0's frames
    out_later: torch.Tensor            # [1, 3, tf * F, H, W]
    stages: dict[str, Stage] = field(default_factory=dict)

    def stage_for(self, block: int) -> Stage:
        return self.stages["decode/first" if block == 0 else f"decode/later{block % DECODE_INPUTS}"]

    def output(self, block: int) -> torch.Tensor:
        return self.out_first if block == 0 else self.out_later


class RoundStages:
    """Every batch size's stages and every slot's decoder of one LiveTalk family (module docstring)."""

    def __init__(self, family):
        self.family = family
        cfg = family.config
        rows = family.rows
        C, (h, w) = cfg.vae.z_dim, cfg.latent_hw
        self.span = slice(0, cfg.cache.block_frames * cfg.tokens_per_frame)  # block 0's write slots
        sizes = sorted({family.padded(n) for n in range(1, rows.batch + 1)})
        self.scratch = None
        if max(sizes) > 1:  # padding is possible: one scratch of the largest batch, shared (views)
            k = rows.ring.k[:, :, self.span]
            self.scratch = (torch.empty_like(k), torch.empty_like(k))
        self.batches = {b: self._batch_stages(b, C, h, w) for b in sizes}
        self.slots = [self._slot_decoder(j, C, h, w) for j in range(family.max_sessions)]
        self.captured = False

    # ---- buffers and bodies ------------------------------------------------------------------------
    def _batch_stages(self, b: int, C: int, h: int, w: int) -> BatchStages:
        f = self.family
        cfg, dev = f.config, f.device
        F = cfg.cache.block_frames
        inputs = BlockInputs(
            noise=torch.zeros(cfg.sampler.num_steps, b, C, F, h, w, device=dev),
            cond=torch.zeros(b, C + 1, F, h, w, device=dev, dtype=f.dtype),
            audio=torch.zeros(b, F, len(cfg.dit.audio_layers), cfg.dit.dim, device=dev, dtype=f.dtype),
            ref_latent=torch.zeros(b, C, 1, h, w, device=dev),
            pin=torch.zeros(b, 1, 1, 1, 1, dtype=torch.bool, device=dev))
        pad = torch.zeros(1, b, 1, 1, 1, dtype=torch.bool, device=dev) if b > 1 else None
        stages = BatchStages(b, inputs, torch.zeros(b, C, F, h, w, device=dev), pad)
        for i in range(cfg.sampler.num_steps):
            self._add(stages.stages, f"step{i}", self._step_body(stages, i))
        self._add(stages.stages, "refresh", self._refresh_body(stages))
        if pad is not None:
            self._add(stages.stages, "save", self._save_body(b))
            self._add(stages.stages, "restore", self._restore_body(stages))
        return stages

    @staticmethod
    def _add(stages: dict[str, Stage], name: str, body: Callable[[], None]) -> None:
        stages[name] = Stage(name, body)

    def _step_body(self, S: BatchStages, step: int) -> Callable[[], None]:
        f = self.family
        ring_k, ring_v, text_kv, plan = f.rows.head(S.batch)
        mod, sigmas = f.mods_for(S.batch)[step], f.config.sampler.sigmas

        @torch.no_grad()
        def body() -> None:
            x = S.inputs.noise[0] if step == 0 else S.x
            S.x.copy_(denoise_step(f.dit, f.ops, S.inputs, x, step, mod, sigmas, text_kv, ring_k, ring_v, plan))
        return body

    def _refresh_body(self, S: BatchStages) -> Callable[[], None]:
        f = self.family
        ring_k, ring_v, text_kv, plan = f.rows.head(S.batch)
        mod = f.mods_for(S.batch)[-1]

        @torch.no_grad()
        def body() -> None:
            refresh_kv(f.dit, f.ops, S.inputs, S.x, mod, text_kv, ring_k, ring_v, plan)
        return body

    def _save_body(self, b: int) -> Callable[[], None]:
        ring = self.family.rows.ring
        saved = [s[:, :b] for s in self.scratch]

        def body() -> None:
            for kept, live in zip(saved, (ring.k, ring.v)):
                kept.copy_(live[:, :b, self.span])
        return body

    def _restore_body(self, S: BatchStages) -> Callable[[], None]:
        ring, b = self.family.rows.ring, S.batch
        saved = [s[:, :b] for s in self.scratch]

        def body() -> None:
            for kept, live in zip(saved, (ring.k, ring.v)):
                span = live[:, :b, self.span]
                span.copy_(torch.where(S.pad, kept, span))
        return body

    def _slot_decoder(self, j: int, C: int, h: int, w: int) -> SlotDecoder:
        f = self.family
        cfg, dev = f.config, f.device

        def frames(block: int) -> torch.Tensor:
            return torch.zeros(1, 3, cfg.video_frames_in_block(block), cfg.height, cfg.width, device=dev,
                               dtype=f.dtype)

        d = SlotDecoder(j, torch.zeros(DECODE_INPUTS, 1, C, cfg.cache.block_frames, h, w, device=dev),
                        f.decoder_model.init_decode_cache(1, h, w, device=dev, dtype=f.dtype),
                        out_first=frames(0), out_later=frames(1))
        self._add(d.stages, "decode/first", self._decode_first_body(d))
        for p in range(DECODE_INPUTS):
            self._add(d.stages, f"decode/later{p}", self._decode_later_body(d, p))
        return d

    def _decode_first_body(self, d: SlotDecoder) -> Callable[[], None]:
        model, dtype = self.family.decoder_model, self.family.dtype

        @torch.no_grad()
        def body() -> None:
            # As runtime.models.streaming.StreamingDecoder.decode at a stream's start.
            z = d.z[0].to(dtype)
            first, cache = model.decode_step(z[:, :, :1], None, first=True)
            parts = [first]
            if z.shape[2] > 1:
                rest, cache = model.decode_step(z[:, :, 1:], cache, first=False)
                parts.append(rest)
            d.out_first.copy_(torch.cat(parts, dim=2))
            _copy_cache(d.cache, cache)
        return body

    def _decode_later_body(self, d: SlotDecoder, p: int) -> Callable[[], None]:
        model, dtype = self.family.decoder_model, self.family.dtype

        @torch.no_grad()
        def body() -> None:
            frames, cache = model.decode_step(d.z[p].to(dtype), d.cache, first=False)
            d.out_later.copy_(frames)
            _copy_cache(d.cache, cache)
        return body

    # ---- capture -------------------------------------------------------------------------------------
    def all_stages(self) -> list[tuple[str, Stage]]:
        """(pool, stage) of every stage: "dit" stages run on the compute lane, "vae" on the decode lane."""
        out = [("dit", s) for b in self.batches.values() for s in b.stages.values()]
        return out + [("vae", s) for d in self.slots for s in d.stages.values()]

    def capture(self) -> None:
        """Capture every stage (a CUDA family, before any session: the warm-up runs write the ring and
        the decoders' caches, which are cleared afterwards). One pool per lane: stages of one lane
        never run concurrently, and every output lands in a static buffer, so they share it."""
        main = torch.cuda.current_stream(self.family.device)
        side = torch.cuda.Stream(self.family.device)
        side.wait_stream(main)
        pools = {"dit": torch.cuda.graph_pool_handle(), "vae": torch.cuda.graph_pool_handle()}
        with torch.cuda.stream(side):
            for pool, stage in self.all_stages():
                self._capture(stage, pools[pool], side)
        main.wait_stream(side)
        self.clear()
        self.captured = True
        done = [s.name for _, s in self.all_stages() if s.graph is not None]
        log.info("graphs: captured %d of %d stages (batch sizes %s, %d slots)", len(done), len(self.all_stages()),
                 ", ".join(map(str, self.batches)), len(self.slots))

    @staticmethod
    def _capture(stage: Stage, pool, stream: torch.cuda.Stream) -> None:
        # Warm-up is eager work that must succeed: an error here is a bug in the stage, so it propagates.
        for _ in range(WARMUP_RUNS):
            stage.body()
        stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                stage.body()
        except Exception as err:  # noqa: BLE001 - any capture failure means: run this stage's body
            _drain(stream)
            first_line = str(err).splitlines()[0] if str(err) else ""
            stage.fallback = f"capture failed: {type(err).__name__}: {first_line}"
            log.warning("graphs: stage %s falls back to its eager body (%s)", stage.name, stage.fallback)
            return
        stage.graph = graph

    def clear(self) -> None:
        """Zero the ring and every static buffer (after capture's warm-up runs)."""
        self.family.rows.ring.clear()
        for b in self.batches.values():
            for t in (b.inputs.noise, b.inputs.cond, b.inputs.audio, b.inputs.ref_latent, b.x):
                t.zero_()
        for d in self.slots:
            for t in (d.z, *d.cache, d.out_first, d.out_later):
                t.zero_()

    @property
    def fallbacks(self) -> dict[str, str]:
        return {s.name: s.fallback for _, s in self.all_stages() if s.fallback}


def _copy_cache(static: list[torch.Tensor], new: list[torch.Tensor]) -> None:
    for old, fresh in zip(static, new):
        old.copy_(fresh)


def _drain(stream: torch.cuda.Stream) -> None:
    """`torch.cuda.graph` ended the capture on exit; drain the stream so that an error left pending by
    the invalidated capture does not surface in an unrelated later call."""
    try:
        stream.synchronize()
    except Exception as err:  # noqa: BLE001 - best effort: a real fault shows again at the next sync
        log.debug("graphs: error drained after a failed capture: %s", err)
