"""--act-quant-at relu-output: a quantizer at every activation's output (each block's output after its
residual add included) instead of at every conv / linear input. Which tensors are quantized (counted
by hand), values and gradients against the plain-autograd reference network, A-BR against BR of the
captured activations, the tensors between blocks on the grid, PTQ, resume, --evaluate and the export."""

import copy
import json
import signal

import pytest
import torch
from torch import nn

import engine
import quant.lsq
from capture import CapturingHookManager
from run.config import build_parser
from conftest import TINY, run_cli, signal_in_epoch
from deploy.integer import IntegerActivation, IntegerLayer, load_integer_model, save_integer_model
from deploy.onnx_qdq import export_onnx, quantizer_steps, run_session, session
from deploy.ptq import mse_step_size, quantize_post_training
from deploy.restore import build_network
from engine import Trainer
from models import build_model
from models.mobilenetv2 import MobileNetV2
from models.resnet import CifarResNet
from quant import LSQQuantizer, QuantAct, activation_quantizers, quantize_model, quantized_layers
from regularizers import BinRegularizer
from test_lsq_fused import plain_lsq

RO = "relu-output"
BLOCKS20 = [f"layers.{s}.{b}" for s in range(3) for b in range(3)]


# -- which tensors are quantized ------------------------------------------------------------------

def test_resnet20_quantized_tensors_counted_by_hand():
    conv_input = quantize_model(build_model("resnet20"), 2, 2, 8)
    relu_output = quantize_model(build_model("resnet20"), 2, 2, 8, act_quant_at=RO)
    # conv-input: the input of each of the 20 layers (stem conv, 18 block convs, linear)
    layers = ["conv1"] + [f"{b}.conv{i}" for b in BLOCKS20 for i in (1, 2)] + ["linear"]
    assert list(activation_quantizers(conv_input)) == layers
    # relu-output: the stem's ReLU, both ReLUs of each of the 9 blocks (act2: after the residual add),
    # and the two layers whose input is no activation's output: the image, the pooled features
    outputs = ["act1"] + [f"{b}.act{i}" for b in BLOCKS20 for i in (1, 2)]
    assert list(activation_quantizers(relu_output)) == ["conv1", *outputs, "linear"]
    assert len(outputs) == 19
    assert [n for n, m in relu_output.named_modules() if isinstance(m, QuantAct)] == outputs
    enabled_inputs = [n for n, m in quantized_layers(relu_output).items() if m.act_quant.enabled]
    assert enabled_inputs == ["conv1", "linear"]
    # every QuantAct of a ReLU network fuses its ReLU: unsigned 2-bit grid [0, 3]
    for name in outputs:
        q = dict(relu_output.named_modules())[name].act_quant
        assert (q.num_bits, q.quant_min, q.quant_max, q.input_relu) == (2, 0, 3, True)
    # step sizes: 20 weights + 21 activations (conv-input: 20 + 20)
    assert sum(isinstance(m, LSQQuantizer) and m.enabled for m in relu_output.modules()) == 41
    # A-BR regularises the 19 activation outputs; W-BR the 18 low-bit layers, as with conv-input
    cfg = build_parser().parse_args(["--act-quant-at", RO, "--lambda-br-act", "1"])
    trainer = Trainer(cfg, relu_output, None, None, torch.device("cpu"), log=lambda *_: None)
    assert list(trainer.br_act_quantizers) == outputs and len(trainer.br_layers) == 18


def test_resnet18_shortcut_convs_take_the_quantized_block_output():
    model = quantize_model(build_model("resnet18"), 2, 2, 8, act_quant_at=RO)
    shortcuts = [n for n in quantized_layers(model) if ".shortcut." in n]
    assert shortcuts == ["layers.1.0.shortcut.0", "layers.2.0.shortcut.0", "layers.3.0.shortcut.0"]
    # stem ReLU + 8 blocks x 2 ReLUs; only the stem conv and the linear quantize their own input
    assert len([m for m in model.modules() if isinstance(m, QuantAct)]) == 17
    assert [n for n, m in quantized_layers(model).items() if m.act_quant.enabled] == ["conv1", "linear"]


def _tiny_mobilenet(act_quant_at, clip_value=None):
    torch.manual_seed(0)
    # (t, c, n, s): a t = 1 block, then a residual pair, then a stride-2 block
    net = MobileNetV2(settings=((1, 8, 1, 1), (6, 8, 2, 1), (6, 16, 1, 2)), stem_width=8, last_width=32,
                      clip_value=clip_value)
    return quantize_model(net, 2, 2, 8, act_quant_at=act_quant_at)


def test_mobilenetv2_quantizes_every_relu6_and_each_block_output_signed():
    model = _tiny_mobilenet(RO)
    acts = {n: m.act_quant for n, m in model.named_modules() if isinstance(m, QuantAct)}
    relu6 = ["act1", "blocks.0.dw_act", "blocks.1.expand_act", "blocks.1.dw_act", "blocks.2.expand_act",
             "blocks.2.dw_act", "blocks.3.expand_act", "blocks.3.dw_act", "act2"]
    outputs = [f"blocks.{i}.block_output" for i in range(4)]
    assert sorted(acts) == sorted(relu6 + outputs)
    for name in relu6:  # after ReLU6 (a Hardtanh, not fused): unsigned [0, 3]
        assert (acts[name].quant_min, acts[name].quant_max, acts[name].input_relu) == (0, 3, False)
        assert isinstance(dict(model.named_modules())[name].activation, nn.ReLU6)
    for name in outputs:  # a linear bottleneck (+ residual): signed [-2, 1]
        assert (acts[name].quant_min, acts[name].quant_max) == (-2, 1)
    # every conv but the stem takes a quantized output: the expansion convs the previous block's
    assert [n for n, m in quantized_layers(model).items() if m.act_quant.enabled] == ["conv1", "linear"]
    # the same network as conv-input but for the quantizers: one output each
    float_net = _tiny_mobilenet("conv-input")
    assert len(quantized_layers(float_net)) == len(quantized_layers(model)) == 14


@pytest.mark.parametrize("clip", [None, 1.0])
def test_what_flows_between_blocks_is_on_the_grid(clip):
    """Each block's output, which is also the next block's identity shortcut, is k·α of its act2."""
    torch.manual_seed(0)
    model = quantize_model(build_model("resnet20", clip_value=clip), 2, 2, 8, act_quant_at=RO)
    model.train()(torch.randn(8, 3, 32, 32))  # initialise α
    seen = {}
    handles = [dict(model.named_modules())[b].register_forward_hook(
        lambda m, args, out, b=b: seen.update({b: (args[0], out)})) for b in BLOCKS20]
    with torch.no_grad():
        model.eval()(torch.randn(8, 3, 32, 32))
    for h in handles:
        h.remove()
    modules = dict(model.named_modules())

    def codes(values, name):  # values / α: integers, up to the last bit of the step the quantizer multiplied by
        c = values / modules[name].act_quant.alpha.detach()
        assert (c - c.round()).abs().max() < 1e-5
        return c.round()
    for i, b in enumerate(BLOCKS20):
        block_in, block_out = seen[b]
        out_codes = codes(block_out, f"{b}.act2")
        assert out_codes.min() == 0 and out_codes.max() <= 3 and len(out_codes.unique()) >= 3
        codes(block_in, "act1" if i == 0 else f"{BLOCKS20[i - 1]}.act2")  # the residual operand too


# -- values and gradients against the plain-autograd reference ---------------------------------------

class PlainQuantizer(nn.Module):
    """LSQ with plain autograd ops (``test_lsq_fused.plain_lsq``) on a quantizer's own α: the reference."""

    def __init__(self, q: LSQQuantizer):
        super().__init__()
        self.q = q

    def forward(self, x):
        q = self.q
        if not q.enabled:
            return x
        if q.input_relu:
            x = torch.relu(x)
        return plain_lsq(x, q.alpha, q.quant_min, q.quant_max, q.grad_scale(x))


def _plain_copy(model):
    ref = copy.deepcopy(model)
    modules = dict(ref.named_modules())
    for name, m in list(modules.items()):
        if isinstance(m, LSQQuantizer):
            parent, _, child = name.rpartition(".")
            setattr(modules[parent], child, PlainQuantizer(m))
    return ref


@pytest.mark.parametrize("kernels", [True, False])
@pytest.mark.parametrize("clip", [None, 1.0])
def test_values_and_gradients_equal_the_plain_reference(kernels, clip, monkeypatch):
    if not kernels:
        monkeypatch.setattr(quant.lsq, "kernels_apply", lambda _x: False)
    torch.manual_seed(0)
    model = quantize_model(CifarResNet((1, 1), (4, 8), "A", clip_value=clip), 2, 2, 8, act_quant_at=RO).train()
    gen = torch.Generator().manual_seed(1)
    model(torch.randn(6, 3, 16, 16, generator=gen))  # initialise α
    ref = _plain_copy(model)
    x = torch.randn(6, 3, 16, 16, generator=gen)
    weights = torch.randn(6, 10, generator=gen)
    results = []
    for net in (model, ref):
        xi = x.clone().requires_grad_()
        out = net(xi)
        (out * weights).sum().backward()
        grads = {n: p.grad.clone() for n, p in net.named_parameters()}
        results.append((out.detach(), xi.grad, {n.replace(".q.", "."): g for n, g in grads.items()}))
        net.zero_grad()
    (out, gx, grads), (ref_out, ref_gx, ref_grads) = results
    assert torch.equal(out, ref_out)
    torch.testing.assert_close(gx, ref_gx, rtol=1e-4, atol=1e-6)
    assert grads.keys() == ref_grads.keys() and any(n.endswith("act2.act_quant.alpha") for n in grads)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("to_alpha", [False, True])
def test_a_br_is_br_of_the_activation_outputs(to_alpha, monkeypatch):
    """A-BR from the quantizers' own statistics equals BR of the captured activation outputs (the
    independent eager path of regularizers.bin_reg), in value and gradient to the first conv's weight
    and to the activation step sizes."""
    flags = ["--act-quant-at", RO, "--epochs", "2", "--warmup-epochs", "1", "--lambda-br-act", "1"]
    cfg = build_parser().parse_args(flags + (["--br-backprop-to-alpha-act"] if to_alpha else []))
    torch.manual_seed(0)
    model = quantize_model(CifarResNet((1, 1), (4, 8), "A"), 2, 2, 8, act_quant_at=RO).train()
    monkeypatch.setattr(engine, "ActivationHookManager", CapturingHookManager)  # the captures: tests/capture.py
    trainer = Trainer(cfg, model, None, None, torch.device("cpu"), log=lambda *_: None)
    x = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    model(x)
    trainer.hooks.enabled = True
    model(x)
    names = ["act1", "layers.0.0.act1", "layers.0.0.act2", "layers.1.0.act1", "layers.1.0.act2"]
    assert list(trainer.hooks.get_bin_stats()) == names
    acts = trainer.hooks.get_pre_quant_activations()
    alphas = {n: trainer.br_act_quantizers[n].alpha for n in names}
    ref, _ = BinRegularizer(2, signed=False).compute_total_loss(acts, alphas, to_alpha)
    loss, _ = trainer.a_reg.total_from_stats(trainer.hooks.get_bin_stats())
    params = [model.conv1.weight] + list(alphas.values())
    got = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    expected = torch.autograd.grad(ref, params, allow_unused=True)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-4, atol=1e-7)
    zero = torch.zeros(())
    for g, e in zip(got[1:], expected[1:]):  # α upstream of a regularised activation: through the activations
        torch.testing.assert_close(zero if g is None else g, zero if e is None else e, rtol=1e-4, atol=1e-7)
    # the last output's α reaches A-BR only through its own target k·α: only with the flag
    assert (got[-1] is not None and float(got[-1]) != 0.0) == to_alpha


def test_freeze_act_alpha_freezes_the_activation_output_quantizers():
    cfg = build_parser().parse_args(["--act-quant-at", RO, "--epochs", "2", "--warmup-epochs", "1",
                                     "--freeze-act-alpha"])
    model = quantize_model(CifarResNet((1, 1), (4, 8), "A"), 2, 2, 8, act_quant_at=RO)
    trainer = Trainer(cfg, model, None, None, torch.device("cpu"), log=lambda *_: None)
    trainer.set_alpha_trainable(2)
    frozen = {n for n, p in model.named_parameters() if n.endswith("alpha") and not p.requires_grad}
    assert frozen == {"conv1.act_quant.alpha", "act1.act_quant.alpha", "linear.act_quant.alpha",
                      *(f"layers.{s}.0.act{i}.act_quant.alpha" for s in (0, 1) for i in (1, 2))}


# -- runs: resume, --evaluate, export, PTQ -----------------------------------------------------------

def _rows(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def ro_run(shared_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("ro") / "run"
    assert run_cli(["--data-dir", shared_folder, "--output-dir", out, *TINY, "--act-quant-at", RO])[0] == 0
    return out


def test_a_run_resumes_bit_for_bit_and_logs_every_step_size(ro_run, shared_folder, tmp_path, monkeypatch, capsys):
    rows = _rows(ro_run)
    assert rows[1]["br_a"] > 0 and rows[1]["br_w"] > 0
    assert set(rows[1]["alpha"]["layers.0.0.act2"]) == {"act"}
    assert set(rows[1]["alpha"]["layers.0.0.conv1"]) == {"weight"}
    assert len(rows[1]["br_a_info"]) == 1 + 19  # the total and each of the 19 activation outputs
    out = tmp_path / "again"
    argv = ["--data-dir", shared_folder, "--output-dir", out, *TINY, "--act-quant-at", RO]
    with monkeypatch.context() as m:
        signal_in_epoch(m, 2, signal.SIGTERM)
        rc, _, _ = run_cli(argv, capsys)
    assert rc == 128 + signal.SIGTERM
    rc, stdout, err = run_cli(["--resume", "--output-dir", out], capsys)
    assert rc == 0, err
    assert _rows(out) == rows
    rc, _, err = run_cli(["--resume", "--output-dir", out, "--act-quant-at", "conv-input"], capsys)
    assert rc == 2 and "--act-quant-at conv-input (run: relu-output)" in err


def test_evaluate_rebuilds_the_placement(ro_run, capsys):
    rc, out, err = run_cli(["--evaluate", ro_run / "last.pt", "--workers", "0"], capsys)
    assert rc == 0, err
    assert f"Test top-1 {_rows(ro_run)[1]['test_acc']:.2f}%" in out and "41 step sizes" in out
    assert "activations quantized at every activation's output" in out
    rc, _, err = run_cli(["--evaluate", ro_run / "last.pt", "--workers", "0", "--act-quant-at", "conv-input"], capsys)
    assert rc == 2 and "--act-quant-at conv-input contradicts it" in err


def test_export_checks_pass(ro_run, tmp_path, capsys):
    import export
    assert export.main([str(ro_run / "last.pt"), "--out", str(tmp_path / "e"), "--workers", "0"]) == 0
    report = json.loads((tmp_path / "e" / "export.json").read_text())
    assert report["checks_passed"] and report["integer_prediction_agreement"] == 1.0


def _initialised(model, shape=(16, 3, 32, 32), seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        model.train()(torch.randn(shape))
    return model.eval()


def _assert_logits_agree(got, expected):
    close = ((got - expected).abs() <= 1e-5 + 1e-5 * expected.abs()).all(1)
    assert int(close.sum()) >= 0.75 * len(close), (got - expected).abs().max(1).values
    assert (got.argmax(1) == expected.argmax(1)).float().mean() >= 0.75


@pytest.mark.parametrize("arch,clip", [("resnet20", None), ("resnet20", 1.0), ("mobilenetv2", None)])
def test_onnx_and_integer_reference_follow_the_placement(arch, clip, tmp_path):
    cfg = {"arch": arch, "weight_bits": 2, "act_bits": 2, "first_last_bits": 8, "clip_value": clip,
           "act_quant_at": RO}
    model = _initialised(build_network(cfg), (8, 3, 32, 32))
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    steps = quantizer_steps(model, x)
    onnx_model = export_onnx(model, x, steps)
    ops = [n.op_type for n in onnx_model.graph.node]
    if arch == "resnet20":
        # 21 activation quantizers, plus one QDQ again after each of the 2 option-A subsamplings (the
        # Slice takes the quantizer's input); 20 weights
        assert ops.count("QuantizeLinear") == 23 and ops.count("DequantizeLinear") == 43
    with torch.no_grad():
        expected = model(x)
    _assert_logits_agree(run_session(session(onnx_model), x), expected)
    save_integer_model(model, steps, cfg, tmp_path / "m.npz")
    reference = load_integer_model(tmp_path / "m.npz")
    integer_layers = [m for m in reference.modules() if isinstance(m, IntegerLayer)]
    assert all(m.integer for m in integer_layers)  # every layer accumulates codes, its input's grid given
    assert len([m for m in reference.modules() if isinstance(m, IntegerActivation)]) == len(
        [m for m in model.modules() if isinstance(m, QuantAct)])
    with torch.no_grad():
        _assert_logits_agree(reference(x), expected)


def test_ptq_calibrates_each_activation_output():
    torch.manual_seed(0)
    model = build_model("resnet20").eval()
    batches = [torch.randn(8, 3, 8, 8) for _ in range(2)]  # small images: every value is kept (below 32768)
    test = torch.randn(8, 3, 8, 8)
    with torch.no_grad():
        reference = model(test)
    # the MSE-optimal α of each ReLU's output, from the float network by its own hooks (the reference)
    outputs = {}
    handles = [m.register_forward_hook(lambda mod, a, out, n=n: outputs.setdefault(n, []).append(out.flatten()))
               for n, m in model.named_modules() if isinstance(m, nn.ReLU)]
    with torch.no_grad():
        for b in batches:
            model(b)
    for h in handles:
        h.remove()
    with torch.no_grad():
        quantize_post_training(model, 8, 8, 8, batches, seed=0, bn_recalib=False, act_quant_at=RO)
        logits = model(test)
    assert (logits - reference).norm() / reference.norm() < 0.05
    acts = {n: m.act_quant for n, m in model.named_modules() if isinstance(m, QuantAct)}
    assert len(acts) == 19
    for name in ("act1", "layers.1.1.act2"):
        values = torch.cat(outputs[name])
        assert float(acts[name].alpha.detach()) == pytest.approx(mse_step_size(values, 0, 255), rel=1e-6)
