"""--resume takes every flag not given from the run, so the printed resume command works as printed."""

import json
import os
import shlex
import signal
import subprocess

import pytest

from run import run_folder
from run.config import build_parser
from conftest import make_image_folder, run_cli, signal_in_epoch

FLOAT = ["--num-bits", "32", "--lambda-br", "0", "--lambda-br-act", "0"]
TWO_EPOCHS = ["--epochs", "2", "--warmup-epochs", "0", "--batch-size", "16", "--workers", "0"]


def test_printed_resume_command_works_as_printed(tmp_path, monkeypatch, capsys):
    # data in a folder with a space in its name, not the default ./data, never downloaded
    data = make_image_folder(tmp_path / "my data", train_per_class=2, test_per_class=1)
    out = tmp_path / "run dir"
    signal_in_epoch(monkeypatch, 2)
    rc, _, err = run_cli(["--data-dir", data, "--no-download", "--output-dir", out, *FLOAT, *TWO_EPOCHS], capsys)
    assert rc == 128 + signal.SIGINT
    command = err.split("Resume with: ", 1)[1].strip()
    words = shlex.split(command)
    assert words[:2] == ["cd", os.getcwd()] and words[-3:] == ["--resume", "--output-dir", str(out)]
    # the exact line, in a shell started elsewhere
    done = subprocess.run(command, shell=True, cwd="/", capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert done.returncode == 0, done.stderr
    assert "Resumed from epoch 1 of 2" in done.stdout and f"image folder at {data}" in done.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    flags = json.loads((out / "config.json").read_text())["flags"]
    assert flags["data_dir"] == data and flags["no_download"] is True


def _resolve(saved_flags, argv):
    """``run_folder.resolve_resume`` on a fake checkpoint holding ``saved_flags``; returns the config."""
    cfg = build_parser().parse_args(argv)
    ckpt = {"config": {"flags": saved_flags}}
    monkey = pytest.MonkeyPatch()
    monkey.setattr(run_folder, "load_checkpoint", lambda path, what, **_: ckpt)
    try:
        run_folder.resolve_resume(cfg, argv)
    finally:
        monkey.undo()
    return cfg


def test_run_flags_default_to_the_runs_and_may_be_overridden():
    saved = vars(build_parser().parse_args(["--data-dir", "/data/c10", "--no-download", "--tensorboard",
                                            "--workers", "5", "--compile", "--lambda-br", "0.5",
                                            "--output-dir", "elsewhere"]))
    cfg = _resolve(saved, ["--resume", "--output-dir", "here"])
    assert (cfg.data_dir, cfg.no_download, cfg.tensorboard, cfg.workers, cfg.compile) == (
        "/data/c10", True, True, 5, "on")
    assert cfg.lambda_br == 0.5 and cfg.output_dir == "here" and cfg.resume == ""
    cfg = _resolve(saved, ["--resume", "--output-dir", "here", "--data-dir", "/new", "--download",
                           "--no-tensorboard", "--workers", "1", "--compile", "off"])
    assert (cfg.data_dir, cfg.no_download, cfg.tensorboard, cfg.workers, cfg.compile) == (
        "/new", False, False, 1, "off")


def test_tensorboard_added_on_resume_gets_the_earlier_epochs_from_metrics(shared_folder, tmp_path, monkeypatch,
                                                                          capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        signal_in_epoch(m, 2)
        rc, _, _ = run_cli(["--data-dir", shared_folder, "--no-download", "--output-dir", out, *FLOAT,
                            *TWO_EPOCHS], capsys)
    assert rc == 128 + signal.SIGINT and not (out / "tensorboard").exists()
    rc, stdout, _ = run_cli(["--resume", "--output-dir", out, "--tensorboard"], capsys)
    assert rc == 0
    assert "TensorBoard: the run was not logged before; epochs 1-1 written from metrics.jsonl" in stdout
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(s.step, s.value) for s in events.Scalars("acc/test")] == [
        (r["epoch"], pytest.approx(r["test_acc"])) for r in rows]
    # the run now logs to TensorBoard: resuming it again writes nothing twice
    rc, stdout, _ = run_cli(["--resume", "--output-dir", out], capsys)
    assert rc == 0 and "TensorBoard:" not in stdout
