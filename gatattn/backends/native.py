"""gatattn's compiled CPU kernels (``gatattn/csrc``), built on first use.

The message-passing route's CSR form gathers every source's keys and values once per head and
per product when it is written in torch ops (an SDDMM and SpMMs per head): on CPU those gathers
of scattered rows, not the arithmetic, take its time. ``csr_attention.cpp`` runs each target's
in-edges in one loop that reads a source's keys and values once for all heads, forward and
backward. Two more cut the per-call cost of small graphs: ``packed_sdpa.cpp``, the SDPA route's
views and call for one size group in one step, for calls that nothing records
(:mod:`gatattn.backends.sdpa`), and ``nonfinite.cpp``, one pass over ``q``, ``k``, ``v`` for a
keyword call's finite flag or a ``graph=`` call's guard (:mod:`gatattn.backends.nonfinite`): on
graphs of a few dozen nodes each torch op they replace costs about what the attention does.
:func:`cpu_kernels` compiles them with :func:`torch.utils.cpp_extension.load` the first time a
call needs them (a C++ compiler and ``ninja``, a dependency, are needed; about a minute, once per
machine: the build is kept in torch's extensions directory, with AVX2 and FMA where the CPU has
them). Where they cannot be
built, a warning says why and the torch-ops forms run: the same functions, slower.
``GATATTN_NATIVE_KERNELS=0`` in the environment keeps the torch-ops forms (to compare them).
"""

from __future__ import annotations

import ctypes.util
import functools
import os
import warnings
from pathlib import Path
from types import ModuleType

import torch

SOURCES = [Path(__file__).resolve().parents[1] / "csrc" / name
           for name in ("csr_attention.cpp", "packed_sdpa.cpp", "nonfinite.cpp", "module.cpp")]
ENVIRONMENT_SWITCH = "GATATTN_NATIVE_KERNELS"


@functools.cache
def cpu_kernels() -> ModuleType | None:
    """The compiled module (``forward``, ``backward``, ``poison_if_nonfinite_``), or ``None``
    where it is switched off or cannot be built (then after one warning)."""
    if os.environ.get(ENVIRONMENT_SWITCH, "1") == "0":
        return None
    try:
        from torch.utils.cpp_extension import load

        tag, vector_flags, vector_libraries = _vector_flags()
        # -fopenmp: at::parallel_for runs its tasks on torch's OpenMP threads.
        return load(name=f"gatattn_cpu_kernels_{tag}", sources=[str(s) for s in SOURCES],
                    extra_cflags=["-O3", "-fopenmp", *vector_flags],
                    extra_ldflags=["-fopenmp", *vector_libraries])
    except Exception as error:  # no compiler, no ninja, a failed build: the torch-ops form
        warnings.warn(
            f"gatattn could not build its CPU kernels ({type(error).__name__}: {error}); the "
            f"message-passing route and the non-finite guard run in torch ops instead (same "
            f"results, slower). Set "
            f"{ENVIRONMENT_SWITCH}=0 to silence this.", RuntimeWarning, stacklevel=2)
        return None


def _vector_flags() -> tuple[str, list[str], list[str]]:
    """The build's name tag, instruction-set flags and libraries, from the CPU capability torch
    detects: AVX2 with FMA where the CPU has it (an AVX-512 CPU too), else the compiler's
    default; with AVX2, glibc's vector math library (libmvec) where it is installed, whose
    vector ``expf`` took 7% off the forward loop of 1024 complete graphs of 10-40 nodes. The
    tag keeps builds for different CPUs apart in torch's extensions directory, which a build
    for a newer CPU would otherwise serve to an older one. (AVX2 took 12-40% off the loops'
    time against the default SSE2 code on an AVX2 machine.)"""
    capability = torch.backends.cpu.get_cpu_capability()
    if not capability.startswith(("AVX2", "AVX512")):
        return "default", [], []
    if ctypes.util.find_library("mvec") is None:
        return "avx2", ["-mavx2", "-mfma"], []
    return "avx2_mvec", ["-mavx2", "-mfma", "-DGATATTN_LIBMVEC"], ["-lmvec"]
