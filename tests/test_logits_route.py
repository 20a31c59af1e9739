"""The written-out logits route (``"logits"``, see ``routing.logits_route_serves``): small
complete graphs on CPU, which ``auto`` computes as ``baddbmm``, softmax and ``bmm`` per group of
equal-size graphs. It must compute the reference's function, forward, gradients and
second derivatives; contain non-finite inputs along edges by itself (it runs no repair, not even
on ``graph=`` calls); and be taken exactly where it serves."""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import gatattn
import gatattn.functional as functional
from gatattn import reference
from gatattn.backends import routing
from tests.conftest import check_against_reference, make_qkv, masked_reference

HEADS, CHANNELS = 2, 4


def _ptr(sizes):
    return torch.tensor([0, *sizes]).cumsum(0)


def _batch(sizes, order_seed):
    batch = torch.arange(len(sizes)).repeat_interleave(torch.tensor(sizes))
    return batch[torch.randperm(batch.numel(), generator=torch.Generator().manual_seed(order_seed))]


def _batch_mask(batch_dst, batch_src):
    return batch_dst.view(-1, 1) == batch_src.view(1, -1)


UNSORTED = _batch([3, 5, 4, 5], 0)
# (keywords of build_graph, num_dst, num_src, the reference's mask)
KINDS = {
    "one graph": (dict(num_nodes=11), 11, 11, torch.ones(11, 11, dtype=torch.bool)),
    "one bipartite graph": (dict(num_nodes=(7, 11)), 7, 11, torch.ones(7, 11, dtype=torch.bool)),
    "batched unsorted": (dict(batch=UNSORTED), 17, 17, _batch_mask(UNSORTED, UNSORTED)),
    "ptr with an empty graph": (dict(ptr=_ptr([4, 0, 6, 6, 3])), 19, 19,
                                reference.block_mask([4, 0, 6, 6, 3])),
    "bipartite ptr, a graph without sources": (
        dict(ptr=(_ptr([3, 2, 4, 2]), _ptr([5, 0, 3, 5]))), 11, 13,
        reference.block_mask([3, 2, 4, 2], [5, 0, 3, 5])),
}


@pytest.fixture(autouse=True)
def no_compiled_message_passing(monkeypatch):
    """Batches of small graphs take the compiled message passing where it is built
    (tests/test_native_route.py); here the logits route is the subject."""
    monkeypatch.setattr(routing, "native_message_passing_serves", lambda *args: False)


@pytest.fixture
def taken(monkeypatch):
    """How many calls took the logits route."""
    calls = []
    route = functional.logits_attention

    def counted(*args, **kwargs):
        calls.append(1)
        return route(*args, **kwargs)

    monkeypatch.setattr(functional, "logits_attention", counted)
    return calls


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("form", ["graph=", "keywords"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_equals_the_reference_forward_and_gradients(kind, form, dtype, taken):
    keywords, num_dst, num_src, mask = KINDS[kind]
    graph = gatattn.build_graph(**keywords)
    given = {"graph": graph} if form == "graph=" else {
        name: value for name, value in keywords.items() if name != "num_nodes"}
    inputs = make_qkv(num_dst, num_src, HEADS, CHANNELS, dtype=dtype)
    check_against_reference(lambda q, k, v: gatattn.attention(q, k, v, **given), inputs,
                            masked_reference(mask))
    assert taken  # every call above took the route


@pytest.mark.parametrize("kind", ["one bipartite graph", "batched unsorted"])
@pytest.mark.heavy  # gradgradcheck: ~10 s
def test_second_derivatives(kind, taken):
    keywords, num_dst, num_src, _ = KINDS[kind]
    graph = gatattn.build_graph(**keywords)
    inputs = make_qkv(num_dst, num_src, HEADS, 3, dtype=torch.float64)

    def run(q, k, v):
        return gatattn.attention(q, k, v, graph=graph, scale=0.7)

    assert gradcheck(run, inputs) and gradgradcheck(run, inputs)
    assert taken


def test_log_sum_exp_equals_the_reference(taken):
    keywords, num_dst, num_src, mask = KINDS["ptr with an empty graph"]
    q, k, v = make_qkv(num_dst, num_src, HEADS, CHANNELS, dtype=torch.float64)
    out, lse = gatattn.attention(q, k, v, graph=gatattn.build_graph(**keywords),
                                 return_lse=True)
    expected, expected_lse = reference.attention(q, k, v, mask, return_lse=True)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(lse, expected_lse)
    assert taken


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("tensor", ["q", "k", "v"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_nonfinite_inputs_reach_only_the_outputs_that_read_them(kind, tensor, value, taken):
    """Without a host read and without a repair (a graph= call): every pair is an edge, so IEEE
    arithmetic alone carries the value along edges, exactly where the reference does, and
    every other output is what it would be without it."""
    keywords, num_dst, num_src, mask = KINDS[kind]
    graph = gatattn.build_graph(**keywords)
    q, k, v = (t.detach() for t in make_qkv(num_dst, num_src, HEADS, CHANNELS,
                                            dtype=torch.float64))
    poisoned = {"q": q, "k": k, "v": v}[tensor]
    poisoned[2, 1, 3] = value  # row 2 of each kind has in-edges and out-edges
    out = gatattn.attention(q, k, v, graph=graph)
    expected = reference.attention(q, k, v, mask)
    assert taken
    assert torch.equal(out.isnan(), expected.isnan())
    assert torch.equal(out.isinf(), expected.isinf())
    assert bool(expected.isfinite().any()) and not bool(expected.isfinite().all())
    finite = expected.isfinite()
    torch.testing.assert_close(out[finite], expected[finite])


@pytest.mark.parametrize("change", [
    "causal", "window", "half", "gqa", "dropout", "bias", "larger graph", "in-order equal graphs",
    "backend='sdpa'", "weights"])
def test_taken_only_where_it_serves(change, taken):
    q, k, v = make_qkv(12, 12, HEADS, CHANNELS)
    keywords = {}
    if change == "causal":
        keywords["causal"] = True
    elif change == "window":
        keywords["window"] = (2, 2)
    elif change == "half":
        q, k, v = (t.detach().bfloat16() for t in (q, k, v))
    elif change == "gqa":
        k, v = k[:, :1], v[:, :1]
    elif change == "dropout":
        keywords["dropout"] = 0.5
    elif change == "bias":
        keywords["attn_bias"] = torch.zeros(12 * 12, HEADS)
    elif change == "larger graph":
        n = routing.LOGITS_MAX_NODES + 1
        q, k, v = make_qkv(n, n, HEADS, CHANNELS)
    elif change == "in-order equal graphs":  # SDPA reads them as they lie
        keywords["ptr"] = _ptr([4, 4, 4])
    elif change == "backend='sdpa'":
        keywords["backend"] = "sdpa"
    elif change == "weights":
        keywords["return_attention_weights"] = True
    gatattn.attention(q, k, v, **keywords)
    assert not taken
    gatattn.attention(*make_qkv(12, 12, HEADS, CHANNELS), ptr=_ptr([4, 3, 5]))  # the control
    assert taken


def test_a_layout_it_built_serves_biased_calls_in_and_out_of_inference_mode(taken):
    """The logits route builds the plan's head-major layout without the bias's pair order;
    a biased call builds that later, here first under inference mode, and a training call
    must still be able to save it for its backward."""
    keywords, num_dst, num_src, mask = KINDS["batched unsorted"]
    graph = gatattn.build_graph(**keywords)
    q, k, v = make_qkv(num_dst, num_src, HEADS, CHANNELS, dtype=torch.float64)
    gatattn.attention(q, k, v, graph=graph).sum().backward()
    assert taken
    pairs = int(mask.sum())
    with torch.inference_mode():
        gatattn.attention(q, k, v, graph=graph, attn_bias=torch.randn(pairs, HEADS))
    bias = torch.zeros(pairs, HEADS, dtype=torch.float64, requires_grad=True)
    out = gatattn.attention(q, k, v, graph=graph, attn_bias=bias)
    out.sum().backward()
    torch.testing.assert_close(out, reference.attention(q, k, v, mask))
    assert bias.grad is not None and bias.grad.shape == (pairs, HEADS)


def test_a_graph_first_used_under_inference_mode_then_trains(taken):
    """The route derives the graph's head-major layout on first use and keeps it with the
    graph: first used under inference mode, it must still serve a training call."""
    keywords, num_dst, num_src, mask = KINDS["ptr with an empty graph"]
    graph = gatattn.build_graph(**keywords)
    q, k, v = make_qkv(num_dst, num_src, HEADS, CHANNELS, dtype=torch.float64)
    with torch.inference_mode():
        gatattn.attention(q, k, v, graph=graph)
    check_against_reference(lambda q, k, v: gatattn.attention(q, k, v, graph=graph),
                            (q, k, v), masked_reference(mask))
    assert len(taken) > 1
