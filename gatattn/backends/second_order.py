"""Exact second derivatives for routes whose own backward is first-order only.

The fast routes' backward passes (SDPA's fused kernels, the CSR message-passing Function, the
Triton kernels) compute first derivatives and nothing more. When autograd records a backward
(``create_graph=True``: gradient penalties, forces as energy gradients, meta-learning), these
routes instead recompute their output with a twice-differentiable statement of the same
function and differentiate that, so the gradients they return can be differentiated again,
exactly. A plain backward still runs the fast kernels.

Our own autograd Functions call :func:`recorded_grads` from their backward; SDPA, which is not
ours, runs inside :func:`twice_differentiable`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from gatattn.transforms import compiling


def recording_backward() -> bool:
    """Whether the running backward is being recorded (``create_graph=True``)."""
    return torch.is_grad_enabled()


def recorded_grads(recompute: Callable[..., Tensor | tuple[Tensor, ...]],
                   inputs: Sequence[Tensor], needs_grad: Sequence[bool],
                   grad_out: Tensor | Sequence[Tensor | None]) -> list[Tensor | None]:
    """Gradients of ``recompute(*inputs)`` for ``grad_out``, themselves differentiable; ``None``
    where ``needs_grad`` is false. ``inputs`` are the saved inputs of a Function. ``recompute``
    may return a tuple (an output and its log-sum-exp), ``grad_out`` then one gradient each
    (``None``: that output unused)."""
    wanted = [i for i, needed in enumerate(needs_grad) if needed]
    with torch.enable_grad():
        out = recompute(*inputs)
    outs, grad_outs = _used(out, grad_out)
    grads = torch.autograd.grad(outs, [inputs[i] for i in wanted], grad_outs, create_graph=True,
                                allow_unused=True)
    result: list[Tensor | None] = [None] * len(inputs)
    for i, g in zip(wanted, grads, strict=True):
        result[i] = torch.zeros_like(inputs[i]) if g is None else g
    return result


def _used(out, grad_out) -> tuple[list[Tensor], list[Tensor]]:
    """The outputs (one tensor, or a tuple) that autograd can differentiate and that have a
    gradient, with their gradients."""
    if isinstance(out, Tensor):
        out, grad_out = (out,), (grad_out,)
    pairs = [(o, g) for o, g in zip(out, grad_out, strict=True)
             if g is not None and o.requires_grad]
    return [o for o, _ in pairs], [g for _, g in pairs]


class _TwiceDifferentiable(torch.autograd.Function):
    """Runs ``fast`` on detached inputs, keeping its autograd graph inside ``ctx``; backward
    replays that graph, or, when recorded, differentiates ``recompute`` instead."""

    @staticmethod
    def forward(ctx, fast, recompute, *inputs):
        inner = [t.detach().requires_grad_(t.requires_grad) for t in inputs]
        with torch.enable_grad():
            out = fast(*inner)
        ctx.inner, ctx.inner_out, ctx.recompute = inner, out, recompute
        ctx.save_for_backward(*inputs)
        return out.detach() if isinstance(out, Tensor) else tuple(o.detach() for o in out)

    @staticmethod
    def backward(ctx, *grad_out):
        needs = ctx.needs_input_grad[2:]
        grad_out = grad_out[0] if isinstance(ctx.inner_out, Tensor) else grad_out
        if recording_backward():
            return None, None, *recorded_grads(ctx.recompute, ctx.saved_tensors, needs, grad_out)
        wanted = [t for t, needed in zip(ctx.inner, needs, strict=True) if needed]
        # The inner graph is kept exactly when the outer one is (retain_graph=True may replay
        # it); freed otherwise, so its saved tensors go as soon as this node has run, as they
        # would without the wrapper (torch's own AOT autograd asks the engine the same way).
        keep = torch._C._autograd._get_current_graph_task_keep_graph()
        outs, grad_outs = _used(ctx.inner_out, grad_out)
        grads = iter(torch.autograd.grad(outs, wanted, grad_outs, retain_graph=keep,
                                         allow_unused=True))
        if not keep:
            ctx.inner = ctx.inner_out = None
        return None, None, *(next(grads) if needed else None for needed in needs)


def twice_differentiable(fast: Callable[..., Tensor], recompute: Callable[..., Tensor],
                         *inputs: Tensor) -> Tensor:
    """``fast(*inputs)``, whose gradients can be differentiated again through ``recompute``, a
    twice-differentiable statement of the same function (both may return a tuple of tensors:
    an output and its log-sum-exp). Under ``torch.compile`` (which has no
    double backward) or without gradients, ``fast`` runs as is."""
    if (compiling() or not torch.is_grad_enabled()
            or not any(t.requires_grad for t in inputs)):
        return fast(*inputs)
    return _TwiceDifferentiable.apply(fast, recompute, *inputs)


def refuse_second_order(reason: str) -> Callable[..., Tensor]:
    """A ``recompute`` for a case with no twice-differentiable statement: a recorded backward
    raises ``reason`` rather than return gradients that would be wrong if differentiated."""

    def recompute(*inputs: Tensor) -> Tensor:
        raise RuntimeError(f"second derivatives are not available here: {reason}")

    return recompute
