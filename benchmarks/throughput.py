#!/usr/bin/env python
"""Throughput of float / LSQ / LSQ+W-BR / LSQ+W-BR+A-BR training, measured as ratios in one process.

Two modes, both built on the real training code (``engine.Trainer`` with configurations
from ``config.build_parser``, models from ``cifar10_qat_br.build_quantized_model``):

* ``--mode step`` (default): the four variants train on identical models (same seed)
  and one fixed random batch. Rounds are interleaved (each round times ``--steps``
  ``Trainer.train_step`` calls of every variant, in rotating order), so a slow phase of
  a shared machine hits every variant alike; ratios are taken within each round and the
  median over rounds is reported. Peak memory of one step is measured per variant.
* ``--mode epoch``: whole epochs of the real pipeline (``data.DeviceLoader`` over a
  synthetic uint8 CIFAR-sized split on the device, random crop + flip, training,
  evaluation under ``inference_mode``, per-epoch summaries), interleaved the same way,
  and the wall time of a full two-stage run extrapolated from them.

Memory: on CUDA ``torch.cuda.max_memory_allocated`` over one step. On the CPU two
measures: ``saved_mb``, the bytes of the distinct storages that autograd saves for
backward (collected with ``torch.autograd.graph.saved_tensors_hooks`` during the
forward pass), and ``peak_mb``, the largest heap in use during one full step above the
heap in use before it (glibc ``mallinfo2``, read
after every aten op through a ``TorchDispatchMode``). See docs/performance.md.

    python benchmarks/throughput.py                       # ResNet-20, batch 128, W2A2, CPU
    python benchmarks/throughput.py --json results.json   # also write the numbers as JSON
    python benchmarks/throughput.py --mode epoch --train-images 1024
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from run import config  # noqa: E402
from cifar10_qat_br import build_quantized_model  # noqa: E402
from run.data import DeviceLoader, Split  # noqa: E402
from engine import Trainer  # noqa: E402

#: The variants, as extra flags of cifar10_qat_br.py ({bits} is --bits).
VARIANTS = {
    "float": ["--num-bits", "32", "--lambda-br", "0", "--lambda-br-act", "0"],
    "lsq": ["--num-bits", "{bits}", "--lambda-br", "0", "--lambda-br-act", "0"],
    "lsq_wbr": ["--num-bits", "{bits}", "--lambda-br", "1", "--lambda-br-act", "0"],
    "lsq_wbr_abr": ["--num-bits", "{bits}", "--lambda-br", "1", "--lambda-br-act", "1"],
}

#: Ratios reported: name -> (numerator variant, denominator variant) of throughput.
RATIOS = {
    "lsq_vs_float": ("lsq", "float"),
    "wbr_vs_lsq": ("lsq_wbr", "lsq"),
    "wbr_abr_vs_lsq": ("lsq_wbr_abr", "lsq"),
}

#: The targets of the performance issue (docs/performance.md); the throughput ones are for the CPU.
TARGETS = {"lsq_vs_float": 0.85, "wbr_abr_vs_lsq": 0.95, "abr_peak_memory_vs_lsq": 1.05}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--mode", choices=("step", "epoch"), default="step")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ", ".join(VARIANTS))
    p.add_argument("--arch", default="resnet20")
    p.add_argument("--bits", type=int, default=2, help="weight and activation bits of the quantized variants [2]")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda [auto]")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA only, as cifar10_qat_br.py --amp)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last model and batches (default: on CUDA, as cifar10_qat_br.py)")
    p.add_argument("--compile", nargs="?", const="on", default="auto", metavar="MODE",
                   help="as cifar10_qat_br.py --compile: the whole training forward pass compiled [auto: "
                        "reduce-overhead on CUDA, off on the CPU]")
    p.add_argument("--rounds", type=int, default=10,
                   help="interleaved rounds [10: the per-round ratios of this shared CPU spread by ±10 %%]")
    p.add_argument("--steps", type=int, default=2, help="step mode: training steps per variant per round [2]")
    p.add_argument("--warmup-steps", type=int, default=2, help="step mode: untimed steps per variant first [2]")
    p.add_argument("--no-memory", action="store_true", help="step mode: skip the memory measurement")
    p.add_argument("--train-images", type=int, default=None,
                   help="epoch mode: synthetic training images [50000 on CUDA, 1024 on the CPU]")
    p.add_argument("--test-images", type=int, default=None,
                   help="epoch mode: synthetic test images [10000 on CUDA, 500 on the CPU]")
    p.add_argument("--eval-batch-size", type=int, default=1000)
    p.add_argument("--run-epochs", type=int, default=100, help="epoch mode: epochs of the extrapolated run [100]")
    p.add_argument("--run-warmup-epochs", type=int, default=30,
                   help="epoch mode: LSQ-only epochs of the extrapolated run [30]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON ('-': stdout only)")
    args = p.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown or not args.variants:
        p.error(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    if min(args.rounds, args.steps, args.batch_size) < 1 or args.warmup_steps < 0:
        p.error("--rounds, --steps and --batch-size must be >= 1, --warmup-steps >= 0")
    return args


# -- set-up ------------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def machine_info(device: torch.device) -> dict:
    """What the numbers came from: CPU model, cores, threads, load, torch, GPU."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "device": str(device)}
    try:
        info["load_average_1m"] = os.getloadavg()[0]
    except OSError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def make_trainer(variant: str, args, device: torch.device, train_loader=None, test_loader=None,
                 warmup_epochs: int = 0, epochs: int = 100) -> Trainer:
    """A Trainer of one variant, built as cifar10_qat_br.train builds it (same seed: same weights)."""
    flags = [f.format(bits=args.bits) for f in VARIANTS[variant]]
    flags += ["--arch", args.arch, "--batch-size", str(args.batch_size), "--epochs", str(epochs),
              "--warmup-epochs", str(warmup_epochs), "--eval-batch-size", str(args.eval_batch_size),
              "--device", str(device), "--seed", str(args.seed)]
    flags += ["--amp"] if args.amp else []
    flags += ["--compile", args.compile]
    cfg = config.build_parser().parse_args(flags)
    config.validate(cfg)
    torch.manual_seed(args.seed)
    model = build_quantized_model(cfg).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    trainer = Trainer(cfg, model, train_loader, test_loader, device, output_dir=None, log=lambda *a, **k: None)
    return trainer


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ratio_summary(values: list[float]) -> dict:
    """Median and range of per-round ratios."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "rounds": values}


# -- memory ------------------------------------------------------------------------------------
class _HeapPeak(torch.utils._python_dispatch.TorchDispatchMode):
    """Largest glibc heap in use (``mallinfo2``: arena + mmap bytes) seen after any aten op."""

    def __init__(self, read):
        super().__init__()
        self.read = read
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, self.read())
        return out


def _heap_reader():
    """A function returning the bytes glibc malloc has in use (where torch's CPU tensors live),
    or None where mallinfo2 is missing."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        fn = libc.mallinfo2
    except (OSError, AttributeError):
        return None

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]

    fn.restype = MallInfo2
    # The fused kernels' outputs live in buffers mapped by their own allocator, unseen by malloc.
    return lambda: fn().uordblks + fn().hblkhd


def saved_tensor_bytes(trainer: Trainer, x: torch.Tensor, y: torch.Tensor, use_br: bool) -> int:
    """Bytes of the distinct storages autograd saves for backward in one forward pass (incl. the loss)."""
    storages: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if trainer._cuda_graphs:  # as Trainer.train_step, after which every α is initialised
            torch.compiler.cudagraph_mark_step_begin()
        loss = (trainer._compiled_losses or trainer.forward_losses)(x, y, use_br)[0]
    del loss
    if trainer.hooks is not None:
        trainer.hooks.clear()
    return sum(storages.values())


def step_peak_bytes(trainer: Trainer, x, y, use_br: bool, device: torch.device) -> tuple[int, str]:
    """Peak memory of one training step and how it was measured."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        trainer.train_step(x, y, use_br)
        synchronize(device)
        return torch.cuda.max_memory_allocated(device), "torch.cuda.max_memory_allocated"
    read = _heap_reader()
    if read is None:
        return 0, "unavailable (no glibc mallinfo2)"
    trainer.optimizer.zero_grad(set_to_none=True)
    before = read()
    mode = _HeapPeak(read)
    with mode:
        trainer.train_step(x, y, use_br)
    return max(mode.peak - before, 0), "glibc mallinfo2 after every aten op, above the heap before the step"


# -- step mode ----------------------------------------------------------------------------------
def run_steps(args, device: torch.device) -> dict:
    """``--mode step``: time ``--steps`` training steps of each variant on one fixed random batch, ``--rounds``
    times in rotating order; per variant the median seconds per step and images/s, the ratios between
    variants measured round by round, and (unless ``--no-memory``) peak and saved-for-backward memory in MiB."""
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch_size, 3, 32, 32, generator=gen).to(device)
    y = torch.randint(0, 10, (args.batch_size,), generator=gen).to(device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    trainers = {v: make_trainer(v, args, device) for v in args.variants}
    for t in trainers.values():
        t.model.train()
        # every α trained in every variant, so the ratios compare like with like; a default run (W-BR alone)
        # freezes α in stage 2 (config.default_freeze_alpha), which only takes work away from its steps
        t.set_alpha_trainable(1)
        for _ in range(args.warmup_steps):  # first steps: α initialisation, allocator and cuDNN warm-up
            t.train_step(x, y, use_br=True)
    synchronize(device)
    times = {v: [] for v in args.variants}
    order = list(args.variants)
    for r in range(args.rounds):
        for v in order[r % len(order):] + order[:r % len(order)]:
            synchronize(device)
            start = time.perf_counter()
            for _ in range(args.steps):
                trainers[v].train_step(x, y, use_br=True)
            synchronize(device)
            times[v].append((time.perf_counter() - start) / args.steps)
    result = {"variants": {}, "ratios": {}}
    for v, ts in times.items():
        result["variants"][v] = {"step_s": statistics.median(ts), "img_per_s": args.batch_size / statistics.median(ts),
                                 "step_s_rounds": ts}
    for name, (num, den) in RATIOS.items():
        if num in times and den in times:
            result["ratios"][name] = ratio_summary([d / n for n, d in zip(times[num], times[den])])
    if not args.no_memory:
        method = None
        for v, t in trainers.items():
            peak, method = step_peak_bytes(t, x, y, True, device)
            result["variants"][v]["peak_mb"] = peak / 2**20
            result["variants"][v]["saved_mb"] = saved_tensor_bytes(t, x, y, True) / 2**20
        result["memory_method"] = {"peak_mb": method, "saved_mb": "distinct storages saved for backward "
                                   "(torch.autograd.graph.saved_tensors_hooks) in one forward pass"}
        if "lsq" in trainers and "lsq_wbr_abr" in trainers:
            lsq, abr = result["variants"]["lsq"], result["variants"]["lsq_wbr_abr"]
            if lsq["peak_mb"] > 0:
                result["ratios"]["abr_peak_memory_vs_lsq"] = abr["peak_mb"] / lsq["peak_mb"]
            result["ratios"]["abr_saved_memory_vs_lsq"] = abr["saved_mb"] / lsq["saved_mb"]
    return result


# -- epoch mode ---------------------------------------------------------------------------------
def synthetic_split(n: int, seed: int) -> Split:
    """``n`` random uint8 (3, 32, 32) images with random labels 0-9: the shape of CIFAR-10, for timing only."""
    gen = torch.Generator().manual_seed(seed)
    return Split(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen),
                 torch.randint(0, 10, (n,), generator=gen))


def run_epochs(args, device: torch.device) -> dict:
    """``--mode epoch``: time whole epochs (training and test) of each variant on synthetic data."""
    cuda = device.type == "cuda"
    n_train = args.train_images or (50000 if cuda else 1024)
    n_test = args.test_images or (10000 if cuda else 500)
    train_split, test_split = synthetic_split(n_train, args.seed), synthetic_split(n_test, args.seed + 1)
    trainers = {}
    for v in args.variants:
        train_loader = DeviceLoader(train_split, args.batch_size, device, train=True, seed=args.seed,
                                    channels_last=args.channels_last)
        test_loader = DeviceLoader(test_split, args.eval_batch_size, device, train=False,
                                   channels_last=args.channels_last)
        trainers[v] = make_trainer(v, args, device, train_loader, test_loader, warmup_epochs=0,
                                   epochs=args.rounds + 1)
    loader = next(iter(trainers.values())).train_loader
    first, epochs = {}, {v: [] for v in args.variants}
    data_s = []
    for v, t in trainers.items():  # epoch 1 of each: α initialisation, warm-up, compilation
        synchronize(device)
        start = time.perf_counter()
        t.run_epoch(1, {})
        synchronize(device)
        first[v] = time.perf_counter() - start
    order = list(args.variants)
    for r in range(args.rounds):
        synchronize(device)
        start = time.perf_counter()
        for _ in loader.batches(r + 2):  # the data pipeline alone: indexing, crop, flip, normalise
            pass
        synchronize(device)
        data_s.append(time.perf_counter() - start)
        for v in order[r % len(order):] + order[:r % len(order)]:
            synchronize(device)
            start = time.perf_counter()
            trainers[v].run_epoch(r + 2, {})
            synchronize(device)
            epochs[v].append(time.perf_counter() - start)
    result = {"train_images": n_train, "test_images": n_test, "steps_per_epoch": len(loader),
              "data_only_epoch_s": statistics.median(data_s), "variants": {}, "ratios": {}}
    for v, ts in epochs.items():
        med = statistics.median(ts)
        result["variants"][v] = {"epoch_s": med, "img_per_s": n_train / med, "first_epoch_s": first[v],
                                 "epoch_s_rounds": ts}
    for name, (num, den) in RATIOS.items():
        if num in epochs and den in epochs:
            result["ratios"][name] = ratio_summary([d / n for n, d in zip(epochs[num], epochs[den])])
    if "lsq" in epochs and "lsq_wbr_abr" in epochs:
        # A two-stage run: W epochs of LSQ alone, then E - W with W-BR and A-BR; the first
        # epoch's extra cost (initialisation, warm-up, compilation) is paid once.
        e, w = args.run_epochs, args.run_warmup_epochs
        lsq, br = result["variants"]["lsq"]["epoch_s"], result["variants"]["lsq_wbr_abr"]["epoch_s"]
        startup = max(first["lsq"] - lsq, 0.0)
        result["estimated_run"] = {"epochs": e, "warmup_epochs": w, "train_images": n_train,
                                   "seconds": startup + w * lsq + (e - w) * br,
                                   "note": "startup + W x LSQ epoch + (E - W) x BR epoch, data loading and "
                                           "evaluation included; process start and data decoding not included"}
    return result


# -- output -------------------------------------------------------------------------------------
def format_table(result: dict) -> str:
    lines = []
    step = result["mode"] == "step"
    head = f"{'variant':<14}{'img/s':>10}{'step ms' if step else 'epoch s':>11}"
    if step and any("peak_mb" in v for v in result["variants"].values()):
        head += f"{'peak MB':>10}{'saved MB':>10}"
    lines.append(head)
    for name, v in result["variants"].items():
        row = f"{name:<14}{v['img_per_s']:>10.1f}"
        row += f"{v['step_s'] * 1e3:>11.1f}" if step else f"{v['epoch_s']:>11.2f}"
        if "peak_mb" in v:
            row += f"{v['peak_mb']:>10.1f}{v['saved_mb']:>10.1f}"
        lines.append(row)
    lines.append("")
    for name, r in result["ratios"].items():
        target = TARGETS.get(name)
        if isinstance(r, dict):
            text = f"{r['median']:.3f} (rounds {r['min']:.3f}-{r['max']:.3f})"
            value = r["median"]
        else:
            text, value = f"{r:.3f}", r
        if target is not None and (name.endswith("memory_vs_lsq") or result["machine"]["device"] == "cpu"):
            ok = value <= target if name.endswith("memory_vs_lsq") else value >= target
            relation = "<=" if name.endswith("memory_vs_lsq") else ">="
            text += f"   target {relation} {target}: {'met' if ok else 'NOT met'}"
        lines.append(f"{name:<26}{text}")
    if "data_only_epoch_s" in result:
        lines.append(f"{'data pipeline alone':<26}{result['data_only_epoch_s']:.3f} s/epoch")
    if "estimated_run" in result:
        e = result["estimated_run"]
        lines.append(f"{'estimated run':<26}{e['seconds']:.0f} s for {e['epochs']} epochs "
                     f"({e['warmup_epochs']} LSQ + {e['epochs'] - e['warmup_epochs']} BR) "
                     f"of {e['train_images']} images")
    m = result["machine"]
    lines.append(f"machine: {m['cpu']} ({m['cpu_count']} cores, {m['torch_threads']} torch threads"
                 + (f", load {m['load_average_1m']:.1f}" if "load_average_1m" in m else "")
                 + (f"), GPU {m['gpu']}" if "gpu" in m else ")") + f", torch {m['torch']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    # With --compile every variant's Trainer compiles its own graphs of the same code (two stages
    # each): more than torch's default of 8 recompilations, after which it would run eagerly.
    torch._dynamo.config.cache_size_limit = 64
    device = resolve_device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA GPU is available", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.channels_last is None:
        args.channels_last = device.type == "cuda"
    args.amp = args.amp and device.type == "cuda"
    start = time.perf_counter()
    result = run_steps(args, device) if args.mode == "step" else run_epochs(args, device)
    result = {"mode": args.mode, **result, "wall_s": time.perf_counter() - start,
              "settings": {k: getattr(args, k) for k in ("arch", "bits", "batch_size", "amp", "channels_last",
                                                         "compile", "rounds", "steps", "warmup_steps", "seed")},
              "machine": machine_info(device)}
    print(format_table(result), flush=True)
    if args.json:
        text = json.dumps(result, indent=2)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as f:
                f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
