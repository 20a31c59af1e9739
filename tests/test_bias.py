"""``attn_bias``: every route against the reference (forward, dQ/dK/dV and dBias), its layouts,
deterministic dBias, its refusals, and Graphormer's spatial encoding against networkx."""

from __future__ import annotations

import networkx as nx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gatattn
from gatattn import reference
from gatattn.bias import (
    SpatialEncoding,
    shortest_path_distances,
    stacked_from_padded,
    stacked_to_dense,
)
from tests.conftest import INTERPRETER_REPEAT, check_against_reference

ROUTES = ["sdpa", "sparse", "triton"]
NAMES = ("q", "k", "v", "bias")


def _offsets(sizes):
    return torch.tensor([0, *sizes]).cumsum(0)


def _inputs(n_dst, n_src, rows, heads, channels, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = ((n_dst, heads, channels), (n_src, heads, channels), (n_src, heads, channels + 3),
              (rows, heads))
    return tuple(torch.randn(*s, generator=gen).to(dtype).requires_grad_() for s in shapes)


def _implicit_case(route, sizes_dst, sizes_src, causal, dtype, heads=2, channels=5):
    """``ptr`` graphs (bipartite when ``sizes_src`` is given) with a random stacked bias."""
    bipartite = sizes_src is not None
    sizes_src = sizes_src if bipartite else sizes_dst
    ptr_dst, ptr_src = _offsets(sizes_dst), _offsets(sizes_src)
    rows = sum(d * s for d, s in zip(sizes_dst, sizes_src, strict=True))
    inputs = _inputs(int(ptr_dst[-1]), int(ptr_src[-1]), rows, heads, channels, dtype)
    ptr = (ptr_dst, ptr_src) if bipartite else ptr_dst
    mask = reference.block_mask(sizes_dst, sizes_src, causal)

    def run(q, k, v, bias):
        return gatattn.attention(q, k, v, ptr=ptr, causal=causal, attn_bias=bias,
                                 backend=route)

    def ref(q, k, v, bias, compute_dtype):
        return reference.attention(q, k, v, mask, bias=stacked_to_dense(bias, ptr_dst, ptr_src),
                                   compute_dtype=compute_dtype)

    return run, inputs, ref


IMPLICIT = {  # name: (sizes_dst, sizes_src or None for self-attention, causal)
    "complete": ([7], None, False),
    "batched": ([3, 0, 1, 5, 3], None, False),
    "causal": ([4, 1, 6], None, True),
    "bipartite": ([3, 0, 5, 2], [4, 2, 1, 5], False),
    "bipartite-causal": ([3, 5, 2], [4, 2, 5], True),
    # Many size groups, one of them empty, one of a single node.
    "similar-sizes": ([8, 10, 0, 9, 8, 10, 1], None, False),
    "similar-bipartite-causal": ([8, 9, 10, 9], [10, 9, 8, 11], True),
    # Bottom-right: blind targets (more targets than sources), and more sources than targets.
    "bipartite-bottom-right": ([6, 0, 2, 5], [3, 2, 5, 5], "bottom_right"),
}


@pytest.mark.parametrize("route,case", [
    pytest.param(route, case, marks=[INTERPRETER_REPEAT] if route == "triton" and case in (
        "complete", "causal", "bipartite", "bipartite-causal") else [])  # (in the others too)
    for case in IMPLICIT for route in ROUTES])
def test_implicit_graphs_match_reference(route, case):
    dtype = torch.float32 if route == "triton" else torch.float64
    run, inputs, ref = _implicit_case(route, *IMPLICIT[case], dtype)
    check_against_reference(run, inputs, ref, NAMES)


@settings(max_examples=25)
@given(sizes=st.lists(st.tuples(st.integers(0, 7), st.integers(0, 7)), min_size=1, max_size=6),
       bipartite=st.booleans(), causal=st.sampled_from([False, True, "bottom_right"]),
       route=st.sampled_from(["sdpa", "sparse"]))
def test_random_batches_match_reference(sizes, bipartite, causal, route):
    sizes_dst = [d for d, _ in sizes]
    sizes_src = [s for _, s in sizes] if bipartite else None
    run, inputs, ref = _implicit_case(route, sizes_dst, sizes_src, causal, torch.float64)
    check_against_reference(run, inputs, ref, NAMES)


@pytest.mark.parametrize("route", ROUTES)
def test_awkward_sizes_match_reference(route):
    """A graph past one tile (97 nodes), head dim 40, single-node graphs, fp32."""
    run, inputs, ref = _implicit_case(route, [97, 1, 13], None, False, torch.float32, heads=1,
                                      channels=40)
    check_against_reference(run, inputs, ref, NAMES)


@pytest.mark.parametrize("route,dtype", [("sdpa", torch.float16), ("sdpa", torch.bfloat16),
                                         ("sparse", torch.bfloat16), ("triton", torch.float16)])
def test_half_precision_under_the_tolerance_rule(route, dtype):
    """Half precision against the reference's own error in that dtype (bf16 tl.dot is broken
    in Triton's interpreter, so the kernels are checked in fp16 here)."""
    run, inputs, ref = _implicit_case(route, [9, 4, 17], None, True, dtype)
    check_against_reference(run, inputs, ref, NAMES)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_bias_errs_no_more_than_torch_sdpa(dtype):
    """With a bias the SDPA route writes attention out itself; in half precision it must
    accumulate in float32 as SDPA does. Its error against the float64 reference (output and
    every gradient) is held to torch SDPA's own on the same half-precision inputs: a padded
    batch with the same bias as a float mask. Computed in the input dtype it erred 3x SDPA's
    (median; up to 9x)."""
    sizes = [23, 9, 31, 17, 9, 4]
    B, H, L, C = len(sizes), 2, max(sizes), 32
    gen = torch.Generator().manual_seed(7)
    padded_qkv = [torch.randn(B, H, L, C, generator=gen).to(dtype) for _ in range(3)]
    padded_bias = (2 * torch.randn(B, H, L, L, generator=gen)).to(dtype)
    valid = torch.arange(L) < torch.tensor(sizes).unsqueeze(1)  # (B, L)
    # Padded query rows get no upstream gradient, so torch's dK, dV hold real rows only.
    padded_grad = (torch.randn(B, H, L, C, generator=gen) * valid.view(B, 1, L, 1)).to(dtype)

    def nodes(x):  # (B, H, L, C) -> (sum n, H, C)
        return x.transpose(1, 2)[valid]

    inputs = [nodes(t).requires_grad_() for t in padded_qkv]
    inputs.append(stacked_from_padded(padded_bias, sizes).requires_grad_())
    ptr, grad = _offsets(sizes), nodes(padded_grad)
    ours = gatattn.attention(*inputs[:3], ptr=ptr, attn_bias=inputs[3], backend="sdpa")
    ours = [ours, *torch.autograd.grad(ours, inputs, grad)]

    hi = [t.detach().double().requires_grad_() for t in inputs]
    ref = reference.attention(*hi[:3], reference.block_mask(sizes),
                              bias=stacked_to_dense(hi[3], ptr))
    ref = [ref, *torch.autograd.grad(ref, hi, grad.double())]

    torch_inputs = [t.clone().requires_grad_() for t in padded_qkv]
    mask = padded_bias.masked_fill(~valid.view(B, 1, 1, L), float("-inf")).requires_grad_()
    theirs = torch.nn.functional.scaled_dot_product_attention(*torch_inputs, attn_mask=mask)
    theirs_grads = torch.autograd.grad(theirs, [*torch_inputs, mask], padded_grad)
    theirs = [nodes(theirs), *(nodes(g) for g in theirs_grads[:3]),
              stacked_from_padded(theirs_grads[3], sizes)]

    worse = []
    for name, got, peer, expected in zip(("out", "dq", "dk", "dv", "dbias"), ours, theirs, ref,
                                         strict=True):
        error = (got.double() - expected).abs().max().item()
        peer_error = (peer.double() - expected).abs().max().item()
        print(f"{name}: ours {error:.3e}, torch SDPA {peer_error:.3e}")
        floor = 1e-6 * max(1.0, expected.abs().max().item())  # only where both are ~exact
        if not error <= 2 * peer_error + floor:
            worse.append(name)
    assert not worse, f"more than twice torch SDPA's error: {worse}"


def test_unsorted_batch_uses_graph_ids_in_order():
    """Graph b's block comes b-th in the stack whatever the node order (SDPA gathers blocks of
    a size group whose graphs are not adjacent; the kernels permute nodes into graph order)."""
    batch = torch.tensor([2, 0, 1, 2, 0, 2, 1, 0, 0])
    sizes = torch.bincount(batch).tolist()  # [4, 2, 3]
    order = torch.sort(batch, stable=True).indices
    q, k, v, bias = _inputs(9, 9, sum(n * n for n in sizes), 2, 4, torch.float64)
    dense_sorted = stacked_to_dense(bias, _offsets(sizes))
    dense = torch.empty_like(dense_sorted)
    dense[order.unsqueeze(1), order.unsqueeze(0)] = dense_sorted
    mask = batch.unsqueeze(1) == batch.unsqueeze(0)
    expected = reference.attention(q, k, v, mask, bias=dense)
    for route in ROUTES:
        dt = torch.float32 if route == "triton" else torch.float64
        args = [t.detach().to(dt).requires_grad_() for t in (q, k, v, bias)]
        out = gatattn.attention(*args[:3], batch=batch, attn_bias=args[3], backend=route)
        torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
        g_bias = torch.autograd.grad(out.sum(), args[3])[0]
        g_ref = torch.autograd.grad(expected.sum(), bias, retain_graph=True)[0]
        torch.testing.assert_close(g_bias.double(), g_ref, atol=1e-5, rtol=1e-5)


def _edges_case(route, causal, dtype):
    """Random edges with a duplicate, an isolated target and unsorted order; with ``causal``
    over two graphs some edges are dropped and their bias rows ignored."""
    gen = torch.Generator().manual_seed(3)
    n = 11
    src = torch.randint(0, n, (40,), generator=gen)
    dst = torch.randint(0, n, (40,), generator=gen)
    keep = dst != 4  # target 4 is isolated
    edge_index = torch.stack([src[keep], dst[keep]])
    edge_index = torch.cat([edge_index, edge_index[:, :1]], 1)  # a duplicate edge
    batch = torch.tensor([0] * 6 + [1] * 5)
    inside = batch[edge_index[0]] == batch[edge_index[1]]
    edge_index = edge_index[:, inside] if causal else edge_index
    inputs = _inputs(n, n, edge_index.size(1), 2, 6, dtype)
    kept = torch.ones(edge_index.size(1), dtype=torch.bool)
    if causal:
        positions = reference_positions(batch)
        kept = positions[edge_index[0]] <= positions[edge_index[1]]

    def run(q, k, v, bias):
        return gatattn.attention(q, k, v, edge_index=edge_index, attn_bias=bias, causal=causal,
                                 batch=batch if causal else None, backend=route)

    def ref(q, k, v, bias, compute_dtype):
        return _edge_reference(q, k, v, bias, edge_index[:, kept], kept, compute_dtype)

    return run, inputs, ref


def reference_positions(batch):
    return torch.cat([torch.arange(int(c)) for c in torch.bincount(batch)])


def _edge_reference(q, k, v, bias, edge_index, kept, compute_dtype):
    """The reference with duplicates split into layers: each layer holds at most one copy of
    every pair, so a dense bias per layer states each copy's own bias exactly."""
    n_dst, n_src, heads = q.size(0), k.size(0), q.size(1)
    bias = bias[kept]
    seen: dict[tuple[int, int], int] = {}
    layer_of = []
    for s, d in edge_index.t().tolist():
        layer_of.append(seen.get((s, d), 0))
        seen[(s, d)] = layer_of[-1] + 1
    layers = max(layer_of, default=0) + 1
    # Stack layers as extra sources: layer l's copy of source j is source l * n_src + j.
    layer = torch.tensor(layer_of, dtype=torch.long)
    src = edge_index[0] + layer * n_src
    mask = torch.zeros(n_dst, layers * n_src, dtype=torch.bool)
    mask[edge_index[1], src] = True
    dense = bias.new_zeros(n_dst, layers * n_src, heads).index_put((edge_index[1], src), bias)
    return reference.attention(q, k.repeat(layers, 1, 1), v.repeat(layers, 1, 1), mask,
                               bias=dense, compute_dtype=compute_dtype)


@pytest.mark.parametrize("causal", [False, True], ids=["edges", "causal-edges"])
@pytest.mark.parametrize("route", ["sparse", "triton"])
def test_explicit_edges_match_reference(route, causal):
    dtype = torch.float32 if route == "triton" else torch.float64
    check_against_reference(*_edges_case(route, causal, dtype), NAMES)


@pytest.mark.parametrize("route", ["sparse", "triton"])
def test_explicit_edges_in_half_precision(route):
    check_against_reference(*_edges_case(route, False, torch.float16), NAMES)


def test_auto_with_a_bias_skips_the_race(monkeypatch):
    """Where auto would race the fused kernels (a GPU; widened to this CPU here), a call with a
    bias takes SDPA / message passing: the race's candidates take no bias."""
    from gatattn.backends import racing, routing

    def no_race(*args):
        raise AssertionError("a call with attn_bias must not reach the router")

    monkeypatch.setattr(routing, "races_on", lambda device: True)
    monkeypatch.setattr(racing, "race", no_race)
    run, inputs, ref = _implicit_case("auto", [5, 3], None, True, torch.float16)
    check_against_reference(run, inputs, ref, NAMES)
    run, inputs, ref = _edges_case("auto", False, torch.float32)
    check_against_reference(run, inputs, ref, NAMES)


def test_auto_takes_a_torch_route_and_matches():
    run, inputs, ref = _implicit_case("auto", [5, 3], None, True, torch.float64)
    check_against_reference(run, inputs, ref, NAMES)
    run, inputs, ref = _edges_case("auto", False, torch.float64)
    check_against_reference(run, inputs, ref, NAMES)


def test_weights_and_edge_features_with_bias():
    """return_attention_weights and edge_attr take the per-edge gathered form, with the bias."""
    edge_index = torch.tensor([[0, 1, 2, 2, 3], [1, 1, 0, 3, 3]])
    q, k, v, bias = _inputs(4, 4, 5, 2, 3, torch.float64)
    v = v[..., :3].detach().requires_grad_()
    edge_attr = torch.randn(5, 2, 3, dtype=torch.float64)
    out, (_, alpha) = gatattn.attention(q, k, v, edge_index=edge_index, edge_attr=edge_attr,
                                        attn_bias=bias, return_attention_weights=True)
    mask = reference.edge_mask(edge_index, 4, 4)
    dense = reference.dense_edge_features(edge_index, bias, 4, 4)
    feats = reference.dense_edge_features(edge_index, edge_attr, 4, 4)
    expected, weights = reference.attention(q, k, v, mask, bias=dense, edge_key=feats,
                                            edge_value=feats, return_weights=True)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(alpha, weights[:, edge_index[1], edge_index[0]].t())


@pytest.mark.parametrize("route", ROUTES)
def test_dbias_is_bitwise_deterministic(route):
    dtype = torch.float32
    run, inputs, _ = _implicit_case(route, [6, 9, 7, 2], [5, 9, 6, 4], True, dtype)
    grad_out = torch.randn(24, 2, 8)
    grads = [torch.autograd.grad(run(*inputs), inputs[3], grad_out)[0] for _ in range(2)]
    assert torch.equal(grads[0], grads[1])
    if route != "sdpa":
        run, inputs, _ = _edges_case(route, False, dtype)
        grad_out = torch.randn(11, 2, 9)
        grads = [torch.autograd.grad(run(*inputs), inputs[3], grad_out)[0] for _ in range(2)]
        assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("route", ["sdpa", "sparse"])
def test_second_derivatives_with_bias(route):
    run, inputs, _ = _implicit_case(route, [3, 2], None, True, torch.float64, heads=1,
                                    channels=2)
    assert torch.autograd.gradgradcheck(run, inputs)


def test_kernel_writes_every_kept_pair_and_no_excluded_one():
    """The tiled kernel writes dBias for every pair a causal segment has; an excluded pair is
    left as the caller's zeros or written as 0 (by a diagonal tile that holds it)."""
    from gatattn.kernels.flash_attention import flash_attention_backward, flash_attention_forward

    q, k, v, bias = (t.detach() for t in _inputs(37, 37, 37 * 37, 1, 4, torch.float32))
    v = v[..., :4].contiguous()
    cu = torch.tensor([0, 37], dtype=torch.int32)
    out, lse = flash_attention_forward(q, k, v, cu, cu, 0.5, True, bias=bias)
    dbias = torch.full_like(bias, float("nan"))
    flash_attention_backward(torch.randn_like(out), q, k, v, out, lse, cu, cu, 0.5, True,
                             bias=bias, dbias=dbias)
    excluded = torch.ones(37, 37, dtype=torch.bool).triu(1).flatten()
    assert not dbias[~excluded].isnan().any()
    assert bool((dbias[excluded].nan_to_num(0.0) == 0).all())
    assert dbias[excluded].isnan().any()  # tiles wholly above the diagonal are never visited


# ------------------------------------------------------------------------------ refusals


def test_bias_shape_errors_state_the_layout():
    q, k, v, _ = _inputs(5, 5, 1, 2, 3, torch.float32)
    ptr = torch.tensor([0, 2, 5])
    with pytest.raises(ValueError, match=r"\(13, 2\).*target-major"):
        gatattn.attention(q, k, v, ptr=ptr, attn_bias=torch.zeros(25, 2))
    with pytest.raises(ValueError, match=r"\(13, 2\)"):
        gatattn.attention(q, k, v, ptr=ptr, attn_bias=torch.zeros(13, 3))
    edge_index = torch.tensor([[0, 1], [1, 2]])
    with pytest.raises(ValueError, match=r"\(2, 2\).*one row per edge"):
        gatattn.attention(q, k, v, edge_index=edge_index, attn_bias=torch.zeros(3, 2))
    with pytest.raises(TypeError, match="floating point"):
        gatattn.attention(q, k, v, attn_bias=torch.zeros(25, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(25, 2\)"):
        gatattn.attention(q, k, v, attn_bias=torch.zeros(5, 5, 2))


def test_bias_shape_checked_on_device_without_validation():
    q, k, v, _ = _inputs(5, 5, 1, 2, 3, torch.float32)
    with gatattn.validation(False), pytest.raises(RuntimeError, match="stacked"):
        gatattn.attention(q, k, v, ptr=torch.tensor([0, 2, 5]), attn_bias=torch.zeros(25, 2))


# ------------------------------------------------------------------------------ layouts


def test_stacked_from_padded_round_trips():
    sizes_dst, sizes_src = [2, 0, 3], [3, 1, 2]
    padded = torch.randn(3, 2, 3, 3, requires_grad=True)
    stacked = stacked_from_padded(padded, sizes_dst, sizes_src)
    assert stacked.shape == (2 * 3 + 0 + 3 * 2, 2)
    dense = stacked_to_dense(stacked, _offsets(sizes_dst), _offsets(sizes_src))
    torch.testing.assert_close(dense[0:2, 0:3], padded[0, :, :2, :3].permute(1, 2, 0))
    torch.testing.assert_close(dense[2:5, 4:6], padded[2, :, :3, :2].permute(1, 2, 0))
    stacked.sum().backward()
    assert padded.grad[0, :, 2:].abs().sum() == 0 and padded.grad[0, :, :2, :3].eq(1).all()


def test_padded_bias_equals_sdpa_with_a_float_mask():
    """The stacked layout states what SDPA's float attn_mask states on padded batches."""
    B, H, L, C = 3, 2, 5, 4
    sizes = [5, 2, 4]
    x = torch.randn(3, B, H, L, C, dtype=torch.float64)
    mask = torch.randn(B, H, L, L, dtype=torch.float64)
    valid = torch.arange(L).view(1, L) < torch.tensor(sizes).view(B, 1)
    padded_mask = mask.masked_fill(~valid.view(B, 1, 1, L), float("-inf"))
    expected = torch.nn.functional.scaled_dot_product_attention(*x, attn_mask=padded_mask)
    nodes = [t.transpose(1, 2)[valid] for t in x]  # (sum n, H, C)
    out = gatattn.attention(*nodes, ptr=_offsets(sizes),
                            attn_bias=stacked_from_padded(mask, sizes))
    torch.testing.assert_close(out, expected.transpose(1, 2)[valid])


# ----------------------------------------------------------------------- spatial encoding


def test_shortest_paths_match_networkx():
    gen = torch.Generator().manual_seed(5)
    sizes = [6, 1, 9]
    ptr = _offsets(sizes)
    edges = []
    for start, n in zip(ptr[:-1].tolist(), sizes, strict=True):
        e = torch.randint(0, n, (2, 2 * n), generator=gen) + start
        edges.append(e)
    edge_index = torch.cat(edges, 1)
    max_distance = 3
    got = shortest_path_distances(edge_index, ptr, max_distance)
    expected = []
    for start, n in zip(ptr[:-1].tolist(), sizes, strict=True):
        graph = nx.DiGraph()
        graph.add_nodes_from(range(n))
        inside = (edge_index[0] >= start) & (edge_index[0] < start + n)
        graph.add_edges_from((edge_index[:, inside] - start).t().tolist())
        lengths = dict(nx.all_pairs_shortest_path_length(graph))
        for target in range(n):
            for source in range(n):
                hops = lengths[source].get(target, max_distance + 1)
                expected.append(min(hops, max_distance + 1))
    assert got.tolist() == expected


def test_spatial_encoding_is_a_learnable_bias():
    edge_index = torch.tensor([[0, 1, 1, 2, 3], [1, 0, 2, 1, 4]])
    ptr = torch.tensor([0, 3, 5])
    encoding = SpatialEncoding(max_distance=2, heads=4)
    assert repr(encoding) == "SpatialEncoding(max_distance=2, heads=4)"
    torch.nn.init.normal_(encoding.table.weight)
    bias = encoding(edge_index, ptr)
    assert bias.shape == (9 + 4, 4)
    distances = encoding.distances(edge_index, ptr)
    torch.testing.assert_close(bias, encoding.table.weight[distances])
    torch.testing.assert_close(encoding(edge_index, batch=torch.tensor([0, 0, 0, 1, 1])), bias)
    q = torch.randn(5, 4, 8)
    gatattn.attention(q, q, q, ptr=ptr, attn_bias=bias).sum().backward()
    assert encoding.table.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------ the layer


def _layer_reference(layer, x, mask, dense_bias):
    H, C = layer.heads, layer.out_channels
    q, k, v = (lin(x).view(-1, H, C) for lin in (layer.lin_query, layer.lin_key,
                                                  layer.lin_value))
    out = reference.attention(q, k, v, mask, bias=dense_bias, compute_dtype=None)
    return out.reshape(-1, H * C) + layer.lin_skip(x)


@pytest.mark.parametrize("path", ["fused", "propagate"])
@pytest.mark.parametrize("graph", ["batched-causal", "edges"])
def test_layer_takes_attn_bias(path, graph):
    """Both of the layer's paths (gatattn.attention, and PyG's propagate/message when a hook
    must see messages) add the bias; output and dBias against the reference."""
    torch.manual_seed(0)
    layer = gatattn.SelfAttentionConv(6, 4, heads=2).double()
    if path == "propagate":
        layer.register_message_forward_hook(lambda module, inputs, output: None)
        assert layer.runs_propagate()
    x = torch.randn(9, 6, dtype=torch.float64)
    if graph == "edges":
        edge_index = torch.tensor([[0, 1, 2, 3, 5, 8, 8, 2], [1, 1, 0, 3, 4, 7, 6, 6]])
        kwargs = {"edge_index": edge_index}
        bias = torch.randn(8, 2, dtype=torch.float64, requires_grad=True)
        mask = reference.edge_mask(edge_index, 9, 9)
        dense = reference.dense_edge_features(edge_index, bias, 9, 9)
    else:
        ptr = torch.tensor([0, 4, 9])
        kwargs = {"ptr": ptr, "causal": True}
        bias = torch.randn(16 + 25, 2, dtype=torch.float64, requires_grad=True)
        mask = reference.block_mask([4, 5], causal=True)
        dense = stacked_to_dense(bias, ptr)
    out = layer(x, attn_bias=bias, **kwargs)
    expected = _layer_reference(layer, x, mask, dense)
    torch.testing.assert_close(out, expected)
    grad_out = torch.randn_like(out)
    got = torch.autograd.grad(out, bias, grad_out)[0]
    torch.testing.assert_close(got, torch.autograd.grad(expected, bias, grad_out)[0])


def test_layer_propagate_refuses_a_misshapen_bias():
    layer = gatattn.SelfAttentionConv(6, 4, heads=2)
    layer.register_message_forward_hook(lambda module, inputs, output: None)
    with pytest.raises(ValueError, match=r"\(41, 2\)"):
        layer(torch.randn(9, 6), ptr=torch.tensor([0, 4, 9]), attn_bias=torch.zeros(81, 2))


# ------------------------------------------------------------- torch.compile, export, ONNX


def test_bias_under_compile_runs_in_the_opaque_operator():
    """Batched graphs with a bias compile without graph breaks (one dynamic compile serves
    new sizes), and forward and dBias equal eager mode's."""
    torch._dynamo.reset()

    def run(q, k, v, bias, ptr):
        return gatattn.attention(q, k, v, ptr=ptr, causal=True, attn_bias=bias)

    compiled = torch.compile(run, backend="aot_eager", fullgraph=True, dynamic=True)
    for sizes in ([3, 5, 2], [4, 1, 6, 2]):
        ptr = _offsets(sizes)
        inputs = _inputs(int(ptr[-1]), int(ptr[-1]), sum(n * n for n in sizes), 3, 4,
                         torch.float64)
        got = compiled(*inputs, ptr)
        expected = run(*inputs, ptr)
        torch.testing.assert_close(got, expected)
        grad_out = torch.randn_like(got)
        for g, e in zip(torch.autograd.grad(got, inputs, grad_out),
                        torch.autograd.grad(expected, inputs, grad_out), strict=True):
            torch.testing.assert_close(g, e)
    torch._dynamo.reset()


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("bipartite", [False, True])
def test_onnx_decomposition_with_bias_against_eager(bipartite, causal):
    from gatattn.backends.ops import ONNX_DECOMPOSITIONS

    decomposed = ONNX_DECOMPOSITIONS[torch.ops.gatattn.segment_attention.default]
    batch_dst = torch.tensor([1, 0, 0, 1, 2, 2, 2, 0, 1, 1, 4])  # graph 3 empty, graph 4 alone
    batch_src = torch.tensor([2, 0, 1, 1, 0, 2, 0, 4, 4]) if bipartite else batch_dst
    counts_dst = torch.bincount(batch_dst, minlength=5)
    counts_src = torch.bincount(batch_src, minlength=5)
    rows = int((counts_dst * counts_src).sum())
    q, k, v, bias = _inputs(11, batch_src.numel(), rows, 2, 4, torch.float64)
    batch = (batch_dst, batch_src) if bipartite else batch_dst
    expected = gatattn.attention(q, k, v, batch=batch, causal=causal, attn_bias=bias,
                                 scale=0.3)
    got = decomposed(q, k, v, batch_dst, batch_src if bipartite else None, 0.3, causal, bias)
    torch.testing.assert_close(got, expected)


# ------------------------------------------------------------------------------ host reads


@pytest.mark.parametrize("route", ["sdpa", "triton"])
def test_a_bias_adds_no_host_read(monkeypatch, route):
    """With ptr: one host read per call (the graph's), as without a bias; none in the
    backward; none at all on the fused route with validation off (the rows are then checked
    by a device-side assertion)."""
    from tests.test_host_syncs import count_host_reads

    sizes = [10, 15, 5, 15]
    ptr = _offsets(sizes)
    q, k, v, bias = _inputs(45, 45, sum(n * n for n in sizes), 2, 8, torch.float32)
    for _ in range(2):
        with count_host_reads(monkeypatch) as reads:
            out = gatattn.attention(q, k, v, ptr=ptr, causal=True, attn_bias=bias,
                                    backend=route)
        assert reads.count == 1
    with count_host_reads(monkeypatch) as reads:
        out.sum().backward()
    assert reads.count == 0
    if route == "triton":
        with gatattn.validation(False), count_host_reads(monkeypatch) as reads:
            gatattn.attention(q, k, v, ptr=ptr, attn_bias=bias, backend=route)
        assert reads.count == 0


def test_head_major_layout_is_a_pair_of_inverse_permutations():
    """The SDPA route's layout indices are written out in both directions (no scatter): each
    pair must be mutually inverse, and the first head-major rows must be the first graph's
    first head, for an unsorted bipartite batch with an empty graph."""
    from gatattn.graph import describe_graph
    from gatattn.graph.layout import head_major_layout

    batch = (torch.tensor([2, 0, 1, 2, 0, 2, 1, 0, 0, 3, 4]),
             torch.tensor([1, 1, 0, 2, 2, 2, 0, 3, 3, 1, 0]))
    graph = describe_graph(11, 11, batch=batch, bipartite=True)[0]
    plan = graph.segment_plan()
    heads = 3
    layout = head_major_layout(graph, plan, heads, torch.device("cpu"))
    sizes_dst, sizes_src = graph.host_sizes()
    blocks = sum(d * s for d, s in zip(sizes_dst, sizes_src, strict=True))
    for perm, n in ((layout.dst, 11 * heads), (layout.src, 11 * heads), (layout.bias, blocks)):
        assert torch.equal(perm.forward[perm.inverse], torch.arange(n))
        assert torch.equal(perm.inverse[perm.forward], torch.arange(n))
    first = plan.graph_order[0]
    nodes = (batch[0] == first).nonzero().flatten()
    assert layout.dst.forward[:nodes.numel()].tolist() == (nodes * heads).tolist()
