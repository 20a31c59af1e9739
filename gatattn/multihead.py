"""``gatattn.MultiheadAttention``: :class:`torch.nn.MultiheadAttention` computed over graphs.

A batch of sequences is a batch of graphs: every query token is a target node, every key token
a source node, and each sequence one complete (or causal) bipartite graph. Padded keys are not
nodes at all, a boolean ``attn_mask`` (or a float one's ``-inf`` entries) is an edge set, a
float ``attn_mask``'s finite entries are an additive attention bias, and ``add_bias_kv`` /
``add_zero_attn`` are one extra source node per sequence that every query sees.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gatattn.backends.ops import (
    autograd_recording,
    draw_seed,
    refuse_double_backward,
    seeded,
)
from gatattn.convert import masked_positions, sequences_to_graph
from gatattn.functional import attention
from gatattn.graph import build_graph
from gatattn.transforms import refuse_unread_sequences, torchscript_refusal


class MultiheadAttentionInputError(ValueError, AssertionError):
    """A malformed input. Also an :class:`AssertionError`, which is what
    :class:`torch.nn.MultiheadAttention` raises for the same input, so callers' handlers work."""


class MultiheadAttentionMaskError(ValueError, RuntimeError):
    """An ``attn_mask`` of the wrong shape, or ``is_causal`` without one. Also a
    :class:`RuntimeError`, which is what :class:`torch.nn.MultiheadAttention` raises."""


@dataclass
class _Graphs:
    """A sequence batch as graphs for :func:`gatattn.attention`.

    ``groups`` graphs (one per sequence, or one per sequence and head when the mask differs
    between heads), each with ``heads`` heads. Target node ``g * L + l`` is query ``l`` of
    graph ``g``; source node ``n`` is key ``source_position[n] % S`` of its graph
    (``source_position`` is ``None`` when source node ``n`` is key ``n % S``).
    """

    q: Tensor  # (groups * L, heads, C)
    k: Tensor  # (num_src, heads, C)
    v: Tensor  # (num_src, heads, C)
    groups: int
    heads: int
    graph: dict  # ptr / edge_index / causal, as gatattn.attention takes them
    source_position: Tensor | None = None
    per_head: bool = False
    bias: Tensor | None = None  # attn_bias in the layout the graph description needs


class MultiheadAttention(nn.MultiheadAttention):
    r"""A drop-in for :class:`torch.nn.MultiheadAttention` whose attention runs over graphs.

    The same constructor, parameters (``state_dict`` loads both ways), forward signature and
    returns (:meth:`from_torch` copies an existing module). Inside, each sequence of the batch
    is a bipartite graph from its keys to its queries and :func:`gatattn.attention` computes

    .. math::
        \alpha^h_{ij} = \operatorname{softmax}_{j \in \mathcal{N}(i)}
        \frac{\langle W^h_q x_i, W^h_k y_j \rangle}{\sqrt{C}}, \qquad
        o_i = W_o \Big\Vert_h \sum_{j \in \mathcal{N}(i)} \alpha^h_{ij} W^h_v z_j

    where :math:`\mathcal{N}(i)` is what the masks leave of the sequence's keys:

    * ``key_padding_mask``: padded keys are dropped from the graph, never attended;
    * ``attn_mask``, boolean or float: its allowed pairs (not ``True``, not ``-inf``) are the
      edges, per sequence, or per sequence and head for a 3-D mask that differs between heads;
      a causal mask (``is_causal`` or recognised) runs as a causal graph without edges. A float
      mask's finite entries are added to the logits, as PyTorch adds them (ALiBi, relative
      position biases): they reach :func:`gatattn.attention` as its ``attn_bias``;
    * ``add_bias_kv`` / ``add_zero_attn``: one source node per sequence (the learned
      ``bias_k``/``bias_v``, or zeros) that every query attends to, as in PyTorch.

    Without an ``attn_mask`` no ``(L, S)`` matrix is built. ``need_weights=True`` (PyTorch's
    default) returns the weights as PyTorch does (``(N, L, S)`` averaged, ``(N, H, L, S)`` with
    ``average_attn_weights=False``, zeros where masked, differentiable) from the same call of
    :func:`gatattn.attention`: each key's value is extended with the one-hot vector of its
    position, so a query's output carries its weights too, on the fused routes. In training,
    dropout acts on the attention weights, as in PyTorch, and the returned weights are the
    dropped ones the output was computed with.

    Differences from PyTorch, on purpose:

    * A query with no key left (fully masked row) gets a zero attention output, so its output is
      ``out_proj``'s bias, and zero weights; PyTorch returns NaN there.
    * A float ``key_padding_mask`` may hold only 0 and ``-inf`` (PyTorch adds other values);
      an ``attn_mask`` holding ``+inf`` or NaN raises a ``ValueError``.
    * ``is_causal=True`` with an ``attn_mask`` that is not the causal mask raises a
      ``ValueError`` (PyTorch's result then depends on the code path); ``is_causal=True``
      without ``attn_mask`` raises, as PyTorch's own (non fast path) forward does.
    * Nested tensors are refused (PyTorch takes them only on its inference fast path).
    * Bad shapes raise :class:`MultiheadAttentionInputError` / :class:`MultiheadAttentionMaskError`,
      which are ``ValueError`` and also the ``AssertionError`` / ``RuntimeError`` PyTorch raises.

    Under ``torch.compile`` / ``torch.export`` a call with masks runs its attention as one
    opaque operator, ``gatattn::sequence_attention``, which reads the masks at run time (no
    graph break, one compile for any batch size and length, results equal to eager mode's; first
    derivatives only). Without masks it is a batch of complete graphs (``segment_attention``).

    ``nn.TransformerEncoderLayer`` in eval mode under ``torch.no_grad`` (``batch_first``, even
    heads, ...) takes PyTorch's fused fast path, which reads this module's weights and does not
    call :meth:`forward`: it is the same function, computed by PyTorch (with PyTorch's NaN for
    fully masked rows). ``torch.backends.mha.set_fastpath_enabled(False)`` routes it here.
    """

    def __prepare_scriptable__(self):
        raise torchscript_refusal(type(self).__name__)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """As :meth:`torch.nn.MultiheadAttention.forward`; see the class docstring for what
        differs."""
        batched = self._validate_inputs(query, key, value, key_padding_mask, attn_mask)
        if not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        N, L, S = query.size(0), query.size(1), key.size(1)
        self._validate_mask_shapes(N, L, S, key_padding_mask, attn_mask, batched)
        refuse_unread_sequences(query.device, key_padding_mask, attn_mask)

        q, k, v = self._project(query, key, value)  # (N, L, E), (N, S', E), (N, S', E)
        dropout = self.dropout if self.training else 0.0
        if torch.compiler.is_compiling() and (key_padding_mask is not None
                                               or attn_mask is not None):
            # Turning masks into graphs reads them on the host: traced, one opaque operator.
            out, weights = _traced_sequence_attention(q, k, v, key_padding_mask, attn_mask,
                                                      is_causal, self.num_heads, need_weights,
                                                      dropout)
        else:
            out, weights = _SequenceAttention(self.num_heads)(
                q, k, v, key_padding_mask, attn_mask, is_causal, S, need_weights, dropout)
        out = self.out_proj(out)  # (N, L, E)
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)
        if not batched:
            return out.squeeze(0), None if weights is None else weights.squeeze(0)
        return (out if self.batch_first else out.transpose(0, 1)), weights

    @classmethod
    def from_torch(cls, mha: nn.MultiheadAttention) -> MultiheadAttention:
        """A copy of ``mha`` (weights, configuration, device, dtype and training mode) that
        computes its attention over graphs."""
        weight = mha.out_proj.weight
        layer = cls(mha.embed_dim, mha.num_heads, mha.dropout, bias=mha.out_proj.bias is not None,
                    add_bias_kv=mha.bias_k is not None, add_zero_attn=mha.add_zero_attn,
                    kdim=mha.kdim, vdim=mha.vdim, batch_first=mha.batch_first,
                    device=weight.device, dtype=weight.dtype)
        layer.load_state_dict(mha.state_dict())
        return layer.train(mha.training)

    # -- projections ---------------------------------------------------------------------------

    def _project(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``W_q x``, ``W_k y``, ``W_v z`` (batch first), with the virtual source nodes of
        ``add_bias_kv`` / ``add_zero_attn`` appended to every sequence's keys and values."""
        if self._qkv_same_embed_dim:
            weights = self.in_proj_weight.chunk(3)
        else:
            weights = (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)
        biases = (None,) * 3 if self.in_proj_bias is None else self.in_proj_bias.chunk(3)
        q, k, v = (_in_projection(x, w, b) for x, w, b in zip((query, key, value), weights,
                                                             biases, strict=True))
        N, E = k.size(0), self.embed_dim
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(N, 1, E)], dim=1)
            v = torch.cat([v, self.bias_v.expand(N, 1, E)], dim=1)
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(N, 1, E)], dim=1)
            v = torch.cat([v, v.new_zeros(N, 1, E)], dim=1)
        return q, k, v

    # -- validation ----------------------------------------------------------------------------

    def _validate_inputs(self, query, key, value, key_padding_mask, attn_mask) -> bool:
        """Shapes that need no sequence lengths; returns whether the input is batched."""
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
            if t.is_nested:
                raise MultiheadAttentionInputError(
                    f"{name} is a nested tensor, which this module does not take; pad it and "
                    "pass key_padding_mask, or call gatattn.attention with ptr=offsets")
        if query.dim() not in (2, 3):
            raise MultiheadAttentionInputError(
                f"query must be 2-D (L, E) unbatched or 3-D batched, got {query.dim()}-D of "
                f"shape {tuple(query.shape)}")
        batched = query.dim() == 3
        if key.dim() != query.dim() or value.dim() != query.dim():
            raise MultiheadAttentionInputError(
                f"query is {query.dim()}-D, so key and value must be {query.dim()}-D too; got "
                f"{key.dim()}-D and {value.dim()}-D")
        if key_padding_mask is not None and key_padding_mask.dim() != query.dim() - 1:
            raise MultiheadAttentionInputError(
                f"key_padding_mask must be {query.dim() - 1}-D for a {query.dim()}-D query "
                f"((N, S) batched, (S,) unbatched), got {key_padding_mask.dim()}-D")
        if attn_mask is not None and attn_mask.dim() not in (2, 3):
            raise MultiheadAttentionInputError(
                f"attn_mask must be None, 2-D (L, S) or 3-D (N * num_heads, L, S), got "
                f"{attn_mask.dim()}-D")
        for name, mask in (("key_padding_mask", key_padding_mask), ("attn_mask", attn_mask)):
            if mask is not None and mask.dtype != torch.bool and not mask.is_floating_point():
                raise MultiheadAttentionInputError(
                    f"{name} must be bool (True = masked) or float (0 / -inf), got {mask.dtype}")
        for name, t, expected in (("query", query, self.embed_dim), ("key", key, self.kdim),
                                  ("value", value, self.vdim)):
            if t.size(-1) != expected:
                raise MultiheadAttentionInputError(
                    f"{name} has {t.size(-1)} features but the module was built for "
                    f"{expected} (embed_dim={self.embed_dim}, kdim={self.kdim}, "
                    f"vdim={self.vdim})")
        if key.shape[:-1] != value.shape[:-1]:
            raise MultiheadAttentionInputError(
                f"key and value must have the same sequence and batch dims, got "
                f"{tuple(key.shape)} and {tuple(value.shape)}")
        batch_dim = 0 if self.batch_first else 1
        if batched and query.size(batch_dim) != key.size(batch_dim):
            raise MultiheadAttentionInputError(
                f"query and key must have the same batch size, got {query.size(batch_dim)} and "
                f"{key.size(batch_dim)} (batch_first={self.batch_first})")
        return batched

    def _validate_mask_shapes(self, N, L, S, key_padding_mask, attn_mask, batched) -> None:
        if key_padding_mask is not None and tuple(key_padding_mask.shape) != (N, S):
            raise MultiheadAttentionInputError(
                f"key_padding_mask must be (batch, source length) = {(N, S)}, got "
                f"{tuple(key_padding_mask.shape)}")
        if attn_mask is None:
            return
        expected = (L, S) if attn_mask.dim() == 2 else (N * self.num_heads, L, S)
        if tuple(attn_mask.shape) != expected:
            error = MultiheadAttentionMaskError if batched else MultiheadAttentionInputError
            raise error(f"attn_mask must have shape {expected} (L = target length, S = source "
                        f"length), got {tuple(attn_mask.shape)}")


class _SequenceAttention:
    """Projected sequences and ``nn.MultiheadAttention``'s masks as graphs, attended by
    :func:`gatattn.attention`. Reads the masks on the host (which pattern they state)."""

    def __init__(self, num_heads: int) -> None:
        self.num_heads = num_heads

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None,
                 attn_mask: Tensor | None, is_causal: bool, S: int, need_weights: bool,
                 dropout: float) -> tuple[Tensor, Tensor | None]:
        """``q`` ``(N, L, E)``, ``k``/``v`` ``(N, S', E)`` with the ``S' - S`` virtual keys
        last -> ``(N, L, E)`` merged heads, and ``(N, H, L, S')`` weights if asked."""
        (N, L, _), num_virtual = q.shape, k.size(1) - S
        kept_keys = _with_virtual(_allowed(key_padding_mask, "key_padding_mask"), num_virtual)
        attended, additive = _split_attn_mask(attn_mask)
        causal = _is_causal_mask(attended, L, S, is_causal)
        allowed = None if causal else _with_virtual(attended, num_virtual)
        bias = None if additive is None else F.pad(
            _as_4d(additive, N, self.num_heads).expand(N, self.num_heads, L, S),
            (0, num_virtual))  # (N, H, L, S'): virtual keys get no bias, as in PyTorch
        graphs = self._graphs(q, k, v, kept_keys, allowed, causal, num_virtual, bias)
        return self._attend(graphs, need_weights, dropout, N, L, k.size(1))

    # -- sequences -> graphs -------------------------------------------------------------------

    def _graphs(self, q: Tensor, k: Tensor, v: Tensor, kept_keys: Tensor | None,
                allowed: Tensor | None, causal: bool, num_virtual: int,
                bias: Tensor | None) -> _Graphs:
        """The cheapest graph description that states the masks: implicit complete / causal
        graphs with padded keys dropped where possible, explicit edges otherwise. ``bias``
        ``(N, H, L, S)`` is laid out for it."""
        (N, L, _), S = q.shape, k.size(1)
        if causal and (num_virtual > 0 or not _left_aligned(kept_keys)):
            # Dropping keys would shift later keys' positions, and virtual keys come after
            # every query: state the causal pattern as edges.
            tril = torch.ones(L, S - num_virtual, dtype=torch.bool, device=q.device).tril()
            allowed, causal = _with_virtual(tril, num_virtual), False
        if allowed is None:
            graphs = self._implicit_graphs(q, k, v, kept_keys, causal)
            if bias is not None:  # each sequence's L x (kept keys) block, target-major
                pairs = None if kept_keys is None else kept_keys.view(N, 1, S).expand(N, L, S)
                graphs.bias = _stacked(bias, pairs)
            return graphs
        allowed = _as_4d(allowed, N, self.num_heads)
        if kept_keys is not None:
            allowed = allowed & kept_keys.view(N, 1, 1, S)
        return self._explicit_graphs(q, k, v, allowed, bias)

    def _implicit_graphs(self, q, k, v, kept_keys, causal) -> _Graphs:
        (N, L, E), S, H = q.shape, k.size(1), self.num_heads
        ptr_dst = torch.arange(N + 1, device=q.device) * L
        if kept_keys is None:
            k_nodes, v_nodes = k.reshape(-1, E), v.reshape(-1, E)
            ptr_src = torch.arange(N + 1, device=q.device) * S
            position = None
        else:
            kv_nodes, ptr_src = sequences_to_graph(torch.cat([k, v], -1),
                                                   key_padding_mask=~kept_keys)
            k_nodes, v_nodes = kv_nodes.split([E, v.size(-1)], -1)
            position = kept_keys.flatten().nonzero().squeeze(1)
        graph = {"ptr": (ptr_dst, ptr_src), "causal": causal}
        if q.device.type == "meta":  # no values to read: the graph is built from the sizes
            ptrs = tuple(torch.arange(N + 1, device="cpu") * n for n in (L, S))
            graph = {"graph": build_graph(ptr=ptrs, causal=causal).to(q.device)}
        return _Graphs(q.reshape(N * L, H, E // H), k_nodes.view(-1, H, E // H),
                       v_nodes.view(-1, H, E // H), groups=N, heads=H, graph=graph,
                       source_position=position)

    def _explicit_graphs(self, q, k, v, allowed: Tensor, bias: Tensor | None) -> _Graphs:
        """``allowed`` is ``(N, H or 1, L, S)``: one graph per sequence if the heads share it,
        else one single-head graph per sequence and head. ``bias`` becomes one row per edge."""
        (N, L, _), S, H = q.shape, k.size(1), self.num_heads
        if allowed.size(1) > 1 and bool((allowed == allowed[:, :1]).all()):
            allowed = allowed[:, :1]
        per_head = allowed.size(1) > 1
        pairs = allowed.expand(N, allowed.size(1), L, S).reshape(-1, L, S)
        g, dst, src = pairs.nonzero().unbind(1)  # sorted by target
        edge_index = torch.stack([g * S + src, g * L + dst])
        nodes = _head_nodes if per_head else _seq_nodes
        if bias is not None:  # (E, heads of a graph)
            bias = (bias.reshape(N * H, L, S)[g, dst, src].unsqueeze(1) if per_head
                    else bias.expand(pairs.size(0), H, L, S)[g, :, dst, src])
        return _Graphs(nodes(q, H), nodes(k, H), nodes(v, H), groups=pairs.size(0),
                       heads=1 if per_head else H, graph={"edge_index": edge_index},
                       per_head=per_head, bias=bias)

    # -- attention -----------------------------------------------------------------------------

    def _attend(self, graphs: _Graphs, need_weights: bool, dropout: float, N: int, L: int,
                S: int) -> tuple[Tensor, Tensor | None]:
        """``(N, L, E)`` merged head outputs, and ``(N, H, L, S)`` weights if asked."""
        if not need_weights:
            out = attention(graphs.q, graphs.k, graphs.v, dropout=dropout, attn_bias=graphs.bias,
                            **graphs.graph)
            return _merge_heads(out, graphs, N, L, self.num_heads), None
        # A target's weights are what attention carries to it when every key's value is the
        # one-hot vector of its position: one call with values [v_j, onehot(j)] returns the
        # output and the weights it was computed with (dropped ones in training), on the
        # fused routes, without building edges.
        C, H = graphs.v.size(-1), self.num_heads
        position = graphs.source_position
        if position is None:
            position = torch.arange(graphs.k.size(0), device=graphs.k.device)
        slots = torch.arange(S, device=position.device)
        one_hot = (position.remainder(max(S, 1)).unsqueeze(1) == slots).to(graphs.v.dtype)
        values = torch.cat([graphs.v, one_hot.unsqueeze(1).expand(-1, graphs.heads, -1)], -1)
        out, weights = attention(graphs.q, graphs.k, values, dropout=dropout,
                                 attn_bias=graphs.bias, **graphs.graph).split([C, S], dim=-1)
        weights = weights.reshape(graphs.groups, L, graphs.heads, S).transpose(1, 2)
        return _merge_heads(out, graphs, N, L, H), weights.reshape(N, H, L, S)


def _in_projection(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``F.linear``, except that a bias of another dtype than ``x`` is added in place, in the
    product's dtype: what PyTorch's layer computes, whose batch-first inputs reach
    ``F.linear`` transposed (a product, then ``add_``); the fused product-and-bias that
    contiguous inputs get refuses the mix."""
    if bias is None or bias.dtype == x.dtype:
        return F.linear(x, weight, bias)
    return F.linear(x, weight).add_(bias)


def _allowed(mask: Tensor | None, name: str) -> Tensor | None:
    """nn.MultiheadAttention's mask (bool True = masked, or 0/-inf float) -> True = attended."""
    return None if mask is None else ~masked_positions(mask, name)


def _split_attn_mask(mask: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    """``attn_mask`` -> (True = attended, additive bias or ``None``). A float mask's ``-inf``
    entries mask; its other entries are added to the logits (``None`` when all are 0)."""
    if mask is None or mask.dtype == torch.bool:
        return _allowed(mask, "attn_mask"), None
    if not mask.is_floating_point():
        raise TypeError(f"attn_mask must be bool or float, got {mask.dtype}")
    attended = mask != float("-inf")
    bad = mask[attended & ~torch.isfinite(mask)]
    if bad.numel():
        raise ValueError(f"attn_mask holds {bad[0].item()}: a float mask holds -inf (masked) "
                         "and finite values (added to the logits)")
    additive = mask.masked_fill(~attended, 0)
    return attended, additive if bool(additive.any()) else None


def _stacked(bias: Tensor, pairs: Tensor | None) -> Tensor:
    """``(N, H, L, S)`` -> rows ``(n, i, j)`` of the pairs kept (all without ``pairs``)."""
    rows = bias.permute(0, 2, 3, 1)  # (N, L, S, H)
    return rows.reshape(-1, bias.size(1)) if pairs is None else rows[pairs]


def _with_virtual(allowed: Tensor | None, num_virtual: int) -> Tensor | None:
    """Every query attends to the virtual keys of add_bias_kv / add_zero_attn."""
    if allowed is None or num_virtual == 0:
        return allowed
    return F.pad(allowed, (0, num_virtual), value=True)


def _is_causal_mask(attended: Tensor | None, L: int, S: int, is_causal: bool) -> bool:
    """Whether the mask (True = attended) is the top-left causal mask. ``is_causal`` is
    PyTorch's hint that it is: refused without a mask, as PyTorch's own forward refuses it, and
    checked with one."""
    if attended is None:
        if is_causal:
            raise MultiheadAttentionMaskError(
                "is_causal=True needs attn_mask, the causal mask it stands for (PyTorch's "
                "contract); pass attn_mask=nn.Transformer.generate_square_subsequent_mask(L)")
        return False
    causal = torch.ones(L, S, dtype=torch.bool, device=attended.device).tril()
    matches = bool((attended == causal).all())
    if is_causal and not matches:
        raise ValueError(
            "is_causal=True but attn_mask is not the causal mask (key j allowed for query i "
            "iff j <= i); pass is_causal=False to apply the mask as given")
    return matches


def _left_aligned(kept_keys: Tensor | None) -> bool:
    """No key kept after a padded one: dropping the padding keeps every key's position."""
    if kept_keys is None:
        return True
    return bool((kept_keys[:, 1:] <= kept_keys[:, :-1]).all())


def _as_4d(allowed: Tensor, N: int, H: int) -> Tensor:
    """``(L, S)`` -> ``(1, 1, L, S)``; ``(N * H, L, S)`` -> ``(N, H, L, S)``."""
    if allowed.dim() == 2:
        return allowed.view(1, 1, *allowed.shape)
    return allowed.view(N, H, *allowed.shape[1:])


def _seq_nodes(x: Tensor, H: int) -> Tensor:
    """``(N, T, E)`` -> ``(N * T, H, C)``: one node per token, all heads."""
    N, T, E = x.shape
    return x.reshape(N * T, H, E // H)


def _head_nodes(x: Tensor, H: int) -> Tensor:
    """``(N, T, E)`` -> ``(N * H * T, 1, C)``: one node per token and head (graph ``n * H + h``)."""
    N, T, E = x.shape
    return x.view(N, T, H, E // H).transpose(1, 2).reshape(N * H * T, 1, E // H)


def _merge_heads(out: Tensor, graphs: _Graphs, N: int, L: int, H: int) -> Tensor:
    """Target nodes' outputs -> ``(N, L, E)``, heads concatenated."""
    C = out.size(-1)
    if graphs.per_head:
        return out.view(N, H, L, C).transpose(1, 2).reshape(N, L, H * C)
    return out.reshape(N, L, H * C)


# -- under torch.compile -----------------------------------------------------------------------


def _traced_sequence_attention(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None,
                               attn_mask: Tensor | None, is_causal: bool, num_heads: int,
                               need_weights: bool,
                               dropout: float) -> tuple[Tensor, Tensor | None]:
    """:class:`_SequenceAttention` for tracers, as ``gatattn::sequence_attention``."""
    seed = draw_seed() if dropout > 0 else None
    out, weights = sequence_attention(q, k, v, key_padding_mask, attn_mask, is_causal, num_heads,
                                      need_weights, dropout, seed)
    return out, weights if need_weights else None


def _key_length(key_padding_mask: Tensor | None, attn_mask: Tensor | None) -> int:
    """``S``, the keys before the virtual ones, from the mask that is given."""
    return (key_padding_mask if key_padding_mask is not None else attn_mask).size(-1)


# The masks decide the graph (which keys are dropped, whether a mask is causal, which pairs are
# edges), so a traced call cannot build it; behind this operator the eager module's code runs
# at run time, host reads and refusals included, and its output shapes need no tensor value.
@torch.library.custom_op("gatattn::sequence_attention", mutates_args=())
def sequence_attention(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None,
                       attn_mask: Tensor | None, is_causal: bool, num_heads: int,
                       need_weights: bool, dropout: float,
                       seed: Tensor | None) -> tuple[Tensor, Tensor]:
    """:class:`MultiheadAttention`'s attention on projected ``q`` ``(N, L, E)``, ``k``, ``v``
    ``(N, S', E)`` (virtual keys last) under its masks: ``(N, L, E_v)`` merged heads and the
    ``(N, H, L, S')`` weights (empty unless ``need_weights``). Dropout runs under a generator
    seeded with ``seed`` (:func:`gatattn.backends.ops.seeded`), which the backward replays."""
    run = _SequenceAttention(num_heads)
    S = _key_length(key_padding_mask, attn_mask)
    if dropout > 0:
        # Recording autograd, as the backward's recomputation does: the same kernels, so the
        # same seed gives the same dropout mask.
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        if _differentiable(attn_mask):
            attn_mask = attn_mask.detach().requires_grad_()
        with autograd_recording(), seeded(seed, q.device):
            out, weights = run(q, k, v, key_padding_mask, attn_mask, is_causal, S,
                               need_weights, dropout)
    else:
        with torch.no_grad():
            out, weights = run(q, k, v, key_padding_mask, attn_mask, is_causal, S,
                               need_weights, dropout)
    out, weights = _unaliased([out.detach(), q.new_empty(0) if weights is None else
                               weights.detach()])
    return out, weights


@sequence_attention.register_fake
def _(q, k, v, key_padding_mask, attn_mask, is_causal, num_heads, need_weights, dropout, seed):
    (N, L, _), S = q.shape, k.size(1)
    weights = q.new_empty(N, num_heads, L, S) if need_weights else q.new_empty(0)
    return q.new_empty(N, L, v.size(-1)), weights


@torch.library.custom_op("gatattn::sequence_attention_backward", mutates_args=())
def sequence_attention_backward(grad_out: Tensor, grad_weights: Tensor, q: Tensor, k: Tensor,
                                v: Tensor, key_padding_mask: Tensor | None,
                                attn_mask: Tensor | None, is_causal: bool, num_heads: int,
                                need_weights: bool, dropout: float, seed: Tensor | None,
                                ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients ``(dq, dk, dv, d attn_mask)`` of :func:`sequence_attention` (the last empty
    unless ``attn_mask`` is float): its forward recomputed and differentiated."""
    with_mask = _differentiable(attn_mask)
    inputs = [t.detach().requires_grad_() for t in (q, k, v, *([attn_mask] if with_mask else []))]
    mask = inputs[3] if with_mask else attn_mask
    with autograd_recording(), seeded(seed if dropout > 0 else None, q.device):
        out, weights = _SequenceAttention(num_heads)(
            *inputs[:3], key_padding_mask, mask, is_causal,
            _key_length(key_padding_mask, attn_mask), need_weights, dropout)
        outputs, grads = [out], [grad_out]
        if weights is not None:
            outputs.append(weights)
            grads.append(grad_weights)
        found = torch.autograd.grad(outputs, inputs, grads, allow_unused=True)
    found = [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, found, strict=True)]
    return (*_unaliased(found[:3], grad_out, grad_weights),
            found[3] if with_mask else q.new_empty(0))


@sequence_attention_backward.register_fake
def _(grad_out, grad_weights, q, k, v, key_padding_mask, attn_mask, is_causal, num_heads,
      need_weights, dropout, seed):
    dmask = torch.empty_like(attn_mask) if _differentiable(attn_mask) else q.new_empty(0)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dmask


def _unaliased(outputs: list[Tensor], *inputs: Tensor) -> list[Tensor]:
    """An operator's outputs may alias neither its inputs nor each other, and must be laid out
    as its fake implementation says (contiguous, own storage). Here they can be views: the
    output and the weights are slices of one result, dk and dv halves of one gradient (keys and
    values are gathered together), a gradient a view of ``grad_out``. Those are copied."""
    taken = {t.untyped_storage().data_ptr() for t in inputs if t.numel()}
    fresh = []
    for t in outputs:
        storage = t.untyped_storage().data_ptr()
        if t.numel() and (storage in taken or t.storage_offset() or not t.is_contiguous()):
            t = t.clone(memory_format=torch.contiguous_format)
        fresh.append(t)
        taken.add(t.untyped_storage().data_ptr())
    return fresh


def _differentiable(mask: Tensor | None) -> bool:
    """A float ``attn_mask`` is added to the logits: it has a gradient, as in PyTorch."""
    return mask is not None and mask.is_floating_point()


def _setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, attn_mask, is_causal, num_heads, need_weights, dropout, seed = inputs
    ctx.save_for_backward(q, k, v, key_padding_mask, attn_mask, seed)
    ctx.options = is_causal, num_heads, need_weights, dropout


def _backward(ctx, grad_out, grad_weights):
    q, k, v, key_padding_mask, attn_mask, seed = ctx.saved_tensors
    is_causal, num_heads, need_weights, dropout = ctx.options
    dq, dk, dv, dmask = sequence_attention_backward(
        grad_out, grad_weights, q, k, v, key_padding_mask, attn_mask, is_causal, num_heads,
        need_weights, dropout, seed)
    return (dq, dk, dv, None, dmask if _differentiable(attn_mask) else None, None, None, None,
            None, None)


sequence_attention.register_autograd(_backward, setup_context=_setup_context)
refuse_double_backward(sequence_attention_backward,
                       "MultiheadAttention with masks under torch.compile / torch.export")
