"""CPU benchmark of attention with an additive bias over batched graphs: the ``attn_bias`` row of
docs/design.md's performance targets.

The attention core (no projections) of 256 graphs of 10-60 nodes, 4 heads of 32 channels,
float32, forward+backward into ``q, k, v`` and the bias (a leaf, as a learned Graphormer-style
bias is). Peers, all computing the same function (the largest output difference to ours is
reported):

1. ``gatattn.attention(ptr=..., attn_bias=...)`` (auto: SDPA per size group, the stacked bias
   gathered to each group's float ``attn_mask``);
2. SDPA with a padded float mask: ``to_dense_batch`` to ``(B, H, L_max, C)``, the bias held
   padded ``(B, H, L_max, L_max)`` with ``-inf`` on padded keys, as padded implementations hold it;
3. message passing on the materialised complete edges (gatattn's sparse route: SDDMM / SpMM with
   the bias per edge);
4. PyG-style per-edge gathers (TransformerConv's message form: index_select, softmax, scatter).

On a GPU FlexAttention with a ``score_mod`` reading the bias would be the peer to add; this
script is CPU only.

Usage::

    python benchmarks/bench_bias.py          # full run (a minute), writes results/bias-cpu.md
    python benchmarks/bench_bias.py --quick  # tiny sizes (seconds), prints only
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
from torch import Tensor
from torch_geometric.utils import scatter, softmax, to_dense_batch

import gatattn
from gatattn.bias import stacked_from_padded

HEADS, CHANNELS = 4, 32
RESULTS = Path(__file__).resolve().parent / "results" / "bias-cpu.md"


def graphs(num_graphs: int, low: int, high: int):
    """Sizes, ``ptr``, ``batch``, leaves ``q, k, v`` (nodes, H, C) and the padded bias."""
    gen = torch.Generator().manual_seed(4)
    sizes = torch.randint(low, high + 1, (num_graphs,), generator=gen)
    ptr = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)])
    batch = torch.arange(num_graphs).repeat_interleave(sizes)
    n = int(ptr[-1])
    q, k, v = (torch.randn(n, HEADS, CHANNELS, generator=gen).requires_grad_() for _ in range(3))
    padded = torch.randn(num_graphs, HEADS, high, high, generator=gen)
    return sizes, ptr, batch, (q, k, v), padded


def stacked_bias(sizes: Tensor, padded: Tensor) -> Tensor:
    return stacked_from_padded(padded, sizes).contiguous().requires_grad_()


def ours(num_graphs: int, low: int, high: int) -> Step:
    sizes, ptr, _, (q, k, v), padded = graphs(num_graphs, low, high)
    bias = stacked_bias(sizes, padded)
    return training(lambda: gatattn.attention(q, k, v, ptr=ptr, attn_bias=bias),
                    [q, k, v, bias])


def padded_sdpa(num_graphs: int, low: int, high: int) -> Step:
    sizes, _, batch, (q, k, v), padded = graphs(num_graphs, low, high)
    valid_keys = torch.arange(high).view(1, high) < sizes.view(-1, 1)  # (B, L_max)
    mask = padded.masked_fill(~valid_keys.view(-1, 1, 1, high), float("-inf")).requires_grad_()

    def forward():
        dense = [to_dense_batch(t.flatten(1), batch, max_num_nodes=high)[0]
                 .view(num_graphs, high, HEADS, CHANNELS).transpose(1, 2) for t in (q, k, v)]
        out = F.scaled_dot_product_attention(*dense, attn_mask=mask)  # (B, H, L, C)
        return out.transpose(1, 2)[valid_keys]  # back to (nodes, H, C)

    return training(forward, [q, k, v, mask])


def complete_edges(ptr: Tensor) -> Tensor:
    """Every pair of each graph, target-major (the stacked bias's row order)."""
    blocks = []
    for start, end in zip(ptr[:-1].tolist(), ptr[1:].tolist(), strict=True):
        nodes = torch.arange(start, end)
        n = end - start
        blocks.append(torch.stack([nodes.repeat(n), nodes.repeat_interleave(n)]))
    return torch.cat(blocks, 1)


def message_passing(num_graphs: int, low: int, high: int) -> Step:
    sizes, ptr, _, (q, k, v), padded = graphs(num_graphs, low, high)
    bias = stacked_bias(sizes, padded)
    edge_index = complete_edges(ptr)
    return training(lambda: gatattn.attention(q, k, v, edge_index=edge_index, attn_bias=bias,
                                              backend="sparse"), [q, k, v, bias])


def pyg_gathers(num_graphs: int, low: int, high: int) -> Step:
    sizes, ptr, _, (q, k, v), padded = graphs(num_graphs, low, high)
    bias = stacked_bias(sizes, padded)
    src, dst = complete_edges(ptr)
    n = q.size(0)

    def forward():
        logits = (q[dst] * k[src]).sum(-1) * CHANNELS ** -0.5 + bias  # (E, H)
        alpha = softmax(logits, dst, num_nodes=n)
        return scatter(v[src] * alpha.unsqueeze(-1), dst, 0, dim_size=n, reduce="sum")

    return training(forward, [q, k, v, bias])


def all_cases(quick: bool) -> list[Case]:
    sizes = (16, 10, 60) if quick else (256, 10, 60)
    shapes = f"{sizes[0]} graphs of {sizes[1]}-{sizes[2]} nodes, H={HEADS}, C={CHANNELS}"
    pairs = int(graphs(*sizes)[0].pow(2).sum())
    flops = attention_flops(pairs, HEADS, CHANNELS, backward=True)
    return [Case("1", "batched graphs with attn_bias, forward+backward", 3 if quick else 10, (
        Peer("gatattn.attention(ptr, attn_bias)", shapes, lambda: ours(*sizes), flops=flops),
        Peer("SDPA, padded float mask", shapes, lambda: padded_sdpa(*sizes), flops=flops),
        Peer("message passing on materialised edges (gatattn sparse)", shapes,
             lambda: message_passing(*sizes), flops=flops),
        Peer("PyG-style per-edge gathers", shapes, lambda: pyg_gathers(*sizes), flops=flops),
    ), (Target("time vs SDPA with a padded float mask <= 0.5x", time_ratio, False, 0.5,
               "x"),))]


if __name__ == "__main__":
    run_benchmark(all_cases, quick=command_line(__doc__.split("\n")[0]).quick,
                  title="Batched graphs with an additive attention bias on CPU "
                        "(docs/design.md, performance targets)", results_path=RESULTS)
