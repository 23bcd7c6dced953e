"""Run set-up around the engine: output folder, resume, pretrained weights, config.json.

Every check here runs before any data is read or any model trained, and fails with
one line naming the flag or file.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import json
import os
import shlex
import shutil
import socket
import sys
import time

import torch

from run.checkpoint import (CheckpointError, append_jsonl, atomic_copy, atomic_torch_save, load_checkpoint,
                            load_tensors, read_jsonl, remove_temporaries, truncate_jsonl, write_jsonl, writing)
from run.config import (HISTORY_FLAGS, INVOCATION_FLAGS, RUN_FLAGS, STAGE2_FLAGS, ConfigError, br_terms_act,
                        build_parser, default_output_dir, explicit_flags, step_size_flags,
                        warmup_then_stage_two)
from run.config_json import REPO_ROOT

#: Files that make a folder "hold a run".
RUN_FILES = ("config.json", "metrics.jsonl", "timing.jsonl", "last.pt", "best.pt", "warmup_end.pt", "summary.json",
             "ptq.pt", "bn_reestimated.pt")

#: The file a running process locks in its run folder (it says which process holds it).
LOCK_FILE = ".lock"


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _abr_froze_alpha(cfg) -> dict:
    """``--freeze-alpha`` as the default of 2026-12-07 had it for this run, where it differs from today's: on
    for every run where a BR term acts, A-BR's included (today W-BR alone), after a warmup, before the last
    epoch, without ``--freeze-weight-alpha``, ``--freeze-act-alpha`` or ``--br-backprop-to-alpha-act``."""
    frozen = (br_terms_act(cfg)[1] and warmup_then_stage_two(cfg) and not step_size_flags(cfg)
              and not cfg.br_backprop_to_alpha_act)
    return {"freeze_alpha": True} if frozen else {}


#: Defaults that a run folder's name holds and that changed, newest first: (the old values for a run's
#: flags, when they held). A command that names no folder and leaves these flags out named, under the old
#: defaults, another folder.
OLD_DEFAULTS = (
    (_abr_froze_alpha, "when step sizes were frozen after warmup by default in runs with A-BR on (now they are "
                       "trained: the CPU study measured W+A stable ahead with alpha trained)"),
    (lambda cfg: {"freeze_alpha": False}, "when step sizes were trained through stage 2 by default (the seed's "
                                          "default; now runs with W-BR alone freeze them)"),
    (lambda cfg: {"lambda_br_act": 1.0, "freeze_alpha": False},
     "when A-BR was on by default (λ_a = 1, the seed's default; now 0) and step sizes were trained by default"),
)


def _flag_setting(key: str, value) -> str:
    """The flag that sets ``key`` to ``value``: ``--no-freeze-alpha``, ``--lambda-br-act 1``."""
    flag = _flag(key)
    if isinstance(value, bool):
        return flag if value else flag.replace("--", "--no-", 1)
    return f"{flag} {value:g}"


def refuse_a_run_of_an_old_default(cfg, argv: list[str]) -> None:
    """Refuse ``--resume`` (no PATH) or ``--resume auto`` that would miss a run made under an old default.

    The default folder name holds λ_a (``_lbra<λa>_``) and ``--freeze-alpha`` (``_frz``), whose defaults changed
    (``OLD_DEFAULTS``). A command without ``--output-dir`` and those flags that continued such a run now names
    another folder: ``--resume auto`` (a requeued job) would start another experiment beside the unfinished
    run, ``--resume`` would not find it. Call after ``config.resolve_freeze_alpha``. Raises ConfigError naming
    both folders and the flags that continue the run (that name it, when it finished), when an old default's
    folder holds run files and the new one none.
    """
    if cfg.resume not in ("", "auto") or cfg.output_dir or cfg.ptq:
        return
    new_dir, given = default_output_dir(cfg), explicit_flags(argv)
    if _run_files(new_dir):
        return
    for old_values, when in OLD_DEFAULTS:
        changed = {k: v for k, v in old_values(cfg).items() if k not in given and getattr(cfg, k) != v}
        old_dir = default_output_dir(argparse.Namespace(**{**vars(cfg), **changed}))
        if changed and old_dir != new_dir and _run_files(old_dir):
            flags = " ".join(_flag_setting(k, v) for k, v in changed.items())
            held, to = ("a finished run", "name it") if run_finished(old_dir) else ("one", "continue it")
            raise ConfigError(f"--resume: no run in {new_dir}, but {old_dir} holds {held}, made {when}: add {flags} "
                              f"to {to}, or --output-dir {new_dir} for a new run with today's defaults")


def resolve_auto_resume(cfg) -> str:
    """Turn ``--resume auto`` into what ``--output-dir`` needs, so that one command starts,
    continues or skips a run (a job started twice, a requeued SLURM task, a rerun sweep).

    The rules of scripts/sweep.sh: a finished run (``summary.json``) is left alone; a run
    with ``last.pt`` is resumed (``--resume``); a folder with run files but no finished
    epoch is started again (``--overwrite``: nothing finished is lost); otherwise a new run.
    ``cfg.resume`` and ``cfg.overwrite`` are set accordingly; ``--output-dir`` defaults as
    for a new run.

    Returns:
        ``finished``, ``resume``, ``restart`` or ``new``.
    """
    cfg.output_dir = cfg.output_dir or default_output_dir(cfg)
    has = {f for f in RUN_FILES if os.path.exists(os.path.join(cfg.output_dir, f))}
    cfg.resume = "" if "last.pt" in has else None  # finished: still load it, to refuse another experiment
    if run_finished(cfg.output_dir):
        return "finished"
    if "last.pt" in has:
        return "resume"
    cfg.overwrite = bool(has)
    return "restart" if has else "new"


def run_finished(output_dir: str) -> bool:
    """Whether ``output_dir`` holds a finished run (its summary.json says so)."""
    try:
        with open(os.path.join(output_dir, "summary.json")) as f:
            return json.load(f).get("status") == "finished"
    except (OSError, ValueError, AttributeError):
        return False


def resolve_resume(cfg, argv: list[str]) -> dict | None:
    """Apply ``--resume``: load the checkpoint, take the run's flags for those not given (not
    ``INVOCATION_FLAGS``; ``HISTORY_FLAGS`` always), refuse experiment flags given with another value.
    Returns the checkpoint (None without ``--resume``); raises CheckpointError, ConfigError.
    The rules in full: docs/design.md, "Run folder and PTQ rules in full"."""
    if cfg.resume is None:
        return None
    if cfg.resume:
        if cfg.output_dir is None:
            cfg.output_dir = os.path.dirname(os.path.abspath(cfg.resume))
    else:
        cfg.output_dir = cfg.output_dir or default_output_dir(cfg)
    path = resume_path(cfg)
    try:
        ckpt = load_checkpoint(path, "--resume", resumable=True)
    except CheckpointError:
        if cfg.resume or os.path.exists(path):
            raise
        raise CheckpointError(f"--resume: no checkpoint at {path}: {_why_no_last_pt(cfg.output_dir)}") from None
    saved = ckpt["config"]["flags"]
    given = explicit_flags(argv)
    differences = []
    defaults = build_parser()
    for key in HISTORY_FLAGS:
        setattr(cfg, key, saved.get(key))
    newer = given - set(saved) - RUN_FLAGS - INVOCATION_FLAGS - HISTORY_FLAGS
    for key in newer:  # a flag newer than the run: it ran with the default
        if getattr(cfg, key) != defaults.get_default(key):
            differences.append(f"{_flag(key)} {getattr(cfg, key)} (run: {defaults.get_default(key)}, the default)")
    for key, value in saved.items():
        if key in INVOCATION_FLAGS | HISTORY_FLAGS or not hasattr(cfg, key):
            continue
        if key in given and key in RUN_FLAGS:
            continue  # given now: how to run may change
        if key in given and getattr(cfg, key) != value:
            differences.append(f"{_flag(key)} {getattr(cfg, key)} (run: {value})")
        setattr(cfg, key, value)
    if differences:
        raise ConfigError(f"--resume: refusing to change the experiment of {path}: {'; '.join(differences)}")
    return ckpt


#: The logs a branched run copies from its warmup's folder, epochs 1..W.
LOG_FILES = ("metrics.jsonl", "timing.jsonl")


def branch_from_warmup(cfg) -> dict:
    """Load ``--from-warmup PATH`` (another run's ``warmup_end.pt``, epoch W) for a run that starts at
    stage 2: every experiment flag but ``STAGE2_FLAGS`` must equal the warmup's; its log rows of epochs
    1..W come under ``ckpt["warmup_logs"]``. Raises ConfigError, CheckpointError (docs/design.md, "Run folder
    and PTQ rules in full")."""
    path = cfg.from_warmup
    if cfg.ptq:
        raise ConfigError("--from-warmup trains stage 2; --ptq trains nothing: pass one")
    ckpt = load_checkpoint(path, "--from-warmup", resumable=True)
    saved = ckpt["config"]["flags"]
    warmup = saved.get("warmup_epochs")
    if ckpt["config"].get("derived", {}).get("float_run") or not warmup or ckpt["epoch"] != warmup:
        raise CheckpointError(f"--from-warmup {path}: not the end of a warmup (it is epoch {ckpt['epoch']} of a run "
                              f"with --warmup-epochs {warmup}); pass the warmup_end.pt of a quantized run")
    defaults = build_parser()
    differences = []
    for key in sorted(set(vars(cfg)) | set(saved)):
        if key in RUN_FLAGS | INVOCATION_FLAGS | HISTORY_FLAGS | STAGE2_FLAGS or key == "pretrained":
            continue
        ours = getattr(cfg, key, defaults.get_default(key))
        theirs = saved.get(key, defaults.get_default(key))
        if ours != theirs:
            differences.append(f"--{key.replace('_', '-')} {ours} (warmup: {theirs})")
    ours, theirs = cfg.pretrained, saved.get("pretrained")
    if (ours is None) != (theirs is None) or (ours and ours != theirs and os.path.isfile(theirs)
                                              and not _same_weights(ours, theirs)):
        differences.append(f"--pretrained {ours} (warmup: {theirs})")
    if differences:
        raise ConfigError(f"--from-warmup {path}: this run's stage 1 would not be the warmup's: "
                          f"{'; '.join(differences)}. Only the stage-2 flags may differ "
                          f"({', '.join(sorted('--' + k.replace('_', '-') for k in STAGE2_FLAGS))})")
    try:
        ckpt["warmup_logs"] = warmup_logs(os.path.dirname(os.path.abspath(path)), warmup)
    except CheckpointError as exc:
        raise CheckpointError(f"--from-warmup {path}: {exc}, which this run's logs start with; keep the "
                              f"warmup's logs beside its warmup_end.pt") from None
    logged = ckpt.get("log_rows", {}).get("metrics.jsonl")
    if logged is not None and logged != ckpt["warmup_logs"]["metrics.jsonl"][-1]:
        raise CheckpointError(f"--from-warmup {path}: the metrics.jsonl beside it is not this checkpoint's run "
                              f"(its epoch {warmup} row differs from the one the checkpoint holds)")
    return ckpt


def warmup_logs(folder: str, warmup: int) -> dict[str, list[dict]]:
    """The rows of epochs 1..``warmup`` of each log file (``LOG_FILES``) in a run folder: what a run
    branched from that folder's ``warmup_end.pt`` starts its logs with. Raises CheckpointError when a file
    does not hold one row for each of those epochs."""
    logs = {}
    for name in LOG_FILES:
        rows = [r for r in read_jsonl(os.path.join(folder, name)) if r.get("epoch", 0) <= warmup]
        if [r.get("epoch") for r in rows] != list(range(1, warmup + 1)):
            raise CheckpointError(f"{os.path.join(folder, name)} does not hold one row for each of epochs 1-{warmup}")
        logs[name] = rows
    return logs


def _same_weights(path: str, other: str) -> bool:
    """Whether two checkpoints hold the same model tensors (a copy without the optimizer state counts)."""
    mine, theirs = (load_checkpoint(p, "--pretrained")["model"] for p in (path, other))
    return mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def warmup_source(cfg, ckpt: dict) -> dict | None:
    """config.json's account of where a ``--from-warmup`` run's epochs 1..W come from (the warmup's
    checkpoint, its commit and its ``--pretrained``), carried over when such a run is resumed;
    None for a run that trained its own warmup."""
    if cfg.resume is not None:  # resumed: the run's own account, if it was branched
        return ckpt["config"].get("derived", {}).get("warmup_source")
    config = ckpt["config"]
    return {"checkpoint": os.path.abspath(cfg.from_warmup), "epochs": ckpt["epoch"],
            "git_commit": config.get("git_commit"), "pretrained": config["flags"].get("pretrained")}


def write_branch_start(cfg, ckpt: dict, config: dict) -> list[str]:
    """Make a branched run's folder what a run from scratch holds after its warmup (epoch W).

    ``ckpt`` is ``branch_from_warmup``'s. The logs of epochs 1..W first, then ``last.pt`` and
    ``warmup_end.pt``: the warmup's training state with this run's ``config`` (so that
    ``--resume`` continues this run, with its stage-2 flags), and ``best.pt`` of the warmup's best
    epoch the same way (from the warmup's folder when that epoch is not W). Returns the console
    lines saying what was written.

    Raises:
        WriteError: a file cannot be written.
    """
    out, warmup = cfg.output_dir, ckpt["epoch"]
    for name, rows in ckpt["warmup_logs"].items():
        write_jsonl(rows, os.path.join(out, name))
    state = {k: v for k, v in ckpt.items() if k != "warmup_logs"}
    state["config"] = config
    state["log_rows"] = {name: rows[-1] for name, rows in ckpt["warmup_logs"].items()}
    for name in ("last.pt", "warmup_end.pt"):
        atomic_torch_save(state, os.path.join(out, name))
    lines = [f"Branched from {cfg.from_warmup}: epochs 1-{warmup} (logs, last.pt, warmup_end.pt) written to {out}"]
    best = ckpt["best_epoch"]
    best_there = os.path.join(os.path.dirname(os.path.abspath(cfg.from_warmup)), "best.pt")
    if best == warmup:
        atomic_torch_save(state, os.path.join(out, "best.pt"))
    elif best >= 1 and saved_epoch(best_there) == best:
        atomic_torch_save(dict(load_tensors(best_there, "best.pt"), config=config), os.path.join(out, "best.pt"))
        lines.append(f"best.pt: copied from {best_there} (epoch {best})")
    elif best >= 1:
        lines.append(f"WARNING: best.pt of epoch {best} is missing and cannot be made again ({best_there} does "
                     f"not hold that epoch)")
    return lines


def _why_no_last_pt(out: str) -> str:
    """Why ``out`` has no last.pt to resume, for ``--resume``'s message."""
    if not os.path.isdir(out):
        return f"there is no folder {out}"
    if not _run_files(out):
        return f"{out} holds no run"
    if not holds_finished_work(out):
        return (f"{out} holds a run that never finished an epoch, so there is nothing to resume: start it again "
                f"with the same command without --resume (the folder counts as empty), or with --resume auto")
    return f"{out} holds a run without its last.pt"


def resume_path(cfg) -> str:
    """The checkpoint ``--resume`` continues from: ``--resume PATH``, or ``--output-dir``'s last.pt."""
    return cfg.resume or os.path.join(cfg.output_dir, "last.pt")


def saved_epoch(path: str) -> int | None:
    """The epoch a checkpoint file was saved after, or None (no file, not a checkpoint of this tool)."""
    if not os.path.isfile(path):
        return None
    try:
        epoch = load_tensors(path, path).get("epoch")
    except (CheckpointError, AttributeError):
        return None
    return epoch if isinstance(epoch, int) else None


def restore_checkpoint_set(cfg, ckpt: dict, quantized: bool) -> list[str]:
    """Make ``best.pt`` and ``warmup_end.pt`` in the run folder the files an uninterrupted run
    would hold after the checkpoint's epoch, before a resumed run continues.

    An epoch writes last.pt first, then best.pt (when it improved) and warmup_end.pt (the last
    warmup epoch of a quantized run): a kill or a failed write in between leaves last.pt
    holding an epoch whose best.pt / warmup_end.pt is missing or older. Each such file is
    copied from the checkpoint when it is of that epoch, else from the checkpoint's own folder
    (``--resume PATH`` into a new folder). Returns the console lines saying what was done, or
    that a file could not be found.

    Raises:
        WriteError: a copy cannot be written.
    """
    source = resume_path(cfg)
    source_dir = os.path.dirname(os.path.abspath(source))
    same_folder = os.path.samefile(source_dir, cfg.output_dir)
    wanted = {"best.pt": ckpt["best_epoch"]}
    if quantized and 0 < cfg.warmup_epochs <= ckpt["epoch"]:
        wanted["warmup_end.pt"] = cfg.warmup_epochs
    lines = []
    for name, epoch in wanted.items():
        target = os.path.join(cfg.output_dir, name)
        if epoch < 1 or saved_epoch(target) == epoch:
            continue
        elsewhere = os.path.join(source_dir, name)
        if ckpt["epoch"] == epoch:
            found = source
        elif not same_folder and saved_epoch(elsewhere) == epoch:
            found = elsewhere
        else:
            lines.append(f"WARNING: {name} of epoch {epoch} is missing and cannot be made again (neither {source} "
                         f"nor its folder holds that epoch)")
            continue
        atomic_copy(found, target)
        lines.append(f"{name}: written again from {found} (epoch {epoch}; the run had stopped before writing it)"
                     if same_folder else f"{name}: copied from {found} (epoch {epoch})")
    return lines


def resume_command(cfg, launch=None) -> str:
    """The shell command that continues this run, as printed when it is interrupted.

    It works as printed from any shell: it changes into this run's working directory
    (relative ``--data-dir`` / ``--output-dir`` paths are relative to it), names this
    interpreter, and quotes every path; every other flag comes from the run. With ``launch``
    (``distributed.Launch``, a torchrun run) it starts the same number of processes per machine
    with ``python -m torch.distributed.run`` (torchrun); on several machines, run it on each with
    your rendezvous flags.
    """
    cwd = os.getcwd()
    script = os.path.join(REPO_ROOT, "cifar10_qat_br.py")
    relative = os.path.relpath(script, cwd)
    script = script if relative.startswith(os.pardir) else relative
    launcher = (sys.executable,)
    if launch is not None:
        nodes = launch.world_size // launch.local_world_size
        launcher += ("-m", "torch.distributed.run") + (("--nnodes", str(nodes)) if nodes > 1 else ("--standalone",)) + (
            "--nproc-per-node", str(launch.local_world_size))
    return " ".join(shlex.quote(part) for part in ("cd", cwd)) + " && " + " ".join(
        shlex.quote(part) for part in (*launcher, script, "--resume", "--output-dir", cfg.output_dir))


class FolderLost(RuntimeError):
    """The run folder is not this run's any more (``RunFolderLock.check``)."""


class RunFolderLock:
    """An exclusive OS lock (``fcntl.flock``) on ``<folder>/.lock``, held for a run's lifetime.

    While one process holds it, ``acquire`` in any other process (or through another
    ``RunFolderLock`` in the same one) is refused with a ``ConfigError`` naming the holder
    (pid, host, start time). The operating system drops the lock when the holder ends,
    however it ends (``kill -9`` included), so a ``.lock`` file left behind holds nothing.
    ``release`` removes the file while still holding it (so that no process can be holding
    a removed file) and then unlocks. On a file system without locks ``acquire`` prints a
    warning and the run goes on unprotected.
    """

    def __init__(self, folder: str):
        self.folder = folder
        self.path = os.path.join(folder, LOCK_FILE)
        self._fd = None

    def acquire(self) -> None:
        """Take the lock. Raises ``ConfigError`` naming the holder when another run has it."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                holder = os.read(fd, 4096).decode(errors="replace").strip() or "a process that has not said which"
                os.close(fd)
                if exc.errno in (errno.EAGAIN, errno.EACCES):
                    raise ConfigError(f"--output-dir {self.folder} is in use by another run ({holder}); wait "
                                      f"for it to end or choose another --output-dir") from None
                print(f"WARNING: cannot lock --output-dir {self.folder} ({exc.strerror}): this file system has "
                      f"no locks, so a second run started in this folder would not be refused", file=sys.stderr)
                return
            try:  # the holder before us may have removed the file between our open and our lock: retry
                if os.path.samestat(os.stat(self.path), os.fstat(fd)):
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        try:
            with writing(self.path):
                os.ftruncate(fd, 0)
                os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, started "
                             f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n".encode())
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def _holds_the_file(self) -> bool:
        """Whether the folder's ``.lock`` is still the file this lock holds (not removed, nor replaced)."""
        try:
            return os.path.samestat(os.fstat(self._fd), os.stat(self.path))
        except FileNotFoundError:
            return False

    def check(self) -> None:
        """Before a write: raise ``FolderLost`` when the folder's ``.lock`` is not the file this lock holds
        any more (the folder was removed while the run went on, and maybe made again by another run), so
        that this run never writes into another's folder. Nothing to check when not held."""
        if self._fd is None or self._holds_the_file():
            return
        raise FolderLost(f"--output-dir {self.folder} is not this run's any more: its {LOCK_FILE} was removed (the "
                         f"folder deleted?) or is another run's now. Stopped without writing into it")

    def release(self) -> None:
        """Remove the lock file and unlock (nothing to do when not held). A lock file that is not
        this one any more (the folder was deleted and a new run made its own) is left alone."""
        if self._fd is None:
            return
        if self._holds_the_file():
            try:
                os.unlink(self.path)
            except FileNotFoundError:  # removed since
                pass
        os.close(self._fd)
        self._fd = None


def _run_files(folder: str) -> list[str]:
    """The files of a run in ``folder`` (``RUN_FILES`` and ``tensorboard/``)."""
    return ([f for f in RUN_FILES if os.path.exists(os.path.join(folder, f))]
            + (["tensorboard/"] if os.path.isdir(os.path.join(folder, "tensorboard")) else []))


#: Files that hold finished work (an epoch, a PTQ result).
FINISHED_FILES = ("last.pt", "best.pt", "warmup_end.pt", "summary.json", "ptq.pt")


def holds_finished_work(folder: str) -> bool:
    """Whether ``folder`` holds a finished epoch or result (``FINISHED_FILES``, or a logged epoch).

    A folder without any (only ``config.json`` or an empty ``tensorboard/``: a run stopped before
    its first epoch ended) counts as empty: a new run may start there without ``--overwrite``.
    """
    return (any(os.path.exists(os.path.join(folder, f)) for f in FINISHED_FILES)
            or any(read_jsonl(os.path.join(folder, f)) for f in ("metrics.jsonl", "timing.jsonl")))


def prepare_output_dir(cfg, resuming: bool) -> tuple[bool, RunFolderLock, list[str]]:
    """Create ``--output-dir`` (default: under results/), lock it (``RunFolderLock``), check it: it may
    hold only the resumed run, or one without finished work, unless ``--overwrite``. Returns (created,
    the held lock, the old run's files for ``replace_old_run``); raises ConfigError (docs/design.md, "Run folder
    and PTQ rules in full")."""
    cfg.output_dir = cfg.output_dir or default_output_dir(cfg)
    out = cfg.output_dir
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"--output-dir {out} is a file, not a folder")
    created = not os.path.exists(out)
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--output-dir {out}: cannot create it ({exc.strerror})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise ConfigError(f"--output-dir {out} is not writable")
    lock = RunFolderLock(out)
    lock.acquire()
    try:
        own_run = resuming and (not cfg.resume or os.path.samefile(os.path.dirname(os.path.abspath(cfg.resume)), out))
        existing = _run_files(out)
        if own_run and cfg.overwrite:
            raise ConfigError("--resume and --overwrite contradict each other: pass one")
        if own_run or not existing:
            return created, lock, []
        if not cfg.overwrite and holds_finished_work(out):
            hint = (f"--resume {cfg.resume} continues that checkpoint in a new or empty folder; pass --overwrite "
                    f"to replace the run there" if resuming else
                    "pass --resume to continue it or --overwrite to replace it")
            raise ConfigError(f"--output-dir {out} already holds a{'nother' if resuming else ''} run "
                              f"({', '.join(existing)}); {hint}")
    except BaseException:
        lock.release()
        raise
    return created, lock, existing


def replace_old_run(output_dir: str, old_files: list[str]) -> None:
    """Remove the files of the run being replaced (``prepare_output_dir``), and the temporary files of
    a process killed while writing; called once every check of the new run has passed, before its
    first write, so that a refused run leaves the old one intact.

    Raises:
        WriteError: a file cannot be removed.
    """
    for f in old_files:
        path = os.path.join(output_dir, f.rstrip("/"))
        with writing(path):
            if f == "tensorboard/":
                shutil.rmtree(path)
            else:
                os.remove(path)
    remove_temporaries(output_dir, RUN_FILES)


def remove_if_empty(folder: str) -> None:
    """Remove ``folder`` if it exists and is empty (a run refused before writing anything)."""
    try:
        os.rmdir(folder)
    except OSError:  # not empty, or already gone
        pass


def restore_logs(output_dir: str, ckpt: dict) -> None:
    """Make the logs end at the checkpoint's epoch before a resumed run appends to them.

    Drops lines of epochs after it (work the checkpoint does not contain) and appends the
    checkpoint's own rows when the run was killed after writing the checkpoint but before
    its log lines.
    """
    epoch = ckpt["epoch"]
    for name in ("metrics.jsonl", "timing.jsonl"):
        path = os.path.join(output_dir, name)
        if os.path.exists(path):
            truncate_jsonl(path, lambda row: row.get("epoch", 0) <= epoch)
        row = ckpt.get("log_rows", {}).get(name)
        if row is not None and not any(r.get("epoch") == epoch for r in read_jsonl(path)):
            append_jsonl(row, path)


def backfill_tensorboard(tb, output_dir: str, ckpt: dict) -> str | None:
    """Write the scalars of the finished epochs to TensorBoard when the run did not log them.

    A run first started without ``--tensorboard`` and resumed with it would otherwise show
    only its later epochs. Returns a line for the console, or None when nothing was written.
    """
    if ckpt["config"]["flags"].get("tensorboard"):
        return None
    rows = [r for r in read_jsonl(os.path.join(output_dir, "metrics.jsonl")) if r.get("epoch", 0) <= ckpt["epoch"]]
    for row in rows:
        tb.log_scalars(row)
    if not rows:
        return None
    return (f"TensorBoard: the run was not logged before; epochs {rows[0]['epoch']}-{rows[-1]['epoch']} written "
            f"from metrics.jsonl (scalars only: their histograms were never recorded)")


def _continued_by(ckpt: dict, cfg) -> str:
    """The flag through which this run continues ``ckpt``: ``--from-warmup PATH`` for a branch
    (``branch_from_warmup`` gives it ``warmup_logs``), else ``--resume``."""
    return f"--from-warmup {cfg.from_warmup}" if "warmup_logs" in ckpt else "--resume"


def check_val_split(ckpt: dict, val_index, cfg) -> None:
    """Refuse to continue a run whose held-out images (the checkpoint's ``val_index``) are not the
    ones ``--val-split`` holds out now (``val_index``: int64 indices, or None without a split):
    the model would have trained on images that now validate it.

    Raises:
        CheckpointError: the indices differ (e.g. ``--data-dir`` now points at a copy whose
            images are in another order), or only one side has a split.
    """
    saved = ckpt.get("val_index")
    if saved is None and val_index is None:
        return
    if saved is None or val_index is None or not torch.equal(saved.cpu(), val_index.cpu()):
        raise CheckpointError(f"{_continued_by(ckpt, cfg)}: the {cfg.val_split} validation images drawn now "
                              f"(--val-split, --seed {cfg.seed}, from --data-dir {cfg.data_dir}) are not the ones "
                              f"the run held out; is --data-dir another copy, its images in another order? "
                              f"Continue with the run's data")


def check_training_images(ckpt: dict, images_per_epoch: int, digest: str, cfg) -> None:
    """Refuse to continue a run (or branch from a warmup) on another training set. ``images_per_epoch``,
    what an epoch of this run would train on (``DeviceLoader.images_per_epoch``), must be what the
    checkpoint's last epoch trained on (its timing row's ``train_images``), and ``digest``, the
    ``Split.label_digest()`` of the images this run would train on, the one in the checkpoint's config
    (``derived.train_labels_sha256``); a checkpoint without log rows, or without a digest (written before
    the digest was recorded), is not checked for that. ``--data-dir`` is not compared: the same data may
    lie elsewhere on another machine; other data (a subset, another data set, torchvision's binary copy
    of CIFAR-10 against an image folder, an image folder with other counts per class) is what this
    catches. The pixels are not compared (see ``Split.label_digest``).

    Raises:
        CheckpointError: the numbers or the digests differ."""
    trained = ckpt.get("log_rows", {}).get("timing.jsonl", {}).get("train_images")
    flags = f"--data-dir {cfg.data_dir}, --train-subset {cfg.train_subset}, --val-split {cfg.val_split}"
    if trained is not None and trained != images_per_epoch:
        raise CheckpointError(f"{_continued_by(ckpt, cfg)}: the run trained on {trained} images per epoch, this one "
                              f"would train on {images_per_epoch} ({flags}); is --data-dir another data set? "
                              f"Continue with the run's data")
    saved = ckpt["config"].get("derived", {}).get("train_labels_sha256")
    if saved is not None and saved != digest:
        raise CheckpointError(f"{_continued_by(ckpt, cfg)}: the run's training images had other labels, or came in "
                              f"another order, than this one's ({flags}): "
                              f"SHA-256 of the labels in order {saved[:12]}..., now {digest[:12]}...; is --data-dir "
                              f"another copy of the data (torchvision's binary copy and an image folder hold the "
                              f"images in different orders)? "
                              f"Continue with the run's data")
