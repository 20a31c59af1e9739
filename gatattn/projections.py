"""Several linear maps of one input, as one autograd node (the query, key and value
projections of a self-attention layer).

Autograd differentiates each ``nn.Linear`` on its own and then adds their input gradients,
two more passes over an ``(N, in_features)`` tensor; ``nn.MultiheadAttention`` avoids them by
packing its three projections into one weight. :class:`gatattn.SelfAttentionConv` keeps
TransformerConv's three ``Linear`` modules (their parameters and state-dict names), so
:func:`shared_input_linears` computes them as one node whose backward sums the input gradient
inside the matrix products (``addmm_``). On CPU it took a training step of 1024 graphs of 10-40
nodes (benchmarks/bench_cpu.py case 4) from 168 to 155 ms.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch_geometric.nn.dense.linear import Linear as PyGLinear
from torch_geometric.nn.dense.linear import is_uninitialized_parameter

from gatattn.transforms import compiling, recorded

_LINEARS = (nn.Linear, PyGLinear)  # each computes F.linear(x, weight, bias) and nothing else


def shared_input_linears(x: Tensor, linears: Sequence[nn.Module]) -> tuple[Tensor, ...]:
    """``tuple(linear(x) for linear in linears)``: as one autograd node where autograd records
    the call on CPU, else as the modules themselves (no gradient wanted, ``torch.compile`` or
    ``torch.jit.trace`` or a ``torch.func`` transform, which trace or transform the modules,
    autocast, which casts inside them, or a module whose forward is replaced by a hook or a
    subclass: only plain ``nn.Linear`` and PyG ``Linear`` modules are fused)."""
    if not _fused_serves(x, linears):
        return tuple(linear(x) for linear in linears)
    weights = [linear.weight for linear in linears]
    biases = [linear.bias for linear in linears]
    return _SharedInputLinears.apply(x, len(linears), *weights, *biases)


def _fused_serves(x: Tensor, linears: Sequence[nn.Module]) -> bool:
    if not torch.is_grad_enabled() or x.dim() != 2 or not x.is_cpu:
        return False
    if compiling() or recorded() or torch.is_autocast_enabled("cpu"):
        return False
    if not all(_plain(linear, x) for linear in linears) or _global_hooks():
        return False
    return x.requires_grad or any(p.requires_grad for lin in linears for p in lin.parameters())


def _plain(linear: nn.Module, x: Tensor) -> bool:
    """An ``nn.Linear`` or PyG's ``Linear`` itself (not a subclass, a parametrization or a
    wrapper), initialised (PyG's lazy one materialises its weight in a hook), without hooks,
    in ``x``'s dtype and device: its forward is ``x W^T + b`` and nothing else."""
    return (type(linear) in _LINEARS and not is_uninitialized_parameter(linear.weight)
            and linear.weight.dtype == x.dtype
            and linear.weight.device == x.device
            and not (linear._forward_hooks or linear._forward_pre_hooks
                     or linear._backward_hooks or linear._backward_pre_hooks))


def _global_hooks() -> bool:
    """Whether hooks registered for every module (``nn.modules.module.register_module_*``)
    expect to see each ``Linear`` called."""
    module = nn.modules.module
    return bool(module._global_forward_hooks or module._global_forward_pre_hooks
                or module._global_backward_hooks or module._global_backward_pre_hooks)


class _SharedInputLinears(torch.autograd.Function):
    """``x W_i^T + b_i`` for each ``i``; the backward is each product's own (in differentiable
    torch ops, so it is differentiable again), with the input gradients summed by ``addmm_``
    into the first product's result."""

    @staticmethod
    def forward(ctx, x: Tensor, count: int, *params: Tensor | None) -> tuple[Tensor, ...]:
        weights, biases = params[:count], params[count:]
        ctx.save_for_backward(x, *weights)
        ctx.count = count
        ctx.has_bias = [bias is not None for bias in biases]
        return tuple(x @ w.t() if b is None else torch.addmm(b, x, w.t())
                     for w, b in zip(weights, biases, strict=True))

    @staticmethod
    def backward(ctx, *grads: Tensor | None):
        x, *weights = ctx.saved_tensors
        count = ctx.count
        needs = ctx.needs_input_grad
        grad_x = None
        if needs[0]:
            for grad, weight in zip(grads, weights, strict=True):
                if grad is not None:
                    grad_x = grad @ weight if grad_x is None else grad_x.addmm_(grad, weight)
        grad_weights = [grad.t() @ x if grad is not None and needs[2 + i] else None
                        for i, grad in enumerate(grads)]
        grad_biases = [grad.sum(0) if grad is not None and ctx.has_bias[i]
                       and needs[2 + count + i] else None for i, grad in enumerate(grads)]
        return grad_x, None, *grad_weights, *grad_biases
