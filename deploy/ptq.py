"""Post-training quantization (PTQ) baseline: quantize a trained float network without training.

1. Weights: per tensor (or channel), the step size α minimising ``mean((clamp(round(w/α), Qn, Qp)·α - w)²)``
   (``mse_step_size``: a grid, then golden-section; LSQ's ``2·mean|w|/sqrt(Qp)`` is a candidate), as in
   Banner et al., NeurIPS 2019.
2. Activations: the same objective on every quantizer's float input, over ``--calib-batches`` seeded,
   augmented training batches (never the ``--val-split`` images).
3. BatchNorm re-estimated on those batches, quantized (``--bn-recalib``; Nagel et al. 2021, section 4.3);
   the float network with the same re-estimation is reported too (``float_bn_recalib_test_acc``).

The result is an ordinary fake-quantized model, which ``--evaluate``, ``export.py`` and ``--pretrained`` take.
"""

from __future__ import annotations

import copy
import os
import time

import torch
from torch import nn

from run.checkpoint import atomic_torch_save, atomic_write_json, load_pretrained
from run.config_json import run_config, write_config
from run.banner import RULE, act_quant_line
from run.config import (ConfigError, act_bits, explicit_flags, first_last_bits, is_float_run,
                    resolve_device, weight_bits)
from run.data import DeviceLoader, Split, load_split, training_images
from run.evaluation import recalibrate_batchnorm, top1_accuracy
from run.seeding import seed_everything
from models import build_model
from quant import LSQQuantizer, activation_quantizers, quantize_model, quantized_layers
from quant.convert import activation_outputs
from quant.lsq import mse_step_size

#: Activation values kept per layer and calibration batch (a seeded random sample beyond that).
VALUES_PER_BATCH = 1 << 15

#: Flags that only training uses: without effect in a PTQ run, and left out of its config.json.
TRAINING_FLAGS = ("lambda_br", "lambda_br_act", "br_backprop_to_alpha_act", "freeze_alpha", "freeze_weight_alpha",
                  "freeze_act_alpha", "epochs", "warmup_epochs", "optimizer", "lr", "lr_schedule", "momentum",
                  "weight_decay", "amp", "compile", "tensorboard", "resume", "evaluate", "lambda_dampen",
                  "dampen_aggregation", "freeze_oscillating", "oscillation_momentum", "bn_reestimate")


def set_step_size(quantizer: LSQQuantizer, alpha) -> None:
    """Give ``quantizer`` the step size ``alpha`` (a float; a list of one per output channel for a
    per-channel quantizer) and mark it initialised (as a loaded checkpoint does), so it never
    re-initialises itself from data."""
    quantizer.load_state_dict({"alpha": torch.tensor(alpha, dtype=quantizer.alpha.dtype),
                               "initialized": torch.tensor(True)})


def calibration_batches(split: Split, batches: int, batch_size: int, seed: int,
                        device: torch.device) -> list[torch.Tensor]:
    """The first ``batches`` training batches of ``batch_size`` images from ``split``, as training draws
    them (``data.DeviceLoader``: shuffled with ``seed``, random crop and flip), each ``(B, 3, 32, 32)``
    float32 on ``device``; fewer if the split is smaller.

    Augmented as in training on purpose: the network's BatchNorm layers learned to work with the
    statistics of augmented batches (the zero-padded crop borders shift them), and re-estimating
    them on un-augmented images cost a float ResNet-20 2.4 points of test top-1 (79.40 -> 76.99 %
    on CIFAR-10; 79.55 % with augmented batches; docs/results.md).
    """
    return DeviceLoader(split, batch_size, device, train=True, seed=seed).first_images(batches)


@torch.no_grad()
def layer_inputs(model: nn.Module, batches: list[torch.Tensor], seed: int,
                 per_batch: int = VALUES_PER_BATCH, outputs_of: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The inputs of every ``nn.Conv2d`` / ``nn.Linear`` of the float ``model`` on ``batches``, and the
    outputs of the modules named in ``outputs_of`` (the activations that ``--act-quant-at relu-output``
    quantizes: ``quant.convert.activation_outputs``).

    Returns:
        module name -> 1-D float32 CPU tensor: per batch all values, or a seeded random sample of
        ``per_batch`` of them (with replacement) where a batch holds more, concatenated.
    """
    gen = torch.Generator().manual_seed(seed)
    found: dict[str, list[torch.Tensor]] = {}
    handles = []

    def keep(name):
        def hook(_module, args, output=None):
            flat = (args[0] if output is None else output).detach().reshape(-1).float().cpu()
            if flat.numel() > per_batch:
                flat = flat[torch.randint(flat.numel(), (per_batch,), generator=gen)]
            found.setdefault(name, []).append(flat)
        return hook

    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            handles.append(module.register_forward_pre_hook(keep(name)))
        elif name in outputs_of:
            handles.append(module.register_forward_hook(keep(name)))
    try:
        model.eval()
        for x in batches:
            model(x)
    finally:
        for h in handles:
            h.remove()
    return {name: torch.cat(parts) for name, parts in found.items()}


def quantize_post_training(model: nn.Module, weight_bits_: int, act_bits_: int, first_last_bits_: int,
                           batches: list[torch.Tensor], seed: int, bn_recalib: bool = True,
                           per_channel_weights: bool = False, act_quant_at: str = "conv-input") -> nn.Module:
    """PTQ of a trained float ``model`` (in place; returned): see the module docstring.

    Args:
        model: a float network (``models``), weights trained.
        weight_bits_, act_bits_, first_last_bits_: as ``quant.quantize_model``.
        batches: calibration inputs (``calibration_batches``).
        seed: seeds the sampling of activation values.
        bn_recalib: re-estimate BatchNorm statistics after quantizing.
        per_channel_weights: one weight step size per output channel, each the MSE-optimal one of
            that channel's weights.
        act_quant_at: ``quant.ACT_QUANT_AT``; with ``relu-output`` each activation's quantizer is
            calibrated on that activation's float output.

    Returns:
        ``model`` with ``QConv2d`` / ``QLinear`` layers whose step sizes are set, in eval mode.
    """
    # The float network's layer inputs are what the quantizers quantize (a ReLU the conversion
    # fuses into a quantizer has already been applied to them).
    outputs = tuple(activation_outputs(model)) if act_quant_at == "relu-output" else ()
    inputs = layer_inputs(model, batches, seed, outputs_of=outputs)
    quantize_model(model, weight_bits_, act_bits_, first_last_bits_, per_channel_weights=per_channel_weights,
                   act_quant_at=act_quant_at)
    pairs = [(layer.weight_quant, layer.weight) for layer in quantized_layers(model).values()]
    # every enabled activation quantizer: a layer's input quantizer, or a QuantAct's (the activation's output)
    pairs += [(q, inputs[name]) for name, q in activation_quantizers(model).items()]
    for quantizer, values in pairs:
        if not quantizer.enabled:
            continue
        values = values.detach().float().cpu()
        if quantizer.channels is not None:
            set_step_size(quantizer, [mse_step_size(channel.flatten(), quantizer.quant_min, quantizer.quant_max)
                                      for channel in values])
        else:
            set_step_size(quantizer, mse_step_size(values, quantizer.quant_min, quantizer.quant_max))
    if bn_recalib:
        recalibrate_batchnorm(model, batches)
    return model.eval()


def default_output_dir(cfg) -> str:
    """``results/<arch>_w<W>a<A>_fl<F>_ptq[_pcw][_aqro]_s<seed>``."""
    return os.path.join("results", f"{cfg.arch}_w{weight_bits(cfg)}a{act_bits(cfg)}_fl{first_last_bits(cfg)}"
                                   f"_ptq{'_pcw' if cfg.per_channel_weights else ''}"
                                   f"{'_aqro' if cfg.act_quant_at == 'relu-output' else ''}_s{cfg.seed}")


def check_flags(cfg, argv: list[str]) -> list[str]:
    """Refuse what PTQ cannot do; return warnings for training flags that have no effect.

    Raises:
        ConfigError: no --pretrained, a float bit width, --resume, bad --calib-batches.
    """
    if not cfg.pretrained:
        raise ConfigError("--ptq needs --pretrained FLOAT.pt: the trained float network to quantize")
    if is_float_run(cfg):
        raise ConfigError("--ptq: weights and activations are both at 32 bits, nothing to quantize; "
                          "pass --num-bits (1-8)")
    if cfg.resume is not None:
        raise ConfigError("--ptq trains nothing, so there is nothing to --resume")
    if cfg.calib_batches < 1:
        raise ConfigError(f"--calib-batches must be >= 1, got {cfg.calib_batches}")
    given = explicit_flags(argv)
    return [f"--{k.replace('_', '-')} has no effect with --ptq (no training)" for k in TRAINING_FLAGS if k in given]


def banner(cfg, source_line: str, warnings: list[str]) -> list[str]:
    """The ``--ptq`` banner (lines): what is quantized from what, calibration, data, output."""
    bits = lambda b: "float" if b >= 32 else f"{b}-bit"  # noqa: E731
    lines = [RULE, "Post-Training Quantization (PTQ, no training)", RULE,
             f"Model: {cfg.arch}, float weights from {cfg.pretrained}",
             f"Bits: W{weight_bits(cfg)}A{act_bits(cfg)}; first/last layers {bits(first_last_bits(cfg))}",
             f"Step sizes: MSE-optimal, weights "
             f"{'per output channel (--per-channel-weights)' if cfg.per_channel_weights else 'per tensor'}, "
             f"activations per tensor from the first {cfg.calib_batches} training batch(es) of "
             f"{cfg.batch_size} images (fewer if the training set is smaller), augmented as in training "
             f"(seed {cfg.seed})"
             + (f", none of the {cfg.val_split} held out by --val-split" if cfg.val_split else ""),
             f"BatchNorm re-estimated on them: {'yes' if cfg.bn_recalib else 'no (--no-bn-recalib)'}",
             *([act_quant_line(cfg)] if act_bits(cfg) < 32 else []),
             f"Data: {source_line}", f"Device: {resolve_device(cfg.device)}", f"Output: {cfg.output_dir}"]
    lines += [f"WARNING: {w}" for w in warnings]
    return lines + [RULE]


def run(cfg, source, replace_old_run) -> int:
    """The ``--ptq`` run (flags checked, output folder prepared): writes ``config.json``, ``ptq.pt``
    and ``summary.json`` (``"method": "ptq"``) into ``cfg.output_dir``, calling ``replace_old_run()``
    (it removes the files of the run this one replaces) only then."""
    started = time.perf_counter()
    device = resolve_device(cfg.device)
    train, val, _, _ = training_images(source, cfg, cfg.workers)  # never the --val-split images
    test = load_split(source, train=False, download=not cfg.no_download, workers=cfg.workers)
    seed_everything(cfg.seed)
    model = build_model(cfg.arch, clip_value=cfg.clip_value)
    load_pretrained(model, cfg)
    model.to(device)
    test_loader = DeviceLoader(test, cfg.eval_batch_size, device, train=False)
    float_acc = top1_accuracy(model.eval(), test_loader, device)
    batches = calibration_batches(train, cfg.calib_batches, cfg.batch_size, cfg.seed, device)
    calibration_images = sum(len(b) for b in batches)
    print(f"Calibration: {calibration_images} training images in {len(batches)} batch(es)", flush=True)
    float_bn_acc = None
    if cfg.bn_recalib:  # the float network with the same re-estimated statistics: what PTQ alone costs
        float_bn = copy.deepcopy(model)
        recalibrate_batchnorm(float_bn, batches)
        float_bn_acc = top1_accuracy(float_bn, test_loader, device)
        del float_bn
    print(f"Float network: test top-1 {float_acc:.2f}%" + (
        f" ({float_bn_acc:.2f}% with BatchNorm re-estimated on the calibration batches)" if cfg.bn_recalib else ""),
        flush=True)
    quantize_post_training(model, weight_bits(cfg), act_bits(cfg), first_last_bits(cfg), batches, cfg.seed,
                           cfg.bn_recalib, per_channel_weights=cfg.per_channel_weights, act_quant_at=cfg.act_quant_at)
    acc = top1_accuracy(model, test_loader, device)
    seconds = time.perf_counter() - started
    config = run_config(cfg, source.describe(), None, val)
    for key in TRAINING_FLAGS:
        config["flags"].pop(key, None)
    config["derived"].update(method="ptq", calibration_images=calibration_images)
    replace_old_run()
    write_config(cfg, config)
    atomic_torch_save({"model": model.state_dict(), "config": config, "method": "ptq", "epoch": 0,
                       "last_acc": acc, "float_test_acc": float_acc, "float_bn_recalib_test_acc": float_bn_acc},
                      os.path.join(cfg.output_dir, "ptq.pt"))
    atomic_write_json({"status": "finished", "method": "ptq", "final_test_acc": acc, "float_test_acc": float_acc,
                       "float_bn_recalib_test_acc": float_bn_acc, "epochs": 0, "wall_time_s": seconds},
                      os.path.join(cfg.output_dir, "summary.json"))
    print(f"Done: PTQ W{weight_bits(cfg)}A{act_bits(cfg)} test top-1 {acc:.2f}% (float {float_acc:.2f}%), "
          f"{seconds:.0f}s. Results in {cfg.output_dir}")
    return 0
