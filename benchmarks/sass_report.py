"""Static cost of the Triton kernels from Hopper SASS, measured without a GPU.

Triton compiles ahead of time for a named target (TTIR -> TTGIR -> LLVM -> PTX -> cubin with the ptxas
it ships), and it ships nvdisasm and cuobjdump too. This reads, for each kernel at the real shape:
registers and stack per thread, shared memory, resident CTAs per SM (sm_90 limits), and the innermost
loop that holds MMAs (the attention's key loop): its length in SASS instructions (all of it, and the
part that runs on every iteration, without the blocks a forward branch skips), its wgmma (HGMMA),
wgmma waits (one per HGMMA: ptxas serialised them), CTA barriers (BAR.SYNC), TMA loads (UTMALDG) and
special-function (MUFU: exp2, sin, cos) counts, and whether it touches local memory (a spill); for the
attention also the wave efficiency of its launch grid at the real shape on an H200 (132 SMs). These
are proxies, not speed: they explain a tile choice and catch regressions (a spill, serialised wgmma,
rotation work creeping back into the key loop), and the GPU benchmark (benchmarks/bench_kernels.py)
overrules them.

Run:  python -m benchmarks.sass_report [--json out.json]
Compiling must happen in a process where Triton's interpreter has not run (TRITON_INTERPRET unset).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass

import torch

from avatar_kernels import kv_write, norm_modulate, window_attention
from avatar_kernels._triton_util import bind_helpers, next_pow2, row_warps
from avatar_kernels.rope import rope_split

try:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction
except ImportError:  # pragma: no cover - no triton, or a triton without the ahead-of-time API
    triton = None

HOPPER = GPUTarget("cuda", 90, 32) if triton else None
AMPERE = GPUTarget("cuda", 80, 32) if triton else None
# runtime ints Triton does not see as multiples of 16 at launch (the others are specialised as such)
_NOT_ALIGNED = {"stride_ss", "stride_pf", "stride_wf", "S", "Fq", "eps", "qk_scale", "grid_w"}
_FLOAT_ARGS = ("eps", "qk_scale")
# The real model (runtime/config.py, LiveTalk 1.3B): 12 heads of 128, 3 latent frames per block
# (Lq = 3 T), a ring of 15 slots (15 T keys), batch 1; T = 1024 at 512x512, 1560 at 480x832.
HEADS, FRAMES_PER_BLOCK, RING_SLOTS = 12, 3, 15
RESOLUTIONS = {"512x512": 1024, "480x832": 1560}
H200_SMS = 132


def compile_for(fn, target, pointer_types: dict[str, str], constexprs: dict, num_warps: int,
                num_stages: int = 3, unaligned: tuple[str, ...] = (), types: dict[str, str] | None = None):
    """Compile plain kernel `fn` for `target`; pointers typed by name, `types` names other typed
    args (tensor descriptors), other runtime args i32/fp32. Runtime ints are taken as multiples of
    16 (as Triton specialises them at launch) unless named in `_NOT_ALIGNED` or `unaligned`."""
    jit = JITFunction(bind_helpers(fn, JITFunction))
    signature, attrs = {}, {}
    for i, name in enumerate(jit.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        if types and name in types:
            signature[name] = types[name]
            continue
        if name.endswith("_ptr"):
            signature[name] = pointer_types[name]
        else:
            signature[name] = "fp32" if name in _FLOAT_ARGS else "i32"
        if name not in _NOT_ALIGNED and name not in unaligned:
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=jit, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=target, options={"num_warps": num_warps, "num_stages": num_stages,
                                                         "enable_fp_fusion": True})


def attention_query_tiles(tokens_per_frame: int, block_m: int, frames: int = FRAMES_PER_BLOCK,
                          heads: int = HEADS, batch: int = 1) -> int:
    """CTAs of the attention grid before the key split: query tiles x batch x heads."""
    return -(-frames * tokens_per_frame // block_m) * heads * batch


def compile_attention(target, dtype_name: str, tl_dtype, head_dim: int, torch_dtype: torch.dtype,
                      tokens_per_frame: int = 1024, config: window_attention.AttentionConfig | None = None,
                      splits: int | None = None, tma: bool | None = None):
    """The window attention at 12 heads; 1024 tokens a frame is 512x512 (whole key tiles), 1560 is
    480x832 (a partial last tile; T and Lq = 3T not multiples of 16). `splits` defaults to what the
    launcher picks on an H200 (132 SMs); `tma` to the config's (descriptors exist only from sm_90)."""
    cfg = config or window_attention.default_attention_config(head_dim, torch_dtype, torch.device("cuda"))
    if splits is None:
        splits = cfg.splits or window_attention.plan_splits(
            attention_query_tiles(tokens_per_frame, cfg.block_m), H200_SMS)
    use_tma = (cfg.tma if tma is None else tma) and target.arch >= 90
    n_frame = rope_split(head_dim)[0] // 2
    block_d = next_pow2(head_dim)
    ptrs = {n: f"*{dtype_name}" for n in ("q_ptr", "k_ptr", "v_ptr")}
    ptrs.update(o_ptr=f"*{dtype_name}" if splits == 1 else "*fp32", m_ptr="*fp32", l_ptr="*fp32",
                order_ptr="*i32", count_ptr="*i32", fcos_ptr="*fp32", fsin_ptr="*fp32", scos_ptr="*fp32",
                ssin_ptr="*fp32")
    desc = f"tensordesc<{dtype_name}[1, 1, {cfg.block_n}, 1, {block_d}]>"
    types = {"k_desc": desc, "v_desc": desc} if use_tma else {}
    constexprs = {"H": HEADS, "D": head_dim, "N_FRAME": n_frame, "BLOCK_M": cfg.block_m,
                  "BLOCK_N": cfg.block_n, "BLOCK_D": block_d, "EVEN_T": tokens_per_frame % cfg.block_n == 0,
                  "SPLIT": splits, "USE_TMA": use_tma,
                  "DOT_PRECISION": "ieee" if dtype_name == "fp32" else "tf32", "MMA_DTYPE": tl_dtype}
    if not use_tma:
        constexprs.update(k_desc=None, v_desc=None)
    unaligned = () if tokens_per_frame % 16 == 0 else ("T", "Lq")
    return compile_for(window_attention._window_attention_kernel, target, ptrs, constexprs,
                       cfg.num_warps, cfg.num_stages, unaligned, types)


def compile_kv_write(rope: bool, dim: int = 1536, head_dim: int = 128):
    ptrs = {n: "*bf16" for n in ("q_ptr", "k_ptr", "v_ptr", "q_out_ptr", "k_ring_ptr", "v_ring_ptr")}
    ptrs.update(q_weight_ptr="*fp32", k_weight_ptr="*fp32", slots_ptr="*i32", cos_ptr="*fp32",
                sin_ptr="*fp32", fcos_ptr="*fp32", fsin_ptr="*fp32")
    block = next_pow2(dim)
    return compile_for(kv_write._qk_norm_kv_write_kernel, HOPPER, ptrs,
                       {"DIM": dim, "HEAD_DIM": head_dim, "BLOCK": block, "ROPE": rope,
                        "FRAME": False, "N_FRAME": (head_dim - 4 * (head_dim // 6)) // 2},
                       num_warps=row_warps(block))


def compile_norms(dim: int = 1536):
    block = next_pow2(dim)
    warps = row_warps(block)
    ptrs = {"x_ptr": "*bf16", "shift_ptr": "*fp32", "scale_ptr": "*fp32", "out_ptr": "*bf16"}
    ln = compile_for(norm_modulate._layernorm_modulate_kernel, HOPPER, ptrs, {"DIM": dim, "BLOCK": block},
                     num_warps=warps)
    ptrs = {"x_ptr": "*bf16", "y_ptr": "*bf16", "gate_ptr": "*fp32", "out_ptr": "*bf16"}
    gr = compile_for(norm_modulate._gated_residual_kernel, HOPPER, ptrs, {"DIM": dim, "BLOCK": block},
                     num_warps=warps)
    return ln, gr


# --------------------------------------------------------------------------------------------------
# Reading the cubin
# --------------------------------------------------------------------------------------------------
# sm_90 per-SM limits (CUDA occupancy calculator, compute capability 9.0)
SM90_REGS = 65536            # 32-bit registers per SM
SM90_REG_UNIT = 256          # registers are allocated per warp in units of 256
SM90_SMEM = 228 * 1024       # shared memory per SM ...
SM90_SMEM_PER_CTA = 227 * 1024   # ... of which one block may use at most this
SM90_SMEM_RESERVED = 1024    # reserved per resident block by the system
SM90_WARPS = 64
SM90_CTAS = 32


@dataclass
class KernelReport:
    name: str
    registers: int
    stack_bytes: int
    shared_bytes: int
    num_warps: int
    instructions: int
    loop_instructions: int | None     # the innermost loop holding MMAs (None: no such loop)
    loop_hot_instructions: int | None  # the same without its conditional (forward-branched) blocks
    loop_hgmma: int
    loop_wgmma_waits: int             # WARPGROUP.DEPBAR: one per HGMMA means ptxas serialised them
    loop_bar_sync: int                # CTA barriers in the loop ...
    loop_hot_bar_sync: int            # ... and on its unconditional path (every key tile)
    loop_utmaldg: int                 # TMA loads issued in the loop
    utmaldg: int                      # TMA loads in the whole kernel
    loop_mufu: int
    loop_local_memory: int            # LDL/STL in that loop: register spills
    ctas_per_sm: int
    occupancy_limit: str              # what bounds ctas_per_sm: registers, shared, warps or ctas
    grid_ctas: int | None = None      # the launch grid at the real shape (attention only)
    waves: int | None = None          # on H200_SMS SMs at ctas_per_sm
    wave_efficiency: float | None = None


def _tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _disassemble(cubin: bytes) -> tuple[str, str]:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        sass = subprocess.run([_tool("nvdisasm"), "-c", f.name], capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
    finally:
        os.unlink(f.name)
    return sass, usage


def _instructions(sass: str) -> tuple[list[str], dict[str, int]]:
    """SASS instruction texts in order, and the instruction index of every label."""
    instr, labels = [], {}
    for line in sass.splitlines():
        label = re.match(r"^(\.L_x_\d+):", line)
        if label:
            labels[label.group(1)] = len(instr)
            continue
        op = re.match(r"\s*/\*[0-9a-f]+\*/\s+(.*?);", line)
        if op:
            instr.append(op.group(1))
    return instr, labels


def _branch_target(text: str, labels: dict[str, int]) -> int | None:
    target = re.search(r"BRA\s+(?:[!U]?P\w+,\s*)?`?\((\.L_x_\d+)\)", text)
    return labels.get(target.group(1)) if target else None


def _innermost_mma_loop_range(instr: list[str], labels: dict[str, int]) -> tuple[int, int] | None:
    """[start, end] of the shortest backward-branch range that contains an HGMMA (or HMMA:
    pre-Hopper)."""
    loops = []
    for end, text in enumerate(instr):
        start = _branch_target(text, labels)
        if start is not None and start <= end and any("HGMMA" in x or "HMMA" in x for x in instr[start:end + 1]):
            loops.append((start, end))
    return min(loops, key=lambda r: r[1] - r[0]) if loops else None


def _innermost_mma_loop(instr: list[str], labels: dict[str, int]) -> list[str] | None:
    span = _innermost_mma_loop_range(instr, labels)
    return instr[span[0]:span[1] + 1] if span else None


def _conditional_indices(instr: list[str], labels: dict[str, int], start: int, end: int) -> set[int]:
    """Instructions of [start, end] that a predicated forward branch inside the range can jump over
    (the slot-change and partial-tile blocks of the attention loop): not run on every iteration."""
    skipped: set[int] = set()
    for i in range(start, end + 1):
        target = _branch_target(instr[i], labels)
        if target is not None and instr[i].startswith("@") and i < target <= end + 1:
            skipped.update(range(i + 1, target))
    return skipped


def ctas_per_sm(registers: int, shared_bytes: int, num_warps: int) -> tuple[int, str]:
    """Resident CTAs per sm_90 SM and the resource that bounds it (ties: the first of registers,
    shared, warps, ctas)."""
    regs_per_warp = -(-registers * 32 // SM90_REG_UNIT) * SM90_REG_UNIT
    limits = {"registers": SM90_REGS // (regs_per_warp * num_warps),
              "shared": (0 if shared_bytes > SM90_SMEM_PER_CTA
                         else SM90_SMEM // (shared_bytes + SM90_SMEM_RESERVED)),
              "warps": SM90_WARPS // num_warps, "ctas": SM90_CTAS}
    limit = min(limits, key=limits.get)
    return limits[limit], limit


def waves(grid_ctas: int, ctas_per_sm_: int, n_sm: int = H200_SMS) -> tuple[int, float]:
    """Waves of a grid of equal CTAs and the busy fraction of the GPU over them."""
    slots = n_sm * max(ctas_per_sm_, 1)
    return -(-grid_ctas // slots), window_attention.wave_efficiency(grid_ctas, slots)


def parse(name: str, sass: str, registers: int, stack_bytes: int, shared_bytes: int, num_warps: int,
          grid_ctas: int | None = None) -> KernelReport:
    """A KernelReport from disassembled SASS text and the kernel's resource usage."""
    instr, labels = _instructions(sass)
    span = _innermost_mma_loop_range(instr, labels)
    loop_idx = range(span[0], span[1] + 1) if span else range(0)
    hot_idx = [i for i in loop_idx if i not in _conditional_indices(instr, labels, *span)] if span else []
    loop = [instr[i] for i in loop_idx]
    hot = [instr[i] for i in hot_idx]
    occ, limit = ctas_per_sm(registers, shared_bytes, num_warps)
    n_waves, eff = waves(grid_ctas, occ) if grid_ctas else (None, None)
    return KernelReport(
        name=name, registers=registers, stack_bytes=stack_bytes, shared_bytes=shared_bytes,
        num_warps=num_warps, instructions=len(instr), loop_instructions=len(loop) or None,
        loop_hot_instructions=len(hot) or None, loop_hgmma=sum("HGMMA" in x for x in loop),
        loop_wgmma_waits=sum("WARPGROUP.DEPBAR" in x for x in loop),
        loop_bar_sync=sum("BAR.SYNC" in x for x in loop), loop_hot_bar_sync=sum("BAR.SYNC" in x for x in hot),
        loop_utmaldg=sum("UTMALDG" in x for x in loop), utmaldg=sum("UTMALDG" in x for x in instr),
        loop_mufu=sum("MUFU" in x for x in loop),
        loop_local_memory=sum(bool(re.search(r"\b(LDL|STL)\b", x)) for x in loop),
        ctas_per_sm=occ, occupancy_limit=limit, grid_ctas=grid_ctas, waves=n_waves, wave_efficiency=eff)


def report(name: str, kernel, grid_ctas: int | None = None) -> KernelReport:
    sass, usage = _disassemble(kernel.asm["cubin"])
    regs, stack = (int(v) for v in re.search(r"REG:(\d+) STACK:(\d+)", usage).groups())
    return parse(name, sass, regs, stack, int(kernel.metadata.shared), int(kernel.metadata.num_warps), grid_ctas)


def opcode_histogram(kernel, top: int = 20) -> list[tuple[str, int]]:
    """The most frequent opcodes of the innermost MMA loop (predicates and modifiers dropped)."""
    instr, labels = _instructions(_disassemble(kernel.asm["cubin"])[0])
    loop = _innermost_mma_loop(instr, labels) or []
    return Counter(re.sub(r"^@!?U?P\w+\s+", "", x).split()[0].split(".")[0] for x in loop).most_common(top)


def attention_grid(tokens_per_frame: int, config: window_attention.AttentionConfig | None = None) -> int:
    """CTAs of the launcher's grid at the real shape on an H200: query tiles x heads x key split."""
    cfg = config or window_attention.default_attention_config(128, torch.bfloat16, torch.device("cuda"))
    tiles = attention_query_tiles(tokens_per_frame, cfg.block_m)
    return tiles * (cfg.splits or window_attention.plan_splits(tiles, H200_SMS))


def all_reports() -> list[KernelReport]:
    bf16 = triton.language.bfloat16
    out = []
    for label, tokens in RESOLUTIONS.items():
        kernel = compile_attention(HOPPER, "bf16", bf16, 128, torch.bfloat16, tokens)
        out.append(report(f"window_attention bf16 D128 {label} (default tiles)", kernel, attention_grid(tokens)))
    for cfg in ((128, 64, 8, 3), (128, 64, 8, 2)):
        config = window_attention.AttentionConfig(*cfg)
        kernel = compile_attention(HOPPER, "bf16", bf16, 128, torch.bfloat16, 1024, config)
        out.append(report("window_attention bf16 D128 512x512 bm{}_bn{}_w{}_s{}".format(*cfg), kernel,
                          attention_grid(1024, config)))
    out.append(report("qk_norm_kv_write bf16 1536 (un-roped)", compile_kv_write(rope=False)))
    out.append(report("qk_norm_kv_write bf16 1536 (spatial RoPE)", compile_kv_write(rope=True)))
    ln, gr = compile_norms()
    out.append(report("layernorm_modulate bf16 1536", ln))
    out.append(report("gated_residual bf16 1536", gr))
    return out


def format_report(r: KernelReport) -> str:
    head = (f"{r.name}: {r.registers} regs, stack {r.stack_bytes} B, smem {r.shared_bytes} B, {r.num_warps} warps "
            f"-> {r.ctas_per_sm} CTA/SM ({r.occupancy_limit}); {r.instructions} instr, {r.utmaldg} UTMALDG")
    if r.loop_instructions:
        head += (f"\n    loop {r.loop_instructions} instr ({r.loop_hot_instructions} every iteration), "
                 f"{r.loop_hgmma} HGMMA, {r.loop_wgmma_waits} wgmma waits, BAR.SYNC {r.loop_bar_sync} "
                 f"({r.loop_hot_bar_sync} every iteration), {r.loop_utmaldg} UTMALDG, {r.loop_mufu} MUFU, "
                 f"{r.loop_local_memory} local")
    if r.grid_ctas:
        head += f"\n    grid {r.grid_ctas} CTAs: {r.waves} waves on {H200_SMS} SMs, {100 * r.wave_efficiency:.1f} %"
    return head


def main(argv: list[str]) -> int:
    if triton is None:
        print("triton (with its ahead-of-time compile API) is not installed", file=sys.stderr)
        return 1
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: this compiles for the GPU", file=sys.stderr)
        return 1
    reports = all_reports()
    for r in reports:
        print(format_report(r))
    if "--json" in argv:
        with open(argv[argv.index("--json") + 1], "w") as f:
            json.dump([asdict(r) for r in reports], f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
