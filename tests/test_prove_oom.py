"""scripts/prove_oom.py on CPU: the ballast arithmetic and --dry-run. Nothing here trains
or touches a GPU (the proof itself runs on one: see the script's docstring)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "prove_oom.py"
pytestmark = pytest.mark.skipif(not SCRIPT.is_file(), reason="no scripts/ in this install")

if SCRIPT.is_file():
    sys.path.insert(0, str(REPO / "scripts"))
    import prove_oom as po

GIB = 1 << 30


def test_free_target_keeps_the_fixed_parts_and_a_share_of_the_rest():
    b = {"weights": 1.0, "adapters": 0.25, "gradients": 0.0, "optimizer": 0.5, "activations": 4.0,
         "logits": 5.0, "allocator_slack": 1.0, "cuda_context": 0.25}  # fmt: skip
    assert po.free_target_gib(b, fraction=0.5) == pytest.approx(2.0 + 0.5 * 10.0)
    assert po.free_target_gib(b) == pytest.approx(2.0 + po.BALLAST_FRACTION * 10.0)
    assert po.free_target_gib({"weights": 3.0}) == pytest.approx(3.0)  # nothing grows with the batch


def test_ballast_takes_the_free_memory_above_the_target():
    assert po.ballast_bytes(40 * GIB, 8.5) == int(31.5 * GIB)
    assert po.ballast_bytes(40 * GIB + 123, 0.0) == 40 * GIB + 123
    with pytest.raises(ValueError, match="too small"):
        po.ballast_bytes(8 * GIB, 8.5)
    with pytest.raises(ValueError):
        po.ballast_bytes(8 * GIB, 8.0)  # nothing left to take is a failed setup, not a zero-byte ballast


def test_the_free_memory_left_fits_micro_batch_8_and_not_16():
    b16, b8 = po.predicted_breakdown(16), po.predicted_breakdown(8)
    target = po.free_target_gib(b16)
    assert sum(b8.values()) + 1.0 < target < sum(b16.values()) - 10.0  # margins both ways, GiB
    assert b16["cuda_context"] > 0  # a GPU plan, not the CPU one `vramfit plan` gives here


def test_the_command_pins_micro_batch_16_and_plans_against_the_whole_card():
    args = po.train_args(Path("M"), Path("D"), Path("R"), 12)
    assert "--budget" not in args
    sets = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    assert {"train.micro_batch=16", "train.grad_accum=1", "train.grad_ckpt=false", "train.max_steps=12",
            "train.save_steps=2", "method=lora", "data.seq_len=1024"} <= set(sets)  # fmt: skip


def test_dry_run_prints_the_commands_and_the_arithmetic(capsys):
    assert po.main(["--dry-run", "--work", "/w"]) == 0
    out = capsys.readouterr().out
    assert "vramfit train --preset 24gb --model /w/qwen2.5-0.5b --data /w/long.jsonl --out /w/oom-run" in out
    assert "--ballast 34.2" in out and "micro-batch 8 needs" in out


def test_needs_results_unless_dry_run():
    with pytest.raises(SystemExit):
        po.main([])


def record(**over):
    detail = "CUDA out of memory. Tried to allocate 9.27 GiB. GPU 0 has a total capacity of 79.19 GiB of which 1.02 GiB is free."
    out = {
        "first_exit": 75, "exit": 0, "seconds": 61.0, "final_micro_batch": 8, "final_grad_accum": 2,
        "planned": {"predicted_peak_gib": 60.66},
        "ballast": {"ballast_gib": 44.5, "free_after_gib": 34.16},
        "oom_events": [{"step": 4, "micro_batch": [16, 8], "message": "CUDA out of memory", "detail": detail}],
        "final": {"metrics": {"steps": 12}},
    }  # fmt: skip
    out.update(over)
    return out


def test_verdict_passes_a_real_oom_recovered_to_the_last_step():
    ok, line = po.judge(record(), 12)
    assert ok and line.startswith("PASS: real CUDA OOM at step 4, micro-batch 16, with 34.16 GiB free")
    assert "finished 12/12 steps at micro-batch 8 x 2" in line


@pytest.mark.parametrize(
    "over, why",
    [
        ({"oom_events": []}, "no real CUDA OOM event"),
        ({"oom_events": [{"step": 4, "micro_batch": [16, 8], "message": "CUDA out of memory (injected)",
                          "detail": "CUDA out of memory (injected). Tried to allocate 1.00 GiB"}]}, "no real CUDA OOM event"),  # fmt: skip
        ({"exit": 4}, "rerun exit 4"),
        ({"final": {"metrics": {"steps": 8}}}, "finished 8 of 12 steps"),
        ({"final": {}}, "finished None of 12 steps"),
        ({"first_exit": 0}, "first run exit 0, not 75"),
        ({"ballast": {"error": "the GPU is too small"}}, "ballast: the GPU is too small"),
        ({"ballast": None}, "ballast: not started"),
    ],
)
def test_verdict_fails_and_says_why(over, why):
    ok, line = po.judge(record(**over), 12)
    assert not ok and line.startswith("FAIL: ") and why in line


def test_verdict_fails_an_oom_at_the_wrong_batch_or_before_a_checkpoint():
    ev = record()["oom_events"][0]
    assert "not [16, 8]" in po.judge(record(oom_events=[{**ev, "micro_batch": [8, 4]}]), 12)[1]
    assert "before a checkpoint" in po.judge(record(oom_events=[{**ev, "step": 0}]), 12)[1]
