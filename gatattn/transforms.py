"""What PyTorch's program transforms get from gatattn, decided in one place.

- ``torch.func`` (``vmap``, ``grad``, ``jacrev``, ``jacfwd``, ``hessian``): the inputs are
  wrappers that hold no data to read on the host, and our custom autograd Functions have no
  rules for the transforms. Calls under a transform take routes written in plain torch ops
  (SDPA's math backend, the gathered message passing), which every transform composes with.
- ``torch.jit.trace`` records the ops of one call. Values read on the host (a batch's graph
  sizes, a ``graph=`` object's plan) would be frozen into the program and silently reused for
  other batches, so such calls are refused; complete graphs and edge sets record their ops.
- The meta device holds shapes and no values: what needs no values runs (complete graphs,
  edge sets, graphs built from known sizes); what is built from values is refused.
- TorchScript, which PyTorch has deprecated, is refused.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils._python_dispatch import (
    _get_current_dispatch_mode_stack,
    is_in_torch_dispatch_mode,
)

EXPORT_HINT = "use torch.compile(model) or torch.export.export(model, args) instead"


def compiling() -> bool:
    """Whether ``torch.compile`` / ``torch.export`` is tracing the call: the one place that asks.
    Traced code cannot read values on the host nor keep Python state across calls; the
    decisions that follow (routes, opaque operators) are :mod:`gatattn.backends.routing`'s."""
    return torch.compiler.is_compiling()


def functorch_active() -> bool:
    """Whether a ``torch.func`` transform (vmap, grad, jacrev, jacfwd, ...) is running. Under
    ``torch.compile``, which traces the transforms itself, not asked (nor traced)."""
    if compiling():
        return False
    return torch._C._functorch.peek_interpreter_stack() is not None


def recorded() -> bool:
    """Whether the call is recorded by ``torch.jit.trace`` or runs under a ``torch.func``
    transform: what the inputs hold must not steer Python, and only plain torch ops may run."""
    return not compiling() and (torch.jit.is_tracing() or functorch_active())


def eager_and_unwatched() -> bool:
    """Not compiling, nothing recording (trace, ``torch.func``) and no user's dispatch mode
    watching: :func:`compiling`, :func:`recorded` and :func:`ops_watched` in one check, for
    what runs on every call of a small graph (right after a large kernel each Python call
    there costs microseconds)."""
    return not (torch.compiler.is_compiling() or torch._C._is_tracing()
                or torch._C._functorch.peek_interpreter_stack() is not None or ops_watched())


def values_steer_python() -> bool:
    """Whether the call may read tensor values on the host and branch on them (graph sizes,
    sortedness, finiteness) or serve them from a Python cache: not while ``torch.compile``
    traces, nor while a trace or a ``torch.func`` transform records."""
    return not compiling() and not recorded()


def ops_watched() -> bool:
    """Whether a user's ``TorchDispatchMode`` (``FlopCounterMode``, an op logger) watches the
    ops: the compiled CPU kernels are no torch ops, so such calls run the torch-ops forms it can
    see. torch's own modes (fake tensors, functionalization, tracing: "infra" modes) do not
    count: they run inside compiled programs, whose results must equal eager mode's."""
    return is_in_torch_dispatch_mode() and any(
        not mode.is_infra_mode() for mode in _get_current_dispatch_mode_stack())


def plain_ops_only(device: torch.device) -> bool:
    """Whether only routes of plain torch ops may run: recorded calls and the meta device
    (whose tensors cannot back a sparse CSR tensor or a Triton kernel)."""
    return device.type == "meta" or recorded()


def torchscript_refusal(owner: str) -> RuntimeError:
    """The error for ``torch.jit.script`` of a module holding ``owner``."""
    return RuntimeError(f"{owner} does not support TorchScript, which PyTorch has deprecated: "
                        f"{EXPORT_HINT}")


def refuse_unread_graph(device: torch.device, edge_index, batch, ptr, graph) -> None:
    """Refuses graph descriptions that are read on the host where no value can be read or kept:
    ``batch`` / ``ptr`` / ``graph=`` under ``torch.jit.trace``, ``batch`` / ``ptr`` on meta,
    and graph tensors batched by ``vmap`` (one graph for all vmapped calls)."""
    if edge_index is None and batch is None and ptr is None:  # (every call: the short way)
        if graph is not None and torch.jit.is_tracing():
            _refuse_traced_graph(["graph"])
        return
    for name, value in (("edge_index", edge_index), ("batch", batch), ("ptr", ptr)):
        for t in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(t, Tensor) and torch._C._functorch.is_batchedtensor(t):
                raise ValueError(
                    f"{name} is batched by torch.func.vmap, but the graph must be the same for "
                    "every vmapped call: vmap over q, k, v (and attn_bias) only, or pass the "
                    "graphs together as one batch (batch=/ptr=)")
    given = [name for name, value in (("batch", batch), ("ptr", ptr), ("graph", graph))
             if value is not None]
    if not given:
        return
    if torch.jit.is_tracing():
        _refuse_traced_graph(given)
    if device.type == "meta" and graph is None:
        raise ValueError(
            f"{'/'.join(given)}= on the meta device: the graph is built from the values of "
            f"{'/'.join(given)}, which meta tensors do not hold; build it from known sizes and "
            "move it there, "
            "graph=gatattn.build_graph(ptr=cpu_ptr).to('meta'), or run on a real device")


def _refuse_traced_graph(given: list[str]) -> None:
    raise RuntimeError(
        f"torch.jit.trace cannot record attention over {'/'.join(given)}=: the graph sizes "
        "are read on the host, so the trace would replay this batch's sizes for every "
        f"later batch; {EXPORT_HINT} (both take batched graphs of any sizes)")


def refuse_traced_causal(causal, bottom_right: bool, num_dst: int, num_src: int,
                         edge_index, window=None) -> None:
    """Under ``torch.jit.trace``, causal attention records its mask's alignment for the traced
    sizes: only top-left causal self-attention (equal node counts, no edge_index) replays
    correctly for other sizes, so the other causal calls are refused, and windows (whose band
    mask is built for the traced sizes) too."""
    if not torch.jit.is_tracing() or not (causal or window is not None):
        return
    if window is not None:
        raise RuntimeError(
            "torch.jit.trace records a window's band mask for the traced node counts, which "
            f"would replay for other sizes; {EXPORT_HINT}")
    if bottom_right or edge_index is not None or bool(num_dst != num_src):
        raise RuntimeError(
            "torch.jit.trace records causal attention for the traced node counts: only "
            "causal=True with as many targets as sources and no edge_index replays for other "
            f"sizes; {EXPORT_HINT}")


def refuse_unread_sequences(device: torch.device, key_padding_mask, attn_mask) -> None:
    """:class:`gatattn.MultiheadAttention`'s sequences are batched graphs, built from the masks'
    values and the sequence lengths: refused under ``torch.jit.trace`` (it would replay the
    traced lengths) and, with a mask, on meta (no values say which keys are attended)."""
    if torch.jit.is_tracing():
        raise RuntimeError(
            "torch.jit.trace cannot record gatattn.MultiheadAttention: its sequences run as "
            "batched graphs whose sizes are read on the host, so the trace would replay the "
            f"traced lengths for every later input; {EXPORT_HINT}")
    if device.type == "meta" and (key_padding_mask is not None or attn_mask is not None):
        raise ValueError(
            "gatattn.MultiheadAttention on the meta device runs without masks only: a mask's "
            "values decide which keys each query attends to, and meta tensors hold none; run "
            "the masked call on a real device")
