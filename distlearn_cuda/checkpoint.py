"""Checkpoints that a crash cannot corrupt.

``save_checkpoint`` writes to a temporary file next to the target, flushes
it to disk, then renames it over the target: a rename within a directory is
atomic, so the path holds either the previous checkpoint or the new one,
whole, whenever the process dies.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["load_checkpoint", "save_checkpoint"]


def save_checkpoint(state: Any, path: str | os.PathLike[str]) -> None:
    """Saves ``state`` (anything ``torch.save`` takes) to ``path`` atomically.

    Typically ``{"model": model.state_dict(), "optimizer": opt.state_dict(),
    "sync": sgd_or_ea.state_dict()}``. A leftover ``.<name>.*.tmp`` file
    next to ``path`` is the trace of an interrupted save; it is never read.
    """
    target = Path(path)
    fd, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    # The rename itself must reach the disk too.
    directory = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def load_checkpoint(path: str | os.PathLike[str], map_location: Any = None) -> Any:
    """Loads what ``save_checkpoint`` wrote (tensors, numbers, strings, containers only)."""
    return torch.load(path, map_location=map_location, weights_only=True)
