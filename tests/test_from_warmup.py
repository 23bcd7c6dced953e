"""--from-warmup: a scenario branched from another scenario's warmup is the run from scratch, bit for bit."""

import hashlib
import json
import os
import signal
import struct

import pytest
import torch

from conftest import TINY, make_image_folder, run_cli, signal_in_epoch
from run.data import Split

# The seed's scenarios by their stage-2 flags (config.STAGE2_FLAGS); everything else is shared.
W_ONLY = ["--lambda-br", "1", "--lambda-br-act", "0", "--freeze-alpha"]
WA_STABLE = ["--lambda-br", "1", "--lambda-br-act", "1", "--freeze-alpha"]
WA_MOVING = WA_STABLE + ["--br-backprop-to-alpha-act"]
LSQ = ["--lambda-br", "0", "--lambda-br-act", "0"]


def _rows(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def scratch(shared_folder, tmp_path_factory):
    """Three scenarios run from scratch: name -> run folder."""
    root = tmp_path_factory.mktemp("scratch")
    runs = {}
    for name, flags in (("lsq", LSQ), ("w-only", W_ONLY), ("wa-stable", WA_STABLE)):
        runs[name] = root / name
        rc, _, _ = run_cli(["--data-dir", shared_folder, "--output-dir", runs[name], *TINY, *flags])
        assert rc == 0
    return runs


@pytest.mark.parametrize("name, flags, source", [("w-only", W_ONLY, "lsq"), ("wa-stable", WA_STABLE, "lsq"),
                                                 ("lsq", LSQ, "wa-stable")])
def test_a_branched_run_is_the_run_from_scratch(scratch, shared_folder, tmp_path, capsys, name, flags, source):
    out = tmp_path / name
    warmup = scratch[source] / "warmup_end.pt"
    rc, stdout, _ = run_cli(["--data-dir", shared_folder, "--output-dir", out, *TINY, *flags,
                             "--from-warmup", warmup], capsys)
    assert rc == 0
    assert f"Warmup: epochs 1-1 are those of {warmup} (--from-warmup" in stdout
    assert "Branched from epoch 1 of 2" in stdout
    assert _rows(scratch[source])[0] == _rows(scratch[name])[0]  # stage 1 is one experiment
    assert _rows(out) == _rows(scratch[name])  # every field of every epoch, BR and bins included
    assert [json.loads(line)["epoch"] for line in (out / "timing.jsonl").read_text().splitlines()] == [1, 2]
    for f in ("last.pt", "best.pt", "warmup_end.pt", "summary.json"):
        assert (out / f).exists()
    mine = torch.load(out / "last.pt", weights_only=True)
    theirs = torch.load(scratch[name] / "last.pt", weights_only=True)
    assert all(torch.equal(mine["model"][k], theirs["model"][k]) for k in theirs["model"])
    config = json.loads((out / "config.json").read_text())
    assert config["flags"]["from_warmup"] == str(warmup)
    assert config["derived"]["warmup_source"]["epochs"] == 1
    # warmup_end.pt holds this run's flags, so that it evaluates and plots as this run's
    assert torch.load(out / "warmup_end.pt", weights_only=True)["config"]["flags"]["lambda_br_act"] == \
        float(flags[flags.index("--lambda-br-act") + 1])


def test_moving_target_with_frozen_alpha_is_the_stable_run(scratch, shared_folder, tmp_path, capsys):
    """With every α frozen after warmup, A-BR's gradient to α has nothing to move: W+A moving = W+A stable."""
    out = tmp_path / "wa-moving"
    rc, stdout, _ = run_cli(["--data-dir", shared_folder, "--output-dir", out, *TINY, *WA_MOVING,
                             "--from-warmup", scratch["lsq"] / "warmup_end.pt"], capsys)
    assert rc == 0
    assert "the target k·α cannot move, and the run is the one without --br-backprop-to-alpha-act" in stdout
    assert _rows(out) == _rows(scratch["wa-stable"])


def test_a_br_weighted_to_nothing_trains_as_w_only(scratch, shared_folder, tmp_path):
    """Turning A-BR on changes the run through its loss term alone (the study reads W+A stable − W-only as
    A-BR's effect): at λ_a = 1e-30, whose term and gradient vanish in float32 rounding against CE's, the
    weights, step sizes and BatchNorm statistics end exactly as W-only's, though A-BR is computed and logged."""
    out = tmp_path / "wa-null"
    flags = ["--lambda-br", "1", "--lambda-br-act", "1e-30", "--freeze-alpha"]  # W_ONLY but λ_a
    assert run_cli(["--data-dir", shared_folder, "--output-dir", out, *TINY, *flags,
                    "--from-warmup", scratch["lsq"] / "warmup_end.pt"])[0] == 0
    assert _rows(out)[1]["br_a"] > 0 and _rows(scratch["w-only"])[1]["br_a"] == 0
    mine = torch.load(out / "last.pt", weights_only=True)["model"]
    theirs = torch.load(scratch["w-only"] / "last.pt", weights_only=True)["model"]
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)


def test_a_branched_run_resumes_like_any_other(scratch, shared_folder, tmp_path, monkeypatch, capsys):
    out = tmp_path / "w-only"
    argv = ["--data-dir", shared_folder, "--output-dir", out, *TINY, *W_ONLY,
            "--from-warmup", scratch["lsq"] / "warmup_end.pt", "--resume", "auto"]
    with monkeypatch.context() as m:
        signal_in_epoch(m, 2, signal.SIGTERM)
        rc, stdout, _ = run_cli(argv, capsys)
    assert rc == 128 + signal.SIGTERM and "--resume auto: starting a new run" in stdout
    assert [r["epoch"] for r in _rows(out)] == [1] and not (out / "summary.json").exists()
    rc, stdout, _ = run_cli(argv, capsys)  # the same command: continues from this run's last.pt (epoch 1)
    assert rc == 0 and "continuing the run from last.pt" in stdout and "Resumed from epoch 1 of 2" in stdout
    assert _rows(out) == _rows(scratch["w-only"])
    rc, stdout, _ = run_cli(argv, capsys)
    assert rc == 0 and "this run is finished" in stdout
    rc, _, err = run_cli(["--resume", "--output-dir", out, "--lambda-br-act", "1"], capsys)  # its own experiment
    assert rc == 2 and "--lambda-br-act 1.0 (run: 0.0)" in err


def test_a_different_stage_1_is_refused(scratch, shared_folder, tmp_path, capsys):
    warmup = scratch["lsq"] / "warmup_end.pt"
    base = ["--data-dir", shared_folder, "--output-dir", tmp_path / "run", *TINY, *W_ONLY, "--from-warmup", warmup]
    rc, _, err = run_cli(base + ["--epochs", "3", "--seed", "7"], capsys)  # later flags win in argparse
    assert rc == 2
    assert f"--from-warmup {warmup}: this run's stage 1 would not be the warmup's: " in err
    assert "--epochs 3 (warmup: 2); --seed 7 (warmup: 42)" in err
    rc, _, err = run_cli(base + ["--num-bits", "3"], capsys)
    assert rc == 2 and "--num-bits 3 (warmup: 2)" in err
    rc, _, err = run_cli(base[:-1] + [scratch["lsq"] / "last.pt"], capsys)  # epoch 2 of 2: not a warmup's end
    assert rc == 2 and "not the end of a warmup (it is epoch 2 of a run with --warmup-epochs 1)" in err
    rc, _, err = run_cli(base + ["--resume"], capsys)
    assert rc == 2 and "--from-warmup starts a new run from a warmup and --resume continues a run" in err
    assert not (tmp_path / "run").exists()


def test_a_warmup_without_its_logs_is_refused(scratch, shared_folder, tmp_path, capsys):
    lonely = tmp_path / "elsewhere"
    lonely.mkdir()
    (lonely / "warmup_end.pt").write_bytes((scratch["lsq"] / "warmup_end.pt").read_bytes())
    rc, _, err = run_cli(["--data-dir", shared_folder, "--output-dir", tmp_path / "run", *TINY, *W_ONLY,
                          "--from-warmup", lonely / "warmup_end.pt"], capsys)
    assert rc == 2 and f"{lonely / 'metrics.jsonl'} does not hold one row for each of epochs 1-1" in err


def test_a_run_that_trained_its_own_warmup_stays_one(scratch, shared_folder, tmp_path, monkeypatch, capsys):
    """A sweep's run started before its warmup existed, then resumed by a command with --from-warmup."""
    out = tmp_path / "w-only"
    argv = ["--data-dir", shared_folder, "--output-dir", out, *TINY, *W_ONLY, "--resume", "auto"]
    with monkeypatch.context() as m:
        signal_in_epoch(m, 2, signal.SIGTERM)
        assert run_cli(argv, capsys)[0] == 128 + signal.SIGTERM
    rc, stdout, _ = run_cli(argv + ["--from-warmup", scratch["lsq"] / "warmup_end.pt"], capsys)
    assert rc == 0 and "Resumed from epoch 1 of 2" in stdout
    assert json.loads((out / "config.json").read_text())["flags"]["from_warmup"] is None
    assert _rows(out) == _rows(scratch["w-only"])


def test_a_run_continues_only_on_the_training_set_it_trained_on(scratch, tmp_path, capsys):
    """The warmups trained on 40 images per epoch (4 per class); a folder of 3 per class has 30. --data-dir
    itself may differ (the same data elsewhere); other images may not."""
    other = make_image_folder(tmp_path / "other", train_per_class=3)
    warmup = scratch["lsq"] / "warmup_end.pt"
    for how, folder in ((["--from-warmup", warmup, *TINY, *W_ONLY], "branch"), (["--resume", warmup], "resume")):
        rc, _, err = run_cli(["--data-dir", other, "--output-dir", tmp_path / folder, *how], capsys)
        flag = f"--from-warmup {warmup}" if folder == "branch" else "--resume"
        assert rc == 2 and err.startswith(f"error: {flag}: the run trained on 40 images per epoch, this one would "
                                          f"train on 30 (--data-dir {other}, --train-subset None"), err
        assert not (tmp_path / folder).exists()


def _sha256_of_labels(labels):
    """The digest worked out apart from ``Split.label_digest``: each label as 8 little-endian bytes."""
    return hashlib.sha256(b"".join(struct.pack("<q", label) for label in labels)).hexdigest()


def test_the_label_digest_is_the_labels_in_order():
    images = torch.zeros(4, 3, 32, 32, dtype=torch.uint8)
    split = Split(images, torch.tensor([0, 1, 1, 2]))
    assert split.label_digest() == _sha256_of_labels([0, 1, 1, 2])
    assert Split(images + 7, torch.tensor([0, 1, 1, 2])).label_digest() == split.label_digest()  # pixels aside
    assert Split(images, torch.tensor([1, 0, 1, 2])).label_digest() != split.label_digest()


def test_a_run_continues_only_on_the_labels_it_trained_on(scratch, tmp_path, capsys):
    """A folder with the warmups' 40 training images per epoch, one airplane moved to the automobiles:
    the count agrees, the labels in training order do not."""
    assert json.loads((scratch["lsq"] / "config.json").read_text())["derived"]["train_labels_sha256"] == \
        _sha256_of_labels([c for c in range(10) for _ in range(4)])  # the class-sorted folder, 4 per class
    other = make_image_folder(tmp_path / "other", train_per_class=4)
    os.rename(os.path.join(other, "train", "airplane", "0003.png"), os.path.join(other, "train", "automobile",
                                                                                 "0004.png"))
    warmup = scratch["lsq"] / "warmup_end.pt"
    for how, folder in ((["--from-warmup", warmup, *TINY, *W_ONLY], "branch"), (["--resume", warmup], "resume")):
        rc, _, err = run_cli(["--data-dir", other, "--output-dir", tmp_path / folder, *how], capsys)
        flag = f"--from-warmup {warmup}" if folder == "branch" else "--resume"
        assert rc == 2 and err.startswith(f"error: {flag}: the run's training images had other labels, or came in "
                                          f"another order, than this one's (--data-dir {other}, "), err
        assert not (tmp_path / folder).exists()
