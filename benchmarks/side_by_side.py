#!/usr/bin/env python
"""Runs side by side on one CPU machine: the training images/s of each, by threads per run.

    python benchmarks/side_by_side.py [--rounds 8] [--json out.json]

What a user of a small or shared machine should give each of several runs (``JOBS=N`` in
scripts/sweep.sh, ``--jobs`` in benchmarks/cpu_study.py). Each setting starts its processes
at once, every one a ``benchmarks/throughput.py --mode step`` of ResNet-20 W2A2 + W-BR + A-BR
(batch 128, the real ``Trainer.train_step``; median step time over its rounds):

* ``alone``: one process, torch's default threads (one per core);
* ``2 x default``: two processes, each with torch's default threads (cores oversubscribed);
* ``2 x default, passive``: the same with ``OMP_WAIT_POLICY=PASSIVE`` (idle threads sleep
  instead of spinning);
* ``2 x cores/2``: two processes, each with ``OMP_NUM_THREADS`` = cores / 2.

Prints each process's images/s, the setting's total, and the total as a ratio of ``alone``
(all measured in this one call). The processes of a setting start together but their
first steps (α initialisation, warm-up) are not timed, so their timed rounds overlap.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def settings(cores: int) -> dict[str, list[dict]]:
    """Setting name -> the environment changes of each of its processes."""
    half = str(max(cores // 2, 1))
    return {"alone": [{}],
            "2 x default": [{}, {}],
            "2 x default, passive": [{"OMP_WAIT_POLICY": "PASSIVE"}] * 2,
            f"2 x cores/2 (OMP_NUM_THREADS={half})": [{"OMP_NUM_THREADS": half}] * 2}


def run_setting(envs: list[dict], rounds: int, prefix: str) -> list[float]:
    """Start one throughput.py per environment at once; their training images/s."""
    processes = []
    for i, extra in enumerate(envs):
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
        env.update(extra)
        out = f"{prefix}_{i}.json"
        argv = [sys.executable, os.path.join(HERE, "throughput.py"), "--mode", "step", "--variants", "lsq_wbr_abr",
                "--device", "cpu", "--no-memory", "--rounds", str(rounds), "--json", out]
        processes.append((subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL), out))
    speeds = []
    for process, out in processes:
        if process.wait() != 0:
            raise RuntimeError(f"throughput.py exited with {process.returncode}")
        with open(out) as f:
            speeds.append(json.load(f)["variants"]["lsq_wbr_abr"]["img_per_s"])
    return speeds


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--rounds", type=int, default=8, help="timed rounds of 2 steps per process [8]")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the numbers as JSON")
    args = p.parse_args(argv)
    cores = len(os.sched_getaffinity(0))
    load = os.getloadavg()[0]
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for i, (name, envs) in enumerate(settings(cores).items()):
            results[name] = run_setting(envs, args.rounds, os.path.join(folder, str(i)))
    alone = results["alone"][0]
    print(f"ResNet-20 W2A2 + W-BR + A-BR training step, batch 128, {cores} cores; "
          f"load average before: {load:.1f}")
    print(f"{'setting':42s} {'images/s per process':>24s} {'total':>8s} {'total / alone':>14s}")
    for name, speeds in results.items():
        each = ", ".join(f"{s:.0f}" for s in speeds)
        print(f"{name:42s} {each:>24s} {sum(speeds):8.0f} {sum(speeds) / alone:14.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cores": cores, "img_per_s": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
