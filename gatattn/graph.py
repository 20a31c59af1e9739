"""Which sources each target attends to: one description built from whatever the caller gives.

The caller says nothing (one complete graph), gives ``batch`` or ``ptr`` (one complete graph per
graph of a PyG batch), asks for ``causal`` (a DAG ``j -> i`` iff ``pos(j) <= pos(i) + d`` inside
a graph, see :func:`causal_mode`), gives a bipartite pair of each (cross-attention), or gives an
explicit ``edge_index``.
:func:`build_graph` validates all of it once and returns an :class:`AttentionGraph`; the
backends read that and nothing else.

**Host reads.** Reading a device value on the host (``.item()``, ``.tolist()``, ``int(t)``)
waits for the device to finish; a layer call should do it at most once. :func:`build_graph`
therefore gathers everything the host needs (``ptr``'s values, a batch's graph count and sizes,
the caller's extra flag) into one read, checks ``ptr`` on the host from those values, and
derives the rest from them. A given ``ptr`` is the fused kernels' ``cu_seqlens`` as it is.
With validation switched off (:class:`validation`) a ``ptr`` is not read at all.

**Reuse across layers.** The structure derived from a graph description is cached so that every
layer of a model derives it once per batch. The cache never answers for other contents: plans
for ``ptr`` graphs are keyed by the graph sizes themselves, and an entry for a ``batch`` tensor
keeps a private copy of the ids it was built from and serves only while the tensor still holds
them (checked on the device, read with the rest).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
from torch import Tensor

#: Above this many edges an implicit complete graph is not materialised (for attention weights
#: or the sparse route): its edge_index alone would take 16 bytes per edge.
MAX_MATERIALIZED_EDGES = 2**25

#: Materialised edges are kept with their graph (for every layer) up to this many edges.
MAX_KEPT_EDGES = 2**22

_CACHE_SIZE = 8
_validating = True


class GraphTooLargeError(ValueError):
    """Raised instead of building an O(N^2) object the caller probably did not mean to build."""


#: The values ``causal`` takes, and what each means.
CAUSAL_ALIGNMENTS = {
    False: "not causal",
    True: "top-left: target i sees sources 0..i (SDPA's is_causal)",
    "top_left": "the same as True",
    "bottom_right": "each graph's last target sees its last source, target i sees sources "
                    "0..i + n_src - n_dst (FlashAttention's and varlen_attn's convention)",
}


def causal_mode(causal) -> tuple[bool, bool]:
    """``(causal, bottom_right)`` for a ``causal`` argument (:data:`CAUSAL_ALIGNMENTS`).

    Causal graphs keep the pairs ``pos(j) <= pos(i) + d`` of each graph, with the diagonal
    ``d = 0`` (top-left) or ``d = n_src - n_dst`` (bottom-right); the two alignments differ
    only where a graph has unequal target and source counts (bipartite graphs). Bottom-right
    targets with ``pos(i) < n_dst - n_src`` see no source and get zeros."""
    if isinstance(causal, bool):
        return causal, False
    if isinstance(causal, str) and causal in CAUSAL_ALIGNMENTS:
        return True, causal == "bottom_right"
    raise ValueError(
        f"causal must be one of {', '.join(map(repr, CAUSAL_ALIGNMENTS))}, got {causal!r}")


def validation_enabled() -> bool:
    """Whether gatattn checks input values on the host (see :class:`validation`)."""
    return _validating


def set_validation(enabled: bool) -> None:
    """Switch value checks on or off for the whole process (see :class:`validation`)."""
    global _validating
    _validating = _as_flag(enabled)


class validation:  # noqa: N801 (used as a function: ``with gatattn.validation(False):``)
    """Value checks on or off inside a ``with`` block, restored on exit::

        with gatattn.validation(False):
            out = model(data.x, ptr=data.ptr)

    On (the default), gatattn reads input values on the host to refuse invalid graph
    descriptions with a clear error (``ptr`` not starting at 0, ending elsewhere than the node
    count or decreasing; negative graph ids; out-of-range ``edge_index`` ids) and to learn
    whether ``q``, ``k``, ``v`` are all finite (non-finite ones are then contained exactly):
    one host read per call with ``ptr``; a ``graph=`` call reads nothing and guards instead
    (a non-finite input makes its whole output NaN). Off, nothing is read for checks: an
    invalid ``ptr`` fails only a device-side assertion (``torch._assert_async``), other
    invalid values give errors elsewhere or wrong results, and inputs are assumed finite
    (no repair, no guard). Results on valid, finite inputs are the same. A ``ptr`` graph on
    the fused route then reads nothing on the host; the SDPA route still reads the graph
    sizes, which grouping by size needs, and a ``batch`` is still read (its graph count and
    sizes, or an equality check against the cached structure). Under ``torch.compile`` checks
    are off regardless.
    """

    def __init__(self, enabled: bool) -> None:
        self.enabled = _as_flag(enabled)
        self._outer: bool | None = None

    def __enter__(self) -> validation:
        self._outer = validation_enabled()
        set_validation(self.enabled)
        return self

    def __exit__(self, *exc) -> None:
        set_validation(self._outer)


def _as_flag(enabled) -> bool:
    if not isinstance(enabled, bool):
        raise TypeError(f"validation takes True or False, got {enabled!r}")
    return enabled


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
    when the nodes already lie in that order. ``graph_order`` lists the graph ids in that order.
    ``derived`` holds what a route derives from the plan alone (index tensors), so that every
    layer of a model derives it once per batch; the plan never changes, so neither can they.
    """

    groups: list[SegmentGroup]
    order_dst: Permutation | None = None
    order_src: Permutation | None = None
    graph_order: tuple[int, ...] = (0,)
    derived: dict = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True)
class PackedSegments:
    """The varlen kernels' view of an implicit graph: nodes in graph order (``order_*`` is
    ``None`` when they already are) and segment offsets ``cu_seqlens_*`` of shape (B + 1,)."""

    order_dst: Permutation | None
    order_src: Permutation | None
    cu_seqlens_dst: Tensor
    cu_seqlens_src: Tensor


class Side:
    """One side (targets or sources) of a batch of graphs.

    ``ptr`` ``(B + 1,)`` holds the graph offsets once the nodes are in graph order, which
    ``order`` puts them in (``None``: they already are); ``sizes`` are the graph sizes on the
    host (``None`` until read).
    """

    def __init__(self, num_nodes: int, ptr: Tensor, *, batch: Tensor | None = None,
                 order: Permutation | None = None, sizes: list[int] | None = None) -> None:
        self.num_nodes, self.ptr, self.order, self.sizes = num_nodes, ptr, order, sizes
        self._batch = batch

    def to(self, device) -> Side:
        order = None if self.order is None else Permutation(self.order.forward.to(device),
                                                             self.order.inverse.to(device))
        batch = None if self._batch is None else self._batch.to(device)
        return Side(self.num_nodes, self.ptr.to(device), batch=batch, order=order,
                    sizes=self.sizes)

    @property
    def batch(self) -> Tensor:
        """Graph id per node, derived from ``ptr`` when not given (no host read)."""
        if self._batch is None:
            self._batch = ptr_to_batch(self.ptr, self.num_nodes)
        return self._batch

    def counts(self) -> Tensor:
        """Nodes per graph, on the device."""
        return self.ptr[1:] - self.ptr[:-1]

    def positions(self) -> Tensor:
        """Each node's position inside its graph (order of appearance), no host read."""
        rank = torch.arange(self.num_nodes, device=self.ptr.device)  # position in graph order
        if self.order is None:
            return rank - self.ptr[self.batch]
        nodes = self.order.forward
        positions = torch.empty_like(rank)
        positions[nodes] = rank - self.ptr[self.batch[nodes]]
        return positions


class Membership:
    """Which graph each target and source is in (``src is dst`` for self-attention), and the
    grouping by size derived from it once."""

    def __init__(self, dst: Side, src: Side, num_graphs: int) -> None:
        self.dst, self.src, self.num_graphs = dst, src, num_graphs
        self._plan: SegmentPlan | None = None

    def to(self, device) -> Membership:
        dst = self.dst.to(device)
        return Membership(dst, dst if self.src is self.dst else self.src.to(device),
                          self.num_graphs)

    @property
    def sides(self) -> tuple[Side, ...]:
        return (self.dst,) if self.src is self.dst else (self.dst, self.src)

    def host_sizes(self) -> tuple[list[int], list[int]]:
        unread = [side for side in self.sides if side.sizes is None]
        for side, ptr in zip(unread, read_host([s.ptr for s in unread]), strict=True):
            side.sizes = _differences(ptr)
        return self.dst.sizes, self.src.sizes

    def segment_plan(self) -> SegmentPlan:
        if self._plan is None:
            sizes_dst, sizes_src = self.host_sizes()
            ordered = _ordered_plan(sizes_dst, None if self.src is self.dst else sizes_src,
                                    self.dst.ptr.device)
            if self.dst.order is None and self.src.order is None:
                self._plan = ordered  # the cached plan itself, with what was derived from it
            else:
                self._plan = SegmentPlan(ordered.groups, _then(self.dst.order, ordered.order_dst),
                                         _then(self.src.order, ordered.order_src),
                                         ordered.graph_order)
        return self._plan


@dataclass(frozen=True, repr=False)
class AttentionGraph:
    """An attention pattern over ``num_src`` sources and ``num_dst`` targets: build it with
    :func:`build_graph` once per batch and pass it as ``graph=`` to every call and layer.

    Either ``edge_index`` is set (an arbitrary edge set, source -> target), or the graph is
    implicit: one complete graph per graph of ``membership`` (all nodes in one graph when it is
    ``None``), restricted to ``pos(j) <= pos(i) + d`` when ``causal``: ``d = 0``, or
    ``d = n_src - n_dst`` of the graph with ``bottom_right`` (set only where it differs: on
    bipartite graphs).

    Immutable: what is derived from it (graph sizes, the grouping by size and its node
    permutations, the routes' layouts, materialised edges) is derived once and kept with it,
    and can never describe other contents.
    """

    num_dst: int
    num_src: int
    edge_index: Tensor | None = None
    membership: Membership | None = None
    causal: bool = False
    bipartite: bool = False
    bottom_right: bool = False
    #: With ``causal`` and an explicit edge_index: the indices of the given edges kept.
    kept_edges: Tensor | None = None
    #: With ``kept_edges``: how many edges were given.
    given_edges: int = 0
    #: What routes derive from the graph alone (materialised edges), kept for every layer.
    derived: dict = field(default_factory=dict, compare=False)

    def __repr__(self) -> str:
        causal = {(False, False): "no", (True, False): "top_left",
                  (True, True): "bottom_right"}[(self.causal, self.bottom_right)]
        nodes = (f"{self.num_dst}" if not self.bipartite
                 else f"{self.num_dst} targets x {self.num_src} sources")
        if self.edge_index is not None:
            body = f"edge set, nodes={nodes}, edges={self.edge_index.size(1)}"
        else:
            kind = "complete" if self.membership is None else "batched complete"
            body = f"{kind}, graphs={self.num_graphs}, nodes={nodes}, pairs={self.num_edges()}"
        return f"AttentionGraph({body}, causal={causal}, device={self.device})"

    @property
    def device(self) -> torch.device | None:
        """Where the graph's tensors live (``None``: a single complete graph has none)."""
        if self.edge_index is not None:
            return self.edge_index.device
        return None if self.membership is None else self.membership.dst.ptr.device

    def to(self, device) -> AttentionGraph:
        """The same graph with its tensors on ``device`` (``self`` if they are there)."""
        device = torch.device(device)
        if self.device is None or self.device == device:
            return self
        moved = None if self.membership is None else self.membership.to(device)
        graph = AttentionGraph(
            self.num_dst, self.num_src,
            edge_index=None if self.edge_index is None else self.edge_index.to(device),
            membership=moved, causal=self.causal, bipartite=self.bipartite,
            bottom_right=self.bottom_right,
            kept_edges=None if self.kept_edges is None else self.kept_edges.to(device),
            given_edges=self.given_edges)
        # Sizes travel on the host, so what routes derive there needs no host read either.
        graph.derived["prepared"] = self.derived.get("prepared", False)
        return graph

    @property
    def is_implicit(self) -> bool:
        return self.edge_index is None

    @property
    def num_given_edges(self) -> int:
        """Edges of the given edge set, before a causal graph dropped any (rows of the
        ``edge_attr`` and ``attn_bias`` that come with it)."""
        if self.kept_edges is not None:
            return self.given_edges
        return 0 if self.edge_index is None else self.edge_index.size(1)

    @property
    def num_graphs(self) -> int:
        return 1 if self.membership is None else self.membership.num_graphs

    @property
    def batch_dst(self) -> Tensor | None:
        return None if self.membership is None else self.membership.dst.batch

    @property
    def batch_src(self) -> Tensor | None:
        return None if self.membership is None else self.membership.src.batch

    def host_sizes(self) -> tuple[list[int], list[int]]:
        """Targets and sources per graph, as host lists (read once if not known yet)."""
        if self.membership is None:
            return [self.num_dst], [self.num_src]
        return self.membership.host_sizes()

    def graph_ids(self, device) -> tuple[Tensor, Tensor]:
        """Graph id of every target and every source."""
        if self.membership is None:
            return (torch.zeros(self.num_dst, dtype=torch.long, device=device),
                    torch.zeros(self.num_src, dtype=torch.long, device=device))
        return self.membership.dst.batch, self.membership.src.batch

    def positions(self, device) -> tuple[Tensor, Tensor]:
        """Position of every target and every source inside its graph."""
        if self.membership is None:
            return (torch.arange(self.num_dst, device=device),
                    torch.arange(self.num_src, device=device))
        positions_dst = self.membership.dst.positions()
        if self.membership.src is self.membership.dst:
            return positions_dst, positions_dst
        return positions_dst, self.membership.src.positions()

    def source_counts(self, device) -> Tensor:
        """``(max(num_graphs, 1),)`` sources per graph, on the device."""
        if self.membership is None:
            return torch.tensor([self.num_src], device=device)
        return self.membership.src.counts()

    def diagonal(self, len_dst: int, len_src: int) -> int:
        """The causal diagonal ``d`` of a graph with these sizes: it keeps ``j <= i + d``."""
        return len_src - len_dst if self.bottom_right else 0

    def target_diagonals(self, device) -> Tensor:
        """``(N_dst,)`` the causal diagonal of each target's graph (no host read)."""
        if not self.bottom_right:
            return torch.zeros(self.num_dst, dtype=torch.long, device=device)
        if self.membership is None:
            return torch.full((self.num_dst,), self.num_src - self.num_dst, device=device)
        dst, src = self.membership.dst, self.membership.src
        return (src.counts() - dst.counts()).index_select(0, dst.batch)

    def num_edges(self) -> int:
        if self.edge_index is not None:
            return self.edge_index.size(1)
        sizes = zip(*self.host_sizes(), strict=True)
        if not self.causal:
            return sum(d * s for d, s in sizes)
        return sum(_causal_pair_count(d, s, self.diagonal(d, s)) for d, s in sizes)

    def segment_plan(self) -> SegmentPlan:
        """The grouping of graphs by size used by the dense route (derived once per batch)."""
        if self.membership is None:
            return SegmentPlan([SegmentGroup(1, self.num_dst, self.num_src)])
        return self.membership.segment_plan()

    def packed_segments(self) -> PackedSegments:
        """Graphs laid end to end, each one segment (no grouping by size, no padding): a given
        ``ptr`` as it is."""
        if self.membership is None:
            return PackedSegments(None, None, torch.tensor([0, self.num_dst]),
                                  torch.tensor([0, self.num_src]))
        dst, src = self.membership.dst, self.membership.src
        return PackedSegments(dst.order, src.order, dst.ptr, src.ptr)

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
        edges = self.derived.get("edges")
        if edges is None:
            edges = _complete_edges(self)
            if num_edges <= MAX_KEPT_EDGES:
                self.derived["edges"] = edges
        return edges

    def prepare(self) -> AttentionGraph:
        """Derive now what the routes read later (graph sizes and the grouping by size), so
        that calls with this graph read nothing on the host."""
        if self.membership is not None:
            self.membership.segment_plan()
        self.derived["prepared"] = True  # routes keep what they derive (the CSR) here
        if self.edge_index is not None:
            from gatattn.backends.csr import graph_csr  # (the routes import this module)

            graph_csr(self, self.edge_index)
        return self


def build_graph(
    *,
    edge_index=None,
    batch: Tensor | tuple[Tensor, Tensor] | None = None,
    ptr: Tensor | tuple[Tensor, Tensor] | None = None,
    causal: bool | str = False,
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
                              causal=causal, bipartite=bipartite,
                              validate=not torch.compiler.is_compiling())
    return graph.prepare()


def _private(value):
    """A copy of a tensor or of a pair of them (one copy where both are the same tensor)."""
    if isinstance(value, (tuple, list)):
        first = value[0].clone()
        return first, first if value[1] is value[0] else value[1].clone()
    return None if value is None else value.clone()


def check_graph_devices(device: torch.device | None, **tensors) -> None:
    """The graph's tensors (``edge_index``, ``batch``, ``ptr``, pairs included) on ``device``,
    the inputs' (``None``: on one device), and none on ``meta``: the graph is built from their
    values, which a meta tensor does not hold (reading one raises NotImplementedError)."""
    given = [(name if not isinstance(value, (tuple, list)) else f"{name}[{i}]", t)
             for name, value in tensors.items() if value is not None
             for i, t in enumerate(value if isinstance(value, (tuple, list)) else [value])
             if isinstance(t, Tensor)]
    for name, t in given:
        if t.device.type == "meta" and (device is None or device.type != "meta"):
            # (.to() cannot help: a meta tensor has nothing to copy.)
            where = "the inputs' device" if device is None else f"{device}, where q, k, v are"
            raise ValueError(
                f"{name} is on the meta device, which holds no values, but the graph is built "
                f"from its values; create {name} with its values on {where}")
        expected, source = (device, "q, k, v are") if device is not None else (
            given[0][1].device, f"{given[0][0]} is")
        if t.device != expected:
            raise ValueError(f"{name} is on {t.device} but {source} on {expected}; move it with "
                             f"{name}.to({str(expected)!r})")


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
    bipartite: bool = False,
    validate: bool | None = None,
    finite_flag: Tensor | None = None,
) -> tuple[AttentionGraph, bool | None]:
    """Validate a call's description of the graph and build its :class:`AttentionGraph` (the
    keyword forms of :func:`gatattn.attention`; :func:`build_graph` is the public form).

    ``batch`` / ``ptr`` are tensors, or ``(dst, src)`` pairs when ``bipartite``. ``batch`` need
    not be sorted: a graph's nodes are taken in the order they appear. ``validate`` says whether
    values are checked on the host (default: :func:`validation_enabled`; ``False`` under
    ``torch.compile``). ``finite_flag``, a 0-dim bool tensor (whether the inputs are finite), is
    read in the same host read as the graph; its value comes back second (``None``: not read).
    ``num_dst`` / ``num_src`` ``None``: ``ptr``'s last values (validated ``ptr`` only).
    """
    validate = validation_enabled() if validate is None else validate
    causal, bottom_right = causal_mode(causal)
    bottom_right = bottom_right and bipartite  # self-attention: the same graph as top-left
    extra = [] if finite_flag is None else [finite_flag.reshape(1)]
    membership, extra_values = _membership(num_dst, num_src, batch, ptr, bipartite, validate,
                                           extra)
    if membership is not None:
        num_dst, num_src = membership.dst.num_nodes, membership.src.num_nodes
    inputs_finite = bool(extra_values[0][0]) if extra_values else None
    if edge_index is not None:
        edge_index = _check_edge_index(edge_index, num_dst, num_src, validate)
        kept, given = None, edge_index.size(1)
        if causal:
            kept = _causal_edges(edge_index, AttentionGraph(
                num_dst, num_src, membership=membership, bottom_right=bottom_right))
            # Indices rather than the mask: selecting by them later reads nothing on the host.
            kept = kept.nonzero().squeeze(1)
            edge_index = edge_index.index_select(1, kept)
        return AttentionGraph(num_dst, num_src, edge_index=edge_index, causal=causal,
                              bipartite=bipartite, bottom_right=bottom_right,
                              kept_edges=kept, given_edges=given), inputs_finite
    return AttentionGraph(num_dst, num_src, membership=membership, causal=causal,
                          bipartite=bipartite, bottom_right=bottom_right), inputs_finite


def read_host(parts: list[Tensor]) -> list[list[int]]:
    """The values of several 1-D integer (or bool) tensors on one device, in ONE host read."""
    if not parts:
        return []
    if torch.compiler.is_compiling():
        # Traced, the values would be unbacked symbols that the next read's sizes depend on:
        # break the graph and read them eagerly (fullgraph=True refuses it as unsupported).
        torch._dynamo.graph_break()
    values = torch.cat([p.long() for p in parts]).tolist()  # the one device-to-host read
    bounds = list(itertools.accumulate((p.numel() for p in parts), initial=0))
    return [values[start:end] for start, end in itertools.pairwise(bounds)]


def _membership(num_dst: int, num_src: int, batch, ptr, bipartite: bool, validate: bool,
                extra: list[Tensor]) -> tuple[Membership | None, list[list[int]]]:
    """The :class:`Membership` the caller describes, and ``extra`` read along with it."""
    if num_dst is not None:
        _check_node_counts(num_dst, num_src, bipartite)
    if batch is not None and ptr is not None:
        raise ValueError("got both batch and ptr; give either batch or ptr, not both")
    ptr_dst, ptr_src = _split_pair("ptr", ptr, bipartite)
    if ptr_dst is not None:
        return _from_ptr(ptr_dst, ptr_src, num_dst, num_src, validate, extra)
    batch_dst, batch_src = _split_pair("batch", batch, bipartite)
    if batch_dst is not None:
        return _from_batch(batch_dst, batch_src, num_dst, num_src, validate, extra)
    return None, read_host(extra)


def _from_ptr(ptr_dst: Tensor, ptr_src: Tensor, num_dst: int, num_src: int, validate: bool,
              extra: list[Tensor]) -> tuple[Membership, list[list[int]]]:
    """``ptr`` is used as it is; validated, it is read once (self-attention: one tensor)."""
    same = ptr_src is ptr_dst
    ptr_dst = _ptr_tensor("ptr", ptr_dst)
    ptr_src = ptr_dst if same else _ptr_tensor("ptr", ptr_src)
    ptr_dst, ptr_src = _same_length(ptr_dst, ptr_src)
    sides = [(ptr_dst, num_dst)] if same else [(ptr_dst, num_dst), (ptr_src, num_src)]
    sizes = [None] * len(sides)
    if num_dst is None and not validate:
        raise ValueError("give num_nodes: without validation (under torch.compile) ptr's "
                         "values, which give the node counts, are not read")
    if validate:
        values = read_host([p for p, _ in sides] + extra)
        if num_dst is None:  # the node counts are ptr's last values
            sides = [(p, v[-1]) for (p, _), v in zip(sides, values, strict=False)]
            num_dst, num_src = sides[0][1], sides[-1][1]
            _check_node_counts(num_dst, num_src, bipartite=not same)
        sizes = [_checked_sizes("ptr", v, n)
                 for v, (_, n) in zip(values[:len(sides)], sides, strict=True)]
        extra_values = values[len(sides):]
    else:
        for p, n in sides:
            _assert_ptr_on_device("ptr", p, n)
        extra_values = read_host(extra)
    dst = Side(num_dst, ptr_dst, sizes=sizes[0])
    src = dst if same else Side(num_src, ptr_src, sizes=sizes[1])
    return Membership(dst, src, ptr_dst.numel() - 1), extra_values


def _same_length(ptr_dst: Tensor, ptr_src: Tensor) -> tuple[Tensor, Tensor]:
    """Pads the shorter of a bipartite pair with empty trailing graphs (no host read)."""
    missing = ptr_dst.numel() - ptr_src.numel()
    if missing > 0:
        ptr_src = torch.cat([ptr_src, ptr_src[-1:].expand(missing)])
    elif missing < 0:
        ptr_dst = torch.cat([ptr_dst, ptr_dst[-1:].expand(-missing)])
    return ptr_dst, ptr_src


@dataclass(frozen=True)
class _BatchEntry:
    """The membership derived from batch tensors, with private copies of the ids it came from."""

    ids: tuple[Tensor, ...]
    membership: Membership

    def candidate_for(self, batches: tuple[Tensor, ...]) -> bool:
        return len(self.ids) == len(batches) and all(
            a.shape == b.shape and a.device == b.device
            for a, b in zip(self.ids, batches, strict=True))

    def still_equal(self, batches: tuple[Tensor, ...]) -> list[Tensor]:
        """One device flag per tensor: it still holds the ids the entry was built from."""
        return [(a == b).all().reshape(1) for a, b in zip(self.ids, batches, strict=True)]


_batch_cache: dict[tuple, _BatchEntry] = {}


def _from_batch(batch_dst: Tensor, batch_src: Tensor, num_dst: int, num_src: int,
                validate: bool, extra: list[Tensor]) -> tuple[Membership, list[list[int]]]:
    """Derived once per batch tensor and reused while it holds the same ids: the equality check
    is read together with ``extra``, so a reused batch costs one host read."""
    same = batch_src is batch_dst
    _check_batch("batch", batch_dst, num_dst, "queries (x_dst)")
    if not same:
        _check_batch("batch", batch_src, num_src, "keys (x_src)")
    batches = (batch_dst,) if same else (batch_dst, batch_src)
    if torch.compiler.is_compiling():  # traced: nothing to reuse, no ids to keep
        return _membership_of_ids(tuple(b.long() for b in batches), validate, extra)
    key = (tuple(id(b) for b in batches), num_dst, num_src, torch.is_inference_mode_enabled())
    entry = _batch_cache.get(key)
    read_already = None
    if entry is not None and entry.candidate_for(batches):
        values = read_host(entry.still_equal(batches) + extra)
        read_already = values[len(batches):]
        if all(flag == [1] for flag in values[:len(batches)]):
            return entry.membership, read_already
    # Built from private copies: the membership keeps them.
    ids = tuple(b.long().clone() for b in batches)
    membership, extra_values = _membership_of_ids(ids, validate,
                                                  extra if read_already is None else [])
    if len(_batch_cache) >= _CACHE_SIZE and key not in _batch_cache:
        _batch_cache.pop(next(iter(_batch_cache)))
    _batch_cache[key] = _BatchEntry(ids, membership)
    return membership, extra_values if read_already is None else read_already


def _membership_of_ids(ids: tuple[Tensor, ...], validate: bool,
                       extra: list[Tensor]) -> tuple[Membership, list[list[int]]]:
    """One host read (with ``extra``): each side's id range, whether its nodes are already in
    graph order, and its graph sizes, counted into ``numel + 1`` slots (ids above the node
    count share the last slot; where one does, its sizes take a second read)."""
    # (Unvalidated, a negative id fails index_add_ rather than count as graph 0.)
    slots = [torch.zeros(b.numel() + 1, dtype=torch.long, device=b.device).index_add_(
        0, b.clamp(min=0 if validate else None, max=b.numel()), torch.ones_like(b)) for b in ids]
    summaries = [torch.cat([torch.stack([b.min(), b.max()]) if b.numel() else
                            b.new_tensor([0, -1]), (b[1:] >= b[:-1]).all().reshape(1)])
                 for b in ids]
    values = read_host([t for pair in zip(summaries, slots, strict=True) for t in pair] + extra)
    extra_values = values[2 * len(ids):]
    summaries, slots = values[0:2 * len(ids):2], values[1:2 * len(ids):2]
    nonempty = [s for s, b in zip(summaries, ids, strict=True) if b.numel()]
    low = min((s[0] for s in nonempty), default=0)
    if validate and low < 0:
        raise ValueError(f"batch must hold graph ids >= 0, got min {low}")
    num_graphs = max((s[1] for s in nonempty), default=-1) + 1
    sides = []
    for b, (_, high, ordered), counted in zip(ids, summaries, slots, strict=True):
        if high <= b.numel():  # every id has its own slot
            sizes = (counted + [0] * num_graphs)[:num_graphs]
        else:
            count = torch.zeros(num_graphs, dtype=torch.long, device=b.device)
            [sizes] = read_host([count.index_add_(0, b, torch.ones_like(b))])
        ptr = b.new_tensor([0, *itertools.accumulate(sizes)])
        order = None if ordered else Permutation.of(torch.sort(b, stable=True).indices)
        sides.append(Side(b.numel(), ptr, batch=b, order=order, sizes=sizes))
    dst, src = sides[0], sides[-1]
    return Membership(dst, src, num_graphs), extra_values


def _ordered_plan(sizes_dst: list[int], sizes_src: list[int] | None, device) -> SegmentPlan:
    """The grouping by size of graphs whose nodes lie in graph order, cached by the sizes
    themselves (``sizes_src`` ``None``: self-attention) so that it cannot go stale."""
    key = (tuple(sizes_dst), None if sizes_src is None else tuple(sizes_src), str(device),
           torch.is_inference_mode_enabled())
    plan = _plan_cache.get(key)
    if plan is None:
        plan = _plan_from_sizes(sizes_dst, sizes_src, device)
        if len(_plan_cache) >= _CACHE_SIZE:
            _plan_cache.pop(next(iter(_plan_cache)))
        _plan_cache[key] = plan
    return plan


_plan_cache: dict[tuple, SegmentPlan] = {}


def _plan_from_sizes(sizes_dst: list[int], sizes_src: list[int] | None, device) -> SegmentPlan:
    both = sizes_dst if sizes_src is None else sizes_src
    # Graphs ordered by (len_dst, len_src), stably, so equal shapes become neighbours.
    graph_order = sorted(range(len(sizes_dst)), key=lambda g: (sizes_dst[g], both[g]))
    groups = [SegmentGroup(len(list(members)), d, s) for (d, s), members in itertools.groupby(
        graph_order, key=lambda g: (sizes_dst[g], both[g]))]
    order_dst = _grouped_order(sizes_dst, graph_order, device)
    order_src = order_dst if sizes_src is None else _grouped_order(sizes_src, graph_order, device)
    return SegmentPlan(groups, order_dst, order_src, tuple(graph_order))


def _grouped_order(sizes: list[int], graph_order: list[int], device) -> Permutation | None:
    """The node permutation that lists the graphs (nodes in graph order) in ``graph_order``;
    ``None`` if it is the identity, which the host sizes tell without a read."""
    nonempty = [g for g in graph_order if sizes[g]]
    if all(a < b for a, b in itertools.pairwise(nonempty)):
        return None
    starts = list(itertools.accumulate(sizes, initial=0))
    lengths = [sizes[g] for g in graph_order]
    new_starts = list(itertools.accumulate(lengths, initial=0))[:-1]
    shifts = [starts[g] - new for g, new in zip(graph_order, new_starts, strict=True)]  # old - new
    num_nodes = starts[-1]
    forward = torch.arange(num_nodes, device=device) + torch.repeat_interleave(
        torch.tensor(shifts, device=device), torch.tensor(lengths, device=device),
        output_size=num_nodes)
    return Permutation.of(forward)


def _then(first: Permutation | None, second: Permutation | None) -> Permutation | None:
    """Applying ``first`` then ``second`` as one permutation."""
    if first is None or second is None:
        return second if first is None else first
    return Permutation.of(first.forward[second.forward])


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
    (``None`` each without them). Reads no tensor value with ``validate=False`` (``ptr`` is
    then checked by a device-side assertion), so it traces under ``torch.compile`` without a
    graph break."""
    _check_node_counts(num_dst, num_src, bipartite)
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
    if torch.onnx.is_in_onnx_export():
        # ONNX has no search: count the graph starts at or before each node (O(N * B), less
        # than the dense attention that export runs).
        return (ptr.unsqueeze(0) <= nodes.unsqueeze(1)).sum(1) - 1
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


def _differences(offsets: list[int]) -> list[int]:
    return [b - a for a, b in itertools.pairwise(offsets)]


def _check_node_counts(num_dst: int, num_src: int, bipartite: bool) -> None:
    if not bipartite and num_dst != num_src:
        raise ValueError(
            f"self-attention needs as many queries as keys, got {num_dst} and {num_src}; "
            "pass bipartite=True (or a pair (x_src, x_dst) to the layer) for cross-attention"
        )


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


def _ptr_tensor(name: str, ptr: Tensor) -> Tensor:
    if ptr.dim() != 1 or ptr.numel() < 1 or ptr.is_floating_point():
        raise ValueError(
            f"{name} must be a 1-D integer tensor [0, n_0, n_0 + n_1, ...], got shape "
            f"{tuple(ptr.shape)} and dtype {ptr.dtype}"
        )
    return ptr.long()


def _checked_sizes(name: str, ptr: list[int], num_nodes: int) -> list[int]:
    """Graph sizes from ``ptr``'s host values, which must run from 0 to ``num_nodes``."""
    if ptr[0] != 0 or ptr[-1] != num_nodes:
        raise ValueError(
            f"{name} must start at 0 and end at the number of nodes ({num_nodes}), "
            f"got {ptr[0]} ... {ptr[-1]}")
    sizes = _differences(ptr)
    if min(sizes, default=0) < 0:
        raise ValueError(f"{name} must be non-decreasing, got {ptr[:10]}...")
    return sizes


def _assert_ptr_on_device(name: str, ptr: Tensor, num_nodes: int) -> None:
    """The checks of :func:`_checked_sizes` as a device-side assertion (no host read; on a GPU
    it fails asynchronously)."""
    if torch.onnx.is_in_onnx_export():
        # torch.onnx strips assertions from what it exports, and has no function for cummax,
        # which would stay behind and stop the export.
        return
    non_decreasing = (ptr.cummax(0).values == ptr).all()  # slices would specialise sizes
    valid = (ptr[0] == 0) & (ptr[-1] == num_nodes) & non_decreasing
    # (The message must not format num_nodes: a traced size would be specialised.)
    torch._assert_async(valid, f"{name} must be non-decreasing, start at 0 and end at the "
                        "number of nodes")


def _check_ptr(name: str, ptr: Tensor, num_nodes: int, validate: bool) -> Tensor:
    ptr = _ptr_tensor(name, ptr)
    if validate:
        _checked_sizes(name, read_host([ptr])[0], num_nodes)
    else:
        _assert_ptr_on_device(name, ptr, num_nodes)
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


def _causal_edges(edge_index: Tensor, graph: AttentionGraph) -> Tensor:
    """Boolean mask of the edges ``j -> i`` with ``pos(j) <= pos(i) + d`` (``graph``: the
    implicit graph with the edges' membership and alignment)."""
    pos_dst, pos_src = graph.positions(edge_index.device)
    limit = pos_dst + graph.target_diagonals(edge_index.device)
    return pos_src[edge_index[0]] <= limit[edge_index[1]]


def _causal_pair_count(len_dst: int, len_src: int, diagonal: int) -> int:
    """How many pairs ``0 <= i < len_dst``, ``0 <= j < len_src`` have ``j <= i + diagonal``:
    row ``i`` keeps ``clamp(i + 1 + diagonal, 0, len_src)``, 0 before row ``first``, all from
    row ``full`` on, a linear count between them."""
    shift = 1 + diagonal
    first = min(max(-shift, 0), len_dst)
    full = min(max(len_src - shift, 0), len_dst)
    rows = full - first
    return rows * shift + (first + full - 1) * rows // 2 + (len_dst - full) * len_src


def _complete_edges(graph: AttentionGraph) -> Tensor:
    """All edges of an implicit graph, sorted by target, then by source position."""
    plan = graph.segment_plan()
    device = None if graph.membership is None else graph.membership.dst.ptr.device
    blocks, start_dst, start_src = [], 0, 0
    for g in plan.groups:
        # Row-major (by target, then source); tril_indices knows its size without a read.
        diagonal = graph.diagonal(g.len_dst, g.len_src) if graph.causal else g.len_src
        dst, src = torch.tril_indices(g.len_dst, g.len_src, diagonal, device=device)
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
