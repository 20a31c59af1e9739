"""Non-finite inputs travel along edges only, on the dense routes too.

Message passing reads a value only through an edge, so a NaN reaches exactly the targets it has
an edge to (the policy :mod:`gatattn.reference` states). Dense tiles break that in two ways,
which this module repairs without a host synchronisation:

* a causal tile multiplies the zero weights of future keys with their values, and
  ``0 * NaN = NaN`` reaches rows that have no edge to them: :func:`contain_causal_values`
  computes with finite values and puts NaN back exactly where an edge reads a non-finite one;
* SDPA's fused CPU kernel returns a finite row for a NaN query: :func:`expose_query_nans`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gatattn.graph import AttentionGraph, local_positions


def contain_causal_values(v: Tensor, graph: AttentionGraph) -> tuple[Tensor, Tensor]:
    """``v`` with non-finite entries zeroed, and the ``(N_dst, H, C_v)`` mask of outputs that
    read one through an edge (top-left causal: target position ``p`` reads sources ``0..p``)."""
    bad = ~torch.isfinite(v)  # (N_src, H, C_v)
    pos_src = local_positions(graph.batch_src, graph.num_src, v.device)
    pos_dst = local_positions(graph.batch_dst, graph.num_dst, v.device)
    ids_src, ids_dst = (b if b is not None else torch.zeros(n, dtype=torch.long, device=v.device)
                        for b, n in ((graph.batch_src, graph.num_src),
                                     (graph.batch_dst, graph.num_dst)))
    never = graph.num_src  # a position no target reaches
    bad_at = torch.where(bad, pos_src.view(-1, 1, 1), never)
    first_bad = bad_at.new_full((max(graph.num_graphs, 1), *v.shape[1:]), never)
    first_bad = first_bad.scatter_reduce(0, ids_src.view(-1, 1, 1).expand_as(bad_at), bad_at,
                                         "amin")
    reached = pos_dst.view(-1, 1, 1) >= first_bad.index_select(0, ids_dst)
    return v.masked_fill(bad, 0), reached


def expose_query_nans(out: Tensor, q: Tensor) -> Tensor:
    """``out`` (..., L, C_v) with NaN in every row whose query (..., L, C) is not finite; the
    added term is exactly zero otherwise, and so is its gradient."""
    return out + q.sum(dim=-1, keepdim=True) * 0
