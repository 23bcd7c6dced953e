"""The two-stage training engine: LSQ warmup, then LSQ + Bin Regularization.

Stage 1 (epochs 1..W) minimises cross-entropy with LSQ fake quantization; stage 2
(W+1..E) adds ``λ_w·BR_w + λ_a·BR_a``. Every epoch ends with an evaluation, a line of
``metrics.jsonl`` and an atomic ``last.pt``, so a run never loses a finished epoch and
resumes bit-exactly on the CPU.
"""

from __future__ import annotations

import functools
import math
import os
import signal
import sys
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from run.checkpoint import append_jsonl, atomic_torch_save
from run.config import act_bits, br_terms_act, compile_mode, freeze_thresholds, frozen_kinds, learning_rate, weight_bits
from run.distributed import is_main
from hooks import ActivationHookManager, BinStatsCollector
from run.evaluation import recalibrate_batchnorm, top1_accuracy
from run.progress import EpochProgress, typical_epoch_seconds
from run.seeding import rng_state, set_rng_state
from quant import (FULL_PRECISION_BITS, activation_quantizers, keep_step_sizes_positive, quantized_layers,
                   step_size_quantizers)
from regularizers import INFO_FIELDS, BinRegularizer, weight_bin_stats
from regularizers.oscillation import OscillationTracker, cosine_ramp

#: How often (in steps) a CUDA run reads its non-finite flag; on the CPU reading is free, so every step.
CUDA_CHECK_EVERY = 50

#: A λ-weighted BR term this many times the cross-entropy in the first BR epoch gets a console warning.
BR_DOMINANCE_RATIO = 100.0


class NonFiniteError(RuntimeError):
    """The loss, a gradient or a parameter became NaN/inf; the message names the step and the layer."""


class Interrupted(BaseException):
    """SIGINT/SIGTERM arrived (``signum``); finished epochs are in last.pt. A ``BaseException``, like
    ``KeyboardInterrupt``, so that it passes every ``except Exception`` on its way out."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """The optimiser's parameter groups: network parameters (``weight_decay``), then, if the
    model has any, the step sizes α (``"step_sizes"``, no weight decay), for every optimiser.

    Weight decay on α would pull every step size towards zero, shrinking the grid
    independently of the task loss.
    """
    alphas = [q.alpha for q in step_size_quantizers(model).values()]  # in the order of named_parameters
    alpha_ids = {id(p) for p in alphas}
    others = [p for p in model.parameters() if id(p) not in alpha_ids]
    groups = [{"params": others, "weight_decay": weight_decay, "name": "weights"}]
    if alphas:
        groups.append({"params": alphas, "weight_decay": 0.0, "name": "step_sizes"})
    return groups


def build_optimizer(model: nn.Module, cfg) -> torch.optim.Optimizer:
    """``--optimizer``: SGD (``--momentum``) or Adam (betas (0.9, 0.999); ``--weight-decay`` is
    torch.optim.Adam's L2 term added to the gradient), at ``config.learning_rate(cfg)``, over
    ``parameter_groups``. α is kept positive after every step."""
    groups = parameter_groups(model, cfg.weight_decay)
    if cfg.optimizer == "adam":
        optimizer = torch.optim.Adam(groups, lr=learning_rate(cfg))
    else:
        optimizer = torch.optim.SGD(groups, lr=learning_rate(cfg), momentum=cfg.momentum)
    keep_step_sizes_positive(optimizer, model)
    return optimizer


def lr_factor(schedule: str, epochs: int, warmup_epochs: int, finished: int) -> float:
    """The learning rate of epoch ``finished + 1`` as a multiple of ``--lr``: ``cosine``
    ``(1 + cos(π·finished/E)) / 2``; ``warmup-constant`` (the seed authors' script) 1 through
    epochs 1..W, then ``(1 + cos(π·(finished - W)/(E - W))) / 2``."""
    if schedule == "warmup-constant":
        if finished < warmup_epochs:
            return 1.0
        finished, epochs = finished - warmup_epochs, epochs - warmup_epochs
    return (1 + math.cos(math.pi * finished / max(epochs, 1))) / 2


def build_scheduler(optimizer: torch.optim.Optimizer, cfg):
    """The per-epoch scheduler of ``--lr-schedule``: torch's ``CosineAnnealingLR`` for ``cosine`` (and
    ``warmup-constant`` without a warmup: the same schedule), else a ``LambdaLR`` of ``lr_factor``."""
    if cfg.lr_schedule == "warmup-constant" and cfg.warmup_epochs > 0:  # without a warmup: the cosine
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, functools.partial(lr_factor, "warmup-constant", cfg.epochs, cfg.warmup_epochs))
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)


def _clone_tensors(tree):
    """A copy of every tensor in a nest of dicts (None stays None)."""
    if isinstance(tree, dict):
        return {k: _clone_tensors(v) for k, v in tree.items()}
    return tree.clone() if isinstance(tree, torch.Tensor) else tree


def build_recipe(cfg, model: nn.Module) -> SimpleNamespace:
    """What trains ``model``: the optimizer, LR schedule, regularizers (BR, oscillation tracking) and compile.

    BR regularises the low-bit layers (never the first conv and the last linear, at --first-last-bits);
    A-BR the low-bit layers' inputs (--act-quant-at conv-input) or every activation's output (relu-output).
    W-BR's gradient always reaches the weight α (unless frozen); A-BR's only with --br-backprop-to-alpha-act.
    Each activation quantizer computes its bin statistics on its own grid (unsigned after a ReLU, signed
    before MobileNetV2's linear bottlenecks): both grids of one width have the same number of bins.
    """
    layers = quantized_layers(model)
    br_layers = {n: m for n, m in layers.items() if not m.is_first_or_last}
    br_act_quantizers = {n: q for n, q in activation_quantizers(model).items()
                         if not (n in layers and layers[n].is_first_or_last)}
    r = SimpleNamespace(layers=layers, br_layers=br_layers, br_act_quantizers=br_act_quantizers, w_reg=None,
                        a_reg=None, hooks=None, weight_stats=None, tracker=None, freeze=None)
    w_br, a_br = br_terms_act(cfg)
    if w_br and br_layers:
        r.w_reg = BinRegularizer(weight_bits(cfg), signed=True)
        r.weight_stats = BinStatsCollector({n: m.weight_quant for n, m in br_layers.items()}, grad_to_alpha=True)
    if a_br and br_act_quantizers:
        r.a_reg = BinRegularizer(act_bits(cfg), signed=False)
        r.hooks = ActivationHookManager(model, br_act_quantizers, bin_stats_grad_to_alpha=cfg.br_backprop_to_alpha_act)
    # oscillations of the low-bit weights, tracked in every run that has them; dampening and freezing in stage 2
    if weight_bits(cfg) < FULL_PRECISION_BITS and br_layers:
        r.freeze = freeze_thresholds(cfg)
        r.tracker = OscillationTracker(br_layers, cfg.oscillation_momentum, r.freeze is not None)
    r.optimizer = build_optimizer(model, cfg)
    r.scheduler = build_scheduler(r.optimizer, cfg)
    # --compile: the whole training forward pass (network, LSQ, BR's statistics and losses) in one graph, and
    # evaluation; dynamic=False: a static graph per batch shape (the ragged last batch is dropped), as CUDA graphs need
    r.compile_mode = compile_mode(cfg)
    r.compile = (functools.partial(torch.compile, mode=r.compile_mode, dynamic=False)
                 if r.compile_mode != "off" else None)
    return r


class Trainer:
    """Runs the two-stage schedule on one device.

    ``cfg``: the resolved flags; ``model``: the quantized network on ``device``; ``recipe``: ``build_recipe``'s
    (built here if None); loaders: ``data.DeviceLoader``s (``val_loader``: --val-split's held-out images, which
    select ``best.pt``; without it the test set does: optimistic). ``val_index``: those images' indices, saved in
    every checkpoint. ``output_dir`` None keeps nothing (benchmarks, torchrun ranks but 0). ``group``: a
    ``distributed.Group`` under torchrun (the forward pass runs through DDP; see run/distributed.py).
    """

    def __init__(self, cfg, model, train_loader, test_loader, device, output_dir=None, log=print, tb=None,
                 val_loader=None, val_index=None, group=None, recipe=None):
        self.cfg, self.model, self.device, self.output_dir, self.log, self.tb = cfg, model, device, output_dir, log, tb
        self.group = group
        self.network, self._trainable = model, None  # the module the training forward pass calls (DDP under torchrun)
        self.train_loader, self.test_loader, self.val_loader = train_loader, test_loader, val_loader
        self.val_index = val_index
        recipe = recipe if recipe is not None else build_recipe(cfg, model)
        self.layers, self.br_layers, self.br_act_quantizers = recipe.layers, recipe.br_layers, recipe.br_act_quantizers
        self.w_reg, self.a_reg = recipe.w_reg, recipe.a_reg
        self.weight_stats, self.hooks = recipe.weight_stats, recipe.hooks
        self.tracker, self.freeze, self.optimizer, self.scheduler = (recipe.tracker, recipe.freeze, recipe.optimizer,
                                                                     recipe.scheduler)
        self.dampen = cfg.lambda_dampen > 0 and self.tracker is not None
        self._progress, self.bn_reestimated = 0.0, None  # _progress: the stage-2 steps done / all of them
        self.use_amp = cfg.amp and device.type == "cuda"
        self.compile_mode = recipe.compile_mode  # state (checkpoints, α, hooks) lives on ``model`` either way
        self._compiled_losses = recipe.compile(self.forward_losses) if recipe.compile else None
        self._evaluate_forward = recipe.compile(model) if recipe.compile else model
        self._cuda_graphs = device.type == "cuda" and self.compile_mode == "reduce-overhead"
        self._quantizers = list(step_size_quantizers(model).values())
        # best_acc: the selection metric (validation top-1 with a val split, else test top-1) of
        # best_epoch; best_test_acc: the test top-1 of that epoch.
        self.start_epoch, self.best_acc, self.best_epoch, self.elapsed = 1, -1.0, 0, 0.0
        # The seconds of each epoch this process ran: the ETA is paced by these only (a resumed or
        # branched run's earlier epochs may have run on another machine, or beside other work).
        self.epoch_durations: list[float] = []
        self.best_test_acc = self.last_acc = None
        self.previous_bins: dict[str, torch.Tensor] = {}
        self._stop_signal = None
        self.check_folder = lambda: None  # before each write into output_dir: RunFolderLock.check

    # -- state -------------------------------------------------------------------------------
    def stage(self, epoch: int) -> int:
        """1 during warmup (epochs 1..W), 2 after."""
        return 1 if epoch <= self.cfg.warmup_epochs else 2

    def stage_label(self, epoch: int) -> str:
        """What the epoch trains: ``float``, ``warmup`` (LSQ only), ``BR``, or ``LSQ`` (stage 2 with both λ = 0)."""
        if not self.layers:
            return "float"
        if self.stage(epoch) == 1:
            return "warmup"
        return "BR" if (self.w_reg or self.a_reg) else "LSQ"

    def state_dict(self, epoch: int, config: dict) -> dict:
        """Everything a continuation needs, after ``epoch`` finished."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "epoch": epoch, "stage": self.stage(epoch),
                "best_acc": self.best_acc, "best_epoch": self.best_epoch, "best_test_acc": self.best_test_acc,
                "last_acc": self.last_acc, "elapsed": self.elapsed, "val_index": self.val_index,
                "previous_bins": {k: v.cpu() for k, v in self.previous_bins.items()},
                "oscillation": self.tracker.state_dict() if self.tracker is not None else None,
                "rng": rng_state(), "config": config}

    def load_state_dict(self, ckpt: dict) -> None:
        """Continue from a checkpoint written by ``state_dict`` (model state loaded already or here)."""
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.start_epoch = ckpt["epoch"] + 1
        self.best_acc, self.best_epoch, self.elapsed = ckpt["best_acc"], ckpt["best_epoch"], ckpt["elapsed"]
        self.best_test_acc = ckpt.get("best_test_acc", ckpt["best_acc"])  # before --val-split: selected on test
        self.last_acc = ckpt["last_acc"]
        self.previous_bins = dict(ckpt["previous_bins"])
        if self.tracker is not None:  # None in checkpoints from before tracking: it starts afresh
            self.tracker.load_state_dict(ckpt.get("oscillation"))
        set_rng_state(ckpt["rng"])

    def set_alpha_trainable(self, epoch: int) -> None:
        """Freeze the step sizes named by the freeze flags from the first epoch after warmup.

        A frozen α stays bit-identical (``LSQQuantizer.set_step_size_trainable``).
        """
        freeze_w, freeze_a = frozen_kinds(self.cfg)
        stage2 = self.stage(epoch) == 2
        activations = {id(q) for q in activation_quantizers(self.model).values()}
        for quantizer in step_size_quantizers(self.model).values():  # weights', layers' inputs', QuantActs'
            frozen = freeze_a if id(quantizer) in activations else freeze_w
            quantizer.set_step_size_trainable(not (frozen and stage2))
        if self.group is not None:
            trainable = tuple(p.requires_grad for p in self.model.parameters())
            if trainable != self._trainable:  # DDP reduces the parameters that required a gradient when built
                self.network, self._trainable = self.group.wrap(self.model, self.device), trainable

    # -- one step ------------------------------------------------------------------------------
    def forward_losses(self, x: torch.Tensor, y: torch.Tensor, use_br: bool):
        """Forward pass and ``loss = CE + λ_w·BR_w + λ_a·BR_a``; the function ``--compile`` compiles.

        BR_w and BR_a come from the bin statistics that the weight and activation quantizers computed
        in this forward pass (hooks.py). Returns ``(loss, logits, ce, br_w, br_a, w_info, a_info)``.
        """
        zero = torch.zeros((), device=self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_amp):
            logits = self.network(x)
        ce = F.cross_entropy(logits.float(), y)
        br_w = br_a = zero
        w_info = a_info = None
        if use_br and self.w_reg is not None:
            stats = self.weight_stats.get()
            self.weight_stats.clear()
            br_w, w_info = self.w_reg.total_from_stats(stats)
        if use_br and self.a_reg is not None:
            stats = self.hooks.get_bin_stats()
            self.hooks.clear()
            br_a, a_info = self.a_reg.total_from_stats(stats)
        loss = ce + self.cfg.lambda_br * br_w + self.cfg.lambda_br_act * br_a
        return loss, logits, ce, br_w, br_a, w_info, a_info

    def train_step(self, x: torch.Tensor, y: torch.Tensor, use_br: bool, finite_check_at: tuple | None = None) -> dict:
        """One optimiser step. Returns device tensors (no host sync): loss parts, correct count, infos.

        With ``finite_check_at=(epoch, step)`` a non-finite loss raises ``NonFiniteError`` before the
        update, while the parameters are still those that caused it.
        """
        if self.tracker is not None and not self.tracker.started:  # a step outside train_epoch
            self.tracker.start()
        for collector in (self.hooks, self.weight_stats):  # the quantizers compute bin statistics for BR
            if collector is not None:
                collector.enabled = use_br
        forward_losses = self.forward_losses  # compiled once every α is initialised (eagerly, from a first batch)
        if self._compiled_losses is not None and all(q._is_initialized for q in self._quantizers):
            forward_losses = self._compiled_losses
            if self._cuda_graphs:  # a new training step: the previous step's graph outputs may be reused
                torch.compiler.cudagraph_mark_step_begin()
        loss, logits, ce, br_w, br_a, w_info, a_info = forward_losses(x, y, use_br)
        dampen = torch.zeros((), device=self.device)
        if use_br and self.dampen:  # λ_d rises by a cosine from 0 over stage 2 (Nagel et al. 2022)
            dampen = self.tracker.dampening(self.cfg.dampen_aggregation)
            loss = loss + self.cfg.lambda_dampen * cosine_ramp(self._progress, 0.0, 1.0) * dampen
        out = {"loss": loss.detach(), "ce": ce.detach(), "br_w": br_w.detach(), "br_a": br_a.detach(),
               "dampen": dampen.detach(), "correct": (logits.argmax(1) == y).sum(), "w_info": w_info,
               "a_info": a_info}
        if finite_check_at is not None:
            if self.group is not None:
                self._agree_on_step(out, *finite_check_at)
            else:
                self._check_finite(out, *finite_check_at)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if self.tracker is not None:  # frozen weights back to their level, oscillations counted, freezing
            self.tracker.step(cosine_ramp(self._progress, *self.freeze) if use_br and self.freeze else None)
        return out

    # -- epochs ------------------------------------------------------------------------------
    def _first_non_finite_parameter(self) -> str | None:
        finite = torch.stack([torch.isfinite(p).all() for p in self.model.parameters()])
        if bool(finite.all()):
            return None
        names = [n for n, _ in self.model.named_parameters()]
        return names[int((~finite).nonzero()[0])]

    def _check_finite(self, step_out: dict, epoch: int, step: int) -> None:
        if bool(torch.isfinite(step_out["loss"])):
            return
        parts = ", ".join(f"{k}={float(step_out[k]):.4g}" for k in ("ce", "br_w", "br_a"))
        bad = self._first_non_finite_parameter()
        where = f"first non-finite parameter: {bad}" if bad else "all parameters still finite"
        raise NonFiniteError(f"non-finite loss at epoch {epoch} step {step} ({parts}); {where}")

    def _agree_on_step(self, step_out: dict, epoch: int, step: int) -> None:
        """Under torchrun, before the update: every rank raises ``NonFiniteError`` when any rank's
        loss is non-finite and ``Interrupted`` when any rank got a stop signal, so that all of them
        stop at the same step (a rank that stopped alone would leave the others waiting in DDP's
        gradient reduction). One all-reduce of ``world_size + 1`` numbers."""
        bad, signum = self.group.agree_on_step(~torch.isfinite(step_out["loss"]), self._stop_signal)
        if bad:
            if self.group.rank in bad:
                self._check_finite(step_out, epoch, step)
            raise NonFiniteError(f"non-finite loss at epoch {epoch} step {step} on rank(s) "
                                 f"{', '.join(map(str, bad))} of {self.group.world_size}")
        if signum:
            raise Interrupted(signum)

    def train_epoch(self, epoch: int) -> dict:
        """Train one epoch; returns the epoch's means (floats) and the last step's BR infos."""
        self.model.train()
        self.set_alpha_trainable(epoch)
        use_br = self.stage(epoch) == 2
        if self.tracker is not None:
            if not self.tracker.started or epoch in (1, self.cfg.warmup_epochs + 1):  # each stage starts afresh
                self.tracker.start()
            self.tracker.new_epoch()
        stage2_steps = (self.cfg.epochs - self.cfg.warmup_epochs) * len(self.train_loader)
        stage2_done = (epoch - self.cfg.warmup_epochs - 1) * len(self.train_loader)
        sums = torch.zeros(5, device=self.device)  # loss, ce, br_w, br_a, dampen, summed over steps
        correct = torch.zeros((), dtype=torch.long, device=self.device)
        seen = steps = 0
        check_every = 1 if self.device.type == "cpu" else CUDA_CHECK_EVERY
        out = {}
        bar = tqdm(self.train_loader.batches(epoch), total=len(self.train_loader), leave=False,
                   desc=f"epoch {epoch}", disable=None if is_main(self.group) else True)
        # Plain progress lines when the console is a file (a SLURM log): tqdm is silent there.
        progress = EpochProgress(epoch, self.cfg.epochs, len(self.train_loader),
                                 typical_epoch_seconds(self.epoch_durations),
                                 0 if sys.stdout.isatty() else self.cfg.progress_interval, self.log, bar)
        for x, y in bar:
            steps += 1
            self._progress = (stage2_done + steps - 1) / stage2_steps if use_br else 0.0
            out = self.train_step(x, y, use_br, (epoch, steps) if steps % check_every == 0 else None)
            sums += torch.stack([out["loss"], out["ce"], out["br_w"], out["br_a"], out["dampen"]])
            correct += out["correct"]
            seen += y.shape[0]
            progress.step(y.shape[0] * (self.group.world_size if self.group is not None else 1))
            if self._stop_signal is not None and self.group is None:  # under torchrun: at the next agreement
                raise Interrupted(self._stop_signal)
        # The last step's BR infos outlive the step: copy them out of the CUDA graph's buffers.
        w_info, a_info = (_clone_tensors(out.get(k)) for k in ("w_info", "a_info"))
        terms = steps  # the means are over steps, and over ranks under torchrun (each rank has as many steps)
        if self.group is not None:
            totals = self.group.sum(torch.tensor([*sums.tolist(), int(correct), seen], dtype=torch.float64,
                                                 device=self.device))
            sums, correct, seen, terms = totals[:5], int(totals[5]), int(totals[6]), steps * self.group.world_size
        if not bool(torch.isfinite(sums).all()):  # a NaN between two checks (CUDA)
            self._check_finite({"loss": sums[0], "ce": sums[1], "br_w": sums[2], "br_a": sums[3]}, epoch, steps)
        means = (sums / max(terms, 1)).tolist()
        return {"loss": means[0], "ce": means[1], "br_w": means[2], "br_a": means[3], "dampen": means[4],
                "train_acc": 100.0 * int(correct) / max(seen, 1), "images": seen,
                "w_info": w_info, "a_info": a_info}

    def evaluate(self, loader=None) -> float:
        """Top-1 accuracy (%) on ``loader`` (default: the test loader); under torchrun on every
        rank's shard, with rank 0's BatchNorm statistics, summed."""
        self.model.eval()
        loader = self.test_loader if loader is None else loader
        if self.group is None:
            return top1_accuracy(self._forward_unless_stopped, loader, self.device, self.use_amp)
        self.group.broadcast_buffers(self.model)
        return top1_accuracy(self._evaluate_forward, loader, self.device, self.use_amp, self.group.sum)

    def _forward_unless_stopped(self, x: torch.Tensor) -> torch.Tensor:
        """The evaluation forward, which raises ``Interrupted`` once a stop signal has come: an evaluation on
        the CPU takes a minute or more, and SLURM kills a job 30 s after its SIGTERM. The epoch is not saved
        (it has no test top-1), as with a stop during training. Under torchrun the ranks stop together at
        the next training step instead (a rank that stopped alone would hang the others' reduction)."""
        if self._stop_signal is not None:
            raise Interrupted(self._stop_signal)
        return self._evaluate_forward(x)

    def layer_summaries(self) -> tuple[dict, dict]:
        """Per quantized layer (and ``QuantAct``, as ``{"act": α}``): α values (per-channel: mean, min and max),
        and weight bin statistics (updates ``previous_bins``)."""
        alphas, bins = {}, {}
        for name, quantizer in activation_quantizers(self.model).items():
            if name not in self.layers:  # a QuantAct's
                alphas[name] = {"act": float(quantizer.alpha.detach())}
        for name, layer in self.layers.items():
            alphas[name] = {kind: float(q.alpha.detach().mean()) for kind, q in (("weight", layer.weight_quant),
                                                                                  ("act", layer.act_quant))
                            if q.alpha is not None}
            q = layer.weight_quant
            if q.alpha is not None and q.channels is not None:
                alphas[name].update(weight_min=float(q.alpha.detach().min()), weight_max=float(q.alpha.detach().max()))
            if q.alpha is not None:
                bins[name], self.previous_bins[name] = weight_bin_stats(
                    layer.weight, q.alpha, q.quant_min, q.quant_max, self.previous_bins.get(name))
        return alphas, bins

    @staticmethod
    def _info_dict(info) -> dict | None:
        if info is None:
            return None
        rows = {"total": info["total"], **info["per_tensor"]}
        return {k: dict(zip(INFO_FIELDS, v.tolist())) for k, v in rows.items()}

    def _warn_if_br_dominates(self, epoch: int, train: dict) -> None:
        """Warn when a λ-weighted BR term exceeds ``BR_DOMINANCE_RATIO`` times the cross-entropy
        (epoch means): BR then outweighs the task, and a λ that large can drive the step sizes to
        their floor. Called after the first BR epoch, so that a mistyped λ shows early."""
        ce = train["ce"]
        for flag, lam, term in (("--lambda-br", self.cfg.lambda_br, train["br_w"]),
                                ("--lambda-br-act", self.cfg.lambda_br_act, train["br_a"])):
            weighted = lam * term
            if weighted > BR_DOMINANCE_RATIO * ce:
                times = f"{weighted / ce:.3g} times" if ce > 0 else "far above"
                self.log(f"WARNING: epoch {epoch} (the first with BR): {flag} {lam:g} x BR = {weighted:.4g} is "
                         f"{times} the cross-entropy ({ce:.4g}); BR outweighs the task and can drive the step "
                         f"sizes to their floor. Is {flag} {lam:g} meant?")

    def _handle_signal(self, signum, _frame) -> None:
        self._stop_signal = signum

    def fit(self, config: dict) -> dict:
        """Train from ``start_epoch`` to ``cfg.epochs``; returns the summary dict.

        Raises:
            NonFiniteError, Interrupted: the run stopped; finished epochs are in last.pt.
            FolderLost (from ``check_folder``): the run folder is not this run's any more.
        """
        cfg = self.cfg
        previous = {s: signal.signal(s, self._handle_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            for epoch in range(self.start_epoch, cfg.epochs + 1):
                self.run_epoch(epoch, config)
            if cfg.bn_reestimate:
                self.bn_reestimated = self.reestimate_batchnorm(cfg.bn_reestimate, config)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        return self.summary()

    def summary(self) -> dict:
        """The content of summary.json: first the result, the final epoch's test top-1; then the
        epoch that best.pt holds, named by what selected it (``best_keys``); with ``--bn-reestimate``,
        ``bn_reestimate`` (``reestimate_batchnorm``)."""
        out = {"status": "finished", "final_test_acc": self.last_acc, "val_split": self.cfg.val_split,
               **self.best_keys(), "epochs": self.cfg.epochs, "wall_time_s": self.elapsed}
        if self.bn_reestimated is not None:
            out["bn_reestimate"] = self.bn_reestimated
        return out

    def reestimate_batchnorm(self, batches: int, config: dict) -> dict:
        """``--bn-reestimate`` (Nagel et al., ICML 2022): BatchNorm statistics re-estimated on the first
        ``batches`` training batches of epoch E + 1's draw, with the network as trained; writes
        ``bn_reestimated.pt``. Returns ``{"batches", "test_acc_before", "test_acc_after"}`` (test top-1, %)."""
        for collector in (self.hooks, self.weight_stats):  # no BR statistics from these passes
            if collector is not None:
                collector.enabled = False
        xs = self.train_loader.first_images(batches, self.cfg.epochs + 1)
        before = self.last_acc if self.last_acc is not None else self.evaluate()
        recalibrate_batchnorm(self.model, xs)
        after = self.evaluate()
        self.log(f"BatchNorm re-estimated on {len(xs)} training batches (--bn-reestimate): test top-1 "
                 f"{before:.2f}% -> {after:.2f}%")
        if self.output_dir is not None:
            self.check_folder()
            # last_acc: the test top-1 of the network it holds (--evaluate compares with it)
            atomic_torch_save(dict(self.state_dict(self.cfg.epochs, config), last_acc=after,
                                   bn_reestimated_batches=len(xs)),
                              os.path.join(self.output_dir, "bn_reestimated.pt"))
        return {"batches": len(xs), "test_acc_before": before, "test_acc_after": after}

    def best_keys(self) -> dict:
        """The best epoch so far, in summary.json's words: chosen on the validation split if there is one,
        else on the test set (``..._optimistic``: higher than a fresh test would give, never a result)."""
        if self.val_loader is not None:
            return {"best_val_epoch": self.best_epoch, "best_val_acc": self.best_acc,
                    "test_acc_at_best_val": self.best_test_acc}
        return {"best_test_epoch_optimistic": self.best_epoch, "best_test_acc_optimistic": self.best_acc}

    def run_epoch(self, epoch: int, config: dict) -> dict:
        """Train, evaluate, log and checkpoint one epoch; returns its metrics row."""
        start = time.perf_counter()
        lr = self.optimizer.param_groups[0]["lr"]
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        train = self.train_epoch(epoch)
        train_seconds = time.perf_counter() - start
        # the training steps' peak, before the evaluation's batches (of another size) count
        train_peak = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None
        if epoch == self.cfg.warmup_epochs + 1:
            self._warn_if_br_dominates(epoch, train)
        bad = self._first_non_finite_parameter()
        if bad is not None:  # e.g. an inf gradient in the last step: never checkpoint it
            raise NonFiniteError(f"non-finite parameter {bad} at the end of epoch {epoch}")
        self.scheduler.step()
        test_acc = self.evaluate()
        val_acc = self.evaluate(self.val_loader) if self.val_loader is not None else None
        self.last_acc = test_acc
        selected = val_acc if val_acc is not None else test_acc  # the test set only without a validation set
        if selected > self.best_acc:
            self.best_acc, self.best_epoch, self.best_test_acc = selected, epoch, test_acc
        alphas, bins = self.layer_summaries()
        osc_freq = frozen = None
        if self.tracker is not None:  # next to the bin flips: oscillations per weight and step, fraction frozen
            for name, stats in self.tracker.frequencies().items():
                bins[name].update(stats)
            osc_freq, frozen = self.tracker.totals()
        seconds = time.perf_counter() - start
        self.elapsed += seconds
        self.epoch_durations.append(seconds)
        row = {"epoch": epoch, "epochs": self.cfg.epochs, "stage": self.stage(epoch), "lr": lr,
               "loss": train["loss"], "ce": train["ce"], "br_w": train["br_w"], "br_a": train["br_a"],
               "dampen": train["dampen"], "osc_freq": osc_freq, "frozen": frozen,
               "train_acc": train["train_acc"], "test_acc": test_acc, "val_acc": val_acc, **self.best_keys(),
               "best_epoch": self.best_epoch, "alpha": alphas, "bins": bins,
               "br_w_info": self._info_dict(train["w_info"]), "br_a_info": self._info_dict(train["a_info"])}
        # a float run has no BR at all (its banner says so): its loss is the cross-entropy alone
        parts = (f" (CE {row['ce']:.4f}, BR_w {row['br_w']:.4f}, BR_a {row['br_a']:.4f}"
                 + (f", damp {row['dampen']:.4g}" if self.dampen else "") + ")" if self.layers else " (CE)")
        self.log(f"Epoch {epoch}/{self.cfg.epochs} [{self.stage_label(epoch)}] lr {lr:.5f} | "
                 f"loss {row['loss']:.4f}{parts} | "
                 + (f"osc {osc_freq:.2e}" + (f" frozen {100 * frozen:.3g}%" if self.freeze else "") + " | "
                    if osc_freq is not None else "")
                 + f"train {row['train_acc']:.2f}% | {self._accuracy_text(test_acc, val_acc)} | "
                 f"{seconds:.1f}s (train {train['images'] / train_seconds:.0f} img/s)")
        if self.tb is not None:
            self.tb.log_epoch(row, self.model)
        if self.output_dir is not None:
            timing = {"epoch": epoch, "seconds": seconds, "train_seconds": train_seconds,
                      "train_images": train["images"]}
            if train_peak is not None:
                timing["peak_memory_mb"] = train_peak / 2**20
            self._save_epoch(row, timing, epoch, config, improved=self.best_epoch == epoch)
        return row

    def _accuracy_text(self, test_acc: float, val_acc: float | None) -> str:
        """The epoch line's accuracies; the best epoch so far named by what selected it."""
        if val_acc is None:
            return (f"test {test_acc:.2f}% (best test so far {self.best_acc:.2f}% @{self.best_epoch}: "
                    f"selected on test, optimistic)")
        return (f"val {val_acc:.2f}% test {test_acc:.2f}% (best val {self.best_acc:.2f}% @{self.best_epoch}, "
                f"test there {self.best_test_acc:.2f}%)")

    def _save_epoch(self, row: dict, timing: dict, epoch: int, config: dict, improved: bool) -> None:
        # Checkpoints first, holding this epoch's log rows: a kill before the logs are
        # appended loses nothing (run_folder.restore_logs writes missing rows back on --resume).
        self.check_folder()
        logs = {"metrics.jsonl": row, "timing.jsonl": timing}
        state = dict(self.state_dict(epoch, config), log_rows=logs)
        atomic_torch_save(state, os.path.join(self.output_dir, "last.pt"))
        if improved:
            atomic_torch_save(state, os.path.join(self.output_dir, "best.pt"))
        if epoch == self.cfg.warmup_epochs and self.layers:
            # The network as stage 1 left it, for before/after-BR plots of the bins.
            atomic_torch_save(state, os.path.join(self.output_dir, "warmup_end.pt"))
        for name, log_row in logs.items():
            append_jsonl(log_row, os.path.join(self.output_dir, name))
