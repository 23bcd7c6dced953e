"""Runs that fail or stop keep what they finished and say so in one line (issue 15, items 2-5 and 8):
a refused --overwrite leaves the old run intact; after any interruption and --resume the folder
holds what an uninterrupted run's holds; a failed write exits 4 naming the file; a folder without
a finished epoch counts as empty; checkpoints of the wrong shape are refused on every path."""

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from run import checkpoint
import export
from conftest import TINY, make_image_folder, run_cli, signal_in_epoch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_CONTENT = ["best.pt", "config.json", "last.pt", "metrics.jsonl", "summary.json", "timing.jsonl", "warmup_end.pt"]


def _files(folder) -> list[str]:
    return sorted(os.listdir(folder))


def _digest(folder) -> dict:
    """Every file of a folder (recursively) -> its SHA-256."""
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


def _epoch(path) -> int:
    return torch.load(path, weights_only=True)["epoch"]


def _metrics(folder) -> list[dict]:
    return [json.loads(line) for line in open(os.path.join(folder, "metrics.jsonl"))]


@pytest.fixture(scope="module")
def reference(shared_folder, tmp_path_factory):
    """An uninterrupted TINY run: epoch 1 warmup (improves: best.pt, warmup_end.pt), epoch 2 BR."""
    out = tmp_path_factory.mktemp("failref") / "run"
    assert run_cli(["--data-dir", shared_folder, "--output-dir", out, *TINY])[0] == 0
    assert _files(out) == RUN_CONTENT
    return out


def _same_run(folder, reference):
    """The folder holds what the uninterrupted run's holds: the same files, the same epochs in
    them, the same metrics and the same best epoch, whose best.pt is there."""
    assert _files(folder) == RUN_CONTENT
    for name in ("last.pt", "best.pt", "warmup_end.pt"):
        assert _epoch(folder / name) == _epoch(reference / name), name
    assert [r["test_acc"] for r in _metrics(folder)] == [r["test_acc"] for r in _metrics(reference)]
    summary = json.loads((folder / "summary.json").read_text())
    assert (summary["best_test_epoch_optimistic"]
            == json.loads((reference / "summary.json").read_text())["best_test_epoch_optimistic"])
    assert _epoch(folder / "best.pt") == summary["best_test_epoch_optimistic"]


# -- a failed write: one line, exit 4, last good last.pt, --resume continues ----------------------

def _full_disk_at(monkeypatch, name: str, nth: int):
    """Make the ``nth`` sync of ``name`` (or of its temporary file) fail as a full disk does."""
    real, seen = os.fsync, {"n": 0}

    def fsync(fd):
        base = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
        if base == name or base.startswith(f".{name}."):
            seen["n"] += 1
            if seen["n"] == nth:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


@pytest.mark.parametrize("name,nth,last_epoch", [
    ("last.pt", 2, 1),          # the checkpoint of epoch 2: epoch 1's stays
    ("best.pt", 1, 1),          # after last.pt of epoch 1: best.pt and warmup_end.pt are made again on --resume
    ("metrics.jsonl", 2, 2),    # after last.pt of epoch 2: its log line is written back on --resume
    ("summary.json", 1, 2),     # the run is trained; --resume only writes the summary
])
def test_a_failed_write_exits_4_in_one_line_and_resume_continues(name, nth, last_epoch, shared_folder, reference,
                                                                  tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        _full_disk_at(m, name, nth)
        rc, _, err = run_cli(["--data-dir", shared_folder, "--output-dir", out, *TINY], capsys)
    assert rc == 4
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert err.startswith(f"error: cannot write {out / name}: No space left on device. Stopped; finished epochs "
                          f"are saved in {out}/last.pt (epoch {last_epoch}). Make room (or fix the folder), then "
                          f"resume with: cd ")
    assert _epoch(out / "last.pt") == last_epoch  # the last good checkpoint, intact
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    rc, stdout, _ = run_cli(["--resume", "--output-dir", out], capsys)
    assert rc == 0 and f"Resumed from epoch {last_epoch} of 2" in stdout
    _same_run(out, reference)


def test_a_failed_write_before_the_first_epoch_says_start_again(shared_folder, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        _full_disk_at(m, "config.json", 1)
        rc, _, err = run_cli(["--data-dir", shared_folder, "--output-dir", out, *TINY], capsys)
    assert rc == 4 and len(err.strip().splitlines()) == 1
    assert err.startswith(f"error: cannot write {out / 'config.json'}: No space left on device. Stopped; ")
    assert "then start again with the same command" in err and "resume with" not in err
    assert not out.exists()  # it created the folder and wrote nothing: nothing left behind
    assert run_cli(["--data-dir", shared_folder, "--output-dir", out, *TINY], capsys)[0] == 0


def test_a_failed_tensorboard_write_exits_4_naming_its_folder(shared_folder, tmp_path, monkeypatch, capsys):
    from torch.utils.tensorboard import SummaryWriter

    def full(self):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    out = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(SummaryWriter, "flush", full)
        rc, _, err = run_cli(["--data-dir", shared_folder, "--output-dir", out, "--tensorboard", *TINY], capsys)
    assert rc == 4 and len(err.strip().splitlines()) == 1
    # the event file is written before the epoch's checkpoint: nothing of epoch 1 is kept
    assert err.startswith(f"error: cannot write {out / 'tensorboard'}: No space left on device. Stopped; ")
    assert not (out / "last.pt").exists()


def test_a_disk_that_fills_up_inside_torch_save_is_a_write_error(tmp_path, monkeypatch):
    """A real full disk takes part of a checkpoint, then fails: torch's zip writer then raises
    "unexpected pos" (RuntimeError) on close, hiding the OSError; it must still be a WriteError
    naming the file, the old file intact and no temporary file left."""
    path = tmp_path / "last.pt"
    torch.save({"epoch": 1}, path)
    before = path.read_bytes()
    real_fdopen = os.fdopen

    class FillsUp:  # takes 1,000 bytes, then fails as a full disk does
        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, data):
            if self.n + len(data) > 1000:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.n += len(data)
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(os, "fdopen", lambda fd, mode: FillsUp(real_fdopen(fd, mode)))
    with pytest.raises(checkpoint.WriteError) as caught:
        checkpoint.atomic_torch_save({"epoch": 2, "w": torch.zeros(10000)}, str(path))
    assert str(caught.value) == f"cannot write {path}: No space left on device"
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["last.pt"]


def test_a_full_disk_through_the_real_command_line(shared_folder, tmp_path):
    """The script run as a program, its epoch-2 checkpoint failing as on a full disk: exit status 4,
    one line on stderr, and the printed resume command finishes the run."""
    out = tmp_path / "run"
    inject = ("import errno, os, runpy, sys\n"
              "real, seen = os.fsync, []\n"
              "def fsync(fd):\n"
              "    if os.path.basename(os.readlink(f'/proc/self/fd/{fd}')).startswith('.last.pt.'):\n"
              "        seen.append(fd)\n"
              "        if len(seen) == 2:\n"
              "            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))\n"
              "    return real(fd)\n"
              "os.fsync = fsync\n"
              "sys.argv = sys.argv[1:]\n"
              "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    done = subprocess.run([sys.executable, "-c", inject, os.path.join(REPO, "cifar10_qat_br.py"), "--data-dir",
                           shared_folder, "--output-dir", out, *TINY], capture_output=True, text=True, timeout=600,
                          cwd=REPO)
    assert done.returncode == 4, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert done.stderr.startswith(f"error: cannot write {out}/last.pt: No space")
    assert _epoch(out / "last.pt") == 1
    command = done.stderr.split("resume with: ", 1)[1].strip()
    resumed = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=600, cwd="/")
    assert resumed.returncode == 0, resumed.stderr
    assert [r["epoch"] for r in _metrics(out)] == [1, 2] and (out / "summary.json").exists()


# -- the checkpoint set stays consistent ------------------------------------------------------------

def test_kill_9_between_last_pt_and_best_pt_then_resume_gives_the_full_set(shared_folder, reference, tmp_path,
                                                                           capsys):
    """A real kill -9 while best.pt of epoch 1 is being written (after last.pt): no best.pt or
    warmup_end.pt, a temporary file left behind. --resume makes the folder the uninterrupted run's."""
    out = tmp_path / "run"
    inject = ("import os, runpy, signal, sys\n"
              "real = os.fsync\n"
              "def fsync(fd):\n"
              "    if os.path.basename(os.readlink(f'/proc/self/fd/{fd}')).startswith('.best.pt.'):\n"
              "        os.kill(os.getpid(), signal.SIGKILL)\n"
              "    return real(fd)\n"
              "os.fsync = fsync\n"
              "sys.argv = sys.argv[1:]\n"
              "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    done = subprocess.run([sys.executable, "-c", inject, os.path.join(REPO, "cifar10_qat_br.py"), "--data-dir",
                           shared_folder, "--output-dir", out, *TINY], capture_output=True, text=True, timeout=600)
    assert done.returncode == -signal.SIGKILL
    left = _files(out)
    assert "best.pt" not in left and "warmup_end.pt" not in left and _epoch(out / "last.pt") == 1
    assert [f for f in left if f.startswith(".best.pt.") and f.endswith(".tmp")]  # what a kill mid-write leaves
    rc, stdout, _ = run_cli(["--resume", "--output-dir", out], capsys)
    assert rc == 0
    assert f"best.pt: written again from {out}/last.pt (epoch 1" in stdout
    assert f"warmup_end.pt: written again from {out}/last.pt (epoch 1" in stdout
    _same_run(out, reference)


def test_a_stale_best_pt_is_replaced_on_resume(shared_folder, reference, tmp_path, capsys):
    """Killed after last.pt of an improving epoch, before its best.pt: best.pt holds an older epoch."""
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    ckpt = torch.load(out / "last.pt", weights_only=True)
    ckpt["best_epoch"], ckpt["best_acc"] = 2, 101.0  # as if epoch 2 had improved...
    torch.save(ckpt, out / "last.pt")
    shutil.copyfile(out / "warmup_end.pt", out / "best.pt")  # ...and best.pt still held epoch 1 (whichever it held)
    rc, stdout, _ = run_cli(["--resume", "--output-dir", out], capsys)
    assert rc == 0 and "best.pt: written again" in stdout
    assert (out / "best.pt").read_bytes() == (out / "last.pt").read_bytes()


# -- validate before destroying --------------------------------------------------------------------

def _float_state():
    from models import build_model
    return build_model("resnet20").state_dict()


def test_a_refused_overwrite_leaves_the_old_run_intact(shared_folder, reference, tmp_path, capsys):
    out = tmp_path / "old"
    shutil.copytree(reference, out)
    before = _digest(out)
    hidden_only = make_image_folder(tmp_path / "bad_data", train_per_class=1, test_per_class=1)
    for f in os.listdir(os.path.join(hidden_only, "train", "cat")):
        os.rename(os.path.join(hidden_only, "train", "cat", f), os.path.join(hidden_only, "train", "cat", "." + f))
    misfit = tmp_path / "misfit.pt"  # the right keys, a layer short: found only when the weights are loaded
    state = _float_state()
    state.pop("linear.weight")
    torch.save({"model": state, "config": {"flags": {"arch": "resnet20"}}}, misfit)
    bad_resume = tmp_path / "bad_resume.pt"  # a checkpoint whose optimizer state does not fit the network
    ckpt = torch.load(reference / "last.pt", weights_only=True)
    ckpt["optimizer"]["param_groups"] = ckpt["optimizer"]["param_groups"][:1]
    torch.save(ckpt, bad_resume)
    attempts = {
        "flag": (["--data-dir", shared_folder, "--lr", "0", *TINY], "--lr must be"),
        "data": (["--data-dir", hidden_only, *TINY], "holds no images"),
        "pretrained": (["--data-dir", shared_folder, "--pretrained", misfit, *TINY], "does not fit"),
        "resume": (["--resume", bad_resume], "its training state cannot be restored"),
        "ptq": (["--ptq", "--pretrained", misfit, "--data-dir", shared_folder, "--no-download"], "does not fit"),
    }
    for what, (argv, message) in attempts.items():
        rc, _, err = run_cli([*argv, "--output-dir", out, "--overwrite"], capsys)
        assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, (what, err)
        assert _digest(out) == before, what


# -- a folder without a finished epoch counts as empty -----------------------------------------------

def test_a_folder_without_a_finished_epoch_counts_as_empty(shared_folder, tmp_path, capsys):
    out = tmp_path / "run"
    (out / "tensorboard").mkdir(parents=True)
    (out / "config.json").write_text("{}")  # a run stopped before its first epoch ended
    rc, _, err = run_cli(["--resume", "--output-dir", out], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert f"--resume: no checkpoint at {out}/last.pt: {out} holds a run that never finished an epoch" in err
    assert "without --resume" in err and "--resume auto" in err
    rc, _, err = run_cli(["--resume", "--output-dir", tmp_path / "nothing"], capsys)
    assert rc == 2 and f"there is no folder {tmp_path / 'nothing'}" in err
    rc, _, _ = run_cli(["--data-dir", shared_folder, "--output-dir", out, *TINY], capsys)  # no --overwrite needed
    assert rc == 0 and _files(out) == RUN_CONTENT  # the stopped run's leftovers (tensorboard/) are gone


def _wait_until_it_catches(pid: int, signum: int, timeout: float = 60.0) -> None:
    """Wait until process ``pid`` has a handler for ``signum`` (its first lines install one): a signal
    before that, while the interpreter itself starts, is the operating system's to handle."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/status") as f:
            caught = int(next(line for line in f if line.startswith("SigCgt:")).split()[1], 16)
        if caught & (1 << (signum - 1)):
            return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} installed no handler for signal {signum} in {timeout} s")


def test_a_signal_during_start_up_ends_with_one_line(shared_folder, tmp_path):
    for delay in (0.3, 1.0, 4.0):  # in numpy/torch imports (a SystemExit there aborted), later imports, data
        proc = subprocess.Popen([sys.executable, os.path.join(REPO, "cifar10_qat_br.py"), "--data-dir", shared_folder,
                                 "--output-dir", tmp_path / f"run{delay}", *TINY], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        _wait_until_it_catches(proc.pid, signal.SIGTERM)  # a loaded machine can take over a second to get there
        time.sleep(delay)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
        if proc.returncode == 0:
            continue  # finished first: nothing to check
        assert proc.returncode == 128 + signal.SIGTERM, err
        assert len(err.strip().splitlines()) == 1 and "Interrupted by SIGTERM" in err and "Traceback" not in err


# Runs the entrypoint (argv[1:]) and sends itself SIGTERM once it returned: at exit, while Python's handlers
# still run, or when an object is collected late in the teardown, after Python restored the default handlers.
_SIGNAL_AFTER_THE_RUN = """
import atexit, os, runpy, signal, sys
class SignalWhenCollected:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGTERM)
if sys.argv[1] == "at exit":
    atexit.register(os.kill, os.getpid(), signal.SIGTERM)
else:
    collected_late = SignalWhenCollected()
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("when", ["at exit", "late in the teardown"])
def test_a_signal_after_the_run_changes_nothing(when, shared_folder, tmp_path):
    proc = subprocess.run([sys.executable, "-c", _SIGNAL_AFTER_THE_RUN, when, os.path.join(REPO, "cifar10_qat_br.py"),
                           "--data-dir", shared_folder, "--output-dir", tmp_path / "run", "--dry-run", *TINY],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stderr == "", (proc.returncode, proc.stderr)  # not 143/-15, no message


# -- checkpoints of the wrong shape, on every path -----------------------------------------------------

WRONG = {
    "a list": ([1, 2], "it holds a list"),
    "no config": ({"model": {}}, "no 'config' entry"),
    "model a list": ({"model": [1.0], "config": {"flags": {}}}, "'model' is a list"),
    "model of strings": ({"model": {"conv1.weight": "x"}, "config": {}}, "'model' is a dict, not a state_dict"),
    "config a string": ({"model": {}, "config": "resnet20"}, "'config' is a str"),
    "flags a list": ({"model": {}, "config": {"flags": ["arch"]}}, "'config'/'flags' is a list"),
    "arch a number": ({"model": {}, "config": {"flags": {"arch": 20}}}, "flag 'arch' is an int (20), expected str"),
    "epoch a string": ({"model": {}, "config": {"flags": {}}, "epoch": "3"}, "'epoch' is a str"),
    "unknown optimizer": ({"model": {}, "config": {"flags": {"optimizer": "rmsprop"}}},
                          "flag 'optimizer' is 'rmsprop', expected one of sgd, adam"),
    "val_index a string": ({"model": {}, "config": {"flags": {}}, "val_index": "0 1 2"},
                           "'val_index' is a str, not a tensor"),
}


@pytest.mark.parametrize("kind", WRONG)
def test_a_checkpoint_of_the_wrong_shape_is_refused_on_every_path(kind, shared_folder, tmp_path, capsys):
    content, why = WRONG[kind]
    folder = tmp_path / "run"
    folder.mkdir()
    path = folder / "last.pt"
    torch.save(content, path)
    paths = {
        "--resume": ["--resume", "--output-dir", folder],
        "--resume PATH": ["--resume", path, "--output-dir", tmp_path / "new"],
        "--pretrained": ["--pretrained", path, "--data-dir", shared_folder, "--output-dir", tmp_path / "o", *TINY],
        "--ptq": ["--ptq", "--pretrained", path, "--data-dir", shared_folder, "--output-dir", tmp_path / "p"],
        "--evaluate": ["--evaluate", path, "--data-dir", shared_folder],
    }
    for what, argv in paths.items():
        rc, _, err = run_cli(argv, capsys)
        assert rc == 2 and len(err.strip().splitlines()) == 1, (what, err)
        assert f"{path} is not a checkpoint written by this tool (cifar10_qat_br.py)" in err, (what, err)
        assert why in err, (what, err)
    assert export.main([str(path), "--out", str(tmp_path / "export")]) == 2
    assert f"export.py: {path} is not a checkpoint written by this tool" in capsys.readouterr().err
    assert not (tmp_path / "new").exists() and not (tmp_path / "o").exists()


def test_resume_does_not_need_the_pretrained_file(shared_folder, tmp_path, monkeypatch, capsys):
    pretrained = tmp_path / "fp32.pt"
    torch.save({"model": _float_state(), "config": {"flags": {"arch": "resnet20"}}}, pretrained)
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        signal_in_epoch(m, 2, signal.SIGTERM)
        rc, _, _ = run_cli(["--data-dir", shared_folder, "--output-dir", out, "--pretrained", pretrained, *TINY],
                           capsys)
    assert rc == 128 + signal.SIGTERM
    os.remove(pretrained)
    rc, stdout, err = run_cli(["--resume", "--output-dir", out], capsys)
    assert rc == 0, err
    assert "Resumed from epoch 1 of 2" in stdout and [r["epoch"] for r in _metrics(out)] == [1, 2]


def test_a_stop_signal_during_an_evaluation_stops_the_run_there(shared_folder, tmp_path, monkeypatch, capsys):
    """SIGTERM after the last training step of the last epoch: before, the run evaluated, saved and
    finished as if no signal had come; now it stops in the evaluation, epoch 2 unsaved."""
    import engine
    real = engine.Trainer.train_epoch

    def train_epoch(self, epoch):
        out = real(self, epoch)
        if epoch == 2:
            self._stop_signal = signal.SIGTERM
        return out

    monkeypatch.setattr(engine.Trainer, "train_epoch", train_epoch)
    out = tmp_path / "run"
    rc, _, err = run_cli(["--data-dir", shared_folder, "--output-dir", out, *TINY], capsys)
    assert rc == 128 + signal.SIGTERM, err
    assert "Interrupted by SIGTERM" in err and f"{out}/last.pt (epoch 1)" in err
    assert [r["epoch"] for r in _metrics(out)] == [1] and not (out / "summary.json").exists()


def test_a_run_whose_folder_was_deleted_and_taken_writes_nothing_more(shared_folder, tmp_path, monkeypatch,
                                                                      capsys):
    """The folder removed during epoch 2 and made again by another run (its own .lock): the first run stops
    before its epoch-2 writes, which would have mixed two runs' files."""
    import engine
    from run.run_folder import RunFolderLock
    out, other = tmp_path / "run", []
    real = engine.Trainer.train_epoch

    def train_epoch(self, epoch):
        if epoch == 2:
            shutil.rmtree(out)
            os.makedirs(out)
            other.append(RunFolderLock(str(out)))
            other[0].acquire()
        return real(self, epoch)

    monkeypatch.setattr(engine.Trainer, "train_epoch", train_epoch)
    try:
        rc, _, err = run_cli(["--data-dir", shared_folder, "--output-dir", out, *TINY], capsys)
        assert rc == checkpoint.EXIT_WRITE_FAILED
        assert err == (f"error: --output-dir {out} is not this run's any more: its .lock was removed (the folder "
                       f"deleted?) or is another run's now. Stopped without writing into it\n")
        assert os.listdir(out) == [".lock"]  # the other run's, left in place
    finally:
        other[0].release()


def test_checkpoint_problem_accepts_the_tools_own_checkpoints(reference):
    for name in ("last.pt", "best.pt", "warmup_end.pt"):
        ckpt = torch.load(reference / name, weights_only=True)
        assert checkpoint.checkpoint_problem(ckpt, resumable=True) is None


def test_export_that_cannot_write_exits_4_naming_the_file(reference, tmp_path, monkeypatch, capsys):
    def full(model, steps, model_cfg, path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(export, "save_integer_model", full)
    out = tmp_path / "export"
    assert export.main([str(reference / "last.pt"), "--out", str(out)]) == 4
    err = capsys.readouterr().err
    assert err == f"error: cannot write {out / 'model_int.npz'}: No space left on device\n"


def test_plots_that_cannot_write_exit_4_naming_the_file(reference, tmp_path, monkeypatch, capsys):
    from analysis import plots
    from matplotlib.figure import Figure

    def full(self, path, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Figure, "savefig", full)
    out = tmp_path / "plots"
    assert plots.main([str(reference), "--no-activations", "--out", str(out)]) == 4
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot write {out}/") and err.endswith(".png: No space left on device\n")
    assert len(err.splitlines()) == 1
