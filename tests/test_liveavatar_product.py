"""Family 2 as a product, through the one engine: construction from presets, open(image), resampling,
interrupt, idle, end_segment, pending_samples, bad input, no input audio lost, FP8. liveavatar-tiny, CPU."""
import itertools

import numpy as np
import pytest
import torch

from runtime.audio.validate import AudioInputError
from runtime.engine import Engine
from runtime.families.liveavatar.reference import encode_reference
from runtime.media import synthetic_face
from tests.test_liveavatar_forward import _one_thread  # noqa: F401 - autouse: one torch thread

SR, HOP = 16000, 12 * 640  # one block drives 12 video frames of 640 samples
FACE = synthetic_face(64, 64)



@pytest.fixture(scope="module")
def engine():
    with Engine.from_pretrained("liveavatar-tiny", device="cpu", dtype=torch.float32, mode="eager") as e:
        yield e


def _audio(n, seed=0, sr=SR):
    t = np.arange(n) / sr
    rng = np.random.default_rng(seed)
    return (0.3 * np.sin(2 * np.pi * 180 * t * (1 + t)) + 0.05 * rng.standard_normal(n)).astype(np.float32)


def _same(a, b) -> bool:
    return len(a) == len(b) and all(np.array_equal(p.frames, q.frames) and np.array_equal(p.audio, q.audio)
                                    for p, q in zip(a, b))


def test_presets_build_the_family_and_its_format(engine):
    assert engine.family.name == "liveavatar" and (engine.sample_rate, engine.fps, engine.size) == (SR, 25, (64, 64))
    with pytest.raises(ValueError, match="backend"):
        Engine.from_pretrained("liveavatar-tiny", device="cpu", backend="triton")
    with pytest.raises(ValueError, match="quantize"):
        Engine.from_pretrained("liveavatar-tiny", device="cpu", quantize="int4")


def test_blocks_carry_frames_pts_and_the_audio_that_drove_them(engine):
    audio = _audio(3 * HOP + 1000)
    with engine.open(FACE) as s:
        blocks = s.step(audio, SR) + s.flush()
        with pytest.raises(RuntimeError, match="flushed"):
            s.step(audio[:100], SR)
    # 3 whole blocks + 1000 samples = 2 frames of a fourth (flush trims the silence padding after them)
    assert [b.frames.shape for b in blocks] == [(12, 64, 64, 3)] * 3 + [(2, 64, 64, 3)]
    assert all(b.frames.dtype == np.uint8 for b in blocks) and blocks[1].frames.std() > 1
    firsts = [b.first_frame for b in blocks]
    assert firsts == list(np.cumsum([0] + [b.frames.shape[0] for b in blocks[:-1]]))  # contiguous output frames
    assert [b.pts for b in blocks] == [f / 25 for f in firsts]
    assert np.array_equal(blocks[0].audio, audio[:HOP])  # from sample 0: no input audio is lost
    assert np.array_equal(blocks[1].audio, audio[HOP:2 * HOP])
    assert all(len(b.audio) == 640 * b.frames.shape[0] for b in blocks)
    assert {"audio", "denoise", "decode", "total"} <= set(blocks[0].timings)


@pytest.mark.parametrize("n", [1, 639, 640, HOP - 1, HOP, 2 * HOP + 641])
def test_no_input_audio_is_lost_and_av_stays_aligned(engine, n):
    """Issue 13 item 5: the output audio is the input rounded up to whole frames (zeros after it),
    block by block exactly the samples of its frames; block 0 opens on the reference held still."""
    audio = _audio(n, seed=8)
    with engine.open(FACE) as s:
        blocks = s.step(audio, SR) + s.flush()
        ref_latent = s.state.stream.ref_latent
    out = np.concatenate([b.audio for b in blocks])
    frames = -(-n // 640)
    assert len(out) == 640 * frames and sum(b.frames.shape[0] for b in blocks) == frames
    assert np.array_equal(out[:n], audio) and not out[n:].any()
    for b in blocks:  # A/V per block: its frames are output frames first_frame.., its audio their samples
        assert len(b.audio) == 640 * b.frames.shape[0] and b.pts == b.first_frame / 25
        assert np.array_equal(b.audio, out[640 * b.first_frame:640 * (b.first_frame + b.frames.shape[0])])
    lead = engine.family.lead_frames
    still = blocks[0].frames[:min(lead, frames)]
    assert lead == 3 and (still == still[:1]).all()  # the 120 ms before the first latent frame
    want = engine.family.vae.decode_offline(ref_latent)  # the reference as the VAE shows it
    assert np.array_equal(still[0], ((want[0, :, 0].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy())


def test_open_encodes_the_image_and_its_73_frame_repeat(engine):
    vae = engine.family.vae
    ref, motion = encode_reference(vae, FACE, 19)
    assert motion.shape == (1, 16, 19, 8, 8)
    with engine.open(FACE) as s:
        assert torch.equal(s.state.stream.ref_latent, ref)
        # motion latents: upstream encodes the image repeated over 73 video frames (not the single-frame latent)
        video = torch.from_numpy(FACE).permute(2, 0, 1)[None, :, None].float() / 127.5 - 1
        assert torch.allclose(s.state.stream.motion_latents, vae.encode(video.repeat(1, 1, 73, 1, 1)), atol=1e-5)
    assert not torch.allclose(motion[:, :, -1:], ref, atol=1e-3)
    big = np.repeat(np.repeat(FACE, 3, 0), 5, 1)  # any size: cover-resize + centre crop to 64x64
    with engine.open(big) as s:
        assert s.state.stream.ref_latent.shape == (1, 16, 1, 8, 8)


def test_resampled_24khz_chunking_is_bitwise_invariant(engine):
    audio = _audio(36000, seed=2, sr=24000)  # 1.5 s
    rng = np.random.default_rng(5)
    cuts = [[0, len(audio)], list(range(0, len(audio), 480)) + [len(audio)],
            [0, *sorted(rng.choice(np.arange(1, len(audio)), 25, replace=False)), len(audio)]]
    runs = []
    for c in cuts:
        with engine.open(FACE) as s:
            runs.append([b for a, z in itertools.pairwise(c) for b in s.step(audio[a:z], 24000, resample=True)]
                        + s.flush())
    assert len(runs[0]) >= 3 and all(_same(runs[0], other) for other in runs[1:])
    with engine.open(FACE) as s:
        with pytest.raises(AudioInputError, match="resample"):
            s.step(audio, 24000)  # another rate without resample=True is an error
        s.step(audio[:100], 24000, resample=True)
        with pytest.raises(ValueError, match="changed mid-stream"):
            s.step(audio[:100], 22050, resample=True)


@pytest.mark.parametrize("bad, rate, resample, match", [
    (np.zeros((2, 800), np.float32), SR, False, "1-D"), (np.full(800, np.nan, np.float32), SR, False, "NaN"),
    (np.full(800, 2.0, np.float32), 24000, True, r"\[-1, 1\]"), (np.full(800, 2.0, np.float32), SR, False, r"\[-1, 1\]"),
    (np.zeros(800), SR, False, "dtype"), (np.zeros(800, np.float32), 44100, False, "resampl"),
    ([0.0] * 800, SR, False, "numpy")])
def test_bad_audio_changes_nothing(engine, bad, rate, resample, match):
    x = _audio(2 * HOP, seed=4)
    with engine.open(FACE) as a, engine.open(FACE) as b:
        a.step(x[:9000], SR)
        b.step(x[:9000], SR)
        with pytest.raises(AudioInputError, match=match):
            a.step(bad, rate, resample=resample)
        assert a.state.resampler is None and a.pending_samples == b.pending_samples
        assert _same(a.step(x[9000:], SR) + a.flush(), b.step(x[9000:], SR) + b.flush())


@pytest.mark.parametrize("image, prompt, match", [
    (np.zeros((64, 64, 2), np.uint8), None, "image"), (np.zeros((64, 64, 3)), None, "uint8"),
    (None, None, "reference image"),
    (FACE, torch.zeros(3, 5), "prompt_embeds"),
    (FACE, torch.full((2, 32), float("nan")), "finite")])
def test_bad_open_changes_nothing(engine, image, prompt, match):
    x = _audio(2 * HOP + 6000, seed=8)
    with engine.open(FACE) as a:
        first = a.step(x[:HOP + 4000], SR)
        with pytest.raises((ValueError, TypeError), match=match):
            engine.open(image, prompt_embeds=prompt, seed=1)
        assert engine.num_sessions == 1
        out = a.step(x[HOP + 4000:], SR)
    with engine.open(FACE) as b:
        want = b.step(x, SR)
    assert first and _same(first + out, want)
    with pytest.raises(ValueError, match="prompt_embeds"):
        engine.open(FACE, prompt="a text prompt")  # no text encoder in family 2: embeddings only


def test_prompt_embeds_matter_and_default_to_zeros(engine):
    x = _audio(HOP + 4000)
    runs = []
    for embeds in (None, torch.zeros(1, 32), torch.randn(4, 32, generator=torch.Generator().manual_seed(0))):
        with engine.open(FACE, prompt_embeds=embeds) as s:
            runs.append(s.step(x, SR))
    assert _same(runs[0], runs[1]) and not np.array_equal(runs[2][0].frames, runs[0][0].frames)


def test_interrupt_drops_pending_audio_and_the_next_speech_drives_the_next_block(engine):
    x, speech = _audio(2 * HOP + 3000, seed=1), _audio(2 * HOP, seed=9)
    with engine.open(FACE) as s:
        done = s.step(x, SR)
        pending = s.pending_samples
        assert pending == len(x) - HOP * len(done) > 0
        assert s.interrupt() == pending and s.pending_samples == 0 and s.next_block == len(done)
        nxt = s.step(speech, SR)
        assert nxt[0].index == len(done) and np.array_equal(nxt[0].audio, speech[:HOP])
        assert s.interrupt() == len(speech) - HOP  # what block 1 of the speech would have used


def test_idle_and_end_segment(engine):
    """idle(n): n blocks of silence; the core keeps the lookahead's silence queued (the next speech
    follows it). end_segment(): the queued silence past the last block is dropped, so the next speech
    starts at a block boundary."""
    lookahead = engine.family.timeline.lookahead_frames * 640
    with engine.open(FACE) as s:
        idle = s.idle(2)
        assert [b.index for b in idle] == [0, 1] and all(not b.audio.any() for b in idle)
        assert s.pending_samples == lookahead
        speech = _audio(HOP + 2000, seed=3)
        blocks = s.step(speech, SR) + s.end_segment()
        heard = np.concatenate([np.zeros(lookahead, np.float32), speech])
        assert [b.index for b in blocks] == [2, 3] and s.pending_samples == 0
        assert np.array_equal(np.concatenate([b.audio for b in blocks])[:len(heard)], heard)
        longer = _audio(HOP + 6000, seed=4)
        after = s.step(longer, SR)
        assert after[0].index == 4 and np.array_equal(after[0].audio, longer[:HOP])
        assert s.pending_samples > 0 and s.idle(1)[0].index == 5  # queued speech first: it drives the idle block
        assert s.step(np.zeros(0, np.float32), SR) == []  # an empty chunk is a no-op
        with pytest.raises(ValueError, match=">= 1"):
            s.idle(0)


def test_fp8_engine_is_deterministic_and_close_to_fp32(engine):
    x = _audio(2 * HOP + 4000, seed=6)
    runs = []
    for q in ("fp8", "fp8"):
        with Engine.from_pretrained("liveavatar-tiny", device="cpu", dtype=torch.float32, mode="eager",
                                    quantize=q) as e, e.open(FACE) as s:
            runs.append(s.step(x, SR))
    with engine.open(FACE) as s:
        ref = s.step(x, SR)
    a, b = runs
    assert _same(a, b) and len(a) == len(ref) == 2
    for p, q in zip(a, ref):
        diff = np.abs(p.frames.astype(float) - q.frames.astype(float)).mean()
        assert 0 < diff < 8, diff
