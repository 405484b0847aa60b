"""Analytic FLOP counts per streamed block, the compute floor, and achieved throughput.

Convention: one multiply-accumulate = 2 FLOPs; only matmul-like work is counted (linears,
attention score and value products, convolutions). Norms, activations, biases, RoPE and
element-wise adds are left out: they are memory-bound and below 0.5% of any total here.

Per DiT forward (one block of `block_frames` latent frames, Lq = block_frames * tokens_per_frame):
  linears     2 * (4 d^2 + 2 d^2 + 2 d F) * layers * Lq   (QKVO, cross-attn Q and O, FFN; the text
              K/V of cross-attention depend only on the prompt and are cached, so not counted)
  small       patch embedding, head, time embedding/projection, audio adapter (reported apart)
  self_attn   4 * Lq * Lk * d * layers   (QK^T and PV; Lk = the KV window in tokens)
  cross_attn  4 * Lq * text_len * d * layers
A block runs `num_steps` denoising forwards plus one t=0 forward that refreshes the KV cache.

The decoders are counted per latent frame from their architectures (Wan2.1 VAE decoder from
VAEConfig; TAEHV's fixed decoder) and summed over the block's latent frames.

Agreement with spec/performance-floor.md (1.3B, TFLOP per 12-frame block):
- DiT: every entry matches within the table's rounding once "linears" includes the small linears
  (at 480x832 the core is 11.704 and the small ones 0.003: 11.707 -> 11.71).
- Wan VAE: 26.64 (table 26.6) and 40.65 (table 40.6). The table's 480x832 value is the 512^2
  count scaled by pixel count (26.64 * 1.523 = 40.59); that misses the middle block's per-frame
  attention growing with the square of the positions (0.077 -> 0.179 TFLOP, not 0.118): +0.15%.
- TAEHV: 1.072 and 1.632 (table 1.07, 1.63).
- Floors: all cells but two match when rounded. The realistic-bf16 "+ TAEHV" cell (133 ms,
  90 FPS) is ~1 ms above what its own stated rates give (132.2 ms, 90.8 FPS), and its
  "+ Wan VAE" FPS (63) is 12 frames / the rounded 189 ms (unrounded: 188.9 ms, 63.5 FPS).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal, NamedTuple

from runtime.config import EngineConfig, VAEConfig

Decoder = Literal["wan", "taehv"]

# Measured dense bf16 GEMM rate of one H100/H200 (spec: performance-floor.md).
PEAK_TFLOPS_BF16 = 790.0


class Layer(NamedTuple):
    """One counted operation of a decoder for one latent frame: `kind` is 'conv' or 'attn'."""

    name: str
    kind: str
    flops: float


@dataclass(frozen=True)
class BlockFlops:
    """FLOPs of one streamed block. DiT fields are per forward; decoder fields are per block."""

    q_tokens: int  # tokens of the block (Lq)
    kv_tokens: int  # tokens of the KV window attended to (Lk)
    text_len: int
    forwards: int  # denoising steps + 1 KV refresh
    latent_frames: int
    video_frames: int
    # one DiT forward
    linears: float  # QKVO + cross Q/O + FFN over all layers (the spec's 2.50 GFLOP/token)
    patch_embed: float
    head: float
    time_embed: float  # time_embedding + time_projection, one timestep per latent frame
    audio_proj: float  # audio_proj + audio_cond_projs, one vector per latent frame
    self_attn: float
    cross_attn: float
    # decoder, whole block
    decoder_name: str
    decoder_conv: float  # convolutions and 1x1 projections
    decoder_attn: float  # attention products (Wan VAE middle block; 0 for TAEHV)

    @property
    def small_linears(self) -> float:
        return self.patch_embed + self.head + self.time_embed + self.audio_proj

    @property
    def linears_total(self) -> float:
        """What the spec table's "linears" line counts: core linears plus the small ones."""
        return self.linears + self.small_linears

    @property
    def attention(self) -> float:
        return self.self_attn + self.cross_attn

    @property
    def forward(self) -> float:
        return self.linears_total + self.attention

    @property
    def dit(self) -> float:
        return self.forwards * self.forward

    @property
    def decoder(self) -> float:
        return self.decoder_conv + self.decoder_attn

    @property
    def total(self) -> float:
        return self.dit + self.decoder

    def as_dict(self) -> dict:
        """Fields and totals, JSON-ready (benchmark extra_info)."""
        out = asdict(self)
        for name in ("small_linears", "linears_total", "attention", "forward", "dit", "decoder", "total"):
            out[name] = getattr(self, name)
        return out


# ---- DiT ------------------------------------------------------------------------------------------

def _kv_frames(cfg: EngineConfig, block_index: int | None) -> int:
    """Latent frames a block attends to: the whole window at steady state, fewer while it fills."""
    c = cfg.cache
    if block_index is None:
        return c.window_frames
    if block_index < 0:
        raise ValueError(f"block_index must be >= 0 or None (steady state), got {block_index}")
    return min((block_index + 1) * c.block_frames, c.window_frames)


def _dit_forward(cfg: EngineConfig, kv_frames: int) -> dict[str, float]:
    dit, frames = cfg.dit, cfg.cache.block_frames
    d, layers = dit.dim, dit.num_layers
    lq = frames * cfg.tokens_per_frame
    lk = kv_frames * cfg.tokens_per_frame
    patch = math.prod(dit.patch_size)
    per_token_layer = 4 * d * d + 2 * d * d + 2 * d * dit.ffn_dim
    time_per_frame = dit.freq_dim * d + d * d + d * 6 * d
    audio_per_frame = (dit.audio_pack * dit.audio_feature_dim * dit.audio_hidden
                       + len(dit.audio_layers) * dit.audio_hidden * d)
    return {
        "q_tokens": lq,
        "kv_tokens": lk,
        "linears": 2.0 * per_token_layer * layers * lq,
        "patch_embed": 2.0 * dit.in_dim * patch * d * lq,
        "head": 2.0 * d * dit.out_dim * patch * lq,
        "time_embed": 2.0 * time_per_frame * frames,
        "audio_proj": 2.0 * audio_per_frame * frames,
        "self_attn": 4.0 * lq * lk * d * layers,
        "cross_attn": 4.0 * lq * dit.text_len * d * layers,
    }


# ---- Wan2.1 VAE decoder ---------------------------------------------------------------------------

def _conv(name: str, cin: int, cout: int, kernel: int, t: int, h: int, w: int) -> Layer:
    """A convolution with `kernel` taps per input channel producing t*h*w output positions."""
    return Layer(name, "conv", 2.0 * cin * cout * kernel * t * h * w)


def _res_block(name: str, cin: int, cout: int, t: int, h: int, w: int) -> list[Layer]:
    # RMS_norm, SiLU, causal 3x3x3, RMS_norm, SiLU, causal 3x3x3; 1x1x1 shortcut when widths differ.
    # The 2-frame causal cache means a chunk of t frames produces exactly t output frames.
    layers = [_conv(f"{name}.conv1", cin, cout, 27, t, h, w), _conv(f"{name}.conv2", cout, cout, 27, t, h, w)]
    if cin != cout:
        layers.append(_conv(f"{name}.shortcut", cin, cout, 1, t, h, w))
    return layers


def _attn_block(name: str, c: int, t: int, h: int, w: int) -> list[Layer]:
    # Single-head attention over the h*w positions of each frame, 1x1 convs for QKV and output.
    n = h * w
    return [_conv(f"{name}.to_qkv", c, 3 * c, 1, t, h, w),
            Layer(f"{name}.sdpa", "attn", 4.0 * n * n * c * t),
            _conv(f"{name}.proj", c, c, 1, t, h, w)]


def wan_decoder_layers(vae: VAEConfig, latent_h: int, latent_w: int, first_chunk: bool = False) -> list[Layer]:
    """Every counted op of the Wan2.1 decoder for ONE latent frame (it decodes frame by frame).

    Steady state: each 'upsample3d' runs its time_conv (dim -> 2*dim, kernel 3x1x1) and doubles the
    frames, so one latent frame gives temporal_factor video frames. On the first chunk the upstream
    code skips time_conv ('Rep' marker), so the first latent frame gives one video frame.
    """
    dims = [vae.base_dim * m for m in (vae.dim_mult[-1], *vae.dim_mult[::-1])]
    t_up = vae.temporal_downsample[::-1]
    t, h, w = 1, latent_h, latent_w
    layers = [_conv("conv2", vae.z_dim, vae.z_dim, 1, t, h, w),  # WanVAE_.conv2, before the decoder
              _conv("conv1", vae.z_dim, dims[0], 27, t, h, w)]
    layers += _res_block("middle.0", dims[0], dims[0], t, h, w)
    layers += _attn_block("middle.1", dims[0], t, h, w)
    layers += _res_block("middle.2", dims[0], dims[0], t, h, w)
    n_stages = len(dims) - 1
    for i in range(n_stages):
        # Every Resample halves the width, so stages after the first take half of dims[i]
        # (upstream hard-codes i in (1, 2, 3), which is the same rule for 4 stages).
        cin, cout = (dims[i] if i == 0 else dims[i] // 2), dims[i + 1]
        for r in range(vae.num_res_blocks + 1):
            layers += _res_block(f"up.{i}.res{r}", cin, cout, t, h, w)
            cin = cout
        if i == n_stages - 1:
            break
        if t_up[i] and not first_chunk:
            layers.append(_conv(f"up.{i}.time_conv", cout, 2 * cout, 3, t, h, w))
            t *= 2
        h, w = 2 * h, 2 * w  # nearest-exact upsample, then a per-frame 3x3 Conv2d to cout // 2
        layers.append(_conv(f"up.{i}.resample", cout, cout // 2, 9, t, h, w))
    layers.append(_conv("head", dims[-1], 3, 27, t, h, w))
    return layers


# ---- TAEHV decoder (madebyollin/taehv, Wan 2.1 variant) ---------------------------------------------

TAEHV_WIDTHS = (256, 128, 64, 64)


def taehv_decoder_layers(cfg: EngineConfig) -> list[Layer]:
    """Every counted op of TAEHV's decoder for ONE latent frame.

    Layout: conv(z -> 256); per stage s in 0..2: 3 MemBlocks (conv 3x3 over [x, memory] = 2n -> n,
    then two n -> n 3x3), 2x spatial upsample, TGrow (1x1 conv n -> n*stride, reshaped to stride
    frames), conv 3x3 n -> next width; then conv 3x3 64 -> 3. The Wan variant grows time at the last
    two stages (decoder_time_upscale = (False, True, True)), i.e. 4 frames per latent frame; TAEHV
    always runs the time growth, its first frames are trimmed (compute is the same every frame).
    """
    vae = cfg.vae
    stages = len(TAEHV_WIDTHS) - 1
    if vae.spatial_factor != 2 ** stages:
        raise ValueError(f"TAEHV upsamples 2x in space at each of its {stages} stages (factor {2 ** stages}); "
                         f"this config's VAE has spatial factor {vae.spatial_factor}")
    n_time = int(math.log2(vae.temporal_factor))
    if n_time > stages:
        raise ValueError(f"TAEHV can grow time at most 2^{stages}x, config needs {vae.temporal_factor}x")
    time_up = (False,) * (stages - n_time) + (True,) * n_time
    nf = TAEHV_WIDTHS
    (h, w), t = cfg.latent_hw, 1
    layers = [_conv("conv_in", vae.z_dim, nf[0], 9, t, h, w)]
    for s in range(stages):
        n = nf[s]
        for m in range(3):
            layers += [_conv(f"s{s}.mem{m}.conv0", 2 * n, n, 9, t, h, w),
                       _conv(f"s{s}.mem{m}.conv1", n, n, 9, t, h, w),
                       _conv(f"s{s}.mem{m}.conv2", n, n, 9, t, h, w)]
        h, w = 2 * h, 2 * w
        stride = 2 if time_up[s] else 1
        layers.append(_conv(f"s{s}.tgrow", n, n * stride, 1, t, h, w))  # a learned 1x1 even at stride 1
        t *= stride
        layers.append(_conv(f"s{s}.proj", n, nf[s + 1], 9, t, h, w))
    layers.append(_conv("conv_out", nf[-1], 3, 9, t, h, w))
    return layers


def _sum(layers: list[Layer], kind: str) -> float:
    return sum(layer.flops for layer in layers if layer.kind == kind)


def _decoder_flops(cfg: EngineConfig, decoder: str, block_index: int | None) -> tuple[float, float]:
    """(conv, attn) FLOPs to decode one block's latent frames."""
    frames = cfg.cache.block_frames
    if decoder == "taehv":
        per_frame = taehv_decoder_layers(cfg)
        return frames * _sum(per_frame, "conv"), frames * _sum(per_frame, "attn")
    if decoder != "wan":
        raise ValueError(f"unknown decoder {decoder!r}; expected 'wan' or 'taehv'")
    steady = wan_decoder_layers(cfg.vae, *cfg.latent_hw)
    per_frame = [steady] * frames
    if block_index == 0:  # the stream's first latent frame skips time_conv and gives one frame
        per_frame[0] = wan_decoder_layers(cfg.vae, *cfg.latent_hw, first_chunk=True)
    return sum(_sum(f, "conv") for f in per_frame), sum(_sum(f, "attn") for f in per_frame)


# ---- public API -----------------------------------------------------------------------------------

def block_flops(cfg: EngineConfig, decoder: Decoder = "wan", block_index: int | None = None) -> BlockFlops:
    """FLOPs of one block. block_index None = steady state (full window); 0, 1, ... = while filling."""
    forward = _dit_forward(cfg, _kv_frames(cfg, block_index))
    conv, attn = _decoder_flops(cfg, decoder, block_index)
    return BlockFlops(
        text_len=cfg.dit.text_len,
        forwards=cfg.sampler.num_steps + 1,
        latent_frames=cfg.cache.block_frames,
        video_frames=cfg.video_frames_in_block(1 if block_index is None else block_index),
        decoder_name=decoder, decoder_conv=conv, decoder_attn=attn,
        **forward,
    )


def achieved(flops: float | BlockFlops, seconds: float, peak_tflops: float = PEAK_TFLOPS_BF16) -> dict:
    """Achieved TFLOP/s for `flops` done in `seconds`, and the fraction of the floor reached.

    fraction_of_floor = floor time / measured time (= achieved / peak); 1.0 means at the floor.
    """
    total = flops.total if isinstance(flops, BlockFlops) else float(flops)
    if not seconds > 0:
        raise ValueError(f"seconds must be > 0, got {seconds}")
    if not peak_tflops > 0:
        raise ValueError(f"peak_tflops must be > 0, got {peak_tflops}")
    if total < 0:
        raise ValueError(f"flops must be >= 0, got {total}")
    floor_s = total / (peak_tflops * 1e12)
    return {"flops": total, "seconds": seconds, "tflops": total / seconds / 1e12,
            "peak_tflops": peak_tflops, "floor_seconds": floor_s, "fraction_of_floor": floor_s / seconds}


@dataclass(frozen=True)
class Floor:
    """Lower bounds on the time of one steady-state block, in ms, and the FPS they allow."""

    dit_ms: float
    wan_ms: float  # DiT + Wan VAE decode, sequential
    taehv_ms: float  # DiT + TAEHV decode, sequential
    first_block_ms: float  # block 0's denoising forwards only (short window, no refresh, no decode)
    video_frames: int

    def fps(self, ms: float) -> float:
        return self.video_frames / (ms / 1e3)

    def as_dict(self) -> dict:
        out = asdict(self)
        for name in ("dit", "wan", "taehv"):
            out[f"{name}_fps"] = self.fps(getattr(self, f"{name}_ms"))
        return out


def _ms(flops: float, tflops: float) -> float:
    return flops / (tflops * 1e12) * 1e3


def floor_ms(cfg: EngineConfig, tflops_gemm: float = PEAK_TFLOPS_BF16,
             tflops_attn: float | None = None, tflops_conv: float | None = None) -> Floor:
    """Compute floor of a steady-state block: every FLOP at the given rate for its kind.

    Linears run at `tflops_gemm`, attention (DiT and the VAE's) at `tflops_attn`, decoder
    convolutions at `tflops_conv`; the unset rates default to `tflops_gemm` (the "ideal" rows).
    """
    attn = tflops_gemm if tflops_attn is None else tflops_attn
    conv = tflops_gemm if tflops_conv is None else tflops_conv
    for name, rate in (("tflops_gemm", tflops_gemm), ("tflops_attn", attn), ("tflops_conv", conv)):
        if not rate > 0:
            raise ValueError(f"{name} must be > 0, got {rate}")
    wan, tae, first = block_flops(cfg, "wan"), block_flops(cfg, "taehv"), block_flops(cfg, "wan", block_index=0)

    def forwards(b: BlockFlops, n: int) -> float:
        return _ms(n * b.linears_total, tflops_gemm) + _ms(n * b.attention, attn)

    def decode(b: BlockFlops) -> float:
        return _ms(b.decoder_conv, conv) + _ms(b.decoder_attn, attn)

    dit = forwards(wan, wan.forwards)
    return Floor(dit_ms=dit, wan_ms=dit + decode(wan), taehv_ms=dit + decode(tae),
                 first_block_ms=forwards(first, cfg.sampler.num_steps), video_frames=wan.video_frames)
