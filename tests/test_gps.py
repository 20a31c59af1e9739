"""gatattn.GPSConv as a drop-in for PyG's GPSConv: PyG's own checks, ported, and equality.

Each check of a shared behaviour runs on both classes (ids ``pyg`` and ``gatattn``), so a check
that does not hold for PyG's ``GPSConv`` here shows up as invalid rather than as a gap in ours.
Source of the ported checks, in PyG's repository: ``test/nn/conv/test_gps_conv.py``. Where we
differ on purpose (an unsorted batch vector, a replaced ``attn``), PyG's variant is a strict
xfail that names the reason.

Checks that compare the two classes give ours the weights of a PyG ``GPSConv`` built with the
same arguments (``load_state_dict``). Forward outputs use PyG's tolerance, ``atol=1e-6`` in
float32; gradients, whose sums grow with the graph, use the project's floors (conftest).
"""

import pytest
import torch
from torch_geometric.nn import GINConv, GINEConv, SAGEConv
from torch_geometric.nn import GPSConv as PyGGPSConv
from torch_geometric.typing import WITH_TORCH_SPARSE, SparseTensor
from torch_geometric.utils import to_torch_csc_tensor

import gatattn
from gatattn.gps import GPSConv
from tests.conftest import assert_close
from tests.test_host_syncs import count_host_reads

ATOL = 1e-6  # PyG's tolerance in test_gps_conv.py

requires_torch_sparse = pytest.mark.skipif(
    not WITH_TORCH_SPARSE, reason="torch_sparse is not installed: no SparseTensor to pass")

# PyG's test graph: two graphs of two nodes, each an undirected edge.
PYG_EDGE_INDEX = torch.tensor([[0, 1, 2, 3], [1, 0, 3, 2]])
PYG_BATCH = torch.tensor([0, 0, 1, 1])


@pytest.fixture(params=[PyGGPSConv, GPSConv], ids=["pyg", "gatattn"])
def GPS(request):
    """The layer class under test: PyG's own, then gatattn's."""
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(12345)


def graph_batch(sizes, channels, dtype=torch.float32, seed=0):
    """Node features, a ring inside each graph (both directions) and the sorted batch vector."""
    gen = torch.Generator().manual_seed(seed)
    batch = torch.arange(len(sizes)).repeat_interleave(torch.tensor(sizes, dtype=torch.long))
    edges, start = [], 0
    for n in sizes:
        if n > 1:
            nodes = torch.arange(start, start + n)
            ring = torch.stack([nodes, nodes.roll(-1)])
            edges += [ring, ring.flip(0)]
        start += n
    edge_index = torch.cat(edges, 1) if edges else torch.empty(2, 0, dtype=torch.long)
    x = torch.randn(batch.numel(), channels, generator=gen).to(dtype)
    return x, edge_index, batch


def twin(GPS, channels, make_conv, dtype=torch.float32, **kwargs):
    """``(reference, layer)``: a PyG GPSConv and a ``GPS`` built alike, ``layer`` holding the
    reference's weights."""
    reference = PyGGPSConv(channels, make_conv(), **kwargs).to(dtype)
    layer = GPS(channels, make_conv(), **kwargs).to(dtype)
    layer.load_state_dict(reference.state_dict())
    return reference, layer


def forward_and_grads(layer, x, *args, **kwargs):
    x = x.detach().requires_grad_()
    out = layer(x, *args, **kwargs)
    gen = torch.Generator().manual_seed(7)
    upstream = torch.randn(out.shape, generator=gen).to(out.dtype)
    params = [p for p in layer.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out, [x, *params], upstream, allow_unused=True)
    names = ["x", *(n for n, p in layer.named_parameters() if p.requires_grad)]
    return out, dict(zip(names, grads, strict=True))


def assert_same(reference_result, result):
    (ref_out, ref_grads), (out, grads) = reference_result, result
    if out.dtype == torch.float32:
        err = (out - ref_out).abs().max().item() if out.numel() else 0.0
        print(f"out: max error {err:.3e}")
        assert torch.allclose(out, ref_out, atol=ATOL), f"out differs by {err:.3e}"
    else:
        assert_close("out", out, ref_out)
    assert ref_grads.keys() == grads.keys()
    for name, ref_grad in ref_grads.items():
        if ref_grad is None:
            assert grads[name] is None, name
        else:
            assert_close(f"d{name}", grads[name], ref_grad)


# --- PyG's test_gps_conv.py, ported ---


@pytest.mark.parametrize("attn_type", ["multihead", "performer"])
@pytest.mark.parametrize("norm", [None, "batch_norm", "layer_norm"])
def test_gps_conv(GPS, norm, attn_type):
    x = torch.randn(4, 16)
    adj1 = to_torch_csc_tensor(PYG_EDGE_INDEX, size=(4, 4))

    conv = GPS(16, conv=SAGEConv(16, 16), heads=4, norm=norm, attn_type=attn_type)
    conv.reset_parameters()
    assert str(conv) == (f"GPSConv(16, conv=SAGEConv(16, 16, aggr=mean), heads=4, "
                         f"attn_type={attn_type})")

    out = conv(x, PYG_EDGE_INDEX)
    assert out.size() == (4, 16)
    assert torch.allclose(conv(x, adj1.t()), out, atol=ATOL)

    out = conv(x, PYG_EDGE_INDEX, PYG_BATCH)
    assert out.size() == (4, 16)
    assert torch.allclose(conv(x, adj1.t(), PYG_BATCH), out, atol=ATOL)


@requires_torch_sparse
def test_gps_conv_sparse_tensor(GPS):
    x = torch.randn(4, 16)
    adj2 = SparseTensor.from_edge_index(PYG_EDGE_INDEX, sparse_sizes=(4, 4))
    conv = GPS(16, conv=SAGEConv(16, 16), heads=4)
    out = conv(x, PYG_EDGE_INDEX)
    assert torch.allclose(conv(x, adj2.t()), out, atol=ATOL)
    out = conv(x, PYG_EDGE_INDEX, PYG_BATCH)
    assert torch.allclose(conv(x, adj2.t(), PYG_BATCH), out, atol=ATOL)


def test_unknown_attn_type_is_refused(GPS):
    with pytest.raises(ValueError, match="bigbird is not supported"):
        GPS(16, conv=None, heads=4, attn_type="bigbird")


# --- the same function as PyG's GPSConv: outputs and every gradient, same weights ---

SIZES = [1, 7, 3, 12, 5, 9]


CONFIGS = [(heads, dtype) for heads in (1, 4) for dtype in (torch.float32, torch.float64)
           if heads == 4 or dtype == torch.float32]  # float64 with 4 heads only: time


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("norm", [None, "batch_norm", "layer_norm", "graph_norm"])
@pytest.mark.parametrize("heads, dtype", CONFIGS, ids=lambda v: str(v).replace("torch.", ""))
def test_same_outputs_and_gradients_as_pyg(GPS, heads, norm, training, dtype):
    x, edge_index, batch = graph_batch(SIZES, 16, dtype)
    reference, layer = twin(GPS, 16, lambda: SAGEConv(16, 16), dtype, heads=heads, norm=norm,
                            attn_kwargs={"dropout": 0.3})  # attention dropout: eval only
    attn_dropout = 0.3 if not training else 0.0
    for module in (reference, layer):
        module.train(training)
        module.attn.dropout = attn_dropout
    assert_same(forward_and_grads(reference, x, edge_index, batch),
                forward_and_grads(layer, x, edge_index, batch))


def test_kwargs_reach_the_local_conv(GPS):
    """``GINEConv`` takes ``edge_attr`` through ``forward(**kwargs)``."""
    x, edge_index, batch = graph_batch(SIZES, 16)
    edge_attr = torch.randn(edge_index.size(1), 4)

    def gine():
        mlp = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16))
        return GINEConv(mlp, edge_dim=4)

    reference, layer = twin(GPS, 16, gine, heads=4)
    assert_same(forward_and_grads(reference, x, edge_index, batch, edge_attr=edge_attr),
                forward_and_grads(layer, x, edge_index, batch, edge_attr=edge_attr))


def test_without_local_conv(GPS):
    x, edge_index, batch = graph_batch(SIZES, 16)
    reference, layer = twin(GPS, 16, lambda: None, heads=2)
    assert_same(forward_and_grads(reference, x, edge_index, batch),
                forward_and_grads(layer, x, edge_index, batch))


def test_performer_as_pyg(GPS):
    x, edge_index, batch = graph_batch(SIZES, 16)
    reference, layer = twin(GPS, 16, lambda: SAGEConv(16, 16), heads=4, attn_type="performer")
    assert_same(forward_and_grads(reference, x, edge_index, batch),
                forward_and_grads(layer, x, edge_index, batch))


def test_one_graph_without_batch(GPS):
    x, edge_index, batch = graph_batch([11], 16)
    reference, layer = twin(GPS, 16, lambda: SAGEConv(16, 16), heads=4, norm="layer_norm")
    result = forward_and_grads(layer, x, edge_index)
    assert_same(forward_and_grads(reference, x, edge_index), result)
    assert_same(result, forward_and_grads(layer, x, edge_index, batch))


def test_bias_free_attention(GPS):
    x, edge_index, batch = graph_batch(SIZES, 16)
    reference, layer = twin(GPS, 16, lambda: SAGEConv(16, 16), heads=4,
                            attn_kwargs={"bias": False})
    assert layer.attn.in_proj_bias is None
    assert_same(forward_and_grads(reference, x, edge_index, batch),
                forward_and_grads(layer, x, edge_index, batch))


def test_graph_without_nodes_in_the_batch(GPS):
    """Graph id 1 has no node (as after filtering a batch): its neighbours are unaffected."""
    x, edge_index, batch = graph_batch([4, 3], 16)
    batch = torch.where(batch == 1, 2, batch)
    reference, layer = twin(GPS, 16, lambda: SAGEConv(16, 16), heads=4, norm="layer_norm")
    result = forward_and_grads(layer, x, edge_index, batch)
    assert_same(forward_and_grads(reference, x, edge_index, batch), result)
    assert all(torch.isfinite(g).all() for g in result[1].values() if g is not None)


@pytest.mark.parametrize("GPS", [
    pytest.param(PyGGPSConv, id="pyg", marks=pytest.mark.xfail(
        strict=True, reason="PyG's padded attention fails on a batch without nodes")),
    pytest.param(GPSConv, id="gatattn")])
@pytest.mark.parametrize("with_batch", [False, True], ids=["batch=None", "empty batch"])
@pytest.mark.parametrize("norm", [None, "batch_norm"])
def test_no_nodes_at_all(GPS, with_batch, norm):
    x, edge_index, batch = graph_batch([], 16)
    x.requires_grad_()
    layer = GPS(16, SAGEConv(16, 16), heads=4, norm=norm)
    out = layer(x, edge_index, batch if with_batch else None)
    assert out.shape == (0, 16)
    out.sum().backward()
    assert x.grad.shape == (0, 16)


# --- state_dict, reset_parameters ---


def test_state_dict_round_trip():
    reference = PyGGPSConv(16, SAGEConv(16, 16), heads=4, norm="batch_norm")
    layer = GPSConv(16, SAGEConv(16, 16), heads=4, norm="batch_norm")
    assert reference.state_dict().keys() == layer.state_dict().keys()
    layer.load_state_dict(reference.state_dict())
    back = PyGGPSConv(16, SAGEConv(16, 16), heads=4, norm="batch_norm")
    back.load_state_dict(layer.state_dict())
    for name, value in reference.state_dict().items():
        assert torch.equal(back.state_dict()[name], value), name


def test_reset_parameters_redraws_every_part(GPS):
    """As PyG: the local conv, the attention's input projection and the MLP are redrawn
    (``nn.MultiheadAttention._reset_parameters`` zeroes ``out_proj.bias`` but keeps its
    weight)."""
    layer = GPS(16, SAGEConv(16, 16), heads=4, norm="layer_norm")
    with torch.no_grad():
        layer.attn.out_proj.bias.fill_(1.0)
    before = {n: p.detach().clone() for n, p in layer.named_parameters()}
    layer.reset_parameters()
    for part in ("conv.lin_l.weight", "attn.in_proj_weight", "mlp.0.weight", "mlp.3.weight"):
        assert not torch.equal(before[part], layer.get_parameter(part)), part
    assert (layer.attn.out_proj.bias == 0).all()


# --- attention dropout ---


def attention_only(GPS, attn_dropout):
    """A layer in training mode whose output is ``x + attention(x)``: no local conv, no norm, no
    dropout elsewhere, the MLP's last linear zeroed (so the output is linear in the attention
    weights)."""
    layer = GPS(16, None, heads=4, norm=None, attn_kwargs={"dropout": attn_dropout})
    torch.nn.init.zeros_(layer.mlp[-2].weight)
    torch.nn.init.zeros_(layer.mlp[-2].bias)
    return layer.train()


def test_attention_dropout_is_applied_in_training(GPS):
    x, edge_index, batch = graph_batch(SIZES, 16)
    layer = attention_only(GPS, 0.5)
    torch.manual_seed(0)
    first = layer(x, edge_index, batch)
    torch.manual_seed(0)
    assert torch.equal(layer(x, edge_index, batch), first)  # seeded: reproducible
    assert not torch.allclose(layer(x, edge_index, batch), first)  # another mask
    layer.attn.eval()  # attention dropout off, the rest unchanged
    assert not torch.allclose(layer(x, edge_index, batch), first)


def test_attention_dropout_is_unbiased(GPS):
    """Dropout on the attention weights, rescaled by 1 / (1 - p): the mean of the attention
    term over many masks is its dropout-free value, within 5 standard errors everywhere, while
    one sample is far from it."""
    x, edge_index, batch = graph_batch(SIZES, 16)
    layer = attention_only(GPS, 0.5)
    with torch.no_grad():
        samples = torch.stack([layer(x, edge_index, batch) - x for _ in range(200)])
        layer.attn.eval()
        expected = layer(x, edge_index, batch) - x
    standard_error = samples.std(0) / len(samples) ** 0.5
    assert ((samples.mean(0) - expected).abs() <= 5 * standard_error + 1e-6).all()
    assert (samples[0] - expected).abs().max() > 0.5 * expected.abs().max()


# --- where gatattn differs on purpose ---


@pytest.mark.parametrize("GPS", [
    pytest.param(PyGGPSConv, id="pyg", marks=pytest.mark.xfail(
        strict=True, reason="PyG pads with to_dense_batch, which assumes a sorted batch vector")),
    pytest.param(GPSConv, id="gatattn")])
@pytest.mark.parametrize("attn_type", ["multihead", "performer"])
def test_unsorted_batch_is_a_permutation(GPS, attn_type):
    """Shuffling the nodes of a batch (batch vector, features and edges alike) shuffles the
    output the same way."""
    x, edge_index, batch = graph_batch(SIZES, 16)
    layer = GPS(16, SAGEConv(16, 16), heads=4, norm="layer_norm", attn_type=attn_type)
    perm = torch.randperm(x.size(0), generator=torch.Generator().manual_seed(3))
    new_position = torch.empty_like(perm)
    new_position[perm] = torch.arange(perm.numel())
    out = layer(x, edge_index, batch)
    shuffled = layer(x[perm], new_position[edge_index], batch[perm])
    assert torch.allclose(shuffled, out[perm], atol=ATOL)


@pytest.mark.parametrize("GPS", [
    pytest.param(PyGGPSConv, id="pyg", marks=pytest.mark.xfail(
        strict=True, reason="PyG skips the global attention when attn is another module")),
    pytest.param(GPSConv, id="gatattn")])
def test_replaced_attention_module_is_refused(GPS):
    x, edge_index, batch = graph_batch(SIZES, 16)
    layer = GPS(16, SAGEConv(16, 16), heads=4)
    layer.attn = torch.nn.Identity()
    with pytest.raises(TypeError, match="nn.MultiheadAttention or a PerformerAttention"):
        layer(x, edge_index, batch)


@pytest.mark.parametrize("attn_kwargs, match", [
    ({"add_bias_kv": True}, "add_bias_kv"),
    ({"add_zero_attn": True}, "add_zero_attn"),
    ({"kdim": 8, "vdim": 8}, "kdim=8, vdim=8"),
])
def test_gatattn_refuses_keys_that_are_not_nodes(attn_kwargs, match):
    with pytest.raises(ValueError, match=match):
        GPSConv(16, SAGEConv(16, 16), heads=4, attn_kwargs=attn_kwargs)


# --- the graph as an object: built once per batch, passed to every layer ---


def _shuffled_batch(sizes):
    """Features, ring edges and an unsorted batch vector (the nodes of ``graph_batch``
    shuffled)."""
    x, edge_index, batch = graph_batch(sizes, 16)
    perm = torch.randperm(x.size(0), generator=torch.Generator().manual_seed(3))
    new_position = torch.empty_like(perm)
    new_position[perm] = torch.arange(perm.numel())
    return x[perm], new_position[edge_index], batch[perm]


@pytest.mark.parametrize("built_from", ["batch", "unsorted batch", "ptr"])
@pytest.mark.parametrize("norm", ["batch_norm", "graph_norm"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_graph_equals_the_batch_form(built_from, norm, training):
    """``conv(x, edge_index, batch, graph=g)`` and ``conv(x, edge_index, graph=g)`` (the
    norms then take the graph's ids: ``graph_norm`` reads them) compute
    ``conv(x, edge_index, batch)``, bit for bit, output and every gradient."""
    if built_from == "unsorted batch":
        x, edge_index, batch = _shuffled_batch(SIZES)
    else:
        x, edge_index, batch = graph_batch(SIZES, 16)
    if built_from == "ptr":
        graph = gatattn.build_graph(ptr=torch.tensor([0, *SIZES]).cumsum(0))
    else:
        graph = gatattn.build_graph(batch=batch)
    _, layer = twin(GPSConv, 16, lambda: SAGEConv(16, 16), heads=4, norm=norm)
    layer.train(training)
    expected = forward_and_grads(layer, x, edge_index, batch)
    for args in ((edge_index, batch), (edge_index,)):
        (out, grads), (expected_out, expected_grads) = (
            forward_and_grads(layer, x, *args, graph=graph), expected)
        torch.testing.assert_close(out, expected_out, rtol=0, atol=0)
        assert grads.keys() == expected_grads.keys()
        for name, grad in expected_grads.items():
            torch.testing.assert_close(grads[name], grad, rtol=0, atol=0, msg=name)


def test_graph_is_shared_by_layers_and_kwargs_still_reach_the_local_conv():
    """A model of two layers over one graph, the local convs taking ``edge_attr``."""
    x, edge_index, batch = _shuffled_batch(SIZES)
    edge_attr = torch.randn(edge_index.size(1), 4)

    def gine():
        mlp = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16))
        return GINEConv(mlp, edge_dim=4)

    layers = [twin(GPSConv, 16, gine, heads=4)[1] for _ in range(2)]
    graph = gatattn.build_graph(batch=batch)
    by_graph = by_batch = x
    for layer in layers:
        by_graph = layer(by_graph, edge_index, batch, graph=graph, edge_attr=edge_attr)
        by_batch = layer(by_batch, edge_index, batch, edge_attr=edge_attr)
    torch.testing.assert_close(by_graph, by_batch, rtol=0, atol=0)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_graph_calls_read_nothing_on_the_host(monkeypatch, training):
    """With ``graph=`` a layer call reads nothing on the host, forward and backward, with
    attention dropout in training; without it the call describes the graph from ``batch``
    with at most one read."""
    x, edge_index, batch = _shuffled_batch(SIZES)
    x.requires_grad_()
    mlp = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16))
    layer = GPSConv(16, GINConv(mlp), heads=4, attn_kwargs={"dropout": 0.2}).train(training)
    graph = gatattn.build_graph(batch=batch)
    for _ in range(2):  # the first call derives nothing either
        with count_host_reads(monkeypatch) as reads:
            layer(x, edge_index, batch, graph=graph).sum().backward()
        assert reads.count == 0, f"{reads.count} host reads with graph="
        with count_host_reads(monkeypatch) as reads:
            layer(x, edge_index, batch).sum().backward()
        assert reads.count <= 1, f"{reads.count} host reads with batch="


def test_bad_graphs_are_refused():
    x, edge_index, batch = graph_batch(SIZES, 16)
    graph = gatattn.build_graph(batch=batch)
    layer = GPSConv(16, SAGEConv(16, 16), heads=4)
    with pytest.raises(ValueError, match=r"the graph has 37 targets and 37 sources, but q has 36"):
        layer(x[:36], edge_index[:, :10], graph=graph)
    with pytest.raises(TypeError, match="graph must be a gatattn.AttentionGraph"):
        layer(x, edge_index, batch, graph={"batch": batch})
    performer = GPSConv(16, SAGEConv(16, 16), heads=4, attn_type="performer")
    with pytest.raises(ValueError, match="attn_type='performer' pads the batch"):
        performer(x, edge_index, batch, graph=graph)
