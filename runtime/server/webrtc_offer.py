"""POST /offer: a WebRTC session of `avatar serve` (aiortc), admitted like a WebSocket session.

Body: {"sdp": ..., "type": "offer", "seed": 0}. The answer carries the avatar's audio and video tracks
(runtime/integrations/webrtc.py); the peer's audio track, if it sends one, is the avatar's input. The
session ends when the connection fails or closes.
"""
from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from ..errors import AtCapacityError
from ..integrations.webrtc import AvatarTracks, feed_track
from .protocol import ProtocolError, Start

log = logging.getLogger(__name__)


def _parse_offer(body) -> tuple[str, int]:
    if not isinstance(body, dict) or body.get("type") != "offer" or not isinstance(body.get("sdp"), str):
        raise ProtocolError('the body must be {"sdp": "...", "type": "offer"}')
    return body["sdp"], Start(seed=body.get("seed", 0)).seed


async def answer_offer(server, body) -> web.Response:
    from aiortc import RTCPeerConnection, RTCSessionDescription

    try:
        sdp, seed = _parse_offer(body)
        session_id, avatar = await server.open_session(Start(seed=seed))
    except ProtocolError as exc:
        return web.json_response({"error": "bad_request", "message": str(exc)}, status=400)
    except AtCapacityError as exc:
        return web.json_response({"error": "at_capacity", "message": str(exc)}, status=503)
    pc = RTCPeerConnection()
    server._peers.add(pc)
    tracks = AvatarTracks(avatar)
    tasks = [asyncio.create_task(tracks.run())]

    async def end() -> None:
        server._peers.discard(pc)
        for task in tasks:
            task.cancel()
        await server.close_session(session_id)
        await pc.close()

    @pc.on("track")
    def on_track(track) -> None:
        if track.kind == "audio":
            tasks.append(asyncio.create_task(feed_track(track, avatar)))

    @pc.on("connectionstatechange")
    async def on_state() -> None:
        if pc.connectionState in ("failed", "closed"):
            await end()

    try:
        await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
        pc.addTrack(tracks.audio)
        pc.addTrack(tracks.video)
        await pc.setLocalDescription(await pc.createAnswer())
    except Exception as exc:  # noqa: BLE001 - a malformed SDP fails this peer only
        await end()
        return web.json_response({"error": "bad_request", "message": f"bad offer: {exc}"}, status=400)
    return web.json_response({"sdp": pc.localDescription.sdp, "type": pc.localDescription.type,
                              "session": session_id})
