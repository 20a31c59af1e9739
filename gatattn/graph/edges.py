"""Edge sets: the checks of a given ``edge_index``, the causal and window filter of its edges, and
the edges of an implicit graph materialised (for attention weights, edge features and message
passing).

A causal graph, a window or both keep a band around each graph's diagonal: target ``i`` keeps the
sources ``pos(i) + low <= pos(j) <= pos(i) + high`` (``None``: no bound on that side), see
:meth:`~gatattn.graph.AttentionGraph.band`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from gatattn.graph.membership import read_host

if TYPE_CHECKING:
    from gatattn.graph.attention_graph import AttentionGraph


def check_edge_index(edge_index: Tensor, num_dst: int, num_src: int, validate: bool) -> Tensor:
    if not isinstance(edge_index, Tensor):
        raise TypeError(
            f"edge_index must be a (2, E) LongTensor, got {type(edge_index).__name__}; convert "
            "a SparseTensor with .coo() or torch_geometric.utils.to_edge_index"
        )
    if edge_index.layout != torch.strided:
        raise TypeError(
            f"edge_index must be a dense (2, E) LongTensor, got a {edge_index.layout} adjacency; "
            "convert it with torch_geometric.utils.to_edge_index"
        )
    integer = not edge_index.is_floating_point() and edge_index.dtype != torch.bool
    if edge_index.dim() == 1 and integer and edge_index.numel() in (num_dst, num_src):
        # What PyG's Sequential("x, batch", [(conv, "x, batch -> x")]) does: it passes
        # arguments by position, and the second one is edge_index.
        raise ValueError(
            f"edge_index must have shape (2, E), got a 1-D integer tensor of shape "
            f"{tuple(edge_index.shape)}, one entry per node: a batch vector given by position? "
            "pass it as batch= (in PyG's Sequential, which passes arguments by position, wrap "
            "the layer in a module whose forward calls it with batch=batch)"
        )
    if edge_index.dim() != 2 or edge_index.size(0) != 2:
        raise ValueError(
            f"edge_index must have shape (2, E) (row 0 sources, row 1 targets), got "
            f"{tuple(edge_index.shape)}; transpose it if it is (E, 2)"
        )
    if edge_index.is_floating_point() or edge_index.dtype == torch.bool:
        raise ValueError(f"edge_index must hold integer node ids, got dtype {edge_index.dtype}")
    edge_index = edge_index.long()
    if validate and edge_index.numel() > 0:
        bounds = torch.cat([edge_index.min(dim=1).values, edge_index.max(dim=1).values])
        [[low_src, low_dst, high_src, high_dst]] = read_host([bounds])  # one read for all four
        for role, low, high, limit in (("sources (row 0)", low_src, high_src, num_src),
                                       ("targets (row 1)", low_dst, high_dst, num_dst)):
            if low < 0:
                raise ValueError(f"edge_index {role} has a negative id {low}; node ids must be "
                                 ">= 0")
            if high >= limit:
                raise ValueError(
                    f"edge_index {role} has max {high} but there are only {limit} nodes on that "
                    "side; node ids must be < the number of nodes"
                )
    return edge_index


def band_edges(edge_index: Tensor, graph: AttentionGraph) -> Tensor:
    """Boolean mask of the edges ``j -> i`` inside the band of ``graph`` (the implicit graph
    with the edges' membership, alignment and window): ``pos(j) - pos(i) - d`` within the
    window's ``[-left, right]`` (causal: ``right = 0``)."""
    device = edge_index.device
    pos_dst, pos_src = graph.positions(device)
    offset = pos_src[edge_index[0]] - (pos_dst + graph.target_diagonals(device))[edge_index[1]]
    left, right = graph.window_sides()
    keep = torch.ones_like(offset, dtype=torch.bool) if right is None else offset <= right
    return keep if left is None else keep & (offset >= -left)


def band_pair_count(len_dst: int, len_src: int, low: int | None, high: int | None) -> int:
    """How many pairs ``0 <= i < len_dst``, ``0 <= j < len_src`` have ``i + low <= j <= i +
    high`` (``None``: no bound)."""
    kept = causal_pair_count(len_dst, len_src, len_src if high is None else high)
    return kept if low is None else kept - causal_pair_count(len_dst, len_src, low - 1)


def seeing_rows(len_dst: int, len_src: int, low: int | None, high: int | None) -> range:
    """The targets of a band that see at least one source: one run of rows (the band's
    interval moves right by one per row), the rows before and after it see nothing."""
    if len_src == 0:
        return range(0)
    first = 0 if high is None else max(0, -high)
    stop = len_dst if low is None else min(len_dst, len_src - low)
    return range(first, max(first, stop))


def band_indices(len_dst: int, len_src: int, low: int | None, high: int | None,
                 device) -> tuple[Tensor, Tensor]:
    """``(dst, src)`` positions of a band's pairs, row-major, built from its rows alone: never
    the ``len_dst * len_src`` pairs of the whole block first. The pair count is known on the
    host, so nothing is read."""
    rows = torch.arange(len_dst, device=device)
    start = torch.zeros_like(rows) if low is None else (rows + low).clamp(0, len_src)
    stop = torch.full_like(rows, len_src) if high is None else (rows + high + 1).clamp(0, len_src)
    counts = (stop - start).clamp(min=0)
    total = band_pair_count(len_dst, len_src, low, high)
    dst = torch.repeat_interleave(rows, counts, output_size=total)
    first_of_row = torch.cumsum(counts, 0) - counts
    src = start.index_select(0, dst) + torch.arange(total, device=device) - first_of_row[dst]
    return dst, src


def causal_pair_count(len_dst: int, len_src: int, diagonal: int) -> int:
    """How many pairs ``0 <= i < len_dst``, ``0 <= j < len_src`` have ``j <= i + diagonal``:
    row ``i`` keeps ``clamp(i + 1 + diagonal, 0, len_src)``, 0 before row ``first``, all from
    row ``full`` on, a linear count between them."""
    shift = 1 + diagonal
    first = min(max(-shift, 0), len_dst)
    full = min(max(len_src - shift, 0), len_dst)
    rows = full - first
    return rows * shift + (first + full - 1) * rows // 2 + (len_dst - full) * len_src


def complete_edges(graph: AttentionGraph) -> Tensor:
    """All edges of an implicit graph, sorted by target, then by source position."""
    plan = graph.segment_plan()
    device = None if graph.membership is None else graph.membership.dst.ptr.device
    blocks, start_dst, start_src = [], 0, 0
    for g in plan.groups:
        # Row-major (by target, then source); both know their size without a read.
        low, high = graph.band(g.len_dst, g.len_src)
        if low is None:
            diagonal = g.len_src if high is None else high
            dst, src = torch.tril_indices(g.len_dst, g.len_src, diagonal, device=device)
        else:
            dst, src = band_indices(g.len_dst, g.len_src, low, high, device)
        graph_ids = torch.arange(g.count, device=device).unsqueeze(1)
        dst = (start_dst + graph_ids * g.len_dst + dst).flatten()
        src = (start_src + graph_ids * g.len_src + src).flatten()
        blocks.append(torch.stack([src, dst]))
        start_dst += g.count * g.len_dst
        start_src += g.count * g.len_src
    edge_index = torch.cat(blocks, 1) if blocks else torch.zeros(2, 0, dtype=torch.long)
    if plan.order_src is not None:
        edge_index[0] = plan.order_src.forward[edge_index[0]]
    if plan.order_dst is not None:
        edge_index[1] = plan.order_dst.forward[edge_index[1]]
        edge_index = edge_index[:, torch.sort(edge_index[1], stable=True).indices]
    return edge_index
