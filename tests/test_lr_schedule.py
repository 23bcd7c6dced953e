"""--lr-schedule: one cosine over all epochs (the default), or --lr constant through the warmup and a
cosine over the BR epochs (warmup-constant, the seed authors' script). Checked on the learning rate
of each epoch."""

import json
import math
import signal

import pytest
import torch

from run.config import build_parser, default_output_dir, resolve_defaults
from conftest import TINY, run_cli, signal_in_epoch
from engine import build_scheduler


def _epoch_lrs(*flags):
    """The learning rate of each epoch under the run's scheduler (stepped once per epoch, as the trainer does)."""
    cfg = build_parser().parse_args(list(flags))
    resolve_defaults(cfg)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    scheduler = build_scheduler(opt, cfg)
    lrs = []
    for _ in range(cfg.epochs):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    return lrs


def test_cosine_over_all_epochs_is_the_default():
    # (1 + cos(π·k/4)) / 2 · 0.1 for k = 0..3, by hand: cos(π/4) = √2/2, cos(π/2) = 0, cos(3π/4) = -√2/2
    half = math.sqrt(2) / 2
    expected = [0.1, 0.1 * (1 + half) / 2, 0.05, 0.1 * (1 - half) / 2]
    assert _epoch_lrs("--epochs", "4", "--warmup-epochs", "1", "--lr", "0.1") == pytest.approx(expected, rel=1e-12)


def test_warmup_constant_keeps_lr_through_the_warmup_then_a_cosine_over_the_br_epochs():
    # 2 warmup epochs at 0.1; the 3 BR epochs start at 0.1 again: (1 + cos(π·k/3)) / 2 · 0.1, k = 0, 1, 2
    expected = [0.1, 0.1, 0.1, 0.075, 0.025]
    lrs = _epoch_lrs("--epochs", "5", "--warmup-epochs", "2", "--lr", "0.1", "--lr-schedule", "warmup-constant")
    assert lrs == pytest.approx(expected, rel=1e-12)
    # the default warmup (30 % of 10 = 3): epochs 1-3 at 0.01, then a cosine over 7 epochs
    lrs = _epoch_lrs("--epochs", "10", "--lr-schedule", "warmup-constant")
    assert lrs[:4] == pytest.approx([0.01] * 4, rel=1e-12)
    assert lrs[4] == pytest.approx(0.01 * (1 + math.cos(math.pi / 7)) / 2, rel=1e-12)
    assert lrs[9] == pytest.approx(0.01 * (1 + math.cos(6 * math.pi / 7)) / 2, rel=1e-12)


def test_warmup_constant_without_a_warmup_is_the_cosine_and_says_so(capsys):
    flags = ("--epochs", "4", "--warmup-epochs", "0", "--lr", "0.1")
    assert _epoch_lrs(*flags, "--lr-schedule", "warmup-constant") == _epoch_lrs(*flags)
    rc, out, _ = run_cli(["--dry-run", "--data-dir", "/nonexistent", *flags, "--lr-schedule", "warmup-constant"],
                         capsys)
    assert rc == 0
    assert "WARNING: --lr-schedule warmup-constant has no effect: there is no warmup" in out


def test_banner_and_folder_name(capsys):
    rc, out, _ = run_cli(["--dry-run", "--data-dir", "/nonexistent", "--epochs", "10", "--lr-schedule",
                          "warmup-constant"], capsys)
    assert rc == 0
    assert ("lr constant through the warmup (epochs 1-3), then cosine over the 7 epochs with BR "
            "(--lr-schedule warmup-constant), batch 128, seed 42") in out
    assert "Output: results/resnet20_w2a2_fl8_lbr1_lbra0_frz_lrwc_s42" in out
    rc, out, _ = run_cli(["--dry-run", "--data-dir", "/nonexistent", "--epochs", "10"], capsys)
    assert ", cosine over 10 epochs, batch 128" in out
    cfg = build_parser().parse_args([])
    assert default_output_dir(cfg) == "results/resnet20_w2a2_fl8_lbr1_lbra0_s42"


def test_a_run_logs_each_epochs_lr_and_resumes_on_the_schedule(shared_folder, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    argv = ["--data-dir", shared_folder, "--output-dir", out, *TINY, "--epochs", "3", "--lr", "0.1",
            "--lr-schedule", "warmup-constant"]
    with monkeypatch.context() as m:
        signal_in_epoch(m, 3, signal.SIGTERM)  # stopped in the last epoch: epochs 1-2 are in last.pt
        rc, _, _ = run_cli(argv, capsys)
    assert rc == 128 + signal.SIGTERM
    rc, _, err = run_cli(["--resume", "--output-dir", out], capsys)
    assert rc == 0, err
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # warmup (epoch 1) at 0.1; BR epochs 2-3: (1 + cos(π·k/2)) / 2 · 0.1 for k = 0, 1
    assert [r["lr"] for r in rows] == pytest.approx([0.1, 0.1, 0.05], rel=1e-12)
    assert json.loads((out / "config.json").read_text())["flags"]["lr_schedule"] == "warmup-constant"
    # another schedule is another experiment: refused on --resume
    rc, _, err = run_cli(["--resume", "--output-dir", out, "--lr-schedule", "cosine"], capsys)
    assert rc == 2 and "--lr-schedule cosine (run: warmup-constant)" in err
