"""Batched implicit graphs (batch= / ptr=) under torch.compile, torch.export and ONNX export.

Under tracing they run as the opaque operator gatattn::segment_attention: one compile serves
batches of any sizes and graph counts, without graph breaks, forward and backward. The drop-ins
compile the same way: gatattn.MultiheadAttention with masks through gatattn::sequence_attention,
gatattn.GPSConv (attention dropout included) through segment_attention.
"""

import functools

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

import gatattn
from gatattn.backends.ops import ONNX_DECOMPOSITIONS, draw_seed, seeded, segment_attention
from gatattn.sequence_graphs import sequence_attention
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
@pytest.mark.heavy  # torch.compile and eight batches: ~10 s
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


@pytest.mark.heavy  # an onnxruntime session of the exported model: ~10 s
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
@pytest.mark.heavy  # exports and runs onnxruntime sessions: ~40 s
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


# -- gatattn.MultiheadAttention and gatattn.GPSConv ----------------------------------------------

EMBED, MHA_HEADS = 16, 4


def padding_mask(N, S, as_float=False):
    """Padding at the ends of two sequences (one loses two keys, one its last)."""
    mask = torch.zeros(N, S, dtype=torch.bool)
    mask[0, S - 2:] = True
    mask[N - 1, S - 1] = True
    return torch.zeros(N, S).masked_fill(mask, float("-inf")) if as_float else mask


def causal_mask(L):
    return nn.Transformer.generate_square_subsequent_mask(L)


# What each case passes with (N, L) sequences; the graphs the masks state are read at run time.
MASKS = {
    "key_padding_mask bool": lambda N, L: {"key_padding_mask": padding_mask(N, L)},
    "key_padding_mask float": lambda N, L: {"key_padding_mask": padding_mask(N, L, True)},
    "causal attn_mask, is_causal": lambda N, L: {"attn_mask": causal_mask(L), "is_causal": True},
    "causal attn_mask": lambda N, L: {"attn_mask": causal_mask(L)},
    "causal and padding": lambda N, L: {"attn_mask": causal_mask(L),
                                        "key_padding_mask": padding_mask(N, L)},
    "3-D bool attn_mask": lambda N, L: {
        "attn_mask": torch.ones(N * MHA_HEADS, L, L, dtype=torch.bool).triu(1)
        .index_fill(0, torch.tensor([1]), False)},
    "float attn_mask (bias)": lambda N, L: {
        "attn_mask": torch.randn(L, L, generator=torch.Generator().manual_seed(L))},
}


def twin_attention(**kwargs):
    """torch's nn.MultiheadAttention and gatattn's with its weights."""
    torch.manual_seed(0)
    ours_from = nn.MultiheadAttention(EMBED, MHA_HEADS, batch_first=True, **kwargs)
    return ours_from, gatattn.MultiheadAttention.from_torch(ours_from)


def mha_out_and_grads(module, x, kwargs, need_weights=False):
    out, weights = module(x, x, x, need_weights=need_weights, **kwargs)
    grads = torch.autograd.grad(out.square().sum() + (0 if weights is None else weights.sum()),
                                [x, *module.parameters()])
    return out, weights, grads


@pytest.mark.parametrize("case", MASKS)
def test_multihead_attention_with_masks_has_no_graph_breaks(case):
    _, mha = twin_attention()
    x = torch.randn(3, 7, EMBED)
    explanation = torch._dynamo.explain(mha)(x, x, x, need_weights=False, **MASKS[case](3, 7))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("case", MASKS)
@pytest.mark.heavy  # a torch.compile per mask kind: ~25 s
def test_multihead_attention_with_masks_compiles_once_for_new_lengths(case, need_weights):
    """fullgraph=True, dynamic=True: batches of other sizes and lengths reuse the one graph;
    outputs, weights and gradients equal eager mode's exactly (the operator runs the same code)
    and torch's own layer's."""
    torch_mha, mha = twin_attention(add_bias_kv=case == "causal and padding")
    compiled = torch.compile(mha, backend="aot_eager", fullgraph=True, dynamic=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for N, L in ((3, 7), (2, 9), (5, 11)):
            x = torch.randn(N, L, EMBED, requires_grad=True)
            kwargs = MASKS[case](N, L)
            out, weights, grads = mha_out_and_grads(compiled, x, kwargs, need_weights)
            eager = mha_out_and_grads(mha, x, kwargs, need_weights)
            torch.testing.assert_close(out, eager[0], rtol=0, atol=0)
            torch.testing.assert_close(weights, eager[1], rtol=0, atol=0)
            for g, ref_g in zip(grads, eager[2], strict=True):
                torch.testing.assert_close(g, ref_g, rtol=0, atol=0)
            ref_out, ref_weights, ref_grads = mha_out_and_grads(torch_mha, x, kwargs,
                                                                need_weights)
            torch.testing.assert_close(out, ref_out)
            torch.testing.assert_close(weights, ref_weights)
            for g, ref_g in zip(grads, ref_grads, strict=True):
                torch.testing.assert_close(g, ref_g)
    assert_compiled_graphs(1)


def test_float_attn_mask_gets_its_gradient_compiled():
    torch_mha, mha = twin_attention()
    compiled = torch.compile(mha, backend="aot_eager", fullgraph=True, dynamic=True)
    x = torch.randn(2, 6, EMBED)
    bias = torch.randn(6, 6).masked_fill(torch.ones(6, 6, dtype=torch.bool).triu(2),
                                         float("-inf")).requires_grad_()
    grads = [torch.autograd.grad(m(x, x, x, attn_mask=bias)[0].square().sum(), bias)[0]
             for m in (compiled, mha, torch_mha)]
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)
    torch.testing.assert_close(grads[0], grads[2])


@pytest.mark.heavy  # torch.compile of an encoder: ~9 s
def test_transformer_encoder_with_padding_compiles_without_breaks():
    """TransformerEncoder hands its layers a float key_padding_mask."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(EMBED, MHA_HEADS, dim_feedforward=32, dropout=0.0,
                                       batch_first=True)
    encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    ours = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    for block in ours.layers:
        block.self_attn = gatattn.MultiheadAttention.from_torch(block.self_attn)
    compiled = torch.compile(ours, backend="aot_eager", fullgraph=True, dynamic=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for N, L in ((3, 7), (4, 10)):
            x, mask = torch.randn(N, L, EMBED), padding_mask(N, L)
            torch.testing.assert_close(compiled(x, src_key_padding_mask=mask),
                                       encoder(x, src_key_padding_mask=mask))
    assert_compiled_graphs(1)


def test_multihead_attention_dropout_equals_eager_under_its_seed():
    """In training, dropout runs inside the operator under a seed drawn in the graph: under
    the same seed the compiled layer equals eager mode (output, dropped weights, gradients);
    each dropped weight is 0 or torch's undropped weight / (1 - p); each call draws a new
    mask."""
    p = 0.4
    torch_mha, mha = twin_attention(dropout=p)
    compiled = torch.compile(mha, backend="aot_eager", fullgraph=True, dynamic=True)
    for seed, (N, L) in enumerate(((3, 7), (2, 9))):
        x = torch.randn(N, L, EMBED, requires_grad=True)
        kwargs = {"key_padding_mask": padding_mask(N, L), "average_attn_weights": False}
        torch.manual_seed(seed)
        out, weights, grads = mha_out_and_grads(compiled, x, kwargs, need_weights=True)
        torch.manual_seed(seed)
        with seeded(draw_seed(), x.device):
            eager = mha_out_and_grads(mha, x, kwargs, need_weights=True)
        assert torch.equal(out, eager[0]) and torch.equal(weights, eager[1])
        for g, ref_g in zip(grads, eager[2], strict=True):
            assert torch.equal(g, ref_g)
        _, undropped = torch_mha.eval()(x, x, x, **kwargs)
        kept = weights != 0
        torch.testing.assert_close(weights[kept], undropped[kept] / (1 - p))
        dropped = (undropped > 0) & ~kept
        assert 0.2 < dropped.sum() / (undropped > 0).sum() < 0.6  # about p of them
        _, again = compiled(x, x, x, **kwargs)
        assert not torch.equal(again, weights)
    assert_compiled_graphs(1)


def test_multihead_attention_refusals_hold_compiled():
    """What eager mode refuses after reading a mask, the operator refuses when it runs."""
    _, mha = twin_attention()
    compiled = torch.compile(mha, backend="aot_eager", fullgraph=True, dynamic=True)
    x = torch.randn(2, 5, EMBED)
    not_causal = torch.ones(5, 5, dtype=torch.bool).tril()  # True = masked: the opposite
    with pytest.raises(ValueError, match="is_causal=True but attn_mask is not the causal"):
        compiled(x, x, x, attn_mask=not_causal, is_causal=True)
    with pytest.raises(ValueError, match="may hold only 0"):
        compiled(x, x, x, key_padding_mask=torch.full((2, 5), 0.5))


def test_multihead_attention_operator_checks():
    """torch.library's own checks of gatattn::sequence_attention: schema, fake shapes,
    autograd registration."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 5, 8, requires_grad=True) for _ in range(3))
    for kpm, mask, need_weights in ((padding_mask(2, 5), None, False),
                                    (None, torch.randn(5, 5, requires_grad=True), True),
                                    (padding_mask(2, 5, True), causal_mask(5), True)):
        torch.library.opcheck(sequence_attention,
                              (q, k, v, kpm, mask, False, 2, need_weights, 0.0, None))


def test_multihead_attention_second_derivatives_are_refused_not_wrong():
    """The operator called as a compiled graph or an exported program calls it."""
    q, k, v = (torch.randn(2, 5, 8, requires_grad=True) for _ in range(3))
    out, _ = sequence_attention(q, k, v, padding_mask(2, 5), None, False, 2, False, 0.0, None)
    (dq,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="second derivatives are not available"):
        torch.autograd.grad(dq.sum(), v)


def gps_layer(attn_dropout):
    from torch_geometric.nn import GINConv

    torch.manual_seed(0)
    return gatattn.GPSConv(EMBED, GINConv(nn.Linear(EMBED, EMBED)), heads=MHA_HEADS,
                           attn_kwargs={"dropout": attn_dropout}).train()


def gps_inputs(sizes, seed):
    gen = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    x = torch.randn(n, EMBED, generator=gen, requires_grad=True)
    edge_index = torch.randint(n, (2, 3 * n), generator=gen)
    return x, edge_index, batch_from_sizes(sizes)


def test_gps_with_attention_dropout_has_no_graph_breaks():
    x, edge_index, batch = gps_inputs(SIZES[0], 0)
    explanation = torch._dynamo.explain(gps_layer(0.5))(x, edge_index, batch)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.heavy  # torch.compile of a GPS block: ~8 s
def test_gps_with_attention_dropout_compiles_once_and_equals_eager_under_its_seed():
    layer = gps_layer(0.5)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True, dynamic=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for seed, sizes in enumerate(SIZES[:4]):
            x, edge_index, batch = gps_inputs(sizes, seed)
            torch.manual_seed(seed)
            out = compiled(x, edge_index, batch)
            grads = torch.autograd.grad(out.square().sum(), [x, *layer.parameters()])
            torch.manual_seed(seed)
            with seeded(draw_seed(), x.device):
                ref = layer(x, edge_index, batch)
            ref_grads = torch.autograd.grad(ref.square().sum(), [x, *layer.parameters()])
            assert torch.equal(out, ref)
            for g, ref_g in zip(grads, ref_grads, strict=True):
                assert torch.equal(g, ref_g)
            assert not torch.equal(compiled(x, edge_index, batch), out)  # a new mask
    assert_compiled_graphs(1)
