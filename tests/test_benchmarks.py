"""The benchmark scripts run and report what they promise (structure only, never timings)."""

import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import throughput  # noqa: E402

VARIANTS = {"float", "lsq", "lsq_wbr", "lsq_wbr_abr"}


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_step_mode_prints_a_table_and_writes_json(tmp_path, capsys, one_thread):
    out = tmp_path / "steps.json"
    rc = throughput.main(["--batch-size", "4", "--rounds", "2", "--steps", "1", "--warmup-steps", "1",
                          "--threads", "1", "--device", "cpu", "--json", str(out)])
    assert rc == 0
    table = capsys.readouterr().out
    assert "img/s" in table and "lsq_vs_float" in table and "machine:" in table
    result = json.loads(out.read_text())
    assert result["mode"] == "step" and set(result["variants"]) == VARIANTS
    for v in result["variants"].values():
        assert v["img_per_s"] > 0 and v["step_s"] > 0 and len(v["step_s_rounds"]) == 2
        assert v["peak_mb"] > 0 and v["saved_mb"] > 0
    assert set(result["ratios"]) == {"lsq_vs_float", "wbr_vs_lsq", "wbr_abr_vs_lsq",
                                     "abr_peak_memory_vs_lsq", "abr_saved_memory_vs_lsq"}
    assert len(result["ratios"]["lsq_vs_float"]["rounds"]) == 2
    assert result["machine"]["torch_threads"] == 1 and result["machine"]["device"] == "cpu"
    assert "mallinfo2" in result["memory_method"]["peak_mb"]


def test_epoch_mode_times_the_real_pipeline(tmp_path, capsys, one_thread):
    out = tmp_path / "epochs.json"
    rc = throughput.main(["--mode", "epoch", "--variants", "lsq,lsq_wbr_abr", "--batch-size", "4",
                          "--train-images", "8", "--test-images", "4", "--eval-batch-size", "4", "--rounds", "1",
                          "--threads", "1", "--device", "cpu", "--json", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["mode"] == "epoch" and set(result["variants"]) == {"lsq", "lsq_wbr_abr"}
    assert result["steps_per_epoch"] == 2 and result["data_only_epoch_s"] > 0
    assert all(v["epoch_s"] > 0 and v["first_epoch_s"] > 0 for v in result["variants"].values())
    assert result["estimated_run"]["epochs"] == 100 and result["estimated_run"]["seconds"] > 0
    assert "wbr_abr_vs_lsq" in result["ratios"]
    assert "estimated run" in capsys.readouterr().out


def test_unknown_variant_is_refused():
    with pytest.raises(SystemExit):
        throughput.parse_args(["--variants", "lsq,fast"])
