"""Causal graphs and sliding windows as the dense route sees them: a band per size group.

A size group of ``len_dst x len_src`` graphs keeps, for target ``i``, the sources ``i + low <= j
<= i + high`` (:meth:`~gatattn.graph.AttentionGraph.band`). Three facts make it cheap on SDPA:

- the targets that see a source are one run of rows (:func:`~gatattn.graph.edges.seeing_rows`);
  the rest get zeros without being computed, so no softmax row is fully masked;
- the top-left causal band is SDPA's ``is_causal``; any other band is a boolean mask;
- a narrow band (a sliding window over long graphs) is computed in chunks of rows, each against
  the keys its rows can see, all chunks in one call (:class:`SlidingChunks`):
  ``O(len * (chunk + width))`` pairs instead of ``len_dst * len_src``, the dense route's form of
  skipping tiles outside the band.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
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


def seeing_part(len_dst: int, len_src: int, band: Band) -> tuple[range, Band | None]:
    """The run of targets that see a source, and the band of those rows alone (shifted by the
    rows left out before them)."""
    rows = seeing_rows(len_dst, len_src, *band)
    return rows, effective(*(None if b is None else b + rows.start for b in band), len(rows),
                           len_src)


def seeing_rows_only(group: SegmentGroup, q: Tensor, band: Band, attend) -> Tensor | None:
    """A band whose first or last targets see no source (a bottom-right causal graph with more
    targets than sources; a window past the end of the sources): the targets that see some
    form one run of rows, computed by ``attend(group, q, band)`` for that run alone, and the
    rest get zeros. ``q`` is ``(count * len_dst, H, C)``, graph-major. ``None`` when every
    target sees a source."""
    rows, shifted = seeing_part(group.len_dst, group.len_src, band)
    if len(rows) == group.len_dst:
        return None
    seeing = SegmentGroup(group.count, len(rows), group.len_src)
    q = q.view(group.count, group.len_dst, *q.shape[1:])[:, rows.start:rows.stop]
    out = attend(seeing, q.reshape(-1, *q.shape[2:]), shifted)  # (count * len(rows), H, C_v)
    out = out.view(group.count, len(rows), *out.shape[1:])
    before = out.new_zeros(group.count, rows.start, *out.shape[2:])
    after = out.new_zeros(group.count, group.len_dst - rows.stop, *out.shape[2:])
    return torch.cat([before, out, after], dim=1).flatten(0, 1)


@dataclass(frozen=True)
class SlidingChunks:
    """A narrow band (bounded on both sides, every target seeing a source) laid out as equal
    chunks: the targets of each graph cut into ``count`` chunks of ``rows``, chunk ``c`` against
    the ``keys = rows + high - low`` sources from position ``c * rows + low`` (zero rows pad
    both ends). Every chunk then has the same band, so a whole size group is ONE SDPA call
    over ``(graphs * chunks, H, rows, keys)``, and the sources are laid out by an unfold
    (overlapping views, one copy), whose backward sums the overlaps without a scatter."""

    len_dst: int
    len_src: int
    low: int
    high: int
    rows: int
    count: int

    @property
    def keys(self) -> int:
        return self.rows + self.high - self.low

    def queries(self, x: Tensor, graphs: int) -> Tensor:
        """``(graphs * len_dst, H, C)`` targets as ``(graphs * count, H, rows, C)``."""
        x = _padded(x.view(graphs, self.len_dst, *x.shape[1:]), 0,
                    self.count * self.rows - self.len_dst)
        return x.view(graphs * self.count, self.rows, *x.shape[2:]).transpose(1, 2)

    def sources(self, x: Tensor, graphs: int) -> Tensor:
        """``(graphs * len_src, H, C)`` sources as ``(graphs * count, H, keys, C)``."""
        x = x.view(graphs, self.len_src, *x.shape[1:])
        before = max(0, -self.low)
        x = _padded(x, before, max(0, self.count * self.rows + self.high - self.len_src))
        # From the first chunk's first source to the last chunk's last: count windows exactly.
        start, length = before + self.low, self.count * self.rows + self.high - self.low
        if start or x.size(1) != length:  # (a slice's backward is a full-size copy)
            x = x.narrow(1, start, length)
        chunks = x.unfold(1, self.keys, self.rows)  # (graphs, count, H, C, keys): views
        return chunks.permute(0, 1, 2, 4, 3).reshape(graphs * self.count, x.size(2), self.keys,
                                                     x.size(3))

    def outputs(self, out: Tensor, graphs: int) -> Tensor:
        """``(graphs * count, H, rows, C)`` back to ``(graphs * len_dst, H, C)``."""
        heads, channels = out.size(1), out.size(-1)
        out = out.transpose(1, 2).reshape(graphs, self.count * self.rows, heads, channels)
        if self.count * self.rows != self.len_dst:
            out = out[:, :self.len_dst]
        return out.reshape(-1, heads, channels)

    def mask(self, graphs: int, device) -> Tensor:
        """``(graphs * count, 1, rows, keys)``: the band, without the padding sources. Padding
        targets (after the last) see every key of their chunk: no row is fully masked, and
        their outputs, which are dropped, send back zero gradients."""
        row = torch.arange(self.rows, device=device).view(1, -1, 1)
        key = torch.arange(self.keys, device=device).view(1, 1, -1)
        start = torch.arange(self.count, device=device).view(-1, 1, 1) * self.rows
        source = start + self.low + key  # the source position each key slot holds
        keep = (key >= row) & (key <= row + self.high - self.low)
        keep = keep & (source >= 0) & (source < self.len_src)
        keep = keep | (start + row >= self.len_dst)  # padding targets
        keep = keep.view(1, self.count, 1, self.rows, self.keys).expand(graphs, -1, -1, -1, -1)
        return keep.reshape(graphs * self.count, 1, self.rows, self.keys)


def _padded(x: Tensor, before: int, after: int) -> Tensor:
    """``(graphs, length, H, C)`` with zero rows before and after each graph's (none: ``x``)."""
    return F.pad(x, (0, 0, 0, 0, before, after)) if before or after else x


def sliding_chunks(len_dst: int, len_src: int, band: Band | None) -> SlidingChunks | None:
    """The chunk layout of a narrow band, or ``None`` where one call over the whole graphs is
    cheaper: the band is not bounded on both sides, or chunks would not at least halve the
    pairs computed. Chunks hold ``max(width, MIN_CHUNK_ROWS)`` rows. Call it on bands whose
    every target sees a source (:func:`seeing_rows_only`)."""
    if band is None or None in band:
        return None
    low, high = band
    rows = max(high - low + 1, MIN_CHUNK_ROWS)
    if len_src < 2 * (rows + high - low):
        return None
    return SlidingChunks(len_dst, len_src, low, high, rows, -(-len_dst // rows))
