"""The run banner and its warnings: what a run will do, printed before it starts (tests/test_seed_banner.py)."""

from __future__ import annotations

import torch

from quant.grid import FULL_PRECISION_BITS
from run.config import (act_bits, br_terms_act, build_parser, compile_mode, decode_workers, defaults_of,
                        first_last_bits, freeze_thresholds, frozen_kinds, is_float_run, learning_rate,
                        resolve_device, step_size_flags, torchrun_world_size, usable_cpus, warmup_then_stage_two,
                        weight_bits)

RULE = "=" * 80


def warnings_for(cfg) -> list[str]:
    """Flags that have no effect in this combination, and values capped (reported in the banner, not errors)."""
    out = []
    if cfg.workers > usable_cpus():
        out.append(f"--workers {cfg.workers} is more than the {usable_cpus()} CPUs this process may use: "
                   f"{decode_workers(cfg)} are used")
    w_bits, a_bits = weight_bits(cfg), act_bits(cfg)
    stage2 = cfg.epochs > cfg.warmup_epochs
    if cfg.br_backprop_to_alpha_act and cfg.lambda_br_act == 0:
        out.append("--br-backprop-to-alpha-act has no effect: A-BR is disabled (--lambda-br-act 0)")
    if cfg.lambda_br > 0 and w_bits >= FULL_PRECISION_BITS:
        out.append("--lambda-br has no effect: weights are not quantized (32 bits), W-BR has nothing to regularise")
    if cfg.lambda_br_act > 0 and a_bits >= FULL_PRECISION_BITS:
        out.append("--lambda-br-act has no effect: activations are not quantized (32 bits)")
    if not stage2 and (cfg.lambda_br > 0 or cfg.lambda_br_act > 0) and not is_float_run(cfg):
        out.append("BR never runs: --warmup-epochs equals --epochs, so there is no stage 2")
    if not stage2 and (cfg.freeze_alpha or cfg.freeze_weight_alpha or cfg.freeze_act_alpha):
        out.append("the freeze flags have no effect: there is no stage 2 to freeze step sizes in")
    if cfg.freeze_alpha and (cfg.freeze_weight_alpha or cfg.freeze_act_alpha):
        out.append("--freeze-weight-alpha / --freeze-act-alpha are implied by --freeze-alpha")
    if is_float_run(cfg) and (cfg.freeze_alpha or cfg.freeze_weight_alpha or cfg.freeze_act_alpha):
        out.append("the freeze flags have no effect: a float run has no step sizes")
    if cfg.lr_schedule == "warmup-constant" and cfg.warmup_epochs == 0:
        out.append("--lr-schedule warmup-constant has no effect: there is no warmup, so it is one cosine over all "
                   "epochs, as the default")
    if cfg.act_quant_at != "conv-input" and a_bits >= FULL_PRECISION_BITS:
        out.append(f"--act-quant-at {cfg.act_quant_at} has no effect: activations are not quantized (32 bits)")
    freezing = getattr(cfg, "freeze_oscillating", None) is not None
    if (cfg.lambda_dampen > 0 or freezing) and w_bits >= FULL_PRECISION_BITS:
        out.append("--lambda-dampen / --freeze-oscillating have no effect: weights are not quantized (32 bits)")
    elif (cfg.lambda_dampen > 0 or freezing) and not stage2:
        out.append("--lambda-dampen / --freeze-oscillating have no effect: there is no stage 2")
    if cfg.dampen_aggregation != defaults_of("dampen_aggregation") and cfg.lambda_dampen == 0:
        out.append("--dampen-aggregation has no effect without --lambda-dampen")
    if cfg.oscillation_momentum != defaults_of("oscillation_momentum") and not freezing:
        out.append("--oscillation-momentum has no effect without --freeze-oscillating")
    if cfg.sync_bn and torchrun_world_size() == 1:
        out.append("--sync-bn has no effect in one process (it applies under torchrun --nproc-per-node N)")
    if cfg.per_channel_weights and min(w_bits, first_last_bits(cfg)) >= FULL_PRECISION_BITS:
        out.append("--per-channel-weights has no effect: no weight is quantized (32 bits)")
    if cfg.amp and resolve_device(cfg.device).type != "cuda":
        out.append("--amp has no effect on the CPU (bf16 autocast is used on CUDA only)")
    defaults = build_parser()
    if cfg.optimizer == "adam" and cfg.momentum != defaults.get_default("momentum"):
        out.append(f"--momentum {cfg.momentum:g} has no effect with --optimizer adam (Adam's betas are (0.9, 0.999))")
    if not cfg.ptq and (cfg.calib_batches != defaults.get_default("calib_batches") or not cfg.bn_recalib):
        out.append("--calib-batches / --no-bn-recalib have no effect without --ptq")
    return out


def _moving_target_note(backprop: bool) -> str:
    """The note under A-BR's gradient line when the activation α is trained in stage 2: what the
    W2A2 CPU study measured of ``--br-backprop-to-alpha-act`` there (README, docs/results.md section 9)."""
    if backprop:
        return ("    └─> Note: activation alpha is trained in stage 2, and this gradient shrinks it: in this tool's "
                "W2A2 CPU study (λ_w = λ_a = 1, every alpha trained) to a median 0.285x its end-of-warmup "
                "value, and the runs ended 2.33 and 2.40 points above those without this flag, level with W-BR "
                "alone (84.88% against 84.88%, mean of two seeds; README)")
    return ("    └─> Note: with activation alpha trained, True ended 2.33 and 2.40 points above False in this tool's "
            "W2A2 CPU study (λ_w = λ_a = 1, every alpha trained), level with W-BR alone, by shrinking that alpha "
            "to a median 0.285x (two seeds; README)")


def _freeze_default_note(cfg, a_br: bool) -> str:
    """Why ``--freeze-alpha`` is what it is in a BR run that did not give it (``config.default_freeze_alpha``)."""
    if cfg.freeze_alpha:
        return ("    └─> Note: on by default with W-BR alone, as in the seed's W-only scenario (its default was off; "
                "W-BR with alpha trained ended 0.43-0.44 points below in this tool's W2A2 CPU study, two seeds, "
                "README); --no-freeze-alpha trains alpha")
    given = step_size_flags(cfg)  # checked first: with these given, A-BR is not why it is off
    if given:
        verb = "decides" if len(given) == 1 else "decide"
        why = " (runs with W-BR alone freeze them by default)" if not a_br else ""
        return (f"    └─> Note: off, as {' and '.join(given)} {verb} the step sizes{why}; --freeze-alpha freezes "
                "every one")
    return ("    └─> Note: off by default with A-BR on, unlike the seed's A-BR scenarios: W+A stable with alpha "
            "trained ended 0.46 and 0.51 points above W+A stable with alpha frozen in this tool's W2A2 CPU "
            "study (two seeds, README; A-only with alpha trained not measured); --freeze-alpha freezes every one")


def _qat_schedule_lines(cfg, defaulted: set[str]) -> list[str]:
    """The banner's title, stages, BR configuration and alpha control of a quantized run."""
    a_bits = act_bits(cfg)
    E, W = cfg.epochs, cfg.warmup_epochs
    freeze_w, freeze_a = frozen_kinds(cfg)
    w_br, a_br = br_terms_act(cfg)  # the banner never calls on a BR term that does not act
    lines = [RULE, "Starting 2-Stage QAT+BR Training", RULE]
    if W > 0:  # the seed's line; how W was chosen is said below the block (warmup_line)
        lines.append(f"Stage 1 (Warmup): Epochs 1-{W} (LSQ only)")
    else:  # "--warmup-epochs 0" would be untrue when the 30 % rule gave 0 (a run of 1 epoch)
        lines.append("Stage 1 (Warmup): none "
                     f"({_warmup_rule(E) if 'warmup_epochs' in defaulted else '--warmup-epochs 0'})")
    if E > W:
        if cfg.lambda_br == 0 and cfg.lambda_br_act == 0:
            what = " (both λ = 0: LSQ only, no BR)"
        else:
            what = "" if w_br or a_br else " (no BR term has an effect: LSQ only)"
        lines.append(f"Stage 2 (BR): Epochs {W + 1}-{E}{what}")
    else:
        lines.append("Stage 2 (BR): none (--warmup-epochs equals --epochs)")
    lines += ["", "BR Configuration:"]

    def state(lam: float, effective: bool, tensors: str) -> str:
        if effective:
            return "[ENABLED]"
        return f"[NO EFFECT: {tensors} are not quantized (32 bits)]" if lam > 0 else "[DISABLED]"

    lines.append(f"  - W-BR (weights): λ={float(cfg.lambda_br)} {state(cfg.lambda_br, w_br, 'weights')}")
    if w_br:
        lines.append("    └─> Gradients to alpha: Always enabled (paper-faithful, weights are stable)")
        if freeze_w and E > W:
            lines.append("    └─> Note: weight alpha is frozen after warmup, "
                         "so in stage 2 this gradient cannot change it")
        elif E > W and not a_br:  # not the default (--no-freeze-alpha, ...): the study measured it below the frozen run
            lines.append("    └─> Note: weight alpha is trained in stage 2; in this tool's W2A2 CPU study this "
                         "gradient shrank it (median 0.62-0.63x) and the run ended 0.43-0.44 points below W-BR with "
                         "--freeze-alpha, the seed's W-only (both seeds; README)")
    lines.append(f"  - A-BR (activations): λ={float(cfg.lambda_br_act)} "
                 f"{state(cfg.lambda_br_act, a_br, 'activations')}")
    if cfg.lambda_br_act == 0 and "lambda_br_act" in defaulted and a_bits < FULL_PRECISION_BITS:
        lines.append("    └─> Note: off by default (the seed's default was λ=1, which cost 3.3 points of W2A2 test "
                     "top-1 in this tool's CPU study, README); --lambda-br-act 1 turns it on")
    if a_br:
        lines.append(f"    └─> Gradients to alpha: {bool(cfg.br_backprop_to_alpha_act)} (default: False, recommended)")
        if cfg.br_backprop_to_alpha_act and freeze_a and E > W:
            lines.append("    └─> Note: activation alpha is frozen after warmup, so in stage 2 this gradient cannot "
                         "change it: the target k·α cannot move, and the run is the one without "
                         "--br-backprop-to-alpha-act")
        elif not freeze_a and E > W:  # what the study measured against the seed's "recommended"
            lines.append(_moving_target_note(cfg.br_backprop_to_alpha_act))
    lines += _oscillation_lines(cfg)
    lines += ["", "Alpha Control:", f"  - Freeze alpha after warmup: {bool(cfg.freeze_alpha)}"]
    if "freeze_alpha" in defaulted and (w_br or a_br) and warmup_then_stage_two(cfg):
        lines.append(_freeze_default_note(cfg, a_br))
    lines.append("    └─> If True: NO updates to alpha from ANY loss (CE or BR)")
    lines.append("    └─> If False: CE can update alpha, A-BR respects --br-backprop-to-alpha-act flag")
    if not cfg.freeze_alpha and (freeze_w or freeze_a):
        kinds = " and ".join(k for k, f in (("weight", freeze_w), ("activation", freeze_a)) if f)
        flags = " ".join(f for f, given in (("--freeze-weight-alpha", cfg.freeze_weight_alpha),
                                             ("--freeze-act-alpha", cfg.freeze_act_alpha)) if given)
        lines.append(f"  - Frozen after warmup anyway: {kinds} alpha ({flags})")
    return lines


def act_quant_line(cfg) -> str:
    """The banner line that says where activations are quantized (``--act-quant-at``)."""
    if cfg.act_quant_at == "relu-output":
        block = ("each block's output after its residual add (signed: a linear bottleneck)"
                 if cfg.arch == "mobilenetv2" else "each block's output after its residual add")
        return (f"Activation quantizers: at every activation's output and {block} (--act-quant-at relu-output: "
                f"what flows between blocks is on the grid), and at the first conv's and the last linear's inputs")
    return ("Activation quantizers: at the input of every conv and linear (--act-quant-at conv-input; identity "
            "shortcuts carry float activations)")


def _warmup_rule(epochs: int) -> str:
    return f"30 % of {epochs} epoch{'s' if epochs != 1 else ''}, as --warmup-epochs was not given"


def warmup_line(cfg, defaulted: set[str] = frozenset()) -> str | None:
    """The line below the banner's block that says where a ``--from-warmup`` run's epochs 1..W come
    from, or how a warmup of W > 0 epochs was chosen when ``--warmup-epochs`` was not given (the
    block's own Stage 1 line is the seed's); else None."""
    if getattr(cfg, "from_warmup", None):
        return (f"Warmup: epochs 1-{cfg.warmup_epochs} are those of {cfg.from_warmup} (--from-warmup: the same "
                f"stage 1; this run trains from epoch {cfg.warmup_epochs + 1})")
    if "warmup_epochs" not in defaulted or cfg.warmup_epochs == 0 or is_float_run(cfg):
        return None
    return f"Warmup: epochs 1-{cfg.warmup_epochs}, {_warmup_rule(cfg.epochs)}"


def schedule_text(cfg) -> str:
    """The learning-rate schedule in words (``--lr-schedule``), for the banner's Optimiser line."""
    E, W = cfg.epochs, cfg.warmup_epochs
    epochs = lambda n: f"{n} epoch{'s' if n != 1 else ''}"  # noqa: E731
    if cfg.lr_schedule == "warmup-constant" and W > 0:
        return (f"lr constant through the warmup (epochs 1-{W}), then cosine over the {epochs(E - W)} with BR "
                f"(--lr-schedule warmup-constant)" if E > W else
                f"lr constant over all {epochs(E)} (--lr-schedule warmup-constant; every epoch is warmup)")
    return f"cosine over {epochs(E)}" + (" (--lr-schedule warmup-constant: no warmup, so one cosine)"
                                         if cfg.lr_schedule == "warmup-constant" else "")


def _oscillation_lines(cfg) -> list[str]:
    """The banner's block on oscillations (Nagel et al., ICML 2022): dampening, freezing, tracking, BN."""
    quantized = weight_bits(cfg) < FULL_PRECISION_BITS
    stage2 = cfg.epochs > cfg.warmup_epochs
    if not (cfg.lambda_dampen > 0 or freeze_thresholds(cfg) or cfg.bn_reestimate):
        return []  # the seed's commands: the seed's block, line for line (its banner issue)
    lines = ["", "Oscillation Control (Nagel et al., ICML 2022; low-bit weights only, as W-BR):"]

    def state(on: bool) -> str:
        if not on:
            return "[DISABLED]"
        if not quantized:
            return "[NO EFFECT: weights are not quantized (32 bits)]"
        return "[ENABLED]" if stage2 else "[NO EFFECT: no stage 2]"

    damp = cfg.lambda_dampen > 0
    lines.append(f"  - Dampening: λ_d={float(cfg.lambda_dampen)} {state(damp)}")
    if damp and quantized and stage2:
        lines.append(f"    └─> (sg(q(w)) - clip(w))², aggregation {cfg.dampen_aggregation}; λ_d rises by a cosine from "
                     f"0 to {cfg.lambda_dampen:g} over the stage-2 steps")
    thresholds = freeze_thresholds(cfg)
    lines.append("  - Iterative freezing: " + (f"threshold {thresholds[0]:g} -> {thresholds[1]:g} "
                                               if thresholds else "") + state(thresholds is not None))
    if thresholds and quantized and stage2:
        lines.append(f"    └─> EMA momentum {cfg.oscillation_momentum:g}; the threshold falls by a cosine over the "
                     f"stage-2 steps; a frozen weight keeps its code for good (no SGD step, no weight decay)")
    lines.append("  - BN re-estimation after the last epoch: " + (
        f"{cfg.bn_reestimate} training batches [ENABLED]" if cfg.bn_reestimate else "[DISABLED]"))
    return lines


def optimizer_line(cfg, defaulted: set[str] = frozenset()) -> str:
    """The optimiser, its learning rate (saying when it is ``--optimizer``'s default) and weight decay."""
    name = {"sgd": "SGD", "adam": "Adam"}[cfg.optimizer]
    lr = f"lr {learning_rate(cfg):g}" + (f" ({name}'s default, as --lr was not given)" if "lr" in defaulted else "")
    if cfg.optimizer == "adam":
        return f"Adam {lr} betas (0.9, 0.999) weight decay {cfg.weight_decay:g} (L2; none on alpha)"
    return f"SGD {lr} momentum {cfg.momentum:g} weight decay {cfg.weight_decay:g} (none on alpha)"


def banner(cfg, source_line: str, n_layers: str = "", defaulted: set[str] = frozenset(),
           processes: str = "") -> list[str]:
    """The run banner (lines), in the wording researchers grep for.

    A quantized run's block, from the title to the closing rule, holds the seed's lines for the
    seed's commands, exactly and in the seed's order (tests/test_seed_banner.py); whatever this tool
    says beyond them (how the warmup was chosen, the optimiser, ...) is on lines below the block.

    ``defaulted``: the flags ``resolve_defaults`` filled in, ``lambda_br_act`` when a new run was not given
    it (A-BR off by default, unlike the seed) and ``freeze_alpha`` when ``resolve_freeze_alpha`` filled it
    for a new run (on with W-BR alone, unlike the seed): the banner says so.
    ``processes``: a line about the processes of a torchrun run (``distributed.Group.describe``).
    """
    w_bits, a_bits = weight_bits(cfg), act_bits(cfg)
    E = cfg.epochs
    if is_float_run(cfg):  # no quantizers: no stages, no BR, no step sizes to speak of
        lines = [RULE, "Starting float training (the baseline: nothing quantized)", RULE,
                 f"Schedule: epochs 1-{E}, float; no quantizers, so no BR and no step sizes (alpha)"]
    else:
        lines = _qat_schedule_lines(cfg, defaulted)
    lines.append(RULE)
    bits = lambda b: "float" if b >= FULL_PRECISION_BITS else f"{b}-bit"  # noqa: E731
    lines.append(f"Model: {cfg.arch}" + (f" {n_layers}" if n_layers else ""))
    if is_float_run(cfg):
        lines.append("Bits: full precision (float baseline, no quantization)")
    else:
        w_grid = " binary {-α, +α}" if w_bits == 1 else ""
        a_grid = " {0, α}" if a_bits == 1 else ""
        lines.append(f"Bits: W{w_bits}A{a_bits} (weights {bits(w_bits)}{w_grid}, activations {bits(a_bits)}{a_grid}); "
                     f"first/last layers {bits(first_last_bits(cfg))}")
        if a_bits < FULL_PRECISION_BITS:
            lines.append(act_quant_line(cfg))
        if w_bits < FULL_PRECISION_BITS or first_last_bits(cfg) < FULL_PRECISION_BITS:
            lines.append("Weight step sizes: " + ("one α per output channel (--per-channel-weights)"
                                                  if cfg.per_channel_weights else "one α per tensor"))
    if cfg.clip_value is not None:
        lines.append(f"Activations clipped to [0, {cfg.clip_value:g}]")
    elif cfg.arch == "mobilenetv2":
        lines.append("Activations: ReLU6 (MobileNetV2's own; --clip-value c clips to [0, c] instead)")
    lines.append("Init: " + ('float checkpoint ' + cfg.pretrained if cfg.pretrained
                             else 'random initialisation (no --pretrained given)'))
    lines.append(f"Optimiser: {optimizer_line(cfg, defaulted)}, {schedule_text(cfg)}, "
                 f"batch {cfg.batch_size}, seed {cfg.seed}")
    warmup = warmup_line(cfg, defaulted)
    if warmup:
        lines.append(warmup)
    lines.append(f"Data: {source_line}" + (f"; {cfg.val_split} training images held out for validation "
                                           f"(--val-split, class-balanced, seed {cfg.seed})" if cfg.val_split else "")
                 + (f"; training on a class-balanced subset of {cfg.train_subset} images "
                    f"(--train-subset, seed {cfg.seed}" + (", from the rest" if cfg.val_split else "") + ")"
                    if cfg.train_subset else ""))
    lines.append("Model selection: best.pt is the best validation epoch (--val-split); the result is the final "
                 "epoch's test top-1" if cfg.val_split else
                 "Model selection: none (no --val-split): the result is the final epoch's test top-1; best.pt is "
                 "the best test epoch (selected on the test set, optimistic)")
    mode = compile_mode(cfg)
    device = resolve_device(cfg.device)
    # one thread per core by default: several processes on one machine must share it (README "Speed")
    n = torch.get_num_threads()
    threads = f" with {n} thread{'s' if n != 1 else ''} (OMP_NUM_THREADS)" if device.type == "cpu" else ""
    lines.append(f"Device: {device}{threads}" + (" (bf16 autocast)" if cfg.amp else "")
                 + (f"; torch.compile mode {mode}" if mode != "off" else "; eager (not compiled)"))
    if processes:
        lines.append(processes)
    lines.append(f"Output: {cfg.output_dir}")
    for w in warnings_for(cfg):
        lines.append(f"WARNING: {w}")
    lines.append(RULE)
    return lines

