"""The banner's block for the seed's commands holds the seed's lines, exactly and in order.

The seed's document is not in this repository. Its commands are the recipe's W2A2 run from a float
checkpoint and the five ablation scenarios, each also with ``--freeze-alpha`` ("add --freeze-alpha to
any of them"); none passes ``--warmup-epochs``. Its lines are those of the issue (#22) and of the
repository's first commit (5449232), which printed the seed's block; they are written out below by
hand. The tool's own additions go below the block (``Warmup: ...``, ``Optimiser: ...``) or are notes.
Two things differ from the seed's by design, both after the W2A2 study (README), each with a note that says
why: A-BR is off by default, so the recipe's command prints A-BR disabled; runs with W-BR alone freeze α
after the warmup by default, so the recipe's and W-only's commands without ``--freeze-alpha`` print the block
they print with it (runs with A-BR on train α, as the seed's default did).
"""

import pytest
import torch

from conftest import run_cli
from models import build_model

RULE = "=" * 80
NOTE = "    └─> Note: "

#: The seed's block, from the title to the closing rule; the {fields} are the lines that depend on
#: the command, given literally per command below.
SEED_BLOCK = """\
================================================================================
Starting 2-Stage QAT+BR Training
================================================================================
Stage 1 (Warmup): Epochs 1-30 (LSQ only)
{stage2}

BR Configuration:
{br}

Alpha Control:
  - Freeze alpha after warmup: {freeze}
    └─> If True: NO updates to alpha from ANY loss (CE or BR)
    └─> If False: CE can update alpha, A-BR respects --br-backprop-to-alpha-act flag
================================================================================"""

W_ON = """\
  - W-BR (weights): λ=1.0 [ENABLED]
    └─> Gradients to alpha: Always enabled (paper-faithful, weights are stable)"""
W_ON_FROZEN = W_ON + """
    └─> Note: weight alpha is frozen after warmup, so in stage 2 this gradient cannot change it"""
W_OFF = "  - W-BR (weights): λ=0.0 [DISABLED]"
A_STABLE = """\
  - A-BR (activations): λ=1.0 [ENABLED]
    └─> Gradients to alpha: False (default: False, recommended)"""
A_MOVING = """\
  - A-BR (activations): λ=1.0 [ENABLED]
    └─> Gradients to alpha: True (default: False, recommended)"""
A_MOVING_FROZEN = A_MOVING + """
    └─> Note: activation alpha is frozen after warmup, so in stage 2 this gradient cannot change it"""
A_OFF = "  - A-BR (activations): λ=0.0 [DISABLED]"
STAGE2 = "Stage 2 (BR): Epochs 31-100"
STAGE2_LSQ = "Stage 2 (BR): Epochs 31-100 (both λ = 0: LSQ only, no BR)"

#: (name, flags, Stage 2 line, BR lines, BR lines with --freeze-alpha, α frozen without the flag). Without
#: it the seed printed "Freeze alpha after warmup: False" and the BR lines of α trained for every command.
SEED_COMMANDS = [
    ("recipe W2A2 from the float run", ["--pretrained", "{fp}", "--num-bits", "2"], STAGE2,
     W_ON + "\n" + A_OFF, W_ON_FROZEN + "\n" + A_OFF, True),  # the seed's: A_STABLE (its default λ_a was 1)
    ("W-only", ["--lambda-br", "1", "--lambda-br-act", "0"], STAGE2, W_ON + "\n" + A_OFF, W_ON_FROZEN + "\n" + A_OFF,
     True),
    ("W+A stable", ["--lambda-br", "1", "--lambda-br-act", "1"], STAGE2,
     W_ON + "\n" + A_STABLE, W_ON_FROZEN + "\n" + A_STABLE, False),
    ("W+A moving target", ["--lambda-br", "1", "--lambda-br-act", "1", "--br-backprop-to-alpha-act"], STAGE2,
     W_ON + "\n" + A_MOVING, W_ON_FROZEN + "\n" + A_MOVING_FROZEN, False),
    ("A-only", ["--lambda-br", "0", "--lambda-br-act", "1"], STAGE2, W_OFF + "\n" + A_STABLE, W_OFF + "\n" + A_STABLE,
     False),
    ("LSQ baseline", ["--lambda-br", "0", "--lambda-br-act", "0"], STAGE2_LSQ, W_OFF + "\n" + A_OFF,
     W_OFF + "\n" + A_OFF, False),
]


@pytest.fixture(scope="module")
def float_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("fp") / "best.pt"
    torch.save({"model": build_model("resnet20").state_dict(), "config": {"flags": {"arch": "resnet20"}}}, path)
    return str(path)


def _block(lines):
    """The banner's block: from its first rule to the rule that closes it (the third rule)."""
    rules = [i for i, x in enumerate(lines) if x == RULE]
    return lines[rules[0]:rules[2] + 1]


@pytest.mark.parametrize("freeze", [False, True], ids=["", "freeze-alpha"])
@pytest.mark.parametrize("name,flags,stage2,br,br_frozen,frozen_by_default", SEED_COMMANDS,
                         ids=[c[0] for c in SEED_COMMANDS])
def test_the_seed_commands_print_the_seed_block(capsys, float_checkpoint, name, flags, stage2, br, br_frozen,
                                                frozen_by_default, freeze):
    argv = [f.format(fp=float_checkpoint) for f in flags] + (["--freeze-alpha"] if freeze else [])
    rc, out, err = run_cli(["--dry-run", "--data-dir", "/nonexistent", *argv], capsys)
    assert rc == 0, err
    frozen = freeze or frozen_by_default
    expected = SEED_BLOCK.format(stage2=stage2, br=br_frozen if frozen else br, freeze=frozen).splitlines()
    got = _block(out.splitlines())
    # "└─> Note: ..." lines may be the tool's own, between the seed's lines; the seed's own notes must
    # still be there, saying at least what the seed said
    seed_lines = [x for x in expected if not x.startswith(NOTE)]
    seed_notes = [x for x in expected if x.startswith(NOTE)]
    lines, notes = [x for x in got if not x.startswith(NOTE)], [x for x in got if x.startswith(NOTE)]
    for i, (line, seed_line) in enumerate(zip(lines, seed_lines)):
        assert line == seed_line, f"line {i + 1} of the block (notes left out)"
    assert len(lines) == len(seed_lines)
    for note in seed_notes:
        assert any(x.startswith(note) for x in notes), note
    # what the tool adds is below the block: how the warmup was chosen
    lines = out.splitlines()
    assert lines.index("Warmup: epochs 1-30, 30 % of 100 epochs, as --warmup-epochs was not given") > lines.index(
        got[-1], len(got) - 1)
