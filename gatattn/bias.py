"""Additive attention bias: its layouts, and a Graphormer spatial encoding that produces one.

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

from collections import deque

import torch
from torch import Tensor, nn

from gatattn.graph import AttentionGraph, read_host


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


# ------------------------------------------------------------------------ Graphormer encoding


def shortest_path_distances(edge_index: Tensor, ptr: Tensor, max_distance: int) -> Tensor:
    """Hop distances inside each graph, stacked like a bias: ``(sum_b n_b^2,)`` long, row
    ``offset_b + i * n_b + j`` the distance from node ``j`` to node ``i`` along edges
    ``source -> target``; distances above ``max_distance`` and unreachable pairs are
    ``max_distance + 1``. A breadth-first search from every node (O(sum_b n_b * E_b)), on the
    host: distances are structure, computed once per graph and cached by the caller."""
    ptr_host = ptr.tolist()
    src, dst = edge_index.cpu().tolist()
    out_edges: dict[int, list[int]] = {}
    for s, d in zip(src, dst, strict=True):
        out_edges.setdefault(s, []).append(d)
    blocks = []
    for start, end in zip(ptr_host[:-1], ptr_host[1:], strict=True):
        n = end - start
        dist = torch.full((n, n), max_distance + 1, dtype=torch.long)  # [target, source]
        for source in range(n):
            seen = {source: 0}
            queue = deque([source])
            while queue:
                node = queue.popleft()
                hops = seen[node]
                if hops == max_distance:
                    continue
                for nxt in out_edges.get(node + start, ()):
                    if nxt - start not in seen:
                        seen[nxt - start] = hops + 1
                        queue.append(nxt - start)
            for target, hops in seen.items():
                dist[target, source] = hops
        blocks.append(dist.flatten())
    flat = torch.cat(blocks) if blocks else torch.zeros(0, dtype=torch.long)
    return flat.to(edge_index.device)


class SpatialEncoding(nn.Module):
    r"""Graphormer's spatial encoding (`Ying et al., 2021 <https://arxiv.org/abs/2106.05234>`_)
    as an ``attn_bias``: a learnable scalar per head and shortest-path distance,

    .. math::
        b^h_{ij} = T[\min(\phi(j, i), D + 1), h]

    where :math:`\phi(j, i)` is the hop distance from ``j`` to ``i`` inside their graph and
    :math:`D` = ``max_distance``; farther and unreachable pairs share the last row.

    Args:
        max_distance: the largest distance with its own entry. (default: :obj:`5`)
        heads: number of attention heads. (default: :obj:`1`)

    Shapes:
        forward(edge_index (2, E), ptr (B + 1,) or batch (N,)) -> ``(sum_b n_b^2, H)``, the
        stacked layout of :func:`gatattn.attention` for self-attention over the batch.
    """

    def __init__(self, max_distance: int = 5, heads: int = 1) -> None:
        super().__init__()
        if max_distance < 0 or heads < 1:
            raise ValueError(f"need max_distance >= 0 and heads >= 1, got {max_distance} and "
                             f"{heads}")
        self.max_distance, self.heads = max_distance, heads
        self.table = nn.Embedding(max_distance + 2, heads)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.table.weight)

    def forward(self, edge_index: Tensor, ptr: Tensor | None = None, *,
                batch: Tensor | None = None, num_nodes: int | None = None,
                distances: Tensor | None = None) -> Tensor:
        """The stacked bias; ``distances`` (from :meth:`distances`, structure only) skips the
        search: compute them once per batch of graphs and reuse them every epoch."""
        if distances is None:
            distances = self.distances(edge_index, ptr, batch=batch, num_nodes=num_nodes)
        return self.table(distances)

    def distances(self, edge_index: Tensor, ptr: Tensor | None = None, *,
                  batch: Tensor | None = None, num_nodes: int | None = None) -> Tensor:
        """The clipped distances the table is indexed with (stacked, ``(sum_b n_b^2,)``)."""
        ptr = _as_ptr(edge_index, ptr, batch, num_nodes)
        return shortest_path_distances(edge_index, ptr, self.max_distance)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(max_distance={self.max_distance}, heads={self.heads})"


def _as_ptr(edge_index: Tensor, ptr: Tensor | None, batch: Tensor | None,
            num_nodes: int | None) -> Tensor:
    if ptr is not None:
        return ptr
    if batch is None:
        if num_nodes is None:
            raise ValueError("give ptr, batch or num_nodes (one graph) to SpatialEncoding")
        return torch.tensor([0, num_nodes], device=edge_index.device)
    if batch.numel() > 1 and not bool((batch[1:] >= batch[:-1]).all()):
        raise ValueError("SpatialEncoding needs a sorted batch (PyG's Batch is sorted); pass ptr")
    counts = torch.bincount(batch, minlength=int(batch.max()) + 1 if batch.numel() else 0)
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)])


__all__ = ["SpatialEncoding", "block_offsets", "check_bias_rows", "check_bias_tensor",
           "shortest_path_distances", "stacked_from_padded", "stacked_rows", "stacked_to_dense"]
