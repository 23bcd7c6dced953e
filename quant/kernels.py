"""Build and load the fused CPU kernels of ``quant/csrc/lsq_cpu.cpp`` (optional).

The kernels do LSQ fake quantization and its backward pass in one pass each over the
tensor, with Bin Regularization's per-bin statistics and gradient in the same passes
(see the C++ file). They are compiled on first use with ``torch.utils.cpp_extension``
(about 30 s, once per machine: the build is cached under ``~/.cache/torch_extensions``)
for the vector instructions torch detected on this CPU (AVX-512, AVX2 or SSE2). They
apply to float32 tensors on the CPU outside ``torch.compile``. Without a C++ compiler, or
with ``QATBR_KERNELS=eager`` in the environment, everything runs on the eager PyTorch
path, which gives the same values (tests/test_bin_stats.py compares the two).
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import warnings

import torch

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "lsq_cpu.cpp")

#: Environment variable: "eager" disables the kernels; "cpp" makes a failed build an error.
ENV_VAR = "QATBR_KERNELS"

#: Environment variable: build for AVX512, AVX2 or DEFAULT (SSE2) instead of what torch
#: detected on this CPU (to test the narrower vector code on a wider machine).
ARCH_ENV_VAR = "QATBR_KERNELS_ARCH"

_ARCH_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mavx2", "-mfma"],
    "AVX2": ["-mavx2", "-mfma"],
}

_state: dict = {}


def _build():
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
    capability = os.environ.get(ARCH_ENV_VAR) or torch.backends.cpu.get_cpu_capability()
    if capability not in (*_ARCH_FLAGS, "DEFAULT"):
        raise ValueError(f"{ARCH_ENV_VAR} must be one of {', '.join((*_ARCH_FLAGS, 'DEFAULT'))}, got {capability!r}")
    # -fopenmp: at::parallel_for is an OpenMP pragma in the header; without it the loop runs on one thread.
    flags = ["-O3", "-ffp-contract=off", "-fopenmp", *_ARCH_FLAGS.get(capability, [])]
    name = f"qatbr_lsq_cpu_{capability.lower()}"
    build_dir = cpp_extension._get_build_directory(name, verbose=False)
    if not os.path.exists(os.path.join(build_dir, f"{name}.so")):
        print(f"quant.kernels: building the fused CPU kernels in {build_dir} (once per machine, about 30 s)",
              file=sys.stderr, flush=True)
    return cpp_extension.load(name=name, sources=[SOURCE], extra_cflags=flags, extra_ldflags=["-fopenmp"],
                              build_directory=build_dir, verbose=False)


def _first_error_line(exc: Exception) -> str:
    """The compiler's first ``error:`` line of a failed build, else the exception's first line."""
    lines = str(exc).splitlines()
    errors = [line.strip() for line in lines if "error:" in line]
    return f"{type(exc).__name__}: {(errors or lines or [''])[0]}"


def cpu_kernels():
    """The compiled kernel module, or None when disabled or not buildable (then a warning says why).

    Raises:
        RuntimeError: when ``QATBR_KERNELS=cpp`` and the build fails.
    """
    if "module" not in _state:
        mode = os.environ.get(ENV_VAR, "auto").lower()
        if mode not in ("auto", "eager", "cpp"):
            raise ValueError(f"{ENV_VAR} must be 'auto', 'eager' or 'cpp', got {mode!r}")
        module = None
        if mode != "eager":
            try:
                module = _build()
            except Exception as exc:  # no compiler, no headers, ...: the eager path still works
                if mode == "cpp":
                    raise RuntimeError(f"{ENV_VAR}=cpp but the CPU kernels did not build: {exc}") from exc
                warnings.warn(f"quant.kernels: fused CPU kernels unavailable ({_first_error_line(exc)}); "
                              "using eager PyTorch ops (same values, slower)", RuntimeWarning, stacklevel=2)
        _state["module"] = module
    return _state["module"]


def kernels_apply(x: torch.Tensor) -> bool:
    """Whether the fused kernels handle ``x``: a float32 CPU tensor outside torch.compile, kernels built."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and not torch.compiler.is_compiling()
            and cpu_kernels() is not None)
