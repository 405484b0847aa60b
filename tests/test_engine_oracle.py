"""End to end: the engine's frames equal an offline pipeline built from the oracle.

The offline side computes the same audio features (the documented window rule, all audio at once),
draws the same noise (one [steps, B, C, F, h, w] draw per block from the session's seeded
generator), generates every block with the cache-free oracle and decodes the whole clip at once.
"""
import numpy as np
import torch

from runtime import Engine
from runtime.audio import AudioStream
from runtime.media import synth_speech_like

from .oracle import oracle_generate


def test_engine_equals_offline_oracle():
    eng = Engine.from_pretrained("tiny", device="cpu")
    cfg = eng.config
    image = np.random.default_rng(5).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    n_blocks = 7  # window of 15 latent frames: eviction from block 5 on
    spf = cfg.samples_per_video_frame
    n_frames = cfg.first_video_frame(n_blocks - 1) + cfg.video_frames_in_block(n_blocks - 1)
    audio = synth_speech_like(n_frames * spf / cfg.audio.sample_rate, sample_rate=cfg.audio.sample_rate, seed=4)
    audio = audio[: n_frames * spf].astype(np.float32)

    eng.reset(image, seed=3)
    blocks = eng.step(audio) + eng.flush()
    assert len(blocks) == n_blocks
    frames = np.concatenate([b.frames for b in blocks])

    # offline: features, noise, oracle latents, one offline decode
    lookahead = cfg.audio.window_frames(cfg.fps)[1] * spf
    stream = AudioStream(cfg.audio, cfg.fps, eng.audio_encoder, "cpu", torch.float32, max_span_frames=12,
                         max_chunk_samples=len(audio) + lookahead)
    stream.push(np.concatenate([audio, np.zeros(lookahead, np.float32)]))
    gen = torch.Generator().manual_seed(3)
    s = eng._session
    noises, audios = [], []
    C, (h, w), F = cfg.dit.out_dim, cfg.latent_hw, cfg.cache.block_frames
    for b in range(n_blocks):
        v0, n = cfg.first_video_frame(b), cfg.video_frames_in_block(b)
        feats = stream.features(v0, v0 + n)
        if b == 0:
            feats = torch.cat([feats[:, :1].repeat(1, cfg.dit.audio_pack - 1, 1), feats], 1)
        audios.append(eng.dit.audio_cond(feats))
        noises.append(torch.randn(cfg.sampler.num_steps, 1, C, F, h, w, generator=gen))
    latents = oracle_generate(eng.dit, cfg, noises, audios, s.ref_latent, s.text_kv)
    video = eng.vae.decode_offline(torch.cat(latents, dim=2))[0]
    expect = ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()
    assert expect.shape == frames.shape
    diff = np.abs(expect.astype(int) - frames.astype(int))
    assert diff.max() <= 1, diff.max()          # uint8 rounding of fp32 noise-level differences
    assert (diff > 0).mean() < 1e-3
