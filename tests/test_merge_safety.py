"""`vramfit merge` when things go wrong: not enough disk, and a --force replace that fails
after the old output was moved aside. In process (typer's CliRunner), on a copy of the
session's 2-step trained run, with the failure injected by monkeypatching."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import describe_changes, small_disk, snapshot
from vramfit.cli import app

pytestmark = pytest.mark.usefixtures("no_gpu")

runner = CliRunner()


@pytest.fixture
def work(tmp_path, monkeypatch, trained_run) -> Path:
    monkeypatch.chdir(tmp_path)
    shutil.copytree(trained_run, tmp_path / "run", symlinks=True)
    return tmp_path


def merge(*args):
    r = runner.invoke(app, ["merge", *map(str, args)])
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    return r


def one_error_line(r) -> str:
    assert "Traceback" not in r.output, r.output
    errs = [line for line in r.output.splitlines() if line.startswith("error: ")]
    assert len(errs) == 1, r.output
    assert errs[0] in r.stderr.splitlines(), "the error line goes to stderr"
    return errs[0]


def merged_size(base_dir) -> float:
    """What merge.py needs free: the 16-bit model, plus 5% for the index and tokenizer."""
    from transformers import AutoModelForCausalLM

    n = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(base_dir).parameters())
    return n * 2 * 1.05


# ---------------------------------------------------------------- free disk


@pytest.mark.parametrize("out", ["run/merged", "disk/new/deeper/merged"], ids=["default-out", "out-in-new-dirs"])
def test_merge_refuses_when_the_output_disk_is_too_small(work, monkeypatch, out):
    (work / "disk").mkdir()
    disk = work / ("run" if out.startswith("run/") else "disk")
    asked = small_disk(monkeypatch, disk, free=1 << 20)  # 1 MiB, the rest of the machine as it is
    before = snapshot(work)
    r = merge("run", *([] if out == "run/merged" else ["--out", out]))
    assert r.exit_code == 1, r.output
    line = one_error_line(r)
    assert "0.0 GiB free; the merged model needs ~" in line and "nothing was written" in line, line
    assert asked, "the check never asked about the output's disk"
    # (For --out in directories that do not exist yet: their nearest existing parent's disk.)
    assert describe_changes(before, snapshot(work)) == []


def test_merge_disk_check_asks_for_the_16bit_model(work, monkeypatch):
    """Refused with one byte less than the merged 16-bit model needs, merged with one more."""
    from vramfit.errors import VramfitError
    from vramfit.merge import merge_run
    from vramfit.model_source import embedded_model_dir

    need = merged_size(embedded_model_dir())
    (work / "disk").mkdir()
    small_disk(monkeypatch, work / "disk", free=int(need) - 1)
    with pytest.raises(VramfitError, match="the merged model needs"):
        merge_run(work / "run", work / "disk" / "merged")
    assert list((work / "disk").iterdir()) == []
    small_disk(monkeypatch, work / "disk", free=int(need) + 1)
    assert merge_run(work / "run", work / "disk" / "merged").out == work / "disk" / "merged"
    assert (work / "disk" / "merged" / "config.json").is_file()


# ---------------------------------------------------------------- --force


@pytest.mark.parametrize("failure", [OSError(18, "Invalid cross-device link"), KeyboardInterrupt()], ids=["OSError", "Ctrl-C"])
def test_force_merge_failing_after_old_output_moved_aside_puts_it_back(work, monkeypatch, failure):
    first = merge("run")
    assert first.exit_code == 0, first.output
    out = work / "run" / "merged"
    (out / "marker.txt").write_text("the old output")  # so the old one cannot pass for a new one
    before = snapshot(work)

    real = os.rename
    renames: list[tuple[str, str]] = []  # merge.py's own renames, by name

    def rename(src, dst, *a, **kw):
        names = (Path(src).name, Path(dst).name)
        if any(n == "merged" or n.startswith(".merged.") for n in names):
            renames.append(names)
        if Path(src).name.startswith(".merged.tmp-") and Path(dst) == out:
            # The new model is saved and verified, and the old output was moved aside.
            assert not out.exists()
            raise failure
        return real(src, dst, *a, **kw)

    monkeypatch.setattr(os, "rename", rename)
    r = merge("run", "--force")

    aside, swap, back = renames
    assert aside[0] == "merged" and aside[1].startswith(".merged.old-"), renames
    assert swap[0].startswith(".merged.tmp-") and swap[1] == "merged", renames
    assert back == (aside[1], "merged"), renames
    if isinstance(failure, KeyboardInterrupt):
        assert r.exit_code == 130 and "interrupted" in r.stderr, r.output
    else:
        assert r.exit_code == 1, r.output
        assert "Invalid cross-device link" in one_error_line(r)
    # The old output is back under its name, byte for byte; no .merged.old-*/.merged.tmp-* left.
    assert describe_changes(before, snapshot(work)) == []
