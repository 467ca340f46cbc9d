"""Checkpoints are written under a temporary name and renamed into place, in process and fast:
the trainer vramfit uses (TokenCountingTrainer) on a two-layer model built from a config."""

from __future__ import annotations

from pathlib import Path

import pytest

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
