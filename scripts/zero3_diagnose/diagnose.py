"""Per-rank GPU memory breakdown inside a `vramfit train` process (DeepSpeed ZeRO-3 + QLoRA).

No torch memory-history recorder (it crashed under DeepSpeed). At named points it writes one
JSON line per rank to ``$VRAMFIT_DIAGNOSE.rank{R}.jsonl``:

  after_ds_init     on_train_begin: deepspeed.initialize, partitioning and optimizer init done
  fwd_end           DeepSpeedEngine.forward returned (loss computed inside the model: the
                    logits/CE tensors and the whole forward graph are alive)
  bwd_end           DeepSpeedEngine.backward returned (before engine.step)
  step_end          DeepSpeedEngine.step returned (the real optimizer step runs here: the
                    Trainer's optimizer.step() is a no-op wrapper under accelerate+DeepSpeed)

Each record: allocated/reserved now, max_allocated/max_reserved so far (never reset: vramfit's
own metrics read the same counters, and deepspeed's see_memory_usage would reset them), NVML
process bytes, and a breakdown of what is allocated, by category:

  zero3_shards        every ZeRO-3 parameter's ds_tensor (this rank's partition)
  zero3_gathered      parameters DeepSpeed currently has AVAILABLE (gathered, non-persistent)
  zero3_persistent    persistent (not partitioned) parameters
  quant_state         bitsandbytes absmax / nested absmax / code tables (not Parameters:
                      ZeRO-3 does not partition them)
  retained_4bit       packed 4-bit weights held by bitsandbytes' MatMul4Bit graph nodes
                      (ctx.tensors, outside save_for_backward), found by walking the loss's
                      autograd graph; storages that DeepSpeed already "released" are counted
                      here and not in zero3_gathered
  ds_optimizer        DeepSpeed stage-3 fp16/fp32 partition groups, Adam state, gradient
                      partition buffer, IPG buckets
  per_stream          reserved / allocated bytes per CUDA stream from torch.cuda.memory_snapshot()
                      (segment list only, no history): DeepSpeed gathers on its own stream when
                      overlap_comm is on, and a stream's free blocks are not usable by another
  unattributed        allocated minus the categories above (activations, logits, temporaries)

Detailed records for the first VRAMFIT_DIAGNOSE_MICROBATCHES micro-batches (default 8: step 1 of
grad_accum 4 records DeepSpeed's parameter trace, step 2 runs on the completed trace), then only
the cheap counters. Works on CPU too (CUDA figures 0), for smoke tests.

How it is loaded: scripts/zero3_diagnose/sitecustomize.py installs it into the first
transformers Trainer of each process when that folder is first on PYTHONPATH and
VRAMFIT_DIAGNOSE names the output prefix (both inherited by the ranks the launcher starts):

    PYTHONPATH=$PWD/scripts/zero3_diagnose:$PYTHONPATH VRAMFIT_DIAGNOSE=$OUT/diag \
        vramfit train --preset multi-gpu --gpus 2 ... --set method=qlora --set deepspeed.stage=3

(docs/benchmarks/distributed/session9-qlora3-diagnosis/ has the run.)
"""

from __future__ import annotations

import functools
import json
import os
import time
from typing import Any

import torch

GIB = 1 << 30


def _cuda() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def _nvml() -> int | None:
    try:
        from vramfit.gpu_memory import _nvml_process_bytes

        return _nvml_process_bytes() if _cuda() else None
    except Exception:
        return None


def _bytes(t: torch.Tensor | None) -> tuple[int, int]:
    """(storage key, bytes) of a tensor's whole storage, on an accelerator; (0, 0) otherwise."""
    if t is None or not isinstance(t, torch.Tensor) or t.device.type == "cpu" and _cuda():
        return 0, 0
    try:
        s = t.untyped_storage()
        return s.data_ptr(), s.nbytes()
    except Exception:
        return 0, 0


class _Acc:
    """Sums storages once each, across categories (first category wins)."""

    def __init__(self) -> None:
        self.seen: set[int] = set()
        self.by: dict[str, int] = {}

    def add(self, cat: str, t: torch.Tensor | None) -> None:
        key, n = _bytes(t)
        if not key or key in self.seen:
            return
        self.seen.add(key)
        self.by[cat] = self.by.get(cat, 0) + n


def _walk_graph(root, acc: _Acc, limit: int = 200_000) -> dict[str, int]:
    """Walk an autograd graph from ``root`` (a grad_fn); count packed 4-bit weights that
    bitsandbytes' MatMul4Bit nodes keep in ctx.tensors."""
    stack, seen, nodes, mm4 = [root], set(), 0, 0
    while stack and nodes < limit:
        n = stack.pop()
        if n is None or id(n) in seen:
            continue
        seen.add(id(n))
        nodes += 1
        if type(n).__name__.startswith("MatMul4Bit"):
            mm4 += 1
            for t in getattr(n, "tensors", ()) or ():
                acc.add("retained_4bit", t)
        for nxt, _ in getattr(n, "next_functions", ()) or ():
            stack.append(nxt)
    return {"graph_nodes": nodes, "matmul4bit_nodes": mm4}


def _ds_coordinator(engine) -> dict[str, Any]:
    out: dict[str, Any] = {}
    try:
        coord = engine.optimizer.parameter_offload.get_param_coordinator()
        out["trace_complete"] = bool(coord.is_complete_trace())
        out["n_available_params"] = int(getattr(coord, "_PartitionedParameterCoordinator__n_available_params", -1))
        out["inflight"] = len(getattr(coord, "_PartitionedParameterCoordinator__inflight_param_registry", {}) or {})
        out["max_live_numel"] = int(getattr(coord, "_PartitionedParameterCoordinator__max_n_available_params", -1))
        out["max_reuse_numel"] = int(getattr(coord, "_PartitionedParameterCoordinator__max_reuse_dist_in_numel", -1))
        out["prefetch_numel"] = int(getattr(coord, "_PartitionedParameterCoordinator__prefetch_bucket_sz", -1))
    except Exception as e:  # not ZeRO-3, or renamed internals
        out["coordinator_error"] = type(e).__name__
    return out


def _breakdown(trainer, root=None) -> dict[str, Any]:
    acc = _Acc()
    model = trainer.model
    gathered_visible = 0
    # 1. parameters: gathered (visible to DeepSpeed), persistent, then shards
    for p in model.parameters():
        if hasattr(p, "ds_id"):
            status = getattr(getattr(p, "ds_status", None), "name", "")
            if getattr(p, "ds_persist", False):
                acc.add("zero3_persistent", p.data)
            elif status == "AVAILABLE" and p.data.numel() > 0:
                acc.add("zero3_gathered", p.data)
                gathered_visible += 1
            acc.add("zero3_shards", getattr(p, "ds_tensor", None))
        else:
            acc.add("params_not_zero3", p.data)
    # 2. bitsandbytes quant states (not Parameters)
    for m in model.modules():
        qs = getattr(getattr(m, "weight", None), "quant_state", None)
        if qs is None:
            continue
        for t in (getattr(qs, "absmax", None), getattr(qs, "code", None), getattr(qs, "offset", None)):
            acc.add("quant_state", t)
        s2 = getattr(qs, "state2", None)
        if s2 is not None:
            acc.add("quant_state", getattr(s2, "absmax", None))
            acc.add("quant_state", getattr(s2, "code", None))
    # 3. DeepSpeed optimizer structures
    engine = getattr(trainer, "model_wrapped", None)
    opt = getattr(engine, "optimizer", None)
    if opt is not None:
        for name in ("fp16_partitioned_groups_flat", "fp32_partitioned_groups_flat"):
            for t in getattr(opt, name, []) or []:
                acc.add("ds_optimizer", t)
                acc.add("ds_optimizer", getattr(t, "grad", None))
        acc.add("ds_optimizer", getattr(opt, "grad_partitions_flat_buffer", None))
        for b in (getattr(opt, "ipg_buckets", {}) or {}).values():
            acc.add("ds_optimizer", getattr(b, "buffer", None))
        inner = getattr(opt, "optimizer", None)
        for st in (getattr(inner, "state", {}) or {}).values():
            for t in st.values() if isinstance(st, dict) else ():
                acc.add("ds_optimizer", t if isinstance(t, torch.Tensor) else None)
    extra: dict[str, Any] = {"gathered_params_visible": gathered_visible}
    # 4. the forward graph (only while it is alive: at fwd_end)
    if root is not None:
        extra.update(_walk_graph(root, acc))
    allocated = torch.cuda.memory_allocated() if _cuda() else 0
    gib = {k: round(v / GIB, 3) for k, v in sorted(acc.by.items())}
    gib["unattributed"] = round((allocated - sum(acc.by.values())) / GIB, 3) if _cuda() else None
    ds = _ds_coordinator(engine) if hasattr(getattr(engine, "optimizer", None), "parameter_offload") else {}
    return {"gib": gib, **extra, **ds}


def _per_stream() -> dict[str, Any]:
    if not _cuda():
        return {}
    try:
        segs = torch.cuda.memory.memory_snapshot()
    except Exception as e:
        return {"snapshot_error": type(e).__name__}
    dev = torch.cuda.current_device()
    out: dict[str, dict[str, float]] = {}
    for s in segs:
        if s.get("device", dev) != dev:
            continue
        k = str(s.get("stream", "?"))
        d = out.setdefault(k, {"reserved_gib": 0.0, "allocated_gib": 0.0, "segments": 0})
        d["reserved_gib"] += s.get("total_size", 0) / GIB
        d["allocated_gib"] += s.get("allocated_size", 0) / GIB
        d["segments"] += 1
    return {k: {kk: round(vv, 3) if isinstance(vv, float) else vv for kk, vv in v.items()} for k, v in out.items()}


class Diagnose:
    def __init__(self, trainer, path: str) -> None:
        self.trainer = trainer
        rank = os.environ.get("RANK", "0")
        self.file = open(f"{path}.rank{rank}.jsonl", "a", encoding="utf-8")
        self.detailed = int(os.environ.get("VRAMFIT_DIAGNOSE_MICROBATCHES", "8"))
        self.micro = 0
        self.t0 = time.perf_counter()
        self.engine_wrapped = False

    def record(self, point: str, root=None, detail: bool = True) -> None:
        rec: dict[str, Any] = {"point": point, "micro_batch": self.micro, "t": round(time.perf_counter() - self.t0, 3)}
        if _cuda():
            rec.update({
                "allocated_gib": round(torch.cuda.memory_allocated() / GIB, 3),
                "reserved_gib": round(torch.cuda.memory_reserved() / GIB, 3),
                "max_allocated_gib": round(torch.cuda.max_memory_allocated() / GIB, 3),
                "max_reserved_gib": round(torch.cuda.max_memory_reserved() / GIB, 3),
                "nvml_gib": (lambda b: round(b / GIB, 3) if b else None)(_nvml()),
            })
            st = torch.cuda.memory_stats()
            rec["inactive_split_gib"] = round(st.get("inactive_split_bytes.all.current", 0) / GIB, 3)
            rec["alloc_retries"] = st.get("num_alloc_retries", 0)
        if detail:
            try:
                rec["breakdown"] = _breakdown(self.trainer, root)
                rec["per_stream"] = _per_stream()
            except Exception as e:  # a diagnostic must never stop training
                rec["breakdown_error"] = repr(e)
        self.file.write(json.dumps(rec) + "\n")
        self.file.flush()

    # --- DeepSpeedEngine wrapping (instance attributes: the engine's own calls go through them)
    def wrap_engine(self, engine) -> None:
        if self.engine_wrapped or engine is None or not hasattr(engine, "backward"):
            return
        self.engine_wrapped = True
        fwd, bwd, step = engine.forward, engine.backward, engine.step
        me = self

        @functools.wraps(fwd)
        def forward(*a, **k):
            out = fwd(*a, **k)
            detail = me.micro < me.detailed
            loss = out.get("loss") if isinstance(out, dict) else getattr(out, "loss", None)
            me.record("fwd_end", root=getattr(loss, "grad_fn", None) if detail else None, detail=detail)
            return out

        @functools.wraps(bwd)
        def backward(*a, **k):
            r = bwd(*a, **k)
            me.record("bwd_end", detail=me.micro < me.detailed)
            me.micro += 1
            return r

        @functools.wraps(step)
        def step_(*a, **k):
            r = step(*a, **k)
            me.record("step_end", detail=me.micro <= me.detailed)
            return r

        engine.forward, engine.backward, engine.step = forward, backward, step_


def _wrap_trainer(self) -> None:
    """Without DeepSpeed (CPU smoke tests, single-GPU runs): the same points around the
    Trainer's compute_loss and accelerator.backward (the optimizer step: on_optimizer_step)."""
    if self.engine_wrapped:
        return
    self.engine_wrapped = True
    t, me = self.trainer, self
    cl, bwd = t.compute_loss, t.accelerator.backward

    def compute_loss(*a, **k):
        out = cl(*a, **k)
        loss = out[0] if isinstance(out, tuple) else out
        detail = me.micro < me.detailed
        me.record("fwd_end", root=getattr(loss, "grad_fn", None) if detail else None, detail=detail)
        return out

    def backward(*a, **k):
        r = bwd(*a, **k)
        me.record("bwd_end", detail=me.micro < me.detailed)
        me.micro += 1
        return r

    t.compute_loss, t.accelerator.backward = compute_loss, backward


Diagnose.wrap_trainer = _wrap_trainer


def install(trainer, path: str) -> Diagnose:
    from transformers import TrainerCallback

    diag = Diagnose(trainer, path)

    class _CB(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            diag.record("after_ds_init")
            # deepspeed.initialize has run by now (Trainer._prepare_for_training)
            engine = getattr(trainer, "model_wrapped", None)
            if hasattr(engine, "backward") and hasattr(engine, "step"):
                diag.wrap_engine(engine)  # DeepSpeedEngine
            else:
                diag.wrap_trainer()  # no DeepSpeed: the Trainer's compute_loss / accelerator.backward

        def on_optimizer_step(self, args, state, control, **kw):
            if not hasattr(getattr(trainer, "model_wrapped", None), "step"):
                diag.record("step_end", detail=diag.micro <= diag.detailed)

        def on_train_end(self, args, state, control, **kw):
            diag.record("train_end", detail=False)

    trainer.add_callback(_CB())
    return diag
