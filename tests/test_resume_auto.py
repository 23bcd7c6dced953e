"""--resume auto: one command that starts, restarts, continues or skips a run (a job started twice)."""

import json
import signal

from conftest import TINY, run_cli, signal_in_epoch


def _epochs(out):
    return [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_restarts_a_run_without_an_epoch_then_skips_it_once_finished(shared_folder, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text("{}")  # a run killed before its first epoch ended
    argv = ["--resume", "auto", "--output-dir", out, "--data-dir", shared_folder, *TINY]
    rc, stdout, _ = run_cli(argv, capsys)
    assert rc == 0
    assert "--resume auto: starting the run again (it never finished an epoch)" in stdout
    assert _epochs(out) == [1, 2] and json.loads((out / "summary.json").read_text())["status"] == "finished"
    metrics = (out / "metrics.jsonl").read_bytes()

    rc, stdout, _ = run_cli(argv, capsys)  # the same command again: nothing to do
    assert rc == 0 and stdout.strip() == f"{out}: this run is finished (summary.json); nothing to do"
    assert (out / "metrics.jsonl").read_bytes() == metrics

    rc, _, err = run_cli(argv + ["--lambda-br", "0.5"], capsys)  # another experiment in the same folder
    assert rc == 2 and "refusing to change the experiment" in err and "--lambda-br 0.5 (run: 1.0)" in err


def test_continues_an_interrupted_run(shared_folder, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    argv = ["--resume", "auto", "--output-dir", out, "--data-dir", shared_folder, *TINY]
    with monkeypatch.context() as m:
        signal_in_epoch(m, 2, signal.SIGTERM)
        rc, stdout, _ = run_cli(argv, capsys)
    assert rc == 128 + signal.SIGTERM and "--resume auto: starting a new run" in stdout
    assert _epochs(out) == [1] and not (out / "summary.json").exists()

    rc, stdout, _ = run_cli(argv, capsys)  # the same command: a requeued job
    assert rc == 0
    assert "--resume auto: continuing the run from last.pt" in stdout and "Resumed from epoch 1 of 2" in stdout
    assert _epochs(out) == [1, 2] and json.loads((out / "summary.json").read_text())["status"] == "finished"


def test_a_run_named_by_the_old_a_br_default_is_not_missed(tmp_path, monkeypatch, capsys):
    """Before A-BR was off by default, a command without --output-dir and --lambda-br-act named its folder
    ``..._lbra1_...``; the same command now names ``..._lbra0_...``. --resume [auto] refuses, naming both
    folders, rather than start another experiment beside the unfinished run (a requeued job)."""
    monkeypatch.chdir(tmp_path)
    old = tmp_path / "results" / "resnet20_w2a2_fl8_lbr1_lbra1_s42"
    old.mkdir(parents=True)
    (old / "last.pt").write_bytes(b"")  # an unfinished run of the old default (the check reads names only)
    base = ["--epochs", "2", "--warmup-epochs", "1", "--data-dir", "/nonexistent", "--no-download", "--dry-run"]
    for resume in (["--resume", "auto"], ["--resume"]):
        rc, _, err = run_cli([*resume, *base], capsys)
        assert rc == 2 and err.strip() == (
            "error: --resume: no run in results/resnet20_w2a2_fl8_lbr1_lbra0_s42, but "
            "results/resnet20_w2a2_fl8_lbr1_lbra1_s42 holds one, made when A-BR was on by default (λ_a = 1, "
            "the seed's default; now 0): add --lambda-br-act 1 to continue it, or --output-dir "
            "results/resnet20_w2a2_fl8_lbr1_lbra0_s42 for a new run with A-BR off")
    # a new run, an explicit λ_a or folder, or a run already in the new folder: not this check's business
    from run.config import build_parser
    from run.run_folder import refuse_a_run_of_the_old_a_br_default as check
    for argv in (base, ["--resume", "auto", "--lambda-br-act", "0", *base], ["--resume", "auto", "--output-dir",
                                                                             "elsewhere", *base],
                 ["--resume", str(old / "last.pt"), *base]):  # a checkpoint named: its own folder
        check(build_parser().parse_args(argv), argv)
    (tmp_path / "results" / "resnet20_w2a2_fl8_lbr1_lbra0_s42").mkdir()
    (tmp_path / "results" / "resnet20_w2a2_fl8_lbr1_lbra0_s42" / "config.json").write_text("{}")
    argv = ["--resume", "auto", *base]
    check(build_parser().parse_args(argv), argv)
