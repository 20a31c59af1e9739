"""Launch configurations of the dense kernels: a small list, a ``keep()`` filter, a keyed tuner.

The launchers cannot use ``@triton.autotune``: a configuration's tile sizes fix the tile
schedule (the grid and its (segment, tile) lists), so each candidate must be launched through
its own schedule. :class:`Tuner` otherwise does what ``triton.autotune`` does: on the first
call with a new key it times every kept candidate with ``triton.testing.do_bench`` and keeps the
fastest; a candidate that does not fit after all (``OutOfResources``) is dropped.

``keep()`` drops configurations that cannot fit before any is compiled: shared memory (the
operand tiles Triton stages, ``num_stages`` deep for the streamed ones) against the device's
limit, and registers (the live fp32 tiles per thread) against what keeps ptxas from spilling.
Both estimates are checked against real sm_80 / sm_90 builds by
``benchmarks/kernel_resources.py`` and its test.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

KERNELS = ("forward", "dkdv", "dq")


@dataclass(frozen=True)
class TileConfig:
    """A tile shape and the launch options that go with it."""

    block_m: int  # query rows per tile
    block_n: int  # key rows per tile
    num_warps: int
    num_stages: int

    def __str__(self) -> str:
        return (f"BLOCK_M={self.block_m} BLOCK_N={self.block_n} warps={self.num_warps} "
                f"stages={self.num_stages}")


# Compile options of every launch. FMA fusion is stated, not defaulted: Triton 3.9 warns when
# it is unset (its default flips to off in 3.10), and the kernels were measured with it on.
COMPILE_OPTIONS = {"enable_fp_fusion": True}

# The interpreter runs one small tile: many tiles at test sizes exercise full, boundary and
# causal-diagonal tiles alike.
INTERPRETER_CONFIG = TileConfig(16, 16, num_warps=1, num_stages=1)

# Largest tiles first, so that with tuning off (GATATTN_AUTOTUNE=0) the first kept candidate,
# the largest that fits, is taken. The small tiles at the end serve head dims up to 256 in fp32
# on GPUs with less shared memory.
CONFIGS = tuple(
    TileConfig(block_m, block_n, num_warps, num_stages)
    for block_m, block_n in ((128, 128), (128, 64), (128, 32), (64, 64), (64, 32))
    for num_warps in (8, 4)
    for num_stages in (2, 3)
) + tuple(
    TileConfig(block, block, num_warps=4, num_stages=num_stages)
    for block in (32, 16)
    for num_stages in (2, 1)
)

# Live tile elements per thread above which ptxas spills, by input itemsize (calibrated on
# sm_90 builds at head dim 64, benchmarks/results/kernel-resources*.md). 16-bit inputs use
# tensor-core dots; fp32 inputs use exact fp32 ("ieee") dots, done by FMAs whose operands
# crowd the registers, so their tiles must be far smaller.
REGISTER_TILE_BUDGET = {2: 128, 4: 40}


def shared_memory_estimate(kernel: str, config: TileConfig, block_d: int, block_dv: int,
                           itemsize: int, has_bias: bool = False) -> int:
    """Bytes of operand tiles in shared memory: the resident tiles once, the streamed ones
    ``num_stages`` deep (software pipelining). An attn_bias adds a streamed (M, N) tile to
    every kernel (each reads one per pair of query and key tiles)."""
    m, n, stages = config.block_m, config.block_n, config.num_stages
    if kernel == "forward":  # Q resident; K, V streamed
        elements = m * block_d + stages * n * (block_d + block_dv)
    elif kernel == "dkdv":  # K, V resident; Q, dO streamed; P and dS transposed through smem
        elements = n * (block_d + block_dv) + stages * m * (block_d + block_dv) + 2 * m * n
    elif kernel == "dq":  # Q, dO resident; K, V streamed; dS through smem
        elements = m * (block_d + block_dv) + stages * n * (block_d + block_dv) + m * n
    else:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if has_bias:
        elements += stages * m * n
    return elements * itemsize


def register_tile_estimate(kernel: str, config: TileConfig, block_d: int, block_dv: int,
                           itemsize: int, has_bias: bool = False) -> float:
    """Live tile elements per thread, in fp32 registers (16-bit operands pack two to one); an
    attn_bias tile joins the logits tile (M x N)."""
    m, n = config.block_m, config.block_n
    packed = itemsize / 4
    if kernel == "forward":  # acc, S/P, Q
        elements = m * block_dv + m * n + packed * m * block_d
    elif kernel == "dkdv":  # dK, dV, K, V, P and dP
        elements = (1 + packed) * n * (block_d + block_dv) + 2 * m * n
    elif kernel == "dq":  # dQ, Q, dO, P and dP
        elements = m * block_d + packed * m * (block_d + block_dv) + 2 * m * n
    else:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if has_bias:
        elements += m * n * itemsize / 4
    return elements / (32 * config.num_warps)


def keep(kernel: str, config: TileConfig, block_d: int, block_dv: int, itemsize: int,
         shared_limit: int, has_bias: bool = False) -> bool:
    """Whether ``config`` can fit: its shared memory under the limit, its tiles in registers."""
    shape = (block_d, block_dv, itemsize, has_bias)
    return (shared_memory_estimate(kernel, config, *shape) <= shared_limit
            and register_tile_estimate(kernel, config, *shape) <= REGISTER_TILE_BUDGET[itemsize])


@functools.cache  # launchers ask on every call, before the tuner's cache
def candidates(kernel: str, block_d: int, block_dv: int, itemsize: int,
               shared_limit: int, has_bias: bool = False) -> tuple[TileConfig, ...]:
    """The kept configurations, in ``CONFIGS`` order. Where none passes the register estimate
    (wide fp32 heads), the leanest that fits in shared memory stays: spilling is slow, but it
    runs, and shared memory over the limit does not."""
    shape = (block_d, block_dv, itemsize, has_bias)
    fitting = [config for config in CONFIGS
               if shared_memory_estimate(kernel, config, *shape) <= shared_limit]
    kept = [config for config in fitting
            if keep(kernel, config, block_d, block_dv, itemsize, shared_limit, has_bias)]
    if kept or not fitting:
        return tuple(kept)
    return (min(fitting, key=lambda config: register_tile_estimate(kernel, config, *shape)),)


def length_bucket(total: int, num_segments: int) -> int:
    """The tuning key's length: the mean segment length, rounded up to a power of two (known
    on the host, so no device sync), from 16 to 16384."""
    mean = -(-total // max(num_segments, 1))
    return min(max(16, 1 << max(mean - 1, 0).bit_length()), 16384)


class Tuner:
    """Remembers the fastest configuration per key; times candidates on a key's first call."""

    def __init__(self, bench: Callable[[Callable[[], None]], float] | None = None):
        self._bench = bench or _do_bench
        self._best: dict[tuple, TileConfig] = {}

    @property
    def chosen(self) -> dict[tuple, TileConfig]:
        """The configuration chosen so far for each key."""
        return dict(self._best)

    def choose(self, key: tuple, configs: Sequence[TileConfig],
               launch: Callable[[TileConfig], None]) -> TileConfig:
        if key not in self._best:
            self._best[key] = self._fastest(configs, launch)
        return self._best[key]

    def _fastest(self, configs: Sequence[TileConfig],
                 launch: Callable[[TileConfig], None]) -> TileConfig:
        from triton.runtime.errors import OutOfResources

        if not configs:
            raise RuntimeError("no launch configuration fits this GPU (see kernels/tuning.py)")
        if len(configs) == 1 or os.environ.get("GATATTN_AUTOTUNE", "1") == "0":
            return configs[0]
        timings = {}
        for config in configs:
            try:
                timings[config] = self._bench(lambda config=config: launch(config))
            except OutOfResources:
                continue
        if not timings:
            raise RuntimeError(f"none of {len(configs)} launch configurations fits this GPU")
        return min(timings, key=timings.get)


def _do_bench(fn: Callable[[], None]) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=5, rep=20)


def shared_memory_limit(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).shared_memory_per_block_optin
