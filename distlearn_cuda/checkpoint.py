"""Checkpoints that a crash cannot corrupt and ranks cannot mix up.

Ranks hold different state (EA parameters always; SGD step counts, and the
parameters of ranks that ran out of data), so each rank writes its own file:
the path names it with ``{rank}`` ("run-{rank}.ckpt"), which both functions
fill in with this process's rank in the default group. In a world of more
than one rank, a path without ``{rank}`` is refused unless the caller says
that one rank writes a file for everyone (``shared=True``), because every
rank writing the same path leaves whichever rank renamed last, and a resumed
run that loads it gives every rank that rank's state.

``save_checkpoint`` writes to a temporary file next to the target, flushes
it to disk, then renames it over the target: a rename within a directory is
atomic, so the path holds either the previous checkpoint or the new one,
whole, whenever the process dies. The file records the rank and world size
that wrote it; ``load_checkpoint`` refuses a file of another rank or world.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["checkpoint_path", "load_checkpoint", "save_checkpoint"]

_FORMAT = "distlearn_cuda.checkpoint/1"


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def checkpoint_path(path: str | os.PathLike[str], shared: bool = False) -> Path:
    """This rank's file for ``path``: ``{rank}`` filled in with the rank in
    the default group (and ``{world_size}`` with its size).

    Raises:
        TypeError: ``path`` is not a str or os.PathLike.
        ValueError: a world of several ranks, no ``{rank}`` in ``path``, and
            not ``shared``; or ``shared`` with ``{rank}`` in ``path``.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    text = os.fspath(path)
    rank, world_size = _rank_and_world()
    has_rank = "{rank}" in text
    if shared and has_rank:
        raise ValueError(f"path: {text!r} names a rank but shared=True says one file for all")
    if not shared and not has_rank and world_size > 1:
        raise ValueError(
            f"path: {text!r} has no {{rank}}, so all {world_size} ranks would write the same "
            f"file and a resumed run would give every rank one rank's state; name each "
            f"rank's file (e.g. 'run-{{rank}}.ckpt'), or pass shared=True when one rank "
            f"saves state that is the same on every rank"
        )
    return Path(text.replace("{rank}", str(rank)).replace("{world_size}", str(world_size)))


def save_checkpoint(state: Any, path: str | os.PathLike[str], *, shared: bool = False) -> Path:
    """Saves ``state`` (anything ``torch.save`` takes) to this rank's file
    for ``path`` (see ``checkpoint_path``) atomically; returns that file.

    Typically ``{"model": model.state_dict(), "optimizer": opt.state_dict(),
    "sync": sgd_or_ea.state_dict()}`` to ``"run-{rank}.ckpt"`` on every
    rank. A leftover ``.<name>.*.tmp`` file next to it is the trace of an
    interrupted save; it is never read.
    """
    target = checkpoint_path(path, shared)
    rank, world_size = _rank_and_world()
    record = {
        "format": _FORMAT,
        "rank": None if shared else rank,
        "world_size": world_size,
        "state": state,
    }
    fd, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as file:
            torch.save(record, file)
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
    return target


def load_checkpoint(
    path: str | os.PathLike[str], map_location: Any = None, *, shared: bool = False
) -> Any:
    """Loads the ``state`` that ``save_checkpoint`` wrote to this rank's file
    for ``path`` (tensors, numbers, strings, containers only).

    Raises:
        ValueError: the file was written by another rank, or by a world of
            another size (per-rank state does not map onto it), or the path
            is refused as by ``checkpoint_path``.
    """
    source = checkpoint_path(path, shared)
    record = torch.load(source, map_location=map_location, weights_only=True)
    if not (isinstance(record, dict) and record.get("format") == _FORMAT):
        return record  # a plain torch.save file
    rank, world_size = _rank_and_world()
    if record["world_size"] != world_size and not shared:
        raise ValueError(
            f"path: {str(source)!r} was written by a world of {record['world_size']} ranks, "
            f"this one has {world_size}; per-rank state does not carry over"
        )
    if record["rank"] is not None and record["rank"] != rank:
        raise ValueError(
            f"path: {str(source)!r} holds rank {record['rank']}'s state, this is rank {rank}"
        )
    return record["state"]
