"""``--evaluate CKPT``: the test top-1 of a checkpoint, one line, nothing written.

The network is rebuilt from the checkpoint's own configuration (``deploy.restore``) and
evaluated with the training loop's own evaluation (``run.evaluation.top1_accuracy``), so the number
is exactly the ``test_acc`` the run logged for that epoch. With ``--bn-reestimate N`` the line also
gives the test top-1 after re-estimating the BatchNorm statistics on N training batches, drawn as the
run's own ``--bn-reestimate`` draws them after its last epoch (Nagel et al., ICML 2022): for a run's
``last.pt`` it is the ``test_acc_after`` that run would log.
"""

from __future__ import annotations

import sys

from run.config import ConfigError, explicit_flags, resolve_device
from run.data import DeviceLoader, load_split, training_images
from deploy.restore import MODEL_FLAGS, checkpoint_data, describe, restore, saved_flags_namespace, step_size_count
from run.evaluation import recalibrate_batchnorm, top1_accuracy

#: Flags that may accompany --evaluate: where the data is, how to run, and model flags (checked
#: against the checkpoint). Anything else (training flags, an output folder) has no meaning here.
EVALUATE_FLAGS = frozenset(MODEL_FLAGS) | {"evaluate", "data_dir", "no_download", "device", "workers",
                                           "eval_batch_size", "bn_reestimate"}


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_setting(name: str, cfg, explicit: set[str], saved_flags: dict):
    """A how-to-run flag: the command line's when given, else the checkpoint's, else the default."""
    return getattr(cfg, name) if name in explicit or name not in saved_flags else saved_flags[name]


def reestimation_batches(source, download: bool, saved_flags: dict, batches: int, workers: int, device) -> list:
    """The first ``batches`` training batches (float32 ``(B, 3, 32, 32)``, normalised) of epoch E + 1's draw of
    the run that saved ``saved_flags``: its training images (``--val-split``, ``--train-subset``), batch size and
    seed, as its own ``--bn-reestimate`` takes them after its last epoch E (one process's draw; fewer when an
    epoch has fewer). A checkpoint without flags (a plain state_dict) gets the parser's defaults.

    Raises:
        DataError: see ``run.data.training_images``.
    """
    run = saved_flags_namespace({**saved_flags, "no_download": not download})
    train = training_images(source, run, workers, log=_stderr).train
    return DeviceLoader(train, run.batch_size, device, train=True, seed=run.seed).first_images(batches, run.epochs + 1)


def recorded_accuracy(ckpt: dict) -> tuple[float, int] | None:
    """``(test top-1 %, epoch)`` the checkpoint's run logged for its epoch, or None (plain state_dict)."""
    acc = ckpt.get("last_acc")
    return None if acc is None else (acc, ckpt.get("epoch", 0))


def evaluate_checkpoint(cfg, argv: list[str]) -> int:
    """Run ``--evaluate``: print ``Test top-1 ...`` and return 0.

    Raises:
        ConfigError: flags that have no meaning with --evaluate, or bad data/device flags.
        CheckpointError: see ``deploy.restore.restore``. DataError: bad ``--data-dir``.
    """
    explicit = explicit_flags(argv)
    extra = sorted(explicit - EVALUATE_FLAGS)
    if extra:
        raise ConfigError(f"--evaluate: {', '.join('--' + k.replace('_', '-') for k in extra)} cannot be combined "
                          f"with it (it takes the data, device and model flags and --bn-reestimate only)")
    if cfg.eval_batch_size < 1:
        raise ConfigError(f"--eval-batch-size must be >= 1, got {cfg.eval_batch_size}")
    if cfg.bn_reestimate < 0:
        raise ConfigError(f"--bn-reestimate must be >= 0 training batches (0: none), got {cfg.bn_reestimate}")
    device = resolve_device(cfg.device)
    model, model_cfg, ckpt = restore(cfg.evaluate, "--evaluate", vars(cfg), explicit)
    saved = ckpt.get("config", {}).get("flags", {})
    source, download = checkpoint_data(saved, cfg.data_dir if "data_dir" in explicit else None,
                                       cfg.no_download if "no_download" in explicit else None)
    test = load_split(source, train=False, download=download, workers=cfg.workers, log=_stderr)
    loader = DeviceLoader(test, run_setting("eval_batch_size", cfg, explicit, saved), device, train=False)
    acc = top1_accuracy(model.to(device).eval(), loader, device)
    line = f"Test top-1 {acc:.2f}% ({len(test.labels)} images) | "
    if cfg.bn_reestimate:
        xs = reestimation_batches(source, download, saved, cfg.bn_reestimate, cfg.workers, device)
        recalibrate_batchnorm(model, xs)
        line += (f"after BatchNorm re-estimation on {len(xs)} training batches (--bn-reestimate): "
                 f"{top1_accuracy(model, loader, device):.2f}% | ")
    line += (f"{describe(model_cfg)} | {step_size_count(model)} step sizes (α) | data: {source.describe()} | "
             f"{cfg.evaluate}")
    recorded = recorded_accuracy(ckpt)
    if recorded is not None:
        line += (f" | the PTQ run logged {recorded[0]:.2f}%" if ckpt.get("method") == "ptq"
                 else f" | the run logged {recorded[0]:.2f}% for epoch {recorded[1]}"
                 + (" after --bn-reestimate" if "bn_reestimated_batches" in ckpt else ""))
    print(line, flush=True)
    return 0
