"""Which sources each target attends to: one description built from whatever the caller gives.

The caller says nothing (one complete graph), gives ``batch`` or ``ptr`` (one complete graph per
graph of a PyG batch), asks for ``causal`` (a DAG ``j -> i`` iff ``pos(j) <= pos(i)`` inside a
graph), gives a bipartite pair of each (cross-attention), or gives an explicit ``edge_index``.
:func:`build_graph` validates all of it once and returns an :class:`AttentionGraph`; the
backends read that and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

#: Above this many edges an implicit complete graph is not materialised (for attention weights
#: or the sparse route): its edge_index alone would take 16 bytes per edge.
MAX_MATERIALIZED_EDGES = 2**25


class GraphTooLargeError(ValueError):
    """Raised instead of building an O(N^2) object the caller probably did not mean to build."""


@dataclass(frozen=True)
class SegmentGroup:
    """``count`` graphs that all have ``len_dst`` targets and ``len_src`` sources."""

    count: int
    len_dst: int
    len_src: int


@dataclass(frozen=True)
class Permutation:
    """A node order: ``forward[p]`` is the node at position ``p``; ``inverse`` undoes it."""

    forward: Tensor
    inverse: Tensor

    @classmethod
    def of(cls, forward: Tensor) -> Permutation:
        inverse = torch.empty_like(forward)
        inverse[forward] = torch.arange(forward.numel(), device=forward.device)
        return cls(forward, inverse)


@dataclass(frozen=True)
class SegmentPlan:
    """How the dense route runs many complete graphs without padding.

    Nodes are permuted so that graphs of equal size lie next to each other (keeping each graph's
    own node order); each group is then one ``(count, H, len, C)`` batch. ``order_*`` is ``None``
    when the nodes already lie in that order.
    """

    groups: list[SegmentGroup]
    order_dst: Permutation | None = None
    order_src: Permutation | None = None


@dataclass(frozen=True)
class PackedSegments:
    """The varlen kernels' view of an implicit graph: nodes in graph order (``order_*`` is
    ``None`` when they already are) and segment offsets ``cu_seqlens_*`` of shape (B + 1,)."""

    order_dst: Permutation | None
    order_src: Permutation | None
    cu_seqlens_dst: Tensor
    cu_seqlens_src: Tensor


@dataclass(frozen=True)
class AttentionGraph:
    """An attention pattern over ``num_src`` sources and ``num_dst`` targets.

    Either ``edge_index`` is set (an arbitrary edge set, source -> target), or the graph is
    implicit: one complete graph per graph id in ``batch_dst`` / ``batch_src`` (all nodes in one
    graph when they are ``None``), restricted to ``pos(j) <= pos(i)`` when ``causal``.
    """

    num_dst: int
    num_src: int
    edge_index: Tensor | None = None
    batch_dst: Tensor | None = None
    batch_src: Tensor | None = None
    num_graphs: int = 1
    causal: bool = False
    bipartite: bool = False
    #: With ``causal`` and an explicit edge_index: which of the given edges were kept.
    kept_edges: Tensor | None = None
    # A one-slot cache on a frozen dataclass. (functools.cached_property would take a lock that
    # torch.compile cannot trace, breaking the graph on every call.)
    _plan: list = field(default_factory=list, repr=False, compare=False)

    @property
    def is_implicit(self) -> bool:
        return self.edge_index is None

    def sizes(self) -> tuple[Tensor, Tensor]:
        """Targets and sources per graph, ``(num_graphs,)`` each."""
        return (
            _graph_sizes(self.batch_dst, self.num_dst, self.num_graphs),
            _graph_sizes(self.batch_src, self.num_src, self.num_graphs),
        )

    def num_edges(self) -> int:
        if self.edge_index is not None:
            return self.edge_index.size(1)
        sizes_dst, sizes_src = self.sizes()
        if not self.causal:
            return int((sizes_dst * sizes_src).sum())
        # Top-left causal: row i of a graph keeps min(i + 1, n_src) sources.
        full = torch.minimum(sizes_dst, sizes_src)
        triangle = full * (full + 1) // 2
        return int((triangle + (sizes_dst - full).clamp_min(0) * sizes_src).sum())

    def segment_plan(self) -> SegmentPlan:
        """The grouping of graphs by size used by the dense route (computed once)."""
        if not self._plan:
            self._plan.append(_make_segment_plan(self))
        return self._plan[0]

    def packed_segments(self) -> PackedSegments:
        """Graphs laid end to end, each one segment (no grouping by size, no padding)."""
        order_dst, cu_dst = _pack(self.batch_dst, self.num_dst, self.num_graphs)
        if not self.bipartite:
            return PackedSegments(order_dst, order_dst, cu_dst, cu_dst)
        order_src, cu_src = _pack(self.batch_src, self.num_src, self.num_graphs)
        return PackedSegments(order_dst, order_src, cu_dst, cu_src)

    def to_edge_index(self) -> Tensor:
        """The explicit edges, sorted by target; materialises implicit graphs (size-checked)."""
        if self.edge_index is not None:
            return self.edge_index
        num_edges = self.num_edges()
        if num_edges > MAX_MATERIALIZED_EDGES:
            raise GraphTooLargeError(
                f"materialising this complete graph needs {num_edges:,} edges, above the limit "
                f"of {MAX_MATERIALIZED_EDGES:,} (gatattn.graph.MAX_MATERIALIZED_EDGES); drop "
                "return_attention_weights / edge_attr, or attend over an explicit sparse "
                "edge_index"
            )
        return _complete_edges(self)


def build_graph(
    num_dst: int,
    num_src: int,
    *,
    edge_index: Tensor | None = None,
    batch: Tensor | tuple[Tensor, Tensor] | None = None,
    ptr: Tensor | tuple[Tensor, Tensor] | None = None,
    causal: bool = False,
    bipartite: bool = False,
    validate: bool = True,
) -> AttentionGraph:
    """Validate the caller's description of the graph and build an :class:`AttentionGraph`.

    ``batch`` / ``ptr`` are tensors, or ``(dst, src)`` pairs when ``bipartite``. ``batch`` need
    not be sorted: a graph's nodes are taken in the order they appear. ``validate=False`` skips
    the checks that read tensor values (used under ``torch.compile``).
    """
    batch_dst, batch_src = graph_membership(num_dst, num_src, batch=batch, ptr=ptr,
                                            bipartite=bipartite, validate=validate)
    num_graphs = _count_graphs(batch_dst, batch_src, validate)

    if edge_index is not None:
        edge_index = _check_edge_index(edge_index, num_dst, num_src, validate)
        kept = None
        if causal:
            kept = _causal_edges(edge_index, batch_dst, batch_src, num_dst, num_src)
            edge_index = edge_index[:, kept]
        return AttentionGraph(num_dst, num_src, edge_index=edge_index, causal=causal,
                              bipartite=bipartite, kept_edges=kept)
    return AttentionGraph(num_dst, num_src, batch_dst=batch_dst, batch_src=batch_src,
                          num_graphs=num_graphs, causal=causal, bipartite=bipartite)


def graph_membership(
    num_dst: int,
    num_src: int,
    *,
    batch: Tensor | tuple[Tensor, Tensor] | None = None,
    ptr: Tensor | tuple[Tensor, Tensor] | None = None,
    bipartite: bool = False,
    validate: bool = True,
) -> tuple[Tensor | None, Tensor | None]:
    """Graph id per target and per source, ``(batch_dst, batch_src)``, from ``batch`` or ``ptr``
    (``None`` each without them), checked as :func:`build_graph` does. Reads no tensor value
    with ``validate=False``, so it traces under ``torch.compile`` without a graph break."""
    if not bipartite and num_dst != num_src:
        raise ValueError(
            f"self-attention needs as many queries as keys, got {num_dst} and {num_src}; "
            "pass bipartite=True (or a pair (x_src, x_dst) to the layer) for cross-attention"
        )
    if batch is not None and ptr is not None:
        raise ValueError("got both batch and ptr; give either batch or ptr, not both")
    batch_dst, batch_src = _split_pair("batch", batch, bipartite)
    ptr_dst, ptr_src = _split_pair("ptr", ptr, bipartite)
    if ptr_dst is not None:
        batch_dst = ptr_to_batch(_check_ptr("ptr", ptr_dst, num_dst, validate), num_dst)
        batch_src = batch_dst if ptr_src is ptr_dst else ptr_to_batch(
            _check_ptr("ptr", ptr_src, num_src, validate), num_src)  # self-attention: once
    batch_dst = _check_batch("batch", batch_dst, num_dst, "queries (x_dst)")
    batch_src = _check_batch("batch", batch_src, num_src, "keys (x_src)")
    return batch_dst, batch_src


def ptr_to_batch(ptr: Tensor, num_nodes: int) -> Tensor:
    """``ptr`` (B+1,) -> per-node graph ids (num_nodes,): node ``i`` lies in the last graph
    that starts at or before it (empty graphs start where the next one does). A search rather
    than ``ptr[1:] - ptr[:-1]``, whose size a tracer would specialise for one graph."""
    nodes = torch.arange(num_nodes, device=ptr.device, dtype=ptr.dtype)
    return torch.searchsorted(ptr, nodes, right=True) - 1


def local_positions(batch: Tensor | None, num_nodes: int, device=None) -> Tensor:
    """Position of every node inside its own graph, in order of appearance (the sequence order
    that ``causal`` and positional encodings use)."""
    if batch is None:
        return torch.arange(num_nodes, device=device)
    order = torch.sort(batch, stable=True).indices
    sorted_batch = batch[order]
    num_graphs = int(sorted_batch[-1]) + 1 if num_nodes else 0
    starts = torch.cumsum(torch.bincount(sorted_batch, minlength=num_graphs), 0)
    starts = torch.cat([starts.new_zeros(1), starts[:-1]])
    positions = torch.empty_like(batch)
    positions[order] = torch.arange(num_nodes, device=batch.device) - starts[sorted_batch]
    return positions


def _graph_sizes(batch: Tensor | None, num_nodes: int, num_graphs: int) -> Tensor:
    if batch is None:
        return torch.tensor([num_nodes])
    return torch.bincount(batch, minlength=num_graphs).cpu()


def _split_pair(name: str, value, bipartite: bool):
    if value is None:
        return None, None
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(
                f"{name} must be a tensor or a (dst, src) pair, got {len(value)} items")
        if not bipartite:
            raise ValueError(f"{name} is a pair but the graph is not bipartite; pass one tensor")
        return value[0], value[1]
    if bipartite:
        raise ValueError(
            f"cross-attention has two node sets: give {name} as a pair, one for the queries and "
            "one for the keys"
        )
    return value, value


def _check_ptr(name: str, ptr: Tensor, num_nodes: int, validate: bool) -> Tensor:
    if ptr.dim() != 1 or ptr.numel() < 1 or ptr.is_floating_point():
        raise ValueError(
            f"{name} must be a 1-D integer tensor [0, n_0, n_0 + n_1, ...], got shape "
            f"{tuple(ptr.shape)} and dtype {ptr.dtype}"
        )
    ptr = ptr.long()
    if validate:
        # One host sync for all three checks; the details only when one fails.
        if not bool((ptr[0] == 0) & (ptr[-1] == num_nodes) & (ptr[1:] >= ptr[:-1]).all()):
            if int(ptr[0]) != 0 or int(ptr[-1]) != num_nodes:
                raise ValueError(
                    f"{name} must start at 0 and end at the number of nodes ({num_nodes}), "
                    f"got {int(ptr[0])} ... {int(ptr[-1])}")
            raise ValueError(f"{name} must be non-decreasing, got {ptr.tolist()[:10]}...")
    else:  # traced: the same checks, on the device, failing when the graph runs
        non_decreasing = (ptr.cummax(0).values == ptr).all()  # slices would specialise sizes
        valid = (ptr[0] == 0) & (ptr[-1] == num_nodes) & non_decreasing
        # (The message must not format num_nodes: a traced size would be specialised.)
        torch._assert_async(valid, f"{name} must be non-decreasing, start at 0 and end at the "
                            "number of nodes")
    return ptr


def _check_batch(name: str, batch: Tensor | None, num_nodes: int, what: str) -> Tensor | None:
    if batch is None:
        return None
    if batch.dim() != 1 or batch.is_floating_point():
        raise ValueError(
            f"{name} must be a 1-D integer tensor of graph ids, got shape {tuple(batch.shape)} "
            f"and dtype {batch.dtype}"
        )
    if batch.numel() != num_nodes:
        raise ValueError(
            f"{name} has {batch.numel()} entries but there are {num_nodes} {what}; give one "
            "graph id per node"
        )
    return batch.long()


def _count_graphs(batch_dst: Tensor | None, batch_src: Tensor | None, validate: bool) -> int:
    if batch_dst is None:
        return 1
    distinct = (batch_dst,) if batch_src is batch_dst else (batch_dst, batch_src)
    nonempty = [b for b in distinct if b.numel() > 0]
    if not nonempty:
        return 0
    lowest = torch.stack([b.min() for b in nonempty]).min()
    highest = torch.stack([b.max() for b in nonempty]).max()
    low, high = torch.stack([lowest, highest]).tolist()  # one host sync for both
    if validate and low < 0:
        raise ValueError(f"batch must hold graph ids >= 0, got min {low}")
    return high + 1


def _check_edge_index(edge_index: Tensor, num_dst: int, num_src: int, validate: bool) -> Tensor:
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
    if edge_index.dim() != 2 or edge_index.size(0) != 2:
        raise ValueError(
            f"edge_index must have shape (2, E) (row 0 sources, row 1 targets), got "
            f"{tuple(edge_index.shape)}; transpose it if it is (E, 2)"
        )
    if edge_index.is_floating_point() or edge_index.dtype == torch.bool:
        raise ValueError(f"edge_index must hold integer node ids, got dtype {edge_index.dtype}")
    edge_index = edge_index.long()
    if validate and edge_index.numel() > 0:
        for row, role, limit in ((0, "sources (row 0)", num_src), (1, "targets (row 1)", num_dst)):
            low, high = int(edge_index[row].min()), int(edge_index[row].max())
            if low < 0:
                raise ValueError(f"edge_index {role} has a negative id {low}; node ids must be "
                                 ">= 0")
            if high >= limit:
                raise ValueError(
                    f"edge_index {role} has max {high} but there are only {limit} nodes on that "
                    "side; node ids must be < the number of nodes"
                )
    return edge_index


def _causal_edges(edge_index: Tensor, batch_dst, batch_src, num_dst: int,
                  num_src: int) -> Tensor:
    """Boolean mask of the edges ``j -> i`` with ``pos(j) <= pos(i)``."""
    pos_src = local_positions(batch_src, num_src, edge_index.device)
    pos_dst = local_positions(batch_dst, num_dst, edge_index.device)
    return pos_src[edge_index[0]] <= pos_dst[edge_index[1]]


def _pack(batch: Tensor | None, num_nodes: int, num_graphs: int):
    if batch is None:
        return None, torch.tensor([0, num_nodes])
    is_sorted = bool((batch[1:] >= batch[:-1]).all())
    order = None if is_sorted else Permutation.of(torch.sort(batch, stable=True).indices)
    counts = torch.bincount(batch, minlength=num_graphs)
    return order, torch.cat([counts.new_zeros(1), counts.cumsum(0)])


def _make_segment_plan(graph: AttentionGraph) -> SegmentPlan:
    if graph.batch_dst is None:
        return SegmentPlan([SegmentGroup(1, graph.num_dst, graph.num_src)])
    sizes_dst, sizes_src = graph.sizes()
    if graph.num_graphs == 0:
        return SegmentPlan([])
    # Order graphs by (len_dst, len_src), stably, so equal shapes become neighbours.
    key = sizes_dst * (int(sizes_src.max()) + 1) + sizes_src
    graph_order = torch.sort(key, stable=True).indices
    shapes, counts = torch.unique_consecutive(
        torch.stack([sizes_dst[graph_order], sizes_src[graph_order]], 1), dim=0,
        return_counts=True)
    groups = [SegmentGroup(c, d, s)
              for (d, s), c in zip(shapes.tolist(), counts.tolist(), strict=True)]
    order_dst = _node_order(graph.batch_dst, graph_order)
    order_src = _node_order(graph.batch_src, graph_order) if graph.bipartite else order_dst
    return SegmentPlan(groups, order_dst, order_src)


def _node_order(batch: Tensor, graph_order: Tensor) -> Permutation | None:
    """Node permutation listing the graphs in ``graph_order``, each in appearance order;
    ``None`` if that is the identity."""
    rank = torch.empty_like(graph_order)
    rank[graph_order] = torch.arange(graph_order.numel())
    perm = torch.sort(rank.to(batch.device)[batch], stable=True).indices
    if bool((perm == torch.arange(perm.numel(), device=perm.device)).all()):
        return None
    return Permutation.of(perm)


def _complete_edges(graph: AttentionGraph) -> Tensor:
    """All edges of an implicit graph, sorted by target, then by source position."""
    plan = graph.segment_plan()
    device = graph.batch_dst.device if graph.batch_dst is not None else None
    blocks, start_dst, start_src = [], 0, 0
    for g in plan.groups:
        pairs = torch.ones(g.len_dst, g.len_src, dtype=torch.bool, device=device)
        if graph.causal:
            pairs = pairs.tril()
        dst, src = pairs.nonzero().unbind(1)  # row-major: by target, then source
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
