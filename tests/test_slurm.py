"""scripts/sweep.sh --slurm on a real one-node SLURM (scripts/local_slurm.sh): a job array of
tiny runs; one task stopped with SIGTERM mid-run (preemption, scancel), requeued by hand and
resumed from last.pt; the other sent SIGUSR1 (what --signal=B:USR1@120 sends before the time
limit), which stops its run and requeues itself.

Skipped, saying why, when that SLURM is not up (.ci/run starts it; by hand:
scripts/local_slurm.sh start, as root, with slurm-wlm and munge installed).
"""

import json
import os
import re
import subprocess
import sys
import time

import pytest

from analysis import summarize
from conftest import make_image_folder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCAL_SLURM = os.path.join(REPO, "scripts", "local_slurm.sh")
SLURM_DIR = os.environ.get("SLURM_LOCAL_DIR", "/var/tmp/qatbr-slurm")


@pytest.fixture(scope="module")
def slurm_env():
    """The environment of the SLURM client commands; skips when the local cluster is not up."""
    env = dict(os.environ, SLURM_CONF=os.path.join(SLURM_DIR, "slurm.conf"))
    try:
        up = subprocess.run(["bash", LOCAL_SLURM, "status"], env=env, capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.SubprocessError) as exc:
        up, why = False, str(exc)
    if not up:
        try:
            with open(os.path.join(SLURM_DIR, "start_error")) as f:
                why = f.read().strip()
        except OSError:
            why = "it was not started"
        pytest.skip(f"no local SLURM cluster ({why}); start one with scripts/local_slurm.sh start "
                    f"(root, Debian packages slurm-wlm and munge)")
    return env


def _slurm(env, *args):
    out = subprocess.run(list(args), env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"{' '.join(args)}: {out.stderr}"
    return out.stdout


def _wait(what, condition, timeout=600.0, logs=""):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}\n{logs() if logs else ''}"
        time.sleep(0.2)


def _epochs(run):
    return [json.loads(line)["epoch"] for line in open(os.path.join(run, "metrics.jsonl"))]


def test_job_array_and_a_requeued_task(slurm_env, tmp_path):
    # 100 images per class: epochs of 63 steps (1-3 s each), so that a SIGTERM sent when the
    # first epoch is logged finds the run still training
    data = make_image_folder(tmp_path / "data", train_per_class=100, test_per_class=1)
    runs = tmp_path / "runs"
    env = dict(slurm_env, RUNS_DIR=str(runs), DATA_DIR=data, SEEDS="1", SCENARIOS="w-only lsq", EPOCHS="3",
               WARMUP="1", GPUS="0", CPUS="1", TIME="20", PYTHON=sys.executable)
    out = subprocess.run(["bash", os.path.join(REPO, "scripts", "sweep.sh"), "--slurm", "--submit", "--",
                          "--batch-size", "16", "--workers", "0", "--no-download", "--device", "cpu"],
                         env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    job = re.search(r"Submitted job array (\d+)", out.stdout).group(1)
    w_only, lsq = runs / "w-only_w2a2_lam1_frz_s1", runs / "lsq_w2a2_s1"  # tasks 0 and 1

    def logs():
        folder = runs / "slurm_logs"
        return "\n".join(f"--- {n}\n{(folder / n).read_text()[-3000:]}" for n in sorted(os.listdir(folder)))

    def queued(task=""):
        return _slurm(slurm_env, "squeue", "-h", "-o", "%i", "-j", f"{job}{task}").strip() != ""

    try:
        # after the first epoch: SIGTERM to task 1, as a preemption would; SIGUSR1 to task 0
        for run in (lsq, w_only):
            _wait(f"{run.name}'s first epoch", lambda: (run / "metrics.jsonl").exists() and _epochs(run), logs=logs)
        statuses = {r.path: r.status for r in summarize.find_runs(str(runs))}
        assert statuses["lsq_w2a2_s1"] == "running"
        _slurm(slurm_env, "scancel", "--signal=TERM", "--batch", f"{job}_1")
        _slurm(slurm_env, "scancel", "--signal=USR1", "--batch", f"{job}_0")
        _wait("task 1 to stop", lambda: not queued("_1"), logs=logs)
        assert (lsq / "sweep_exit_code").read_text().strip() == "143", logs()
        done = _epochs(lsq)
        assert done in ([1], [1, 2]) and not (lsq / "summary.json").exists()
        stopped = next(r for r in summarize.find_runs(str(runs)) if r.path == "lsq_w2a2_s1")
        assert stopped.status == "interrupted" and "exit 143" in stopped.reason

        # requeue it: the same command resumes the run from last.pt
        _slurm(slurm_env, "scontrol", "requeue", f"{job}_1")
        _wait("the job array to end", lambda: not queued(), logs=logs)
    finally:
        subprocess.run(["scancel", job], env=slurm_env, capture_output=True, timeout=60)

    for run in (w_only, lsq):
        summary = json.loads((run / "summary.json").read_text())
        assert summary["status"] == "finished" and summary["epochs"] == 3, logs()
        assert _epochs(run) == [1, 2, 3]
        assert not (run / "sweep_exit_code").exists() and not (run / "sweep_running").exists()
    log = (lsq / "train.log").read_text()
    assert f"Resumed from epoch {len(done)} of 3" in log and log.count("===== ") == 2  # started, then resumed
    log = (w_only / "train.log").read_text()
    assert f"stopped before the time limit (exit 143); requeueing {job}_0" in log, logs()
    assert re.search(r"Resumed from epoch [12] of 3", log) and log.count("===== ") == 2
    for task in ("_0", "_1"):
        state = _slurm(slurm_env, "scontrol", "show", "job", f"{job}{task}")
        assert "Restarts=1" in state and "JobState=COMPLETED" in state
    markdown, rows, _ = summarize.build_tables(summarize.find_runs(str(runs)))
    assert markdown.startswith("2 run(s), 2 finished, 2 configuration(s).")
    assert [r["scenario"] for r in rows] == ["W-only", "LSQ baseline"]
