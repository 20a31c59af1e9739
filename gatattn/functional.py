"""``gatattn.attention``: the one entry point. A call is prepared (inputs checked, the graph
taken or built, scale, edge features and bias laid out for it), its route chosen by
:mod:`gatattn.backends.routing`, and run."""

from __future__ import annotations

import math

from torch import Tensor

from gatattn.adjacency import read_adjacency
from gatattn.backends import routing, sdpa_attention, sparse_attention, triton_attention
from gatattn.backends.common import repeat_kv_heads
from gatattn.backends.nonfinite import finite_flag, inputs_finite
from gatattn.backends.ops import traced_segment_attention
from gatattn.backends.sdpa import logits_attention
from gatattn.backends.sdpa import planned_step as planned_sdpa_step
from gatattn.backends.varlen import varlen_attention
from gatattn.bias import check_bias_rows, check_bias_tensor, materialized_bias
from gatattn.graph import (
    AttentionGraph,
    causal_mode,
    check_graph_devices,
    describe_graph,
    described_ptr_graph,
    graph_membership,
    validation_enabled,
)
from gatattn.graph.switches import window_mode
from gatattn.transforms import (
    compiling,
    recorded,
    refuse_traced_causal,
    refuse_unread_graph,
)


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    graph: AttentionGraph | None = None,
    edge_index: Tensor | None = None,
    batch: Tensor | tuple[Tensor, Tensor] | None = None,
    ptr: Tensor | tuple[Tensor, Tensor] | None = None,
    causal: bool | str = False,
    window: tuple[int | None, int | None] | None = None,
    scale: float | None = None,
    temperature: float = 1.0,
    dropout: float = 0.0,
    edge_attr: Tensor | None = None,
    attn_bias: Tensor | None = None,
    return_attention_weights: bool = False,
    backend: str = "auto",
    return_lse: bool = False,
) -> Tensor | tuple:
    r"""Multi-head scaled-dot-product attention over a graph.

    For a target ``i`` with in-neighbours ``N(i)`` (edges ``j -> i``):

    .. math::
        \alpha_{ij} = \operatorname{softmax}_{j \in N(i)}
            \left(\langle q_i, k_j + e_{ij} \rangle \cdot \frac{\text{scale}}{\tau}
            + b_{ij}\right),
        \qquad o_i = \sum_{j \in N(i)} \alpha_{ij} (v_j + e_{ij})

    The graph is one complete graph over all nodes when neither ``edge_index`` nor
    ``batch`` / ``ptr`` is given; one complete graph per graph of a PyG batch with ``batch`` or
    ``ptr``; restricted to ``pos(j) <= pos(i)`` inside each graph with ``causal``; bipartite
    (cross-attention) when ``q`` and ``k`` have different node counts or ``batch`` / ``ptr`` is a
    ``(dst, src)`` pair; any edge set with ``edge_index``. A target with no in-edge gets zeros.

    Causal graphs are aligned top-left by default, as SDPA's ``is_causal``: target position
    ``i`` sees source positions ``0..i``. ``causal="bottom_right"`` aligns each graph's last
    target with its last source, as FlashAttention and ``varlen_attn``: target ``i`` of a graph
    with ``n_dst`` targets and ``n_src`` sources sees ``0..i + n_src - n_dst`` (new queries
    attending to cached keys; targets that see nothing get zeros). The two differ on bipartite
    graphs only.

    ``window=(left, right)`` narrows each graph to a band around that diagonal, a sliding
    window (FlashAttention's ``window_size``): target ``i`` keeps the sources ``pos(i) + d -
    left <= pos(j) <= pos(i) + d + right`` (``None``: no bound on a side; with ``causal``,
    ``right`` is 0). SDPA computes a narrow band in chunks of rows against the keys they see
    (other bands under a band mask), message passing builds only the band's edges, the Triton
    kernels skip tiles outside it; an edge set keeps its edges inside the band.

    Args:
        q: ``(N_dst, H, C)`` queries.
        k: ``(N_src, H_kv, C)`` keys; ``H_kv`` divides ``H`` (grouped-query attention: query
            head ``h`` reads kv head ``h // (H // H_kv)``, SDPA's ``enable_gqa`` convention).
        v: ``(N_src, H_kv, C_v)`` values.
        graph: the graph as one object (:func:`gatattn.build_graph`), built once per batch:
            the call then reads nothing on the host and re-derives nothing; it excludes
            ``edge_index``, ``batch``, ``ptr``, ``causal`` and ``window``, the shorthand that
            builds one per call. (default: :obj:`None`)
        edge_index: ``(2, E)`` edges, row 0 sources, row 1 targets, or PyG's ``adj_t`` as a
            ``torch.sparse`` COO/CSR/CSC tensor or ``SparseTensor`` (row ``i`` lists the sources
            of target ``i``), or an :class:`torch_geometric.EdgeIndex`. (default: :obj:`None`)
        batch: graph id of each node, or a ``(batch_dst, batch_src)`` pair; need not be sorted
            (a graph's node order is its order of appearance). (default: :obj:`None`)
        ptr: ``(B + 1,)`` graph offsets (PyG's ``Batch.ptr``), or a ``(ptr_dst, ptr_src)`` pair.
            (default: :obj:`None`)
        causal: keep only ``pos(j) <= pos(i)`` inside each graph (``True`` or
            ``"top_left"``), or ``pos(j) <= pos(i) + n_src - n_dst`` (``"bottom_right"``).
            (default: :obj:`False`)
        window: ``(left, right)`` sliding window around the diagonal (above); ``None`` for
            a side without bound. (default: :obj:`None`)
        scale: logit scale; default ``1 / sqrt(C)``. (default: :obj:`None`)
        temperature: logits are divided by it, so the logit multiplier is
            ``scale / temperature``. (default: :obj:`1.0`)
        dropout: dropout probability on the attention weights, always applied when > 0 (pass
            0 in eval mode, as ``F.scaled_dot_product_attention``). (default: :obj:`0.0`)
        edge_attr: ``(E, H, C)`` per-edge terms added to keys and values, as
            ``TransformerConv`` does; needs ``edge_index`` and ``C_v == C``.
            (default: :obj:`None`)
        attn_bias: additive per-head logit bias ``b_ij``, differentiable, cast to ``q``'s
            dtype. With ``edge_index``: ``(E, H)``, one row per edge. On implicit graphs: each
            graph's full ``n_dst x n_src`` block, target-major, graphs in id order, stacked to
            ``(sum_b n_dst_b * n_src_b, H)`` (:mod:`gatattn.bias` builds it from a padded
            ``(B, H, L, S)`` tensor); pairs a causal graph or a window excludes are ignored.
            A ``-inf`` entry removes its pair, as in SDPA's float mask: a target left without
            pairs gets zeros and zero gradients; NaN and ``+inf`` propagate (IEEE). Its
            gradient is deterministic on every route. (default: :obj:`None`)
        return_attention_weights: also return ``(edge_index, alpha)`` with ``alpha`` of shape
            ``(E, H)`` (before dropout, differentiable), in the adjacency's edge order and
            layout (a SparseTensor holding them for a SparseTensor); an implicit graph is
            materialised for this, up to :data:`gatattn.graph.MAX_MATERIALIZED_EDGES` edges.
            (default: :obj:`False`)
        backend: ``"auto"``, ``"sdpa"`` (implicit graphs only), ``"sparse"`` (message passing;
            materialises implicit graphs) or ``"triton"`` (fused kernels: tiled for implicit
            graphs, CSR for edge sets; no dropout, weights or edge features).
            (default: :obj:`"auto"`)
        return_lse: also return each target's log-sum-exp ``lse_i = log sum_j exp s_ij``
            over the sources it keeps (the softmax normaliser, before dropout), ``(N_dst, H)``,
            natural log, float32 (float64 for float64 inputs), ``-inf`` for a target with no
            source (whose output is 0). Partial results over disjoint source sets merge
            with :func:`gatattn.merge_attention` (ring attention, split-KV decoding). It is
            differentiable on every route (second derivatives too, as the output's). The
            message-passing routes and the Triton kernels form it anyway; the SDPA route
            (whose torch op does not return it) computes it again from the same logits: one
            more ``q k^T`` product per size group, in chunks of target rows. Calls that do not
            ask pay nothing. Refused for ``batch`` / ``ptr`` graphs under ``torch.compile`` /
            ``torch.export`` (the operator ``gatattn::segment_attention`` returns no lse).
            (default: :obj:`False`)

    Returns:
        ``(N_dst, H, C_v)``, possibly a non-contiguous view (merge heads with ``reshape``);
        then ``(edge_index, alpha)`` and ``lse``, each if asked, in that order: ``out, lse`` or
        ``out, (edge_index, alpha), lse``.

    Every route is twice differentiable (SDPA with dropout refuses a recorded backward). A
    non-finite input reaches only the outputs that read it through an edge (README, Numerics).

    Under ``torch.compile`` and ``torch.export``, ``batch`` / ``ptr`` graphs (dropout included)
    run as one opaque operator, ``gatattn::segment_attention``: no graph break, and one compile
    serves batches of any sizes (``dynamic=True``). It has first derivatives only; second
    derivatives are refused there (eager mode has them).

    Grouped-query heads run natively on the SDPA route (``enable_gqa``, without a bias) and in
    the fused Triton route's tiled kernels (implicit graphs); the message-passing and
    ``varlen_attn`` routes, the Triton CSR kernels (edge sets), the SDPA route with a bias, and
    batched graphs under ``torch.compile`` expand ``k`` and ``v`` to ``H`` heads first (``H /
    H_kv`` times their memory). ``attn_bias``, ``edge_attr`` and the attention weights stay per
    query head.

    With ``attn_bias``, ``auto`` does not race the fused kernels (it takes SDPA or message
    passing); ``backend="triton"`` runs them.
    """
    # A call with nothing else to do than attend over complete graphs takes the step planned by
    # an earlier call with its graph for these shapes, if any (on small graphs the checks and
    # the route choice cost a fifth of the attention, more right after it streamed the
    # caches): a graph= call at once, a keyword call once it has its graph.
    plain = (edge_index is None and causal is False and window is None and dropout == 0
             and edge_attr is None and attn_bias is None and not return_attention_weights
             and not return_lse)
    if plain and graph is not None and batch is None and ptr is None and isinstance(
            graph, AttentionGraph):
        out = _planned(q, k, v, graph, scale, temperature, backend, validation_enabled())
        if out is not None:
            return out
    if plain and graph is None and batch is None and type(ptr) is Tensor:  # noqa: E721
        out = _planned_for_ptr(q, k, v, ptr, scale, temperature, backend)
        if out is not None:
            return out
    given_scale, described = scale, graph is not None or batch is not None or ptr is not None
    validate_qkv(q, k, v)
    validate_scalars(scale, dropout)
    scale = logit_multiplier(default_scale(q) if scale is None else scale, temperature)
    if attn_bias is not None:
        check_bias_tensor(attn_bias, q)
        attn_bias = attn_bias.to(q.dtype)
    adjacency = None
    refuse_unread_graph(q.device, edge_index, batch, ptr, graph)
    if graph is not None:
        check_graph_call(graph, q, k, edge_index, batch, ptr, causal, window)
        validate, inputs_finite = False, None  # checked when it was built; nothing is read
    else:
        refuse_traced_causal(*causal_mode(causal), q.size(0), k.size(0), edge_index, window)
        adjacency = read_adjacency(edge_index) if edge_index is not None else None
        edge_index = adjacency.edge_index if adjacency is not None else None
        check_graph_devices(q.device, edge_index=edge_index, batch=batch, ptr=ptr)
        bipartite = isinstance(batch, (tuple, list)) or isinstance(ptr, (tuple, list)) or (
            q.size(0) != k.size(0))
        if routing.opaque_segments_serve(edge_index, batch, ptr, edge_attr, dropout,
                                         return_attention_weights, backend):
            if return_lse:
                raise ValueError(
                    "return_lse=True is not available for batch=/ptr= graphs under "
                    "torch.compile / torch.export: they run as the operator "
                    "gatattn::segment_attention, which returns no log-sum-exp; call "
                    "attention() outside the compiled region for the lse")
            return _opaque_segments(q, k, v, batch, ptr, causal, window, bipartite, scale,
                                    attn_bias, dropout)
        # Meta tensors hold no values to check.
        validate = (validation_enabled() and not compiling()
                    and q.device.type != "meta")
        # Whether q, k, v are finite is read in the graph's one host read (dense routes but
        # the logits route use it); a recorded call (trace, torch.func) must not branch on it:
        # the repair is exact.
        def flag_for(known: AttentionGraph | None) -> Tensor | None:
            if known is not None and routing.flagless_route(
                    backend, known, q, k, v, dropout=dropout, need_weights=return_attention_weights,
                    has_bias=attn_bias is not None) is not None:
                return None
            return finite_flag(q, k, v)

        graph, inputs_finite = describe_graph(
            q.size(0), k.size(0), edge_index=edge_index, batch=batch, ptr=ptr, causal=causal,
            window=window, bipartite=bipartite, validate=validate,
            finite_flag=flag_for if validate and edge_index is None and not recorded() else None,
            # Reusing a graph costs a read: not where an unvalidated ptr would read nothing.
            reuse=validate or batch is not None or routing.reads_graph_sizes(backend, q.device))
        if plain and inputs_finite is not False:  # (non-finite inputs: the exact repair)
            out = _planned(q, k, v, graph, given_scale, temperature, backend,
                           inputs_finite is None and validation_enabled())
            if out is not None:
                return out
    _validate_edge_attr(edge_attr, graph, q, v)
    if edge_attr is not None and graph.kept_edges is not None:
        edge_attr = edge_attr[graph.kept_edges]
    if attn_bias is not None:
        check_bias_rows(attn_bias, graph, q.size(1), validate)
        if graph.kept_edges is not None:
            attn_bias = attn_bias[graph.kept_edges]

    route = routing.choose(backend, graph, q, k, v, scale=scale, dropout=dropout,
                           need_weights=return_attention_weights,
                           has_edge_attr=edge_attr is not None, has_bias=attn_bias is not None)
    if plain and described:  # (a graph that later calls get again: given, or reused)
        routing.plan_step(q, k, v, graph, given_scale, temperature, backend, route, scale)
    if route == "sdpa":
        return sdpa_attention(q, k, v, graph, scale=scale, dropout=dropout, bias=attn_bias,
                              inputs_finite=inputs_finite, return_lse=return_lse)
    if route == "logits":
        return logits_attention(q, k, v, graph, scale=scale, return_lse=return_lse)
    if route == "triton":
        return triton_attention(q, k, v, graph, scale=scale, bias=attn_bias,
                                inputs_finite=inputs_finite, return_lse=return_lse)
    if route == "varlen":
        return varlen_attention(q, k, v, graph, scale=scale, inputs_finite=inputs_finite,
                                return_lse=return_lse)
    edge_index = graph.to_edge_index()
    if attn_bias is not None and graph.is_implicit:
        attn_bias = materialized_bias(attn_bias, graph, edge_index)
    out, alpha, *lse = sparse_attention(q, k, v, edge_index, scale=scale, dropout=dropout,
                                        edge_attr=edge_attr, bias=attn_bias,
                                        differentiable_weights=return_attention_weights,
                                        graph=graph, form=route, return_lse=return_lse)
    if not return_attention_weights:
        return (out, *lse) if return_lse else out
    if adjacency is None or graph.kept_edges is not None:
        return out, (edge_index, alpha), *lse
    return out, adjacency.with_weights(alpha), *lse


def _planned(q, k, v, graph: AttentionGraph, scale, temperature: float, backend: str,
             guard: bool) -> Tensor | None:
    """The planned step's output (:func:`gatattn.backends.routing.planned_step`), or ``None``
    where there is no plan for this call or the step cannot serve it. ``guard``: the whole
    output turns NaN if an input is not finite (a ``graph=`` call with validation on)."""
    planned = routing.planned_step(q, k, v, graph, scale, temperature, backend)
    if planned is None:
        return None
    step, multiplier, sizes = planned
    return planned_sdpa_step(step, q, k, v, sizes, multiplier, guard)


def _planned_for_ptr(q, k, v, ptr: Tensor, scale, temperature: float,
                     backend: str) -> Tensor | None:
    """A ``ptr=`` call's planned step, where an earlier call described this very ``ptr`` (its
    graph kept by :func:`~gatattn.graph.describe_graph`), ``ptr`` still holds those values, the
    graph planned a step for calls like this one and, for SDPA with validation on, ``q``, ``k``,
    ``v`` are finite: the full call's checks and its one host read, without its Python. ``None``
    otherwise: the full call runs (non-finite inputs: the exact repair)."""
    if not (ptr.is_cpu and routing.plannable_call(q, k, v)):
        return None
    validate = validation_enabled()
    if not (validate or routing.reads_graph_sizes(backend, q.device)):
        return None  # (such calls keep no graph)
    graph = described_ptr_graph(ptr, q.size(0), k.size(0), validate)
    if graph is None:
        return None
    planned = routing.planned_step(q, k, v, graph, scale, temperature, backend)
    if planned is None:
        return None
    step, multiplier, sizes = planned
    # (the logits route, "one graph", contains non-finite inputs by itself: no flag)
    if validate and step == "packed sdpa" and not inputs_finite(q, k, v):
        return None
    return planned_sdpa_step(step, q, k, v, sizes, multiplier, False)


def check_graph_call(graph: AttentionGraph, q: Tensor, k: Tensor, edge_index, batch, ptr,
                     causal, window=None) -> None:
    """What a ``graph=`` call can check for free: no second description, row counts, device."""
    if not isinstance(graph, AttentionGraph):
        raise TypeError(f"graph must be a gatattn.AttentionGraph (gatattn.build_graph(...)), "
                        f"got {type(graph).__name__}")
    if (edge_index is not None or batch is not None or ptr is not None or causal is not False
            or window is not None):
        given = [name for name, value in (("edge_index", edge_index), ("batch", batch),
                                          ("ptr", ptr), ("window", window)) if value is not None]
        given += ["causal"] if causal is not False else []
        raise ValueError(f"graph= already describes the graph; got {', '.join(given)} as well: "
                         "give them to gatattn.build_graph(...) instead, or drop graph=")
    if q.size(0) != graph.num_dst or k.size(0) != graph.num_src:
        raise ValueError(
            f"the graph has {graph.num_dst} targets and {graph.num_src} sources, but q has "
            f"{q.size(0)} rows and k has {k.size(0)}; build the graph for these nodes")
    if graph.device is not None and graph.device != q.device:
        raise ValueError(f"the graph is on {graph.device} but q, k, v are on {q.device}; move "
                         f"it with graph.to({str(q.device)!r})")


def _opaque_segments(q, k, v, batch, ptr, causal, window, bipartite: bool, scale: float,
                     attn_bias: Tensor | None, dropout: float) -> Tensor:
    """Batched graphs under ``torch.compile`` / ``torch.export``: one opaque operator."""
    batch_dst, batch_src = graph_membership(q.size(0), k.size(0), batch=batch, ptr=ptr,
                                            bipartite=bipartite, validate=False)
    # The operator's ONNX decomposition computes equal heads: grouped kv heads expand.
    k, v = repeat_kv_heads(k, q.size(1)), repeat_kv_heads(v, q.size(1))
    causal, bottom_right = causal_mode(causal)
    left, right = window_mode(window, causal) or (None, None)
    return traced_segment_attention(q, k, v, batch_dst, batch_src if bipartite else None, scale,
                                    causal, attn_bias, bottom_right and bipartite, dropout,
                                    window=(left, right))


def validate_qkv(q: Tensor, k: Tensor, v: Tensor) -> None:
    """Refuses ``q``, ``k``, ``v`` that no route takes (shapes, heads, dtypes, devices)."""
    # Every call runs this: one test of everything first (a few microseconds less on small
    # graphs), the checks that say what is wrong only where something is.
    if (isinstance(q, Tensor) and isinstance(k, Tensor) and isinstance(v, Tensor)
            and q.dim() == 3 and k.dim() == 3 and v.dim() == 3):
        (_, H, C), (n_k, H_kv, C_k), (n_v, H_v, C_v) = q.shape, k.shape, v.shape
        if (H_kv == H_v and H_kv != 0 and H != 0 and H % H_kv == 0 and C == C_k != 0
                and C_v != 0 and n_k == n_v and q.dtype == k.dtype == v.dtype
                and q.is_floating_point() and q.device == k.device == v.device):
            return
    _refuse_qkv(q, k, v)


def _refuse_qkv(q: Tensor, k: Tensor, v: Tensor) -> None:
    """:func:`validate_qkv`'s refusals, one message per fault."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a (num_nodes, heads, channels) tensor, got "
                            f"{type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(
                f"{name} must be (num_nodes, heads, channels), got {tuple(t.shape)}; "
                f"reshape it with .view(num_nodes, heads, channels)")
    (_, H, C), (n_k, H_kv, C_k), (n_v, H_v, C_v) = q.shape, k.shape, v.shape
    if H_kv != H_v:
        raise ValueError(f"k and v must have the same number of heads, got {H}, {H_kv} and "
                         f"{H_v} heads for q, k and v (q's may be a multiple of theirs: "
                         "grouped-query attention)")
    if H % max(H_kv, 1) or (H_kv == 0 < H):  # no heads: below
        raise ValueError(
            f"q has H={H} heads and k, v have H_kv={H_kv}: grouped-query attention needs H_kv "
            f"to divide H; use the same number of heads, or kv heads that divide {H}; got "
            f"{H}, {H_kv} and {H_v} heads for q, k and v")
    if C != C_k:
        raise ValueError(f"q and k must have the same channels per head, got {C} and {C_k}")
    if n_k != n_v:
        raise ValueError(
            f"k and v must have one row per source node, got {n_k} and {n_v} rows")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}; "
                         "cast them to one dtype")
    if not (q.device == k.device == v.device):
        raise ValueError(
            f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    if not q.is_floating_point():
        raise TypeError(f"q, k and v must be floating point, got {q.dtype}")
    if H == 0:
        raise ValueError(f"attention needs at least one head, got q of shape {tuple(q.shape)}")
    if C == 0 or C_v == 0:
        raise ValueError(
            f"attention needs at least one channel per head, got q {tuple(q.shape)} and v "
            f"{tuple(v.shape)}")


def validate_scalars(scale: float | None, dropout: float) -> None:
    """Refuses a non-finite ``scale`` and a ``dropout`` outside [0, 1)."""
    if scale is not None and not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number (or None for 1/sqrt(C)), got {scale}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")


def default_scale(q: Tensor) -> float | Tensor:
    """``1 / sqrt(C)``. Under ``torch.jit.trace`` the head width is a traced 0-dim integer
    tensor whose power would be float32 (a float64 call traced would lose its scale's last 29
    bits): it is raised in float64."""
    channels = q.size(-1)
    return channels.double() ** -0.5 if isinstance(channels, Tensor) else channels ** -0.5


def logit_multiplier(scale: float, temperature: float) -> float:
    """``scale / temperature``, refused where it overflows (a tiny temperature): every logit
    would be +-inf or NaN."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 (inf gives uniform weights), got "
                         f"{temperature}")
    multiplier = scale / temperature
    # Comparisons, not math.isfinite: traced with dynamic=True the multiplier can be a
    # symbolic float, which torch.compile can compare but not pass to math.isfinite.
    if not -math.inf < multiplier < math.inf:  # also refuses NaN
        raise ValueError(
            f"scale / temperature = {scale} / {temperature} overflows to {multiplier}; use a "
            "larger temperature (below about 1e-30 float32 logits overflow anyway)")
    return multiplier


def _validate_edge_attr(edge_attr: Tensor | None, graph: AttentionGraph, q: Tensor,
                        v: Tensor) -> None:
    if edge_attr is None:
        return
    if graph.is_implicit:
        raise ValueError("edge_attr needs an explicit edge_index (one row of edge_attr per edge)")
    expected = (graph.num_given_edges, q.size(1), q.size(2))
    if tuple(edge_attr.shape) != expected:
        raise ValueError(
            f"edge_attr must be (num_edges, heads, channels) = {expected}, got "
            f"{tuple(edge_attr.shape)}"
        )
    if v.size(2) != q.size(2):
        raise ValueError(
            f"edge_attr is added to keys and values, so they need equal channels; got "
            f"{q.size(2)} and {v.size(2)}"
        )
