"""What each launch configuration of the dense kernels needs on sm_80 and sm_90, from real
builds made here without a GPU, and whether ``keep()`` in kernels/tuning.py judged it rightly.

Every configuration of ``CONFIGS`` (kept or not) is compiled for each architecture, dtype, head
dim and kernel; the table gives Triton's shared memory, ptxas's registers and spills, and the
verdict: a kept configuration must fit the architecture's shared memory and should not spill; a
dropped one that would have fitted without spilling is a candidate the filter lost.

    python benchmarks/kernel_resources.py          # sm_90, sm_80; bf16, fp32; C = 64, 128, 256
    python benchmarks/kernel_resources.py --quick  # sm_90, bf16, C = 128

It writes benchmarks/results/kernel-resources.md (or ``--out``). This measures resources, not
speed: timings need a GPU (benchmarks/bench_gpu.py).
"""

from __future__ import annotations

import argparse
import os
import platform
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compiling needs the real @triton.jit functions
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated

import torch  # noqa: E402
import triton  # noqa: E402
from gatattn.kernels.flash_attention import KERNEL_FUNCTIONS, kernel_constants  # noqa: E402
from gatattn.kernels.resources import SHARED_MEMORY_LIMIT, compile_for  # noqa: E402
from gatattn.kernels.tuning import (  # noqa: E402
    CONFIGS,
    KERNELS,
    TileConfig,
    keep,
    register_tile_estimate,
    shared_memory_estimate,
)
from tqdm import tqdm  # noqa: E402

RESULTS = Path(__file__).parent / "results"
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class Build:
    capability: tuple[int, int]
    dtype: str
    head_dim: int
    kernel: str
    config: TileConfig


@dataclass(frozen=True)
class Row:
    build: Build
    kept: bool
    shared_estimate: int
    register_estimate: float
    shared: int | None
    registers: int | None
    spill_bytes: int | None
    error: str | None

    @property
    def verdict(self) -> str:
        if self.error is not None:
            return "kept, does not compile" if self.kept else "dropped, does not compile"
        fits = self.shared <= SHARED_MEMORY_LIMIT[self.build.capability]
        good = fits and self.spill_bytes == 0
        if self.kept:
            return "kept, fits" if good else ("kept, SPILLS" if fits else "kept, TOO BIG")
        return "dropped, would fit" if good else "dropped, rightly"


def measure(build: Build) -> Row:
    dtype = DTYPES[build.dtype]
    constants = kernel_constants(build.head_dim, build.head_dim, dtype, build.config)
    shape = (build.kernel, build.config, constants["BLOCK_D"], constants["BLOCK_DV"],
             dtype.itemsize)
    kept = keep(*shape, SHARED_MEMORY_LIMIT[build.capability])
    estimates = dict(shared_estimate=shared_memory_estimate(*shape),
                     register_estimate=register_tile_estimate(*shape))
    try:
        used = compile_for(KERNEL_FUNCTIONS[build.kernel], build.dtype,
                           dict(constants, CAUSAL=False), build.capability,
                           build.config.num_warps, build.config.num_stages)
    except Exception as error:  # a build that fails is a result too
        message = str(error).strip().splitlines()
        return Row(build, kept, **estimates, shared=None, registers=None, spill_bytes=None,
                   error=f"{type(error).__name__}: {message[0] if message else ''}"[:120])
    return Row(build, kept, **estimates, shared=used.shared_bytes, registers=used.registers,
               spill_bytes=used.spill_stores + used.spill_loads, error=None)


def all_builds(capabilities, dtypes, head_dims) -> list[Build]:
    return [Build(capability, dtype, head_dim, kernel, config)
            for capability in capabilities for dtype in dtypes for head_dim in head_dims
            for kernel in KERNELS for config in CONFIGS]


def table(rows: list[Row]) -> list[str]:
    lines = ["| arch | dtype | C | kernel | config | smem est. KiB | smem KiB | regs/thread | "
             "tile elems/thread est. | spill bytes | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        b = row.build
        measured = ([f"{row.shared / 1024:.0f}", f"{row.registers}", f"{row.spill_bytes}"]
                    if row.error is None else [row.error, "", ""])
        lines.append(f"| sm_{b.capability[0]}{b.capability[1]} | {b.dtype} | {b.head_dim} | "
                     f"{b.kernel} | {b.config} | {row.shared_estimate / 1024:.0f} | "
                     f"{measured[0]} | {measured[1]} | {row.register_estimate:.0f} | "
                     f"{measured[2]} | {row.verdict} |")
    return lines


def summary(rows: list[Row]) -> list[str]:
    counts: dict[str, int] = {}
    for row in rows:
        counts[row.verdict] = counts.get(row.verdict, 0) + 1
    lines = ["| verdict | builds |", "|---|---|"]
    lines += [f"| {verdict} | {count} |" for verdict, count in sorted(counts.items())]
    return lines


def report(rows: list[Row], elapsed: float) -> str:
    header = [
        "# Dense kernels: resources per launch configuration",
        "",
        f"- date: {datetime.now():%Y-%m-%d %H:%M}; built in {elapsed:.0f} s on "
        f"{platform.machine()} without a GPU (Triton's ahead-of-time compiler, its ptxas)",
        f"- torch {torch.__version__}, triton {triton.__version__}",
        "- shared-memory limits (opt-in, per block): "
        + ", ".join(f"sm_{a}{b}: {v / 1024:.0f} KiB" for (a, b), v in SHARED_MEMORY_LIMIT.items()),
        "- non-causal builds (causal adds masking code, not tiles); pointers and strides carry "
        "the 16-byte alignment hint of a real launch",
        "- smem est. and tile elems/thread est. are keep()'s estimates; keep() asks for "
        "est. <= limit and <= 128 tile elements per thread",
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
    parser.add_argument("--out", type=Path, default=RESULTS / "kernel-resources.md")
    parser.add_argument("--jobs", type=int, default=os.cpu_count())
    args = parser.parse_args()
    builds = (all_builds([(9, 0)], ["bfloat16"], [128]) if args.quick else
              all_builds([(9, 0), (8, 0)], ["bfloat16", "float32"], [64, 128, 256]))
    start = datetime.now()
    with ProcessPoolExecutor(args.jobs) as pool:
        rows = list(tqdm(pool.map(measure, builds), total=len(builds), desc="compiling"))
    text = report(rows, (datetime.now() - start).total_seconds())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print("\n".join(summary(rows)))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
