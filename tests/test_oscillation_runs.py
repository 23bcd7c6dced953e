"""Oscillation dampening, freezing and tracking in runs: flags, banner, metrics, resume and --from-warmup."""

import json
import signal

import pytest
import torch

from conftest import TINY, run_cli, signal_in_epoch

# 3 epochs (1 warmup, 2 in stage 2), so that a resume from epoch 2 is in the middle of stage 2. With momentum
# 0.5 one oscillation takes a weight's average to 0.5, past the threshold: weights freeze even in 6 steps.
SHAPE = [*TINY, "--epochs", "3", "--warmup-epochs", "1"]
OSC = ["--lambda-br", "1", "--lambda-br-act", "0", "--freeze-alpha", "--lambda-dampen", "0.1",
       "--freeze-oscillating", "0.02:0.01", "--oscillation-momentum", "0.5"]
PLAIN = ["--lambda-br", "0", "--lambda-br-act", "0"]


def _rows(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("flags, message", [
    (["--freeze-oscillating", "0.1"], "--freeze-oscillating must be START:FINAL, two thresholds with "
                                      "0 < FINAL <= START <= 1 (oscillations per weight and step), e.g. 0.1:0.01; "
                                      "got '0.1'"),
    (["--freeze-oscillating", "0.01:0.1"], "got '0.01:0.1'"),
    (["--freeze-oscillating", "0.1:0"], "got '0.1:0'"),
    (["--lambda-dampen", "-1"], "--lambda-dampen must be a finite number >= 0, got -1.0"),
    (["--oscillation-momentum", "0"], "--oscillation-momentum must be a number in (0, 1], got 0.0"),
    (["--bn-reestimate", "-2"], "--bn-reestimate must be >= 0 training batches (0: none), got -2"),
])
def test_bad_oscillation_flags_are_one_error_line(capsys, flags, message):
    rc, _, err = run_cli(["--dry-run", "--data-dir", "/nonexistent", *flags], capsys)
    assert rc == 2 and err.startswith("error: ") and message in err and len(err.splitlines()) == 1


def test_banner_block(capsys):
    rc, out, _ = run_cli(["--dry-run", "--data-dir", "/nonexistent", "--lambda-dampen", "0.1",
                          "--freeze-oscillating", "0.1:0.01", "--bn-reestimate", "50"], capsys)
    assert rc == 0
    lines = out.splitlines()
    start = lines.index("Oscillation Control (Nagel et al., ICML 2022; low-bit weights only, as W-BR):")
    assert lines[start + 1] == "  - Dampening: λ_d=0.1 [ENABLED]"
    assert lines[start + 2].endswith("aggregation kernel_mean; λ_d rises by a cosine from 0 to 0.1 over the "
                                     "stage-2 steps")
    assert lines[start + 3] == "  - Iterative freezing: threshold 0.1 -> 0.01 [ENABLED]"
    assert "  - BN re-estimation after the last epoch: 50 training batches [ENABLED]" in lines
    assert lines.index("Alpha Control:") > start  # its own block under BR Configuration
    assert "Output: results/resnet20_w2a2_fl8_lbr1_lbra0_frz_ld0.1_fo0.1-0.01_bnre50_s42" in out
    rc, out, _ = run_cli(["--dry-run", "--data-dir", "/nonexistent"], capsys)  # a seed command: the seed's block
    assert "Oscillation Control" not in out
    rc, out, _ = run_cli(["--dry-run", "--data-dir", "/nonexistent", "--bn-reestimate", "5"], capsys)
    assert "  - Dampening: λ_d=0.0 [DISABLED]" in out and "  - Iterative freezing: [DISABLED]" in out
    rc, out, _ = run_cli(["--dry-run", "--data-dir", "/nonexistent", "--lambda-dampen", "1", "--num-bits-weight",
                          "32", "--oscillation-momentum", "0.5"], capsys)
    assert "  - Dampening: λ_d=1.0 [NO EFFECT: weights are not quantized (32 bits)]" in out
    assert "WARNING: --lambda-dampen / --freeze-oscillating have no effect: weights are not quantized" in out
    assert "WARNING: --oscillation-momentum has no effect without --freeze-oscillating" in out


@pytest.fixture(scope="module")
def runs(shared_folder, tmp_path_factory):
    """A run with dampening and freezing, and a plain LSQ run (its warmup is the same), from scratch."""
    root = tmp_path_factory.mktemp("osc")
    out = {"osc": root / "osc", "plain": root / "plain"}
    for name, flags in (("osc", OSC), ("plain", PLAIN)):
        assert run_cli(["--data-dir", shared_folder, "--output-dir", out[name], *SHAPE, *flags])[0] == 0
    return out


def test_metrics_of_a_run(runs):
    rows = _rows(runs["osc"])
    assert [r["stage"] for r in rows] == [1, 2, 2]
    assert rows[0]["dampen"] == 0.0 and rows[1]["dampen"] > 0 and rows[2]["dampen"] > 0
    assert rows[0]["frozen"] == 0.0 and rows[2]["frozen"] >= rows[1]["frozen"] and rows[2]["frozen"] > 0
    for row in rows:
        low_bit = {n: b for n, b in row["bins"].items() if n not in ("conv1", "linear")}
        assert all(0 <= b["osc_freq"] <= 1 and 0 <= b["frozen"] <= 1 for b in low_bit.values())
        assert "osc_freq" not in row["bins"]["conv1"] and "osc_freq" not in row["bins"]["linear"]  # 8 bits
    assert rows[0]["osc_freq"] > 0  # tracked in the warmup too
    plain = _rows(runs["plain"])
    assert all(r["osc_freq"] is not None and r["frozen"] == 0.0 and r["dampen"] == 0.0 for r in plain)
    assert plain[0] == rows[0]  # stage 1 is one experiment


def test_frozen_weights_sit_on_their_codes_in_the_checkpoint(runs):
    ckpt = torch.load(runs["osc"] / "last.pt", weights_only=True)
    states = ckpt["oscillation"]
    frozen = 0
    for name, state in states.items():
        w, alpha = ckpt["model"][f"{name}.weight"], ckpt["model"][f"{name}.weight_quant.alpha"]
        mask = state["frozen"]
        frozen += int(mask.sum())
        assert torch.equal(w[mask], (state["frozen_code"].float() * alpha)[mask])
    assert frozen > 0
    # the codes export.py writes (deploy.onnx_qdq.weight_codes at the step the fake quantizer uses)
    from deploy.onnx_qdq import step_used, weight_codes
    from deploy.restore import build_network, model_config
    from quant import quantized_layers
    model = build_network(model_config(ckpt["config"]["flags"]))
    model.load_state_dict(ckpt["model"])
    layers = quantized_layers(model)
    for name, state in states.items():
        layer, mask = layers[name], state["frozen"]
        codes = weight_codes(layer, step_used(layer.weight_quant, layer.weight.shape))
        assert torch.equal(codes[mask], state["frozen_code"].to(torch.int32)[mask])


def test_resume_mid_stage_2_is_bit_identical(runs, shared_folder, tmp_path, monkeypatch, capsys):
    out = tmp_path / "osc"
    argv = ["--data-dir", shared_folder, "--output-dir", out, *SHAPE, *OSC]
    with monkeypatch.context() as m:
        signal_in_epoch(m, 3, signal.SIGTERM)
        assert run_cli(argv, capsys)[0] == 128 + signal.SIGTERM
    assert [r["epoch"] for r in _rows(out)] == [1, 2]
    rc, stdout, _ = run_cli(["--resume", "--output-dir", out], capsys)
    assert rc == 0 and "Resumed from epoch 2 of 3" in stdout
    assert _rows(out) == _rows(runs["osc"])
    mine, theirs = (torch.load(f / "last.pt", weights_only=True) for f in (out, runs["osc"]))
    assert all(torch.equal(mine["model"][k], theirs["model"][k]) for k in theirs["model"])
    for name, state in theirs["oscillation"].items():
        assert all(torch.equal(mine["oscillation"][name][k], v) for k, v in state.items())


def test_a_branch_from_a_plain_warmup_is_the_run_from_scratch(runs, shared_folder, tmp_path, capsys):
    out = tmp_path / "osc"
    rc, stdout, _ = run_cli(["--data-dir", shared_folder, "--output-dir", out, *SHAPE, *OSC,
                             "--from-warmup", runs["plain"] / "warmup_end.pt"], capsys)
    assert rc == 0 and "Branched from epoch 1 of 3" in stdout
    assert _rows(out) == _rows(runs["osc"])
    mine, theirs = (torch.load(f / "last.pt", weights_only=True) for f in (out, runs["osc"]))
    assert all(torch.equal(mine["model"][k], theirs["model"][k]) for k in theirs["model"])


def test_bn_reestimate_averages_the_batch_statistics(shared_folder, tmp_path, capsys):
    from run.data import DeviceLoader, find_source, load_split
    from deploy.restore import build_network, model_config
    out = tmp_path / "bn"
    # 40 training images in batches of 16: an epoch has 3 batches, fewer than the 5 asked for
    rc, stdout, _ = run_cli(["--data-dir", shared_folder, "--output-dir", out, *TINY, *PLAIN, "--bn-reestimate", "5"],
                            capsys)
    assert rc == 0 and ("WARNING: --bn-reestimate 5: an epoch has 3 training batches; the re-estimation after the "
                        "last epoch uses those 3") in stdout
    assert "BatchNorm re-estimated on 3 training batches (--bn-reestimate)" in stdout
    summary = json.loads((out / "summary.json").read_text())
    bn = summary["bn_reestimate"]
    assert bn["batches"] == 3 and bn["test_acc_before"] == summary["final_test_acc"]
    rc, stdout, _ = run_cli(["--evaluate", out / "bn_reestimated.pt", "--data-dir", shared_folder, "--workers", "0"],
                            capsys)
    assert rc == 0 and stdout.startswith(f"Test top-1 {bn['test_acc_after']:.2f}%")
    assert f"the run logged {bn['test_acc_after']:.2f}% for epoch 2 after --bn-reestimate" in stdout
    # --evaluate last.pt --bn-reestimate re-estimates on the same draw (checked below by hand): the run's numbers
    rc, stdout, _ = run_cli(["--evaluate", out / "last.pt", "--data-dir", shared_folder, "--workers", "0",
                             "--bn-reestimate", "5"], capsys)
    assert rc == 0 and stdout.startswith(
        f"Test top-1 {bn['test_acc_before']:.2f}% (20 images) | after BatchNorm re-estimation on 3 training batches "
        f"(--bn-reestimate): {bn['test_acc_after']:.2f}% | resnet20 W2A2")
    # the reference: the first BatchNorm's input on the 3 batches of a fresh draw (epoch E + 1 = 3), the
    # network as trained; running mean = mean of the batch means, variance = mean of the unbiased batch variances
    last = torch.load(out / "last.pt", weights_only=True)
    model = build_network(model_config(last["config"]["flags"]))
    model.load_state_dict(last["model"])
    name, norm = next((n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d))
    inputs = []
    norm.register_forward_pre_hook(lambda _m, args: inputs.append(args[0].detach().clone()))
    split = load_split(find_source(shared_folder, download=False), train=True, workers=0)
    batches = DeviceLoader(split, 16, torch.device("cpu"), train=True, seed=42).batches(3)
    model.train()
    with torch.no_grad():
        for x, _ in batches:
            model(x)
    mean = torch.stack([x.mean((0, 2, 3)) for x in inputs]).mean(0)
    var = torch.stack([x.var((0, 2, 3), unbiased=True) for x in inputs]).mean(0)
    saved = torch.load(out / "bn_reestimated.pt", weights_only=True)["model"]
    assert torch.allclose(saved[f"{name}.running_mean"], mean, atol=1e-5)
    assert torch.allclose(saved[f"{name}.running_var"], var, rtol=1e-4)
    assert not torch.equal(saved[f"{name}.running_mean"], last["model"][f"{name}.running_mean"])


def test_binary_per_channel_weights(shared_folder, tmp_path):
    """W1A2 with one α per output channel: frozen weights sit on ±α[c], never on 0."""
    out = tmp_path / "w1"
    assert run_cli(["--data-dir", shared_folder, "--output-dir", out, *SHAPE, *OSC, "--num-bits-weight", "1",
                    "--per-channel-weights", "--lr", "0.1"])[0] == 0
    rows = _rows(out)
    assert rows[1]["dampen"] > 0 and rows[2]["frozen"] > 0
    ckpt = torch.load(out / "last.pt", weights_only=True)
    for name, state in ckpt["oscillation"].items():
        w, alpha = ckpt["model"][f"{name}.weight"], ckpt["model"][f"{name}.weight_quant.alpha"]
        mask = state["frozen"]
        assert set(state["frozen_code"][mask].tolist()) <= {-1, 1}
        assert torch.equal(w[mask], (state["frozen_code"].float() * alpha.view(-1, 1, 1, 1))[mask])
