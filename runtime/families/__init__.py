"""Model families behind one protocol (base.py), found by preset name or by the files in a directory.

`Engine.from_pretrained(name_or_dir)` asks `family_for`: a preset name picks the family that lists
it; a directory picks the first registered family whose `recognises(dir)` is true. A family adds
itself with `register(cls)` when its package is imported; the packages in BUILTIN are imported on
first use, so the engine core names no family.
"""
from __future__ import annotations

import importlib
from pathlib import Path

from .base import BATCH, Family, Row, SessionState, Timeline

__all__ = ["BATCH", "BUILTIN", "Family", "Row", "SessionState", "Timeline", "family_for", "families", "register"]

BUILTIN = ("runtime.families.livetalk", "runtime.families.liveavatar")

_REGISTRY: dict[str, type[Family]] = {}
_loaded = False


def register(family: type[Family]) -> type[Family]:
    """Make `family` known by its name and presets (usable as a class decorator)."""
    taken = {p: f.name for f in _REGISTRY.values() if f is not family for p in f.presets}
    clash = [p for p in family.presets if p in taken]
    if clash:
        raise ValueError(f"family {family.name!r}: presets {clash} already belong to {[taken[p] for p in clash]}")
    _REGISTRY[family.name] = family
    return family


def families() -> dict[str, type[Family]]:
    _load_builtin()
    return dict(_REGISTRY)


def presets() -> dict[str, str]:
    """{preset name: family name}."""
    return {p: f.name for f in families().values() for p in f.presets}


def family_for(path_or_preset: str) -> type[Family]:
    known = families()
    for family in known.values():
        if path_or_preset in family.presets and not Path(path_or_preset).exists():
            return family
    root = Path(path_or_preset)
    if not root.is_dir():
        raise FileNotFoundError(f"{path_or_preset}: neither a preset ({', '.join(sorted(presets()))}) nor a "
                                "checkpoint directory")
    for family in known.values():
        if family.recognises(root):
            return family
    raise FileNotFoundError(f"{root}: no model family recognises these files (families: {', '.join(known)})")


def _load_builtin() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for name in BUILTIN:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name != name:  # the package exists but fails inside: say so
                raise
