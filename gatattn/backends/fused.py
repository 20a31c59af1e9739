"""The fused Triton route (``backend="triton"``): autograd glue, no pointer math.

Implicit graphs reach the tiled dense kernels as packed segments: a sorted PyG batch already is
one (its ``ptr`` is the kernel's ``cu_seqlens``); an unsorted one is first permuted into graph
order; a sliding window's sides ride along (the kernels visit only the tiles that meet each
graph's band). Explicit edge sets reach the CSR kernels in target-major order (cached per
edge_index). An additive bias rides along: stacked per graph in id order (which is the
segments' order) for the tiled kernels, per edge in target-major order for the CSR kernels; the
kernels write its gradient once per element, so it is bitwise deterministic.
"""

from __future__ import annotations

import importlib.util
import math
import os

import torch
from torch import Tensor

from gatattn.backends.common import permute_rows, repeat_kv_heads, unpermute_rows
from gatattn.backends.csr import CSR, graph_csr
from gatattn.backends.nonfinite import contain_nonfinite
from gatattn.backends.sdpa import sdpa_attention
from gatattn.backends.second_order import twice_differentiable
from gatattn.backends.sparse import gathered_attention
from gatattn.graph import AttentionGraph


def triton_unavailable_reason(device: torch.device, dtype: torch.dtype | None = None,
                              implicit: bool = True) -> str | None:
    """Why the Triton route cannot run on ``device`` (for ``dtype`` and the graph kind, where
    given), or ``None`` if it can."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if device.type != "cuda" and not interpreted:
        return (f"the Triton kernels need CUDA tensors (got {device.type}); on CPU they run only "
                "in Triton's interpreter (TRITON_INTERPRET=1), which is for tests")
    if device.type != "cuda" and dtype == torch.bfloat16 and implicit:
        # The tiled kernels' matrix products (tl.dot) give wrong bfloat16 results in the
        # interpreter; the CSR kernels (edge sets) have none.
        return ("Triton's interpreter computes bfloat16 matrix products (tl.dot) wrongly, so "
                "the tiled kernels would return garbage; on CPU use float16 or float32 with "
                "backend='triton', or backend='sdpa' for bfloat16")
    return None


def natural_lse(lse2: Tensor, out: Tensor) -> Tensor:
    """The kernels' ``(H, N)`` base-2 log-sum-exp as ``(N, H)`` natural log. They store
    ``+inf`` for a row whose sum is not positive, for their backward: no source (zero output)
    becomes ``-inf``; a NaN sum (a NaN bias entry, whose output row is NaN) becomes NaN."""
    lse2, out = lse2.t(), out.detach()
    empty = torch.where(out.isnan().any(dim=-1), float("nan"), float("-inf"))
    return torch.where(lse2 == float("inf"), empty, lse2 * math.log(2.0))


def _dlse(grad_lse: Tensor | None) -> Tensor | None:
    """An ``(N, H)`` log-sum-exp gradient in the kernels' ``(H, N)`` float32 layout."""
    return None if grad_lse is None else grad_lse.t().to(torch.float32).contiguous()


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bias, cu_seqlens_q, cu_seqlens_k, scale, causal, bottom_right,
                window, want_lse=False):
        from gatattn.kernels.flash_attention import flash_attention_forward

        out, lse = flash_attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, causal,
                                           bias=bias, bottom_right=bottom_right, window=window)
        ctx.save_for_backward(q, k, v, bias, out, lse, cu_seqlens_q, cu_seqlens_k)
        ctx.scale, ctx.causal, ctx.bottom_right = scale, causal, bottom_right
        ctx.window = window
        return (out, natural_lse(lse, out)) if want_lse else out

    @staticmethod
    def backward(ctx, grad_out, grad_lse=None):
        from gatattn.kernels.flash_attention import flash_attention_backward

        q, k, v, bias, out, lse, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
        dbias = None if bias is None else torch.zeros_like(bias)
        dq, dk, dv = flash_attention_backward(grad_out, q, k, v, out, lse, cu_seqlens_q,
                                              cu_seqlens_k, ctx.scale, ctx.causal, bias=bias,
                                              dbias=dbias, bottom_right=ctx.bottom_right,
                                              dlse=_dlse(grad_lse), window=ctx.window)
        return dq, dk, dv, dbias, None, None, None, None, None, None, None


class _CSRFlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bias, csr: CSR, scale, want_lse=False):
        from gatattn.kernels.csr_attention import csr_attention_forward

        out, lse = csr_attention_forward(q, k, v, csr.row_ptr, csr.col, scale, bias=bias)
        ctx.save_for_backward(q, k, v, bias, out, lse)
        ctx.csr, ctx.scale = csr, scale
        return (out, natural_lse(lse, out)) if want_lse else out

    @staticmethod
    def backward(ctx, grad_out, grad_lse=None):
        from gatattn.kernels.csr_attention import csr_attention_backward

        q, k, v, bias, out, lse = ctx.saved_tensors
        csr = ctx.csr
        dbias = None if bias is None else torch.zeros_like(bias)
        dq, dk, dv = csr_attention_backward(grad_out, q, k, v, out, lse, csr.row_ptr, csr.col,
                                            csr.t_row_ptr, csr.t_col, ctx.scale, bias=bias,
                                            dbias=dbias, t_perm=csr.t_perm, dlse=_dlse(grad_lse))
        return dq, dk, dv, dbias, None, None, None


def triton_attention(q: Tensor, k: Tensor, v: Tensor, graph: AttentionGraph, *,
                     scale: float, bias: Tensor | None = None,
                     inputs_finite: bool | None = None,
                     return_lse: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """``(N_dst, H, C_v)`` attention over ``graph`` with the fused kernels. Second derivatives
    come from a twice-differentiable torch route (SDPA's math backend, or per-edge gathers).
    ``bias``: stacked (implicit graphs, :mod:`gatattn.bias`) or ``(E, H)`` per edge.

    Grouped-query heads (``k``, ``v`` with ``H_kv`` heads): the tiled kernels (implicit graphs)
    read them natively, query head ``h`` reading kv head ``h // (H / H_kv)``, and the gradients
    of ``k`` and ``v`` keep ``H_kv`` heads. ``k`` and ``v`` are expanded to ``H`` heads (H / H_kv
    times their memory) for the CSR kernels (explicit edge sets) only.

    ``return_lse``: also the ``(N_dst, H)`` float32 natural-log log-sum-exp, which the forward
    kernels compute anyway (base 2, converted): differentiable, its gradient folded into the
    backward kernels' ``Delta`` (no extra pass)."""
    if not graph.is_implicit:
        k, v = repeat_kv_heads(k, q.size(1)), repeat_kv_heads(v, q.size(1))

    def fast(q, k, v, bias=None):
        return _fused(q, k, v, bias, graph, scale, return_lse)

    def recompute(q, k, v, bias=None):
        if graph.is_implicit:
            return sdpa_attention(q, k, v, graph, scale=scale, math=True, bias=bias,
                                  return_lse=return_lse)
        src, dst = graph.edge_index
        out, _, lse = gathered_attention(q, k, v, src, dst, scale, None, 0.0, bias=bias,
                                         return_lse=True)
        return (out, lse) if return_lse else out

    inputs = (q, k, v) if bias is None else (q, k, v, bias)
    if not graph.is_implicit:
        return twice_differentiable(fast, recompute, *inputs)
    (q, k, v), repair = contain_nonfinite(q, k, v, graph, inputs_finite)
    inputs = (q, k, v) + inputs[3:]
    if not return_lse:
        return repair(twice_differentiable(fast, recompute, *inputs))
    out, lse = twice_differentiable(fast, recompute, *inputs)
    return repair(out), repair.lse(lse)


def _fused(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, graph: AttentionGraph,
           scale: float, want_lse: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    # A size-1 channel dim counts as contiguous whatever its stride; the kernels need stride 1.
    q, k, v = (t if t.stride(-1) == 1 else t.clone(memory_format=torch.contiguous_format)
               for t in (q, k, v))
    if not graph.is_implicit:
        csr = graph_csr(graph, graph.edge_index)
        return _CSRFlashAttention.apply(q, k, v, csr.in_target_order(bias), csr, scale,
                                        want_lse)
    segments = graph.packed_segments()
    cu_seqlens_q = segments.cu_seqlens_dst.to(device=q.device, dtype=torch.int32)
    cu_seqlens_k = segments.cu_seqlens_src.to(device=q.device, dtype=torch.int32)
    result = _FlashAttention.apply(
        permute_rows(q, segments.order_dst), permute_rows(k, segments.order_src),
        permute_rows(v, segments.order_src), bias, cu_seqlens_q, cu_seqlens_k, scale,
        graph.causal, graph.bottom_right, graph.window_sides(), want_lse)
    if not want_lse:
        return unpermute_rows(result, segments.order_dst)
    return tuple(unpermute_rows(t, segments.order_dst) for t in result)
