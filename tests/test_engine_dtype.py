"""bf16 end to end stays close to the fp32 reference (per-dtype tolerance on uint8 frames)."""
import numpy as np
import torch

from runtime import Engine


def test_bf16_engine_tracks_fp32():
    audio = (np.random.default_rng(0).standard_normal(16000 * 2) * 0.2).clip(-1, 1).astype(np.float32)
    image = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    frames = {}
    for dtype in (torch.float32, torch.bfloat16):
        eng = Engine.from_pretrained("tiny", device="cpu", dtype=dtype)
        assert eng.dit.head.head.weight.dtype == dtype and eng.vae.dtype == dtype
        eng.reset(image, seed=3)
        frames[dtype] = np.concatenate([b.frames for b in eng.step(audio) + eng.flush()]).astype(int)
    ref, low = frames[torch.float32], frames[torch.bfloat16]
    assert ref.shape == low.shape
    diff = np.abs(ref - low)
    # bf16 keeps 8 mantissa bits: about one grey level on average, never a different picture. (The
    # random-weight `micro` preset, 32 channels wide, drifts further: errors feed back through the cache.)
    assert diff.mean() < 2.0, diff.mean()
    assert np.corrcoef(ref.ravel(), low.ravel())[0, 1] > 0.999
