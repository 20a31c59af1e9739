"""Attention as GAT-style message passing over an explicit edge set.

Per-edge logits ``<q_i, k_j>``, a softmax over each target's in-edges, a weighted sum of the
source values: exactly what :class:`torch_geometric.nn.TransformerConv` computes, for any graph.
This version gathers per-edge ``(E, H, C)`` rows, so its memory grows with ``E * H * C``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor
from torch_geometric.utils import scatter, softmax


def sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    edge_index: Tensor,
    *,
    scale: float,
    dropout: float = 0.0,
    edge_attr: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Returns the ``(N_dst, H, C_v)`` output and the ``(E, H)`` attention weights (before
    dropout). Targets without in-edges get zeros."""
    src, dst = edge_index
    key_j = k.index_select(0, src)  # (E, H, C)
    value_j = v.index_select(0, src)  # (E, H, C_v)
    if edge_attr is not None:
        key_j = key_j + edge_attr
        value_j = value_j + edge_attr
    logits = (q.index_select(0, dst) * key_j).sum(dim=-1) * scale  # (E, H)
    alpha = softmax(logits, dst, num_nodes=q.size(0))
    weights = F.dropout(alpha, p=dropout) if dropout > 0 else alpha
    messages = value_j * weights.unsqueeze(-1)  # (E, H, C_v)
    out = scatter(messages, dst, dim=0, dim_size=q.size(0), reduce="sum")
    return out, alpha
