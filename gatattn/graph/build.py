"""Building an :class:`~gatattn.graph.AttentionGraph` from whatever the caller gives.

The caller says nothing (one complete graph), gives ``batch`` or ``ptr`` (one complete graph per
graph of a PyG batch), asks for ``causal`` (a DAG ``j -> i`` iff ``pos(j) <= pos(i) + d`` inside
a graph, see :func:`~gatattn.graph.causal_mode`), gives a bipartite pair of each
(cross-attention), narrows each graph to a sliding ``window`` (a band around its diagonal), or
gives an explicit ``edge_index``. :func:`build_graph` validates all of it
once and returns an :class:`~gatattn.graph.AttentionGraph`; the backends read that and nothing
else. :func:`describe_graph` is the same for one call's keyword description.

Both read the host at most once (see :mod:`gatattn.graph.membership`); with validation switched
off (:class:`~gatattn.graph.validation`) a ``ptr`` is not read at all.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gatattn.graph.attention_graph import AttentionGraph
from gatattn.graph.checks import check_graph_devices, check_node_counts
from gatattn.graph.edges import band_edges, check_edge_index
from gatattn.graph.membership import Membership, parse_membership, read_host
from gatattn.graph.reuse import FlagFor, keep_graph, reused_graph, unchanged_graph
from gatattn.graph.switches import causal_mode, validation_enabled, window_mode
from gatattn.transforms import compiling


def build_graph(
    *,
    edge_index=None,
    batch: Tensor | tuple[Tensor, Tensor] | None = None,
    ptr: Tensor | tuple[Tensor, Tensor] | None = None,
    causal: bool | str = False,
    window: tuple[int | None, int | None] | None = None,
    num_nodes: int | tuple[int, int] | None = None,
) -> AttentionGraph:
    """The graph attention runs over, as one immutable object: build it once per batch and
    pass it as ``graph=`` to :func:`gatattn.attention` and to every layer.

    It is validated here, with at most one host read (``ptr``'s values, or a ``batch``'s graph
    count and sizes), and owns everything derived from it: graph sizes, the grouping of graphs
    by size and its node permutations, the routes' layouts, the kept edges of a causal edge
    set, materialised edges. A call given ``graph=`` reads nothing on the host and re-derives
    nothing.

    Args:
        edge_index: ``(2, E)`` edges (row 0 sources, row 1 targets), a ``torch.sparse``
            ``adj_t``, a ``SparseTensor`` or an :class:`torch_geometric.EdgeIndex`;
            :obj:`None` for complete graphs. (default: :obj:`None`)
        batch: graph id per node, or a ``(batch_dst, batch_src)`` pair (cross-attention).
            (default: :obj:`None`)
        ptr: ``(B + 1,)`` graph offsets, or a ``(ptr_dst, ptr_src)`` pair.
            (default: :obj:`None`)
        causal: :obj:`False`, :obj:`True` / ``"top_left"`` or ``"bottom_right"``
            (:data:`CAUSAL_ALIGNMENTS`). (default: :obj:`False`)
        window: ``(left, right)``: each graph keeps only the sources ``pos(i) + d - left <=
            pos(j) <= pos(i) + d + right`` of target ``i`` (``d``: the causal diagonal, 0 unless
            ``causal="bottom_right"`` on a bipartite graph), FlashAttention's ``window_size``
            with ``None`` for a side without bound. With ``causal`` the right side is the
            diagonal: ``(left, 0)`` or ``(left, None)``. An edge set keeps its edges inside
            the band. (default: :obj:`None`)
        num_nodes: the node count, or ``(n_dst, n_src)`` for cross-attention; needed only
            where nothing else gives it (a complete graph, a plain ``edge_index``).
            (default: :obj:`None`)
    """
    num_dst, num_src, bipartite = _node_counts(edge_index, batch, ptr, num_nodes)
    if edge_index is not None:
        from gatattn.adjacency import read_adjacency  # (adjacency imports PyG)

        edge_index = read_adjacency(edge_index).edge_index
    check_graph_devices(None, edge_index=edge_index, batch=batch, ptr=ptr)
    # Private copies: the caller may reuse its tensors, the graph never changes. (A batch
    # tensor's structure is built from a private copy of its ids anyway.)
    edge_index, ptr = _private(edge_index), _private(ptr)
    graph, _ = describe_graph(num_dst, num_src, edge_index=edge_index, batch=batch, ptr=ptr,
                              causal=causal, window=window, bipartite=bipartite,
                              validate=not compiling(), reuse=False)
    return graph.prepare()


def _private(value):
    """A copy of a tensor or of a pair of them (one copy where both are the same tensor)."""
    if isinstance(value, (tuple, list)):
        first = value[0].clone()
        return first, first if value[1] is value[0] else value[1].clone()
    return None if value is None else value.clone()


def _node_counts(edge_index, batch, ptr, num_nodes) -> tuple[int | None, int | None, bool]:
    """``(num_dst, num_src, bipartite)`` from what the caller gives; ``None`` counts are read
    from ``ptr`` with its values."""
    pair = isinstance(batch, (tuple, list)) or isinstance(ptr, (tuple, list))
    if num_nodes is not None:
        counts = tuple(num_nodes) if isinstance(num_nodes, (tuple, list)) else (num_nodes,) * 2
        if len(counts) != 2 or not all(isinstance(n, int) and n >= 0 for n in counts):
            raise ValueError(f"num_nodes must be an int >= 0 or a (n_dst, n_src) pair of them, "
                             f"got {num_nodes!r}")
        return counts[0], counts[1], pair or isinstance(num_nodes, (tuple, list))
    if batch is not None:
        dst, src = (batch[0], batch[1]) if pair else (batch, batch)
        return dst.numel(), src.numel(), pair
    if ptr is not None:
        return None, None, pair
    size = _adjacency_size(edge_index)
    if size is None:
        raise ValueError(
            "build_graph needs num_nodes here: a complete graph (no edge_index, batch or ptr) "
            "or a plain edge_index does not say how many nodes there are; pass num_nodes=N, or "
            "(n_dst, n_src) for cross-attention")
    return size[0], size[1], size[0] != size[1]


def _adjacency_size(adj) -> tuple[int, int] | None:
    """``(n_dst, n_src)`` of an adjacency that states its size (``adj_t`` layouts and an
    EdgeIndex with a sparse size), else ``None``."""
    if adj is None:
        return None
    if isinstance(adj, Tensor) and adj.layout != torch.strided and adj.dim() == 2:
        return adj.size(0), adj.size(1)  # adj_t: targets x sources
    sparse_size = getattr(adj, "sparse_sizes", None) or getattr(adj, "sparse_size", None)
    if callable(sparse_size):
        sizes = sparse_size()
        if len(sizes) == 2 and None not in sizes:
            if isinstance(adj, Tensor):  # EdgeIndex: (sources, targets)
                return sizes[1], sizes[0]
            return sizes[0], sizes[1]  # SparseTensor adj_t: (targets, sources)
    return None


def describe_graph(
    num_dst: int | None,
    num_src: int | None,
    *,
    edge_index: Tensor | None = None,
    batch: Tensor | tuple[Tensor, Tensor] | None = None,
    ptr: Tensor | tuple[Tensor, Tensor] | None = None,
    causal: bool | str = False,
    window: tuple[int | None, int | None] | None = None,
    bipartite: bool = False,
    validate: bool | None = None,
    finite_flag: FlagFor | None = None,
    reuse: bool = True,
) -> tuple[AttentionGraph, bool | None]:
    """Validate a call's description of the graph and build its :class:`AttentionGraph` (the
    keyword forms of :func:`gatattn.attention`; :func:`build_graph` is the public form).

    ``batch`` / ``ptr`` are tensors, or ``(dst, src)`` pairs when ``bipartite``. ``batch`` need
    not be sorted: a graph's nodes are taken in the order they appear. ``validate`` says whether
    values are checked on the host (default: :func:`validation_enabled`; ``False`` under
    ``torch.compile``). ``finite_flag(graph)`` gives a 0-dim bool tensor (whether the inputs
    are finite) to read in the same host read as the graph, or ``None`` where the call has no
    use for it; it is asked with the graph where that is known before the read (one complete
    graph, a reused description), else with ``None``. The flag's value comes back second
    (``None``: not read). ``num_dst`` / ``num_src`` ``None``: ``ptr``'s last values (validated
    ``ptr`` only). ``reuse``: a ``batch`` / ``ptr`` description is served from, and kept in,
    :mod:`gatattn.graph.reuse` (every layer given the same tensors gets the same graph), at the
    cost of one host read (a call that reads nothing else, such as an unvalidated ``ptr`` on
    the fused kernels, passes ``False``).
    """
    validate = validation_enabled() if validate is None else validate
    causal, bottom_right = causal_mode(causal)
    bottom_right = bottom_right and bipartite  # self-attention: the same graph as top-left
    window = window_mode(window, causal)
    pattern = {"causal": causal, "bottom_right": bottom_right, "window": window}
    if edge_index is not None:
        membership, _ = parse_membership(num_dst, num_src, batch, ptr, bipartite, validate, [])
        if membership is not None:
            num_dst, num_src = membership.dst.num_nodes, membership.src.num_nodes
        return _edge_set(num_dst, num_src, edge_index, membership, bipartite, validate,
                         **pattern), None
    if batch is None and ptr is None:
        check_node_counts(num_dst, num_src, bipartite)
        graph = AttentionGraph(num_dst, num_src, bipartite=bipartite, **pattern)
        flag = finite_flag(graph) if finite_flag is not None else None
        return graph, None if flag is None else bool(read_host([flag.reshape(1)])[0][0])
    described = _described_tensors(batch if batch is not None else ptr)
    reuse = (reuse and described is not None and not compiling()
             and (batch is None or ptr is None))
    if reuse:
        key = _reuse_key("batch" if batch is not None else "ptr", num_dst, num_src, bipartite,
                         validate, **pattern)
        graph, inputs_finite = reused_graph(key, described, finite_flag)
        if graph is not None:
            return graph, inputs_finite
        # Compared with at the next call (a batch's membership keeps private copies anyway).
        copies = tuple(t.clone() for t in described) if ptr is not None else None
    flag = finite_flag(None) if finite_flag is not None else None
    membership, extra_values = parse_membership(
        num_dst, num_src, batch, ptr, bipartite, validate,
        [] if flag is None else [flag.reshape(1)])
    graph = AttentionGraph(membership.dst.num_nodes, membership.src.num_nodes,
                           membership=membership, bipartite=bipartite, **pattern)
    if reuse:
        copies = copies or tuple(side.batch for side in membership.sides)
        keep_graph(key, described, copies, graph)
    return graph, bool(extra_values[0][0]) if extra_values else None


def described_ptr_graph(ptr: Tensor, num_dst: int, num_src: int,
                        validate: bool) -> AttentionGraph | None:
    """The graph an earlier call described with this very ``ptr`` tensor (complete graphs, no
    causal band or window, ``validate`` as given there) if ``ptr`` still holds the values it
    was built from, else ``None``: what :func:`describe_graph` would serve such a call, without
    its finite flag (one host read: the comparison)."""
    key = _reuse_key("ptr", num_dst, num_src, num_dst != num_src, validate, causal=False,
                     bottom_right=False, window=None)
    return unchanged_graph(key, ptr)


def _reuse_key(kind: str, num_dst, num_src, bipartite: bool, validate: bool, *, causal: bool,
               bottom_right: bool, window) -> tuple:
    # (validate: a graph derived unchecked is not served to a call that checks)
    return (kind, num_dst, num_src, bipartite, causal, bottom_right, window, validate)


def _edge_set(num_dst: int, num_src: int, edge_index: Tensor, membership: Membership | None,
              bipartite: bool, validate: bool, causal: bool, bottom_right: bool,
              window) -> AttentionGraph:
    """An edge set's graph: the given edges, those inside the causal graph or window kept."""
    edge_index = check_edge_index(edge_index, num_dst, num_src, validate)
    kept, given = None, edge_index.size(1)
    if causal or window is not None:
        kept = band_edges(edge_index, AttentionGraph(
            num_dst, num_src, membership=membership, causal=causal,
            bottom_right=bottom_right, window=window))
        # Indices rather than the mask: selecting by them later reads nothing on the host.
        kept = kept.nonzero().squeeze(1)
        edge_index = edge_index.index_select(1, kept)
    return AttentionGraph(num_dst, num_src, edge_index=edge_index, causal=causal,
                          bipartite=bipartite, bottom_right=bottom_right, window=window,
                          kept_edges=kept, given_edges=given)


def _described_tensors(value) -> tuple[Tensor, ...] | None:
    """The distinct tensors of a ``batch`` / ``ptr`` tensor or ``(dst, src)`` pair; ``None``
    for anything else (the parser then says what is wrong with it)."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            return None
        tensors = (value[0],) if value[1] is value[0] else tuple(value)
    else:
        tensors = (value,)
    return tensors if all(isinstance(t, Tensor) for t in tensors) else None
