"""The benchmarks' host timer (benchmarks/harness.py): torch.utils.benchmark's
blocked_autorange, with the leaves' gradients cleared before every step."""

import importlib.util
import sys
import time
from pathlib import Path

import torch

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "harness.py"
_SPEC = importlib.util.spec_from_file_location("benchmark_harness", _PATH)
harness = sys.modules["benchmark_harness"] = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(harness)  # registered first: its dataclasses look their module up


def test_host_timer_clears_gradients_and_times_in_milliseconds():
    leaf = torch.ones(3, requires_grad=True)
    calls, threads_seen = [], []

    def step():
        assert leaf.grad is None  # cleared before every step, warm-up included
        calls.append(1)
        threads_seen.append(torch.get_num_threads())
        (leaf * 2).sum().backward()
        time.sleep(0.005)
        return leaf

    threads = torch.get_num_threads()
    timer = harness.host_timer(0.02)
    ms = timer.median_ms(step, [leaf])
    assert 5.0 <= ms < 1000.0  # each step sleeps 5 ms: milliseconds, not seconds
    assert len(calls) >= 3  # warm-up, then blocks until 20 ms have been timed
    assert set(threads_seen) == {threads} and torch.get_num_threads() == threads
    assert "blocked_autorange" in timer.note
