"""The command line through typer's CliRunner (in-process), plus a few subprocess checks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from conftest import PRESET_NAMES, subprocess_env, vramfit_exe
from vramfit.cli import app
from vramfit.hardware import detect as real_detect  # bound before the no_gpu fixture patches it
from vramfit.presets import load_preset, resolve_layers


pytestmark = pytest.mark.usefixtures("no_gpu")

runner = CliRunner()





@pytest.fixture
def work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def error_lines(result) -> list[str]:
    return [line for line in result.output.splitlines() if line.startswith("error:")]


def assert_clean_error(result, code: int, *needles: str) -> str:
    """Exit code, exactly one `error: ... (hint: ...)` line, no traceback; returns that line."""
    out = result.output
    assert result.exit_code == code, out
    assert "Traceback" not in out
    assert "internal error" not in out
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    errs = error_lines(result)
    assert len(errs) == 1, out
    line = errs[0]
    assert "(hint: " in line and line.endswith(")"), line
    assert line in result.stderr.splitlines(), "errors go to stderr"
    for n in needles:
        assert n in line, line
    return line


def assert_nothing_written(root: Path, out: Path | None = None):
    if out is not None:
        assert not out.exists(), f"{out} was created"
    assert not (root / "runs").exists(), "a default run dir was created"
    leftovers = [p for p in root.rglob("*") if ".tmp" in p.name]
    assert leftovers == []


# ---------------------------------------------------------------- help


def test_help_lists_commands():
    r = invoke("--help")
    assert r.exit_code == 0, r.output
    for cmd in ("detect", "presets", "plan", "train", "merge"):
        assert cmd in r.output


def test_no_args_shows_help():
    r = invoke()
    assert "Usage" in r.output and "plan" in r.output


@pytest.mark.parametrize("cmd", ["plan", "train", "merge", "detect"])
def test_subcommand_help(cmd):
    r = invoke(cmd, "--help")
    assert r.exit_code == 0, r.output
    assert "Usage" in r.output


def test_help_does_not_import_torch():
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "import vramfit.cli\n"
        "r = CliRunner().invoke(vramfit.cli.app, ['--help'])\n"
        "assert r.exit_code == 0, r.output\n"
        "r = CliRunner().invoke(vramfit.cli.app, ['plan', '--help'])\n"
        "assert r.exit_code == 0, r.output\n"
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'datasets', 'deepspeed') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env())
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_help_executable():
    out = subprocess.run([vramfit_exe(), "--help"], capture_output=True, text=True, env=subprocess_env())
    assert out.returncode == 0, out.stderr
    assert "train" in out.stdout and "merge" in out.stdout


# ---------------------------------------------------------------- detect / presets


def test_detect_human():
    r = invoke("detect")
    assert r.exit_code == 0, r.output
    assert "GPU: none" in r.output
    assert "host:" in r.output and "CPUs" in r.output
    assert "recommended preset: cpu" in r.output


def test_detect_json():
    r = invoke("detect", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["recommended_preset"] == "cpu"
    assert doc["gpus"] == []
    assert doc["nvml_error"]
    assert doc["host_ram_bytes"] > 0 and doc["cpu_count"] >= 1
    assert "reason" in doc


def test_detect_real_probe_never_fails(monkeypatch):
    import vramfit.hardware as hw

    monkeypatch.setattr(hw, "detect", real_detect)  # the real NVML probe: absent here, present on a GPU box
    r = runner.invoke(app, ["detect", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert (doc["recommended_preset"] == "cpu") == (doc["gpus"] == [])


def test_presets_lists_every_file():
    r = invoke("presets")
    assert r.exit_code == 0, r.output
    listed = [line.split()[0] for line in r.stdout.splitlines() if line.strip() and not line.startswith("vramfit")]
    assert sorted(listed) == PRESET_NAMES
    for name in PRESET_NAMES:
        assert load_preset(name).summary in r.output


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_presets_show_is_a_valid_config(name, tmp_path):
    r = invoke("presets", "show", name)
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith(f"# {name}:")
    f = tmp_path / "shown.yaml"
    f.write_text(r.stdout)
    assert "about" not in yaml.safe_load(r.stdout)
    again = resolve_layers(None, f)
    assert again.config == resolve_layers(name).config


def test_presets_show_config_round_trips_through_plan(work):
    r = invoke("presets", "show", "cpu")
    (work / "mine.yaml").write_text(r.stdout)
    r = invoke("plan", "--config", "mine.yaml", "--out", work / "run", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["config"] == resolve_layers("cpu").config.model_dump(mode="json")
    assert doc["sources"]["train.max_steps"].startswith("file:")


def test_presets_show_unknown():
    assert_clean_error(invoke("presets", "show", "8bg"), 2, "unknown preset '8bg'", "did you mean '8gb'")


# ---------------------------------------------------------------- plan / dry run


def test_plan_json(work):
    out = work / "run"
    r = invoke("plan", "--json", "--out", out)
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    for key in ("predicted_peak_gib", "budget_gib", "fits", "breakdown", "config", "sources", "run_dir"):
        assert key in doc, key
    assert doc["preset"] == "cpu" and doc["device"] == "cpu"
    assert doc["fits"] is True and doc["budget_gib"] is None
    assert doc["run_dir"] == str(out.resolve())
    assert doc["predicted_peak_gib"] == pytest.approx(sum(doc["breakdown"].values()), abs=0.01)
    assert (out / "plan.yaml").is_file() and (out / "launch.sh").is_file()
    assert not (out / "checkpoints").exists()


def test_plan_default_out_dir(work):
    r = invoke("plan")
    assert r.exit_code == 0, r.output
    assert (work / "runs" / "tiny-cpu" / "plan.yaml").is_file()
    assert "runs/tiny-cpu" in r.output


def test_plan_human_output_shows_sources(work):
    r = invoke("plan", "--out", work / "run", "--set", "lora.r=4", "--budget", "2")
    assert r.exit_code == 0, r.output
    out = r.output
    assert "preset cpu" in out
    assert "predicted peak" in out
    assert "[preset:cpu]" in out
    assert "lora.r = 4  [--set]" in out
    assert "budget_gib = 2.0  [flag]" in out
    assert "quant.bits = 4  [default]" in out
    assert "fits" in out
    assert "vramfit train --resume --out" in out


def test_plan_7b_lora_on_cpu(work, qwen7b_dir):
    r = invoke("plan", "--model", qwen7b_dir, "--preset", "24gb", "--out", work / "run", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["method"] == "lora" and doc["device"] == "cpu" and doc["dtype"] == "float32"
    assert doc["total_params"] == 7_615_616_512
    assert doc["model"] == str(qwen7b_dir)


def test_train_dry_run(work):
    out = work / "run"
    r = invoke("train", "--dry-run", "--out", out, "--set", "train.max_steps=3")
    assert r.exit_code == 0, r.output
    assert "dry run: nothing trained" in r.output
    assert (out / "plan.yaml").is_file() and (out / "training_args.json").is_file()
    assert json.loads((out / "training_args.json").read_text())["max_steps"] == 3
    for never in ("checkpoints", "adapter", "metrics.json", "train.log"):
        assert not (out / never).exists(), never


def test_train_resume_warns_other_options_ignored(work, monkeypatch):
    import vramfit.launch as launch

    out = work / "run"
    assert invoke("train", "--dry-run", "--out", out).exit_code == 0
    calls = []
    monkeypatch.setattr(launch, "execute", lambda script, extra=None, **kw: calls.append((script, extra)) or 0)
    r = invoke("train", "--resume", "--out", out, "--set", "lora.r=2")
    assert r.exit_code == 0, r.output
    assert "other options are ignored" in r.stderr
    assert calls == [(out.resolve() / "launch.sh", ["--resume"])]


def test_train_failure_is_one_line_with_resume_hint(work, monkeypatch):
    import vramfit.launch as launch

    monkeypatch.setattr(launch, "execute", lambda script, extra=None, **kw: 7)
    r = invoke("train", "--out", work / "run")
    line = assert_clean_error(r, 4, "training exited with code 7")
    assert "vramfit train --resume --out" in line
    assert (work / "run" / "plan.yaml").is_file()  # kept, to resume


def test_train_failure_points_at_the_traceback_the_trainer_logged(work, monkeypatch):
    import vramfit.launch as launch
    from vramfit.render import CRASH_MARK

    run = work / "run"

    def crash(script, extra=None, **kw):
        with (Path(script).parent / "train.log").open("a") as f:
            f.write(CRASH_MARK + "\nTraceback (most recent call last):\nRuntimeError: boom\n")
        return 1

    monkeypatch.setattr(launch, "execute", crash)
    r = invoke("train", "--out", run)
    line = assert_clean_error(r, 4, "training exited with code 1")
    assert f"fix the cause above, whose traceback is also in {run.resolve() / 'train.log'}, then" in line
    # The same run failing again without a crash of its own: the old one is not pointed at.
    monkeypatch.setattr(launch, "execute", lambda script, extra=None, **kw: 9)
    line = assert_clean_error(invoke("train", "--out", run), 4, "training exited with code 9")
    assert "traceback" not in line


# ---------------------------------------------------------------- bad inputs


def _files(work: Path):
    (work / "bad.jsonl").write_text('{"instruction": "a", "output": "b"}\n{"instruction": bad\n')
    (work / "empty.jsonl").write_text("")
    (work / "cols.jsonl").write_text('{"foo": 1}\n')
    (work / "alpaca.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    (work / "nomodel").mkdir()
    (work / "broken.yaml").write_text("lora:\n  r: [1\n")


BAD = [
    # (id, args, exit code, substrings of the error line)
    ("missing-data", ["--data", "nope.jsonl"], 2, ["dataset not found: nope.jsonl"]),
    ("malformed-jsonl", ["--data", "bad.jsonl"], 2, ["bad.jsonl line 2", "invalid JSON"]),
    ("unknown-format", ["--set", "data.format=weird"], 2, ["data.format"]),
    ("cannot-detect-columns", ["--data", "cols.jsonl"], 2, ["cols.jsonl", "cannot detect the format", "['foo']"]),
    ("missing-columns", ["--data", "alpaca.jsonl", "--set", "data.format=messages"], 2, ["needs column(s) messages"]),
    ("empty-dataset", ["--data", "empty.jsonl"], 2, ["empty.jsonl is empty"]),
    ("unknown-preset", ["--preset", "8bg"], 2, ["unknown preset '8bg'", "did you mean '8gb'"]),
    ("preset-path", ["--preset", "../x"], 2, ["invalid preset name"]),
    ("model-without-config", ["--model", "nomodel"], 2, ["no config.json in"]),
    ("model-not-found", ["--model", "./nowhere"], 2, ["model not found"]),
    ("hub-model-offline", ["--model", "someone/no-such-model"], 2, ["cannot fetch config.json"]),
    ("unknown-set-key", ["--set", "lora.rank=8"], 2, ["unknown config key 'lora.rank'", "did you mean 'lora.r'"]),
    ("set-without-equals", ["--set", "lora.r"], 2, ["--set expects key=value"]),
    ("bad-set-value", ["--set", "lora.r=zero"], 2, ["lora.r:", "(from --set)"]),
    ("bad-target-module", ["--set", "lora.target_modules=[qkv]"], 2, ["['qkv']", "are not linear layers"]),
    ("invalid-yaml", ["--config", "broken.yaml"], 2, ["broken.yaml line", "invalid YAML"]),
    ("missing-config", ["--config", "nope.yaml"], 2, ["config file not found"]),
]


@pytest.mark.parametrize("command", ["plan", "train"])
@pytest.mark.parametrize(("args", "code", "needles"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_one_line_no_run_dir(work, command, args, code, needles):
    _files(work)
    out = work / "run"
    r = invoke(command, *args, "--out", out)
    assert_clean_error(r, code, *needles)
    assert_nothing_written(work, out)
    # Same without --out: no default run dir either.
    r = invoke(command, *args)
    assert r.exit_code == code, r.output
    assert_nothing_written(work)


def test_data_error_output_is_only_the_error_line(work, monkeypatch):
    import datasets

    # As in a fresh `vramfit` process: progress bars on, unless vramfit turns them off.
    monkeypatch.delenv("HF_DATASETS_DISABLE_PROGRESS_BARS", raising=False)
    datasets.enable_progress_bars()
    _files(work)
    r = invoke("plan", "--data", "cols.jsonl", "--out", work / "run")
    assert r.exit_code == 2
    assert r.output.strip().splitlines() == error_lines(r), r.output


def test_out_dir_already_holds_a_run(work):
    out = work / "run"
    assert invoke("plan", "--out", out).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    # plan never reuses a run dir; train continues the same run but refuses a different one.
    for cmd, msg in (("plan", "already holds a run"), ("train", "holds a different run (differs in lora.r)")):
        r = invoke(cmd, "--out", out, "--set", "lora.r=2")
        assert_clean_error(r, 2, msg, "--resume")
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p for p in work.iterdir() if ".tmp" in p.name] == []


def test_out_dir_holding_other_files(work):
    out = work / "mine"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert_clean_error(invoke("plan", "--out", out), 2, "already holds files")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_budget_too_small_for_7b(work, qwen7b_dir):
    out = work / "run"
    r = invoke("plan", "--model", qwen7b_dir, "--preset", "24gb", "--budget", "8", "--out", out)
    line = assert_clean_error(r, 3, "exceeds the 8 GiB budget")
    hint = line.split("(hint: ", 1)[1]
    # The hint says what would fit: a change with its predicted size, or the budget needed.
    assert any(s in hint for s in ("data.seq_len=", "method=qlora", "at least")), hint
    assert "GiB" in hint
    assert_nothing_written(work, out)
    r = invoke("train", "--model", qwen7b_dir, "--preset", "24gb", "--budget", "8", "--out", out)
    assert_clean_error(r, 3, "exceeds the 8 GiB budget")
    assert_nothing_written(work, out)


def test_budget_hint_seq_len(work):
    # The tiny model at seq 8192, micro-batch 64 needs ~3 GiB on CPU; a shorter sequence fits 1 GiB.
    r = invoke("plan", "--budget", "1", "--set", "data.seq_len=8192", "--set", "train.micro_batch=64")
    line = assert_clean_error(r, 3, "exceeds the 1 GiB budget")
    assert "data.seq_len=" in line


def test_qlora_on_cpu_refused(work, qwen7b_dir):
    for args in (["--model", qwen7b_dir, "--preset", "8gb"], ["--set", "method=qlora"]):
        r = invoke("plan", *args, "--out", work / "run")
        assert_clean_error(r, 3, "qlora needs an NVIDIA GPU")
        assert_nothing_written(work, work / "run")


def test_budget_must_be_positive(work):
    r = invoke("plan", "--budget", "0")
    assert r.exit_code == 2
    assert "Traceback" not in r.output and "--budget" in r.output
    assert_nothing_written(work)


def test_resume_without_out(work):
    assert_clean_error(invoke("train", "--resume"), 2, "--resume needs --out")


def test_resume_on_non_run(work):
    (work / "x").mkdir()
    assert_clean_error(invoke("train", "--resume", "--out", work / "x"), 2, "not a vramfit run directory")
    assert list((work / "x").iterdir()) == []


def test_merge_not_a_run(work):
    (work / "x").mkdir()
    assert_clean_error(invoke("merge", work / "x"), 2, "not a vramfit run directory")
    assert list((work / "x").iterdir()) == []


def test_merge_missing_dir(work):
    assert_clean_error(invoke("merge", work / "nope"), 2, "not a vramfit run directory")


def test_merge_before_training(work):
    out = work / "run"
    assert invoke("train", "--dry-run", "--out", out).exit_code == 0
    line = assert_clean_error(invoke("merge", out), 2, "no trained adapter")
    assert "vramfit train --resume --out" in line
    assert not (out / "merged").exists()


def test_merge_full_finetune_run_refused(work):
    out = work / "run"
    assert invoke("plan", "--set", "method=full", "--out", out).exit_code == 0
    assert_clean_error(invoke("merge", out), 2, "full fine-tuning run")


def test_debug_env_shows_traceback(work, monkeypatch):
    monkeypatch.setenv("VRAMFIT_DEBUG", "1")
    r = invoke("plan", "--preset", "8bg")
    assert r.exit_code == 2
    assert "Traceback" in r.output and "error: unknown preset" in r.output


def test_internal_error_is_one_line(work, monkeypatch):
    import vramfit.plan as plan_mod

    def bug(*a, **k):
        raise KeyError("oops")

    monkeypatch.setattr(plan_mod, "build_plan", bug)
    r = invoke("plan", "--out", work / "run")
    assert r.exit_code == 1
    assert "Traceback" not in r.output
    errs = error_lines(r)
    assert len(errs) == 1 and "internal error: KeyError" in errs[0] and "VRAMFIT_DEBUG=1" in errs[0]
    assert_nothing_written(work, work / "run")


@pytest.mark.parametrize("preset", ["zero3-offload", "multi-gpu"])
def test_deepspeed_preset_refused_without_gpu(work, preset):
    r = invoke("plan", "--preset", preset, "--out", work / "run")
    assert r.exit_code in (2, 3), r.output
    assert_clean_error(r, r.exit_code, "GPU")
    assert_nothing_written(work, work / "run")


@pytest.mark.parametrize("marker,code", [(True, 75), (False, 4)])
def test_launcher_exit_1_with_preemption_note_is_a_preemption(tmp_path, marker, code):
    """accelerate/torchrun exit 1 when their ranks exit 75: the trainer's preempted.json
    note makes `vramfit train` still exit 75 (and only then)."""
    args = [vramfit_exe(), "train", "--out", "r", "--set", "train.max_steps=2"]
    env = subprocess_env()
    first = subprocess.run([*args, "--dry-run"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    run_dir = tmp_path / "r"
    note = f"echo '{{\"step\": 1}}' > {run_dir}/preempted.json; " if marker else ""
    (run_dir / "launch.sh").write_text(f"#!/usr/bin/env bash\n{note}exit 1\n")  # a multi-rank launcher's exit
    r = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == code, r.stderr
    assert "Traceback" not in r.stderr


def test_plan_auto_with_a_budget_plans_for_that_card_without_a_gpu_here(work):
    # Planning before renting: no GPU here, --budget names the card.
    r = invoke("plan", "--preset", "auto", "--budget", 8, "--out", work / "card")
    assert r.exit_code == 0, r.output
    assert "1 GPU bfloat16" in r.output and "of 8 GiB (--budget): fits" in r.output
    assert "planned for a GPU of 8 GiB: this machine has none" in r.output
    plan = yaml.safe_load((work / "card" / "plan.yaml").read_text())
    assert plan["device"] == "cuda" and plan["config"]["budget_gib"] == 8.0
    # Training it here is refused up front, with the run directory kept as it was.
    before = sorted(p.name for p in (work / "card").iterdir())
    assert_clean_error(invoke("train", "--resume", "--out", work / "card"), 2, "was planned for a GPU, and this machine has none")
    assert sorted(p.name for p in (work / "card").iterdir()) == before
    # `vramfit train --preset auto` still refuses here: it would train at once.
    assert_clean_error(invoke("train", "--preset", "auto", "--budget", 8, "--out", work / "t"), 3, "no NVIDIA GPU was found")
    assert not (work / "t").exists()
    # Without --budget there is no card to plan for.
    assert_clean_error(invoke("plan", "--preset", "auto", "--out", work / "n"), 3, "no NVIDIA GPU was found")


@pytest.mark.parametrize("argv, needle, where", [
    (["merge"], "Missing argument 'run_dir'", "vramfit merge -h"),
    (["plan", "--gpu-name", "x"], "No such option: --gpu-name", "vramfit plan -h"),
    (["plan", "--budget", "abc"], "Invalid value for '--budget'", "vramfit plan -h"),
    (["nosuch"], "No such command 'nosuch'", "vramfit -h"),
])  # fmt: skip
def test_parser_errors_are_one_line_exit_2(capsys, argv, needle, where):
    """Typer's own usage errors (its framed box of several lines) come out as one line."""
    from vramfit.cli import main

    assert main(argv) == 2
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err.splitlines() == [f"error: {out.err.split('error: ', 1)[1].strip()}"]
    assert needle in out.err and f"(hint: `{where}` lists the options)" in out.err


def test_bare_command_prints_its_help_and_exits_2(capsys):
    from vramfit.cli import main

    assert main([]) == 2
    assert "Commands" in capsys.readouterr().out
    assert main(["presets", "show", "8gb"]) == 0  # and a good command still runs
