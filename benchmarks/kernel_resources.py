"""What each launch configuration of the Triton kernels needs on sm_80 and sm_90, from real
builds made here without a GPU, and whether ``keep()`` in kernels/tuning.py judged it rightly.

Every configuration of ``CONFIGS`` (kept or not) of the dense kernels is compiled for each
architecture, dtype and head dim, and the CSR kernels with their one configuration; the table
gives Triton's shared memory, ptxas's registers and spills, and the verdict: a kept
configuration must fit the architecture's shared memory and should not spill; a dropped one that
would have fitted without spilling is a candidate the filter lost.

    python benchmarks/kernel_resources.py             # sm_90, sm_80; bf16; C = 64, 128, 256
    python benchmarks/kernel_resources.py --dtypes float32 --archs 90 --head-dims 64
    python benchmarks/kernel_resources.py --quick     # sm_90, bf16, C = 128
    python benchmarks/kernel_resources.py --tightest  # per kernel, only the kept candidate with
                                                      # the most shared memory (the CI check)

It writes benchmarks/results/kernel-resources-<dtypes>.md (or ``--out``), and with ``--json``
the rows. fp32 builds take 10-30 s each (exact fp32 dots unroll into FMAs), 16-bit ones about
1 s. This measures resources, not speed: timings need a GPU (benchmarks/bench_gpu.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compiling needs the real @triton.jit functions

import torch  # noqa: E402
import triton  # noqa: E402
from aot_compile import SHARED_MEMORY_LIMIT, compile_for  # noqa: E402  (beside this script)
from tqdm import tqdm  # noqa: E402

from gatattn.kernels import csr_attention, flash_attention  # noqa: E402
from gatattn.kernels.common import kernel_constants, padded_dim  # noqa: E402
from gatattn.kernels.tuning import (  # noqa: E402
    CONFIGS,
    KERNELS,
    REGISTER_TILE_BUDGET,
    TileConfig,
    candidates,
    register_tile_estimate,
    shared_memory_estimate,
)

RESULTS = Path(__file__).parent / "results"
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
DTYPE_OF_SIZE = {2: "16-bit", 4: "fp32"}


# The kernels by the names kernels/tuning.py uses (the CSR kernels are not tuned).
DENSE_KERNEL_FUNCTIONS = {"forward": flash_attention._fwd_kernel,
                          "dkdv": flash_attention._bwd_dkdv_kernel,
                          "dq": flash_attention._bwd_dq_kernel}
CSR_KERNEL_FUNCTIONS = {"csr_forward": csr_attention._csr_fwd_kernel,
                        "csr_dq": csr_attention._csr_bwd_dq_kernel,
                        "csr_dkdv": csr_attention._csr_bwd_dkdv_kernel}
CSR_KERNELS = tuple(CSR_KERNEL_FUNCTIONS)
CSR_OPTIONS = dict(num_warps=4, num_stages=3)  # Triton's defaults: the CSR launchers pass none


@dataclass(frozen=True)
class Build:
    capability: tuple[int, int]
    dtype: str
    head_dim: int
    kernel: str
    config: TileConfig | None  # None: a CSR kernel, launched with Triton's default options
    causal: bool = False
    bias: bool = False  # an attn_bias tile read (and, backward, dBias written)
    bottom_right: bool = False  # causal, aligned bottom-right (a per-segment diagonal)
    group: int = 1  # grouped-query heads per kv head (the dK/dV kernel unrolls their loop)
    window: bool = False  # a sliding window's left bound (HAS_LEFT: its tile loops and masks)


@dataclass(frozen=True)
class Row:
    build: Build
    kept: bool
    shared_estimate: int | None
    register_estimate: float | None
    shared: int | None
    registers: int | None
    spill_bytes: int | None
    error: str | None

    @property
    def verdict(self) -> str:
        role = "kept" if self.kept else "dropped"
        if self.error is not None:
            return f"{role}, does not compile"
        fits = self.shared <= SHARED_MEMORY_LIMIT[self.build.capability]
        good = fits and self.spill_bytes == 0
        if self.kept:
            return f"{role}, fits" if good else (f"{role}, SPILLS" if fits else f"{role}, TOO BIG")
        return "dropped, would fit" if good else "dropped, rightly"


def measure(build: Build) -> Row:
    if build.config is None:
        return _measure_csr(build)
    dtype = DTYPES[build.dtype]
    constants = flash_attention.tile_constants(build.head_dim, build.head_dim, dtype,
                                               build.config, build.group)
    shape = (build.kernel, build.config, constants["BLOCK_D"], constants["BLOCK_DV"],
             dtype.itemsize, build.bias)
    kept = build.config in candidates(build.kernel, constants["BLOCK_D"], constants["BLOCK_DV"],
                                      dtype.itemsize, SHARED_MEMORY_LIMIT[build.capability],
                                      build.bias)
    estimates = dict(shared_estimate=shared_memory_estimate(*shape),
                     register_estimate=register_tile_estimate(*shape))
    return _compiled(build, kept, estimates, DENSE_KERNEL_FUNCTIONS[build.kernel],
                     dict(constants, CAUSAL=build.causal, BOTTOM_RIGHT=build.bottom_right,
                          HAS_BIAS=build.bias, HAS_LEFT=build.window),
                     build.config.num_warps,
                     build.config.num_stages)


def _measure_csr(build: Build) -> Row:
    constants = kernel_constants(build.head_dim, build.head_dim, BLOCK_N=csr_attention.BLOCK_N,
                                 HAS_BIAS=build.bias)
    return _compiled(build, True, dict(shared_estimate=None, register_estimate=None),
                     CSR_KERNEL_FUNCTIONS[build.kernel], constants, **CSR_OPTIONS)


def _compiled(build: Build, kept: bool, estimates: dict, kernel, constants: dict,
              num_warps: int, num_stages: int) -> Row:
    try:
        used = compile_for(kernel, build.dtype, constants, build.capability, num_warps,
                           num_stages)
    except Exception as error:  # a build that fails is a result too
        message = str(error).strip().splitlines()
        return Row(build, kept, **estimates, shared=None, registers=None, spill_bytes=None,
                   error=f"{type(error).__name__}: {message[0] if message else ''}"[:120])
    return Row(build, kept, **estimates, shared=used.shared_bytes, registers=used.registers,
               spill_bytes=used.spill_stores + used.spill_loads, error=None)


def all_builds(capabilities, dtypes, head_dims) -> list[Build]:
    """Every configuration of the dense kernels, without and with an attn_bias (whose tile
    keep() counts), and the CSR kernels."""
    dense = [Build(capability, dtype, head_dim, kernel, config, bias=bias)
             for capability in capabilities for dtype in dtypes for head_dim in head_dims
             for kernel in KERNELS for bias in (False, True) for config in CONFIGS]
    csr = csr_builds(capabilities, dtypes, head_dims)
    return dense + csr + [replace(build, bias=True) for build in csr]


def csr_builds(capabilities, dtypes, head_dims) -> list[Build]:
    return [Build(capability, dtype, head_dim, kernel, None)
            for capability in capabilities for dtype in dtypes for head_dim in head_dims
            for kernel in CSR_KERNELS]


def tightest_builds(capabilities, dtypes, head_dims) -> list[Build]:
    """Per (arch, dtype, head dim, kernel), the kept candidate with the largest shared-memory
    estimate (if it fits, the estimate bounds the rest): causal (top-left) and not without a
    bias; with an attn_bias not causal and causal bottom-right (every constexpr branch of the
    dense kernels, the alignment adding code, not tiles), the latter also with grouped-query
    heads (4 per kv head, the dK/dV kernel's group loop unrolled) and with a sliding window (its
    left-edge tile loops). And the CSR kernels, with and without a bias."""
    builds = []
    for capability in capabilities:
        for dtype in dtypes:
            for head_dim in head_dims:
                block_d = padded_dim(head_dim)
                size = DTYPES[dtype].itemsize
                for kernel in KERNELS:
                    for bias in (False, True):
                        kept = candidates(kernel, block_d, block_d, size,
                                          SHARED_MEMORY_LIMIT[capability], bias)
                        tightest = max(kept, key=lambda c, k=kernel, b=bias: (
                            shared_memory_estimate(k, c, block_d, block_d, size, b)))
                        variants = ((False, False), (True, False)) if not bias else (
                            (False, False), (True, True))
                        builds += [Build(capability, dtype, head_dim, kernel, tightest, causal,
                                         bias, bottom_right)
                                   for causal, bottom_right in variants]
                        if bias:
                            builds += [replace(builds[-1], group=4),
                                       replace(builds[-1], window=True)]
    csr = csr_builds(capabilities, dtypes, head_dims)
    return builds + csr + [replace(build, bias=True) for build in csr]


def table(rows: list[Row]) -> list[str]:
    lines = ["| arch | dtype | C | kernel | config | smem est. KiB | smem KiB | regs/thread | "
             "tile elems/thread est. | spill bytes | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        b = row.build
        measured = ([f"{row.shared / 1024:.0f}", f"{row.registers}", f"{row.spill_bytes}"]
                    if row.error is None else [row.error, "", ""])
        config = b.config or "warps=4 stages=3 (CSR: one config)"
        estimates = (["", ""] if row.shared_estimate is None else
                     [f"{row.shared_estimate / 1024:.0f}", f"{row.register_estimate:.0f}"])
        causal = " (causal, bottom-right)" if b.bottom_right else " (causal)" if b.causal else ""
        kernel = (b.kernel + causal + (" (bias)" if b.bias else "")
                  + (f" (group {b.group})" if b.group > 1 else "")
                  + (" (window)" if b.window else ""))
        lines.append(f"| sm_{b.capability[0]}{b.capability[1]} | {b.dtype} | {b.head_dim} | "
                     f"{kernel} | {config} | {estimates[0]} | {measured[0]} | "
                     f"{measured[1]} | {estimates[1]} | {measured[2]} | {row.verdict} |")
    return lines


def summary(rows: list[Row]) -> list[str]:
    counts: dict[str, int] = {}
    for row in rows:
        counts[row.verdict] = counts.get(row.verdict, 0) + 1
    lines = ["| verdict | builds |", "|---|---|"]
    lines += [f"| {verdict} | {count} |" for verdict, count in sorted(counts.items())]
    return lines


def report(rows: list[Row], elapsed: float, scope: str) -> str:
    header = [
        "# Triton kernels: resources per launch configuration",
        "",
        f"- date: {datetime.now():%Y-%m-%d %H:%M}; built in {elapsed:.0f} s on "
        f"{platform.machine()} without a GPU (Triton's ahead-of-time compiler, its ptxas)",
        f"- torch {torch.__version__}, triton {triton.__version__}",
        f"- builds: {scope}",
        "- shared-memory limits (opt-in, per block): "
        + ", ".join(f"sm_{a}{b}: {v / 1024:.0f} KiB" for (a, b), v in SHARED_MEMORY_LIMIT.items()),
        "- non-causal builds unless marked (causal adds masking code, not tiles); pointers and "
        "strides carry the 16-byte alignment hint of a real launch",
        "- smem est. and tile elems/thread est. are keep()'s estimates; keep() asks for "
        "smem est. <= limit and tile elems/thread est. <= "
        + ", ".join(f"{budget} ({DTYPE_OF_SIZE[size]})"
                    for size, budget in REGISTER_TILE_BUDGET.items()),
        "- where no configuration passes, the one with the fewest tile elements that fits in "
        "shared memory is kept (it spills, but runs)",
        "",
        "## Summary",
        "",
        *summary(rows),
        "",
        "## Every build",
        "",
        *table(rows),
        "",
    ]
    return "\n".join(header)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="sm_90, bf16, head dim 128 only")
    parser.add_argument("--tightest", action="store_true",
                        help="per kernel only the kept candidate with the most shared memory")
    parser.add_argument("--archs", type=int, nargs="+", default=[90, 80],
                        choices=[a * 10 + b for a, b in SHARED_MEMORY_LIMIT])
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16"], choices=list(DTYPES))
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--out", type=Path,
                        help="default: benchmarks/results/kernel-resources-<dtypes>.md")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--jobs", type=int, default=os.cpu_count())
    args = parser.parse_args()
    capabilities = [divmod(arch, 10) for arch in args.archs]
    if args.quick:
        builds = all_builds([(9, 0)], ["bfloat16"], [128])
    else:
        select = tightest_builds if args.tightest else all_builds
        builds = select(capabilities, args.dtypes, args.head_dims)
    start = datetime.now()
    with ProcessPoolExecutor(args.jobs) as pool:
        rows = list(tqdm(pool.map(measure, builds), total=len(builds), desc="compiling"))
    scope = ("--quick" if args.quick else
             f"sm_{', sm_'.join(map(str, args.archs))}; {', '.join(args.dtypes)}; head dims "
             f"{', '.join(map(str, args.head_dims))}"
             + ("; the tightest kept config per kernel" if args.tightest else "; every config"))
    text = report(rows, (datetime.now() - start).total_seconds(), scope)
    args.out = args.out or RESULTS / f"kernel-resources-{'-'.join(args.dtypes)}.md"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    if args.json:
        args.json.write_text(json.dumps([dict(asdict(row), verdict=row.verdict)
                                         for row in rows], indent=1))
    print("\n".join(summary(rows)))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
