"""Scale-out on Ray Serve: one replica per GPU, each an engine with `max_sessions` sessions, speaking
the WebSocket protocol of `avatar serve` (runtime/server/protocol.py) at /ws.

    from ray import serve
    from runtime.integrations.ray_serve import avatar_app
    serve.run(avatar_app("livetalk-1.3b", num_replicas=8, max_sessions=4))   # 8 GPUs, 32 sessions

Routing: a session is one WebSocket connection, so it stays on the replica that accepted it for its
lifetime (its engine state lives there). Ray Serve's router sends a new connection to a replica with
fewer than `max_ongoing_requests` (= `max_sessions`) open connections. When every replica is full, a
new connection is QUEUED by Ray (its WebSocket handshake waits) until a session ends anywhere, up to
`max_queued_requests` waiting connections (Ray allows no 0: at least 1, or -1 for no limit); past
that Ray refuses the handshake (HTTP 500 for a WebSocket in Ray 2.60, 503 for plain HTTP). A replica
asked for more sessions than its engine holds
would answer "at capacity" itself (close code 1013), as `avatar serve` does.
"""
# No `from __future__ import annotations`: FastAPI reads the route's `websocket: WebSocket` annotation at
# run time, and a string annotation naming a function-local import does not resolve (FastAPI then
# closes the socket with 1008 before the handler runs).
import asyncio

import numpy as np

from ..server.app import AvatarServer
from ..server.ws_session import serve_socket


class StarletteSocket:
    """A Starlette/FastAPI WebSocket as the socket `serve_socket` talks to."""

    def __init__(self, ws):
        self.ws = ws
        self.closed = False

    async def receive(self, timeout: float) -> tuple[str, str | bytes | None]:
        message = await asyncio.wait_for(self.ws.receive(), timeout)
        while message["type"] == "websocket.connect":   # Ray's proxy may relay the handshake message too
            message = await asyncio.wait_for(self.ws.receive(), timeout)
        if message["type"] == "websocket.disconnect":
            self.closed = True
            return "close", None
        if message.get("text") is not None:
            return "text", message["text"]
        return "binary", message.get("bytes") or b""

    async def send_text(self, text: str) -> None:
        await self.ws.send_text(text)

    async def send_bytes(self, data: bytes) -> None:
        await self.ws.send_bytes(data)

    async def close(self, code: int = 1000, reason: str = "") -> None:
        if not self.closed:
            self.closed = True
            await self.ws.close(code=code, reason=reason)


def avatar_app(preset_or_dir: str, *, num_replicas: int = 1, max_sessions: int = 4, num_gpus: float = 1.0,
               max_queued_requests: int = 4, device: str | None = None, face: np.ndarray | None = None,
               pace: bool = True, idle_timeout: float = 120.0):
    """A Ray Serve application: `num_replicas` replicas (one GPU each with num_gpus=1; 0 on CPU)."""
    from fastapi import FastAPI, WebSocket
    from ray import serve

    api = FastAPI()

    @serve.deployment(num_replicas=num_replicas, max_ongoing_requests=max_sessions,
                      max_queued_requests=max_queued_requests, ray_actor_options={"num_gpus": num_gpus})
    @serve.ingress(api)
    class AvatarReplica:
        def __init__(self):
            from runtime import Engine
            from runtime.media import synthetic_face

            engine = Engine.from_pretrained(preset_or_dir, device=device, max_sessions=max_sessions)
            image = synthetic_face(*engine.size) if face is None else face
            self.server = AvatarServer(engine, image, max_sessions=max_sessions, pace=pace,
                                       idle_timeout=idle_timeout)

        @api.websocket("/ws")
        async def ws(self, websocket: WebSocket) -> None:
            await websocket.accept()
            await serve_socket(self.server, StarletteSocket(websocket))

        @api.get("/health")
        async def health(self) -> dict:
            return {"status": "ok", "sessions": len(self.server.sessions), "max_sessions": self.server.max_sessions}

    return AvatarReplica.bind()
