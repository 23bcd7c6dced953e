"""Command-line flags, their validation and the resolved run configuration (the banner: run/banner.py).

Everything a run needs is checked here, before any data is read or any model built:
a bad flag gives one line naming the flag and what was expected.
"""

from __future__ import annotations

import argparse
import math
import os

import torch

from models import ARCHITECTURES
from quant import kernels
from quant.convert import ACT_QUANT_AT
from quant.grid import FULL_PRECISION_BITS
from regularizers.oscillation import AGGREGATIONS

#: Largest --seed: numpy's generators take seeds in 0..2**32 - 1.
MAX_SEED = 2**32 - 1

#: Flags that say how to run, not what the experiment is: they may change on --resume.
RUN_FLAGS = frozenset({"workers", "device", "output_dir", "resume", "overwrite", "dry_run", "data_dir",
                       "no_download", "tensorboard", "compile", "eval_batch_size", "progress_interval", "sync_bn"})

#: Flags that say what this one command does: never taken from the run on --resume (every
#: other flag not given is, so that the printed resume command works as printed).
INVOCATION_FLAGS = frozenset({"output_dir", "resume", "overwrite", "dry_run"})

#: Flags that say how a run started, not what it is: on --resume always the run's (given or not), so a
#: run that trained its own warmup stays one when resumed with --from-warmup (--resume auto, a sweep).
HISTORY_FLAGS = frozenset({"from_warmup"})

#: Flags that act only after the warmup (stage 2): every other experiment flag shapes epochs 1..W,
#: so runs that differ only in these share their warmup (``--from-warmup``).
STAGE2_FLAGS = frozenset({"lambda_br", "lambda_br_act", "br_backprop_to_alpha_act", "freeze_alpha",
                          "freeze_weight_alpha", "freeze_act_alpha", "lambda_dampen", "dampen_aggregation",
                          "freeze_oscillating", "oscillation_momentum", "bn_reestimate"})

#: The ablation's scenarios: key (as scripts/sweep.sh's SCENARIO_TABLE keys them, tested) -> (name, flags).
#: The seed's five first: its four BR scenarios freeze every step size after warmup, its baseline
#: does not. With α frozen the moving target cannot move (W+A moving = W+A stable, bit for bit), so
#: ``lsq-frozen`` separates freezing from BR and the ``-free`` pair trains α in stage 2.
SCENARIOS = {
    "w-only": ("W-only", "--lambda-br 1 --lambda-br-act 0 --freeze-alpha"),
    "wa-stable": ("W+A stable", "--lambda-br 1 --lambda-br-act 1 --freeze-alpha"),
    "wa-moving": ("W+A moving target", "--lambda-br 1 --lambda-br-act 1 --freeze-alpha --br-backprop-to-alpha-act"),
    "a-only": ("A-only", "--lambda-br 0 --lambda-br-act 1 --freeze-alpha"),
    "lsq": ("LSQ baseline", "--lambda-br 0 --lambda-br-act 0"),
    "lsq-frozen": ("LSQ, α frozen after warmup", "--lambda-br 0 --lambda-br-act 0 --freeze-alpha"),
    "w-only-free": ("W-only, α trained", "--lambda-br 1 --lambda-br-act 0 --no-freeze-alpha"),
    "wa-stable-free": ("W+A stable, α trained", "--lambda-br 1 --lambda-br-act 1 --no-freeze-alpha"),
    "wa-moving-free": ("W+A moving target, α trained",
                       "--lambda-br 1 --lambda-br-act 1 --no-freeze-alpha --br-backprop-to-alpha-act"),
    # BR's nearest rival (Nagel et al., ICML 2022), with the seed's BR rows' --freeze-alpha, so that it is
    # compared with them (and with lsq-frozen) on the same footing: λ_d 0.1 (every recipe of theirs) and the
    # freezing thresholds of their 4-bit recipe (they publish none for 2 bits). No BN re-estimation: no BR row has it.
    "dampen": ("Oscillation dampening", "--lambda-br 0 --lambda-br-act 0 --freeze-alpha --lambda-dampen 0.1"),
    "freeze": ("Iterative freezing", "--lambda-br 0 --lambda-br-act 0 --freeze-alpha --freeze-oscillating 0.1:0.01"),
}

#: The seed's five scenarios (the default grid of scripts/sweep.sh and benchmarks/gpu_study.py).
SEED_SCENARIOS = ("w-only", "wa-stable", "wa-moving", "a-only", "lsq")


#: ``--optimizer`` choices and the learning rate of each when ``--lr`` is not given: SGD's is this
#: tool's recipe, Adam's the usual 0.001 (Kingma & Ba 2015), which the seed's Adam runs use.
OPTIMIZERS = ("sgd", "adam")
DEFAULT_LR = {"sgd": 0.01, "adam": 0.001}

#: ``--lr-schedule`` choices (``engine.lr_factor``): one cosine over all epochs, or ``--lr`` constant through
#: the warmup and a cosine over the BR epochs (the seed authors' public script).
LR_SCHEDULES = ("cosine", "warmup-constant")

#: The ``mode`` values of ``torch.compile`` that ``--compile`` accepts.
TORCH_COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class ConfigError(ValueError):
    """A flag combination that cannot run; the message names the flag and what was expected."""


#: The one line for ``--br-backprop-to-alpha``, a flag that does not exist (the seed's document says so;
#: its authors' alpha-control guide uses it): W-BR's gradient always reaches the weight step sizes.
NO_BR_BACKPROP_TO_ALPHA = ("error: there is no --br-backprop-to-alpha: W-BR's gradient always reaches the weight "
                           "step sizes (unless frozen); for A-BR's gradient to the activation step sizes use "
                           "--br-backprop-to-alpha-act\n")


class _NoSuchFlag(argparse.Action):
    """A flag that is refused with its own one-line ``error:`` message (exit status 2), with or
    without a value, instead of argparse's usage text."""

    def __init__(self, option_strings, dest, message: str, **kwargs):
        super().__init__(option_strings, dest, default=argparse.SUPPRESS, **kwargs)
        self.message = message

    def __call__(self, parser, namespace, values, option_string=None):
        parser.exit(2, self.message)


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of ``cifar10_qat_br.py``."""
    p = argparse.ArgumentParser(
        prog="cifar10_qat_br.py", allow_abbrev=False, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Two-stage quantization-aware training of a CIFAR-10 ResNet or MobileNetV2: LSQ warmup, then "
                    "LSQ + Bin Regularization. Loss = CE + λ_w·BR_w + λ_a·BR_a.")
    q = p.add_argument_group("quantization")
    q.add_argument("--num-bits", type=int, default=2,
                   help="bits of weights and activations (1-8; 32: float; 1: weights {-α, +α}, activations {0, α})")
    q.add_argument("--num-bits-weight", type=int, default=None, help="override --num-bits for weights")
    q.add_argument("--num-bits-act", type=int, default=None, help="override --num-bits for activations")
    q.add_argument("--first-last-bits", type=int, default=8, help="bits of the first conv and last linear (2-8; 32)")
    q.add_argument("--per-channel-weights", action="store_true",
                   help="one weight step size α per output channel instead of per tensor (activations: per tensor)")
    q.add_argument("--act-quant-at", default="conv-input", choices=ACT_QUANT_AT,
                   help="quantize activations at every conv/linear input, or at every activation's output")
    q.add_argument("--clip-value", type=float, default=None,
                   help="clip activations to [0, c] (None: ReLU; mobilenetv2: ReLU6)")
    b = p.add_argument_group("bin regularization (stage 2)")
    b.add_argument("--lambda-br", type=float, default=1.0, help="weight of W-BR on weights; 0 disables")
    # Not the seed's 1: at λ_a = 1 A-BR cost 3.3 points of W2A2 test top-1 in the CPU study (README), so A-BR,
    # this tool's extension, is off unless asked for.
    b.add_argument("--lambda-br-act", type=float, default=0.0,
                   help="weight of A-BR on pre-quantization activations; 0 disables (the seed's default was 1)")
    b.add_argument("--br-backprop-to-alpha-act", action="store_true",
                   help="let A-BR's gradient reach the activation step sizes")
    b.add_argument("--br-backprop-to-alpha", nargs="?", action=_NoSuchFlag, help=argparse.SUPPRESS,
                   message=NO_BR_BACKPROP_TO_ALPHA)
    o = p.add_argument_group("oscillations (stage 2; Nagel et al., ICML 2022; low-bit weights only, as BR)")
    o.add_argument("--lambda-dampen", type=float, default=0.0, metavar="λ",
                   help="final weight of oscillation dampening (rises by a cosine over stage 2); 0 disables")
    o.add_argument("--dampen-aggregation", default="kernel_mean", choices=AGGREGATIONS,
                   help="per tensor: kernel_mean (sum over output channels of the mean over the rest), sum, mean")
    o.add_argument("--freeze-oscillating", default=None, metavar="START:FINAL",
                   help="freeze weights whose oscillation frequency passes a threshold falling START -> FINAL")
    o.add_argument("--oscillation-momentum", type=float, default=0.001, metavar="M",
                   help="momentum of the EMAs of --freeze-oscillating")
    o.add_argument("--bn-reestimate", type=int, default=0, metavar="N",
                   help="after the last epoch, re-estimate BatchNorm statistics on N training batches; 0: none")
    a = p.add_argument_group("step sizes")
    # Not the seed's off where W-BR is alone: in the W2A2 study W-BR with α trained ended 0.43-0.44 points below
    # W-BR with α frozen, and W+A with α trained above W+A with α frozen (README; default_freeze_alpha).
    a.add_argument("--freeze-alpha", action=argparse.BooleanOptionalAction, default=None,
                   help="freeze every step size (weights and activations) after warmup; --no-freeze-alpha trains "
                        "them (None: frozen when W-BR is the only BR term acting, after a warmup of 1 epoch or "
                        "more, and no step-size flag below is given; else trained)")
    a.add_argument("--freeze-weight-alpha", action="store_true", help="freeze the weight step sizes after warmup")
    a.add_argument("--freeze-act-alpha", action="store_true", help="freeze the activation step sizes after warmup")
    s = p.add_argument_group("schedule and optimiser")
    s.add_argument("--epochs", type=int, default=100, help="total epochs")
    s.add_argument("--warmup-epochs", type=int, default=None,
                   help="stage 1 (LSQ only) epochs (None: 30 %% of --epochs, rounded)")
    s.add_argument("--optimizer", default="sgd", choices=OPTIMIZERS, help="sgd (with --momentum) or adam")
    s.add_argument("--lr", type=float, default=None, help="learning rate at the start (None: 0.01 SGD, 0.001 Adam)")
    s.add_argument("--lr-schedule", default="cosine", choices=LR_SCHEDULES,
                   help="cosine over all epochs, or warmup-constant: constant warmup, then cosine over BR epochs")
    s.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    s.add_argument("--weight-decay", type=float, default=5e-4,
                   help="weight decay (L2) on network parameters, never on step sizes")
    s.add_argument("--batch-size", type=int, default=128, help="training batch size")
    s.add_argument("--eval-batch-size", type=int, default=1000, help="evaluation batch size")
    m = p.add_argument_group("model and data")
    m.add_argument("--arch", default="resnet20", help=f"one of {', '.join(ARCHITECTURES)}")
    m.add_argument("--pretrained", default=None, metavar="PATH",
                   help="float checkpoint made by this tool (--num-bits 32) to start from")
    m.add_argument("--train-subset", type=int, default=None, metavar="N",
                   help="train on N images, class-balanced, drawn with --seed (None: all)")
    m.add_argument("--val-split", type=int, default=0, metavar="N",
                   help="hold out N training images as a validation set that selects best.pt; 0: none")
    m.add_argument("--data-dir", default="./data",
                   help="torchvision CIFAR-10 (downloaded when missing) or a train/<class>/, test/<class>/ folder")
    m.add_argument("--no-download", action="store_true", help="never download CIFAR-10")
    m.add_argument("--download", dest="no_download", action="store_false", default=False,
                   help="allow downloading (undoes a run's --no-download on --resume)")
    r = p.add_argument_group("run")
    r.add_argument("--output-dir", default=None, help="run folder (None: results/<arch>_<bits>_<lambdas>_s<seed>)")
    r.add_argument("--seed", type=int, default=42, help="random seed")
    r.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    r.add_argument("--workers", type=int, default=2, help="processes for decoding images once")
    r.add_argument("--progress-interval", type=float, default=60.0, metavar="SECONDS",
                   help="seconds between progress lines when the output is not a terminal; 0: none")
    r.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA (BR and step sizes stay float32)")
    r.add_argument("--compile", nargs="?", const="on", default="auto", metavar="MODE",
                   help=f"torch.compile the training step and evaluation: auto, on, off, or a mode "
                        f"({', '.join(TORCH_COMPILE_MODES)})")
    r.add_argument("--sync-bn", action=argparse.BooleanOptionalAction, default=False,
                   help="under torchrun: BatchNorm statistics of the global batch (GPUs only)")
    r.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=False,
                   help="write TensorBoard logs to <output-dir>/tensorboard")
    r.add_argument("--resume", nargs="?", const="", default=None, metavar="PATH",
                   help="continue the run in --output-dir from last.pt (or PATH); 'auto': continue or start it")
    r.add_argument("--overwrite", action="store_true", help="replace a run already in --output-dir")
    r.add_argument("--from-warmup", default=None, metavar="PATH",
                   help="start at stage 2 from the warmup_end.pt of a run with this run's stage 1")
    r.add_argument("--dry-run", action="store_true", help="print the banner and the resolved config, then exit")
    d = p.add_argument_group("evaluation and post-training quantization (no training)")
    d.add_argument("--evaluate", default=None, metavar="CKPT",
                   help="print the test top-1 of a checkpoint (or a float state_dict of --arch) and exit")
    d.add_argument("--ptq", action="store_true",
                   help="post-training quantization of the float --pretrained network (MSE step sizes)")
    d.add_argument("--calib-batches", type=int, default=8, help="--ptq: training batches to calibrate on")
    d.add_argument("--bn-recalib", action=argparse.BooleanOptionalAction, default=True,
                   help="--ptq: re-estimate BatchNorm statistics on the calibration batches")
    return p


def explicit_flags(argv: list[str]) -> set[str]:
    """The destinations of the flags actually given on the command line."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def default_warmup_epochs(epochs: int) -> int:
    """The warmup of a run of ``epochs`` epochs without ``--warmup-epochs``: 30 % of them,
    rounded half up, as in the default recipe (30 of 100)."""
    return (3 * epochs + 5) // 10


def learning_rate(cfg) -> float:
    """``--lr``, or the default of ``--optimizer`` (``DEFAULT_LR``) when it was not given."""
    return cfg.lr if cfg.lr is not None else DEFAULT_LR[cfg.optimizer]


def resolve_defaults(cfg) -> set[str]:
    """Fill the flags whose default depends on others (``--warmup-epochs``, ``--lr``), in place.

    Call after ``--resume`` took the run's flags and before ``validate``. Returns the
    destinations that were filled, for the banner.
    """
    filled = set()
    if cfg.warmup_epochs is None:  # a float run has nothing to warm up: all its epochs are alike
        cfg.warmup_epochs = 0 if is_float_run(cfg) else default_warmup_epochs(cfg.epochs)
        filled.add("warmup_epochs")
    if cfg.lr is None:
        cfg.lr = learning_rate(cfg)
        filled.add("lr")
    return filled


def default_freeze_alpha(cfg) -> bool:
    """What ``--freeze-alpha`` is when not given: True when W-BR is the only BR term that acts (λ > 0 on
    quantized tensors), in a stage 2 after a warmup of at least one epoch (α is learned there), and neither
    ``--freeze-weight-alpha`` nor ``--freeze-act-alpha`` says otherwise which step sizes are frozen; False
    otherwise (the LSQ baseline, and every run with A-BR on, train α throughout).

    Why, from this tool's W2A2 CPU study (README, docs/results.md section 9; a 9-epoch warmup, two seeds
    each): W-BR alone with every α trained ended 0.43-0.44 points below W-BR with α frozen after the warmup
    (W-BR's gradient shrank the weight step sizes); W-BR with A-BR at λ_a = 1 and α trained ended 0.46 and
    0.51 points above the same with α frozen. The seed's BR scenarios froze α in both cases; its default did not.
    """
    return br_terms_act(cfg) == (True, False) and warmup_then_stage_two(cfg) and not step_size_flags(cfg)


def warmup_then_stage_two(cfg) -> bool:
    """True when the run has a warmup of at least one epoch (``--warmup-epochs``, or its default) and a stage 2:
    the runs where freezing α after the warmup means something."""
    warmup = cfg.warmup_epochs if cfg.warmup_epochs is not None else default_warmup_epochs(cfg.epochs)
    return 0 < warmup < cfg.epochs


def br_terms_act(cfg) -> tuple[bool, bool]:
    """(W-BR acts, A-BR acts): a BR term acts with λ > 0 on quantized tensors (below 32 bits)."""
    return (cfg.lambda_br > 0 and weight_bits(cfg) < FULL_PRECISION_BITS,
            cfg.lambda_br_act > 0 and act_bits(cfg) < FULL_PRECISION_BITS)


def step_size_flags(cfg) -> list[str]:
    """The flags given that decide which step sizes are frozen in stage 2, so that ``--freeze-alpha``'s
    default leaves them as they say: ``--freeze-weight-alpha``, ``--freeze-act-alpha``."""
    return [flag for flag, given in (("--freeze-weight-alpha", cfg.freeze_weight_alpha),
                                     ("--freeze-act-alpha", cfg.freeze_act_alpha)) if given]


def resolve_freeze_alpha(cfg) -> bool:
    """Fill ``--freeze-alpha`` when it was not given (``default_freeze_alpha``), in place. Call before anything
    names the run's folder (its name holds ``_frz``); ``--resume`` then takes the run's own value. Returns True
    when it was filled."""
    if cfg.freeze_alpha is not None:
        return False
    cfg.freeze_alpha = default_freeze_alpha(cfg)
    return True


def weight_bits(cfg) -> int:
    """The weights' bit width: ``--num-bits-weight`` when given, else ``--num-bits`` (32 = not quantized)."""
    return cfg.num_bits_weight if cfg.num_bits_weight is not None else cfg.num_bits


def act_bits(cfg) -> int:
    """The activations' bit width: ``--num-bits-act`` when given, else ``--num-bits`` (32 = not quantized)."""
    return cfg.num_bits_act if cfg.num_bits_act is not None else cfg.num_bits


def is_float_run(cfg) -> bool:
    """True when weights and activations are both at 32 bits: the float baseline, nothing quantized."""
    return min(weight_bits(cfg), act_bits(cfg)) >= FULL_PRECISION_BITS


def first_last_bits(cfg) -> int:
    """Width of the first conv and last linear: ``--first-last-bits``, or 32 in a float run."""
    return FULL_PRECISION_BITS if is_float_run(cfg) else cfg.first_last_bits


def _fmt(x: float) -> str:
    return f"{x:g}"


def default_output_dir(cfg) -> str:
    """``results/<arch>_w<W>a<A>_fl<F>_lbr<λw>_lbra<λa>[_abp][_frz...][_clip<c>][_pcw][_aqro][_lrwc][_adam][_val<N>][_sub<N>]_s<seed>``;
    ``results/<arch>_fp32[_lrwc][_adam][_val<N>][_sub<N>]_s<seed>`` for float."""
    if is_float_run(cfg):
        return os.path.join("results", f"{cfg.arch}_fp32{_subset_suffix(cfg)}_s{cfg.seed}")
    name = (f"{cfg.arch}_w{weight_bits(cfg)}a{act_bits(cfg)}_fl{first_last_bits(cfg)}"
            f"_lbr{_fmt(cfg.lambda_br)}_lbra{_fmt(cfg.lambda_br_act)}")
    name += "_abp" if cfg.br_backprop_to_alpha_act else ""
    name += "_frz" if cfg.freeze_alpha else ("_frzw" if cfg.freeze_weight_alpha else "") + (
        "_frza" if cfg.freeze_act_alpha else "")
    name += _oscillation_suffix(cfg)
    name += f"_clip{_fmt(cfg.clip_value)}" if cfg.clip_value is not None else ""
    name += "_pcw" if cfg.per_channel_weights else ""
    name += "_aqro" if cfg.act_quant_at == "relu-output" else ""
    return os.path.join("results", name + _subset_suffix(cfg) + f"_s{cfg.seed}")


def _oscillation_suffix(cfg) -> str:
    """``_ld<λ_d>[_<aggregation>]``, ``_fo<START>-<FINAL>[_om<M>]``, ``_bnre<N>``: the oscillation flags in use."""
    name = ""
    if cfg.lambda_dampen > 0:
        name += f"_ld{_fmt(cfg.lambda_dampen)}"
        name += f"_{cfg.dampen_aggregation}" if cfg.dampen_aggregation != "kernel_mean" else ""
    thresholds = freeze_thresholds(cfg)
    if thresholds:
        name += f"_fo{_fmt(thresholds[0])}-{_fmt(thresholds[1])}"
        name += f"_om{_fmt(cfg.oscillation_momentum)}" if cfg.oscillation_momentum != 0.001 else ""
    return name + (f"_bnre{cfg.bn_reestimate}" if cfg.bn_reestimate else "")


def _subset_suffix(cfg) -> str:
    """The learning-rate schedule and optimiser (when not the defaults), validation split and training
    subset parts of a folder name."""
    return (("_lrwc" if cfg.lr_schedule == "warmup-constant" else "") + ("_adam" if cfg.optimizer == "adam" else "")
            + (f"_val{cfg.val_split}" if cfg.val_split else "") + (
        f"_sub{cfg.train_subset}" if cfg.train_subset is not None else ""))


def _check_bits(value: int, flag: str, lowest: int = 1) -> None:
    if not (lowest <= value <= 8 or value == FULL_PRECISION_BITS):
        raise ConfigError(f"{flag} must be {lowest}-8, or 32 for full precision, got {value}")


def _check_number(value: float, flag: str, minimum: float = 0.0, strict: bool = False) -> None:
    bad = not math.isfinite(value) or (value <= minimum if strict else value < minimum)
    if bad:
        relation = ">" if strict else ">="
        raise ConfigError(f"{flag} must be a finite number {relation} {minimum:g}, got {value}")


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda if available, else cpu.

    Raises:
        ConfigError: an unknown name, or CUDA asked for on a machine without a GPU.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: no CUDA GPU is available on this machine; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) here")
    return device


def torchrun_world_size(environ=os.environ) -> int:
    """The number of processes of this run: torchrun's ``WORLD_SIZE``, 1 outside torchrun (or when
    it is not a positive integer: ``distributed.launch_from_environment`` reports that)."""
    try:
        return max(int(environ.get("WORLD_SIZE", "1")), 1)
    except ValueError:
        return 1


def compile_mode(cfg) -> str:
    """The ``torch.compile`` mode of the run (``--compile``), or ``"off"``.

    ``auto`` compiles on CUDA only, with CUDA graphs (``reduce-overhead``): a ResNet-20 step is
    hundreds of small kernels, so launching them costs more than running them
    (docs/performance.md). On the CPU the fused C++ kernels run the quantizers, and compiling
    takes minutes. Under torchrun (several processes, DDP) ``auto`` does not compile: CUDA
    graphs with DDP are untested here. ``on`` (the flag alone) compiles on any device.
    ``True``/``False`` are the values that config.json of runs before the modes existed holds.

    Raises:
        ConfigError: a value that is none of auto, on, off and ``TORCH_COMPILE_MODES``.
    """
    value = {True: "on", False: "off"}.get(cfg.compile, cfg.compile)
    if value not in ("auto", "on", "off") + TORCH_COMPILE_MODES:
        raise ConfigError(f"--compile must be auto, on, off or one of {', '.join(TORCH_COMPILE_MODES)}, "
                          f"got {cfg.compile!r}")
    cuda = resolve_device(cfg.device).type == "cuda"
    if value == "auto":
        return "reduce-overhead" if cuda and torchrun_world_size() == 1 else "off"
    if value == "on":
        return "reduce-overhead" if cuda else "default"
    return value


def validate(cfg) -> None:
    """Check every flag (and the kernels' environment variables) that needs no file access.

    Raises ``ConfigError`` with one line.
    """
    try:
        kernels.check_environment()
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    _check_bits(cfg.num_bits, "--num-bits")
    if cfg.num_bits_weight is not None:
        _check_bits(cfg.num_bits_weight, "--num-bits-weight")
    if cfg.num_bits_act is not None:
        _check_bits(cfg.num_bits_act, "--num-bits-act")
    # The first conv sees the image and the last linear gives the logits: 1 bit there (binary weights,
    # a two-level image) destroys the network, and no recipe uses it.
    _check_bits(cfg.first_last_bits, "--first-last-bits", lowest=2)
    _check_number(cfg.lambda_br, "--lambda-br")
    _check_number(cfg.lambda_br_act, "--lambda-br-act")
    _check_number(cfg.lambda_dampen, "--lambda-dampen")
    freeze_thresholds(cfg)
    if not (math.isfinite(cfg.oscillation_momentum) and 0 < cfg.oscillation_momentum <= 1):
        raise ConfigError(f"--oscillation-momentum must be a number in (0, 1], got {cfg.oscillation_momentum}")
    if cfg.bn_reestimate < 0:
        raise ConfigError(f"--bn-reestimate must be >= 0 training batches (0: none), got {cfg.bn_reestimate}")
    _check_number(learning_rate(cfg), "--lr", strict=True)
    if not (math.isfinite(cfg.momentum) and 0 <= cfg.momentum < 1):
        raise ConfigError(f"--momentum must be a number in [0, 1), got {cfg.momentum}")
    _check_number(cfg.weight_decay, "--weight-decay")
    if cfg.clip_value is not None:
        _check_number(cfg.clip_value, "--clip-value", strict=True)
    if cfg.epochs < 1:
        raise ConfigError(f"--epochs must be >= 1, got {cfg.epochs}")
    if cfg.val_split < 0:
        raise ConfigError(f"--val-split must be >= 0 images (0: no validation set), got {cfg.val_split}")
    if cfg.train_subset is not None and cfg.train_subset < 2:
        raise ConfigError(f"--train-subset must be >= 2 images, got {cfg.train_subset}")
    if not 0 <= cfg.warmup_epochs <= cfg.epochs:
        raise ConfigError(f"--warmup-epochs must be between 0 and --epochs ({cfg.epochs}), got {cfg.warmup_epochs}")
    if cfg.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {cfg.batch_size}")
    if cfg.eval_batch_size < 1:
        raise ConfigError(f"--eval-batch-size must be >= 1, got {cfg.eval_batch_size}")
    if cfg.workers < 0:
        raise ConfigError(f"--workers must be >= 0, got {cfg.workers}")
    _check_number(cfg.progress_interval, "--progress-interval")
    if not 0 <= cfg.seed <= MAX_SEED:
        raise ConfigError(f"--seed must be an integer in 0..{MAX_SEED} (numpy's seed range), got {cfg.seed}")
    if cfg.arch not in ARCHITECTURES:
        raise ConfigError(f"--arch must be one of {', '.join(ARCHITECTURES)}, got {cfg.arch!r}")
    resolve_device(cfg.device)
    compile_mode(cfg)


def freeze_thresholds(cfg) -> tuple[float, float] | None:
    """``--freeze-oscillating START:FINAL`` as ``(START, FINAL)``, or None when off.

    Raises:
        ConfigError: not two numbers with ``0 < FINAL <= START <= 1`` (oscillation frequencies per step).
    """
    value = getattr(cfg, "freeze_oscillating", None)
    if value is None:
        return None
    parts = str(value).split(":")
    try:
        start, final = (float(x) for x in parts) if len(parts) == 2 else (None, None)
    except ValueError:
        start = final = None
    if start is None or not (math.isfinite(start) and math.isfinite(final) and 0 < final <= start <= 1):
        raise ConfigError(f"--freeze-oscillating must be START:FINAL, two thresholds with 0 < FINAL <= START <= 1 "
                          f"(oscillations per weight and step), e.g. 0.1:0.01; got {value!r}")
    return start, final


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask: what SLURM or taskset granted)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def decode_workers(cfg) -> int:
    """``--workers``, capped at ``usable_cpus()``: more processes than CPUs only add memory (each
    holds a decoder and its batches), not speed. The cap is a banner warning."""
    return min(cfg.workers, usable_cpus())


def defaults_of(key: str):
    """The parser's default of flag destination ``key``."""
    return build_parser().get_default(key)


def frozen_kinds(cfg) -> tuple[bool, bool]:
    """(weight α frozen in stage 2, activation α frozen in stage 2)."""
    return cfg.freeze_alpha or cfg.freeze_weight_alpha, cfg.freeze_alpha or cfg.freeze_act_alpha
