"""benchmarks/cpu_study.py: its plan branches validly from the committed warmups; its report's figures."""

from __future__ import annotations

import argparse
import json
import os
import sys

import pytest

from tests.conftest import TINY, run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import cpu_study  # noqa: E402


def test_the_plan_is_the_issues_table():
    names = [row.name for row in cpu_study.plan()]
    # 2 PTQ references, the issue's 7 scenarios and the tool's defaults (w-only-free) x 2 seeds (both seeds of a
    # scenario in turn), W+A stable of seed 42 at two more λ_a, two rivals, LSQ and W+A stable under the seed
    # authors' recipe
    assert names[:2] == ["ptq_w2a2", "ptq_w4a4"] and len(names) == 2 + 8 * 2 + 2 + 2 + 2
    assert names[2:18] == [f"w2a2_s{seed}_{k}" for k in ("wa-stable", "lsq", "w-only", "lsq-frozen", "a-only",
                                                          "w-only-free", "wa-stable-free", "wa-moving-free")
                           for seed in (42, 43)]
    assert " ".join({r.name: r for r in cpu_study.plan()}["w2a2_s43_w-only-free"].flags).endswith(
        "--seed 43 --lambda-br 1 --lambda-br-act 0 --no-freeze-alpha")  # W-BR with α trained (not the default)
    assert names[-6:] == ["w2a2_s42_wa-stable_lama0.1", "w2a2_s42_wa-stable_lama0.01", "w2a2_s42_dampen",
                          "w2a2_s42_freeze", "w2a2_s42_lsq_authors", "w2a2_s42_wa-stable_authors"]
    rows = {r.name: r for r in cpu_study.plan()}
    lama = " ".join(rows["w2a2_s42_wa-stable_lama0.1"].flags)
    assert lama == " ".join(rows["w2a2_s42_wa-stable"].flags).replace("--lambda-br-act 1", "--lambda-br-act 0.1")
    assert lama.count("--lambda-br-act") == 1  # named once, in place
    for name in ("w2a2_s42_lsq_authors", "w2a2_s42_wa-stable_authors"):
        flags = " ".join(rows[name].flags)
        assert "--act-quant-at relu-output --lr-schedule warmup-constant" in flags
        assert rows[name].warmup == "pretrained/w2a2_e30_warmup9_authors_s42/warmup_end.pt"  # not the protocol's
        assert flags.replace(" --act-quant-at relu-output --lr-schedule warmup-constant", "") == \
            " ".join(rows[name.replace("_authors", "")].flags)  # else the same row


@pytest.mark.parametrize("name", ["w2a2_s42_w-only-free", "w2a2_s43_wa-moving-free", "w2a2_s42_wa-stable_lama0.01",
                                  "w2a2_s42_freeze", "w2a2_s42_wa-stable_authors"])
def test_each_row_branches_from_its_committed_warmup(name, shared_folder, tmp_path, capsys, monkeypatch):
    """The row's command, as the study runs it, passes every check of --from-warmup (a dry run)."""
    row = next(r for r in cpu_study.plan() if r.name == name)
    monkeypatch.chdir(ROOT)  # the study runs from the repository: its paths are relative to it
    rc, out, err = run_cli(["--data-dir", shared_folder, "--no-download", "--output-dir", tmp_path / name,
                            *row.flags, "--from-warmup", row.warmup, "--dry-run"], capsys)
    assert rc == 0, err
    assert f"Warmup: epochs 1-9 are those of {row.warmup}" in out


def test_a_warmup_trained_by_one_row_is_published_for_the_others(shared_folder, tmp_path, capsys, monkeypatch):
    """The first row of an uncommitted warmup trains it; once its epoch W is done the study copies it
    (checkpoint and logs of epochs 1..W) into the repository, and the other rows branch from that copy."""
    repo = tmp_path / "repo"
    monkeypatch.setattr(cpu_study, "ROOT", str(repo))
    monkeypatch.setattr(cpu_study, "WARMUP_EPOCHS", 1)
    stage1 = [*TINY, *cpu_study.AUTHORS, "--seed", "42"]
    warmup = os.path.join("pretrained", "w_s42", "warmup_end.pt")
    maker = cpu_study.Row("maker", [*stage1, "--lambda-br", "1", "--lambda-br-act", "1", "--freeze-alpha"], warmup)
    other = cpu_study.Row("other", [*stage1, "--lambda-br", "0", "--lambda-br-act", "0"], warmup)
    args = argparse.Namespace(data_dir=shared_folder, runs_dir=str(tmp_path / "runs"))
    assert "--from-warmup" not in cpu_study.command(maker, args)  # nothing to branch from: it trains the warmup
    assert cpu_study.can_start(maker, []) and not cpu_study.can_start(other, [maker])  # one trains it, once
    folder = tmp_path / "runs" / "maker"
    assert cpu_study.publish_warmup(maker, str(folder)) is None  # not trained yet

    assert run_cli(["--data-dir", shared_folder, "--output-dir", folder, *maker.flags])[0] == 0
    published = cpu_study.publish_warmup(maker, str(folder))
    assert published == str(repo / "pretrained" / "w_s42")
    assert sorted(os.listdir(published)) == ["README.md", "config.json", "metrics.jsonl", "timing.jsonl",
                                             "warmup_end.pt"]
    first = (folder / "metrics.jsonl").read_text().splitlines()
    assert len(first) == 2 and (repo / "pretrained" / "w_s42" / "metrics.jsonl").read_text().splitlines() == first[:1]
    assert cpu_study.publish_warmup(maker, str(folder)) is None  # once
    assert cpu_study.can_start(other, [maker]) and cpu_study.command(other, args)[-2:] == ["--from-warmup", warmup]
    monkeypatch.chdir(repo)  # the study runs its rows from the repository
    rc, out, err = run_cli(["--data-dir", shared_folder, "--output-dir", tmp_path / "runs" / "other",
                            *other.flags, "--from-warmup", warmup, "--dry-run"], capsys)
    assert rc == 0, err
    assert f"Warmup: epochs 1-1 are those of {warmup}" in out


def test_last_epoch_figures_by_hand():
    """Means over the weights of the low-bit layers: conv1 and linear (8-bit) are left out, a layer counts
    by its number of weights, and a layer without flips (None) is left out of the flips."""
    sizes = cpu_study.weights_per_layer()
    # ResNet-20: a 3 -> 16 conv (3 x 3), 16 -> 16 convs in stage 1, 16 -> 32 then 32 -> 32 in stage 2, 64 -> 10 linear
    assert (sizes["conv1"], sizes["layers.0.0.conv1"], sizes["layers.1.0.conv1"], sizes["layers.1.0.conv2"],
            sizes["linear"]) == (3 * 16 * 9, 16 * 16 * 9, 16 * 32 * 9, 32 * 32 * 9, 64 * 10)
    # 6 x 2,304 + 4,608 + 5 x 9,216 + 18,432 + 5 x 36,864 (stage 3's first conv takes 32 channels)
    assert sum(n for k, n in sizes.items() if k not in ("conv1", "linear")) == 267_264
    row = {"ce": 0.5, "br_w": 0.04, "br_a": 0.6, "bins": {
        "conv1": {"dist_alpha": 9.0, "flips": 9.0},
        "layers.0.0.conv1": {"dist_alpha": 0.2, "flips": 0.01},  # 2,304 weights
        "layers.1.0.conv1": {"dist_alpha": 0.5, "flips": None},  # 4,608
        "layers.1.0.conv2": {"dist_alpha": 0.3, "flips": 0.03},  # 9,216
        "linear": {"dist_alpha": 9.0, "flips": 9.0}}}
    figures = cpu_study.last_epoch_figures([{"bins": {}}, row], sizes)
    # weights 1 : 2 : 4: distance (0.2 + 2 x 0.5 + 4 x 0.3) / 7 = 2.4 / 7; flips (0.01 + 4 x 0.03) / 5 = 0.026
    assert figures == pytest.approx({"ce": 0.5, "br_w": 0.04, "br_a": 0.6, "dist": 2.4 / 7, "flips": 0.026})


def test_only_picks_rows_by_pattern(tmp_path, capsys):
    assert cpu_study.main(["-n", "--runs-dir", str(tmp_path), "--only", "ptq_*", "w2a2_s43_lsq"]) == 0
    listed = [line.split(":")[0] for line in capsys.readouterr().out.splitlines() if not line.startswith(" ")]
    assert listed == ["ptq_w2a2", "ptq_w4a4", "w2a2_s43_lsq"]


def test_bad_arguments_are_refused_before_any_row_starts(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cpu_study, "RESULTS", str(tmp_path / "results"))  # no row committed, whatever the study's state
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for argv, message in ((["--runs-dir", str(a_file)], f"--runs-dir {a_file} is a file, not a folder"),
                          (["--only", "w2a2_s44_*", "ptq_*"], "--only w2a2_s44_* matches no row of the study")):
        with pytest.raises(SystemExit) as stop:
            cpu_study.main(["--data-dir", str(tmp_path), *argv])
        assert stop.value.code == 2 and message in capsys.readouterr().err
    runs = tmp_path / "runs"
    argv = ["--data-dir", str(tmp_path / "none"), "--runs-dir", str(runs), "--only", "w2a2_s42_dampen"]
    assert cpu_study.main(argv) == 2
    assert f"error: --data-dir {tmp_path / 'none'}: no CIFAR-10 there" in capsys.readouterr().err
    assert not runs.exists()


def test_stage2_oscillations_is_the_mean_over_the_br_epochs():
    metrics = [{"epoch": e, "osc_freq": None} for e in range(1, 10)]  # the warmup: not tracked, left out
    metrics += [{"epoch": 10, "osc_freq": 3e-3}, {"epoch": 11, "osc_freq": 1e-3}]
    assert cpu_study.stage2_oscillations(metrics) == pytest.approx(2e-3)
    metrics[-1]["osc_freq"] = None  # a run from before tracking
    assert cpu_study.stage2_oscillations(metrics) is None


def test_own_seconds_counts_a_rows_own_epochs_or_a_ptq_runs_whole_time():
    timing = [{"epoch": e, "seconds": 100.0} for e in range(1, 10)] + [{"epoch": 10, "seconds": 7.0},
                                                                       {"epoch": 11, "seconds": 5.0}]
    assert cpu_study.own_seconds({}, timing) == 12.0  # the shared warmup is not its own
    assert cpu_study.own_seconds({"method": "ptq", "wall_time_s": 165.3}, []) == 165.3  # no epochs


def test_paired_compares_a_seeds_two_rows_over_stage2_by_hand():
    warmup = [{"epoch": e, "test_acc": 99.0} for e in range(1, 10)]  # shared: never counted as ahead
    row = warmup + [{"epoch": 10, "test_acc": 80.0}, {"epoch": 11, "test_acc": 82.0}, {"epoch": 12, "test_acc": 85.5}]
    base = warmup + [{"epoch": 10, "test_acc": 81.0}, {"epoch": 11, "test_acc": 81.5}, {"epoch": 12, "test_acc": 85.0}]
    assert cpu_study.paired(row, base) == (pytest.approx(0.5), 2, 3)  # ahead at epochs 11 and 12


def test_contrast_lines_pair_rows_seed_by_seed():
    def run(final):  # a row whose stage 2 is two epochs, the last one at `final`
        return ({}, [{"epoch": 10, "test_acc": 80.0}, {"epoch": 11, "test_acc": final}], [])
    runs = {"w2a2_s42_w-only": run(85.5), "w2a2_s42_lsq-frozen": run(85.0),
            "w2a2_s43_w-only": run(84.0), "w2a2_s43_lsq-frozen": run(85.0),
            "w2a2_s43_a-only": run(90.0)}  # its baseline's seed 43 only
    lines = cpu_study.contrast_lines(runs)
    assert lines[2:] == ["| W-BR (α frozen) | w-only − lsq-frozen | +0.50 (42), -1.00 (43) | -0.25 | 1 of 4 |",
                         "| A-BR at λ_a = 1 (α frozen) | a-only − lsq-frozen | +5.00 (43) | +5.00 | 1 of 2 |"]
    assert cpu_study.contrast_lines({"w2a2_s42_w-only": run(85.5)}) == []  # no baseline: no table


def test_report_writes_the_table_and_the_curves(tmp_path, monkeypatch):
    """--report from committed run folders: mean ± sample std over seeds of each figure, worked out by hand."""
    def write(name, summary, metrics, timing):
        os.makedirs(tmp_path / name)
        with open(tmp_path / name / "summary.json", "w") as f:
            json.dump(summary, f)
        for file, rows in (("metrics.jsonl", metrics), ("timing.jsonl", timing)):
            with open(tmp_path / name / file, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)

    bins = {"conv1": {"dist_alpha": 9.0, "flips": 9.0},  # 8-bit: left out of the means
            "layers.0.0.conv1": {"dist_alpha": 0.2, "flips": 0.01},  # 16 x 16 x 3 x 3 = 2,304 weights
            "layers.2.0.conv2": {"dist_alpha": 0.4, "flips": 0.03}}  # 64 x 64 x 3 x 3 = 36,864: 16 times more
    for seed, final, ce, osc in ((42, 85.0, 0.25, (1e-3, 3e-3)), (43, 86.0, 0.35, (2e-3, 2e-3))):
        metrics = [{"epoch": e, "test_acc": 80.0} for e in range(1, 10)]
        metrics += [{"epoch": 10, "test_acc": 82.0, "osc_freq": osc[0]},
                    {"epoch": 11, "test_acc": final, "osc_freq": osc[1], "ce": ce, "br_w": 0.02, "br_a": 0.0,
                     "bins": bins}]
        write(f"w2a2_s{seed}_w-only", {"final_test_acc": final}, metrics,
              [{"epoch": e, "seconds": 60.0} for e in range(1, 12)])  # 2 minutes of its own (epochs 10-11)
    write("ptq_w2a2", {"final_test_acc": 63.8, "method": "ptq", "wall_time_s": 180.0}, [], [])
    monkeypatch.setattr(cpu_study, "RESULTS", str(tmp_path))
    assert cpu_study.main(["--report"]) == 0
    lines = (tmp_path / "study.md").read_text().splitlines()
    assert lines[2] == ("| ptq_w2a2 | `--ptq --num-bits 2 --pretrained pretrained/resnet20_fp32_e40/model.pt` | – "
                        "| 63.80 | – | – | – | – | – | – | 3 min |")
    # final 85, 86: 85.50 ± 0.71; CE 0.25, 0.35: 0.3000 ± 0.0707; per weight of the low-bit layers (1 : 16),
    # distance (0.2 + 16 * 0.4) / 17 = 0.38824, flips (0.01 + 16 * 0.03) / 17 = 0.028824; oscillations
    # (1e-3 + 3e-3) / 2 and (2e-3 + 2e-3) / 2
    assert lines[3] == ("| w-only | `--lambda-br 1 --lambda-br-act 0 --freeze-alpha` | 42, 43 | 85.50 ± 0.71 "
                        "| 0.3000 ± 0.0707 | 0.0200 ± 0.0000 | 0.0000 ± 0.0000 | 0.3882 ± 0.0000 | 0.0288 ± 0.0000 "
                        "| 2.00e-03 ± 0.00e+00 | 2 ± 0 min |")
    assert len(lines) == 4  # no contrast: no baseline row
    assert (tmp_path / "curves.png").stat().st_size > 10_000
