"""The lean message-passing route: CSR caching, O(E * H) saved state, skewed degrees."""

import networkx as nx
import pytest
import torch

import gatattn
from gatattn.backends.csr import csr_of
from tests.conftest import check_against_reference, make_qkv, masked_reference


def test_csr_is_cached_per_edge_index_tensor():
    edge_index = torch.tensor([[0, 2, 1, 2], [1, 0, 2, 2]])
    first = csr_of(edge_index, 3, 3)
    assert csr_of(edge_index, 3, 3) is first
    assert csr_of(edge_index.clone(), 3, 3) is not first  # another tensor: built anew
    assert csr_of(edge_index, 4, 3) is not first  # other sizes
    edge_index[0, 0] = 2  # changed in place: the cached order is stale
    rebuilt = csr_of(edge_index, 3, 3)
    assert rebuilt is not first
    assert torch.equal(rebuilt.col.sort().values, torch.tensor([1, 2, 2, 2]))


def test_csr_orders():
    edge_index = torch.tensor([[3, 0, 1, 0, 2], [1, 2, 0, 0, 1]])
    csr = csr_of(edge_index, 3, 4)
    assert csr.row_ptr.tolist() == [0, 2, 4, 5]
    assert csr.row.tolist() == [0, 0, 1, 1, 2]
    assert torch.equal(edge_index[0][csr.position.argsort()], csr.col)
    assert csr.t_row_ptr.tolist() == [0, 2, 3, 4, 5]
    assert torch.equal(csr.col[csr.t_perm], torch.tensor([0, 0, 1, 2, 3]))


def test_saved_state_is_per_node_and_per_edge_head_not_per_edge_channel():
    n, degree, heads, channels = 200, 16, 4, 32
    edge_index = torch.stack([torch.randint(0, n, (n * degree,)),
                              torch.arange(n).repeat_interleave(degree)])
    q, k, v = make_qkv(n, n, heads, channels)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t,
                                                  lambda t: t):
        gatattn.attention(q, k, v, edge_index=edge_index)
    num_edges = edge_index.size(1)
    assert saved, "the route saved nothing for backward"
    # q, k, v and the output (N * H * C each: the compiled backward reads each target's
    # softmax shift off the output instead of gathering the values again) and (E, H) weights;
    # never E * H * C.
    assert max(saved) < num_edges * heads * channels
    assert sum(saved) <= 4 * n * heads * channels + 2 * num_edges * heads


@pytest.mark.parametrize("make_graph", [
    lambda: nx.barabasi_albert_graph(300, 3, seed=0),
    lambda: nx.star_graph(800),
    lambda: nx.grid_2d_graph(12, 15),
], ids=["power-law", "star", "grid"])
def test_skewed_and_structured_graphs(make_graph):
    edge_index, n = gatattn.networkx_to_edge_index(make_graph())
    inputs = make_qkv(n, n, 2, 16)
    check_against_reference(
        lambda q, k, v: gatattn.attention(q, k, v, edge_index=edge_index), inputs,
        masked_reference(gatattn.edge_index_to_mask(edge_index, n)))


def test_attention_weights_follow_the_callers_edge_order():
    gen = torch.Generator().manual_seed(0)
    edge_index = torch.randint(0, 9, (2, 30), generator=gen).unique(dim=1)
    edge_index = edge_index[:, torch.randperm(edge_index.size(1), generator=gen)]
    q, k, v = make_qkv(9, 9, 2, 4)
    _, (returned, alpha) = gatattn.attention(q, k, v, edge_index=edge_index,
                                             return_attention_weights=True)
    assert returned is edge_index
    mask = gatattn.edge_index_to_mask(edge_index, 9)
    _, weights = gatattn.reference.attention(q, k, v, mask, return_weights=True)
    expected = weights[:, edge_index[1], edge_index[0]].t()
    torch.testing.assert_close(alpha.double(), expected, rtol=1e-6, atol=1e-6)


def test_target_major_edges_are_not_sorted_again(monkeypatch):
    """A CSR adj_t (or any target-sorted edge set) is already the route's layout: building its
    CSR sorts only the transpose, and weights come back in the caller's order unpermuted."""
    adj_t = torch.tensor([[0, 1, 1], [1, 0, 1], [1, 1, 0]]).to_sparse_csr()
    edge_index = torch.stack([adj_t.col_indices(), torch.tensor([0, 0, 1, 1, 2, 2])])
    sorts = []
    real_sort = torch.sort
    monkeypatch.setattr(torch, "sort", lambda *a, **kw: sorts.append(a[0]) or real_sort(*a, **kw))
    csr = csr_of(edge_index, 3, 3)
    assert csr.position is None
    assert len(sorts) == 1 and torch.equal(sorts[0], csr.col)  # the transpose's sort only
    assert torch.equal(csr.row_ptr, adj_t.crow_indices())
    q, k, v = make_qkv(3, 3, 2, 4)
    check_against_reference(
        lambda q, k, v: gatattn.attention(q, k, v, edge_index=adj_t), (q, k, v),
        masked_reference(adj_t.to_dense().bool()))


def test_unsorted_and_sorted_edges_give_the_same_weights():
    gen = torch.Generator().manual_seed(1)
    edge_index = torch.randint(0, 7, (2, 25), generator=gen)
    ordered = edge_index[:, edge_index[1].argsort(stable=True)]
    q, k, v = make_qkv(7, 7, 2, 4)
    out, (_, alpha) = gatattn.attention(q, k, v, edge_index=edge_index,
                                        return_attention_weights=True)
    out_sorted, (_, alpha_sorted) = gatattn.attention(q, k, v, edge_index=ordered,
                                                      return_attention_weights=True)
    torch.testing.assert_close(out_sorted, out)
    torch.testing.assert_close(alpha_sorted, alpha[edge_index[1].argsort(stable=True)])


def test_edges_written_between_forward_and_backward_do_not_reach_the_backward():
    """The CSR of sorted edges views its edges; it views the cache's private copy, never the
    caller's tensor, so a write after the forward cannot change the gradients."""
    edge_index = torch.tensor([[1, 2, 0, 2, 0, 1], [0, 0, 1, 1, 2, 2]])
    q, k, v = make_qkv(3, 3, 2, 4)
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = gatattn.attention(q, k, v, edge_index=edge_index)
    grads = torch.autograd.grad(out.sum(), (q, k, v), retain_graph=True)
    edge_index[0] = torch.tensor([0, 0, 0, 0, 0, 0])
    assert all(torch.equal(a, b) for a, b in
               zip(torch.autograd.grad(out.sum(), (q, k, v)), grads, strict=True))
