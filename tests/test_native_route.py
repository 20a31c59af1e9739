"""Small implicit graphs as compiled message passing (``routing.native_message_passing_serves``):
on CPU, ``auto`` runs batches of graphs of up to ``NATIVE_MAX_NODES`` nodes over their
materialised edges in the compiled kernels (with more than one thread, or a bias). It must
compute the reference's function (forward, gradients, a stacked bias and its gradient) on every
graph kind, carry non-finite inputs along edges by itself, keep what it derives with the graph,
and be taken exactly where it serves, in training and inference alike."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import gatattn
import gatattn.functional as functional
from gatattn import reference
from gatattn.backends import routing
from gatattn.backends.native import cpu_kernels
from gatattn.bias import stacked_rows, stacked_to_dense
from tests.conftest import check_against_reference, make_qkv, torch_threads

pytestmark = pytest.mark.skipif(cpu_kernels() is None,
                                reason="the compiled kernels could not be built here")


def _ptr(sizes):
    return torch.tensor([0, *sizes]).cumsum(0)


UNSORTED = torch.tensor([2, 0, 1, 0, 2, 2, 1, 0, 0, 2, 1, 1])  # graphs of 4, 4 and 4 nodes
# name: (build_graph keywords, n_dst, n_src, graph sizes for the stacked bias or None)
KINDS = {
    "one graph by ptr": (dict(ptr=_ptr([11])), 11, 11, ([11], [11])),
    "ptr with an empty graph": (dict(ptr=_ptr([4, 0, 6, 6, 3])), 19, 19,
                                ([4, 0, 6, 6, 3],) * 2),
    "bipartite ptr": (dict(ptr=(_ptr([3, 2, 4, 2]), _ptr([5, 0, 3, 5]))), 11, 13,
                      ([3, 2, 4, 2], [5, 0, 3, 5])),
    "batched unsorted": (dict(batch=UNSORTED), 12, 12, None),
    "causal": (dict(ptr=_ptr([4, 1, 6]), causal=True), 11, 11, None),
    "causal bottom-right": (dict(ptr=(_ptr([6, 2]), _ptr([3, 5])), causal="bottom_right"),
                            8, 8, None),
}


def _mask(graph):
    """The reference's (N_dst, N_src) mask of ``graph``, from its materialised edges."""
    return reference.edge_mask(graph.to_edge_index(), graph.num_dst, graph.num_src)


@pytest.fixture(autouse=True)
def two_threads():
    """The route serves calls with more than one thread (or a bias): the tests pin two."""
    with torch_threads(2):
        yield


@pytest.fixture
def taken(monkeypatch):
    """The routes' names of the calls ``auto`` sent to message passing."""
    routes = []
    original = functional.sparse_attention

    def counted(*args, **kwargs):
        routes.append(kwargs["form"])
        return original(*args, **kwargs)

    monkeypatch.setattr(functional, "sparse_attention", counted)
    return routes


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("channels", [5, 16])  # any width; one the kernels are compiled for
def test_equals_the_reference(kind, channels, taken):
    keywords, n_dst, n_src, _ = KINDS[kind]
    graph = gatattn.build_graph(**keywords)
    inputs = make_qkv(n_dst, n_src, 2, channels, dtype=torch.float64)
    mask = _mask(graph)

    def ref(q, k, v, compute_dtype):
        return reference.attention(q, k, v, mask, compute_dtype=compute_dtype)

    check_against_reference(lambda q, k, v: gatattn.attention(q, k, v, graph=graph), inputs,
                            ref)
    call_keywords = {key: value for key, value in keywords.items() if key != "num_nodes"}
    check_against_reference(lambda q, k, v: gatattn.attention(q, k, v, **call_keywords),
                            inputs, ref)  # the keyword form: the call's own graph
    assert taken and set(taken) == {"csr"}


@pytest.mark.parametrize("kind", [name for name, case in KINDS.items() if case[3]])
def test_a_stacked_bias_and_its_gradient(kind, taken):
    keywords, n_dst, n_src, (sizes_dst, sizes_src) = KINDS[kind]
    graph = gatattn.build_graph(**keywords)
    rows = sum(d * s for d, s in zip(sizes_dst, sizes_src, strict=True))
    q, k, v = make_qkv(n_dst, n_src, 2, 32, dtype=torch.float64)
    bias = torch.randn(rows, 2, dtype=torch.float64, requires_grad=True)
    dense_mask = reference.block_mask(sizes_dst, sizes_src)

    def ref(q, k, v, bias, compute_dtype):
        return reference.attention(q, k, v, dense_mask, compute_dtype=compute_dtype,
                                   bias=stacked_to_dense(bias, _ptr(sizes_dst), _ptr(sizes_src)))

    check_against_reference(lambda q, k, v, b: gatattn.attention(q, k, v, graph=graph,
                                                                 attn_bias=b),
                            (q, k, v, bias), ref, names=("q", "k", "v", "bias"))
    assert taken == ["csr"] * len(taken) and taken


def test_the_stacked_bias_is_read_in_place_where_the_edges_are_in_its_order():
    """The route skips the bias gather for graphs in order without a mask: their materialised
    edges must be exactly the stacked rows' order (and an unsorted batch's are not)."""
    for keywords in (dict(ptr=_ptr([4, 0, 6, 3])), dict(ptr=(_ptr([3, 2]), _ptr([5, 1]))),
                     dict(num_nodes=(3, 4))):  # (the last for the propagate path)
        graph = gatattn.build_graph(**keywords)
        src, dst = graph.to_edge_index()
        assert torch.equal(stacked_rows(graph, dst, src), torch.arange(src.numel()))
    graph = gatattn.build_graph(batch=UNSORTED)
    src, dst = graph.to_edge_index()
    assert not torch.equal(stacked_rows(graph, dst, src), torch.arange(src.numel()))


@pytest.mark.parametrize("tensor", ["q", "k", "v"])
def test_nonfinite_inputs_reach_only_the_outputs_that_read_them(tensor, taken):
    keywords, n_dst, n_src, _ = KINDS["bipartite ptr"]
    graph = gatattn.build_graph(**keywords)
    q, k, v = make_qkv(n_dst, n_src, 2, 4, dtype=torch.float64)
    with torch.no_grad():
        {"q": q, "k": k, "v": v}[tensor][2, 1, 3] = float("nan")
    out = gatattn.attention(q, k, v, graph=graph)
    expected = reference.attention(q.detach(), k.detach(), v.detach(), _mask(graph))
    assert taken == ["csr"]
    assert torch.equal(out.isnan(), expected.isnan())
    assert bool(expected.isnan().any()) and bool(expected.isfinite().any())
    finite = expected.isfinite()
    torch.testing.assert_close(out[finite], expected[finite])


def test_the_graph_keeps_its_edges_and_their_csr(taken):
    graph = gatattn.build_graph(ptr=_ptr([5, 3, 7]))
    q, k, v = make_qkv(15, 15, 2, 4)
    gatattn.attention(q, k, v, graph=graph).sum().backward()
    edges, csr = graph.materialized_edges, graph.csr
    assert edges is not None and csr is not None and csr.position is None  # sorted: no reorder
    gatattn.attention(q, k, v, graph=graph).sum().backward()
    assert graph.materialized_edges is edges and graph.csr is csr and taken == ["csr", "csr"]


@pytest.mark.parametrize("change", [
    "dropout", "half", "gqa", "larger graph", "one graph", "backend='sdpa'",
    "dispatch mode", "weights", "one thread"])
@pytest.mark.parametrize("grad", [True, False])
def test_taken_only_where_it_serves(change, grad, taken):
    q, k, v = make_qkv(12, 12, 2, 4)
    keywords = {"ptr": _ptr([5, 7])}
    watch = None
    if change == "dropout":
        keywords["dropout"] = 0.5
    elif change == "half":
        q, k, v = (t.detach().bfloat16().requires_grad_() for t in (q, k, v))
    elif change == "gqa":
        k, v = k[:, :1], v[:, :1]
    elif change == "larger graph":
        n = routing.NATIVE_MAX_NODES + 1
        q, k, v = make_qkv(n, n, 2, 4)
        keywords = {"ptr": _ptr([n])}
    elif change == "one graph":
        keywords = {}
    elif change == "one thread":
        torch.set_num_threads(1)
    elif change == "backend='sdpa'":
        keywords["backend"] = "sdpa"
    elif change == "dispatch mode":  # it would not see the compiled kernels' work
        watch = FlopCounterMode(display=False)
    context = torch.enable_grad() if grad else torch.no_grad()
    with context:
        _call(change, watch, q, k, v, keywords, taken)


def _call(change, watch, q, k, v, keywords, taken):
    if watch is not None:
        with watch:
            gatattn.attention(q, k, v, **keywords)
    elif change == "weights":
        gatattn.attention(q, k, v, return_attention_weights=True, **keywords)
    else:
        gatattn.attention(q, k, v, **keywords)
    assert "csr" not in taken
    if change == "one thread":  # where a bias makes the other routes gather, it serves
        gatattn.attention(q, k, v, attn_bias=torch.randn(5 * 5 + 7 * 7, 2), **keywords)
    else:
        gatattn.attention(*make_qkv(12, 12, 2, 4), ptr=_ptr([5, 7]))  # the control
    assert taken[-1] == "csr"
