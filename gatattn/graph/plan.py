"""Node orders and the grouping of graphs by size: how the dense route runs many complete graphs
as a few equal-shape batches, and how the varlen kernels see them as packed segments.

Plans are cached by the graph sizes themselves, so that every layer of a model derives its plan
once per batch and a plan never answers for other sizes.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from gatattn.graph.layout import HeadMajorLayout

#: Entries kept by each of the structure caches (plans here, batch memberships).
CACHE_SIZE = 8


@dataclass(frozen=True)
class SegmentGroup:
    """``count`` graphs that all have ``len_dst`` targets and ``len_src`` sources."""

    count: int
    len_dst: int
    len_src: int


@dataclass(frozen=True)
class Permutation:
    """A node order: ``forward[p]`` is the node at position ``p``; ``inverse`` undoes it."""

    forward: Tensor
    inverse: Tensor

    @classmethod
    def of(cls, forward: Tensor) -> Permutation:
        inverse = torch.empty_like(forward)
        inverse[forward] = torch.arange(forward.numel(), device=forward.device)
        return cls(forward, inverse)


@dataclass(frozen=True)
class SegmentPlan:
    """How the dense route runs many complete graphs without padding.

    Nodes are permuted so that graphs of equal size lie next to each other (keeping each graph's
    own node order); each group is then one ``(count, H, len, C)`` batch. ``order_*`` is ``None``
    when the nodes already lie in that order. ``graph_order`` lists the graph ids in that order.
    ``head_major`` keeps the plan's head-major layouts (:mod:`gatattn.graph.layout`) by head
    count and device, so that every layer of a model derives them once per batch; the plan
    never changes, so neither can they. ``runs``: where the nodes lie in graph order, the
    maximal runs of consecutive graphs of equal size in that order (each one batch with no
    permutation; :meth:`runs_serve`), else ``None``.
    """

    groups: list[SegmentGroup]
    order_dst: Permutation | None = None
    order_src: Permutation | None = None
    graph_order: tuple[int, ...] = (0,)
    runs: list[SegmentGroup] | None = None
    head_major: dict[tuple[int, str], HeadMajorLayout] = field(
        default_factory=dict, compare=False, repr=False)

    @functools.cached_property  # (asked on every call: the plan never changes)
    def longest(self) -> int:
        """The most targets or sources of any graph (0 without graphs)."""
        return max((max(g.len_dst, g.len_src) for g in self.groups), default=0)

    @functools.cached_property
    def runs_serve(self) -> bool:
        """Whether the dense route takes the runs instead of permuting nodes into the groups:
        they exist, a permutation would be needed, and they are at most an eighth more calls
        (graphs of many sizes, or of equal sizes mostly adjacent: a gather of every row of
        ``q``, ``k``, ``v`` and the output, forward and backward, saved for a few calls)."""
        if self.runs is None or (self.order_dst is None and self.order_src is None):
            return False
        return len(self.runs) - len(self.groups) <= len(self.groups) // 8


@dataclass(frozen=True)
class PackedSegments:
    """The varlen kernels' view of an implicit graph: nodes in graph order (``order_*`` is
    ``None`` when they already are) and segment offsets ``cu_seqlens_*`` of shape (B + 1,)."""

    order_dst: Permutation | None
    order_src: Permutation | None
    cu_seqlens_dst: Tensor
    cu_seqlens_src: Tensor


def segment_plan(sizes_dst: list[int], sizes_src: list[int] | None, order_dst: Permutation | None,
                 order_src: Permutation | None, device) -> SegmentPlan:
    """The grouping by size of graphs with these sizes (``sizes_src`` ``None``:
    self-attention) whose nodes ``order_*`` puts in graph order (``None``: they already are).

    The grouping of nodes already in graph order is cached by the sizes themselves, so that it
    cannot go stale."""
    key = (tuple(sizes_dst), None if sizes_src is None else tuple(sizes_src), str(device),
           torch.is_inference_mode_enabled())
    ordered = _plan_cache.get(key)
    if ordered is None:
        ordered = _plan_from_sizes(sizes_dst, sizes_src, device)
        if len(_plan_cache) >= CACHE_SIZE:
            _plan_cache.pop(next(iter(_plan_cache)))
        _plan_cache[key] = ordered
    if order_dst is None and order_src is None:
        return ordered  # the cached plan itself, with what was derived from it
    # (nodes not in graph order: no runs)
    return SegmentPlan(ordered.groups, _then(order_dst, ordered.order_dst),
                       _then(order_src, ordered.order_src), ordered.graph_order)


_plan_cache: dict[tuple, SegmentPlan] = {}


def _plan_from_sizes(sizes_dst: list[int], sizes_src: list[int] | None, device) -> SegmentPlan:
    both = sizes_dst if sizes_src is None else sizes_src
    # Graphs ordered by (len_dst, len_src), stably, so equal shapes become neighbours.
    graph_order = sorted(range(len(sizes_dst)), key=lambda g: (sizes_dst[g], both[g]))
    groups = [SegmentGroup(len(list(members)), d, s) for (d, s), members in itertools.groupby(
        graph_order, key=lambda g: (sizes_dst[g], both[g]))]
    order_dst = _grouped_order(sizes_dst, graph_order, device)
    order_src = order_dst if sizes_src is None else _grouped_order(sizes_src, graph_order, device)
    runs = [SegmentGroup(len(list(members)), d, s) for (d, s), members in itertools.groupby(
        range(len(sizes_dst)), key=lambda g: (sizes_dst[g], both[g]))]
    return SegmentPlan(groups, order_dst, order_src, tuple(graph_order), runs=runs)


def _grouped_order(sizes: list[int], graph_order: list[int], device) -> Permutation | None:
    """The node permutation that lists the graphs (nodes in graph order) in ``graph_order``;
    ``None`` if it is the identity, which the host sizes tell without a read."""
    nonempty = [g for g in graph_order if sizes[g]]
    if all(a < b for a, b in itertools.pairwise(nonempty)):
        return None
    starts = list(itertools.accumulate(sizes, initial=0))
    lengths = [sizes[g] for g in graph_order]
    new_starts = list(itertools.accumulate(lengths, initial=0))[:-1]
    shifts = [starts[g] - new for g, new in zip(graph_order, new_starts, strict=True)]  # old - new
    num_nodes = starts[-1]
    forward = torch.arange(num_nodes, device=device) + torch.repeat_interleave(
        torch.tensor(shifts, device=device), torch.tensor(lengths, device=device),
        output_size=num_nodes)
    return Permutation.of(forward)


def _then(first: Permutation | None, second: Permutation | None) -> Permutation | None:
    """Applying ``first`` then ``second`` as one permutation."""
    if first is None or second is None:
        return second if first is None else first
    return Permutation.of(first.forward[second.forward])
