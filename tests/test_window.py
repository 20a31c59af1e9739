"""Sliding windows: a band around each graph's diagonal, on every torch route, against the
reference (``reference.block_mask(..., window=...)``) and against SDPA with an explicit band mask.
The Triton kernels' windows are tested in test_window_kernels.py, the ring and the KV cache in
their own files."""

import pytest
import torch
import torch.nn.functional as F

import gatattn
from gatattn import reference
from gatattn.backends.ops import _masked_dense_attention
from tests.conftest import check_against_reference, make_qkv, masked_reference
from tests.test_functional import ptr_from_sizes

ROUTES = ["sdpa", "sparse", "auto"]

# (name, sizes_dst, sizes_src, causal, window)
KINDS = [
    ("complete", [13], [13], False, (3, 2)),
    ("ptr batch", [5, 9, 1, 0, 12], [5, 9, 1, 0, 12], False, (2, None)),
    ("left unbounded", [5, 9, 12], [5, 9, 12], False, (None, 1)),
    ("diagonal only", [6, 4], [6, 4], False, (0, 0)),
    ("causal", [5, 17, 1], [5, 17, 1], True, (3, 0)),
    ("bipartite", [9, 2], [4, 7], False, (1, 2)),
    ("bipartite, window past the sources", [12, 3], [4, 9], False, (0, 1)),
    ("bipartite causal top-left", [9, 2], [4, 7], True, (2, 0)),
    ("bipartite causal bottom-right", [9, 2, 3], [4, 7, 3], "bottom_right", (2, 0)),
]


def _graph_keywords(sizes_dst, sizes_src):
    ptr_dst, ptr_src = ptr_from_sizes(sizes_dst), ptr_from_sizes(sizes_src)
    return {"ptr": ptr_dst if sizes_dst == sizes_src else (ptr_dst, ptr_src)}


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("name,sizes_dst,sizes_src,causal,window", KINDS,
                         ids=[kind[0] for kind in KINDS])
def test_routes_match_the_reference(route, name, sizes_dst, sizes_src, causal, window):
    inputs = make_qkv(sum(sizes_dst), sum(sizes_src), 2, 5, dtype=torch.float64)
    keywords = _graph_keywords(sizes_dst, sizes_src)
    mask = reference.block_mask(sizes_dst, sizes_src, causal, window)

    def run(q, k, v):
        return gatattn.attention(q, k, v, causal=causal, window=window, backend=route,
                                 **keywords)

    check_against_reference(run, inputs, masked_reference(mask))


@pytest.mark.parametrize("route", ROUTES)
def test_graph_object_equals_the_keyword_form(route):
    sizes = [7, 1, 11]
    q, k, v = make_qkv(19, 19, 2, 4, dtype=torch.float64)
    graph = gatattn.build_graph(ptr=ptr_from_sizes(sizes), causal=True, window=(2, 0))
    assert "window=(2, 0)" in repr(graph)
    keyword = gatattn.attention(q, k, v, ptr=ptr_from_sizes(sizes), causal=True, window=(2, 0),
                                backend=route)
    torch.testing.assert_close(gatattn.attention(q, k, v, graph=graph, backend=route), keyword,
                               rtol=0, atol=0)


def test_an_unsorted_batch_windows_each_graph_by_order_of_appearance():
    batch = torch.tensor([1, 0, 0, 1, 2, 0, 1, 1, 0, 2, 1, 0])
    order = torch.sort(batch, stable=True).indices  # graph order, each graph's own order kept
    sizes = torch.bincount(batch).tolist()
    mask = torch.zeros(12, 12, dtype=torch.bool)
    mask[order.unsqueeze(1), order.unsqueeze(0)] = reference.block_mask(sizes, window=(1, 2))
    inputs = make_qkv(12, 12, 2, 4, dtype=torch.float64)
    for route in ROUTES:
        check_against_reference(
            lambda q, k, v, route=route: gatattn.attention(q, k, v, batch=batch, window=(1, 2),
                                                           backend=route),
            inputs, masked_reference(mask))


def test_sequences_match_sdpa_with_an_explicit_band_mask():
    B, L, H, C, left, right = 3, 10, 2, 8, 3, 1
    q, k, v = (torch.randn(B, H, L, C, dtype=torch.float64) for _ in range(3))
    offset = torch.arange(L).view(1, -1) - torch.arange(L).view(-1, 1)  # j - i
    band = (offset >= -left) & (offset <= right)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=band)
    flat = [t.transpose(1, 2).reshape(B * L, H, C) for t in (q, k, v)]
    ptr = torch.arange(0, B * L + 1, L)
    for route in ROUTES:
        out = gatattn.attention(*flat, ptr=ptr, window=(left, right), backend=route)
        torch.testing.assert_close(out.view(B, L, H, C).transpose(1, 2), expected)
    causal_band = (offset >= -left) & (offset <= 0)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_band)
    out = gatattn.attention(*flat, ptr=ptr, causal=True, window=(left, 0))
    torch.testing.assert_close(out.view(B, L, H, C).transpose(1, 2), expected)


@pytest.mark.parametrize("route", ["sdpa", "sparse"])
def test_a_stacked_bias_gets_gradients_inside_the_band_only(route):
    sizes_dst, sizes_src, window = [3, 8], [6, 2], (1, 3)
    q, k, v = make_qkv(11, 8, 2, 4, dtype=torch.float64)
    rows = sum(d * s for d, s in zip(sizes_dst, sizes_src, strict=True))
    bias = torch.randn(rows, 2, dtype=torch.float64, requires_grad=True)
    ptr_dst, ptr_src = ptr_from_sizes(sizes_dst), ptr_from_sizes(sizes_src)
    mask = reference.block_mask(sizes_dst, sizes_src, window=window)
    keywords = _graph_keywords(sizes_dst, sizes_src)
    check_against_reference(
        lambda q, k, v, b: gatattn.attention(q, k, v, window=window, attn_bias=b,
                                             backend=route, **keywords),
        (q, k, v, bias),
        lambda q, k, v, b, compute_dtype: reference.attention(
            q, k, v, mask, bias=gatattn.bias.stacked_to_dense(b, ptr_dst, ptr_src),
            compute_dtype=compute_dtype),
        names=("q", "k", "v", "bias"))
    out = gatattn.attention(q, k, v, window=window, attn_bias=bias, backend=route, **keywords)
    (grad,) = torch.autograd.grad(out.sum(), bias)
    dense_grad = gatattn.bias.stacked_to_dense(grad, ptr_dst, ptr_src)  # (N_dst, N_src, H)
    assert dense_grad[mask].abs().sum() > 0
    assert torch.all(dense_grad[~mask] == 0)


def test_edge_sets_keep_their_edges_inside_the_band():
    batch = torch.tensor([0] * 9 + [1] * 7)
    gen = torch.Generator().manual_seed(0)
    pairs = [torch.randint(0, 9, (2, 40), generator=gen),
             9 + torch.randint(0, 7, (2, 20), generator=gen)]
    edge_index = torch.cat(pairs, 1).unique(dim=1)  # no duplicates: edge features densify
    edge_index = edge_index[:, torch.randperm(edge_index.size(1), generator=gen)]
    num_edges, window = edge_index.size(1), (2, 1)
    offset = edge_index[0] - edge_index[1]  # the graphs start at 0 and 9 on both sides
    kept = (offset >= -window[0]) & (offset <= window[1])
    graph = gatattn.build_graph(edge_index=edge_index, batch=batch, window=window)
    torch.testing.assert_close(graph.edge_index, edge_index[:, kept])
    assert graph.num_given_edges == num_edges > int(kept.sum()) > 0
    mask = reference.edge_mask(edge_index[:, kept], 16, 16)
    inputs = make_qkv(16, 16, 2, 4, dtype=torch.float64)
    for route in ("sparse", "auto"):
        check_against_reference(
            lambda q, k, v, route=route: gatattn.attention(
                q, k, v, edge_index=edge_index, batch=batch, window=window, backend=route),
            inputs, masked_reference(mask))
    # Per-edge rows (attn_bias, edge_attr) are given for every edge; the kept ones are read.
    bias = torch.randn(num_edges, 2, dtype=torch.float64, requires_grad=True)
    edge_attr = torch.randn(num_edges, 2, 4, dtype=torch.float64, requires_grad=True)
    check_against_reference(
        lambda q, k, v, b, e: gatattn.attention(q, k, v, graph=graph, attn_bias=b,
                                                edge_attr=e),
        (*inputs, bias, edge_attr),
        lambda q, k, v, b, e, compute_dtype: reference.attention(
            q, k, v, mask, compute_dtype=compute_dtype,
            bias=reference.dense_edge_features(edge_index[:, kept], b[kept], 16, 16),
            edge_key=reference.dense_edge_features(edge_index[:, kept], e[kept], 16, 16),
            edge_value=reference.dense_edge_features(edge_index[:, kept], e[kept], 16, 16)),
        names=("q", "k", "v", "bias", "edge_attr"))
    with pytest.raises(ValueError, match=str(num_edges)):
        gatattn.attention(*inputs, graph=graph, attn_bias=bias[kept])


@pytest.mark.parametrize("route", ["sdpa", "sparse"])
def test_log_sum_exp_matches_the_reference(route):
    sizes_dst, sizes_src, causal, window = [9, 2, 3], [4, 7, 3], "bottom_right", (1, 0)
    q, k, v = make_qkv(14, 14, 2, 4, dtype=torch.float64)
    mask = reference.block_mask(sizes_dst, sizes_src, causal, window)
    out, lse = gatattn.attention(q, k, v, causal=causal, window=window, return_lse=True,
                                 backend=route, **_graph_keywords(sizes_dst, sizes_src))
    ref_out, ref_lse = reference.attention(q, k, v, mask, return_lse=True)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse)
    assert torch.isinf(lse).any()  # the blind rows of the bottom-right graphs


def test_pair_counts_and_materialised_edges_follow_the_band():
    sizes_dst, sizes_src = [9, 2, 3], [4, 7, 3]
    ptr = (ptr_from_sizes(sizes_dst), ptr_from_sizes(sizes_src))
    for causal, window in [(False, (1, 2)), (True, (2, 0)), ("bottom_right", (0, 0)),
                           (False, (None, 0)), (False, (5, None))]:
        graph = gatattn.build_graph(ptr=ptr, causal=causal, window=window)
        mask = reference.block_mask(sizes_dst, sizes_src, causal, window)
        assert graph.num_edges() == int(mask.sum())
        expected = mask.nonzero().t().flip(0)  # (src, dst), sorted by target then source
        torch.testing.assert_close(graph.to_edge_index(), expected)


def test_a_long_sequence_materialises_its_band_only():
    n = 300_000  # complete: 9e10 pairs, far above the materialisation limit
    graph = gatattn.build_graph(num_nodes=n, window=(2, 2))
    assert graph.num_edges() == 5 * n - 6
    edges = graph.to_edge_index()
    assert edges.shape == (2, 5 * n - 6)
    assert int((edges[0] - edges[1]).abs().max()) == 2
    with pytest.raises(gatattn.graph.GraphTooLargeError):
        gatattn.build_graph(num_nodes=n).to_edge_index()


@pytest.mark.parametrize("route", ["sdpa", "sparse"])
def test_a_nan_key_reaches_only_the_targets_whose_window_holds_it(route):
    sizes = [8, 6]
    q, k, v = make_qkv(14, 14, 2, 4, dtype=torch.float64)
    k = k.detach().clone()
    k[3, 1] = float("nan")  # graph 0, position 3, head 1
    mask = reference.block_mask(sizes, window=(1, 2))
    out = gatattn.attention(q, k, v, ptr=ptr_from_sizes(sizes), window=(1, 2), backend=route)
    expected = reference.attention(q, k, v, mask)
    assert torch.equal(out.isnan(), expected.isnan())
    assert set(out.isnan().any(-1).nonzero()[:, 0].tolist()) == {1, 2, 3, 4}  # 3-2 .. 3+1
    finite = ~expected.isnan()
    torch.testing.assert_close(out[finite], expected[finite])


def test_the_layer_takes_a_window_on_both_paths():
    conv = gatattn.SelfAttentionConv(6, 4, heads=2).double()
    x = torch.randn(14, 6, dtype=torch.float64)
    ptr = ptr_from_sizes([8, 6])
    fused = conv(x, ptr=ptr, causal=True, window=(2, 0))
    graph = gatattn.build_graph(ptr=ptr, causal=True, window=(2, 0))
    torch.testing.assert_close(conv(x, graph=graph), fused)
    q, k, v = conv.project(x, x)
    expected = conv.finish(reference.attention(
        q, k, v, reference.block_mask([8, 6], causal=True, window=(2, 0))), x)
    torch.testing.assert_close(fused, expected)
    handle = conv.register_message_forward_hook(lambda *args: None)  # PyG's propagate runs
    assert conv.runs_propagate()
    torch.testing.assert_close(conv(x, ptr=ptr, causal=True, window=(2, 0)), fused)
    torch.testing.assert_close(conv(x, graph=graph), fused)
    handle.remove()


def test_the_export_decomposition_takes_the_window():
    sizes_dst, sizes_src = [9, 2, 3], [4, 7, 3]
    q, k, v = make_qkv(14, 14, 2, 4, dtype=torch.float64)
    batch_dst = torch.repeat_interleave(torch.arange(3), torch.tensor(sizes_dst))
    batch_src = torch.repeat_interleave(torch.arange(3), torch.tensor(sizes_src))
    for causal, window in [(False, (1, 2)), ("bottom_right", (2, 0))]:
        mask = reference.block_mask(sizes_dst, sizes_src, causal, window)
        dense = _masked_dense_attention(q, k, v, batch_dst, batch_src, 0.5, bool(causal), None,
                                        causal == "bottom_right", 0.0, None, *window)
        torch.testing.assert_close(dense, reference.attention(q, k, v, mask, scale=0.5))


def test_compiled_batches_take_the_window():
    q, k, v = make_qkv(20, 20, 2, 4)
    ptr = ptr_from_sizes([7, 13])

    def fn(q, k, v, ptr):
        return gatattn.attention(q, k, v, ptr=ptr, causal=True, window=(3, 0))

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v, ptr), fn(q, k, v, ptr))


@pytest.mark.parametrize("window,causal,message", [
    ((-1, 2), False, "ints >= 0"),
    ((1,), False, "pair"),
    ((1.5, 0), False, "ints >= 0"),
    ((True, 0), False, "ints >= 0"),
    ((2, 1), True, "right = 0"),
])
def test_bad_windows_are_refused(window, causal, message):
    q, k, v = make_qkv(6, 6, 1, 4)
    with pytest.raises(ValueError, match=message):
        gatattn.attention(q, k, v, window=window, causal=causal)
    with pytest.raises(ValueError, match=message):
        gatattn.build_graph(num_nodes=6, window=window, causal=causal)


def test_a_graph_with_a_window_keyword_is_refused():
    q, k, v = make_qkv(6, 6, 1, 4)
    graph = gatattn.build_graph(num_nodes=6, window=(1, 1))
    with pytest.raises(ValueError, match="window"):
        gatattn.attention(q, k, v, graph=graph, window=(1, 1))
    conv = gatattn.SelfAttentionConv(4, 4)
    with pytest.raises(ValueError, match="window"):
        conv(torch.randn(6, 4), graph=graph, window=(1, 1))


def test_windows_that_keep_every_pair_are_no_window():
    assert gatattn.build_graph(num_nodes=5, window=(None, None)).window is None
    assert gatattn.build_graph(num_nodes=5, causal=True, window=(None, 0)).window is None
    assert gatattn.build_graph(num_nodes=5, window=(None, 0)).window == (None, 0)


@pytest.mark.parametrize("sizes_dst,sizes_src,causal,window", [
    ([300, 170], [300, 170], False, (5, 3)),
    ([300, 170], [300, 170], True, (70, 0)),
    ([200, 40], [330, 170], "bottom_right", (9, 0)),
])
def test_narrow_bands_over_long_graphs_run_in_chunks(monkeypatch, sizes_dst, sizes_src, causal,
                                                     window):
    inputs = make_qkv(sum(sizes_dst), sum(sizes_src), 2, 4, dtype=torch.float64)
    keywords = _graph_keywords(sizes_dst, sizes_src)
    mask = reference.block_mask(sizes_dst, sizes_src, causal, window)
    keys_seen = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        keys_seen.append(k.size(-2))
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    check_against_reference(
        lambda q, k, v: gatattn.attention(q, k, v, causal=causal, window=window, backend="sdpa",
                                          **keywords),
        inputs, masked_reference(mask))
    # The longest graphs run in chunks of max(width, 64) rows, each against its rows' keys:
    # no SDPA call sees a whole graph of that size.
    width = sum(window) + 1
    assert max(keys_seen) < max(sizes_src)
    assert max(width, 64) + width - 1 in keys_seen
    out, lse = gatattn.attention(*inputs, causal=causal, window=window, backend="sdpa",
                                 return_lse=True, **keywords)
    torch.testing.assert_close(lse, reference.attention(*inputs, mask, return_lse=True)[1])


def test_chunked_bands_take_grouped_heads_and_second_derivatives():
    sizes, window = [300], (6, 6)
    ptr = ptr_from_sizes(sizes)
    q = torch.randn(300, 4, 4, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(300, 2, 4, dtype=torch.float64, requires_grad=True) for _ in range(2))
    mask = reference.block_mask(sizes, window=window)
    out = gatattn.attention(q, k, v, ptr=ptr, window=window)
    torch.testing.assert_close(out, reference.attention(q, k, v, mask))
    # Second derivatives through the chunk layout (SDPA's math backend recomputes).
    (grad_q,) = torch.autograd.grad(out.pow(2).sum(), q, create_graph=True)
    (hvp,) = torch.autograd.grad(grad_q.sum(), v)
    ref_out = reference.attention(q, k, v, mask)
    (ref_grad_q,) = torch.autograd.grad(ref_out.pow(2).sum(), q, create_graph=True)
    (ref_hvp,) = torch.autograd.grad(ref_grad_q.sum(), v)
    torch.testing.assert_close(hvp, ref_hvp)
