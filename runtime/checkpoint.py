"""Checkpoint reading and strict loading.

Formats: a single `.safetensors` file, a sharded safetensors set with its `*.safetensors.index.json`
(Hugging Face layout), a directory holding either, or a pickled `.pth`/`.pt` read with
`weights_only=True` only (never a full unpickle). Loading is strict: one error lists every missing,
unexpected and mis-shaped key, because a silent fallback to a wrong config is the worst failure.
`load_into` also refuses tensors of the wrong kind (an integer or bool tensor where the model holds
floats) and non-finite values (NaN / Inf weights would stream black frames), naming the keys. Shard
names in an index json must stay inside the index's directory (checked before any file is opened).
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


class CheckpointError(ValueError):
    """A checkpoint does not match the model it is loaded into."""


def _index_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.safetensors.index.json"))


def read_index(index_path: Path) -> dict[str, str]:
    """The weight_map (key -> shard file name) of a Hugging Face index json, or an error naming the file."""
    try:
        index = json.loads(index_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{index_path}: not a readable index json ({e})") from e
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path}: no 'weight_map' in the index")
    return weight_map


def shard_paths(index_path: Path, weight_map: dict[str, str]) -> list[Path]:
    """The shard files an index names, each checked to be a plain file name beside the index (`../x` or
    an absolute path would load tensors from anywhere) and to exist. The check is on the name, not the
    resolved path: a Hugging Face cache snapshot holds its shards as symlinks into ../../blobs."""
    names = sorted({str(v) for v in weight_map.values()})
    outside = [repr(n) for n in names if n in ("", ".", "..") or Path(n).name != n or "\\" in n]
    if outside:
        raise CheckpointError(f"{index_path}: shard names must be plain file names beside the index, "
                              f"got {', '.join(outside)}")
    paths = [index_path.parent / n for n in names]
    absent = [p.name for p in paths if not p.is_file()]
    if absent:
        raise CheckpointError(f"{index_path}: shards listed in the index are missing: {absent}")
    return paths


def load_safetensors(path: Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """safetensors.load_file, with an error that names the file (a truncated download says only
    'incomplete metadata' otherwise)."""
    try:
        return load_file(str(path), device=device)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or damaged?): {e}") from e


def _read_sharded(index_path: Path, device: str) -> dict[str, torch.Tensor]:
    weight_map = read_index(index_path)
    state: dict[str, torch.Tensor] = {}
    for shard_path in shard_paths(index_path, weight_map):
        shard = shard_path.name
        part = load_safetensors(shard_path, device=device)
        stray = [k for k in part if weight_map.get(k) != shard]
        if stray:
            raise CheckpointError(f"{shard_path}: keys not listed for this shard in the index: {stray[:5]}")
        state.update(part)
    absent = sorted(set(weight_map) - set(state))
    if absent:
        raise CheckpointError(f"{index_path}: keys listed in the index but in no shard: {absent[:10]}")
    return state


def _read_pickle(path: Path, device: str) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(str(path), map_location=device, weights_only=True)
    except pickle.UnpicklingError:
        raise  # code in the pickle: torch's message says what weights_only refused
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or damaged?): {e}") from e
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and wrapper in obj and isinstance(obj[wrapper], dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: not a flat dict of tensors")
    return obj


def read_state_dict(path: str | Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Read every tensor of a checkpoint file, shard set or directory (see module docstring)."""
    path = Path(path)
    if path.is_dir():
        indexes = _index_files(path)
        if len(indexes) > 1:
            raise CheckpointError(f"{path}: several index files {[p.name for p in indexes]}; name one")
        if indexes:
            return _read_sharded(indexes[0], device)
        files = sorted(path.glob("*.safetensors"))
        if len(files) != 1:
            raise CheckpointError(f"{path}: expected one .safetensors file or an index json, found "
                                  f"{[p.name for p in files]}")
        return load_safetensors(files[0], device=device)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.name.endswith(".index.json"):
        return _read_sharded(path, device)
    if path.suffix == ".safetensors":
        return load_safetensors(path, device=device)
    if path.suffix in PICKLE_SUFFIXES:
        return _read_pickle(path, device)
    raise CheckpointError(f"{path}: unknown checkpoint format (want .safetensors, an index json or .pth)")


def strip_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Remove `prefix` from every key that has it (e.g. 'model.' or 'base_model.model.')."""
    return {k.removeprefix(prefix): v for k, v in state.items()}


def check_keys(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str = "model") -> None:
    """Raise CheckpointError naming every missing, unexpected and mis-shaped key."""
    check_shapes({k: v.shape for k, v in module.state_dict().items()}, state, what)


def check_shapes(expected: dict[str, torch.Size], state: dict[str, torch.Tensor], what: str = "model") -> None:
    """As check_keys, against a table of key -> shape (for checkpoints in another model's key layout)."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = sorted(f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k])}"
                       for k in set(expected) & set(state) if tuple(state[k].shape) != tuple(expected[k]))
    if missing or unexpected or misshaped:
        raise _key_report(f"{what} checkpoint does not match the configuration ({len(missing)} missing, "
                          f"{len(unexpected)} unexpected, {len(misshaped)} mis-shaped keys):",
                          {"missing": missing, "unexpected": unexpected, "mis-shaped": misshaped})


def _key_report(title: str, groups: dict[str, list[str]]) -> CheckpointError:
    """One error: the title, then up to 20 keys per non-empty group."""
    lines = [title]
    for name, keys in groups.items():
        if keys:
            shown = keys[:20] + ([f"... and {len(keys) - 20} more"] if len(keys) > 20 else [])
            lines.append(f"  {name}: " + ", ".join(shown))
    return CheckpointError("\n".join(lines))


def check_values(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str = "model") -> None:
    """Raise CheckpointError naming every tensor of the wrong kind (integer / bool where the model holds
    floats, or the reverse) and every floating tensor holding NaN or Inf."""
    expected = module.state_dict()
    wrong_kind = sorted(f"{k}: {v.dtype} (model {expected[k].dtype})" for k, v in state.items()
                        if k in expected and v.is_floating_point() != expected[k].is_floating_point())
    non_finite = sorted(k for k, v in state.items()
                        if v.is_floating_point() and v.device.type != "meta" and not bool(torch.isfinite(v).all()))
    if wrong_kind or non_finite:
        raise _key_report(f"{what} checkpoint has unusable values ({len(wrong_kind)} of the wrong dtype, "
                          f"{len(non_finite)} with NaN or Inf):",
                          {"wrong dtype": wrong_kind, "NaN or Inf": non_finite})


def load_into(module: torch.nn.Module, state: dict[str, torch.Tensor], *, what: str = "model",
              dtype: torch.dtype | None = None, device: str | torch.device | None = None) -> torch.nn.Module:
    """Strictly load `state` into `module` (which may live on the meta device), casting floats to dtype."""
    check_keys(module, state, what)
    check_values(module, state, what)
    cast = {}
    for k, v in state.items():
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        cast[k] = v.to(device) if device is not None else v
    module.load_state_dict(cast, strict=True, assign=True)
    return module


def save_state_dict(state: dict[str, torch.Tensor], path: str | Path, shard_bytes: int | None = None) -> None:
    """Write safetensors; with shard_bytes, a Hugging Face style shard set plus index json."""
    path = Path(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    if shard_bytes is None:
        save_file(tensors, str(path))
        return
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in tensors.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nbytes
    stem = path.name.removesuffix(".safetensors")
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path.parent / name))
        weight_map.update({k: name for k in shard})
    index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in tensors.values())},
             "weight_map": weight_map}
    (path.parent / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=1))
