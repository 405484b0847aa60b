"""Measurement code shared by the pytest-benchmark suite (bench_*.py) and `avatar bench` (cli.py).

Two measurements, each a class with warmup() / prepare() / run_round() / record():
- `EngineBench`, end to end: a fresh session (reset, untimed) streams synthetic speech through
  `Engine.step` in `chunk_ms` chunks pushed back to back. Every step() call is one timed span. A
  block's latency is the span of the step() call that returned it (divided evenly when one call
  returns several, which needs chunks longer than a block). First-frame latency is the time from the
  first push to the return of block 0; the per-block figures, FPS and TFLOP/s cover everything after it.
- `DitBench`, DiT only: one block = `sample_block` (4 denoising steps + the KV refresh). Block 0 on
  an empty cache is the first-frame figure; then the cache is filled with random K/V as in steady
  state (a full window: attention cost depends on how many keys there are, not on their values) and
  `blocks` consecutive steady-state blocks are timed one by one, with no sync between them.
Spans use runtime.profiling.Timer: CUDA events on a GPU (one sync per round, when resolving),
perf_counter on the CPU. Warm-up runs before and is never timed. Latencies are reported as p50/p99
over every measured block of every round (numpy's linear percentile); p99 of few blocks is their max.
"""
from __future__ import annotations

import importlib.metadata
import os
import platform
import resource
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from runtime.config import CacheConfig, EngineConfig
from runtime.flops import PEAK_TFLOPS_BF16, achieved, block_flops, floor_ms
from runtime.models.dit import CausalAudioDiT, TimeMod
from runtime.profiling import Timer, nvtx_range
from runtime.sampler import BlockInputs, sample_block
from runtime.session import KVRing, StaticPlan, plan_block

REPO = Path(__file__).resolve().parents[1]


# ---- environment and settings ---------------------------------------------------------------------

def environment(device: torch.device | str = "cpu") -> dict:
    """Where a number was measured: date, commit, software versions, CPU and (on CUDA) the GPU."""
    device = torch.device(device)
    env = {
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "triton_version": _package_version("triton"),
        "cuda_version": torch.version.cuda,
        "gpu_name": None, "gpu_capability": None, "gpu_memory_gb": None, "gpu_driver": None,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu_name=props.name, gpu_capability=f"{props.major}.{props.minor}",
                   gpu_memory_gb=round(props.total_memory / 2 ** 30, 1),
                   gpu_driver=_gpu_driver(props.name, device.index or 0))
    return env


def git_commit() -> str | None:
    """Short HEAD hash, '+dirty' when tracked files differ from it; None outside a git checkout."""
    try:
        head = _git("rev-parse", "--short", "HEAD")
        dirty = _git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True,
                          timeout=10).stdout.strip()


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpu_driver(name: str, index: int) -> str | None:
    """NVIDIA driver version via NVML if installed, else nvidia-smi; None when neither answers."""
    version = _nvml_driver()
    if version:
        return version
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", "-i",
                              str(index)], capture_output=True, text=True, check=True, timeout=20)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _nvml_driver() -> str | None:
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
    except pynvml.NVMLError:  # NVML present but cannot load: the caller falls back to nvidia-smi
        return None
    return version.decode() if isinstance(version, bytes) else version


def settings(cfg: EngineConfig, device, dtype: torch.dtype, backend: str, decoder: str = "wan") -> dict:
    """The shape and numeric settings of a measurement (what a published number must name)."""
    c = cfg.cache
    return {
        "preset": cfg.name,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "resolution": f"{cfg.height}x{cfg.width}",   # HxW, as the spec's tables
        "height": cfg.height, "width": cfg.width,
        "video_fps": cfg.fps,
        "backend": backend,
        "window": {"block_frames": c.block_frames, "sink_frames": c.sink_frames,
                   "window_frames": c.window_frames, "rope_mode": c.rope_mode,
                   "tokens_per_frame": cfg.tokens_per_frame, "window_tokens": c.window_frames * cfg.tokens_per_frame},
        "denoise_steps": cfg.sampler.num_steps,
        "decoder": decoder,
    }


# ---- shared statistics ----------------------------------------------------------------------------

def latency_stats(seconds: list[float]) -> dict:
    if not seconds:
        raise ValueError("no blocks were measured")
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    return {"p50_block_ms": float(np.percentile(ms, 50)), "p99_block_ms": float(np.percentile(ms, 99)),
            "mean_block_ms": float(ms.mean()), "min_block_ms": float(ms.min()), "max_block_ms": float(ms.max()),
            "blocks_measured": int(ms.size)}


def throughput(cfg: EngineConfig, frames: int, seconds: float, flops: float, floor_block_ms: float,
               peak_tflops: float) -> dict:
    """FPS over the measured blocks, and FLOP-based TFLOP/s and fraction of the floor (runtime.flops)."""
    ach = achieved(flops, seconds, peak_tflops)
    return {"fps": frames / seconds, "realtime_factor": frames / seconds / cfg.fps,
            "achieved_tflops": ach["tflops"], "fraction_of_floor": ach["fraction_of_floor"],
            "peak_tflops": peak_tflops, "floor_block_ms": floor_block_ms, "flops_measured": flops}


class PeakMemory:
    """Peak memory of a measurement: torch.cuda.max_memory_allocated on a GPU (reset per round), the
    process's ru_maxrss on the CPU (a lifetime peak: it cannot be reset, so it includes earlier work)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_mb = 0.0

    @property
    def source(self) -> str:
        return "torch.cuda.max_memory_allocated" if self.device.type == "cuda" else "ru_maxrss (process peak)"

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def stop(self) -> None:
        if self.device.type == "cuda":
            mb = torch.cuda.max_memory_allocated(self.device) / 2 ** 20
        else:  # Linux reports KiB, macOS bytes
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            mb = rss / 2 ** 20 if sys.platform == "darwin" else rss / 2 ** 10
        self.peak_mb = max(self.peak_mb, mb)

    def as_dict(self) -> dict:
        return {"peak_memory_mb": self.peak_mb, "peak_memory_source": self.source}


def timer_name(device: torch.device) -> str:
    return "cuda_events" if device.type == "cuda" else "perf_counter"


# ---- audio arithmetic -----------------------------------------------------------------------------

def samples_for_blocks(cfg: EngineConfig, blocks: int) -> int:
    """Audio samples the engine must have before it can emit `blocks` blocks (lookahead included)."""
    if blocks < 1:
        raise ValueError(f"blocks must be >= 1, got {blocks}")
    last = blocks - 1
    ahead = cfg.audio.window_frames(cfg.fps)[1]
    return (cfg.first_video_frame(last) + cfg.video_frames_in_block(last) + ahead) * cfg.samples_per_video_frame


def seconds_for_blocks(cfg: EngineConfig, blocks: int) -> float:
    return samples_for_blocks(cfg, blocks) / cfg.audio.sample_rate


def blocks_in_audio(cfg: EngineConfig, samples: int) -> int:
    n = 0
    while samples_for_blocks(cfg, n + 1) <= samples:
        n += 1
    return n


# ---- end to end -----------------------------------------------------------------------------------

def block_shares(spans: list[float], outputs: list[list]) -> tuple[list[tuple[float, object]], float]:
    """Attribute a streamed round's step() spans to the blocks they returned.

    spans[i] is the i-th step() call's duration and outputs[i] the blocks it returned. A block's
    latency is its call's span divided by the blocks that call returned. Block 0 is the first-frame
    figure and is left out. Returns ([(seconds, block) for every later block], seconds from block 0's
    share to the last block's return: the steady-state wall time FPS is computed over)."""
    with_blocks = [i for i, blocks in enumerate(outputs) if blocks]
    if not with_blocks:
        raise ValueError("no step() call returned a block")
    first, last = with_blocks[0], with_blocks[-1]
    shares = []
    for i in range(first, last + 1):
        share = spans[i] / len(outputs[i]) if outputs[i] else 0.0
        shares += [(share, blk) for blk in (outputs[i][1:] if i == first else outputs[i])]
    n_first = len(outputs[first])
    return shares, spans[first] * (n_first - 1) / n_first + sum(spans[first + 1:last + 1])


def stage_samples(blocks) -> dict[str, list[float]]:
    """Each stage's seconds over `blocks` (their `timings` dicts), by stage name."""
    stages: dict[str, list[float]] = {}
    for blk in blocks:
        for name, sec in blk.timings.items():
            stages.setdefault(name, []).append(sec)
    return stages


def stage_medians_ms(stages: dict[str, list[float]]) -> dict[str, float]:
    return {name: float(np.median(values) * 1e3) for name, values in stages.items() if values}

def audio_chunks(audio, chunk: int):
    """`audio` in pieces of `chunk` samples (the last one shorter), as a caller streams it."""
    for start in range(0, len(audio), chunk):
        yield audio[start:start + chunk]


def stream_warmup(engine, image, seed: int, chunks, blocks: int) -> None:
    """A throwaway session of either family's engine until `blocks` blocks came out; never timed."""
    if not blocks:
        return
    engine.reset(image, seed=seed)
    done = 0
    for chunk in chunks:
        done += len(engine.step(chunk, engine.sample_rate))
        if done >= blocks:
            break


@dataclass
class _StreamRound:
    first_frame_s: float
    block_s: list[float]
    frames: int
    seconds: float                 # step() time from after the first block to the last block's return
    flops: float
    stages: dict[str, list[float]]
    push_s: list[float]            # step() calls that returned no block (audio pushes only)


def engine_path(engine) -> str:
    """What an e2e row measured: the attention backend, and `/eager` for mode="eager" (no graphs, no lanes)."""
    return f"engine/{engine.ops.name}" + ("/eager" if engine.mode == "eager" else "")


class EngineBench:
    """End-to-end measurement of an Engine (see the module docstring for what is timed)."""

    def __init__(self, engine, seconds: float, chunk_ms: float = 40.0, warmup_blocks: int = 2, seed: int = 0,
                 peak_tflops: float = PEAK_TFLOPS_BF16):
        from runtime.media import synth_speech_like, synthetic_face

        cfg = engine.config
        sr = cfg.audio.sample_rate
        if not chunk_ms > 0:
            raise ValueError(f"chunk_ms must be > 0, got {chunk_ms}")
        if warmup_blocks < 0:
            raise ValueError(f"warmup_blocks must be >= 0, got {warmup_blocks}")
        self.audio = synth_speech_like(seconds, sr, seed=seed)
        blocks = blocks_in_audio(cfg, len(self.audio))
        if blocks < 2:
            raise ValueError(f"{seconds} s of audio gives {blocks} block(s); need >= 2 (block 0 is the "
                             f"first-frame figure), i.e. >= {seconds_for_blocks(cfg, 2):.3f} s")
        self.engine, self.cfg, self.seed = engine, cfg, seed
        self.seconds, self.chunk_ms, self.warmup_blocks, self.peak_tflops = seconds, chunk_ms, warmup_blocks, peak_tflops
        self.chunk = max(1, round(chunk_ms * sr / 1000.0))
        self.image = synthetic_face(cfg.height, cfg.width)
        self.timer = Timer(engine.device)
        self.memory = PeakMemory(engine.device)
        self.rounds: list[_StreamRound] = []

    def _chunks(self):
        return audio_chunks(self.audio, self.chunk)

    def warmup(self) -> None:
        """Stream a throwaway session until `warmup_blocks` blocks came out (block 0 and later shapes)."""
        stream_warmup(self.engine, self.image, self.seed, self._chunks(), self.warmup_blocks)

    def prepare(self) -> None:
        """A fresh session (reference image encoded): untimed."""
        self.engine.reset(self.image, seed=self.seed)
        self.memory.start()

    def run_round(self) -> None:
        """Stream all the audio into the prepared session, timing every step() call."""
        sr, timer = self.cfg.audio.sample_rate, self.timer
        outputs, stamps = [], []
        for i, chunk in enumerate(self._chunks()):
            start = timer.timestamp()
            with nvtx_range("bench.step", i):
                blocks = self.engine.step(chunk, sample_rate=sr)
            stamps.append((start, timer.timestamp()))
            outputs.append(blocks)
        start = timer.timestamp()  # the blocks still in flight after the last chunk (runtime.Engine.drain)
        outputs.append(self.engine.drain())
        stamps.append((start, timer.timestamp()))
        self.memory.stop()
        total = sum(map(len, outputs))
        if total < 2:
            raise RuntimeError(f"the engine returned {total} block(s) from {self.seconds} s of audio; expected >= 2")
        first = next(i for i, blocks in enumerate(outputs) if blocks)
        for start, end in stamps:
            timer.add("step", start, end)
        timer.add("first", stamps[0][0], stamps[first][1])
        spans = timer.resolve()
        self.rounds.append(self._round(spans["step"], spans["first"][0], outputs, first))

    def _round(self, spans: list[float], first_frame_s: float, outputs: list[list], first: int) -> _StreamRound:
        shares, seconds = block_shares(spans, outputs)
        block_s, frames, flops = [], 0, 0.0
        for share, blk in shares:
            block_s.append(share)
            frames += blk.num_frames
            flops += block_flops(self.cfg, self.engine.decoder_name, blk.index).total
        return _StreamRound(first_frame_s=first_frame_s, block_s=block_s, frames=frames, seconds=seconds,
                            flops=flops, stages=stage_samples(blk for _, blk in shares),
                            push_s=[s for s, blocks in zip(spans, outputs) if not blocks])

    def measurement(self) -> dict:
        """The figures over every round so far (call run_round at least once)."""
        if not self.rounds:
            raise RuntimeError("run_round() was never called")
        rounds, cfg = self.rounds, self.cfg
        ahead = cfg.audio.window_frames(cfg.fps)[1]
        seconds = sum(r.seconds for r in rounds)
        return {
            "kind": "e2e", "path": engine_path(self.engine), "timer": timer_name(self.engine.device),
            "rounds": len(rounds), "warmup_blocks": self.warmup_blocks,
            "audio_seconds": self.seconds, "chunk_ms": self.chunk_ms,
            **latency_stats([s for r in rounds for s in r.block_s]),
            "first_frame_ms": float(np.median([r.first_frame_s for r in rounds]) * 1e3),
            "first_frame_audio_ms": samples_for_blocks(cfg, 1) / cfg.audio.sample_rate * 1e3,
            "lookahead_frames": ahead,
            **throughput(cfg, sum(r.frames for r in rounds), seconds, sum(r.flops for r in rounds),
                         floor_ms(cfg).wan_ms, self.peak_tflops),
            "stage_p50_ms": {name: float(np.median([v for r in rounds for v in r.stages.get(name, [])]) * 1e3)
                             for name in rounds[0].stages},
            "push_p50_ms": float(np.median([s for r in rounds for s in r.push_s]) * 1e3)
            if any(r.push_s for r in rounds) else None,
            **self.memory.as_dict(),
        }

    def record(self) -> dict:
        """Environment + settings + measurement, flat: what goes into benchmark.extra_info."""
        e = self.engine
        return {**environment(e.device), **settings(self.cfg, e.device, e.dtype, e.ops.name, e.decoder_name),
                **self.measurement()}


def measure_engine(engine, seconds_of_audio: float, chunk_ms: float = 40.0, warmup_blocks: int = 2,
                   rounds: int = 1, seed: int = 0, peak_tflops: float = PEAK_TFLOPS_BF16,
                   context: bool = True) -> dict:
    """End-to-end figures of `engine` (warm-up, then `rounds` fresh sessions); see EngineBench.

    With `context` the environment and settings are included (a self-contained record)."""
    bench = _run(EngineBench(engine, seconds_of_audio, chunk_ms, warmup_blocks, seed, peak_tflops), rounds)
    return bench.record() if context else bench.measurement()


def _run(bench, rounds: int):
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    bench.warmup()
    for _ in range(rounds):
        bench.prepare()
        bench.run_round()
    return bench


# ---- DiT only -------------------------------------------------------------------------------------

@dataclass
class DitSetup:
    """What every DiT block needs besides its cache: weights, ops, the per-step modulation, text K/V
    and the reference latent. Batch 1, default (all-zero) prompt, as the engine without a prompt."""

    config: EngineConfig
    dit: CausalAudioDiT
    ops: type
    device: torch.device
    dtype: torch.dtype
    text_kv: list = field(repr=False)
    mods: list[TimeMod] = field(repr=False)
    ref_latent: torch.Tensor = field(repr=False)

    @classmethod
    def from_engine(cls, engine, seed: int = 0) -> DitSetup:
        return cls.build(engine.config, engine.dit, engine.ops, engine.device, engine.dtype, seed)

    @classmethod
    @torch.no_grad()
    def build(cls, cfg: EngineConfig, dit: CausalAudioDiT, ops, device, dtype, seed: int = 0) -> DitSetup:
        d, frames = cfg.dit, cfg.cache.block_frames
        text_kv = dit.text_kv(torch.zeros(1, 1, d.text_dim, device=device, dtype=dtype))
        steps = (*cfg.sampler.timesteps, cfg.sampler.refresh_timestep)
        mods = [dit.time_mod(torch.full((1, frames), float(t))) for t in steps]
        g = torch.Generator().manual_seed(seed)
        ref = torch.randn((1, d.out_dim, 1, *cfg.latent_hw), generator=g).to(device)
        return cls(cfg, dit, ops, torch.device(device), dtype, text_kv, mods, ref)


def block_inputs(setup: DitSetup, block_index: int, seed: int = 0) -> BlockInputs:
    """Random but reproducible inputs of one block (noise, audio condition), shaped as the engine's."""
    cfg, d = setup.config, setup.config.dit
    frames = cfg.cache.block_frames
    g = torch.Generator().manual_seed(seed * 1_000_003 + block_index)
    noise = torch.randn((cfg.sampler.num_steps, 1, d.out_dim, frames, *cfg.latent_hw), generator=g)
    feats = torch.randn((1, d.audio_pack * frames, d.audio_feature_dim), generator=g)
    ref = setup.ref_latent
    mask = torch.ones(1, 1, frames, *cfg.latent_hw, device=setup.device)
    if block_index == 0:
        mask[:, :, 0] = 0  # latent frame 0 of the stream is the reference frame
    cond = torch.cat([ref.expand(-1, -1, frames, -1, -1), mask], dim=1).to(setup.dtype)
    with torch.no_grad():
        audio = setup.dit.audio_cond(feats.to(setup.device, setup.dtype))
    return BlockInputs(noise=noise.to(setup.device), cond=cond, audio=audio,
                       ref_latent=ref if block_index == 0 else None)


class RingRunner:
    """Our path: runtime.sampler.sample_block over the session KV ring, planned as the Engine plans it."""

    def __init__(self, setup: DitSetup):
        cfg = setup.config
        self.setup, self.cfg = setup, cfg
        self.name = f"ring/{setup.ops.name}"
        self.ring = KVRing.allocate(cfg, 1, setup.device, setup.dtype, roped=setup.ops.roped_ring)
        self.plan = StaticPlan.allocate(cfg.cache, 1, setup.device)

    def reset(self) -> None:
        self.ring.clear()

    def prefill(self, block_index: int, seed: int = 0) -> None:
        """Random finite K/V in every slot: block `block_index`'s plan then sees a full window."""
        g = torch.Generator(self.setup.device).manual_seed(seed)
        self.ring.k.normal_(generator=g)
        self.ring.v.normal_(generator=g)

    def run_block(self, block_index: int, inputs: BlockInputs) -> torch.Tensor:
        s = self.setup
        plan = self.plan.update(plan_block(block_index, self.cfg.cache, 1))
        self.ring.follow(plan, self.cfg.tokens_per_frame, self.cfg.dit.rope_theta, block_index)  # timed too
        return sample_block(s.dit, s.ops, inputs, s.mods, self.cfg.sampler.sigmas, s.text_kv,
                            self.ring.k, self.ring.v, plan)


def steady_block_index(cache: CacheConfig) -> int:
    """The first block whose window is full (the KV ring holds window_frames frames)."""
    return -(-cache.window_frames // cache.block_frames) - 1


@dataclass
class _DitRound:
    first_s: float
    block_s: list[float]


class DitBench:
    """DiT-only measurement of a runner (RingRunner or upstream_path.UpstreamRunner)."""

    def __init__(self, runner, setup: DitSetup, blocks: int = 8, warmup_blocks: int = 2, seed: int = 0,
                 peak_tflops: float = PEAK_TFLOPS_BF16):
        if blocks < 1:
            raise ValueError(f"blocks must be >= 1, got {blocks}")
        if warmup_blocks < 0:
            raise ValueError(f"warmup_blocks must be >= 0, got {warmup_blocks}")
        self.runner, self.setup, self.cfg = runner, setup, setup.config
        self.blocks, self.warmup_blocks, self.seed, self.peak_tflops = blocks, warmup_blocks, seed, peak_tflops
        self.start = steady_block_index(self.cfg.cache)
        # inputs are made before any timing (none of their cost is measured)
        self.first = block_inputs(setup, 0, seed)
        self.steady = [block_inputs(setup, self.start + k, seed) for k in range(blocks)]
        self.timer = Timer(setup.device)
        self.memory = PeakMemory(setup.device)
        self.rounds: list[_DitRound] = []

    def warmup(self) -> None:
        """Block 0 (short window) and `warmup_blocks` steady-state blocks, untimed."""
        if not self.warmup_blocks:
            return
        self.runner.reset()
        self.runner.run_block(0, self.first)
        self.runner.prefill(self.start, self.seed)
        for k in range(self.warmup_blocks):
            self.runner.run_block(self.start + k, self.steady[k % self.blocks])
        if self.setup.device.type == "cuda":  # the warm-up is finished before anything is timed
            torch.cuda.synchronize(self.setup.device)

    def prepare(self) -> None:
        self.runner.reset()
        self.memory.start()

    def run_round(self) -> None:
        runner, timer = self.runner, self.timer
        with timer.span("first"), nvtx_range("bench.dit.first"):
            runner.run_block(0, self.first)
        runner.prefill(self.start, self.seed)
        for k, inputs in enumerate(self.steady):
            with timer.span("block"), nvtx_range("bench.dit.block", k):
                runner.run_block(self.start + k, inputs)
        spans = timer.resolve()
        self.memory.stop()
        self.rounds.append(_DitRound(first_s=spans["first"][0], block_s=spans["block"]))

    def measurement(self) -> dict:
        if not self.rounds:
            raise RuntimeError("run_round() was never called")
        cfg = self.cfg
        block_s = [s for r in self.rounds for s in r.block_s]
        frames = cfg.video_frames_in_block(1) * len(block_s)
        return {
            "kind": "dit", "path": self.runner.name, "timer": timer_name(self.setup.device),
            "rounds": len(self.rounds), "warmup_blocks": self.warmup_blocks,
            "first_steady_block": self.start,
            **latency_stats(block_s),
            "first_frame_ms": float(np.median([r.first_s for r in self.rounds]) * 1e3),
            **throughput(cfg, frames, sum(block_s), block_flops(cfg).dit * len(block_s), floor_ms(cfg).dit_ms,
                         self.peak_tflops),
            **self.memory.as_dict(),
        }

    def record(self) -> dict:
        s = self.setup
        return {**environment(s.device), **settings(self.cfg, s.device, s.dtype, s.ops.name), **self.measurement()}


def measure_dit(runner, setup: DitSetup, blocks: int = 8, warmup_blocks: int = 2, rounds: int = 1, seed: int = 0,
                peak_tflops: float = PEAK_TFLOPS_BF16, context: bool = True) -> dict:
    """DiT-only figures of `runner` (our RingRunner or the UpstreamRunner); see DitBench."""
    bench = _run(DitBench(runner, setup, blocks, warmup_blocks, seed, peak_tflops), rounds)
    return bench.record() if context else bench.measurement()


def env_flag_int(name: str, default: int) -> int:
    """An integer setting from the environment (benchmark sizes), with a clear error when malformed."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r}: expected an integer") from None
