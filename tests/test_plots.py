"""plots.py: PNGs from a run folder (checkpoints, metrics.jsonl, a tiny image folder), and its errors."""

import json
import os

import matplotlib
import pytest
import torch

from run import config as cfgmod
from analysis import plots
from conftest import make_image_folder
from models import build_model
from quant import quantize_model, quantized_layers

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_size(path):
    """(width, height) in pixels from the PNG header."""
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def _metrics_row(epoch, layers, stage, occupancy_len=4):
    return {"epoch": epoch, "epochs": 2, "stage": stage, "lr": 0.01 / epoch, "loss": 3.0 - epoch, "ce": 2.0,
            "br_w": 0.1 if stage == 2 else 0.0, "br_a": 2.0 if stage == 2 else 0.0,
            "train_acc": 10.0 * epoch, "test_acc": 12.0 * epoch, "best_test_acc": 12.0 * epoch, "best_epoch": epoch,
            "alpha": {n: {"weight": 0.1, "act": 0.5} for n in layers},
            "bins": {n: {"dist_alpha": 0.25 / epoch, "flips": None if epoch == 1 else 0.01,
                         "occupancy": [1 / occupancy_len] * occupancy_len} for n in layers}}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A W2A2 ResNet-20 run folder as cifar10_qat_br.py leaves it, made without training.

    The step sizes come from one forward pass (LSQ initialisation); "after BR" moves every
    weight halfway to its quantization level, as BR would.
    """
    root = tmp_path_factory.mktemp("plots")
    data = make_image_folder(root / "cifar", train_per_class=1, test_per_class=1)
    run = root / "run"
    os.makedirs(run)
    flags = vars(cfgmod.build_parser().parse_args(
        ["--epochs", "2", "--warmup-epochs", "1", "--data-dir", data, "--output-dir", str(run)]))
    config = {"flags": flags, "derived": {"weight_bits": 2, "act_bits": 2, "first_last_bits": 8, "float_run": False}}
    with open(run / "config.json", "w") as f:
        json.dump(config, f)
    torch.manual_seed(0)
    model = quantize_model(build_model("resnet20"), 2, 2, 8)
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, 32, 32))
    torch.save({"model": model.state_dict(), "config": config, "epoch": 1}, run / "warmup_end.pt")
    with torch.no_grad():
        for layer in quantized_layers(model).values():
            layer.weight.copy_(0.5 * (layer.weight + layer.quantized_weight()))
    torch.save({"model": model.state_dict(), "config": config, "epoch": 2}, run / "last.pt")
    names = list(quantized_layers(model))
    with open(run / "metrics.jsonl", "w") as f:
        for epoch in (1, 2):
            f.write(json.dumps(_metrics_row(epoch, names, stage=epoch)) + "\n")
    return str(run)


def test_plots_are_png_files_with_weight_and_activation_rows(run_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("DISPLAY", raising=False)
    out = tmp_path / "png"
    assert plots.main([run_dir, "--out", str(out), "--images", "4", "--layers", "layers.0.0.conv1"]) == 0
    assert matplotlib.get_backend().lower() == "agg"
    expected = {"curves.png", "bins.png", "hist_layers.0.0.conv1.png"}
    assert set(os.listdir(out)) == expected
    for name in expected:
        assert os.path.getsize(out / name) > 10_000
    # Histogram figures: 2 columns (warmup_end.pt, last.pt) of 5.6 in and 2 rows (weights,
    # activations) of 3.4 in, at 110 dpi.
    assert _png_size(out / "hist_layers.0.0.conv1.png") == (round(2 * 5.6 * 110), round(2 * 3.4 * 110))


def test_chosen_layers_weights_only_and_no_warmup_checkpoint(run_dir, tmp_path):
    lone = tmp_path / "run"
    os.makedirs(lone)
    for name in ("config.json", "metrics.jsonl", "last.pt"):
        os.symlink(os.path.join(run_dir, name), lone / name)
    warnings = []
    paths = plots.make_plots(str(lone), layers=["conv1", "layers.2.0.conv1"], activations=False,
                             warn=warnings.append)
    assert [os.path.basename(p) for p in paths] == ["curves.png", "bins.png", "hist_conv1.png",
                                                    "hist_layers.2.0.conv1.png"]
    assert all(os.path.dirname(p) == str(lone / "plots") for p in paths)
    # One column (last.pt only), one row (weights only).
    assert _png_size(lone / "plots" / "hist_conv1.png") == (round(5.6 * 110), round(3.4 * 110))
    assert len(warnings) == 1 and "warmup_end.pt" in warnings[0]


def test_float_run_gets_curves_only_with_a_note(tmp_path):
    run = tmp_path / "fp"
    os.makedirs(run)
    flags = vars(cfgmod.build_parser().parse_args(["--num-bits", "32", "--epochs", "2", "--warmup-epochs", "0"]))
    config = {"flags": flags, "derived": {"weight_bits": 32, "act_bits": 32, "first_last_bits": 32, "float_run": True}}
    (run / "config.json").write_text(json.dumps(config))
    rows = [dict(_metrics_row(e, [], stage=2), br_w=0.0, br_a=0.0) for e in (1, 2)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    warnings = []
    paths = plots.make_plots(str(run), warn=warnings.append)
    assert [os.path.basename(p) for p in paths] == ["curves.png"]
    assert not (run / "plots" / "bins.png").exists()
    assert warnings == ["a float run has no quantized layers: no bin metrics (bins.png) and no histograms"]


def test_layer_choice():
    layers = quantized_layers(quantize_model(build_model("resnet20"), 2, 2, 8))
    assert len(plots.choose_layers(layers, ["all"])) == 20  # ResNet-20: 19 convs + 1 linear
    # Default: first, middle (index 18 // 2 = 9) and last of the 18 inner layers.
    assert plots.choose_layers(layers, None) == ["layers.0.0.conv1", "layers.1.1.conv2", "layers.2.2.conv2"]
    assert plots.choose_layers(layers, ["linear", "conv1", "linear"]) == ["linear", "conv1"]
    with pytest.raises(plots.PlotError, match="no quantized layer named bn1"):
        plots.choose_layers(layers, ["bn1"])


def test_missing_data_is_a_warning_unless_asked_for(run_dir, tmp_path, capsys):
    # The run's own --data-dir is gone: weight histograms only, with one warning.
    moved = tmp_path / "run"
    os.makedirs(moved)
    with open(os.path.join(run_dir, "config.json")) as f:
        config = json.load(f)
    config["flags"]["data_dir"] = str(tmp_path / "gone")
    with open(moved / "config.json", "w") as f:
        json.dump(config, f)
    for name in ("metrics.jsonl", "last.pt", "warmup_end.pt"):
        os.symlink(os.path.join(run_dir, name), moved / name)
    warnings = []
    plots.make_plots(str(moved), layers=["layers.0.0.conv1"], warn=warnings.append)
    assert len(warnings) == 1 and "activation histograms left out" in warnings[0]
    assert _png_size(moved / "plots" / "hist_layers.0.0.conv1.png") == (round(2 * 5.6 * 110), round(3.4 * 110))
    # Asked for explicitly, unusable data is an error, and nothing is written.
    assert plots.main([run_dir, "--out", str(tmp_path / "b"), "--data-dir", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --data-dir")
    assert not os.path.exists(tmp_path / "b")


@pytest.mark.parametrize("args, message", [
    (["--layers", "layers.9.9.conv1"], "no quantized layer named layers.9.9.conv1"),
    (["--images", "0"], "--images must be >= 1"),
])
def test_bad_arguments_are_one_error_line(run_dir, tmp_path, capsys, args, message):
    assert plots.main([run_dir, "--out", str(tmp_path / "x")] + args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


def test_missing_run_folder_is_one_error_line(tmp_path, capsys):
    assert plots.main([str(tmp_path / "no_such_run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {tmp_path / 'no_such_run'}: no such run folder"]
