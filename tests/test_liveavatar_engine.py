"""Family 2 through the one engine: audio front end, block timeline, oracle. liveavatar-tiny, CPU, fp32.

Bitwise chunking invariance (whole audio vs 20 ms chunks vs random chunks), upstream's frame alignment
(round(i * 30 / 25) rows of a 30 Hz grid over the 50 Hz wav2vec2 frames), bounded memory for any chunk
size, and an oracle that keeps no ring: each block = the front end on the padded whole audio's window,
then `LiveAvatarStream`, then the streaming decode; frames equal the whole-stream offline VAE decode.
"""
import itertools

import numpy as np
import pytest
import torch

from runtime.engine import Engine
from runtime.families.liveavatar import LiveAvatar, LiveAvatarStream
from runtime.families.liveavatar.audio_front import HOP, FrontEndSettings, Wav2VecFrontEnd, row_30hz
from runtime.families.liveavatar.build import FamilyParts
from runtime.media import synthetic_face
from runtime.models.streaming import StreamingDecoder
from tests.test_liveavatar_forward import _one_thread  # noqa: F401 - autouse: one torch thread

SR = 16000
FACE = synthetic_face(64, 64)



@pytest.fixture(scope="module")
def engine():
    with Engine.from_pretrained("liveavatar-tiny", device="cpu", dtype=torch.float32, mode="eager") as e:
        yield e


def _audio(n=32000, seed=0):
    t = np.arange(n) / SR
    rng = np.random.default_rng(seed)
    return (0.3 * np.sin(2 * np.pi * 220 * t * (1 + t)) + 0.05 * rng.standard_normal(n)).astype(np.float32)


def _run(engine, audio, cuts, seed=0):
    with engine.open(FACE, seed=seed) as s:
        return [b for a, z in itertools.pairwise(cuts) for b in s.step(audio[a:z], SR)] + s.flush()


def _same(a, b) -> bool:
    return len(a) == len(b) and all(p.index == q.index and np.array_equal(p.frames, q.frames)
                                    and np.array_equal(p.audio, q.audio) for p, q in zip(a, b))


def test_chunking_is_bitwise_invariant(engine):
    audio = _audio()
    n = len(audio)
    rng = np.random.default_rng(3)
    random_cuts = [0, *sorted(rng.choice(np.arange(1, n), size=40, replace=False)), n]
    runs = [_run(engine, audio, cuts) for cuts in ([0, n], list(range(0, n, 320)) + [n], random_cuts)]
    assert len(runs[0]) == 5  # 2 s = 50 video frames -> 5 blocks of 12 (the last one cut to 2 by flush)
    assert all(_same(runs[0], other) for other in runs[1:])
    other = _run(engine, audio[::-1].copy(), [0, n])  # and the audio matters
    assert np.abs(other[1].frames.astype(int) - runs[0][1].frames.astype(int)).max() > 2


def test_blocks_come_when_their_window_is_complete(engine):
    t, planner = engine.family.timeline, engine.family.front.planner
    need = t.samples_to_run(0)
    assert need >= planner.window(0).stop > 12 * 640  # the lookahead: block 0 needs audio past its 0.48 s
    assert need - planner.window(0).stop < 640  # the front end's reach, rounded up to one whole frame
    audio = _audio(need)
    with engine.open(FACE) as s:
        assert s.step(audio[:-1], SR) == []
        blocks = s.step(audio[-1:], SR)
    assert [b.index for b in blocks] == [0] and np.array_equal(blocks[0].audio, audio[:12 * 640])


def test_int16_pcm_equals_scaled_float(engine):
    pcm = (_audio(14000) * 32767).astype(np.int16)
    assert _same(_run(engine, pcm, [0, len(pcm)]), _run(engine, pcm.astype(np.float32) / 32768, [0, len(pcm)]))


def test_30hz_rows_match_upstream_get_sample_indices():
    n = 5000  # upstream: time_points = linspace(0, n / 25, n, endpoint=False); round(t * 30)
    upstream = np.round(np.linspace(0, n / 25, n, endpoint=False) * 30).astype(int)
    assert [row_30hz(i) for i in range(n)] == upstream.tolist()


def test_features_interpolate_the_window_hidden_states(engine):
    w2v = engine.family.front.model
    fe = Wav2VecFrontEnd(w2v, FrontEndSettings(normalize=False))
    w = fe.planner.window(3)
    samples = _audio(w.stop)[w.start:w.stop]
    feats = fe.features(w, samples)
    layers, width = engine.family.model.cfg.audio_layers, engine.family.model.cfg.audio_dim
    assert feats.shape == (1, layers, width, 12)
    states = torch.stack(w2v(torch.from_numpy(samples)[None], output_hidden_states=True).hidden_states, 1)[0]
    t50 = w.start / HOP + np.arange(states.shape[1])  # absolute 50 Hz frame of each window row
    for i, v in enumerate(range(36, 48)):
        pos = row_30hz(v) * 5 / 3  # 30 Hz row on the 50 Hz axis (align_corners' long-clip limit)
        want = np.array([[np.interp(pos, t50, states[layer, :, c].numpy()) for c in range(width)]
                         for layer in range(layers)])
        assert np.allclose(feats[0, :, :, i].numpy(), want, atol=1e-5)


def test_first_window_normalises_only_audio_after_time_zero(engine):
    """The processor's zero-mean / unit-variance over real samples; the zeros before time 0 stay 0."""
    w2v = engine.family.front.model
    w = Wav2VecFrontEnd(w2v).planner.window(0)
    assert w.start < 0
    samples = np.concatenate([np.zeros(-w.start, np.float32), _audio(w.stop, seed=2)])
    real = samples[-w.start:].astype(np.float64)
    manual = samples.copy()
    manual[-w.start:] = (real - real.mean()) / np.sqrt(real.var() + 1e-7)
    got = Wav2VecFrontEnd(w2v).features(w, samples)
    want = Wav2VecFrontEnd(w2v, FrontEndSettings(normalize=False)).features(w, manual)
    assert torch.allclose(got, want, atol=1e-4)


def test_memory_is_bounded_for_any_chunk(engine):
    with engine.open(FACE) as s:
        ring = s.state.audio
        cap = ring.capacity
        blocks = s.step(_audio(5 * SR), SR)  # one 5 s chunk: many times the ring
        assert cap < 3 * SR and len(blocks) >= 9 and ring.capacity == cap and ring.buffered_samples <= cap


def test_front_end_must_match_the_trunk(engine):
    f = engine.family
    front = Wav2VecFrontEnd(f.front.model, FrontEndSettings(block_video_frames=8))
    with pytest.raises(ValueError, match="video frames"):
        LiveAvatar(FamilyParts(f.model, f.vae, front, 64, 64))


def _uint8(video: torch.Tensor) -> np.ndarray:
    return ((video[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()


def test_engine_equals_the_oracle_and_the_offline_decode(engine):
    """Oracle for the ring, the timeline and the decode: per block the front end on the padded whole
    audio's window, the stream, the streaming decode (lead frames first); the frames also equal the
    whole-stream offline decode (upstream's whole-clip decode) within 1 grey level."""
    audio, f = _audio(26000, seed=4), engine.family
    got = _run(engine, audio, list(range(0, len(audio), 777)) + [len(audio)], seed=7)
    ref, motion, embeds, settings = f.session_inputs(FACE, None, 7)
    stream, decoder = LiveAvatarStream(f.model, ref, motion, embeds, settings), StreamingDecoder(f.vae)
    padded = np.concatenate([audio, np.zeros(SR, np.float32)])  # the flush's silence
    latents = []
    for b, blk in enumerate(got):
        latents.append(stream.generate_block(f.block_features(padded, b)))
        frames = f.decode_block(decoder, b, latents[-1], ref)[:blk.frames.shape[0]]
        assert np.array_equal(blk.frames, frames), f"block {b}"
        assert np.array_equal(blk.audio, padded[12 * 640 * b:12 * 640 * b + len(blk.audio)])
    assert [b.frames.shape[0] for b in got] == [12, 12, 12, 5]  # 26000 samples = 40.6 -> 41 frames
    whole = _uint8(f.vae.decode_offline(torch.cat(latents, dim=2)))
    still = _uint8(f.vae.decode_offline(ref))  # the reference frame, held for the lead frames
    want = np.concatenate([np.repeat(still, f.lead_frames, 0), whole])[:41]
    out = np.concatenate([b.frames for b in got])
    assert np.abs(out.astype(int) - want.astype(int)).max() <= 1  # fp32 rounding may flip a .5 boundary
    assert out.astype(float).std() > 5  # not a constant image


def test_reset_starts_the_same_stream_again(engine):
    audio = _audio(30000, seed=6)
    engine.reset(FACE, seed=3)
    first = engine.step(audio, SR) + engine.end_segment()  # 4 blocks; the adaptive sink re-fills the condition
    engine.step(_audio(20000, seed=7), SR)  # more blocks: the rings wrap
    engine.flush()
    with pytest.raises(RuntimeError, match="flushed"):
        engine.step(audio, SR)  # flush ended the stream
    engine.reset(FACE, seed=3)
    again = engine.step(audio, SR) + engine.end_segment()
    engine.reset(FACE, seed=4)
    other = engine.step(audio, SR)
    engine._session = None
    assert _same(first, again) and not np.array_equal(other[0].frames, first[0].frames)
