"""scripts/benchmark_speed.py on CPU: the pure parts (seed configs as vramfit flags, the
auto rows' fairness, MFU, loss agreement, the CSVs) and --dry-run. Nothing here trains."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "benchmark_speed.py"
pytestmark = pytest.mark.skipif(not SCRIPT.is_file(), reason="no scripts/ in this install")

if SCRIPT.is_file():
    sys.path.insert(0, str(REPO / "scripts"))
    import benchmark_speed as bs

from vramfit.presets import parse_set, resolve_layers  # noqa: E402

MODEL, DATA = "/tmp/m", "/tmp/d.jsonl"


def seed_config(name, extra=None, budget=-1):
    seed = bs.SEEDS[name]
    return bs.resolve_seed(seed, MODEL, DATA, extra, seed.budget_gib if budget == -1 else budget).config


# ------------------------------------------------------------------ seed configs -> flags


@pytest.mark.parametrize("value", [2e-4, 1e-5, 1e-4, 0.05, 3.0, True, False, 8, "nf4", ["q_proj", "v_proj"], "all-linear"])
def test_set_values_read_back_as_written(value):
    assert parse_set([f"k={bs.fmt_value(value)}"])["k"] == value


def test_8gb_guide_config_as_vramfit_flags():
    c = seed_config("8gb-qlora")
    assert c.method == "qlora" and c.quant.bits == 4 and c.quant.quant_type == "nf4" and c.quant.double_quant
    assert c.quant.upcast_embeddings  # the guide's PEFT recipe: fp32 embeddings and lm_head
    assert (c.lora.r, c.lora.alpha, c.lora.dropout, c.lora.target_modules) == (8, 16, 0.05, ["q_proj", "v_proj"])
    assert (c.data.seq_len, c.train.micro_batch, c.train.grad_accum) == (512, 1, 32)
    assert c.train.lr == 2e-4 and c.train.grad_ckpt and c.model.dtype == "bfloat16" and c.train.dataloader_workers == 2
    assert c.budget_gib == 8
    assert bs.SEEDS["8gb-qlora"].effective_batch() == 32
    fit = seed_config("8gb-qlora", bs.SEEDS["8gb-qlora"].made_to_fit)
    assert not fit.quant.upcast_embeddings and fit.data.seq_len == 512


def test_24gb_guide_config_as_vramfit_flags():
    c = seed_config("24gb-lora")
    assert c.method == "lora" and c.lora.r == 128 and c.lora.target_modules == "all-linear"
    assert (c.data.seq_len, c.train.micro_batch, c.train.grad_accum, c.train.grad_ckpt) == (1536, 1, 16, True)
    assert c.launch.env["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:128,expandable_segments:True"
    assert c.launch.env["OMP_NUM_THREADS"] == "4" and c.launch.env["TOKENIZERS_PARALLELISM"] == "false"
    assert c.budget_gib == 24 and bs.SEEDS["24gb-lora"].effective_batch() == 16
    assert seed_config("24gb-lora", bs.SEEDS["24gb-lora"].made_to_fit).data.seq_len == 1024
    assert seed_config("24gb-lora", budget=None).budget_gib is None  # the uncapped measurement


@pytest.mark.parametrize("name", list(bs.SEEDS))
def test_every_guide_setting_maps_to_a_key_or_says_why_not(name):
    seed = bs.SEEDS[name]
    for s in seed.settings:
        assert s.guide
        if s.key is None:
            assert s.note, f"{s.guide}: an unmapped setting must say why"
    assert bs.unmapped(seed)  # each guide has settings with no vramfit key, said so
    # The flags are the seed's settings, each once, and vramfit takes them all.
    flags = bs.set_flags(seed.sets())
    assert flags[0::2] == ["--set"] * len(seed.sets())
    resolve_layers(seed.preset, None, None, flags[1::2])


def test_mapping_table_names_every_setting():
    md = bs.mapping_markdown()
    for seed in bs.SEEDS.values():
        assert seed.group in md
        for s in seed.settings:
            assert s.guide.replace("|", "/") in md


# ------------------------------------------------------------------ the auto rows: fair comparisons


@pytest.mark.parametrize("name", list(bs.SEEDS))
def test_auto_row_differs_from_the_seed_only_in_memory_and_speed_choices(name):
    seed = bs.SEEDS[name]
    sets, _, _ = bs.auto_sets(seed, MODEL, DATA, "NVIDIA H200", 128 * 2**30)
    planned, _ = bs.planner_choice(sets, MODEL, DATA, seed.budget_gib, bs.arch_shape(seed.arch), "NVIDIA H200", 128 * 2**30)
    a, b = seed_config(name).model_dump(mode="json"), planned.model_dump(mode="json")
    diffs = bs.config_differences(a, b)
    assert diffs, "the planner should change something"
    assert all(k.startswith(bs.PLANNER_KEYS) for k in diffs), diffs
    # Same effective batch and sequence length: the same tokens per optimizer step.
    assert planned.train.micro_batch * planned.train.grad_accum == seed.effective_batch()
    assert planned.data.seq_len == seed_config(name).data.seq_len


def test_auto_row_pins_the_split_only_when_the_cli_cannot_hold_the_batch():
    sets8, how8, cfg8 = bs.auto_sets(bs.SEEDS["8gb-qlora"], MODEL, DATA, "NVIDIA H200", None)
    assert "train.micro_batch" in sets8 and how8.startswith("planner") and cfg8 is not None
    assert sets8["train.micro_batch"] * sets8["train.grad_accum"] == 32
    # The CLI, given that split, plans the same (the split pinned, the rest searched again).
    again, _ = bs.planner_choice(sets8, MODEL, DATA, 8, bs.arch_shape("qwen2.5-7b"), "NVIDIA H200", None)
    assert again.model_dump() == cfg8.model_dump()
    sets24, how24, _ = bs.auto_sets(bs.SEEDS["24gb-lora"], MODEL, DATA, "NVIDIA H200", None)
    assert how24 == "cli" and "train.micro_batch" not in sets24 and "train.grad_accum" not in sets24
    assert sets24["data.seq_len"] == 1536 and sets24["train.lr"] == 1e-4  # the 24gb preset's lr, held for both


def test_max_context_is_the_longest_the_planner_fits():
    from vramfit.errors import FitError

    case = bs.CTX_CASES["ctx-llama-3.1-8b-16"]
    seq, cfg = bs.predicted_max_seq(case, MODEL, DATA, "NVIDIA H200", None, fused=False)
    assert seq > 0 and seq % bs.SEQ_STEP == 0 and cfg.data.seq_len == seq
    sets = {x.split("=", 1)[0]: x.split("=", 1)[1] for x in case.sets}
    shape = bs.arch_shape(case.arch)
    with pytest.raises(FitError):
        bs.planner_choice({**sets, "kernels.fused_loss": "false", "data.seq_len": seq + bs.SEQ_STEP}, MODEL, DATA, 16,
                          shape, "NVIDIA H200", None)  # fmt: skip
    fused, _ = bs.predicted_max_seq(case, MODEL, DATA, "NVIDIA H200", None, fused=True)
    edge, _ = bs.predicted_max_seq(case, MODEL, DATA, "NVIDIA H200", None, fused=False, margin=False)
    assert fused > seq and edge >= seq  # no full-vocabulary logits; no 5% margin
    assert case.published == 40724


# ------------------------------------------------------------------ arithmetic


def test_mfu_known_answer():
    n = 7_615_616_512  # Qwen2.5-7B
    assert bs.mfu(1000.0, n, "qlora", 989.0) == pytest.approx(1000 * 4 * n / 989e12)
    assert bs.mfu(1000.0, n, "qlora", 989.0) == pytest.approx(0.030802, abs=1e-6)
    assert bs.mfu(1000.0, n, "full", 989.0) == pytest.approx(1.5 * bs.mfu(1000.0, n, "lora", 989.0))
    assert bs.mfu(None, n, "lora", 989.0) is None and bs.mfu(1000.0, n, "lora", None) is None


def test_step_noise_ignores_a_linear_trend_and_measures_alternation():
    assert bs.step_noise([10.0, 9.0, 8.0, 7.0, 6.0]) == pytest.approx(0.0)
    e = 0.1
    # +e/-e alternation on a trend: every second difference is 2e in size.
    xs = [10 - i + (e if i % 2 else 0.0) for i in range(7)]
    assert bs.step_noise(xs) == pytest.approx(2 * e / 0.6745 / math.sqrt(6))
    assert bs.step_noise([1.0, 2.0]) is None


def test_loss_agreement_arithmetic():
    ref = [10.0, 9.1, 8.0, 7.1, 6.0, 5.1]  # noise from the alternation
    other = [10.0, 9.2, 7.9, 7.1, 6.0]  # one step shorter: compared over the common steps
    a = bs.loss_agreement(ref, other)
    assert a["loss_steps"] == 5
    assert a["loss_max_abs_diff"] == pytest.approx(0.1)
    assert a["loss_mean_abs_diff"] == pytest.approx(0.04)
    sigma = bs.step_noise(ref[:5])
    assert a["seed_loss_noise"] == pytest.approx(round(sigma, 4))
    assert a["loss_within_noise"] is (0.1 <= 3 * sigma)
    far = bs.loss_agreement(ref, [x + 5 for x in ref])
    assert far["loss_within_noise"] is False
    assert bs.loss_agreement(ref, [])["loss_steps"] == 0


def test_config_differences():
    a = {"method": "qlora", "train": {"micro_batch": 1, "lr": 2e-4}, "launch": {"env": {"A": "1"}}}
    b = {"method": "qlora", "train": {"micro_batch": 4, "lr": 2e-4}, "launch": {"env": {"A": "2"}}}
    assert bs.config_differences(a, b) == {"launch.env": ({"A": "1"}, {"A": "2"}), "train.micro_batch": (1, 4)}


# ------------------------------------------------------------------ the CSVs


def _record(config, status, tps, losses, mb=1, ga=32, method="qlora", upcast=False, predicted=7.2, peak=7.4, cap=8):
    return {
        "kind": "speed", "group": "8gb-qlora", "config": config, "arch": "qwen2.5-7b", "budget_gib": 8, "cap_gib": cap,
        "command": f"vramfit train --out /tmp/{config}", "exit": 0 if status == "ok" else 3, "status": status,
        "gpu": "NVIDIA H200", "peak_source": "measured", "peak_tflops_measured": 800.0, "date": "2026-01-01",
        "total_params": 7_615_616_512, "predicted_peak_gib": predicted if status == "ok" else None,
        "planned_predicted_peak_gib": predicted, "losses": losses, "resolved_dtype": "bfloat16",
        "metrics": {"steady_tokens_per_s": tps, "peak_process_gib": peak, "steps": len(losses), "tokens": 98304} if tps else {},
        "plan_config": {} if status == "refused" else {
            "method": method, "budget_gib": cap, "model": {"dtype": "bfloat16"}, "data": {"seq_len": 512},
            "lora": {"r": 8, "target_modules": ["q_proj", "v_proj"]}, "quant": {"upcast_embeddings": upcast},
            "train": {"micro_batch": mb, "grad_accum": ga, "grad_ckpt": True, "optimizer": "adamw_torch"},
            "kernels": {"fused_loss": False}},
        "intended_config": {"method": method, "data": {"seq_len": 512}, "train": {"micro_batch": mb, "grad_accum": ga},
                            "quant": {"upcast_embeddings": upcast}},
    }  # fmt: skip


def test_csvs_have_the_required_columns_ratios_and_mfu(tmp_path):
    seed_losses = [11.0, 10.2, 9.1, 8.3, 7.2, 6.4]
    recs = [
        _record("seed-as-written", "refused", None, [], upcast=True, predicted=9.23),
        _record("seed-as-written-uncapped", "ok", 1100.0, seed_losses[:3], upcast=True, peak=10.4, cap=None),
        _record("seed-made-to-fit", "ok", 1000.0, seed_losses),
        _record("vramfit-auto", "ok", 3000.0, [x + 0.01 for x in seed_losses], mb=4, ga=8),
    ]
    res = tmp_path / "res"
    res.mkdir()
    (res / "speed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (res / "max-context.jsonl").write_text(json.dumps({
        "kind": "max-context", "group": "ctx-llama-3.1-8b-16", "config": "planner-max", "arch": "llama-3.1-8b",
        "budget_gib": 16, "status": "ok", "gpu": "NVIDIA H200", "command": "vramfit train ...", "lora_r": 32,
        "targets": "all-linear", "fused_loss": False, "predicted_max_seq": 3712, "published_max_seq": 40724,
        "predicted_peak_gib": 15.0, "metrics": {"peak_process_gib": 15.2, "steady_tokens_per_s": 5000.0},
        "plan_config": {"method": "qlora", "train": {"micro_batch": 1, "grad_ckpt": True}},
    }) + "\n")  # fmt: skip
    out = tmp_path / "csv"
    assert bs.write_tables([res], out) == (4, 1)
    assert not list(out.glob("*.tmp"))
    speed = list(csv.DictReader((out / "speed.csv").open()))
    required = "arch,gpu,budget_gib,config,seq_len,micro_batch,effective_batch,peak_gib,tokens_per_s,ratio_to_seed,mfu,command"
    assert set(required.split(",")) <= set(speed[0])
    by = {r["config"]: r for r in speed}
    assert by["seed-as-written"]["status"] == "refused" and by["seed-as-written"]["tokens_per_s"] == ""
    assert by["seed-as-written"]["predicted_peak_gib"] == "9.23"  # the refused plan's prediction
    assert by["seed-as-written"]["seq_len"] == "512" and by["seed-as-written"]["upcast_embeddings"] == "True"
    assert by["seed-as-written"]["peak_gib"] == ""
    assert by["vramfit-auto"]["seed_ref"] == "seed-made-to-fit"
    assert float(by["vramfit-auto"]["ratio_to_seed"]) == 3.0 and float(by["seed-made-to-fit"]["ratio_to_seed"]) == 1.0
    assert by["vramfit-auto"]["effective_batch"] == "32" and by["vramfit-auto"]["micro_batch"] == "4"
    assert float(by["vramfit-auto"]["mfu"]) == pytest.approx(round(3000 * 4 * 7_615_616_512 / 800e12, 4))
    assert float(by["vramfit-auto"]["mfu_datasheet"]) == pytest.approx(round(3000 * 4 * 7_615_616_512 / 989e12, 4))
    assert by["vramfit-auto"]["peak_source"].startswith("measured")
    assert float(by["vramfit-auto"]["loss_max_abs_diff"]) == pytest.approx(0.01)
    assert by["vramfit-auto"]["loss_within_noise"] == "True"
    assert "train.micro_batch: 1 -> 4" in by["vramfit-auto"]["differs_from_seed"]
    assert by["vramfit-auto"]["command"] == "vramfit train --out /tmp/vramfit-auto"
    ctx = list(csv.DictReader((out / "max-context.csv").open()))
    assert set("arch,gpu,budget_gib,method,lora_r,max_seq_len,peak_gib,command".split(",")) <= set(ctx[0])
    assert ctx[0]["max_seq_len"] == "3712" and ctx[0]["method"] == "qlora" and ctx[0]["published_max_seq"] == "40724"


def test_a_rerun_replaces_the_earlier_record(tmp_path):
    recs = [_record("seed-made-to-fit", "ok", 1000.0, [1.0]), _record("seed-made-to-fit", "ok", 1200.0, [1.0])]
    rows = bs.speed_table(recs)
    assert len(rows) == 1 and rows[0]["tokens_per_s"] == 1200.0


def test_each_row_is_compared_with_the_seed_of_its_own_call():
    # The seed's speed moves between invocations: a plan re-run later is not compared with an
    # earlier call's seed, and a row from a call that ran no seed falls back to the latest one.
    first = [_record("seed-made-to-fit", "ok", 1000.0, [1.0]), _record("vramfit-auto", "ok", 7000.0, [1.0], mb=16, ga=2)]
    second = [_record("seed-made-to-fit", "ok", 2000.0, [1.0]), _record("vramfit-auto-fused", "ok", 9000.0, [1.0], mb=16, ga=2)]
    third = [_record("vramfit-auto", "ok", 8000.0, [1.0], mb=16, ga=2)]
    recs = [{**r, "_source": src} for src, call in (("a", first), ("b", second), ("c", third)) for r in call]
    by = {r["config"]: r for r in bs.speed_table(recs)}
    assert by["vramfit-auto-fused"]["ratio_to_seed"] == 4.5  # its own call's seed (2000)
    assert by["vramfit-auto"]["tokens_per_s"] == 8000.0 and by["vramfit-auto"]["ratio_to_seed"] == 4.0  # no seed in its call
    assert by["seed-made-to-fit"]["tokens_per_s"] == 2000.0


def test_losses_are_compared_only_over_the_same_number_of_steps():
    # The learning rate decays over train.max_steps: a 10-step run's losses drift from a
    # 6-step seed's by step 4, with nothing wrong in either (session 15's cross-call rows).
    seed = _record("seed-made-to-fit", "ok", 1000.0, [11.0, 10.2, 9.1, 8.3, 7.2, 6.4])
    longer = {**_record("vramfit-auto", "ok", 7000.0, [11.0, 10.1, 8.6, 7.2, 5.9, 4.8, 4.1, 3.9], mb=16, ga=2), "_source": "b"}
    same = {**_record("vramfit-auto-fused", "ok", 7000.0, [11.0, 10.2, 9.1, 8.3, 7.2, 6.41], mb=16, ga=2), "_source": "b"}
    by = {r["config"]: r for r in bs.speed_table([{**seed, "_source": "a"}, longer, same])}
    assert "loss_within_noise" not in by["vramfit-auto"] and by["vramfit-auto"]["ratio_to_seed"] == 7.0
    assert by["vramfit-auto-fused"]["loss_within_noise"] is True


# ------------------------------------------------------------------ dry run


def test_dry_run_prints_commands_predictions_and_times(tmp_path, capsys):
    work = tmp_path / "work"
    assert bs.main(["--dry-run", "--only", "8gb-qlora", "--only", "ctx-llama-3.1-8b-16", "--work", str(work)]) == 0
    out = capsys.readouterr().out
    assert f"vramfit train --preset 8gb --budget 8 --model {work}/qwen2.5-7b" in out
    assert "--set quant.upcast_embeddings=true" in out and "--set quant.upcast_embeddings=false" in out
    assert "vramfit train --preset auto --budget 8" in out and "--set train.grad_accum=" in out
    assert "refused before training" in out  # the as-written 8 GB config is predicted over 8 GiB
    assert "vramfit train --preset auto --budget 16" in out and "--set kernels.fused_loss=true" in out
    assert "estimated total" in out and out.count(" s, predicted peak") >= 5
    assert not work.exists()  # nothing built, nothing written


def test_the_no_lean_row_pins_lean_recompute_off(tmp_path, capsys):
    # The 24 GB method-kept group: the planner's own plan beside the same search with lean
    # recomputation pinned off (session 15's A/B, in one benchmark call).
    assert bs.main(["--dry-run", "--only", "24gb-lora-method-kept-dropout0", "--no-lean", "--work", str(tmp_path / "w"),
                    "--gpu-name", "NVIDIA H100 80GB HBM3"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    block = out.split("24gb-lora-method-kept-dropout0/vramfit-auto-no-lean:")[1]
    assert "--set kernels.lean_recompute=false --set kernels.lean_mlp=false" in block.split("\n\n")[0]
    auto = out.split("24gb-lora-method-kept-dropout0/vramfit-auto:")[1].split("\n\n")[0]
    assert "kernels.lean_recompute" not in auto and "micro-batch 8 x 2" in auto


def test_dry_run_as_a_command_without_a_gpu(tmp_path):
    res = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--only", "ctx-llama-3.1-8b-8", "--work", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert res.returncode == 0, res.stderr
    # Llama-3.1-8B QLoRA r32 fits 8 GiB since the embedding table can live in host RAM (it did
    # not before, and the row then recorded `vramfit plan`'s refusal).
    assert "ctx-llama-3.1-8b-8/planner-max" in res.stdout
    assert "vramfit train --preset auto --budget 8" in res.stdout


@pytest.mark.usefixtures("no_gpu")
def test_running_needs_a_gpu(tmp_path, capsys):
    assert bs.main(["--only", "8gb-qlora", "--results", str(tmp_path / "r"), "--work", str(tmp_path / "w")]) == 2
    assert "--dry-run" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_mapping_flag_prints_markdown(capsys):
    assert bs.main(["--mapping"]) == 0
    assert "| guide says | vramfit | note |" in capsys.readouterr().out


def test_docs_table_is_the_scripts_mapping():
    doc = REPO / "docs" / "benchmarks.md"
    if not doc.is_file():
        pytest.skip("no docs/ in this install")
    text = doc.read_text(encoding="utf-8")
    assert bs.mapping_markdown().strip() in text  # regenerate with --mapping when SEEDS change
    # Its results say where they came from: the raw results beside the CSVs.
    assert "docs/benchmarks/speed/" in text


def test_archive_holds_every_finished_run_and_is_replaced_whole(tmp_path):
    import tarfile

    results = tmp_path / "bench"
    (results / "runs" / "run-a").mkdir(parents=True)
    (results / "speed.jsonl").write_text('{"config": "a"}\n')
    (results / "runs" / "run-a" / "metrics.json").write_text("{}")
    dest = tmp_path / "out" / "bench.tgz"
    bs.archive(results, dest)
    (results / "speed.jsonl").write_text('{"config": "a"}\n{"config": "b"}\n')  # a second run finished
    bs.archive(results, dest)
    with tarfile.open(dest) as tar:
        assert {"bench/speed.jsonl", "bench/runs/run-a/metrics.json"} <= set(tar.getnames())
        assert tar.extractfile("bench/speed.jsonl").read().count(b"\n") == 2
    assert not dest.with_name("bench.tgz.tmp").exists()
    bs.archive(results, None)  # no --archive: nothing written


def test_the_8gb_guide_on_a_24gb_card_keeps_qlora_and_the_guides_adapter_and_batch():
    seed = bs.SEEDS["8gb-qlora-at-24"]
    assert seed.budget_gib == 24 and seed.settings == bs.SEEDS["8gb-qlora"].settings
    sets, how, cfg = bs.auto_sets(seed, MODEL, DATA, "NVIDIA H200", None)
    assert sets["method"] == "qlora"  # kept: the MFU target is QLoRA 7B at 24 GiB
    assert sets["lora.r"] == 8 and sets["lora.target_modules"] == ["q_proj", "v_proj"] and sets["data.seq_len"] == 512
    assert cfg.method == "qlora" and cfg.train.micro_batch * cfg.train.grad_accum == 32
    # The 8 GB group's own auto row leaves the method to the planner.
    assert "method" not in bs.auto_sets(bs.SEEDS["8gb-qlora"], MODEL, DATA, "NVIDIA H200", None)[0]
    assert "**8gb-qlora-at-24**: the settings of **8gb-qlora** under `--budget 24`" in bs.mapping_markdown()
