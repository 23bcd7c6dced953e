"""summarize.py on hand-made run folders (finished, failed, interrupted, unfinished), and the sweep's plan."""

import csv
import json
import math
import os
import socket
import subprocess
import sys

import pytest

from run import config
from analysis import summarize

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write_run(folder, *, seed, lambda_br, lambda_br_act, abp=False, epochs=10, workers=2,
               summary=None, metrics=(), exit_code=None, log=None, with_config=True):
    """A run folder as cifar10_qat_br.py (and scripts/sweep.sh) leave it."""
    os.makedirs(folder, exist_ok=True)
    if with_config:
        argv = ["--seed", str(seed), "--lambda-br", str(lambda_br), "--lambda-br-act", str(lambda_br_act),
                "--epochs", str(epochs), "--warmup-epochs", "3", "--workers", str(workers),
                "--output-dir", str(folder)]
        if abp:
            argv.append("--br-backprop-to-alpha-act")
        flags = vars(config.build_parser().parse_args(argv))
        derived = {"weight_bits": 2, "act_bits": 2, "first_last_bits": 8, "float_run": False}
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump({"flags": flags, "derived": derived}, f)
    with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
        for epoch, acc in metrics:
            f.write(json.dumps({"epoch": epoch, "epochs": epochs, "test_acc": acc, "best_test_acc": acc,
                                "best_epoch": epoch}) + "\n")
    if summary is not None:
        final, best, wall = summary
        with open(os.path.join(folder, "summary.json"), "w") as f:
            json.dump({"status": "finished", "final_test_acc": final, "best_test_acc": best, "best_epoch": 9,
                       "epochs": epochs, "wall_time_s": wall}, f)
    if exit_code is not None:
        with open(os.path.join(folder, "sweep_exit_code"), "w") as f:
            f.write(f"{exit_code}\n")
    if log is not None:
        with open(os.path.join(folder, "train.log"), "w") as f:
            f.write(log)


@pytest.fixture
def runs_dir(tmp_path):
    root = tmp_path / "runs"
    # W-only, two seeds: final 90, 92 -> mean 91, sample std sqrt(2) = 1.41; best 91, 93 -> 92 ± 1.41;
    # wall 100 s and 300 s -> mean 200 s = 3m20s. --workers differs: not part of the experiment.
    _write_run(root / "a_s1", seed=1, lambda_br=1, lambda_br_act=0, summary=(90.0, 91.0, 100.0), workers=0,
               metrics=[(10, 90.0)])
    _write_run(root / "a_s2", seed=2, lambda_br=1, lambda_br_act=0, summary=(92.0, 93.0, 300.0), workers=4,
               metrics=[(10, 92.0)])
    # LSQ baseline: seed 1 finished (85.5 / 86.0, 3700 s = 1h01m); seed 2 failed with NaNs after 3 epochs.
    _write_run(root / "b_s1", seed=1, lambda_br=0, lambda_br_act=0, summary=(85.5, 86.0, 3700.0),
               metrics=[(10, 85.5)])
    _write_run(root / "b_s2", seed=2, lambda_br=0, lambda_br_act=0, metrics=[(1, 20.0), (2, 30.0), (3, 40.0)],
               exit_code=3, log="Epoch 3/10 ...\nerror: non-finite loss at epoch 4 step 7 (ce=nan). Stopped\n")
    # W+A moving target, in a sub-folder: seed 1 still running (2 of 10 epochs), seed 2 interrupted (Ctrl-C).
    _write_run(root / "nested" / "c_s1", seed=1, lambda_br=1, lambda_br_act=1, abp=True,
               metrics=[(1, 11.0), (2, 12.5)])
    _write_run(root / "nested" / "c_s2", seed=2, lambda_br=1, lambda_br_act=1, abp=True,
               metrics=[(1, 10.0)], exit_code=130)
    # A run that failed before writing its config (a bad --pretrained path).
    _write_run(root / "e_s1", seed=1, lambda_br=1, lambda_br_act=0, with_config=False, exit_code=2,
               log="error: --pretrained: no checkpoint at /nope.pt\n")
    os.remove(root / "e_s1" / "metrics.jsonl")
    # Not a run: a folder without any run file is ignored; a run's tensorboard/ is not searched.
    os.makedirs(root / "empty")
    os.makedirs(root / "a_s1" / "tensorboard")
    return str(root)


def test_markdown_table_by_hand(runs_dir):
    markdown, _, _ = summarize.build_tables(summarize.find_runs(runs_dir))
    lines = markdown.splitlines()
    # λ_w, λ_a and A-BR→α vary between configurations; seed, workers, output folder do not count.
    # The fixture's summaries are of runs before --val-split ("best_test_acc"): selected on test.
    header = ("| scenario | λ_w | λ_a | A-BR→α | seeds | final test top-1 (%) | "
              "best test epoch top-1 (%; selected on test, optimistic) | epochs | wall time / run | runs |")
    i = lines.index(header)
    assert lines[i + 2:i + 5] == [
        "| W-only, α trained | 1 | 0 | no | 1,2 | 91.00 ± 1.41 | 92.00 ± 1.41 | 10 | 3m20s | 2/2 finished |",
        "| W+A moving target, α trained | 1 | 1 | yes | – | – | – | 10 | – "
        "| 0/2 finished, 1 unfinished, 1 interrupted |",
        "| LSQ baseline | 0 | 0 | no | 1 | 85.50 | 86.00 | 10 | 1h01m | 1/2 finished, 1 failed |",
    ]
    assert len([line for line in lines if line.startswith("| ")]) == 4  # header + 3 configurations
    assert lines[0].startswith("7 run(s), 3 finished, 3 configuration(s).")
    not_finished = [line for line in lines if line.startswith("- ")]
    assert len(not_finished) == 4  # every run that did not finish is listed, one line each
    failed = next(line for line in not_finished if line.startswith("- `b_s2`"))
    assert "failed" in failed and "exit 3" in failed and "3/10 epochs done" in failed and "40.00%" in failed
    assert "non-finite loss at epoch 4 step 7" in failed
    running = next(line for line in not_finished if line.startswith(f"- `{os.path.join('nested', 'c_s1')}`"))
    assert "unfinished" in running and "2/10 epochs done" in running
    stopped = next(line for line in not_finished if line.startswith(f"- `{os.path.join('nested', 'c_s2')}`"))
    assert "interrupted" in stopped and "exit 130" in stopped
    early = next(line for line in not_finished if line.startswith("- `e_s1`"))
    assert "failed" in early and "no epoch finished" in early and "--pretrained: no checkpoint" in early


def test_command_writes_markdown_and_csvs(runs_dir, capsys):
    assert summarize.main([runs_dir, "--quiet"]) == 0
    assert "Wrote" in capsys.readouterr().err
    with open(os.path.join(runs_dir, "summary.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [r["scenario"] for r in rows] == ["W-only, α trained", "W+A moving target, α trained", "LSQ baseline"]
    w_only = rows[0]
    assert float(w_only["final_top1_mean"]) == pytest.approx(91.0)
    assert float(w_only["final_top1_std"]) == pytest.approx(math.sqrt(2))
    assert float(w_only["best_test_top1_optimistic_mean"]) == pytest.approx(92.0)
    assert w_only["test_top1_at_best_val_mean"] == ""  # no run held out a validation set
    assert float(w_only["wall_time_s_mean"]) == pytest.approx(200.0)
    assert (w_only["seeds"], w_only["n_finished"], w_only["n_runs"]) == ("1 2", "2", "2")
    assert rows[2]["final_top1_std"] == ""  # one finished seed: no spread
    assert rows[1]["final_top1_mean"] == "" and rows[1]["n_finished"] == "0"
    with open(os.path.join(runs_dir, "summary_runs.csv")) as f:
        runs = {r["run"]: r for r in csv.DictReader(f)}
    assert len(runs) == 7
    assert runs["b_s2"]["status"] == "failed" and runs["b_s2"]["epochs_done"] == "3"
    assert runs["b_s2"]["final_top1"] == "40.0"  # the last finished epoch, for the record
    assert runs[os.path.join("nested", "c_s2")]["status"] == "interrupted"
    assert runs["e_s1"]["status"] == "failed" and runs["e_s1"]["scenario"] == ""
    assert runs["a_s2"]["final_top1"] == "92.0" and runs["a_s2"]["seed"] == "2"
    with open(os.path.join(runs_dir, "summary.md")) as f:
        assert "| W-only, α trained | 1 | 0 | no | 1,2 | 91.00 ± 1.41 |" in f.read()


def test_out_prefix(runs_dir, tmp_path):
    prefix = str(tmp_path / "tables" / "w2a2")
    assert summarize.main([runs_dir, "--out", prefix, "--quiet"]) == 0
    for suffix in (".md", ".csv", "_runs.csv"):
        assert os.path.getsize(prefix + suffix) > 0


def test_one_finished_run_folder_alone(runs_dir):
    markdown, rows, _ = summarize.build_tables(summarize.find_runs(os.path.join(runs_dir, "a_s1")))
    assert rows[0]["final_top1_mean"] == 90.0 and rows[0]["n_finished"] == 1
    assert "| W-only, α trained | 1 | 90.00 | 91.00 | 10 | 1m40s | 1/1 finished |" in markdown
    assert "Not finished" not in markdown


@pytest.mark.parametrize("make", ["missing", "empty"])
def test_bad_runs_dir_is_one_error_line(tmp_path, capsys, make):
    path = tmp_path / "runs"
    if make == "empty":
        os.makedirs(path / "nothing_here")
    assert summarize.main([str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and str(path) in err[0]


def test_sweep_dry_run_skips_finished_resumes_and_restarts(tmp_path):
    runs = tmp_path / "sweep"
    _write_run(runs / "w-only_w2a2_lam1_frz_s1", seed=1, lambda_br=1, lambda_br_act=0, summary=(90.0, 91.0, 1.0))
    os.makedirs(runs / "wa-stable_w2a2_lam1_frz_s1")
    open(runs / "wa-stable_w2a2_lam1_frz_s1" / "last.pt", "w").close()
    os.makedirs(runs / "a-only_w2a2_lam1_frz_s1")
    open(runs / "a-only_w2a2_lam1_frz_s1" / "config.json", "w").close()
    env = dict(os.environ, RUNS_DIR=str(runs), DATA_DIR="/data", SEEDS="1", BITS="2 w2a4", LAMBDAS="1 0.5")
    out = subprocess.run(["bash", os.path.join(REPO, "scripts", "sweep.sh"), "-n", "--", "--no-download"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    status = {}
    for line in out.stdout.splitlines():
        if line.startswith("["):
            name, _, what = line.split("] ", 1)[1].partition(": ")
            status[name] = what
    # 2 widths x (4 scenarios x 2 λ + 1 baseline) = 18 runs.
    assert len(status) == 18
    assert status["w-only_w2a2_lam1_frz_s1"] == "finished, skipped"
    assert status["wa-stable_w2a2_lam1_frz_s1"] == "resume"
    assert status["a-only_w2a2_lam1_frz_s1"].startswith("restart")
    assert status["lsq_w2a4_s1"] == "new" and "lsq_w2a4_lam0.5_s1" not in status
    assert status["wa-moving_w2a4_lam0.5_frz_s1"] == "new"
    lines = out.stdout.splitlines()
    at = next(i for i, line in enumerate(lines) if "--output-dir " + str(runs / "wa-moving_w2a4_lam0.5_frz_s1") in line)
    for piece in ("--num-bits-weight 2", "--num-bits-act 4", "--lambda-br 0.5", "--lambda-br-act 0.5",
                  "--freeze-alpha", "--br-backprop-to-alpha-act", "--seed 1", "--data-dir /data", "--no-download"):
        assert piece in lines[at]
    # the seed's four BR rows freeze α, its baseline does not; every run of a width shares one warmup
    assert "--freeze-alpha" not in next(line for line in lines if "lsq_w2a4_s1 " in line + " " and "--resume" in line)
    assert lines[at + 1] == (f"    (--from-warmup {runs / 'w-only_w2a4_lam1_frz_s1' / 'warmup_end.pt'} once it "
                             f"exists; else its own warmup)")
    # w-only_w2a2's warmup exists (a finished run keeps it): its branches take it now
    open(runs / "w-only_w2a2_lam1_frz_s1" / "warmup_end.pt", "w").close()
    out = subprocess.run(["bash", os.path.join(REPO, "scripts", "sweep.sh"), "-n", "--", "--no-download"],
                         env=env, capture_output=True, text=True, timeout=60)
    lsq = next(line for line in out.stdout.splitlines() if "lsq_w2a2_s1 " in line + " " and "--resume" in line)
    assert f"--from-warmup {runs / 'w-only_w2a2_lam1_frz_s1' / 'warmup_end.pt'} --no-download --resume auto" in lsq
    resume = next(line for line in lines if "wa-stable_w2a2_lam1_frz_s1 " in line + " " and "--resume" in line)
    assert resume.rstrip().endswith("--resume auto")  # the same command for every run: cifar10_qat_br.py decides
    assert not os.path.exists(runs / "wa-moving_w2a4_lam0.5_frz_s1")  # a dry run creates nothing


@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_sweep_help_exits_0_with_the_usage(flag, tmp_path):
    env = dict(os.environ, RUNS_DIR=str(tmp_path / "s"))
    out = subprocess.run(["bash", os.path.join(REPO, "scripts", "sweep.sh"), flag], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stderr == ""
    lines = out.stdout.splitlines()
    assert "  usage: scripts/sweep.sh [-h] [-n] [--slurm [--submit]] [-- EXTRA FLAGS FOR cifar10_qat_br.py]" in lines
    assert lines[-1] == "Exit status: 0 every run finished; 1 some run failed; 130/143 interrupted."
    assert not any(line.startswith("#") for line in lines) and not os.path.exists(tmp_path / "s")


def test_sweep_rejects_bad_settings(tmp_path):
    env = dict(os.environ, RUNS_DIR=str(tmp_path / "s"), SCENARIOS="w-only nonsense")
    out = subprocess.run(["bash", os.path.join(REPO, "scripts", "sweep.sh"), "-n"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr.strip().startswith("error: SCENARIOS: unknown scenario 'nonsense'")


@pytest.mark.parametrize("extra,variable", [("--optimizer adam", "OPTIMIZERS"), ("--optim=adam", "OPTIMIZERS"),
                                            ("--clip-value 6", "CLIPS"), ("--seed 1", "SEEDS"),
                                            ("--num-bits-act 4", "BITS"), ("--no-freeze-alpha", "SCENARIOS")])
def test_sweep_refuses_extra_flags_that_the_grid_sets(extra, variable, tmp_path):
    """An extra flag would run another experiment than the folder's name says (lsq_w2a2_s42 with Adam)."""
    env = dict(os.environ, RUNS_DIR=str(tmp_path / "s"), SCENARIOS="lsq", SEEDS="42", BITS="2")
    out = subprocess.run(["bash", os.path.join(REPO, "scripts", "sweep.sh"), "-n", "--", "--no-download",
                          *extra.split()], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith(f"error: extra flag {extra.split()[0]}: the grid sets ")
    assert f"(use {variable})" in out.stderr


def test_a_run_whose_last_pt_is_ahead_of_its_log_is_not_called_empty(tmp_path):
    """A failed write after last.pt of epoch 1 and before its metrics line (exit 4): the epoch is kept."""
    root = tmp_path / "runs"
    _write_run(root / "a_s1", seed=1, lambda_br=1, lambda_br_act=0, exit_code=4)
    (root / "a_s1" / "last.pt").write_bytes(b"")
    run = summarize.read_run(str(root), "a_s1")
    assert run.status == "failed" and "no epoch finished" not in run.reason
    assert "no epoch logged, but last.pt holds one (--resume logs it)" in run.reason


def test_how_to_run_flags_never_split_configurations():
    # Flags that may change on --resume (config.RUN_FLAGS) say how a run ran, not what it is.
    # --from-warmup says where epochs 1..W came from: a branched run is the run from scratch (test_from_warmup)
    assert config.RUN_FLAGS | config.HISTORY_FLAGS <= summarize.IGNORED_FLAGS


def test_running_pending_and_stale_runs(tmp_path):
    root = tmp_path / "runs"
    host = socket.gethostname()
    # started by a sweep that still runs (this test's own pid), 1 of 10 epochs done
    _write_run(root / "live_s1", seed=1, lambda_br=1, lambda_br_act=0, metrics=[(1, 11.0)])
    (root / "live_s1" / "sweep_running").write_text(f"host={host} pid={os.getpid()} since=2026-01-01T10:00:00\n")
    # a SLURM task on another node: taken at its word
    os.makedirs(root / "node_s1")
    (root / "node_s1" / "sweep_running").write_text("host=node17 pid=4242 slurm_job=77_3 since=2026-01-01T10:00:00\n")
    # a marker left by a sweep killed with kill -9 (no such process on this host)
    _write_run(root / "dead_s1", seed=1, lambda_br=0, lambda_br_act=0, metrics=[(1, 11.0)])
    (root / "dead_s1" / "sweep_running").write_text(f"host={host} pid=999999999 since=2026-01-01T10:00:00\n")
    # the sweep's plan: two of its runs have no folder yet
    (root / "sweep_plan.tsv").write_text("live_s1\t--seed 1\nnode_s1\t--seed 1\nnew_s1\t--seed 1\nnew_s2\t--seed 2\n")
    runs = {r.path: r for r in summarize.find_runs(str(root))}
    assert {p: r.status for p, r in runs.items()} == {
        "live_s1": "running", "node_s1": "running", "dead_s1": "unfinished", "new_s1": "pending", "new_s2": "pending"}
    assert "1/10 epochs done" in runs["live_s1"].reason and f"pid {os.getpid()}" in runs["live_s1"].reason
    assert "SLURM job 77_3" in runs["node_s1"].reason and "on node17" in runs["node_s1"].reason
    assert "gone without an exit status" in runs["dead_s1"].reason
    markdown, _, _ = summarize.build_tables(list(runs.values()))
    assert "- `new_s2`: pending: not started yet (planned in sweep_plan.tsv)" in markdown.splitlines()


def _sweep(args, env, cwd=None):
    return subprocess.run(["bash", os.path.join(REPO, "scripts", "sweep.sh"), *args], env=dict(os.environ, **env),
                          capture_output=True, text=True, timeout=60, cwd=cwd)


def test_slurm_script_runs_each_grid_point_as_a_task(tmp_path):
    runs = tmp_path / "grid"
    _write_run(runs / "w-only_w2a2_lam1_frz_s7", seed=7, lambda_br=1, lambda_br_act=0, summary=(90.0, 91.0, 1.0))
    env = {"RUNS_DIR": str(runs), "SEEDS": "7 8", "SCENARIOS": "w-only lsq", "EPOCHS": "5",
           "CPUS": "2", "TIME": "30", "PARTITION": "gpu-short"}
    out = _sweep(["--slurm", "--", "--no-download", "--device", "cpu"], env)
    assert out.returncode == 0, out.stderr
    script = (runs / "sweep.sbatch").read_text().splitlines()
    # points 0-3: w-only s7 (finished: no task), lsq s7, w-only s8, lsq s8
    assert "#SBATCH --array=1,2,3" in script and "#SBATCH --gres=gpu:1" in script
    for line in ("#SBATCH --cpus-per-task=2", "#SBATCH --time=30", "#SBATCH --partition=gpu-short",
                 "#SBATCH --requeue", "#SBATCH --signal=B:USR1@120", f"export RUNS_DIR={runs}", "export EPOCHS=5"):
        assert line in script
    assert script[-1].endswith('--task "$SLURM_ARRAY_TASK_ID" -- --no-download --device cpu')
    # each task's torch uses the task's CPUs, not every core of the node (unless OMP_NUM_THREADS is set)
    threads = next(line for line in script if "OMP_NUM_THREADS" in line) + '; echo "$OMP_NUM_THREADS"'
    for env_in, expected in (({"SLURM_CPUS_PER_TASK": "2"}, "2"),
                             ({"SLURM_CPUS_PER_TASK": "2", "OMP_NUM_THREADS": "3"}, "3"), ({}, "1")):
        shell = subprocess.run(["bash", "-c", threads], env={"PATH": os.environ["PATH"], **env_in},
                               capture_output=True, text=True)
        assert shell.stdout.strip() == expected, (env_in, shell)
    assert f"sbatch {runs}/sweep.sbatch" in out.stdout
    assert (runs / "sweep_plan.tsv").read_text().splitlines()[3].startswith("lsq_w2a2_s8\t")
    no_gpu = _sweep(["-n", "--slurm"], dict(env, GPUS="0", MAX_RUNNING="2"))
    assert "#SBATCH --array=1,2,3%2" in no_gpu.stdout and "--gres" not in no_gpu.stdout

    # task 3 runs what the local sweep runs for that point (PYTHON=echo prints it instead)
    local = _sweep(["-n", "--", "--no-download", "--device", "cpu"], env).stdout.splitlines()
    wanted = local[local.index("[4/4] lsq_w2a2_s8: new") + 1].split()[1:]
    task = _sweep(["--task", "3", "--", "--no-download", "--device", "cpu"], dict(env, PYTHON="echo"))
    assert task.returncode == 0, task.stderr
    assert task.stdout.splitlines()[-1].split() == wanted and wanted[-2:] == ["--resume", "auto"]
    assert not (runs / "lsq_w2a2_s8" / "sweep_running").exists()  # removed when the run ended
    bad = _sweep(["--task", "4"], env)
    assert bad.returncode == 2 and bad.stderr.startswith("error: --task: '4' is not a grid point (0-3)")


def test_sweep_skips_a_run_that_another_sweep_is_running(tmp_path):
    runs = tmp_path / "sweep"
    for name, pid in (("w-only_w2a2_lam1_frz_s1", os.getpid()), ("lsq_w2a2_s1", 999999999)):
        os.makedirs(runs / name)
        (runs / name / "sweep_running").write_text(f"host={socket.gethostname()} pid={pid} since=2026-01-01T10:00:00\n")
    out = _sweep(["-n"], {"RUNS_DIR": str(runs), "SEEDS": "1", "SCENARIOS": "w-only lsq"})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert f"[1/2] w-only_w2a2_lam1_frz_s1: running elsewhere (host={socket.gethostname()} pid={os.getpid()} " \
           f"since=2026-01-01T10:00:00), skipped" in lines
    assert "[2/2] lsq_w2a2_s1: new" in lines  # a marker whose process is gone does not hold the run


def test_sweep_grid_of_clips_and_optimizers_locally_and_on_slurm(tmp_path):
    runs = tmp_path / "grid"
    env = {"RUNS_DIR": str(runs), "SEEDS": "7", "SCENARIOS": "w-only ptq", "CLIPS": "none 6",
           "OPTIMIZERS": "sgd adam", "PRETRAINED": "/f.pt"}
    local = _sweep(["-n"], env)
    assert local.returncode == 0, local.stderr
    lines = local.stdout.splitlines()
    names = [line.split("] ", 1)[1].split(":")[0] for line in lines if line.startswith("[")]
    # the default clip and optimizer keep the old names; PTQ has no optimizer: once per clip
    assert names == ["w-only_w2a2_lam1_frz_s7", "ptq_w2a2_s7", "w-only_w2a2_lam1_frz_adam_s7",
                     "w-only_w2a2_lam1_frz_clip6_s7", "ptq_w2a2_clip6_s7", "w-only_w2a2_lam1_frz_clip6_adam_s7"]
    commands = [line for line in lines if line.startswith("    ")]
    assert "--clip-value" not in commands[0] and "--optimizer" not in commands[0]
    assert "--clip-value 6 --optimizer adam" in commands[5] and "--optimizer" not in commands[4]
    slurm = _sweep(["--slurm"], env)
    assert slurm.returncode == 0, slurm.stderr
    script = (runs / "sweep.sbatch").read_text().splitlines()
    assert "#SBATCH --array=0-5" in script and "export CLIPS=none\\ 6" in script
    assert "export OPTIMIZERS=sgd\\ adam" in script
    task = _sweep(["--task", "5"], dict(env, PYTHON="echo"))  # the task of the last point runs its command
    assert task.returncode == 0, task.stderr
    assert task.stdout.splitlines()[-1].split() == commands[5].split()[1:]
    bad = _sweep(["-n"], dict(env, CLIPS="none relu6", OPTIMIZERS="sgd"))
    assert bad.returncode == 2 and bad.stderr.startswith("error: CLIPS: 'relu6' is not 'none' or a number")
    bad = _sweep(["-n"], dict(env, CLIPS="6 0.0"))  # every such run would fail at its start
    assert bad.returncode == 2 and bad.stderr.startswith("error: CLIPS: '0.0' must be > 0")
    bad = _sweep(["-n"], dict(env, OPTIMIZERS="rmsprop"))
    assert bad.returncode == 2 and bad.stderr.startswith("error: OPTIMIZERS: 'rmsprop' is not sgd or adam")


def test_optimizer_and_clip_are_columns_and_old_runs_count_as_sgd(tmp_path):
    root = tmp_path / "runs"
    _write_run(root / "old", seed=1, lambda_br=1, lambda_br_act=0, summary=(90.0, 91.0, 1.0))
    config = json.loads((root / "old" / "config.json").read_text())
    del config["flags"]["optimizer"], config["flags"]["val_split"]  # written before these flags existed
    (root / "old" / "config.json").write_text(json.dumps(config))
    _write_run(root / "new", seed=2, lambda_br=1, lambda_br_act=0, summary=(92.0, 93.0, 1.0))
    _write_run(root / "adam", seed=1, lambda_br=1, lambda_br_act=0, summary=(80.0, 81.0, 1.0))
    config = json.loads((root / "adam" / "config.json").read_text())
    config["flags"].update(optimizer="adam", clip_value=6.0)
    (root / "adam" / "config.json").write_text(json.dumps(config))
    markdown, rows, _ = summarize.build_tables(summarize.find_runs(str(root)))
    assert "| scenario | clip | optimizer | seeds |" in markdown
    assert sorted((r["optimizer"], r["seeds"]) for r in rows) == [("adam", "1"), ("sgd", "1 2")]


def test_jobs_run_side_by_side_and_branches_wait_for_their_warmup(shared_folder, tmp_path):
    """JOBS=2: the group's first run trains the warmup; the other two start from its warmup_end.pt."""
    runs = tmp_path / "runs"
    env = {"RUNS_DIR": str(runs), "DATA_DIR": shared_folder, "SEEDS": "1", "SCENARIOS": "w-only lsq wa-moving",
           "EPOCHS": "2", "WARMUP": "1", "JOBS": "2", "PYTHON": sys.executable}
    out = subprocess.run(["bash", os.path.join(REPO, "scripts", "sweep.sh"), "--", "--batch-size", "16",
                          "--workers", "0", "--no-download", "--device", "cpu"],
                         env={k: v for k, v in dict(os.environ, **env).items() if k != "OMP_NUM_THREADS"},
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"Running 2 at once, OMP_NUM_THREADS={max(len(os.sched_getaffinity(0)) // 2, 1)} each" in out.stdout
    source = runs / "w-only_w2a2_lam1_frz_s1"
    for name in ("lsq_w2a2_s1", "wa-moving_w2a2_lam1_frz_s1"):
        config = json.loads((runs / name / "config.json").read_text())
        assert config["flags"]["from_warmup"] == str(source / "warmup_end.pt")
        assert "Branched from epoch 1 of 2" in (runs / name / "train.log").read_text()
        assert [json.loads(line)["epoch"] for line in open(runs / name / "metrics.jsonl")] == [1, 2]
    assert json.loads((source / "config.json").read_text())["flags"]["from_warmup"] is None
    # the warmup waited for: lsq (point 2) started after w-only's first epoch, not beside it
    started = [line for line in out.stdout.splitlines() if ", started " in line]
    assert [line.split("] ")[1].split(":")[0] for line in started][0] == "w-only_w2a2_lam1_frz_s1"
    assert "3 run(s), 3 finished, 3 configuration(s)." in out.stdout


def test_the_sweeps_scenarios_are_configs(monkeypatch):
    """scripts/sweep.sh's SCENARIO_TABLE (bash) runs exactly config.SCENARIOS' flags, names _frz what freezes, and
    names each folder as benchmarks/gpu_study.py's qat_name does (the GPU study's folders read like a sweep's)."""
    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
    import gpu_study
    out = _sweep(["-n"], {"RUNS_DIR": "/nonexistent/s", "SEEDS": "1", "BITS": "2",
                          "SCENARIOS": " ".join(config.SCENARIOS)})
    assert out.returncode == 0, out.stderr
    commands = [line.split() for line in out.stdout.splitlines() if line.startswith("    python")]
    assert len(commands) == len(config.SCENARIOS)
    for key, command in zip(config.SCENARIOS, commands):
        folder = os.path.basename(command[command.index("--output-dir") + 1])
        flags = command[command.index("--seed") + 2:command.index("--resume")]
        assert folder.startswith(key + "_w2a2") and flags == config.SCENARIOS[key][1].split(), key
        assert ("_frz_" in folder) == ("--freeze-alpha" in flags), folder
        assert folder == gpu_study.qat_name(key, bits=2, seed=1), key


def test_every_scenario_is_named_as_the_readme_names_it():
    for key, (name, flags) in config.SCENARIOS.items():
        assert summarize.scenario(vars(config.build_parser().parse_args(flags.split()))) == name, key
    # as the seed defines them: BR rows freeze α after warmup, the LSQ baseline does not; a run that differs says so
    assert summarize.scenario({"lambda_br": 1.0, "lambda_dampen": 0.1, "freeze_alpha": True}) == "W-only + dampening"
    assert summarize.scenario({"lambda_dampen": 0.1, "freeze_oscillating": "0.1:0.01", "freeze_alpha": True}) == \
        "Oscillation dampening + iterative freezing"
    defaults = config.build_parser().parse_args([])
    config.resolve_freeze_alpha(defaults)
    assert summarize.scenario(vars(defaults)) == "W-only"  # A-BR off, α frozen with BR: by default since the study
    assert summarize.scenario({"lambda_br": 1.0, "freeze_weight_alpha": True}) == "W-only, A α trained"
    assert summarize.scenario({"lambda_br": 1.0, "freeze_act_alpha": True}) == "W-only, W α trained"
    assert summarize.scenario({"lambda_br": 1.0, "freeze_weight_alpha": True, "freeze_act_alpha": True}) == "W-only"
    assert summarize.scenario({"freeze_act_alpha": True}) == "LSQ, A α frozen after warmup"


def test_the_oscillation_column_is_the_mean_of_the_last_epochs(tmp_path):
    for seed, freqs in ((1, [9.0, 2e-4]), (2, [9.0, 4e-4])):
        folder = tmp_path / f"dampen_s{seed}"
        folder.mkdir()
        flags = {**vars(config.build_parser().parse_args(config.SCENARIOS["dampen"][1].split())), "seed": seed,
                 "epochs": 2}
        (folder / "config.json").write_text(json.dumps({"flags": flags, "derived": {"weight_bits": 2}}))
        (folder / "metrics.jsonl").write_text("".join(json.dumps({"epoch": e + 1, "epochs": 2, "test_acc": 50.0,
                                                                   "osc_freq": f}) + "\n"
                                                      for e, f in enumerate(freqs)))
        (folder / "summary.json").write_text(json.dumps({"status": "finished", "final_test_acc": 50.0, "epochs": 2}))
    text, config_rows, run_rows = summarize.build_tables(summarize.find_runs(str(tmp_path)))
    assert "oscillations / weight / step (last epoch)" in text
    # mean of 2e-4 and 4e-4; sample std sqrt(((1e-4)² + (1e-4)²) / 1) = 1.414e-4
    assert "| Oscillation dampening |" in text and "3.00e-04 ± 1.4e-04" in text
    assert config_rows[0]["osc_freq_last_epoch_mean"] == pytest.approx(3e-4)
    assert sorted(r["osc_freq_last_epoch"] for r in run_rows) == [2e-4, 4e-4]


def test_means_of_accuracies_round_as_by_hand():
    """Seed means are exact decimals rounded half away from zero, not their binary neighbours: the study's
    W-only seeds 85.13 and 85.50 average to 85.315 (a float: 85.31499…, which printed as 85.31)."""
    mean, std = summarize.mean_std([85.13, 85.50])
    assert summarize.rounded(mean, ".2f") == "85.32"
    assert summarize.rounded(std, ".2f") == "0.26"  # |85.50 − 85.13| / √2 = 0.2616
    assert summarize.rounded(summarize.mean_std([85.19, 85.06])[0], ".2f") == "85.13"  # LSQ's 85.125: not to even
    assert summarize.rounded(summarize.mean_std([-0.49, 0.0])[0], "+.2f") == "-0.25"
    assert summarize.rounded(summarize.mean_std([7.835e-4])[0], ".2e") == "7.84e-04"
    assert summarize.rounded(summarize.mean_std([2e-3, 2e-3])[1], ".2e") == "0.00e+00"
    assert summarize.mean_std([]) == (None, None) and summarize.mean_std([84.7])[1] is None
