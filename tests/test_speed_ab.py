"""scripts/speed_ab.py: every case under every tree, the trees' order alternating by repeat, one
JSON line per run (the GPU runs themselves are in docs/benchmarks/speed-checks/13-...)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import speed_ab  # noqa: E402


def test_interleaves_trees_and_records_each_run(tmp_path, monkeypatch):
    calls = []

    def fake_run(tree, args, out, log, env):
        calls.append((tree.name, args[-1], env.get("VRAMFIT_PROFILE")))
        return 0, 1.0, {"steady_tokens_per_s": 100.0 * len(calls)}

    monkeypatch.setattr(speed_ab, "run_one", fake_run)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.setattr(sys, "argv", [
        "speed_ab.py", "--tree", f"A={tmp_path / 'a'}", "--tree", f"B={tmp_path / 'b'}", "--repeats", "2", "--profile",
        "--case", "x=train --set train.max_steps=3", "--case", "y=train --budget 8", "--results", str(tmp_path / "r"),
    ])  # fmt: skip
    assert speed_ab.main() == 0
    trees = [c[0] for c in calls]
    # repeat 0: A then B for each case; repeat 1: B then A; then one profiled run per case under A
    assert trees == ["a", "b", "a", "b", "b", "a", "b", "a", "a", "a"]
    assert [c[2] is not None for c in calls] == [False] * 8 + [True, True]
    lines = [json.loads(x) for x in (tmp_path / "r" / "ab.jsonl").read_text().splitlines()]
    assert len(lines) == 10
    assert {(x["tree"], x["case"]) for x in lines[:8]} == {("A", "x"), ("B", "x"), ("A", "y"), ("B", "y")}
    assert lines[0]["command"] == "vramfit train --set train.max_steps=3"
    assert lines[-1]["repeat"] == "profiled" and lines[-1]["command"].startswith("VRAMFIT_PROFILE=profile-y-A.txt vramfit")


def test_a_failed_run_makes_a_non_zero_exit(tmp_path, monkeypatch):
    monkeypatch.setattr(speed_ab, "run_one", lambda *a: (1, 1.0, {}))
    (tmp_path / "a").mkdir()
    monkeypatch.setattr(sys, "argv", ["speed_ab.py", "--tree", f"A={tmp_path / 'a'}", "--repeats", "1",
                                      "--case", "x=train", "--results", str(tmp_path / "r")])  # fmt: skip
    assert speed_ab.main() == 1
