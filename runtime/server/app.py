"""`avatar serve`: one process, one engine, many sessions, over aiohttp.

Routes: GET / (the browser page), GET /ws (the WebSocket session protocol, runtime/server/protocol.py),
POST /offer (WebRTC: an SDP offer in, the answer out; the avatar as audio + video tracks, the peer's
audio track as its input), GET /health, GET /metrics (Prometheus text).

Admission: a session takes a slot from `max_sessions` before its engine stream opens; past that the
answer is "at capacity" (WebSocket: an error message and close code 1013 "try again later"; /offer:
HTTP 503), also when the engine itself refuses (runtime.errors.AtCapacityError). Each session runs in
its own task with its own worker thread (AvatarSession): a failure ends that session only, with an
error message naming it. A session whose client sends nothing for `idle_timeout` seconds is closed.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from importlib import resources

import numpy as np
from aiohttp import WSMsgType, web

from ..audio import AudioInputError
from ..errors import AtCapacityError
from ..realtime import AudioFrame, AvatarSession, AvatarSessionError, PlaybackFinished, VideoFrame
from .fmp4 import FragmentedMP4Writer
from .metrics import Metrics
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


class AvatarServer:
    def __init__(self, engine, face: np.ndarray, *, max_sessions: int | None = None,
                 idle_timeout: float = 120.0, start_timeout: float = 10.0, pace: bool = True):
        """`face`: the reference image of sessions that send none. `max_sessions` defaults to the engine's
        (an engine without `open()` holds one stream). `pace=False` sends frames as fast as they exist
        (tests); browsers and WebRTC peers want real time."""
        engine_limit = getattr(engine, "max_sessions", 1) if hasattr(engine, "open") else 1
        self.max_sessions = engine_limit if max_sessions is None else max_sessions
        if not 1 <= self.max_sessions <= engine_limit:
            raise ValueError(f"max_sessions must be in [1, {engine_limit}] (what the engine holds), "
                             f"got {max_sessions}")
        if idle_timeout <= 0 or start_timeout <= 0:
            raise ValueError("idle_timeout and start_timeout must be > 0 seconds")
        self.engine, self.face = engine, face
        self.idle_timeout, self.start_timeout, self.pace = idle_timeout, start_timeout, pace
        self.sessions: dict[str, AvatarSession] = {}
        self._reserved = 0            # slots taken by sessions still starting
        self._peers: set = set()      # WebRTC peer connections
        self.metrics = Metrics()

    # ---- app ------------------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/", self.page)
        app.router.add_get("/ws", self.websocket)
        app.router.add_post("/offer", self.offer)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics_text)
        app.on_shutdown.append(self._shutdown)
        return app

    async def page(self, _request) -> web.Response:
        html = resources.files("runtime.server").joinpath("static/index.html").read_text()
        return web.Response(text=html, content_type="text/html")

    async def health(self, _request) -> web.Response:
        return web.json_response({"status": "ok", "sessions": len(self.sessions), "max_sessions": self.max_sessions,
                                  "fps": self.engine.config.fps, "sample_rate": self.engine.config.audio.sample_rate})

    async def metrics_text(self, _request) -> web.Response:
        depth = sum(s.buffered_frames for s in self.sessions.values())
        return web.Response(text=self.metrics.prometheus(len(self.sessions), self.max_sessions, depth),
                            content_type="text/plain")

    # ---- sessions -------------------------------------------------------------------------------
    async def open_session(self, start: Start) -> tuple[str, AvatarSession]:
        """Take a slot and start a session; AtCapacityError when none is free."""
        if len(self.sessions) + self._reserved >= self.max_sessions:
            self.metrics.refused_total += 1
            raise AtCapacityError(self.max_sessions, "server")
        self._reserved += 1
        try:
            image = self.face if start.image is None else start.image
            avatar = AvatarSession(self.engine, image, seed=start.seed, resample=True, pace=self.pace,
                                   on_block=self.metrics.record_block)
            await avatar.start()
        except AtCapacityError:
            self.metrics.refused_total += 1
            raise
        finally:
            self._reserved -= 1
        session_id = uuid.uuid4().hex[:12]
        self.sessions[session_id] = avatar
        self.metrics.sessions_total += 1
        log.info("session %s opened (%d/%d)", session_id, len(self.sessions), self.max_sessions)
        return session_id, avatar

    async def close_session(self, session_id: str) -> None:
        avatar = self.sessions.pop(session_id, None)
        if avatar is not None:
            await avatar.aclose()
            log.info("session %s closed (%d/%d)", session_id, len(self.sessions), self.max_sessions)

    # ---- WebSocket ------------------------------------------------------------------------------
    async def websocket(self, request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=16 << 20, heartbeat=30)
        await ws.prepare(request)
        try:
            start = await self._read_start(ws)
            session_id, avatar = await self.open_session(start)
        except ProtocolError as exc:
            await _refuse(ws, "bad_request", str(exc))
            return ws
        except AtCapacityError as exc:
            await _refuse(ws, "at_capacity", str(exc), TRY_AGAIN_LATER)
            return ws
        except (TypeError, ValueError) as exc:      # a bad reference image, refused by the engine
            await _refuse(ws, "bad_request", str(exc))
            return ws
        try:
            await ws.send_json({"type": "ready", "session": session_id, "fps": avatar.fps, "height": avatar.size[0],
                                "width": avatar.size[1], "sample_rate": avatar.sample_rate, "format": start.format})
            await self._serve_ws(ws, avatar, start)
        finally:
            await self.close_session(session_id)
            await ws.close()
        return ws

    async def _read_start(self, ws) -> Start:
        try:
            msg = await ws.receive(timeout=self.start_timeout)
        except TimeoutError as exc:
            raise ProtocolError(f"no start message within {self.start_timeout} s") from exc
        if msg.type != WSMsgType.TEXT:
            raise ProtocolError('the first message must be a JSON {"type": "start", ...} text frame')
        return parse_start(msg.data)

    async def _serve_ws(self, ws, avatar: AvatarSession, start: Start) -> None:
        tasks = [asyncio.create_task(self._ws_input(ws, avatar, start)),
                 asyncio.create_task(self._ws_output(ws, avatar, start))]
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        for task in pending:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for task in done:
            failure = task.exception()
            if isinstance(failure, AvatarSessionError):
                self.metrics.failed_total += 1
                log.warning("session failed: %s", failure)
                await _refuse(ws, "session_failed", str(failure))
            elif isinstance(failure, TimeoutError):
                self.metrics.idle_timeouts_total += 1
                await _refuse(ws, "idle_timeout", f"nothing received for {self.idle_timeout} s")
            elif failure is not None and not isinstance(failure, ConnectionResetError):
                raise failure

    async def _ws_input(self, ws, avatar: AvatarSession, start: Start) -> None:
        while True:
            msg = await ws.receive(timeout=self.idle_timeout)
            if msg.type == WSMsgType.BINARY:
                try:
                    await avatar.push_audio(msg.data, start.sample_rate)
                except AudioInputError as exc:      # the chunk is refused; the session goes on
                    await ws.send_str(error("bad_request", str(exc)))
            elif msg.type == WSMsgType.TEXT:
                try:
                    kind = parse_control(msg.data)
                except ProtocolError as exc:
                    await ws.send_str(error("bad_request", str(exc)))
                    continue
                if kind == "stop":
                    return
                if kind == "end_of_segment":
                    avatar.end_of_segment()
                elif kind == "clear":
                    avatar.clear_buffer()
            else:       # close, closing, error
                return

    async def _ws_output(self, ws, avatar: AvatarSession, start: Start) -> None:
        writer = FragmentedMP4Writer(avatar.size[1], avatar.size[0], avatar.fps, avatar.sample_rate) \
            if start.format == "fmp4" else None
        sent_init, video = False, None
        try:
            async for event in avatar:
                if isinstance(event, PlaybackFinished):
                    await ws.send_json({"type": "playback_finished", "segment": event.segment,
                                        "position": event.position, "interrupted": event.interrupted})
                elif isinstance(event, VideoFrame):
                    video = event
                    if writer is None:
                        await ws.send_bytes(raw_message(RAW_VIDEO, event.index, event.block, event.segment,
                                                        event.rgb.tobytes()))
                elif writer is None:
                    await ws.send_bytes(raw_message(RAW_AUDIO, event.index, video.block, video.segment, event.data))
                elif isinstance(event, AudioFrame):
                    video_bytes, audio_bytes = writer.write(video.rgb, event.pcm)
                    if video_bytes and not sent_init:
                        await ws.send_json({"type": "init", "video": writer.video_mime, "audio": writer.audio_mime})
                        sent_init = True
                    for track, data in ((FMP4_VIDEO, video_bytes), (FMP4_AUDIO, audio_bytes)):
                        if data:
                            await ws.send_bytes(bytes([track]) + data)
        finally:
            if writer is not None:
                writer.close()

    # ---- WebRTC ---------------------------------------------------------------------------------
    async def offer(self, request) -> web.Response:
        from .webrtc_offer import answer_offer

        try:
            body = await request.json()
        except json.JSONDecodeError:
            return web.json_response({"error": "bad_request", "message": "the offer must be JSON"}, status=400)
        return await answer_offer(self, body)

    async def _shutdown(self, _app) -> None:
        for peer in list(self._peers):
            await peer.close()
        for session_id in list(self.sessions):
            await self.close_session(session_id)


async def _refuse(ws, code: str, message: str, close_code: int = 1008) -> None:
    if not ws.closed:
        await ws.send_str(error(code, message))
        await ws.close(code=close_code, message=code.encode())
