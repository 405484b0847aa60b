"""The installed project must not shadow packages its dependencies import.

A top-level package once named `kernels` hid Hugging Face's `kernels` package, which
transformers imports when it is installed; every test that built a wav2vec2 encoder
failed at import. The editable install puts each of our top-level packages on the path.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import pathlib

import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _our_packages() -> list[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return config["tool"]["scikit-build"]["wheel"]["packages"]


def _installed_distribution_modules() -> set[str]:
    """Top-level import names of every installed distribution except this project."""
    names: set[str] = set()
    for dist in importlib.metadata.distributions():
        if (dist.metadata["Name"] or "").lower() in {"avatar-runtime", "avatar_runtime"}:
            continue
        top = dist.read_text("top_level.txt")
        if top:
            names.update(line.strip() for line in top.splitlines() if line.strip())
        for file in dist.files or ():
            parts = pathlib.PurePath(file).parts
            if len(parts) > 1 and parts[1] == "__init__.py":
                names.add(parts[0])
    return names


def test_no_top_level_package_shadows_an_installed_distribution():
    clashes = set(_our_packages()) & _installed_distribution_modules()
    assert not clashes, f"top-level packages shadow installed distributions: {sorted(clashes)}"


def test_transformers_wav2vec2_imports_with_the_project_installed():
    from transformers import Wav2Vec2Model  # noqa: F401  (the import is the test)

    spec = importlib.util.find_spec("kernels")
    if spec is not None and spec.origin is not None:
        assert not pathlib.Path(spec.origin).is_relative_to(ROOT / "kernels"), spec.origin
