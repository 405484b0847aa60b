"""LiveTalk's block stages, batched over the sessions of a round.

A round's rows are the sessions that run a block now, each at its own block index. Per session, on
the caller's thread and in block order (`plan_block`): the host plan, the noise draw from the
session's generator (shape [steps, 1, ...], as a session alone draws it), the wav2vec2 window and
the audio condition. Batched (`round_tasks`, lane "compute"): one DiT forward per denoising step and
one for the t=0 KV refresh over rows 0..batch-1 of the shared rows (KV ring, text K/V, device plan:
row = slot). Per session again (lane "decode"): the streaming VAE decode with its own causal cache.

Padding: rows of the batch without a block in this round (free slots, sessions still waiting for
audio) run on zero inputs with block 0's plan, which writes K/V into ring slots 0..F-1 of their row;
those slots are saved before the round's first forward and restored after its refresh, so a padded
session's ring is left exactly as it was. The cost: 2 copies of one block's K/V per padded row.

Ordering across rounds: every batched task of round r+1 runs after round r's on the compute lane
(lanes are FIFO), so the shared device plan and the ring are rewritten only after round r's refresh;
x and the frames are per-round tensors, so round r's decode may still run while round r+1 denoises.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from ...audio import AudioStream
from ...config import EngineConfig
from ...core.blocks import VideoBlock, check_finite, frames_uint8
from ...models.dit import BlockPlan, TimeMod
from ...models.taehv import StreamingTAEHVDecoder
from ...models.vae import StreamingVAEDecoder
from ...sampler import BlockInputs, denoise_step, refresh_kv
from ...scheduler import Task
from ...session import KVRing, StaticPlan, plan_block
from ...transfer import copy_into
from ..base import BATCH, Family, Row, SessionState


@dataclass
class TalkState(SessionState):
    slot: int = 0
    ring: KVRing | None = None        # row `slot` of the shared ring (a view)
    plan: StaticPlan | None = None    # batch-1 device plan, for the single-row stages (pipeline ranks)
    text_kv: list | None = None       # per layer (k, v): row `slot` of the shared text K/V (views)
    ref_latent: torch.Tensor | None = None   # [1, C, 1, h, w] fp32
    cond_first: torch.Tensor | None = None   # [1, C + 1, F, h, w]: block 0 (mask 0 on frame 0)
    cond_rest: torch.Tensor | None = None    # later blocks (mask 1 everywhere)
    generator: torch.Generator | None = None
    decoder: StreamingVAEDecoder | StreamingTAEHVDecoder | None = None
    audio: AudioStream | None = None


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
    video: torch.Tensor | None = None  # decoded frames [1, 3, N, H, W] in [-1, 1]
    # The samples the block covers, copied when it is planned: its audio may be released from the
    # ring by a later block's audio stage before this block finishes.
    audio: np.ndarray | None = None


@dataclass
class SharedRows:
    """What the batched stages read, one row per slot: the KV ring, the text K/V, the device plan."""

    ring: KVRing
    text_kv: list[tuple[torch.Tensor, torch.Tensor]]
    plan: StaticPlan
    batch: int

    @classmethod
    def allocate(cls, cfg: EngineConfig, batch: int, device, dtype, *, roped: bool = False) -> SharedRows:
        d = cfg.dit
        shape = (batch, d.text_len, d.num_heads, d.head_dim)
        text_kv = [(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))
                   for _ in range(d.num_layers)]
        return cls(ring=KVRing.allocate(cfg, batch, device, dtype, roped=roped), text_kv=text_kv,
                   plan=StaticPlan.allocate(cfg.cache, batch, device), batch=batch)

    def ring_row(self, slot: int) -> KVRing:
        return self.ring.rows(slot, slot + 1)

    def set_text_kv(self, slot: int, text_kv) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Copy a session's text K/V into its row; returns the row views."""
        rows = []
        for (k_all, v_all), (k, v) in zip(self.text_kv, text_kv):
            k_all[slot:slot + 1].zero_()
            v_all[slot:slot + 1].zero_()
            k_all[slot:slot + 1, :k.shape[1]].copy_(k)
            v_all[slot:slot + 1, :v.shape[1]].copy_(v)
            rows.append((k_all[slot:slot + 1], v_all[slot:slot + 1]))
        return rows

    def head(self, batch: int):
        """Rows 0..batch-1 (views): ring k, ring v, text K/V, device plan."""
        plan = BlockPlan(*(getattr(self.plan.plan, n)[:batch] for n in ("write_slots", "slot_pos", "q_pos")))
        return (self.ring.k[:, :batch], self.ring.v[:, :batch],
                [(k[:batch], v[:batch]) for k, v in self.text_kv], plan)


class LiveTalkStages(Family):
    """The stage bodies of family.LiveTalk (which holds the models, config and shared rows)."""

    def time_mods(self, batch: int) -> list[TimeMod]:
        """Modulation of every step's timestep (and the refresh's) for every frame of a block, once."""
        s = self.config.sampler
        frames = self.config.cache.block_frames
        mods = []
        for t in [*s.timesteps, s.refresh_timestep]:
            mod = self.dit.time_mod(torch.full((1, frames), float(t)))
            mods.append(TimeMod(blocks=mod.blocks.expand(batch, -1, -1, -1).contiguous(),
                                head=mod.head.expand(batch, -1, -1).contiguous()))
        return mods

    def mods_for(self, batch: int) -> list[TimeMod]:
        return [TimeMod(blocks=m.blocks[:batch], head=m.head[:batch]) for m in self._mods]

    # ---- per session, caller thread, block order ---------------------------------------------------
    def plan_block(self, state: TalkState) -> BlockWork:
        work = self.begin_block(state)
        self.stage_audio(state, work)
        return work

    def begin_block(self, s: TalkState) -> BlockWork:
        """Host-side planning of the session's next block; draws its noise (fixed order: determinism)."""
        cfg = self.config
        b = s.block
        s.block += 1
        _, C, _, h, w = s.ref_latent.shape
        shape = (cfg.sampler.num_steps, 1, C, cfg.cache.block_frames, h, w)
        noise = torch.randn(shape, generator=s.generator, device=self.device, dtype=torch.float32)
        v0, n, spf = cfg.first_video_frame(b), cfg.video_frames_in_block(b), cfg.samples_per_video_frame
        return BlockWork(index=b, first_frame=v0, num_frames=n, host_plan=plan_block(b, cfg.cache, 1), noise=noise,
                         audio=s.audio.samples(v0 * spf, (v0 + n) * spf))

    @torch.no_grad()
    def stage_audio(self, s: TalkState, w: BlockWork) -> None:
        cfg = self.config
        feats = s.audio.features(w.first_frame, w.first_frame + w.num_frames)
        if w.index == 0:
            # latent frame 0 <-> video frame 0, repeated so every latent frame has `audio_pack` frames
            feats = torch.cat([feats[:, :1].expand(-1, cfg.dit.audio_pack - 1, -1), feats], dim=1)
        audio = self.dit.audio_cond(feats.to(self.dtype))
        w.inputs = BlockInputs(noise=w.noise, cond=s.cond_first if w.index == 0 else s.cond_rest, audio=audio,
                               ref_latent=s.ref_latent if w.index == 0 else None)

    # ---- one session alone (batch 1 over its own row): pipeline ranks drive these ------------------
    @torch.no_grad()
    def stage_denoise(self, s: TalkState, w: BlockWork, step: int) -> None:
        if step == 0:
            # The static plan changes only here, after the previous block's refresh has used it.
            w.plan = s.plan.update(w.host_plan)
            s.ring.follow(w.plan, self.config.tokens_per_frame, self.config.dit.rope_theta, w.index)
            w.x = w.inputs.noise[0]
        w.x = denoise_step(self.dit, self.ops, w.inputs, w.x, step, self.mods_for(1)[step],
                           self.config.sampler.sigmas, s.text_kv, s.ring.k, s.ring.v, w.plan)

    @torch.no_grad()
    def stage_refresh(self, s: TalkState, w: BlockWork) -> None:
        refresh_kv(self.dit, self.ops, w.inputs, w.x, self.mods_for(1)[-1], s.text_kv, s.ring.k, s.ring.v, w.plan)

    @torch.no_grad()
    def stage_decode(self, s: TalkState, w: BlockWork) -> None:
        w.video = s.decoder.decode(w.x.to(self.dtype))

    def finish(self, s: TalkState, w: BlockWork) -> VideoBlock:
        """Frames leave as a uint8 host copy, never a view of an engine-owned buffer."""
        check_finite(w.x, "denoised latent", w.index)
        check_finite(w.video, "decoded frames", w.index)
        v0 = w.first_frame
        return VideoBlock(index=w.index, frames=frames_uint8(w.video), first_frame=v0, pts=v0 / self.config.fps,
                          audio=w.audio)

    def finish_block(self, row: Row) -> VideoBlock:
        block = self.finish(row.state, row.work)
        block.timings = dict(row.timings)
        return block

    # ---- the round ------------------------------------------------------------------------------
    def round_tasks(self, rows: list[Row], batch: int) -> list[Task]:
        r = _Round(self, rows, batch)
        n = self.config.sampler.num_steps
        first_block = min(row.work.index for row in rows)
        tasks = [Task("load", "compute", r.load, group=BATCH, block=first_block)]
        for i in range(n):
            tasks.append(Task(f"step{i}", "compute", partial(r.step, i), deps=(len(tasks) - 1,), group=BATCH,
                              block=first_block))
        last = len(tasks) - 1
        tasks.append(Task("refresh", "compute", r.refresh, deps=(last,), group=BATCH, block=first_block))
        for row in rows:
            tasks.append(Task("decode", "decode", partial(r.decode, row), deps=(last,), group=row.slot,
                              block=row.work.index))
        return tasks


def _pin_mask(pinned: list[bool], device: torch.device) -> torch.Tensor:
    """[batch, 1, 1, 1, 1] bool, filled on the device: torch.tensor(list, device=) is a blocking upload."""
    mask = torch.zeros(len(pinned), 1, 1, 1, 1, dtype=torch.bool, device=device)
    for row, pin in enumerate(pinned):
        if pin:
            mask[row] = True  # a fill on the device
    return mask


class _Round:
    """One round's batched inputs and stage bodies (see the module docstring)."""

    def __init__(self, family: LiveTalkStages, rows: list[Row], batch: int):
        self.family, self.rows, self.batch = family, rows, batch
        by_slot = {row.slot: row for row in rows}
        self.padding = [j for j in range(batch) if j not in by_slot]
        like = rows[0].work
        zero_cond = torch.zeros_like(like.inputs.cond)
        cfg = family.config
        idle_plan = plan_block(0, cfg.cache, 1)
        works = [by_slot[j].work if j in by_slot else None for j in range(batch)]
        noise = torch.cat([w.noise if w else torch.zeros_like(like.noise) for w in works], dim=1)
        ref = [by_slot[j].state.ref_latent if w is not None and w.index == 0 else None for j, w in enumerate(works)]
        pinned = any(r is not None for r in ref)
        zero_ref = torch.zeros_like(rows[0].state.ref_latent)
        self.inputs = BlockInputs(
            noise=noise,
            cond=torch.cat([w.inputs.cond if w else zero_cond for w in works]),
            audio=torch.cat([w.inputs.audio if w else torch.zeros_like(like.inputs.audio) for w in works]),
            ref_latent=torch.cat([r if r is not None else zero_ref for r in ref]) if pinned else None,
            pin=_pin_mask([r is not None for r in ref], family.device) if pinned else None)
        plans = [w.host_plan if w else idle_plan for w in works]
        self.host_plan = BlockPlan(*(torch.cat([getattr(p, name) for p in plans])
                                     for name in ("write_slots", "slot_pos", "q_pos")))
        self.ring_k, self.ring_v, self.text_kv, self.plan = family.rows.head(batch)
        self.mods = family.mods_for(batch)
        self.saved: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.x: torch.Tensor | None = None
        self.denoise_s = 0.0
        # The inputs above were made on the caller's stream; the lanes' streams wait for them.
        self.inputs_ready = torch.cuda.Event() if family.device.type == "cuda" else None
        if self.inputs_ready is not None:
            self.inputs_ready.record()

    @torch.no_grad()
    def load(self) -> None:
        """The device plan for this round; padded rows' ring slots that the forwards will write, saved."""
        if self.inputs_ready is not None:
            torch.cuda.current_stream(self.family.device).wait_event(self.inputs_ready)
        for name in ("write_slots", "slot_pos", "q_pos"):
            copy_into(getattr(self.plan, name), getattr(self.host_plan, name))
        self._follow_positions()
        span = self._padding_span()
        self.saved = [(self.ring_k[:, j, span].clone(), self.ring_v[:, j, span].clone()) for j in self.padding]
        self.x = self.inputs.noise[0]

    def _follow_positions(self) -> None:
        """A ring of fully roped keys turns to this round's positions, row by row (padded rows are not
        touched: their written slots are restored after the refresh)."""
        f = self.family
        ring = f.rows.ring
        if ring.roped is None:
            return
        cfg = f.config
        for row in self.rows:
            j = row.slot
            plan = BlockPlan(*(getattr(self.plan, n)[j:j + 1] for n in ("write_slots", "slot_pos", "q_pos")))
            ring.rows(j, j + 1).follow(plan, cfg.tokens_per_frame, cfg.dit.rope_theta, row.work.index)

    def _padding_span(self) -> slice:
        """Ring tokens of block 0's write slots (0..F-1): what a padded row's forward writes."""
        cfg = self.family.config
        return slice(0, cfg.cache.block_frames * cfg.tokens_per_frame)

    @torch.no_grad()
    def step(self, i: int) -> None:
        t0 = time.perf_counter()
        f = self.family
        self.x = denoise_step(f.dit, f.ops, self.inputs, self.x, i, self.mods[i], f.config.sampler.sigmas,
                              self.text_kv, self.ring_k, self.ring_v, self.plan)
        self.denoise_s += time.perf_counter() - t0

    @torch.no_grad()
    def refresh(self) -> None:
        t0 = time.perf_counter()
        f = self.family
        refresh_kv(f.dit, f.ops, self.inputs, self.x, self.mods[-1], self.text_kv, self.ring_k, self.ring_v,
                   self.plan)
        span = self._padding_span()
        for j, (k, v) in zip(self.padding, self.saved):
            self.ring_k[:, j, span] = k
            self.ring_v[:, j, span] = v
        self.saved = []
        self.denoise_s += time.perf_counter() - t0

    @torch.no_grad()
    def decode(self, row: Row) -> None:
        t0 = time.perf_counter()
        w = row.work
        w.x = self.x[row.slot:row.slot + 1]
        self.family.stage_decode(row.state, w)
        row.timings.update(denoise=self.denoise_s, decode=time.perf_counter() - t0)
