"""Batched implicit graphs as one opaque operator for ``torch.compile`` and ``torch.export``.

The dense route groups graphs by size (:class:`~gatattn.graph.SegmentPlan`): it reads their
sizes on the host. Traced, every such read is a graph break, and every new batch of sizes a new
guard and a recompile. ``gatattn::segment_attention`` hides the whole route behind a signature
whose output shape ``(N_dst, H, C_v)`` needs no tensor value; the grouping runs inside, eagerly,
at run time. Its backward is an opaque operator too, so a compiled backward does not break
either. :func:`gatattn.attention` calls it under ``torch.compile`` / ``torch.export`` only: in
eager mode the route runs directly, with its exact second derivatives.

First derivatives are exact: the backward operator recomputes the forward (the same function,
the same kernels) and differentiates it. Second derivatives through the operators are refused.

For ONNX, which cannot run the grouping, :data:`ONNX_DECOMPOSITIONS` states the operator as
dense attention under a block mask built from the graph ids (O(N_dst * N_src) memory).
"""


import contextlib

import torch
from torch import Tensor

from gatattn.backends.sdpa import sdpa_attention
from gatattn.graph import AttentionGraph, build_graph


@torch.library.custom_op("gatattn::segment_attention", mutates_args=())
def segment_attention(q: Tensor, k: Tensor, v: Tensor, batch_dst: Tensor,
                      batch_src: Tensor | None, scale: float, causal: bool) -> Tensor:
    """``(N_dst, H, C_v)`` attention over one complete graph per graph id: ``batch_dst`` holds
    the targets' ids, ``batch_src`` the sources' (``None``: the same nodes, self-attention)."""
    with torch.no_grad():
        return sdpa_attention(q, k, v, _graph(q, k, batch_dst, batch_src, causal), scale=scale)


@segment_attention.register_fake
def _(q, k, v, batch_dst, batch_src, scale, causal):
    return q.new_empty(q.size(0), q.size(1), v.size(2))


@torch.library.custom_op("gatattn::segment_attention_backward", mutates_args=())
def segment_attention_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor,
                               batch_dst: Tensor, batch_src: Tensor | None, scale: float,
                               causal: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients ``(dq, dk, dv)`` of :func:`segment_attention` for ``grad_out``."""
    inputs = [t.detach().requires_grad_() for t in (q, k, v)]
    with _autograd_recording():
        out = sdpa_attention(*inputs, _graph(q, k, batch_dst, batch_src, causal), scale=scale)
        grads = torch.autograd.grad(out, inputs, grad_out, allow_unused=True)
    return tuple(torch.zeros_like(t) if g is None else g
                 for t, g in zip(inputs, grads, strict=True))


@segment_attention_backward.register_fake
def _(grad_out, q, k, v, batch_dst, batch_src, scale, causal):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, batch_dst, batch_src, scale, causal = inputs
    ctx.save_for_backward(q, k, v, batch_dst, batch_src)
    ctx.scale, ctx.causal = scale, causal


def _backward(ctx, grad_out):
    q, k, v, batch_dst, batch_src = ctx.saved_tensors
    dq, dk, dv = segment_attention_backward(grad_out, q, k, v, batch_dst, batch_src, ctx.scale,
                                            ctx.causal)
    return dq, dk, dv, None, None, None, None


def _refuse_double_backward(ctx, *grads):
    raise RuntimeError(
        "second derivatives are not available through gatattn::segment_attention (batched "
        "graphs under torch.compile / torch.export); compute them in eager mode, where every "
        "route is twice differentiable")


segment_attention.register_autograd(_backward, setup_context=_setup_context)
segment_attention_backward.register_autograd(_refuse_double_backward,
                                             setup_context=lambda ctx, inputs, output: None)


@contextlib.contextmanager
def _autograd_recording():
    """Autograd on again inside an operator's implementation: torch.library runs it with the
    autograd dispatch keys excluded, so the recomputed forward would record nothing."""
    keys = torch._C.DispatchKey
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in (keys.AutogradFunctionality, keys.AutogradOther, keys.AutogradNestedTensor):
        exclude = exclude.remove(key)
    include = torch._C._dispatch_tls_local_include_set()
    with torch._C._ForceDispatchKeyGuard(include, exclude), torch.enable_grad():
        yield


def _graph(q: Tensor, k: Tensor, batch_dst: Tensor, batch_src: Tensor | None,
           causal: bool) -> AttentionGraph:
    bipartite = batch_src is not None
    batch = (batch_dst, batch_src) if bipartite else batch_dst
    return build_graph(q.size(0), k.size(0), batch=batch, causal=causal, bipartite=bipartite)


def _masked_dense_attention(q: Tensor, k: Tensor, v: Tensor, batch_dst: Tensor,
                            batch_src: Tensor | None, scale: float, causal: bool) -> Tensor:
    """:func:`segment_attention` as dense attention under a mask built from the graph ids,
    tensor operations only (no host reads), for exporters that cannot run the grouping."""
    same_src = batch_src is None
    batch_src = batch_dst if same_src else batch_src
    allowed = batch_dst.unsqueeze(1) == batch_src.unsqueeze(0)  # (N_dst, N_src)
    if causal:
        pos_dst = _positions(batch_dst)
        pos_src = pos_dst if same_src else _positions(batch_src)
        allowed = allowed & (pos_src.unsqueeze(0) <= pos_dst.unsqueeze(1))
    logits = torch.einsum("ihc,jhc->hij", q, k) * scale
    logits = logits.masked_fill(~allowed, torch.finfo(logits.dtype).min)
    weights = torch.softmax(logits, dim=-1) * allowed  # rows without keys: all zeros
    return torch.einsum("hij,jhc->ihc", weights, v)


def _positions(batch: Tensor) -> Tensor:
    """Each node's position inside its graph: how many earlier nodes share its graph id."""
    same = batch.unsqueeze(1) == batch.unsqueeze(0)
    return same.tril().sum(dim=1) - 1


#: For ``ExportedProgram.run_decompositions`` before ``torch.onnx.export``: the operator as
#: plain tensor operations (dense, masked; O(N_dst * N_src) memory).
ONNX_DECOMPOSITIONS = {torch.ops.gatattn.segment_attention.default: _masked_dense_attention}
