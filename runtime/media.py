"""Media I/O for the runtime: reference images, wav input, a synthetic speech-like test signal and a
streaming MP4 (H.264 yuv420p + AAC) writer with exact timestamps.

Only numpy, Pillow and PyAV are used here, so the module imports without torch or the engine.
"""
from __future__ import annotations

import os
import wave
from fractions import Fraction
from pathlib import Path
from typing import Self

import numpy as np


class MediaError(ValueError):
    """A media file or array the runtime cannot use (not an image, no audio, no samples): names the file."""


# ---- images -------------------------------------------------------------------------------------

def load_image(image) -> np.ndarray:
    """Return `image` as a contiguous uint8 [H, W, 3] RGB array (a copy).

    Accepts a file path, a PIL image, or a uint8 array of shape [H, W], [H, W, 1], [H, W, 3] or
    [H, W, 4]. Grey is replicated to RGB; alpha is dropped (as upstream's `convert("RGB")`).
    """
    if isinstance(image, (str, os.PathLike)):
        return _load_image_file(Path(image))
    if isinstance(image, np.ndarray):
        return _image_array_to_rgb(image)
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow is a declared dependency
        Image = None
    if Image is not None and isinstance(image, Image.Image):
        return np.array(image.convert("RGB"), dtype=np.uint8)
    raise TypeError(f"reference image must be a path, a PIL image or a uint8 HxWx3 numpy array, "
                    f"got {type(image).__name__}")


def _load_image_file(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise FileNotFoundError(f"reference image not found: {path}")
    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"), dtype=np.uint8)
    except UnidentifiedImageError as e:
        raise MediaError(f"{path}: not an image file Pillow can decode (expected PNG, JPEG, WebP, ...)") from e


def _image_array_to_rgb(arr: np.ndarray) -> np.ndarray:
    if arr.dtype != np.uint8:
        raise TypeError(f"reference image array must have dtype uint8 (0..255), got {arr.dtype}")
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise ValueError(f"reference image array must be HxW, HxWx1, HxWx3 or HxWx4, got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"reference image is empty (shape {arr.shape})")
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return np.ascontiguousarray(arr[:, :, :3]).copy()


def resize_cover_center_crop(image, height: int, width: int) -> np.ndarray:
    """Resize so the image covers height x width, then centre-crop to exactly that size.

    Follows upstream LiveTalk/OmniAvatar `resize_pad`: scale = max(H_t / H, W_t / W), new size
    int(H * scale) x int(W * scale), bilinear resampling with antialiasing (torchvision `Resize`
    default, which is Pillow's BILINEAR filter), then a crop that removes ceil(excess / 2) from the
    top/left and floor(excess / 2) from the bottom/right (upstream's negative `F.pad`). One
    deviation: when float rounding makes int(H * scale) one pixel short of the target, upstream pads
    a black line; we clamp the size to the target instead.
    """
    from PIL import Image

    _check_size(height, width)
    rgb = _reduce_huge(_rgb_view(image), height, width)
    h, w = rgb.shape[:2]
    scale = max(height / h, width / w)
    new_h, new_w = max(height, int(h * scale)), max(width, int(w * scale))
    if (new_h, new_w) != (h, w):
        rgb = np.asarray(Image.fromarray(rgb).resize((new_w, new_h), Image.BILINEAR))
    top = new_h - height - (new_h - height) // 2
    left = new_w - width - (new_w - width) // 2
    return np.ascontiguousarray(rgb[top:top + height, left:left + width])


# Images more than this many times the target (in the covering scale) are first box-reduced by an integer
# factor: Pillow's own `reducing_gap` rule (3 is its "indistinguishable from fair resampling" setting).
# It bounds the memory and time of a huge reference (20000^2: 1.2 GB in, no float copy) and never
# touches ordinary photos (a 1920x1080 portrait is < 3x a 512 target).
_REDUCING_GAP = 3


def _rgb_view(image) -> np.ndarray:
    """An RGB uint8 array of `image`; an HxWx3 array is checked and viewed, not copied."""
    if isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8:
        if 0 in image.shape:
            raise ValueError(f"reference image is empty (shape {image.shape})")
        return image
    return load_image(image)


def _reduce_huge(rgb: np.ndarray, height: int, width: int, rows_per_pass: int = 64) -> np.ndarray:
    """Box-average by the integer factor k that leaves the image >= _REDUCING_GAP x the cover size
    (k = 1: `rgb` itself). Done a band of rows at a time, so no full-size float copy is ever made."""
    h, w = rgb.shape[:2]
    k = int(min(h / height, w / width) // _REDUCING_GAP)
    if k < 2:
        return rgb
    from PIL import Image

    out_h, out_w = h // k, w // k
    out = np.empty((out_h, out_w, 3), np.uint8)
    for r in range(0, out_h, rows_per_pass):
        rows = min(rows_per_pass, out_h - r)
        band = np.ascontiguousarray(rgb[r * k:(r + rows) * k, :out_w * k])
        out[r:r + rows] = np.asarray(Image.fromarray(band).reduce(k))  # Pillow's box reduce, in C
    return out


def _check_size(height, width) -> None:
    for name, v in (("height", height), ("width", width)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")


def synthetic_face(height: int, width: int) -> np.ndarray:
    """A simple face-like drawing (uint8 [H, W, 3]) for demos without a reference photo."""
    _check_size(height, width)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    y, x = (y + 0.5) / height, (x + 0.5) / width  # normalised pixel centres in (0, 1)
    img = np.empty((height, width, 3), np.float32)
    img[:] = np.stack([0.25 + 0.3 * y, 0.35 + 0.2 * y, 0.55 + 0.1 * x], axis=-1)  # background gradient

    def ellipse(cy, cx, ry, rx):
        return ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1.0

    img[ellipse(1.05, 0.5, 0.3, 0.42)] = (0.2, 0.3, 0.5)        # shoulders
    img[ellipse(0.78, 0.5, 0.12, 0.08)] = (0.85, 0.67, 0.55)    # neck
    img[ellipse(0.45, 0.5, 0.32, 0.24)] = (0.93, 0.75, 0.62)    # face
    img[ellipse(0.2, 0.5, 0.12, 0.25) & (y < 0.25)] = (0.25, 0.15, 0.1)  # hair
    for cx in (0.4, 0.6):
        img[ellipse(0.4, cx, 0.045, 0.06)] = (1.0, 1.0, 1.0)    # eye whites
        img[ellipse(0.4, cx, 0.03, 0.025)] = (0.15, 0.1, 0.05)  # pupils
    img[ellipse(0.52, 0.5, 0.06, 0.02)] = (0.82, 0.6, 0.5)      # nose
    img[ellipse(0.64, 0.5, 0.03, 0.09)] = (0.7, 0.25, 0.25)     # mouth
    return np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)


# ---- audio files --------------------------------------------------------------------------------

def read_audio_file(path) -> tuple[np.ndarray, int]:
    """Decode an audio file (wav or anything PyAV reads) to (float32 [channels, n] samples, sample_rate).

    The file's own rate and channels are kept; integer PCM is scaled to [-1, 1). A file PyAV cannot
    open, one without an audio stream and one with no samples raise MediaError naming the file.
    """
    import av

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"audio file not found: {path}")
    try:
        container = av.open(str(path))
    except av.FFmpegError as e:
        raise MediaError(f"{path}: not an audio file PyAV can decode ({e})") from e
    with container:
        if not container.streams.audio:
            raise MediaError(f"{path}: has no audio stream")
        stream = container.streams.audio[0]
        rate = stream.codec_context.sample_rate
        planes = _decode_planar_float(container, stream)
    if planes.shape[1] == 0:
        raise MediaError(f"{path}: holds no audio samples (0 samples)")
    return planes, int(rate)


def read_wav(path, mixdown: bool = False) -> tuple[np.ndarray, int]:
    """Decode an audio file to (float32 mono samples, sample_rate) (see read_audio_file).

    Nothing is resampled. Multi-channel audio is an error unless `mixdown=True`, which averages the channels.
    """
    planes, rate = read_audio_file(path)
    if planes.shape[0] > 1 and not mixdown:
        raise ValueError(f"{path} has {planes.shape[0]} channels; the engine takes mono audio "
                         f"(pass mixdown=True to average the channels)")
    samples = planes.mean(axis=0) if planes.shape[0] > 1 else planes[0]
    return np.ascontiguousarray(samples, dtype=np.float32), rate


def _decode_planar_float(container, stream) -> np.ndarray:
    """All samples of `stream` as float32 [channels, n], converted (never resampled) to planar float."""
    import av

    # rate=None keeps the source rate: the resampler only converts the sample format.
    converter = av.AudioResampler(format="fltp", layout=stream.codec_context.layout.name, rate=None)
    chunks = []
    for frame in container.decode(stream):
        for out in converter.resample(frame):
            chunks.append(out.to_ndarray())
    for out in converter.resample(None):
        chunks.append(out.to_ndarray())
    channels = stream.codec_context.channels
    if not chunks:
        return np.zeros((channels, 0), np.float32)
    return np.concatenate(chunks, axis=1).astype(np.float32, copy=False)


def _mono_float_audio(who: str, samples) -> np.ndarray:
    """Mono, floating-point, finite samples (as given), or an error naming what is wrong."""
    x = np.asarray(samples)
    if x.ndim != 1:
        raise ValueError(f"{who}: audio must be mono samples of shape [n], got {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"{who}: audio must be float samples in [-1, 1], got dtype {x.dtype}")
    if not np.isfinite(x).all():
        raise ValueError(f"{who}: audio contains NaN or Inf")
    return x


def write_wav(path, samples: np.ndarray, sample_rate: int) -> None:
    """Write mono float samples in [-1, 1] as 16-bit PCM wav (stdlib `wave`, no extra dependency)."""
    x = _mono_float_audio("write_wav", samples)
    # Scale by 32768 (the inverse of read_wav's int16 -> float), so a round trip only rounds.
    pcm = np.clip(np.round(x.astype(np.float64) * 32768.0), -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(int(sample_rate))
        w.writeframes(pcm.tobytes())


# ---- synthetic speech-like audio ----------------------------------------------------------------

# (F1, F2, F3) in Hz of a few vowels (adult speaker averages); syllables cycle through them at random.
_VOWEL_FORMANTS = ((730, 1090, 2440), (270, 2290, 3010), (300, 870, 2240), (530, 1840, 2480),
                   (570, 840, 2410), (660, 1720, 2410))
_FORMANT_BANDWIDTHS = (90.0, 110.0, 170.0)


def synth_speech_like(seconds: float, sample_rate: int = 16000, seed: int = 0) -> np.ndarray:
    """A deterministic speech-like float32 signal in [-1, 1] (same seed -> same samples).

    A harmonic glottal-like source follows a smooth, declining pitch contour; each syllable is
    band-pass shaped by the formants of one vowel and gated by a syllable-rate envelope, with short
    gaps between words and longer pauses between phrases (silence, as a VAD would see it).
    """
    if not np.isfinite(seconds) or seconds < 0:
        raise ValueError(f"seconds must be a finite number >= 0, got {seconds!r}")
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)) or sample_rate < 1000:
        raise ValueError(f"sample_rate must be an integer >= 1000, got {sample_rate!r}")
    n = round(seconds * sample_rate)
    if n == 0:
        return np.zeros(0, np.float32)
    rng = np.random.default_rng(seed)
    t = np.arange(n) / sample_rate
    source = _voiced_source(t, sample_rate, rng)
    out = np.zeros(n)
    for start, stop in _syllable_spans(n, sample_rate, rng):
        formants = _VOWEL_FORMANTS[rng.integers(len(_VOWEL_FORMANTS))]
        out[start:stop] = _formant_filter(source[start:stop], formants, sample_rate) * _syllable_envelope(stop - start)
    peak = np.abs(out).max()
    if peak > 0:
        out *= 0.9 / peak
    return np.clip(out, -1.0, 1.0).astype(np.float32)


def _voiced_source(t: np.ndarray, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    """Band-limited harmonic source (1/k amplitudes) with a varying pitch, plus a little breath noise."""
    base = rng.uniform(110.0, 190.0)
    phase = rng.uniform(0, 2 * np.pi, 3)
    # Slow intonation, faster wobble, and a declination that resets every ~2.5 s (phrase-like).
    f0 = base * (1.0 + 0.12 * np.sin(2 * np.pi * 0.6 * t + phase[0])
                 + 0.05 * np.sin(2 * np.pi * 3.3 * t + phase[1])
                 - 0.1 * ((t + phase[2]) % 2.5) / 2.5)
    cycles = 2 * np.pi * np.cumsum(f0) / sample_rate
    max_harmonic = int(0.45 * sample_rate / f0.max())  # stay below Nyquist everywhere (no aliasing)
    src = np.zeros_like(t)
    for k in range(1, max_harmonic + 1):
        src += np.sin(k * cycles) / k
    return src + 0.02 * rng.standard_normal(t.shape)


def _syllable_spans(n: int, sample_rate: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """[start, stop) sample spans of syllables: 1-4 per word, 2-5 words per phrase, then a pause."""
    spans, pos = [], int(rng.uniform(0.05, 0.2) * sample_rate)
    while pos < n:
        for _ in range(rng.integers(2, 6)):           # words in this phrase
            for _ in range(rng.integers(1, 5)):       # syllables in this word
                length = int(rng.uniform(0.12, 0.26) * sample_rate)
                if pos >= n:
                    return spans
                spans.append((pos, min(n, pos + length)))
                pos += length + int(rng.uniform(0.0, 0.03) * sample_rate)
            pos += int(rng.uniform(0.04, 0.12) * sample_rate)  # gap between words
        pos += int(rng.uniform(0.3, 0.6) * sample_rate)        # pause between phrases
    return spans


def _syllable_envelope(length: int) -> np.ndarray:
    """Fast rise, slower fall (a consonant-vowel shape), exactly zero at both ends."""
    u = np.linspace(0.0, 1.0, length)
    rise = np.clip(u / 0.15, 0, 1)
    return np.sin(0.5 * np.pi * rise) ** 2 * np.cos(0.5 * np.pi * u) ** 0.7


def _formant_filter(x: np.ndarray, formants, sample_rate: int) -> np.ndarray:
    """Zero-phase band-pass shaping by resonance peaks at the formants (FFT, padded against wrap-around)."""
    pad = int(0.02 * sample_rate)
    spec = np.fft.rfft(np.pad(x, pad), n=len(x) + 2 * pad)
    f = np.fft.rfftfreq(len(x) + 2 * pad, 1.0 / sample_rate)
    gain = np.zeros_like(f)
    for i, (fc, bw) in enumerate(zip(formants, _FORMANT_BANDWIDTHS)):
        gain += (0.5 ** i) / (1.0 + ((f - fc) / (0.5 * bw)) ** 2)
    gain *= f / (f + 60.0)  # no DC or rumble
    return np.fft.irfft(spec * gain, n=len(x) + 2 * pad)[pad:pad + len(x)]


# ---- MP4 writer ---------------------------------------------------------------------------------

class Mp4Writer:
    """Streams RGB frames and mono audio into an MP4: H.264 (yuv420p) + AAC.

    Video pts count frames in time base 1/fps (the MP4 track timescale is set to fps too, so the file
    stores them exactly); audio pts count samples in time base 1/sample_rate. Audio and video advance
    independently, so a caller that hands each block its own audio span keeps them in sync.
    """

    def __init__(self, path, width: int, height: int, fps: int, sample_rate: int = 16000, *,
                 crf: int = 18, preset: str = "veryfast", audio_bitrate: int = 128_000):
        _check_size(height, width)
        if height % 2 or width % 2:
            raise ValueError(f"H.264 yuv420p needs even frame dimensions, got {width}x{height} (WxH)")
        if isinstance(fps, bool) or not isinstance(fps, (int, np.integer)) or fps <= 0:
            raise ValueError(f"fps must be a positive integer, got {fps!r}")
        if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)) or sample_rate <= 0:
            raise ValueError(f"sample_rate must be a positive integer, got {sample_rate!r}")
        import av

        self.path, self.width, self.height = str(path), int(width), int(height)
        self.fps, self.sample_rate = int(fps), int(sample_rate)
        self.frames_written = 0
        self.samples_written = 0
        self._closed = False
        self._container = av.open(self.path, "w", format="mp4",
                                  options={"video_track_timescale": str(self.fps)})
        try:
            self._video = self._add_video_stream(crf, preset)
            self._audio = self._container.add_stream("aac", rate=self.sample_rate, layout="mono")
            self._audio.bit_rate = int(audio_bitrate)
        except Exception:
            self._container.close()
            raise

    def _add_video_stream(self, crf: int, preset: str):
        import av

        codec = "libx264" if "libx264" in av.codecs_available else "h264"
        stream = self._container.add_stream(codec, rate=self.fps,
                                            options={"crf": str(crf), "preset": preset})
        stream.width, stream.height, stream.pix_fmt = self.width, self.height, "yuv420p"
        stream.time_base = Fraction(1, self.fps)
        return stream

    # -- writing --
    def write_block(self, frames: np.ndarray, audio: np.ndarray | None = None) -> None:
        """Append frames (uint8 [N, H, W, 3]) and the mono float audio they cover."""
        self.write_frames(frames)
        if audio is not None:
            self.write_audio(audio)

    def write_frames(self, frames: np.ndarray) -> None:
        import av

        self._check_open()
        frames = self._check_frames(frames)
        for img in frames:
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts, frame.time_base = self.frames_written, Fraction(1, self.fps)
            self._container.mux(self._video.encode(frame))
            self.frames_written += 1

    def write_audio(self, audio: np.ndarray) -> None:
        import av

        self._check_open()
        x = self._check_audio(audio)
        if x.size == 0:
            return
        frame = av.AudioFrame.from_ndarray(x[None, :], format="fltp", layout="mono")
        frame.sample_rate = self.sample_rate
        frame.pts, frame.time_base = self.samples_written, Fraction(1, self.sample_rate)
        self._container.mux(self._audio.encode(frame))
        self.samples_written += x.size

    def _check_frames(self, frames) -> np.ndarray:
        if not isinstance(frames, np.ndarray):
            raise TypeError(f"frames must be a numpy array, got {type(frames).__name__}")
        if frames.dtype != np.uint8:
            raise TypeError(f"frames must be uint8, got {frames.dtype}")
        expected = (self.height, self.width, 3)
        if frames.ndim != 4 or frames.shape[1:] != expected:
            raise ValueError(f"frames must have shape [N, {self.height}, {self.width}, 3], got {frames.shape}")
        return np.ascontiguousarray(frames)

    @staticmethod
    def _check_audio(audio) -> np.ndarray:
        return np.ascontiguousarray(_mono_float_audio("Mp4Writer", audio), dtype=np.float32)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"Mp4Writer for {self.path} is closed")

    # -- finishing --
    @property
    def duration(self) -> float:
        """Seconds of video written so far."""
        return self.frames_written / self.fps

    def close(self) -> None:
        """Flush both encoders and finalise the file. Safe to call twice.

        The container writes its header lazily: a writer closed before any frame leaves no file.
        """
        if self._closed:
            return
        self._closed = True
        try:
            self._container.mux(self._video.encode(None))
            if self.samples_written:
                self._container.mux(self._audio.encode(None))
        finally:
            self._container.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
