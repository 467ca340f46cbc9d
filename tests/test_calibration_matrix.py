"""The calibration matrices plan on an H200 as written, and the optional attn column
reaches the command and the CSV without changing what sdpa rows had."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import get_args

import pytest

from conftest import REPO
from vramfit.config import Attn
from vramfit.hardware import fake_facts
from vramfit.model_shape import load_shape
from vramfit.plan import build_plan

sys.path.insert(0, str(REPO / "scripts"))
from calibrate_memory import TARGETS, config_for, read_matrix, set_args  # noqa: E402
import calibration_report  # noqa: E402

MATRICES = [REPO / "scripts/calibration_matrix.yaml", REPO / "scripts/calibration_matrix_archs.yaml"]
H200_GIB = 139.8  # what torch reports for an H200


@pytest.mark.parametrize("path", MATRICES, ids=lambda p: p.name)
def test_matrix_rows_are_valid(path):
    rows = read_matrix(path)
    assert rows
    for r in rows:
        assert (REPO / f"scripts/archs/{r['arch']}.json").is_file()
        assert r["method"] == "full" or r["targets"] in TARGETS
        assert r["attn"] in get_args(Attn)


def test_archs_matrix_covers_the_new_architectures_and_eager():
    rows = read_matrix(MATRICES[1])
    assert {"mistral-7b", "gemma-2b", "gemma2-2b", "phi3-mini"} <= {r["arch"] for r in rows}
    eager = [r for r in rows if r["attn"] == "eager" and r["arch"].startswith("qwen")]
    assert len(eager) == 3 and all(1024 <= r["seq_len"] <= 2048 for r in eager)


def test_attn_column_reaches_the_command_only_when_not_sdpa():
    row = read_matrix(MATRICES[0])[0]
    assert row["attn"] == "sdpa" and not any("attn_implementation" in a for a in set_args(row, 4))
    assert "model.attn_implementation=eager" in set_args({**row, "attn": "eager"}, 4)


def test_archs_matrix_plans_on_an_h200_three_at_a_time():
    """Every row plans as calibrate_memory.py plans it; with its caps (prediction * 1.3 + 2
    GiB), any three runs fit the card together, so the default --parallel 3 never waits."""
    caps = []
    for r in read_matrix(MATRICES[1]):
        cfg = config_for(r).model_copy(update={"budget_gib": 1000})
        p = build_plan(cfg, load_shape(str(REPO / f"scripts/archs/{r['arch']}.json")), fake_facts(H200_GIB))
        caps.append(p.breakdown.peak_gib * 1.3 + 2)
    assert sum(sorted(caps)[-3:]) <= H200_GIB - 3


def record(arch: str, attn: str | None) -> dict:
    row = {"arch": arch, "method": "qlora", "lora_r": 16, "targets": "all", "micro_batch": 1, "seq_len": 2048,
           "grad_ckpt": True, "optimizer": "adamw_torch"}
    if attn:
        row["attn"] = attn
    return {**row, "command": "vramfit train ...", "exit": 0, "gpu": "NVIDIA H200", "date": "2026-11-22",
            "versions": {"torch": "2.11"},
            "metrics": {"peak_process_gib": 10.0, "peak_reserved_gib": 9.2, "peak_allocated_gib": 8.5}}


def write_report(tmp_path: Path, monkeypatch, records: list[dict]) -> list[list[str]]:
    raw, out = tmp_path / "cal.jsonl", tmp_path / "cal.csv"
    raw.write_text("".join(json.dumps(r) + "\n" for r in records))
    argv = ["calibration_report.py", "--raw", str(raw), "--csv", str(out), "--distributed", str(tmp_path / "none")]
    monkeypatch.setattr(sys, "argv", argv)
    assert calibration_report.main() == 0
    return list(csv.reader(out.open()))


def test_report_adds_a_trailing_attn_column_only_for_other_implementations(tmp_path, monkeypatch):
    plain = write_report(tmp_path, monkeypatch, [record("qwen2.5-3b", None)])
    assert plain[0] == calibration_report.FIELDS
    both = write_report(tmp_path, monkeypatch, [record("qwen2.5-3b", None), record("gemma2-2b", "eager")])
    assert both[0] == calibration_report.FIELDS + ["attn"]
    assert [r[-1] for r in both[1:]] == ["sdpa", "eager"]
    assert both[1][:-1] == plain[1]  # the sdpa row as it was
    assert float(both[2][calibration_report.FIELDS.index("predicted_gib")]) > 0
