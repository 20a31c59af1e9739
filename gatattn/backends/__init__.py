"""The routes that compute attention. Each takes packed ``(N, H, C)`` tensors and an
:class:`~gatattn.graph.AttentionGraph`; :func:`gatattn.attention` alone chooses between them."""

from gatattn.backends.fused import triton_attention, triton_unavailable_reason
from gatattn.backends.sdpa import sdpa_attention
from gatattn.backends.sparse import sparse_attention

__all__ = ["sdpa_attention", "sparse_attention", "triton_attention", "triton_unavailable_reason"]
