"""Host-side ring planning: slots, visibility and RoPE positions."""
import pytest

from avatar_kernels.window_attention import INVALID_POS
from runtime.config import CacheConfig
from runtime.session import frame_positions, frame_slot, plan_block, visible_frames

LIVETALK = CacheConfig()  # 3-frame blocks, 9 sink frames, 15-frame window


def test_invariant_is_checked():
    with pytest.raises(ValueError, match="sink_frames \\+ 2 \\* block_frames"):
        CacheConfig(block_frames=3, sink_frames=9, window_frames=14)


def test_livetalk_window_and_eviction():
    assert visible_frames(0, LIVETALK) == [0, 1, 2]
    assert visible_frames(4, LIVETALK) == list(range(15))
    # block 5 (frames 15..17) evicts frames 9..11 and reuses their slots
    assert visible_frames(5, LIVETALK) == list(range(9)) + [12, 13, 14, 15, 16, 17]
    assert [frame_slot(f, LIVETALK) for f in (15, 16, 17)] == [9, 10, 11]
    plan = plan_block(5, LIVETALK)
    assert plan.write_slots.tolist() == [[9, 10, 11]]
    assert plan.q_pos.tolist() == [[0, 1, 2]]
    # absolute: slot s holds frame f at position f - 15
    assert plan.slot_pos.tolist() == [[f - 15 for f in range(9)] + [0, 1, 2, -3, -2, -1]]


def test_empty_slots_are_invalid_early():
    plan = plan_block(1, LIVETALK)
    assert plan.slot_pos[0, 6:].tolist() == [INVALID_POS] * 9


def test_rolling_mode_bounds_every_distance():
    cache = CacheConfig(rope_mode="rolling")
    for b in range(0, 5000, 7):
        pos = frame_positions(b, cache)
        assert max(pos.values()) - min(pos.values()) < cache.window_frames
        assert all(abs(p) < cache.window_frames for p in pos.values())
    # identical to absolute until eviction starts
    for b in range(5):
        assert frame_positions(b, cache) == frame_positions(b, LIVETALK)


def test_rolling_mode_keeps_sink_adjacent_to_window():
    cache = CacheConfig(rope_mode="rolling")
    pos = frame_positions(100, cache)
    f0 = 300
    sink = [pos[f] for f in range(9)]
    rolling = [pos[f] for f in sorted(pos) if f >= 9]
    assert rolling == [f - f0 for f in range(f0 - 3, f0 + 3)]
    assert sink == list(range(rolling[0] - 9, rolling[0]))


def test_non_block_multiple_rolling_region_wraps():
    cache = CacheConfig(block_frames=2, sink_frames=1, window_frames=6)  # rolling region of 5 frames
    seen = set()
    for b in range(12):
        plan = plan_block(b, cache)
        slots = plan.write_slots[0].tolist()
        assert len(set(slots)) == 2 and 0 not in slots or b == 0
        seen.update(slots)
        valid = sum(p != INVALID_POS for p in plan.slot_pos[0].tolist())
        assert valid == len(visible_frames(b, cache))
    assert seen == set(range(6))
