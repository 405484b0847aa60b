"""The WebSocket session protocol of `avatar serve` (docs/serving.md has the full description).

Client -> server: text frames are JSON control messages, binary frames are PCM16 little-endian mono
audio at the rate given in `start`.
    {"type": "start", "sample_rate": 16000, "format": "fmp4" | "raw", "seed": 0, "image": "<base64 PNG/JPEG>"}
    {"type": "end_of_segment"}      the utterance is complete (its tail is flushed, then acknowledged)
    {"type": "clear"}               barge-in: drop queued audio and unsent frames
    {"type": "stop"}                end the session
Server -> client:
    {"type": "ready", "session": id, "fps", "width", "height", "sample_rate", "format"}
    {"type": "init", "video": "video/mp4; codecs=...", "audio": "audio/mp4; codecs=..."}
            (fmp4, before the first media bytes: one SourceBuffer per track)
    binary: fmp4: one byte FMP4_VIDEO or FMP4_AUDIO, then that track's fragmented MP4 bytes;
            raw: RAW_HEADER (kind, index, block, segment), then RGB24 [H, W, 3] or PCM16 samples_per_frame
    {"type": "playback_finished", "segment", "position", "interrupted"}
    {"type": "error", "code": "at_capacity" | "bad_request" | "idle_timeout" | "session_failed", "message"}
"""
from __future__ import annotations

import base64
import io
import json
import struct
from dataclasses import dataclass

import numpy as np

RAW_HEADER = struct.Struct("<BIIi")   # kind, frame index, engine block, speech segment (-1: idle)
RAW_VIDEO, RAW_AUDIO = 0, 1
FMP4_VIDEO, FMP4_AUDIO = 0, 1         # the track byte before fmp4 bytes
FORMATS = ("fmp4", "raw")
CONTROL = ("end_of_segment", "clear", "stop")


class ProtocolError(ValueError):
    """A message the protocol does not allow; answered with code bad_request."""


@dataclass(frozen=True)
class Start:
    sample_rate: int = 16000
    format: str = "fmp4"
    seed: int = 0
    image: np.ndarray | None = None    # the server's default face when None

    def __post_init__(self):
        if isinstance(self.sample_rate, bool) or not isinstance(self.sample_rate, int) or self.sample_rate <= 0:
            raise ProtocolError(f"start.sample_rate must be a positive integer, got {self.sample_rate!r}")
        if self.format not in FORMATS:
            raise ProtocolError(f"start.format must be one of {FORMATS}, got {self.format!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ProtocolError(f"start.seed must be a non-negative integer, got {self.seed!r}")


def parse_json(text: str) -> dict:
    try:
        message = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ProtocolError(f"control messages are JSON: {exc}") from exc
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise ProtocolError('a control message is a JSON object with a string "type"')
    return message


def parse_start(text: str) -> Start:
    message = parse_json(text)
    if message["type"] != "start":
        raise ProtocolError(f'the first message must be {{"type": "start", ...}}, got type {message["type"]!r}')
    unknown = set(message) - {"type", "sample_rate", "format", "seed", "image"}
    if unknown:
        raise ProtocolError(f"unknown start fields: {sorted(unknown)}")
    image = message.get("image")
    return Start(sample_rate=message.get("sample_rate", 16000), format=message.get("format", "fmp4"),
                 seed=message.get("seed", 0), image=None if image is None else decode_image(image))


def parse_control(text: str) -> str:
    kind = parse_json(text)["type"]
    if kind not in CONTROL:
        raise ProtocolError(f"unknown control message type {kind!r}; expected one of {CONTROL}")
    return kind


def decode_image(data: str) -> np.ndarray:
    """base64 PNG/JPEG -> uint8 [H, W, 3] (PyAV decodes it: no extra imaging library)."""
    import av

    try:
        raw = base64.b64decode(data, validate=True)
        with av.open(io.BytesIO(raw)) as container:
            frame = next(container.decode(video=0))
    except Exception as exc:  # any decoding failure is the client's bad image
        raise ProtocolError(f"start.image is not a base64 PNG or JPEG: {exc}") from exc
    return frame.to_ndarray(format="rgb24")


def raw_message(kind: int, index: int, block: int, segment: int | None, payload: bytes) -> bytes:
    return RAW_HEADER.pack(kind, index, block, -1 if segment is None else segment) + payload


def error(code: str, message: str) -> str:
    return json.dumps({"type": "error", "code": code, "message": message})
