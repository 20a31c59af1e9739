"""Every route of gatattn.attention against the reference, forward and all gradients."""

import os

import pytest
import torch

import gatattn
from gatattn import reference
from gatattn.backends import routing
from tests.conftest import check_against_reference, make_qkv, masked_reference

# (N, heads, channels): awkward sizes (0, 1, odd, just above a tile), head dims that are not
# powers of two.
COMPLETE_CASES = [(0, 1, 40), (1, 4, 48), (7, 1, 80), (97, 4, 96), (128, 1, 40), (1025, 4, 48)]


def batch_from_sizes(sizes):
    return torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))


def ptr_from_sizes(sizes):
    return torch.cat([torch.zeros(1, dtype=torch.long), torch.tensor(sizes).cumsum(0)])


def same_graph_mask(batch_dst, batch_src, causal=False):
    """Reference mask from graph ids, causal by order of appearance inside each graph."""
    mask = batch_dst.unsqueeze(1) == batch_src.unsqueeze(0)
    if causal:
        pos_dst = torch.tensor([int((batch_dst[:i] == b).sum()) for i, b in enumerate(batch_dst)])
        pos_src = torch.tensor([int((batch_src[:j] == b).sum()) for j, b in enumerate(batch_src)])
        mask &= pos_src.unsqueeze(0) <= pos_dst.unsqueeze(1)
    return mask


@pytest.mark.parametrize("n,heads,channels", COMPLETE_CASES)
def test_complete_graph_sdpa(n, heads, channels):
    inputs = make_qkv(n, n, heads, channels)
    mask = torch.ones(n, n, dtype=torch.bool)
    check_against_reference(lambda q, k, v: gatattn.attention(q, k, v, backend="sdpa"), inputs,
                            masked_reference(mask))


@pytest.mark.parametrize("n,heads,channels", COMPLETE_CASES[:5])
@pytest.mark.parametrize("causal", [False, True])
def test_complete_graph_sparse(n, heads, channels, causal):
    inputs = make_qkv(n, n, heads, channels)
    mask = torch.ones(n, n, dtype=torch.bool)
    mask = mask.tril() if causal else mask
    check_against_reference(
        lambda q, k, v: gatattn.attention(q, k, v, causal=causal, backend="sparse"), inputs,
        masked_reference(mask))


@pytest.mark.parametrize("backend", ["sdpa", "sparse", "auto"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("form", ["batch", "ptr", "unsorted"])
def test_batched_graphs(backend, causal, form):
    sizes = [1, 5, 64, 33, 0, 7, 5]
    batch = batch_from_sizes(sizes)
    kwargs = {"batch": batch} if form == "batch" else {"ptr": ptr_from_sizes(sizes)}
    if form == "unsorted":
        batch = batch[torch.randperm(batch.numel(), generator=torch.Generator().manual_seed(3))]
        kwargs = {"batch": batch}
    inputs = make_qkv(batch.numel(), batch.numel(), 4, 40)
    check_against_reference(
        lambda q, k, v: gatattn.attention(q, k, v, causal=causal, backend=backend, **kwargs),
        inputs, masked_reference(same_graph_mask(batch, batch, causal)))


@pytest.mark.parametrize("backend", ["sdpa", "sparse"])
@pytest.mark.parametrize("causal", [False, True])
def test_cross_attention_complete(backend, causal):
    inputs = make_qkv(7, 13, 2, 16)
    mask = torch.ones(7, 13, dtype=torch.bool)
    mask = mask.tril() if causal else mask  # top-left aligned
    check_against_reference(
        lambda q, k, v: gatattn.attention(q, k, v, causal=causal, backend=backend), inputs,
        masked_reference(mask))


@pytest.mark.parametrize("backend", ["sdpa", "sparse"])
@pytest.mark.parametrize("causal", [False, True])
def test_cross_attention_batched(backend, causal):
    # Graph 1 has targets but no sources: its targets must get zeros. Graph 3 has no targets.
    sizes_dst, sizes_src = [3, 4, 1, 0, 9], [5, 0, 1, 2, 4]
    batch_dst, batch_src = batch_from_sizes(sizes_dst), batch_from_sizes(sizes_src)
    inputs = make_qkv(batch_dst.numel(), batch_src.numel(), 3, 8, value_channels=5)
    check_against_reference(
        lambda q, k, v: gatattn.attention(q, k, v, batch=(batch_dst, batch_src), causal=causal,
                                          backend=backend),
        inputs, masked_reference(same_graph_mask(batch_dst, batch_src, causal)))
    ptrs = (ptr_from_sizes(sizes_dst), ptr_from_sizes(sizes_src))
    q, k, v = inputs
    torch.testing.assert_close(
        gatattn.attention(q, k, v, ptr=ptrs, causal=causal, backend=backend),
        gatattn.attention(q, k, v, batch=(batch_dst, batch_src), causal=causal, backend=backend))


@pytest.mark.parametrize("n,density", [(1, 1.0), (7, 0.3), (97, 0.1), (1025, 0.01)])
@pytest.mark.parametrize("causal", [False, True])
def test_random_sparse_graph(n, density, causal):
    gen = torch.Generator().manual_seed(n)
    mask = torch.rand(n, n, generator=gen) < density
    mask[: max(1, n // 5)] = False  # isolated targets
    edge_index = gatattn.mask_to_edge_index(mask)
    edge_index = edge_index[:, torch.randperm(edge_index.size(1), generator=gen)]  # any order
    inputs = make_qkv(n, n, 4, 40)
    ref_mask = mask.tril() if causal else mask
    check_against_reference(
        lambda q, k, v: gatattn.attention(q, k, v, edge_index=edge_index, causal=causal),
        inputs, masked_reference(ref_mask))


def test_edge_attr_added_to_keys_and_values():
    n, heads, channels = 9, 2, 6
    gen = torch.Generator().manual_seed(5)
    mask = torch.rand(n, n, generator=gen) < 0.4
    mask[0] = False
    edge_index = gatattn.mask_to_edge_index(mask)
    q, k, v = make_qkv(n, n, heads, channels)
    edge_attr = torch.randn(edge_index.size(1), heads, channels, generator=gen).requires_grad_()

    def ref(q, k, v, e, compute_dtype):
        dense = reference.dense_edge_features(edge_index, e, n, n)
        return reference.attention(q, k, v, mask, edge_key=dense, edge_value=dense,
                                   compute_dtype=compute_dtype)

    check_against_reference(
        lambda q, k, v, e: gatattn.attention(q, k, v, edge_index=edge_index, edge_attr=e),
        (q, k, v, edge_attr), ref, names=("q", "k", "v", "edge_attr"))


def test_edge_attr_follows_the_causal_filter():
    n = 6
    edge_index = gatattn.mask_to_edge_index(torch.ones(n, n, dtype=torch.bool))
    q, k, v = make_qkv(n, n, 1, 4)
    edge_attr = torch.randn(edge_index.size(1), 1, 4)
    out = gatattn.attention(q, k, v, edge_index=edge_index, edge_attr=edge_attr, causal=True)
    kept = edge_index[0] <= edge_index[1]
    expected = gatattn.attention(q, k, v, edge_index=edge_index[:, kept],
                                 edge_attr=edge_attr[kept])
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", ["sdpa", "sparse"])
def test_low_precision(dtype, backend):
    sizes = [7, 33, 1]
    batch = batch_from_sizes(sizes)
    inputs = make_qkv(batch.numel(), batch.numel(), 4, 48, dtype=dtype)
    check_against_reference(
        lambda q, k, v: gatattn.attention(q, k, v, batch=batch, backend=backend), inputs,
        masked_reference(same_graph_mask(batch, batch)))


@pytest.mark.parametrize("backend", ["sdpa", "sparse"])
def test_scale_and_temperature(backend):
    inputs = make_qkv(11, 11, 2, 8)
    mask = torch.ones(11, 11, dtype=torch.bool)
    check_against_reference(
        lambda q, k, v: gatattn.attention(q, k, v, scale=0.7, temperature=0.25, backend=backend),
        inputs, masked_reference(mask, scale=0.7, temperature=0.25))


@pytest.mark.parametrize("causal", [False, True])
def test_attention_weights_of_implicit_graph(causal):
    sizes = [3, 6, 2]
    batch = batch_from_sizes(sizes)
    q, k, v = make_qkv(11, 11, 2, 8)
    out, (edge_index, alpha) = gatattn.attention(q, k, v, batch=batch, causal=causal,
                                                 return_attention_weights=True)
    mask = same_graph_mask(batch, batch, causal)
    assert edge_index.size(1) == int(mask.sum())
    assert torch.equal(gatattn.edge_index_to_mask(edge_index, 11), mask)
    _, weights = reference.attention(q, k, v, mask, return_weights=True)
    expected = weights[:, edge_index[1], edge_index[0]].t()  # (E, H)
    torch.testing.assert_close(alpha.double(), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out, gatattn.attention(q, k, v, batch=batch, causal=causal))


def test_attention_weights_refused_for_huge_complete_graph(monkeypatch):
    monkeypatch.setattr(gatattn.graph, "MAX_MATERIALIZED_EDGES", 50)
    q, k, v = make_qkv(8, 8, 1, 4)
    with pytest.raises(gatattn.GraphTooLargeError, match="64 edges"):
        gatattn.attention(q, k, v, return_attention_weights=True)


# 2000 calls each; message passing's per-call cost makes that tens of seconds: heavy.
@pytest.mark.parametrize("backend", ["sdpa", pytest.param("sparse", marks=pytest.mark.heavy)])
def test_dropout_is_unbiased_and_active(backend):
    q, k, v = (t.detach() for t in make_qkv(5, 5, 1, 4))
    clean = gatattn.attention(q, k, v, backend=backend)
    torch.manual_seed(0)
    samples = torch.stack([gatattn.attention(q, k, v, dropout=0.5, backend=backend)
                           for _ in range(2000)])
    assert (samples[0] - clean).abs().max() > 1e-3  # dropout changes a single draw
    torch.testing.assert_close(samples.mean(0), clean, atol=0.1, rtol=0)


def test_empty_graph_and_no_keys_give_zeros_and_finite_gradients():
    for n_dst, n_src in ((0, 0), (4, 0), (0, 3)):
        q, k, v = make_qkv(n_dst, n_src, 2, 4)
        for backend in ("sdpa", "sparse"):
            out = gatattn.attention(q, k, v, backend=backend)
            assert out.shape == (n_dst, 2, 4) and out.abs().sum() == 0
            out.sum().backward()
            assert all(t.grad is None or torch.isfinite(t.grad).all() for t in (q, k, v))


def test_auto_picks_logits_for_small_graphs_sdpa_for_others_and_sparse_for_edges(monkeypatch):
    calls = []
    import gatattn.functional as functional
    for route in ("sdpa_attention", "logits_attention"):
        monkeypatch.setattr(functional, route,
                            lambda *a, route=route, **kw: calls.append(route) or a[0])
    monkeypatch.setattr(functional, "sparse_attention",
                        lambda q, *a, **kw: calls.append("sparse") or (q, None))
    small = make_qkv(4, 4, 1, 2)
    large = make_qkv(routing.LOGITS_MAX_NODES + 1, routing.LOGITS_MAX_NODES + 1, 1, 2)
    gatattn.attention(*small)
    gatattn.attention(*large)
    gatattn.attention(*small, causal=True)  # a mask: SDPA (see logits_route_serves)
    gatattn.attention(*small, backend="sdpa")
    gatattn.attention(*(t.half() for t in small))
    gatattn.attention(*small, edge_index=torch.tensor([[0], [1]]))
    assert calls == ["logits_attention", "sdpa_attention", "sdpa_attention", "sdpa_attention",
                     "sdpa_attention", "sparse"]


def test_auto_never_picks_the_kernels_on_cpu_even_in_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    import gatattn.functional as functional
    monkeypatch.setattr(functional, "triton_attention",
                        lambda *a, **kw: pytest.fail("auto took the Triton route on CPU"))
    q, k, v = make_qkv(4, 4, 1, 16)
    gatattn.attention(q, k, v)
    gatattn.attention(q, k, v, edge_index=torch.tensor([[0], [1]]))


CUDA = torch.device("cuda")


@pytest.mark.parametrize("device,dtype,head_dim,dropout,edge_attr,implicit,serves", [
    (CUDA, torch.bfloat16, 64, 0.0, False, True, True),
    (CUDA, torch.float16, 256, 0.0, False, False, True),
    (CUDA, torch.float32, 40, 0.0, False, False, True),
    (CUDA, torch.float32, 40, 0.0, False, True, False),  # dense fp32: SDPA
    (torch.device("cpu"), torch.float16, 64, 0.0, False, True, False),
    (CUDA, torch.float64, 64, 0.0, False, False, False),
    (CUDA, torch.bfloat16, 512, 0.0, False, True, False),
    (CUDA, torch.bfloat16, 64, 0.1, False, True, False),
    (CUDA, torch.bfloat16, 64, 0.0, True, False, False),
])
def test_auto_takes_the_kernels_for_what_they_serve(device, dtype, head_dim, dropout, edge_attr,
                                                     implicit, serves):
    pytest.importorskip("triton")
    from gatattn.backends.routing import fused_kernels_serve

    assert fused_kernels_serve(device, dtype, head_dim, dropout, edge_attr, implicit) is serves


def test_triton_backend_explains_why_it_cannot_run(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v = make_qkv(4, 4, 1, 2)
    with pytest.raises(gatattn.BackendUnavailableError, match="need CUDA tensors"):
        gatattn.attention(q, k, v, backend="triton")


def test_triton_backend_refuses_bfloat16_tiles_in_the_interpreter():
    """The interpreter's bfloat16 tl.dot is wrong: the tiled kernels (implicit graphs) would
    return garbage there, so the call is refused; the CSR kernels (edge sets) use no tl.dot
    and still run, against the reference."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("only the interpreter miscomputes bfloat16 tl.dot")
    q, k, v = (t.bfloat16() for t in make_qkv(6, 6, 2, 8))
    with pytest.raises(gatattn.BackendUnavailableError, match="bfloat16 matrix products"):
        gatattn.attention(q, k, v, backend="triton")
    with pytest.raises(gatattn.BackendUnavailableError, match="bfloat16 matrix products"):
        gatattn.attention(q, k, v, ptr=torch.tensor([0, 2, 6]), backend="triton")
    edge_index = torch.tensor([[0, 1, 2, 3, 5], [1, 1, 4, 0, 0]])
    check_against_reference(
        lambda q, k, v: gatattn.attention(q, k, v, edge_index=edge_index, backend="triton"),
        (q, k, v), masked_reference(reference.edge_mask(edge_index, 6, 6)))
