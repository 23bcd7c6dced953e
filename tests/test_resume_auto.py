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


def test_a_run_named_by_an_old_default_is_not_missed(tmp_path, monkeypatch, capsys):
    """Before A-BR was off by default, a command without --output-dir and --lambda-br-act named its folder
    ``..._lbra1_...``; before BR runs froze α by default, without ``_frz``; the same command now names
    ``..._lbra0_frz_...``. --resume [auto] refuses, naming both folders and the flags that continue the run,
    rather than start another experiment beside the unfinished run (a requeued job)."""
    monkeypatch.chdir(tmp_path)
    results = tmp_path / "results"
    new = "results/resnet20_w2a2_fl8_lbr1_lbra0_frz_s42"
    base = ["--epochs", "2", "--warmup-epochs", "1", "--data-dir", "/nonexistent", "--no-download", "--dry-run"]

    def unfinished(name):  # a run of an old default (the check reads names only)
        (results / name).mkdir(parents=True)
        (results / name / "last.pt").write_bytes(b"")

    unfinished("resnet20_w2a2_fl8_lbr1_lbra1_s42")  # the seed's defaults: A-BR on, α trained
    for resume in (["--resume", "auto"], ["--resume"]):
        rc, _, err = run_cli([*resume, *base], capsys)
        assert rc == 2 and err.strip() == (
            f"error: --resume: no run in {new}, but results/resnet20_w2a2_fl8_lbr1_lbra1_s42 holds one, made when "
            "A-BR was on by default (λ_a = 1, the seed's default; now 0) and step sizes were trained by default: "
            f"add --lambda-br-act 1 --no-freeze-alpha to continue it, or --output-dir {new} for a new run with "
            "today's defaults")
    rc, _, err = run_cli(["--resume", "auto", "--lambda-br-act", "1", *base], capsys)  # today's default: α trained
    assert "results/resnet20_w2a2_fl8_lbr1_lbra1_s42/last.pt is not a readable checkpoint" in err  # it resumes it
    unfinished("resnet20_w2a2_fl8_lbr1_lbra0_s42")  # A-BR off, α trained: the newer of the two old defaults
    rc, _, err = run_cli(["--resume", "auto", *base], capsys)
    assert rc == 2 and err.strip() == (
        f"error: --resume: no run in {new}, but results/resnet20_w2a2_fl8_lbr1_lbra0_s42 holds one, made when step "
        "sizes were trained through stage 2 by default (the seed's default; now runs with W-BR alone freeze them): "
        f"add --no-freeze-alpha to continue it, or --output-dir {new} for a new run with today's defaults")
    # a new run, explicit flags or folder, a checkpoint named, a run already in the new folder: not its business
    from run.config import build_parser, resolve_freeze_alpha
    from run.run_folder import refuse_a_run_of_an_old_default as check

    def passes(argv):
        cfg = build_parser().parse_args(argv)
        resolve_freeze_alpha(cfg)
        check(cfg, argv)
    for argv in (base, ["--resume", "auto", "--lambda-br-act", "0", "--freeze-alpha", *base],
                 ["--resume", "auto", "--output-dir", "elsewhere", *base],
                 ["--resume", str(results / "resnet20_w2a2_fl8_lbr1_lbra1_s42" / "last.pt"), *base]):
        passes(argv)
    (tmp_path / new).mkdir()
    (tmp_path / new / "config.json").write_text("{}")
    passes(["--resume", "auto", *base])


def test_a_run_with_a_br_frozen_by_the_default_of_2026_12_07_is_not_missed(tmp_path, monkeypatch, capsys):
    """On 2026-12-07 a run with A-BR on froze α after the warmup by default (``..._lbra1_frz_...``); now it
    trains α (``..._lbra1_...``). --resume [auto] refuses, naming both folders and --freeze-alpha; a run
    with W-BR alone (frozen then and now) or with its target moving (trained then and now) is not concerned."""
    monkeypatch.chdir(tmp_path)
    base = ["--epochs", "2", "--warmup-epochs", "1", "--data-dir", "/nonexistent", "--no-download", "--dry-run",
            "--lambda-br-act", "1"]
    old, new = "results/resnet20_w2a2_fl8_lbr1_lbra1_frz_s42", "results/resnet20_w2a2_fl8_lbr1_lbra1_s42"
    (tmp_path / old).mkdir(parents=True)
    (tmp_path / old / "last.pt").write_bytes(b"")
    for resume in (["--resume", "auto"], ["--resume"]):
        rc, _, err = run_cli([*resume, *base], capsys)
        assert rc == 2 and err.strip() == (
            f"error: --resume: no run in {new}, but {old} holds one, made when step sizes were frozen after warmup "
            "by default in runs with A-BR on (now they are trained: the CPU study measured W+A stable ahead with "
            f"alpha trained): add --freeze-alpha to continue it, or --output-dir {new} for a new run with today's "
            "defaults")
    (tmp_path / old / "summary.json").write_text('{"status": "finished"}')  # finished: nothing to continue
    _, _, err = run_cli(["--resume", "auto", *base], capsys)
    assert err.strip() == (f"error: --resume: no run in {new}, but {old} holds a finished run, made when step sizes "
                           "were frozen after warmup by default in runs with A-BR on (now they are trained: the CPU "
                           "study measured W+A stable ahead with alpha trained): add --freeze-alpha to name it, or "
                           f"--output-dir {new} for a new run with today's defaults")
    for flags in (["--no-freeze-alpha"], ["--br-backprop-to-alpha-act"],
                  ["--lambda-br-act", "0"]):  # given, a moving target, or W-BR alone: not the old default's folder
        _, _, err = run_cli(["--resume", "auto", *base, *flags], capsys)
        assert "holds one, made when" not in err and "no CIFAR-10 found" in err, (flags, err)  # a new run
