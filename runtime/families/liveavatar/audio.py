"""Audio side of the S2V trunk: `casual_audio_encoder` (sic, the release's key) and `audio_injector`.

Source: wan/modules/s2v/audio_utils.py (CausalAudioEncoder, AudioInjector_WAN) and auxi_blocks.py
(CausalConv1d, MotionEncoder_tc) of Wan2.2; Live Avatar reuses them unchanged.

Encoder, per block of video frames:
  features [B, 25 layers, 1024, T] -> SiLU-weighted mean over layers -> [B, T, 1024]
  local:  conv1_local (1024 -> 4 heads x dim/4, k3) -> split heads -> LN+SiLU -> conv2 (k3, stride 2)
          -> LN+SiLU -> conv3 (k3, stride 2) -> LN+SiLU -> 4 tokens per latent frame, + a learned
          padding token = 5 tokens
  global: conv1_global (1024 -> dim/4) -> the same conv2/conv3 (shared weights) -> final_linear -> 1 token
Every conv pads only on the left, replicating the first frame, so output k sees inputs <= 4k: causal.
Upstream runs it in fp32 (autocast float32) whatever the model dtype; so does this.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import LiveAvatarConfig
from .layers import AdaLayerNorm, Attention, layer_norm

ENCODER_EPS = 1e-6  # MotionEncoder_tc's LayerNorms
INJECTOR_EPS = 1e-6  # AudioCrossAttention keeps WanSelfAttention's default q/k RMSNorm eps


class CausalConv1d(nn.Module):
    """Conv1d with (kernel - 1) frames of replicate padding on the left only (key `<name>.conv`)."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv1d(cin, cout, kernel, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, C, T] fp32 -> [N, C', ceil(T / stride)]."""
        x = F.pad(x, (self.conv.kernel_size[0] - 1, 0), mode="replicate")
        return F.conv1d(x, self.conv.weight.float(), self.conv.bias.float(), stride=self.conv.stride)


def _norm_silu(x: torch.Tensor) -> torch.Tensor:
    """[N, C, T] -> LayerNorm over C (no affine) + SiLU, same layout."""
    return F.silu(layer_norm(x.transpose(1, 2), ENCODER_EPS)).transpose(1, 2)


class MotionEncoderTC(nn.Module):
    """MotionEncoder_tc with need_global=True (enable_adain in the 14B config): key `encoder`."""

    def __init__(self, in_dim: int, dim: int, num_tokens: int):
        super().__init__()
        self.num_tokens = num_tokens
        self.conv1_local = CausalConv1d(in_dim, dim // 4 * num_tokens, 3)
        self.conv1_global = CausalConv1d(in_dim, dim // 4, 3)
        self.conv2 = CausalConv1d(dim // 4, dim // 2, 3, stride=2)
        self.conv3 = CausalConv1d(dim // 2, dim, 3, stride=2)
        self.final_linear = nn.Linear(dim, dim)
        self.padding_tokens = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def _downsample(self, x: torch.Tensor) -> torch.Tensor:
        """The shared tail: [N, dim/4, T] (after conv1) -> [N, T', dim], T' = ceil(ceil(T/2)/2)."""
        x = self.conv2(_norm_silu(x))
        x = self.conv3(_norm_silu(x))
        return _norm_silu(x).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, in_dim] fp32 -> (global [B, T', 1, dim], local [B, T', num_tokens + 1, dim])."""
        B = x.shape[0]
        x = x.transpose(1, 2)
        local = self.conv1_local(x)  # [B, tokens * dim/4, T]; channel = token * dim/4 + c ("(n c)")
        local = local.unflatten(1, (self.num_tokens, -1)).flatten(0, 1)  # [(B tokens), dim/4, T]
        local = self._downsample(local).unflatten(0, (B, self.num_tokens)).transpose(1, 2)  # [B, T', n, dim]
        pad = self.padding_tokens.float().expand(B, local.shape[1], 1, -1)
        local = torch.cat([local, pad], dim=2)
        glob = self._downsample(self.conv1_global(x))
        glob = F.linear(glob, self.final_linear.weight.float(), self.final_linear.bias.float())
        return glob[:, :, None], local


class CausalAudioEncoder(nn.Module):
    """`casual_audio_encoder`: learned layer weights (1, layers, 1, 1) + the conv encoder."""

    def __init__(self, cfg: LiveAvatarConfig):
        super().__init__()
        self.weights = nn.Parameter(torch.full((1, cfg.audio_layers, 1, 1), 0.01))
        self.encoder = MotionEncoderTC(cfg.audio_dim, cfg.dim, cfg.audio_tokens)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """features [B, layers, audio_dim, T] -> (global [B, T', 1, dim], local [B, T', 5, dim]), fp32."""
        w = F.silu(self.weights.float())
        mixed = (features.float() * w / w.sum(dim=1, keepdim=True)).sum(dim=1)  # [B, audio_dim, T]
        return self.encoder(mixed.transpose(1, 2))


class AudioInjector(nn.Module):
    """`audio_injector`: after each listed block, every latent frame's tokens cross-attend to that
    frame's 5 audio tokens, with an AdaLayerNorm on the frame's global audio token (adain_mode
    "attn_norm"). `injector_pre_norm_feat/_vec` exist upstream but are parameter-free and unused in
    this mode, so they have no tensors and no place here."""

    def __init__(self, cfg: LiveAvatarConfig):
        super().__init__()
        n = len(cfg.audio_inject_layers)
        self.injector = nn.ModuleList(Attention(cfg.dim, cfg.num_heads, INJECTOR_EPS) for _ in range(n))
        self.injector_adain_layers = nn.ModuleList(AdaLayerNorm(cfg.dim, cfg.adain_eps) for _ in range(n))

    def forward(self, index: int, h: torch.Tensor, audio_global: torch.Tensor,
                audio_local: torch.Tensor) -> torch.Tensor:
        """h [B, F*T, dim] noisy tokens; audio_global [B, F, dim]; audio_local [B, F, 5, dim].

        Returns the residual to add to h (upstream adds it to the noisy tokens only).
        """
        B, F_ = audio_local.shape[:2]
        frames = h.unflatten(1, (F_, -1)).flatten(0, 1)  # [(B F), T, dim]
        x = self.injector_adain_layers[index](frames, audio_global.flatten(0, 1))
        attn = self.injector[index]
        k, v = attn.key_value(audio_local.flatten(0, 1))
        return attn.cross(x, k, v).unflatten(0, (B, F_)).flatten(1, 2)
