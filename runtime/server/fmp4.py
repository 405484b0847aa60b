"""Fragmented MP4 for a browser's MediaSource, muxed by PyAV as frames arrive: two streams, H.264
video and AAC audio, for two SourceBuffers.

Why two: FFmpeg's mp4 muxer (8.1) with one fragment per frame and both tracks in one file gives the
first video sample the audio encoder's priming delay as extra duration and shifts every later
fragment's decode time by it, which leaves a hole that stops Chromium's playback after 3 frames;
each track in a file of its own has exact timestamps (video: index / fps, audio: samples).
One fragment per frame (`frag_every_frame`; `empty_moov` puts the init segment first), so bytes can be
appended as they come; x264 runs `zerolatency` (no B-frames, no lookahead); nothing is ever seeked.
"""
from __future__ import annotations

import av
import numpy as np

MOVFLAGS = "frag_every_frame+empty_moov+default_base_moof"


class _Sink:
    """What PyAV writes into: appended bytes, taken by `take()`; never seeks."""

    def __init__(self):
        self._chunks: list[bytes] = []
        self._pos = 0

    def write(self, data) -> int:
        self._chunks.append(bytes(data))
        self._pos += len(data)
        return len(data)

    def tell(self) -> int:
        return self._pos

    def seekable(self) -> bool:
        return False

    def seek(self, *_):
        raise OSError("a fragmented MP4 stream is not seekable")

    def flush(self) -> None:
        pass

    def take(self) -> bytes:
        data, self._chunks = b"".join(self._chunks), []
        return data


class _Muxer:
    """One stream in a fragmented MP4 of its own."""

    def __init__(self, codec: str, rate: int, options: dict | None = None):
        self.sink = _Sink()
        self.container = av.open(self.sink, "w", format="mp4", options={"movflags": MOVFLAGS})
        self.stream = self.container.add_stream(codec, rate=rate, options=options or {})

    def encode(self, frame) -> bytes:
        for packet in self.stream.encode(frame):
            self.container.mux(packet)
        return self.sink.take()

    def close(self) -> bytes:
        tail = self.encode(None)
        self.container.close()
        return tail + self.sink.take()


class FragmentedMP4Writer:
    def __init__(self, width: int, height: int, fps: int, sample_rate: int, crf: int = 23):
        self.fps, self.sample_rate = fps, sample_rate
        self._video = _Muxer("libx264", fps, {"preset": "ultrafast", "tune": "zerolatency",
                                               "profile": "baseline", "crf": str(crf)})
        video = self._video.stream
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        self._audio = _Muxer("aac", sample_rate)
        self._audio.stream.layout = "mono"
        self._frames = 0
        self._samples = 0
        self._closed = False

    @property
    def video_mime(self) -> str:
        """The video SourceBuffer type, avc1 profile and level read from the encoder's SPS."""
        extradata = self._video.stream.codec_context.extradata or b""
        sps = extradata.split(b"\x00\x00\x01", 1)[-1] if extradata.startswith(b"\x00") else extradata[5:]
        codec = f"avc1.{sps[1:4].hex().upper()}" if len(sps) >= 4 else "avc1.42C01E"
        return f'video/mp4; codecs="{codec}"'

    audio_mime = 'audio/mp4; codecs="mp4a.40.2"'

    def write(self, rgb: np.ndarray, pcm: np.ndarray) -> tuple[bytes, bytes]:
        """One video frame (uint8 [H, W, 3]) and its audio (int16 mono); the (video, audio) bytes now muxed."""
        frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
        frame.pts = self._frames
        self._frames += 1
        audio = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
        audio.sample_rate, audio.pts = self.sample_rate, self._samples
        self._samples += len(pcm)
        return self._video.encode(frame), self._audio.encode(audio)

    def close(self) -> tuple[bytes, bytes]:
        """Flush the encoders; the last (video, audio) fragments."""
        if self._closed:
            return b"", b""
        self._closed = True
        return self._video.close(), self._audio.close()
