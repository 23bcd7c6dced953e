#!/usr/bin/env python
"""Plots of one run: weight / activation histograms against the quantization grid, and training curves.

    python plots.py RUN_DIR [--layers NAME ... | --layers all] [--out DIR]
                    [--data-dir DIR] [--images N] [--no-activations]

Writes PNG files (matplotlib, Agg backend: no display needed) to ``RUN_DIR/plots``:

* ``hist_<layer>.png`` for each chosen quantized layer: the histogram of its float
  weights (top row) and of its pre-quantization activations (bottom row) at the end of
  warmup (``warmup_end.pt``, before BR) and at the last epoch (``last.pt``, after BR).
  Red lines are the quantization levels ``k·α``, dashed lines the bin edges
  ``(k ± ½)·α``; values in the grey zones are clipped to the end levels. The percentage
  over each level is the bin occupancy, the title gives α and the mean distance of the
  values to their level (in α units; 0 = every value on its level).
* ``curves.png``: train/test top-1, total loss and CE, the BR terms, and every weight
  and activation α per layer, against the epoch (from ``metrics.jsonl``).
* ``bins.png``: per layer, the mean distance of the weights to their level (α units)
  and (low-bit layers only) the fraction of weights that changed bin since the previous
  epoch, and the mean bin occupancy of the low-bit layers (from ``metrics.jsonl``).
  A float run has no bins (nor histograms): only ``curves.png``, with a warning.

Activations are not stored in checkpoints: they are recomputed with the network in
evaluation mode (BatchNorm running statistics, as at test time) on ``--images`` test
images spread evenly over the test split of ``--data-dir`` (default: the run's own
``--data-dir``). When that data cannot be found, the activation rows are left out with
a warning; ``--no-activations`` leaves them out silently.

Layers default to three of the low-bit layers (first, middle, last); the first conv and
last linear (8-bit by default) can be named explicitly. ``--layers all`` plots every
quantized layer.

Exit status: 0; 2 on bad input (missing run folder or files, unknown layer, unusable data); 4 when a
PNG or the output folder cannot be written (disk full, ...; the ``error:`` line names the file).
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from run.checkpoint import EXIT_WRITE_FAILED, CheckpointError, WriteError, load_checkpoint, read_jsonl, writing  # noqa: E402
from run.data import MEAN, STD, DataError, find_source, load_split  # noqa: E402
from models import build_model  # noqa: E402
from quant import quantize_model, quantized_layers  # noqa: E402
from quant.grid import grid_levels, level_spacing, num_levels, per_channel_view  # noqa: E402
from regularizers import weight_bin_stats  # noqa: E402

#: Above this many levels the levels and bin edges are not drawn (only the clip range).
MAX_DRAWN_LEVELS = 32

LEVEL_COLOR = "#d62728"
EDGE_COLOR = "#444444"
CLIP_SHADE = "#bbbbbb"
COLUMN_COLORS = ("#7f9fc8", "#2c5f9e")  # before BR, after BR


class PlotError(ValueError):
    """Bad input to the plot command; the message names the file, folder or layer."""


# -- loading ------------------------------------------------------------------------------------
def load_config(run_dir: str) -> dict:
    """The run's ``config.json`` as a dict.

    Raises:
        PlotError: ``run_dir`` is not a folder, or has no readable config.json.
    """
    import json
    if not os.path.isdir(run_dir):
        raise PlotError(f"{run_dir}: no such run folder")
    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        raise PlotError(f"{run_dir}: no config.json (not a run folder of cifar10_qat_br.py)")
    try:
        with open(path) as f:
            config = json.load(f)
        config["flags"], config["derived"]  # noqa: B018 - both must be there
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PlotError(f"{path}: unreadable ({exc})") from None
    return config


def build_run_model(config: dict) -> torch.nn.Module:
    """The run's network (float, then LSQ-converted) with fresh parameters, on the CPU.

    Raises:
        PlotError: config.json lacks a field or names an unknown architecture / width.
    """
    flags, derived = config["flags"], config["derived"]
    try:
        model = build_model(flags["arch"], clip_value=flags.get("clip_value"))
        return quantize_model(model, derived["weight_bits"], derived["act_bits"], derived["first_last_bits"],
                              per_channel_weights=bool(flags.get("per_channel_weights")),
                              act_quant_at=flags.get("act_quant_at", "conv-input"))
    except (KeyError, ValueError) as exc:
        raise PlotError(f"config.json does not describe a network this tool builds ({exc})") from None


def load_model(config: dict, path: str) -> tuple[torch.nn.Module, int]:
    """The network of checkpoint ``path`` (in eval mode) and the epoch it was saved after.

    Raises:
        PlotError: missing, unreadable or mismatching checkpoint.
    """
    try:
        ckpt = load_checkpoint(path, "plots.py")
    except CheckpointError as exc:
        raise PlotError(str(exc)) from None
    model = build_run_model(config)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise PlotError(f"{path}: does not fit the run's config.json ({str(exc).splitlines()[0]})") from None
    return model.eval(), int(ckpt.get("epoch", 0))


def choose_layers(all_layers: dict, requested: list[str] | None) -> list[str]:
    """The layers to plot: ``requested`` (checked), ``["all"]``, or three low-bit layers by default.

    Args:
        all_layers: name -> quantized layer, in module order.
        requested: layer names from ``--layers``, or None.

    Raises:
        PlotError: a requested name that is not a quantized layer (the message lists them).
    """
    names = list(all_layers)
    if requested:
        if requested == ["all"]:
            return names
        unknown = [n for n in requested if n not in all_layers]
        if unknown:
            raise PlotError(f"--layers: no quantized layer named {', '.join(unknown)}; "
                            f"the quantized layers are: {', '.join(names)}")
        return list(dict.fromkeys(requested))
    inner = [n for n, m in all_layers.items() if not m.is_first_or_last] or names
    picks = [inner[0], inner[len(inner) // 2], inner[-1]]
    return list(dict.fromkeys(picks))


def load_images(data_dir: str, n: int) -> torch.Tensor:
    """``n`` test images spread evenly over the test split, normalised, float ``(n, 3, 32, 32)``.

    Raises:
        DataError: no usable CIFAR-10 at ``data_dir`` (never downloads).
    """
    if not data_dir:
        raise DataError("no --data-dir known for this run")
    source = find_source(data_dir, download=False)
    split = load_split(source, train=False, download=False, workers=0,
                       log=lambda msg: print(msg, file=sys.stderr))
    total = len(split.labels)
    if total == 0:
        raise DataError(f"--data-dir {data_dir}: the test split is empty")
    index = torch.linspace(0, total - 1, min(n, total)).round().long().unique()
    x = split.images[index].float() / 255.0
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def capture_activations(model: torch.nn.Module, layer_names: list[str], images: torch.Tensor,
                        batch_size: int = 128) -> dict[str, np.ndarray]:
    """Pre-quantization inputs of the chosen layers' ``act_quant`` on ``images`` (model in eval mode).

    Returns:
        layer name -> 1-D float32 array of every input value (all images, channels, positions).
    """
    layers = quantized_layers(model)
    parts: dict[str, list[np.ndarray]] = {n: [] for n in layer_names}
    handles = []
    for name in layer_names:
        def hook(module, inputs, name=name):
            parts[name].append(module.pre_quantization(inputs[0]).detach().float().flatten().numpy().copy())
        handles.append(layers[name].act_quant.register_forward_pre_hook(hook))
    try:
        model.eval()
        for start in range(0, images.shape[0], batch_size):
            model(images[start:start + batch_size])
    finally:
        for h in handles:
            h.remove()
    return {n: np.concatenate(v) if v else np.zeros(0, np.float32) for n, v in parts.items()}


# -- histograms ---------------------------------------------------------------------------------
class Panel:
    """One histogram: ``values`` (1-D array, units of the tensor) on the grid ``k·alpha``, k in ``[qmin, qmax]``."""

    def __init__(self, title: str, values: np.ndarray, alpha: float | None, qmin: int | None, qmax: int | None):
        self.title, self.values, self.alpha, self.qmin, self.qmax = title, values, alpha, qmin, qmax

    @property
    def quantized(self) -> bool:
        return self.alpha is not None

    def stats(self) -> dict | None:
        """``weight_bin_stats`` of the values (dist_alpha, occupancy), or None when not quantized."""
        if not self.quantized or self.values.size == 0:
            return None
        stats, _ = weight_bin_stats(torch.from_numpy(self.values), torch.tensor(self.alpha), self.qmin, self.qmax, None)
        return stats


def _x_range(panels: list[Panel]) -> tuple[float, float]:
    lo, hi = math.inf, -math.inf
    for p in panels:
        if p.values.size:
            sample = p.values[::max(1, p.values.size // 200_000)]  # percentiles of a strided sample: fast enough
            lo = min(lo, float(np.percentile(sample, 0.02)))
            hi = max(hi, float(np.percentile(sample, 99.98)))
        if p.quantized and num_levels(p.qmin, p.qmax) <= MAX_DRAWN_LEVELS:  # show a bit of each clip zone
            margin = 0.8 * level_spacing(p.qmin, p.qmax)
            lo = min(lo, (p.qmin - margin) * p.alpha)
            hi = max(hi, (p.qmax + margin) * p.alpha)
    if not math.isfinite(lo) or not math.isfinite(hi) or hi <= lo:
        lo, hi = -1.0, 1.0
    pad = 0.02 * (hi - lo)
    return lo - pad, hi + pad


def draw_panel(ax, panel: Panel, x_range: tuple[float, float], color: str, log_y: bool) -> None:
    """Histogram of ``panel.values`` with the levels, bin edges, clip zones and occupancy drawn."""
    lo, hi = x_range
    values = panel.values
    n_bins = int(np.clip(np.sqrt(max(values.size, 1)), 40, 160))
    ax.hist(values, bins=n_bins, range=(lo, hi), color=color, log=log_y, zorder=2)
    ax.set_xlim(lo, hi)
    ax.set_title(panel.title, fontsize=10, pad=14)
    outside = float(np.mean((values < lo) | (values > hi))) if values.size else 0.0
    ax.set_xlabel("value" + (f"   ({100 * outside:.2g}% of the values lie beyond the axis)" if outside > 0 else ""),
                  fontsize=9)
    ax.grid(axis="y", alpha=0.3, zorder=0)
    if not panel.quantized:
        ax.text(0.98, 0.95, "not quantized (float)", transform=ax.transAxes, ha="right", va="top", fontsize=8)
        return
    a, qmin, qmax = panel.alpha, panel.qmin, panel.qmax
    half = level_spacing(qmin, qmax) / 2  # half the distance between levels (the binary grid's is 2)
    ax.axvspan(lo, (qmin - half) * a, color=CLIP_SHADE, alpha=0.35, zorder=1, lw=0)
    ax.axvspan((qmax + half) * a, hi, color=CLIP_SHADE, alpha=0.35, zorder=1, lw=0)
    stats = panel.stats()
    levels = num_levels(qmin, qmax)
    if levels <= MAX_DRAWN_LEVELS:
        for j, k in enumerate(grid_levels(qmin, qmax).tolist()):
            ax.axvline(k * a, color=LEVEL_COLOR, lw=1.3, zorder=3)
            if k < qmax:
                ax.axvline((k + half) * a, color=EDGE_COLOR, lw=0.9, ls="--", zorder=3)
            if stats is not None and lo <= k * a <= hi:
                ax.text(k * a, 1.0, f"{100 * stats['occupancy'][j]:.0f}%", transform=ax.get_xaxis_transform(),
                        ha="center", va="bottom", fontsize=7, color=LEVEL_COLOR)
    else:
        for k in (qmin, qmax):
            if lo <= k * a <= hi:
                ax.axvline(k * a, color=LEVEL_COLOR, lw=1.3, zorder=3)
        ax.text(0.02, 0.95, f"{levels} levels, step α\n(only the end levels\nare drawn, if in view)",
                transform=ax.transAxes, ha="left", va="top", fontsize=8)
    if stats is not None:
        ax.text(0.98, 0.95, f"α = {a:.4g}\nmean dist. to level = {stats['dist_alpha']:.3f} α",
                transform=ax.transAxes, ha="right", va="top", fontsize=8,
                bbox=dict(facecolor="white", alpha=0.85, lw=0), zorder=5)


def plot_layer_histograms(rows: list[tuple[str, list[Panel], bool]], out_path: str, suptitle: str) -> None:
    """One figure: a row per tensor kind, a column per checkpoint; both axes shared within a row.

    Args:
        rows: ``(row label, panels, log y)`` per row, panels in column order.
        out_path: the PNG to write.
        suptitle: the figure title.
    """
    n_cols = max(len(p) for _, p, _ in rows)
    fig, axes = plt.subplots(len(rows), n_cols, figsize=(5.6 * n_cols, 3.4 * len(rows)), squeeze=False)
    for r, (label, panels, log_y) in enumerate(rows):
        x_range = _x_range(panels)
        for c in range(n_cols):
            ax = axes[r][c]
            if c >= len(panels):
                ax.axis("off")
                continue
            color = COLUMN_COLORS[-1] if len(panels) == 1 else COLUMN_COLORS[min(c, 1)]
            draw_panel(ax, panels[c], x_range, color, log_y)
            ax.set_ylabel(f"{label}\ncount" + (" (log)" if log_y else ""), fontsize=9)
        limits = [axes[r][c].get_ylim() for c in range(len(panels))]
        for c in range(len(panels)):  # same count axis before and after, so heights compare
            axes[r][c].set_ylim(min(lo for lo, _ in limits), max(hi for _, hi in limits))
    handles = [plt.Line2D([], [], color=LEVEL_COLOR, lw=1.3, label="level kα"),
               plt.Line2D([], [], color=EDGE_COLOR, lw=0.9, ls="--", label="bin edge (k±½)α"),
               plt.Rectangle((0, 0), 1, 1, color=CLIP_SHADE, alpha=0.35, label="clipped to end level")]
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=9, frameon=False)
    fig.suptitle(suptitle, fontsize=12)
    fig.tight_layout(rect=(0, 0.05, 1, 0.97))
    with writing(out_path):
        fig.savefig(out_path, dpi=110)
    plt.close(fig)


# -- curves -------------------------------------------------------------------------------------
def _layer_colors(n: int):
    cmap = plt.get_cmap("viridis")
    return [cmap(i / max(n - 1, 1)) for i in range(n)]


def _stage2_marker(ax, rows: list[dict], shade: bool) -> None:
    """Set the epoch range of ``ax``; shade the stage-2 (BR) epochs when ``shade``."""
    epochs = [r["epoch"] for r in rows]
    if not epochs:
        return
    ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
    stage2 = [r["epoch"] for r in rows if r.get("stage") == 2]
    if shade and stage2:
        ax.axvspan(min(stage2) - 0.5, max(stage2) + 0.5, color="#f2e6c9", alpha=0.5, lw=0, zorder=0)


def _per_layer(ax, rows: list[dict], layers: list[str], first_last: set, value, title: str, ylabel: str,
               log_y: bool = False) -> bool:
    """Draw one line per layer (colour = depth, dashed = first/last layer); False if nothing to draw."""
    colors = _layer_colors(len(layers))
    drawn = False
    for i, name in enumerate(layers):
        pts = [(r["epoch"], value(r, name)) for r in rows]
        pts = [(e, v) for e, v in pts if v is not None]
        if pts:
            e, v = zip(*pts)
            ax.plot(e, v, color=colors[i], lw=1.2, marker="o" if len(pts) < 12 else None, ms=3,
                    ls="--" if name in first_last else "-")
            drawn = True
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(ylabel, fontsize=9)
    if log_y and drawn:
        ax.set_yscale("log")
    if drawn and layers:
        sm = plt.cm.ScalarMappable(cmap="viridis", norm=plt.Normalize(0, max(len(layers) - 1, 1)))
        bar = ax.figure.colorbar(sm, ax=ax, pad=0.01, fraction=0.05)
        bar.set_label("layer (input → output)", fontsize=8)
        bar.set_ticks([0, len(layers) - 1])
        bar.set_ticklabels([layers[0], layers[-1]], fontsize=7)
    else:
        ax.text(0.5, 0.5, "nothing logged", transform=ax.transAxes, ha="center", va="center", color="grey")
    return drawn


def _finish_axes(axes, rows: list[dict], shade: bool) -> None:
    for ax in axes:
        _stage2_marker(ax, rows, shade)
        ax.set_xlabel("epoch", fontsize=9)
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.tick_params(labelsize=8)


def plot_curves(rows: list[dict], layers: list[str], first_last: set, out_path: str, title: str) -> None:
    """Accuracy, losses, BR terms and α per layer against the epoch (one PNG).

    Args:
        rows: ``metrics.jsonl`` rows in epoch order.
        layers: quantized layer names in module order; first_last: those at --first-last-bits.
        out_path: the PNG to write. title: the figure title.

    The stage-2 epochs of a quantized run are shaded.
    """
    fig, axes = plt.subplots(2, 3, figsize=(17, 8.5))
    ep = [r["epoch"] for r in rows]
    mark = "o" if len(rows) < 12 else None
    ax = axes[0][0]
    ax.plot(ep, [r["train_acc"] for r in rows], marker=mark, label="train (augmented)")
    ax.plot(ep, [r["test_acc"] for r in rows], marker=mark, label="test")
    if any(r.get("val_acc") is not None for r in rows):  # --val-split: the held-out training images
        ax.plot(ep, [r.get("val_acc") for r in rows], marker=mark, label="validation (held out)")
    ax.set_title("top-1 accuracy", fontsize=10)
    ax.set_ylabel("%", fontsize=9)
    ax.legend(fontsize=8)
    ax = axes[0][1]
    ax.plot(ep, [r["loss"] for r in rows], marker=mark, label="total loss")
    ax.plot(ep, [r["ce"] for r in rows], marker=mark, label="cross-entropy")
    ax.set_title("training loss (epoch mean)", fontsize=10)
    ax.legend(fontsize=8)
    ax = axes[0][2]
    stage2 = [r for r in rows if r.get("stage") == 2]
    drawn = False
    for key, label in (("br_w", "BR_w (weights)"), ("br_a", "BR_a (activations)")):
        pts = [(r["epoch"], r[key]) for r in stage2 if r.get(key)]
        if pts:
            e, v = zip(*pts)
            ax.plot(e, v, marker="o" if len(pts) < 12 else None, label=label)
            drawn = True
    ax.set_title("BR terms (un-weighted, epoch mean)", fontsize=10)
    if drawn:
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no BR epoch", transform=ax.transAxes, ha="center", va="center", color="grey")
    alpha = lambda kind: (lambda r, n: (r.get("alpha") or {}).get(n, {}).get(kind))  # noqa: E731
    _per_layer(axes[1][0], rows, layers, first_last, alpha("weight"), "weight step size α per layer", "α", log_y=True)
    _per_layer(axes[1][1], rows, layers, first_last, alpha("act"), "activation step size α per layer", "α",
               log_y=True)
    ax = axes[1][2]
    ax.plot(ep, [r["lr"] for r in rows], marker=mark, color="grey")
    ax.set_title("learning rate", fontsize=10)
    _finish_axes([a for row in axes for a in row], rows, shade=bool(layers))
    fig.suptitle(title + "   (shaded: stage 2; dashed α lines: first/last layer)", fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    with writing(out_path):
        fig.savefig(out_path, dpi=100)
    plt.close(fig)


def plot_bin_metrics(rows: list[dict], layers: list[str], first_last: set, out_path: str, title: str) -> None:
    """Per-layer bin metrics of ``metrics.jsonl`` (distance to level, bin flips) and mean occupancy (one PNG)."""
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.6))
    bins = lambda key: (lambda r, n: (r.get("bins") or {}).get(n, {}).get(key))  # noqa: E731
    _per_layer(axes[0], rows, layers, first_last, bins("dist_alpha"),
               "mean distance to level |w − kα| / α (0: on it, 0.5: on an edge)", "α units")
    # The fine grid of the 8-bit first/last layers flips far more often; it would flatten the others.
    inner = [n for n in layers if n not in first_last] or layers
    _per_layer(axes[1], rows, inner, set(), bins("flips"), "bin flips since the previous epoch (low-bit layers)",
               "fraction of weights")
    ax = axes[2]
    occ = []
    for r in rows:
        vecs = [(r.get("bins") or {}).get(n, {}).get("occupancy") for n in inner]
        vecs = [v for v in vecs if v]
        occ.append(np.mean(np.array(vecs), axis=0) if vecs and len({len(v) for v in vecs}) == 1 else None)
    ep = [r["epoch"] for r, o in zip(rows, occ) if o is not None]
    occ = [o for o in occ if o is not None]
    if occ:
        data = np.array(occ).T * 100
        k = data.shape[0]
        signed_min = -(k // 2)  # weights are signed: levels -2^(b-1) .. 2^(b-1)-1
        colors = plt.get_cmap("coolwarm")(np.linspace(0, 1, k))
        ax.stackplot(ep, data, colors=colors, labels=[f"k = {signed_min + i}" for i in range(k)])
        ax.set_ylim(0, 100)
        if k <= 16:
            handles, labels = ax.get_legend_handles_labels()
            ax.legend(handles[::-1], labels[::-1], fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5),
                      title="level", title_fontsize=7)
    else:
        ax.text(0.5, 0.5, "nothing logged", transform=ax.transAxes, ha="center", va="center", color="grey")
    ax.set_title("weight bin occupancy, mean over low-bit layers", fontsize=10)
    ax.set_ylabel("% of weights", fontsize=9)
    _finish_axes(axes, rows, shade=bool(layers))
    if len(ep) > 1:
        axes[2].set_xlim(min(ep), max(ep))  # a stacked area has no width beyond its first and last epoch
    fig.suptitle(title + "   (shaded: stage 2; dashed: first/last layer)", fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    with writing(out_path):
        fig.savefig(out_path, dpi=100)
    plt.close(fig)


# -- command ------------------------------------------------------------------------------------
def run_title(config: dict, run_dir: str) -> str:
    """A one-line description of the run for figure titles."""
    f, d = config["flags"], config["derived"]
    if d.get("float_run"):
        return f"{os.path.basename(os.path.normpath(run_dir))}: {f['arch']} float"
    abp = ", A-BR→α" if f.get("br_backprop_to_alpha_act") else ""
    return (f"{os.path.basename(os.path.normpath(run_dir))}: {f['arch']} W{d['weight_bits']}A{d['act_bits']}, "
            f"λ_w={f['lambda_br']:g}, λ_a={f['lambda_br_act']:g}{abp}, seed {f['seed']}")


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def make_plots(run_dir: str, out_dir: str | None = None, layers: list[str] | None = None,
               data_dir: str | None = None, n_images: int = 256, activations: bool = True,
               warn=lambda msg: print(f"warning: {msg}", file=sys.stderr)) -> list[str]:
    """Write every plot of ``run_dir``; return the paths of the PNGs written.

    Args:
        run_dir: a run folder of cifar10_qat_br.py (config.json, metrics.jsonl, last.pt).
        out_dir: where the PNGs go [``run_dir/plots``].
        layers: layer names, ``["all"]``, or None for three low-bit layers.
        data_dir: CIFAR-10 for the activation histograms [the run's --data-dir]; given
            explicitly, data that cannot be read is an error, otherwise a warning.
        n_images: test images for the activation histograms.
        activations: False leaves the activation rows out.
        warn: called with one line for each thing left out.

    Raises:
        PlotError: missing run folder or files, unknown layer, unusable ``data_dir``.
    """
    config = load_config(run_dir)
    rows = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    if not rows:
        raise PlotError(f"{run_dir}: no finished epoch (metrics.jsonl missing or empty)")
    if n_images < 1:
        raise PlotError(f"--images must be >= 1, got {n_images}")
    title = run_title(config, run_dir)
    warmup = int(config["flags"].get("warmup_epochs", 0))
    layer_modules = quantized_layers(build_run_model(config))
    names = list(layer_modules)
    first_last = {n for n, m in layer_modules.items() if m.is_first_or_last}
    # Check everything before writing anything.
    if not names and layers:
        raise PlotError("--layers: this is a float run, it has no quantized layers")
    chosen = choose_layers(layer_modules, layers) if names else []
    checkpoints, models = [], []
    warm_path = os.path.join(run_dir, "warmup_end.pt")
    if chosen:
        last_path = os.path.join(run_dir, "last.pt")
        if not os.path.isfile(last_path):
            raise PlotError(f"{run_dir}: no last.pt (no finished epoch to plot)")
        if os.path.isfile(warm_path):
            checkpoints.append(warm_path)
        elif warmup > 0:
            warn(f"{run_dir} has no warmup_end.pt (warmup not finished yet?): only last.pt is plotted")
        checkpoints.append(last_path)
        models = [load_model(config, p) for p in checkpoints]
    images = None
    if chosen and activations:
        try:
            images = load_images(data_dir or config["flags"].get("data_dir"), n_images)
        except DataError as exc:
            if data_dir is not None:
                raise PlotError(str(exc)) from None
            warn(f"activation histograms left out: {exc} (pass --data-dir)")

    out_dir = out_dir or os.path.join(run_dir, "plots")
    with writing(out_dir):
        os.makedirs(out_dir, exist_ok=True)
    written = []
    path = os.path.join(out_dir, "curves.png")
    plot_curves(rows, names, first_last, path, title)
    written.append(path)
    if not names:
        warn("a float run has no quantized layers: no bin metrics (bins.png) and no histograms")
        return written
    path = os.path.join(out_dir, "bins.png")
    plot_bin_metrics(rows, names, first_last, path, title)
    written.append(path)
    br_on = config["flags"].get("lambda_br", 0) > 0 or config["flags"].get("lambda_br_act", 0) > 0

    def label(path: str, epoch: int) -> str:
        if path == warm_path:
            return f"epoch {epoch}: end of warmup" + (" (before BR)" if br_on else "")
        if epoch <= warmup:
            return f"epoch {epoch}: last (still in warmup)"
        n = epoch - warmup
        return f"epoch {epoch}: last" + (f" (after {n} BR epoch{'s' if n > 1 else ''})" if br_on else " (no BR)")

    captures = [None] * len(models)
    if images is not None:
        captures = [capture_activations(m, chosen, images) for m, _ in models]

    for name in chosen:
        rows_of_panels = []
        w_panels, a_panels = [], []
        for (model, epoch), path_, cap in zip(models, checkpoints, captures):
            layer = quantized_layers(model)[name]
            wq, aq = layer.weight_quant, layer.act_quant
            weights, weight_step, unit = layer.weight.detach().float(), None, ""
            if wq.enabled and wq.channels is not None:  # one grid per channel: every weight in its channel's steps
                steps = per_channel_view(wq.alpha.detach().float(), weights)
                weights, weight_step, unit = weights / steps, 1.0, " (in α of its channel)"
            elif wq.enabled:
                weight_step = float(wq.alpha.detach())
            w_panels.append(Panel(f"weights{unit}, {label(path_, epoch)}", weights.flatten().numpy(),
                                  weight_step, wq.quant_min, wq.quant_max))
            if cap is not None:
                a_panels.append(Panel(f"activations, {label(path_, epoch)}", cap[name],
                                      float(aq.alpha.detach()) if aq.enabled else None, aq.quant_min, aq.quant_max))
        rows_of_panels.append(("weights", w_panels, False))
        if a_panels:
            # Unsigned (post-ReLU) inputs have a spike at 0: a log count axis keeps the rest visible.
            rows_of_panels.append(("pre-quant. activations", a_panels, not layer_modules[name].act_quant.signed))
        m = layer_modules[name]
        bits = f"W{m.weight_quant.num_bits}A{m.act_quant.num_bits}"
        path = os.path.join(out_dir, f"hist_{_safe(name)}.png")
        plot_layer_histograms(rows_of_panels, path, f"{name} ({bits}): {title}")
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="plots.py", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("run_dir", help="a run folder (config.json, metrics.jsonl, last.pt, warmup_end.pt)")
    parser.add_argument("--layers", nargs="+", default=None, metavar="NAME",
                        help="quantized layers to plot (module names, e.g. layers.0.0.conv1), or 'all' "
                             "[three low-bit layers: first, middle, last]")
    parser.add_argument("--out", default=None, help="folder for the PNGs [RUN_DIR/plots]")
    parser.add_argument("--data-dir", default=None,
                        help="CIFAR-10 for the activation histograms [the run's --data-dir]")
    parser.add_argument("--images", type=int, default=256, help="test images for the activation histograms [256]")
    parser.add_argument("--no-activations", action="store_true", help="plot weight histograms only")
    args = parser.parse_args(argv)
    try:
        paths = make_plots(args.run_dir, args.out, args.layers, args.data_dir, args.images, not args.no_activations)
    except WriteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_WRITE_FAILED
    except (PlotError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
