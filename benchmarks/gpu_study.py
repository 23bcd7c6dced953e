#!/usr/bin/env python
"""The GPU study: the README's W2A2 ablation in one command on one GPU, within a wall budget.

    python benchmarks/gpu_study.py --data data/cifar10-jpeg.tar.gz --out "$OUT"

Everything counts against ``--budget-s`` (540 s): unpacking and decoding the data,
compiling, training, evaluation, the results. Each run is an ordinary run of
``cifar10_qat_br.py`` in its own folder (under ``--workdir``), started as its own process:

1. **data**: the tarball (or image folder) unpacked and decoded once; every run reads the
   decoded cache. A subset of ``--probe-images`` training images, for the probes.
2. **float probe**: a 2-epoch float ResNet-20 run on the subset measures a training step,
   the evaluation and the start-up of a run (the second epoch: the first one compiles).
3. **float run**, sized to ``--float-share`` of what is left (cosine, lr 0.1, no warmup).
   While it trains, the **QAT probes** (one per scenario, all at once, 2 epochs on the
   subset: one LSQ epoch, one BR epoch) measure the epoch time of QAT runs sharing the GPU
   (scaled to the number of QAT runs: an upper bound), and compile every graph the QAT runs
   will need (inductor's on-disk cache then serves them).
4. **QAT runs**: the scenarios x seeds at W2A2 from the float run's ``last.pt`` (its final
   epoch, not its best), on the one GPU, one schedule for all (warmup 30 % of the epochs, as
   the default 30 of 100), sized to what is left (as if all ran at once throughout). The
   first scenario's runs start first; the others branch from their seed's warmup_end.pt
   (``--from-warmup``) once it is written, as scripts/sweep.sh does, and then all run at once.
5. **results** in ``--out`` (8 files at most): ``study.json`` (protocol, measurements,
   per-run speed and accuracy, the summary rows), ``summary.md`` and ``summary_runs.csv``
   (summarize.py: mean ± sample std over seeds of the FINAL test top-1), ``curves.png``
   (test top-1 per epoch of every run), ``study.log`` (this console, and the end of the log
   of every run that failed), and under ``pretrained/`` the float model (weights and run
   configuration only, loadable with ``--pretrained``) with its config.json and metrics.jsonl.

At the deadline every run still going gets SIGTERM (it keeps its finished epochs) and the
results are written from what finished. Several processes share the GPU (one process per
run); batching several models into one process was not tried. ``--device cpu`` with small
``--max-*-epochs`` runs the same steps on the CPU (the test of this script).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from run import config  # noqa: E402
from run.checkpoint import load_checkpoint, read_jsonl  # noqa: E402
from run.data import DataError, find_source, load_split  # noqa: E402

ENTRY = os.path.join(ROOT, "cifar10_qat_br.py")

#: The README's scenarios (``config.SCENARIOS``): key -> (name, flags).
SCENARIOS = {key: (name, flags.split()) for key, (name, flags) in config.SCENARIOS.items()}

#: Share of the default recipe's epochs spent in the LSQ warmup (30 of 100).
WARMUP_SHARE = 0.3

#: Seconds kept back for the results (summary, curves, JSON) and as a margin.
RESERVE_S = 25.0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--data", required=True, help="CIFAR-10 image folder, or a .tar.gz of one")
    p.add_argument("--out", required=True, help="folder for the results (8 files at most)")
    p.add_argument("--workdir", default=None,
                   help="new or empty folder for the unpacked tarball, the probe subset and the run folders "
                        "(kept afterwards; a folder given as --data gets its decoded cache itself, as with "
                        "cifar10_qat_br.py) [a new folder under the system's temp dir]")
    p.add_argument("--budget-s", type=float, default=540.0, help="wall time of everything [540]")
    p.add_argument("--device", default="cuda", help="cuda, or cpu to test the script [cuda]")
    p.add_argument("--scenarios", default=",".join(config.SEED_SCENARIOS),
                   help=f"comma-separated keys of {', '.join(SCENARIOS)} [{','.join(config.SEED_SCENARIOS)}]")
    p.add_argument("--seeds", default="42,43", help="comma-separated seeds of the QAT runs [42,43]")
    p.add_argument("--bits", type=int, default=2, help="weight and activation bits of the QAT runs [2]")
    p.add_argument("--batch-size", type=int, default=128, help="training batch size of every run [128]")
    p.add_argument("--float-lr", type=float, default=0.1, help="[0.1]")
    p.add_argument("--qat-lr", type=float, default=0.01, help="[0.01, the tool's default]")
    p.add_argument("--float-share", type=float, default=0.3,
                   help="share of the training time left after the float probe that the float run gets [0.3]")
    p.add_argument("--probe-images", type=int, default=5120, help="training images of the probe runs [5120]")
    p.add_argument("--max-float-epochs", type=int, default=200, help="[200]")
    p.add_argument("--max-qat-epochs", type=int, default=100, help="[100]")
    args = p.parse_args(argv)
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = [s for s in args.scenarios if s not in SCENARIOS]
    if unknown or not args.scenarios:
        p.error(f"--scenarios: unknown {unknown}; choose from {', '.join(SCENARIOS)}")
    try:
        args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        p.error(f"--seeds: comma-separated integers expected, got {args.seeds!r}")
    if not args.seeds or args.probe_images < 10 or min(args.max_float_epochs, args.batch_size) < 1 \
            or args.max_qat_epochs < 2 or not 0 < args.float_share < 1:
        p.error("need seeds, --probe-images >= 10, --max-float-epochs >= 1, --max-qat-epochs >= 2, "
                "--batch-size >= 1 and 0 < --float-share < 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: no CUDA GPU on this machine (--device cpu runs the study on the CPU, "
                f"for testing it with small --max-*-epochs)")
    if not os.path.exists(args.data):
        p.error(f"--data {args.data}: no such file or folder")
    if not (math.isfinite(args.budget_s) and args.budget_s > 0):
        p.error(f"--budget-s must be a number of seconds > 0, got {args.budget_s}")
    if len(set(args.seeds)) < len(args.seeds) or len(set(args.scenarios)) < len(args.scenarios):
        p.error("--seeds and --scenarios must not repeat a value (each run has its own folder)")
    for flag, folder in (("--out", args.out), ("--workdir", args.workdir)):
        if folder and os.path.exists(folder) and (not os.path.isdir(folder) or os.listdir(folder)):
            p.error(f"{flag} {folder} is not an empty folder: a study writes into a new or empty one, so that "
                    f"nothing of an earlier study mixes into its data, runs or results")
    return args


class Study:
    """The state of one study: the clock, the log, the folders."""

    def __init__(self, args):
        self.args, self.start = args, time.monotonic()
        self.deadline = self.start + args.budget_s
        self.workdir = args.workdir or tempfile.mkdtemp(prefix="gpu_study_")
        self.runs_dir = os.path.join(self.workdir, "runs")
        os.makedirs(self.runs_dir, exist_ok=True)
        os.makedirs(args.out, exist_ok=True)
        self.log_file = open(os.path.join(args.out, "study.log"), "w")
        self.phases: dict[str, float] = {}
        self.started: list[Run] = []  # every run started, so that none outlives the study

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def log(self, message: str) -> None:
        line = f"[{self.elapsed():6.1f}s] {message}"
        print(line, flush=True)
        self.log_file.write(line + "\n")
        self.log_file.flush()

    def phase(self, name: str, since: float) -> None:
        self.phases[name] = round(self.elapsed() - since, 1)


# -- data ------------------------------------------------------------------------------------------
def prepare_data(study: Study) -> tuple[str, str]:
    """Unpack (a tarball) and decode the data once; build the probe subset. Returns (data dir, probe dir)."""
    data = study.args.data
    if os.path.isfile(data):
        target = os.path.join(study.workdir, "data")
        os.makedirs(target, exist_ok=True)
        with tarfile.open(data) as tar:
            tar.extractall(target, filter="data")
        data = target
    source = find_source(data, download=False)
    workers = os.cpu_count() or 1
    train = load_split(source, train=True, workers=workers, log=study.log)
    load_split(source, train=False, workers=workers, log=study.log)
    study.log(f"data: {source.describe()}, {len(train.labels)} training images")
    return source.root, probe_subset(source.root, study)


def probe_subset(root: str, study: Study) -> str:
    """An image folder of ``--probe-images`` training images (the first of each class, as links)
    and the whole test split; decoded once like the full data."""
    probe = os.path.join(study.workdir, "probe_data")
    classes = sorted(os.listdir(os.path.join(root, "train")))
    per_class = max(1, study.args.probe_images // len(classes))
    for name in classes:
        src, dst = os.path.join(root, "train", name), os.path.join(probe, "train", name)
        os.makedirs(dst, exist_ok=True)
        for file in sorted(f for f in os.listdir(src) if not f.startswith("."))[:per_class]:
            if not os.path.exists(os.path.join(dst, file)):
                os.symlink(os.path.join(src, file), os.path.join(dst, file))
    if not os.path.exists(os.path.join(probe, "test")):
        os.symlink(os.path.join(root, "test"), os.path.join(probe, "test"))
    source = find_source(probe, download=False)
    for train in (True, False):
        load_split(source, train=train, workers=os.cpu_count() or 1, log=study.log)
    return probe


# -- runs ------------------------------------------------------------------------------------------
class Run:
    """One ``cifar10_qat_br.py`` process and its folder."""

    def __init__(self, study: Study, group: str, name: str, flags: list[str], data_dir: str, concurrent: int = 1):
        self.name, self.dir = name, os.path.join(study.runs_dir, group, name)
        args = study.args
        self.argv = [sys.executable, ENTRY, "--data-dir", data_dir, "--no-download", "--device", args.device,
                     "--batch-size", str(args.batch_size), "--workers", "1", "--output-dir", self.dir,
                     "--overwrite"] + flags
        env = dict(os.environ)
        # A run on the GPU needs one CPU thread (inductor's compile workers are processes of their own).
        cpu_threads = max(1, (os.cpu_count() or 1) // concurrent)
        env.setdefault("OMP_NUM_THREADS", "1" if args.device.startswith("cuda") else str(cpu_threads))
        os.makedirs(os.path.dirname(self.dir), exist_ok=True)
        self.log_path = self.dir + ".log"
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                            cwd=ROOT, start_new_session=True)
        self.started, self.wall_s = time.monotonic(), None
        study.started.append(self)

    def poll(self):
        rc = self.process.poll()
        if rc is not None and self.wall_s is None:
            self.wall_s = time.monotonic() - self.started
        return rc

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                pass

    def timing(self) -> list[dict]:
        return read_jsonl(os.path.join(self.dir, "timing.jsonl"))

    def metrics(self) -> list[dict]:
        return read_jsonl(os.path.join(self.dir, "metrics.jsonl"))

    def log_tail(self, lines: int = 15) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""


def wait_all(study: Study, runs: list[Run], deadline: float | None = None) -> None:
    """Wait for every run; at ``deadline`` (default: the study's) stop the rest (``stop_runs``)."""
    deadline = study.deadline if deadline is None else deadline
    while any(r.poll() is None for r in runs):
        if time.monotonic() >= deadline:
            stop_runs(study, runs)
            break
        time.sleep(0.2)
    for r in runs:
        if r.poll() not in (0, None):
            study.log(f"run {r.name} exited with {r.poll()}; the end of its log:\n{r.log_tail()}")


def stop_runs(study: Study, runs: list[Run]) -> None:
    """SIGTERM every run still going (each keeps its finished epochs), SIGKILL after 15 s."""
    going = [r for r in runs if r.poll() is None]
    if not going:
        return
    study.log(f"stopping {', '.join(r.name for r in going)} (finished epochs are kept)")
    for r in going:
        r.stop()
    grace = time.monotonic() + 15
    while any(r.poll() is None for r in going) and time.monotonic() < grace:
        time.sleep(0.2)
    for r in going:
        r.stop(signal.SIGKILL)
        r.process.wait()
        r.poll()


def probe_measure(run: Run, images: int) -> dict:
    """Per-epoch cost of a run from a finished 2-epoch probe on the probe images.

    ``step_s`` and ``eval_s`` come from the second epoch (the first one compiles); the rest of
    the probe's wall time (start-up, compiling, writing checkpoints) is ``overhead_s``.

    Raises:
        RuntimeError: the probe did not finish both epochs (its log names the cause).
    """
    timing = run.timing()
    if run.poll() != 0 or len(timing) < 2:
        raise RuntimeError(f"probe {run.name} failed (exit {run.poll()}):\n{run.log_tail()}")
    second = timing[1]
    steps = max(1, second["train_images"] // run_batch(run))
    step_s = second["train_seconds"] / steps
    eval_s = second["seconds"] - second["train_seconds"]
    return {"step_s": step_s, "eval_s": eval_s, "overhead_s": max(0.0, run.wall_s - 2 * second["seconds"]),
            "probe_images": images, "probe_wall_s": run.wall_s}


def run_batch(run: Run) -> int:
    return int(run.argv[run.argv.index("--batch-size") + 1])


def epoch_seconds(measure: dict, train_images: int, batch_size: int) -> float:
    """The predicted seconds of a full epoch: its steps (drop_last) and the evaluation."""
    return (train_images // batch_size) * measure["step_s"] + measure["eval_s"]


def size_epochs(seconds: float, measure: dict, epoch_s: float, low: int, high: int) -> int:
    """How many epochs fit in ``seconds`` after a run's start-up, within [low, high]."""
    fit = math.floor((seconds - measure["overhead_s"]) / (1.05 * epoch_s))  # 5 %: checkpoints, jitter
    return int(min(high, max(low, fit)))


def float_flags(epochs: int) -> list[str]:
    """The float ResNet-20 run's flags (32 bits, no BR, no warmup, seed 42)."""
    return ["--num-bits", "32", "--lambda-br", "0", "--lambda-br-act", "0", "--warmup-epochs", "0",
            "--epochs", str(epochs), "--seed", "42"]


def qat_name(key: str, bits: int, seed: int) -> str:
    """Folder name of a QAT run, as scripts/sweep.sh names it (λ = 1)."""
    flags = SCENARIOS[key][1]
    with_br = any(flags[i + 1] != "0" for i, f in enumerate(flags) if f.startswith("--lambda-br"))
    return (f"{key}_w{bits}a{bits}" + ("_lam1" if with_br else "") + ("_frz" if "--freeze-alpha" in flags else "")
            + f"_s{seed}")


def qat_flags(args, key: str, seed: int, epochs: int, pretrained: str | None) -> list[str]:
    """A QAT row's flags: the study's bits, schedule (warmup ``WARMUP_SHARE`` of ``epochs``) and lr, then the
    scenario's stage-2 flags, from ``pretrained`` when given."""
    flags = ["--num-bits", str(args.bits), "--epochs", str(epochs), "--warmup-epochs",
             str(round(WARMUP_SHARE * epochs)), "--lr", str(args.qat_lr), "--seed", str(seed)]
    return flags + SCENARIOS[key][1] + (["--pretrained", pretrained] if pretrained else [])


# -- results ---------------------------------------------------------------------------------------
def run_report(run: Run, warmup: int) -> dict:
    """Status, final test top-1 and speed of one run from its folder."""
    metrics, timing = run.metrics(), run.timing()
    later = timing[1:] or timing  # the first epoch includes compiling
    img_s = [t["train_images"] / t["train_seconds"] for t in later if t.get("train_seconds")]
    report = {"exit": run.poll(), "epochs_done": len(metrics), "wall_s": round(run.wall_s or 0.0, 1),
              "final_test_acc": metrics[-1]["test_acc"] if metrics else None,
              "img_per_s": round(sorted(img_s)[len(img_s) // 2], 1) if img_s else None,
              "epoch_s": round(sorted(t["seconds"] for t in later)[len(later) // 2], 2) if later else None}
    for stage, rows in (("stage1", [t for t in timing if t["epoch"] <= warmup]),
                        ("stage2", [t for t in timing if t["epoch"] > warmup])):
        peaks = [t["peak_memory_mb"] for t in rows if "peak_memory_mb" in t]
        report[f"peak_memory_mb_{stage}"] = round(max(peaks), 1) if peaks else None
    return report


def plot_curves(float_run: Run | None, qat_runs: dict, warmup: int, path: str) -> None:
    """Test top-1 per epoch: the float run, and every QAT run (one colour per scenario)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_f, ax_q) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [1, 2]})
    if float_run is not None:
        rows = float_run.metrics()
        ax_f.plot([r["epoch"] for r in rows], [r["test_acc"] for r in rows], color="black", marker=".")
    ax_f.set(title="float ResNet-20", xlabel="epoch", ylabel="test top-1 (%)")
    colors = dict(zip(SCENARIOS, ("tab:gray", "tab:blue", "tab:green", "tab:red", "tab:orange")))
    styles = ("-", "--", ":", "-.")
    for (key, seed_index), run in qat_runs.items():
        rows = run.metrics()
        if rows:
            ax_q.plot([r["epoch"] for r in rows], [r["test_acc"] for r in rows], color=colors[key], marker=".",
                      linestyle=styles[seed_index % len(styles)],
                      label=SCENARIOS[key][0] if seed_index == 0 else None)
    if warmup:
        ax_q.axvline(warmup + 0.5, color="k", linewidth=0.8, linestyle=":")
    ax_q.set(title="W2A2 QAT (line style: seed; dotted line: end of warmup)", xlabel="epoch", ylabel="test top-1 (%)")
    if ax_q.get_legend_handles_labels()[0]:
        ax_q.legend(fontsize=8)
    for ax in (ax_f, ax_q):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(study: Study, result: dict, float_run: Run | None, qat_runs: dict, warmup: int) -> None:
    """summary.md and summary_runs.csv (summarize.py), curves.png, study.json, pretrained/ in --out."""
    out = study.args.out
    from analysis import summarize
    if qat_runs and any(os.path.isdir(r.dir) for r in qat_runs.values()):
        qat_root = os.path.dirname(next(iter(qat_runs.values())).dir)
        prefix = os.path.join(study.workdir, "summary")
        with open(os.devnull, "w") as quiet:
            stdout, sys.stdout = sys.stdout, quiet
            try:
                summarize.main([qat_root, "--out", prefix])
            finally:
                sys.stdout = stdout
        for suffix in (".md", "_runs.csv"):
            shutil.copy(prefix + suffix, os.path.join(out, "summary" + suffix))
        with open(prefix + ".md") as f:
            table = f.read()
        result["summary_table"] = table
        study.log("summary (final test top-1, mean ± sample std over seeds):\n" + table)
    plot_curves(float_run, qat_runs, warmup, os.path.join(out, "curves.png"))
    if float_run is not None and os.path.exists(os.path.join(float_run.dir, "last.pt")):
        export_float(float_run, os.path.join(out, "pretrained"))
    result["phases_s"] = study.phases
    result["wall_s"] = round(study.elapsed(), 1)
    with open(os.path.join(out, "study.json"), "w") as f:
        json.dump(result, f, indent=2)
    study.log(f"results in {out} ({result['wall_s']} s of {study.args.budget_s:g})")


def export_float(run: Run, folder: str) -> None:
    """The float run's final model (weights and run configuration: what --pretrained reads)."""
    os.makedirs(folder, exist_ok=True)
    ckpt = load_checkpoint(os.path.join(run.dir, "last.pt"), "the float run")
    torch.save({"model": ckpt["model"], "config": ckpt["config"]}, os.path.join(folder, "resnet20_fp32.pt"))
    for name in ("config.json", "metrics.jsonl"):
        shutil.copy(os.path.join(run.dir, name), os.path.join(folder, "resnet20_fp32." + name))


# -- the study -------------------------------------------------------------------------------------
def main(argv=None) -> int:
    """Run the study; exit status 0, or 1 when a phase failed (the results of what ran are still written)."""
    args = parse_args(argv)
    study = Study(args)
    result = {"command": [sys.executable] + sys.argv if argv is None else ["gpu_study.py"] + list(argv),
              "budget_s": args.budget_s, "machine": machine(args.device)}
    study.log(f"GPU study on {result['machine']['device_name']}, budget {args.budget_s:g} s, work in {study.workdir}")
    runs: dict = {"float": None, "qat": {}, "warmup": 0}
    try:
        run_study(study, result, runs)
    except (RuntimeError, DataError, OSError, EOFError, tarfile.TarError) as exc:
        result["error"] = f"{type(exc).__name__}: {exc}" if not isinstance(exc, RuntimeError) else str(exc)
        study.log(f"error: {result['error']}")
    finally:  # a phase that failed may leave runs going (the float run beside the probes)
        stop_runs(study, study.started)
    failed = [name for name, r in result.get("runs", {}).items() if r["exit"] != 0]
    if failed and "error" not in result:
        result["error"] = f"{len(failed)} QAT run(s) did not finish: {', '.join(failed)} (see study.log)"
        study.log(f"error: {result['error']}")
    write_results(study, result, runs["float"], runs["qat"], runs["warmup"])
    return 1 if "error" in result else 0


def run_study(study: Study, result: dict, runs: dict) -> None:
    """The phases of the study (see the module docstring); fills ``result`` and ``runs`` as it goes."""
    args = study.args

    since = study.elapsed()
    data_dir, probe_dir = prepare_data(study)
    n_train = len(load_split(find_source(data_dir, False), train=True, workers=1, log=lambda *_: None).labels)
    probe_images = len(load_split(find_source(probe_dir, False), train=True, workers=1, log=lambda *_: None).labels)
    study.phase("data", since)

    since = study.elapsed()
    probe = Run(study, "probes", "probe_float", float_flags(2), probe_dir)
    wait_all(study, [probe])
    float_measure = probe_measure(probe, probe_images)
    float_epoch_s = epoch_seconds(float_measure, n_train, args.batch_size)
    study.phase("float_probe", since)
    training_left = study.left() - RESERVE_S
    float_epochs = size_epochs(args.float_share * training_left, float_measure, float_epoch_s, 1,
                               args.max_float_epochs)
    float_eta = study.elapsed() + float_measure["overhead_s"] + 1.05 * float_epochs * float_epoch_s
    study.log(f"float probe: {float_measure['step_s'] * 1000:.1f} ms/step, eval {float_measure['eval_s']:.1f} s, "
              f"start-up {float_measure['overhead_s']:.0f} s -> full epoch {float_epoch_s:.1f} s; "
              f"float run: {float_epochs} epochs (done at about {float_eta:.0f} s)")

    since = study.elapsed()
    float_run = runs["float"] = Run(study, "float", "resnet20_fp32",
                                    float_flags(float_epochs) + ["--lr", str(args.float_lr)], data_dir)
    grid = [(key, i, seed) for key in args.scenarios for i, seed in enumerate(args.seeds)]  # first scenario first
    # One probe per scenario (its first seed): the seeds of a scenario compile the same graphs,
    # so that is every graph for inductor's cache, at half the compiling of one probe per run.
    probe_grid = [(key, seed) for key, i, seed in grid if i == 0]
    probes = [Run(study, "probes", "probe_" + qat_name(key, args.bits, seed), qat_flags(args, key, seed, 2, None),
                  probe_dir, concurrent=len(probe_grid)) for key, seed in probe_grid]
    study.log(f"float run started; {len(probes)} QAT probes (2 epochs on {probe_images} images) alongside")
    wait_all(study, probes)
    qat_measures = [probe_measure(p, probe_images) for p in probes if p.poll() == 0 and len(p.timing()) >= 2]
    if not qat_measures:
        raise RuntimeError("every QAT probe failed; see study.log")
    # The slowest probe, with its GPU time scaled to all runs at once (as if the GPU were already
    # full with the probes: an upper bound).
    scale = len(grid) / len(probes)
    qat_measure = {k: max(m[k] for m in qat_measures) * (scale if k != "overhead_s" else 1.0)
                   for k in ("step_s", "eval_s", "overhead_s")}
    qat_epoch_s = epoch_seconds(qat_measure, n_train, args.batch_size)
    study.phase("qat_probes", since)
    study.log(f"QAT probes ({len(probes)} at once, alongside the float run; times x {scale:g} for {len(grid)} runs): "
              f"{qat_measure['step_s'] * 1000:.1f} ms/step, "
              f"eval {qat_measure['eval_s']:.1f} s, start-up {qat_measure['overhead_s']:.0f} s "
              f"-> full epoch {qat_epoch_s:.1f} s")
    wait_all(study, [float_run])
    study.phase("float_run", since)
    pretrained = os.path.join(float_run.dir, "last.pt")
    if float_run.poll() != 0 or not os.path.exists(pretrained):
        raise RuntimeError(f"the float run failed:\n{float_run.log_tail()}")

    since = study.elapsed()
    qat_epochs = size_epochs(study.left() - RESERVE_S, qat_measure, qat_epoch_s, 2, args.max_qat_epochs)
    warmup = runs["warmup"] = round(WARMUP_SHARE * qat_epochs)
    protocol = {"float": {"arch": "resnet20", "epochs": float_epochs, "lr": args.float_lr, "schedule": "cosine",
                          "batch_size": args.batch_size, "seed": 42},
                "qat": {"bits": f"W{args.bits}A{args.bits}", "epochs": qat_epochs, "warmup_epochs": warmup,
                        "lr": args.qat_lr, "schedule": "cosine", "batch_size": args.batch_size,
                        "pretrained": "the float run's last.pt (final epoch)",
                        "scenarios": [SCENARIOS[k][0] for k in args.scenarios], "seeds": args.seeds,
                        "concurrent_runs": len(grid)},
                "device": args.device, "compile": "the tool's default for the device (--compile auto)"}
    result["protocol"] = protocol
    study.log(f"protocol: float {float_epochs} epochs (lr {args.float_lr:g}); QAT W{args.bits}A{args.bits} "
              f"{qat_epochs} epochs ({warmup} LSQ warmup + {qat_epochs - warmup} BR, lr {args.qat_lr:g}), "
              f"{len(args.scenarios)} scenarios x {len(args.seeds)} seeds at once")
    # The scenarios of one seed share its warmup (stage 1 is LSQ only in each): the first scenario's
    # runs train it, the others start at stage 2 from their warmup_end.pt (--from-warmup: the same
    # runs bit for bit), so W of every E epochs run once per seed instead of once per run.
    deadline = study.deadline - RESERVE_S  # 15 s grace, 10 s for results
    qat_runs = runs["qat"] = {}
    for key, i, seed in grid:
        if key != args.scenarios[0] and warmup > 0:
            source = qat_runs[(args.scenarios[0], i)]
            warmup_end = os.path.join(source.dir, "warmup_end.pt")
            while not os.path.exists(warmup_end) and source.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
            branch = ["--from-warmup", warmup_end] if os.path.exists(warmup_end) else []
        else:
            branch = []
        qat_runs[(key, i)] = Run(study, "qat", qat_name(key, args.bits, seed),
                                 qat_flags(args, key, seed, qat_epochs, pretrained) + branch, data_dir,
                                 concurrent=len(grid))
    wait_all(study, list(qat_runs.values()), deadline=deadline)
    study.phase("qat_runs", since)

    result["measured"] = {"float_probe": float_measure, "float_epoch_s_predicted": float_epoch_s,
                          "qat_probe_slowest": qat_measure, "qat_epoch_s_predicted": qat_epoch_s}
    result["float_run"] = run_report(float_run, 0)
    result["runs"] = {run.name: dict(run_report(run, warmup), scenario=SCENARIOS[key][0])
                      for (key, _), run in qat_runs.items()}
    result["speed"] = speed_figures(result)


def speed_figures(result: dict) -> dict:
    """img/s and peak memory of LSQ vs LSQ + W-BR + A-BR, and the projected 100-epoch run."""
    runs = result["runs"].values()

    def median(values):
        values = sorted(v for v in values if v is not None)
        return values[len(values) // 2] if values else None

    lsq = [r for r in runs if r["scenario"] == "LSQ baseline"]
    wa = [r for r in runs if r["scenario"] == "W+A stable"]
    speed = {"img_per_s_lsq": median(r["img_per_s"] for r in lsq),
             "img_per_s_wbr_abr": median(r["img_per_s"] for r in wa),
             # within one W+A-BR run: LSQ only in stage 1, LSQ + W-BR + A-BR in stage 2
             "peak_memory_mb_lsq": median(r["peak_memory_mb_stage1"] for r in wa),
             "peak_memory_mb_wbr_abr": median(r["peak_memory_mb_stage2"] for r in wa)}
    if speed["img_per_s_lsq"] and speed["img_per_s_wbr_abr"]:
        speed["wbr_abr_vs_lsq_throughput"] = round(speed["img_per_s_wbr_abr"] / speed["img_per_s_lsq"], 3)
    if speed["peak_memory_mb_lsq"] and speed["peak_memory_mb_wbr_abr"]:
        speed["wbr_abr_vs_lsq_peak_memory"] = round(speed["peak_memory_mb_wbr_abr"] / speed["peak_memory_mb_lsq"], 3)
    epoch_s = median(r["epoch_s"] for r in wa)
    if epoch_s:
        overhead = result["measured"]["qat_probe_slowest"]["overhead_s"]
        speed["projected_100_epoch_run_s"] = round(overhead + 100 * epoch_s, 1)
        speed["projection_note"] = (f"start-up of a QAT probe + 100 x the median epoch of the W+A stable runs, "
                                    f"measured with {len(result['runs'])} runs sharing the GPU: "
                                    f"an upper bound for a run alone")
    return speed


def machine(device: str) -> dict:
    info = {"device": device, "torch": torch.__version__, "cpu_count": os.cpu_count(),
            "device_name": "CPU"}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["device_name"] = torch.cuda.get_device_name(0)
    return info


if __name__ == "__main__":
    sys.exit(main())
