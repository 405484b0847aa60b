"""`avatar serve` driven by a real headless Chromium (Debian's `chromium` package) over the DevTools
protocol: the page at / streams a wav over the WebSocket protocol and plays the fragmented MP4 it gets
back in a MediaSource; the test checks that frames were decoded and are not black, and saves a
screenshot (AVATAR_SCREENSHOT=path keeps it). Skips without chromium (`apt-get install chromium`).
~10 s.
"""
import asyncio
import base64
import io
import json
import os
import shutil
import subprocess
import tempfile
import wave
from pathlib import Path

import numpy as np
import pytest
from aiohttp import ClientSession

from runtime import Engine
from runtime.media import synth_speech_like
from runtime.server.app import AvatarServer

from .server_client import running

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium: apt-get install chromium"),
              pytest.mark.wallclock]  # a real-time stream played by a browser (pyproject: markers)

STATS_JS = """(() => {
  const v = document.getElementById("avatar"), s = window.avatarStats;
  const c = document.createElement("canvas"); c.width = v.videoWidth || 1; c.height = v.videoHeight || 1;
  c.getContext("2d").drawImage(v, 0, 0);
  const px = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
  let sum = 0; for (let i = 0; i < px.length; i += 4) sum += px[i] + px[i + 1] + px[i + 2];
  const q = v.getVideoPlaybackQuality();
  return JSON.stringify({state: s.state, bytes: s.bytes, mime: s.mime, error: s.error,
    supported: s.mime ? s.mime.every(m => MediaSource.isTypeSupported(m)) : null, decoded: q.totalVideoFrames,
    width: v.videoWidth, time: v.currentTime, pixel_sum: sum, ready: v.readyState, paused: v.paused,
    buffered: Array.from({length: v.buffered.length}, (_, i) => [v.buffered.start(i), v.buffered.end(i)]),
    acks: s.events.filter(e => e.type === "playback_finished").length});
})()"""


def wav_bytes(seconds: float, rate: int = 16000) -> bytes:
    pcm = np.round(synth_speech_like(seconds, sample_rate=rate, seed=9) * 32767).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return buf.getvalue()


class DevTools:
    """The few DevTools protocol calls the test needs, over one page's WebSocket."""

    def __init__(self, ws):
        self.ws, self.next_id = ws, 0

    async def call(self, method: str, **params):
        self.next_id += 1
        await self.ws.send_json({"id": self.next_id, "method": method, "params": params})
        while True:
            msg = json.loads((await self.ws.receive()).data)
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    async def evaluate(self, expression: str, await_promise: bool = False):
        result = await self.call("Runtime.evaluate", expression=expression, awaitPromise=await_promise,
                                 returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page error: {result['exceptionDetails']}")
        return result["result"].get("value")


async def devtools_port(profile: Path, proc) -> int:
    for _ in range(300):
        port_file = profile / "DevToolsActivePort"
        if port_file.exists() and port_file.read_text().strip():
            return int(port_file.read_text().split()[0])
        if proc.returncode is not None:
            raise RuntimeError(f"chromium exited with {proc.returncode}")
        await asyncio.sleep(0.1)
    raise TimeoutError("chromium did not open its DevTools port")


def test_browser_page_streams_a_wav_and_shows_the_avatar(tmp_path):
    engine = Engine.from_pretrained("micro", device="cpu")
    face = np.random.default_rng(3).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    audio = base64.b64encode(wav_bytes(2.0)).decode()

    async def browse():
        async with running(AvatarServer(engine, face)) as url:
            with tempfile.TemporaryDirectory() as profile:
                proc = await asyncio.create_subprocess_exec(
                    CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                     "--autoplay-policy=no-user-gesture-required", "--remote-debugging-address=127.0.0.1",
                     "--remote-debugging-port=0", f"--user-data-dir={profile}", "about:blank",
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                try:
                    port = await devtools_port(Path(profile), proc)
                    async with ClientSession() as http:
                        pages = await (await http.get(f"http://127.0.0.1:{port}/json/list")).json()
                        page = next(p for p in pages if p["type"] == "page")
                        async with http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                            return await drive(DevTools(ws), url, audio)
                finally:
                    proc.terminate()
                    await asyncio.wait_for(proc.wait(), 10)

    async def drive(tools, url, audio):
        await tools.call("Page.enable")
        await tools.call("Page.navigate", url=url + "/")
        for _ in range(100):
            if await tools.evaluate("typeof window.avatarPlayBase64 === 'function'"):
                break
            await asyncio.sleep(0.1)
        await tools.evaluate(f"avatarPlayBase64('{audio}')", await_promise=True)   # real time: 2 s
        stats = {}
        for _ in range(100):
            stats = json.loads(await tools.evaluate(STATS_JS))
            if stats["acks"] and stats["decoded"] >= 24 and stats["pixel_sum"] > 0:
                break
            await asyncio.sleep(0.1)
        shot = await tools.call("Page.captureScreenshot", format="png")
        return stats, base64.b64decode(shot["data"])

    stats, png = asyncio.run(asyncio.wait_for(browse(), 90))
    (tmp_path / "page.png").write_bytes(png)
    if os.environ.get("AVATAR_SCREENSHOT"):
        Path(os.environ["AVATAR_SCREENSHOT"]).write_bytes(png)
    assert stats["error"] is None and stats["supported"], stats
    assert stats["bytes"] > 0 and stats["width"] == 32, stats
    assert stats["decoded"] >= 24, stats            # frames decoded by the browser's H.264 decoder
    assert stats["pixel_sum"] > 0, stats            # and they are not black
    assert stats["acks"] == 1, stats                # the wav's utterance was played to its end
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
