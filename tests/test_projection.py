"""Packed query/key/value projections (gatattn/projection.py): one product for self-attention,
the same values and gradients as the three layers called one by one, and never packed where
calling each layer would run something more (hooks, a subclass, a lazy layer)."""

import pytest
import torch
from torch import nn

from gatattn import SelfAttentionConv
from gatattn.projection import packable, project_qkv


def _layer(**kwargs) -> SelfAttentionConv:
    torch.manual_seed(0)
    return SelfAttentionConv(8, 4, heads=2, **kwargs).double()


@pytest.mark.parametrize("kwargs", [{}, {"bias": False}, {"kv_heads": 1}])
def test_packed_projection_equals_the_three_layers(kwargs):
    conv = _layer(**kwargs)
    x = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    lins = (conv.lin_query, conv.lin_key, conv.lin_value)
    assert packable(lins, x)
    packed = project_qkv(lins, x, x, conv.heads, conv.kv_heads, conv.out_channels)
    separate = (conv.lin_query(x).view(6, conv.heads, 4), conv.lin_key(x).view(6, -1, 4),
                conv.lin_value(x).view(6, -1, 4))
    leaves = [x, *conv.parameters()]
    for got, want in zip(packed, separate, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        grad = torch.randn_like(want)
        for g_got, g_want in zip(torch.autograd.grad(got, leaves, grad, retain_graph=True,
                                                     allow_unused=True),
                                 torch.autograd.grad(want, leaves, grad, retain_graph=True,
                                                     allow_unused=True),
                                 strict=True):
            if g_got is None or g_want is None:  # layers the output does not read
                # The packed product gives the other two projections zero gradients, not None.
                assert g_got is None or not g_got.any()
                continue
            torch.testing.assert_close(g_got, g_want, rtol=1e-12, atol=1e-12)


def test_hooks_on_a_projection_still_run():
    conv = _layer()
    x = torch.randn(6, 8, dtype=torch.float64)
    seen = []
    handle = conv.lin_key.register_forward_hook(lambda module, args, out: seen.append(out))
    out = conv(x)
    handle.remove()
    assert len(seen) == 1 and seen[0].shape == (6, 8)
    torch.testing.assert_close(out, conv(x))  # packed again once the hook is gone


def test_global_module_hooks_still_run():
    conv = _layer()
    x = torch.randn(6, 8, dtype=torch.float64)
    seen = []
    handle = nn.modules.module.register_module_forward_hook(
        lambda module, args, out: seen.append(module))
    try:
        conv(x)
    finally:
        handle.remove()
    for lin in (conv.lin_query, conv.lin_key, conv.lin_value):
        assert sum(module is lin for module in seen) == 1


def test_not_packed_for_cross_attention_subclasses_or_mixed_bias():
    conv = _layer()
    x = torch.randn(6, 8, dtype=torch.float64)
    lins = (conv.lin_query, conv.lin_key, conv.lin_value)
    assert not packable(lins, x.float())  # another dtype than the weights

    class Scaled(type(conv.lin_key)):
        def forward(self, x):
            return 2 * super().forward(x)

    scaled = Scaled(8, 8).double()
    scaled.load_state_dict(conv.lin_key.state_dict())
    assert not packable((conv.lin_query, scaled, conv.lin_value), x)
    conv.lin_key = scaled
    q, k, v = conv.project(x, x)
    torch.testing.assert_close(k, 2 * torch.nn.functional.linear(
        x, scaled.weight, scaled.bias).view(6, 2, 4))
    lazy = SelfAttentionConv(-1, 4, heads=2)
    assert not packable((lazy.lin_query, lazy.lin_key, lazy.lin_value), x)
