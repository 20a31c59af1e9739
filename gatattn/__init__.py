"""gatattn: self-attention is graph attention on a complete graph.

``gatattn.attention`` computes multi-head scaled-dot-product attention over any graph and picks
the route itself; ``gatattn.SelfAttentionConv`` is the PyG layer; ``gatattn.reference`` is the
plain statement of the math that every route is tested against.
"""

from gatattn import bias, reference
from gatattn.backends.ops import ONNX_DECOMPOSITIONS
from gatattn.backends.racing import RouteRejectedWarning, route_choices
from gatattn.backends.routing import BackendUnavailableError
from gatattn.bias import stacked_from_padded, stacked_to_dense
from gatattn.conv import SelfAttentionConv
from gatattn.convert import (
    attention_to_networkx,
    edge_index_to_mask,
    graph_to_sequences,
    mask_to_edge_index,
    networkx_to_edge_index,
    sequences_to_graph,
)
from gatattn.functional import attention
from gatattn.gps import GPSConv
from gatattn.graph import (
    MAX_MATERIALIZED_EDGES,
    AttentionGraph,
    GraphTooLargeError,
    build_graph,
    set_validation,
    validation,
    validation_enabled,
)
from gatattn.merge import merge_attention
from gatattn.multihead import (
    MultiheadAttention,
    MultiheadAttentionInputError,
    MultiheadAttentionMaskError,
)
from gatattn.positional import SpatialEncoding, graph_positional_encoding, sinusoidal_encoding

__version__ = "0.1.0"

__all__ = [
    "AttentionGraph",
    "BackendUnavailableError",
    "GPSConv",
    "GraphTooLargeError",
    "MAX_MATERIALIZED_EDGES",
    "ONNX_DECOMPOSITIONS",
    "MultiheadAttention",
    "MultiheadAttentionInputError",
    "MultiheadAttentionMaskError",
    "RouteRejectedWarning",
    "SelfAttentionConv",
    "SpatialEncoding",
    "attention",
    "attention_to_networkx",
    "bias",
    "build_graph",
    "edge_index_to_mask",
    "graph_positional_encoding",
    "graph_to_sequences",
    "mask_to_edge_index",
    "merge_attention",
    "networkx_to_edge_index",
    "reference",
    "route_choices",
    "sequences_to_graph",
    "set_validation",
    "sinusoidal_encoding",
    "stacked_from_padded",
    "stacked_to_dense",
    "validation",
    "validation_enabled",
]
