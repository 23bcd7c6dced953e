"""Progress lines with ETAs when the output is a file, and the run's ETA on a terminal's bar."""

import io
import re

import pytest
import torch
from tqdm import tqdm

from conftest import run_cli
from engine import Trainer
from models.resnet import CifarResNet
from quant import quantize_model
from run.config import build_parser
from run.data import DeviceLoader, Split
from run.progress import EpochProgress, format_duration, typical_epoch_seconds


class FakeClock:
    def __init__(self, step_seconds):
        self.now, self.step_seconds = 100.0, step_seconds

    def __call__(self):
        return self.now

    def tick(self):
        self.now += self.step_seconds


def test_format_duration():
    assert [format_duration(s) for s in (0, 42.9, 60, 220, 3599, 3600, 18720, -3)] == [
        "0s", "42s", "1m00s", "3m40s", "59m59s", "1h00m", "5h12m", "0s"]


def test_later_epochs_are_expected_to_last_the_median_finished_epoch():
    # one epoch of four stretched by a suspended process (600 s) must not set the pace: the median of
    # 30, 31, 600, 29 is (30 + 31) / 2 = 30.5 s (their mean would be 172.5 s)
    assert typical_epoch_seconds([30.0, 31.0, 600.0, 29.0]) == 30.5
    assert typical_epoch_seconds([42.0]) == 42.0
    assert typical_epoch_seconds([]) is None


def test_lines_at_the_interval_with_rate_and_both_etas():
    # epoch 3 of 5, 10 steps of 100 images, 2 s per step; later epochs take 30 s each (the median finished epoch)
    clock, lines = FakeClock(2.0), []
    progress = EpochProgress(3, 5, 10, 30.0, interval=5.0, log=lines.append, clock=clock)
    for _ in range(10):
        clock.tick()
        progress.step(100)
    # due at t >= 5 s (step 3, t = 6), then >= 11 (step 6, t = 12), >= 17 (step 9, t = 18)
    # step 3: 300 images / 6 s = 50 img/s; 7 steps left x 2 s = 14 s; run: 14 + 2 epochs x 30 s = 74 s
    assert lines == ["epoch 3/5 step 3/10 | 50 img/s | ETA epoch 14s, run 1m14s",
                     "epoch 3/5 step 6/10 | 50 img/s | ETA epoch 8s, run 1m08s",
                     "epoch 3/5 step 9/10 | 50 img/s | ETA epoch 2s, run 1m02s"]


def test_before_any_finished_epoch_later_epochs_are_projected_from_this_one():
    # epoch 1 of 3, 4 steps at 1.5 s: after step 2, 2 steps left = 3 s; each later epoch 4 x 1.5 = 6 s
    clock, lines = FakeClock(1.5), []
    progress = EpochProgress(1, 3, 4, None, interval=3.0, log=lines.append, clock=clock)
    for _ in range(2):
        clock.tick()
        progress.step(8)
    assert lines == ["epoch 1/3 step 2/4 | 5 img/s | ETA epoch 3s, run 15s"]


def test_interval_zero_prints_nothing():
    clock, lines = FakeClock(100.0), []
    progress = EpochProgress(1, 1, 3, None, interval=0, log=lines.append, clock=clock)
    for _ in range(3):
        clock.tick()
        progress.step(1)
    assert lines == []


def test_terminal_bar_shows_the_run_eta():
    stream = io.StringIO()
    clock = FakeClock(2.0)
    bar = tqdm(range(10), total=10, file=stream, disable=False, mininterval=0)
    progress = EpochProgress(3, 5, 10, 30.0, interval=0, log=None, bar=bar, clock=clock)
    for _ in bar:
        clock.tick()
        progress.step(100)
        if progress.steps == 3:
            assert bar.postfix == "run ETA 1m14s"  # as the plain line says at this step
    bar.close()
    assert "run ETA" in stream.getvalue()


def test_cli_prints_progress_lines_when_output_is_not_a_terminal(shared_folder, tmp_path, capsys):
    rc, stdout, _ = run_cli(["--data-dir", shared_folder, "--no-download", "--output-dir", tmp_path / "run",
                             "--num-bits", "32", "--lambda-br", "0", "--lambda-br-act", "0", "--epochs", "2",
                             "--warmup-epochs", "0", "--batch-size", "16", "--workers", "0",
                             "--progress-interval", "1e-9"], capsys)
    assert rc == 0
    # 40 training images in batches of 16: 3 steps per epoch, a line after each
    steps = re.findall(r"^epoch (\d)/2 step (\d)/3 \| \d+ img/s \| ETA epoch \S+, run \S+$", stdout, re.M)
    assert steps == [(e, s) for e in "12" for s in "123"]


@pytest.mark.parametrize("value", ["-1", "nan"])
def test_bad_interval_is_refused(value, tmp_path, capsys):
    rc, _, err = run_cli(["--progress-interval", value, "--data-dir", tmp_path, "--output-dir", tmp_path / "o"],
                         capsys)
    assert rc == 2 and "--progress-interval must be a finite number >= 0" in err


def test_a_resumed_run_paces_its_eta_by_this_process_not_by_the_epochs_before_the_resume(tmp_path):
    # As after a resume of a run whose first 2 epochs took 500,000 s each (another machine): epoch 3
    # of 5 must not be expected to leave 500,000 s for each later one; a 2-step epoch of a tiny net takes < 1 h.
    cfg = build_parser().parse_args(["--epochs", "5", "--warmup-epochs", "0", "--output-dir", str(tmp_path),
                                     "--progress-interval", "1e-9"])
    torch.manual_seed(0)
    model = quantize_model(CifarResNet((1, 1), (4, 8), "A"), 2, 2)
    split = Split(torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8), torch.arange(4))
    cpu, lines = torch.device("cpu"), []
    trainer = Trainer(cfg, model, DeviceLoader(split, 2, cpu, train=True), DeviceLoader(split, 4, cpu, train=False),
                      cpu, log=lines.append)
    resumed = trainer.state_dict(2, {})  # as if epochs 1-2 had run elsewhere, then --resume
    resumed["elapsed"] = 1e6
    trainer.load_state_dict(resumed)
    trainer.run_epoch(3, {})
    runs = re.findall(r"epoch 3/5 step \d/2 \| \d+ img/s \| ETA epoch (\S+), run (\S+)$", "\n".join(lines), re.M)
    assert len(runs) == 2 and all("h" not in run for _, run in runs), lines
    # then an epoch of this process stretched to a day (the machine slept): epoch 5's expected length is
    # the median of this process's epochs (seconds), not their mean (about 7 h)
    trainer.epoch_durations[:0] = [1.0, 1.0]
    trainer.epoch_durations.append(1e5)
    lines.clear()
    trainer.run_epoch(4, {})
    runs = re.findall(r"epoch 4/5 step \d/2 \| \d+ img/s \| ETA epoch (\S+), run (\S+)$", "\n".join(lines), re.M)
    assert len(runs) == 2 and all("h" not in run for _, run in runs), lines
