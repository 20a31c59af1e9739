"""Which route computes a call: every route decision, in one place.

The routes, by name:

- ``"sdpa"``: implicit graphs, ``F.scaled_dot_product_attention`` per group of equal-size graphs
  (:mod:`gatattn.backends.sdpa`);
- ``"logits"``: complete graphs of a few dozen nodes on CPU, their logits written out per group
  of equal-size graphs (:func:`gatattn.backends.sdpa.logits_attention`; only ``auto`` picks
  it, :func:`logits_route_serves`);
- ``"triton"``: the fused kernels, tiled for implicit graphs, CSR for edge sets
  (:mod:`gatattn.backends.fused`);
- ``"varlen"``: torch's ``varlen_attn`` (self-attention graphs on CUDA; only the race picks it);
- ``"csr"``: message passing over the edges in CSR order (:mod:`gatattn.backends.sparse`): on
  CPU the compiled kernels of :mod:`gatattn.backends.native`, elsewhere SDDMM and SpMM. ``auto``
  also runs implicit graphs of up to :data:`NATIVE_MAX_NODES` nodes there, their edges
  materialised once per graph (:func:`native_message_passing_serves`);
- ``"gathered"``: message passing written with per-edge gathers, as TransformerConv is: the
  form that takes per-edge features, forms differentiable attention weights and traces under
  ``torch.compile`` (which cannot trace sparse CSR tensors).

``backend="auto"`` takes SDPA (or, for small graphs on CPU, the compiled message passing or
written-out logits) for implicit graphs and message passing for edge sets, except
where the fused kernels may serve (CUDA, see :func:`fused_kernels_serve`): there the race of
:mod:`gatattn.backends.racing` decides, once per key. An explicit ``backend`` is honoured or
refused with a message that says what to use instead. Under ``torch.compile`` batched implicit
graphs run as one opaque operator (:func:`opaque_segments_serve`).
"""

from __future__ import annotations

import torch
from torch import Tensor

import gatattn.graph as limits  # the package: a caller sets its MAX_*_EDGES limits there
from gatattn.backends import racing
from gatattn.backends.fused import triton_unavailable_reason
from gatattn.backends.native import cpu_kernels
from gatattn.backends.nonfinite import SCANNED_DTYPES
from gatattn.graph import AttentionGraph
from gatattn.transforms import (
    compiling,
    eager_and_unwatched,
    ops_watched,
    plain_ops_only,
    recorded,
)

BACKENDS = ("auto", "triton", "sdpa", "sparse")
MAX_KERNEL_HEAD_DIM = 256
#: The ``"logits"`` route serves graphs up to this many targets and sources (its logits,
#: saved for the backward, cost at most this many floats per node and head).
LOGITS_MAX_NODES = 128
#: ``auto`` runs implicit graphs up to this many targets and sources through the compiled
#: message-passing kernels on CPU (:func:`native_message_passing_serves`).
NATIVE_MAX_NODES = 64
_CPU = torch.device("cpu")
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LOGITS_DTYPES = (torch.float32, torch.float64)


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run here (missing dependency, device or feature)."""


def races_on(device: torch.device) -> bool:
    """Whether ``auto`` may hand work to the fused kernels on ``device`` (and so races them).
    Tests widen it to the CPU, where the kernels run in Triton's interpreter."""
    return device.type == "cuda"


def choose(requested: str, graph: AttentionGraph, q: Tensor, k: Tensor, v: Tensor, *,
           scale: float, dropout: float, need_weights: bool, has_edge_attr: bool,
           has_bias: bool) -> str:
    """The route (a name above) that computes this call, refusing a ``requested`` backend that
    cannot compute it."""
    if requested not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {requested!r}")
    route = flagless_route(requested, graph, q, k, v, dropout=dropout,
                           need_weights=need_weights, has_bias=has_bias)
    if route is not None:
        return route  # (CPU: no kernel to race; below, each check costs a call's time)
    # Compiled, traced, transformed (torch.func) and meta calls need plain torch ops.
    message_passing = "gathered" if (has_edge_attr or need_weights
                                     or compiling()
                                     or plain_ops_only(q.device)) else "csr"
    torch_route = "sdpa" if graph.is_implicit else message_passing
    head_dim = max(q.size(-1), v.size(-1))
    if requested == "auto":
        if need_weights or not fused_kernels_serve(q.device, q.dtype, head_dim, dropout,
                                                   has_edge_attr, graph.is_implicit):
            return message_passing if need_weights else torch_route
        if has_bias:  # the race's candidates take no bias
            return torch_route
        route = racing.race(q, k, v, graph, scale)
        return message_passing if route == "sparse" else route
    if requested == "sdpa" and not graph.is_implicit:
        raise ValueError(
            "backend='sdpa' runs complete, batched, causal and bipartite graphs only; for an "
            "explicit edge_index use backend='sparse' or 'auto'")
    if requested in ("sdpa", "triton") and need_weights:
        raise ValueError(
            f"backend={requested!r} never forms the attention weights; use backend='auto' or "
            "'sparse' with return_attention_weights=True")
    if requested == "triton":
        refusal = kernel_refusal(q.dtype, head_dim, dropout, has_edge_attr)
        if refusal is not None:
            raise ValueError(f"backend='triton' {refusal}")
        if recorded():
            raise ValueError("backend='triton' runs kernels that torch.jit.trace and torch.func "
                             "transforms cannot see into; use backend='sdpa' or 'sparse'")
        reason = triton_unavailable_reason(q.device, q.dtype, graph.is_implicit)
        if reason is not None:
            raise BackendUnavailableError(f"backend='triton': {reason}")
        return "triton"
    return "sdpa" if requested == "sdpa" else message_passing


# ------------------------------------------------------------------ planned graph= calls


def planned_step(q, k, v, graph: AttentionGraph, scale, temperature: float,
                 requested: str) -> tuple[str, float, tuple[int, int, int]] | None:
    """The step (``"one graph"``: the logits route on one complete graph; ``"packed sdpa"``:
    SDPA over one group of equal-size graphs in order), the logit multiplier and the group's
    ``(count, len_dst, len_src)`` that an earlier call with this graph planned for calls like
    this one, or ``None``.

    A plan is kept by :func:`plan_step` after a call that checked everything, under a key of
    everything the checks and :func:`choose` read that a later call could change: the
    backend asked, ``scale`` and ``temperature``, the dtypes and per-row shapes of ``q``,
    ``k``, ``v``, the thread count and the routes' size limits; the graph itself never
    changes. What the key does not hold is checked here on every call: plain CPU tensors with
    the graph's row counts, and
    eager mode with nothing watching (not compiling, no trace, no ``torch.func`` transform,
    no user's dispatch mode, no race of the fused kernels)."""
    if not graph.planned_steps or not _plannable(q, k, v, graph):
        return None
    return graph.planned_steps.get(_call_key(q, k, v, scale, temperature, requested))


def plan_step(q: Tensor, k: Tensor, v: Tensor, graph: AttentionGraph, scale, temperature: float,
              requested: str, route: str, multiplier: float) -> None:
    """Keep the step that :func:`planned_step` serves later, after a ``graph=`` call with no
    other option (no bias, dropout, weights, edge features, lse, causal band or window) took
    ``route``: one complete graph on the logits route, or one group of equal-size graphs in
    order on the SDPA route (a positive scale, nonempty graphs; planned by an inference call
    only, the only kind it serves: a training call would plan again on every call)."""
    if not _plannable(q, k, v, graph) or graph.banded or not graph.is_implicit:
        return
    plan = graph.segment_plan()
    if len(plan.groups) != 1 or plan.order_dst is not None or plan.order_src is not None:
        return
    group = plan.groups[0]
    if route == "logits" and group.count == 1:
        step = "one graph"
    elif (route == "sdpa" and group.len_dst > 0 and group.len_src > 0 and multiplier > 0
          and q.dtype in SCANNED_DTYPES and k.dtype == q.dtype and v.dtype == q.dtype
          and not (torch.is_grad_enabled()
                   and (q.requires_grad or k.requires_grad or v.requires_grad))):
        step = "packed sdpa"
    else:
        return
    sizes = (group.count, group.len_dst, group.len_src)
    graph.planned_steps[_call_key(q, k, v, scale, temperature, requested)] = (
        step, multiplier, sizes)


def _call_key(q: Tensor, k: Tensor, v: Tensor, scale, temperature: float,
              requested: str) -> tuple:
    return (requested, scale, temperature, q.dtype, k.dtype, v.dtype, q.shape[1:], k.shape[1:],
            v.shape[1:], torch.get_num_threads(), limits.MAX_KEPT_EDGES, LOGITS_MAX_NODES,
            NATIVE_MAX_NODES)


def _plannable(q, k, v, graph: AttentionGraph) -> bool:
    """:func:`plannable_call`, with the graph's row counts."""
    return plannable_call(q, k, v) and q.size(0) == graph.num_dst and (
        k.size(0) == graph.num_src and v.size(0) == graph.num_src)


def plannable_call(q, k, v) -> bool:
    """Plain 3-D CPU tensors, in eager mode, nothing watching: a call a planned step may serve
    (:func:`planned_step` checks the rest)."""
    if not (type(q) is Tensor and type(k) is Tensor and type(v) is Tensor):  # noqa: E721
        return False  # (subclasses may watch their ops through __torch_function__)
    if not (q.dim() == 3 and k.dim() == 3 and v.dim() == 3 and q.is_cpu and k.is_cpu
            and v.is_cpu):
        return False
    return eager_and_unwatched() and not races_on(_CPU)


def reads_graph_sizes(requested: str, device: torch.device) -> bool:
    """Whether every route ``requested`` may take on ``device`` reads the graph sizes on the
    host (all but the fused kernels, which take ``ptr`` as it lies: an unvalidated ``ptr``
    call there reads nothing)."""
    return requested != "triton" and not (requested == "auto" and races_on(device))


def flagless_route(requested: str, graph: AttentionGraph, q: Tensor, k: Tensor, v: Tensor, *,
                   dropout: float, need_weights: bool, has_bias: bool) -> str | None:
    """The route :func:`choose` takes for an implicit graph where that route needs no finite
    flag (:mod:`gatattn.backends.nonfinite`): ``"csr"`` (message passing carries a non-finite
    value along edges by itself) or ``"logits"``; else ``None``. A call can ask before reading
    the host."""
    if not graph.is_implicit or need_weights or requested != "auto":
        return None
    if native_message_passing_serves(graph, q, k, v, dropout, has_bias):
        return "csr"
    return "logits" if logits_route_serves(graph, q, k, dropout, has_bias) else None


def native_message_passing_serves(graph: AttentionGraph, q: Tensor, k: Tensor, v: Tensor,
                                  dropout: float, has_bias: bool) -> bool:
    """Whether ``auto`` runs an implicit graph as message passing over its materialised edges
    in the compiled CPU kernels (:mod:`gatattn.backends.native`): batches of graphs of up to
    :data:`NATIVE_MAX_NODES` nodes with a bias, which the other routes gather per size group
    (forward 0.57x their time, forward and backward 0.63x, 0.81x with one thread), or with more
    than one thread, which the loops share out where per-size-group products do not (forward
    and backward 0.76-0.81x on batches of 10-60 nodes; the forward alone 0.98-1.17x, the price
    of one choice for both, so that a recomputing backward, as under ``torch.compile``, takes
    the forward's route; 1.2-1.7x on graphs of 60-300 nodes: benchmarks/bench_cpu.py case 4,
    bench_bias.py). Not one graph (its products are few and large). float32 / float64, equal
    heads, no dropout, not traced or compiled nor watched by a dispatch mode, and a batch whose
    edges the graph keeps (:data:`~gatattn.graph.MAX_KEPT_EDGES`). A stacked bias needs no
    gather there when the graphs lie in order (its rows are the edges' order)."""
    if compiling() or graph.membership is None or dropout != 0 or not q.is_cpu:
        return False
    if (not (has_bias or torch.get_num_threads() > 1) or q.dtype not in _LOGITS_DTYPES
            or k.shape[1] != q.shape[1] or plain_ops_only(q.device) or ops_watched()):
        return False
    plan = graph.segment_plan()
    return (plan.longest <= NATIVE_MAX_NODES and graph.num_edges() <= limits.MAX_KEPT_EDGES
            and cpu_kernels() is not None)


def logits_route_serves(graph: AttentionGraph, q: Tensor, k: Tensor, dropout: float,
                        has_bias: bool) -> bool:
    """Whether ``auto`` writes an implicit graph's logits out (the ``"logits"`` route) instead
    of calling SDPA: on CPU, where SDPA's fused kernel costs more than three batched products
    on small graphs (benchmarks/bench_cpu.py case 4, bench_overhead.py); complete graphs only
    (a mask would send the zero weights of removed pairs through the value product, and a
    NaN with them), in float32 / float64 (SDPA accumulates half precision in float32), equal
    heads, no dropout, no bias (which takes its own written-out form), and not under
    ``torch.compile``, which traces SDPA into its own kernels. The graphs may be at most
    :data:`LOGITS_MAX_NODES` nodes (larger ones cost more written out: logits are
    ``O(len^2)`` memory traffic, SDPA's kernel keeps them in cache)."""
    # Cheapest tests first: a graph= call on a small graph costs a few dozen microseconds.
    if (graph.causal or graph.window is not None or has_bias or dropout != 0 or not q.is_cpu
            or q.dtype not in _LOGITS_DTYPES or k.shape[1] != q.shape[1] or compiling()):
        return False
    plan = graph.segment_plan()
    # Equal-size graphs already in order are SDPA's (count, H, len, C) views as they lie;
    # this route would gather them head-major first, which costs more than it saves.
    in_order_batch = (len(plan.groups) == 1 and plan.groups[0].count > 1
                      and plan.order_dst is None and plan.order_src is None)
    return plan.longest <= LOGITS_MAX_NODES and not in_order_batch


def kernel_refusal(dtype: torch.dtype, head_dim: int, dropout: float,
                   has_edge_attr: bool) -> str | None:
    """What the fused kernels cannot compute in a call (completing "backend='triton' ..."), or
    ``None``: the one statement of their limits, for ``auto`` and for the refusal."""
    if dtype not in _KERNEL_DTYPES:
        return (f"computes in float16, bfloat16 or float32, got {dtype}; backend='sdpa' "
                "(implicit graphs) and 'sparse' compute in float64")
    if head_dim > MAX_KERNEL_HEAD_DIM:
        return (f"takes head dims up to {MAX_KERNEL_HEAD_DIM}, got {head_dim} channels per "
                "head; use backend='sdpa' or 'sparse'")
    if dropout > 0:
        return (f"has no attention dropout, got dropout={dropout}; use backend='sdpa' or "
                "'sparse'")
    if has_edge_attr:
        return "takes no edge features (edge_attr); use backend='sparse'"
    return None


def fused_kernels_serve(device: torch.device, dtype: torch.dtype, head_dim: int,
                        dropout: float, has_edge_attr: bool, implicit: bool) -> bool:
    """Whether ``auto`` may take the Triton kernels (once they pass verification and win the
    race, :mod:`gatattn.backends.racing`): where :func:`races_on` (CUDA), within
    :func:`kernel_refusal`'s limits, not under ``torch.compile`` (which traces SDPA and the
    gathered message passing into its own kernels), and fp16/bf16 (fp32 too for edge sets).
    Dense fp32 stays with SDPA: exact fp32 dots run on FMAs, whose register pressure leaves the
    tiled kernels only 16x16 tiles (benchmarks/results/kernel-resources-float32.md)."""
    dtypes = _KERNEL_DTYPES[:2] if implicit else _KERNEL_DTYPES
    return (races_on(device) and dtype in dtypes and not compiling()
            and not recorded()
            and kernel_refusal(dtype, head_dim, dropout, has_edge_attr) is None
            and triton_unavailable_reason(device, dtype, implicit) is None)


def opaque_sequences_serve(key_padding_mask, attn_mask) -> bool:
    """Whether :class:`gatattn.MultiheadAttention` runs its attention as the opaque operator
    ``gatattn::sequence_attention``: under ``torch.compile`` / ``torch.export`` with a mask,
    whose values decide the graph (without one, its sequences are complete graphs)."""
    return compiling() and (key_padding_mask is not None or attn_mask is not None)


def opaque_segments_serve(edge_index, batch, ptr, edge_attr, dropout: float,
                          need_weights: bool, backend: str) -> bool:
    """Whether batched implicit graphs run as the opaque operator ``gatattn::segment_attention``:
    under ``torch.compile`` / ``torch.export``, whose tracing cannot read the graph sizes that
    grouping by size needs; with dropout too (its backward replays the mask from a seed). Not
    with edge features or attention weights: those keep their routes."""
    return (compiling() and edge_index is None
            and (batch is not None or ptr is not None) and edge_attr is None
            and not need_weights and backend in ("auto", "sdpa"))
