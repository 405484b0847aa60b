"""Wan2.1 video VAE (causal 3-D conv autoencoder) with an explicit-state streaming decoder.

Architecture and state_dict layout follow Wan2.1's `wan/modules/vae.py` (`WanVAE_`): `encoder.*`
(Encoder3d), `conv1.*` (1x1x1 conv on the encoder output, mu | log_var), `conv2.*` (1x1x1 conv on the
latent) and `decoder.*` (Decoder3d). 8x spatial / 4x temporal for the release config.
Latents are normalised per channel with the 16 mean/std constants of upstream's `WanVAE` wrapper.

Temporal cache
--------------
Every causal conv with a temporal kernel of 3 needs the CACHE_T = 2 frames that preceded its input
("sites": the kernel-3 convs and the `time_conv` of each upsample3d, in the order the decoder visits
them). Upstream keeps them in a mutable list whose entries are None (nothing seen yet), a tensor of 1
or 2 frames, or the string 'Rep'. Here the decoder cache is a fixed-length list of fixed-shape tensors,
entry k being [B, C_k, CACHE_T, h_k, w_k] (see `WanVAE.decode_cache_layout`). This is exact because:

1. A causal conv zero-pads the past it lacks, so "no cache" equals two zero frames and a one-frame
   cache [f] equals [0, f]: a short cache padded with zeros in front gives identical results.
2. The first latent frame of a stream differs ('Rep' rule of upsample3d): the temporal upsampling
   conv is skipped, so that frame decodes to ONE video frame, and the site's cache stays empty; on
   the next latent frame the conv sees zero past, i.e. the entry is all zeros and the first frame
   never enters it. Later latent frames decode to 4 video frames each.

So a stream is `decode_step(z0, None, first=True)` (1 frame), then `decode_step(z, cache,
first=False)` for later latent frames (4 each; several may be passed at once). `first=True` ignores
the cache contents (a new stream has zero past by definition). The offline oracle `decode_offline`
keeps upstream's own cache rules (`_UpstreamCache`), so the streaming path is checked against them.

Size: the release decoder has 32 cache entries; at 512x512 (latent 64x64), batch 1 they hold
620 M values (2.4 GB fp32, 1.2 GB bf16), most of it in the full-resolution stages.
"""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _triple

from runtime.config import VAEConfig

from .streaming import StreamingDecoder

__all__ = ["CACHE_T", "LATENT_MEAN", "LATENT_STD", "StreamingVAEDecoder", "WanVAE"]

CACHE_T = 2  # past frames kept per temporal site (temporal kernel 3 - 1)

# Per-channel latent statistics of the Wan2.1 VAE (upstream `WanVAE.__init__`, z_dim 16).
LATENT_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
               0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
LATENT_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
              3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)


# ---- layout helpers ---------------------------------------------------------------------------

def _frames_to_batch(x: torch.Tensor) -> torch.Tensor:
    b, c, t, h, w = x.shape
    return x.transpose(1, 2).reshape(b * t, c, h, w)


def _batch_to_frames(x: torch.Tensor, t: int) -> torch.Tensor:
    bt, c, h, w = x.shape
    return x.reshape(bt // t, t, c, h, w).transpose(1, 2)


def _interleave_time(y: torch.Tensor) -> torch.Tensor:
    """[B, 2C, T, H, W] -> [B, C, 2T, H, W]: output frame 2i is channels [:C] of i, 2i+1 is [C:]."""
    b, c2, t, h, w = y.shape
    c = c2 // 2
    return y.reshape(b, 2, c, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c, 2 * t, h, w)


def _last_frames(past: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """The last CACHE_T frames of [past, x]; `past` None stands for CACHE_T zero frames."""
    t = x.shape[2]
    if t >= CACHE_T:
        return x[:, :, -CACHE_T:].contiguous()
    if past is None:
        past = x.new_zeros((x.shape[0], x.shape[1], CACHE_T, *x.shape[3:]))
    return torch.cat([past[:, :, t:], x], dim=2)


# ---- cache policies ---------------------------------------------------------------------------

_REP = "Rep"  # upstream's marker: upsample3d has seen the first chunk (its conv was skipped)


class _UpstreamCache:
    """Upstream's mutable feat_cache rules (None / 1-2 frames / 'Rep'); used by the offline oracle
    and by the encoder. Entries are created as sites are first visited."""

    def __init__(self):
        self.slots: list = []
        self.pos = 0

    def begin_chunk(self) -> _UpstreamCache:
        self.pos = 0
        return self

    def _get(self):
        if self.pos == len(self.slots):
            self.slots.append(None)
        return self.slots[self.pos]

    def _put(self, value) -> None:
        self.slots[self.pos] = value
        self.pos += 1

    def conv(self, conv: CausalConv3d, x: torch.Tensor) -> torch.Tensor:
        past = self._get()
        keep = x[:, :, -CACHE_T:]
        if keep.shape[2] < CACHE_T and past is not None:
            keep = torch.cat([past[:, :, -1:], keep], dim=2)  # may still be 1 frame after chunk 0
        out = conv(x, past)
        self._put(keep.clone())
        return out

    def time_upsample(self, conv: CausalConv3d, x: torch.Tensor) -> torch.Tensor | None:
        past = self._get()
        if past is None:  # first chunk: no temporal upsampling
            self._put(_REP)
            return None
        keep = x[:, :, -CACHE_T:]
        if keep.shape[2] < CACHE_T:
            front = torch.zeros_like(keep) if past is _REP else past[:, :, -1:]
            keep = torch.cat([front, keep], dim=2)
        out = conv(x, None if past is _REP else past)
        self._put(keep.clone())
        return out

    def time_downsample(self, conv: CausalConv3d, x: torch.Tensor) -> torch.Tensor:
        past = self._get()
        if past is None:  # first chunk: its single frame passes through unchanged
            self._put(x.clone())
            return x
        keep = x[:, :, -1:].clone()
        out = conv(torch.cat([past[:, :, -1:], x], dim=2))  # stride 2, no temporal padding
        self._put(keep)
        return out


class _StaticCache:
    """Fixed-shape decoder cache: reads `cache_in[k]` at site k, appends the new entry to `cache_out`.

    With `first` the input contents are ignored (zero past) and the shapes only checked."""

    def __init__(self, cache_in: list[torch.Tensor] | None, first: bool):
        self.cache_in = cache_in
        self.first = first
        self.cache_out: list[torch.Tensor] = []

    def _past(self, x: torch.Tensor) -> torch.Tensor | None:
        k = len(self.cache_out)
        if self.cache_in is not None:
            if k >= len(self.cache_in):
                raise ValueError(f"decode cache has {len(self.cache_in)} entries; the decoder needs more")
            want = (x.shape[0], x.shape[1], CACHE_T, *x.shape[3:])
            got = tuple(self.cache_in[k].shape)
            if got != want:
                raise ValueError(f"decode cache entry {k} has shape {got}, expected {want}")
        return None if self.first else self.cache_in[k]

    def conv(self, conv: CausalConv3d, x: torch.Tensor) -> torch.Tensor:
        past = self._past(x)
        out = conv(x, past)
        self.cache_out.append(_last_frames(past, x))
        return out

    def time_upsample(self, conv: CausalConv3d, x: torch.Tensor) -> torch.Tensor | None:
        past = self._past(x)
        if self.first:  # 'Rep': skip the conv; the entry stays zero (the first frame never enters it)
            self.cache_out.append(x.new_zeros((x.shape[0], x.shape[1], CACHE_T, *x.shape[3:])))
            return None
        out = conv(x, past)
        self.cache_out.append(_last_frames(past, x))
        return out

    def finish(self) -> list[torch.Tensor]:
        if self.cache_in is not None and len(self.cache_out) != len(self.cache_in):
            raise ValueError(f"decode cache has {len(self.cache_in)} entries, the decoder used "
                             f"{len(self.cache_out)}")
        return self.cache_out


# ---- layers -----------------------------------------------------------------------------------

class CausalConv3d(nn.Conv3d):
    """Conv3d padded causally in time: 2*pad_t frames in front (cached past, then zeros), none after."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0)
        pad_t, pad_h, pad_w = _triple(padding)
        self.space_pad = (pad_w, pad_w, pad_h, pad_h)
        self.time_pad = 2 * pad_t

    def forward(self, x: torch.Tensor, past: torch.Tensor | None = None) -> torch.Tensor:
        front = self.time_pad
        if past is not None and front > 0:
            if past.shape[2] > front:
                raise ValueError(f"causal conv got {past.shape[2]} past frames, it uses at most {front}")
            x = torch.cat([past, x], dim=2)
            front -= past.shape[2]
        return super().forward(F.pad(x, (*self.space_pad, front, 0)))


class RMS_norm(nn.Module):
    """L2-normalise over channels, times sqrt(C) and a per-channel gain `gamma` (no bias)."""

    def __init__(self, dim: int, images: bool):
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones((dim, 1, 1) if images else (dim, 1, 1, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1) * self.scale * self.gamma


class _NearestUp2x(nn.Module):
    """2x nearest-exact upsampling, computed in fp32 (upstream's bf16 workaround)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x.float(), scale_factor=2.0, mode="nearest-exact").to(x.dtype)


class Resample(nn.Module):
    """Spatial 2x up/down sampling per frame, plus a temporal 2x conv in the '3d' modes."""

    MODES = ("upsample2d", "upsample3d", "downsample2d", "downsample3d")

    def __init__(self, dim: int, mode: str):
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"unknown Resample mode {mode!r}; known: {self.MODES}")
        self.dim, self.mode = dim, mode
        if mode.startswith("upsample"):
            self.resample = nn.Sequential(_NearestUp2x(), nn.Conv2d(dim, dim // 2, 3, padding=1))
        else:
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        if mode == "upsample3d":  # each frame -> 2 frames, from 2*dim output channels
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def forward(self, x: torch.Tensor, cache) -> torch.Tensor:
        if self.mode == "upsample3d":
            y = cache.time_upsample(self.time_conv, x)
            if y is not None:
                x = _interleave_time(y)
        t = x.shape[2]
        x = _batch_to_frames(self.resample(_frames_to_batch(x)), t)
        if self.mode == "downsample3d":
            x = cache.time_downsample(self.time_conv, x)
        return x


class ResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        # Index 5 was Dropout(0) upstream; Identity keeps the key names residual.{0,2,3,6}.
        self.residual = nn.Sequential(
            RMS_norm(in_dim, images=False), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMS_norm(out_dim, images=False), nn.SiLU(), nn.Identity(),
            CausalConv3d(out_dim, out_dim, 3, padding=1))
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, cache) -> torch.Tensor:
        skip = self.shortcut(x)
        for layer in self.residual:
            x = cache.conv(layer, x) if isinstance(layer, CausalConv3d) else layer(x)
        return x + skip

    def cache_channels(self) -> list[int]:
        return [self.residual[2].in_channels, self.residual[6].in_channels]


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame (no temporal mixing)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMS_norm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)
        nn.init.zeros_(self.proj.weight)  # as upstream: the block starts as identity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        y = self.norm(_frames_to_batch(x))
        q, k, v = self.to_qkv(y).reshape(b * t, 1, 3 * c, h * w).transpose(-1, -2).chunk(3, dim=-1)
        y = F.scaled_dot_product_attention(q, k, v)  # [bt, 1, hw, c]
        y = y.squeeze(1).transpose(1, 2).reshape(b * t, c, h, w)
        return x + _batch_to_frames(self.proj(y), t)


def _middle(dim: int) -> nn.Sequential:
    return nn.Sequential(ResidualBlock(dim, dim), AttentionBlock(dim), ResidualBlock(dim, dim))


def _head(dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(RMS_norm(dim, images=False), nn.SiLU(), CausalConv3d(dim, out_dim, 3, padding=1))


def _run_middle(middle: nn.Sequential, x: torch.Tensor, cache) -> torch.Tensor:
    for layer in middle:
        x = layer(x, cache) if isinstance(layer, ResidualBlock) else layer(x)
    return x


def _run_head(head: nn.Sequential, x: torch.Tensor, cache) -> torch.Tensor:
    norm, act, conv = head
    return cache.conv(conv, act(norm(x)))


class Encoder3d(nn.Module):
    def __init__(self, dim: int, z_dim: int, dim_mult, num_res_blocks: int, temporal_downsample):
        super().__init__()
        dims = [dim * u for u in (1, *dim_mult)]
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        layers: list[nn.Module] = []
        for i, (cin, cout) in enumerate(itertools.pairwise(dims)):
            for _ in range(num_res_blocks):
                layers.append(ResidualBlock(cin, cout))
                cin = cout
            if i < len(dim_mult) - 1:
                layers.append(Resample(cout, "downsample3d" if temporal_downsample[i] else "downsample2d"))
        self.downsamples = nn.Sequential(*layers)
        self.middle = _middle(dims[-1])
        self.head = _head(dims[-1], z_dim)

    def forward(self, x: torch.Tensor, cache) -> torch.Tensor:
        x = cache.conv(self.conv1, x)
        for layer in self.downsamples:
            x = layer(x, cache)
        return _run_head(self.head, _run_middle(self.middle, x, cache), cache)


class Decoder3d(nn.Module):
    def __init__(self, dim: int, z_dim: int, dim_mult, num_res_blocks: int, temporal_upsample):
        super().__init__()
        dims = [dim * u for u in (dim_mult[-1], *reversed(dim_mult))]
        self.conv1 = CausalConv3d(z_dim, dims[0], 3, padding=1)
        self.middle = _middle(dims[0])
        layers: list[nn.Module] = []
        for i, (cin, cout) in enumerate(itertools.pairwise(dims)):
            if i > 0:
                cin //= 2  # the previous stage's Resample halved the channels
            for _ in range(num_res_blocks + 1):
                layers.append(ResidualBlock(cin, cout))
                cin = cout
            if i < len(dim_mult) - 1:
                layers.append(Resample(cout, "upsample3d" if temporal_upsample[i] else "upsample2d"))
        self.upsamples = nn.Sequential(*layers)
        self.head = _head(dims[-1], 3)

    def forward(self, x: torch.Tensor, cache) -> torch.Tensor:
        x = _run_middle(self.middle, cache.conv(self.conv1, x), cache)
        for layer in self.upsamples:
            x = layer(x, cache)
        return _run_head(self.head, x, cache)

    def cache_layout(self, h: int, w: int) -> list[tuple[int, int, int]]:
        """(channels, height, width) of each temporal site, in the order `forward` visits them."""
        layout = [(self.conv1.in_channels, h, w)]
        for layer in [*self.middle, *self.upsamples]:
            if isinstance(layer, ResidualBlock):
                layout += [(c, h, w) for c in layer.cache_channels()]
            elif isinstance(layer, Resample):
                if layer.mode == "upsample3d":
                    layout.append((layer.dim, h, w))
                h, w = 2 * h, 2 * w
        layout.append((self.head[2].in_channels, h, w))
        return layout


# ---- the VAE ----------------------------------------------------------------------------------

def _latent_stats(z_dim: int, device=None, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Release constants for z_dim 16; identity normalisation (0, 1) for other (test-only) widths."""
    if z_dim == len(LATENT_MEAN):
        mean, std = LATENT_MEAN, LATENT_STD
    else:
        mean, std = (0.0,) * z_dim, (1.0,) * z_dim
    as_tensor = lambda v: torch.tensor(v, device=device, dtype=dtype).view(1, z_dim, 1, 1, 1)
    return as_tensor(mean), as_tensor(std)


class WanVAE(nn.Module):
    """Wan2.1 VAE: `state_dict()` matches `Wan2.1_VAE.pth` (194 tensors for the release config).

    Latents are normalised: `encode*` returns (mu - mean) / std and every decode takes that form.
    The mean/std constants are non-persistent buffers; they are rebuilt on the weights' device after
    any `load_state_dict` (so a module built on the meta device and loaded with assign=True works).
    """

    def __init__(self, config: VAEConfig | None = None):
        super().__init__()
        cfg = config if config is not None else VAEConfig()
        self.config = cfg
        z = cfg.z_dim
        self.encoder = Encoder3d(cfg.base_dim, 2 * z, cfg.dim_mult, cfg.num_res_blocks, cfg.temporal_downsample)
        self.conv1 = CausalConv3d(2 * z, 2 * z, 1)
        self.conv2 = CausalConv3d(z, z, 1)
        self.decoder = Decoder3d(cfg.base_dim, z, cfg.dim_mult, cfg.num_res_blocks,
                                 tuple(reversed(cfg.temporal_downsample)))
        mean, std = _latent_stats(z)
        self.register_buffer("latent_mean", mean, persistent=False)
        self.register_buffer("latent_std", std, persistent=False)
        self.register_load_state_dict_post_hook(WanVAE._rebuild_latent_stats)

    @staticmethod
    def _rebuild_latent_stats(module: WanVAE, _incompatible) -> None:
        w = module.conv2.weight
        if not w.is_meta:
            module.latent_mean, module.latent_std = _latent_stats(module.config.z_dim, w.device, w.dtype)

    # ---- checks -------------------------------------------------------------------------------
    def _check_latent(self, z: torch.Tensor, what: str) -> None:
        if z.dim() != 5 or z.shape[1] != self.config.z_dim:
            raise ValueError(f"{what}: expected a latent [B, {self.config.z_dim}, F, h, w], got {tuple(z.shape)}")
        if z.shape[2] < 1:
            raise ValueError(f"{what}: the latent has no frames")

    def _check_pixels(self, x: torch.Tensor, what: str) -> None:
        s = self.config.spatial_factor
        if x.shape[1] != 3 or x.shape[-2] % s or x.shape[-1] % s:
            raise ValueError(f"{what}: expected 3 channels and height/width multiples of {s}, "
                             f"got {tuple(x.shape)}")

    # ---- encode -------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """video [B, 3, 1 + tf*k, H, W] in [-1, 1] -> normalised mean latent [B, z, 1 + k, H/s, W/s].

        As upstream: the causal encoder sees frame 0 alone, then chunks of tf frames, one shared cache."""
        tf = self.config.temporal_factor
        if video.dim() != 5 or (video.shape[2] - 1) % tf:
            raise ValueError(f"encode: expected video [B, 3, 1 + {tf}*k, H, W], got {tuple(video.shape)}")
        self._check_pixels(video, "encode")
        cache = _UpstreamCache()
        starts = [0, *range(1, video.shape[2], tf)]
        ends = [1, *range(1 + tf, video.shape[2] + 1, tf)]
        out = torch.cat([self.encoder(video[:, :, a:b], cache.begin_chunk()) for a, b in zip(starts, ends)], 2)
        mu = self.conv1(out)[:, : self.config.z_dim]  # channels are mu | log_var; no sampling
        return (mu - self.latent_mean) / self.latent_std

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """image [B, 3, H, W] in [-1, 1] -> normalised latent [B, z, 1, H/s, W/s] (the mean, no sampling)."""
        if image.dim() != 4:
            raise ValueError(f"encode_image: expected [B, 3, H, W], got {tuple(image.shape)}")
        return self.encode(image.unsqueeze(2))

    # ---- decode -------------------------------------------------------------------------------
    def _decoder_input(self, z: torch.Tensor) -> torch.Tensor:
        return self.conv2(z * self.latent_std + self.latent_mean)

    @torch.no_grad()
    def decode_offline(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, z, F, h, w] normalised -> video [B, 3, 1 + tf*(F-1), H, W] in [-1, 1].

        The oracle: upstream's whole-clip decode, latent frame by latent frame, fresh upstream cache."""
        self._check_latent(z, "decode_offline")
        x = self._decoder_input(z)
        cache = _UpstreamCache()
        frames = [self.decoder(x[:, :, i:i + 1], cache.begin_chunk()) for i in range(x.shape[2])]
        return torch.cat(frames, 2).clamp(-1, 1)

    @property
    def device(self) -> torch.device:
        return self.conv2.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.conv2.weight.dtype

    @property
    def spatial_factor(self) -> int:
        return self.config.spatial_factor

    def decode_cache_layout(self, h: int, w: int) -> list[tuple[int, int, int, int]]:
        """Per cache entry (channels, CACHE_T, height, width) for a latent of h x w (batch excluded)."""
        return [(c, CACHE_T, hh, ww) for c, hh, ww in self.decoder.cache_layout(h, w)]

    def init_decode_cache(self, batch: int, h: int, w: int, device=None, dtype=None) -> list[torch.Tensor]:
        """Zero decode cache for a stream of [batch, z, *, h, w] latents (device/dtype default: the weights')."""
        device = self.device if device is None else device
        dtype = self.dtype if dtype is None else dtype
        return [torch.zeros((batch, *shape), device=device, dtype=dtype) for shape in self.decode_cache_layout(h, w)]

    def decode_step(self, z: torch.Tensor, cache: list[torch.Tensor] | None, first: bool
                    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One streaming step; pure: `cache` is read, never modified, and a new list is returned.

        z [B, z, n, h, w] normalised. first=True: the stream's first latent frame (n must be 1) ->
        1 video frame; `cache` may be None and its contents are ignored. first=False: n >= 1 later
        latent frames -> tf*n video frames, `cache` from the previous step. Frames are clamped to
        [-1, 1]. Every returned cache entry has the shape of `init_decode_cache`'s."""
        self._check_latent(z, "decode_step")
        if first and z.shape[2] != 1:
            raise ValueError(f"decode_step: the first step takes exactly 1 latent frame, got {z.shape[2]}")
        if not first and cache is None:
            raise ValueError("decode_step: first=False needs the cache returned by the previous step")
        state = _StaticCache(cache, first)
        frames = self.decoder(self._decoder_input(z), state).clamp(-1, 1)
        return frames, state.finish()


# The Wan VAE's streaming decoder is the shared wrapper (runtime/models/streaming.py).
StreamingVAEDecoder = StreamingDecoder
