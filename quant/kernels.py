"""Build and load the fused CPU kernels of ``quant/csrc/lsq_cpu.cpp`` (optional).

The kernels do LSQ fake quantization and its backward pass in one pass each over the
tensor, with Bin Regularization's per-bin statistics and gradient in the same passes
(see the C++ file). They are compiled on first use with ``torch.utils.cpp_extension``
(about 30 s, once per machine: the build is cached under ``~/.cache/torch_extensions``)
for the vector instructions torch detected on this CPU (AVX-512, AVX2 or SSE2). They
apply to float32 tensors on the CPU outside ``torch.compile``. Without a C++ compiler, or
with ``QATBR_KERNELS=eager`` in the environment, everything runs on the eager PyTorch
path, which gives the same values (tests/test_bin_stats.py compares the two).
The kernels can apply a ReLU to their input in the same passes (``LSQQuantizer.input_relu``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys

import torch

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "lsq_cpu.cpp")

#: Environment variable: "eager" disables the kernels; "cpp" makes a failed build an error.
ENV_VAR = "QATBR_KERNELS"

#: Environment variable: build for AVX512, AVX2 or DEFAULT (the compiler's baseline) instead
#: of what torch detected on this CPU (to test the narrower vector code on a wider machine;
#: AVX512 on a CPU without it would crash).
ARCH_ENV_VAR = "QATBR_KERNELS_ARCH"

_ARCH_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mavx2", "-mfma"],
    "AVX2": ["-mavx2", "-mfma"],
    "DEFAULT": [],  # the compiler's baseline (SSE2 on x86-64); also any CPU torch names otherwise
}

_MODES = ("auto", "eager", "cpp")

_state: dict = {}


def kernel_mode() -> str:
    """``QATBR_KERNELS`` (default ``auto``), lower-cased.

    Raises:
        ValueError: naming the variable, when it is not auto, eager or cpp.
    """
    mode = os.environ.get(ENV_VAR, "auto").strip().lower()
    if mode not in _MODES:
        raise ValueError(f"environment variable {ENV_VAR} must be one of {', '.join(_MODES)}, got {mode!r}")
    return mode


def target_arch() -> str:
    """The instruction set to build for: ``QATBR_KERNELS_ARCH`` if set, else what torch detected.

    Raises:
        ValueError: naming the variable, when it is set to something other than AVX512, AVX2, DEFAULT.
    """
    raw = os.environ.get(ARCH_ENV_VAR, "")
    forced = raw.strip().upper()
    if forced and forced not in _ARCH_FLAGS:
        raise ValueError(f"environment variable {ARCH_ENV_VAR} must be one of {', '.join(_ARCH_FLAGS)}, "
                         f"got {raw!r}")
    detected = torch.backends.cpu.get_cpu_capability()
    return forced or (detected if detected in _ARCH_FLAGS else "DEFAULT")


def check_environment() -> None:
    """Validate ``QATBR_KERNELS`` and ``QATBR_KERNELS_ARCH`` (before any work; see ``kernel_mode``)."""
    kernel_mode()
    target_arch()


def _build():
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler: {compiler!r} is not on PATH")
    # Importing cpp_extension logs "No CUDA runtime is found" on CPU-only machines: noise here.
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        logger.setLevel(level)

    if shutil.which("ninja") is None:  # the ninja of requirements.txt, where its bin folder is not on PATH
        import ninja
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    arch = target_arch()
    # -fopenmp: at::parallel_for is an OpenMP pragma in the header; without it the loop runs on one thread.
    flags = ["-O3", "-ffp-contract=off", "-fopenmp", *_ARCH_FLAGS[arch]]
    # One build per checkout and instruction set (the build file names the source by its path).
    checkout = hashlib.sha1(SOURCE.encode()).hexdigest()[:8]
    name = f"qatbr_lsq_cpu_{arch.lower()}_{checkout}"
    build_dir = cpp_extension._get_build_directory(name, verbose=False)
    if not os.path.exists(os.path.join(build_dir, f"{name}.so")):
        print(f"quant.kernels: building the fused CPU kernels ({arch}) in {build_dir} "
              f"(once per machine and checkout, 30-40 s)", file=sys.stderr, flush=True)
    module = cpp_extension.load(name=name, sources=[SOURCE], extra_cflags=flags, extra_ldflags=["-fopenmp"],
                                build_directory=build_dir, verbose=False)
    _state["arch"] = arch
    return module


def _failure_reason(exc: Exception) -> str:
    """The first line of a failed build that says what went wrong (an ``error`` line), else the first line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower() and not line.startswith(("[", "c++ ", "g++ "))]
    return (errors or lines or [type(exc).__name__])[0][:300]


def cpu_kernels():
    """The compiled kernel module, or None when disabled or not buildable (then one stderr line says why).

    Raises:
        ValueError: a bad ``QATBR_KERNELS`` / ``QATBR_KERNELS_ARCH``.
        RuntimeError: when ``QATBR_KERNELS=cpp`` and the build fails.
    """
    if "module" not in _state:
        mode = kernel_mode()
        module = None
        if mode != "eager":
            try:
                module = _build()
            except Exception as exc:  # no compiler, no headers, ...: the PyTorch path still works
                reason = _failure_reason(exc)
                if mode == "cpp":
                    raise RuntimeError(f"{ENV_VAR}=cpp but the fused CPU kernels did not build: {reason}") from exc
                _state["reason"] = reason
                print(f"quant.kernels: WARNING: fused CPU kernels unavailable ({reason}); using PyTorch ops "
                      f"(same values, slower). Install a C++ compiler (g++) or set {ENV_VAR}=eager to skip "
                      f"the build.", file=sys.stderr, flush=True)
        _state["module"] = module
    return _state["module"]


def describe() -> str:
    """One line for banners and config.json: which implementation runs LSQ and BR on the CPU."""
    if cpu_kernels() is not None:
        return f"fused CPU kernels ({_state['arch']})"
    if kernel_mode() == "eager":
        return f"PyTorch ops ({ENV_VAR}=eager)"
    return f"PyTorch ops (kernels unavailable: {_state.get('reason', 'unknown')})"


def kernels_apply(x: torch.Tensor) -> bool:
    """Whether the fused kernels handle ``x``: a float32 CPU tensor outside torch.compile, kernels built."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and not torch.compiler.is_compiling()
            and cpu_kernels() is not None)
