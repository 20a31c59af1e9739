"""Every adjacency PyG users pass, read as one ``(2, E)`` source -> target ``edge_index``.

PyG layers take ``edge_index`` tensors, :class:`torch_geometric.EdgeIndex`, ``torch.sparse``
COO/CSR/CSC adjacencies and ``torch_sparse.SparseTensor``. A sparse adjacency is PyG's
``adj_t``: row ``i`` lists the sources of target ``i``. Its edges are read in its own order, so
``edge_attr`` given alongside lines up with it as in PyG's ``propagate``, and attention weights
go back in the caller's layout, as :class:`torch_geometric.nn.TransformerConv` returns them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch_geometric import EdgeIndex
from torch_geometric.typing import SparseTensor
from torch_geometric.utils import to_edge_index


@dataclass(frozen=True)
class Adjacency:
    edge_index: Tensor  # (2, E) sources in row 0, targets in row 1
    values: Tensor | None  # a SparseTensor's stored values (PyG reads them as edge_attr)
    given: object  # the caller's object, for weights in its layout

    def with_weights(self, alpha: Tensor):
        """``alpha`` (E, H) in the caller's layout: a SparseTensor holding them, or the pair
        ``(adjacency, alpha)``, as TransformerConv returns."""
        if _is_sparse_tensor(self.given):
            return self.given.set_value(alpha, layout="coo")
        return self.given, alpha


def read_adjacency(adj) -> Adjacency:
    """``adj`` as an :class:`Adjacency`; a plain ``edge_index`` passes through unchanged."""
    if _is_sparse_tensor(adj):
        target, source, values = adj.coo()
        return Adjacency(torch.stack([source, target]), values, adj)
    if isinstance(adj, Tensor) and adj.layout != torch.strided:
        if adj.dim() != 2:
            raise ValueError(f"a sparse adjacency must be 2-D (targets x sources), got shape "
                             f"{tuple(adj.shape)}")
        (target, source), _ = to_edge_index(adj)
        return Adjacency(torch.stack([source, target]), None, adj)
    if isinstance(adj, EdgeIndex):
        return Adjacency(adj.as_tensor(), None, adj)
    return Adjacency(adj, None, adj)


def _is_sparse_tensor(adj) -> bool:
    return isinstance(adj, SparseTensor)  # a placeholder class without torch_sparse
