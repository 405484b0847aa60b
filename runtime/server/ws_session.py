"""One WebSocket session of the protocol (protocol.py), over any socket: aiohttp's in `avatar serve`
(app.AiohttpSocket), Starlette's in a Ray Serve replica (integrations/ray_serve.py).

The socket has `receive(timeout) -> ("text" | "binary" | "close", data)`, `send_text`, `send_bytes`,
`close(code, reason)` and `closed`. The host (app.AvatarServer) has `open_session(Start)`,
`close_session(id)`, `metrics`, `idle_timeout` and `start_timeout`.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging

from ..audio import AudioInputError
from ..errors import AtCapacityError
from ..realtime import AudioFrame, AvatarSession, AvatarSessionError, PlaybackFinished, VideoFrame
from .fmp4 import FragmentedMP4Writer
from .protocol import (
    FMP4_AUDIO,
    FMP4_VIDEO,
    RAW_AUDIO,
    RAW_VIDEO,
    ProtocolError,
    Start,
    error,
    parse_control,
    parse_start,
    raw_message,
)

log = logging.getLogger(__name__)
TRY_AGAIN_LATER = 1013   # WebSocket close code (RFC 6455 registry)
POLICY = 1008


async def serve_socket(host, sock) -> None:
    try:
        start = await _read_start(host, sock)
        session_id, avatar = await host.open_session(start)
    except ProtocolError as exc:
        await refuse(sock, "bad_request", str(exc))
        return
    except AtCapacityError as exc:
        await refuse(sock, "at_capacity", str(exc), TRY_AGAIN_LATER)
        return
    except (TypeError, ValueError) as exc:      # a bad reference image, refused by the engine
        await refuse(sock, "bad_request", str(exc))
        return
    try:
        await _send_json(sock, {"type": "ready", "session": session_id, "fps": avatar.fps, "height": avatar.size[0],
                                "width": avatar.size[1], "sample_rate": avatar.sample_rate, "format": start.format})
        await _run(host, sock, avatar, start)
    finally:
        await host.close_session(session_id)
        if not sock.closed:
            await sock.close()


async def refuse(sock, code: str, message: str, close_code: int = POLICY) -> None:
    log.info("session refused or ended: %s: %s", code, message)
    if not sock.closed:
        await sock.send_text(error(code, message))
        await sock.close(close_code, code)


async def _send_json(sock, message: dict) -> None:
    await sock.send_text(json.dumps(message))


async def _read_start(host, sock) -> Start:
    try:
        kind, data = await sock.receive(host.start_timeout)
    except TimeoutError as exc:
        raise ProtocolError(f"no start message within {host.start_timeout} s") from exc
    if kind != "text":
        raise ProtocolError('the first message must be a JSON {"type": "start", ...} text frame')
    return parse_start(data)


async def _run(host, sock, avatar: AvatarSession, start: Start) -> None:
    tasks = [asyncio.create_task(_input(host, sock, avatar, start)), asyncio.create_task(_output(sock, avatar, start))]
    done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    for task in pending:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    for task in done:
        failure = task.exception()
        if isinstance(failure, AvatarSessionError):
            host.metrics.failed_total += 1
            log.warning("session failed: %s", failure)
            await refuse(sock, "session_failed", str(failure))
        elif isinstance(failure, TimeoutError):
            host.metrics.idle_timeouts_total += 1
            await refuse(sock, "idle_timeout", f"nothing received for {host.idle_timeout} s")
        elif failure is not None and not isinstance(failure, ConnectionError):
            raise failure


async def _input(host, sock, avatar: AvatarSession, start: Start) -> None:
    while True:
        kind, data = await sock.receive(host.idle_timeout)
        if kind == "binary":
            try:
                await avatar.push_audio(data, start.sample_rate)
            except AudioInputError as exc:      # the chunk is refused; the session goes on
                await sock.send_text(error("bad_request", str(exc)))
        elif kind == "text":
            try:
                control = parse_control(data)
            except ProtocolError as exc:
                await sock.send_text(error("bad_request", str(exc)))
                continue
            if control == "stop":
                return
            if control == "end_of_segment":
                avatar.end_of_segment()
            elif control == "clear":
                avatar.clear_buffer()
        else:
            return


async def _output(sock, avatar: AvatarSession, start: Start) -> None:
    writer = FragmentedMP4Writer(avatar.size[1], avatar.size[0], avatar.fps, avatar.sample_rate) \
        if start.format == "fmp4" else None
    sent_init, video = False, None
    try:
        async for event in avatar:
            if isinstance(event, PlaybackFinished):
                await _send_json(sock, {"type": "playback_finished", "segment": event.segment,
                                        "position": event.position, "interrupted": event.interrupted})
            elif isinstance(event, VideoFrame):
                video = event
                if writer is None:
                    await sock.send_bytes(raw_message(RAW_VIDEO, event.index, event.block, event.segment,
                                                      event.rgb.tobytes()))
            elif writer is None:
                await sock.send_bytes(raw_message(RAW_AUDIO, event.index, video.block, video.segment, event.data))
            elif isinstance(event, AudioFrame):
                video_bytes, audio_bytes = writer.write(video.rgb, event.pcm)
                if video_bytes and not sent_init:
                    await _send_json(sock, {"type": "init", "video": writer.video_mime, "audio": writer.audio_mime})
                    sent_init = True
                for track, data in ((FMP4_VIDEO, video_bytes), (FMP4_AUDIO, audio_bytes)):
                    if data:
                        await sock.send_bytes(bytes([track]) + data)
    finally:
        if writer is not None:
            writer.close()
