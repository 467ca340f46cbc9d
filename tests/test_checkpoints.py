"""Checkpoints, in process and fast: they are written under a temporary name and renamed
into place (the trainer vramfit uses, TokenCountingTrainer, on a two-layer model built from a
config), and training refuses to start when the disk cannot hold them."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import small_disk

STEPS = 6


def tiny_trainer(run_dir: Path, save_total_limit: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

    from vramfit.train import TokenCountingTrainer

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg)
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(32):
        ids = torch.randint(0, 64, (8,), generator=g).tolist()
        rows.append({"input_ids": ids, "attention_mask": [1] * 8, "labels": ids})
    args = TrainingArguments(
        output_dir=str(run_dir / "checkpoints"), max_steps=STEPS, per_device_train_batch_size=4,
        save_strategy="steps", save_steps=2, save_total_limit=save_total_limit, logging_steps=1,
        report_to="none", use_cpu=True, disable_tqdm=True, seed=0,
    )  # fmt: skip
    return TokenCountingTrainer(model=model, args=args, train_dataset=rows)


def listing(run_dir: Path) -> set[str]:
    return {p.name for p in (run_dir / "checkpoints").iterdir()}


@pytest.fixture
def saves(monkeypatch):
    """Records, at the moment each trainer_state.json is written (the last file of a
    checkpoint), where it goes and what checkpoints/ holds; `fail_at` makes that write raise
    at one step, as a save cut short after the weights, optimizer and RNG state."""
    from transformers.trainer_callback import TrainerState

    real = TrainerState.save_to_json
    seen: list[tuple[int, Path, set[str]]] = []
    fail_at: list[int] = []

    def spy(self, json_path):
        path = Path(json_path)
        checkpoints = next(p for p in path.parents if p.name == "checkpoints")
        seen.append((self.global_step, path, {p.name for p in checkpoints.iterdir()}))
        if self.global_step in fail_at:
            raise RuntimeError("save cut short")
        return real(self, json_path)

    monkeypatch.setattr(TrainerState, "save_to_json", spy)
    return seen, fail_at


@pytest.mark.parametrize("limit", [1, 2])
def test_checkpoint_appears_only_when_complete_and_rotation_keeps_the_last_good_one(tmp_path, saves, limit):
    from vramfit.train import last_checkpoint, trainer_state

    seen, _ = saves
    tiny_trainer(tmp_path, limit).train()

    assert [s for s, _, _ in seen] == [2, 4, 6]
    for step, path, during in seen:
        ckpts = tmp_path / "checkpoints"
        # Written inside the staging directory, and checkpoint-N is not there yet.
        assert path == ckpts / f".tmp-checkpoint-{step}" / f"checkpoint-{step}" / "trainer_state.json"
        assert f"checkpoint-{step}" not in during
        # The previous checkpoint is still there while this one is incomplete, even
        # with save_total_limit=1; rotation keeps `limit` complete ones.
        done = sorted((n for n in during if not n.startswith(".")), key=lambda n: int(n.split("-")[1]))
        assert done == [f"checkpoint-{s}" for s in range(2, step, 2)][-limit:]
    assert listing(tmp_path) == {f"checkpoint-{s}" for s in range(2, STEPS + 1, 2)[-limit:]}
    assert trainer_state(tmp_path / "checkpoints" / f"checkpoint-{STEPS}")["global_step"] == STEPS
    assert last_checkpoint(tmp_path) == tmp_path / "checkpoints" / f"checkpoint-{STEPS}"


def test_save_cut_short_leaves_only_staging_which_resume_ignores_and_next_run_removes(tmp_path, saves):
    from vramfit.train import last_checkpoint, remove_stale_staging

    seen, fail_at = saves
    fail_at.append(4)
    with pytest.raises(RuntimeError, match="save cut short"):
        tiny_trainer(tmp_path, 1).train()

    ckpts = tmp_path / "checkpoints"
    # Weights and optimizer were written, trainer_state.json not: never under the real name.
    assert listing(tmp_path) == {"checkpoint-2", ".tmp-checkpoint-4"}
    staged = ckpts / ".tmp-checkpoint-4" / "checkpoint-4"
    assert (staged / "model.safetensors").is_file() and (staged / "optimizer.pt").is_file()
    assert not (staged / "trainer_state.json").exists()
    assert last_checkpoint(tmp_path) == ckpts / "checkpoint-2"

    remove_stale_staging(tmp_path)  # what the next run does under the run lock
    assert listing(tmp_path) == {"checkpoint-2"}

    fail_at.clear()
    tiny_trainer(tmp_path, 1).train(resume_from_checkpoint=str(ckpts / "checkpoint-2"))
    assert [s for s, _, _ in seen] == [2, 4, 4, 6]
    assert listing(tmp_path) == {f"checkpoint-{STEPS}"}


def test_torn_checkpoint_from_an_earlier_run_is_replaced(tmp_path):
    from vramfit.train import trainer_state

    torn = tmp_path / "checkpoints" / "checkpoint-2"
    torn.mkdir(parents=True)
    (torn / "optimizer.pt").write_bytes(b"torn")  # a save killed before staged saves
    tiny_trainer(tmp_path, 3).train()
    assert listing(tmp_path) == {"checkpoint-2", "checkpoint-4", "checkpoint-6"}
    assert trainer_state(torn)["global_step"] == 2
    assert (torn / "optimizer.pt").read_bytes() != b"torn"


# ---------------------------------------------------------------- free disk for checkpoints


@pytest.mark.parametrize("limit", [1, 3])
def test_disk_check_counts_trainable_weights_adam_state_and_kept_checkpoints(tmp_path, monkeypatch, limit):
    import torch

    from vramfit.config import RunConfig
    from vramfit.errors import VramfitError
    from vramfit.train import check_disk_for_checkpoints

    model = torch.nn.Sequential(torch.nn.Linear(1000, 1000), torch.nn.Linear(10, 10))
    model[0].requires_grad_(False)  # 1M frozen weights: not in any checkpoint
    weights = 110 * 4  # the trainable fp32 weights
    # save_total_limit kept + 1 being written, each weights + two fp32 Adam moments; + the final output.
    need = (weights + 110 * 8) * (limit + 1) + weights
    cfg = RunConfig.model_validate({"train": {"save_total_limit": limit}})

    small_disk(monkeypatch, tmp_path, free=need - 1)
    with pytest.raises(VramfitError) as e:
        check_disk_for_checkpoints(tmp_path, model, cfg)
    assert f"{tmp_path} has 0.0 GiB free; checkpoints need ~0.0 GiB" in e.value.one_line()
    assert "lower train.save_total_limit" in e.value.hint
    asked = small_disk(monkeypatch, tmp_path, free=need)
    check_disk_for_checkpoints(tmp_path, model, cfg)
    assert asked == [tmp_path.resolve()]


def test_trainer_without_disk_for_checkpoints_refuses_before_writing_any(tmp_path, monkeypatch, capsys, no_gpu):
    """The training process itself (`python -m vramfit.train RUN_DIR`, in process): one error line,
    exit 1, before any step: no checkpoint, adapter or metrics written."""
    import signal

    from typer.testing import CliRunner

    from vramfit import train
    from vramfit.cli import app

    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(app, ["train", "--dry-run", "--out", "run", "--set", "train.max_steps=2"])
    assert r.exit_code == 0, r.output
    run_dir = tmp_path / "run"
    asked = small_disk(monkeypatch, run_dir, free=0)
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")  # what the trainer sets on CPU; undone after the test
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    capsys.readouterr()
    try:
        code = train.main([str(run_dir)])
    finally:
        for s, h in handlers.items():  # the trainer installs its preemption handlers
            signal.signal(s, h)
    err = capsys.readouterr().err
    assert code == 1, err
    assert asked == [run_dir.resolve()]
    errs = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errs) == 1 and "Traceback" not in err, err
    assert f"{run_dir} has 0.0 GiB free; checkpoints need ~" in errs[0] and "(hint: free disk space" in errs[0]
    assert list((run_dir / "checkpoints").iterdir()) == []  # (the Trainer makes the empty dir)
    assert not (run_dir / "adapter").exists() and not (run_dir / "metrics.json").exists()


def test_every_checkpoint_file_is_flushed_to_disk_before_it_is_renamed_into_place(tmp_path, saves, monkeypatch):
    # A preempted cloud machine can be cut off seconds after training exits: a checkpoint
    # left in the page cache would be lost or torn. Each file is fsynced in staging, and the
    # checkpoints directory after the rename.
    import os

    synced: list[str] = []
    real = os.fsync

    def spy(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    tiny_trainer(tmp_path, 2).train()
    ckpts = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        staged = ckpts / f".tmp-checkpoint-{step}" / f"checkpoint-{step}"
        assert str(staged / "trainer_state.json") in synced and str(staged) in synced
        assert any(p.startswith(str(staged)) and p.endswith(".safetensors") for p in synced)
    assert synced.count(str(ckpts)) == 3  # once per rename


def test_an_unexpected_error_in_training_is_kept_in_train_log(tmp_path, monkeypatch):
    # The traceback goes to RUN_DIR/train.log as well as stderr (a rented machine's terminal
    # is often gone), and the error itself still surfaces, unchanged, to exit 1.
    import pytest

    import vramfit.train as train
    from vramfit.render import CRASH_MARK

    (tmp_path / "train.log").write_text("step 1/4 | loss 2.0\n")

    def boom(run_dir, resume):
        raise RuntimeError("boom in a library")

    monkeypatch.setattr(train, "run", boom)
    with pytest.raises(RuntimeError, match="boom in a library"):
        train.main([str(tmp_path)])
    log = (tmp_path / "train.log").read_text()
    assert log.startswith("step 1/4 | loss 2.0\n" + CRASH_MARK + "\nTraceback (most recent call last):")
    assert log.rstrip().endswith("RuntimeError: boom in a library")


def test_logging_a_crash_never_raises(tmp_path):
    import vramfit.train as train

    try:
        raise ValueError("x")
    except ValueError:
        train.log_crash(tmp_path / "no-such-dir")  # the OSError is swallowed: the ValueError is the one to see


def test_flops_count_is_the_trainers_own_counted_once(tmp_path, monkeypatch):
    """TokenCountingTrainer caches the parameter count the Trainer's per-micro-batch FLOPs
    estimate walks the model for: the same total_flos, one walk."""
    import torch
    from transformers import Trainer

    trainer = tiny_trainer(tmp_path, 1)
    inputs = {"input_ids": torch.zeros(4, 8, dtype=torch.long)}
    expected = Trainer.floating_point_ops(trainer, inputs)
    walks = []
    real = type(trainer.model).num_parameters
    monkeypatch.setattr(type(trainer.model), "num_parameters", lambda self, **kw: walks.append(kw) or real(self, **kw))
    assert [trainer.floating_point_ops(inputs) for _ in range(3)] == [expected] * 3
    assert walks == [{"exclude_embeddings": True}]


def test_the_collators_cpu_ids_reach_the_embedding_lookup_and_nothing_else(tmp_path):
    """train.offload_embeddings_async: the collator's CPU ids ride the batch past the GPU
    copy (data.OnHost), the trainer hands them to the lookup for that forward only, and the
    model never sees them as an input."""
    import torch
    from accelerate.utils import send_to_device
    from torch.utils.data._utils.pin_memory import pin_memory

    from vramfit.data import HOST_IDS_KEY, Collator, OnHost

    class Tok:
        pad_token_id, eos_token_id = 0, 0

    rows = [{"input_ids": [5, 6, 7]}, {"input_ids": [8, 9]}]
    batch = Collator(Tok(), host_ids=True)(rows)
    assert isinstance(batch[HOST_IDS_KEY], OnHost) and batch[HOST_IDS_KEY].tensor is batch["input_ids"]
    assert HOST_IDS_KEY not in Collator(Tok())(rows)
    # What the DataLoader's pinning and Accelerate's copy to the device do to it: nothing.
    assert pin_memory({HOST_IDS_KEY: batch[HOST_IDS_KEY]})[HOST_IDS_KEY] is batch[HOST_IDS_KEY]
    assert send_to_device(batch, "meta")[HOST_IDS_KEY] is batch[HOST_IDS_KEY]

    class Recorder:
        def __init__(self):
            self.pending, self.calls = None, []

        def expect(self, ids):
            self.pending = ids
            self.calls.append(ids)

    trainer = tiny_trainer(tmp_path, 1)
    trainer.host_embeddings = seen = Recorder()
    during = []
    trainer.model.get_input_embeddings().register_forward_pre_hook(lambda m, a: during.append(seen.pending))
    trainer.compute_loss(trainer.model, batch)  # the model would refuse an unknown keyword
    assert during == [batch["input_ids"]] and seen.calls == [batch["input_ids"], None]
    trainer.host_embeddings = None
    trainer.compute_loss(trainer.model, batch)  # without offloaded embeddings it is only dropped
