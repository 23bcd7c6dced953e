"""Rebuild a network from a checkpoint file: this tool's checkpoints (``last.pt``, ``best.pt``,
``warmup_end.pt``, ``ptq.pt``) carry their own configuration; a plain float ``state_dict`` takes
the architecture from the command line.

Files from outside are data, never code: everything is read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from run.checkpoint import CheckpointError, checkpoint_problem, load_tensors, foreign_checkpoint_error, type_phrase
from run.config import act_bits, build_parser, defaults_of, first_last_bits, weight_bits
from run.data import NO_DATA_HINT, DataSource, find_source
from models import build_model
from quant import quantize_model, step_size_quantizers

#: Flags that define the network (architecture and grids); a checkpoint fixes them.
MODEL_FLAGS = ("arch", "num_bits", "num_bits_weight", "num_bits_act", "first_last_bits", "clip_value",
               "per_channel_weights", "act_quant_at")


def saved_flags_namespace(flags: dict) -> argparse.Namespace:
    """A checkpoint's ``config["flags"]`` as the parsed flags of its run; a flag missing from ``flags`` (a
    checkpoint from before it existed, or a plain state_dict: ``{}``) has its default."""
    return argparse.Namespace(**{**vars(build_parser().parse_args([])), **flags})


def model_config(flags: dict) -> dict:
    """The network a set of flags describes: ``arch``, ``weight_bits``, ``act_bits``, ``first_last_bits``
    (32 = float), ``clip_value``, ``per_channel_weights`` (False where no weight is quantized),
    ``act_quant_at`` (``conv-input`` where no activation is quantized: the same network). A flag
    missing from ``flags`` (a checkpoint from before it existed) has its default."""
    ns = saved_flags_namespace(flags)
    quantized_weights = min(weight_bits(ns), first_last_bits(ns)) < 32
    return {"arch": ns.arch, "weight_bits": weight_bits(ns), "act_bits": act_bits(ns),
            "first_last_bits": first_last_bits(ns), "clip_value": ns.clip_value,
            "per_channel_weights": bool(ns.per_channel_weights) and quantized_weights,
            "act_quant_at": ns.act_quant_at if act_bits(ns) < 32 else "conv-input"}


def describe(model_cfg: dict) -> str:
    """``resnet20 W2A2, first/last 8-bit`` or ``resnet20 float``."""
    w, a, fl = model_cfg["weight_bits"], model_cfg["act_bits"], model_cfg["first_last_bits"]
    if min(w, a) >= 32:
        text = f"{model_cfg['arch']} float"
    else:
        text = f"{model_cfg['arch']} W{w}A{a}, first/last {'float' if fl >= 32 else f'{fl}-bit'}"
    text += ", one weight α per output channel" if model_cfg.get("per_channel_weights") else ""
    text += ", activations quantized at every activation's output" if model_cfg.get(
        "act_quant_at") == "relu-output" else ""
    return text + (f", activations clipped to [0, {model_cfg['clip_value']:g}]" if model_cfg["clip_value"] else "")


def build_network(model_cfg: dict) -> nn.Module:
    """The (fake-quantized) network of ``model_config``, freshly initialised."""
    model = build_model(model_cfg["arch"], clip_value=model_cfg["clip_value"])
    return quantize_model(model, model_cfg["weight_bits"], model_cfg["act_bits"], model_cfg["first_last_bits"],
                          per_channel_weights=model_cfg.get("per_channel_weights", False),
                          act_quant_at=model_cfg.get("act_quant_at", "conv-input"))


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _mismatches(exc: RuntimeError, shown: int = 2, width: int = 200) -> str:
    """``load_state_dict``'s complaints (one per line after its heading: a tensor of another shape,
    missing or unexpected keys) on one line, the first ``shown`` of them, each cut to ``width``
    characters (a line of missing keys names them all), and how many more."""
    lines = [line.strip() for line in str(exc).splitlines()[1:] if line.strip()] or [str(exc).strip()]
    cut = [line if len(line) <= width else line[:width] + " ..." for line in lines[:shown]]
    more = f"; and {len(lines) - shown} more" if len(lines) > shown else ""
    return "; ".join(cut) + more


def restore(path: str, what: str, cli_flags: dict, explicit: set[str]) -> tuple[nn.Module, dict, dict]:
    """Rebuild the network stored in ``path`` and load its weights.

    A checkpoint of this tool is rebuilt from its own configuration; a plain float
    ``state_dict`` (parameter name -> tensor) from ``cli_flags`` (``arch``, ``clip_value``).
    Model flags (``MODEL_FLAGS``) given on the command line (``explicit``) must agree with
    the checkpoint.

    Returns:
        ``(model in eval mode on the CPU, model_config, checkpoint dict or {} for a state_dict)``.

    Raises:
        CheckpointError: unreadable file, neither kind of file (or a checkpoint with entries of the
            wrong types, ``checkpoint.checkpoint_problem``), a quantized plain state_dict,
            weights that do not fit the configuration, or model flags that contradict it.
    """
    obj = load_tensors(path, what)
    if isinstance(obj, dict) and ("model" in obj or "config" in obj):  # meant as one of this tool's checkpoints
        problem = checkpoint_problem(obj)
        if problem is not None:
            raise foreign_checkpoint_error(path, what, problem)
        ckpt, state = obj, obj["model"]
        saved = model_config(obj["config"].get("flags", {}))
    elif _is_state_dict(obj):
        ckpt, state = {}, obj
        if any("_quant." in k for k in state):
            raise CheckpointError(f"{what}: {path} is a plain state_dict of a quantized model; its bit widths are "
                                  f"unknown: pass a checkpoint written by cifar10_qat_br.py")
        saved = model_config({"arch": cli_flags["arch"], "clip_value": cli_flags["clip_value"], "num_bits": 32})
        explicit = explicit - {"arch", "clip_value"}
    else:
        raise foreign_checkpoint_error(path, what, f"it holds {type_phrase(obj)}, neither a checkpoint nor a plain "
                                         f"state_dict (parameter name -> tensor)")
    given = {k: cli_flags[k] for k in MODEL_FLAGS if k in explicit}
    if given:
        base = ckpt.get("config", {}).get("flags", {}) if ckpt else {"arch": saved["arch"], "num_bits": 32}
        wanted = model_config({**base, **given})
        if wanted != saved:
            flags = " ".join(f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k, v in given.items())
            hint = (f"; to quantize a float network use --ptq --pretrained {path}"
                    if min(saved["weight_bits"], saved["act_bits"]) >= 32 else "")
            raise CheckpointError(f"{what}: {path} holds {describe(saved)}; {flags} contradicts it (the model is "
                                  f"rebuilt from the checkpoint's own configuration: drop the flag){hint}")
    try:
        model = build_network(saved)
    except ValueError as exc:
        raise CheckpointError(f"{what}: {path}: cannot build its model ({exc})") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"{what}: {path} does not fit {describe(saved)}: {_mismatches(exc)}") from None
    except Exception as exc:  # noqa: BLE001 - e.g. a tensor of the wrong kind in a corrupt file
        raise CheckpointError(f"{what}: {path}: cannot load its weights ({type(exc).__name__}: {exc})") from None
    return model.eval(), saved, ckpt


def checkpoint_data(saved_flags: dict, data_dir: str | None, no_download: bool | None) -> tuple[DataSource, bool]:
    """Where the test images of a checkpoint's checks are: ``--data-dir`` when given, else the
    checkpoint's own (a plain state_dict has none: the tool's default); downloading as
    ``--no-download`` / ``--download`` say when given, else as the checkpoint's run did when its
    folder is used, else allowed.

    Args:
        saved_flags: the checkpoint's ``config["flags"]`` ({} for a plain state_dict).
        data_dir: ``--data-dir`` as given on this command line, or None.
        no_download: ``--no-download`` (True) or ``--download`` (False) as given, or None.

    Returns:
        ``(run.data.DataSource, download allowed)``.

    Raises:
        DataError: no CIFAR-10 there (``run.data.find_source``); when the folder is the checkpoint's,
            the message says so and how to name another.
    """
    own = data_dir is None and "data_dir" in saved_flags
    if data_dir is None:
        data_dir = saved_flags.get("data_dir", defaults_of("data_dir"))
    if no_download is None:
        no_download = bool(saved_flags.get("no_download", False)) if own else False
    hint = ("that folder is the checkpoint's own, from its training command: pass --data-dir PATH to name the "
            "CIFAR-10 of this machine") if own else NO_DATA_HINT
    return find_source(data_dir, download=not no_download, hint=hint), not no_download


def step_size_count(model: nn.Module) -> int:
    """Number of step sizes α of the enabled quantizers in ``model`` (one per output channel of a
    ``--per-channel-weights`` weight quantizer)."""
    return sum(q.alpha.numel() for q in step_size_quantizers(model).values())
