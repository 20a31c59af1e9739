"""``nn.MultiheadAttention``'s sequences and masks as batched graphs.

A batch of sequences is a batch of graphs: every query token is a target node, every key token
a source node, and each sequence one complete (or causal) bipartite graph. Padded keys are not
nodes at all, a boolean ``attn_mask`` (or a float one's ``-inf`` entries) is an edge set, a
float ``attn_mask``'s finite entries are an additive attention bias, and ``add_bias_kv`` /
``add_zero_attn`` are one extra source node per sequence that every query sees.
:class:`SequenceAttention` builds those graphs from the masks (reading them on the host) and
attends with :func:`gatattn.attention`; under ``torch.compile`` it runs behind the opaque
operator ``gatattn::sequence_attention``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from gatattn.backends.ops import (
    autograd_recording,
    draw_seed,
    refuse_double_backward,
    seeded,
)
from gatattn.convert import masked_positions, sequences_to_graph
from gatattn.functional import attention
from gatattn.graph import build_graph


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

class SequenceAttention:
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


def traced_sequence_attention(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None,
                               attn_mask: Tensor | None, is_causal: bool, num_heads: int,
                               need_weights: bool,
                               dropout: float) -> tuple[Tensor, Tensor | None]:
    """:class:`SequenceAttention` for tracers, as ``gatattn::sequence_attention``."""
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
    run = SequenceAttention(num_heads)
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
        out, weights = SequenceAttention(num_heads)(
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
