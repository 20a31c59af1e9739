"""Quickstart: self-attention is graph attention on a complete graph.

One layer, three ways to call it, each checked against the module it replaces:
  1. a complete graph, against PyG's TransformerConv on the explicit complete edge set;
  2. a batch of sequences, against nn.MultiheadAttention (causal);
  3. a PyG batch of graphs (GPS-style global attention), against a loop over the graphs.

Run: python examples/quickstart.py [--smoke] [--threads N]
"""

from __future__ import annotations

import argparse
import time

import _smoke  # noqa: E402  (examples/_smoke.py, beside this script)
import _threads  # noqa: E402  (examples/_threads.py)
import torch
from torch import nn
from torch_geometric.nn import TransformerConv

import gatattn
from gatattn import SelfAttentionConv


def timed(fn, reps: int = 3):
    """Output and median wall time over ``reps`` runs after one warm-up run."""
    times = []
    with torch.no_grad():
        out = fn()
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return out, sorted(times)[reps // 2]


def complete_graph(n: int, features: int, heads: int) -> list[str]:
    peer = TransformerConv(features, features // heads, heads=heads, root_weight=False).eval()
    layer = SelfAttentionConv.from_transformer_conv(peer).eval()
    x = torch.randn(n, features)
    edge_index = gatattn.mask_to_edge_index(torch.ones(n, n, dtype=torch.bool))
    expected, t_peer = timed(lambda: peer(x, edge_index), reps=1)
    out, t_ours = timed(lambda: layer(x))  # no edge_index: the complete graph, never built
    return [f"complete graph, {n} nodes ({n * n:,} edges)",
            f"TransformerConv on explicit edges {t_peer * 1e3:8.1f} ms",
            f"SelfAttentionConv, implicit graph {t_ours * 1e3:8.1f} ms "
            f"({t_peer / t_ours:.0f}x faster), max |diff| {(out - expected).abs().max():.1e}"]


def causal_sequences(batch: int, length: int, features: int, heads: int) -> list[str]:
    mha = nn.MultiheadAttention(features, heads, batch_first=True).eval()
    layer = SelfAttentionConv.from_multihead_attention(mha).eval()
    x = torch.randn(batch, length, features)
    future = torch.ones(length, length, dtype=torch.bool).triu(1)
    expected, t_peer = timed(lambda: mha(x, x, x, attn_mask=future, need_weights=False)[0])
    flat, ptr = gatattn.sequences_to_graph(x)  # (B * L, D) and one causal graph per sequence
    out, t_ours = timed(lambda: layer(flat, ptr=ptr, causal=True))
    out, _ = gatattn.graph_to_sequences(out, ptr)
    return [f"{batch} causal sequences of length {length}",
            f"nn.MultiheadAttention               {t_peer * 1e3:8.1f} ms",
            f"SelfAttentionConv, causal graphs    {t_ours * 1e3:8.1f} ms, "
            f"max |diff| {(out - expected).abs().max():.1e}"]


def graph_batch(num_graphs: int, features: int, heads: int) -> list[str]:
    layer = SelfAttentionConv(features, features // heads, heads=heads, root_weight=False).eval()
    sizes = torch.randint(5, 60, (num_graphs,))
    batch = torch.repeat_interleave(torch.arange(num_graphs), sizes)
    x = torch.randn(batch.numel(), features)
    out, t_ours = timed(lambda: layer(x, batch=batch))
    loop, t_loop = timed(lambda: torch.cat([layer(x[batch == g]) for g in range(num_graphs)]))
    return [f"{num_graphs} graphs of 5-59 nodes, one complete graph each",
            f"loop over graphs                    {t_loop * 1e3:8.1f} ms",
            f"SelfAttentionConv(x, batch=batch)   {t_ours * 1e3:8.1f} ms, "
            f"max |diff| {(out - loop).abs().max():.1e}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, a few seconds")
    _threads.add_option(parser)
    args = parser.parse_args()
    _smoke.announce(args.smoke)
    _threads.apply(args.threads)
    torch.manual_seed(0)
    n, seq, graphs = (128, 32, 16) if args.smoke else (1024, 256, 256)
    for lines in (complete_graph(n, 64, 4), causal_sequences(8, seq, 64, 4),
                  graph_batch(graphs, 64, 4)):
        print("\n".join(lines), end="\n\n")


if __name__ == "__main__":
    main()
