#!/usr/bin/env python
"""Export a quantized checkpoint for deployment, and check the exports against it.

    python export.py CKPT --out DIR [--data-dir PATH] [--no-download]

Writes into DIR:

* ``model.onnx``: ONNX opset 25 in the QDQ format (``deploy/onnx_qdq.py``), checked with
  ``onnx.checker`` and run with onnxruntime;
* ``model_int.npz``: the integer weights (2-bit codes four to a byte), step sizes and float
  parts (``deploy/integer.py``);
* ``export.json``: the checks below, the file sizes, and the input both files expect
  (``input``: float32 ``(N, 3, 32, 32)``, each pixel p (0..255) of channel c as
  ``(p - 255·mean[c]) / (255·std[c])``, ``run.data.input_preprocessing()``; also in the ONNX
  model's metadata ``preprocessing`` and in the integer file's ``meta``).

Checks, on the test split of the checkpoint's data (or ``--data-dir``): the logits of onnxruntime
and of the integer reference (int32 accumulation, one float rescale per layer) against the
PyTorch fake-quant model on the first test batch, and the top-1 of all three on the whole test
set. ONNX top-1 must be within 0.05 points of PyTorch's and the integer reference must predict
the same class on at least 99.9 % of the images, else the exit status is 1 (files kept for
inspection).

Exit status: 0 exported and checked; 1 a check failed; 2 bad checkpoint, data or output folder
(one ``error:`` line, nothing written); 4 a file could not be written (disk full, ...; one ``error:`` line
naming it).
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time

import torch

from run.checkpoint import EXIT_WRITE_FAILED, CheckpointError, WriteError, atomic_write_json, writing
from run.data import DataError, DeviceLoader, input_preprocessing, load_split
from deploy.integer import load_integer_model, save_integer_model
from deploy.onnx_qdq import ExportError, export_onnx, quantizer_steps, run_session, session
from deploy.restore import checkpoint_data, describe, restore
from models import build_model

#: Largest ONNX-vs-PyTorch top-1 difference accepted (percentage points).
ONNX_TOP1_TOLERANCE = 0.05
#: Smallest share of test images on which the integer reference must predict PyTorch's class.
INTEGER_AGREEMENT = 0.999
#: Relative float tolerance of a logit (plus the same absolute one) in the first-batch comparison.
LOGIT_TOLERANCE = 1e-4
#: Files an export writes (an existing one is replaced only with --overwrite).
EXPORT_FILES = ("model.onnx", "model_int.npz", "export.json")


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of ``export.py``."""
    p = argparse.ArgumentParser(prog="export.py", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("checkpoint", help="a quantized checkpoint of cifar10_qat_br.py (last.pt, best.pt, ptq.pt, ...)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for model.onnx, model_int.npz, export.json")
    p.add_argument("--data-dir", default=None, help="CIFAR-10 for the checks [the checkpoint's --data-dir]")
    p.add_argument("--no-download", action="store_true", help="never download CIFAR-10")
    p.add_argument("--eval-batch-size", type=int, default=1000, help="batch size of the checks [1000]")
    p.add_argument("--workers", type=int, default=2, help="processes for decoding images once [2]")
    p.add_argument("--overwrite", action="store_true", help="replace an export already in --out")
    return p


def check_out_folder(out: str, overwrite: bool) -> None:
    """Refuse an ``--out`` that cannot receive an export, before any work and without writing.

    Raises:
        ExportError: ``out`` is a file, lies below a file, or holds an export and ``overwrite`` is False.
    """
    if os.path.exists(out) and not os.path.isdir(out):
        raise ExportError(f"--out {out} is a file, not a folder")
    ancestor = os.path.dirname(os.path.abspath(out))
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise ExportError(f"--out {out}: {ancestor} is a file, so no folder can be made below it")
    existing = [f for f in EXPORT_FILES if os.path.exists(os.path.join(out, f))]
    if existing and not overwrite:
        raise ExportError(f"--out {out} already holds an export ({', '.join(existing)}); pass --overwrite to "
                          f"replace it")


def float_checkpoint_bytes(model: torch.nn.Module, model_cfg: dict) -> int:
    """Size of the same network's float32 ``state_dict`` saved with ``torch.save`` (a float checkpoint's weights)."""
    float_model = build_model(model_cfg["arch"], clip_value=model_cfg["clip_value"])
    state = {k: v for k, v in model.state_dict().items() if "_quant." not in k}
    float_model.load_state_dict(state)
    buffer = io.BytesIO()
    torch.save(float_model.state_dict(), buffer)
    return buffer.tell()


@torch.inference_mode()
def compare(model, sess, reference, loader) -> dict:
    """Top-1 of PyTorch, onnxruntime and the integer reference over ``loader``, their prediction
    agreement with PyTorch, and the largest logit differences on the first batch."""
    correct = {"pytorch": 0, "onnx": 0, "integer": 0}
    agree = {"onnx": 0, "integer": 0}
    first = None
    for x, y in loader.batches():
        logits = {"pytorch": model(x), "onnx": run_session(sess, x), "integer": reference(x)}
        if first is None:
            ref = logits["pytorch"]
            first = {"first_batch_images": len(y), "first_batch_max_abs_logit": float(ref.abs().max())}
            for k in ("onnx", "integer"):
                diff = (logits[k] - ref).abs()
                first[f"{k}_max_abs_logit_difference"] = float(diff.max())
                # images whose every logit agrees to float tolerance; the others have an activation that a
                # rounding difference moved across a level boundary (summation order differs)
                first[f"{k}_logits_within_tolerance"] = float((diff <= LOGIT_TOLERANCE * (1 + ref.abs())).all(1)
                                                              .float().mean())
        predictions = {k: v.argmax(1) for k, v in logits.items()}
        for k, p in predictions.items():
            correct[k] += int((p == y).sum())
        for k in agree:
            agree[k] += int((predictions[k] == predictions["pytorch"]).sum())
    n = len(loader.labels)
    return {"test_images": n, **{f"{k}_top1": 100.0 * v / n for k, v in correct.items()},
            **{f"{k}_prediction_agreement": v / n for k, v in agree.items()}, **first}


def main(argv: list[str] | None = None) -> int:
    """Export and check (see the module docstring); returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        if args.eval_batch_size < 1:
            raise ExportError(f"--eval-batch-size must be >= 1, got {args.eval_batch_size}")
        if args.workers < 0:
            raise ExportError(f"--workers must be >= 0, got {args.workers}")
        check_out_folder(args.out, args.overwrite)
        model, model_cfg, ckpt = restore(args.checkpoint, "export.py", {"arch": "resnet20", "clip_value": None}, set())
        if not ckpt or min(model_cfg["weight_bits"], model_cfg["act_bits"]) >= 32:
            raise ExportError(f"{args.checkpoint} holds {describe(model_cfg)}: export.py expects a quantized "
                              f"checkpoint of cifar10_qat_br.py (QAT or --ptq)")
        source, download = checkpoint_data(ckpt["config"].get("flags", {}), args.data_dir,
                                           True if args.no_download else None)
        test = load_split(source, train=False, download=download, workers=args.workers,
                          log=lambda m: print(m, file=sys.stderr))
        loader = DeviceLoader(test, args.eval_batch_size, torch.device("cpu"), train=False)
        example = next(loader.batches())[0]
        started = time.perf_counter()
        steps = quantizer_steps(model, example)  # one forward pass for both formats
        onnx_model = export_onnx(model, example, steps)
        check_out_folder(args.out, args.overwrite)  # again: minutes may have passed
        try:
            os.makedirs(args.out, exist_ok=True)
        except OSError as exc:
            raise ExportError(f"--out {args.out}: cannot make the folder ({exc.strerror})") from None
    except (ExportError, CheckpointError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    onnx_path, int_path = os.path.join(args.out, "model.onnx"), os.path.join(args.out, "model_int.npz")
    try:
        with writing(onnx_path), open(onnx_path, "wb") as f:
            f.write(onnx_model.SerializeToString())
        with writing(int_path):
            save_integer_model(model, steps, model_cfg, int_path)
    except WriteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_WRITE_FAILED
    report = {"checkpoint": os.path.abspath(args.checkpoint), "model": describe(model_cfg), "data": source.describe(),
              "onnx_opset": onnx_model.opset_import[0].version, "input": input_preprocessing(),
              "bytes": {"model.onnx": os.path.getsize(onnx_path), "model_int.npz": os.path.getsize(int_path),
                        "checkpoint": os.path.getsize(args.checkpoint),
                        "float32_state_dict": float_checkpoint_bytes(model, model_cfg)}}
    import onnxruntime
    report["onnxruntime"] = onnxruntime.__version__
    report.update(compare(model, session(onnx_model), load_integer_model(int_path), loader))
    report["seconds"] = time.perf_counter() - started
    ok_onnx = abs(report["onnx_top1"] - report["pytorch_top1"]) <= ONNX_TOP1_TOLERANCE
    ok_integer = report["integer_prediction_agreement"] >= INTEGER_AGREEMENT
    report["checks_passed"] = ok_onnx and ok_integer
    try:
        atomic_write_json(report, os.path.join(args.out, "export.json"))
    except WriteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_WRITE_FAILED
    b = report["bytes"]
    print(f"Exported {report['model']} from {args.checkpoint} to {args.out}")
    print(f"  model.onnx     {b['model.onnx'] / 1024:8.1f} KiB  (opset {report['onnx_opset']}, QDQ, onnx.checker ok)")
    print(f"  model_int.npz  {b['model_int.npz'] / 1024:8.1f} KiB  "
          f"(float32 weights: {b['float32_state_dict'] / 1024:.1f} KiB, "
          f"x{b['float32_state_dict'] / b['model_int.npz']:.1f} smaller)")
    pre = report["input"]
    print(f"Input of both: float32 (N, 3, 32, 32) RGB, each pixel p (0..255) of channel c as (p - 255·mean[c]) / "
          f"(255·std[c]), mean {pre['mean']}, std {pre['std']} (export.json: input)")
    print(f"Test top-1 on {report['test_images']} images ({report['data']}): PyTorch fake-quant "
          f"{report['pytorch_top1']:.2f}% | onnxruntime {report['onnx_top1']:.2f}% | integer reference "
          f"{report['integer_top1']:.2f}%")
    print(f"Same prediction as PyTorch: onnxruntime {100 * report['onnx_prediction_agreement']:.2f}%, integer "
          f"reference {100 * report['integer_prediction_agreement']:.2f}% of the images")
    print(f"First batch ({report['first_batch_images']} images), logits equal to float tolerance "
          f"({LOGIT_TOLERANCE:g} relative): onnxruntime {100 * report['onnx_logits_within_tolerance']:.1f}%, integer "
          f"{100 * report['integer_logits_within_tolerance']:.1f}% of the images; max |Δlogit| "
          f"{report['onnx_max_abs_logit_difference']:.2g} / {report['integer_max_abs_logit_difference']:.2g} "
          f"(logits up to {report['first_batch_max_abs_logit']:.2f})")
    if not report["checks_passed"]:
        print(f"error: check failed: ONNX top-1 within {ONNX_TOP1_TOLERANCE} points: {ok_onnx}; integer reference "
              f"agreement >= {100 * INTEGER_AGREEMENT:.1f}%: {ok_integer} (files kept in {args.out})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
