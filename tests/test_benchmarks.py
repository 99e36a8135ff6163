"""Smoke test of the benchmarks: they run, check their own results, and report.

No timing is asserted here: speed is read from the reports, next to the
machine and date they were measured on (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from benchmarks import bench_cuda_ops as bench
from benchmarks import bench_e2e_ea, bench_e2e_sgd, e2e
from benchmarks.harness import markdown_table
from benchmarks.shapes import (
    GPT2_SMALL_NUM_PARAMS,
    GPT2_SMALL_NUM_TENSORS,
    RESNET50_NUM_PARAMS,
    RESNET50_NUM_TENSORS,
    SMALL_NUM_PARAMS,
    SMALL_NUM_TENSORS,
    gpt2_small_shapes,
    resnet50_shapes,
    small_tensor_shapes,
)
from distlearn_cuda import _C

REPO = Path(__file__).resolve().parents[1]


def test_resnet50_shapes_match_torchvision_counts() -> None:
    shapes = resnet50_shapes()
    assert len(shapes) == RESNET50_NUM_TENSORS == 161
    assert sum(math.prod(s) for s in shapes) == RESNET50_NUM_PARAMS == 25_557_032


def test_bench_cpu_ops_quick_writes_its_reports(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "benchmarks.bench_cpu_ops", "--quick", "--threads", "1"]
    done = subprocess.run(
        [*command, "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads((tmp_path / "cpu_ops_quick.json").read_text())
    assert report["meta"]["tensors"] == RESNET50_NUM_TENSORS
    assert report["meta"]["torch_threads"] == 1
    assert {"date", "cpu", "torch", "commit", "stream_gbps"} <= report["meta"].keys()
    cases = [row["case"] for row in report["rows"]]
    assert len(cases) == 7 and any("sum_and_normalize_gradients" in c for c in cases)
    assert any("outer gradient+outer step" in c for c in cases)
    assert sum("low-bit sum's passes" in c for c in cases) == 2
    for row in report["rows"]:
        assert row["fused_ms"] > 0 and row["eager_ms"] > 0
        assert math.isclose(row["speedup"], row["eager_ms"] / row["fused_ms"])
    assert (tmp_path / "cpu_ops_quick.png").stat().st_size > 0
    assert "| case |" in (tmp_path / "cpu_ops_quick.md").read_text()


def test_bench_host_overhead_quick_writes_its_reports(tmp_path: Path) -> None:
    report = run_quick("bench_host_overhead", tmp_path, "| call |")
    assert {"date", "cpu", "torch", "commit"} <= report["meta"].keys()
    rows = {row["case"]: row for row in report["rows"]}
    assert len(rows) == 6 and rows["bare gloo allreduce"]["per_call_us"] > 0
    for case, row in rows.items():
        if case != "bare gloo allreduce":
            # The time outside the allreduces is part of the call's time.
            assert 0 < row["overhead_us"] <= row["per_call_us"], case
            assert row["met"] == (row["overhead_us"] <= row["target_us"])
    assert (tmp_path / "host_overhead_quick.png").stat().st_size > 0


# ---------------------------------------------------------------------------
# bench_cuda_ops: everything but the timing runs here, on CPU; the GPU run is
# the last test, skipped without a GPU.


def test_gpt2_small_shapes_match_hugging_face_counts() -> None:
    shapes = gpt2_small_shapes()
    assert len(shapes) == GPT2_SMALL_NUM_TENSORS == 148
    assert sum(math.prod(s) for s in shapes) == GPT2_SMALL_NUM_PARAMS == 124_439_808
    assert shapes[:2] == [(50257, 768), (1024, 768)]  # wte, wpe
    assert shapes[4] == (768, 2304)  # block 0 attn.c_attn.weight: Conv1D, (in, out)
    assert shapes[-2:] == [(768,), (768,)]  # ln_f


def test_small_tensor_list_is_1000_distinct_small_sizes() -> None:
    shapes = small_tensor_shapes()
    assert len(shapes) == SMALL_NUM_TENSORS == 1000
    assert len(set(shapes)) == 1000
    assert all(len(s) == 1 and 1 <= s[0] <= 4093 for s in shapes)
    assert sum(s[0] for s in shapes) == SMALL_NUM_PARAMS
    assert shapes == small_tensor_shapes()  # deterministic


def test_tensor_lists_quick_keeps_the_tensor_counts() -> None:
    full, quick = bench.tensor_lists(quick=False), bench.tensor_lists(quick=True)
    assert [(t.name, t.dtype) for t in full] == [(t.name, t.dtype) for t in quick]
    assert [len(t.shapes) for t in full] == [161, 148, 148, 1000]
    assert [len(t.shapes) for t in quick] == [161, 148, 148, 1000]
    assert full[0].numel == RESNET50_NUM_PARAMS
    assert all(q.numel * 32 < f.numel for q, f in zip(quick[:3], full[:3], strict=True))


@pytest.mark.parametrize(
    ("op", "param_bytes", "buffer_bytes", "expected"),
    [
        ("pack", 4, 4, 8),  # read 4, write 4
        ("unpack", 4, 4, 8),
        ("ea_blend", 4, 4, 16),  # read x, c; write x, delta
        ("center_update", 4, 4, 12),  # read c, delta; write c
        ("sgd step", 4, 4, 16),  # as bench_cpu_ops' SGD_BYTES_PER_ELEMENT
        ("ea round", 4, 4, 24),  # folded: read x, c, sum; write x, c, delta
        ("sgd step", 2, 2, 8),  # bf16 params, bf16 buffer
        ("ea round", 2, 2, 12),  # (2 * 2 + 2) read, (2 * 2 + 2) written
        ("ea_blend", 2, 4, 10),  # bf16 params, fp32 buffer: 3 * 2 + 4
        ("pack", 2, 4, 6),
    ],
)
def test_min_bytes_per_element(op: str, param_bytes: int, buffer_bytes: int, expected: int) -> None:
    assert bench.min_bytes_per_element(op, param_bytes, buffer_bytes) == expected


def test_min_bytes_per_element_rejects_an_unknown_op() -> None:
    with pytest.raises(ValueError, match="unknown op 'allreduce'"):
        bench.min_bytes_per_element("allreduce", 4, 4)


def test_copies_for_l2_rotate_past_twice_the_l2() -> None:
    l2 = 50 * 2**20
    assert bench.copies_for_l2(400 * 2**20, l2) == 2  # one other copy already evicts it
    assert bench.copies_for_l2(25 * 2**20, l2) == 6  # 5 others: 125 MiB > 100 MiB
    assert bench.copies_for_l2(20 * 2**20, l2) == 7  # 6 others: 120 MiB > 100 MiB (5: not >)
    for size in (1, 3 * 2**20, 99 * 2**20, 10**9):
        k = bench.copies_for_l2(size, l2)
        assert (k - 1) * size > 2 * l2 >= (k - 2) * size
    assert bench.copies_within(7, 10, budget_bytes=45) == 4
    assert bench.copies_within(7, 10, budget_bytes=1000) == 7
    assert bench.copies_within(7, 10, budget_bytes=5) == 1  # one copy always runs


def test_lead_outlasts_twice_the_host_time_within_bounds() -> None:
    assert bench.lead_us_for([3.0, 40.0, 7.0]) == 80.0
    assert bench.lead_us_for([1.0]) == bench.MIN_LEAD_US
    assert bench.lead_us_for([]) == bench.MIN_LEAD_US
    assert bench.lead_us_for([1e9]) == bench.MAX_LEAD_US


def test_interleave_alternates_paths_and_rotates_copies() -> None:
    calls: list[str] = []

    def timed(fn: Callable[[], object]) -> tuple[float, float]:
        fn()
        return float(len(calls)), 0.5

    paths = [
        [lambda k=k: calls.append(f"fused{k}") for k in range(3)],
        [lambda k=k: calls.append(f"eager{k}") for k in range(3)],
    ]
    fused, eager = bench.interleave(paths, repeats=4, timed=timed, first=2)
    assert calls == [f"{path}{k}" for k in (2, 0, 1, 2) for path in ("fused", "eager")]
    assert [d for d, _ in fused] == [1.0, 3.0, 5.0, 7.0]
    assert [d for d, _ in eager] == [2.0, 4.0, 6.0, 8.0]
    with pytest.raises(ValueError, match="same number"):
        bench.interleave([paths[0], paths[1][:2]], repeats=1, timed=timed)


# An SGD step on ResNet-50 at 200 us fused, 500 us eager, against a 2500 GB/s copy.
FAKE_ROW = bench.Row(
    tensor_list="resnet50",
    num_tensors=161,
    elements=25_557_032,
    dtype="float32",
    op="sgd step",
    fused_us=200.0,
    eager_us=500.0,
    fused_host_us=25.0,
    eager_host_us=150.0,
    min_bytes=16 * 25_557_032,
    copy_gbps=2500.0,
    copies=2,
    copies_needed=2,
    lead_us=300.0,
    host_over_lead=0,
    repeats=30,
)


def fake_row(**changes: Any) -> bench.Row:
    return dataclasses.replace(FAKE_ROW, **changes)


def test_row_figures_and_table_cells() -> None:
    row = fake_row()
    assert math.isclose(row.gbps, 16 * 25_557_032 / 200e-6 / 1e9)  # 2044.6 GB/s
    assert math.isclose(row.pct_copy_bw, 100 * row.gbps / 2500)
    assert math.isclose(row.speedup, 2.5)
    cells = ["resnet50", "161", "25,557,032", "float32", "sgd step", "200.0", "500.0"]
    cells += ["2045", "81.8", "2.50x", "25.0", "150.0", "2", ""]
    assert bench.format_row(row) == cells
    table = bench.format_table([row, fake_row(op="pack", min_bytes=8 * 25_557_032)])
    lines = table.splitlines()
    assert lines[0].startswith("| tensor list | #tensors | elements | dtype | op | time us |")
    assert lines[1].count("---:") == 10 and len(lines) == 4
    assert "| pack |" in lines[3]


def test_row_notes_flag_short_rotation_and_host_bound_calls() -> None:
    assert bench.row_notes(fake_row()) == ""
    notes = bench.row_notes(fake_row(copies=3, copies_needed=5, host_over_lead=4))
    assert "K=3 of 5" in notes and "4/60 calls" in notes


def test_markdown_table_checks_its_cells() -> None:
    assert markdown_table(["a", "b"], [["x", "1"]], [False, True]) == (
        "| a | b |\n|---|---:|\n| x | 1 |"
    )
    with pytest.raises(ValueError, match="2 cells"):
        markdown_table(["a", "b"], [["x"]], [False, True])


def test_cuda_report_is_written_from_rows(tmp_path: Path) -> None:
    rows = [fake_row(), fake_row(tensor_list="1000 small", op="pack", host_over_lead=1)]
    meta = {"device": "NVIDIA H100 80GB HBM3", "l2_bytes": 50 * 2**20, "copy_gbps": 2500.0}
    paths = bench.write_cuda_report("cuda_ops_test", rows, meta, tmp_path)
    report = json.loads(paths["json"].read_text())
    assert report["meta"] == meta
    assert [r["op"] for r in report["rows"]] == ["sgd step", "pack"]
    assert {"gbps", "pct_copy_bw", "speedup", "fused_host_us", "copies"} <= report["rows"][0].keys()
    md = paths["md"].read_text()
    assert md.startswith("NVIDIA H100 80GB HBM3") and "L2 50 MiB" in md
    assert "| tensor list |" in md and "host outran the spin in 1/60 calls" in md
    assert paths["png"].stat().st_size > 0


def test_missing_requirements_name_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(bench._C, "has_cuda", False)
    missing = bench.missing_requirements("nccl")
    assert len(missing) == 2
    assert "torch" in missing[0] and ("CUDA" in missing[0] or "GPU" in missing[0])
    assert "distlearn_cuda._C" in missing[1] and "DISTLEARN_CUDA=1" in missing[1]


@pytest.mark.skipif(
    torch.cuda.is_available() and _C.has_cuda, reason="a GPU is here: the benchmark would run"
)
def test_bench_cuda_ops_without_a_gpu_exits_2_with_one_line(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_cuda_ops", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bench_cuda_ops needs a GPU; missing: ")
    assert "CUDA" in lines[0]
    assert list(tmp_path.iterdir()) == []


class CpuKernels:
    """The ``_C.*_cuda`` calls bench_cuda_ops makes, served by the CPU ops, so
    that its cases (state, eager baselines, checks) run here."""

    Layout = _C.Layout

    @staticmethod
    def pack_cuda(layout: object, tensors: list[int], buffer: int, slot: int, stream: int) -> None:
        _C.pack(layout, tensors, buffer, slot, 1)

    @staticmethod
    def unpack_cuda(
        layout: object, tensors: list[int], buffer: int, normalize: bool, stream: int
    ) -> None:
        _C.unpack(layout, tensors, buffer, normalize, 1)

    @staticmethod
    def ea_blend_cuda(
        layout: object,
        params: list[int],
        centers: list[int],
        buffer: int,
        alpha: float,
        slot: int,
        stream: int,
    ) -> None:
        _C.ea_blend(layout, params, centers, buffer, alpha, slot, 1)

    @staticmethod
    def center_update_cuda(layout: object, centers: list[int], buffer: int, stream: int) -> None:
        _C.center_update(layout, centers, buffer, 1)


@pytest.mark.usefixtures("world_of_one")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op", bench.OPS)
def test_cases_compute_the_same_fused_and_eager(
    op: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bench, "_C", CpuKernels)
    shapes = ((1,), (3,), (5, 7), (1023,), (2, 3, 4), *small_tensor_shapes()[:20])
    tensor_list = bench.TensorList("odd", shapes, dtype)
    ctx = bench.Context(torch.device("cpu"), torch.Generator().manual_seed(1), 0, 1)
    case = bench.CASES[op](ctx, tensor_list)
    case.check()
    for _ in range(3):  # what the timed loop runs, copies kept apart
        case.fused()
        case.eager()
    case.check()


def test_case_check_catches_different_work(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench, "_C", CpuKernels)
    tensor_list = bench.TensorList("odd", ((5,), (7,)), torch.float32)
    ctx = bench.Context(torch.device("cpu"), torch.Generator().manual_seed(1), 0, 1)
    case = bench.Unpack(ctx, tensor_list)
    monkeypatch.setattr(case, "fused", lambda: None)  # a kernel that writes nothing
    with pytest.raises(AssertionError, match="unpack: fused and eager differ"):
        case.check()


@pytest.mark.skipif(
    not (torch.cuda.is_available() and _C.has_cuda),
    reason="needs a GPU and the CUDA flavor of _C",
)
def test_bench_cuda_ops_quick_writes_its_reports(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_cuda_ops", "--quick", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads((tmp_path / "cuda_ops_quick.json").read_text())
    meta_keys = {"device", "compute_capability", "date", "torch", "cuda", "build_info", "commit"}
    assert meta_keys | {"copy_gbps", "l2_bytes", "copies"} <= report["meta"].keys()
    assert report["meta"]["copy_gbps"] > 0 and report["meta"]["quick"] is True
    rows = report["rows"]
    assert len(rows) == 4 * len(bench.OPS)
    assert {r["tensor_list"] for r in rows} == {"resnet50", "gpt2-small", "1000 small"}
    assert {(r["dtype"], r["tensor_list"]) for r in rows if r["dtype"] == "bfloat16"} == {
        ("bfloat16", "gpt2-small")
    }
    for row in rows:
        assert row["fused_us"] > 0 and row["eager_us"] > 0 and row["fused_host_us"] > 0
        assert row["gbps"] > 0 and row["copies"] >= 1
        assert math.isclose(row["speedup"], row["eager_us"] / row["fused_us"])
    assert (tmp_path / "cuda_ops_quick.png").stat().st_size > 0
    assert "| tensor list |" in (tmp_path / "cuda_ops_quick.md").read_text()


# ---------------------------------------------------------------------------
# bench_e2e_sgd, bench_e2e_ea: 2 processes over gloo, whole training steps.


def run_quick(module: str, out: Path, table: str = "| model | params |") -> dict[str, Any]:
    """Runs ``python -m benchmarks.<module> --quick``; returns its JSON report."""
    command = [sys.executable, "-m", f"benchmarks.{module}", "--quick", "--out", str(out)]
    done = subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert table in done.stdout
    return json.loads((out / f"{module.removeprefix('bench_')}_quick.json").read_text())


def check_e2e_report(report: dict[str, Any], name: str, out: Path) -> None:
    """What both end-to-end reports hold: the run, both models, ratios to the baseline."""
    meta = report["meta"]
    assert {"date", "cpu", "torch", "commit", "metric", "targets"} <= meta.keys()
    assert meta["processes"] == 2 and meta["backend"] == "gloo" and meta["torch_threads"] == 1
    assert meta["quick"] is True and meta["batch_size_per_rank"] == 32
    assert list(meta["models"]) == ["digits", "mlp25m"]
    assert meta["models"]["mlp25m"]["params"] == e2e.mlp_num_params(e2e.MLP_QUICK_SIZES)
    for row in report["rows"]:
        if row["ms"] is None:  # a configuration this version lacks
            assert row["note"] == "not available in this version" and row["ratio"] is None
            continue
        assert row["ms"] > 0 and row["min_ms"] > 0 and row["steps"] > 0
        assert len(row["ms_by_rank"]) == 2 and row["ms_by_rank"][0] == row["ms"]
        baseline = next(
            r["ms"] for r in report["rows"] if r["model"] == row["model"] and r["key"] == "local"
        )
        assert math.isclose(row["ratio"], row["ms"] / baseline)
    assert (out / f"{name}.png").stat().st_size > 0
    md = (out / f"{name}.md").read_text()
    assert "Quick run" in md and "| model | params |" in md and "Targets" in md


def test_bench_e2e_sgd_quick_writes_its_reports(tmp_path: Path) -> None:
    report = run_quick("bench_e2e_sgd", tmp_path)
    check_e2e_report(report, "e2e_sgd_quick", tmp_path)
    rows = report["rows"]
    assert [(r["model"], r["key"]) for r in rows] == [
        (model, key) for model in ("digits", "mlp25m") for key in bench_e2e_sgd.CONFIGS
    ]
    assert all(r["tau"] is None for r in rows)
    overlapped = [r for r in rows if r["key"] == "ours_overlapped"]
    assert all((r["ms"] is None) != bench_e2e_sgd.has_overlap() for r in overlapped)
    assert [t["model"] for t in report["meta"]["targets"]] == ["digits"] * 2 + ["mlp25m"] * 2


def test_bench_e2e_ea_quick_writes_its_reports(tmp_path: Path) -> None:
    report = run_quick("bench_e2e_ea", tmp_path)
    check_e2e_report(report, "e2e_ea_quick", tmp_path)
    rows = report["rows"]
    expected = [
        (model, key, tau)
        for model in ("digits", "mlp25m")
        for key, tau in [("local", None)]
        + [(key, tau) for tau in (1, 10) for key in bench_e2e_ea.CONFIGS]
    ]
    assert [(r["model"], r["key"], r["tau"]) for r in rows] == expected
    for row in rows:
        if row["ms"] is not None and row["tau"] is not None:
            assert row["steps"] % row["tau"] == 0  # blocks of whole periods
    assert report["meta"]["taus"] == [1, 10] and report["meta"]["alpha"] == 0.2
    assert len(report["meta"]["targets"]) == 4


def test_mlp_has_25m_params_by_its_sizes() -> None:
    assert e2e.mlp_num_params(e2e.MLP_SIZES) == 25_175_040
    assert 24_000_000 <= e2e.mlp_num_params(e2e.MLP_SIZES) <= 26_000_000
    with torch.device("meta"):  # the count of the real module, nothing allocated
        model = e2e.build_mlp(e2e.MLP_SIZES)
    assert sum(p.numel() for p in model.parameters()) == 25_175_040
    assert [type(m).__name__ for m in model] == ["Linear", "ReLU", "Linear", "ReLU", "Linear"]
    spec = e2e.model_spec("mlp25m", quick=False)
    assert spec.num_params == 25_175_040 and spec.input_shape == (1024,)
    assert spec.num_classes == 1024 and "1024-4096-4096-1024" in spec.description


def test_model_specs_build_what_they_describe() -> None:
    for name in e2e.MODELS:
        spec = e2e.model_spec(name, quick=True)
        model = spec.build()
        assert sum(p.numel() for p in model.parameters()) == spec.num_params
        inputs, labels = e2e.synthetic_batches(spec, rank=0)[0]
        assert model(inputs).shape == (e2e.BATCH_SIZE, spec.num_classes)
        assert int(labels.max()) < spec.num_classes
    digits = e2e.model_spec("digits", quick=False)
    assert digits.input_shape == (1, 8, 8) and digits.num_classes == 10
    assert not torch.equal(
        e2e.synthetic_batches(digits, rank=0)[0][0], e2e.synthetic_batches(digits, rank=1)[0][0]
    )
    with pytest.raises(ValueError, match="unknown model 'resnet'"):
        e2e.model_spec("resnet", quick=False)


def test_block_steps_hold_whole_periods() -> None:
    assert e2e.block_steps(60, rounds=12, period=1) == 5
    assert e2e.block_steps(7, rounds=1, period=1) == 7
    assert e2e.block_steps(200, rounds=4, period=10) == 50
    assert e2e.block_steps(200, rounds=4, period=50) == 50
    assert e2e.block_steps(60, rounds=1, period=50) == 100  # rounded up
    assert bench_e2e_sgd.rounds_for(60) == 12 and bench_e2e_sgd.rounds_for(3) == 1
    assert (
        bench_e2e_ea.rounds_for(200, quick=False) == 4
        and bench_e2e_ea.rounds_for(10, quick=False) == 1
    )
    assert (
        bench_e2e_ea.rounds_for(10, quick=True) == 1
        and bench_e2e_ea.rounds_for(40, quick=True) == 4
    )
    with pytest.raises(ValueError, match=">= 1"):
        e2e.block_steps(10, rounds=0, period=1)


@pytest.mark.parametrize("tau", [1, 2, 10, 50])
@pytest.mark.parametrize("warmup", [1, 5, 60])
def test_ea_warmup_leaves_the_next_step_a_round(tau: int, warmup: int) -> None:
    steps = bench_e2e_ea.warmup_steps(warmup, tau)
    assert steps >= warmup and steps >= tau  # at least one round, untimed
    assert (steps + 1) % tau == 0  # so every block of whole periods starts with a round
    assert steps - tau < max(warmup, tau)  # the fewest such steps


def test_time_blocks_alternate_configurations_in_whole_periods() -> None:
    calls: list[str] = []

    def config(key: str, period: int) -> e2e.Config:
        return e2e.Config(
            key,
            key.upper(),
            lambda: calls.append(key),
            finish=lambda: calls.append(f"{key} finish"),
            period=period,
        )

    timings = e2e.time_blocks(
        [config("a", 1), config("b", 2)], steps=5, rounds=2, align=lambda: calls.append("|")
    )
    a, b = ["a"] * 3 + ["a finish"], ["b"] * 4 + ["b finish"]  # 3 steps a round, b: 2 periods
    assert calls == ["|", *a, "|", *b, "|", *b, "|", *a]  # reversed every other round
    assert len(timings["a"].step_ms) == 6 and len(timings["a"].block_ms_per_step) == 2
    assert len(timings["b"].step_ms) == 8 and len(timings["b"].block_ms_per_step) == 2
    summary = timings["b"].summary()
    assert summary["steps"] == 8 and summary["blocks"] == 2
    assert summary["min_step_ms"] <= summary["median_step_ms"]


def fake_results(ms: dict[str, float], unavailable: dict[str, str]) -> dict[str, Any]:
    timings = {
        key: {"median_step_ms": v, "min_step_ms": v / 2, "steps": 10} for key, v in ms.items()
    }
    return {"models": {"digits": {"timings": timings, "unavailable": unavailable}}}


def test_rows_are_ratios_to_the_local_step_and_say_what_is_missing() -> None:
    spec = e2e.model_spec("digits", quick=False)
    per_rank = [
        fake_results({"local": 2.0, "ours": 3.0}, {"ours_overlapped": "not available"}),
        fake_results({"local": 2.2, "ours": 3.3}, {"ours_overlapped": "not available"}),
    ]
    entries = [
        ("local", "local", "no communication", None),
        ("ours", "ours", "ours: sum", None),
        ("ours_overlapped", "ours_overlapped", "ours overlapped", None),
    ]
    rows = e2e.build_rows(spec, per_rank, entries, "median_step_ms", "min_step_ms")
    assert [r.ratio for r in rows] == [1.0, 1.5, None]
    assert rows[1].ms == 3.0 and rows[1].min_ms == 1.5 and rows[1].ms_by_rank == [3.0, 3.3]
    assert rows[2].note == "not available" and rows[2].ms is None
    table = e2e.format_rows(rows, with_tau=False).splitlines()
    assert table[0] == ("| model | params | configuration | step ms | min ms | x no-comm | added |")
    assert table[1] == "|---|---:|---|---:|---:|---:|---:|"
    assert table[3] == "| digits | 29,066 | ours: sum | 3.00 | 1.50 | 1.500x | +50.0% |"
    assert table[4] == (
        "| digits | 29,066 | ours overlapped (not available) | n/a | n/a | n/a | n/a |"
    )
    with_tau = e2e.format_rows([dataclasses.replace(rows[1], tau=10)], with_tau=True)
    assert "| digits | 29,066 | 10 | ours: sum |" in with_tau


def e2e_row(key: str, ms: float | None, tau: int | None = None) -> e2e.Row:
    ratio = None if ms is None else ms / 100.0  # a 100 ms no-communication step
    return e2e.Row("mlp25m", 25_175_040, key, key, tau, ms, ms, ratio, 10, None)


def test_targets_read_the_issue_goals() -> None:
    sgd_rows = [e2e_row("local", 100.0), e2e_row("ours_bucket_view", 150.0)]
    sgd = bench_e2e_sgd.targets(
        [
            *sgd_rows,
            e2e_row("ddp_bucket_view", 154.0),
            e2e_row("ours_overlapped", 150.0),
            e2e_row("ddp", 149.0),
        ]
    )
    assert [t["met"] for t in sgd] == [True, False]
    missing = bench_e2e_sgd.targets(
        [e2e_row("ours_overlapped", None), e2e_row("ddp_bucket_view", 1), e2e_row("ddp", 1)]
    )
    assert missing[0]["met"] is None and missing[0]["value"] == "not available in this version"
    ea_rows = [e2e_row("local", 100.0), e2e_row("ours_async", 102.0, tau=10)]
    ea = bench_e2e_ea.targets([*ea_rows, e2e_row("periodic_model_averager", 107.0, tau=10)])
    assert [t["met"] for t in ea] == [True, True]
    assert ea[1]["value"] == "+2.0% vs +7.0%"
    slow = bench_e2e_ea.targets(
        [e2e_row("ours_async", 104.0, tau=10), e2e_row("periodic_model_averager", 107.0, tau=10)]
    )
    assert [t["met"] for t in slow] == [False, False]
    text = e2e.format_targets(slow, quick=False)
    assert text.splitlines()[1].endswith("+4.0%: NOT met")
    assert "NOT met" not in e2e.format_targets(slow, quick=True)


def test_options_default_by_mode_and_check_the_models() -> None:
    quick = bench_e2e_sgd.parse_args(["--quick"])
    assert (quick.steps, quick.warmup, quick.timeout) == (10, 1, 110.0)
    full = bench_e2e_ea.parse_args(["--models", "mlp25m", "--steps", "300", "--no-chart"])
    assert (full.steps, full.warmup, full.models, full.no_chart) == (300, 5, ["mlp25m"], True)
    with pytest.raises(SystemExit):
        bench_e2e_sgd.parse_args(["--models", "digits,resnet"])
    with pytest.raises(SystemExit):
        bench_e2e_sgd.parse_args(["--steps", "0"])


def raise_on_rank_1(rank: int, world_size: int) -> int:
    """A launch target: rank 1 fails, rank 0 waits for it in a collective."""
    if rank == 1:
        raise ValueError("rank 1 fails on purpose")
    dist.barrier()
    return rank


def sleep_for(rank: int, world_size: int, seconds: float) -> None:
    """A launch target that outlasts the launcher's timeout."""
    time.sleep(seconds)


def test_launch_reports_a_failing_rank_without_waiting_for_its_peer() -> None:
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="rank 1 fails on purpose") as failure:
        e2e.launch(f"{__name__}:raise_on_rank_1", (), timeout=60)
    assert "rank 1:" in str(failure.value) and "ValueError" in str(failure.value)
    assert time.monotonic() - start < 30  # not the collective's timeout nor the launcher's


def test_launch_kills_ranks_that_outlast_its_timeout() -> None:
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"no result within the 1 s timeout from ranks \[0, 1\]"):
        e2e.launch(f"{__name__}:sleep_for", (60.0,), timeout=1)
    assert time.monotonic() - start < 20


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer without a GPU")
def test_gpu_diagnostics_without_a_gpu_say_so_and_exit_2(capsys: pytest.CaptureFixture) -> None:
    from benchmarks import ncu_kernels, profile_cuda_host

    assert ncu_kernels.main() == 2
    assert "needs a GPU" in capsys.readouterr().err
    assert profile_cuda_host.main([]) == 2
    assert "needs a GPU" in capsys.readouterr().err


def test_bench_low_bit_blocks_quick_reports_every_format_and_block(tmp_path: Path) -> None:
    report = run_quick("bench_low_bit_blocks", tmp_path, "| gradients | format |")
    rows = report["rows"]
    assert {(r["format"], r["block"]) for r in rows} == {
        (f, b) for f in ("int8", "int4", "fp8_e4m3", "mxfp4") for b in (32, 64, 128, 256)
    }
    assert {r["gradients"] for r in rows} == {
        "init",
        "trained",
        "outer",
        "conv init",
        "conv trained",
    }
    for r in rows:
        # Bits per value from the messages the library sizes: codes plus a
        # scale (4 bytes, MXFP4's 1) per block.
        code_bits = 4 if r["format"] in ("int4", "mxfp4") else 8
        scale_bits = 8 if r["format"] == "mxfp4" else 32
        assert r["bits_per_value"] == pytest.approx(code_bits + scale_bits / r["block"], abs=1e-3)
        assert 0 < r["relative_error"] < 0.5 and r["ns_per_value"] > 0
    assert (tmp_path / "low_bit_blocks_quick.png").stat().st_size > 0
