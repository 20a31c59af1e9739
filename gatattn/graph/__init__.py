"""Which sources each target attends to: one description built from whatever the caller gives.

:func:`build_graph` validates a description (nothing, ``batch``, ``ptr``, ``causal``, bipartite
pairs, an ``edge_index``) once and returns an :class:`AttentionGraph`; the backends read that and
nothing else. The package's modules, one job each:

- :mod:`~gatattn.graph.switches`: ``causal`` alignments and the validation switch;
- :mod:`~gatattn.graph.checks`: checks of the caller's description;
- :mod:`~gatattn.graph.membership`: which graph each node is in, parsed from ``batch`` / ``ptr``
  in one host read;
- :mod:`~gatattn.graph.plan`: node orders and the grouping of graphs by size;
- :mod:`~gatattn.graph.edges`: edge-set checks, the causal filter, materialised edges;
- :mod:`~gatattn.graph.attention_graph`: the immutable graph and what is derived from it;
- :mod:`~gatattn.graph.build`: :func:`build_graph` and a call's :func:`describe_graph`;
- :mod:`~gatattn.graph.reuse`: the graphs of keyword descriptions, kept for the next layer.

**Reuse across layers.** The graph a call's ``batch`` / ``ptr`` describes is kept
(:mod:`~gatattn.graph.reuse`) so that every layer of a model derives it once per batch. The
cache never answers for other contents: an entry keeps a private copy of the tensors it was
built from and serves only while they still hold those values (checked on the device, read
with the rest), and the grouping by size is keyed by the graph sizes themselves.
"""

from gatattn.graph.attention_graph import AttentionGraph, GraphTooLargeError
from gatattn.graph.build import build_graph, describe_graph, described_ptr_graph
from gatattn.graph.checks import check_graph_devices
from gatattn.graph.membership import (
    Membership,
    Side,
    graph_membership,
    local_positions,
    parse_membership,
    ptr_to_batch,
    read_host,
)
from gatattn.graph.plan import PackedSegments, Permutation, SegmentGroup, SegmentPlan
from gatattn.graph.switches import (
    CAUSAL_ALIGNMENTS,
    causal_mode,
    set_validation,
    validation,
    validation_enabled,
)

#: Above this many edges an implicit complete graph is not materialised (for attention weights
#: or the sparse route): its edge_index alone would take 16 bytes per edge. Read at each use, so
#: setting ``gatattn.graph.MAX_MATERIALIZED_EDGES`` changes it.
MAX_MATERIALIZED_EDGES = 2**25

#: Materialised edges are kept with their graph (for every layer) up to this many edges.
MAX_KEPT_EDGES = 2**22

__all__ = [
    "CAUSAL_ALIGNMENTS",
    "MAX_KEPT_EDGES",
    "MAX_MATERIALIZED_EDGES",
    "AttentionGraph",
    "GraphTooLargeError",
    "Membership",
    "PackedSegments",
    "Permutation",
    "SegmentGroup",
    "SegmentPlan",
    "Side",
    "build_graph",
    "causal_mode",
    "check_graph_devices",
    "describe_graph",
    "described_ptr_graph",
    "graph_membership",
    "local_positions",
    "parse_membership",
    "ptr_to_batch",
    "read_host",
    "set_validation",
    "validation",
    "validation_enabled",
]
