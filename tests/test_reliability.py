"""Defects that once gave wrong numbers or crashed, each pinned by a test (the reliability issue):
stale cached edge orders, second derivatives, inference mode, empty batches, degenerate scales,
strided head dims, float64 on the kernels, converters' dtypes, and non-finite inputs."""

import gc
import os
import weakref

import numpy as np
import pytest
import torch
from torch import nn
from torch_geometric.nn import TransformerConv

import gatattn
from gatattn import SelfAttentionConv, reference
from tests.conftest import assert_close, check_against_reference, make_qkv, masked_reference
from tests.test_functional import batch_from_sizes, ptr_from_sizes, same_graph_mask

INTERPRETED = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="Triton runs on CPU tensors only in its interpreter")
EDGE_ROUTES = ["sparse", pytest.param("triton", marks=INTERPRETED)]


def qkv(n_dst, n_src, heads=2, channels=4, dtype=torch.float64, seed=0):
    return make_qkv(n_dst, n_src, heads, channels, dtype=dtype, seed=seed)


def edge_reference(q, k, v, edge_index):
    mask = reference.edge_counts(edge_index, q.size(0), k.size(0))
    return reference.attention(q, k, v, mask)


# 1. The cached edge order never answers for different contents.

@pytest.mark.parametrize("backend", EDGE_ROUTES)
@pytest.mark.parametrize("how", ["numpy", "data", "inplace"])
def test_cached_edge_order_follows_the_contents(backend, how):
    dtype = torch.float32 if backend == "triton" else torch.float64
    q, k, v = qkv(6, 6, dtype=dtype)
    array = np.array([[0, 1, 2, 3, 4, 5, 1], [1, 2, 3, 4, 5, 0, 0]])
    edge_index = torch.from_numpy(array)
    gatattn.attention(q, k, v, edge_index=edge_index, backend=backend)  # fills the cache
    if how == "numpy":  # shares memory: no version bump
        array[1] = [0, 0, 5, 5, 2, 2, 3]
    elif how == "data":  # .data writes bypass the version counter
        edge_index.data[1] = torch.tensor([0, 0, 5, 5, 2, 2, 3])
    else:
        edge_index[1] = torch.tensor([0, 0, 5, 5, 2, 2, 3])
    out = gatattn.attention(q, k, v, edge_index=edge_index, backend=backend)
    expected = edge_reference(q.double(), k.double(), v.double(), edge_index).to(dtype)
    torch.testing.assert_close(out, expected)


def test_cached_edge_order_is_reused_for_equal_contents():
    from gatattn.backends.csr import csr_of

    edge_index = torch.tensor([[0, 1, 2], [1, 2, 0]])
    assert csr_of(edge_index, 3, 3) is csr_of(edge_index, 3, 3)
    assert csr_of(edge_index, 3, 3) is not csr_of(edge_index, 4, 3)


# 2. Second derivatives are exact on every route, or refused with a clear error.

def _gradgradcheck(fn, inputs):
    assert torch.autograd.gradgradcheck(fn, inputs, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("causal", [False, True])
def test_double_backward_on_edge_index(causal):
    edge_index = torch.tensor([[0, 1, 2, 3, 4, 0, 2, 2, 4], [1, 2, 3, 4, 0, 0, 3, 3, 1]])
    _gradgradcheck(lambda q, k, v: gatattn.attention(q, k, v, edge_index=edge_index,
                                                     causal=causal), qkv(5, 5, channels=3))


@pytest.mark.parametrize("graph", ["complete", "batch", "unsorted", "cross"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.heavy  # gradgradcheck on every implicit kind: ~30 s
def test_double_backward_on_implicit_graphs(graph, causal):
    n_dst, n_src, kwargs = 6, 6, {}
    if graph in ("batch", "unsorted"):
        batch = torch.tensor([0, 1, 0, 2, 1, 0] if graph == "unsorted" else [0, 0, 0, 1, 1, 2])
        kwargs = {"batch": batch}
    if graph == "cross":
        n_dst, kwargs = 4, {"ptr": (ptr_from_sizes([1, 3]), ptr_from_sizes([4, 2]))}
    _gradgradcheck(lambda q, k, v: gatattn.attention(q, k, v, causal=causal, backend="sdpa",
                                                     **kwargs), qkv(n_dst, n_src, channels=3))


def _second_order(fn, inputs, grad_out, direction):
    """The gradient of <d(fn . grad_out)/d inputs, direction> with respect to the inputs."""
    out = fn(*inputs)
    first = torch.autograd.grad(out, inputs, grad_out, create_graph=True)
    total = sum((g * d).sum() for g, d in zip(first, direction, strict=True))
    return torch.autograd.grad(total, inputs)


@INTERPRETED
@pytest.mark.parametrize("graph", ["batch", "edges"])
def test_double_backward_through_the_kernels(graph):
    sizes = [3, 5, 1]
    batch = batch_from_sizes(sizes)
    n = batch.numel()
    edge_index = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 8, 8], [1, 2, 0, 4, 5, 3, 7, 6, 8]])
    kwargs = {"batch": batch} if graph == "batch" else {"edge_index": edge_index}
    mask = (same_graph_mask(batch, batch) if graph == "batch"
            else reference.edge_counts(edge_index, n, n))
    inputs = qkv(n, n, channels=4, dtype=torch.float32)
    gen = torch.Generator().manual_seed(7)
    grad_out = torch.randn(n, 2, 4, generator=gen)
    direction = [torch.randn(t.shape, generator=gen) for t in inputs]
    got = _second_order(lambda q, k, v: gatattn.attention(q, k, v, backend="triton", **kwargs),
                        inputs, grad_out, direction)
    hi = [t.detach().double().requires_grad_() for t in inputs]
    expected = _second_order(lambda q, k, v: reference.attention(q, k, v, mask), hi,
                             grad_out.double(), [d.double() for d in direction])
    for name, g, e in zip("qkv", got, expected, strict=True):
        assert_close(f"second-order d{name}", g, e)


@pytest.mark.parametrize("order", ["sorted", "unsorted"])
def test_double_backward_over_several_size_groups(order):
    """Several SDPA calls (one per size group, or per run of equal sizes) share one wrapper:
    the gradients it records are the reference's, differentiated again."""
    batch = batch_from_sizes([3, 5, 5, 2, 4, 3])
    if order == "unsorted":
        batch = batch[torch.randperm(batch.numel(), generator=torch.Generator().manual_seed(3))]
    n = batch.numel()
    inputs = qkv(n, n, channels=3)
    gen = torch.Generator().manual_seed(5)
    grad_out = torch.randn(n, 2, 3, generator=gen, dtype=torch.float64)
    direction = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in inputs]
    got = _second_order(lambda q, k, v: gatattn.attention(q, k, v, batch=batch, backend="sdpa"),
                        inputs, grad_out, direction)
    mask = same_graph_mask(batch, batch)
    expected = _second_order(lambda q, k, v: reference.attention(q, k, v, mask), inputs,
                             grad_out, direction)
    for name, g, e in zip("qkv", got, expected, strict=True):
        assert_close(f"second-order d{name}", g, e)


@pytest.mark.parametrize("batch", [None, [0, 0, 1, 1, 1]], ids=["one graph", "two sizes"])
def test_double_backward_with_sdpa_dropout_is_refused(batch):
    q, k, v = qkv(5, 5)
    batch = None if batch is None else torch.tensor(batch)
    out = gatattn.attention(q, k, v, batch=batch, dropout=0.5, backend="sdpa")
    with pytest.raises(RuntimeError, match="dropout cannot be replayed.*backend='sparse'"):
        torch.autograd.grad(out.sum(), q, create_graph=True)


def test_first_order_backward_still_retains_graphs():
    q, k, v = qkv(5, 5)
    out = gatattn.attention(q, k, v, backend="sdpa")
    first, = torch.autograd.grad(out.sum(), q, retain_graph=True)
    again, = torch.autograd.grad(out.sum(), q)
    torch.testing.assert_close(first, again)


def test_a_plain_backward_frees_what_the_fast_route_saved():
    """The fast route's own graph is nested inside the twice-differentiable wrapper: a backward
    that does not retain the graph must free it, as it would without the wrapper, even while
    the output (and so the wrapper's node) is still alive."""
    q, k, v = qkv(12, 12, dtype=torch.float32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.append(weakref.ref(t)) or t, lambda t: t):
        out = gatattn.attention(q, k, v, batch=torch.tensor([1, 0] * 6), backend="sdpa")
    assert saved
    out.backward(torch.ones_like(out))
    gc.collect()
    alive = [t for ref in saved if (t := ref()) is not None and t.is_floating_point()
             and not any(t is leaf for leaf in (q, k, v))]  # (integer node orders are cached)
    assert not alive, f"{len(alive)} saved activations outlive a backward without retain_graph"


# 3. Inference mode.

@pytest.mark.parametrize("backend", ["auto", "sparse"])
def test_edge_index_made_in_inference_mode(backend):
    q, k, v = qkv(4, 4)
    with torch.inference_mode():
        edge_index = torch.tensor([[0, 1, 2, 3], [1, 2, 3, 0]])
        inside = gatattn.attention(q, k, v, edge_index=edge_index, backend=backend)
    outside = gatattn.attention(q, k, v, edge_index=edge_index, backend=backend)
    outside.sum().backward()  # a CSR cached in inference mode must not reach autograd
    expected = edge_reference(q, k, v, edge_index)
    torch.testing.assert_close(inside, expected)
    torch.testing.assert_close(outside, expected)


def test_layer_in_inference_mode():
    conv = SelfAttentionConv(8, 4, heads=2).double()
    x = torch.randn(5, 8, dtype=torch.float64)
    edge_index = torch.tensor([[0, 1, 2, 3, 4], [1, 2, 3, 4, 0]])
    expected = conv(x, edge_index)
    with torch.inference_mode():
        torch.testing.assert_close(conv(x, edge_index), expected)
        torch.testing.assert_close(conv(x, batch=torch.tensor([0, 0, 1, 1, 1])),
                                   conv(x, batch=torch.tensor([0, 0, 1, 1, 1])))


# 4. Inputs without nodes flow through autograd.

@pytest.mark.parametrize("form", ["batch", "ptr", "none", "cross"])
def test_no_nodes_backward(form):
    q, k, v = qkv(0, 0)
    kwargs = {"batch": {"batch": torch.zeros(0, dtype=torch.long)},
              "ptr": {"ptr": torch.zeros(1, dtype=torch.long)},
              "none": {},
              "cross": {"ptr": (torch.zeros(1, dtype=torch.long),) * 2}}[form]
    out = gatattn.attention(q, k, v, **kwargs)
    assert out.shape == (0, 2, 4) and out.grad_fn is not None
    out.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape and v.grad.shape == v.shape


# 5. Causal graphs with a non-positive logit scale or infinite temperature.

@pytest.mark.parametrize("backend", ["sdpa", "sparse",
                                     pytest.param("triton", marks=INTERPRETED)])
@pytest.mark.parametrize("scale,temperature", [(0.0, 1.0), (-0.7, 1.0), (None, float("inf"))])
def test_causal_degenerate_scales(backend, scale, temperature):
    dtype = torch.float32 if backend == "triton" else torch.float64
    inputs = qkv(7, 7, dtype=dtype)
    mask = torch.ones(7, 7, dtype=torch.bool).tril()
    check_against_reference(
        lambda q, k, v: gatattn.attention(q, k, v, causal=True, scale=scale,
                                          temperature=temperature, backend=backend),
        inputs, masked_reference(mask, scale=scale, temperature=temperature))


# 6-7. The kernels: strided size-1 head dims, float64 refused.

@INTERPRETED
def test_kernels_take_a_strided_head_dim_of_one():
    q, k, v = (t.detach() for t in qkv(5, 5, channels=1, dtype=torch.float32))
    q, k, v = (torch.as_strided(t, t.shape, (t.stride(0), t.stride(1), 7)) for t in (q, k, v))
    assert q.stride(-1) == 7 and q.is_contiguous()
    inputs = tuple(t.requires_grad_() for t in (q, k, v))
    check_against_reference(lambda q, k, v: gatattn.attention(q, k, v, backend="triton"),
                            inputs, masked_reference(torch.ones(5, 5, dtype=torch.bool)))


def test_kernels_refuse_float64():
    q, k, v = qkv(4, 4)
    with pytest.raises(ValueError, match="got torch.float64.*'sdpa'.*'sparse' compute in float64"):
        gatattn.attention(q, k, v, backend="triton")


# 9. Converters keep the source module's dtype.

def test_converters_keep_dtype():
    mha = nn.MultiheadAttention(8, 2).double()
    layer = SelfAttentionConv.from_multihead_attention(mha)
    assert {p.dtype for p in layer.parameters()} == {torch.float64}
    x = torch.randn(3, 4, 8, dtype=torch.float64)  # (B, L, E)
    flat, ptr = gatattn.sequences_to_graph(x)
    x_seq_first = x.transpose(0, 1)
    expected = mha(x_seq_first, x_seq_first, x_seq_first)[0].transpose(0, 1)
    torch.testing.assert_close(layer(flat, ptr=ptr).view(3, 4, 8), expected)
    conv = TransformerConv(8, 4, heads=2).double()
    layer = SelfAttentionConv.from_transformer_conv(conv)
    assert {p.dtype for p in layer.parameters()} == {torch.float64}
    edge_index = torch.tensor([[0, 1, 2], [1, 2, 0]])
    torch.testing.assert_close(layer(flat[:3], edge_index), conv(flat[:3], edge_index))


@pytest.mark.cuda
def test_converters_keep_device():
    mha = nn.MultiheadAttention(8, 2).cuda()
    assert {p.device.type for p in SelfAttentionConv.from_multihead_attention(mha).parameters()
            } == {"cuda"}


# 10. Non-finite inputs travel along edges only, on every route.

ALL_ROUTES = ["sdpa", "sparse", pytest.param("triton", marks=INTERPRETED)]


@pytest.mark.parametrize("backend", ALL_ROUTES)
@pytest.mark.parametrize("tensor", ["q", "k", "v"])
@pytest.mark.parametrize("causal", [False, True])
def test_a_nan_reaches_only_the_targets_it_has_an_edge_to(backend, tensor, causal):
    dtype = torch.float32 if backend == "triton" else torch.float64
    sizes = [5, 1, 6]
    batch = batch_from_sizes(sizes)
    inputs = dict(zip("qkv", (t.detach() for t in qkv(12, 12, dtype=dtype)), strict=True))
    inputs[tensor][8, 1, 2] = float("nan")  # graph 2, position 2
    out = gatattn.attention(*inputs.values(), batch=batch, causal=causal, backend=backend)
    expected = reference.attention(*inputs.values(), same_graph_mask(batch, batch, causal))
    assert torch.equal(out.isnan(), expected.isnan()), (out.isnan().any(-1), expected.isnan())
    assert expected.isnan().any() and not expected[:6].isnan().any()
    finite = ~expected.isnan()
    torch.testing.assert_close(out[finite], expected[finite])


# Found by the property suite: more (duplicate) edges than node pairs.

@pytest.mark.parametrize("backend", EDGE_ROUTES)
def test_more_duplicate_edges_than_node_pairs(backend):
    dtype = torch.float32 if backend == "triton" else torch.float64
    edge_index = torch.tensor([[0, 0, 1, 1, 1, 0, 1], [0, 0, 0, 0, 0, 0, 1]])  # 7 edges, 2x2
    inputs = qkv(2, 2, dtype=dtype)
    mask = reference.edge_counts(edge_index, 2, 2)
    check_against_reference(
        lambda q, k, v: gatattn.attention(q, k, v, edge_index=edge_index, backend=backend),
        inputs, masked_reference(mask))
