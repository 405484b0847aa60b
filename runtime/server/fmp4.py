"""Fragmented MP4 (H.264 + AAC) for a browser's MediaSource, muxed by PyAV as frames arrive.

One fragment per video frame (`frag_every_frame`; `empty_moov` puts the init segment first), so the
byte stream can be appended to a SourceBuffer as it comes; the x264 encoder runs `zerolatency` (no
B-frames, no lookahead) and the output is never seeked. Exact pts: video in 1/fps ticks, audio in
samples.
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


class FragmentedMP4Writer:
    def __init__(self, width: int, height: int, fps: int, sample_rate: int, crf: int = 23):
        self.fps, self.sample_rate = fps, sample_rate
        self._sink = _Sink()
        self._out = av.open(self._sink, "w", format="mp4", options={"movflags": MOVFLAGS})
        self._video = self._out.add_stream("libx264", rate=fps, options={
            "preset": "ultrafast", "tune": "zerolatency", "profile": "baseline", "crf": str(crf)})
        self._video.width, self._video.height, self._video.pix_fmt = width, height, "yuv420p"
        self._audio = self._out.add_stream("aac", rate=sample_rate)
        self._audio.layout = "mono"
        self._frames = 0
        self._samples = 0
        self._closed = False

    @property
    def mime(self) -> str:
        """The MediaSource type, with the avc1 profile/level read from the encoder's SPS."""
        extradata = self._video.codec_context.extradata or b""
        sps = extradata.split(b"\x00\x00\x01", 1)[-1] if extradata.startswith(b"\x00") else extradata[5:]
        codec = f"avc1.{sps[1:4].hex().upper()}" if len(sps) >= 4 else "avc1.42C01E"
        return f'video/mp4; codecs="{codec}, mp4a.40.2"'

    def write(self, rgb: np.ndarray, pcm: np.ndarray) -> bytes:
        """One video frame (uint8 [H, W, 3]) and its audio (int16 mono); returns the bytes now muxed."""
        frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
        frame.pts = self._frames
        self._frames += 1
        self._mux(self._video.encode(frame))
        audio = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
        audio.sample_rate, audio.pts = self.sample_rate, self._samples
        self._samples += len(pcm)
        self._mux(self._audio.encode(audio))
        return self._sink.take()

    def close(self) -> bytes:
        """Flush the encoders; returns the last fragments."""
        if self._closed:
            return b""
        self._closed = True
        self._mux(self._video.encode(None))
        self._mux(self._audio.encode(None))
        self._out.close()
        return self._sink.take()

    def _mux(self, packets) -> None:
        for packet in packets:
            self._out.mux(packet)
