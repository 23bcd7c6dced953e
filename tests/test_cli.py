"""The main job end to end on a tiny image folder, banners, and the BR / step-size rules."""

import json
import os

import pytest
import torch

from conftest import TINY, run_cli
from run.config import SCENARIOS, build_parser, default_output_dir, explicit_flags, resolve_freeze_alpha
from run.data import DeviceLoader, Split
from engine import Trainer
from models import build_model
from quant import quantize_model
from regularizers import BinRegularizer


def _read_metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_end_to_end_two_stages(shared_folder, tmp_path, capsys):
    out = tmp_path / "run"
    rc, stdout, _ = run_cli(["--data-dir", shared_folder, "--output-dir", out, *TINY], capsys)
    assert rc == 0, stdout
    for name in ("config.json", "metrics.jsonl", "last.pt", "best.pt", "summary.json", "warmup_end.pt"):
        assert (out / name).exists(), name
    rows = _read_metrics(out)
    assert [r["epoch"] for r in rows] == [1, 2] and [r["stage"] for r in rows] == [1, 2]
    assert rows[0]["br_w"] == 0.0 and rows[0]["br_a"] == 0.0
    assert rows[1]["br_w"] > 0.0 and rows[1]["br_a"] > 0.0
    assert rows[1]["loss"] > rows[1]["ce"]
    assert "Epoch 1/2 [warmup]" in stdout and "Epoch 2/2 [BR]" in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] == 2 and summary["status"] == "finished"
    assert summary["best_test_acc_optimistic"] == max(r["test_acc"] for r in rows)  # no --val-split: on test
    config = json.loads((out / "config.json").read_text())
    assert config["flags"]["lambda_br"] == 1.0 and config["derived"]["weight_bits"] == 2
    assert config["versions"]["torch"] == torch.__version__
    layer = "layers.0.0.conv1"
    assert set(rows[1]["alpha"][layer]) == {"weight", "act"}
    assert rows[1]["bins"][layer]["flips"] is not None and len(rows[1]["bins"][layer]["occupancy"]) == 4
    assert rows[1]["br_w_info"]["total"]["nonempty_bins"] > 0


def _banner(capsys, *flags):
    rc, out, _ = run_cli(["--dry-run", "--data-dir", "/nonexistent", *flags], capsys)
    assert rc == 0
    return out


@pytest.mark.parametrize("key", SCENARIOS)
def test_dry_run_banners_for_the_scenarios(capsys, key):
    flags = SCENARIOS[key][1].split()
    scenario = build_parser().parse_args(flags)
    resolve_freeze_alpha(scenario)  # the run's rule where the scenario does not say (lsq)
    lam_w, lam_a, backprop = scenario.lambda_br, scenario.lambda_br_act, scenario.br_backprop_to_alpha_act
    out = _banner(capsys, *flags)
    assert f"  - Freeze alpha after warmup: {scenario.freeze_alpha}" in out.splitlines()
    assert "Starting 2-Stage QAT+BR Training" in out
    assert "Stage 1 (Warmup): Epochs 1-30 (LSQ only)" in out.splitlines()
    w_line = f"  - W-BR (weights): λ={lam_w} [{'ENABLED' if lam_w else 'DISABLED'}]"
    a_line = f"  - A-BR (activations): λ={lam_a} [{'ENABLED' if lam_a else 'DISABLED'}]"
    assert w_line in out.splitlines() and a_line in out.splitlines()
    assert ("Gradients to alpha: Always enabled" in out) == bool(lam_w)
    a_alpha_line = f"    └─> Gradients to alpha: {backprop} (default: False, recommended)"
    assert (a_alpha_line in out.splitlines()) == bool(lam_a)
    assert ("Stage 2 (BR): Epochs 31-100 (both λ = 0" in out) == (not lam_w and not lam_a)
    assert "WARNING" not in out


@pytest.mark.parametrize("flags,note", [
    (["--lambda-br-act", "1"], "True ended 2.33 and 2.40 points above False"),  # α trained by default with A-BR on
    (["--lambda-br-act", "1", "--br-backprop-to-alpha-act"], "this gradient shrinks it"),
    (["--lambda-br-act", "1", "--br-backprop-to-alpha-act", "--freeze-weight-alpha"], "this gradient shrinks it"),
    (["--lambda-br-act", "1", "--br-backprop-to-alpha-act", "--freeze-alpha"], "this gradient cannot change it"),
    (["--lambda-br-act", "1", "--br-backprop-to-alpha-act", "--freeze-act-alpha"], "this gradient cannot change it"),
    (["--lambda-br-act", "1", "--freeze-alpha"], None),
    (["--lambda-br-act", "1", "--br-backprop-to-alpha-act", "--warmup-epochs", "100"], None),  # no stage 2
    (["--lambda-br-act", "0"], None),
])
def test_a_br_gradient_note_says_what_the_study_measured_where_the_activation_alpha_is_trained(capsys, flags,
                                                                                                note):
    lines = _banner(capsys, *flags).splitlines()
    a_br = [i for i, x in enumerate(lines) if x.startswith("  - A-BR (activations)")]
    after = lines[a_br[0] + 1:a_br[0] + 3]
    notes = [x for x in after if x.startswith("    └─> Note: ")]
    if note is None:
        assert not any("activation alpha" in x for x in notes), after
    else:
        assert len(notes) == 1 and note in notes[0], after


def test_banner_example_wording_and_freeze_truth_line(capsys):
    out = _banner(capsys, "--freeze-alpha")
    expected = """================================================================================
Starting 2-Stage QAT+BR Training
================================================================================
Stage 1 (Warmup): Epochs 1-30 (LSQ only)
Stage 2 (BR): Epochs 31-100

BR Configuration:
  - W-BR (weights): λ=1.0 [ENABLED]
    └─> Gradients to alpha: Always enabled (paper-faithful, weights are stable)"""
    assert out.startswith(expected)
    assert "  - A-BR (activations): λ=0.0 [DISABLED]" in out.splitlines()  # off unless asked for (not the seed's 1)
    assert "  - Freeze alpha after warmup: True" in out
    assert "weight alpha is frozen after warmup, so in stage 2 this gradient cannot change it" in out
    assert "Data: " in out and "Output: results/resnet20_w2a2" in out
    assert "random initialisation" in out


def test_a_br_off_by_default_is_said_under_its_line(capsys):
    """A-BR is off unless --lambda-br-act is given (unlike the seed): the banner says why under its line,
    and only when the default made it so on quantized activations."""
    def noted(*flags):
        lines = _banner(capsys, *flags).splitlines()
        at = [i for i, x in enumerate(lines) if x.startswith("  - A-BR (activations): ")]
        return bool(at) and lines[at[0] + 1].startswith("    └─> Note: off by default (the seed's default was λ=1")
    assert noted() and noted("--num-bits-weight", "32", "--num-bits-act", "2")
    assert not noted("--lambda-br-act", "0") and not noted("--lambda-br-act", "1")
    assert not noted("--num-bits-weight", "2", "--num-bits-act", "32")  # nothing for A-BR to act on


def test_w_br_with_weight_alpha_trained_says_what_the_study_measured(capsys):
    """A run that trains the weight α under W-BR alone (not the default since the study) hears, under the W-BR
    line, that the study measured W-BR with --freeze-alpha ahead; nothing where the weight α is frozen, W-BR off,
    or A-BR on (there the study measured α trained ahead, which the Alpha Control note says)."""
    def noted(*flags):
        lines = _banner(capsys, *flags).splitlines()
        at = lines.index("    └─> Gradients to alpha: Always enabled (paper-faithful, weights are stable)") \
            if "  - W-BR (weights): λ=1.0 [ENABLED]" in lines else None
        return at is not None and lines[at + 1].startswith("    └─> Note: weight alpha is trained in stage 2; in this "
                                                           "tool's W2A2 CPU study")
    assert noted("--no-freeze-alpha") and noted("--freeze-act-alpha") and noted("--lambda-br-act", "1",
                                                                                "--num-bits-act", "32",
                                                                                "--no-freeze-alpha")  # A-BR no effect
    assert not noted()  # frozen by default with W-BR alone
    assert not noted("--lambda-br-act", "1") and not noted("--lambda-br-act", "1", "--br-backprop-to-alpha-act")
    assert not noted("--freeze-alpha") and not noted("--freeze-weight-alpha") and not noted("--lambda-br", "0")
    assert not noted("--epochs", "3", "--warmup-epochs", "3")  # no stage 2


@pytest.mark.parametrize("flags,frozen", [
    ([], True),  # W-BR at its default λ_w = 1, a stage 2 (epochs 31-100)
    (["--lambda-br", "0"], False),  # the LSQ baseline trains α
    (["--lambda-br", "0", "--lambda-br-act", "1"], False),  # A-BR on: α trained (W+A measured ahead so)
    (["--lambda-br-act", "1"], False), (["--lambda-br-act", "1", "--num-bits-act", "32"], True),  # A-BR acts, or not
    (["--num-bits", "32"], False),  # float: no step sizes
    (["--num-bits-weight", "32", "--num-bits-act", "2"], False),  # W-BR has no quantized weights, A-BR is off
    (["--epochs", "3", "--warmup-epochs", "3"], False),  # no stage 2 to freeze α in
    (["--epochs", "3"], True),  # warmup 1 (30 % of 3, rounded): epochs 2-3 are stage 2
    (["--epochs", "1"], False), (["--warmup-epochs", "0"], False),  # no warmup: α would never be learned
    (["--lambda-br-act", "1", "--br-backprop-to-alpha-act"], False),  # A-BR on: trained (the moving target too)
    (["--br-backprop-to-alpha-act"], True),  # A-BR is off: nothing for its target to move
    (["--lambda-br-act", "1", "--freeze-alpha"], True),  # given: as given
    (["--freeze-weight-alpha"], False), (["--freeze-act-alpha"], False),  # the user chose which α to freeze
    (["--no-freeze-alpha"], False), (["--lambda-br", "0", "--freeze-alpha"], True),  # given: as given
])
def test_br_runs_freeze_alpha_unless_told_otherwise(flags, frozen):
    cfg = build_parser().parse_args(flags)
    assert resolve_freeze_alpha(cfg) == ("freeze_alpha" not in explicit_flags(flags)) and cfg.freeze_alpha is frozen
    assert default_output_dir(cfg).endswith("_frz_s42") == frozen  # the folder name says it


def test_the_banner_says_why_alpha_is_frozen_or_not_by_default(capsys):
    def alpha_notes(*flags):
        lines = _banner(capsys, *flags).splitlines()
        at = lines.index("Alpha Control:")
        return [x for x in lines[at + 2:at + 3] if x.startswith("    └─> Note: ")]
    on = alpha_notes()
    assert len(on) == 1 and on[0].startswith("    └─> Note: on by default with W-BR alone, as in the seed's W-only")
    assert "ended 0.43-0.44 points below" in on[0] and on[0].endswith("--no-freeze-alpha trains alpha")
    for flags in (["--lambda-br-act", "1"], ["--lambda-br", "0", "--lambda-br-act", "1"],
                  ["--lambda-br-act", "1", "--br-backprop-to-alpha-act"]):  # A-BR on: off, with the study's W+A rows
        off = alpha_notes(*flags)
        assert len(off) == 1 and off[0].startswith("    └─> Note: off by default with A-BR on, unlike the seed's A-BR "
                                                   "scenarios: W+A stable with alpha trained ended 0.46 and "), flags
    assert alpha_notes("--freeze-weight-alpha") == [
        "    └─> Note: off, as --freeze-weight-alpha decides the step sizes (runs with W-BR alone freeze them by "
        "default); --freeze-alpha freezes every one"]
    assert "--freeze-weight-alpha and --freeze-act-alpha decide" in alpha_notes("--freeze-weight-alpha",
                                                                                "--freeze-act-alpha")[0]
    # With A-BR on, the flags given are why it is off, not A-BR (no "off by default with A-BR on" beside them)
    assert alpha_notes("--lambda-br-act", "1", "--freeze-weight-alpha", "--freeze-act-alpha") == [
        "    └─> Note: off, as --freeze-weight-alpha and --freeze-act-alpha decide the step sizes; --freeze-alpha "
        "freezes every one"]
    for flags in (["--freeze-alpha"], ["--no-freeze-alpha"], ["--lambda-br", "0"],  # given, or no BR: no note
                  ["--lambda-br-act", "1", "--no-freeze-alpha"], ["--epochs", "3", "--warmup-epochs", "3"]):
        assert alpha_notes(*flags) == [], flags


def test_cpu_banner_says_how_many_threads_torch_uses(capsys):
    before = torch.get_num_threads()
    try:
        for n, words in ((1, "1 thread"), (2, "2 threads")):
            torch.set_num_threads(n)  # as OMP_NUM_THREADS=n would
            assert f"Device: cpu with {words} (OMP_NUM_THREADS)" in _banner(capsys, "--device", "cpu")
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("bits,w_state,a_state", [  # (a float run's banner has no BR block at all)
    (["--num-bits-weight", "2", "--num-bits-act", "32"], "[ENABLED]",
     "[NO EFFECT: activations are not quantized (32 bits)]"),
    (["--num-bits-weight", "32", "--num-bits-act", "2"], "[NO EFFECT: weights are not quantized (32 bits)]",
     "[ENABLED]"),
])
def test_banner_never_enables_a_br_term_without_quantized_tensors(capsys, bits, w_state, a_state):
    lines = _banner(capsys, *bits, "--lambda-br-act", "1").splitlines()  # λ = 1 for both terms
    assert f"  - W-BR (weights): λ=1.0 {w_state}" in lines
    assert f"  - A-BR (activations): λ=1.0 {a_state}" in lines
    # the sub-lines of a term appear only when it acts; each term without effect has its warning
    assert any("Gradients to alpha: Always enabled" in x for x in lines) == (w_state == "[ENABLED]")
    assert any("Gradients to alpha: False" in x for x in lines) == (a_state == "[ENABLED]")
    assert sum(x.startswith("WARNING: --lambda-br") for x in lines) == 2 - [w_state, a_state].count("[ENABLED]")


def test_float_run_banner_speaks_of_no_quantization(capsys):
    lines = _banner(capsys, "--num-bits", "32", "--lambda-br", "0", "--lambda-br-act", "0",
                    "--epochs", "10").splitlines()
    assert "Starting float training (the baseline: nothing quantized)" in lines
    assert "Schedule: epochs 1-10, float; no quantizers, so no BR and no step sizes (alpha)" in lines
    assert not any(x.startswith(("Stage", "BR Configuration", "Alpha Control")) or "[ENABLED]" in x for x in lines)
    # λ = 1 of both terms has nothing to act on: said once each, as a warning (A-BR is off by default)
    for flags, warnings in (([], 1), (["--lambda-br-act", "1"], 2)):
        lines = _banner(capsys, "--num-bits", "32", *flags).splitlines()
        assert sum(x.startswith(("WARNING: --lambda-br has no effect", "WARNING: --lambda-br-act has no effect"))
                   for x in lines) == warnings


def test_useless_flag_gets_a_banner_warning(capsys):
    out = _banner(capsys, "--lambda-br-act", "0", "--br-backprop-to-alpha-act")
    assert "WARNING: --br-backprop-to-alpha-act has no effect" in out


# -- the rules on gradients, checked on the training step itself -----------------------------

def _trainer(*flags):
    cfg = build_parser().parse_args(["--epochs", "4", "--warmup-epochs", "1", "--lambda-br-act", "1", *flags])
    torch.manual_seed(0)
    model = quantize_model(build_model("resnet20"), 2, 2)
    split = Split(torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8), torch.arange(8) % 10)
    loader = DeviceLoader(split, 4, torch.device("cpu"), train=True)
    trainer = Trainer(cfg, model, loader, DeviceLoader(split, 8, torch.device("cpu"), train=False),
                      torch.device("cpu"), log=lambda *_: None)
    model.train()
    model(next(loader.batches(0))[0])  # initialise every step size
    return trainer


def _br_term_gradients(trainer, term):
    """Gradient sizes of one BR term alone: ``(|d/dα|, |d/d(values)|)``.

    W-BR: every regularised layer's weight α, and the weights. A-BR: the activation α of the
    last regularised layer, the one α that A-BR can reach only through its own target k·α
    (no regularised activation lies downstream of it), and the first conv's weight, which
    A-BR reaches through the activations it regularises.
    """
    x, _ = next(trainer.train_loader.batches(0))
    trainer.hooks.enabled = True
    trainer.model(x)
    layers = list(trainer.br_layers.values())
    if term == "w":
        loss, _ = trainer.w_reg.total_from_stats(trainer.weight_stats.get())
        alphas, values = [m.weight_quant.alpha for m in layers], [m.weight for m in layers]
    else:
        assert set(trainer.hooks.get_bin_stats()) == set(trainer.br_layers)
        loss, _ = trainer.a_reg.total_from_stats(trainer.hooks.get_bin_stats())
        alphas, values = [layers[-1].act_quant.alpha], [trainer.model.conv1.weight]
    grads = torch.autograd.grad(loss, alphas + values, allow_unused=True)
    norm = lambda gs: sum(0.0 if g is None else g.abs().sum().item() for g in gs)  # noqa: E731
    return norm(grads[:len(alphas)]), norm(grads[len(alphas):])


def test_a_br_sends_no_gradient_to_activation_alpha_unless_asked():
    alpha_grad, value_grad = _br_term_gradients(_trainer(), "a")
    assert alpha_grad == 0.0 and value_grad > 0.0
    alpha_grad, value_grad = _br_term_gradients(_trainer("--br-backprop-to-alpha-act"), "a")
    assert alpha_grad > 0.0 and value_grad > 0.0


def test_w_br_reaches_weight_alpha():
    alpha_grad, value_grad = _br_term_gradients(_trainer(), "w")
    assert alpha_grad > 0.0 and value_grad > 0.0


def test_w_br_from_the_weight_quantizers_equals_br_of_the_weights():
    trainer = _trainer()
    trainer.model(next(trainer.train_loader.batches(0))[0])
    layers = trainer.br_layers
    alphas = [m.weight_quant.alpha for m in layers.values()]
    loss, _ = trainer.w_reg.total_from_stats(trainer.weight_stats.get())
    grads = torch.autograd.grad(loss, alphas)
    # the independent path: BR of the weight tensors themselves (regularizers.bin_reg, plain autograd)
    ref, _ = BinRegularizer(2, signed=True).compute_total_loss(
        {n: m.weight for n, m in layers.items()}, {n: m.weight_quant.alpha for n, m in layers.items()}, True)
    ref_grads = torch.autograd.grad(ref, alphas)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(torch.stack(grads), torch.stack(ref_grads), rtol=1e-4, atol=1e-7)


def test_stage_one_computes_no_br():
    trainer = _trainer()
    x, y = next(trainer.train_loader.batches(0))
    loss, _, ce, br_w, br_a, w_info, a_info = trainer.forward_losses(x, y, use_br=False)
    assert br_w.item() == 0.0 and br_a.item() == 0.0 and w_info is None and a_info is None
    assert torch.equal(loss, ce)


@pytest.mark.parametrize("flag,frozen_kinds", [("--freeze-alpha", {"weight", "act"}),
                                                ("--freeze-weight-alpha", {"weight"}),
                                                ("--freeze-act-alpha", {"act"})])
def test_freeze_keeps_alpha_bit_identical_through_stage_two(flag, frozen_kinds):
    trainer = _trainer(flag, "--br-backprop-to-alpha-act", "--lr", "0.1")

    def alphas():
        return {(n, kind): q.alpha.detach().clone() for n, m in trainer.layers.items()
                for kind, q in (("weight", m.weight_quant), ("act", m.act_quant))}

    trainer.set_alpha_trainable(1)
    for x, y in trainer.train_loader.batches(1):  # a warmup step builds momentum for every α
        trainer.train_step(x, y, use_br=False)
    before = alphas()
    trainer.set_alpha_trainable(2)
    for epoch in (2, 3):
        for x, y in trainer.train_loader.batches(epoch):
            trainer.train_step(x, y, use_br=True)
    after = alphas()
    for key, value in before.items():
        same = torch.equal(value, after[key])
        assert same == (key[1] in frozen_kinds), key


def test_float_baseline_then_pretrained_qat(shared_folder, tmp_path, capsys):
    fp = tmp_path / "fp"
    rc, out, _ = run_cli(["--data-dir", shared_folder, "--output-dir", fp, "--num-bits", "32",
                          "--lambda-br", "0", "--lambda-br-act", "0", *TINY], capsys)
    assert rc == 0
    assert "Bits: full precision" in out and "[float]" in out
    # its banner says it has no BR: its epoch lines have no BR fields either
    epoch_lines = [x for x in out.splitlines() if x.startswith("Epoch ")]
    assert len(epoch_lines) == 2 and all(" (CE) | " in x and "BR" not in x for x in epoch_lines)
    state = torch.load(fp / "best.pt", weights_only=True)["model"]
    assert not any("_quant" in k for k in state)
    qat = tmp_path / "qat"
    rc, out, _ = run_cli(["--data-dir", shared_folder, "--output-dir", qat, "--pretrained", fp / "best.pt",
                          *TINY], capsys)
    assert rc == 0, out
    assert f"Init: float checkpoint {fp / 'best.pt'}" in out
    # The QAT model started from the float weights: the first epoch's model differs from a random start
    # only through training, so check the loaded weights directly on a fresh conversion.
    import cifar10_qat_br
    cfg = build_parser().parse_args(["--pretrained", str(fp / "best.pt")])
    model = cifar10_qat_br.build_quantized_model(cfg)
    assert torch.equal(model.layers[0][0].conv1.weight, state["layers.0.0.conv1.weight"])


@pytest.mark.parametrize("lambda_act,warned", [("1e8", True), ("1", False)])
def test_a_br_term_orders_of_magnitude_above_ce_is_warned_about_in_the_first_br_epoch(lambda_act, warned):
    from models.resnet import CifarResNet
    torch.manual_seed(0)
    cfg = build_parser().parse_args(["--epochs", "2", "--warmup-epochs", "0", "--lr", "1e-12",
                                     "--lambda-br-act", lambda_act])
    model = quantize_model(CifarResNet((1, 1), (4, 8), "A"), 2, 2)
    split = Split(torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8), torch.arange(4))
    cpu = torch.device("cpu")
    lines = []
    trainer = Trainer(cfg, model, DeviceLoader(split, 4, cpu, train=True), DeviceLoader(split, 4, cpu, train=False),
                      cpu, log=lines.append)
    row = trainer.run_epoch(1, {})
    weighted = float(lambda_act) * row["br_a"]
    assert (weighted > 100 * row["ce"]) == warned  # A-BR of a random net is ~0.01-1, CE ~2.3
    warnings = [line for line in lines if line.startswith("WARNING")]
    assert len(warnings) == int(warned)
    if warned:
        assert f"--lambda-br-act {float(lambda_act):g} x BR = {weighted:.4g} is" in warnings[0]
        assert "the cross-entropy" in warnings[0]
    trainer.run_epoch(2, {})  # not the first BR epoch: no second warning
    assert len([line for line in lines if line.startswith("WARNING")]) == int(warned)
