#!/usr/bin/env python
"""Two-stage QAT of a CIFAR-10 ResNet with LSQ and Bin Regularization.

    python cifar10_qat_br.py --num-bits 32 --epochs 200 --warmup-epochs 0 --lambda-br 0 --lambda-br-act 0
    python cifar10_qat_br.py --pretrained results/resnet20_fp32_s42/last.pt --num-bits 2
    torchrun --nproc-per-node 4 cifar10_qat_br.py --batch-size 512 --num-bits 2   # one run, 4 processes (DDP)

Under torchrun the processes train one run with DistributedDataParallel; distributed.py says how
it is shared (data, α, BR, BatchNorm, evaluation) and how the ranks agree on errors and stops.

Exit status: 0 finished (also: ``--resume auto`` found the run finished); 2 bad flag, data or checkpoint; 3 non-finite values;
128+signal when interrupted (finished epochs are kept; the message says how to resume).
"""

from __future__ import annotations

import os
import sys

import torch

import config as cfgmod
import distributed
import runner
from checkpoint import CheckpointError, atomic_write_json
from data import DataError, DeviceLoader, find_source, load_split, shard, training_images
from engine import Interrupted, NonFiniteError, Trainer, seed_everything
from models import build_model
from quant import kernels, quantize_model, quantized_layers


#: What ``--resume auto`` does, by ``runner.resolve_auto_resume``'s answer.
AUTO_ACTIONS = {"resume": "continuing the run from last.pt",
                "restart": "starting the run again (it never finished an epoch)",
                "new": "starting a new run"}


def build_quantized_model(cfg) -> torch.nn.Module:
    """The float model (with --pretrained weights), converted to LSQ fake quantization."""
    model = build_model(cfg.arch, clip_value=cfg.clip_value)
    if cfg.pretrained:
        runner.load_pretrained(model, cfg)
    return quantize_model(model, cfgmod.weight_bits(cfg), cfgmod.act_bits(cfg), cfgmod.first_last_bits(cfg))


def main(argv: list[str] | None = None) -> int:
    """Run the command; under torchrun (``WORLD_SIZE`` > 1) every rank runs it (distributed.py).

    The set-up runs in two stages, each ended by ``distributed.agreement``: bad input on any
    rank then ends every rank with exit status 2 and one ``error:`` line (rank 0's).
    """
    argv = sys.argv[1:] if argv is None else argv
    cfg = cfgmod.build_parser().parse_args(argv)
    created_output_dir, lock, group = False, None, None
    try:
        group = distributed.start()  # None: one process
        with distributed.agreement(group):  # stage 1: flags, the resumed checkpoint, the data folder
            if cfg.evaluate is not None and group is None:  # no training, no output folder (torchrun: refused below)
                from deploy.evaluate import evaluate_checkpoint
                return evaluate_checkpoint(cfg, argv)
            if cfg.resume == "" and cfg.overwrite:  # --resume PATH may replace another run (runner.prepare_output_dir)
                raise cfgmod.ConfigError("--resume and --overwrite contradict each other: pass one")
            auto = runner.resolve_auto_resume(cfg) if cfg.resume == "auto" else None
            ckpt = runner.resolve_resume(cfg, argv)  # first: flags not given come from the run
            defaulted = cfgmod.resolve_defaults(cfg)
            cfgmod.validate(cfg)
            if group is not None:  # after --resume, which may take --batch-size, --device, --sync-bn from the run
                group.check(cfg, cfgmod.resolve_device(cfg.device))
            if auto == "finished":
                print(f"{cfg.output_dir}: this run is finished (summary.json); nothing to do")
                return 0
            if auto is not None:
                print(f"--resume auto: {AUTO_ACTIONS[auto]} in {cfg.output_dir}", flush=True)
            if cfg.ptq:  # post-training quantization instead of training (deploy/ptq.py)
                from deploy import ptq
                ptq_warnings = ptq.check_flags(cfg, argv)
                cfg.output_dir = cfg.output_dir or ptq.default_output_dir(cfg)
            if cfg.pretrained and ckpt is None:
                runner.check_pretrained(runner.load_checkpoint(cfg.pretrained, "--pretrained"), cfg)
            source = find_source(cfg.data_dir, download=not cfg.no_download)
            processes = group.describe(cfg, cfgmod.resolve_device(cfg.device)) if group is not None else ""
            if cfg.dry_run:
                cfg.output_dir = cfg.output_dir or cfgmod.default_output_dir(cfg)
                print("\n".join(ptq.banner(cfg, source.describe(), ptq_warnings) if cfg.ptq
                                else cfgmod.banner(cfg, source.describe(), defaulted=defaulted, processes=processes)))
                print("Resolved config:")
                for key, value in sorted(vars(cfg).items()):
                    print(f"  {key}: {value}")
                return 0
        with distributed.agreement(group):  # stage 2: the run folder (rank 0), the data, the model
            if group is None or group.is_main:
                created_output_dir, lock = runner.prepare_output_dir(cfg, resuming=ckpt is not None)
            if cfg.ptq:
                print("\n".join(ptq.banner(cfg, source.describe(), ptq_warnings)), flush=True)
                return ptq.run(cfg, source)
            print("\n".join(cfgmod.banner(cfg, source.describe(), defaulted=defaulted, processes=processes)),
                  flush=True)
            trainer, run_config = set_up(cfg, source, ckpt, group)
        return train(cfg, trainer, run_config, ckpt, group)
    except (cfgmod.ConfigError, DataError, CheckpointError) as exc:
        if group is None or group.is_main:  # every rank has the same error (distributed.agreement)
            print(f"error: {exc}", file=sys.stderr)
        if lock is not None:
            lock.release()
        if created_output_dir:  # refused before anything was written: leave no empty folder behind
            runner.remove_if_empty(cfg.output_dir)
        return 2
    finally:  # the run folder is held until the process is done with it
        if lock is not None:
            lock.release()
        if group is not None:
            group.close()


def _has_checkpoint(cfg) -> bool:
    """Whether the run folder holds a finished epoch (last.pt)."""
    return os.path.exists(os.path.join(cfg.output_dir, "last.pt"))


def set_up(cfg, source, ckpt, group=None):
    """The data, the model and its ``Trainer`` (restored from ``ckpt`` when resuming). Under
    torchrun (``group``) every rank builds its own, from its shards of the data. Writes nothing
    in the run folder, and runs no collectives (it runs inside ``distributed.agreement``).

    Returns:
        (trainer, the content of config.json).

    Raises:
        ConfigError, DataError, CheckpointError: the kernels, the data or ``--pretrained``.
    """
    device = cfgmod.resolve_device(cfg.device)
    is_main = group is None or group.is_main
    if group is not None:
        device = group.device(device)
    cpu_kernels = None
    if device.type == "cpu" and not cfgmod.is_float_run(cfg):  # load the kernels now: a failure shows before data work
        try:
            cpu_kernels = kernels.describe()
        except RuntimeError as exc:  # QATBR_KERNELS=cpp and no build
            raise cfgmod.ConfigError(str(exc)) from None
        print(f"Kernels: {cpu_kernels}", flush=True)
    workers = cfgmod.decode_workers(cfg)
    train_split, val_split, val_index, available = training_images(source, cfg, workers, write_cache=is_main)
    test_split = load_split(source, train=False, download=not cfg.no_download, workers=workers, write_cache=is_main)
    if ckpt is not None:
        runner.check_val_split(ckpt, val_index, cfg)
    subset = f" (class-balanced subset of {available}, --train-subset)" if cfg.train_subset is not None else ""
    held_out = f" / {len(val_split.labels)} validation (held out, --val-split)" if val_split is not None else ""
    print(f"Data: {len(train_split.labels)} train{subset}{held_out} / {len(test_split.labels)} test images",
          flush=True)
    channels_last = device.type == "cuda"
    rank, world_size = (group.rank, group.world_size) if group is not None else (0, 1)
    train_loader = DeviceLoader(train_split, cfg.batch_size, device, train=True, seed=cfg.seed,
                                channels_last=channels_last, drop_last=cfgmod.compile_mode(cfg) != "off",
                                shard=(rank, world_size))
    test_loader = DeviceLoader(shard(test_split, rank, world_size), cfg.eval_batch_size, device, train=False,
                               channels_last=channels_last)
    val_loader = (DeviceLoader(shard(val_split, rank, world_size), cfg.eval_batch_size, device, train=False,
                               channels_last=channels_last) if val_split is not None else None)
    seed_everything(cfg.seed)  # after data loading, which may draw from the global generators
    model = build_quantized_model(cfg)
    if group is not None:
        model = group.prepare(model, cfg.sync_bn)
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    print(f"Quantized layers: {len(quantized_layers(model))}", flush=True)
    trainer = Trainer(cfg, model, train_loader, test_loader, device, cfg.output_dir if is_main else None,
                      val_loader=val_loader, val_index=val_index, group=group)
    run_config = runner.run_config(cfg, source.describe(), cpu_kernels, val_split, world_size,
                                   group.backend(device) if group is not None else None)
    if ckpt is not None:
        trainer.load_state_dict(ckpt)
    return trainer, run_config


def open_run_files(cfg, trainer, run_config: dict, ckpt):
    """Start writing the run folder once the run is set up: TensorBoard (attached to the trainer),
    the logs cut back to the resumed epoch, config.json. Returns the TensorBoard logger or None."""
    tb = None
    if cfg.tensorboard:
        from tb_logging import TensorBoardLogger
        tb = trainer.tb = TensorBoardLogger(os.path.join(cfg.output_dir, "tensorboard"))
        tb.attach(trainer.model)
    if ckpt is not None:
        runner.restore_logs(cfg.output_dir, ckpt)
        note = runner.backfill_tensorboard(tb, cfg.output_dir, ckpt) if tb is not None else None
        if note:
            print(note, flush=True)
    runner.write_config(cfg, run_config)
    return tb


def train(cfg, trainer, run_config: dict, ckpt, group=None) -> int:
    """Train from ``set_up``'s trainer to the end (or to a stop); only rank 0 writes the run folder
    (``open_run_files``, the trainer's checkpoints and logs, summary.json).

    Returns the exit status: 0 finished, 3 non-finite values, 128+signal when interrupted.
    """
    is_main = group is None or group.is_main
    tb = open_run_files(cfg, trainer, run_config, ckpt) if is_main else None
    if ckpt is not None:
        print(f"Resumed from epoch {ckpt['epoch']} of {cfg.epochs}", flush=True)
    try:
        summary = trainer.fit(run_config)
    except NonFiniteError as exc:
        kept = (f"the last good checkpoint is {cfg.output_dir}/last.pt" if _has_checkpoint(cfg)
                else "no epoch had finished, so nothing was saved")
        if is_main:
            print(f"error: {exc}. Stopped; {kept} (no metrics were written for the failed epoch)", file=sys.stderr)
        return 3
    except Interrupted as exc:
        if is_main and _has_checkpoint(cfg):
            print(f"\nInterrupted by {exc}; finished epochs are saved in {cfg.output_dir}/last.pt. Resume with: "
                  f"{runner.resume_command(cfg, group.launch if group is not None else None)}", file=sys.stderr)
        elif is_main:
            print(f"\nInterrupted by {exc} before the first epoch finished: nothing to resume. Start again "
                  f"with the same command and --overwrite, or with --resume auto", file=sys.stderr)
        return 128 + exc.signum
    finally:
        if tb is not None:
            tb.close()
    if not is_main:
        return 0
    summary["train_subset"] = cfg.train_subset  # None: the whole training split
    atomic_write_json(summary, os.path.join(cfg.output_dir, "summary.json"), sort_keys=False)  # the result first
    if cfg.val_split:
        best = (f"best validation epoch {summary['best_val_epoch']} (val {summary['best_val_acc']:.2f}%, best.pt): "
                f"test top-1 {summary['test_acc_at_best_val']:.2f}%")
    else:
        best = (f"best test epoch {summary['best_test_epoch_optimistic']} (best.pt): "
                f"{summary['best_test_acc_optimistic']:.2f}% (selected on the test set, optimistic: not a result)")
    print(f"Done: final test top-1 {summary['final_test_acc']:.2f}%; {best}; {summary['wall_time_s']:.0f}s. "
          f"Results in {cfg.output_dir}")
    return 0


if __name__ == "__main__":
    sys.stdout.reconfigure(line_buffering=True)  # a log file gets each line when it is printed, not per 8 KiB
    try:
        sys.exit(main())
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
