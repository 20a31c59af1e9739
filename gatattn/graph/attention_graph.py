"""The attention graph as one immutable object, and what is derived from it once and kept.

What is derived from a graph (graph sizes, the grouping by size and its node permutations, the
routes' layouts, materialised edges) is derived lazily, kept with it for every layer, and can
never describe other contents: the graph never changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

import gatattn.graph as limits  # the package: a caller sets its MAX_*_EDGES limits there
from gatattn.graph.edges import band_pair_count, complete_edges
from gatattn.graph.membership import Membership
from gatattn.graph.plan import PackedSegments, SegmentGroup, SegmentPlan
from gatattn.graph.switches import Window
from gatattn.transforms import compiling

if TYPE_CHECKING:
    from gatattn.backends.csr import CSR


class GraphTooLargeError(ValueError):
    """Raised instead of building an O(N^2) object the caller probably did not mean to build."""


@dataclass(frozen=True, repr=False)
class AttentionGraph:
    """An attention pattern over ``num_src`` sources and ``num_dst`` targets: build it with
    :func:`build_graph` once per batch and pass it as ``graph=`` to every call and layer.

    Either ``edge_index`` is set (an arbitrary edge set, source -> target), or the graph is
    implicit: one complete graph per graph of ``membership`` (all nodes in one graph when it is
    ``None``), restricted to ``pos(j) <= pos(i) + d`` when ``causal``: ``d = 0``, or
    ``d = n_src - n_dst`` of the graph with ``bottom_right`` (set only where it differs: on
    bipartite graphs), and to ``pos(i) + d - left <= pos(j) <= pos(i) + d + right`` with a
    ``window`` ``(left, right)`` (``None``: no bound on that side; causal: ``right = 0``). An
    edge set keeps its edges inside that band.

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
    #: ``(left, right)`` of a sliding window (:func:`~gatattn.graph.switches.window_mode`).
    window: Window | None = None
    #: With ``causal`` or ``window`` and an explicit edge_index: the indices of the given
    #: edges kept.
    kept_edges: Tensor | None = None
    #: With ``kept_edges``: how many edges were given.
    given_edges: int = 0
    # What routes derive from the graph alone, filled in lazily by :meth:`keep` and kept for
    # every layer. Not set by __init__ (a graph per call costs nothing for them): until kept,
    # they read as these defaults.
    #: :meth:`prepare` ran: routes may derive their structure without a host read.
    prepared: bool = field(default=False, init=False, compare=False)
    #: The materialised edges of an implicit graph (up to ``MAX_KEPT_EDGES``).
    materialized_edges: Tensor | None = field(default=None, init=False, compare=False)
    #: The CSR of an edge set (:func:`gatattn.backends.csr.graph_csr`).
    csr: CSR | None = field(default=None, init=False, compare=False)
    #: The steps planned for ``graph=`` calls, keyed by everything the route choice reads
    #: (:func:`gatattn.backends.routing.planned_step`).
    planned_steps: dict = field(default_factory=dict, init=False, compare=False)

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
        window = "" if self.window is None else f", window={self.window}"
        return f"AttentionGraph({body}, causal={causal}{window}, device={self.device})"

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
            bottom_right=self.bottom_right, window=self.window,
            kept_edges=None if self.kept_edges is None else self.kept_edges.to(device),
            given_edges=self.given_edges)
        # Sizes travel on the host, so what routes derive there needs no host read either.
        graph.keep(prepared=self.prepared)
        return graph

    @property
    def is_implicit(self) -> bool:
        return self.edge_index is None

    @property
    def banded(self) -> bool:
        """Causal or windowed: not every pair of a graph is kept."""
        return self.causal or self.window is not None

    @property
    def num_given_edges(self) -> int:
        """Edges of the given edge set, before a causal graph or a window dropped any (rows of the
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

    def window_sides(self) -> Window:
        """``(left, right)`` bounds around the diagonal, ``None`` where there is none (causal:
        ``right`` 0)."""
        left, right = (None, None) if self.window is None else self.window
        return left, 0 if self.causal else right

    def band(self, len_dst: int, len_src: int) -> tuple[int | None, int | None]:
        """``(low, high)``: a graph with these sizes keeps ``pos(i) + low <= pos(j) <= pos(i) +
        high`` (``None``: no bound on that side; ``(None, None)``: every pair)."""
        left, right = self.window_sides()
        diagonal = self.diagonal(len_dst, len_src)
        return (None if left is None else diagonal - left,
                None if right is None else diagonal + right)

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
        # Per size group, not per graph: a route asks on every call.
        return sum(g.count * band_pair_count(g.len_dst, g.len_src, *self.band(g.len_dst, g.len_src))
                   for g in self.segment_plan().groups)

    def segment_plan(self) -> SegmentPlan:
        """The grouping of graphs by size used by the dense route (derived once per batch)."""
        if self.membership is None:
            if compiling():  # (traced sizes may be symbolic: no Python cache)
                return SegmentPlan([SegmentGroup(1, self.num_dst, self.num_src)])
            return _one_graph_plan(self.num_dst, self.num_src)
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
        limit = limits.MAX_MATERIALIZED_EDGES
        if num_edges > limit:
            raise GraphTooLargeError(
                f"materialising this complete graph needs {num_edges:,} edges, above the limit "
                f"of {limit:,} (gatattn.graph.MAX_MATERIALIZED_EDGES); drop "
                "return_attention_weights / edge_attr, or attend over an explicit sparse "
                "edge_index"
            )
        edges = self.materialized_edges
        if edges is None:
            edges = complete_edges(self)
            if num_edges <= limits.MAX_KEPT_EDGES:
                self.keep(materialized_edges=edges)
        return edges

    def keep(self, **derived) -> None:
        """Keep what a route derived from this graph alone (``prepared``,
        ``materialized_edges``, ``csr``): the graph never changes, so neither can they."""
        for name, value in derived.items():
            if name not in _DERIVED:
                raise AttributeError(f"an AttentionGraph keeps {sorted(_DERIVED)}, not {name!r}")
            object.__setattr__(self, name, value)  # (frozen: its description never changes)

    def prepare(self) -> AttentionGraph:
        """Derive now what the routes read later (graph sizes and the grouping by size), so
        that calls with this graph read nothing on the host."""
        if self.membership is not None:
            self.membership.segment_plan()
        self.keep(prepared=True)  # routes keep what they derive (the CSR) with the graph
        if self.edge_index is not None:
            from gatattn.backends.csr import graph_csr  # (the routes import this module)

            graph_csr(self, self.edge_index)
        return self


_DERIVED = frozenset({"prepared", "materialized_edges", "csr"})


_one_graph_plans: dict[tuple[int, int], SegmentPlan] = {}


def _one_graph_plan(num_dst: int, num_src: int) -> SegmentPlan:
    """The plan of one complete graph: it depends on the sizes alone, so graphs of equal sizes
    share it (built once, not per call)."""
    plan = _one_graph_plans.get((num_dst, num_src))
    if plan is None:
        plan = SegmentPlan([SegmentGroup(1, num_dst, num_src)])
        if len(_one_graph_plans) < 64:  # (distinct sizes: a handful in a model)
            _one_graph_plans[num_dst, num_src] = plan
    return plan
