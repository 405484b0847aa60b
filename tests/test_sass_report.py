"""benchmarks.sass_report's reading of SASS and its occupancy / wave arithmetic, on a small synthetic
listing (no compilation: the compiled kernels are covered by tests/test_kernels_gpu_compile.py)."""
from __future__ import annotations

import pytest

pytest.importorskip("triton", reason="benchmarks.sass_report needs triton")

from benchmarks import sass_report

# An outer loop (.L_x_0) around an inner MMA loop (.L_x_1) whose forward branch skips a block of
# two instructions (a once-per-slot block); one TMA load before the loops, one in the inner loop.
SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   UTMALDG.5D [UR8], [UR4] ;
.L_x_0:
        /*0020*/                   IMAD R2, R2, 0x2, RZ ;
.L_x_1:
        /*0030*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0040*/                   WARPGROUP.ARRIVE ;
        /*0050*/                   HGMMA.64x128x16.F32.BF16 R24, R160, gdesc[UR16], RZ, !UPT, gsb0 ;
        /*0060*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*0070*/                   MUFU.EX2 R3, R3 ;
        /*0080*/               @P5 BRA P6, `(.L_x_2) ;
        /*0090*/                   LDG.E R4, desc[UR4][R2.64] ;
        /*00a0*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
.L_x_2:
        /*00b0*/              @UP1 UTMALDG.5D [UR8], [UR44] ;
        /*00c0*/                   LDL R5, [R1] ;
        /*00d0*/               @P0 BRA `(.L_x_1) ;
        /*00e0*/               @P1 BRA `(.L_x_0) ;
        /*00f0*/                   EXIT ;
"""


def test_parse_reads_the_innermost_mma_loop():
    r = sass_report.parse("synthetic", SASS, registers=255, stack_bytes=0, shared_bytes=163856, num_warps=8,
                          grid_ctas=864)
    assert r.instructions == 16
    assert r.loop_instructions == 11                 # .L_x_1 .. its back branch, not the outer loop
    assert r.loop_hot_instructions == 9              # without the two the forward branch skips
    assert (r.loop_bar_sync, r.loop_hot_bar_sync) == (2, 1)
    assert (r.loop_utmaldg, r.utmaldg) == (1, 2)
    assert (r.loop_hgmma, r.loop_wgmma_waits, r.loop_mufu, r.loop_local_memory) == (1, 1, 1, 1)
    assert (r.ctas_per_sm, r.occupancy_limit) == (1, "registers")
    assert (r.waves, r.wave_efficiency) == (7, pytest.approx(864 / 924))


def test_no_mma_loop():
    r = sass_report.parse("row kernel", "        /*0000*/                   EXIT ;\n", 32, 0, 0, 4)
    assert r.loop_instructions is None and r.loop_hot_instructions is None and r.loop_bar_sync == 0
    assert r.grid_ctas is None and r.waves is None


@pytest.mark.parametrize(("regs", "smem", "warps", "expected"), [
    (255, 163856, 8, (1, "registers")),   # 256 x 32 x 8 = all 65536 registers; 160 KB smem fits once too
    (128, 50 * 1024, 4, (4, "registers")),  # registers allow 4, shared 228 / (50 + 1) = 4: a tie
    (64, 100 * 1024, 4, (2, "shared")),   # registers allow 8, shared 2
    (32, 0, 1, (32, "ctas")),             # 64 by registers and warps, capped at 32 CTAs
    (40, 0, 16, (3, "registers")),        # 1280 registers a warp (5 units): 51 warps, 3 CTAs of 16
    (64, 228 * 1024, 4, (0, "shared")),   # over the 227 KB a block may use: does not launch
])
def test_ctas_per_sm(regs, smem, warps, expected):
    assert sass_report.ctas_per_sm(regs, smem, warps) == expected


def test_attention_grid_at_the_real_shape():
    """Lq = 3 T rows in 128-row tiles x 12 heads, times the launcher's split on 132 SMs."""
    assert sass_report.attention_query_tiles(1024, 128) == 24 * 12
    assert sass_report.attention_query_tiles(1560, 128) == 37 * 12
    assert sass_report.attention_grid(1024) == 288 * 3
    assert sass_report.attention_grid(1560) == 444 * 2
