"""Auto-fit: the fastest configuration whose predicted peak fits the budget. Pure.

Searches method, sequence length, micro-batch (keeping the effective batch),
gradient checkpointing (every layer, none, or as few of the first layers as fit), optimizer, the fused loss, the input embeddings in host RAM and
DeepSpeed's tiled MLP (each only where it buys a faster plan or a longer sequence), activations in host RAM (only where that reaches a
longer sequence) and, with several GPUs, the DeepSpeed ZeRO stage
(on one GPU, ZeRO-3 with CPU offload as the last resort when nothing else fits),
never touching what the user pinned, and explains each choice in a line. Predictions come from the calibrated memory model
(memory.py) and speed model (speed.py).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from .config import RunConfig
from .distributed import HOST_RAM_USABLE, OFFLOAD_OPTIMIZERS, offloaded_host_bytes
from .errors import FitError
from .kernels import LIGER_MODEL_TYPES
from .memory import GIB, estimate, offload_async_applies, offloaded_activation_host_bytes
from .model_shape import ModelShape
from .speed import LengthStats, estimate_speed, fused_lora_applies, lean_recompute_params

# Plans stay this far under the budget: the calibrated model's worst under-
# prediction was 4.9% (docs/memory-model.md), so a plan predicted at 95% of the
# budget is measured under it.
SAFETY_MARGIN = 0.05
MICRO_BATCHES = (1, 2, 4, 8, 16, 32, 64)
# Saved activations go to host RAM for speed (not length) only where the plan they buy is
# predicted this much faster than the best one without: less is within the speed model's error.
OFFLOAD_MIN_GAIN = 0.05
MIN_SEQ = 128
# Checkpointing only some layers (train.grad_ckpt_layers) is kept only where the plan is
# predicted this much faster than the same plan with every layer checkpointed: a layer or
# two fewer recomputed is within the speed model's error, and not worth the change.
PARTIAL_CKPT_MIN_GAIN = 0.03
# Among equally fast plans on several GPUs: ZeRO-2 first (the multi-GPU path measured on
# GPUs, docs/benchmarks/distributed.md), then plain data parallel, then ZeRO-3 (it
# gathers every weight each pass: slower, chosen for memory only).
STAGE_PREFERENCE = {2: 0, 0: 1, 3: 2}


@dataclass(frozen=True)
class Candidate:
    config: RunConfig
    peak_gib: float
    tokens_per_s: float


def _with(cfg: RunConfig, **dotted) -> RunConfig:
    """cfg with dotted keys replaced (``train__micro_batch=2``)."""
    data = cfg.model_dump()
    for key, value in dotted.items():
        section, _, name = key.partition("__")
        if name:
            data[section][name] = value
        else:
            data[section] = value
    return RunConfig.model_validate(data)


def _seq_candidates(lengths: LengthStats | None, pinned: int | None, current: int) -> list[int]:
    if pinned is not None:
        return [pinned]
    # The shortest multiple of 128 that holds the longest example, then halvings.
    top = -(-(lengths.longest if lengths else current) // 128) * 128
    out = [top]
    while out[-1] // 2 >= MIN_SEQ:
        out.append(-(-(out[-1] // 2) // 128) * 128)
    return sorted(set(out), reverse=True)


def _fewest_checkpointed(
    shape: ModelShape, cfg: RunConfig, dtype: str, longest: int | None, shortest: int | None, limit: float
) -> tuple[RunConfig, float] | None:
    """``cfg`` (which fits ``limit`` with every layer checkpointed) with as few layers
    checkpointed as still fit, and its peak; None where even one layer fewer does not fit.
    Bisection, since what fits is every count from some N up: the peak at the loss falls
    with each layer checkpointed (it keeps its input, not its activations), and the
    backward's, which holds the checkpointed layers' inputs while it recomputes, grows with
    them but is at its largest with every layer checkpointed, and that fits."""
    lo, hi = 1, shape.layers  # hi fits (the caller's plan); find the smallest that does
    found = None
    while lo < hi:
        mid = (lo + hi) // 2
        trial = _with(cfg, train__grad_ckpt_layers=mid)
        peak = estimate(shape, trial, dtype, "cuda", longest, shortest).peak_gib
        if peak <= limit:
            hi, found = mid, (trial, peak)
        else:
            lo = mid + 1
    return found


def auto_fit(
    base: RunConfig,
    pinned: set[str],
    shape: ModelShape,
    budget_gib: float,
    gpu_name: str | None,
    lengths: LengthStats | None,
    dtype: str = "bfloat16",
    host_ram_bytes: int | None = None,
    fused_available: bool = False,
) -> tuple[RunConfig, list[str]]:
    """The fastest plan under ``budget_gib`` (less the safety margin) and why, one line per choice.

    ``pinned`` holds the dotted keys the user set (they are never changed). The effective
    batch (micro_batch x grad_accum x GPUs) of ``base`` is kept."""
    # data.packing is never turned on here, only kept as given: it changes what one
    # sequence of the effective batch is (a row of several examples, not one), so
    # switching it would change the training recipe, not just how it fits.
    world = base.world_size
    effective = base.train.micro_batch * base.train.grad_accum * world
    limit = budget_gib * (1 - SAFETY_MARGIN)

    methods = [base.method] if "method" in pinned else ["lora", "qlora"]
    seqs = _seq_candidates(lengths, base.data.seq_len if "data.seq_len" in pinned else None, base.data.seq_len)
    if "train.micro_batch" in pinned:
        mbs = [base.train.micro_batch]
    elif "train.grad_accum" in pinned:
        per_gpu = effective // (base.train.grad_accum * world)
        mbs = [max(per_gpu, 1)]
    elif base.data.packing and base.model.attn_implementation == "flash_attention_2":
        mbs = [1]  # flash attention keeps packed examples apart only one row at a time (plan.py)
    else:
        mbs = [m for m in MICRO_BATCHES if effective % (m * world) == 0] or [1]
    layers_pinned = "train.grad_ckpt_layers" in pinned
    if layers_pinned and base.train.grad_ckpt_layers is not None:
        ckpts = [True]  # config.py: grad_ckpt_layers needs grad_ckpt
    else:
        ckpts = [base.train.grad_ckpt] if "train.grad_ckpt" in pinned else [False, True]
    # Checkpointing only the first layers is searched where checkpointing is, unless the
    # user pinned checkpointing on (every layer, as asked) or pinned the count.
    partial_ok = not layers_pinned and "train.grad_ckpt" not in pinned
    kept_layers = base.train.grad_ckpt_layers if layers_pinned else None

    def optimizers(method: str) -> list[str]:
        if "train.optimizer" in pinned:
            return [base.train.optimizer]
        # Adapters: torch AdamW, or 8-bit states where they buy a faster plan (a rank-128
        # all-linear adapter on a 7B has 323M parameters: 2.4 GiB of fp32 moments, 0.6 in
        # 8 bits). At equal speed torch AdamW wins (the ranking below). Full fine-tuning:
        # 8-bit states too, and paged ones when even those don't fit.
        return ["adamw_torch", "adamw_8bit"] if method != "full" else ["adamw_torch", "adamw_8bit", "paged_adamw_8bit"]

    # The fused loss (liger-kernel) where it is installed and knows the architecture:
    # tried both ways. The speed model counts it as neither faster nor slower (the 3B
    # and 7B runs in docs/benchmarks/calibration/ measured within the model's error), so
    # it is chosen when its smaller peak buys a longer sequence, a bigger micro-batch or
    # no checkpointing, and otherwise left off (the path with the most measurements).
    if "kernels.fused_loss" in pinned or not (fused_available and shape.model_type in LIGER_MODEL_TYPES):
        fused_options = [base.kernels.fused_loss]
    else:
        fused_options = [False, True]
    # The input embedding table in host RAM (train.offload_embeddings): on one GPU without
    # DeepSpeed, for an adapter method and an output head of its own (config.py, plan.py).
    # Tried both ways; it frees the table's GPU memory for a small per-step cost, so like the
    # fused loss it is kept only where it buys a faster plan or a longer sequence.
    if "train.offload_embeddings" in pinned or world > 1 or shape.tied:
        embed_options = [base.train.offload_embeddings]
    else:
        embed_options = [False, True]
    # DeepSpeed's tiled MLP: one more MLP forward per step for a much smaller peak at long
    # sequences; tried only where it splits the MLP at all (seq_len > hidden), and chosen
    # only where it buys a longer sequence or a faster plan (it is slower like for like).
    def tiled_options(seq: int) -> list[bool]:
        if "kernels.tiled_mlp" in pinned or seq <= shape.hidden:
            return [base.kernels.tiled_mlp]
        return [False, True]

    # liger's fused RMSNorm/SwiGLU/RoPE: less memory and less per-layer overhead in both
    # models, never more, so not searched: on wherever liger-kernel is installed and knows
    # the architecture, unless pinned.
    liger_ops = base.kernels.liger_ops
    if "kernels.liger_ops" not in pinned and fused_available and shape.model_type in LIGER_MODEL_TYPES:
        liger_ops = True
    ds_pinned = any(k.startswith("deepspeed.") for k in pinned)
    acts_pinned = "train.offload_activations" in pinned
    async_pinned = "train.offload_async" in pinned
    longest = lengths.longest if lengths else None
    shortest = lengths.shortest if lengths else None

    def search(
        zero: list[dict], method_list: list[str], offload_acts: bool = base.train.offload_activations if acts_pinned else False
    ) -> tuple[list[Candidate], Candidate | None]:
        found: list[Candidate] = []
        least: Candidate | None = None
        for method, seq, mb, ckpt, ds in itertools.product(method_list, seqs, mbs, ckpts, zero):
            if method == "qlora" and ds.get("deepspeed__offload_params"):
                continue  # 4-bit weights cannot be offloaded (config.py refuses it)
            # The offload fallback sets the fused loss itself.
            fused_here = [ds["kernels__fused_loss"]] if "kernels__fused_loss" in ds else fused_options
            # train.offload_async: with the checkpointed inputs in host RAM, their copies on a
            # stream of their own (faster, ASYNC_HIDDEN_S_PER_GB) for the allocator's reserve
            # (memory.OFFLOAD_ASYNC_RESERVE_INPUTS): tried both ways, like the fused loss.
            asyncs = [base.train.offload_async] if async_pinned else ([False, True] if offload_acts and ckpt else [False])
            for opt, fused, emb, tiled, copies in itertools.product(
                optimizers(method), fused_here, embed_options, tiled_options(seq), asyncs
            ):
                if ds.get("deepspeed__offload_optimizer") and opt not in OFFLOAD_OPTIMIZERS:
                    continue  # offload replaces the optimizer with CPU Adam (distributed.py)
                if emb and (method == "full" or ds.get("deepspeed__stage")):
                    continue  # config.py refuses it there
                if offload_acts and kept_layers is not None:
                    continue  # config.py refuses the two together
                ga = base.train.grad_accum if "train.grad_accum" in pinned else max(effective // (mb * world), 1)
                cfg = _with(
                    base,
                    method=method,
                    data__seq_len=seq,
                    train__micro_batch=mb,
                    train__grad_accum=ga,
                    train__grad_ckpt=ckpt,
                    train__grad_ckpt_layers=kept_layers if ckpt else None,
                    train__optimizer=opt,
                    train__offload_activations=offload_acts,
                    train__offload_embeddings=emb,
                    train__offload_async=copies,
                    kernels__tiled_mlp=tiled,
                    kernels__liger_ops=liger_ops,
                    **{"kernels__fused_loss": fused, **ds},
                )
                if host_ram_bytes and offloaded_host_bytes(shape, cfg, dtype, longest) > host_ram_bytes * HOST_RAM_USABLE:
                    continue  # distributed.check would refuse it
                peak = estimate(shape, cfg, dtype, "cuda", longest, shortest).peak_gib
                speed = estimate_speed(shape, cfg, lengths, gpu_name).tokens_per_s
                cand = Candidate(cfg, peak, speed)
                if least is None or peak < least.peak_gib:
                    least = cand
                if peak <= limit:
                    found.append(cand)
                    if ckpt and partial_ok and not offload_acts:
                        fewer = _fewest_checkpointed(shape, cfg, dtype, longest, shortest, limit)
                        if fewer is not None:
                            quicker = estimate_speed(shape, fewer[0], lengths, gpu_name).tokens_per_s
                            if quicker >= speed * (1 + PARTIAL_CKPT_MIN_GAIN):
                                found.append(Candidate(fewer[0], fewer[1], quicker))
        return found, least

    def reach(found: list[Candidate]) -> int:
        return max((c.config.data.seq_len for c in found), default=0)

    def search_both(zero: list[dict], method_list: list[str]) -> tuple[list[Candidate], Candidate | None, int]:
        """search() with the saved activations on the GPU and in host RAM. Host RAM costs
        PCIe copies (the speed model counts them), so it wins only where it buys a longer
        sequence or a bigger micro-batch that more than pays for them. Also returns the
        longest sequence that fits without it."""
        found, least = search(zero, method_list)
        plain = reach(found)
        if acts_pinned:
            return found, least, plain
        more, least_off = search(zero, method_list, offload_acts=True)
        if least_off is not None and (least is None or least_off.peak_gib < least.peak_gib):
            least = least_off
        return found + more, least, plain

    if ds_pinned:
        stages = [{}]
    elif world > 1:
        stages = [{"deepspeed__stage": s} for s in (0, 2, 3)]
    else:
        stages = [{"deepspeed__stage": 0}]
    feasible, smallest, without_acts = search_both(stages, methods)
    if not feasible and world == 1 and not ds_pinned:
        # Last resort on one GPU: ZeRO-3 streaming the weights from host RAM and keeping
        # the optimizer there, with the fused loss (no full-vocabulary logits): the 8 GB
        # seed route, measured at 5.39 GiB for a 3B (docs/benchmarks/distributed.md). Slow.
        offload = {"deepspeed__stage": 3, "deepspeed__offload_params": True, "deepspeed__offload_optimizer": True}
        if "kernels.fused_loss" not in pinned and shape.model_type in LIGER_MODEL_TYPES:
            offload["kernels__fused_loss"] = True
        feasible, least, without_acts = search_both([offload], [m for m in methods if m != "qlora"] or methods)
        if least is not None and (smallest is None or least.peak_gib < smallest.peak_gib):
            smallest = least

    if not feasible:
        assert smallest is not None
        c = smallest.config
        need = smallest.peak_gib / (1 - SAFETY_MARGIN)
        raise FitError(
            f"nothing fits {budget_gib:g} GiB for this model: the smallest plan needs {need:.1f} GiB "
            f"({c.method}, seq {c.data.seq_len}, micro-batch {c.train.micro_batch}, "
            f"checkpointing {'on' if c.train.grad_ckpt else 'off'}{_zero_words(c)}"
            f"{', activations in host RAM' if c.train.offload_activations else ''})",
            f"use --budget {need:.1f} or more, a smaller model"
            + (", or unpin what you set with --set/--config" if pinned - {"budget_gib", "model.name", "data.path"} else ""),
        )

    # The longest sequence anything fits (truncating as little as possible), then the fastest there.
    best_seq = max(c.config.data.seq_len for c in feasible)
    at_seq = [c for c in feasible if c.config.data.seq_len == best_seq]
    best = max(
        at_seq,
        key=lambda c: (
            c.tokens_per_s,
            -STAGE_PREFERENCE[c.config.deepspeed.stage],
            c.config.train.optimizer == "adamw_torch",
            not c.config.kernels.fused_loss,
            not c.config.train.offload_embeddings,
            not c.config.kernels.tiled_mlp,
            not c.config.train.offload_activations,
            not c.config.train.offload_async,
        ),
    )
    # The fastest plan at this length with the activations on the GPU, if any fits.
    on_gpu = max((c for c in at_seq if not c.config.train.offload_activations), key=lambda c: c.tokens_per_s, default=None)
    passed_over = False
    if best.config.train.offload_activations and on_gpu is not None:
        # Host RAM for a speed gain only where the gain is clear: the PCIe cost is an
        # effective rate over six runs, and a pinned host buffer of several GiB is not free.
        if on_gpu.tokens_per_s * (1 + OFFLOAD_MIN_GAIN) >= best.tokens_per_s:
            best, passed_over = on_gpu, True
    # Each line compares the plan with the alternatives it was chosen among. Where plans with
    # the activations in host RAM were passed over for a gain under OFFLOAD_MIN_GAIN, they are
    # not among them (the offload line says so): quoted, they read as faster plans not taken.
    if passed_over:
        at_seq = [c for c in at_seq if not c.config.train.offload_activations]
        feasible = [c for c in feasible if not c.config.train.offload_activations]
    lines = _explain(best, at_seq, feasible, pinned, lengths, budget_gib, effective, world)
    lines.insert(-1, _offload_line(best, on_gpu, pinned, without_acts, seqs[0], shape, dtype, lengths, gpu_name))
    if "kernels.liger_ops" in pinned:
        lines.insert(-1, f"kernels.liger_ops {str(best.config.kernels.liger_ops).lower()}: pinned")
    elif best.config.kernels.liger_ops:
        plain = estimate_speed(shape, _with(best.config, kernels__liger_ops=False), lengths, gpu_name).tokens_per_s
        lines.insert(-1, "kernels.liger_ops true: liger's fused RMSNorm, SwiGLU and RoPE keep less for the backward and "
                         f"launch fewer kernels ({best.tokens_per_s:,.0f} tokens/s predicted; {plain:,.0f} without)")  # fmt: skip
    if best.config.train.offload_async and offload_async_applies(best.config, "cuda"):
        how = "pinned" if async_pinned else "chosen"
        sync = _with(best.config, train__offload_async=False)
        plain = estimate_speed(shape, sync, lengths, gpu_name).tokens_per_s
        more = best.peak_gib - estimate(shape, sync, dtype, "cuda", lengths.longest if lengths else None,
                                        lengths.shortest if lengths else None).peak_gib  # fmt: skip
        lines.insert(-1, f"train.offload_async true: {how}; the layer inputs' copies on a CUDA stream of their own "
                         f"({best.tokens_per_s:,.0f} tokens/s predicted; {plain:,.0f} on the compute stream), "
                         f"for {more:.2f} GiB the allocator keeps reserved")  # fmt: skip
    elif async_pinned and best.config.train.offload_async:
        lines.insert(-1, "train.offload_async true: pinned; it does nothing here (it needs the checkpointed inputs in host RAM)")
    # On by default (config.py), never turned off by the search: they cost no memory.
    if fused_lora_applies(best.config):
        lines.insert(-1, _default_line("kernels.fused_lora", "LoRA's scaling and adds inside the matrix multiplies",
                                       "with PEFT's layers as they are", best, pinned, shape, lengths, gpu_name))  # fmt: skip
    if lean_recompute_params(shape, best.config):
        lines.insert(-1, _default_line("kernels.lean_recompute", "each recomputation leaves out down_proj's base multiply, "
                                       "whose output the backward never reads", "without", best, pinned, shape, lengths, gpu_name))  # fmt: skip
    return best.config, lines


def _default_line(key: str, what: str, off_words: str, best: Candidate, pinned, shape, lengths, gpu_name) -> str:
    """The line for a kernel on by default (``key``, a kernels.* switch) that the plan uses:
    pinned or the default, and the predicted speed with it and without."""
    off = _with(best.config, **{key.replace(".", "__"): False})
    plain = estimate_speed(shape, off, lengths, gpu_name).tokens_per_s
    how = "pinned" if key in pinned else "the default"
    return f"{key} true: {how}; {what} ({best.tokens_per_s:,.0f} tokens/s predicted; {plain:,.0f} {off_words})"


def _offload_line(best, on_gpu, pinned, without: int, top: int, shape, dtype, lengths, gpu_name) -> str:
    """Why the activations are (not) kept in host RAM. ``on_gpu``: the fastest plan at this
    length with them on the GPU, or None."""
    c = best.config
    if "train.offload_activations" in pinned:
        return f"train.offload_activations {str(c.train.offload_activations).lower()}: pinned"
    if not c.train.offload_activations:
        return "train.offload_activations false: " + (
            f"not needed: seq {top} fits without it, and it buys no plan {OFFLOAD_MIN_GAIN:.0%} faster" if without == top else "it fits no longer sequence"
        )
    plain = estimate_speed(shape, _with(c, train__offload_activations=False), lengths, gpu_name).tokens_per_s
    host = offloaded_activation_host_bytes(shape, c, dtype, lengths.longest if lengths else None) / GIB
    if on_gpu is not None:
        # Same length without it: kept because the memory it frees buys a faster plan
        # (most often a bigger micro-batch), which more than pays for the PCIe copies.
        why = _pays(best, on_gpu, "with them on the GPU")
    else:
        why = f"since without it the longest that fits is seq {without}" if without else "since nothing fits without it"
    cost = 1 - best.tokens_per_s / plain
    # With train.offload_async the credited overlap (speed.ASYNC_HIDDEN_S_PER_GB, measured
    # against copies in order) can exceed what the model charges the copies themselves.
    like = f"crossing PCIe costs ~{cost:.0%} of the speed like for like" if cost > 0.005 else "its copies run beside the compute"
    return f"train.offload_activations true: saved activations in host RAM ({host:.1f} GiB), {why}; {like}"


def _pays(best: Candidate, without: Candidate | None, words: str = "without it") -> str:
    """Why a choice that costs speed like for like was kept: the fastest plan at this length
    without it is slower, or there is none."""
    if without is None:
        return f"{words} nothing fits at this length"
    return f"so a faster plan fits ({best.tokens_per_s:,.0f} tokens/s; {without.tokens_per_s:,.0f} {words})"


def _zero_words(c: RunConfig) -> str:
    ds = c.deepspeed
    if not ds.stage:
        return ""
    off = " + CPU offload" if ds.offload_params or ds.offload_optimizer else ""
    return f", ZeRO-{ds.stage}{off}"


def _explain(best, at_seq, feasible, pinned, lengths, budget_gib, effective, world) -> list[str]:
    c = best.config
    lines: list[str] = []
    seq = c.data.seq_len
    if lengths is not None:
        share = lengths.truncated_share(seq)
        if "data.seq_len" in pinned:
            why = "pinned"
        elif share == 0:
            why = f"holds the longest example ({lengths.longest} tokens)"
        else:
            why = f"the longest that fits; the longest example has {lengths.longest} tokens"
        lines.append(f"data.seq_len {seq}: {why}; {share:.1%} of examples truncated")
    else:
        lines.append(f"data.seq_len {seq}" + (": pinned" if "data.seq_len" in pinned else ""))

    def fastest(pred) -> Candidate | None:
        pool = [x for x in at_seq if pred(x.config)]
        return max(pool, key=lambda x: x.tokens_per_s) if pool else None

    if "method" in pinned:
        lines.append(f"method {c.method}: pinned")
    else:
        other = fastest(lambda x: x.method != c.method)
        alt = f"; {other.config.method} would train {other.tokens_per_s:,.0f} tokens/s" if other else (
            "; lora (16-bit weights) does not fit" if c.method == "qlora" else ""
        )
        lines.append(f"method {c.method}: fastest that fits{alt}")
    mb, ga = c.train.micro_batch, c.train.grad_accum
    bigger = [x for x in at_seq if x.config.method == c.method and x.config.train.micro_batch > mb]
    tag = "pinned" if {"train.micro_batch", "train.grad_accum"} & pinned else "fastest that fits"
    more = "" if bigger or tag == "pinned" else f"; micro-batch {mb * 2} would not fit or not keep the batch"
    lines.append(
        f"train.micro_batch {mb} x train.grad_accum {ga}"
        + (f" x {world} GPUs" if world > 1 else "")
        + f" = effective batch {mb * ga * world} (kept at {effective}): {tag}{more}"
    )
    n_layers = c.train.grad_ckpt_layers
    if "train.grad_ckpt_layers" in pinned and n_layers is not None:
        lines.append(f"train.grad_ckpt true, train.grad_ckpt_layers {n_layers}: pinned")
    elif "train.grad_ckpt" in pinned:
        lines.append(f"train.grad_ckpt {str(c.train.grad_ckpt).lower()}: pinned")
    elif n_layers is not None:
        every = fastest(lambda x: x.method == c.method and x.train.grad_ckpt and x.train.grad_ckpt_layers is None)
        off = fastest(lambda x: x.method == c.method and not x.train.grad_ckpt)
        alts = [f"{every.tokens_per_s:,.0f} tokens/s with every layer checkpointed" if every else "",
                f"{off.tokens_per_s:,.0f} without checkpointing" if off else "without checkpointing nothing fits"]  # fmt: skip
        lines.append(
            f"train.grad_ckpt true, train.grad_ckpt_layers {n_layers}: only the first {n_layers} layers are recomputed; "
            f"the rest keep their activations, as many as fit ({'; '.join(a for a in alts if a)})"
        )
    elif c.train.grad_ckpt:
        off = fastest(lambda x: x.method == c.method and not x.train.grad_ckpt)
        lines.append(
            "train.grad_ckpt true: "
            + ("without it nothing fits at this length" if off is None else f"faster here ({off.tokens_per_s:,.0f} tokens/s without it)")
        )
    elif c.train.offload_activations:
        lines.append("train.grad_ckpt false: the saved activations go to host RAM instead, so no recomputation")
    else:
        lines.append("train.grad_ckpt false: activations fit, so no recomputation (~30% faster)")
    if "train.optimizer" in pinned:
        lines.append(f"train.optimizer {c.train.optimizer}: pinned")
    elif c.train.optimizer != "adamw_torch":
        torch_adam = fastest(lambda x: x.train.optimizer == "adamw_torch")
        lines.append(f"train.optimizer {c.train.optimizer}: 8-bit optimizer states, " + _pays(best, torch_adam, "with adamw_torch"))
    else:
        lines.append("train.optimizer adamw_torch")
    if "kernels.fused_loss" in pinned:
        lines.append(f"kernels.fused_loss {str(c.kernels.fused_loss).lower()}: pinned")
    elif any(x.config.kernels.fused_loss for x in feasible):
        plain = fastest(lambda x: not x.kernels.fused_loss)
        if c.kernels.fused_loss:
            lines.append("kernels.fused_loss true: no full-vocabulary logits, " + _pays(best, plain))
        else:
            lines.append("kernels.fused_loss false: it would fit nothing faster here")
    if "train.offload_embeddings" in pinned:
        lines.append(f"train.offload_embeddings {str(c.train.offload_embeddings).lower()}: pinned")
    elif any(x.config.train.offload_embeddings for x in feasible):
        if c.train.offload_embeddings:
            plain = fastest(lambda x: not x.train.offload_embeddings)
            lines.append("train.offload_embeddings true: the input embedding table in host RAM frees its GPU memory, " + _pays(best, plain))
        else:
            lines.append("train.offload_embeddings false: freeing the embedding table would fit nothing faster here")
    if "kernels.tiled_mlp" in pinned:
        lines.append(f"kernels.tiled_mlp {str(c.kernels.tiled_mlp).lower()}: pinned")
    elif c.kernels.tiled_mlp:
        plain = fastest(lambda x: not x.kernels.tiled_mlp)
        lines.append("kernels.tiled_mlp true: the MLP runs over chunks of the sequence, so its intermediates are never whole; " + _pays(best, plain))
    ds = c.deepspeed
    if any(k.startswith("deepspeed.") for k in pinned):
        lines.append(f"deepspeed.stage {ds.stage}: pinned")
    elif ds.offload_params:
        lines.append(
            "deepspeed.stage 3 with parameters and optimizer in host RAM: nothing fits the GPU otherwise "
            "(slow: the weights cross PCIe every pass)"
            + ("; kernels.fused_loss on, so full-vocabulary logits never exist" if c.kernels.fused_loss else "")
        )
    elif world > 1:
        alts = {x.config.deepspeed.stage: x for x in at_seq if x.config.method == c.method}
        why = {
            0: "data parallel: every GPU holds the whole model and optimizer state, and that fits",
            2: "gradients and optimizer state sharded over the GPUs"
            + ("; as fast as plain data parallel here" if 0 in alts else "; plain data parallel does not fit"),
            3: "weights sharded too: " + ("ZeRO-2 does not fit" if 2 not in alts else "the fastest that fits"),
        }[ds.stage]
        lines.append(f"deepspeed.stage {ds.stage}: {why}")
    lines.append(
        f"predicted peak {best.peak_gib:.2f} GiB of {budget_gib:g} GiB"
        f" (plans stay under {budget_gib * (1 - SAFETY_MARGIN):.2f}: {SAFETY_MARGIN:.0%} safety margin)"
    )
    return lines


