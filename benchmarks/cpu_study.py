#!/usr/bin/env python
"""The W2A2 study on the CPU: the seed's ablation at a real schedule, one shared warmup per seed.

    python benchmarks/cpu_study.py --data-dir /tmp/cifar10 --jobs 2 --commit   # run / continue it
    python benchmarks/cpu_study.py --report                                   # table and curves
    python benchmarks/cpu_study.py -n                                         # what it would do

Protocol (docs/results.md, "W2A2 study on the CPU"): ResNet-20, W2A2, first and last layer
8-bit, from the float network ``pretrained/resnet20_fp32_e40`` (87.62 %), 30 epochs of which
9 are the LSQ warmup, SGD lr 0.01 (momentum 0.9, weight decay 5e-4) with one cosine, batch
128, all 50,000 training images; the result is the final epoch's test top-1. Every QAT row of
a seed starts at epoch 10 from that seed's committed warmup
(``pretrained/w2a2_e30_warmup9_s<seed>/warmup_end.pt``, ``--from-warmup``): its run folder
is the run from scratch, bit for bit (tests/test_from_warmup.py). PTQ rows quantize the float
network (``--ptq``) as references.

One command runs the study and continues it on any machine, row by row in plan order: a row
whose result is committed (``RESULTS/<row>/summary.json``) is skipped; a row whose run folder
is on this machine (``--runs-dir``, outside the repository) is resumed, or skipped while
another process runs it; the rest start. ``--jobs`` rows run at once, each with
``OMP_NUM_THREADS`` = CPUs / jobs unless set. A finished row's config.json, metrics.jsonl,
timing.jsonl and summary.json (never a checkpoint) are copied to ``RESULTS/<row>/``, and with
``--commit`` committed at once (that folder only), since a session may end at any moment.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from analysis.summarize import as_written, fmt_mean_std, mean_std, rounded  # noqa: E402
from run.checkpoint import CheckpointError, read_jsonl, write_jsonl  # noqa: E402
from run.config import SCENARIOS, ConfigError  # noqa: E402
from run.data import DataError, find_source  # noqa: E402
from run.run_folder import RunFolderLock, warmup_logs  # noqa: E402

ENTRY = os.path.join(ROOT, "cifar10_qat_br.py")
RESULTS = os.path.join(ROOT, "docs", "cpu_study")
FLOAT = os.path.join("pretrained", "resnet20_fp32_e40", "model.pt")
WARMUP_EPOCHS = 9
PROTOCOL = ["--num-bits", "2", "--epochs", "30", "--warmup-epochs", str(WARMUP_EPOCHS), "--lr", "0.01",
            "--pretrained", FLOAT]

#: The study's scenarios, in the order they run, each for every seed in turn (a session runs two rows
#: side by side: both seeds of one scenario, so that each session adds a mean ± std). W-only (the
#: paper's method) comes right after the LSQ baseline, then lsq-frozen, which tells freezing α from BR.
#: W+A moving target with α frozen is W+A stable bit for bit (tests/test_from_warmup.py), so it does
#: not run; the moving target is studied α-free. w-only-free is not one of the issue's seven rows: it was the
#: tool's defaults in sessions 12-15 (α trained), and against LSQ it differs by W-BR alone.
ROWS = ("wa-stable", "lsq", "w-only", "lsq-frozen", "a-only", "w-only-free", "wa-stable-free", "wa-moving-free")
SEEDS = (42, 43)
#: The seed's "different lambda values": W+A stable of seed 42 at these λ_a as well.
LAMBDA_ACT = ("0.1", "0.01")
#: BR's nearest rivals (Nagel et al., ICML 2022), seed 42, once its table is committed.
RIVALS = ("dampen", "freeze")
#: The seed authors' recipe (activations quantized at the ReLU outputs, lr constant through the warmup):
#: seed 42's LSQ and W+A stable rows under it as well. Its stage 1 differs from the protocol's, so it has a
#: warmup of its own: the first of these rows to run trains it, and the study commits it (``publish_warmup``).
AUTHORS = ("--act-quant-at", "relu-output", "--lr-schedule", "warmup-constant")
AUTHORS_ROWS = ("lsq", "wa-stable")
#: Pairs of rows that differ in one thing (row, baseline, that thing), compared seed by seed: the rows of a
#: seed share their warmup, so a paired difference is free of the warmup's seed-to-seed spread. The authors'
#: LSQ row has a warmup of its own: its difference is the whole recipe's.
CONTRASTS = (
    ("lsq-frozen", "lsq", "freezing α after the warmup"),
    ("w-only", "lsq-frozen", "W-BR (α frozen)"),
    ("w-only-free", "lsq", "W-BR (α trained)"),
    ("w-only-free", "w-only", "training α through stage 2 (W-BR)"),
    ("a-only", "lsq-frozen", "A-BR at λ_a = 1 (α frozen)"),
    ("wa-stable", "w-only", "A-BR at λ_a = 1 beside W-BR"),
    ("wa-stable", "a-only", "W-BR beside A-BR at λ_a = 1"),
    ("wa-stable_lama0.1", "w-only", "A-BR at λ_a = 0.1 beside W-BR"),
    ("wa-stable_lama0.01", "w-only", "A-BR at λ_a = 0.01 beside W-BR"),
    ("wa-stable-free", "wa-stable", "training α through stage 2 (W+A BR)"),
    ("wa-stable-free", "w-only-free", "A-BR at λ_a = 1 beside W-BR (α trained)"),
    ("wa-moving-free", "wa-stable-free", "A-BR's gradient reaching α_act (moving target, α trained)"),
    ("dampen", "lsq-frozen", "oscillation dampening (α frozen)"),
    ("freeze", "lsq-frozen", "iterative freezing (α frozen)"),
    ("lsq_authors", "lsq", "the seed authors' recipe, its own warmup (LSQ)"),
    ("wa-stable_authors", "lsq_authors", "W+A BR under the seed authors' recipe"),
)
#: The files of a finished run that are committed.
RESULT_FILES = ("config.json", "metrics.jsonl", "timing.jsonl", "summary.json")


@dataclass
class Row:
    """One run of the study: its folder name, its flags, and the committed warmup it branches from (None:
    a PTQ row). A row whose warmup is not committed yet trains it (``command``)."""

    name: str
    flags: list[str]
    warmup: str | None = None


def plan() -> list[Row]:
    """Every run of the study, in the order they run: the PTQ references (minutes), each scenario of
    ``ROWS`` for both seeds, then seed 42's W+A stable at the other λ_a, its dampening and freezing rows, and
    its rows under the seed authors' recipe."""
    rows = [Row(f"ptq_w{b}a{b}", ["--ptq", "--num-bits", str(b), "--pretrained", FLOAT]) for b in (2, 4)]

    def qat(seed: int, key: str, lambda_act=None, suffix="", recipe=(), warmup="w2a2_e30_warmup9") -> Row:
        stage2 = SCENARIOS[key][1].split()
        if lambda_act is not None:  # in place, so that the row's command names λ_a once
            stage2[stage2.index("--lambda-br-act") + 1] = lambda_act
        return Row(f"w2a2_s{seed}_{key}{suffix}", PROTOCOL + ["--seed", str(seed)] + list(recipe) + stage2,
                   os.path.join("pretrained", f"{warmup}_s{seed}", "warmup_end.pt"))

    rows += [qat(seed, key) for key in ROWS for seed in SEEDS]
    rows += [qat(42, "wa-stable", lam, f"_lama{lam}") for lam in LAMBDA_ACT]
    rows += [qat(42, key) for key in RIVALS]
    rows += [qat(42, key, suffix="_authors", recipe=AUTHORS, warmup="w2a2_e30_warmup9_authors") for key in AUTHORS_ROWS]
    return rows


def state(row: Row, runs_dir: str) -> str:
    """``committed``, ``busy`` (another process holds its run folder), ``resume`` or ``new``."""
    if os.path.exists(os.path.join(RESULTS, row.name, "summary.json")):
        return "committed"
    folder = os.path.join(runs_dir, row.name)
    if not os.path.isdir(folder):
        return "new"
    lock = RunFolderLock(folder)
    try:
        lock.acquire()
    except ConfigError:
        return "busy"
    lock.release()
    return "resume" if os.path.exists(os.path.join(folder, "last.pt")) else "new"


def command(row: Row, args) -> list[str]:
    """The row's command line, for a new and a resumed run alike (``--resume auto``): it branches from its
    warmup when that is committed, else it trains the warmup itself (a run resumed with ``--from-warmup``
    stays what it started as: run.config.HISTORY_FLAGS)."""
    cmd = [sys.executable, ENTRY, "--data-dir", args.data_dir, "--no-download",
           "--output-dir", os.path.join(args.runs_dir, row.name), *row.flags, "--resume", "auto"]
    return cmd + (["--from-warmup", row.warmup] if warmup_ready(row) else [])


def warmup_ready(row: Row) -> bool:
    """Whether the row's warmup is in the repository (its path is relative to it, as the runs' cwd is)."""
    return bool(row.warmup) and os.path.exists(os.path.join(ROOT, row.warmup))


def can_start(row: Row, running: list[Row]) -> bool:
    """A row starts when its warmup is committed, or when no running row is training that warmup already."""
    return not row.warmup or warmup_ready(row) or all(r.warmup != row.warmup for r in running)


def publish_warmup(row: Row, folder: str) -> str | None:
    """Once the run in ``folder`` (one that trains its warmup) has finished its warmup, copy its
    ``warmup_end.pt`` with the logs of epochs 1..W (config.json, metrics.jsonl, timing.jsonl: what
    ``--from-warmup`` reads beside it) and a README to ``row.warmup``'s folder (relative to the repository),
    so that the other rows of that warmup branch from it, on any machine. Returns that folder, or None
    while the warmup is not finished (or is published already)."""
    target = os.path.join(ROOT, os.path.dirname(row.warmup))
    checkpoint = os.path.join(folder, "warmup_end.pt")
    if warmup_ready(row) or not os.path.exists(checkpoint):
        return None
    try:
        logs = warmup_logs(folder, WARMUP_EPOCHS)
    except CheckpointError:
        return None  # the epoch's log rows come before its checkpoint: look again at the next check
    os.makedirs(target, exist_ok=True)
    for name, rows in logs.items():
        write_jsonl(rows, os.path.join(target, name))
    shutil.copyfile(os.path.join(folder, "config.json"), os.path.join(target, "config.json"))
    with open(os.path.join(target, "README.md"), "w") as f:
        f.write(f"# The {WARMUP_EPOCHS}-epoch warmup of {os.path.basename(target)}\n\n"
                f"`warmup_end.pt` (epoch {WARMUP_EPOCHS} of 30) of the CPU study's run `{row.name}`, which "
                f"trained it (`benchmarks/cpu_study.py`; its flags in `config.json`). Stage 1 is LSQ only: "
                f"the other rows with these stage-1 flags branch from it with `--from-warmup`. Test top-1 "
                f"after epoch {WARMUP_EPOCHS}: {logs['metrics.jsonl'][-1]['test_acc']:.2f} %.\n")
    shutil.copyfile(checkpoint, os.path.join(target, "warmup_end.pt.tmp"))  # last, and whole: others look for it
    os.replace(os.path.join(target, "warmup_end.pt.tmp"), os.path.join(ROOT, row.warmup))
    return target


def keep_result(row: Row, args) -> str | None:
    """Copy a finished run's results into the repository (and commit them); returns its final top-1."""
    folder = os.path.join(args.runs_dir, row.name)
    try:
        with open(os.path.join(folder, "summary.json")) as f:
            summary = json.load(f)
    except (OSError, ValueError):
        return None
    if summary.get("status") != "finished":
        return None
    target = os.path.join(RESULTS, row.name)
    os.makedirs(target, exist_ok=True)
    for name in RESULT_FILES:
        if os.path.exists(os.path.join(folder, name)):
            shutil.copyfile(os.path.join(folder, name), os.path.join(target, name))
    acc = summary.get("final_test_acc")
    if args.commit:
        commit(target, f"CPU study: {row.name} finished, final test top-1 {acc:.2f} % (docs/cpu_study/{row.name})")
    return acc


def commit(folder: str, message: str) -> None:
    """git-commit ``folder`` (only it: a developer's other changes stay out), at once: a session may end."""
    for attempt in range(5):  # another git command (a developer's) may hold the index for a moment
        added = subprocess.run(["git", "-C", ROOT, "add", "--", folder], capture_output=True, text=True)
        done = added.returncode == 0 and subprocess.run(
            ["git", "-C", ROOT, "commit", "-q", "-m", message, "--", folder], capture_output=True).returncode == 0
        if done:
            return
        time.sleep(2 + attempt)
    print(f"WARNING: could not commit {folder}; commit it by hand", flush=True)


def run(args) -> int:
    """Run the rows ``--only`` picks (each: skip if committed, resume its folder, else branch from its warmup),
    ``--jobs`` at a time, committing each result as it finishes with ``--commit``. Returns the exit status:
    0, 1 when a row failed, 2 when ``--data-dir`` holds no CIFAR-10, 128 + the signal when stopped."""
    rows = [row for row in plan() if any(fnmatch.fnmatch(row.name, pattern) for pattern in args.only)]
    todo = []
    for row in rows:
        what = state(row, args.runs_dir)
        untrained = what != "committed" and row.warmup and not warmup_ready(row)
        print(f"{row.name}: {what}" + (f" ({row.warmup} is not there yet: the first of its rows to run trains it, "
                                       "the others branch from it)" if untrained else ""), flush=True)
        if what in ("resume", "new"):
            todo.append(row)
        if args.dry_run and what != "committed":
            print("    " + " ".join(command(row, args)))
    if args.dry_run or not todo:
        return 0
    try:  # once, here: a row would fail on it only in its log
        find_source(args.data_dir, download=False)
    except DataError:
        print(f"error: --data-dir {args.data_dir}: no CIFAR-10 there (expected cifar-10-batches-py/ or train/<class>/ "
              f"and test/<class>/ image folders); the study never downloads", file=sys.stderr)
        return 2
    os.makedirs(args.runs_dir, exist_ok=True)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // args.jobs)))
    print(f"{len(todo)} run(s) to do, {args.jobs} at once, OMP_NUM_THREADS={env['OMP_NUM_THREADS']} each; "
          f"logs in {args.runs_dir}/<row>.log", flush=True)
    running: dict[str, tuple[Row, subprocess.Popen]] = {}
    stopping = []
    handler = lambda signum, _frame: stopping.append(signum)  # noqa: E731
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, handler)
    failed = 0
    while todo or running:
        while len(running) < args.jobs and not stopping:
            row = next((r for r in todo if can_start(r, [r for r, _ in running.values()])), None)
            if row is None:
                break
            todo.remove(row)
            with open(os.path.join(args.runs_dir, row.name + ".log"), "a") as log:
                process = subprocess.Popen(command(row, args), stdout=log, stderr=subprocess.STDOUT, env=env,
                                           cwd=ROOT, start_new_session=True)
            running[row.name] = (row, process)
            print(f"{time.strftime('%F %T')} started {row.name}", flush=True)
        if stopping:
            todo.clear()
            for _, process in running.values():
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)  # stops at the next step, finished epochs kept
        time.sleep(5)
        for name, (row, _) in running.items():  # a row training its warmup: publish it once it is done
            published = row.warmup and publish_warmup(row, os.path.join(args.runs_dir, name))
            if published:
                print(f"{time.strftime('%F %T')} {name}: its warmup is in {os.path.relpath(published, ROOT)}",
                      flush=True)
                if args.commit:
                    commit(published, f"CPU study: the warmup that {name} trained ({os.path.relpath(published, ROOT)})")
        for name, (row, process) in list(running.items()):
            rc = process.poll()
            if rc is None:
                continue
            del running[name]
            acc = keep_result(row, args) if rc == 0 else None
            failed += acc is None and not stopping
            print(f"{time.strftime('%F %T')} {name}: exit {rc}"
                  + (f", final test top-1 {acc:.2f} %, kept in {os.path.relpath(RESULTS, ROOT)}/{name}"
                     if acc is not None else f"; see {args.runs_dir}/{name}.log"), flush=True)
    if stopping:
        print("Stopped; the same command continues the study.", flush=True)
        return 128 + stopping[0]
    return 1 if failed else 0


# -- the report ------------------------------------------------------------------------------
def row_key(name: str) -> str:
    """The study row of a run folder name: ``w2a2_s42_wa-stable`` -> ``wa-stable``."""
    return name.split("_", 2)[2] if name.startswith("w2a2_s") else name


def weights_per_layer(arch: str = "resnet20") -> dict[str, int]:
    """The number of weights of each quantized layer of the study's W2A2 network, keyed as metrics.jsonl's
    ``bins`` are (``quantized_layers``, which the trainer's bin statistics iterate)."""
    from models import build_model
    from quant import quantize_model, quantized_layers
    model = quantize_model(build_model(arch), weight_bits=2, act_bits=2)
    return {name: layer.weight.numel() for name, layer in quantized_layers(model).items()}


def last_epoch_figures(metrics: list[dict], sizes: dict[str, int]) -> dict:
    """The final epoch's CE, BR_w, BR_a and, over the weights of the low-bit layers (not the 8-bit first
    and last), the mean distance of a weight to its level (in steps α) and the fraction of weights whose
    bin changed in that epoch. metrics.jsonl holds these per layer: each layer counts by its number of
    weights (``sizes``, from ``weights_per_layer``), as the oscillations do (``OscillationTracker.totals``),
    not one layer one vote (the 18 layers hold 2,304 to 36,864 weights)."""
    last = metrics[-1]
    low_bit = {k: v for k, v in last["bins"].items() if k not in ("conv1", "linear")}

    def per_weight(key: str) -> float:
        layers = [k for k, v in low_bit.items() if v[key] is not None]
        return sum(sizes[k] * low_bit[k][key] for k in layers) / sum(sizes[k] for k in layers)

    return {"ce": last["ce"], "br_w": last["br_w"], "br_a": last["br_a"],
            "dist": per_weight("dist_alpha"), "flips": per_weight("flips")}


def stage2_oscillations(metrics: list[dict]) -> float | None:
    """Oscillations per low-bit weight and training step over the BR stage (epochs 10-30: the mean of the
    epochs' ``osc_freq``, each over the same number of steps), or None for a run from before it was
    tracked. (The last epoch's alone says little: the cosine has taken the learning rate to ~0.)"""
    values = [m.get("osc_freq") for m in metrics if m["epoch"] > WARMUP_EPOCHS]
    return statistics.fmean(values) if values and None not in values else None


def own_seconds(summary: dict, timing: list[dict]) -> float:
    """The wall time a row spent itself: its epochs after the shared warmup, or a PTQ run's whole time
    (it has no epochs)."""
    if summary.get("method") == "ptq":
        return summary["wall_time_s"]
    return sum(t["seconds"] for t in timing if t["epoch"] > WARMUP_EPOCHS)


def paired(row: list[dict], baseline: list[dict]) -> tuple[float, int, int]:
    """One seed's row against its baseline (their metrics.jsonl rows): the final test top-1 difference in
    points, and at how many of the stage-2 epochs they both have the row was ahead, of how many."""
    base = {m["epoch"]: m["test_acc"] for m in baseline if m["epoch"] > WARMUP_EPOCHS}
    stage2 = [(m["test_acc"], base[m["epoch"]]) for m in row if m["epoch"] in base]
    difference = as_written(row[-1]["test_acc"]) - as_written(baseline[-1]["test_acc"])  # 85.31 - 84.82 = 0.49
    return float(difference), sum(a > b for a, b in stage2), len(stage2)


def contrast_lines(runs: dict) -> list[str]:
    """The Markdown table of ``CONTRASTS`` whose two rows share a committed seed."""
    lines = ["| what differs | row − baseline | final test top-1 difference per seed (points) | mean "
             "| seed-epochs of stage 2 ahead |", "|" + "---|" * 5]
    def seeds_of(key: str) -> set[str]:
        return {n.split("_")[1] for n in runs if row_key(n) == key}

    for key, base, what in CONTRASTS:
        seeds = sorted(seeds_of(key) & seeds_of(base))
        if not seeds:
            continue
        pairs = [paired(runs[f"w2a2_{s}_{key}"][1], runs[f"w2a2_{s}_{base}"][1]) for s in seeds]
        per_seed = ", ".join(f"{d:+.2f} ({s[1:]})" for (d, _, _), s in zip(pairs, seeds))
        mean = rounded(mean_std([d for d, _, _ in pairs])[0], "+.2f")
        lines.append(f"| {what} | {key} − {base} | {per_seed} | {mean} "
                     f"| {sum(a for _, a, _ in pairs)} of {sum(n for _, _, n in pairs)} |")
    return lines if len(lines) > 2 else []


def _mean_std(values: list[float], spec: str = ".2f") -> str:
    return fmt_mean_std(*mean_std(values), spec)


def report() -> int:
    """RESULTS/study.md (one line per row: mean ± std over seeds; then the ``CONTRASTS``, seed by seed) and
    RESULTS/curves.png."""
    runs = {}
    for name in sorted(os.listdir(RESULTS)) if os.path.isdir(RESULTS) else []:
        summary = os.path.join(RESULTS, name, "summary.json")
        if os.path.exists(summary):
            with open(summary) as f:
                runs[name] = (json.load(f), read_jsonl(os.path.join(RESULTS, name, "metrics.jsonl")),
                              read_jsonl(os.path.join(RESULTS, name, "timing.jsonl")))
    if not runs:
        print(f"no finished run in {RESULTS}")
        return 2
    order = [r.name for r in plan()]
    keys = list(dict.fromkeys(row_key(n) for n in sorted(runs, key=order.index)))
    sizes = weights_per_layer()  # every row of the protocol is a ResNet-20
    lines = ["| row | flags beside the protocol's | seeds | final test top-1 (%) | CE | BR_w | BR_a "
             "| distance to level (α) | bin flips / epoch | oscillations / weight / step (stage 2) "
             "| wall time of its own epochs |",
             "|" + "---|" * 11]
    for key in keys:
        names = [n for n in runs if row_key(n) == key]
        figures = [last_epoch_figures(runs[n][1], sizes) for n in names if runs[n][1] and "bins" in runs[n][1][-1]]
        seeds = ", ".join(n.split("_")[1][1:] if n.startswith("w2a2_s") else "–" for n in names)
        accs = [runs[n][0]["final_test_acc"] for n in names]
        own = [own_seconds(runs[n][0], runs[n][2]) for n in names]
        flags = next((r.flags for r in plan() if r.name == names[0]), [])
        own_flags = flags[flags.index("--seed") + 2:] if "--seed" in flags else flags
        cells = [key, f"`{' '.join(own_flags)}`", seeds, _mean_std(accs)]
        cells += [_mean_std([f[k] for f in figures], ".4f") for k in ("ce", "br_w", "br_a", "dist", "flips")]
        oscillations = [stage2_oscillations(runs[n][1]) for n in names if not n.startswith("ptq")]
        cells.append("not tracked" if None in oscillations else _mean_std(oscillations, ".2e"))
        cells.append(_mean_std([s / 60 for s in own], ".0f") + " min")
        lines.append("| " + " | ".join(cells) + " |")
    contrasts = contrast_lines(runs)
    if contrasts:
        lines += ["", "Paired by seed (the rows of a seed branch from one warmup):", ""] + contrasts
    with open(os.path.join(RESULTS, "study.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot_curves(runs, keys)
    return 0


def plot_curves(runs: dict, keys: list[str]) -> None:
    """Test top-1 per epoch of every QAT run, one colour per row, one line style per seed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9, 5.5))
    tab20 = plt.get_cmap("tab20").colors  # pairs of a dark and a light shade: the 10 dark ones first
    colors = dict(zip(keys, tab20[0::2] + tab20[1::2]))
    for name, (_, metrics, _) in runs.items():
        if not name.startswith("w2a2_s") or not metrics:
            continue
        seed = name.split("_")[1]
        ax.plot([m["epoch"] for m in metrics], [m["test_acc"] for m in metrics], color=colors[row_key(name)],
                linestyle="-" if seed == "s42" else "--", label=f"{row_key(name)} ({seed})")
    for name, (summary, _, _) in runs.items():
        if name.startswith("ptq"):
            ax.axhline(summary["final_test_acc"], color="gray", linestyle=":", linewidth=1)
            ax.annotate(f"PTQ {name[4:].upper()}", (1, summary["final_test_acc"]), fontsize=8, color="gray")
    ax.axvline(WARMUP_EPOCHS + 0.5, color="black", linewidth=0.8)
    ax.set_xlabel("epoch (1-9 LSQ warmup, shared by the rows of a seed and recipe; 10-30 stage 2)")
    ax.set_ylabel("test top-1 (%)")
    ax.set_ylim(60, 90)
    ax.set_title("ResNet-20 W2A2 on CIFAR-10 (JPEG copy), CPU study")
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    fig.tight_layout()
    fig.savefig(os.path.join(RESULTS, "curves.png"), dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--data-dir", default="/tmp/cifar10", help="the CIFAR-10 copy (image folder) [/tmp/cifar10]")
    p.add_argument("--runs-dir", default=os.path.expanduser("~/qat-study"),
                   help="the run folders, outside the repository [~/qat-study]")
    p.add_argument("--jobs", type=int, default=2, help="runs at once [2]")
    p.add_argument("--commit", action="store_true", help="git-commit each finished row's results at once")
    p.add_argument("--only", nargs="+", default=["*"], metavar="PATTERN",
                   help="the rows whose names match one of these shell patterns, e.g. 'ptq_*' 'w2a2_s42_*' [all]")
    p.add_argument("-n", "--dry-run", action="store_true", help="say what each row needs, run nothing")
    p.add_argument("--report", action="store_true", help="write RESULTS/study.md and curves.png, run nothing")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error(f"--jobs must be >= 1, got {args.jobs}")
    if args.report:
        return report()
    if os.path.exists(args.runs_dir) and not os.path.isdir(args.runs_dir):
        p.error(f"--runs-dir {args.runs_dir} is a file, not a folder")
    names = [row.name for row in plan()]
    unmatched = [pattern for pattern in args.only if not fnmatch.filter(names, pattern)]
    if unmatched:
        p.error(f"--only {' '.join(unmatched)} matches no row of the study; its rows: {', '.join(names)}")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
