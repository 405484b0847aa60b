"""Family 2 as a product, like family 1's Engine: random/pretrained construction, reset(image),
resampling, interrupt, idle, end_segment, pending_samples, bad input, FP8. Tiny preset, CPU."""
import itertools

import numpy as np
import pytest
import torch

from runtime.audio.validate import AudioInputError
from runtime.liveavatar.engine import LiveAvatarEngine
from runtime.liveavatar.reference import encode_reference
from runtime.media import synthetic_face

SR, HOP = 16000, 12 * 640  # one block drives 12 video frames of 640 samples


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _audio(n, seed=0, sr=SR):
    t = np.arange(n) / sr
    rng = np.random.default_rng(seed)
    return (0.3 * np.sin(2 * np.pi * 180 * t * (1 + t)) + 0.05 * rng.standard_normal(n)).astype(np.float32)


def _engine(seed=0, **kw):
    e = LiveAvatarEngine.random("tiny", "cpu", torch.float32, **kw)
    e.reset(synthetic_face(64, 64), seed=seed)
    return e


def test_blocks_carry_frames_pts_and_the_audio_that_drove_them():
    e = _engine()
    audio = _audio(3 * HOP + 1000)
    blocks = e.step(audio, SR) + e.flush()
    # 3 whole blocks + 1000 samples = 2 frames of a fourth (flush trims the silence padding after them)
    assert [b.frames.shape for b in blocks] == [(12, 64, 64, 3)] * 3 + [(2, 64, 64, 3)]
    assert all(b.frames.dtype == np.uint8 for b in blocks) and blocks[1].frames.std() > 1
    firsts = [b.first_frame for b in blocks]
    assert firsts == list(np.cumsum([0] + [b.frames.shape[0] for b in blocks[:-1]]))  # contiguous output frames
    assert [b.pts for b in blocks] == [f / 25 for f in firsts]
    assert np.array_equal(blocks[0].audio, audio[:HOP])  # from sample 0: no input audio is lost
    assert np.array_equal(blocks[1].audio, audio[HOP:2 * HOP])
    assert all(len(b.audio) == 640 * b.frames.shape[0] for b in blocks)
    with pytest.raises(RuntimeError, match="flushed"):
        e.step(audio[:100], SR)


@pytest.mark.parametrize("n", [1, 639, 640, HOP - 1, HOP, 2 * HOP + 641, 17720 * 16 // 4])
def test_no_input_audio_is_lost_and_av_stays_aligned(n):
    """Issue 13 item 5: the output audio is the input rounded up to whole frames (zeros after it),
    block by block exactly the samples of its frames; block 0 opens on the reference held still."""
    e = _engine()
    audio = _audio(n, seed=8)
    blocks = e.step(audio, SR) + e.flush()
    out = np.concatenate([b.audio for b in blocks])
    frames = -(-n // 640)
    assert len(out) == 640 * frames and sum(b.frames.shape[0] for b in blocks) == frames
    assert np.array_equal(out[:n], audio) and not out[n:].any()
    for b in blocks:  # A/V per block: its frames are output frames first_frame.., its audio their samples
        assert len(b.audio) == 640 * b.frames.shape[0] and b.pts == b.first_frame / 25
        assert np.array_equal(b.audio, out[640 * b.first_frame:640 * (b.first_frame + b.frames.shape[0])])
    lead = e.lead_frames
    still = blocks[0].frames[:min(lead, frames)]
    assert lead == 3 and (still == still[:1]).all()  # the 120 ms before the first latent frame
    want = e.decoder.model.decode_offline(e.stream.ref_latent)  # the reference as the VAE shows it
    assert np.array_equal(still[0], ((want[0, :, 0].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy())


def test_reset_encodes_the_image_and_its_73_frame_repeat():
    e = _engine()
    face = synthetic_face(64, 64)
    ref, motion = encode_reference(e.vae, face, 19)
    assert motion.shape == (1, 16, 19, 8, 8)
    assert torch.equal(e.stream.ref_latent, ref)
    # motion latents: upstream encodes the image repeated over 73 video frames (not the single-frame latent)
    video = torch.from_numpy(face).permute(2, 0, 1)[None, :, None].float() / 127.5 - 1
    assert torch.allclose(e.stream.motion_latents, e.vae.encode(video.repeat(1, 1, 73, 1, 1)), atol=1e-5)
    assert not torch.allclose(motion[:, :, -1:], ref, atol=1e-3)
    big = np.repeat(np.repeat(face, 3, 0), 5, 1)  # any size: cover-resize + centre crop to 64x64
    e.reset(big)
    assert e.stream.ref_latent.shape == (1, 16, 1, 8, 8)


def test_resampled_24khz_chunking_is_bitwise_invariant():
    audio = _audio(36000, seed=2, sr=24000)  # 1.5 s
    rng = np.random.default_rng(5)
    cuts = [[0, len(audio)], list(range(0, len(audio), 480)) + [len(audio)],
            [0, *sorted(rng.choice(np.arange(1, len(audio)), 25, replace=False)), len(audio)]]
    runs = []
    for c in cuts:
        e = _engine()
        runs.append([b for a, z in itertools.pairwise(c) for b in e.step(audio[a:z], 24000, resample=True)] + e.flush())
    assert len(runs[0]) >= 3
    for other in runs[1:]:
        assert all(np.array_equal(a.frames, b.frames) and np.array_equal(a.audio, b.audio) for a, b in zip(runs[0], other))
    with pytest.raises(AudioInputError, match="resample"):
        _engine().step(audio, 24000)  # another rate without resample=True is an error
    e = _engine()
    e.step(audio[:100], 24000, resample=True)
    with pytest.raises(ValueError, match="changed mid-stream"):
        e.step(audio[:100], 22050, resample=True)


@pytest.mark.parametrize("bad, rate, resample", [
    (np.zeros((2, 800), np.float32), SR, False), (np.full(800, np.nan, np.float32), SR, False),
    (np.full(800, 2.0, np.float32), 24000, True), (np.zeros(800), SR, False)])
def test_bad_audio_changes_nothing(bad, rate, resample):
    a, b = _engine(), _engine()
    x = _audio(2 * HOP, seed=4)
    a.step(x[:9000], SR)
    b.step(x[:9000], SR)
    with pytest.raises(AudioInputError):
        a.step(bad, rate, resample=resample)
    assert a.resampler is None and a.pending_samples == b.pending_samples
    out_a, out_b = a.step(x[9000:], SR) + a.flush(), b.step(x[9000:], SR) + b.flush()
    assert len(out_a) == len(out_b) and all(np.array_equal(p.frames, q.frames) for p, q in zip(out_a, out_b))


@pytest.mark.parametrize("image, prompt, match", [
    (np.zeros((64, 64, 2), np.uint8), None, "image"), (np.zeros((64, 64, 3)), None, "uint8"),
    (None, None, "reference_image"),
    (synthetic_face(64, 64), torch.zeros(3, 5), "prompt_embeds"),
    (synthetic_face(64, 64), torch.full((2, 32), float("nan")), "finite")])
def test_bad_reset_changes_nothing(image, prompt, match):
    a, b = _engine(), _engine()
    x = _audio(2 * HOP + 6000, seed=8)
    first = a.step(x[:HOP + 4000], SR)
    b.step(x[:HOP + 4000], SR)
    with pytest.raises((ValueError, TypeError), match=match):
        a.reset(image, prompt_embeds=prompt, seed=1)
    out_a, out_b = a.step(x[HOP + 4000:], SR), b.step(x[HOP + 4000:], SR)
    assert first and out_a and all(torch.equal(p.latents, q.latents) for p, q in zip(out_a, out_b))


def test_prompt_embeds_matter_and_default_to_zeros():
    e = _engine()
    x = _audio(HOP + 4000)
    zeros = e.step(x, SR)
    e.reset(synthetic_face(64, 64), prompt_embeds=torch.zeros(1, 32), seed=0)
    assert torch.equal(e.step(x, SR)[0].latents, zeros[0].latents)
    e.reset(synthetic_face(64, 64), prompt_embeds=torch.randn(4, 32), seed=0)
    assert not torch.allclose(e.step(x, SR)[0].latents, zeros[0].latents, atol=1e-3)


def test_interrupt_drops_pending_audio_and_the_next_speech_drives_the_next_block():
    e = _engine()
    x, speech = _audio(2 * HOP + 3000, seed=1), _audio(2 * HOP, seed=9)
    done = e.step(x, SR)
    pending = e.pending_samples
    assert pending == len(x) - HOP * len(done) > 0
    assert e.interrupt() == pending and e.pending_samples == 0 and e.next_block == len(done)
    nxt = e.step(speech, SR)
    assert nxt[0].index == len(done) and np.array_equal(nxt[0].audio, speech[:HOP])
    assert e.interrupt() == len(speech) - HOP  # what block 1 of the speech would have used


def test_idle_and_end_segment_leave_speech_starting_at_the_next_block():
    e = _engine()
    idle = e.idle(2)
    assert [b.index for b in idle] == [0, 1] and e.pending_samples == 0
    assert all(not b.audio.any() for b in idle)
    speech = _audio(HOP + 2000, seed=3)
    blocks = e.step(speech, SR) + e.end_segment()
    assert [b.index for b in blocks] == [2, 3] and e.pending_samples == 0
    assert np.array_equal(blocks[0].audio, speech[:HOP]) and np.array_equal(blocks[1].audio[:2000], speech[HOP:])
    longer = _audio(HOP + 6000, seed=4)
    after = e.step(longer, SR)
    assert after[0].index == 4 and np.array_equal(after[0].audio, longer[:HOP])
    queued = e.pending_samples
    assert queued > 0 and e.idle(1)[0].index == 5  # queued speech first: the idle block is driven by it
    assert np.array_equal(e.step(np.zeros(0, np.float32), SR), [])  # an empty chunk is a no-op
    with pytest.raises(ValueError, match=">= 1"):
        e.idle(0)


def test_fp8_engine_is_deterministic_and_close_to_fp32():
    x = _audio(2 * HOP + 4000, seed=6)
    runs = [_engine(quantize=q).step(x, SR) for q in ("fp8", "fp8", None)]
    a, b, ref = runs
    assert all(np.array_equal(p.frames, q.frames) for p, q in zip(a, b))
    for p, q in zip(a, ref):
        rel = (p.latents - q.latents).norm() / q.latents.norm()
        assert 0 < rel < 0.1, rel
        assert np.abs(p.frames.astype(float) - q.frames.astype(float)).mean() < 8
    with pytest.raises(ValueError, match="quantize"):
        LiveAvatarEngine.random("tiny", "cpu", quantize="int4")
