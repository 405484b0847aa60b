"""The causal audio DiT of the LiveTalk family, eager PyTorch: the numerical reference.

Parameter names and shapes are the release's (857 tensors for `livetalk-1.3b`). The forward runs one
block of latent frames against the session's KV ring: the block's keys/values are written into
their ring slots (un-roped in time: the ops class decides whether the position-invariant
height/width part is applied on the way, see runtime/models/ops.py), then its queries attend to every
valid slot with the frame rotation applied at read time. Which slots exist and where they sit in RoPE space is decided on the host by
`runtime.session.plan_block`, so the model itself never branches on stream position.

The four hot ops (qk-norm + KV write, window attention, LayerNorm + modulate, gated residual) go
through `runtime.models.ops.Ops`, so the Triton kernels replace them without touching this file.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import DiTConfig
from .ops import Ops
from .qkv import project_qkv


def sinusoidal_embedding(freq_dim: int, t: torch.Tensor) -> torch.Tensor:
    """Release time embedding: cos half then sin half, in float64 on the CPU (done once per timestep)."""
    half = freq_dim // 2
    pos = t.detach().to("cpu", torch.float64)
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64) / half)
    arg = torch.outer(pos.flatten(), freqs)
    return torch.cat([torch.cos(arg), torch.sin(arg)], dim=1).view(*t.shape, freq_dim)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))


class Attention(nn.Module):
    """q/k/v/o projections with q/k RMSNorm over the full width (self- and cross-attention alike)."""

    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)


class DiTBlock(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        d = cfg.dim
        self.modulation = nn.Parameter(torch.randn(1, 6, d) / d ** 0.5)
        self.self_attn = Attention(d, cfg.num_heads, cfg.eps)
        self.cross_attn = Attention(d, cfg.num_heads, cfg.eps)
        self.norm3 = nn.LayerNorm(d, eps=cfg.eps)
        self.ffn = nn.Sequential(nn.Linear(d, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, d))


class Head(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim ** 0.5)
        self.head = nn.Linear(cfg.dim, cfg.out_dim * math.prod(cfg.patch_size))


class AudioPack(nn.Module):
    """Groups `pack` consecutive video-frame features into one vector per latent frame."""

    def __init__(self, feature_dim: int, pack: int, hidden: int):
        super().__init__()
        self.pack = pack
        self.proj = nn.Linear(feature_dim * pack, hidden)
        self.norm_out = nn.LayerNorm(hidden)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        # feats [B, pack*F, C] -> [B, F, pack*C], frame index slower than channel ("(t h w c)" upstream).
        B, n, C = feats.shape
        return self.norm_out(self.proj(feats.reshape(B, n // self.pack, self.pack * C)))


@dataclass
class TimeMod:
    """Per-frame modulation from the timestep: `blocks` [B, F, 6, dim] and `head` [B, F, dim], fp32."""

    blocks: torch.Tensor
    head: torch.Tensor


@dataclass
class BlockPlan:
    """Where a block sits in the ring: see runtime.session.plan_block."""

    write_slots: torch.Tensor  # [B, Fq] int32: ring slot of each block frame
    slot_pos: torch.Tensor     # [B, S] int32: RoPE frame position of each slot (INVALID_POS = empty)
    q_pos: torch.Tensor        # [B, Fq] int32: RoPE frame position of each block frame


class CausalAudioDiT(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, d, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, d), nn.GELU(approximate="tanh"),
                                            nn.Linear(d, d))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)
        self.audio_proj = AudioPack(cfg.audio_feature_dim, cfg.audio_pack, cfg.audio_hidden)
        self.audio_cond_projs = nn.ModuleList(nn.Linear(cfg.audio_hidden, d) for _ in cfg.audio_layers)

    # ---- conditioning, computed once per prompt / timestep / block --------------------------------
    @torch.no_grad()
    def time_mod(self, t: torch.Tensor) -> TimeMod:
        """t [B, F] timesteps -> modulation. Float64 sinusoid on the host, cast to the model dtype."""
        p = self.time_projection[1].weight
        emb = self.time_embedding(sinusoidal_embedding(self.cfg.freq_dim, t).to(p.device, p.dtype))
        proj = self.time_projection(emb).unflatten(-1, (6, self.cfg.dim))
        return TimeMod(blocks=proj.float(), head=emb.float())

    @torch.no_grad()
    def text_kv(self, prompt_embeds: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """prompt_embeds [B, L<=text_len, text_dim] -> per layer (k, v) [B, text_len, H, D].

        Zero-padded to text_len before the embedding, as upstream (so padded rows are not zero after it).
        """
        B, L, _ = prompt_embeds.shape
        pad = prompt_embeds.new_zeros(B, self.cfg.text_len - L, prompt_embeds.shape[-1])
        ctx = self.text_embedding(torch.cat([prompt_embeds, pad], dim=1))
        H = self.cfg.num_heads
        out = []
        for blk in self.blocks:
            ca = blk.cross_attn
            k = Ops.rms_norm(ca.k(ctx), ca.norm_k.weight, ca.norm_k.eps).unflatten(-1, (H, -1))
            out.append((k, ca.v(ctx).unflatten(-1, (H, -1))))
        return out

    @torch.no_grad()
    def audio_cond(self, feats: torch.Tensor) -> torch.Tensor:
        """feats [B, pack*F, feature_dim] (per video frame, frame 0 already repeated) -> [B, F, A, dim]."""
        packed = self.audio_proj(feats)
        return torch.stack([proj(packed) for proj in self.audio_cond_projs], dim=2)

    # ---- the per-block forward ------------------------------------------------------------------
    @torch.no_grad()
    def forward_block(self, x: torch.Tensor, mod: TimeMod, audio: torch.Tensor,
                      text_kv: list[tuple[torch.Tensor, torch.Tensor]],
                      ring_k: torch.Tensor, ring_v: torch.Tensor, plan: BlockPlan, ops: Ops) -> torch.Tensor:
        """One block: x [B, in_dim, F, h, w] -> velocity [B, out_dim, F, h, w].

        ring_k / ring_v: [layers, B, S*T, H, D]; the block's K/V are written into them (side effect).
        """
        _, _, nf, lh, lw = x.shape
        _, ph, pw = self.cfg.patch_size
        grid = (lh // ph, lw // pw)
        T = grid[0] * grid[1]
        h = self.patch_embedding(x).flatten(2).transpose(1, 2).contiguous()  # [B, F*T, dim]
        first_audio = self.cfg.audio_layers[0]
        for i, blk in enumerate(self.blocks):
            if i in self.cfg.audio_layers:
                h = h + audio[:, :, i - first_audio].repeat_interleave(T, dim=1).to(h.dtype)
            h = self._block(blk, h, mod.blocks, text_kv[i], ring_k[i], ring_v[i], plan, ops, grid)
        shift, scale = (self.head.modulation.float()[:, None] + mod.head[:, :, None]).unbind(2)
        out = self.head.head(ops.layernorm_modulate(h, shift, scale, T, self.cfg.eps))
        return self.unpatchify(out, nf, grid)

    def _block(self, blk: DiTBlock, h, e, text_kv, ring_k, ring_v, plan: BlockPlan, ops: Ops, grid):
        T = grid[0] * grid[1]
        eps = self.cfg.eps
        shift1, scale1, gate1, shift2, scale2, gate2 = (blk.modulation.float()[:, None] + e).unbind(2)
        sa = blk.self_attn
        x = ops.layernorm_modulate(h, shift1, scale1, T, eps)
        q = ops.qk_norm_kv_write(*project_qkv(sa, x), sa.norm_q.weight, sa.norm_k.weight, eps,
                                 ring_k, ring_v, plan.write_slots, grid, self.cfg.rope_theta)
        attn = ops.window_attention(q, ring_k, ring_v, plan.slot_pos, plan.q_pos, grid, self.cfg.rope_theta)
        h = ops.gated_residual(h, sa.o(attn.flatten(2)), gate1, T)
        h = h + self._cross_attn(blk.cross_attn, blk.norm3(h), text_kv)
        x = ops.layernorm_modulate(h, shift2, scale2, T, eps)
        return ops.gated_residual(h, blk.ffn(x), gate2, T)

    def _cross_attn(self, ca: Attention, x: torch.Tensor, text_kv) -> torch.Tensor:
        k, v = text_kv
        q = Ops.rms_norm(ca.q(x), ca.norm_q.weight, ca.norm_q.eps).unflatten(-1, (ca.num_heads, -1))
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return ca.o(out.transpose(1, 2).flatten(2))

    def unpatchify(self, x: torch.Tensor, nf: int, grid: tuple[int, int]) -> torch.Tensor:
        """b (f h w) (x y z c) -> b c (f x) (h y) (w z): channel index fastest, as the release."""
        B = x.shape[0]
        px, py, pz = self.cfg.patch_size
        c = self.cfg.out_dim
        x = x.view(B, nf, grid[0], grid[1], px, py, pz, c).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(B, c, nf * px, grid[0] * py, grid[1] * pz)


def build_dit(config, device=None, dtype: torch.dtype | None = None) -> CausalAudioDiT:
    """Build the DiT for an EngineConfig or DiTConfig; `device="meta"` allocates nothing."""
    cfg = config.dit if hasattr(config, "dit") else config
    with torch.device(device or "cpu"):
        model = CausalAudioDiT(cfg)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval().requires_grad_(False)
