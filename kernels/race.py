"""Timing candidates and keeping the fastest: what the route racer
(:mod:`gatattn.backends.racing`) and the tile tuner (:mod:`gatattn.kernels.tuning`) share.

Both key a race by sizes rounded up to powers of two, so that the first call of a key stands
for calls of similar size; both time each candidate with a :data:`Timer` (Triton's ``do_bench``
on a GPU, a fake in tests) and both skip timing when ``GATATTN_AUTOTUNE=0``. Triton is imported
only when something is timed: the router imports this module on machines without it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable, Mapping
from typing import TypeVar

AUTOTUNE_ENV = "GATATTN_AUTOTUNE"
WARMUP_MS = 5  # do_bench's warm-up budget: compiles, caches and clocks settle first
REP_MS = 20  # and its measuring budget, split into as many runs as fit

Candidate = TypeVar("Candidate", bound=Hashable)
# (candidate, what to run) -> milliseconds. The candidate lets a fake timer answer per name.
Timer = Callable[[Hashable, Callable[[], object]], float]


def autotune_enabled() -> bool:
    """Whether races are timed: ``GATATTN_AUTOTUNE`` is ``1`` (the default) or ``0`` (take the
    first candidate that qualifies, untimed)."""
    value = os.environ.get(AUTOTUNE_ENV) or "1"
    if value not in ("0", "1"):
        raise ValueError(f"{AUTOTUNE_ENV} must be 1 (time the candidates, the default) or 0 "
                         f"(take the first that qualifies, untimed), got {value!r}")
    return value == "1"


def do_bench_ms(candidate: Hashable, run: Callable[[], object]) -> float:
    """The GPU timer: ``triton.testing.do_bench``'s mean over the runs that fit in ``REP_MS``,
    after ``WARMUP_MS`` of warm-up, each run after an L2 flush."""
    import triton.testing

    return float(triton.testing.do_bench(run, warmup=WARMUP_MS, rep=REP_MS))


def fastest(runs: Mapping[Candidate, Callable[[], object]], timer: Timer = do_bench_ms, *,
         skip: tuple[type[BaseException], ...] = ()
         ) -> tuple[Candidate | None, dict[Candidate, float]]:
    """``(fastest, milliseconds of each)`` over ``runs``, timed in order. A run that raises one
    of ``skip`` (a launch that does not fit the GPU) drops out; ``fastest`` is ``None`` when
    none is left."""
    timings = {}
    for candidate, run in runs.items():
        try:
            timings[candidate] = timer(candidate, run)
        except skip:
            continue
    return (min(timings, key=timings.get) if timings else None), timings


def power_of_two_bucket(n: int, low: int = 1, high: int | None = None) -> int:
    """``n`` rounded up to a power of two, then clamped to ``[low, high]``."""
    bucket = max(low, 1 << max(n - 1, 0).bit_length())
    return bucket if high is None else min(bucket, high)


def length_bucket(total: int, num_segments: int) -> int:
    """The mean segment length, bucketed from 16 to 16384 (known on the host: no device
    sync)."""
    return power_of_two_bucket(-(-total // max(num_segments, 1)), 16, 16384)
