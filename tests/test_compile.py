"""Batched implicit graphs (batch= / ptr=) under torch.compile, torch.export and ONNX export.

Under tracing they run as the opaque operator gatattn::segment_attention: one compile serves
batches of any sizes and graph counts, without graph breaks, forward and backward.
"""

import functools

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

import gatattn
from gatattn.backends.ops import ONNX_DECOMPOSITIONS, draw_seed, seeded, segment_attention
from tests.conftest import check_against_reference, make_qkv, masked_reference
from tests.test_functional import batch_from_sizes, ptr_from_sizes, same_graph_mask

# Eight batches: new node counts and graph counts each time, graphs of size 1, one lone graph.
SIZES = [[3, 5, 2], [4, 4, 4, 1], [7], [2, 6, 3, 3, 5], [1, 1, 2], [5, 2],
         [3, 3, 3, 3, 3, 3], [9, 2, 4, 1]]
# With dynamic=True torch "duck sizes" dims equal on the first call (one symbol, then a guard
# that they stay equal): head and channel counts differ from every node and graph count here.
HEADS, CHANNELS = 3, 12


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def assert_compiled_graphs(expected):
    """Dynamo built ``expected`` graphs (a retried trace of one frame counts once) and broke
    none."""
    assert counters["stats"]["unique_graphs"] == expected, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])


class TwoLayers(nn.Module):
    def __init__(self, causal=False):
        super().__init__()
        self.causal = causal
        self.conv1 = gatattn.SelfAttentionConv(8, 4, heads=2)
        self.conv2 = gatattn.SelfAttentionConv(8, 4, heads=2)

    def forward(self, x, batch=None, ptr=None):
        x = self.conv1(x, batch=batch, ptr=ptr, causal=self.causal).relu()
        return self.conv2(x, batch=batch, ptr=ptr, causal=self.causal)


def graph_kwargs(form, sizes):
    return {"batch": batch_from_sizes(sizes)} if form == "batch" else {
        "ptr": ptr_from_sizes(sizes)}


def forward_and_grads(model, x, kwargs):
    out = model(x, **kwargs)
    grads = torch.autograd.grad(out.square().sum(), [x, *model.parameters()])
    return out, grads


@pytest.mark.parametrize("form,causal", [("batch", False), ("ptr", True)])
def test_layer_compiles_once_for_eight_new_batches(form, causal):
    torch.manual_seed(0)
    model = TwoLayers(causal)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for sizes in SIZES:
            x = torch.randn(sum(sizes), 8, requires_grad=True)
            kwargs = graph_kwargs(form, sizes)
            out, grads = forward_and_grads(compiled, x, kwargs)
            ref_out, ref_grads = forward_and_grads(model, x, kwargs)
            torch.testing.assert_close(out, ref_out)
            for g, ref_g in zip(grads, ref_grads, strict=True):
                torch.testing.assert_close(g, ref_g)
    assert_compiled_graphs(1)


@pytest.mark.parametrize("form", ["batch", "ptr"])
def test_layer_has_no_graph_breaks(form):
    sizes = SIZES[0]
    explanation = torch._dynamo.explain(TwoLayers())(torch.randn(sum(sizes), 8),
                                                     **graph_kwargs(form, sizes))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def compiled_attention(**fixed):
    def run(q, k, v, **graph):
        return gatattn.attention(q, k, v, **fixed, **graph)
    return torch.compile(run, backend="aot_eager", fullgraph=True, dynamic=True)


@pytest.mark.parametrize("form,causal", [("batch", False), ("ptr", True), ("unsorted", True)])
def test_functional_against_reference_on_new_batches(form, causal):
    run = compiled_attention(causal=causal)
    for seed, sizes in enumerate(SIZES[:4]):
        n = sum(sizes)
        batch = batch_from_sizes(sizes)
        if form == "unsorted":
            batch = batch[torch.randperm(n, generator=torch.Generator().manual_seed(seed))]
        graph = {"ptr": ptr_from_sizes(sizes)} if form == "ptr" else {"batch": batch}
        check_against_reference(lambda q, k, v, graph=graph: run(q, k, v, **graph),
                                make_qkv(n, n, HEADS, CHANNELS, seed=seed),
                                masked_reference(same_graph_mask(batch, batch, causal)))
    assert_compiled_graphs(2)  # one with grad, one without (no_grad), for all sizes


@pytest.mark.parametrize("causal", [False, True])
def test_functional_bipartite_against_reference(causal):
    run = compiled_attention(causal=causal)
    for seed, (sizes_dst, sizes_src) in enumerate([([2, 5, 1], [4, 3, 6]),
                                                   ([3, 0, 4, 2], [1, 5, 2, 2])]):
        batch_dst, batch_src = batch_from_sizes(sizes_dst), batch_from_sizes(sizes_src)
        mask = same_graph_mask(batch_dst, batch_src, causal)
        check_against_reference(
            lambda q, k, v, b=(batch_dst, batch_src): run(q, k, v, batch=b),
            make_qkv(sum(sizes_dst), sum(sizes_src), HEADS, CHANNELS, value_channels=11,
                     seed=seed),
            masked_reference(mask))
    assert_compiled_graphs(2)  # with and without grad


def test_functional_has_no_graph_breaks():
    q, k, v = make_qkv(10, 10, 2, 8)
    explanation = torch._dynamo.explain(gatattn.attention)(q, k, v,
                                                           batch=batch_from_sizes([3, 5, 2]))
    assert explanation.graph_break_count == 0, explanation.break_reasons


def test_operator_checks():
    """torch.library's own checks: schema, fake (meta) shapes, autograd registration."""
    q, k, v = make_qkv(10, 10, 2, 8, value_channels=6)
    batch = torch.tensor([1, 0, 0, 1, 2, 2, 2, 0, 1, 1])
    for batch_src, causal in ((None, False), (None, True), (batch.flip(0), True)):
        torch.library.opcheck(segment_attention, (q, k, v, batch, batch_src, 0.3, causal))


def test_nonfinite_inputs_travel_along_edges_only():
    q, k, v = (t.detach() for t in make_qkv(10, 10, 2, 8))
    k[4, 1, 0] = float("nan")  # graph 1, head 1
    batch = batch_from_sizes([3, 5, 2])
    out = compiled_attention()(q, k, v, batch=batch)
    expected = torch.zeros(10, 2, dtype=torch.bool)
    expected[3:8, 1] = True
    assert torch.equal(out.isnan().any(-1), expected)


def test_second_derivatives_are_refused_not_wrong():
    q, k, v = make_qkv(10, 10, 2, 8)
    batch = batch_from_sizes([3, 5, 2])
    out = compiled_attention()(q, k, v, batch=batch)
    (dq,) = torch.autograd.grad(out.sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward|second derivatives"):
        torch.autograd.grad(dq.sum(), v)
    # The operator called directly (as an exported program does) refuses it by name.
    out = segment_attention(q, k, v, batch, None, 0.3, False)
    (dq,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="second derivatives are not available"):
        torch.autograd.grad(dq.sum(), v)


@pytest.mark.parametrize("causal", [False, True])
def test_dropout_runs_in_the_operator_and_equals_eager_under_its_seed(causal):
    """The operator takes attention dropout with a seed drawn in the graph: under the same
    seed the compiled call and its gradients equal eager mode's, and its backward replays the
    forward's mask (the gradients match eager's for that same mask)."""
    run = compiled_attention(dropout=0.4, causal=causal)
    for seed, sizes in enumerate(SIZES[:3]):
        q, k, v = make_qkv(sum(sizes), sum(sizes), HEADS, CHANNELS, seed=seed)
        batch = batch_from_sizes(sizes)
        torch.manual_seed(seed)
        out, grads = _out_and_grads(run, q, k, v, batch)
        torch.manual_seed(seed)
        with seeded(draw_seed(), q.device):
            ref, ref_grads = _out_and_grads(
                functools.partial(gatattn.attention, dropout=0.4, causal=causal), q, k, v, batch)
        assert torch.equal(out, ref)
        for g, ref_g in zip(grads, ref_grads, strict=True):
            assert torch.equal(g, ref_g)
        # Dropout did fall, and a second call draws another mask.
        without = gatattn.attention(q, k, v, batch=batch, causal=causal)
        assert not torch.allclose(out, without)
        assert not torch.equal(run(q, k, v, batch=batch), out)
    assert_compiled_graphs(1)


def _out_and_grads(call, q, k, v, batch):
    out = call(q, k, v, batch=batch)
    return out, torch.autograd.grad(out.square().sum(), (q, k, v))


@pytest.fixture(scope="module")
def exported():
    """A 2-layer model and its program, exported once with a dynamic node count."""
    torch.manual_seed(0)
    model = TwoLayers().eval()
    sizes = SIZES[0]
    nodes = torch.export.Dim("nodes", min=2)
    program = torch.export.export(
        model, (torch.randn(sum(sizes), 8),), {"batch": batch_from_sizes(sizes)},
        dynamic_shapes={"x": {0: nodes}, "batch": {0: nodes}})
    return model, program


def test_export_runs_batches_of_other_sizes(exported):
    model, program = exported
    for sizes in SIZES[1:4]:
        x, batch = torch.randn(sum(sizes), 8), batch_from_sizes(sizes)
        torch.testing.assert_close(program.module()(x, batch=batch), model(x, batch=batch))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("bipartite", [False, True])
def test_onnx_decomposition_against_reference(bipartite, causal):
    decomposed = ONNX_DECOMPOSITIONS[torch.ops.gatattn.segment_attention.default]
    batch_dst = torch.tensor([1, 0, 0, 1, 2, 2, 2, 0, 1, 1, 4])  # graph 3 empty, graph 4 alone
    batch_src = torch.tensor([2, 0, 1, 1, 0, 2, 0]) if bipartite else batch_dst
    inputs = make_qkv(batch_dst.numel(), batch_src.numel(), 2, 8, value_channels=6)
    check_against_reference(
        lambda q, k, v: decomposed(q, k, v, batch_dst, batch_src if bipartite else None, 0.3,
                                   causal),
        inputs, masked_reference(same_graph_mask(batch_dst, batch_src, causal), scale=0.3))


def test_decomposed_program_runs_batches_of_other_sizes(exported):
    model, program = exported
    decomposed = program.run_decompositions(ONNX_DECOMPOSITIONS).module()
    for sizes in SIZES[1:4]:
        x, batch = torch.randn(sum(sizes), 8), batch_from_sizes(sizes)
        torch.testing.assert_close(decomposed(x, batch=batch), model(x, batch=batch))


def test_onnx_export_runs_in_onnxruntime(exported):
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    model, program = exported
    onnx_program = torch.onnx.export(program.run_decompositions(ONNX_DECOMPOSITIONS),
                                     dynamo=True)
    session = ort.InferenceSession(onnx_program.model_proto.SerializeToString())
    names = [i.name for i in session.get_inputs()]
    for sizes in SIZES[1:4]:
        x, batch = torch.randn(sum(sizes), 8), batch_from_sizes(sizes)
        (out,) = session.run(None, dict(zip(names, (x.numpy(), batch.numpy()), strict=True)))
        torch.testing.assert_close(torch.from_numpy(out), model(x, batch=batch))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("form", ["batch", "ptr"])
def test_plain_onnx_export_of_the_model_runs_in_onnxruntime(form, causal):
    """torch.onnx.export(model, dynamo=True) without ONNX_DECOMPOSITIONS: torch.onnx has no
    function for the operator, so the model must not hand it one."""
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = TwoLayers(causal=causal).eval()
    sizes = SIZES[0]
    kwargs = graph_kwargs(form, sizes)
    nodes, graphs = torch.export.Dim("nodes", min=2), torch.export.Dim("graphs", min=1)
    dims = {"batch": {0: nodes}} if form == "batch" else {"ptr": {0: graphs + 1}}
    onnx_program = torch.onnx.export(
        model, (torch.randn(sum(sizes), 8),), kwargs=kwargs, dynamo=True,
        dynamic_shapes={"x": {0: nodes}, **dims})
    session = ort.InferenceSession(onnx_program.model_proto.SerializeToString())
    names = [i.name for i in session.get_inputs()]
    for sizes in SIZES[1:4]:
        x, kwargs = torch.randn(sum(sizes), 8), graph_kwargs(form, sizes)
        feeds = dict(zip(names, (x.numpy(), kwargs[form].numpy()), strict=True))
        (out,) = session.run(None, feeds)
        torch.testing.assert_close(torch.from_numpy(out), model(x, **kwargs))


@pytest.mark.parametrize("bad_ptr", [[0, 3, 8], [1, 3, 10], [0, 6, 3, 10]],
                         ids=["ends early", "starts late", "decreasing"])
def test_invalid_ptr_is_refused_when_the_compiled_graph_runs(bad_ptr):
    """Traced, ptr's values cannot be read on the host: a device-side assert refuses what eager
    mode refuses, instead of putting nodes in the wrong graph."""
    conv = gatattn.SelfAttentionConv(8, 4, heads=2)
    compiled = torch.compile(conv, fullgraph=True, dynamic=True, backend="aot_eager")
    x = torch.randn(10, 8)
    compiled(x, ptr=torch.tensor([0, 3, 10]))
    with pytest.raises(RuntimeError, match="ptr must be non-decreasing, start at 0 and end"):
        compiled(x, ptr=torch.tensor(bad_ptr))

