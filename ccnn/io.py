"""Files written so that a crash never leaves half of one: atomic replacement, checkpoints, JSON.

Imports nothing else from ``ccnn``, so every module (training, reports, the hard-constraint
experiments, the benchmarks) can write its outputs through it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path

import torch

__all__ = ["atomic_save", "json_path", "replace_atomically", "write_json"]


def _finite(value: object) -> object:
    """JSON has no NaN: classes never seen get ``null``."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return value


def replace_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write`` on a temporary file beside ``path``, then rename it to ``path``: an
    interruption leaves the previous file whole."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def atomic_save(obj: object, path: Path) -> None:
    """``torch.save`` through :func:`replace_atomically`: a crash leaves the old file."""
    replace_atomically(Path(path), lambda tmp: torch.save(obj, tmp))


def json_path(value: str | Path | None, option: str = "--json") -> Path | None:
    """Check an output path for JSON before any work is done: not a folder, and no file where
    one of its folders would go (``None`` passes through).  Raises ``ValueError`` naming
    ``option``."""
    if value is None:
        return None
    path = Path(value)
    if path.is_dir():
        raise ValueError(f"{option} {path} is a folder; give a file name")
    blocker = next((p for p in path.parents if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise ValueError(f"{option} {path}: {blocker} is a file, not a folder")
    return path


def write_json(path: Path, data: object) -> None:
    """``data`` as indented JSON (NaN written as ``null``), creating the folder; atomically
    (:func:`replace_atomically`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_finite(data), indent=2) + "\n"
    replace_atomically(path, lambda tmp: tmp.write_text(text))
