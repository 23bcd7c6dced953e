"""TensorBoard logging of a training run (``cifar10_qat_br.py --tensorboard``).

Written with torch's own writer (``torch.utils.tensorboard.SummaryWriter``) to
``<output-dir>/tensorboard``; view with ``tensorboard --logdir <output-dir>/tensorboard``
(or a folder above several runs to compare them).

What is logged, once per epoch (step = epoch number):

* scalars ``loss/total``, ``loss/ce``, ``loss/br_w``, ``loss/br_a`` (epoch means of the
  un-weighted BR terms), ``acc/train``, ``acc/test`` (top-1, %); with ``--val-split``
  ``acc/val`` and ``acc/test_at_best_val`` (the test top-1 of the best validation epoch so
  far), without it ``acc/best_test_optimistic`` (the best test top-1 so far: selected on the
  test set, so optimistic); ``lr``
  (the epoch's learning rate), ``stage`` (1 warmup, 2 BR);
* every step size: ``alpha_weight/<layer>`` and ``alpha_act/<layer>`` (units of the
  weights / activations);
* the bin metrics of ``metrics.jsonl``: ``bins_dist_alpha/<layer>`` (mean distance of the
  weights to their level, in α units) and ``bins_flips/<layer>`` (fraction of weights
  whose bin changed since the previous epoch), ``bins_osc_freq/<layer>`` (oscillations per weight
  and training step, Nagel et al. 2022) and ``bins_frozen/<layer>`` (fraction frozen); ``loss/dampen``,
  ``oscillation/freq`` and ``oscillation/frozen`` (over every low-bit weight);
* histograms ``weights/<layer>`` (the float weights, before quantization) and
  ``activations/<name>`` (pre-quantization inputs of every activation quantizer: a layer's
  ``act_quant``, or with ``--act-quant-at relu-output`` an activation's own, ``quant.QuantAct``).

Activation histograms. The engine's ``ActivationHookManager`` drops its captures after
every step (and records only in stage 2 with A-BR), so nothing is left of it when an
epoch ends. The logger therefore registers its own forward pre-hook on each activation
quantizer (``quant.activation_quantizers``): in training mode only, it keeps a detached copy of the first
``ACT_SAMPLES`` samples of the latest input (a few small device copies per step, no
host synchronisation). The histogram of an epoch is thus the last training batch of
that epoch. The hooks are registered by ``attach(model)``, or at the first
``log_epoch`` call if ``attach`` was never called, in which case the first epoch has
weight histograms but no activation histograms.

A run resumed with ``--tensorboard`` that was not logged before gets the scalars of its
earlier epochs from ``metrics.jsonl`` (``log_scalars``); their histograms are lost.

The logger never changes training: it uses no random numbers, runs no forward pass,
does not touch BatchNorm statistics, and its hooks return nothing (the input is
passed on unchanged); reading values to the host happens only in ``log_epoch``.
"""

from __future__ import annotations

import torch
from torch import nn

from run.checkpoint import writing
from quant import activation_quantizers, quantized_layers

#: Samples of the latest training batch kept per layer for the activation histograms.
ACT_SAMPLES = 8


class TensorBoardLogger:
    """Per-epoch TensorBoard scalars and histograms of a QAT+BR run.

    Args:
        log_dir: folder for the event files (created if missing).

    Raises:
        checkpoint.WriteError: here and from every method that writes: ``log_dir`` or its
            event file cannot be written (disk full, ...), naming ``log_dir``.
    """

    def __init__(self, log_dir: str):
        from torch.utils.tensorboard import SummaryWriter
        self.log_dir = log_dir
        with writing(log_dir):
            self.writer = SummaryWriter(log_dir=log_dir)
        self._samples: dict[str, torch.Tensor] = {}
        self._handles: list = []
        self._attached_to = None

    # -- activation samples ---------------------------------------------------------------
    def attach(self, model: nn.Module) -> None:
        """Register the activation-sampling pre-hooks on every activation quantizer.

        Idempotent for the same model; attaching to another model detaches the old hooks.
        """
        if self._attached_to is model:
            return
        self.detach()
        for name, quantizer in activation_quantizers(model).items():  # layers' inputs, QuantActs (relu-output)
            self._handles.append(quantizer.register_forward_pre_hook(self._make_hook(name)))
        self._attached_to = model

    def _make_hook(self, name: str):
        def hook(module: nn.Module, inputs: tuple) -> None:
            if module.training:
                with torch.no_grad():
                    self._samples[name] = module.pre_quantization(inputs[0].detach()[:ACT_SAMPLES]).clone()
        return hook

    def detach(self) -> None:
        """Remove the hooks and drop the kept samples."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._samples.clear()
        self._attached_to = None

    # -- logging --------------------------------------------------------------------------
    def log_epoch(self, row: dict, model: nn.Module) -> None:
        """Write one epoch: the scalars of ``row`` and the histograms of ``model``.

        Args:
            row: the ``metrics.jsonl`` row of the epoch (``engine.Trainer.run_epoch``):
                ``epoch``, ``lr``, ``loss``, ``ce``, ``br_w``, ``br_a``, ``train_acc``,
                ``test_acc``, ``val_acc``, ``test_acc_at_best_val`` or ``best_test_acc_optimistic``
                (``best_test_acc`` in rows of older runs), ``stage``, ``alpha`` (layer -> {"weight",
                "act"} -> float) and ``bins`` (layer -> {"dist_alpha", "flips", ...});
                missing keys are skipped.
            model: the network being trained (its quantized layers give the histograms).
        """
        with writing(self.log_dir):
            self._log_epoch(row, model)

    def _log_epoch(self, row: dict, model: nn.Module) -> None:
        self.log_scalars(row)
        step, w = int(row["epoch"]), self.writer
        for name, layer in quantized_layers(model).items():
            w.add_histogram(f"weights/{name}", layer.weight.detach().float().cpu(), step)
        for name, sample in self._samples.items():
            w.add_histogram(f"activations/{name}", sample.float().cpu(), step)
        self._samples.clear()
        self.attach(model)
        w.flush()

    def log_scalars(self, row: dict) -> None:
        """Write the scalars of one ``metrics.jsonl`` row (see ``log_epoch``); no histograms."""
        with writing(self.log_dir):
            self._log_scalars(row)

    def _log_scalars(self, row: dict) -> None:
        step = int(row["epoch"])
        w = self.writer
        for tag, key in (("loss/total", "loss"), ("loss/ce", "ce"), ("loss/br_w", "br_w"), ("loss/br_a", "br_a"),
                         ("loss/dampen", "dampen"), ("oscillation/freq", "osc_freq"), ("oscillation/frozen", "frozen"),
                         ("acc/train", "train_acc"), ("acc/test", "test_acc"), ("acc/val", "val_acc"),
                         ("acc/test_at_best_val", "test_acc_at_best_val"),
                         ("acc/best_test_optimistic", "best_test_acc_optimistic"),
                         ("acc/best_test_optimistic", "best_test_acc"),  # the name in rows of older runs
                         ("lr", "lr"), ("stage", "stage")):
            if row.get(key) is not None:
                w.add_scalar(tag, float(row[key]), step)
        for layer, alphas in (row.get("alpha") or {}).items():
            for kind, value in alphas.items():
                w.add_scalar(f"alpha_{kind}/{layer}", float(value), step)
        for layer, stats in (row.get("bins") or {}).items():
            for key in ("dist_alpha", "flips", "osc_freq", "frozen"):
                if stats.get(key) is not None:
                    w.add_scalar(f"bins_{key}/{layer}", float(stats[key]), step)

    def close(self) -> None:
        """Remove the hooks, flush and close the event file."""
        self.detach()
        with writing(self.log_dir):
            self.writer.close()
