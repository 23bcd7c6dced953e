#!/usr/bin/env python
"""Two-stage QAT of a CIFAR-10 ResNet with LSQ and Bin Regularization.

    python cifar10_qat_br.py --num-bits 32 --epochs 200 --warmup-epochs 0 --lambda-br 0 --lambda-br-act 0
    python cifar10_qat_br.py --pretrained results/resnet20_fp32_s42/best.pt --num-bits 2

Exit status: 0 finished; 2 bad flag, data or checkpoint; 3 non-finite values;
128+signal when interrupted (finished epochs are kept; the message says how to resume).
"""

from __future__ import annotations

import os
import sys

import torch

import config as cfgmod
import runner
from checkpoint import CheckpointError, atomic_write_json
from data import DataError, DeviceLoader, find_source, load_split
from engine import Interrupted, NonFiniteError, Trainer, seed_everything
from models import build_model
from quant import kernels, quantize_model, quantized_layers


def build_quantized_model(cfg) -> torch.nn.Module:
    """The float model (with --pretrained weights), converted to LSQ fake quantization."""
    model = build_model(cfg.arch, clip_value=cfg.clip_value)
    if cfg.pretrained:
        runner.load_pretrained(model, cfg)
    return quantize_model(model, cfgmod.weight_bits(cfg), cfgmod.act_bits(cfg), cfgmod.first_last_bits(cfg))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cfg = cfgmod.build_parser().parse_args(argv)
    created_output_dir = False
    try:
        if cfg.evaluate is not None:  # no training, no output folder
            from deploy.evaluate import evaluate_checkpoint
            return evaluate_checkpoint(cfg, argv)
        if cfg.resume is not None and cfg.overwrite:
            raise cfgmod.ConfigError("--resume and --overwrite contradict each other: pass one")
        ckpt = runner.resolve_resume(cfg, argv)  # first: flags not given come from the run
        cfgmod.validate(cfg)
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
                            else cfgmod.banner(cfg, source.describe())))
            print("Resolved config:")
            for key, value in sorted(vars(cfg).items()):
                print(f"  {key}: {value}")
            return 0
        created_output_dir = runner.prepare_output_dir(cfg, resuming=ckpt is not None)
        if cfg.ptq:
            print("\n".join(ptq.banner(cfg, source.describe(), ptq_warnings)), flush=True)
            return ptq.run(cfg, source)
        print("\n".join(cfgmod.banner(cfg, source.describe())), flush=True)
        return train(cfg, source, ckpt)
    except (cfgmod.ConfigError, DataError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        if created_output_dir:  # refused before anything was written: leave no empty folder behind
            runner.remove_if_empty(cfg.output_dir)
        return 2


def train(cfg, source, ckpt) -> int:
    device = cfgmod.resolve_device(cfg.device)
    cpu_kernels = None
    if device.type == "cpu" and not cfgmod.is_float_run(cfg):  # load the kernels now: a failure shows before data work
        try:
            cpu_kernels = kernels.describe()
        except RuntimeError as exc:  # QATBR_KERNELS=cpp and no build
            raise cfgmod.ConfigError(str(exc)) from None
        print(f"Kernels: {cpu_kernels}", flush=True)
    train_split = load_split(source, train=True, download=not cfg.no_download, workers=cfg.workers)
    test_split = load_split(source, train=False, download=not cfg.no_download, workers=cfg.workers)
    if len(train_split.labels) < 2:
        raise DataError(f"--data-dir: the training split has {len(train_split.labels)} image(s); at least 2 needed")
    print(f"Data: {len(train_split.labels)} train / {len(test_split.labels)} test images", flush=True)
    channels_last = device.type == "cuda"
    train_loader = DeviceLoader(train_split, cfg.batch_size, device, train=True, seed=cfg.seed,
                                channels_last=channels_last)
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
        print(f"Resumed from epoch {ckpt['epoch']} of {cfg.epochs}", flush=True)
    runner.write_config(cfg, run_config)
    resume_hint = f"python cifar10_qat_br.py --resume --output-dir {cfg.output_dir}"
    try:
        summary = trainer.fit(run_config)
    except NonFiniteError as exc:
        print(f"error: {exc}. Stopped; the last good checkpoint is {cfg.output_dir}/last.pt "
              f"(no metrics were written for the failed epoch)", file=sys.stderr)
        return 3
    except Interrupted as exc:
        print(f"\nInterrupted by {exc}; finished epochs are saved in {cfg.output_dir}/last.pt. "
              f"Resume with: {resume_hint}", file=sys.stderr)
        return 128 + exc.signum
    finally:
        if tb is not None:
            tb.close()
    atomic_write_json(summary, os.path.join(cfg.output_dir, "summary.json"))
    print(f"Done: final test top-1 {summary['final_test_acc']:.2f}%, best {summary['best_test_acc']:.2f}% "
          f"(epoch {summary['best_epoch']}), {summary['wall_time_s']:.0f}s. Results in {cfg.output_dir}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
