"""torchrun / DistributedDataParallel: real `python -m torch.distributed.run` runs of 2 CPU processes (gloo).

The runs start through a small entry point written by the test (``_ENTRY``): it runs the real
``cifar10_qat_br.main`` and, where the test asks through environment variables, saves each
rank's final model state, stops rank 1 alone in an epoch (as a signal would), or gives rank 1
alone a missing --data-dir. The program's own code has no test hooks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from run import config as cfgmod
from conftest import TINY, run_cli
from run.data import DeviceLoader, Split, balanced_subset, find_source, load_split, shard
from run.distributed import Group, Launch, launch_from_environment

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_ENTRY = """
import os, signal, sys
sys.path.insert(0, {repo!r})
import torch
import cifar10_qat_br, engine

rank = int(os.environ["RANK"])
if os.environ.get("TEST_DUMP"):  # each rank's state after training
    fit = engine.Trainer.fit
    def dumping_fit(self, config):
        summary = fit(self, config)
        torch.save(self.model.state_dict(), os.path.join(os.environ["TEST_DUMP"], f"rank{{rank}}.pt"))
        return summary
    engine.Trainer.fit = dumping_fit
if os.environ.get("TEST_STOP_RANK1_IN_EPOCH") and rank == 1:  # SIGTERM reaches rank 1 only
    step = engine.Trainer.train_step
    def stopped_step(self, x, y, use_br, finite_check_at=None):
        if finite_check_at is not None and finite_check_at[0] == int(os.environ["TEST_STOP_RANK1_IN_EPOCH"]):
            self._stop_signal = signal.SIGTERM
        return step(self, x, y, use_br, finite_check_at)
    engine.Trainer.train_step = stopped_step
if os.environ.get("TEST_FULL_DISK_AT") and rank == 0:  # this file cannot be written (rank 0 writes them all)
    import errno
    fsync = os.fsync
    def full_fsync(fd):
        if os.path.basename(os.readlink(f"/proc/self/fd/{{fd}}")).startswith("." + os.environ["TEST_FULL_DISK_AT"]):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return fsync(fd)
    os.fsync = full_fsync
if os.environ.get("TEST_KILL_RANK1_IN_EPOCH") and rank == 1:  # rank 1 dies (out of memory, kill -9)
    step = engine.Trainer.train_step
    def killed_step(self, x, y, use_br, finite_check_at=None):
        if finite_check_at is not None and finite_check_at[0] == int(os.environ["TEST_KILL_RANK1_IN_EPOCH"]):
            os.kill(os.getpid(), signal.SIGKILL)
        return step(self, x, y, use_br, finite_check_at)
    engine.Trainer.train_step = killed_step
argv = sys.argv[1:]
if os.environ.get("TEST_RANK1_DATA_DIR") and rank == 1:  # this rank's machine lacks the data
    argv[argv.index("--data-dir") + 1] = os.environ["TEST_RANK1_DATA_DIR"]
sys.stdout.reconfigure(line_buffering=True)
sys.exit(cifar10_qat_br.main(argv))
"""

#: One global batch of 20 per epoch (20 images), 10 per rank.
RUN = ["--epochs", "2", "--warmup-epochs", "1", "--batch-size", "20", "--train-subset", "20", "--workers", "0",
       "--no-download", "--seed", "42", "--lambda-br-act", "1",  # both BR terms (A-BR is off by default)
       "--no-freeze-alpha"]  # α trained in stage 2 too (given, not left to the default): the ranks must agree on it


def _torchrun(tmp_path, args, **env):
    entry = tmp_path / "entry.py"
    entry.write_text(_ENTRY.format(repo=REPO))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(entry), *map(str, args)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **{k: str(v) for k, v in env.items()}})
    return proc.returncode, proc.stdout, proc.stderr


def _error_lines(text):
    return [line for line in text.splitlines() if line.startswith("error:")]


def _metrics(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


class _PerShardBatchNorm(nn.Module):
    """BatchNorm in training mode on each of ``shards`` contiguous parts of the batch apart: what each
    rank of a DDP run without --sync-bn computes on its part."""

    def __init__(self, bn: nn.BatchNorm2d, shards: int):
        super().__init__()
        self.bn, self.shards = bn, shards

    def forward(self, x):
        return torch.cat([self.bn(part) for part in x.chunk(self.shards)])


def _one_process_first_loss(data_dir: str) -> float:
    """The first step's loss of a one-process run on the same global batch, BatchNorm per shard of 10."""
    import cifar10_qat_br
    from run.seeding import seed_everything
    cfg = cfgmod.build_parser().parse_args(["--data-dir", data_dir, *RUN])
    train = balanced_subset(load_split(find_source(data_dir, download=False), train=True, workers=0), 20, 42)
    x, y = next(DeviceLoader(train, 20, torch.device("cpu"), train=True, seed=42).batches(1))
    seed_everything(42)  # as set_up does, after the data
    model = cifar10_qat_br.build_quantized_model(cfg)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.BatchNorm2d):
                setattr(module, child_name, _PerShardBatchNorm(child, 2))
    with torch.no_grad():
        return float(F.cross_entropy(model.train()(x), y))  # every α initialised from this whole batch


def test_torchrun_two_processes_train_one_run(shared_folder, tmp_path, capsys):
    run, dumps = tmp_path / "run", tmp_path / "dumps"
    dumps.mkdir()
    args = ["--data-dir", shared_folder, *RUN, "--output-dir", run]

    # Epoch 2: SIGTERM reaches rank 1 alone; both ranks stop at the same step, rank 0 says how to resume.
    rc, out, err = _torchrun(tmp_path, args, TEST_STOP_RANK1_IN_EPOCH=2)
    assert rc != 0 and [r["epoch"] for r in _metrics(run)] == [1] and not (run / "summary.json").exists()
    assert err.count("Interrupted by SIGTERM") == 1
    assert "-m torch.distributed.run --standalone --nproc-per-node 2" in err and "--resume --output-dir" in err
    assert out.count("Starting 2-Stage QAT+BR Training") == 1  # the banner, once (rank 0)
    assert "Processes: 2 (torchrun, DistributedDataParallel, backend gloo); batch 20 global = 10 per process; " \
           "BatchNorm: per-process statistics (no --sync-bn)" in out
    config = json.loads((run / "config.json").read_text())
    assert config["derived"]["world_size"] == 2 and config["derived"]["backend"] == "gloo"

    # The first step (epoch 1 is one global batch of 20): the one-process loss on that batch, with
    # BatchNorm statistics per shard of 10 (no --sync-bn on the CPU) and every α from the whole batch.
    assert _metrics(run)[0]["loss"] == pytest.approx(_one_process_first_loss(shared_folder), rel=1e-5)

    # Resumed under torchrun: it finishes, and both ranks hold the same α, weights and buffers.
    rc, out, err = _torchrun(tmp_path, ["--resume", "--output-dir", run], TEST_DUMP=dumps)
    assert rc == 0, err
    assert "Resumed from epoch 1 of 2" in out and [r["epoch"] for r in _metrics(run)] == [1, 2]
    rank0, rank1 = (torch.load(dumps / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    saved = torch.load(run / "last.pt", weights_only=True)["model"]
    assert any(k.endswith("act_quant.alpha") for k in rank0) and rank0.keys() == rank1.keys() == saved.keys()
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]) and torch.equal(rank0[key], saved[key]), key
    assert _metrics(run)[1]["alpha"] != _metrics(run)[0]["alpha"]  # they did train

    # The reported accuracy is the one-process evaluation of the same weights.
    rc, out, _ = run_cli(["--evaluate", run / "last.pt"], capsys)
    assert rc == 0 and out.startswith(f"Test top-1 {_metrics(run)[1]['test_acc']:.2f}% (20 images)")

    # Its epoch-1 checkpoint continues in one process.
    rc, out, err = run_cli(["--resume", run / "warmup_end.pt", "--output-dir", tmp_path / "one"], capsys)
    assert rc == 0, err
    assert "Resumed from epoch 1 of 2" in out and "Processes:" not in out
    assert [r["epoch"] for r in _metrics(tmp_path / "one")] == [1, 2]  # its log starts at the checkpoint's epoch


def test_bad_input_on_one_rank_ends_both_with_one_error_line(shared_folder, tmp_path):
    run = tmp_path / "run"
    rc, out, err = _torchrun(tmp_path, ["--data-dir", shared_folder, *RUN, "--output-dir", run],
                             TEST_RANK1_DATA_DIR=tmp_path / "missing")
    errors = _error_lines(out + err)
    assert rc != 0 and len(errors) == 1, out + err
    assert errors[0].startswith(f"error: rank 1 of 2 (torchrun): --data-dir {tmp_path / 'missing'}: no CIFAR-10")
    assert "exitcode  : 2 (" in err and "exitcode  : 1 (" not in err  # an error status, no crash
    assert not run.exists()  # rank 0 stopped before making the run folder


def test_a_failed_write_on_rank_0_ends_both_with_one_error_line(shared_folder, tmp_path):
    """best.pt of epoch 1 cannot be written: rank 0 exits 4 with its one line, rank 1 (in its next
    collective, which rank 0 left) exits 1 without a traceback; last.pt of epoch 1 is kept."""
    run = tmp_path / "run"
    rc, out, err = _torchrun(tmp_path, ["--data-dir", shared_folder, *RUN, "--output-dir", run],
                             TEST_FULL_DISK_AT="best.pt")
    errors = _error_lines(out + err)
    assert rc != 0 and len(errors) == 1, out + err
    assert errors[0].startswith(f"error: cannot write {run}/best.pt: No space left on device. Stopped; finished "
                                f"epochs are saved in {run}/last.pt (epoch 1).")
    assert "[rank1]: Traceback" not in err and "exitcode  : 4 (" in err
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 1


def test_a_rank_that_dies_ends_rank_0_with_one_error_line(shared_folder, tmp_path):
    run = tmp_path / "run"
    rc, out, err = _torchrun(tmp_path, ["--data-dir", shared_folder, *RUN, "--output-dir", run],
                             TEST_KILL_RANK1_IN_EPOCH=2)
    errors = _error_lines(out + err)
    assert rc != 0 and len(errors) == 1, out + err
    assert errors[0].startswith(f"error: another process of this torchrun run ended. Stopped; "
                                f"finished epochs are saved in {run}/last.pt (epoch 1). Resume with: cd ")
    assert "[rank0]: Traceback" not in err
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 1


# -- without processes ----------------------------------------------------------------------------

def test_each_rank_gets_its_part_of_every_global_batch():
    n, batch = 43, 12  # batches of 12, 12, 12, 7: the last one split 3/4 in 2, dropped in 4 (< 2 per process)
    split = Split(torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 32, 32).contiguous(),
                  torch.arange(n))
    one = list(DeviceLoader(split, batch, torch.device("cpu"), train=True, seed=3).batches(5))
    for world, batches in ((2, 4), (4, 3)):
        parts = [list(DeviceLoader(split, batch, torch.device("cpu"), train=True, seed=3, shard=(r, world))
                      .batches(5)) for r in range(world)]
        assert all(len(p) == batches for p in parts)
        for b in range(batches):
            assert torch.equal(torch.cat([p[b][0] for p in parts]), one[b][0])  # same images, same augmentation
            assert torch.equal(torch.cat([p[b][1] for p in parts]), one[b][1])
            assert {len(p[b][1]) for p in parts} <= {len(one[b][1]) // world, -(-len(one[b][1]) // world)}
    test_parts = [shard(split, r, 3) for r in range(3)]
    assert [len(p.labels) for p in test_parts] == [14, 14, 15]  # 43 = 14 + 14 + 15
    assert torch.equal(torch.cat([p.labels for p in test_parts]), split.labels)


def test_what_a_run_on_several_processes_refuses(tmp_path):
    group = Group(Launch(rank=0, world_size=4, local_rank=0, local_world_size=4))
    cpu = torch.device("cpu")

    def refusal(*argv):
        cfg = cfgmod.build_parser().parse_args(list(argv))
        with pytest.raises(cfgmod.ConfigError) as exc:
            group.check(cfg, cpu)
        return str(exc.value)

    assert refusal("--batch-size", "30") == (
        "--batch-size 30 is the global batch and must be divisible by the 4 processes of this torchrun launch "
        "(each trains on batch-size / 4 images per step); pass a multiple of 4")
    assert refusal("--sync-bn").startswith("--sync-bn: torch's SyncBatchNorm runs on GPUs only")
    assert refusal("--evaluate", "x.pt") == "--evaluate runs in one process: start it with python, not torchrun"
    group.check(cfgmod.build_parser().parse_args(["--batch-size", "32"]), cpu)  # fine

    assert launch_from_environment({}) is None and launch_from_environment({"WORLD_SIZE": "1"}) is None
    assert launch_from_environment({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}) \
        == Launch(1, 2, 1, 2)
    with pytest.raises(cfgmod.ConfigError, match="environment variable RANK must be an integer"):
        launch_from_environment({"WORLD_SIZE": "2", "LOCAL_RANK": "0"})


def test_one_process_banner_warns_that_sync_bn_does_nothing(shared_folder, capsys):
    rc, out, _ = run_cli(["--data-dir", shared_folder, *TINY, "--sync-bn", "--dry-run"], capsys)
    assert rc == 0 and "WARNING: --sync-bn has no effect in one process" in out and "Processes:" not in out
