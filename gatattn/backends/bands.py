"""Causal graphs and sliding windows as the dense route sees them: a band per size group.

A size group of ``len_dst x len_src`` graphs keeps, for target ``i``, the sources ``i + low <= j
<= i + high`` (:meth:`~gatattn.graph.AttentionGraph.band`). Three facts make it cheap on SDPA:

- the targets that see a source are one run of rows (:func:`~gatattn.graph.edges.seeing_rows`);
  the rest get zeros without being computed, so no softmax row is fully masked;
- the top-left causal band is SDPA's ``is_causal``; any other band is a boolean mask;
- a narrow band (a sliding window over long graphs) is computed in chunks of rows, each against
  the keys its rows can see (:func:`band_chunks`): ``O(len * (chunk + width))`` pairs instead of
  ``len_dst * len_src``, the dense route's form of skipping tiles outside the band.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from gatattn.graph import AttentionGraph, SegmentGroup
from gatattn.graph.edges import seeing_rows

Band = tuple[int | None, int | None]

#: A band is computed in chunks of at least this many rows (fewer, larger SDPA calls).
MIN_CHUNK_ROWS = 64


def group_band(graph: AttentionGraph, group: SegmentGroup) -> Band | None:
    """The group's band ``(low, high)``: target ``i`` keeps ``i + low <= j <= i + high``; a
    bound that removes no pair is ``None``, and ``None`` keeps every pair (not causal, no
    window, or one query per graph aligned bottom-right: a decoding step)."""
    if not graph.banded:
        return None
    return effective(*graph.band(group.len_dst, group.len_src), group.len_dst, group.len_src)


def effective(low: int | None, high: int | None, len_dst: int, len_src: int) -> Band | None:
    """``(low, high)`` without the bounds that remove no pair of a ``len_dst x len_src``
    block; ``None`` if neither removes one."""
    if high is not None and high >= len_src - 1:
        high = None
    if low is not None and low <= 1 - len_dst:
        low = None
    return None if low is None and high is None else (low, high)


def band_mask(band: Band | None, len_dst: int, len_src: int, device) -> Tensor | None:
    """A boolean ``(len_dst, len_src)`` mask of the band (``None``: no band)."""
    if band is None:
        return None
    low, high = band
    mask = torch.ones(len_dst, len_src, dtype=torch.bool, device=device)
    mask = mask if high is None else mask.tril(high)
    return mask if low is None else mask.triu(low)


def sdpa_mask(band: Band | None, len_dst: int, len_src: int, device) -> tuple[Tensor | None, bool]:
    """``(attn_mask, is_causal)`` for SDPA: the top-left causal band is ``is_causal``."""
    if band == (None, 0):
        return None, True
    return band_mask(band, len_dst, len_src, device), False


def seeing_rows_only(group: SegmentGroup, q: Tensor, band: Band, attend) -> Tensor | None:
    """A band whose first or last targets see no source (a bottom-right causal graph with more
    targets than sources; a window past the end of the sources): the targets that see some
    form one run of rows, computed by ``attend(group, q, band)`` for that run alone, and the
    rest get zeros. ``q`` is ``(count * len_dst, H, C)``, graph-major. ``None`` when every
    target sees a source."""
    rows = seeing_rows(group.len_dst, group.len_src, *band)
    if len(rows) == group.len_dst:
        return None
    seeing = SegmentGroup(group.count, len(rows), group.len_src)
    shifted = effective(*(None if b is None else b + rows.start for b in band),
                        seeing.len_dst, seeing.len_src)
    q = q.view(group.count, group.len_dst, *q.shape[1:])[:, rows.start:rows.stop]
    out = attend(seeing, q.reshape(-1, *q.shape[2:]), shifted)  # (count * len(rows), H, C_v)
    out = out.view(group.count, len(rows), *out.shape[1:])
    before = out.new_zeros(group.count, rows.start, *out.shape[2:])
    after = out.new_zeros(group.count, group.len_dst - rows.stop, *out.shape[2:])
    return torch.cat([before, out, after], dim=1).flatten(0, 1)


class Chunk(NamedTuple):
    """Rows ``[row_start, row_stop)`` of a band against keys ``[key_start, key_stop)``, whose
    own band (in chunk coordinates) is ``band``."""

    row_start: int
    row_stop: int
    key_start: int
    key_stop: int
    band: Band | None


def band_chunks(len_dst: int, len_src: int, band: Band | None) -> list[Chunk] | None:
    """The chunks a narrow band is computed in, or ``None`` where one call is cheaper: the
    band is not bounded on both sides, or chunking would not halve the pairs computed. Chunks
    hold ``max(width, MIN_CHUNK_ROWS)`` rows; every row of a chunk sees a source (call it on
    the seeing rows only)."""
    if band is None or None in band:
        return None
    low, high = band
    rows = max(high - low + 1, MIN_CHUNK_ROWS)
    if len_src < 2 * (rows + high - low):
        return None
    chunks = []
    for start in range(0, len_dst, rows):
        stop = min(start + rows, len_dst)
        first, last = max(0, start + low), min(len_src, stop + high)  # keys [first, last)
        chunks.append(Chunk(start, stop, first, last,
                            effective(start + low - first, start + high - first, stop - start,
                                      last - first)))
    return chunks
