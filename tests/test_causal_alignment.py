"""``causal="bottom_right"``: each graph's last target sees its last source (FlashAttention's
and varlen_attn's convention), on every route, against the reference; ``True`` / ``"top_left"``
stay SDPA's ``is_causal``. The two differ on bipartite graphs only."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gatattn
from gatattn import reference
from gatattn.backends.ops import _masked_dense_attention
from gatattn.graph import describe_graph
from tests.conftest import check_against_reference, make_qkv, masked_reference

ROUTES = ["sdpa", "sparse", "triton", "auto"]

CASES = {  # name: (sizes_dst, sizes_src)
    "more sources": ([2, 3, 1], [5, 7, 4]),
    "more targets (blind rows)": ([6, 9, 4], [2, 4, 4]),
    "mixed, empty graphs": ([4, 0, 7, 3, 2], [6, 3, 2, 0, 2]),
    "one graph, longer than a tile": ([70], [100]),
    "one graph, blind rows across tiles": ([100], [37]),
}


def _offsets(sizes):
    return torch.tensor([0, *sizes]).cumsum(0)


def _case(sizes_dst, sizes_src, dtype, *, heads=2, kv_heads=None, channels=6, seed=0):
    q, k, v = make_qkv(sum(sizes_dst), sum(sizes_src), heads, channels, channels + 2, dtype,
                       seed)
    if kv_heads is not None:
        k, v = (t[:, :kv_heads].detach().clone().requires_grad_() for t in (k, v))
    ptr = (_offsets(sizes_dst), _offsets(sizes_src))
    mask = reference.block_mask(sizes_dst, sizes_src, causal="bottom_right")
    return (q, k, v), ptr, mask


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("route", ROUTES)
def test_bipartite_batches_match_reference(route, case):
    dtype = torch.float32 if route == "triton" else torch.float64
    inputs, ptr, mask = _case(*CASES[case], dtype)
    check_against_reference(
        lambda q, k, v: gatattn.attention(q, k, v, ptr=ptr, causal="bottom_right",
                                          backend=route),
        inputs, masked_reference(mask))


@pytest.mark.parametrize("route", ["sdpa", "sparse"])
def test_float32_and_half_precision(route):
    for dtype in (torch.float32, torch.bfloat16):
        inputs, ptr, mask = _case([9, 3, 5], [4, 8, 5], dtype)
        check_against_reference(
            lambda q, k, v, ptr=ptr: gatattn.attention(q, k, v, ptr=ptr, causal="bottom_right",
                                                       backend=route),
            inputs, masked_reference(mask))


@settings(max_examples=30, deadline=None)
@given(sizes=st.lists(st.tuples(st.integers(0, 8), st.integers(0, 8)), min_size=1, max_size=5),
       route=st.sampled_from(["sdpa", "sparse"]))
def test_random_batches_match_reference(sizes, route):
    inputs, ptr, mask = _case([d for d, _ in sizes], [s for _, s in sizes], torch.float64)
    check_against_reference(
        lambda q, k, v: gatattn.attention(q, k, v, ptr=ptr, causal="bottom_right",
                                          backend=route),
        inputs, masked_reference(mask))


@pytest.mark.parametrize("route", ["sdpa", "sparse", "triton"])
def test_grouped_query_heads(route):
    dtype = torch.float32 if route == "triton" else torch.float64
    inputs, ptr, mask = _case([5, 2], [3, 6], dtype, heads=4, kv_heads=2)

    def ref(q, k, v, compute_dtype):
        k, v = (t.repeat_interleave(2, dim=1) for t in (k, v))
        return reference.attention(q, k, v, mask, compute_dtype=compute_dtype)

    check_against_reference(
        lambda q, k, v: gatattn.attention(q, k, v, ptr=ptr, causal="bottom_right",
                                          backend=route), inputs, ref)


def test_unsorted_batch_pairs_align_each_graph_by_order_of_appearance():
    batch_dst = torch.tensor([1, 0, 1, 1, 0, 1, 2])
    batch_src = torch.tensor([0, 1, 0, 2, 2, 1, 0, 2])
    q, k, v = make_qkv(7, 8, 2, 4, dtype=torch.float64)
    mask = torch.zeros(7, 8, dtype=torch.bool)
    for g in range(3):
        dst, src = (batch_dst == g).nonzero().flatten(), (batch_src == g).nonzero().flatten()
        block = reference.block_mask([dst.numel()], [src.numel()], causal="bottom_right")
        mask[dst.unsqueeze(1), src.unsqueeze(0)] = block
    expected = reference.attention(q, k, v, mask)
    for route in ("sdpa", "sparse"):
        out = gatattn.attention(q, k, v, batch=(batch_dst, batch_src), causal="bottom_right",
                                backend=route)
        torch.testing.assert_close(out, expected)


def test_one_bipartite_graph_without_ptr():
    """Queries at the end of a longer key sequence: a decoding step's shape."""
    q, k, v = make_qkv(3, 10, 2, 4, dtype=torch.float64)
    mask = reference.block_mask([3], [10], causal="bottom_right")
    assert mask[0].sum() == 8 and mask[2].all()
    for route in ("sdpa", "sparse"):
        out = gatattn.attention(q, k, v, causal="bottom_right", backend=route)
        torch.testing.assert_close(out, reference.attention(q, k, v, mask))


def test_top_left_is_the_default_and_differs_on_bipartite_graphs():
    q, k, v = make_qkv(3, 10, 2, 4, dtype=torch.float64)
    top_left = gatattn.attention(q, k, v, causal=True)
    torch.testing.assert_close(gatattn.attention(q, k, v, causal="top_left"), top_left)
    torch.testing.assert_close(
        top_left, reference.attention(q, k, v, reference.block_mask([3], [10], causal=True)))
    assert not torch.allclose(gatattn.attention(q, k, v, causal="bottom_right"), top_left)


@pytest.mark.parametrize("route", ["sdpa", "sparse"])
def test_self_attention_alignments_are_the_same_graph(route):
    q, k, v = make_qkv(12, 12, 2, 4, dtype=torch.float64)
    ptr = torch.tensor([0, 5, 12])
    torch.testing.assert_close(
        gatattn.attention(q, k, v, ptr=ptr, causal="bottom_right", backend=route),
        gatattn.attention(q, k, v, ptr=ptr, causal=True, backend=route))


def test_explicit_edges_are_filtered_bottom_right():
    """With ``edge_index``, ``causal`` drops the edges outside each graph's causal pattern,
    aligned as asked."""
    sizes_dst, sizes_src = [4, 2], [2, 5]
    ptr = (_offsets(sizes_dst), _offsets(sizes_src))
    complete = describe_graph(6, 7, ptr=ptr, bipartite=True)[0].to_edge_index()
    q, k, v = make_qkv(6, 7, 2, 4, dtype=torch.float64)
    for causal in (True, "bottom_right"):
        mask = reference.block_mask(sizes_dst, sizes_src, causal=causal)
        out = gatattn.attention(q, k, v, edge_index=complete, ptr=ptr, causal=causal)
        torch.testing.assert_close(out, reference.attention(q, k, v, mask))


def test_attention_weights_list_the_kept_pairs():
    sizes_dst, sizes_src = [5, 1], [2, 4]
    q, k, v = make_qkv(6, 6, 1, 4, dtype=torch.float64)
    ptr = (_offsets(sizes_dst), _offsets(sizes_src))
    _, (edge_index, alpha) = gatattn.attention(q, k, v, ptr=ptr, causal="bottom_right",
                                               return_attention_weights=True)
    mask = reference.block_mask(sizes_dst, sizes_src, causal="bottom_right")
    dense = torch.zeros_like(mask)
    dense[edge_index[1], edge_index[0]] = True
    assert torch.equal(dense, mask)
    graph, _ = describe_graph(6, 6, ptr=ptr, causal="bottom_right", bipartite=True)
    assert graph.num_edges() == int(mask.sum())
    # Blind targets (the first 3 of graph 0) have no edge; the others' weights sum to 1.
    sums = torch.zeros(6, dtype=alpha.dtype).index_add_(0, edge_index[1], alpha[:, 0])
    torch.testing.assert_close(sums, torch.tensor([0, 0, 0, 1, 1, 1], dtype=alpha.dtype))


@pytest.mark.parametrize("route", ["sdpa", "sparse", "triton"])
def test_a_nan_key_reaches_only_the_targets_that_see_it(route):
    """Key 3 of a 2 x 6 graph is seen, bottom-right, by both targets (they see 0..4 and
    0..5); key 5 only by the last; a NaN query of a blind target reaches nothing."""
    dtype = torch.float32 if route == "triton" else torch.float64
    q, k, v = (t.detach() for t in make_qkv(5, 8, 1, 4, dtype=dtype))
    ptr = (torch.tensor([0, 2, 5]), torch.tensor([0, 6, 8]))  # graphs 2 x 6 and 3 x 2
    k[5] = float("nan")
    q[2] = float("nan")  # graph 1's first target sees no key (3 targets, 2 keys)
    out = gatattn.attention(q, k, v, ptr=ptr, causal="bottom_right", backend=route)
    assert out[0].isfinite().all() and out[1].isnan().all()
    assert (out[2] == 0).all() and out[3:].isfinite().all()


def test_dense_export_decomposition_matches():
    """The operator's ONNX decomposition (dense, mask from graph ids) aligns bottom-right."""
    sizes_dst, sizes_src = [4, 1, 3], [2, 3, 6]
    q, k, v = (t.detach() for t in make_qkv(8, 11, 2, 4, dtype=torch.float64))
    batch_dst = torch.repeat_interleave(torch.arange(3), torch.tensor(sizes_dst))
    batch_src = torch.repeat_interleave(torch.arange(3), torch.tensor(sizes_src))
    out = _masked_dense_attention(q, k, v, batch_dst, batch_src, 0.5, True, None, True)
    mask = reference.block_mask(sizes_dst, sizes_src, causal="bottom_right")
    torch.testing.assert_close(out, reference.attention(q, k, v, mask, scale=0.5))


def test_compiled_batches_run_bottom_right():
    """Under torch.compile batched graphs run as the opaque operator, which takes the
    alignment."""
    sizes_dst, sizes_src = [4, 1, 3], [2, 3, 6]
    inputs, ptr, mask = _case(sizes_dst, sizes_src, torch.float32)
    compiled = torch.compile(lambda q, k, v: gatattn.attention(
        q, k, v, ptr=ptr, causal="bottom_right"), backend="eager", fullgraph=True)
    check_against_reference(compiled, inputs, masked_reference(mask))


def test_the_layer_takes_the_alignment():
    conv = gatattn.SelfAttentionConv(8, 4, heads=2).double()
    x_src, x_dst = torch.randn(10, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64)
    ptr = (torch.tensor([0, 10]), torch.tensor([0, 3]))  # the layer's pairs are (src, dst)
    out = conv((x_src, x_dst), ptr=ptr, causal="bottom_right")
    edges = describe_graph(3, 10, ptr=ptr[::-1], causal="bottom_right",
                           bipartite=True)[0].to_edge_index()
    torch.testing.assert_close(out, conv((x_src, x_dst), edge_index=edges))
    assert not torch.allclose(out, conv((x_src, x_dst), ptr=ptr, causal=True))


@pytest.mark.parametrize("bad", ["yes", "bottom-right", 1, None])
def test_unknown_alignments_are_refused(bad):
    q, k, v = make_qkv(3, 5, 1, 4)
    with pytest.raises(ValueError, match="'bottom_right'"):
        gatattn.attention(q, k, v, causal=bad)
