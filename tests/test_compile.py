"""--compile: the whole training forward pass (network, LSQ, fused ReLU, both BR terms) compiles
into one graph with no graph break, and its loss and gradients equal the eager step's.

The compiled graphs here run on the ``aot_eager`` backend (the graph torch.compile captures,
forward and backward, run by PyTorch's own ops: seconds to build, where inductor's C++ code
generation takes minutes on this CPU) in float64, so rounding decisions cannot differ from
the eager reference's. One small inductor test checks the generated code of the quantizer
and the bin statistics themselves.
"""

from __future__ import annotations

import copy

import pytest
import torch

from run import config as cfgmod
import engine
from models.resnet import CifarResNet
from quant import quantize_model
from quant.lsq import LSQQuantizer


def _tiny_trainer(extra_flags):
    torch.manual_seed(0)
    flags = ["--device", "cpu", "--compile", "off", "--lambda-br-act", "1"]  # both BR terms, as the cases say
    cfg = cfgmod.build_parser().parse_args(flags + extra_flags)
    model = quantize_model(CifarResNet((1, 1), (4, 8), "A"), 2, 2, 8,
                           per_channel_weights=cfg.per_channel_weights, act_quant_at=cfg.act_quant_at).double()
    return engine.Trainer(cfg, model, None, None, torch.device("cpu"), log=lambda *_: None)


def _step(trainer, losses, x, y, use_br):
    trainer.model.zero_grad(set_to_none=True)
    if trainer.hooks is not None:
        trainer.hooks.enabled = use_br
    if trainer.weight_stats is not None:
        trainer.weight_stats.enabled = use_br
    loss, logits, ce, br_w, br_a, *_ = losses(x, y, use_br)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return torch.stack([loss, ce, br_w, br_a]).detach(), logits.detach(), grads


@pytest.mark.parametrize("flags,use_br", [
    (["--br-backprop-to-alpha-act"], True),   # W-BR + A-BR with the moving target
    ([], True),                               # W-BR + A-BR, detached target
    (["--lambda-br", "0"], True),             # A-only
    ([], False),                              # stage 1: LSQ only
    (["--per-channel-weights"], True),        # W-BR per channel (one α per output channel)
    (["--act-quant-at", "relu-output"], True),  # a quantizer at every ReLU's output, A-BR on those
])
def test_training_forward_compiles_whole_and_matches_eager(flags, use_br):
    trainer = _tiny_trainer(flags)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 3, 8, 8, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 10, (6,), generator=gen)
    trainer.model.train()
    trainer.model(x)  # initialise every α from this batch, eagerly (as the Trainer does)
    fused = (trainer.model.layers[0][0].act1 if "relu-output" in flags else trainer.model.layers[0][0].conv2).act_quant
    assert fused.input_relu  # the fused ReLU is in the graph
    start = copy.deepcopy(trainer.model.state_dict())
    eager = _step(trainer, trainer.forward_losses, x, y, use_br)
    trainer.model.load_state_dict(start)
    # fullgraph=True: any graph break is an error
    compiled = torch.compile(trainer.forward_losses, fullgraph=True, backend="aot_eager", dynamic=False)
    got = _step(trainer, compiled, x, y, use_br)
    assert (eager[0][2:] > 0).tolist() == [use_br and "0" not in flags, use_br]  # the BR terms ran
    torch.testing.assert_close(got[0], eager[0], rtol=1e-12, atol=0)
    torch.testing.assert_close(got[1], eager[1], rtol=1e-12, atol=0)
    assert got[2].keys() == eager[2].keys()
    assert any(n.endswith("act_quant.alpha") for n in eager[2])
    for name in eager[2]:
        torch.testing.assert_close(got[2][name], eager[2][name], rtol=1e-10, atol=1e-14, msg=name)


def test_inductor_code_of_quantizer_and_bin_statistics_matches_eager():
    """The code inductor generates for a fused-ReLU LSQ quantizer with its bin statistics (the
    masked per-bin sums) and their gradients to the input and to α."""
    q = LSQQuantizer(2, signed=False, grad_count="per_sample").double().train()
    q.input_relu = True
    with torch.no_grad():
        q.alpha.fill_(0.25)
        q.initialized.fill_(True)
    q._is_initialized = True
    captured = []
    q.bin_stats_sink, q.bin_stats_grad_to_alpha = captured.append, True
    gen = torch.Generator().manual_seed(2)
    x = (torch.randn(4, 3, 5, 5, generator=gen, dtype=torch.float64) * 0.7).requires_grad_()
    out_weights = torch.randn(4, 3, 5, 5, generator=gen, dtype=torch.float64)
    stat_weights = torch.tensor([[0.0] * 4, [0.5, -1.0, 2.0, 0.25], [1.0, 3.0, -0.5, 2.0]], dtype=torch.float64)

    def loss(x):
        captured.clear()
        out = q(x)
        stats = captured[0].stats
        return ((out * out_weights).sum() + (stats * stat_weights).sum(), out.detach(), stats.detach(),
                captured[0].abs_sum)

    results = []
    for fn in (loss, torch.compile(loss, fullgraph=True, dynamic=False)):
        value, out, stats, abs_sum = fn(x)
        results.append((value.detach(), out, stats, abs_sum) + torch.autograd.grad(value, (x, q.alpha)))
    for got, expected in zip(*reversed(results)):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-15)
    assert results[0][2][0].sum() == x.numel()  # every value in some bin


def test_loader_drop_last_gives_static_batches():
    from run.data import DeviceLoader, Split
    split = Split(torch.zeros(41, 3, 32, 32, dtype=torch.uint8), torch.arange(41) % 10)
    shapes = lambda loader: [x.shape[0] for x, _ in loader.batches(1)]  # noqa: E731
    assert shapes(DeviceLoader(split, 16, torch.device("cpu"), train=True, drop_last=True)) == [16, 16]
    assert shapes(DeviceLoader(split, 16, torch.device("cpu"), train=True)) == [16, 16, 9]
    assert shapes(DeviceLoader(split, 16, torch.device("cpu"), train=False, drop_last=True)) == [16, 16, 9]


def test_compile_flag_resolves_by_device():
    parse = cfgmod.build_parser().parse_args
    assert cfgmod.compile_mode(parse(["--device", "cpu"])) == "off"        # auto: the C++ kernels
    assert cfgmod.compile_mode(parse(["--device", "cpu", "--compile"])) == "default"
    assert cfgmod.compile_mode(parse(["--device", "cpu", "--compile", "max-autotune"])) == "max-autotune"
    old_run = parse(["--device", "cpu"])
    old_run.compile = True  # config.json of a run before the modes existed
    assert cfgmod.compile_mode(old_run) == "default"
    with pytest.raises(cfgmod.ConfigError, match="--compile must be"):
        cfgmod.compile_mode(parse(["--device", "cpu", "--compile", "fast"]))


def test_compiled_training_epochs(tmp_path, monkeypatch):
    """Two epochs (LSQ, then LSQ + W-BR + A-BR) of the Trainer with --compile (aot_eager backend):
    the first step runs eagerly (it initialises α), the rest compiled; evaluation compiled."""
    from run.data import DeviceLoader, Split
    modes, compiled_calls = [], []
    real_compile = torch.compile

    def aot_eager_compile(fn, mode=None, dynamic=None):
        modes.append(mode)
        inner = real_compile(fn, backend="aot_eager", dynamic=dynamic)

        def counted(*args):
            compiled_calls.append(fn)
            return inner(*args)
        return counted

    monkeypatch.setattr(engine.torch, "compile", aot_eager_compile)
    torch.manual_seed(0)
    cfg = cfgmod.build_parser().parse_args(["--device", "cpu", "--compile", "--epochs", "2", "--warmup-epochs", "1",
                                            "--batch-size", "8", "--lambda-br-act", "1"])
    model = quantize_model(CifarResNet((1, 1), (4, 8), "A"), 2, 2, 8)
    gen = torch.Generator().manual_seed(3)
    split = Split(torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8, generator=gen), torch.arange(20) % 10)
    cpu = torch.device("cpu")
    trainer = engine.Trainer(cfg, model, DeviceLoader(split, 8, cpu, train=True, drop_last=True),
                             DeviceLoader(split, 10, cpu, train=False), cpu, str(tmp_path), log=lambda *_: None)
    assert modes == ["default", "default"]  # the training forward pass and evaluation
    trainer.fit({})
    # 2 training steps per epoch (20 images, batch 8), the first one eager; 2 evaluation batches per epoch
    assert [f is trainer.model for f in compiled_calls].count(False) == 3
    assert [f is trainer.model for f in compiled_calls].count(True) == 4
    import json
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and rows[0]["br_w"] == 0 and rows[1]["br_w"] > 0 and rows[1]["br_a"] > 0
    assert rows[1]["br_w_info"]["total"]["nonempty_bins"] > 0
