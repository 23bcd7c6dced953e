#!/usr/bin/env python
"""Two-stage QAT of a CIFAR-10 ResNet with LSQ and Bin Regularization.

    python cifar10_qat_br.py --num-bits 32 --epochs 200 --warmup-epochs 0 --lambda-br 0 --lambda-br-act 0
    python cifar10_qat_br.py --pretrained results/resnet20_fp32_s42/last.pt --num-bits 2
    torchrun --nproc-per-node 4 cifar10_qat_br.py --batch-size 512 --num-bits 2   # one run, 4 processes (DDP)

Under torchrun the processes train one run with DistributedDataParallel; distributed.py says how
it is shared (data, α, BR, BatchNorm, evaluation) and how the ranks agree on errors and stops.

Exit status: 0 finished (also: ``--resume auto`` found the run finished); 2 bad flag, data or checkpoint;
3 non-finite values; 4 an output file could not be written (disk full, ...: the last good last.pt is kept);
128+signal when interrupted, at any moment (finished epochs are kept; the message says how to resume), until the
run has returned (a signal then changes nothing); under torchrun, 1 when another process of the run ended
(``distributed.lost_rank``). Each failure prints one ``error:`` line.
"""

from __future__ import annotations

import os
import signal
import sys


def _interrupted_while_importing(signum, _frame):
    print(f"Interrupted by {signal.Signals(signum).name} during start-up: nothing was written", file=sys.stderr,
          flush=True)
    # os._exit, not sys.exit: a SystemExit raised inside an import (numpy's, torch's) leaves half-imported
    # modules whose teardown then fails (measured: a RecursionError traceback, or an abort); nothing is written yet
    os._exit(128 + signum)


if __name__ == "__main__":  # the imports take seconds: a signal then ends with one line too (main() takes over)
    for _signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(_signum, _interrupted_while_importing)

import torch  # noqa: E402

from run import config  # noqa: E402
from run import banner as run_banner  # noqa: E402
from run import distributed  # noqa: E402
from run import run_folder  # noqa: E402
from run.checkpoint import (EXIT_WRITE_FAILED, CheckpointError, WriteError, atomic_write_json,  # noqa: E402
                            check_pretrained, load_checkpoint, load_pretrained)
from run import config_json  # noqa: E402
from run.data import DataError, DeviceLoader, find_source, load_split, shard, training_images  # noqa: E402
from run.seeding import seed_everything  # noqa: E402
from engine import Interrupted, NonFiniteError, Trainer, build_recipe  # noqa: E402
from models import build_model  # noqa: E402
from quant import kernels, quantize_model, quantized_layers  # noqa: E402


#: What ``--resume auto`` does, by ``run_folder.resolve_auto_resume``'s answer.
AUTO_ACTIONS = {"resume": "continuing the run from last.pt",
                "restart": "starting the run again (it never finished an epoch)",
                "new": "starting a new run"}


#: Exit status of a non-finite loss or parameter.
EXIT_NON_FINITE = 3

#: Exit status of a rank whose collective failed because another rank ended (torchrun).
EXIT_LOST_RANK = 1


def build_quantized_model(cfg, pretrained: bool = True) -> torch.nn.Module:
    """The float model (with --pretrained weights unless ``pretrained`` is false: a resumed run's
    checkpoint holds its weights), converted to LSQ fake quantization."""
    model = build_model(cfg.arch, clip_value=cfg.clip_value)
    if cfg.pretrained and pretrained:
        load_pretrained(model, cfg)
    return quantize_model(model, config.weight_bits(cfg), config.act_bits(cfg), config.first_last_bits(cfg),
                          per_channel_weights=cfg.per_channel_weights, act_quant_at=cfg.act_quant_at)


def _raise_interrupted(signum, _frame):
    raise Interrupted(signum)


def main(argv: list[str] | None = None) -> int:
    """Run the command; under torchrun (``WORLD_SIZE`` > 1) every rank runs it (distributed.py).

    The set-up runs in two stages, each ended by ``distributed.agreement``: bad input on any
    rank then ends every rank with exit status 2 and one ``error:`` line (rank 0's).
    """
    argv = sys.argv[1:] if argv is None else argv
    cfg = config.build_parser().parse_args(argv)
    created_output_dir, lock, group = False, None, None
    # SIGINT/SIGTERM stop the start-up at once (Trainer.fit stops its loop at the next step instead)
    previous = {s: signal.signal(s, _raise_interrupted) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        group = distributed.start()  # None: one process
        with distributed.agreement(group):  # stage 1: flags, the resumed checkpoint, the data folder
            if cfg.evaluate is not None and group is None:  # no training, no output folder (torchrun: refused below)
                from deploy.evaluate import evaluate_checkpoint
                return evaluate_checkpoint(cfg, argv)
            # --resume PATH may replace another run (run_folder.prepare_output_dir)
            if cfg.resume == "" and cfg.overwrite:
                raise config.ConfigError("--resume and --overwrite contradict each other: pass one")
            if cfg.from_warmup and cfg.resume not in (None, "auto"):
                raise config.ConfigError("--from-warmup starts a new run from a warmup and --resume continues a run: "
                                         "pass one (or --resume auto: it continues the run if there is one, else "
                                         "branches)")
            freeze_defaulted = config.resolve_freeze_alpha(cfg)  # before the folder name, which holds it
            run_folder.refuse_a_run_of_an_old_default(cfg, argv)
            auto = run_folder.resolve_auto_resume(cfg) if cfg.resume == "auto" else None
            ckpt = run_folder.resolve_resume(cfg, argv)  # first: flags not given come from the run
            defaulted = config.resolve_defaults(cfg)
            if ckpt is None and "lambda_br_act" not in config.explicit_flags(argv):
                defaulted.add("lambda_br_act")  # off by default, unlike the seed: the banner says so
            if ckpt is None and freeze_defaulted:
                defaulted.add("freeze_alpha")  # on with W-BR alone by default, unlike the seed: the banner says so
            config.validate(cfg)
            if cfg.from_warmup and ckpt is None:  # after the defaults: the warmup's flags are resolved ones
                ckpt = run_folder.branch_from_warmup(cfg)
            if group is not None:  # after --resume, which may take --batch-size, --device, --sync-bn from the run
                group.check(cfg, config.resolve_device(cfg.device))
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
                check_pretrained(load_checkpoint(cfg.pretrained, "--pretrained"), cfg)
            source = find_source(cfg.data_dir, download=not cfg.no_download)
            processes = group.describe(cfg, config.resolve_device(cfg.device)) if group is not None else ""
            if cfg.dry_run:
                cfg.output_dir = cfg.output_dir or config.default_output_dir(cfg)
                print("\n".join(ptq.banner(cfg, source.describe(), ptq_warnings) if cfg.ptq
                                else run_banner.banner(cfg, source.describe(), defaulted=defaulted,
                                                       processes=processes)))
                print("Resolved config:")
                for key, value in sorted(vars(cfg).items()):
                    print(f"  {key}: {value}")
                return 0
        with distributed.agreement(group):  # stage 2: the run folder (rank 0), the data, the model
            old_run = []  # the files of the run this one replaces, removed once every check has passed
            if distributed.is_main(group):
                created_output_dir, lock, old_run = run_folder.prepare_output_dir(cfg, resuming=cfg.resume is not None)
            if cfg.ptq:
                print("\n".join(ptq.banner(cfg, source.describe(), ptq_warnings)), flush=True)
                return ptq.run(cfg, source, lambda: run_folder.replace_old_run(cfg.output_dir, old_run))
            print("\n".join(run_banner.banner(cfg, source.describe(), defaulted=defaulted, processes=processes)),
                  flush=True)
            trainer, run_config = set_up(cfg, source, ckpt, group)
            if lock is not None:
                trainer.check_folder = lock.check
        return train(cfg, trainer, run_config, ckpt, old_run, group)
    except (config.ConfigError, DataError, CheckpointError) as exc:
        if distributed.is_main(group):  # every rank has the same error (distributed.agreement)
            print(f"error: {exc}", file=sys.stderr)
        return 2
    except run_folder.FolderLost as exc:  # rank 0 only; what the folder holds now is not this run's to report
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_WRITE_FAILED
    except WriteError as exc:  # rank 0 only: the other ranks are ended by torchrun
        print(f"error: {exc}. Stopped; {_kept_and_next_step(cfg, group, 'Make room (or fix the folder)')}",
              file=sys.stderr)
        return EXIT_WRITE_FAILED
    except NonFiniteError as exc:  # every rank at the same step (Trainer._agree_on_step)
        if distributed.is_main(group):
            print(f"error: {exc}. Stopped (no metrics were written for the failed epoch); "
                  f"{_kept_and_next_step(cfg, group)}", file=sys.stderr)
        return EXIT_NON_FINITE
    except Interrupted as exc:
        if distributed.is_main(group):
            print(f"\nInterrupted by {exc}; {_kept_and_next_step(cfg, group)}", file=sys.stderr)
        return 128 + exc.signum
    except RuntimeError as exc:  # under torchrun: a collective failed because another rank ended
        # torchrun now ends this process too (SIGTERM): ignore it first (SIGTERM first, no call before),
        # so that its handler cannot raise while the line below is printed
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if group is None or not distributed.lost_rank(exc):
            raise
        if group.is_main:  # another rank died (killed, out of memory); else rank 0 ended and said why
            print(f"error: another process of this torchrun run ended. Stopped; "
                  f"{_kept_and_next_step(cfg, group)}", file=sys.stderr)
        return EXIT_LOST_RANK
    finally:  # the run folder is held until the process is done with it
        for s, handler in previous.items():
            signal.signal(s, handler)
        if lock is not None:
            lock.release()
        if created_output_dir:  # refused or stopped before anything was written: leave no empty folder behind
            run_folder.remove_if_empty(cfg.output_dir)
        if group is not None:
            group.close()


def _kept_and_next_step(cfg, group=None, fix: str = "") -> str:
    """What a stopped run kept and how to go on, for its one error line (``fix``: what to do first)."""
    epoch = run_folder.saved_epoch(os.path.join(cfg.output_dir, "last.pt")) if cfg.output_dir else None
    resume, again = (f"{fix}, then resume", f"{fix}, then start again") if fix else ("Resume", "Start again")
    if epoch is not None:
        return (f"finished epochs are saved in {cfg.output_dir}/last.pt (epoch {epoch}). "
                f"{resume} with: {run_folder.resume_command(cfg, group.launch if group is not None else None)}")
    if cfg.output_dir is None or not os.path.isdir(cfg.output_dir):
        return f"nothing was written. {again} with the same command"
    if cfg.ptq:
        return f"no PTQ result was saved. {again} with the same command"
    return (f"stopped before the first epoch finished: nothing to resume. {again} with the same command (a folder "
            f"without a finished epoch counts as empty), or with --resume auto")


def load_cpu_kernels(cfg, device) -> str | None:
    """Load the fused CPU kernels of a quantized run on the CPU now, so that a failure shows before any data
    work; prints and returns their description (None: not used).

    Raises:
        ConfigError: ``QATBR_KERNELS=cpp`` and they cannot be built.
    """
    if device.type != "cpu" or config.is_float_run(cfg):
        return None
    try:
        cpu_kernels = kernels.describe()
    except RuntimeError as exc:
        raise config.ConfigError(str(exc)) from None
    if cfg.per_channel_weights:  # the kernels take one α: per-channel weight quantizers run the PyTorch ops
        cpu_kernels += "; weights per channel: PyTorch ops"
    print(f"Kernels: {cpu_kernels}", flush=True)
    return cpu_kernels


def data_loaders(cfg, source, device, ckpt, group=None, channels_last=False):
    """The training, test and validation loaders (the validation one None without ``--val-split``), each
    this rank's shard under torchrun, batches in channels-last layout with ``channels_last``; prints the
    split sizes.

    Returns:
        ((train, test, val) loaders, the validation split or None, its indices into the training set or None,
        the training images' ``Split.label_digest()``).

    Raises:
        DataError: the data; CheckpointError: ``ckpt`` was made with another validation split or training set.
    """
    is_main = distributed.is_main(group)
    workers = config.decode_workers(cfg)
    train_split, val_split, val_index, available = training_images(source, cfg, workers, write_cache=is_main)
    test_split = load_split(source, train=False, download=not cfg.no_download, workers=workers, write_cache=is_main)
    subset = f" (class-balanced subset of {available}, --train-subset)" if cfg.train_subset is not None else ""
    held_out = f" / {len(val_split.labels)} validation (held out, --val-split)" if val_split is not None else ""
    print(f"Data: {len(train_split.labels)} train{subset}{held_out} / {len(test_split.labels)} test images",
          flush=True)
    rank, world_size = (group.rank, group.world_size) if group is not None else (0, 1)
    train_loader = DeviceLoader(train_split, cfg.batch_size, device, train=True, seed=cfg.seed,
                                channels_last=channels_last, drop_last=config.compile_mode(cfg) != "off",
                                shard=(rank, world_size))

    def evaluation_loader(split):
        return DeviceLoader(shard(split, rank, world_size), cfg.eval_batch_size, device, train=False,
                            channels_last=channels_last)

    val_loader = evaluation_loader(val_split) if val_split is not None else None
    if cfg.bn_reestimate > len(train_loader) and is_main:  # said now, not after the last epoch
        print(f"WARNING: --bn-reestimate {cfg.bn_reestimate}: an epoch has {len(train_loader)} training batches; "
              f"the re-estimation after the last epoch uses those {len(train_loader)}", flush=True)
    digest = train_split.label_digest()
    if ckpt is not None:  # before any training: a continued run trains on the data it trained on
        run_folder.check_val_split(ckpt, val_index, cfg)
        run_folder.check_training_images(ckpt, train_loader.images_per_epoch(), digest, cfg)
    return (train_loader, evaluation_loader(test_split), val_loader), val_split, val_index, digest


def set_up(cfg, source, ckpt, group=None):
    """The data, the model and its ``Trainer`` (restored from ``ckpt`` when resuming). Under
    torchrun (``group``) every rank builds its own, from its shards of the data. Writes nothing
    in the run folder, and runs no collectives (it runs inside ``distributed.agreement``).

    Returns:
        (trainer, the content of config.json).

    Raises:
        ConfigError, DataError, CheckpointError: the kernels, the data or ``--pretrained``.
    """
    device = config.resolve_device(cfg.device)
    if group is not None:
        device = group.device(device)
    cpu_kernels = load_cpu_kernels(cfg, device)
    channels_last = device.type == "cuda"  # the model's layout and its batches' must agree
    (train_loader, test_loader, val_loader), val_split, val_index, digest = data_loaders(cfg, source, device, ckpt,
                                                                                         group, channels_last)
    seed_everything(cfg.seed)  # after data loading, which may draw from the global generators
    model = build_quantized_model(cfg, pretrained=ckpt is None)
    if group is not None:
        model = group.prepare(model, cfg.sync_bn)
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    print(f"Quantized layers: {len(quantized_layers(model))}", flush=True)
    recipe = build_recipe(cfg, model)  # optimizer, LR schedule, regularizers, compile
    trainer = Trainer(cfg, model, train_loader, test_loader, device,
                      cfg.output_dir if distributed.is_main(group) else None,
                      val_loader=val_loader, val_index=val_index, group=group, recipe=recipe)
    world_size, backend = (group.world_size, group.backend(device)) if group is not None else (1, None)
    run_config = config_json.run_config(cfg, source.describe(), cpu_kernels, val_split, world_size, backend,
                                            train_digest=digest)
    if ckpt is not None:
        run_config["derived"]["warmup_source"] = run_folder.warmup_source(cfg, ckpt)
        try:
            trainer.load_state_dict(ckpt)
        except (KeyError, IndexError, RuntimeError, ValueError, TypeError) as exc:
            flag = (f"--resume {run_folder.resume_path(cfg)}" if cfg.resume is not None
                    else f"--from-warmup {cfg.from_warmup}")
            raise CheckpointError(f"{flag}: its training state cannot be restored "
                                  f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    return trainer, run_config


def open_run_files(cfg, trainer, run_config: dict, ckpt, old_run: list[str]) -> None:
    """Start writing the run folder once every check has passed: the old run this one replaces
    (``old_run``, ``run_folder.prepare_output_dir``) removed, TensorBoard attached to the trainer, the
    checkpoint set and the logs restored to the resumed epoch, config.json.

    Raises:
        WriteError: a file cannot be written.
    """
    run_folder.replace_old_run(cfg.output_dir, old_run)
    if cfg.tensorboard:
        from run.tensorboard_log import TensorBoardLogger
        trainer.tb = TensorBoardLogger(os.path.join(cfg.output_dir, "tensorboard"))
        trainer.tb.attach(trainer.model)
    if ckpt is not None and cfg.resume is None:  # --from-warmup: a new run, complete up to the warmup's end
        for line in run_folder.write_branch_start(cfg, ckpt, run_config):
            print(line, flush=True)
        if trainer.tb is not None:
            for row in ckpt["warmup_logs"]["metrics.jsonl"]:
                trainer.tb.log_scalars(row)
    elif ckpt is not None:
        for line in run_folder.restore_checkpoint_set(cfg, ckpt, quantized=bool(trainer.layers)):
            print(line, flush=True)
        run_folder.restore_logs(cfg.output_dir, ckpt)
        note = run_folder.backfill_tensorboard(trainer.tb, cfg.output_dir, ckpt) if trainer.tb is not None else None
        if note:
            print(note, flush=True)
    config_json.write_config(cfg, run_config)


def train(cfg, trainer, run_config: dict, ckpt, old_run: list[str], group=None) -> int:
    """Train from ``set_up``'s trainer to the end; only rank 0 writes the run folder
    (``open_run_files``, the trainer's checkpoints and logs, summary.json).

    Returns 0 (finished).

    Raises:
        WriteError, NonFiniteError, Interrupted: the run stopped (finished epochs are in last.pt).
        FolderLost: the run folder is not this run's any more (nothing more written).
    """
    is_main = distributed.is_main(group)
    if is_main:
        open_run_files(cfg, trainer, run_config, ckpt, old_run)
    if ckpt is not None:
        print(f"{'Resumed' if cfg.resume is not None else 'Branched'} from epoch {ckpt['epoch']} of {cfg.epochs}",
              flush=True)
    try:
        summary = trainer.fit(run_config)
    finally:
        if trainer.tb is not None:
            trainer.tb.close()
    if not is_main:
        return 0
    summary["train_subset"] = cfg.train_subset  # None: the whole training split
    trainer.check_folder()
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
    finally:  # the work is done and the exit status decided: a signal from here on changes neither
        # (the teardown takes a second with torch loaded; it first restores the default handlers, so a SIGTERM
        # then ended a finished run with "killed by SIGTERM", and before that with the start-up message)
        for _signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(_signum, signal.SIG_IGN)
