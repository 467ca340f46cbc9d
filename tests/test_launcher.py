"""vramfit.launcher: accelerate launch for runs of several ranks, ending with the first failed
rank's exit code and at most one line, instead of the elastic agent's traceback and exit 1.
accelerate's launch is replaced by a stand-in that fails as torch's elastic agent does
(ChildFailedError); the real launcher needs GPUs to start more than one rank."""

from __future__ import annotations

import pytest

from vramfit import launcher
from vramfit.render import BAD_INPUT_MARK


def failed(*ranks: tuple[int, int, int]):
    """ChildFailedError for (rank, exit code, when) triples; the earliest is the root cause."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    failures = {}
    for rank, code, when in ranks:
        f = ProcessFailure(local_rank=rank, pid=1000 + rank, exitcode=code, error_file="<N/A>")
        f.timestamp = when
        failures[rank] = f
    return ChildFailedError("vramfit.train", failures)


def run(monkeypatch, tmp_path, error, log: str | None = None, processes: int = 2) -> int:
    import accelerate.commands.launch as accel

    def launch(args):
        assert args.training_script == "vramfit.train" and args.module
        if error is not None:
            raise error

    monkeypatch.setattr(accel, "launch_command", launch)
    if log is not None:
        (tmp_path / "train.log").write_text(log)
    return launcher.main(["--num_processes", str(processes), "--module", "vramfit.train", str(tmp_path)])


def test_success_is_0(monkeypatch, tmp_path, capsys):
    assert run(monkeypatch, tmp_path, None) == 0
    assert capsys.readouterr().err == ""


def test_bad_input_is_exit_2_and_the_logged_line_once(monkeypatch, tmp_path, capsys):
    line = "error: the tokenizer in /m yields no tokens; hint: point --model at a full model directory"
    log = f"step 0\n{BAD_INPUT_MARK}\n{line}\n{BAD_INPUT_MARK}\n{line}\n"  # both ranks logged it
    assert run(monkeypatch, tmp_path, failed((0, 2, 5), (1, 2, 5)), log) == 2
    assert capsys.readouterr().err.splitlines() == [line]


def test_one_process_under_the_launcher_printed_its_own_bad_input(monkeypatch, tmp_path, capsys):
    # DeepSpeed on one GPU goes through the launcher with one rank, which prints its line itself.
    log = f"{BAD_INPUT_MARK}\nerror: bad\n"
    assert run(monkeypatch, tmp_path, failed((0, 2, 5)), log, processes=1) == 2
    assert capsys.readouterr().err == ""


def test_bad_input_without_its_log_line_still_says_which_rank(monkeypatch, tmp_path, capsys):
    assert run(monkeypatch, tmp_path, failed((1, 2, 5), (0, -15, 6))) == 2
    assert capsys.readouterr().err.splitlines() == ["error: rank 1 stopped on bad input"]


@pytest.mark.parametrize("code", [75, 5])  # preempted (checkpoint saved); OOM, which the CLI retries
def test_ranks_own_exit_codes_pass_through_silently(monkeypatch, tmp_path, capsys, code):
    assert run(monkeypatch, tmp_path, failed((0, code, 3), (1, code, 3))) == code
    assert capsys.readouterr().err == ""


def test_a_crash_is_the_first_ranks_code_with_one_line(monkeypatch, tmp_path, capsys):
    # Rank 1 crashed first; the agent then stopped rank 0 with SIGTERM.
    assert run(monkeypatch, tmp_path, failed((0, -15, 9), (1, 1, 4))) == 1
    assert capsys.readouterr().err.splitlines() == ["launcher: rank 1 failed first, with exit code 1; its output is above"]


def test_a_rank_killed_by_a_signal_is_128_plus_it(monkeypatch, tmp_path, capsys):
    assert run(monkeypatch, tmp_path, failed((0, -9, 2))) == 137
    assert "exit code 137 (signal SIGKILL)" in capsys.readouterr().err


def test_launch_sh_starts_ranks_through_it(no_gpu_facts):
    from vramfit.config import RunConfig
    from vramfit.launch import build_command

    cmd = build_command(RunConfig.model_validate({"launch": {"gpus": 2}}), "/run", "/py")
    assert cmd.argv[:3] == ["/py", "-m", "vramfit.launcher"]
    # accelerate's own parser takes every flag launch.sh passes.
    from accelerate.commands.launch import launch_command_parser

    args = launch_command_parser().parse_args(cmd.argv[3:])
    assert args.num_processes == 2 and args.module and args.training_script_args == ["/run"]


@pytest.mark.parametrize("world", ["1", "2"])
def test_ranks_log_bad_input_and_print_it_only_alone(monkeypatch, tmp_path, capsys, world):
    """train.main: bad input is logged for the launcher under several ranks, printed alone."""
    from vramfit import train
    from vramfit.errors import UsageError

    def bad(run_dir, resume):
        raise UsageError("the data has no rows", "point --data at a file with examples")

    monkeypatch.setattr(train, "run", bad)
    monkeypatch.setenv("WORLD_SIZE", world)
    assert train.main([str(tmp_path)]) == 2
    printed = capsys.readouterr().err.splitlines()
    logged = launcher.bad_input_line(tmp_path / "train.log")
    assert logged == "error: the data has no rows (hint: point --data at a file with examples)"
    assert printed == ([] if world == "2" else [logged])


def test_two_cpu_ranks_through_the_real_agent_stop_on_bad_input_with_one_line(tmp_path):
    """The real path: accelerate's launcher and torch's elastic agent start two ranks (on a
    CPU, accelerate needs --multi_gpu to use the agent at all; launch.sh leaves that to it on
    GPUs). Both meet the same bad input (a model directory without a tokenizer): one line,
    exit 2, no traceback and no agent log line."""
    import json
    import socket
    import subprocess
    import sys

    from conftest import subprocess_env
    from vramfit.embedded import tiny_config

    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(tiny_config()))
    run_dir = tmp_path / "run"
    plan = subprocess.run([sys.executable, "-m", "vramfit", "plan", "--model", str(model), "--set", "launch.gpus=2", "--out", str(run_dir)],
                          env=subprocess_env(), capture_output=True, text=True, timeout=120)  # fmt: skip
    assert plan.returncode == 0, plan.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [sys.executable, "-m", "vramfit.launcher", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--machine_rank", "0", "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
            "--mixed_precision", "no", "--dynamo_backend", "no", "--module", "vramfit.train", str(run_dir)]  # fmt: skip
    p = subprocess.run(argv, env=subprocess_env() | {"OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=180)
    assert p.returncode == 2, p.stdout + p.stderr
    lines = [x for x in p.stderr.splitlines() if x.strip() and not x.startswith(("*", "Setting OMP_NUM_THREADS"))]
    assert len(lines) == 1 and lines[0].startswith("error: the tokenizer loaded from"), p.stderr
    assert "Traceback" not in p.stdout + p.stderr
    assert (run_dir / "train.log").read_text().count("error: the tokenizer loaded from") == 2  # each rank logged it
