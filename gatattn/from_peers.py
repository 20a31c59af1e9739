"""``SelfAttentionConv`` built from the peers it replaces, weights copied, same outputs.

The layer's :meth:`~gatattn.SelfAttentionConv.from_transformer_conv` and
:meth:`~gatattn.SelfAttentionConv.from_multihead_attention` call these with the class to build.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.parameter import is_lazy
from torch_geometric.nn import TransformerConv


def transformer_conv(cls: type, conv: TransformerConv) -> nn.Module:
    """A ``cls`` layer with ``conv``'s weights that computes the same outputs as ``conv``."""
    if is_lazy(conv.lin_query.weight):
        raise ValueError("conv has uninitialised (lazy) weights: run one forward pass first")
    layer = cls(conv.in_channels, conv.out_channels, conv.heads, conv.concat, conv.beta,
                conv.dropout, conv.edge_dim, conv.lin_query.bias is not None,
                conv.root_weight, aggr=conv.aggr, flow=conv.flow)
    layer = _like(layer, conv.lin_query.weight)
    layer.load_state_dict(conv.state_dict())
    return layer


def multihead_attention(cls: type, mha: nn.MultiheadAttention) -> nn.Module:
    """A ``cls`` layer with ``mha``'s projections: heads concatenated, ``out_proj`` as the
    layer's output projection, no root term."""
    if mha.bias_k is not None or mha.add_zero_attn:
        raise ValueError("nn.MultiheadAttention with add_bias_kv or add_zero_attn is not "
                         "supported: those add a key that is not a node")
    if mha.kdim != mha.vdim:
        raise ValueError(f"keys and values come from the same source nodes here, so kdim "
                         f"must equal vdim; got {mha.kdim} and {mha.vdim}")
    E, H = mha.embed_dim, mha.num_heads
    in_channels = E if mha.kdim == E else (mha.kdim, E)
    layer = cls(in_channels, E // H, heads=H, concat=True, dropout=mha.dropout,
                bias=mha.out_proj.bias is not None, root_weight=False, out_proj=True)
    layer = _like(layer, mha.out_proj.weight)
    with torch.no_grad():
        if mha._qkv_same_embed_dim:
            weights = mha.in_proj_weight.chunk(3)
        else:
            weights = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
        biases = mha.in_proj_bias.chunk(3) if mha.in_proj_bias is not None else (None,) * 3
        projections = (layer.lin_query, layer.lin_key, layer.lin_value)
        for lin, w, b in zip(projections, weights, biases, strict=True):
            lin.weight.copy_(w)
            if b is not None:
                lin.bias.copy_(b)
        layer.lin_out.load_state_dict(mha.out_proj.state_dict())
    return layer


def _like(layer: nn.Module, weight: Tensor) -> nn.Module:
    """``layer`` on the device and in the dtype of the module it was converted from."""
    return layer.to(device=weight.device, dtype=weight.dtype)


def drop_root_weights(state_dict: dict, prefix: str) -> None:
    """Removes ``lin_skip`` from a TransformerConv ``state_dict``: TransformerConv always has
    it, even with ``root_weight=False``, where it never computes anything."""
    for key in [k for k in state_dict if k.startswith(prefix + "lin_skip.")]:
        del state_dict[key]
