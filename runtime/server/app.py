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

import json
import logging
import uuid
from importlib import resources

import numpy as np
from aiohttp import WSMsgType, web

from ..errors import AtCapacityError
from ..realtime import AvatarSession
from .metrics import Metrics
from .protocol import Start
from .ws_session import serve_socket

log = logging.getLogger(__name__)


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
        await serve_socket(self, AiohttpSocket(ws))
        return ws

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



class AiohttpSocket:
    """aiohttp's WebSocketResponse as the socket `serve_socket` talks to."""

    def __init__(self, ws: web.WebSocketResponse):
        self.ws = ws

    @property
    def closed(self) -> bool:
        return self.ws.closed

    async def receive(self, timeout: float) -> tuple[str, str | bytes | None]:
        msg = await self.ws.receive(timeout=timeout)
        if msg.type == WSMsgType.TEXT:
            return "text", msg.data
        if msg.type == WSMsgType.BINARY:
            return "binary", msg.data
        return "close", None

    async def send_text(self, text: str) -> None:
        await self.ws.send_str(text)

    async def send_bytes(self, data: bytes) -> None:
        await self.ws.send_bytes(data)

    async def close(self, code: int = 1000, reason: str = "") -> None:
        await self.ws.close(code=code, message=reason.encode())
