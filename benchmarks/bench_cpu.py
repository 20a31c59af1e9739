"""CPU benchmarks of ``SelfAttentionConv`` against its peers: the first CPU rows of
docs/design.md's performance targets.

Every case uses 128 input features, 4 heads of 32 channels, float32:

1. one complete graph, N=2048, forward: against ``TransformerConv`` on all N^2 explicit edges
   (self loops included).
2. one complete graph, N=32768, forward: our peak memory; ``TransformerConv`` at N=4096 is run
   under an address-space cap to see whether it runs out of memory.
3. one complete graph, N=4096, forward: against ``F.scaled_dot_product_attention`` with the same
   three projections.
4. 1024 graphs of 10-40 nodes, forward+backward: against GPSConv-style padding
   (``to_dense_batch`` + ``nn.MultiheadAttention`` with a key padding mask).
5. 64 graphs of 100-1000 nodes, forward+backward: the same peer.

The peers compute the same function as our layer: their weights come from one seeded module
(through ``SelfAttentionConv.from_transformer_conv`` / ``from_multihead_attention``), and the
largest output difference to our layer is reported. In cases 4 and 5 our layer therefore has
``out_proj=True``, as ``nn.MultiheadAttention`` has an output projection.

How it measures: see ``harness.py`` (fresh process per measurement, interleaved reps, medians).
Forward-only cases run in eval mode under ``torch.no_grad()``; forward+backward cases
backpropagate ``out.sum()`` into the input and every parameter, gradients cleared each rep.

Usage::

    python benchmarks/bench_cpu.py           # full run (minutes), writes benchmarks/results/cpu.md
    python benchmarks/bench_cpu.py --quick   # tiny sizes (seconds), prints only
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from harness import (
    Case,
    GiB,
    Peer,
    Step,
    Target,
    attention_flops,
    command_line,
    inference,
    memory_ratio,
    run_benchmark,
    speedup,
    time_ratio,
    training,
)
from torch import Tensor, nn
from torch_geometric.nn import TransformerConv
from torch_geometric.utils import to_dense_batch

from gatattn import SelfAttentionConv

FEATURES, HEADS, CHANNELS = 128, 4, 32
RESULTS = Path(__file__).resolve().parent / "results" / "cpu.md"


# --- workloads: each builder returns a step that runs the op once and returns its output ---


def node_features(num_nodes: int, requires_grad: bool = False) -> Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(num_nodes, FEATURES, generator=gen).requires_grad_(requires_grad)


def complete_edge_index(num_nodes: int) -> Tensor:
    nodes = torch.arange(num_nodes)
    return torch.stack([nodes.repeat(num_nodes), nodes.repeat_interleave(num_nodes)])


def seeded_transformer_conv() -> TransformerConv:
    torch.manual_seed(0)
    return TransformerConv(FEATURES, CHANNELS, heads=HEADS, root_weight=False)


def ours_complete(num_nodes: int) -> Step:
    layer = SelfAttentionConv.from_transformer_conv(seeded_transformer_conv()).eval()
    x = node_features(num_nodes)
    return inference(lambda: layer(x))


def transformer_conv_complete(num_nodes: int) -> Step:
    conv = seeded_transformer_conv().eval()
    x, edge_index = node_features(num_nodes), complete_edge_index(num_nodes)
    return inference(lambda: conv(x, edge_index))


def seeded_projections() -> list[nn.Linear]:
    torch.manual_seed(0)
    return [nn.Linear(FEATURES, HEADS * CHANNELS) for _ in range(3)]


def ours_with_projections(num_nodes: int) -> Step:
    layer = SelfAttentionConv(FEATURES, CHANNELS, heads=HEADS, root_weight=False).eval()
    for lin, source in zip((layer.lin_query, layer.lin_key, layer.lin_value),
                           seeded_projections(), strict=True):
        lin.load_state_dict(source.state_dict())
    x = node_features(num_nodes)
    return inference(lambda: layer(x))


def raw_sdpa(num_nodes: int) -> Step:
    projections = seeded_projections()
    x = node_features(num_nodes)

    def forward():
        q, k, v = (lin(x).view(1, num_nodes, HEADS, CHANNELS).transpose(1, 2)
                   for lin in projections)  # (1, H, N, C)
        out = F.scaled_dot_product_attention(q, k, v)
        return out.transpose(1, 2).reshape(num_nodes, HEADS * CHANNELS)

    return inference(forward)


def graph_batch(num_graphs: int, low: int, high: int) -> tuple[Tensor, Tensor]:
    """Node features (requiring grad) and a sorted batch vector of graphs of random sizes."""
    gen = torch.Generator().manual_seed(2)
    sizes = torch.randint(low, high + 1, (num_graphs,), generator=gen)
    batch = torch.arange(num_graphs).repeat_interleave(sizes)
    return node_features(batch.numel(), requires_grad=True), batch


def graph_pairs(num_graphs: int, low: int, high: int) -> int:
    """The (target, source) pairs of :func:`graph_batch`'s complete graphs."""
    _, batch = graph_batch(num_graphs, low, high)
    return int(torch.bincount(batch).pow(2).sum())


def seeded_mha() -> nn.MultiheadAttention:
    torch.manual_seed(0)
    return nn.MultiheadAttention(FEATURES, HEADS, batch_first=True)


def ours_batched(num_graphs: int, low: int, high: int) -> Step:
    layer = SelfAttentionConv.from_multihead_attention(seeded_mha())
    x, batch = graph_batch(num_graphs, low, high)
    return training(lambda: layer(x, batch=batch), [x, *layer.parameters()])


def padded_mha(num_graphs: int, low: int, high: int) -> Step:
    mha = seeded_mha()
    x, batch = graph_batch(num_graphs, low, high)

    def forward():
        h, mask = to_dense_batch(x, batch)  # (B, L_max, F), zero-padded
        h = mha(h, h, h, key_padding_mask=~mask, need_weights=False)[0]
        return h[mask]

    return training(forward, [x, *mha.parameters()])


def complete_shapes(num_nodes: int) -> str:
    return f"N={num_nodes}, F={FEATURES}, H={HEADS}, C={CHANNELS}"


def batch_shapes(num_graphs: int, low: int, high: int) -> str:
    return f"{num_graphs} graphs of {low}-{high} nodes, F={FEATURES}, H={HEADS}, C={CHANNELS}"


def complete_cases(quick: bool) -> list[Case]:
    n1, n2, n2_peer, n3 = (256, 2048, 512, 512) if quick else (2048, 32768, 4096, 4096)
    # In quick mode the cap is tiny so that the out-of-memory path is exercised too.
    cap = 64 * 2**20 if quick else 16 * GiB
    ours = "SelfAttentionConv"
    return [
        Case("1", "complete graph, forward", 2 if quick else 3, (
            Peer(ours, complete_shapes(n1), lambda: ours_complete(n1)),
            Peer("TransformerConv, N^2 edges", complete_shapes(n1) + f", E={n1 * n1}",
                 lambda: transformer_conv_complete(n1)),
        ), (Target("speed-up over TransformerConv >= 30x", speedup, True, 30, "x"),)),
        Case("2", "complete graph, forward, memory", 1, (
            Peer(ours, complete_shapes(n2), lambda: ours_complete(n2)),
            Peer("TransformerConv, N^2 edges", complete_shapes(n2_peer) + f", E={n2_peer**2}",
                 lambda: transformer_conv_complete(n2_peer), timed=False, cap_bytes=cap),
        ), (Target("our peak RSS <= 1500 MB", lambda r: r.memory_mb(0, "peak_mb"), False, 1500,
                   " MB"),)),
        Case("3", "complete graph, forward", 3 if quick else 10, (
            Peer(ours, complete_shapes(n3), lambda: ours_with_projections(n3)),
            Peer("F.scaled_dot_product_attention + projections", complete_shapes(n3),
                 lambda: raw_sdpa(n3)),
        ), (Target("time vs SDPA <= 1.15x", time_ratio, False, 1.15, "x"),)),
    ]


def batched_cases(quick: bool) -> list[Case]:
    small = (64, 10, 40) if quick else (1024, 10, 40)
    large = (8, 100, 1000) if quick else (64, 100, 1000)

    def peers(sizes):
        flops = attention_flops(graph_pairs(*sizes), HEADS, CHANNELS, backward=True)
        return (Peer("SelfAttentionConv(out_proj=True), batch=", batch_shapes(*sizes),
                     lambda: ours_batched(*sizes), flops=flops),
                Peer("to_dense_batch + nn.MultiheadAttention", batch_shapes(*sizes),
                     lambda: padded_mha(*sizes), flops=flops))

    return [
        Case("4", "batched small graphs, forward+backward", 3 if quick else 10,
             peers(small),
             (Target("time vs padded MHA <= 0.30x", time_ratio, False, 0.3, "x"),
              Target("memory increase vs padded MHA <= 0.7x", memory_ratio, False, 0.7, "x"))),
        Case("5", "batched large graphs, forward+backward", 2 if quick else 5,
             peers(large), (Target("time vs padded MHA <= 0.30x", time_ratio, False, 0.3,
                                   "x"),)),
    ]


def all_cases(quick: bool) -> list[Case]:
    return complete_cases(quick) + batched_cases(quick)


if __name__ == "__main__":
    run_benchmark(all_cases, quick=command_line(__doc__.split("\n")[0]).quick,
                  title="CPU benchmarks (docs/design.md, performance targets, CPU rows)",
                  results_path=RESULTS)
