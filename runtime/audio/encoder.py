"""wav2vec2 audio encoder with the OmniAvatar / LiveTalk per-video-frame recipe.

Recipe (checked against OmniAvatar `OmniAvatar/models/wav2vec.py` `Wav2VecModel.forward` +
`linear_interpolation`, and `scripts/inference.py` where `audio_embeddings` is built):

1. waveform -> Wav2Vec2FeatureExtractor: with `do_normalize` (true for wav2vec2-base-960h) the
   clip is normalised to zero mean / unit variance, `(x - mean) / sqrt(var + 1e-7)` (population
   variance), then zero padding is appended (`F.pad(..., value=0)`) AFTER normalisation;
2. `feature_extractor` (the CNN, 50 Hz) -> transpose to [B, T, C];
3. `linear_interpolation`: `F.interpolate(mode='linear', align_corners=True)` over time to
   `seq_len` = number of video frames, BEFORE `feature_projection` and the transformer;
4. `feature_projection` -> `encoder` (pos-conv, LayerNorm, layers) with all hidden states;
5. `audio_embeddings = last_hidden_state`, then `torch.cat` with every entry of `hidden_states`
   in order along the last dim: [last, h0 (transformer input), h1, ..., hN] = (N + 2) x width.

Streaming difference (see stream.py): the statistics of step 1 are taken over one window, not the
whole clip, and only over the window's samples at or after stream time 0 (`pad_before` leading
samples are padding: excluded from the statistics and kept exactly zero, as upstream's padding).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Wav2Vec2Config, Wav2Vec2Model

from runtime.config import AudioConfig

# Wav2Vec2FeatureExtractor.zero_mean_unit_var_norm adds this to the variance.
_NORM_EPS = 1e-7


def normalize_waveform(wave: torch.Tensor, pad_before: int | torch.Tensor = 0) -> torch.Tensor:
    """Zero mean / unit variance per row over samples [pad_before:], leading padding kept at 0.

    Computed in float32 whatever the input dtype (upstream does it in numpy float32).
    """
    x = wave.float()
    n = x.shape[-1]
    positions = torch.arange(n, device=x.device).unsqueeze(0)
    if isinstance(pad_before, torch.Tensor):  # per row; a tensor already on x's device is not copied
        valid = positions >= pad_before.to(x.device).reshape(-1, 1)  # [B, N]
    else:  # a Python int compares on the device: no host-to-device upload inside the audio stage
        valid = positions >= int(pad_before)  # [1, N]
    count = valid.sum(-1, keepdim=True).clamp_min(1)
    mean = (x * valid).sum(-1, keepdim=True) / count
    var = ((x - mean).square() * valid).sum(-1, keepdim=True) / count
    return torch.where(valid, (x - mean) / torch.sqrt(var + _NORM_EPS), torch.zeros_like(x))


def interpolate_frames(features: torch.Tensor, num_frames: int) -> torch.Tensor:
    """[B, T, C] at 50 Hz -> [B, num_frames, C]: OmniAvatar's `linear_interpolation`."""
    out = F.interpolate(features.transpose(1, 2), size=num_frames, mode="linear", align_corners=True)
    return out.transpose(1, 2)


def wav2vec2_config(cfg: AudioConfig) -> Wav2Vec2Config:
    """HF config for the encoder described by `cfg`; the fixed fields are wav2vec2-base-960h's."""
    return Wav2Vec2Config(
        hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size, conv_dim=list(cfg.conv_dim),
        conv_kernel=list(cfg.conv_kernel), conv_stride=list(cfg.conv_stride),
        num_conv_pos_embeddings=cfg.num_conv_pos_embeddings,
        num_conv_pos_embedding_groups=cfg.num_conv_pos_embedding_groups,
        feat_extract_norm="group", conv_bias=False, do_stable_layer_norm=False,
    )


def _config_mismatches(hf: Wav2Vec2Config, cfg: AudioConfig) -> list[str]:
    expected = wav2vec2_config(cfg)
    fields = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
              "conv_dim", "conv_kernel", "conv_stride", "num_conv_pos_embeddings",
              "num_conv_pos_embedding_groups", "do_stable_layer_norm")
    bad = []
    for name in fields:
        got, want = getattr(hf, name), getattr(expected, name)
        if isinstance(want, (list, tuple)):
            got, want = list(got), list(want)
        if got != want:
            bad.append(f"{name}: directory has {got}, AudioConfig expects {want}")
    return bad


def _read_do_normalize(directory: Path) -> bool:
    """`do_normalize` from preprocessor_config.json; True (the base-960h value) when absent."""
    path = directory / "preprocessor_config.json"
    if not path.is_file():
        return True
    with open(path) as f:
        return bool(json.load(f).get("do_normalize", True))


class AudioEncoder(nn.Module):
    """wav2vec2 -> one (num_layers + 2) * hidden_size feature vector per video frame."""

    def __init__(self, model: Wav2Vec2Model, cfg: AudioConfig, normalize: bool = True):
        super().__init__()
        if model.config.do_stable_layer_norm:
            # The hidden-state walk below is the post-norm (base) encoder's; the large
            # "stable layer norm" variant orders its norms differently.
            raise ValueError("AudioEncoder supports the post-norm wav2vec2 encoder only "
                             "(do_stable_layer_norm=False, as wav2vec2-base-960h)")
        self.model = model.eval().requires_grad_(False)
        self.cfg = cfg
        self.normalize = normalize

    # ---- construction ---------------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg: AudioConfig, seed: int = 0, attn_implementation: str = "sdpa") -> AudioEncoder:
        """Random weights with the real key layout; never touches the hub."""
        hf = wav2vec2_config(cfg)
        hf._attn_implementation = attn_implementation
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = Wav2Vec2Model(hf)
        return cls(model, cfg, normalize=True)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, cfg: AudioConfig,
                        attn_implementation: str = "sdpa") -> AudioEncoder:
        """Load a local Hugging Face directory (e.g. wav2vec2-base-960h/) and check it matches `cfg`."""
        path = Path(directory)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not a Hugging Face model directory (no config.json); "
                                    "wav2vec2 weights are loaded from a local directory only")
        hf = Wav2Vec2Config.from_pretrained(path, local_files_only=True)
        bad = _config_mismatches(hf, cfg)
        if bad:
            raise ValueError(f"wav2vec2 directory {path} does not match AudioConfig: " + "; ".join(bad))
        model, info = Wav2Vec2Model.from_pretrained(path, local_files_only=True, output_loading_info=True,
                                                    attn_implementation=attn_implementation)
        # masked_spec_embed is only used for SpecAugment in training; anything else missing
        # would silently stay random.
        missing = [k for k in info["missing_keys"] if not k.endswith("masked_spec_embed")]
        if missing:
            raise ValueError(f"wav2vec2 directory {path} lacks weights: {', '.join(sorted(missing))}")
        return cls(model, cfg, normalize=_read_do_normalize(path))

    # ---- forward --------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def forward(self, wave: torch.Tensor, num_video_frames: int,
                pad_before: int | torch.Tensor = 0) -> torch.Tensor:
        """wave [B, N] float -> [B, num_video_frames, feature_dim].

        `pad_before` (int or [B] tensor): leading samples of each row that are padding before
        stream time 0; they are left out of the waveform statistics (only matters with normalize).
        """
        if wave.ndim != 2:
            raise ValueError(f"wave must be [batch, samples], got shape {tuple(wave.shape)}")
        if num_video_frames < 1:
            raise ValueError(f"num_video_frames must be >= 1, got {num_video_frames}")
        x = normalize_waveform(wave, pad_before) if self.normalize else wave.float()
        cnn = self.model.feature_extractor(x.to(self.dtype)).transpose(1, 2)  # [B, T50, C]
        cnn = interpolate_frames(cnn, num_video_frames)
        hidden, _ = self.model.feature_projection(cnn)
        states = self._hidden_states(hidden)
        return torch.cat([states[-1], *states], dim=-1)

    def _hidden_states(self, hidden: torch.Tensor) -> list[torch.Tensor]:
        """Post-norm wav2vec2 encoder, keeping the transformer input and every layer's output
        (the 13 `hidden_states` of base-960h; the last one is also `last_hidden_state`)."""
        enc = self.model.encoder
        hidden = hidden + enc.pos_conv_embed(hidden)
        hidden = enc.dropout(enc.layer_norm(hidden))
        states = [hidden]
        for layer in enc.layers:
            hidden = layer(hidden, attention_mask=None)
            states.append(hidden)
        return states
