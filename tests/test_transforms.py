"""The layers and attention() under PyTorch's program transforms: torch.jit.trace / script,
the meta device (and FLOP counters), torch.func (vmap, jacrev, hessian)."""

import warnings

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from torch_geometric.nn import TransformerConv

import gatattn
from gatattn import reference

EXPORT = "torch.export"


def _traced(module, args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return torch.jit.trace(module, args)


def _complete_edges(n: int) -> torch.Tensor:
    dst, src = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    return torch.stack([src.flatten(), dst.flatten()])


class _WithKwargs(nn.Module):
    def __init__(self, conv, **kwargs):
        super().__init__()
        self.conv, self.kwargs = conv, kwargs

    def forward(self, x):
        return self.conv(x, **self.kwargs)


# ------------------------------------------------------------------ torch.jit.trace / script


@pytest.mark.parametrize("causal", [False, True])
def test_trace_complete_graph_replays_for_other_sizes(causal):
    torch.manual_seed(0)
    pyg = TransformerConv(8, 4, heads=2).eval()
    conv = gatattn.SelfAttentionConv.from_transformer_conv(pyg).eval()
    traced = _traced(_WithKwargs(conv, causal=causal), (torch.randn(5, 8),))
    for n in (5, 7, 2):
        x = torch.randn(n, 8)
        edges = _complete_edges(n)
        if causal:
            edges = edges[:, edges[0] <= edges[1]]
        torch.testing.assert_close(traced(x), pyg(x, edges))


def test_trace_keeps_float64_precision_of_the_default_scale():
    """Traced, the head width is a 0-dim tensor; 1/sqrt(C) taken from it in float32 cost a
    float64 call about 1e-7 relative error (found by the one-step logits test)."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(20, 4, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    traced = _traced(lambda q, k, v: gatattn.attention(q, k, v), (q, k, v))
    expected = reference.attention(q, k, v, torch.ones(20, 20, dtype=torch.bool))
    torch.testing.assert_close(traced(q, k, v), expected, rtol=1e-12, atol=1e-12)


def test_trace_edge_set_replays_for_other_edges():
    torch.manual_seed(0)
    pyg = TransformerConv(8, 4, heads=2).eval()
    conv = gatattn.SelfAttentionConv.from_transformer_conv(pyg).eval()
    traced = _traced(conv, (torch.randn(5, 8), torch.tensor([[0, 1, 2, 3, 4], [1, 2, 3, 4, 0]])))
    x = torch.randn(7, 8)
    edges = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 2, 2], [1, 2, 3, 4, 5, 6, 0, 0, 5]])
    torch.testing.assert_close(traced(x, edges), pyg(x, edges))


@pytest.mark.parametrize("kwargs", [
    {"batch": torch.tensor([0, 0, 1, 1, 1])},
    {"ptr": torch.tensor([0, 2, 5])},
    {"graph": gatattn.build_graph(ptr=torch.tensor([0, 2, 5]))},
    {"causal": "bottom_right"},
    {"causal": True, "edge_index": torch.tensor([[0, 1], [1, 2]])},
], ids=["batch", "ptr", "graph", "bottom_right", "causal_edges"])
def test_trace_refuses_what_it_would_freeze(kwargs):
    conv = gatattn.SelfAttentionConv(8, 4, heads=2).eval()
    with pytest.raises(RuntimeError, match=EXPORT):
        _traced(_WithKwargs(conv, **kwargs), (torch.randn(5, 8),))


def test_trace_refuses_multihead_attention():
    mha = gatattn.MultiheadAttention(8, 2, batch_first=True).eval()
    x = torch.randn(2, 3, 8)
    with pytest.raises(RuntimeError, match="MultiheadAttention.*" + EXPORT):
        _traced(mha, (x, x, x))


def test_script_refuses_encoder_layer_holding_our_attention():
    layer = nn.TransformerEncoderLayer(8, 2, batch_first=True)
    layer.self_attn = gatattn.MultiheadAttention.from_torch(layer.self_attn)
    with pytest.raises(RuntimeError, match="does not support TorchScript.*" + EXPORT):
        torch.jit.script(layer)
    with pytest.raises(RuntimeError, match="does not support TorchScript.*" + EXPORT):
        torch.jit.script(gatattn.MultiheadAttention(8, 2))


# ------------------------------------------------------------------ meta device


def test_meta_layer_shapes_match_pyg_and_torch():
    with torch.device("meta"):
        x = torch.randn(5, 8)
        edges = torch.zeros(2, 9, dtype=torch.long)
        ours = gatattn.SelfAttentionConv(8, 4, heads=2, edge_dim=3)
        pyg = TransformerConv(8, 4, heads=2, edge_dim=3)
        edge_attr = torch.randn(9, 3)
        assert ours(x, edges, edge_attr).shape == pyg(x, edges, edge_attr).shape
        assert ours.lin_query.weight.is_meta  # deferred initialisation
        plain = gatattn.SelfAttentionConv(8, 4, heads=2, concat=False)
        assert plain(x).shape == plain(x, causal=True).shape == (5, 4)
        graph = gatattn.build_graph(ptr=torch.tensor([0, 2, 5], device="cpu")).to("meta")
        assert plain(x, graph=graph).shape == (5, 4)
        for batch_first in (False, True):
            ours = gatattn.MultiheadAttention(8, 2, batch_first=batch_first, add_bias_kv=True)
            torch_mha = nn.MultiheadAttention(8, 2, batch_first=batch_first, add_bias_kv=True)
            q, kv = torch.randn(3, 2, 8), torch.randn(4, 2, 8)  # L = 3, S = 4, N = 2
            if batch_first:
                q, kv = q.transpose(0, 1), kv.transpose(0, 1)
            for need_weights in (False, True):
                out, weights = ours(q, kv, kv, need_weights=need_weights)
                out_t, weights_t = torch_mha(q, kv, kv, need_weights=need_weights)
                assert out.is_meta and out.shape == out_t.shape
                assert (weights is None) == (weights_t is None)
                assert weights is None or weights.shape == weights_t.shape


def test_meta_refuses_graphs_built_from_values():
    with torch.device("meta"):
        conv = gatattn.SelfAttentionConv(8, 4)
        x = torch.randn(5, 8)
        with pytest.raises(ValueError, match="build_graph"):
            conv(x, batch=torch.zeros(5, dtype=torch.long))
        with pytest.raises(ValueError, match="build_graph"):
            gatattn.attention(torch.randn(4, 1, 2), torch.randn(4, 1, 2), torch.randn(4, 1, 2),
                              ptr=torch.tensor([0, 4]))
        mha = gatattn.MultiheadAttention(8, 2, batch_first=True)
        y = torch.randn(2, 3, 8)
        with pytest.raises(ValueError, match="without masks"):
            mha(y, y, y, key_padding_mask=torch.zeros(2, 3, dtype=torch.bool))


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_flop_counter_counts_on_cpu_and_meta():
    torch.manual_seed(0)
    conv = gatattn.SelfAttentionConv(8, 4, heads=2, out_proj=True)
    x, y = torch.randn(5, 8), torch.randn(3, 2, 8)

    def mha_flops(module, y):
        return _flops(lambda: module(y, y, y, need_weights=False)[0].sum().backward())

    # Counted as torch's own layer is, on CPU (where SDPA's kernel has no FLOP formula in
    # torch, so both count their projections) and on meta (SDPA's matrix products counted).
    assert mha_flops(gatattn.MultiheadAttention(8, 2), y) == mha_flops(
        nn.MultiheadAttention(8, 2), y) > 0
    with sdpa_kernel(SDPBackend.MATH):  # SDPA as the products the meta device counts
        expected = _flops(lambda: conv(x).sum().backward())
    with torch.device("meta"):
        conv_meta = gatattn.SelfAttentionConv(8, 4, heads=2, out_proj=True)
        assert _flops(lambda: conv_meta(torch.randn(5, 8)).sum().backward()) == expected
        y = torch.randn(3, 2, 8)
        assert mha_flops(gatattn.MultiheadAttention(8, 2), y) == mha_flops(
            nn.MultiheadAttention(8, 2), y) > 0


# ------------------------------------------------------------------ torch.func


def _qkv(batch=(), n_dst=6, n_src=6, heads=2, kv_heads=2, c=4):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(*batch, n_dst, heads, c, generator=g, dtype=torch.float64),
            torch.randn(*batch, n_src, kv_heads, c, generator=g, dtype=torch.float64),
            torch.randn(*batch, n_src, kv_heads, c, generator=g, dtype=torch.float64))


EDGES = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 3, 3], [1, 2, 3, 4, 5, 0, 0, 1, 1]])
GRAPHS = {
    "complete": ({}, reference.block_mask([6])),
    "causal": ({"causal": True}, reference.block_mask([6], causal=True)),
    "batch": ({"batch": torch.tensor([1, 0, 0, 1, 1, 0])}, None),
    "ptr": ({"ptr": torch.tensor([0, 2, 6])}, reference.block_mask([2, 4])),
    "edges": ({"edge_index": EDGES}, reference.edge_counts(EDGES, 6, 6)),
}


@pytest.mark.parametrize("name", list(GRAPHS))
@pytest.mark.parametrize("backend", ["auto", "sparse"])
def test_vmap_over_qkv_equals_a_loop(name, backend):
    kwargs, _ = GRAPHS[name]
    q, k, v = _qkv(batch=(3,), kv_heads=1)

    def fn(q, k, v):
        return gatattn.attention(q, k, v, backend=backend, **kwargs)

    expected = torch.stack([fn(q[i], k[i], v[i]) for i in range(3)])
    torch.testing.assert_close(torch.func.vmap(fn)(q, k, v), expected)
    # in_dims: the keys shared by every call
    expected = torch.stack([fn(q[i], k[0], v[0]) for i in range(3)])
    torch.testing.assert_close(torch.func.vmap(fn, in_dims=(0, None, None))(q, k[0], v[0]),
                               expected)


def test_vmap_with_bias_and_weights_equals_a_loop():
    q, k, v = _qkv(batch=(3,))
    bias = torch.randn(3, 36, 2, dtype=torch.float64)
    bias_e = torch.randn(3, EDGES.size(1), 2, dtype=torch.float64)

    def implicit(q, k, v, b):
        return gatattn.attention(q, k, v, attn_bias=b, ptr=torch.tensor([0, 6]))

    def edges(q, k, v, b):
        out, (_, alpha) = gatattn.attention(q, k, v, attn_bias=b, edge_index=EDGES,
                                            return_attention_weights=True)
        return out, alpha

    torch.testing.assert_close(torch.func.vmap(implicit)(q, k, v, bias),
                               torch.stack([implicit(q[i], k[i], v[i], bias[i])
                                            for i in range(3)]))
    loop = [edges(q[i], k[i], v[i], bias_e[i]) for i in range(3)]
    out, alpha = torch.func.vmap(edges)(q, k, v, bias_e)
    torch.testing.assert_close(out, torch.stack([o for o, _ in loop]))
    torch.testing.assert_close(alpha, torch.stack([a for _, a in loop]))


@pytest.mark.parametrize("name", [n for n, (_, mask) in GRAPHS.items() if mask is not None])
def test_jacrev_and_hessian_equal_the_reference(name):
    kwargs, mask = GRAPHS[name]
    q, k, v = _qkv()

    def ours(q, k, v):
        return gatattn.attention(q, k, v, **kwargs)

    def ref(q, k, v):
        return reference.attention(q, k, v, mask)

    for argnums in (0, 1, 2):
        torch.testing.assert_close(torch.func.jacrev(ours, argnums)(q, k, v),
                                   torch.func.jacrev(ref, argnums)(q, k, v))
    weights = torch.randn(6, 2, 4, dtype=torch.float64)

    def energy(fn):
        return lambda q, k, v: (fn(q, k, v) * weights).sum().tanh()

    torch.testing.assert_close(torch.func.hessian(energy(ours), (0, 1))(q, k, v),
                               torch.func.hessian(energy(ref), (0, 1))(q, k, v))


def test_vmap_over_multihead_attention_equals_a_loop_and_torch():
    torch.manual_seed(0)
    torch_mha = nn.MultiheadAttention(8, 2, batch_first=True).double().eval()
    ours = gatattn.MultiheadAttention.from_torch(torch_mha)
    x = torch.randn(4, 2, 3, 8, dtype=torch.float64)

    def run(module, need_weights):
        return lambda x: module(x, x, x, need_weights=need_weights)[0]

    for need_weights in (False, True):
        batched = torch.func.vmap(run(ours, need_weights))(x)
        torch.testing.assert_close(batched, torch.stack([run(ours, need_weights)(x_i)
                                                         for x_i in x]))
        torch.testing.assert_close(batched, torch.stack([run(torch_mha, need_weights)(x_i)
                                                         for x_i in x]))
    grad = torch.func.grad(lambda w: torch.func.functional_call(
        ours, {"in_proj_weight": w}, (x[0], x[0], x[0]))[0].square().sum())
    grad_t = torch.func.grad(lambda w: torch.func.functional_call(
        torch_mha, {"in_proj_weight": w}, (x[0], x[0], x[0]))[0].square().sum())
    torch.testing.assert_close(grad(ours.in_proj_weight.detach()),
                               grad_t(torch_mha.in_proj_weight.detach()))


def test_vmap_refuses_batched_graphs_and_the_kernels():
    q, k, v = _qkv(batch=(3,))
    edges = EDGES.expand(3, 2, -1)
    with pytest.raises(ValueError, match="same for every vmapped call"):
        torch.func.vmap(lambda q, k, v, e: gatattn.attention(q, k, v, edge_index=e))(
            q, k, v, edges)
    with pytest.raises(ValueError, match="backend='triton'.*torch.func"):
        torch.func.vmap(lambda q, k, v: gatattn.attention(q, k, v, backend="triton"))(
            q.float(), k.float(), v.float())


def test_trace_refuses_the_kernels():
    conv = gatattn.SelfAttentionConv(8, 4, heads=2, backend="triton").eval()
    with pytest.raises(ValueError, match="backend='triton'.*torch.jit.trace"):
        _traced(conv, (torch.randn(5, 8),))
