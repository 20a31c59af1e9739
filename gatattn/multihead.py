"""``gatattn.MultiheadAttention``: :class:`torch.nn.MultiheadAttention` computed over graphs.

The module: its projections, its input validation and PyTorch's return conventions. How its
sequences and masks become graphs is :mod:`gatattn.sequence_graphs`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gatattn.backends import routing
from gatattn.sequence_graphs import (
    MultiheadAttentionInputError,
    MultiheadAttentionMaskError,
    SequenceAttention,
    traced_sequence_attention,
)
from gatattn.transforms import refuse_unread_sequences, torchscript_refusal


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
        if routing.opaque_sequences_serve(key_padding_mask, attn_mask):
            # Turning masks into graphs reads them on the host: traced, one opaque operator.
            out, weights = traced_sequence_attention(q, k, v, key_padding_mask, attn_mask,
                                                      is_causal, self.num_heads, need_weights,
                                                      dropout)
        else:
            out, weights = SequenceAttention(self.num_heads)(
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
        ``add_bias_kv`` / ``add_zero_attn`` appended to every sequence's keys and values.
        Three products even for self-attention: one packed product measured slower on CPU
        (its gradient is one more (N, 3E) buffer) and took more memory."""
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


def _in_projection(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``F.linear``, except that a bias of another dtype than ``x`` is added in place, in the
    product's dtype: what PyTorch's layer computes, whose batch-first inputs reach
    ``F.linear`` transposed (a product, then ``add_``); the fused product-and-bias that
    contiguous inputs get refuses the mix."""
    if bias is None or bias.dtype == x.dtype:
        return F.linear(x, weight, bias)
    return F.linear(x, weight).add_(bias)
