"""``attention(..., return_lse=True)``: each target's log-sum-exp on every route and graph kind
against the reference's (forward, and gradients through the output and the lse), and
``merge_attention``, which rebuilds full attention from parts over disjoint source sets."""

from __future__ import annotations

import pytest
import torch

import gatattn
from gatattn import reference
from gatattn.backends import sdpa as sdpa_backend
from gatattn.bias import stacked_from_padded, stacked_to_dense
from tests.conftest import INTERPRETER_REPEAT, LOW_PRECISION, assert_close

NEG_INF = float("-inf")
HEADS, CHANNELS = 2, 4


def _offsets(sizes):
    return torch.tensor([0, *sizes]).cumsum(0)


@pytest.fixture
def routes(monkeypatch):
    """The routes that ``routing.choose`` picked during the test, so that each test checks the
    route it names."""
    chosen = []
    choose = gatattn.functional.routing.choose

    def spy(*args, **kwargs):
        chosen.append(choose(*args, **kwargs))
        return chosen[-1]

    monkeypatch.setattr(gatattn.functional.routing, "choose", spy)
    return chosen


def assert_lse_close(name, got, ref_hi, ref_lo=None):
    """``-inf`` exactly where the reference has it; the rest under the tolerance rule."""
    assert got.dtype == (torch.float64 if ref_hi.dtype == got.dtype == torch.float64
                         else torch.float32), got.dtype
    empty = ref_hi == NEG_INF
    assert torch.equal(got == NEG_INF, empty), f"{name}: -inf rows differ from the reference's"

    def fill(t):
        return None if t is None else t.detach().masked_fill(empty, 0.0)

    assert_close(name, fill(got), fill(ref_hi), fill(ref_lo))


ROUTES = {  # name: (backend, extra keywords, dtypes)
    "sdpa": ("sdpa", {}, (torch.float64, torch.float32)),
    "csr": ("sparse", {}, (torch.float64, torch.float32)),
    "gathered": ("sparse", {"return_attention_weights": True}, (torch.float64,)),
    "triton": ("triton", {}, (torch.float32, torch.float16)),
}
ROUTE_DTYPES = [(name, dtype) for name, (_, _, dtypes) in ROUTES.items() for dtype in dtypes]
# (the kernels in float32 repeat their float16 cases in the interpreter: make test-heavy)
ROUTE_DTYPE_CASES = [pytest.param(name, dtype, marks=[INTERPRETER_REPEAT] if (
    name, dtype) == ("triton", torch.float32) else []) for name, dtype in ROUTE_DTYPES]

IMPLICIT = {  # name: (sizes_dst, sizes_src or None for self-attention, causal)
    "complete": ([7], None, False),
    "batched": ([4, 0, 3, 6], None, False),
    "causal": ([3, 6, 1], None, True),
    "bipartite": ([3, 5, 2], [4, 2, 6], False),
    "bipartite-top-left": ([5, 3], [3, 6], True),
    "bipartite-bottom-right": ([5, 3], [3, 6], "bottom_right"),  # graph 0: 2 blind targets
}


def _padded_bias(sizes_dst, sizes_src, gen):
    """A random bias whose ``-inf`` entries remove every pair of target 1 in head 0 and the
    first pair of target 0 in both heads."""
    bias = torch.randn(len(sizes_dst), HEADS, max(sizes_dst), max(sizes_src), generator=gen)
    bias[:, 0, 1, :] = NEG_INF
    bias[:, :, 0, 0] = NEG_INF
    return bias


def _implicit_case(kind, dtype, with_bias=False, kv_heads=HEADS):
    sizes_dst, sizes_src, causal = IMPLICIT[kind]
    bipartite = sizes_src is not None
    sizes_src = sizes_src if bipartite else sizes_dst
    gen = torch.Generator().manual_seed(0)
    n_dst, n_src = sum(sizes_dst), sum(sizes_src)
    q = torch.randn(n_dst, HEADS, CHANNELS, generator=gen)
    k, v = (torch.randn(n_src, kv_heads, CHANNELS, generator=gen) for _ in range(2))
    inputs = [q, k, v]
    if with_bias:
        inputs.append(stacked_from_padded(_padded_bias(sizes_dst, sizes_src, gen), sizes_dst,
                                          sizes_src))
    inputs = [t.to(dtype).requires_grad_() for t in inputs]
    ptr_dst, ptr_src = _offsets(sizes_dst), _offsets(sizes_src)
    graph_kw = {} if kind == "complete" else {
        "ptr": (ptr_dst, ptr_src) if bipartite else ptr_dst, "causal": causal}
    mask = reference.block_mask(sizes_dst, sizes_src, causal)

    def run(q, k, v, bias=None, **kw):
        return gatattn.attention(q, k, v, attn_bias=bias, **graph_kw, **kw)

    def ref(q, k, v, bias=None, compute_dtype=torch.float64):
        dense = None if bias is None else stacked_to_dense(bias, ptr_dst, ptr_src)
        return reference.attention(q, k, v, mask, bias=dense, compute_dtype=compute_dtype,
                                   return_lse=True)

    return inputs, run, ref


def _edge_case(dtype, with_bias=False):
    """An edge set with a duplicate edge, self loops and an isolated target (node 5)."""
    edge_index = torch.tensor([[0, 1, 2, 3, 1, 4, 0, 2, 2, 3],
                               [1, 1, 2, 0, 0, 3, 4, 4, 4, 2]])
    num_nodes, num_edges = 6, edge_index.size(1)
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn(num_nodes, HEADS, CHANNELS, generator=gen) for _ in range(3)]
    if with_bias:
        bias = torch.randn(num_edges, HEADS, generator=gen)
        bias[8] = bias[7]  # a duplicate edge: the dense reference holds one bias per pair
        bias[[2, 9], 0] = NEG_INF  # target 2 loses both its edges in head 0
        bias[[7, 8], 1] = NEG_INF  # target 4 its duplicated edge in head 1, not edge 6
        inputs.append(bias)
    inputs = [t.to(dtype).requires_grad_() for t in inputs]
    counts = reference.edge_counts(edge_index, num_nodes, num_nodes)

    def run(q, k, v, bias=None, **kw):
        return gatattn.attention(q, k, v, edge_index=edge_index, attn_bias=bias, **kw)

    def ref(q, k, v, bias=None, compute_dtype=torch.float64):
        dense = None
        if bias is not None:
            # A duplicated pair holds the mean of its edges' (equal) biases: then each edge's
            # gradient is its share of the pair's, as the edge's own logit gets.
            dst, src = edge_index[1], edge_index[0]
            dense = bias.new_zeros(num_nodes, num_nodes, HEADS).index_put(
                (dst, src), bias, accumulate=True) / counts.clamp(min=1).unsqueeze(-1)
        return reference.attention(q, k, v, counts, bias=dense, compute_dtype=compute_dtype,
                                   return_lse=True)

    return inputs, run, ref


def _loss(out, lse, g_out, g_lse):
    # -inf entries carry no gradient in the reference either: masked out of the loss.
    return (out * g_out).sum() + (lse.masked_fill(lse == NEG_INF, 0.0) * g_lse).sum()


def _check(run, ref, inputs, names=("q", "k", "v", "bias")):
    """``run(*inputs) -> (out, lse)`` and the gradients of a random combination of both,
    against the reference in float64 (and in the inputs' half precision)."""
    out, lse = run(*inputs)
    assert lse.shape == out.shape[:2]
    gen = torch.Generator().manual_seed(1234)
    g_out = torch.randn(out.shape, generator=gen).to(out.dtype)
    g_lse = torch.randn(lse.shape, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad(_loss(out, lse, g_out, g_lse.to(lse.dtype)), inputs)

    hi = [t.detach().double().requires_grad_() for t in inputs]
    out_hi, lse_hi = ref(*hi)
    grads_hi = torch.autograd.grad(_loss(out_hi, lse_hi, g_out.double(), g_lse), hi)
    out_lo = lse_lo = None
    grads_lo = [None] * len(inputs)
    if inputs[0].dtype in LOW_PRECISION:
        out_lo, lse_lo = ref(*inputs, compute_dtype=None)
        grads_lo = torch.autograd.grad(_loss(out_lo, lse_lo, g_out, g_lse.to(lse_lo.dtype)),
                                       inputs)
    assert_close("out", out, out_hi, out_lo)
    assert_lse_close("lse", lse, lse_hi, lse_lo)
    for name, g, g_hi, g_lo in zip(names, grads, grads_hi, grads_lo, strict=False):
        assert_close(f"d{name}", g, g_hi, g_lo)


def _route_keywords(route):
    backend, extra, _ = ROUTES[route]
    return {"backend": backend, **extra}


def _lse_only(route):
    """``run`` keywords for ``route`` and a wrapper that keeps ``(out, lse)`` (the gathered
    route is reached by also asking for the weights)."""
    keywords = _route_keywords(route)

    def pick(result):
        return (result[0], result[-1])

    return keywords, pick


@pytest.mark.parametrize("route,dtype", ROUTE_DTYPE_CASES)
@pytest.mark.parametrize("kind", list(IMPLICIT))
def test_implicit_graphs(route, dtype, kind, routes):
    inputs, run, ref = _implicit_case(kind, dtype)
    keywords, pick = _lse_only(route)
    _check(lambda *a: pick(run(*a, return_lse=True, **keywords)), ref, inputs)
    assert set(routes) == {route}


@pytest.mark.parametrize("route,dtype", ROUTE_DTYPE_CASES)
@pytest.mark.parametrize("kind", ["batched", "bipartite-bottom-right", "causal"])
def test_implicit_graphs_with_bias(route, dtype, kind, routes):
    """The lse includes the bias; a target whose pairs a -inf bias all removes gets -inf."""
    inputs, run, ref = _implicit_case(kind, dtype, with_bias=True)
    keywords, pick = _lse_only(route)
    _check(lambda *a: pick(run(*a, return_lse=True, **keywords)), ref, inputs)
    assert set(routes) == {route}
    lse = pick(run(*inputs, return_lse=True, **keywords))[1]
    node = {"bipartite-bottom-right": 6}.get(kind, 1)  # a graph's target 1 that sees sources
    assert (lse[node, 0] == NEG_INF) and (lse[node, 1] > NEG_INF)  # head 0 removed


@pytest.mark.parametrize("route", ["sdpa", "triton"])
def test_grouped_query_heads(route, routes):
    dtype = torch.float64 if route == "sdpa" else torch.float32
    inputs, run, ref = _implicit_case("bipartite-bottom-right", dtype, kv_heads=1)
    _check(lambda *a: run(*a, return_lse=True, **_route_keywords(route)), ref, inputs)
    assert set(routes) == {route}


@pytest.mark.parametrize("route,dtype", [c for c in ROUTE_DTYPE_CASES if c.values[0] != "sdpa"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_edge_set(route, dtype, with_bias, routes):
    inputs, run, ref = _edge_case(dtype, with_bias)
    keywords, pick = _lse_only(route)
    _check(lambda *a: pick(run(*a, return_lse=True, **keywords)), ref, inputs)
    assert set(routes) == {route}
    lse = pick(run(*inputs, return_lse=True, **keywords))[1]
    assert (lse[5] == NEG_INF).all()  # the isolated target
    if with_bias:
        assert lse[2, 0] == NEG_INF and lse[2, 1] > NEG_INF


def test_the_sdpa_route_computes_no_lse_unless_asked(monkeypatch):
    """The lse costs an extra product on the SDPA route: a call that does not ask never
    forms it."""
    def refuse(*args, **kwargs):
        raise AssertionError("the lse was computed for a call that did not ask for it")

    inputs, run, _ = _implicit_case("batched", torch.float32, with_bias=False)
    monkeypatch.setattr(sdpa_backend, "implicit_lse", refuse)
    out = run(*inputs, backend="sdpa")
    assert isinstance(out, torch.Tensor)
    with pytest.raises(AssertionError, match="did not ask"):
        run(*inputs, backend="sdpa", return_lse=True)


def test_sdpa_lse_in_chunks_of_rows(monkeypatch):
    """A group's logits are formed a few target rows at a time when they exceed the chunk."""
    inputs, run, ref = _implicit_case("bipartite-bottom-right", torch.float64, with_bias=True)
    monkeypatch.setattr(sdpa_backend, "LSE_CHUNK_LOGITS", 2 * HEADS * 6)  # 2 rows of 6 keys
    _check(lambda *a: run(*a, return_lse=True, backend="sdpa"), ref, inputs)


def test_unsorted_batch():
    """Nodes of an unsorted batch are permuted into size groups; the lse comes back in the
    caller's node order."""
    batch = torch.tensor([2, 0, 1, 0, 2, 2, 1, 0, 0, 2])
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(10, HEADS, CHANNELS, generator=gen, dtype=torch.float64)
               for _ in range(3))
    mask = batch.unsqueeze(1) == batch.unsqueeze(0)
    _, want = reference.attention(q, k, v, mask, return_lse=True)
    for backend in ("sdpa", "sparse"):
        _, lse = gatattn.attention(q, k, v, batch=batch, backend=backend, return_lse=True)
        assert_lse_close(f"lse ({backend})", lse, want)


@pytest.mark.parametrize("backend", ["sdpa", "sparse", "triton"])
def test_nonfinite_inputs_reach_the_lse_along_edges(backend):
    """A NaN query makes its target's lse NaN, a NaN key that of the targets that read it, a NaN
    value none (the lse reads no value), as the reference gives."""
    inputs, run, ref = _implicit_case("causal", torch.float32)
    q, k, v = (t.detach().clone() for t in inputs)
    q[4, 1, 0] = float("nan")
    k[5, 0, 2] = float("nan")  # graph 1 (nodes 3-8), position 2: read by targets 5-8
    v[0, 0, 0] = float("nan")
    _, lse = run(q, k, v, backend=backend, return_lse=True)
    _, want = ref(q, k, v)
    assert torch.equal(lse.isnan(), want.isnan()) and want.isnan().sum() == 5
    assert_lse_close("lse", lse.nan_to_num(0.0), want.nan_to_num(0.0))


def test_with_attention_weights():
    """Allowed together: ``out, (edge_index, alpha), lse``, the weights being exp(s - lse)."""
    inputs, run, ref = _edge_case(torch.float64)
    q, k, v = inputs
    out, (edge_index, alpha), lse = run(q, k, v, return_attention_weights=True,
                                        return_lse=True)
    want_out, want_lse = ref(q, k, v)
    assert_close("out", out, want_out)
    assert_lse_close("lse", lse, want_lse)
    src, dst = edge_index
    logits = (q[dst] * k[src]).sum(-1) * CHANNELS ** -0.5
    assert_close("alpha", alpha, (logits - lse[dst]).exp())
    # Implicit graphs (the weights materialise them) too:
    inputs, run, ref = _implicit_case("bipartite-bottom-right", torch.float64)
    out, (_, alpha), lse = run(*inputs, return_attention_weights=True, return_lse=True)
    assert_lse_close("lse", lse, ref(*inputs)[1])


@pytest.mark.parametrize("backend", ["sdpa", "sparse"])
@pytest.mark.heavy  # gradgradcheck: ~11 s
def test_second_derivatives_through_the_lse(backend):
    """The lse is twice differentiable where the output is (SDPA, CSR message passing)."""
    if backend == "sdpa":
        inputs, run, _ = _implicit_case("bipartite-bottom-right", torch.float64, with_bias=True)
    else:
        inputs, run, _ = _edge_case(torch.float64, with_bias=True)
    empty = run(*inputs, backend=backend, return_lse=True)[1] == NEG_INF
    assert empty.any()
    torch.autograd.gradgradcheck(
        lambda *a: run(*a, backend=backend, return_lse=True)[1].masked_fill(empty, 0.0), inputs)


def test_compiled_operator_refuses_return_lse():
    """batch= / ptr= graphs under torch.compile run as an operator that returns no lse."""
    torch._dynamo.reset()
    q, k, v = (torch.randn(6, HEADS, CHANNELS) for _ in range(3))
    ptr = torch.tensor([0, 2, 6])

    @torch.compile(backend="eager", fullgraph=True)
    def batched(q, k, v):
        return gatattn.attention(q, k, v, ptr=ptr, return_lse=True)

    with pytest.raises(Exception, match="return_lse=True is not available"):
        batched(q, k, v)


@pytest.mark.parametrize("kind", ["complete", "edges"])
def test_compiled_complete_graphs_and_edge_sets(kind):
    """Under torch.compile, complete graphs (SDPA) and edge sets (gathered message passing)
    trace with their lse, without a graph break."""
    torch._dynamo.reset()
    if kind == "complete":
        inputs, run, ref = _implicit_case("complete", torch.float32)
    else:
        inputs, run, ref = _edge_case(torch.float32)
    compiled = torch.compile(lambda *a: run(*a, return_lse=True), backend="eager",
                             fullgraph=True)
    _check(compiled, ref, inputs)


# ------------------------------------------------------------------ merge_attention


def _split_sources(num_src, parts, gen):
    """A random assignment of sources to ``parts`` disjoint sets."""
    return torch.randint(parts, (num_src,), generator=gen)


@pytest.mark.parametrize("route,parts", [
    pytest.param(route, parts, marks=[INTERPRETER_REPEAT] if (route, parts) == ("triton", 3)
                 else []) for route in ("sdpa", "csr", "triton") for parts in (2, 3)])
def test_merge_rebuilds_full_attention(parts, route):
    """Parts over disjoint key / value sets (ring attention's shards, split-KV decoding's
    chunks) merged by their lse equal attention over all of them: forward and the gradients of
    q, k and v through the merged output. Causal, bottom-right, with blind targets: some
    targets see no source of a part (lse -inf there)."""
    dtype = torch.float32 if route == "triton" else torch.float64
    gen = torch.Generator().manual_seed(parts)
    n_dst, n_src = 5, 9
    q, k, v = (torch.randn(n, HEADS, CHANNELS, generator=gen, dtype=dtype).requires_grad_()
               for n in (n_dst, n_src, n_src))
    mask = reference.block_mask([n_dst], [n_src], "bottom_right")
    mask[0] = False  # a target without any source in any part
    part_of = _split_sources(n_src, parts, gen)
    backend = {"csr": "sparse"}.get(route, route)

    def merged(q, k, v):
        outs, lses = [], []
        for p in range(parts):
            if route == "sdpa":  # contiguous chunks: a bipartite complete graph per part
                chunk = slice(p * n_src // parts, (p + 1) * n_src // parts)
                out, lse = gatattn.attention(q, k[chunk], v[chunk], backend=backend,
                                             return_lse=True)
            else:
                keep = mask & (part_of == p).unsqueeze(0)
                dst, src = keep.nonzero().t()
                out, lse = gatattn.attention(q, k, v, edge_index=torch.stack([src, dst]),
                                             backend=backend, return_lse=True)
            outs.append(out)
            lses.append(lse)
        return gatattn.merge_attention(outs, lses)

    full_mask = torch.ones(n_dst, n_src, dtype=torch.bool) if route == "sdpa" else mask
    out, lse = merged(q, k, v)
    want_out, want_lse = reference.attention(q, k, v, full_mask, return_lse=True)
    assert_close("out", out, want_out)
    assert_lse_close("lse", lse, want_lse)
    if route != "sdpa":
        assert (lse[0] == NEG_INF).all() and (out[0] == 0).all()
    g_out = torch.randn(out.shape, generator=gen, dtype=dtype)
    g_lse = torch.randn(lse.shape, generator=gen, dtype=torch.float64)
    for with_lse in (False, True):
        loss = _loss(out, lse, g_out, g_lse.to(lse.dtype) * with_lse)
        grads = torch.autograd.grad(loss, (q, k, v), retain_graph=True)
        hi = [t.detach().double().requires_grad_() for t in (q, k, v)]
        ref_out, ref_lse = reference.attention(*hi, full_mask, return_lse=True)
        want = torch.autograd.grad(_loss(ref_out, ref_lse, g_out.double(), g_lse * with_lse),
                                   hi)
        for name, g, w in zip("qkv", grads, want, strict=True):
            assert_close(f"d{name}", g, w)


def test_merge_of_empty_parts():
    """Parts in which a target has no source: weight 0, zero gradients, never NaN."""
    out_a = torch.randn(3, HEADS, CHANNELS, requires_grad=True)
    lse_a = torch.tensor([[0.5, NEG_INF], [NEG_INF, NEG_INF], [1.0, 2.0]], requires_grad=True)
    out_b = torch.zeros(3, HEADS, CHANNELS, requires_grad=True)
    lse_b = torch.full((3, HEADS), NEG_INF, requires_grad=True)
    out, lse = gatattn.merge_attention([out_a, out_b], [lse_a, lse_b])
    assert torch.equal(lse, lse_a.detach())
    assert torch.equal(out[0, 0], out_a[0, 0].detach()) and torch.equal(out[2], out_a[2].detach())
    assert (out[1] == 0).all() and (out[0, 1] == 0).all()
    grads = torch.autograd.grad(out.sum() + lse.nan_to_num(neginf=0.0).sum(),
                                (out_a, lse_a, out_b, lse_b))
    assert all(torch.isfinite(g).all() for g in grads)
    assert (grads[2] == 0).all() and (grads[3] == 0).all()


def test_merge_refuses_mismatched_parts():
    out, lse = torch.zeros(3, HEADS, CHANNELS), torch.zeros(3, HEADS)
    with pytest.raises(ValueError, match="one lse per output"):
        gatattn.merge_attention([out, out], [lse])
    with pytest.raises(ValueError, match="part 1"):
        gatattn.merge_attention([out, out], [lse, lse[:2]])
    with pytest.raises(ValueError, match="one lse per output"):
        gatattn.merge_attention([], [])
