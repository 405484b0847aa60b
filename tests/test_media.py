"""Media I/O: images, wav reading, synthetic speech, MP4 writing (decoded back with PyAV)."""
from __future__ import annotations

import wave
from fractions import Fraction

import av
import numpy as np
import pytest
from PIL import Image

from runtime.media import (
    MediaError,
    Mp4Writer,
    load_image,
    read_audio_file,
    read_wav,
    resize_cover_center_crop,
    synth_speech_like,
    synthetic_face,
    write_wav,
)

# ---- load_image ---------------------------------------------------------------------------------

def test_load_image_array_is_a_copy():
    img = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    out = load_image(img)
    assert out.dtype == np.uint8 and out.shape == (5, 7, 3)
    np.testing.assert_array_equal(out, img)
    out[0, 0] = 0 if img[0, 0, 0] else 1
    assert not np.array_equal(out, img)  # the caller's array is untouched


@pytest.mark.parametrize("shape", [(6, 4), (6, 4, 1)])
def test_load_image_grey_array_replicated(shape):
    grey = np.arange(24, dtype=np.uint8).reshape(shape)
    out = load_image(grey)
    assert out.shape == (6, 4, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[:, :, c], grey.reshape(6, 4))


def test_load_image_rgba_array_drops_alpha():
    rgba = np.random.default_rng(1).integers(0, 256, (4, 4, 4), dtype=np.uint8)
    np.testing.assert_array_equal(load_image(rgba), rgba[:, :, :3])


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
def test_load_image_from_file_and_pil(tmp_path, mode):
    rgb = np.random.default_rng(2).integers(0, 256, (9, 11, 3), dtype=np.uint8)
    pil = Image.fromarray(rgb).convert(mode)
    path = tmp_path / f"ref_{mode}.png"
    pil.save(path)
    expected = np.asarray(pil.convert("RGB"))
    for source in (path, str(path), pil):
        out = load_image(source)
        assert out.shape == (9, 11, 3) and out.dtype == np.uint8
        np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("bad, err, words", [
    (np.zeros((4, 4, 3), np.float32), TypeError, "uint8"),
    (np.zeros((4, 4, 2), np.uint8), ValueError, "shape"),
    (np.zeros((1, 4, 4, 3), np.uint8), ValueError, "shape"),
    (np.zeros((0, 4, 3), np.uint8), ValueError, "empty"),
    ([[0, 1], [2, 3]], TypeError, "list"),
    (None, TypeError, "NoneType"),
])
def test_load_image_bad_input_named(bad, err, words):
    with pytest.raises(err, match=words):
        load_image(bad)


def test_load_image_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_image(tmp_path / "missing.png")
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image at all")
    with pytest.raises(MediaError, match="junk.png: not an image file"):
        load_image(junk)


# ---- resize_cover_center_crop -------------------------------------------------------------------

def _upstream_resize_pad(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """Independent reference: upstream's torch recipe (antialiased bilinear resize, negative pad)."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    h, w = img.shape[:2]
    scale = max(height / h, width / w)
    sh, sw = int(h * scale), int(w * scale)
    t = torch.from_numpy(img).permute(2, 0, 1)[None].double() / 255.0
    t = F.interpolate(t, size=(sh, sw), mode="bilinear", align_corners=False, antialias=True)
    ph, pw = height - sh, width - sw
    t = F.pad(t, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
    return (t[0].permute(1, 2, 0).numpy() * 255.0)


@pytest.mark.parametrize("hw, target", [((100, 80), (64, 64)), ((37, 53), (64, 64)), ((200, 300), (48, 96)),
                                        ((64, 69), (64, 64)), ((71, 64), (32, 48)), ((64, 64), (64, 64))])
def test_resize_cover_center_crop_matches_upstream(hw, target):
    rng = np.random.default_rng(hash(hw + target) % 2**32)
    img = rng.integers(0, 256, hw + (3,), dtype=np.uint8)
    out = resize_cover_center_crop(img, *target)
    assert out.shape == target + (3,) and out.dtype == np.uint8
    ref = _upstream_resize_pad(img, *target)
    # Pillow's fixed-point filter + rounding to uint8 vs a float64 reference: at most one level.
    assert np.abs(out.astype(np.float64) - ref).max() <= 1.01


def _smooth_image(h: int, w: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([127 + 100 * np.sin(2 * np.pi * y / h), 127 + 100 * np.cos(3 * np.pi * x / w),
                    255 * (x + y) / (h + w)], axis=-1)
    return img.round().astype(np.uint8)


def test_huge_reference_is_reduced_before_any_full_size_copy():
    import tracemalloc
    big = _smooth_image(4000, 3000)
    tracemalloc.start()
    out = resize_cover_center_crop(big, 64, 48)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert out.shape == (64, 48, 3)
    assert peak < big.nbytes / 10  # no copy of the input (the old path copied it: peak >= big.nbytes)
    # Box-reduce first, then bilinear: within a few levels of the direct antialiased resize.
    ref = _upstream_resize_pad(big, 64, 48)
    assert np.abs(out.astype(np.float64) - ref).max() <= 4.0


def test_resize_cover_center_crop_odd_excess_offsets():
    """No resize needed: the crop removes ceil(excess/2) on the top/left, like upstream."""
    rng = np.random.default_rng(3)
    wide = rng.integers(0, 256, (64, 69, 3), dtype=np.uint8)
    np.testing.assert_array_equal(resize_cover_center_crop(wide, 64, 64), wide[:, 3:67])
    tall = rng.integers(0, 256, (71, 32, 3), dtype=np.uint8)
    np.testing.assert_array_equal(resize_cover_center_crop(tall, 64, 32), tall[4:68])


def test_resize_cover_center_crop_keeps_the_centre():
    wide = np.zeros((50, 200, 3), np.uint8)
    wide[:, :75] = (255, 0, 0)
    wide[:, 75:125] = (0, 255, 0)
    wide[:, 125:] = (0, 0, 255)
    out = resize_cover_center_crop(wide, 32, 32)  # scale 0.64 -> 32x128, crop the middle 32 columns
    assert out.shape == (32, 32, 3)
    np.testing.assert_array_equal(out[:, 2:-2], np.broadcast_to([0, 255, 0], (32, 28, 3)))


@pytest.mark.parametrize("h, w", [(0, 64), (64, -1), (64.0, 64), (True, 64)])
def test_resize_cover_center_crop_bad_size(h, w):
    with pytest.raises(ValueError, match="positive integer"):
        resize_cover_center_crop(np.zeros((8, 8, 3), np.uint8), h, w)


def test_synthetic_face_shape_and_determinism():
    a = synthetic_face(64, 48)
    assert a.shape == (64, 48, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, synthetic_face(64, 48))
    assert len(np.unique(a.reshape(-1, 3), axis=0)) > 5  # a drawing, not a flat colour


# ---- wav ----------------------------------------------------------------------------------------

def _write_pcm16(path, pcm: np.ndarray, rate: int) -> None:
    """Independent writer (stdlib `wave`): pcm is int16 [n] or [n, channels]."""
    pcm = pcm.reshape(len(pcm), -1)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(pcm.shape[1])
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.astype("<i2").tobytes())


@pytest.mark.parametrize("rate", [16000, 24000, 44100])
def test_read_wav_mono_exact(tmp_path, rate):
    pcm = np.random.default_rng(rate).integers(-32768, 32768, 3001).astype(np.int16)
    path = tmp_path / "mono.wav"
    _write_pcm16(path, pcm, rate)
    samples, sr = read_wav(path)
    assert sr == rate  # never resampled
    assert samples.dtype == np.float32 and samples.shape == (3001,)
    np.testing.assert_array_equal(samples, pcm.astype(np.float32) / 32768.0)


def test_read_wav_stereo_needs_mixdown(tmp_path):
    pcm = np.random.default_rng(5).integers(-32768, 32768, (1000, 2)).astype(np.int16)
    path = tmp_path / "stereo.wav"
    _write_pcm16(path, pcm, 16000)
    with pytest.raises(ValueError, match="2 channels.*mixdown=True"):
        read_wav(path)
    samples, sr = read_wav(path, mixdown=True)
    assert sr == 16000
    np.testing.assert_allclose(samples, pcm.astype(np.float64).mean(axis=1) / 32768.0, atol=1e-7)


def test_write_wav_read_wav_round_trip(tmp_path):
    x = synth_speech_like(0.5, 16000, seed=4)
    write_wav(tmp_path / "rt.wav", x, 16000)
    y, sr = read_wav(tmp_path / "rt.wav")
    assert sr == 16000 and y.shape == x.shape
    assert np.abs(y - x).max() <= 0.5 / 32768 + 1e-9  # 16-bit rounding only


def test_read_wav_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        read_wav(tmp_path / "nope.wav")
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match="junk.wav"):
        read_wav(junk)


def test_read_audio_file_keeps_channels_and_rate(tmp_path):
    pcm = np.random.default_rng(6).integers(-32768, 32768, (700, 2)).astype(np.int16)
    _write_pcm16(tmp_path / "st.wav", pcm, 44100)
    planes, rate = read_audio_file(tmp_path / "st.wav")
    assert rate == 44100 and planes.shape == (2, 700)
    np.testing.assert_array_equal(planes, pcm.T.astype(np.float32) / 32768.0)


def test_empty_wav_is_an_error_naming_the_file(tmp_path):
    write_wav(tmp_path / "empty.wav", np.zeros(0, np.float32), 16000)
    for read in (read_wav, read_audio_file):
        with pytest.raises(MediaError, match="empty.wav: holds no audio samples"):
            read(tmp_path / "empty.wav")


# ---- synthetic speech ---------------------------------------------------------------------------

def test_synth_speech_bounds_length_determinism():
    x = synth_speech_like(3.0, 16000, seed=7)
    assert x.dtype == np.float32 and x.shape == (48000,)
    assert np.isfinite(x).all() and np.abs(x).max() <= 1.0 and np.abs(x).max() > 0.5
    np.testing.assert_array_equal(x, synth_speech_like(3.0, 16000, seed=7))
    assert not np.allclose(x, synth_speech_like(3.0, 16000, seed=8))
    assert synth_speech_like(0.0).shape == (0,)
    assert synth_speech_like(1.0, 24000).shape == (24000,)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_synth_speech_is_speech_like(seed):
    sr = 16000
    x = synth_speech_like(6.0, sr, seed=seed).astype(np.float64)
    frames = x[: len(x) // 320 * 320].reshape(-1, 320)  # 20 ms frames
    rms = np.sqrt((frames ** 2).mean(axis=1))
    silent = rms < 1e-3
    assert 0.05 < silent.mean() < 0.6, "speech has pauses, but is mostly voiced"
    # Syllable-rate gating: many separate bursts of sound, not one tone.
    onsets = np.count_nonzero(~silent[1:] & silent[:-1]) + np.count_nonzero(rms[1:] > 4 * rms[:-1] + 1e-4)
    assert onsets >= 6
    power = np.abs(np.fft.rfft(x)) ** 2
    freqs = np.fft.rfftfreq(len(x), 1.0 / sr)
    assert power[freqs < 4000].sum() / power.sum() > 0.95, "energy in the speech band"
    assert power[freqs < 70].sum() / power.sum() < 0.01, "no DC or rumble"
    # Pitch of the loudest 40 ms window: normalised autocorrelation; the shortest lag within 0.03
    # of the best is the period (its multiples score about as high, half of it clearly lower).
    loud = int(np.argmax(rms)) * 320
    win = x[loud: loud + 640] if loud + 640 <= len(x) else x[loud - 640: loud]
    lags = np.arange(sr // 400, sr // 50)
    ac = np.array([np.dot(win[:-k], win[k:]) / np.sqrt(np.dot(win[:-k], win[:-k]) * np.dot(win[k:], win[k:]))
                   for k in lags])
    period = lags[np.argmax(ac >= ac.max() - 0.03)]
    assert ac.max() > 0.9, "voiced: strongly periodic"
    assert 70 <= sr / period <= 300


@pytest.mark.parametrize("kw", [{"seconds": -1.0}, {"seconds": float("nan")}, {"seconds": 1.0, "sample_rate": 0}])
def test_synth_speech_bad_args(kw):
    with pytest.raises(ValueError):
        synth_speech_like(**kw)


# ---- Mp4Writer ----------------------------------------------------------------------------------

def _colour(i: int) -> np.ndarray:
    return np.array([(40 * i) % 256, (90 + 25 * i) % 256, (200 - 15 * i) % 256], np.uint8)


def _write_blocks(path, fps, sr, h=48, w=64, blocks=(9, 12, 12)):
    n = 0
    with Mp4Writer(path, w, h, fps, sr) as writer:
        for count in blocks:
            frames = np.stack([np.broadcast_to(_colour(n + i), (h, w, 3)) for i in range(count)])
            t = np.arange(count * sr // fps) / sr
            writer.write_block(frames, (0.4 * np.sin(2 * np.pi * 220 * t)).astype(np.float32))
            n += count
    assert writer.frames_written == n and writer.samples_written == n * sr // fps
    return n


@pytest.mark.parametrize("fps, sr", [(16, 16000), (25, 24000)])
def test_mp4_writer_round_trip(tmp_path, fps, sr):
    path = tmp_path / "out.mp4"
    n = _write_blocks(path, fps, sr)
    with av.open(str(path)) as c:
        v, a = c.streams.video[0], c.streams.audio[0]
        assert v.codec_context.name == "h264" and v.codec_context.pix_fmt == "yuv420p"
        assert (v.width, v.height) == (64, 48)
        assert v.average_rate == fps and v.time_base == Fraction(1, fps)
        assert a.codec_context.name == "aac" and a.sample_rate == sr and a.codec_context.channels == 1
        # Audio lasts as long as the video, within one video frame.
        assert abs(float(a.duration * a.time_base) - n / fps) <= 1.0 / fps
        decoded = list(c.decode(video=0))
    assert len(decoded) == n
    assert [f.pts for f in decoded] == list(range(n))  # exact pts in 1/fps
    for i, f in enumerate(decoded):
        img = f.to_ndarray(format="rgb24")
        assert img.shape == (48, 64, 3)
        # Flat colours survive H.264 + yuv420p up to a few levels; the order must be exact.
        assert np.abs(img.astype(int) - _colour(i).astype(int)).max() <= 6, f"frame {i}"


def test_mp4_writer_audio_content(tmp_path):
    path = tmp_path / "tone.mp4"
    _write_blocks(path, 16, 16000, blocks=(16, 16))
    with av.open(str(path)) as c:
        audio = np.concatenate([f.to_ndarray()[0] for f in c.decode(audio=0)])
    assert abs(len(audio) - 32000) < 1024  # AAC pads the last frame
    spectrum = np.abs(np.fft.rfft(audio[2000:30000]))
    peak_hz = np.argmax(spectrum) * 16000 / 28000
    assert abs(peak_hz - 220) < 2
    assert 0.3 < np.abs(audio[2000:30000]).max() < 0.5


@pytest.mark.parametrize("w, h", [(63, 48), (64, 47)])
def test_mp4_writer_refuses_odd_sizes(tmp_path, w, h):
    with pytest.raises(ValueError, match="even"):
        Mp4Writer(tmp_path / "odd.mp4", w, h, 16)


def test_mp4_writer_bad_input(tmp_path):
    with Mp4Writer(tmp_path / "bad.mp4", 32, 32, 16) as writer:
        with pytest.raises(ValueError, match=r"\[N, 32, 32, 3\]"):
            writer.write_frames(np.zeros((2, 32, 30, 3), np.uint8))
        with pytest.raises(TypeError, match="uint8"):
            writer.write_frames(np.zeros((2, 32, 32, 3), np.float32))
        with pytest.raises(ValueError, match="NaN"):
            writer.write_audio(np.array([0.0, np.nan], np.float32))
        with pytest.raises(ValueError, match="mono"):
            writer.write_audio(np.zeros((2, 10), np.float32))
        with pytest.raises(TypeError, match="float"):
            writer.write_audio(np.zeros(10, np.int16))
        writer.write_block(np.zeros((3, 32, 32, 3), np.uint8), np.zeros(0, np.float32))  # empty audio: no-op
        assert writer.samples_written == 0
    writer.close()  # twice is fine
    with pytest.raises(RuntimeError, match="closed"):
        writer.write_frames(np.zeros((1, 32, 32, 3), np.uint8))
    with av.open(str(tmp_path / "bad.mp4")) as c:
        assert len(list(c.decode(video=0))) == 3


def test_mp4_writer_finalises_on_exception(tmp_path):
    path = tmp_path / "partial.mp4"
    with pytest.raises(KeyError), Mp4Writer(path, 32, 32, 16) as writer:
        writer.write_block(np.zeros((5, 32, 32, 3), np.uint8), np.zeros(5000, np.float32))
        raise KeyError("caller failed mid-stream")
    with av.open(str(path)) as c:
        assert len(list(c.decode(video=0))) == 5


def test_make_speech_script(tmp_path):
    import runpy
    script = runpy.run_path(str(__import__("pathlib").Path(__file__).parents[1] / "scripts" / "make_speech.py"))
    script["main"]([str(tmp_path / "s.wav"), "--seconds", "0.5", "--sample-rate", "24000", "--seed", "2"])
    samples, sr = read_wav(tmp_path / "s.wav")
    assert sr == 24000
    assert np.abs(samples - synth_speech_like(0.5, 24000, seed=2)).max() <= 0.5 / 32768 + 1e-9
