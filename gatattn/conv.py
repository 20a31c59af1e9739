"""``SelfAttentionConv``: multi-head scaled-dot-product attention as a PyG message-passing layer."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch_geometric.nn import MessagePassing, TransformerConv
from torch_geometric.nn.dense.linear import Linear

from gatattn.functional import attention


class SelfAttentionConv(MessagePassing):
    r"""Graph attention with transformer (scaled-dot-product) scores, from `"Attention Is All
    You Need" <https://arxiv.org/abs/1706.03762>`_ read as message passing: self-attention is
    graph attention on a complete graph.

    .. math::
        \mathbf{x}^{\prime}_i = \mathbf{W}_o \Big\Vert_{h=1}^{H} \sum_{j \in \mathcal{N}(i)}
        \alpha^{h}_{i,j} \left(\mathbf{W}^h_v \mathbf{x}_j + \mathbf{W}^h_e \mathbf{e}_{ij}\right)
        \; \left(+ \mathbf{W}_r \mathbf{x}_i\right),
        \qquad
        \alpha^{h}_{i,j} = \operatorname{softmax}_{j \in \mathcal{N}(i)} \left(
        \frac{(\mathbf{W}^h_q \mathbf{x}_i)^{\top}
        (\mathbf{W}^h_k \mathbf{x}_j + \mathbf{W}^h_e \mathbf{e}_{ij})}{\tau \sqrt{C}} \right)

    :math:`\mathcal{N}(i)` is the in-neighbourhood given by :obj:`edge_index`, or, without it,
    every node of :math:`i`'s graph (all nodes, or those with the same :obj:`batch` id), cut to
    earlier positions when :obj:`causal`. Without :obj:`edge_index` no edge is ever built: the
    layer runs fused dense attention per graph. A node with no in-edge gets a zero attention
    output (then the root term, if any).

    With :obj:`root_weight=True`, :obj:`beta` and :obj:`edge_dim` the layer computes exactly what
    :class:`torch_geometric.nn.TransformerConv` computes (:meth:`from_transformer_conv`); with
    :obj:`out_proj=True` what :class:`torch.nn.MultiheadAttention` computes
    (:meth:`from_multihead_attention`).

    Args:
        in_channels (int or tuple): Size of each input sample, or a pair
            ``(source, target)`` for bipartite graphs; ``-1`` infers it lazily.
        out_channels (int): Channels per head, :math:`C`.
        heads (int, optional): Number of attention heads. (default: :obj:`1`)
        concat (bool, optional): Concatenate the heads; average them if :obj:`False`.
            (default: :obj:`True`)
        dropout (float, optional): Dropout on the attention weights in training.
            (default: :obj:`0.0`)
        temperature (float, optional): Logits are divided by :math:`\tau`.
            (default: :obj:`1.0`)
        bias (bool, optional): Biases in the query, key, value, output and root projections.
            (default: :obj:`True`)
        root_weight (bool, optional): Add a projected skip term :math:`\mathbf{W}_r\mathbf{x}_i`.
            (default: :obj:`False`)
        beta (bool, optional): Gate the skip term as in ``TransformerConv``
            (needs :obj:`root_weight`). (default: :obj:`False`)
        edge_dim (int, optional): Edge feature size; edge features are projected and added to
            keys and values (needs :obj:`edge_index`). (default: :obj:`None`)
        out_proj (bool, optional): A linear output projection :math:`\mathbf{W}_o` after the heads
            are merged, as in ``nn.MultiheadAttention``. (default: :obj:`False`)
        backend (str, optional): Route override passed to :func:`gatattn.attention`, for tests
            and benchmarks. (default: :obj:`"auto"`)
        **kwargs (optional): Additional arguments of
            :class:`torch_geometric.nn.conv.MessagePassing`.

    Shapes:
        - **input:** node features :math:`(|\mathcal{V}|, F_{in})` or
          :math:`((|\mathcal{V_s}|, F_{s}), (|\mathcal{V_t}|, F_{t}))` if bipartite,
          edge indices :math:`(2, |\mathcal{E}|)` (optional),
          batch vector :math:`(|\mathcal{V}|)` or a ``(batch_src, batch_dst)`` pair (optional),
          edge features :math:`(|\mathcal{E}|, D)` (optional)
        - **output:** node features :math:`(|\mathcal{V}_t|, H * C)` or
          :math:`(|\mathcal{V}_t|, C)` if :obj:`concat=False`

    Under ``torch.compile`` a complete graph and an ``edge_index`` compile without graph breaks;
    :obj:`batch` / :obj:`ptr` graphs break the graph where graphs are grouped by size (sizes are
    read on the host).

    Not supported: ``SparseTensor`` adjacency, additive attention masks, ``nn.MultiheadAttention``
    with ``add_bias_kv``, ``add_zero_attn`` or ``kdim != vdim``.
    """

    def __init__(
        self,
        in_channels: int | tuple[int, int],
        out_channels: int,
        heads: int = 1,
        concat: bool = True,
        dropout: float = 0.0,
        temperature: float = 1.0,
        bias: bool = True,
        root_weight: bool = False,
        beta: bool = False,
        edge_dim: int | None = None,
        out_proj: bool = False,
        backend: str = "auto",
        **kwargs,
    ):
        kwargs.setdefault("aggr", "add")
        super().__init__(node_dim=0, **kwargs)
        for name, value in (("heads", heads), ("out_channels", out_channels)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}; use {name} >= 1")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if beta and not root_weight:
            raise ValueError("beta gates the root term: it needs root_weight=True")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.heads = heads
        self.concat = concat
        self.dropout = dropout
        self.temperature = temperature
        self.root_weight = root_weight
        self.beta = beta
        self.edge_dim = edge_dim
        self.backend = backend

        in_src, in_dst = (in_channels, in_channels) if isinstance(in_channels, int) else in_channels
        merged = heads * out_channels if concat else out_channels
        self.lin_query = Linear(in_dst, heads * out_channels, bias=bias)
        self.lin_key = Linear(in_src, heads * out_channels, bias=bias)
        self.lin_value = Linear(in_src, heads * out_channels, bias=bias)
        self.lin_edge = self._optional(edge_dim is not None, "lin_edge",
                                       lambda: Linear(edge_dim, heads * out_channels, bias=False))
        self.lin_out = self._optional(out_proj, "lin_out",
                                      lambda: Linear(merged, merged, bias=bias))
        self.lin_skip = self._optional(root_weight, "lin_skip",
                                       lambda: Linear(in_dst, merged, bias=bias))
        self.lin_beta = self._optional(beta, "lin_beta", lambda: Linear(3 * merged, 1, bias=False))
        self.reset_parameters()

    def _optional(self, present: bool, name: str, make) -> nn.Module | None:
        if present:
            return make()
        self.register_parameter(name, None)
        return None

    def reset_parameters(self):
        super().reset_parameters()
        for lin in (self.lin_query, self.lin_key, self.lin_value, self.lin_edge, self.lin_out,
                    self.lin_skip, self.lin_beta):
            if lin is not None:
                lin.reset_parameters()

    def forward(
        self,
        x: Tensor | tuple[Tensor, Tensor],
        edge_index: Tensor | None = None,
        edge_attr: Tensor | None = None,
        return_attention_weights: bool | None = None,
        *,
        batch: Tensor | tuple[Tensor, Tensor] | None = None,
        ptr: Tensor | tuple[Tensor, Tensor] | None = None,
        causal: bool = False,
    ) -> Tensor | tuple[Tensor, tuple[Tensor, Tensor]]:
        r"""Runs the forward pass of the module.

        Args:
            x (torch.Tensor or (torch.Tensor, torch.Tensor)): Node features, or
                ``(x_src, x_dst)`` for cross-attention.
            edge_index (torch.Tensor, optional): Edges ``(2, E)``; :obj:`None` attends over
                the complete graph of each graph. (default: :obj:`None`)
            edge_attr (torch.Tensor, optional): Edge features ``(E, edge_dim)``.
                (default: :obj:`None`)
            return_attention_weights (bool, optional): If :obj:`True`, also return
                ``(edge_index, alpha)``; for an implicit complete graph the edges are built
                (up to :data:`gatattn.graph.MAX_MATERIALIZED_EDGES`). (default: :obj:`None`)
            batch (torch.Tensor or pair, optional): Graph id per node, or
                ``(batch_src, batch_dst)`` for cross-attention. (default: :obj:`None`)
            ptr (torch.Tensor or pair, optional): Graph offsets instead of :obj:`batch`.
                (default: :obj:`None`)
            causal (bool, optional): Attend only to earlier (or equal) positions inside each
                graph. (default: :obj:`False`)
        """
        H, C = self.heads, self.out_channels
        x_src, x_dst = (x, x) if isinstance(x, Tensor) else x
        self._validate_features(x_src, x_dst)
        query = self.lin_query(x_dst).view(-1, H, C)
        key = self.lin_key(x_src).view(-1, H, C)
        value = self.lin_value(x_src).view(-1, H, C)
        edge_emb = self._embed_edges(edge_attr)

        result = attention(
            query, key, value, edge_index=edge_index, batch=_dst_src(batch), ptr=_dst_src(ptr),
            causal=causal, temperature=self.temperature,
            dropout=self.dropout if self.training else 0.0, edge_attr=edge_emb,
            return_attention_weights=bool(return_attention_weights), backend=self.backend)
        out, weights = result if return_attention_weights else (result, None)

        out = out.reshape(-1, H * C) if self.concat else out.mean(dim=1)
        if self.lin_out is not None:
            out = self.lin_out(out)
        if self.lin_skip is not None:
            out = self._add_root(out, self.lin_skip(x_dst))
        return (out, weights) if return_attention_weights else out

    def _validate_features(self, x_src: Tensor, x_dst: Tensor) -> None:
        in_src, in_dst = ((self.in_channels,) * 2 if isinstance(self.in_channels, int)
                          else self.in_channels)
        for role, x, expected in (("source", x_src, in_src), ("target", x_dst, in_dst)):
            if expected != -1 and x.size(-1) != expected:  # -1: lazy, inferred on first use
                raise ValueError(
                    f"{role} node features have {x.size(-1)} features but the layer was built "
                    f"with in_channels={self.in_channels}")

    def _embed_edges(self, edge_attr: Tensor | None) -> Tensor | None:
        if self.lin_edge is None:
            if edge_attr is not None:
                raise ValueError("edge_attr was given but the layer was built with edge_dim=None")
            return None
        if edge_attr is None:
            raise ValueError(f"the layer was built with edge_dim={self.edge_dim}: give edge_attr")
        return self.lin_edge(edge_attr).view(-1, self.heads, self.out_channels)

    def _add_root(self, out: Tensor, x_root: Tensor) -> Tensor:
        if self.lin_beta is None:
            return out + x_root
        gate = self.lin_beta(torch.cat([out, x_root, out - x_root], dim=-1)).sigmoid()
        return gate * x_root + (1 - gate) * out

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}({self.in_channels}, {self.out_channels}, "
                f"heads={self.heads})")

    @classmethod
    def from_transformer_conv(cls, conv: TransformerConv) -> SelfAttentionConv:
        """A layer with ``conv``'s weights that computes the same outputs as ``conv``."""
        if _is_lazy(conv.lin_query):
            raise ValueError("conv has uninitialised (lazy) weights: run one forward pass first")
        layer = cls(conv.in_channels, conv.out_channels, heads=conv.heads, concat=conv.concat,
                    dropout=conv.dropout, bias=conv.lin_query.bias is not None,
                    root_weight=conv.root_weight, beta=conv.beta, edge_dim=conv.edge_dim)
        layer = _like(layer, conv.lin_query.weight)
        names = ["lin_query", "lin_key", "lin_value", "lin_edge", "lin_skip", "lin_beta"]
        _copy_linears(layer, conv, [n for n in names if getattr(layer, n) is not None])
        return layer

    @classmethod
    def from_multihead_attention(cls, mha: nn.MultiheadAttention) -> SelfAttentionConv:
        """A layer with ``mha``'s weights: for a sequence batch flattened to complete graphs
        (:func:`gatattn.sequences_to_graph`), ``layer(x, ptr=ptr)`` equals ``mha(x, x, x)[0]``,
        and ``layer((x_kv, x_q), ptr=(ptr_kv, ptr_q))`` equals ``mha(x_q, x_kv, x_kv)[0]``."""
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("nn.MultiheadAttention with add_bias_kv or add_zero_attn is not "
                             "supported: those add a key that is not a node")
        if mha.kdim != mha.vdim:
            raise ValueError(f"keys and values come from the same source nodes here, so kdim "
                             f"must equal vdim; got {mha.kdim} and {mha.vdim}")
        E, H = mha.embed_dim, mha.num_heads
        in_channels = E if mha.kdim == E else (mha.kdim, E)
        layer = cls(in_channels, E // H, heads=H, concat=True, dropout=mha.dropout,
                    bias=mha.out_proj.bias is not None, out_proj=True)
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


def _dst_src(pair):
    """The layer takes bipartite pairs in PyG's (source, target) order; the functional API in
    (q, k) = (target, source) order."""
    return (pair[1], pair[0]) if isinstance(pair, (tuple, list)) else pair


def _like(layer: nn.Module, weight: Tensor) -> nn.Module:
    """``layer`` on the device and in the dtype of the module it was converted from."""
    return layer.to(device=weight.device, dtype=weight.dtype)


def _is_lazy(lin: nn.Module) -> bool:
    return isinstance(lin.weight, nn.parameter.UninitializedParameter)


def _copy_linears(target: nn.Module, source: nn.Module, names: list[str]) -> None:
    for name in names:
        getattr(target, name).load_state_dict(getattr(source, name).state_dict())
