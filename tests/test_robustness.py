"""Runs that survive: exact resume, atomic outputs, one clear line for every bad input, numerical safety."""

import gc
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
from conftest import TINY, make_image_folder, run_cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
THREE = ["--epochs", "3", "--warmup-epochs", "1", "--batch-size", "16", "--workers", "0", "--no-download",
         "--lambda-br-act", "1", "--no-freeze-alpha"]  # both BR terms (A-BR is off by default) and α trained in
# stage 2 (the default with A-BR on, given so as not to depend on it): their state resumes too


def _metrics_text(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return f.read()


@pytest.fixture(scope="module")
def reference_run(shared_folder, tmp_path_factory):
    """An uninterrupted 3-epoch run (1 warmup, 2 BR)."""
    out = tmp_path_factory.mktemp("ref") / "run"
    assert run_cli(["--data-dir", shared_folder, "--output-dir", out, *THREE]) == (0, "", "")
    return out


def test_same_seed_same_metrics(shared_folder, reference_run, tmp_path):
    out = tmp_path / "again"
    assert run_cli(["--data-dir", shared_folder, "--output-dir", out, *THREE])[0] == 0
    assert _metrics_text(out) == _metrics_text(reference_run)


@pytest.mark.parametrize("crash_in", ["checkpoint", "log"])
def test_crash_while_saving_an_epoch_resumes_bit_identically(crash_in, shared_folder, reference_run, tmp_path,
                                                             monkeypatch, capsys):
    """A crash while epoch 2 is saved: in its checkpoint (nothing of epoch 2 kept) or after
    the checkpoint, before its log lines (the resume writes them back from the checkpoint)."""
    import engine
    out = tmp_path / "crashed"
    name, real = ("atomic_torch_save", engine.atomic_torch_save) if crash_in == "checkpoint" else \
        ("append_jsonl", engine.append_jsonl)

    def crash_on_second_epoch(obj, path):
        if obj["epoch"] == 2 and path.endswith("last.pt" if crash_in == "checkpoint" else "metrics.jsonl"):
            raise KeyboardInterrupt(f"simulated crash in the {crash_in} of epoch 2")
        real(obj, path)

    monkeypatch.setattr(engine, name, crash_on_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        run_cli(["--data-dir", shared_folder, "--output-dir", out, *THREE])
    assert len(_metrics_text(out).splitlines()) == 1  # epoch 2 not logged either way
    monkeypatch.setattr(engine, name, real)
    rc, stdout, _ = run_cli(["--resume", "--output-dir", out, "--data-dir", shared_folder, "--workers", "0"], capsys)
    done = 1 if crash_in == "checkpoint" else 2
    assert rc == 0 and f"Resumed from epoch {done} of 3" in stdout
    assert _metrics_text(out) == _metrics_text(reference_run)
    ref = json.loads((reference_run / "summary.json").read_text())
    got = json.loads((out / "summary.json").read_text())
    assert got["final_test_acc"] == ref["final_test_acc"]
    assert got["best_test_acc_optimistic"] == ref["best_test_acc_optimistic"]


def _spawn(args):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, os.path.join(REPO, "cifar10_qat_br.py"), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)


def _wait_for_lines(path, n, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(path) and len(open(path).read().splitlines()) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended early: {proc.communicate()}")
        time.sleep(0.02)
    raise AssertionError("timed out waiting for metrics")


@pytest.fixture(scope="module")
def bigger_folder(tmp_path_factory):
    """Enough images for epochs that last a moment, so a signal lands mid-epoch."""
    return make_image_folder(tmp_path_factory.mktemp("cifar_big"), train_per_class=16, test_per_class=2)


def _run_subprocess(args):
    proc = _spawn(args)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr
    return stdout


@pytest.fixture(scope="module")
def bigger_reference(bigger_folder, tmp_path_factory):
    """The uninterrupted run, in a process of its own like the interrupted ones.

    Bit-identity is promised between runs of the tool (fresh processes); a run inside
    the test process can differ in the last bits after other tests ran there.
    """
    out = tmp_path_factory.mktemp("bigref") / "run"
    _run_subprocess(["--data-dir", bigger_folder, "--output-dir", out, *THREE])
    return out


def test_kill_9_mid_run_then_resume_is_bit_identical(bigger_folder, bigger_reference, tmp_path):
    out = tmp_path / "killed"
    proc = _spawn(["--data-dir", bigger_folder, "--output-dir", out, *THREE])
    _wait_for_lines(out / "metrics.jsonl", 1, proc)
    time.sleep(0.3)  # somewhere inside epoch 2
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stdout = _run_subprocess(["--resume", "--output-dir", out, "--data-dir", bigger_folder, "--workers", "0"])
    assert "Resumed from epoch" in stdout
    assert _metrics_text(out) == _metrics_text(bigger_reference)


def test_sigint_stops_saves_and_says_how_to_resume(bigger_folder, bigger_reference, tmp_path):
    out = tmp_path / "sigint"
    proc = _spawn(["--data-dir", bigger_folder, "--output-dir", out, *THREE])
    _wait_for_lines(out / "metrics.jsonl", 1, proc)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal arrived")
    assert proc.returncode == 128 + signal.SIGINT
    assert "Resume with: cd " in stderr and "cifar10_qat_br.py --resume --output-dir" in stderr
    assert "Traceback" not in stderr
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] >= 1
    _run_subprocess(["--resume", "--output-dir", out, "--data-dir", bigger_folder, "--workers", "0"])
    assert _metrics_text(out) == _metrics_text(bigger_reference)


def test_resume_refuses_changed_experiment_but_allows_run_flags(shared_folder, reference_run, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(reference_run, out)
    rc, _, err = run_cli(["--resume", "--output-dir", out, "--data-dir", shared_folder, "--lambda-br", "0.5",
                          "--epochs", "5"], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "--lambda-br 0.5 (run: 1.0)" in err and "--epochs 5 (run: 3)" in err
    rc, out_text, _ = run_cli(["--resume", "--output-dir", out, "--data-dir", shared_folder, "--workers", "1",
                               "--device", "cpu"], capsys)
    assert rc == 0  # a finished run: nothing left to train
    assert "Resumed from epoch 3 of 3" in out_text


def test_existing_run_is_refused_without_resume_or_overwrite(shared_folder, reference_run, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(reference_run, out)
    rc, _, err = run_cli(["--data-dir", shared_folder, "--output-dir", out, *THREE], capsys)
    assert rc == 2 and "already holds a run" in err and "--resume" in err and "--overwrite" in err
    rc, _, _ = run_cli(["--data-dir", shared_folder, "--output-dir", out, "--overwrite", *TINY], capsys)
    assert rc == 0
    assert len(_metrics_text(out).splitlines()) == 2


# -- a run folder belongs to one run -------------------------------------------------------------

def test_a_folder_held_by_another_process_is_refused_naming_it(shared_folder, tmp_path, capsys):
    from run import run_folder
    out = tmp_path / "held"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from run import run_folder; "
                               "run_folder.RunFolderLock(sys.argv[1]).acquire(); print('held', flush=True); "
                               "time.sleep(600)", str(out)],
                              cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        for extra in ([], ["--overwrite"]):
            rc, _, err = run_cli(["--data-dir", shared_folder, "--output-dir", out, *TINY, *extra], capsys)
            assert rc == 2 and len(err.strip().splitlines()) == 1
            assert f"--output-dir {out} is in use by another run (pid {holder.pid} on " in err
        assert os.listdir(out) == [".lock"]  # nothing written, the holder's lock file untouched
    finally:
        holder.kill()  # kill -9: the OS drops the lock with the process
        holder.wait()
    lock = run_folder.RunFolderLock(str(out))
    lock.acquire()  # free now, although the dead holder's file is still there
    second = run_folder.RunFolderLock(str(out))
    with pytest.raises(run_folder.ConfigError, match=f"in use by another run \\(pid {os.getpid()} on "):
        second.acquire()  # a second lock in the same process is refused too
    lock.release()
    assert os.listdir(out) == []  # released: the lock file is gone
    second.acquire()
    second.release()


def test_releasing_a_lock_leaves_another_runs_lock_file_alone(tmp_path):
    from run import run_folder
    old = run_folder.RunFolderLock(str(tmp_path))
    old.acquire()
    os.unlink(tmp_path / ".lock")  # the folder was emptied (rm -rf) while the old run still held it,
    new = run_folder.RunFolderLock(str(tmp_path))  # and a new run took its own lock there
    new.acquire()
    old.release()  # the old run ends
    assert os.listdir(tmp_path) == [".lock"]  # the new run's lock file is still there,
    with pytest.raises(run_folder.ConfigError, match="in use by another run"):
        run_folder.RunFolderLock(str(tmp_path)).acquire()  # and still refuses a third run
    new.release()
    assert os.listdir(tmp_path) == []


def test_a_file_system_without_locks_warns_and_runs(tmp_path, monkeypatch, capsys):
    import errno
    from run import run_folder

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(run_folder.fcntl, "flock", no_locks)
    run_folder.RunFolderLock(str(tmp_path)).acquire()
    assert "WARNING: cannot lock --output-dir" in capsys.readouterr().err


def test_resume_writes_only_into_its_own_new_or_empty_folder(shared_folder, reference_run, tmp_path, capsys):
    checkpoint_path = reference_run / "last.pt"
    other = tmp_path / "other"
    shutil.copytree(reference_run, other)  # a folder that holds another run
    before = _metrics_text(other)
    resume = ["--resume", checkpoint_path, "--data-dir", shared_folder, "--workers", "0"]
    rc, _, err = run_cli([*resume, "--output-dir", other], capsys)
    assert rc == 2 and f"--output-dir {other} already holds another run" in err and "--overwrite" in err
    assert _metrics_text(other) == before
    for folder, extra in ((tmp_path / "new", []), (other, ["--overwrite"])):
        rc, stdout, _ = run_cli([*resume, "--output-dir", folder, *extra], capsys)
        assert rc == 0 and "Resumed from epoch 3 of 3" in stdout
        # the new folder's log starts with the checkpoint's epoch (earlier ones stay in the run it came from)
        assert _metrics_text(folder) == _metrics_text(reference_run).splitlines(keepends=True)[-1]
        # best.pt and warmup_end.pt come along from the checkpoint's folder: summary.json names a best.pt that is there
        for name in ("best.pt", "warmup_end.pt"):
            assert (folder / name).read_bytes() == (reference_run / name).read_bytes()
        assert not (folder / ".lock").exists()
    own = tmp_path / "own"
    shutil.copytree(reference_run, own)
    rc, _, err = run_cli(["--resume", own / "last.pt", "--overwrite", "--data-dir", shared_folder], capsys)
    assert rc == 2 and "--resume and --overwrite contradict each other" in err
    assert _metrics_text(own) == _metrics_text(reference_run)


def test_atomic_write_keeps_the_previous_file_on_a_crash(tmp_path, monkeypatch):
    path = str(tmp_path / "last.pt")
    checkpoint.atomic_torch_save({"epoch": 1}, path)

    def torn_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.torch, "save", torn_save)
    with pytest.raises(OSError):
        checkpoint.atomic_torch_save({"epoch": 2}, path)
    monkeypatch.undo()
    assert torch.load(path)["epoch"] == 1
    assert os.listdir(tmp_path) == ["last.pt"]  # no temporary file left behind


# -- bad input: one line, non-zero exit, before any work --------------------------------------

BAD_FLAGS = [
    (["--num-bits", "9"], "--num-bits must be 1-8, or 32"),
    (["--num-bits", "0"], "--num-bits must be 1-8, or 32"),
    (["--num-bits-weight", "16"], "--num-bits-weight must be 1-8, or 32"),
    (["--num-bits-act", "0"], "--num-bits-act must be 1-8, or 32"),
    (["--first-last-bits", "12"], "--first-last-bits must be 2-8, or 32"),
    (["--first-last-bits", "1"], "--first-last-bits must be 2-8, or 32"),
    (["--lambda-br", "-1"], "--lambda-br must be a finite number >= 0"),
    (["--lambda-br-act", "nan"], "--lambda-br-act must be a finite number"),
    (["--lambda-br", "inf"], "--lambda-br must be a finite number"),
    (["--lr", "0"], "--lr must be a finite number > 0"),
    (["--lr", "nan"], "--lr must be a finite number"),
    (["--weight-decay", "-0.1"], "--weight-decay must be a finite number >= 0"),
    (["--weight-decay", "inf"], "--weight-decay must be a finite number"),
    (["--epochs", "0"], "--epochs must be >= 1"),
    (["--epochs", "5", "--warmup-epochs", "6"], "--warmup-epochs must be between 0 and --epochs (5)"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--clip-value", "0"], "--clip-value must be a finite number > 0"),
    (["--clip-value", "-2"], "--clip-value must be a finite number > 0"),
    (["--arch", "resnet99"], "--arch must be one of resnet20, resnet32, resnet56, resnet18"),
    (["--device", "tpu"], "--device must be auto, cpu, cuda or cuda:N"),
    (["--momentum", "1"], "--momentum must be a number in [0, 1), got 1.0"),
    (["--momentum", "-0.1"], "--momentum must be a number in [0, 1), got -0.1"),
    (["--momentum", "nan"], "--momentum must be a number in [0, 1)"),
    (["--seed", "-1"], "--seed must be an integer in 0..4294967295 (numpy's seed range), got -1"),
    (["--seed", "4294967296"], "--seed must be an integer in 0..4294967295 (numpy's seed range), got 4294967296"),
]


@pytest.mark.parametrize("flags,message", BAD_FLAGS)
def test_bad_flags_give_one_line(flags, message, tmp_path, capsys):
    out = tmp_path / "out"
    rc, _, err = run_cli(["--data-dir", tmp_path / "nodata", "--no-download", "--output-dir", out, *flags], capsys)
    assert rc == 2
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()  # nothing was created


@pytest.mark.parametrize("flags,message", [(["--seed", "-1"], "--seed must be"),
                                           (["--momentum", "1.5"], "--momentum must be")])
def test_dry_run_checks_the_same_flags(flags, message, capsys):
    rc, out, err = run_cli(["--dry-run", "--data-dir", "/nonexistent", *flags], capsys)
    assert rc == 2 and message in err and out == ""


def test_extreme_valid_seed_and_momentum_are_accepted(capsys):
    rc, out, _ = run_cli(["--dry-run", "--data-dir", "/nonexistent", "--seed", str(2**32 - 1), "--momentum", "0"],
                         capsys)
    assert rc == 0 and "seed 4294967295" in out


def test_more_workers_than_cpus_are_capped_with_a_warning(capsys):
    from run import banner, config
    cpus = len(os.sched_getaffinity(0))
    rc, out, _ = run_cli(["--dry-run", "--data-dir", "/nonexistent", "--workers", str(cpus + 61)], capsys)
    assert rc == 0
    assert f"WARNING: --workers {cpus + 61} is more than the {cpus} CPUs this process may use: {cpus} are used" in out
    cfg = config.build_parser().parse_args(["--workers", str(cpus + 61)])
    assert config.decode_workers(cfg) == cpus
    cfg.workers = cpus
    config.resolve_defaults(cfg)
    assert config.decode_workers(cfg) == cpus and not any("--workers" in w for w in banner.warnings_for(cfg))


@pytest.mark.parametrize("flag", ["--num-bits", "--epochs", "--lambda-br"])
def test_non_numeric_values_are_refused_by_argparse(flag, capsys):
    with pytest.raises(SystemExit) as exc:
        run_cli([flag, "2.5x"])
    assert exc.value.code == 2
    assert flag in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_gpu(tmp_path, capsys):
    rc, _, err = run_cli(["--device", "cuda", "--data-dir", tmp_path], capsys)
    assert rc == 2 and "no CUDA GPU is available" in err


def _bad_data(tmp_path, capsys, folder):
    rc, _, err = run_cli(["--data-dir", folder, "--no-download", "--output-dir", tmp_path / "o", *TINY], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not os.path.exists(tmp_path / "o")  # a refused run leaves no empty output folder
    return err


def test_missing_data_dir_with_no_download(tmp_path, capsys):
    err = _bad_data(tmp_path, capsys, tmp_path / "missing")
    assert "--data-dir" in err and "no CIFAR-10 found" in err


def test_image_folder_problems(tmp_path, capsys):
    root = make_image_folder(tmp_path / "c", train_per_class=1, test_per_class=1)
    os.rename(os.path.join(root, "train", "truck"), os.path.join(root, "train", "lorry"))
    err = _bad_data(tmp_path, capsys, root)
    assert "wrong class folders" in err and "truck" in err and "lorry" in err
    os.rename(os.path.join(root, "train", "lorry"), os.path.join(root, "train", "truck"))
    shutil.rmtree(os.path.join(root, "test"))
    assert "missing split folder" in _bad_data(tmp_path, capsys, root)
    make_image_folder(root, train_per_class=1, test_per_class=1)
    for f in os.listdir(os.path.join(root, "test", "cat")):
        os.remove(os.path.join(root, "test", "cat", f))
    assert "is empty" in _bad_data(tmp_path, capsys, root)
    make_image_folder(root, train_per_class=1, test_per_class=1)
    with open(os.path.join(root, "train", "dog", "0000.png"), "wb") as f:
        f.write(b"not an image")
    err = _bad_data(tmp_path, capsys, root)
    assert "cannot read image" in err and os.path.join("dog", "0000.png") in err


def test_hidden_files_are_skipped_and_unusable_entries_give_one_line(tmp_path, capsys):
    from run.data import CLASSES, DataSource, load_split
    root = make_image_folder(tmp_path / "c", train_per_class=1, test_per_class=1)
    cat = os.path.join(root, "train", "cat")
    with open(os.path.join(cat, "._0000.png"), "wb") as f:  # macOS metadata next to an image: not an image
        f.write(b"\x00\x05\x16\x07")
    open(os.path.join(cat, ".DS_Store"), "wb").close()
    os.makedirs(os.path.join(root, "train", ".ipynb_checkpoints"))  # a hidden folder is not a class
    split = load_split(DataSource("imagefolder", root), train=True, workers=0, log=lambda *_: None)
    assert split.labels.tolist() == list(range(len(CLASSES)))  # one image per class, in class order
    os.remove(os.path.join(cat, "0000.png"))  # only hidden files left
    err = _bad_data(tmp_path, capsys, root)
    assert f"class folder {cat} holds no images" in err and ".DS_Store" in err
    make_image_folder(root, train_per_class=1, test_per_class=1)
    os.symlink(os.path.join(root, "gone.png"), os.path.join(root, "test", "dog", "0001.png"))
    err = _bad_data(tmp_path, capsys, root)
    assert f"cannot read image {os.path.join(root, 'test', 'dog', '0001.png')}: a dangling symlink" in err


def test_bad_pretrained(shared_folder, reference_run, tmp_path, capsys):
    base = ["--data-dir", shared_folder, "--output-dir", tmp_path / "o", *TINY]
    rc, _, err = run_cli(base + ["--pretrained", tmp_path / "nope.pt"], capsys)
    assert rc == 2 and "--pretrained: no checkpoint at" in err
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00garbage")
    rc, _, err = run_cli(base + ["--pretrained", junk], capsys)
    assert rc == 2 and "is not a readable checkpoint" in err
    rc, _, err = run_cli(base + ["--pretrained", reference_run / "last.pt"], capsys)
    assert rc == 2 and "quantized checkpoint" in err
    rc, _, err = run_cli(base + ["--pretrained", reference_run / "last.pt", "--arch", "resnet32"], capsys)
    assert rc == 2 and "made for --arch resnet20" in err


def test_bad_resume(shared_folder, tmp_path, capsys):
    rc, _, err = run_cli(["--resume", "--output-dir", tmp_path / "empty", "--data-dir", shared_folder], capsys)
    assert rc == 2 and "--resume: no checkpoint at" in err
    bad = tmp_path / "corrupt"
    bad.mkdir()
    (bad / "last.pt").write_bytes(b"PK\x03\x04 truncated")
    rc, _, err = run_cli(["--resume", "--output-dir", bad, "--data-dir", shared_folder], capsys)
    assert rc == 2 and "is not a readable checkpoint" in err


def test_output_dir_that_is_a_file_or_cannot_be_created(shared_folder, tmp_path, capsys):
    afile = tmp_path / "file"
    afile.write_text("x")
    rc, _, err = run_cli(["--data-dir", shared_folder, "--output-dir", afile, *TINY], capsys)
    assert rc == 2 and "is a file" in err
    rc, _, err = run_cli(["--data-dir", shared_folder, "--output-dir", afile / "sub", *TINY], capsys)
    assert rc == 2 and "cannot create it" in err


# -- numerical safety ------------------------------------------------------------------------------

def test_non_finite_loss_stops_naming_step_and_layer(shared_folder, tmp_path, monkeypatch, capsys):
    import engine
    real_step = engine.Trainer.train_step

    def poisoned(self, x, y, use_br, finite_check_at=None):
        if use_br:  # stage 2: poison one step size
            with torch.no_grad():
                self.layers["layers.1.0.conv2"].weight_quant.alpha.fill_(float("nan"))
        return real_step(self, x, y, use_br, finite_check_at)

    monkeypatch.setattr(engine.Trainer, "train_step", poisoned)
    out = tmp_path / "nan"
    rc, _, err = run_cli(["--data-dir", shared_folder, "--output-dir", out, *TINY], capsys)
    assert rc == 3
    assert "non-finite loss at epoch 2 step 1" in err and "layers.1.0.conv2.weight_quant.alpha" in err
    assert len(_metrics_text(out).splitlines()) == 1  # the failed epoch is not written
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 1


def test_a_stop_before_the_first_finished_epoch_says_there_is_nothing_to_resume(shared_folder, tmp_path,
                                                                               monkeypatch, capsys):
    import engine
    real_step = engine.Trainer.train_step

    def interrupted(self, x, y, use_br, finite_check_at=None):
        self._stop_signal = signal.SIGTERM  # as the handler sets it, during the first step
        return real_step(self, x, y, use_br, finite_check_at)

    monkeypatch.setattr(engine.Trainer, "train_step", interrupted)
    rc, _, err = run_cli(["--data-dir", shared_folder, "--output-dir", tmp_path / "early", *TINY], capsys)
    assert rc == 128 + signal.SIGTERM
    assert "before the first epoch finished: nothing to resume" in err and "Resume with" not in err
    assert not (tmp_path / "early" / "last.pt").exists()


def test_memory_does_not_grow_over_1000_steps():
    """Hooks keep nothing across steps: the live tensors and RSS stay flat over 1,000 A-BR steps."""
    from run.config import build_parser
    from run.data import DeviceLoader, Split
    from engine import Trainer
    from quant import quantize_model
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 10))
    model = quantize_model(net, 2, 2)
    cfg = build_parser().parse_args(["--epochs", "2", "--warmup-epochs", "1", "--lambda-br-act", "1"])
    split = Split(torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8), torch.arange(8) % 10)
    cpu = torch.device("cpu")
    trainer = Trainer(cfg, model, DeviceLoader(split, 8, cpu, train=True), None, cpu, log=lambda *_: None)
    assert trainer.hooks is not None
    x, y = next(trainer.train_loader.batches(0))
    x = x[:, :, :8, :8].contiguous()

    def live_tensors():
        gc.collect()
        # type(o), not isinstance: isinstance reads o.__class__, which on torch.distributed's deprecated
        # reduce_op object (among gc's objects once torch.distributed is imported) warns a FutureWarning
        return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))

    def rss_mb():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    for _ in range(100):
        trainer.train_step(x, y, use_br=True)
    tensors, rss = live_tensors(), rss_mb()
    for _ in range(900):
        trainer.train_step(x, y, use_br=True)
    assert live_tensors() <= tensors
    assert rss_mb() - rss < 25


def test_resume_restores_log_rows_lost_between_checkpoint_and_log(tmp_path):
    from run import run_folder
    from run.checkpoint import read_jsonl
    rows = {"metrics.jsonl": {"epoch": 2, "test_acc": 50.0}, "timing.jsonl": {"epoch": 2, "seconds": 1.5}}
    ckpt = {"epoch": 2, "log_rows": rows}
    # killed after last.pt of epoch 2 and before its log lines: metrics stop at epoch 1
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1, "test_acc": 40.0}\n')
    run_folder.restore_logs(str(tmp_path), ckpt)
    assert read_jsonl(str(tmp_path / "metrics.jsonl")) == [{"epoch": 1, "test_acc": 40.0}, rows["metrics.jsonl"]]
    assert read_jsonl(str(tmp_path / "timing.jsonl")) == [rows["timing.jsonl"]]
    # a log that ran ahead of the checkpoint is cut back, and nothing is written twice
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1}\n{"epoch": 2, "test_acc": 50.0}\n{"epoch": 3}\n')
    run_folder.restore_logs(str(tmp_path), ckpt)
    assert [r["epoch"] for r in read_jsonl(str(tmp_path / "metrics.jsonl"))] == [1, 2]


@pytest.mark.parametrize("var,value", [("QATBR_KERNELS", "bogus"), ("QATBR_KERNELS_ARCH", "neon")])
def test_bad_kernel_environment_is_refused_before_any_work(var, value, shared_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(var, value)
    out = tmp_path / "run"
    rc, _, err = run_cli(["--data-dir", shared_folder, "--output-dir", out, *THREE], capsys)
    assert rc == 2 and err.startswith("error: environment variable " + var) and value in err
    assert not (out / "config.json").exists()


def test_config_records_which_kernels_ran(reference_run):
    from quant import kernels
    config = json.loads((reference_run / "config.json").read_text())
    assert config["derived"]["cpu_kernels"] == kernels.describe()
    assert config["derived"]["cpu_kernels"].startswith(("fused CPU kernels (", "PyTorch ops ("))


def test_atomic_writes_get_the_mode_open_would_give(tmp_path):
    # mkstemp creates 0600 files; results should be readable like the logs written by open()
    from run.checkpoint import atomic_write_json
    mask = os.umask(0o022)
    try:
        atomic_write_json({"a": 1}, str(tmp_path / "x.json"))
    finally:
        os.umask(mask)
    assert (tmp_path / "x.json").stat().st_mode & 0o777 == 0o644
