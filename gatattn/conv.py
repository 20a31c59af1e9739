"""``SelfAttentionConv``: multi-head scaled-dot-product attention as a PyG message-passing layer."""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.nn import MessagePassing, TransformerConv
from torch_geometric.nn.dense.linear import Linear
from torch_geometric.typing import Adj

from gatattn import from_peers
from gatattn.adjacency import read_adjacency
from gatattn.backends.common import repeat_kv_heads
from gatattn.backends.sparse import edge_softmax
from gatattn.bias import edge_bias
from gatattn.explained_edges import check_explained_edges
from gatattn.functional import attention, check_graph_call, logit_multiplier
from gatattn.graph import AttentionGraph, check_graph_devices, describe_graph
from gatattn.projections import shared_input_linears
from gatattn.transforms import refuse_unread_graph, torchscript_refusal


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
        (\mathbf{W}^h_k \mathbf{x}_j + \mathbf{W}^h_e \mathbf{e}_{ij})}{\tau \sqrt{C}}
        + b^h_{ij} \right)

    :math:`\mathcal{N}(i)` is the in-neighbourhood given by :obj:`edge_index`, or, without it,
    every node of :math:`i`'s graph (all nodes, or those with the same :obj:`batch` id), cut to
    earlier positions when :obj:`causal`. Without :obj:`edge_index` no edge is ever built: the
    layer runs fused dense attention per graph. A node with no in-edge gets a zero attention
    output (then the root term, if any).

    A drop-in for :class:`torch_geometric.nn.TransformerConv`: the same positional arguments and
    defaults, parameters (a TransformerConv ``state_dict`` loads), forward signature and outputs,
    ``return_attention_weights`` and ``_alpha`` conventions, and every adjacency PyG passes
    (``edge_index``, :class:`torch_geometric.EdgeIndex`, ``torch.sparse`` ``adj_t``,
    ``SparseTensor``). :meth:`message` states the per-edge attention, as TransformerConv's does;
    :meth:`propagate` runs it whenever PyG needs to see messages (explain mode or an edge mask,
    a registered propagate, message or aggregate hook, :obj:`aggr` other than ``"add"``,
    :obj:`flow="target_to_source"`). Otherwise the fused routes of :func:`gatattn.attention`
    compute the same function. With :obj:`out_proj=True` and :obj:`root_weight=False` it
    computes what :class:`torch.nn.MultiheadAttention` computes
    (:meth:`from_multihead_attention`).

    Args:
        in_channels (int or tuple): Size of each input sample, or a pair
            ``(source, target)`` for bipartite graphs; ``-1`` infers it lazily.
        out_channels (int): Channels per head, :math:`C`.
        heads (int, optional): Number of attention heads. (default: :obj:`1`)
        concat (bool, optional): Concatenate the heads; average them if :obj:`False`.
            (default: :obj:`True`)
        beta (bool, optional): Gate the root term as in ``TransformerConv``; ignored without
            :obj:`root_weight`, as there. (default: :obj:`False`)
        dropout (float, optional): Dropout on the attention weights in training.
            (default: :obj:`0.0`)
        edge_dim (int, optional): Edge feature size; edge features are projected and added to
            keys and values (needs explicit edges). (default: :obj:`None`)
        bias (bool, optional): Biases in the query, key, value, output and root projections.
            (default: :obj:`True`)
        root_weight (bool, optional): Add a projected skip term :math:`\mathbf{W}_r\mathbf{x}_i`.
            (default: :obj:`True`)
        temperature (float, optional): Logits are divided by :math:`\tau`; keyword only.
            (default: :obj:`1.0`)
        out_proj (bool, optional): A linear output projection :math:`\mathbf{W}_o` after the heads
            are merged, as in ``nn.MultiheadAttention``; keyword only. (default: :obj:`False`)
        backend (str, optional): Route override passed to :func:`gatattn.attention`, for tests
            and benchmarks; keyword only. (default: :obj:`"auto"`)
        kv_heads (int, optional): Key and value heads, a divisor of :obj:`heads`
            (grouped-query attention: query head :math:`h` reads kv head
            :math:`\lfloor h / (H / H_{kv}) \rfloor`); the key and value projections output
            ``kv_heads * out_channels``. :obj:`None` means :obj:`heads`; keyword only.
            (default: :obj:`None`)
        **kwargs (optional): Additional arguments of
            :class:`torch_geometric.nn.conv.MessagePassing` (``aggr``, ``flow``, ...).

    Shapes:
        - **input:** node features :math:`(|\mathcal{V}|, F_{in})` or
          :math:`((|\mathcal{V_s}|, F_{s}), (|\mathcal{V_t}|, F_{t}))` if bipartite,
          edge indices :math:`(2, |\mathcal{E}|)` or a sparse adjacency (optional),
          batch vector :math:`(|\mathcal{V}|)` or a ``(batch_src, batch_dst)`` pair (optional),
          edge features :math:`(|\mathcal{E}|, D)` (optional)
        - **output:** node features :math:`(|\mathcal{V}_t|, H * C)` or
          :math:`(|\mathcal{V}_t|, C)` if :obj:`concat=False`

    Under ``torch.compile`` a complete graph and an ``edge_index`` compile without graph breaks;
    :obj:`batch` / :obj:`ptr` graphs (without attention dropout) run as one opaque operator, so
    ``fullgraph=True`` and ``dynamic=True`` work and new sizes need no recompile.
    TorchScript, which PyTorch has deprecated, is refused: use
    ``torch.compile`` or ``torch.export``.

    :math:`b^h_{ij}` is an optional additive bias (:obj:`attn_bias`, e.g. Graphormer's spatial
    encoding, :class:`gatattn.bias.SpatialEncoding`), zero when not given.

    Not supported: ``nn.MultiheadAttention`` with ``add_bias_kv``,
    ``add_zero_attn`` or ``kdim != vdim``.
    """

    def __init__(
        self,
        in_channels: int | tuple[int, int],
        out_channels: int,
        heads: int = 1,
        concat: bool = True,
        beta: bool = False,
        dropout: float = 0.0,
        edge_dim: int | None = None,
        bias: bool = True,
        root_weight: bool = True,
        *,
        temperature: float = 1.0,
        out_proj: bool = False,
        backend: str = "auto",
        kv_heads: int | None = None,
        **kwargs,
    ):
        kwargs.setdefault("aggr", "add")
        super().__init__(node_dim=0, **kwargs)
        _check_counts(heads=heads, out_channels=out_channels, kv_heads=kv_heads)
        for name, value in (("heads", heads), ("out_channels", out_channels)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}; use {name} >= 1")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        kv_heads = heads if kv_heads is None else kv_heads
        if kv_heads < 1 or heads % kv_heads:
            raise ValueError(f"kv_heads must divide heads (grouped-query attention), got "
                             f"heads={heads} and kv_heads={kv_heads}; use a divisor of heads")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.heads = heads
        self.kv_heads = kv_heads
        self.concat = concat
        self.beta = beta and root_weight  # as in TransformerConv: no root term, no gate
        self.dropout = dropout
        self.edge_dim = edge_dim
        self.root_weight = root_weight
        self.temperature = temperature
        self.backend = backend
        self._alpha: Tensor | None = None

        in_src, in_dst = (in_channels, in_channels) if isinstance(in_channels, int) else in_channels
        merged = heads * out_channels if concat else out_channels
        self.lin_key = Linear(in_src, kv_heads * out_channels, bias=bias)
        self.lin_query = Linear(in_dst, heads * out_channels, bias=bias)
        self.lin_value = Linear(in_src, kv_heads * out_channels, bias=bias)
        self.lin_edge = self._optional(edge_dim is not None, "lin_edge",
                                       lambda: Linear(edge_dim, heads * out_channels, bias=False))
        self.lin_skip = self._optional(root_weight, "lin_skip",
                                       lambda: Linear(in_dst, merged, bias=bias))
        self.lin_beta = self._optional(self.beta, "lin_beta",
                                       lambda: Linear(3 * merged, 1, bias=False))
        self.lin_out = self._optional(out_proj, "lin_out",
                                      lambda: Linear(merged, merged, bias=bias))
        self.reset_parameters()

    def _optional(self, present: bool, name: str, make) -> nn.Module | None:
        if present:
            return make()
        self.register_parameter(name, None)
        return None

    def reset_parameters(self):
        super().reset_parameters()
        for lin in (self.lin_key, self.lin_query, self.lin_value, self.lin_edge, self.lin_skip,
                    self.lin_beta, self.lin_out):
            if lin is not None:
                lin.reset_parameters()

    def forward(
        self,
        x: Tensor | tuple[Tensor, Tensor],
        edge_index: Adj | None = None,
        edge_attr: Tensor | None = None,
        return_attention_weights: bool | None = None,
        *,
        graph: AttentionGraph | None = None,
        batch: Tensor | tuple[Tensor, Tensor] | None = None,
        ptr: Tensor | tuple[Tensor, Tensor] | None = None,
        causal: bool | str = False,
        window: tuple[int | None, int | None] | None = None,
        attn_bias: Tensor | None = None,
    ):
        r"""Runs the forward pass of the module.

        Args:
            x (torch.Tensor or (torch.Tensor, torch.Tensor)): Node features, or
                ``(x_src, x_dst)`` for cross-attention.
            edge_index (torch.Tensor, EdgeIndex, torch.sparse.Tensor or SparseTensor,
                optional): Edges ``(2, E)`` or an ``adj_t``; :obj:`None` attends over the
                complete graph of each graph. (default: :obj:`None`)
            edge_attr (torch.Tensor, optional): Edge features ``(E, edge_dim)``, in the order
                of the adjacency's edges (a SparseTensor's values serve when not given).
                (default: :obj:`None`)
            return_attention_weights (bool, optional): If set (to any bool, as in PyG), also
                return the weights: ``(edge_index, alpha)``, a SparseTensor holding them for a
                SparseTensor input. They are differentiable. For an implicit complete graph the
                edges are built (up to :data:`gatattn.graph.MAX_MATERIALIZED_EDGES`).
                (default: :obj:`None`)
            graph (AttentionGraph, optional): The graph from :func:`gatattn.build_graph`,
                built once per batch and shared by every layer (targets are ``x_dst``'s
                nodes, sources ``x_src``'s); it replaces :obj:`edge_index`, :obj:`batch`,
                :obj:`ptr`, :obj:`causal` and :obj:`window`, and the call reads nothing on
                the host.
                (default: :obj:`None`)
            batch (torch.Tensor or pair, optional): Graph id per node, or
                ``(batch_src, batch_dst)`` for cross-attention. (default: :obj:`None`)
            ptr (torch.Tensor or pair, optional): Graph offsets instead of :obj:`batch`.
                (default: :obj:`None`)
            causal (bool or str, optional): Attend only to earlier (or equal) positions
                inside each graph; for cross-attention aligned top-left (:obj:`True`, as SDPA's
                ``is_causal``) or with :obj:`"bottom_right"` each graph's last query sees its
                last key (see :func:`gatattn.attention`). (default: :obj:`False`)
            window ((int, int), optional): A sliding window ``(left, right)`` around that
                diagonal inside each graph (see :func:`gatattn.attention`).
                (default: :obj:`None`)
            attn_bias (torch.Tensor, optional): Additive logit bias per head, laid out as
                :func:`gatattn.attention` takes it: ``(E, heads)`` with edges, else each
                graph's ``n_dst x n_src`` block, target-major, stacked. (default: :obj:`None`)
        """
        x_src, x_dst = (x, x) if isinstance(x, Tensor) else x
        self._validate_features(x_src, x_dst)
        query, key, value = self.project(x_src, x_dst)
        if graph is not None:
            check_graph_call(graph, query, key, edge_index, batch, ptr, causal, window)
            if self.flow != "source_to_target":
                raise ValueError("graph= describes attention source -> target; a layer with "
                                 "flow='target_to_source' takes edge_index instead")
        adjacency = read_adjacency(edge_index) if edge_index is not None else None
        if adjacency is not None and edge_attr is None:
            edge_attr = adjacency.values
        self._check_edge_attr(edge_attr)
        want_weights = isinstance(return_attention_weights, bool)

        if self.runs_propagate():
            graph = graph or self._message_graph(query, key, adjacency, batch, ptr, causal,
                                                 window)
            out, edges, alpha = self._propagate(query, key, value, graph, edge_attr, attn_bias)
        else:
            out, edges, alpha = self._fused(query, key, value, graph, adjacency, edge_attr,
                                            batch, ptr, causal, window, want_weights, attn_bias)

        out = self.finish(out, x_dst)
        if not want_weights:
            return out
        if adjacency is None:
            return out, (edges, alpha)
        return out, adjacency.with_weights(alpha)

    def message(self, query_i: Tensor, key_j: Tensor, value_j: Tensor, edge_attr: Tensor | None,
                attn_bias: Tensor | None, index: Tensor, ptr: Tensor | None,
                size_i: int | None) -> Tensor:
        """The attention each edge ``j -> i`` carries: the spec of every route."""
        if self.lin_edge is not None:
            edge_attr = self.lin_edge(edge_attr).view(-1, self.heads, self.out_channels)
            key_j = key_j + edge_attr
        scale = logit_multiplier(self.out_channels ** -0.5, self.temperature)
        logits = (query_i * key_j).sum(dim=-1) * scale
        if attn_bias is not None:
            logits = logits + attn_bias
        alpha = edge_softmax(logits, index, size_i)  # -inf removes a pair; zeros, not NaN
        self._alpha = alpha
        alpha = F.dropout(alpha, p=self.dropout, training=self.training)
        message = value_j if self.lin_edge is None else value_j + edge_attr
        return message * alpha.unsqueeze(-1)

    def __repr__(self) -> str:
        kv_heads = f", kv_heads={self.kv_heads}" if self.kv_heads != self.heads else ""
        return (f"{self.__class__.__name__}({self.in_channels}, {self.out_channels}, "
                f"heads={self.heads}{kv_heads})")

    def __prepare_scriptable__(self):
        raise torchscript_refusal(type(self).__name__)

    def runs_propagate(self) -> bool:
        """Whether :meth:`forward` runs PyG's :meth:`propagate`, because PyG's machinery must
        see per-edge messages: explain mode or an edge mask, propagate / message / aggregate
        hooks, an ``aggr`` other than ``"add"``, or ``flow="target_to_source"``. Code that
        attends its own way (the KV cache, sharded attention) refuses such a layer."""
        hooks = (self._propagate_forward_pre_hooks, self._propagate_forward_hooks,
                 self._message_forward_pre_hooks, self._message_forward_hooks,
                 self._aggregate_forward_pre_hooks, self._aggregate_forward_hooks)
        return (bool(self.explain) or self._edge_mask is not None or any(hooks)
                or self.aggr not in ("add", "sum") or self.flow != "source_to_target")

    def _fused(self, query, key, value, graph, adjacency, edge_attr, batch, ptr, causal, window,
               want_weights, attn_bias):
        """Attention through :func:`gatattn.attention` (fused routes): ``(out, edges, alpha)``."""
        result = attention(
            query, key, value, graph=graph,
            edge_index=None if adjacency is None else adjacency.edge_index,
            batch=_dst_src(batch), ptr=_dst_src(ptr), causal=causal, window=window,
            temperature=self.temperature, dropout=self.dropout if self.training else 0.0,
            edge_attr=self._embed_edges(edge_attr), attn_bias=attn_bias,
            return_attention_weights=want_weights, backend=self.backend)
        if not want_weights:
            return result, None, None
        out, (edges, alpha) = result
        return out, edges, alpha

    def _message_graph(self, query, key, adjacency, batch, ptr, causal, window):
        """The graph :meth:`propagate` runs over, from the call's keywords (source -> target
        whatever :obj:`flow` says)."""
        num_dst, num_src = query.size(0), key.size(0)
        bipartite = num_dst != num_src or any(isinstance(t, (tuple, list)) for t in (batch, ptr))
        given = None if adjacency is None else adjacency.edge_index
        if given is not None and self.flow != "source_to_target":
            given = given.flip(0)  # the graph module reads row 0 as sources
        check_graph_devices(query.device, edge_index=given, batch=batch, ptr=ptr)
        refuse_unread_graph(query.device, given, batch, ptr, None)
        graph, _ = describe_graph(num_dst, num_src, edge_index=given, batch=_dst_src(batch),
                                  ptr=_dst_src(ptr), causal=causal, window=window,
                                  bipartite=bipartite)
        return graph

    def _propagate(self, query, key, value, graph: AttentionGraph, edge_attr, attn_bias):
        """Attention through :meth:`propagate` and :meth:`message` over ``graph``'s edges
        (materialised if implicit): ``(out, edges, alpha)``, ``edges`` as :obj:`flow` says."""
        edges = graph.to_edge_index()
        if graph.kept_edges is not None and edge_attr is not None:
            edge_attr = edge_attr[graph.kept_edges]
        attn_bias = edge_bias(attn_bias, graph, edges, query)
        # PyG reads edge_index in the direction of self.flow.
        source_to_target = self.flow == "source_to_target"
        edges = edges if source_to_target else edges.flip(0)
        if graph.is_implicit:
            check_explained_edges(self, edges)
        num_dst, num_src = graph.num_dst, graph.num_src
        size = (num_src, num_dst) if source_to_target else (num_dst, num_src)
        # message() states attention per query head: grouped kv heads are expanded for it.
        key, value = repeat_kv_heads(key, self.heads), repeat_kv_heads(value, self.heads)
        out = self.propagate(edges, query=query, key=key, value=value, edge_attr=edge_attr,
                             attn_bias=attn_bias, size=size)
        alpha, self._alpha = self._alpha, None
        return out, edges, alpha

    def _validate_features(self, x_src: Tensor, x_dst: Tensor) -> None:
        in_src, in_dst = ((self.in_channels,) * 2 if isinstance(self.in_channels, int)
                          else self.in_channels)
        for role, x, expected in (("source", x_src, in_src), ("target", x_dst, in_dst)):
            if expected != -1 and x.size(-1) != expected:  # -1: lazy, inferred on first use
                raise ValueError(
                    f"{role} node features have {x.size(-1)} features but the layer was built "
                    f"with in_channels={self.in_channels}")

    def _check_edge_attr(self, edge_attr: Tensor | None) -> None:
        if self.lin_edge is None and edge_attr is not None:
            raise ValueError("edge_attr was given but the layer was built with edge_dim=None")
        if self.lin_edge is not None and edge_attr is None:
            raise ValueError(f"the layer was built with edge_dim={self.edge_dim}: give edge_attr")

    def _embed_edges(self, edge_attr: Tensor | None) -> Tensor | None:
        if self.lin_edge is None:
            return None
        return self.lin_edge(edge_attr).view(-1, self.heads, self.out_channels)

    def project(self, x_src: Tensor, x_dst: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The layer's query, key and value projections, the first half of :meth:`forward`.

        Code that attends its own way (:func:`gatattn.kv_cache.cached_self_attention`,
        :class:`gatattn.distributed.ShardedSelfAttention`) runs ``project``, its attention,
        then :meth:`finish`, and computes what :meth:`forward` computes.

        Args:
            x_src (torch.Tensor): Source node features ``(N_src, in_channels)`` (the same
                tensor as ``x_dst`` for self-attention).
            x_dst (torch.Tensor): Target node features ``(N_dst, in_channels)``.

        Returns:
            Queries ``(N_dst, heads, C)``, keys and values ``(N_src, kv_heads, C)``, ready for
            :func:`gatattn.attention`.
        """
        C = self.out_channels
        if x_src is x_dst:  # self-attention: one input for the three (one autograd node)
            query, key, value = shared_input_linears(
                x_src, (self.lin_query, self.lin_key, self.lin_value))
        else:
            query, (key, value) = self.lin_query(x_dst), shared_input_linears(
                x_src, (self.lin_key, self.lin_value))
        return (query.view(-1, self.heads, C), key.view(-1, self.kv_heads, C),
                value.view(-1, self.kv_heads, C))

    def finish(self, out: Tensor, x_dst: Tensor) -> Tensor:
        """The second half of :meth:`forward`: the attention output to the layer's output.

        Heads are concatenated (or averaged with ``concat=False``), then the output
        projection (``out_proj=True``) and the root term (gated with ``beta``) are applied.

        Args:
            out (torch.Tensor): Attention output ``(N_dst, heads, C)``, e.g. of
                :func:`gatattn.attention` on the tensors :meth:`project` returned.
            x_dst (torch.Tensor): The target node features given to :meth:`project`, which
                the root term reads.

        Returns:
            ``(N_dst, heads * C)``, or ``(N_dst, C)`` with ``concat=False``.
        """
        out = out.reshape(-1, self.heads * self.out_channels) if self.concat else out.mean(dim=1)
        if self.lin_out is not None:
            out = self.lin_out(out)
        if self.lin_skip is not None:
            out = self._add_root(out, self.lin_skip(x_dst))
        return out

    def _add_root(self, out: Tensor, x_root: Tensor) -> Tensor:
        if self.lin_beta is None:
            return out + x_root
        gate = self.lin_beta(torch.cat([out, x_root, out - x_root], dim=-1)).sigmoid()
        return gate * x_root + (1 - gate) * out

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if self.lin_skip is None:  # TransformerConv has one even where it computes nothing
            from_peers.drop_root_weights(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @classmethod
    def from_transformer_conv(cls, conv: TransformerConv) -> SelfAttentionConv:
        """A layer with ``conv``'s weights that computes the same outputs as ``conv``."""
        return from_peers.transformer_conv(cls, conv)

    @classmethod
    def from_multihead_attention(cls, mha: nn.MultiheadAttention) -> SelfAttentionConv:
        """A layer with ``mha``'s weights: for a sequence batch flattened to complete graphs
        (:func:`gatattn.sequences_to_graph`), ``layer(x, ptr=ptr)`` equals ``mha(x, x, x)[0]``,
        and ``layer((x_kv, x_q), ptr=(ptr_kv, ptr_q))`` equals ``mha(x_q, x_kv, x_kv)[0]``."""
        return from_peers.multihead_attention(cls, mha)


def _check_counts(**counts) -> None:
    """Head and channel counts are ints (or ``None``): nn.Linear's error for a float names
    neither the argument nor the fix."""
    for name, value in counts.items():
        if value is not None and (isinstance(value, bool)
                                  or not isinstance(value, numbers.Integral)):
            fix = (f"pass {name}={int(value)}" if isinstance(value, float) and value.is_integer()
                   else f"pass an int {name}")
            raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__}); "
                            f"{fix}")


def _dst_src(pair):
    """A pair in PyG's (source, target) order, as the functional API's (q, k) = (dst, src)."""
    return (pair[1], pair[0]) if isinstance(pair, (tuple, list)) else pair
