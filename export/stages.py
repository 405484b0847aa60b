"""Fixed-shape stage wrappers: nn.Modules whose inputs and outputs are tensors only.

Every per-block stage of the runtime becomes one pure function of explicit tensors, so it can be
traced once by `torch.export` / ONNX and replayed by any backend:

| stage              | inputs                                                    | outputs                        |
|--------------------|-----------------------------------------------------------|--------------------------------|
| `denoise_step`     | x, mod_blocks, mod_head, audio, text_k, text_v, ring_k,   | velocity, k_rows, v_rows       |
|                    | ring_v, write_slots, slot_pos, q_pos                      | (or the updated rings)         |
| `audio_cond`       | feats (per video frame, block 0's frame 0 pre-repeated)   | audio                          |
| `text_kv`          | prompt (zero-padded to text_len)                          | text_k, text_v                 |
| `vae_encode_image` | image [-1, 1]                                             | latent (normalised)            |
| `vae_decode_first` | z (the stream's first latent frame)                       | frames, cache_out_0..K-1       |
| `vae_decode_step`  | z (one later latent frame), cache_in_0..K-1               | frames, cache_out_0..K-1       |

The KV refresh (the t=0 forward after the last step) is the SAME graph as a denoising step: the
timestep enters only through the modulation tensors, which are inputs, so the refresh is
`denoise_step` called with the t=0 modulation and its velocity ignored. One program serves both.

Ring I/O (`ring_io`): the eager model writes the block's K/V into the ring in place. An exported
graph cannot alias its inputs, so the step clones the ring, writes into the clone, attends over it,
and returns either
- `"rows"` (default): only the rows it wrote, k_rows / v_rows [layers, B, F*T, H, D]; the caller
  scatters them into its persistent ring at `write_slots` (what the runner does), or
- `"full"`: the whole updated rings [layers, B, S*T, H, D] (simplest contract, but every step then
  copies the full ring out: 2 x 1.4 GB for the 1.3B model at 512x512, against 2 x 0.28 GB of rows).

Shapes are fixed by `StageShapes` (batch 1 by default, the config's block and window sizes).
`build_stages` returns `Stage`s carrying the module, names, and a generator of random example
inputs with valid contents (plans from `plan_block`), used for export and for verification.
"""
from __future__ import annotations

from collections.abc import Callable
from copy import deepcopy
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from avatar_kernels.kv_write import rms_norm_reference
from runtime.config import EngineConfig
from runtime.models.dit import BlockPlan, CausalAudioDiT, TimeMod
from runtime.models.ops import Ops
from runtime.models.vae import WanVAE, _NearestUp2x
from runtime.session import plan_block

RingIO = Literal["rows", "full"]


@dataclass(frozen=True)
class StageShapes:
    """The fixed shapes every stage is exported for."""

    batch: int
    block_frames: int      # latent frames per block (F)
    latent_hw: tuple[int, int]
    image_hw: tuple[int, int]
    window_frames: int     # KV ring slots (S)
    tokens_per_frame: int  # T

    @classmethod
    def from_config(cls, cfg: EngineConfig, batch: int = 1) -> StageShapes:
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        return cls(batch=batch, block_frames=cfg.cache.block_frames, latent_hw=cfg.latent_hw,
                   image_hw=(cfg.height, cfg.width), window_frames=cfg.cache.window_frames,
                   tokens_per_frame=cfg.tokens_per_frame)


# ---- DiT stages -------------------------------------------------------------------------------

def gather_ring_rows(ring: torch.Tensor, write_slots: torch.Tensor, tokens_per_frame: int) -> torch.Tensor:
    """ring [L, B, S*T, H, D], write_slots [B, F] -> the rows of those slots [L, B, F*T, H, D]."""
    L, B, ST, H, D = ring.shape
    slots = ring.view(L, B, ST // tokens_per_frame, tokens_per_frame, H, D)
    rows = [slots[:, b].index_select(1, write_slots[b].long()) for b in range(B)]
    return torch.stack(rows, dim=1).flatten(2, 3)


def scatter_ring_rows(ring: torch.Tensor, rows: torch.Tensor, write_slots: torch.Tensor,
                      tokens_per_frame: int) -> None:
    """Inverse of `gather_ring_rows`, in place: ring[:, b, slot f] = rows[:, b, frame f]."""
    L, B, ST, H, D = ring.shape
    T = tokens_per_frame
    slots = ring.view(L, B, ST // T, T, H, D)
    src = rows.view(L, B, -1, T, H, D)
    for b in range(B):
        slots[:, b].index_copy_(1, write_slots[b].long().to(ring.device), src[:, b].to(ring.dtype))


class ExportOps(Ops):
    """The reference ops with the KV write phrased for graph export.

    The reference writes `ring[b, slots] = rows` per batch row: a select view, then an index_put into
    it. Functionalised, every such write becomes a scatter of the whole view back into its base, which
    ONNX spells as ScatterElements with a constant index tensor as large as the ring (gigabytes at
    full size). Here the write is a single index_put with [B, F] advanced indices on a reshape of the
    ring (ONNX ScatterND with a [B, F, 2] index): same values, same slots."""

    name = "export"

    @staticmethod
    def qk_norm_kv_write(q, k, v, q_weight, k_weight, eps, ring_k, ring_v, write_slots, grid, theta):
        B, Lq, _ = q.shape
        _, ST, H, D = ring_k.shape
        nf = write_slots.shape[1]
        T = Lq // nf
        batch = torch.arange(B, device=write_slots.device)[:, None].expand(B, nf)
        index = (batch, write_slots.long())
        k_rows = rms_norm_reference(k, k_weight, eps).reshape(B, nf, T * H * D)
        ring_k.view(B, ST // T, T * H * D).index_put_(index, k_rows.to(ring_k.dtype))
        ring_v.view(B, ST // T, T * H * D).index_put_(index, v.reshape(B, nf, T * H * D).to(ring_v.dtype))
        return rms_norm_reference(q, q_weight, eps).view(B, Lq, H, D)


class DenoiseStep(nn.Module):
    """One DiT forward over one block against the KV ring (a denoising step, or the t=0 refresh)."""

    def __init__(self, dit: CausalAudioDiT, tokens_per_frame: int, ring_io: RingIO = "rows",
                 ops: type[Ops] = ExportOps):
        super().__init__()
        if ring_io not in ("rows", "full"):
            raise ValueError(f"ring_io must be 'rows' or 'full', got {ring_io!r}")
        self.dit, self.tokens_per_frame, self.ring_io, self.ops = dit, tokens_per_frame, ring_io, ops

    def forward(self, x, mod_blocks, mod_head, audio, text_k, text_v, ring_k, ring_v,
                write_slots, slot_pos, q_pos):
        # The model writes into the ring it is given, and an exported graph must not mutate its
        # inputs (ONNX / TensorRT have no input aliasing): it writes into per-layer clones instead.
        # A list, not one stacked clone: forward_block only indexes ring_k[i], and writing into a
        # view of a stacked tensor would export as a scatter of the whole layer back into it.
        ring_k = [layer.clone() for layer in ring_k.unbind(0)]
        ring_v = [layer.clone() for layer in ring_v.unbind(0)]
        text_kv = list(zip(text_k.unbind(0), text_v.unbind(0)))
        velocity = self.dit.forward_block(x, TimeMod(mod_blocks, mod_head), audio, text_kv, ring_k, ring_v,
                                          BlockPlan(write_slots, slot_pos, q_pos), self.ops)
        if self.ring_io == "full":
            return velocity, torch.stack(ring_k), torch.stack(ring_v)
        T = self.tokens_per_frame

        def rows(layers):  # gathered per layer: the full rings are never stacked
            return torch.cat([gather_ring_rows(layer[None], write_slots, T) for layer in layers])
        return velocity, rows(ring_k), rows(ring_v)


class AudioCond(nn.Module):
    """Per-video-frame audio features of one block -> the DiT's per-layer audio condition.

    Holds only the audio adapter (not the whole DiT), so its artifact carries only those weights;
    the math is `CausalAudioDiT.audio_cond`, against which it is verified."""

    def __init__(self, dit: CausalAudioDiT):
        super().__init__()
        self.audio_proj, self.audio_cond_projs = dit.audio_proj, dit.audio_cond_projs

    def forward(self, feats):
        packed = self.audio_proj(feats)
        return torch.stack([proj(packed) for proj in self.audio_cond_projs], dim=2)


class TextKV(nn.Module):
    """Zero-padded prompt [B, text_len, text_dim] -> stacked cross-attention K/V [L, B, text_len, H, D].

    `CausalAudioDiT.text_kv` zero-pads shorter prompts to text_len before the embedding, so padding
    outside and running this fixed-shape graph is the same computation."""

    def __init__(self, dit: CausalAudioDiT):
        super().__init__()
        self.text_embedding = dit.text_embedding
        self.cross_attn = nn.ModuleList(blk.cross_attn for blk in dit.blocks)
        self.num_heads = dit.cfg.num_heads

    def forward(self, prompt):
        ctx = self.text_embedding(prompt)
        ks, vs = [], []
        for ca in self.cross_attn:
            ks.append(Ops.rms_norm(ca.k(ctx), ca.norm_k.weight, ca.norm_k.eps).unflatten(-1, (self.num_heads, -1)))
            vs.append(ca.v(ctx).unflatten(-1, (self.num_heads, -1)))
        return torch.stack(ks), torch.stack(vs)


# ---- VAE stages -------------------------------------------------------------------------------

class NearestUp2x(nn.Module):
    """2x nearest upsampling in fp32, the export form of the VAE's `_NearestUp2x`.

    The VAE uses mode="nearest-exact", which the ONNX exporter lowers to a GatherND with a constant
    [H, W, 2] int64 index per upsampling (megabytes at full size, and no Resize layer for TensorRT).
    At an exact scale of 2 the two modes pick the same source pixel (floor((i + 0.5) / 2) ==
    floor(i / 2) for integer i), and "nearest" exports as one ONNX Resize (asymmetric, floor)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x.float(), scale_factor=2.0, mode="nearest").to(x.dtype)


def export_form(vae: WanVAE, part: Literal["encoder", "decoder"]) -> WanVAE:
    """A structural copy of `vae` sharing its weights, for one side of the VAE: the other side's
    modules are dropped (so an artifact carries only the weights it uses), and every `_NearestUp2x`
    is replaced by `NearestUp2x`. The original model is untouched; the stages are verified against it."""
    shared = {id(t): t for t in (*vae.parameters(), *vae.buffers())}
    copy = deepcopy(vae, memo=shared)
    for name in ("decoder", "conv2") if part == "encoder" else ("encoder", "conv1"):
        copy._modules[name] = None  # encode never touches the decoder side, decode never the encoder side
    for module in copy.modules():
        for name, child in list(module.named_children()):
            if isinstance(child, _NearestUp2x):
                module._modules[name] = NearestUp2x()
    return copy


class VAEEncodeImage(nn.Module):
    def __init__(self, vae: WanVAE):
        super().__init__()
        self.vae = export_form(vae, "encoder")

    def forward(self, image):
        return self.vae.encode_image(image)


class VAEDecodeFirst(nn.Module):
    """The stream's first latent frame -> 1 video frame and the decoder's initial causal cache."""

    def __init__(self, vae: WanVAE):
        super().__init__()
        self.vae = export_form(vae, "decoder")

    def forward(self, z):
        frames, cache = self.vae.decode_step(z, None, first=True)
        return (frames, *cache)


class VAEDecodeStep(nn.Module):
    """One later latent frame + the causal cache -> temporal_factor video frames + the next cache."""

    def __init__(self, vae: WanVAE):
        super().__init__()
        self.vae = export_form(vae, "decoder")

    def forward(self, z, *cache):
        frames, new_cache = self.vae.decode_step(z, list(cache), first=False)
        return (frames, *new_cache)


# ---- stage table ------------------------------------------------------------------------------

InputMaker = Callable[[torch.Generator], tuple[torch.Tensor, ...]]
Reference = Callable[..., tuple[torch.Tensor, ...]]


@dataclass
class Stage:
    name: str
    module: nn.Module
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    make_inputs: InputMaker  # fresh random inputs with valid contents, from a seeded generator
    reference: Reference     # the same computation through the eager model's own API (verification)

    def example_inputs(self, seed: int = 0) -> tuple[torch.Tensor, ...]:
        return self.make_inputs(torch.Generator().manual_seed(seed))


def _randn(g: torch.Generator, *shape, scale: float = 1.0, dtype=torch.float32) -> torch.Tensor:
    return (torch.randn(shape, generator=g) * scale).to(dtype)


def _random_plan(g: torch.Generator, cfg: EngineConfig, batch: int) -> BlockPlan:
    """The plan of a random block index, sometimes before and sometimes after the window evicts."""
    blocks_to_evict = -(-cfg.cache.window_frames // cfg.cache.block_frames) + 1
    index = int(torch.randint(0, 2 * blocks_to_evict, (1,), generator=g))
    return plan_block(index, cfg.cache, batch)


def _step_inputs(cfg: EngineConfig, sh: StageShapes, dtype) -> InputMaker:
    d = cfg.dit
    B, F = sh.batch, sh.block_frames
    h, w = sh.latent_hw
    ring_shape = (d.num_layers, B, sh.window_frames * sh.tokens_per_frame, d.num_heads, d.head_dim)
    text_shape = (d.num_layers, B, d.text_len, d.num_heads, d.head_dim)

    def make(g):
        plan = _random_plan(g, cfg, B)
        return (_randn(g, B, d.in_dim, F, h, w, dtype=dtype),
                _randn(g, B, F, 6, d.dim, scale=0.5), _randn(g, B, F, d.dim, scale=0.5),
                _randn(g, B, F, len(d.audio_layers), d.dim, scale=0.5, dtype=dtype),
                _randn(g, *text_shape, dtype=dtype), _randn(g, *text_shape, dtype=dtype),
                _randn(g, *ring_shape, dtype=dtype), _randn(g, *ring_shape, dtype=dtype),
                plan.write_slots, plan.slot_pos, plan.q_pos)
    return make


def _step_reference(dit: CausalAudioDiT, T: int, ring_io: RingIO) -> Reference:
    """The eager model with the reference ops, writing in place into copies of the rings."""

    def reference(x, mod_blocks, mod_head, audio, text_k, text_v, ring_k, ring_v, write_slots, slot_pos, q_pos):
        ring_k, ring_v = ring_k.clone(), ring_v.clone()
        velocity = dit.forward_block(x, TimeMod(mod_blocks, mod_head), audio, list(zip(text_k, text_v)),
                                     ring_k, ring_v, BlockPlan(write_slots, slot_pos, q_pos), Ops)
        if ring_io == "full":
            return velocity, ring_k, ring_v
        # The rows written, read back slot by slot (independent of gather_ring_rows).
        B, F = write_slots.shape
        rows = []
        for ring in (ring_k, ring_v):
            out = ring.new_empty(ring.shape[0], B, F * T, *ring.shape[3:])
            for b in range(B):
                for f, slot in enumerate(write_slots[b].tolist()):
                    out[:, b, f * T:(f + 1) * T] = ring[:, b, slot * T:(slot + 1) * T]
            rows.append(out)
        return velocity, *rows
    return reference


def dit_stages(dit: CausalAudioDiT, cfg: EngineConfig, sh: StageShapes, ring_io: RingIO = "rows",
               dtype: torch.dtype = torch.float32) -> list[Stage]:
    d = cfg.dit
    ring_out = ("k_rows", "v_rows") if ring_io == "rows" else ("ring_k_out", "ring_v_out")
    feats = (sh.batch, d.audio_pack * sh.block_frames, d.audio_feature_dim)
    prompt = (sh.batch, d.text_len, d.text_dim)

    def text_kv_reference(p):
        k, v = zip(*dit.text_kv(p))
        return torch.stack(k), torch.stack(v)

    return [
        Stage("denoise_step", DenoiseStep(dit, sh.tokens_per_frame, ring_io),
              ("x", "mod_blocks", "mod_head", "audio", "text_k", "text_v", "ring_k", "ring_v",
               "write_slots", "slot_pos", "q_pos"),
              ("velocity", *ring_out), _step_inputs(cfg, sh, dtype),
              _step_reference(dit, sh.tokens_per_frame, ring_io)),
        Stage("audio_cond", AudioCond(dit), ("feats",), ("audio",),
              lambda g: (_randn(g, *feats, dtype=dtype),), lambda f: (dit.audio_cond(f),)),
        Stage("text_kv", TextKV(dit), ("prompt",), ("text_k", "text_v"),
              lambda g: (_randn(g, *prompt, dtype=dtype),), text_kv_reference),
    ]


def vae_stages(vae: WanVAE, cfg: EngineConfig, sh: StageShapes, dtype: torch.dtype = torch.float32) -> list[Stage]:
    B, (h, w), (H, W) = sh.batch, sh.latent_hw, sh.image_hw
    z = cfg.vae.z_dim
    layout = vae.decode_cache_layout(h, w)
    cache_in = tuple(f"cache_in_{k}" for k in range(len(layout)))
    cache_out = tuple(f"cache_out_{k}" for k in range(len(layout)))

    def step_inputs(g):
        return (_randn(g, B, z, 1, h, w, dtype=dtype), *(_randn(g, B, *s, dtype=dtype) for s in layout))

    def decode_first_reference(zz):
        frames, cache = vae.decode_step(zz, None, first=True)
        return (frames, *cache)

    def decode_step_reference(zz, *cache):
        frames, new_cache = vae.decode_step(zz, list(cache), first=False)
        return (frames, *new_cache)

    return [
        Stage("vae_encode_image", VAEEncodeImage(vae), ("image",), ("latent",),
              lambda g: ((torch.rand((B, 3, H, W), generator=g) * 2 - 1).to(dtype),),
              lambda image: (vae.encode_image(image),)),
        Stage("vae_decode_first", VAEDecodeFirst(vae), ("z",), ("frames", *cache_out),
              lambda g: (_randn(g, B, z, 1, h, w, dtype=dtype),), decode_first_reference),
        Stage("vae_decode_step", VAEDecodeStep(vae), ("z", *cache_in), ("frames", *cache_out),
              step_inputs, decode_step_reference),
    ]


def build_stages(dit: CausalAudioDiT, vae: WanVAE, cfg: EngineConfig, batch: int = 1,
                 ring_io: RingIO = "rows", dtype: torch.dtype = torch.float32) -> dict[str, Stage]:
    sh = StageShapes.from_config(cfg, batch)
    return {s.name: s for s in (*dit_stages(dit, cfg, sh, ring_io, dtype), *vae_stages(vae, cfg, sh, dtype))}
