"""Family 2's audio front end and block API: PCM chunks in, latent blocks out.

Bitwise chunking invariance (whole audio vs 20 ms chunks vs random chunks), clear errors that leave
the state unchanged, upstream's frame alignment (round(i * 30 / 25) rows of a 30 Hz grid over the
50 Hz wav2vec2 frames), bounded memory for any chunk size, flush. Tiny random wav2vec2 and DiT.
"""
import itertools

import numpy as np
import pytest
import torch

from runtime.audio.validate import AudioInputError
from runtime.liveavatar import LiveAvatarStream, StreamSettings, build_liveavatar, randomize_weights
from runtime.liveavatar.audio_front import (
    HOP,
    FrontEndSettings,
    Wav2VecFrontEnd,
    row_30hz,
    tiny_wav2vec2,
)
from runtime.liveavatar.engine import LiveAvatarEngine
from tests.test_liveavatar_forward import TINY

SR = 16000


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    return randomize_weights(build_liveavatar(TINY, dtype=torch.float32), seed=0)


@pytest.fixture(scope="module")
def w2v():
    return tiny_wav2vec2(TINY.audio_layers, TINY.audio_dim, seed=0)


def _engine(model, w2v, seed=0):
    g = torch.Generator().manual_seed(11)
    stream = LiveAvatarStream(model, torch.randn(1, 16, 1, 8, 8, generator=g), torch.randn(1, 16, 19, 8, 8, generator=g),
                              torch.randn(1, 5, TINY.text_dim, generator=g), StreamSettings(seed=seed))
    return LiveAvatarEngine(stream, Wav2VecFrontEnd(w2v))


def _audio(n=32000, seed=0):
    t = np.arange(n) / SR
    rng = np.random.default_rng(seed)
    return (0.3 * np.sin(2 * np.pi * 220 * t * (1 + t)) + 0.05 * rng.standard_normal(n)).astype(np.float32)


def _run(engine, audio, cuts):
    out = []
    for a, b in itertools.pairwise(cuts):
        out += engine.step(audio[a:b], SR)
    return out + engine.flush()


def test_chunking_is_bitwise_invariant(model, w2v):
    audio = _audio()
    n = len(audio)
    rng = np.random.default_rng(3)
    random_cuts = [0, *sorted(rng.choice(np.arange(1, n), size=40, replace=False)), n]
    runs = [_run(_engine(model, w2v), audio, cuts) for cuts in
            ([0, n], list(range(0, n, 320)) + [n], random_cuts)]
    assert len(runs[0]) == 5  # 2 s = 50 video frames -> 5 blocks of 12 (the last padded by flush)
    for other in runs[1:]:
        assert [b.audio_span for b in other] == [b.audio_span for b in runs[0]]
        assert all(torch.equal(a.latents, b.latents) for a, b in zip(runs[0], other))
    # and the audio matters (a louder copy would not: the waveform is normalised per window)
    other = _run(_engine(model, w2v), audio[::-1].copy(), [0, n])
    assert not torch.allclose(other[1].latents, runs[0][1].latents, atol=1e-3)


def test_blocks_come_when_their_window_is_complete(model, w2v):
    e = _engine(model, w2v)
    w0 = e.front.planner.window(0)
    assert w0.stop > 12 * 640  # the lookahead: block 0 needs audio past its own 0.48 s
    assert e.step(_audio(w0.stop - 1), SR) == []
    blocks = e.step(_audio(w0.stop)[w0.stop - 1:], SR)
    assert [b.index for b in blocks] == [0] and blocks[0].audio_span == (0, 12 * 640)


@pytest.mark.parametrize("bad, rate, match", [
    (np.zeros((2, 320), np.float32), SR, "1-D"),
    (np.zeros(320, np.float32), 44100, "resampl"),
    (np.full(320, np.nan, np.float32), SR, "NaN"),
    (np.full(320, 2.0, np.float32), SR, r"\[-1, 1\]"),
    (np.zeros(320, np.float64), SR, "dtype"),
    ([0.0] * 320, SR, "numpy"),
])
def test_bad_input_is_a_clear_error_and_changes_nothing(model, w2v, bad, rate, match):
    audio = _audio(20000)
    clean = _engine(model, w2v)
    want = clean.step(audio[:12000], SR) + clean.step(audio[12000:], SR)
    e = _engine(model, w2v)
    got = e.step(audio[:12000], SR)
    before = (e.ring.total, e.ring.floor, e.blocks, e.stream.blocks_done, e.ring.buf.copy())
    with pytest.raises(AudioInputError, match=match):
        e.step(bad, rate)
    assert (e.ring.total, e.ring.floor, e.blocks, e.stream.blocks_done) == before[:4]
    assert np.array_equal(e.ring.buf, before[4])
    got += e.step(audio[12000:], SR)
    assert len(got) == len(want) and all(torch.equal(a.latents, b.latents) for a, b in zip(got, want))


def test_int16_pcm_equals_scaled_float(model, w2v):
    pcm = (_audio(14000) * 32767).astype(np.int16)
    a = _engine(model, w2v).step(pcm, SR)
    b = _engine(model, w2v).step(pcm.astype(np.float32) / 32768, SR)
    assert len(a) == 1 and torch.equal(a[0].latents, b[0].latents)


def test_30hz_rows_match_upstream_get_sample_indices():
    n = 5000  # upstream: time_points = linspace(0, n / 25, n, endpoint=False); round(t * 30)
    upstream = np.round(np.linspace(0, n / 25, n, endpoint=False) * 30).astype(int)
    assert [row_30hz(i) for i in range(n)] == upstream.tolist()


def test_features_interpolate_the_window_hidden_states(w2v):
    fe = Wav2VecFrontEnd(w2v, FrontEndSettings(normalize=False))
    block = 3
    w = fe.planner.window(block)
    samples = _audio(w.stop)[w.start:w.stop]
    feats = fe.features(w, samples)
    assert feats.shape == (1, TINY.audio_layers, TINY.audio_dim, 12)
    states = torch.stack(w2v(torch.from_numpy(samples)[None], output_hidden_states=True).hidden_states, 1)[0]
    t50 = w.start / HOP + np.arange(states.shape[1])  # absolute 50 Hz frame of each window row
    for i, v in enumerate(range(36, 48)):
        pos = row_30hz(v) * 5 / 3  # 30 Hz row on the 50 Hz axis (align_corners' long-clip limit)
        want = np.array([[np.interp(pos, t50, states[layer, :, c].numpy()) for c in range(TINY.audio_dim)]
                         for layer in range(TINY.audio_layers)])
        assert np.allclose(feats[0, :, :, i].numpy(), want, atol=1e-5)


def test_memory_is_bounded_for_any_chunk(model, w2v):
    e = _engine(model, w2v)
    cap = len(e.ring.buf)
    blocks = e.step(_audio(5 * SR), SR)  # one 5 s chunk: many times the ring
    assert cap < 3 * SR  # smaller than the chunk: it was taken in pieces
    assert len(blocks) >= 9 and len(e.ring.buf) == cap and e.ring.total - e.ring.floor <= cap


def test_front_end_must_match_the_stream(model, w2v):
    stream = _engine(model, w2v).stream
    with pytest.raises(ValueError, match="video frames"):
        LiveAvatarEngine(stream, Wav2VecFrontEnd(w2v, FrontEndSettings(block_video_frames=8)))


def test_engine_equals_windows_cut_from_the_whole_audio(model, w2v):
    """Oracle for the ring: each block = front end on the padded whole-audio slice, then the stream."""
    audio = _audio(26000, seed=4)
    got = _run(_engine(model, w2v), audio, list(range(0, len(audio), 777)) + [len(audio)])
    ref = _engine(model, w2v)
    padded = np.concatenate([np.zeros(SR, np.float32), audio, np.zeros(SR, np.float32)])
    for b, blk in enumerate(got):
        w = ref.front.planner.window(b)
        feats = ref.front.features(w, padded[w.start + SR:w.stop + SR])
        assert torch.equal(blk.latents, ref.stream.generate_block(feats)), f"block {b}"


def test_first_window_normalises_only_audio_after_time_zero(w2v):
    """The processor's zero-mean / unit-variance over real samples; the zeros before time 0 stay 0."""
    w = Wav2VecFrontEnd(w2v).planner.window(0)
    assert w.start < 0
    samples = np.concatenate([np.zeros(-w.start, np.float32), _audio(w.stop, seed=2)])
    real = samples[-w.start:].astype(np.float64)
    manual = samples.copy()
    manual[-w.start:] = (real - real.mean()) / np.sqrt(real.var() + 1e-7)
    got = Wav2VecFrontEnd(w2v).features(w, samples)
    want = Wav2VecFrontEnd(w2v, FrontEndSettings(normalize=False)).features(w, manual)
    assert torch.allclose(got, want, atol=1e-4)


def test_decoded_frames_equal_the_offline_vae_decode(model, w2v):
    """End to end with a tiny Wan2.1 VAE (z 16): 3 lead frames (the reference latent decoded) + 9 decoded
    frames for the first block, 12 after, equal to decoding all latents of the stream at once (upstream's
    whole-clip decode), as uint8; the last block trimmed by flush to the input's frames."""
    from runtime.config import VAEConfig
    from runtime.models.streaming import StreamingDecoder
    from runtime.models.vae import WanVAE

    vae = WanVAE(VAEConfig(z_dim=16, base_dim=4, dim_mult=(1, 1, 1, 1), num_res_blocks=1))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in vae.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() > 1 else 0.05))
    stream = _engine(model, w2v).stream
    e = LiveAvatarEngine(stream, Wav2VecFrontEnd(w2v), StreamingDecoder(vae.eval()))
    blocks = _run(e, _audio(20000), [0, 20000])
    assert [b.frames.shape[0] for b in blocks] == [12, 12, 8]  # 20000 samples = 31.25 -> 32 frames
    assert all(b.frames.dtype == np.uint8 and b.frames.shape[1:] == (64, 64, 3) for b in blocks)
    def uint8(video):
        return ((video[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()

    whole = uint8(vae.decode_offline(torch.cat([b.latents for b in blocks], dim=2)))
    still = uint8(vae.decode_offline(stream.ref_latent))  # the reference frame, held for the lead frames
    want = np.concatenate([np.repeat(still, 3, 0), whole[:9 + 12 + 8]])
    got = np.concatenate([b.frames for b in blocks])
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1  # fp32 rounding may flip a .5 boundary
    assert got.astype(float).std() > 5  # not a constant image


def test_reset_starts_the_same_stream_again(model, w2v):
    audio = _audio(30000, seed=6)
    e = _engine(model, w2v)
    first = e.step(audio, SR) + e.end_segment()  # 4 blocks; the adaptive sink re-fills the condition
    e.step(_audio(20000, seed=7), SR)  # more blocks: the rings wrap
    e.flush()
    with pytest.raises(RuntimeError, match="flushed"):
        e.step(audio, SR)  # flush ended the stream, as family 1's
    e.reset()
    again = _run(e, audio, [0, 30000])
    assert len(again) == len(first) and all(torch.equal(a.latents, b.latents) for a, b in zip(first, again))
