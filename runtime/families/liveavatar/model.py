"""The Live Avatar / Wan2.2-S2V-14B trunk, eager PyTorch: the numerical reference for later fast paths.

Parameter names and shapes are the release's (1260 tensors for `liveavatar-14b`; tests check every
one). The forward follows Live Avatar's causal model (liveavatar/models/wan/causal_model_s2v.py),
not Wan2.2's offline S2V forward:
- The condition tokens (reference frame + FramePack motion tokens) go through every block in a pass
  of their own (`encode_condition`, upstream's "sink" forward): modulated with the t = 0 slot, they
  attend only to each other, get no audio, and leave per-layer K (un-roped) and V behind.
- A block of noisy latent frames (`forward_block`) is modulated per frame with its timestep t, attends
  to its own keys and to the condition keys (roped at read time, so the reference frame's temporal
  index can move later: the rolling sink), and gets the audio injected after the listed blocks.
That is the attention pattern Live Avatar was distilled with (its training block mask: condition
queries see only condition keys; noisy queries see their block, earlier blocks and the condition).
Earlier blocks' keys (the per-step KV ring) come in through `forward_block(history=...)`: the ring
stores each layer's un-roped keys and hands back what the block attends to (kv_ring.py, stream.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .audio import AudioInjector, CausalAudioEncoder
from .config import LiveAvatarConfig, resolve_config
from .layers import Attention, Block, Head, attend, layer_norm
from .motion import (
    FramePackMotioner,
    check_motion_grid,
    motion_positions,
    noisy_positions,
    reference_positions,
)
from .rope import Positions, Rope, apply_rope

COND_NOISY, COND_REFERENCE, COND_MOTION = 0, 1, 2  # trainable_cond_mask rows


def sinusoidal_embedding(freq_dim: int, t: torch.Tensor) -> torch.Tensor:
    """Wan's time embedding: cos half then sin half, in float64 (t [N] -> [N, freq_dim])."""
    half = freq_dim // 2
    pos = t.detach().to("cpu", torch.float64)
    arg = torch.outer(pos, torch.pow(10000.0, -torch.arange(half, dtype=torch.float64) / half))
    return torch.cat([torch.cos(arg), torch.sin(arg)], dim=1)


def _linear_fp32(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """What upstream's autocast(float32) regions do with bf16 weights: the product in fp32."""
    return F.linear(x.float(), linear.weight.float(), linear.bias.float())


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [B, L, dim] (fp32), shift/scale [B, G, dim]: G equal groups of tokens (frames, or 1)."""
    G = shift.shape[1]
    return (x.unflatten(1, (G, -1)) * (1 + scale[:, :, None]) + shift[:, :, None]).flatten(1, 2)


def _gate(y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    return (y.float().unflatten(1, (gate.shape[1], -1)) * gate[:, :, None]).flatten(1, 2)


def _per_frame(t, batch: int, frames: int) -> torch.Tensor:
    """A timestep as a number, [B] or [B, F] -> [B, F] (every frame of a block shares it upstream)."""
    t = torch.as_tensor(t, dtype=torch.float64)
    if t.dim() == 0:
        return t.expand(batch, frames)
    if t.dim() == 1:
        return t[:, None].expand(batch, frames)
    return t


@dataclass
class TimeMod:
    """Modulation inputs from the timesteps, fp32 (upstream: zero_timestep=True, two slots)."""

    noisy: torch.Tensor  # [B, F, 6, dim]: time_projection(t) per noisy frame
    cond: torch.Tensor   # [B, 1, 6, dim]: time_projection(0), for reference and motion tokens
    head: torch.Tensor   # [B, F, dim]: time_embedding(t), for the head

    @staticmethod
    def cat(mods: list[TimeMod]) -> TimeMod:
        """The modulation of several sessions' rows, batched in order."""
        return TimeMod(*(torch.cat([getattr(m, f) for m in mods]) for f in ("noisy", "cond", "head")))


@dataclass
class AudioTokens:
    """The audio condition of a block of latent frames, model dtype."""

    global_: torch.Tensor  # [B, F, dim]: conditions the AdaLayerNorm
    local: torch.Tensor    # [B, F, audio_tokens + 1, dim]: cross-attention context


@dataclass
class Condition:
    """The reference + motion tokens after the condition pass: what a per-step cache holds."""

    keys: list[torch.Tensor]    # per layer [B, Lc, H, D], un-roped
    values: list[torch.Tensor]  # per layer [B, Lc, H, D]
    positions: Positions        # RoPE indices, reference frame at ref_rope_frame
    is_reference: np.ndarray    # [Lc] bool: tokens whose frame index follows the rolling sink
    token_hw: tuple[int, int]


class History(Protocol):
    """One denoising step's KV ring as `forward_block` sees it (runtime/families/liveavatar/kv_ring.py).

    Called once per layer with the block's keys (roped at their absolute frame indices) and values
    [B, L, H, D]: stores them, and returns every key (roped alike) and value the block's queries attend
    to besides the condition (its own included), with a [Lk] bool mask of the valid ones.
    """

    def __call__(self, layer: int, k: torch.Tensor, v: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...


@dataclass
class RowInputs:
    """What the rows of one session attend to in a batched `forward_rows`: its prompt, condition and
    ring, and where its block sits. A session is `cond`'s batch size rows of x (1 for a stream)."""

    text_kv: list[tuple[torch.Tensor, torch.Tensor]]
    cond: Condition
    first_frame: int = 0
    ref_frame: int | None = None
    history: History | None = None

    @property
    def rows(self) -> int:
        return self.cond.keys[0].shape[0]


@dataclass
class _LayerGroup:
    """One session's rows in one transformer block: the slice of the batch and what it attends to."""

    rows: slice
    rope: Rope                                      # of the rows' own tokens
    text_kv: tuple[torch.Tensor, torch.Tensor]
    context: tuple[torch.Tensor, torch.Tensor] | None = None  # roped condition keys, values
    history: object = None                          # (k, v) -> (keys, values, key_mask), or None


class LiveAvatarDiT(nn.Module):
    def __init__(self, cfg: LiveAvatarConfig):
        super().__init__()
        self.cfg = cfg
        d, c, p = cfg.dim, cfg.latent_channels, cfg.patch_size
        self.patch_embedding = nn.Conv3d(c, d, kernel_size=p, stride=p)
        self.cond_encoder = nn.Conv3d(c, d, kernel_size=p, stride=p)  # pose latents
        self.trainable_cond_mask = nn.Embedding(3, d)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, d), nn.GELU(approximate="tanh"), nn.Linear(d, d))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.blocks = nn.ModuleList(Block(d, cfg.ffn_dim, cfg.num_heads, cfg.eps) for _ in range(cfg.num_layers))
        self.head = Head(d, c * math.prod(p))
        self.casual_audio_encoder = CausalAudioEncoder(cfg)  # sic: the release's key
        self.audio_injector = AudioInjector(cfg)
        self.frame_packer = FramePackMotioner(cfg)

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embedding.weight.dtype

    # ---- conditioning, computed once per timestep / prompt / audio block / reference --------------
    @torch.no_grad()
    def time_mod(self, t: torch.Tensor) -> TimeMod:
        """t [B, F] timesteps of the noisy frames; the t = 0 slot is appended as upstream does."""
        B, nf = t.shape
        d = self.cfg.dim
        device = self.patch_embedding.weight.device
        sin = sinusoidal_embedding(self.cfg.freq_dim, torch.cat([t.flatten(), t.new_zeros(1)])).float()
        te = self.time_embedding
        e = _linear_fp32(te[2], F.silu(_linear_fp32(te[0], sin.to(device))))
        proj = _linear_fp32(self.time_projection[1], F.silu(e)).unflatten(-1, (6, d))
        cond = proj[-1:].unsqueeze(0).expand(B, 1, 6, d)
        return TimeMod(noisy=proj[:-1].view(B, nf, 6, d), cond=cond, head=e[:-1].view(B, nf, d))

    @torch.no_grad()
    def text_kv(self, prompt_embeds: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """prompt_embeds [B, L <= text_len, text_dim] -> per layer cross-attention (k, v) [B, text_len, H, D].

        Zero-padded to text_len before the embedding, as upstream: padded rows are not zero after it.
        """
        B, L, _ = prompt_embeds.shape
        if L > self.cfg.text_len:
            raise ValueError(f"prompt has {L} tokens; the model takes at most text_len={self.cfg.text_len}")
        pad = prompt_embeds.new_zeros(B, self.cfg.text_len - L, prompt_embeds.shape[-1])
        ctx = self.text_embedding(torch.cat([prompt_embeds, pad], dim=1).to(self.dtype))
        return [blk.cross_attn.key_value(ctx) for blk in self.blocks]

    @torch.no_grad()
    def encode_audio(self, features: torch.Tensor) -> AudioTokens:
        """features [B, audio_layers, audio_dim, 4F] for the block's video frames -> tokens for F latents.

        Upstream prepends `audio_prepend_frames` copies of the first frame and drops the first
        ceil(prepend / 4) outputs; then latent frame m sees audio frames <= 4m + 3 (causal).
        """
        cfg = self.cfg
        if features.shape[1:3] != (cfg.audio_layers, cfg.audio_dim) or features.shape[-1] % 4:
            raise ValueError(f"audio features must be [B, {cfg.audio_layers}, {cfg.audio_dim}, 4 * frames], "
                             f"got {tuple(features.shape)}")
        lead = features[..., :1].expand(*features.shape[:-1], cfg.audio_prepend_frames)
        glob, local = self.casual_audio_encoder(torch.cat([lead, features], dim=-1))
        drop = cfg.audio_drop_tokens
        return AudioTokens(glob[:, drop:, 0].to(self.dtype), local[:, drop:].to(self.dtype))

    def _patch_tokens(self, conv: nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
        return conv(x.to(self.dtype)).flatten(2).transpose(1, 2)

    @torch.no_grad()
    def encode_condition(self, ref_latent: torch.Tensor, motion_latents: torch.Tensor,
                         text_kv: list[tuple[torch.Tensor, torch.Tensor]]) -> Condition:
        """The condition pass: ref_latent [B, C, 1, h, w], motion_latents [B, C, T, h, w] -> Condition."""
        if ref_latent.shape[2] != 1:
            raise ValueError(f"the reference is one latent frame, got {ref_latent.shape[2]}")
        latent_hw = tuple(ref_latent.shape[-2:])
        if tuple(motion_latents.shape[-2:]) != latent_hw:
            raise ValueError(f"motion latents {tuple(motion_latents.shape)} and reference "
                             f"{tuple(ref_latent.shape)} differ in size")
        check_motion_grid(self.cfg, latent_hw)
        mask = self.trainable_cond_mask.weight
        ref = self._patch_tokens(self.patch_embedding, ref_latent) + mask[COND_REFERENCE]
        mot = self.frame_packer(motion_latents.to(self.dtype)) + mask[COND_MOTION]
        token_hw = (latent_hw[0] // self.cfg.patch_size[1], latent_hw[1] // self.cfg.patch_size[2])
        positions = Positions.concat(reference_positions(self.cfg, token_hw), motion_positions(self.cfg, token_hw))
        is_ref = np.arange(len(positions)) < ref.shape[1]
        rope = Rope.of(positions, self.cfg.rope_split, self.cfg.rope_theta, ref.device)
        cond_mod = self.time_mod(ref.new_zeros(ref.shape[0], 1)).cond
        h, keys, values = torch.cat([ref, mot], dim=1), [], []
        for blk, tkv in zip(self.blocks, text_kv):
            h, k, v = self._block_pass(blk, h, cond_mod, [_LayerGroup(slice(None), rope, tkv)])
            keys.append(k)
            values.append(v)
        return Condition(keys, values, positions, is_ref, token_hw)

    # ---- one denoising call for a block of noisy latent frames ------------------------------------
    @torch.no_grad()
    def forward_block(self, x: torch.Tensor, mod: TimeMod, audio: AudioTokens,
                      text_kv: list[tuple[torch.Tensor, torch.Tensor]], cond: Condition,
                      first_frame: int = 0, ref_frame: int | None = None,
                      pose_latents: torch.Tensor | None = None,
                      history: History | None = None) -> torch.Tensor:
        """x [B, C, F, h, w] noisy latents -> velocity [B, C, F, h, w] (model dtype).

        first_frame: temporal RoPE index of the block's first frame (its place in the stream).
        ref_frame: temporal RoPE index the reference tokens are read at (default ref_rope_frame).
        pose_latents: [B, C, F, h, w] or None (no pose video: cond_encoder of zeros = its bias).
        history: the KV ring of this denoising step (see `History`), or None for a block with no past.
        Temporal indices are absolute (angles in float64 from the integers: no precision lost far
        into a stream), as upstream ropes them.
        """
        row = RowInputs(text_kv, cond, first_frame, ref_frame, history)
        return self.forward_rows(x, mod, audio, [row], pose_latents)

    @torch.no_grad()
    def forward_rows(self, x: torch.Tensor, mod: TimeMod, audio: AudioTokens, rows: list[RowInputs],
                     pose_latents: torch.Tensor | None = None) -> torch.Tensor:
        """`forward_block` of several sessions at once: x holds rows[0]'s batch rows, then rows[1]'s, ...
        (mod, audio and pose_latents alike). Every matmul over tokens (q/k/v/o, FFN, cross-attention
        q/o, audio injection, head) runs once over the whole batch; attention runs per session, over its
        own prompt, condition and ring at its own positions. A session's rows equal its forward_block
        alone up to the matmuls' rounding at another batch size."""
        nf, lh, lw = x.shape[2:]
        token_hw = (lh // self.cfg.patch_size[1], lw // self.cfg.patch_size[2])
        self._check_block_inputs(x, mod, audio, rows, token_hw)
        h = self._embed_noisy(x, pose_latents)
        starts = np.cumsum([0] + [r.rows for r in rows])
        ropes = [self._row_ropes(r, nf, token_hw, h.device) for r in rows]
        inject = {layer: j for j, layer in enumerate(self.cfg.audio_inject_layers)}
        for i, blk in enumerate(self.blocks):
            groups = [_LayerGroup(slice(a, z), rope, r.text_kv[i], (apply_rope(r.cond.keys[i], cond_rope),
                                  r.cond.values[i]), None if r.history is None else partial(r.history, i))
                      for a, z, r, (rope, cond_rope) in zip(starts[:-1], starts[1:], rows, ropes)]
            h, _, _ = self._block_pass(blk, h, mod.noisy, groups)
            if i in inject:
                h = h + self.audio_injector(inject[i], h, audio.global_, audio.local)
        return self._head(h, mod.head, nf, token_hw)

    def _row_ropes(self, row: RowInputs, nf: int, token_hw: tuple[int, int], device) -> tuple[Rope, Rope]:
        """A session's RoPE in a block: of its noisy tokens, and of its condition tokens (the
        reference at ref_frame: the rolling sink)."""
        split, theta = self.cfg.rope_split, self.cfg.rope_theta
        rope = Rope.of(noisy_positions(row.first_frame, nf, token_hw), split, theta, device)
        ref_frame = self.cfg.ref_rope_frame if row.ref_frame is None else row.ref_frame
        cond_pos = row.cond.positions.shift_frames(row.cond.is_reference, ref_frame - self.cfg.ref_rope_frame)
        return rope, Rope.of(cond_pos, split, theta, device)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, t: torch.Tensor, ref_latent: torch.Tensor, motion_latents: torch.Tensor,
                prompt_embeds: torch.Tensor, audio_features: torch.Tensor,
                pose_latents: torch.Tensor | None = None) -> torch.Tensor:
        """One denoising call on the first block of a stream (no earlier blocks): velocity of x.

        t: a number or [B] or [B, F] timesteps. Everything a stream reuses (text K/V, condition pass,
        audio tokens) is recomputed here; the streaming engine calls the pieces instead.
        """
        B, _, nf = x.shape[:3]
        text_kv = self.text_kv(prompt_embeds)
        cond = self.encode_condition(ref_latent, motion_latents, text_kv)
        mod = self.time_mod(_per_frame(t, B, nf))
        return self.forward_block(x, mod, self.encode_audio(audio_features), text_kv, cond, pose_latents=pose_latents)

    # ---- internals --------------------------------------------------------------------------------
    def _check_block_inputs(self, x, mod: TimeMod, audio: AudioTokens, rows: list[RowInputs], token_hw) -> None:
        B, C, nf = x.shape[:3]
        if C != self.cfg.latent_channels:
            raise ValueError(f"noisy latents have {C} channels, the model takes {self.cfg.latent_channels}")
        if mod.noisy.shape[:2] != (B, nf):
            raise ValueError(f"timesteps are for {tuple(mod.noisy.shape[:2])} (batch, frames), x is ({B}, {nf})")
        if audio.local.shape[:2] != (B, nf):
            raise ValueError(f"audio tokens cover {tuple(audio.local.shape[:2])} (batch, frames), x is ({B}, {nf})")
        if sum(r.rows for r in rows) != B:
            raise ValueError(f"the sessions' conditions hold {sum(r.rows for r in rows)} rows, x has {B}")
        for r in rows:
            if r.cond.token_hw != token_hw:
                raise ValueError(f"condition was encoded at {r.cond.token_hw} tokens, the block is {token_hw}")

    def _embed_noisy(self, x: torch.Tensor, pose_latents: torch.Tensor | None) -> torch.Tensor:
        h = self._patch_tokens(self.patch_embedding, x)
        if pose_latents is None:
            h = h + self.cond_encoder.bias  # cond_encoder(zeros): exactly its bias
        else:
            h = h + self._patch_tokens(self.cond_encoder, pose_latents)
        return h + self.trainable_cond_mask.weight[COND_NOISY]

    def _block_pass(self, blk: Block, h: torch.Tensor, mod: torch.Tensor, groups: list[_LayerGroup]):
        """One transformer block over tokens h [B, L, dim] in G = mod.shape[1] equal groups (frames).

        groups: the sessions in the batch (`_LayerGroup`): each one's rows attend to its own prompt,
        its condition keys (`context`, or none) and its ring (`history`: a callable (k, v) ->
        (keys, values, key_mask) that stores this layer's roped k and v and returns what the rows see
        instead of their own keys; None: they see their own keys).
        Returns (h, the sequence's un-roped keys, values). Residual in fp32 inside, model dtype out.
        """
        dtype, eps = h.dtype, self.cfg.eps
        shift1, scale1, gate1, shift2, scale2, gate2 = (blk.modulation.float()[:, None] + mod).unbind(2)
        x = _modulate(layer_norm(h, eps).to(dtype).float(), shift1, scale1).to(dtype)
        y, k, v = self._self_attention(blk.self_attn, x, groups)
        h = h.float() + _gate(y, gate1)
        normed = layer_norm(h.to(dtype), eps, blk.norm3.weight, blk.norm3.bias).to(dtype)
        h = h + self._cross_attention(blk.cross_attn, normed, groups).float()
        x = _modulate(layer_norm(h, eps), shift2, scale2).to(dtype)
        h = h + _gate(blk.ffn(x), gate2)
        return h.to(dtype), k, v

    @staticmethod
    def _self_attention(attn: Attention, x: torch.Tensor, groups: list[_LayerGroup]):
        q_all, k_all, v_all = attn.query_key_value(x)
        out = []
        for g in groups:
            q, k, v = apply_rope(q_all[g.rows], g.rope), apply_rope(k_all[g.rows], g.rope), v_all[g.rows]
            keys, values, mask = (k, v, None) if g.history is None else g.history(k, v)
            if g.context is not None:
                keys, values = torch.cat([keys, g.context[0]], dim=1), torch.cat([values, g.context[1]], dim=1)
                if mask is not None:  # the condition keys are always visible
                    mask = torch.cat([mask, mask.new_ones(g.context[0].shape[1])])
            out.append(attend(q, keys, values, mask))
        return attn.output(cat_rows(out)), k_all, v_all

    @staticmethod
    def _cross_attention(attn: Attention, x: torch.Tensor, groups: list[_LayerGroup]) -> torch.Tensor:
        q = attn.query(x)
        return attn.output(cat_rows([attend(q[g.rows], *g.text_kv) for g in groups]))

    def _head(self, h: torch.Tensor, e: torch.Tensor, nf: int, token_hw: tuple[int, int]) -> torch.Tensor:
        """CausalHead_S2V: per-frame shift/scale from time_embedding(t), product in fp32, then unpatchify."""
        shift, scale = (self.head.modulation.float()[:, None] + e[:, :, None]).unbind(2)
        x = _modulate(layer_norm(h, self.cfg.eps).to(h.dtype).float(), shift, scale)
        return self._unpatchify(_linear_fp32(self.head.head, x).to(h.dtype), nf, token_hw)

    def _unpatchify(self, x: torch.Tensor, nf: int, token_hw: tuple[int, int]) -> torch.Tensor:
        """b (f h w) (p q r c) -> b c (f p) (h q) (w r): channel index fastest, as the release."""
        B, (H, W), c = x.shape[0], token_hw, self.cfg.latent_channels
        pt, ph, pw = self.cfg.patch_size
        x = x.view(B, nf, H, W, pt, ph, pw, c).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(B, c, nf * pt, H * ph, W * pw)


def cat_rows(parts: list[torch.Tensor]) -> torch.Tensor:
    """The sessions' rows back in one batch (one session: its tensor as it is)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def build_liveavatar(config: LiveAvatarConfig | str = "liveavatar-14b", device=None,
                     dtype: torch.dtype | None = None) -> LiveAvatarDiT:
    """Build the trunk for a config or preset name; `device="meta"` allocates nothing."""
    cfg = resolve_config(config)
    with torch.device(device or "cpu"):
        model = LiveAvatarDiT(cfg)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval().requires_grad_(False)
