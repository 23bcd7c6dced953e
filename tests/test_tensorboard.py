"""--tensorboard: event files with the scalars and histograms, and no effect on training."""

import copy
import glob
import json
import os

import pytest
import torch

import cifar10_qat_br
from conftest import make_image_folder
from models import build_model
from quant import quantize_model, quantized_layers
from run.tensorboard_log import ACT_SAMPLES, TensorBoardLogger

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def _read_events(log_dir):
    acc = event_accumulator.EventAccumulator(log_dir, size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    return acc


def _tiny_model():
    torch.manual_seed(0)
    return quantize_model(build_model("resnet20"), 2, 2, 8).train()


def _row(epoch, layers):
    return {"epoch": epoch, "epochs": 2, "stage": 1, "lr": 0.01, "loss": 2.5, "ce": 2.5, "br_w": 0.0, "br_a": 0.0,
            "train_acc": 10.0, "test_acc": 12.5, "val_acc": None, "best_test_acc_optimistic": 12.5,
            "best_epoch": epoch,
            "alpha": {n: {"weight": 0.25, "act": 0.75} for n in layers},
            "bins": {n: {"dist_alpha": 0.2, "flips": None, "occupancy": [0.25] * 4} for n in layers}}


def test_logger_changes_nothing_and_writes_scalars_and_histograms(tmp_path):
    model = _tiny_model()
    twin = copy.deepcopy(model)
    x = torch.randn(3, 3, 32, 32)
    logger = TensorBoardLogger(str(tmp_path / "tb"))
    logger.attach(model)
    out, twin_out = model(x), twin(x)  # training-mode forward passes, hooks on one side only
    assert torch.equal(out, twin_out)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    layers = list(quantized_layers(model))
    logger.log_epoch(_row(1, layers), model)
    logger.close()
    assert torch.equal(torch.get_rng_state(), rng)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN statistics and step sizes included
    assert model.training
    assert not any(q._forward_pre_hooks for q in (m.act_quant for m in quantized_layers(model).values()))

    events = _read_events(str(tmp_path / "tb"))
    tags = events.Tags()
    for tag in ("loss/total", "loss/ce", "loss/br_w", "loss/br_a", "acc/train", "acc/test", "acc/best_test_optimistic",
                "lr",
                "alpha_weight/layers.0.0.conv1", "alpha_act/layers.0.0.conv1", "bins_dist_alpha/linear"):
        assert tag in tags["scalars"], tag
    assert "bins_flips/linear" not in tags["scalars"]  # None (first epoch) is not logged
    assert "acc/val" not in tags["scalars"]  # no --val-split
    assert [(s.step, s.value) for s in events.Scalars("acc/test")] == [(1, 12.5)]
    assert events.Scalars("alpha_act/layers.2.2.conv2")[0].value == 0.75
    assert len([t for t in tags["histograms"] if t.startswith("weights/")]) == 20
    assert len([t for t in tags["histograms"] if t.startswith("activations/")]) == 20
    # layers.0.0.conv1 sees (3, 16, 32, 32) inputs: all 3 samples are kept (fewer than ACT_SAMPLES).
    assert ACT_SAMPLES >= 3
    assert events.Histograms("activations/layers.0.0.conv1")[0].histogram_value.num == 3 * 16 * 32 * 32
    # and its weight is (16, 16, 3, 3)
    assert events.Histograms("weights/layers.0.0.conv1")[0].histogram_value.num == 16 * 16 * 9


def test_no_activation_sample_outside_training_mode(tmp_path):
    model = _tiny_model()
    logger = TensorBoardLogger(str(tmp_path / "tb"))
    logger.attach(model)
    model.eval()
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    logger.log_epoch(_row(1, list(quantized_layers(model))), model)
    logger.close()
    tags = _read_events(str(tmp_path / "tb")).Tags()["histograms"]
    assert not [t for t in tags if t.startswith("activations/")]
    assert len([t for t in tags if t.startswith("weights/")]) == 20


def test_cli_tensorboard_writes_event_files_and_same_metrics(tmp_path):
    data = make_image_folder(tmp_path / "cifar", train_per_class=1, test_per_class=1)
    common = ["--data-dir", data, "--epochs", "2", "--warmup-epochs", "1", "--batch-size", "16", "--workers", "0",
              "--no-download", "--lambda-br-act", "1"]
    with_tb, without = str(tmp_path / "tb_run"), str(tmp_path / "plain_run")
    assert cifar10_qat_br.main(common + ["--output-dir", with_tb, "--tensorboard"]) == 0
    assert cifar10_qat_br.main(common + ["--output-dir", without]) == 0
    files = glob.glob(os.path.join(with_tb, "tensorboard", "events.out.tfevents.*"))
    assert len(files) == 1 and os.path.getsize(files[0]) > 0
    assert not os.path.exists(os.path.join(without, "tensorboard"))
    events = _read_events(os.path.join(with_tb, "tensorboard"))
    assert [s.step for s in events.Scalars("acc/test")] == [1, 2]
    assert [s.step for s in events.Histograms("weights/layers.0.0.conv1")] == [1, 2]
    with open(os.path.join(with_tb, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [s.value for s in events.Scalars("acc/test")] == pytest.approx([r["test_acc"] for r in rows])
    # Training is unchanged by the logger: identical metrics, bit for bit, on the CPU.
    with open(os.path.join(without, "metrics.jsonl")) as f:
        assert [json.loads(line) for line in f] == rows
