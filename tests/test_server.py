"""`avatar serve` on 127.0.0.1: the WebSocket protocol (raw frames equal to the engine's; fragmented MP4
that decodes), admission control, idle timeout, failure isolation, /health and /metrics.

The micro preset on CPU, pace=False (frames as fast as they exist); every client is bounded in time.
"""
import asyncio
import json

import numpy as np
import pytest

pytest.importorskip("aiohttp", reason="needs aiohttp: pip install -e '.[serve]' (in the test extra: "
                    "bash scripts/setup.sh)")
import av
from aiohttp import ClientSession, WSMsgType

from runtime import Engine
from runtime.media import synth_speech_like
from runtime.server.app import AvatarServer

from .server_client import running, stream_raw

SR = 16000


@pytest.fixture(scope="module")
def engine():
    return Engine.from_pretrained("micro", device="cpu")


@pytest.fixture(scope="module")
def face():
    return np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)


def pcm(seconds, seed):
    return np.round(synth_speech_like(seconds, sample_rate=SR, seed=seed) * 32767).astype(np.int16)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 90))


def oracle_frames(engine, face, seed, idle_blocks, speech):
    """What the session's engine calls were: idle blocks, the padding dropped, the speech, its tail."""
    with engine.open(face, seed=seed) as stream:
        blocks = stream.idle(idle_blocks) if idle_blocks else []
        if idle_blocks:
            stream.interrupt()
        blocks += stream.step(speech.astype(np.float32) / 32768) + stream.end_segment()
    return [f for b in blocks for f in b.frames]


def test_raw_session_frames_equal_the_engine(engine, face):
    speech = pcm(1.0, seed=2)

    async def go():
        async with running(AvatarServer(engine, face, pace=False)) as url:
            return await stream_raw(url, speech, seed=4)

    out = run(go())
    assert out["ready"]["type"] == "ready" and out["ready"]["fps"] == 16
    assert out["acks"][0] == {"type": "playback_finished", "segment": 0, "position": 1.0, "interrupted": False}
    frames = out["frames"]
    assert [f[0] for f in frames] == list(range(len(frames)))
    idle_blocks = len({b for _, b, seg, _ in frames if seg is None and b < min(b for _, b, s, _ in frames if s == 0)})
    expected = oracle_frames(engine, face, 4, idle_blocks, speech)
    assert len(frames) >= len(expected) - 12      # frames up to the ack: the speech's blocks at least
    for (_, _, _, rgb), ref in zip(frames, expected):
        np.testing.assert_array_equal(rgb, ref)
    audio = np.concatenate(out["audio"])
    start = sum(1 for f in frames if f[1] < idle_blocks) * 1000
    np.testing.assert_array_equal(audio[start:start + len(speech)], speech)


def test_fmp4_session_decodes_to_nonzero_frames(engine, face, tmp_path):
    async def go():
        async with running(AvatarServer(engine, face, pace=False)) as url, ClientSession() as http, \
                http.ws_connect(f"{url}/ws") as ws:
            await ws.send_json({"type": "start", "sample_rate": 24000})    # resampled by the server
            ready = await ws.receive_json()
            speech = np.round(synth_speech_like(1.0, sample_rate=24000, seed=3) * 32767).astype(np.int16)
            await ws.send_bytes(speech.tobytes())
            await ws.send_json({"type": "end_of_segment"})
            texts, data = [], [b"", b""]     # per track: FMP4_VIDEO, FMP4_AUDIO
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    texts.append(json.loads(msg.data))
                    if texts[-1]["type"] == "playback_finished":
                        await ws.send_json({"type": "stop"})
                elif msg.type == WSMsgType.BINARY:
                    data[msg.data[0]] += msg.data[1:]
            return ready, texts, data

    ready, texts, data = run(go())
    assert ready["format"] == "fmp4"
    assert texts[0] == {"type": "init", "video": texts[0]["video"], "audio": 'audio/mp4; codecs="mp4a.40.2"'}
    assert texts[0]["video"].startswith('video/mp4; codecs="avc1.')
    (tmp_path / "video.mp4").write_bytes(data[0])
    (tmp_path / "audio.mp4").write_bytes(data[1])
    with av.open(str(tmp_path / "video.mp4")) as container:
        packets = [p for p in container.demux(video=0) if p.dts is not None]
        assert [p.pts for p in packets] == [i * packets[1].pts for i in range(len(packets))]   # exact, no gap
    with av.open(str(tmp_path / "video.mp4")) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) >= 16 and all(f.shape == (32, 32, 3) and f.any() for f in frames)
    with av.open(str(tmp_path / "audio.mp4")) as container:
        audio = np.concatenate([f.to_ndarray().reshape(-1) for f in container.decode(audio=0)])
    assert len(audio) >= 16000 and np.abs(audio).max() > 0.05       # the (resampled) speech, AAC-coded


def test_capacity_health_and_metrics(engine, face):
    async def go():
        async with running(AvatarServer(engine, face, pace=False, max_sessions=2)) as url, ClientSession() as http:
            served = [await http.ws_connect(f"{url}/ws") for _ in range(2)]
            for ws in served:
                await ws.send_json({"type": "start", "format": "raw"})
                assert (await ws.receive_json())["type"] == "ready"
                await ws.receive()                               # an idle frame: it is streaming
            async with http.ws_connect(f"{url}/ws") as third:
                await third.send_json({"type": "start"})
                refusal = await third.receive_json()
                await third.receive()
                close_code = third.close_code
            health = await (await http.get(f"{url}/health")).json()
            metrics = await (await http.get(f"{url}/metrics")).text()
            for ws in served:
                await ws.send_json({"type": "stop"})
                await ws.close()
            return refusal, close_code, health, metrics

    refusal, close_code, health, metrics = run(go())
    assert refusal["code"] == "at_capacity" and "max_sessions=2" in refusal["message"]
    assert close_code == 1013
    assert health["sessions"] == 2 and health["max_sessions"] == 2 and health["status"] == "ok"
    assert "avatar_sessions 2\n" in metrics and "avatar_refused_total 1\n" in metrics
    assert 'avatar_block_latency_seconds{quantile="0.99"}' in metrics and "avatar_queue_depth_frames" in metrics


def test_bad_start_and_idle_timeout_get_clear_errors(engine, face):
    async def go():
        server = AvatarServer(engine, face, pace=False, idle_timeout=0.5)
        async with running(server) as url, ClientSession() as http:
            answers = []
            for start in ({"type": "hello"}, {"type": "start", "format": "webm"}, {"type": "start", "image": "!!"}):
                async with http.ws_connect(f"{url}/ws") as ws:
                    await ws.send_json(start)
                    answers.append(await ws.receive_json())
            async with http.ws_connect(f"{url}/ws") as ws:
                await ws.send_json({"type": "start", "format": "raw"})
                async for msg in ws:
                    if msg.type == WSMsgType.TEXT and json.loads(msg.data)["type"] == "error":
                        answers.append(json.loads(msg.data))
            for _ in range(100):            # the server closes the session right after the socket
                if not server.sessions:
                    break
                await asyncio.sleep(0.02)
            return answers, len(server.sessions)

    answers, left = run(go())
    assert [a["code"] for a in answers] == ["bad_request"] * 3 + ["idle_timeout"]
    assert "first message" in answers[0]["message"] and "format" in answers[1]["message"]
    assert "base64" in answers[2]["message"]
    assert left == 0


def test_a_failed_session_ends_alone_and_the_others_go_on(engine, face, monkeypatch):
    """Two sessions at once; the first block 1 to be planned fails: that session gets session_failed,
    the other plays its utterance to the end, and the server takes new sessions."""
    real_audio = engine.family.stage_audio
    failed = []

    def audio_stage(s, w):
        if w.index == 1 and not failed:
            failed.append(s)
            raise RuntimeError("CUDA out of memory (simulated)")
        real_audio(s, w)

    monkeypatch.setattr(engine.family, "stage_audio", audio_stage)

    async def go():
        server = AvatarServer(engine, face, pace=False)
        async with running(server) as url, ClientSession() as http:
            both = await asyncio.gather(stream_raw(url, pcm(2.0, seed=5)), stream_raw(url, pcm(2.0, seed=6)))
            again = await stream_raw(url, pcm(0.5, seed=7))
            return both, again, await (await http.get(f"{url}/metrics")).text()

    both, again, metrics = run(go())
    kinds = sorted(out["acks"][0].get("code", out["acks"][0]["type"]) for out in both)
    assert kinds == ["playback_finished", "session_failed"]
    failure = next(out["acks"][0] for out in both if out["acks"][0]["type"] == "error")
    assert "out of memory" in failure["message"]
    assert again["acks"][0]["type"] == "playback_finished" and again["frames"]
    assert "avatar_failed_total 1\n" in metrics
