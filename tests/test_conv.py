"""SelfAttentionConv: PyG conventions, drop-in equivalence with TransformerConv and
nn.MultiheadAttention, bipartite inputs, empty graphs, torch.compile."""

import pytest
import torch
from torch import nn
from torch_geometric.nn import TransformerConv

import gatattn
from gatattn import SelfAttentionConv
from tests.conftest import assert_close


def complete_edge_index(n_dst, n_src=None):
    return gatattn.mask_to_edge_index(torch.ones(n_dst, n_src or n_dst, dtype=torch.bool))


def test_repr_and_reset():
    conv = SelfAttentionConv(16, 8, heads=4)
    assert repr(conv) == "SelfAttentionConv(16, 8, heads=4)"
    assert conv.lin_skip is not None  # root_weight=True by default, as TransformerConv
    assert conv.lin_beta is None and conv.lin_out is None and conv.lin_edge is None
    before = conv.lin_query.weight.clone()
    conv.reset_parameters()
    assert not torch.equal(before, conv.lin_query.weight)


@pytest.mark.parametrize("concat", [True, False])
def test_implicit_complete_graph_equals_explicit_edges(concat):
    torch.manual_seed(0)
    conv = SelfAttentionConv(12, 5, heads=3, concat=concat, root_weight=True, out_proj=True)
    x = torch.randn(20, 12, requires_grad=True)
    implicit = conv(x)
    explicit = conv(x, complete_edge_index(20))
    assert implicit.shape == (20, 15 if concat else 5)
    torch.testing.assert_close(implicit, explicit)
    g_implicit, = torch.autograd.grad(implicit.square().sum(), x)
    g_explicit, = torch.autograd.grad(explicit.square().sum(), x)
    torch.testing.assert_close(g_implicit, g_explicit)


@pytest.mark.parametrize("concat", [True, False])
@pytest.mark.parametrize("root_weight,beta", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("edge_dim", [None, 3])
def test_from_transformer_conv(concat, root_weight, beta, edge_dim):
    torch.manual_seed(1)
    peer = TransformerConv((6, 7), 4, heads=2, concat=concat, root_weight=root_weight, beta=beta,
                           edge_dim=edge_dim)
    conv = SelfAttentionConv.from_transformer_conv(peer)
    x_src = torch.randn(9, 6, requires_grad=True)
    x_dst = torch.randn(5, 7, requires_grad=True)
    mask = torch.rand(5, 9, generator=torch.Generator().manual_seed(2)) < 0.5
    mask[0] = False  # an isolated target
    edge_index = gatattn.mask_to_edge_index(mask)
    edge_attr = torch.randn(edge_index.size(1), edge_dim) if edge_dim else None
    expected, (_, expected_alpha) = peer((x_src, x_dst), edge_index, edge_attr,
                                         return_attention_weights=True)
    out, (out_edges, alpha) = conv((x_src, x_dst), edge_index, edge_attr,
                                   return_attention_weights=True)
    assert torch.equal(out_edges, edge_index)
    assert_close("out", out, expected)
    assert_close("alpha", alpha, expected_alpha)
    grads = torch.autograd.grad(out.square().sum(), (x_src, x_dst))
    expected_grads = torch.autograd.grad(expected.square().sum(), (x_src, x_dst))
    for name, g, e in zip(("dx_src", "dx_dst"), grads, expected_grads, strict=True):
        assert_close(name, g, e)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("padding", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_from_multihead_attention_self(batch_first, bias, padding, causal):
    torch.manual_seed(3)
    B, L, E, H = 3, 6, 16, 4
    mha = nn.MultiheadAttention(E, H, bias=bias, batch_first=batch_first).eval()
    conv = SelfAttentionConv.from_multihead_attention(mha)
    x = torch.randn(B, L, E)
    kpm = torch.tensor([[False] * 6, [False] * 3 + [True] * 3, [False, True] * 3]) if padding \
        else None
    x_in = x if batch_first else x.transpose(0, 1)
    attn_mask = torch.ones(L, L, dtype=torch.bool).triu(1) if causal else None  # True = blocked
    expected, _ = mha(x_in, x_in, x_in, key_padding_mask=kpm, attn_mask=attn_mask,
                      need_weights=False)
    flat, ptr = gatattn.sequences_to_graph(x_in, key_padding_mask=kpm, batch_first=batch_first)
    out, _ = gatattn.graph_to_sequences(conv(flat, ptr=ptr, causal=causal), ptr,
                                        key_padding_mask=kpm, batch_first=batch_first)
    # Dropping padded tokens shifts later positions but keeps their order, so causal attention
    # over the kept tokens is MHA's causal mask combined with its padding mask.
    valid = torch.ones(B, L, dtype=torch.bool) if kpm is None else ~kpm
    expected = expected if batch_first else expected.transpose(0, 1)
    out = out if batch_first else out.transpose(0, 1)
    assert_close("out", out[valid], expected[valid])


def test_from_multihead_attention_cross():
    torch.manual_seed(4)
    mha = nn.MultiheadAttention(8, 2, kdim=5, vdim=5, batch_first=True).eval()
    conv = SelfAttentionConv.from_multihead_attention(mha)
    x_q, x_kv = torch.randn(2, 3, 8), torch.randn(2, 7, 5)
    expected, _ = mha(x_q, x_kv, x_kv, need_weights=False)
    q_flat, ptr_q = gatattn.sequences_to_graph(x_q)
    kv_flat, ptr_kv = gatattn.sequences_to_graph(x_kv)
    out = conv((kv_flat, q_flat), ptr=(ptr_kv, ptr_q))
    assert_close("out", out.view(2, 3, 8), expected)


def test_from_multihead_attention_refuses_what_it_cannot_copy():
    with pytest.raises(ValueError, match="add_bias_kv"):
        SelfAttentionConv.from_multihead_attention(nn.MultiheadAttention(8, 2, add_bias_kv=True))
    with pytest.raises(ValueError, match="kdim must equal vdim"):
        SelfAttentionConv.from_multihead_attention(nn.MultiheadAttention(8, 2, kdim=3, vdim=4))


def test_batched_bipartite_layer_uses_source_target_order():
    torch.manual_seed(5)
    conv = SelfAttentionConv((4, 6), 3, heads=2)
    x_src, x_dst = torch.randn(5, 4), torch.randn(3, 6)
    batch_src, batch_dst = torch.tensor([0, 0, 1, 1, 1]), torch.tensor([0, 1, 1])
    out = conv((x_src, x_dst), batch=(batch_src, batch_dst))
    mask = batch_dst.unsqueeze(1) == batch_src.unsqueeze(0)
    explicit = conv((x_src, x_dst), gatattn.mask_to_edge_index(mask))
    torch.testing.assert_close(out, explicit)


def test_empty_graph_and_isolated_nodes():
    conv = SelfAttentionConv(4, 2, heads=2, root_weight=True)
    out = conv(torch.randn(0, 4))
    assert out.shape == (0, 4)
    x = torch.randn(5, 4, requires_grad=True)
    edge_index = torch.tensor([[0, 1], [1, 0]])  # nodes 2, 3, 4 isolated
    out = conv(x, edge_index)
    torch.testing.assert_close(out[2:], conv.lin_skip(x[2:]))  # zero attention + root term
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_edge_attr_mismatch_is_explained():
    x, edge_index = torch.randn(3, 4), torch.tensor([[0], [1]])
    with pytest.raises(ValueError, match="edge_dim=None"):
        SelfAttentionConv(4, 2)(x, edge_index, torch.randn(1, 3))
    with pytest.raises(ValueError, match="edge_dim=3: give edge_attr"):
        SelfAttentionConv(4, 2, edge_dim=3)(x, edge_index)


def test_lazy_in_channels():
    conv = SelfAttentionConv(-1, 3, heads=2)
    assert conv(torch.randn(4, 7)).shape == (4, 6)


def test_dropout_only_in_training():
    conv = SelfAttentionConv(4, 4, heads=1, dropout=0.5)
    x = torch.randn(6, 4)
    conv.eval()
    torch.testing.assert_close(conv(x), conv(x))
    conv.train()
    torch.manual_seed(0)
    assert not torch.allclose(conv(x), conv(x))


@pytest.mark.parametrize("graph", ["complete", "edges"])
def test_torch_compile_has_no_graph_breaks(graph):
    torch.manual_seed(6)
    conv = SelfAttentionConv(8, 4, heads=2, root_weight=True)
    x = torch.randn(10, 8)
    args = (x,) if graph == "complete" else (x, complete_edge_index(10))
    explanation = torch._dynamo.explain(conv)(*args)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(conv, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(*args), conv(*args))


def test_torch_compile_of_batched_graphs_is_correct():
    # Under compile, batched graphs run as one opaque operator (tests/test_compile.py).
    torch.manual_seed(7)
    conv = SelfAttentionConv(8, 4, heads=2)
    x, batch = torch.randn(10, 8), torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2, 2])
    compiled = torch.compile(conv, backend="aot_eager")
    torch.testing.assert_close(compiled(x, batch=batch, causal=True),
                               conv(x, batch=batch, causal=True))
