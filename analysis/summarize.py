#!/usr/bin/env python
"""Merge the runs under a folder into one results table (Markdown and CSV).

    python summarize.py RUNS_DIR [--out PREFIX]

A run is any folder under ``RUNS_DIR`` (searched recursively; ``RUNS_DIR`` itself may be
one run) holding one of ``config.json``, ``summary.json``, ``metrics.jsonl``,
``last.pt`` or the ``sweep_exit_code`` / ``sweep_running`` markers written by
``scripts/sweep.sh``. The grid of the last sweep into ``RUNS_DIR``
(``RUNS_DIR/sweep_plan.tsv``) adds its runs not started yet, as pending.

A run is ``finished`` (its summary.json says so), ``failed`` or ``interrupted`` (the
sweep recorded its exit status), ``running`` (the sweep's ``sweep_running`` marker is
there, and names a live process when it is on this host; a marker from another host,
such as a SLURM node, is taken at its word), ``unfinished`` (none of these: stopped
without an exit status, e.g. killed with its sweep) or ``pending``.

Runs whose experiment flags (every flag but the seed and how-to-run flags such as
``--workers``; ``--pretrained`` included) agree form one configuration. The
Markdown table has a row per configuration: the scenario (W-only, W+A stable, ...), the
experiment flags that vary between configurations, the seeds, the final epoch's test
top-1 (the result), then, for runs with ``--val-split``, the test top-1 of the best
validation epoch, and for runs without, the best test epoch's top-1 (selected on the test
set: optimistic, never a result), each as mean ± sample std over the finished seeds,
epochs and mean wall time per run. Runs that failed, were interrupted or are unfinished are counted in the row's
``runs`` column and listed one by one under the table with their reason; they are
never averaged and never dropped.

Writes ``PREFIX.md`` (the table), ``PREFIX.csv`` (the same rows, mean and std in
separate columns) and ``PREFIX_runs.csv`` (one row per run, every status);
``PREFIX`` defaults to ``RUNS_DIR/summary``. The Markdown is also printed.

Exit status: 0; 2 when ``RUNS_DIR`` is missing or holds no run.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import socket
import statistics
import sys
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal, localcontext

#: Files that make a folder a run folder.
RUN_MARKERS = ("config.json", "summary.json", "metrics.jsonl", "last.pt", "sweep_exit_code", "sweep_running")

#: The grid of the last sweep into a runs folder (scripts/sweep.sh): "folder<TAB>flags" lines.
SWEEP_PLAN = "sweep_plan.tsv"

#: Flags that describe how a run was executed, not the experiment (never table columns).
IGNORED_FLAGS = frozenset({"workers", "device", "output_dir", "resume", "overwrite", "dry_run", "data_dir",
                           "no_download", "tensorboard", "compile", "eval_batch_size", "progress_interval", "seed",
                           "num_bits", "num_bits_weight", "num_bits_act", "first_last_bits", "evaluate", "ptq",
                           "sync_bn", "from_warmup"})

#: Flags of post-training quantization only (``cifar10_qat_br.py --ptq``).
PTQ_FLAGS = ("calib_batches", "bn_recalib")

#: Column order and headers of the experiment settings (others follow, as ``--flag``).
COLUMN_NAMES = {
    "arch": "arch", "weight_bits": "W bits", "act_bits": "A bits", "first_last_bits": "first/last bits",
    "lambda_br": "λ_w", "lambda_br_act": "λ_a", "br_backprop_to_alpha_act": "A-BR→α",
    "freeze_alpha": "freeze α", "freeze_weight_alpha": "freeze W α", "freeze_act_alpha": "freeze A α",
    "clip_value": "clip", "optimizer": "optimizer", "val_split": "val split", "warmup_epochs": "warmup", "lr": "lr",
    "weight_decay": "wd", "momentum": "momentum", "batch_size": "batch", "pretrained": "pretrained", "amp": "amp",
    "per_channel_weights": "W α per channel", "lr_schedule": "lr schedule", "act_quant_at": "A quantized at",
    "lambda_dampen": "λ_d", "freeze_oscillating": "freeze osc.", "dampen_aggregation": "dampen agg.",
    "oscillation_momentum": "osc. momentum", "bn_reestimate": "BN re-est.",
}

#: Values of experiment flags newer than some runs: a run whose config.json lacks one ran with this.
LEGACY_SETTINGS = {"optimizer": "sgd", "val_split": 0, "lr_schedule": "cosine", "act_quant_at": "conv-input",
                   "lambda_dampen": 0.0, "dampen_aggregation": "kernel_mean", "freeze_oscillating": None,
                   "oscillation_momentum": 0.001, "bn_reestimate": 0}

#: Scenario names, in the order of the README's table (config.SCENARIOS); another name (``W-only, α
#: trained``) ranks with the name it starts with.
SCENARIO_ORDER = ("W-only", "W+A stable", "W+A moving target", "A-only", "LSQ baseline", "LSQ, α frozen after warmup",
                  "Oscillation dampening", "Iterative freezing", "PTQ", "float")

#: What an exit status of cifar10_qat_br.py means (see its docstring).
EXIT_MEANINGS = {1: "crashed", 2: "bad flag, data or checkpoint", 3: "non-finite values",
                 4: "an output file could not be written (disk full?)", 130: "SIGINT", 143: "SIGTERM"}


class SummaryError(ValueError):
    """The runs folder cannot be summarised; the message says why."""


@dataclass
class Run:
    """One run folder as read from disk.

    Attributes:
        path: the folder, relative to the runs folder.
        status: ``finished``, ``failed``, ``interrupted``, ``running``, ``unfinished`` or ``pending``.
        reason: why it is not finished ("" when finished).
        settings: experiment setting -> value (empty without a readable config.json).
        seed: ``--seed`` (None when unknown).
        final_acc: test top-1 (%) of the last epoch: the result (None if unknown, as the others).
        val_split: ``--val-split`` (images held out; 0: none).
        at_best_val_acc, best_val_acc: with a validation split, the test and the validation
            top-1 (%) of the best validation epoch.
        best_test_acc: without one, the best test top-1 (%) over the epochs: selected on the
            test set, so optimistic.
        best_epoch: the epoch of ``best.pt`` (best validation, else best test epoch).
        epochs_done, epochs: epoch numbers.
        wall_time_s: training time (s) from summary.json, or summed from timing.jsonl.
        osc_freq: the last logged epoch's oscillations per low-bit weight and training step
            (metrics.jsonl ``osc_freq``; None in runs from before it was logged, and float runs).
    """

    path: str
    status: str = "unfinished"
    reason: str = ""
    settings: dict = field(default_factory=dict)
    seed: int | None = None
    final_acc: float | None = None
    val_split: int = 0
    at_best_val_acc: float | None = None
    best_val_acc: float | None = None
    best_test_acc: float | None = None
    best_epoch: int | None = None
    epochs_done: int | None = None
    epochs: int | None = None
    wall_time_s: float | None = None
    osc_freq: float | None = None


def scenario(settings: dict) -> str:
    """The README scenario of a configuration (run.config.SCENARIOS' names), from its λ_w, λ_a, A-BR→α and
    step-size freezing settings (or PTQ), with the oscillation methods it uses (``Oscillation dampening``,
    ``Iterative freezing``; after a BR scenario's name: ``W-only + dampening``).

    As in the seed's document, the BR scenarios (and the oscillation rows beside them) freeze the step
    sizes after warmup and the LSQ baseline does not; a run that differs says so: ``W+A stable, α
    trained``, ``LSQ, α frozen after warmup``."""
    if settings.get("float_run"):
        return "float"
    if settings.get("method") == "ptq":  # post-training quantization: no λ, no training
        return "PTQ"
    w, a = settings.get("lambda_br", 0) > 0, settings.get("lambda_br_act", 0) > 0
    if w and a:
        base = "W+A moving target" if settings.get("br_backprop_to_alpha_act") else "W+A stable"
    else:
        base = "W-only" if w else ("A-only" if a else "LSQ baseline")
    methods = [m for key, m in (("lambda_dampen", "dampening"), ("freeze_oscillating", "iterative freezing"))
               if settings.get(key)]
    frozen = (bool(settings.get("freeze_alpha") or settings.get("freeze_weight_alpha")),
              bool(settings.get("freeze_alpha") or settings.get("freeze_act_alpha")))  # (weights', activations')
    if base == "LSQ baseline" and not methods:  # the seed's baseline trains α: a frozen one says which
        which = {(True, True): "α", (True, False): "W α", (False, True): "A α"}.get(frozen)
        return base if which is None else f"LSQ, {which} frozen after warmup"
    if base == "LSQ baseline":
        name = {"dampening": "Oscillation dampening", "iterative freezing": "Iterative freezing"}[methods[0]]
        name += "".join(f" + {m}" for m in methods[1:])
    else:
        name = base + "".join(f" + {m}" for m in methods)
    trained = {(False, False): "α", (True, False): "A α", (False, True): "W α"}.get(frozen)  # the others freeze
    return name if trained is None else f"{name}, {trained} trained"


def _read_json(path: str):
    with open(path) as f:
        return json.load(f)


def _read_jsonl(path: str) -> list[dict]:
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    break  # a torn last line of a killed run
    return rows


def _last_error_line(path: str) -> str:
    """The last ``error: ...`` line of the latest attempt in a training log, without the prefix; "" if none.

    scripts/sweep.sh starts each attempt with a ``===== `` line; earlier attempts are ignored.
    """
    if not os.path.exists(path):
        return ""
    found = ""
    with open(path, errors="replace") as f:
        for line in f:
            if line.startswith("===== "):
                found = ""
            elif line.startswith("error:"):
                found = line[len("error:"):].strip()
    return found


def read_run(root: str, folder: str) -> Run:
    """Read one run folder (``root/folder``) into a ``Run``; never raises for bad contents."""
    full = os.path.join(root, folder)
    run = Run(path=folder)
    notes = []
    config_path = os.path.join(full, "config.json")
    if os.path.exists(config_path):
        try:
            config = _read_json(config_path)
            flags, derived = config.get("flags", {}), config.get("derived", {})
            run.settings = {k: v for k, v in flags.items() if k not in IGNORED_FLAGS}
            run.settings.setdefault("per_channel_weights", False)  # runs from before the flag: per tensor
            for key in ("weight_bits", "act_bits", "first_last_bits", "float_run", "method"):
                if key in derived:
                    run.settings[key] = derived[key]
            if run.settings.get("method") != "ptq":  # PTQ's own flags mean nothing to a trained run
                for key in PTQ_FLAGS:
                    run.settings.pop(key, None)
                run.settings = {**LEGACY_SETTINGS, **run.settings}
            run.val_split = flags.get("val_split") or 0
            run.seed = flags.get("seed")
            run.epochs = flags.get("epochs")
        except (OSError, ValueError, AttributeError) as exc:
            notes.append(f"config.json unreadable ({exc})")
    else:
        notes.append("no config.json")
    rows = _read_jsonl(os.path.join(full, "metrics.jsonl"))
    if rows:
        last = rows[-1]
        run.epochs_done = last.get("epoch")
        run.epochs = run.epochs or last.get("epochs")
        _read_accuracies(run, {**last, "final_test_acc": last.get("test_acc")})
        run.osc_freq = last.get("osc_freq")
    timing = _read_jsonl(os.path.join(full, "timing.jsonl"))
    if timing:
        run.wall_time_s = sum(r.get("seconds", 0.0) for r in timing)
    summary_path = os.path.join(full, "summary.json")
    summary = None
    if os.path.exists(summary_path):
        try:
            summary = _read_json(summary_path)
        except (OSError, ValueError) as exc:
            notes.append(f"summary.json unreadable ({exc})")
    if isinstance(summary, dict) and summary.get("status") == "finished":
        run.status = "finished"
        _read_accuracies(run, summary)
        run.wall_time_s = summary.get("wall_time_s")
        run.epochs = summary.get("epochs", run.epochs)
        run.epochs_done = run.epochs
        run.reason = "; ".join(notes)
        return run
    if run.epochs_done:
        progress = f"{run.epochs_done}/{run.epochs if run.epochs is not None else '?'} epochs done"
        if run.final_acc is not None:
            progress += f", last test top-1 {run.final_acc:.2f}%"
    elif os.path.exists(os.path.join(full, "last.pt")):  # a write failed after it, before its log line
        progress = "no epoch logged, but last.pt holds one (--resume logs it)"
    else:
        progress = "no epoch finished"
    code = None
    marker = os.path.join(full, "sweep_exit_code")
    if os.path.exists(marker):
        try:
            with open(marker) as f:
                code = int(f.read().strip())
        except (OSError, ValueError):
            code = 1
    if code is not None and code != 0:
        run.status = "interrupted" if code in (130, 143) else "failed"
        meaning = EXIT_MEANINGS.get(code, "killed by a signal" if code > 128 else "crashed")
        detail = _last_error_line(os.path.join(full, "train.log"))
        run.reason = f"exit {code} ({meaning}); {progress}" + (f"; error: {detail}" if detail else "")
        if run.status == "interrupted":
            run.reason += "; rerun the sweep (or --resume) to continue it"
    else:
        running = _running_marker(os.path.join(full, "sweep_running"))
        if running is None:
            run.status = "unfinished"
            run.reason = f"{progress} (stopped without an exit status, or started outside the sweep)"
        else:
            run.status = "running" if running else "unfinished"
            marker = _read_marker(os.path.join(full, "sweep_running"))
            where = f"on {marker.get('host', '?')}" + (f", SLURM job {marker['slurm_job']}" if "slurm_job" in marker
                                                       else f", pid {marker.get('pid', '?')}")
            run.reason = (f"{progress}; running {where} since {marker.get('since', '?')}" if running else
                          f"{progress}; its sweep process ({where}) is gone without an exit status")
    run.reason = "; ".join([run.reason] + notes)
    return run


def _read_accuracies(run: Run, record: dict) -> None:
    """Set the accuracies of ``run`` from summary.json (or a metrics.jsonl row with its ``test_acc``
    as ``final_test_acc``); older runs' ``best_test_acc`` / ``best_epoch`` were selected on test."""
    run.final_acc = record.get("final_test_acc")
    run.at_best_val_acc, run.best_val_acc = record.get("test_acc_at_best_val"), record.get("best_val_acc")
    run.best_test_acc = record.get("best_test_acc_optimistic", record.get("best_test_acc"))
    run.best_epoch = next((record[k] for k in ("best_val_epoch", "best_test_epoch_optimistic", "best_epoch")
                           if record.get(k) is not None), None)


def _read_marker(path: str) -> dict:
    """The ``key=value`` words of a sweep marker file ({} when unreadable)."""
    try:
        with open(path) as f:
            return dict(word.split("=", 1) for word in f.read().split() if "=" in word)
    except OSError:
        return {}


def _running_marker(path: str) -> bool | None:
    """Whether the ``sweep_running`` marker at ``path`` says the run is running.

    None without a marker; False when it names a process on this host that is gone (the
    sweep was killed); True otherwise (another host's process cannot be checked from here).
    """
    if not os.path.exists(path):
        return None
    marker = _read_marker(path)
    if marker.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(marker.get("pid", "")), 0)
    except ProcessLookupError:
        return False
    except (ValueError, OSError):  # no pid, or another user's live process
        pass
    return True


def planned_runs(runs_dir: str) -> list[str]:
    """The run folders (relative to ``runs_dir``) of the sweep plan kept there; [] without one."""
    path = os.path.join(runs_dir, SWEEP_PLAN)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [line.split("\t", 1)[0] for line in f if line.strip()]


def find_runs(runs_dir: str) -> list[Run]:
    """Every run folder under ``runs_dir``, read with ``read_run``, and the pending runs of
    its sweep plan (``SWEEP_PLAN``), sorted by path.

    Raises:
        SummaryError: ``runs_dir`` is not a folder, or holds no run.
    """
    if not os.path.isdir(runs_dir):
        raise SummaryError(f"{runs_dir}: no such folder (pass the folder the sweep wrote its runs to)")
    folders = []
    for here, dirs, files in os.walk(runs_dir):
        if any(m in files for m in RUN_MARKERS):
            folders.append(os.path.relpath(here, runs_dir))
            dirs[:] = []  # a run's sub-folders (tensorboard/, plots/) are part of it
        else:
            dirs.sort()
    pending = [Run(path=name, status="pending", reason=f"not started yet (planned in {SWEEP_PLAN})")
               for name in planned_runs(runs_dir) if os.path.normpath(name) not in folders]
    if not folders and not pending:
        raise SummaryError(f"{runs_dir}: no run found (no folder with config.json, metrics.jsonl or summary.json)")
    return sorted([read_run(runs_dir, f) for f in folders] + pending, key=lambda r: r.path)


def varying_settings(runs: list[Run]) -> list[str]:
    """Settings whose value differs between runs (runs without a config ignored), in table order."""
    keys = set().union(*(r.settings for r in runs if r.settings))
    varying = [k for k in keys if k not in ("epochs", "float_run", "method")
               and len({json.dumps(r.settings.get(k)) for r in runs if r.settings}) > 1]
    order = list(COLUMN_NAMES)
    return sorted(varying, key=lambda k: (order.index(k) if k in order else len(order), k))


def mean_std(values: list[float]) -> tuple[Decimal | None, Decimal | None]:
    """Mean and sample standard deviation of one figure over seeds: (None, None) for no value, std None for one.

    Computed in decimal on the numbers as the runs wrote them (each float's shortest repr: 85.58, not
    85.5799…), so that the mean of two accuracies is exact (85.315) and ``rounded`` rounds it as a reader
    does by hand (85.32), not as its binary neighbour 85.31499… would (85.31).
    """
    if not values:
        return None, None
    exact = [as_written(v) for v in values]
    return statistics.mean(exact), (statistics.stdev(exact) if len(exact) > 1 else None)


def as_written(value: float) -> Decimal:
    """The decimal number a run wrote (a float's shortest repr): 85.58, not 85.5799…"""
    return Decimal(repr(float(value)))


def rounded(value: Decimal | float, spec: str) -> str:
    """``format(value, spec)`` (``.2f``, ``.1e``, …) with ties rounded away from zero, as by hand: 85.125 ->
    85.13, −0.245 -> −0.25. (Python rounds ties to even, and a float by its binary value.) An exponent has
    two digits at least, as Python writes a float's: 7.83e-04."""
    if value == 0:  # Decimal writes a zero's exponent from its digits: 0.00e+1
        return format(0.0, spec)
    with localcontext(rounding=ROUND_HALF_UP):
        text = format(value if isinstance(value, Decimal) else as_written(value), spec)
    return re.sub(r"e([+-])(\d)$", r"e\g<1>0\2", text)


def fmt_mean_std(mean: Decimal | float | None, std: Decimal | None, spec: str = ".2f", std_spec: str = "") -> str:
    """``85.32 ± 0.26`` (``rounded`` by ``spec``; the std by ``std_spec`` when given), ``85.32`` without a std,
    ``–`` without a mean."""
    if mean is None:
        return "–"
    return rounded(mean, spec) + (f" ± {rounded(std, std_spec or spec)}" if std is not None else "")


def _fmt_acc(mean: Decimal | float | None, std: Decimal | None) -> str:
    return fmt_mean_std(mean, std)


def _fmt_sci(mean: Decimal | None, std: Decimal | None) -> str:
    """``1.23e-04 ± 2.0e-05``: small rates (oscillations per weight and step); ``–`` for None."""
    return fmt_mean_std(mean, std, ".2e", ".1e")


def _float(value: Decimal | None) -> float | None:
    """A mean or std as the CSV holds it (a float: 85.315, not 28 digits of a Decimal)."""
    return None if value is None else float(value)


def fmt_duration(seconds: float | None) -> str:
    """``1h02m``, ``12m05s`` or ``42s``; ``–`` for None."""
    if seconds is None or not math.isfinite(seconds):
        return "–"
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def _fmt_value(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def group_runs(runs: list[Run]) -> list[dict]:
    """One dict per configuration (runs with a config.json; others are listed apart).

    Each dict: ``scenario``, ``settings`` (the group's settings), ``runs`` (its ``Run``s),
    ``seeds`` (of the finished runs), ``final`` / ``at_best_val`` / ``best_test`` ((mean, std)
    over the finished runs of the final test top-1, the test top-1 at the best validation
    epoch, the optimistic best test top-1), ``epochs`` and ``wall_time_s`` (mean over the
    finished runs).
    """
    groups: dict[str, dict] = {}
    for run in runs:
        if not run.settings:
            continue
        key = json.dumps(run.settings, sort_keys=True)
        groups.setdefault(key, {"settings": run.settings, "runs": []})["runs"].append(run)
    out = []
    for g in groups.values():
        done = sorted((r for r in g["runs"] if r.status == "finished"), key=lambda r: (r.seed is None, r.seed))
        g["scenario"] = scenario(g["settings"])
        g["seeds"] = [r.seed for r in done]
        g["final"] = mean_std([r.final_acc for r in done if r.final_acc is not None])
        g["at_best_val"] = mean_std([r.at_best_val_acc for r in done if r.at_best_val_acc is not None])
        g["best_test"] = mean_std([r.best_test_acc for r in done if r.best_test_acc is not None])
        g["osc_freq"] = mean_std([r.osc_freq for r in done if r.osc_freq is not None])
        g["epochs"] = g["settings"].get("epochs")
        times = [r.wall_time_s for r in done if r.wall_time_s is not None]
        g["wall_time_s"] = statistics.fmean(times) if times else None
        out.append(g)
    return out


def _value_key(value):
    """Numbers in numeric order, then text, then missing values."""
    if isinstance(value, (int, float)):
        return (0, float(value), "")
    return (2, 0.0, "") if value is None else (1, 0.0, json.dumps(value, sort_keys=True))


def _sort_key(group: dict, columns: list[str]):
    name = group["scenario"]
    rank = next((i for i, known in enumerate(SCENARIO_ORDER) if name == known or name.startswith(known + ",")),
                len(SCENARIO_ORDER))
    return (rank, [_value_key(group["settings"].get(k)) for k in columns], _value_key(group["epochs"]))


def _runs_cell(group: dict) -> str:
    counts: dict[str, int] = {}
    for r in group["runs"]:
        counts[r.status] = counts.get(r.status, 0) + 1
    total = len(group["runs"])
    parts = [f"{counts.get('finished', 0)}/{total} finished"]
    parts += [f"{n} {status}" for status, n in counts.items() if status != "finished"]
    return ", ".join(parts)


def build_tables(runs: list[Run]) -> tuple[str, list[dict], list[dict]]:
    """The Markdown text, the per-configuration CSV rows and the per-run CSV rows."""
    columns = varying_settings(runs)
    groups = sorted(group_runs(runs), key=lambda g: _sort_key(g, columns))
    # The result (final epoch) first; the epoch-selected numbers only where some run has them.
    accuracies = [("final test top-1 (%)", "final")]
    if any(r.at_best_val_acc is not None for r in runs):
        accuracies.append(("test top-1 at best val epoch (%)", "at_best_val"))
    if any(r.best_test_acc is not None for r in runs):
        accuracies.append(("best test epoch top-1 (%; selected on test, optimistic)", "best_test"))
    # Oscillations (Nagel et al. 2022) where some run logged them: the last epoch's, per weight and step.
    osc = any(r.osc_freq is not None for r in runs)
    headers = ["scenario"] + [COLUMN_NAMES.get(k, "--" + k.replace("_", "-")) for k in columns] + [
        "seeds"] + [h for h, _ in accuracies] + (["oscillations / weight / step (last epoch)"] if osc else []) + [
        "epochs", "wall time / run", "runs"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    config_rows = []
    for g in groups:
        cells = [g["scenario"]] + [_fmt_value(g["settings"].get(k)) for k in columns] + [
            ",".join(str(s) for s in g["seeds"]) or "–"] + [_fmt_acc(*g[key]) for _, key in accuracies] + (
            [_fmt_sci(*g["osc_freq"])] if osc else []) + [
            _fmt_value(g["epochs"]), fmt_duration(g["wall_time_s"]), _runs_cell(g)]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        config_rows.append({"scenario": g["scenario"], **{k: g["settings"].get(k) for k in columns},
                            "seeds": " ".join(str(s) for s in g["seeds"]), "n_finished": len(g["seeds"]),
                            "n_runs": len(g["runs"]),
                            "final_top1_mean": _float(g["final"][0]), "final_top1_std": _float(g["final"][1]),
                            "test_top1_at_best_val_mean": _float(g["at_best_val"][0]),
                            "test_top1_at_best_val_std": _float(g["at_best_val"][1]),
                            "best_test_top1_optimistic_mean": _float(g["best_test"][0]),
                            "best_test_top1_optimistic_std": _float(g["best_test"][1]),
                            "osc_freq_last_epoch_mean": _float(g["osc_freq"][0]),
                            "osc_freq_last_epoch_std": _float(g["osc_freq"][1]),
                            "epochs": g["epochs"], "wall_time_s_mean": g["wall_time_s"]})
    n_done = sum(r.status == "finished" for r in runs)
    text = [f"{len(runs)} run(s), {n_done} finished, {len(groups)} configuration(s). "
            f"Top-1: mean ± sample std over the finished seeds. The result is the final epoch's test top-1"
            + ("; 'best test epoch' is chosen on the test set itself, so it overstates: never a result"
               if accuracies[-1][1] == "best_test" else "") + ".", ""] + lines
    not_done = [r for r in runs if r.status != "finished"]
    if not_done:
        text += ["", "Not finished (not in the means):", ""]
        text += [f"- `{r.path}`: {r.status}: {r.reason}" for r in not_done]
    orphans = [r for r in runs if r.status == "finished" and not r.settings]
    if orphans:
        text += ["", "Finished but not in the table (config.json missing or unreadable):", ""]
        text += [f"- `{r.path}`: final test top-1 {_fmt_acc(r.final_acc, None)}"
                 + (f" ({r.reason})" if r.reason else "") for r in orphans]
    run_rows = []
    for r in runs:
        run_rows.append({"run": r.path, "status": r.status, "scenario": scenario(r.settings) if r.settings else None,
                         **{k: r.settings.get(k) for k in columns}, "seed": r.seed,
                         "final_top1": r.final_acc, "val_split": r.val_split,
                         "test_top1_at_best_val": r.at_best_val_acc, "best_val_top1": r.best_val_acc,
                         "best_test_top1_optimistic": r.best_test_acc, "best_epoch": r.best_epoch,
                         "osc_freq_last_epoch": r.osc_freq,
                         "epochs_done": r.epochs_done, "epochs": r.epochs, "wall_time_s": r.wall_time_s,
                         "reason": r.reason})
    return "\n".join(text) + "\n", config_rows, run_rows


def _write_csv(rows: list[dict], path: str) -> None:
    fields = list(rows[0]) if rows else ["scenario"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if v is None else v) for k, v in row.items()})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="summarize.py", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("runs_dir", help="folder holding the run folders (e.g. the sweep's RUNS_DIR)")
    parser.add_argument("--out", default=None, metavar="PREFIX",
                        help="write PREFIX.md, PREFIX.csv and PREFIX_runs.csv [RUNS_DIR/summary]")
    parser.add_argument("--quiet", action="store_true", help="do not print the table")
    args = parser.parse_args(argv)
    try:
        runs = find_runs(args.runs_dir)
        markdown, config_rows, run_rows = build_tables(runs)
        prefix = args.out or os.path.join(args.runs_dir, "summary")
        if os.path.dirname(prefix):
            os.makedirs(os.path.dirname(prefix), exist_ok=True)
        with open(prefix + ".md", "w") as f:
            f.write(markdown)
        _write_csv(config_rows, prefix + ".csv")
        _write_csv(run_rows, prefix + "_runs.csv")
    except SummaryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: cannot write the summary: {exc}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(markdown, end="")
    print(f"Wrote {prefix}.md, {prefix}.csv and {prefix}_runs.csv", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
