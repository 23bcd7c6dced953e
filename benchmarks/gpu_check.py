#!/usr/bin/env python
"""The GPU check of docs/performance.md: one command, under 8 minutes on one GPU, one JSON.

    python benchmarks/gpu_check.py --out gpu_check.json

Three parts, each skipped when the time budget (``--budget-s``, 450 s) would not cover it:

1. step throughput (``benchmarks/throughput.py --mode step``) on CUDA with bf16 autocast
   and channels_last: float / LSQ / LSQ+W-BR / LSQ+W-BR+A-BR, ratios and peak memory;
2. whole epochs of the real pipeline on a CIFAR-sized synthetic split (50,000 / 10,000
   images on the device), LSQ and LSQ+W-BR+A-BR, and the extrapolated 100-epoch run;
3. the real thing: ``cifar10_qat_br.py`` W2A2 with W-BR and A-BR (30 warmup + 70 BR
   epochs, ``--amp``) on a synthetic CIFAR-10 image folder (written first, decoded once by
   the run), stopped at the budget; its per-epoch times give the projected total.

The target is a full run in at most 300 s (``targets`` in the JSON). Without a GPU the
script says so, writes ``{"status": "skipped"}`` and exits 0. ``--device cpu --tiny``
runs every part in a reduced size on the CPU (the test of this script).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

import throughput  # noqa: E402

#: The GPU targets of the performance issue.
TARGETS = {"full_run_s": 300.0, "abr_peak_memory_vs_lsq": 1.05}
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="gpu_check.json", help="where the JSON goes [gpu_check.json]")
    p.add_argument("--device", default="cuda", help="cuda (the check) or cpu (with --tiny, to test the script)")
    p.add_argument("--budget-s", type=float, default=450.0, help="wall-time budget of the whole check [450]")
    p.add_argument("--tiny", action="store_true", help="reduced sizes (a few seconds on a CPU)")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: steps, epochs, run")
    p.add_argument("--compile", action="store_true", help="also time the step benchmark with torch.compile")
    p.add_argument("--workdir", default=None, help="folder for the synthetic image folder and the run [a temp dir]")
    return p.parse_args(argv)


def write_image_folder(root: str, n_train: int, n_test: int, workers: int) -> None:
    """CIFAR-10 as an image folder (train/<class>/*.png, test/<class>/*.png) of random 32x32 images."""
    from concurrent.futures import ProcessPoolExecutor
    jobs = []
    for split, n in (("train", n_train), ("test", n_test)):
        for c, name in enumerate(CLASSES):
            folder = os.path.join(root, split, name)
            os.makedirs(folder, exist_ok=True)
            count = n // len(CLASSES) + (1 if c < n % len(CLASSES) else 0)
            jobs.append((folder, count, c + (0 if split == "train" else 100)))
    with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        list(pool.map(_write_pngs, jobs))


def _write_pngs(job) -> None:
    import numpy as np
    from PIL import Image
    folder, count, seed = job
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(os.path.join(folder, f"{i:05d}.png"))


def full_run(args, workdir: str, seconds: float) -> dict:
    """Run cifar10_qat_br.py for up to ``seconds``; report its epoch times and the projected total."""
    n_train, n_test, epochs, warmup = (20, 10, 2, 1) if args.tiny else (50000, 10000, 100, 30)
    data = os.path.join(workdir, "cifar10")
    start = time.perf_counter()
    if not os.path.isdir(os.path.join(data, "train")):
        write_image_folder(data, n_train, n_test, os.cpu_count() or 1)
    write_s = time.perf_counter() - start
    out = os.path.join(workdir, "run")
    cmd = [sys.executable, os.path.join(ROOT, "cifar10_qat_br.py"), "--data-dir", data, "--no-download",
           "--output-dir", out, "--overwrite", "--num-bits", "2", "--epochs", str(epochs),
           "--warmup-epochs", str(warmup), "--lambda-br", "1", "--lambda-br-act", "1",
           "--device", args.device, "--workers", str(min(16, os.cpu_count() or 1))]
    cmd += ["--batch-size", "4", "--eval-batch-size", "10"] if args.tiny else []
    cmd += ["--amp"] if args.device.startswith("cuda") else []
    env = dict(os.environ, **({"OMP_NUM_THREADS": "1"} if args.tiny else {}))
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(seconds, 1.0), cwd=ROOT, env=env)
        finished, rc, tail = True, proc.returncode, (proc.stdout + proc.stderr)[-2000:]
    except subprocess.TimeoutExpired as exc:
        finished, rc = False, None
        tail = ((exc.stdout or b"").decode(errors="replace") + (exc.stderr or b"").decode(errors="replace"))[-2000:]
    wall = time.perf_counter() - start
    timing = []
    path = os.path.join(out, "timing.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            timing = [json.loads(line) for line in f if line.strip()]
    result = {"command": " ".join(cmd), "finished": finished, "returncode": rc, "process_wall_s": wall,
              "image_folder_write_s": write_s, "epochs": epochs, "warmup_epochs": warmup,
              "epochs_done": len(timing), "epoch_s": [t["seconds"] for t in timing], "log_tail": tail}
    if timing:
        secs = [t["seconds"] for t in timing]
        stage1 = [s for t, s in zip(timing, secs) if t["epoch"] <= warmup][1:] or secs[:1]
        stage2 = [s for t, s in zip(timing, secs) if t["epoch"] > warmup][1:] or stage1
        startup = wall - sum(secs) if finished else None
        # Projection: what is done, plus the remaining epochs at the median epoch time of their stage.
        rest = sum(sorted(stage1)[len(stage1) // 2] if e <= warmup else sorted(stage2)[len(stage2) // 2]
                   for e in range(len(timing) + 1, epochs + 1))
        result["projected_run_s"] = wall + rest if not finished else wall
        result["startup_s"] = startup
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        msg = "no CUDA GPU on this machine: the GPU check was skipped (nothing measured)"
        print(msg)
        with open(args.out, "w") as f:
            json.dump({"status": "skipped", "reason": msg}, f, indent=2)
            f.write("\n")
        return 0
    if args.tiny:
        torch.set_num_threads(1)  # a test on a shared CPU: one thread is faster and steadier
    start = time.perf_counter()
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    left = lambda: args.budget_s - (time.perf_counter() - start)  # noqa: E731
    device = torch.device(args.device)
    report = {"status": "ok", "targets": TARGETS, "machine": throughput.machine_info(device), "parts": {}}
    common = ["--device", args.device, "--json", "-"] + (["--amp"] if device.type == "cuda" else [])

    def bench(name: str, extra: list[str], needs_s: float) -> None:
        if name.split("_")[0] in skip:
            return
        if left() < needs_s:
            report["parts"][name] = {"skipped": f"budget: {left():.0f} s left, needs about {needs_s:.0f} s"}
            return
        args_ns = throughput.parse_args(common + extra)
        args_ns.channels_last = device.type == "cuda"
        args_ns.amp = device.type == "cuda"
        t = time.perf_counter()
        result = (throughput.run_steps if args_ns.mode == "step" else throughput.run_epochs)(args_ns, device)
        result["wall_s"] = time.perf_counter() - t
        report["parts"][name] = result
        print(f"[{name}] done in {result['wall_s']:.0f} s: " + json.dumps(result.get("ratios", {}))[:300], flush=True)

    tiny_steps = ["--batch-size", "4", "--rounds", "1", "--steps", "1", "--warmup-steps", "1"]
    bench("steps", tiny_steps if args.tiny else ["--rounds", "5", "--steps", "20", "--warmup-steps", "5"], 30)
    if args.compile:
        bench("steps_compiled", (tiny_steps if args.tiny else ["--rounds", "3", "--steps", "20", "--warmup-steps", "3"])
              + ["--compile", "--variants", "lsq,lsq_wbr_abr", "--no-memory"], 240)
    epoch_flags = ["--mode", "epoch", "--variants", "lsq,lsq_wbr_abr"]
    bench("epochs", epoch_flags + (["--batch-size", "4", "--train-images", "8", "--test-images", "4",
                                    "--eval-batch-size", "10", "--rounds", "1"] if args.tiny else ["--rounds", "2"]), 60)
    if "run" not in skip:
        if left() < 30:
            report["parts"]["run"] = {"skipped": f"budget: {left():.0f} s left"}
        else:
            workdir = args.workdir or tempfile.mkdtemp(prefix="gpu_check_")
            report["parts"]["run"] = full_run(args, workdir, left() - 10)
            run = report["parts"]["run"]
            print(f"[run] {run['epochs_done']}/{run['epochs']} epochs in {run['process_wall_s']:.0f} s; "
                  f"projected {run.get('projected_run_s', float('nan')):.0f} s", flush=True)
    verdict = {}
    run = report["parts"].get("run", {})
    if "projected_run_s" in run:
        ok = run["projected_run_s"] <= TARGETS["full_run_s"] and run["returncode"] in (0, None)
        verdict["full_run_s"] = {"value": run["projected_run_s"], "met": ok}
    steps = report["parts"].get("steps", {})
    if "abr_peak_memory_vs_lsq" in steps.get("ratios", {}):
        value = steps["ratios"]["abr_peak_memory_vs_lsq"]
        verdict["abr_peak_memory_vs_lsq"] = {"value": value, "met": value <= TARGETS["abr_peak_memory_vs_lsq"]}
    report["verdict"] = verdict
    report["wall_s"] = time.perf_counter() - start
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    print(f"GPU check written to {args.out} ({report['wall_s']:.0f} s): {json.dumps(verdict)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
