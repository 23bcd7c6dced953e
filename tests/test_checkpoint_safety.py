"""Checkpoints are data, never code: every path that reads one loads it with weights_only=True."""

import json
import os
import shutil

import numpy as np
import pytest
import torch

from run import checkpoint
from analysis import plots
from conftest import TINY, run_cli

FLOAT = ["--num-bits", "32", "--lambda-br", "0", "--lambda-br-act", "0"]


class _CreatesMarker:
    """Unpickling this object opens (creates) the marker file: code a crafted checkpoint runs."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.fixture(scope="module")
def float_run(shared_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("safe") / "fp"
    assert run_cli(["--data-dir", shared_folder, "--output-dir", out, *FLOAT, *TINY])[0] == 0
    return out


def _crafted(folder, marker, name="last.pt"):
    """A checkpoint with the keys of a real one, plus an object that creates ``marker`` when unpickled."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name)
    torch.save({"model": {}, "config": {"flags": {"arch": "resnet20"}}, "epoch": 1, "payload": _CreatesMarker(marker)},
               path)
    return path


def test_the_tools_own_checkpoints_load_as_data_only(float_run):
    for name in ("last.pt", "best.pt"):
        ckpt = torch.load(float_run / name, weights_only=True)  # as in a user's own script
        assert ckpt["epoch"] in (1, 2) and "conv1.weight" in ckpt["model"]


def test_crafted_checkpoint_is_refused_on_every_path(shared_folder, float_run, tmp_path, capsys):
    marker = str(tmp_path / "marker")
    evil_dir = tmp_path / "evil_run"
    evil = _crafted(evil_dir, marker)
    base = ["--data-dir", shared_folder, *TINY]
    attempts = {
        "--pretrained": base + ["--output-dir", tmp_path / "o1", "--pretrained", evil],
        "--resume PATH": base + ["--resume", evil, "--output-dir", tmp_path / "o2"],
        "--resume": base + ["--resume", "--output-dir", evil_dir],
    }
    for what, argv in attempts.items():
        rc, _, err = run_cli(argv, capsys)
        assert rc == 2, what
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, (what, err)
        assert f"refusing {evil}" in err and "io.open" in err and "weights_only=True" in err, (what, err)
    # plots.py reads last.pt of a run folder
    shutil.copy(float_run / "config.json", evil_dir / "config.json")
    shutil.copy(float_run / "metrics.jsonl", evil_dir / "metrics.jsonl")
    config = json.loads((evil_dir / "config.json").read_text())
    with pytest.raises(plots.PlotError, match="refusing"):
        plots.load_model(config, evil)
    assert not os.path.exists(marker)


def test_crafted_legacy_format_file_is_refused_too(tmp_path):
    marker = str(tmp_path / "marker")
    path = str(tmp_path / "old_format.pt")
    torch.save({"model": {}, "config": {}, "x": _CreatesMarker(marker)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(checkpoint.CheckpointError, match="refusing .* io.open"):
        checkpoint.load_checkpoint(path, "--resume")
    assert not os.path.exists(marker)


def test_checkpoint_of_an_older_version_is_converted_and_resumes(shared_folder, float_run, tmp_path, capsys):
    """Older versions stored np.random.get_state() (a tuple with a uint32 ndarray) and torch.__version__
    (a TorchVersion) in the checkpoint."""
    out = tmp_path / "old"
    shutil.copytree(float_run, out)
    ckpt = torch.load(out / "last.pt", weights_only=True)
    np.random.seed(7)
    legacy_state = np.random.get_state()
    ckpt["rng"]["numpy"] = legacy_state
    ckpt["config"]["versions"]["torch"] = torch.__version__
    torch.save(ckpt, out / "last.pt")
    loaded = checkpoint.load_checkpoint(str(out / "last.pt"), "--resume")
    state = loaded["rng"]["numpy"]
    np.random.set_state(checkpoint.numpy_rng_from_plain(state))
    expected = np.random.RandomState(7).random_sample(3)  # the generator continues where seed 7 left it
    assert np.array_equal(np.random.random_sample(3), expected)
    assert state["pos"] == legacy_state[2] and state["key"].dtype == torch.int64
    assert type(loaded["config"]["versions"]["torch"]) is str
    # a finished run: resuming reads it, finds nothing left to train, and exits 0
    rc, stdout, err = run_cli(["--resume", "--output-dir", out, "--data-dir", shared_folder], capsys)
    assert rc == 0, err
    assert "Resumed from epoch 2 of 2" in stdout


def test_corrupt_checkpoint_is_one_line_not_a_refusal(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00garbage")
    with pytest.raises(checkpoint.CheckpointError) as exc:
        checkpoint.load_checkpoint(str(junk), "--pretrained")
    assert "is not a readable checkpoint" in str(exc.value) and "\n" not in str(exc.value)
