"""The run directory: rendered configs must be accepted by the real constructors.

Plans are built on fake hardware (no GPU needed) and rendered with write_run_dir;
then TrainingArguments, peft.LoraConfig, BitsAndBytesConfig and DeepSpeed's own
config parser are fed exactly what train.py would feed them.
"""

from __future__ import annotations

import gc
import json
import os
import stat
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from conftest import PRESET_NAMES, QWEN05_CONFIG
from vramfit.config import RunConfig
from vramfit.embedded import tiny_config
from vramfit.errors import UsageError
from vramfit.hardware import fake_facts
from vramfit.launch import build_command, launch_script, needs_launcher
from vramfit.model_shape import shape_from_config
from vramfit.plan import build_plan
from vramfit.presets import resolve_layers
from vramfit.render import read_plan, write_run_dir

QWEN05 = shape_from_config(QWEN05_CONFIG)
TINY = shape_from_config(tiny_config())


def make_plan(name: str, no_gpu_facts, set_items=None, facts=None):
    r = resolve_layers(name, set_items=set_items)
    if facts is None:
        if name == "cpu":
            facts = no_gpu_facts
        else:
            facts = fake_facts(80, count=max(r.config.launch.gpus, 1))
    shape = TINY if name == "cpu" else QWEN05
    return build_plan(r.config, shape, facts, r.sources, name)


def render(tmp_path, name, no_gpu_facts, set_items=None, facts=None) -> tuple[Path, object]:
    plan = make_plan(name, no_gpu_facts, set_items, facts)
    run_dir = write_run_dir(plan, tmp_path / f"run-{name}")
    return run_dir, plan


def load_json(path: Path):
    return json.loads(path.read_text())


def tmp_siblings(path: Path) -> list[str]:
    return [p.name for p in path.parent.iterdir() if ".tmp" in p.name]


@pytest.fixture
def bf16_ok(monkeypatch):
    """TrainingArguments refuses bf16 without a bf16 GPU: pretend there is one."""
    import transformers.training_args as ta

    monkeypatch.setattr(ta, "is_torch_bf16_gpu_available", lambda: True)


def training_arguments(run_dir: Path, plan):
    from transformers import TrainingArguments

    args = load_json(run_dir / "training_args.json")
    assert args["output_dir"] == "checkpoints"
    args["output_dir"] = str(run_dir / "checkpoints")  # as train.py does
    if args.get("deepspeed"):
        assert (run_dir / args["deepspeed"]).is_file()
        args["deepspeed"] = str(run_dir / args["deepspeed"])
    return TrainingArguments(**args), args


def cleanup_deepspeed():
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    gc.collect()


# ---------------------------------------------------------------- every preset


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_run_dir_files(tmp_path, name, no_gpu_facts):
    run_dir, plan = render(tmp_path, name, no_gpu_facts)
    files = {p.name for p in run_dir.iterdir()}
    assert {"plan.yaml", "training_args.json", "launch.sh"} <= files
    assert ("lora_config.json" in files) == plan.config.uses_adapter
    assert ("bnb_config.json" in files) == (plan.config.method == "qlora")
    assert ("deepspeed.json" in files) == bool(plan.config.deepspeed.stage)
    assert os.access(run_dir / "launch.sh", os.X_OK)
    assert tmp_siblings(run_dir) == []


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_training_args_accepted_by_transformers(tmp_path, name, no_gpu_facts, bf16_ok):
    run_dir, plan = render(tmp_path, name, no_gpu_facts)
    c = plan.config
    if c.deepspeed.stage:
        pytest.importorskip("deepspeed")
    try:
        ta, raw = training_arguments(run_dir, plan)
        assert ta.per_device_train_batch_size == c.train.micro_batch
        assert ta.gradient_accumulation_steps == c.train.grad_accum
        assert ta.learning_rate == pytest.approx(c.train.lr)
        assert ta.max_steps == c.train.max_steps
        assert ta.seed == c.train.seed
        assert ta.save_steps == c.train.save_steps
        assert str(ta.optim.value if hasattr(ta.optim, "value") else ta.optim) == c.train.optimizer
        assert ta.output_dir == str(run_dir / "checkpoints")
        assert raw["gradient_checkpointing"] == c.train.grad_ckpt
        # The Trainer's NaN filter reads the loss after every micro-batch: a wait on the GPU.
        assert ta.logging_nan_inf_filter is False
        if name == "cpu":
            assert raw["use_cpu"] is True and not ta.bf16 and not ta.fp16
        else:
            assert raw["use_cpu"] is False
            assert ta.bf16 is True and ta.fp16 is False  # fake card has compute 8.9
        assert (ta.deepspeed is not None) == bool(c.deepspeed.stage)
    finally:
        cleanup_deepspeed()


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_lora_config_accepted_by_peft(tmp_path, name, no_gpu_facts):
    import peft

    run_dir, plan = render(tmp_path, name, no_gpu_facts)
    if not plan.config.uses_adapter:
        assert not (run_dir / "lora_config.json").exists()
        return
    lc = peft.LoraConfig(**load_json(run_dir / "lora_config.json"))
    lo = plan.config.lora
    assert lc.r == lo.r and lc.lora_alpha == lo.alpha and lc.lora_dropout == lo.dropout
    expected = lo.target_modules if lo.target_modules == "all-linear" else set(lo.target_modules)
    assert lc.target_modules == expected
    assert str(lc.task_type.value if hasattr(lc.task_type, "value") else lc.task_type) == "CAUSAL_LM"


def bnb_from_file(path: Path):
    """Exactly the conversion train.load_model does."""
    import torch
    from transformers import BitsAndBytesConfig

    dt = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    bnb = load_json(path)
    for k in ("bnb_4bit_compute_dtype", "bnb_4bit_quant_storage"):
        if k in bnb and bnb[k] != "uint8":
            bnb[k] = dt[bnb[k]]
    return BitsAndBytesConfig(**bnb)


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_bnb_config_accepted_by_transformers(tmp_path, name, no_gpu_facts):
    import torch

    run_dir, plan = render(tmp_path, name, no_gpu_facts)
    if plan.config.method != "qlora":
        assert not (run_dir / "bnb_config.json").exists()
        return
    q = bnb_from_file(run_dir / "bnb_config.json")
    assert q.load_in_4bit and not q.load_in_8bit
    assert q.bnb_4bit_quant_type == plan.config.quant.quant_type
    assert q.bnb_4bit_use_double_quant == plan.config.quant.double_quant
    assert q.bnb_4bit_compute_dtype == torch.bfloat16


def test_bnb_8bit_and_zero3_storage(tmp_path, no_gpu_facts):
    import torch

    run_dir, _ = render(tmp_path, "8gb", no_gpu_facts, ["quant.bits=8"])
    q = bnb_from_file(run_dir / "bnb_config.json")
    assert q.load_in_8bit and not q.load_in_4bit
    # ZeRO-3 shards by dtype: 4-bit storage must be the compute dtype.
    run_dir, _ = render(tmp_path / "z3", "12gb", no_gpu_facts, ["deepspeed.stage=3"])
    q = bnb_from_file(run_dir / "bnb_config.json")
    assert q.bnb_4bit_quant_storage == torch.bfloat16
    # fp16 card (compute 7.5): compute dtype follows.
    run_dir, plan = render(tmp_path / "t4", "16gb", no_gpu_facts, facts=fake_facts(16, cc=(7, 5)))
    assert plan.dtype == "float16"
    q = bnb_from_file(run_dir / "bnb_config.json")
    assert q.bnb_4bit_compute_dtype == torch.float16


def test_fp16_card_training_args(tmp_path, no_gpu_facts, bf16_ok, monkeypatch):
    import transformers.training_args as ta_mod

    run_dir, plan = render(tmp_path, "24gb", no_gpu_facts, facts=fake_facts(24, cc=(7, 5)))
    raw = load_json(run_dir / "training_args.json")
    assert raw["fp16"] is True and raw["bf16"] is False
    # TrainingArguments checks fp16 against the device; on this CPU box only the
    # keyword set is testable, so check every key is a TrainingArguments field.
    import dataclasses

    fields = {f.name for f in dataclasses.fields(ta_mod.TrainingArguments)}
    assert set(raw) <= fields


# ---------------------------------------------------------------- DeepSpeed


DS_CASES = [
    ("multi-gpu", None, 2, False, False),
    ("zero3-offload", None, 3, True, True),
    ("24gb", ["deepspeed.stage=3"], 3, False, False),
    ("24gb", ["deepspeed.stage=2", "deepspeed.offload_optimizer=true"], 2, True, False),
    ("12gb", ["deepspeed.stage=3", "launch.gpus=2"], 3, False, False),
]


@pytest.mark.parametrize(("name", "sets", "stage", "off_opt", "off_param"), DS_CASES)
def test_deepspeed_json_parsed_by_deepspeed(tmp_path, name, sets, stage, off_opt, off_param, no_gpu_facts, bf16_ok, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.config import DeepSpeedConfig

    run_dir, plan = render(tmp_path, name, no_gpu_facts, sets)
    raw = load_json(run_dir / "deepspeed.json")
    zo = raw["zero_optimization"]
    assert zo["stage"] == stage
    assert ("offload_optimizer" in zo) == off_opt
    assert ("offload_param" in zo) == off_param
    try:
        # HF fills the "auto" values from TrainingArguments (process) and the model (finalize).
        ta, _ = training_arguments(run_dir, plan)
        hf = ta.hf_deepspeed_config
        hf.trainer_config_finalize(ta, SimpleNamespace(config=SimpleNamespace(hidden_size=QWEN05.hidden)), 100)
        filled = hf.config

        def autos(d, prefix=""):
            out = []
            for k, v in d.items():
                if isinstance(v, dict):
                    out += autos(v, f"{prefix}{k}.")
                elif v == "auto":
                    out.append(prefix + k)
            return out

        assert autos(filled) == []
        assert filled["bf16"]["enabled"] is True and filled["fp16"]["enabled"] is False
        assert filled["train_micro_batch_size_per_gpu"] == plan.config.train.micro_batch
        assert filled["gradient_accumulation_steps"] == plan.config.train.grad_accum
        ds = DeepSpeedConfig(json.loads(json.dumps(filled, default=float)))
        assert ds.zero_optimization_stage == stage
        assert ds.train_micro_batch_size_per_gpu == plan.config.train.micro_batch
        assert ds.gradient_accumulation_steps == plan.config.train.grad_accum
        assert (ds.zero_config.offload_optimizer is not None) == off_opt
        assert (ds.zero_config.offload_param is not None) == off_param
    finally:
        cleanup_deepspeed()


def test_deepspeed_stage0_writes_no_deepspeed(tmp_path, no_gpu_facts):
    run_dir, plan = render(tmp_path, "24gb", no_gpu_facts)
    assert not (run_dir / "deepspeed.json").exists()
    assert "deepspeed" not in load_json(run_dir / "training_args.json")


# ---------------------------------------------------------------- launch.sh


def test_launch_sh_single_process(tmp_path, no_gpu_facts):
    run_dir, plan = render(tmp_path, "cpu", no_gpu_facts)
    text = (run_dir / "launch.sh").read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text
    assert "export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True" in text
    assert "export TOKENIZERS_PARALLELISM=false" in text
    assert "export DS_ACCELERATOR=cpu" in text
    assert 'exec "$PYTHON" -m vramfit.train "$RUN_DIR" "$@"' in text
    assert "accelerate" not in text
    assert subprocess.run(["bash", "-n", str(run_dir / "launch.sh")]).returncode == 0


def test_launch_sh_gpu_has_no_cpu_accelerator(tmp_path, no_gpu_facts):
    run_dir, _ = render(tmp_path, "8gb", no_gpu_facts)
    text = (run_dir / "launch.sh").read_text()
    assert "DS_ACCELERATOR" not in text
    assert "-m vramfit.train" in text and "accelerate" not in text


def test_launch_sh_gpu_run_takes_one_cpu_thread(tmp_path, no_gpu_facts):
    # OMP_NUM_THREADS=1 where the CPU only drives the GPU (launch.cpu_threads_env).
    run_dir, _ = render(tmp_path, "8gb", no_gpu_facts)
    assert "export OMP_NUM_THREADS=1\n" in (run_dir / "launch.sh").read_text()
    cpu_dir, _ = render(tmp_path, "cpu", no_gpu_facts)
    assert "OMP_NUM_THREADS" not in (cpu_dir / "launch.sh").read_text()  # the CPU trains: all its cores


def test_launch_sh_keeps_cpu_threads_where_the_cpu_computes(tmp_path, no_gpu_facts):
    # DeepSpeed's CPU Adam (offload) and embedding lookups in host RAM run OpenMP/CPU work.
    run_dir, _ = render(tmp_path, "zero3-offload", no_gpu_facts)
    assert "OMP_NUM_THREADS" not in (run_dir / "launch.sh").read_text()
    from vramfit.launch import cpu_threads_env

    base = RunConfig.model_validate({"method": "qlora"})
    assert cpu_threads_env(base, "cuda") == {"OMP_NUM_THREADS": "1"}
    assert cpu_threads_env(base, "cpu") == {}
    assert cpu_threads_env(base.model_copy(update={"train": base.train.model_copy(update={"offload_embeddings": True})}), "cuda") == {}
    zero2 = RunConfig.model_validate({"deepspeed": {"stage": 2, "offload_optimizer": True}})
    assert cpu_threads_env(zero2, "cuda") == {}


def test_launch_sh_user_cpu_threads_win(tmp_path, no_gpu_facts):
    run_dir, _ = render(tmp_path, "8gb", no_gpu_facts, ["launch.env.OMP_NUM_THREADS=4"])
    text = (run_dir / "launch.sh").read_text()
    assert "export OMP_NUM_THREADS=4\n" in text
    assert text.count("OMP_NUM_THREADS") == 1


def test_launch_sh_multi_gpu(tmp_path, no_gpu_facts):
    run_dir, _ = render(tmp_path, "multi-gpu", no_gpu_facts, ["launch.gpus=4"])
    text = (run_dir / "launch.sh").read_text()
    assert "-m vramfit.launcher" in text
    assert "--num_processes 4 " in text
    assert "--num_machines 1 " in text
    assert "--module vramfit.train" in text
    assert "export PYTORCH_CUDA_ALLOC_CONF=" in text and "export TOKENIZERS_PARALLELISM=" in text
    assert subprocess.run(["bash", "-n", str(run_dir / "launch.sh")]).returncode == 0


def test_launch_sh_deepspeed_single_gpu_uses_launcher(tmp_path, no_gpu_facts):
    run_dir, _ = render(tmp_path, "zero3-offload", no_gpu_facts)
    text = (run_dir / "launch.sh").read_text()
    assert "-m vramfit.launcher" in text and "--num_processes 1 " in text


def test_launch_sh_multi_node(tmp_path, no_gpu_facts):
    sets = ["launch.gpus=4", "launch.nodes=2", "launch.master_addr=10.0.0.1", "launch.master_port=1234"]
    run_dir, _ = render(tmp_path, "multi-gpu", no_gpu_facts, sets)
    text = (run_dir / "launch.sh").read_text()
    assert "--num_processes 8 " in text and "--num_machines 2 " in text
    assert '--machine_rank "${NODE_RANK:-0}"' in text
    assert "NODE_RANK=k bash launch.sh" in text
    assert "--main_process_ip 10.0.0.1 --main_process_port 1234" in text


def fake_python(tmp_path: Path) -> Path:
    """A stand-in interpreter that records its argv and environment."""
    script = tmp_path / "fakepy"
    script.write_text(
        "#!/usr/bin/env bash\n"
        'for a in "$@"; do echo "ARG $a"; done\n'
        'echo "ENV PYTORCH_CUDA_ALLOC_CONF=$PYTORCH_CUDA_ALLOC_CONF"\n'
        'echo "ENV TOKENIZERS_PARALLELISM=$TOKENIZERS_PARALLELISM"\n'
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def test_launch_sh_runs_with_args_and_node_rank(tmp_path, no_gpu_facts):
    # A multi-node plan needs a reachable master address (a loopback one is refused).
    sets = ["launch.gpus=2", "launch.nodes=2", "launch.master_addr=10.0.0.1"]
    run_dir, _ = render(tmp_path, "multi-gpu", no_gpu_facts, sets)
    env = {**os.environ, "PYTHON": str(fake_python(tmp_path)), "NODE_RANK": "1", "PYTORCH_CUDA_ALLOC_CONF": "x"}
    out = subprocess.run(
        ["bash", str(run_dir / "launch.sh"), "--resume"], env=env, capture_output=True, text=True, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    args = [line[4:] for line in out.stdout.splitlines() if line.startswith("ARG ")]
    assert args[:2] == ["-m", "vramfit.launcher"]
    assert args[args.index("--machine_rank") + 1] == "1"
    assert args[args.index("--num_processes") + 1] == "4"
    assert args[-3:] == ["vramfit.train", str(run_dir), "--resume"]
    # The plan's env wins over the caller's shell.
    assert "ENV PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True" in out.stdout
    assert "ENV TOKENIZERS_PARALLELISM=false" in out.stdout


def test_launch_sh_single_process_runs(tmp_path, no_gpu_facts):
    run_dir, _ = render(tmp_path, "cpu", no_gpu_facts)
    env = {**os.environ, "PYTHON": str(fake_python(tmp_path))}
    out = subprocess.run(["bash", str(run_dir / "launch.sh")], env=env, capture_output=True, text=True, cwd="/")
    assert out.returncode == 0, out.stderr
    args = [line[4:] for line in out.stdout.splitlines() if line.startswith("ARG ")]
    assert args == ["-m", "vramfit.train", str(run_dir)]


def test_launch_sh_custom_env_quoted(tmp_path):
    cfg = RunConfig.model_validate({"launch": {"env": {"WEIRD": "a b'c$d", "OMP_NUM_THREADS": "2"}}})
    text = launch_script(cfg, python="/usr/bin/python3")
    assert "export WEIRD=" in text and "export OMP_NUM_THREADS=2" in text
    script = tmp_path / "l.sh"
    script.write_text(text.replace("exec ", 'echo "W=$WEIRD"; exit 0; exec '))
    out = subprocess.run(["bash", str(script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "W=a b'c$d"


# ---------------------------------------------------------------- build_command


def test_build_command_single():
    cfg = RunConfig()
    assert not needs_launcher(cfg)
    cmd = build_command(cfg, run_dir="/runs/x", python="/py")
    assert cmd.argv == ["/py", "-m", "vramfit.train", "/runs/x"]
    assert cmd.env == {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True", "TOKENIZERS_PARALLELISM": "false"}
    assert cmd.shell() == "/py -m vramfit.train /runs/x"


def test_build_command_multi_node():
    cfg = RunConfig.model_validate(
        {"launch": {"gpus": 8, "nodes": 3, "node_rank": 2, "master_addr": "host-0", "master_port": 6000}}
    )
    assert needs_launcher(cfg)
    cmd = build_command(cfg, run_dir="/r", python="/py")
    a = cmd.argv
    assert a[:3] == ["/py", "-m", "vramfit.launcher"]
    opts = dict(zip(a[3:-3:2], a[4:-3:2]))
    assert opts == {
        "--num_processes": "24",
        "--num_machines": "3",
        "--machine_rank": "2",
        "--main_process_ip": "host-0",
        "--main_process_port": "6000",
        "--mixed_precision": "no",
        "--dynamo_backend": "no",
    }
    assert a[-3:] == ["--module", "vramfit.train", "/r"]
    # In launch.sh the rank comes from NODE_RANK, defaulting to the planned one.
    assert "${NODE_RANK:-2}" in build_command(cfg).argv


def test_build_command_deepspeed_single_gpu():
    cfg = RunConfig.model_validate({"deepspeed": {"stage": 2}})
    cmd = build_command(cfg, run_dir="/r", python="/py")
    assert cmd.argv[2] == "vramfit.launcher"
    assert cmd.argv[cmd.argv.index("--num_processes") + 1] == "1"


def test_build_command_does_not_alias_config_env():
    cfg = RunConfig()
    cmd = build_command(cfg)
    cmd.env["X"] = "1"
    assert "X" not in cfg.launch.env


# ---------------------------------------------------------------- atomic run dir


def test_refuses_existing_non_empty_dir(tmp_path, no_gpu_facts):
    plan = make_plan("cpu", no_gpu_facts)
    out = write_run_dir(plan, tmp_path / "run")
    before = (out / "plan.yaml").read_bytes()
    with pytest.raises(UsageError, match="already holds a run") as e:
        write_run_dir(plan, out)
    assert "--resume" in e.value.hint
    assert (out / "plan.yaml").read_bytes() == before
    assert tmp_siblings(out) == []
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="already holds files"):
        write_run_dir(plan, other)
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]
    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(UsageError, match="is a file, not a run directory"):
        write_run_dir(plan, f)
    assert f.read_text() == "x"
    assert tmp_siblings(other) == []


def test_existing_empty_dir_is_used(tmp_path, no_gpu_facts):
    plan = make_plan("cpu", no_gpu_facts)
    (tmp_path / "run").mkdir()
    out = write_run_dir(plan, tmp_path / "run")
    assert (out / "plan.yaml").is_file()
    assert tmp_siblings(out) == []


def test_failure_leaves_nothing(tmp_path, no_gpu_facts, monkeypatch):
    import vramfit.render as render_mod

    plan = make_plan("cpu", no_gpu_facts)

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(render_mod, "launch_script", boom)
    with pytest.raises(UsageError, match="cannot write run directory"):
        write_run_dir(plan, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    assert list(tmp_path.iterdir()) == []

    def bug(*a, **k):
        raise RuntimeError("bug")

    monkeypatch.setattr(render_mod, "launch_script", bug)
    with pytest.raises(RuntimeError):
        write_run_dir(plan, tmp_path / "run")
    assert list(tmp_path.iterdir()) == []


def test_creates_parents(tmp_path, no_gpu_facts):
    plan = make_plan("cpu", no_gpu_facts)
    out = write_run_dir(plan, tmp_path / "a" / "b" / "run")
    assert out == (tmp_path / "a" / "b" / "run").resolve()
    assert (out / "launch.sh").is_file()


# ---------------------------------------------------------------- plan.yaml


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_plan_yaml_round_trips(tmp_path, name, no_gpu_facts):
    run_dir, plan = render(tmp_path, name, no_gpu_facts, ["data.path=some/data.jsonl"])
    doc = read_plan(run_dir)
    assert RunConfig.model_validate(doc["config"]) == plan.config
    assert doc["sources"] == plan.sources
    assert doc["sources"]["data.path"] == "--set"
    assert doc["preset"] == name
    assert doc["predicted_peak_gib"] == round(plan.breakdown.peak_gib, 3)
    assert doc["breakdown"] == plan.breakdown.gib()
    assert doc["device"] == plan.device and doc["dtype"] == plan.dtype
    assert doc["fits"] == plan.fits
    assert doc["shape"]["total_params"] == plan.shape.total_params
    assert doc["data_path"] == "some/data.jsonl"  # not a local file: kept as given
    assert doc["model_path"] == "embedded:tiny"
    # plan.yaml is plain YAML: safe_load reads every value.
    assert yaml.safe_load((run_dir / "plan.yaml").read_text()) == doc


def test_plan_yaml_resolves_local_paths(tmp_path, no_gpu_facts, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.jsonl").write_text('{"text": "x"}\n')
    run_dir, _ = render(tmp_path, "cpu", no_gpu_facts, ["data.path=d.jsonl"])
    assert read_plan(run_dir)["data_path"] == str(tmp_path / "d.jsonl")


def test_read_plan_rejects_non_run(tmp_path):
    with pytest.raises(UsageError, match="not a vramfit run directory"):
        read_plan(tmp_path)
    (tmp_path / "plan.yaml").write_text("- just a list\n")
    with pytest.raises(UsageError, match="not a vramfit plan"):
        read_plan(tmp_path)
    (tmp_path / "plan.yaml").write_text("config: [unclosed\n")
    with pytest.raises(UsageError, match="cannot read"):
        read_plan(tmp_path)


def test_a_run_planned_before_a_key_existed_is_still_the_same_run(no_gpu_facts):
    """A preempted run planned by an older vramfit lacks keys added since (kernels.fused_loss,
    data.packing): rerunning the same command must continue it, not refuse it as different."""
    from vramfit.render import plan_differences, plan_document

    plan = make_plan("24gb", no_gpu_facts)
    old = plan_document(plan)
    del old["config"]["kernels"]
    del old["config"]["data"]["packing"]
    assert plan_differences(old, plan) == []
    old["config"]["lora"]["r"] = plan.config.lora.r + 1
    assert plan_differences(old, plan) == ["lora.r"]
