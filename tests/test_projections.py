"""Linear maps of one input as one autograd node (gatattn/projections.py) against the modules
called one by one: outputs, gradients of the input, weights and biases, second derivatives,
and the cases it leaves to the modules."""

import pytest
import torch
from torch import nn
from torch_geometric.nn.dense.linear import Linear as PyGLinear

import gatattn
from gatattn import projections
from gatattn.projections import shared_input_linears


def _linears(bias=True, frozen=(), dtype=torch.float64, kind=nn.Linear):
    torch.manual_seed(0)
    linears = [kind(6, width, bias=bias).to(dtype) for width in (4, 4, 2)]
    for i in frozen:
        linears[i].requires_grad_(False)
    return linears


def _gradients(x, linears, outputs, used):
    gen = torch.Generator().manual_seed(1)
    loss = sum((out * torch.randn(out.shape, generator=gen, dtype=out.dtype)).sum()
               for i, out in enumerate(outputs) if i in used)
    params = [p for lin in linears for p in lin.parameters() if p.requires_grad]
    leaves = ([x] if x.requires_grad else []) + params
    return torch.autograd.grad(loss, leaves, allow_unused=True)


def _fused_calls(monkeypatch):
    calls = []
    apply = projections._SharedInputLinears.apply
    monkeypatch.setattr(projections._SharedInputLinears, "apply",
                        lambda *args: calls.append(1) or apply(*args))
    return calls


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("frozen", [(), (1,)])
@pytest.mark.parametrize("used", [(0, 1, 2), (0, 2)])
@pytest.mark.parametrize("kind", [nn.Linear, PyGLinear])
def test_one_node_equals_the_modules(monkeypatch, bias, frozen, used, kind):
    linears = _linears(bias, frozen, kind=kind)
    x = torch.randn(9, 6, dtype=torch.float64, requires_grad=True)
    calls = _fused_calls(monkeypatch)
    fused = shared_input_linears(x, linears)
    assert calls, "the fused node did not run"
    plain = [lin(x) for lin in linears]
    for got, expected in zip(fused, plain, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    for got, expected in zip(_gradients(x, linears, fused, used),
                             _gradients(x, linears, plain, used), strict=True):
        if expected is None:
            assert got is None or not got.any()
        else:
            torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_one_node_is_twice_differentiable():
    linears = _linears()
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    params = [p for lin in linears for p in lin.parameters()]

    def function(x, *params):
        weights, biases = params[0::2], params[1::2]
        outs = projections._SharedInputLinears.apply(x, 3, *weights, *biases)
        return tuple(out.tanh() for out in outs)  # (linear maps alone have no curvature)

    assert torch.autograd.gradgradcheck(function, (x, *params))


def test_the_modules_serve_where_one_node_must_not(monkeypatch):
    """No gradient wanted, autocast, a hook, a subclass, a lazy PyG Linear, a global hook:
    each module is called itself (so what wraps or watches it sees it)."""
    calls = _fused_calls(monkeypatch)
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        shared_input_linears(x, _linears())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        shared_input_linears(x.float(), _linears(dtype=torch.float32))
    hooked = _linears()
    seen = []
    hooked[1].register_forward_hook(lambda *args: seen.append("hook"))
    shared_input_linears(x, hooked)
    assert seen == ["hook"]

    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    torch.manual_seed(0)
    subclassed = [Scaled(6, 4).double(), nn.Linear(6, 4).double()]
    torch.testing.assert_close(shared_input_linears(x, subclassed)[0], subclassed[0](x))
    lazy = [PyGLinear(-1, 4).double(), PyGLinear(-1, 4).double()]
    assert shared_input_linears(x, lazy)[0].shape == (3, 4)
    handle = nn.modules.module.register_module_forward_hook(lambda *args: seen.append("global"))
    try:
        shared_input_linears(x, _linears())
    finally:
        handle.remove()
    assert seen.count("global") == 3
    assert not calls


def test_the_layer_projects_through_one_node(monkeypatch):
    """SelfAttentionConv's three projections of one x are one node, and the layer's outputs
    and gradients are the modules' own."""
    calls = _fused_calls(monkeypatch)
    torch.manual_seed(0)
    layer = gatattn.SelfAttentionConv(6, 4, heads=2).double()
    x = torch.randn(7, 6, dtype=torch.float64, requires_grad=True)
    ptr = torch.tensor([0, 3, 7])
    out = layer(x, ptr=ptr)
    grads = torch.autograd.grad(out.square().sum(), [x, *layer.parameters()])
    assert len(calls) == 1
    monkeypatch.setattr(projections, "_fused_serves", lambda *args: False)
    expected = layer(x, ptr=ptr)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, torch.autograd.grad(expected.square().sum(),
                                                    [x, *layer.parameters()]), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_a_bipartite_layer_projects_its_sources_through_one_node(monkeypatch):
    calls = _fused_calls(monkeypatch)
    torch.manual_seed(0)
    layer = gatattn.SelfAttentionConv((6, 5), 4, heads=2).double()
    x_src = torch.randn(8, 6, dtype=torch.float64, requires_grad=True)
    x_dst = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    ptr = (torch.tensor([0, 5, 8]), torch.tensor([0, 3, 7]))  # PyG's (source, target) order
    out = layer((x_src, x_dst), ptr=ptr)
    grads = torch.autograd.grad(out.square().sum(), [x_src, x_dst, *layer.parameters()])
    assert len(calls) == 1
    monkeypatch.setattr(projections, "_fused_serves", lambda *args: False)
    expected = layer((x_src, x_dst), ptr=ptr)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, torch.autograd.grad(
            expected.square().sum(), [x_src, x_dst, *layer.parameters()]), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
