"""Grouped-query heads: ``k``, ``v`` with ``H_kv`` heads, query head ``h`` reading kv head
``h // (H // H_kv)``. The reference against SDPA's ``enable_gqa``; every route against the
reference on every graph kind, forward and dQ/dK/dV; the router's key; the layer's
``kv_heads``; bad head counts refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import gatattn
from gatattn import SelfAttentionConv, reference
from gatattn.backends import racing, routing
from gatattn.backends.racing import Router, route_key
from gatattn.backends.sdpa import sdpa_attention
from gatattn.bias import stacked_to_dense
from gatattn.graph import describe_graph, validation
from gatattn.kv_cache import KVCache, cached_self_attention
from tests.conftest import INTERPRETER_REPEAT, check_against_reference

ROUTES = ["sdpa", "sparse", "triton"]
HEADS = [(4, 1), (4, 2), (6, 3)]  # (H, H_kv)
C, C_V = 5, 7  # head dims that are not powers of two


def _offsets(sizes):
    return torch.tensor([0, *sizes]).cumsum(0)


def _qkv(n_dst, n_src, heads, kv_heads, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = ((n_dst, heads, C), (n_src, kv_heads, C), (n_src, kv_heads, C_V))
    return [torch.randn(*s, generator=gen).to(dtype).requires_grad_() for s in shapes]


def _edges(n_dst, n_src, seed=0):
    """Distinct random edges, target 0 without any (an isolated node gets zeros)."""
    gen = torch.Generator().manual_seed(seed)
    pairs = torch.randperm(n_dst * n_src, generator=gen)[: n_dst * n_src // 3]
    dst, src = pairs // n_src, pairs % n_src
    keep = dst != 0
    return torch.stack([src[keep], dst[keep]])


# name: (sizes_dst, sizes_src or None, causal, explicit edges). Empty and one-node graphs.
GRAPHS = {
    "complete": ([7], None, False, False),
    "batched": ([3, 0, 1, 5, 3], None, False, False),
    "causal": ([4, 1, 6, 0], None, True, False),
    "bipartite": ([3, 0, 5, 2], [4, 2, 1, 5], False, False),
    "edges": ([9], [8], False, True),
}


def _case(route, graph, heads, kv_heads, dtype, with_bias=False):
    """``run``, leaf inputs and the reference function for one graph of :data:`GRAPHS`."""
    sizes_dst, sizes_src, causal, explicit = GRAPHS[graph]
    bipartite = sizes_src is not None
    sizes_src = sizes_src if bipartite else sizes_dst
    ptr_dst, ptr_src = _offsets(sizes_dst), _offsets(sizes_src)
    n_dst, n_src = int(ptr_dst[-1]), int(ptr_src[-1])
    inputs = _qkv(n_dst, n_src, heads, kv_heads, dtype)
    if explicit:
        edge_index = _edges(n_dst, n_src)
        mask, kwargs = reference.edge_mask(edge_index, n_dst, n_src), {"edge_index": edge_index}
        rows = edge_index.size(1)
    else:
        mask = reference.block_mask(sizes_dst, sizes_src, causal)
        kwargs = {"ptr": (ptr_dst, ptr_src) if bipartite else ptr_dst, "causal": causal}
        rows = sum(d * s for d, s in zip(sizes_dst, sizes_src, strict=True))
    if with_bias:
        gen = torch.Generator().manual_seed(5)
        inputs.append(torch.randn(rows, heads, generator=gen).to(dtype).requires_grad_())

    def run(q, k, v, bias=None):
        return gatattn.attention(q, k, v, attn_bias=bias, backend=route, **kwargs)

    def dense_bias(bias):
        if bias is None:
            return None
        if explicit:
            return reference.dense_edge_features(kwargs["edge_index"], bias, n_dst, n_src)
        return stacked_to_dense(bias, ptr_dst, ptr_src)

    def ref(q, k, v, bias=None, *, compute_dtype):
        return reference.attention(q, k, v, mask, bias=dense_bias(bias),
                                   compute_dtype=compute_dtype)

    return run, inputs, ref


def _cases():
    for route in ROUTES:
        for graph in GRAPHS:
            if route == "sdpa" and GRAPHS[graph][3]:
                continue  # SDPA runs implicit graphs only (refused otherwise, test_functional)
            for heads, kv_heads in HEADS:
                repeat = route == "triton" and (heads, kv_heads) != (4, 2)
                yield pytest.param(route, graph, heads, kv_heads,
                                   id=f"{route}-{graph}-H{heads}-Hkv{kv_heads}",
                                   marks=[INTERPRETER_REPEAT] if repeat else [])


def _exact_dtype(route):
    # The Triton kernels compute in float32 at most; the torch routes take float64.
    return torch.float32 if route == "triton" else torch.float64


@pytest.mark.parametrize("heads,kv_heads", HEADS)
@pytest.mark.parametrize("causal", [False, True])
def test_reference_equals_sdpa_enable_gqa(heads, kv_heads, causal):
    q, k, v = (t.detach() for t in _qkv(6, 6, heads, kv_heads, torch.float64))
    expected = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=causal,
        enable_gqa=True).transpose(0, 1)
    got = reference.attention(q, k, v, reference.block_mask([6], causal=causal))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("route,graph,heads,kv_heads", list(_cases()))
def test_route_matches_reference(route, graph, heads, kv_heads):
    run, inputs, ref = _case(route, graph, heads, kv_heads, _exact_dtype(route))
    check_against_reference(run, inputs, ref)


HALF = [("sdpa", "batched", torch.float16), ("sdpa", "causal", torch.bfloat16),
        ("sparse", "edges", torch.bfloat16), ("sparse", "bipartite", torch.float16),
        ("triton", "batched", torch.float16), ("triton", "edges", torch.float16)]


@pytest.mark.parametrize("route,graph,dtype", HALF)
def test_half_precision_under_the_tolerance_rule(route, graph, dtype):
    run, inputs, ref = _case(route, graph, 4, 2, dtype)
    check_against_reference(run, inputs, ref)


@pytest.mark.parametrize("route,graph", [("sdpa", "causal"), ("sdpa", "bipartite"),
                                         ("sparse", "edges"), ("triton", "batched"),
                                         ("triton", "edges")])
def test_with_a_bias_per_query_head(route, graph):
    run, inputs, ref = _case(route, graph, 4, 2, _exact_dtype(route), with_bias=True)
    check_against_reference(run, inputs, ref, names=("q", "k", "v", "bias"))


@pytest.mark.heavy  # gradgradcheck through the math backend: tens of seconds
def test_second_derivatives_on_the_sdpa_route():
    """The math backend's ``enable_gqa`` serves the recorded backward (small: gradgradcheck
    perturbs every input entry)."""
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn(5, h, 3, generator=gen, dtype=torch.float64, requires_grad=True)
              for h in (4, 2, 2)]
    ptr = _offsets([3, 0, 2])
    assert torch.autograd.gradgradcheck(
        lambda q, k, v: gatattn.attention(q, k, v, ptr=ptr, causal=True, backend="sdpa"), inputs)


@pytest.mark.parametrize("found", ["by the call's read", "by the route's caller"])
def test_nonfinite_kv_reaches_only_the_heads_that_read_it(found):
    """The exact repair: run when a validated call reads that an input is not finite, or when
    a route is told so (calls that read nothing only guard: tests/test_graph_object.py)."""
    q, k, v = (t.detach() for t in _qkv(8, 8, 4, 2, torch.float64))
    v[3, 1, 2] = float("nan")  # kv head 1: read by query heads 2 and 3 only
    mask = reference.block_mask([8], causal=True)
    if found == "by the call's read":
        with validation(True):
            got = gatattn.attention(q, k, v, causal=True, backend="sdpa")
    else:
        graph = gatattn.build_graph(num_nodes=8, causal=True)
        got = sdpa_attention(q, k, v, graph, scale=q.size(-1) ** -0.5, inputs_finite=False)
    expected = reference.attention(q, k, v, mask)
    assert expected[:, :2].isfinite().all() and expected[3:, 2:, 2].isnan().all()
    torch.testing.assert_close(got, expected, equal_nan=True)


def test_auto_matches_the_reference():
    for graph in ("batched", "edges"):
        run, inputs, ref = _case("auto", graph, 6, 3, torch.float64)
        check_against_reference(run, inputs, ref)


def test_attention_weights_stay_per_query_head():
    q, k, v = (t.detach() for t in _qkv(9, 8, 4, 2, torch.float64))
    edge_index = _edges(9, 8)
    _, (edges, alpha) = gatattn.attention(q, k, v, edge_index=edge_index,
                                          return_attention_weights=True)
    _, weights = reference.attention(q, k, v, reference.edge_mask(edge_index, 9, 8),
                                     return_weights=True)
    assert alpha.shape == (edge_index.size(1), 4)
    torch.testing.assert_close(alpha, weights[:, edges[1], edges[0]].t(), rtol=0, atol=1e-12)


def test_router_keys_kv_heads_and_races_grouped_calls():
    sizes = [5, 9, 1]
    ptr = _offsets(sizes)
    q, k, v = _qkv(15, 15, 4, 2, torch.float32)
    graph = describe_graph(15, 15, ptr=ptr)[0]
    assert route_key(q, v, graph, True).kv_heads == 2
    assert route_key(q, v, graph, True) != route_key(q, q, graph, True)
    timed = []

    def bench(name, fn):
        fn()
        timed.append(name)
        return {"triton": 1.0, "sdpa": 2.0}[name]

    router = Router(bench=bench)
    assert router.route(q, k, v, graph, 0.3) == "triton"  # verified against SDPA, then timed
    assert timed == ["triton", "sdpa"] and not router.choices[0].rejected
    assert "H_kv=2" in str(router.choices[0].key)


@pytest.mark.parametrize("heads,kv_heads,message", [
    (4, 3, "q has H=4 heads and k, v have H_kv=3: grouped-query attention needs H_kv to divide H"),
    (2, 4, "q has H=2 heads and k, v have H_kv=4"),
])
def test_bad_head_counts_are_refused(heads, kv_heads, message):
    q, k, v = _qkv(3, 3, heads, kv_heads, torch.float32)
    with pytest.raises(ValueError, match=message):
        gatattn.attention(q, k, v)


def test_k_and_v_with_different_heads_are_refused():
    q, k, _ = _qkv(3, 3, 4, 2, torch.float32)
    with pytest.raises(ValueError, match="same number of heads, got 4, 2 and 1 heads for q, k"):
        gatattn.attention(q, k, k[:, :1])


# ------------------------------------------------------------------ the layer's kv_heads


def _layer_reference(conv, x, mask):
    """The layer's output computed by the reference on its own projections."""
    H, H_kv, C_out = conv.heads, conv.kv_heads, conv.out_channels
    query = conv.lin_query(x).view(-1, H, C_out)
    key = conv.lin_key(x).view(-1, H_kv, C_out)
    value = conv.lin_value(x).view(-1, H_kv, C_out)
    out = reference.attention(query, key, value, mask).reshape(-1, H * C_out)
    return out + conv.lin_skip(x)


def _hook(module, inputs, output):
    return output


@pytest.mark.parametrize("path", ["fused", "propagate"])
@pytest.mark.parametrize("graph", ["batched", "edges"])
def test_layer_with_kv_heads_matches_reference(path, graph):
    torch.manual_seed(0)
    conv = SelfAttentionConv(6, C, heads=4, kv_heads=2).double()
    if path == "propagate":  # a message hook makes PyG run propagate / message
        conv.register_message_forward_hook(_hook)
    sizes = [3, 0, 1, 5]
    x = torch.randn(sum(sizes), 6, dtype=torch.float64, requires_grad=True)
    if graph == "edges":
        edge_index = _edges(9, 9)
        out = conv(x, edge_index)
        mask = reference.edge_mask(edge_index, 9, 9)
    else:
        out = conv(x, ptr=_offsets(sizes))
        mask = reference.block_mask(sizes)
    expected = _layer_reference(conv, x, mask)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    params = [x, conv.lin_key.weight, conv.lin_value.weight]
    grad_out = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, params, grad_out),
                         torch.autograd.grad(expected, params, grad_out), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_layer_with_kv_heads_equals_the_layer_with_expanded_projections():
    torch.manual_seed(0)
    grouped = SelfAttentionConv(6, C, heads=6, kv_heads=3).double()
    full = SelfAttentionConv(6, C, heads=6).double()
    state = grouped.state_dict()
    for name in ("lin_key", "lin_value"):  # each kv head's rows, repeated for its group
        for part in ("weight", "bias"):
            key = f"{name}.{part}"
            rows = state[key].view(3, C, -1).repeat_interleave(2, dim=0)
            state[key] = rows.reshape(6 * C, -1).squeeze(-1)
    full.load_state_dict(state)
    x = torch.randn(11, 6, dtype=torch.float64)
    ptr = _offsets([4, 7])
    torch.testing.assert_close(grouped(x, ptr=ptr, causal=True), full(x, ptr=ptr, causal=True),
                               rtol=0, atol=1e-12)


def test_kv_heads_equal_to_heads_is_the_old_layer():
    torch.manual_seed(0)
    old = SelfAttentionConv(6, C, heads=4)
    torch.manual_seed(0)
    new = SelfAttentionConv(6, C, heads=4, kv_heads=4)
    assert list(new.state_dict()) == list(old.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(new.state_dict().values(),
                                                 old.state_dict().values(), strict=True))
    x = torch.randn(9, 6)
    assert torch.equal(new(x), old(x))
    assert repr(new) == repr(old) == "SelfAttentionConv(6, 5, heads=4)"


def test_layer_shapes_repr_and_refusals():
    conv = SelfAttentionConv(8, 4, heads=6, kv_heads=2)
    assert conv.lin_key.weight.shape == conv.lin_value.weight.shape == (2 * 4, 8)
    assert conv.lin_query.weight.shape == (6 * 4, 8)
    assert repr(conv) == "SelfAttentionConv(8, 4, heads=6, kv_heads=2)"
    for kv_heads in (4, 0, 12):
        with pytest.raises(ValueError, match=f"heads=6 and kv_heads={kv_heads}"):
            SelfAttentionConv(8, 4, heads=6, kv_heads=kv_heads)


def test_kv_cache_decodes_a_grouped_query_layer():
    torch.manual_seed(0)
    conv = SelfAttentionConv(6, C, heads=4, kv_heads=2).double().eval()
    prompts, finals = [2, 0, 3], [4, 2, 3]
    x = torch.randn(sum(finals), 6, dtype=torch.float64)
    ptr = _offsets(finals).tolist()
    cache = KVCache(num_layers=1)
    out = torch.zeros(sum(finals), 4 * C, dtype=torch.float64)
    lengths = list(prompts)
    cache.start_prefill(prompts)
    rows = torch.cat([torch.arange(ptr[b], ptr[b] + n) for b, n in enumerate(prompts)])
    with torch.no_grad():
        out[rows] = cached_self_attention(conv, x[rows], cache, 0)
        while any(n < f for n, f in zip(lengths, finals, strict=True)):
            active = [n < f for n, f in zip(lengths, finals, strict=True)]
            cache.start_step(active)
            rows = torch.tensor([ptr[b] + lengths[b] for b in range(3) if active[b]])
            out[rows] = cached_self_attention(conv, x[rows], cache, 0)
            lengths = [n + a for n, a in zip(lengths, active, strict=True)]
        expected = conv(x, ptr=_offsets(finals), causal=True)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


@pytest.mark.heavy  # races the kernels in the interpreter: ~7 s
def test_races_on_cpu_through_the_public_api(monkeypatch):
    """``auto`` with the race widened to the CPU (the kernels in Triton's interpreter)."""
    monkeypatch.setattr(routing, "races_on", lambda device: True)
    monkeypatch.setattr(racing, "_ROUTER", Router(bench=lambda name, fn: (fn(), 1.0)[1]))
    run, inputs, ref = _case("auto", "batched", 4, 2, torch.float16)
    check_against_reference(run, inputs, ref)


def test_batched_graphs_under_compile_match_reference():
    """Traced, batched graphs run as the opaque operator ``gatattn::segment_attention``."""
    run, inputs, ref = _case("auto", "batched", 4, 2, torch.float64)
    check_against_reference(torch.compile(run, backend="eager", fullgraph=True), inputs, ref)
