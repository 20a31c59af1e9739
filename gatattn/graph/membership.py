"""Which graph each target and source is in, parsed from ``batch`` or ``ptr``.

One parser, :func:`parse_membership`, reads a ``batch`` or ``ptr`` (or a bipartite pair of
either) into a :class:`Membership`; a given ``ptr`` is kept as it is (the fused kernels'
``cu_seqlens``). Its compile-safe mode (:func:`graph_membership`) reads nothing and gives each
node's graph id.

**Host reads.** Reading a device value on the host (``.item()``, ``.tolist()``, ``int(t)``)
waits for the device to finish; a layer call should do it at most once. Validated, the parser
therefore gathers everything the host needs (``ptr``'s values, a batch's graph count and sizes,
the caller's extra flags) into one :func:`read_host`, checks ``ptr`` on the host from those
values, and derives the rest from them.

**Reuse across layers** is :mod:`gatattn.graph.reuse`'s: it keeps the graphs built from a
call's ``batch`` / ``ptr``, so that every layer of a model derives them once per batch.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

from gatattn.graph.checks import (
    assert_ptr_on_device,
    check_batch,
    check_node_counts,
    checked_sizes,
    differences,
    ptr_tensor,
    split_pair,
)
from gatattn.graph.plan import Permutation, SegmentPlan, segment_plan
from gatattn.transforms import compiling


class Side:
    """One side (targets or sources) of a batch of graphs.

    ``ptr`` ``(B + 1,)`` holds the graph offsets once the nodes are in graph order, which
    ``order`` puts them in (``None``: they already are); ``sizes`` are the graph sizes on the
    host (``None`` until read).
    """

    def __init__(self, num_nodes: int, ptr: Tensor, *, batch: Tensor | None = None,
                 order: Permutation | None = None, sizes: list[int] | None = None) -> None:
        self.num_nodes, self.ptr, self.order, self.sizes = num_nodes, ptr, order, sizes
        self._batch = batch

    def to(self, device) -> Side:
        order = None if self.order is None else Permutation(self.order.forward.to(device),
                                                             self.order.inverse.to(device))
        batch = None if self._batch is None else self._batch.to(device)
        return Side(self.num_nodes, self.ptr.to(device), batch=batch, order=order,
                    sizes=self.sizes)

    @property
    def batch(self) -> Tensor:
        """Graph id per node, derived from ``ptr`` when not given (no host read)."""
        if self._batch is None:
            self._batch = ptr_to_batch(self.ptr, self.num_nodes)
        return self._batch

    def counts(self) -> Tensor:
        """Nodes per graph, on the device."""
        return self.ptr[1:] - self.ptr[:-1]

    def positions(self) -> Tensor:
        """Each node's position inside its graph (order of appearance), no host read."""
        rank = torch.arange(self.num_nodes, device=self.ptr.device)  # position in graph order
        if self.order is None:
            return rank - self.ptr[self.batch]
        nodes = self.order.forward
        positions = torch.empty_like(rank)
        positions[nodes] = rank - self.ptr[self.batch[nodes]]
        return positions


class Membership:
    """Which graph each target and source is in (``src is dst`` for self-attention), and the
    grouping by size derived from it once."""

    def __init__(self, dst: Side, src: Side, num_graphs: int) -> None:
        self.dst, self.src, self.num_graphs = dst, src, num_graphs
        self._plan: SegmentPlan | None = None

    def to(self, device) -> Membership:
        dst = self.dst.to(device)
        return Membership(dst, dst if self.src is self.dst else self.src.to(device),
                          self.num_graphs)

    @property
    def sides(self) -> tuple[Side, ...]:
        return (self.dst,) if self.src is self.dst else (self.dst, self.src)

    def host_sizes(self) -> tuple[list[int], list[int]]:
        unread = [side for side in self.sides if side.sizes is None]
        for side, ptr in zip(unread, read_host([s.ptr for s in unread]), strict=True):
            side.sizes = differences(ptr)
        return self.dst.sizes, self.src.sizes

    def segment_plan(self) -> SegmentPlan:
        if self._plan is None:
            sizes_dst, sizes_src = self.host_sizes()
            self._plan = segment_plan(sizes_dst, None if self.src is self.dst else sizes_src,
                                      self.dst.order, self.src.order, self.dst.ptr.device)
        return self._plan


#: What :func:`parse_membership` gives: a :class:`Membership`; traced, the graph ids
#: ``(batch_dst, batch_src)``; ``None`` without ``batch`` and ``ptr``.
Parsed = Membership | tuple[Tensor, Tensor] | None


def parse_membership(num_dst: int | None, num_src: int | None, batch, ptr, bipartite: bool,
                     validate: bool, extra: list[Tensor],
                     traced: bool = False) -> tuple[Parsed, list[list[int]]]:
    """The :class:`Membership` the caller describes, and ``extra`` read along with it.

    ``batch`` / ``ptr`` are tensors, or ``(dst, src)`` pairs when ``bipartite``; ``num_dst`` /
    ``num_src`` ``None``: ``ptr``'s last values (validated ``ptr`` only). ``traced`` is the
    compile-safe mode: a bipartite ``ptr`` pair is not padded to one length
    (a size comparison a tracer would guard on), a ``batch`` is not read, and the result is
    each node's graph id ``(batch_dst, batch_src)``; with ``validate=False`` it then reads
    nothing (``ptr`` is checked by a device-side assertion)."""
    if num_dst is not None:
        check_node_counts(num_dst, num_src, bipartite)
    if batch is not None and ptr is not None:
        raise ValueError("got both batch and ptr; give either batch or ptr, not both")
    ptr_dst, ptr_src = split_pair("ptr", ptr, bipartite)
    if ptr_dst is not None:
        return _from_ptr(ptr_dst, ptr_src, num_dst, num_src, validate, extra, traced)
    batch_dst, batch_src = split_pair("batch", batch, bipartite)
    if batch_dst is not None:
        return _from_batch(batch_dst, batch_src, num_dst, num_src, validate, extra, traced)
    return None, read_host(extra)


def _from_ptr(ptr_dst: Tensor, ptr_src: Tensor, num_dst: int | None, num_src: int | None,
              validate: bool, extra: list[Tensor], traced: bool) -> tuple[Parsed, list[list[int]]]:
    """``ptr`` is used as it is; validated, it is read once (self-attention: one tensor)."""
    same = ptr_src is ptr_dst
    ptr_dst = ptr_tensor("ptr", ptr_dst)
    ptr_src = ptr_dst if same else ptr_tensor("ptr", ptr_src)
    if not traced:
        ptr_dst, ptr_src = _same_length(ptr_dst, ptr_src)
    sides = [(ptr_dst, num_dst)] if same else [(ptr_dst, num_dst), (ptr_src, num_src)]
    sizes = [None] * len(sides)
    if num_dst is None and not validate:
        raise ValueError("give num_nodes: without validation (under torch.compile) ptr's "
                         "values, which give the node counts, are not read")
    if validate:
        values = read_host([p for p, _ in sides] + extra)
        if num_dst is None:  # the node counts are ptr's last values
            sides = [(p, v[-1]) for (p, _), v in zip(sides, values, strict=False)]
            num_dst, num_src = sides[0][1], sides[-1][1]
            check_node_counts(num_dst, num_src, bipartite=not same)
        sizes = [checked_sizes("ptr", v, n)
                 for v, (_, n) in zip(values[:len(sides)], sides, strict=True)]
        extra_values = values[len(sides):]
    else:
        for p, n in sides:
            assert_ptr_on_device("ptr", p, n)
        extra_values = read_host(extra)
    dst = Side(num_dst, ptr_dst, sizes=sizes[0])
    src = dst if same else Side(num_src, ptr_src, sizes=sizes[1])
    if traced:
        return (dst.batch, src.batch), extra_values
    return Membership(dst, src, ptr_dst.numel() - 1), extra_values


def _same_length(ptr_dst: Tensor, ptr_src: Tensor) -> tuple[Tensor, Tensor]:
    """Pads the shorter of a bipartite pair with empty trailing graphs (no host read)."""
    missing = ptr_dst.numel() - ptr_src.numel()
    if missing > 0:
        ptr_src = torch.cat([ptr_src, ptr_src[-1:].expand(missing)])
    elif missing < 0:
        ptr_dst = torch.cat([ptr_dst, ptr_dst[-1:].expand(-missing)])
    return ptr_dst, ptr_src


def _from_batch(batch_dst: Tensor, batch_src: Tensor, num_dst: int, num_src: int,
                validate: bool, extra: list[Tensor],
                traced: bool) -> tuple[Parsed, list[list[int]]]:
    """Derived from private copies of the ids (the membership keeps them; the caller may
    write its tensors), in one host read with ``extra``."""
    same = batch_src is batch_dst
    check_batch("batch", batch_dst, num_dst, "queries (x_dst)")
    if not same:
        check_batch("batch", batch_src, num_src, "keys (x_src)")
    if traced:
        return (batch_dst.long(), batch_src.long()), read_host(extra)
    batches = (batch_dst,) if same else (batch_dst, batch_src)
    if compiling():  # traced: no ids to keep
        return _membership_of_ids(tuple(b.long() for b in batches), validate, extra)
    return _membership_of_ids(tuple(b.long().clone() for b in batches), validate, extra)


def _membership_of_ids(ids: tuple[Tensor, ...], validate: bool,
                       extra: list[Tensor]) -> tuple[Membership, list[list[int]]]:
    """One host read (with ``extra``): each side's id range, whether its nodes are already in
    graph order, and its graph sizes, counted into ``numel + 1`` slots (ids above the node
    count share the last slot; where one does, its sizes take a second read)."""
    # (Unvalidated, a negative id fails index_add_ rather than count as graph 0.)
    slots = [torch.zeros(b.numel() + 1, dtype=torch.long, device=b.device).index_add_(
        0, b.clamp(min=0 if validate else None, max=b.numel()), torch.ones_like(b)) for b in ids]
    summaries = [torch.cat([torch.stack([b.min(), b.max()]) if b.numel() else
                            b.new_tensor([0, -1]), (b[1:] >= b[:-1]).all().reshape(1)])
                 for b in ids]
    values = read_host([t for pair in zip(summaries, slots, strict=True) for t in pair] + extra)
    extra_values = values[2 * len(ids):]
    summaries, slots = values[0:2 * len(ids):2], values[1:2 * len(ids):2]
    nonempty = [s for s, b in zip(summaries, ids, strict=True) if b.numel()]
    low = min((s[0] for s in nonempty), default=0)
    if validate and low < 0:
        raise ValueError(f"batch must hold graph ids >= 0, got min {low}")
    num_graphs = max((s[1] for s in nonempty), default=-1) + 1
    sides = []
    for b, (_, high, ordered), counted in zip(ids, summaries, slots, strict=True):
        if high <= b.numel():  # every id has its own slot
            sizes = (counted + [0] * num_graphs)[:num_graphs]
        else:
            count = torch.zeros(num_graphs, dtype=torch.long, device=b.device)
            [sizes] = read_host([count.index_add_(0, b, torch.ones_like(b))])
        ptr = b.new_tensor([0, *itertools.accumulate(sizes)])
        order = None if ordered else Permutation.of(torch.sort(b, stable=True).indices)
        sides.append(Side(b.numel(), ptr, batch=b, order=order, sizes=sizes))
    dst, src = sides[0], sides[-1]
    return Membership(dst, src, num_graphs), extra_values


def graph_membership(
    num_dst: int,
    num_src: int,
    *,
    batch: Tensor | tuple[Tensor, Tensor] | None = None,
    ptr: Tensor | tuple[Tensor, Tensor] | None = None,
    bipartite: bool = False,
    validate: bool = True,
) -> tuple[Tensor | None, Tensor | None]:
    """Graph id per target and per source, ``(batch_dst, batch_src)``, from ``batch`` or ``ptr``
    (``None`` each without them): :func:`parse_membership`'s compile-safe mode. Reads no tensor
    value with ``validate=False`` (``ptr`` is then checked by a device-side assertion), so it
    traces under ``torch.compile`` without a graph break."""
    ids, _ = parse_membership(num_dst, num_src, batch, ptr, bipartite, validate, [],
                              traced=True)
    return (None, None) if ids is None else ids


def read_host(parts: list[Tensor]) -> list[list[int]]:
    """The values of several 1-D integer (or bool) tensors on one device, in ONE host read."""
    if not parts:
        return []
    if compiling():
        # Traced, the values would be unbacked symbols that the next read's sizes depend on:
        # break the graph and read them eagerly (fullgraph=True refuses it as unsupported).
        torch._dynamo.graph_break()
    values = torch.cat([p.long() for p in parts]).tolist()  # the one device-to-host read
    bounds = list(itertools.accumulate((p.numel() for p in parts), initial=0))
    return [values[start:end] for start, end in itertools.pairwise(bounds)]


def ptr_to_batch(ptr: Tensor, num_nodes: int) -> Tensor:
    """``ptr`` (B+1,) -> per-node graph ids (num_nodes,): node ``i`` lies in the last graph
    that starts at or before it (empty graphs start where the next one does). A search rather
    than ``ptr[1:] - ptr[:-1]``, whose size a tracer would specialise for one graph."""
    nodes = torch.arange(num_nodes, device=ptr.device, dtype=ptr.dtype)
    if torch.onnx.is_in_onnx_export():
        # ONNX has no search: count the graph starts at or before each node (O(N * B), less
        # than the dense attention that export runs).
        return (ptr.unsqueeze(0) <= nodes.unsqueeze(1)).sum(1) - 1
    return torch.searchsorted(ptr, nodes, right=True) - 1


def local_positions(batch: Tensor | None, num_nodes: int, device=None) -> Tensor:
    """Position of every node inside its own graph, in order of appearance (the sequence order
    that ``causal`` and positional encodings use)."""
    if batch is None:
        return torch.arange(num_nodes, device=device)
    order = torch.sort(batch, stable=True).indices
    sorted_batch = batch[order]
    num_graphs = int(sorted_batch[-1]) + 1 if num_nodes else 0
    starts = torch.cumsum(torch.bincount(sorted_batch, minlength=num_graphs), 0)
    starts = torch.cat([starts.new_zeros(1), starts[:-1]])
    positions = torch.empty_like(batch)
    positions[order] = torch.arange(num_nodes, device=batch.device) - starts[sorted_batch]
    return positions
