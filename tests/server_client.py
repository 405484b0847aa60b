"""Helpers for the `avatar serve` tests: a server on 127.0.0.1 (a free port) and a protocol client."""
from __future__ import annotations

import contextlib
import json

import numpy as np
from aiohttp import ClientSession, WSMsgType, web

from runtime.server.app import AvatarServer
from runtime.server.protocol import RAW_AUDIO, RAW_HEADER, RAW_VIDEO


@contextlib.asynccontextmanager
async def running(server: AvatarServer):
    runner = web.AppRunner(server.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def stream_raw(url: str, speech: np.ndarray, rate: int = 16000, seed: int = 0, piece: int = 320) -> dict:
    """One session over the raw format: push `speech` in 20 ms pieces, end the segment, read until its
    playback_finished. Returns ready, frames [(index, block, segment, rgb)], audio, acks."""
    out = {"frames": [], "audio": [], "acks": []}
    async with ClientSession() as http, http.ws_connect(f"{url}/ws") as ws:
        await ws.send_json({"type": "start", "format": "raw", "sample_rate": rate, "seed": seed})
        out["ready"] = await ws.receive_json()
        h, w = out["ready"]["height"], out["ready"]["width"]
        for i in range(0, len(speech), piece):
            await ws.send_bytes(speech[i:i + piece].tobytes())
        await ws.send_json({"type": "end_of_segment"})
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                event = json.loads(msg.data)
                out["acks"].append(event)
                if event["type"] != "playback_finished":
                    break
                await ws.send_json({"type": "stop"})
                continue
            if msg.type != WSMsgType.BINARY:
                break
            kind, index, block, segment = RAW_HEADER.unpack_from(msg.data)
            payload = msg.data[RAW_HEADER.size:]
            if kind == RAW_VIDEO:
                rgb = np.frombuffer(payload, np.uint8).reshape(h, w, 3)
                out["frames"].append((index, block, None if segment < 0 else segment, rgb))
            else:
                assert kind == RAW_AUDIO
                out["audio"].append(np.frombuffer(payload, "<i2"))
    return out
