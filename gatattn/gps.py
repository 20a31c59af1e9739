"""``GPSConv``: PyG's GraphGPS layer whose global attention runs per graph, without padding."""

from __future__ import annotations

import torch.nn.functional as F
import torch_geometric.nn
from torch import Tensor, nn
from torch_geometric.nn.attention import PerformerAttention
from torch_geometric.typing import Adj
from torch_geometric.utils import to_dense_batch

from gatattn.functional import attention
from gatattn.graph import AttentionGraph


class GPSConv(torch_geometric.nn.GPSConv):
    r"""The general, powerful, scalable (GPS) graph transformer layer from the `"Recipe for a
    General, Powerful, Scalable Graph Transformer" <https://arxiv.org/abs/2205.12454>`_ paper,
    with its global attention computed over each graph of the batch as a complete graph, never
    padded to the largest graph.

    .. math::
        \mathbf{h}_L = \operatorname{norm}_1\big(\mathbf{x} + \operatorname{MPNN}(\mathbf{x},
            \mathcal{E})\big), \qquad
        \mathbf{h}_G = \operatorname{norm}_2\big(\mathbf{x} +
            \operatorname{MHA}_{\mathcal{G}}(\mathbf{x})\big),

        \mathbf{x}^{\prime} = \operatorname{norm}_3\big(\mathbf{h} +
            \operatorname{MLP}(\mathbf{h})\big), \qquad \mathbf{h} = \mathbf{h}_L + \mathbf{h}_G

    where :math:`\operatorname{MHA}_{\mathcal{G}}` is multi-head self-attention in which node
    :math:`i` attends to every node of its own graph (:func:`gatattn.attention` with
    :obj:`batch`): a batch of graphs of 100 to 500 nodes costs the sum of the graphs' squared
    sizes, not the number of graphs times the largest size squared.

    A drop-in for :class:`torch_geometric.nn.GPSConv` (and a subclass of it): the same
    constructor, parameters (a PyG ``GPSConv`` ``state_dict`` loads, and back), forward signature,
    ``reset_parameters`` and ``repr``, and the same outputs and gradients. The attention weights
    stay in :obj:`self.attn`, an :class:`torch.nn.MultiheadAttention`, read at every call;
    attention dropout (its :obj:`dropout`) falls on the attention weights in training, as there,
    with other random masks. Unlike PyG's (``to_dense_batch`` assumes a sorted batch vector),
    :obj:`batch` need not be sorted: each node attends to the nodes with its graph id.

    A model of several layers builds the attention graph once per batch and passes it to each,
    ``conv(x, edge_index, batch, graph=graph)`` with ``graph = gatattn.build_graph(batch=batch)``
    (or ``ptr=data.ptr``): the attention then reads nothing on the host and re-derives nothing.
    Without it each call describes the graph from :obj:`batch` once.

    Args:
        channels (int): Size of each input sample.
        conv (MessagePassing, optional): The local message passing layer.
        heads (int, optional): Number of attention heads. (default: :obj:`1`)
        dropout (float, optional): Dropout probability of intermediate embeddings.
            (default: :obj:`0.0`)
        act (str or Callable, optional): The activation of the MLP. (default: :obj:`"relu"`)
        act_kwargs (Dict[str, Any], optional): Arguments of :obj:`act`. (default: :obj:`None`)
        norm (str or Callable, optional): The normalization. (default: :obj:`"batch_norm"`)
        norm_kwargs (Dict[str, Any], optional): Arguments of :obj:`norm`.
            (default: :obj:`None`)
        attn_type (str, optional): :obj:`"multihead"` (unpadded, as above) or
            :obj:`"performer"`, which runs PyG's :class:`PerformerAttention` on the padded batch
            as PyG's ``GPSConv`` does (nodes sorted by graph first). (default:
            :obj:`"multihead"`)
        attn_kwargs (Dict[str, Any], optional): Arguments of the attention module, e.g.
            :obj:`dropout` for attention dropout. (default: :obj:`None`)

    Shapes:
        - **input:** node features :math:`(|\mathcal{V}|, F)`, edge indices
          :math:`(2, |\mathcal{E}|)` or a sparse adjacency, batch vector :math:`(|\mathcal{V}|)`
          (optional; one graph without it)
        - **output:** node features :math:`(|\mathcal{V}|, F)`

    Not supported (refused with a ValueError): :class:`torch.nn.MultiheadAttention` options that
    attend to something other than the graph's nodes (:obj:`add_bias_kv`,
    :obj:`add_zero_attn`) or that cannot take the node features as keys and values
    (:obj:`kdim` / :obj:`vdim` other than :obj:`channels`, on which PyG's layer fails too).
    """

    def __init__(
        self,
        channels: int,
        conv: nn.Module | None,
        heads: int = 1,
        dropout: float = 0.0,
        act: str = "relu",
        act_kwargs: dict | None = None,
        norm: str | None = "batch_norm",
        norm_kwargs: dict | None = None,
        attn_type: str = "multihead",
        attn_kwargs: dict | None = None,
    ):
        super().__init__(channels, conv, heads, dropout, act, act_kwargs, norm, norm_kwargs,
                         attn_type, attn_kwargs)
        if isinstance(self.attn, nn.MultiheadAttention):
            _check_node_attention(self.attn)

    def forward(self, x: Tensor, edge_index: Adj, batch: Tensor | None = None, *,
                graph: AttentionGraph | None = None, **kwargs) -> Tensor:
        r"""Runs the forward pass of the module; :obj:`kwargs` go to the local :obj:`conv`.

        Args:
            x (torch.Tensor): Node features.
            edge_index (torch.Tensor or SparseTensor): The local conv's edges.
            batch (torch.Tensor, optional): Graph id per node: the global attention's graphs
                (without :obj:`graph`) and the norms'. (default: :obj:`None`)
            graph (AttentionGraph, optional): The graph the global attention runs over, from
                :func:`gatattn.build_graph` (``build_graph(batch=batch)``), built once per
                batch for every layer; keyword only. It describes the attention only: the
                local conv runs over :obj:`edge_index`, and the norms read :obj:`batch`, or
                the graph's graph ids when :obj:`batch` is not given. Not with
                ``attn_type="performer"``. (default: :obj:`None`)
            **kwargs (optional): Additional arguments of the local conv.
        """
        if graph is not None and isinstance(self.attn, PerformerAttention):
            raise ValueError("graph= is the multi-head attention's graph; "
                             "attn_type='performer' pads the batch by its graph ids instead: "
                             "pass batch")
        if batch is None and graph is not None:
            batch = graph.batch_dst  # the norms' graph ids (None: one graph), no host read
        branches = []
        if self.conv is not None:  # local message passing
            h = self.conv(x, edge_index, **kwargs)
            h = F.dropout(h, p=self.dropout, training=self.training)
            branches.append(self._normalize(self.norm1, h + x, batch))
        h = F.dropout(self._global_attention(x, batch, graph), p=self.dropout,
                      training=self.training)
        branches.append(self._normalize(self.norm2, h + x, batch))
        out = sum(branches)
        return self._normalize(self.norm3, out + self.mlp(out), batch)

    def _global_attention(self, x: Tensor, batch: Tensor | None,
                          graph: AttentionGraph | None) -> Tensor:
        if isinstance(self.attn, nn.MultiheadAttention):
            return _multihead_attention_per_graph(self.attn, x, batch, graph)
        if isinstance(self.attn, PerformerAttention):
            return _padded_performer(self.attn, x, batch)
        raise TypeError(
            f"GPSConv.attn must be an nn.MultiheadAttention or a PerformerAttention, got "
            f"{type(self.attn).__name__}; build the layer with attn_type='multihead' or "
            "'performer' instead of replacing attn")

    def _normalize(self, norm: nn.Module | None, h: Tensor, batch: Tensor | None) -> Tensor:
        if norm is None:
            return h
        return norm(h, batch=batch) if self.norm_with_batch else norm(h)


def _multihead_attention_per_graph(mha: nn.MultiheadAttention, x: Tensor,
                                   batch: Tensor | None,
                                   graph: AttentionGraph | None = None) -> Tensor:
    """``mha(x, x, x)`` with each node attending to the nodes of its own graph (all nodes if
    ``batch`` is None), or over ``graph`` if given: ``(N, embed_dim)``, with ``mha``'s weights
    and attention dropout."""
    _check_node_attention(mha)
    E, H = mha.embed_dim, mha.num_heads
    q, k, v = F.linear(x, mha.in_proj_weight, mha.in_proj_bias).view(-1, 3, H, E // H).unbind(1)
    # The call describes the graph once from batch, or takes the one built for every layer.
    described = {"batch": batch} if graph is None else {"graph": graph}
    out = attention(q, k, v, **described, dropout=mha.dropout if mha.training else 0.0)
    return mha.out_proj(out.reshape(-1, E))  # (N, H, C) -> (N, E)


def _padded_performer(performer: PerformerAttention, x: Tensor,
                      batch: Tensor | None) -> Tensor:
    """PyG's route: the performer runs on the batch padded by ``to_dense_batch``, which needs
    the nodes sorted by graph, so they are sorted first (a stable sort: graphs keep their node
    order) and put back after."""
    if batch is None:
        h, mask = to_dense_batch(x)
        return performer(h, mask=mask)[mask]
    order = batch.argsort(stable=True)
    h, mask = to_dense_batch(x[order], batch[order])
    out = performer(h, mask=mask)[mask]
    return out[order.argsort()]


def _check_node_attention(mha: nn.MultiheadAttention) -> None:
    """Refuse what makes ``mha`` attend to more than the graph's nodes, or to other features."""
    if mha.bias_k is not None or mha.add_zero_attn:
        raise ValueError(
            "GPSConv's attention runs over the nodes of each graph: attn_kwargs add_bias_kv=True "
            "or add_zero_attn=True add a key that is no node; drop them")
    if not mha._qkv_same_embed_dim:
        raise ValueError(
            f"GPSConv attends from node features to node features, so kdim and vdim must equal "
            f"channels={mha.embed_dim}; got kdim={mha.kdim}, vdim={mha.vdim}: drop them from "
            "attn_kwargs")
