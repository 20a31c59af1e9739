"""Query, key and value projections of a layer whose three are separate linear layers.

Self-attention reads one input three times; packed into one product (as
``nn.MultiheadAttention``'s ``in_proj_weight``) it reads it once and runs one larger matrix
product, forward and backward. The parameters stay separate, so state dicts and PyG's
``TransformerConv`` layout are unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.nn.dense.linear import Linear


def project_qkv(lins: tuple[nn.Module, nn.Module, nn.Module], x_src: Tensor, x_dst: Tensor,
                heads: int, kv_heads: int, channels: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(N_dst, heads, C)`` queries of ``x_dst``, ``(N_src, kv_heads, C)`` keys and values of
    ``x_src``, by ``lins = (query, key, value)``: one packed product when ``x_src is x_dst``
    and :func:`packable`, each layer called otherwise."""
    if x_src is x_dst and packable(lins, x_src):
        weight = torch.cat([lin.weight for lin in lins])
        bias = None if lins[0].bias is None else torch.cat([lin.bias for lin in lins])
        q, k, v = F.linear(x_src, weight, bias).split(
            [heads * channels, kv_heads * channels, kv_heads * channels], dim=-1)
    else:
        q, k, v = lins[0](x_dst), lins[1](x_src), lins[2](x_src)
    return q.view(-1, heads, channels), k.view(-1, kv_heads, channels), v.view(
        -1, kv_heads, channels)


def packable(lins: tuple[nn.Module, ...], x: Tensor) -> bool:
    """Whether the layers' products can be packed into one without changing what runs: plain
    PyG ``Linear`` layers (whose forward is ``F.linear``), initialised, all with or all
    without a bias, in ``x``'s dtype, with no forward hooks that calling each would run."""
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return False
    return all(type(lin) is Linear
               and not isinstance(lin.weight, nn.parameter.UninitializedParameter)
               and not lin._forward_hooks and not lin._forward_pre_hooks
               and (lin.bias is None) == (lins[0].bias is None)
               and lin.weight.dtype == x.dtype for lin in lins)
