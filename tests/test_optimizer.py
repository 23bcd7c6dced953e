"""--optimizer sgd|adam: parameter groups, the learning-rate default, Adam's step, banner, resume."""

import json
import os

import pytest
import torch

from run import config
from conftest import TINY, run_cli
from engine import build_optimizer
from models.resnet import CifarResNet
from quant import quantize_model


def _cfg(*flags):
    cfg = config.build_parser().parse_args(list(flags))
    config.resolve_defaults(cfg)
    return cfg


def _tiny_model():
    torch.manual_seed(0)
    model = quantize_model(CifarResNet((1, 1), (4, 8), "A"), 2, 2)
    model.train()
    model(torch.randn(4, 3, 32, 32))  # initialise every step size
    return model


@pytest.mark.parametrize("optimizer,kind", [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam)])
def test_step_sizes_have_their_own_group_without_weight_decay(optimizer, kind):
    model = _tiny_model()
    opt = build_optimizer(model, _cfg("--optimizer", optimizer, "--weight-decay", "0.01"))
    assert type(opt) is kind
    weights, alphas = opt.param_groups
    # every LSQQuantizer's alpha, found by walking the modules (not by the names build_optimizer uses)
    quantizer_alphas = {id(m.alpha) for m in model.modules() if type(m).__name__ == "LSQQuantizer"}
    assert {id(p) for p in alphas["params"]} == quantizer_alphas
    assert len(quantizer_alphas) == 2 * 6  # first conv, 2 blocks x 2 convs, fc
    assert alphas["weight_decay"] == 0.0 and weights["weight_decay"] == 0.01
    everything = {id(p) for p in model.parameters()}
    assert {id(p) for p in weights["params"]} == everything - quantizer_alphas


@pytest.mark.parametrize("flags,lr", [(["--optimizer", "adam"], 0.001), (["--optimizer", "sgd"], 0.01), ([], 0.01),
                                      (["--optimizer", "adam", "--lr", "0.05"], 0.05)])
def test_learning_rate_default_follows_the_optimizer(flags, lr):
    cfg = config.build_parser().parse_args(flags)
    filled = config.resolve_defaults(cfg)
    assert cfg.lr == lr and (("lr" in filled) == ("--lr" not in flags))


def test_adam_step_is_torch_adam_and_the_hand_formula():
    model = _tiny_model()
    cfg = _cfg("--optimizer", "adam", "--weight-decay", "0.01", "--lr", "0.001")
    reference = _tiny_model()  # the same parameters (same seed), stepped by torch.optim.Adam directly
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p, q)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    before = [p.detach().clone() for p in model.parameters()]
    for m in (model, reference):
        m(x).square().mean().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    build_optimizer(model, cfg).step()
    is_alpha = [n.endswith("_quant.alpha") for n, _ in reference.named_parameters()]
    torch.optim.Adam([{"params": [p for p, a in zip(reference.parameters(), is_alpha) if not a], "weight_decay": 0.01},
                      {"params": [p for p, a in zip(reference.parameters(), is_alpha) if a], "weight_decay": 0.0}],
                     lr=0.001).step()
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p, q)
    # Adam's first step by hand (Kingma & Ba 2015, alg. 1, L2 decay added to g): m = (1-β1)g,
    # v = (1-β2)g², bias-corrected m̂ = g, v̂ = g², so p -= lr·g/(|g| + ε).
    for p0, g, p, alpha in zip(before, grads, model.parameters(), is_alpha):
        g = g if alpha else g + 0.01 * p0
        torch.testing.assert_close(p.detach(), p0 - 0.001 * g / (g.abs() + 1e-8), rtol=1e-5, atol=1e-8)


def test_banner_config_and_folder_name_say_adam(capsys, tmp_path):
    rc, out, _ = run_cli(["--dry-run", "--data-dir", "/nonexistent", "--optimizer", "adam", "--momentum", "0.5"],
                         capsys)
    assert rc == 0
    lines = out.splitlines()
    optimiser = next(line for line in lines if line.startswith("Optimiser: "))
    assert optimiser.startswith("Optimiser: Adam lr 0.001 (Adam's default, as --lr was not given) betas (0.9, 0.999) "
                                "weight decay 0.0005 (L2; none on alpha)")
    assert "WARNING: --momentum 0.5 has no effect with --optimizer adam (Adam's betas are (0.9, 0.999))" in lines
    assert "Output: results/resnet20_w2a2_fl8_lbr1_lbra0_frz_adam_s42" in lines
    rc, out, _ = run_cli(["--dry-run", "--data-dir", "/nonexistent", "--lr", "0.1"], capsys)
    assert "Optimiser: SGD lr 0.1 momentum 0.9 weight decay 0.0005 (none on alpha)" in out
    assert "momentum" not in "".join(line for line in out.splitlines() if line.startswith("WARNING"))


def test_resume_refuses_the_other_optimizer(shared_folder, tmp_path, capsys):
    out = tmp_path / "run"
    rc, stdout, _ = run_cli(["--data-dir", shared_folder, "--output-dir", out, *TINY, "--epochs", "1",
                             "--warmup-epochs", "1", "--optimizer", "adam"], capsys)
    assert rc == 0, stdout
    assert json.loads((out / "config.json").read_text())["flags"]["optimizer"] == "adam"
    rc, _, err = run_cli(["--resume", "--output-dir", out, "--optimizer", "sgd"], capsys)
    assert rc == 2 and err.strip() == (f"error: --resume: refusing to change the experiment of "
                                       f"{os.path.join(out, 'last.pt')}: --optimizer sgd (run: adam)")
    # a run from before --optimizer (no such key in its config) was trained with SGD
    ckpt = torch.load(out / "last.pt", weights_only=True)
    del ckpt["config"]["flags"]["optimizer"]
    torch.save(ckpt, tmp_path / "old.pt")
    rc, _, err = run_cli(["--resume", tmp_path / "old.pt", "--output-dir", tmp_path / "cont", "--optimizer", "adam"],
                         capsys)
    assert rc == 2 and "--optimizer adam (run: sgd, the default)" in err and len(err.strip().splitlines()) == 1
