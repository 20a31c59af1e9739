"""The mask and networkx converters against PyG's converters where they do the same job (the
comments in gatattn/convert.py say why ours are kept)."""

import networkx as nx
import pytest
import torch
from torch_geometric.utils import dense_to_sparse, from_networkx, to_dense_adj

import gatattn


def _masks():
    gen = torch.Generator().manual_seed(0)
    return [torch.rand(7, 7, generator=gen) < 0.3,  # square
            torch.rand(5, 9, generator=gen) < 0.5,  # targets x sources, rectangular
            torch.zeros(4, 4, dtype=torch.bool),  # no edges
            torch.ones(3, 6, dtype=torch.bool)]  # every pair


@pytest.mark.parametrize("mask", _masks())
def test_mask_to_edge_index_equals_dense_to_sparse(mask):
    edge_index = gatattn.mask_to_edge_index(mask)
    expected = dense_to_sparse(mask)[0].flip(0)  # PyG's rows are targets: (dst, src)
    assert edge_index.dtype == expected.dtype == torch.long
    assert torch.equal(edge_index, expected)  # same edges, same order (sorted by target)
    num_dst, num_src = mask.shape
    assert torch.equal(gatattn.edge_index_to_mask(edge_index, num_dst, num_src), mask)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_edge_index_to_mask_equals_to_dense_adj(seed):
    gen = torch.Generator().manual_seed(seed)
    num_nodes = 8
    edge_index = torch.randint(0, num_nodes, (2, 20), generator=gen)  # repeated edges included
    mask = gatattn.edge_index_to_mask(edge_index, num_nodes)
    dense = to_dense_adj(edge_index, max_num_nodes=num_nodes)[0]  # [source, target] counts
    assert mask.dtype == torch.bool
    assert torch.equal(mask, dense.t() > 0)


def test_edge_index_to_mask_refuses_edges_past_the_size():
    with pytest.raises(IndexError):  # to_dense_adj would drop the edge silently
        gatattn.edge_index_to_mask(torch.tensor([[0, 5], [1, 1]]), 3)


def _edge_multiset(edge_index):
    return sorted(map(tuple, edge_index.t().tolist()))


@pytest.mark.parametrize("graph", [
    nx.karate_club_graph(),  # undirected, with node and edge attributes
    nx.Graph([(0, 0), (0, 1), (2, 1)]),  # a self-loop becomes one edge
    nx.gnm_random_graph(12, 30, seed=1, directed=True),
    nx.MultiGraph([(0, 1), (0, 1), (1, 2)]),  # parallel edges stay
    nx.relabel_nodes(nx.path_graph(4), {0: "a", 1: "b", 2: "c", 3: "d"}),
])
def test_networkx_to_edge_index_has_from_networkx_edges(graph):
    edge_index, num_nodes = gatattn.networkx_to_edge_index(graph)
    expected = from_networkx(graph)
    assert num_nodes == expected.num_nodes
    assert _edge_multiset(edge_index) == _edge_multiset(expected.edge_index)


def test_networkx_to_edge_index_takes_uneven_attributes():
    graph = nx.path_graph(3)
    graph.nodes[0]["label"] = "start"  # from_networkx refuses nodes with different attributes
    graph.edges[1, 2]["weight"] = 2.0
    edge_index, num_nodes = gatattn.networkx_to_edge_index(graph)
    assert num_nodes == 3
    assert _edge_multiset(edge_index) == [(0, 1), (1, 0), (1, 2), (2, 1)]
