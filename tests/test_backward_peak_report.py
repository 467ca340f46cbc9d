"""scripts/backward_peak_report.py: replaying a memory snapshot to what is alive at the peak."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from backward_peak_report import in_backward, owner, replay, reserved_replay, units  # noqa: E402

LORA = [{"filename": "/x/site-packages/peft/tuners/lora/layer.py", "line": 7, "name": "forward"}]
LIGER = [{"filename": "/x/site-packages/liger_kernel/ops/fused_linear_cross_entropy.py", "line": 3, "name": "fwd"}]


def snapshot(trace, still_allocated):
    blocks = [{"size": s, "state": "active_allocated"} for s in still_allocated]
    return {"segments": [{"blocks": blocks + [{"size": 99, "state": "inactive"}]}], "device_traces": [trace]}


def test_the_peak_and_what_is_alive_there():
    # 100 bytes from before the record (weights), 40 of which are freed in it; the loop
    # allocates a (30), b (50), frees a, allocates c (10): peak 100 + 30 + 50 = 180 before a's
    # free... then 40 of the old bytes go: the peak is the moment after b.
    trace = [
        {"action": "alloc", "addr": 1, "size": 30, "frames": LORA},
        {"action": "alloc", "addr": 2, "size": 50, "frames": LIGER},
        {"action": "free_requested", "addr": 1, "size": 30},
        {"action": "free_completed", "addr": 1, "size": 30},
        {"action": "free_completed", "addr": 9, "size": 40},
        {"action": "alloc", "addr": 3, "size": 10, "frames": []},
    ]
    r = replay(snapshot(trace, [60, 50, 10]))  # at the dump: 60 old + b + c
    assert r["base"] == 100 and r["peak"] == 180
    assert [e["addr"] for e in r["live"]] == [1, 2] and r["older_live"] == 100
    assert r["peak_event"]["addr"] == 2


def test_owner_units_and_phase():
    assert owner(LORA).startswith("peft/tuners/lora/layer.py:7")
    assert owner([]).startswith("(no python frame")
    step = [{"filename": "transformers/trainer.py", "line": 1, "name": "training_step"}]
    assert in_backward([]) and not in_backward(LORA + step)
    assert in_backward(LORA + [{"filename": "torch/autograd/graph.py", "line": 1, "name": "_engine_run_backward"}] + step)
    assert in_backward(LORA)  # autograd's own thread: a recomputed forward, no trainer frames
    assert units(2 * 10 * 7, 10, 7, 30, 100) == "t*h*2B" and units(4 * 10 * 30, 10, 7, 30, 100) == "t*i*4B"


def test_reserved_peak_by_stream_and_frees_waiting_on_another_stream():
    # 1000 bytes reserved on stream 0 before the record. A copy stream (7) grows a segment of
    # 200, a block freed on it waits for the other stream (free_requested, not completed),
    # then stream 0 grows 300 more: the peak is 1500, with 500 grown in the record (200 on
    # stream 7) and 64 bytes freed but not yet reusable. Later 300 is released.
    trace = [
        {"action": "segment_alloc", "addr": 10, "size": 200, "stream": 7},
        {"action": "alloc", "addr": 11, "size": 64, "stream": 7},
        {"action": "free_requested", "addr": 11, "size": 64, "stream": 7},
        {"action": "segment_map", "addr": 20, "size": 300, "stream": 0},
        {"action": "free_completed", "addr": 11, "size": 64, "stream": 7},
        {"action": "segment_unmap", "addr": 20, "size": 300, "stream": 0},
    ]
    snap = {"segments": [{"total_size": 1000, "stream": 0, "blocks": []}, {"total_size": 200, "stream": 7, "blocks": []}],
            "device_traces": [trace]}
    rv = reserved_replay(snap)
    assert rv["reserved_start"] == 1000 and rv["reserved_peak"] == 1500 and rv["reserved_end"] == 1200
    assert rv["grown_in_record_by_stream"] == {7: 200, 0: 300}
    assert rv["awaiting_other_streams_at_reserved_peak"] == 64
    assert rv["allocated_by_stream_at_reserved_peak"] == {7: 64}
    assert rv["event_at_reserved_peak"]["addr"] == 20
