"""Attention over an arbitrary edge set in CSR form: one program per (target row, head).

A program walks its row's in-edges in blocks of ``BLOCK_N``, gathers the source rows of K and
V, and keeps an online softmax in fp32 (base 2, ``log2(e)`` folded into the scale), as the
dense kernels do; it stores the output and the row's log-sum-exp. Per-edge messages never
exist in memory.

Backward without atomics: the dQ pass walks the same rows; the dK/dV pass walks the transposed
CSR (one program per (source row, head), over its out-edges), reading each target's stored
log-sum-exp and ``Delta = <dO, O>``. A row with no edge gets a zero output, never NaN.

An optional per-edge bias ``(E, H)`` in target-major order (``HAS_BIAS``) joins the logits; the
dK/dV pass reads it through ``t_perm`` (each source-major edge's target-major position), and the
dQ pass, which owns each edge once, writes its gradient ``dS`` (no atomics).

The kernels know nothing of graphs beyond the CSR arrays: ``row_ptr`` (rows + 1,), ``col``
(E,) and, for the transpose, ``t_row_ptr`` / ``t_col``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gatattn.kernels.common import COMPILE_OPTIONS, LOG2E, base2, kernel_constants, softmax_delta

BLOCK_N = 32  # in-edges per step of a row's walk


@triton.jit
def _gather(Ptr, rows, stride_m, head_offset, cols, mask_rows, COLS: tl.constexpr):
    """Rows ``rows`` (a vector of node ids) of one head: a (len(rows), len(cols)) tile."""
    mask = mask_rows[:, None] & (cols[None, :] < COLS)
    return tl.load(Ptr + rows.to(tl.int64)[:, None] * stride_m + head_offset + cols[None, :],
                   mask=mask, other=0.0)


@triton.jit
def _row_vector(Ptr, row, stride_m, head_offset, cols, COLS: tl.constexpr):
    return tl.load(Ptr + row.to(tl.int64) * stride_m + head_offset + cols, mask=cols < COLS,
                   other=0.0).to(tl.float32)


@triton.jit
def _edge_bias(Bias, edges, stride_be, bias_head, valid):
    """Base-2 bias of ``edges`` (target-major ids), fp32. Callers guard it with ``HAS_BIAS``:
    one return type, as the GPU compiler requires (a tensor here, a scalar 0.0 otherwise, was
    accepted by the interpreter only)."""
    return base2(tl.load(Bias + edges.to(tl.int64) * stride_be + bias_head, mask=valid,
                         other=0.0))


@triton.jit
def _csr_fwd_kernel(
    Q, K, V, Out, LSE, RowPtr, Col, Bias, qk_scale,
    stride_qm, stride_qh, stride_km, stride_kh, stride_vm, stride_vh, stride_om, stride_oh,
    stride_lse_h, stride_be, stride_bh,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    row, head = tl.program_id(0), tl.program_id(1)
    start, end = tl.load(RowPtr + row), tl.load(RowPtr + row + 1)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = _row_vector(Q, row, stride_qm, head * stride_qh, offs_d, HEAD_DIM)

    m_i = tl.max(tl.full([BLOCK_N], float("-inf"), dtype=tl.float32), 0)  # fp32 scalars
    l_i = tl.sum(tl.zeros([BLOCK_N], dtype=tl.float32), 0)
    acc = tl.zeros([BLOCK_DV], dtype=tl.float32)
    for block in range(start, end, BLOCK_N):
        edges = block + offs_n
        valid = edges < end
        sources = tl.load(Col + edges, mask=valid, other=0)
        k = _gather(K, sources, stride_km, head * stride_kh, offs_d, valid, HEAD_DIM)
        s = tl.sum(k.to(tl.float32) * q[None, :], 1) * qk_scale
        if HAS_BIAS:
            s += _edge_bias(Bias, edges, stride_be, head * stride_bh, valid)
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 0))
        # -inf while every edge so far is removed by a -inf bias: subtract 0 instead, so that
        # their p is 0, not NaN (a row with none left keeps l = 0: zero output, lse = inf).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe)
        alpha = tl.math.exp2(m_i - m_safe)
        v = _gather(V, sources, stride_vm, head * stride_vh, offs_dv, valid, HEAD_DIM_V)
        acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), 0)
        l_i = l_i * alpha + tl.sum(p, 0)
        m_i = m_new

    has_edge = l_i > 0
    out = acc / tl.where(has_edge, l_i, 1.0)
    tl.store(Out + row.to(tl.int64) * stride_om + head * stride_oh + offs_dv,
             out.to(Out.dtype.element_ty), mask=offs_dv < HEAD_DIM_V)
    tl.store(LSE + head * stride_lse_h + row,
             tl.where(has_edge, m_i + tl.math.log2(tl.where(has_edge, l_i, 1.0)), float("inf")))


@triton.jit
def _csr_bwd_dq_kernel(
    Q, K, V, DO, LSE, Delta, DQ, RowPtr, Col, Bias, DBias, qk_scale, scale,
    stride_qm, stride_qh, stride_km, stride_kh, stride_vm, stride_vh, stride_dom, stride_doh,
    stride_dqm, stride_dqh, stride_lse_h, stride_be, stride_bh,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    """dQ_i = scale * sum_j P_ij (<dO_i, v_j> - Delta_i) k_j over the in-edges of row i, and
    each in-edge's bias gradient dS_ij = P_ij (<dO_i, v_j> - Delta_i)."""
    row, head = tl.program_id(0), tl.program_id(1)
    start, end = tl.load(RowPtr + row), tl.load(RowPtr + row + 1)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = _row_vector(Q, row, stride_qm, head * stride_qh, offs_d, HEAD_DIM)
    do = _row_vector(DO, row, stride_dom, head * stride_doh, offs_dv, HEAD_DIM_V)
    lse = tl.load(LSE + head * stride_lse_h + row)
    delta = tl.load(Delta + head * stride_lse_h + row)

    dq = tl.zeros([BLOCK_D], dtype=tl.float32)
    for block in range(start, end, BLOCK_N):
        edges = block + offs_n
        valid = edges < end
        sources = tl.load(Col + edges, mask=valid, other=0)
        k = _gather(K, sources, stride_km, head * stride_kh, offs_d, valid, HEAD_DIM)
        v = _gather(V, sources, stride_vm, head * stride_vh, offs_dv, valid, HEAD_DIM_V)
        s = tl.sum(k.to(tl.float32) * q[None, :], 1) * qk_scale
        if HAS_BIAS:
            s += _edge_bias(Bias, edges, stride_be, head * stride_bh, valid)
        p = tl.where(valid, tl.math.exp2(s - lse), 0.0)
        dp = tl.sum(v.to(tl.float32) * do[None, :], 1)
        ds = p * (dp - delta)
        dq += tl.sum(ds[:, None] * k.to(tl.float32), 0)
        if HAS_BIAS:
            tl.store(DBias + edges.to(tl.int64) * stride_be + head * stride_bh,
                     ds.to(DBias.dtype.element_ty), mask=valid)
    tl.store(DQ + row.to(tl.int64) * stride_dqm + head * stride_dqh + offs_d,
             (dq * scale).to(DQ.dtype.element_ty), mask=offs_d < HEAD_DIM)


@triton.jit
def _csr_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, Delta, DK, DV, TRowPtr, TCol, TPerm, Bias, qk_scale, scale,
    stride_qm, stride_qh, stride_km, stride_kh, stride_vm, stride_vh, stride_dom, stride_doh,
    stride_dkm, stride_dkh, stride_dvm, stride_dvh, stride_lse_h, stride_be, stride_bh,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    """dV_j = sum_i P_ij dO_i and dK_j = scale * sum_i dS_ij q_i over the out-edges of j."""
    src, head = tl.program_id(0), tl.program_id(1)
    start, end = tl.load(TRowPtr + src), tl.load(TRowPtr + src + 1)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k = _row_vector(K, src, stride_km, head * stride_kh, offs_d, HEAD_DIM)
    v = _row_vector(V, src, stride_vm, head * stride_vh, offs_dv, HEAD_DIM_V)

    dk = tl.zeros([BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_DV], dtype=tl.float32)
    for block in range(start, end, BLOCK_N):
        edges = block + offs_n
        valid = edges < end
        targets = tl.load(TCol + edges, mask=valid, other=0)
        q = _gather(Q, targets, stride_qm, head * stride_qh, offs_d, valid, HEAD_DIM)
        do = _gather(DO, targets, stride_dom, head * stride_doh, offs_dv, valid, HEAD_DIM_V)
        lse = tl.load(LSE + head * stride_lse_h + targets, mask=valid, other=float("inf"))
        delta = tl.load(Delta + head * stride_lse_h + targets, mask=valid, other=0.0)
        s = tl.sum(q.to(tl.float32) * k[None, :], 1) * qk_scale
        if HAS_BIAS:
            in_target_order = tl.load(TPerm + edges, mask=valid, other=0)
            s += _edge_bias(Bias, in_target_order, stride_be, head * stride_bh, valid)
        p = tl.where(valid, tl.math.exp2(s - lse), 0.0)
        dv += tl.sum(p[:, None] * do.to(tl.float32), 0)
        dp = tl.sum(do.to(tl.float32) * v[None, :], 1)
        ds = p * (dp - delta)
        dk += tl.sum(ds[:, None] * q.to(tl.float32), 0)
    tl.store(DK + src.to(tl.int64) * stride_dkm + head * stride_dkh + offs_d,
             (dk * scale).to(DK.dtype.element_ty), mask=offs_d < HEAD_DIM)
    tl.store(DV + src.to(tl.int64) * stride_dvm + head * stride_dvh + offs_dv,
             dv.to(DV.dtype.element_ty), mask=offs_dv < HEAD_DIM_V)


# ----------------------------------------------------------------------------------- launchers


def _bias_args(bias, q, col):
    """``(Bias, stride_be, stride_bh)``; a placeholder without a bias (never read then)."""
    if bias is None:
        return q, 0, 0
    assert bias.dim() == 2 and bias.shape == (col.numel(), q.shape[1]), (
        f"bias must be (E={col.numel()}, H={q.shape[1]}) in target-major order, got "
        f"{tuple(bias.shape)}")
    assert bias.dtype == q.dtype, f"bias dtype {bias.dtype} differs from q's {q.dtype}"
    return bias, bias.stride(0), bias.stride(1)


def _check(q, k, v, row_ptr, col):
    assert q.dim() == k.dim() == v.dim() == 3, "q, k, v must be (nodes, H, C)"
    assert q.shape[1] == k.shape[1] == v.shape[1] and q.shape[2] == k.shape[2], (
        f"head shapes differ: {q.shape}, {k.shape}, {v.shape}")
    assert q.dtype == k.dtype == v.dtype, f"dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}"
    assert all(t.stride(-1) == 1 for t in (q, k, v)), "the channel dim must be contiguous"
    assert row_ptr.numel() == q.shape[0] + 1, "row_ptr needs one entry per target, plus one"
    assert row_ptr.dtype == col.dtype, "row_ptr and col must share an integer dtype"
    assert row_ptr.is_contiguous() and col.is_contiguous(), (
        "row_ptr and col must be contiguous: the kernels read them as dense arrays")


def csr_attention_forward(q, k, v, row_ptr, col, scale, block_n=BLOCK_N, bias=None):
    """``out`` (N_dst, H, C_v) and the base-2 log-sum-exp ``lse`` (H, N_dst), fp32. ``bias``:
    ``(E, H)`` per edge, target-major (the order of ``col``)."""
    _check(q, k, v, row_ptr, col)
    bias_ptr, stride_be, stride_bh = _bias_args(bias, q, col)
    num_dst, heads = q.shape[0], q.shape[1]
    out = torch.empty(num_dst, heads, v.shape[2], dtype=q.dtype, device=q.device)
    lse = torch.empty(heads, num_dst, dtype=torch.float32, device=q.device)
    if num_dst == 0 or heads == 0:
        return out, lse
    _csr_fwd_kernel[(num_dst, heads)](
        q, k, v, out, lse, row_ptr, col, bias_ptr, scale * LOG2E, q.stride(0), q.stride(1),
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        lse.stride(0), stride_be, stride_bh,
        **kernel_constants(q.shape[2], v.shape[2], BLOCK_N=block_n, HAS_BIAS=bias is not None),
        **COMPILE_OPTIONS)
    return out, lse


def csr_attention_backward(do, q, k, v, out, lse, row_ptr, col, t_row_ptr, t_col, scale,
                           block_n=BLOCK_N, bias=None, dbias=None, t_perm=None, dlse=None):
    """``dq, dk, dv`` for the forward pass that produced ``out`` and ``lse``. With ``bias``
    (target-major), its gradient is written into ``dbias`` (strided as ``bias``), and
    ``t_perm`` gives each source-major edge's target-major position. ``dlse``: an ``(H,
    N_dst)`` gradient of the natural-log log-sum-exp, folded into ``Delta`` as in the tiled
    kernels' backward."""
    bias_ptr, stride_be, stride_bh = _bias_args(bias, q, col)
    assert bias is None or (dbias is not None and t_perm is not None
                            and dbias.stride() == bias.stride()), (
        "a bias needs dbias (strided as bias) and t_perm")
    dbias_ptr = bias_ptr if dbias is None else dbias
    t_perm = col if t_perm is None else t_perm
    assert all(t.is_contiguous() for t in (row_ptr, col, t_row_ptr, t_col, t_perm)), (
        "the CSR arrays must be contiguous: the kernels read them as dense arrays")
    assert do.shape == out.shape and do.dtype == out.dtype, "grad_out must match out"
    do = do if do.stride(-1) == 1 else do.contiguous()
    num_dst, heads = q.shape[0], q.shape[1]
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    if num_dst == 0 or heads == 0 or k.shape[0] == 0:
        return dq, dk, dv
    constants = kernel_constants(q.shape[2], v.shape[2], BLOCK_N=block_n,
                                 HAS_BIAS=bias is not None)
    delta = softmax_delta(out, do, dlse)
    bias_strides = (stride_be, stride_bh)
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
               do.stride(0), do.stride(1))
    _csr_bwd_dq_kernel[(num_dst, heads)](
        q, k, v, do, lse, delta, dq, row_ptr, col, bias_ptr, dbias_ptr, scale * LOG2E, scale,
        *strides, dq.stride(0), dq.stride(1), lse.stride(0), *bias_strides, **constants,
        **COMPILE_OPTIONS)
    _csr_bwd_dkdv_kernel[(k.shape[0], heads)](
        q, k, v, do, lse, delta, dk, dv, t_row_ptr, t_col, t_perm, bias_ptr, scale * LOG2E,
        scale, *strides, dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), lse.stride(0),
        *bias_strides, **constants, **COMPILE_OPTIONS)
    return dq, dk, dv
