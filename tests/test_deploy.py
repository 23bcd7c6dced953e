"""--evaluate, PTQ (--ptq), ONNX QDQ and integer export: tiny runs, values worked out independently."""

import json
import os

import pytest
import torch
from torch import nn

from conftest import TINY, run_cli
from deploy.ptq import mse_step_size, quantize_post_training, recalibrate_batchnorm
from models import build_model

FLOAT = ["--num-bits", "32", "--lambda-br", "0", "--lambda-br-act", "0", "--epochs", "1", "--warmup-epochs", "0",
         "--batch-size", "16", "--workers", "0", "--no-download"]


@pytest.fixture(scope="module")
def runs(shared_folder, tmp_path_factory):
    """A tiny W2A2 QAT run (1 warmup + 1 BR epoch) and a tiny float run (1 epoch)."""
    root = tmp_path_factory.mktemp("deploy")
    assert run_cli(["--data-dir", shared_folder, "--output-dir", root / "w2a2", *TINY])[0] == 0
    assert run_cli(["--data-dir", shared_folder, "--output-dir", root / "fp", *FLOAT])[0] == 0
    return root


def _metrics(run):
    with open(run / "metrics.jsonl") as f:
        return {r["epoch"]: r for r in map(json.loads, f)}


def _evaluate(capsys, path, *flags):
    rc, out, err = run_cli(["--evaluate", path, "--workers", "0", *flags], capsys)
    return rc, out, err


def _printed_acc(out):
    line, = out.strip().splitlines()
    assert line.startswith("Test top-1 ")
    return line.split()[2]


# -- --evaluate ----------------------------------------------------------------------------------

def test_evaluate_prints_the_logged_test_acc_of_every_checkpoint(runs, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rows = _metrics(runs / "w2a2")
    for name, epoch in (("warmup_end.pt", 1), ("last.pt", 2), ("best.pt", rows[2]["best_epoch"])):
        rc, out, err = _evaluate(capsys, runs / "w2a2" / name)
        assert rc == 0, err
        assert _printed_acc(out) == f"{rows[epoch]['test_acc']:.2f}%"
        assert "W2A2, first/last 8-bit" in out and "40 step sizes (α)" in out and "image folder at" in out
    rc, out, _ = _evaluate(capsys, runs / "fp" / "last.pt")
    assert rc == 0 and _printed_acc(out) == f"{_metrics(runs / 'fp')[1]['test_acc']:.2f}%"
    assert "resnet20 float" in out and "0 step sizes" in out
    assert os.listdir(tmp_path) == []  # no output folder, nothing written


def test_evaluate_a_plain_float_state_dict(runs, shared_folder, tmp_path, capsys):
    ckpt = torch.load(runs / "fp" / "last.pt", weights_only=False)
    plain = tmp_path / "plain.pt"
    torch.save(ckpt["model"], plain)
    rc, out, err = _evaluate(capsys, plain, "--data-dir", shared_folder, "--no-download")
    assert rc == 0, err
    assert _printed_acc(out) == f"{ckpt['last_acc']:.2f}%"


def test_evaluate_refuses_bad_input_with_one_line(runs, shared_folder, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    q, f = runs / "w2a2" / "last.pt", runs / "fp" / "last.pt"
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(q.read_bytes()[:2000])
    plain = tmp_path / "plain.pt"
    torch.save(torch.load(f, weights_only=False)["model"], plain)
    moved = tmp_path / "moved.pt"  # the checkpoint of a run whose data folder is not on this machine
    ckpt = torch.load(q, weights_only=False)
    ckpt["config"]["flags"].update(data_dir=str(tmp_path / "elsewhere"), no_download=True)
    torch.save(ckpt, moved)
    cases = [
        ((runs / "w2a2",), "is a folder, not a checkpoint file; name one of its checkpoints: best.pt, last.pt, "
                           "warmup_end.pt"),
        ((moved,), f"--data-dir {tmp_path / 'elsewhere'}: no CIFAR-10 found"),
        ((moved,), "that folder is the checkpoint's own, from its training command: pass --data-dir PATH"),
        ((q, "--num-bits", "4"), "holds resnet20 W2A2, first/last 8-bit; --num-bits 4 contradicts it"),
        ((q, "--arch", "resnet32"), "--arch resnet32 contradicts it"),
        ((q, "--per-channel-weights"), "holds resnet20 W2A2, first/last 8-bit; --per-channel-weights contradicts it"),
        ((f, "--num-bits", "2"), "to quantize a float network use --ptq --pretrained"),
        ((truncated,), "is not a readable checkpoint"),
        ((tmp_path / "missing.pt",), "no checkpoint at"),
        ((plain, "--arch", "resnet32", "--data-dir", shared_folder), "does not fit resnet32 float"),
        ((plain, "--num-bits", "2", "--data-dir", shared_folder), "--num-bits 2 contradicts it"),
        ((q, "--epochs", "3"), "--evaluate: --epochs cannot be combined with it"),
        ((q, "--bn-reestimate", "-1"), "--bn-reestimate must be >= 0 training batches (0: none), got -1"),
    ]
    for args, message in cases:
        rc, out, err = _evaluate(capsys, *args)
        assert rc == 2 and out == "", args
        assert err.count("\n") == 1 and err.startswith("error: ") and message in err, (args, err)
    assert sorted(os.listdir(tmp_path)) == ["moved.pt", "plain.pt", "truncated.pt"]
    rc, out, err = _evaluate(capsys, moved, "--data-dir", shared_folder)  # --data-dir names this machine's copy
    assert rc == 0 and _printed_acc(out) == f"{ckpt['last_acc']:.2f}%", err


def test_checkpoint_data_takes_the_command_line_first_then_the_checkpoint(shared_folder, tmp_path):
    from deploy.restore import checkpoint_data
    from run.data import DataError
    saved = {"data_dir": str(shared_folder), "no_download": True}
    assert checkpoint_data(saved, None, None)[1] is False  # the checkpoint's folder, its --no-download
    assert checkpoint_data(saved, None, False)[1] is True  # --download given: it wins
    assert checkpoint_data(saved, str(shared_folder), None)[1] is True  # another --data-dir: downloads allowed
    assert checkpoint_data(saved, str(shared_folder), True)[1] is False
    source, download = checkpoint_data({}, None, None)  # a plain state_dict: the tool's default folder
    assert source.root.startswith("./data") and download is True
    with pytest.raises(DataError) as err:
        checkpoint_data({"data_dir": str(tmp_path / "gone"), "no_download": True}, None, None)
    assert "the checkpoint's own" in str(err.value) and "drop --no-download" not in str(err.value)
    with pytest.raises(DataError) as err:  # a folder the user named: find_source's own message
        checkpoint_data(saved, str(tmp_path / "gone"), True)
    assert "the checkpoint's own" not in str(err.value)


def test_evaluate_accepts_model_flags_that_agree(runs, capsys):
    rc, out, _ = _evaluate(capsys, runs / "w2a2" / "last.pt", "--num-bits", "2", "--first-last-bits", "8")
    assert rc == 0 and "W2A2" in out


# -- PTQ: the step-size search -------------------------------------------------------------------

def _mse(x, alpha, qmin, qmax):
    """The quantization MSE written out element by element (the slow obvious reference)."""
    total = 0.0
    for v in x.tolist():
        level = min(max(round(v / alpha), qmin), qmax)  # Python's round is half to even, as torch.round
        total += (level * alpha - v) ** 2
    return total / len(x)


@pytest.mark.parametrize("values,qmin,qmax,alpha", [
    ([0.0, 1.0, 2.0, 3.0], 0, 3, 1.0),             # unsigned 2-bit: α = 1 puts every value on a level
    ([-0.6, -0.3, 0.0, 0.3], -2, 1, 0.3),         # signed 2-bit [-2, 1]
    ([0.0, 0.5, 1.0, 7.5], 0, 15, 0.5),           # unsigned 4-bit
])
def test_mse_step_size_finds_the_exact_grid_by_hand(values, qmin, qmax, alpha):
    found = mse_step_size(torch.tensor(values), qmin, qmax)
    assert found == pytest.approx(alpha, rel=1e-3)
    assert _mse(torch.tensor(values), found, qmin, qmax) < 1e-8


def test_mse_step_size_against_a_brute_force_search():
    x = torch.randn(400, generator=torch.Generator().manual_seed(0))
    for qmin, qmax in ((-2, 1), (-8, 7), (0, 3)):
        values = x.relu() if qmin == 0 else x
        found = _mse(values, mse_step_size(values, qmin, qmax), qmin, qmax)
        top = float(values.abs().max())
        brute = min(_mse(values, top * k / 2000, qmin, qmax) for k in range(1, 2001))
        assert found <= brute * 1.001, (qmin, qmax)


def test_bn_recalibration_gives_the_calibration_batches_statistics_by_hand():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 1, bias=False), nn.BatchNorm2d(3))
    model[1].running_mean.fill_(5.0)
    batches = [torch.randn(4, 2, 3, 3), torch.randn(4, 2, 3, 3) + 1]
    recalibrate_batchnorm(model, batches)
    w = model[0].weight.detach()[:, :, 0, 0]  # (3, 2)
    means, variances = [], []
    for x in batches:
        y = torch.einsum("oc,nchw->onhw", w, x).reshape(3, -1)
        means.append(y.mean(1))
        variances.append(y.var(1, unbiased=True))
    assert torch.allclose(model[1].running_mean, (means[0] + means[1]) / 2, atol=1e-6)
    assert torch.allclose(model[1].running_var, (variances[0] + variances[1]) / 2, atol=1e-6)
    assert model[1].momentum == 0.1 and not model.training


def test_w8a8_ptq_keeps_the_float_networks_outputs():
    torch.manual_seed(0)
    model = build_model("resnet20").eval()
    batches = [torch.randn(8, 3, 32, 32) for _ in range(2)]
    test = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        reference = model(test)
        quantize_post_training(model, 8, 8, 8, batches, seed=0, bn_recalib=False)
        logits = model(test)
    rel = (logits - reference).norm() / reference.norm()
    assert rel < 0.05, float(rel)
    assert len([m for m in model.modules() if hasattr(m, "weight_quant")]) == 20


def test_ptq_run_folder_evaluate_and_summary(runs, shared_folder, tmp_path, capsys):
    out = tmp_path / "ptq"
    rc, stdout, err = run_cli(["--ptq", "--pretrained", runs / "fp" / "last.pt", "--num-bits", "4", "--data-dir",
                               shared_folder, "--output-dir", out, "--batch-size", "16", "--calib-batches", "2",
                               "--workers", "0", "--no-download", "--lr", "0.5"], capsys)
    assert rc == 0, err
    assert "WARNING: --lr has no effect with --ptq" in stdout
    summary = json.loads((out / "summary.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert summary["method"] == "ptq" and summary["status"] == "finished" and summary["epochs"] == 0
    assert config["derived"]["method"] == "ptq" and config["derived"]["weight_bits"] == 4
    assert "lr" not in config["flags"] and config["flags"]["calib_batches"] == 2
    # 2 batches of 16 of the 40 training images: 32 images, said after the banner and recorded
    assert "Calibration: 32 training images in 2 batch(es)" in stdout and config["derived"]["calibration_images"] == 32
    assert summary["float_test_acc"] == torch.load(runs / "fp" / "last.pt", weights_only=False)["last_acc"]
    assert 0 <= summary["float_bn_recalib_test_acc"] <= 100
    rc, stdout, _ = _evaluate(capsys, out / "ptq.pt")
    assert rc == 0 and _printed_acc(stdout) == f"{summary['final_test_acc']:.2f}%" and "W4A4" in stdout
    from analysis import summarize
    markdown, rows, _ = summarize.build_tables(summarize.find_runs(str(tmp_path)))
    assert rows[0]["scenario"] == "PTQ" and rows[0]["final_top1_mean"] == summary["final_test_acc"]


def test_ptq_calibrates_on_the_training_part_only(runs, shared_folder, tmp_path, capsys, monkeypatch):
    from run.data import DataSource, load_split
    from deploy import ptq
    calibrated_on = []
    real = ptq.calibration_batches
    monkeypatch.setattr(ptq, "calibration_batches", lambda split, *a: calibrated_on.append(split) or real(split, *a))
    rc, stdout, err = run_cli(["--ptq", "--pretrained", runs / "fp" / "last.pt", "--data-dir", shared_folder,
                               "--output-dir", tmp_path / "ptq", "--calib-batches", "1", "--val-split", "10",
                               "--workers", "0", "--no-download"], capsys)
    assert rc == 0, err
    assert "none of the 10 held out by --val-split" in stdout
    # one batch of 128 asked for, 40 - 10 = 30 training images there: the run says it calibrated on 30
    assert "Calibration: 30 training images in 1 batch(es)" in stdout
    train = load_split(DataSource("imagefolder", shared_folder), train=True, workers=0)
    split, = calibrated_on
    assert len(split.labels) == 40 - 10
    # the 10 images missing from the calibration pool are one per class (the held-out set)
    pool = {tuple(img.flatten().tolist()) for img in split.images}
    missing = [int(label) for img, label in zip(train.images, train.labels)
               if tuple(img.flatten().tolist()) not in pool]
    assert sorted(missing) == list(range(10))
    assert json.loads((tmp_path / "ptq" / "config.json").read_text())["derived"]["val_split"]["images"] == 10


def test_ptq_refuses_what_it_cannot_do(runs, shared_folder, tmp_path, capsys):
    base = ["--ptq", "--data-dir", shared_folder, "--output-dir", tmp_path / "o", "--no-download"]
    for flags, message in (([], "--ptq needs --pretrained"),
                           (["--pretrained", runs / "fp" / "last.pt", "--num-bits", "32"], "nothing to quantize"),
                           (["--pretrained", runs / "w2a2" / "last.pt"], "quantized checkpoint"),
                           (["--pretrained", runs / "fp" / "last.pt", "--calib-batches", "0"], "--calib-batches")):
        rc, _, err = run_cli(base + flags, capsys)
        assert rc == 2 and err.startswith("error: ") and message in err, err
    assert not (tmp_path / "o").exists()


# -- export.py -------------------------------------------------------------------------------------

def test_export_writes_checked_onnx_and_integer_files(runs, shared_folder, tmp_path, capsys):
    import export
    out = tmp_path / "exp"
    rc = export.main([str(runs / "w2a2" / "last.pt"), "--out", str(out), "--workers", "0"])
    stdout, err = capsys.readouterr()
    assert rc == 0, err
    report = json.loads((out / "export.json").read_text())
    logged = _metrics(runs / "w2a2")[2]["test_acc"]
    assert report["pytorch_top1"] == logged  # the fake-quant model is the run's, exactly
    assert abs(report["onnx_top1"] - logged) <= 0.05 and report["integer_prediction_agreement"] >= 0.999
    assert report["checks_passed"] and report["onnx_opset"] == 25
    assert report["onnx_logits_within_tolerance"] >= 0.75 and report["integer_logits_within_tolerance"] >= 0.75
    assert report["bytes"]["model_int.npz"] == os.path.getsize(out / "model_int.npz")
    assert report["bytes"]["model_int.npz"] < report["bytes"]["float32_state_dict"] / 5
    assert "onnxruntime" in stdout and "integer reference" in stdout
    import numpy as np
    import onnx
    from deploy.onnx_qdq import session
    from run.data import DataSource, DeviceLoader, load_split
    onnx_model = onnx.load(str(out / "model.onnx"))
    onnx.checker.check_model(onnx_model, full_check=True)
    # a user who has only the files: the recorded recipe, applied to the raw pixels (0..255) of the test
    # images, gives the input the tool's own loader gave the network, bit for bit, and so its logits
    recipe = json.loads({p.key: p.value for p in onnx_model.metadata_props}["preprocessing"])
    assert recipe == report["input"] and "(pixel - 255 * mean[c]) / (255 * std[c])" in recipe["formula"]
    with np.load(out / "model_int.npz", allow_pickle=False) as arrays:
        assert json.loads(str(arrays["meta"]))["input"] == recipe
    test = load_split(DataSource("imagefolder", shared_folder), train=False, workers=0)
    pixels = test.images.numpy().astype(np.float32)
    mean = np.float32(255) * np.array(recipe["mean"], dtype=np.float32).reshape(1, 3, 1, 1)
    std = np.float32(255) * np.array(recipe["std"], dtype=np.float32).reshape(1, 3, 1, 1)
    by_hand = (pixels - mean) / std
    loader_input = next(DeviceLoader(test, len(test.labels), torch.device("cpu"), train=False).batches())[0]
    assert by_hand.shape == (20, 3, 32, 32) and np.array_equal(by_hand, loader_input.numpy())
    logits = session(onnx_model).run(["logits"], {"input": by_hand})[0]
    hits = (logits.argmax(1) == test.labels.numpy()).sum()
    assert hits == round(report["onnx_top1"] * 20 / 100)  # 20 test images: the export's own ONNX top-1
    assert "Input of both: float32 (N, 3, 32, 32) RGB" in stdout


def test_export_refuses_bad_input_and_writes_nothing(runs, tmp_path, capsys):
    import export
    last = runs / "w2a2" / "last.pt"
    truncated = tmp_path / "t.pt"
    truncated.write_bytes(last.read_bytes()[:1000])
    ckpt = torch.load(last, weights_only=False)
    key = next(k for k in ckpt["model"] if k.endswith("conv1.weight") and ckpt["model"][k].shape[0] == 16)
    ckpt["model"][key] = ckpt["model"][key][:8]  # 8 of the layer's 16 output channels
    cut = tmp_path / "cut.pt"
    torch.save(ckpt, cut)
    moved = tmp_path / "moved.pt"
    ckpt = torch.load(last, weights_only=False)
    ckpt["config"]["flags"].update(data_dir=str(tmp_path / "elsewhere"), no_download=True)
    torch.save(ckpt, moved)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    out = str(tmp_path / "out")
    shape = ", ".join(str(d) for d in ckpt["model"][key].shape[1:])

    def argv(ckpt, *flags):  # a flag given twice: argparse keeps the later value
        return [str(ckpt), "--out", out, "--workers", "0", *map(str, flags)]

    for args, message in ((argv(runs / "fp" / "last.pt"), "expects a quantized checkpoint"),
                          (argv(truncated), "is not a readable checkpoint"),
                          (argv(tmp_path / "missing.pt"), "no checkpoint at"),
                          (argv(runs / "w2a2"), "is a folder, not a checkpoint file; name one of its checkpoints: "
                                                "best.pt, last.pt, warmup_end.pt"),
                          (argv(cut), f"size mismatch for {key}: copying a param with shape torch.Size([8, {shape}]) "
                                      f"from checkpoint, the shape in current model is torch.Size([16, {shape}])"),
                          (argv(moved), "that folder is the checkpoint's own, from its training command: pass "
                                        "--data-dir PATH"),
                          (argv(last, "--workers", "-1"), "--workers must be >= 0, got -1"),
                          (argv(last, "--out", a_file / "sub"), f"--out {a_file / 'sub'}: {a_file} is a file, so no "
                                                                f"folder can be made below it")):
        rc = export.main(args)
        _, err = capsys.readouterr()
        assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err, (args, err)
        assert not (tmp_path / "out").exists()
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "model.onnx").write_bytes(b"x")
    rc = export.main([str(runs / "w2a2" / "last.pt"), "--out", str(taken), "--workers", "0"])
    _, err = capsys.readouterr()
    assert rc == 2 and "already holds an export" in err and (taken / "model.onnx").read_bytes() == b"x"


def test_calibration_batches_are_seeded_training_batches():
    from run.data import Split
    from deploy.ptq import calibration_batches
    split = Split(torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8), torch.zeros(40, dtype=torch.long))
    cpu = torch.device("cpu")
    a, b = calibration_batches(split, 2, 16, 7, cpu), calibration_batches(split, 2, 16, 7, cpu)
    assert [x.shape for x in a] == [(16, 3, 32, 32)] * 2 and all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(calibration_batches(split, 1, 16, 8, cpu)[0], a[0])
    assert [len(x) for x in calibration_batches(split, 5, 16, 7, cpu)] == [16, 16, 8]  # all there is


def test_sweep_plans_ptq_once_per_width_without_training_flags(tmp_path):
    import subprocess
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, RUNS_DIR=str(tmp_path / "s"), SCENARIOS="lsq ptq", BITS="2 4", LAMBDAS="1 0.5",
               SEEDS="1", EPOCHS="3", WARMUP="1", PRETRAINED="/f.pt")
    out = subprocess.run(["bash", os.path.join(repo, "scripts", "sweep.sh"), "-n"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    commands = [line.strip() for line in out.stdout.splitlines() if line.startswith("    ")]
    ptq = [c for c in commands if "--ptq" in c]
    assert len(commands) == 4 and len(ptq) == 2  # lsq and ptq, once per width (no λ)
    for width, cmd in zip((2, 4), ptq):
        assert f"ptq_w{width}a{width}_s1 " in cmd + " " and "--pretrained /f.pt" in cmd
        assert "--epochs" not in cmd and "--lambda-br" not in cmd and "--warmup-epochs" not in cmd


def test_ptq_flags_without_ptq_get_a_banner_warning(capsys):
    rc, out, _ = run_cli(["--dry-run", "--data-dir", "/nonexistent", "--calib-batches", "4"], capsys)
    assert rc == 0 and "WARNING: --calib-batches / --no-bn-recalib have no effect without --ptq" in out
    rc, out, _ = run_cli(["--dry-run", "--data-dir", "/nonexistent"], capsys)
    assert rc == 0 and "--calib-batches" not in out.split("Resolved config:")[0]
