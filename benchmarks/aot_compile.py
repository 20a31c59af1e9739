"""Compile a kernel for a GPU that is not here, and read what it would use.

Triton compiles ahead of time for any target: the NVIDIA backend ships ``ptxas`` and
``cuobjdump``, so a CPU-only machine can build the cubin that an H100 (sm_90) or an A100 (sm_80)
would run and read its shared memory, registers and spills. This proves, without a GPU, that a
launch configuration compiles and fits; it says nothing about speed or numerical results.

Argument types follow the launchers' naming: capitalised arguments are pointers (``LSE`` and
``Delta`` are fp32, ``Cu*`` and ``Tile*`` int32, the CSR arrays ``RowPtr``, ``Col``,
``TRowPtr`` and ``TCol`` int64 as ``edge_index`` is, the rest have the input dtype),
``*scale`` is fp32, any other lower-case argument is an int32 (a stride or a count). Pointers
carry the divisibility-by-16 hint that a real launch with aligned tensors gives, and strides
too when every ``HEAD_DIM*`` is a multiple of 16 (packed ``(N, H, C)`` strides are multiples
of ``C``).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

import triton

from gatattn.kernels.common import COMPILE_OPTIONS

# Usable shared memory per block (the opt-in limit) by compute capability.
SHARED_MEMORY_LIMIT = {(8, 0): 166912, (8, 6): 101376, (8, 9): 101376, (9, 0): 232448}

_TRITON_TYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}
_FP32_POINTERS = {"LSE", "Delta"}
_INT32_POINTERS = ("Cu", "Tile")
_INT64_POINTERS = {"RowPtr", "Col", "TRowPtr", "TCol", "TPerm", "BiasOffsets"}
_UNHINTED_INTS = {"total", "stride_lse_h", "stride_delta_h"}  # sizes: any value


@dataclass(frozen=True)
class KernelResources:
    """What one compiled kernel needs per program (from ptxas and the cubin)."""

    shared_bytes: int
    registers: int
    spill_stores: int
    spill_loads: int

    @property
    def spills(self) -> bool:
        return self.spill_stores > 0 or self.spill_loads > 0


def signature_of(kernel, dtype: str, constexprs: dict) -> tuple[dict, dict]:
    """``(signature, attrs)`` for :class:`triton.compiler.ASTSource`, by the naming rule above."""
    signature, attrs = {}, {}
    aligned_strides = all(value % 16 == 0 for name, value in constexprs.items()
                          if name.startswith("HEAD_DIM"))
    for index, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        if name[0].isupper():
            signature[name] = "*" + ("fp32" if name in _FP32_POINTERS else
                                     "i32" if name.startswith(_INT32_POINTERS) else
                                     "i64" if name in _INT64_POINTERS else
                                     _TRITON_TYPES[dtype])
        else:
            signature[name] = "fp32" if name.endswith("scale") else "i32"
        if name[0].isupper() or (aligned_strides and name.startswith("stride_")
                                 and name not in _UNHINTED_INTS):
            attrs[(index,)] = [["tt.divisibility", 16]]
    return signature, attrs


def compile_for(kernel, dtype: str, constexprs: dict, capability: tuple[int, int],
                num_warps: int, num_stages: int) -> KernelResources:
    """Compile ``kernel`` for an NVIDIA GPU of ``capability`` and report its resources.

    Raises whatever Triton raises when the kernel does not compile for that target.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("compile_for needs TRITON_INTERPRET unset: the interpreter replaces "
                           "@triton.jit functions with Python ones that cannot be compiled")
    signature, attrs = signature_of(kernel, dtype, constexprs)
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    target = GPUTarget("cuda", capability[0] * 10 + capability[1], 32)
    log = io.StringIO()
    with _fresh_compile_with_ptxas_log(), contextlib.redirect_stdout(log):
        compiled = triton.compile(source, target=target, options=dict(
            num_warps=num_warps, num_stages=num_stages, **COMPILE_OPTIONS))
    spill_stores, spill_loads = _spills(log.getvalue())
    return KernelResources(shared_bytes=compiled.metadata.shared,
                           registers=_registers(compiled.asm["cubin"]),
                           spill_stores=spill_stores, spill_loads=spill_loads)


@contextlib.contextmanager
def _fresh_compile_with_ptxas_log():
    """ptxas prints spills only when it runs: skip Triton's cache, and print its log."""
    knobs = triton.knobs
    with knobs.compilation.scope(), knobs.nvidia.scope():
        knobs.compilation.always_compile = True
        knobs.nvidia.dump_ptxas_log = True
        yield


def _spills(ptxas_log: str) -> tuple[int, int]:
    found = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", ptxas_log)
    if found is None:
        raise RuntimeError(f"no spill line in the ptxas log:\n{ptxas_log}")
    return int(found[1]), int(found[2])


def _registers(cubin: bytes) -> int:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        usage = subprocess.run([tool, "--dump-resource-usage", file.name], check=True,
                               capture_output=True, text=True).stdout
    return int(re.search(r"REG:(\d+)", usage)[1])
