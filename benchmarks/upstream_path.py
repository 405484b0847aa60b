"""The plain eager DiT path, structured like the upstream reference code, for the side-by-side ratio.

Same module (`CausalAudioDiT`, same weights), same shapes and the same sampler arithmetic as
runtime/sampler.py, but a block runs the way upstream runs it (Self-Forcing style causal Wan code):
- the KV cache of each layer holds keys AFTER RoPE, in temporal order; every forward concatenates
  (`torch.cat`) the cached K/V with the current block's and calls SDPA on the result;
- RoPE is complex multiplication in float64 from a precomputed table of absolute frame positions
  (upstream's `rope_params`, 1024 positions, so a stream cannot be longer than that);
- the time embedding is recomputed on every forward (float64 sinusoid on the device);
- only the t=0 refresh forward commits the block's K/V; when the window is full the rolling region is
  shifted left with a clone (upstream's clone-shift eviction) before the next block;
- everything runs eagerly, one stage after the other.
Sink keys keep their absolute positions, so this equals `rope_mode="absolute"`; the `rolling` mode
has no upstream equivalent and is refused.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from runtime.config import CacheConfig, EngineConfig
from runtime.models.dit import CausalAudioDiT
from runtime.models.qkv import project_qkv

UPSTREAM_MAX_POSITIONS = 1024


def cached_frames_before(block_index: int, cache: CacheConfig) -> list[int]:
    """Latent frames an upstream cache holds when block `block_index` starts (after eviction).

    Sink frames stay forever; of the rest, only those that still fit in the window together with
    the new block are kept (the newest `window - sink` frames counting the block itself).
    """
    f0 = block_index * cache.block_frames
    f_end = f0 + cache.block_frames
    sink = list(range(min(cache.sink_frames, f0)))
    rolling = list(range(max(cache.sink_frames, f_end - cache.rolling_frames), f0))
    return sink + rolling


class ConcatKVCache:
    """Per layer a [B, window_frames * T, H, D] buffer of roped K (and V); the first `tokens` rows are valid."""

    def __init__(self, cfg: EngineConfig, batch: int, device, dtype):
        d, c = cfg.dit, cfg.cache
        self.cache_cfg = c
        self.T = cfg.tokens_per_frame
        shape = (batch, c.window_frames * self.T, d.num_heads, d.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(d.num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(d.num_layers)]
        self.frames: list[int] = []

    @property
    def tokens(self) -> int:
        return len(self.frames) * self.T

    def clear(self) -> None:
        self.frames = []

    def evict_for(self, block_index: int) -> None:
        """Drop the frames block `block_index` no longer sees: clone-shift the rolling region left."""
        keep = cached_frames_before(block_index, self.cache_cfg)
        kept = [f for f in self.frames if f in keep]
        n_sink = sum(f < self.cache_cfg.sink_frames for f in self.frames)
        evicted = len(self.frames) - len(kept)
        if evicted:
            if self.frames[n_sink:n_sink + evicted] != [f for f in self.frames if f not in keep]:
                raise AssertionError(f"evicting {sorted(set(self.frames) - set(keep))} from {self.frames}: "
                                     "not the oldest rolling frames")
            s0, n_ev, n_roll = n_sink * self.T, evicted * self.T, (len(kept) - n_sink) * self.T
            for buf in self.k + self.v:
                buf[:, s0:s0 + n_roll] = buf[:, s0 + n_ev:s0 + n_ev + n_roll].clone()
        self.frames = kept

    def concat(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.tokens
        return torch.cat([self.k[layer][:, :n], k], dim=1), torch.cat([self.v[layer][:, :n], v], dim=1)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the block's roped K and V after the cached rows (`commit` makes them count)."""
        n, L = self.tokens, k.shape[1]
        if n + L > self.k[layer].shape[1]:
            raise RuntimeError(f"upstream cache overflow: {n} cached + {L} new tokens > {self.k[layer].shape[1]}")
        self.k[layer][:, n:n + L] = k
        self.v[layer][:, n:n + L] = v

    def commit(self, frames: range) -> None:
        self.frames += list(frames)

    def prefill(self, block_index: int, generator: torch.Generator) -> None:
        """Random finite K/V for the frames block `block_index` sees: steady state without running blocks."""
        self.frames = cached_frames_before(block_index, self.cache_cfg)
        n = self.tokens
        for buf in self.k + self.v:
            buf[:, :n].normal_(generator=generator)


def rope_table(head_dim: int, theta: float, positions: int, device) -> list[torch.Tensor]:
    """Upstream `rope_params` for the (frame, height, width) parts: complex128 [positions, part / 2]."""
    hw = 2 * (head_dim // 6)
    tables = []
    for part in (head_dim - 2 * hw, hw, hw):
        freqs = 1.0 / theta ** (torch.arange(0, part, 2, dtype=torch.float64, device=device) / part)
        angles = torch.outer(torch.arange(positions, dtype=torch.float64, device=device), freqs)
        tables.append(torch.polar(torch.ones_like(angles), angles))
    return tables


def rope_apply_f64(x: torch.Tensor, table: list[torch.Tensor], f0: int, grid: tuple[int, int, int]) -> torch.Tensor:
    """x [B, F*T, H, D] rotated at absolute frame positions f0.. in float64 complex; returns x.dtype."""
    nf, gh, gw = grid
    B, L, H, D = x.shape
    ff, fh, fw = table
    freqs = torch.cat([ff[f0:f0 + nf].view(nf, 1, 1, -1).expand(nf, gh, gw, -1),
                       fh[:gh].view(1, gh, 1, -1).expand(nf, gh, gw, -1),
                       fw[:gw].view(1, 1, gw, -1).expand(nf, gh, gw, -1)], dim=-1).reshape(L, 1, D // 2)
    xc = torch.view_as_complex(x.to(torch.float64).reshape(B, L, H, D // 2, 2))
    return torch.view_as_real(xc * freqs).flatten(3).to(x.dtype)


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight.to(x.dtype)


def _modulate(h: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, nf: int, eps: float) -> torch.Tensor:
    """LayerNorm in fp32, then per-frame scale/shift on a [B, F, T, dim] view (upstream's unflatten)."""
    xn = F.layer_norm(h.float(), h.shape[-1:], eps=eps).unflatten(1, (nf, -1))
    return (xn * (1 + scale[:, :, None]) + shift[:, :, None]).flatten(1, 2).to(h.dtype)


def _gated_add(h: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, nf: int) -> torch.Tensor:
    out = h.float().unflatten(1, (nf, -1)) + y.float().unflatten(1, (nf, -1)) * gate[:, :, None]
    return out.flatten(1, 2).to(h.dtype)


class UpstreamDiT:
    """The DiT forward of one block, eager and upstream-structured, over a ConcatKVCache."""

    def __init__(self, dit: CausalAudioDiT, max_positions: int = UPSTREAM_MAX_POSITIONS):
        self.dit, self.cfg = dit, dit.cfg
        self.max_positions = max_positions
        device = dit.patch_embedding.weight.device
        self.table = rope_table(self.cfg.head_dim, self.cfg.rope_theta, max_positions, device)

    def time_embedding(self, t: float, batch: int, nf: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Recomputed every forward as upstream does: float64 sinusoid on the device, then the MLPs."""
        d, dit = self.cfg, self.dit
        p = dit.time_projection[1].weight
        half = d.freq_dim // 2
        tt = torch.full((batch * nf,), float(t), dtype=torch.float64, device=p.device)
        arg = torch.outer(tt, torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=p.device) / half))
        sinusoid = torch.cat([torch.cos(arg), torch.sin(arg)], dim=1).view(batch, nf, d.freq_dim)
        emb = dit.time_embedding(sinusoid.to(p.dtype))
        return dit.time_projection(emb).unflatten(-1, (6, d.dim)).float(), emb.float()

    @torch.no_grad()
    def forward(self, x: torch.Tensor, t: float, audio: torch.Tensor, text_kv, cache: ConcatKVCache,
                f0: int, commit: bool) -> torch.Tensor:
        """x [B, in_dim, F, h, w] at frames f0.. -> velocity [B, out_dim, F, h, w] (model dtype)."""
        d, dit = self.cfg, self.dit
        B, _, nf, lh, lw = x.shape
        if f0 + nf > self.max_positions:
            raise ValueError(f"upstream RoPE table covers {self.max_positions} frames; block at frames "
                             f"{f0}..{f0 + nf - 1} is past it")
        grid = (nf, lh // d.patch_size[1], lw // d.patch_size[2])
        T = grid[1] * grid[2]
        e, e_head = self.time_embedding(t, B, nf)
        h = dit.patch_embedding(x).flatten(2).transpose(1, 2)
        for i, blk in enumerate(dit.blocks):
            if i in d.audio_layers:
                h = h + audio[:, :, i - d.audio_layers[0]].repeat_interleave(T, dim=1).to(h.dtype)
            h = self._block(i, blk, h, e, text_kv[i], cache, f0, grid, commit)
        shift, scale = (dit.head.modulation.float()[:, None] + e_head[:, :, None]).unbind(2)
        out = dit.head.head(_modulate(h, shift, scale, nf, d.eps))
        return dit.unpatchify(out, nf, grid[1:])

    def _block(self, i, blk, h, e, text_kv, cache: ConcatKVCache, f0: int, grid, commit: bool):
        eps, nf = self.cfg.eps, grid[0]
        s1, c1, g1, s2, c2, g2 = (blk.modulation.float()[:, None] + e).unbind(2)
        h = _gated_add(h, self._self_attn(i, blk.self_attn, _modulate(h, s1, c1, nf, eps), cache, f0, grid, commit),
                       g1, nf)
        h = h + self._cross_attn(blk.cross_attn, blk.norm3(h), text_kv)
        return _gated_add(h, blk.ffn(_modulate(h, s2, c2, nf, eps)), g2, nf)

    def _self_attn(self, i, sa, x, cache: ConcatKVCache, f0: int, grid, commit: bool) -> torch.Tensor:
        H, eps = self.cfg.num_heads, self.cfg.eps
        qx, kx, vx = project_qkv(sa, x)      # three linears, or one GEMM once FP8 fused them
        q = rope_apply_f64(_rms(qx, sa.norm_q.weight, eps).unflatten(-1, (H, -1)), self.table, f0, grid)
        k = rope_apply_f64(_rms(kx, sa.norm_k.weight, eps).unflatten(-1, (H, -1)), self.table, f0, grid)
        v = vx.unflatten(-1, (H, -1))
        k_all, v_all = cache.concat(i, k, v)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k_all.transpose(1, 2), v_all.transpose(1, 2))
        if commit:
            cache.write(i, k, v)
        return sa.o(out.transpose(1, 2).flatten(2))

    def _cross_attn(self, ca, x, text_kv) -> torch.Tensor:
        k, v = text_kv
        q = _rms(ca.q(x), ca.norm_q.weight, self.cfg.eps).unflatten(-1, (self.cfg.num_heads, -1))
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return ca.o(out.transpose(1, 2).flatten(2))


class UpstreamRunner:
    """Runs whole blocks (steps + refresh) on the upstream path; same interface as harness.RingRunner.

    `setup` is a harness.DitSetup (dit, config, text_kv, device, dtype).
    """

    name = "upstream-eager"

    def __init__(self, setup, max_positions: int = UPSTREAM_MAX_POSITIONS):
        cfg = setup.config
        if cfg.cache.rope_mode != "absolute":
            raise ValueError(f"the upstream path keeps sink keys at absolute RoPE positions; rope_mode "
                             f"{cfg.cache.rope_mode!r} has no upstream equivalent (use 'absolute')")
        self.setup, self.cfg = setup, cfg
        self.model = UpstreamDiT(setup.dit, max_positions)
        self.cache = ConcatKVCache(cfg, 1, setup.device, setup.dtype)

    def reset(self) -> None:
        self.cache.clear()

    def prefill(self, block_index: int, seed: int = 0) -> None:
        self.cache.prefill(block_index, torch.Generator(self.setup.device).manual_seed(seed))

    def run_block(self, block_index: int, inputs) -> torch.Tensor:
        """inputs: runtime.sampler.BlockInputs. Returns the block's clean latent x0 (fp32)."""
        sampler, frames = self.cfg.sampler, self.cfg.cache.block_frames
        f0 = block_index * frames
        self.cache.evict_for(block_index)
        dtype, sigmas = inputs.cond.dtype, sampler.sigmas

        def forward(x: torch.Tensor, t: float, commit: bool) -> torch.Tensor:
            inp = torch.cat([x.to(dtype), inputs.cond], dim=1)
            return self.model.forward(inp, t, inputs.audio, self.setup.text_kv, self.cache, f0, commit).float()

        x = inputs.noise[0]
        for i, sigma in enumerate(sigmas):
            x = _pin(x, inputs.ref_latent)
            x0 = x - sigma * forward(x, sampler.timesteps[i], commit=False)
            if i + 1 < len(sigmas):
                x = (1 - sigmas[i + 1]) * x0 + sigmas[i + 1] * inputs.noise[i + 1]
        x0 = _pin(x0, inputs.ref_latent)
        forward(x0, sampler.refresh_timestep, commit=True)
        self.cache.commit(range(f0, f0 + frames))
        return x0


def _pin(x: torch.Tensor, ref_latent: torch.Tensor | None) -> torch.Tensor:
    """Block 0: the reference latent replaces latent frame 0 (as the engine's sampler)."""
    return x if ref_latent is None else torch.cat([ref_latent, x[:, :, 1:]], dim=2)
