"""--val-split: a seeded class-balanced held-out set, model selection on it, resume, summaries."""

import argparse
import json
import os

import pytest
import torch

from analysis import summarize
from run.config import build_parser
from conftest import TINY, run_cli
from run.data import DataError, DataSource, DeviceLoader, Split, hold_out, training_images
from engine import Trainer
from models.resnet import CifarResNet
from quant import quantize_model


def _split(per_class):
    """``per_class`` images of each of 10 classes, interleaved; image i is filled with the value i
    (so that an image can be traced back to its index)."""
    n = 10 * per_class
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 32, 32).clone()
    return Split(images, torch.arange(n) % 10)


def test_hold_out_is_class_balanced_disjoint_and_seeded():
    split = _split(6)
    train, val, index = hold_out(split, 25, seed=3)
    # 25 over 10 classes: 2 each, and one more for the first 5 classes (0-4) -> 3 3 3 3 3 2 2 2 2 2
    assert torch.bincount(val.labels, minlength=10).tolist() == [3] * 5 + [2] * 5
    assert torch.bincount(train.labels, minlength=10).tolist() == [3] * 5 + [4] * 5
    ids_val, ids_train = set(val.images[:, 0, 0, 0].tolist()), set(train.images[:, 0, 0, 0].tolist())
    assert ids_val.isdisjoint(ids_train) and ids_val | ids_train == set(range(60))
    assert ids_val == set(index.tolist()) and torch.equal(split.labels[index], val.labels)
    assert torch.equal(hold_out(split, 25, seed=3)[2], index)  # the same seed: the same images
    assert not torch.equal(hold_out(split, 25, seed=4)[2], index)


def test_hold_out_that_leaves_a_class_nothing_to_train_on_is_an_error():
    hold_out(_split(3), 20, seed=0)  # 2 of 3 per class: fine
    with pytest.raises(DataError, match=r"^--val-split 30: class airplane has 3 training images, a balanced draw "
                                        r"of 30 needs 3, and one left to train on$"):
        hold_out(_split(3), 30, seed=0)


def test_train_subset_is_drawn_from_the_training_part(shared_folder):
    cfg = argparse.Namespace(val_split=10, train_subset=20, seed=5, no_download=True)
    train, val, index, available = training_images(DataSource("imagefolder", shared_folder), cfg, workers=0)
    assert len(val.labels) == 10 and len(train.labels) == 20 and available == 40 - 10
    assert torch.bincount(train.labels, minlength=10).tolist() == [2] * 10
    # no held-out image is trained on: compare the pixels of every pair
    flat_train, flat_val = train.images.flatten(1), val.images.flatten(1)
    assert not (flat_train[:, None, :] == flat_val[None, :, :]).all(-1).any()


@pytest.mark.parametrize("with_val", [True, False])
def test_best_pt_follows_validation_not_test(tmp_path, with_val):
    torch.manual_seed(0)
    cfg = build_parser().parse_args(["--epochs", "3", "--warmup-epochs", "1", "--val-split", "4" if with_val else "0"])
    model = quantize_model(CifarResNet((1, 1), (4, 8), "A"), 2, 2)
    split = Split(torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8), torch.arange(4))
    cpu = torch.device("cpu")
    loader = DeviceLoader(split, 4, cpu, train=False)
    trainer = Trainer(cfg, model, DeviceLoader(split, 4, cpu, train=True), loader, cpu, str(tmp_path),
                      log=lambda *_: None, val_loader=loader if with_val else None, val_index=torch.arange(4))
    # test top-1 peaks at epoch 3, validation top-1 at epoch 2
    tests, vals = iter([50.0, 40.0, 60.0]), iter([10.0, 30.0, 20.0])
    trainer.evaluate = lambda loader=None: next(tests if loader is None else vals)
    summary = trainer.fit({})
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    if with_val:
        assert [r["val_acc"] for r in rows] == [10.0, 30.0, 20.0]
        assert best["epoch"] == 2 and rows[-1]["best_epoch"] == 2
        assert summary == {"status": "finished", "final_test_acc": 60.0, "val_split": 4, "best_val_epoch": 2,
                           "best_val_acc": 30.0, "test_acc_at_best_val": 40.0, "epochs": 3,
                           "wall_time_s": summary["wall_time_s"]}
        assert [r["test_acc_at_best_val"] for r in rows] == [50.0, 40.0, 40.0]
    else:
        assert [r["val_acc"] for r in rows] == [None, None, None]
        assert best["epoch"] == 3
        assert summary == {"status": "finished", "final_test_acc": 60.0, "val_split": 0,
                           "best_test_epoch_optimistic": 3, "best_test_acc_optimistic": 60.0, "epochs": 3,
                           "wall_time_s": summary["wall_time_s"]}


def test_run_with_val_split_resumes_with_the_same_split_and_refuses_another(shared_folder, tmp_path, capsys):
    out = tmp_path / "run"
    rc, stdout, _ = run_cli(["--data-dir", shared_folder, "--output-dir", out, *TINY, "--val-split", "10"], capsys)
    assert rc == 0, stdout
    assert "Data: 30 train / 10 validation (held out, --val-split) / 20 test images" in stdout
    assert "Model selection: best.pt is the best validation epoch (--val-split)" in stdout
    summary_text = (out / "summary.json").read_text()
    summary = json.loads(summary_text)
    assert list(summary)[:2] == ["status", "final_test_acc"]  # the result leads
    assert "best_test_acc_optimistic" not in summary and summary["val_split"] == 10
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert summary["test_acc_at_best_val"] == rows[summary["best_val_epoch"] - 1]["test_acc"]
    assert summary["best_val_acc"] == max(r["val_acc"] for r in rows)
    derived = json.loads((out / "config.json").read_text())["derived"]["val_split"]
    assert derived["images"] == 10 and set(derived["per_class"].values()) == {1} and derived["seed"] == 42
    # continue from the end of epoch 1 in a new folder: the same images held out, the same epoch 2
    rc, stdout, _ = run_cli(["--resume", out / "warmup_end.pt", "--output-dir", tmp_path / "cont"], capsys)
    assert rc == 0, stdout
    again = [json.loads(line) for line in open(tmp_path / "cont" / "metrics.jsonl")]
    assert again[-1]["val_acc"] == rows[-1]["val_acc"] and again[-1]["test_acc"] == rows[-1]["test_acc"]
    # a checkpoint whose held-out images are not the ones drawn now is refused
    ckpt = torch.load(out / "warmup_end.pt", weights_only=True)
    ckpt["val_index"] = ckpt["val_index"] + 1
    torch.save(ckpt, tmp_path / "moved.pt")
    rc, _, err = run_cli(["--resume", tmp_path / "moved.pt", "--output-dir", tmp_path / "cont2"], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("error: --resume: the 10 validation images drawn now (--val-split, --seed 42")


def _summary_run(folder, seed, final, extra):
    os.makedirs(folder)
    flags = vars(build_parser().parse_args(["--seed", str(seed), "--val-split", str(extra.get("val_split", 0))]))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"flags": flags, "derived": {"weight_bits": 2, "act_bits": 2, "first_last_bits": 8}}, f)
    with open(os.path.join(folder, "summary.json"), "w") as f:
        json.dump({"status": "finished", "final_test_acc": final, "epochs": 100, "wall_time_s": 1.0, **extra}, f)


def test_summarize_leads_with_final_and_names_the_selected_epochs(tmp_path):
    root = tmp_path / "runs"
    # with a split: final 80, 82 -> 81 ± 1.41; test at the best val epoch 79, 83 -> 81 ± 2.83
    _summary_run(root / "v1", 1, 80.0, {"val_split": 5000, "best_val_epoch": 7, "best_val_acc": 90.0,
                                        "test_acc_at_best_val": 79.0})
    _summary_run(root / "v2", 2, 82.0, {"val_split": 5000, "best_val_epoch": 8, "best_val_acc": 91.0,
                                        "test_acc_at_best_val": 83.0})
    markdown, rows, runs = summarize.build_tables(summarize.find_runs(str(root)))
    header = next(line for line in markdown.splitlines() if line.startswith("| scenario"))
    assert header == ("| scenario | seeds | final test top-1 (%) | test top-1 at best val epoch (%) | epochs | "
                      "wall time / run | runs |")
    assert "| W-only, α trained | 1,2 | 81.00 ± 1.41 | 81.00 ± 2.83 | 100 | 1s | 2/2 finished |" in markdown
    assert "optimistic" not in markdown
    by_run = {r["run"]: r for r in runs}
    assert by_run["v2"]["best_epoch"] == 8 and by_run["v2"]["best_val_top1"] == 91.0
    # a run without a split beside them: its best test epoch is named for what it is
    _summary_run(root / "t1", 1, 70.0, {"val_split": 0, "best_test_epoch_optimistic": 9,
                                        "best_test_acc_optimistic": 71.5})
    markdown, rows, _ = summarize.build_tables(summarize.find_runs(str(root)))
    header = next(line for line in markdown.splitlines() if line.startswith("| scenario"))
    assert header == ("| scenario | val split | seeds | final test top-1 (%) | test top-1 at best val epoch (%) | "
                      "best test epoch top-1 (%; selected on test, optimistic) | epochs | wall time / run | runs |")
    assert "| W-only, α trained | 0 | 1 | 70.00 | – | 71.50 | 100 | 1s | 1/1 finished |" in markdown
    assert "chosen on the test set itself, so it overstates: never a result" in markdown.splitlines()[0]
    no_split = next(r for r in rows if r["val_split"] == 0)
    assert no_split["best_test_top1_optimistic_mean"] == 71.5 and no_split["test_top1_at_best_val_mean"] is None
