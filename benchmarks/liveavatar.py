"""`avatar bench --family liveavatar`: family 2 (Live Avatar, runtime/families/liveavatar) measured on one device.

End to end: a fresh session (reset with a synthetic face, untimed) streams synthetic speech through
`Engine.step` (family 2, the one-session shorthand) in `chunk_ms` chunks; every step() call is one span (CUDA events on a GPU,
perf_counter on the CPU) and blocks get their call's share (harness.block_shares). Block 0 is the
first-block figure; p50/p99, FPS (frames emitted / wall time after block 0) and the stage medians
cover the later blocks. On CUDA the engine's stage clock synchronises the device, so the audio /
denoise / decode split is the GPU's time, not launch time. DiT only: one denoising step of one block
(`forward_block` against a full ring 0, random K/V in every slot) timed forward by forward.
Random weights are drawn on the device (random_weights.materialize_random).
"""
from __future__ import annotations

import time

import numpy as np
import torch

from runtime.families.liveavatar.audio_front import SAMPLE_RATE, VIDEO_FPS
from runtime.profiling import Timer, nvtx_range

from .harness import (
    PeakMemory,
    _run,
    audio_chunks,
    block_shares,
    environment,
    latency_stats,
    stage_medians_ms,
    stage_samples,
    stream_warmup,
    timer_name,
)

GB = 1e9
# Published figures of the Live Avatar release (spec/liveavatar-family.md), for context in the table.
PUBLISHED = "Live Avatar v1: 20.88 FPS, TTFF 2.89 s on 5 x H800 (TPP); v1.1: 45 FPS"


# ---- memory -----------------------------------------------------------------------------------------

def memory_budget(preset: str, quantize: str | None = None, dtype: torch.dtype = torch.bfloat16) -> dict:
    """What a session of `preset` holds on its device, in GB, before activations (shapes only, meta device).

    Trunk weights in `dtype` (FP8 linears at 1 byte), one KV ring per denoising step, the condition
    cache (reference + motion tokens) and text K/V, the VAE and wav2vec2, all in `dtype`."""
    from runtime.families.liveavatar.fp8 import KEPT_IN_BF16
    from runtime.families.liveavatar.model import build_liveavatar
    from runtime.families.liveavatar.motion import motion_positions, reference_positions
    from runtime.families.liveavatar.presets import engine_preset

    p = engine_preset(preset)
    cfg = p.dit
    trunk = build_liveavatar(cfg, device="meta")
    size = torch.empty(0, dtype=dtype).element_size()
    weights = size * sum(t.numel() for t in trunk.parameters())
    if quantize is not None:  # upstream's selection: every Linear but KEPT_IN_BF16 stores 1-byte weights
        weights -= (size - 1) * sum(m.weight.numel() for name, m in trunk.named_modules()
                       if isinstance(m, torch.nn.Linear) and not KEPT_IN_BF16.fullmatch(name))
    token_hw = _token_hw(p)
    tokens = token_hw[0] * token_hw[1]
    per_token = cfg.num_layers * 2 * cfg.dim * size  # k and v of every layer
    cond_tokens = len(reference_positions(cfg, token_hw)) + len(motion_positions(cfg, token_hw))
    ring = cfg.ring_frames * tokens * per_token
    out = {"trunk_weights_gb": weights / GB, "ring_per_step_gb": ring / GB, "rings": cfg.num_steps,
           "rings_gb": cfg.num_steps * ring / GB, "condition_gb": cond_tokens * per_token / GB,
           "text_kv_gb": cfg.text_len * per_token / GB, "vae_and_wav2vec2_gb": size * _side_models_params(p) / GB}
    out["total_gb"] = sum(v for k, v in out.items() if k.endswith("_gb") and k != "ring_per_step_gb")
    return out


def _token_hw(p) -> tuple[int, int]:
    s = p.vae.spatial_factor
    return p.height // s // p.dit.patch_size[1], p.width // s // p.dit.patch_size[2]


def _side_models_params(p) -> int:
    from runtime.families.liveavatar.presets import large_wav2vec2_config
    from runtime.models.vae import WanVAE

    with torch.device("meta"):
        vae = WanVAE(p.vae)
        if p.name == "liveavatar-14b":
            from transformers import Wav2Vec2Model
            w2v = Wav2Vec2Model(large_wav2vec2_config())
        else:
            from runtime.families.liveavatar.audio_front import tiny_wav2vec2
            w2v = tiny_wav2vec2(p.dit.audio_layers, p.dit.audio_dim)
    return sum(t.numel() for m in (vae, w2v) for t in m.parameters())


def resident_memory(engine) -> dict:
    """What the built engine's session actually holds, in GB (call after reset)."""
    stream = engine._session.stream
    cond = stream.cond.keys + stream.cond.values
    return {"trunk_weights_gb": _nbytes(engine.model.parameters()) / GB,
            "rings_gb": sum(r.nbytes for r in stream.rings) / GB, "condition_gb": _nbytes(cond) / GB,
            "text_kv_gb": _nbytes(t for kv in stream.text_kv for t in kv) / GB,
            "vae_and_wav2vec2_gb": _nbytes([*engine.vae.parameters(), *engine.front.model.parameters()]) / GB}


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# ---- settings ---------------------------------------------------------------------------------------

def liveavatar_settings(engine, preset: str) -> dict:
    """The shape and numeric settings of a family-2 measurement, keyed as family 1's where they agree."""
    cfg, (h, w) = engine.model.cfg, engine.size
    token_hw = (h // engine.vae.config.spatial_factor // cfg.patch_size[1],
                w // engine.vae.config.spatial_factor // cfg.patch_size[2])
    tokens = token_hw[0] * token_hw[1]
    q = engine.quantization
    return {
        "family": "liveavatar", "preset": preset, "device": str(_device(engine)),
        "dtype": str(engine.model.dtype).removeprefix("torch."), "resolution": f"{h}x{w}", "height": h, "width": w,
        "video_fps": VIDEO_FPS, "quantize": f"fp8-{q.granularity}" if q else None,
        "window": {"block_frames": cfg.block_frames, "block_video_frames": 4 * cfg.block_frames,
                   "ring_frames": cfg.ring_frames, "rings": cfg.num_steps, "tokens_per_frame": tokens,
                   "ring_tokens": cfg.ring_frames * tokens},
        "denoise_steps": cfg.num_steps, "decoder": "wan",
    }


def _device(engine) -> torch.device:
    return engine.model.patch_embedding.weight.device


def blocks_in_audio(engine, samples: int) -> int:
    """Blocks the engine emits from `samples` samples (each needs its window, lookahead included)."""
    n, t = 0, engine.family.timeline
    while t.samples_to_run(n) <= samples:
        n += 1
    return n


def seconds_for_blocks(engine, blocks: int) -> float:
    return engine.family.timeline.samples_to_run(blocks - 1) / SAMPLE_RATE


# ---- end to end -------------------------------------------------------------------------------------

def synced_clock(device: torch.device):
    """perf_counter after the device finished its queued work (stage timings of GPU time)."""
    def clock() -> float:
        torch.cuda.synchronize(device)
        return time.perf_counter()
    return clock


class StreamBench:
    """End-to-end measurement of a Live Avatar engine (module docstring); warmup/prepare/run_round as harness."""

    def __init__(self, engine, seconds: float, chunk_ms: float = 40.0, warmup_blocks: int = 2, seed: int = 0):
        from runtime.media import synth_speech_like, synthetic_face

        if not chunk_ms > 0:
            raise ValueError(f"chunk_ms must be > 0, got {chunk_ms}")
        if warmup_blocks < 0:
            raise ValueError(f"warmup_blocks must be >= 0, got {warmup_blocks}")
        self.audio = synth_speech_like(seconds, SAMPLE_RATE, seed=seed)
        if (n := blocks_in_audio(engine, len(self.audio))) < 2:
            raise ValueError(f"{seconds} s of audio gives {n} block(s); need >= 2 (block 0 is the first-block "
                             f"figure), i.e. >= {seconds_for_blocks(engine, 2):.3f} s")
        self.engine, self.seed, self.seconds, self.chunk_ms = engine, seed, seconds, chunk_ms
        self.warmup_blocks = warmup_blocks
        self.chunk = max(1, round(chunk_ms * SAMPLE_RATE / 1000.0))
        self.image = synthetic_face(*engine.size)
        self.device = _device(engine)
        self.timer, self.memory = Timer(self.device), PeakMemory(self.device)
        self.rounds: list[dict] = []
        if self.device.type == "cuda":
            engine.family.stage_clock = synced_clock(self.device)

    def _chunks(self):
        return audio_chunks(self.audio, self.chunk)

    def warmup(self) -> None:
        """A throwaway session until `warmup_blocks` blocks came out; never timed."""
        stream_warmup(self.engine, self.image, self.seed, self._chunks(), self.warmup_blocks)

    def prepare(self) -> None:
        self.engine.reset(self.image, seed=self.seed)
        self.memory.start()

    def run_round(self) -> None:
        timer, outputs, stamps = self.timer, [], []
        for i, chunk in enumerate(self._chunks()):
            start = timer.timestamp()
            with nvtx_range("bench.liveavatar.step", i):
                outputs.append(self.engine.step(chunk, sample_rate=SAMPLE_RATE))
            stamps.append((start, timer.timestamp()))
        start = timer.timestamp()  # the blocks still in flight (the round runner's lanes) count too
        outputs.append(self.engine.drain())
        stamps.append((start, timer.timestamp()))
        self.memory.stop()
        first = next((i for i, blocks in enumerate(outputs) if blocks), None)
        if first is None or sum(map(len, outputs)) < 2:
            raise RuntimeError(f"the engine returned {sum(map(len, outputs))} block(s) from {self.seconds} s "
                               "of audio; expected >= 2")
        for start, end in stamps:
            timer.add("step", start, end)
        timer.add("first", stamps[0][0], stamps[first][1])
        spans = timer.resolve()
        shares, seconds = block_shares(spans["step"], outputs)
        self.rounds.append({"first_s": spans["first"][0], "block_s": [s for s, _ in shares], "seconds": seconds,
                            "frames": sum(len(blk.frames) for _, blk in shares),
                            "stages": stage_samples(blk for _, blk in shares)})

    def measurement(self) -> dict:
        if not self.rounds:
            raise RuntimeError("run_round() was never called")
        rounds = self.rounds
        stages = {name: [v for r in rounds for v in r["stages"].get(name, [])] for name in rounds[0]["stages"]}
        fps = sum(r["frames"] for r in rounds) / sum(r["seconds"] for r in rounds)
        return {
            "kind": "e2e", "path": "liveavatar-engine", "timer": timer_name(self.device),
            "stage_timer": "perf_counter after torch.cuda.synchronize" if self.device.type == "cuda"
            else "perf_counter",
            "rounds": len(rounds), "warmup_blocks": self.warmup_blocks, "audio_seconds": self.seconds,
            "chunk_ms": self.chunk_ms, **latency_stats([s for r in rounds for s in r["block_s"]]),
            "first_frame_ms": float(np.median([r["first_s"] for r in rounds]) * 1e3),
            "fps": fps, "realtime_factor": fps / VIDEO_FPS,
            "frames_measured": sum(r["frames"] for r in rounds),
            "stage_p50_ms": stage_medians_ms(stages), **self.memory.as_dict(),
        }


# ---- DiT only ---------------------------------------------------------------------------------------

class ForwardBench:
    """One denoising step of one block: `forward_block` at step 0 against a full ring 0 of the engine's
    current session (its slots claimed by earlier block counters, random K/V), timed forward by forward.
    The session is restarted afterwards (call after an end-to-end measurement, or after reset)."""

    def __init__(self, engine, forwards: int = 8, warmup: int = 2, seed: int = 0):
        if forwards < 1:
            raise ValueError(f"forwards must be >= 1, got {forwards}")
        if engine._session is None:
            raise RuntimeError("reset(reference_image) the engine before the DiT-only measurement")
        self.engine, self.forwards, self.warmup_forwards, self.seed = engine, forwards, max(0, warmup), seed
        self.stream, self.model, self.cfg = engine._session.stream, engine.model, engine.model.cfg
        self.device = _device(engine)
        self.ring = self.stream.rings[0]
        self.full_at = self.ring.slots // self.cfg.block_frames  # first block counter whose ring is full
        self.timer, self.memory = Timer(self.device), PeakMemory(self.device)
        self.forward_s: list[float] = []

    @torch.no_grad()
    def _inputs(self):
        cfg, g = self.cfg, torch.Generator(self.device).manual_seed(self.seed)
        feats = torch.randn((1, cfg.audio_layers, cfg.audio_dim, 4 * cfg.block_frames), generator=g,
                            device=self.device)
        x = torch.randn(self.stream.latent_shape, generator=g, device=self.device).to(self.model.dtype)
        for k in range(self.full_at):  # claim every slot, then random K/V in all of them
            self.ring.begin_block(k, k * cfg.block_frames, cfg.block_frames)
        self.ring.k.normal_(generator=g)
        self.ring.v.normal_(generator=g)
        return x, self.model.encode_audio(feats.to(self.model.dtype))

    @torch.no_grad()
    def _forward(self, k: int, x, audio) -> torch.Tensor:
        s, F = self.stream, self.cfg.block_frames
        read = self.ring.begin_block(k, k * F, F)
        return self.model.forward_block(x, s.steps[0].mod, audio, s.text_kv, s.cond, first_frame=k * F,
                                        ref_frame=s.ref_frame(k, 0), history=read)

    def warmup(self) -> None:
        pass  # the warm-up forwards run in run_round, after the ring is filled

    def prepare(self) -> None:
        self.memory.start()

    def run_round(self) -> None:
        x, audio = self._inputs()
        for j in range(self.warmup_forwards):
            self._forward(self.full_at + j, x, audio)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        for j in range(self.forwards):
            with self.timer.span("forward"), nvtx_range("bench.liveavatar.forward", j):
                self._forward(self.full_at + self.warmup_forwards + j, x, audio)
        self.forward_s += self.timer.resolve()["forward"]
        self.memory.stop()
        self.stream.reset()  # the session's ring 0 holds noise now: start its stream again

    def measurement(self) -> dict:
        if not self.forward_s:
            raise RuntimeError("run_round() was never called")
        stats = latency_stats(self.forward_s)
        block_s = self.cfg.num_steps * stats["p50_block_ms"] / 1e3
        return {"kind": "dit", "path": "forward_block/step0", "timer": timer_name(self.device),
                "per": "one forward (one denoising step of one block, full ring)",
                "warmup_forwards": self.warmup_forwards, "ring_block_counter": self.full_at, **stats,
                "dit_block_ms": block_s * 1e3, "fps": 4 * self.cfg.block_frames / block_s,
                "fps_meaning": f"{4 * self.cfg.block_frames} frames / ({self.cfg.num_steps} x p50 forward): "
                               "DiT only, one device", **self.memory.as_dict()}


# ---- the report -------------------------------------------------------------------------------------

def run_liveavatar_bench(engine, preset: str, seconds: float, chunk_ms: float = 40.0, warmup_blocks: int = 2,
                         rounds: int = 1, dit_forwards: int = 8, seed: int = 0) -> dict:
    """End to end, then DiT only (`dit_forwards` = 0 skips it); the JSON report, shaped as family 1's."""
    results = {"e2e": _run(StreamBench(engine, seconds, chunk_ms, warmup_blocks, seed), rounds).measurement()}
    resident = resident_memory(engine)
    if dit_forwards:
        results["dit"] = _run(ForwardBench(engine, dit_forwards, warmup_blocks, seed), rounds).measurement()
    q = engine.quantization
    return {
        "tool": "avatar bench",
        "environment": environment(_device(engine)),
        "settings": {**liveavatar_settings(engine, preset), "seconds": seconds, "chunk_ms": chunk_ms,
                     "warmup_blocks": warmup_blocks, "rounds": rounds, "dit_forwards": dit_forwards, "seed": seed,
                     "random_weights": True, "weights_init": "device",
                     "memory_budget_gb": memory_budget(preset, q.granularity if q else None, engine.model.dtype)},
        "results": results,
        "resident_memory_gb": resident,
        "published": PUBLISHED,
    }


COLUMNS = ("p50 ms", "p99 ms", "FPS", "first-block ms", "peak MB")


def format_table(report: dict) -> str:
    """A header naming where and how it ran, one row per measurement, stage medians, memory, references."""
    env, st = report["environment"], report["settings"]
    w = st["window"]
    where = env["gpu_name"] or f"CPU ({env['cpu']}, {env['cpu_threads']} threads)"
    lines = [f"liveavatar {st['preset']} {st['resolution']} {st['dtype']}"
             + (f" {st['quantize']}" if st["quantize"] else "") + f" on {where}"
             + f"; torch {env['torch_version']}; commit {env['commit']}",
             (f"blocks of {w['block_video_frames']} frames, {w['rings']} rings of {w['ring_frames']} latent frames "
              f"({w['ring_tokens']} tokens); timer {report['results']['e2e']['timer']}"), ""]
    rows = [[f"{r['kind']} {r['path']}", f"{r['p50_block_ms']:.1f}", f"{r['p99_block_ms']:.1f}", f"{r['fps']:.2f}",
             f"{r['first_frame_ms']:.1f}" if "first_frame_ms" in r else "-", f"{r['peak_memory_mb']:.0f}"]
            for r in report["results"].values()]
    header = ["measurement", *COLUMNS]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        lines.append("  ".join([row[0].ljust(widths[0])] + [c.rjust(wd) for c, wd in zip(row[1:], widths[1:])]))
    stages = report["results"]["e2e"]["stage_p50_ms"]
    lines.append("stage p50 ms: " + ", ".join(f"{k} {v:.1f}" for k, v in stages.items()))
    res = report["resident_memory_gb"]
    lines.append("resident GB: " + ", ".join(f"{k.removesuffix('_gb')} {v:.3g}" for k, v in res.items()))
    lines.append(f"published (not this run): {report['published']}")
    return "\n".join(lines)
