#!/usr/bin/env python
"""Two-stage QAT of a CIFAR-10 ResNet with LSQ and Bin Regularization.

    python cifar10_qat_br.py --num-bits 32 --epochs 200 --warmup-epochs 0 --lambda-br 0 --lambda-br-act 0
    python cifar10_qat_br.py --pretrained results/resnet20_fp32_s42/best.pt --num-bits 2

Exit status: 0 finished (also: ``--resume auto`` found the run finished); 2 bad flag, data or checkpoint; 3 non-finite values;
128+signal when interrupted (finished epochs are kept; the message says how to resume).
"""

from __future__ import annotations

import os
import sys

import torch

import config as cfgmod
import runner
from checkpoint import CheckpointError, atomic_write_json
from data import DataError, DeviceLoader, balanced_subset, find_source, load_split
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
    return quantize_model(model, cfgmod.weight_bits(cfg), cfgmod.act_bits(cfg), cfgmod.first_last_bits(cfg),
                          per_channel_weights=cfg.per_channel_weights)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cfg = cfgmod.build_parser().parse_args(argv)
    created_output_dir, lock = False, None
    try:
        if cfg.evaluate is not None:  # no training, no output folder
            from deploy.evaluate import evaluate_checkpoint
            return evaluate_checkpoint(cfg, argv)
        if cfg.resume == "" and cfg.overwrite:  # --resume PATH may replace another run (runner.prepare_output_dir)
            raise cfgmod.ConfigError("--resume and --overwrite contradict each other: pass one")
        auto = runner.resolve_auto_resume(cfg) if cfg.resume == "auto" else None
        ckpt = runner.resolve_resume(cfg, argv)  # first: flags not given come from the run
        defaulted = cfgmod.resolve_defaults(cfg)
        cfgmod.validate(cfg)
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
        if cfg.dry_run:
            cfg.output_dir = cfg.output_dir or cfgmod.default_output_dir(cfg)
            print("\n".join(ptq.banner(cfg, source.describe(), ptq_warnings) if cfg.ptq
                            else cfgmod.banner(cfg, source.describe(), defaulted=defaulted)))
            print("Resolved config:")
            for key, value in sorted(vars(cfg).items()):
                print(f"  {key}: {value}")
            return 0
        created_output_dir, lock = runner.prepare_output_dir(cfg, resuming=ckpt is not None)
        if cfg.ptq:
            print("\n".join(ptq.banner(cfg, source.describe(), ptq_warnings)), flush=True)
            return ptq.run(cfg, source)
        print("\n".join(cfgmod.banner(cfg, source.describe(), defaulted=defaulted)), flush=True)
        return train(cfg, source, ckpt)
    except (cfgmod.ConfigError, DataError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        if lock is not None:
            lock.release()
        if created_output_dir:  # refused before anything was written: leave no empty folder behind
            runner.remove_if_empty(cfg.output_dir)
        return 2
    finally:  # the run folder is held until the process is done with it
        if lock is not None:
            lock.release()


def _has_checkpoint(cfg) -> bool:
    """Whether the run folder holds a finished epoch (last.pt)."""
    return os.path.exists(os.path.join(cfg.output_dir, "last.pt"))


def train(cfg, source, ckpt) -> int:
    device = cfgmod.resolve_device(cfg.device)
    cpu_kernels = None
    if device.type == "cpu" and not cfgmod.is_float_run(cfg):  # load the kernels now: a failure shows before data work
        try:
            cpu_kernels = kernels.describe()
        except RuntimeError as exc:  # QATBR_KERNELS=cpp and no build
            raise cfgmod.ConfigError(str(exc)) from None
        print(f"Kernels: {cpu_kernels}", flush=True)
    workers = cfgmod.decode_workers(cfg)
    train_split = load_split(source, train=True, download=not cfg.no_download, workers=workers)
    test_split = load_split(source, train=False, download=not cfg.no_download, workers=workers)
    if len(train_split.labels) < 2:
        raise DataError(f"--data-dir: the training split has {len(train_split.labels)} image(s); at least 2 needed")
    subset = ""
    if cfg.train_subset is not None:
        subset = f" (class-balanced subset of {len(train_split.labels)}, --train-subset)"
        train_split = balanced_subset(train_split, cfg.train_subset, cfg.seed)
    print(f"Data: {len(train_split.labels)} train{subset} / {len(test_split.labels)} test images", flush=True)
    channels_last = device.type == "cuda"
    train_loader = DeviceLoader(train_split, cfg.batch_size, device, train=True, seed=cfg.seed,
                                channels_last=channels_last, drop_last=cfgmod.compile_mode(cfg) != "off")
    test_loader = DeviceLoader(test_split, cfg.eval_batch_size, device, train=False, channels_last=channels_last)
    seed_everything(cfg.seed)  # after data loading, which may draw from the global generators
    model = build_quantized_model(cfg).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    print(f"Quantized layers: {len(quantized_layers(model))}", flush=True)
    tb = None
    if cfg.tensorboard:
        from tb_logging import TensorBoardLogger
        tb = TensorBoardLogger(os.path.join(cfg.output_dir, "tensorboard"))
        tb.attach(model)
    trainer = Trainer(cfg, model, train_loader, test_loader, device, cfg.output_dir, tb=tb)
    run_config = runner.run_config(cfg, source.describe(), cpu_kernels)
    if ckpt is not None:
        trainer.load_state_dict(ckpt)
        runner.restore_logs(cfg.output_dir, ckpt)
        note = runner.backfill_tensorboard(tb, cfg.output_dir, ckpt) if tb is not None else None
        if note:
            print(note, flush=True)
        print(f"Resumed from epoch {ckpt['epoch']} of {cfg.epochs}", flush=True)
    runner.write_config(cfg, run_config)
    try:
        summary = trainer.fit(run_config)
    except NonFiniteError as exc:
        kept = (f"the last good checkpoint is {cfg.output_dir}/last.pt" if _has_checkpoint(cfg)
                else "no epoch had finished, so nothing was saved")
        print(f"error: {exc}. Stopped; {kept} (no metrics were written for the failed epoch)", file=sys.stderr)
        return 3
    except Interrupted as exc:
        if _has_checkpoint(cfg):
            print(f"\nInterrupted by {exc}; finished epochs are saved in {cfg.output_dir}/last.pt. "
                  f"Resume with: {runner.resume_command(cfg)}", file=sys.stderr)
        else:
            print(f"\nInterrupted by {exc} before the first epoch finished: nothing to resume. Start again "
                  f"with the same command and --overwrite, or with --resume auto", file=sys.stderr)
        return 128 + exc.signum
    finally:
        if tb is not None:
            tb.close()
    summary["train_subset"] = cfg.train_subset  # None: the whole training split
    atomic_write_json(summary, os.path.join(cfg.output_dir, "summary.json"))
    print(f"Done: final test top-1 {summary['final_test_acc']:.2f}%, best {summary['best_test_acc']:.2f}% "
          f"(epoch {summary['best_epoch']}), {summary['wall_time_s']:.0f}s. Results in {cfg.output_dir}")
    return 0


if __name__ == "__main__":
    sys.stdout.reconfigure(line_buffering=True)  # a log file gets each line when it is printed, not per 8 KiB
    try:
        sys.exit(main())
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
