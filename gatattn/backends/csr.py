"""Edges sorted by target (CSR) and by source (its transpose), built once per edge set.

The message-passing route works on these two orders: rows of the CSR are targets (softmax and
aggregation run along them), rows of the transpose are sources (gradients of keys and values
gather along them). Sorting costs O(E log E), so the result is cached for the ``edge_index``
tensor it came from: a model that runs several layers on one graph sorts once.

The cache can never answer for different contents: an entry keeps a private copy of the edges
it was built from and is served only when the tensor still holds exactly those edges (an O(E)
comparison, far below the sort it saves). Version counters are not enough: a tensor that shares
memory with a numpy array, or is written through ``.data``, changes without a version bump, and
inference tensors have no counter at all.

A sorted :class:`torch_geometric.EdgeIndex` keeps its own CSR and CSC, but in PyG's layout:
turning them into this one (each edge's target, the inverse permutation, the transpose's
positions) is O(E) index arithmetic on every call, measured no faster than this cache's hit
(N = 100k, E = 1.6M, one thread: 2.8 against 2.9 ms sorted by target, 25 against 3.0 ms sorted
by source), so an EdgeIndex is read as its plain tensor and cached here like any other.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

import gatattn.graph as limits  # the package: a caller sets its MAX_*_EDGES limits there
from gatattn.graph import AttentionGraph, Permutation
from gatattn.transforms import compiling

_CACHE_SIZE = 8
_cache: dict[tuple[int, bool], _Entry] = {}


@dataclass(frozen=True)
class CSR:
    """``edge_index`` (source -> target) in target-major order, and in source-major order."""

    num_dst: int
    num_src: int
    row_ptr: Tensor  # (num_dst + 1,) edges of target i are [row_ptr[i], row_ptr[i + 1])
    col: Tensor  # (E,) source of each edge, target-major order
    row: Tensor  # (E,) target of each edge, target-major order
    position: Tensor | None  # (E,) target-major position of each of the caller's edges; None
    #                          when the caller's edges are already target-major
    t_row_ptr: Tensor  # (num_src + 1,) the transpose: edges of source j
    t_col: Tensor  # (E,) target of each edge, source-major order
    t_perm: Tensor  # (E,) target-major position of each edge in source-major order

    @property
    def num_edges(self) -> int:
        return self.col.numel()

    def in_callers_order(self, values: Tensor) -> Tensor:
        """Per-edge ``values`` from target-major order back to the caller's edge order."""
        return values if self.position is None else values.index_select(0, self.position)

    def in_target_order(self, values: Tensor | None) -> Tensor | None:
        """Per-edge ``values`` from the caller's edge order to target-major order (the inverse
        of :meth:`in_callers_order`; its backward is a gather, deterministic)."""
        if values is None or self.position is None:
            return values
        return values.new_empty(values.shape).index_copy(0, self.position, values)

    def matrix(self, values: Tensor) -> Tensor:
        """Sparse ``(num_dst, num_src)`` matrix with ``values`` in target-major order."""
        return _sparse_csr(self.row_ptr, self.col, values, (self.num_dst, self.num_src))

    def head_matrices(self, weights: Tensor, transposed: bool = False) -> list[Tensor]:
        """Per head ``h``, the sparse ``(num_dst, num_src)`` matrix with values ``weights[:,
        h]`` (``(E, H)``, target-major order), or with ``transposed`` its ``(num_src,
        num_dst)`` transpose. The transpose's values are gathered once for all heads, rows of
        ``H`` values, not once per head (a random gather: its cost is per row)."""
        if transposed:
            weights = weights.index_select(0, self.t_perm)
            row_ptr, col, size = self.t_row_ptr, self.t_col, (self.num_src, self.num_dst)
        else:
            row_ptr, col, size = self.row_ptr, self.col, (self.num_dst, self.num_src)
        by_head = weights.t().contiguous()  # (H, E): each head's values contiguous, one copy
        return [_sparse_csr(row_ptr, col, values, size) for values in by_head]


def _sparse_csr(row_ptr: Tensor, col: Tensor, values: Tensor, size: tuple[int, int]) -> Tensor:
    # The structure is valid by construction, so invariant checks are off on purpose; the
    # "support is in beta" notice would otherwise be printed on every call.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(row_ptr, col, values, size, check_invariants=False)


@dataclass(frozen=True)
class _Entry:
    edges: Tensor  # a private copy of the edges the CSR was built from
    csr: CSR

    def serves(self, edge_index: Tensor, num_dst: int, num_src: int) -> bool:
        return ((self.csr.num_dst, self.csr.num_src) == (num_dst, num_src)
                and self.edges.shape == edge_index.shape
                and self.edges.device == edge_index.device
                and torch.equal(self.edges, edge_index))


def csr_of(edge_index: Tensor, num_dst: int, num_src: int) -> CSR:
    """The :class:`CSR` of ``edge_index``, from the cache when this very tensor was seen with
    the same contents and sizes."""
    if compiling():  # traced: no Python cache
        return _build(edge_index, num_dst, num_src)
    # id() only finds the candidate entry; serves() checks the contents. CSRs built in inference
    # mode hold inference tensors, which autograd cannot save: they serve inference mode only.
    key = (id(edge_index), torch.is_inference_mode_enabled())
    entry = _cache.get(key)
    if entry is not None and entry.serves(edge_index, num_dst, num_src):
        return entry.csr
    edges = edge_index.clone()  # built from the private copy: the CSR may share its memory
    csr = _build(edges, num_dst, num_src)
    if len(_cache) >= _CACHE_SIZE and key not in _cache:
        _cache.pop(next(iter(_cache)))
    _cache[key] = _Entry(edges, csr)
    return csr


def graph_csr(graph: AttentionGraph, edge_index: Tensor) -> CSR:
    """The CSR of ``edge_index``, the edges of ``graph``. A graph from
    :func:`gatattn.build_graph` keeps it (built without a host read, up to
    :data:`~gatattn.graph.MAX_KEPT_EDGES` edges); a call's own graph takes the cache above."""
    csr = graph.csr
    if csr is not None:
        return csr
    if not graph.prepared and not graph.is_implicit:
        return csr_of(edge_index, graph.num_dst, graph.num_src)
    # An implicit graph's edges are its own (materialised sorted by target), so it keeps their
    # CSR whether or not it was built by build_graph.
    csr = _build(edge_index, graph.num_dst, graph.num_src, may_read=False,
                 target_sorted=graph.is_implicit)
    if csr.num_edges <= limits.MAX_KEPT_EDGES:
        graph.keep(csr=csr)
    return csr


def _build(edge_index: Tensor, num_dst: int, num_src: int, may_read: bool = True,
           target_sorted: bool = False) -> CSR:
    src, dst = edge_index
    # Edges already in target-major order (a CSR adj_t, an EdgeIndex or SparseTensor sorted by
    # target, a target-sorted edge_index) need no sort: an O(E) check instead of O(E log E),
    # but a host read, which a graph's own CSR does without (``target_sorted``: known sorted).
    if target_sorted or (may_read and not compiling() and _is_sorted(dst)):
        # Contiguous: the rows of an (E, 2) tensor's transpose are strided views, and the
        # kernels index col and row_ptr as dense arrays.
        row, col, position = dst.contiguous(), src.contiguous(), None
    else:
        order = Permutation.of(torch.sort(dst, stable=True).indices)
        row, col, position = dst[order.forward], src[order.forward], order.inverse
    t_perm = torch.sort(col, stable=True).indices
    return CSR(
        num_dst=num_dst,
        num_src=num_src,
        row_ptr=_pointers(row, num_dst),
        col=col,
        row=row,
        position=position,
        t_row_ptr=_pointers(col[t_perm], num_src),
        t_col=row[t_perm],
        t_perm=t_perm,
    )


def _is_sorted(ids: Tensor) -> bool:
    return ids.numel() < 2 or bool((ids[1:] >= ids[:-1]).all())


def _pointers(sorted_ids: Tensor, num_rows: int) -> Tensor:
    counts = torch.bincount(sorted_ids, minlength=num_rows)
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)])
