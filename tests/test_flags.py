"""Flags as typed: no abbreviations in any entry point, the one line for a flag that does not
exist, and the banner's freeze line."""

import os
import sys

import pytest

from conftest import run_cli

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))


@pytest.mark.parametrize("argv", [["--br-backprop-to-alpha"], ["--br-backprop-to-alpha", "--dry-run"],
                                  ["--br-backprop-to-alpha=1"], ["--lambda-br-act", "1", "--br-backprop-to-alpha"]])
def test_there_is_no_br_backprop_to_alpha(argv, capsys):
    # it was taken as an abbreviation of --br-backprop-to-alpha-act: A-BR's gradient to α turned on without a word
    with pytest.raises(SystemExit) as exc:
        run_cli(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err == ("error: there is no --br-backprop-to-alpha: W-BR's gradient always reaches the weight step sizes "
                   "(unless frozen); for A-BR's gradient to the activation step sizes use --br-backprop-to-alpha-act\n")


@pytest.mark.parametrize("abbreviation", ["--br-backprop", "--lambda-br-a", "--epoch", "--warmup", "--freeze-w",
                                          "--optim"])
def test_abbreviated_flags_are_refused(abbreviation, capsys):
    with pytest.raises(SystemExit) as exc:
        run_cli(["--dry-run", "--data-dir", "/nonexistent", abbreviation, "1"])
    assert exc.value.code == 2
    assert f"unrecognized arguments: {abbreviation}" in capsys.readouterr().err


def _entry_points():
    import export
    from analysis import plots
    from analysis import summarize
    import gpu_study
    import throughput
    return {"export.py": lambda: export.build_parser().parse_args(["ckpt", "--out", "o", "--overw"]),
            "summarize.py": lambda: summarize.main(["runs", "--qui"]),
            "plots.py": lambda: plots.main(["run", "--no-act"]),
            "throughput.py": lambda: throughput.parse_args(["--var", "lsq"]),
            "gpu_study.py": lambda: gpu_study.parse_args(["--data", "x", "--out", "y", "--workd", "z"])}


@pytest.mark.parametrize("name", ["export.py", "summarize.py", "plots.py", "throughput.py", "gpu_study.py"])
def test_no_entry_point_takes_abbreviations(name, capsys):
    with pytest.raises(SystemExit) as exc:
        _entry_points()[name]()
    assert exc.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err


@pytest.mark.parametrize("flags,line", [
    (["--freeze-weight-alpha"], "  - Frozen after warmup anyway: weight alpha (--freeze-weight-alpha)"),
    (["--freeze-act-alpha"], "  - Frozen after warmup anyway: activation alpha (--freeze-act-alpha)"),
    (["--freeze-weight-alpha", "--freeze-act-alpha"],
     "  - Frozen after warmup anyway: weight and activation alpha (--freeze-weight-alpha --freeze-act-alpha)"),
    (["--freeze-act-alpha", "--freeze-weight-alpha"],
     "  - Frozen after warmup anyway: weight and activation alpha (--freeze-weight-alpha --freeze-act-alpha)"),
])
def test_the_freeze_line_names_every_flag_given(flags, line, capsys):
    rc, out, _ = run_cli(["--dry-run", "--data-dir", "/nonexistent", *flags], capsys)
    assert rc == 0
    assert [x for x in out.splitlines() if "Frozen after warmup anyway" in x] == [line]
