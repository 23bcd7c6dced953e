"""One run on several processes: ``torchrun`` and ``DistributedDataParallel`` (DDP).

``torchrun --nproc-per-node N cifar10_qat_br.py [flags]`` starts N copies of the script; each
finds its place in torchrun's environment variables (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``,
``LOCAL_WORLD_SIZE``). With ``WORLD_SIZE`` above 1 the processes train one run together; a plain
``python cifar10_qat_br.py`` (or ``WORLD_SIZE=1``) is the one-process run, untouched by this module.
The one-process run is the specification; the N-process run differs from it only where said here:

* Data: every global batch of ``--batch-size`` images (the one-process batch, same order, same
  augmentation) is split into N contiguous shards, one per rank (``data.DeviceLoader``'s
  ``shard``), so that the ranks' shards of an epoch make up the one-process epoch. The ragged
  last batch is dropped when it has fewer than 2 images per rank (one process: fewer than 2).
  ``--batch-size`` must be divisible by N.
* Gradients: DDP averages them over the ranks. Each rank's loss is the mean over its shard, so
  for equal shards the averaged gradient is that of the global batch's mean loss (BatchNorm aside).
* BatchNorm: by default each rank normalises with its own shard's statistics (DDP's usual
  behaviour), and the running statistics are rank 0's (DDP broadcasts rank 0's buffers before
  every forward pass; they are broadcast again before every evaluation). ``--sync-bn`` converts
  BatchNorm to ``torch.nn.SyncBatchNorm`` (statistics of the global batch); torch runs it on GPUs
  only, so it is refused on the CPU.
* Step sizes α (LSQ section 2.1: ``α = 2·mean|x|/sqrt(Qp)``): an activation quantizer is
  initialised from the global first batch: the ranks' sums of ``|x|`` and element counts are
  all-reduced (``LSQQuantizer.init_reduce``), so every rank sets the same α, the one of the
  global batch's mean (up to the order of summation). A weight quantizer's input, the weights,
  is the same on every rank already. (Initialising α per rank from its own shard gives each rank
  another α, which DDP never reconciles: a known cause of worse DDP QAT accuracy.)
* Bin Regularization: each rank computes BR_w and BR_a from its own values (the weights, which are
  the same everywhere, and its shard's pre-quantization activations), inside its local loss
  ``CE + λ_w·BR_w + λ_a·BR_a``; DDP averages the gradient of that loss over the ranks like the
  cross-entropy's. The run therefore minimises the mean over ranks of each shard's BR_a, which is
  not BR_a of the global batch (BR's per-bin means and variances are not additive over shards).
  The logged losses are means over steps and ranks; the BR statistics (``br_*_info``) are rank 0's.
* Evaluation: the test set is split in N contiguous shards and the correct counts summed, with
  rank 0's BatchNorm statistics on every rank: the number a one-process evaluation of the same
  weights gives (in eval mode a sample's prediction does not depend on the others).
* Output: only rank 0 prints (the other ranks' stdout goes to ``os.devnull``) and writes files
  (checkpoints, logs, TensorBoard, ``config.json``, the folder lock, the decoded-data cache). Every
  rank reads ``--resume``'s checkpoint and the data itself, so on several machines they must be
  on a shared file system.
* Failures: bad input found while setting up (a flag, the data, a checkpoint, on any rank) ends
  every rank: each stage of the set-up ends with ``agreement``, which raises the first rank's
  error on every rank, and rank 0 prints it as one ``error:`` line (exit status 2). During
  training the ranks agree, at every checked step (every step on the CPU, every
  ``engine.CUDA_CHECK_EVERY`` on CUDA), on a non-finite loss and on a stop signal, so that all
  stop at the same step (``Trainer._agree_on_step``). A failed write (rank 0's alone: it writes
  every file) ends rank 0 with its one ``error:`` line (exit status 4); the other ranks, whose
  next collective then fails, exit quietly with status 1 (``lost_rank``), no traceback. A rank
  that dies (killed, out of memory) ends rank 0 with one line saying so and what is kept (status 1).
* ``torch.compile``: ``--compile auto`` does not compile under DDP (on CUDA it would use CUDA
  graphs, which are untested with DDP here); an explicit ``--compile MODE`` compiles the local
  step, DDP's own graph splitting included (untested: no GPU here). The fused C++ CPU kernels
  run inside each rank's forward and backward pass as in one process (tested).
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from run.checkpoint import CheckpointError
from run.config import ConfigError, torchrun_world_size
from run.data import DataError
from quant import step_size_quantizers

#: The environment variables torchrun sets for each process.
ENV_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE")

#: Errors of bad input: a rank that meets one ends the stage of the set-up, and every rank with it.
INPUT_ERRORS = (ConfigError, DataError, CheckpointError)


#: How gloo's collectives fail when another process of the group has ended.
_LOST_PEER = ("Connection closed by peer", "Connection reset by peer")


def lost_rank(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective that failed because another rank ended (gloo's messages):
    rank 0 ends alone on a failed write, which only it sees; any rank may be killed."""
    return isinstance(exc, RuntimeError) and any(text in str(exc) for text in _LOST_PEER)


@dataclass(frozen=True)
class Launch:
    """Where this process is in a torchrun launch: ``rank`` of ``world_size`` processes, the
    ``local_rank`` of ``local_world_size`` on this machine."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int


def launch_from_environment(environ=os.environ) -> Launch | None:
    """This process's place in a torchrun launch, or None for a one-process run.

    None when ``WORLD_SIZE`` is unset or 1 (``torchrun --nproc-per-node 1`` is a one-process run).

    Raises:
        ConfigError: torchrun's variables are not integers, or out of range.
    """
    if torchrun_world_size(environ) == 1:
        return None
    values = {}
    for name in ENV_VARS:
        raw = environ.get(name, "1" if name == "LOCAL_WORLD_SIZE" else None)
        try:
            values[name] = int(raw)
        except (TypeError, ValueError):
            raise ConfigError(f"environment variable {name} must be an integer (torchrun sets it), got {raw!r}; "
                              f"start several processes with torchrun --nproc-per-node N") from None
    launch = Launch(values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"], values["LOCAL_WORLD_SIZE"])
    if not (0 <= launch.rank < launch.world_size and 0 <= launch.local_rank < launch.local_world_size):
        raise ConfigError(f"torchrun's environment is inconsistent: RANK {launch.rank} of WORLD_SIZE "
                          f"{launch.world_size}, LOCAL_RANK {launch.local_rank} of LOCAL_WORLD_SIZE "
                          f"{launch.local_world_size}")
    return launch


def is_main(group: "Group | None") -> bool:
    """Whether this process prints and writes the run's files: one process, or rank 0 of a group."""
    return group is None or group.is_main


def start() -> "Group | None":
    """Join the process group of a torchrun launch (None outside one).

    The group runs gloo for CPU tensors and, where CUDA is available, NCCL for CUDA tensors.
    Every rank but 0 stops printing: its stdout goes to ``os.devnull`` and its Python warnings
    are ignored (rank 0 prints the same lines).

    Raises:
        ConfigError: torchrun's variables are malformed, or the group cannot be formed.
    """
    launch = launch_from_environment()
    if launch is None:
        return None
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    try:
        dist.init_process_group(backend, rank=launch.rank, world_size=launch.world_size)
    except (RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"torchrun: rank {launch.rank} cannot join the process group ({first})") from None
    if launch.rank != 0:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the rest of the process
        warnings.simplefilter("ignore")
    return Group(launch)


@contextlib.contextmanager
def agreement(group: "Group | None"):
    """Run a stage of the set-up on every rank, and end it on every rank alike.

    When the block raises one of ``INPUT_ERRORS`` on any rank, it raises on every rank: the
    rank's own error, or a ``ConfigError`` naming the first rank that failed and its message (so
    that rank 0, which prints, says what went wrong elsewhere). The block must not run
    collectives itself: a rank that fails would skip them and leave the others waiting.
    Without a group (one process) this is a plain block.
    """
    if group is None:
        yield
        return
    error = None
    try:
        yield
    except INPUT_ERRORS as exc:
        error = exc
    messages = [None] * group.world_size
    dist.all_gather_object(messages, None if error is None else str(error))
    if error is not None:
        raise error
    failed = [(rank, message) for rank, message in enumerate(messages) if message is not None]
    if failed:
        rank, message = failed[0]
        raise ConfigError(f"rank {rank} of {group.world_size} (torchrun): {message}")


class Group:
    """The ranks of one run, after ``start``: the collectives the training uses.

    Attributes:
        launch: this process's ``Launch``; ``rank``, ``world_size``, ``is_main`` (rank 0).
    """

    def __init__(self, launch: Launch):
        self.launch = launch
        self.rank, self.world_size = launch.rank, launch.world_size
        self.is_main = launch.rank == 0

    def close(self) -> None:
        """Leave the process group (at the end of the process)."""
        if dist.is_initialized():
            dist.destroy_process_group()

    # -- checks and set-up (no collectives) ---------------------------------------------------
    def check(self, cfg, device: torch.device) -> None:
        """Refuse what a run on several processes cannot do (before any work).

        Raises:
            ConfigError: ``--batch-size`` not divisible by the world size; ``--evaluate`` or
                ``--ptq`` (one process does those); ``--device cuda:N`` (each rank takes the GPU
                of its local rank); fewer GPUs than processes on this machine; ``--sync-bn`` on
                the CPU.
        """
        n = self.world_size
        if cfg.evaluate is not None or cfg.ptq:
            flag = "--evaluate" if cfg.evaluate is not None else "--ptq"
            raise ConfigError(f"{flag} runs in one process: start it with python, not torchrun")
        if cfg.batch_size % n:
            raise ConfigError(f"--batch-size {cfg.batch_size} is the global batch and must be divisible by the "
                              f"{n} processes of this torchrun launch (each trains on batch-size / {n} images per "
                              f"step); pass a multiple of {n}")
        if device.type == "cuda":
            if cfg.device not in ("auto", "cuda"):
                raise ConfigError(f"--device {cfg.device}: under torchrun each process uses the GPU of its local "
                                  f"rank (cuda:LOCAL_RANK); pass --device cuda or auto")
            if self.launch.local_world_size > torch.cuda.device_count():
                raise ConfigError(f"torchrun started {self.launch.local_world_size} processes on this machine, "
                                  f"but it has {torch.cuda.device_count()} GPU(s): one process per GPU")
        elif cfg.sync_bn:
            raise ConfigError("--sync-bn: torch's SyncBatchNorm runs on GPUs only; on the CPU each process "
                              "normalises with its own shard's statistics (drop --sync-bn)")

    def device(self, device: torch.device) -> torch.device:
        """This rank's device: ``cuda:LOCAL_RANK`` (made current) when ``device`` is CUDA, else ``device``."""
        if device.type != "cuda":
            return device
        device = torch.device("cuda", self.launch.local_rank)
        torch.cuda.set_device(device)
        return device

    def backend(self, device: torch.device) -> str:
        """The backend of the training's collectives on ``device``."""
        return "nccl" if device.type == "cuda" else "gloo"

    def describe(self, cfg, device: torch.device) -> str:
        """The banner's line about the processes."""
        sync = ("--sync-bn: SyncBatchNorm, statistics of the global batch" if cfg.sync_bn
                else "per-process statistics (no --sync-bn)")
        return (f"Processes: {self.world_size} (torchrun, DistributedDataParallel, backend "
                f"{self.backend(device)}); batch {cfg.batch_size} global = {cfg.batch_size // self.world_size} "
                f"per process; BatchNorm: {sync}")

    def prepare(self, model: nn.Module, sync_bn: bool) -> nn.Module:
        """Ready a model for the group, before it is moved to its device and wrapped.

        Converts BatchNorm to ``torch.nn.SyncBatchNorm`` with ``sync_bn``, and makes every
        activation quantizer initialise α from the global batch (``LSQQuantizer.init_reduce``).
        Returns the model (a new object where BatchNorm was converted; same state_dict keys).
        """
        if sync_bn:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        for quantizer in step_size_quantizers(model).values():
            if quantizer.grad_count == "per_sample":  # activations differ between ranks, weights do not
                quantizer.init_reduce = self.sum_init_statistic
        return model

    # -- collectives (every rank, in the same order) --------------------------------------------
    def wrap(self, model: nn.Module, device: torch.device) -> nn.parallel.DistributedDataParallel:
        """``model`` in ``DistributedDataParallel`` (which broadcasts rank 0's parameters and buffers).

        DDP reduces the gradients of the parameters that require one when it is built: build it
        again whenever that set changes (``Trainer`` does, when step sizes are frozen).
        """
        return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the ranks, in place; returns it."""
        dist.all_reduce(tensor)
        return tensor

    def sum_init_statistic(self, abs_sum: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The sums over the ranks of a quantizer's ``Σ|x|`` (a scalar tensor) and ``count``, in float64
        (a count of 2^24 elements or more is not exact in float32)."""
        sums = torch.stack([abs_sum.double(), torch.tensor(float(count), dtype=torch.float64,
                                                            device=abs_sum.device)])
        dist.all_reduce(sums)
        return sums[0], sums[1]

    def broadcast_buffers(self, model: nn.Module) -> None:
        """Give every rank rank 0's buffers (BatchNorm's running statistics)."""
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)

    def agree_on_step(self, non_finite: torch.Tensor, signal_number: int | None) -> tuple[list[int], int]:
        """Tell every rank which ranks had a non-finite loss and whether any was asked to stop.

        Args:
            non_finite: bool scalar tensor, this rank's loss is NaN/inf.
            signal_number: the stop signal this rank received, or None.

        Returns:
            (the ranks with a non-finite loss, the largest signal number received by any rank or 0).
        """
        flags = torch.zeros(self.world_size + 1, device=non_finite.device)
        flags[self.rank] = non_finite.float()
        flags[-1] = signal_number or 0
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        values = flags.tolist()
        return [rank for rank in range(self.world_size) if values[rank]], int(values[-1])
