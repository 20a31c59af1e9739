"""PyG's explainers on layers that attend over an implicit complete graph (``conv(x)``,
``conv(x, batch=...)``).

An explainer pairs a layer's messages with its own ``edge_index`` by position, so it is only
right when that ``edge_index`` is the graph the layer attends over, in the layer's order: the
edges ``return_attention_weights=True`` returns. With any other edges (the data's own, or the
complete graph in another order) the layer must refuse with a ValueError saying how to explain
it, instead of a mask over edges it never used (AttentionExplainer) or a bare AssertionError
(edge-mask explainers). The numeric checks run on PyG's ``TransformerConv`` too, given the
complete graph as an explicit ``edge_index``, which shows they hold for the original layer.
"""

import pytest
import torch
from torch_geometric.explain import AttentionExplainer, CaptumExplainer, Explainer, GNNExplainer
from torch_geometric.explain.algorithm.utils import clear_masks, set_masks
from torch_geometric.nn import TransformerConv

from gatattn import SelfAttentionConv

ATOL = 1e-6  # PyG's tolerance in test_transformer_conv.py, as in test_pyg_parity.py

# PyG's explain test graph: a chain of 8 nodes, both directions, 3 graphs in the batch.
DATA_EDGE_INDEX = torch.tensor([[0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7],
                                [1, 0, 2, 1, 3, 2, 4, 3, 5, 4, 6, 5, 7, 6]])
BATCH = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
NUM_NODES = 8

MODEL_CONFIG = dict(mode="multiclass_classification", task_level="node", return_type="raw")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(12345)


class TwoLayers(torch.nn.Module):
    """Two attention layers. ``implicit``: each attends over the complete graph of each graph
    of ``batch`` and ``edge_index`` only names the explainer's edges; otherwise each attends
    over ``edge_index``."""

    def __init__(self, Conv, implicit: bool):
        super().__init__()
        self.implicit = implicit
        self.conv1 = Conv(3, 4, heads=4)
        self.conv2 = Conv(16, 7)

    def graph(self, edge_index, batch):
        return {"batch": batch} if self.implicit else {"edge_index": edge_index}

    def forward(self, x, edge_index, batch=None):
        graph = self.graph(edge_index, batch)
        return self.conv2(self.conv1(x, **graph).relu(), **graph)


def implicit_model():
    return TwoLayers(SelfAttentionConv, implicit=True)


def with_weights_of(model, Conv, implicit):
    """A ``TwoLayers`` of ``Conv`` holding ``model``'s weights (TransformerConv's state_dict
    layout, which SelfAttentionConv shares)."""
    twin = TwoLayers(Conv, implicit)
    twin.load_state_dict(model.state_dict())
    return twin


def complete_edges(batch):
    """The edges the implicit model's layers attend over, in their order, as the layer reports
    them (the explanation's edges must be these)."""
    x = torch.randn(NUM_NODES, 3)
    _, (edges, _) = SelfAttentionConv(3, 4)(x, batch=batch, return_attention_weights=True)
    return edges


def reordered(edges):
    """The same edge set sorted by source: the layer's own order is by target, so the edge
    count and even the self-loop positions match while the order does not."""
    order = torch.argsort(edges[0] * NUM_NODES + edges[1])
    assert not torch.equal(order, torch.arange(edges.size(1)))  # really another order
    return edges[:, order]


def explainer(model, algorithm, **kwargs):
    return Explainer(model=model, algorithm=algorithm, explanation_type="model",
                     edge_mask_type="object", model_config=MODEL_CONFIG, **kwargs)


def attention(model):
    return explainer(model, AttentionExplainer())


def gnn(model):
    return explainer(model, GNNExplainer(epochs=3), node_mask_type="attributes")


def captum(model):
    pytest.importorskip("captum", reason="captum is not installed (extra 'test')")
    return explainer(model, CaptumExplainer("IntegratedGradients"))


EXPLAINERS = {"attention": attention, "gnn": gnn, "captum": captum}


def wrong_edges(kind, batch):
    return DATA_EDGE_INDEX if kind == "data" else reordered(complete_edges(batch))


# Other edges than the layer's: refused ---------------------------------------------------------

@pytest.mark.parametrize("batch", [None, BATCH], ids=["one_graph", "batched"])
@pytest.mark.parametrize("edges", ["data", "reordered"])
@pytest.mark.parametrize("name", list(EXPLAINERS))
def test_explaining_an_implicit_graph_over_other_edges_is_refused(name, edges, batch):
    model = implicit_model()
    with pytest.raises(ValueError, match=r"return_attention_weights=True.*conv\(x, edge_index\)"):
        EXPLAINERS[name](model)(torch.randn(NUM_NODES, 3), wrong_edges(edges, batch),
                                batch=batch)


def test_two_node_graph_whose_loop_padding_matches_the_count_is_refused():
    """2 nodes, edges 0 -> 1 and 1 -> 0: PyG's explain_message pads a mask of the wrong size
    with one entry per node (for self-loops some layers add), which makes exactly the 4 edges
    of the complete graph; the mask must still be refused."""
    model = TwoLayers(SelfAttentionConv, implicit=True)
    x, edges = torch.randn(2, 3), torch.tensor([[0, 1], [1, 0]])
    with pytest.raises(ValueError, match="return_attention_weights"):
        gnn(model)(x, edges)


def test_edge_mask_set_by_hand_on_an_implicit_graph_is_refused():
    """With no explainer running nothing says which edges the mask is over, even one of the
    right size over the right edges: refused."""
    model = implicit_model()
    edges = complete_edges(None)
    set_masks(model, torch.ones(edges.size(1)), edges, apply_sigmoid=False)
    try:
        with pytest.raises(ValueError, match="no PyG explainer running"):
            model(torch.randn(NUM_NODES, 3), edges)
    finally:
        clear_masks(model)


def test_message_hook_outside_an_explainer_still_sees_the_complete_graph():
    conv = SelfAttentionConv(3, 4, heads=2)
    seen = []
    conv.register_message_forward_hook(lambda module, inputs, output: seen.append(module._alpha))
    conv(torch.randn(NUM_NODES, 3))
    assert len(seen) == 1 and seen[0].size() == (NUM_NODES ** 2, 2)


def test_explicit_edges_are_not_checked_against_the_explainer():
    """An explicit edge_index is PyG's case: the layer uses the edges the model gives it."""
    model = TwoLayers(SelfAttentionConv, implicit=False)
    mask = attention(model)(torch.randn(NUM_NODES, 3), DATA_EDGE_INDEX).edge_mask
    assert mask.size() == (DATA_EDGE_INDEX.size(1),)


# The layer's own edges: explained, and right --------------------------------------------------

LAYERS = {"gatattn_implicit": (SelfAttentionConv, True), "pyg_explicit": (TransformerConv, False)}


def attention_mask_from_the_layers(model, x, edges, batch):
    """What AttentionExplainer must report (reduce="max", every node explained): per edge,
    the largest attention weight over heads and layers, read from each layer's own
    ``return_attention_weights`` on the edges that explanation is over."""
    h, weights = x, []
    for conv in (model.conv1, model.conv2):
        out, (layer_edges, alpha) = conv(h, **model.graph(edges, batch),
                                         return_attention_weights=True)
        assert torch.equal(layer_edges, edges)
        weights.append(alpha.max(dim=-1).values)
        h = out.relu()
    return torch.stack(weights, dim=-1).max(dim=-1).values


@pytest.mark.parametrize("batch", [None, BATCH], ids=["one_graph", "batched"])
@pytest.mark.parametrize("layers", list(LAYERS))
def test_attention_explainer_over_the_complete_edges_reports_the_layers_weights(layers, batch):
    model = with_weights_of(implicit_model(), *LAYERS[layers])
    x, edges = torch.randn(NUM_NODES, 3), complete_edges(batch)
    mask = attention(model)(x, edges, batch=batch).edge_mask
    expected = attention_mask_from_the_layers(model, x, edges, batch)
    assert mask.size() == (edges.size(1),)
    assert torch.allclose(mask, expected, atol=ATOL)


@pytest.mark.parametrize("batch", [None, BATCH], ids=["one_graph", "batched"])
@pytest.mark.parametrize("name", ["gnn", "captum"])
def test_edge_mask_explainers_over_the_complete_edges_match_transformer_conv(name, batch):
    """The implicit layer explained over its complete edges gives TransformerConv's explanation
    over the same edges as an explicit edge_index (same weights, same seed)."""
    model = implicit_model()
    x, edges = torch.randn(NUM_NODES, 3), complete_edges(batch)
    masks = []
    for Conv, implicit in LAYERS.values():
        torch.manual_seed(0)  # GNNExplainer draws its initial mask
        explanation = EXPLAINERS[name](with_weights_of(model, Conv, implicit))(
            x, edges, batch=batch, index=2)
        masks.append(explanation.edge_mask)
    mask, expected = masks
    assert mask.size() == (edges.size(1),)
    assert mask.sum() > 0
    assert torch.allclose(mask, expected, atol=ATOL)
