"""Permutation equivariance: relabel the nodes and the outputs are relabelled the same way and
otherwise unchanged; positional encodings break it."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gatattn
from gatattn import SelfAttentionConv

PROPERTY = settings(max_examples=25, deadline=None)


def layer(seed=0, **kwargs):
    torch.manual_seed(seed)
    return SelfAttentionConv(6, 4, heads=2, root_weight=True, **kwargs).eval()


@st.composite
def permutations(draw, max_n=24):
    n = draw(st.integers(1, max_n))
    return torch.tensor(draw(st.permutations(range(n))))


@st.composite
def batches(draw):
    """Graph sizes, and a permutation of all nodes together with a relabelling of the graphs."""
    sizes = draw(st.lists(st.integers(0, 8), min_size=1, max_size=6))
    n = sum(sizes)
    node_perm = torch.tensor(draw(st.permutations(range(n))), dtype=torch.long)
    graph_relabel = torch.tensor(draw(st.permutations(range(len(sizes)))), dtype=torch.long)
    return sizes, node_perm, graph_relabel


@PROPERTY
@given(perm=permutations(), backend=st.sampled_from(["sdpa", "sparse"]))
def test_complete_graph_is_equivariant(perm, backend):
    conv = layer(backend=backend)
    x = torch.randn(perm.numel(), 6)
    torch.testing.assert_close(conv(x[perm]), conv(x)[perm])


@PROPERTY
@given(case=batches())
def test_batched_graphs_are_equivariant(case):
    sizes, node_perm, graph_relabel = case
    conv = layer()
    batch = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    x = torch.randn(batch.numel(), 6)
    out = conv(x, batch=batch)
    # Shuffle nodes across the whole batch and rename the graphs: the batch is now unsorted.
    out_shuffled = conv(x[node_perm], batch=graph_relabel[batch][node_perm])
    torch.testing.assert_close(out_shuffled, out[node_perm])


@PROPERTY
@given(perm=permutations(), density=st.floats(0.05, 1.0), edge_dim=st.sampled_from([None, 3]))
def test_sparse_graph_is_equivariant(perm, density, edge_dim):
    n = perm.numel()
    conv = layer(edge_dim=edge_dim)
    mask = torch.rand(n, n) < density
    edge_index = gatattn.mask_to_edge_index(mask)
    edge_attr = torch.randn(edge_index.size(1), 3) if edge_dim else None
    x = torch.randn(n, 6)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(n)
    out = conv(x, edge_index, edge_attr)
    out_permuted = conv(x[perm], inverse[edge_index], edge_attr)
    torch.testing.assert_close(out_permuted, out[perm])


@PROPERTY
@given(perm=permutations(max_n=16))
def test_positional_encodings_break_equivariance(perm):
    n = perm.numel()
    conv = layer()
    x = torch.randn(n, 6)
    pe = gatattn.sinusoidal_encoding(torch.arange(n), 6)
    with_pe = conv(x + pe)
    permuted_with_pe = conv(x[perm] + pe)  # positions stay; contents move
    moved = perm != torch.arange(n)
    if not moved.any():
        torch.testing.assert_close(permuted_with_pe, with_pe[perm])
        return
    # Every node that moved now carries another position's label, so its output changes.
    difference = (permuted_with_pe - with_pe[perm]).abs().amax(dim=1)
    assert bool((difference[moved] > 1e-4).all()), difference
    # Without the encodings the same permutation is harmless.
    torch.testing.assert_close(conv(x[perm]), conv(x)[perm])


def test_sinusoidal_encoding_values():
    pe = gatattn.sinusoidal_encoding(torch.tensor([0, 1, 3]), 5)
    assert pe.shape == (3, 5)
    torch.testing.assert_close(pe[0], torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0]))
    torch.testing.assert_close(pe[2, 0], torch.sin(torch.tensor(3.0)))
    torch.testing.assert_close(pe[1, 3], torch.cos(torch.tensor(10000 ** (-2 / 5))))


def test_graph_positional_encoding_restarts_in_each_graph():
    batch = torch.tensor([0, 0, 1, 1, 1])
    pe = gatattn.graph_positional_encoding(5, 4, batch)
    torch.testing.assert_close(pe[2:4], pe[0:2])
