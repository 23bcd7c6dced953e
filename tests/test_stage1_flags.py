"""--lr-schedule and --act-quant-at shape the warmup (stage 1): a run may not continue, or branch
from, a warmup made with other values; a checkpoint written before such a flag existed ran with
its default (so the warmups and runs of earlier versions still resume and branch)."""

import json

import pytest
import torch

from run import config
from conftest import TINY, run_cli

#: (flag, its default, another value)
STAGE1_FLAGS = [("--lr-schedule", "cosine", "warmup-constant"), ("--act-quant-at", "conv-input", "relu-output")]


def test_they_are_not_stage2_flags():
    for flag, default, _ in STAGE1_FLAGS:
        dest = flag[2:].replace("-", "_")
        assert config.build_parser().get_default(dest) == default
        assert dest not in getattr(config, "STAGE2_FLAGS", frozenset())  # (--from-warmup's set, where it exists)


def _drop_flags(folder, dests):
    """Make the run in ``folder`` look as written before the flags ``dests`` existed."""
    for name in ("last.pt", "best.pt", "warmup_end.pt"):
        path = folder / name
        if path.exists():
            ckpt = torch.load(path, weights_only=True)
            for dest in dests:
                ckpt["config"]["flags"].pop(dest)
            torch.save(ckpt, path)
    cfg = json.loads((folder / "config.json").read_text())
    for dest in dests:
        cfg["flags"].pop(dest)
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def old_run(shared_folder, tmp_path_factory):
    """A run (epoch 1 warmup, epoch 2 BR) whose checkpoints predate the stage-1 flags."""
    out = tmp_path_factory.mktemp("old") / "run"
    rc, _, _ = run_cli(["--data-dir", shared_folder, "--output-dir", out, *TINY])
    assert rc == 0
    _drop_flags(out, [f[2:].replace("-", "_") for f, _, _ in STAGE1_FLAGS])
    return out


@pytest.mark.parametrize("flag,default,other", STAGE1_FLAGS)
def test_resuming_with_another_value_is_refused_and_the_default_is_what_an_old_run_had(
        old_run, tmp_path, capsys, flag, default, other):
    warmup = old_run / "warmup_end.pt"
    rc, _, err = run_cli(["--resume", warmup, "--output-dir", tmp_path / "r", flag, other], capsys)
    assert rc == 2 and f"{flag} {other} (run: {default}, the default)" in err
    rc, stdout, err = run_cli(["--resume", warmup, "--output-dir", tmp_path / "r", flag, default], capsys)
    assert rc == 0, err
    assert "Resumed from epoch 1 of 2" in stdout

    def epoch2(folder):
        rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        return next(r for r in rows if r["epoch"] == 2)
    assert epoch2(tmp_path / "r") == epoch2(old_run)  # epoch 2 again, exactly as the old run trained it
    assert json.loads((tmp_path / "r" / "config.json").read_text())["flags"][flag[2:].replace("-", "_")] == default


needs_from_warmup = pytest.mark.skipif("from_warmup" not in vars(config.build_parser().parse_args([])),
                                       reason="--from-warmup is not in this checkout")


@needs_from_warmup
@pytest.mark.parametrize("flag,default,other", STAGE1_FLAGS)
def test_a_branch_from_a_warmup_made_with_another_value_is_refused(old_run, shared_folder, tmp_path, capsys,
                                                                   flag, default, other):
    warmup = old_run / "warmup_end.pt"
    rc, _, err = run_cli(["--data-dir", shared_folder, "--output-dir", tmp_path / "b", *TINY, "--from-warmup",
                          warmup, flag, other], capsys)
    assert rc == 2 and f"{flag} {other} (warmup: {default})" in err
    # the warmup predates the flag: it ran with the default, so a branch with the default is taken
    rc, stdout, err = run_cli(["--data-dir", shared_folder, "--output-dir", tmp_path / "b", *TINY, "--from-warmup",
                               warmup, flag, default], capsys)
    assert rc == 0, err
