"""TAEHV tiny video decoder (madebyollin/taehv, `taew2_1` weights) with an explicit-state streaming API.

A fast alternative to the Wan2.1 VAE decoder (about 25x fewer FLOPs), taking exactly what
`WanVAE.decode_*` takes and returning what it returns.

Architecture and state_dict layout follow upstream `taehv.py` (`TAEHV.decoder`, an nn.Sequential of
23 modules; only the decoder is kept here, `encoder.*` keys are dropped on load):

    0 Clamp (tanh(x/3)*3)  1 conv3x3 z->256 (+bias)  2 ReLU
    3-5   MemBlock(256)  6 Upsample(2x)  7  TGrow(256, stride 1)  8  conv3x3 256->128 (no bias)
    9-11  MemBlock(128) 12 Upsample(2x) 13  TGrow(128, stride 2) 14  conv3x3 128->64  (no bias)
    15-17 MemBlock(64)  18 Upsample(2x) 19  TGrow(64, stride 2)  20  conv3x3 64->64   (no bias)
    21 ReLU  22 conv3x3 64->3 (+bias)

MemBlock(n): `conv` = [conv3x3 2n->n, ReLU, conv3x3 n->n, ReLU, conv3x3 n->n] over cat([x, past]),
identity skip, ReLU. TGrow(n, s): a bias-free 1x1 conv n->n*s whose channel group j becomes output
sub-frame j. The stride-1 TGrow at index 7 is still a learned 1x1 projection. Wan 2.1 uses
decoder_time_upscale (False, True, True): 4 video frames per latent frame, 8x space, 64 decoder
tensors (`decoder.7.conv.weight` is [256, 256, 1, 1] in the released file).

Conventions (upstream README and taehv.py), and how they are converted here:
- Latents: TAEHV applies no latent shift/scale: it decodes exactly what the diffusion model
  produces, i.e. the Wan VAE's NORMALISED latents ((mu - mean) / std). So the normalised latents of
  `WanVAE.decode_*` go in unchanged (wrappers that first de-normalise, e.g. `need_scaled=True`
  elsewhere, target other checkpoints, not `taew2_1`).
- Layout: upstream is NTCHW; here [B, C, T, H, W] like the Wan VAE (transposed at the edges).
- Range: upstream output is clamped to [0, 1]; here it is mapped to 2*x - 1, i.e. [-1, 1].
- Frames: upstream runs the time growth on every latent frame (4 raw frames each) and trims the
  first `t_upscale - 1 = 3` raw frames of a stream, giving 1 + 4(F-1) frames: the same counts as
  the Wan decoder (1 for the stream's first latent frame, 4 for each later one).

Streaming state
---------------
Each of the 9 MemBlocks reads its own input at the previous time step (at its own frame rate:
after the stride-2 TGrow at index 13 the last stage runs at 2 frames per latent frame), zeros at the
start of a stream. So the whole state is a fixed-length list of 9 fixed-shape tensors
[B, n_s, h * 2^s, w * 2^s] (see `decode_cache_layout`); nothing else is carried and nothing is held
back (`flush` has nothing to emit). `decode_step` is pure: it reads the state and returns a new one.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from runtime.checkpoint import CheckpointError, load_into

from .streaming import StreamingDecoder

__all__ = ["RELEASE_WIDTHS", "TIME_UPSCALE", "StreamingTAEHVDecoder", "TAEHVDecoder"]

RELEASE_WIDTHS = (256, 128, 64, 64)  # upstream n_f
TIME_UPSCALE = (False, True, True)  # Wan 2.1: time grows 2x at the last two stages -> 4x
SPATIAL_FACTOR = 2 ** len(TIME_UPSCALE)  # one 2x Upsample per stage
TEMPORAL_FACTOR = 2 ** sum(TIME_UPSCALE)
FRAMES_TO_TRIM = TEMPORAL_FACTOR - 1  # upstream `frames_to_trim`: raw frames dropped at stream start
BLOCKS_PER_STAGE = 3
IMAGE_CHANNELS = 3  # patch size 1 for taew2_1: no pixel shuffle


# ---- layers (upstream names and parameter layout) ---------------------------------------------

def _conv3x3(n_in: int, n_out: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, bias=bias)


class Clamp(nn.Module):
    """Soft clamp of the latent input to (-3, 3)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class MemBlock(nn.Module):
    """Residual block over [current frame, the block's previous input frame] (decoder: n_in == n_out)."""

    def __init__(self, n: int):
        super().__init__()
        self.conv = nn.Sequential(_conv3x3(2 * n, n), nn.ReLU(), _conv3x3(n, n), nn.ReLU(), _conv3x3(n, n))
        self.skip = nn.Identity()
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(torch.cat([x, past], 1)) + self.skip(x))


class TGrow(nn.Module):
    """[N*T, C, H, W] -> [N*T*stride, C, H, W]: 1x1 conv to C*stride, channel group j = sub-frame j."""

    def __init__(self, n: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(n, n * stride, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, c, h, w = x.shape
        return self.conv(x).reshape(-1, c, h, w)


def build_decoder(latent_channels: int, widths: tuple[int, int, int, int]) -> nn.Sequential:
    """Upstream's `TAEHV.decoder` for the Wan 2.1 settings (indices as in the module docstring)."""
    layers: list[nn.Module] = [Clamp(), _conv3x3(latent_channels, widths[0]), nn.ReLU()]
    for s, grow in enumerate(TIME_UPSCALE):
        n = widths[s]
        layers += [MemBlock(n) for _ in range(BLOCKS_PER_STAGE)]
        layers += [nn.Upsample(scale_factor=2), TGrow(n, 2 if grow else 1),
                   _conv3x3(n, widths[s + 1], bias=False)]
    layers += [nn.ReLU(), _conv3x3(widths[-1], IMAGE_CHANNELS)]
    return nn.Sequential(*layers)


# ---- layout helpers ---------------------------------------------------------------------------

def _to_frames(z: torch.Tensor) -> torch.Tensor:
    """[B, C, T, H, W] -> [B*T, C, H, W], batch-major (upstream's N*T flattening of NTCHW)."""
    b, c, t, h, w = z.shape
    return z.transpose(1, 2).reshape(b * t, c, h, w)


def _to_video(x: torch.Tensor, batch: int) -> torch.Tensor:
    """[B*T, 3, H, W] in [0, 1] (after the clamp) -> [B, 3, T, H, W] in [-1, 1]."""
    bt, c, h, w = x.shape
    return x.reshape(batch, bt // batch, c, h, w).transpose(1, 2).clamp(0, 1) * 2 - 1


# ---- the decoder ------------------------------------------------------------------------------

class TAEHVDecoder(nn.Module):
    """TAEHV's decoder for Wan 2.1 latents: `state_dict()` keys are the checkpoint's `decoder.*` keys.

    `widths` other than RELEASE_WIDTHS (and other latent widths) are for tiny test models.
    """

    spatial_factor = SPATIAL_FACTOR
    temporal_factor = TEMPORAL_FACTOR

    def __init__(self, latent_channels: int = 16, widths: tuple[int, int, int, int] = RELEASE_WIDTHS):
        super().__init__()
        if len(widths) != len(TIME_UPSCALE) + 1 or min(widths) < 1 or latent_channels < 1:
            raise ValueError(f"TAEHVDecoder needs 4 positive widths and latent_channels >= 1, "
                             f"got widths={widths}, latent_channels={latent_channels}")
        self.latent_channels = latent_channels
        self.widths = tuple(widths)
        self.decoder = build_decoder(latent_channels, self.widths)
        # Every MemBlock in visiting order, with the index of its stage (its resolution / frame rate).
        self._mem_stages = [s for s in range(len(TIME_UPSCALE)) for _ in range(BLOCKS_PER_STAGE)]

    # ---- loading ------------------------------------------------------------------------------
    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor], *, dtype: torch.dtype | None = None,
                        device: str | torch.device | None = None) -> TAEHVDecoder:
        """Build from a TAEHV checkpoint (encoder + decoder keys, e.g. `taew2_1.pth`), keeping the decoder.

        The widths and latent channels are read from the decoder's convs; then every `decoder.*`
        key must match exactly (one CheckpointError names every missing, unexpected and mis-shaped
        key). Non-decoder keys (`encoder.*`) are ignored. Floats are cast to `dtype` if given; the
        module takes the tensors themselves (assign), so with no cast it shares storage with `sd`."""
        dec = {k: v for k, v in sd.items() if k.startswith("decoder.")}
        if not dec:
            raise CheckpointError(f"TAEHV checkpoint has no 'decoder.*' keys (first keys: {list(sd)[:5]})")
        latent_channels, widths = cls._infer_config(dec)
        with torch.device("meta"):
            model = cls(latent_channels, widths)
        load_into(model, dec, what="TAEHV decoder", dtype=dtype, device=device)
        return model.eval()

    @staticmethod
    def _infer_config(dec: Mapping[str, torch.Tensor]) -> tuple[int, tuple[int, ...]]:
        anchors = [f"decoder.{i}.weight" for i in (1, 8, 14, 20, 22)]  # the plain convs fix every width
        bad = [k for k in anchors if k not in dec or dec[k].dim() != 4]
        if bad:
            raise CheckpointError(f"TAEHV decoder checkpoint lacks 4-d conv weights {bad}: not the "
                                  "upstream decoder layout (decoder.{1,8,14,20,22}.weight)")
        out = dec["decoder.22.weight"].shape[0]
        if out != IMAGE_CHANNELS:
            raise CheckpointError(f"decoder.22.weight has {out} output channels; only patch size 1 "
                                  f"({IMAGE_CHANNELS} channels, the Wan 2.1 'taew2_1' decoder) is supported")
        widths = tuple(dec[f"decoder.{i}.weight"].shape[0] for i in (1, 8, 14, 20))
        return dec["decoder.1.weight"].shape[1], widths

    @property
    def device(self) -> torch.device:
        return self.decoder[1].weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder[1].weight.dtype

    # ---- state ---------------------------------------------------------------------------------
    def decode_cache_layout(self, h: int, w: int) -> list[tuple[int, int, int]]:
        """(channels, height, width) of each MemBlock's memory for an h x w latent (batch excluded)."""
        return [(self.widths[s], h * 2 ** s, w * 2 ** s) for s in self._mem_stages]

    def init_decode_cache(self, batch: int, h: int, w: int, device=None, dtype=None) -> list[torch.Tensor]:
        """Zero memory (= a fresh stream) of 9 fixed-shape tensors (device/dtype default: the weights')."""
        device = self.device if device is None else device
        dtype = self.dtype if dtype is None else dtype
        return [torch.zeros((batch, *shape), device=device, dtype=dtype) for shape in self.decode_cache_layout(h, w)]

    def _check_latent(self, z: torch.Tensor, what: str) -> None:
        if z.dim() != 5 or z.shape[1] != self.latent_channels or min(z.shape[2:]) < 1:
            raise ValueError(f"{what}: expected a latent [B, {self.latent_channels}, F>=1, h, w], "
                             f"got {tuple(z.shape)}")

    def _check_cache(self, z: torch.Tensor, cache: list[torch.Tensor]) -> None:
        want = [(z.shape[0], *s) for s in self.decode_cache_layout(z.shape[3], z.shape[4])]
        if len(cache) != len(want):
            raise ValueError(f"decode cache has {len(cache)} entries, the TAEHV decoder needs {len(want)}")
        for k, (entry, shape) in enumerate(zip(cache, want)):
            if tuple(entry.shape) != shape:
                raise ValueError(f"decode cache entry {k} has shape {tuple(entry.shape)}, expected {shape}")

    # ---- decoding ------------------------------------------------------------------------------
    def _run(self, x: torch.Tensor, batch: int, cache: list[torch.Tensor]
             ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Decoder over x [B*T, C, h, w], parallel in time; MemBlock k's past frame before x is cache[k].

        Returns raw output frames [B*4T, 3, H, W] (unclamped) and each MemBlock's last input frame."""
        new_cache: list[torch.Tensor] = []
        for layer in self.decoder:
            if isinstance(layer, MemBlock):
                frames = x.reshape(batch, -1, *x.shape[1:])  # [B, T, C, H, W]
                past = torch.cat([cache[len(new_cache)].unsqueeze(1), frames[:, :-1]], 1)
                new_cache.append(frames[:, -1].contiguous())
                x = layer(x, past.reshape(x.shape))
            else:
                x = layer(x)
        return x, new_cache

    def decode_step(self, z: torch.Tensor, cache: list[torch.Tensor] | None, first: bool
                    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One streaming step; pure: `cache` is read, never modified, and a new list is returned.

        z [B, z, n, h, w] normalised latents, n >= 1. first=True starts a stream (zero memory;
        `cache` may be None, its contents are ignored) and gives 1 + 4(n-1) frames, upstream's trim
        of the first 3 raw frames; first=False continues from `cache` and gives 4n frames.
        Frames are in [-1, 1]. Unlike the Wan VAE, a first step may take several latent frames.
        For a static graph: `decode_step(z, init_decode_cache(...), first=False)` followed by dropping
        the first 3 frames equals first=True (same shapes every step)."""
        self._check_latent(z, "decode_step")
        b, _, _, h, w = z.shape
        if first:
            if cache is not None:
                self._check_cache(z, cache)
            cache = self.init_decode_cache(b, h, w, device=z.device, dtype=z.dtype)
        elif cache is None:
            raise ValueError("decode_step: first=False needs the cache returned by the previous step")
        else:
            self._check_cache(z, cache)
        raw, new_cache = self._run(_to_frames(z), b, cache)
        frames = _to_video(raw, b)
        return (frames[:, :, FRAMES_TO_TRIM:] if first else frames), new_cache

    @torch.no_grad()
    def decode_offline(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, z, F, h, w] normalised -> video [B, 3, 1 + 4(F-1), 8h, 8w] in [-1, 1].

        The oracle: upstream's whole-clip `decode_video(parallel=True)`: every layer over all frames
        at once, each MemBlock's memory its own input shifted one frame later in time (zeros first),
        then clamp to [0, 1], drop the first 3 raw frames (upstream's trim) and map to [-1, 1].
        Upstream's sequential mode computes the same values frame by frame."""
        self._check_latent(z, "decode_offline")
        b = z.shape[0]
        x = _to_frames(z)
        for layer in self.decoder:
            if isinstance(layer, MemBlock):
                frames = x.reshape(b, -1, *x.shape[1:])
                t = frames.shape[1]
                memory = F.pad(frames, (0, 0, 0, 0, 0, 0, 1, 0))[:, :t]  # one zero frame in front
                x = layer(x, memory.reshape(x.shape))
            else:
                x = layer(x)
        return _to_video(x, b)[:, :, FRAMES_TO_TRIM:]


# TAEHV streams through the shared wrapper (runtime/models/streaming.py), as the Wan VAE does.
StreamingTAEHVDecoder = StreamingDecoder
