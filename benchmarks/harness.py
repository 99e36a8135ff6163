"""Timing and reporting shared by the benchmarks: interleaved repeats, a table,
JSON and a PNG chart.

Shared machines drift, so each benchmark times the fused path and its eager
baseline in the same run, alternating them repeat by repeat, and reports
their ratio; absolute times are only read next to the machine and date they
were taken on.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

__all__ = [
    "Comparison",
    "machine_info",
    "markdown_table",
    "summarize",
    "time_interleaved",
    "write_files",
    "write_report",
]


@dataclass(frozen=True)
class Comparison:
    """One benchmark row: the fused path against its eager baseline."""

    case: str
    fused_ms: float  # median over repeats
    eager_ms: float  # median over repeats
    fused_min_ms: float
    eager_min_ms: float
    bytes_moved: int  # the minimum bytes the work must read and write
    ideal_ms: float  # bytes_moved at the measured streaming bandwidth

    @property
    def speedup(self) -> float:
        """Eager time over fused time (medians): above 1, fused is faster."""
        return self.eager_ms / self.fused_ms


def time_interleaved(
    fused: Callable[[], object],
    eager: Callable[[], object],
    *,
    warmup: int,
    repeats: int,
    before_each: Callable[[], object] | None = None,
) -> tuple[list[float], list[float]]:
    """Wall times in ms of ``fused`` and ``eager``, run alternately ``repeats`` times each.

    Alternating puts both under the same machine conditions; ``warmup``
    untimed runs of each come first (allocator, caches, plans).
    ``before_each``, when given, runs untimed before every run of either.
    """
    fused_ms: list[float] = []
    eager_ms: list[float] = []
    for i in range(warmup + repeats):
        for fn, times in ((fused, fused_ms), (eager, eager_ms)):
            if before_each is not None:
                before_each()
            start = time.perf_counter()
            fn()
            elapsed_ms = (time.perf_counter() - start) * 1e3
            if i >= warmup:
                times.append(elapsed_ms)
    return fused_ms, eager_ms


def summarize(
    case: str, fused_ms: list[float], eager_ms: list[float], bytes_moved: int, gbps: float
) -> Comparison:
    """A row from the raw times; ``gbps`` (1e9 bytes per second) prices bytes_moved."""
    return Comparison(
        case=case,
        fused_ms=statistics.median(fused_ms),
        eager_ms=statistics.median(eager_ms),
        fused_min_ms=min(fused_ms),
        eager_min_ms=min(eager_ms),
        bytes_moved=bytes_moved,
        ideal_ms=bytes_moved / (gbps * 1e9) * 1e3,
    )


def machine_info() -> dict[str, object]:
    """What the numbers were measured on, and when."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu,
        "cores_available": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "commit": _git_commit(),
    }


def _git_commit() -> str:
    """``DISTLEARN_COMMIT`` when set (a copy of the tree whose .git is not its
    own, as on the lent GPU machine, would name a stale commit), else git's."""
    if os.environ.get("DISTLEARN_COMMIT"):
        return os.environ["DISTLEARN_COMMIT"]
    try:
        done = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent,
        )
        return done.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def format_table(rows: list[Comparison]) -> str:
    """A Markdown table of the rows."""
    lines = [
        "| case | fused ms | eager ms | speedup | min bytes at stream bw, ms | MB (min) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row.case} | {row.fused_ms:.2f} | {row.eager_ms:.2f} | {row.speedup:.2f}x "
            f"| {row.ideal_ms:.2f} | {row.bytes_moved / 1e6:.0f} |"
        )
    return "\n".join(lines)


def write_report(
    name: str,
    rows: list[Comparison],
    meta: dict[str, object],
    out_dir: Path,
    *,
    chart: bool = True,
) -> dict[str, Path]:
    """Writes ``name``.json, .md and (with ``chart``) .png under ``out_dir``; returns the paths."""
    records = [asdict(row) | {"speedup": row.speedup} for row in rows]
    draw = (lambda path: _bar_chart(rows, meta, path)) if chart else None
    return write_files(name, meta, records, format_table(rows), out_dir, draw)


def write_files(
    name: str,
    meta: dict[str, object],
    records: list[dict[str, object]],
    table: str,
    out_dir: Path,
    chart: Callable[[Path], object] | None = None,
    header: str | None = None,
) -> dict[str, Path]:
    """Writes a report under ``out_dir``; returns the paths by kind.

    ``name``.json holds ``{"meta": meta, "rows": records}``; ``name``.md a
    first line (``header``, or every metadata item), then ``table``;
    ``name``.png, when ``chart`` is given, is whatever ``chart`` draws to the
    path it is passed.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{name}.json", "md": out_dir / f"{name}.md"}
    paths["json"].write_text(json.dumps({"meta": meta, "rows": records}, indent=2) + "\n")
    if header is None:
        header = ", ".join(f"{k}: {v}" for k, v in meta.items())
    paths["md"].write_text(f"{header}\n\n{table}\n")
    if chart is not None:
        paths["png"] = out_dir / f"{name}.png"
        chart(paths["png"])
    return paths


def markdown_table(
    header: Sequence[str], rows: Sequence[Sequence[str]], numeric: Sequence[bool]
) -> str:
    """A Markdown table of already formatted cells; ``numeric`` columns align right."""
    if len(numeric) != len(header) or any(len(row) != len(header) for row in rows):
        raise ValueError(f"every row and numeric must have {len(header)} cells, as the header")
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---:" if right else "---" for right in numeric) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _bar_chart(rows: list[Comparison], meta: dict[str, object], path: Path) -> None:
    """Fused, eager and ideal times side by side for each case."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.27
    positions = range(len(rows))
    series = (
        ("eager PyTorch", [r.eager_ms for r in rows], "tab:gray"),
        ("distlearn_cuda (fused)", [r.fused_ms for r in rows], "tab:blue"),
        ("minimum bytes at streaming bandwidth", [r.ideal_ms for r in rows], "tab:green"),
    )
    for i, (label, values, color) in enumerate(series):
        ax.bar([p + (i - 1) * width for p in positions], values, width, label=label, color=color)
    for p, row in zip(positions, rows, strict=True):
        ax.annotate(f"{row.speedup:.2f}x", (p, row.fused_ms), ha="center", va="bottom")
    ax.set_xticks(list(positions), [r.case.replace(": ", ":\n") for r in rows], fontsize=8)
    ax.set_ylim(0, 1.3 * max(r.eager_ms for r in rows))
    ax.set_ylabel("ms (median)")
    ax.set_title(f"{meta.get('cpu')}, {meta.get('torch_threads')} threads, {meta.get('date')}")
    ax.legend(fontsize=8, loc="upper left", ncols=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
