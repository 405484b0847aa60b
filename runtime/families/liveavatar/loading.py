"""Loading the real files: the Wan2.2-S2V-14B trunk (Hugging Face shard set) + the Live Avatar LoRA.

The trunk directory (huggingface.co/Wan-AI/Wan2.2-S2V-14B) holds `config.json`,
`diffusion_pytorch_model-0000{1..4}-of-00004.safetensors` and their index json (32.6 GB bf16), next to
files that are not the trunk (the VAE, T5 and wav2vec2). Loading is strict and checks before it reads:
the key layout and every shape come from the safetensors headers (seconds, no tensor data), so a wrong
directory or config fails at once with every missing, unexpected and mis-shaped key named. Only then
are the 32.6 GB read; the LoRA is merged into them in place, once.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ...checkpoint import CheckpointError, check_shapes, load_into, load_safetensors, read_index, shard_paths
from .config import LiveAvatarConfig, LoraConfig, resolve_config
from .lora import merge_lora, parse_lora
from .model import LiveAvatarDiT, build_liveavatar

RELEASE_STEM = "diffusion_pytorch_model"
RELEASE_INDEX = f"{RELEASE_STEM}.safetensors.index.json"
WHAT = "Wan2.2-S2V-14B trunk"
W2V_DIR = "wav2vec2-large-xlsr-53-english"  # the Hugging Face audio encoder's directory name

RELEASE_LAYOUT = ("Wan2.2-S2V-14B/ (diffusion_pytorch_model-0000N-of-0000M.safetensors + "
                  f"{RELEASE_INDEX} [+ config.json]), Wan2.1_VAE.pth (or .safetensors; in Wan2.2-S2V-14B/ "
                  "upstream), liveavatar.safetensors (the LoRA), wav2vec2-large-xlsr-53-english/ (a Hugging "
                  "Face directory with config.json), at any depth")


@dataclass(frozen=True)
class ReleaseFiles:
    """Where the Live Avatar release files are (what `Engine.from_pretrained(dir)` loads)."""

    trunk: Path    # the directory holding the trunk shards and their index json
    lora: Path     # liveavatar.safetensors
    vae: Path      # Wan2.1_VAE.pth or .safetensors
    wav2vec: Path  # wav2vec2-large-xlsr-53-english/


def _only(hits: list[Path], what: str, root: Path) -> Path | None:
    if len(hits) > 1:
        raise CheckpointError(f"{root}: several {what}: {[str(h.relative_to(root)) for h in hits]}; "
                              f"keep one or pass the files one by one")
    return hits[0] if hits else None


def find_release(root: str | Path) -> ReleaseFiles:
    """Find the family-2 release files under `root` (any nesting), or raise one CheckpointError naming
    what is missing and the expected layout. Reads directory entries only, no file contents."""
    root = Path(root)
    if not root.is_dir():
        raise CheckpointError(f"{root}: not a directory (expected the Live Avatar release: {RELEASE_LAYOUT})")
    index = _only(sorted(root.rglob(RELEASE_INDEX)), RELEASE_INDEX, root)
    lora = _only(sorted(root.rglob("liveavatar.safetensors")), "liveavatar.safetensors", root)
    vae = _only(sorted(p for p in root.rglob("Wan2.1_VAE.*") if p.suffix in (".pth", ".safetensors")),
                "Wan2.1_VAE files", root)
    w2v = _only(sorted(p.parent for p in root.rglob(f"{W2V_DIR}/config.json")),
                f"{W2V_DIR} directories", root)
    found = {"trunk index " + RELEASE_INDEX: index, "liveavatar.safetensors": lora, "Wan2.1_VAE.pth": vae,
             f"{W2V_DIR}/config.json": w2v}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        raise CheckpointError(f"{root}: not a Live Avatar release directory: no {', no '.join(missing)} "
                              f"(expected {RELEASE_LAYOUT})")
    return ReleaseFiles(index.parent, lora, vae, w2v)


def _shards_of_index(index_path: Path) -> tuple[list[Path], dict[str, str]]:
    weight_map = read_index(index_path)
    return shard_paths(index_path, weight_map), weight_map


def trunk_files(source: str | Path | Sequence[str | Path]) -> tuple[list[Path], dict[str, str] | None]:
    """The trunk's safetensors files (and the index's weight_map when there is one).

    source: the release directory, its index json, one .safetensors file, or a list of shard files.
    """
    if isinstance(source, (list, tuple)):
        files = [Path(p) for p in source]
        missing = [str(p) for p in files if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"trunk files not found: {missing}")
        return files, None
    path = Path(source)
    if path.is_dir():
        indexes = sorted(path.glob("*.safetensors.index.json"))
        if len(indexes) > 1:
            raise CheckpointError(f"{path}: several index files {[p.name for p in indexes]}; name one")
        if indexes:
            return _shards_of_index(indexes[0])
        files = sorted(path.glob("*.safetensors"))
        if len(files) != 1:
            raise CheckpointError(f"{path}: no index json and not exactly one .safetensors: {[p.name for p in files]}")
        return files, None
    if not path.is_file():
        raise FileNotFoundError(f"trunk not found: {path}")
    if path.name.endswith(".index.json"):
        return _shards_of_index(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: the trunk is read from safetensors (a file, a shard list or an index json)")
    return [path], None


def read_layout(files: list[Path], weight_map: dict[str, str] | None = None) -> dict[str, tuple[int, ...]]:
    """key -> shape from the safetensors headers only; keys in two files or off their index are errors."""
    layout: dict[str, tuple[int, ...]] = {}
    twice, misplaced = [], []
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                if key in layout:
                    twice.append(f"{key} ({path.name})")
                if weight_map is not None and weight_map.get(key) != path.name:
                    misplaced.append(f"{key} ({path.name}, index says {weight_map.get(key)})")
                layout[key] = tuple(f.get_slice(key).get_shape())
    if twice:
        raise CheckpointError(f"keys found in more than one trunk file: {twice[:20]}")
    if misplaced:
        raise CheckpointError(f"keys not where the index puts them: {misplaced[:20]}")
    if weight_map is not None:
        unlisted = sorted(set(weight_map) - set(layout))
        if unlisted:
            raise CheckpointError(f"keys listed in the index but in no shard: {unlisted[:20]}")
    return layout


# config.json fields of the diffusers WanModel_S2V (names from its __init__); compared when present.
def _release_config_fields(cfg: LiveAvatarConfig) -> dict[str, object]:
    c = cfg.latent_channels
    return {"dim": cfg.dim, "ffn_dim": cfg.ffn_dim, "num_heads": cfg.num_heads, "num_layers": cfg.num_layers,
            "freq_dim": cfg.freq_dim, "text_len": cfg.text_len, "in_dim": c, "out_dim": c, "cond_dim": c,
            "audio_dim": cfg.audio_dim, "num_audio_token": cfg.audio_tokens,
            "audio_inject_layers": list(cfg.audio_inject_layers), "eps": cfg.eps, "enable_adain": True,
            "adain_mode": "attn_norm", "enable_framepack": True, "enable_motioner": False, "zero_timestep": True}


def check_release_config(config_json: Path, cfg: LiveAvatarConfig) -> None:
    """Raise naming every config.json field that contradicts the configuration (absent fields pass)."""
    found = json.loads(config_json.read_text())
    bad = [f"{k}: file {found[k]!r} vs config {v!r}" for k, v in _release_config_fields(cfg).items()
           if k in found and found[k] != v]
    if bad:
        raise CheckpointError(f"{config_json} contradicts the {cfg.name!r} configuration: " + "; ".join(bad))


def _read_tensors(files: list[Path]) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for path in files:
        state.update(load_safetensors(path))
    return state


def read_lora(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: the LoRA is read from safetensors (liveavatar.safetensors)")
    return load_safetensors(path)


def load_liveavatar(trunk: str | Path | Sequence[str | Path], lora_path: str | Path | None = None,
                    config: LiveAvatarConfig | str = "liveavatar-14b", device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.bfloat16, lora: LoraConfig | None = None) -> LiveAvatarDiT:
    """Build the trunk, load it strictly from the release files, merge the LoRA once, return it in eval mode."""
    cfg = resolve_config(config)
    files, weight_map = trunk_files(trunk)
    config_json = files[0].parent / "config.json"
    if config_json.is_file():
        check_release_config(config_json, cfg)
    model = build_liveavatar(cfg, device="meta")
    expected = {k: v.shape for k, v in model.state_dict().items()}
    headers = {k: torch.empty(shape, device="meta") for k, shape in read_layout(files, weight_map).items()}
    check_shapes(expected, headers, WHAT)
    state = _read_tensors(files)
    if lora_path is not None:
        merge_lora(state, parse_lora(read_lora(lora_path)), lora or cfg.lora)
    return load_into(model, state, what=WHAT, dtype=dtype, device=device).eval()


def release_index(cfg: LiveAvatarConfig | str = "liveavatar-14b", num_shards: int = 4,
                  dtype: torch.dtype = torch.bfloat16) -> dict:
    """The Hugging Face index json of the trunk in `num_shards` shards (keys in state-dict order,
    split by bytes), planned on the meta device: for checking a download's index without reading it."""
    model = build_liveavatar(cfg, device="meta")
    itemsize = torch.empty((), dtype=dtype).element_size()
    sizes = {k: v.numel() * itemsize for k, v in model.state_dict().items()}
    total = sum(sizes.values())
    weight_map, done = {}, 0
    for key, nbytes in sizes.items():
        shard = min(num_shards - 1, done * num_shards // total)
        weight_map[key] = f"{RELEASE_STEM}-{shard + 1:05d}-of-{num_shards:05d}.safetensors"
        done += nbytes
    return {"metadata": {"total_size": total}, "weight_map": weight_map}


def check_index(index: dict, cfg: LiveAvatarConfig | str = "liveavatar-14b") -> None:
    """Raise naming every key the index json lists that the configuration lacks, and every one it misses."""
    model = build_liveavatar(cfg, device="meta")
    listed = index.get("weight_map", {})
    missing = sorted(set(model.state_dict()) - set(listed))
    unexpected = sorted(set(listed) - set(model.state_dict()))
    if missing or unexpected:
        raise CheckpointError(f"{WHAT} index does not match ({len(missing)} missing, {len(unexpected)} "
                              f"unexpected): missing {missing[:20]}, unexpected {unexpected[:20]}")
