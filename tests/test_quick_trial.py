"""A quick real trial: --epochs N alone (warmup 30 %), and a seeded class-balanced --train-subset."""

import json

import pytest
import torch

from run.config import default_warmup_epochs
from conftest import run_cli
from run.data import Split, balanced_subset


@pytest.mark.parametrize("epochs,warmup", [(100, 30), (200, 60), (10, 3), (7, 2), (5, 2), (3, 1), (2, 1), (1, 0)])
def test_default_warmup_is_30_percent_rounded_half_up(epochs, warmup):
    assert default_warmup_epochs(epochs) == warmup


def _banner(capsys, *flags):
    rc, out, err = run_cli(["--dry-run", "--data-dir", "/nonexistent", *flags], capsys)
    assert rc == 0, err
    return out.splitlines()


def test_banner_says_where_the_warmup_comes_from(capsys):
    lines = _banner(capsys, "--epochs", "10")
    # the block keeps the seed's Stage 1 line; how the warmup was chosen is a line of its own below it
    assert "Stage 1 (Warmup): Epochs 1-3 (LSQ only)" in lines
    assert "Warmup: epochs 1-3, 30 % of 10 epochs, as --warmup-epochs was not given" in lines
    assert lines.index("Warmup: epochs 1-3, 30 % of 10 epochs, as --warmup-epochs was not given") > lines.index(
        "Alpha Control:")
    assert "Stage 2 (BR): Epochs 4-10" in lines and "  warmup_epochs: 3" in lines
    lines = _banner(capsys, "--epochs", "1")
    assert "Stage 1 (Warmup): none (30 % of 1 epoch, as --warmup-epochs was not given)" in lines
    lines = _banner(capsys, "--epochs", "10", "--warmup-epochs", "3")
    assert "Stage 1 (Warmup): Epochs 1-3 (LSQ only)" in lines
    assert not any(x.startswith("Warmup:") for x in lines)


def test_balanced_subset_is_seeded_and_even():
    labels = torch.arange(100) % 10
    images = torch.arange(100, dtype=torch.uint8).view(100, 1, 1, 1).expand(100, 3, 32, 32)
    split = Split(images, labels)
    sub = balanced_subset(split, 25, seed=1)
    # 25 over 10 classes: 2 each, the first 5 classes one more
    assert torch.bincount(sub.labels, minlength=10).tolist() == [3, 3, 3, 3, 3, 2, 2, 2, 2, 2]
    index = sub.images[:, 0, 0, 0].long()  # each image holds its position in the split
    assert torch.equal(split.labels[index], sub.labels) and torch.equal(index, index.sort().values)
    assert len(set(index.tolist())) == 25
    assert torch.equal(balanced_subset(split, 25, seed=1).images, sub.images)
    assert not torch.equal(balanced_subset(split, 25, seed=2).images, sub.images)


def test_subset_larger_than_a_class_is_refused():
    split = Split(torch.zeros(20, 3, 32, 32, dtype=torch.uint8), torch.arange(20) % 10)
    with pytest.raises(ValueError, match=r"--train-subset 30: class airplane has 2 training images, .* needs 3"):
        balanced_subset(split, 30, seed=0)


def test_cli_quick_trial_with_epochs_alone_and_a_subset(shared_folder, tmp_path, capsys):
    out = tmp_path / "trial"
    rc, stdout, err = run_cli(["--data-dir", shared_folder, "--no-download", "--output-dir", out, "--epochs", "2",
                               "--train-subset", "20", "--batch-size", "16", "--workers", "0", "--num-bits", "32",
                               "--lambda-br", "0", "--lambda-br-act", "0"], capsys)
    assert rc == 0, err
    assert "Schedule: epochs 1-2, float; no quantizers, so no BR and no step sizes (alpha)" in stdout
    assert "training on a class-balanced subset of 20 images (--train-subset, seed 42)" in stdout
    assert "Data: 20 train (class-balanced subset of 40, --train-subset) / 20 test images" in stdout
    assert json.loads((out / "summary.json").read_text())["train_subset"] == 20
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows] == [2, 2]  # a float run gets no warmup by default: nothing to warm up


def test_default_output_folder_names_the_subset(capsys):
    lines = _banner(capsys, "--train-subset", "5000")
    assert "Output: results/resnet20_w2a2_fl8_lbr1_lbra0_frz_sub5000_s42" in lines
