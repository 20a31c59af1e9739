"""``-inf`` entries of ``attn_bias`` remove their pairs, on every route, as in the reference and
torch's SDPA with a float mask: a target whose every pair is removed gets zeros and zero
gradients (never NaN); a partly removed target attends to the pairs left. NaN still propagates."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import gatattn
from gatattn import reference
from gatattn.backends.ops import _masked_dense_attention
from gatattn.bias import stacked_from_padded, stacked_to_dense
from tests.conftest import check_against_reference

NAMES = ("q", "k", "v", "bias")
NEG_INF = float("-inf")


def _offsets(sizes):
    return torch.tensor([0, *sizes]).cumsum(0)


def _ids(sizes):
    return torch.arange(len(sizes)).repeat_interleave(torch.tensor(sizes))


def _padded_bias(sizes_dst, sizes_src, heads, gen):
    """A random ``(B, H, L, S)`` bias with ``-inf`` patterns in every graph: target 0 loses every
    pair in head 0 (not in head 1), target 1 keeps source 0 only, target 2 loses sources 0-2
    (all it sees under a top-left causal mask), the last target every pair in both heads."""
    B, L, S = len(sizes_dst), max(sizes_dst), max(sizes_src)
    bias = torch.randn(B, heads, L, S, generator=gen)
    bias[:, 0, 0, :] = NEG_INF
    bias[:, :, 1, 1:] = NEG_INF
    bias[:, :, 2, :3] = NEG_INF
    for b, n_dst in enumerate(sizes_dst):
        if n_dst:
            bias[b, :, n_dst - 1, :] = NEG_INF
    return bias


IMPLICIT = {  # name: (sizes_dst, sizes_src or None for self-attention, causal)
    "batched": ([4, 0, 3, 6], None, False),
    "causal": ([3, 6, 1], None, True),
    "bipartite": ([3, 5, 2], [4, 2, 6], False),
    "bipartite-bottom-right": ([5, 3], [3, 6], "bottom_right"),
}


def _implicit_case(route, sizes_dst, sizes_src, causal, dtype, heads=2, channels=4):
    bipartite = sizes_src is not None
    sizes_src = sizes_src if bipartite else sizes_dst
    gen = torch.Generator().manual_seed(0)
    n_dst, n_src = sum(sizes_dst), sum(sizes_src)
    q, k, v = (torch.randn(n, heads, channels, generator=gen) for n in (n_dst, n_src, n_src))
    bias = stacked_from_padded(_padded_bias(sizes_dst, sizes_src, heads, gen), sizes_dst,
                               sizes_src)
    inputs = [t.to(dtype).requires_grad_() for t in (q, k, v, bias)]
    ptr_dst, ptr_src = _offsets(sizes_dst), _offsets(sizes_src)
    ptr = (ptr_dst, ptr_src) if bipartite else ptr_dst
    batch_src = _ids(sizes_src) if bipartite else None
    bottom_right = causal == "bottom_right"

    def run(q, k, v, bias):
        if route == "operator":  # the compiled operator's eager implementation and backward
            return torch.ops.gatattn.segment_attention(
                q, k, v, _ids(sizes_dst), batch_src, channels ** -0.5, bool(causal), bias,
                bottom_right)
        if route == "onnx":  # the operator's decomposition for exporters
            return _masked_dense_attention(q, k, v, _ids(sizes_dst), batch_src,
                                           channels ** -0.5, bool(causal), bias, bottom_right)
        return gatattn.attention(q, k, v, ptr=ptr, causal=causal, attn_bias=bias,
                                 backend=route)

    def ref(q, k, v, bias, compute_dtype):
        return reference.attention(q, k, v, reference.block_mask(sizes_dst, sizes_src, causal),
                                   bias=stacked_to_dense(bias, ptr_dst, ptr_src),
                                   compute_dtype=compute_dtype)

    return run, inputs, ref


@pytest.mark.parametrize("case", IMPLICIT)
@pytest.mark.parametrize("route", ["sdpa", "sparse", "auto", "triton", "operator", "onnx"])
def test_implicit_graphs_match_reference(route, case):
    if route == "onnx" and IMPLICIT[case][2] == "bottom_right":
        pytest.skip("the decomposition's bottom-right alignment is tested in test_bias.py")
    dtype = torch.float32 if route == "triton" else torch.float64
    run, inputs, ref = _implicit_case(route, *IMPLICIT[case], dtype)
    check_against_reference(run, inputs, ref, NAMES)


def test_one_complete_graph_with_an_emptied_row_in_the_decomposition():
    """One graph: no pair outside it for the decomposition's finite stand-in to fall on."""
    run, inputs, ref = _implicit_case("onnx", [5], None, False, torch.float64)
    check_against_reference(run, inputs, ref, NAMES)


@pytest.mark.parametrize("route,dtype", [("sdpa", torch.float16), ("sparse", torch.bfloat16)])
def test_half_precision(route, dtype):
    run, inputs, ref = _implicit_case(route, *IMPLICIT["causal"], dtype)
    check_against_reference(run, inputs, ref, NAMES)


def _edges_case(route, dtype, heads=2, channels=4):
    """Random distinct edges in random order, target 4 without any: targets 0 and 3 lose every
    in-edge (3 in head 0 only), target 5 all but one."""
    gen = torch.Generator().manual_seed(3)
    n = 9
    src = torch.randint(0, n, (40,), generator=gen)
    dst = torch.randint(0, n, (40,), generator=gen)
    keep = dst != 4  # target 4 has no in-edge at all
    edge_index = torch.unique(torch.stack([src[keep], dst[keep]]), dim=1)
    edge_index = edge_index[:, torch.randperm(edge_index.size(1), generator=gen)]
    bias = torch.randn(edge_index.size(1), heads, generator=gen)
    into = edge_index[1]
    bias[into == 0] = NEG_INF
    bias[into == 3, 0] = NEG_INF
    of_5 = (into == 5).nonzero().flatten()
    bias[of_5[1:]] = NEG_INF
    assert of_5.numel() > 1 and (into == 0).any() and (into == 3).any()
    q, k, v = (torch.randn(n, heads, channels, generator=gen) for _ in range(3))
    inputs = [t.to(dtype).requires_grad_() for t in (q, k, v, bias)]

    def run(q, k, v, bias):
        if route == "gathered":  # the per-edge form (weights asked for)
            return gatattn.attention(q, k, v, edge_index=edge_index, attn_bias=bias,
                                     backend="sparse", return_attention_weights=True)[0]
        return gatattn.attention(q, k, v, edge_index=edge_index, attn_bias=bias, backend=route)

    def ref(q, k, v, bias, compute_dtype):
        return reference.attention(q, k, v, reference.edge_mask(edge_index, n, n),
                                   bias=reference.dense_edge_features(edge_index, bias, n, n),
                                   compute_dtype=compute_dtype)

    return run, inputs, ref, edge_index


@pytest.mark.parametrize("route", ["sparse", "gathered", "auto", "triton"])
def test_explicit_edges_match_reference(route):
    dtype = torch.float32 if route == "triton" else torch.float64
    run, inputs, ref, _ = _edges_case(route, dtype)
    check_against_reference(run, inputs, ref, NAMES)


def test_removed_weights_are_zero():
    """The weights returned for removed edges are 0, and a target without edges left has none."""
    _, (q, k, v, bias), _, edge_index = _edges_case("sparse", torch.float64)
    _, (_, alpha) = gatattn.attention(q, k, v, edge_index=edge_index, attn_bias=bias,
                                      return_attention_weights=True)
    assert torch.equal(alpha[bias == NEG_INF], torch.zeros(int((bias == NEG_INF).sum()),
                                                           dtype=alpha.dtype))
    assert not alpha.isnan().any()


@pytest.mark.parametrize("graph", ["batched-causal", "edges"])
def test_layer_message_passing_path(graph):
    """The layer's propagate/message path (taken when a hook must see messages)."""
    torch.manual_seed(0)
    layer = gatattn.SelfAttentionConv(6, 4, heads=2).double()
    layer.register_message_forward_hook(lambda module, inputs, output: None)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(9, 6, dtype=torch.float64)
    if graph == "edges":
        _, (_, _, _, bias), _, edge_index = _edges_case("sparse", torch.float64)
        kwargs = {"edge_index": edge_index}
        mask = reference.edge_mask(edge_index, 9, 9)
        dense = reference.dense_edge_features(edge_index, bias, 9, 9)
    else:
        sizes = [3, 6]
        kwargs = {"ptr": _offsets(sizes), "causal": True}
        bias = stacked_from_padded(_padded_bias(sizes, sizes, 2, gen), sizes).double()
        bias.requires_grad_()
        mask = reference.block_mask(sizes, causal=True)
        dense = stacked_to_dense(bias, _offsets(sizes))
    out = layer(x, attn_bias=bias, **kwargs)
    H, C = layer.heads, layer.out_channels
    q, k, v = (lin(x).view(-1, H, C) for lin in (layer.lin_query, layer.lin_key,
                                                  layer.lin_value))
    expected = reference.attention(q, k, v, mask, bias=dense).reshape(-1, H * C)
    expected = expected + layer.lin_skip(x)
    torch.testing.assert_close(out, expected)
    grad_out = torch.randn_like(out)
    params = [bias, *layer.parameters()]
    got = torch.autograd.grad(out, params, grad_out)
    want = torch.autograd.grad(expected, params, grad_out, allow_unused=True)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, torch.zeros_like(g) if w is None else w)


def test_torch_sdpa_with_the_float_mask_agrees():
    """What torch's SDPA gives for the same bias as a padded float mask (a fully -inf row:
    zeros), against the reference and our SDPA route: output and every gradient."""
    sizes = [4, 6, 3]
    B, H, L, C = len(sizes), 2, max(sizes), 4
    gen = torch.Generator().manual_seed(2)
    padded = [torch.randn(B, H, L, C, generator=gen, dtype=torch.float64) for _ in range(3)]
    bias = _padded_bias(sizes, sizes, H, gen).double()
    valid = torch.arange(L) < torch.tensor(sizes).unsqueeze(1)  # (B, L)
    grad = torch.randn(B, H, L, C, generator=gen, dtype=torch.float64) * valid.view(B, 1, L, 1)

    def nodes(x):  # (B, H, L, C) -> (sum n, H, C)
        return x.transpose(1, 2)[valid]

    torch_inputs = [t.clone().requires_grad_() for t in padded]
    mask = bias.masked_fill(~valid.view(B, 1, 1, L), NEG_INF).requires_grad_()
    theirs = F.scaled_dot_product_attention(*torch_inputs, attn_mask=mask)
    theirs = [nodes(theirs), *(nodes(g) for g in torch.autograd.grad(
        theirs, [*torch_inputs, mask], grad)[:3])]
    theirs.append(stacked_from_padded(torch.autograd.grad(
        F.scaled_dot_product_attention(*torch_inputs, attn_mask=mask), mask, grad)[0], sizes))

    inputs = [nodes(t).detach().requires_grad_() for t in padded]
    inputs.append(stacked_from_padded(bias, sizes).requires_grad_())
    ptr = _offsets(sizes)
    expected = reference.attention(*inputs[:3], reference.block_mask(sizes),
                                   bias=stacked_to_dense(inputs[3], ptr))
    expected = [expected, *torch.autograd.grad(expected, inputs, nodes(grad))]
    ours = gatattn.attention(*inputs[:3], ptr=ptr, attn_bias=inputs[3], backend="sdpa")
    ours = [ours, *torch.autograd.grad(ours, inputs, nodes(grad))]
    assert expected[0][0].abs().sum() > 0 and expected[0][-1].abs().sum() == 0  # last: removed
    for name, t, e, o in zip(("out", "dq", "dk", "dv", "dbias"), theirs, expected, ours,
                             strict=True):
        torch.testing.assert_close(t, e, msg=lambda m, name=name: f"torch SDPA {name}: {m}")
        torch.testing.assert_close(o, e, msg=lambda m, name=name: f"ours {name}: {m}")


@pytest.mark.parametrize("route", ["sdpa", "sparse", "auto", "triton", "operator", "onnx"])
def test_nan_in_the_bias_still_propagates(route):
    """A NaN entry makes its target's row NaN in its head (IEEE), beside rows emptied by -inf."""
    dtype = torch.float32 if route == "triton" else torch.float64
    run, inputs, ref = _implicit_case(route, *IMPLICIT["batched"], dtype)
    q, k, v, bias = (t.detach() for t in inputs)
    bias = bias.clone()
    bias[16 + 2 * 3 + 1, 1] = float("nan")  # graph 2, target 2, source 1, head 1
    got = run(q, k, v, bias)
    expected = ref(q, k, v, bias, torch.float64)
    assert expected[4 + 2, 1].isnan().all() and expected.isnan().sum() == expected.size(-1)
    torch.testing.assert_close(got.double(), expected.double(), equal_nan=True, atol=1e-5,
                               rtol=1e-5)
