"""scripts/benchmark_plots.py on the committed raw benchmark results (CPU)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RAW = REPO / "docs" / "benchmarks" / "speed"
sys.path.insert(0, str(REPO / "scripts"))

if not RAW.is_dir():
    pytest.skip("no docs/benchmarks in this install", allow_module_level=True)

import benchmark_plots as bp  # noqa: E402

DIRS = [RAW / "2-max-context", RAW / "3-24gb-lora", RAW / "4-8gb-qlora"]


def test_only_trained_rows_are_plotted():
    speed, ctx = bp.records(DIRS, "speed"), bp.records(DIRS, "max-context")
    # 24 GB: seed as written + vramfit; 8 GB: uncapped seed, made to fit, vramfit (as written was refused).
    assert sorted((r["budget_gib"], r["config"]) for r in speed) == [
        (8, "seed-as-written-uncapped"), (8, "seed-made-to-fit"), (8, "vramfit-auto"),
        (24, "seed-as-written"), (24, "vramfit-auto"),
    ]  # fmt: skip
    assert [r["predicted_max_seq"] for r in ctx] == [14208, 3456, 21248]
    assert all(r["breakdown_gib"] and r["metrics"]["peak_process_gib"] for r in speed + ctx)


def test_nothing_to_plot_is_an_error(tmp_path, capsys):
    assert bp.main([str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "no trained rows" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib is not installed")
def test_writes_the_three_plots(tmp_path):
    assert bp.main([*map(str, DIRS), "--out", str(tmp_path)]) == 0
    for name in ("speed.png", "max-context.png", "breakdown.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rows_are_labelled_with_their_card():
    assert bp.card({"gpu": "NVIDIA H100 80GB HBM3"}) == "H100"
    assert bp.card({"gpu": "NVIDIA H200"}) == "H200"
    assert bp.card({"gpu": "NVIDIA L4"}) == "NVIDIA L4"
    assert bp.card({}) == "?"
