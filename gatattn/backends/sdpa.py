"""Attention on implicit complete graphs through ``F.scaled_dot_product_attention``.

Never builds edges. A batch of graphs is not padded to its largest graph: nodes are permuted so
that graphs of equal shape lie together, and each shape is one SDPA call over a
``(count, H, len, C)`` view (see :class:`~gatattn.graph.SegmentPlan`); padding with a mask,
nested jagged tensors and a loop over graphs were each slower on CPU. The layer-level
comparison with padded ``nn.MultiheadAttention`` is in benchmarks/results/cpu.md.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from gatattn.backends.bands import (
    Band,
    band_mask,
    group_band,
    sdpa_mask,
    seeing_part,
    seeing_rows_only,
    sliding_chunks,
)
from gatattn.backends.common import (
    empty_output,
    permute_rows,
    repeat_kv_heads,
    unpermute_rows,
)
from gatattn.backends.native import cpu_kernels
from gatattn.backends.nonfinite import contain_nonfinite
from gatattn.backends.second_order import refuse_second_order, twice_differentiable
from gatattn.graph import AttentionGraph, SegmentGroup
from gatattn.graph.edges import seeing_rows
from gatattn.graph.layout import head_major_layout
from gatattn.transforms import compiling, functorch_active, recorded


def sdpa_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    graph: AttentionGraph,
    *,
    scale: float,
    dropout: float = 0.0,
    math: bool = False,
    bias: Tensor | None = None,
    inputs_finite: bool | None = None,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """``(N_dst, H, C_v)`` attention over ``graph``, which must be implicit. Second derivatives
    come from SDPA's math backend (its fused kernels have no double backward; ``math=True``
    uses it throughout); with dropout, whose mask cannot be replayed, they are refused.
    ``bias`` (stacked layout, :mod:`gatattn.bias`) is added per size group as a float mask,
    computed as SDPA's math backend would (:func:`_written_out_group`); with it, dropout's
    second derivatives are exact too.

    Grouped-query heads (``k``, ``v`` with ``H_kv`` heads, ``H % H_kv == 0``) run natively
    through SDPA's ``enable_gqa``; ``k`` and ``v`` are expanded to ``H`` heads only with a bias
    (the logits are written out per head). ``inputs_finite``: whether ``q``, ``k``, ``v`` are
    all finite, as the call found out (``None``: not known; see
    :func:`~gatattn.backends.nonfinite.contain_nonfinite`). ``return_lse``: also the
    ``(N_dst, H)`` log-sum-exp, from :func:`implicit_lse` (SDPA does not return it)."""
    assert graph.is_implicit, "the SDPA route needs an implicit (complete / batched) graph"
    (q, k, v), repair = contain_nonfinite(q, k, v, graph, inputs_finite)
    out = repair(_attention(q, k, v, graph, scale, dropout, math, bias))
    if not return_lse:
        return out
    return out, repair.lse(implicit_lse(q, k, graph, scale, bias))


def _attention(q: Tensor, k: Tensor, v: Tensor, graph: AttentionGraph, scale: float,
               dropout: float, math: bool, bias: Tensor | None) -> Tensor:
    plan = graph.segment_plan()
    if bias is not None:
        return _written_out_attention(q, k, v, graph, plan, bias, scale, dropout)
    if len(plan.groups) == 1 and plan.order_dst is None and plan.order_src is None:
        # One complete graph, or equal-size graphs in order (a sequence batch): no split/cat.
        group = plan.groups[0]
        return _group_attention(group, q, k, v, group_band(graph, group), scale, dropout, math)
    if plan.runs_serve:  # runs of equal-size graphs as they lie: nothing permuted
        return _batches(plan.runs, q, k, v, graph, scale, dropout, math)
    q = permute_rows(q, plan.order_dst)
    k = permute_rows(k, plan.order_src)
    v = permute_rows(v, plan.order_src)
    out = _batches(plan.groups, q, k, v, graph, scale, dropout, math)
    return unpermute_rows(out, plan.order_dst)


def _batches(batches: list[SegmentGroup], q: Tensor, k: Tensor, v: Tensor,
             graph: AttentionGraph, scale: float, dropout: float, math: bool) -> Tensor:
    """Consecutive rows of ``q`` (and ``k``, ``v``) as ``batches`` of equal-size graphs, each
    one call, the outputs in the same order. Several calls share one twice-differentiable
    wrapper where :func:`_shared_wrapper_serves`: one nested backward instead of one per call
    (0.2 ms each)."""
    rows_dst = [g.count * g.len_dst for g in batches]
    rows_src = [g.count * g.len_src for g in batches]

    def calls(q: Tensor, k: Tensor, v: Tensor, math: bool = math, wrap: bool = True) -> Tensor:
        outs = [
            _group_attention(g, q_g, k_g, v_g, group_band(graph, g), scale, dropout, math, wrap)
            for g, q_g, k_g, v_g in zip(
                batches, q.split(rows_dst), k.split(rows_src), v.split(rows_src), strict=True)
        ]
        return torch.cat(outs) if outs else empty_output(q, k, v)

    if len(batches) < 2 or not _shared_wrapper_serves(graph, scale, dropout, math):
        return calls(q, k, v)
    return twice_differentiable(partial(calls, wrap=False),
                                partial(calls, math=True) if dropout == 0 else _NO_REPLAY,
                                q, k, v)


def _group_attention(group, q, k, v, band: Band | None, scale: float, dropout: float,
                     math: bool, wrap: bool = True) -> Tensor:
    """One size group's attention; ``band``: :func:`~gatattn.backends.bands.group_band`
    (``None``: every pair); ``wrap``: see :func:`_sdpa`."""
    H, H_kv, C_v = q.size(1), k.size(1), v.size(2)
    if group.len_dst == 0 or group.len_src == 0:  # no keys: the zero-output policy
        return empty_output(q, k, v, group.count * group.len_dst)
    if band is not None:
        out = seeing_rows_only(group, q, band, lambda g, q_g, b: _group_attention(
            g, q_g, k, v, b, scale, dropout, math, wrap))
        if out is not None:
            return out
    if scale <= 0:
        # SDPA scales after masking with -inf (0 * -inf = NaN) or by sqrt(scale) (math
        # backend): fold such a scale into the queries instead.
        q, scale = q * scale, 1.0
    mask, is_causal = None, False  # (every pair: nothing more to ask, the common case)
    if band is not None:
        chunks = sliding_chunks(group.len_dst, group.len_src, band)
        if chunks is not None:  # a narrow band: every chunk of rows against its keys, one call
            out = _sdpa(chunks.queries(q, group.count), chunks.sources(k, group.count),
                        chunks.sources(v, group.count), chunks.mask(group.count, q.device),
                        False, scale, dropout, math, wrap)
            return chunks.outputs(out, group.count)
        mask, is_causal = sdpa_mask(band, group.len_dst, group.len_src, q.device)
    if mask is None and dropout == 0 and not math and _packed_call_serves(q, k, v):
        return cpu_kernels().packed_sdpa(q, k, v, group.count, group.len_dst, group.len_src,
                                         scale, is_causal)
    q = q.view(group.count, group.len_dst, H, -1).transpose(1, 2)  # (B, H, L, C)
    k = k.view(group.count, group.len_src, H_kv, -1).transpose(1, 2)  # (B, H_kv, S, C)
    v = v.view(group.count, group.len_src, H_kv, C_v).transpose(1, 2)  # (B, H_kv, S, C_v)
    out = _sdpa(q, k, v, mask, is_causal, scale, dropout, math, wrap)
    return out.transpose(1, 2).reshape(-1, H, C_v)


def planned_step(step: str, q: Tensor, k: Tensor, v: Tensor, sizes: tuple[int, int, int],
                 scale: float, guard: bool) -> Tensor | None:
    """A step :func:`gatattn.backends.routing.planned_step` planned, computing what the full
    call computes, bitwise: ``"one graph"`` is :func:`_one_graph`'s compiled step (any grad
    mode; the logits route needs no guard), ``"packed sdpa"`` the one-step SDPA call of one
    group of ``sizes`` ``(count, len_dst, len_src)`` equal-size graphs in order and, with
    ``guard``, the compiled guard (inference only; planned for float32 / float64 inputs of one
    dtype). ``None`` where it cannot: the full call runs."""
    kernels = cpu_kernels()
    if kernels is None:
        return None
    if step == "one graph":
        return kernels.complete_graph_logits(q, k, v, _IGNORED_INPUT[q.dtype], scale)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return None
    if guard and not (q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1):
        return None  # (the scan's layout: scanned_natively)
    out = kernels.packed_sdpa(q, k, v, *sizes, scale, False)
    if guard:
        kernels.poison_if_nonfinite_(out, [q, k, v])
    return out


def _packed_call_serves(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Whether a group's views and SDPA call run as one compiled call
    (``packed_sdpa.cpp``): on CPU, where nothing records the call (no gradient is taken, no
    trace, no ``torch.func`` transform, not compiling), which then needs none of
    :func:`_sdpa`'s Python around it; its ops stay visible to dispatch modes."""
    if not q.is_cpu or compiling() or recorded():
        return False
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return False
    return cpu_kernels() is not None


def _sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool, scale: float,
          dropout: float, math: bool, wrap: bool = True) -> Tensor:
    """SDPA over ``(B, H, L, C)`` batches, twice differentiable (see :func:`sdpa_attention`);
    ``wrap=False``: the caller wraps it (:func:`_batches`)."""
    gqa = bool(k.size(1) != q.size(1))  # sizes are tensors under torch.jit.trace

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                              is_causal=is_causal, scale=scale,
                                              enable_gqa=gqa)

    def math_backend(q, k, v):
        with sdpa_kernel(SDPBackend.MATH):
            return sdpa(q, k, v)

    if _math_only(dropout, math):
        # The math backend is plain differentiable ops, which torch.func's transforms (vmap,
        # jacrev, jacfwd, hessian) compose with; the wrapper below is an autograd Function.
        return math_backend(q, k, v)
    if torch.jit.is_tracing() or not wrap:
        # A trace records the SDPA op itself: the wrapper would be recorded as a Python object
        # holding this call's closures (its mask, its sizes), replayed for other sizes.
        return sdpa(q, k, v)
    # Wrapped around the SDPA call itself, whose inputs SDPA saves anyway: the wrapper's own
    # saved inputs cost no memory (around the whole route they kept q, k, v alive).
    return twice_differentiable(sdpa, math_backend if dropout == 0 else _NO_REPLAY, q, k, v)


def _math_only(dropout: float, math: bool) -> bool:
    """Whether :func:`_sdpa` runs SDPA's math backend: asked to, or under ``torch.func``."""
    return math or (functorch_active() and dropout == 0)


def _shared_wrapper_serves(graph: AttentionGraph, scale: float, dropout: float,
                           math: bool) -> bool:
    """Whether :func:`_batches` wraps its calls once: where :func:`_sdpa` would wrap each (not
    the math backend, not traced) and SDPA saves the very inputs the wrapper saves, so that it
    costs no memory: no window (whose chunks are gathered copies) and no non-positive scale
    (folded into a copy of ``q``)."""
    return (graph.window is None and scale > 0 and not _math_only(dropout, math)
            and not torch.jit.is_tracing())


_NO_REPLAY = refuse_second_order(
    "SDPA's attention dropout cannot be replayed; use dropout=0 or backend='sparse'")


# ------------------------------------------------------------------ the log-sum-exp

#: Logits formed at once by :func:`implicit_lse`, per chunk of target rows (float32: 64 MiB).
LSE_CHUNK_LOGITS = 2**24


def implicit_lse(q: Tensor, k: Tensor, graph: AttentionGraph, scale: float,
                 bias: Tensor | None = None) -> Tensor:
    """``(N_dst, H)`` log-sum-exp of each target's scaled logits (plus ``bias``, stacked
    layout) over the sources it keeps: the softmax normaliser, natural log, ``-inf`` for a
    target without sources. In float32 (float64 for float64 inputs), differentiable (twice).

    SDPA computes it internally but does not return it, so it is computed again here from the
    same logits, per size group: one more ``q k^T`` product (as many FLOPs as the attention's
    own logits, no value product) in chunks of target rows of at most
    :data:`LSE_CHUNK_LOGITS` logits, which bounds its memory. Only calls that ask pay it."""
    assert graph.is_implicit, "implicit_lse needs an implicit (complete / batched) graph"
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    H = q.size(1)
    plan = graph.segment_plan()
    if not plan.groups:
        return q.new_full((q.size(0), H), float("-inf"), dtype=dtype) + q[:0].sum() + k[:0].sum()
    q = permute_rows(q, plan.order_dst).to(dtype)
    k = permute_rows(k, plan.order_src).to(dtype)
    biases = [None] * len(plan.groups)
    if bias is not None:
        bias = permute_rows(bias, head_major_layout(graph, plan, H, bias.device).bias)
        biases = bias.to(dtype).split([g.count * g.len_dst * g.len_src for g in plan.groups])
    lses = [
        _group_lse(g, q_g, k_g, b_g, group_band(graph, g), scale)
        for g, q_g, k_g, b_g in zip(
            plan.groups, q.split([g.count * g.len_dst for g in plan.groups]),
            k.split([g.count * g.len_src for g in plan.groups]), biases, strict=True)
    ]
    return unpermute_rows(torch.cat(lses), plan.order_dst)


def _group_lse(g: SegmentGroup, q: Tensor, k: Tensor, bias: Tensor | None,
               band: Band | None, scale: float) -> Tensor:
    """One size group's ``(count * len_dst, H)`` log-sum-exp. Grouped kv heads are read as
    they are: query heads are laid out per kv head, ``(count, H_kv, group * len_dst, C)``. A
    narrow band without a bias is computed in its sliding chunks."""
    H, H_kv, C = q.size(1), k.size(1), q.size(2)
    group = H // H_kv
    if g.len_dst == 0 or g.len_src == 0:  # no keys: -inf, still on q's and k's graph
        return q.new_full((g.count * g.len_dst, H), float("-inf")) + q[:0].sum() + k[:0].sum()
    seeing = band is not None and len(seeing_rows(g.len_dst, g.len_src, *band)) == g.len_dst
    chunks = sliding_chunks(g.len_dst, g.len_src, band) if seeing and bias is None else None
    if chunks is not None:
        q_c, k_c = chunks.queries(q, g.count), chunks.sources(k, g.count)  # (B', H, L, C)
        logits = torch.matmul(q_c.unflatten(1, (H_kv, group)),
                              k_c.unsqueeze(2).transpose(-1, -2)).flatten(1, 2).mul(scale)
        logits = logits.masked_fill(~chunks.mask(g.count, q.device), float("-inf"))
        lse = safe_logsumexp(logits).unsqueeze(-1)  # (B', H, rows, 1)
        return chunks.outputs(lse, g.count).squeeze(-1)
    q = q.view(g.count, g.len_dst, H_kv, group, C)
    k = k.view(g.count, g.len_src, H_kv, C).permute(0, 2, 3, 1)  # (B, H_kv, C, S)
    if bias is not None:
        bias = bias.view(g.count, g.len_dst, g.len_src, H)
    keep = band_mask(band, g.len_dst, g.len_src, q.device)  # blind targets keep nothing: -inf
    rows = max(1, LSE_CHUNK_LOGITS // max(1, g.count * H * g.len_src))
    lses = []
    for start in range(0, g.len_dst, rows):
        stop = min(start + rows, g.len_dst)
        q_c = q[:, start:stop].permute(0, 2, 3, 1, 4).reshape(g.count, H_kv, -1, C)
        logits = torch.matmul(q_c, k).mul(scale).view(g.count, H, stop - start, g.len_src)
        if bias is not None:
            logits = logits + bias[:, start:stop].permute(0, 3, 1, 2)
        if keep is not None:
            logits = logits.masked_fill(~keep[start:stop], float("-inf"))
        lses.append(safe_logsumexp(logits).transpose(1, 2))  # (B, rows, H)
    return torch.cat(lses, dim=1).reshape(-1, H)


def safe_logsumexp(logits: Tensor) -> Tensor:
    """``logsumexp`` over the last dim whose rows of only ``-inf`` give ``-inf`` with a zero
    gradient (``torch.logsumexp``'s is NaN there); NaN and ``+inf`` propagate."""
    removed = logits.amax(dim=-1, keepdim=True) == float("-inf")
    lse = torch.logsumexp(logits.masked_fill(removed, 0.0), dim=-1)
    return lse.masked_fill(removed.squeeze(-1), float("-inf"))


# ------------------------------------------------------------------ logits written out


def logits_attention(q: Tensor, k: Tensor, v: Tensor, graph: AttentionGraph, *, scale: float,
                     return_lse: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """The ``"logits"`` route (:func:`gatattn.backends.routing.logits_route_serves`): complete
    graphs of a few dozen nodes, their logits written out per size group (``baddbmm``,
    softmax, ``bmm``) instead of an SDPA call. On CPU, SDPA's fused kernel costs more than
    these three products on such graphs, forward and above all backward. No mask, no bias,
    no dropout; twice differentiable as it stands.

    Non-finite inputs need no repair here: every pair is an edge and IEEE arithmetic carries a
    NaN or inf exactly along the edges that read it, as :mod:`gatattn.reference` does (one
    corner differs: a target whose logits are all ``-inf``, which only infinite inputs give,
    gets NaN where the reference gives zeros)."""
    assert graph.is_implicit and graph.window is None and not graph.causal
    plan = graph.segment_plan()
    if len(plan.groups) == 1 and plan.groups[0].count == 1:
        out = _one_graph(plan.groups[0], q, k, v, scale)
    else:
        out = _written_out_attention(q, k, v, graph, plan, None, scale, 0.0)
    return (out, implicit_lse(q, k, graph, scale)) if return_lse else out


def _one_graph(g: SegmentGroup, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """One complete graph: the group's form on its ``(H, len, C)`` views, no gather; on CPU
    the same ops in one compiled step (``packed_sdpa.cpp``: the views and calls from Python
    cost a fifth of a 64-node graph's attention), except where a trace, ``torch.func`` or
    ``torch.compile`` must see the ops from Python."""
    if q.is_cpu and not compiling() and not recorded() and cpu_kernels() is not None:
        return cpu_kernels().complete_graph_logits(q, k, v, _IGNORED_INPUT[q.dtype], scale)
    out = _written_out_group(g, q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), None,
                             None, scale, 0.0)
    return out.transpose(0, 1)


#: ``baddbmm``'s input where ``beta=0`` ignores it (never read, never written), in the
#: dtypes of the logits route, the unbiased form's one caller (on CPU).
with torch.inference_mode(False):  # (imported under inference mode, still a normal tensor)
    _IGNORED_INPUT = {dtype: torch.empty(1, 1, 1, dtype=dtype)
                      for dtype in (torch.float32, torch.float64)}


# ------------------------------------------------------------------ with an additive bias


def _written_out_attention(q: Tensor, k: Tensor, v: Tensor, graph: AttentionGraph, plan,
                           bias: Tensor | None, scale: float, dropout: float) -> Tensor:
    """Attention with the stacked ``bias`` (``None``: none) added to the logits, one batch per
    size group.

    ``q``, ``k``, ``v`` are first gathered, by one permutation each, into a head-major layout in
    which every size group is a contiguous ``(count * H, len, C)`` batch, which the batched
    matrix products read as it lies (per-group transposes and copies cost more on CPU). The
    bias rows are permuted into the groups' order (a permutation of pairs: H times fewer
    indices than of entries) and enter as ``baddbmm``'s input. Each permutation's backward is a
    gather, so the bias gradient is deterministic. (Merging groups of similar sizes into
    padded batches, the padding masked by ``-inf`` keys, was slower on CPU for graphs of 10-60
    nodes: the padded pairs cost more than the calls it saves.)
    Grouped kv heads are expanded to the query heads here: the logits are written out per
    head. Half precision is computed in float32, as SDPA's kernels accumulate: the gathered
    inputs are cast once per call, and the output cast back."""
    H, C_v = q.size(1), v.size(2)
    k, v = repeat_kv_heads(k, H), repeat_kv_heads(v, H)
    on_bias = bias[:0].sum() if bias is not None else 0
    if not plan.groups:
        return empty_output(q, k, v) + on_bias
    layout = head_major_layout(graph, plan, H, q.device)
    q_hm = _computed(permute_rows(q.reshape(-1, q.size(2)), layout.dst))
    k_hm = _computed(permute_rows(k.reshape(-1, k.size(2)), layout.src))
    v_hm = _computed(permute_rows(v.reshape(-1, C_v), layout.src))
    pairs = [g.count * g.len_dst * g.len_src for g in plan.groups]
    biases = (_computed(permute_rows(bias, layout.bias)).split(pairs) if bias is not None
              else [None] * len(pairs))
    outs = []
    for g, q_g, k_g, v_g, bias_g in zip(
            plan.groups, q_hm.split([g.count * H * g.len_dst for g in plan.groups]),
            k_hm.split([g.count * H * g.len_src for g in plan.groups]),
            v_hm.split([g.count * H * g.len_src for g in plan.groups]), biases, strict=True):
        batch = g.count * H
        if bias_g is not None:
            bias_g = bias_g.view(g.count, g.len_dst, g.len_src, H).permute(0, 3, 1, 2).reshape(
                batch, g.len_dst, g.len_src)
        out = _written_out_group(
            g, q_g.view(batch, g.len_dst, q.size(2)), k_g.view(batch, g.len_src, k.size(2)),
            v_g.view(batch, g.len_src, C_v), bias_g, group_band(graph, g), scale, dropout)
        outs.append(out.reshape(-1, C_v))
    out = torch.cat(outs).to(q.dtype)
    del outs  # (no backward saves the groups' outputs: freed before the next copy, not after)
    return unpermute_rows(out, layout.dst).view(-1, H, C_v)


def _computed(x: Tensor) -> Tensor:
    """``x`` in the biased path's compute dtype: float32 for half precision (logits, softmax
    and the value product in half precision err several times more than SDPA, which
    accumulates in float32), else ``x`` itself."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _written_out_group(g: SegmentGroup, q: Tensor, k: Tensor, v: Tensor,
                            bias: Tensor | None, band: Band | None, scale: float,
                            dropout: float) -> Tensor:
    """One size group's ``(count * H, len_dst, C_v)`` attention from ``(count * H, len, C)``
    batches and its ``(count * H, len_dst, len_src)`` bias (``-inf`` outside the ``band``;
    ``None``: no bias and no band, then a plain softmax: no row is all ``-inf``).
    Written out as SDPA's math backend computes it: a mask that needs a gradient
    sends SDPA there anyway, and this form, twice differentiable as it stands, needs no
    recompute wrapper. The bias's gradient is the logits' gradient, one value per pair."""
    if g.len_dst == 0 or g.len_src == 0:  # no keys: the zero-output policy
        on_graph = q[:0].sum() + k[:0].sum() + v[:0].sum()
        on_graph = on_graph + bias[:0].sum() if bias is not None else on_graph
        return v.new_zeros(q.size(0), g.len_dst, v.size(2)) + on_graph
    if bias is None:
        assert band is None and dropout == 0, "the unbiased form computes complete graphs"
        logits = torch.baddbmm(_IGNORED_INPUT[q.dtype], q, k.transpose(1, 2), beta=0,
                               alpha=scale)
        return torch.bmm(torch.softmax(logits, dim=-1), v)
    if band is not None:
        rows, shifted = seeing_part(g.len_dst, g.len_src, band)
        if len(rows) < g.len_dst:  # blind targets get zeros, the rest are one run of rows
            seeing = SegmentGroup(g.count, len(rows), g.len_src)
            out = _written_out_group(seeing, q[:, rows.start:rows.stop], k, v,
                                          bias[:, rows.start:rows.stop], shifted, scale,
                                          dropout)
            return torch.cat([out.new_zeros(out.size(0), rows.start, out.size(2)), out,
                              out.new_zeros(out.size(0), g.len_dst - rows.stop, out.size(2))],
                             dim=1)
        bias = bias.masked_fill(~band_mask(band, g.len_dst, g.len_src, q.device),
                                float("-inf"))
    logits = torch.baddbmm(bias, q, k.transpose(1, 2), alpha=scale)
    weights = _safe_softmax(logits)
    if dropout > 0:
        weights = F.dropout(weights, dropout)
    return torch.bmm(weights, v)


def _safe_softmax(logits: Tensor) -> Tensor:
    """:class:`_SafeSoftmax`, or under ``torch.func`` transforms, which cannot run it, the same
    function in plain ops (the removed rows' logits are zeroed first, so no NaN reaches even
    the unused branch's gradient)."""
    if not functorch_active():
        return _SafeSoftmax.apply(logits)
    removed = logits.amax(dim=-1, keepdim=True) == float("-inf")
    return torch.where(removed, 0.0, torch.softmax(logits.masked_fill(removed, 0.0), dim=-1))


class _SafeSoftmax(torch.autograd.Function):
    """``softmax(logits, -1)`` with zero weights and zero gradients, not NaN, in rows whose
    logits are all ``-inf`` (a target whose every pair a ``-inf`` bias removes), as SDPA's
    math backend (``torch._safe_softmax``) gives; NaN and ``+inf`` still propagate. Its row test
    is one ``amax``: ``_safe_softmax``'s ``eq(-inf).all()`` took longer than the softmax
    itself on CPU. Twice differentiable: the backward is softmax's own, of the saved output."""

    @staticmethod
    def forward(ctx, logits: Tensor) -> Tensor:
        removed = logits.amax(dim=-1, keepdim=True) == float("-inf")
        # In place: the softmax's output is this function's own (one pass less than where).
        weights = torch.softmax(logits, dim=-1).masked_fill_(removed, 0.0)
        ctx.save_for_backward(weights)
        return weights

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (weights,) = ctx.saved_tensors
        return torch._softmax_backward_data(grad, weights, -1, weights.dtype)
