"""Graph description: validation errors, conversions, positions."""

import networkx as nx
import pytest
import torch

import gatattn
from gatattn.graph import describe_graph, local_positions
from tests.conftest import check_against_reference, make_qkv, masked_reference


def attend(n=5, **kwargs):
    q, k, v = make_qkv(n, n, 2, 4)
    return gatattn.attention(q, k, v, **kwargs)


@pytest.mark.parametrize("edge_index,message", [
    (torch.tensor([[0, 1], [2, 5]]), "targets .* max 5 but there are only 5"),
    (torch.tensor([[0, 7], [2, 3]]), "sources .* max 7"),
    (torch.tensor([[0, -1], [2, 3]]), "negative id -1"),
    (torch.tensor([[0.0, 1.0], [2.0, 3.0]]), "integer node ids"),
    (torch.tensor([[0, 1, 2]]), r"shape \(2, E\)"),
    (torch.tensor([[0, 1], [1, 2], [2, 3]]), "transpose it"),
])
def test_bad_edge_index_is_named(edge_index, message):
    with pytest.raises(ValueError, match=message):
        attend(edge_index=edge_index)


def test_bad_batch_and_ptr_are_named():
    with pytest.raises(ValueError, match="batch has 4 entries but there are 5"):
        attend(batch=torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="ids >= 0"):
        attend(batch=torch.tensor([0, 0, -1, 1, 1]))
    with pytest.raises(ValueError, match="end at the number of nodes"):
        attend(ptr=torch.tensor([0, 2, 4]))
    with pytest.raises(ValueError, match="non-decreasing"):
        attend(ptr=torch.tensor([0, 3, 2, 5]))
    with pytest.raises(ValueError, match="either batch or ptr"):
        attend(batch=torch.zeros(5, dtype=torch.long), ptr=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="give batch as a pair"):
        q, k, v = make_qkv(3, 4, 1, 2)
        gatattn.attention(q, k, v, batch=torch.zeros(3, dtype=torch.long))


def test_bad_qkv_are_named():
    q, k, v = make_qkv(5, 5, 2, 4)
    with pytest.raises(ValueError, match="same number of heads, got 2, 1 and 2"):
        gatattn.attention(q, k[:, :1], v)
    with pytest.raises(ValueError, match="same channels per head, got 4 and 3"):
        gatattn.attention(q, k[..., :3], v)
    with pytest.raises(ValueError, match="one row per source node, got 5 and 4"):
        gatattn.attention(q, k, v[:4])
    with pytest.raises(ValueError, match=r"\(num_nodes, heads, channels\)"):
        gatattn.attention(q.flatten(1), k, v)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        gatattn.attention(q, k, v, temperature=0.0)
    with pytest.raises(ValueError, match="backend must be one of"):
        gatattn.attention(q, k, v, backend="flash")
    with pytest.raises(ValueError, match="explicit edge_index use backend='sparse'"):
        gatattn.attention(q, k, v, edge_index=torch.tensor([[0], [1]]), backend="sdpa")
    with pytest.raises(ValueError, match="edge_attr needs an explicit edge_index"):
        gatattn.attention(q, k, v, edge_attr=torch.zeros(25, 2, 4))
    with pytest.raises(ValueError, match=r"edge_attr must be .* = \(1, 2, 4\)"):
        gatattn.attention(q, k, v, edge_index=torch.tensor([[0], [1]]),
                          edge_attr=torch.zeros(2, 2, 4))


def test_unsorted_batch_equals_sorted_batch_after_permutation():
    batch = torch.tensor([2, 0, 1, 0, 2, 2, 1, 0])
    q, k, v = (t.detach() for t in make_qkv(8, 8, 2, 4))
    order = torch.sort(batch, stable=True).indices
    for causal in (False, True):
        out = gatattn.attention(q, k, v, batch=batch, causal=causal)
        sorted_out = gatattn.attention(q[order], k[order], v[order], batch=batch[order],
                                       causal=causal)
        torch.testing.assert_close(out[order], sorted_out)


def test_local_positions_follow_order_of_appearance():
    batch = torch.tensor([1, 0, 1, 1, 0, 2])
    assert local_positions(batch, 6).tolist() == [0, 0, 1, 2, 1, 0]
    assert local_positions(None, 3).tolist() == [0, 1, 2]


def test_number_of_edges_of_implicit_graphs():
    batch = torch.tensor([0, 0, 0, 1, 1])
    assert describe_graph(5, 5, batch=batch)[0].num_edges() == 9 + 4
    assert describe_graph(5, 5, batch=batch, causal=True)[0].num_edges() == 6 + 3
    graph = describe_graph(2, 5, causal=True, bipartite=True)[0]
    assert graph.num_edges() == graph.to_edge_index().size(1) == 1 + 2
    graph = describe_graph(5, 2, causal=True, bipartite=True)[0]
    assert graph.num_edges() == graph.to_edge_index().size(1) == 1 + 2 + 2 + 2 + 2


def test_mask_edge_index_round_trip():
    mask = torch.rand(6, 4, generator=torch.Generator().manual_seed(2)) < 0.5
    edge_index = gatattn.mask_to_edge_index(mask)
    assert torch.equal(gatattn.edge_index_to_mask(edge_index, 6, 4), mask)
    assert bool((edge_index[1][1:] >= edge_index[1][:-1]).all())  # sorted by target


def test_networkx_graph_to_edge_index():
    graph = nx.karate_club_graph()
    edge_index, num_nodes = gatattn.networkx_to_edge_index(graph)
    assert num_nodes == 34
    assert edge_index.size(1) == 2 * graph.number_of_edges()
    mask = gatattn.edge_index_to_mask(edge_index, num_nodes)
    assert torch.equal(mask, mask.t())  # undirected -> both directions
    looped = nx.Graph([(0, 0), (0, 1)])
    assert gatattn.networkx_to_edge_index(looped)[0].size(1) == 3  # a self loop is one edge
    labelled = nx.relabel_nodes(nx.path_graph(3, create_using=nx.DiGraph), {0: "a", 1: "b", 2: "c"})
    edge_index, num_nodes = gatattn.networkx_to_edge_index(labelled)
    assert edge_index.tolist() == [[0, 1], [1, 2]] and num_nodes == 3


def test_networkx_node_mapping_and_attention_graph():
    graph = nx.relabel_nodes(nx.karate_club_graph(), lambda i: f"member {i}")
    edge_index, num_nodes, nodes = gatattn.networkx_to_edge_index(graph, return_nodes=True)
    assert nodes == list(graph.nodes) and num_nodes == 34
    conv = gatattn.SelfAttentionConv(4, 2, heads=3)
    _, (edges, alpha) = conv(torch.randn(num_nodes, 4), edge_index, return_attention_weights=True)
    weighted = gatattn.attention_to_networkx(edges, alpha, nodes=nodes)
    assert set(weighted.nodes) == set(graph.nodes)
    assert weighted.number_of_edges() == edge_index.size(1)  # both directions of each edge
    for target in weighted.nodes:  # each target's attention sums to one, per head
        heads = torch.tensor([d["heads"] for _, _, d in weighted.in_edges(target, data=True)],
                             dtype=torch.float64)
        torch.testing.assert_close(heads.sum(0), torch.ones(3, dtype=torch.float64))
    src, dst = edge_index[:, 5].tolist()
    assert weighted[nodes[src]][nodes[dst]]["weight"] == pytest.approx(float(alpha[5].mean()))


def test_attention_graph_adds_repeated_edges_and_keeps_isolated_nodes():
    edge_index = torch.tensor([[0, 0, 1], [2, 2, 2]])
    alpha = torch.tensor([0.25, 0.25, 0.5])
    weighted = gatattn.attention_to_networkx(edge_index, alpha, num_nodes=4)
    assert sorted(weighted.nodes) == [0, 1, 2, 3]
    assert weighted[0][2]["weight"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="one row per edge"):
        gatattn.attention_to_networkx(edge_index, alpha[:2])


def test_ptr_is_the_kernels_cu_seqlens_as_given():
    ptr = torch.tensor([0, 3, 3, 7])
    segments = describe_graph(7, 7, ptr=ptr)[0].packed_segments()
    assert segments.cu_seqlens_dst is ptr and segments.cu_seqlens_src is ptr
    assert segments.order_dst is None and segments.order_src is None


@pytest.mark.parametrize("seed", range(4))
def test_segment_plan_groups_graphs_by_size_keeping_node_order(seed):
    gen = torch.Generator().manual_seed(seed)
    sizes_dst = torch.randint(0, 5, (9,), generator=gen)
    sizes_src = torch.randint(0, 5, (9,), generator=gen)
    ptr_dst, ptr_src = (torch.cat([torch.zeros(1, dtype=torch.long), s.cumsum(0)])
                        for s in (sizes_dst, sizes_src))
    graph, _ = describe_graph(int(ptr_dst[-1]), int(ptr_src[-1]), ptr=(ptr_dst, ptr_src),
                              bipartite=True)
    plan = graph.segment_plan()
    shapes = sorted(zip(sizes_dst.tolist(), sizes_src.tolist(), strict=True))
    expected_groups = [(shapes.count(shape), *shape) for shape in dict.fromkeys(shapes)]
    assert [(g.count, g.len_dst, g.len_src) for g in plan.groups] == expected_groups
    graph_order = sorted(range(9), key=lambda g: (int(sizes_dst[g]), int(sizes_src[g])))
    for order, ptr in ((plan.order_dst, ptr_dst), (plan.order_src, ptr_src)):
        nodes = [n for g in graph_order for n in range(int(ptr[g]), int(ptr[g + 1]))]
        if order is None:
            assert nodes == list(range(len(nodes)))
        else:
            assert order.forward.tolist() == nodes
            assert order.inverse[order.forward].tolist() == list(range(len(nodes)))


def test_segment_plan_knows_the_identity_from_the_sizes():
    ptr = torch.tensor([0, 2, 2, 5, 9])  # sizes 2, 0, 3, 4: already grouped in size order
    assert describe_graph(9, 9, ptr=ptr)[0].segment_plan().order_dst is None
    ptr = torch.tensor([0, 4, 6])
    assert describe_graph(6, 6, ptr=ptr)[0].segment_plan().order_dst.forward.tolist() == [
        4, 5, 0, 1, 2, 3]


def test_runs_of_equal_size_graphs_in_node_order():
    """Where nodes lie in graph order, consecutive graphs of one size are runs; the dense route
    takes them (no permutation) where they are at most an eighth more batches than the
    groups; an unsorted batch has none."""
    plan = describe_graph(17, 17, ptr=torch.tensor([0, 5, 10, 13, 13, 17]))[0].segment_plan()
    assert [(r.count, r.len_dst, r.len_src) for r in plan.runs] == [(2, 5, 5), (1, 3, 3),
                                                                     (1, 0, 0), (1, 4, 4)]
    assert len(plan.groups) == 4 and plan.order_dst is not None and plan.runs_serve
    sizes = [3, 4] * 4  # 2 groups, 8 runs
    ptr = torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()])
    assert not describe_graph(28, 28, ptr=ptr)[0].segment_plan().runs_serve
    in_size_order = describe_graph(9, 9, ptr=torch.tensor([0, 2, 2, 5, 9]))[0].segment_plan()
    assert in_size_order.order_dst is None and not in_size_order.runs_serve  # (nothing to save)
    unsorted = describe_graph(6, 6, batch=torch.tensor([1, 0, 1, 1, 0, 2]))[0].segment_plan()
    assert unsorted.runs is None and not unsorted.runs_serve


@pytest.mark.parametrize("ptr", [[0, 5, 10, 13, 13, 17], [0, 3, 7, 10, 14, 17]],
                         ids=["runs", "permuted"])
def test_sdpa_on_runs_and_on_permuted_groups_matches_reference(ptr):
    ptr = torch.tensor(ptr)
    graph = gatattn.build_graph(ptr=ptr)
    assert graph.segment_plan().runs_serve == (ptr.tolist()[1] == 5)
    batch = torch.repeat_interleave(torch.arange(len(ptr) - 1), ptr.diff())
    mask = batch[:, None] == batch[None, :]
    check_against_reference(lambda q, k, v: gatattn.attention(q, k, v, graph=graph,
                                                              backend="sdpa"),
                            make_qkv(17, 17, 2, 4, dtype=torch.float64),
                            masked_reference(mask))


def test_ptr_pair_of_unequal_lengths_means_trailing_empty_graphs():
    q, k, v = (t.detach() for t in make_qkv(5, 6, 2, 4))
    short = gatattn.attention(q, k, v, ptr=(torch.tensor([0, 2, 5]), torch.tensor([0, 6])))
    padded = gatattn.attention(q, k, v, ptr=(torch.tensor([0, 2, 5]), torch.tensor([0, 6, 6])))
    torch.testing.assert_close(short, padded)
    assert bool((short[2:] == 0).all())  # the second graph has no keys: zeros


def test_graph_positions_without_a_sorted_batch():
    batch = torch.tensor([1, 0, 1, 1, 0, 2])
    pos_dst, pos_src = describe_graph(6, 6, batch=batch)[0].positions(batch.device)
    assert pos_dst.tolist() == pos_src.tolist() == local_positions(batch, 6).tolist()
