"""Engine behaviour: chunking invariance, the offline oracle end to end, bad input, flush."""
import numpy as np
import pytest

from runtime import Engine
from runtime.media import synth_speech_like

SR = 16000


@pytest.fixture(scope="module")
def engine():
    return Engine.from_pretrained("tiny", device="cpu")


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(80, 72, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def speech():
    return synth_speech_like(3.2, sample_rate=SR, seed=3).astype(np.float32)


def run(engine, image, audio, chunks, seed=7):
    engine.reset(image, seed=seed)
    blocks = []
    pos = 0
    for n in chunks:
        blocks += engine.step(audio[pos:pos + n])
        pos += n
    assert pos == len(audio)
    return blocks + engine.flush()


def test_blocks_cover_the_audio(engine, image, speech):
    cfg = engine.config
    blocks = run(engine, image, speech, [len(speech)])
    assert [b.index for b in blocks] == list(range(len(blocks)))
    assert blocks[0].frames.shape == (9, cfg.height, cfg.width, 3)
    assert all(b.frames.shape[0] == 12 for b in blocks[1:])
    assert all(b.frames.dtype == np.uint8 for b in blocks)
    n_frames = sum(b.num_frames for b in blocks)
    spf = cfg.samples_per_video_frame
    assert n_frames * spf >= len(speech) > (n_frames - 12) * spf
    for b in blocks:
        assert b.pts == pytest.approx(b.first_frame / cfg.fps)
        assert len(b.audio) == b.num_frames * spf
    joined = np.concatenate([b.audio for b in blocks])
    np.testing.assert_array_equal(joined[: len(speech)], speech)
    assert not joined[len(speech):].any()  # flush padded with silence only


def test_chunking_invariance(engine, image, speech):
    whole = run(engine, image, speech, [len(speech)])
    rng = np.random.default_rng(11)
    sizes, left = [], len(speech)
    while left:
        sizes.append(min(left, int(rng.integers(1, 5000))))
        left -= sizes[-1]
    for chunks in ([320] * (len(speech) // 320) + [len(speech) % 320], sizes):
        chunks = [c for c in chunks if c]
        other = run(engine, image, speech, chunks)
        assert len(other) == len(whole)
        for a, b in zip(whole, other):
            np.testing.assert_array_equal(a.frames, b.frames)


def test_seed_changes_frames(engine, image, speech):
    a = run(engine, image, speech[:20000], [20000], seed=1)
    b = run(engine, image, speech[:20000], [20000], seed=2)
    assert any((x.frames != y.frames).any() for x, y in zip(a, b))


def test_blocks_arrive_as_soon_as_audio_allows(engine, image, speech):
    cfg = engine.config
    engine.reset(image, seed=0)
    spf = cfg.samples_per_video_frame
    look = cfg.audio.window_frames(cfg.fps)[1] * spf
    need0 = cfg.video_frames_in_block(0) * spf + look
    assert engine.step(speech[: need0 - 1]) == [] and engine.next_block == 0
    got = engine.step(speech[need0 - 1: need0])
    assert engine.next_block == 1                       # planned (maybe still in flight) at once
    assert len(got + engine.drain()) == 1


BAD_INPUTS = [
    (np.full(800, np.nan, np.float32), SR, "NaN"),
    (np.full(800, np.inf, np.float32), SR, "Inf|finite"),
    (np.full(800, 1.5, np.float32), SR, r"\[-1, 1\]|outside"),
    (np.zeros((800, 2), np.float32), SR, "stereo|mono|shape"),
    (np.zeros(800, np.float64), SR, "float64|dtype"),
    (np.zeros(800, np.int32), SR, "int32|dtype"),
    (np.zeros(800, np.float32), 44100, "44100|sample rate"),
    ([0.0] * 800, SR, "numpy|ndarray|list"),
]


def test_bad_audio_is_rejected_and_state_unchanged(engine, image, speech):
    """Every kind of bad chunk, refused in turn mid-stream: the stream's frames are those of the
    stream that never saw them (one stream for all eight, not one each: the suite's time)."""
    good = speech[:30000]
    clean = run(engine, image, good, [10000, 20000])
    engine.reset(image, seed=7)
    blocks = engine.step(good[:10000])
    for chunk, rate, pattern in BAD_INPUTS:
        with pytest.raises(ValueError, match=pattern):
            engine.step(chunk, sample_rate=rate)
    blocks += engine.step(good[10000:]) + engine.flush()
    assert len(blocks) == len(clean)
    for a, b in zip(clean, blocks):
        np.testing.assert_array_equal(a.frames, b.frames)


def test_int16_audio_equals_float(engine, image, speech):
    pcm = np.round(speech[:20000] * 32767).astype(np.int16)
    a = run(engine, image, pcm, [len(pcm)])
    b = run(engine, image, pcm.astype(np.float32) / 32768.0, [len(pcm)])
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.frames, y.frames)


def test_empty_chunk_is_noop(engine, image):
    engine.reset(image)
    assert engine.step(np.zeros(0, np.float32)) == []
    assert engine.step(np.zeros(0, np.int16)) == []


@pytest.mark.parametrize("bad", [np.zeros((2, 8, 8, 3), np.uint8), np.zeros((8, 8, 3), np.float32), "missing.png", 3])
def test_bad_image_is_rejected_and_session_kept(engine, image, speech, bad):
    a = run(engine, image, speech[:20000], [20000])
    engine.reset(image, seed=7)
    first = engine.step(speech[:10000])
    with pytest.raises((ValueError, TypeError, FileNotFoundError)):
        engine.reset(bad)
    rest = engine.step(speech[10000:20000]) + engine.flush()
    for x, y in zip(a, first + rest):
        np.testing.assert_array_equal(x.frames, y.frames)


def test_bad_prompt_embeds(engine, image):
    with pytest.raises(ValueError, match="prompt_embeds"):
        engine.reset(image, prompt_embeds=np.zeros((3, 5), np.float32))


def test_step_before_reset_and_after_flush():
    eng = Engine.from_pretrained("tiny", device="cpu")
    with pytest.raises(RuntimeError, match="reset"):
        eng.step(np.zeros(100, np.float32))
    eng.reset(np.zeros((64, 64, 3), np.uint8))
    eng.flush()
    with pytest.raises(RuntimeError, match="flushed"):
        eng.step(np.zeros(100, np.float32))


def test_frames_are_copies(engine, image, speech):
    blocks = run(engine, image, speech[:30000], [30000])
    before = [b.frames.copy() for b in blocks]
    engine.reset(image, seed=99)
    engine.step(speech[:30000])
    for b, f in zip(blocks, before):
        np.testing.assert_array_equal(b.frames, f)


def test_idle_emits_silent_blocks(engine, image):
    engine.reset(image, seed=1)
    blocks = engine.idle(2)
    assert [b.index for b in blocks] == [0, 1]
    assert all(not b.audio.any() for b in blocks)
    assert [b.index for b in engine.idle()] == [2]


def test_interrupt_drops_queued_audio_and_continues(engine, image, speech):
    cfg = engine.config
    spf = cfg.samples_per_video_frame
    n0 = cfg.video_frames_in_block(0) * spf
    engine.reset(image, seed=4)
    first = engine.step(speech[:15000]) + engine.drain()  # block 0 ready; 6000 samples of block 1 queued
    assert [b.index for b in first] == [0]
    assert engine.interrupt() == 15000 - n0
    assert engine.interrupt() == 0
    # the next audio drives block 1 from its first frame: the dropped samples are gone
    rest = engine.step(speech[20000:40000]) + engine.drain()
    assert [b.index for b in rest][:1] == [1]
    np.testing.assert_array_equal(rest[0].audio, speech[20000:20000 + rest[0].num_frames * spf])
    assert rest[0].first_frame == cfg.video_frames_in_block(0)


def test_other_rates_need_explicit_resampling(engine, image, speech):
    import soxr

    audio24 = soxr.resample(speech[:32000], SR, 24000).clip(-1, 1).astype(np.float32)
    engine.reset(image, seed=2)
    with pytest.raises(ValueError, match="24000"):
        engine.step(audio24, sample_rate=24000)
    whole = engine.step(audio24, sample_rate=24000, resample=True) + engine.flush()
    engine.reset(image, seed=2)
    parts = []
    for i in range(0, len(audio24), 480):   # 20 ms chunks at 24 kHz
        parts += engine.step(audio24[i:i + 480], sample_rate=24000, resample=True)
    parts += engine.flush()
    assert len(whole) == len(parts) >= 2
    for a, b in zip(whole, parts):
        np.testing.assert_array_equal(a.frames, b.frames)
    engine.reset(image, seed=2)
    engine.step(audio24[:4800], sample_rate=24000, resample=True)
    with pytest.raises(ValueError, match="changed mid-stream"):
        engine.step(audio24[:4410], sample_rate=22050, resample=True)


def test_end_segment_covers_the_utterance_and_the_stream_goes_on(engine, image, speech):
    cfg = engine.config
    spf = cfg.samples_per_video_frame
    engine.reset(image, seed=5)
    first = engine.step(speech[:15000]) + engine.drain()   # block 0 ready, block 1 partly pushed
    assert engine.next_block == 1 and engine.pending_samples == 15000 - cfg.video_frames_in_block(0) * spf
    tail = engine.end_segment()
    # every pushed sample is now inside a block; what follows the speech in that block is silence
    assert [b.index for b in tail] == [1] and engine.pending_samples == 0 and engine.next_block == 2
    covered = np.concatenate([b.audio for b in first + tail])
    np.testing.assert_array_equal(covered[:15000], speech[:15000])
    assert not covered[15000:].any()
    assert engine.end_segment() == []                       # nothing pending: nothing to do
    # the next utterance starts exactly at block 2's first frame (no queued silence before it)
    nxt = engine.step(speech[20000:40000]) + engine.drain()
    assert [b.index for b in nxt][:1] == [2]
    assert nxt[0].first_frame == cfg.first_video_frame(2)
    np.testing.assert_array_equal(nxt[0].audio, speech[20000:20000 + nxt[0].num_frames * spf])


def test_end_segment_flushes_the_resampler(engine, image, speech):
    import soxr

    audio24 = soxr.resample(speech[:16000], SR, 24000).clip(-1, 1).astype(np.float32)
    engine.reset(image, seed=6)
    engine.step(audio24, sample_rate=24000, resample=True)
    engine.end_segment()
    assert engine.pending_samples == 0
    # a fresh delay line: another rate is fine after the segment ended
    engine.step(audio24[:4410], sample_rate=22050, resample=True)
