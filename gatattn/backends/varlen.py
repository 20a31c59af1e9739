"""PyTorch's own packed-segment FlashAttention, ``torch.nn.attention.varlen.varlen_attn``, as a
route that ``auto`` races against the Triton kernels on a GPU (not a ``backend=`` name).

It runs what the tiled kernels run, graphs laid end to end and cut by ``cu_seqlens``, and is
maintained by PyTorch (torch >= 2.10): CUDA, float16 / bfloat16, equal query and value head dims
that are multiples of 8 up to 256. Its causal mask and sliding window are aligned bottom-right,
which is our top-left alignment only when each graph has as many targets as sources: so it
serves self-attention graphs (complete, batched, causal, windowed), not bipartite ones.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gatattn.backends.common import empty_output, permute_rows, repeat_kv_heads, unpermute_rows
from gatattn.backends.nonfinite import contain_nonfinite
from gatattn.backends.sdpa import implicit_lse, sdpa_attention
from gatattn.backends.second_order import twice_differentiable
from gatattn.graph import AttentionGraph

_DTYPES = (torch.float16, torch.bfloat16)
_MAX_HEAD_DIM = 256


def varlen_unavailable_reason(q: Tensor, v: Tensor, graph: AttentionGraph) -> str | None:
    """Why ``varlen_attn`` cannot run this call, or ``None`` if it can."""
    if _kernel() is None:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen.varlen_attn"
    if not graph.is_implicit or graph.bipartite:
        return ("varlen_attn serves self-attention graphs only (complete, batched, causal, "
                "windowed)")
    if q.dtype not in _DTYPES:
        return f"varlen_attn computes in float16 / bfloat16, got {q.dtype}"
    head_dim = q.size(-1)
    if v.size(-1) != head_dim or head_dim % 8 or head_dim > _MAX_HEAD_DIM:
        return (f"varlen_attn needs equal query and value head dims, multiples of 8 up to "
                f"{_MAX_HEAD_DIM}, got {head_dim} and {v.size(-1)}")
    if q.device.type != "cuda":
        return f"varlen_attn needs CUDA tensors, got {q.device.type}"
    return None


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, graph: AttentionGraph, *,
                     scale: float, inputs_finite: bool | None = None,
                     return_lse: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """``(N, H, C)`` attention over the self-attention ``graph`` with ``varlen_attn``. Like the
    Triton route: non-finite inputs contained, second derivatives from SDPA's math backend.
    Grouped kv heads are expanded to ``q``'s heads first. ``return_lse``: also the ``(N, H)``
    log-sum-exp, computed as the SDPA route does (:func:`~gatattn.backends.sdpa.implicit_lse`)."""
    k, v = repeat_kv_heads(k, q.size(1)), repeat_kv_heads(v, q.size(1))

    def fast(q, k, v):
        return _packed(q, k, v, graph, scale)

    def recompute(q, k, v):
        return sdpa_attention(q, k, v, graph, scale=scale, math=True)

    (q, k, v), repair = contain_nonfinite(q, k, v, graph, inputs_finite)
    out = repair(twice_differentiable(fast, recompute, q, k, v))
    return (out, repair.lse(implicit_lse(q, k, graph, scale))) if return_lse else out


def _packed(q: Tensor, k: Tensor, v: Tensor, graph: AttentionGraph, scale: float) -> Tensor:
    if q.size(0) == 0:
        return empty_output(q, k, v)
    segments = graph.packed_segments()
    cu_seqlens = segments.cu_seqlens_dst.to(device=q.device, dtype=torch.int32)
    sizes, _ = graph.host_sizes()  # known without a read when ptr was given
    longest = max(sizes)
    order = segments.order_dst
    q, k, v = (permute_rows(t, order).contiguous() for t in (q, k, v))
    # The graph's (left, right) band around the diagonal, -1 for a side without bound.
    window_size = tuple(-1 if side is None else side for side in graph.window_sides())
    out = _kernel()(q, k, v, cu_seqlens, cu_seqlens, longest, longest, scale=scale,
                    window_size=window_size)
    return unpermute_rows(out, order)


def _kernel():
    """``varlen_attn``, or ``None`` in a torch without it (tests put a CPU stand-in here)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn
