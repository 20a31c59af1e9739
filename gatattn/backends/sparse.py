"""Attention as GAT-style message passing over an explicit edge set.

Per-edge logits ``<q_i, k_j>``, a softmax over each target's in-edges, a weighted sum of the
source values: what :class:`torch_geometric.nn.TransformerConv` computes, for any graph.

The lean route never forms per-edge ``(E, H, C)`` messages. With the edges in CSR order
(:mod:`gatattn.backends.csr`) the logits are a sampled dense-dense product (SDDMM) and the
aggregation a sparse-dense product (SpMM), per head; a custom autograd keeps only ``q, k, v``
and the ``(E, H)`` weights, and its backward is again SDDMMs and SpMMs:

    dV = W^T dO,  dW_e = <dO_i, v_j>,  dS = A * (dA - rowsum(A * dA)),  dQ = s dS K,  dK = s dS^T Q

An additive ``(E, H)`` bias joins the logits; its gradient is ``dS`` itself, one value per edge
(deterministic).

Edge features are themselves ``(E, H, C)``, so with ``edge_attr`` the route gathers per-edge
rows as TransformerConv does; so it does under ``torch.compile``, which cannot trace sparse CSR
tensors.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch_geometric.utils import scatter

from gatattn.backends.common import repeat_kv_heads
from gatattn.backends.csr import CSR, csr_of, graph_csr
from gatattn.backends.native import cpu_kernels
from gatattn.backends.second_order import recorded_grads, recording_backward
from gatattn.graph import AttentionGraph
from gatattn.transforms import ops_watched


def sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    edge_index: Tensor,
    *,
    scale: float,
    dropout: float = 0.0,
    edge_attr: Tensor | None = None,
    bias: Tensor | None = None,
    differentiable_weights: bool = False,
    graph: AttentionGraph | None = None,
    form: str = "csr",
    return_lse: bool = False,
) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]:
    """Returns the ``(N_dst, H, C_v)`` output and the ``(E, H)`` attention weights (before
    dropout, in the order of ``edge_index``; differentiable only if asked). ``form``:
    ``"csr"`` or ``"gathered"`` (per-edge gathers), as :mod:`gatattn.backends.routing`
    chooses; only the gathered form takes ``edge_attr``, forms differentiable weights and
    traces under ``torch.compile``. ``bias``: ``(E, H)`` added to the logits, in the order of
    ``edge_index``. Targets without in-edges get zeros. Twice differentiable. Grouped-query
    heads: ``k``, ``v`` with ``H_kv`` heads are expanded to ``q``'s ``H`` heads first (H / H_kv
    times their memory). ``graph``: the graph whose edges ``edge_index`` are, which may keep
    their :class:`CSR` (else it is cached per ``edge_index``). ``return_lse``: also each
    target's ``(N_dst, H)`` log-sum-exp (natural log, before dropout; ``-inf`` without edges),
    from the per-target maximum and sum the softmax forms anyway, differentiable (twice); in
    the compute dtype (float32 for half precision)."""
    k, v = repeat_kv_heads(k, q.size(1)), repeat_kv_heads(v, q.size(1))
    if form == "gathered":
        src, dst = edge_index
        keep = _keep_mask((src.numel(), q.size(1)), dropout, q.device)
        result = gathered_attention(q, k, v, src, dst, scale, keep, dropout, edge_attr, bias,
                                    return_lse)
        if return_lse:  # the logits are in q's dtype here
            return *result[:2], result[2].to(_compute_dtype(q))
        return result
    if form != "csr" or edge_attr is not None or differentiable_weights:
        raise ValueError(f"form must be 'csr' or 'gathered', got {form!r}; edge features and "
                         "differentiable weights need the gathered form")
    csr = csr_of(edge_index, q.size(0), k.size(0)) if graph is None else graph_csr(
        graph, edge_index)
    keep = _keep_mask((csr.num_edges, q.size(1)), dropout, q.device)
    result = _CSRAttention.apply(q, k, v, csr.in_target_order(bias), csr, scale, keep,
                                 dropout, return_lse)
    return result[0], csr.in_callers_order(result[1]), *result[2:]


class _CSRAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bias: Tensor | None, csr: CSR, scale: float, keep: Tensor | None,
                dropout: float, want_lse: bool = False):
        dtype = _compute_dtype(q)
        kernels = _native_kernels(q, keep)
        if kernels is not None:  # one pass over each target's edges (gatattn/csrc)
            out, alpha, lse = kernels.forward(
                *(_node_major(t, dtype) for t in (q, k, v)),
                None if bias is None else _node_major(bias, dtype), csr.row_ptr, csr.col, scale)
            lse = [lse] if want_lse else []
        else:
            q_h, k_h, v_h = (_by_head(t, dtype) for t in (q, k, v))  # (H, N, C)
            logits = _sddmm(csr, q_h, k_h) * scale  # (E, H)
            if bias is not None:  # target-major, as the logits
                logits = logits + bias.to(dtype)
            alpha = edge_softmax(logits, csr.row, csr.num_dst, return_lse=want_lse)
            alpha, *lse = alpha if want_lse else (alpha,)
            out = _spmm(csr.head_matrices(_dropped(alpha, keep, dropout)), v_h)  # (N_dst, H, C_v)
        # The kernels' backward reads each target's shift off the output (no gather of the
        # values); in float32 / float64 the output returned (half precision: its float32 form).
        ctx.save_for_backward(q, k, v, bias, alpha, keep, out if kernels is not None else None)
        ctx.csr, ctx.scale, ctx.dropout, ctx.kernels = csr, scale, dropout, kernels
        # The weights take no gradient: not materialised, their zeros would cost an (E, H) fill.
        ctx.set_materialize_grads(False)
        alpha_out = alpha.to(q.dtype)
        ctx.mark_non_differentiable(alpha_out)
        return out.to(q.dtype), alpha_out, *lse

    @staticmethod
    def backward(ctx, grad_out, _grad_alpha, grad_lse=None):
        q, k, v, bias, alpha, keep, out = ctx.saved_tensors
        if grad_out is None:  # only the lse was used
            grad_out = q.new_zeros(q.size(0), q.size(1), v.size(2))
        csr, scale, dropout = ctx.csr, ctx.scale, ctx.dropout
        if recording_backward():  # create_graph=True: differentiable gradients, same function
            inputs = (q, k, v) if bias is None else (q, k, v, bias)

            def recompute(q, k, v, bias=None):
                out, _, lse = gathered_attention(q, k, v, csr.col, csr.row, scale, keep,
                                                 dropout, None, bias, return_lse=True)
                return out, lse

            grads = recorded_grads(recompute, inputs, ctx.needs_input_grad[:len(inputs)],
                                   (grad_out, grad_lse))
            grad_bias = grads[3] if bias is not None else None
            return *grads[:3], grad_bias, None, None, None, None, None
        if ctx.kernels is not None:
            return (*_native_backward(ctx, q, k, v, bias, alpha, out, grad_out, grad_lse),
                    None, None, None, None, None)
        need_q, need_k, need_v, need_bias = ctx.needs_input_grad[:4]
        # Head-major views, not copies: the saved q, k, v are alive anyway, and the products
        # below copy one head at a time at most.
        q_h, k_h, v_h = (t.to(alpha.dtype).transpose(0, 1) for t in (q, k, v))
        grad_h = _by_head(grad_out, alpha.dtype)  # (H, N_dst, C_v)
        dv = (_spmm(csr.head_matrices(_dropped(alpha, keep, dropout), transposed=True), grad_h)
              if need_v else None)
        dq = dk = dbias = None
        if need_q or need_k or need_bias:
            grad_alpha = _dropped(_sddmm(csr, grad_h, v_h), keep, dropout)  # (E, H)
            row_sum = scatter(alpha * grad_alpha, csr.row, 0, dim_size=csr.num_dst, reduce="sum")
            if grad_lse is not None:  # d lse_i / d s_e = alpha_e: one more term in the shift
                row_sum = row_sum - grad_lse.to(alpha.dtype)
            grad_s = alpha * (grad_alpha - row_sum.index_select(0, csr.row))  # dLoss/dLogits
            dbias = grad_s.to(bias.dtype) if need_bias else None
            grad_logits = grad_s * scale
            dq = _spmm(csr.head_matrices(grad_logits), k_h) if need_q else None
            dk = (_spmm(csr.head_matrices(grad_logits, transposed=True), q_h) if need_k
                  else None)
        dtype = grad_out.dtype
        return (*(None if g is None else g.to(dtype) for g in (dq, dk, dv)), dbias, None, None,
                None, None, None)


def edge_softmax(logits: Tensor, index: Tensor, num_nodes: int | None,
                 return_lse: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """``(E, H)`` softmax of ``logits`` over each target's edges (``index``: each edge's target),
    as PyG's ``softmax``, except that a target whose logits are all ``-inf`` (every edge removed
    by a ``-inf`` bias) gets zero weights and zero gradients, as in the reference: PyG subtracts
    that ``-inf`` maximum (NaN). NaN and ``+inf`` logits still propagate. Twice differentiable.
    ``return_lse``: also the ``(num_nodes, H)`` log-sum-exp from the same maximum and sum
    (``-inf``, with a zero gradient, for a target without edges or with all removed)."""
    row_max = scatter(logits.detach(), index, 0, dim_size=num_nodes, reduce="max")
    row_max = row_max.masked_fill(row_max == float("-inf"), 0.0)
    unnormalised = (logits - row_max.index_select(0, index)).exp()
    total = scatter(unnormalised, index, 0, dim_size=num_nodes, reduce="sum")
    # Only a removed target's sum is 0 (a row's maximum contributes exp(0) = 1); dividing by 1
    # leaves its zeros (PyG's + 1e-16 vanishes in half precision).
    safe_total = torch.where(total > 0, total, torch.ones_like(total))
    alpha = unnormalised / safe_total.index_select(0, index)
    if not return_lse:
        return alpha
    # The maximum is detached: lse's derivative through it is 1 - 1 = 0. A NaN sum stays NaN.
    empty = total == 0
    lse = row_max + torch.where(empty, torch.ones_like(total), total).log()
    return alpha, lse.masked_fill(empty, float("-inf"))


def _keep_mask(shape: tuple[int, int], dropout: float, device) -> Tensor | None:
    """Which edges' weights dropout keeps; drawn outside the autograd Functions so that a
    recorded backward replays the same mask."""
    return torch.rand(shape, device=device) >= dropout if dropout > 0 else None


def _compute_dtype(x: Tensor) -> torch.dtype:
    """CPU sparse kernels take float32/float64 only; half precision is computed in float32."""
    return x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32


def _native_kernels(q: Tensor, keep: Tensor | None):
    """The compiled kernels where they compute this call (CPU, no dropout, no dispatch mode
    watching the ops), else ``None``."""
    return (cpu_kernels() if q.device.type == "cpu" and keep is None and not ops_watched()
            else None)


def _native_backward(ctx, q, k, v, bias, alpha, out, grad_out, grad_lse):
    """``dq, dk, dv, dbias`` from the compiled kernels: per target the softmax's shift from
    the output, per source (along the transpose) the logits' gradient, ``dk`` and ``dv``, per
    target ``dq``."""
    need_q, need_k, need_v, need_bias = ctx.needs_input_grad[:4]
    csr, dtype = ctx.csr, alpha.dtype
    dq, dk, dv, grad_s = ctx.kernels.backward(
        *(_node_major(t, dtype) for t in (q, k, v)), alpha, out, _node_major(grad_out, dtype),
        None if grad_lse is None else _node_major(grad_lse, dtype), csr.row_ptr, csr.col,
        csr.t_row_ptr, csr.t_col, csr.t_perm, ctx.scale, need_q, need_k, need_v)
    grads = (g.to(grad_out.dtype) if need else None
             for g, need in ((dq, need_q), (dk, need_k), (dv, need_v)))
    return *grads, grad_s.to(bias.dtype) if need_bias else None


def _node_major(x: Tensor, dtype: torch.dtype) -> Tensor:
    return x.to(dtype).contiguous()


def _by_head(x: Tensor, dtype: torch.dtype) -> Tensor:
    return x.to(dtype).transpose(0, 1).contiguous()


def _dropped(alpha: Tensor, keep: Tensor | None, dropout: float) -> Tensor:
    return alpha if keep is None else alpha * keep / (1.0 - dropout)


def _sddmm(csr: CSR, a: Tensor, b: Tensor) -> Tensor:
    """``(E, H)``: ``<a[h, target], b[h, source]>`` for every edge, per head."""
    if csr.num_edges > csr.num_dst * csr.num_src:
        # More edges than pairs (duplicates): sampled_addmm refuses such a pattern, and a
        # per-edge product costs no more than the dense graph here.
        return (a.index_select(1, csr.row) * b.index_select(1, csr.col)).sum(-1).t()
    pattern = csr.matrix(a.new_zeros(csr.num_edges))
    return torch.stack([
        torch.sparse.sampled_addmm(pattern, a[h], b[h].t(), beta=0.0).values()
        for h in range(a.size(0))], dim=1)


def _spmm(matrices: list[Tensor], x: Tensor) -> Tensor:
    """``(rows, H, C)``: per head, the head's sparse matrix times ``x[h]``."""
    return torch.stack([matrix @ x[h] for h, matrix in enumerate(matrices)], dim=1)


def gathered_attention(q, k, v, src, dst, scale, keep, dropout, edge_attr=None, bias=None,
                       return_lse=False):
    """The route written with per-edge gathers, as TransformerConv is: twice differentiable,
    traceable by torch.compile, and the only form that takes per-edge ``edge_attr``. ``bias``
    is ``(E, H)`` in the order of ``src`` / ``dst``. Returns ``(out, alpha)``, and each
    target's log-sum-exp (:func:`edge_softmax`) third if ``return_lse``."""
    key_j = k.index_select(0, src)  # (E, H, C)
    value_j = v.index_select(0, src)  # (E, H, C_v)
    if edge_attr is not None:
        key_j, value_j = key_j + edge_attr, value_j + edge_attr
    logits = (q.index_select(0, dst) * key_j).sum(dim=-1) * scale  # (E, H)
    if bias is not None:
        logits = logits + bias
    alpha = edge_softmax(logits, dst, q.size(0), return_lse=return_lse)
    alpha, *lse = alpha if return_lse else (alpha,)
    weights = _dropped(alpha, keep, dropout)
    out = scatter(value_j * weights.unsqueeze(-1), dst, dim=0, dim_size=q.size(0), reduce="sum")
    return out, alpha, *lse
