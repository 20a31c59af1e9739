"""Batched implicit graphs as one opaque operator for ``torch.compile`` and ``torch.export``.

The dense route groups graphs by size (:class:`~gatattn.graph.SegmentPlan`): it reads their
sizes on the host. Traced, every such read is a graph break, and every new batch of sizes a new
guard and a recompile. ``gatattn::segment_attention`` hides the whole route behind a signature
whose output shape ``(N_dst, H, C_v)`` needs no tensor value; the grouping runs inside, eagerly,
at run time. Its backward is an opaque operator too, so a compiled backward does not break
either. :func:`gatattn.attention` calls it under ``torch.compile`` / ``torch.export`` only: in
eager mode the route runs directly, with its exact second derivatives.

First derivatives are exact: the backward operator recomputes the forward (the same function,
the same kernels) and differentiates it. Second derivatives through the operators are refused.
With attention dropout the operator takes a seed, drawn in the traced graph: forward and
recomputation run under a generator seeded with it, so the backward replays the forward's mask.

For ONNX, which cannot run the grouping, :data:`ONNX_DECOMPOSITIONS` states the operator as
dense attention under a block mask built from the graph ids (O(N_dst * N_src) memory).
:func:`traced_segment_attention` puts that form in the graph directly while ``torch.onnx.export``
traces a model, so a plain export needs nothing more; a program exported beforehand holds the
operator and needs ``run_decompositions(ONNX_DECOMPOSITIONS)``.
"""


import contextlib

import torch
from torch import Tensor

from gatattn.backends.nonfinite import finite_flag
from gatattn.backends.sdpa import sdpa_attention
from gatattn.bias import check_bias_rows
from gatattn.graph import AttentionGraph, describe_graph, validation_enabled


@torch.library.custom_op("gatattn::segment_attention", mutates_args=())
def segment_attention(q: Tensor, k: Tensor, v: Tensor, batch_dst: Tensor,
                      batch_src: Tensor | None, scale: float, causal: bool,
                      attn_bias: Tensor | None = None, bottom_right: bool = False,
                      dropout: float = 0.0, seed: Tensor | None = None,
                      window_left: int | None = None,
                      window_right: int | None = None) -> Tensor:
    """``(N_dst, H, C_v)`` attention over one complete graph per graph id: ``batch_dst`` holds
    the targets' ids, ``batch_src`` the sources' (``None``: the same nodes, self-attention);
    ``attn_bias`` in the stacked layout of :mod:`gatattn.bias`; ``bottom_right`` aligns a
    causal graph bottom-right (:func:`gatattn.graph.causal_mode`). ``dropout`` falls on the
    attention weights under a generator seeded with ``seed`` (a 0-dim int64 CPU tensor;
    required with dropout), which the backward seeds again to replay the mask.
    ``window_left`` / ``window_right``: a sliding window's sides (``None``: no bound)."""
    window = (window_left, window_right)
    graph, finite = _graph(q, k, v, batch_dst, batch_src, causal, bottom_right, window)
    if attn_bias is not None:
        check_bias_rows(attn_bias, graph, q.size(1), validate=True)
    if dropout > 0 and seed is None:
        raise ValueError("gatattn::segment_attention with dropout needs a seed (draw_seed()): "
                         "its backward replays the dropout mask from it")
    if dropout > 0:
        # Run as the backward's recomputation runs (recording autograd), so that SDPA picks the
        # same kernel, whose mask the same seed then reproduces.
        inputs = [t.detach().requires_grad_(t.is_floating_point())
                  for t in (q, k, v, *([attn_bias] if attn_bias is not None else []))]
        with autograd_recording(), seeded(seed, q.device):
            out = sdpa_attention(*inputs[:3], graph, scale=scale, dropout=dropout,
                                 bias=inputs[3] if attn_bias is not None else None,
                                 inputs_finite=finite)
        # Laid out as the fake output is (the recording route may return a strided view).
        return out.detach().contiguous()
    with torch.no_grad():
        return sdpa_attention(q, k, v, graph, scale=scale, bias=attn_bias, inputs_finite=finite)


@segment_attention.register_fake
def _(q, k, v, batch_dst, batch_src, scale, causal, attn_bias=None, bottom_right=False,
      dropout=0.0, seed=None, window_left=None, window_right=None):
    return q.new_empty(q.size(0), q.size(1), v.size(2))


@torch.library.custom_op("gatattn::segment_attention_backward", mutates_args=())
def segment_attention_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor,
                               batch_dst: Tensor, batch_src: Tensor | None, scale: float,
                               causal: bool, attn_bias: Tensor | None = None,
                               bottom_right: bool = False, dropout: float = 0.0,
                               seed: Tensor | None = None, window_left: int | None = None,
                               window_right: int | None = None,
                               ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients ``(dq, dk, dv, dbias)`` of :func:`segment_attention` for ``grad_out``
    (``dbias`` is empty without a bias)."""
    with_bias = attn_bias is not None
    inputs = [t.detach().requires_grad_() for t in (q, k, v, *([attn_bias] if with_bias else []))]
    with autograd_recording(), seeded(seed if dropout > 0 else None, q.device):
        graph, finite = _graph(q, k, v, batch_dst, batch_src, causal, bottom_right,
                               (window_left, window_right))
        out = sdpa_attention(*inputs[:3], graph, scale=scale, dropout=dropout,
                             bias=inputs[3] if with_bias else None, inputs_finite=finite)
        grads = torch.autograd.grad(out, inputs, grad_out, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, grads, strict=True)]
    return (*grads[:3], grads[3] if with_bias else q.new_empty(0))


@segment_attention_backward.register_fake
def _(grad_out, q, k, v, batch_dst, batch_src, scale, causal, attn_bias=None,
      bottom_right=False, dropout=0.0, seed=None, window_left=None, window_right=None):
    dbias = q.new_empty(0) if attn_bias is None else torch.empty_like(attn_bias)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dbias


def _setup_context(ctx, inputs, output):
    (q, k, v, batch_dst, batch_src, scale, causal, attn_bias, bottom_right, dropout, seed,
     window_left, window_right) = inputs
    ctx.save_for_backward(q, k, v, batch_dst, batch_src, attn_bias, seed)
    ctx.scale, ctx.causal, ctx.bottom_right, ctx.dropout = scale, causal, bottom_right, dropout
    ctx.window = (window_left, window_right)


def _backward(ctx, grad_out):
    q, k, v, batch_dst, batch_src, attn_bias, seed = ctx.saved_tensors
    dq, dk, dv, dbias = segment_attention_backward(grad_out, q, k, v, batch_dst, batch_src,
                                                   ctx.scale, ctx.causal, attn_bias,
                                                   ctx.bottom_right, ctx.dropout, seed,
                                                   *ctx.window)
    return (dq, dk, dv, None, None, None, None, None if attn_bias is None else dbias, None,
            None, None, None, None)


def refuse_double_backward(backward_op, what: str) -> None:
    """Registers, as ``backward_op``'s own backward, a refusal: an operator whose backward
    recomputes its forward has first derivatives only (eager mode has the second)."""

    def refuse(ctx, *grads):
        name = backward_op._qualname.removesuffix("_backward")
        raise RuntimeError(
            f"second derivatives are not available through {name} ({what}); compute them in "
            "eager mode, where every route is twice differentiable")

    backward_op.register_autograd(refuse, setup_context=lambda ctx, inputs, output: None)


segment_attention.register_autograd(_backward, setup_context=_setup_context)
refuse_double_backward(segment_attention_backward,
                       "batched graphs under torch.compile / torch.export")


@contextlib.contextmanager
def seeded(seed: Tensor | None, device: torch.device):
    """The default generators of the CPU and of ``device`` seeded with ``seed``'s value inside
    (nothing changes with ``None``), their states restored after."""
    if seed is None:
        yield
        return
    value = int(seed)
    cuda = device.type == "cuda"
    with torch.random.fork_rng(devices=[device] if cuda else []):
        torch.default_generator.manual_seed(value)
        if cuda:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(value)
        yield


def draw_seed() -> Tensor:
    """A seed for :func:`segment_attention`'s dropout from the default generator: traced, a
    random operator of the graph, so each call of a compiled model draws another."""
    return torch.randint(2**62, (), dtype=torch.long)


@contextlib.contextmanager
def autograd_recording():
    """Autograd on again inside an operator's implementation: torch.library runs it with the
    autograd dispatch keys excluded, so the recomputed forward would record nothing."""
    keys = torch._C.DispatchKey
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in (keys.AutogradFunctionality, keys.AutogradOther, keys.AutogradNestedTensor):
        exclude = exclude.remove(key)
    include = torch._C._dispatch_tls_local_include_set()
    with torch._C._ForceDispatchKeyGuard(include, exclude), torch.enable_grad():
        yield


def _graph(q: Tensor, k: Tensor, v: Tensor, batch_dst: Tensor, batch_src: Tensor | None,
           causal: bool, bottom_right: bool,
           window=(None, None)) -> tuple[AttentionGraph, bool | None]:
    """The graph, and whether ``q, k, v`` are finite, read with it (``None`` with validation
    off: nothing is read for it)."""
    bipartite = batch_src is not None
    batch = (batch_dst, batch_src) if bipartite else batch_dst
    causal = "bottom_right" if causal and bottom_right else causal
    return describe_graph(q.size(0), k.size(0), batch=batch, causal=causal, window=window,
                          bipartite=bipartite,
                          finite_flag=(lambda _: finite_flag(q, k, v)) if validation_enabled()
                          else None)


def _masked_dense_attention(q: Tensor, k: Tensor, v: Tensor, batch_dst: Tensor,
                            batch_src: Tensor | None, scale: float, causal: bool,
                            attn_bias: Tensor | None = None, bottom_right: bool = False,
                            dropout: float = 0.0, seed: Tensor | None = None,
                            window_left: int | None = None,
                            window_right: int | None = None) -> Tensor:
    """:func:`segment_attention` as dense attention under a mask built from the graph ids,
    tensor operations only (no host reads), for exporters that cannot run the grouping."""
    same_src = batch_src is None
    batch_src = batch_dst if same_src else batch_src
    same = batch_dst.unsqueeze(1) == batch_src.unsqueeze(0)  # (N_dst, N_src)
    pos_dst = _positions(batch_dst)
    pos_src = pos_dst if same_src else _positions(batch_src)
    diagonal = pos_dst  # pos(i) + d: + n_src - n_dst of the target's graph bottom-right
    if causal and bottom_right:
        diagonal = pos_dst + same.sum(1) - (batch_dst.unsqueeze(1) == batch_dst.unsqueeze(0)).sum(1)
    offset = pos_src.unsqueeze(0) - diagonal.unsqueeze(1)  # pos(j) - pos(i) - d
    allowed = same
    right = 0 if causal else window_right
    if right is not None:
        allowed = allowed & (offset <= right)
    if window_left is not None:
        allowed = allowed & (offset >= -window_left)
    logits = torch.einsum("ihc,jhc->hij", q, k) * scale
    if attn_bias is not None:
        logits = logits + _dense_bias(attn_bias, batch_dst, same, pos_dst, pos_src)
        # A -inf bias removes its pair, so that a row it empties gets zeros, as one
        # without pairs (the finite stand-in below would spread it evenly instead).
        allowed = allowed & (logits != float("-inf"))
    logits = logits.masked_fill(~allowed, torch.finfo(logits.dtype).min)
    weights = torch.softmax(logits, dim=-1) * allowed  # rows without keys: all zeros
    if dropout > 0:  # traced with the rest: autograd keeps the mask, no seed is needed
        weights = torch.nn.functional.dropout(weights, dropout)
    return torch.einsum("hij,jhc->ihc", weights, v)


def _dense_bias(attn_bias: Tensor, batch_dst: Tensor, same: Tensor, pos_dst: Tensor,
                pos_src: Tensor) -> Tensor:
    """The stacked bias as ``(H, N_dst, N_src)`` (anything between graphs, which is masked):
    pair ``(i, j)`` reads row ``offset(graph of i) + pos_i * n_src + pos_j``."""
    n_src = same.sum(1)  # sources in each target's graph
    earlier = batch_dst.unsqueeze(0) < batch_dst.unsqueeze(1)  # target i' in an earlier graph
    offset = (earlier * n_src.unsqueeze(0)).sum(1)  # rows of earlier graphs' blocks
    rows = offset.unsqueeze(1) + pos_dst.unsqueeze(1) * n_src.unsqueeze(1) + pos_src.unsqueeze(0)
    rows = rows.clamp(0, max(attn_bias.size(0) - 1, 0))
    return attn_bias[rows].permute(2, 0, 1)


def _positions(batch: Tensor) -> Tensor:
    """Each node's position inside its graph: how many earlier nodes share its graph id."""
    same = batch.unsqueeze(1) == batch.unsqueeze(0)
    return same.tril().sum(dim=1) - 1


def traced_segment_attention(q: Tensor, k: Tensor, v: Tensor, batch_dst: Tensor,
                             batch_src: Tensor | None, scale: float, causal: bool,
                             attn_bias: Tensor | None = None,
                             bottom_right: bool = False, dropout: float = 0.0,
                             window=(None, None)) -> Tensor:
    """:func:`segment_attention` for tracers; while ``torch.onnx.export`` traces a model, its ONNX
    decomposition instead: torch.onnx has no function for the operator and does not apply
    :data:`ONNX_DECOMPOSITIONS` unless asked, so the dense form goes into the graph itself."""
    fn = _masked_dense_attention if torch.onnx.is_in_onnx_export() else segment_attention
    seed = draw_seed() if dropout > 0 and fn is segment_attention else None
    return fn(q, k, v, batch_dst, batch_src, scale, causal, attn_bias, bottom_right, dropout,
              seed, *window)


#: For ``ExportedProgram.run_decompositions`` before ``torch.onnx.export``: the operator as
#: plain tensor operations (dense, masked; O(N_dst * N_src) memory).
ONNX_DECOMPOSITIONS = {torch.ops.gatattn.segment_attention.default: _masked_dense_attention}
