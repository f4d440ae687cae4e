"""fastsae.runs: a run folder's layout and finding its newest complete checkpoint."""

import json

from fastsae import runs
from fastsae.training import checkpoint as ckpt


def _complete(folder):
    folder.mkdir(parents=True)
    for name in runs.REQUIRED_FILES:
        (folder / name).write_text("{}")


def test_latest_checkpoint_skips_incomplete_and_temporary_folders(tmp_path):
    assert runs.latest_checkpoint(tmp_path) is None and not runs.is_run_folder(tmp_path)
    _complete(runs.checkpoint_dir(tmp_path, 7))
    _complete(runs.checkpoint_dir(tmp_path, 30))
    partial = runs.checkpoint_dir(tmp_path, 45)
    _complete(partial)
    (partial / runs.STATE_JSON).unlink()  # written last: its absence marks a torn checkpoint
    _complete(runs.checkpoints_root(tmp_path) / ".tmp-step_000000050-abcd1234")
    assert runs.is_run_folder(tmp_path)
    assert [step for step, _ in runs.list_checkpoints(tmp_path)] == [7, 30]
    assert runs.latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step_000000030"


def test_the_trainer_writes_where_runs_looks(tmp_path):
    """checkpoint.write_checkpoint puts a step where runs.latest_checkpoint finds it; the names are one."""
    def write(folder):
        for name in runs.REQUIRED_FILES:
            (folder / name).write_text("{}")

    written = ckpt.write_checkpoint(tmp_path, 12, write)
    assert runs.latest_checkpoint(tmp_path) == written == runs.checkpoint_dir(tmp_path, 12)
    assert ckpt.latest_checkpoint is runs.latest_checkpoint and ckpt.CHECKPOINTS_DIRNAME == runs.CHECKPOINTS_DIRNAME


def test_read_metrics_reads_each_row(tmp_path):
    assert runs.read_metrics(tmp_path) == []
    rows = [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.25}]
    runs.metrics_path(tmp_path).write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    assert runs.read_metrics(tmp_path) == rows
    assert runs.browser_dir(tmp_path) == tmp_path / "browser"


def test_the_architecture_choices_are_the_registry(capsys):
    """`fastsae train --architecture` offers every registered architecture (gated included)."""
    import pytest

    from fastsae import architectures
    from fastsae.cli import build_parser
    from fastsae.config import ARCHITECTURES

    parser = build_parser()
    for name in ARCHITECTURES:
        assert architectures.get(name).name == name
        assert parser.parse_args(["train", "--architecture", name]).architecture == name
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--architecture", "nope"])
    assert "gated" in capsys.readouterr().err
