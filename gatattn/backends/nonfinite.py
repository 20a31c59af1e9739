"""Non-finite inputs travel along edges only, on the dense routes too.

Message passing reads a value only through an edge, so a NaN reaches exactly the targets it has
an edge to (the policy :mod:`gatattn.reference` states). Dense routes break that: a causal tile
multiplies the zero weights of future keys with their values (``0 * NaN = NaN`` reaches rows
without that edge), and SDPA's fused CPU kernel returns finite rows for NaN queries, and for
rows whose logits are all NaN.

:func:`contain_nonfinite` repairs all of it where the call knows its inputs are not finite: the
route computes with finite inputs, and NaN is put back exactly where an edge reads a non-finite
one. A keyword call with validation on knows it from one reduction read with the graph; under
``torch.compile`` (which fuses the repair into a few element-wise passes) the repair always
runs. Calls that read nothing on the host cannot know. A ``graph=`` call with validation on (the
default) does not pay the repair on every finite call; it only makes sure that no non-finite
input is hidden (a dense kernel can hide one: SDPA's CPU kernel returns finite rows for a NaN
query, or for a row whose only key is NaN): one reduction on the device, no host read, turns the
whole output NaN when any of ``q``, ``k``, ``v`` is not finite. With validation off nothing is
checked: like SDPA itself, the route assumes finite inputs and costs what it costs.

The written-out logits route (:func:`gatattn.backends.sdpa.logits_attention`) calls none of
this: it computes complete graphs only, every pair an edge, so IEEE arithmetic alone carries a
non-finite value exactly along the edges that read it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from gatattn.backends.native import cpu_kernels
from gatattn.graph import AttentionGraph, validation_enabled
from gatattn.transforms import ops_watched, values_steer_python

Inputs = tuple[Tensor, Tensor, Tensor]
#: The dtypes the compiled scan (``nonfinite.cpp``) reads.
SCANNED_DTYPES = (torch.float32, torch.float64)


def finite_flag(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """0-dim bool tensor, on the device: ``q``, ``k`` and ``v`` are all finite. One reduction: a
    non-finite entry makes the sum non-finite (a sum that overflows only sends finite inputs
    down the exact repair path). Left on the device so the caller can read it along with
    whatever else it reads. On CPU one pass of the compiled kernel computes it
    (:func:`scanned_natively`)."""
    if scanned_natively(q, k, v):
        return cpu_kernels().all_finite([q, k, v])
    with torch.no_grad():
        return torch.isfinite(sum(torch.sum(t, dtype=torch.float32) for t in (q, k, v)))


def inputs_finite(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Whether ``q``, ``k`` and ``v`` are all finite, read now (a host read on a GPU); on CPU
    the compiled scan answers directly, with no tensor made for the answer."""
    if scanned_natively(q, k, v):
        return cpu_kernels().inputs_are_finite([q, k, v])
    return bool(finite_flag(q, k, v))


def contain_nonfinite(q: Tensor, k: Tensor, v: Tensor, graph: AttentionGraph,
                      finite: bool | None) -> tuple[Inputs, Repair]:
    """Finite ``q, k, v`` to compute with, and the repair to apply to the ``(N_dst, H, C_v)``
    output. ``graph`` must be implicit; ``k``, ``v`` may have fewer heads than ``q``
    (grouped-query: query head ``h`` reads kv head ``h // (H / H_kv)``). ``finite``: whether
    the inputs are all finite, ``None`` if the call did not find out (no host read): then the
    exact repair runs under ``torch.compile``, and otherwise, with validation on, a guard that
    makes the whole output NaN if any input is not finite (with validation off: nothing).
    The repair's :meth:`Repair.lse` does the same for a ``(N_dst, H)`` log-sum-exp computed from
    the returned inputs, which reads ``q`` and ``k`` only."""
    if finite:
        return (q, k, v), Repair(_unchanged)
    # Compiled and recorded calls (jit.trace, torch.func) cannot branch on values: exact repair.
    if finite is None and values_steer_python():
        if not validation_enabled():
            return (q, k, v), Repair(_unchanged)
        guard = lambda out: _poisoned_if_nonfinite(out, q, k, v)  # noqa: E731
        return (q, k, v), Repair(guard, guard)
    bad_q = ~torch.isfinite(q).all(dim=-1, keepdim=True)  # (N_dst, H, 1)
    bad_k = ~torch.isfinite(k).all(dim=-1, keepdim=True)  # (N_src, H, 1)
    bad_v = ~torch.isfinite(v)  # (N_src, H, C_v)
    from_kv = _reached_from(bad_k | bad_v, graph)  # (N_dst, H_kv, C_v)
    from_kv = from_kv.repeat_interleave(q.size(1) // k.size(1), dim=1)  # each query head's
    reached = (bad_q & _has_keys(graph, q.device)) | from_kv
    finite = tuple(t.masked_fill(bad, 0) for t, bad in ((q, bad_q), (k, bad_k), (v, bad_v)))

    def repair_lse(lse: Tensor) -> Tensor:
        # The log-sum-exp reads no value: only q and k, along the same edges.
        from_k = _reached_from(bad_k, graph).repeat_interleave(q.size(1) // k.size(1), dim=1)
        reached_qk = (bad_q & _has_keys(graph, q.device)) | from_k  # (N_dst, H, 1)
        return lse.masked_fill(reached_qk.squeeze(-1), float("nan"))

    return finite, Repair(lambda out: out.masked_fill(reached, float("nan")), repair_lse)


class Repair:
    """What :func:`contain_nonfinite` puts back: called on the ``(N_dst, H, C_v)`` output;
    :meth:`lse` on a ``(N_dst, H)`` log-sum-exp (computed only when a call asks for one)."""

    def __init__(self, out: Callable[[Tensor], Tensor],
                 lse: Callable[[Tensor], Tensor] | None = None) -> None:
        self._out, self._lse = out, lse or _unchanged

    def __call__(self, out: Tensor) -> Tensor:
        return self._out(out)

    def lse(self, lse: Tensor) -> Tensor:
        return self._lse(lse)


def _poisoned_if_nonfinite(out: Tensor, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """``out``, all NaN if any entry of ``q``, ``k``, ``v`` is not finite. Where no autograd
    graph holds ``out`` (inference) on CPU, one pass of the compiled kernel over the inputs
    fills it in place (:func:`_poisoned_in_place`). Otherwise in torch ops: the sum of all
    entries is NaN or inf then, and adding it times 0 adds NaN (finite inputs add 0; half
    precision sums in float32, so only entries near float32's limit could overflow it). Its
    gradient is zero. Five calls: on tiny graphs each costs about what SDPA's call does."""
    if _poisoned_in_place(out, q, k, v):
        return out
    if q.dtype in (torch.float16, torch.bfloat16):
        total = q.sum(dtype=torch.float32) + k.sum(dtype=torch.float32) + v.sum(
            dtype=torch.float32)
    else:
        total = q.sum() + k.sum() + v.sum()
    return out.add(total, alpha=0)  # a 0-dim float32 keeps out's half dtype


def _poisoned_in_place(out: Tensor, q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Whether :func:`_poisoned_if_nonfinite`'s check ran in the compiled kernel, which writes
    ``out`` in place: only for an output that autograd does not record (so no backward saved
    it)."""
    if out.requires_grad or out.dtype != q.dtype or not scanned_natively(q, k, v):
        return False
    cpu_kernels().poison_if_nonfinite_(out, [q, k, v])
    return True


def scanned_natively(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Whether the compiled kernels (``nonfinite.cpp``) scan ``q``, ``k``, ``v``: float32 /
    float64 CPU tensors of one dtype whose last dimension is contiguous, no user's dispatch
    mode watching (it could not see the kernel), and the kernels built."""
    if not q.is_cpu or q.dtype not in SCANNED_DTYPES:
        return False
    if any(t.stride(-1) != 1 or t.dtype != q.dtype for t in (q, k, v)) or ops_watched():
        return False
    return cpu_kernels() is not None


def _unchanged(out: Tensor) -> Tensor:
    return out


def _reached_from(bad: Tensor, graph: AttentionGraph) -> Tensor:
    """``(N_dst, H, C)``: an edge reads a source whose ``bad`` ``(N_src, H, C)`` is set. Sources
    are read by every target of their graph, or, causal, by targets ``i`` with
    ``pos(i) + d >= pos(j)`` (``d``: the graph's causal diagonal); so the first bad position of
    each graph decides. A window bounds both sides: :func:`_reached_in_window`. No host
    read."""
    if graph.window is not None:
        return _reached_in_window(bad, graph)
    never = max(graph.num_dst, graph.num_src)  # beyond every position
    ids_dst, ids_src = graph.graph_ids(bad.device)
    pos_dst, pos_src = graph.positions(bad.device)
    bad_at = torch.where(bad, pos_src.view(-1, 1, 1), never)
    first_bad = bad_at.new_full((max(graph.num_graphs, 1), *bad.shape[1:]), never)
    first_bad = first_bad.scatter_reduce(0, ids_src.view(-1, 1, 1).expand_as(bad_at), bad_at,
                                         "amin")
    first_bad = first_bad.index_select(0, ids_dst)
    if not graph.causal:
        return first_bad < never
    last_seen = pos_dst + graph.target_diagonals(bad.device)
    return last_seen.view(-1, 1, 1) >= first_bad


def _reached_in_window(bad: Tensor, graph: AttentionGraph) -> Tensor:
    """:func:`_reached_from` for a windowed graph: target ``i`` reads the sources at positions
    ``[first_i, last_i]`` of its graph, so it is reached where the count of bad sources up to
    ``last_i`` exceeds the count before ``first_i`` (prefix sums over the sources in graph
    order)."""
    first, last = _seen_positions(graph, bad.device)
    if graph.membership is None:
        in_order, starts = bad, torch.zeros_like(first)
    else:
        side = graph.membership.src
        in_order = bad if side.order is None else bad.index_select(0, side.order.forward)
        starts = side.ptr[:-1].index_select(0, graph.graph_ids(bad.device)[0])
    counts = torch.cumsum(in_order.to(torch.int32), dim=0)
    counts = torch.cat([counts.new_zeros(1, *bad.shape[1:]), counts])
    seen = first <= last
    upto = (starts + last + 1).where(seen, starts)
    before = (starts + first).where(seen, starts)
    return counts.index_select(0, upto) > counts.index_select(0, before)


def _seen_positions(graph: AttentionGraph, device) -> tuple[Tensor, Tensor]:
    """``(N_dst,)`` first and last source position each target sees in its graph (``first >
    last``: none)."""
    pos_dst, _ = graph.positions(device)
    ids_dst, _ = graph.graph_ids(device)
    diagonal = pos_dst + graph.target_diagonals(device)
    left, right = graph.window_sides()
    sources = graph.source_counts(device).index_select(0, ids_dst)
    first = diagonal.new_zeros(()) if left is None else (diagonal - left).clamp(min=0)
    last = sources - 1 if right is None else torch.minimum(diagonal + right, sources - 1)
    return first.expand_as(pos_dst), last


def _has_keys(graph: AttentionGraph, device) -> Tensor:
    """``(N_dst, 1, 1)``: the target has an in-edge (so an edge reads its query): its graph has
    sources, and a bottom-right causal target is not before the first one it sees (a window:
    its band meets its graph's sources)."""
    if graph.window is not None:
        first, last = _seen_positions(graph, device)
        return (first <= last).view(-1, 1, 1)
    ids_dst, _ = graph.graph_ids(device)
    has_keys = (graph.source_counts(device) > 0).index_select(0, ids_dst)
    if graph.causal and graph.bottom_right:
        pos_dst, _ = graph.positions(device)
        has_keys = has_keys & (pos_dst + graph.target_diagonals(device) >= 0)
    return has_keys.view(-1, 1, 1)
