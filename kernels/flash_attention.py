"""FlashAttention-2-style tiled attention over packed, variable-length segments.

The kernels know nothing of graphs. They see packed ``(total, H, C)`` tensors whose rows are
cut into segments by ``cu_seqlens_q`` / ``cu_seqlens_k`` (segment ``b`` holds query rows
``cu_seqlens_q[b]:cu_seqlens_q[b + 1]`` and key rows likewise); each query attends to every key
of its own segment, or, with ``CAUSAL``, to key positions ``j <= i + d`` of query position
``i``: the diagonal ``d`` is 0 (top-left aligned, SDPA's ``is_causal``), or with
``BOTTOM_RIGHT`` ``k_len - q_len`` of the segment, read at run time (each segment's last query
sees its last key). A sliding window narrows that to a band ``i + low <= j <= i + high``
(``low = d - left``, ``high = d + right``, run-time ``left`` and ``right``; causal: ``right =
0``): ``CAUSAL`` turns the right bound on, ``HAS_LEFT`` the left one. Each program visits only
the tiles that meet the band (FlashAttention's tile skipping), and only tiles across a band edge
or the segment's end pay for per-element masks. A query with no key, such as a bottom-right
query with ``i + d < 0``, gets a zero output and an infinite log-sum-exp (so the backward pass
gives it p = 0), never NaN.

Softmax state is fp32 and kept in base 2: ``log2(e)`` is folded into the logit scale so that the
inner loop uses ``exp2``. The forward pass stores ``LSE`` (base 2) for the backward pass, which
recomputes the probabilities tile by tile: a Delta preprocess, a key-stationary pass for dK/dV
and a query-stationary pass for dQ, with no atomics (deterministic).

Grouped-query heads: ``k`` and ``v`` (and ``dk``, ``dv``) may have ``H_kv`` heads, ``H_kv``
dividing ``q``'s ``H``; query head ``h`` reads kv head ``h // group`` (``group = H / H_kv``,
SDPA's ``enable_gqa``), never an expanded copy. The forward and dQ programs (tile, query head)
just read their kv head; a dK/dV program (key tile, kv head) sweeps the queries of its group's
heads one after another, accumulating dK and dV in registers across them (still no atomics).
``GROUP`` is a constexpr, the group loop unrolled: ungrouped heads (``GROUP = 1``) build exactly
the kernels they had before grouping existed (a run-time group loop cost them registers, some
tile configurations spilling), and each grouping gets its own build.

An optional additive bias (``HAS_BIAS``) is stored per segment as a ``(len_q, len_k)`` block of
rows (target-major, one column per head) starting at ``BiasOffsets[segment]``. The forward and
both backward passes read its tiles; the key-stationary pass writes the bias gradient ``dS``
(the logit gradient) of each (query tile, key tile) it owns: one writer per element, no atomics.

Programs are scheduled by tiles, not by the longest segment: a precomputed list maps each
program to (segment, tile), so a batch of many small graphs launches no program per padding
tile. Consecutive programs are the tiles of one (segment, head), which share K/V in L2. Tile
sizes, warps and pipeline stages come from the keyed tuner in :mod:`gatattn.kernels.tuning`;
:data:`TUNER` reports what it chose.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gatattn.kernels.common import (
    COMPILE_OPTIONS,
    LOG2E,
    base2,
    kernel_constants,
    softmax_delta,
)
from gatattn.kernels.tuning import TileConfig, Tuner

TUNER = Tuner()  # the launch configurations of this process, tuned per key on a GPU


@triton.jit
def _segment_bounds(CuSeqlens, segment):
    # int64 row offsets: row * stride overflows int32 past 2**31 elements.
    start = tl.load(CuSeqlens + segment).to(tl.int64)
    return start, (tl.load(CuSeqlens + segment + 1) - start).to(tl.int32)


@triton.jit
def _load_rows(Ptr, rows, stride_m, head_offset, cols, row_limit, COLS: tl.constexpr):
    """A (len(rows), len(cols)) tile; rows past ``row_limit`` and padded columns read 0."""
    mask = (rows[:, None] < row_limit) & (cols[None, :] < COLS)
    return tl.load(Ptr + rows[:, None] * stride_m + head_offset + cols[None, :], mask=mask,
                   other=0.0)


@triton.jit
def _bias_tile(BiasSeg, rows, cols, q_len, k_len, stride_bm):
    """The bias of pairs (rows, cols) of a segment, base 2, fp32; 0 outside."""
    mask = (rows[:, None] < q_len) & (cols[None, :] < k_len)
    ptrs = BiasSeg + (rows[:, None].to(tl.int64) * k_len + cols[None, :]) * stride_bm
    return base2(tl.load(ptrs, mask=mask, other=0.0))


@triton.jit
def _bias_segment(Bias, BiasOffsets, segment, head, stride_bm, stride_bh,
                  HAS_BIAS: tl.constexpr):
    """Pointer to the segment's bias block, head ``head`` (``Bias`` itself without a bias)."""
    if HAS_BIAS:
        return Bias + tl.load(BiasOffsets + segment) * stride_bm + head * stride_bh
    return Bias


@triton.jit
def _band(q_len, k_len, left, right, BOTTOM_RIGHT: tl.constexpr):
    """``(low, high)`` of a segment: query ``i`` sees keys ``i + low <= j <= i + high`` around
    its causal diagonal ``d`` (``low = d - left``, ``high = d + right``; each bound holds only
    where its flag, ``HAS_LEFT`` or ``CAUSAL``, is set)."""
    diagonal = q_len * 0
    if BOTTOM_RIGHT:
        diagonal = k_len - q_len
    return diagonal - left, diagonal + right


@triton.jit
def _key_tiles(m_block, k_len, low, high, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               CAUSAL: tl.constexpr, HAS_LEFT: tl.constexpr):
    """``(begin, full_begin, full_end, end)`` of a query tile, nested and aligned to key tiles
    (but ``end``): it sees no key outside ``[begin, end)``; key tiles in ``[full_begin,
    full_end)`` lie inside the segment and wholly within the view of each of its queries (no
    masks); the others are boundary tiles. Bounds are clamped at 0 before dividing (Triton's
    integer division truncates toward zero): a tile of blind queries gets an empty range."""
    first_row = m_block * BLOCK_M
    last_row = first_row + BLOCK_M - 1
    begin = first_row * 0
    full_begin = begin
    end = k_len
    full_end = (k_len // BLOCK_N) * BLOCK_N
    if CAUSAL:
        end = tl.minimum(k_len, tl.maximum(last_row + 1 + high, 0))
        seen_by_first = tl.maximum(first_row + 1 + high, 0)
        full_end = tl.minimum(full_end, (seen_by_first // BLOCK_N) * BLOCK_N)
    if HAS_LEFT:
        begin = (tl.maximum(first_row + low, 0) // BLOCK_N) * BLOCK_N
        seen_by_last = tl.cdiv(tl.maximum(last_row + low, 0), BLOCK_N) * BLOCK_N
        full_begin = tl.minimum(seen_by_last, end)
        full_end = tl.maximum(full_end, full_begin)
    return begin, full_begin, full_end, end


@triton.jit
def _query_tiles(n_block, q_len, low, high, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 CAUSAL: tl.constexpr, HAS_LEFT: tl.constexpr):
    """``(first, full_begin, full_end, end)`` of a key tile, nested and aligned to query tiles
    (but ``end``): no query outside ``[first, end)`` sees it; query tiles in ``[full_begin,
    full_end)`` see all of it (no masks). Bounds are clamped at 0 before dividing."""
    first_key = n_block * BLOCK_N
    last_key = first_key + BLOCK_N - 1
    first = n_block * 0
    full_begin = first
    end = q_len
    full_end = q_len
    if CAUSAL:
        first = (tl.maximum(first_key - high, 0) // BLOCK_M) * BLOCK_M
        full_begin = tl.cdiv(tl.maximum(last_key - high, 0), BLOCK_M) * BLOCK_M
    if HAS_LEFT:
        end = tl.minimum(q_len, tl.maximum(last_key - low + 1, 0))
        full_end = (tl.maximum(first_key - low + 1, 0) // BLOCK_M) * BLOCK_M
    full_begin = tl.minimum(full_begin, end)
    full_end = tl.maximum(full_begin, tl.minimum(full_end, end))
    return first, full_begin, full_end, end


@triton.jit
def _in_band(keep, rows, cols, low, high, CAUSAL: tl.constexpr, HAS_LEFT: tl.constexpr):
    """``keep`` and the band's bounds on the pairs ``(rows, cols)`` of a boundary tile."""
    if CAUSAL:
        keep = keep & (cols[None, :] <= rows[:, None] + high)
    if HAS_LEFT:
        keep = keep & (cols[None, :] >= rows[:, None] + low)
    return keep


@triton.jit
def _fwd_inner(acc, m_i, l_i, q, K, V, BiasSeg, q_len, k_start, k_len, low, high, start_n,
               offs_m, offs_n, offs_d, offs_dv, stride_km, stride_vm, stride_bm, k_head, v_head,
               qk_scale, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
               CAUSAL: tl.constexpr, HAS_LEFT: tl.constexpr, MASKED: tl.constexpr,
               HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr):
    cols = start_n + offs_n
    k = _load_rows(K + k_start * stride_km, cols, stride_km, k_head, offs_d, k_len, HEAD_DIM)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    if HAS_BIAS:
        s += _bias_tile(BiasSeg, offs_m, cols, q_len, k_len, stride_bm)
    if MASKED:  # only boundary tiles (segment end, band edges) pay for per-element masks
        keep = _in_band(cols[None, :] < k_len, offs_m, cols, low, high, CAUSAL, HAS_LEFT)
        s = tl.where(keep, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = _load_rows(V + k_start * stride_vm, cols, stride_vm, v_head, offs_dv, k_len, HEAD_DIM_V)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def _fwd_kernel(
    Q, K, V, Out, LSE, CuSeqlensQ, CuSeqlensK, TileSegment, TileBlock, Bias, BiasOffsets,
    qk_scale, left, right,
    stride_qm, stride_qh, stride_km, stride_kh, stride_vm, stride_vh, stride_om, stride_oh,
    stride_lse_h, stride_bm, stride_bh,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
    BOTTOM_RIGHT: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr, GROUP: tl.constexpr,
):
    tile, head = tl.program_id(0), tl.program_id(1)
    segment = tl.load(TileSegment + tile)
    if segment < 0:  # the schedule's tail: no work
        return
    m_block = tl.load(TileBlock + tile)
    q_start, q_len = _segment_bounds(CuSeqlensQ, segment)
    k_start, k_len = _segment_bounds(CuSeqlensK, segment)

    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = _load_rows(Q + q_start * stride_qm, offs_m, stride_qm, head * stride_qh, offs_d, q_len,
                   HEAD_DIM)

    bias_seg = _bias_segment(Bias, BiasOffsets, segment, head, stride_bm, stride_bh, HAS_BIAS)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

    low, high = _band(q_len, k_len, left, right, BOTTOM_RIGHT)
    begin, full_begin, full_end, end = _key_tiles(m_block, k_len, low, high, BLOCK_M, BLOCK_N,
                                                  CAUSAL, HAS_LEFT)
    k_head, v_head = (head // GROUP) * stride_kh, (head // GROUP) * stride_vh
    if HAS_LEFT:  # key tiles across the band's left edge
        for start_n in range(begin, full_begin, BLOCK_N):
            acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, K, V, bias_seg, q_len, k_start, k_len,
                                       low, high, start_n, offs_m, offs_n, offs_d, offs_dv,
                                       stride_km, stride_vm, stride_bm, k_head, v_head, qk_scale,
                                       HEAD_DIM, HEAD_DIM_V, CAUSAL, HAS_LEFT, True, HAS_BIAS,
                                       PRECISION)
    for start_n in range(full_begin, full_end, BLOCK_N):
        acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, K, V, bias_seg, q_len, k_start, k_len,
                                   low, high, start_n, offs_m, offs_n, offs_d, offs_dv,
                                   stride_km, stride_vm, stride_bm, k_head, v_head, qk_scale,
                                   HEAD_DIM, HEAD_DIM_V, CAUSAL, HAS_LEFT, False, HAS_BIAS,
                                   PRECISION)
    for start_n in range(full_end, end, BLOCK_N):
        acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, K, V, bias_seg, q_len, k_start, k_len,
                                   low, high, start_n, offs_m, offs_n, offs_d, offs_dv,
                                   stride_km, stride_vm, stride_bm, k_head, v_head, qk_scale,
                                   HEAD_DIM, HEAD_DIM_V, CAUSAL, HAS_LEFT, True, HAS_BIAS,
                                   PRECISION)

    has_key = l_i > 0
    out = acc / tl.where(has_key, l_i, 1.0)[:, None]
    lse = tl.where(has_key, m_i + tl.math.log2(l_i), float("inf"))
    row_ok = offs_m < q_len
    out_ptrs = Out + (q_start + offs_m)[:, None] * stride_om + head * stride_oh + offs_dv[None, :]
    tl.store(out_ptrs, out.to(Out.dtype.element_ty),
             mask=row_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V))
    tl.store(LSE + head * stride_lse_h + q_start + offs_m, lse, mask=row_ok)


@triton.jit
def _probabilities(q, k, lse, BiasSeg, offs_m, cols, q_len, k_len, low, high, stride_bm,
                   qk_scale, CAUSAL: tl.constexpr, HAS_LEFT: tl.constexpr, MASKED: tl.constexpr,
                   HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr):
    """The forward pass's softmax tile, recomputed from the stored log-sum-exp. Unmasked tiles
    need no per-element test: rows past the segment read lse = inf, so their p is 0 (as is
    that of rows with no key, which the forward pass stored as lse = inf)."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    if HAS_BIAS:
        s += _bias_tile(BiasSeg, offs_m, cols, q_len, k_len, stride_bm)
    p = tl.math.exp2(s - lse[:, None])
    if MASKED:
        keep = (offs_m[:, None] < q_len) & (cols[None, :] < k_len)
        p = tl.where(_in_band(keep, offs_m, cols, low, high, CAUSAL, HAS_LEFT), p, 0.0)
    return p


@triton.jit
def _dkdv_step(dk, dv, k, v, Q, DO, LSE, Delta, BiasSeg, DBiasSeg, q_len, k_len, low, high,
               start_m, cols, offs_d, offs_dv, stride_qm, q_head, stride_dom, do_head, lse_head,
               stride_bm, qk_scale, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
               BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr, HAS_LEFT: tl.constexpr,
               MASKED: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr):
    """One query tile's contribution to a key tile's dK and dV (pointers at the segment), and
    the tile's bias gradient, written here and nowhere else."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    row_ok = offs_m < q_len
    q = _load_rows(Q, offs_m, stride_qm, q_head, offs_d, q_len, HEAD_DIM)
    do = _load_rows(DO, offs_m, stride_dom, do_head, offs_dv, q_len, HEAD_DIM_V)
    lse = tl.load(LSE + lse_head + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(Delta + lse_head + offs_m, mask=row_ok, other=0.0)
    p = _probabilities(q, k, lse, BiasSeg, offs_m, cols, q_len, k_len, low, high, stride_bm,
                       qk_scale, CAUSAL, HAS_LEFT, MASKED, HAS_BIAS, PRECISION)
    dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    ds = p * (dp - delta[:, None])
    if HAS_BIAS:
        pair_ok = row_ok[:, None] & (cols[None, :] < k_len)
        ptrs = DBiasSeg + (offs_m[:, None].to(tl.int64) * k_len + cols[None, :]) * stride_bm
        tl.store(ptrs, ds.to(DBiasSeg.dtype.element_ty), mask=pair_ok)
    dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _dkdv_of_query_head(dk, dv, k, v, Q_seg, DO_seg, LSE_seg, Delta_seg, Bias, DBias, BiasOffsets,
                        segment, head, q_len, k_len, low, high, first, full_begin, full_end, end,
                        cols, offs_d, offs_dv, stride_qm, stride_qh, stride_dom, stride_doh,
                        stride_lse_h, stride_bm, stride_bh, qk_scale, HEAD_DIM: tl.constexpr,
                        HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr,
                        HAS_LEFT: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr):
    """The contribution of query head ``head``'s queries to a key tile's dK and dV, and that
    head's bias gradient on the tile. Key columns past the segment load as zeros and only reach
    dK/dV rows that are never stored, so just the query tiles across the band's edges, outside
    ``[full_begin, full_end)``, need masks. Query tiles outside ``[first, end)`` are never
    visited: their dBias stays the caller's zeros."""
    bias_seg = _bias_segment(Bias, BiasOffsets, segment, head, stride_bm, stride_bh, HAS_BIAS)
    dbias_seg = _bias_segment(DBias, BiasOffsets, segment, head, stride_bm, stride_bh, HAS_BIAS)
    q_head, do_head, lse_head = head * stride_qh, head * stride_doh, head * stride_lse_h
    for start_m in range(first, full_begin, BLOCK_M):
        dk, dv = _dkdv_step(dk, dv, k, v, Q_seg, DO_seg, LSE_seg, Delta_seg, bias_seg,
                            dbias_seg, q_len, k_len, low, high, start_m, cols, offs_d, offs_dv,
                            stride_qm, q_head, stride_dom, do_head, lse_head, stride_bm,
                            qk_scale, HEAD_DIM, HEAD_DIM_V, BLOCK_M, CAUSAL, HAS_LEFT, True,
                            HAS_BIAS, PRECISION)
    for start_m in range(full_begin, full_end, BLOCK_M):
        dk, dv = _dkdv_step(dk, dv, k, v, Q_seg, DO_seg, LSE_seg, Delta_seg, bias_seg,
                            dbias_seg, q_len, k_len, low, high, start_m, cols, offs_d, offs_dv,
                            stride_qm, q_head, stride_dom, do_head, lse_head, stride_bm,
                            qk_scale, HEAD_DIM, HEAD_DIM_V, BLOCK_M, CAUSAL, HAS_LEFT, False,
                            HAS_BIAS, PRECISION)
    if HAS_LEFT:  # query tiles across the band's left edge
        for start_m in range(full_end, end, BLOCK_M):
            dk, dv = _dkdv_step(dk, dv, k, v, Q_seg, DO_seg, LSE_seg, Delta_seg, bias_seg,
                                dbias_seg, q_len, k_len, low, high, start_m, cols, offs_d,
                                offs_dv, stride_qm, q_head, stride_dom, do_head, lse_head,
                                stride_bm, qk_scale, HEAD_DIM, HEAD_DIM_V, BLOCK_M, CAUSAL,
                                HAS_LEFT, True, HAS_BIAS, PRECISION)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, Delta, DK, DV, CuSeqlensQ, CuSeqlensK, TileSegment, TileBlock,
    Bias, DBias, BiasOffsets, qk_scale, scale, left, right,
    stride_qm, stride_qh, stride_km, stride_kh, stride_vm, stride_vh, stride_dom, stride_doh,
    stride_dkm, stride_dkh, stride_dvm, stride_dvh, stride_lse_h, stride_bm, stride_bh,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
    BOTTOM_RIGHT: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr, GROUP: tl.constexpr,
):
    """Key-stationary: one program owns a key tile of one kv head and sweeps the queries that
    see it, head by head over the ``GROUP`` query heads that read that kv head (the same order
    every run: dK and dV are deterministic)."""
    tile, kv_head = tl.program_id(0), tl.program_id(1)
    segment = tl.load(TileSegment + tile)
    if segment < 0:
        return
    n_block = tl.load(TileBlock + tile)
    q_start, q_len = _segment_bounds(CuSeqlensQ, segment)
    k_start, k_len = _segment_bounds(CuSeqlensK, segment)

    cols = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k = _load_rows(K + k_start * stride_km, cols, stride_km, kv_head * stride_kh, offs_d, k_len,
                   HEAD_DIM)
    v = _load_rows(V + k_start * stride_vm, cols, stride_vm, kv_head * stride_vh, offs_dv, k_len,
                   HEAD_DIM_V)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)

    low, high = _band(q_len, k_len, left, right, BOTTOM_RIGHT)
    first, full_begin, full_end, end = _query_tiles(n_block, q_len, low, high, BLOCK_M, BLOCK_N,
                                                    CAUSAL, HAS_LEFT)
    Q_seg, DO_seg = Q + q_start * stride_qm, DO + q_start * stride_dom
    LSE_seg, Delta_seg = LSE + q_start, Delta + q_start
    for member in tl.static_range(GROUP):  # unrolled: one head needs no loop at all
        head = kv_head * GROUP + member
        dk, dv = _dkdv_of_query_head(dk, dv, k, v, Q_seg, DO_seg, LSE_seg, Delta_seg, Bias,
                                     DBias, BiasOffsets, segment, head, q_len, k_len, low, high,
                                     first, full_begin, full_end, end, cols, offs_d, offs_dv,
                                     stride_qm, stride_qh, stride_dom, stride_doh, stride_lse_h,
                                     stride_bm, stride_bh, qk_scale, HEAD_DIM, HEAD_DIM_V,
                                     BLOCK_M, CAUSAL, HAS_LEFT, HAS_BIAS, PRECISION)

    col_ok = cols < k_len
    dk_ptrs = (DK + (k_start + cols)[:, None] * stride_dkm + kv_head * stride_dkh
               + offs_d[None, :])
    tl.store(dk_ptrs, (dk * scale).to(DK.dtype.element_ty),
             mask=col_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
    dv_ptrs = (DV + (k_start + cols)[:, None] * stride_dvm + kv_head * stride_dvh
               + offs_dv[None, :])
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty),
             mask=col_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V))


@triton.jit
def _dq_step(dq, q, do, lse, delta, K, V, BiasSeg, q_len, k_len, low, high, start_n, offs_m,
             offs_n, offs_d, offs_dv, stride_km, k_head, stride_vm, v_head, stride_bm, qk_scale,
             HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, CAUSAL: tl.constexpr,
             HAS_LEFT: tl.constexpr, MASKED: tl.constexpr, HAS_BIAS: tl.constexpr,
             PRECISION: tl.constexpr):
    """One key tile's contribution to a query tile's dQ (pointers at the segment)."""
    cols = start_n + offs_n
    k = _load_rows(K, cols, stride_km, k_head, offs_d, k_len, HEAD_DIM)
    v = _load_rows(V, cols, stride_vm, v_head, offs_dv, k_len, HEAD_DIM_V)
    p = _probabilities(q, k, lse, BiasSeg, offs_m, cols, q_len, k_len, low, high, stride_bm,
                       qk_scale, CAUSAL, HAS_LEFT, MASKED, HAS_BIAS, PRECISION)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, LSE, Delta, DQ, CuSeqlensQ, CuSeqlensK, TileSegment, TileBlock,
    Bias, BiasOffsets, qk_scale, scale, left, right,
    stride_qm, stride_qh, stride_km, stride_kh, stride_vm, stride_vh, stride_dom, stride_doh,
    stride_dqm, stride_dqh, stride_lse_h, stride_bm, stride_bh,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
    BOTTOM_RIGHT: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr, GROUP: tl.constexpr,
):
    """Query-stationary: one program owns a query tile of one query head and sweeps the keys
    it sees, in the kv head ``head // GROUP``."""
    tile, head = tl.program_id(0), tl.program_id(1)
    segment = tl.load(TileSegment + tile)
    if segment < 0:
        return
    m_block = tl.load(TileBlock + tile)
    q_start, q_len = _segment_bounds(CuSeqlensQ, segment)
    k_start, k_len = _segment_bounds(CuSeqlensK, segment)

    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < q_len
    q = _load_rows(Q + q_start * stride_qm, offs_m, stride_qm, head * stride_qh, offs_d, q_len,
                   HEAD_DIM)
    do = _load_rows(DO + q_start * stride_dom, offs_m, stride_dom, head * stride_doh, offs_dv,
                    q_len, HEAD_DIM_V)
    lse = tl.load(LSE + head * stride_lse_h + q_start + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(Delta + head * stride_lse_h + q_start + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # As in the forward pass: tiles [full_begin, full_end) need no masks. A key column past the
    # segment must be masked here, since its p (from a zero key) would meet k = 0 as inf * 0.
    low, high = _band(q_len, k_len, left, right, BOTTOM_RIGHT)
    begin, full_begin, full_end, end = _key_tiles(m_block, k_len, low, high, BLOCK_M, BLOCK_N,
                                                  CAUSAL, HAS_LEFT)
    K_seg, V_seg = K + k_start * stride_km, V + k_start * stride_vm
    k_head, v_head = (head // GROUP) * stride_kh, (head // GROUP) * stride_vh
    bias_seg = _bias_segment(Bias, BiasOffsets, segment, head, stride_bm, stride_bh, HAS_BIAS)
    if HAS_LEFT:  # key tiles across the band's left edge
        for start_n in range(begin, full_begin, BLOCK_N):
            dq = _dq_step(dq, q, do, lse, delta, K_seg, V_seg, bias_seg, q_len, k_len, low, high,
                          start_n, offs_m, offs_n, offs_d, offs_dv, stride_km, k_head, stride_vm,
                          v_head, stride_bm, qk_scale, HEAD_DIM, HEAD_DIM_V, CAUSAL, HAS_LEFT,
                          True, HAS_BIAS, PRECISION)
    for start_n in range(full_begin, full_end, BLOCK_N):
        dq = _dq_step(dq, q, do, lse, delta, K_seg, V_seg, bias_seg, q_len, k_len, low, high,
                      start_n, offs_m, offs_n, offs_d, offs_dv, stride_km, k_head, stride_vm,
                      v_head, stride_bm, qk_scale, HEAD_DIM, HEAD_DIM_V, CAUSAL, HAS_LEFT,
                      False, HAS_BIAS, PRECISION)
    for start_n in range(full_end, end, BLOCK_N):
        dq = _dq_step(dq, q, do, lse, delta, K_seg, V_seg, bias_seg, q_len, k_len, low, high,
                      start_n, offs_m, offs_n, offs_d, offs_dv, stride_km, k_head, stride_vm,
                      v_head, stride_bm, qk_scale, HEAD_DIM, HEAD_DIM_V, CAUSAL, HAS_LEFT,
                      True, HAS_BIAS, PRECISION)

    dq_ptrs = DQ + (q_start + offs_m)[:, None] * stride_dqm + head * stride_dqh + offs_d[None, :]
    tl.store(dq_ptrs, (dq * scale).to(DQ.dtype.element_ty),
             mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))


# ----------------------------------------------------------------------------------- launchers


def tile_schedule(cu_seqlens: torch.Tensor, total: int, block: int):
    """(segment, tile) of every program, without a device sync: the grid is the upper bound
    ``cdiv(total, block) + num_segments`` and the tail is marked with segment -1."""
    num_segments = cu_seqlens.numel() - 1
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    tiles = (lengths + block - 1) // block
    ends = torch.cumsum(tiles, 0)
    program = torch.arange(triton.cdiv(total, block) + num_segments, device=cu_seqlens.device)
    segment = torch.searchsorted(ends, program, right=True)
    in_range = segment < num_segments
    clamped = segment.clamp(max=max(num_segments - 1, 0))
    tile = program - (ends[clamped] - tiles[clamped]) if num_segments else program
    return (torch.where(in_range, segment, -1).to(torch.int32),
            torch.where(in_range, tile, 0).to(torch.int32))


def bias_offsets(cu_seqlens_q, cu_seqlens_k):
    """``(B + 1,)`` int64 first bias row of each segment's block (exclusive cumsum of
    ``len_q * len_k``), computed on the device without a sync."""
    sizes = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).long() * (cu_seqlens_k[1:] - cu_seqlens_k[:-1])
    return torch.cat([sizes.new_zeros(1), sizes.cumsum(0)])


def _check_bias(q, bias):
    if bias is None:
        return
    assert bias.dim() == 2 and bias.shape[1] == q.shape[1], (
        f"bias must be (sum_b len_q_b * len_k_b, H={q.shape[1]}), got {tuple(bias.shape)}")
    assert bias.dtype == q.dtype, f"bias dtype {bias.dtype} differs from q's {q.dtype}"
    assert bias.device == q.device, f"bias is on {bias.device}, q on {q.device}"


def _bias_args(bias, q, cu_seqlens_q, cu_seqlens_k):
    """``(Bias, BiasOffsets, stride_bm, stride_bh)`` of a launch; placeholders without a bias
    (the kernels never read them then)."""
    if bias is None:
        return q, cu_seqlens_q, 0, 0
    return bias, bias_offsets(cu_seqlens_q, cu_seqlens_k), bias.stride(0), bias.stride(1)


def group_size(q, k, v) -> int:
    """How many query heads read each kv head: ``H / H_kv``, which must be whole."""
    heads, kv_heads = q.shape[1], k.shape[1]
    if v.shape[1] != kv_heads:
        raise ValueError(f"k and v need the same number of heads, got {kv_heads} and "
                         f"{v.shape[1]}")
    if kv_heads == 0 or heads % kv_heads:
        if heads == kv_heads == 0:
            return 1
        raise ValueError(f"q has H={heads} heads and k, v have H_kv={kv_heads}: grouped-query "
                         "attention needs H_kv to divide H")
    return heads // kv_heads


def _check_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k):
    assert q.dim() == k.dim() == v.dim() == 3, "q, k, v must be packed (total, H, C)"
    group_size(q, k, v)
    assert q.shape[2] == k.shape[2], f"q and k head dims differ: {q.shape[2]} vs {k.shape[2]}"
    assert k.shape[0] == v.shape[0], f"k and v rows differ: {k.shape[0]} vs {v.shape[0]}"
    assert q.dtype == k.dtype == v.dtype, f"dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}"
    assert max(q.shape[2], v.shape[2]) <= 256, "head dims above 256 are not supported"
    assert all(t.stride(-1) == 1 for t in (q, k, v)), "the channel dim must be contiguous"
    assert cu_seqlens_q.dtype == cu_seqlens_k.dtype == torch.int32, "cu_seqlens must be int32"
    assert cu_seqlens_q.numel() == cu_seqlens_k.numel(), "q and k need the same segment count"


def tile_constants(head_dim: int, head_dim_v: int, dtype: torch.dtype, config: TileConfig,
                   group: int = 1) -> dict:
    """The constexprs of the forward and backward kernels for one launch configuration and
    grouped-query group size (a constexpr: with one head per group, the dK/dV kernel has no
    group loop, and the registers it would hold). ``HAS_LEFT`` is off: a launch with a left
    bound turns it on (:func:`_launch_options`)."""
    # fp32 inputs get fp32 products (no TF32) so they match an fp32 reference.
    return kernel_constants(head_dim, head_dim_v, BLOCK_M=config.block_m,
                            BLOCK_N=config.block_n, GROUP=group, HAS_LEFT=False,
                            PRECISION="ieee" if dtype == torch.float32 else "tf32")


Sides = tuple[int | None, int | None]


def band_sides(causal: bool, window: Sides | None, rows: int) -> Sides:
    """``(left, right)`` of a launch: query ``i`` of a segment sees keys ``i + d - left <= j <=
    i + d + right`` around its causal diagonal ``d``, ``None`` for a side without bound. Causal
    launches bound the right side at 0. A side of at least ``rows`` (all query and key rows)
    bounds no segment: it is dropped, so offsets stay far from int32's limit."""
    left, right = (None, None) if window is None else window
    if any(side is not None and side < 0 for side in (left, right)):
        raise ValueError(f"window sides must be >= 0, or None for no bound, got {window!r}")
    if causal and right not in (None, 0):
        raise ValueError(f"a causal launch keeps j <= i + d (right = 0), got window={window!r}; "
                         "pass window=(left, 0)")
    left, right = (None if side is None or side >= rows else side for side in (left, right))
    return left, 0 if causal else right


def _launch_options(q, k, v, causal, sides: Sides, config: TileConfig, has_bias: bool = False,
                    bottom_right: bool = False) -> dict:
    """Constexprs and launch options. ``CAUSAL`` is the band's right bound (causal or a
    window's right side), ``HAS_LEFT`` its left bound."""
    left, right = sides
    return dict(tile_constants(q.shape[2], v.shape[2], q.dtype, config, group_size(q, k, v)),
                CAUSAL=right is not None, HAS_LEFT=left is not None,
                BOTTOM_RIGHT=causal and bottom_right, HAS_BIAS=has_bias,
                num_warps=config.num_warps, num_stages=config.num_stages, **COMPILE_OPTIONS)


def _tuning_window(causal: bool, sides: Sides) -> Sides | None:
    """The tuning key's window: ``None`` where the band is plain causal or complete."""
    return None if sides == (None, 0 if causal else None) else sides


def flash_attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, causal,
                            config: TileConfig | None = None, bias=None, *,
                            bottom_right: bool = False, window: Sides | None = None):
    """Returns ``out`` (total_q, H, C_v) and the base-2 log-sum-exp ``lse`` (H, total_q), fp32.
    ``k`` and ``v`` have ``H_kv`` heads dividing ``H``: query head ``h`` reads kv head
    ``h // (H / H_kv)``. ``config`` overrides the tuned launch configuration. ``bias``:
    ``(rows, H)``, each segment's ``(len_q, len_k)`` block target-major, segments stacked in
    order. ``bottom_right`` (with ``causal``): query ``i`` of a segment sees keys
    ``j <= i + k_len - q_len``; queries that see none get zeros. ``window``: ``(left, right)``
    sliding window around that diagonal (:func:`band_sides`); key tiles outside a query tile's
    band are never read."""
    _check_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k)
    _check_bias(q, bias)
    bias_args = _bias_args(bias, q, cu_seqlens_q, cu_seqlens_k)
    group_size(q, k, v)  # refuses a grouping H_kv does not divide, before any launch
    sides = band_sides(causal, window, q.shape[0] + k.shape[0])
    total_q, heads = q.shape[0], q.shape[1]
    out = torch.empty(total_q, heads, v.shape[2], dtype=q.dtype, device=q.device)
    lse = torch.empty(heads, total_q, dtype=torch.float32, device=q.device)
    if total_q == 0 or heads == 0:
        return out, lse

    def launch(config: TileConfig) -> None:
        segment, tile = tile_schedule(cu_seqlens_q, total_q, config.block_m)
        _fwd_kernel[(segment.numel(), heads)](
            q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, segment, tile, *bias_args[:2],
            scale * LOG2E, sides[0] or 0, sides[1] or 0, q.stride(0), q.stride(1), k.stride(0),
            k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1), lse.stride(0),
            *bias_args[2:],
            **_launch_options(q, k, v, causal, sides, config, bias is not None, bottom_right))

    launch(config or TUNER.for_launch("forward", q, k, v, cu_seqlens_q, causal=causal,
                                      bottom_right=bottom_right, has_bias=bias is not None,
                                      window=_tuning_window(causal, sides), launch=launch))
    return out, lse


def flash_attention_backward(do, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, scale, causal,
                             config: TileConfig | None = None, bias=None, dbias=None, *,
                             bottom_right: bool = False, dlse=None, window: Sides | None = None):
    """Returns ``dq, dk, dv`` for the forward pass that produced ``out`` and ``lse`` (with the
    same ``causal``, ``bottom_right`` and ``window``); ``dk`` and ``dv`` have ``k``'s and
    ``v``'s ``H_kv`` heads, each the sum over the query heads that read it. ``config`` overrides
    the tuned launch configurations of both passes. With ``bias``, the bias gradient is written
    into ``dbias`` (zeros, shaped and strided as ``bias``; pairs outside a segment's band stay
    0). ``dlse``: an ``(H, total_q)`` gradient of the natural-log log-sum-exp, whose logit gradient
    ``P * dlse`` joins ``dS = P (dP - Delta)`` as ``Delta - dlse``: no other change."""
    _check_bias(q, bias)
    assert (bias is None) == (dbias is None), "give bias and dbias together"
    assert dbias is None or dbias.stride() == bias.stride(), "dbias must be strided as bias"
    assert do.shape == out.shape and do.dtype == out.dtype, (
        f"grad_out must match out: {tuple(do.shape)} {do.dtype} vs {tuple(out.shape)} {out.dtype}")
    do = do if do.stride(-1) == 1 else do.contiguous()
    group_size(q, k, v)  # refuses a grouping H_kv does not divide, before any launch
    sides = band_sides(causal, window, q.shape[0] + k.shape[0])
    total_q, heads = q.shape[0], q.shape[1]
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    if heads == 0 or total_q == 0 or k.shape[0] == 0:
        return dq, dk, dv
    delta = softmax_delta(out, do, dlse)
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
               do.stride(0), do.stride(1))
    bias_ptr, offsets, stride_bm, stride_bh = _bias_args(bias, q, cu_seqlens_q, cu_seqlens_k)
    dbias_ptr = bias_ptr if dbias is None else dbias
    has_bias = bias is not None
    band_args = (sides[0] or 0, sides[1] or 0)

    def launch_dkdv(config: TileConfig) -> None:
        segment, tile = tile_schedule(cu_seqlens_k, k.shape[0], config.block_n)
        _bwd_dkdv_kernel[(segment.numel(), k.shape[1])](
            q, k, v, do, lse, delta, dk, dv, cu_seqlens_q, cu_seqlens_k, segment, tile,
            bias_ptr, dbias_ptr, offsets, scale * LOG2E, scale, *band_args, *strides,
            dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), lse.stride(0), stride_bm,
            stride_bh, **_launch_options(q, k, v, causal, sides, config, has_bias, bottom_right))

    def launch_dq(config: TileConfig) -> None:
        segment, tile = tile_schedule(cu_seqlens_q, total_q, config.block_m)
        _bwd_dq_kernel[(segment.numel(), heads)](
            q, k, v, do, lse, delta, dq, cu_seqlens_q, cu_seqlens_k, segment, tile,
            bias_ptr, offsets, scale * LOG2E, scale, *band_args, *strides, dq.stride(0),
            dq.stride(1), lse.stride(0), stride_bm, stride_bh,
            **_launch_options(q, k, v, causal, sides, config, has_bias, bottom_right))

    def tuned(kernel, launch):
        return config or TUNER.for_launch(kernel, q, k, v, cu_seqlens_q, causal=causal,
                                          bottom_right=bottom_right, has_bias=has_bias,
                                          window=_tuning_window(causal, sides), launch=launch)

    launch_dkdv(tuned("dkdv", launch_dkdv))
    launch_dq(tuned("dq", launch_dq))
    return dq, dk, dv
