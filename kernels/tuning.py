"""Launch configurations of the dense kernels: a small list, a ``keep()`` filter, a keyed tuner.

:class:`Tuner` times every kept candidate on the first call of a key and keeps the fastest; a
candidate that does not fit after all (``OutOfResources``) drops out. The GPU's figures (compute
capability, shared memory) come from its ``limits`` argument, so tests run the GPU path in the
interpreter with a GPU's figures and a fake timer.

``keep()`` drops configurations that cannot fit before any is compiled: shared memory (the
operand tiles Triton stages, ``num_stages`` deep for the streamed ones) against the device's
limit, and registers (the live fp32 tiles per thread) against what keeps ptxas from spilling.
Both estimates are checked against real sm_80 / sm_90 builds by
``benchmarks/kernel_resources.py`` and its test.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import torch

from gatattn.kernels.common import padded_dim
from gatattn.kernels.race import (
    Timer,
    autotune_enabled,
    do_bench_ms,
    fastest,
    length_bucket,
    power_of_two_bucket,
)

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


@dataclass(frozen=True)
class DeviceLimits:
    """The figures of a GPU that decide which configurations it can run."""

    capability: tuple[int, int]
    shared_memory: int  # bytes per block, opt-in


@functools.cache  # asked on every launch
def gpu_limits(device: torch.device) -> DeviceLimits | None:
    """A CUDA device's figures; ``None`` elsewhere: Triton's interpreter, which runs
    ``INTERPRETER_CONFIG``."""
    if device.type != "cuda":
        return None
    properties = torch.cuda.get_device_properties(device)
    return DeviceLimits((properties.major, properties.minor),
                        properties.shared_memory_per_block_optin)


def window_bucket(window: tuple[int | None, int | None] | None):
    """A window's sides rounded up to powers of two from 16 (tiles are at least 16 rows)."""
    if window is None:
        return None
    return tuple(None if side is None else power_of_two_bucket(side, 16, 16384)
                 for side in window)


@dataclass(frozen=True)
class TuningKey:
    """What the fastest configuration of a launch depends on. A bias tile takes shared memory
    and registers (other candidates); the bottom-right alignment adds no tile but is another
    build with other work per tile; the group size (H / H_kv) sets the dK/dV grid and its
    work per program; a sliding window is another build whose band width (bucketed) sets the
    tiles each program visits."""

    kernel: str
    lengths: tuple[int, int]  # mean query and key rows per segment, bucketed
    head_dims: tuple[int, int]
    dtype: torch.dtype
    causal: bool
    bottom_right: bool  # only where causal: the flag means nothing otherwise
    bias: bool
    group: int
    capability: tuple[int, int]
    window: tuple[int | None, int | None] | None = None  # bucketed sides; None: no window


    def __str__(self) -> str:
        causal = "bottom_right" if self.bottom_right else self.causal
        return (f"{self.kernel}, lengths ~{self.lengths[0]}/~{self.lengths[1]}, "
                f"C={self.head_dims[0]}/{self.head_dims[1]}, "
                f"{str(self.dtype).removeprefix('torch.')}, causal={causal}, bias={self.bias}, "
                f"group={self.group}, sm_{self.capability[0]}{self.capability[1]}"
                + ("" if self.window is None else f", window={self.window}"))


# triton.autotune with prune_configs_by does not fit: a configuration's tile sizes fix the tile
# schedule (the grid and its (segment, tile) tensors, kernel arguments) and the key is bucketed
# mean lengths, which no kernel argument holds; autotune would need a pre_hook rebuilding the
# schedule on every launch (which also turns its disk cache off) and arguments kept for the key.
class Tuner:
    """Remembers the fastest configuration per key; times candidates on a key's first call.
    ``limits(device)`` gives a device's figures, ``None`` where ``interpreter_config`` serves
    untimed; ``bench`` times one candidate's launch."""

    def __init__(self, bench: Timer = do_bench_ms,
                 limits: Callable[[torch.device], DeviceLimits | None] = gpu_limits,
                 interpreter_config: TileConfig = INTERPRETER_CONFIG):
        self._bench = bench
        self._limits = limits
        self._interpreter_config = interpreter_config
        self._best: dict[Hashable, TileConfig] = {}

    @property
    def chosen(self) -> dict[Hashable, TileConfig]:
        """The configuration chosen so far for each key."""
        return dict(self._best)

    def for_launch(self, kernel: str, q, k, v, cu_seqlens_q, *, causal: bool,
                   bottom_right: bool, has_bias: bool,
                   launch: Callable[[TileConfig], None],
                   window: tuple[int | None, int | None] | None = None) -> TileConfig:
        """The configuration of a dense-kernel launch on packed ``(total, H, C)`` inputs: the
        interpreter's one, or the fastest kept candidate for this key on a GPU. ``window``:
        the launch's ``(left, right)`` sides where it has a sliding window."""
        limits = self._limits(q.device)
        if limits is None:
            return self._interpreter_config
        segments = cu_seqlens_q.numel() - 1
        key = TuningKey(kernel, (length_bucket(q.shape[0], segments),
                                 length_bucket(k.shape[0], segments)),
                        (q.shape[2], v.shape[2]), q.dtype, causal, causal and bottom_right,
                        has_bias, q.shape[1] // max(k.shape[1], 1), limits.capability,
                        window_bucket(window))
        configs = candidates(kernel, padded_dim(q.shape[2]), padded_dim(v.shape[2]),
                             q.element_size(), limits.shared_memory, has_bias)
        return self.choose(key, configs, launch)

    def choose(self, key: Hashable, configs: Sequence[TileConfig],
               launch: Callable[[TileConfig], None]) -> TileConfig:
        """The configuration remembered for ``key``, or the fastest of ``configs``."""
        if key not in self._best:
            self._best[key] = self._fastest(configs, launch)
        return self._best[key]

    def _fastest(self, configs: Sequence[TileConfig],
                 launch: Callable[[TileConfig], None]) -> TileConfig:
        from triton.runtime.errors import OutOfResources

        if not configs:
            raise RuntimeError("no launch configuration fits this GPU (see kernels/tuning.py)")
        if len(configs) == 1 or not autotune_enabled():
            return configs[0]
        runs = {config: functools.partial(launch, config) for config in configs}
        best, _ = fastest(runs, self._bench, skip=(OutOfResources,))
        if best is None:
            raise RuntimeError(f"none of {len(configs)} launch configurations fits this GPU")
        return best
