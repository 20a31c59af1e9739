"""The graph as an object: ``gatattn.build_graph(...)`` once, ``graph=`` on every call.

A ``graph=`` call computes what the keyword form computes, on every route and graph kind,
forward and gradients, against the reference; it reads nothing on the host; bad uses are
refused with a clear error."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import gatattn
from gatattn import reference
from gatattn.bias import expected_rows
from tests.conftest import check_against_reference, make_qkv, masked_reference
from tests.test_host_syncs import count_host_reads

HEADS, CHANNELS = 2, 8
SIZES_DST, SIZES_SRC = [5, 1, 7, 3], [4, 6, 2, 3]


def _unsorted_batch(sizes: list[int], seed: int) -> torch.Tensor:
    ids = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    return ids[torch.randperm(ids.numel(), generator=torch.Generator().manual_seed(seed))]


def _batch_mask(batch_dst, batch_src, causal=False):
    """Same-graph pairs (positions in order of appearance), the reference's way."""
    same = batch_dst.unsqueeze(1) == batch_src.unsqueeze(0)
    if not causal:
        return same
    pos_dst = gatattn.graph.local_positions(batch_dst, batch_dst.numel())
    pos_src = gatattn.graph.local_positions(batch_src, batch_src.numel())
    return same & (pos_src.unsqueeze(0) <= pos_dst.unsqueeze(1))


def _ptr(sizes):
    return torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()])


EDGES = torch.tensor([[0, 3, 4, 4, 9, 12, 15, 2, 7],
                      [1, 1, 0, 8, 9, 3, 15, 15, 6]])

# kind -> (keyword arguments of the call, num_dst, num_src, mask)
KINDS = {
    "complete": (dict(), 11, 11, torch.ones(11, 11, dtype=torch.bool)),
    "complete causal": (dict(causal=True), 11, 11, torch.ones(11, 11, dtype=torch.bool).tril()),
    "batched unsorted": (dict(batch=_unsorted_batch(SIZES_DST, 0)), 16, 16,
                         _batch_mask(_unsorted_batch(SIZES_DST, 0), _unsorted_batch(SIZES_DST, 0))),
    "batched causal ptr": (dict(ptr=_ptr(SIZES_DST), causal=True), 16, 16,
                           reference.block_mask(SIZES_DST, causal=True)),
    "bipartite top-left": (dict(ptr=(_ptr(SIZES_DST), _ptr(SIZES_SRC)), causal=True), 16, 15,
                           reference.block_mask(SIZES_DST, SIZES_SRC, causal=True)),
    "bipartite bottom-right": (dict(ptr=(_ptr(SIZES_DST), _ptr(SIZES_SRC)),
                                    causal="bottom_right"), 16, 15,
                               reference.block_mask(SIZES_DST, SIZES_SRC, causal="bottom_right")),
    "bipartite unsorted batch": (dict(batch=(_unsorted_batch(SIZES_DST, 1),
                                             _unsorted_batch(SIZES_SRC, 2))), 16, 15,
                                 _batch_mask(_unsorted_batch(SIZES_DST, 1),
                                             _unsorted_batch(SIZES_SRC, 2))),
    "edge set": (dict(edge_index=EDGES), 16, 16, reference.edge_mask(EDGES, 16, 16)),
    "edge set causal": (dict(edge_index=EDGES, causal=True), 16, 16,
                        reference.edge_mask(EDGES, 16, 16)
                        & torch.ones(16, 16, dtype=torch.bool).tril()),
}
IMPLICIT = [kind for kind in KINDS if not kind.startswith("edge set")]


def built(kind: str) -> gatattn.AttentionGraph:
    keywords, num_dst, num_src, _ = KINDS[kind]
    num_nodes = None
    if "ptr" not in keywords and "batch" not in keywords:
        num_nodes = num_dst if num_dst == num_src else (num_dst, num_src)
    return gatattn.build_graph(**keywords, num_nodes=num_nodes)


@pytest.mark.parametrize("route", ["sdpa", "sparse", "triton", "auto"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_graph_call_equals_keyword_call_and_reference(kind, route):
    keywords, num_dst, num_src, mask = KINDS[kind]
    if route == "sdpa" and kind not in IMPLICIT:
        pytest.skip("the SDPA route runs implicit graphs only")
    graph = built(kind)
    dtype = torch.float32 if route == "triton" else torch.float64
    inputs = make_qkv(num_dst, num_src, HEADS, CHANNELS, dtype=dtype)
    check_against_reference(lambda q, k, v: gatattn.attention(q, k, v, graph=graph,
                                                              backend=route),
                            inputs, masked_reference(mask))
    with torch.no_grad():
        by_graph = gatattn.attention(*inputs, graph=graph, backend=route)
        by_keywords = gatattn.attention(*inputs, **keywords, backend=route)
    torch.testing.assert_close(by_graph, by_keywords, rtol=0, atol=0)


@pytest.mark.parametrize("route", ["sdpa", "sparse"])
@pytest.mark.parametrize("kind", ["batched unsorted", "bipartite bottom-right", "edge set causal"])
def test_graph_call_with_attn_bias(kind, route):
    keywords, num_dst, num_src, mask = KINDS[kind]
    if route == "sdpa" and kind not in IMPLICIT:
        pytest.skip("the SDPA route runs implicit graphs only")
    graph = built(kind)
    gen = torch.Generator().manual_seed(3)
    if kind in IMPLICIT:
        dense = torch.randn(num_dst, num_src, HEADS, generator=gen, dtype=torch.float64)
        bias = _stacked(dense, keywords)
    else:
        bias = torch.randn(EDGES.size(1), HEADS, generator=gen, dtype=torch.float64)
        dense = _edge_bias_dense(bias, num_dst, num_src)
    bias.requires_grad_()
    inputs = (*make_qkv(num_dst, num_src, HEADS, CHANNELS, dtype=torch.float64), bias)

    def ref(q, k, v, b, compute_dtype):
        full = _stacked_to_dense(b, keywords, num_dst, num_src) if kind in IMPLICIT else (
            _edge_bias_dense(b, num_dst, num_src))
        return reference.attention(q, k, v, mask, bias=full, compute_dtype=compute_dtype)

    check_against_reference(
        lambda q, k, v, b: gatattn.attention(q, k, v, graph=graph, attn_bias=b, backend=route),
        inputs, ref, names=("q", "k", "v", "bias"))
    with torch.no_grad():
        torch.testing.assert_close(
            gatattn.attention(*inputs[:3], graph=graph, attn_bias=bias, backend=route),
            gatattn.attention(*inputs[:3], **keywords, attn_bias=bias, backend=route))


def _block_order(keywords):
    """Target and source node ids of each graph, in position order."""
    if "ptr" in keywords:
        ptr_dst, ptr_src = keywords["ptr"]
        return ([torch.arange(a, b) for a, b in zip(ptr_dst[:-1], ptr_dst[1:], strict=True)],
                [torch.arange(a, b) for a, b in zip(ptr_src[:-1], ptr_src[1:], strict=True)])
    batch_dst, batch_src = keywords["batch"] if isinstance(keywords["batch"], tuple) else (
        keywords["batch"],) * 2
    graphs = int(max(batch_dst.max(), batch_src.max())) + 1
    return ([(batch_dst == g).nonzero().squeeze(1) for g in range(graphs)],
            [(batch_src == g).nonzero().squeeze(1) for g in range(graphs)])


def _stacked(dense, keywords):
    """Each graph's ``n_dst x n_src`` block of a dense ``(N_dst, N_src, H)`` bias, stacked."""
    dst, src = _block_order(keywords)
    return torch.cat([dense[d][:, s].reshape(-1, dense.size(-1))
                      for d, s in zip(dst, src, strict=True)])


def _stacked_to_dense(stacked, keywords, num_dst, num_src):
    dense = stacked.new_zeros(num_dst, num_src, stacked.size(-1))
    dst, src = _block_order(keywords)
    start = 0
    for d, s in zip(dst, src, strict=True):
        block = stacked[start:start + d.numel() * s.numel()].view(d.numel(), s.numel(), -1)
        dense = dense.index_put((d.unsqueeze(1), s.unsqueeze(0)), block)
        start += d.numel() * s.numel()
    return dense


def _edge_bias_dense(bias, num_dst, num_src):
    dense = bias.new_zeros(num_dst, num_src, bias.size(-1))
    return dense.index_put((EDGES[1], EDGES[0]), bias)


def test_graph_call_with_edge_attr():
    keywords, num_dst, num_src, mask = KINDS["edge set causal"]
    graph = built("edge set causal")
    q, k, v = make_qkv(num_dst, num_src, HEADS, CHANNELS, dtype=torch.float64)
    edge_attr = torch.randn(EDGES.size(1), HEADS, CHANNELS, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(
            gatattn.attention(q, k, v, graph=graph, edge_attr=edge_attr),
            gatattn.attention(q, k, v, **keywords, edge_attr=edge_attr), rtol=0, atol=0)


class _ImplicitReads(TorchDispatchMode):
    """Operators whose output size depends on values (a hidden host read on a GPU)."""

    SYNCING = {torch.ops.aten.nonzero.default, torch.ops.aten.masked_select.default,
               torch.ops.aten.unique_consecutive.default, torch.ops.aten._unique2.default}

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.SYNCING:
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("route", ["sdpa", "sparse", "triton"])
@pytest.mark.parametrize("kind", ["complete causal", "batched unsorted", "bipartite bottom-right",
                                  "edge set causal"])
def test_graph_calls_read_nothing_on_the_host(monkeypatch, kind, route):
    if route == "sdpa" and kind not in IMPLICIT:
        pytest.skip("the SDPA route runs implicit graphs only")
    keywords, num_dst, num_src, _ = KINDS[kind]
    with count_host_reads(monkeypatch) as reads:
        graph = built(kind)
    assert reads.count <= 1, f"build_graph read the host {reads.count} times"
    q, k, v = make_qkv(num_dst, num_src, HEADS, CHANNELS)
    bias = torch.randn(expected_rows(graph) if kind in IMPLICIT else EDGES.size(1), HEADS,
                       requires_grad=True) if route != "triton" else None
    for _ in range(2):  # the first call derives nothing either
        implicit = _ImplicitReads()
        with count_host_reads(monkeypatch) as reads, implicit:
            out = gatattn.attention(q, k, v, graph=graph, attn_bias=bias, backend=route)
            out.backward(torch.ones_like(out))
        assert reads.count == 0, f"{reads.count} host reads with graph="
        assert implicit.seen == [], f"value-dependent sizes with graph=: {implicit.seen}"


def test_build_graph_derives_sizes_from_what_it_is_given():
    ptr = _ptr(SIZES_DST)
    graph = gatattn.build_graph(ptr=ptr)
    assert (graph.num_dst, graph.num_src, graph.num_graphs) == (16, 16, 4)
    assert graph.num_edges() == sum(n * n for n in SIZES_DST)
    pair = gatattn.build_graph(ptr=(ptr, _ptr(SIZES_SRC)))
    assert (pair.num_dst, pair.num_src, pair.bipartite) == (16, 15, True)
    assert gatattn.build_graph(num_nodes=(3, 5)).bipartite
    assert not gatattn.build_graph(num_nodes=4).bipartite
    sparse = torch.sparse_coo_tensor(EDGES.flip(0), torch.ones(EDGES.size(1)), (16, 16))
    assert gatattn.build_graph(edge_index=sparse).num_dst == 16
    edge_index = torch_geometric_edge_index()
    assert gatattn.build_graph(edge_index=edge_index).num_src == 16


def torch_geometric_edge_index():
    from torch_geometric import EdgeIndex

    return EdgeIndex(EDGES, sparse_size=(16, 16))


def test_graph_is_immutable_and_readable():
    graph = built("bipartite bottom-right")
    with pytest.raises(dataclasses.FrozenInstanceError):
        graph.causal = False
    assert repr(graph) == ("AttentionGraph(batched complete, graphs=4, nodes=16 targets x 15 "
                           f"sources, pairs={int(KINDS['bipartite bottom-right'][3].sum())}, "
                           "causal=bottom_right, device=cpu)")
    assert repr(built("edge set causal")).startswith(
        "AttentionGraph(edge set, nodes=16, edges=")
    assert graph.to("cpu") is graph


def test_graph_does_not_change_with_the_tensors_it_was_built_from():
    """The graph keeps private copies: a caller reusing its ptr / edge_index buffers for the
    next batch does not change a graph built from them."""
    ptr, edges = _ptr(SIZES_DST), EDGES.clone()
    by_ptr = gatattn.build_graph(ptr=ptr, causal=True)
    by_edges = gatattn.build_graph(edge_index=edges, num_nodes=16)
    q, k, v = (t.detach() for t in make_qkv(16, 16, HEADS, CHANNELS, dtype=torch.float64))
    edge_attr = torch.randn(EDGES.size(1), HEADS, CHANNELS, dtype=torch.float64)

    def outputs():  # routes that read the graph's ptr / edges on the device, not host copies
        return [gatattn.attention(q.float(), k.float(), v.float(), graph=by_ptr,
                                  backend="triton"),
                gatattn.attention(q, k, v, graph=by_edges, edge_attr=edge_attr)]

    before = outputs()
    ptr.copy_(_ptr([16, 0, 0, 0]))
    edges.copy_(edges.flip(0))
    after = outputs()
    for a, b in zip(before, after, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_graph_moves_between_devices():
    graph = built("batched unsorted")
    moved = graph.to("meta")  # (no second device on a CPU machine; meta tensors hold no data)
    assert moved.device == torch.device("meta") and repr(moved).endswith("device=meta)")
    assert moved.membership.dst.ptr.device.type == "meta"
    assert moved.membership.dst.order.forward.device.type == "meta"
    assert (moved.num_dst, moved.num_edges()) == (graph.num_dst, graph.num_edges())
    edges = built("edge set causal").to("meta")
    assert edges.edge_index.device.type == edges.kept_edges.device.type == "meta"
    # Prepared as its source: what routes derive from it later needs no host read.
    assert moved.prepared and edges.prepared


@pytest.mark.parametrize("keyword", ["edge_index", "batch", "ptr", "causal"])
def test_graph_with_a_second_description_is_refused(keyword):
    q, k, v = make_qkv(16, 16, HEADS, CHANNELS)
    value = {"edge_index": EDGES, "batch": torch.zeros(16, dtype=torch.long),
             "ptr": torch.tensor([0, 16]), "causal": True}[keyword]
    with pytest.raises(ValueError, match=f"graph= already describes the graph; got {keyword}"):
        gatattn.attention(q, k, v, graph=built("batched causal ptr"), **{keyword: value})


def test_bad_graph_calls_are_refused():
    graph = built("batched causal ptr")
    q, k, v = make_qkv(15, 15, HEADS, CHANNELS)
    with pytest.raises(ValueError, match="16 targets and 16 sources, but q has 15 rows"):
        gatattn.attention(q, k, v, graph=graph)
    q, k, v = make_qkv(16, 16, HEADS, CHANNELS)
    with pytest.raises(ValueError, match=r"graph is on meta but q, k, v are on cpu.*graph.to"):
        gatattn.attention(q, k, v, graph=graph.to("meta"))
    with pytest.raises(ValueError, match=r"attn_bias must be \(84, 2\)"):
        gatattn.attention(q, k, v, graph=graph, attn_bias=torch.zeros(71, HEADS))
    with pytest.raises(TypeError, match="graph must be a gatattn.AttentionGraph"):
        gatattn.attention(q, k, v, graph=_ptr(SIZES_DST))


def test_build_graph_refuses_what_it_cannot_know():
    with pytest.raises(ValueError, match="build_graph needs num_nodes"):
        gatattn.build_graph()
    with pytest.raises(ValueError, match="build_graph needs num_nodes"):
        gatattn.build_graph(edge_index=EDGES)
    with pytest.raises(ValueError, match="num_nodes must be an int >= 0"):
        gatattn.build_graph(num_nodes=-1)
    with pytest.raises(ValueError, match="must start at 0 and end at the number of nodes"):
        gatattn.build_graph(ptr=torch.tensor([0, 5, 3]), num_nodes=4)
    with pytest.raises(ValueError, match="ptr must be non-decreasing"):
        gatattn.build_graph(ptr=torch.tensor([0, 5, 3]))
    with pytest.raises(ValueError, match=r"edge_index sources \(row 0\) has max 15"):
        gatattn.build_graph(edge_index=EDGES, num_nodes=12)


@pytest.mark.parametrize("route", ["sdpa", "triton", "sparse"])
@pytest.mark.parametrize("tensor", ["q", "k", "v"])
def test_graph_calls_never_hide_a_nonfinite_input(route, tensor):
    """No host read means no exact repair: a non-finite input makes the whole output NaN (SDPA
    alone would return a finite row here: target 6 is the first of its causal graph, and its
    only key is the NaN one). The keyword form, validated, stays exact."""
    keywords, num_dst, num_src, mask = KINDS["batched causal ptr"]
    graph = built("batched causal ptr")
    q, k, v = (t.detach() for t in make_qkv(num_dst, num_src, HEADS, CHANNELS))
    {"q": q, "k": k, "v": v}[tensor][6, 1, 3] = float("nan")
    out = gatattn.attention(q, k, v, graph=graph, backend=route)
    expected = reference.attention(q, k, v, mask)
    if route == "sparse":  # message passing reads along edges only: exact by itself
        assert torch.equal(out.isnan(), expected.isnan())
    else:
        assert bool(out.isnan().all())
    with gatattn.validation(True):
        exact = gatattn.attention(q, k, v, **keywords, backend=route)
    assert torch.equal(exact.isnan(), expected.isnan())


# --- the layer ---------------------------------------------------------------------------------

def _layer_case(kind: str):
    """``(layer, x, keyword arguments of the layer's call, graph)``; bipartite layers take
    ``(x_src, x_dst)`` and pairs in PyG's (source, target) order, the graph (target, source)."""
    keywords, num_dst, num_src, _ = KINDS[kind]
    torch.manual_seed(0)
    edge_dim = 3 if kind.startswith("edge set") else None
    bipartite = num_dst != num_src
    layer = gatattn.SelfAttentionConv((5, 6) if bipartite else 5, 4, heads=2,
                                      edge_dim=edge_dim).double()
    gen = torch.Generator().manual_seed(4)
    x_src = torch.randn(num_src, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    x_dst = torch.randn(num_dst, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    x = (x_src, x_dst) if bipartite else x_src
    layer_keywords = {name: (value[1], value[0]) if isinstance(value, tuple) else value
                      for name, value in keywords.items()}
    if edge_dim is not None:
        layer_keywords["edge_attr"] = torch.randn(EDGES.size(1), edge_dim, generator=gen,
                                                  dtype=torch.float64)
    return layer, x, layer_keywords, built(kind)


def _layer_run(layer, x, graph=None, **keywords):
    out = layer(x, graph=graph, **keywords) if graph is not None else layer(x, **keywords)
    inputs = [x] if isinstance(x, torch.Tensor) else list(x)
    grads = torch.autograd.grad(out.sum(), [*inputs, *layer.parameters()], allow_unused=True)
    return out, grads


@pytest.mark.parametrize("path", ["fused", "propagate"])
@pytest.mark.parametrize("kind", ["batched unsorted", "bipartite bottom-right", "edge set causal"])
def test_layer_graph_call_equals_keyword_call(kind, path):
    layer, x, keywords, graph = _layer_case(kind)
    if path == "propagate":  # a message hook makes the layer run PyG's propagate
        layer.register_message_forward_hook(lambda module, inputs, output: None)
    extra = {"edge_attr": keywords["edge_attr"]} if "edge_attr" in keywords else {}
    out, grads = _layer_run(layer, x, graph, **extra)
    expected, expected_grads = _layer_run(layer, x, **keywords)
    torch.testing.assert_close(out, expected)
    for g, e in zip(grads, expected_grads, strict=True):
        if e is None:
            assert g is None
        else:
            torch.testing.assert_close(g, e)


@pytest.mark.parametrize("path", ["fused", "propagate"])
@pytest.mark.parametrize("kind", ["batched unsorted", "bipartite bottom-right", "edge set causal"])
def test_layer_graph_calls_read_nothing_on_the_host(monkeypatch, kind, path):
    layer, x, keywords, graph = _layer_case(kind)
    if path == "propagate":
        layer.register_message_forward_hook(lambda module, inputs, output: None)
    extra = {"edge_attr": keywords["edge_attr"]} if "edge_attr" in keywords else {}
    for _ in range(2):
        implicit = _ImplicitReads()
        with count_host_reads(monkeypatch) as reads, implicit:
            out = layer(x, graph=graph, **extra)
            out.sum().backward()
        assert reads.count == 0, f"{reads.count} host reads with graph="
        assert implicit.seen == [], f"value-dependent sizes with graph=: {implicit.seen}"


def test_layer_refuses_a_graph_with_keywords_or_another_flow():
    layer, x, _, graph = _layer_case("batched unsorted")
    with pytest.raises(ValueError, match="graph= already describes the graph; got batch"):
        layer(x, graph=graph, batch=torch.zeros(16, dtype=torch.long))
    with pytest.raises(ValueError, match="16 targets and 16 sources, but q has 15 rows"):
        layer(x[:15], graph=graph)
    flipped = gatattn.SelfAttentionConv(5, 4, heads=2, flow="target_to_source").double()
    with pytest.raises(ValueError, match="flow='target_to_source' takes edge_index"):
        flipped(x, graph=graph)


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append(func)
        return func(*args, **(kwargs or {}))


def test_graph_calls_with_validation_off_cost_what_the_route_costs():
    """Off, the guard's reductions are gone: the call runs the same operators as the route
    told its inputs are finite; on, the guard adds its sums."""
    graph = built("batched causal ptr")
    q, k, v = (t.detach() for t in make_qkv(16, 16, HEADS, CHANNELS))
    runs = {}
    for name, call in (
            ("route", lambda: gatattn.backends.sdpa_attention(q, k, v, graph, scale=0.5,
                                                              inputs_finite=True)),
            ("off", lambda: gatattn.attention(q, k, v, graph=graph, scale=0.5,
                                              backend="sdpa")),
            ("on", lambda: gatattn.attention(q, k, v, graph=graph, scale=0.5,
                                             backend="sdpa"))):
        with gatattn.validation(name == "on"), _Ops() as ops:
            call()
        runs[name] = ops.seen
    assert runs["off"] == runs["route"]
    assert runs["on"].count(torch.ops.aten.sum.default) == 3
