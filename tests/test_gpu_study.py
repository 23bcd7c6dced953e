"""benchmarks/gpu_study.py in its tiny size on the CPU: every phase runs, every file is written,
and the numbers in study.json are those of the run folders (structure, never timings)."""

from __future__ import annotations

import json
import os
import sys

import pytest

from tests.conftest import make_image_folder, run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import gpu_study  # noqa: E402


def test_epochs_fit_the_time_left_after_start_up():
    measure = {"overhead_s": 10.0}
    # (100 s - 10 s of start-up) / (1.05 x 3 s per epoch) = 28.6 -> 28 epochs
    assert gpu_study.size_epochs(100.0, measure, 3.0, 1, 50) == 28
    assert gpu_study.size_epochs(100.0, measure, 3.0, 1, 20) == 20    # capped
    assert gpu_study.size_epochs(5.0, measure, 3.0, 2, 50) == 2       # never below the minimum
    # 50 training images, batch 16: 3 steps (the ragged batch is dropped) of 0.5 s, and 2 s of evaluation
    assert gpu_study.epoch_seconds({"step_s": 0.5, "eval_s": 2.0}, 50, 16) == 3.5


def test_tiny_study_on_the_cpu(tmp_path, capsys):
    data = make_image_folder(tmp_path / "cifar", train_per_class=4, test_per_class=2)
    out = tmp_path / "out"
    rc = gpu_study.main(["--data", data, "--out", str(out), "--workdir", str(tmp_path / "work"), "--device", "cpu",
                         "--scenarios", "lsq,wa-stable", "--seeds", "42", "--batch-size", "8",
                         "--probe-images", "20", "--max-float-epochs", "1", "--max-qat-epochs", "2",
                         "--budget-s", "3600"])  # the epochs are capped above; the budget only stops a slow machine
    assert rc == 0, (out / "study.log").read_text()
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == ["curves.png", "pretrained/resnet20_fp32.config.json", "pretrained/resnet20_fp32.metrics.jsonl",
                     "pretrained/resnet20_fp32.pt", "study.json", "study.log", "summary.md", "summary_runs.csv"]
    result = json.loads((out / "study.json").read_text())
    assert result["protocol"]["float"]["epochs"] == 1
    assert result["protocol"]["qat"]["epochs"] == 2 and result["protocol"]["qat"]["warmup_epochs"] == 1  # 30 % of 2
    runs = tmp_path / "work" / "runs" / "qat"
    assert set(result["runs"]) == {"lsq_w2a2_s42", "wa-stable_w2a2_lam1_frz_s42"}
    branched = json.loads((runs / "wa-stable_w2a2_lam1_frz_s42" / "config.json").read_text())
    assert branched["flags"]["from_warmup"] == str(runs / "lsq_w2a2_s42" / "warmup_end.pt")  # the seed's warmup
    for name, report in result["runs"].items():
        metrics = [json.loads(line) for line in (runs / name / "metrics.jsonl").read_text().splitlines()]
        assert report["exit"] == 0 and report["epochs_done"] == 2
        assert report["final_test_acc"] == metrics[-1]["test_acc"]  # the final epoch, not the best
        config = json.loads((runs / name / "config.json").read_text())
        assert config["flags"]["pretrained"].endswith(os.path.join("float", "resnet20_fp32", "last.pt"))
    stable = [json.loads(line)
              for line in (runs / "wa-stable_w2a2_lam1_frz_s42" / "metrics.jsonl").read_text().splitlines()]
    assert stable[0]["br_w"] == 0 and stable[1]["br_w"] > 0 and stable[1]["br_a"] > 0
    table = (out / "summary.md").read_text()
    assert "LSQ baseline" in table and "W+A stable" in table
    # the exported float model is what --pretrained reads
    capsys.readouterr()
    rc, stdout, err = run_cli(["--data-dir", data, "--no-download",
                               "--pretrained", out / "pretrained" / "resnet20_fp32.pt",
                               "--num-bits", "2", "--dry-run"], capsys)
    assert rc == 0, err
    assert "float checkpoint" in stdout


def test_bad_scenario_is_refused(capsys):
    with pytest.raises(SystemExit) as exc:
        gpu_study.parse_args(["--data", "x", "--out", "y", "--scenarios", "lsq,fast"])
    assert exc.value.code == 2 and "fast" in capsys.readouterr().err


@pytest.mark.skipif(gpu_study.torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_the_study_says_so(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        gpu_study.parse_args(["--data", str(tmp_path), "--out", str(tmp_path / "out")])
    assert exc.value.code == 2 and "no CUDA GPU" in capsys.readouterr().err


def test_a_folder_holding_an_earlier_study_or_repeated_values_are_refused(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "study.json").write_text("{}")
    for argv, words in ((["--out", str(tmp_path / "out")], "--out"),
                        (["--out", str(tmp_path / "new"), "--seeds", "42,42"], "repeat"),
                        (["--out", str(tmp_path / "new"), "--budget-s", "nan"], "--budget-s")):
        with pytest.raises(SystemExit) as exc:
            gpu_study.parse_args(["--data", str(tmp_path), "--device", "cpu"] + argv)
        assert exc.value.code == 2 and words in capsys.readouterr().err


def test_a_failing_phase_is_reported_and_stops_every_run(tmp_path):
    data = tmp_path / "broken"  # a training split, but no test split
    (data / "train" / "cat").mkdir(parents=True)
    out = tmp_path / "out"
    rc = gpu_study.main(["--data", str(data), "--out", str(out), "--workdir", str(tmp_path / "work"),
                         "--device", "cpu"])
    assert rc == 1
    result = json.loads((out / "study.json").read_text())
    assert "DataError" in result["error"] and "test" in result["error"]
    assert "error: DataError" in (out / "study.log").read_text()
