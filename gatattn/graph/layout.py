"""The head-major layout of a batch of graphs: the node order in which the SDPA route's biased
attention reads every size group as one contiguous ``(count * H, len, C)`` batch, and the
order of the stacked bias's pair rows that goes with it. Derived from the graph's sizes and
its :class:`~gatattn.graph.SegmentPlan`, and kept with the plan (for every layer of a model)."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from gatattn.graph.plan import Permutation, SegmentPlan

if TYPE_CHECKING:
    from gatattn.graph.attention_graph import AttentionGraph


class HeadMajorLayout:
    """Permutations of ``(N_dst * H, C)`` query rows and ``(N_src * H, C)`` key / value rows
    into (group, graph, head, position) order, and of the stacked bias rows into (group, graph,
    pair) order. The bias's, 16 bytes per pair, is built when a call with a bias first asks
    for it (the logits route reads the node rows only)."""

    def __init__(self, dst: Permutation, src: Permutation,
                 pair_rows: Callable[[], Permutation]) -> None:
        self.dst, self.src = dst, src
        self._pair_rows, self._bias = pair_rows, None

    @property
    def bias(self) -> Permutation:
        if self._bias is None:
            # Normal tensors even when first asked under inference mode: the layout serves
            # both (a biased call's backward saves these indices).
            with torch.inference_mode(False):
                self._bias = self._pair_rows()
        return self._bias


#: A head-major layout is kept with its plan (for every layer of a model) up to this many
#: bias pairs: its indices take 16 bytes per pair and per node and head.
MAX_KEPT_LAYOUT_PAIRS = 2**22


def head_major_layout(graph: AttentionGraph, plan: SegmentPlan, heads: int,
                      device) -> HeadMajorLayout:
    """The plan's layout for ``heads`` heads, kept with the plan when it is small."""
    key = (heads, str(device))
    layout = plan.head_major.get(key)
    if layout is None:
        # Normal tensors even when first built under inference mode: the layout is kept for
        # every later call, and a training call's backward saves these indices.
        with torch.inference_mode(False):
            layout = _build_head_major_layout(graph, plan, heads, device)
        pairs = sum(d * s for d, s in zip(*graph.host_sizes(), strict=True))
        if pairs <= MAX_KEPT_LAYOUT_PAIRS:
            plan.head_major[key] = layout
    return layout


def _build_head_major_layout(graph: AttentionGraph, plan: SegmentPlan, heads: int,
                             device) -> HeadMajorLayout:
    """Built from the graph sizes on the host and a few element-wise passes on the device:
    forward and inverse indices are both written out, none is found by a scatter (which for
    the bias's pairs cost more than the attention's own gathers)."""
    sizes_dst, sizes_src = graph.host_sizes()
    order = plan.graph_order
    dst = _head_major_rows(plan.order_dst, [sizes_dst[b] for b in order], heads, device)
    same_nodes = plan.order_src is plan.order_dst and sizes_src == sizes_dst  # self-attention
    src = dst if same_nodes else _head_major_rows(plan.order_src, [sizes_src[b] for b in order],
                                                  heads, device)
    return HeadMajorLayout(dst, src, lambda: _pair_rows(order, sizes_dst, sizes_src, device))


def _head_major_rows(order: Permutation | None, lengths: list[int], heads: int,
                     device) -> Permutation:
    """Row ``node * H + h`` of a ``(num_nodes * H, C)`` view, ordered by graph, head and
    position; ``order`` lists the nodes graph after graph, the graphs ``lengths`` long."""
    num_nodes = sum(lengths)
    lengths_t = torch.tensor(lengths, device=device)
    starts = torch.cumsum(lengths_t, 0) - lengths_t  # each graph's first position in order
    # forward: head-major slot -> (graph, head, position) -> row
    slots = torch.arange(num_nodes * heads, device=device)
    per_slot = lengths_t * heads
    length = lengths_t.repeat_interleave(per_slot, output_size=num_nodes * heads)
    start = starts.repeat_interleave(per_slot, output_size=num_nodes * heads)
    offset = slots - start * heads  # inside the graph's (H, length) block
    head = offset.div(length, rounding_mode="floor")
    position = offset - head * length
    nodes = start + position if order is None else order.forward[start + position]
    forward = nodes * heads + head
    # inverse: (node in order, head) -> head-major slot, then rows by node id
    length = lengths_t.repeat_interleave(lengths_t, output_size=num_nodes)
    start = starts.repeat_interleave(lengths_t, output_size=num_nodes)
    position = torch.arange(num_nodes, device=device) - start
    slot = ((start * heads + position).unsqueeze(1)
            + torch.arange(heads, device=device).unsqueeze(0) * length.unsqueeze(1))
    if order is not None:
        slot = slot.index_select(0, order.inverse)
    return Permutation(forward, slot.flatten())


def _pair_rows(order: tuple[int, ...], sizes_dst: list[int], sizes_src: list[int],
               device) -> Permutation:
    """The stacked bias's rows (graph blocks in id order) with the blocks in ``order``: each
    block moves whole, so both directions are an arange plus a per-block shift."""
    blocks = [d * s for d, s in zip(sizes_dst, sizes_src, strict=True)]
    offsets = list(itertools.accumulate(blocks, initial=0))
    moved = [blocks[b] for b in order]
    moved_offsets = list(itertools.accumulate(moved, initial=0))
    new_offset = dict(zip(order, moved_offsets, strict=False))
    total = offsets[-1]

    def shifted(shifts: list[int], lengths: list[int]) -> Tensor:
        steps = torch.tensor(shifts, device=device).repeat_interleave(
            torch.tensor(lengths, device=device), output_size=total)
        return torch.arange(total, device=device) + steps

    forward = shifted([offsets[b] - moved_offsets[i] for i, b in enumerate(order)], moved)
    inverse = shifted([new_offset[b] - offsets[b] for b in range(len(blocks))], blocks)
    return Permutation(forward, inverse)
