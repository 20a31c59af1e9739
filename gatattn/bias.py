"""Additive attention bias and its layouts (Graphormer's spatial encoding, which produces one, is
in :mod:`gatattn.positional`).

``attn_bias`` adds ``b_ij`` (per head) to the scaled logits: ``s_ij = <q_i, k_j> * scale + b_ij``.
A ``-inf`` entry removes its pair: a target left without pairs gets zeros, as in SDPA.

* With an explicit ``edge_index`` it is ``(E, H)``, one row per edge, in the edges' order.
* On implicit graphs (complete, batched, causal, bipartite) it is **stacked**: each graph's full
  ``n_dst x n_src`` block, target-major (row ``offset_b + i * n_src_b + j`` holds pair
  ``(target i, source j)`` of graph ``b``, positions inside the graph), graphs in id order,
  stacked to ``(sum_b n_dst_b * n_src_b, H)``. Pairs that a causal graph excludes are ignored
  (their gradient is zero). The layout never pads, and the graph code maps it to each route:
  per-size-group ``(count, H, len_dst, len_src)`` gathers for SDPA, per-edge rows for message
  passing, per-segment block offsets for the fused kernels.

:func:`stacked_from_padded` builds the stacked layout from a padded ``(B, H, L, S)`` tensor (what
SDPA's ``attn_mask`` or a Graphormer implementation holds); :func:`stacked_to_dense` is its
inverse into one ``(N_dst, N_src, H)`` matrix (zeros between graphs), for tests and the
reference.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gatattn.graph import AttentionGraph, read_host
from gatattn.positional import SpatialEncoding, shortest_path_distances  # also importable here


def block_offsets(counts_dst: Tensor, counts_src: Tensor) -> Tensor:
    """``(B + 1,)`` first stacked row of each graph's block (exclusive cumsum of
    ``n_dst_b * n_src_b``), on the device, without a host read."""
    sizes = counts_dst * counts_src
    return torch.cat([sizes.new_zeros(1), sizes.cumsum(0)])


def graph_block_offsets(graph: AttentionGraph, device) -> Tensor:
    """:func:`block_offsets` of an implicit ``graph``'s graphs, in id order."""
    if graph.membership is None:
        return torch.tensor([0, graph.num_dst * graph.num_src], device=device)
    return block_offsets(graph.membership.dst.counts(), graph.membership.src.counts())


def stacked_rows(graph: AttentionGraph, dst: Tensor, src: Tensor) -> Tensor:
    """The stacked-bias row of each pair ``src[e] -> dst[e]`` of an implicit ``graph`` (both
    nodes of one graph, as the graph's materialised edges are). No host read."""
    ids_dst, _ = graph.graph_ids(dst.device)
    pos_dst, pos_src = graph.positions(dst.device)
    offsets = graph_block_offsets(graph, dst.device)
    graph_of = ids_dst.index_select(0, dst)
    sources_per_graph = graph.source_counts(dst.device)
    return (offsets.index_select(0, graph_of)
            + pos_dst.index_select(0, dst) * sources_per_graph.index_select(0, graph_of)
            + pos_src.index_select(0, src))


def expected_rows(graph: AttentionGraph) -> int:
    """Rows the stacked bias of an implicit ``graph`` has (reads the graph sizes once)."""
    return sum(d * s for d, s in zip(*graph.host_sizes(), strict=True))


def check_bias_tensor(attn_bias, q: Tensor) -> None:
    """A floating-point tensor on ``q``'s device (its shape is checked with the graph)."""
    if not isinstance(attn_bias, Tensor):
        raise TypeError(f"attn_bias must be a (rows, heads) tensor, got {type(attn_bias).__name__}")
    if not attn_bias.is_floating_point():
        raise TypeError(f"attn_bias must be floating point, got {attn_bias.dtype}")
    if attn_bias.device != q.device:
        raise ValueError(f"attn_bias must be on q's device {q.device}, got {attn_bias.device}")


def check_bias_rows(attn_bias: Tensor, graph: AttentionGraph, heads: int,
                    validate: bool) -> None:
    """``(rows, H)``: one row per given edge, or per pair of each implicit graph's block. The
    block sizes are checked on the host when known, else by a device-side assertion."""
    layout = ("one row per edge of edge_index, in its order" if not graph.is_implicit else
              "each graph's n_dst x n_src block, target-major (row i * n_src + j), graphs in id "
              "order, stacked; gatattn.bias.stacked_from_padded builds it from (B, H, L, S)")
    if not graph.is_implicit:
        rows = graph.num_given_edges
    elif validate or graph.membership is None or graph.membership.dst.sizes is not None:
        rows = expected_rows(graph)
    else:
        rows = None
        total = graph_block_offsets(graph, attn_bias.device)[-1]
        torch._assert_async(total == attn_bias.size(0),
                            "attn_bias must have sum_b n_dst_b * n_src_b rows (stacked layout)")
    if (attn_bias.dim() != 2 or attn_bias.size(1) != heads
            or (rows is not None and attn_bias.size(0) != rows)):
        expected = f"({'sum_b n_dst_b * n_src_b' if rows is None else rows}, {heads})"
        raise ValueError(f"attn_bias must be {expected}: {layout}; got {tuple(attn_bias.shape)}")


def edge_bias(attn_bias: Tensor | None, graph: AttentionGraph, edges: Tensor,
               query: Tensor) -> Tensor | None:
    """The bias of each materialised edge of ``graph`` (``edges`` source -> target, as
    :meth:`AttentionGraph.to_edge_index` returns them), checked as :func:`gatattn.attention`
    checks it: the given rows of an edge set's kept edges, or the stacked rows of an implicit
    graph's pairs."""
    if attn_bias is None:
        return None
    check_bias_tensor(attn_bias, query)
    check_bias_rows(attn_bias, graph, query.size(1), validate=True)
    attn_bias = attn_bias.to(query.dtype)
    if graph.kept_edges is not None:
        return attn_bias[graph.kept_edges]
    if graph.is_implicit:
        return materialized_bias(attn_bias, graph, edges)
    return attn_bias


def materialized_bias(attn_bias: Tensor, graph: AttentionGraph, edges: Tensor) -> Tensor:
    """An implicit ``graph``'s stacked bias in the order of its materialised ``edges``
    (:meth:`AttentionGraph.to_edge_index`): the stacked rows as they are where the graphs lie
    in order and keep every pair (the edges are materialised by target, then source position:
    the stacked order), else gathered."""
    sides = () if graph.membership is None else graph.membership.sides
    if not graph.banded and all(side.order is None for side in sides):
        return attn_bias
    return attn_bias.index_select(0, stacked_rows(graph, edges[1], edges[0]))


def stacked_from_padded(bias: Tensor, sizes_dst: Tensor | list[int],
                        sizes_src: Tensor | list[int] | None = None) -> Tensor:
    """The stacked ``(sum_b n_dst_b * n_src_b, H)`` layout of a padded ``(B, H, L, S)`` bias
    (graph ``b``'s block is its top-left ``n_dst_b x n_src_b`` corner). ``sizes_*`` are the
    ``(B,)`` graph sizes (``sizes_src`` defaults to ``sizes_dst``). Differentiable; the padding
    gets zero gradient."""
    if bias.dim() != 4:
        raise ValueError(f"a padded bias must be (B, H, L, S), got shape {tuple(bias.shape)}")
    B, H, L, S = bias.shape
    sizes_dst = torch.as_tensor(sizes_dst, device=bias.device).long()
    sizes_src = sizes_dst if sizes_src is None else torch.as_tensor(
        sizes_src, device=bias.device).long()
    if sizes_dst.shape != (B,) or sizes_src.shape != (B,):
        raise ValueError(f"need one size per graph ({B}), got {tuple(sizes_dst.shape)} and "
                         f"{tuple(sizes_src.shape)}")
    _check_padded_sizes(sizes_dst, sizes_src, L, S,
                        "sizes_dst" if sizes_src is sizes_dst else "sizes_src")
    keep = ((torch.arange(L, device=bias.device).view(1, L, 1) < sizes_dst.view(B, 1, 1))
            & (torch.arange(S, device=bias.device).view(1, 1, S) < sizes_src.view(B, 1, 1)))
    return bias.permute(0, 2, 3, 1)[keep]  # (B, L, S, H) -> rows in (b, i, j) order


def _check_padded_sizes(sizes_dst: Tensor, sizes_src: Tensor, L: int, S: int,
                        src_name: str) -> None:
    """Each size within ``[0, L]`` / ``[0, S]``: a larger one would silently take fewer rows
    than it states (the padded block has no more), putting later graphs' rows in its place.
    One host read (the selection that follows reads its row count anyway)."""
    if sizes_dst.numel() == 0:
        return
    [[low_dst, high_dst, low_src, high_src]] = read_host([torch.stack([
        sizes_dst.min(), sizes_dst.max(), sizes_src.min(), sizes_src.max()])])
    for name, low, high, limit, dim in (("sizes_dst", low_dst, high_dst, L, "L"),
                                        (src_name, low_src, high_src, S, "S")):
        if low < 0 or high > limit:
            raise ValueError(
                f"{name} must lie in [0, {dim}] = [0, {limit}] (the padded bias's {dim}), got "
                f"sizes from {low} to {high}; pad the bias to the largest graph, or pass the "
                "graphs' own sizes")


def stacked_to_dense(bias: Tensor, ptr_dst: Tensor, ptr_src: Tensor | None = None) -> Tensor:
    """A stacked bias as one ``(N_dst, N_src, H)`` tensor, zeros between graphs, for graphs
    given by their offsets ``ptr_*`` (nodes in graph order)."""
    ptr_src = ptr_dst if ptr_src is None else ptr_src
    sizes_dst, sizes_src = ptr_dst.diff().tolist(), ptr_src.diff().tolist()
    dense = bias.new_zeros(int(ptr_dst[-1]), int(ptr_src[-1]), bias.size(1))
    start = 0
    for b, (n_dst, n_src) in enumerate(zip(sizes_dst, sizes_src, strict=True)):
        block = bias[start:start + n_dst * n_src].view(n_dst, n_src, bias.size(1))
        dense[ptr_dst[b]:ptr_dst[b] + n_dst, ptr_src[b]:ptr_src[b] + n_src] = block
        start += n_dst * n_src
    return dense


__all__ = ["SpatialEncoding", "block_offsets", "check_bias_rows", "check_bias_tensor",
           "shortest_path_distances", "stacked_from_padded", "stacked_rows", "stacked_to_dense"]
