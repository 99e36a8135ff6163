"""The slow-link benchmark (benchmarks/bench_slow_link.py): its quick form
trains every configuration and reports; its pieces compute what the report says.

No loss or speed target is asserted here: those are read from the full
run's report, next to the machine and date it was measured on.
"""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import bench_slow_link as bench
from benchmarks import slow_link_lm as lm

REPO = Path(__file__).resolve().parents[1]


def test_quick_run_trains_every_configuration_and_reports(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "benchmarks.bench_slow_link", "--quick", "--no-netns"]
    configs = [*bench.CONFIG_NAMES, "diloco50-mxfp4", "diloco50-bf16"]
    done = subprocess.run(
        [*command, "--configs", ",".join(configs), "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-4000:]
    report = json.loads((tmp_path / "slow_link_quick.json").read_text())
    assert {"date", "cpu", "torch", "commit", "link", "num_params"} <= report["meta"].keys()
    assert report["meta"]["ranks"] == 2 and report["meta"]["link"] == "unlimited"
    rows = {row["config"]: row for row in report["rows"]}
    assert list(rows) == configs
    tokens = {name: [e["tokens_total"] for e in row["evaluations"]] for name, row in rows.items()}
    assert len({tuple(t) for t in tokens.values()}) == 1, tokens  # equal tokens everywhere
    for name, row in rows.items():
        losses = [e["val_loss"] for e in row["evaluations"]]
        assert len(losses) >= 2 and all(math.isfinite(x) for x in losses), name
        assert row["wall_s"] > 0 and row["bytes_per_rank"] >= 0, name
    sgd = [e["val_loss"] for e in rows["sgd"]["evaluations"]]
    assert sgd[-1] < sgd[0]
    assert rows["sgd"]["loss_ratio"] == 1.0
    assert (tmp_path / "slow_link_quick.png").stat().st_size > 0
    table = (tmp_path / "slow_link_quick.md").read_text()
    assert "| config |" in table and "Targets:" in table
    assert "mxfp4 + error feedback against DiLoCo, H 5 (target: within 1%" in table
    assert "; against bf16: loss" in table
    assert "DiLoCo, H 5, bfloat16 against DiLoCo, H 5: loss" in table


def test_peak_bytes_per_synchronization_is_the_largest_fragment() -> None:
    assert bench.peak_sync_bytes([], 1000) == 4000  # not fragmented: every parameter
    assert bench.peak_sync_bytes([1000], 1000) == 4000
    assert bench.peak_sync_bytes([300, 200, 250, 250], 1000) == 1200


def test_time_to_loss_is_the_first_evaluation_at_or_below() -> None:
    evaluations = [{"val_loss": v, "wall_s": float(i)} for i, v in enumerate([3.0, 2.0, 2.5, 1.9])]
    assert bench.time_to_loss(evaluations, 2.0)["wall_s"] == 1.0
    assert bench.time_to_loss(evaluations, 1.0) is None


def test_targets_say_met_or_missed() -> None:
    def row(name: str, loss: float, mb: float, seconds: float, fragments: int = 1) -> dict:
        evaluations = [
            {"val_loss": 5.0, "wall_s": 0.0, "tokens_total": 0},
            {"val_loss": loss, "wall_s": seconds, "tokens_total": 100},
        ]
        numels = [300, 200, 250, 250][:fragments] if fragments > 1 else []
        return {
            "config": name,
            "period": 50,
            "fragments": fragments,
            "final_val_loss": loss,
            "wall_s": seconds,
            "bytes_per_rank": mb * 1e6,
            "peak_sync_bytes_computed": bench.peak_sync_bytes(numels, 1000),
            "evaluations": evaluations,
        }

    rows = [row("sgd", 2.0, 100.0, 600.0), row("diloco50", 1.99, 1.9, 60.0)]
    rows.append(row("streaming", 2.1, 1.9, 60.0, fragments=4))
    for r in rows:
        bench._compare(r, rows[0])
    lines = bench.format_targets(rows, limited=True, quick=False)
    assert "0.9950 x sgd's, met" in lines[0]
    assert "52.6x fewer, met" in lines[1]
    assert "10.00x, met" in lines[2]
    assert "3.333x, missed" in lines[3]  # the largest fragment: 300 of 1000
    assert lines[3].endswith("missed")  # 5% worse than DiLoCo's loss
    assert "not the target's setting" in bench.format_targets(rows, False, False)[2]
    assert "a quick run" in bench.format_targets(rows, True, quick=True)[0]


def test_lr_schedule_warms_up_then_decays_to_the_floor() -> None:
    factors = [lm.lr_factor(step, warmup=10, total=100) for step in range(101)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(1.0) and factors[100] == pytest.approx(0.1)
    assert all(a >= b for a, b in itertools.pairwise(factors[10:]))


def test_stdlib_split_is_by_file_and_deterministic(tmp_path: Path) -> None:
    for i in range(60):
        (tmp_path / f"m{i}.py").write_text(f"x = {i}\n")
    (tmp_path / "site-packages").mkdir()
    (tmp_path / "site-packages" / "other.py").write_text("left out\n")
    first, second = lm.split_stdlib(tmp_path), lm.split_stdlib(tmp_path)
    assert first == second
    assert first.train_files + first.validation_files == 60
    assert first.validation_files > 0 and b"left out" not in first.train + first.validation


def test_model_predicts_the_next_byte_causally() -> None:
    torch.manual_seed(0)
    model = lm.ByteLM(lm.ModelShape(width=16, layers=1, heads=2, context=8))
    tokens = torch.randint(0, 256, (2, 8))
    changed = tokens.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 256
    with torch.no_grad():
        logits, after = model(tokens), model(changed)
    assert logits.shape == (2, 8, 256)
    torch.testing.assert_close(logits[:, :-1], after[:, :-1])  # no peeking ahead


def test_namespace_needs_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench.os, "geteuid", lambda: 1000)
    with pytest.raises(bench.NamespaceUnavailable, match="not root"):
        with bench.limited_namespace("50mbit"):
            pass


def test_a_saved_run_is_reported_again_with_the_equal_loss_columns(tmp_path: Path) -> None:
    saved = REPO / "benchmarks" / "results" / "slow_link.json"
    bench.main(["--from-json", str(saved), "--out", str(tmp_path), "--no-chart"])
    report = json.loads((tmp_path / "slow_link.json").read_text())
    rows = {row["config"]: row for row in report["rows"]}
    assert rows["sgd"]["equal_loss_speedup"] == pytest.approx(1.0)
    for row in rows.values():  # sgd reaches every other final loss within its own run
        assert row["sgd_s_to_this_loss"] <= rows["sgd"]["wall_s"] + 1e-9


def test_compressed_configurations_are_compared_with_their_float32_one() -> None:
    base = {"config": "diloco50", "description": "DiLoCo, H 50", "final_val_loss": 2.0,
            "bytes_per_rank": 80e6}  # fmt: skip
    rows = [
        base,
        {"config": "diloco50-int4", "description": "int4", "compression": "int4",
         "final_val_loss": 2.01, "bytes_per_rank": 9e6},
        {"config": "diloco50-mxfp4", "description": "mxfp4", "compression": "mxfp4",
         "final_val_loss": 2.03, "bytes_per_rank": 10e6},
        {"config": "diloco50-int8", "description": "int8", "compression": "int8",
         "final_val_loss": 2.0, "bytes_per_rank": 20e6},
        {"config": "sgd", "description": "SGD", "final_val_loss": 1.0, "bytes_per_rank": 800e6},
        {"config": "sgd-int8-ef", "description": "SGD int8", "compression": "int8",
         "final_val_loss": 1.005, "bytes_per_rank": 210e6},
        {"config": "sgd-bf16", "description": "SGD bf16", "comm_dtype": "bfloat16",
         "final_val_loss": 1.001, "bytes_per_rank": 400e6},
    ]  # fmt: skip
    lines = bench.compression_targets(rows, lambda ok: "met" if ok else "missed")
    assert lines[0].endswith("loss 1.0050 x, 8.89x fewer bytes (measured), met")
    assert lines[1].endswith("loss 1.0150 x, 8.00x fewer bytes (measured), missed")
    assert lines[2].endswith("loss 1.0000 x, 4.00x fewer bytes (measured)")  # no 8-bit target
    assert "(target: within 1% at 4x fewer bytes)" in lines[3]  # SGD's 8-bit target
    assert lines[3].endswith(
        "loss 1.0050 x, 3.81x fewer bytes (measured), missed; "
        "against bf16: loss 1.0040 x, 1.90x fewer bytes"
    )
    assert lines[4] == "- SGD bf16 against SGD: loss 1.0010 x, 2.00x fewer bytes (measured)"
