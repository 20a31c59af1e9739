"""Where :func:`gatattn.distributed.ring_attention` keeps each node, the graphs it runs, and
which attention calls one (query shard, key block) pair needs.

A *layout* gives each rank a sorted tuple of global row intervals ``[start, stop)``; the
intervals of all ranks partition ``[0, N)``, and a rank stores its intervals' rows one after
the other. Two intervals of one layout are therefore either the same or disjoint, which is
what lets every (query interval, key interval) pair be classified as complete, causal
diagonal, or empty; with a sliding window, as the window's own band (the same interval) or the
window shifted onto the one graph two disjoint intervals share (:func:`windowed_block_calls`),
of which only the rows the calls read travel (:func:`read_span`).
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass, replace
from itertools import accumulate
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from gatattn.graph import AttentionGraph
from gatattn.graph.switches import Window, window_mode

Interval = tuple[int, int]
Layout = tuple[tuple[Interval, ...], ...]  # per rank


def contiguous_layout(sizes) -> Layout:
    """Rank ``r`` holds the ``sizes[r]`` rows after those of lower ranks (the caller's)."""
    starts = [0, *accumulate(sizes)]
    return tuple(_normal([(starts[r], starts[r + 1])]) for r in range(len(sizes)))


def zigzag_layout(num_nodes: int, world: int) -> Layout:
    """The rows cut into ``2P`` chunks as even as possible; rank ``r`` holds chunks ``r`` and
    ``2P - 1 - r``, one early and one late, so that every rank has the same number of causal
    (query, key) pairs to within a chunk's rounding."""
    bounds = [c * num_nodes // (2 * world) for c in range(2 * world + 1)]
    return tuple(_normal([(bounds[r], bounds[r + 1]),
                          (bounds[2 * world - 1 - r], bounds[2 * world - r])])
                 for r in range(world))


def _normal(intervals) -> tuple[Interval, ...]:
    """Sorted, without empty intervals. Touching intervals stay apart: rank P - 1's two
    zig-zag chunks then make the same calls as every other rank's (a causal chunk, then a chunk
    against both), not one causal call over both, which a route may compute at full cost."""
    return tuple(sorted(i for i in intervals if i[1] > i[0]))


def rows(holding: tuple[Interval, ...]) -> int:
    return sum(stop - start for start, stop in holding)


def _local_starts(holding: tuple[Interval, ...]) -> list[int]:
    return [0, *accumulate(stop - start for start, stop in holding)]


def graph_sizes(graph, ptr, batch, causal, window=None) -> GraphSpec:
    """What ``graph=``, or ``ptr`` / ``batch`` / ``causal`` / ``window``, describe."""
    if graph is not None:
        given = [name for name, value in (("ptr", ptr), ("batch", batch), ("causal", causal),
                                          ("window", window))
                 if value is not None and value is not False]
        if given:
            raise ValueError(f"graph= already describes the graph; got {', '.join(given)} as "
                             "well: give them to gatattn.build_graph(...) instead, or drop graph=")
        causal, window, sizes = _sizes_of_graph(graph)
    else:
        window = window_mode(window, causal is True)  # (a causal not bool is refused later)
        if ptr is not None and batch is not None:
            raise ValueError("give the batch as ptr or as batch, not both")
        if ptr is None and batch is None:
            return GraphSpec(causal, window, -1, None)
        sizes = _sizes_from_ptr(ptr) if ptr is not None else _sizes_from_batch(batch)
    return GraphSpec(causal, window, sum(sizes), sizes if len(sizes) > 1 else None)


class GraphSpec(NamedTuple):
    causal: bool
    window: Window | None  # as window_mode states it: None keeps every (causal) pair
    total: int  # node count, -1 where nothing gives it
    sizes: list[int] | None  # node count of each graph of a batch, None for one graph


def _sizes_of_graph(graph) -> tuple[bool, Window | None, list[int]]:
    if not isinstance(graph, AttentionGraph):
        raise TypeError(f"graph must be a gatattn.AttentionGraph (gatattn.build_graph(...)), "
                        f"got {type(graph).__name__}")
    membership = graph.membership
    if (not graph.is_implicit or graph.bipartite
            or (membership is not None and membership.src is not membership.dst)):
        raise ValueError(f"ring_attention runs complete graphs (one, or a batch of them) over "
                         f"the nodes of all ranks, got {graph!r}; build it with "
                         "gatattn.build_graph(num_nodes=N, causal=...) or build_graph(ptr=..., "
                         "causal=...), N the nodes of all ranks")
    if membership is None:
        return graph.causal, graph.window, [graph.num_dst]
    if membership.dst.order is not None:
        raise ValueError("ring_attention shards contiguous rows: each graph of the batch must "
                         "be a contiguous run of nodes (sort the batch vector, as PyG's Batch "
                         "is)")
    return graph.causal, graph.window, graph.host_sizes()[0]  # known to it: no second read


def _sizes_from_ptr(ptr) -> list[int]:
    if isinstance(ptr, (tuple, list)) or not isinstance(ptr, Tensor) or ptr.dim() != 1:
        raise ValueError("ptr must be one (B + 1,) tensor of graph offsets over the nodes of "
                         "all ranks (self-attention: no (ptr_dst, ptr_src) pair)")
    if ptr.dtype.is_floating_point or ptr.dtype.is_complex or ptr.numel() < 2:
        raise ValueError(f"ptr must hold B + 1 >= 2 integer offsets, got {ptr.dtype} of shape "
                         f"{tuple(ptr.shape)}")
    offsets = ptr.tolist()
    sizes = [b - a for a, b in zip(offsets, offsets[1:], strict=False)]
    if offsets[0] != 0 or min(sizes) < 0:
        raise ValueError(f"ptr must start at 0 and never decrease, got {offsets[:8]}...")
    return sizes


def _sizes_from_batch(batch) -> list[int]:
    if not isinstance(batch, Tensor) or batch.dim() != 1 or batch.dtype.is_floating_point:
        raise ValueError("batch must be one (N,) integer tensor of graph ids over the nodes of "
                         "all ranks (self-attention: no (batch_dst, batch_src) pair)")
    if batch.numel() and (batch.min() < 0 or bool((batch[1:] < batch[:-1]).any())):
        raise ValueError("ring_attention shards contiguous rows: batch must be sorted (each "
                         "graph a contiguous run of nodes, as in PyG's Batch) and >= 0")
    return torch.bincount(batch.cpu()).tolist() if batch.numel() else [0]


def _intersections(mine: tuple[Interval, ...], theirs: tuple[Interval, ...]):
    """``(global start, global stop)`` of each overlap, in global order."""
    return [(max(a, c), min(b, d)) for a, b in mine for c, d in theirs if max(a, c) < min(b, d)]


def _local_slice(holding: tuple[Interval, ...], start: int, stop: int) -> slice:
    """The local rows of global rows ``[start, stop)``, which lie in one interval."""
    for (a, b), local in zip(holding, _local_starts(holding), strict=False):
        if a <= start and stop <= b:
            return slice(local + start - a, local + stop - a)
    raise AssertionError("rows outside the holding")


def move_rows(x: Tensor, source: Layout, target: Layout, rank: int, group, peer) -> Tensor:
    """This rank's rows of ``target``, given its rows ``x`` of ``source``: each overlap of two
    ranks' holdings travels once, point to point (``peer`` maps a rank of ``group`` to the rank
    that ``P2POp`` takes)."""
    out = x.new_empty((rows(target[rank]), *x.shape[1:]))
    x = x.contiguous()
    ops = []
    for other in range(len(source)):
        for start, stop in _intersections(source[rank], target[other]):
            piece = x[_local_slice(source[rank], start, stop)]
            if other == rank:
                out[_local_slice(target[rank], start, stop)] = piece
            else:
                ops.append(dist.P2POp(dist.isend, piece, peer(other), group))
        if other != rank:  # received in the order the sender sends: global order
            ops += [dist.P2POp(dist.irecv, out[_local_slice(target[rank], start, stop)],
                               peer(other), group)
                    for start, stop in _intersections(source[other], target[rank])]
    for work in dist.batch_isend_irecv(ops) if ops else []:
        work.wait()
    return out


class MoveRows(torch.autograd.Function):
    """:func:`move_rows` from ``source`` to ``target``; the backward moves the gradient back."""

    @staticmethod
    def forward(ctx, t, source, target, rank, group, peer):
        ctx.route = (target, source, rank, group, peer)
        return move_rows(t, source, target, rank, group, peer)

    @staticmethod
    def backward(ctx, grad):
        return move_rows(grad, *ctx.route), None, None, None, None, None


@dataclass(frozen=True)
class BlockCall:
    """One ``gatattn.attention`` call of a (query shard, key block) pair: local query rows
    ``rows`` against the concatenated local key slices ``keys``, complete per graph, or causal
    aligned bottom-right (the keys end with the queries' own interval) when ``diagonal``, or
    inside ``window``. ``ptr`` is ``(ptr_dst, ptr_src)`` of the graphs the queries touch,
    ``None`` for one graph; the keys are then trimmed to those graphs' rows."""

    rows: slice
    keys: tuple[slice, ...]
    diagonal: bool
    ptr: tuple[list[int], list[int]] | None
    #: Windowed: the call's own ``window=(left, right)`` over its local rows, in every graph
    #: of the call (:func:`windowed_block_calls`).
    window: Window | None = None

    def key_rows(self, t: Tensor) -> Tensor:
        parts = [t[s] for s in self.keys]
        return parts[0] if len(parts) == 1 else torch.cat(parts)


def block_calls(queries: tuple[Interval, ...], keys: tuple[Interval, ...], causal: bool,
                graph_sizes: list[int] | None) -> list[BlockCall]:
    """The calls that attend this rank's query intervals to one key block: per query interval,
    every key interval for full attention; with causal, the key intervals wholly before it and,
    on the diagonal, its own (last). Consecutive query intervals that see the same keys
    completely share a call. Calls that hold no (query, key) pair of one graph are dropped."""
    q_starts, k_starts = _local_starts(queries), _local_starts(keys)
    groups: list[list] = []  # [first query index, last query index, key indices, diagonal]
    for i, (start, _) in enumerate(queries):
        seen = [j for j, (_, stop) in enumerate(keys) if not causal or stop <= start]
        diagonal = causal and queries[i] in keys
        seen += [keys.index(queries[i])] if diagonal else []
        if not seen:
            continue
        last = groups[-1] if groups else None
        if last and last[1] == i - 1 and last[2] == seen and not (diagonal or last[3]):
            last[1] = i
        else:
            groups.append([i, i, seen, diagonal])
    calls = []
    for first, final, seen, diagonal in groups:
        rows = slice(q_starts[first], q_starts[final + 1])
        key_slices = tuple(slice(k_starts[j], k_starts[j + 1]) for j in seen)
        ptr = None
        if graph_sizes is not None:
            trimmed = _graph_pair(queries[first:final + 1], [keys[j] for j in seen], graph_sizes)
            if trimmed is None:
                continue
            ptr, (skip, keep) = trimmed
            key_slices = _sub_slices(key_slices, skip, keep)
        calls.append(BlockCall(rows, key_slices, diagonal, ptr))
    return calls


def _graph_pair(queries, keys, graph_sizes):
    """``((ptr_dst, ptr_src), (skipped key rows, kept key rows))`` over the graphs from the
    first to the last that holds one of the queries, or ``None`` if no such graph holds a key
    as well."""
    ends = list(accumulate(graph_sizes))
    starts = [end - size for end, size in zip(ends, graph_sizes, strict=True)]

    def counts(intervals):
        return [sum(max(0, min(b, e) - max(a, s)) for a, b in intervals)
                for s, e in zip(starts, ends, strict=True)]

    dst, src = counts(queries), counts(keys)
    touched = [g for g, n in enumerate(dst) if n > 0]
    if not touched or not any(dst[g] and src[g] for g in touched):
        return None
    first, last = touched[0], touched[-1] + 1
    ptr_dst = [0, *accumulate(dst[first:last])]
    ptr_src = [0, *accumulate(src[first:last])]
    return (ptr_dst, ptr_src), (sum(src[:first]), ptr_src[-1])


def _sub_slices(slices: tuple[slice, ...], skip: int, keep: int) -> tuple[slice, ...]:
    """The local slices of rows ``[skip, skip + keep)`` of the concatenation of ``slices``."""
    out, offset = [], 0
    for s in slices:
        length = s.stop - s.start
        lo, hi = max(skip, offset), min(skip + keep, offset + length)
        if lo < hi:
            out.append(slice(s.start + lo - offset, s.start + hi - offset))
        offset += length
    return tuple(out)


def windowed_block_calls(queries: tuple[Interval, ...], keys: tuple[Interval, ...],
                         window: Window, graph_sizes: list[int] | None) -> list[BlockCall]:
    """The calls of a sliding window ``(left, right)`` (causal: ``right`` 0): global query
    ``i`` sees global key ``j`` of its graph iff ``-left <= j - i <= right``. One call per
    (query interval, key interval) pair, as positions matter: the same interval is one call
    with the window's own band (every graph of a batch in it, each with as many keys as
    queries); two different intervals share at most one graph (they are disjoint), whose part
    is trimmed to the queries that see a key and the keys seen, the window shifted by the
    distance between their first rows. Pairs with nothing in the band make no call: far
    blocks are never computed."""
    left, right = window
    calls = []
    for q_interval in queries:
        for k_interval in keys:
            if q_interval == k_interval:
                call = _diagonal_window_call(q_interval, queries, keys, window, graph_sizes)
            else:
                overlap = _shared_graph(q_interval, k_interval, graph_sizes)
                call = overlap and _shifted_window_call(*overlap, queries, keys, left, right)
            if call:
                calls.append(call)
    return calls


def _diagonal_window_call(interval, queries, keys, window, graph_sizes) -> BlockCall:
    left, right = window
    rows = _local_slice(queries, *interval)
    key_slice = _local_slice(keys, *interval)
    ptr = None if graph_sizes is None else _graph_pair([interval], [interval], graph_sizes)[0]
    return BlockCall(rows, (key_slice,), False, ptr, (left, right))


def _shared_graph(q_interval, k_interval, graph_sizes):
    """``(query rows, key rows)``: the global intervals of the one graph that holds rows of
    both disjoint intervals, or ``None``."""
    if graph_sizes is None:
        return q_interval, k_interval
    ends = list(accumulate(graph_sizes))
    start, stop = min(q_interval[1], k_interval[1]) - 1, max(q_interval[0], k_interval[0])
    graph = bisect_right(ends, start)  # holds the last row of the earlier interval
    if graph == len(ends) or ends[graph] <= stop:
        return None  # the later interval's first row is in another graph
    first = ends[graph] - graph_sizes[graph]
    return ((max(q_interval[0], first), min(q_interval[1], ends[graph])),
            (max(k_interval[0], first), min(k_interval[1], ends[graph])))


def _shifted_window_call(q_rows, k_rows, queries, keys, left, right) -> BlockCall | None:
    """The call of global query rows ``q_rows`` against key rows ``k_rows`` of one graph,
    trimmed to the queries that see a key (``j - left <= i <= j + right``) and the keys seen."""
    q_start = max(q_rows[0], k_rows[0] - right if right is not None else q_rows[0])
    q_stop = min(q_rows[1], k_rows[1] + left if left is not None else q_rows[1])
    k_start = max(k_rows[0], q_start - left if left is not None else k_rows[0])
    k_stop = min(k_rows[1], q_stop + right if right is not None else k_rows[1])
    if q_start >= q_stop or k_start >= k_stop:
        return None
    # Local key b - local query a = (j - i) + shift. The first query sees the first key (the
    # trim makes k_start >= q_start - left and q_start >= k_start - right), so both sides of
    # the shifted window are >= 0: an ordinary window of the call's bipartite graph.
    shift = q_start - k_start
    window = (None if left is None else left - shift, None if right is None else right + shift)
    return BlockCall(_local_slice(queries, q_start, q_stop),
                     (_local_slice(keys, k_start, k_stop),), False, None, window)


def read_span(calls: list[BlockCall]) -> slice | None:
    """The key rows that windowed calls (one key slice each) read together, ``None`` for
    none."""
    if not calls:
        return None
    return slice(min(c.keys[0].start for c in calls), max(c.keys[0].stop for c in calls))


def rebased(calls: list[BlockCall], span: slice) -> list[BlockCall]:
    """``calls`` on the key rows ``span`` alone (what is sent of a block)."""
    return [replace(c, keys=tuple(slice(k.start - span.start, k.stop - span.start)
                                  for k in c.keys)) for c in calls]
