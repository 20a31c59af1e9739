"""The benchmarks' attention rates (benchmarks/harness.py): FLOPs counted over the pairs the
graphs contain, shown next to a large bmm's rate measured in the same process."""

import importlib.util
import sys
from pathlib import Path

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "harness.py"
_SPEC = importlib.util.spec_from_file_location("benchmark_harness_rates", _PATH)
harness = sys.modules["benchmark_harness_rates"] = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(harness)  # registered first: its dataclasses look their module up


def test_attention_flops_count_pairs_heads_channels_and_the_backward():
    # One pair, one head, one channel: a multiply-add for the logit and one for the value.
    assert harness.attention_flops(1, 1, 1, backward=False) == 4
    assert harness.attention_flops(10, 4, 32, backward=False) == 4 * 10 * 4 * 32
    assert harness.attention_flops(10, 4, 32, backward=True) == 3.5 * 4 * 10 * 4 * 32


def test_rate_column_reads_the_median_step_against_the_bmm():
    peer = harness.Peer("ours", "-", lambda: None, flops=2e9)
    # 2 GFLOP in 100 ms: 20 GFLOP/s, a quarter of an 80 GFLOP/s bmm.
    assert harness.fmt_rate(peer, {"median_ms": 100.0}, 80.0) == "20.0 (25% of 80)"
    assert harness.fmt_rate(harness.Peer("peer", "-", lambda: None), {"median_ms": 1.0},
                            80.0) == "-"
    assert harness.fmt_rate(peer, None, 80.0) == "-"


def test_matmul_rate_is_measured():
    rate = harness.matmul_gflops(reps=1)
    assert 0.1 < rate < 1e6  # GFLOP/s of any CPU this runs on; NaN fails too
