"""Issue 5 on CPU: launch flags rendered into launch.sh, and the distributed/offload
combinations refused before launch (docs/distributed.md).

Nothing here runs on a GPU or starts more than one process: these tests prove what is
rendered and what is refused, not that a multi-GPU run trains.
"""

from __future__ import annotations

import dataclasses
import os
import stat
import subprocess
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from conftest import QWEN7B_CONFIG
from vramfit.cli import app
from vramfit.config import RunConfig
from vramfit.distributed import HOST_RAM_USABLE, OFFLOAD_OPTIMIZER_BYTES, offloaded_host_bytes
from vramfit.embedded import tiny_config
from vramfit.errors import ConfigError, FitError
from vramfit.hardware import GIB, fake_facts
from vramfit.model_shape import shape_from_config
from vramfit.plan import build_plan
from vramfit.presets import resolve_layers
from vramfit.render import bnb_config

runner = CliRunner()
QWEN7B = shape_from_config(QWEN7B_CONFIG)
TINY = shape_from_config(tiny_config())


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_error_line(r, code: int, *needles: str) -> str:
    assert r.exit_code == code, r.output
    assert "Traceback" not in r.output and "internal error" not in r.output, r.output
    errs = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert len(errs) == 1, r.output
    assert "(hint: " in errs[0], errs[0]
    for n in needles:
        assert n in errs[0], errs[0]
    return errs[0]


def plan_for(sets: list[str], facts=None, shape=QWEN7B, preset=None):
    r = resolve_layers(preset, set_items=sets)
    return build_plan(r.config, shape, facts or fake_facts(80, count=8), r.sources, preset)


@pytest.fixture
def work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def fake_python(tmp_path: Path) -> Path:
    """A stand-in interpreter that prints its argv, one ARG line each."""
    script = tmp_path / "fakepy"
    script.write_text('#!/usr/bin/env bash\nfor a in "$@"; do echo "ARG $a"; done\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def launch_args(run_dir: Path, tmp_path: Path, **env) -> list[str]:
    base = {k: v for k, v in os.environ.items() if k != "NODE_RANK"}
    out = subprocess.run(
        ["bash", str(run_dir / "launch.sh")], env={**base, "PYTHON": str(fake_python(tmp_path)), **env},
        capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return [line[4:] for line in out.stdout.splitlines() if line.startswith("ARG ")]


def opt(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


# ---------------------------------------------------------------- launch flags


FLAGS = ["--gpus", "4", "--nodes", "2", "--node-rank", "1", "--master-addr", "10.0.0.7", "--master-port", "6001"]


def test_launch_flags_layer_as_flag_and_render_into_launch_sh(work, no_gpu):
    r = invoke("plan", *FLAGS, "--out", "run")
    assert r.exit_code == 0, r.output
    doc = yaml.safe_load((work / "run" / "plan.yaml").read_text())
    assert doc["config"]["launch"] | {"env": None} == {
        "gpus": 4, "nodes": 2, "node_rank": 1, "master_addr": "10.0.0.7", "master_port": 6001, "env": None,
    }  # fmt: skip
    for k in ("gpus", "nodes", "node_rank", "master_addr", "master_port"):
        assert doc["sources"][f"launch.{k}"] == "flag"
    assert doc["world_size"] == 8
    # The script accelerate gets: 8 processes over 2 machines, this one rank 1 by default.
    args = launch_args(work / "run", work)
    assert args[:2] == ["-m", "vramfit.launcher"]
    assert opt(args, "--num_processes") == "8" and opt(args, "--num_machines") == "2"
    assert opt(args, "--main_process_ip") == "10.0.0.7" and opt(args, "--main_process_port") == "6001"
    assert opt(args, "--machine_rank") == "1"
    # One run directory serves every node: NODE_RANK overrides the planned rank.
    assert opt(launch_args(work / "run", work, NODE_RANK="0"), "--machine_rank") == "0"


def test_set_beats_launch_flags(work, no_gpu):
    # Layering: flags < --set, as for --budget.
    r = invoke("plan", "--gpus", "4", "--set", "launch.gpus=3", "--out", "run")
    assert r.exit_code == 0, r.output
    doc = yaml.safe_load((work / "run" / "plan.yaml").read_text())
    assert doc["config"]["launch"]["gpus"] == 3 and doc["sources"]["launch.gpus"] == "--set"


BAD_FLAGS = [
    (["--gpus", "0"], "--gpus must be a whole number 1 or more, got '0'"),
    (["--gpus", "two"], "--gpus must be a whole number"),
    (["--gpus", "1.5"], "--gpus must be a whole number"),
    (["--nodes", "0"], "--nodes must be a whole number 1 or more"),
    (["--node-rank", "-1"], "--node-rank must be a whole number 0 or more"),
    (["--master-port", "0"], "--master-port must be a whole number from 1 to 65535"),
    (["--master-port", "65536"], "--master-port must be a whole number from 1 to 65535"),
    (["--master-addr", ""], "--master-addr must be a host name or IP address"),
    (["--master-addr", "10.0.0.1 10.0.0.2"], "--master-addr must be a host name or IP address"),
    (["--nodes", "2", "--node-rank", "2", "--master-addr", "h0"], "launch.node_rank 2 must be below launch.nodes 2"),
    (["--set", "launch.master_addr="], "launch.master_addr"),
]


@pytest.mark.parametrize("command", ["plan", "train"])
@pytest.mark.parametrize(("args", "needle"), BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_bad_launch_flag_is_one_line_exit_2(work, no_gpu, command, args, needle):
    one_error_line(invoke(command, *args, "--out", "run"), 2, needle)
    assert list(work.iterdir()) == []  # no run directory, no temporary


def test_every_node_runs_the_same_train_command_on_one_run_dir(work, no_gpu, monkeypatch):
    """Node 0 writes the run dir; node 1 runs the same command with --node-rank 1 on it
    (shared storage): the same run, continued, with NODE_RANK=1 reaching launch.sh."""
    import vramfit.launch as launch

    calls = []
    monkeypatch.setattr(launch, "execute", lambda script, extra=None, env=None: calls.append((extra, env)) or 0)
    common = ["--nodes", "2", "--master-addr", "10.0.0.7", "--out", "run"]
    assert invoke("train", *common, "--node-rank", "0").exit_code == 0
    before = (work / "run" / "plan.yaml").read_bytes()
    r = invoke("train", *common, "--node-rank", "1")
    assert r.exit_code == 0, r.output
    assert "holds this same run" in r.output
    assert calls == [([], {"NODE_RANK": "0"}), (["--resume"], {"NODE_RANK": "1"})]
    assert (work / "run" / "plan.yaml").read_bytes() == before  # never rewritten
    # Any other difference is still a different run.
    one_error_line(invoke("train", *common, "--node-rank", "1", "--gpus", "2"), 2, "differs in launch.gpus")


def test_node_rank_precedence_flag_then_env_then_plan(work, no_gpu, monkeypatch):
    import vramfit.launch as launch

    calls = []
    monkeypatch.setattr(launch, "execute", lambda script, extra=None, env=None: calls.append(env) or 0)
    monkeypatch.setenv("NODE_RANK", "1")
    common = ["--nodes", "2", "--master-addr", "h0"]
    assert invoke("train", *common, "--out", "a").exit_code == 0  # exported NODE_RANK kept: nothing added
    assert invoke("train", *common, "--node-rank", "0", "--out", "b").exit_code == 0  # the flag wins
    monkeypatch.delenv("NODE_RANK")
    assert invoke("train", *common, "--out", "c").exit_code == 0  # neither: the planned rank
    assert calls == [{}, {"NODE_RANK": "0"}, {"NODE_RANK": "0"}]


def test_resume_honours_node_rank_and_checks_it(work, no_gpu, monkeypatch):
    import vramfit.launch as launch

    calls = []
    monkeypatch.setattr(launch, "execute", lambda script, extra=None, env=None: calls.append(env) or 0)
    assert invoke("plan", "--nodes", "2", "--master-addr", "h0", "--out", "run").exit_code == 0
    r = invoke("train", "--resume", "--out", "run", "--node-rank", "1")
    assert r.exit_code == 0, r.output
    assert "other options are ignored" not in r.output
    assert calls == [{"NODE_RANK": "1"}]
    one_error_line(invoke("train", "--resume", "--out", "run", "--node-rank", "2"), 2, "below the run's launch.nodes 2")


def test_gpus_above_detected_is_a_note():
    plan = plan_for(["launch.gpus=4"], facts=fake_facts(80, count=2))
    assert any("asks for 4 GPUs per node but 2 were detected" in n for n in plan.notes)


def test_mixed_gpu_sizes_plan_for_the_smallest():
    big = fake_facts(80, count=2, name="NVIDIA H100 80GB HBM3")
    small = fake_facts(24, name="NVIDIA L4").gpus[0]
    facts = dataclasses.replace(big, gpus=(big.gpus[0], dataclasses.replace(small, index=1)))
    plan = plan_for(["launch.gpus=2"], facts=facts)
    assert plan.budget_gib == pytest.approx(24.0)
    assert plan.budget_source == "smallest detected GPU (NVIDIA L4)"  # not GPU 0's name
    assert any("GPUs differ in size (24, 80 GiB): planned for the smallest, 24 GiB" in n for n in plan.notes)
    # Same size: no note.
    assert not any("differ in size" in n for n in plan_for(["launch.gpus=2"], facts=big).notes)


# ---------------------------------------------------------------- refusals


def test_multi_node_with_loopback_master_refused(work, no_gpu):
    for addr in ("127.0.0.1", "localhost"):
        with pytest.raises(ConfigError, match="cannot reach a loopback address"):
            plan_for(["launch.nodes=2", f"launch.master_addr={addr}"])
    plan_for(["launch.nodes=2", "launch.master_addr=10.0.0.1"])  # a real address plans
    plan_for(["launch.nodes=1"])  # one node: loopback is right
    one_error_line(invoke("plan", "--nodes", "2", "--out", "run"), 2, "loopback", "--master-addr")
    assert not (work / "run").exists()


def test_qlora_zero3_storage_is_the_compute_dtype():
    for facts, dtype in ((fake_facts(80, count=2), "bfloat16"), (fake_facts(16, count=2, cc=(7, 5)), "float16")):
        plan = plan_for(["method=qlora", "deepspeed.stage=3", "launch.gpus=2"], facts=facts)
        assert plan.dtype == dtype
        bnb = bnb_config(plan)
        assert bnb["bnb_4bit_quant_storage"] == bnb["bnb_4bit_compute_dtype"] == dtype
    # Without ZeRO-3 the storage stays packed uint8.
    assert bnb_config(plan_for(["method=qlora", "deepspeed.stage=2", "launch.gpus=2"]))["bnb_4bit_quant_storage"] == "uint8"


def test_qlora_8bit_zero3_refused():
    with pytest.raises(ConfigError, match="quant.bits 8 cannot be sharded by DeepSpeed ZeRO-3") as e:
        plan_for(["method=qlora", "quant.bits=8", "deepspeed.stage=3", "launch.gpus=2"])
    assert "quant.bits=4" in e.value.hint
    plan_for(["method=qlora", "quant.bits=8", "deepspeed.stage=2", "launch.gpus=2"])  # ZeRO-2 does not shard weights


def test_qlora_param_offload_refused():
    with pytest.raises(ConfigError, match="qlora cannot offload 4-bit parameters"):
        plan_for(["method=qlora", "deepspeed.stage=3", "deepspeed.offload_params=true"])


@pytest.mark.parametrize("optimizer", ["sgd", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"])
def test_optimizer_offload_with_non_adamw_refused(optimizer):
    with pytest.raises(ConfigError, match=f"replaces train.optimizer {optimizer} with DeepSpeed's CPU Adam"):
        plan_for(["deepspeed.stage=2", "deepspeed.offload_optimizer=true", f"train.optimizer={optimizer}"])
    plan_for(["deepspeed.stage=2", f"train.optimizer={optimizer}", "launch.gpus=2"])  # no offload: kept


@pytest.mark.parametrize("optimizer", ["adamw_torch", "adamw_torch_fused"])
def test_optimizer_offload_with_adamw_plans(optimizer):
    plan_for(["deepspeed.stage=2", "deepspeed.offload_optimizer=true", f"train.optimizer={optimizer}"])


def test_zero_on_one_gpu_without_offload_is_a_note():
    def zero_note(sets):
        return [n for n in plan_for(sets, facts=fake_facts(80)).notes if "shards nothing" in n]

    assert zero_note(["deepspeed.stage=2"]) and zero_note(["deepspeed.stage=3"])
    assert not zero_note(["deepspeed.stage=2", "launch.gpus=2"])
    assert not zero_note(["deepspeed.stage=2", "launch.nodes=2", "launch.master_addr=h0"])
    assert not zero_note(["deepspeed.stage=2", "deepspeed.offload_optimizer=true"])
    assert not zero_note(["deepspeed.stage=3", "deepspeed.offload_params=true"])
    assert not zero_note([])


def test_offloaded_host_bytes_arithmetic():
    cfg = RunConfig.model_validate({"method": "full", "deepspeed": {"stage": 3, "offload_optimizer": True, "offload_params": True}})
    n = QWEN7B.total_params
    assert OFFLOAD_OPTIMIZER_BYTES == 16  # fp32 master 4 + Adam m, v 8 + fp32 gradient 4
    assert offloaded_host_bytes(QWEN7B, cfg, "bfloat16") == 16 * n + 2 * n
    assert offloaded_host_bytes(QWEN7B, cfg, "float32") == 16 * n + 4 * n
    two = cfg.model_copy(update={"launch": cfg.launch.model_copy(update={"nodes": 2, "master_addr": "h0"})})
    assert offloaded_host_bytes(QWEN7B, two, "bfloat16") == (16 * n + 2 * n) / 2  # each node holds its ranks' partitions
    lora = RunConfig.model_validate({"deepspeed": {"stage": 2, "offload_optimizer": True}})
    assert 0 < offloaded_host_bytes(QWEN7B, lora, "bfloat16") < 16 * 50e6  # adapters only: small
    assert offloaded_host_bytes(QWEN7B, RunConfig.model_validate({"deepspeed": {"stage": 3}}), "bfloat16") == 0


def test_offload_needs_host_ram():
    # Full fine-tuning of a 7.6B model with ZeRO-Offload: ~16 bytes x 7.6e9 = ~113 GiB of host RAM.
    sets = ["method=full", "deepspeed.stage=2", "deepspeed.offload_optimizer=true", "launch.gpus=8"]
    need = 16 * QWEN7B.total_params / GIB
    assert 100 < need < 120
    with pytest.raises(FitError, match=rf"needs about {need:.1f} GiB of host RAM per node, and this machine has 64.0 GiB") as e:
        plan_for(sets, facts=fake_facts(80, count=8, host_ram_gib=64))
    assert "--nodes" in e.value.hint
    # Just under and just over the usable share of RAM.
    plan_for(sets, facts=fake_facts(80, count=8, host_ram_gib=need / HOST_RAM_USABLE * 1.01))
    with pytest.raises(FitError):
        plan_for(sets, facts=fake_facts(80, count=8, host_ram_gib=need / HOST_RAM_USABLE * 0.99))
    # Two nodes each hold half.
    plan_for([*sets, "launch.nodes=2", "launch.master_addr=h0"], facts=fake_facts(80, count=8, host_ram_gib=64))
    # Parameter offload adds the 16-bit weights.
    p3 = ["method=full", "deepspeed.stage=3", "deepspeed.offload_optimizer=true", "deepspeed.offload_params=true", "launch.gpus=8"]
    with pytest.raises(FitError, match="optimizer state and parameters"):
        plan_for(p3, facts=fake_facts(80, count=8, host_ram_gib=need / HOST_RAM_USABLE * 1.01))


def test_offloaded_activations_count_in_the_host_ram_check(no_gpu_facts):
    sets = ["method=qlora", "data.seq_len=32768", "train.micro_batch=4", "train.offload_activations=true", "launch.gpus=8"]
    r = resolve_layers(None, set_items=sets)
    # 8 processes x 28 layers x 4 x 32768 tokens x 3584 x 2 bytes (896 MiB, pinned: 1 GiB each).
    assert offloaded_host_bytes(QWEN7B, r.config, "bfloat16") == 8 * 28 * GIB
    with pytest.raises(FitError, match=r"offloading activations needs about 224.0 GiB of host RAM per node") as e:
        plan_for(sets, facts=fake_facts(80, count=8, host_ram_gib=128))
    assert "data.seq_len" in e.value.hint and "--nodes" not in e.value.hint  # nodes don't share activations
    plan = plan_for(sets, facts=fake_facts(80, count=8, host_ram_gib=256))
    assert any("keeps about 224.0 GiB of activations in pinned host RAM per node" in n for n in plan.notes)
    # With ZeRO offload too, both count: RAM enough for the activations alone is too little.
    just_enough = fake_facts(80, count=8, host_ram_gib=224.01 / HOST_RAM_USABLE)
    plan_for(sets, facts=just_enough)
    zero = [*sets, "method=lora", "deepspeed.stage=2", "deepspeed.offload_optimizer=true"]
    with pytest.raises(FitError, match="offloading optimizer state and activations"):
        plan_for(zero, facts=just_enough)
    # On a CPU run the activations are in host RAM anyway: a note, no check.
    plan = build_plan(RunConfig.model_validate({"train": {"offload_activations": True}}), TINY, no_gpu_facts)
    assert any("train.offload_activations on a CPU run saves nothing" in n for n in plan.notes)


def test_offload_above_available_ram_is_a_note():
    sets = ["method=full", "deepspeed.stage=2", "deepspeed.offload_optimizer=true", "launch.gpus=8"]
    facts = fake_facts(80, count=8, host_ram_gib=256)
    facts = dataclasses.replace(facts, host_ram_available_bytes=50 * GIB)
    plan = plan_for(sets, facts=facts)
    assert any("only 50.0 GiB is available now" in n for n in plan.notes)


def test_offload_refusal_through_cli_is_exit_3(work, monkeypatch):
    """On a (fake) GPU machine whose host RAM is too small for the embedded model's offloaded
    state: the one-line FitError, exit 3, and no run directory."""
    import vramfit.hardware as hw

    monkeypatch.setattr(hw, "detect", lambda nvml=None: fake_facts(80, count=2, host_ram_gib=0.001))
    sets = ["--set", "method=full", "--set", "deepspeed.stage=2", "--set", "deepspeed.offload_optimizer=true"]
    one_error_line(invoke("plan", "--preset", "24gb", "--gpus", "2", *sets, "--out", "run"), 3, "host RAM per node")
    assert not (work / "run").exists()
    r = invoke("plan", "--preset", "24gb", "--set", "deepspeed.stage=2", "--out", "run")
    assert r.exit_code == 0, r.output
    assert "note: ZeRO-2 on one GPU shards nothing" in r.output


def test_qlora_under_zero3_says_its_prediction_rests_on_one_run():
    # The gather stream's cache (memory.ZERO3_QLORA_GATHER_SLACK_HEADS) is taken from the one
    # 2-GPU run it then predicts: the plan says so, with that run's figures.
    plan = plan_for(["method=qlora", "deepspeed.stage=3", "launch.gpus=2"])
    notes = plan.notes
    assert any("QLoRA under ZeRO-3" in n and "calibrated on one run" in n and "13.9" in n for n in notes)
    assert not any("QLoRA under ZeRO-3" in n for n in plan_for(["method=qlora", "deepspeed.stage=2", "launch.gpus=2"]).notes)


def test_fused_loss_renders_only_the_liger_loss(work):
    from vramfit.render import training_args

    plan = plan_for(["kernels.fused_loss=true"], facts=fake_facts(24))
    args = training_args(plan)
    assert args["use_liger_kernel"] is True
    assert args["liger_kernel_config"] == {
        "fused_linear_cross_entropy": True, "cross_entropy": False, "rms_norm": False, "swiglu": False, "rope": False,
    }  # fmt: skip
    assert "use_liger_kernel" not in training_args(plan_for([], facts=fake_facts(24)))


def test_liger_ops_render_norm_swiglu_and_rope_and_leave_the_swiglu_to_the_tiled_mlp(work):
    from vramfit.render import training_args

    ops = training_args(plan_for(["kernels.liger_ops=true"], facts=fake_facts(24)))
    assert ops["use_liger_kernel"] is True
    assert ops["liger_kernel_config"] == {
        "fused_linear_cross_entropy": False, "cross_entropy": False, "rms_norm": True, "swiglu": True, "rope": True,
    }  # fmt: skip
    both = training_args(plan_for(["kernels.liger_ops=true", "kernels.fused_loss=true", "kernels.tiled_mlp=true"], facts=fake_facts(24)))
    assert both["liger_kernel_config"] == {
        "fused_linear_cross_entropy": True, "cross_entropy": False, "rms_norm": True, "swiglu": False, "rope": True,
    }  # fmt: skip


def test_liger_ops_refused_without_gpu_and_for_unsupported_architectures(no_gpu_facts):
    with pytest.raises(FitError, match="liger_ops needs an NVIDIA GPU"):
        plan_for(["kernels.liger_ops=true"], facts=no_gpu_facts)
    with pytest.raises(ConfigError, match="no fused ops for"):
        plan_for(["kernels.liger_ops=true"], shape=dataclasses.replace(QWEN7B, model_type="gpt2"), facts=fake_facts(24))


def test_fused_loss_refused_without_gpu_and_for_unsupported_architectures(no_gpu_facts):
    with pytest.raises(FitError, match="fused_loss needs an NVIDIA GPU"):
        plan_for(["kernels.fused_loss=true"], facts=no_gpu_facts)
    with pytest.raises(ConfigError, match="no fused loss for"):
        plan_for(["kernels.fused_loss=true"], shape=dataclasses.replace(QWEN7B, model_type="gpt2"), facts=fake_facts(24))


def test_parameter_offload_carries_no_under_prediction_note_any_more():
    # Session 8's backward terms predict the one offload run (5.39 GiB measured) within 5%
    # (tests/test_memory.py): the plan no longer warns of an under-prediction there.
    plan = plan_for(["deepspeed.stage=3", "deepspeed.offload_params=true", "deepspeed.offload_optimizer=true", "launch.gpus=1"])
    assert not any("under-predicted" in n for n in plan.notes)


FAKE_LAUNCHER = r'''
import os, signal, subprocess, sys, time
out = sys.argv[1]
signal.signal(signal.SIGTERM, lambda *a: open(os.path.join(out, "launcher-got-sigterm"), "w").close())
child = (
    "import os, signal, sys, time\n"
    "def stop(*a):\n"
    "    open(os.path.join(sys.argv[1], 'rank-%d-got-sigterm' % os.getpid()), 'w').close(); sys.exit(75)\n"
    "signal.signal(signal.SIGTERM, stop)\n"
    "open(os.path.join(sys.argv[1], 'rank-%d-ready' % os.getpid()), 'w').close()\n"
    "time.sleep(60)\n"
)
ranks = [subprocess.Popen([sys.executable, "-c", child, out]) for _ in range(2)]
codes = [r.wait() for r in ranks]
sys.exit(1 if any(codes) else 0)  # as torch's elastic agent: any failed rank fails the launch
'''


def test_sigterm_under_a_launcher_goes_to_the_ranks_not_the_launcher(tmp_path):
    """torch's elastic agent kills its ranks 30 s after its own SIGTERM (torch 2.11), less than
    a ZeRO checkpoint takes: `vramfit train` must signal the ranks themselves."""
    import signal
    import sys
    import time

    (tmp_path / "launcher.py").write_text(FAKE_LAUNCHER)
    script = tmp_path / "launch.sh"
    # The marker execute() looks for: launch.sh runs the launcher (vramfit.launcher).
    script.write_text(f"# python -m vramfit.launcher ...\nexec {sys.executable} {tmp_path / 'launcher.py'} {tmp_path}\n")
    driver = f"import sys; from vramfit.launch import execute; sys.exit(execute(__import__('pathlib').Path({str(script)!r})))"
    proc = subprocess.Popen([sys.executable, "-c", driver])
    deadline = time.time() + 30
    while len(list(tmp_path.glob("rank-*-ready"))) < 2 and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 1  # the launcher's code; the CLI turns it into 75 via preempted.json
    assert len(list(tmp_path.glob("rank-*-got-sigterm"))) == 2
    assert not (tmp_path / "launcher-got-sigterm").exists()


def test_single_process_launch_sees_one_gpu(tmp_path):
    """On a machine with several GPUs, a one-process run must not be spread over all of them
    by the Trainer's DataParallel: launch.sh shows it the first visible GPU."""
    from vramfit.launch import launch_script

    text = launch_script(RunConfig(), python="/bin/echo")
    line = next(x for x in text.splitlines() if "CUDA_VISIBLE_DEVICES" in x)
    for visible, expected in ((None, "0"), ("3,5", "3"), ("2", "2")):
        env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
        if visible is not None:
            env["CUDA_VISIBLE_DEVICES"] = visible
        out = subprocess.run(["bash", "-c", line + '; printf %s "$CUDA_VISIBLE_DEVICES"'], env=env, capture_output=True, text=True)
        assert out.stdout == expected
    multi = launch_script(RunConfig.model_validate({"launch": {"gpus": 2}}), python="/bin/echo")
    assert "CUDA_VISIBLE_DEVICES" not in multi


@pytest.mark.parametrize(
    "preset, detected, told, expected",
    [("auto", 2, 1, ("| 2 GPUs", "| 1 GPU ")), ("multi-gpu", 4, 2, ("| 4 GPUs", "| 2 GPUs"))],
)
def test_preset_plans_for_every_detected_gpu_unless_told(work, monkeypatch, preset, detected, told, expected):
    """--preset auto and the multi-gpu preset take the detected GPU count; --gpus wins."""
    import vramfit.hardware as hw

    monkeypatch.setattr(hw, "detect", lambda nvml=None: fake_facts(80, count=detected))
    r = invoke("plan", "--preset", preset, "--out", "run")
    assert r.exit_code == 0, r.output
    assert expected[0] in r.output
    r = invoke("plan", "--preset", preset, "--gpus", str(told), "--out", "run-told")
    assert r.exit_code == 0, r.output
    assert expected[1] in r.output
