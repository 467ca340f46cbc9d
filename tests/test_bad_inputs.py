"""A corpus of bad inputs, kept as data, run by one parametrized test.

Each case builds its input files in tmp_path, runs one command (in-process through
typer's CliRunner, or as a real `vramfit` subprocess where the child matters) and
checks the error contract: the expected non-zero exit code, exactly one
`error: ... (hint: ...)` line naming the problem, no traceback, and no user file
changed, deleted or created (no run directory, no `.tmp` leftovers).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
from typer.testing import CliRunner

from conftest import QWEN7B_CONFIG, describe_changes, snapshot, subprocess_env, vramfit_exe
from vramfit.cli import app

pytestmark = pytest.mark.usefixtures("no_gpu")

runner = CliRunner()
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


# ---------------------------------------------------------------- the case type


@dataclass(frozen=True)
class Case:
    id: str
    args: tuple[str, ...]  # the CLI args; "{base}" = the embedded model's directory
    code: int  # expected exit code (never 0)
    needle: str  # a substring of the one error line
    build: Callable[[Path], None] | None = None  # writes the input files into tmp_path
    needs: str | None = None  # "trained": copy the module's trained run to tmp_path/run
    via: str = "cli"  # "cli" (CliRunner) or "proc" (the installed executable)
    absent: tuple[str, ...] = ()  # paths (formatted like args) that must not exist afterwards
    marks: tuple = ()


# ---------------------------------------------------------------- input builders


def w(name: str, content: str | bytes) -> Callable[[Path], None]:
    def build(t: Path) -> None:
        p = t / name
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            p.write_bytes(content)
        else:
            p.write_text(content, encoding="utf-8")

    return build


def chain(*builders: Callable[[Path], None]) -> Callable[[Path], None]:
    def build(t: Path) -> None:
        for b in builders:
            b(t)

    return build


def jl(*rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


GOOD = {"instruction": "Add the numbers.", "input": "1 + 2", "output": "3"}
USER = {"role": "user", "content": "hi"}
BOT = {"role": "assistant", "content": "hello"}


def mkdir(name: str) -> Callable[[Path], None]:
    return lambda t: (t / name).mkdir(parents=True)


def parquet(name: str, rows: int) -> Callable[[Path], None]:
    def build(t: Path) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table({"instruction": ["a"] * rows, "output": ["b"] * rows},
                         schema=pa.schema([("instruction", pa.string()), ("output", pa.string())]))
        pq.write_table(table, t / name)

    return build


def unwritable_parent(t: Path) -> None:
    """`--out locked/run` where creating `run` must fail. Root ignores permission bits,
    so as root `locked` is a regular file (mkdir under it fails with ENOTDIR/EEXIST)."""
    if IS_ROOT:
        (t / "locked").write_text("not a directory\n")
    else:
        (t / "locked").mkdir()
        (t / "locked").chmod(0o500)


def model_dir(name: str, config: dict | str | None) -> Callable[[Path], None]:
    def build(t: Path) -> None:
        d = t / name
        d.mkdir()
        if config is not None:
            (d / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))

    return build


def dry_run(t: Path) -> None:
    r = runner.invoke(app, ["train", "--dry-run", "--preset", "cpu", "--out", str(t / "run")])
    assert r.exit_code == 0, r.output


def edit_adapter_config(**changes) -> Callable[[Path], None]:
    def build(t: Path) -> None:
        f = t / "run" / "adapter" / "adapter_config.json"
        cfg = json.loads(f.read_text())
        cfg.update(changes)
        f.write_text(json.dumps(cfg, indent=2))

    return build


def wrong_shape_tensors(t: Path) -> None:
    """Same tensor names as the trained adapter, every LoRA matrix with a different rank."""
    from safetensors.torch import load_file, save_file
    import torch

    f = t / "run" / "adapter" / "adapter_model.safetensors"
    tensors = load_file(str(f))
    bad = {}
    for k, v in tensors.items():
        if "lora_A" in k:
            bad[k] = torch.randn(v.shape[0] + 3, v.shape[1])
        elif "lora_B" in k:
            bad[k] = torch.randn(v.shape[0], v.shape[1] + 3)
        else:
            bad[k] = v
    save_file(bad, str(f))


def corrupt_safetensors(t: Path) -> None:
    (t / "run" / "adapter" / "adapter_model.safetensors").write_bytes(os.urandom(4096))


# ---------------------------------------------------------------- the corpus

HUGE_BAD_LINE = '{"text": "' + "x" * (5 * 2**20) + "\n"  # 5 MB, string never closed

CASES: list[Case] = [
    # --- JSON lines
    Case("jsonl-bad-line-1", ("plan", "--data", "d.jsonl"), 2, "d.jsonl line 1: invalid JSON",
         w("d.jsonl", '{"instruction": oops}\n' + jl(GOOD))),
    Case("jsonl-bad-last-line", ("plan", "--data", "d.jsonl"), 2, "d.jsonl line 3: invalid JSON",
         w("d.jsonl", jl(GOOD, GOOD) + '{"instruction": "a", "output": "b",}\n')),
    Case("jsonl-truncated-final-line", ("plan", "--data", "d.jsonl"), 2, "d.jsonl line 3: invalid JSON",
         w("d.jsonl", jl(GOOD, GOOD) + '{"instruction": "a", "out')),
    Case("jsonl-line-is-array", ("plan", "--data", "d.jsonl"), 2, "line 2: expected a JSON object, got list",
         w("d.jsonl", jl(GOOD) + '["instruction", "output"]\n')),
    Case("jsonl-line-is-string", ("plan", "--data", "d.jsonl"), 2, "line 1: expected a JSON object, got str",
         w("d.jsonl", '"just text"\n')),
    Case("jsonl-empty-file", ("plan", "--data", "d.jsonl"), 2, "d.jsonl is empty",
         w("d.jsonl", "")),
    Case("jsonl-whitespace-only", ("plan", "--data", "d.jsonl"), 2, "d.jsonl is empty",
         w("d.jsonl", "  \n\n\t \r\n  ")),
    Case("jsonl-utf16", ("plan", "--data", "d.jsonl"), 2, "not valid UTF-8",
         w("d.jsonl", jl(GOOD).encode("utf-16"))),
    Case("jsonl-latin1", ("plan", "--data", "d.jsonl"), 2, "d.jsonl line 2: not valid UTF-8 (byte 0xe9)",
         w("d.jsonl", (jl(GOOD) + '{"instruction": "caf\u00e9", "output": "x"}\n').encode("latin-1"))),
    Case("jsonl-huge-malformed-line", ("plan", "--data", "d.jsonl"), 2, "d.jsonl line 1: invalid JSON",
         w("d.jsonl", HUGE_BAD_LINE)),
    Case("jsonl-gz-not-gzip", ("plan", "--data", "d.jsonl.gz"), 2, "not a valid gzip file",
         w("d.jsonl.gz", jl(GOOD))),
    # --- JSON documents
    Case("json-top-level-number", ("plan", "--data", "d.json"), 2, "item 1: expected a JSON object, got int",
         w("d.json", "42\n")),
    Case("json-object-of-objects", ("plan", "--data", "d.json"), 2, "cannot detect the format",
         w("d.json", json.dumps({"a": GOOD, "b": GOOD}))),
    Case("json-list-with-non-object", ("plan", "--data", "d.json"), 2, "item 2: expected a JSON object",
         w("d.json", json.dumps([GOOD, [1, 2]]))),
    # --- CSV / parquet / other files
    Case("csv-empty", ("plan", "--data", "d.csv"), 2, "d.csv is empty", w("d.csv", "")),
    Case("csv-header-only", ("plan", "--data", "d.csv"), 2, "d.csv is empty", w("d.csv", "instruction,output\n")),
    Case("csv-no-header", ("plan", "--data", "d.csv"), 2, "cannot detect the format",
         w("d.csv", "What is 1+1?,2\nWhat is 2+2?,4\n")),
    Case("csv-wrong-columns", ("plan", "--data", "d.csv"), 2, "cannot detect the format from columns ['answer', 'question']",
         w("d.csv", "question,answer\nwhy,because\n")),
    # A subprocess: datasets logs through a handler bound to the stderr of the first
    # process-wide use, which CliRunner swaps and closes (a "--- Logging error ---" then).
    Case("parquet-is-text", ("plan", "--data", "d.parquet"), 2, "cannot read d.parquet as parquet",
         w("d.parquet", jl(GOOD)), via="proc"),
    Case("csv-unterminated-quote", ("plan", "--data", "d.csv"), 2, "cannot read d.csv as csv",
         w("d.csv", 'instruction,output\n"abc,def\n')),
    # An unclosed quote running past 128 KiB (csv's default field limit, which vramfit
    # lifts so that valid long cells load).
    Case("csv-huge-unterminated-field", ("plan", "--data", "d.csv"), 2, "d.csv",
         w("d.csv", 'instruction,output\n"' + "x" * 200_000 + "\n")),
    Case("parquet-zero-rows", ("plan", "--data", "d.parquet"), 2, "d.parquet is empty", parquet("d.parquet", 0)),
    Case("data-unsupported-suffix", ("plan", "--data", "d.txt"), 2, "unsupported dataset file type '.txt'",
         w("d.txt", "hello\n")),
    Case("data-is-directory", ("plan", "--data", "somedir"), 2, "dataset path is a directory", mkdir("somedir")),
    Case("data-missing", ("plan", "--data", "nowhere/d.jsonl"), 2, "dataset not found: nowhere/d.jsonl"),
    # --- records that parse but are wrong
    Case("alpaca-missing-output", ("plan", "--data", "d.jsonl"), 2, "d.jsonl row 2: 'output' is missing",
         w("d.jsonl", jl(GOOD, {"instruction": "only a question"}))),
    Case("alpaca-output-not-string", ("plan", "--data", "d.jsonl"), 2, "'output' must be a string, got list",
         w("d.jsonl", jl({"instruction": "q", "output": ["a", "b"]}))),
    Case("messages-content-number", ("plan", "--data", "d.jsonl"), 2, "turn 1 content must be a string, got int",
         w("d.jsonl", jl({"messages": [{"role": "user", "content": 7}, BOT]}))),
    Case("messages-not-a-list", ("plan", "--data", "d.jsonl"), 2, "'messages' must be a list of turns, got str",
         w("d.jsonl", jl({"messages": "user: hi / assistant: hello"}))),
    Case("messages-role-unknown", ("plan", "--data", "d.jsonl"), 2, "turn 2 has role 'wizard'",
         w("d.jsonl", jl({"messages": [USER, {"role": "wizard", "content": "poof"}]}))),
    Case("messages-turn-not-object", ("plan", "--data", "d.jsonl"), 2, "turn 1 must be an object, got str",
         w("d.jsonl", jl({"messages": ["hi", "hello"]}))),
    Case("conversations-empty-list", ("plan", "--data", "d.jsonl"), 2, "no assistant turn",
         w("d.jsonl", jl({"conversations": []}))),
    Case("messages-no-assistant-turn", ("plan", "--data", "d.jsonl"), 2, "d.jsonl row 1: no assistant turn",
         w("d.jsonl", jl({"messages": [{"role": "system", "content": "be nice"}, USER]}))),
    Case("format-messages-on-alpaca", ("plan", "--data", "d.jsonl", "--set", "data.format=messages"), 2,
         "format 'messages' needs column(s) messages", w("d.jsonl", jl(GOOD))),
    Case("format-unknown", ("plan", "--set", "data.format=xml"), 2, "data.format:"),
    # --- YAML config files
    Case("yaml-unknown-key", ("plan", "--config", "c.yaml"), 2, "unknown config key 'lora.rank'",
         w("c.yaml", "lora:\n  rank: 8\n")),
    Case("yaml-unknown-section", ("plan", "--config", "c.yaml"), 2, "unknown config key 'trainer'",
         w("c.yaml", "trainer:\n  lr: 0.1\n")),
    Case("yaml-section-is-scalar", ("plan", "--config", "c.yaml"), 2, "'lora' (from file:c.yaml) must be a mapping",
         w("c.yaml", "lora: 8\n")),
    Case("yaml-wrong-type", ("plan", "--config", "c.yaml"), 2, "train.micro_batch:",
         w("c.yaml", 'train:\n  micro_batch: "big"\n')),
    Case("yaml-micro-batch-zero", ("plan", "--config", "c.yaml"), 2, "train.micro_batch: Input should be greater than 0",
         w("c.yaml", "train:\n  micro_batch: 0\n")),
    Case("yaml-lr-negative", ("plan", "--config", "c.yaml"), 2, "train.lr: Input should be greater than 0",
         w("c.yaml", "train:\n  lr: -1\n")),
    Case("yaml-seq-len-zero", ("plan", "--config", "c.yaml"), 2, "data.seq_len: Input should be greater than 0",
         w("c.yaml", "data:\n  seq_len: 0\n")),
    Case("yaml-offload-without-zero3", ("plan", "--config", "c.yaml"), 2, "offload_params needs stage 3",
         w("c.yaml", "deepspeed:\n  stage: 2\n  offload_params: true\n")),
    Case("yaml-node-rank-too-high", ("plan", "--config", "c.yaml"), 2, "launch.node_rank 2 must be below launch.nodes 2",
         w("c.yaml", "launch:\n  nodes: 2\n  node_rank: 2\n")),
    Case("yaml-top-level-list", ("plan", "--config", "c.yaml"), 2, "expected a mapping of keys at the top level",
         w("c.yaml", "- lora\n- train\n")),
    Case("yaml-invalid-syntax", ("plan", "--config", "c.yaml"), 2, "c.yaml line 3: invalid YAML",
         w("c.yaml", "train:\n  lr: 0.1\n\tmicro_batch: 2\nlora:\n  r: 8\n")),
    Case("yaml-python-object-tag", ("plan", "--config", "c.yaml"), 2, "invalid YAML",
         w("c.yaml", '!!python/object/apply:os.system ["touch pwned"]\n')),
    Case("yaml-python-tag-nested", ("plan", "--config", "c.yaml"), 2, "invalid YAML",
         w("c.yaml", 'lora:\n  r: !!python/object/apply:os.system ["touch pwned"]\n')),
    Case("yaml-not-utf8", ("plan", "--config", "c.yaml"), 2, "pass a readable UTF-8 YAML file",
         w("c.yaml", "lora:\n  r: 8 # caf\u00e9\n".encode("latin-1"))),
    Case("config-file-missing", ("plan", "--config", "none.yaml"), 2, "config file not found"),
    # --- budget flag (checked by vramfit, not click: one error line)
    Case("budget-zero", ("plan", "--budget", "0"), 2, "--budget"),
    Case("budget-negative", ("plan", "--budget", "-3"), 2, "--budget"),
    # --- presets
    Case("preset-dotdot-passwd", ("plan", "--preset", "../etc/passwd"), 2, "invalid preset name '../etc/passwd'"),
    Case("preset-slash", ("plan", "--preset", "a/b"), 2, "invalid preset name 'a/b'"),
    Case("preset-dotdot", ("plan", "--preset", ".."), 2, "invalid preset name '..'"),
    Case("preset-unknown", ("plan", "--preset", "nope"), 2, "unknown preset 'nope'"),
    Case("presets-show-path", ("presets", "show", "../presets/cpu"), 2, "invalid preset name"),
    # --- --set
    Case("set-without-equals", ("plan", "--set", "lora.r"), 2, "--set expects key=value, got 'lora.r'"),
    Case("set-empty-key", ("plan", "--set", "=8"), 2, "--set expects key=value"),
    Case("set-unknown-key", ("plan", "--set", "train.learning_rate=0.1"), 2, "unknown config key 'train.learning_rate'"),
    Case("set-section-as-value", ("plan", "--set", "lora=8"), 2, "'lora' (from --set) must be a mapping"),
    # --- --out
    Case("out-is-existing-file", ("plan", "--out", "taken"), 2, "is a file, not a run directory", w("taken", "my notes\n")),
    Case("out-is-nonempty-dir", ("train", "--dry-run", "--out", "mine"), 2, "already holds files",
         w("mine/keep.txt", "keep me\n")),
    Case("out-unwritable", ("plan", "--out", "locked/run"), 2, "choose a writable --out directory", unwritable_parent),
    # --- model
    Case("model-dir-without-config", ("plan", "--model", "m"), 2, "no config.json in", model_dir("m", None)),
    Case("model-config-invalid-json", ("plan", "--model", "m"), 2, "the model's config.json must be valid JSON",
         model_dir("m", '{"hidden_size": 128,')),
    Case("model-config-is-list", ("plan", "--model", "m"), 2, "is not a JSON object", model_dir("m", "[1, 2]")),
    Case("model-config-missing-hidden-size", ("plan", "--model", "m"), 2, "config.json lacks a decoder-only field",
         model_dir("m", {k: v for k, v in QWEN7B_CONFIG.items() if k != "hidden_size"})),
    Case("model-config-zero-heads", ("plan", "--model", "m"), 2, "config.json lacks a decoder-only field",
         model_dir("m", {**QWEN7B_CONFIG, "num_attention_heads": 0})),
    # A config.json and no tokenizer files: transformers 5 then builds a tokenizer with no
    # vocabulary, which turned every example into no tokens (an error about seq_len).
    Case("model-dir-without-tokenizer", ("plan", "--model", "m", "--preset", "auto", "--budget", "8"), 2,
         "tokenizer", model_dir("m", QWEN7B_CONFIG)),
    # The same found by the training process (a fixed preset tokenizes nothing at plan time):
    # its one error line and its exit code, and the run directory it was given taken back.
    Case("train-model-dir-without-tokenizer", ("train", "--model", "m", "--preset", "cpu", "--set", "method=lora",
                                               "--out", "run"), 2, "tokenizer", model_dir("m", QWEN7B_CONFIG),
         via="proc", absent=("run",)),
    Case("lora-unknown-target", ("plan", "--set", "lora.target_modules=[nope]"), 2, "['nope'] are not linear layers"),
    # --- does not fit this machine (exit 3)
    Case("qlora-on-cpu", ("plan", "--set", "method=qlora"), 3, "qlora needs an NVIDIA GPU"),
    Case("deepspeed-preset-on-cpu", ("plan", "--preset", "zero3-offload"), 3, "DeepSpeed ZeRO-3 needs NVIDIA GPUs"),
    Case("budget-too-small-7b", ("plan", "--model", "m", "--preset", "24gb", "--budget", "8"), 3,
         "exceeds the 8 GiB budget", model_dir("m", QWEN7B_CONFIG)),
    # --- train (subprocess: the real executable)
    Case("train-proc-malformed-jsonl", ("train", "--preset", "cpu", "--data", "d.jsonl", "--out", "run2"), 2,
         "d.jsonl line 2: invalid JSON", w("d.jsonl", jl(GOOD) + "{nope\n"), via="proc"),
    Case("train-resume-not-a-run", ("train", "--resume", "--out", "empty"), 2, "not a vramfit run directory",
         mkdir("empty")),
    # --- merge
    Case("merge-not-a-run", ("merge", "notrun"), 2, "not a vramfit run directory", w("notrun/readme.txt", "hi\n")),
    Case("merge-missing-dir", ("merge", "nowhere"), 2, "not a vramfit run directory"),
    Case("merge-plan-yaml-garbage", ("merge", "run"), 2, "is not a vramfit plan", w("run/plan.yaml", "- 1\n- 2\n")),
    Case("merge-before-training", ("merge", "run"), 2, "no trained adapter", dry_run),
    Case("merge-out-exists", ("merge", "run", "--out", "taken"), 2, "already exists",
         mkdir("taken/sub"), needs="trained"),
    Case("merge-out-inside-base-model", ("merge", "run", "--out", "{base}/merged"), 2,
         "refusing to write into the base model's directory", needs="trained", absent=("{base}/merged",)),
    Case("merge-adapter-rank-changed", ("merge", "run"), 1, "does not match its base model",
         edit_adapter_config(r=3, lora_alpha=6), needs="trained"),
    Case("merge-adapter-wrong-shapes", ("merge", "run"), 1, "does not match its base model",
         wrong_shape_tensors, needs="trained", via="proc"),
    Case("merge-adapter-unknown-target", ("merge", "run"), 1, "does not match its base model",
         edit_adapter_config(target_modules=["nope_proj"]), needs="trained"),
    Case("merge-adapter-corrupt-safetensors", ("merge", "run"), 1, "is damaged",
         corrupt_safetensors, needs="trained", via="proc"),
    Case("merge-adapter-config-invalid-json", ("merge", "run"), 1, "is damaged: Expecting property name",
         w("run/adapter/adapter_config.json", '{"r": 8,'), needs="trained"),
]

assert len({c.id for c in CASES}) == len(CASES), "duplicate case ids"


# ---------------------------------------------------------------- the checks


def run_case(case: Case, args: list[str], cwd: Path) -> tuple[int, str, str]:
    """(exit code, all output, stderr)."""
    if case.via == "proc":
        p = subprocess.run([vramfit_exe(), *args], cwd=cwd, env=subprocess_env(),
                           capture_output=True, text=True, timeout=300)
        return p.returncode, p.stdout + p.stderr, p.stderr
    r = runner.invoke(app, args)
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    return r.exit_code, r.output, r.stderr


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
def test_bad_input(case: Case, tmp_path, monkeypatch, request):
    monkeypatch.chdir(tmp_path)
    if case.needs == "trained":
        shutil.copytree(request.getfixturevalue("trained_run"), tmp_path / "run", symlinks=True)
    if case.build:
        case.build(tmp_path)
    subst = {}
    if any("{base}" in a for a in case.args + case.absent):
        from vramfit.model_source import embedded_model_dir

        subst["base"] = str(embedded_model_dir())
    args = [a.format(**subst) for a in case.args]
    absent = [Path(a.format(**subst)) for a in case.absent]

    before = snapshot(tmp_path)
    try:
        code, out, err = run_case(case, args, tmp_path)
        after = snapshot(tmp_path)
    finally:
        if not IS_ROOT and (tmp_path / "locked").is_dir():
            (tmp_path / "locked").chmod(0o700)  # let pytest clean up

    assert code != 0, out
    assert code == case.code, f"exit {code}, expected {case.code}\n{out}"
    assert "Traceback" not in out, out
    assert "internal error" not in out, out
    errs = [line for line in out.splitlines() if line.startswith("error: ")]
    assert len(errs) == 1, out
    line = errs[0]
    assert "(hint: " in line and line.endswith(")"), line
    assert line in err.splitlines(), "the error line goes to stderr"
    assert case.needle in line, line
    changes = describe_changes(before, after)
    assert not changes, changes
    for p in absent:
        assert not p.exists(), f"{p} was created"
