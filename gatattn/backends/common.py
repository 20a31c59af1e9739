"""What several routes share: grouped kv heads expanded, empty outputs on the autograd graph,
and rows permuted into a graph's size-grouped order and back."""

from __future__ import annotations

import torch
from torch import Tensor

from gatattn.graph import Permutation
from gatattn.transforms import functorch_active


def repeat_kv_heads(x: Tensor, heads: int) -> Tensor:
    """``(N, H_kv, C)`` keys or values as ``(N, heads, C)`` for grouped-query attention: query
    head ``h`` reads kv head ``h // (heads // H_kv)``, as SDPA's ``enable_gqa``. A copy, made by
    an expand, whose backward sums each kv head's group (deterministic, no scatter)."""
    kv_heads = x.size(1)
    if kv_heads == heads:
        return x
    group = heads // kv_heads
    return x.unsqueeze(2).expand(-1, -1, group, -1).reshape(x.size(0), heads, x.size(2))


def empty_output(q: Tensor, k: Tensor, v: Tensor, rows: int = 0) -> Tensor:
    """Zeros ``(rows, H, C_v)`` for targets without keys, on the autograd graph of ``q, k, v``,
    so that a backward yields zero gradients instead of failing on an output without grad_fn."""
    on_graph = q[:0].sum() + k[:0].sum() + v[:0].sum()  # exactly 0, even for NaN inputs
    return v.new_zeros(rows, q.size(1), v.size(2)) + on_graph


class _PermuteRows(torch.autograd.Function):
    """``x[perm]`` whose backward is a gather by the inverse permutation, not a scatter-add."""

    @staticmethod
    def forward(ctx, x: Tensor, perm: Tensor, inverse: Tensor) -> Tensor:
        ctx.save_for_backward(inverse)
        return x.index_select(0, perm)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def permute_rows(x: Tensor, order: Permutation | None) -> Tensor:
    return x if order is None else _permuted(x, order.forward, order.inverse)


def unpermute_rows(x: Tensor, order: Permutation | None) -> Tensor:
    return x if order is None else _permuted(x, order.inverse, order.forward)


def _permuted(x: Tensor, perm: Tensor, inverse: Tensor) -> Tensor:
    # torch.func's transforms cannot run the Function: a plain gather there (its backward a
    # scatter-add, which they differentiate again).
    return x.index_select(0, perm) if functorch_active() else _PermuteRows.apply(x, perm, inverse)
