"""CPU benchmark of ``gatattn.GPSConv`` against PyG's ``GPSConv``: the GraphGPS rows of
docs/design.md's performance targets.

One case: a GraphGPS block (``GINConv`` local message passing, multi-head global attention,
batch norm, MLP) on 64 graphs of 100-500 nodes, 128 channels, 4 heads, float32, forward+backward
in training mode (dropout 0). Each graph is a ring with chords (4 in-edges per node). PyG's
``GPSConv`` pads the batch with ``to_dense_batch`` and runs ``nn.MultiheadAttention`` with a key
padding mask; ``gatattn.GPSConv`` attends within each graph without padding. Both hold the same
weights (``load_state_dict``), and the largest output difference is reported. A third row runs
our block with the attention's core (softmax of ``q k^T`` times ``v``) left out, its output
``v``: the floor of everything else the block computes (local conv, projections, norms, MLP),
which any attention route pays on top; its output differs by design.

How it measures: see ``harness.py`` (fresh process per measurement, interleaved reps, medians);
each rep backpropagates ``out.sum()`` into the input and every parameter, gradients cleared.

Usage::

    python benchmarks/bench_gps.py          # full run (a minute), writes results/gps-cpu.md
    python benchmarks/bench_gps.py --quick  # tiny sizes (seconds), prints only
"""

from __future__ import annotations

from pathlib import Path

import torch
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
from torch import Tensor, nn
from torch_geometric.nn import GINConv
from torch_geometric.nn import GPSConv as PyGGPSConv

import gatattn.gps
from gatattn.gps import GPSConv

CHANNELS, HEADS, CHORDS = 128, 4, (1, 7)  # each node also hears from nodes 1 and 7 ahead
RESULTS = Path(__file__).resolve().parent / "results" / "gps-cpu.md"


def graph_batch(num_graphs: int, low: int, high: int) -> tuple[Tensor, Tensor, Tensor]:
    """Node features (requiring grad), edges (rings with chords) and a sorted batch vector."""
    gen = torch.Generator().manual_seed(2)
    sizes = torch.randint(low, high + 1, (num_graphs,), generator=gen)
    batch = torch.arange(num_graphs).repeat_interleave(sizes)
    start = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]]).repeat_interleave(sizes)
    local = torch.arange(batch.numel()) - start
    size = sizes.repeat_interleave(sizes)
    edges = [torch.stack([start + (local + hop) % size, start + local])
             for step in CHORDS for hop in (step, -step)]
    x = torch.randn(batch.numel(), CHANNELS, generator=gen).requires_grad_()
    return x, torch.cat(edges, 1), batch


def gin() -> GINConv:
    return GINConv(nn.Sequential(nn.Linear(CHANNELS, CHANNELS), nn.ReLU(),
                                 nn.Linear(CHANNELS, CHANNELS)))


def seeded_pyg_gps() -> PyGGPSConv:
    torch.manual_seed(0)
    return PyGGPSConv(CHANNELS, gin(), heads=HEADS)


def pyg_gps(num_graphs: int, low: int, high: int) -> Step:
    layer = seeded_pyg_gps()
    x, edge_index, batch = graph_batch(num_graphs, low, high)
    return training(lambda: layer(x, edge_index, batch), [x, *layer.parameters()])


def ours(num_graphs: int, low: int, high: int) -> Step:
    layer = GPSConv(CHANNELS, gin(), heads=HEADS)
    layer.load_state_dict(seeded_pyg_gps().state_dict())
    x, edge_index, batch = graph_batch(num_graphs, low, high)
    return training(lambda: layer(x, edge_index, batch), [x, *layer.parameters()])


def ours_without_attention_core(num_graphs: int, low: int, high: int) -> Step:
    """:func:`ours` with the attention's core returning ``v`` during its own steps only."""
    step = ours(num_graphs, low, high)

    def floor_step() -> Tensor:
        attention = gatattn.gps.attention
        gatattn.gps.attention = _values
        try:
            return step()
        finally:
            gatattn.gps.attention = attention

    return floor_step


def _values(q: Tensor, k: Tensor, v: Tensor, **graph) -> Tensor:
    return v * 1.0  # a new tensor, as attention's output is


def gps_case(name: str, title: str, sizes: tuple[int, int, int], reps: int,
             target: float) -> Case:
    shapes = (f"{sizes[0]} graphs of {sizes[1]}-{sizes[2]} nodes, {2 * len(CHORDS)} in-edges "
              f"per node, F={CHANNELS}, H={HEADS}, C={CHANNELS // HEADS}")
    _, _, batch = graph_batch(*sizes)
    pairs = int(torch.bincount(batch).pow(2).sum())
    flops = attention_flops(pairs, HEADS, CHANNELS // HEADS, backward=True)
    return Case(name, title, reps, (
        Peer("gatattn.GPSConv", shapes, lambda: ours(*sizes), flops=flops),
        Peer("PyG GPSConv (to_dense_batch + nn.MultiheadAttention)", shapes,
             lambda: pyg_gps(*sizes), flops=flops),
        Peer("gatattn.GPSConv, attention core left out (the floor)", shapes,
             lambda: ours_without_attention_core(*sizes)),
    ), (Target(f"time vs PyG GPSConv <= {target}x", time_ratio, False, target, "x"),))


def all_cases(quick: bool) -> list[Case]:
    return [
        gps_case("1", "GraphGPS block, forward+backward",
                 (8, 100, 500) if quick else (64, 100, 500), 3 if quick else 10, 0.45),
        # ZINC's molecules average 23 atoms: the graph size most GraphGPS users train on.
        gps_case("2", "GraphGPS block on molecule-sized graphs, forward+backward",
                 (16, 20, 60) if quick else (128, 20, 60), 3 if quick else 20, 0.80),
    ]


if __name__ == "__main__":
    run_benchmark(all_cases, quick=command_line(__doc__.split("\n")[0]).quick,
                  title="GraphGPS block on CPU (docs/design.md, performance targets)",
                  results_path=RESULTS)
