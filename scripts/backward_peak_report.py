#!/usr/bin/env python3
"""What is alive on the GPU at a training run's allocator peak, from torch's memory snapshot.

A run trained with VRAMFIT_MEMORY_HISTORY=FILE (train.py) records every allocation of its
training loop with the Python stack that made it. This replays the record, finds the moment
the allocated bytes peak, and lists what is alive then: what was already there when the
loop started (weights, adapters, optimizer state) and every allocation of the loop still
live, grouped by the code that made it, with each group's sizes in units of the micro-batch
(tokens x hidden, tokens x intermediate, ...). It is how the memory model's terms, the fused
loss's residual above all (memory.FUSED_RESIDUAL_*), are checked one by one against what the
allocator really holds. It also replays the reserved bytes (the allocator's segments) to
their peak, by CUDA stream. No GPU needed to read a snapshot.

Recording failed on torch 2.11 (the GPU image's) in the first backward of the 8 GB plan:
liger's SwiGLU autograd Function, called in a checkpointed layer's recomputation, "returned
NULL without setting an exception" (docs/benchmarks/speed/13-dropout0-and-async/), like
pytorch/pytorch#179536 (a regression since 2.10). Not tried since: with the custom kernels
off (kernels.liger_ops, kernels.fused_lora) or another torch.

    VRAMFIT_MEMORY_HISTORY=/tmp/s.pickle vramfit train ... --set train.max_steps=3
    python scripts/backward_peak_report.py /tmp/s.pickle --run RUN_DIR [--json OUT.json]
"""

from __future__ import annotations

import argparse
import collections
import json
import pickle
import sys
from pathlib import Path

import yaml

GIB = 2**30
# The innermost frame from one of these names an allocation; torch's own plumbing does not.
OWNERS = (
    "liger_kernel/", "peft/", "bitsandbytes/", "transformers/models/", "transformers/integrations/",
    "transformers/modeling_", "transformers/loss/", "vramfit/", "torch/utils/checkpoint.py", "torch/optim/",
    "transformers/trainer.py", "accelerate/", "deepspeed/",
)


def owner(frames: list[dict]) -> str:
    for f in frames:
        name = f.get("filename", "")
        for o in OWNERS:
            if o in name:
                return f"{name[name.index(o):]}:{f.get('line')} {f.get('name')}"
    return "(no python frame: autograd's C++ backward)" if not frames else (
        f"{frames[0].get('filename', '?').split('site-packages/')[-1]}:{frames[0].get('line')} {frames[0].get('name')}"
    )


def in_backward(frames: list[dict]) -> bool:
    """Made during backward: under autograd's engine (a recomputed checkpoint, a custom
    Function's backward) or from C++ with no Python frame at all. Autograd runs a CUDA
    backward on its own thread, whose Python stack starts at the hook or Function it calls."""
    if not frames:
        return True
    names = [f.get("name", "") for f in frames]
    return any("_engine_run_backward" in n or n in ("backward", "unpack_hook", "recompute_fn") for n in names) or not any(
        n in ("training_step", "_inner_training_loop", "train") for n in names
    )


def units(size: int, tokens: int, hidden: int, inter: int, vocab: int) -> str:
    """A block's size as the micro-batch's natural units, where one divides it evenly."""
    for label, unit in (("t*i", tokens * inter), ("t*h", tokens * hidden), ("t*v", tokens * vocab), ("t", tokens)):
        for b in (2, 4, 1):
            if unit and size == unit * b:
                return f"{label}*{b}B"
    return f"{size / 2**20:.1f}MiB"


def replay(snapshot: dict) -> dict:
    trace = snapshot["device_traces"][0]
    end_alloc = sum(b["size"] for s in snapshot["segments"] for b in s["blocks"] if b["state"] == "active_allocated")
    net = 0
    for e in trace:
        if e["action"] == "alloc":
            net += e["size"]
        elif e["action"] == "free_completed":
            net -= e["size"]
    base = end_alloc - net  # allocated when the record started
    running, peak, peak_at = base, base, -1
    for i, e in enumerate(trace):
        if e["action"] == "alloc":
            running += e["size"]
        elif e["action"] == "free_completed":
            running -= e["size"]
        if running > peak:
            peak, peak_at = running, i
    live: dict[int, dict] = {}
    freed_before = 0  # blocks from before the record freed before the peak
    for e in trace[: peak_at + 1]:
        if e["action"] == "alloc":
            live[e["addr"]] = e
        elif e["action"] == "free_completed":
            if live.pop(e["addr"], None) is None:
                freed_before += e["size"]
    return {"base": base, "peak": peak, "peak_event": trace[peak_at] if peak_at >= 0 else None,
            "live": list(live.values()), "older_live": base - freed_before, "events": len(trace)}


SEGMENT_GROW = ("segment_alloc", "segment_map")
SEGMENT_SHRINK = ("segment_free", "segment_unmap")


def reserved_replay(snapshot: dict) -> dict:
    """The reserved bytes' peak (what the caching allocator holds from the driver) and, at
    that moment, how they split over CUDA streams (each stream's blocks are a pool of their
    own: memory freed by one is not handed to another) and how much of the allocated was
    freed by its owner but still waiting on another stream's work (record_stream)."""
    trace = snapshot["device_traces"][0]
    end = sum(s["total_size"] for s in snapshot["segments"])
    end_by_stream: dict[int, int] = collections.Counter()
    for s in snapshot["segments"]:
        end_by_stream[s.get("stream", 0)] += s["total_size"]
    net = sum(e["size"] for e in trace if e["action"] in SEGMENT_GROW) - sum(e["size"] for e in trace if e["action"] in SEGMENT_SHRINK)
    running = peak = end - net
    peak_at = -1
    for i, e in enumerate(trace):
        if e["action"] in SEGMENT_GROW:
            running += e["size"]
        elif e["action"] in SEGMENT_SHRINK:
            running -= e["size"]
        if running > peak:
            peak, peak_at = running, i
    by_stream: dict[int, int] = collections.Counter()
    live: dict[int, dict] = {}
    pending: dict[int, int] = {}
    for e in trace[: peak_at + 1]:
        a = e["action"]
        if a in SEGMENT_GROW:
            by_stream[e.get("stream", 0)] += e["size"]
        elif a in SEGMENT_SHRINK:
            by_stream[e.get("stream", 0)] -= e["size"]
        elif a == "alloc":
            live[e["addr"]] = e
        elif a == "free_requested":
            pending[e["addr"]] = e["size"]
        elif a == "free_completed":
            live.pop(e["addr"], None)
            pending.pop(e["addr"], None)
    alloc_by_stream: dict[int, int] = collections.Counter()
    for e in live.values():
        alloc_by_stream[e.get("stream", 0)] += e["size"]
    return {"reserved_start": end - net, "reserved_peak": peak, "reserved_end": end,
            "grown_in_record_by_stream": dict(by_stream), "allocated_by_stream_at_reserved_peak": dict(alloc_by_stream),
            "awaiting_other_streams_at_reserved_peak": sum(pending.values()), "reserved_end_by_stream": dict(end_by_stream),
            "event_at_reserved_peak": trace[peak_at] if peak_at >= 0 else None}


def print_reserved(rv: dict) -> None:
    print(f"reserved: {rv['reserved_start'] / GIB:.3f} GiB at the record's start, peak {rv['reserved_peak'] / GIB:.3f}, "
          f"end {rv['reserved_end'] / GIB:.3f}")
    for name, d in (("grown in the record up to its peak", rv["grown_in_record_by_stream"]),
                    ("allocated at the reserved peak", rv["allocated_by_stream_at_reserved_peak"]),
                    ("reserved at the end", rv["reserved_end_by_stream"])):
        print(f"  {name}, by stream: " + ", ".join(f"{s}: {b / GIB:.3f} GiB" for s, b in sorted(d.items())))
    print(f"  freed but waiting on another stream at the reserved peak: {rv['awaiting_other_streams_at_reserved_peak'] / GIB:.3f} GiB")
    ev = rv["event_at_reserved_peak"]
    if ev:
        print(f"  the segment that made it: {ev['size'] / 2**20:.1f} MiB on stream {ev.get('stream', 0)} by {owner(ev.get('frames') or [])}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("snapshot", type=Path)
    ap.add_argument("--run", type=Path, help="the run directory (plan.yaml: the shape and micro-batch, for units)")
    ap.add_argument("--json", type=Path, help="also write the groups here")
    ap.add_argument("--top", type=int, default=30)
    a = ap.parse_args()
    snapshot = pickle.loads(a.snapshot.read_bytes())
    r = replay(snapshot)
    rv = reserved_replay(snapshot)
    tokens = hidden = inter = vocab = 0
    if a.run:
        plan = yaml.safe_load((a.run / "plan.yaml").read_text())
        sh, c = plan["shape"], plan["config"]
        tokens = c["train"]["micro_batch"] * c["data"]["seq_len"]
        hidden, inter, vocab = sh["hidden"], sh.get("intermediate", 0), sh.get("vocab", 0)
        print(f"{a.run.name}: micro-batch {c['train']['micro_batch']} x seq {c['data']['seq_len']} = {tokens} tokens, "
              f"hidden {hidden}, intermediate {inter}, vocab {vocab}")
    groups: dict[tuple[str, bool], list[int]] = collections.defaultdict(list)
    for e in r["live"]:
        frames = e.get("frames") or []
        groups[(owner(frames), in_backward(frames))].append(e["size"])
    rows = sorted(groups.items(), key=lambda kv: -sum(kv[1]))
    loop = sum(e["size"] for e in r["live"])
    print(f"{r['events']} events; allocated at the record's start {r['base'] / GIB:.3f} GiB; peak {r['peak'] / GIB:.3f} GiB")
    print(f"  at the peak: {r['older_live'] / GIB:.3f} GiB from before the loop, {loop / GIB:.3f} GiB made in it")
    ev = r["peak_event"]
    if ev:
        print(f"  the allocation that made the peak: {ev['size'] / 2**20:.1f} MiB by {owner(ev.get('frames') or [])}")
        print("  its stack, innermost first: " + " < ".join(
            f"{f.get('filename', '?').rsplit('/', 1)[-1]}:{f.get('line')} {f.get('name')}" for f in (ev.get("frames") or [])[:25]))
    print_reserved(rv)
    out = []
    for (who, bwd), sizes in rows[: a.top]:
        common = collections.Counter(units(s, tokens, hidden, inter, vocab) for s in sizes).most_common(4)
        print(f"{sum(sizes) / GIB:8.3f} GiB {len(sizes):5d} blocks {'bwd' if bwd else 'fwd'}  {who}")
        print(f"{'':26}{', '.join(f'{n} x {u}' for u, n in common)}")
        out.append({"owner": who, "backward": bwd, "bytes": sum(sizes), "blocks": len(sizes), "sizes": dict(common)})
    if a.json:
        a.json.write_text(json.dumps({k: v for k, v in r.items() if k not in ("live", "peak_event")}
                                  | {"groups": out, "reserved": {k: v for k, v in rv.items() if k != "event_at_reserved_peak"}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
