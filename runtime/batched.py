"""`BatchedEngine`: several avatar sessions advance in lockstep, one batched DiT forward per step.

    eng = BatchedEngine.from_pretrained("tiny", sessions=3)
    for i, image in enumerate(images):
        eng.reset(i, image, seed=i)
    for chunks in incoming:                       # {session: audio chunk} (or a list, None = nothing)
        for i, blocks in eng.step(chunks).items():
            for block in blocks:
                show(i, block.frames)
    tail = eng.flush()                            # every session: pad with silence, finish

Lockstep rule: a *round* runs the next block of every live session in one batched forward per
sampler step (plus one batched KV refresh). It runs when every live session holds the audio for
its next block (the block's frames plus the lookahead), and rounds repeat while that holds. A live
session is one that was reset and has not finished its flush. Sessions keep their own block index:
one reset later than the others starts at its own block 0 and joins the next round (the DiT plan,
condition and reference pinning are per row).

A session with no audio holds every round back. `step(..., fill_idle=True)` pads such sessions with
silence whenever at least one live session has the audio for its next block, so the others go on
and the lagging avatar shows idle (listening) frames. The price: the silence is on that session's
timeline, so audio it pushes later plays after it (up to one block plus the lookahead, 0.75 s +
0.25 s at the release config, later than without padding). `idle(blocks)` pads every session
(nobody speaks, the avatars keep living).

Per row the computation is the single-session `Engine`'s: each session owns its seeded generator
and draws its noise exactly as `Engine` does (shape [steps, 1, ...], block order), its audio stream
and wav2vec2 window, its condition and reference latent, its text K/V (a row of a shared buffer),
its KV ring (a row of the shared ring) and its own streaming VAE decoder (the causal cache never
mixes sessions). Audio features, audio conditioning and VAE decode run per session; the DiT forward
of every denoising step and of the KV refresh runs once for all rows. Rows of sessions that are not
live take part with zero inputs (static shapes; their results are dropped and their ring row is
cleared when the slot is reset).

Audio a session pushes beyond what its audio ring holds waits in a per-session queue until the
rounds consume it. Without `fill_idle`, a push that would put a session's pending audio (pushed, not
yet turned into blocks) more than `max_lead_s` seconds ahead of the least-fed live session's is
refused, naming the sessions it waits for: memory stays bounded when one session never catches up.
Sessions fed alike never lead, however long their chunks.

A bad input raises before any state changes: an exception of the original type whose message starts
with `session i:` and whose `.session` attribute is i; the other chunks of that call are not taken.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch

from .audio import AudioBufferFull, check_chunk
from .config import EngineConfig
from .engine import BlockWork, Engine, VideoBlock, _Session, last_block_to_flush, samples_to_run
from .models.dit import BlockPlan
from .sampler import BlockInputs
from .session import KVRing, StaticPlan, plan_block

__all__ = ["BatchedEngine"]


@dataclass
class _Slot:
    """One session: the single-engine session state plus the audio waiting for room in its ring."""

    session: _Session
    queue: deque = field(default_factory=deque)  # validated float32 arrays at the engine rate, in order
    queued: int = 0                                # samples in `queue`
    end_block: int | None = None                   # set by flush: finished once session.block reaches it

    @property
    def live(self) -> bool:
        return self.end_block is None or self.session.block < self.end_block

    @property
    def flushing(self) -> bool:
        return self.end_block is not None

    @property
    def pushed(self) -> int:
        """Samples on the session's timeline so far, queued ones included."""
        return self.session.audio.total_samples + self.queued

    def enqueue(self, samples: np.ndarray) -> None:
        if len(samples):
            self.queue.append(samples)
            self.queued += len(samples)

    def pump(self) -> None:
        """Move queued audio into the session's audio ring as far as it has room."""
        audio = self.session.audio
        while self.queue and audio.free_samples:
            head = self.queue[0]
            n = min(len(head), audio.free_samples)
            audio.push(head[:n])
            self.queued -= n
            if n == len(head):
                self.queue.popleft()
            else:
                self.queue[0] = head[n:]

    def drop_queue(self) -> int:
        dropped, self.queued = self.queued, 0
        self.queue.clear()
        return dropped


@dataclass
class _Rows:
    """What the batched stages read (Engine.stage_denoise / stage_refresh): one row per slot."""

    ring: KVRing
    plan: StaticPlan
    text_kv: list[tuple[torch.Tensor, torch.Tensor]]


class BatchedEngine:
    def __init__(self, engine: Engine, sessions: int, *, max_lead_s: float = 30.0):
        """`sessions` slots over `engine`'s modules (weights shared, not copied); see the module docstring."""
        if sessions < 1:
            raise ValueError(f"sessions must be >= 1, got {sessions}")
        if max_lead_s <= 0:
            raise ValueError(f"max_lead_s must be > 0, got {max_lead_s}")
        cfg = engine.config
        common = {"device": engine.device, "dtype": engine.dtype, "backend": engine.ops.name, "taehv": engine.taehv,
                  "text_encoder": engine.text_encoder}
        # Per-session stages (begin, audio, decode, finish) run on a batch-1 engine, the DiT steps on a
        # batch-N one: both are plain Engines over the same modules, with no session of their own.
        self._row = Engine(cfg, engine.dit, engine.vae, engine.audio_encoder, **common)
        self._stages = Engine(cfg, engine.dit, engine.vae, engine.audio_encoder, **common, batch=sessions)
        self.config: EngineConfig = cfg
        self.sessions = sessions
        self.max_lead_s = max_lead_s
        self.device, self.dtype = engine.device, engine.dtype
        self._rows = self._allocate_rows()
        self._slots: list[_Slot | None] = [None] * sessions
        self._idle_row: dict[str, object] | None = None  # zero inputs of a slot not in the round
        self.rounds = 0

    # ---- construction ---------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path_or_preset: str, sessions: int, device=None, dtype=None, backend: str = "auto",
                        seed: int = 0, config: EngineConfig | str | None = None, **options) -> BatchedEngine:
        """As `Engine.from_pretrained` (preset name: random weights; directory: release files)."""
        return cls(Engine.from_pretrained(path_or_preset, device, dtype, backend, seed, config), sessions, **options)

    @classmethod
    def random(cls, config: EngineConfig, sessions: int, device=None, dtype=None, backend: str = "auto",
               seed: int = 0, **options) -> BatchedEngine:
        return cls(Engine.random(config, device, dtype, backend, seed), sessions, **options)

    def _allocate_rows(self) -> _Rows:
        cfg, n = self.config, self.sessions
        d = cfg.dit
        kv_shape = (n, d.text_len, d.num_heads, d.head_dim)
        text_kv = [(torch.zeros(kv_shape, device=self.device, dtype=self.dtype),
                    torch.zeros(kv_shape, device=self.device, dtype=self.dtype)) for _ in range(d.num_layers)]
        return _Rows(ring=KVRing.allocate(cfg, n, self.device, self.dtype),
                     plan=StaticPlan.allocate(cfg.cache, n, self.device), text_kv=text_kv)

    # ---- sessions -------------------------------------------------------------------------------
    def reset(self, i: int, reference_image, prompt_embeds=None, seed: int = 0, *, prompt: str | None = None) -> None:
        """Start a new stream in slot i (any time: the others go on). Bad input leaves slot i as it was.
        The prompt is text (`prompt=`, with the engine's text encoder) or `prompt_embeds`, as `Engine.reset`."""
        self._check_index(i)
        old = self._slots[i]
        ring_row = KVRing(self._rows.ring.k[:, i:i + 1], self._rows.ring.v[:, i:i + 1])
        try:
            # The slot's own StaticPlan is never read (the batched plan drives the forward); reused.
            s = self._row.open_session(reference_image, prompt_embeds, seed, ring=ring_row,
                                       plan=old.session.plan if old else None, prompt=prompt)
        except Exception as err:
            raise _named(i, err) from err
        rows = []
        for (k_all, v_all), (k, v) in zip(self._rows.text_kv, s.text_kv):
            k_all[i:i + 1].copy_(k)
            v_all[i:i + 1].copy_(v)
            rows.append((k_all[i:i + 1], v_all[i:i + 1]))
        s.text_kv = rows  # views of the shared buffer: one copy of the text K/V per session
        self._slots[i] = _Slot(s)

    @property
    def live(self) -> list[int]:
        """Slots that take part in the next round (reset, flush not finished)."""
        return [i for i, slot in enumerate(self._slots) if slot is not None and slot.live]

    def waiting_for(self) -> list[int]:
        """Live slots without the audio for their next block: the ones holding the next round back."""
        # Every public call ends with its queues pumped (`_advance`), so readiness is current here.
        return [i for i in self.live if not self._ready(self._slots[i])]

    def queued_samples(self, i: int) -> int:
        """Samples of slot i pushed but still waiting for room in its audio ring (bounded by max_lead_s)."""
        self._check_index(i)
        slot = self._slots[i]
        return slot.queued if slot is not None else 0

    # ---- streaming ------------------------------------------------------------------------------
    def step(self, chunks, sample_rate: int = 16000, resample: bool = False,
             fill_idle: bool = False) -> dict[int, list[VideoBlock]]:
        """Push audio for some sessions ({slot: chunk} or a list by slot, None = nothing); run every
        round the audio allows; return {slot: blocks} for the slots that got blocks.

        Chunks are checked as `Engine.step` checks them, all before any is taken. `fill_idle`: pad
        lagging sessions with silence so the others are not held back (module docstring).
        """
        items = self._chunk_items(chunks)
        target = self.config.audio.sample_rate
        converting = resample and sample_rate != target
        checked = {}
        for i, chunk in items:  # every check first: a bad chunk leaves every session unchanged
            slot = self._require_open(i)
            try:
                checked[i] = self._check_chunk(slot, chunk, sample_rate, target, converting)
            except Exception as err:
                raise _named(i, err) from err
        if not fill_idle:
            ratio = target / sample_rate if converting else 1
            self._check_lead({i: -(-len(x) * ratio // 1) for i, x in checked.items()})
        for i, samples in checked.items():
            slot = self._slots[i]
            if converting:  # the session's streaming resampler: chunking-independent, as Engine's
                samples = self._row._resampler(slot.session, sample_rate)(samples)
            slot.enqueue(samples)
        return self._advance(fill_idle)

    def idle(self, blocks: int = 1) -> dict[int, list[VideoBlock]]:
        """Pad every live session with silence so it can run `blocks` more blocks (after its queued
        audio), then run the rounds: the avatars keep living while nobody speaks."""
        if blocks < 1:
            raise ValueError(f"blocks must be >= 1, got {blocks}")
        for i in self.live:
            slot = self._slots[i]
            if not slot.flushing:
                need = samples_to_run(self.config, slot.session.block + blocks - 1)
                slot.enqueue(np.zeros(max(0, need - slot.pushed), np.float32))
        return self._advance(fill_idle=False)

    def flush(self, i: int | None = None) -> dict[int, list[VideoBlock]]:
        """End session i (default: every live session): pad with silence so every pushed sample is
        covered by a block, and run the rounds. A flushed session ends once its last block ran; for a
        single session that may be in a later call, when the others' audio lets the rounds run."""
        targets = [i] if i is not None else [j for j in self.live if not self._slots[j].flushing]
        for j in targets:
            slot = self._require_open(j)
            s = slot.session
            if s.resampler is not None:
                slot.enqueue(s.resampler.flush())
                s.resampler = None
            last = last_block_to_flush(self.config, s.block, slot.pushed)
            if last is not None:
                slot.enqueue(np.zeros(max(0, samples_to_run(self.config, last) - slot.pushed), np.float32))
            slot.end_block = s.block if last is None else last + 1
            s.flushed = True
        return self._advance(fill_idle=False)

    def interrupt(self, i: int) -> int:
        """Barge-in for session i: drop its audio not yet turned into a block (queued audio included);
        its KV cache and timeline are kept. Returns the number of samples dropped."""
        slot = self._require_open(i)
        s = slot.session
        s.resampler = None  # its buffered input belongs to the dropped audio
        dropped = slot.drop_queue()
        return dropped + s.audio.truncate(self.config.first_video_frame(s.block) * self.config.samples_per_video_frame)

    # ---- input checks ---------------------------------------------------------------------------
    def _check_index(self, i) -> None:
        if not isinstance(i, (int, np.integer)) or isinstance(i, bool) or not 0 <= i < self.sessions:
            raise IndexError(f"session {i!r}: no such slot (this engine has sessions 0..{self.sessions - 1})")

    def _require_open(self, i: int) -> _Slot:
        """Slot i with a session that still takes audio."""
        self._check_index(i)
        slot = self._slots[i]
        if slot is None:
            raise _named(i, RuntimeError(f"call reset({i}, reference_image) first"))
        if slot.flushing:
            raise _named(i, RuntimeError(f"this stream was flushed; call reset({i}, ...) to start a new one"))
        return slot

    def _chunk_items(self, chunks) -> list[tuple[int, object]]:
        if isinstance(chunks, dict):
            items = sorted(chunks.items(), key=lambda kv: kv[0] if isinstance(kv[0], (int, np.integer)) else -1)
        elif isinstance(chunks, (list, tuple)):
            if len(chunks) > self.sessions:
                raise ValueError(f"{len(chunks)} chunks for {self.sessions} sessions")
            items = list(enumerate(chunks))
        else:
            raise TypeError(f"chunks must be a dict {{session: audio}} or a list by session, "
                            f"got {type(chunks).__name__}")
        for i, _ in items:
            self._check_index(i)
        return [(int(i), c) for i, c in items if c is not None]

    @staticmethod
    def _check_chunk(slot: _Slot, chunk, sample_rate: int, target: int, converting: bool) -> np.ndarray:
        """Validate one chunk, changing nothing: float32 samples at `sample_rate` (a new array)."""
        s = slot.session
        if not converting:
            return check_chunk(chunk, sample_rate, target)
        if s.resampler is not None and s.resampler.from_rate != sample_rate:
            raise ValueError(f"sample rate changed mid-stream ({s.resampler.from_rate} -> {sample_rate} Hz); "
                             "call reset() to start a stream at another rate")
        return check_chunk(chunk, sample_rate, sample_rate)

    def _pending(self, slot: _Slot) -> int:
        """Samples pushed to the session and not yet turned into blocks."""
        s = slot.session
        return slot.pushed - self.config.first_video_frame(s.block) * self.config.samples_per_video_frame

    def _check_lead(self, added: dict[int, float]) -> None:
        """Refuse a push that would leave a session more than max_lead_s ahead of the least-fed one
        (`added`: samples each session gets at the engine rate, estimated for resampled input)."""
        pending = {i: self._pending(self._slots[i]) + added.get(i, 0)
                   for i in self.live if not self._slots[i].flushing}
        if not pending:
            return
        floor = min(pending.values())
        rate = self.config.audio.sample_rate
        for i, n in added.items():
            lead_s = (pending[i] - floor) / rate
            if n and lead_s > self.max_lead_s:
                slowest = [j for j, p in pending.items() if p == floor]
                raise _named(i, AudioBufferFull(
                    f"its pending audio would lead session(s) {slowest} by {lead_s:.2f} s (max_lead_s "
                    f"{self.max_lead_s}): blocks run in lockstep and {self.waiting_for()} have no audio for their "
                    "next block; push theirs, or step(..., fill_idle=True) to pad them with silence"))

    # ---- rounds ---------------------------------------------------------------------------------
    def _pump(self) -> None:
        for slot in self._slots:
            if slot is not None:
                slot.pump()

    def _ready(self, slot: _Slot) -> bool:
        return slot.session.audio.total_samples >= samples_to_run(self.config, slot.session.block)

    def _advance(self, fill_idle: bool) -> dict[int, list[VideoBlock]]:
        """Run rounds while the lockstep rule allows (module docstring)."""
        out: dict[int, list[VideoBlock]] = {}
        while True:
            self._pump()
            live = self.live
            lagging = [i for i in live if not self._ready(self._slots[i])]
            if lagging and fill_idle and len(lagging) < len(live):
                for i in lagging:
                    slot = self._slots[i]
                    slot.enqueue(np.zeros(max(0, samples_to_run(self.config, slot.session.block) - slot.pushed),
                                          np.float32))
                self._pump()
                lagging = [i for i in live if not self._ready(self._slots[i])]
            if not live or lagging:
                return out
            for i, block in self._run_round(live).items():
                out.setdefault(i, []).append(block)

    @torch.no_grad()
    def _run_round(self, live: list[int]) -> dict[int, VideoBlock]:
        """The next block of every live session: per-session audio, batched DiT, per-session decode."""
        clock = time.perf_counter
        t0 = clock()
        row = self._row
        works: dict[int, BlockWork] = {}
        for i in live:
            s = self._slots[i].session
            works[i] = row.begin_block(s)  # the session's own noise draw, as Engine.begin_block
            row.stage_audio(s, works[i])
        t1 = clock()
        group = self._merge(works)
        # Block 0 pins the reference latent into latent frame 0 before every step and of x0. The merged
        # inputs carry no ref_latent (that would pin every row); the rows at block 0 are pinned here.
        first = [i for i in live if works[i].index == 0]
        self._pin_reference(group.inputs.noise[0], first)  # step 0 starts from noise[0]
        for step in range(self.config.sampler.num_steps):
            if step:
                self._pin_reference(group.x, first)
            self._stages.stage_denoise(self._rows, group, step)
        self._pin_reference(group.x, first)
        self._stages.stage_refresh(self._rows, group)
        t2 = clock()
        out = {}
        for i in live:
            s, w = self._slots[i].session, works[i]
            w.x = group.x[i:i + 1]
            row.stage_decode(s, w)  # the session's own causal decoder cache
            out[i] = row.finish_block(s, w)
        t3 = clock()
        self.rounds += 1
        timings = {"audio": t1 - t0, "denoise": t2 - t1, "decode": t3 - t2, "total": t3 - t0}
        for block in out.values():
            block.timings = dict(timings)  # the round's: shared by its sessions
        return out

    def _merge(self, works: dict[int, BlockWork]) -> BlockWork:
        """One BlockWork with a row per slot: the live sessions' own, zeros for the others."""
        idle = self._idle_inputs(next(iter(works.values())))
        rows = [works.get(i) for i in range(self.sessions)]
        noise = torch.cat([w.noise if w else idle["noise"] for w in rows], dim=1)
        inputs = BlockInputs(noise=noise,
                             cond=torch.cat([w.inputs.cond if w else idle["cond"] for w in rows]),
                             audio=torch.cat([w.inputs.audio if w else idle["audio"] for w in rows]),
                             ref_latent=None)
        plans = [w.host_plan if w else idle["plan"] for w in rows]
        host_plan = BlockPlan(*(torch.cat([getattr(p, name) for p in plans])
                                for name in ("write_slots", "slot_pos", "q_pos")))
        # `index` of the merged work is the round: its rows sit at their own block indices.
        return BlockWork(index=self.rounds, first_frame=-1, num_frames=0, host_plan=host_plan, noise=noise,
                         inputs=inputs)

    def _idle_inputs(self, like: BlockWork) -> dict[str, object]:
        if self._idle_row is None:
            self._idle_row = {"noise": torch.zeros_like(like.noise), "cond": torch.zeros_like(like.inputs.cond),
                              "audio": torch.zeros_like(like.inputs.audio),
                              "plan": plan_block(0, self.config.cache, 1)}
        return self._idle_row

    def _pin_reference(self, x: torch.Tensor, rows: list[int]) -> None:
        for i in rows:
            x[i:i + 1, :, :1] = self._slots[i].session.ref_latent


def _with_session(err: BaseException, i: int) -> BaseException:
    err.session = i
    return err


def _named(i: int, err: BaseException) -> BaseException:
    """`err` again, its message prefixed with the session, and `.session = i` (failure isolation)."""
    try:
        named = type(err)(f"session {i}: {err}")
    except TypeError:  # an exception class that needs more than a message
        named = RuntimeError(f"session {i}: {type(err).__name__}: {err}")
    return _with_session(named, i)
