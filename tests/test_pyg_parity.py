"""SelfAttentionConv as a drop-in for PyG's TransformerConv: PyG's own checks, ported.

Each check of a shared behaviour runs on both classes (ids ``pyg`` and ``gatattn``), so a check
that does not hold for ``TransformerConv`` in this environment shows up as invalid rather than
as a gap in ``SelfAttentionConv``. Sources of the ported checks, in PyG's repository:
``test/nn/conv/test_transformer_conv.py`` (all of it), the attention-weight parts of
``test/nn/conv/test_gat_conv.py``, hooks and edge masks in ``test/nn/conv/test_message_passing.py``,
and ``test/explain/algorithm/test_{attention,gnn}_explainer.py``.

A few checks concern what only gatattn has (the implicit complete graph, ``from_transformer_conv``,
the TorchScript refusal); they run on ``SelfAttentionConv`` alone and say so in their names.
Checks that compare the two classes give the layer under test the weights of a
``TransformerConv`` built with the same arguments (``load_state_dict``); the tolerance is PyG's,
``atol=1e-6``.
"""

import inspect

import pytest
import torch
import torch_geometric.transforms as T
from torch import Tensor
from torch_geometric import EdgeIndex
from torch_geometric.data import Data
from torch_geometric.explain import AttentionExplainer, Explainer, GNNExplainer
from torch_geometric.explain.algorithm.utils import clear_masks, set_masks
from torch_geometric.explain.config import ModelConfig
from torch_geometric.nn import TransformerConv, global_add_pool
from torch_geometric.typing import WITH_TORCH_SPARSE, Adj, SparseTensor
from torch_geometric.utils import to_torch_csc_tensor, to_torch_csr_tensor

import gatattn.graph
from gatattn import GraphTooLargeError, SelfAttentionConv

ATOL = 1e-6  # PyG's tolerance in test_transformer_conv.py

requires_torch_sparse = pytest.mark.skipif(
    not WITH_TORCH_SPARSE, reason="torch_sparse is not installed: no SparseTensor to pass")

# PyG's test graph: 4 nodes, 4 edges sorted by target; as a bipartite graph, 4 sources -> 2
# targets.
PYG_EDGE_INDEX = torch.tensor([[0, 1, 2, 3], [0, 0, 1, 1]])

# 6 nodes, sorted by (target, source) but not by source, so that a CSC adjacency stores the edges
# in another order than edge_index; node 5 has no in-edge.
EDGE_INDEX = torch.tensor([[1, 3, 0, 2, 4, 0, 4, 1, 5],
                           [0, 0, 1, 1, 2, 3, 3, 4, 4]])
NUM_NODES = 6

# PyG's explain test graph: a chain of 8 nodes, both directions, 3 graphs in the batch.
EXPLAIN_EDGE_INDEX = torch.tensor([[0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7],
                                   [1, 0, 2, 1, 3, 2, 4, 3, 5, 4, 6, 5, 7, 6]])
EXPLAIN_BATCH = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
EXPLAIN_EDGE_LABEL_INDEX = torch.tensor([[0, 1, 2], [3, 4, 5]])


@pytest.fixture(params=[TransformerConv, SelfAttentionConv], ids=["pyg", "gatattn"])
def Conv(request):
    """The layer class under test: PyG's own, then gatattn's."""
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(12345)


@pytest.fixture
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def twin(Conv, *args, **kwargs):
    """``(reference, conv)``: a TransformerConv and a ``Conv`` built with the same arguments,
    ``conv`` holding the reference's weights."""
    reference = TransformerConv(*args, **kwargs)
    conv = Conv(*args, **kwargs)
    conv.load_state_dict(reference.state_dict())
    return reference, conv


def grads(loss, tensors):
    """Gradients of ``loss`` with respect to ``tensors``; zeros where unused."""
    result = torch.autograd.grad(loss, tensors, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(tensors, result, strict=True)]


def skip_if_invalid_on_pyg(Conv, reasons: dict, key):
    """Skip the ``pyg`` variant of a check known to fail on TransformerConv, with the reason."""
    if Conv is TransformerConv and key in reasons:
        pytest.skip(f"invalid on TransformerConv: {reasons[key]}")


class GNN(torch.nn.Module):
    """PyG's two-layer explain-test model, built from ``Conv``."""

    def __init__(self, Conv, model_config: ModelConfig, heads: int = 1):
        super().__init__()
        self.model_config = model_config
        out_channels = 7 if model_config.mode.value == "multiclass_classification" else 1
        self.conv1 = Conv(3, 16 // heads, heads=heads)
        self.conv2 = Conv(16, out_channels)

    def forward(self, x, edge_index, batch=None, edge_label_index=None):
        x = self.conv1(x, edge_index).relu()
        x = self.conv2(x, edge_index)
        if self.model_config.task_level.value == "graph":
            x = global_add_pool(x, batch)
        elif self.model_config.task_level.value == "edge":
            x = x[edge_label_index[0]] * x[edge_label_index[1]]
        return x


def attention_explainer(model):
    return Explainer(model=model, algorithm=AttentionExplainer(), explanation_type="model",
                     edge_mask_type="object",
                     model_config=dict(mode="multiclass_classification", task_level="node",
                                       return_type="raw"))


# Adjacency forms ------------------------------------------------------------------------------

ADJACENCY_FORMS = ["coo", "csr", "csc_t", "csc", "EdgeIndex", "SparseTensor"]

INVALID_ADJACENCY_ON_PYG = {
    "csc": "TransformerConv refuses an adj_t in the torch.sparse_csc layout "
           "(ValueError: Received invalid layout 'torch.sparse_csc')",
}


def adjacency(form: str, edge_index: Tensor, num_nodes: int):
    """``edge_index`` in another form PyG users pass: a torch.sparse ``adj_t`` (from
    ``T.ToSparseTensor(layout=...)``, or ``to_torch_csc_tensor(...).t()`` as in PyG's tests, or a
    CSC-layout adj_t), an EdgeIndex, or a SparseTensor ``adj_t``."""
    if form in ("coo", "csr"):
        layout = torch.sparse_coo if form == "coo" else torch.sparse_csr
        data = Data(edge_index=edge_index.clone(), num_nodes=num_nodes)
        return T.ToSparseTensor(layout=layout)(data).adj_t
    size = (num_nodes, num_nodes)
    if form == "csc_t":  # a CSR-layout adj_t, built as PyG's own tests build it
        return to_torch_csc_tensor(edge_index, size=size).t()
    if form == "csc":  # an adj_t in the CSC layout
        return to_torch_csr_tensor(edge_index, size=size).t()
    if form == "EdgeIndex":
        return EdgeIndex(edge_index, sparse_size=size, sort_order="col")
    if form == "SparseTensor":
        if not WITH_TORCH_SPARSE:
            pytest.skip("torch_sparse is not installed: no SparseTensor to pass")
        return SparseTensor.from_edge_index(edge_index, sparse_sizes=size).t()
    raise AssertionError(form)


def stored_edges(adj) -> Tensor:
    """The ``(2, E)`` source -> target edges of an adjacency in the order it stores them (the
    order of the edge_attr given with it and of the attention weights returned for it)."""
    def expand(ptr):
        return torch.repeat_interleave(torch.arange(ptr.numel() - 1), ptr.diff())

    if isinstance(adj, SparseTensor):
        target, source, _ = adj.coo()
    elif isinstance(adj, EdgeIndex):
        return adj.as_tensor()
    elif adj.layout == torch.sparse_coo:
        target, source = adj.coalesce().indices()
    elif adj.layout == torch.sparse_csr:
        target, source = expand(adj.crow_indices()), adj.col_indices()
    elif adj.layout == torch.sparse_csc:
        target, source = adj.row_indices(), expand(adj.ccol_indices())
    else:
        return adj
    return torch.stack([source, target])


def permutation(edge_index: Tensor, edges: Tensor) -> Tensor:
    """``perm`` with ``edge_index[:, perm] == edges`` (edges without duplicates)."""
    key = edge_index[1] * (edge_index.max() + 1) + edge_index[0]
    wanted = edges[1] * (edge_index.max() + 1) + edges[0]
    perm = (wanted[:, None] == key[None, :]).nonzero()[:, 1]
    assert torch.equal(edge_index[:, perm], edges)
    return perm


def run_on_adjacency(conv, form, x, edge_attr, **kwargs):
    """``conv`` on ``EDGE_INDEX`` in ``form``, with ``edge_attr`` put in the adjacency's order:
    ``(result, adj, perm)``."""
    adj = adjacency(form, EDGE_INDEX, NUM_NODES)
    perm = permutation(EDGE_INDEX, stored_edges(adj))
    result = conv(x, adj, None if edge_attr is None else edge_attr[perm], **kwargs)
    return result, adj, perm


# PyG's test_transformer_conv, ported --------------------------------------------------------

def pyg_inputs(edge_dim):
    x1, x2 = torch.randn(4, 8), torch.randn(2, 16)
    edge_attr = torch.randn(PYG_EDGE_INDEX.size(1), edge_dim) if edge_dim else None
    return x1, x2, edge_attr


def test_repr_uses_the_class_name(Conv):
    assert str(Conv(8, 32, 2, beta=True)) == f"{Conv.__name__}(8, 32, heads=2)"
    assert str(Conv((8, 16), 32, heads=2)) == f"{Conv.__name__}((8, 16), 32, heads=2)"


@pytest.mark.parametrize("concat", [True, False])
@pytest.mark.parametrize("edge_dim", [None, 8])
def test_output_size(Conv, concat, edge_dim):
    x1, _, edge_attr = pyg_inputs(edge_dim)
    conv = Conv(8, 32, 2, beta=True, edge_dim=edge_dim, concat=concat)
    out = conv(x1, PYG_EDGE_INDEX, edge_attr)
    assert out.size() == (4, 32 * (2 if concat else 1))
    assert conv._alpha is None


@pytest.mark.parametrize("concat", [True, False])
@pytest.mark.parametrize("edge_dim", [None, 8])
def test_torch_sparse_adj_t_equals_edge_index(Conv, concat, edge_dim):
    x1, _, edge_attr = pyg_inputs(edge_dim)
    conv = Conv(8, 32, 2, beta=True, edge_dim=edge_dim, concat=concat)
    adj_t = to_torch_csc_tensor(PYG_EDGE_INDEX, size=(4, 4)).t()
    out = conv(x1, PYG_EDGE_INDEX, edge_attr)
    assert torch.allclose(conv(x1, adj_t, edge_attr), out, atol=ATOL)


@requires_torch_sparse
@pytest.mark.parametrize("concat", [True, False])
@pytest.mark.parametrize("edge_dim", [None, 8])
def test_sparse_tensor_adj_t_equals_edge_index(Conv, concat, edge_dim):
    x1, _, edge_attr = pyg_inputs(edge_dim)
    conv = Conv(8, 32, 2, beta=True, edge_dim=edge_dim, concat=concat)
    adj_t = SparseTensor.from_edge_index(PYG_EDGE_INDEX, edge_attr, sparse_sizes=(4, 4)).t()
    out = conv(x1, PYG_EDGE_INDEX, edge_attr)
    assert torch.allclose(conv(x1, adj_t), out, atol=ATOL)

    result = conv(x1, adj_t, return_attention_weights=True)
    assert torch.allclose(result[0], out, atol=ATOL)
    assert result[1].sizes() == [4, 4, 2] and result[1].nnz() == 4
    assert conv._alpha is None


@pytest.mark.parametrize("concat", [True, False])
@pytest.mark.parametrize("edge_dim", [None, 8])
def test_return_attention_weights(Conv, concat, edge_dim):
    x1, _, edge_attr = pyg_inputs(edge_dim)
    conv = Conv(8, 32, 2, beta=True, edge_dim=edge_dim, concat=concat)
    out = conv(x1, PYG_EDGE_INDEX, edge_attr)
    result = conv(x1, PYG_EDGE_INDEX, edge_attr, return_attention_weights=True)
    assert torch.allclose(result[0], out)
    assert result[1][0].size() == (2, 4)
    assert result[1][1].size() == (4, 2)
    assert result[1][1].min() >= 0 and result[1][1].max() <= 1
    assert conv._alpha is None


@pytest.mark.parametrize("concat", [True, False])
@pytest.mark.parametrize("edge_dim", [None, 8])
def test_bipartite(Conv, concat, edge_dim):
    x1, x2, edge_attr = pyg_inputs(edge_dim)
    conv = Conv((8, 16), 32, heads=2, beta=True, edge_dim=edge_dim, concat=concat)
    out = conv((x1, x2), PYG_EDGE_INDEX, edge_attr)
    assert out.size() == (2, 32 * (2 if concat else 1))
    adj_t = to_torch_csc_tensor(PYG_EDGE_INDEX, size=(4, 2)).t()
    assert torch.allclose(conv((x1, x2), adj_t, edge_attr), out, atol=ATOL)


@requires_torch_sparse
@pytest.mark.parametrize("concat", [True, False])
@pytest.mark.parametrize("edge_dim", [None, 8])
def test_bipartite_sparse_tensor(Conv, concat, edge_dim):
    x1, x2, edge_attr = pyg_inputs(edge_dim)
    conv = Conv((8, 16), 32, heads=2, beta=True, edge_dim=edge_dim, concat=concat)
    out = conv((x1, x2), PYG_EDGE_INDEX, edge_attr)
    adj_t = SparseTensor.from_edge_index(PYG_EDGE_INDEX, edge_attr, sparse_sizes=(4, 2)).t()
    assert torch.allclose(conv((x1, x2), adj_t), out, atol=ATOL)


# TorchScript: PyG's checks (its tests run them in full-test mode only; they work here). gatattn
# refuses TorchScript by design (PyTorch deprecated it): its variant is an expected failure.
TORCHSCRIPT_LAYERS = [
    pytest.param(TransformerConv, id="pyg"),
    pytest.param(SelfAttentionConv, id="gatattn", marks=pytest.mark.xfail(
        raises=RuntimeError, strict=True,
        reason="TorchScript is refused by design (deprecated): see test_gatattn_torchscript_*")),
]


@pytest.mark.parametrize("Conv", TORCHSCRIPT_LAYERS)
@pytest.mark.parametrize("concat", [True, False])
@pytest.mark.parametrize("edge_dim", [None, 8])
def test_torchscript(Conv, concat, edge_dim):
    x1, x2, edge_attr = pyg_inputs(edge_dim)
    conv = Conv(8, 32, 2, beta=True, edge_dim=edge_dim, concat=concat)
    out = conv(x1, PYG_EDGE_INDEX, edge_attr)

    class Plain(torch.nn.Module):
        def __init__(self, conv):
            super().__init__()
            self.conv = conv

        def forward(self, x: Tensor, edge_index: Adj, edge_attr: Tensor | None = None) -> Tensor:
            return self.conv(x, edge_index, edge_attr)

    class WithWeights(torch.nn.Module):
        def __init__(self, conv):
            super().__init__()
            self.conv = conv

        def forward(self, x: Tensor, edge_index: Tensor, edge_attr: Tensor | None
                    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
            return self.conv(x, edge_index, edge_attr, return_attention_weights=True)

    class Bipartite(torch.nn.Module):
        def __init__(self, conv):
            super().__init__()
            self.conv = conv

        def forward(self, x: tuple[Tensor, Tensor], edge_index: Adj,
                    edge_attr: Tensor | None = None) -> Tensor:
            return self.conv(x, edge_index, edge_attr)

    scripted = torch.jit.script(Plain(conv))
    assert torch.allclose(scripted(x1, PYG_EDGE_INDEX, edge_attr), out)

    scripted = torch.jit.script(WithWeights(conv))
    result = scripted(x1, PYG_EDGE_INDEX, edge_attr)
    assert torch.allclose(result[0], out)
    assert result[1][0].size() == (2, 4) and result[1][1].size() == (4, 2)
    assert result[1][1].min() >= 0 and result[1][1].max() <= 1
    assert conv._alpha is None

    bipartite = Conv((8, 16), 32, heads=2, beta=True, edge_dim=edge_dim, concat=concat)
    out = bipartite((x1, x2), PYG_EDGE_INDEX, edge_attr)
    scripted = torch.jit.script(Bipartite(bipartite))
    assert torch.allclose(scripted((x1, x2), PYG_EDGE_INDEX, edge_attr), out)


# Every adjacency: output, attention weights in the input's layout, gradients -----------------

@pytest.mark.parametrize("form", ADJACENCY_FORMS)
def test_adjacency_output_equals_edge_index(Conv, form):
    skip_if_invalid_on_pyg(Conv, INVALID_ADJACENCY_ON_PYG, form)
    conv = Conv(8, 16, 2, edge_dim=4)
    x, edge_attr = torch.randn(NUM_NODES, 8), torch.randn(EDGE_INDEX.size(1), 4)
    expected = conv(x, EDGE_INDEX, edge_attr)
    out, _, _ = run_on_adjacency(conv, form, x, edge_attr)
    assert torch.allclose(out, expected, atol=ATOL)


@pytest.mark.parametrize("form", ADJACENCY_FORMS)
def test_adjacency_attention_weights_in_input_layout(Conv, form):
    skip_if_invalid_on_pyg(Conv, INVALID_ADJACENCY_ON_PYG, form)
    conv = Conv(8, 16, 2, edge_dim=4)
    x, edge_attr = torch.randn(NUM_NODES, 8), torch.randn(EDGE_INDEX.size(1), 4)
    expected_out, (_, expected_alpha) = conv(x, EDGE_INDEX, edge_attr,
                                             return_attention_weights=True)
    (out, weights), adj, perm = run_on_adjacency(conv, form, x, edge_attr,
                                                 return_attention_weights=True)
    assert torch.allclose(out, expected_out, atol=ATOL)
    if isinstance(adj, SparseTensor):
        assert isinstance(weights, SparseTensor)
        assert weights.sizes() == [NUM_NODES, NUM_NODES, 2]
        alpha = weights.storage.value()
    else:
        returned_adj, alpha = weights
        assert returned_adj is adj
    assert torch.allclose(alpha, expected_alpha[perm], atol=ATOL)
    assert conv._alpha is None


@pytest.mark.parametrize("form", ADJACENCY_FORMS)
def test_adjacency_gradients_equal_edge_index(Conv, form):
    skip_if_invalid_on_pyg(Conv, INVALID_ADJACENCY_ON_PYG, form)
    conv = Conv(8, 16, 2, beta=True, edge_dim=4)
    x = torch.randn(NUM_NODES, 8, requires_grad=True)
    edge_attr = torch.randn(EDGE_INDEX.size(1), 4, requires_grad=True)
    leaves = [x, edge_attr, *conv.parameters()]
    upstream = torch.randn(NUM_NODES, 32)

    expected = grads((conv(x, EDGE_INDEX, edge_attr) * upstream).sum(), leaves)
    out, _, _ = run_on_adjacency(conv, form, x, edge_attr)
    got = grads((out * upstream).sum(), leaves)
    for g, e in zip(got, expected, strict=True):
        assert torch.allclose(g, e, atol=ATOL)


# Constructor and call parity ------------------------------------------------------------------

def test_constructor_has_transformer_conv_positional_order_and_defaults(Conv):
    def described(cls):  # the parameters after self
        return list(inspect.signature(cls.__init__).parameters.values())[1:]

    expected = [(p.name, p.default, p.kind) for p in described(TransformerConv)[:9]]
    got = described(Conv)
    assert [(p.name, p.default, p.kind) for p in got[:9]] == expected
    # Anything further is keyword-only (or **kwargs for MessagePassing).
    assert all(p.kind in (p.KEYWORD_ONLY, p.VAR_KEYWORD) for p in got[9:])


def test_return_attention_weights_false_also_returns_the_tuple(Conv):
    conv = Conv(8, 16, 2)
    x = torch.randn(NUM_NODES, 8)
    out = conv(x, EDGE_INDEX)
    assert isinstance(out, Tensor)
    result = conv(x, EDGE_INDEX, return_attention_weights=False)
    assert isinstance(result, tuple) and len(result) == 2
    assert torch.allclose(result[0], out)
    edges, alpha = result[1]
    assert torch.equal(edges, EDGE_INDEX) and alpha.size() == (EDGE_INDEX.size(1), 2)


def test_attention_weights_are_differentiable(Conv):
    conv = Conv(8, 16, 2)
    _, (_, alpha) = conv(torch.randn(NUM_NODES, 8), EDGE_INDEX, return_attention_weights=True)
    assert alpha.requires_grad
    alpha.square().sum().backward()  # a loss on the weights (their plain sum is constant)
    for lin in (conv.lin_query, conv.lin_key):
        assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0


# Positional arguments: in_channels, out_channels, heads, concat, beta, dropout, edge_dim, bias,
# root_weight.
STATE_DICT_CONFIGS = {
    "defaults": (8, 16),
    "mean_heads": (8, 16, 2, False),
    "beta_edge_dim": (8, 16, 2, True, True, 0.0, 4),
    "bipartite_no_bias": ((8, 6), 16, 2, True, False, 0.0, None, False),
    "beta_no_root": (8, 16, 2, True, True, 0.0, None, True, False),
    "no_root_mean": (8, 16, 3, False, False, 0.0, 4, True, False),
}
WITH_ROOT = [name for name, args in STATE_DICT_CONFIGS.items() if len(args) < 9 or args[8]]


def inputs_for(args):
    in_channels, edge_dim = args[0], args[6] if len(args) > 6 else None
    in_src, in_dst = (in_channels, in_channels) if isinstance(in_channels, int) else in_channels
    x = torch.randn(NUM_NODES, in_src)
    if in_src != in_dst:
        x = (x, torch.randn(NUM_NODES, in_dst))
    edge_attr = torch.randn(EDGE_INDEX.size(1), edge_dim) if edge_dim else None
    return x, EDGE_INDEX, edge_attr


@pytest.mark.parametrize("config", list(STATE_DICT_CONFIGS))
def test_transformer_conv_state_dict_loads(Conv, config):
    args = STATE_DICT_CONFIGS[config]
    reference = TransformerConv(*args)
    conv = Conv(*args)
    conv.load_state_dict(reference.state_dict())
    inputs = inputs_for(args)
    assert torch.allclose(conv(*inputs), reference(*inputs), atol=ATOL)


@pytest.mark.parametrize("config", WITH_ROOT)
def test_state_dict_loads_into_transformer_conv(Conv, config):
    args = STATE_DICT_CONFIGS[config]
    conv = Conv(*args)
    reference = TransformerConv(*args)
    reference.load_state_dict(conv.state_dict())
    inputs = inputs_for(args)
    assert torch.allclose(reference(*inputs), conv(*inputs), atol=ATOL)


def test_beta_without_root_weight_behaves_as_transformer_conv(Conv):
    reference, conv = twin(Conv, 8, 16, 2, beta=True, root_weight=False)
    assert conv.beta is False and conv.lin_beta is None
    x = torch.randn(NUM_NODES, 8)
    assert torch.allclose(conv(x, EDGE_INDEX), reference(x, EDGE_INDEX), atol=ATOL)


MESSAGE_PASSING_OPTIONS = {
    "aggr_mean": dict(aggr="mean"),
    "aggr_max": dict(aggr="max"),
    "target_to_source": dict(flow="target_to_source"),
}


@pytest.mark.parametrize("option", list(MESSAGE_PASSING_OPTIONS))
def test_aggr_and_flow_behave_as_transformer_conv(Conv, option):
    reference, conv = twin(Conv, 8, 16, 2, edge_dim=4, **MESSAGE_PASSING_OPTIONS[option])
    x, edge_attr = torch.randn(NUM_NODES, 8), torch.randn(EDGE_INDEX.size(1), 4)
    expected, (expected_edges, expected_alpha) = reference(x, EDGE_INDEX, edge_attr,
                                                           return_attention_weights=True)
    out, (edges, alpha) = conv(x, EDGE_INDEX, edge_attr, return_attention_weights=True)
    assert torch.allclose(out, expected, atol=ATOL)
    assert torch.equal(edges, expected_edges)
    assert torch.allclose(alpha, expected_alpha, atol=ATOL)


# PyG's message-passing machinery: hooks, explain mode, edge masks -----------------------------

def test_message_hooks_are_called(Conv):
    conv = Conv(8, 16, 2)
    calls = []

    def pre_hook(module, inputs):
        calls.append(("pre", sorted(inputs[0])))

    def hook(module, inputs, output):
        calls.append(("post", tuple(output.shape)))

    conv.register_message_forward_pre_hook(pre_hook)
    conv.register_message_forward_hook(hook)
    conv(torch.randn(NUM_NODES, 8), EDGE_INDEX)
    assert [name for name, _ in calls] == ["pre", "post"]
    assert {"query_i", "key_j", "value_j"} <= set(calls[0][1])
    assert calls[1][1] == (EDGE_INDEX.size(1), 2, 16)


def test_propagate_and_aggregate_hooks_are_called(Conv):
    conv = Conv(8, 16, 2)
    calls = []
    conv.register_propagate_forward_pre_hook(lambda m, inputs: calls.append("propagate_pre"))
    conv.register_propagate_forward_hook(lambda m, inputs, out: calls.append("propagate"))
    conv.register_aggregate_forward_pre_hook(lambda m, inputs: calls.append("aggregate_pre"))
    conv.register_aggregate_forward_hook(lambda m, inputs, out: calls.append("aggregate"))
    conv(torch.randn(NUM_NODES, 8), EDGE_INDEX)
    assert sorted(calls) == sorted(["propagate_pre", "propagate", "aggregate_pre", "aggregate"])


def test_message_hook_can_change_the_messages(Conv):
    conv = Conv(8, 16, 2)
    x = torch.randn(NUM_NODES, 8)
    before = conv(x, EDGE_INDEX)
    conv.register_message_forward_hook(lambda module, inputs, output: output + 1.0)
    after = conv(x, EDGE_INDEX)
    assert not torch.allclose(before, after, atol=ATOL)


def test_message_hook_sees_alpha_and_it_is_cleared_after(Conv):
    """What AttentionExplainer relies on: ``module._alpha`` is set when message() has run."""
    conv = Conv(8, 16, 2)
    seen = []
    conv.register_message_forward_hook(
        lambda module, inputs, output: seen.append(module._alpha))
    conv(torch.randn(NUM_NODES, 8), EDGE_INDEX)
    assert len(seen) == 1 and seen[0] is not None
    assert seen[0].size() == (EDGE_INDEX.size(1), 2)
    assert conv._alpha is None


def test_explain_mode_without_edge_mask_raises(Conv):
    conv = Conv(8, 16, 2)
    conv.explain = True
    with pytest.raises(ValueError, match="pre-defined 'edge_mask'"):
        conv(torch.randn(NUM_NODES, 8), EDGE_INDEX)


def test_zero_edge_mask_leaves_the_root_term(Conv):
    conv = Conv(8, 16, 2)
    x = torch.randn(NUM_NODES, 8)
    set_masks(conv, torch.zeros(EDGE_INDEX.size(1)), EDGE_INDEX, apply_sigmoid=False)
    out = conv(x, EDGE_INDEX)
    clear_masks(conv)
    assert torch.allclose(out, conv.lin_skip(x), atol=ATOL)


def test_unit_edge_mask_keeps_the_output(Conv):
    conv = Conv(8, 16, 2)
    x = torch.randn(NUM_NODES, 8)
    expected = conv(x, EDGE_INDEX)
    set_masks(conv, torch.ones(EDGE_INDEX.size(1)), EDGE_INDEX, apply_sigmoid=False)
    out = conv(x, EDGE_INDEX)
    clear_masks(conv)
    assert torch.allclose(out, expected, atol=ATOL)


def test_edge_mask_receives_gradients(Conv):
    model = GNN(Conv, ModelConfig(mode="regression", task_level="node", return_type="raw"))
    x = torch.randn(8, 3)
    mask = torch.nn.Parameter(torch.randn(EXPLAIN_EDGE_INDEX.size(1)))
    set_masks(model, mask, EXPLAIN_EDGE_INDEX, apply_sigmoid=True)
    out = model(x, EXPLAIN_EDGE_INDEX)
    (out * torch.randn_like(out)).sum().backward()
    clear_masks(model)
    assert mask.grad is not None
    assert bool((mask.grad != 0).all())


# Explainers -----------------------------------------------------------------------------------

@pytest.mark.parametrize("index", [None, 2, torch.arange(3)], ids=["all", "one", "three"])
def test_attention_explainer(Conv, index):
    model_config = ModelConfig(mode="multiclass_classification", task_level="node",
                               return_type="raw")
    model = GNN(Conv, model_config, heads=4)
    explanation = attention_explainer(model)(torch.randn(8, 3), EXPLAIN_EDGE_INDEX, index=index)
    mask = explanation.edge_mask
    assert mask.size() == (EXPLAIN_EDGE_INDEX.size(1),)
    assert mask.min() >= 0 and mask.max() <= 1
    assert mask.sum() > 0


@pytest.mark.parametrize("task_level", ["node", "edge", "graph"])
@pytest.mark.parametrize("index", [None, 2], ids=["all", "one"])
def test_gnn_explainer_edge_mask(Conv, task_level, index):
    model_config = ModelConfig(mode="binary_classification", task_level=task_level,
                               return_type="raw")
    explainer = Explainer(model=GNN(Conv, model_config), algorithm=GNNExplainer(epochs=2),
                          explanation_type="model", node_mask_type="attributes",
                          edge_mask_type="object", model_config=model_config)
    x = torch.randn(8, 3)
    explanation = explainer(x, EXPLAIN_EDGE_INDEX, index=index, batch=EXPLAIN_BATCH,
                            edge_label_index=EXPLAIN_EDGE_LABEL_INDEX)
    assert explainer.algorithm.edge_mask is None  # cleaned up after
    assert explanation.node_mask.size() == x.size()
    mask = explanation.edge_mask
    assert mask.size() == (EXPLAIN_EDGE_INDEX.size(1),)
    assert mask.min() >= 0 and mask.max() <= 1
    # Edges whose mask got no gradient are zeroed: every edge reaches the outputs of all nodes
    # or of all graphs; some edges reach any other explained output.
    if index is None and task_level != "edge":
        assert bool((mask > 0).all())
    else:
        assert mask.sum() > 0


# gatattn only: the implicit complete graph, from_transformer_conv ----------------------------

def complete_edges(conv, x):
    """The edges of ``conv``'s implicit complete graph on ``x``, in the layer's order."""
    _, (edges, _) = conv(x, return_attention_weights=True)
    return edges


def test_gatattn_implicit_graph_attention_weights():
    conv = SelfAttentionConv(8, 16, 2)
    x = torch.randn(5, 8)
    out, (edges, alpha) = conv(x, return_attention_weights=True)
    assert edges.size() == (2, 25)
    assert torch.equal(torch.sort(edges[1] * 5 + edges[0]).values, torch.arange(25))
    expected, (_, expected_alpha) = conv(x, edges, return_attention_weights=True)
    assert torch.allclose(out, expected, atol=ATOL)
    assert torch.allclose(alpha, expected_alpha, atol=ATOL)
    assert conv._alpha is None


def test_gatattn_implicit_graph_message_hook_sees_alpha():
    conv = SelfAttentionConv(8, 16, 2)
    seen = []
    conv.register_message_forward_hook(lambda module, inputs, output: seen.append(module._alpha))
    conv(torch.randn(5, 8))
    assert len(seen) == 1 and seen[0] is not None and seen[0].size() == (25, 2)
    assert conv._alpha is None


def test_gatattn_implicit_graph_is_materialised_under_the_size_limit(monkeypatch):
    conv = SelfAttentionConv(8, 16, 2)
    conv.register_message_forward_hook(lambda module, inputs, output: None)
    monkeypatch.setattr(gatattn.graph, "MAX_MATERIALIZED_EDGES", 24)
    with pytest.raises(GraphTooLargeError):
        conv(torch.randn(5, 8))


class CompleteGraphGNN(torch.nn.Module):
    """Two layers attending over the implicit complete graph; ``edge_index`` is only there for
    the explainer's bookkeeping (it names the edges the mask is over)."""

    def __init__(self, implicit: bool):
        super().__init__()
        self.implicit = implicit
        self.conv1 = SelfAttentionConv(3, 4, heads=4)
        self.conv2 = SelfAttentionConv(16, 7)

    def forward(self, x, edge_index):
        edge_index = None if self.implicit else edge_index
        return self.conv2(self.conv1(x, edge_index).relu(), edge_index)


def test_gatattn_attention_explainer_on_implicit_graph():
    x = torch.randn(6, 3)
    implicit = CompleteGraphGNN(implicit=True)
    explicit = CompleteGraphGNN(implicit=False)
    explicit.load_state_dict(implicit.state_dict())
    edges = complete_edges(implicit.conv1, x)

    mask = attention_explainer(implicit)(x, edges).edge_mask
    assert mask.size() == (36,)
    assert mask.min() >= 0 and mask.max() <= 1 and mask.sum() > 0
    expected = attention_explainer(explicit)(x, edges).edge_mask
    assert torch.allclose(mask, expected, atol=ATOL)


@pytest.mark.parametrize("option", list(MESSAGE_PASSING_OPTIONS))
def test_gatattn_from_transformer_conv_keeps_aggr_and_flow(option):
    reference = TransformerConv(8, 16, 2, **MESSAGE_PASSING_OPTIONS[option])
    conv = SelfAttentionConv.from_transformer_conv(reference)
    assert (conv.aggr, conv.flow) == (reference.aggr, reference.flow)
    x = torch.randn(NUM_NODES, 8)
    assert torch.allclose(conv(x, EDGE_INDEX), reference(x, EDGE_INDEX), atol=ATOL)


# TorchScript refused; torch.compile and torch.export instead ----------------------------------

def test_gatattn_torchscript_is_refused_naming_compile_and_export():
    with pytest.raises(Exception, match=r"torch\.compile|torch\.export"):
        torch.jit.script(SelfAttentionConv(8, 16, 2))


def test_gatattn_torchscript_of_a_model_holding_it_is_refused():
    model = torch.nn.Sequential(SelfAttentionConv(8, 16, 2))
    with pytest.raises(Exception, match=r"torch\.compile|torch\.export"):
        torch.jit.script(model)


@pytest.mark.usefixtures("_fresh_dynamo")
@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_torch_compile_on_edge_index(Conv, backend):
    conv = Conv(8, 16, 2, edge_dim=4).eval()
    x, edge_attr = torch.randn(NUM_NODES, 8), torch.randn(EDGE_INDEX.size(1), 4)
    compiled = torch.compile(conv, backend=backend)
    assert torch.allclose(compiled(x, EDGE_INDEX, edge_attr), conv(x, EDGE_INDEX, edge_attr),
                          atol=ATOL)


def test_torch_export_on_edge_index(Conv):
    conv = Conv(8, 16, 2, edge_dim=4).eval()
    x, edge_attr = torch.randn(NUM_NODES, 8), torch.randn(EDGE_INDEX.size(1), 4)
    exported = torch.export.export(conv, (x, EDGE_INDEX, edge_attr))
    assert torch.allclose(exported.module()(x, EDGE_INDEX, edge_attr),
                          conv(x, EDGE_INDEX, edge_attr), atol=ATOL)


@pytest.mark.usefixtures("_fresh_dynamo")
@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_gatattn_torch_compile_on_implicit_graph(backend):
    conv = SelfAttentionConv(8, 16, 2).eval()
    x = torch.randn(7, 8)
    compiled = torch.compile(conv, backend=backend)
    assert torch.allclose(compiled(x), conv(x), atol=ATOL)


def test_gatattn_torch_export_on_implicit_graph():
    conv = SelfAttentionConv(8, 16, 2).eval()
    x = torch.randn(7, 8)
    exported = torch.export.export(conv, (x,))
    assert torch.allclose(exported.module()(x), conv(x), atol=ATOL)
