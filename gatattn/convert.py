"""Conversions between the forms a graph arrives in: dense masks, edge_index, networkx graphs,
and padded sequence batches (a sequence batch is a batch of complete or causal graphs)."""

from __future__ import annotations

import networkx as nx
import torch
from torch import Tensor


def mask_to_edge_index(mask: Tensor) -> Tensor:
    """``(N_dst, N_src)`` boolean mask -> ``(2, E)`` edges ``src -> dst``, sorted by target."""
    if mask.dim() != 2 or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a 2-D bool tensor, got {tuple(mask.shape)} {mask.dtype}")
    # torch_geometric.utils.dense_to_sparse(mask)[0].flip(0) gives these edges too, but also
    # gathers the values, dropped here: 19.0 against 15.9 ms for a 2048 x 2048 mask.
    dst, src = mask.nonzero().unbind(1)
    return torch.stack([src, dst])


def edge_index_to_mask(edge_index: Tensor, num_dst: int, num_src: int | None = None) -> Tensor:
    """``(2, E)`` edges -> ``(N_dst, N_src)`` mask with ``mask[dst, src] = True``."""
    # Not torch_geometric.utils.to_dense_adj: square only, float counts (16 against 0.9 ms for
    # 2048 nodes), and it drops edges past max_num_nodes silently where this raises.
    num_src = num_dst if num_src is None else num_src
    mask = torch.zeros(num_dst, num_src, dtype=torch.bool, device=edge_index.device)
    mask[edge_index[1], edge_index[0]] = True
    return mask


def networkx_to_edge_index(graph: nx.Graph, *, return_nodes: bool = False):
    """A networkx graph -> ``(edge_index, num_nodes)``, nodes numbered in ``graph.nodes`` order.

    An undirected edge becomes two directed edges, as in ``torch_geometric.utils.from_networkx``.
    With ``return_nodes=True`` also returns the mapping used, ``nodes``: node ``i`` of
    ``edge_index`` is ``nodes[i]`` of ``graph`` (give it to :func:`attention_to_networkx` to get
    the names back).
    """
    # Not torch_geometric.utils.from_networkx: it collates every node and edge attribute (30x
    # slower: 6.0 against 0.21 s for 20k nodes and 100k edges) and refuses a graph whose nodes
    # or edges carry different attributes.
    nodes = list(graph.nodes)
    index = {node: i for i, node in enumerate(nodes)}
    pairs = [(index[u], index[v]) for u, v in graph.edges()]
    edge_index = torch.tensor(pairs, dtype=torch.long).reshape(-1, 2).t()
    if not graph.is_directed():
        reverse = edge_index.flip(0)[:, edge_index[0] != edge_index[1]]  # one copy of a loop
        edge_index = torch.cat([edge_index, reverse], dim=1)
    if return_nodes:
        return edge_index.contiguous(), len(nodes), nodes
    return edge_index.contiguous(), len(nodes)


def attention_to_networkx(edge_index: Tensor, alpha: Tensor, num_nodes: int | None = None, *,
                          nodes: list | None = None) -> nx.DiGraph:
    """Attention weights as a weighted :class:`networkx.DiGraph`, edges ``source -> target``.

    ``alpha`` is ``(E,)`` or ``(E, H)``, as ``return_attention_weights`` gives it (``edge_index``
    may be any adjacency the layer takes). Each edge gets ``weight``, the mean over heads, and
    ``heads``, the per-head weights; repeated edges add up (the attention ``j`` gets from ``i``).
    Every node is present, edges or not; ``nodes`` (from :func:`networkx_to_edge_index`) names
    them, else they are ``0 .. num_nodes - 1``.
    """
    from gatattn.adjacency import read_adjacency  # here: adjacency imports PyG, convert does not

    edge_index = read_adjacency(edge_index).edge_index
    per_head = alpha.detach().reshape(alpha.size(0), -1).double().cpu()
    if per_head.size(0) != edge_index.size(1):
        raise ValueError(f"alpha must have one row per edge: {edge_index.size(1)} edges, got "
                         f"alpha of shape {tuple(alpha.shape)}")
    if num_nodes is None:
        num_nodes = len(nodes) if nodes is not None else int(edge_index.max()) + 1 \
            if edge_index.numel() else 0
    names = list(range(num_nodes)) if nodes is None else list(nodes)
    if len(names) != num_nodes:
        raise ValueError(f"nodes names {len(names)} nodes, but num_nodes is {num_nodes}")
    # Not torch_geometric.utils.to_networkx: a repeated edge would overwrite the one before.
    graph = nx.DiGraph()
    graph.add_nodes_from(names)
    for (src, dst), weights in zip(edge_index.t().tolist(), per_head, strict=True):
        u, v = names[src], names[dst]
        if graph.has_edge(u, v):
            weights = weights + torch.tensor(graph[u][v]["heads"], dtype=torch.float64)
        graph.add_edge(u, v, weight=float(weights.mean()), heads=weights.tolist())
    return graph


def sequences_to_graph(
    x: Tensor,
    *,
    lengths: Tensor | None = None,
    key_padding_mask: Tensor | None = None,
    batch_first: bool = True,
) -> tuple[Tensor, Tensor]:
    """A padded sequence batch -> flat node features and graph offsets ``(x_flat, ptr)``.

    Args:
        x: ``(B, L, D)`` (or ``(L, B, D)`` if not ``batch_first``).
        lengths: ``(B,)`` valid lengths; tokens past them are dropped.
        key_padding_mask: ``(B, L)``, ``nn.MultiheadAttention``'s convention: bool, ``True`` at
            padding, or float, ``-inf`` at padding and ``0`` elsewhere; padding tokens are
            dropped and the others keep their order.
    """
    if not batch_first:
        x = x.transpose(0, 1)
    if x.dim() != 3:
        raise ValueError(f"x must be (batch, length, features), got {tuple(x.shape)}")
    keep = _valid_tokens(x.shape[0], x.shape[1], lengths, key_padding_mask, x.device)
    ptr = torch.cat([keep.new_zeros(1, dtype=torch.long), keep.sum(1).cumsum(0)])
    return x[keep], ptr


def graph_to_sequences(
    x_flat: Tensor,
    ptr: Tensor,
    *,
    max_len: int | None = None,
    key_padding_mask: Tensor | None = None,
    batch_first: bool = True,
) -> tuple[Tensor, Tensor]:
    """The inverse of :func:`sequences_to_graph`: ``(x, key_padding_mask)`` with zeros at padding.

    Give the ``key_padding_mask`` used on the way in (bool or float, as there) to put tokens
    back at their own positions; without it every sequence is left-aligned and padded to
    ``max_len`` (default: the longest). The mask returned is the one given, else a bool mask.
    """
    lengths = ptr[1:] - ptr[:-1]
    if key_padding_mask is None:
        max_len = int(lengths.max()) if lengths.numel() and max_len is None else (max_len or 0)
        key_padding_mask = _valid_tokens(lengths.numel(), max_len, lengths, None,
                                         x_flat.device).logical_not()
    keep = ~masked_positions(key_padding_mask)
    if keep.sum(1).tolist() != lengths.tolist():
        raise ValueError(f"key_padding_mask keeps {keep.sum(1).tolist()} tokens per sequence "
                         f"but ptr holds {lengths.tolist()}; give the mask used on the way in")
    out = x_flat.new_zeros(*keep.shape, *x_flat.shape[1:])
    out[keep] = x_flat
    return (out if batch_first else out.transpose(0, 1)), key_padding_mask


def _valid_tokens(batch_size, max_len, lengths, key_padding_mask, device) -> Tensor:
    if lengths is not None and key_padding_mask is not None:
        raise ValueError("give lengths or key_padding_mask, not both")
    if key_padding_mask is not None:
        if tuple(key_padding_mask.shape) != (batch_size, max_len):
            raise ValueError(f"key_padding_mask must be (batch, length) = "
                             f"{(batch_size, max_len)}, got {tuple(key_padding_mask.shape)}")
        return ~masked_positions(key_padding_mask)
    if lengths is None:
        return torch.ones(batch_size, max_len, dtype=torch.bool, device=device)
    if lengths.numel() and int(lengths.max()) > max_len:
        raise ValueError(f"lengths has max {int(lengths.max())} but sequences have length "
                         f"{max_len}")
    return torch.arange(max_len, device=device) < lengths.to(device).unsqueeze(1)


def masked_positions(mask: Tensor, name: str = "key_padding_mask") -> Tensor:
    """``True`` where ``mask`` masks, from either of ``nn.MultiheadAttention``'s conventions:
    bool (``True`` = masked) or float (``-inf`` = masked, ``0`` = kept)."""
    if mask.dtype == torch.bool:
        return mask
    if not mask.is_floating_point():
        raise TypeError(f"{name} must be bool or float, got {mask.dtype}")
    masked = mask == float("-inf")
    bias = mask[~masked & (mask != 0)]
    if bias.numel():
        raise ValueError(
            f"{name} holds {bias[0].item()}: a float {name} may hold only 0 (attend) and "
            "-inf (masked). Give a bool mask (True = masked); an additive bias goes in attn_mask "
            "(MultiheadAttention) or attn_bias (gatattn.attention)")
    return masked
