"""FP8 (E4M3) weights and activations for the DiT's per-token linears, through `torch._scaled_mm`.

The recipe is Live Avatar's (spec/liveavatar-family.md, "FP8"): each weight stored once as E4M3 with
a scale, each activation scaled dynamically at run time, the product taken by the FP8 tensor cores
with fp32 accumulation and bf16 (the activation dtype) out; attention stays in bf16. Two scalings:
- `tensor`: one scale per weight and one per activation tensor (the published recipe);
- `row`: one scale per output channel of the weight and one per token of the activation (rowwise
  `_scaled_mm`: a token with a large activation no longer crushes the others' precision).
The activation scale is computed on the device (amax / 448, no host sync), so CUDA-graph capture is
unaffected. Which linears: only the per-token ones of the transformer blocks (self-attention q/k/v/o,
cross-attention q/o, FFN): they are the 2.5 GFLOP per token of spec/performance-floor.md. Embeddings,
the time MLPs, the head, the audio projections and cross-attention k/v (computed once per prompt) keep
their precision.

Hardware: FP8 tensor cores are compute capability 8.9+ (`tensor`) and 9.0+ (`row`: the rowwise CUTLASS
kernels). The CPU runs `_scaled_mm` too (slowly), which is how the tests check the numerics here.

Traffic: the activation quantisation runs as one fused Triton kernel on CUDA
(avatar_kernels/fp8_quant.py, bit for bit `quantize_e4m3`), and self-attention's q/k/v are one GEMM
over their concatenated weight with one activation quantisation (runtime/models/qkv.py;
`quantize_dit_fp8(fuse=...)`). The bytes this saves per block: benchmarks/fp8_traffic.py.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from avatar_kernels._triton_util import triton_available

from .qkv import QKV_OF_SELF_ATTENTION, fuse_qkv

log = logging.getLogger(__name__)

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max          # 448
_TINY = 1e-12                              # scale floor: an all-zero tensor must not divide by zero
GRANULARITIES = ("tensor", "row")
# the per-token linears of each transformer block
HOT_LINEARS = re.compile(r"blocks\.\d+\.(self_attn\.(q|k|v|o)|cross_attn\.(q|o)|ffn\.(0|2))")
MIN_CAPABILITY = {"tensor": (8, 9), "row": (9, 0)}
KERNELS = ("auto", "triton", "torch")
# `_scaled_mm(use_fast_accum=True)`: on Hopper the FP8 MMA accumulates in a narrower (~22-bit)
# accumulator that is not promoted to fp32 every few k-steps; faster, slightly less exact. FP8
# inference recipes take it for the forward pass (torchao's Float8MMConfig for inference, fbgemm's
# rowwise FP8 GEMMs; Live Avatar's own flag is not checked against its code here), so it is the
# default; False gives the promoted fp32 accumulation. The CPU kernel ignores the flag (bit-identical
# either way, tests/test_fp8.py), so its numeric effect is unmeasured here: a GPU check is owed.
FAST_ACCUM = True


def _scale(amax: torch.Tensor) -> torch.Tensor:
    return (amax.float() / E4M3_MAX).clamp(min=_TINY)


def quantize_e4m3(x: torch.Tensor, granularity: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (E4M3 [M, K], fp32 scale: [] for `tensor`, [M, 1] for `row`), x ~ q * scale."""
    if granularity == "tensor":
        scale = _scale(x.abs().amax())
    else:
        scale = _scale(x.abs().amax(dim=1, keepdim=True))
    q = (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return q, scale


def quantize_activation(x: torch.Tensor, granularity: str, kernel: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_e4m3` through the fused Triton kernel (one or two passes, no fp32 copy) on CUDA with
    triton installed ("auto"), or always ("triton"; the CPU then needs TRITON_INTERPRET=1), else eager."""
    if kernel == "triton" or (kernel == "auto" and x.is_cuda and triton_available()):
        from avatar_kernels.fp8_quant import quantize_e4m3_triton
        if x.stride(-1) != 1:      # the kernel reads rows along a contiguous last dim
            x = x.contiguous()
        return quantize_e4m3_triton(x, granularity)
    return quantize_e4m3(x, granularity)


def fuses_bias(granularity: str, out_dtype: torch.dtype) -> bool:
    """Whether `_scaled_mm` may add the bias itself. On CUDA it refuses a bias with a float32 output
    ("Bias is not supported when out_dtype is set to Float32") and the rowwise kernels take none, so
    those add it after the product (one elementwise pass)."""
    return granularity == "tensor" and out_dtype in (torch.bfloat16, torch.float16)


class Fp8Linear(nn.Module):
    """A frozen nn.Linear with an E4M3 weight; forward quantizes its input and calls `_scaled_mm`."""

    def __init__(self, linear: nn.Linear, granularity: str = "tensor", *, fast_accum: bool = FAST_ACCUM,
                 kernel: str = "auto"):
        super().__init__()
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        self.fast_accum, self.kernel = fast_accum, kernel
        out_f, in_f = linear.weight.shape
        if in_f % 16 or out_f % 16:
            raise ValueError(f"FP8 matmuls need in/out features that are multiples of 16, got {in_f} -> {out_f}")
        self.in_features, self.out_features, self.granularity = in_f, out_f, granularity
        w8, w_scale = quantize_e4m3(linear.weight.detach(), granularity)
        self.register_buffer("weight_fp8", w8)
        # _scaled_mm wants scale_b shaped like the [K, N] operand's columns: [] or [1, N]
        self.register_buffer("weight_scale", w_scale if granularity == "tensor" else w_scale.t().contiguous())
        bias = linear.bias.detach().clone() if linear.bias is not None else None
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        x8, x_scale = quantize_activation(x2, self.granularity, self.kernel)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        fused_bias = bias if fuses_bias(self.granularity, x.dtype) else None
        out = torch._scaled_mm(x8, self.weight_fp8.t(), scale_a=x_scale, scale_b=self.weight_scale,
                               bias=fused_bias, out_dtype=x.dtype, use_fast_accum=self.fast_accum)
        if bias is not None and fused_bias is None:
            out = out + bias
        return out.reshape(*lead, self.out_features)

    def dequantized_weight(self) -> torch.Tensor:
        """The weight the FP8 product uses, in fp32 (for references and error reports)."""
        scale = self.weight_scale if self.granularity == "tensor" else self.weight_scale.t()
        return self.weight_fp8.float() * scale

    def extra_repr(self) -> str:
        return (f"{self.in_features} -> {self.out_features}, e4m3, {self.granularity} scaling, "
                f"fast_accum={self.fast_accum}")


@dataclass
class QuantizeReport:
    granularity: str
    converted: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)      # linears left in their dtype (not per-token)
    fused: list[str] = field(default_factory=list)     # attentions whose q/k/v became one GEMM
    bytes_before: int = 0
    bytes_after: int = 0


def check_fp8_device(device: torch.device, granularity: str) -> None:
    """FP8 tensor cores by compute capability (never by GPU name); the CPU runs `_scaled_mm` too."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        need = MIN_CAPABILITY[granularity]
        if cap < need:
            raise RuntimeError(f"FP8 `{granularity}` matmuls need compute capability >= {need[0]}.{need[1]}; "
                               f"{device} is {cap[0]}.{cap[1]}")
    elif device.type != "cpu":
        raise RuntimeError(f"FP8 matmuls run on CUDA (or, slowly, the CPU), not on {device}")


def quantize_dit_fp8(dit: nn.Module, granularity: str = "tensor", include: re.Pattern = HOT_LINEARS,
                     exclude: re.Pattern | None = None, *, fuse: re.Pattern | None = QKV_OF_SELF_ATTENTION,
                     fast_accum: bool = FAST_ACCUM, kernel: str = "auto") -> QuantizeReport:
    """Swap the linears whose qualified names fully match `include` (and not `exclude`) for Fp8Linear,
    in place. The default selects family 1's per-token linears (`HOT_LINEARS`).

    The attention modules matching `fuse` whose q, k and v are all selected get one Fp8Linear over
    the stacked weight instead (runtime/models/qkv.py: one GEMM, one activation quantisation). With
    `row` scaling that is exactly the three (a scale per output channel, per token); with `tensor`
    scaling the stacked weight gets one scale, the largest of the three: a q/k/v weight with a
    smaller amax is encoded one or more binades lower in E4M3, which keeps its 3 mantissa bits
    unless an entry falls below 2^-6 * scale (the subnormals). tests/test_fp8.py bounds the change."""
    report = QuantizeReport(granularity)

    def selected(name: str) -> bool:
        return bool(include.fullmatch(name)) and not (exclude is not None and exclude.fullmatch(name))

    def to_fp8(linear: nn.Linear) -> Fp8Linear:
        fp8 = Fp8Linear(linear, granularity, fast_accum=fast_accum, kernel=kernel)
        report.bytes_before += linear.weight.numel() * linear.weight.element_size()
        report.bytes_after += fp8.weight_fp8.numel() + fp8.weight_scale.numel() * 4
        return fp8

    for name, module in list(dit.named_modules()):
        qkv = [f"{name}.{c}" for c in "qkv"]
        if fuse is not None and fuse.fullmatch(name) and all(selected(n) for n in qkv):
            fuse_qkv(module, to_fp8)
            report.converted += qkv
            report.fused.append(name)
    for name, module in list(dit.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        if not selected(name):
            report.kept.append(name)
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(dit.get_submodule(parent_name) if parent_name else dit, child, to_fp8(module))
        report.converted.append(name)
    if not report.converted:
        raise ValueError(f"no linear matches {include.pattern!r}: nothing to quantize")
    log.info("FP8 (%s scaling): %d linears converted (q/k/v fused in %d attentions), %.1f -> %.1f MB of "
             "weights; %d kept in %s", granularity, len(report.converted), len(report.fused),
             report.bytes_before / 2**20, report.bytes_after / 2**20, len(report.kept),
             next(dit.parameters()).dtype)
    return report
