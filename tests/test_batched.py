"""BatchedEngine: N sessions in lockstep against N single-session Engines (micro preset, CPU).

Tolerance, batched vs single: frames may differ by at most 1 grey level in under 0.1% of values.
The per-row computation is the same, but a batched fp32 matmul may block and sum its reduction in
another order than a batch-1 one, so latents differ by float rounding that can flip a uint8
rounding. Batched vs batched (same rounds, other chunking or a refused call in between) is exact.
"""
import numpy as np
import pytest

from runtime import Engine, EngineConfig
from runtime.audio import AudioBufferFull, AudioInputError
from runtime.batched import BatchedEngine
from runtime.engine import samples_to_run
from runtime.media import synth_speech_like

SR = 16000
N = 3


@pytest.fixture(scope="module")
def cfg():
    return EngineConfig.from_preset("micro")


@pytest.fixture(scope="module")
def engine(cfg):
    return Engine.random(cfg, device="cpu", seed=0)


@pytest.fixture(scope="module")
def batched(engine):
    return BatchedEngine(engine, sessions=N)


@pytest.fixture(scope="module")
def inputs(cfg):
    """Per session: different image (size too), speech, prompt embedding (length too) and seed."""
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (40 + 8 * i, 36, 3), dtype=np.uint8) for i in range(N)]
    speech = [synth_speech_like(4.6 + 0.3 * i, sample_rate=SR, seed=10 + i).astype(np.float32) for i in range(N)]
    prompts = [rng.standard_normal((2 + i, cfg.dit.text_dim)).astype(np.float32) for i in range(N)]
    return images, speech, prompts, [5, 6, 7]


@pytest.fixture(scope="module")
def reference(engine, inputs):
    """Each session alone through the single-session Engine."""
    images, speech, prompts, seeds = inputs
    out = []
    for i in range(N):
        engine.reset(images[i], prompts[i], seeds[i])
        out.append(engine.step(speech[i]) + engine.flush())
    return out


def reset_all(be, inputs, slots=range(N)):
    images, _, prompts, seeds = inputs
    for i in slots:
        be.reset(i, images[i], prompts[i], seeds[i])


def gather(into, got):
    for i, blocks in got.items():
        into.setdefault(i, []).extend(blocks)
    return into


def interleaved(be, speech, sizes_seed):
    """Every step call carries the next chunk of each unfinished session; chunk sizes differ per session."""
    rng = np.random.default_rng(sizes_seed)
    pos, out = [0] * len(speech), {}
    while any(p < len(a) for p, a in zip(pos, speech)):
        chunks = {}
        for i, a in enumerate(speech):
            if pos[i] < len(a):
                n = int(rng.integers(1, 6000))
                chunks[i] = a[pos[i]:pos[i] + n]
                pos[i] += n
        gather(out, be.step(chunks))
    return gather(out, be.flush())


def assert_matches_single(single, got):
    """Same blocks, timeline and audio; frames within the batching tolerance (module docstring)."""
    assert [b.index for b in got] == [b.index for b in single]
    differing = total = 0
    for a, b in zip(single, got):
        assert (a.first_frame, a.pts) == (b.first_frame, b.pts)
        np.testing.assert_array_equal(a.audio, b.audio)
        assert a.frames.shape == b.frames.shape
        diff = np.abs(a.frames.astype(np.int16) - b.frames.astype(np.int16))
        assert diff.max() <= 1, f"block {a.index}: {diff.max()} grey levels apart"
        differing += int((diff > 0).sum())
        total += diff.size
    assert differing < 1e-3 * total, f"{differing} of {total} values differ"


def assert_equal_blocks(a_blocks, b_blocks):
    assert [b.index for b in a_blocks] == [b.index for b in b_blocks]
    for a, b in zip(a_blocks, b_blocks):
        np.testing.assert_array_equal(a.frames, b.frames)
        np.testing.assert_array_equal(a.audio, b.audio)


@pytest.fixture(scope="module")
def whole(batched, inputs):
    """All sessions' audio in one step call."""
    reset_all(batched, inputs)
    return gather(gather({}, batched.step(dict(enumerate(inputs[1])))), batched.flush())


def test_sessions_equal_single_engines(batched, inputs, reference, cfg):
    reset_all(batched, inputs)
    got = interleaved(batched, inputs[1], sizes_seed=1)
    for i in range(N):
        assert len(reference[i]) >= 6
        # past the KV window: eviction of the rolling region happened
        assert len(reference[i]) * cfg.cache.block_frames > cfg.cache.window_frames
        assert_matches_single(reference[i], got[i])
    # rows really differ, so a row mix-up would fail the comparison above
    assert (got[0][3].frames != got[1][3].frames).mean() > 0.5


def test_chunking_invariance_per_session(batched, inputs, whole):
    reset_all(batched, inputs)
    got = interleaved(batched, inputs[1], sizes_seed=2)
    for i in range(N):
        assert_equal_blocks(whole[i], got[i])


def test_late_joiner_runs_its_block_0_beside_others(batched, inputs, reference):
    """Slot 2 is reset while 0 and 1 are at block 3: rows at different block indices share rounds."""
    _, speech, _, _ = inputs
    reset_all(batched, inputs, slots=[0, 1])
    cut = 40000
    first = batched.step({0: speech[0][:cut], 1: speech[1][:cut]})
    assert [b.index for b in first[0]] == [0, 1, 2]
    reset_all(batched, inputs, slots=[2])
    assert batched.waiting_for() == [0, 1, 2]  # 0 and 1 lack the rest of block 3, 2 everything
    mixed = batched.step({0: speech[0][cut:], 1: speech[1][cut:], 2: speech[2]})
    assert mixed[2][0].index == 0 and mixed[0][0].index == 3  # the same round
    got = gather(gather(first, mixed), batched.flush())
    for i in range(N):
        assert_matches_single(reference[i], got[i])


def test_fill_idle_pads_the_lagging_session(batched, engine, inputs, reference, cfg):
    images, speech, prompts, seeds = inputs
    reset_all(batched, inputs)
    cut = samples_to_run(cfg, 2)  # blocks 0..2 of sessions 0 and 1; nothing from session 2
    assert batched.step({0: speech[0][:cut], 1: speech[1][:cut]}) == {}
    assert batched.waiting_for() == [2]
    got = batched.step({}, fill_idle=True)
    assert sorted(got) == [0, 1, 2]
    for i in (0, 1):
        assert_matches_single(reference[i][:3], got[i])
    assert [b.index for b in got[2]] == [0, 1, 2]
    assert all(b.audio.shape == (b.num_frames * cfg.samples_per_video_frame,) and not b.audio.any()
               for b in got[2])
    engine.reset(images[2], prompts[2], seeds[2])
    assert_matches_single(engine.idle(3), got[2])  # the listening avatar = Engine.idle
    # once session 2 speaks, all three go on together
    more = batched.step({0: speech[0][cut:cut + 12000], 1: speech[1][cut:cut + 12000], 2: speech[2][:12000]},
                        fill_idle=True)
    assert sorted(more) == [0, 1, 2] and all(b[0].index == 3 for b in more.values())


BAD_CHUNKS = [
    (np.array([0.0, np.nan] * 400, np.float32), "NaN"),
    (np.full(800, 1.5, np.float32), r"\[-1, 1\]"),
    (np.zeros((800, 2), np.float32), "mono"),
    (np.zeros(800, np.float64), "dtype"),
    ([0.0] * 800, "numpy"),
]


def test_bad_chunk_names_the_session_and_changes_nothing(batched, inputs, whole):
    _, speech, _, _ = inputs
    reset_all(batched, inputs)
    out = gather({}, batched.step({i: speech[i][:20000] for i in range(N)}))
    for bad, pattern in BAD_CHUNKS:  # each refused call must leave every session as it was
        with pytest.raises(AudioInputError, match=f"^session 1: .*{pattern}") as err:
            batched.step({0: speech[0][20000:30000], 1: bad, 2: speech[2][20000:30000]})
        assert err.value.session == 1
        assert all(batched.queued_samples(i) == 0 for i in range(N))
    gather(out, batched.step({i: speech[i][20000:] for i in range(N)}))
    gather(out, batched.flush())
    for i in range(N):
        assert_equal_blocks(whole[i], out[i])


def test_bad_reset_and_bad_slots_change_nothing(batched, inputs, whole):
    _, speech, _, _ = inputs
    reset_all(batched, inputs)
    out = gather({}, batched.step({i: speech[i][:20000] for i in range(N)}))
    with pytest.raises(ValueError, match="^session 1: ") as err:
        batched.reset(1, np.zeros((2, 8, 8, 3), np.uint8))
    assert err.value.session == 1
    with pytest.raises(ValueError, match="^session 2: prompt_embeds"):
        batched.reset(2, inputs[0][2], prompt_embeds=np.zeros((3, 5), np.float32))
    with pytest.raises(IndexError, match="session 3"):
        batched.step({3: speech[0][:100]})
    with pytest.raises(IndexError, match="session -1"):
        batched.interrupt(-1)
    gather(out, batched.step({i: speech[i][20000:] for i in range(N)}))
    gather(out, batched.flush())
    for i in range(N):
        assert_equal_blocks(whole[i], out[i])
    with pytest.raises(RuntimeError, match="^session 0: this stream was flushed"):
        batched.step({0: speech[0][:100]})


def test_unused_slot_and_single_slot_flush(engine, inputs, reference):
    """Slot 1 never reset: it holds nobody back, its row runs zeros; audio for it is refused."""
    _, speech, _, _ = inputs
    be = BatchedEngine(engine, sessions=2)
    reset_all(be, inputs, slots=[0])
    with pytest.raises(RuntimeError, match=r"^session 1: call reset\(1"):
        be.step([speech[0][:100], speech[1][:100]])
    got = gather(gather({}, be.step([speech[0], None])), be.flush(0))
    assert sorted(got) == [0]
    assert_matches_single(reference[0], got[0])
    assert be.live == []


def test_interrupt_drops_one_sessions_queued_audio(batched, engine, inputs, reference, cfg):
    images, speech, prompts, seeds = inputs
    spf = cfg.samples_per_video_frame
    reset_all(batched, inputs)
    cut = samples_to_run(cfg, 2) + 5000
    got = gather({}, batched.step({i: speech[i][:cut] for i in range(N)}))
    assert all([b.index for b in got[i]] == [0, 1, 2] for i in range(N))
    assert batched.interrupt(1) == cut - cfg.first_video_frame(3) * spf
    assert batched.interrupt(1) == 0
    resume = cut + 8000
    gather(got, batched.step({0: speech[0][cut:], 1: speech[1][resume:], 2: speech[2][cut:]}))
    gather(got, batched.flush())
    engine.reset(images[1], prompts[1], seeds[1])
    alone = engine.step(speech[1][:cut])
    engine.interrupt()
    alone += engine.step(speech[1][resume:]) + engine.flush()
    assert_matches_single(alone, got[1])
    for i in (0, 2):
        assert_matches_single(reference[i], got[i])


def test_interrupt_drops_audio_waiting_for_the_lockstep(batched, inputs, cfg):
    _, speech, _, _ = inputs
    reset_all(batched, inputs)
    cut = samples_to_run(cfg, 4)  # more than the audio ring holds: part of it waits in the queue
    assert batched.step({0: speech[0][:cut], 1: speech[1][:cut]}) == {}
    assert batched.queued_samples(0) > 0
    assert batched.interrupt(0) == cut
    assert batched.queued_samples(0) == 0 and batched.waiting_for() == [0, 2]


def test_lead_cap_refuses_runaway_pushes(engine, inputs):
    _, speech, _, _ = inputs
    be = BatchedEngine(engine, sessions=2, max_lead_s=1.0)
    reset_all(be, inputs, slots=[0, 1])
    with pytest.raises(AudioBufferFull, match=r"^session 0: .*lead session\(s\) \[1\]") as err:
        be.step({0: speech[0][:24000]})
    assert err.value.session == 0 and be.queued_samples(0) == 0
    fed_alike = be.step({0: speech[0][:40000], 1: speech[1][:40000]})  # long chunks, no lead
    assert [b.index for b in fed_alike[0]] == [0, 1, 2]
    padded = be.step({0: speech[0][40000:64000]}, fill_idle=True)  # the laggard is padded instead
    assert [b.index for b in padded[1]] == [3, 4]
    block3 = padded[1][0].audio  # samples 33000..45000: its own speech up to 40000, then silence
    np.testing.assert_array_equal(block3[:7000], speech[1][33000:40000])
    assert not block3[7000:].any() and not padded[1][1].audio.any()


def test_resampled_session_equals_single_engine(engine, inputs):
    import soxr

    images, speech, prompts, seeds = inputs
    audio24 = soxr.resample(speech[0][:40000], SR, 24000).clip(-1, 1).astype(np.float32)
    step = 7200  # 300 ms chunks at 24 kHz
    engine.reset(images[0], prompts[0], seeds[0])
    alone = []
    for pos in range(0, len(audio24), step):
        alone += engine.step(audio24[pos:pos + step], sample_rate=24000, resample=True)
    alone += engine.flush()
    be = BatchedEngine(engine, sessions=2)
    reset_all(be, inputs, slots=[0, 1])
    got = {}
    for pos in range(0, len(audio24), step):  # session 1 at 16 kHz in between, as its own call
        gather(got, be.step({0: audio24[pos:pos + step]}, sample_rate=24000, resample=True))
        gather(got, be.step({1: speech[1][pos * 2 // 3:(pos + step) * 2 // 3]}))
    with pytest.raises(ValueError, match="^session 0: sample rate changed"):
        be.step({0: audio24[:100]}, sample_rate=22050, resample=True)
    gather(got, be.flush())
    assert_matches_single(alone, got[0])


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_memory_flat_over_many_rounds(batched, inputs, cfg):
    """Two speaking sessions, one listening (fill_idle), restarts and barge-ins: nothing grows."""
    reset_all(batched, inputs)
    ring_ptr = batched._rows.ring.k.data_ptr()
    text_ptr = batched._rows.text_kv[0][0].data_ptr()
    rng = np.random.default_rng(3)
    chunk = 12 * cfg.samples_per_video_frame
    rss, rounds0 = [], batched.rounds
    for it in range(36):
        if it % 12 == 11:
            reset_all(batched, inputs, slots=[1])  # a slot reused by a new session
        if it % 9 == 4:
            batched.interrupt(0)
        chunks = {i: (rng.standard_normal(chunk) * 0.1).clip(-1, 1).astype(np.float32) for i in (0, 1)}
        got = batched.step(chunks, fill_idle=True)
        assert all(np.isfinite(b.frames).all() for blocks in got.values() for b in blocks)
        assert all(batched.queued_samples(i) == 0 for i in range(N))
        rss.append(_rss_bytes())
    assert batched.rounds - rounds0 >= 30
    assert batched._rows.ring.k.data_ptr() == ring_ptr and batched._rows.text_kv[0][0].data_ptr() == text_ptr
    warm = rss[len(rss) // 3]
    assert max(rss[len(rss) // 3:]) - warm < 32 * 2 ** 20, (warm, max(rss))
