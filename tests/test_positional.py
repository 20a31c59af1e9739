"""Shortest-path distances of the spatial encoding (networkx's search) against a dense oracle,
and the encodings' public names."""

import pytest
import torch

import gatattn
import gatattn.bias
import gatattn.positional
from gatattn.positional import shortest_path_distances


def _dense_distances(edge_index: torch.Tensor, start: int, n: int, max_distance: int):
    """``[target, source]`` hop distances by repeated one-hop expansion of a dense adjacency."""
    inside = (edge_index[0] >= start) & (edge_index[0] < start + n)
    src, dst = edge_index[:, inside] - start
    adjacency = torch.zeros(n, n)
    adjacency[dst, src] = 1.0  # [target, source]
    reached = torch.eye(n, dtype=torch.bool)
    dist = torch.full((n, n), max_distance + 1, dtype=torch.long)
    dist[reached] = 0
    for hops in range(1, max_distance + 1):
        reached_now = reached | ((adjacency @ reached.float()) > 0)
        dist[reached_now & ~reached] = hops
        reached = reached_now
    return dist.flatten()


def _random_batch(sizes, edges_per_node, seed):
    gen = torch.Generator().manual_seed(seed)
    ptr = torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()])
    edges = [torch.randint(0, n, (2, edges_per_node * n), generator=gen) + start
             for start, n in zip(ptr[:-1].tolist(), sizes, strict=True) if n]
    return torch.cat(edges, 1), ptr


@pytest.mark.parametrize(("sizes", "edges_per_node", "max_distance", "seed"), [
    ([6, 1, 9], 2, 3, 0),  # self-loops and repeated edges among random edges
    ([12], 1, 0, 1),  # only the diagonal is within reach
    ([5, 0, 7], 1, 10, 2),  # an empty graph; every path shorter than the cut-off
    ([30, 17], 2, 2, 3),  # the cut-off below most distances
])
def test_shortest_paths_equal_a_dense_search(sizes, edges_per_node, max_distance, seed):
    edge_index, ptr = _random_batch(sizes, edges_per_node, seed)
    expected = torch.cat([_dense_distances(edge_index, start, n, max_distance)
                          for start, n in zip(ptr[:-1].tolist(), sizes, strict=True)])
    got = shortest_path_distances(edge_index, ptr, max_distance)
    assert got.dtype == torch.long and got.device == edge_index.device
    assert torch.equal(got, expected)


def test_shortest_paths_of_a_graph_without_edges():
    got = shortest_path_distances(torch.zeros(2, 0, dtype=torch.long), torch.tensor([0, 3]), 2)
    assert got.view(3, 3).tolist() == [[0, 3, 3], [3, 0, 3], [3, 3, 0]]


@pytest.mark.parametrize("edge_index", [
    torch.tensor([[0, 2], [1, 3]]),  # 2 -> 3 joins the two graphs
    torch.tensor([[0, 1], [1, 5]]),  # node 5 is past ptr's last node
    torch.tensor([[0, -1], [1, 0]]),  # a negative node
])
def test_shortest_paths_refuse_edges_outside_one_graph(edge_index):
    with pytest.raises(ValueError, match="edge between two graphs"):
        shortest_path_distances(edge_index, torch.tensor([0, 3, 5]), 2)


def test_encodings_keep_their_public_names():
    assert gatattn.SpatialEncoding is gatattn.bias.SpatialEncoding
    assert gatattn.SpatialEncoding is gatattn.positional.SpatialEncoding
    assert gatattn.bias.shortest_path_distances is shortest_path_distances
    assert gatattn.sinusoidal_encoding is gatattn.positional.sinusoidal_encoding
