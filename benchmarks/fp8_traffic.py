"""Bytes moved by the FP8 activation quantisation per streamed block, eager vs fused: arithmetic, not measured.

Counted: every byte each pass reads or writes in global memory (caches ignored: the fused per-tensor
kernel's second read of x is counted although at these sizes x fits an H100's 50 MB L2). Not counted:
the GEMMs themselves (they read the E4M3 activation either way; q/k/v fusion also cuts that read
from 3 to 1), launch overheads, the weights (quantised once at load).

Eager `quantize_e4m3` (runtime/models/fp8.py), x [M, K] in a dtype of `b` bytes, S scales (1 or M):
  x.abs()              read bN, write bN          .amax()          read bN, write bS
  amax.float()         read bS, write 4S (*)      / 448, clamp     read 4S, write 4S, twice
  x.float()            read bN, write 4N (*)      / scale          read 4N + 4S, write 4N
  .clamp(-448, 448)    read 4N, write 4N          .to(e4m3)        read 4N, write N
  (*) no pass when x is already fp32 (`.float()` returns x itself)
  = 33 N + 28 S bytes for bf16: about 11 times the 3 N a fused row pass needs.
Fused (avatar_kernels/fp8_quant.py), P programs = ceil(M / BLOCK_M):
  row:    read bN, write N + 4M
  tensor: zero the amax word 4; pass 1 read bN, P atomics 4P; pass 2 read bN + 4P, write N + 4
Per block: each transformer layer quantises the inputs of its per-token linears (HOT_LINEARS: q, k,
v, o, cross-attention q and o, ffn.0 over [Lq, dim]; ffn.2 over [Lq, ffn]), q/k/v once when fused,
in each of the block's forwards (denoising steps + the KV refresh, as runtime/flops.py).
"""
from __future__ import annotations

from dataclasses import dataclass

from avatar_kernels.fp8_quant import tiles
from runtime.config import EngineConfig


def eager_bytes(m: int, k: int, elem: int, granularity: str) -> int:
    """Bytes of eager `quantize_e4m3` on x [m, k] of `elem`-byte elements."""
    n, s = m * k, (1 if granularity == "tensor" else m)
    widen = 0 if elem == 4 else 1                     # x.float() / amax.float() are no-ops on fp32
    total = 2 * elem * n + elem * n + elem * s         # abs, amax
    total += widen * (elem * s + 4 * s) + 2 * 8 * s    # scale: float(), / 448, clamp
    total += widen * (elem * n + 4 * n)                # x.float()
    total += 4 * n + 4 * s + 4 * n                     # / scale
    total += 8 * n + 5 * n                             # clamp, cast
    return total


def fused_bytes(m: int, k: int, elem: int, granularity: str) -> int:
    """Bytes of the fused Triton quantiser on x [m, k] of `elem`-byte elements."""
    n = m * k
    if granularity == "row":
        return elem * n + n + 4 * m
    programs = -(-m // tiles(k)[0])
    return 4 + elem * n + 4 * programs + elem * n + 4 * programs + n + 4


@dataclass(frozen=True)
class QuantTraffic:
    granularity: str
    per_forward_before: int      # eager quantiser, q/k/v quantised three times
    per_forward_after: int       # fused quantiser, q/k/v quantised once
    forwards: int

    @property
    def per_block_before(self) -> int:
        return self.per_forward_before * self.forwards

    @property
    def per_block_after(self) -> int:
        return self.per_forward_after * self.forwards


def block_quant_traffic(cfg: EngineConfig, granularity: str = "tensor", elem: int = 2) -> QuantTraffic:
    """Quantisation bytes of one steady-state block (block_frames latent frames) of `cfg`'s DiT, with
    activations of `elem` bytes (2: the bf16 engine)."""
    d, lq = cfg.dit, cfg.cache.block_frames * cfg.tokens_per_frame
    dim_inputs_before, dim_inputs_after = 7, 5         # q, k, v, o, cq, co, ffn.0 | qkv, o, cq, co, ffn.0

    def layer(count: int, per: callable) -> int:
        return count * per(lq, d.dim, elem, granularity) + per(lq, d.ffn_dim, elem, granularity)

    return QuantTraffic(granularity, d.num_layers * layer(dim_inputs_before, eager_bytes),
                        d.num_layers * layer(dim_inputs_after, fused_bytes), cfg.sampler.num_steps + 1)


def main() -> None:
    cfg = EngineConfig.from_preset("livetalk-1.3b")
    print(f"{cfg.name} {cfg.height}x{cfg.width}: Lq {cfg.cache.block_frames * cfg.tokens_per_frame}, "
          f"{cfg.dit.num_layers} layers, {cfg.sampler.num_steps + 1} forwards per block (arithmetic, not measured)")
    for g in ("tensor", "row"):
        t = block_quant_traffic(cfg, g)
        print(f"  {g:6s} before {t.per_block_before / 1e9:7.1f} GB   after {t.per_block_after / 1e9:6.1f} GB   "
              f"({t.per_block_before / t.per_block_after:.1f}x less)")


if __name__ == "__main__":
    main()
