"""Audio front end: wav2vec2 recipe, streaming window, ring buffer bounds, input validation."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from transformers import Wav2Vec2Model

from runtime.audio import (
    AudioBufferFull,
    AudioEncoder,
    AudioInputError,
    AudioStream,
    Resampler,
    check_chunk,
    resample,
)
from runtime.audio.encoder import wav2vec2_config
from runtime.config import EngineConfig

ENGINE = EngineConfig.from_preset("tiny")
CFG = ENGINE.audio
FPS = ENGINE.fps
SPF = ENGINE.samples_per_video_frame
LEFT, AHEAD = CFG.window_frames(FPS)
MAX_SPAN = ENGINE.video_frames_in_block(1)


@pytest.fixture(scope="module")
def encoder() -> AudioEncoder:
    return AudioEncoder.from_config(CFG, seed=0)


def _speechlike(n: int, seed: int) -> np.ndarray:
    """Noise with a slow envelope and a DC offset, peak well inside [-1, 1]."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / CFG.sample_rate
    env = 0.5 + 0.4 * np.sin(2 * np.pi * 1.3 * t + rng.uniform(0, 6))
    return (0.2 * env * rng.standard_normal(n) + 0.05).clip(-1, 1).astype(np.float32)


def _ref_normalize(x: np.ndarray) -> np.ndarray:
    # Wav2Vec2FeatureExtractor.zero_mean_unit_var_norm, in float64 for an independent check.
    x = x.astype(np.float64)
    return ((x - x.mean()) / np.sqrt(x.var() + 1e-7)).astype(np.float32)


def _block_ranges(count: int) -> list[tuple[int, int]]:
    out = []
    for b in range(count):
        v0 = ENGINE.first_video_frame(b)
        out.append((v0, v0 + ENGINE.video_frames_in_block(b)))
    return out


# ---- encoder recipe -----------------------------------------------------------------------------

def test_features_equal_hf_hidden_states_concat(encoder):
    """With one output frame per CNN frame the interpolation is the identity, so the features must be
    HF's own [last_hidden_state, *hidden_states] on the normalised waveform. The 3000 leading
    samples are padding: out of the statistics and exactly zero, as upstream's padding."""
    wave = np.concatenate([np.zeros(3000, np.float32), _speechlike(13000, seed=1)])
    x = torch.from_numpy(np.concatenate([wave[:3000], _ref_normalize(wave[3000:])]))[None]
    with torch.no_grad():
        out = encoder.model(x, output_hidden_states=True)
        ref = torch.cat([out.last_hidden_state, *out.hidden_states], dim=-1)
        got = encoder(torch.from_numpy(wave)[None], out.extract_features.shape[1], pad_before=3000)
    assert len(out.hidden_states) == CFG.num_layers + 1
    assert got.shape == (1, out.extract_features.shape[1], CFG.feature_dim)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def _interp_align_corners(feats: np.ndarray, n: int) -> np.ndarray:
    """Independent linear interpolation along axis 0, endpoints mapped onto endpoints."""
    t = feats.shape[0]
    pos = np.arange(n) * (t - 1) / (n - 1)
    lo = np.floor(pos).astype(int).clip(0, t - 1)
    hi = np.minimum(lo + 1, t - 1)
    w = (pos - lo)[:, None]
    return feats[lo] * (1 - w) + feats[hi] * w


def test_interpolation_happens_before_projection_and_transformer(encoder):
    model = encoder.model
    wave = _speechlike(29 * SPF, seed=2)
    frames = 29
    captured = []
    # HF's encoder, observed from outside: the first layer's input, then every layer's output.
    def first_input(module, args, kwargs):
        captured.append(args[0] if args else kwargs["hidden_states"])

    hooks = [model.encoder.layers[0].register_forward_pre_hook(first_input, with_kwargs=True)]
    layers = model.encoder.layers
    hooks += [layer.register_forward_hook(lambda m, a, o: captured.append(o)) for layer in layers]
    try:
        with torch.no_grad():
            cnn = model.feature_extractor(torch.from_numpy(_ref_normalize(wave))[None])[0].T.numpy()
            lerped = _interp_align_corners(cnn.astype(np.float64), frames).astype(np.float32)
            lerped = torch.from_numpy(lerped)
            hidden, _ = model.feature_projection(lerped[None])
            model.encoder(hidden)
    finally:
        for h in hooks:
            h.remove()
    states = [s if isinstance(s, torch.Tensor) else s[0] for s in captured]
    ref = torch.cat([states[-1], *states], dim=-1)
    with torch.no_grad():
        got = encoder(torch.from_numpy(wave)[None], frames)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_batch_rows_match_single_rows_and_do_not_leak(encoder):
    waves = torch.from_numpy(np.stack([_speechlike(20 * SPF, seed=s) for s in (3, 4, 5)]))
    pads = torch.tensor([0, 1000, 7000])
    with torch.no_grad():
        batched = encoder(waves, 20, pad_before=pads)
        for i in range(3):
            alone = encoder(waves[i:i + 1], 20, pad_before=int(pads[i]))
            # Exact equality across batch sizes is not promised by the CPU conv/GEMM kernels.
            torch.testing.assert_close(batched[i:i + 1], alone, rtol=1e-5, atol=1e-5)
        other = waves.clone()
        other[1:] = torch.from_numpy(np.stack([_speechlike(20 * SPF, seed=s) for s in (6, 7)]))
        assert torch.equal(encoder(other, 20, pad_before=pads)[0], batched[0])
        assert not torch.allclose(batched[0], batched[1])


def test_normalisation_skips_leading_padding(encoder):
    from runtime.audio.encoder import normalize_waveform
    wave = _speechlike(5000, seed=8)
    padded = np.concatenate([np.zeros(3000, np.float32), wave])
    got = normalize_waveform(torch.from_numpy(padded)[None], 3000)[0].numpy()
    assert np.all(got[:3000] == 0)
    np.testing.assert_allclose(got[3000:], _ref_normalize(wave), rtol=1e-4, atol=1e-5)


# ---- streaming window ---------------------------------------------------------------------------

def _stream(encoder, max_chunk_samples=None) -> AudioStream:
    return AudioStream(CFG, FPS, encoder, "cpu", torch.float32, MAX_SPAN, max_chunk_samples=max_chunk_samples)


def _run_stream(encoder, audio: np.ndarray, chunks: list[int], blocks: int, max_chunk=None):
    """Engine-like loop: push a chunk, then take every block that became ready."""
    stream = _stream(encoder, max_chunk)
    feats, spans, b, pos = [], [], 0, 0
    ranges = _block_ranges(blocks)
    for n in chunks:
        stream.push(audio[pos:pos + n])
        pos += n
        while b < blocks and stream.ready(ranges[b][1]):
            v0, v1 = ranges[b]
            feats.append(stream.features(v0, v1))
            spans.append(stream.samples(v0 * SPF, v1 * SPF))
            b += 1
    assert pos == len(audio) and b == blocks
    return feats, spans


def test_features_do_not_depend_on_chunking(encoder):
    blocks = 4
    need = (_block_ranges(blocks)[-1][1] + AHEAD) * SPF
    audio = _speechlike(need + 1234, seed=9)
    rng = np.random.default_rng(10)
    random_sizes = []
    while sum(random_sizes) < len(audio):
        random_sizes.append(int(rng.integers(1, 3000)))
    random_sizes[-1] -= sum(random_sizes) - len(audio)
    ref_f, ref_s = _run_stream(encoder, audio, [len(audio)], blocks, max_chunk=len(audio))
    for sizes in ([320] * (len(audio) // 320) + [len(audio) % 320], random_sizes):
        feats, spans = _run_stream(encoder, audio, [s for s in sizes if s], blocks)
        for a, b in zip(feats, ref_f):
            assert torch.equal(a, b)
        for a, b in zip(spans, ref_s):
            np.testing.assert_array_equal(a, b)
    assert ref_f[0].shape == (1, 9, CFG.feature_dim) and ref_f[1].shape == (1, 12, CFG.feature_dim)


@pytest.mark.parametrize("block", [0, 1, 3])
def test_window_is_the_documented_sample_range(encoder, block):
    ranges = _block_ranges(block + 1)
    v0, v1 = ranges[block]
    audio = _speechlike((v1 + AHEAD) * SPF + 500, seed=11 + block)
    stream = _stream(encoder, max_chunk_samples=len(audio))
    stream.push(audio)
    got = stream.features(v0, v1)
    # Independent construction: L frames of history (zeros before time 0), the span, A frames ahead.
    start, stop = (v0 - LEFT) * SPF, (v1 + AHEAD) * SPF
    silence = max(0, -start)
    window = np.concatenate([np.zeros(silence, np.float32), audio[max(start, 0):stop]])
    assert len(window) == (LEFT + (v1 - v0) + AHEAD) * SPF
    with torch.no_grad():
        ref = encoder(torch.from_numpy(window)[None], LEFT + (v1 - v0) + AHEAD, pad_before=silence)
    assert torch.equal(got, ref[:, LEFT:LEFT + (v1 - v0)])
    assert got.dtype == torch.float32 and got.device.type == "cpu"


def test_features_come_in_the_configured_dtype(encoder):
    audio = _speechlike((9 + AHEAD) * SPF, seed=17)
    ref_stream = _stream(encoder)
    half_stream = AudioStream(CFG, FPS, encoder, "cpu", torch.bfloat16, MAX_SPAN)
    ref_stream.push(audio)
    half_stream.push(audio)
    ref, half = ref_stream.features(0, 9), half_stream.features(0, 9)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), ref, rtol=1e-2, atol=1e-2)


def test_ready_and_feature_errors(encoder):
    stream = _stream(encoder)
    v1 = ENGINE.video_frames_in_block(0)
    stream.push(np.zeros((v1 + AHEAD) * SPF - 1, np.float32))
    assert not stream.ready(v1)
    with pytest.raises(ValueError, match="not there yet"):
        stream.features(0, v1)
    stream.pad_silence(1)
    assert stream.ready(v1)
    stream.features(0, v1)
    with pytest.raises(ValueError, match="v1 - v0 <="):
        stream.features(0, MAX_SPAN + 1)
    with pytest.raises(ValueError, match="v0 < v1"):
        stream.features(3, 3)


def test_released_audio_is_refused(encoder):
    stream = _stream(encoder, max_chunk_samples=200_000)
    stream.push(_speechlike(100_000, seed=12))
    stream.features(60, 72)  # releases everything before (72 - LEFT) frames
    with pytest.raises(ValueError, match="already released"):
        stream.samples(0, SPF)
    with pytest.raises(ValueError, match="already released"):
        stream.features(0, 9)
    assert stream.samples(60 * SPF, 72 * SPF).shape == (12 * SPF,)


def test_overflow_raises_instead_of_dropping(encoder):
    stream = _stream(encoder)
    stream.push(np.zeros(stream.free_samples, np.float32))
    with pytest.raises(AudioBufferFull, match="overflow"):
        stream.push(np.zeros(1, np.float32))
    with pytest.raises(TypeError, match="float32"):
        stream.push(np.zeros(4, np.float64))


def test_samples_are_copies_and_reset_restarts(encoder):
    stream = _stream(encoder)
    audio = _speechlike(5000, seed=13)
    stream.push(audio)
    got = stream.samples(1000, 3000)
    got[:] = 0
    np.testing.assert_array_equal(stream.samples(1000, 3000), audio[1000:3000])
    stream.reset()
    assert stream.total_samples == 0 and not stream.ready(1)


def test_ten_minute_stream_keeps_memory_constant(encoder):
    stream = _stream(encoder)
    nbytes, capacity = stream.nbytes, stream.capacity
    total = 10 * 60 * CFG.sample_rate
    chunk = 1600
    base = _speechlike(chunk * 7, seed=14)  # cheap synthetic source, rotated each push
    high_water, b, ranges_end = 0, 0, None
    pushed = 0
    while pushed < total:
        stream.push(np.roll(base, pushed % 997)[:chunk])
        pushed += chunk
        high_water = max(high_water, stream.buffered_samples)
        while True:
            v0 = ENGINE.first_video_frame(b)
            v1 = v0 + ENGINE.video_frames_in_block(b)
            if not stream.ready(v1):
                break
            if b % 50 == 0:  # the encoder cost is not what is under test; trimming is
                stream.features(v0, v1)
            else:
                stream.drop_before(min(v0 * SPF, (v1 - LEFT) * SPF))
            stream.samples(v0 * SPF, v1 * SPF)
            b, ranges_end = b + 1, v1
    assert stream.total_samples == total
    assert ranges_end * SPF > total - (MAX_SPAN + AHEAD) * SPF  # kept up with the stream
    assert stream.nbytes == nbytes and stream.capacity == capacity
    assert high_water <= capacity
    assert high_water <= (LEFT + MAX_SPAN + AHEAD) * SPF + chunk


def test_window_frames_validation():
    assert CFG.window_frames(16) == (16, 4)
    with pytest.raises(ValueError, match="lookahead_s \\* fps"):
        dataclasses.replace(CFG, lookahead_s=0.25).window_frames(25)
    with pytest.raises(ValueError, match="left_context_s \\* fps"):
        dataclasses.replace(CFG, left_context_s=0.1).window_frames(16)
    assert dataclasses.replace(CFG, left_context_s=0.1, lookahead_s=0.2).window_frames(30) == (3, 6)


# ---- from_pretrained ----------------------------------------------------------------------------

def test_from_pretrained_round_trip(tmp_path, encoder):
    encoder.model.save_pretrained(tmp_path)
    loaded = AudioEncoder.from_pretrained(tmp_path, CFG)
    wave = torch.from_numpy(_speechlike(15 * SPF, seed=15))[None]
    with torch.no_grad():
        assert torch.equal(loaded(wave, 15), encoder(wave, 15))
    assert loaded.normalize is True
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"do_normalize": False}))
    assert AudioEncoder.from_pretrained(tmp_path, CFG).normalize is False


def test_from_pretrained_rejects_mismatch_and_missing(tmp_path, encoder):
    encoder.model.save_pretrained(tmp_path)
    wider = dataclasses.replace(CFG, hidden_size=64, num_heads=2)
    with pytest.raises(ValueError, match="hidden_size: directory has 32, AudioConfig expects 64"):
        AudioEncoder.from_pretrained(tmp_path, wider)
    deeper = dataclasses.replace(CFG, num_layers=3)
    with pytest.raises(ValueError, match="num_hidden_layers"):
        AudioEncoder.from_pretrained(tmp_path, deeper)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        AudioEncoder.from_pretrained(tmp_path / "nowhere", CFG)


def test_from_pretrained_rejects_missing_weights(tmp_path):
    from safetensors.torch import load_file, save_file
    model = Wav2Vec2Model(wav2vec2_config(CFG))
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    dropped = next(k for k in weights if "encoder.layers.1" in k)
    del weights[dropped]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lacks weights"):
        AudioEncoder.from_pretrained(tmp_path, CFG)


def test_from_config_is_seeded_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a, b = AudioEncoder.from_config(CFG, seed=3), AudioEncoder.from_config(CFG, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    c = AudioEncoder.from_config(CFG, seed=4)
    weight = lambda enc: enc.model.feature_projection.projection.weight
    assert not torch.equal(weight(a), weight(c))


# ---- validation ---------------------------------------------------------------------------------

RATE = CFG.sample_rate


def test_int16_is_scaled_and_input_untouched():
    pcm = np.array([0, 16384, -32768, 32767, -1], dtype=np.int16)
    before = pcm.copy()
    out = check_chunk(pcm, RATE, RATE)
    assert out.dtype == np.float32 and out.ndim == 1
    np.testing.assert_array_equal(out, pcm.astype(np.float64) / 32768.0)
    np.testing.assert_array_equal(pcm, before)


def test_float32_is_copied_not_aliased():
    x = np.linspace(-1, 1, 101, dtype=np.float32)
    before = x.copy()
    out = check_chunk(x, RATE, RATE)
    np.testing.assert_array_equal(out, x)
    out[:] = 0.5
    np.testing.assert_array_equal(x, before)


@pytest.mark.parametrize("dtype", [np.int16, np.float32])
def test_empty_chunk_is_empty(dtype):
    out = check_chunk(np.zeros(0, dtype), RATE, RATE)
    assert out.shape == (0,) and out.dtype == np.float32


@pytest.mark.parametrize("chunk, rate, match", [
    (np.zeros(10, np.float32), 24000, "24000 Hz.*expects 16000 Hz.*resampling is not done implicitly"),
    (np.array([0.0, np.nan], np.float32), RATE, "NaN or Inf"),
    (np.array([0.0, np.inf], np.float32), RATE, "NaN or Inf"),
    (np.array([0.5, -1.25], np.float32), RATE, r"\[-1, 1\], sample 1 is -1.25"),
    (np.zeros((100, 2), np.float32), RATE, r"shape \(100, 2\)"),
    (np.zeros((1, 100), np.int16), RATE, r"shape \(1, 100\)"),
    (np.zeros(10, np.float64), RATE, "unsupported audio dtype float64"),
    (np.zeros(10, np.int32), RATE, "unsupported audio dtype int32"),
    ([0.0, 0.1], RATE, "numpy array, got list"),
    (b"\x00\x01", RATE, "np.frombuffer"),
])
def test_bad_input_is_named(chunk, rate, match):
    snapshot = chunk.copy() if isinstance(chunk, np.ndarray) else None
    with pytest.raises(AudioInputError, match=match):
        check_chunk(chunk, rate, RATE)
    if snapshot is not None:
        np.testing.assert_array_equal(chunk, snapshot)
    assert issubclass(AudioInputError, ValueError)


def _tone(freq: float, rate: int, seconds: float) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (0.9 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _peak_hz(x: np.ndarray, rate: int) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spec) * rate / len(x))


def test_resample_keeps_pitch_and_range():
    y = resample(_tone(440.0, 24000, 1.0), 24000, RATE)
    assert y.dtype == np.float32 and abs(len(y) - RATE) <= 1
    assert abs(_peak_hz(y, RATE) - 440.0) < 2.0
    assert np.abs(y).max() <= 1.0
    check_chunk(y, RATE, RATE)
    with pytest.raises(AudioInputError, match="positive"):
        resample(y, 0, RATE)


def test_streaming_resampler_is_chunking_invariant():
    x = _tone(300.0, 24000, 0.5)
    whole = Resampler(24000, RATE)
    ref = np.concatenate([whole(x), whole.flush()])
    rng = np.random.default_rng(16)
    cuts = np.sort(rng.choice(np.arange(1, len(x)), size=12, replace=False))
    pieces = Resampler(24000, RATE)
    got = np.concatenate([pieces(p) for p in np.split(x, cuts)] + [pieces.flush()])
    np.testing.assert_allclose(got, ref, atol=1e-6)
    assert abs(len(got) - len(x) * 2 // 3) <= 2
