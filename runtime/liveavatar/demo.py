"""`avatar demo --family liveavatar`: stream speech through a LiveAvatarEngine and write an MP4.

Same report as family 1's demo (runtime/cli.py: StreamReport, per-block table, summary); the loop is
its own because family 2's blocks carry frames as `rgb` and its engine has no EngineConfig.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np


def stream_liveavatar_to_mp4(engine, audio: np.ndarray, out: Path, chunk_samples: int):
    """Push `audio` (16 kHz) through engine.step in chunks, then flush; write every block to `out`."""
    from runtime.cli import BlockRecord, StreamReport
    from runtime.media import Mp4Writer

    sr = engine.sample_rate
    height, width = engine.size
    report = StreamReport(audio_s=len(audio) / sr)
    with Mp4Writer(out, width, height, engine.fps, sr) as writer:
        t0 = time.perf_counter()

        def take(blocks) -> None:
            for block in blocks:
                if report.first_block_latency_s is None:
                    report.first_block_latency_s = time.perf_counter() - t0
                writer.write_block(block.rgb, block.audio)
                report.blocks.append(BlockRecord(block.index, block.rgb.shape[0], dict(block.timings)))

        for start in range(0, len(audio), chunk_samples):
            take(engine.step(audio[start:start + chunk_samples], sr))
        take(engine.flush())
        report.wall_s = time.perf_counter() - t0
    if not report.blocks:
        raise RuntimeError("the engine produced no video blocks (is the audio long enough for one block?)")
    return report
