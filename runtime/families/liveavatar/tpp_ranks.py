"""The per-rank loops of Live Avatar TPP (runtime/families/liveavatar/tpp.py has the layout and wire protocol)."""
from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from runtime.parallel.rank import RankContext
from runtime.parallel.transport import Incoming

from .model import AudioTokens
from .tpp_layout import (
    KIND_BLOCK,
    KIND_END,
    TAG_AUDIO,
    TAG_GLOBAL,
    TAG_HEADER,
    TAG_LOCAL,
    TAG_SINK,
    TAG_X,
    TppLayout,
    TppSession,
)
from .tpp_step import NoiseSource, StepState


class BlockDecoder(Protocol):
    """The decode rank's work: `covered_samples(counter)` audio samples arrive from rank 0 per block,
    `decode(counter, latents, audio)` returns what the sink gets."""

    def covered_samples(self, counter: int) -> int: ...

    def decode(self, counter: int, latents: torch.Tensor, audio: torch.Tensor) -> object: ...


class _Wire:
    """Fixed shapes and dtype of everything a step rank receives (tensors only on the wire)."""

    def __init__(self, state: StepState):
        cfg, (B, C, F, lh, lw) = state.cfg, state.latent_shape
        self.dtype = state.model.dtype
        self.x = state.latent_shape
        self.sink = (B, C, 1, lh, lw)
        self.audio_global = (B, F, cfg.dim)
        self.audio_local = (B, F, cfg.audio_tokens + 1, cfg.dim)


class _StepRank:
    """Runs step `ctx.rank` of every block, in block order, until rank 0's END header."""

    def __init__(self, ctx: RankContext, layout: TppLayout, state: StepState, session: TppSession,
                 sink: Callable[[int, torch.Tensor], None] | None):
        self.ctx, self.layout, self.state, self.session, self.sink = ctx, layout, state, session, sink
        self.net, self.wire, self.rank = ctx.transport, _Wire(state), ctx.rank
        self.adaptive_at = session.settings.adaptive_sink_block
        self.sink_frame: Incoming | torch.Tensor | None = None
        self.noise = NoiseSource(session.settings.seed, state.latent_shape, state.model)
        self.features = iter(session.features) if self.rank == 0 else None  # rank 0 owns the audio
        send_audio = self.rank == 0 and layout.decode and session.block_audio is not None
        self.block_audio = iter(session.block_audio) if send_audio else None
        self.current: torch.Tensor | None = None

    def run(self) -> None:
        counter = 0
        while self._next_header(counter):
            x, audio = self._inputs(counter)
            x = self._step(x, audio, counter)
            self._outputs(x, counter)
            counter += 1
        self._wait_sink_frame(self._block(counter))  # a stream shorter than the adaptive sink block

    def _wait_sink_frame(self, block: int) -> None:
        """The posted receive of block 0's frame, completed once (the last step rank has it already)."""
        if isinstance(self.sink_frame, Incoming):
            with self.ctx.stage("recv sink", block=block, transfer=True):
                self.sink_frame = self.sink_frame.wait()

    def _block(self, counter: int) -> int:
        return self.session.settings.start_block + counter

    def _next_header(self, counter: int) -> bool:
        """Rank 0 announces block `counter` (or the end) to every rank; the others learn it."""
        if self.rank == 0:
            more = self._next_features()
            header = torch.tensor([KIND_BLOCK if more else KIND_END, counter], dtype=torch.int64)
            for dst in range(1, self.layout.world_size):
                self.net.send(header, dst, TAG_HEADER, meta=True)
            return more
        with self.ctx.stage("recv header", block=self._block(counter), transfer=True):
            kind, got = self.net.recv((2,), torch.int64, 0, TAG_HEADER, meta=True).wait().tolist()
        if kind == KIND_BLOCK and got != counter:
            raise RuntimeError(f"rank {self.rank} expected block {counter}, rank 0 announced {got}")
        return kind == KIND_BLOCK

    def _next_features(self) -> bool:
        self.current = next(self.features, None)
        return self.current is not None

    def _inputs(self, counter: int) -> tuple[torch.Tensor, AudioTokens]:
        block, w = self._block(counter), self.wire
        if self.rank == 0:
            with self.ctx.stage("audio", block=block):
                audio = self.state.model.encode_audio(self.current.to(self.net.device))
                x = self.noise.next()
                covered = next(self.block_audio) if self.block_audio is not None else None
            if covered is not None:  # the decode rank's share of the audio, on the gloo side channel
                self.net.send(covered.float(), self.layout.collect_rank, TAG_AUDIO, meta=True)
            for dst in range(1, self.layout.num_steps):
                self.net.send(audio.global_, dst, TAG_GLOBAL)
                self.net.send(audio.local, dst, TAG_LOCAL)
            return x, audio
        with self.ctx.stage("recv inputs", block=block, transfer=True):
            g = self.net.recv(w.audio_global, w.dtype, 0, TAG_GLOBAL).wait()
            loc = self.net.recv(w.audio_local, w.dtype, 0, TAG_LOCAL).wait()
            x = self.net.recv(w.x, w.dtype, self.rank - 1, TAG_X).wait()
        return x, AudioTokens(g, loc)

    def _step(self, x: torch.Tensor, audio: AudioTokens, counter: int) -> torch.Tensor:
        block = self._block(counter)
        if self.adaptive_at is not None and counter == self.adaptive_at:
            self._wait_sink_frame(block)
            with self.ctx.stage("refill", block=block):
                self.state.refill_condition(self.sink_frame)
        with self.ctx.stage("denoise", block=block, step=self.state.step):
            return self.state.run(x, audio, counter)

    def _outputs(self, x: torch.Tensor, counter: int) -> None:
        last = self.layout.last_step_rank
        if counter == 0 and self.adaptive_at is not None:
            self._share_sink_frame(x)
        if self.rank < last:
            self.net.send(x, self.rank + 1, TAG_X)
        elif self.layout.collect_rank is not None:
            self.net.send(x, self.layout.collect_rank, TAG_X)
        else:
            with self.ctx.stage("emit", block=self._block(counter)):
                self.sink(counter, x)

    def _share_sink_frame(self, x: torch.Tensor) -> None:
        """After block 0: the last step rank has the frame; every other step rank posts its receive."""
        last = self.layout.last_step_rank
        if self.rank == last:
            self.sink_frame = x[:, :, :1].clone()
            for dst in range(last):
                self.net.send(self.sink_frame, dst, TAG_SINK)
        else:
            self.sink_frame = self.net.recv(self.wire.sink, self.wire.dtype, last, TAG_SINK)


def _collect(ctx: RankContext, layout: TppLayout, state_shape: tuple[int, ...], dtype: torch.dtype,
             start_block: int, sink: Callable[[int, object], None], decoder: BlockDecoder | None = None) -> None:
    """The collect rank: every block's latents from the last step rank, in order, to the sink; with a
    decoder (a decode rank), decoded with the block's covered audio from rank 0 first."""
    net, counter = ctx.transport, 0
    while True:
        with ctx.stage("recv header", block=start_block + counter, transfer=True):
            kind, _ = net.recv((2,), torch.int64, 0, TAG_HEADER, meta=True).wait().tolist()
        if kind == KIND_END:
            return
        with ctx.stage("recv x", block=start_block + counter, transfer=True):
            x = net.recv(state_shape, dtype, layout.last_step_rank, TAG_X).wait()
        if decoder is not None:
            with ctx.stage("recv audio", block=start_block + counter, transfer=True):
                audio = net.recv((decoder.covered_samples(counter),), torch.float32, 0, TAG_AUDIO, meta=True).wait()
            with ctx.stage("decode", block=start_block + counter):
                x = decoder.decode(counter, x, audio)
        with ctx.stage("emit", block=start_block + counter):
            sink(counter, x)
        counter += 1
