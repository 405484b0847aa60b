"""LiveTalk's block stages, batched over the sessions of a round.

A round's rows are the sessions that run a block now, each at its own block index. Per session, on
the caller's thread and in block order (`plan_block`): the host plan, the noise draw from the
session's generator (shape [steps, 1, ...], as a session alone draws it), the wav2vec2 window and
the audio condition. Then the round (`round_tasks`) over the static buffers of its batch size
(graphs.py: on CUDA these stages are captured graphs): `load` copies the rows' inputs in, one DiT
forward per denoising step and one for the t=0 KV refresh run over rows 0..batch-1 of the shared
rows (KV ring, text K/V, device plan: row = slot), `handoff` gives each row's x0 to its slot's
decoder; per session (lane "decode"): the streaming decode with the slot's causal cache, `collect`
copies the frames out.

Padding: rows of the batch without a block in this round (free slots, sessions still waiting for
audio) run on zero inputs with block 0's plan, which writes K/V into ring slots 0..F-1 of their row;
those slots of every row are saved before the round's first forward and put back on the padded rows
after its refresh (a masked copy: the same graph whichever rows pad), so a padded session's ring is
left exactly as it was. The cost, in rounds that pad only: a copy of one block's K/V per row and a
masked copy back.

Ordering across rounds: every batched task of round r+1 runs after round r's on the compute lane
(lanes are FIFO), so the static inputs, x, the device plan and the ring are rewritten only after
round r's hand-off; a slot's decode input is double-buffered (graphs.DECODE_INPUTS), so round r's
decode may still run while round r+1 denoises.
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
from ...sampler import BlockInputs, denoise_step, refresh_kv
from ...scheduler import Task
from ...session import KVRing, StaticPlan, plan_block
from ...transfer import copy_into
from ..base import BATCH, Family, Row, SessionState
from .graphs import DECODE_INPUTS


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

    def finish(self, s: TalkState, w: BlockWork) -> VideoBlock:
        """Frames leave as a uint8 host copy, never a view of an engine-owned buffer."""
        check_finite(w.x, "denoised latent", w.index)
        check_finite(w.video, "decoded frames", w.index)
        v0 = w.first_frame
        return VideoBlock(index=w.index, frames=frames_uint8(w.video), first_frame=v0, pts=v0 / self.config.fps,
                          audio=w.audio)

    def finish_block(self, row: Row) -> VideoBlock:
        """The row's block; its timings: denoise (load to hand-off on the compute lane) and decode
        (hand-off to frames copied out, queueing behind the decode lane's earlier work included)."""
        block = self.finish(row.state, row.work)
        timings = dict(row.timings)
        load, handoff, collected = timings.pop("marks")
        block.timings = {**timings, "denoise": _seconds(load, handoff), "decode": _seconds(handoff, collected)}
        return block

    # ---- the round ------------------------------------------------------------------------------
    def round_tasks(self, rows: list[Row], batch: int) -> list[Task]:
        r = _Round(self, rows, batch)
        S, slots = r.stages, self.round_stages.slots
        first_block = min(row.work.index for row in rows)
        names = [f"step{i}" for i in range(self.config.sampler.num_steps)] + ["refresh"]
        if r.padding:
            names = ["save", *names, "restore"]
        tasks = [Task("load", "compute", r.load, group=BATCH, block=first_block)]
        for name in names:
            tasks.append(S.stages[name].task("compute", deps=(len(tasks) - 1,), group=BATCH, block=first_block))
        tasks.append(Task("handoff", "compute", r.handoff, deps=(len(tasks) - 1,), group=BATCH, block=first_block))
        handoff = len(tasks) - 1
        for row in rows:
            b, j = row.work.index, row.slot
            tasks.append(slots[j].stage_for(b).task("decode", deps=(handoff,), group=j, block=b))
            tasks.append(Task("collect", "decode", partial(r.collect, row), deps=(len(tasks) - 1,), group=j, block=b))
        return tasks


class _Round:
    """One round: its rows' inputs into batch `batch`'s static buffers (graphs.RoundStages), the
    hand-off of x0 to the slots' decoders and the copy-out of each session's frames."""

    def __init__(self, family: LiveTalkStages, rows: list[Row], batch: int):
        self.family, self.rows = family, rows
        self.stages = family.round_stages.batches[batch]
        self.by_slot = {row.slot: row for row in rows}
        self.padding = [j for j in range(batch) if j not in self.by_slot]
        idle_plan = plan_block(0, family.config.cache, 1)
        plans = [self.by_slot[j].work.host_plan if j in self.by_slot else idle_plan for j in range(batch)]
        self.host_plan = BlockPlan(*(torch.cat([getattr(p, name) for p in plans])
                                     for name in ("write_slots", "slot_pos", "q_pos")))
        self.plan = family.rows.head(batch)[3]
        self.marks: dict[str, object] = {}
        # The rows' inputs were made on the caller's stream; the compute lane waits for them.
        self.inputs_ready = torch.cuda.Event() if family.device.type == "cuda" else None
        if self.inputs_ready is not None:
            self.inputs_ready.record()

    @torch.no_grad()
    def load(self) -> None:
        """The round's inputs into the static buffers (zeros and no pinning on padded rows), the
        device plan, and a ring of fully roped keys turned to the rows' positions."""
        f = self.family
        if self.inputs_ready is not None:
            torch.cuda.current_stream(f.device).wait_event(self.inputs_ready)
        self.marks["load"] = _mark(f.device)
        for name in ("write_slots", "slot_pos", "q_pos"):
            copy_into(getattr(self.plan, name), getattr(self.host_plan, name))
        S = self.stages
        for j in range(S.batch):
            row = self.by_slot.get(j)
            if S.pad is not None:
                S.pad[0, j].fill_(row is None)
            if row is None:
                for t in (S.inputs.noise[:, j], S.inputs.cond[j], S.inputs.audio[j]):
                    t.zero_()
                S.inputs.pin[j].fill_(False)
                continue
            w = row.work
            S.inputs.noise[:, j].copy_(w.noise[:, 0])
            S.inputs.cond[j].copy_(w.inputs.cond[0])
            S.inputs.audio[j].copy_(w.inputs.audio[0])
            S.inputs.pin[j].fill_(w.index == 0)
            if w.index == 0:
                S.inputs.ref_latent[j].copy_(w.inputs.ref_latent[0])
            self._follow_positions(row)

    def _follow_positions(self, row: Row) -> None:
        """A ring of fully roped keys turns to this round's positions, row by row (padded rows are not
        touched: their written slots are restored after the refresh)."""
        f, j = self.family, row.slot
        ring = f.rows.ring
        if ring.roped is None:
            return
        cfg = f.config
        plan = BlockPlan(*(getattr(self.plan, n)[j:j + 1] for n in ("write_slots", "slot_pos", "q_pos")))
        ring.rows(j, j + 1).follow(plan, cfg.tokens_per_frame, cfg.dit.rope_theta, row.work.index)

    def handoff(self) -> None:
        """x0's rows into their slots' decode inputs (x is the next round's to rewrite)."""
        x = self.stages.x
        for row in self.rows:
            d = self.family.round_stages.slots[row.slot]
            d.z[row.work.index % DECODE_INPUTS].copy_(x[row.slot:row.slot + 1])
        self.marks["handoff"] = _mark(self.family.device)

    def collect(self, row: Row) -> None:
        """The session's frames (and x0) copied out of its slot's static buffers."""
        w = row.work
        d = self.family.round_stages.slots[row.slot]
        w.video = d.output(w.index).clone()
        w.x = d.z[w.index % DECODE_INPUTS].clone()
        row.timings["marks"] = (self.marks["load"], self.marks["handoff"], _mark(self.family.device))


def _mark(device: torch.device):
    """A point in the current stream's order: a timing event on CUDA, the host clock elsewhere."""
    if device.type != "cuda":
        return time.perf_counter()
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def _seconds(start, end) -> float:
    if isinstance(start, torch.cuda.Event):
        return start.elapsed_time(end) / 1e3
    return end - start
