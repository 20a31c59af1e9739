"""CPU benchmark of sliding-window attention: does a window cost its band, not the whole graph?

Two cases, forward+backward of ``gatattn.attention`` (H=4, C=32, float32):

1. one sequence of 4,096 nodes, causal, window (128, 0): 1.6% of the causal graph's pairs;
2. 32 sequences of 512 nodes, window (32, 32): 12% of the complete graphs' pairs.

Peers: ``gatattn.attention(..., window=...)`` with ``backend="auto"`` (SDPA in chunks of rows,
each against the keys its rows can see) and ``backend="sparse"`` (message passing over the band's
edges); ``F.scaled_dot_product_attention`` with the band as a dense boolean mask (what a user
without windows writes: every pair computed, then masked); and the same graphs without the
window through ``gatattn.attention`` (what the window saves). All peers compute the same function
on the same inputs (the largest output difference to ours is reported).

How it measures: see ``harness.py`` (fresh process per measurement, interleaved reps, medians).

Usage::

    python benchmarks/bench_window.py          # full run, writes results/window-cpu.md
    python benchmarks/bench_window.py --quick  # tiny sizes (seconds), prints only
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from harness import (
    Case,
    Peer,
    Step,
    Target,
    attention_flops,
    command_line,
    run_benchmark,
    time_ratio,
    training,
)

import gatattn
from gatattn import reference

HEADS, CHANNELS = 4, 32
RESULTS = Path(__file__).resolve().parent / "results" / "window-cpu.md"


def inputs(num_sequences: int, length: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    return tuple(torch.randn(num_sequences * length, HEADS, CHANNELS, generator=gen)
                 .requires_grad_() for _ in range(3))


def ours(num_sequences: int, length: int, causal: bool, window, backend: str = "auto") -> Step:
    q, k, v = inputs(num_sequences, length)
    graph = gatattn.build_graph(ptr=torch.arange(0, num_sequences * length + 1, length),
                                causal=causal, window=window)
    return training(lambda: gatattn.attention(q, k, v, graph=graph, backend=backend), [q, k, v])


def masked_sdpa(num_sequences: int, length: int, causal: bool, window) -> Step:
    q, k, v = inputs(num_sequences, length)
    band = reference.block_mask([length], causal=causal, window=window)  # (L, L)

    def forward():
        q_, k_, v_ = (t.view(num_sequences, length, HEADS, CHANNELS).transpose(1, 2)
                      for t in (q, k, v))
        out = F.scaled_dot_product_attention(q_, k_, v_, attn_mask=band)
        return out.transpose(1, 2).reshape(-1, HEADS, CHANNELS)

    return training(forward, [q, k, v])


def window_case(name: str, num_sequences: int, length: int, causal: bool, window, reps: int,
                target: float) -> Case:
    kept = int(reference.block_mask([length], causal=causal, window=window).sum())
    total = int(reference.block_mask([length], causal=causal).sum())
    shapes = (f"{num_sequences} x {length} nodes, causal={causal}, window={window}: "
              f"{kept * num_sequences:,} pairs ({kept / total:.1%} of the graph's)")
    flops = attention_flops(kept * num_sequences, HEADS, CHANNELS, backward=True)
    args = (num_sequences, length, causal, window)
    return Case(name, f"sliding window, {shapes}, forward+backward", reps, (
        Peer("gatattn.attention(window=), auto", shapes, lambda: ours(*args), flops=flops),
        Peer("SDPA with the band as a dense mask", shapes, lambda: masked_sdpa(*args),
             flops=flops),
        Peer("gatattn.attention(window=), backend='sparse'", shapes,
             lambda: ours(*args, backend="sparse"), flops=flops),
        Peer("gatattn.attention without the window (more pairs)", shapes,
             lambda: ours(num_sequences, length, causal, None), flops=None),
    ), (Target(f"time vs SDPA with a band mask <= {target}x", time_ratio, False, target,
               "x"),))


def all_cases(quick: bool) -> list[Case]:
    return [
        window_case("1", 1, 512 if quick else 4096, True, (128, 0), 2 if quick else 5, 0.25),
        window_case("2", 4 if quick else 32, 512, False, (32, 32), 2 if quick else 5, 0.5),
    ]


if __name__ == "__main__":
    run_benchmark(all_cases, quick=command_line(__doc__.split("\n")[0]).quick,
                  title="Sliding-window attention on CPU", results_path=RESULTS)
